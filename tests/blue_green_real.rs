//! Blue/green, end to end, here (issue 11): two fleets of one node each, `blue` and `green`
//! (each its own bgagent daemon on the packaged config, app root, php-fpm pool and nginx on
//! loopback ports) behind HAProxy standing in for the ALB: one target group, each target
//! health-checked on its node's `/ready`, registered and deregistered through HAProxy's admin
//! socket as CodeDeploy's AllowTraffic and BlockTraffic do. The events run in CodeDeploy's
//! exact orders through `bgagent hook`, with the environment the CodeDeploy agent gives a
//! hook (LIFECYCLE_EVENT, DEPLOYMENT_ID, APPLICATION_NAME, DEPLOYMENT_GROUP_NAME,
//! DEPLOYMENT_GROUP_ID, BUNDLE_*), while a bounded constant-rate client sends requests
//! through HAProxy for the whole run and records which node and release answered each.
//!
//! HEAVY: one test, 35-50 s of wall time here (two nodes, HAProxy, 200 requests/s for the
//! 22-32 s the steps take under load; the rest is set-up, the first deployment and tear-down).
//! `bench/bench_blue_green.py` runs the same scenario and plots it.
//!
//! Knobs, for the benchmark (the test's defaults need none): `BGAGENT_BG_RATE` (requests/s,
//! default 200), `BGAGENT_BG_PACKAGED_TIMES=1` (keep the packaged health startup budget
//! instead of shortening it; the drain is the packaged one either way), `BGAGENT_BG_SMOKE=1`
//! (the blue/green deployment only), `BGAGENT_BG_OUT=DIR` (write requests.csv, ready.csv,
//! events.csv).

mod support;

use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::text;

const BIN: &str = env!("CARGO_BIN_EXE_bgagent");
/// CodeDeploy's environment for every hook: one application and deployment group, both
/// fleets in it (a blue/green deployment group holds the original and the replacement).
const APPLICATION: &str = "magento";
const GROUP_NAME: &str = "prod";
const GROUP_ID: &str = "5f0e2c1a-7d4b-4a3e-9c1d-2b8e6f4a9d10";
/// HAProxy's health check interval on `/ready` (`fall 1`: one 503 takes a target out).
const PROBE: Duration = Duration::from_millis(100);
/// How late past the probe interval HAProxy's verdict may come on this machine: its check
/// timer, the client's and the watcher's threads all wait for one of two shared cores (seen:
/// up to 90 ms of the 100 ms interval used on a quiet run, a little over 100 ms under a load
/// average of 10). A node that keeps serving after its /ready said 503 (a drain the load
/// balancer cannot see) is late by seconds, not by this.
const SCHEDULING: Duration = Duration::from_millis(100);
/// How often the harness itself reads each node's `/ready`.
const WATCH: Duration = Duration::from_millis(10);
/// The harness reads `/ready` from this loopback address, so that the daemon can tell its
/// reads from the load balancer's probes (which come from 127.0.0.1).
const WATCHER_ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

fn env_flag(k: &str) -> bool {
    std::env::var(k).is_ok_and(|v| v == "1")
}

/// The time since the harness started, in seconds: one clock for requests, readiness and
/// events.
#[derive(Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn now(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }
}

// --- One node: nginx + php-fpm + bgagent on the packaged config ------------------------------

struct Node {
    /// First: stopped before the web server goes.
    daemon: Mutex<support::Daemon>,
    name: &'static str,
    dir: PathBuf,
    web: support::Web,
    ready_port: u16,
}

