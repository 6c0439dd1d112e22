//! The drain behind a real load balancer (issue 11 item 10): HAProxy in front of this node
//! (nginx + php-fpm, bgagent's /ready as the health check) and a peer that keeps serving,
//! a bounded load of 200 requests/s through HAProxy, and CodeDeploy's in-place order with a
//! load balancer. With the built-in drain defaults (which the packaged config states) and
//! php-fpm stopped by the drain the way systemd stops Debian's php8.2-fpm (SIGTERM: workers
//! end at once), no request may fail.

mod support;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{IN_PLACE, text};

/// The app: every request takes 40 ms (so requests are in flight whenever the load balancer
/// changes its mind) and says which release served it.
const INDEX_PHP: &str = "<?php\nusleep(40000);\nheader('Content-Type: text/plain');\necho 'release=' . trim((string) @file_get_contents(__DIR__ . '/../RELEASE_ID')) . \"\\n\";\n";

struct Node {
    /// First: stopped before its directory and the web server go.
    daemon: support::Daemon,
    dir: tempfile::TempDir,
    web: support::Web,
    ready_port: u16,
}

impl Node {
    /// `drain`: the config's `drain:` section (`{wp}`: this node's nginx port), or "" for
    /// the built-in defaults.
    fn start(drain: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let app = dir.path().join("app");
        std::fs::create_dir_all(&app).unwrap();
        let web = support::Web::start(&app);
        let w = web.dir.path().display().to_string();
        let fpm = web.fpm_bin.display().to_string();
        let nginx = support::require("nginx").display().to_string();
        let ready_port = support::free_port();
        let status_port = support::free_port();
        let cfg = format!(
            r#"app_root: app
state_dir: state
socket: {{ path: run/bgagent.sock, group: null }}
codedeploy: {{ deployment_root: cd-root }}
app: {{ kind: php, name: shop }}
release: {{ keep: 3, shared_paths: [] }}
services:
  backend: exec
  list:
    - name: php-fpm
      kind: php-fpm
      test: [{fpm}, -t, -R, -y, {w}/php-fpm.conf]
      reload: [kill, -USR2, "{{pid}}"]
      stop_on_drain: true
      stop: [kill, -TERM, "{{pid}}"]
      start: [{fpm}, -R, -y, {w}/php-fpm.conf]
      pid_file: {w}/run/php-fpm.pid
      config_file: {w}/php-fpm.conf
    - name: nginx
      kind: nginx
      test: [{nginx}, -t, -q, -p, {w}, -c, {w}/nginx.conf, -e, {w}/logs/nginx.err]
      reload: [{nginx}, -p, {w}, -c, {w}/nginx.conf, -e, {w}/logs/nginx.err, -s, reload]
health:
  checks:
    - name: app
      http: {{ url: "http://127.0.0.1:{wp}/health.php", body_contains: OK }}
  period: 100ms
  ready_period: 100ms
  success_threshold: 2
  deadline: 20s
readiness: {{ listen: "127.0.0.1:{ready_port}", status_listen: "127.0.0.1:{status_port}" }}
{drain}
"#,
            wp = web.port,
            drain = drain.replace("{wp}", &web.port.to_string()),
        );
        std::fs::write(dir.path().join("bgagent.yaml"), cfg).unwrap();
        let mut n = Node {
            daemon: support::Daemon::new(dir.path()),
            dir,
            web,
            ready_port,
        };
        n.daemon.start();
        n
    }

    fn p(&self, s: &str) -> PathBuf {
        self.dir.path().join(s)
    }

    fn revision(&self, dep: &str, id: &str) {
        let root = self.p(&format!("cd-root/g-1/{dep}/deployment-archive"));
        std::fs::create_dir_all(root.join("pub")).unwrap();
        std::fs::write(root.join("pub/index.php"), INDEX_PHP).unwrap();
        std::fs::write(root.join("pub/health.php"), "<?php echo \"OK\\n\";\n").unwrap();
        std::fs::write(root.join("RELEASE_ID"), id).unwrap();
    }

