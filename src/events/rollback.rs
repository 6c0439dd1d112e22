//! `bgagent rollback`: the operator switches this node back to the rollback target, the last
//! release that passed ValidateService and is not current.
//!
//! Idempotent: the client sends the release it expects to leave, so a repeat of a rollback
//! whose answer was lost (the connection broke after the switch) answers "already rolled
//! back" instead of switching back to the release it left, and completes the reload the
//! first attempt may not have reached (the daemon killed after the switch).

use std::time::Instant;

use tracing::{error, info};

use crate::state::SwitchReason;

use super::{Engine, EngineError, Outcome};

impl Engine {
    /// `bgagent rollback`: switch back to the rollback target. `leaving`: the release the
    /// caller saw current (None: whatever is current).
    pub async fn rollback(&mut self, leaving: Option<&str>) -> Outcome {
        let t0 = Instant::now();
        let current = self.layout.current();
        if let Some(leaving) = leaving
            && current.as_deref() != Some(leaving)
        {
            let recorded = self.doc.switches.last().is_some_and(|s| {
                s.reason == SwitchReason::Rollback
                    && s.from.as_deref() == Some(leaving)
                    && current.as_deref() == Some(s.to.as_str())
            });
            // The daemon killed between the switch and its record: the record still says
            // `leaving` is current, and the switch a rollback from it makes is to its
            // rollback target, which is current.
            let on_disk = self.layout.list().unwrap_or_default();
            let unrecorded = !recorded
                && current.is_some()
                && self.doc.switches.last().is_some_and(|s| s.to == leaving)
                && self.doc.rollback_target(Some(leaving), &on_disk) == current;
            let now = current.as_deref().unwrap_or("none");
            if recorded || unrecorded {
                if unrecorded {
                    info!("the switch from {leaving} to {now} was not recorded: recording it");
                    self.doc.record_switch(crate::state::Switch {
                        at: crate::lifecycle::timestamp(std::time::SystemTime::now()),
                        from: Some(leaving.to_string()),
                        to: now.to_string(),
                        reason: SwitchReason::Rollback,
                        deployment_id: self.doc.deployment.as_ref().map(|d| d.id.clone()),
                        duration_ms: 0,
                    });
                    if let Err(e) = self.persist() {
                        let msg = format!("rollback failed: {e}");
                        error!("{msg}");
                        return Outcome::Failed(msg);
                    }
                }
                // The earlier attempt may have been cut short before its reload (the daemon
                // killed): a graceful reload is safe to repeat, so the repeat does it.
                return match crate::services::reload_after_switch(&self.cfg.services).await {
                    Ok(()) => {
                        let msg = format!(
                            "already rolled back to {now} (from {leaving}); services reloaded again"
                        );
                        info!("{msg}");
                        Outcome::AlreadyDone(msg)
                    }
                    Err(e) => {
                        let msg = format!(
                            "already rolled back to {now} (from {leaving}), but the reload failed: {e}"
                        );
                        error!("{msg}");
                        Outcome::Failed(msg)
                    }
                };
            }
            let msg = format!(
                "current is {now}, not {leaving} as this rollback expected: something else switched it; check `bgagent status`, then run `bgagent rollback` again to roll back from {now}"
            );
            error!("{msg}");
            return Outcome::Refused(msg);
        }
        let on_disk = match self.layout.list() {
            Ok(l) => l,
            Err(e) => return Outcome::Failed(format!("rollback failed: {e}")),
        };
        let Some(prev) = self.doc.rollback_target(current.as_deref(), &on_disk) else {
            let msg = "no release to roll back to: none on disk other than the current one passed ValidateService".to_string();
            error!("{msg}");
            return Outcome::Failed(msg);
        };
        // This node serves the previous generation again, without a flush; the fleet's live
        // pointer follows once no node serves the generation left.
        if let Some(slot) = self.release_slot(&prev) {
            let app = self.app_name();
            if let Err(e) = crate::cache::rolled_back(&self.cfg.cache, &app, slot).await {
                let msg = format!("rollback failed: {e}");
                error!("{msg}");
                return Outcome::Failed(msg);
            }
        }
        self.boundary("rollback:registered").await;
        let switched = self.switch(&prev, SwitchReason::Rollback).await;
        let switched = match switched {
            Ok(()) => {
                self.boundary("rollback:switched").await;
                crate::services::reload_after_switch(&self.cfg.services)
                    .await
                    .map_err(|e| EngineError::Failed(e.to_string()))
            }
            Err(e) => Err(e),
        };
        if switched.is_ok() {
            self.boundary("rollback:reloaded").await;
        }
        match switched {
            Ok(()) => {
                let ms = t0.elapsed().as_secs_f64() * 1000.0;
                // The release left may have consumers running its code: as after a deploy.
                let swept = self.sweep_old_processes(&prev).await;
                if let Err(e) = self.persist() {
                    error!("{e}");
                }
                let msg = format!(
                    "rolled back from {} to {prev} in {ms:.0} ms{swept}",
                    current.as_deref().unwrap_or("none"),
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
}
