//! Drives the real binary: daemon and hook over the Unix socket through full CodeDeploy
//! event sequences, with CodeDeploy's environment variables.

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::{IN_PLACE, text};

const BIN: &str = env!("CARGO_BIN_EXE_bgagent");

struct Node {
    /// First: stopped before its directory goes.
    daemon: support::Daemon,
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Node {
        Node::with_extra("")
    }

    /// A node whose config has `extra` (top-level YAML) appended.
    fn with_extra(extra: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let cfg = "app_root: app\nstate_dir: state\nsocket:\n  path: run/bgagent.sock\n  group: null\n\
                   codedeploy:\n  deployment_root: cd-root\napp:\n  kind: php\nrelease:\n  keep: 3\n  shared_paths: [var/log]\n";
        std::fs::write(dir.path().join("bgagent.yaml"), format!("{cfg}{extra}")).unwrap();
        Node {
            daemon: support::Daemon::new(dir.path()),
            dir,
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn config(&self) -> PathBuf {
        self.path("bgagent.yaml")
    }

    /// Unpacks a revision where the CodeDeploy agent would.
    fn revision(&self, group: &str, deployment: &str, release_tag: &str) {
        let root = self.path(&format!("cd-root/{group}/{deployment}/deployment-archive"));
        std::fs::create_dir_all(root.join("pub")).unwrap();
        std::fs::write(
            root.join("pub/index.php"),
            format!("<?php echo '{release_tag}';"),
        )
        .unwrap();
        std::fs::write(root.join("RELEASE_ID"), release_tag).unwrap();
    }

    fn start(&mut self) {
        self.daemon.start();
    }

    fn stop(&mut self) {
        self.daemon.stop();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("daemon.log")).unwrap_or_default()
    }

    fn hook(&self, event: &str, deployment: Option<&str>, group: &str) -> Output {
        let mut cmd = Command::new(BIN);
        cmd.args(["--config", self.config().to_str().unwrap(), "hook", event])
            .env_remove("DEPLOYMENT_ID")
            .env("LIFECYCLE_EVENT", event)
            .env("DEPLOYMENT_GROUP_ID", group)
            .env("DEPLOYMENT_GROUP_NAME", "magento-prod")
            .env("APPLICATION_NAME", "magento");
        if let Some(d) = deployment {
            cmd.env("DEPLOYMENT_ID", d);
        }
        cmd.output().unwrap()
    }

    fn cli(&self, args: &[&str]) -> Output {
        support::bgagent(&self.config(), args)
    }

    fn current(&self) -> Option<String> {
        std::fs::read_link(self.path("app/current"))
            .ok()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
    }

    fn status_json(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        assert!(out.status.success());
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Appends `yaml` (top-level keys) to the node's config.
    fn add_config(&self, yaml: &str) {
        let cfg = std::fs::read_to_string(self.config()).unwrap() + yaml;
        std::fs::write(self.config(), cfg).unwrap();
    }

    /// Runs `events` of deployment `dep` (group g-1) in order; each must succeed.
    fn hooks_ok(&self, dep: &str, events: &[&str]) {
        for ev in events {
            let out = self.hook(ev, Some(dep), "g-1");
            assert_eq!(out.status.code(), Some(0), "{dep} {ev}: {}", text(&out));
        }
    }
}

#[test]
fn full_codedeploy_sequence_then_second_deployment_and_rollback() {
    let mut node = Node::new();
    node.start();
    node.revision("g-1", "d-AAA", "one");
    for ev in IN_PLACE {
        let out = node.hook(ev, Some("d-AAA"), "g-1");
        let t = text(&out);
        assert_eq!(out.status.code(), Some(0), "{ev}: {t}");
        // log lines streamed from the daemon, then the summary
        assert!(
            t.contains(&format!("{ev} starts for deployment d-AAA")),
            "{t}"
        );
        assert!(
            t.contains(&format!("bgagent: {ev} succeeded for deployment d-AAA")),
            "{t}"
        );
    }
    let first = node.current().expect("current after first deployment");
    assert!(first.ends_with("-d-AAA"));
    assert_eq!(
        std::fs::read_to_string(node.path("app/current/RELEASE_ID")).unwrap(),
        "one"
    );
    let st = node.status_json();
    assert_eq!(st["schema"], "bgagent.status/v1");
    assert_eq!(st["daemon"], "running");
    assert_eq!(st["last_deployment"]["status"], "succeeded");
    assert_eq!(st["last_deployment"]["events"].as_array().unwrap().len(), 9);
    assert_eq!(st["node"]["traffic"], "live");

    node.revision("g-1", "d-BBB", "two");
    node.hooks_ok("d-BBB", &IN_PLACE);
    let second = node.current().unwrap();
    assert_ne!(first, second);
    assert_eq!(
        std::fs::read_to_string(node.path("app/current/RELEASE_ID")).unwrap(),
        "two"
    );

    let out = node.cli(&["rollback"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("rolled back from {second} to {first}")),
        "{}",
        text(&out)
    );
    assert_eq!(node.current().as_deref(), Some(first.as_str()));
    assert_eq!(
        std::fs::read_to_string(node.path("app/current/RELEASE_ID")).unwrap(),
        "one"
    );
    let st = node.status_json();
    assert_eq!(st["last_switch"]["reason"], "rollback");
    assert_eq!(st["previous_release"]["id"], second.as_str());

    let out = node.cli(&["releases"]);
    assert!(text(&out).contains(&format!("* {first}")), "{}", text(&out));
}

#[test]
fn out_of_order_repeated_and_bad_invocations_get_their_exit_codes() {
    let mut node = Node::new();
    node.start();
    node.revision("g-1", "d-1", "one");

    // ApplicationStart before AfterInstall: refused, exit 6, and the reason is in the summary
    let out = node.hook("ApplicationStart", Some("d-1"), "g-1");
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));
    assert!(text(&out).contains("needs AfterInstall"), "{}", text(&out));

