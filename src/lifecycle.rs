//! The deployment state machine: CodeDeploy lifecycle events in, decisions out.
//!
//! Pure: no I/O and no clock (times are passed in), so every order of events, including out
//! of order and repeated ones, is answered by plain unit tests. An event that cannot run is
//! an answer ([`Refusal`]) with a sentence for the operator, never a panic.
//!
//! The rules:
//! - A new DEPLOYMENT_ID starts a new deployment; one still in progress is marked superseded
//!   (CodeDeploy runs one deployment per instance at a time, so the old one was abandoned).
//! - Within a deployment events go forward in CodeDeploy's order. Events may be skipped
//!   (ApplicationStop does not run on a fresh instance, traffic events only run with a load
//!   balancer), but an event never runs after a later one has succeeded.
//! - ApplicationStart needs this deployment's AfterInstall, ValidateService its
//!   ApplicationStart, and the traffic-allowing events its ValidateService when this
//!   deployment installed a release.
//! - An event that already succeeded is not run again: it answers success at once.
//! - After a failure only the failed (or interrupted) event may be retried.

use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// The nine scriptable CodeDeploy lifecycle events for EC2, in CodeDeploy's order for an
/// in-place deployment behind a load balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Event {
    BeforeBlockTraffic,
    AfterBlockTraffic,
    ApplicationStop,
    BeforeInstall,
    AfterInstall,
    ApplicationStart,
    ValidateService,
    BeforeAllowTraffic,
    AfterAllowTraffic,
}

impl Event {
    pub const ALL: [Event; 9] = [
        Event::BeforeBlockTraffic,
        Event::AfterBlockTraffic,
        Event::ApplicationStop,
        Event::BeforeInstall,
        Event::AfterInstall,
        Event::ApplicationStart,
        Event::ValidateService,
        Event::BeforeAllowTraffic,
        Event::AfterAllowTraffic,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Event::BeforeBlockTraffic => "BeforeBlockTraffic",
            Event::AfterBlockTraffic => "AfterBlockTraffic",
            Event::ApplicationStop => "ApplicationStop",
            Event::BeforeInstall => "BeforeInstall",
            Event::AfterInstall => "AfterInstall",
            Event::ApplicationStart => "ApplicationStart",
            Event::ValidateService => "ValidateService",
            Event::BeforeAllowTraffic => "BeforeAllowTraffic",
            Event::AfterAllowTraffic => "AfterAllowTraffic",
        }
    }

    /// Parses an event name exactly as CodeDeploy spells it.
    pub fn parse(s: &str) -> Result<Event, UnknownEvent> {
        Event::ALL
            .into_iter()
            .find(|e| e.name() == s)
            .ok_or_else(|| UnknownEvent(s.to_string()))
    }

    fn rank(self) -> usize {
        self as usize
    }

    /// Events that must have succeeded earlier in the same deployment.
    fn needs(self, installed: bool) -> Option<Event> {
        match self {
            Event::ApplicationStart => Some(Event::AfterInstall),
            Event::ValidateService => Some(Event::ApplicationStart),
            Event::BeforeAllowTraffic | Event::AfterAllowTraffic if installed => {
                Some(Event::ValidateService)
            }
            _ => None,
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown lifecycle event `{0}`; expected one of: {list}",
    list = Event::ALL.iter().map(|e| e.name()).collect::<Vec<_>>().join(", ")
)]
pub struct UnknownEvent(pub String);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventStatus {
    Running,
    Succeeded,
    Failed,
    /// The daemon stopped while the event ran; it may be retried.
    Interrupted,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    pub event: Event,
    pub status: EventStatus,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub duration_ms: Option<u64>,
    /// What happened, in one line: the error for a failure. Never contains a secret.
    pub message: Option<String>,
    /// How many times this event was attempted in this deployment.
    pub attempts: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentStatus {
    InProgress,
    Succeeded,
    Failed,
    Superseded,
}

/// Where the deployment came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Origin {
    pub deployment_group_id: Option<String>,
    pub deployment_group_name: Option<String>,
    pub application_name: Option<String>,
    /// For `bgagent deploy`: the artifact given on the command line.
    pub artifact: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    pub id: String,
    pub origin: Origin,
    pub started_at: String,
    pub status: DeploymentStatus,
    pub events: Vec<EventRecord>,
    /// The release this deployment built (AfterInstall).
    pub release_id: Option<String>,
    /// The release that was current when this deployment switched.
    pub previous_release: Option<String>,
    /// The schema gate's account of this deployment's release (Magento), also when it was
    /// refused. Absent in older records and when the gate did not look.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<crate::schema::SchemaReport>,
}

