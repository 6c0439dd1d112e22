//! Cache generations: each release gets its own Redis databases for Magento's cache
//! frontends, so old and new code never share cache entries while both serve.
//!
//! The config names two (or more) generation slots, each mapping the `default` and
//! `page_cache` frontends to Redis databases; sessions keep one database that never
//! alternates. The chosen slot reaches templates as `deploy.cache` and is shown in status.
//!
//! Agreement across the fleet goes through Redis, never node-local state. Its keys live in
//! the session database (never flushed, never a slot's):
//! - `bgagent:{app}:live` holds the live generation `{slot, deployment}` (AfterAllowTraffic).
//! - AfterInstall: every node computes the slot after the live one and races
//!   `SET bgagent:{app}:deployment:{id}:slot <slot> NX`; all then read the winner, so nodes of
//!   one deployment agree even when they run at the same instant.
//! - The slot is flushed once before first use: the node that wins
//!   `SET ...:{id}:flush <node> NX EX <flush_timeout + timeout>` runs `FLUSHDB ASYNC` on the
//!   slot's two databases (never FLUSHALL, never the session database; ASYNC so Redis keeps
//!   answering sessions while millions of keys are freed in the background) and then sets
//!   `...:{id}:flushed`; the others wait for that mark. The claim is given back on any error
//!   and expires by itself if its node dies, so a retry on any node takes over and finishes
//!   the flush; the node named in a claim takes it back on its own retry. A slot that a node
//!   still serves (`bgagent:{app}:serving:{slot}`) is never flushed: the deployment fails
//!   instead, naming the nodes; one whose heartbeat is older than `stale_after` is named as
//!   silent (its daemon is down, its web server may not be), never taken for gone.
//! - `bgagent:{app}:epoch` names the Redis state the agreements were made in, and each
//!   release records the epoch it was agreed under. Redis restarted without persistence has
//!   none (or a newer one): a node whose current release knows an older epoch then knows the
//!   fleet's agreement and registrations were lost. The first node to see it writes a new
//!   epoch naming the deployment in progress, and that deployment is refused on every node
//!   (AfterInstall and ApplicationStart): never re-derived silently. The next deployment
//!   adopts the new epoch; its nodes re-register the slot they serve and take their own slot
//!   as the live one when the live pointer is gone.
//! - Every Redis call has a deadline from the config: `cache.timeout` for connecting and for
//!   each coordination round trip, `cache.flush_timeout` for a flush.
//! - ApplicationStart registers the node as serving the new slot and leaves the old one. A
//!   drain (ApplicationStop, BeforeBlockTraffic) deregisters it: out of the load balancer it
//!   serves nothing, so a node lagging behind a deployment does not block the next one's
//!   flush once that deployment has drained it; coming back to ready registers it again.
//! - A rollback makes the previous generation live again, without a flush.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct CacheConfig {
    /// Redis used to agree on generations across the fleet, e.g. redis://10.0.0.5:6379.
    /// Unset: no agreement is possible, every release uses slot 0.
    pub redis: Option<String>,
    /// Sessions' database: never alternates, never flushed.
    pub session_db: u32,
    pub slots: Vec<Slot>,
    /// Prefix of cache ids; the slot number is appended. Default: the application name.
    pub id_prefix: Option<String>,
    /// This node's name in the serving registry. Default: the host name.
    pub node: Option<String>,
    /// A serving registration older than this is reported as silent: it still keeps its slot
    /// from being flushed (the node's web server may serve on while its daemon is down).
    #[serde(with = "crate::config::duration")]
    pub stale_after: std::time::Duration,
    /// How long nodes wait for the one that flushes a new generation.
    #[serde(with = "crate::config::duration")]
    pub flush_wait: std::time::Duration,
    /// Deadline for connecting to Redis and for each coordination round trip.
    #[serde(with = "crate::config::duration")]
    pub timeout: std::time::Duration,
    /// Deadline for one FLUSHDB ASYNC reply (the freeing itself goes on in the background).
    #[serde(with = "crate::config::duration")]
    pub flush_timeout: std::time::Duration,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
