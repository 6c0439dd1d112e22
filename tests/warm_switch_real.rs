//! Warm switches (the default `opcache.switch: auto` with a `fastcgi` address) through the daemon and `bgagent hook`, against
//! Debian's real php-fpm 8.2 and nginx started privately: the new release is precompiled into
//! the pool's opcache before the rename, php-fpm is not reloaded when opcache has room for
//! both releases, is reloaded (before the switch) when memory is short, and a pool that does
//! not answer FastCGI takes today's path (switch, then reload) with the reason in the log.
//! Also: the snippet directory cannot be reached over HTTP through the documented nginx
//! config.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use bgagent::opcache::{Addr, OpcacheConfig, Pool};
use support::text;

/// ApplicationStop to AfterAllowTraffic.
const ALL: &[&str] = support::IN_PLACE.split_at(2).1;

struct Env {
    /// First: stopped before its directory and the web server go.
    daemon: support::Daemon,
    dir: tempfile::TempDir,
    web: support::Web,
    classes: usize,
    bulk: usize,
}

impl Env {
    /// `fpm`: extra php-fpm ini settings; `fastcgi`: the address given to bgagent (None: the
    /// pool's real socket); `opcache`: extra keys for the opcache section.
    fn new(fpm: &[&str], fastcgi: Option<&str>, opcache: &str, classes: usize, bulk: usize) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let app = dir.path().join("app");
        std::fs::create_dir_all(&app).unwrap();
        let snippets = dir.path().join("fcgi");
        let restrict = format!("opcache.restrict_api={}", snippets.display());
        let mut args = vec!["-d", &restrict, "-d", "opcache.file_update_protection=0"];
        for a in fpm {
            args.extend(["-d", a]);
        }
        let web = support::Web::start_with(&app, &args);
        let w = web.dir.path();
        let nginx = support::require("nginx");
        let fastcgi = fastcgi
            .map(String::from)
            .unwrap_or_else(|| format!("unix:{}", web.fpm_socket().display()));
        let cfg = format!(
            r#"app_root: app
state_dir: state
socket: {{ path: run/bgagent.sock, group: null }}
codedeploy: {{ deployment_root: cd-root }}
app: {{ kind: php, name: shop }}
release: {{ keep: 3, shared_paths: [] }}
params: {{ source: none }}
services:
  backend: exec
  list:
    - name: php-fpm
      kind: php-fpm
      test: [{fpm}, -t, -R, -y, {w}/php-fpm.conf]
      reload: [kill, -USR2, "{{pid}}"]
      pid_file: {w}/run/php-fpm.pid
      config_file: {w}/php-fpm.conf
      fastcgi: "{fastcgi}"
    - name: nginx
      kind: nginx
      test: [{nginx}, -t, -q, -p, {w}, -c, {w}/nginx.conf, -e, {w}/logs/nginx.err]
      reload: [{nginx}, -p, {w}, -c, {w}/nginx.conf, -e, {w}/logs/nginx.err, -s, reload]
health:
  checks:
    - name: app
      http: {{ url: "http://127.0.0.1:{wp}/health.php", body_contains: OK }}
  period: 100ms
  success_threshold: 2
  failure_threshold: 3
  startup_budget: 1s
  deadline: 20s
readiness: {{ listen: "127.0.0.1:{rp}" }}
opcache:
  snippet_dir: {snip}
  timeout: 20s
  min_free_keys: 100
{opcache}
"#,
            fpm = web.fpm_bin.display(),
            nginx = nginx.display(),
            w = w.display(),
            wp = web.port,
            rp = support::free_port(),
            snip = snippets.display(),
        );
        std::fs::write(dir.path().join("bgagent.yaml"), cfg).unwrap();
        let mut e = Env {
            daemon: support::Daemon::new(dir.path()),
            dir,
            web,
            classes,
            bulk,
        };
        e.daemon.start();
        e
    }

    fn p(&self, s: &str) -> PathBuf {
        self.dir.path().join(s)
    }

    fn hook(&self, event: &str, dep: &str) -> Output {
        support::hook_command(&self.p("bgagent.yaml"), event, dep, "g-1")
            .output()
            .unwrap()
    }

    /// A revision of the autoloaded app, then `events` through the hook; every one must pass.
    fn deploy(&self, dep: &str, id: &str, events: &[&str]) -> String {
        let root = self.p(&format!("cd-root/g-1/{dep}/deployment-archive"));
        support::autoload_app(&root, id, self.classes, self.classes, self.bulk);
        let mut log = String::new();
        for ev in events {
            let o = self.hook(ev, dep);
            assert_eq!(o.status.code(), Some(0), "{ev}: {}", text(&o));
            log.push_str(&text(&o));
        }
        log
    }

    fn serve(&self, n: usize, id: &str) {
        for _ in 0..n {
            let (code, body) = self.web.get("/");
            assert_eq!(code, 200, "{body}");
            assert!(body.contains(&format!("release={id}")), "{body}");
        }
    }

    fn release_dir(&self, id_tag: &str) -> PathBuf {
        let dir = self.p("app/releases");
        std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                std::fs::read_to_string(p.join("RELEASE_ID"))
                    .ok()
                    .as_deref()
                    == Some(id_tag)
            })
            .unwrap_or_else(|| panic!("no release {id_tag} under {}", dir.display()))
    }

    fn pool(&self) -> Pool {
        let cfg = OpcacheConfig {
            snippet_dir: self.p("fcgi"),
            timeout: Duration::from_secs(20),
            ..Default::default()
        };
        Pool::new(Addr::Unix(self.web.fpm_socket()), &cfg)
    }

    /// Cached scripts under `root`: (count, hits on them).
    fn cached(&self, root: &Path) -> (usize, u64) {
        let s = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(self.pool().status(true))
            .unwrap();
        let mine: Vec<_> = s
            .scripts
            .iter()
            .filter(|c| Path::new(c.path()).starts_with(root))
            .collect();
        (mine.len(), mine.iter().map(|c| c.hits()).sum())
    }

    /// `status` as an operator reads it (both streams).
    fn status_text(&self) -> String {
        text(&support::bgagent(&self.p("bgagent.yaml"), &["status"]))
    }

    fn status_json(&self) -> serde_json::Value {
        let o = support::bgagent(&self.p("bgagent.yaml"), &["status", "--json"]);
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)))
    }
}

