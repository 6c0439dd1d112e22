//! Schema safety across a fleet: 8 agents (separate roots, sockets, readiness ports; one
//! MariaDB, one Redis) run the same deployment at the same instant. The migration runs
//! exactly once, no node gets past AfterInstall before it finished, a failed migration fails
//! every node naming where it failed, and the Magento gate (a stand-in bin/magento answering
//! from the real database) refuses, ignores, or upgrades once.

mod support;

use std::process::{Command, Output};
use support::fleet::{self, Agent};
use support::text;

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
                "<?php return ['deployment' => ['blue_green' => ['enabled' => true]], \
                 'db' => ['connection' => ['default' => ['host' => {{ params.db.host }}, 'port' => {{ params.db.port }}, \
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
            agents.push(Agent::spawn(&dir, &cfg));
        }
        Fleet {
            base,
            db,
            _redis: redis,
            agents,
        }
    }

    /// A revision for `dep`: the Magento model, with `variant`'s overlay when given.
    fn revision(&self, dep: &str, variant: Option<&str>) {
        support::magento_model(
            &fleet::archive(&self.base.path().join("cd-root"), dep),
            variant,
        );
    }

    /// Every agent runs `events` for `dep`, all released at once per event; returns, per
    /// agent, the outputs and the time each event returned.
    fn deploy(&self, dep: &str, events: &[&str]) -> Vec<Vec<(Output, f64)>> {
        fleet::together(&self.agents, dep, events)
    }
}

#[test]
fn the_migration_runs_exactly_once_and_no_node_passes_before_it_finished() {
    let marker = tempfile::tempdir().unwrap();
    let ran = marker.path().join("ran");
    let schema = format!(
        "  migration:\n    argv: [sh, -c, 'echo \"$BGAGENT_NODE\" >> {ran}; sleep 1; date +%s.%N > {ran}.done']\n",
        ran = ran.display()
    );
    let f = Fleet::new(8, &schema);
    f.revision("d-1", None);
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
            let j = a.status_json();
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

/// Issue 16: after a failed migration every retry of the same deployment failed forever,
/// even once the cause was fixed. The round that saw the failure still fails on every node,
/// naming the node and the command and saying how to retry; a retry after the fix runs the
/// migration again (a new attempt in the record) and the other nodes then skip it.
#[test]
fn a_failed_migration_fails_every_node_naming_where_it_failed_and_a_retry_after_the_fix_runs_it() {
    let marker = tempfile::tempdir().unwrap();
    let fixed = marker.path().join("fixed");
    let f = Fleet::new(
        4,
        &format!(
            "  migration:\n    argv: [sh, -c, 'test -e {} || {{ echo broken migration >&2; exit 3; }}']\n",
            fixed.display()
        ),
    );
    f.revision("d-1", None);
    let outs = f.deploy("d-1", &["BeforeInstall", "AfterInstall"]);
    let mut ran_here = 0;
    for node in &outs {
        let t = text(&node[1].0);
        assert_eq!(node[1].0.status.code(), Some(1), "{t}");
        if t.contains("migration failed: `sh -c") {
            ran_here += 1;
        } else {
            assert!(
                t.contains("the migration (`sh -c test -e")
                    && t.contains("for deployment d-1 failed on node node")
                    && t.contains("broken migration"),
                "{t}"
            );
        }
        assert!(
            t.contains("DEPLOYMENT_ID=d-1 bgagent hook AfterInstall"),
            "says how to retry: {t}"
        );
    }
    assert_eq!(ran_here, 1);

    std::fs::write(&fixed, "").unwrap();
    let out = f.agents[1].hook("AfterInstall", "d-1");
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.contains("running it again (attempt 2)"), "{t}");
    for a in [&f.agents[0], &f.agents[2], &f.agents[3]] {
        let out = a.hook("AfterInstall", "d-1");
        let t = text(&out);
        assert_eq!(out.status.code(), Some(0), "{t}");
        assert!(t.contains("already ran on node node1"), "{t}");
    }
    assert_eq!(
        f.db.sql(
            "SELECT attempt, result FROM app.bgagent_migrations WHERE deployment_id = 'd-1' ORDER BY attempt"
        ),
        "1\tfailed\n2\tsuccess\n",
        "the record keeps every attempt"
    );
}

