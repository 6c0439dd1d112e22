//! The control socket against its own users: a user outside the socket group, a refused
//! peer, and a group member flooding it with half-open connections. Needs root (the tests
//! run the client and the flooder as `nobody`).

mod support;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use support::text;

const BIN: &str = env!("CARGO_BIN_EXE_bgagent");
const NOBODY: u32 = 65534;

fn www_data_gid() -> u32 {
    bgagent::perms::lookup_group("www-data").expect("group www-data")
}

struct Node {
    dir: tempfile::TempDir,
    daemon: Option<Child>,
}

impl Node {
    fn new(socket: &str) -> Node {
        assert!(rustix::process::geteuid().is_root(), "run as root");
        let dir = tempfile::tempdir().unwrap();
        // `nobody` must read the config and reach the socket's directory.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(
            dir.path().join("bgagent.yaml"),
            format!("app_root: app\nstate_dir: state\nsocket: {socket}\napp: {{ kind: php }}\n"),
        )
        .unwrap();
        std::fs::set_permissions(
            dir.path().join("bgagent.yaml"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        Node { dir, daemon: None }
    }
    fn p(&self, s: &str) -> PathBuf {
        self.dir.path().join(s)
    }
    fn start(&mut self, nofile: Option<u32>) {
        let mut cmd = match nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}")).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        let log = std::fs::File::create(self.p("daemon.log")).unwrap();
        let child = cmd
            .arg("--config")
            .arg(self.p("bgagent.yaml"))
            .arg("daemon")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemon = Some(child);
        let t0 = std::time::Instant::now();
        while std::os::unix::net::UnixStream::connect(self.p("run/s.sock")).is_err() {
            assert!(t0.elapsed() < Duration::from_secs(10), "{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    fn log(&self) -> String {
        std::fs::read_to_string(self.p("daemon.log")).unwrap_or_default()
    }
    fn daemon_fds(&self) -> usize {
        let pid = self.daemon.as_ref().unwrap().id();
        // Under prlimit the daemon is prlimit's exec'd image: same pid.
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    }
    fn cli(&self, args: &[&str], uid: Option<(u32, u32)>) -> Output {
        let mut c = Command::new(BIN);
        c.arg("--config").arg(self.p("bgagent.yaml")).args(args);
        c.env("DEPLOYMENT_ID", "d-SOCK1")
            .env("LIFECYCLE_EVENT", "BeforeInstall")
            .current_dir("/");
        if let Some((u, g)) = uid {
            c.uid(u).gid(g);
        }
        c.output().unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            support::stop_daemon(&mut c);
        }
    }
}

#[test]
fn permission_denied_on_the_socket_exits_4_and_names_the_group() {
    let mut n = Node::new("{ path: run/s.sock, group: www-data }");
    n.start(None);
    for args in [
        &["status"][..],
        &["releases"][..],
        &["deploy", "/nonexistent.tar.gz"][..],
        &["rollback"][..],
        &["hook", "BeforeInstall"][..],
    ] {
        let out = n.cli(args, Some((NOBODY, NOBODY)));
        let t = text(&out);
        assert_eq!(out.status.code(), Some(4), "{args:?}: {t}");
        assert!(
            t.contains("permission denied") && t.contains("group www-data"),
            "{args:?}: {t}"
        );
    }
}

#[test]
fn refused_peer_sees_the_daemons_reason_not_a_broken_pipe() {
    // The socket is open to all (mode 0666) but the daemon admits only root and the group.
    let mut n = Node::new("{ path: run/s.sock, group: www-data, mode: \"0666\" }");
    n.start(None);
    for _ in 0..20 {
        let out = n.cli(&["hook", "BeforeInstall"], Some((NOBODY, NOBODY)));
        let t = text(&out);
        assert_eq!(out.status.code(), Some(6), "{t}");
        assert!(
            t.contains("only root and members of the bgagent socket group"),
            "{t}"
        );
        assert!(!t.to_lowercase().contains("broken pipe"), "{t}");
    }
}

/// Opens `count` connections to `socket` as `nobody` in group www-data, never sends a byte,
/// and holds them until its stdin closes.
fn flood(socket: &Path, count: usize) -> Child {
    let script = format!(
        "import socket, sys\nheld = []\nfor _ in range({count}):\n    s = socket.socket(socket.AF_UNIX)\n    s.settimeout(0.5)\n    try:\n        s.connect({:?})\n        held.append(s)\n    except OSError:\n        s.close()\nprint(len(held), flush=True)\nsys.stdin.read()\n",
        socket.to_str().unwrap()
    );
    let mut c = Command::new("/usr/bin/python3");
    c.arg("-c")
        .arg(script)
        .uid(NOBODY)
        .gid(www_data_gid())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    c.spawn().unwrap()
}

fn wait_flooding(f: &mut Child) -> usize {
    use std::io::BufRead;
    let mut line = String::new();
    std::io::BufReader::new(f.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    line.trim().parse().unwrap()
}

#[test]
fn half_open_connections_from_a_group_member_are_capped_and_status_keeps_working() {
    let mut n = Node::new("{ path: run/s.sock, group: www-data }");
    n.start(None);
    let fds_idle = n.daemon_fds();
    let mut f = flood(&n.p("run/s.sock"), 400);
    let opened = wait_flooding(&mut f);
    assert!(opened > 0);
    // Root's status is served while the member holds its connections open.
    let out = n.cli(&["status", "--json"], None);
    assert!(out.status.success(), "{}", text(&out));
    let fds = n.daemon_fds();
    assert!(
        fds <= fds_idle + bgagent::daemon::MAX_CONNECTIONS + 8,
        "the daemon holds {fds} fds ({fds_idle} idle) for {opened} half-open connections"
    );
    drop(f.stdin.take());
    let _ = f.wait();
    let out = n.cli(&["status"], None);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn accept_failures_out_of_file_descriptors_are_logged_rate_limited() {
    let mut n = Node::new("{ path: run/s.sock, group: www-data }");
    // Fewer descriptors than the connection cap: accept() itself fails (EMFILE).
    n.start(Some(40));
    let mut f = flood(&n.p("run/s.sock"), 300);
    wait_flooding(&mut f);
    let t0 = std::time::Instant::now();
    while !n.log().contains("accept failed") {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no accept failure logged:\n{}",
            n.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Let the daemon retry for a while with the flood held.
    std::thread::sleep(Duration::from_secs(2));
    let lines = n.log().matches("accept failed").count();
    assert!(
        lines <= 3,
        "{lines} accept-failure lines:\n{}",
        &n.log()[..n.log().len().min(3000)]
    );
    drop(f.stdin.take());
    let _ = f.wait();
    // Once the flood is gone, the daemon serves again.
    let t0 = std::time::Instant::now();
    loop {
        let out = n.cli(&["status"], None);
        if out.status.success() {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "{}", text(&out));
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn deploy_by_a_group_member_reads_only_what_the_member_can_read() {
    // A socket-group member asked the root daemon to deploy trees it could not read
    // itself, and got their content (keys, configs) into a release it can then read.
    let mut n = Node::new("{ path: run/s.sock, group: www-data }");
    n.start(None);
    let member = Some((NOBODY, www_data_gid()));
    let tree = |name: &str| {
        let t = n.p(name);
        std::fs::create_dir_all(t.join("pub")).unwrap();
        std::fs::create_dir_all(t.join("app/etc")).unwrap();
        std::fs::write(t.join("pub/index.php"), "<?php echo 1;").unwrap();
        for d in ["", "pub", "app", "app/etc"] {
            std::fs::set_permissions(t.join(d), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::set_permissions(
            t.join("pub/index.php"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        t
    };
    // A tree the member cannot enter at all.
    let closed = tree("closed");
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = n.cli(&["deploy", closed.to_str().unwrap()], member);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!n.p("app/current").exists(), "{}", text(&out));
    // A readable tree with one file only root may read.
    let mixed = tree("mixed");
    std::fs::write(mixed.join("app/etc/secret.key"), "root only").unwrap();
    std::fs::set_permissions(
        mixed.join("app/etc/secret.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let out = n.cli(&["deploy", mixed.to_str().unwrap()], member);
    let t = text(&out);
    assert_ne!(out.status.code(), Some(0), "{t}");
    assert!(
        t.contains("app/etc/secret.key") && t.contains("cannot read"),
        "{t}"
    );
    assert!(!n.p("app/current").exists(), "{t}");
    // What the member can read, it may deploy: a directory and an archive, passed as open
    // files.
    let open = tree("open");
    let out = n.cli(&["deploy", open.to_str().unwrap()], member);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let tgz = n.p("open.tar.gz");
    let st = Command::new("tar")
        .arg("-czf")
        .arg(&tgz)
        .arg("-C")
        .arg(&open)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::set_permissions(&tgz, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = n.cli(&["deploy", tgz.to_str().unwrap()], member);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        std::fs::read_to_string(n.p("app/current/pub/index.php")).unwrap(),
        "<?php echo 1;"
    );
}
