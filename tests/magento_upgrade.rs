//! Zero-downtime Magento upgrades (issue 15), on the Magento model (tests/fixtures/magento-model)
//! with real MariaDB, Redis, nginx and php-fpm: the blue/green flag is checked in the
//! rendered env.php; the declarative schema of the live and the new release is compared; an
//! additive change runs setup:upgrade once for a 2-node fleet while old code keeps answering;
//! a breaking one is refused (or taken at the release's declared word); app:config:import
//! runs once, only when app:config:status asks for it.

mod support;

use std::path::PathBuf;
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use support::fleet::{self, Agent};
use support::text;

struct Fleet {
    base: tempfile::TempDir,
    db: support::MariaDb,
    redis: support::Redis,
    agents: Vec<Agent>,
}

/// env.php as the fleet renders it: the flag from the parameter `bg` (parameters are strings,
/// so it is compared with "true"), to show that the rendered value counts, not the
/// template's text; and the model's setup:upgrade duration.
const ENV_TEMPLATE: &str = "<?php return ['deployment' => ['blue_green' => ['enabled' => {{ params.bg == \"true\" }}]], \
    'model' => ['upgrade_ms' => {{ params.upgrade_ms }}], \
    'db' => ['connection' => ['default' => ['host' => {{ params.db.host }}, 'port' => {{ params.db.port }}, \
    'dbname' => {{ params.db.name }}, 'username' => {{ params.db.user }}, 'password' => {{ params.db.password }}]]]];\n";

impl Fleet {
    fn new(n: usize, blue_green: bool, upgrade_ms: u32, schema_yaml: &str) -> Fleet {
        Fleet::build(n, blue_green, upgrade_ms, schema_yaml, false)
    }

    /// With cache.redis: the fleet's Redis (a maintenance window goes through it).
    fn with_redis(n: usize, upgrade_ms: u32, schema_yaml: &str) -> Fleet {
        Fleet::build(n, true, upgrade_ms, schema_yaml, true)
    }

    fn build(
        n: usize,
        blue_green: bool,
        upgrade_ms: u32,
        schema_yaml: &str,
        with_redis: bool,
    ) -> Fleet {
        support::require("php");
        let db = support::MariaDb::start();
        let redis = support::Redis::start();
        let base = tempfile::tempdir().unwrap();
        let mut agents = Vec::new();
        for i in 0..n {
            let dir = base.path().join(format!("node{i}"));
            std::fs::create_dir_all(dir.join("app")).unwrap();
            std::fs::write(
                dir.join("params.yaml"),
                format!(
                    "bg: {blue_green}\nupgrade_ms: {upgrade_ms}\ndb: {{ host: 127.0.0.1, port: {}, name: app, user: app, password: apppass }}\nsecure: [db.password]\n",
                    db.port
                ),
            )
            .unwrap();
            std::fs::write(dir.join("env.php.j2"), ENV_TEMPLATE).unwrap();
            let cfg = format!(
                "app_root: app\nstate_dir: state\nsocket: {{ path: run/s.sock, group: null }}\ncodedeploy: {{ deployment_root: ../cd-root }}\n\
                 app: {{ kind: magento, name: shop }}\nrelease: {{ shared_paths: [] }}\n\
                 params: {{ source: file, path: params.yaml }}\n\
                 templates: [ {{ source: env.php.j2, target: app/etc/env.php }} ]\n\
                 cache: {{ node: node{i}{} }}\nreadiness: {{ listen: \"127.0.0.1:{}\" }}\n\
                 schema:\n  magento_gate: true\n  policy: upgrade\n  database: {{ host: 127.0.0.1, port: {}, user: app, database: app, password_param: db.password }}\n{schema_yaml}\n",
                if with_redis {
                    format!(", redis: \"{}\"", redis.url())
                } else {
                    String::new()
                },
                support::free_port(),
                db.port
            );
            agents.push(Agent::spawn(&dir, &cfg));
        }
        Fleet {
            base,
            db,
            redis,
            agents,
        }
    }

    /// The revision of `dep`: the model with `variant`'s overlay; returns its directory.
    fn revision(&self, dep: &str, variant: Option<&str>) -> PathBuf {
        let root = fleet::archive(&self.base.path().join("cd-root"), dep);
        support::magento_model(&root, variant);
        std::fs::write(root.join("RELEASE_ID"), dep).unwrap();
        root
    }