/// Replaces the one line of `cfg` that starts with `prefix` (after `indent`), or fails naming
/// it: the packaged config changed shape and the harness must follow.
fn replace_line(cfg: &str, prefix: &str, with: &str) -> String {
    let hits = cfg.lines().filter(|l| l.starts_with(prefix)).count();
    assert_eq!(
        hits, 1,
        "packaging/bgagent.yaml should have exactly one line starting with {prefix:?}:\n{cfg}"
    );
    cfg.lines()
        .map(|l| if l.starts_with(prefix) { with } else { l })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// packaging/bgagent.yaml with the node's paths and ports, and the exec backend for the
/// private nginx and php-fpm (no systemd on this host). Nothing else changes, except, unless
/// `packaged_times`, the health checks' startup budget (30 s: the test's wall time), and
/// `validate.rollback_on_failure`, which the scenario is about.
fn node_config(
    dir: &Path,
    web: &support::Web,
    ready: u16,
    status: u16,
    packaged_times: bool,
) -> String {
    let d = dir.display();
    let w = web.dir.path().display();
    let fpm = web.fpm_bin.display();
    let nginx = support::require("nginx");
    let nginx = nginx.display();
    let mut cfg = std::fs::read_to_string(support::repo().join("packaging/bgagent.yaml")).unwrap();
    cfg = replace_line(&cfg, "app_root: ", &format!("app_root: {d}/app"));
    cfg = replace_line(&cfg, "state_dir: ", &format!("state_dir: {d}/state"));
    cfg = replace_line(&cfg, "  path: ", &format!("  path: {d}/run/bgagent.sock"));
    // The host has no bgagent group (the package creates it): only root talks to the socket.
    cfg = replace_line(&cfg, "  group: bgagent", "  group: null");
    cfg = replace_line(
        &cfg,
        "  deployment_root: ",
        &format!("  deployment_root: {d}/cd-root"),
    );
    cfg = replace_line(&cfg, "  backend: systemd", "  backend: exec");
    cfg = replace_line(
        &cfg,
        "    - { name: php8.2-fpm, kind: php-fpm",
        &format!(
            "    - {{ name: php8.2-fpm, kind: php-fpm, test: [{fpm}, -t, -R, -y, {w}/php-fpm.conf], reload: [kill, -USR2, \"{{pid}}\"], pid_file: {w}/run/php-fpm.pid, config_file: {w}/php-fpm.conf }}"
        ),
    );
    cfg = replace_line(
        &cfg,
        "    - { name: nginx, kind: nginx",
        &format!(
            "    - {{ name: nginx, kind: nginx, test: [{nginx}, -t, -q, -p, {w}, -c, {w}/nginx.conf, -e, {w}/logs/nginx.err], reload: [{nginx}, -p, {w}, -c, {w}/nginx.conf, -e, {w}/logs/nginx.err, -s, reload] }}"
        ),
    );
    cfg = replace_line(
        &cfg,
        "readiness: ",
        &format!(
            "readiness: {{ listen: \"127.0.0.1:{ready}\", status_listen: \"127.0.0.1:{status}\" }}"
        ),
    );
    // Every URL the packaged config gives on the node's own web server (health check, and
    // the drain's stub_status where it has one) is on this node's nginx port.
    assert!(cfg.contains("http://127.0.0.1/health_check.php"), "{cfg}");
    cfg = cfg.replace(
        "http://127.0.0.1/",
        &format!("http://127.0.0.1:{}/", web.port),
    );
    // The packaged drain is used as it is: it ends when HAProxy's probes were answered 503
    // (drain.unhealthy_threshold), not after a fixed delay.
    if !packaged_times {
        cfg = replace_line(&cfg, "health:", "health:\n  startup_budget: 2s");
    }
    cfg.push_str("validate: { rollback_on_failure: true }\n");
    cfg
}

impl Node {
    fn start(base: &Path, name: &'static str, packaged_times: bool) -> Node {
        let dir = base.join(name);
        std::fs::create_dir_all(dir.join("app")).unwrap();
        let web = support::Web::start_node(&dir.join("app"), name);
        let ready_port = support::free_port();
        let cfg = node_config(&dir, &web, ready_port, support::free_port(), packaged_times);
        std::fs::write(dir.join("bgagent.yaml"), cfg).unwrap();
        let check = support::bgagent(&dir.join("bgagent.yaml"), &["config", "check"]);
        assert!(check.status.success(), "{name}: {}", text(&check));
        let mut daemon = support::Daemon::new(&dir);
        daemon.start();
        Node {
            daemon: Mutex::new(daemon),
            name,
            dir,
            web,
            ready_port,
        }
    }

    /// The revision of deployment `dep` where the CodeDeploy agent unpacks it on this node.
    fn revision(&self, dep: &str, release: &str, broken: bool) {
        let root = self
            .dir
            .join(format!("cd-root/{GROUP_ID}/{dep}/deployment-archive"));
        support::magento_revision(&root, release, broken);
    }

    /// `scripts/bgagent-hook` as the CodeDeploy agent runs it: `exec bgagent hook`, the
    /// event in LIFECYCLE_EVENT, the agent's environment.
    fn hook(&self, event: &str, dep: &str) -> Output {
        Command::new(BIN)
            .arg("hook")
            .env("BGAGENT_CONFIG", self.dir.join("bgagent.yaml"))
            .env("LIFECYCLE_EVENT", event)
            .env("DEPLOYMENT_ID", dep)
            .env("APPLICATION_NAME", APPLICATION)
            .env("DEPLOYMENT_GROUP_NAME", GROUP_NAME)
            .env("DEPLOYMENT_GROUP_ID", GROUP_ID)
            .env("BUNDLE_BUCKET", "artifacts")
            .env("BUNDLE_KEY", format!("magento/{dep}.tar"))
            .env("BUNDLE_VERSION", "v1")
            .env("BUNDLE_ETAG", "etag")
            .output()
            .unwrap()
    }

    fn bgagent(&self, args: &[&str]) -> Output {
        support::bgagent(&self.dir.join("bgagent.yaml"), args)
    }

    fn status(&self) -> serde_json::Value {
        let out = self.bgagent(&["status", "--json"]);
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{}: status --json: {e}: {}", self.name, text(&out)))
    }

    /// `/ready`, read from the watcher's address (not the load balancer's).
    fn ready(&self) -> u16 {
        ready_from_watcher(self.ready_port)
    }
}

// --- The load: a bounded constant-rate client through HAProxy --------------------------------

#[derive(Clone, Debug)]
struct Request {
    /// Seconds on the harness clock when the request was sent, and how long it took.
    start: f64,
    took: f64,
    /// HTTP status; 0 when no response came.
    status: u16,
    /// `X-Node` of the response (set by the node's nginx), empty when none.
    node: String,
    /// `release=<id>` of the body, or the error.
    release: String,
}

impl Request {
    fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

fn get(port: u16) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut s = match TcpStream::connect(("127.0.0.1", port)) {
        Ok(s) => s,
        Err(e) => return (0, String::new(), format!("connect: {e}")),
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    if let Err(e) =
        s.write_all(b"GET / HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n")
    {
        return (0, String::new(), format!("write: {e}"));
    }
    let mut buf = Vec::new();
    if let Err(e) = s.read_to_end(&mut buf) {
        return (0, String::new(), format!("read: {e}"));
    }
    let buf = String::from_utf8_lossy(&buf);
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let node = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("x-node")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    // The body may come chunked: the id ends at the first blank.
    let release = match body.find("release=") {
        Some(i) => body[i + 8..]
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string(),
        None => body.trim().chars().take(80).collect(),
    };
    (status, node, release)
}

struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Vec<Request>>>,
}

impl Load {
    /// `rate` requests/s spread over `workers` threads, each request on its own connection;
    /// at most `max` seconds and `rate * max` requests, whatever the harness does.
    fn start(clock: Clock, port: u16, rate: u32, max: Duration) -> Load {
        let workers = 16u32;
        let interval = Duration::from_secs_f64(f64::from(workers) / f64::from(rate));
        let stop = Arc::new(AtomicBool::new(false));
        let per_worker = (u64::from(rate) * max.as_secs()).div_ceil(u64::from(workers));
        let threads = (0..workers)
            .map(|i| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let begin = Instant::now() + interval * i / workers;
                    let mut out = Vec::new();
                    for k in 0..per_worker {
                        let at = begin + interval * k as u32;
                        if stop.load(Ordering::Relaxed) || at.duration_since(begin) > max {
                            break;
                        }
                        if let Some(d) = at.checked_duration_since(Instant::now()) {
                            std::thread::sleep(d);
                        }
                        let start = clock.now();
                        let (status, node, release) = get(port);
                        out.push(Request {
                            start,
                            took: clock.now() - start,
                            status,
                            node,
                            release,
                        });
                    }
                    out
                })
            })
            .collect();
        Load { stop, threads }
    }

    fn finish(self) -> Vec<Request> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all: Vec<Request> = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        all.sort_by(|a, b| a.start.total_cmp(&b.start));
        all
    }
}

