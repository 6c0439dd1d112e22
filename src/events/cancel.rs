//! What an event leaves behind when its hook ends before the result.
//!
//! CodeDeploy ends a hook at its timeout with SIGTERM to the hook's process group and
//! records the event failed, whatever the hook does next (docs/codedeploy-contract.md); a
//! hook killed any other way closes its connection just the same. The daemon sees the
//! connection close, stops the event at its next safe point ([`Engine::checkpoint`]: between
//! steps, never inside a switch, a reload, a command or a migration), records the event
//! failed ("the hook ended before the result") and undoes here what is safe to undo, so the
//! node matches CodeDeploy's record. The table of what each event undoes is in
//! docs/ARCHITECTURE.md ("A hook that ends before the result").

use tracing::{info, warn};

use crate::lifecycle::Event;
use crate::state::{SwitchReason, Traffic, Validation};

use super::Engine;

/// What the node was before the event, for the undo.
pub(super) struct Before {
    current: Option<String>,
    traffic: Traffic,
    since: Option<String>,
    /// This deployment's release and its validation.
    validation: Option<(String, Option<Validation>)>,
}

impl Before {
    pub(super) fn of(e: &Engine) -> Before {
        let release = e.doc.deployment.as_ref().and_then(|d| d.release_id.clone());
        Before {
            current: e.layout.current(),
            traffic: e.doc.node.traffic,
            since: e.doc.node.since.clone(),
            validation: release.map(|r| {
                let v = e.doc.releases.get(&r).and_then(|rec| rec.validation);
                (r, v)
            }),
        }
    }
}

impl Engine {
    /// Undoes what is safe to undo of `event`, stopped by the hook's end (`finished`: its
    /// work had all been done); returns what was done, for the event's record.
    pub(super) async fn undo_cancelled(
        &mut self,
        event: Event,
        finished: bool,
        before: &Before,
    ) -> String {
        let msg = match event {
            // The old release is still current: the node goes back to serving it.
            Event::ApplicationStop | Event::BeforeBlockTraffic => {
                self.doc.node.traffic = before.traffic;
                self.doc.node.since = before.since.clone();
                self.back_to_serving().await
            }
            Event::BeforeInstall => "nothing to undo (BeforeInstall changes nothing)".into(),
            Event::AfterInstall => {
                // The old release serves on: its cron need not wait for this deployment.
                if finished {
                    self.resume_cron("AfterInstall cancelled").await;
                }
                self.discard_unswitched_release(finished)
            }
            Event::ApplicationStart if self.layout.current() == before.current => {
                format!("nothing was switched; {}", self.back_to_serving().await)
            }
            Event::ApplicationStart => self.leave_unvalidated().await,
            Event::ValidateService => {
                if let Some((id, v)) = &before.validation
                    && let Some(r) = self.doc.releases.get_mut(id)
                {
                    r.validation = *v;
                }
                self.leave_unvalidated().await
            }
            Event::AfterBlockTraffic | Event::AfterAllowTraffic => {
                self.doc.node.traffic = before.traffic;
                self.doc.node.since = before.since.clone();
                format!(
                    "the node's traffic stays recorded as {}",
                    serde_json::to_value(before.traffic)
                        .ok()
                        .and_then(|v| v.as_str().map(String::from))
                        .unwrap_or_else(|| "before".into())
                )
            }
            Event::BeforeAllowTraffic => {
                "nothing to undo (readiness follows the health checks of the current release)"
                    .into()
            }
        };
        info!("{event} cancelled: {msg}");
        msg
    }

    /// The current release serves again, as before the deployment took the node out: what
    /// the drain stopped is started and /ready answers 200 once the health checks pass.
    async fn back_to_serving(&mut self) -> String {
        let Some(current) = self.layout.current() else {
            return "no release is current, nothing to bring back".into();
        };
        match self.restore_readiness().await {
            Ok(m) => format!("the node serves release {current} again ({m})"),
            Err(e) => {
                warn!("{e}");
                format!("{e}")
            }
        }
    }

    /// AfterInstall: this deployment's release, never switched to, goes to the cleanup (the
    /// steps stopped earlier trashed their unfinished build already); a retry builds anew.
    fn discard_unswitched_release(&mut self, finished: bool) -> String {
        let id = self
            .doc
            .deployment
            .as_ref()
            .and_then(|d| d.release_id.clone());
        let Some(id) = id.filter(|_| finished) else {
            return "no release of this attempt is kept (an unfinished build is left for the cleanup)".into();
        };
        if self.layout.current().as_deref() == Some(id.as_str()) {
            return format!("release {id} is current and stays");
        }
        if let Ok(app) = self.layout.open() {
            super::install::discard_build(&self.layout, &app, &id);
        }
        self.doc.releases.remove(&id);
        if let Some(d) = self.doc.deployment.as_mut() {
            d.release_id = None;
        }
        format!("release {id}, built and never switched to, is left for the cleanup")
    }

    /// A switched release that has not passed ValidateService is never left ready: with
    /// `validate.rollback_on_failure` the node switches back to the release it left (as a
    /// failed ValidateService does); otherwise /ready answers 503 until a retried event
    /// brings the release through ValidateService, and a daemon restart keeps it so.
    async fn leave_unvalidated(&mut self) -> String {
        let current = self.layout.current().unwrap_or_else(|| "none".into());
        let prev = self
            .doc
            .deployment
            .as_ref()
            .and_then(|d| d.previous_release.clone())
            .filter(|p| *p != current && self.layout.release_dir(p).is_dir());
        if self.cfg.validate.rollback_on_failure
            && let Some(prev) = prev
        {
            let _ = self.readiness.set_starting();
            if let Err(e) = self.switch(&prev, SwitchReason::AutoRollback).await {
                self.doc.node.drained = Some(true);
                return format!(
                    "could not switch back to {prev} ({e}); release {current} is current, not validated, and /ready answers 503"
                );
            }
            if let Err(e) = crate::services::reload_after_switch(&self.cfg.services).await {
                warn!("{e}");
            }
            return match self.restore_readiness().await {
                Ok(m) => format!("switched back to {prev} (validate.rollback_on_failure): {m}"),
                Err(e) => format!("switched back to {prev} (validate.rollback_on_failure): {e}"),
            };
        }
        let _ = self.readiness.set_starting();
        self.doc.node.drained = Some(true);
        format!(
            "release {current} is current but has not passed ValidateService, so /ready answers 503 until a retried ValidateService passes (or `bgagent rollback`)"
        )
    }
}
