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

use crate::dbschema::{Class, Finding};
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
    /// What a breaking schema change (see [`crate::dbschema`]) gets under policy upgrade:
    /// `refuse` (default) or `maintenance`.
    pub breaking: Breaking,
    /// A file in the release (relative to its root) in which the release declares its own
    /// schema change class: its first word is `additive`, `breaking` or `none`. The
    /// declaration decides; bgagent reports when its own analysis disagrees.
    pub class_file: Option<PathBuf>,
    /// With `breaking: maintenance`: how long the node that runs setup:upgrade waits for
    /// every node to turn maintenance on.
    #[serde(with = "crate::config::duration")]
    pub maintenance_wait: Duration,
    /// With `breaking: maintenance`: the window closes by itself after this long.
    #[serde(with = "crate::config::duration")]
    pub maintenance_ttl: Duration,
}

/// What a breaking schema change gets.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Breaking {
    /// Refused before setup:upgrade: the live release keeps serving, nothing changed.
    #[default]
    Refuse,
    /// Magento's maintenance flag on every node, from right before setup:upgrade until each
    /// node has switched to the new release.
    Maintenance,
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
            breaking: Breaking::Refuse,
            class_file: None,
            maintenance_wait: Duration::from_secs(30),
            maintenance_ttl: Duration::from_secs(3600),
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
    #[error(
        "release {release} is refused before anything runs: its rendered app/etc/env.php {state}. With schema.policy: upgrade, setup:upgrade moves the shared database forward while the live release still serves, and Magento's DbStatusValidator and ConfigChangeDetector then fail every request of the live release (\"Please update your modules\") unless env.php sets deployment/blue_green/enabled (Magento 2.4.4+). Add 'deployment' => ['blue_green' => ['enabled' => true]] to the env.php template"
    )]
    BlueGreenOff { release: PathBuf, state: String },
    #[error("failed to load {path} with `{php}` to read deployment/blue_green/enabled: {message}")]
    EnvPhp {
        path: PathBuf,
        php: String,
        message: String,
    },
    #[error(
        "release {release} is refused: its schema change is breaking for the release serving now ({live}){declared}:\n  {findings}\nOld code keeps serving while setup:upgrade runs, so these would fail its requests. Make the change in two deployments (first add, later remove what old code used), declare the release's class in schema.class_file if old code does not use these, or set schema.breaking: maintenance to take a maintenance window on every node"
    )]
    Breaking {
        release: PathBuf,
        live: String,
        declared: String,
        findings: String,
    },
    #[error("schema analysis: {0}")]
    Analysis(String),
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
    /// The fleet's Redis for a maintenance window (`schema.breaking: maintenance`), when
    /// `cache.redis` is set.
    pub maintenance: Option<&'a crate::maintenance::Coordinator>,
}

/// The releases the schema steps look at: the new one and the one this node serves now.
pub struct Releases<'a> {
    pub kind: crate::config::AppKind,
    pub new: &'a crate::appdir::ReleaseDir,
    /// The live release (id, handle), when this node serves one.
    pub live: Option<(&'a str, &'a crate::appdir::ReleaseDir)>,
}

/// What `deployment/blue_green/enabled` is in a release's rendered env.php.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlueGreen {
    On,
    /// Set to a value PHP reads as false.
    Off,
    Unset,
    /// The release has no app/etc/env.php.
    NoEnvPhp,
}

impl BlueGreen {
    /// The end of "its rendered app/etc/env.php ...".
    fn says(self) -> &'static str {
        match self {
            BlueGreen::On => "sets deployment/blue_green/enabled",
            BlueGreen::Off => "sets deployment/blue_green/enabled to a value PHP reads as false",
            BlueGreen::Unset => "does not set deployment/blue_green/enabled",
            BlueGreen::NoEnvPhp => "is missing (no template renders it)",
        }
    }
}

/// The schema gate's account of a release, kept with the deployment and shown in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SchemaReport {
    /// deployment/blue_green/enabled in the new release's env.php (absent: not checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blue_green: Option<BlueGreen>,
    /// The live release the new declaration was compared with (null: nothing to compare,
    /// this node serves no release yet; the analysis was not run without magento_gate).
    pub compared_with: Option<String>,
    /// bgagent's own class of the change (see [`crate::dbschema`]).
    pub analysed: Option<Class>,
    /// The class the release declares in schema.class_file, if it does.
    pub declared: Option<Class>,
    /// The class the policy went by: the declared one, else the analysed one.
    pub class: Option<Class>,
    pub findings: Vec<Finding>,
    /// What the gate did, in order: checks that said a step is needed, steps run or skipped.
    pub outcome: Vec<String>,
}