    node.hooks_ok("d-1", &["BeforeInstall", "AfterInstall"]);
    // repeated: success without redoing
    let out = node.hook("AfterInstall", Some("d-1"), "g-1");
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out).contains("already succeeded"), "{}", text(&out));
    assert_eq!(
        std::fs::read_dir(node.path("app/releases"))
            .unwrap()
            .count(),
        1
    );
    // going back: refused
    let out = node.hook("BeforeInstall", Some("d-1"), "g-1");
    assert_eq!(
        out.status.code(),
        Some(0),
        "a repeated success is not an error"
    );
    let out = node.hook("ApplicationStop", Some("d-1"), "g-1");
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));
    assert!(
        text(&out).contains("ApplicationStop arrived after AfterInstall"),
        "{}",
        text(&out)
    );

    // unknown event: usage error listing the valid ones, before anything else
    let out = node.hook("AfterInstal", Some("d-1"), "g-1");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("expected one of: BeforeBlockTraffic"),
        "{}",
        text(&out)
    );

    // no DEPLOYMENT_ID
    let out = node.hook("AfterInstall", None, "g-1");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("DEPLOYMENT_ID is not set"));

    // a revision that is not there: the event fails (exit 1) and says where it looked
    let out = node.hook("BeforeInstall", Some("d-missing"), "g-1");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("cd-root/g-1/d-missing/deployment-archive does not exist"),
        "{}",
        text(&out)
    );

    // daemon unreachable
    node.stop();
    let out = node.hook("AfterInstall", Some("d-1"), "g-1");
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(text(&out).contains("not reachable"), "{}", text(&out));
}