pub struct Slot {
    pub default_db: u32,
    pub page_cache_db: u32,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            redis: None,
            session_db: 2,
            slots: vec![
                Slot {
                    default_db: 0,
                    page_cache_db: 1,
                },
                Slot {
                    default_db: 3,
                    page_cache_db: 4,
                },
            ],
            id_prefix: None,
            node: None,
            stale_after: std::time::Duration::from_secs(3600),
            flush_wait: std::time::Duration::from_secs(60),
            timeout: std::time::Duration::from_secs(5),
            flush_timeout: std::time::Duration::from_secs(60),
        }
    }
}

impl CacheConfig {
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (key, d) in [
            ("cache.timeout", self.timeout),
            ("cache.flush_timeout", self.flush_timeout),
        ] {
            if d.is_zero() {
                out.push((key.into(), "must be more than 0s".into()));
            }
        }
        if self.slots.is_empty() {
            out.push((
                "cache.slots".into(),
                "name at least one slot (two to alternate)".into(),
            ));
        }
        let mut seen = std::collections::BTreeMap::new();
        for (i, s) in self.slots.iter().enumerate() {
            if s.default_db == s.page_cache_db {
                out.push((
                    format!("cache.slots.{i}"),
                    "default_db and page_cache_db must differ".into(),
                ));
            }
            for db in [s.default_db, s.page_cache_db] {
                if db == self.session_db {
                    out.push((
                        format!("cache.slots.{i}"),
                        format!("database {db} is the session database; sessions never alternate"),
                    ));
                }
                if let Some(j) = seen.insert(db, i).filter(|j| *j != i) {
                    out.push((
                        format!("cache.slots.{i}"),
                        format!("database {db} is also used by slot {j}"),
                    ));
                }
            }
        }
        out
    }

    /// The template facts for `slot`.
    pub fn facts(&self, slot: usize, app: &str) -> serde_json::Value {
        let s = self.slots.get(slot).copied().unwrap_or(Slot {
            default_db: 0,
            page_cache_db: 1,
        });
        let prefix = self
            .id_prefix
            .clone()
            .unwrap_or_else(|| format!("{}_", sanitize(app)));
        serde_json::json!({
            "slot": slot,
            "default_db": s.default_db,
            "page_cache_db": s.page_cache_db,
            "session_db": self.session_db,
            "id_prefix": format!("{prefix}{slot}_"),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache generations: Redis at {url}: {message}")]
    Redis { url: String, message: String },
    #[error(
        "cache generations: slot {slot} is still served by {nodes}; it cannot be flushed for deployment {deployment}. Finish or roll back the previous deployment first (a node that lags behind it stops counting once this deployment drains it: ApplicationStop or BeforeBlockTraffic). A node listed here that no longer serves slot {slot} (terminated, replaced) is removed with: redis-cli -n {db} HDEL {key} <node>"
    )]
    StillServed {
        slot: usize,
        nodes: String,
        deployment: String,
        db: u32,
        key: String,
    },
    #[error(
        "cache generations: Redis at {url} lost bgagent's fleet state ({what}; a restart without persistence?) before or during deployment {deployment}. Nodes that agreed on a slot before the loss may have chosen differently from the rest, so bgagent refuses deployment {deployment} on every node rather than re-derive the agreement; the current release keeps serving. Start a new deployment (CodeDeploy: deploy the revision again): its nodes re-register what they serve and agree anew"
    )]
    StateLost {
        url: String,
        what: String,
        deployment: String,
    },
    #[error(
        "cache generations: node {flusher} claimed the flush of slot {slot} for deployment {deployment} and did not finish it within {waited:?} (cache.flush_wait). Its claim expires within {expires_in}s; retry this event after that and this node takes the flush over (or sooner, once {flusher}'s own retry finishes it)"
    )]
    FlushTimeout {
        slot: usize,
        flusher: String,
        deployment: String,
        waited: std::time::Duration,
        expires_in: i64,
    },
}

