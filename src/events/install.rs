//! AfterInstall: build the release from the revision, link shared paths, choose the cache
//! generation, render templates, run the schema steps.

use std::path::Path;
use std::time::{Instant, SystemTime};

use tracing::info;

use crate::config::Config;
use crate::lifecycle;
use crate::perms::Policy;
use crate::release::{self};
use crate::state::{ReleaseRecord, Validation};

use super::{Engine, EngineError};

impl Engine {
    pub(super) async fn install(&mut self) -> Result<String, EngineError> {
        let src = self.source()?;
        let dep_id = self.deployment()?.id.clone();
        // The app root, opened once: everything below is done relative to it.
        let app = self.layout.open()?;
        let policy = Policy::resolve(&self.cfg.permissions)?;
        // An earlier attempt of this deployment that was interrupted (the daemon killed, the
        // node rebooted) or failed may have left its release on disk without recording it.
        let tag = release::release_tag(&dep_id);
        let current = app.current();
        let previous = self.doc.rollback_target(current.as_deref(), &app.list()?);
        let protect: Vec<&str> = [current.as_deref(), previous.as_deref()]
            .into_iter()
            .flatten()
            .collect();
        let recorded = |id: &str| self.doc.releases.contains_key(id);
        for old in release::leftover_plan(&app.list()?, &recorded, &tag, &protect) {
            info!(
                "removing release {old}, left unfinished by an earlier attempt of this deployment"
            );
            app.remove_release(&old)?;
        }
        for name in app.list_all()? {
            if name.starts_with('.') && name.ends_with(&format!("-{tag}.partial")) {
                let _ = app.remove_release(&name);
            }
        }
        let id = release::unused_release_id(
            &release::new_release_id(SystemTime::now(), &dep_id),
            &app.list()?,
        );
        tracing::Span::current().record("release_id", id.as_str());
        let staging_name = format!(".{id}.partial");
        let _ = app.remove_release(&staging_name);
        // The release root gets the policy's root placement, from a directory or an archive.
        let staging = app.create_release(
            &staging_name,
            policy.placement(Path::new(""), crate::perms::Kind::Dir, 0o755),
        )?;
        let t0 = Instant::now();
        let cfg = self.cfg.release.clone();
        // CodeDeploy's deployment-archive is a scratch copy: its files may be hard-linked (and
        // so take the release's modes). A directory given to `bgagent deploy` is the operator's
        // own: never link it, or chmod on the release would change their files.
        let intake = match (cfg.intake, self.deployment()?.origin.artifact.is_some()) {
            (release::IntakeMode::Auto, true) => release::IntakeMode::AutoNoLink,
            (m, _) => m,
        };
        let src2 = src.clone();
        // The event's span goes along: intake's warnings reach the hook and the journal.
        let span = tracing::Span::current();
        let report = tokio::task::spawn_blocking(move || -> Result<String, EngineError> {
            let _in_event = span.enter();
            if src2.is_dir() {
                let r = release::intake_into(&src2, &staging, intake, &policy)?;
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
                let r = crate::archive::extract_at(
                    &src2,
                    staging.fd(),
                    staging.path(),
                    &limits,
                    &|rel: &Path, kind, mode| policy.placement(rel, kind, mode),
                )?;
                Ok(format!(
                    "{} files, {} dirs, {} MiB extracted",
                    r.files,
                    r.dirs,
                    r.bytes >> 20
                ))
            }
        })
        .await
        .map_err(|e| EngineError::Failed(format!("intake task failed: {e}")))
        .and_then(|r| r);
        let report = match report.and_then(|r| Ok((r, app.rename_release(&staging_name, &id)?))) {
            Ok((r, ())) => r,
            Err(e) => {
                let _ = app.remove_release(&staging_name);
                return Err(e);
            }
        };
        let release = app.open_release(&id)?;
        info!(
            "release {id} built from {} in {:.2}s: {report}",
            crate::text::escape(&src.display().to_string()),
            t0.elapsed().as_secs_f64()
        );
        if let Err(e) = self.checkpoint("linking the shared paths") {
            discard_build(&self.layout, &app, &id);
            return Err(e);
        }
        let policy = Policy::resolve(&self.cfg.permissions)?;
        if let Err(e) = app.link_shared(&release, &self.cfg.release.shared_paths, &policy) {
            let _ = app.remove_release(&id);
            return Err(e.into());
        }
        // What this node serves, and the fleet state it was agreed in: how a loss of
        // Redis's data is told from a fresh Redis.
        let serving = app
            .current()
            .and_then(|c| self.doc.releases.get(&c))
            .map(|r| r.cache.clone())
            .unwrap_or_default();
        let known = crate::cache::Known {
            epoch: serving["epoch"].as_str(),
            slot: serving["slot"].as_u64().map(|s| s as usize),
        };
        let cache =
            match crate::cache::choose(&self.cfg.cache, &self.app_name(), &dep_id, known).await {
                Ok(c) => c,
                Err(e) => {
                    let _ = app.remove_release(&id);
                    return Err(e.into());
                }
            };
        let final_dir = release.path().to_path_buf();
        // The release serving now: the schema gate compares the new declaration with its.
        let live = current
            .as_deref()
            .filter(|c| *c != id)
            .and_then(|c| app.open_release(c).ok().map(|d| (c.to_string(), d)));
        let mut schema_report = None;
        let rendered = self
            .render_into(
                &id,
                release,
                &policy,
                &cache,
                &app,
                live,
                &mut schema_report,
            )
            .await;
        if let Some(d) = self.doc.deployment.as_mut() {
            d.schema = schema_report;
        }
        let params = match rendered {
            Ok(p) => p,
            Err(e @ EngineError::Cancelled(_)) => {
                discard_build(&self.layout, &app, &id);
                return Err(e);
            }
            Err(e) => {
                // Never switched to, and never to be: remove it so only good releases exist.
                let _ = app.remove_release(&id);
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
                validation: Some(Validation::Pending),
            },
        );
        if let Some(d) = self.doc.deployment.as_mut() {
            d.release_id = Some(id.clone());
        }
        Ok(format!("release {id} is ready at {}", final_dir.display()))
    }

