//! Health checks with Kubernetes-style thresholds: HTTP, TCP, MySQL/MariaDB and Redis, all
//! native (no curl, no mysql client).
//!
//! The thresholds are a pure state machine ([`Probe::observe`]): initial delay, success and
//! failure thresholds, and a startup budget during which failures do not count (a slow
//! first request after a switch is normal). [`wait_until_healthy`] polls every check each
//! period and returns as soon as all of them pass (no fixed sleep), or fails with each
//! check's last results as evidence. Evidence never holds a password or a response body
//! beyond a short snippet.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{Instrument, info, warn};

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct HealthConfig {
    pub checks: Vec<CheckConfig>,
    #[serde(with = "crate::config::duration")]
    pub initial_delay: Duration,
    #[serde(with = "crate::config::duration")]
    pub period: Duration,
    #[serde(with = "crate::config::duration")]
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
    /// While within this time from the start, failures do not count (slow first requests).
    #[serde(with = "crate::config::duration")]
    pub startup_budget: Duration,
    /// Overall bound for ValidateService.
    #[serde(with = "crate::config::duration")]
    pub deadline: Duration,
    /// How often the checks run once the node is ready (`period` is for getting ready): on
    /// Magento a health URL usually reaches the database, so steady state polls gently.
    #[serde(with = "crate::config::duration")]
    pub ready_period: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            checks: Vec::new(),
            initial_delay: Duration::ZERO,
            period: Duration::from_millis(250),
            timeout: Duration::from_secs(2),
            success_threshold: 2,
            failure_threshold: 3,
            startup_budget: Duration::from_secs(30),
            deadline: Duration::from_secs(120),
            ready_period: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct CheckConfig {
    pub name: String,
    #[serde(flatten)]
    pub kind: CheckKind,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    Http(HttpCheck),
    Tcp { address: String },
    Mysql(MysqlCheck),
    Redis { url: String },
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct HttpCheck {
    pub url: String,
    #[serde(default = "default_method")]
    pub method: String,
    /// Host header, for name-based virtual hosts.
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default = "default_statuses")]
    pub expect_status: Vec<u16>,
    #[serde(default)]
    pub body_contains: Option<String>,
}

fn default_method() -> String {
    "GET".into()
}
fn default_statuses() -> Vec<u16> {
    vec![200]
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct MysqlCheck {
    pub host: String,
    #[serde(default = "default_mysql_port")]
    pub port: u16,
    pub user: String,
    /// Name of an environment variable holding the password (never the password itself).
    #[serde(default)]
    pub password_env: Option<String>,
    /// A file holding the password.
    #[serde(default)]
    pub password_file: Option<std::path::PathBuf>,
    #[serde(default)]
    pub database: Option<String>,
}

fn default_mysql_port() -> u16 {
    3306
}

/// One attempt's result.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub at_ms: u64,
    pub ok: bool,
    pub latency_ms: u64,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pending,
    Passed,
    Failed,
}

/// The threshold state machine of one check. Pure: time is passed in.
#[derive(Debug, Clone)]
pub struct Probe {
    initial_delay: Duration,
    success_threshold: u32,
    failure_threshold: u32,
    startup_budget: Duration,
    successes: u32,
    failures: u32,
    verdict: Verdict,
}

impl Probe {
    pub fn new(cfg: &HealthConfig) -> Probe {
        Probe {
            initial_delay: cfg.initial_delay,
            success_threshold: cfg.success_threshold.max(1),
            failure_threshold: cfg.failure_threshold.max(1),
            startup_budget: cfg.startup_budget,
            successes: 0,
            failures: 0,
            verdict: Verdict::Pending,
        }
    }

    /// Whether a check should run at `elapsed` since the start.
    pub fn due(&self, elapsed: Duration) -> bool {
        elapsed >= self.initial_delay
    }

