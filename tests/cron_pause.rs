//! Cron paused for the fleet during a deployment and resumed after the switch (issue 15,
//! item 3), against a real Redis, through the real binary: `bgagent cron run` as cron runs
//! it, a `bin/magento cron:run` stand-in (PHP) that records where it ran, and `bgagent
//! deploy DIR`.

mod support;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::text;

const BIN: &str = env!("CARGO_BIN_EXE_bgagent");

/// `bin/magento` stand-in: `cron:run` writes `<id>.start` (its cwd), sleeps CRON_SLEEP
/// seconds, writes `<id>.done`; with CRON_GROUPS set it starts that job in the background as
/// Magento starts a cron group in its own process, and exits at once.
const MAGENTO: &str = r#"#!/usr/bin/env php
<?php
if (($argv[1] ?? '') !== 'cron:run') { exit(0); }
$dir = getenv('CRON_MARKS');
if (getenv('CRON_GROUPS') && !in_array('--group=index', $argv, true)) {
    // As ProcessCronQueueObserver with use_separate_process: the group runs in the
    // background, rendered by CommandRendererBackground (`... > /dev/null &`, stderr kept).
    exec(PHP_BINARY . ' ' . escapeshellarg(__FILE__) . ' cron:run --group=index --bootstrap=standaloneProcessStarted=1 > /dev/null &');
    exit(0);
}
$id = getmypid() . '-' . uniqid();
file_put_contents("$dir/$id.start", getcwd());
sleep((int) getenv('CRON_SLEEP'));
file_put_contents("$dir/$id.done", getcwd());
"#;

struct Node {
    dir: tempfile::TempDir,
    redis: Option<String>,
}

