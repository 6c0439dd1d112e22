//! `bgagent deploy ARTIFACT`: the whole in-place lifecycle on this node, without CodeDeploy.

use std::path::Path;
use std::time::Instant;

use tracing::{error, info};

use crate::lifecycle::{Event, Origin};
use crate::readiness::State;

use super::{Engine, Outcome};

impl Engine {
    /// `bgagent deploy ARTIFACT`: the whole in-place lifecycle on this node.
    pub async fn deploy_artifact(&mut self, artifact: &Path) -> Outcome {
        let artifact = std::path::absolute(artifact).unwrap_or_else(|_| artifact.to_path_buf());
        // What can be checked without touching the node is checked before the drain, so a
        // wrong artifact never takes a serving node out of the load balancer.
        if let Err(msg) = check_artifact(&artifact) {
            error!("{msg}");
            return Outcome::Failed(msg);
        }
        let before = self.layout.current();
        let was_serving = before.is_some()
            && (self.readiness.state() == State::Ready || !self.doc.node.is_drained());
        let id = format!("local-{:06x}", fastrand::u32(..0x100_0000));
        let origin = Origin {
            artifact: Some(artifact.display().to_string()),
            ..Origin::default()
        };
        let mut sequence = vec![];
        if self.layout.current().is_some() {
            sequence.push(Event::ApplicationStop);
        }
        sequence.extend([
            Event::BeforeInstall,
            Event::AfterInstall,
            Event::ApplicationStart,
            Event::ValidateService,
            Event::AfterAllowTraffic,
        ]);
        let t0 = Instant::now();
        for ev in sequence {
            let o = self.run_event(ev, &id, origin.clone()).await;
            if !o.is_success() {
                let mut msg = format!("deployment {id}: {}", o.summary());
                // The drain took the node out; the old release still serves: bring the node
                // back (services the drain stopped, readiness through the health checks).
                if was_serving && self.layout.current() == before {
                    match self.restore_readiness().await {
                        Ok(m) => {
                            info!("the previous release serves on: {m}");
                            msg.push_str(&format!(
                                "; the node serves release {} again: {m}",
                                before.as_deref().unwrap_or("-")
                            ));
                        }
                        Err(e) => {
                            error!("{e}");
                            msg.push_str(&format!("; {e}"));
                        }
                    }
                    if let Err(e) = self.persist() {
                        error!("{e}");
                    }
                }
                return Outcome::Failed(msg);
            }
        }
        let rel = self
            .doc
            .deployment
            .as_ref()
            .and_then(|d| d.release_id.clone())
            .unwrap_or_default();
        Outcome::Succeeded(format!(
            "deployment {id} succeeded in {:.2}s: release {rel} is live",
            t0.elapsed().as_secs_f64()
        ))
    }
}

/// The artifact exists and is a directory or an archive bgagent can read (by its first
/// bytes). Err: the sentence for the operator.
fn check_artifact(artifact: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(artifact).map_err(|e| {
        format!(
            "the artifact {} cannot be used: {e}; give a directory or a .tar, .tar.gz or .zip archive",
            crate::text::path(artifact)
        )
    })?;
    if meta.is_dir() {
        return Ok(());
    }
    crate::archive::detect(artifact)
        .map(|_| ())
        .map_err(|e| format!("{e}; nothing was changed on this node"))
}
