//! ValidateService: health checks and warm-up; readiness turns ready, or the node switches back.

use crate::state::{SwitchReason, Validation};

use super::{Engine, EngineError};
use crate::lifecycle::Event;

impl Engine {
    pub(super) async fn validate(&mut self) -> Result<String, EngineError> {
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
        // Probes and warm-up requests change nothing: when the hook ends they are abandoned.
        let checks = async {
            match crate::health::wait_until_healthy(&self.cfg.health).await {
                Ok(took) => match crate::warmup::run(&self.cfg.warmup).await {
                    Ok(w) => Ok((took, w)),
                    Err(e) => Err(e.to_string()),
                },
                Err(failure) => Err(failure.to_string()),
            }
        };
        let checked = tokio::select! {
            c = checks => c,
            () = self.hook_ended() => {
                return Err(EngineError::Cancelled("the health checks passed".into()));
            }
        };
        // The event's own commands (an operator's smoke test) are part of validation: they
        // run before the node turns ready, and their failure is a failed validation.
        let checked = match checked {
            Ok(v) => match self.run_commands(Event::ValidateService).await {
                Ok(()) => Ok(v),
                Err(e @ EngineError::Cancelled(_)) => return Err(e),
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(e),
        };
        if checked.is_ok() {
            self.checkpoint("the node turns ready")?;
        }
        match checked {
            Ok((took, warm)) => {
                let _ = self.readiness.set_ready();
                self.doc.node.drained = Some(false);
                if let Some(id) = &id {
                    self.doc.set_validation(id, Validation::Passed);
                }
                if let (Some(id), Some(dep)) =
                    (&id, self.doc.deployment.as_ref().map(|d| d.id.clone()))
                    && let Some(slot) = self.release_slot(id)
                {
                    crate::cache::mark_live(&self.cfg.cache, &self.app_name(), slot, &dep).await?;
                }
                // Serving now: the older releases' scripts leave opcache.
                self.opcache_after_ready().await;
                self.schedule_cleanup();
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
                if let Some(id) = &id {
                    // Never a rollback target; pruned first.
                    self.doc.set_validation(id, Validation::Failed);
                }
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
                    msg.push_str(&format!("; rolled back to {prev}"));
                    // The previous release serves again: once healthy, the node is ready
                    // for the load balancer (it was ready on it before this deployment).
                    match self.restore_readiness().await {
                        Ok(m) => msg.push_str(&format!(" ({m})")),
                        Err(e) => msg.push_str(&format!(" ({e})")),
                    }
                }
                Err(EngineError::Failed(msg))
            }
        }
    }
}