    /// Takes one outcome observed at `elapsed` since the start. Once Passed, failures move
    /// it back through the failure threshold (for checks that keep running while ready).
    pub fn observe(&mut self, elapsed: Duration, ok: bool) -> Verdict {
        if ok {
            self.successes += 1;
            self.failures = 0;
            if self.successes >= self.success_threshold {
                self.verdict = Verdict::Passed;
            }
        } else {
            self.successes = 0;
            let in_startup = self.verdict != Verdict::Passed && elapsed < self.startup_budget;
            if !in_startup {
                self.failures += 1;
            }
            if self.failures >= self.failure_threshold {
                self.verdict = Verdict::Failed;
            } else if self.verdict == Verdict::Passed {
                // still passed until the failure threshold says otherwise
            }
        }
        self.verdict
    }

    pub fn verdict(&self) -> Verdict {
        self.verdict
    }

    /// Starts over (a node that failed comes back only through the thresholds).
    pub fn reset_to_pending(&mut self) {
        self.successes = 0;
        self.failures = 0;
        self.verdict = Verdict::Pending;
    }
}

#[derive(Debug, thiserror::Error)]
#[error("health checks did not pass{}:\n{evidence}", if *.timed_out { " before the deadline" } else { "" })]
pub struct HealthFailure {
    pub timed_out: bool,
    pub evidence: String,
}

