//! ApplicationStop and BeforeBlockTraffic take the node out of the load balancer; the
//! traffic-allowing events (and a switch back to a healthy release) bring it back.

use std::time::Instant;

use tracing::{info, warn};

use crate::drain::{DrainConfig, InFlight, Step, Watch};
use crate::readiness::{Readiness, State};
use crate::state::Traffic;

use super::{Engine, EngineError};

impl Engine {
    /// Readiness turns to draining at once (/ready answers 503); a node that was serving
    /// waits until the evidence says the load balancer took it out and its requests are
    /// done (see [`crate::drain`]), at most `drain.deregistration_delay`; then only what the
    /// config says to stop is stopped.
    pub(super) async fn drain(&mut self) -> Result<String, EngineError> {
        let was = self.readiness.state();
        let _ = self.readiness.start_draining();
        self.doc.node.drained = Some(true);
        let serving = was == State::Ready || self.doc.node.traffic == Traffic::Live;
        let evidence = if serving {
            let stops = self.cfg.services.list.iter().any(|s| s.stop_on_drain);
            // Waiting changes nothing: when the hook ends (CodeDeploy's timeout), the wait
            // is abandoned and the node restored, not held until the bound.
            let e = tokio::select! {
                e = wait_for_evidence(&self.cfg.drain, &self.readiness, stops) => e,
                () = self.hook_ended() => {
                    return Err(EngineError::Cancelled(
                        "the end of the drain's wait (services were not stopped)".into(),
                    ));
                }
            };
            if e.bound {
                warn!("drain: {e}");
            } else {
                info!("drain: {e}");
            }
            Some(e.to_string())
        } else {
            None
        };
        let stopped =
            crate::services::drain_control(&self.cfg.services, crate::services::Verb::Stop)
                .await
                .map_err(|e| EngineError::Failed(e.to_string()))?;
        self.set_traffic(Traffic::Idle);
        // Out of the load balancer, the node serves no cache generation any more.
        if let Err(e) = crate::cache::mark_not_serving(&self.cfg.cache, &self.app_name()).await {
            warn!("{e}; this node stays registered as serving its cache generation");
        }
        let mut msg = "drained".to_string();
        if let Some(e) = evidence {
            msg.push_str(&format!(" ({e})"));
        }
        if !stopped.is_empty() {
            msg.push_str(&format!("; stopped {}", stopped.join(", ")));
        }
        Ok(msg)
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

/// Steps the drain's [`Watch`] with the listener's probe log and stub_status readings until
/// it says the drain is over. Every stub_status read has [`crate::drain::READ_DEADLINE`].
async fn wait_for_evidence(
    cfg: &DrainConfig,
    readiness: &Readiness,
    stops_services: bool,
) -> crate::drain::Evidence {
    let started = Instant::now();
    if stops_services && cfg.active_requests_url.is_none() {
        warn!(
            "drain: services stop after this drain (stop_on_drain) but drain.active_requests_url is unset, so requests still in flight when the load balancer takes the node out are not waited for; set it to nginx's stub_status (e.g. http://127.0.0.1/nginx_status)"
        );
    }
    info!(
        "draining: /ready answers 503; waiting until each load balancer that probed it saw {} of them{}, at most {} s",
        cfg.unhealthy_threshold,
        if stops_services && cfg.active_requests_url.is_some() {
            " and no request is in flight"
        } else {
            ""
        },
        cfg.deregistration_delay.as_secs_f64()
    );
    let mut watch = Watch::new(cfg, started, stops_services);
    let client = crate::health::http_client();
    let mut warned = false;
    let mut meter = crate::progress::Meter::new(
        "drain",
        "ms",
        Some(cfg.deregistration_delay.as_millis() as u64),
    );
    loop {
        match watch.step(Instant::now(), &readiness.probers()) {
            Step::Done(e) => {
                meter.finish(started.elapsed().as_millis() as u64, "");
                return e;
            }
            Step::Wait { read_in_flight } => {
                meter.update(
                    started.elapsed().as_millis() as u64,
                    "of the bound; waiting for the load balancer's probes",
                );
                if read_in_flight && let Some(url) = &cfg.active_requests_url {
                    let reading = read_in_flight_requests(&client, url).await;
                    if let InFlight::Unknown(why) = &reading
                        && !warned
                    {
                        warned = true;
                        warn!(
                            "drain: {why}; without it the drain waits for drain.deregistration_delay. Serve nginx's stub_status there (location = /nginx_status {{ stub_status; allow 127.0.0.1; deny all; }}) or unset drain.active_requests_url"
                        );
                    }
                    watch.in_flight(Instant::now(), reading);
                }
                tokio::time::sleep(crate::drain::POLL).await;
            }
        }
    }
}

/// One reading of nginx's stub_status, within [`crate::drain::READ_DEADLINE`].
async fn read_in_flight_requests(client: &reqwest::Client, url: &str) -> InFlight {
    let got = tokio::time::timeout(crate::drain::READ_DEADLINE, async {
        let resp = client.get(url).send().await?;
        let status = resp.status();
        resp.text().await.map(|body| (status, body))
    })
    .await;
    match got {
        Err(_) => InFlight::Unknown(format!(
            "nginx stub_status at {url} did not answer within {} ms",
            crate::drain::READ_DEADLINE.as_millis()
        )),
        Ok(Err(e)) if e.is_connect() && refused(&e) => InFlight::NotListening,
        Ok(Err(e)) => InFlight::Unknown(format!("nginx stub_status at {url} failed: {e}")),
        Ok(Ok((status, _))) if !status.is_success() => {
            InFlight::Unknown(format!("nginx stub_status at {url} answered {status}"))
        }
        Ok(Ok((_, body))) => match crate::drain::parse_stub_status(&body) {
            Ok(n) => InFlight::Count(n),
            Err(e) => InFlight::Unknown(format!("{url}: {e}")),
        },
    }
}

/// Connection refused: nothing listens there, so nothing can be in flight there.
fn refused(e: &reqwest::Error) -> bool {
    let mut src: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        src = s.source();
    }
    false
}
