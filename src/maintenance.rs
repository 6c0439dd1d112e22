//! Magento's maintenance flag on every node at once, for a breaking schema change taken with
//! a maintenance window (`schema.breaking: maintenance`), for the shortest time: on right
//! before setup:upgrade, off on each node right after it has switched to the new release.
//!
//! Old code cannot serve on a database a breaking change has moved, and setup:upgrade runs
//! on one node for the fleet, so every node must stop serving old code first. Coordination
//! goes through the fleet's Redis (`cache.redis`, the session database, like the cache
//! generation keys):
//!
//! - `bgagent:{app}:maintenance` names the deployment whose window is open (with a TTL,
//!   `schema.maintenance_ttl`, so a deployment that never comes back cannot keep the shop
//!   down for good);
//! - every daemon configured for it watches (every 250 ms): while a window is open for a
//!   deployment its current release does not belong to, it runs `bin/magento
//!   maintenance:enable` in that release and joins `...:maintenance:{deployment}:on`; once
//!   its current release belongs to the deployment (it has switched), it runs
//!   `maintenance:disable` in the release it put into maintenance and joins `...:off`; a node
//!   that was not switched when the window closed takes its flag off then. Its heartbeat in
//!   `bgagent:{app}:maintenance:nodes` tells the opener which nodes to wait for;
//! - the node that runs setup:upgrade (under the fleet's lock) opens the window and waits
//!   until every node has its flag on (`schema.maintenance_wait`): every node that watches,
//!   and every node registered as serving a cache generation (`cache::serving_key`), so a
//!   serving node whose daemon is down is waited for, not forgotten; if one does not,
//!   it closes the window again and fails before anything changed. The window is deleted
//!   when every node that turned maintenance on has switched.
//!
//! What a node does is decided by [`decide`] (pure); the rest is I/O with deadlines. The
//! release a node put into maintenance is kept in `<state_dir>/maintenance.json`, so a
//! restarted daemon still takes the flag off.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::process::CommandSpec;

/// How the fleet's Redis is reached for the window.
#[derive(Debug, Clone)]
pub struct Coordinator {
    /// redis:// URL with the session database.
    pub url: String,
    pub app: String,
    pub node: String,
    pub timeout: Duration,
    /// How long the opener waits for every node's flag.
    pub wait: Duration,
    /// The window's safety TTL.
    pub ttl: Duration,
    /// The cache generations' slot count and staleness: nodes registered as serving one
    /// (`cache::serving_key`) are waited for too, so a node whose daemon does not watch
    /// (down, or configured otherwise) keeps the window from opening.
    pub slots: usize,
    pub stale_after: Duration,
}

