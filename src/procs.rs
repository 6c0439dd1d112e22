//! Processes still running code from a release that is no longer current.
//!
//! A switch changes what new requests and new processes run; it does not change a process
//! that is already running. Queue consumers (`bin/magento queue:consumers:start`), a
//! long `cron:run`, a worker started by hand: each keeps the code it started with, against a
//! database that may have moved on. This module finds them and ends them gracefully, so their
//! supervisor (cron's `consumers_runner`, systemd, supervisord) starts them again from the
//! new release. It works for any PHP application: it looks only at paths.
//!
//! A process is "old" when its working directory, its executable, or an argument of its
//! command line lies under `<app_root>/releases/<id>` with `<id>` not the current release
//! (a release renamed aside for cleanup or already deleted counts too). Read from /proc
//! directly: three links and two small files per process, no crate needed for that.
//!
//! Never signalled: pid 1, bgagent itself and its ancestors, processes whose name matches
//! `processes.ignore` (php-fpm and web servers: their workers' cwd follows the last script
//! they served, yet they run the new release's code), and interactive processes (a
//! controlling terminal: an operator's shell or editor). Those are listed, with why they are
//! left. Signals go through a pidfd opened and then checked against the start time seen when
//! the process was found, so a pid reused in between is never signalled.
//!
//! Classification ([`classify`]) and the wording are pure; [`scan`] and [`end`] are the I/O.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `processes:` in the config.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct ProcessesConfig {
    /// After ApplicationStart's switch, end old-release processes (SIGTERM, then SIGKILL
    /// after `grace`). false: only list them in `status`.
    pub end_old: bool,
    /// How long each process has between SIGTERM and SIGKILL.
    #[serde(with = "crate::config::duration")]
    pub grace: Duration,
    /// How long to wait for a process to disappear after SIGKILL before reporting it.
    #[serde(with = "crate::config::duration")]
    pub kill_wait: Duration,
    /// Process names never signalled (the kernel's name, the executable's file name or
    /// argv[0]'s; a trailing `*` matches a prefix).
    pub ignore: Vec<String>,
}

impl Default for ProcessesConfig {
    fn default() -> Self {
        ProcessesConfig {
            end_old: true,
            grace: Duration::from_secs(10),
            kill_wait: Duration::from_secs(5),
            ignore: ["php-fpm*", "nginx", "apache2", "httpd"]
                .map(String::from)
                .to_vec(),
        }
    }
}

impl ProcessesConfig {
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if self.grace.is_zero() {
            out.push((
                "processes.grace".into(),
                "must be above 0: SIGTERM needs time to act before SIGKILL".into(),
            ));
        }
        for p in &self.ignore {
            if p.is_empty() || p == "*" {
                out.push((
                    "processes.ignore".into(),
                    format!("`{p}` would match every process; name the programs to leave alone"),
                ));
            }
        }
        out
    }
}

/// What put a process on the list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum By {
    Cwd,
    Exe,
    Cmdline,
}

/// Why a listed process is not signalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Left {
    /// Its name is in `processes.ignore`.
    Ignored,
    /// It has a controlling terminal: someone's session.
    Interactive,
}

/// A process running code from an old release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Found {
    pub pid: i32,
    /// Clock ticks after boot (/proc/PID/stat field 22): with the pid, the identity.
    pub start_time: u64,
    pub uid: u32,
    /// The kernel's name for it (at most 15 bytes), escaped. The full command line is not
    /// shown: it may carry a secret passed as an argument.
    pub name: String,
    /// The old release it runs from (a name under releases/, possibly a hidden one being
    /// cleaned up).
    pub release: String,
    pub by: By,
    /// The path that matched (cwd, exe, or the argument), escaped and cut.
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub left: Option<Left>,
}