    /// Every agent runs `events` for `dep`, all released at once per event.
    fn deploy(&self, dep: &str, events: &[&str]) -> Vec<Vec<Output>> {
        fleet::together(&self.agents, dep, events)
            .into_iter()
            .map(|node| node.into_iter().map(|(out, _)| out).collect())
            .collect()
    }

    /// nginx and php-fpm serving every node's app root.
    fn webs(&self) -> Vec<support::Web> {
        self.agents
            .iter()
            .map(|a| support::Web::start(&a.dir.join("app")))
            .collect()
    }

    /// Every node runs BeforeInstall and AfterInstall of `dep` while each of `webs` is polled
    /// on `paths` and the database is watched every 50 ms: `while_upgrading` runs each time
    /// setup:upgrade is seen running. Returns the hooks' outputs, every answer the pollers
    /// saw, and how many times setup:upgrade was seen running.
    fn install_watched(
        &self,
        dep: &str,
        webs: &[support::Web],
        paths: &[&str],
        while_upgrading: impl Fn() + Sync,
    ) -> (Vec<Vec<Output>>, Vec<(u16, String)>, usize) {
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let pollers: Vec<_> = webs
                .iter()
                .map(|w| s.spawn(|| poll(w, &stop, paths)))
                .collect();
            let watcher = s.spawn(|| {
                let mut upgrading_seen = 0;
                while !stop.load(Ordering::Relaxed) {
                    let running = self
                        .db
                        .sql("SELECT COUNT(*) FROM app.model_runs WHERE command = 'setup:upgrade' AND finished_at IS NULL")
                        .trim()
                        == "1";
                    if running {
                        while_upgrading();
                        upgrading_seen += 1;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                upgrading_seen
            });
            let outs = self.deploy(dep, &["BeforeInstall", "AfterInstall"]);
            stop.store(true, Ordering::Relaxed);
            let seen: Vec<_> = pollers
                .into_iter()
                .flat_map(|p| p.join().unwrap())
                .collect();
            (outs, seen, watcher.join().unwrap())
        })
    }

    fn runs(&self, command: &str) -> usize {
        self.db
            .sql(&format!(
                "SELECT COUNT(*) FROM app.model_runs WHERE command = '{command}'"
            ))
            .trim()
            .parse()
            .unwrap()
    }

    fn status(&self, i: usize) -> serde_json::Value {
        self.agents[i].status_json()
    }

    fn status_text(&self, i: usize) -> String {
        self.agents[i].status_text()
    }
}

/// Polls `done` every 50 ms until it holds; fails with `msg` after 30 s (a bound on a hang).
const INSTALL: &[&str] = &["BeforeInstall", "AfterInstall", "ApplicationStart"];

fn all_ok(outs: &[Vec<Output>]) {
    for node in outs {
        for o in node {
            assert_eq!(o.status.code(), Some(0), "{}", text(o));
        }
    }
}

#[test]
fn with_policy_upgrade_a_release_whose_rendered_env_php_lacks_the_blue_green_flag_is_refused_before_anything_runs()
 {
    // the template names the flag, but the rendered value is false
    let f = Fleet::new(1, false, 0, "");
    f.revision("d-1", None);
    let out = f.agents[0].hook("AfterInstall", "d-1");
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("is refused before anything runs: its rendered app/etc/env.php sets deployment/blue_green/enabled to a value PHP reads as false")
            && t.contains("'deployment' => ['blue_green' => ['enabled' => true]]"),
        "{t}"
    );
    assert!(!t.contains("apppass"), "a secret reached the output: {t}");
    // nothing ran against the database: not even the gate's checks
    assert_eq!(
        f.db.sql("SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = 'app'")
            .trim(),
        "0"
    );
    let st = f.status(0);
    assert_eq!(st["last_deployment"]["schema"]["blue_green"], "off", "{st}");

    // rendered true: it goes on and installs
    std::fs::write(
        f.agents[0].dir.join("params.yaml"),
        format!(
            "bg: true\nupgrade_ms: 0\ndb: {{ host: 127.0.0.1, port: {}, name: app, user: app, password: apppass }}\nsecure: [db.password]\n",
            f.db.port
        ),
    )
    .unwrap();
    f.revision("d-2", None);
    let out = f.agents[0].hook("AfterInstall", "d-2");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("app/etc/env.php sets deployment/blue_green/enabled"));
    assert_eq!(f.runs("setup:upgrade"), 1);
}