/// Issue 16, break 2: MariaDB dropped the named lock when the killed daemon's connection
/// closed, and another node ran the migration while the first migration process, in its own
/// session, still ran (they overlapped for 1.9 s); the interrupted run's record was
/// overwritten. The migration here takes an exclusive flock and notes an overlap if it
/// cannot: the daemon running it is killed with SIGKILL mid-run, and the next node must
/// start only once that run has ended.
#[test]
fn killing_the_lock_holder_mid_migration_never_runs_the_migration_twice_at_once() {
    let marker = tempfile::tempdir().unwrap();
    let m = marker.path().display().to_string();
    let schema = format!(
        "  migration:\n    argv: [sh, -c, 'exec 9>>{m}/flock; flock -n 9 || {{ echo \"overlap $BGAGENT_NODE\" >> {m}/log; exit 7; }}; \
         echo \"start $BGAGENT_NODE\" >> {m}/log; touch {m}/started-$BGAGENT_NODE; sleep 3; echo \"end $BGAGENT_NODE\" >> {m}/log']\n"
    );
    let mut f = Fleet::new(4, &schema);
    f.revision("d-1", None);
    let (outs, killed) = std::thread::scope(|s| {
        let deploy = s.spawn(|| f.deploy("d-1", &["BeforeInstall", "AfterInstall"]));
        let t0 = std::time::Instant::now();
        let killed = loop {
            let started = std::fs::read_dir(marker.path())
                .unwrap()
                .flatten()
                .find_map(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .strip_prefix("started-node")
                        .and_then(|i| i.parse::<usize>().ok())
                });
            if let Some(i) = started {
                break i;
            }
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(60),
                "the migration never started"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let pid = f.agents[killed].daemon.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-KILL", &pid])
                .status()
                .unwrap()
                .success()
        );
        (deploy.join().unwrap(), killed)
    });
    let _ = f.agents[killed].daemon.wait();
    // The command held the lock connection: the lock outlived the killed daemon because the
    // node found its own end of that connection to pass on.
    for a in &f.agents {
        let log = a.log();
        assert!(
            !log.contains("could not find this node's end of the lock connection"),
            "{log}"
        );
    }
    for (i, node) in outs.iter().enumerate() {
        if i != killed {
            assert_eq!(node[1].0.status.code(), Some(0), "{}", text(&node[1].0));
        }
    }
    let log = std::fs::read_to_string(marker.path().join("log")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert!(
        !log.contains("overlap"),
        "the migration ran twice at once: {log}"
    );
    assert_eq!(lines.len(), 4, "{log}");
    let k = format!("node{killed}");
    assert_eq!(lines[0], format!("start {k}"), "{log}");
    assert_eq!(
        lines[1],
        format!("end {k}"),
        "the killed node's run went on to its end: {log}"
    );
    let other = lines[2].strip_prefix("start ").unwrap();
    assert_ne!(other, k, "{log}");
    assert_eq!(lines[3], format!("end {other}"), "{log}");
    assert_eq!(
        f.db.sql(
            "SELECT attempt, node, result FROM app.bgagent_migrations WHERE deployment_id = 'd-1' ORDER BY attempt"
        ),
        format!("1\t{k}\tinterrupted\n2\t{other}\tsuccess\n"),
        "the record keeps every attempt"
    );

    // the killed node, restarted, retries its interrupted AfterInstall and skips the migration
    f.agents[killed].respawn();
    let out = f.agents[killed].hook("AfterInstall", "d-1");
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.contains(&format!("already ran on node {other}")), "{t}");
}

/// Issue 16: the lock-timeout message said only "another node holds it". It names the node
/// holding the lock, since when, and for which deployment.
#[test]
fn the_lock_timeout_names_the_node_holding_the_lock_and_since_when() {
    let f = Fleet::new(
        2,
        "  lock_timeout: 1s\n  migration:\n    argv: [sh, -c, 'sleep 3']\n",
    );
    f.revision("d-1", None);
    let outs = f.deploy("d-1", &["BeforeInstall", "AfterInstall"]);
    let (ok, failed): (Vec<_>, Vec<_>) = outs
        .iter()
        .map(|n| &n[1].0)
        .partition(|o| o.status.success());
    assert_eq!((ok.len(), failed.len()), (1, 1), "{outs:?}");
    let t = text(failed[0]);
    let holder = if t.contains("node node0 holds it") {
        0
    } else {
        1
    };
    assert!(
        t.contains("waited 1s (schema.lock_timeout) for the fleet's schema lock `bgagent:shop`")
            && t.contains(&format!("node node{holder} holds it since 20"))
            && t.contains("running the migration for deployment d-1"),
        "{t}"
    );
    assert!(text(ok[0]).contains(&format!("on this node (node{holder})")));
}

#[test]
fn magento_gate_refuses_ignores_or_upgrades_once() {
    support::require("php");
    // fail (the default): the release is refused before any traffic reaches it
    let f = Fleet::new(1, "  magento_gate: true\n");
    f.revision("d-1", None);
    let out = f.agents[0].hook("AfterInstall", "d-1");
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
    f.revision("d-1", None);
    let out = f.agents[0].hook("AfterInstall", "d-1");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("ignored (schema.policy is ignore)"));
    drop(f);

    // upgrade: setup:upgrade runs once for 4 nodes, after which the gate is clean
    let f = Fleet::new(4, "  magento_gate: true\n  policy: upgrade\n");
    f.revision("d-1", None);
    for node in f.deploy("d-1", &["AfterInstall"]) {
        assert_eq!(node[0].0.status.code(), Some(0), "{}", text(&node[0].0));
    }
    assert_eq!(
        f.db.sql("SELECT COUNT(*) FROM app.model_runs WHERE command = 'setup:upgrade'")
            .trim(),
        "1"
    );
    f.revision("d-2", None);
    let out = f.agents[0].hook("AfterInstall", "d-2");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        f.db.sql("SELECT COUNT(*) FROM app.model_runs WHERE command = 'setup:upgrade'")
            .trim(),
        "1",
        "nothing to upgrade the second time"
    );
}