// --- Each node's /ready over time, as the harness sees it ------------------------------------

/// `/ready` read from [`WATCHER_ADDR`] (0: nothing answered).
fn ready_from_watcher(port: u16) -> u16 {
    use std::io::{Read, Write};
    let connect = || -> std::io::Result<TcpStream> {
        use rustix::net::{AddressFamily, SocketType, bind, connect, socket};
        let fd = socket(AddressFamily::INET, SocketType::STREAM, None)?;
        bind(&fd, &SocketAddrV4::new(WATCHER_ADDR, 0))?;
        connect(&fd, &SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))?;
        Ok(TcpStream::from(fd))
    };
    let Ok(mut s) = connect() else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.write_all(b"GET /ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

struct Watcher {
    stop: Arc<AtomicBool>,
    threads: Vec<(String, std::thread::JoinHandle<Vec<(f64, u16)>>)>,
}

impl Watcher {
    /// Reads every node's `/ready` every [`WATCH`] and keeps the changes.
    fn start(clock: Clock, nodes: &[(&str, u16)]) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = nodes
            .iter()
            .map(|&(name, port)| {
                let stop = stop.clone();
                let t = std::thread::spawn(move || {
                    let mut changes: Vec<(f64, u16)> = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let t = clock.now();
                        let code = ready_from_watcher(port);
                        if changes.last().is_none_or(|&(_, c)| c != code) {
                            changes.push((t, code));
                        }
                        std::thread::sleep(WATCH);
                    }
                    changes
                });
                (name.to_string(), t)
            })
            .collect();
        Watcher { stop, threads }
    }

    fn finish(self) -> Vec<(String, Vec<(f64, u16)>)> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .map(|(n, t)| (n, t.join().unwrap()))
            .collect()
    }
}

