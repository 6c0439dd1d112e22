//! `bgagent maintenance status|close` against a real Redis and a real daemon's watcher: a
//! maintenance window left open (a failed setup:upgrade under `schema.breaking: maintenance`
//! keeps it open on purpose) could only be ended by its TTL (`schema.maintenance_ttl`, 1 h by
//! default) or by hand in Redis; the shop stayed down meanwhile.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use support::fleet::{self, Agent};
use support::text;

fn redis_cli(port: u16, args: &[&str]) -> String {
    let o = Command::new(support::require("redis-cli"))
        .args(["-p", &port.to_string(), "-n", "2"])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn wait_for(what: &str, log: &Path, mut done: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !done() {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "{what} within 15 s; daemon log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

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
        redis_cli(
            redis.port,
            &["SET", "bgagent:shop:maintenance", "d-2", "EX", "3600"]
        ),
        "OK"
    );
    wait_for("the watcher turns maintenance on", &log, || flag.exists());

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
    assert_eq!(
        redis_cli(redis.port, &["GET", "bgagent:shop:maintenance"]),
        "d-2"
    );

    // The operator closes it: the key goes, and the watcher takes the flag off.
    let o = agent.cli(&["maintenance", "close", "--deployment", "d-2"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("closed the maintenance window of deployment d-2 for shop"),
        "{}",
        text(&o)
    );
    assert_eq!(
        redis_cli(redis.port, &["EXISTS", "bgagent:shop:maintenance"]),
        "0"
    );
    wait_for("the watcher turns maintenance off", &log, || !flag.exists());
    wait_for("status says maintenance is off", &log, || {
        agent.status_json()["maintenance"] == serde_json::json!({ "flag": false, "window": null })
    });
    assert!(!agent.status_text().contains("maintenance:"));
    wait_for("the daemon says why", &log, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("(the window closed)")
    });

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
