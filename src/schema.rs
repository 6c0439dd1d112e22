//! Schema safety while old and new code serve side by side.
//!
//! The Magento gate runs `bin/magento setup:db:status` and `app:config:status` for the new
//! release before any traffic reaches it (exit code 2: an upgrade or a config import is
//! needed). Policy `fail` (default) refuses the release as not zero-downtime compatible,
//! `upgrade` runs `setup:upgrade --keep-generated` once for the whole fleet (env.php's
//! `deployment/blue_green/enabled` keeps old nodes serving meanwhile), `ignore` only warns.
//!
//! A configured migration command (e.g. `bin/phinx migrate`) runs exactly once per
//! deployment across the fleet: under a MySQL/MariaDB named lock (GET_LOCK on a dedicated
//! connection), recorded in the table `bgagent_migrations`, one row per attempt (deployment,
//! step, attempt, node, command, start, end, result). Nodes that did not run it wait on the
//! lock and then read the latest attempt: they skip a success, and fail on a failure, naming
//! the node and the command. A retried AfterInstall (after the operator fixed the cause) that
//! finds a failure which ended before it began to wait runs the step again as a new attempt;
//! retries waiting together then see that attempt's result like a first round does.
//!
//! The migration never runs twice at once, whatever dies: the command inherits the lock
//! connection's socket, so the server keeps the lock until the command and everything it
//! started have exited, even when the daemon holding it is killed. The next node then finds
//! that attempt `running`, records it `interrupted` (it is provably over: the lock is free)
//! and runs the step again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mysql_async::prelude::Queryable;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::process::{self, CommandSpec};

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    #[default]
    Fail,
    Upgrade,
    Ignore,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct SchemaConfig {
    /// Run the Magento gate (bin/magento setup:db:status, app:config:status).
    pub magento_gate: bool,
    pub policy: Policy,
    /// PHP binary for bin/magento.
    pub php: String,
    /// A command run once per deployment across the fleet, in the new release.
    pub migration: Option<MigrationSpec>,
    /// The database holding the lock and the record table.
    pub database: Option<DbConfig>,
    #[serde(with = "crate::config::duration")]
    pub lock_timeout: Duration,
    #[serde(with = "crate::config::duration")]
    pub command_timeout: Duration,
    /// Deadline for connecting to the database and for each bookkeeping query (the lock
    /// wait gets lock_timeout on top): a server that accepts and never answers fails the
    /// event instead of holding it.
    #[serde(with = "crate::config::duration")]
    pub connect_timeout: Duration,
}

impl Default for SchemaConfig {
    fn default() -> Self {
        SchemaConfig {
            magento_gate: false,
            policy: Policy::Fail,
            php: "php".into(),
            migration: None,
            database: None,
            lock_timeout: Duration::from_secs(900),
            command_timeout: Duration::from_secs(1800),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct DbConfig {
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    pub user: String,
    pub database: String,
    /// The password: a parameter key (e.g. db.password), an environment variable, or a file.
    #[serde(default)]
    pub password_param: Option<String>,
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

/// The migration command; like a [`CommandSpec`], but its timeout defaults to
/// `schema.command_timeout` (a migration is as long as a setup:upgrade, not a hook command).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct MigrationSpec {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default, with = "crate::config::opt_duration")]
    pub timeout: Option<Duration>,
}

impl MigrationSpec {
    /// The command to run: its own timeout, else `command_timeout`.
    pub fn command(&self, command_timeout: Duration) -> CommandSpec {
        let argv: Vec<&str> = self.argv.iter().map(String::as_str).collect();
        let mut c = CommandSpec::new(&argv);
        c.env = self.env.clone();
        c.cwd = self.cwd.clone();
        c.user = self.user.clone();
        c.group = self.group.clone();
        c.timeout = self.timeout.unwrap_or(command_timeout);
        c
    }
}

fn default_port() -> u16 {
    3306
}

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error(
        "release is not zero-downtime compatible: `bin/magento {check}` says {what} (schema.policy is fail):\n{output}\nMake schema changes backward compatible (for example with migrations), or set schema.policy: upgrade"
    )]
    NotCompatible {
        check: String,
        what: String,
        output: String,
    },
    #[error("`bin/magento {check}` failed: {message}")]
    Gate { check: String, message: String },
    #[error("schema: database {at}: {message}")]
    Db { at: String, message: String },
    #[error(
        "schema: waited {waited:?} (schema.lock_timeout) for the fleet's schema lock `{lock}`: {holder}. Retry this event once it is free"
    )]
    LockTimeout {
        waited: Duration,
        lock: String,
        holder: String,
    },
    #[error(
        "the {step} (`{command}`) for deployment {deployment} failed on node {node} at {at}: {message}. Fix the cause, then retry AfterInstall on any node (CodeDeploy: retry the deployment; by hand: DEPLOYMENT_ID={deployment} bgagent hook AfterInstall): the next attempt runs the {step} again"
    )]
    FailedElsewhere {
        step: String,
        command: String,
        deployment: String,
        node: String,
        at: String,
        message: String,
    },
    #[error("{step} failed: {message}")]
    Step { step: String, message: String },
    #[error("schema: {0}")]
    Config(String),
}