const ENV_PHP: &str = "app/etc/env.php";

/// Loads env.php as PHP does and prints only the flag's state, never a value.
const READ_FLAG: &str = r#"$e = (static function ($f) { return include $f; })($argv[1]);
$v = is_array($e) ? ($e['deployment']['blue_green']['enabled'] ?? null) : null;
echo "\nBGAGENT_BLUE_GREEN=", !is_array($e) ? 'notarray' : ($v === null ? 'unset' : ($v ? 'on' : 'off')), "\n";"#;

/// Reads deployment/blue_green/enabled from the release's rendered env.php by loading it
/// with php (the file is opened through the release handle, never through a link, and php
/// reads that very file through /proc/<pid>/fd). Its output is never shown: env.php holds
/// secrets, and a PHP error may quote them.
async fn blue_green(
    php: &str,
    release: &crate::appdir::ReleaseDir,
    timeout: Duration,
) -> Result<BlueGreen, SchemaError> {
    use std::os::fd::AsRawFd;
    let path = release.path().join(ENV_PHP);
    let err = |message: String| SchemaError::EnvPhp {
        path: path.clone(),
        php: php.to_string(),
        message,
    };
    let fd = match crate::appdir::open_file_beneath(release.fd(), Path::new(ENV_PHP)) {
        Ok(None) => return Ok(BlueGreen::NoEnvPhp),
        Ok(Some(fd)) => fd,
        Err(e) => return Err(err(e.to_string())),
    };
    let via = format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd());
    let argv: Vec<std::ffi::OsString> = [
        php,
        "-d",
        "display_errors=0",
        "-d",
        "log_errors=0",
        "-r",
        READ_FLAG,
        "--",
        &via,
    ]
    .iter()
    .map(Into::into)
    .collect();
    let ran = tokio::task::spawn_blocking(move || {
        let r = process::run_private(&argv, timeout);
        drop(fd);
        r
    })
    .await
    .map_err(|e| err(format!("the check task failed: {e}")))?
    .map_err(|e| err(e.to_string()))?;
    let state = ran
        .output
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("BGAGENT_BLUE_GREEN="));
    match state {
        Some("on") => Ok(BlueGreen::On),
        Some("off") => Ok(BlueGreen::Off),
        Some("unset") => Ok(BlueGreen::Unset),
        Some(_) => Err(err(
            "it does not return an array (Magento's env.php is `<?php return [...];`)".into(),
        )),
        None => Err(err(format!(
            "php could not load it (exit {}; its output is not shown, it may quote a secret): run `php -l {}`",
            ran.status.code().unwrap_or(-1),
            path.display()
        ))),
    }
}

/// Compares the new release's declarative schema with the live one's; fills the report.
fn analyse(
    cfg: &SchemaConfig,
    rel: &Releases<'_>,
    rep: &mut SchemaReport,
) -> Result<(), SchemaError> {
    let read = |d: &crate::appdir::ReleaseDir| {
        crate::dbschema::read_release(d.fd(), d.path())
            .map_err(|e| SchemaError::Analysis(e.to_string()))
    };
    let new = read(rel.new)?;
    let (analysed, findings) = match rel.live {
        Some((id, live)) => {
            let old = read(live)?;
            rep.compared_with = Some(id.to_string());
            let f = crate::dbschema::classify(&old, &new);
            (crate::dbschema::overall(&f), f)
        }
        None => (Class::None, Vec::new()),
    };
    let declared = match &cfg.class_file {
        None => None,
        Some(rel_path) => {
            let shown = rel.new.path().join(rel_path);
            match crate::appdir::read_beneath(rel.new.fd(), rel_path, 4096) {
                Ok(None) => {
                    warn!(
                        "schema.class_file {} is not in the release: going by bgagent's own analysis",
                        shown.display()
                    );
                    None
                }
                Ok(Some(b)) => {
                    let text = String::from_utf8_lossy(&b);
                    let word = text
                        .lines()
                        .map(str::trim)
                        .find(|l| !l.is_empty() && !l.starts_with('#'))
                        .and_then(|l| l.split_whitespace().next())
                        .unwrap_or("");
                    Some(word.parse::<Class>().map_err(|e| {
                        SchemaError::Analysis(format!(
                            "{} (schema.class_file): {e}",
                            shown.display()
                        ))
                    })?)
                }
                Err(e) => {
                    return Err(SchemaError::Analysis(format!(
                        "{} (schema.class_file): {e}",
                        shown.display()
                    )));
                }
            }
        }
    };
    rep.analysed = Some(analysed);
    rep.declared = declared;
    rep.class = Some(declared.unwrap_or(analysed));
    rep.findings = findings;
    Ok(())
}