/// Requests a node answered although its `/ready` had said 503 (or nothing) for longer than
/// `grace` when they were sent: (request, how long /ready had been failing).
fn answered_while_not_ready<'a>(
    reqs: &'a [Request],
    ready: &[(String, Vec<(f64, u16)>)],
    grace: f64,
) -> Vec<(&'a Request, f64)> {
    reqs.iter()
        .filter(|r| !r.node.is_empty())
        .filter_map(|r| {
            let (_, changes) = ready.iter().find(|(n, _)| *n == r.node)?;
            // The changes the watcher saw before the request was sent (it sees a change up to
            // WATCH late, which only makes this lenient); if the last one is not 200, since
            // when /ready has not said 200 (503, or nothing while the daemon restarts).
            let before: Vec<_> = changes.iter().filter(|(t, _)| *t <= r.start).collect();
            if before.last()?.1 == 200 {
                return None;
            }
            let since = before.iter().rev().take_while(|(_, c)| *c != 200).last()?.0;
            (r.start - since > grace).then_some((r, r.start - since))
        })
        .collect()
}

// --- The harness: nodes, the load balancer, the record of events -----------------------------

struct Event {
    start: f64,
    end: f64,
    node: String,
    event: String,
    deployment: String,
    exit: i32,
}

struct Harness {
    clock: Clock,
    base: tempfile::TempDir,
    blue: Node,
    green: Node,
    lb: support::Pool,
    events: Mutex<Vec<Event>>,
}

/// What a node must look like after a step.
struct Want<'a> {
    /// `/ready` answers 200 (status: readiness `ready`).
    ready: bool,
    /// status `node.traffic`.
    traffic: &'a str,
    /// The deployment whose release is current.
    current: &'a str,
    /// The last deployment on record and its status.
    last: (&'a str, &'a str),
    /// HAProxy's view of the target: registered or not (`in`/`out`) and its health check
    /// (`UP`/`DOWN`), e.g. `in UP`.
    lb: &'a str,
}

impl Harness {
    fn node(&self, name: &str) -> &Node {
        match name {
            "blue" => &self.blue,
            "green" => &self.green,
            _ => unreachable!(),
        }
    }