#[test]
fn daemon_restart_between_events_keeps_the_state() {
    let mut node = Node::new();
    node.start();
    node.revision("g-1", "d-R", "one");
    node.hooks_ok("d-R", &["ApplicationStop", "BeforeInstall", "AfterInstall"]);
    node.stop();
    node.start();
    // the deployment continues where it was
    node.hooks_ok(
        "d-R",
        &[
            "ApplicationStart",
            "ValidateService",
            "BeforeAllowTraffic",
            "AfterAllowTraffic",
        ],
    );
    let st = node.status_json();
    let events: Vec<_> = st["last_deployment"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap().to_string(),
                e["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(events.len(), 7);
    assert!(events.iter().all(|(_, s)| s == "succeeded"), "{events:?}");
    assert!(node.current().unwrap().ends_with("-d-R"));
}

#[test]
fn local_deploy_without_daemon_and_config_check() {
    let node = Node::new();
    let art = node.path("art");
    std::fs::create_dir_all(art.join("pub")).unwrap();
    std::fs::write(art.join("pub/index.php"), "<?php echo 1;").unwrap();
    let out = node.cli(&["deploy", art.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(node.current().is_some());
    // the operator's directory is not re-moded by the release policy
    let m = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(art.join("pub/index.php"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(m & 0o777, 0o644);

    let out = node.cli(&["config", "check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    std::fs::write(
        node.config(),
        "app_root: app\nrelease:\n  keep: lots\n  kepp: 1\n",
    )
    .unwrap();
    let out = node.cli(&["config", "check"]);
    assert_eq!(out.status.code(), Some(7));
    assert!(text(&out).contains("bgagent.yaml:3:9"), "{}", text(&out));
}

#[test]
fn daemon_killed_during_an_event_reports_it_interrupted_and_the_retry_succeeds() {
    let mut node = Node::new();
    // AfterInstall's extra command blocks the first time (until the daemon is killed), and
    // returns at once on the retry.
    // The first attempt writes its pid (the shell's, which exec makes the sleep's) to the
    // marker: the orphan is ended by that pid, never by a name another process may share.
    let started = node.path("first-attempt");
    node.add_config(&format!(
        "commands:\n  AfterInstall:\n    - {{ argv: [sh, -c, 'test -e {0} || {{ echo $$ > {0}.tmp && mv {0}.tmp {0}; exec sleep 27.5; }}'], timeout: 60s }}\n",
        started.display()
    ));
    node.start();
    node.revision("g-1", "d-K", "one");
    node.hooks_ok("d-K", &["ApplicationStop", "BeforeInstall"]);
    let mut cmd = Command::new(BIN);
    cmd.args([
        "--config",
        node.config().to_str().unwrap(),
        "hook",
        "AfterInstall",
    ])
    .env("DEPLOYMENT_ID", "d-K")
    .env("DEPLOYMENT_GROUP_ID", "g-1")
    .env("APPLICATION_NAME", "magento")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let hook = cmd.spawn().unwrap();
    let t0 = Instant::now();
    while !started.exists() {
        assert!(t0.elapsed() < Duration::from_secs(20), "{}", node.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    // A crash, not a stop: SIGKILL leaves the event marked running in state.json.
    node.daemon.kill();
    let out = hook.wait_with_output().unwrap();
    let orphan = std::fs::read_to_string(&started).unwrap();
    let _ = Command::new("kill").args(["-TERM", orphan.trim()]).status();
    assert_eq!(
        out.status.code(),
        Some(5),
        "connection lost: {}",
        text(&out)
    );
    assert!(text(&out).contains("bgagent status"), "{}", text(&out));

    node.start();
    let st = node.status_json();
    let events = st["last_deployment"]["events"].as_array().unwrap();
    let after = events
        .iter()
        .find(|e| e["event"] == "AfterInstall")
        .unwrap_or_else(|| panic!("{st}"));
    assert_eq!(after["status"], "interrupted", "{st}");
    assert!(
        node.log()
            .contains("AfterInstall of deployment d-K was interrupted by a restart of bgagent"),
        "{}",
        node.log()
    );
    // The other events wait for it; retrying it carries the deployment on.
    let out = node.hook("ApplicationStart", Some("d-K"), "g-1");
    assert_eq!(
        out.status.code(),
        Some(6),
        "refused before the retry: {}",
        text(&out)
    );
    node.hooks_ok(
        "d-K",
        &[
            "AfterInstall",
            "ApplicationStart",
            "ValidateService",
            "BeforeAllowTraffic",
            "AfterAllowTraffic",
        ],
    );
    assert!(
        node.current().unwrap().ends_with("-d-K"),
        "{:?}",
        node.current()
    );
    assert_eq!(node.status_json()["last_deployment"]["status"], "succeeded");
    // The first attempt had built its release before it was killed: the retry removed it
    // (whichever second it ran in) and built its own, so one release of d-K is on disk.
    assert!(
        node.log()
            .contains("left unfinished by an earlier attempt of this deployment"),
        "{}",
        node.log()
    );
    let ours: Vec<_> = std::fs::read_dir(node.path("app/releases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("d-K"))
        .collect();
    assert_eq!(ours.len(), 1, "{ours:?}");
}

/// A tmpfs of `kib` KiB mounted over `dir` (the test runs as root); unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, kib: u32) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(
            st.success(),
            "mount tmpfs on {} (needs root)",
            dir.display()
        );
        Tmpfs(dir.to_path_buf())
    }

    /// Writes `name` until the file system is full.
    fn fill(&self, name: &str) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.0.join(name)).unwrap();
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Issue 11 item 6: a failed state write (state_dir full) left the event marked running in
/// memory, and every later event was refused until a restart; and a result that could not
/// be written still counted as done in memory while the hook had reported a failure.
/// Memory now never runs ahead of disk.
#[test]
fn a_failed_state_write_does_not_leave_memory_ahead_of_disk() {
    let mut node = Node::new();
    // AfterInstall's command fills the state directory once, before the result is written.
    let once = node.path("filled-once");
    node.add_config(&format!(
        "commands:\n  AfterInstall:\n    - {{ argv: [sh, -c, 'test -e {o} || {{ touch {o}; head -c 4M /dev/zero > {s}/filler; true; }}'], timeout: 60s }}\n",
        o = once.display(),
        s = node.path("state").display()
    ));
    let fs = Tmpfs::mount(&node.path("state"), 256);
    node.start();
    node.revision("g-1", "d-F", "one");

    // 1. the state directory is full before the event starts
    fs.fill("filler");
    let out = node.hook("BeforeInstall", Some("d-F"), "g-1");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("could not start"), "{}", text(&out));
    std::fs::remove_file(node.path("state/filler")).unwrap();
    let out = node.hook("BeforeInstall", Some("d-F"), "g-1");
    assert_eq!(
        out.status.code(),
        Some(0),
        "not refused as still running: {}",
        text(&out)
    );

    // 2. the state directory fills up while the event runs: the result is not recorded,
    // so the event is not done, and the next event waits for its retry
    let out = node.hook("AfterInstall", Some("d-F"), "g-1");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("the result could not be recorded"),
        "{}",
        text(&out)
    );
    std::fs::remove_file(node.path("state/filler")).unwrap();
    let out = node.hook("ApplicationStart", Some("d-F"), "g-1");
    assert_eq!(
        out.status.code(),
        Some(6),
        "AfterInstall's result never reached the disk: {}",
        text(&out)
    );
    node.hooks_ok(
        "d-F",
        &["AfterInstall", "ApplicationStart", "ValidateService"],
    );
    node.stop();
    drop(fs);
}

/// Issue 11 item 8: with the exec backend, ApplicationStop after BeforeBlockTraffic ran the
/// stop command again on the service the first drain had stopped, and failed the deployment;
/// `{pid}` in `stop` became an empty argument; `config check` said OK to `{pid}` in `start`.
#[test]
fn exec_backend_stops_once_with_the_pid_and_config_check_refuses_pid_in_start() {
    let mut node = Node::new();
    let pid_file = node.path("svc.pid");
    let stops = node.path("stops.log");
    let svc = format!(
        "services:\n  backend: exec\n  list:\n    - name: worker\n      stop_on_drain: true\n      pid_file: {p}\n      stop: [sh, -c, 'echo \"$1\" >> {l} && kill \"$1\"', sh, \"{{pid}}\"]\n      start: [sh, -c, 'setsid sleep 300 </dev/null >/dev/null 2>&1 & echo $! > {p}']\n",
        p = pid_file.display(),
        l = stops.display()
    );
    let base = std::fs::read_to_string(node.config()).unwrap();
    std::fs::write(node.config(), base.clone() + &svc).unwrap();
    let out = node.cli(&["config", "check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // the service runs before the deployment
    let sleeper = Command::new("setsid")
        .args(["sleep", "300"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    std::fs::write(&pid_file, sleeper.id().to_string()).unwrap();
    node.start();
    node.revision("g-1", "d-1", "one");
    let outs: Vec<Output> = IN_PLACE
        .iter()
        .map(|ev| node.hook(ev, Some("d-1"), "g-1"))
        .collect();
    let kill_started = || {
        if let Ok(p) = std::fs::read_to_string(&pid_file) {
            let _ = Command::new("kill").arg(p.trim()).status();
        }
    };
    for (ev, out) in IN_PLACE.iter().zip(&outs) {
        if out.status.code() != Some(0) {
            kill_started();
            panic!("{ev}: {}", text(out));
        }
    }
    kill_started();
    let mut sleeper = sleeper;
    let _ = sleeper.wait();
    let log = std::fs::read_to_string(&stops).unwrap();
    assert_eq!(
        log.lines().collect::<Vec<_>>(),
        vec![sleeper.id().to_string()],
        "stopped once, with its pid"
    );
    node.stop();

    std::fs::write(
        node.config(),
        base + &svc.replace("echo $! > ", "echo {pid} $! > "),
    )
    .unwrap();
    let out = node.cli(&["config", "check"]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert!(
        text(&out).contains("services.list.0.start"),
        "{}",
        text(&out)
    );
}

/// Issue 11 item 11: a request that waits for another said only "another request is
/// running"; it now names the holder (event and deployment, or command) and for how long.
#[test]
fn the_waiting_message_names_the_request_holding_the_daemon() {
    let mut node = Node::new();
    // AfterInstall's command waits until the test lets it go.
    let hold = Hold::add(&node, "AfterInstall");
    node.start();
    node.revision("g-1", "d-H", "one");
    assert_eq!(
        node.hook("BeforeInstall", Some("d-H"), "g-1").status.code(),
        Some(0)
    );
    hold.arm();
    let config = node.config();
    let first = std::thread::spawn(move || {
        Command::new(BIN)
            .args(["--config", config.to_str().unwrap(), "hook", "AfterInstall"])
            .env("DEPLOYMENT_ID", "d-H")
            .env("DEPLOYMENT_GROUP_ID", "g-1")
            .output()
            .unwrap()
    });
    hold.wait_started(&node);
    let config = node.config();
    let second = std::thread::spawn(move || {
        Command::new(BIN)
            .args(["--config", config.to_str().unwrap(), "rollback"])
            .output()
            .unwrap()
    });
    support::wait_until_or(
        30,
        "the second request should wait",
        || node.log(),
        || node.log().contains("waiting for it to finish"),
    );
    hold.release();
    let first = first.join().unwrap();
    assert_eq!(first.status.code(), Some(0), "{}", text(&first));
    let second = second.join().unwrap();
    assert!(
        text(&second).contains("another request is running (AfterInstall of deployment d-H, for "),
        "{}",
        text(&second)
    );
    node.stop();
}

/// Issue 11 item 9: pruning ran inside ApplicationStart, after the switch (seconds per
/// release of a real tree, holding back ValidateService and readiness), and `.partial` builds
/// left by interrupted deployments with other ids were never removed. Now old releases are
/// moved aside after ValidateService and deleted in the background, stale builds with them;
/// a restarted daemon resumes a cleanup left unfinished, and `status` shows it pending.
#[test]
fn old_releases_are_removed_after_the_node_is_ready_not_inside_application_start() {
    let mut node = Node::new();
    node.start();
    let releases = node.path("app/releases");
    let stale = releases.join(".20200101T000000Z-d-GONE.partial");
    std::fs::create_dir_all(stale.join("vendor/lib")).unwrap();
    std::fs::write(stale.join("vendor/lib/file.php"), "<?php").unwrap();
    let names = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&releases)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    for (i, d) in ["d-1", "d-2", "d-3", "d-4"].iter().enumerate() {
        node.revision("g-1", d, &format!("r{i}"));
        node.hooks_ok(d, &IN_PLACE[..6]);
        if *d == "d-4" {
            let on_disk: Vec<_> = names()
                .into_iter()
                .filter(|n| !n.starts_with('.'))
                .collect();
            assert_eq!(
                on_disk.len(),
                4,
                "nothing is pruned inside ApplicationStart: {on_disk:?}"
            );
        }
        node.hooks_ok(d, &IN_PLACE[6..]);
    }
    let t0 = Instant::now();
    loop {
        let n = names();
        if n.len() == 3 && n.iter().all(|x| !x.starts_with('.')) {
            assert!(n.iter().all(|x| !x.ends_with("-d-1")), "{n:?}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{n:?}\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // a cleanup cut short by a stop is resumed by the next daemon
    node.stop();
    let left = releases.join(".trash-20200101T000000Z-d-X");
    std::fs::create_dir_all(left.join("vendor")).unwrap();
    std::fs::write(left.join("vendor/f"), "x").unwrap();
    let st = node.status_json();
    assert_eq!(
        st["cleanup_pending"],
        serde_json::json!(["20200101T000000Z-d-X"]),
        "{st}"
    );
    node.start();
    let t0 = Instant::now();
    while left.exists() {
        assert!(t0.elapsed() < Duration::from_secs(20), "{}", node.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Issue 11 item 7: when CodeDeploy killed the hook at its timeout, the daemon finished the
/// event and recorded success while CodeDeploy recorded failure. The hook now says in one
/// line what happened, and the daemon records the event failed ("the hook ended before the
/// result"); the retry runs it again.
#[test]
fn a_hook_killed_at_codedeploys_timeout_leaves_the_event_recorded_failed() {
    let mut node = Node::new();
    let hold = Hold::add(&node, "AfterInstall");
    node.start();
    node.revision("g-1", "d-T", "one");
    assert_eq!(
        node.hook("BeforeInstall", Some("d-T"), "g-1").status.code(),
        Some(0)
    );
    hold.arm();
    let hook = Command::new(BIN)
        .args([
            "--config",
            node.config().to_str().unwrap(),
            "hook",
            "AfterInstall",
        ])
        .env("DEPLOYMENT_ID", "d-T")
        .env("DEPLOYMENT_GROUP_ID", "g-1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    hold.wait_started(&node);
    // CodeDeploy's timeout: SIGTERM
    let _ = Command::new("kill")
        .args(["-TERM", &hook.id().to_string()])
        .status();
    let out = hook.wait_with_output().unwrap();
    let t = text(&out);
    assert_ne!(out.status.code(), Some(0), "{t}");
    assert!(
        t.contains("the hook got SIGTERM before the result"),
        "one line says what happened: {t}"
    );
    // the event's work goes on to its end, then it is recorded failed
    hold.release();
    assert_hook_ended(&node, "AfterInstall");
    // CodeDeploy's retry runs it again, and the deployment goes on
    node.hooks_ok(
        "d-T",
        &["AfterInstall", "ApplicationStart", "ValidateService"],
    );
    node.stop();
}

/// Issue 12: a state file emptied to `{"schema_version":1}` (restored from a bad backup,
/// truncated by hand) while `current` exists was accepted silently: status showed no history
/// and no rollback target as if nothing had ever been deployed. It is now said, by the daemon
/// when it starts and by `status` (text and JSON), naming the release that is current.
#[test]
fn state_file_emptied_while_current_exists_is_reported_not_accepted_silently() {
    let mut node = Node::new();
    node.start();
    node.revision("g-1", "d-EMP", "one");
    node.hooks_ok("d-EMP", &IN_PLACE);
    let current = node.current().expect("current after the deployment");
    assert!(
        node.status_json()["warnings"]
            .as_array()
            .is_none_or(|w| w.is_empty())
    );
    node.stop();
    std::fs::write(node.path("state/state.json"), r#"{"schema_version":1}"#).unwrap();
    node.start();
    let st = node.status_json();
    let warnings = st["warnings"].as_array().expect("status has warnings");
    assert_eq!(warnings.len(), 1, "{st}");
    let w = warnings[0].as_str().unwrap();
    assert!(w.contains(&current) && w.contains("state.json"), "{w}");
    let human = text(&node.cli(&["status"]));
    assert!(
        human.contains("warning:") && human.contains(&current),
        "{human}"
    );
    let t0 = Instant::now();
    while !node.log().contains("no record of the current release") {
        assert!(t0.elapsed() < Duration::from_secs(10), "{}", node.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Issue 12: a directory in releases/ whose name is not UTF-8 (not one bgagent makes: the web
/// user or a stray tool planted it) sorts before bgagent's timestamped ids, so pruning took it
/// for the oldest release, failed to remove it under its lossy name, and stopped there for
/// good: releases piled up until the disk was full. It is skipped with a warning that names it
/// escaped, left in place, and old releases are pruned as usual.
#[test]
fn a_non_utf8_name_in_releases_no_longer_stops_pruning() {
    use std::os::unix::ffi::OsStrExt;
    let mut node = Node::new();
    node.start();
    std::fs::create_dir_all(node.path("app/releases")).unwrap();
    let odd = node
        .path("app/releases")
        .join(std::ffi::OsStr::from_bytes(b"0stray\xff\nname"));
    std::fs::create_dir(&odd).unwrap();
    for n in 0..5 {
        let d = format!("d-U{n}");
        node.revision("g-1", &d, &format!("r{n}"));
        node.hooks_ok(&d, &IN_PLACE);
        // one second apart: release ids carry the time to the second
        std::thread::sleep(Duration::from_millis(1100));
    }
    // pruning runs in the background after ValidateService; wait for it to settle
    let t0 = Instant::now();
    loop {
        // counted on disk: status lists what the daemon can list, which is what broke
        let on_disk: Vec<String> = std::fs::read_dir(node.path("app/releases"))
            .unwrap()
            .filter_map(|e| e.unwrap().file_name().to_str().map(String::from))
            .collect();
        if on_disk.len() <= 3 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "releases were not pruned to release.keep (3): {on_disk:?}\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        odd.is_dir(),
        "the stray directory is not bgagent's to delete"
    );
    let log = node.log();
    assert!(log.contains("not UTF-8"), "{log}");
    assert!(
        !log.contains("0stray\u{fffd}\nname"),
        "the name is printed raw: {log}"
    );
}

/// Regression: the output readers of a command were spawned without the event's span, so a
/// `commands:` step's output never reached the hook (nor the event's journal fields).
#[test]
fn command_output_reaches_the_hook_as_it_happens_in_order_and_tagged() {
    // The pauses only separate the writes to the two pipes, so their order is defined.
    let mut node = Node::with_extra(
        "commands:\n  AfterInstall:\n    - argv: [sh, -c, 'echo out-1; sleep 0.3; echo err-1 >&2; sleep 0.3; echo out-2']\n",
    );
    node.start();
    node.revision("g-1", "d-OUT", "one");
    let out = node.hook("AfterInstall", Some("d-OUT"), "g-1");
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let at = |needle: &str| {
        stdout
            .find(needle)
            .unwrap_or_else(|| panic!("`{needle}` is not in the hook's stdout:\n{stdout}"))
    };
    let (o1, e1, o2) = (at("[sh] out-1"), at("[sh stderr] err-1"), at("[sh] out-2"));
    let done = at("bgagent: AfterInstall succeeded");
    assert!(o1 < e1 && e1 < o2 && o2 < done, "{stdout}");
    // stderr is tagged, not a warning: the command succeeded.
    assert!(!stdout.contains("WARN  [sh"), "{stdout}");
}

/// Regression: a command that left a background child holding its stdout was waited for
/// (2 s per pipe) and the child lived on; it is ended with the command's process group.
#[test]
fn a_commands_background_child_is_ended_with_its_process_group() {
    let mut node = Node::with_extra(
        "commands:\n  AfterInstall:\n    - argv: [sh, -c, 'sleep 300 & echo $! > ../../bg.pid; echo started']\n",
    );
    node.start();
    node.revision("g-1", "d-BG", "one");
    let out = node.hook("AfterInstall", Some("d-BG"), "g-1");
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.contains("[sh] started"), "{t}");
    assert!(t.contains("left processes running"), "{t}");
    let pid: i32 = std::fs::read_to_string(node.path("app/bg.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // A zombie counts as gone (its parent, sh, is gone; whoever adopted it reaps it).
    let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.split(") ").nth(1).unwrap_or("").starts_with('Z'))
        .unwrap_or(false);
    assert!(!alive, "the background child {pid} outlived its command");
}

/// Regression: `bgagent hook` loaded and validated the whole config, so a config being
/// edited (here: an invalid value and a new key) failed every hook with exit 7 while the
/// daemon ran on the config it had loaded. The hook needs only the socket path.
#[test]
fn a_config_being_edited_does_not_break_hooks() {
    let mut node = Node::new();
    node.start();
    node.revision("g-1", "d-EDIT", "one");
    let cfg = std::fs::read_to_string(node.config()).unwrap();
    std::fs::write(
        node.config(),
        cfg.replace("keep: 3", "keep: lots") + "half_written_key:\n",
    )
    .unwrap();
    let out = node.cli(&["config", "check"]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    let out = node.hook("BeforeInstall", Some("d-EDIT"), "g-1");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("bgagent: BeforeInstall succeeded for deployment d-EDIT"),
        "{}",
        text(&out)
    );
}

/// A successful hook said its result twice at the end of its output: the daemon's closing
/// log line, then the summary block repeating it word for word (the console shows only the
/// last 2048 characters). Said once, in the summary block.
#[test]
fn a_successful_hook_says_its_result_once() {
    let mut node = Node::new();
    node.start();
    node.revision("g-1", "d-ONCE", "one");
    let out = node.hook("BeforeInstall", Some("d-ONCE"), "g-1");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        stdout.contains("bgagent: BeforeInstall succeeded for deployment d-ONCE"),
        "{stdout}"
    );
    assert_eq!(
        stdout.matches("BeforeInstall succeeded in ").count(),
        1,
        "{stdout}"
    );
}

/// Progress (here the intake) is drawn for a person at a terminal, through the daemon as in
/// a local deploy, and never reaches plain output (CodeDeploy's scripts.log) or the daemon's
/// own log.
#[test]
fn progress_shows_on_a_terminal_and_never_in_plain_output_or_the_log() {
    support::require("script");
    let mut node = Node::new();
    node.start();
    for d in ["d-TTY", "d-PLAIN"] {
        node.revision("g-1", d, d);
        let out = node.hook("BeforeInstall", Some(d), "g-1");
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    }
    // util-linux's script gives the hook a terminal; the command line is this test's own.
    let cmdline = format!(
        "'{}' --config '{}' hook AfterInstall",
        BIN,
        node.config().display()
    );
    let out = Command::new("script")
        .args(["-qec", &cmdline, "/dev/null"])
        .env("LIFECYCLE_EVENT", "AfterInstall")
        .env("DEPLOYMENT_ID", "d-TTY")
        .env("DEPLOYMENT_GROUP_ID", "g-1")
        .env("DEPLOYMENT_GROUP_NAME", "magento-prod")
        .env("APPLICATION_NAME", "magento")
        .output()
        .unwrap();
    let tty = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{tty}");
    assert!(
        tty.contains("AfterInstall succeeded for deployment d-TTY"),
        "{tty}"
    );
    assert!(
        tty.contains("intake") && tty.contains(" entries"),
        "a terminal shows the intake's progress: {tty}"
    );

    let out = node.hook("AfterInstall", Some("d-PLAIN"), "g-1");
    let plain = text(&out);
    assert_eq!(out.status.code(), Some(0), "{plain}");
    assert!(
        !plain.contains('\x1b') && !plain.contains(" entries"),
        "plain output has no progress: {plain}"
    );
    let log = node.log();
    assert!(
        log.contains("AfterInstall succeeded") && !log.contains("task=") && !log.contains("done="),
        "the daemon's log has no progress records: {log}"
    );
}

/// A node whose ValidateService holds on a TCP health check of `health_port`, with its
/// readiness listener on `ready_port`, `extra` appended.
fn held_node(health_port: u16, ready_port: u16, extra: &str) -> Node {
    Node::with_extra(&format!(
        "readiness: {{ listen: \"127.0.0.1:{ready_port}\", status_listen: \"127.0.0.1:{}\" }}\n\
         health:\n  checks: [ {{ name: app, tcp: {{ address: \"127.0.0.1:{health_port}\" }} }} ]\n  period: 50ms\n  success_threshold: 1\n  startup_budget: 120s\n  deadline: 120s\n{extra}",
        support::free_port()
    ))
}

/// `bgagent hook EVENT` as the CodeDeploy agent starts it: the leader of its own process
/// group (the agent's timeout signals the group).
fn spawn_hook(node: &Node, event: &str, dep: &str) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    Command::new(BIN)
        .args(["--config", node.config().to_str().unwrap(), "hook", event])
        .env("DEPLOYMENT_ID", dep)
        .env("DEPLOYMENT_GROUP_ID", "g-1")
        .env("APPLICATION_NAME", "magento")
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The record of `event` in the last deployment once it no longer runs.
fn finished_record(node: &Node, event: &str) -> serde_json::Value {
    let t0 = Instant::now();
    loop {
        let st = node.status_json();
        let rec = st["last_deployment"]["events"]
            .as_array()
            .unwrap()
            .iter()
            .rev()
            .find(|e| e["event"] == event)
            .cloned()
            .unwrap_or_else(|| panic!("{event} not recorded: {st}"));
        if rec["status"] != "running" {
            return rec;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{event} still running: {st}\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for the record of `event` and asserts that it failed because the hook ended
/// before the result; returns the record.
fn assert_hook_ended(node: &Node, event: &str) -> serde_json::Value {
    let rec = finished_record(node, event);
    assert_eq!(rec["status"], "failed", "{rec}");
    assert!(
        rec["message"]
            .as_str()
            .unwrap_or_default()
            .contains("the hook ended before the result"),
        "{rec}"
    );
    rec
}

/// CodeDeploy's timeout: SIGTERM to the hook's process group.
fn sigterm_group(hook: &Child) {
    let _ = Command::new("kill")
        .args(["-TERM", "--", &format!("-{}", hook.id())])
        .status();
}

/// A `commands:` step that holds its event while the file `arm` exists (touching `started`
/// once it holds) and returns at once while it does not: the test arms it, starts the
/// event, and releases it when it chooses.
struct Hold {
    arm: PathBuf,
    started: PathBuf,
}

impl Hold {
    /// Appends the step to `event`'s commands in the node's config.
    fn add(node: &Node, event: &str) -> Hold {
        let hold = Hold {
            arm: node.path("arm"),
            started: node.path("started"),
        };
        node.add_config(&format!(
            "commands:\n  {event}:\n    - {{ argv: [sh, -c, 'test -e {a} || exit 0; touch {s}; while test -e {a}; do sleep 0.05; done'], timeout: 60s }}\n",
            a = hold.arm.display(),
            s = hold.started.display()
        ));
        hold
    }

    fn arm(&self) {
        std::fs::write(&self.arm, "").unwrap();
    }

    fn wait_started(&self, node: &Node) {
        support::wait_until_or(
            30,
            "the command should start",
            || node.log(),
            || self.started.exists(),
        );
    }

    fn release(&self) {
        std::fs::remove_file(&self.arm).unwrap();
    }
}

/// Issue 11 item 7: CodeDeploy's timeout (SIGTERM to the hook's group) during ValidateService
/// while the health checks had not passed yet. The daemon went on checking; when the checks
/// passed it made the node ready, then recorded the event failed: the load balancer sent
/// traffic to a release CodeDeploy had failed. The event now stops at once (probes are safe
/// to abandon), the release is left not ready, and the next hook is served.
#[test]
fn hook_sigterm_in_validate_service_no_longer_leaves_the_unvalidated_release_ready() {
    let health_port = support::free_port();
    let ready_port = support::free_port();
    let mut node = held_node(health_port, ready_port, "");
    let listener = std::net::TcpListener::bind(("127.0.0.1", health_port)).unwrap();
    node.start();
    node.revision("g-1", "d-1", "one");
    node.hooks_ok("d-1", &IN_PLACE);
    assert_eq!(support::http_get(ready_port, "/ready").0, 200);
    drop(listener);
    node.revision("g-1", "d-2", "two");
    node.hooks_ok("d-2", &IN_PLACE[..6]);
    let hook = spawn_hook(&node, "ValidateService", "d-2");
    support::wait_until_or(
        30,
        "the health check should fail first",
        || node.log(),
        || node.log().contains("health check app failed"),
    );
    sigterm_group(&hook);
    let out = hook.wait_with_output().unwrap();
    let t = text(&out);
    assert_ne!(out.status.code(), Some(0), "{t}");
    assert!(t.contains("the hook got SIGTERM before the result"), "{t}");
    // The app comes up just after: the checks would pass now.
    let listener = std::net::TcpListener::bind(("127.0.0.1", health_port)).unwrap();
    let rec = assert_hook_ended(&node, "ValidateService");
    assert_eq!(
        support::http_get(ready_port, "/ready").0,
        503,
        "a release whose ValidateService CodeDeploy failed is not ready: {rec}"
    );
    assert!(node.current().unwrap().ends_with("-d-2"));
    assert_ne!(
        node.status_json()["rollback_target"],
        serde_json::Value::Null,
        "the release left keeps its standing"
    );
    // The next hook is served: CodeDeploy's retry passes and the node is ready.
    let out = node.hook("ValidateService", Some("d-2"), "g-1");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(support::http_get(ready_port, "/ready").0, 200);
    drop(listener);
}

/// Issue 11 item 7: the hook killed (SIGKILL: its connection simply drops) while
/// ApplicationStop's command ran. The event was recorded failed but the node stayed drained
/// (/ready 503, services stopped) while the old release, unchanged, could serve. The drain
/// is now undone: CodeDeploy failed the deployment, the node serves its release again.
#[test]
fn hook_sigkill_in_application_stop_no_longer_leaves_the_node_drained() {
    let health_port = support::free_port();
    let ready_port = support::free_port();
    let mut node = held_node(health_port, ready_port, "");
    let hold = Hold::add(&node, "ApplicationStop");
    let _listener = std::net::TcpListener::bind(("127.0.0.1", health_port)).unwrap();
    node.start();
    node.revision("g-1", "d-1", "one");
    // The first deployment has no ApplicationStop (nothing was installed before).
    node.hooks_ok("d-1", &IN_PLACE[3..]);
    assert_eq!(support::http_get(ready_port, "/ready").0, 200);
    hold.arm();
    let mut hook = spawn_hook(&node, "ApplicationStop", "d-2");
    hold.wait_started(&node);
    hook.kill().unwrap();
    hook.wait().unwrap();
    hold.release();
    let rec = assert_hook_ended(&node, "ApplicationStop");
    assert_eq!(
        support::http_get(ready_port, "/ready").0,
        200,
        "the old release serves on: {rec}"
    );
    // The next hook is served: a retry drains, and the deployment goes through.
    node.revision("g-1", "d-2", "two");
    node.hooks_ok("d-2", &IN_PLACE[2..]);
    assert!(node.current().unwrap().ends_with("-d-2"));
    assert_eq!(support::http_get(ready_port, "/ready").0, 200);
}

/// Issue 11 item 7: the hook killed (SIGKILL) while AfterInstall's command ran. The release
/// it built stayed in releases/, recorded as this deployment's, though CodeDeploy failed the
/// event. It is now left for the cleanup (never switched to), and the retry builds anew.
#[test]
fn hook_sigkill_in_after_install_leaves_the_unswitched_release_for_cleanup() {
    let mut node = Node::new();
    let hold = Hold::add(&node, "AfterInstall");
    node.start();
    node.revision("g-1", "d-1", "one");
    node.hooks_ok("d-1", &IN_PLACE);
    node.revision("g-1", "d-2", "two");
    node.hooks_ok("d-2", &IN_PLACE[..4]);
    hold.arm();
    let mut hook = spawn_hook(&node, "AfterInstall", "d-2");
    hold.wait_started(&node);
    hook.kill().unwrap();
    hook.wait().unwrap();
    hold.release();
    let rec = assert_hook_ended(&node, "AfterInstall");
    let built: Vec<String> = std::fs::read_dir(node.path("app/releases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with("-d-2"))
        .collect();
    assert!(
        built.is_empty(),
        "the release CodeDeploy failed is not kept as one: {built:?} {rec}"
    );
    assert!(node.current().unwrap().ends_with("-d-1"));
    node.hooks_ok("d-2", &IN_PLACE[4..]);
    assert!(node.current().unwrap().ends_with("-d-2"));
}

/// Issue 11 item 7: CodeDeploy's timeout during ApplicationStart's command, after the
/// switch, with `validate.rollback_on_failure`. The new release stayed current though
/// CodeDeploy failed the event; it now switches back to the release it left, which serves
/// and is ready again, as after a failed ValidateService.
#[test]
fn hook_sigterm_in_application_start_switches_back_with_rollback_on_failure() {
    let health_port = support::free_port();
    let ready_port = support::free_port();
    let mut node = held_node(
        health_port,
        ready_port,
        "validate: { rollback_on_failure: true }\n",
    );
    let hold = Hold::add(&node, "ApplicationStart");
    let _listener = std::net::TcpListener::bind(("127.0.0.1", health_port)).unwrap();
    node.start();
    node.revision("g-1", "d-1", "one");
    node.hooks_ok("d-1", &IN_PLACE);
    let first = node.current().unwrap();
    node.revision("g-1", "d-2", "two");
    node.hooks_ok("d-2", &IN_PLACE[..5]);
    hold.arm();
    let hook = spawn_hook(&node, "ApplicationStart", "d-2");
    hold.wait_started(&node);
    assert!(node.current().unwrap().ends_with("-d-2"), "switched");
    sigterm_group(&hook);
    let out = hook.wait_with_output().unwrap();
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    hold.release();
    let rec = assert_hook_ended(&node, "ApplicationStart");
    assert_eq!(
        node.current().as_deref(),
        Some(first.as_str()),
        "switched back: {rec}"
    );
    assert_eq!(support::http_get(ready_port, "/ready").0, 200, "{rec}");
    assert_eq!(node.status_json()["last_switch"]["reason"], "auto_rollback");
}

/// ValidateService's own `commands:` (an operator's smoke test) ran after the node had
/// turned ready and the release had been recorded as passed: a failing smoke test failed the
/// event while /ready answered 200 on the release and it stayed a rollback target. The
/// commands are part of validation: they run before the node turns ready, and a failure
/// leaves the node out and the release never a rollback target.
#[test]
fn a_failing_validate_service_command_left_the_node_ready_and_the_release_passed() {
    let mut node = Node::with_extra(
        "commands:\n  ValidateService:\n    - { argv: [sh, -c, 'test ! -e \"$BGAGENT_RELEASE_DIR/SMOKE_FAILS\"'] }\n",
    );
    node.start();
    node.revision("g-1", "d-GOOD", "good");
    node.hooks_ok("d-GOOD", &IN_PLACE);
    let good = node.current().unwrap();
    node.revision("g-1", "d-SMOKE", "smoke");
    std::fs::write(
        node.path("cd-root/g-1/d-SMOKE/deployment-archive/SMOKE_FAILS"),
        "",
    )
    .unwrap();
    node.hooks_ok("d-SMOKE", &IN_PLACE[..6]);
    let out = node.hook("ValidateService", Some("d-SMOKE"), "g-1");
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    let st = node.status_json();
    assert_ne!(st["node"]["readiness"]["state"], "ready", "{st:#}");
    let smoke = node.current().unwrap();
    let rec = st["releases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == smoke.as_str())
        .unwrap();
    assert_eq!(rec["validation"], "failed", "{st:#}");
    assert_eq!(st["rollback_target"], good.as_str(), "{st:#}");
}

/// The hook killed while ApplicationStop's drain waited for the load balancer's evidence:
/// the drain held the event until its upper bound (`deregistration_delay`, here an hour)
/// before anything was undone. Waiting changes nothing, so it is abandoned when the hook
/// ends, and the node serves its release again.
#[test]
fn hook_killed_during_the_drain_wait_no_longer_holds_the_event_until_the_bound() {
    let health_port = support::free_port();
    let ready_port = support::free_port();
    let mut node = held_node(
        health_port,
        ready_port,
        "drain: { deregistration_delay: 1h, health_check_interval: 1h, unhealthy_threshold: 2 }\n",
    );
    let _listener = std::net::TcpListener::bind(("127.0.0.1", health_port)).unwrap();
    node.start();
    node.revision("g-1", "d-1", "one");
    node.hooks_ok("d-1", &IN_PLACE[3..]);
    // Probed like a load balancer does (two probes within the interval), then never again:
    // the drain waits for more probes, up to the bound.
    for _ in 0..2 {
        assert_eq!(support::http_get(ready_port, "/ready").0, 200);
    }
    let mut hook = spawn_hook(&node, "ApplicationStop", "d-2");
    support::wait_until_or(
        30,
        "the drain should wait for the probes",
        || node.log(),
        || node.log().contains("draining: /ready answers 503"),
    );
    hook.kill().unwrap();
    hook.wait().unwrap();
    assert_hook_ended(&node, "ApplicationStop");
    support::wait_until_or(
        30,
        "the old release serves again",
        || node.log(),
        || support::http_get(ready_port, "/ready").0 == 200,
    );
}