fn line_of(log: &str, needle: &str) -> usize {
    log.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with `{needle}` in:\n{log}"))
}

#[test]
fn warm_switch_precompiles_before_the_rename_and_does_not_reload_when_there_is_room() {
    let env = Env::new(&[], None, "", 200, 2);
    env.deploy("d-1", "r1", &ALL[1..]);
    env.serve(5, "r1");
    let r1 = env.release_dir("r1");
    let (r1_cached, _) = env.cached(&r1);
    assert!(r1_cached >= 200, "{r1_cached}");
    let pids = env.web.fpm_pids();
    let log = env.deploy("d-2", "r2", &ALL[..4]);
    let r2 = env.release_dir("r2");
    // Precompiled, then switched, in that order, and no reload.
    let pre = line_of(&log, "precompiled releases/");
    let sw = line_of(&log, "switched current to");
    assert!(pre < sw, "precompile after the switch:\n{log}");
    assert!(
        log.contains("switching without a php-fpm reload: opcache has room"),
        "{log}"
    );
    assert!(!log.contains("reloaded php-fpm"), "{log}");
    assert_eq!(env.web.fpm_pids(), pids, "php-fpm was reloaded:\n{log}");
    // r2's scripts are in opcache and no request has run them: the precompile put them there.
    let (r2_cached, r2_hits) = env.cached(&r2);
    assert_eq!(r2_cached, r1_cached, "{log}");
    assert_eq!(r2_hits, 0);
    env.serve(3, "r2");
    let log = env.deploy("d-2", "r2", &ALL[4..]);
    // After ready, r1 leaves opcache.
    assert_eq!(env.cached(&r1).0, 0, "{log}");
    assert!(log.contains("invalidated"), "{log}");
    let st = env.status_json();
    let rec = &st["opcache"]["php-fpm"];
    assert_eq!(rec["last_switch"]["plan"], "warm", "{st:#}");
    assert_eq!(rec["last_switch"]["reloaded"], serde_json::Value::Null);
    assert_eq!(
        rec["last_switch"]["precompile"]["compiled"].as_u64(),
        Some(r1_cached as u64)
    );
    let r2_id = r2.file_name().unwrap().to_str().unwrap();
    assert!(
        rec["snapshot"]["releases"][r2_id]["scripts"].as_u64() >= Some(r1_cached as u64),
        "{st:#}"
    );
    assert!(rec["snapshot"]["max_cached_keys"].as_u64() > Some(0));
    let t = env.status_text();
    assert!(
        t.contains("opcache php-fpm") && t.contains("hit rate"),
        "{t}"
    );
    assert!(t.contains(&format!("{r2_id}: ")), "{t}");
}