/// Runs one check once.
pub async fn check_once(
    c: &CheckConfig,
    timeout: Duration,
    http: &reqwest::Client,
) -> Result<String, String> {
    let fut = async {
        match &c.kind {
            CheckKind::Http(h) => http_check(h, timeout, http).await,
            CheckKind::Tcp { address } => tokio::net::TcpStream::connect(address)
                .await
                .map(|_| "connected".to_string())
                .map_err(|e| format!("connect to {address}: {e}")),
            CheckKind::Mysql(m) => mysql_check(m).await,
            CheckKind::Redis { url } => redis_check(url).await,
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

async fn http_check(
    h: &HttpCheck,
    timeout: Duration,
    http: &reqwest::Client,
) -> Result<String, String> {
    let method = reqwest::Method::from_bytes(h.method.as_bytes())
        .map_err(|_| format!("bad method {}", h.method))?;
    let mut req = http.request(method, &h.url).timeout(timeout);
    if let Some(host) = &h.host {
        req = req.header(reqwest::header::HOST, host);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| format!("{}: {}", h.url, short_err(&e)))?;
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap_or_default();
    if !h.expect_status.contains(&status) {
        return Err(format!(
            "{} answered {status} (expected {:?}): {}",
            h.url,
            h.expect_status,
            snippet(&body)
        ));
    }
    if let Some(want) = &h.body_contains
        && !body.contains(want.as_str())
    {
        return Err(format!(
            "{} answered {status} without `{want}` in the body: {}",
            h.url,
            snippet(&body)
        ));
    }
    Ok(format!("{status}"))
}

fn short_err(e: &reqwest::Error) -> String {
    if e.is_connect() {
        "connection refused or unreachable".into()
    } else if e.is_timeout() {
        "timed out".into()
    } else {
        e.to_string()
    }
}

fn snippet(body: &str) -> String {
    let b: String = body
        .chars()
        .take(200)
        .collect::<String>()
        .replace(['\n', '\r'], " ");
    if body.len() > 200 {
        format!("{b}...")
    } else {
        b
    }
}

async fn mysql_check(m: &MysqlCheck) -> Result<String, String> {
    let password = match (&m.password_env, &m.password_file) {
        (Some(var), _) => std::env::var(var).ok(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .ok()
            .map(|s| s.trim_end().to_string()),
        _ => None,
    };
    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname(m.host.clone())
        .tcp_port(m.port)
        .user(Some(m.user.clone()))
        .pass(password)
        .db_name(m.database.clone());
    let where_ = format!("mysql://{}@{}:{}", m.user, m.host, m.port);
    let mut conn = mysql_async::Conn::new(opts)
        .await
        .map_err(|e| format!("{where_}: {}", redact_mysql(&e.to_string())))?;
    use mysql_async::prelude::Queryable;
    let one: Option<u8> = conn
        .query_first("SELECT 1")
        .await
        .map_err(|e| format!("{where_}: {e}"))?;
    let _ = conn.disconnect().await;
    match one {
        Some(1) => Ok("SELECT 1 ok".into()),
        _ => Err(format!("{where_}: SELECT 1 returned no row")),
    }
}

/// MySQL errors name the user, never the password; keep it that way if a URL slips in.
fn redact_mysql(s: &str) -> String {
    match (s.find("://"), s.find('@')) {
        (Some(a), Some(b)) if a < b => {
            let creds = &s[a + 3..b];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &s[..a + 3], &creds[..c], &s[b..]),
                None => s.to_string(),
            }
        }
        _ => s.to_string(),
    }
}

async fn redis_check(url: &str) -> Result<String, String> {
    let shown = redact_mysql(url);
    let client = redis::Client::open(url).map_err(|e| format!("{shown}: {e}"))?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("{shown}: {e}"))?;
    let pong: String = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .map_err(|e| format!("{shown}: {e}"))?;
    if pong == "PONG" {
        Ok("PONG".into())
    } else {
        Err(format!("{shown}: answered {pong}"))
    }
}

/// The client for health checks and warm-up: no proxy, no redirects. A host without CA
/// certificates (a minimal image without ca-certificates) still gets a client: plain-http
/// checks work and https ones fail their certificate check with a clear error, where the
/// default client would panic.
pub fn http_client() -> reqwest::Client {
    let builder = || {
        reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
    };
    match builder().build() {
        Ok(c) => c,
        Err(e) => {
            warn!(
                "no TLS root certificates on this host ({e}): https:// health and warm-up URLs will fail their certificate check; install ca-certificates"
            );
            builder()
                .tls_certs_only(Vec::<reqwest::Certificate>::new())
                .build()
                .unwrap_or_else(|e| {
                    warn!("failed to build an HTTP client: {e}");
                    reqwest::Client::builder()
                        .tls_certs_only(Vec::<reqwest::Certificate>::new())
                        .build()
                        .expect("an HTTP client without TLS roots always builds")
                })
        }
    }
}

/// Polls every check until all pass their thresholds, one fails them, or the deadline.
pub async fn wait_until_healthy(cfg: &HealthConfig) -> Result<Duration, HealthFailure> {
    let t0 = Instant::now();
    if cfg.checks.is_empty() {
        return Ok(Duration::ZERO);
    }
    let http = http_client();
    let mut probes: Vec<Probe> = cfg.checks.iter().map(|_| Probe::new(cfg)).collect();
    let mut history: Vec<Vec<Sample>> = cfg.checks.iter().map(|_| Vec::new()).collect();
    let mut meter =
        crate::progress::Meter::new("health", "ms", Some(cfg.deadline.as_millis() as u64));
    loop {
        let elapsed = t0.elapsed();
        // Checks of one round run concurrently; each has its own timeout.
        let mut round = tokio::task::JoinSet::new();
        for (i, c) in cfg.checks.iter().enumerate() {
            if probes[i].due(elapsed) && probes[i].verdict() != Verdict::Passed {
                let (c, http, timeout) = (c.clone(), http.clone(), cfg.timeout);
                round.spawn(
                    async move {
                        let s = Instant::now();
                        let r = check_once(&c, timeout, &http).await;
                        (i, r, s.elapsed())
                    }
                    .in_current_span(),
                );
            }
        }
        let mut results = Vec::new();
        while let Some(done) = round.join_next().await {
            if let Ok(r) = done {
                results.push(r);
            }
        }
        results.sort_by_key(|(i, _, _)| *i);
        for (i, r, lat) in results {
            let at = t0.elapsed();
            let ok = r.is_ok();
            let detail = match r {
                Ok(d) | Err(d) => d,
            };
            let v = probes[i].observe(at, ok);
            // Told when it starts failing or fails differently, not at every poll: the hook's
            // output and the journal keep what changed.
            let same_as_before = history[i]
                .last()
                .is_some_and(|p| !p.ok && p.detail == detail);
            if !ok && !same_as_before {
                warn!("health check {} failed: {detail}", cfg.checks[i].name);
            }
            history[i].push(Sample {
                at_ms: at.as_millis() as u64,
                ok,
                latency_ms: lat.as_millis() as u64,
                detail,
            });
            if history[i].len() > 5 {
                history[i].remove(0);
            }
            if v == Verdict::Failed {
                return Err(HealthFailure {
                    timed_out: false,
                    evidence: evidence(cfg, &history),
                });
            }
        }
        if probes.iter().all(|p| p.verdict() == Verdict::Passed) {
            let took = t0.elapsed();
            info!(
                "all {} health check(s) passed in {} ms",
                cfg.checks.len(),
                took.as_millis()
            );
            return Ok(took);
        }
        if t0.elapsed() >= cfg.deadline {
            return Err(HealthFailure {
                timed_out: true,
                evidence: evidence(cfg, &history),
            });
        }
        meter.update(
            t0.elapsed().as_millis() as u64,
            &format!(
                "of the deadline; {} of {} check(s) passed",
                probes
                    .iter()
                    .filter(|p| p.verdict() == Verdict::Passed)
                    .count(),
                probes.len()
            ),
        );
        tokio::time::sleep(cfg.period).await;
    }
}

fn evidence(cfg: &HealthConfig, history: &[Vec<Sample>]) -> String {
    let mut out = String::new();
    for (c, h) in cfg.checks.iter().zip(history) {
        out.push_str(&format!("  {}:", c.name));
        if h.is_empty() {
            out.push_str(" never ran\n");
            continue;
        }
        out.push('\n');
        for s in h.iter().rev().take(3).rev() {
            out.push_str(&format!(
                "    +{}ms {} ({} ms) {}\n",
                s.at_ms,
                if s.ok { "ok" } else { "FAIL" },
                s.latency_ms,
                s.detail
            ));
        }
    }
    out
}

/// Keeps checking while the node is ready: a node that fails its checks (failure threshold)
/// leaves `ready`, so the load balancer stops sending, and comes back only when the checks
/// pass again (success threshold). Lifecycle events own the other states. The checks come
/// from `cfg`, which the daemon replaces when it reloads its config.
pub async fn monitor(
    mut cfg: tokio::sync::watch::Receiver<HealthConfig>,
    readiness: crate::readiness::Readiness,
) {
    use crate::readiness::State;
    let http = http_client();
    let steady = |c: &HealthConfig| HealthConfig {
        startup_budget: Duration::ZERO,
        initial_delay: Duration::ZERO,
        ..c.clone()
    };
    let mut current = cfg.borrow_and_update().clone();
    let mut probes: Vec<Probe> = current
        .checks
        .iter()
        .map(|_| Probe::new(&steady(&current)))
        .collect();
    let t0 = Instant::now();
    let mut fell_out = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(monitor_wait(&current)) => {}
            changed = cfg.changed() => {
                if changed.is_err() {
                    return;
                }
                current = cfg.borrow_and_update().clone();
                probes = current.checks.iter().map(|_| Probe::new(&steady(&current))).collect();
                continue;
            }
        }
        let state = readiness.state();
        let watching = state == State::Ready || (fell_out && state == State::Starting);
        if !watching || current.checks.is_empty() {
            fell_out = false;
            probes.iter_mut().for_each(Probe::reset_to_pending);
            continue;
        }
        for (i, c) in current.checks.iter().enumerate() {
            let r = check_once(c, current.timeout, &http).await;
            readiness.record_check(&c.name, r.is_ok());
            let before = probes[i].verdict();
            let v = probes[i].observe(t0.elapsed(), r.is_ok());
            if let Err(why) = &r
                && state == State::Ready
                && v == Verdict::Failed
                && before != Verdict::Failed
            {
                warn!(
                    "health check {} failed {} times in a row while ready ({why}): the node leaves ready",
                    c.name, current.failure_threshold
                );
            }
        }
        if state == State::Ready && probes.iter().any(|p| p.verdict() == Verdict::Failed) {
            let _ = readiness.set_starting();
            fell_out = true;
            probes.iter_mut().for_each(Probe::reset_to_pending);
        } else if fell_out && probes.iter().all(|p| p.verdict() == Verdict::Passed) {
            info!("health checks pass again: the node is ready");
            let _ = readiness.set_warming();
            let _ = readiness.set_ready();
            fell_out = false;
        }
    }
}

