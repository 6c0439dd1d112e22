//! Readiness for the load balancer: a state machine, and the HTTP listener the target
//! group's health check points at.
//!
//! States: starting -> warming -> ready -> draining -> stopped (and back to starting for the
//! next release). Each transition is a named method that checks where it may come from.
//! The load balancer's listener (`readiness.listen`) serves only `/ready` (200 only when
//! ready, else 503) and `/live` (200 while the daemon runs). `/status` (the status document:
//! release paths, deployment ids, parameter names) and `/metrics` (OpenMetrics text, encoded
//! by prometheus-client so label values are escaped) are for operators and go to a separate
//! listener (`readiness.status_listen`), on loopback by default.
//!
//! The listener also keeps a log of who probes `/ready` (by source address: an ALB probes
//! from one address per availability zone) and how each probe was answered since the last
//! drain began: the evidence [`crate::drain`] ends a drain on.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct ReadinessConfig {
    /// Address of the load balancer's listener (/ready, /live), e.g. 0.0.0.0:9100 (the
    /// target group's health check port). Unset: no listener.
    pub listen: Option<String>,
    /// Address of the operators' listener (/status, /metrics). Unset: none.
    pub status_listen: Option<String>,
}

impl Default for ReadinessConfig {
    fn default() -> Self {
        ReadinessConfig {
            listen: None,
            status_listen: Some("127.0.0.1:9101".into()),
        }
    }
}

/// Which paths a listener answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// /ready and /live, for the load balancer.
    LoadBalancer,
    /// /status and /metrics, for operators and Prometheus.
    Operator,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Starting,
    Warming,
    Ready,
    Draining,
    Stopped,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Warming => "warming",
            State::Ready => "ready",
            State::Draining => "draining",
            State::Stopped => "stopped",
        }
    }
    const ALL: [State; 5] = [
        State::Starting,
        State::Warming,
        State::Ready,
        State::Draining,
        State::Stopped,
    ];
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("readiness cannot go from {from} to {to}")]
pub struct IllegalTransition {
    pub from: &'static str,
    pub to: &'static str,
}