/// Outcome of one `bin/magento` status check: 0 fine, 2 upgrade or import needed.
async fn magento_check(
    cfg: &SchemaConfig,
    release: &Path,
    check: &str,
) -> Result<Option<String>, SchemaError> {
    let mut spec = CommandSpec::new(&[&cfg.php, "bin/magento", check, "--no-ansi"]);
    spec.timeout = cfg.command_timeout;
    match process::run(&spec, Some(release), &BTreeMap::new()).await {
        Ok(_) => Ok(None),
        Err(process::ProcessError::Failed { code: 2, tail, .. }) => Ok(Some(tail.join("\n"))),
        Err(e) => Err(SchemaError::Gate {
            check: check.into(),
            message: e.to_string(),
        }),
    }
}

/// Who is preparing a release, for the fleet's record.
pub struct Attempting<'a> {
    pub app: &'a str,
    pub deployment: &'a str,
    pub node: &'a str,
    /// This node's AfterInstall is a retry: a step that failed before this node began to
    /// wait for the lock runs again (a failure met by a first attempt fails it, naming where).
    pub retry: bool,
}

/// Everything schema-related for a new release, in AfterInstall (after env.php is rendered).
pub async fn prepare(
    cfg: &SchemaConfig,
    release: &Path,
    at: &Attempting<'_>,
    password_from_params: impl Fn(&str) -> Option<String>,
) -> Result<Vec<String>, SchemaError> {
    let mut done = Vec::new();
    let mut upgrade_needed = false;
    if cfg.magento_gate {
        for (check, what) in [
            (
                "setup:db:status",
                "the database schema or data needs setup:upgrade",
            ),
            (
                "app:config:status",
                "the configuration needs app:config:import",
            ),
        ] {
            if let Some(output) = magento_check(cfg, release, check).await? {
                match cfg.policy {
                    Policy::Fail => {
                        return Err(SchemaError::NotCompatible {
                            check: check.into(),
                            what: what.into(),
                            output,
                        });
                    }
                    Policy::Ignore => {
                        warn!("bin/magento {check}: {what}; ignored (schema.policy is ignore)")
                    }
                    Policy::Upgrade => upgrade_needed = true,
                }
            }
        }
        done.push("magento gate passed".to_string());
    }
    let mut steps: Vec<(&str, CommandSpec)> = Vec::new();
    if upgrade_needed {
        let mut s = CommandSpec::new(&[
            &cfg.php,
            "bin/magento",
            "setup:upgrade",
            "--keep-generated",
            "--no-ansi",
        ]);
        s.timeout = cfg.command_timeout;
        steps.push(("setup:upgrade", s));
    }
    if let Some(m) = &cfg.migration {
        steps.push(("migration", m.command(cfg.command_timeout)));
    }
    if steps.is_empty() {
        return Ok(done);
    }
    let Some(db) = &cfg.database else {
        return Err(SchemaError::Config(
            "schema.database is needed to run a step once for the fleet (it holds the lock and the record)".into(),
        ));
    };
    let password = match (&db.password_param, &db.password_env, &db.password_file) {
        (Some(p), _, _) => password_from_params(p),
        (None, Some(v), _) => std::env::var(v).ok(),
        (None, None, Some(f)) => std::fs::read_to_string(f)
            .ok()
            .map(|s| s.trim_end().to_string()),
        _ => None,
    };
    for (step, spec) in steps {
        let r = run_once(
            db,
            password.clone(),
            (cfg.connect_timeout, cfg.lock_timeout),
            at,
            step,
            &spec,
            release,
        )
        .await?;
        done.push(r);
    }
    Ok(done)
}

