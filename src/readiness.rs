//! Readiness for the load balancer: a state machine, and the HTTP listener the target
//! group's health check points at.
//!
//! States: starting -> warming -> ready -> draining -> stopped (and back to starting for the
//! next release). Each transition is a named method that checks where it may come from.
//! The listener serves `/ready` (200 only when ready, else 503), `/live` (200 while the
//! daemon runs), `/status` (the status document, no secrets) and `/metrics` (Prometheus
//! text format).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(default)]
pub struct ReadinessConfig {
    /// Address of the listener, e.g. 127.0.0.1:9100 (the target group's health check port).
    /// Unset: no listener.
    pub listen: Option<String>,
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
        serde_json::json!({
            "state": g.state.name(),
            "since": humantime::format_rfc3339_millis(g.since).to_string(),
        })
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

    /// Prometheus text exposition format.
    pub fn metrics(&self) -> String {
        let g = match self.inner.lock() {
            Ok(g) => g,
            Err(_) => return String::new(),
        };
        let mut o = String::new();
        o.push_str("# HELP bgagent_readiness_state Current readiness state (1 for the current one).\n# TYPE bgagent_readiness_state gauge\n");
        for s in State::ALL {
            o.push_str(&format!(
                "bgagent_readiness_state{{state=\"{}\"}} {}\n",
                s.name(),
                (g.state == s) as u8
            ));
        }
        o.push_str("# HELP bgagent_event_duration_seconds Time spent in lifecycle events.\n# TYPE bgagent_event_duration_seconds summary\n");
        for ((ev, res), (n, sum)) in &g.events {
            o.push_str(&format!(
                "bgagent_event_duration_seconds_sum{{event=\"{ev}\",result=\"{res}\"}} {sum}\n"
            ));
            o.push_str(&format!(
                "bgagent_event_duration_seconds_count{{event=\"{ev}\",result=\"{res}\"}} {n}\n"
            ));
        }
        o.push_str("# HELP bgagent_health_checks_total Health check outcomes.\n# TYPE bgagent_health_checks_total counter\n");
        for ((c, res), n) in &g.checks {
            o.push_str(&format!(
                "bgagent_health_checks_total{{check=\"{c}\",result=\"{res}\"}} {n}\n"
            ));
        }
        o.push_str("# HELP bgagent_uptime_seconds Seconds since the daemon started.\n# TYPE bgagent_uptime_seconds gauge\n");
        o.push_str(&format!(
            "bgagent_uptime_seconds {:.3}\n",
            self.started.elapsed().as_secs_f64()
        ));
        o
    }

    fn respond(&self, path: &str) -> (StatusCode, &'static str, String) {
        match path {
            "/ready" => {
                let s = self.state();
                let code = if s == State::Ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                (code, "text/plain", format!("{}\n", s.name()))
            }
            "/live" => (StatusCode::OK, "text/plain", "alive\n".into()),
            "/status" => {
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
            "/metrics" => (StatusCode::OK, "text/plain; version=0.0.4", self.metrics()),
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: try /ready, /live, /status or /metrics\n".into(),
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

/// Binds the listener, then serves it in the background.
pub async fn serve(addr: &str, r: Readiness) -> Result<SocketAddr, ListenError> {
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
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    warn!("readiness listener: accept failed: {e}");
                    continue;
                }
            };
            let r = r.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (code, ctype, body) = r.respond(req.uri().path());
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

    #[test]
    fn ready_only_through_warming() {
        let r = Readiness::new();
        assert!(r.set_ready().is_err());
        r.set_warming().unwrap();
        r.set_ready().unwrap();
        assert_eq!(r.respond("/ready").0, StatusCode::OK);
        r.start_draining().unwrap();
        assert_eq!(r.respond("/ready").0, StatusCode::SERVICE_UNAVAILABLE);
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

    #[test]
    fn metrics_text_format() {
        let r = Readiness::new();
        r.record_event("AfterInstall", true, 1.5);
        r.record_check("app", false);
        let m = r.metrics();
        assert!(
            m.contains("bgagent_readiness_state{state=\"starting\"} 1\n"),
            "{m}"
        );
        assert!(m.contains(
            "bgagent_event_duration_seconds_sum{event=\"AfterInstall\",result=\"success\"} 1.5\n"
        ));
        assert!(m.contains(
            "bgagent_event_duration_seconds_count{event=\"AfterInstall\",result=\"success\"} 1\n"
        ));
        assert!(m.contains("bgagent_health_checks_total{check=\"app\",result=\"failure\"} 1\n"));
        for line in m.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(
                !name.is_empty() && value.parse::<f64>().is_ok(),
                "bad line {line}"
            );
        }
    }
}
