//! ApplicationStop and BeforeBlockTraffic take the node out of the load balancer; the
//! traffic-allowing events (and a switch back to a healthy release) bring it back.

use tracing::{info, warn};

use crate::readiness::State;
use crate::state::Traffic;

use super::{Engine, EngineError};

impl Engine {
    /// Readiness turns to draining at once (/ready answers 503), in-flight requests get the
    /// deregistration delay, then only what the config says to stop is stopped.
    pub(super) async fn drain(&mut self) -> Result<String, EngineError> {
        let was = self.readiness.state();
        let _ = self.readiness.start_draining();
        self.doc.node.drained = Some(true);
        let delay = self.cfg.drain.deregistration_delay;
        let serving = was == State::Ready || self.doc.node.traffic == Traffic::Live;
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
        // Out of the load balancer, the node serves no cache generation any more.
        if let Err(e) = crate::cache::mark_not_serving(&self.cfg.cache, &self.app_name()).await {
            warn!("{e}; this node stays registered as serving its cache generation");
        }
        Ok(if stopped.is_empty() {
            "drained".to_string()
        } else {
            format!("drained; stopped {}", stopped.join(", "))
        })
    }

    /// The node back to ready on its current release, without installing anything: the
    /// services a drain stopped are started, then the health checks must pass before
    /// /ready answers 200. This is how the original instances of a blue/green rollback
    /// (BeforeAllowTraffic under the rollback's new deployment id) and a node switched back
    /// to its previous release return to the load balancer. Ready already: nothing to do.
    pub(super) async fn restore_readiness(&mut self) -> Result<String, EngineError> {
        let Some(current) = self.layout.current() else {
            return Err(EngineError::Failed(format!(
                "no release is current under {}: nothing can serve traffic here; deploy one first",
                self.layout.root().display()
            )));
        };
        if self.readiness.state() == State::Ready {
            self.doc.node.drained = Some(false);
            return Ok(format!("release {current} is serving and ready"));
        }
        let started =
            crate::services::drain_control(&self.cfg.services, crate::services::Verb::Start)
                .await
                .map_err(|e| EngineError::Failed(e.to_string()))?;
        let _ = self.readiness.set_starting();
        let _ = self.readiness.set_warming();
        match crate::health::wait_until_healthy(&self.cfg.health).await {
            Ok(took) => {
                let _ = self.readiness.set_ready();
                self.doc.node.drained = Some(false);
                if let Some(slot) = self.release_slot(&current)
                    && let Err(e) =
                        crate::cache::mark_serving(&self.cfg.cache, &self.app_name(), slot).await
                {
                    warn!("{e}; the heartbeat registers this node again");
                }
                let started = if started.is_empty() {
                    String::new()
                } else {
                    format!("started {}; ", started.join(", "))
                };
                Ok(format!(
                    "{started}release {current} passed its health checks in {} ms: ready",
                    took.as_millis()
                ))
            }
            Err(failure) => {
                let _ = self.readiness.set_starting();
                Err(EngineError::Failed(format!(
                    "release {current} is current but not healthy, so the node stays out of the load balancer: {failure}"
                )))
            }
        }
    }
}