/// Everything schema-related for a new release, in AfterInstall (after env.php is rendered).
/// `report` holds the gate's account as far as it got, also when it refuses the release.
pub async fn prepare(
    cfg: &SchemaConfig,
    rel: &Releases<'_>,
    at: &Attempting<'_>,
    password_from_params: impl Fn(&str) -> Option<String>,
    report: &mut Option<SchemaReport>,
) -> Result<Vec<String>, SchemaError> {
    let release = rel.new.path();
    let mut done = Vec::new();
    let magento = rel.kind == crate::config::AppKind::Magento;
    // First of all, before any command runs against the shared database.
    if magento && (cfg.magento_gate || cfg.policy == Policy::Upgrade) {
        let bg = blue_green(
            &cfg.php,
            rel.new,
            cfg.connect_timeout.max(Duration::from_secs(30)),
        )
        .await?;
        report.get_or_insert_default().blue_green = Some(bg);
        if cfg.policy == Policy::Upgrade && bg != BlueGreen::On {
            return Err(SchemaError::BlueGreenOff {
                release: release.to_path_buf(),
                state: bg.says().into(),
            });
        }
        done.push(format!("app/etc/env.php {}", bg.says()));
    }
    if magento && cfg.magento_gate {
        let rep = report.get_or_insert_default();
        analyse(cfg, rel, rep)?;
        let class = rep.class.unwrap_or(Class::None);
        match &rep.compared_with {
            Some(live) => info!(
                "schema change from release {live}: {} ({} finding(s)){}",
                rep.analysed.unwrap_or(Class::None),
                rep.findings.len(),
                rep.declared
                    .map(|d| format!("; the release declares it {d}"))
                    .unwrap_or_default()
            ),
            None => {
                info!("schema change: nothing to compare with (this node serves no release yet)")
            }
        }
        for f in &rep.findings {
            info!("  {f}");
        }
        if let (Some(d), Some(a)) = (rep.declared, rep.analysed)
            && d != a
            && rep.compared_with.is_some()
        {
            warn!(
                "the release declares its schema change {d} ({}), bgagent's analysis says {a}: going by the declaration",
                cfg.class_file
                    .as_deref()
                    .unwrap_or(Path::new("?"))
                    .display()
            );
        }
        done.push(format!("schema change class: {class}"));
    }
    let mut db_needed = false;
    let mut config_needed = false;
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
                    Policy::Upgrade => {
                        report
                            .get_or_insert_default()
                            .outcome
                            .push(format!("{check}: {what}"));
                        if check == "setup:db:status" {
                            db_needed = true;
                        } else {
                            config_needed = true;
                        }
                    }
                }
            }
        }
        done.push("magento gate passed".to_string());
    }
    let class = report.as_ref().and_then(|r| r.class).unwrap_or(Class::None);
    if db_needed && class == Class::Breaking && cfg.breaking == Breaking::Refuse {
        let rep = report.get_or_insert_default();
        rep.outcome
            .push("refused: breaking schema change (schema.breaking: refuse)".into());
        let findings: Vec<String> = rep
            .findings
            .iter()
            .filter(|f| f.class == Class::Breaking)
            .map(|f| f.to_string())
            .collect();
        return Err(SchemaError::Breaking {
            release: release.to_path_buf(),
            live: rep.compared_with.clone().unwrap_or_default(),
            declared: match (rep.declared, &cfg.class_file) {
                (Some(d), Some(f)) => format!("; it declares itself {d} in {}", f.display()),
                _ => String::new(),
            },
            findings: if findings.is_empty() {
                "(declared breaking by the release)".into()
            } else {
                findings.join("\n  ")
            },
        });
    }
    // A breaking change with a maintenance window: every node stops serving old code right
    // before setup:upgrade, and each comes back once it has switched.
    let window = if db_needed && class == Class::Breaking && cfg.breaking == Breaking::Maintenance {
        let Some(co) = at.maintenance else {
            return Err(SchemaError::Config(
                "schema.breaking: maintenance needs cache.redis: the fleet's Redis is how every node learns to turn Magento's maintenance flag on".into(),
            ));
        };
        report
            .get_or_insert_default()
            .outcome
            .push("breaking schema change: maintenance window on every node (schema.breaking: maintenance)".into());
        Some(co)
    } else {
        None
    };
    let mut steps: Vec<(&str, CommandSpec, Option<CommandSpec>)> = Vec::new();
    let magento_cmd = |args: &[&str]| {
        let mut argv = vec![cfg.php.as_str(), "bin/magento"];
        argv.extend_from_slice(args);
        argv.push("--no-ansi");
        let mut s = CommandSpec::new(&argv);
        s.timeout = cfg.command_timeout;
        s
    };
    if db_needed {
        steps.push((
            "setup:upgrade",
            magento_cmd(&["setup:upgrade", "--keep-generated"]),
            None,
        ));
    }
    if config_needed {
        // setup:upgrade imports changed config too: the node that holds the lock asks
        // app:config:status again and imports only when it still says so.
        steps.push((
            "app:config:import",
            magento_cmd(&["app:config:import"]),
            Some(magento_cmd(&["app:config:status"])),
        ));
    }
    if let Some(m) = &cfg.migration {
        steps.push(("migration", m.command(cfg.command_timeout), None));
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
    for (step, spec, precheck) in steps {
        let r = run_once(
            db,
            password.clone(),
            (cfg.connect_timeout, cfg.lock_timeout),
            at,
            step,
            &spec,
            precheck.as_ref(),
            if step == "setup:upgrade" {
                window
            } else {
                None
            },
            release,
        )
        .await;
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                report
                    .get_or_insert_default()
                    .outcome
                    .push(format!("{step} failed"));
                return Err(e);
            }
        };
        if magento && cfg.magento_gate {
            report.get_or_insert_default().outcome.push(r.clone());
        }
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
    precheck: Option<&CommandSpec>,
    window: Option<&crate::maintenance::Coordinator>,
    release: &Path,
) -> Result<String, SchemaError> {
    let (app, deployment, node) = (who.app, who.deployment, who.node);
    let at = format!("{}@{}:{}/{}", db.user, db.host, db.port, db.database);
    let dberr = |e: mysql_async::Error| SchemaError::Db {
        at: at.clone(),
        message: e.to_string(),
    };
    // TCP, always: the command inherits this node's end of the lock connection, found by
    // its ports; mysql_async would otherwise move a connection to a local server onto its
    // unix socket (prefer_socket), which has none, and the lock would die with the daemon.
    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname(db.host.clone())
        .tcp_port(db.port)
        .prefer_socket(false)
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
        // A step that may have become unnecessary meanwhile (app:config:import after another
        // node's setup:upgrade imported the config) asks its check first, under the lock.
        if let Some(check) = precheck {
            match process::run(check, Some(release), &BTreeMap::new()).await {
                Ok(_) => {
                    let why = format!("not needed: `{}` says nothing to do", check.argv[1..].join(" "));
                    conn.exec_drop(
                        "INSERT INTO bgagent_migrations (deployment_id, step, attempt, node, command, started_at, finished_at, result, message) \
                         VALUES (?, ?, ?, ?, ?, NOW(3), NOW(3), 'success', ?)",
                        (deployment, step, attempt, node, &command, &why),
                    )
                    .await
                    .map_err(dberr)?;
                    info!("{step} for deployment {deployment}: {why}");
                    return Ok(format!("{step} {why} (checked on this node, {node})"));
                }
                Err(process::ProcessError::Failed { code: 2, .. }) => {}
                Err(e) => {
                    return Err(SchemaError::Gate {
                        check: check.argv[1..].join(" "),
                        message: e.to_string(),
                    });
                }
            }
        }
        if let Some(co) = window {
            co.open(deployment).await.map_err(|message| SchemaError::Step {
                step: step.into(),
                message,
            })?;
        }
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