/// What happened to one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fate {
    /// Exited within the grace period after SIGTERM.
    Terminated,
    /// Needed SIGKILL, and is gone.
    Killed,
    /// Still there after SIGKILL and `kill_wait` (uninterruptible sleep?).
    Survived,
    /// Gone before it was signalled.
    Gone,
    /// The pid now names another process (reused, or it left the old release): untouched.
    Changed,
    /// Not signalled (see `left` on the process).
    Left,
    /// `processes.end_old` is false.
    Listed,
    /// The signal was refused (bgagent is not allowed to signal it).
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ended {
    #[serde(flatten)]
    pub process: Found,
    pub fate: Fate,
}

/// The record of one sweep after a switch (kept in the state file, shown by `status`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sweep {
    pub at: String,
    /// The release that was current.
    pub current: String,
    pub processes: Vec<Ended>,
}

/// What /proc says about one process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcInfo {
    pub pid: i32,
    pub ppid: i32,
    pub start_time: u64,
    pub uid: u32,
    pub tty_nr: i32,
    pub kernel_thread: bool,
    pub name: String,
    pub cwd: Option<String>,
    pub exe: Option<String>,
    pub cmdline: Vec<String>,
}

/// Where releases live, as the kernel may print it: the configured path and, when the app
/// root is reached through a link, the resolved one. Each ends with `/`.
pub fn releases_prefixes(app_root: &Path) -> Vec<String> {
    let mut out = vec![format!("{}/", app_root.join("releases").display())];
    if let Ok(real) = std::fs::canonicalize(app_root) {
        let r = format!("{}/", real.join("releases").display());
        if !out.contains(&r) {
            out.push(r);
        }
    }
    out
}

/// The release `s` names, when it starts with one of `prefixes` (or, for an argument, has
/// one right after `=`, `:` or `,`, as in `--path=/var/www/releases/X`).
fn release_in(s: &str, prefixes: &[String], anywhere: bool) -> Option<String> {
    // The kernel marks a deleted cwd or exe so.
    let s = s.strip_suffix(" (deleted)").unwrap_or(s);
    for p in prefixes {
        let mut from = 0;
        while let Some(i) = s[from..].find(p.as_str()).map(|i| i + from) {
            let aligned = i == 0 || (anywhere && matches!(s.as_bytes()[i - 1], b'=' | b':' | b','));
            if aligned {
                let id = s[i + p.len()..].split('/').next().unwrap_or("");
                if !id.is_empty() && id != "." && id != ".." {
                    return Some(id.to_string());
                }
            }
            from = i + 1;
            if !anywhere {
                break;
            }
        }
    }
    None
}

fn matches_name(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == pattern,
    }
}

fn basename(s: &str) -> &str {
    let s = s.strip_suffix(" (deleted)").unwrap_or(s);
    s.rsplit('/').next().unwrap_or(s)
}

/// Whether `p` runs code from a release other than `current`, and if so, what to list.
/// `protected`: pids never listed (bgagent and its ancestors). Pure.
pub fn classify(
    p: &ProcInfo,
    prefixes: &[String],
    current: &str,
    ignore: &[String],
    protected: &[i32],
) -> Option<Found> {
    if p.pid <= 1 || p.kernel_thread || protected.contains(&p.pid) {
        return None;
    }
    let old = |id: String| (id != current).then_some(id);
    let hit = p
        .cwd
        .as_deref()
        .and_then(|c| release_in(c, prefixes, false))
        .and_then(old)
        .map(|r| (r, By::Cwd, p.cwd.clone().unwrap_or_default()))
        .or_else(|| {
            p.exe
                .as_deref()
                .and_then(|e| release_in(e, prefixes, false))
                .and_then(old)
                .map(|r| (r, By::Exe, p.exe.clone().unwrap_or_default()))
        })
        .or_else(|| {
            p.cmdline.iter().find_map(|a| {
                release_in(a, prefixes, true)
                    .and_then(old)
                    .map(|r| (r, By::Cmdline, a.clone()))
            })
        });
    let (release, by, path) = hit?;
    let names = [
        Some(p.name.as_str()),
        p.exe.as_deref().map(basename),
        p.cmdline.first().map(|a| basename(a)),
    ];
    let ignored = ignore
        .iter()
        .any(|pat| names.iter().flatten().any(|n| matches_name(pat, n)));
    let left = if ignored {
        Some(Left::Ignored)
    } else if p.tty_nr != 0 {
        Some(Left::Interactive)
    } else {
        None
    };
    Some(Found {
        pid: p.pid,
        start_time: p.start_time,
        uid: p.uid,
        name: crate::text::escape(&p.name),
        release: crate::text::escape(&release),
        by,
        path: crate::text::truncate(&crate::text::escape(&path), 200),
        left,
    })
}

