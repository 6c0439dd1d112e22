//! Lifecycle events against real nginx, php-fpm, MariaDB and Redis started privately: the
//! daemon and `bgagent hook` through CodeDeploy's event sequence, with a small PHP app whose
//! health check reaches MariaDB and Redis with the rendered env.php.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::text;

const BIN: &str = env!("CARGO_BIN_EXE_bgagent");

struct Env {
    /// First: stopped before its directory and the services go.
    daemon: support::Daemon,
    dir: tempfile::TempDir,
    web: support::Web,
    ready_port: u16,
    status_port: u16,
    _db: support::MariaDb,
    _redis: support::Redis,
}

impl Env {
    fn new(extra_cfg: &str) -> Env {
        Env::with_nginx(extra_cfg, "")
    }

    /// `nginx_extra`: more keys for the nginx service, `{w}` standing for its directory.
    fn with_nginx(extra_cfg: &str, nginx_extra: &str) -> Env {
        let db = support::MariaDb::start();
        let redis = support::Redis::start();
        let dir = tempfile::tempdir().unwrap();
        let app = dir.path().join("app");
        std::fs::create_dir_all(&app).unwrap();
        let web = support::Web::start(&app);
        let w = web.dir.path();
        std::fs::write(
            dir.path().join("params.yaml"),
            format!(
                "db: {{ host: 127.0.0.1, port: {}, name: app, user: app, password: apppass }}\nredis: {{ host: 127.0.0.1, port: {} }}\nsecure: [db.password]\n",
                db.port, redis.port
            ),
        )
        .unwrap();
        std::fs::copy(
            support::repo().join("tests/fixtures/app/env.php.j2"),
            dir.path().join("env.php.j2"),
        )
        .unwrap();
        std::fs::write(dir.path().join("db-password"), "apppass\n").unwrap();
        let nginx_extra = nginx_extra.replace("{w}", &w.display().to_string());
        let ready_port = support::free_port();
        let status_port = support::free_port();
        let nginx = support::require("nginx");
        let cfg = format!(
            r#"app_root: app
state_dir: state
socket: {{ path: run/bgagent.sock, group: null }}
codedeploy: {{ deployment_root: cd-root }}
app: {{ kind: php, name: shop }}
release: {{ keep: 3, shared_paths: [] }}
params: {{ source: file, path: params.yaml }}
templates:
  - {{ source: env.php.j2, target: app/etc/env.php, mode: "0640" }}
services:
  backend: exec
  list:
    - name: php-fpm
      kind: php-fpm
      test: [{fpm}, -t, -R, -y, {w}/php-fpm.conf]
      reload: [kill, -USR2, "{{pid}}"]
      pid_file: {w}/run/php-fpm.pid
      config_file: {w}/php-fpm.conf
    - name: nginx
      kind: nginx
      test: [{nginx}, -t, -q, -p, {w}, -c, {w}/nginx.conf, -e, {w}/logs/nginx.err]
      reload: [{nginx}, -p, {w}, -c, {w}/nginx.conf, -e, {w}/logs/nginx.err, -s, reload]
{nginx_extra}
health:
  checks:
    - name: app
      http: {{ url: "http://127.0.0.1:{wp}/health.php", body_contains: OK }}
    - name: db
      mysql: {{ host: 127.0.0.1, port: {dbp}, user: app, database: app, password_file: db-password }}
    - name: cache
      redis: {{ url: "redis://127.0.0.1:{rp}/0" }}
  period: 100ms
  ready_period: 100ms
  success_threshold: 2
  failure_threshold: 3
  startup_budget: 1s
  deadline: 20s
readiness: {{ listen: "127.0.0.1:{ready_port}", status_listen: "127.0.0.1:{status_port}" }}
warmup:
  urls: [ {{ url: "http://127.0.0.1:{wp}/" }}, {{ url: "http://127.0.0.1:{wp}/health.php" }} ]
  concurrency: 2
  repeat: 5
  p95_ttfb_budget: 5s
{extra_cfg}
"#,
            fpm = web.fpm_bin.display(),
            nginx = nginx.display(),
            w = w.display(),
            wp = web.port,
            dbp = db.port,
            rp = redis.port,
        );
        std::fs::write(dir.path().join("bgagent.yaml"), cfg).unwrap();
        let mut e = Env {
            daemon: support::Daemon::new(dir.path()),
            dir,
            web,
            ready_port,
            status_port,
            _db: db,
            _redis: redis,
        };
        e.daemon.start();
        e
    }

