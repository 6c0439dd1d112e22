//! The control-socket protocol between the CLI (`hook`, `deploy`, `rollback`, `status`) and
//! the daemon: one JSON request line from the client, then JSON reply lines from the daemon:
//! any number of `log` lines as they happen, and one final `done` line.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Requests are small; a longer line is refused rather than buffered.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// A CodeDeploy lifecycle event, with CodeDeploy's environment.
    Hook {
        event: String,
        env: BTreeMap<String, String>,
    },
    /// The whole in-place lifecycle for an artifact (directory or archive).
    Deploy { artifact: PathBuf },
    /// Back to the rollback target. `from`: the release the client expects to leave; when
    /// an earlier rollback already left it, the answer is "already rolled back".
    Rollback {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<String>,
    },
    /// The node's status document (the same JSON as `bgagent status --json`).
    Status,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Succeeded,
    /// The event had already succeeded in this deployment; nothing was done.
    AlreadyDone,
    Failed,
    /// The event was not run (out of order, prerequisite missing, deployment failed).
    Refused,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Log {
        ts: String,
        level: String,
        message: String,
    },
    /// How far a long step is (for a terminal; plain output ignores it).
    Progress(crate::progress::Progress),
    Done {
        outcome: Outcome,
        /// One or two sentences: what ran, and on failure what failed and why.
        summary: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data: Option<serde_json::Value>,
    },
}

/// The CodeDeploy environment variables passed from the hook to the daemon.
pub const CODEDEPLOY_ENV: [&str; 5] = [
    "LIFECYCLE_EVENT",
    "DEPLOYMENT_ID",
    "DEPLOYMENT_GROUP_ID",
    "DEPLOYMENT_GROUP_NAME",
    "APPLICATION_NAME",
];

/// Whether an environment variable is passed to the daemon.
pub fn is_forwarded(name: &str) -> bool {
    CODEDEPLOY_ENV.contains(&name) || name.starts_with("BUNDLE_")
}
