//! BeforeInstall: find the revision and check that the node can take it, before anything is built.

use std::path::{Path, PathBuf};

use tracing::warn;

use crate::config::AppKind;
use crate::perms::Policy;

use super::{Engine, EngineError};

impl Engine {
    /// Where this deployment's revision is: CodeDeploy's unpacked deployment-archive, or the
    /// artifact given to `bgagent deploy`.
    pub(super) fn source(&self) -> Result<PathBuf, EngineError> {
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

    pub(super) async fn preflight(&mut self) -> Result<String, EngineError> {
        let src = self.source()?;
        if !src.exists() {
            return Err(EngineError::Failed(format!(
                "the revision {} does not exist; check codedeploy.deployment_root in the config",
                crate::text::path(&src)
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
            crate::text::path(&src)
        ))
    }
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