/// Parses /proc/PID/stat: (ppid, tty_nr, kernel thread, start time, name). The name sits
/// in parentheses and may itself hold `)` and spaces: the fields start after the last `)`.
pub fn parse_stat(stat: &str) -> Option<(i32, i32, bool, u64, String)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?.to_string();
    let f: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    // f[0] is field 3 (state): field N is f[N - 3].
    let ppid = f.get(1)?.parse().ok()?;
    let tty_nr = f.get(4)?.parse().ok()?;
    let flags: u64 = f.get(6)?.parse().ok()?;
    let start_time = f.get(19)?.parse().ok()?;
    const PF_KTHREAD: u64 = 0x0020_0000;
    Some((ppid, tty_nr, flags & PF_KTHREAD != 0, start_time, name))
}

/// What /proc says about `pid`, or None when it is gone or unreadable.
pub fn read_proc(pid: i32) -> Option<ProcInfo> {
    let dir = PathBuf::from(format!("/proc/{pid}"));
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    let (ppid, tty_nr, kernel_thread, start_time, name) = parse_stat(&stat)?;
    let uid = std::fs::read_to_string(dir.join("status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().next().and_then(|u| u.parse().ok()))
        })
        .unwrap_or(u32::MAX);
    let link = |n: &str| {
        std::fs::read_link(dir.join(n))
            .ok()
            .map(|p| p.to_string_lossy().into_owned())
    };
    let cmdline = std::fs::read(dir.join("cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default();
    Some(ProcInfo {
        pid,
        ppid,
        start_time,
        uid,
        tty_nr,
        kernel_thread,
        name,
        cwd: link("cwd"),
        exe: link("exe"),
        cmdline,
    })
}

/// This process and its ancestors: never listed, never signalled.
fn protected() -> Vec<i32> {
    let mut out = vec![1];
    let mut pid = std::process::id() as i32;
    while pid > 1 && !out.contains(&pid) {
        out.push(pid);
        pid = read_proc(pid).map(|p| p.ppid).unwrap_or(0);
    }
    out
}

/// The processes running code from a release other than `current`, in pid order.
pub fn scan(app_root: &Path, current: &str, cfg: &ProcessesConfig) -> Vec<Found> {
    let prefixes = releases_prefixes(app_root);
    let protected = protected();
    let mut pids: Vec<i32> = std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect()
        })
        .unwrap_or_default();
    pids.sort_unstable();
    pids.into_iter()
        .filter_map(read_proc)
        .filter_map(|p| classify(&p, &prefixes, current, &cfg.ignore, &protected))
        .collect()
}

