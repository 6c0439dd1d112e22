//! `bgagent deploy ARTIFACT`: the whole in-place lifecycle on this node, without CodeDeploy.

use std::path::Path;
use std::time::Instant;

use tracing::error;

use crate::lifecycle::{Event, Origin};

use super::{Engine, Outcome};

impl Engine {
    /// `bgagent deploy ARTIFACT`: the whole in-place lifecycle on this node.
    pub async fn deploy_artifact(&mut self, artifact: &Path) -> Outcome {
        let artifact = std::path::absolute(artifact).unwrap_or_else(|_| artifact.to_path_buf());
        if !artifact.exists() {
            let msg = format!("the artifact {} does not exist", artifact.display());
            error!("{msg}");
            return Outcome::Failed(msg);
        }
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
                return Outcome::Failed(format!("deployment {id}: {}", o.summary()));
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
