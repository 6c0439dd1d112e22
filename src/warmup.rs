//! Warm-up: fetch a list of URLs with bounded concurrency before the node declares itself
//! ready, so the first customer does not pay for cold opcache and caches; and hold the
//! result to a latency budget (p95 time to first byte).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::info;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct WarmupConfig {
    pub urls: Vec<WarmupUrl>,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// How many times each URL is fetched.
    pub repeat: usize,
    /// p95 time to first byte (response headers) that the warm-up must meet. Unset: none.
    #[serde(with = "crate::config::opt_duration")]
    pub p95_ttfb_budget: Option<Duration>,
    #[serde(with = "crate::config::duration")]
    pub timeout: Duration,
}

impl Default for WarmupConfig {
    fn default() -> Self {
        WarmupConfig {
            urls: Vec::new(),
            concurrency: 4,
            repeat: 3,
            p95_ttfb_budget: None,
            timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct WarmupUrl {
    pub url: String,
    #[serde(default)]
    pub host: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum WarmupError {
    #[error("warm-up request to {url} failed: {reason}")]
    Request { url: String, reason: String },
    #[error(
        "warm-up missed its latency budget: p95 time to first byte {p95_ms} ms > {budget_ms} ms ({detail})"
    )]
    Budget {
        p95_ms: u64,
        budget_ms: u64,
        detail: String,
    },
}

/// The q-quantile (0..=1) of `xs` by nearest rank. Pure.
pub fn percentile(xs: &[Duration], q: f64) -> Duration {
    if xs.is_empty() {
        return Duration::ZERO;
    }
    let mut v = xs.to_vec();
    v.sort();
    let rank = ((q.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Fetches every URL `repeat` times with at most `concurrency` in flight; checks the budget.
pub async fn run(cfg: &WarmupConfig) -> Result<String, WarmupError> {
    if cfg.urls.is_empty() {
        return Ok("no warm-up configured".into());
    }
    let client = crate::health::http_client();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(cfg.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..cfg.repeat.max(1) {
        for (i, u) in cfg.urls.iter().enumerate() {
            let (client, sem, u, timeout) = (client.clone(), sem.clone(), u.clone(), cfg.timeout);
            tasks.spawn(async move {
                let _permit = sem.acquire_owned().await;
                let mut req = client.get(&u.url).timeout(timeout);
                if let Some(h) = &u.host {
                    req = req.header(reqwest::header::HOST, h);
                }
                let t0 = Instant::now();
                let resp = req.send().await;
                let ttfb = t0.elapsed();
                match resp {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        Ok((i, ttfb))
                    }
                    Ok(r) => Err(WarmupError::Request {
                        url: u.url.clone(),
                        reason: format!("status {}", r.status().as_u16()),
                    }),
                    Err(e) => Err(WarmupError::Request {
                        url: u.url.clone(),
                        reason: e.to_string(),
                    }),
                }
            });
        }
    }
    let mut per_url: Vec<Vec<Duration>> = vec![Vec::new(); cfg.urls.len()];
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok((i, d))) => per_url[i].push(d),
            Ok(Err(e)) => return Err(e),
            Err(e) => {
                return Err(WarmupError::Request {
                    url: "?".into(),
                    reason: e.to_string(),
                });
            }
        }
    }
    let all: Vec<Duration> = per_url.iter().flatten().copied().collect();
    let p95 = percentile(&all, 0.95);
    let detail = cfg
        .urls
        .iter()
        .zip(&per_url)
        .map(|(u, v)| {
            format!(
                "{} p50 {} ms p95 {} ms",
                u.url,
                percentile(v, 0.5).as_millis(),
                percentile(v, 0.95).as_millis()
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    if let Some(budget) = cfg.p95_ttfb_budget
        && p95 > budget
    {
        return Err(WarmupError::Budget {
            p95_ms: p95.as_millis() as u64,
            budget_ms: budget.as_millis() as u64,
            detail,
        });
    }
    let msg = format!(
        "warm-up: {} request(s), p95 time to first byte {} ms",
        all.len(),
        p95.as_millis()
    );
    info!("{msg} ({detail})");
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let ms = |v: &[u64]| {
            v.iter()
                .map(|m| Duration::from_millis(*m))
                .collect::<Vec<_>>()
        };
        let xs = ms(&[5, 1, 4, 2, 3, 6, 7, 8, 9, 10]);
        assert_eq!(percentile(&xs, 0.5), Duration::from_millis(5));
        assert_eq!(percentile(&xs, 0.95), Duration::from_millis(10));
        assert_eq!(percentile(&xs, 0.0), Duration::from_millis(1));
        assert_eq!(percentile(&[], 0.95), Duration::ZERO);
    }
}