/// Why an event is not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "{event} arrived after {later} already succeeded in deployment {deployment}; events run in CodeDeploy's order, start a new deployment to run it again"
    )]
    OutOfOrder {
        deployment: String,
        event: Event,
        later: Event,
    },
    #[error(
        "{event} needs {needs} to have succeeded first in deployment {deployment}, and it has not"
    )]
    MissingPrerequisite {
        deployment: String,
        event: Event,
        needs: Event,
    },
    #[error(
        "deployment {deployment} already failed at {failed}; only {failed} can be retried, or start a new deployment"
    )]
    DeploymentFailed { deployment: String, failed: Event },
    #[error("{running} is still running for deployment {deployment}")]
    Busy { deployment: String, running: Event },
}

/// The answer to "may this event run now?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Run it. `supersedes` names a deployment still in progress that this one replaces.
    Run {
        new_deployment: bool,
        supersedes: Option<String>,
    },
    /// It already succeeded in this deployment: answer success without doing it again.
    AlreadyDone,
    Refuse(Refusal),
}

/// Decides whether `event` of deployment `id` may run, given the deployment on record.
pub fn decide(current: Option<&Deployment>, id: &str, event: Event) -> Decision {
    let same = current.filter(|d| d.id == id);
    let Some(dep) = same else {
        if let Some(needs) = event.needs(false) {
            return Decision::Refuse(Refusal::MissingPrerequisite {
                deployment: id.to_string(),
                event,
                needs,
            });
        }
        let supersedes = current
            .filter(|d| d.status == DeploymentStatus::InProgress || has_running(d))
            .map(|d| d.id.clone());
        return Decision::Run {
            new_deployment: true,
            supersedes,
        };
    };
    if let Some(r) = dep.events.iter().find(|r| r.status == EventStatus::Running) {
        return Decision::Refuse(Refusal::Busy {
            deployment: id.to_string(),
            running: r.event,
        });
    }
    let last_of = |e: Event| dep.events.iter().rev().find(|r| r.event == e);
    if last_of(event).is_some_and(|r| r.status == EventStatus::Succeeded) {
        return Decision::AlreadyDone;
    }
    if let Some(bad) = dep
        .events
        .iter()
        .rev()
        .find(|r| matches!(r.status, EventStatus::Failed | EventStatus::Interrupted))
        .filter(|bad| last_of(bad.event).is_some_and(|r| r.status != EventStatus::Succeeded))
        && bad.event != event
    {
        return Decision::Refuse(Refusal::DeploymentFailed {
            deployment: id.to_string(),
            failed: bad.event,
        });
    }
    if let Some(later) = dep
        .events
        .iter()
        .filter(|r| r.status == EventStatus::Succeeded && r.event.rank() > event.rank())
        .map(|r| r.event)
        .max()
    {
        return Decision::Refuse(Refusal::OutOfOrder {
            deployment: id.to_string(),
            event,
            later,
        });
    }
    let installed = dep.events.iter().any(|r| r.event == Event::AfterInstall);
    if let Some(needs) = event.needs(installed) {
        let ok = last_of(needs).is_some_and(|r| r.status == EventStatus::Succeeded);
        if !ok {
            return Decision::Refuse(Refusal::MissingPrerequisite {
                deployment: id.to_string(),
                event,
                needs,
            });
        }
    }
    Decision::Run {
        new_deployment: false,
        supersedes: None,
    }
}

fn has_running(d: &Deployment) -> bool {
    d.events.iter().any(|r| r.status == EventStatus::Running)
}

pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

impl Deployment {
    pub fn new(id: &str, origin: Origin, now: SystemTime) -> Deployment {
        Deployment {
            id: id.to_string(),
            origin,
            started_at: timestamp(now),
            status: DeploymentStatus::InProgress,
            events: Vec::new(),
            release_id: None,
            previous_release: None,
            schema: None,
        }
    }

    /// Records that `event` started. Call only after [`decide`] said Run.
    pub fn begin(&mut self, event: Event, now: SystemTime) {
        let attempts = self
            .events
            .iter()
            .filter(|r| r.event == event)
            .map(|r| r.attempts)
            .max()
            .unwrap_or(0)
            + 1;
        // A retry replaces the failed record, so the list reads as the deployment's story.
        self.events.retain(|r| r.event != event);
        self.events.push(EventRecord {
            event,
            status: EventStatus::Running,
            started_at: timestamp(now),
            finished_at: None,
            duration_ms: None,
            message: None,
            attempts,
        });
        self.status = DeploymentStatus::InProgress;
    }

