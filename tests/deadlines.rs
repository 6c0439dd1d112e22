//! A deadline on every outside call: an endpoint that accepts a connection and never answers
//! must fail the event within its configured budget, name what stalled, leave nothing
//! rendered or switched, and leave the daemon serving the next hook.

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use support::text;

const BIN: &str = env!("CARGO_BIN_EXE_bgagent");

/// Runs `cmd` to its end, or kills it after `limit` and fails the test: a bound on a hang,
/// not a timing assertion (the budgets under test are a hundred times smaller).
fn run_bounded(mut cmd: Command, limit: Duration, what: &str) -> Output {
    let child: Child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let out = child.wait_with_output().unwrap();
        let _ = tx.send(());
        out
    });
    if rx.recv_timeout(limit).is_err() {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        let out = waiter.join().unwrap();
        panic!("{what} hung (killed after {limit:?}):\n{}", text(&out));
    }
    waiter.join().unwrap()
}

/// The tests of this binary run one at a time: the SSM test sets the environment the
/// daemon it starts inherits.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn stalled_ssm_endpoint_fails_after_install_within_budget_and_next_hook_is_served() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let d = tempfile::tempdir().unwrap();
    let p = |s: &str| -> PathBuf { d.path().join(s) };
    // listen()s, never accept()s: the kernel completes the handshake, nobody ever answers.
    let stalled = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = stalled.local_addr().unwrap().port();
    std::fs::write(
        p("env.php.j2"),
        "<?php return ['db' => {{ params.db.password }}];\n",
    )
    .unwrap();
    std::fs::write(
        p("bgagent.yaml"),
        format!(
            "app_root: app\nstate_dir: state\nsocket:\n  path: run/bgagent.sock\n  group: null\n\
             codedeploy:\n  deployment_root: cd-root\napp:\n  kind: php\n\
             params:\n  source: ssm\n  paths: [/shop]\n  region: us-east-1\n  endpoint_url: http://127.0.0.1:{port}\n\
             \x20 max_attempts: 2\n  initial_backoff: 10ms\n  max_backoff: 20ms\n  connect_timeout: 200ms\n  timeout: 300ms\n\
             templates:\n  - source: env.php.j2\n    target: app/etc/env.php\n    check: []\n"
        ),
    )
    .unwrap();
    let rev = p("cd-root/g-1/d-STALL/deployment-archive");
    std::fs::create_dir_all(rev.join("pub")).unwrap();
    std::fs::write(rev.join("pub/index.php"), "<?php echo 1;").unwrap();
    // The daemon makes the SSM calls: it gets the test credentials (SERIAL: no other test
    // of this binary reads the environment meanwhile).
    for (k, v) in support::AWS_ENV {
        unsafe { std::env::set_var(k, v) };
    }
    let daemon = support::spawn_daemon(
        BIN,
        &p("bgagent.yaml"),
        &p("run/bgagent.sock"),
        &p("daemon.log"),
    );
    // Stopped however the test ends: a failed assertion must not leave a daemon running.
    struct Stop(Child);
    impl Drop for Stop {
        fn drop(&mut self) {
            support::stop_daemon(&mut self.0);
        }
    }
    let daemon = Stop(daemon);
    let hook = |ev: &str| {
        let mut c = Command::new(BIN);
        c.arg("--config")
            .arg(p("bgagent.yaml"))
            .args(["hook", ev])
            .env("LIFECYCLE_EVENT", ev)
            .env("DEPLOYMENT_ID", "d-STALL")
            .env("DEPLOYMENT_GROUP_ID", "g-1")
            .env("DEPLOYMENT_GROUP_NAME", "prod")
            .env("APPLICATION_NAME", "shop");
        for (k, v) in support::AWS_ENV {
            c.env(k, v);
        }
        run_bounded(c, Duration::from_secs(90), ev)
    };
    let out = hook("BeforeInstall");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = hook("AfterInstall");
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains(&format!("127.0.0.1:{port}")) && t.contains("stalled"),
        "the failure names what stalled:\n{t}"
    );
    // Nothing rendered, nothing switched, no release left.
    assert!(!p("app/current").exists());
    assert_eq!(
        std::fs::read_dir(p("app/releases"))
            .map(|r| r.count())
            .unwrap_or(0),
        0
    );
    // The daemon serves the next hook: the retried AfterInstall is taken and answered.
    let out = hook("AfterInstall");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("stalled"), "{}", text(&out));
    let mut c = Command::new(BIN);
    c.arg("--config")
        .arg(p("bgagent.yaml"))
        .args(["status", "--json"]);
    let out = run_bounded(c, Duration::from_secs(30), "status");
    assert!(out.status.success(), "{}", text(&out));
    drop(stalled);
    drop(daemon);
}

#[test]
fn stalled_mysql_fails_the_schema_step_naming_the_database() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let d = tempfile::tempdir().unwrap();
    let p = |s: &str| -> PathBuf { d.path().join(s) };
    let stalled = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = stalled.local_addr().unwrap().port();
    std::fs::write(
        p("bgagent.yaml"),
        format!(
            "app_root: app\nstate_dir: state\nsocket: {{ path: run/s.sock, group: null }}\napp: {{ kind: php }}\n\
             schema:\n  connect_timeout: 300ms\n  migration: {{ argv: [\"true\"] }}\n\
             \x20 database: {{ host: 127.0.0.1, port: {port}, user: app, database: app }}\n"
        ),
    )
    .unwrap();
    std::fs::create_dir_all(p("rel/pub")).unwrap();
    std::fs::write(p("rel/pub/index.php"), "<?php").unwrap();
    let mut c = Command::new(BIN);
    c.arg("--config")
        .arg(p("bgagent.yaml"))
        .arg("deploy")
        .arg(p("rel"));
    let out = run_bounded(c, Duration::from_secs(90), "deploy");
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains(&format!("127.0.0.1:{port}")) && t.contains("stalled"),
        "{t}"
    );
    assert!(!p("app/current").exists());
    drop(stalled);
}