const TABLE: &str = "CREATE TABLE IF NOT EXISTS bgagent_migrations (\
     deployment_id VARCHAR(128) NOT NULL, step VARCHAR(64) NOT NULL, attempt INT NOT NULL DEFAULT 1, \
     node VARCHAR(255) NOT NULL, command TEXT NULL, \
     started_at DATETIME(3) NOT NULL, finished_at DATETIME(3) NULL, result VARCHAR(16) NOT NULL, \
     message TEXT NULL, PRIMARY KEY (deployment_id, step, attempt))";

/// The latest attempt of a step, as recorded.
struct Attempt {
    attempt: i64,
    node: String,
    result: String,
    finished_at: Option<String>,
    message: Option<String>,
    command: Option<String>,
    /// It ended before this node began to wait for the lock: a retry is asking to run it.
    ended_before_we_waited: bool,
}

/// What to do once the lock is ours, from the latest attempt. Pure.
#[derive(Debug, PartialEq)]
enum Next {
    Run {
        attempt: i64,
    },
    Skip {
        node: String,
    },
    FailedThisRound,
    /// The attempt's node died while it ran; the lock being ours proves it is over.
    RunAfterInterrupted {
        attempt: i64,
        node: String,
    },
}

fn decide(latest: Option<&Attempt>, retry: bool) -> Next {
    match latest {
        None => Next::Run { attempt: 1 },
        Some(a) if a.result == "success" => Next::Skip {
            node: a.node.clone(),
        },
        Some(a) if a.result == "running" => Next::RunAfterInterrupted {
            attempt: a.attempt + 1,
            node: a.node.clone(),
        },
        Some(a) if a.result == "failed" && !(retry && a.ended_before_we_waited) => {
            Next::FailedThisRound
        }
        Some(a) => Next::Run {
            attempt: a.attempt + 1,
        },
    }
}

/// Finds our end of the lock connection among this process's descriptors: the TCP socket
/// whose local port is the one the server sees for `CONNECTION_ID()` and whose peer port is
/// the database's.
fn lock_socket(client_port: u16, db_port: u16) -> Option<std::os::fd::RawFd> {
    use std::os::fd::BorrowedFd;
    let port = |a: rustix::net::SocketAddrAny| -> Option<u16> {
        std::net::SocketAddr::try_from(a).ok().map(|a| a.port())
    };
    for entry in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        let Ok(fd) = entry
            .file_name()
            .to_string_lossy()
            .parse::<std::os::fd::RawFd>()
        else {
            continue;
        };
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if !target.to_string_lossy().starts_with("socket:") {
            continue;
        }
        // SAFETY: fd is open in this process (listed just now) and only borrowed for two
        // getsockname/getpeername calls.
        let b = unsafe { BorrowedFd::borrow_raw(fd) };
        let local = rustix::net::getsockname(b).ok().and_then(port);
        let peer = rustix::net::getpeername(b).ok().flatten().and_then(port);
        if local == Some(client_port) && peer == Some(db_port) {
            return Some(fd);
        }
    }
    None
}