    /// Runs one hook; a hook still running after `bound` is killed and fails the test (a
    /// bound on a hang, not a speed claim).
    fn hook_within(&self, event: &str, dep: &str, bound: Duration) -> Output {
        let child = support::hook_command(&self.p("bgagent.yaml"), event, dep, "g-1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        let killer = std::thread::spawn(move || {
            let t0 = Instant::now();
            while !d.load(Ordering::SeqCst) {
                if t0.elapsed() > bound {
                    let _ = Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .status();
                    return true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            false
        });
        let out = child.wait_with_output().unwrap();
        done.store(true, Ordering::SeqCst);
        let killed = killer.join().unwrap();
        assert!(
            !killed,
            "{event} was still running after {bound:?}: {}\n{}",
            text(&out),
            std::fs::read_to_string(self.p("daemon.log")).unwrap_or_default()
        );
        out
    }

    fn hook(&self, event: &str, dep: &str) -> Output {
        self.hook_within(event, dep, Duration::from_secs(150))
    }

    fn ready(&self) -> u16 {
        support::http_get(self.ready_port, "/ready").0
    }
}

fn ok(o: &Output) -> String {
    assert_eq!(o.status.code(), Some(0), "{}", text(o));
    text(o)
}

/// `rate` requests/s through `port` from 8 threads until `stop` (or `max` requests, or
/// 120 s): every answer's status and body.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    results: Arc<Mutex<Vec<(u16, String)>>>,
}

impl Load {
    fn start(port: u16, rate: u32, max: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let results = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..8)
            .map(|i| {
                let stop = stop.clone();
                let results = results.clone();
                let gap = Duration::from_secs_f64(8.0 / rate as f64);
                std::thread::spawn(move || {
                    let t0 = Instant::now();
                    let mut next = t0 + gap.mul_f64(i as f64 / 8.0);
                    while !stop.load(Ordering::SeqCst)
                        && t0.elapsed() < Duration::from_secs(120)
                        && results.lock().unwrap().len() < max
                    {
                        let now = Instant::now();
                        if next > now {
                            std::thread::sleep(next - now);
                        }
                        next += gap;
                        let r = support::http_get(port, "/");
                        results.lock().unwrap().push(r);
                    }
                })
            })
            .collect();
        Load {
            stop,
            threads,
            results,
        }
    }

    fn count(&self) -> usize {
        self.results.lock().unwrap().len()
    }

    fn finish(self) -> Vec<(u16, String)> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().unwrap();
        }
        Arc::try_unwrap(self.results).unwrap().into_inner().unwrap()
    }
}

/// The packaged `drain:` keys (whatever packaging/bgagent.yaml sets) with stub_status at
/// this node's nginx (`{wp}`) instead of port 80.
fn packaged_drain() -> String {
    let packaged = std::fs::read_to_string(support::repo().join("packaging/bgagent.yaml")).unwrap();
    let mut out = String::from("drain:\n");
    let mut inside = false;
    for line in packaged.lines() {
        if line.starts_with("drain:") {
            inside = true;
            continue;
        }
        if inside {
            if !line.starts_with(' ') {
                break;
            }
            if line.trim_start().starts_with('#') {
                continue;
            }
            out.push_str(
                &line
                    .split(" #")
                    .next()
                    .unwrap()
                    .replace("http://127.0.0.1/", "http://127.0.0.1:{wp}/"),
            );
            out.push('\n');
        }
    }
    assert!(
        out.contains("active_requests_url: http://127.0.0.1:{wp}/nginx_status"),
        "the packaged config reads stub_status at http://127.0.0.1/nginx_status: {out}"
    );
    out
}

