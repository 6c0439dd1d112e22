//! Magento's cron, paused for the whole fleet while a deployment may upgrade the database.
//!
//! Cron runs `bin/magento cron:run` every minute from `current`. A job that runs while
//! `setup:upgrade` changes the schema runs old code against a moving database, and a long
//! indexer transaction holds metadata locks that make the upgrade's ALTER TABLE wait, and
//! every request behind it. Deployer's magento2 recipe removes the crontab section
//! (`cron:remove`) and kills running jobs (`pkill -f 'bin/magento cron:run'`). bgagent does
//! it natively, without editing crontabs and without killing a job half way:
//!
//! - Cron runs `bgagent cron run` (one line in /etc/cron.d, as root; the job itself runs as
//!   `cron.command.user`, switched natively, in the current release's directory). Before it
//!   starts the job it takes a lease (a member of `bgagent:{app}:cron:running` in the fleet's
//!   Redis, renewed while the job and everything it started run; locally a shared `flock` on
//!   `<state_dir>/cron.lock` that the job and its children inherit), then reads the pause.
//!   While a pause is set it skips the run and says so.
//! - AfterInstall of a deployment that may upgrade the database (`cron.pause: upgrade`: when
//!   `schema.policy` is `upgrade` or a `schema.migration` is set; `always`: every deployment)
//!   sets the pause (`bgagent:{app}:cron:pause` in Redis, which the whole fleet reads, or
//!   `<state_dir>/cron-pause.json` without `cache.redis`), then waits up to
//!   `cron.wait_budget` for the running jobs: the fleet's leases, this node's lock, and this
//!   node's processes matching `cron.match` (jobs started some other way). Lease first, then
//!   the pause; pause first, then the leases: either the job sees the pause or the
//!   deployment sees the job.
//! - ApplicationStart resumes cron after the switch (and a failed AfterInstall or
//!   ApplicationStart resumes it too): the pause is removed when it still names this
//!   deployment. A pause also lapses by itself after `cron.pause_ttl`, so a deployment that
//!   never comes back cannot stop cron for good.
//!
//! [`should_pause`] and the wording are pure; the rest is I/O with deadlines.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::config::Config;
use crate::process::CommandSpec;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PauseWhen {
    /// Cron is never paused.
    #[default]
    Never,
    /// When the deployment may upgrade the database: `schema.policy: upgrade` or a
    /// `schema.migration`.
    Upgrade,
    /// During every deployment.
    Always,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBudget {
    /// Go on with the deployment, naming the jobs still running.
    #[default]
    Proceed,
    /// Fail AfterInstall (and resume cron); retry once the jobs are done.
    Fail,
}

/// `cron:` in the config.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct CronConfig {
    pub pause: PauseWhen,
    /// What `bgagent cron run` runs, in the current release's directory, e.g.
    /// `{ argv: [php, bin/magento, cron:run], user: www-data, timeout: 1h }`.
    pub command: Option<CommandSpec>,
    /// Command lines (substrings, arguments joined by spaces) of this node's running jobs
    /// that a pause waits for besides the leases of `bgagent cron run`.
    #[serde(rename = "match")]
    pub matches: Vec<String>,
    /// How long a pause waits for running jobs.
    #[serde(with = "crate::config::duration")]
    pub wait_budget: Duration,
    pub on_budget: OnBudget,
    /// A pause lapses by itself after this long.
    #[serde(with = "crate::config::duration")]
    pub pause_ttl: Duration,
}

impl Default for CronConfig {
    fn default() -> Self {
        CronConfig {
            pause: PauseWhen::Never,
            command: None,
            matches: vec!["bin/magento cron:run".into()],
            wait_budget: Duration::from_secs(300),
            on_budget: OnBudget::Proceed,
            pause_ttl: Duration::from_secs(2 * 3600),
        }
    }
}