/// The steady-state monitor's pause between rounds: `ready_period`, never a busy loop.
/// (`period` paces ValidateService's wait for health, where speed matters; once ready, the
/// checks only watch, and on Magento each one reaches the database.)
pub fn monitor_wait(cfg: &HealthConfig) -> Duration {
    cfg.ready_period.max(Duration::from_millis(50))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(success: u32, failure: u32, startup: u64, delay: u64) -> HealthConfig {
        HealthConfig {
            success_threshold: success,
            failure_threshold: failure,
            startup_budget: Duration::from_secs(startup),
            initial_delay: Duration::from_secs(delay),
            ..HealthConfig::default()
        }
    }
    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    /// Regression: after ready the monitor polled every `period` (250 ms): 4 requests a
    /// second, forever, to a health URL that on Magento reaches the database.
    #[test]
    fn steady_state_polls_at_ready_period_not_period() {
        let c = HealthConfig::default();
        assert_eq!(c.ready_period, s(10));
        assert_eq!(monitor_wait(&c), s(10));
        let c = HealthConfig {
            ready_period: s(3),
            ..HealthConfig::default()
        };
        assert_eq!(monitor_wait(&c), s(3));
    }

    #[test]
    fn passes_after_success_threshold() {
        let mut p = Probe::new(&cfg(2, 3, 0, 0));
        assert_eq!(p.observe(s(0), true), Verdict::Pending);
        assert_eq!(p.observe(s(1), true), Verdict::Passed);
    }

    #[test]
    fn a_failure_resets_the_success_count() {
        let mut p = Probe::new(&cfg(2, 3, 0, 0));
        p.observe(s(0), true);
        p.observe(s(1), false);
        assert_eq!(p.observe(s(2), true), Verdict::Pending);
        assert_eq!(p.observe(s(3), true), Verdict::Passed);
    }

    #[test]
    fn fails_after_failure_threshold() {
        let mut p = Probe::new(&cfg(1, 3, 0, 0));
        p.observe(s(0), false);
        p.observe(s(1), false);
        assert_eq!(p.observe(s(2), false), Verdict::Failed);
    }

    #[test]
    fn startup_budget_forgives_early_failures() {
        let mut p = Probe::new(&cfg(1, 2, 10, 0));
        for t in 0..9 {
            assert_eq!(p.observe(s(t), false), Verdict::Pending, "t={t}");
        }
        assert_eq!(p.observe(s(10), false), Verdict::Pending);
        assert_eq!(p.observe(s(11), false), Verdict::Failed);
        // and a slow starter passes within it
        let mut p = Probe::new(&cfg(1, 2, 10, 0));
        for t in 0..5 {
            p.observe(s(t), false);
        }
        assert_eq!(p.observe(s(6), true), Verdict::Passed);
    }

    #[test]
    fn initial_delay_defers_checks() {
        let p = Probe::new(&cfg(1, 1, 0, 5));
        assert!(!p.due(s(4)));
        assert!(p.due(s(5)));
    }

    #[test]
    fn a_ready_node_leaves_ready_only_through_the_failure_threshold() {
        let mut p = Probe::new(&cfg(1, 2, 0, 0));
        assert_eq!(p.observe(s(0), true), Verdict::Passed);
        assert_eq!(p.observe(s(1), false), Verdict::Passed);
        assert_eq!(p.observe(s(2), false), Verdict::Failed);
    }

    #[test]
    fn passwords_are_redacted_from_urls() {
        assert_eq!(
            redact_mysql("redis://:s3cret@h:6379/0 failed"),
            "redis://:***@h:6379/0 failed"
        );
        assert_eq!(redact_mysql("mysql://app:pw@h/db"), "mysql://app:***@h/db");
    }
}
