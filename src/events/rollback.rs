//! `bgagent rollback`: the operator switches this node back to the previous release.

use std::time::Instant;

use tracing::{error, info, warn};

use crate::state::SwitchReason;

use super::{Engine, EngineError, Outcome};

impl Engine {
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
}