impl CronConfig {
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if self.pause_ttl < self.wait_budget + Duration::from_secs(60) {
            out.push((
                "cron.pause_ttl".into(),
                format!(
                    "must exceed cron.wait_budget ({}) by at least a minute, or the pause lapses while the deployment waits",
                    humantime::format_duration(self.wait_budget)
                ),
            ));
        }
        if let Some(c) = &self.command
            && c.argv.is_empty()
        {
            out.push(("cron.command.argv".into(), "is empty".into()));
        }
        out
    }
}

/// Whether a deployment pauses cron under this config. Pure.
pub fn should_pause(cron: &CronConfig, schema: &crate::schema::SchemaConfig) -> bool {
    match cron.pause {
        PauseWhen::Never => false,
        PauseWhen::Always => true,
        PauseWhen::Upgrade => {
            schema.policy == crate::schema::Policy::Upgrade || schema.migration.is_some()
        }
    }
}

/// The pause, as stored (JSON) in Redis or the local file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pause {
    pub deployment: String,
    pub node: String,
    /// Unix seconds.
    pub since: u64,
    pub until: u64,
}

/// What a deployment did to cron, kept in the state file for `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CronRecord {
    pub deployment: String,
    pub paused_at: String,
    /// `redis` (the fleet) or `local` (this node only: no cache.redis).
    pub scope: String,
    pub waited_ms: u64,
    /// The jobs the pause waited for.
    pub waited_for: Vec<String>,
    /// Jobs still running when the budget ran out.
    pub still_running: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_at: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CronError {
    #[error("cron pause: {0}")]
    Redis(#[from] crate::cache::CacheError),
    #[error("cron pause: Redis at {url}: {message}")]
    Reply { url: String, message: String },
    #[error("cron pause: {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cron pause: {} job(s) still running after {waited:?} (cron.wait_budget, cron.on_budget: fail): {}; cron is resumed and deployment {deployment} stops here: retry AfterInstall once they are done, or raise cron.wait_budget",
        jobs.len(), jobs.join(", ")
    )]
    Budget {
        deployment: String,
        waited: Duration,
        jobs: Vec<String>,
    },
    #[error(
        "cron.command is not set: bgagent cron run has nothing to run (e.g. cron: {{ command: {{ argv: [php, bin/magento, cron:run], user: www-data }} }})"
    )]
    NoCommand,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Where the pause and the leases live.
enum Board {
    Fleet(crate::cache::Coordination),
    Local(PathBuf),
}

const LEASE: Duration = Duration::from_secs(60);

