//! Cron and queue consumers through a Magento upgrade (issue 15, item 3), on the Magento model
//! (tests/fixtures/magento-model) against real MariaDB and Redis, through the real binary:
//! the model's `cron:run` (a `cron_schedule` row naming the release it ran from) run by
//! `bgagent cron run`, the model's `queue:consumers:start` started from `current` as cron's
//! consumers_runner starts it, and `bgagent deploy` of the `additive` variant with
//! `schema.policy: upgrade` and `cron.pause: upgrade`.

mod support;

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::text;

const BIN: &str = env!("CARGO_BIN_EXE_bgagent");

struct Node {
    dir: tempfile::TempDir,
    db: support::MariaDb,
    _redis: support::Redis,
}

impl Node {
    fn new() -> Node {
        let db = support::MariaDb::start();
        let redis = support::Redis::start();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("state")).unwrap();
        std::fs::write(
            d.join("params.yaml"),
            format!(
                "db: {{ host: 127.0.0.1, port: {}, name: app, user: app, password: apppass }}\nsecure: [db.password]\n",
                db.port
            ),
        )
        .unwrap();
        // model/cron_ms: each cron:run job takes 2 s, long enough to be running when the
        // deployment starts.
        std::fs::write(
            d.join("env.php.j2"),
            "<?php return ['deployment' => ['blue_green' => ['enabled' => true]], 'model' => ['cron_ms' => 2000], \
             'db' => ['connection' => ['default' => ['host' => {{ params.db.host }}, 'port' => {{ params.db.port }}, \
             'dbname' => {{ params.db.name }}, 'username' => {{ params.db.user }}, 'password' => {{ params.db.password }}]]]];\n",
        )
        .unwrap();
        let cfg = format!(
            "app_root: app\nstate_dir: state\nsocket: {{ path: run/s.sock, group: null }}\n\
             app: {{ kind: magento, name: shop }}\nrelease: {{ shared_paths: [] }}\n\
             params: {{ source: file, path: params.yaml }}\n\
             templates: [ {{ source: env.php.j2, target: app/etc/env.php }} ]\n\
             cache: {{ redis: \"{}\" }}\n\
             schema:\n  magento_gate: true\n  policy: upgrade\n\
             \x20 database: {{ host: 127.0.0.1, port: {}, user: app, database: app, password_param: db.password }}\n\
             cron:\n  pause: upgrade\n  wait_budget: 60s\n\
             \x20 command: {{ argv: [php, bin/magento, cron:run], timeout: 60s }}\n\
             processes: {{ grace: 5s }}\n",
            redis.url(),
            db.port
        );
        std::fs::write(d.join("bgagent.yaml"), cfg).unwrap();
        Node {
            dir,
            db,
            _redis: redis,
        }
    }
    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    fn bgagent(&self, args: &[&str]) -> Output {
        support::bgagent(&self.p("bgagent.yaml"), args)
    }
    fn deploy(&self, name: &str, variant: Option<&str>) -> Output {
        let src = self.p(name);
        support::magento_model(&src, variant);
        self.bgagent(&["deploy", src.to_str().unwrap()])
    }
    fn current(&self) -> PathBuf {
        std::fs::canonicalize(self.p("app/current")).unwrap()
    }
    fn jobs(&self) -> Vec<(String, String)> {
        // cron:run creates the table on its first run.
        let exists = self.db.sql(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = 'app' AND table_name = 'cron_schedule'",
        );
        if exists.trim() != "1" {
            return Vec::new();
        }
        self.db
            .sql("SELECT status, release_dir FROM app.cron_schedule ORDER BY schedule_id")
            .lines()
            .map(|l| {
                let (s, r) = l.split_once('\t').unwrap();
                (s.to_string(), r.to_string())
            })
            .collect()
    }
}

fn spawn_detached(cmd: &mut Command) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    unsafe {
        cmd.pre_exec(|| {
            let _ = rustix::process::setsid();
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

#[test]
fn model_cron_is_paused_and_waited_for_and_its_consumer_restarts_from_the_new_release() {
    support::require("php");
    let n = Node::new();
    let o = n.deploy("v1", None);
    assert!(o.status.success(), "{}", text(&o));
    let v1 = n.current();

    // The consumer, as consumers_runner starts it: from `current`.
    let mut consumer = spawn_detached(
        Command::new("php")
            .args(["bin/magento", "queue:consumers:start", "shop.consumer"])
            .current_dir(n.p("app/current")),
    );
    // A cron run in progress when the deployment starts.
    let mut cron = spawn_detached(
        Command::new(BIN)
            .arg("--config")
            .arg(n.p("bgagent.yaml"))
            .args(["cron", "run"]),
    );
    let t0 = Instant::now();
    while !n.jobs().iter().any(|(s, _)| s == "running") {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the cron job never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let o = n.deploy("v2", Some("additive"));
    let log = text(&o);
    assert!(o.status.success(), "{log}");
    let v2 = n.current();
    assert_ne!(v1, v2);
    // The engine logs in order: the running job ended before setup:upgrade started.
    let at = |needle: &str| {
        log.find(needle)
            .unwrap_or_else(|| panic!("no `{needle}` in:\n{log}"))
    };
    assert!(at("cron paused for deployment") < at("running cron job(s) to finish"));
    assert!(at("running cron job(s) finished") < at("running setup:upgrade"));
    assert!(at("running setup:upgrade") < at("cron resumed (after the switch)"));
    assert!(cron.wait().unwrap().success());
    assert_eq!(
        n.jobs(),
        vec![("success".to_string(), v1.display().to_string())],
        "the v1 job ran to its end, and nothing ran during the pause"
    );
    assert_eq!(
        n.db.sql("SELECT COUNT(*) FROM app.model_runs WHERE command = 'setup:upgrade'")
            .trim(),
        "2",
        "v1's install and v2's upgrade"
    );

    // The consumer ran v1's code: ended by SIGTERM after the switch (it handles it, exit 0).
    let pid = consumer.id();
    assert!(
        log.contains(&format!("process {pid} (php")) && log.contains("ended by SIGTERM"),
        "{log}"
    );
    assert_eq!(consumer.wait().unwrap().code(), Some(0));
    let s: serde_json::Value =
        serde_json::from_slice(&n.bgagent(&["status", "--json"]).stdout).unwrap();
    let swept = &s["last_process_sweep"]["processes"];
    assert!(
        swept
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["pid"] == pid && p["fate"] == "terminated" && p["by"] == "cwd"),
        "{s:#}"
    );
    assert!(s["cron"]["resumed_at"].is_string(), "{s:#}");
    assert_eq!(s["cron"]["scope"], "redis", "{s:#}");

    // Cron again: from the new release.
    let o = n.bgagent(&["cron", "run"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        n.jobs().last().unwrap(),
        &("success".to_string(), v2.display().to_string())
    );
}