    /// The cache slot a release was rendered for.
    pub(super) fn release_slot(&self, id: &str) -> Option<usize> {
        self.doc
            .releases
            .get(id)
            .and_then(|r| r.cache["slot"].as_u64())
            .map(|s| s as usize)
    }

    pub(super) fn app_name(&self) -> String {
        crate::cache::app_name(self.cfg.app.name.as_deref(), Some(&self.doc))
    }

    /// Renders the configured templates into the release, then runs the schema steps (which
    /// need the rendered env.php); returns the parameter versions used (no values).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn render_into(
        &self,
        release_id: &str,
        release: crate::appdir::ReleaseDir,
        policy: &Policy,
        cache: &serde_json::Value,
        app: &crate::appdir::AppRoot,
        live: Option<(String, crate::appdir::ReleaseDir)>,
        schema_report: &mut Option<crate::schema::SchemaReport>,
    ) -> Result<serde_json::Value, EngineError> {
        let params = if self.cfg.templates.is_empty()
            && self.cfg.params == crate::params::ParamsConfig::None
        {
            crate::params::ParamSet::default()
        } else {
            crate::params::load(&self.cfg.params, &self.cfg.base_dir).await?
        };
        let versions = self
            .render_with(&params, release_id, release, policy, cache)
            .await?;
        let d = self.deployment()?;
        let dep = d.id.clone();
        // A retried AfterInstall may run a fleet step again that failed before it started.
        let retry = d
            .record(crate::lifecycle::Event::AfterInstall)
            .is_some_and(|r| r.attempts > 1);
        let node = crate::cache::node_name(&self.cfg.cache);
        let lookup = |key: &str| params.by_key.get(key).map(|p| p.value.expose().clone());
        let window = crate::maintenance::Coordinator::from_config(&self.cfg, self.app_name());
        let at = crate::schema::Attempting {
            app: &self.app_name(),
            deployment: &dep,
            node: &node,
            retry,
            maintenance: window.as_ref(),
        };
        // Rendering took the handle into its blocking task: the schema steps open it again.
        let new = app.open_release(release_id)?;
        let rel = crate::schema::Releases {
            kind: self.cfg.app.kind,
            new: &new,
            live: live.as_ref().map(|(id, d)| (id.as_str(), d)),
        };
        // Never in the middle of a migration: before it, or after the event.
        self.checkpoint("the schema steps")?;
        for line in crate::schema::prepare(&self.cfg.schema, &rel, &at, lookup, schema_report)
            .await
            .map_err(|e| EngineError::Failed(e.to_string()))?
        {
            info!("{line}");
        }
        Ok(versions)
    }

    pub(super) async fn render_with(
        &self,
        params: &crate::params::ParamSet,
        release_id: &str,
        release: crate::appdir::ReleaseDir,
        policy: &Policy,
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
        let n = rendered.len();
        let policy = policy.clone();
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            span.in_scope(|| crate::render::write_all(&rendered, &release, &policy))
        })
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

/// A build this event stopped (the hook ended) is left for the background cleanup: moved
/// into the trash at once (a rename), deleted at idle I/O priority, off the engine's time.
pub(super) fn discard_build(layout: &release::Layout, app: &crate::appdir::AppRoot, id: &str) {
    match crate::cleanup::move_to_trash(app, &[id.to_string()]) {
        Ok(_) => {
            info!("release {id} (built, never switched to) is left for the cleanup");
            crate::cleanup::spawn_deleter(layout);
        }
        Err(e) => tracing::warn!("could not set release {id} aside for removal: {e}"),
    }
}