impl Board {
    async fn open(cfg: &Config, app: &str) -> Result<Board, CronError> {
        Ok(match crate::cache::coordination(&cfg.cache, app).await? {
            Some(c) => Board::Fleet(c),
            None => Board::Local(cfg.state_dir.clone()),
        })
    }
    fn scope(&self) -> &'static str {
        match self {
            Board::Fleet(_) => "redis",
            Board::Local(_) => "local",
        }
    }
    fn err(c: &crate::cache::Coordination, e: redis::RedisError) -> CronError {
        CronError::Reply {
            url: c.url.clone(),
            message: e.to_string(),
        }
    }
    fn local_file(dir: &Path) -> PathBuf {
        dir.join("cron-pause.json")
    }

    async fn set_pause(&mut self, p: &Pause) -> Result<(), CronError> {
        let json = serde_json::to_string(p).unwrap_or_default();
        match self {
            Board::Fleet(c) => {
                let ttl = p.until.saturating_sub(now_secs()).max(1);
                redis::cmd("SET")
                    .arg(format!("{}cron:pause", c.prefix))
                    .arg(&json)
                    .arg("EX")
                    .arg(ttl)
                    .query_async::<()>(&mut c.conn)
                    .await
                    .map_err(|e| Board::err(c, e))
            }
            Board::Local(dir) => {
                let path = Board::local_file(dir);
                crate::fsutil::write_atomic(&path, json.as_bytes(), 0o640)
                    .map_err(|source| CronError::Io { path, source })
            }
        }
    }

    /// The pause in force, if any (a lapsed one is none). Content that cannot be read
    /// counts as a pause (when in doubt, cron waits) that lapses `ttl` after it was written.
    async fn pause(&mut self, ttl: Duration) -> Result<Option<Pause>, CronError> {
        let unknown = |written: u64| Pause {
            deployment: "?".into(),
            node: "?".into(),
            since: written,
            until: written.saturating_add(ttl.as_secs()),
        };
        let p = match self {
            Board::Fleet(c) => {
                let raw: Option<String> = redis::cmd("GET")
                    .arg(format!("{}cron:pause", c.prefix))
                    .query_async(&mut c.conn)
                    .await
                    .map_err(|e| Board::err(c, e))?;
                // The key's own TTL bounds an unreadable one.
                raw.map(|r| serde_json::from_str::<Pause>(&r).unwrap_or(unknown(now_secs())))
            }
            Board::Local(dir) => {
                let path = Board::local_file(dir);
                match std::fs::read_to_string(&path) {
                    Ok(r) => Some(serde_json::from_str::<Pause>(&r).unwrap_or_else(|_| {
                        let written = std::fs::metadata(&path)
                            .and_then(|m| m.modified())
                            .ok()
                            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                            .map(|d| d.as_secs())
                            .unwrap_or(0);
                        unknown(written)
                    })),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    Err(source) => return Err(CronError::Io { path, source }),
                }
            }
        };
        Ok(p.filter(|p| p.until > now_secs()))
    }

    /// Removes the pause if it names `deployment`. Returns whether it did.
    async fn clear_pause(&mut self, deployment: &str) -> Result<bool, CronError> {
        match self {
            Board::Fleet(c) => {
                let key = format!("{}cron:pause", c.prefix);
                let raw: Option<String> = redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut c.conn)
                    .await
                    .map_err(|e| Board::err(c, e))?;
                let Some(raw) = raw.filter(|r| {
                    serde_json::from_str::<Pause>(r).is_ok_and(|p| p.deployment == deployment)
                }) else {
                    return Ok(false);
                };
                // Only this exact value: a newer deployment's pause set since stays.
                let n: i64 = redis::Script::new(
                    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
                )
                .key(&key)
                .arg(&raw)
                .invoke_async(&mut c.conn)
                .await
                .map_err(|e| Board::err(c, e))?;
                Ok(n == 1)
            }
            Board::Local(dir) => {
                let path = Board::local_file(dir);
                let ours = std::fs::read_to_string(&path).ok().is_some_and(|r| {
                    serde_json::from_str::<Pause>(&r).is_ok_and(|p| p.deployment == deployment)
                });
                if ours {
                    std::fs::remove_file(&path).map_err(|source| CronError::Io { path, source })?;
                }
                Ok(ours)
            }
        }
    }

    /// The fleet's running `bgagent cron run` leases (`node:pid`), lapsed ones dropped.
    async fn leases(&mut self) -> Result<Vec<String>, CronError> {
        match self {
            Board::Fleet(c) => {
                let key = format!("{}cron:running", c.prefix);
                let now = now_secs();
                let (members,): (Vec<String>,) = redis::pipe()
                    .cmd("ZREMRANGEBYSCORE")
                    .arg(&key)
                    .arg("-inf")
                    .arg(now)
                    .ignore()
                    .cmd("ZRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut c.conn)
                    .await
                    .map_err(|e| Board::err(c, e))?;
                Ok(members)
            }
            Board::Local(_) => Ok(Vec::new()),
        }
    }

    async fn hold_lease(&mut self, member: &str) -> Result<(), CronError> {
        if let Board::Fleet(c) = self {
            redis::cmd("ZADD")
                .arg(format!("{}cron:running", c.prefix))
                .arg(now_secs() + LEASE.as_secs())
                .arg(member)
                .query_async::<()>(&mut c.conn)
                .await
                .map_err(|e| Board::err(c, e))?;
        }
        Ok(())
    }

    async fn drop_lease(&mut self, member: &str) -> Result<(), CronError> {
        if let Board::Fleet(c) = self {
            redis::cmd("ZREM")
                .arg(format!("{}cron:running", c.prefix))
                .arg(member)
                .query_async::<()>(&mut c.conn)
                .await
                .map_err(|e| Board::err(c, e))?;
        }
        Ok(())
    }
}

