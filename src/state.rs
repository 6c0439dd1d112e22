//! The persisted state: the deployment in progress with each event's result, the releases
//! bgagent built, the switches it made, and whether the node is live behind the load
//! balancer.
//!
//! One versioned JSON document, `state.json` in the state directory, written atomically
//! (temp file, fsync, rename) after every change, so a restart between or during events loses
//! nothing. The process that owns the state (the daemon, or `bgagent deploy` when no daemon
//! runs) holds an exclusive `flock` on `lock` for its lifetime; readers (`bgagent status`)
//! only read the file.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::lifecycle::Deployment;

pub const SCHEMA_VERSION: u32 = 1;
const HISTORY_LEN: usize = 20;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StateDoc {
    pub schema_version: u32,
    /// The deployment being run, or the last one.
    pub deployment: Option<Deployment>,
    /// Earlier deployments, newest last.
    #[serde(default)]
    pub history: Vec<Deployment>,
    /// Releases bgagent built, by id.
    #[serde(default)]
    pub releases: BTreeMap<String, ReleaseRecord>,
    /// Every switch of `current`, newest last.
    #[serde(default)]
    pub switches: Vec<Switch>,
    #[serde(default)]
    pub node: NodeState,
    /// php-fpm pools whose opcache bgagent manages (`opcache.switch: warm`), by service name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub opcache: BTreeMap<String, crate::opcache::PoolRecord>,
    /// The last sweep for processes running an old release's code, after a switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_processes: Option<crate::procs::Sweep>,
    /// The last deployment's cron pause (`cron.pause`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<crate::cron::CronRecord>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ReleaseRecord {
    pub created_at: String,
    pub deployment_id: String,
    /// Where it was built from: a deployment-archive directory or an artifact file.
    pub source: String,
    /// Parameter name -> version/type the templates were rendered from (no values).
    #[serde(default)]
    pub params: serde_json::Value,
    /// The cache generation this release uses.
    #[serde(default)]
    pub cache: serde_json::Value,
    /// What ValidateService said about it. Absent in records written before it was kept:
    /// such a release counts as good (it was the rollback target then too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<Validation>,
}

/// A release's standing: only a release that passed ValidateService is a rollback target;
/// one that failed it is pruned first and never counted toward `release.keep`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Validation {
    /// Built, not validated yet.
    Pending,
    Passed,
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Switch {
    pub at: String,
    pub from: Option<String>,
    pub to: String,
    pub reason: SwitchReason,
    pub deployment_id: Option<String>,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SwitchReason {
    Deploy,
    Rollback,
    AutoRollback,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Traffic {
    #[default]
    Unknown,
    Live,
    Idle,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeState {
    pub traffic: Traffic,
    pub since: Option<String>,
    /// Whether a drain (ApplicationStop, BeforeBlockTraffic) took the node out and nothing
    /// has brought it back yet (ValidateService, the traffic-allowing events, a switch-back
    /// to a healthy release). A restarted daemon makes a node that is not drained ready
    /// again through its health checks. Absent in records written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drained: Option<bool>,
}

impl NodeState {
    /// Drained, or for older records that did not say: not recorded live.
    pub fn is_drained(&self) -> bool {
        self.drained.unwrap_or(self.traffic != Traffic::Live)
    }
}

impl StateDoc {
    /// Starts a new deployment, moving the previous one to history.
    pub fn start_deployment(&mut self, dep: Deployment) {
        if let Some(old) = self.deployment.take() {
            self.history.push(old);
            let excess = self.history.len().saturating_sub(HISTORY_LEN);
            self.history.drain(..excess);
        }
        self.deployment = Some(dep);
    }

    pub fn record_switch(&mut self, s: Switch) {
        self.switches.push(s);
        let excess = self.switches.len().saturating_sub(100);
        self.switches.drain(..excess);
    }

    /// The rollback target: of the releases on disk other than `current`, the one that
    /// served most recently (by the switch history) and passed ValidateService. A release
    /// that failed validation, or was never validated, is never a target.
    pub fn rollback_target(&self, current: Option<&str>, on_disk: &[String]) -> Option<String> {
        let good = |id: &str| {
            Some(id) != current
                && on_disk.iter().any(|d| d == id)
                && self
                    .releases
                    .get(id)
                    .is_none_or(|r| matches!(r.validation, None | Some(Validation::Passed)))
        };
        self.switches
            .iter()
            .rev()
            .flat_map(|s| [Some(s.to.as_str()), s.from.as_deref()])
            .flatten()
            .find(|id| good(id))
            .map(String::from)
    }

    /// Records ValidateService's verdict on a release.
    pub fn set_validation(&mut self, id: &str, v: Validation) {
        if let Some(r) = self.releases.get_mut(id) {
            r.validation = Some(v);
        }
    }

    /// Releases that failed validation.
    pub fn failed_releases(&self) -> Vec<String> {
        self.releases
            .iter()
            .filter(|(_, r)| r.validation == Some(Validation::Failed))
            .map(|(id, _)| id.clone())
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("failed to {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "another bgagent process holds the state lock {0}: the daemon owns the state while it runs; use `bgagent hook`, `bgagent deploy` or `bgagent rollback`, which go through it, or stop it first"
    )]
    Locked(PathBuf),
    #[error(
        "state file {path} is not valid ({message}); it was kept as is: move it aside to start with empty state"
    )]
    Corrupt { path: PathBuf, message: String },
    #[error(
        "state file {path} has schema version {found}, newer than this bgagent understands ({SCHEMA_VERSION}); upgrade bgagent"
    )]
    TooNew { path: PathBuf, found: u32 },
}