    fn mark(&self, start: f64, node: &str, event: &str, dep: &str, exit: i32) {
        self.events.lock().unwrap().push(Event {
            start,
            end: self.clock.now(),
            node: node.to_string(),
            event: event.to_string(),
            deployment: dep.to_string(),
            exit,
        });
    }

    /// Runs `events` of deployment `dep` on `node` in order; each must succeed, and leave the
    /// node ready exactly when CodeDeploy may send it traffic next: after ValidateService and
    /// the traffic-allowing events, and not after any other (in every order here the other
    /// events run on a node that is drained, being drained, or has never served).
    fn hooks(&self, node: &str, dep: &str, events: &[&str]) {
        for ev in events {
            let out = self.hook(node, dep, ev);
            assert_eq!(
                out.status.code(),
                Some(0),
                "{node}: {ev} of {dep}:\n{}",
                text(&out)
            );
            let ready = matches!(
                *ev,
                "ValidateService" | "BeforeAllowTraffic" | "AfterAllowTraffic"
            );
            let n = self.node(node);
            assert_eq!(
                n.ready() == 200,
                ready,
                "{node}: /ready after {ev} of {dep}:\n{}",
                text(&out)
            );
            let st = n.status();
            assert_eq!(
                st["node"]["readiness"]["state"] == "ready",
                ready,
                "{node}: readiness after {ev} of {dep}: {st}"
            );
        }
    }

    fn hook(&self, node: &str, dep: &str, ev: &str) -> Output {
        let t = self.clock.now();
        let out = self.node(node).hook(ev, dep);
        self.mark(t, node, ev, dep, out.status.code().unwrap_or(-1));
        out
    }

    /// AllowTraffic: the target is registered and CodeDeploy waits until the load balancer
    /// sees it healthy.
    fn allow(&self, node: &str, dep: &str) {
        let t = self.clock.now();
        self.lb.register(node, true);
        support::wait_until(
            20,
            &format!("AllowTraffic: HAProxy should see {node} UP"),
            || self.lb.stat(node).status == "UP",
        );
        self.mark(t, node, "AllowTraffic", dep, 0);
    }

    /// BlockTraffic: the target is deregistered (no new requests) and CodeDeploy waits until
    /// the requests it holds are done.
    fn block(&self, node: &str, dep: &str) {
        let t = self.clock.now();
        self.lb.register(node, false);
        support::wait_until(
            20,
            &format!("BlockTraffic: {node} should finish its requests"),
            || self.lb.stat(node).current == 0,
        );
        self.mark(t, node, "BlockTraffic", dep, 0);
    }

    /// CodeDeploy's traffic-allowing events on `node`: BeforeAllowTraffic, AllowTraffic (the
    /// target registered and seen healthy), AfterAllowTraffic.
    fn allow_traffic(&self, node: &str, dep: &str) {
        self.hooks(node, dep, &["BeforeAllowTraffic"]);
        self.allow(node, dep);
        self.hooks(node, dep, &["AfterAllowTraffic"]);
    }

    /// CodeDeploy's traffic-blocking events on `node`: BeforeBlockTraffic, BlockTraffic (the
    /// target deregistered and its requests done), AfterBlockTraffic.
    fn block_traffic(&self, node: &str, dep: &str) {
        self.hooks(node, dep, &["BeforeBlockTraffic"]);
        self.block(node, dep);
        self.hooks(node, dep, &["AfterBlockTraffic"]);
    }

    /// Stops a node's daemon as systemd does (SIGTERM) and starts it again.
    fn restart_daemon(&self, node: &str) {
        self.node(node).daemon.lock().unwrap().restart();
    }