#[derive(Debug)]
struct Inner {
    state: State,
    since: SystemTime,
    /// event -> (count ok, count failed, total seconds, last seconds)
    events: BTreeMap<(String, &'static str), (u64, f64)>,
    checks: BTreeMap<(String, &'static str), u64>,
    status: serde_json::Value,
    /// Who probed /ready, by source address (at most [`MAX_PROBERS`], the stalest dropped).
    probes: BTreeMap<IpAddr, ProbeLog>,
    /// The last probe: (from, when, status code), for `status`.
    last_probe: Option<(IpAddr, SystemTime, u16)>,
}

/// A scan of the health check port from many addresses must not grow memory without end;
/// a load balancer has a handful of probing nodes.
const MAX_PROBERS: usize = 64;

#[derive(Debug, Clone, Copy)]
struct ProbeLog {
    last: Instant,
    prev: Option<Instant>,
    last_before_drain: Option<Instant>,
    prev_before_drain: Option<Instant>,
    refused_since_drain: u32,
}

/// Shared handle to the node's readiness.
#[derive(Debug, Clone)]
pub struct Readiness {
    inner: Arc<Mutex<Inner>>,
    started: Instant,
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

impl Readiness {
    pub fn new() -> Readiness {
        Readiness {
            inner: Arc::new(Mutex::new(Inner {
                state: State::Starting,
                since: SystemTime::now(),
                events: BTreeMap::new(),
                checks: BTreeMap::new(),
                status: serde_json::Value::Null,
                probes: BTreeMap::new(),
                last_probe: None,
            })),
            started: Instant::now(),
        }
    }

    pub fn state(&self) -> State {
        self.inner.lock().map(|g| g.state).unwrap_or(State::Stopped)
    }

    fn go(&self, to: State, allowed_from: &[State]) -> Result<(), IllegalTransition> {
        let mut g = self.inner.lock().map_err(|_| IllegalTransition {
            from: "?",
            to: to.name(),
        })?;
        if g.state == to {
            return Ok(());
        }
        if !allowed_from.contains(&g.state) {
            return Err(IllegalTransition {
                from: g.state.name(),
                to: to.name(),
            });
        }
        info!("readiness: {} -> {}", g.state.name(), to.name());
        if to == State::Draining {
            // The drain's evidence counts from here: who probed before, and 503s since.
            for p in g.probes.values_mut() {
                p.last_before_drain = Some(p.last);
                p.prev_before_drain = p.prev;
                p.refused_since_drain = 0;
            }
        }
        g.state = to;
        g.since = SystemTime::now();
        Ok(())
    }

    /// A new release is being brought up (or a failed node starts over).
    pub fn set_starting(&self) -> Result<(), IllegalTransition> {
        self.go(State::Starting, &State::ALL)
    }
    pub fn set_warming(&self) -> Result<(), IllegalTransition> {
        self.go(State::Warming, &[State::Starting])
    }
    /// Only through warming: health checks and warm-up must have passed.
    pub fn set_ready(&self) -> Result<(), IllegalTransition> {
        self.go(State::Ready, &[State::Warming])
    }
    /// The load balancer must stop sending: /ready answers 503 from now on.
    pub fn start_draining(&self) -> Result<(), IllegalTransition> {
        self.go(
            State::Draining,
            &[State::Starting, State::Warming, State::Ready],
        )
    }
    pub fn set_stopped(&self) -> Result<(), IllegalTransition> {
        self.go(
            State::Stopped,
            &[State::Draining, State::Starting, State::Warming],
        )
    }

    pub fn snapshot(&self) -> serde_json::Value {
        let g = match self.inner.lock() {
            Ok(g) => g,
            Err(_) => return serde_json::Value::Null,
        };
        let last_probe = g.last_probe.map(|(from, at, code)| {
            serde_json::json!({
                "from": from.to_string(),
                "at": humantime::format_rfc3339_millis(at).to_string(),
                "answered": code,
            })
        });
        serde_json::json!({
            "state": g.state.name(),
            "since": humantime::format_rfc3339_millis(g.since).to_string(),
            "last_probe": last_probe,
        })
    }

    /// Records a probe of /ready from `from`, answered `ready` (200) or not (503).
    fn record_probe(&self, from: IpAddr, ready: bool) {
        let Ok(mut g) = self.inner.lock() else {
            return;
        };
        let now = Instant::now();
        if !g.probes.contains_key(&from)
            && g.probes.len() >= MAX_PROBERS
            && let Some(stalest) = g.probes.iter().min_by_key(|(_, p)| p.last).map(|(a, _)| *a)
        {
            g.probes.remove(&stalest);
        }
        let p = g.probes.entry(from).or_insert(ProbeLog {
            last: now,
            prev: None,
            last_before_drain: None,
            prev_before_drain: None,
            refused_since_drain: 0,
        });
        p.prev = (p.last != now).then_some(p.last);
        p.last = now;
        if !ready {
            p.refused_since_drain = p.refused_since_drain.saturating_add(1);
        }
        g.last_probe = Some((from, SystemTime::now(), if ready { 200 } else { 503 }));
    }

    /// Who probed /ready and how they were answered since the last drain began.
    pub fn probers(&self) -> Vec<crate::drain::Prober> {
        let Ok(g) = self.inner.lock() else {
            return Vec::new();
        };
        g.probes
            .iter()
            .map(|(addr, p)| crate::drain::Prober {
                addr: *addr,
                last_before_drain: p.last_before_drain,
                prev_before_drain: p.prev_before_drain,
                last: p.last,
                refused_since_drain: p.refused_since_drain,
            })
            .collect()
    }

    pub fn record_event(&self, event: &str, ok: bool, seconds: f64) {
        if let Ok(mut g) = self.inner.lock() {
            let e = g
                .events
                .entry((event.to_string(), if ok { "success" } else { "failure" }))
                .or_insert((0, 0.0));
            e.0 += 1;
            e.1 += seconds;
        }
    }

    pub fn record_check(&self, check: &str, ok: bool) {
        if let Ok(mut g) = self.inner.lock() {
            *g.checks
                .entry((check.to_string(), if ok { "success" } else { "failure" }))
                .or_insert(0) += 1;
        }
    }

    pub fn set_status(&self, doc: serde_json::Value) {
        if let Ok(mut g) = self.inner.lock() {
            g.status = doc;
        }
    }

    /// The metrics in the OpenMetrics text format: readiness, events, checks, uptime, and
    /// from the last status document the current release, its cache generation and the last
    /// deployment.
    pub fn metrics(&self) -> String {
        use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
        use std::sync::atomic::AtomicU64;
        type Labels = Vec<(&'static str, String)>;
        let g = match self.inner.lock() {
            Ok(g) => g,
            Err(_) => return String::new(),
        };
        let mut reg = prometheus_client::registry::Registry::default();
        let state = Family::<Labels, Gauge>::default();
        for st in State::ALL {
            state
                .get_or_create(&vec![("state", st.name().to_string())])
                .set((g.state == st) as i64);
        }
        reg.register(
            "bgagent_readiness_state",
            "Current readiness state (1 for the current one)",
            state,
        );
        let runs = Family::<Labels, Counter>::default();
        let seconds = Family::<Labels, Counter<f64, AtomicU64>>::default();
        for ((ev, res), (n, sum)) in &g.events {
            let l = vec![("event", ev.clone()), ("result", res.to_string())];
            runs.get_or_create(&l).inc_by(*n);
            seconds.get_or_create(&l).inc_by(*sum);
        }
        reg.register("bgagent_events", "Lifecycle events run, by result", runs);
        reg.register(
            "bgagent_event_seconds",
            "Time spent in lifecycle events, by result",
            seconds,
        );
        let checks = Family::<Labels, Counter>::default();
        for ((c, res), n) in &g.checks {
            checks
                .get_or_create(&vec![("check", c.clone()), ("result", res.to_string())])
                .inc_by(*n);
        }
        reg.register("bgagent_health_checks", "Health check outcomes", checks);
        let uptime = Gauge::<f64, AtomicU64>::default();
        uptime.set(self.started.elapsed().as_secs_f64());
        reg.register(
            "bgagent_uptime_seconds",
            "Seconds since the daemon started",
            uptime,
        );
        let st = &g.status;
        if let Some(id) = st["current_release"]["id"].as_str() {
            let info = Family::<Labels, Gauge>::default();
            let mut l = vec![("release", id.to_string())];
            if let Some(d) = st["current_release"]["deployment_id"].as_str() {
                l.push(("deployment_id", d.to_string()));
            }
            info.get_or_create(&l).set(1);
            reg.register(
                "bgagent_current_release",
                "The release `current` points at (always 1; the labels say which)",
                info,
            );
            if let Some(slot) = st["current_release"]["cache"]["slot"].as_i64() {
                let generation = Gauge::<i64>::default();
                generation.set(slot);
                reg.register(
                    "bgagent_cache_generation",
                    "Cache generation (slot) of the current release",
                    generation,
                );
            }
        }
        if let Some(id) = st["last_deployment"]["id"].as_str() {
            let info = Family::<Labels, Gauge>::default();
            let status = st["last_deployment"]["status"]
                .as_str()
                .unwrap_or("unknown");
            info.get_or_create(&vec![
                ("deployment_id", id.to_string()),
                ("status", status.to_string()),
            ])
            .set(1);
            reg.register(
                "bgagent_last_deployment",
                "The last deployment and its status (always 1; the labels say which)",
                info,
            );
            if let Some(at) = st["last_deployment"]["started_at"]
                .as_str()
                .and_then(|t| humantime::parse_rfc3339(t).ok())
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            {
                let started = Gauge::<f64, AtomicU64>::default();
                started.set(at.as_secs_f64());
                reg.register(
                    "bgagent_last_deployment_started_timestamp_seconds",
                    "When the last deployment started (Unix time)",
                    started,
                );
            }
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &reg).is_err() {
            return String::new();
        }
        out
    }

    fn respond(
        &self,
        path: &str,
        surface: Surface,
        peer: IpAddr,
    ) -> (StatusCode, &'static str, String) {
        match (surface, path) {
            (Surface::LoadBalancer, "/ready") => {
                let s = self.state();
                self.record_probe(peer, s == State::Ready);
                let code = if s == State::Ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                (code, "text/plain", format!("{}\n", s.name()))
            }
            (Surface::LoadBalancer, "/live") => (StatusCode::OK, "text/plain", "alive\n".into()),
            (Surface::Operator, "/status") => {
                let mut doc = self
                    .inner
                    .lock()
                    .map(|g| g.status.clone())
                    .unwrap_or_default();
                if doc.is_object() {
                    doc["node"]["readiness"] = self.snapshot();
                } else {
                    doc = serde_json::json!({ "readiness": self.snapshot() });
                }
                (StatusCode::OK, "application/json", doc.to_string())
            }
            (Surface::Operator, "/metrics") => (
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.metrics(),
            ),
            (Surface::LoadBalancer, _) => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: this listener serves /ready and /live (/status and /metrics are on readiness.status_listen)\n".into(),
            ),
            (Surface::Operator, _) => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: this listener serves /status and /metrics\n".into(),
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("failed to listen on {addr} for readiness: {source}")]
pub struct ListenError {
    pub addr: String,
    pub source: std::io::Error,
}

/// Binds a listener for `surface`, then serves it in the background.
pub async fn serve(addr: &str, r: Readiness, surface: Surface) -> Result<SocketAddr, ListenError> {
    let sock: SocketAddr = addr.parse().map_err(|e| ListenError {
        addr: addr.into(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{e}")),
    })?;
    let listener = tokio::net::TcpListener::bind(sock)
        .await
        .map_err(|source| ListenError {
            addr: addr.into(),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| ListenError {
        addr: addr.into(),
        source,
    })?;
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    warn!("readiness listener: accept failed: {e}");
                    continue;
                }
            };
            let r = r.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (code, ctype, body) = r.respond(req.uri().path(), surface, peer.ip());
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            Response::builder()
                                .status(code)
                                .header("content-type", ctype)
                                .header("cache-control", "no-store")
                                .body(Full::new(Bytes::from(body)))
                                .unwrap_or_default(),
                        )
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            });
        }
    });
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Readiness {
        fn respond_local(
            &self,
            path: &str,
            surface: Surface,
        ) -> (StatusCode, &'static str, String) {
            self.respond(path, surface, IpAddr::from([127, 0, 0, 1]))
        }
    }

    #[test]
    fn probes_are_counted_per_source_from_the_start_of_the_drain() {
        let r = Readiness::new();
        let alb_a = IpAddr::from([10, 0, 1, 5]);
        let alb_b = IpAddr::from([10, 0, 2, 7]);
        r.set_warming().unwrap();
        r.respond("/ready", Surface::LoadBalancer, alb_a);
        r.set_ready().unwrap();
        r.respond("/ready", Surface::LoadBalancer, alb_a);
        r.respond("/ready", Surface::LoadBalancer, alb_b);
        r.respond("/live", Surface::LoadBalancer, IpAddr::from([10, 0, 3, 3]));
        let p = r.probers();
        assert_eq!(p.len(), 2, "/live is not a probe of /ready: {p:?}");
        assert!(p.iter().all(|p| p.last_before_drain.is_none()));
        r.start_draining().unwrap();
        r.respond("/ready", Surface::LoadBalancer, alb_a);
        r.respond("/ready", Surface::LoadBalancer, alb_a);
        let p = r.probers();
        let a = p.iter().find(|p| p.addr == alb_a).unwrap();
        let b = p.iter().find(|p| p.addr == alb_b).unwrap();
        assert_eq!((a.refused_since_drain, b.refused_since_drain), (2, 0));
        assert!(a.last_before_drain.is_some() && b.last_before_drain.is_some());
        assert!(a.prev_before_drain.is_some() && b.prev_before_drain.is_none());
        assert_eq!(r.snapshot()["last_probe"]["answered"], 503);
        assert_eq!(r.snapshot()["last_probe"]["from"], "10.0.1.5");
        // a scan from many addresses keeps the log bounded
        for i in 0..200u8 {
            r.respond(
                "/ready",
                Surface::LoadBalancer,
                IpAddr::from([192, 168, 0, i]),
            );
        }
        assert_eq!(r.probers().len(), MAX_PROBERS);
    }

    #[test]
    fn ready_only_through_warming() {
        let r = Readiness::new();
        assert!(r.set_ready().is_err());
        r.set_warming().unwrap();
        r.set_ready().unwrap();
        assert_eq!(
            r.respond_local("/ready", Surface::LoadBalancer).0,
            StatusCode::OK
        );
        r.start_draining().unwrap();
        assert_eq!(
            r.respond_local("/ready", Surface::LoadBalancer).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        r.set_stopped().unwrap();
        assert_eq!(
            r.set_ready(),
            Err(IllegalTransition {
                from: "stopped",
                to: "ready"
            })
        );
        r.set_starting().unwrap();
        assert_eq!(r.state(), State::Starting);
    }

    /// Regression: the load balancer's listener (0.0.0.0 on the packaged config) also
    /// served /status and /metrics: release paths, deployment ids and parameter names to
    /// anyone who can reach the health check port.
    #[test]
    fn the_load_balancer_listener_serves_only_ready_and_live() {
        let r = Readiness::new();
        r.set_status(serde_json::json!({ "current_release": { "id": "r1" } }));
        for p in ["/status", "/metrics"] {
            assert_eq!(
                r.respond_local(p, Surface::LoadBalancer).0,
                StatusCode::NOT_FOUND,
                "{p}"
            );
            assert_eq!(
                r.respond_local(p, Surface::Operator).0,
                StatusCode::OK,
                "{p}"
            );
        }
        for p in ["/ready", "/live"] {
            assert_ne!(
                r.respond_local(p, Surface::LoadBalancer).0,
                StatusCode::NOT_FOUND,
                "{p}"
            );
            assert_eq!(
                r.respond_local(p, Surface::Operator).0,
                StatusCode::NOT_FOUND
            );
        }
        assert_eq!(
            ReadinessConfig::default().status_listen.as_deref(),
            Some("127.0.0.1:9101")
        );
    }

    #[test]
    fn metrics_text_format() {
        let r = Readiness::new();
        r.record_event("AfterInstall", true, 1.5);
        r.record_check("app \"eu\"\nwest", false);
        r.set_status(serde_json::json!({
            "current_release": { "id": "20261122T120000Z-d-ABC", "deployment_id": "d-ABC",
                                 "cache": { "slot": 1 } },
            "last_deployment": { "id": "d-ABC", "status": "succeeded",
                                 "started_at": "2026-11-22T12:00:00.000Z" },
        }));
        let m = r.metrics();
        for want in [
            "bgagent_readiness_state{state=\"starting\"} 1\n",
            "bgagent_events_total{event=\"AfterInstall\",result=\"success\"} 1\n",
            "bgagent_event_seconds_total{event=\"AfterInstall\",result=\"success\"} 1.5\n",
            // a label value with a quote and a newline, escaped
            "bgagent_health_checks_total{check=\"app \\\"eu\\\"\\nwest\",result=\"failure\"} 1\n",
            "bgagent_current_release{release=\"20261122T120000Z-d-ABC\",deployment_id=\"d-ABC\"} 1\n",
            "bgagent_cache_generation 1\n",
            "bgagent_last_deployment{deployment_id=\"d-ABC\",status=\"succeeded\"} 1\n",
            "bgagent_last_deployment_started_timestamp_seconds 1795348800.0\n",
        ] {
            assert!(m.contains(want), "no `{want}` in:\n{m}");
        }
        assert!(m.ends_with("# EOF\n"), "{m}");
        for line in m.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(
                !name.is_empty() && value.parse::<f64>().is_ok(),
                "bad line {line}"
            );
        }
    }
}
