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
//! connection), recorded in the table `bgagent_migrations` (deployment, step, node, start,
//! end, result). Nodes that did not run it wait on the lock and then read the result: they
//! skip a success and fail on a failure, naming the node where it failed. A row left
//! `running` by a node that died (its lock went with its connection) is run again.

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
    pub migration: Option<CommandSpec>,
    /// The database holding the lock and the record table.
    pub database: Option<DbConfig>,
    #[serde(with = "crate::config::duration")]
    pub lock_timeout: Duration,
    #[serde(with = "crate::config::duration")]
    pub command_timeout: Duration,
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
        "schema: waited {0:?} for the fleet's schema lock; another node holds it (see the bgagent_migrations table)"
    )]
    LockTimeout(Duration),
    #[error("the {step} for deployment {deployment} failed on node {node}: {message}")]
    FailedElsewhere {
        step: String,
        deployment: String,
        node: String,
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

/// Everything schema-related for a new release, in AfterInstall (after env.php is rendered).
pub async fn prepare(
    cfg: &SchemaConfig,
    release: &Path,
    app: &str,
    deployment: &str,
    node: &str,
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
        steps.push(("migration", m.clone()));
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
            cfg.lock_timeout,
            app,
            deployment,
            node,
            step,
            &spec,
            release,
        )
        .await?;
        done.push(r);
    }
    Ok(done)
}

#[allow(clippy::too_many_arguments)]
async fn run_once(
    db: &DbConfig,
    password: Option<String>,
    lock_timeout: Duration,
    app: &str,
    deployment: &str,
    node: &str,
    step: &str,
    spec: &CommandSpec,
    release: &Path,
) -> Result<String, SchemaError> {
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
    let mut conn = mysql_async::Conn::new(opts).await.map_err(dberr)?;
    conn.query_drop(
        "CREATE TABLE IF NOT EXISTS bgagent_migrations (\
         deployment_id VARCHAR(128) NOT NULL, step VARCHAR(64) NOT NULL, node VARCHAR(255) NOT NULL, \
         started_at DATETIME(3) NOT NULL, finished_at DATETIME(3) NULL, result VARCHAR(16) NOT NULL, \
         message TEXT NULL, PRIMARY KEY (deployment_id, step))",
    )
    .await
    .map_err(dberr)?;
    let lock_name = format!("bgagent:{app}");
    info!("waiting for the fleet's schema lock `{lock_name}` ({step})");
    let got: Option<i64> = conn
        .exec_first(
            "SELECT GET_LOCK(?, ?)",
            (lock_name.clone(), lock_timeout.as_secs()),
        )
        .await
        .map_err(dberr)?;
    if got != Some(1) {
        return Err(SchemaError::LockTimeout(lock_timeout));
    }
    let result = async {
        let row: Option<(String, String, Option<String>)> = conn
            .exec_first(
                "SELECT result, node, message FROM bgagent_migrations WHERE deployment_id = ? AND step = ?",
                (deployment, step),
            )
            .await
            .map_err(dberr)?;
        match row {
            Some((r, by, _)) if r == "success" => {
                info!("{step} for deployment {deployment} already ran on node {by}; skipping");
                return Ok(format!("{step} ran once, on node {by}"));
            }
            Some((r, by, msg)) if r == "failed" => {
                return Err(SchemaError::FailedElsewhere {
                    step: step.into(),
                    deployment: deployment.into(),
                    node: by,
                    message: msg.unwrap_or_default(),
                });
            }
            Some((_, by, _)) => warn!("{step} for deployment {deployment} was interrupted on node {by}; running it again"),
            None => {}
        }
        conn.exec_drop(
            "REPLACE INTO bgagent_migrations (deployment_id, step, node, started_at, result) VALUES (?, ?, ?, NOW(3), 'running')",
            (deployment, step, node),
        )
        .await
        .map_err(dberr)?;
        info!("running {step} for deployment {deployment} on this node ({node}) for the fleet");
        let mut env = BTreeMap::new();
        env.insert("DEPLOYMENT_ID".to_string(), deployment.to_string());
        env.insert("BGAGENT_NODE".to_string(), node.to_string());
        let outcome = process::run(spec, Some(release), &env).await;
        let (res, msg) = match &outcome {
            Ok(_) => ("success", None),
            Err(e) => ("failed", Some(e.to_string().chars().take(1000).collect::<String>())),
        };
        conn.exec_drop(
            "UPDATE bgagent_migrations SET finished_at = NOW(3), result = ?, message = ? WHERE deployment_id = ? AND step = ?",
            (res, msg.clone(), deployment, step),
        )
        .await
        .map_err(dberr)?;
        match outcome {
            Ok(_) => Ok(format!("{step} ran once, on this node ({node})")),
            Err(e) => Err(SchemaError::Step { step: step.into(), message: e.to_string() }),
        }
    }
    .await;
    let _: Result<Option<i64>, _> = conn
        .exec_first("SELECT RELEASE_LOCK(?)", (lock_name,))
        .await;
    let _ = conn.disconnect().await;
    result
}