    /// Records the outcome of the running `event`.
    pub fn finish(
        &mut self,
        event: Event,
        outcome: Result<String, String>,
        now: SystemTime,
        duration_ms: u64,
    ) {
        if let Some(r) = self
            .events
            .iter_mut()
            .rev()
            .find(|r| r.event == event && r.status == EventStatus::Running)
        {
            r.finished_at = Some(timestamp(now));
            r.duration_ms = Some(duration_ms);
            match outcome {
                Ok(msg) => {
                    r.status = EventStatus::Succeeded;
                    r.message = Some(msg).filter(|m| !m.is_empty());
                }
                Err(msg) => {
                    r.status = EventStatus::Failed;
                    r.message = Some(msg);
                }
            }
        }
        self.status = self.derived_status();
    }

    /// Marks events left running by a daemon that stopped; returns them.
    pub fn interrupt_running(&mut self, now: SystemTime) -> Vec<Event> {
        let mut out = Vec::new();
        for r in self
            .events
            .iter_mut()
            .filter(|r| r.status == EventStatus::Running)
        {
            r.status = EventStatus::Interrupted;
            r.finished_at = Some(timestamp(now));
            r.message = Some(
                "bgagent stopped while this event ran; retry the event or the deployment".into(),
            );
            out.push(r.event);
        }
        if !out.is_empty() {
            self.status = DeploymentStatus::Failed;
        }
        out
    }

    fn derived_status(&self) -> DeploymentStatus {
        let last = self.events.last();
        match last.map(|r| r.status) {
            Some(EventStatus::Failed) | Some(EventStatus::Interrupted) => DeploymentStatus::Failed,
            Some(EventStatus::Succeeded)
                if matches!(
                    last.map(|r| r.event),
                    Some(Event::ValidateService)
                        | Some(Event::AfterAllowTraffic)
                        | Some(Event::AfterBlockTraffic)
                        | Some(Event::BeforeAllowTraffic)
                ) =>
            {
                DeploymentStatus::Succeeded
            }
            _ => DeploymentStatus::InProgress,
        }
    }