/// Issue 11 item 10: `drain.deregistration_delay` defaulted to 0, so with `stop_on_drain`
/// behind HAProxy the drain stopped php-fpm while HAProxy still sent requests (29 of 5608
/// failed). Now the drain ends when HAProxy's probes were answered 503 `unhealthy_threshold`
/// times and stub_status shows no request in flight: through a whole deployment under
/// 200 requests/s, not one request fails.
#[test]
fn drain_with_stop_on_drain_behind_haproxy_fails_no_request() {
    let n = Node::start(&packaged_drain());
    // a peer that keeps serving while this node is out (the rest of the fleet)
    let peer_root = tempfile::tempdir().unwrap();
    let peer = support::Web::start(peer_root.path());
    let peer_release = peer_root.path().join("releases/peer");
    std::fs::create_dir_all(peer_release.join("pub")).unwrap();
    std::fs::write(peer_release.join("pub/index.php"), INDEX_PHP).unwrap();
    std::fs::write(peer_release.join("RELEASE_ID"), "peer").unwrap();
    std::os::unix::fs::symlink(&peer_release, peer_root.path().join("current")).unwrap();
    let lb = support::Pool::start(
        &[
            ("node", n.web.port, n.ready_port),
            ("peer", peer.port, peer.port),
        ],
        // an ALB target group's default unhealthy threshold (HAProxy's fall), probing fast
        "inter 100ms fall 2 rise 2",
        true,
    );

    n.revision("d-1", "one");
    for ev in &IN_PLACE[2..] {
        ok(&n.hook(ev, "d-1"));
    }
    support::wait_until(10, "HAProxy should see both servers UP", || {
        lb.stat("node").status == "UP" && lb.stat("peer").status == "UP"
    });

    let load = Load::start(lb.port, 200, 40_000);
    support::wait_until(10, "the load should be running", || load.count() > 200);
    n.revision("d-2", "two");
    let mut drain_out = String::new();
    for ev in IN_PLACE {
        let out = ok(&n.hook(ev, "d-2"));
        if ev == "BeforeBlockTraffic" {
            drain_out = out;
        }
    }
    support::wait_until(10, "HAProxy should take the node in again", || {
        lb.stat("node").status == "UP"
    });
    // some more requests with the node back in
    let at = load.count();
    let t0 = Instant::now();
    while load.count() < at + 400 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let results = load.finish();
    let failed: Vec<&(u16, String)> = results
        .iter()
        .filter(|(code, body)| *code != 200 || !body.contains("release="))
        .collect();
    let served_two = results
        .iter()
        .filter(|r| r.1.contains("release=two"))
        .count();
    let served_one = results
        .iter()
        .filter(|r| r.1.contains("release=one"))
        .count();
    eprintln!(
        "{} requests through HAProxy, {} failed, {served_one} x release one, {served_two} x release two",
        results.len(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during the drain and deployment, e.g. {:?}\nBeforeBlockTraffic said: {drain_out}",
        failed.len(),
        results.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(
        served_one > 0 && served_two > 0,
        "the node served before and after the deployment ({served_one} x one, {served_two} x two of {})",
        results.len()
    );
    assert!(
        drain_out.contains("probes answered 503") && drain_out.contains("from 127.0.0.1"),
        "the drain names the probes that ended it: {drain_out}"
    );
    assert!(
        drain_out.contains("0 requests in flight"),
        "the drain names the in-flight evidence: {drain_out}"
    );
    assert!(
        !drain_out.contains("upper bound"),
        "the drain ended on evidence, not on its bound: {drain_out}"
    );
    assert_eq!(n.ready(), 200);
}

/// Issue 11 item 10: a node no load balancer probes (no LB in front, e.g. a single
/// instance) drains at once: nothing waits for probes that never come, even with an upper
/// bound of an hour.
#[test]
fn drain_of_a_node_nobody_probes_does_not_wait_for_the_bound() {
    let n = Node::start("drain: { deregistration_delay: 1h }");
    n.revision("d-1", "one");
    for ev in &IN_PLACE[2..] {
        ok(&n.hook(ev, "d-1"));
    }
    // an operator's curl of /ready is not a load balancer
    assert_eq!(n.ready(), 200);
    let out = ok(&n.hook_within("BeforeBlockTraffic", "d-2", Duration::from_secs(60)));
    assert!(
        out.contains("no load balancer was probing /ready"),
        "the drain says why it did not wait: {out}"
    );
    assert!(out.contains("stopped php-fpm"), "{out}");
    assert_eq!(n.ready(), 503);
}

/// With `stop_on_drain` on php-fpm, ApplicationStart reloaded php-fpm before starting it
/// again: the reload of a stopped pool failed ("cannot read pid file"; with systemd,
/// `systemctl reload` of an inactive unit fails the same way), so every deployment failed
/// at ApplicationStart. The services the drain stopped are now started first, and one
/// just started is not reloaded.
#[test]
fn php_fpm_stopped_by_the_drain_is_started_not_reloaded_at_application_start() {
    let n = Node::start("");
    for (dep, id) in [("d-1", "one"), ("d-2", "two")] {
        n.revision(dep, id);
        for ev in &IN_PLACE[2..] {
            ok(&n.hook(ev, dep));
        }
        assert!(n.web.get("/").1.contains(&format!("release={id}")));
    }
}
