//! Command-line interface: definitions, and the commands' plumbing.
//!
//! Parsing (clap) touches nothing; each command then resolves what it needs (config, socket,
//! state) and maps its result to a documented exit code ([`exit`]).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

use crate::client::{self, ClientError};
use crate::config;
use crate::lifecycle::Event;
use crate::protocol::{self, Outcome, Request};

/// Exit codes, chosen on purpose: scripts and CodeDeploy act on them.
pub mod exit {
    /// The request succeeded (or the event had already succeeded in this deployment).
    pub const OK: i32 = 0;
    /// The event, deployment or rollback ran and failed.
    pub const FAILED: i32 = 1;
    /// Bad command line, including an unknown lifecycle event.
    pub const USAGE: i32 = 2;
    /// `hook` was run without CodeDeploy's DEPLOYMENT_ID in its environment.
    pub const NO_DEPLOYMENT_ID: i32 = 3;
    /// The daemon is not reachable on its socket.
    pub const UNREACHABLE: i32 = 4;
    /// The connection to the daemon broke before a result came.
    pub const CONNECTION_LOST: i32 = 5;
    /// The daemon refused the event (out of order, prerequisite missing, deployment failed).
    pub const REFUSED: i32 = 6;
    /// The config file is missing or invalid.
    pub const CONFIG: i32 = 7;
}

const AFTER_HELP: &str = "\
Exit codes:
  0  success (also: the event had already succeeded in this deployment)
  1  the event, deployment or rollback failed
  2  usage error, including an unknown lifecycle event
  3  `hook` without DEPLOYMENT_ID in the environment (not run by CodeDeploy)
  4  the daemon is not reachable on its socket
  5  the connection to the daemon broke before a result came
  6  the event was refused (out of order, prerequisite missing, deployment failed)
  7  the config file is missing or invalid

