//! The cron pause around a deployment that may upgrade the database (see [`crate::cron`]):
//! set before AfterInstall's work, waited on, and lifted after ApplicationStart's switch, or
//! as soon as either of them fails.

use std::time::SystemTime;

use tracing::{info, warn};

use super::{Engine, EngineError};

impl Engine {
    fn cron_pauses(&self) -> bool {
        crate::cron::should_pause(&self.cfg.cron, &self.cfg.schema)
    }

    /// Pauses cron for this deployment and waits for the running jobs (cron.wait_budget).
    pub(super) async fn pause_cron(&mut self) -> Result<(), EngineError> {
        if !self.cron_pauses() {
            return Ok(());
        }
        let dep = self.deployment()?.id.clone();
        let rec = crate::cron::pause(&self.cfg, &self.app_name(), &dep)
            .await
            .map_err(|e| EngineError::Failed(e.to_string()))?;
        self.doc.cron = Some(rec);
        Ok(())
    }

    /// Lifts this deployment's pause, if it set one. A failure to reach the pause's store is
    /// a warning: the pause lapses by itself after cron.pause_ttl.
    pub(super) async fn resume_cron(&mut self, why: &str) {
        if !self.cron_pauses() {
            return;
        }
        let Ok(dep) = self.deployment().map(|d| d.id.clone()) else {
            return;
        };
        match crate::cron::resume(&self.cfg, &self.app_name(), &dep).await {
            Ok(true) => {
                info!("cron resumed ({why})");
                if let Some(r) = self.doc.cron.as_mut().filter(|r| r.deployment == dep) {
                    r.resumed_at = Some(crate::lifecycle::timestamp(SystemTime::now()));
                }
            }
            Ok(false) => {}
            Err(e) => warn!(
                "{e}; cron stays paused until the pause lapses (cron.pause_ttl: {})",
                humantime::format_duration(self.cfg.cron.pause_ttl)
            ),
        }
    }
}