/// The app's name as the fleet's keys use it: `app.name`, else CodeDeploy's APPLICATION_NAME
/// of the deployment in the state, else "app".
pub fn app_name(configured: Option<&str>, doc: Option<&crate::state::StateDoc>) -> String {
    configured
        .map(str::to_string)
        .or_else(|| {
            doc.and_then(|d| d.deployment.as_ref())
                .and_then(|d| d.origin.application_name.clone())
        })
        .unwrap_or_else(|| "app".into())
}

/// This node's name.
pub fn node_name(cfg: &CacheConfig) -> String {
    if let Some(n) = &cfg.node {
        return n.clone();
    }
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

/// A Redis URL as it may be shown: the password (everything before `@`) replaced.
pub fn shown(url: &str) -> String {
    // never print a password from the URL
    match (url.find("://"), url.rfind('@')) {
        (Some(a), Some(b)) if a < b => format!("{}***{}", &url[..a + 3], &url[b..]),
        _ => url.to_string(),
    }
}

/// The URL of database `db` on the configured server.
pub fn with_db(url: &str, db: u32) -> String {
    let base = match url.rfind('/') {
        Some(i)
            if i > url.find("://").map(|j| j + 2).unwrap_or(0)
                && url[i + 1..].chars().all(|c| c.is_ascii_digit()) =>
        {
            &url[..i]
        }
        _ => url,
    };
    format!("{}/{db}", base.trim_end_matches('/'))
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The Redis state that agreements are made in (see the module doc).
#[derive(Debug, Serialize, Deserialize)]
struct Epoch {
    id: String,
    created: u64,
    by: String,
    /// The deployment whose node wrote it: the one refused if it replaced a lost epoch.
    during: String,
    #[serde(default)]
    after_loss_of: Option<String>,
}

/// What this node knows of the fleet from its current release.
#[derive(Debug, Default, Clone, Copy)]
pub struct Known<'a> {
    /// The epoch its generation was agreed under (None: no release, or one from before
    /// epochs were recorded).
    pub epoch: Option<&'a str>,
    /// The slot it serves.
    pub slot: Option<usize>,
}

fn new_epoch_id(node: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{nanos:x}-{:x}-{}", std::process::id(), sanitize(node))
}

struct Fleet {
    url: String,
    conn: redis::aio::MultiplexedConnection,
    app: String,
}

impl Fleet {
    /// A connection whose every reply must come within `reply` (connecting within
    /// `connect`): a stalled or blocked Redis fails the call with its URL, never hangs it.
    async fn connect(
        url: &str,
        app: &str,
        connect: std::time::Duration,
        reply: std::time::Duration,
    ) -> Result<Fleet, CacheError> {
        let err = |e: redis::RedisError| CacheError::Redis {
            url: shown(url),
            message: e.to_string(),
        };
        let client = redis::Client::open(url).map_err(err)?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connect))
            .set_response_timeout(Some(reply));
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(err)?;
        Ok(Fleet {
            url: url.to_string(),
            conn,
            app: sanitize(app),
        })
    }
    /// The coordination keys' connection: the session database, which is never flushed.
    async fn coordination(cfg: &CacheConfig, url: &str, app: &str) -> Result<Fleet, CacheError> {
        Fleet::connect(&with_db(url, cfg.session_db), app, cfg.timeout, cfg.timeout).await
    }

    fn err(&self, e: redis::RedisError) -> CacheError {
        CacheError::Redis {
            url: shown(&self.url),
            message: e.to_string(),
        }
    }
    fn key(&self, rest: &str) -> String {
        format!("bgagent:{}:{rest}", self.app)
    }
    async fn get(&mut self, k: &str) -> Result<Option<String>, CacheError> {
        redis::cmd("GET")
            .arg(k)
            .query_async(&mut self.conn)
            .await
            .map_err(|e| self.err(e))
    }
    async fn set_nx(&mut self, k: &str, v: &str) -> Result<bool, CacheError> {
        self.set_nx_ex(k, v, 7 * 24 * 3600).await
    }
    async fn set_nx_ex(&mut self, k: &str, v: &str, secs: u64) -> Result<bool, CacheError> {
        let r: Option<String> = redis::cmd("SET")
            .arg(k)
            .arg(v)
            .arg("NX")
            .arg("EX")
            .arg(secs)
            .query_async(&mut self.conn)
            .await
            .map_err(|e| self.err(e))?;
        Ok(r.is_some())
    }
    async fn set_ex(&mut self, k: &str, v: &str, secs: u64) -> Result<(), CacheError> {
        redis::cmd("SET")
            .arg(k)
            .arg(v)
            .arg("EX")
            .arg(secs)
            .query_async(&mut self.conn)
            .await
            .map_err(|e| self.err(e))
    }
    /// Deletes `k` only while it still holds `v` (one script: no window for another claim).
    async fn del_if(&mut self, k: &str, v: &str) -> Result<(), CacheError> {
        let _: i64 = redis::Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
        )
        .key(k)
        .arg(v)
        .invoke_async(&mut self.conn)
        .await
        .map_err(|e| self.err(e))?;
        Ok(())
    }
    async fn ttl(&mut self, k: &str) -> Result<i64, CacheError> {
        redis::cmd("TTL")
            .arg(k)
            .query_async(&mut self.conn)
            .await
            .map_err(|e| self.err(e))
    }
    /// The current epoch, written if Redis has none. Refuses `deployment` when this node's
    /// known epoch was lost; adopts a newer epoch written during an earlier deployment.
    async fn epoch(
        &mut self,
        node: &str,
        deployment: &str,
        known: Known<'_>,
    ) -> Result<Epoch, CacheError> {
        let k = self.key("epoch");
        let read = |v: Option<String>| v.and_then(|v| serde_json::from_str::<Epoch>(&v).ok());
        let mut current = read(self.get(&k).await?);
        if current.is_none() {
            let e = Epoch {
                id: new_epoch_id(node),
                created: now_secs(),
                by: node.to_string(),
                during: deployment.to_string(),
                after_loss_of: known.epoch.map(str::to_string),
            };
            // no expiry: it must last as long as Redis keeps its data
            let _: Option<String> = redis::cmd("SET")
                .arg(&k)
                .arg(serde_json::to_string(&e).unwrap_or_default())
                .arg("NX")
                .query_async(&mut self.conn)
                .await
                .map_err(|e| self.err(e))?;
            current = read(self.get(&k).await?);
        }
        let Some(e) = current else {
            return Err(CacheError::Redis {
                url: shown(&self.url),
                message: format!("{k} is unreadable or vanished as it was written"),
            });
        };
        match known.epoch {
            None => Ok(e),
            Some(k) if k == e.id => Ok(e),
            Some(k) if e.during == deployment => Err(CacheError::StateLost {
                url: shown(&self.url),
                what: format!(
                    "this node's generation was agreed under epoch {k}; node {} found it gone and wrote epoch {}",
                    e.by, e.id
                ),
                deployment: deployment.into(),
            }),
            Some(k) => {
                tracing::warn!(
                    "Redis at {} lost bgagent's fleet state (epoch {k}) before deployment {} (node {} wrote epoch {}); this deployment agrees anew",
                    shown(&self.url),
                    e.during,
                    e.by,
                    e.id
                );
                Ok(e)
            }
        }
    }

    async fn live(&mut self) -> Result<Option<(usize, String)>, CacheError> {
        let k = self.key("live");
        Ok(self.get(&k).await?.and_then(|v| {
            let j: serde_json::Value = serde_json::from_str(&v).ok()?;
            Some((
                j["slot"].as_u64()? as usize,
                j["deployment"].as_str().unwrap_or("").to_string(),
            ))
        }))
    }
    /// Every node registered as serving `slot`, described for an operator: a registration
    /// older than `stale_after` is a node whose daemon went silent, which still counts (its
    /// web server may well serve on).
    async fn servers(
        &mut self,
        slot: usize,
        stale_after: std::time::Duration,
    ) -> Result<Vec<String>, CacheError> {
        let k = self.key(&format!("serving:{slot}"));
        let all: std::collections::HashMap<String, u64> = redis::cmd("HGETALL")
            .arg(&k)
            .query_async(&mut self.conn)
            .await
            .map_err(|e| self.err(e))?;
        Ok(describe_servers(all, now_secs(), stale_after))
    }
}