    fn p(&self, s: &str) -> PathBuf {
        self.dir.path().join(s)
    }

    fn status(&self) -> serde_json::Value {
        let out = support::bgagent(&self.p("bgagent.yaml"), &["status", "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
    }

    fn revision(&self, dep: &str, id: &str, broken: bool) {
        let root = self.p(&format!("cd-root/g-1/{dep}/deployment-archive"));
        copy_dir(&support::repo().join("tests/fixtures/app"), &root);
        std::fs::write(root.join("RELEASE_ID"), id).unwrap();
        if broken {
            std::fs::write(root.join("BROKEN"), "").unwrap();
        }
    }

    fn hook(&self, event: &str, dep: &str) -> Output {
        support::hook_command(&self.p("bgagent.yaml"), event, dep, "g-1")
            .output()
            .unwrap()
    }

    fn deploy(&self, dep: &str, events: &[&str]) -> Vec<Output> {
        events.iter().map(|e| self.hook(e, dep)).collect()
    }

    fn ready(&self) -> u16 {
        support::http_get(self.ready_port, "/ready").0
    }
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}

/// ApplicationStop to AfterAllowTraffic.
const ALL: &[&str] = support::IN_PLACE.split_at(2).1;

fn all_ok(outs: &[Output]) {
    for o in outs {
        assert_eq!(o.status.code(), Some(0), "{}", text(o));
    }
}

#[test]
fn deploys_switch_reload_health_and_readiness_with_real_services() {
    let e = Env::new("");
    assert_eq!(e.ready(), 503, "not ready before any release");
    e.revision("d-1", "one", false);
    all_ok(&e.deploy("d-1", &ALL[1..]));
    assert!(e.web.get("/").1.contains("release=one"));
    assert!(
        e.web.get("/health.php").1.contains("OK"),
        "the rendered env.php reaches MariaDB and Redis"
    );
    assert_eq!(e.ready(), 200);
    let metrics = support::http_get(e.status_port, "/metrics").1;
    assert!(
        metrics.contains("bgagent_readiness_state{state=\"ready\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("bgagent_current_release{release="),
        "{metrics}"
    );
    // The load balancer's port answers /ready and /live only.
    assert_eq!(support::http_get(e.ready_port, "/metrics").0, 404);
    assert_eq!(support::http_get(e.ready_port, "/status").0, 404);
    let v = text(&e.hook("ValidateService", "d-1"));
    assert!(v.contains("already succeeded"), "{v}");
    let st: serde_json::Value = serde_json::from_str(&text(
        &Command::new(BIN)
            .arg("--config")
            .arg(e.p("bgagent.yaml"))
            .args(["status", "--json"])
            .output()
            .unwrap(),
    ))
    .unwrap();
    let msg = st["last_deployment"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["event"] == "ValidateService")
        .unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("3 health check(s) passed") && msg.contains("warm-up: 10 request(s)"),
        "{msg}"
    );
    assert_eq!(st["node"]["readiness"]["state"], "ready");

    // the warm-up's latency budget is enforced: 0 ms cannot be met
    let cfg = bgagent::warmup::WarmupConfig {
        urls: vec![bgagent::warmup::WarmupUrl {
            url: format!("http://127.0.0.1:{}/", e.web.port),
            host: None,
        }],
        p95_ttfb_budget: Some(Duration::ZERO),
        ..Default::default()
    };
    let err = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(bgagent::warmup::run(&cfg))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("missed its latency budget") && err.contains("p95"),
        "{err}"
    );

    // checks go on while ready: a node whose app breaks leaves ready, and comes back
    let broken = e.p("app/current/BROKEN");
    std::fs::write(&broken, "").unwrap();
    let t0 = Instant::now();
    while e.ready() != 503 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "a failing node must leave ready"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::remove_file(&broken).unwrap();
    let t0 = Instant::now();
    while e.ready() != 200 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "a node whose checks pass again comes back"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // second release: served right after ApplicationStart (reloads are graceful)
    e.revision("d-2", "two", false);
    all_ok(&e.deploy("d-2", &ALL[..4]));
    assert!(e.web.get("/").1.contains("release=two"));
    all_ok(&e.deploy("d-2", &ALL[4..]));
    assert_eq!(e.ready(), 200);
}

#[test]
fn a_failing_config_test_keeps_the_old_release_serving() {
    let e = Env::new("");
    e.revision("d-1", "one", false);
    all_ok(&e.deploy("d-1", &ALL[1..]));
    let conf = e.web.dir.path().join("nginx.conf");
    let good = std::fs::read_to_string(&conf).unwrap();
    let broken = good.replace(
        "worker_connections 256;",
        "worker_connections 256; bogus_directive on;",
    );
    // a broken config is caught at BeforeInstall, before anything is built
    std::fs::write(&conf, &broken).unwrap();
    e.revision("d-2", "two", false);
    let out = e.hook("BeforeInstall", "d-2");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("unknown directive \"bogus_directive\""),
        "{}",
        text(&out)
    );
    // and if it breaks between AfterInstall and ApplicationStart, nothing switches
    std::fs::write(&conf, &good).unwrap();
    e.revision("d-3", "three", false);
    all_ok(&e.deploy("d-3", &ALL[..3]));
    std::fs::write(&conf, &broken).unwrap();
    let live = std::fs::read_link(e.p("app/current")).unwrap();
    let out = e.hook("ApplicationStart", "d-3");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("config test of nginx failed"),
        "{}",
        text(&out)
    );
    assert_eq!(std::fs::read_link(e.p("app/current")).unwrap(), live);
    assert!(e.web.get("/").1.contains("release=one"));
}