    pub fn record(&self, event: Event) -> Option<&EventRecord> {
        self.events.iter().rev().find(|r| r.event == event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    const IN_PLACE: [Event; 9] = Event::ALL;
    const BLUE_GREEN_REPLACEMENT: [Event; 7] = [
        Event::ApplicationStop,
        Event::BeforeInstall,
        Event::AfterInstall,
        Event::ApplicationStart,
        Event::ValidateService,
        Event::BeforeAllowTraffic,
        Event::AfterAllowTraffic,
    ];

    fn t(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + s)
    }

    /// Runs events through decide/begin/finish; returns the decisions.
    fn run(dep: &mut Option<Deployment>, id: &str, events: &[Event], ok: bool) -> Vec<Decision> {
        let mut out = Vec::new();
        for (i, &e) in events.iter().enumerate() {
            let d = decide(dep.as_ref(), id, e);
            if let Decision::Run { new_deployment, .. } = &d {
                if *new_deployment {
                    *dep = Some(Deployment::new(id, Origin::default(), t(i as u64)));
                }
                let dd = dep.as_mut().unwrap();
                dd.begin(e, t(i as u64));
                dd.finish(
                    e,
                    if ok {
                        Ok(String::new())
                    } else {
                        Err("boom".into())
                    },
                    t(i as u64 + 1),
                    1000,
                );
            }
            out.push(d);
        }
        out
    }

    fn all_run(ds: &[Decision]) -> bool {
        ds.iter().all(|d| matches!(d, Decision::Run { .. }))
    }

    #[test]
    fn every_event_in_order_runs() {
        let mut dep = None;
        assert!(all_run(&run(&mut dep, "d-1", &IN_PLACE, true)));
        let d = dep.unwrap();
        assert_eq!(d.events.len(), 9);
        assert_eq!(d.status, DeploymentStatus::Succeeded);
        let mut dep = None;
        assert!(all_run(&run(
            &mut dep,
            "d-2",
            &BLUE_GREEN_REPLACEMENT,
            true
        )));
    }

    #[test]
    fn first_deployment_without_application_stop_runs() {
        let mut dep = None;
        assert!(all_run(&run(
            &mut dep,
            "d-1",
            &BLUE_GREEN_REPLACEMENT[1..],
            true
        )));
    }

    #[test]
    fn original_instances_only_block_traffic() {
        let mut dep = None;
        assert!(all_run(&run(
            &mut dep,
            "d-1",
            &[Event::BeforeBlockTraffic, Event::AfterBlockTraffic],
            true
        )));
        // a blue/green rollback re-allows traffic on the original instance, no install
        assert!(all_run(&run(
            &mut dep,
            "d-2",
            &[Event::BeforeAllowTraffic, Event::AfterAllowTraffic],
            true
        )));
    }

    #[test]
    fn repeated_successful_event_is_already_done() {
        let mut dep = None;
        run(
            &mut dep,
            "d-1",
            &[Event::BeforeInstall, Event::AfterInstall],
            true,
        );
        assert_eq!(
            decide(dep.as_ref(), "d-1", Event::AfterInstall),
            Decision::AlreadyDone
        );
        assert_eq!(dep.as_ref().unwrap().events.len(), 2);
    }

    #[test]
    fn out_of_order_event_is_refused_with_a_reason() {
        let mut dep = None;
        run(
            &mut dep,
            "d-1",
            &[Event::AfterInstall, Event::ApplicationStart],
            true,
        );
        match decide(dep.as_ref(), "d-1", Event::BeforeInstall) {
            Decision::Refuse(r @ Refusal::OutOfOrder { .. }) => {
                assert!(
                    r.to_string()
                        .contains("BeforeInstall arrived after ApplicationStart"),
                    "{r}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn missing_prerequisites_are_refused() {
        assert!(matches!(
            decide(None, "d-1", Event::ApplicationStart),
            Decision::Refuse(Refusal::MissingPrerequisite {
                needs: Event::AfterInstall,
                ..
            })
        ));
        let mut dep = None;
        run(&mut dep, "d-1", &[Event::AfterInstall], true);
        assert!(matches!(
            decide(dep.as_ref(), "d-1", Event::ValidateService),
            Decision::Refuse(Refusal::MissingPrerequisite {
                needs: Event::ApplicationStart,
                ..
            })
        ));
        assert!(matches!(
            decide(dep.as_ref(), "d-1", Event::AfterAllowTraffic),
            Decision::Refuse(Refusal::MissingPrerequisite {
                needs: Event::ValidateService,
                ..
            })
        ));
    }

    #[test]
    fn after_failure_only_the_failed_event_retries() {
        let mut dep = None;
        run(&mut dep, "d-1", &[Event::BeforeInstall], true);
        run(&mut dep, "d-1", &[Event::AfterInstall], false);
        assert_eq!(dep.as_ref().unwrap().status, DeploymentStatus::Failed);
        assert!(matches!(
            decide(dep.as_ref(), "d-1", Event::ApplicationStart),
            Decision::Refuse(Refusal::DeploymentFailed {
                failed: Event::AfterInstall,
                ..
            })
        ));
        // retry succeeds, attempts counted, then the lifecycle continues
        assert!(all_run(&run(
            &mut dep,
            "d-1",
            &[Event::AfterInstall, Event::ApplicationStart],
            true
        )));
        let d = dep.unwrap();
        assert_eq!(d.record(Event::AfterInstall).unwrap().attempts, 2);
        assert_eq!(d.events.len(), 3);
    }

    #[test]
    fn a_new_deployment_supersedes_one_in_progress() {
        let mut dep = None;
        run(&mut dep, "d-1", &[Event::BeforeInstall], true);
        assert_eq!(
            decide(dep.as_ref(), "d-2", Event::ApplicationStop),
            Decision::Run {
                new_deployment: true,
                supersedes: Some("d-1".into())
            }
        );
        // a finished one is not "superseded"
        let mut dep = None;
        run(&mut dep, "d-1", &IN_PLACE, true);
        assert_eq!(
            decide(dep.as_ref(), "d-2", Event::ApplicationStop),
            Decision::Run {
                new_deployment: true,
                supersedes: None
            }
        );
    }

    #[test]
    fn interrupted_event_can_be_retried_and_blocks_others() {
        let mut d = Deployment::new("d-1", Origin::default(), t(0));
        d.begin(Event::AfterInstall, t(0));
        assert!(matches!(
            decide(Some(&d), "d-1", Event::AfterInstall),
            Decision::Refuse(Refusal::Busy { .. })
        ));
        assert_eq!(d.interrupt_running(t(5)), vec![Event::AfterInstall]);
        assert_eq!(d.status, DeploymentStatus::Failed);
        assert!(matches!(
            decide(Some(&d), "d-1", Event::ApplicationStart),
            Decision::Refuse(_)
        ));
        assert!(matches!(
            decide(Some(&d), "d-1", Event::AfterInstall),
            Decision::Run { .. }
        ));
    }

    #[test]
    fn unknown_event_lists_the_valid_ones() {
        let e = Event::parse("AfterInstal").unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("`AfterInstal`")
                && s.contains("ApplicationStop, ")
                && s.contains("AfterAllowTraffic"),
            "{s}"
        );
        for ev in Event::ALL {
            assert_eq!(Event::parse(ev.name()), Ok(ev));
        }
    }
}