/// Who holds the lock, for the timeout message: the running attempt's node and since when,
/// else the MySQL connection holding it.
async fn lock_holder(conn: &mut mysql_async::Conn, lock: &str) -> String {
    let running: Option<(String, String, String, String)> = conn
        .query_first(
            "SELECT node, CAST(started_at AS CHAR), deployment_id, step FROM bgagent_migrations \
             WHERE result = 'running' ORDER BY started_at DESC LIMIT 1",
        )
        .await
        .ok()
        .flatten();
    let holder: Option<(Option<i64>, Option<String>, Option<i64>)> = conn
        .exec_first(
            "SELECT p.ID, p.HOST, p.TIME FROM information_schema.PROCESSLIST p WHERE p.ID = IS_USED_LOCK(?)",
            (lock,),
        )
        .await
        .ok()
        .flatten();
    let conn_text = match holder {
        Some((Some(id), host, _)) => format!(
            "MySQL connection {id} from {}",
            host.unwrap_or_else(|| "an unknown host".into())
        ),
        _ => "no connection any more (it was just released)".into(),
    };
    match running {
        Some((node, since, dep, step)) => format!(
            "node {node} holds it since {since} (server time), running the {step} for deployment {dep} ({conn_text})"
        ),
        None => format!("it is held by {conn_text}, which is not running a recorded step"),
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_once(
    db: &DbConfig,
    password: Option<String>,
    (connect_timeout, lock_timeout): (Duration, Duration),
    who: &Attempting<'_>,
    step: &str,
    spec: &CommandSpec,
    release: &Path,
) -> Result<String, SchemaError> {
    let (app, deployment, node) = (who.app, who.deployment, who.node);
    let at = format!("{}@{}:{}/{}", db.user, db.host, db.port, db.database);
    let dberr = |e: mysql_async::Error| SchemaError::Db {
        at: at.clone(),
        message: e.to_string(),
    };
    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname(db.host.clone())
        .tcp_port(db.port)
        .user(Some(db.user.clone()))
        .pass(password)
        .db_name(Some(db.database.clone()));
    let stalled = |d: Duration, key: &str| SchemaError::Db {
        at: at.clone(),
        message: format!(
            "the database did not answer within {} ms ({key}; stalled)",
            d.as_millis()
        ),
    };
    let mut conn = tokio::time::timeout(connect_timeout, mysql_async::Conn::new(opts))
        .await
        .map_err(|_| stalled(connect_timeout, "schema.connect_timeout"))?
        .map_err(dberr)?;
    // The connection idles while the step runs: the server must not drop it (and the lock)
    // before the step's own timeout.
    tokio::time::timeout(
        connect_timeout,
        conn.exec_drop(
            "SET SESSION wait_timeout = GREATEST(@@session.wait_timeout, ?)",
            (spec.timeout.as_secs() + 600,),
        ),
    )
    .await
    .map_err(|_| stalled(connect_timeout, "schema.connect_timeout"))?
    .map_err(dberr)?;
    let began_waiting: String = tokio::time::timeout(
        connect_timeout,
        conn.query_first::<String, _>("SELECT CAST(NOW(3) AS CHAR)"),
    )
    .await
    .map_err(|_| stalled(connect_timeout, "schema.connect_timeout"))?
    .map_err(dberr)?
    .unwrap_or_default();
    let lock_name = format!("bgagent:{app}");
    info!("waiting for the fleet's schema lock `{lock_name}` ({step})");
    let got: Option<i64> = tokio::time::timeout(
        lock_timeout + connect_timeout,
        conn.exec_first(
            "SELECT GET_LOCK(?, ?)",
            (lock_name.clone(), lock_timeout.as_secs()),
        ),
    )
    .await
    .map_err(|_| {
        stalled(
            lock_timeout + connect_timeout,
            "schema.lock_timeout + schema.connect_timeout",
        )
    })?
    .map_err(dberr)?;
    if got != Some(1) {
        let holder = lock_holder(&mut conn, &lock_name).await;
        let _ = conn.disconnect().await;
        return Err(SchemaError::LockTimeout {
            waited: lock_timeout,
            lock: lock_name,
            holder,
        });
    }
    let result = async {
        conn.query_drop(TABLE).await.map_err(dberr)?;
        // Tables made by earlier versions kept one row per step: keep every attempt now.
        let has_attempt: Option<i64> = conn
            .query_first(
                "SELECT COUNT(*) FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() \
                 AND TABLE_NAME = 'bgagent_migrations' AND COLUMN_NAME = 'attempt'",
            )
            .await
            .map_err(dberr)?;
        if has_attempt == Some(0) {
            conn.query_drop(
                "ALTER TABLE bgagent_migrations ADD COLUMN attempt INT NOT NULL DEFAULT 1 AFTER step, \
                 ADD COLUMN command TEXT NULL AFTER node, DROP PRIMARY KEY, \
                 ADD PRIMARY KEY (deployment_id, step, attempt)",
            )
            .await
            .map_err(dberr)?;
        }
        type Row = (i64, String, String, Option<String>, Option<String>, Option<String>, i64);
        let row: Option<Row> = conn
            .exec_first(
                "SELECT attempt, node, result, CAST(finished_at AS CHAR), message, command, \
                 COALESCE(finished_at < ?, 0) FROM bgagent_migrations \
                 WHERE deployment_id = ? AND step = ? ORDER BY attempt DESC LIMIT 1",
                (&began_waiting, deployment, step),
            )
            .await
            .map_err(dberr)?;
        let latest = row.map(|(attempt, node, result, finished_at, message, command, before)| Attempt {
            attempt,
            node,
            result,
            finished_at,
            message,
            command,
            ended_before_we_waited: before != 0,
        });
        let attempt = match decide(latest.as_ref(), who.retry) {
            Next::Skip { node: by } => {
                info!("{step} for deployment {deployment} already ran on node {by}; skipping");
                return Ok(format!("{step} ran once, on node {by}"));
            }
            Next::FailedThisRound => {
                let a = latest.expect("a failed attempt");
                return Err(SchemaError::FailedElsewhere {
                    step: step.into(),
                    command: a.command.unwrap_or_default(),
                    deployment: deployment.into(),
                    node: a.node,
                    at: a.finished_at.unwrap_or_default(),
                    message: a.message.unwrap_or_default(),
                });
            }
            Next::RunAfterInterrupted { attempt, node: by } => {
                warn!(
                    "{step} for deployment {deployment} was interrupted on node {by} (attempt {}; it has ended: the lock was free); running it again",
                    attempt - 1
                );
                conn.exec_drop(
                    "UPDATE bgagent_migrations SET result = 'interrupted', finished_at = NOW(3), \
                     message = 'its node stopped while it ran; the lock was held until the command ended' \
                     WHERE deployment_id = ? AND step = ? AND attempt = ?",
                    (deployment, step, attempt - 1),
                )
                .await
                .map_err(dberr)?;
                attempt
            }
            Next::Run { attempt } => {
                if let Some(a) = &latest {
                    info!(
                        "{step} for deployment {deployment} failed on node {} at {}; running it again (attempt {attempt})",
                        a.node,
                        a.finished_at.as_deref().unwrap_or("?")
                    );
                }
                attempt
            }
        };
        let command = spec.argv.join(" ");
        conn.exec_drop(
            "INSERT INTO bgagent_migrations (deployment_id, step, attempt, node, command, started_at, result) \
             VALUES (?, ?, ?, ?, ?, NOW(3), 'running')",
            (deployment, step, attempt, node, &command),
        )
        .await
        .map_err(dberr)?;
        // The command holds our end of the lock connection too: if this daemon dies, the
        // server keeps the lock until the command has ended, so no other node starts it.
        let client: Option<String> = conn
            .query_first("SELECT HOST FROM information_schema.PROCESSLIST WHERE ID = CONNECTION_ID()")
            .await
            .map_err(dberr)?;
        let client_port = client
            .as_deref()
            .and_then(|h| h.rsplit(':').next())
            .and_then(|p| p.parse().ok());
        let fd = client_port.and_then(|p| lock_socket(p, db.port));
        if fd.is_none() {
            warn!(
                "could not find this node's end of the lock connection (the server sees it as {client:?}): \
                 if this daemon is killed while the {step} runs, another node may start it before it ends"
            );
        }
        info!("running {step} for deployment {deployment} on this node ({node}) for the fleet (attempt {attempt})");
        let mut env = BTreeMap::new();
        env.insert("DEPLOYMENT_ID".to_string(), deployment.to_string());
        env.insert("BGAGENT_NODE".to_string(), node.to_string());
        let outcome = process::run_inheriting(spec, Some(release), &env, fd).await;
        let (res, msg) = match &outcome {
            Ok(_) => ("success", None),
            Err(e) => ("failed", Some(crate::text::truncate(&e.to_string(), 1000))),
        };
        conn.exec_drop(
            "UPDATE bgagent_migrations SET finished_at = NOW(3), result = ?, message = ? \
             WHERE deployment_id = ? AND step = ? AND attempt = ?",
            (res, msg.clone(), deployment, step, attempt),
        )
        .await
        .map_err(dberr)?;
        match outcome {
            Ok(_) => Ok(format!("{step} ran once, on this node ({node})")),
            Err(e) => Err(SchemaError::Step {
                step: step.into(),
                message: format!(
                    "{e}. Fix the cause, then retry AfterInstall on any node (CodeDeploy: retry the deployment; by hand: DEPLOYMENT_ID={deployment} bgagent hook AfterInstall): the next attempt runs the {step} again"
                ),
            }),
        }
    }
    .await;
    let _: Result<Option<i64>, _> = conn
        .exec_first("SELECT RELEASE_LOCK(?)", (lock_name,))
        .await;
    let _ = conn.disconnect().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(result: &str, before: bool) -> Attempt {
        Attempt {
            attempt: 2,
            node: "n1".into(),
            result: result.into(),
            finished_at: Some("2026-12-01 10:00:00.000".into()),
            message: None,
            command: Some("bin/phinx migrate".into()),
            ended_before_we_waited: before,
        }
    }

    #[test]
    fn the_latest_attempt_decides_what_a_node_does_under_the_lock() {
        assert_eq!(decide(None, false), Next::Run { attempt: 1 });
        assert_eq!(
            decide(Some(&attempt("success", false)), true),
            Next::Skip { node: "n1".into() }
        );
        // a first attempt never repeats a failure, however late it comes
        assert_eq!(
            decide(Some(&attempt("failed", true)), false),
            Next::FailedThisRound
        );
        // a retry does not repeat a failure met while it waited (retries waiting together)
        assert_eq!(
            decide(Some(&attempt("failed", false)), true),
            Next::FailedThisRound
        );
        // a retry after a fix runs it again
        assert_eq!(
            decide(Some(&attempt("failed", true)), true),
            Next::Run { attempt: 3 }
        );
        assert_eq!(
            decide(Some(&attempt("running", true)), false),
            Next::RunAfterInterrupted {
                attempt: 3,
                node: "n1".into()
            }
        );
    }

    #[test]
    fn the_migration_timeout_defaults_to_schema_command_timeout() {
        let m = MigrationSpec {
            argv: vec!["bin/phinx".into(), "migrate".into()],
            env: BTreeMap::new(),
            cwd: None,
            user: None,
            group: None,
            timeout: None,
        };
        assert_eq!(
            m.command(Duration::from_secs(1800)).timeout,
            Duration::from_secs(1800)
        );
        let m = MigrationSpec {
            timeout: Some(Duration::from_secs(60)),
            ..m
        };
        assert_eq!(
            m.command(Duration::from_secs(1800)).timeout,
            Duration::from_secs(60)
        );
    }
}