impl StateDoc {
    /// Where this state disagrees with the disk, as sentences for the operator. Today one
    /// case: `current` names a release this file has no record of, so the file was replaced,
    /// emptied or restored from an older backup. bgagent carries on from what is on disk, but
    /// says so instead of showing an empty history as if nothing had been deployed.
    pub fn disagreements(&self, current: Option<&str>) -> Vec<String> {
        match current {
            Some(id) if !self.releases.contains_key(id) => vec![format!(
                "the state file (state.json) has no record of the current release {id} \
                 (current -> releases/{id}): it was replaced, emptied or restored from an older \
                 backup; the release keeps serving, and history and the rollback target start \
                 again with the next deployment"
            )],
            _ => vec![],
        }
    }
}

/// Reads the state file without taking the lock (for `status`).
pub fn read(dir: &Path) -> Result<StateDoc, StateError> {
    let path = dir.join("state.json");
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(StateDoc {
                schema_version: SCHEMA_VERSION,
                ..Default::default()
            });
        }
        Err(source) => {
            return Err(StateError::Io {
                action: "read",
                path,
                source,
            });
        }
    };
    let doc: StateDoc = serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
        path: path.clone(),
        message: e.to_string(),
    })?;
    if doc.schema_version > SCHEMA_VERSION {
        return Err(StateError::TooNew {
            path,
            found: doc.schema_version,
        });
    }
    Ok(doc)
}

/// The state directory, owned: holds the lock until dropped.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    _lock: File,
}

