//! Running external programs: by argv (never a shell), in their own session, with their own
//! stdio, as another user when asked, and with a timeout that ends the whole process group.
//! Processes a command leaves behind when it exits (`something &`) are ended with its group.
//!
//! A child that kept the hook's stdout open would make the CodeDeploy agent fail the hook
//! ("failed to close STDOUT"), so stdin is /dev/null and stdout/stderr are pipes that bgagent
//! reads and turns into log lines (which reach the hook through the daemon's log stream).
//! Users are switched natively (setgroups, setgid, setuid in the child), not with `su`,
//! which fails for nologin users such as www-data.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tracing::{Instrument, info, warn};

/// A command as the config states it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct CommandSpec {
    /// Program and arguments; the program is looked up in PATH when it has no `/`.
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory; relative to the new release when run for a lifecycle event.
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default = "default_timeout", with = "crate::config::duration")]
    pub timeout: Duration,
}

fn default_timeout() -> Duration {
    Duration::from_secs(300)
}

impl CommandSpec {
    pub fn new(argv: &[&str]) -> CommandSpec {
        CommandSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: BTreeMap::new(),
            cwd: None,
            user: None,
            group: None,
            timeout: default_timeout(),
        }
    }

    fn shown(&self) -> String {
        self.argv.join(" ")
    }
}

/// How long a process group gets between SIGTERM and SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Finished {
    pub code: Option<i32>,
    pub duration: Duration,
    /// The last lines of output, for error reports.
    pub tail: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("the command is empty")]
    Empty,
    #[error("failed to start `{cmd}`: {source}")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("`{cmd}`: no user named `{user}` on this host")]
    NoUser { cmd: String, user: String },
    #[error("`{cmd}`: no group named `{group}` on this host")]
    NoGroup { cmd: String, group: String },
    #[error("`{cmd}`: uid {uid} has no passwd entry, so its group is unknown; set `group:` too")]
    NoPrimaryGroup { cmd: String, uid: u32 },
    #[error("`{cmd}` ran longer than {timeout:?} and was stopped (SIGTERM, then SIGKILL to its process group){}", tail_text(.tail))]
    TimedOut {
        cmd: String,
        timeout: Duration,
        tail: Vec<String>,
    },
    #[error("`{cmd}` exited with code {code}{}", tail_text(.tail))]
    Failed {
        cmd: String,
        code: i32,
        tail: Vec<String>,
    },
    #[error("`{cmd}` was killed by signal {signal}{}", tail_text(.tail))]
    Killed {
        cmd: String,
        signal: i32,
        tail: Vec<String>,
    },
}

fn tail_text(tail: &[String]) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("; last output: {}", tail.join(" | "))
    }
}

struct Ids {
    uid: Option<u32>,
    gid: Option<u32>,
    groups: Vec<u32>,
}

fn resolve_ids(spec: &CommandSpec) -> Result<Ids, ProcessError> {
    let cmd = spec.shown();
    let user = match &spec.user {
        Some(u) => Some(
            crate::perms::lookup_user(u).ok_or_else(|| ProcessError::NoUser {
                cmd: cmd.clone(),
                user: u.clone(),
            })?,
        ),
        None => None,
    };
    let gid = match &spec.group {
        Some(g) => Some(
            crate::perms::lookup_group(g).ok_or_else(|| ProcessError::NoGroup {
                cmd: cmd.clone(),
                group: g.clone(),
            })?,
        ),
        None => match user {
            Some((_, Some(g))) => Some(g),
            Some((uid, None)) => {
                return Err(ProcessError::NoPrimaryGroup { cmd, uid });
            }
            None => None,
        },
    };
    // Supplementary groups are computed here, in the parent: getgrouplist is not safe to
    // call between fork and exec.
    let groups = match (&spec.user, user, gid) {
        (Some(name), Some((_, Some(primary))), Some(g)) => {
            let mut groups = crate::perms::group_list(name, primary);
            if !groups.contains(&g) {
                groups.push(g);
            }
            groups
        }
        (_, _, Some(g)) => vec![g],
        _ => Vec::new(),
    };
    Ok(Ids {
        uid: user.map(|(u, _)| u),
        gid,
        groups,
    })
}