/// A heartbeat older than this is a node that no longer watches: not waited for.
const HEARTBEAT_FRESH: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(250);

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Coordinator {
    /// The coordinator the config describes (`cache.redis`, its session database, the
    /// `schema.maintenance_*` bounds), or None without `cache.redis`. `app` as the
    /// deployments name it (see [`crate::cache::app_name`]).
    pub fn from_config(cfg: &crate::config::Config, app: String) -> Option<Coordinator> {
        cfg.cache.redis.as_ref().map(|url| Coordinator {
            url: crate::cache::with_db(url, cfg.cache.session_db),
            app,
            node: crate::cache::node_name(&cfg.cache),
            timeout: cfg.cache.timeout,
            wait: cfg.schema.maintenance_wait,
            ttl: cfg.schema.maintenance_ttl,
            slots: cfg.cache.slots.len(),
            stale_after: cfg.cache.stale_after,
        })
    }

    /// The server as it may be shown: never a password from the URL.
    fn shown(&self) -> String {
        crate::text::escape(&crate::cache::shown(&self.url))
    }

    /// The open window: the deployment it is open for and how long until its TTL closes
    /// it; None when no window is open.
    pub async fn window(&self) -> Result<Option<(String, Option<Duration>)>, String> {
        let fail = |e: String| format!("Redis at {}: {e}", self.shown());
        let mut c = self.conn().await.map_err(fail)?;
        let open: Option<String> = c.get(self.key("")).await.map_err(|e| fail(e.to_string()))?;
        let Some(dep) = open else { return Ok(None) };
        let ttl: i64 = c.ttl(self.key("")).await.map_err(|e| fail(e.to_string()))?;
        Ok(Some((
            dep,
            u64::try_from(ttl).ok().map(Duration::from_secs),
        )))
    }

    /// `bgagent maintenance close`: closes the open window now (an operator's decision, for
    /// a window a failed setup:upgrade left open), if it is `expected`'s when that is given.
    /// Every node's watcher then takes its maintenance flag off within a round. Returns the
    /// deployment whose window was closed; None when none was open.
    pub async fn close(&self, expected: Option<&str>) -> Result<Option<String>, String> {
        let fail = |e: String| format!("Redis at {}: {e}", self.shown());
        let mut c = self.conn().await.map_err(fail)?;
        let open: Option<String> = c.get(self.key("")).await.map_err(|e| fail(e.to_string()))?;
        let Some(dep) = open else { return Ok(None) };
        if let Some(x) = expected
            && x != dep
        {
            return Err(format!(
                "the open maintenance window is deployment {}'s, not {}'s: nothing was closed",
                crate::text::escape(&dep),
                crate::text::escape(x)
            ));
        }
        // Deleted only if it is still the same deployment's window (a new one may have
        // opened since it was read).
        let deleted: i64 = redis::Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end",
        )
        .key(self.key(""))
        .arg(&dep)
        .invoke_async(&mut c)
        .await
        .map_err(|e| fail(e.to_string()))?;
        if deleted == 0 {
            return Err(format!(
                "the maintenance window of deployment {} changed while it was being closed: nothing was closed; look again",
                crate::text::escape(&dep)
            ));
        }
        Ok(Some(dep))
    }

    fn key(&self, rest: &str) -> String {
        if rest.is_empty() {
            format!("bgagent:{}:maintenance", self.app)
        } else {
            format!("bgagent:{}:maintenance:{rest}", self.app)
        }
    }

    async fn conn(&self) -> Result<redis::aio::MultiplexedConnection, String> {
        let client = redis::Client::open(self.url.as_str()).map_err(|e| e.to_string())?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| e.to_string())
    }

    /// Opens the window for `deployment` and waits until every watching node has turned
    /// maintenance on. Returns the nodes.
    pub async fn open(&self, deployment: &str) -> Result<Vec<String>, String> {
        let shown = self.shown();
        let fail = |e: String| format!("Redis at {shown}: {e}");
        let mut c = self.conn().await.map_err(fail)?;
        let _: () = c
            .set_ex(self.key(""), deployment, self.ttl.as_secs().max(1))
            .await
            .map_err(|e| fail(e.to_string()))?;
        info!(
            "maintenance window open for deployment {deployment}: waiting for every node to turn Magento's maintenance flag on"
        );
        let t0 = Instant::now();
        loop {
            let beats: std::collections::HashMap<String, u64> = c
                .hgetall(self.key("nodes"))
                .await
                .map_err(|e| fail(e.to_string()))?;
            let on: Vec<String> = c
                .smembers(self.key(&format!("{deployment}:on")))
                .await
                .map_err(|e| fail(e.to_string()))?;
            let now = now_secs();
            let mut want: Vec<String> = beats
                .into_iter()
                .filter(|(_, t)| now.saturating_sub(*t) <= HEARTBEAT_FRESH.as_secs())
                .map(|(n, _)| n)
                .collect();
            for slot in 0..self.slots {
                let serving: std::collections::HashMap<String, u64> = c
                    .hgetall(crate::cache::serving_key(&self.app, slot))
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                want.extend(
                    serving
                        .into_iter()
                        .filter(|(_, t)| now.saturating_sub(*t) <= self.stale_after.as_secs())
                        .map(|(n, _)| n),
                );
            }
            want.sort();
            want.dedup();
            let missing: Vec<&String> = want.iter().filter(|n| !on.contains(n)).collect();
            if missing.is_empty() && want.contains(&self.node) {
                info!("maintenance on for nodes {}", want.join(", "));
                return Ok(want);
            }
            if t0.elapsed() >= self.wait {
                let _: Result<(), _> = c.del(self.key("")).await;
                let missing: Vec<String> = if want.contains(&self.node) {
                    missing.into_iter().cloned().collect()
                } else {
                    vec![self.node.clone()]
                };
                return Err(format!(
                    "maintenance could not be confirmed within {:?} (schema.maintenance_wait) on node(s) {}: they serve (or their daemon watches) but did not turn Magento's maintenance flag on (is their daemon running, with schema.breaking: maintenance and the same cache.redis?). Nothing was changed and the window is closed",
                    self.wait,
                    missing.join(", ")
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// What this node has done: the release it put into maintenance, for which deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enabled {
    pub deployment: String,
    pub release: String,
}

/// What a node does in one round.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Nothing,
    /// Turn maintenance on in the current release.
    Enable {
        deployment: String,
        release: String,
    },
    /// Turn it off in the release it was turned on in; `switched`: because this node now
    /// serves the window's deployment.
    Disable {
        release: String,
        switched: bool,
    },
}

/// Pure: the window (the deployment it is open for), this node's current release and its
/// deployment, and what this node did before.
pub fn decide(
    window: Option<&str>,
    current: Option<(&str, &str)>,
    enabled: Option<&Enabled>,
) -> Action {
    match (window, enabled) {
        (Some(w), None) => match current {
            Some((release, dep)) if dep != w => Action::Enable {
                deployment: w.to_string(),
                release: release.to_string(),
            },
            _ => Action::Nothing,
        },
        (Some(w), Some(e)) if e.deployment == w => match current {
            Some((_, dep)) if dep == w => Action::Disable {
                release: e.release.clone(),
                switched: true,
            },
            _ => Action::Nothing,
        },
        (_, Some(e)) => Action::Disable {
            release: e.release.clone(),
            switched: false,
        },
        (None, None) => Action::Nothing,
    }
}

fn saved(state_dir: &Path) -> PathBuf {
    state_dir.join("maintenance.json")
}

/// Magento's maintenance flag, where Magento looks for it in a release.
pub const FLAG: &str = "var/.maintenance.flag";

/// This node's Magento maintenance, for `status`: whether the current release has Magento's
/// flag (its storefront answers 503 while it does; `var/` may be shared, then every release
/// has it), and the fleet window that put it there when this daemon did. Read only.
pub fn node_status(state_dir: &Path, layout: &crate::release::Layout) -> serde_json::Value {
    let flag = layout
        .current()
        .map(|c| layout.release_dir(&c).join(FLAG).exists())
        .unwrap_or(false);
    let by_window: Option<Enabled> = std::fs::read(saved(state_dir))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    serde_json::json!({ "flag": flag, "window": by_window })
}

async fn magento(php: &str, release_dir: &Path, cmd: &str) -> Result<(), String> {
    let mut spec = CommandSpec::new(&[php, "bin/magento", cmd, "--no-ansi"]);
    spec.timeout = Duration::from_secs(60);
    crate::process::run(&spec, Some(release_dir), &Default::default())
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The daemon's watcher: one round every 250 ms, for as long as the daemon runs.
pub async fn watch(
    mut co: Coordinator,
    app: Option<String>,
    php: String,
    layout: crate::release::Layout,
    state_dir: PathBuf,
) {
    let mut enabled: Option<Enabled> = std::fs::read(saved(&state_dir))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let mut conn = None;
    let mut last_error = String::new();
    loop {
        tokio::time::sleep(POLL).await;
        if conn.is_none() {
            match co.conn().await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    if e != last_error {
                        warn!("maintenance watcher: Redis at {}: {e}", co.shown());
                        last_error = e;
                    }
                    continue;
                }
            }
        }
        let c = conn.as_mut().expect("connected");
        let round: Result<(), redis::RedisError> = async {
            let current = layout.current();
            let doc = crate::state::read(&state_dir).ok();
            // the app's name as the deployments name it (app.name, else CodeDeploy's)
            co.app = crate::cache::app_name(app.as_deref(), doc.as_ref());
            let _: () = c.hset(co.key("nodes"), &co.node, now_secs()).await?;
            let window: Option<String> = c.get(co.key("")).await?;
            let cur_dep = current.as_ref().and_then(|id| {
                doc.as_ref()
                    .and_then(|d| d.releases.get(id))
                    .map(|r| r.deployment_id.clone())
            });
            let cur = current.as_deref().zip(cur_dep.as_deref());
            match decide(window.as_deref(), cur, enabled.as_ref()) {
                Action::Nothing => {
                    if let (Some(w), Some(e)) = (&window, &enabled)
                        && &e.deployment == w
                    {
                        let _: () = c.sadd(co.key(&format!("{w}:on")), &co.node).await?;
                    }
                }
                Action::Enable {
                    deployment,
                    release,
                } => {
                    let dir = layout.release_dir(&release);
                    match magento(&php, &dir, "maintenance:enable").await {
                        Ok(()) => {
                            info!(
                                "maintenance on in release {release} for deployment {deployment}'s schema upgrade"
                            );
                            let e = Enabled {
                                deployment: deployment.clone(),
                                release,
                            };
                            let _ = crate::fsutil::write_atomic(
                                &saved(&state_dir),
                                &serde_json::to_vec(&e).unwrap_or_default(),
                                0o600,
                            );
                            enabled = Some(e);
                            let _: () = c
                                .sadd(co.key(&format!("{deployment}:on")), &co.node)
                                .await?;
                        }
                        Err(e) => warn!(
                            "could not turn maintenance on in release {release} (bin/magento maintenance:enable): {e}"
                        ),
                    }
                }
                Action::Disable { release, switched } => {
                    let dir = layout.release_dir(&release);
                    let was = enabled.as_ref().map(|e| e.deployment.clone()).unwrap_or_default();
                    match magento(&php, &dir, "maintenance:disable").await {
                        Ok(()) => {
                            info!(
                                "maintenance off in release {release} ({})",
                                if switched {
                                    "this node has switched to the new release"
                                } else {
                                    "the window closed"
                                }
                            );
                            let _ = std::fs::remove_file(saved(&state_dir));
                            enabled = None;
                            if switched {
                                let _: () =
                                    c.sadd(co.key(&format!("{was}:off")), &co.node).await?;
                                // the last node to switch closes the window
                                let on: Vec<String> =
                                    c.smembers(co.key(&format!("{was}:on"))).await?;
                                let off: Vec<String> =
                                    c.smembers(co.key(&format!("{was}:off"))).await?;
                                if on.iter().all(|n| off.contains(n)) {
                                    let _: () = c.del(co.key("")).await?;
                                    info!("maintenance window for deployment {was} closed: every node has switched");
                                }
                            }
                        }
                        Err(e) => warn!(
                            "could not turn maintenance off in release {release} (bin/magento maintenance:disable): {e}"
                        ),
                    }
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = round {
            warn!("maintenance watcher: Redis at {}: {e}", co.shown());
            conn = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(dep: &str, rel: &str) -> Enabled {
        Enabled {
            deployment: dep.into(),
            release: rel.into(),
        }
    }

    #[tokio::test]
    async fn a_redis_password_in_cache_redis_was_printed_in_maintenance_errors() {
        let co = Coordinator {
            url: "redis://:s3cr3t-pw@127.0.0.1:1/2".into(),
            app: "shop".into(),
            node: "n".into(),
            timeout: Duration::from_secs(2),
            wait: Duration::from_secs(1),
            ttl: Duration::from_secs(60),
            slots: 2,
            stale_after: Duration::from_secs(60),
        };
        for e in [
            co.open("d-1").await.unwrap_err(),
            co.close(None).await.unwrap_err(),
            co.window().await.unwrap_err(),
        ] {
            assert!(e.contains("redis://***@127.0.0.1:1/2"), "{e}");
            assert!(!e.contains("s3cr3t"), "the password leaked: {e}");
        }
    }

    #[test]
    fn a_node_serving_old_code_turns_maintenance_on_and_off_after_its_switch() {
        // no window: nothing
        assert_eq!(decide(None, Some(("r1", "d-1")), None), Action::Nothing);
        // a window for d-2 while r1 (d-1) serves: on
        assert_eq!(
            decide(Some("d-2"), Some(("r1", "d-1")), None),
            Action::Enable {
                deployment: "d-2".into(),
                release: "r1".into()
            }
        );
        // on already: nothing more
        assert_eq!(
            decide(Some("d-2"), Some(("r1", "d-1")), Some(&on("d-2", "r1"))),
            Action::Nothing
        );
        // switched to d-2's release: off in r1, the release it was turned on in
        assert_eq!(
            decide(Some("d-2"), Some(("r2", "d-2")), Some(&on("d-2", "r1"))),
            Action::Disable {
                release: "r1".into(),
                switched: true
            }
        );
        // the window closed (or is another deployment's) before this node switched: off
        assert_eq!(
            decide(None, Some(("r1", "d-1")), Some(&on("d-2", "r1"))),
            Action::Disable {
                release: "r1".into(),
                switched: false
            }
        );
        // a node already on the new release is never put into maintenance
        assert_eq!(
            decide(Some("d-2"), Some(("r2", "d-2")), None),
            Action::Nothing
        );
    }
}
