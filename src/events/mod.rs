//! What each lifecycle event does, and the engine that runs them.
//!
//! The [`Engine`] owns the state store. For each request it asks the pure state machine
//! ([`crate::lifecycle::decide`]) whether the event may run, records the start, performs the
//! event's work by calling the concern modules, and records the outcome, saving the state
//! after each step so a restart loses nothing.
//!
//! Each event's work lives in its own module, in the order a deployment runs them, so one
//! deployment's data path reads straight through:
//! [`drain`] (ApplicationStop, BeforeBlockTraffic) -> [`preflight`] (BeforeInstall) ->
//! [`install`] (AfterInstall) -> [`start`] (ApplicationStart) -> [`validate`]
//! (ValidateService) -> the traffic events (here, in [`Engine::perform_builtin`]).
//! The operator's own commands are [`deploy`] and [`rollback`]. Steps shared by events:
//! `warm` (opcache around the switch) and `pause` (cron paused from AfterInstall until
//! after ApplicationStart's switch).

mod cancel;
mod deploy;
mod drain;
mod install;
mod pause;
mod preflight;
mod rollback;
mod start;
mod validate;
pub mod warm;

pub use install::template_facts;

use std::collections::BTreeMap;
use std::time::{Instant, SystemTime};

use tracing::{Instrument, error, info, warn};

use crate::config::Config;
use crate::lifecycle::{self, Decision, Deployment, Event, Origin};
use crate::release::{self, Layout};
use crate::state::{self, StateDoc, Store, Traffic};

/// CodeDeploy's view of the deployment, from the hook's environment.
#[derive(Debug, Clone, Default)]
pub struct HookEnv {
    pub deployment_id: String,
    pub deployment_group_id: Option<String>,
    pub deployment_group_name: Option<String>,
    pub application_name: Option<String>,
    pub bundle: BTreeMap<String, String>,
}

/// CodeDeploy ids (`d-ABCDEF123`, group UUIDs) become path components: refuse anything
/// else, so an id can never name a path outside the deployment root.
pub fn check_id(what: &str, v: &str) -> Result<(), String> {
    let ok = !v.is_empty()
        && v.len() <= 128
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        // The reason first and the value escaped and cut: a 10 kB id must not push the
        // reason out of the 2048 characters CodeDeploy shows, nor forge a log line.
        Err(format!(
            "{what} is not a CodeDeploy id (letters, digits, `-` and `_` only, at most 128): `{}` ({} bytes)",
            crate::text::truncate(&crate::text::escape(v), 80),
            v.len()
        ))
    }
}

/// CodeDeploy's application and deployment group names (1-100 characters) become the app
/// name in Redis keys, log lines and status: refuse control characters and overlong values,
/// so a name can never forge a log line or push the reason out of the hook's tail.
pub fn check_name(what: &str, v: &str) -> Result<(), String> {
    if v.chars().count() <= 100 && !v.chars().any(char::is_control) {
        Ok(())
    } else {
        Err(format!(
            "{what} `{}` is not a CodeDeploy name (at most 100 characters, no control characters)",
            crate::text::truncate(&v.escape_debug().to_string(), 240)
        ))
    }
}