/// Requests answered until `stop`: (status, "path: body"); bounded in count.
fn poll(web: &support::Web, stop: &AtomicBool, paths: &[&str]) -> Vec<(u16, String)> {
    let mut seen = Vec::new();
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) && seen.len() < 5000 {
        let path = paths[i % paths.len()];
        i += 1;
        let (code, body) = web.get(path);
        seen.push((code, format!("{path}: {body}")));
    }
    seen
}

#[test]
fn an_additive_upgrade_runs_setup_upgrade_once_for_two_nodes_while_old_code_keeps_answering_200() {
    let f = Fleet::new(2, true, 3000, "");
    f.revision("d-1", None);
    all_ok(&f.deploy("d-1", INSTALL));
    assert_eq!(f.runs("setup:upgrade"), 1, "the install ran once");
    let webs = f.webs();
    for w in &webs {
        let (code, body) = w.get("/write");
        assert_eq!(code, 200, "{body}");
    }

    f.revision("d-2", Some("additive"));
    // watch the database: how many requests were answered while setup:upgrade ran
    let (outs, seen, upgrading) =
        f.install_watched("d-2", &webs, &["/catalog", "/write", "/"], || {});
    all_ok(&outs);
    assert_eq!(
        f.runs("setup:upgrade"),
        2,
        "setup:upgrade ran once for d-2, on one node"
    );
    assert!(upgrading > 0, "the watcher never saw setup:upgrade running");
    let failed: Vec<_> = seen.iter().filter(|(c, _)| *c != 200).collect();
    assert!(
        failed.is_empty(),
        "old code failed {} of {} requests: {:?}",
        failed.len(),
        seen.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(
        seen.iter().all(|(_, b)| !b.contains("release=d-2")),
        "only old code served"
    );
    // the database moved on under the old code
    assert_eq!(
        f.db.sql("SELECT schema_version FROM app.setup_module WHERE module = 'Vendor_Shop'"),
        "1.1.0\n"
    );
    let ran_here = outs
        .iter()
        .filter(|n| text(&n[1]).contains("setup:upgrade ran once, on this node"))
        .count();
    assert_eq!(ran_here, 1);
    // the classification, in the event log and in status
    for (i, node) in outs.iter().enumerate() {
        let t = text(&node[1]);
        assert!(t.contains("schema change from release "), "{t}");
        assert!(
            t.contains("additive: shop_product.subtitle: new column (varchar(255), nullable) (app/code/Vendor/Shop/etc/db_schema.xml)")
                && t.contains("additive: shop_review: new table (3 columns) (app/code/Vendor/Shop/etc/db_schema.xml)"),
            "{t}"
        );
        let st = f.status(i);
        let sch = &st["last_deployment"]["schema"];
        assert_eq!(sch["class"], "additive", "{st}");
        assert_eq!(sch["blue_green"], "on");
        assert!(
            sch["compared_with"].as_str().unwrap().ends_with("-d-1"),
            "{sch}"
        );
        let elements: Vec<&str> = sch["findings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["element"].as_str().unwrap())
            .collect();
        assert!(
            elements.contains(&"shop_product.subtitle") && elements.contains(&"shop_review"),
            "{sch}"
        );
        let txt = f.status_text(i);
        assert!(
            txt.contains("schema: change additive, against release "),
            "{txt}"
        );
    }
    // the switch: new code serves, and its pages use the new table
    all_ok(&f.deploy("d-2", &["ApplicationStart"]));
    for w in &webs {
        let (code, body) = w.get("/write");
        assert!(
            code == 200 && body.contains("release=d-2 wrote=4"),
            "{code} {body}"
        );
    }
}

#[test]
fn a_breaking_change_is_refused_on_every_node_and_old_code_keeps_serving() {
    let f = Fleet::new(2, true, 0, "");
    f.revision("d-1", None);
    all_ok(&f.deploy("d-1", INSTALL));
    let webs = f.webs();
    f.revision("d-2", Some("breaking"));
    let outs = f.deploy("d-2", &["BeforeInstall", "AfterInstall"]);
    for node in &outs {
        let t = text(&node[1]);
        assert_eq!(node[1].status.code(), Some(1), "{t}");
        assert!(
            t.contains("its schema change is breaking for the release serving now")
                && t.contains("breaking: shop_product.price: column renamed to base_price (onCreate migrateDataFrom): old code still uses price (app/code/Vendor/Shop/etc/db_schema.xml)")
                && t.contains("schema.breaking: maintenance"),
            "{t}"
        );
    }
    assert_eq!(f.runs("setup:upgrade"), 1, "no upgrade ran for d-2");
    for w in &webs {
        assert_eq!(w.get("/catalog").0, 200);
    }
    let st = f.status(0);
    assert_eq!(st["last_deployment"]["schema"]["class"], "breaking", "{st}");
    assert!(
        st["last_deployment"]["schema"]["outcome"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o.as_str().unwrap().starts_with("refused")),
        "{st}"
    );
}

#[test]
fn a_release_declaring_its_class_is_taken_at_its_word_and_the_disagreement_is_reported() {
    let f = Fleet::new(1, true, 0, "  class_file: etc/schema-change\n");
    f.revision("d-1", None);
    all_ok(&f.deploy("d-1", INSTALL));
    // a rename old code no longer reads (say the old release stopped using the column):
    // the release declares the change additive
    let rev = f.revision("d-2", Some("breaking"));
    std::fs::create_dir_all(rev.join("etc")).unwrap();
    std::fs::write(
        rev.join("etc/schema-change"),
        "# reviewed: old code no longer reads price\nadditive\n",
    )
    .unwrap();
    let out = f.agents[0].hook("AfterInstall", "d-2");
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(
        t.contains("the release declares its schema change additive (etc/schema-change), bgagent's analysis says breaking: going by the declaration"),
        "{t}"
    );
    assert_eq!(f.runs("setup:upgrade"), 2);
    let sch = &f.status(0)["last_deployment"]["schema"];
    assert_eq!(
        (
            sch["declared"].as_str(),
            sch["analysed"].as_str(),
            sch["class"].as_str()
        ),
        (Some("additive"), Some("breaking"), Some("additive")),
        "{sch}"
    );
    let txt = f.status_text(0);
    assert!(
        txt.contains(
            "schema: change additive (declared additive; bgagent's analysis says breaking)"
        ),
        "{txt}"
    );
}

#[test]
fn app_config_import_runs_once_for_the_fleet_and_only_when_app_config_status_asks_for_it() {
    let f = Fleet::new(2, true, 0, "");
    f.revision("d-1", None);
    all_ok(&f.deploy("d-1", INSTALL));
    assert_eq!(
        (f.runs("setup:upgrade"), f.runs("app:config:import")),
        (1, 0)
    );
    // nothing changed: nothing runs
    f.revision("d-2", None);
    all_ok(&f.deploy("d-2", INSTALL));
    assert_eq!(
        (f.runs("setup:upgrade"), f.runs("app:config:import")),
        (1, 0)
    );
    // only the config changed: app:config:import once, no setup:upgrade
    let rev = f.revision("d-3", None);
    let cfg = std::fs::read_to_string(rev.join("app/etc/config.php")).unwrap();
    std::fs::write(
        rev.join("app/etc/config.php"),
        cfg.replace("'en_US'", "'de_DE'"),
    )
    .unwrap();
    let outs = f.deploy("d-3", INSTALL);
    all_ok(&outs);
    assert_eq!(
        (f.runs("setup:upgrade"), f.runs("app:config:import")),
        (1, 1)
    );
    assert_eq!(
        f.db.sql("SELECT value FROM app.core_config_data WHERE path = 'general/locale/code'"),
        "de_DE\n"
    );
    let ran = outs
        .iter()
        .filter(|n| text(&n[1]).contains("app:config:import ran once, on this node"))
        .count();
    assert_eq!(
        ran,
        1,
        "{:?}",
        outs.iter().map(|n| text(&n[1])).collect::<Vec<_>>()
    );
}

/// BeforeInstall to AfterAllowTraffic.
const FULL: &[&str] = support::IN_PLACE.split_at(3).1;

#[test]
fn a_breaking_change_with_schema_breaking_maintenance_takes_every_node_into_maintenance_until_it_has_switched()
 {
    let f = Fleet::with_redis(
        2,
        2000,
        "  breaking: maintenance\n  maintenance_wait: 20s\n",
    );
    f.revision("d-1", None);
    all_ok(&f.deploy("d-1", FULL));
    let webs = f.webs();
    for w in &webs {
        assert_eq!(w.get("/catalog").0, 200);
    }
    f.revision("d-2", Some("breaking"));
    // while setup:upgrade runs, every node must answer 503 (maintenance), never old code
    let (outs, seen, upgrading_503) =
        f.install_watched("d-2", &webs, &["/catalog", "/write"], || {
            for w in &webs {
                let (code, body) = w.get("/catalog");
                assert_eq!(
                    code, 503,
                    "a node served during the breaking upgrade: {body}"
                );
            }
        });
    all_ok(&outs);
    assert!(upgrading_503 > 0, "setup:upgrade was never seen running");
    assert_eq!(f.runs("setup:upgrade"), 2);
    // old code never answered on the moved database: 200 before the window, 503 in it
    let bad: Vec<_> = seen
        .iter()
        .filter(|(c, _)| *c != 200 && *c != 503)
        .collect();
    assert!(bad.is_empty(), "{:?}", &bad[..bad.len().min(5)]);
    assert!(seen.iter().any(|(c, _)| *c == 503));
    for (i, node) in outs.iter().enumerate() {
        let t = text(&node[1]);
        assert!(
            t.contains("breaking: shop_product.price: column renamed to base_price"),
            "{t}"
        );
        let sch = &f.status(i)["last_deployment"]["schema"];
        assert!(
            sch["outcome"].as_array().unwrap().iter().any(|o| o
                .as_str()
                .unwrap()
                .contains("maintenance window on every node")),
            "{sch}"
        );
    }
    // not switched yet: both still in maintenance
    for w in &webs {
        assert_eq!(w.get("/catalog").0, 503);
    }
    // node0 switches: it serves the new code at once; node1 stays in maintenance
    let out = f.agents[0].hook("ApplicationStart", "d-2");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let (code, body) = webs[0].get("/catalog");
    assert!(code == 200 && body.contains("release=d-2"), "{code} {body}");
    assert_eq!(webs[1].get("/catalog").0, 503);
    let out = f.agents[1].hook("ApplicationStart", "d-2");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let (code, body) = webs[1].get("/catalog");
    assert!(code == 200 && body.contains("release=d-2"), "{code} {body}");
    // each node took the flag off the release it put into maintenance, and the window closed
    for a in &f.agents {
        let old = std::fs::read_dir(a.dir.join("app/releases"))
            .unwrap()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().ends_with("-d-1"))
            .unwrap()
            .path();
        let flag = old.join("var/.maintenance.flag");
        // the watcher takes it off within a round or two (and logs it right after)
        let said = || {
            a.log()
                .contains("this node has switched to the new release")
        };
        support::wait_until(
            30,
            &format!(
                "{} stayed, or the daemon did not say it took it off",
                flag.display()
            ),
            || !flag.exists() && said(),
        );
    }
    // the last node to switch closed the window
    let closed = || {
        f.agents.iter().any(|a| {
            a.log()
                .contains("maintenance window for deployment d-2 closed: every node has switched")
        })
    };
    support::wait_until(30, "the window was not closed", closed);
}

#[test]
fn a_node_that_serves_but_does_not_turn_maintenance_on_keeps_the_window_from_opening() {
    let mut f = Fleet::with_redis(2, 0, "  breaking: maintenance\n  maintenance_wait: 3s\n");
    f.revision("d-1", None);
    all_ok(&f.deploy("d-1", FULL));
    let web0 = support::Web::start(&f.agents[0].dir.join("app"));
    // node1 still serves (its web server runs, it is registered), but its daemon is down:
    // and its watcher's heartbeat is gone too (as for a node that never watched)
    support::stop_daemon(&mut f.agents[1].daemon);
    let out = f
        .redis
        .cli(2, &["HDEL", "bgagent:shop:maintenance:nodes", "node1"]);
    assert_eq!(out, "1", "{out}");
    f.revision("d-2", Some("breaking"));
    assert_eq!(
        f.agents[0].hook("BeforeInstall", "d-2").status.code(),
        Some(0)
    );
    let out = f.agents[0].hook("AfterInstall", "d-2");
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("maintenance could not be confirmed within 3s (schema.maintenance_wait) on node(s) node1")
            && t.contains("Nothing was changed and the window is closed"),
        "{t}"
    );
    assert_eq!(f.runs("setup:upgrade"), 1, "setup:upgrade did not run");
    // node0 took its flag off again once the window closed
    support::wait_until(30, "node0 stayed in maintenance", || {
        web0.get("/catalog").0 == 200
    });
}