#[test]
fn a_reload_happens_before_the_switch_when_opcache_memory_is_short() {
    // 8 MiB of opcache (the least php-fpm takes); a release of ~3.5 MiB in it (of about 5 MiB usable) leaves no room
    // for a second copy.
    let env = Env::new(
        &[
            "opcache.memory_consumption=8",
            "opcache.interned_strings_buffer=1",
        ],
        None,
        "  min_free_memory: 524288\n",
        220,
        12,
    );
    env.deploy("d-1", "r1", &ALL[1..]);
    env.serve(3, "r1");
    let r1 = env.release_dir("r1");
    let (r1_cached, _) = env.cached(&r1);
    assert!(r1_cached >= 220, "{r1_cached}");
    let (master, workers) = env.web.fpm_pids();
    let log = env.deploy("d-2", "r2", &ALL[..4]);
    assert!(
        log.contains("reloading php-fpm before the switch (opcache lacks room for both releases"),
        "{log}"
    );
    let rl = line_of(&log, "reloaded php-fpm");
    let pre = line_of(&log, "precompiled releases/");
    let sw = line_of(&log, "switched current to");
    assert!(rl < pre && pre < sw, "{log}");
    let (master2, workers2) = env.web.fpm_pids();
    assert!(
        master2 != master || workers2.iter().all(|w| !workers.contains(w)),
        "php-fpm was not reloaded"
    );
    // The fresh opcache holds r2 (precompiled after the reload), not r1.
    let r2 = env.release_dir("r2");
    assert_eq!(env.cached(&r2).0, r1_cached, "{log}");
    assert_eq!(env.cached(&r1).0, 0);
    assert_eq!(
        env.status_json()["opcache"]["php-fpm"]["last_switch"]["reloaded"],
        "before_switch"
    );
    env.serve(2, "r2");
}

#[test]
fn a_pool_that_does_not_answer_fastcgi_takes_the_reload_path_and_says_why() {
    let d = tempfile::tempdir().unwrap();
    let nowhere = format!("unix:{}", d.path().join("no-such.sock").display());
    let env = Env::new(&[], Some(&nowhere), "", 20, 1);
    env.deploy("d-1", "r1", &ALL[1..]);
    let (master, workers) = env.web.fpm_pids();
    let log = env.deploy("d-2", "r2", &ALL);
    assert!(
        log.contains("switch, then reload php-fpm: the pool's opcache could not be read (cannot connect to php-fpm at unix:"),
        "{log}"
    );
    assert!(log.contains("no-such.sock"), "{log}");
    let sw = line_of(&log, "switched current to");
    let rl = line_of(&log, "reloaded php-fpm");
    assert!(sw < rl, "{log}");
    let (master2, workers2) = env.web.fpm_pids();
    assert!(master2 != master || workers2.iter().all(|w| !workers.contains(w)));
    let st = env.status_json();
    assert_eq!(
        st["opcache"]["php-fpm"]["last_switch"]["plan"],
        "reload_after_switch"
    );
    env.serve(2, "r2");
}