/// Processes (not bgagent nor its ancestors) whose command line, arguments joined by
/// spaces, contains one of `patterns`: running `bin/magento cron:run` jobs, for instance.
/// Returns (pid, its name and the pattern; never the whole command line, which may hold a
/// secret passed as an argument).
pub fn running_commands(patterns: &[String]) -> Vec<(i32, String)> {
    let protected = protected();
    let mut out: Vec<(i32, String)> = std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                .filter(|pid| !protected.contains(pid))
                .filter_map(read_proc)
                .filter_map(|p| {
                    let line = p.cmdline.join(" ");
                    patterns
                        .iter()
                        .find(|pat| !pat.is_empty() && line.contains(pat.as_str()))
                        .map(|pat| {
                            (
                                p.pid,
                                format!(
                                    "{} running `{}`",
                                    crate::text::escape(&p.name),
                                    crate::text::escape(pat)
                                ),
                            )
                        })
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort_unstable();
    out
}

/// A process opened for signalling: the pidfd, checked against what the scan saw.
enum Opened {
    Ready(OwnedFd),
    Gone,
    Changed,
}

fn open_checked(f: &Found, prefixes: &[String], current: &str, cfg: &ProcessesConfig) -> Opened {
    let Some(pid) = rustix::process::Pid::from_raw(f.pid) else {
        return Opened::Gone;
    };
    let fd = match rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
        Ok(fd) => fd,
        Err(_) => return Opened::Gone,
    };
    // The pidfd names one process for good; this read, after the open, says whether it is
    // still the process the scan found (same start time, still under an old release).
    match read_proc(f.pid) {
        None => Opened::Gone,
        Some(p) => match classify(&p, prefixes, current, &cfg.ignore, &[]) {
            Some(now) if now.start_time == f.start_time && now.left.is_none() => Opened::Ready(fd),
            _ => Opened::Changed,
        },
    }
}

/// Waits until the process behind `fd` exits (its pidfd turns readable), up to `limit`.
async fn exited_within(fd: &tokio::io::unix::AsyncFd<OwnedFd>, limit: Duration) -> bool {
    matches!(tokio::time::timeout(limit, fd.readable()).await, Ok(Ok(_)))
}

/// Ends the `found` processes: each not left alone gets SIGTERM, `grace` to exit, then
/// SIGKILL and `kill_wait`. All at once, each with its own deadline. With `end_old` false,
/// nothing is signalled and each is recorded as listed.
pub async fn end(
    found: Vec<Found>,
    app_root: &Path,
    current: &str,
    cfg: &ProcessesConfig,
) -> Vec<Ended> {
    let prefixes = releases_prefixes(app_root);
    let mut tasks = tokio::task::JoinSet::new();
    let mut out = Vec::new();
    for f in found {
        if f.left.is_some() {
            out.push(Ended {
                process: f,
                fate: Fate::Left,
            });
            continue;
        }
        if !cfg.end_old {
            out.push(Ended {
                process: f,
                fate: Fate::Listed,
            });
            continue;
        }
        let fd = match open_checked(&f, &prefixes, current, cfg) {
            Opened::Ready(fd) => fd,
            Opened::Gone => {
                out.push(Ended {
                    process: f,
                    fate: Fate::Gone,
                });
                continue;
            }
            Opened::Changed => {
                out.push(Ended {
                    process: f,
                    fate: Fate::Changed,
                });
                continue;
            }
        };
        let (grace, kill_wait) = (cfg.grace, cfg.kill_wait);
        tasks.spawn(async move {
            let fate = end_one(fd, grace, kill_wait).await;
            Ended { process: f, fate }
        });
    }
    while let Some(r) = tasks.join_next().await {
        if let Ok(e) = r {
            out.push(e);
        }
    }
    out.sort_by_key(|e| e.process.pid);
    out
}

async fn end_one(fd: OwnedFd, grace: Duration, kill_wait: Duration) -> Fate {
    use rustix::process::{Signal, pidfd_send_signal};
    if let Err(e) = pidfd_send_signal(&fd, Signal::TERM) {
        return if e == rustix::io::Errno::SRCH {
            Fate::Gone
        } else {
            Fate::Failed
        };
    }
    // SAFETY: the AsyncFd owns the pidfd, and nothing else closes or replaces it.
    let afd = match unsafe { tokio::io::unix::AsyncFd::register(fd) } {
        Ok(a) => a,
        Err(_) => return Fate::Failed,
    };
    if exited_within(&afd, grace).await {
        return Fate::Terminated;
    }
    if pidfd_send_signal(afd.get_ref(), Signal::KILL).is_err() {
        // ESRCH: it exited between the deadline and the signal.
        return Fate::Terminated;
    }
    if exited_within(&afd, kill_wait).await {
        Fate::Killed
    } else {
        Fate::Survived
    }
}

/// One line per process for the event log.
pub fn describe(e: &Ended) -> String {
    let p = &e.process;
    let what = match e.fate {
        Fate::Terminated => "ended by SIGTERM".to_string(),
        Fate::Killed => "did not exit within the grace period; ended by SIGKILL".to_string(),
        Fate::Survived => "still running after SIGKILL (uninterruptible?); check it".to_string(),
        Fate::Gone => "exited before it was signalled".to_string(),
        Fate::Changed => "pid now names another process; not signalled".to_string(),
        Fate::Left => match p.left {
            Some(Left::Interactive) => "left alone: it has a terminal (someone's session)".into(),
            _ => "left alone: its name is in processes.ignore".into(),
        },
        Fate::Listed => {
            "left running (processes.end_old is false): restart it to run the current release"
                .into()
        }
        Fate::Failed => "could not be signalled (permission?)".to_string(),
    };
    format!(
        "process {} ({}, uid {}) ran release {} ({} {}): {what}",
        p.pid,
        p.name,
        p.uid,
        p.release,
        match p.by {
            By::Cwd => "cwd",
            By::Exe => "exe",
            By::Cmdline => "argument",
        },
        p.path
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefixes() -> Vec<String> {
        vec!["/srv/app/releases/".into(), "/data/app/releases/".into()]
    }

    fn proc_(cwd: &str, exe: &str, cmd: &[&str]) -> ProcInfo {
        ProcInfo {
            pid: 4242,
            ppid: 1,
            start_time: 99,
            uid: 33,
            tty_nr: 0,
            kernel_thread: false,
            name: "php".into(),
            cwd: Some(cwd.into()),
            exe: Some(exe.into()),
            cmdline: cmd.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn ignore() -> Vec<String> {
        ProcessesConfig::default().ignore
    }

    #[test]
    fn cwd_under_an_old_release_is_found() {
        let p = proc_(
            "/srv/app/releases/A/pub",
            "/usr/bin/php8.2",
            &["php", "x.php"],
        );
        let f = classify(&p, &prefixes(), "B", &ignore(), &[]).unwrap();
        assert_eq!((f.release.as_str(), f.by), ("A", By::Cwd));
        assert_eq!(f.left, None);
        assert!(classify(&p, &prefixes(), "A", &ignore(), &[]).is_none());
    }

    #[test]
    fn resolved_app_root_and_deleted_release_count() {
        let p = proc_("/data/app/releases/.trash-A (deleted)", "/usr/bin/php", &[]);
        let f = classify(&p, &prefixes(), "B", &ignore(), &[]).unwrap();
        assert_eq!(f.release, ".trash-A");
    }

    #[test]
    fn argument_naming_an_old_release_is_found_even_after_an_option() {
        let p = proc_(
            "/",
            "/usr/bin/php",
            &[
                "php",
                "/srv/app/releases/A/bin/magento",
                "queue:consumers:start",
            ],
        );
        let f = classify(&p, &prefixes(), "B", &ignore(), &[]).unwrap();
        assert_eq!((f.release.as_str(), f.by), ("A", By::Cmdline));
        let p = proc_("/", "/usr/bin/php", &["php", "--root=/srv/app/releases/A"]);
        assert_eq!(
            classify(&p, &prefixes(), "B", &ignore(), &[])
                .unwrap()
                .release,
            "A"
        );
    }

    #[test]
    fn a_lookalike_path_is_not_a_release() {
        // /x/srv/app/releases/A is another tree that happens to contain the prefix.
        for p in [
            proc_("/x/srv/app/releases/A", "/usr/bin/php", &[]),
            proc_(
                "/",
                "/usr/bin/php",
                &["php", "/x/srv/app/releases/A/run.php"],
            ),
            proc_("/srv/app/releases-old/A", "/usr/bin/php", &[]),
            proc_("/srv/app/releases/", "/usr/bin/php", &[]),
            proc_(
                "/srv/app/current",
                "/usr/bin/php",
                &["php", "/srv/app/current/bin/magento"],
            ),
        ] {
            assert!(
                classify(&p, &prefixes(), "B", &ignore(), &[]).is_none(),
                "{p:?}"
            );
        }
    }

    #[test]
    fn php_fpm_workers_and_terminals_are_listed_but_left() {
        let mut fpm = proc_(
            "/srv/app/releases/A/pub",
            "/usr/sbin/php-fpm8.2",
            &["php-fpm: pool www"],
        );
        fpm.name = "php-fpm8.2".into();
        assert_eq!(
            classify(&fpm, &prefixes(), "B", &ignore(), &[])
                .unwrap()
                .left,
            Some(Left::Ignored)
        );
        let mut shell = proc_("/srv/app/releases/A", "/usr/bin/bash", &["-bash"]);
        shell.tty_nr = 34817;
        assert_eq!(
            classify(&shell, &prefixes(), "B", &ignore(), &[])
                .unwrap()
                .left,
            Some(Left::Interactive)
        );
    }

    #[test]
    fn pid_1_kernel_threads_and_protected_pids_are_never_listed() {
        let mut p = proc_("/srv/app/releases/A", "/usr/bin/php", &[]);
        assert!(classify(&p, &prefixes(), "B", &ignore(), &[4242]).is_none());
        p.pid = 1;
        assert!(classify(&p, &prefixes(), "B", &ignore(), &[]).is_none());
        p.pid = 7;
        p.kernel_thread = true;
        assert!(classify(&p, &prefixes(), "B", &ignore(), &[]).is_none());
    }

    #[test]
    fn stat_with_a_name_holding_parentheses_and_spaces_parses() {
        let stat = "4242 (my (odd) name) S 77 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 123456 1000 10 18446744073709551615";
        assert_eq!(
            parse_stat(stat),
            Some((77, 0, false, 123456, "my (odd) name".into()))
        );
    }

    #[test]
    fn the_scan_sees_a_real_child_by_cwd_and_skips_itself() {
        let root = tempfile::tempdir().unwrap();
        let old = root.path().join("releases/OLD");
        std::fs::create_dir_all(&old).unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .current_dir(&old)
            .spawn()
            .unwrap();
        let found = scan(root.path(), "NEW", &ProcessesConfig::default());
        let _ = child.kill();
        let _ = child.wait();
        let mine: Vec<_> = found
            .iter()
            .filter(|f| f.pid == child.id() as i32)
            .collect();
        assert_eq!(mine.len(), 1, "{found:?}");
        assert_eq!((mine[0].release.as_str(), mine[0].by), ("OLD", By::Cwd));
        assert!(!found.iter().any(|f| f.pid == std::process::id() as i32));
    }

    /// A pid whose start time no longer matches what the scan saw (the pid was reused
    /// between finding and signalling) is never signalled.
    #[tokio::test]
    async fn a_pid_whose_identity_changed_is_not_signalled() {
        let root = tempfile::tempdir().unwrap();
        let old = root.path().join("releases/OLD");
        std::fs::create_dir_all(&old).unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .current_dir(&old)
            .spawn()
            .unwrap();
        let cfg = ProcessesConfig {
            grace: Duration::from_secs(1),
            ..Default::default()
        };
        let mut found: Vec<Found> = scan(root.path(), "NEW", &cfg)
            .into_iter()
            .filter(|f| f.pid == child.id() as i32)
            .collect();
        assert_eq!(found.len(), 1);
        found[0].start_time += 1;
        let ended = end(found.clone(), root.path(), "NEW", &cfg).await;
        assert_eq!(ended[0].fate, Fate::Changed);
        assert!(
            child.try_wait().unwrap().is_none(),
            "the process was signalled"
        );
        // The same process with its true identity is ended by SIGTERM.
        found[0].start_time -= 1;
        let ended = end(found, root.path(), "NEW", &cfg).await;
        assert_eq!(ended[0].fate, Fate::Terminated);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(child.wait().unwrap().signal(), Some(15));
    }
}
