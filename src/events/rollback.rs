//! `bgagent rollback`: the operator switches this node back to the rollback target, the last
//! release that passed ValidateService and is not current.
//!
//! Idempotent: the client sends the release it expects to leave, so a repeat of a rollback
//! whose answer was lost (the connection broke after the switch) answers "already rolled
//! back" instead of switching back to the release it left.

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
            let done_before = self.doc.switches.last().is_some_and(|s| {
                s.reason == SwitchReason::Rollback
                    && s.from.as_deref() == Some(leaving)
                    && current.as_deref() == Some(s.to.as_str())
            });
            let now = current.as_deref().unwrap_or("none");
            if done_before {
                let msg = format!("already rolled back to {now} (from {leaving}); nothing to do");
                info!("{msg}");
                return Outcome::AlreadyDone(msg);
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
        let switched = self.switch(&prev, SwitchReason::Rollback).await;
        let switched = match switched {
            Ok(()) => crate::services::reload_after_switch(&self.cfg.services)
                .await
                .map_err(|e| EngineError::Failed(e.to_string())),
            Err(e) => Err(e),
        };
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
