//! The process runner against real children: sessions, stdio, user switching, timeouts.

use std::collections::BTreeMap;
use std::time::Duration;

use bgagent::process::{self, CommandSpec, ProcessError};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

fn alive(pid: i32) -> bool {
    // a zombie counts as gone
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.split(") ").nth(1).unwrap_or("").starts_with('Z'))
        .unwrap_or(false)
}

/// Whether `pid` is gone (or a zombie) by `limit`: a process being killed has closed its
/// files before its exit shows in /proc.
fn gone_within(pid: i32, limit: std::time::Duration) -> bool {
    let t0 = std::time::Instant::now();
    while alive(pid) {
        if t0.elapsed() > limit {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    true
}

#[test]
fn timeout_kills_the_whole_group_even_if_sigterm_is_ignored() {
    let d = tempfile::tempdir().unwrap();
    let pids = d.path().join("pids");
    // the child ignores TERM and starts a grandchild that does too
    let script = format!(
        "trap '' TERM; (trap '' TERM; sleep 60) & echo $$ $! > {}; sleep 60",
        pids.display()
    );
    let mut spec = CommandSpec::new(&["sh", "-c", &script]);
    spec.timeout = Duration::from_millis(500);
    let r = rt().block_on(process::run(&spec, None, &BTreeMap::new()));
    assert!(matches!(r, Err(ProcessError::TimedOut { .. })), "{r:?}");
    let text = std::fs::read_to_string(&pids).unwrap();
    for pid in text.split_whitespace() {
        let pid: i32 = pid.parse().unwrap();
        assert!(
            gone_within(pid, Duration::from_secs(5)),
            "process {pid} survived"
        );
    }
}

#[test]
fn children_get_their_own_session_and_stdio() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    // session id of the child, and what its fd 0/1 are
    let script = format!(
        "s=$(cut -d' ' -f6 /proc/$$/stat); i=$(readlink /proc/$$/fd/0); o=$(readlink /proc/$$/fd/1); printf '%s\\n%s\\n%s\\n' \"$s\" \"$i\" \"$o\" > {o}; echo hello; echo oops >&2",
        o = out.display()
    );
    let spec = CommandSpec::new(&["sh", "-c", &script]);
    let f = rt()
        .block_on(process::run(&spec, None, &BTreeMap::new()))
        .unwrap();
    let lines: Vec<String> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let my_sid = std::fs::read_to_string("/proc/self/stat")
        .unwrap()
        .split(' ')
        .nth(5)
        .unwrap()
        .to_string();
    assert_ne!(lines[0], my_sid, "child must lead its own session");
    assert_eq!(lines[1], "/dev/null");
    assert!(
        lines[2].starts_with("pipe:"),
        "stdout is our pipe, not inherited: {}",
        lines[2]
    );
    // both streams are read (their relative order is not defined)
    let mut tail = f.tail.clone();
    tail.sort();
    assert_eq!(tail, vec!["hello".to_string(), "oops".to_string()]);
}

#[test]
fn env_cwd_and_failures() {
    let d = tempfile::tempdir().unwrap();
    let mut spec =
        CommandSpec::new(&["sh", "-c", "test \"$(pwd)\" = \"$WANT\" && test \"$X\" = y"]);
    spec.env.insert("X".into(), "y".into());
    let extra = BTreeMap::from([("WANT".to_string(), d.path().display().to_string())]);
    rt().block_on(process::run(&spec, Some(d.path()), &extra))
        .unwrap();

    let spec = CommandSpec::new(&["sh", "-c", "echo bad thing; exit 3"]);
    let e = rt()
        .block_on(process::run(&spec, None, &BTreeMap::new()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("exited with code 3") && e.contains("bad thing"),
        "{e}"
    );

    let spec = CommandSpec::new(&["/nonexistent/prog"]);
    let e = rt()
        .block_on(process::run(&spec, None, &BTreeMap::new()))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("failed to start `/nonexistent/prog`"), "{e}");
}

#[test]
fn switches_user_natively_even_for_nologin_users() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: switching users needs root");
        return;
    }
    // www-data's shell is /usr/sbin/nologin: `su` would fail, a native switch does not
    let user = if bgagent::perms::lookup_user("www-data").is_some() {
        "www-data"
    } else {
        "nobody"
    };
    let (uid, gid) = bgagent::perms::lookup_user(user).unwrap();
    let gid = gid.unwrap();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("id");
    std::fs::set_permissions(
        d.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let mut spec = CommandSpec::new(&[
        "sh",
        "-c",
        &format!("id -u > {o}; id -g >> {o}; id -G >> {o}", o = out.display()),
    ]);
    spec.user = Some(user.into());
    rt().block_on(process::run(&spec, None, &BTreeMap::new()))
        .unwrap();
    let lines: Vec<String> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(lines[0], uid.to_string());
    assert_eq!(lines[1], gid.to_string());
    assert!(
        !lines[2].split(' ').any(|g| g == "0"),
        "root's groups were dropped: {}",
        lines[2]
    );
}

/// Regression: a command that left a background child holding its stdout made `run` wait
/// 2 s per pipe, and the child lived on. It is ended with the command's process group.
#[test]
fn a_background_child_holding_stdout_is_ended_with_the_group() {
    let d = tempfile::tempdir().unwrap();
    let pidf = d.path().join("pid");
    let script = format!("sleep 300 & echo $! > {}; echo started", pidf.display());
    let spec = CommandSpec::new(&["sh", "-c", &script]);
    let f = rt()
        .block_on(process::run(&spec, None, &BTreeMap::new()))
        .unwrap();
    assert_eq!(f.tail, vec!["started".to_string()]);
    let pid: i32 = std::fs::read_to_string(&pidf)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The child closes its pipes (which is when `run` returns) a moment before the kernel
    // shows it dead: give the exit in progress time to finish.
    assert!(
        gone_within(pid, std::time::Duration::from_secs(5)),
        "the background child {pid} outlived its command"
    );
}