/// A health check that never passes fails ValidateService with its evidence and, with
/// `validate.rollback_on_failure`, switches back. Issue 11 item 1: the healthy previous
/// release then serves AND is ready (it stayed `starting`, /ready 503, even after a daemon
/// restart, so the load balancer kept the node out).
#[test]
fn a_health_check_that_never_passes_fails_with_evidence_and_rolls_back_to_a_ready_node() {
    let mut e = Env::new("validate: { rollback_on_failure: true }");
    e.revision("d-1", "one", false);
    all_ok(&e.deploy("d-1", &ALL[1..]));
    e.revision("d-2", "two", true);
    all_ok(&e.deploy("d-2", &ALL[..4]));
    let out = e.hook("ValidateService", "d-2");
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("health checks did not pass"), "{t}");
    assert!(
        t.contains("answered 500") && t.contains("broken release"),
        "evidence names the status and body: {t}"
    );
    assert!(t.contains("rolled back to"), "{t}");
    // it ended on the failure threshold (three failures at 100 ms), not on the 20 s deadline:
    // said by the message, not by a clock
    assert!(!t.contains("before the deadline"), "{t}");
    assert!(
        e.web.get("/").1.contains("release=one"),
        "the previous release serves again"
    );
    assert_eq!(
        e.ready(),
        200,
        "the healthy previous release is ready again: {t}"
    );
    e.daemon.restart();
    support::wait_until(20, "ready again after a daemon restart", || {
        e.ready() == 200
    });
}

#[test]
fn draining_turns_ready_503_before_anything_stops() {
    let mut e = Env::new("drain: { deregistration_delay: 1500ms }");
    e.revision("d-1", "one", false);
    all_ok(&e.deploy("d-1", &ALL[1..]));
    assert_eq!(e.ready(), 200);
    let cfg = e.p("bgagent.yaml");
    let mut hook = Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .args(["hook", "BeforeBlockTraffic"])
        .env("DEPLOYMENT_ID", "d-2")
        .env("DEPLOYMENT_GROUP_ID", "g-1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let mut saw_503_while_running = false;
    while t0.elapsed() < Duration::from_secs(1) {
        if e.ready() == 503 && hook.try_wait().unwrap().is_none() {
            saw_503_while_running = true;
            // in-flight work still served during the delay
            assert!(e.web.get("/").1.contains("release=one"));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        saw_503_while_running,
        "/ready must turn 503 as soon as draining starts"
    );
    assert!(hook.wait().unwrap().success());
    assert!(
        t0.elapsed() >= Duration::from_millis(1400),
        "the deregistration delay was waited"
    );
    let _ = &mut e;
}

#[test]
fn a_slow_starting_app_passes_within_the_startup_budget_and_fails_without_it() {
    use bgagent::health::{CheckConfig, CheckKind, HealthConfig};
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (budget, should_pass) in [(Duration::from_secs(5), true), (Duration::ZERO, false)] {
        let port = support::free_port();
        // the "app" opens its port 1.5 s late, like a cold PHP-FPM pool behind a socket
        let opener = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1500));
            let l = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
            std::thread::sleep(Duration::from_secs(3));
            drop(l);
        });
        let cfg = HealthConfig {
            checks: vec![CheckConfig {
                name: "slow".into(),
                kind: CheckKind::Tcp {
                    address: format!("127.0.0.1:{port}"),
                },
            }],
            period: Duration::from_millis(100),
            success_threshold: 1,
            failure_threshold: 3,
            startup_budget: budget,
            deadline: Duration::from_secs(10),
            ..HealthConfig::default()
        };
        let r = rt.block_on(bgagent::health::wait_until_healthy(&cfg));
        assert_eq!(r.is_ok(), should_pass, "budget {budget:?}: {r:?}");
        if let Err(e) = r {
            assert!(
                e.to_string().contains("slow:") && e.to_string().contains("FAIL"),
                "evidence: {e}"
            );
        }
        opener.join().unwrap();
    }
}