/// Registrations as an operator reads them, sorted: fresh ones by name, silent ones with
/// how long they have been silent. Pure.
fn describe_servers(
    all: std::collections::HashMap<String, u64>,
    now: u64,
    stale_after: std::time::Duration,
) -> Vec<String> {
    let mut v: Vec<String> = all
        .into_iter()
        .map(|(n, t)| {
            let age = now.saturating_sub(t);
            if age < stale_after.as_secs() {
                n
            } else {
                format!(
                    "{n} (silent for {}: its bgagent has not refreshed the registration, but its web server may still serve)",
                    humantime::format_duration(std::time::Duration::from_secs(age))
                )
            }
        })
        .collect();
    v.sort();
    v
}

/// AfterInstall: agrees with the fleet on this deployment's slot, flushes it once, and
/// returns the template facts.
pub async fn choose(
    cfg: &CacheConfig,
    app: &str,
    deployment: &str,
    known: Known<'_>,
) -> Result<serde_json::Value, CacheError> {
    let Some(url) = &cfg.redis else {
        let mut f = cfg.facts(0, app);
        f["agreed"] = serde_json::Value::Bool(false);
        return Ok(f);
    };
    let node = node_name(cfg);
    let mut fleet = Fleet::coordination(cfg, url, app).await?;
    let epoch = fleet.epoch(&node, deployment, known).await?;
    let adopted = known.epoch.is_some_and(|k| k != epoch.id);
    if adopted && let Some(s) = known.slot {
        // the registrations went with the lost state: this node's comes back first
        register(cfg, &mut fleet, &node, s).await?;
    }
    let mut live = fleet.live().await?;
    if live.is_none()
        && adopted
        && let Some(s) = known.slot
    {
        tracing::warn!(
            "the live generation went with Redis's lost state; taking this node's own slot {s} as live"
        );
        live = Some((s, String::new()));
    }
    let candidate = next_slot(live.as_ref().map(|l| l.0), cfg.slots.len());
    let slot_key = fleet.key(&format!("deployment:{deployment}:slot"));
    fleet.set_nx(&slot_key, &candidate.to_string()).await?;
    let slot: usize = fleet
        .get(&slot_key)
        .await?
        .and_then(|v| v.parse().ok())
        .unwrap_or(candidate);
    let _: i64 = redis::Script::new(SEQ_SCRIPT)
        .key(fleet.key(&format!("deployment:{deployment}:seq")))
        .key(fleet.key("deployments"))
        .arg(7 * 24 * 3600)
        .invoke_async(&mut fleet.conn)
        .await
        .map_err(|e| fleet.err(e))?;
    flush_once(cfg, url, app, &mut fleet, &node, slot, deployment).await?;
    tracing::info!(
        "cache generation for deployment {deployment}: slot {slot} (agreed through Redis; live slot {:?})",
        live.map(|l| l.0)
    );
    let mut f = cfg.facts(slot, app);
    f["agreed"] = serde_json::Value::Bool(true);
    f["epoch"] = serde_json::Value::String(epoch.id);
    Ok(f)
}