impl Store {
    /// Creates the state directory if needed and takes the exclusive lock without waiting.
    pub fn open(dir: &Path) -> Result<Store, StateError> {
        std::fs::create_dir_all(dir).map_err(|source| StateError::Io {
            action: "create state directory",
            path: dir.to_path_buf(),
            source,
        })?;
        let lock_path = dir.join("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|source| StateError::Io {
                action: "open",
                path: lock_path.clone(),
                source,
            })?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .map_err(|_| StateError::Locked(lock_path))?;
        Ok(Store {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn load(&self) -> Result<StateDoc, StateError> {
        read(&self.dir)
    }

    pub fn save(&self, doc: &StateDoc) -> Result<(), StateError> {
        let path = self.dir.join("state.json");
        let mut doc = doc.clone();
        doc.schema_version = SCHEMA_VERSION;
        let bytes = serde_json::to_vec_pretty(&doc).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        // 0640: status output is for root and the bgagent group; it holds no secrets.
        crate::fsutil::write_atomic(&path, &bytes, 0o640).map_err(|source| StateError::Io {
            action: "write",
            path,
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::{Event, Origin};
    use std::time::UNIX_EPOCH;

    #[test]
    fn save_load_round_trip_and_lock_is_exclusive() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path()).unwrap();
        assert!(matches!(Store::open(d.path()), Err(StateError::Locked(_))));
        let mut doc = store.load().unwrap();
        let mut dep = Deployment::new("d-1", Origin::default(), UNIX_EPOCH);
        dep.begin(Event::AfterInstall, UNIX_EPOCH);
        doc.start_deployment(dep);
        store.save(&doc).unwrap();
        let back = store.load().unwrap();
        assert_eq!(back.deployment, doc.deployment);
        drop(store);
        Store::open(d.path()).unwrap();
    }

    #[test]
    fn corrupt_and_future_files_are_reported_not_overwritten() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("state.json"), "{ half").unwrap();
        assert!(matches!(read(d.path()), Err(StateError::Corrupt { .. })));
        std::fs::write(d.path().join("state.json"), r#"{"schema_version": 99}"#).unwrap();
        assert!(matches!(
            read(d.path()),
            Err(StateError::TooNew { found: 99, .. })
        ));
    }

    fn switched(doc: &mut StateDoc, from: Option<&str>, to: &str, reason: SwitchReason) {
        doc.record_switch(Switch {
            at: String::new(),
            from: from.map(String::from),
            to: to.into(),
            reason,
            deployment_id: None,
            duration_ms: 0,
        });
    }

    #[test]
    fn rollback_target_follows_switches() {
        let mut doc = StateDoc::default();
        let disk: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        for (from, to) in [(None, "a"), (Some("a"), "b"), (Some("b"), "c")] {
            switched(&mut doc, from, to, SwitchReason::Deploy);
        }
        assert_eq!(doc.rollback_target(Some("c"), &disk).as_deref(), Some("b"));
        // after a rollback to b, the target is the release just left
        switched(&mut doc, Some("c"), "b", SwitchReason::Rollback);
        assert_eq!(doc.rollback_target(Some("b"), &disk).as_deref(), Some("c"));
        // not on disk: the next one
        assert_eq!(
            doc.rollback_target(Some("b"), &disk[..2]).as_deref(),
            Some("a")
        );
        assert_eq!(doc.rollback_target(Some("a"), &disk[..1]), None);
    }

    /// Issue 11 item 3: after an automatic switch-back, the "previous" was the `from` of the
    /// last switch: the release that had just failed validation.
    #[test]
    fn rollback_target_after_an_auto_rollback_is_never_the_failed_release() {
        let mut doc = StateDoc::default();
        let disk: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        for id in ["a", "b", "c"] {
            doc.releases.insert(
                id.into(),
                ReleaseRecord {
                    validation: Some(Validation::Passed),
                    ..Default::default()
                },
            );
        }
        switched(&mut doc, None, "a", SwitchReason::Deploy);
        switched(&mut doc, Some("a"), "b", SwitchReason::Deploy);
        switched(&mut doc, Some("b"), "c", SwitchReason::Deploy);
        doc.set_validation("c", Validation::Failed);
        switched(&mut doc, Some("c"), "b", SwitchReason::AutoRollback);
        assert_eq!(doc.rollback_target(Some("b"), &disk).as_deref(), Some("a"));
        // a release built but never validated is not a target either
        doc.set_validation("a", Validation::Pending);
        assert_eq!(doc.rollback_target(Some("b"), &disk), None);
        assert_eq!(doc.failed_releases(), vec!["c".to_string()]);
    }
}