#[test]
fn the_load_balancer_takes_the_node_out_before_anything_stops() {
    let e = Env::new("drain: { deregistration_delay: 1s }");
    let lb = support::Haproxy::start(e.web.port, e.ready_port);
    let t0 = Instant::now();
    while lb.server_status() != "DOWN" {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "HAProxy should see a node that is not ready as DOWN"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    e.revision("d-1", "one", false);
    all_ok(&e.deploy("d-1", &ALL[1..]));
    let t0 = Instant::now();
    while lb.server_status() != "UP" {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "HAProxy should see the ready node UP: {}",
            lb.server_status()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(support::http_get(lb.port, "/").1.contains("release=one"));
    // BeforeBlockTraffic: the node leaves the pool while the hook still waits out the delay
    let mut hook = Command::new(BIN)
        .arg("--config")
        .arg(e.p("bgagent.yaml"))
        .args(["hook", "BeforeBlockTraffic"])
        .env("DEPLOYMENT_ID", "d-2")
        .env("DEPLOYMENT_GROUP_ID", "g-1")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let mut down_while_draining = false;
    while t0.elapsed() < Duration::from_millis(900) {
        if lb.server_status() == "DOWN" && hook.try_wait().unwrap().is_none() {
            down_while_draining = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(
        down_while_draining,
        "HAProxy must mark the node DOWN before the drain ends"
    );
    assert!(hook.wait().unwrap().success());
}

#[test]
fn mysql_and_redis_checks_against_the_real_servers() {
    use bgagent::health::{CheckConfig, CheckKind, MysqlCheck};
    let db = support::MariaDb::start();
    let redis = support::Redis::start();
    let d = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let http = bgagent::health::http_client();
    let check = |pw: &str| {
        std::fs::write(d.path().join("pw"), format!("{pw}\n")).unwrap();
        let c = CheckConfig {
            name: "db".into(),
            kind: CheckKind::Mysql(MysqlCheck {
                host: "127.0.0.1".into(),
                port: db.port,
                user: "app".into(),
                password_env: None,
                password_file: Some(d.path().join("pw")),
                database: Some("app".into()),
            }),
        };
        rt.block_on(bgagent::health::check_once(
            &c,
            Duration::from_secs(5),
            &http,
        ))
    };
    assert_eq!(check("apppass"), Ok("SELECT 1 ok".to_string()));
    let e = check("wrong-s3cret-pw").unwrap_err();
    assert!(e.contains("Access denied"), "{e}");
    assert!(
        !e.contains("wrong-s3cret-pw"),
        "the password must not appear in the evidence: {e}"
    );
    let c = CheckConfig {
        name: "cache".into(),
        kind: CheckKind::Redis { url: redis.url() },
    };
    assert_eq!(
        rt.block_on(bgagent::health::check_once(
            &c,
            Duration::from_secs(5),
            &http
        )),
        Ok("PONG".to_string())
    );
}

/// nginx marked `stop_on_drain`, stopped and started by the exec backend.
fn stop_on_drain_nginx() -> String {
    let nginx = support::require("nginx").display().to_string();
    let ctl = |tail: &str| {
        format!("[{nginx}, -p, {{w}}, -c, {{w}}/nginx.conf, -e, {{w}}/logs/nginx.err{tail}]")
    };
    format!(
        "      stop_on_drain: true\n      pid_file: {{w}}/run/nginx.pid\n      stop: {}\n      start: {}",
        ctl(", -s, quit"),
        ctl("")
    )
}

/// Polls `what` until it holds; fails with `msg` after `secs` (a bound, not a speed claim).
#[test]
fn services_stopped_by_the_drain_come_back_at_application_start() {
    let e = Env::with_nginx("", &stop_on_drain_nginx());
    e.revision("d-1", "one", false);
    all_ok(&e.deploy("d-1", &ALL[1..]));
    e.revision("d-2", "two", false);
    let out = e.hook("ApplicationStop", "d-2");
    assert!(text(&out).contains("stopped nginx"), "{}", text(&out));
    let t0 = Instant::now();
    while e.web.get("/").0 != 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "nginx should be stopped"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    all_ok(&e.deploy("d-2", &ALL[1..4]));
    assert!(
        e.web.get("/").1.contains("release=two"),
        "nginx is back, serving the new release"
    );
}

/// Issue 11 item 1, sticky drain: in a blue/green rollback the ORIGINAL instances get
/// BeforeAllowTraffic, [AllowTraffic], AfterAllowTraffic under the rollback's new
/// DEPLOYMENT_ID and install nothing. The drain of the deployment that was rolled back had
/// stopped nginx and turned /ready to 503: both must come back, through the health checks,
/// so the load balancer takes the restored fleet in; and the node must stay ready across a
/// daemon restart.
#[test]
fn sticky_drain_original_instance_of_a_blue_green_rollback_becomes_ready_again() {
    let mut e = Env::with_nginx("", &stop_on_drain_nginx());
    let lb = support::Haproxy::start(e.web.port, e.ready_port);
    e.revision("d-1", "one", false);
    all_ok(&e.deploy("d-1", &ALL[1..]));
    support::wait_until(10, "HAProxy should see the ready node UP", || {
        lb.server_status() == "UP"
    });
    // d-2 moves traffic to the replacement fleet: this (original) node is blocked.
    all_ok(&e.deploy("d-2", &["BeforeBlockTraffic", "AfterBlockTraffic"]));
    assert_eq!(e.ready(), 503);
    assert_eq!(
        e.web.get("/").0,
        0,
        "the drain stopped nginx (stop_on_drain)"
    );
    support::wait_until(10, "HAProxy should take the drained node out", || {
        lb.server_status() == "DOWN"
    });
    // d-3 is CodeDeploy's rollback: the original instance gets traffic back.
    let out = e.hook("BeforeAllowTraffic", "d-3");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        e.ready(),
        200,
        "BeforeAllowTraffic must make the restored node ready: {}",
        text(&out)
    );
    assert!(e.web.get("/").1.contains("release=one"), "nginx is back");
    support::wait_until(10, "AllowTraffic: HAProxy should see the node UP", || {
        lb.server_status() == "UP"
    });
    all_ok(&e.deploy("d-3", &["AfterAllowTraffic"]));
    assert!(support::http_get(lb.port, "/").1.contains("release=one"));
    let st = e.status();
    assert_eq!(st["node"]["traffic"], "live", "{st}");
    assert_eq!(st["node"]["readiness"]["state"], "ready", "{st}");
    assert_eq!(st["last_deployment"]["status"], "succeeded", "{st}");
    // A restarted daemon brings the live node back to ready through its checks.
    e.daemon.restart();
    support::wait_until(
        20,
        "a restarted daemon must make the live node ready",
        || e.ready() == 200,
    );
}

/// Issue 11 item 2: a failed `bgagent deploy` left the node drained (readiness 503, the
/// `stop_on_drain` nginx stopped) although the old release was still current. An artifact
/// that is not an archive is now refused before the drain; a later step that fails while the
/// old release is current brings the node back.
#[test]
fn a_failed_deploy_does_not_leave_the_node_drained() {
    // AfterInstall fails for a release that carries FAIL_AFTER_INSTALL (run in the release).
    let e = Env::with_nginx(
        "commands:\n  AfterInstall:\n    - { argv: [sh, -c, 'test ! -e FAIL_AFTER_INSTALL'], timeout: 10s }",
        &stop_on_drain_nginx(),
    );
    e.revision("d-1", "one", false);
    all_ok(&e.deploy("d-1", &ALL[1..]));
    assert_eq!(e.ready(), 200);
    let deploy = |artifact: &Path| {
        Command::new(BIN)
            .arg("--config")
            .arg(e.p("bgagent.yaml"))
            .arg("deploy")
            .arg(artifact)
            .output()
            .unwrap()
    };

    let junk = e.p("release.tar.gz");
    std::fs::write(&junk, "this is not an archive\n").unwrap();
    let out = deploy(&junk);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("is not a .tar, .tar.gz or .zip archive"), "{t}");
    assert!(!t.contains("draining"), "refused before the drain: {t}");
    assert_eq!(e.ready(), 200, "{t}");
    assert!(e.web.get("/").1.contains("release=one"), "{t}");

    let art = e.p("art-two");
    copy_dir(&support::repo().join("tests/fixtures/app"), &art);
    std::fs::write(art.join("RELEASE_ID"), "two").unwrap();
    std::fs::write(art.join("FAIL_AFTER_INSTALL"), "").unwrap();
    let out = deploy(&art);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("AfterInstall FAILED"), "{t}");
    assert!(t.contains("stopped nginx"), "the drain did run: {t}");
    assert_eq!(e.ready(), 200, "the old release is ready again: {t}");
    assert!(
        e.web.get("/").1.contains("release=one"),
        "nginx was started again: {t}"
    );
    assert_eq!(e.status()["node"]["readiness"]["state"], "ready");
}

/// Issue 11 items 3 and 4: after an automatic switch-back, `bgagent rollback` switched to
/// the release that had just FAILED validation (the `from` of the last switch). The target
/// is the last release that passed ValidateService and is not current, `status` names it,
/// and a repeated rollback (as after exit 5) answers "already rolled back" instead of
/// switching back to the release it left.
#[test]
fn rollback_after_a_switch_back_skips_the_failed_release_and_a_repeat_is_harmless() {
    let e = Env::new("validate: { rollback_on_failure: true }");
    e.revision("d-1", "one", false);
    all_ok(&e.deploy("d-1", &ALL[1..]));
    e.revision("d-2", "two", false);
    all_ok(&e.deploy("d-2", &ALL));
    e.revision("d-3", "three", true);
    all_ok(&e.deploy("d-3", &ALL[..4]));
    let out = e.hook("ValidateService", "d-3");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(e.web.get("/").1.contains("release=two"));
    let st = e.status();
    let id_of = |dep: &str| {
        st["releases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["deployment_id"] == dep)
            .unwrap_or_else(|| panic!("{st}"))["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (one, two) = (id_of("d-1"), id_of("d-2"));
    assert_eq!(st["previous_release"]["id"], one.as_str(), "{st}");
    assert_eq!(st["rollback_target"], one.as_str(), "{st}");
    let rollback = |args: &[&str]| {
        Command::new(BIN)
            .arg("--config")
            .arg(e.p("bgagent.yaml"))
            .arg("rollback")
            .args(args)
            .output()
            .unwrap()
    };
    let out = rollback(&[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("rolled back from {two} to {one}")),
        "{}",
        text(&out)
    );
    assert!(e.web.get("/").1.contains("release=one"));
    // the operator retries (the first answer was lost): nothing switches
    let out = rollback(&["--from", &two]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("already rolled back to {one}")),
        "{}",
        text(&out)
    );
    assert!(e.web.get("/").1.contains("release=one"));
    // and a rollback from a release that is not current is refused, not guessed at
    let out = rollback(&["--from", "20200101T000000Z-d-0"]);
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));
    assert!(e.web.get("/").1.contains("release=one"));
}

/// Issue 11 item 5: the daemon killed (SIGKILL) during ApplicationStart, after the switch,
/// while php-fpm's reload runs. The retried event answered "release is already current" and
/// succeeded without the reload, without starting nginx (stopped by the drain), without
/// recording the previous release: the node stayed down while status said success. Each
/// step after the switch is now repeated by the retry.
#[test]
fn application_start_retried_after_a_crash_completes_the_steps_after_the_switch() {
    let mut e = Env::with_nginx("", &stop_on_drain_nginx());
    e.revision("d-1", "one", false);
    all_ok(&e.deploy("d-1", &ALL[1..]));
    let first = std::fs::read_link(e.p("app/current")).unwrap();
    let first = first.file_name().unwrap().to_str().unwrap().to_string();
    // php-fpm's reload blocks the first time (its shell writes its pid, then becomes sleep),
    // and reloads at once afterwards.
    let marker = e.p("reload-started");
    let cfg = std::fs::read_to_string(e.p("bgagent.yaml")).unwrap();
    let blocking = format!(
        "reload: [sh, -c, 'test -e {m} || {{ echo $$ > {m}; exec sleep 27.5; }}; exec kill -USR2 \"$1\"', sh, \"{{pid}}\"]",
        m = marker.display()
    );
    assert!(cfg.contains("reload: [kill, -USR2, \"{pid}\"]"));
    std::fs::write(
        e.p("bgagent.yaml"),
        cfg.replace("reload: [kill, -USR2, \"{pid}\"]", &blocking),
    )
    .unwrap();
    e.daemon.restart();
    e.revision("d-2", "two", false);
    all_ok(&e.deploy("d-2", &ALL[..3]));
    assert_eq!(e.web.get("/").0, 0, "the drain stopped nginx");
    let hook = Command::new(BIN)
        .arg("--config")
        .arg(e.p("bgagent.yaml"))
        .args(["hook", "ApplicationStart"])
        .env("DEPLOYMENT_ID", "d-2")
        .env("DEPLOYMENT_GROUP_ID", "g-1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    support::wait_until(20, "the reload should start", || {
        std::fs::read_to_string(&marker).is_ok_and(|s| s.trim().parse::<u32>().is_ok())
    });
    e.daemon.kill();
    let sleeper = std::fs::read_to_string(&marker).unwrap();
    let _ = Command::new("kill").arg(sleeper.trim()).status();
    let out = hook.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    let switched = std::fs::read_link(e.p("app/current")).unwrap();
    assert!(
        switched.to_string_lossy().ends_with("-d-2"),
        "the crash came after the switch: {switched:?}"
    );

    e.daemon.start();
    let out = e.hook("ApplicationStart", "d-2");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // nginx, stopped by the drain, is started before the reloads (a stopped service cannot
    // be reloaded), so the crashed attempt had started it; the retry redoes the reload.
    assert!(
        text(&out).contains("reloaded php-fpm"),
        "the retry reloads: {}",
        text(&out)
    );
    assert!(
        e.web.get("/").1.contains("release=two"),
        "nginx serves the new release: {}",
        text(&out)
    );
    let st = e.status();
    assert_eq!(
        st["last_deployment"]["previous_release"],
        first.as_str(),
        "{st}"
    );
    all_ok(&e.deploy("d-2", &ALL[4..]));
    assert_eq!(e.ready(), 200);
}