impl HookEnv {
    /// CodeDeploy's environment; Err when DEPLOYMENT_ID is missing or an id is malformed.
    pub fn from_map(env: &BTreeMap<String, String>) -> Result<HookEnv, String> {
        let get = |k: &str| env.get(k).filter(|v| !v.is_empty()).cloned();
        let deployment_id = get("DEPLOYMENT_ID")
            .ok_or_else(|| "DEPLOYMENT_ID is missing from the hook's environment".to_string())?;
        check_id("DEPLOYMENT_ID", &deployment_id)?;
        if let Some(g) = get("DEPLOYMENT_GROUP_ID") {
            check_id("DEPLOYMENT_GROUP_ID", &g)?;
        }
        for k in ["APPLICATION_NAME", "DEPLOYMENT_GROUP_NAME"] {
            if let Some(v) = get(k) {
                check_name(k, &v)?;
            }
        }
        Ok(HookEnv {
            deployment_id,
            deployment_group_id: get("DEPLOYMENT_GROUP_ID"),
            deployment_group_name: get("DEPLOYMENT_GROUP_NAME"),
            application_name: get("APPLICATION_NAME"),
            bundle: env
                .iter()
                .filter(|(k, _)| k.starts_with("BUNDLE_"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        })
    }
}

/// The result of one request, for the client's exit code and summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Succeeded(String),
    AlreadyDone(String),
    Failed(String),
    Refused(String),
}

impl Outcome {
    pub fn is_success(&self) -> bool {
        matches!(self, Outcome::Succeeded(_) | Outcome::AlreadyDone(_))
    }
    pub fn summary(&self) -> &str {
        match self {
            Outcome::Succeeded(s)
            | Outcome::AlreadyDone(s)
            | Outcome::Failed(s)
            | Outcome::Refused(s) => s,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error(transparent)]
    Release(#[from] release::ReleaseError),
    #[error(transparent)]
    Perms(#[from] crate::perms::PermsError),
    #[error(transparent)]
    Archive(#[from] crate::archive::ArchiveError),
    #[error(transparent)]
    Params(#[from] crate::params::ParamsError),
    #[error(transparent)]
    Render(#[from] crate::render::RenderError),
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
    #[error("{0}")]
    Failed(String),
    /// The hook ended before the result: the event stopped at a safe point, before `0`.
    #[error("stopped before {0}")]
    Cancelled(String),
}

pub struct Engine {
    cfg: Config,
    store: Store,
    doc: StateDoc,
    /// The document as last written to disk: when a write fails, memory goes back to it
    /// (never ahead of disk, or a restart would tell a different story).
    saved: StateDoc,
    /// Set while a hook's event runs: the hook ended before the result.
    cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    layout: Layout,
    readiness: crate::readiness::Readiness,
}

impl Engine {
    /// Takes the state lock and loads the state; events left running by a previous process
    /// are marked interrupted.
    pub fn open(cfg: Config) -> Result<Engine, EngineError> {
        let store = Store::open(&cfg.state_dir)?;
        let mut doc = store.load()?;
        if let Some(dep) = doc.deployment.as_mut() {
            let interrupted = dep.interrupt_running(SystemTime::now());
            for e in &interrupted {
                warn!(
                    "{e} of deployment {} was interrupted by a restart of bgagent; it can be retried",
                    dep.id
                );
            }
            if !interrupted.is_empty() {
                store.save(&doc)?;
            }
        }
        let layout = Layout::new(&cfg.app_root);
        for w in doc.disagreements(layout.current().as_deref()) {
            warn!("{}: {w}", store.dir().join("state.json").display());
        }
        Ok(Engine {
            cfg,
            store,
            saved: doc.clone(),
            cancel: None,
            doc,
            layout,
            readiness: crate::readiness::Readiness::new(),
        })
    }

    /// The readiness handle (the daemon serves it to the load balancer).
    pub fn readiness(&self) -> crate::readiness::Readiness {
        self.readiness.clone()
    }

    /// The node's readiness after a daemon start: a node serving a current release that no
    /// drain took out comes up through the health checks, not blindly.
    /// Each outcome is logged (`readiness after the restart: ...`), so an operator (and a
    /// test) can tell a node kept out on purpose from one still starting.
    pub async fn recover_readiness(&mut self) {
        let Some(current) = self.layout.current() else {
            return;
        };
        if self.doc.node.is_drained() {
            info!(
                "readiness after the restart: a drain took this node out before it, so /ready stays 503 until a traffic-allowing event (BeforeAllowTraffic) or a deployment's ValidateService brings it back"
            );
            return;
        }
        let _ = self.readiness.set_warming();
        match crate::health::wait_until_healthy(&self.cfg.health).await {
            Ok(_) => {
                let _ = self.readiness.set_ready();
                info!(
                    "readiness after the restart: release {current} passed its health checks: ready"
                );
            }
            Err(e) => {
                warn!(
                    "readiness after the restart: release {current} is current but not healthy, so /ready stays 503: {e}"
                );
                let _ = self.readiness.set_starting();
            }
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Takes a re-read config (SIGHUP) between events; the caller checked that nothing that
    /// needs a restart changed ([`Config::restart_only_changes`]).
    pub fn reconfigure(&mut self, cfg: Config) {
        self.cfg = cfg;
    }
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    pub fn state(&self) -> &StateDoc {
        &self.doc
    }

    /// The status document (see [`crate::status`]).
    pub fn status(
        &self,
        readiness: Option<serde_json::Value>,
        daemon_running: bool,
    ) -> serde_json::Value {
        crate::status::build(
            &self.doc,
            &self.layout,
            self.store.dir(),
            readiness,
            daemon_running,
            &self.cfg.processes,
        )
    }

    /// Runs one CodeDeploy lifecycle event.
    /// `cancel`: set when the hook ended before the result (CodeDeploy killed it at its
    /// timeout); checked at the safe points, before the work and after it.
    pub async fn run_hook(
        &mut self,
        event: Event,
        env: &HookEnv,
        cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    ) -> Outcome {
        let origin = Origin {
            deployment_group_id: env.deployment_group_id.clone(),
            deployment_group_name: env.deployment_group_name.clone(),
            application_name: env.application_name.clone(),
            artifact: None,
        };
        self.cancel = cancel;
        let o = self.run_event(event, &env.deployment_id, origin).await;
        self.cancel = None;
        o
    }

    fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// A safe point between two steps of an event: Err when the hook ended, so the event
    /// stops here, before `next`, and [`Engine::undo_cancelled`] leaves the node right.
    pub(super) fn checkpoint(&self, next: &str) -> Result<(), EngineError> {
        if self.cancelled() {
            info!("the hook ended: stopping before {next}");
            return Err(EngineError::Cancelled(next.to_string()));
        }
        Ok(())
    }

    /// A step boundary that the crash tests kill the daemon at: with
    /// `BGAGENT_TEST_PAUSE_AT=<name>` in the daemon's environment it logs "pausing at step
    /// boundary <name>" and waits there for ever (the test then kills it with SIGKILL).
    /// Without the variable, one lookup of the environment.
    pub(super) async fn boundary(&self, name: &str) {
        if std::env::var_os("BGAGENT_TEST_PAUSE_AT").is_some_and(|v| v == name) {
            warn!("pausing at step boundary {name} (BGAGENT_TEST_PAUSE_AT)");
            std::future::pending::<()>().await;
        }
    }

    /// Resolves when the hook ends (never without a hook): raced against waits that are
    /// safe to abandon (health checks, warm-up), never against a step that changes the node.
    pub(super) async fn hook_ended(&self) {
        let Some(c) = self.cancel.clone() else {
            return std::future::pending().await;
        };
        while !c.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Runs `event` inside a span whose fields every line of the event carries (the journal's
    /// DEPLOYMENT_ID, LIFECYCLE_EVENT and RELEASE_ID; `journalctl DEPLOYMENT_ID=d-...`).
    async fn run_event(&mut self, event: Event, id: &str, origin: Origin) -> Outcome {
        let release = self
            .doc
            .deployment
            .as_ref()
            .filter(|d| d.id == id)
            .and_then(|d| d.release_id.clone());
        let span = tracing::info_span!(
            "event",
            deployment_id = %id,
            lifecycle_event = %event,
            release_id = tracing::field::Empty
        );
        if let Some(r) = &release {
            span.record("release_id", r.as_str());
        }
        // Boxed: the event's future is deep, and the span's wrapper on top of it would take
        // the compiler past its layout depth limit.
        Box::pin(self.run_event_in_span(event, id, origin))
            .instrument(span)
            .await
    }

    async fn run_event_in_span(&mut self, event: Event, id: &str, origin: Origin) -> Outcome {
        match lifecycle::decide(self.doc.deployment.as_ref(), id, event) {
            Decision::Refuse(r) => {
                error!("{event} refused: {r}");
                Outcome::Refused(format!("{event} refused: {r}"))
            }
            Decision::AlreadyDone => {
                let msg = format!("{event} already succeeded for deployment {id}; nothing to do");
                info!("{msg}");
                Outcome::AlreadyDone(msg)
            }
            Decision::Run {
                new_deployment,
                supersedes,
            } => {
                if self.cancelled() {
                    let msg = format!(
                        "{event}: the hook ended before the event started (CodeDeploy's timeout?); nothing was done"
                    );
                    warn!("{msg}");
                    return Outcome::Failed(msg);
                }
                let now = SystemTime::now();
                if new_deployment {
                    if let Some(old) = supersedes {
                        warn!("deployment {old} did not finish; deployment {id} supersedes it");
                        if let Some(d) = self.doc.deployment.as_mut() {
                            d.status = lifecycle::DeploymentStatus::Superseded;
                        }
                    }
                    info!("deployment {id} starts");
                    self.doc.start_deployment(Deployment::new(id, origin, now));
                }
                if let Some(d) = self.doc.deployment.as_mut() {
                    d.begin(event, now);
                }
                if let Err(e) = self.persist() {
                    error!("{e}");
                    self.doc = self.saved.clone();
                    return Outcome::Failed(format!("{event} could not start: {e}"));
                }
                info!("{event} starts for deployment {id}");
                let t0 = Instant::now();
                let before = cancel::Before::of(self);
                let mut result = self.perform(event).await;
                if self.cancelled() {
                    // CodeDeploy records the event failed: so does bgagent, after undoing
                    // what is safe to undo (see `cancel`); a retry runs the event again.
                    let what = match &result {
                        Ok(m) => format!("its work had finished ({m})"),
                        Err(EngineError::Cancelled(next)) => {
                            format!("it stopped at a safe point, before {next}")
                        }
                        Err(e) => format!("its work failed ({e})"),
                    };
                    let undone = self.undo_cancelled(event, result.is_ok(), &before).await;
                    result = Err(EngineError::Failed(format!(
                        "the hook ended before the result (CodeDeploy's timeout?), so the event counts as failed; {what}; {undone}; retry the event"
                    )));
                }
                let ms = t0.elapsed().as_millis() as u64;
                let outcome = match &result {
                    Ok(msg) => {
                        let s = if msg.is_empty() {
                            format!("{event} succeeded in {:.2}s", ms as f64 / 1000.0)
                        } else {
                            format!("{event} succeeded in {:.2}s: {msg}", ms as f64 / 1000.0)
                        };
                        info!("{s}");
                        Outcome::Succeeded(s)
                    }
                    Err(e) => {
                        let s = format!("{event} FAILED after {:.2}s: {e}", ms as f64 / 1000.0);
                        error!("{s}");
                        Outcome::Failed(s)
                    }
                };
                if let Some(d) = self.doc.deployment.as_mut() {
                    d.finish(
                        event,
                        result.map_err(|e| e.to_string()),
                        SystemTime::now(),
                        ms,
                    );
                }
                if let Err(e) = self.persist() {
                    // On disk the event is still running: what a restart would read is the
                    // event interrupted, so that is what memory says too, and it may be retried.
                    error!("{e}");
                    self.doc = self.saved.clone();
                    if let Some(d) = self.doc.deployment.as_mut() {
                        d.interrupt_running(SystemTime::now());
                        if let Some(r) = d.events.iter_mut().rev().find(|r| r.event == event) {
                            r.message = Some(format!(
                                "its result could not be written to the state file ({e}); retry the event"
                            ));
                        }
                    }
                    return Outcome::Failed(format!(
                        "{event}: the result could not be recorded, so it counts as not done; free space in the state directory and retry the event: {e}"
                    ));
                }
                outcome
            }
        }
    }

    async fn perform(&mut self, event: Event) -> Result<String, EngineError> {
        let t0 = Instant::now();
        let mut result = self.perform_builtin(event).await;
        // ValidateService runs its commands itself, before the node turns ready.
        if result.is_ok()
            && event != Event::ValidateService
            && let Err(e) = self.run_commands(event).await
        {
            result = Err(e);
        }
        self.readiness
            .record_event(event.name(), result.is_ok(), t0.elapsed().as_secs_f64());
        result
    }

    /// The extra commands configured for `event`, run by argv in the new release.
    pub(super) async fn run_commands(&self, event: Event) -> Result<(), EngineError> {
        let Some(cmds) = self.cfg.commands.get(event.name()) else {
            return Ok(());
        };
        let dep = self.deployment()?;
        let release = dep
            .release_id
            .as_ref()
            .map(|r| self.layout.release_dir(r))
            .filter(|d| d.is_dir())
            .unwrap_or_else(|| self.layout.current_link());
        let mut env = BTreeMap::new();
        env.insert("LIFECYCLE_EVENT".to_string(), event.name().to_string());
        env.insert("DEPLOYMENT_ID".to_string(), dep.id.clone());
        env.insert(
            "BGAGENT_RELEASE_DIR".to_string(),
            release.display().to_string(),
        );
        env.insert(
            "BGAGENT_APP_ROOT".to_string(),
            self.cfg.app_root.display().to_string(),
        );
        for c in cmds {
            // A command runs to its end (it may be a migration): the hook's end is seen
            // between commands.
            self.checkpoint(&format!(
                "the command `{}`",
                crate::text::truncate(&crate::text::escape(&c.argv.join(" ")), 80)
            ))?;
            crate::process::run(c, Some(&release), &env)
                .await
                .map_err(|e| EngineError::Failed(e.to_string()))?;
        }
        Ok(())
    }

    async fn perform_builtin(&mut self, event: Event) -> Result<String, EngineError> {
        match event {
            Event::ApplicationStop | Event::BeforeBlockTraffic => self.drain().await,
            Event::BeforeInstall => self.preflight().await,
            // Cron waits while the database may be upgraded, and resumes after the switch
            // (or as soon as either event fails: the old release serves on).
            Event::AfterInstall => {
                let r = match self.pause_cron().await {
                    Ok(()) => self.install().await,
                    Err(e) => Err(e),
                };
                if r.is_err() {
                    self.resume_cron("AfterInstall failed").await;
                }
                r
            }
            Event::ApplicationStart => {
                let r = self.start().await;
                let why = if r.is_ok() {
                    "after the switch"
                } else {
                    "ApplicationStart failed"
                };
                self.resume_cron(why).await;
                r
            }
            Event::ValidateService => self.validate().await,
            Event::AfterBlockTraffic => {
                self.set_traffic(Traffic::Idle);
                Ok("node recorded as idle".into())
            }
            // Traffic is about to reach the node: it must be ready. After this deployment's
            // ValidateService it is; on the original instances of a blue/green rollback
            // (these events under a new deployment id, nothing installed) this brings back a
            // node an earlier BeforeBlockTraffic drained.
            Event::BeforeAllowTraffic => {
                if self.layout.current().is_none() {
                    return Ok(String::new());
                }
                self.restore_readiness().await
            }
            Event::AfterAllowTraffic => {
                if self.layout.current().is_some() {
                    self.restore_readiness().await?;
                }
                if let Some(cur) = self.layout.current()
                    && let Some(slot) = self.release_slot(&cur)
                {
                    let dep = self.deployment()?.id.clone();
                    crate::cache::mark_live(&self.cfg.cache, &self.app_name(), slot, &dep).await?;
                }
                self.set_traffic(Traffic::Live);
                Ok("node recorded as live".into())
            }
        }
    }

    pub(super) fn deployment(&self) -> Result<&Deployment, EngineError> {
        self.doc
            .deployment
            .as_ref()
            .ok_or_else(|| EngineError::Failed("no deployment in progress".into()))
    }

    /// Moves the releases beyond `release.keep` (failed ones first, uncounted) and every
    /// abandoned build into the trash, and starts its deletion in the background (see
    /// [`crate::cleanup`]). Never current, the rollback target, or this deployment's release.
    pub(super) fn schedule_cleanup(&mut self) {
        let Ok(app) = self.layout.open() else {
            return;
        };
        let current = self.layout.current();
        let all = app.list_all().unwrap_or_default();
        let on_disk: Vec<String> = all
            .iter()
            .filter(|n| !n.starts_with('.'))
            .cloned()
            .collect();
        let target = self.doc.rollback_target(current.as_deref(), &on_disk);
        let mine = self
            .doc
            .deployment
            .as_ref()
            .and_then(|d| d.release_id.clone());
        let protect: Vec<&str> = [current.as_deref(), target.as_deref(), mine.as_deref()]
            .into_iter()
            .flatten()
            .collect();
        let plan = crate::cleanup::plan(
            &all,
            self.cfg.release.keep,
            &protect,
            &self.doc.failed_releases(),
        );
        if !plan.is_empty() {
            match crate::cleanup::move_to_trash(&app, &plan) {
                Ok(moved) => {
                    info!(
                        "old releases to remove in the background: {}",
                        moved.join(", ")
                    );
                    for m in &moved {
                        self.doc.releases.remove(m);
                    }
                }
                Err(e) => warn!("could not set old releases aside for removal: {e}"),
            }
        }
        if !crate::cleanup::pending(&self.layout).is_empty() {
            crate::cleanup::spawn_deleter(&self.layout);
        }
    }

    /// Writes the state document, and remembers it as what is on disk.
    pub(super) fn persist(&mut self) -> Result<(), state::StateError> {
        self.store.save(&self.doc)?;
        self.saved = self.doc.clone();
        Ok(())
    }

    pub(super) fn set_traffic(&mut self, t: Traffic) {
        self.doc.node.traffic = t;
        self.doc.node.since = Some(lifecycle::timestamp(SystemTime::now()));
    }
}
