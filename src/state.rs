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

    /// The release `current` pointed at before the last switch to `current`, i.e. the
    /// rollback target.
    pub fn previous_release(&self, current: Option<&str>) -> Option<String> {
        let current = current?;
        self.switches
            .iter()
            .rev()
            .find(|s| s.to == current)
            .and_then(|s| s.from.clone())
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

    #[test]
    fn previous_release_follows_switches() {
        let mut doc = StateDoc::default();
        for (from, to) in [(None, "a"), (Some("a"), "b"), (Some("b"), "c")] {
            doc.record_switch(Switch {
                at: String::new(),
                from: from.map(String::from),
                to: to.into(),
                reason: SwitchReason::Deploy,
                deployment_id: None,
                duration_ms: 0,
            });
        }
        assert_eq!(doc.previous_release(Some("c")).as_deref(), Some("b"));
        assert_eq!(doc.previous_release(Some("a")), None);
    }
}