#[test]
fn the_snippet_dir_cannot_be_reached_over_http_through_the_documented_nginx_config() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let app = d.join("app");
    let rel = app.join("releases/r1");
    support::autoload_app(&rel, "r1", 5, 5, 1);
    std::os::unix::fs::symlink("releases/r1", app.join("current")).unwrap();
    // The snippet directory bgagent would write to, filled by a status call; with the pool
    // reachable, the snippet answers over FastCGI (the positive control).
    let web = support::Web::start(&app);
    let snippets = d.join("run/bgagent-fcgi");
    let cfg = OpcacheConfig {
        snippet_dir: snippets.clone(),
        ..Default::default()
    };
    let pool = Pool::new(Addr::Unix(web.fpm_socket()), &cfg);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    assert!(rt.block_on(pool.status(false)).is_ok());
    // nginx with the documented server block, pointed at this app root and pool.
    let port = support::free_port();
    let doc = std::fs::read_to_string(support::repo().join("docs/nginx-site.conf")).unwrap();
    let site = doc
        .replace("listen 80;", &format!("listen 127.0.0.1:{port};"))
        .replace("/var/www/magento", &app.display().to_string())
        .replace(
            "unix:/run/php/php8.2-fpm.sock",
            &format!("unix:{}", web.fpm_socket().display()),
        );
    let nd = d.join("nginx");
    for s in ["logs", "tmp", "run"] {
        std::fs::create_dir_all(nd.join(s)).unwrap();
    }
    std::fs::write(
        nd.join("nginx.conf"),
        format!(
            "user root; worker_processes 1; pid {n}/run/nginx.pid; error_log {n}/logs/nginx.err warn;\n\
             events {{ worker_connections 64; }}\n\
             http {{ access_log off; client_body_temp_path {n}/tmp/body; proxy_temp_path {n}/tmp/proxy;\n\
             fastcgi_temp_path {n}/tmp/fcgi; uwsgi_temp_path {n}/tmp/uwsgi; scgi_temp_path {n}/tmp/scgi;\n{site}\n}}\n",
            n = nd.display()
        ),
    )
    .unwrap();
    let st = Command::new(support::require("nginx"))
        .arg("-p")
        .arg(&nd)
        .arg("-c")
        .arg(nd.join("nginx.conf"))
        .arg("-e")
        .arg(nd.join("logs/nginx.err"))
        .status()
        .unwrap();
    assert!(st.success());
    struct Stop(PathBuf);
    impl Drop for Stop {
        fn drop(&mut self) {
            if let Ok(p) = std::fs::read_to_string(&self.0) {
                let _ = Command::new("kill").args(["-TERM", p.trim()]).status();
            }
        }
    }
    let _stop = Stop(nd.join("run/nginx.pid"));
    let mut t0 = 0;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() && t0 < 200 {
        std::thread::sleep(Duration::from_millis(25));
        t0 += 1;
    }
    // The app itself is served (the config works).
    let (code, body) = support::http_get(port, "/");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("release=r1"), "{body}");
    let snip = snippets.display().to_string();
    let rel_up = format!("/../../../..{snip}");
    let name = "bgagent-opcache-status.php";
    for path in [
        format!("{snip}/{name}"),
        format!("/{name}"),
        format!("{rel_up}/{name}"),
        format!("/%2e%2e/%2e%2e/%2e%2e/%2e%2e{}/{name}", snip),
        format!("/index.php/../../../../..{snip}/{name}"),
        format!("/index.php{snip}/{name}"),
        format!("//{}/{name}", snip.trim_start_matches('/')),
    ] {
        let (code, body) = support::http_get(port, &path);
        assert!(
            !body.contains("opcache") && !body.contains("\"ok\""),
            "{path} reached a snippet: {code} {body}"
        );
    }
}