impl Node {
    fn new(redis: Option<String>) -> Node {
        let n = Node {
            dir: tempfile::tempdir().unwrap(),
            redis,
        };
        std::fs::create_dir_all(n.marks()).unwrap();
        // As the package's tmpfiles entry makes it.
        std::fs::create_dir_all(n.p("state")).unwrap();
        n.configure("");
        n
    }
    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    fn marks(&self) -> PathBuf {
        self.p("marks")
    }
    fn cfg(&self) -> PathBuf {
        self.p("bgagent.yaml")
    }
    fn configure(&self, extra: &str) {
        let cache = match &self.redis {
            Some(url) => format!("cache: {{ redis: \"{url}\" }}\n"),
            None => String::new(),
        };
        let cfg = format!(
            "app_root: app\nstate_dir: state\nsocket: {{ path: run/s.sock, group: null }}\n\
             app: {{ kind: php, name: shop }}\n{cache}\
             cron:\n  pause: always\n  wait_budget: 60s\n\
             \x20 command: {{ argv: [php, bin/magento, cron:run], timeout: 60s, env: {{ CRON_MARKS: \"{}\", CRON_SLEEP: \"2\" }} }}\n\
             {extra}",
            self.marks().display()
        );
        std::fs::write(self.cfg(), cfg).unwrap();
    }
    fn bgagent(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("--config")
            .arg(self.cfg())
            .args(args)
            .output()
            .unwrap()
    }
    fn deploy(&self, version: &str) -> Output {
        let s = self.p(&format!("src-{version}"));
        for d in ["app/etc", "bin", "pub"] {
            std::fs::create_dir_all(s.join(d)).unwrap();
        }
        std::fs::write(s.join("app/etc/config.php"), "<?php return [];").unwrap();
        std::fs::write(s.join("bin/magento"), MAGENTO).unwrap();
        std::fs::write(s.join("pub/index.php"), format!("<?php echo '{version}';")).unwrap();
        self.bgagent(&["deploy", s.to_str().unwrap()])
    }
    fn current(&self) -> PathBuf {
        std::fs::canonicalize(self.p("app/current")).unwrap()
    }
    fn count(&self, ext: &str) -> usize {
        std::fs::read_dir(self.marks())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == ext)
            })
            .count()
    }
    /// Where the runs ran (their cwd), one per run.
    fn started_in(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.marks())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "start"))
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect();
        v.sort();
        v
    }
    /// Waits for the condition (a start marker written by a job just launched); the limit only
    /// ends a broken run.
    fn wait_for(&self, what: &str, f: impl Fn() -> bool) {
        let t0 = Instant::now();
        while !f() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "never happened: {what}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn background(cmd: &mut Command) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    unsafe {
        cmd.pre_exec(|| {
            let _ = rustix::process::setsid();
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

/// A check run as an AfterInstall command, while the pause holds: PHP exits 1 unless the
/// number of `ext` markers is `n`.
fn count_check(marks: &Path, ext: &str, n: usize) -> String {
    format!(
        "    - {{ argv: [php, -r, \"exit(count(glob('{}/*.{ext}')) == {n} ? 0 : 1);\"] }}\n",
        marks.display()
    )
}

#[test]
fn cron_is_paused_for_the_fleet_waited_for_and_resumed_after_the_switch() {
    let redis = support::Redis::start();
    let n = Node::new(Some(redis.url()));
    // A second node of the fleet (same Redis, same app), nothing deployed on it yet.
    let other = Node::new(Some(redis.url()));
    let o = n.deploy("v1");
    assert!(o.status.success(), "{}", text(&o));
    let v1 = n.current();

    // Two jobs running when the deployment starts: one through `bgagent cron run` (a
    // lease), one started some other way (found by its command line).
    let mut leased = background(
        Command::new(BIN)
            .arg("--config")
            .arg(n.cfg())
            .args(["cron", "run"]),
    );
    n.wait_for("the leased job started", || n.count("start") == 1);
    let mut direct = background(
        Command::new("php")
            .args(["bin/magento", "cron:run"])
            .current_dir(&v1)
            .env("CRON_MARKS", n.marks())
            .env("CRON_SLEEP", "2"),
    );
    n.wait_for("the direct job started", || n.count("start") == 2);

    // While the pause holds (AfterInstall's commands run after its work): cron on this node
    // and on the other node is skipped, and both jobs have finished.
    let mut extra = String::from("commands:\n  AfterInstall:\n");
    for cfg in [n.cfg(), other.cfg()] {
        extra.push_str(&format!(
            "    - {{ argv: [{BIN}, --config, \"{}\", cron, run] }}\n",
            cfg.display()
        ));
    }
    extra.push_str(&count_check(&n.marks(), "start", 2));
    extra.push_str(&count_check(&n.marks(), "done", 2));
    n.configure(&extra);
    let o = n.deploy("v2");
    let log = text(&o);
    assert!(o.status.success(), "{log}");
    assert!(log.contains("cron paused for deployment"), "{log}");
    assert!(log.contains("fleet-wide"), "{log}");
    assert!(log.contains("waiting for"), "{log}");
    assert_eq!(
        log.matches("this run is skipped").count(),
        2,
        "both nodes' cron runs were to be skipped during the pause: {log}"
    );
    assert!(log.contains("cron resumed (after the switch)"), "{log}");
    assert!(leased.wait().unwrap().success());
    let _ = direct.wait();
    assert_eq!(other.count("start"), 0);

    let s: serde_json::Value =
        serde_json::from_slice(&n.bgagent(&["status", "--json"]).stdout).unwrap();
    let c = &s["cron"];
    assert_eq!(c["scope"], "redis", "{s:#}");
    assert!(c["resumed_at"].is_string(), "{s:#}");
    assert!(c["waited_for"].as_array().unwrap().len() >= 2, "{s:#}");
    assert!(c["still_running"].as_array().unwrap().is_empty(), "{s:#}");

    // Resumed: the next run runs, from the new release's own directory.
    n.configure("");
    let o = n.bgagent(&["cron", "run"]);
    assert!(o.status.success(), "{}", text(&o));
    let v2 = n.current();
    assert_ne!(v1, v2);
    let started = n.started_in();
    assert_eq!(started.len(), 3, "{started:?}");
    assert!(started.contains(&v2.display().to_string()), "{started:?}");
}

#[test]
fn without_redis_the_pause_holds_on_this_node_and_a_budget_overrun_fails_when_told_to() {
    let n = Node::new(None);
    let o = n.deploy("v1");
    assert!(o.status.success(), "{}", text(&o));
    // A job that outlasts the budget, and on_budget: fail.
    let mut long = background(
        Command::new("php")
            .args(["bin/magento", "cron:run"])
            .current_dir(n.current())
            .env("CRON_MARKS", n.marks())
            .env("CRON_SLEEP", "30"),
    );
    n.wait_for("the long job started", || n.count("start") == 1);
    let cfg = std::fs::read_to_string(n.cfg()).unwrap().replace(
        "wait_budget: 60s",
        "wait_budget: 1s\n  on_budget: fail\n  pause_ttl: 5m",
    );
    std::fs::write(n.cfg(), cfg).unwrap();
    let o = n.deploy("v2");
    let log = text(&o);
    let _ = long.kill();
    let _ = long.wait();
    assert!(!o.status.success(), "{log}");
    assert!(log.contains("this node only"), "{log}");
    assert!(log.contains("still running after"), "{log}");
    assert!(log.contains("bin/magento cron:run"), "{log}");
    // The failed AfterInstall lifted the pause: cron runs again on the old release.
    assert!(log.contains("cron resumed (AfterInstall failed)"), "{log}");
    let o = n.bgagent(&["cron", "run"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!text(&o).contains("skipped"), "{}", text(&o));
    assert_eq!(n.count("start"), 2);
}

/// Magento's cron:run starts its groups in the background with stderr still on cron:run's
/// stderr. `bgagent cron run` ran the job through the event-command runner, which ends a
/// process left holding the command's output pipes after 0.5 s: the group job was killed
/// half way. It now runs on the wrapper's own output and waits for the group (its lease
/// lasts until the group is done).
#[test]
fn magento_cron_groups_started_in_the_background_are_waited_for_not_killed() {
    let n = Node::new(None);
    let o = n.deploy("v1");
    assert!(o.status.success(), "{}", text(&o));
    let cfg = std::fs::read_to_string(n.cfg())
        .unwrap()
        .replace("CRON_SLEEP: \"2\"", "CRON_SLEEP: \"2\", CRON_GROUPS: \"1\"");
    std::fs::write(n.cfg(), cfg).unwrap();
    let o = n.bgagent(&["cron", "run"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(n.count("start"), 1, "{}", text(&o));
    assert_eq!(
        n.count("done"),
        1,
        "the background group job was ended, or not waited for: {}",
        text(&o)
    );
}
