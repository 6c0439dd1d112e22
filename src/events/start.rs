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
        let current = self.layout.current();
        // php-fpm pools that hold the new release in opcache already: not reloaded.
        let mut no_reload = Vec::new();
        let previous = if current.as_deref() == Some(id.as_str()) {
            // An earlier attempt switched, then was cut short (the daemon killed, the hook
            // timed out): the steps after the switch may not have happened, and each of them
            // is safe to repeat, so they all run again. The release left was recorded before
            // that switch.
            let dep = self.deployment()?;
            let previous = dep.previous_release.clone().or_else(|| {
                self.doc
                    .switches
                    .iter()
                    .rev()
                    .find(|s| s.to == id && s.deployment_id.as_deref() == Some(dep.id.as_str()))
                    .and_then(|s| s.from.clone())
            });
            info!(
                "release {id} is already current (an earlier attempt switched); completing the steps after the switch"
            );
            if let Some(slot) = self.release_slot(&id) {
                crate::cache::mark_serving(&self.cfg.cache, &self.app_name(), slot).await?;
            }
            previous
        } else {
            // Config tests first: on failure nothing switches and the current release serves on.
            crate::services::test_all(&self.cfg.services)
                .await
                .map_err(|e| EngineError::Failed(e.to_string()))?;
            self.boundary("start:tested").await;
            self.checkpoint("registering the cache generation and precompiling")?;
            let _ = self.readiness.set_starting();
            if let Some(slot) = self.release_slot(&id) {
                // Never serve a generation agreed in Redis state that has since been lost.
                let epoch = self
                    .doc
                    .releases
                    .get(&id)
                    .and_then(|r| r.cache["epoch"].as_str());
                let dep = &self.deployment()?.id;
                crate::cache::check_agreement(&self.cfg.cache, &self.app_name(), dep, epoch)
                    .await?;
                // Registered before the switch, so the slot is never flushed under this node.
                crate::cache::mark_serving(&self.cfg.cache, &self.app_name(), slot).await?;
            }
            // Recorded (on disk) before the switch, so a retry after a crash between the
            // switch and its record still knows what was left.
            if let Some(d) = self.doc.deployment.as_mut() {
                d.previous_release = current.clone();
            }
            self.persist()?;
            self.boundary("start:registered").await;
            // opcache.switch: warm: the new release goes into the pools' opcache first.
            no_reload = self.opcache_before_switch(&id, current.as_deref()).await?;
            self.boundary("start:precompiled").await;
            // The last safe point: the switch, the reloads and the start of what the drain
            // stopped are one step (a switched release without its reload is half a switch).
            self.checkpoint("the switch")?;
            self.switch(&id, SwitchReason::Deploy).await?;
            self.boundary("start:switched").await;
            current
        };
        // Services the drain stopped come back now, serving the new release. Before the
        // reloads: a stopped php-fpm cannot be reloaded (no pid, or `systemctl reload` of an
        // inactive unit fails), and one just started needs no reload.
        let started =
            crate::services::drain_control(&self.cfg.services, crate::services::Verb::Start)
                .await
                .map_err(|e| EngineError::Failed(e.to_string()))?;
        no_reload.extend(started);
        self.boundary("start:started").await;
        if let Err(e) =
            crate::services::reload_after_switch_except(&self.cfg.services, &no_reload).await
        {
            if let Some(prev) = &previous {
                error!("{e}; switching back to {prev}");
                self.switch(prev, SwitchReason::AutoRollback).await?;
                let _ = crate::services::reload_after_switch(&self.cfg.services).await;
            }
            return Err(EngineError::Failed(e.to_string()));
        }
        self.boundary("start:reloaded").await;
        // Consumers and workers still running the release left behind keep its code: they
        // are ended now, and their supervisor starts them from the new release.
        let swept = self.sweep_old_processes(&id).await;
        // Old releases are removed after ValidateService, off the critical path (cleanup).
        Ok(format!(
            "current -> releases/{id} (was {}){swept}",
            previous.as_deref().unwrap_or("none")
        ))
    }

    /// Finds the processes still running code from a release other than `current` (see
    /// [`crate::procs`]), ends them (or only lists them, `processes.end_old: false`), logs
    /// each and records the sweep for `status`. Returns a phrase for the event's summary.
    pub(super) async fn sweep_old_processes(&mut self, current: &str) -> String {
        let cfg = self.cfg.processes.clone();
        let root = self.cfg.app_root.clone();
        let cur = current.to_string();
        let found = tokio::task::spawn_blocking(move || crate::procs::scan(&root, &cur, &cfg))
            .await
            .unwrap_or_default();
        let ended =
            crate::procs::end(found, &self.cfg.app_root, current, &self.cfg.processes).await;
        for e in &ended {
            let line = crate::procs::describe(e);
            match e.fate {
                crate::procs::Fate::Survived
                | crate::procs::Fate::Failed
                | crate::procs::Fate::Listed => warn!("{line}"),
                _ => info!("{line}"),
            }
        }
        let signalled = ended
            .iter()
            .filter(|e| {
                matches!(
                    e.fate,
                    crate::procs::Fate::Terminated | crate::procs::Fate::Killed
                )
            })
            .count();
        let summary = if ended.is_empty() {
            String::new()
        } else if signalled > 0 {
            format!("; {signalled} process(es) of old releases ended")
        } else {
            format!(
                "; {} process(es) of old releases listed in status",
                ended.len()
            )
        };
        self.doc.old_processes = Some(crate::procs::Sweep {
            at: lifecycle::timestamp(SystemTime::now()),
            current: current.to_string(),
            processes: ended,
        });
        summary
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
        self.boundary("switch:unrecorded").await;
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
        self.persist()?;
        Ok(())
    }
}
