//! ApplicationStart: switch `current` to the new release and reload the services.

use std::time::{Instant, SystemTime};

use tracing::{error, info, warn};

use crate::lifecycle;
use crate::state::{Switch, SwitchReason};

use super::{Engine, EngineError};

impl Engine {
    pub(super) async fn start(&mut self) -> Result<String, EngineError> {
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
    pub(super) async fn switch(
        &mut self,
        id: &str,
        reason: SwitchReason,
    ) -> Result<(), EngineError> {
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
}