impl Env {
    /// Restarts the daemon so that it pauses at the step boundary `at` (the engine's
    /// BGAGENT_TEST_PAUSE_AT), where the test kills it with SIGKILL.
    fn start_daemon_pausing_at(&mut self, at: &str) {
        self.daemon.stop();
        self.daemon.start_with(&[("BGAGENT_TEST_PAUSE_AT", at)]);
    }

    /// Waits until the daemon pauses at `at`, then kills it with SIGKILL (a crash there).
    fn crash_at(&mut self, at: &str) {
        let log = self.p("daemon.log");
        support::wait_until(60, &format!("the daemon should reach {at}"), || {
            std::fs::read_to_string(&log)
                .is_ok_and(|l| l.contains(&format!("pausing at step boundary {at}")))
        });
        self.daemon.kill();
    }

    fn current(&self) -> String {
        let l = std::fs::read_link(self.p("app/current")).unwrap();
        l.file_name().unwrap().to_string_lossy().into_owned()
    }

    fn cli(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--config").arg(self.p("bgagent.yaml")).args(args);
        c
    }
}

/// Issue 11 item 5, at every step boundary: the daemon killed (SIGKILL) at each boundary of
/// ApplicationStart, restarted, and the event retried. The retry must complete what did not
/// happen (switch, php-fpm reload, nginx started again after the drain stopped it, previous
/// release recorded), and the deployment then goes through: the new release serves, /ready
/// is 200 and status tells the previous release. A guard: it passed on the code before the
/// boundaries were named (item 5's retry already completes the steps after the switch); the
/// previous release is now also written to disk before the switch, not only by the steps
/// that happen to save the state first.
#[test]
fn application_start_killed_at_each_step_boundary_then_retried_leaves_the_node_right() {
    let mut e = Env::with_nginx("", &stop_on_drain_nginx());
    e.revision("d-1", "one", false);
    all_ok(&e.deploy("d-1", &ALL[1..]));
    let boundaries = [
        "start:tested",
        "start:registered",
        "start:precompiled",
        "switch:unrecorded",
        "start:switched",
        "start:started",
        "start:reloaded",
    ];
    for (i, at) in boundaries.iter().enumerate() {
        let dep = format!("d-{}", i + 2);
        let tag = format!("r{}", i + 2);
        let before = e.current();
        e.start_daemon_pausing_at(at);
        e.revision(&dep, &tag, false);
        all_ok(&e.deploy(&dep, &ALL[..3]));
        let hook = Command::new(BIN)
            .arg("--config")
            .arg(e.p("bgagent.yaml"))
            .args(["hook", "ApplicationStart"])
            .env("DEPLOYMENT_ID", &dep)
            .env("DEPLOYMENT_GROUP_ID", "g-1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        e.crash_at(at);
        let out = hook.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(5), "{at}: {}", text(&out));
        e.daemon.start();
        let out = e.hook("ApplicationStart", &dep);
        assert_eq!(out.status.code(), Some(0), "{at}: retry: {}", text(&out));
        for ev in &ALL[4..] {
            let out = e.hook(ev, &dep);
            assert_eq!(out.status.code(), Some(0), "{at}: {ev}: {}", text(&out));
        }
        assert!(e.current().ends_with(&format!("-{dep}")), "{at}");
        let (code, body) = e.web.get("/");
        assert!(
            code == 200 && body.contains(&format!("release={tag}")),
            "{at}: nginx started again and php-fpm serves the new release: {code} {body}"
        );
        assert_eq!(e.ready(), 200, "{at}");
        let st = e.status();
        assert_eq!(st["last_deployment"]["status"], "succeeded", "{at}: {st}");
        assert_eq!(
            st["last_deployment"]["previous_release"],
            before.as_str(),
            "{at}: the release left is recorded: {st}"
        );
    }
}

