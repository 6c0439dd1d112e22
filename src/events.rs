//! What each lifecycle event does, and the engine that runs them.
//!
//! The [`Engine`] owns the state store. For each request it asks the pure state machine
//! ([`crate::lifecycle::decide`]) whether the event may run, records the start, performs the
//! event's work by calling the concern modules, and records the outcome, saving the state
//! after each step so a restart loses nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use tracing::{error, info, warn};

use crate::config::{AppKind, Config};
use crate::lifecycle::{self, Decision, Deployment, Event, Origin};
use crate::perms::Policy;
use crate::release::{self, Layout};
use crate::state::{self, ReleaseRecord, StateDoc, Store, Switch, SwitchReason, Traffic};

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
        Err(format!(
            "{what} `{}` is not a CodeDeploy id (letters, digits, `-` and `_` only)",
            v.escape_debug()
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
}

pub struct Engine {
    cfg: Config,
    store: Store,
    doc: StateDoc,
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
        Ok(Engine {
            cfg,
            store,
            doc,
            layout,
            readiness: crate::readiness::Readiness::new(),
        })
    }

    /// The readiness handle (the daemon serves it to the load balancer).
    pub fn readiness(&self) -> crate::readiness::Readiness {
        self.readiness.clone()
    }

    /// The node's readiness after a daemon start: a node already serving a current release
    /// that was live comes up through the health checks, not blindly.
    pub async fn recover_readiness(&mut self) {
        if self.layout.current().is_none() || self.doc.node.traffic != Traffic::Live {
            return;
        }
        let _ = self.readiness.set_warming();
        match crate::health::wait_until_healthy(&self.cfg.health).await {
            Ok(_) => {
                let _ = self.readiness.set_ready();
            }
            Err(e) => {
                warn!("the current release is not healthy after a restart: {e}");
                let _ = self.readiness.set_starting();
            }
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
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
        crate::status::build(&self.doc, &self.layout, readiness, daemon_running)
    }

    /// Runs one CodeDeploy lifecycle event.
    pub async fn run_hook(&mut self, event: Event, env: &HookEnv) -> Outcome {
        let origin = Origin {
            deployment_group_id: env.deployment_group_id.clone(),
            deployment_group_name: env.deployment_group_name.clone(),
            application_name: env.application_name.clone(),
            artifact: None,
        };
        self.run_event(event, &env.deployment_id, origin).await
    }

    async fn run_event(&mut self, event: Event, id: &str, origin: Origin) -> Outcome {
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
                if let Err(e) = self.store.save(&self.doc) {
                    error!("{e}");
                    return Outcome::Failed(format!("{event} could not start: {e}"));
                }
                info!("{event} starts for deployment {id}");
                let t0 = Instant::now();
                let result = self.perform(event).await;
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
                if let Err(e) = self.store.save(&self.doc) {
                    error!("{e}");
                    return Outcome::Failed(format!(
                        "{event}: the result could not be recorded: {e}"
                    ));
                }
                outcome
            }
        }
    }

    /// `bgagent deploy ARTIFACT`: the whole in-place lifecycle on this node.
    pub async fn deploy_artifact(&mut self, artifact: &Path) -> Outcome {
        let artifact = std::path::absolute(artifact).unwrap_or_else(|_| artifact.to_path_buf());
        if !artifact.exists() {
            let msg = format!("the artifact {} does not exist", artifact.display());
            error!("{msg}");
            return Outcome::Failed(msg);
        }
        let id = format!("local-{:06x}", fastrand::u32(..0x100_0000));
        let origin = Origin {
            artifact: Some(artifact.display().to_string()),
            ..Origin::default()
        };
        let mut sequence = vec![];
        if self.layout.current().is_some() {
            sequence.push(Event::ApplicationStop);
        }
        sequence.extend([
            Event::BeforeInstall,
            Event::AfterInstall,
            Event::ApplicationStart,
            Event::ValidateService,
            Event::AfterAllowTraffic,
        ]);
        let t0 = Instant::now();
        for ev in sequence {
            let o = self.run_event(ev, &id, origin.clone()).await;
            if !o.is_success() {
                return Outcome::Failed(format!("deployment {id}: {}", o.summary()));
            }
        }
        let rel = self
            .doc
            .deployment
            .as_ref()
            .and_then(|d| d.release_id.clone())
            .unwrap_or_default();
        Outcome::Succeeded(format!(
            "deployment {id} succeeded in {:.2}s: release {rel} is live",
            t0.elapsed().as_secs_f64()
        ))
    }

    /// `bgagent rollback`: switch back to the previous release.
    pub async fn rollback(&mut self) -> Outcome {
        let t0 = Instant::now();
        let current = self.layout.current();
        let Some(prev) = self.doc.previous_release(current.as_deref()) else {
            let msg = "no previous release to roll back to".to_string();
            error!("{msg}");
            return Outcome::Failed(msg);
        };
        if !self.layout.release_dir(&prev).is_dir() {
            let msg = format!("the previous release {prev} is no longer on disk");
            error!("{msg}");
            return Outcome::Failed(msg);
        }
        // The previous generation becomes live again, without a flush.
        if let Some(slot) = self.release_slot(&prev) {
            let app = self.app_name();
            if let Err(e) = crate::cache::mark_serving(&self.cfg.cache, &app, slot).await {
                let msg = format!("rollback failed: {e}");
                error!("{msg}");
                return Outcome::Failed(msg);
            }
            if let Err(e) = crate::cache::mark_live(&self.cfg.cache, &app, slot, "rollback").await {
                warn!("{e}");
            }
        }
        let switched = self.switch(&prev, SwitchReason::Rollback).await;
        let switched = match switched {
            Ok(()) => crate::services::reload_after_switch(&self.cfg.services)
                .await
                .map_err(|e| EngineError::Failed(e.to_string())),
            Err(e) => Err(e),
        };
        match switched {
            Ok(()) => {
                let msg = format!(
                    "rolled back from {} to {prev} in {:.0} ms",
                    current.as_deref().unwrap_or("none"),
                    t0.elapsed().as_secs_f64() * 1000.0
                );
                info!("{msg}");
                Outcome::Succeeded(msg)
            }
            Err(e) => {
                let msg = format!("rollback failed: {e}");
                error!("{msg}");
                Outcome::Failed(msg)
            }
        }
    }

    async fn perform(&mut self, event: Event) -> Result<String, EngineError> {
        let t0 = Instant::now();
        let mut result = self.perform_builtin(event).await;
        if result.is_ok()
            && let Err(e) = self.run_commands(event).await
        {
            result = Err(e);
        }
        self.readiness
            .record_event(event.name(), result.is_ok(), t0.elapsed().as_secs_f64());
        result
    }

    /// The extra commands configured for `event`, run by argv in the new release.
    async fn run_commands(&self, event: Event) -> Result<(), EngineError> {
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
            Event::AfterInstall => self.install().await,
            Event::ApplicationStart => self.start().await,
            Event::ValidateService => self.validate().await,
            Event::AfterBlockTraffic => {
                self.set_traffic(Traffic::Idle);
                Ok("node recorded as idle".into())
            }
            Event::BeforeAllowTraffic => Ok(String::new()),
            Event::AfterAllowTraffic => {
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

    fn deployment(&self) -> Result<&Deployment, EngineError> {
        self.doc
            .deployment
            .as_ref()
            .ok_or_else(|| EngineError::Failed("no deployment in progress".into()))
    }

    fn set_traffic(&mut self, t: Traffic) {
        self.doc.node.traffic = t;
        self.doc.node.since = Some(lifecycle::timestamp(SystemTime::now()));
    }

    /// Readiness turns to draining at once (/ready answers 503), in-flight requests get the
    /// deregistration delay, then only what the config says to stop is stopped.
    async fn drain(&mut self) -> Result<String, EngineError> {
        let was = self.readiness.state();
        let _ = self.readiness.start_draining();
        let delay = self.cfg.drain.deregistration_delay;
        let serving =
            was == crate::readiness::State::Ready || self.doc.node.traffic == Traffic::Live;
        if serving && !delay.is_zero() {
            info!(
                "draining: /ready answers 503; waiting {} ms for in-flight requests",
                delay.as_millis()
            );
            tokio::time::sleep(delay).await;
        }
        let stopped =
            crate::services::drain_control(&self.cfg.services, crate::services::Verb::Stop)
                .await
                .map_err(|e| EngineError::Failed(e.to_string()))?;
        self.set_traffic(Traffic::Idle);
        Ok(if stopped.is_empty() {
            "drained".to_string()
        } else {
            format!("drained; stopped {}", stopped.join(", "))
        })
    }

    /// Where this deployment's revision is: CodeDeploy's unpacked deployment-archive, or the
    /// artifact given to `bgagent deploy`.
    fn source(&self) -> Result<PathBuf, EngineError> {
        let dep = self.deployment()?;
        if let Some(a) = &dep.origin.artifact {
            return Ok(PathBuf::from(a));
        }
        let group = dep.origin.deployment_group_id.as_deref().ok_or_else(|| {
            EngineError::Failed(
                "DEPLOYMENT_GROUP_ID was not in the hook's environment, so the deployment-archive cannot be found".into(),
            )
        })?;
        Ok(self
            .cfg
            .codedeploy
            .deployment_root
            .join(group)
            .join(&dep.id)
            .join("deployment-archive"))
    }

    async fn preflight(&mut self) -> Result<String, EngineError> {
        let src = self.source()?;
        if !src.exists() {
            return Err(EngineError::Failed(format!(
                "the revision {} does not exist; check codedeploy.deployment_root in the config",
                src.display()
            )));
        }
        self.layout.ensure()?;
        let free = crate::fsutil::free_bytes(self.layout.root()).map_err(|e| {
            EngineError::Failed(format!(
                "failed to read free space of {}: {e}",
                self.layout.root().display()
            ))
        })?;
        let need = estimate_size(&src).saturating_add(self.cfg.release.min_free_bytes);
        if free < need {
            return Err(EngineError::Failed(format!(
                "not enough free space under {}: {} MiB free, the release needs about {} MiB (including release.min_free_bytes); remove old releases or grow the volume",
                self.layout.root().display(),
                free >> 20,
                need >> 20
            )));
        }
        if self.cfg.app.kind == AppKind::Magento && src.is_dir() {
            for p in ["generated", "pub/static"] {
                if !src.join(p).exists() {
                    warn!(
                        "the revision has no {p}/: a Magento artifact is expected to be built (setup:di:compile, setup:static-content:deploy) before deployment"
                    );
                }
            }
        }
        Policy::resolve(&self.cfg.permissions)?;
        for s in &self.cfg.services.list {
            if let Some(w) = crate::services::check_php_fpm_config(s) {
                warn!("{w}");
            }
        }
        // The web server's and PHP-FPM's configs must be valid before anything is built.
        crate::services::test_all(&self.cfg.services)
            .await
            .map_err(|e| EngineError::Failed(e.to_string()))?;
        Ok(format!(
            "{} MiB free, revision at {}",
            free >> 20,
            src.display()
        ))
    }

    async fn install(&mut self) -> Result<String, EngineError> {
        let src = self.source()?;
        let dep_id = self.deployment()?.id.clone();
        self.layout.ensure()?;
        let policy = Policy::resolve(&self.cfg.permissions)?;
        // An earlier attempt of this deployment that was interrupted (the daemon killed, the
        // node rebooted) or failed may have left its release on disk without recording it.
        let tag = release::release_tag(&dep_id);
        let current = self.layout.current();
        let previous = self.doc.previous_release(current.as_deref());
        let protect: Vec<&str> = [current.as_deref(), previous.as_deref()]
            .into_iter()
            .flatten()
            .collect();
        let recorded = |id: &str| self.doc.releases.contains_key(id);
        for old in release::leftover_plan(&self.layout.list()?, &recorded, &tag, &protect) {
            let d = self.layout.release_dir(&old);
            info!(
                "removing release {old}, left unfinished by an earlier attempt of this deployment"
            );
            std::fs::remove_dir_all(&d).map_err(|e| {
                EngineError::Failed(format!("failed to remove {}: {e}", d.display()))
            })?;
        }
        if let Ok(rd) = std::fs::read_dir(self.layout.releases_dir()) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') && name.ends_with(&format!("-{tag}.partial")) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let id = release::unused_release_id(
            &release::new_release_id(SystemTime::now(), &dep_id),
            &self.layout.list()?,
        );
        let staging = self.layout.releases_dir().join(format!(".{id}.partial"));
        let final_dir = self.layout.release_dir(&id);
        if staging.exists() {
            let _ = std::fs::remove_dir_all(&staging);
        }
        let t0 = Instant::now();
        let cfg = self.cfg.release.clone();
        // CodeDeploy's deployment-archive is a scratch copy: its files may be hard-linked (and
        // so take the release's modes). A directory given to `bgagent deploy` is the operator's
        // own: never link it, or chmod on the release would change their files.
        let intake = match (cfg.intake, self.deployment()?.origin.artifact.is_some()) {
            (release::IntakeMode::Auto, true) => release::IntakeMode::AutoNoLink,
            (m, _) => m,
        };
        let (src2, staging2) = (src.clone(), staging.clone());
        let report = tokio::task::spawn_blocking(move || -> Result<String, EngineError> {
            if src2.is_dir() {
                let r = release::intake_dir(&src2, &staging2, intake, &policy)?;
                Ok(format!(
                    "{} files, {} dirs, {} MiB ({} reflinked, {} hard-linked, {} copied)",
                    r.files,
                    r.dirs,
                    r.bytes >> 20,
                    r.reflinked,
                    r.hardlinked,
                    r.copied
                ))
            } else {
                let limits = crate::archive::Limits {
                    max_bytes: cfg.max_bytes,
                    max_entries: cfg.max_entries,
                };
                std::fs::create_dir(&staging2).map_err(|e| {
                    EngineError::Failed(format!("failed to create {}: {e}", staging2.display()))
                })?;
                let r = crate::archive::extract(
                    &src2,
                    &staging2,
                    &limits,
                    &|rel: &Path, kind, mode| policy.placement(rel, kind, mode),
                );
                match r {
                    Ok(r) => Ok(format!(
                        "{} files, {} dirs, {} MiB extracted",
                        r.files,
                        r.dirs,
                        r.bytes >> 20
                    )),
                    Err(e) => {
                        let _ = std::fs::remove_dir_all(&staging2);
                        Err(e.into())
                    }
                }
            }
        })
        .await
        .map_err(|e| EngineError::Failed(format!("intake task failed: {e}")))??;
        std::fs::rename(&staging, &final_dir).map_err(|e| {
            EngineError::Failed(format!(
                "failed to move {} into place: {e}",
                staging.display()
            ))
        })?;
        info!(
            "release {id} built from {} in {:.2}s: {report}",
            src.display(),
            t0.elapsed().as_secs_f64()
        );
        let policy = Policy::resolve(&self.cfg.permissions)?;
        self.layout
            .link_shared(&id, &self.cfg.release.shared_paths, &policy)?;
        let cache = match crate::cache::choose(&self.cfg.cache, &self.app_name(), &dep_id).await {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&final_dir);
                return Err(e.into());
            }
        };
        let params = match self.render_into(&id, &final_dir, &cache).await {
            Ok(p) => p,
            Err(e) => {
                // Never switched to, and never to be: remove it so only good releases exist.
                let _ = std::fs::remove_dir_all(&final_dir);
                return Err(e);
            }
        };
        self.doc.releases.insert(
            id.clone(),
            ReleaseRecord {
                created_at: lifecycle::timestamp(SystemTime::now()),
                deployment_id: dep_id,
                source: src.display().to_string(),
                params,
                cache,
            },
        );
        if let Some(d) = self.doc.deployment.as_mut() {
            d.release_id = Some(id.clone());
        }
        Ok(format!("release {id} is ready at {}", final_dir.display()))
    }

    /// The cache slot a release was rendered for.
    fn release_slot(&self, id: &str) -> Option<usize> {
        self.doc
            .releases
            .get(id)
            .and_then(|r| r.cache["slot"].as_u64())
            .map(|s| s as usize)
    }

    fn app_name(&self) -> String {
        self.cfg
            .app
            .name
            .clone()
            .or_else(|| {
                self.doc
                    .deployment
                    .as_ref()
                    .and_then(|d| d.origin.application_name.clone())
            })
            .unwrap_or_else(|| "app".into())
    }

    /// Renders the configured templates into the release, then runs the schema steps (which
    /// need the rendered env.php); returns the parameter versions used (no values).
    async fn render_into(
        &self,
        release_id: &str,
        dir: &Path,
        cache: &serde_json::Value,
    ) -> Result<serde_json::Value, EngineError> {
        let params = if self.cfg.templates.is_empty()
            && self.cfg.params == crate::params::ParamsConfig::None
        {
            crate::params::ParamSet::default()
        } else {
            crate::params::load(&self.cfg.params, &self.cfg.base_dir).await?
        };
        let versions = self.render_with(&params, release_id, dir, cache).await?;
        let dep = self.deployment()?.id.clone();
        let node = crate::cache::node_name(&self.cfg.cache);
        let lookup = |key: &str| params.by_key.get(key).map(|p| p.value.expose().clone());
        for line in
            crate::schema::prepare(&self.cfg.schema, dir, &self.app_name(), &dep, &node, lookup)
                .await
                .map_err(|e| EngineError::Failed(e.to_string()))?
        {
            info!("{line}");
        }
        Ok(versions)
    }

    async fn render_with(
        &self,
        params: &crate::params::ParamSet,
        release_id: &str,
        dir: &Path,
        cache: &serde_json::Value,
    ) -> Result<serde_json::Value, EngineError> {
        if self.cfg.templates.is_empty() {
            return Ok(serde_json::Value::Null);
        }
        let dep = self.deployment()?;
        let facts = template_facts(
            &self.cfg,
            release_id,
            &dep.id,
            &self.app_name(),
            dep.origin.deployment_group_name.as_deref(),
            cache,
        );
        let rendered =
            crate::render::render_all(&self.cfg.templates, &self.cfg.base_dir, params, &facts)?;
        let dir = dir.to_path_buf();
        let n = rendered.len();
        tokio::task::spawn_blocking(move || crate::render::write_all(&rendered, &dir))
            .await
            .map_err(|e| EngineError::Failed(format!("render task failed: {e}")))??;
        info!(
            "rendered {n} template(s) from {} parameter(s): {}",
            params.len(),
            self.cfg
                .templates
                .iter()
                .map(|t| t.target.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(serde_json::to_value(params.versions()).unwrap_or_default())
    }

    async fn start(&mut self) -> Result<String, EngineError> {
        let id = self.deployment()?.release_id.clone().ok_or_else(|| {
            EngineError::Failed("AfterInstall recorded no release for this deployment".into())
        })?;
        let previous = self.layout.current();
        if previous.as_deref() == Some(id.as_str()) {
            return Ok(format!("release {id} is already current"));
        }
        // Config tests first: on failure nothing switches and the current release serves on.
        crate::services::test_all(&self.cfg.services)
            .await
            .map_err(|e| EngineError::Failed(e.to_string()))?;
        let _ = self.readiness.set_starting();
        if let Some(slot) = self.release_slot(&id) {
            // Registered before the switch, so the slot is never flushed under this node.
            crate::cache::mark_serving(&self.cfg.cache, &self.app_name(), slot).await?;
        }
        self.switch(&id, SwitchReason::Deploy).await?;
        if let Err(e) = crate::services::reload_after_switch(&self.cfg.services).await {
            if let Some(prev) = &previous {
                error!("{e}; switching back to {prev}");
                self.switch(prev, SwitchReason::AutoRollback).await?;
                let _ = crate::services::reload_after_switch(&self.cfg.services).await;
            }
            return Err(EngineError::Failed(e.to_string()));
        }
        // Services the drain stopped come back now, serving the new release.
        crate::services::drain_control(&self.cfg.services, crate::services::Verb::Start)
            .await
            .map_err(|e| EngineError::Failed(e.to_string()))?;
        if let Some(d) = self.doc.deployment.as_mut() {
            d.previous_release = previous.clone();
        }
        let protect: Vec<&str> = [Some(id.as_str()), previous.as_deref()]
            .into_iter()
            .flatten()
            .collect();
        match self.layout.prune(self.cfg.release.keep, &protect) {
            Ok(pruned) if !pruned.is_empty() => {
                info!("pruned old releases: {}", pruned.join(", "));
                for p in &pruned {
                    self.doc.releases.remove(p);
                }
            }
            Ok(_) => {}
            Err(e) => warn!("could not prune old releases: {e}"),
        }
        Ok(format!(
            "current -> releases/{id} (was {})",
            previous.as_deref().unwrap_or("none")
        ))
    }

    /// Points `current` at `id` and records the switch.
    async fn switch(&mut self, id: &str, reason: SwitchReason) -> Result<(), EngineError> {
        let t0 = Instant::now();
        let from = self.layout.current();
        self.layout.switch_to(id)?;
        let ms = t0.elapsed().as_millis() as u64;
        info!("switched current to {id} in {ms} ms");
        self.doc.record_switch(Switch {
            at: lifecycle::timestamp(SystemTime::now()),
            from,
            to: id.to_string(),
            reason,
            deployment_id: self.doc.deployment.as_ref().map(|d| d.id.clone()),
            duration_ms: ms,
        });
        self.store.save(&self.doc)?;
        Ok(())
    }

    async fn validate(&mut self) -> Result<String, EngineError> {
        let id = self.deployment()?.release_id.clone();
        let current = self.layout.current();
        if id.is_some() && current != id {
            return Err(EngineError::Failed(format!(
                "current points at {} but this deployment's release is {}",
                current.as_deref().unwrap_or("nothing"),
                id.as_deref().unwrap_or("-")
            )));
        }
        if self.readiness.state() != crate::readiness::State::Warming {
            let _ = self.readiness.set_starting();
            let _ = self.readiness.set_warming();
        }
        let checked = match crate::health::wait_until_healthy(&self.cfg.health).await {
            Ok(took) => match crate::warmup::run(&self.cfg.warmup).await {
                Ok(w) => Ok((took, w)),
                Err(e) => Err(e.to_string()),
            },
            Err(failure) => Err(failure.to_string()),
        };
        match checked {
            Ok((took, warm)) => {
                let _ = self.readiness.set_ready();
                if let (Some(id), Some(dep)) =
                    (&id, self.doc.deployment.as_ref().map(|d| d.id.clone()))
                    && let Some(slot) = self.release_slot(id)
                {
                    crate::cache::mark_live(&self.cfg.cache, &self.app_name(), slot, &dep).await?;
                }
                let checks = if self.cfg.health.checks.is_empty() {
                    "no health checks configured".to_string()
                } else {
                    format!(
                        "{} health check(s) passed in {} ms",
                        self.cfg.health.checks.len(),
                        took.as_millis()
                    )
                };
                Ok(format!("{checks}; {warm}"))
            }
            Err(failure) => {
                let _ = self.readiness.set_starting();
                let mut msg = failure;
                let prev = self
                    .doc
                    .deployment
                    .as_ref()
                    .and_then(|d| d.previous_release.clone());
                if self.cfg.validate.rollback_on_failure
                    && let Some(prev) = prev
                {
                    self.switch(&prev, SwitchReason::AutoRollback).await?;
                    let _ = crate::services::reload_after_switch(&self.cfg.services).await;
                    msg.push_str(&format!("rolled back to {prev}"));
                }
                Err(EngineError::Failed(msg))
            }
        }
    }
}

/// What templates see under `deploy`: facts about this deployment, the same on every node.
pub fn template_facts(
    cfg: &Config,
    release_id: &str,
    deployment_id: &str,
    app: &str,
    group: Option<&str>,
    cache: &serde_json::Value,
) -> serde_json::Value {
    serde_json::json!({
        "release_id": release_id,
        "deployment_id": deployment_id,
        "application": app,
        "deployment_group": group,
        "app_root": cfg.app_root,
        "release_dir": cfg.app_root.join("releases").join(release_id),
        "cache": cache,
    })
}

/// Size of a revision: the archive's file size, or the tree's apparent size (capped walk).
fn estimate_size(src: &Path) -> u64 {
    let Ok(meta) = std::fs::metadata(src) else {
        return 0;
    };
    if !meta.is_dir() {
        // a compressed archive unpacks larger; 3x is a cautious guess
        return meta.len().saturating_mul(3);
    }
    // Hard links and reflinks make the release nearly free; count only what a copy would
    // need when intake may copy. Walking is cheap next to the intake itself.
    0
}