/// ApplicationStart, before this node serves a release agreed under `release_epoch`: the
/// fleet's Redis state must be the one it was agreed in (else the deployment straddled a
/// loss of that state and is refused, see the module doc).
pub async fn check_agreement(
    cfg: &CacheConfig,
    app: &str,
    deployment: &str,
    release_epoch: Option<&str>,
) -> Result<(), CacheError> {
    let (Some(url), Some(k)) = (&cfg.redis, release_epoch) else {
        return Ok(());
    };
    let node = node_name(cfg);
    let mut fleet = Fleet::coordination(cfg, url, app).await?;
    let known = Known {
        epoch: Some(k),
        slot: None,
    };
    let e = fleet.epoch(&node, deployment, known).await?;
    if e.id != k {
        return Err(CacheError::StateLost {
            url: shown(url),
            what: format!(
                "this release was agreed under epoch {k}; node {} wrote epoch {} during deployment {}",
                e.by, e.id, e.during
            ),
            deployment: deployment.into(),
        });
    }
    Ok(())
}

/// Who holds the flush claim of one deployment.
enum Claim {
    /// This node: a fresh claim, or its own from an attempt that did not finish.
    Mine,
    Theirs(String),
    /// Nobody holds it any more (given back or expired): try again.
    Free,
}

