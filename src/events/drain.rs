//! ApplicationStop and BeforeBlockTraffic: take the node out of the load balancer.

use tracing::info;

use crate::state::Traffic;

use super::{Engine, EngineError};

impl Engine {
    /// Readiness turns to draining at once (/ready answers 503), in-flight requests get the
    /// deregistration delay, then only what the config says to stop is stopped.
    pub(super) async fn drain(&mut self) -> Result<String, EngineError> {
        let was = self.readiness.state();
        let _ = self.readiness.start_draining();
        let delay = self.cfg.drain.deregistration_delay;
        let serving =
            was == crate::readiness::State::Ready || self.doc.node.traffic == Traffic::Live;
        if serving && !delay.is_zero() {
            info!(
                "draining: /ready answers 503; waiting {} ms for in-flight requests",
                delay.as_millis()
            );
            tokio::time::sleep(delay).await;
        }
        let stopped =
            crate::services::drain_control(&self.cfg.services, crate::services::Verb::Stop)
                .await
                .map_err(|e| EngineError::Failed(e.to_string()))?;
        self.set_traffic(Traffic::Idle);
        Ok(if stopped.is_empty() {
            "drained".to_string()
        } else {
            format!("drained; stopped {}", stopped.join(", "))
        })
    }
}
