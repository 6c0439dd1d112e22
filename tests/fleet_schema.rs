//! Schema safety across a fleet: 8 agents (separate roots, sockets, readiness ports; one
//! MariaDB, one Redis) run the same deployment at the same instant. The migration runs
//! exactly once, no node gets past AfterInstall before it finished, a failed migration fails
//! every node naming where it failed, and the Magento gate (a stand-in bin/magento answering
//! from the real database) refuses, ignores, or upgrades once.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::{Arc, Barrier};
use std::time::{SystemTime, UNIX_EPOCH};
use support::text;

const BIN: &str = env!("CARGO_BIN_EXE_bgagent");

struct Agent {
    dir: PathBuf,
    daemon: Child,
}

impl Drop for Agent {
    fn drop(&mut self) {
        support::stop_daemon(&mut self.daemon);
    }
}

struct Fleet {
    base: tempfile::TempDir,
    db: support::MariaDb,
    _redis: support::Redis,
    agents: Vec<Agent>,
}

impl Fleet {
    fn new(n: usize, schema_yaml: &str) -> Fleet {
        let db = support::MariaDb::start();
        let redis = support::Redis::start();
        let base = tempfile::tempdir().unwrap();
        let mut agents = Vec::new();
        for i in 0..n {
            let dir = base.path().join(format!("node{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(
                dir.join("params.yaml"),
                format!("db: {{ host: 127.0.0.1, port: {}, name: app, user: app, password: apppass }}\nsecure: [db.password]\n", db.port),
            )
            .unwrap();
            std::fs::write(
                dir.join("env.php.j2"),
                "<?php return ['db' => ['connection' => ['default' => ['host' => {{ params.db.host }}, 'port' => {{ params.db.port }}, \
                 'dbname' => {{ params.db.name }}, 'username' => {{ params.db.user }}, 'password' => {{ params.db.password }}]]]];\n",
            )
            .unwrap();
            let cfg = format!(
                "app_root: app\nstate_dir: state\nsocket: {{ path: run/s.sock, group: null }}\ncodedeploy: {{ deployment_root: ../cd-root }}\n\
                 app: {{ kind: magento, name: shop }}\nrelease: {{ shared_paths: [] }}\n\
                 params: {{ source: file, path: params.yaml }}\n\
                 templates: [ {{ source: env.php.j2, target: app/etc/env.php }} ]\n\
                 cache: {{ redis: \"{}\", node: node{i} }}\nreadiness: {{ listen: \"127.0.0.1:{}\" }}\n\
                 schema:\n  database: {{ host: 127.0.0.1, port: {}, user: app, database: app, password_param: db.password }}\n{schema_yaml}\n",
                redis.url(),
                support::free_port(),
                db.port
            );
            std::fs::write(dir.join("bgagent.yaml"), cfg).unwrap();
            let daemon = support::spawn_daemon(
                BIN,
                &dir.join("bgagent.yaml"),
                &dir.join("run/s.sock"),
                &dir.join("daemon.log"),
            );
            agents.push(Agent { dir, daemon });
        }
        Fleet {
            base,
            db,
            _redis: redis,
            agents,
        }
    }

    fn revision(&self, dep: &str, modules: &str) {
        let root = self
            .base
            .path()
            .join(format!("cd-root/g/{dep}/deployment-archive"));
        let fx = support::repo().join("tests/fixtures/magento");
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::create_dir_all(root.join("pub/static")).unwrap();
        std::fs::create_dir_all(root.join("generated")).unwrap();
        std::fs::copy(fx.join("bin/magento"), root.join("bin/magento")).unwrap();
        std::fs::write(root.join("module_versions.json"), modules).unwrap();
    }

    /// Every agent runs `events` for `dep`, all released at once per event; returns, per
    /// agent, the outputs and the time each event returned.
    fn deploy(&self, dep: &str, events: &[&'static str]) -> Vec<Vec<(Output, f64)>> {
        let barrier = Arc::new(Barrier::new(self.agents.len()));
        let hs: Vec<_> = self
            .agents
            .iter()
            .map(|a| {
                let (dir, b, dep, evs) = (
                    a.dir.clone(),
                    barrier.clone(),
                    dep.to_string(),
                    events.to_vec(),
                );
                std::thread::spawn(move || {
                    evs.iter()
                        .map(|ev| {
                            b.wait();
                            let o = hook(&dir, ev, &dep);
                            (
                                o,
                                SystemTime::now()
                                    .duration_since(UNIX_EPOCH)
                                    .unwrap()
                                    .as_secs_f64(),
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    }
}

fn hook(dir: &Path, ev: &str, dep: &str) -> Output {
    Command::new(BIN)
        .arg("--config")
        .arg(dir.join("bgagent.yaml"))
        .args(["hook", ev])
        .env("DEPLOYMENT_ID", dep)
        .env("DEPLOYMENT_GROUP_ID", "g")
        .env("APPLICATION_NAME", "shop")
        .output()
        .unwrap()
}

const MODULES: &str = r#"{"Magento_Store": "2.4.7", "Vendor_Shop": "1.0.0"}"#;

#[test]
fn the_migration_runs_exactly_once_and_no_node_passes_before_it_finished() {
    let marker = tempfile::tempdir().unwrap();
    let ran = marker.path().join("ran");
    let schema = format!(
        "  migration:\n    argv: [sh, -c, 'echo \"$BGAGENT_NODE\" >> {ran}; sleep 1; date +%s.%N > {ran}.done']\n",
        ran = ran.display()
    );
    let f = Fleet::new(8, &schema);
    f.revision("d-1", MODULES);
    let outs = f.deploy("d-1", &["BeforeInstall", "AfterInstall"]);
    for node in &outs {
        for (o, _) in node {
            assert_eq!(o.status.code(), Some(0), "{}", text(o));
        }
    }
    let lines = std::fs::read_to_string(&ran).unwrap();
    assert_eq!(
        lines.lines().count(),
        1,
        "the migration ran more than once: {lines}"
    );
    let finished: f64 = std::fs::read_to_string(format!("{}.done", ran.display()))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    for node in &outs {
        assert!(
            node[1].1 >= finished,
            "a node finished AfterInstall before the migration did"
        );
    }
    let row = f.db.sql(
        "SELECT COUNT(*), MIN(result) FROM app.bgagent_migrations WHERE deployment_id = 'd-1'",
    );
    assert_eq!(row.trim(), "1\tsuccess");
    let skipped = outs
        .iter()
        .filter(|n| text(&n[1].0).contains("already ran on node"))
        .count();
    assert_eq!(skipped, 7);
    // and they all agreed on one cache generation
    let slots: std::collections::BTreeSet<String> = f
        .agents
        .iter()
        .map(|a| {
            let s = Command::new(BIN)
                .arg("--config")
                .arg(a.dir.join("bgagent.yaml"))
                .args(["status", "--json"])
                .output()
                .unwrap();
            let j: serde_json::Value = serde_json::from_slice(&s.stdout).unwrap();
            let rel = j["last_deployment"]["release_id"]
                .as_str()
                .unwrap()
                .to_string();
            let st: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(a.dir.join("state/state.json")).unwrap(),
            )
            .unwrap();
            st["releases"][&rel]["cache"]["slot"].to_string()
        })
        .collect();
    assert_eq!(slots.len(), 1, "{slots:?}");
}

#[test]
fn a_failed_migration_fails_every_node_naming_where_it_failed() {
    let f = Fleet::new(
        4,
        "  migration:\n    argv: [sh, -c, 'echo broken migration >&2; exit 3']\n",
    );
    f.revision("d-1", MODULES);
    let outs = f.deploy("d-1", &["AfterInstall"]);
    let mut ran_here = 0;
    for node in &outs {
        let t = text(&node[0].0);
        assert_eq!(node[0].0.status.code(), Some(1), "{t}");
        if t.contains("migration failed: `sh -c") {
            ran_here += 1;
        } else {
            assert!(
                t.contains("the migration for deployment d-1 failed on node node"),
                "{t}"
            );
        }
    }
    assert_eq!(ran_here, 1);
}

#[test]
fn magento_gate_refuses_ignores_or_upgrades_once() {
    support::require("php");
    // fail (the default): the release is refused before any traffic reaches it
    let f = Fleet::new(1, "  magento_gate: true\n");
    f.revision("d-1", MODULES);
    let out = hook(&f.agents[0].dir, "AfterInstall", "d-1");
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("not zero-downtime compatible")
            && t.contains("Vendor_Shop schema: current version - none"),
        "{t}"
    );
    drop(f);

    // ignore: a warning, and on it goes
    let f = Fleet::new(1, "  magento_gate: true\n  policy: ignore\n");
    f.revision("d-1", MODULES);
    let out = hook(&f.agents[0].dir, "AfterInstall", "d-1");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("ignored (schema.policy is ignore)"));
    drop(f);

    // upgrade: setup:upgrade runs once for 4 nodes, after which the gate is clean
    let f = Fleet::new(4, "  magento_gate: true\n  policy: upgrade\n");
    f.revision("d-1", MODULES);
    for node in f.deploy("d-1", &["AfterInstall"]) {
        assert_eq!(node[0].0.status.code(), Some(0), "{}", text(&node[0].0));
    }
    assert_eq!(
        f.db.sql("SELECT COUNT(*) FROM app.upgrade_runs").trim(),
        "1"
    );
    f.revision("d-2", MODULES);
    let out = hook(&f.agents[0].dir, "AfterInstall", "d-2");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        f.db.sql("SELECT COUNT(*) FROM app.upgrade_runs").trim(),
        "1",
        "nothing to upgrade the second time"
    );
}
