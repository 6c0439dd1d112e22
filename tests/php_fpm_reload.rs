//! The php-fpm reload as bgagent performs it with the exec backend (`kill -USR2 {pid}`
//! through the pid file), against Debian's real php-fpm 8.2, daemonized, started privately.

mod support;

use std::path::Path;
use std::time::Duration;

use bgagent::services::{Backend, ServiceConfig, ServiceKind, ServicesConfig};

/// Regression: `services::wait_new_master` returned at once when the pid file still named
/// the old master (alive), so "reloaded php-fpm" was logged, and the next step ran, before
/// php-fpm had reloaded. On USR2 php-fpm lets its busy workers finish (up to
/// `process_control_timeout`), then re-executes; daemonized, the new image forks a new master
/// and the old pid exits once that master is ready. A request in flight holds the reload
/// back, so the old code returned while the old master still ran.
#[test]
fn php_fpm_reload_returns_only_once_the_new_master_runs() {
    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("app");
    std::fs::create_dir_all(app.join("current/pub")).unwrap();
    let started = dir.path().join("slow-started");
    std::fs::write(
        app.join("current/pub/slow.php"),
        format!(
            "<?php file_put_contents('{}', '1'); usleep(2000000); echo 'slow done';",
            started.display()
        ),
    )
    .unwrap();
    let web = support::Web::start(&app);
    let pid_file = web.dir.path().join("run/php-fpm.pid");
    let (old_master, old_workers) = web.fpm_pids();
    assert!(old_master > 0 && !old_workers.is_empty());
    let cfg = ServicesConfig {
        backend: Backend::Exec,
        list: vec![ServiceConfig {
            name: "php-fpm".into(),
            kind: ServiceKind::PhpFpm,
            reload: Some(vec!["kill".into(), "-USR2".into(), "{pid}".into()]),
            pid_file: Some(pid_file.clone()),
            ..Default::default()
        }],
    };
    // A request in flight: php-fpm lets it finish before it re-executes.
    let port = web.port;
    let slow = std::thread::spawn(move || support::http_get(port, "/slow.php"));
    let t0 = std::time::Instant::now();
    while !started.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the slow request never started"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(bgagent::services::reload_service(&cfg, "php-fpm"))
        .unwrap();
    let now: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_ne!(
        now, old_master,
        "the reload returned while the pid file still named the master before it"
    );
    assert!(Path::new(&format!("/proc/{now}")).exists());
    assert!(
        !running(old_master),
        "the reload returned while the old master {old_master} still ran"
    );
    let (_, workers) = web.fpm_pids();
    assert!(
        !workers.is_empty() && workers.iter().all(|w| !old_workers.contains(w)),
        "new workers serve: {workers:?} (before: {old_workers:?})"
    );
    let (code, body) = slow.join().unwrap();
    assert!(
        code == 200 && body.contains("slow done"),
        "the request in flight finished: {code} {body}"
    );
    assert!(web.get("/slow.php").1.contains("slow done"));
}

fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.get(s.rfind(')')? + 2..)?.chars().next())
        .is_some_and(|c| c != 'Z' && c != 'X')
}
