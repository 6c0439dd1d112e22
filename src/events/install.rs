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
        self.layout.ensure()?;
        let policy = Policy::resolve(&self.cfg.permissions)?;
        // An earlier attempt of this deployment that was interrupted (the daemon killed, the
        // node rebooted) or failed may have left its release on disk without recording it.
        let tag = release::release_tag(&dep_id);
        let current = self.layout.current();
        let previous = self
            .doc
            .rollback_target(current.as_deref(), &self.layout.list()?);
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
        // What this node serves, and the fleet state it was agreed in: how a loss of
        // Redis's data is told from a fresh Redis.
        let serving = self
            .layout
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
    pub(super) async fn render_into(
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
        let d = self.deployment()?;
        let dep = d.id.clone();
        // A retried AfterInstall may run a fleet step again that failed before it started.
        let retry = d
            .record(crate::lifecycle::Event::AfterInstall)
            .is_some_and(|r| r.attempts > 1);
        let node = crate::cache::node_name(&self.cfg.cache);
        let lookup = |key: &str| params.by_key.get(key).map(|p| p.value.expose().clone());
        let at = crate::schema::Attempting {
            app: &self.app_name(),
            deployment: &dep,
            node: &node,
            retry,
        };
        for line in crate::schema::prepare(&self.cfg.schema, dir, &at, lookup)
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
