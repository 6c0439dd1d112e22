//! When a drain may end: the decision, on evidence rather than a sleep.
//!
//! A drain (ApplicationStop, BeforeBlockTraffic) turns `/ready` to 503, then must wait until
//! the load balancer has stopped sending requests and the requests it sent have finished,
//! before anything stops (`stop_on_drain`). A fixed sleep is either too short (requests fail:
//! 29 of 5608 behind HAProxy with the old default of 0) or too long (every deployment waits
//! it out). The readiness listener sees the load balancer's health probes, so the drain ends
//! on what it saw:
//!
//! 1. Probers. A source address whose last two probes of `/ready` before the drain began
//!    both fall within one probe window (2 x `drain.health_check_interval`), the last of
//!    them within the window before the drain, is a prober: a load balancer node that may
//!    still route to this node. A load balancer probes periodically, and routes to a target
//!    only after two or more good probes (ALB `HealthyThresholdCount` >= 2, HAProxy `rise`
//!    2); a single `curl` of /ready by an operator is not a prober. An ALB probes from one
//!    address per availability zone, and each decides on its own, so each counts separately.
//! 2. A prober is done once it has been answered 503 `drain.unhealthy_threshold` times since
//!    the drain began (it has marked the node unhealthy: the target group's
//!    `UnhealthyThresholdCount`, HAProxy's `fall`), or once it has not probed for a whole
//!    window (it stopped probing: deregistered the node, or went away).
//! 3. Then, when a service is to be stopped (`stop_on_drain`) and `drain.active_requests_url`
//!    (nginx's stub_status) is set, no request is in flight
//!    at two readings at least [`SETTLE`] apart, both taken after every prober was done. The
//!    in-flight number is `Reading + Writing - 1`: stub_status counts its own request, and
//!    `Active connections` includes idle keep-alive connections, which carry no request.
//!    nginx not listening there (connection refused) is zero. A reading that fails (404,
//!    timeout, not stub_status) is no evidence: the drain waits for the bound.
//! 4. `drain.deregistration_delay` is the upper bound: when it has passed the drain ends
//!    whatever the evidence says, and says so.
//!
//! A node nobody probed within the window before the drain (no load balancer, or one that
//! already took it out) has no probers: step 2 holds at once.
//!
//! Everything here is pure: [`Watch::step`] takes the probes the listener saw, the latest
//! in-flight reading and the clock, and returns what to do. `events/drain.rs` does the I/O.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Two zero in-flight readings at least this far apart end the drain: a request the load
/// balancer dispatched just before it read the last 503 has reached the web server by then.
pub const SETTLE: Duration = Duration::from_millis(100);

/// How often the drain looks at the probes and reads stub_status.
pub const POLL: Duration = Duration::from_millis(50);

/// The deadline of one stub_status request.
pub const READ_DEADLINE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct DrainConfig {
    /// The upper bound of a drain: after this long it ends whatever the evidence says. 0: no
    /// waiting at all (nothing is checked).
    #[serde(with = "crate::config::duration")]
    pub deregistration_delay: Duration,
    /// How many probes answered 503 make a load balancer take the node out: the target
    /// group's `UnhealthyThresholdCount` (ALB default 2), HAProxy's `fall`.
    pub unhealthy_threshold: u32,
    /// How often the load balancer probes: the target group's `HealthCheckIntervalSeconds`
    /// (ALB default 30 s), HAProxy's `inter`. An address that probed within twice this
    /// before the drain is a load balancer to wait for.
    #[serde(with = "crate::config::duration")]
    pub health_check_interval: Duration,
    /// nginx's stub_status URL (e.g. http://127.0.0.1/nginx_status): the drain also waits
    /// until no request is in flight. Unset: in-flight requests are not checked.
    pub active_requests_url: Option<String>,
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig {
            // ALB defaults (30 s x 2) take the node out within about 65 s; the rest is for
            // long requests. Below the shipped appspec's 300 s hook timeout.
            deregistration_delay: Duration::from_secs(120),
            unhealthy_threshold: 2,
            health_check_interval: Duration::from_secs(30),
            active_requests_url: None,
        }
    }
}