/// Flushes `slot` once for `deployment` across the fleet: whoever claims the flush does it,
/// the others wait for the `flushed` mark. A claim given back or expired is taken over, so
/// an interrupted or failed flush is finished by the next attempt on any node.
#[allow(clippy::too_many_arguments)]
async fn flush_once(
    cfg: &CacheConfig,
    url: &str,
    app: &str,
    fleet: &mut Fleet,
    node: &str,
    slot: usize,
    deployment: &str,
) -> Result<(), CacheError> {
    let flushed_key = fleet.key(&format!("deployment:{deployment}:flushed"));
    let flush_key = fleet.key(&format!("deployment:{deployment}:flush"));
    // The claim outlives one flush reply by a round trip; a node that dies lets it lapse.
    let claim_ttl = (cfg.flush_timeout + cfg.timeout).as_secs().max(1);
    let t0 = std::time::Instant::now();
    // Waiting nodes poll with a growing pause: 500 nodes polling every 50 ms would send
    // Redis (the session server) 30k commands a second for as long as a flush takes.
    let mut pause = std::time::Duration::from_millis(20);
    loop {
        if fleet.get(&flushed_key).await?.is_some() {
            return Ok(());
        }
        let claim = if fleet.set_nx_ex(&flush_key, node, claim_ttl).await? {
            Claim::Mine
        } else {
            match fleet.get(&flush_key).await? {
                Some(by) if by == node => {
                    // our own claim from an attempt that failed or died: renew and finish it
                    fleet.set_ex(&flush_key, node, claim_ttl).await?;
                    Claim::Mine
                }
                Some(by) => Claim::Theirs(by),
                None => Claim::Free,
            }
        };
        match claim {
            Claim::Mine => {
                let r = flush_claimed(cfg, url, app, fleet, slot, deployment).await;
                let r = match r {
                    Ok(()) => fleet.set_ex(&flushed_key, node, 7 * 24 * 3600).await,
                    Err(e) => Err(e),
                };
                if r.is_err() {
                    // give the claim back so the next attempt, here or on another node,
                    // takes the flush over at once (it lapses by itself if Redis is gone)
                    let _ = fleet.del_if(&flush_key, node).await;
                }
                return r;
            }
            Claim::Free => continue,
            Claim::Theirs(by) => {
                if t0.elapsed() > cfg.flush_wait {
                    let expires_in = fleet.ttl(&flush_key).await.unwrap_or(-2).max(0);
                    return Err(CacheError::FlushTimeout {
                        slot,
                        flusher: by,
                        deployment: deployment.into(),
                        waited: cfg.flush_wait,
                        expires_in,
                    });
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(1));
            }
        }
    }
}

