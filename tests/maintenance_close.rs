//! `bgagent maintenance status|close` against a real Redis and a real daemon's watcher: a
//! maintenance window left open (a failed setup:upgrade under `schema.breaking: maintenance`
//! keeps it open on purpose) could only be ended by its TTL (`schema.maintenance_ttl`, 1 h by
//! default) or by hand in Redis; the shop stayed down meanwhile.

mod support;

use support::fleet::{self, Agent};
use support::text;

#[test]
fn an_open_maintenance_window_could_only_be_closed_by_its_ttl() {
    support::require("php");
    let redis = support::Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut agent = Agent::spawn(
        d,
        &format!(
            "app_root: app\nstate_dir: state\nsocket: {{ path: run/s.sock, group: null }}\ncodedeploy: {{ deployment_root: cd-root }}\n\
             app: {{ kind: magento, name: shop }}\nrelease: {{ shared_paths: [] }}\n\
             cache: {{ redis: \"{}\", node: node0 }}\nreadiness: {{ listen: \"127.0.0.1:{}\" }}\n\
             schema: {{ breaking: maintenance }}\n",
            redis.url(),
            support::free_port()
        ),
    );
    let log = d.join("daemon.log");
    // A Magento-shaped release (the model: its bin/magento keeps var/.maintenance.flag) serves.
    support::magento_model(&fleet::archive(&d.join("cd-root"), "d-1"), None);
    for ev in ["BeforeInstall", "AfterInstall", "ApplicationStart"] {
        let o = agent.hook(ev, "d-1");
        assert_eq!(o.status.code(), Some(0), "{ev}: {}", text(&o));
    }
    let flag = d.join("app/current/var/.maintenance.flag");
    assert!(!flag.exists());

    // Nothing open yet.
    let o = agent.cli(&["maintenance", "status"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("no maintenance window is open for shop"),
        "{}",
        text(&o)
    );

    // Another deployment's setup:upgrade opened the window and failed: it stays open. The
    // watcher turns this node's maintenance flag on.
    assert_eq!(
        redis.cli(2, &["SET", "bgagent:shop:maintenance", "d-2", "EX", "3600"]),
        "OK"
    );
    support::wait_until_or(
        15,
        "the watcher turns maintenance on",
        || std::fs::read_to_string(&log).unwrap_or_default(),
        || flag.exists(),
    );

    // `status` says this node serves maintenance (503), and why.
    let st = agent.status_json();
    assert_eq!(st["maintenance"]["flag"], true, "{st:#}");
    assert_eq!(st["maintenance"]["window"]["deployment"], "d-2", "{st:#}");
    assert!(
        agent
            .status_text()
            .contains("maintenance: ON: Magento's var/.maintenance.flag is in the current release"),
        "{}",
        agent.status_text()
    );

    let o = agent.cli(&["maintenance", "status", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["open"], true, "{v}");
    assert_eq!(v["deployment"], "d-2", "{v}");
    let left = v["closes_in_s"].as_u64().unwrap();
    assert!(left > 3500 && left <= 3600, "{v}");

    // Another deployment's window is never closed by mistake.
    let o = agent.cli(&["maintenance", "close", "--deployment", "d-9"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("deployment d-2's, not d-9's: nothing was closed"),
        "{}",
        text(&o)
    );
    assert_eq!(redis.cli(2, &["GET", "bgagent:shop:maintenance"]), "d-2");

    // The operator closes it: the key goes, and the watcher takes the flag off.
    let o = agent.cli(&["maintenance", "close", "--deployment", "d-2"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("closed the maintenance window of deployment d-2 for shop"),
        "{}",
        text(&o)
    );
    assert_eq!(redis.cli(2, &["EXISTS", "bgagent:shop:maintenance"]), "0");
    support::wait_until_or(
        15,
        "the watcher turns maintenance off",
        || std::fs::read_to_string(&log).unwrap_or_default(),
        || !flag.exists(),
    );
    support::wait_until_or(
        15,
        "status says maintenance is off",
        || std::fs::read_to_string(&log).unwrap_or_default(),
        || {
            agent.status_json()["maintenance"]
                == serde_json::json!({ "flag": false, "window": null })
        },
    );
    assert!(!agent.status_text().contains("maintenance:"));
    support::wait_until_or(
        15,
        "the daemon says why",
        || std::fs::read_to_string(&log).unwrap_or_default(),
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("(the window closed)")
        },
    );

    // Again: nothing to close, and that is not an error.
    let o = agent.cli(&["maintenance", "close"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("no maintenance window is open for shop; nothing to close"),
        "{}",
        text(&o)
    );
    support::stop_daemon(&mut agent.daemon);

    // Without cache.redis there is no window: a config error that says so.
    let bare = d.join("bare.yaml");
    std::fs::write(&bare, "app_root: app\nstate_dir: state\n").unwrap();
    let o = support::bgagent(&bare, &["maintenance", "close"]);
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    assert!(text(&o).contains("cache.redis is not set"), "{}", text(&o));
}