/// This node's lock file: `bgagent cron run` and the job it starts hold it shared.
fn lock_path(state_dir: &Path) -> PathBuf {
    state_dir.join("cron.lock")
}

fn open_lock(state_dir: &Path) -> Result<std::fs::File, CronError> {
    let path = lock_path(state_dir);
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|source| CronError::Io { path, source })
}

/// Whether a `bgagent cron run` (or a job it started) on this node holds the lock.
fn local_lock_held(state_dir: &Path) -> bool {
    use rustix::fs::{FlockOperation, flock};
    let Ok(f) = open_lock(state_dir) else {
        return false;
    };
    match flock(&f, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {
            let _ = flock(&f, FlockOperation::Unlock);
            false
        }
        Err(_) => true,
    }
}

/// The running jobs a pause waits for: the fleet's leases, this node's lock, this node's
/// processes matching `cron.match`.
async fn running_jobs(board: &mut Board, cfg: &Config) -> Result<Vec<String>, CronError> {
    let mut jobs: Vec<String> = board
        .leases()
        .await?
        .into_iter()
        .map(|m| format!("bgagent cron run {m}"))
        .collect();
    let state_dir = cfg.state_dir.clone();
    let patterns = cfg.cron.matches.clone();
    let (held, procs) = tokio::task::spawn_blocking(move || {
        (
            local_lock_held(&state_dir),
            crate::procs::running_commands(&patterns),
        )
    })
    .await
    .unwrap_or_default();
    if held && jobs.is_empty() {
        jobs.push("a bgagent cron run on this node".into());
    }
    jobs.extend(
        procs
            .into_iter()
            .map(|(pid, what)| format!("pid {pid} {what}")),
    );
    Ok(jobs)
}