Config: --config, else $BGAGENT_CONFIG, else /etc/bgagent/bgagent.yaml.
Logs: BGAGENT_LOG sets the filter (default: info,aws=off; the AWS SDK's own events are off).";

#[derive(Debug, Parser)]
#[command(
    name = "bgagent",
    version,
    about = "Zero-downtime blue/green and in-place deployments of Magento 2 and PHP apps with AWS CodeDeploy",
    long_about = "bgagent replaces appspec.yml's bash hook scripts with one native agent. CodeDeploy runs \
`bgagent hook <LifecycleEvent>` for each lifecycle event; the bgagent daemon (a systemd service) builds the \
release directory, renders app/etc/env.php from SSM Parameter Store, applies ownership and modes, switches the \
`current` release atomically, reloads nginx and php-fpm gracefully, warms up and health-checks the application, \
and reports readiness to the load balancer.",
    after_help = AFTER_HELP
)]
pub struct Cli {
    /// Config file (YAML). Relative paths inside it resolve against its directory.
    #[arg(long, global = true, env = "BGAGENT_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (the systemd service): control socket, deployments, readiness.
    Daemon,
    /// Run one CodeDeploy lifecycle event through the daemon (what appspec.yml calls).
    ///
    /// Passes CodeDeploy's environment (DEPLOYMENT_ID, DEPLOYMENT_GROUP_ID,
    /// DEPLOYMENT_GROUP_NAME, APPLICATION_NAME, BUNDLE_*) to the daemon, prints the daemon's
    /// log lines for the event as they happen, and ends with a short summary that fits in the
    /// 2048 characters CodeDeploy shows.
    #[command(after_help = AFTER_HELP)]
    Hook {
        /// The lifecycle event: ApplicationStop, BeforeInstall, AfterInstall, ApplicationStart,
        /// ValidateService, BeforeBlockTraffic, AfterBlockTraffic, BeforeAllowTraffic or
        /// AfterAllowTraffic. Defaults to $LIFECYCLE_EVENT, which CodeDeploy sets.
        event: Option<String>,
    },
    /// Deploy an artifact on this node without CodeDeploy: the whole in-place lifecycle.
    ///
    /// ARTIFACT is a directory, .tar, .tar.gz or .zip. Goes through the daemon when it runs,
    /// otherwise runs in this process (holding the state lock).
    #[command(after_help = AFTER_HELP)]
    Deploy {
        /// Directory, .tar, .tar.gz/.tgz or .zip holding the release.
        artifact: PathBuf,
    },
    /// Show what is deployed, how each event of the last deployment went, and readiness.
    Status {
        /// Print the status as JSON (schema bgagent.status/v1, see docs/status.md).
        #[arg(long)]
        json: bool,
    },
    /// Switch back to the last release that passed ValidateService (the rollback target
    /// `bgagent status` names), and record it.
    ///
    /// Safe to repeat: the release being left is sent along (the current one, or --from), so
    /// a repeat after a lost connection answers "already rolled back".
    #[command(after_help = AFTER_HELP)]
    Rollback {
        /// The release this rollback leaves (default: the current one). If another rollback
        /// already left it, the answer is "already rolled back" and nothing switches.
        #[arg(long, value_name = "RELEASE")]
        from: Option<String>,
    },
    /// List the releases on disk; `*` marks current, `-` previous.
    Releases {
        #[arg(long)]
        json: bool,
    },
    /// Config file commands.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Magento's cron, run so that a deployment can pause it for the fleet (cron.pause).
    #[command(subcommand)]
    Cron(CronCommand),
    /// The fleet's maintenance window (schema.breaking: maintenance), through cache.redis.
    #[command(subcommand)]
    Maintenance(MaintenanceCommand),
    /// Print the completion script for a shell (the packages install them).
    ///
    /// bash: `bgagent completions bash > /usr/share/bash-completion/completions/bgagent`;
    /// zsh: `_bgagent` in a directory of $fpath; fish: `~/.config/fish/completions/bgagent.fish`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the bgagent(1) man page (roff; the packages install it).
    Man,
    /// Render the configured templates for the current release, without writing them.
    ///
    /// --dry-run prints every rendered file with SecureString values redacted.
    /// --check compares the parameter versions the current release was rendered from with
    /// the source now, and exits 1 naming the parameters that changed (drift).
    Render {
        /// Print the rendered files, secrets redacted.
        #[arg(long, conflicts_with = "check")]
        dry_run: bool,
        /// Exit 1 when parameters changed since the current release was rendered.
        #[arg(long)]
        check: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the config: every error with file, line and column; unknown keys warned.
    Check,
}

#[derive(Debug, Subcommand)]
pub enum CronCommand {
    /// Run cron.command (e.g. `php bin/magento cron:run`) in the current release, as its
    /// user, unless a deployment has paused cron; what /etc/cron.d runs every minute, as root:
    /// `* * * * * root /usr/bin/bgagent cron run`. Exit 0 when run or skipped, 1 when the
    /// job failed or the pause could not be read (the job is then not run).
    Run,
}

#[derive(Debug, Subcommand)]
pub enum MaintenanceCommand {
    /// Show whether a maintenance window is open, for which deployment, and how long until
    /// its TTL (schema.maintenance_ttl) closes it. Exit 0 either way.
    Status {
        /// Print JSON: {"open": bool, "deployment": ..., "closes_in_s": ...}.
        #[arg(long)]
        json: bool,
    },
    /// Close the open window now, for the whole fleet: every node's daemon turns Magento's
    /// maintenance flag off within a second. A window stays open after a failed
    /// setup:upgrade on purpose (old code may not run on a half-upgraded database): close it
    /// when the database is fit for the release that serves, or retry the deployment. Never
    /// while setup:upgrade still runs (`bgagent status` on the node running it shows its
    /// AfterInstall running): old code would serve on a database being changed.
    #[command(after_help = AFTER_HELP)]
    Close {
        /// Close it only if it is this deployment's window (safe against closing a newer
        /// deployment's window by mistake).
        #[arg(long, value_name = "DEPLOYMENT_ID")]
        deployment: Option<String>,
    },
}

/// The config path in force.
pub fn config_path(cli: &Cli) -> PathBuf {
    cli.config
        .clone()
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH))
}

/// Loads the config, printing its warnings to stderr; exits with CONFIG on error.
pub fn load_config(path: &Path) -> Result<config::Config, i32> {
    match config::load(path) {
        Ok(l) => {
            for w in &l.warnings {
                eprintln!("warning: {w}");
            }
            Ok(l.config)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Err(exit::CONFIG)
        }
    }
}

pub fn exit_code_of(outcome: Outcome) -> i32 {
    match outcome {
        Outcome::Succeeded | Outcome::AlreadyDone => exit::OK,
        Outcome::Failed => exit::FAILED,
        Outcome::Refused => exit::REFUSED,
    }
}