/// The command `spec` describes, ready to spawn: argv, env, stdin /dev/null, cwd, its own
/// session, `inherit` kept open in the child, the user switched natively. Returns it with
/// the command line as shown in messages.
fn command(
    spec: &CommandSpec,
    default_cwd: Option<&std::path::Path>,
    extra_env: &BTreeMap<String, String>,
    inherit: Option<std::os::fd::RawFd>,
) -> Result<(tokio::process::Command, String), ProcessError> {
    let Some(prog) = spec.argv.first() else {
        return Err(ProcessError::Empty);
    };
    let cmd_shown = spec.shown();
    let ids = resolve_ids(spec)?;
    let mut cmd = tokio::process::Command::new(prog);
    cmd.args(&spec.argv[1..])
        .envs(extra_env)
        .envs(&spec.env)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    match (&spec.cwd, default_cwd) {
        (Some(c), Some(d)) if c.is_relative() => {
            cmd.current_dir(d.join(c));
        }
        (Some(c), _) => {
            cmd.current_dir(c);
        }
        (None, Some(d)) => {
            cmd.current_dir(d);
        }
        (None, None) => {}
    }
    let (uid, gid, groups) = (ids.uid, ids.gid, ids.groups);
    // SAFETY: only async-signal-safe calls (setsid, fcntl, setgroups, setgid, setuid) run
    // between fork and exec; all data was prepared in the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Clearing close-on-exec in the forked child only: the parent's descriptor
            // keeps its flag, so no other command spawned meanwhile inherits it.
            if let Some(fd) = inherit
                && libc::fcntl(fd, libc::F_SETFD, 0) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if (gid.is_some() || uid.is_some())
                && libc::setgroups(groups.len(), groups.as_ptr()) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(g) = gid
                && libc::setgid(g) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(u) = uid
                && libc::setuid(u) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok((cmd, cmd_shown))
}

/// Runs `spec`, streaming its output as log lines. `extra_env` is added to the spec's env.
pub async fn run(
    spec: &CommandSpec,
    default_cwd: Option<&std::path::Path>,
    extra_env: &BTreeMap<String, String>,
) -> Result<Finished, ProcessError> {
    run_inheriting(spec, default_cwd, extra_env, None).await
}

/// Like [`run`], and the child (and whatever it starts) also holds `inherit`, an open file
/// descriptor of ours: what that descriptor keeps alive (a socket, a lock) then lives at
/// least as long as the command, even if bgagent itself is killed.
pub async fn run_inheriting(
    spec: &CommandSpec,
    default_cwd: Option<&std::path::Path>,
    extra_env: &BTreeMap<String, String>,
    inherit: Option<std::os::fd::RawFd>,
) -> Result<Finished, ProcessError> {
    let (mut cmd, cmd_shown) = command(spec, default_cwd, extra_env, inherit)?;
    let prog = &spec.argv[0];
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let t0 = Instant::now();
    let mut child = cmd.spawn().map_err(|source| ProcessError::Spawn {
        cmd: cmd_shown.clone(),
        source,
    })?;
    let pid = child.id().unwrap_or(0) as i32;
    let name = std::path::Path::new(prog)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tail = std::sync::Arc::new(std::sync::Mutex::new(
        std::collections::VecDeque::<String>::new(),
    ));
    // The readers carry the caller's span: the span routes their lines to the hook that asked
    // for the work and gives them the event's journald fields.
    let mut readers = tokio::task::JoinSet::new();
    if let Some(out) = child.stdout.take() {
        readers.spawn(pump(out, name.clone(), false, tail.clone()).in_current_span());
    }
    if let Some(err) = child.stderr.take() {
        readers.spawn(pump(err, name.clone(), true, tail.clone()).in_current_span());
    }
    let status = match tokio::time::timeout(spec.timeout, child.wait()).await {
        Ok(s) => s.map_err(|source| ProcessError::Spawn {
            cmd: cmd_shown.clone(),
            source,
        })?,
        Err(_) => {
            end_group_at_timeout(&mut child, pid, &cmd_shown, spec.timeout).await;
            let _ = drain_readers(&mut readers, Duration::from_secs(1)).await;
            return Err(ProcessError::TimedOut {
                cmd: cmd_shown,
                timeout: spec.timeout,
                tail: take_tail(&tail),
            });
        }
    };
    // A process the command left behind that still holds its output pipes (`daemon &`) is
    // ended with the command's process group: otherwise the step waits on it. Daemons that
    // detach properly (nginx, php-fpm: their own session, stdio on /dev/null) close the pipes
    // within moments and live on.
    if !drain_readers(&mut readers, DETACH_GRACE).await && group_alive(pid) {
        warn!(
            "`{cmd_shown}` exited but left processes running in its process group; ending them (SIGTERM, then SIGKILL)"
        );
        kill_group(pid, libc::SIGTERM);
        let _ = drain_readers(&mut readers, KILL_GRACE).await;
        kill_group(pid, libc::SIGKILL);
    }
    // A process that left the group (its own setsid) may still hold a pipe: bounded wait.
    let _ = drain_readers(&mut readers, Duration::from_secs(1)).await;
    let duration = t0.elapsed();
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(0), _) => {
            info!("`{cmd_shown}` finished in {:.2}s", duration.as_secs_f64());
            Ok(Finished {
                code: Some(0),
                duration,
                tail: take_tail(&tail),
            })
        }
        (Some(code), _) => Err(ProcessError::Failed {
            cmd: cmd_shown,
            code,
            tail: take_tail(&tail),
        }),
        (None, Some(signal)) => Err(ProcessError::Killed {
            cmd: cmd_shown,
            signal,
            tail: take_tail(&tail),
        }),
        (None, None) => Err(ProcessError::Killed {
            cmd: cmd_shown,
            signal: 0,
            tail: take_tail(&tail),
        }),
    }
}