    fn expect(&self, step: &str, node: &str, want: Want) {
        let n = self.node(node);
        let st = n.status();
        let ctx = format!("after {step}, {node}: {st}");
        assert_eq!(n.ready() == 200, want.ready, "/ready {ctx}");
        assert_eq!(
            st["node"]["readiness"]["state"] == "ready",
            want.ready,
            "readiness {ctx}"
        );
        assert_eq!(st["node"]["traffic"], want.traffic, "traffic {ctx}");
        assert_eq!(
            st["current_release"]["deployment_id"], want.current,
            "current release {ctx}"
        );
        assert_eq!(
            st["last_deployment"]["id"], want.last.0,
            "last deployment {ctx}"
        );
        assert_eq!(
            st["last_deployment"]["status"], want.last.1,
            "last deployment's status {ctx}"
        );
        assert_eq!(
            st["warnings"].as_array().map(|w| w.len()),
            Some(0),
            "warnings {ctx}"
        );
        // HAProxy's view follows /ready within a probe interval.
        let lb = || {
            let lb = self.lb.stat(node);
            format!("{} {}", if lb.weight > 0 { "in" } else { "out" }, lb.status)
        };
        let t0 = Instant::now();
        while lb() != want.lb && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(WATCH);
        }
        assert_eq!(lb(), want.lb, "HAProxy's view {ctx}");
    }
}

/// Polls `what` until it holds; fails with `msg` after `secs` (a bound, not a speed claim).
/// The events between the traffic events of a deployment (ApplicationStop, on a node that
/// had a revision before, comes first).
const INSTALL: [&str; 4] = [
    "BeforeInstall",
    "AfterInstall",
    "ApplicationStart",
    "ValidateService",
];

fn write_records(
    out: &Path,
    reqs: &[Request],
    ready: &[(String, Vec<(f64, u16)>)],
    events: &[Event],
) {
    use std::fmt::Write;
    std::fs::create_dir_all(out).unwrap();
    let mut s = String::from("t,took_ms,status,node,release\n");
    for r in reqs {
        let rel = r.release.replace([',', '\n', '\r'], " ");
        writeln!(
            s,
            "{:.4},{:.2},{},{},{rel}",
            r.start,
            r.took * 1000.0,
            r.status,
            r.node
        )
        .unwrap();
    }
    std::fs::write(out.join("requests.csv"), s).unwrap();
    let mut s = String::from("t,node,ready\n");
    for (node, changes) in ready {
        for (t, c) in changes {
            writeln!(s, "{t:.4},{node},{c}").unwrap();
        }
    }
    std::fs::write(out.join("ready.csv"), s).unwrap();
    let mut s = String::from("start,end,node,event,deployment,exit\n");
    for e in events {
        writeln!(
            s,
            "{:.4},{:.4},{},{},{},{}",
            e.start, e.end, e.node, e.event, e.deployment, e.exit
        )
        .unwrap();
    }
    std::fs::write(out.join("events.csv"), s).unwrap();
}