impl DrainConfig {
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if self.unhealthy_threshold == 0 {
            out.push((
                "drain.unhealthy_threshold".into(),
                "must be at least 1: the number of failed health checks after which the load balancer takes a target out (ALB UnhealthyThresholdCount, HAProxy fall)".into(),
            ));
        }
        if self.health_check_interval.is_zero() {
            out.push((
                "drain.health_check_interval".into(),
                "must be more than 0: how often the load balancer probes /ready (ALB HealthCheckIntervalSeconds, HAProxy inter)".into(),
            ));
        }
        if let Some(u) = &self.active_requests_url {
            match reqwest::Url::parse(u) {
                Ok(p) if p.scheme() == "http" || p.scheme() == "https" => {}
                _ => out.push((
                    "drain.active_requests_url".into(),
                    format!("`{u}` is not an http:// URL of nginx's stub_status (e.g. http://127.0.0.1/nginx_status)"),
                )),
            }
        }
        out
    }

    /// An address that probed within this before the drain is waited for.
    pub fn probe_window(&self) -> Duration {
        self.health_check_interval.saturating_mul(2)
    }
}

/// What the readiness listener knows about one source of `/ready` requests.
#[derive(Debug, Clone, PartialEq)]
pub struct Prober {
    pub addr: IpAddr,
    /// Its last probe before the drain began; None: it first probed during the drain.
    pub last_before_drain: Option<Instant>,
    /// The probe before that one.
    pub prev_before_drain: Option<Instant>,
    /// Its last probe of all.
    pub last: Instant,
    /// Probes answered with something other than 200 since the drain began.
    pub refused_since_drain: u32,
}

/// One reading of the web server's in-flight requests.
#[derive(Debug, Clone, PartialEq)]
pub enum InFlight {
    /// Requests being read or written, without the stub_status request itself.
    Count(u64),
    /// Nothing listens at the URL: the web server is not running, nothing is in flight.
    NotListening,
    /// No evidence: why (the URL, the status, the parse error).
    Unknown(String),
}

/// Parses nginx's stub_status page; in flight = Reading + Writing - 1 (its own request).
pub fn parse_stub_status(body: &str) -> Result<u64, String> {
    let field = |name: &str| -> Option<u64> {
        let mut words = body.split_whitespace();
        while let Some(w) = words.next() {
            if w == name {
                return words.next()?.parse().ok();
            }
        }
        None
    };
    match (field("Reading:"), field("Writing:")) {
        (Some(r), Some(w)) => Ok((r + w).saturating_sub(1)),
        _ => Err(format!(
            "not nginx stub_status output (no `Reading: N Writing: N`): `{}`",
            crate::text::truncate(&crate::text::escape(body.trim()), 120)
        )),
    }
}

/// Why the drain ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Evidence {
    pub elapsed: Duration,
    /// Probers waited for, by address, with their 503 answers since the drain began.
    pub probers: Vec<(IpAddr, u32)>,
    /// Probers that stopped probing instead.
    pub silent: Vec<IpAddr>,
    /// The last in-flight reading; None when not checked.
    pub in_flight: Option<InFlight>,
    /// Why in-flight requests were not checked.
    pub unchecked: Option<&'static str>,
    /// The upper bound ended the drain.
    pub bound: bool,
    /// What was still missing when the bound hit.
    pub missing: Option<String>,
}