/// Runs `spec` on bgagent's own stdout and stderr (no pipes), holding `inherit` as
/// [`run_inheriting`] does. For a job that starts workers in the background and may leave
/// them running when it exits (Magento's `cron:run` starts its groups with
/// `nohup ... > /dev/null &`, stderr kept): with no pipe to hold, they are not taken for a
/// process left behind, and they are never ended here. At `timeout` the whole process
/// group gets SIGTERM, then SIGKILL after [`KILL_GRACE`].
pub async fn run_attached(
    spec: &CommandSpec,
    default_cwd: Option<&std::path::Path>,
    extra_env: &BTreeMap<String, String>,
    inherit: Option<std::os::fd::RawFd>,
) -> Result<Finished, ProcessError> {
    let (mut cmd, cmd_shown) = command(spec, default_cwd, extra_env, inherit)?;
    cmd.stdout(Stdio::inherit()).stderr(Stdio::inherit());
    let t0 = Instant::now();
    let mut child = cmd.spawn().map_err(|source| ProcessError::Spawn {
        cmd: cmd_shown.clone(),
        source,
    })?;
    let pid = child.id().unwrap_or(0) as i32;
    let status = match tokio::time::timeout(spec.timeout, child.wait()).await {
        Ok(s) => s.map_err(|source| ProcessError::Spawn {
            cmd: cmd_shown.clone(),
            source,
        })?,
        Err(_) => {
            end_group_at_timeout(&mut child, pid, &cmd_shown, spec.timeout).await;
            return Err(ProcessError::TimedOut {
                cmd: cmd_shown,
                timeout: spec.timeout,
                tail: Vec::new(),
            });
        }
    };
    let duration = t0.elapsed();
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(0), _) => Ok(Finished {
            code: Some(0),
            duration,
            tail: Vec::new(),
        }),
        (Some(code), _) => Err(ProcessError::Failed {
            cmd: cmd_shown,
            code,
            tail: Vec::new(),
        }),
        (_, signal) => Err(ProcessError::Killed {
            cmd: cmd_shown,
            signal: signal.unwrap_or(0),
            tail: Vec::new(),
        }),
    }
}

/// What [`run_private`] saw: the exit status and the start of the merged output.
#[derive(Debug)]
pub struct Private {
    pub status: std::process::ExitStatus,
    /// stdout and stderr, merged, at most [`PRIVATE_OUTPUT_MAX`] bytes (lossy UTF-8).
    pub output: String,
}

/// How much of a private run's output is kept; the rest is read and dropped.
pub const PRIVATE_OUTPUT_MAX: usize = 64 * 1024;