#[test]
fn wasted_memory_past_the_threshold_schedules_a_reload_in_the_next_deploys_pre_switch_phase() {
    let env = Env::new(&[], None, "  reclaim_wasted_percent: 0.5\n", 200, 2);
    env.deploy("d-1", "r1", &ALL[1..]);
    env.serve(3, "r1");
    // d-2 switches warm; after ready r1's scripts are invalidated: wasted memory grows past
    // 0.5% and a reclaim is noted for the next deploy.
    let log = env.deploy("d-2", "r2", &ALL);
    assert!(log.contains("switching without a php-fpm reload"), "{log}");
    assert!(log.contains("a reclaiming reload is due"), "{log}");
    let st = env.status_json();
    let due = st["opcache"]["php-fpm"]["reclaim_due"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(due.contains("wasted opcache memory"), "{st:#}");
    assert!(st["opcache"]["php-fpm"]["snapshot"]["wasted_memory"].as_u64() > Some(0));
    env.serve(3, "r2");
    let (master, workers) = env.web.fpm_pids();
    // d-3: reload before the switch, precompile into the fresh opcache, switch.
    let log = env.deploy("d-3", "r3", &ALL[..4]);
    assert!(
        log.contains(
            "reloading php-fpm before the switch (a reclaim is due: wasted opcache memory"
        ),
        "{log}"
    );
    let rl = line_of(&log, "reloaded php-fpm");
    let pre = line_of(&log, "precompiled releases/");
    let sw = line_of(&log, "switched current to");
    assert!(rl < pre && pre < sw, "{log}");
    let (master2, workers2) = env.web.fpm_pids();
    assert!(master2 != master || workers2.iter().all(|w| !workers.contains(w)));
    let st = env.status_json();
    let rec = &st["opcache"]["php-fpm"];
    assert_eq!(rec["last_switch"]["reloaded"], "before_switch", "{st:#}");
    assert_eq!(rec["reclaim_due"], serde_json::Value::Null, "{st:#}");
    assert_eq!(rec["snapshot"]["wasted_memory"].as_u64(), Some(0), "{st:#}");
    let r3 = env.release_dir("r3");
    assert!(env.cached(&r3).0 >= 200);
    env.serve(2, "r3");
}

#[test]
fn a_due_reclaim_with_a_maintenance_window_reloads_in_the_window_and_precompiles_the_current_release()
 {
    let env = Env::new(
        &[],
        None,
        "  reclaim_wasted_percent: 0.5\n  reclaim_at: window\n  reclaim_window: \"00:00-24:00\"\n",
        200,
        2,
    );
    env.deploy("d-1", "r1", &ALL[1..]);
    env.serve(3, "r1");
    let log = env.deploy("d-2", "r2", &ALL);
    assert!(log.contains("switching without a php-fpm reload"), "{log}");
    assert!(
        log.contains("a reclaiming reload is due, in the maintenance window"),
        "{log}"
    );
    let (master, workers) = env.web.fpm_pids();
    // The daemon looks every 30 s; the window is all day.
    let mut st = env.status_json();
    for _ in 0..100 {
        if st["opcache"]["php-fpm"]["reclaim_due"].is_null() {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
        st = env.status_json();
    }
    assert!(st["opcache"]["php-fpm"]["reclaim_due"].is_null(), "{st:#}");
    let daemon_log = std::fs::read_to_string(env.p("daemon.log")).unwrap();
    assert!(
        daemon_log.contains("reclaiming opcache in the maintenance window"),
        "{daemon_log}"
    );
    let (master2, workers2) = env.web.fpm_pids();
    assert!(master2 != master || workers2.iter().all(|w| !workers.contains(w)));
    // The fresh opcache holds the current release's hot set, compiled before any request.
    let r2 = env.release_dir("r2");
    let (n, _) = env.cached(&r2);
    assert!(n >= 200, "{n}\n{daemon_log}");
    // (the daemon's health monitor requests health.php meanwhile; no request loads a class)
    assert_eq!(env.cached(&r2.join("vendor")).1, 0);
    assert_eq!(env.cached(&env.release_dir("r1")).0, 0);
    assert_eq!(
        st["opcache"]["php-fpm"]["snapshot"]["wasted_memory"].as_u64(),
        Some(0),
        "{st:#}"
    );
    env.serve(2, "r2");
}

#[test]
fn status_shows_the_pools_opcache_as_the_daemon_reads_it_between_deploys() {
    let env = Env::new(&[], None, "", 200, 1);
    env.deploy("d-1", "r1", &ALL[1..]);
    let r1 = env.release_dir("r1");
    let id = r1.file_name().unwrap().to_str().unwrap().to_string();
    let before = env.status_json()["opcache"]["php-fpm"]["snapshot"].clone();
    // Requests load the classes; no deploy runs; the daemon reads the pool every 30 s.
    env.serve(20, "r1");
    let mut snap = before.clone();
    for _ in 0..90 {
        snap = env.status_json()["opcache"]["php-fpm"]["snapshot"].clone();
        if snap["at"] != before["at"] && snap["releases"][&id]["scripts"].as_u64() >= Some(200) {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(
        snap["releases"][&id]["scripts"].as_u64() >= Some(200),
        "before: {before:#}\nafter: {snap:#}"
    );
    assert!(snap["hit_rate"].as_f64() > Some(50.0), "{snap:#}");
    assert!(
        snap["used_memory"].as_u64() > before["used_memory"].as_u64(),
        "{snap:#}"
    );
    let t = env.status_text();
    assert!(t.contains(&format!("{id}: ")) && t.contains("keys "), "{t}");
}