/// The flush itself, under this node's claim: refuses a slot that a node still serves.
async fn flush_claimed(
    cfg: &CacheConfig,
    url: &str,
    app: &str,
    fleet: &mut Fleet,
    slot: usize,
    deployment: &str,
) -> Result<(), CacheError> {
    let servers = fleet.servers(slot, cfg.stale_after).await?;
    if !servers.is_empty() {
        return Err(CacheError::StillServed {
            slot,
            nodes: servers.join(", "),
            deployment: deployment.into(),
            db: cfg.session_db,
            key: fleet.key(&format!("serving:{slot}")),
        });
    }
    let s = cfg.slots.get(slot).copied().unwrap_or(Slot {
        default_db: 0,
        page_cache_db: 1,
    });
    let t0 = std::time::Instant::now();
    for db in [s.default_db, s.page_cache_db] {
        let mut c = Fleet::connect(&with_db(url, db), app, cfg.timeout, cfg.flush_timeout).await?;
        // ASYNC: Redis swaps in an empty database and frees the old keys in a background
        // thread, so sessions (another database on the same server) keep answering.
        let _: () = redis::cmd("FLUSHDB")
            .arg("ASYNC")
            .query_async(&mut c.conn)
            .await
            .map_err(|e| c.err(e))?;
    }
    tracing::info!(
        "flushed cache generation slot {slot} (databases {} and {}, FLUSHDB ASYNC) for deployment {deployment} in {:.2}s",
        s.default_db,
        s.page_cache_db,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// ApplicationStart and rollbacks: this node now serves `slot` (and no other).
pub async fn mark_serving(cfg: &CacheConfig, app: &str, slot: usize) -> Result<(), CacheError> {
    let Some(url) = &cfg.redis else { return Ok(()) };
    let node = node_name(cfg);
    let mut fleet = Fleet::coordination(cfg, url, app).await?;
    register(cfg, &mut fleet, &node, slot).await
}

/// A drain took this node out of the load balancer: it serves no generation until it comes
/// back (its slot may then be flushed for a deployment that supersedes the one it lags in).
pub async fn mark_not_serving(cfg: &CacheConfig, app: &str) -> Result<(), CacheError> {
    let Some(url) = &cfg.redis else { return Ok(()) };
    let node = node_name(cfg);
    let mut fleet = Fleet::coordination(cfg, url, app).await?;
    for slot in 0..cfg.slots.len() {
        let k = fleet.key(&format!("serving:{slot}"));
        let _: i64 = redis::cmd("HDEL")
            .arg(&k)
            .arg(&node)
            .query_async(&mut fleet.conn)
            .await
            .map_err(|e| fleet.err(e))?;
    }
    Ok(())
}

/// `node` serves `slot` and no other.
async fn register(
    cfg: &CacheConfig,
    fleet: &mut Fleet,
    node: &str,
    slot: usize,
) -> Result<(), CacheError> {
    for other in 0..cfg.slots.len() {
        let k = fleet.key(&format!("serving:{other}"));
        if other == slot {
            let _: () = redis::cmd("HSET")
                .arg(&k)
                .arg(&node)
                .arg(now_secs())
                .query_async(&mut fleet.conn)
                .await
                .map_err(|e| fleet.err(e))?;
        } else {
            let _: i64 = redis::cmd("HDEL")
                .arg(&k)
                .arg(&node)
                .query_async(&mut fleet.conn)
                .await
                .map_err(|e| fleet.err(e))?;
        }
    }
    Ok(())
}

/// Moves the live pointer to `deployment`'s generation unless a newer deployment already
/// moved it (deployments are numbered in the order they first agreed on a slot; one from
/// before numbering counts as 0). Returns 1 when moved, 0 when superseded.
const LIVE_SCRIPT: &str = r"
local s = tonumber(redis.call('GET', KEYS[1]) or '0')
local cur = tonumber(redis.call('GET', KEYS[2]) or '0')
if s < cur then return 0 end
redis.call('SET', KEYS[3], ARGV[1])
if s > 0 then redis.call('SET', KEYS[2], s) end
return 1
";

/// Numbers a deployment the first time it agrees on a slot (the same number ever after).
const SEQ_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SET', KEYS[1], redis.call('INCR', KEYS[2]), 'EX', ARGV[1])
end
return tonumber(redis.call('GET', KEYS[1]))
";

/// ValidateService and AfterAllowTraffic: `slot` is the live generation. No flush. A late
/// event of a deployment that a newer one superseded leaves the fleet's pointer alone.
pub async fn mark_live(
    cfg: &CacheConfig,
    app: &str,
    slot: usize,
    deployment: &str,
) -> Result<(), CacheError> {
    let Some(url) = &cfg.redis else { return Ok(()) };
    let mut fleet = Fleet::coordination(cfg, url, app).await?;
    let v = serde_json::json!({ "slot": slot, "deployment": deployment }).to_string();
    let moved: i64 = redis::Script::new(LIVE_SCRIPT)
        .key(fleet.key(&format!("deployment:{deployment}:seq")))
        .key(fleet.key("live_seq"))
        .key(fleet.key("live"))
        .arg(v)
        .invoke_async(&mut fleet.conn)
        .await
        .map_err(|e| fleet.err(e))?;
    if moved == 0 {
        let (live_slot, live_dep) = match fleet.live().await? {
            Some((s, d)) => (s.to_string(), d),
            None => ("?".into(), "?".into()),
        };
        tracing::warn!(
            "deployment {deployment} was superseded: the fleet's live generation belongs to deployment {live_dep} (slot {live_slot}) and stays so"
        );
    }
    Ok(())
}

/// `bgagent rollback` on this node: it serves `slot` again. The fleet's live pointer is the
/// fleet's: it moves back only once no node is registered on the live slot any more.
pub async fn rolled_back(cfg: &CacheConfig, app: &str, slot: usize) -> Result<(), CacheError> {
    let Some(url) = &cfg.redis else { return Ok(()) };
    let node = node_name(cfg);
    let mut fleet = Fleet::coordination(cfg, url, app).await?;
    register(cfg, &mut fleet, &node, slot).await?;
    let Some((live, dep)) = fleet.live().await? else {
        return Ok(());
    };
    if live == slot {
        return Ok(());
    }
    let left = fleet.servers(live, cfg.stale_after).await?;
    if left.is_empty() {
        let v = serde_json::json!({ "slot": slot, "deployment": "rollback" }).to_string();
        fleet
            .set_ex(&fleet.key("live"), &v, 10 * 365 * 24 * 3600)
            .await?;
        tracing::info!(
            "no node serves slot {live} (deployment {dep}) any more: the fleet's live generation is slot {slot} again"
        );
    } else {
        tracing::info!(
            "this node serves slot {slot} again; the fleet's live generation stays slot {live} (deployment {dep}) while {} serve it",
            left.join(", ")
        );
    }
    Ok(())
}

/// The serving registry of `slot` (node -> unix seconds of its last heartbeat): which nodes
/// serve a generation, for other fleet-wide steps (a maintenance window) to wait for.
pub fn serving_key(app: &str, slot: usize) -> String {
    format!("bgagent:{}:serving:{slot}", sanitize(app))
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(24)
        .collect()
}

/// A connection to the fleet's coordination database, for another concern that agrees
/// through the same Redis (cron's fleet-wide pause): the session database (never flushed),
/// `cache.timeout` on connecting and on every reply, keys under `prefix` (`bgagent:{app}:`).
pub struct Coordination {
    pub conn: redis::aio::MultiplexedConnection,
    pub prefix: String,
    /// The server, as it may be shown (no password).
    pub url: String,
}

/// The coordination connection, or None without `cache.redis`.
pub async fn coordination(
    cfg: &CacheConfig,
    app: &str,
) -> Result<Option<Coordination>, CacheError> {
    let Some(url) = &cfg.redis else {
        return Ok(None);
    };
    let f = Fleet::coordination(cfg, url, app).await?;
    Ok(Some(Coordination {
        prefix: f.key(""),
        url: shown(url),
        conn: f.conn,
    }))
}

/// The slot after the live one (slot 0 when none is live). Pure.
pub fn next_slot(live: Option<usize>, n_slots: usize) -> usize {
    match live {
        Some(l) if n_slots > 0 => (l + 1) % n_slots,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_alternate() {
        assert_eq!(next_slot(None, 2), 0);
        assert_eq!(next_slot(Some(0), 2), 1);
        assert_eq!(next_slot(Some(1), 2), 0);
        assert_eq!(next_slot(Some(1), 3), 2);
    }

    #[test]
    fn overlapping_databases_are_refused() {
        let mut c = CacheConfig::default();
        c.slots[1].default_db = 1;
        c.session_db = 0;
        let v = c.validate();
        assert!(
            v.iter().any(|(_, m)| m.contains("session database")),
            "{v:?}"
        );
        assert!(
            v.iter().any(|(_, m)| m.contains("also used by slot 0")),
            "{v:?}"
        );
        assert!(CacheConfig::default().validate().is_empty());
    }

    #[test]
    fn facts_carry_a_prefix_per_generation() {
        let f = CacheConfig::default().facts(1, "magento prod");
        assert_eq!(f["default_db"], 3);
        assert_eq!(f["id_prefix"], "magento_prod_1_");
    }
}