/// Issue 11 items 4 and 5 for `bgagent rollback`: the daemon killed (SIGKILL) at each step
/// boundary of a rollback, restarted, and the rollback repeated with `--from` (the release it
/// meant to leave). A crash after the switch made the repeat answer "already rolled back;
/// nothing to do" without the php-fpm reload the first attempt never reached; a crash
/// between the switch and its record made the repeat refuse ("something else switched
/// it"). The repeat now records the switch if needed and reloads; the node serves the
/// rollback target, ready.
#[test]
fn rollback_killed_at_each_step_boundary_then_repeated_leaves_the_node_right() {
    let mut e = Env::new("");
    e.revision("d-1", "one", false);
    all_ok(&e.deploy("d-1", &ALL[1..]));
    e.revision("d-2", "two", false);
    all_ok(&e.deploy("d-2", &ALL));
    let tag_of = |e: &Env, id: &str| {
        std::fs::read_to_string(e.p(&format!("app/releases/{id}/RELEASE_ID"))).unwrap()
    };
    for at in [
        "rollback:registered",
        "switch:unrecorded",
        "rollback:switched",
        "rollback:reloaded",
    ] {
        let leaving = e.current();
        let target = e.status()["rollback_target"]
            .as_str()
            .unwrap_or_else(|| panic!("{at}: no rollback target"))
            .to_string();
        e.start_daemon_pausing_at(at);
        let first = e
            .cli(&["rollback", "--from", &leaving])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        e.crash_at(at);
        let out = first.wait_with_output().unwrap();
        assert_ne!(out.status.code(), Some(0), "{at}: {}", text(&out));
        e.daemon.start();
        let out = e.cli(&["rollback", "--from", &leaving]).output().unwrap();
        let t = text(&out);
        assert_eq!(out.status.code(), Some(0), "{at}: repeat: {t}");
        assert!(
            t.contains("reloaded php-fpm"),
            "{at}: the repeat reloads: {t}"
        );
        assert_eq!(e.current(), target, "{at}: {t}");
        let (code, body) = e.web.get("/");
        let tag = tag_of(&e, &target);
        assert!(
            code == 200 && body.contains(&format!("release={tag}")),
            "{at}: {code} {body}"
        );
        assert_eq!(e.ready(), 200, "{at}");
        let st = e.status();
        assert_eq!(st["last_switch"]["reason"], "rollback", "{at}: {st}");
        assert_eq!(st["last_switch"]["to"], target.as_str(), "{at}: {st}");
    }
}