/// Runs a short check whose output may quote a secret (`php -l` on a rendered env.php): by
/// argv, in its own session, stdin /dev/null, stdout and stderr captured into one pipe and
/// never logged; the caller decides what of it may be shown. At `timeout` the whole process
/// group gets SIGTERM, then SIGKILL after a grace; whatever the program left behind in its
/// group is ended when it exits. Blocking: call it from a blocking thread.
pub fn run_private(
    argv: &[std::ffi::OsString],
    timeout: Duration,
) -> Result<Private, ProcessError> {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    let Some(prog) = argv.first() else {
        return Err(ProcessError::Empty);
    };
    let shown = argv
        .iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let spawn_err = |source| ProcessError::Spawn {
        cmd: shown.clone(),
        source,
    };
    let (mut reader, writer) = std::io::pipe().map_err(spawn_err)?;
    let mut cmd = std::process::Command::new(prog);
    cmd.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(writer.try_clone().map_err(spawn_err)?)
        .stderr(writer);
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(spawn_err)?;
    // Our copies of the pipe's write end go with the Command: EOF comes when the program
    // (and whatever it started) closes its own.
    drop(cmd);
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let room = PRIVATE_OUTPUT_MAX.saturating_sub(kept.len());
                    kept.extend_from_slice(&buf[..n.min(room)]);
                }
            }
        }
        let _ = tx.send(kept);
    });
    let t0 = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if t0.elapsed() >= timeout => {
                kill_group(pid, libc::SIGTERM);
                let grace = Instant::now();
                while grace.elapsed() < Duration::from_secs(2) {
                    if let Ok(Some(_)) = child.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                kill_group(pid, libc::SIGKILL);
                let _ = child.wait();
                return Err(ProcessError::TimedOut {
                    cmd: shown,
                    timeout,
                    tail: Vec::new(),
                });
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(source) => return Err(ProcessError::Spawn { cmd: shown, source }),
        }
    };
    // A check has no business leaving processes behind.
    if group_alive(pid) {
        kill_group(pid, libc::SIGKILL);
    }
    // One that left the group (its own setsid) may still hold the pipe: bounded wait.
    let kept = rx.recv_timeout(Duration::from_secs(1)).unwrap_or_default();
    Ok(Private {
        status,
        output: String::from_utf8_lossy(&kept).into_owned(),
    })
}

/// A command past its timeout: SIGTERM to its process group, SIGKILL after [`KILL_GRACE`]
/// (and once more for children that ignored SIGTERM), the command reaped.
async fn end_group_at_timeout(
    child: &mut tokio::process::Child,
    pid: i32,
    cmd_shown: &str,
    timeout: Duration,
) {
    warn!(
        "`{cmd_shown}` exceeded its timeout of {timeout:?}: sending SIGTERM to its process group"
    );
    kill_group(pid, libc::SIGTERM);
    if tokio::time::timeout(KILL_GRACE, child.wait())
        .await
        .is_err()
    {
        kill_group(pid, libc::SIGKILL);
        let _ = child.wait().await;
    }
    kill_group(pid, libc::SIGKILL);
}

fn take_tail(t: &std::sync::Mutex<std::collections::VecDeque<String>>) -> Vec<String> {
    t.lock()
        .map(|g| g.iter().cloned().collect())
        .unwrap_or_default()
}

/// How long a process a command started gets to let go of the command's output pipes.
const DETACH_GRACE: Duration = Duration::from_millis(500);

/// Waits until every reader reached end of output (true), or `limit` passed (false).
async fn drain_readers(readers: &mut tokio::task::JoinSet<()>, limit: Duration) -> bool {
    tokio::time::timeout(limit, async {
        while readers.join_next().await.is_some() {}
    })
    .await
    .is_ok()
}

/// Whether any process is left in the group led by `pid`.
fn group_alive(pid: i32) -> bool {
    // SAFETY: plain syscall; signal 0 only checks for existence.
    pid > 0 && unsafe { libc::kill(-pid, 0) } == 0
}

fn kill_group(pid: i32, sig: i32) {
    if pid > 0 {
        // SAFETY: plain syscall; the child leads its own process group (setsid).
        unsafe {
            libc::kill(-pid, sig);
        }
    }
}

async fn pump(
    r: impl tokio::io::AsyncRead + Unpin,
    name: String,
    is_err: bool,
    tail: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<String>>>,
) {
    let mut lines = BufReader::new(r).lines();
    // Both streams at INFO, tagged: tools write progress and notices to stderr (`php-fpm -t`
    // says its config is fine there); whether the command failed is its exit code, and a
    // failure's error quotes the last lines anyway.
    let tag = if is_err { " stderr" } else { "" };
    while let Ok(Some(line)) = lines.next_line().await {
        // Blank lines say nothing and cost the hook's 2048-character tail.
        if line.trim().is_empty() {
            continue;
        }
        info!("[{name}{tag}] {line}");
        if let Ok(mut t) = tail.lock() {
            t.push_back(line.chars().take(300).collect());
            if t.len() > 5 {
                t.pop_front();
            }
        }
    }
}