impl std::fmt::Display for Evidence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        if self.bound {
            write!(
                f,
                "the upper bound drain.deregistration_delay ended the drain after {secs:.1} s"
            )?;
            if let Some(m) = &self.missing {
                write!(f, " ({m})")?;
            }
            return Ok(());
        }
        if self.probers.is_empty() && self.silent.is_empty() {
            write!(
                f,
                "no load balancer was probing /ready when the drain began"
            )?;
        } else {
            let answered: Vec<String> = self
                .probers
                .iter()
                .filter(|(a, _)| !self.silent.contains(a))
                .map(|(a, n)| format!("{n} from {a}"))
                .collect();
            if !answered.is_empty() {
                let total: u32 = self
                    .probers
                    .iter()
                    .filter(|(a, _)| !self.silent.contains(a))
                    .map(|(_, n)| n)
                    .sum();
                write!(f, "{total} probes answered 503 ({})", answered.join(", "))?;
            }
            if !self.silent.is_empty() {
                let s: Vec<String> = self.silent.iter().map(|a| a.to_string()).collect();
                write!(
                    f,
                    "{}{} stopped probing",
                    if answered.is_empty() { "" } else { "; " },
                    s.join(", ")
                )?;
            }
        }
        match &self.in_flight {
            None => write!(
                f,
                " (in-flight requests not checked: {})",
                self.unchecked.unwrap_or("-")
            )?,
            Some(InFlight::Count(n)) => write!(f, " and {n} requests in flight")?,
            Some(InFlight::NotListening) => {
                write!(f, " and the web server's stub_status is not listening")?
            }
            Some(InFlight::Unknown(_)) => {}
        }
        write!(f, " after {secs:.1} s")
    }
}

/// The verdict of one step.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Keep waiting. `read_in_flight`: read stub_status before the next step.
    Wait { read_in_flight: bool },
    /// The drain is over (on evidence, or because the bound hit: see `bound`).
    Done(Evidence),
}

/// One drain's progress: created when `/ready` turned 503, stepped with what was observed.
#[derive(Debug, Clone)]
pub struct Watch {
    cfg: DrainConfig,
    /// Why in-flight requests are not checked; None: they are.
    unchecked: Option<&'static str>,
    started: Instant,
    /// When every prober was done (the in-flight readings count from here).
    probes_done_at: Option<Instant>,
    /// The first of the current run of zero readings taken after `probes_done_at`.
    zero_since: Option<Instant>,
    last_reading: Option<InFlight>,
}

impl Watch {
    /// `stops_services`: a service has `stop_on_drain`. When nothing stops, a request in
    /// flight finishes anyway, and stub_status is not read.
    pub fn new(cfg: &DrainConfig, started: Instant, stops_services: bool) -> Watch {
        Watch {
            unchecked: if !stops_services {
                Some("no service stops on drain, so they finish anyway")
            } else if cfg.active_requests_url.is_none() {
                Some("drain.active_requests_url is unset")
            } else {
                None
            },
            cfg: cfg.clone(),
            started,
            probes_done_at: None,
            zero_since: None,
            last_reading: None,
        }
    }

    /// Records an in-flight reading taken at `at`.
    pub fn in_flight(&mut self, at: Instant, reading: InFlight) {
        let zero = matches!(reading, InFlight::Count(0) | InFlight::NotListening);
        let after_probes = self.probes_done_at.is_some_and(|p| at >= p);
        if zero && after_probes {
            self.zero_since.get_or_insert(at);
        } else {
            self.zero_since = None;
        }
        self.last_reading = Some(reading);
    }

