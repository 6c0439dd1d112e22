//! A fleet of bgagent agents for the fleet tests (fleet_cache, fleet_schema, magento_upgrade):
//! each agent in its own directory with its own config, its daemon started and stopped the
//! same way, driven through `bgagent hook` with one CodeDeploy environment; [`together`] runs
//! a deployment's events on every agent at the same instant. The tests keep their own config
//! text and assertions.

use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::sync::Barrier;
use std::time::{SystemTime, UNIX_EPOCH};

/// The deployment group every hook names (DEPLOYMENT_GROUP_ID): CodeDeploy unpacks the
/// revisions under `<deployment_root>/g/` ([`archive`]).
pub const GROUP: &str = "g";

/// Where CodeDeploy unpacks deployment `dep`'s revision under the agents' `deployment_root`.
pub fn archive(deployment_root: &Path, dep: &str) -> PathBuf {
    deployment_root
        .join(GROUP)
        .join(dep)
        .join("deployment-archive")
}

/// One agent: `dir` holds its bgagent.yaml (whose relative paths are under `dir`), the
/// daemon's control socket `run/s.sock` and its log `daemon.log`. Dropping it stops the
/// daemon as systemd does.
pub struct Agent {
    pub dir: PathBuf,
    pub daemon: Child,
}

impl Agent {
    /// Writes `config` as `dir`/bgagent.yaml and starts the daemon on it; the config puts the
    /// socket at `run/s.sock` (relative to `dir`).
    pub fn spawn(dir: &Path, config: &str) -> Agent {
        std::fs::write(dir.join("bgagent.yaml"), config).unwrap();
        Agent {
            dir: dir.to_path_buf(),
            daemon: start_daemon(dir),
        }
    }

    /// Starts a new daemon on the agent's config, in place of one that is gone (killed and
    /// reaped, say).
    pub fn respawn(&mut self) {
        self.daemon = start_daemon(&self.dir);
    }

    pub fn config(&self) -> PathBuf {
        self.dir.join("bgagent.yaml")
    }

    /// `bgagent --config <config> ARGS`.
    pub fn cli(&self, args: &[&str]) -> Output {
        super::bgagent(&self.config(), args)
    }

    /// `bgagent hook EV` for deployment `dep` of application `shop` in [`GROUP`].
    pub fn hook(&self, ev: &str, dep: &str) -> Output {
        super::hook_command(&self.config(), ev, dep, GROUP)
            .output()
            .unwrap()
    }

    /// `status --json`, parsed.
    pub fn status_json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.cli(&["status", "--json"]).stdout).unwrap()
    }

    /// `status` as an operator reads it (both streams).
    pub fn status_text(&self) -> String {
        super::text(&self.cli(&["status"]))
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        super::stop_daemon(&mut self.daemon);
    }
}

fn start_daemon(dir: &Path) -> Child {
    super::spawn_daemon(
        super::BIN,
        &dir.join("bgagent.yaml"),
        &dir.join("run/s.sock"),
        &dir.join("daemon.log"),
    )
}

/// Every agent runs `events` of deployment `dep` in order, each on its own thread, all
/// released at once for every event (one barrier). Per agent, per event: the hook's output
/// and when it returned, in seconds since the epoch (comparable with `date +%s.%N`).
pub fn together(agents: &[Agent], dep: &str, events: &[&str]) -> Vec<Vec<(Output, f64)>> {
    let barrier = Barrier::new(agents.len());
    std::thread::scope(|s| {
        let threads: Vec<_> = agents
            .iter()
            .map(|a| {
                let barrier = &barrier;
                s.spawn(move || {
                    events
                        .iter()
                        .map(|ev| {
                            barrier.wait();
                            let out = a.hook(ev, dep);
                            let at = SystemTime::now()
                                .duration_since(UNIX_EPOCH)
                                .unwrap()
                                .as_secs_f64();
                            (out, at)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    })
}