/// `bgagent completions SHELL`: the completion script on stdout.
pub fn completions(shell: clap_complete::Shell) -> i32 {
    use clap::CommandFactory;
    clap_complete::generate(
        shell,
        &mut Cli::command(),
        "bgagent",
        &mut std::io::stdout(),
    );
    exit::OK
}

/// `bgagent man`: the man page on stdout.
pub fn man() -> i32 {
    use clap::CommandFactory;
    match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("error: failed to write the man page: {e}");
            exit::FAILED
        }
    }
}

/// `bgagent hook`.
pub fn hook(cli: &Cli, event_arg: Option<&str>) -> i32 {
    let env: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| protocol::is_forwarded(k))
        .collect();
    let event_name = match event_arg
        .map(String::from)
        .or_else(|| env.get("LIFECYCLE_EVENT").cloned())
    {
        Some(e) => e,
        None => {
            eprintln!(
                "error: no lifecycle event given: pass it as `bgagent hook <Event>` or set LIFECYCLE_EVENT (CodeDeploy does)"
            );
            return exit::USAGE;
        }
    };
    if let Err(e) = Event::parse(&event_name) {
        eprintln!("error: {e}");
        return exit::USAGE;
    }
    let Some(deployment) = env.get("DEPLOYMENT_ID").filter(|v| !v.is_empty()).cloned() else {
        eprintln!(
            "error: DEPLOYMENT_ID is not set: `bgagent hook` is run by the CodeDeploy agent from appspec.yml; to deploy by hand use `bgagent deploy ARTIFACT`"
        );
        return exit::NO_DEPLOYMENT_ID;
    };
    // A malformed id is a usage error, said before anything is sent.
    for key in [
        "DEPLOYMENT_ID",
        "DEPLOYMENT_GROUP_ID",
        "APPLICATION_NAME",
        "DEPLOYMENT_GROUP_NAME",
    ] {
        let check = if key.ends_with("_ID") {
            crate::events::check_id
        } else {
            crate::events::check_name
        };
        if let Some(v) = env.get(key).filter(|v| !v.is_empty())
            && let Err(e) = check(key, v)
        {
            println!(
                "bgagent: {event_name} FAILED (exit {})\nerror: {e}",
                exit::USAGE
            );
            return exit::USAGE;
        }
    }
    // Only the socket path, read leniently: the daemon runs on the config it loaded and judges
    // the event; a config file in the middle of an edit must not fail every hook.
    let (socket, why) = config::socket_path_lenient(&config_path(cli));
    if let Some(why) = why {
        eprintln!("warning: {why}");
    }
    let stdout = std::io::stdout();
    let req = Request::Hook {
        event: event_name.clone(),
        env,
    };
    on_termination_ask_to_cancel(&event_name, &deployment);
    let res = client::request(&socket, &req, |_, line| {
        let mut out = stdout.lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    });
    match res {
        Ok(f) => {
            let code = exit_code_of(f.outcome);
            print!(
                "{}",
                client::summary_block(&event_name, &deployment, &f, code)
            );
            code
        }
        Err(e) => {
            let code = match e {
                ClientError::Unreachable { .. } | ClientError::PermissionDenied { .. } => {
                    exit::UNREACHABLE
                }
                ClientError::ConnectionLost(_) => exit::CONNECTION_LOST,
            };
            println!("bgagent: {event_name} FAILED for deployment {deployment} (exit {code})\n{e}");
            code
        }
    }
}

/// CodeDeploy ends a hook at its timeout with SIGTERM to its process group (SIGHUP when its
/// agent goes away). The hook then says so in one line and exits; its connection closing is
/// the daemon's signal to cancel the event at its next safe point and record it failed.
fn on_termination_ask_to_cancel(event: &str, deployment: &str) {
    // SAFETY: plain libc calls on a local signal set, made before any other thread exists;
    // the signals are then taken by the thread below with sigwait, never by a handler.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return;
        }
        let (event, deployment) = (event.to_string(), deployment.to_string());
        std::thread::spawn(move || {
            let mut sig: libc::c_int = 0;
            if libc::sigwait(&set, &mut sig) == 0 {
                let name = if sig == libc::SIGHUP {
                    "SIGHUP"
                } else {
                    "SIGTERM"
                };
                println!(
                    "bgagent: {event} for deployment {deployment}: the hook got {name} before the result (CodeDeploy's timeout?); the daemon cancels the event and records it failed: see `bgagent status`, retry the event"
                );
                std::process::exit(exit::FAILED);
            }
        });
    }
}