    /// Decides, from the probes the listener saw and the clock, whether the drain is over.
    pub fn step(&mut self, now: Instant, probes: &[Prober]) -> Step {
        let window = self.cfg.probe_window();
        let elapsed = now.saturating_duration_since(self.started);
        let mut waited = Vec::new();
        let mut silent = Vec::new();
        let mut pending = Vec::new();
        for p in probes {
            let (Some(before), Some(prev)) = (p.last_before_drain, p.prev_before_drain) else {
                continue;
            };
            if self.started.saturating_duration_since(before) > window
                || before.saturating_duration_since(prev) > window
            {
                continue;
            }
            waited.push((p.addr, p.refused_since_drain));
            if p.refused_since_drain >= self.cfg.unhealthy_threshold {
                continue;
            }
            if now.saturating_duration_since(p.last) > window {
                silent.push(p.addr);
            } else {
                pending.push(p);
            }
        }
        waited.sort();
        silent.sort();
        let evidence = |bound: bool, missing: Option<String>, reading: Option<InFlight>| Evidence {
            elapsed,
            probers: waited.clone(),
            silent: silent.clone(),
            in_flight: reading,
            unchecked: self.unchecked,
            bound,
            missing,
        };
        if elapsed >= self.cfg.deregistration_delay {
            let missing = if !pending.is_empty() {
                let p: Vec<String> = pending
                    .iter()
                    .map(|p| {
                        format!(
                            "{} answered 503 {} of {} times",
                            p.addr, p.refused_since_drain, self.cfg.unhealthy_threshold
                        )
                    })
                    .collect();
                Some(format!("still probing: {}", p.join(", ")))
            } else {
                match &self.last_reading {
                    Some(InFlight::Count(n)) if *n > 0 => {
                        Some(format!("{n} requests still in flight"))
                    }
                    Some(InFlight::Unknown(why)) => {
                        Some(format!("in-flight requests unknown: {why}"))
                    }
                    _ => None,
                }
            };
            return Step::Done(evidence(true, missing, self.last_reading.clone()));
        }
        if !pending.is_empty() {
            return Step::Wait {
                read_in_flight: false,
            };
        }
        let done_at = *self.probes_done_at.get_or_insert(now);
        if self.unchecked.is_some() {
            return Step::Done(evidence(false, None, None));
        }
        match self.zero_since {
            Some(z) if now.saturating_duration_since(z) >= SETTLE && z >= done_at => {
                Step::Done(evidence(false, None, self.last_reading.clone()))
            }
            _ => Step::Wait {
                read_in_flight: true,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cfg(url: bool) -> DrainConfig {
        DrainConfig {
            active_requests_url: url.then(|| "http://127.0.0.1/nginx_status".into()),
            ..DrainConfig::default()
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn stub_status_in_flight_is_reading_plus_writing_minus_its_own_request() {
        let body = "Active connections: 291 \nserver accepts handled requests\n 16630948 16630948 31070465 \nReading: 6 Writing: 179 Waiting: 106 \n";
        assert_eq!(parse_stub_status(body), Ok(184));
        // idle keep-alive connections (Waiting) carry no request; the page's own request
        let idle = "Active connections: 9 \nserver accepts handled requests\n 1 1 1 \nReading: 0 Writing: 1 Waiting: 8 \n";
        assert_eq!(parse_stub_status(idle), Ok(0));
        let e = parse_stub_status("<html>404 Not Found</html>").unwrap_err();
        assert!(e.contains("not nginx stub_status"), "{e}");
    }

    /// Issue 11 item 10: a node nobody probes (no load balancer) drains at once.
    #[test]
    fn a_node_nobody_probes_drains_at_once() {
        let t0 = Instant::now();
        let mut w = Watch::new(&cfg(false), t0, true);
        match w.step(t0, &[]) {
            Step::Done(e) => {
                assert!(!e.bound);
                assert!(
                    e.to_string()
                        .starts_with("no load balancer was probing /ready when the drain began"),
                    "{e}"
                );
            }
            s => panic!("{s:?}"),
        }
        // probes long before the drain (a load balancer that took the node out an hour ago)
        let old = Prober {
            addr: ip("10.0.0.9"),
            last_before_drain: Some(t0 + ms(30_000)),
            prev_before_drain: Some(t0),
            last: t0 + ms(30_000),
            refused_since_drain: 0,
        };
        let later = t0 + Duration::from_secs(3600);
        let mut w = Watch::new(&cfg(false), later, true);
        assert!(matches!(w.step(later, std::slice::from_ref(&old)), Step::Done(e) if !e.bound));
        // an operator's single curl of /ready just before the drain, or two far apart
        let curl = Prober {
            last_before_drain: Some(later - ms(1000)),
            prev_before_drain: None,
            last: later - ms(1000),
            ..old.clone()
        };
        let twice = Prober {
            prev_before_drain: Some(later - ms(600_000)),
            ..curl.clone()
        };
        let mut w = Watch::new(&cfg(false), later, true);
        assert!(matches!(w.step(later, &[curl, twice]), Step::Done(e) if !e.bound));
    }

    #[test]
    fn waits_for_each_load_balancer_address_to_see_the_threshold() {
        let t0 = Instant::now() + Duration::from_secs(100);
        let a = |n, refused| Prober {
            addr: ip(n),
            last_before_drain: Some(t0 - ms(10_000)),
            prev_before_drain: Some(t0 - ms(40_000)),
            last: t0 + ms(500),
            refused_since_drain: refused,
        };
        let mut w = Watch::new(&cfg(false), t0, true);
        // one ALB node saw 2 x 503, the other only 1: wait
        assert_eq!(
            w.step(t0 + ms(600), &[a("10.0.1.5", 2), a("10.0.2.7", 1)]),
            Step::Wait {
                read_in_flight: false
            }
        );
        match w.step(t0 + ms(700), &[a("10.0.1.5", 3), a("10.0.2.7", 2)]) {
            Step::Done(e) => assert_eq!(
                e.to_string(),
                "5 probes answered 503 (3 from 10.0.1.5, 2 from 10.0.2.7) (in-flight requests not checked: drain.active_requests_url is unset) after 0.7 s"
            ),
            s => panic!("{s:?}"),
        }
    }

    #[test]
    fn a_prober_that_stops_probing_for_a_window_is_not_waited_for() {
        let t0 = Instant::now() + Duration::from_secs(100);
        let p = Prober {
            addr: ip("10.0.1.5"),
            last_before_drain: Some(t0 - ms(1000)),
            prev_before_drain: Some(t0 - ms(31_000)),
            last: t0 - ms(1000),
            refused_since_drain: 0,
        };
        let mut w = Watch::new(&cfg(false), t0, true);
        assert!(matches!(
            w.step(t0 + Duration::from_secs(58), std::slice::from_ref(&p)),
            Step::Wait { .. }
        ));
        match w.step(t0 + Duration::from_secs(60), &[p]) {
            Step::Done(e) => assert!(
                !e.bound && e.to_string().starts_with("10.0.1.5 stopped probing"),
                "{e}"
            ),
            s => panic!("{s:?}"),
        }
    }

    #[test]
    fn in_flight_must_read_zero_twice_a_settle_apart_after_the_probes() {
        let t0 = Instant::now() + Duration::from_secs(100);
        let p = |refused| Prober {
            addr: ip("127.0.0.1"),
            last_before_drain: Some(t0 - ms(100)),
            prev_before_drain: Some(t0 - ms(200)),
            last: t0,
            refused_since_drain: refused,
        };
        let mut w = Watch::new(&cfg(true), t0, true);
        // a zero before the load balancer took the node out proves nothing
        w.in_flight(t0 + ms(10), InFlight::Count(0));
        assert_eq!(
            w.step(t0 + ms(100), &[p(1)]),
            Step::Wait {
                read_in_flight: false
            }
        );
        assert_eq!(
            w.step(t0 + ms(200), &[p(2)]),
            Step::Wait {
                read_in_flight: true
            }
        );
        w.in_flight(t0 + ms(210), InFlight::Count(3));
        assert!(matches!(w.step(t0 + ms(260), &[p(2)]), Step::Wait { .. }));
        w.in_flight(t0 + ms(270), InFlight::Count(0));
        assert!(matches!(w.step(t0 + ms(320), &[p(2)]), Step::Wait { .. }));
        w.in_flight(t0 + ms(330), InFlight::Unknown("timeout".into()));
        w.in_flight(t0 + ms(380), InFlight::Count(0));
        assert!(matches!(w.step(t0 + ms(430), &[p(3)]), Step::Wait { .. }));
        w.in_flight(t0 + ms(480), InFlight::NotListening);
        match w.step(t0 + ms(500), &[p(3)]) {
            Step::Done(e) => assert_eq!(
                e.to_string(),
                "3 probes answered 503 (3 from 127.0.0.1) and the web server's stub_status is not listening after 0.5 s"
            ),
            s => panic!("{s:?}"),
        }
    }

    #[test]
    fn the_bound_ends_the_drain_and_says_what_was_missing() {
        let t0 = Instant::now() + Duration::from_secs(100);
        let c = DrainConfig {
            deregistration_delay: Duration::from_secs(5),
            ..cfg(true)
        };
        let p = Prober {
            addr: ip("10.0.1.5"),
            last_before_drain: Some(t0 - ms(100)),
            prev_before_drain: Some(t0 - ms(200)),
            last: t0 + ms(4900),
            refused_since_drain: 1,
        };
        let mut w = Watch::new(&c, t0, true);
        match w.step(t0 + Duration::from_secs(5), std::slice::from_ref(&p)) {
            Step::Done(e) => assert_eq!(
                e.to_string(),
                "the upper bound drain.deregistration_delay ended the drain after 5.0 s (still probing: 10.0.1.5 answered 503 1 of 2 times)"
            ),
            s => panic!("{s:?}"),
        }
        let mut w = Watch::new(&c, t0, true);
        let done = Prober {
            refused_since_drain: 2,
            ..p
        };
        assert!(matches!(
            w.step(t0 + ms(10), std::slice::from_ref(&done)),
            Step::Wait {
                read_in_flight: true
            }
        ));
        w.in_flight(
            t0 + ms(20),
            InFlight::Unknown("http://127.0.0.1/nginx_status answered 404".into()),
        );
        match w.step(t0 + Duration::from_secs(6), &[done]) {
            Step::Done(e) => assert!(
                e.bound
                    && e.to_string().ends_with(
                        "(in-flight requests unknown: http://127.0.0.1/nginx_status answered 404)"
                    ),
                "{e}"
            ),
            s => panic!("{s:?}"),
        }
        // 0: the operator asked for no waiting at all
        let mut w = Watch::new(
            &DrainConfig {
                deregistration_delay: Duration::ZERO,
                ..cfg(true)
            },
            t0,
            true,
        );
        assert!(matches!(w.step(t0, &[]), Step::Done(e) if e.bound));
    }

    #[test]
    fn in_flight_is_not_read_when_nothing_stops() {
        let t0 = Instant::now();
        let mut w = Watch::new(&cfg(true), t0, false);
        match w.step(t0, &[]) {
            Step::Done(e) => assert!(
                e.to_string().ends_with(
                    "(in-flight requests not checked: no service stops on drain, so they finish anyway) after 0.0 s"
                ),
                "{e}"
            ),
            s => panic!("{s:?}"),
        }
    }

    #[test]
    fn defaults_match_an_alb_target_group_and_fit_the_hook_timeout() {
        let d = DrainConfig::default();
        assert_eq!(d.unhealthy_threshold, 2);
        assert_eq!(d.health_check_interval, Duration::from_secs(30));
        assert!(d.deregistration_delay < Duration::from_secs(300));
        assert!(d.validate().is_empty());
        let bad = DrainConfig {
            unhealthy_threshold: 0,
            active_requests_url: Some("127.0.0.1/nginx_status".into()),
            ..d
        };
        let v = bad.validate();
        assert_eq!(v.len(), 2, "{v:?}");
    }
}