/// Sets the pause for `deployment`, then waits for the running jobs within
/// `cron.wait_budget`. Returns the record for `status`.
pub async fn pause(cfg: &Config, app: &str, deployment: &str) -> Result<CronRecord, CronError> {
    let mut board = Board::open(cfg, app).await?;
    let now = now_secs();
    let node = crate::cache::node_name(&cfg.cache);
    board
        .set_pause(&Pause {
            deployment: deployment.into(),
            node,
            since: now,
            until: now + cfg.cron.pause_ttl.as_secs(),
        })
        .await?;
    info!(
        "cron paused for deployment {deployment} ({}; lapses after {} unless resumed)",
        match board.scope() {
            "redis" => "fleet-wide, through the fleet's Redis",
            _ => "this node only: cache.redis is not set",
        },
        humantime::format_duration(cfg.cron.pause_ttl)
    );
    let t0 = Instant::now();
    let mut waited_for: Vec<String> = Vec::new();
    let mut said = Vec::new();
    let still = loop {
        let jobs = running_jobs(&mut board, cfg).await?;
        for j in &jobs {
            if !waited_for.contains(j) {
                waited_for.push(j.clone());
            }
        }
        if jobs.is_empty() {
            break Vec::new();
        }
        if jobs != said {
            info!(
                "waiting for {} running cron job(s) to finish (up to {}): {}",
                jobs.len(),
                humantime::format_duration(cfg.cron.wait_budget),
                jobs.join(", ")
            );
            said = jobs.clone();
        }
        if t0.elapsed() >= cfg.cron.wait_budget {
            break jobs;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let waited = t0.elapsed();
    if !still.is_empty() {
        match cfg.cron.on_budget {
            OnBudget::Fail => {
                return Err(CronError::Budget {
                    deployment: deployment.into(),
                    waited,
                    jobs: still,
                });
            }
            OnBudget::Proceed => warn!(
                "{} cron job(s) still running after {} (cron.wait_budget); going on (cron.on_budget: proceed): {}",
                still.len(),
                humantime::format_duration(cfg.cron.wait_budget),
                still.join(", ")
            ),
        }
    } else if !waited_for.is_empty() {
        info!(
            "the {} running cron job(s) finished after {:.1}s",
            waited_for.len(),
            waited.as_secs_f64()
        );
    }
    Ok(CronRecord {
        deployment: deployment.into(),
        paused_at: crate::lifecycle::timestamp(SystemTime::now()),
        scope: board.scope().into(),
        waited_ms: waited.as_millis() as u64,
        waited_for,
        still_running: still,
        resumed_at: None,
    })
}

/// Removes `deployment`'s pause. Returns whether there was one to remove.
pub async fn resume(cfg: &Config, app: &str, deployment: &str) -> Result<bool, CronError> {
    let mut board = Board::open(cfg, app).await?;
    board.clear_pause(deployment).await
}

/// What `bgagent cron run` did.
#[derive(Debug)]
pub enum RunOutcome {
    /// Not run, and why (a pause, no current release).
    Skipped(String),
    /// Run; whether it succeeded, in words.
    Ran(Result<String, String>),
}

/// `bgagent cron run`: the job, unless cron is paused (see the module doc).
pub async fn run_guarded(cfg: &Config) -> Result<RunOutcome, CronError> {
    let spec = cfg.cron.command.clone().ok_or(CronError::NoCommand)?;
    // The app name, as the daemon uses it: the config's, else CodeDeploy's from the state.
    let app = crate::cache::app_name(
        cfg.app.name.as_deref(),
        crate::state::read(&cfg.state_dir).ok().as_ref(),
    );
    // The lease comes first, then the pause is read (see the module doc).
    let lock = open_lock(&cfg.state_dir)?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockShared).map_err(|e| {
        CronError::Io {
            path: lock_path(&cfg.state_dir),
            source: e.into(),
        }
    })?;
    let mut board = Board::open(cfg, &app).await?;
    let member = format!(
        "{}:{}",
        crate::cache::node_name(&cfg.cache),
        std::process::id()
    );
    board.hold_lease(&member).await?;
    let outcome = run_leased(cfg, &spec, &mut board, &member, &lock).await;
    if let Err(e) = board.drop_lease(&member).await {
        warn!(
            "{e}; the lease lapses by itself within {}s",
            LEASE.as_secs()
        );
    }
    outcome
}

async fn run_leased(
    cfg: &Config,
    spec: &CommandSpec,
    board: &mut Board,
    member: &str,
    lock: &std::fs::File,
) -> Result<RunOutcome, CronError> {
    if let Some(p) = board.pause(cfg.cron.pause_ttl).await? {
        return Ok(RunOutcome::Skipped(format!(
            "cron is paused by deployment {} (node {}) until {}; this run is skipped",
            crate::text::escape(&p.deployment),
            crate::text::escape(&p.node),
            humantime::format_rfc3339_seconds(
                UNIX_EPOCH + Duration::from_secs(p.until.min(253402300799))
            )
        )));
    }
    let layout = crate::release::Layout::new(&cfg.app_root);
    let Some(current) = layout.current() else {
        return Ok(RunOutcome::Skipped(format!(
            "{} has no current release; nothing to run",
            cfg.app_root.display()
        )));
    };
    // The release's own directory, not `current`: the job keeps the code it started with,
    // and its cwd says which release that is (procs finds it after the next switch).
    let dir = layout.release_dir(&current);
    // Jobs Magento starts in the background (cron:run --group=...) are reparented to us
    // when their parent exits: the lease lasts until they are done too.
    let _ = rustix::process::set_child_subreaper(Some(rustix::process::getpid()));
    let mut env = std::collections::BTreeMap::new();
    env.insert("BGAGENT_RELEASE_DIR".to_string(), dir.display().to_string());
    use std::os::fd::AsRawFd;
    // On our own stdout and stderr (cron's, or the log its line redirects to): Magento's
    // background group jobs keep cron:run's stderr, and must not be taken for processes
    // left behind.
    let run = crate::process::run_attached(spec, Some(&dir), &env, Some(lock.as_raw_fd()));
    tokio::pin!(run);
    let mut renew = tokio::time::interval(LEASE / 3);
    renew.tick().await;
    let result = loop {
        tokio::select! {
            r = &mut run => break r,
            _ = renew.tick() => {
                if let Err(e) = board.hold_lease(member).await {
                    warn!("{e}");
                }
            }
        }
    };
    // Wait for the orphans (bounded by the command's own timeout).
    let deadline = Instant::now() + spec.timeout;
    let mut waited_orphans = false;
    loop {
        match rustix::process::wait(rustix::process::WaitOptions::NOHANG) {
            Ok(Some(_)) => continue,
            Ok(None) if Instant::now() < deadline => {
                if !waited_orphans {
                    info!("waiting for the jobs it started in the background");
                    waited_orphans = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = renew.tick() => {
                        if let Err(e) = board.hold_lease(member).await {
                            warn!("{e}");
                        }
                    }
                }
            }
            Ok(None) => {
                warn!(
                    "jobs it started still run after {} (cron.command.timeout); the lease ends, this node's lock stays with them",
                    humantime::format_duration(spec.timeout)
                );
                break;
            }
            Err(_) => break,
        }
    }
    Ok(RunOutcome::Ran(match result {
        Ok(f) => Ok(format!(
            "`{}` finished in {:.1}s in {}",
            spec.argv.join(" "),
            f.duration.as_secs_f64(),
            dir.display()
        )),
        Err(e) => Err(e.to_string()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{Policy, SchemaConfig};

    #[test]
    fn pause_follows_the_config_and_the_schema_policy() {
        let mut cron = CronConfig::default();
        let mut schema = SchemaConfig::default();
        assert!(!should_pause(&cron, &schema));
        cron.pause = PauseWhen::Upgrade;
        assert!(!should_pause(&cron, &schema));
        schema.policy = Policy::Upgrade;
        assert!(should_pause(&cron, &schema));
        cron.pause = PauseWhen::Always;
        schema.policy = Policy::Fail;
        assert!(should_pause(&cron, &schema));
    }

    #[test]
    fn a_ttl_shorter_than_the_wait_is_refused() {
        let c = CronConfig {
            wait_budget: Duration::from_secs(600),
            pause_ttl: Duration::from_secs(300),
            ..Default::default()
        };
        assert_eq!(c.validate()[0].0, "cron.pause_ttl");
        assert!(CronConfig::default().validate().is_empty());
    }

    /// A local pause file that cannot be read holds cron back, but only for pause_ttl after
    /// it was written (it has no TTL of its own, unlike the Redis key).
    #[tokio::test]
    async fn an_unreadable_local_pause_holds_until_its_ttl_from_the_write() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("cron-pause.json");
        std::fs::write(&path, "{not json").unwrap();
        let mut b = Board::Local(d.path().to_path_buf());
        let ttl = Duration::from_secs(3600);
        let p = b.pause(ttl).await.unwrap().expect("a pause");
        assert_eq!(p.deployment, "?");
        let old = rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec {
                tv_sec: 1,
                tv_nsec: 0,
            },
            last_modification: rustix::fs::Timespec {
                tv_sec: (now_secs() - 7200) as i64,
                tv_nsec: 0,
            },
        };
        rustix::fs::utimensat(rustix::fs::CWD, &path, &old, rustix::fs::AtFlags::empty()).unwrap();
        assert_eq!(b.pause(ttl).await.unwrap(), None);
    }
}