#[test]
fn blue_green_in_codedeploys_orders_under_load_serves_every_request_from_a_ready_node() {
    let packaged_times = env_flag("BGAGENT_BG_PACKAGED_TIMES");
    let smoke = env_flag("BGAGENT_BG_SMOKE");
    let rate: u32 = std::env::var("BGAGENT_BG_RATE")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(200);
    let clock = Clock(Instant::now());
    let base = tempfile::tempdir().unwrap();
    let blue = Node::start(base.path(), "blue", packaged_times);
    let green = Node::start(base.path(), "green", packaged_times);
    let lb = support::Pool::start(
        &[
            ("blue", blue.web.port, blue.ready_port),
            ("green", green.web.port, green.ready_port),
        ],
        &format!("inter {}ms fall 1 rise 1", PROBE.as_millis()),
        false,
    );
    let h = Harness {
        clock,
        base,
        blue,
        green,
        lb,
        events: Mutex::new(Vec::new()),
    };
    let watcher = Watcher::start(
        clock,
        &[("blue", h.blue.ready_port), ("green", h.green.ready_port)],
    );

    // The original fleet's first deployment (no previous revision: CodeDeploy runs neither
    // the block events nor ApplicationStop), before any traffic.
    h.blue.revision("d-BLUE00001", "r1", false);
    h.hooks("blue", "d-BLUE00001", &INSTALL);
    h.allow_traffic("blue", "d-BLUE00001");
    h.expect(
        "the first deployment",
        "blue",
        Want {
            ready: true,
            traffic: "live",
            current: "d-BLUE00001",
            last: ("d-BLUE00001", "succeeded"),
            lb: "in UP",
        },
    );
    let load = Load::start(clock, h.lb.port, rate, Duration::from_secs(600));
    std::thread::sleep(Duration::from_secs(1));

    // 1. Blue/green: the replacement (green, a fresh instance) installs and takes traffic,
    // then the original (blue) is blocked.
    let d = "d-BG0000002";
    h.green.revision(d, "r2", false);
    h.hooks("green", d, &INSTALL);
    h.expect(
        "the replacement's ValidateService",
        "green",
        Want {
            ready: true,
            traffic: "unknown",
            current: d,
            last: (d, "succeeded"),
            lb: "out UP",
        },
    );
    h.allow_traffic("green", d);
    h.block_traffic("blue", d);
    h.expect(
        "blue/green",
        "green",
        Want {
            ready: true,
            traffic: "live",
            current: d,
            last: (d, "succeeded"),
            lb: "in UP",
        },
    );
    h.expect(
        "blue/green",
        "blue",
        Want {
            ready: false,
            traffic: "idle",
            current: "d-BLUE00001",
            last: (d, "succeeded"),
            lb: "out DOWN",
        },
    );

    if !smoke {
        // 2. CodeDeploy's rollback of that deployment after traffic moved, under a new id:
        // the original gets the traffic back without installing anything, the replacement
        // is blocked.
        let r = "d-ROLLBACK3";
        h.allow_traffic("blue", r);
        h.block_traffic("green", r);
        h.expect(
            "the blue/green rollback",
            "blue",
            Want {
                ready: true,
                traffic: "live",
                current: "d-BLUE00001",
                last: (r, "succeeded"),
                lb: "in UP",
            },
        );
        h.expect(
            "the blue/green rollback",
            "green",
            Want {
                ready: false,
                traffic: "idle",
                current: d,
                last: (r, "succeeded"),
                lb: "out DOWN",
            },
        );

        // A reboot or package upgrade of the blocked replacement: its restarted daemon must
        // keep it out (503), not bring the release traffic was moved away from back to ready.
        let t = clock.now();
        h.restart_daemon("green");
        h.mark(t, "green", "daemon restart", r, 0);
        let log = h.green.dir.join("daemon.log");
        support::wait_until(
            30,
            "green's daemon should say its readiness after the restart",
            || {
                std::fs::read_to_string(&log)
                    .is_ok_and(|l| l.contains("readiness after the restart:"))
            },
        );
        h.expect(
            "a daemon restart on the blocked replacement",
            "green",
            Want {
                ready: false,
                traffic: "idle",
                current: d,
                last: (r, "succeeded"),
                lb: "out DOWN",
            },
        );

        // 3. In-place behind the load balancer, one instance at a time over both fleets:
        // green (out of the target group since the rollback: its BlockTraffic finds nothing
        // to deregister), then blue while green serves.
        let d = "d-INPLACE04";
        for node in ["green", "blue"] {
            h.node(node).revision(d, "r4", false);
            h.block_traffic(node, d);
            h.hooks(node, d, &["ApplicationStop"]);
            h.hooks(node, d, &INSTALL);
            h.allow_traffic(node, d);
            h.expect(
                "an in-place deployment",
                node,
                Want {
                    ready: true,
                    traffic: "live",
                    current: d,
                    last: (d, "succeeded"),
                    lb: "in UP",
                },
            );
        }

        // 4. A package upgrade on blue while both fleets serve: its daemon is stopped as
        // systemd stops it and started again. The load balancer must take blue out while
        // /ready does not answer 200, and blue must come back ready on its own (its live
        // release passes its checks), with its record intact.
        let t = clock.now();
        h.restart_daemon("blue");
        h.mark(t, "blue", "daemon restart", d, 0);
        support::wait_until(
            60,
            "blue should be ready again after its daemon restarted",
            || h.blue.ready() == 200,
        );
        support::wait_until(20, "HAProxy should see blue UP again", || {
            h.lb.stat("blue").status == "UP"
        });
        h.expect(
            "a daemon restart",
            "blue",
            Want {
                ready: true,
                traffic: "live",
                current: d,
                last: (d, "succeeded"),
                lb: "in UP",
            },
        );

        // 5. In-place again with a release that fails its health checks: blue's
        // ValidateService fails and, with validate.rollback_on_failure, switches back to the
        // release it replaced; CodeDeploy stops the deployment there, so blue stays out of the
        // target group. The operator then runs `bgagent rollback` and registers it again.
        let d = "d-BROKEN005";
        h.blue.revision(d, "r5", true);
        h.block_traffic("blue", d);
        h.hooks("blue", d, &["ApplicationStop"]);
        h.hooks("blue", d, &INSTALL[..3]);
        let out = h.hook("blue", d, "ValidateService");
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(text(&out).contains("rolled back to"), "{}", text(&out));
        h.expect(
            "a failed ValidateService",
            "blue",
            Want {
                ready: true,
                traffic: "idle",
                current: "d-INPLACE04",
                last: (d, "failed"),
                lb: "out UP",
            },
        );
        let st = h.blue.status();
        let releases = st["releases"].as_array().unwrap();
        let id_of = |dep: &str| {
            releases
                .iter()
                .find(|r| r["deployment_id"] == dep)
                .unwrap_or_else(|| panic!("{st}"))["id"]
                .as_str()
                .unwrap()
                .to_string()
        };
        let (r1, r4) = (id_of("d-BLUE00001"), id_of("d-INPLACE04"));
        assert_eq!(st["rollback_target"], r1.as_str(), "{st}");
        let t = clock.now();
        let out = h.blue.bgagent(&["rollback"]);
        h.mark(t, "blue", "rollback", d, out.status.code().unwrap_or(-1));
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        assert!(
            text(&out).contains(&format!("rolled back from {r4} to {r1}")),
            "{}",
            text(&out)
        );
        let st = h.blue.status();
        assert_eq!(st["last_switch"]["reason"], "rollback", "{st}");
        assert_eq!(st["current_release"]["id"], r1.as_str(), "{st}");
        assert_eq!(h.blue.ready(), 200, "{st}");
        h.allow("blue", d);
        h.expect(
            "the operator's rollback",
            "blue",
            Want {
                ready: true,
                traffic: "idle",
                current: "d-BLUE00001",
                last: (d, "failed"),
                lb: "in UP",
            },
        );
        std::thread::sleep(Duration::from_secs(1));
    }

    let reqs = load.finish();
    let ready = watcher.finish();
    let events = std::mem::take(&mut *h.events.lock().unwrap());
    if let Ok(out) = std::env::var("BGAGENT_BG_OUT") {
        write_records(Path::new(&out), &reqs, &ready, &events);
    }
    let failed: Vec<&Request> = reqs.iter().filter(|r| !r.ok()).collect();
    let span = reqs.last().map_or(0.0, |l| l.start) - reqs.first().map_or(0.0, |f| f.start);
    let by = |n: &str| reqs.iter().filter(|r| r.node == n).count();
    let worst = answered_while_not_ready(&reqs, &ready, 0.0)
        .iter()
        .map(|(_, lag)| *lag)
        .fold(0.0, f64::max);
    eprintln!(
        "{} requests in {span:.1} s ({:.0}/s), {} failed; answered by blue {}, green {}; latest answer after a node's /ready stopped saying 200: {:.0} ms",
        reqs.len(),
        reqs.len() as f64 / span.max(1e-9),
        failed.len(),
        by("blue"),
        by("green"),
        worst * 1000.0
    );
    assert!(
        failed.is_empty(),
        "{} of {} requests failed; the first: {:?}",
        failed.len(),
        reqs.len(),
        &failed[..failed.len().min(10)]
    );
    let late = answered_while_not_ready(&reqs, &ready, (PROBE + SCHEDULING).as_secs_f64());
    assert!(
        late.is_empty(),
        "{} request(s) were answered by a node whose /ready had said 503 for longer than the probe interval ({} ms, + {} ms for this machine's scheduling); the first: {:?}",
        late.len(),
        PROBE.as_millis(),
        SCHEDULING.as_millis(),
        &late[..late.len().min(10)]
    );
    // Every request was answered by a node that names itself, with a release it holds.
    for r in &reqs {
        assert!(
            ["blue", "green"].contains(&r.node.as_str()) && r.release.starts_with('r'),
            "{r:?}"
        );
    }
    let _ = &h.base;
}
