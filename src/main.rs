use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use bgagent::cli::{self, Cli, Command, ConfigCommand, CronCommand, MaintenanceCommand, exit};
use bgagent::client;
use bgagent::events::{Engine, Outcome};
use bgagent::protocol::Request;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit::USAGE as u8 } else { 0 });
        }
    };
    if !matches!(cli.command, Command::Daemon) {
        // `bgagent status | head` must end quietly like any Unix tool, not panic on EPIPE.
        // (The daemon keeps Rust's default: a client that hangs up must not kill it.)
        // SAFETY: called before any thread is started.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let code = run(&cli);
    ExitCode::from(code as u8)
}

/// `BGAGENT_LOG`, else bgagent's own events at info and the AWS SDK's not at all: the SDK
/// logs raw responses in its warnings (an IMDS token, a response body), and its failures
/// reach the operator through bgagent's own error messages anyway.
fn filter() -> EnvFilter {
    EnvFilter::try_from_env("BGAGENT_LOG").unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER))
}

const DEFAULT_FILTER: &str = "info,aws=off";

/// Logging for the daemon: journald when running under systemd, stderr otherwise; and the
/// per-request stream to clients in both cases.
fn init_daemon_logging() {
    let journald = std::env::var_os("JOURNAL_STREAM")
        .is_some()
        .then(|| tracing_journald::layer().ok())
        .flatten();
    let registry = tracing_subscriber::registry()
        .with(filter())
        .with(bgagent::logstream::StreamLayer);
    // Progress reports go to the client that asked for the work, never into the journal.
    let not_progress = || filter_fn(|m| !bgagent::progress::is_progress(m));
    match journald {
        Some(j) => registry
            // Fields as operators query them: DEPLOYMENT_ID=, not tracing-journald's F_ prefix.
            .with(
                j.with_syslog_identifier("bgagent".into())
                    .with_field_prefix(None)
                    .with_filter(not_progress()),
            )
            .init(),
        None => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_target(false)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_filter(not_progress()),
            )
            .init(),
    }
}

/// Logging for commands that do the work in this process: plain lines on stdout.
/// On a terminal, intake, health waits and drain show a progress bar on stderr.
fn init_cli_logging() {
    let term = bgagent::progress::Local::for_this_process();
    tracing_subscriber::registry()
        .with(filter())
        .with(term.clone())
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(term)
                .with_target(false)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
                .with_timer(tracing_subscriber::fmt::time::uptime())
                .with_filter(filter_fn(|m| !bgagent::progress::is_progress(m))),
        )
        .init();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| {
            eprintln!("error: failed to start the async runtime: {e}");
            std::process::exit(exit::FAILED)
        })
}

fn run(cli: &Cli) -> i32 {
    let path = cli::config_path(cli);
    match &cli.command {
        Command::Hook { event } => cli::hook(cli, event.as_deref()),
        Command::Completions { shell } => cli::completions(*shell),
        Command::Man => cli::man(),
        Command::Config(ConfigCommand::Check) => match bgagent::config::load(&path) {
            Ok(l) => {
                for w in &l.warnings {
                    eprintln!("warning: {w}");
                }
                // Then what only this host can tell: users and groups exist.
                let host = l.config.check_host();
                if !host.is_empty() {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    eprintln!("error: invalid config on this host:");
                    for (key, msg) in host {
                        let at = bgagent::config::locate_key(&text, &key)
                            .map(|(l, c)| format!(":{l}:{c}"))
                            .unwrap_or_default();
                        eprintln!("  {}{at}: `{key}`: {msg}", path.display());
                    }
                    return exit::CONFIG;
                }
                let note = if l.warnings.is_empty() {
                    ""
                } else {
                    " (with warnings)"
                };
                println!("{}: OK{note}", path.display());
                exit::OK
            }
            Err(e) => {
                eprintln!("error: {e}");
                exit::CONFIG
            }
        },
        Command::Daemon => {
            let cfg = match cli::load_config(&path) {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_daemon_logging();
            match runtime().block_on(bgagent::daemon::run(cfg)) {
                Ok(()) => exit::OK,
                Err(e) => {
                    tracing::error!("{e}");
                    exit::FAILED
                }
            }
        }
        Command::Deploy { artifact } => {
            let artifact = std::path::absolute(artifact).unwrap_or_else(|_| artifact.clone());
            // Opened as this user and passed to the daemon: it reads only what we can.
            let passed = open_artifact(&artifact);
            let a2 = artifact.clone();
            work_with_fd(
                cli,
                Request::Deploy { artifact },
                passed.as_ref().map(std::os::fd::AsFd::as_fd),
                move |engine| Box::pin(async move { engine.deploy_artifact(&a2).await }),
            )
        }
        Command::Rollback { from } => {
            // The release being left goes with the request, so a repeat is harmless.
            let from = from.clone().or_else(|| {
                cli::load_config(&cli::config_path(cli))
                    .ok()
                    .and_then(|c| bgagent::release::Layout::new(&c.app_root).current())
            });
            let f2 = from.clone();
            work(cli, Request::Rollback { from }, move |engine| {
                Box::pin(async move { engine.rollback(f2.as_deref()).await })
            })
        }
        Command::Cron(CronCommand::Run) => {
            let cfg = match cli::load_config(&path) {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_cli_logging();
            match runtime().block_on(bgagent::cron::run_guarded(&cfg)) {
                Ok(bgagent::cron::RunOutcome::Skipped(why)) => {
                    println!("{why}");
                    exit::OK
                }
                Ok(bgagent::cron::RunOutcome::Ran(Ok(m))) => {
                    println!("{m}");
                    exit::OK
                }
                Ok(bgagent::cron::RunOutcome::Ran(Err(e))) => {
                    eprintln!("error: {e}");
                    exit::FAILED
                }
                Err(e @ bgagent::cron::CronError::NoCommand) => {
                    eprintln!("error: {e}");
                    exit::CONFIG
                }
                Err(e) => {
                    eprintln!("error: {e}; the job was not run");
                    exit::FAILED
                }
            }
        }
        Command::Maintenance(m) => {
            let cfg = match cli::load_config(&path) {
                Ok(c) => c,
                Err(code) => return code,
            };
            maintenance(&cfg, m)
        }
        Command::Render { dry_run, check } => render(cli, *dry_run, *check),
        Command::Status { json } => status(cli, *json, false),
        Command::Releases { json } => status(cli, *json, true),
    }
}

/// `bgagent maintenance status|close`: straight to the fleet's Redis (no daemon needed:
/// the window is the fleet's, not this node's).
fn maintenance(cfg: &bgagent::config::Config, cmd: &MaintenanceCommand) -> i32 {
    let app = bgagent::cache::app_name(
        cfg.app.name.as_deref(),
        bgagent::state::read(&cfg.state_dir).ok().as_ref(),
    );
    let Some(co) = bgagent::maintenance::Coordinator::from_config(cfg, app.clone()) else {
        eprintln!(
            "error: cache.redis is not set: a maintenance window goes through the fleet's Redis, and without it there is none"
        );
        return exit::CONFIG;
    };
    let shown = bgagent::text::escape(&app);
    match cmd {
        MaintenanceCommand::Status { json } => match runtime().block_on(co.window()) {
            Ok(w) => {
                if *json {
                    let v = serde_json::json!({
                        "app": app,
                        "open": w.is_some(),
                        "deployment": w.as_ref().map(|(d, _)| d.clone()),
                        "closes_in_s": w.as_ref().and_then(|(_, t)| t.map(|t| t.as_secs())),
                    });
                    println!("{v}");
                } else {
                    match w {
                        None => println!("no maintenance window is open for {shown}"),
                        Some((d, ttl)) => println!(
                            "maintenance window open for {shown}, deployment {}{}; close it with `bgagent maintenance close --deployment {}`",
                            bgagent::text::escape(&d),
                            ttl.map(|t| format!(
                                ", closes by itself in {}",
                                humantime::format_duration(t)
                            ))
                            .unwrap_or_default(),
                            bgagent::text::escape(&d),
                        ),
                    }
                }
                exit::OK
            }
            Err(e) => {
                eprintln!("error: {e}");
                exit::FAILED
            }
        },
        MaintenanceCommand::Close { deployment } => {
            match runtime().block_on(co.close(deployment.as_deref())) {
                Ok(Some(d)) => {
                    println!(
                        "closed the maintenance window of deployment {} for {shown}: every node's daemon turns Magento's maintenance flag off within a second",
                        bgagent::text::escape(&d)
                    );
                    exit::OK
                }
                Ok(None) => {
                    println!("no maintenance window is open for {shown}; nothing to close");
                    exit::OK
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    exit::FAILED
                }
            }
        }
    }
}

type LocalWork<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + 'a>>;

/// The artifact opened for the daemon, if it is a directory or a regular file (anything
/// else is not opened: a device's open may act; the daemon names the problem).
fn open_artifact(path: &std::path::Path) -> Option<std::os::fd::OwnedFd> {
    use rustix::fs::{FileType, Mode, OFlags};
    let st = rustix::fs::stat(path).ok()?;
    if !matches!(
        FileType::from_raw_mode(st.st_mode),
        FileType::Directory | FileType::RegularFile
    ) {
        return None;
    }
    rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()
}

/// Runs `req` through the daemon when it listens, else in this process.
fn work(
    cli: &Cli,
    req: Request,
    local: impl for<'a> FnOnce(&'a mut Engine) -> LocalWork<'a>,
) -> i32 {
    work_with_fd(cli, req, None, local)
}

/// As [`work`], passing `fd` to the daemon with the request.
fn work_with_fd(
    cli: &Cli,
    req: Request,
    fd: Option<std::os::fd::BorrowedFd<'_>>,
    local: impl for<'a> FnOnce(&'a mut Engine) -> LocalWork<'a>,
) -> i32 {
    let cfg = match cli::load_config(&cli::config_path(cli)) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let stdout = std::io::stdout();
    match client::request_with_fd(&cfg.socket.path, &req, fd, |_, line| {
        let mut out = stdout.lock();
        let _ = writeln!(out, "{line}");
    }) {
        Ok(f) => {
            println!("{}", f.summary);
            return cli::exit_code_of(f.outcome);
        }
        Err(e) if e.is_absent() => {}
        Err(e @ client::ClientError::PermissionDenied { .. }) => {
            eprintln!("error: {e}");
            return exit::UNREACHABLE;
        }
        Err(e) => {
            eprintln!("error: {e}");
            if let Request::Rollback { from: Some(from) } = &req {
                eprintln!(
                    "to retry safely: bgagent rollback --from {from} (if the rollback was done, it answers \"already rolled back\")"
                );
            }
            return exit::CONNECTION_LOST;
        }
    }
    init_cli_logging();
    let mut engine = match Engine::open(cfg) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::FAILED;
        }
    };
    let outcome = runtime().block_on(local(&mut engine));
    println!("{}", outcome.summary());
    match outcome {
        Outcome::Succeeded(_) | Outcome::AlreadyDone(_) => exit::OK,
        Outcome::Failed(_) => exit::FAILED,
        Outcome::Refused(_) => exit::REFUSED,
    }
}

fn render(cli: &Cli, dry_run: bool, check: bool) -> i32 {
    let cfg = match cli::load_config(&cli::config_path(cli)) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if !dry_run && !check {
        eprintln!("error: say what to do: --dry-run (print, secrets redacted) or --check (drift)");
        return exit::USAGE;
    }
    let state = match bgagent::state::read(&cfg.state_dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::FAILED;
        }
    };
    let layout = bgagent::release::Layout::new(&cfg.app_root);
    let current = layout.current();
    let record = current.as_ref().and_then(|c| state.releases.get(c));
    let rt = runtime();
    let params = match rt.block_on(bgagent::params::load(&cfg.params, &cfg.base_dir)) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::FAILED;
        }
    };
    if check {
        let Some(rec) = record else {
            eprintln!("error: no current release rendered by bgagent to compare with");
            return exit::FAILED;
        };
        let recorded: std::collections::BTreeMap<String, bgagent::params::ParamVersion> =
            serde_json::from_value(rec.params.clone()).unwrap_or_default();
        let changed = bgagent::params::diff(&recorded, &params.versions());
        if changed.is_empty() {
            println!(
                "no drift: release {} was rendered from the current versions of {} parameter(s)",
                current.as_deref().unwrap_or("-"),
                recorded.len()
            );
            return exit::OK;
        }
        println!(
            "drift: {} parameter(s) changed since release {} was rendered; deploy again to apply them:",
            changed.len(),
            current.as_deref().unwrap_or("-")
        );
        for c in changed {
            println!("  {c}");
        }
        return exit::FAILED;
    }
    let release_id = current.clone().unwrap_or_else(|| "(no release yet)".into());
    let deployment = record.map(|r| r.deployment_id.clone()).unwrap_or_default();
    let app = cfg.app.name.clone().unwrap_or_else(|| "app".into());
    let cache = record
        .map(|r| r.cache.clone())
        .filter(|c| !c.is_null())
        .unwrap_or_else(|| cfg.cache.facts(0, &app));
    let facts = bgagent::events::template_facts(&cfg, &release_id, &deployment, &app, None, &cache);
    match bgagent::render::render_redacted(&cfg.templates, &cfg.base_dir, &params, &facts) {
        Ok(files) => {
            for f in files {
                println!("==> {} (mode {:04o}) <==", f.target.display(), f.mode);
                println!("{}", f.content.expose());
            }
            exit::OK
        }
        Err(e) => {
            eprintln!("error: {e}");
            exit::FAILED
        }
    }
}

fn status(cli: &Cli, json: bool, releases_only: bool) -> i32 {
    let cfg = match cli::load_config(&cli::config_path(cli)) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let from_daemon = match client::request(&cfg.socket.path, &Request::Status, |_, _| {}) {
        Ok(f) => f.data,
        // Not allowed on the socket: say so, rather than a state.json error that hides it.
        Err(e @ client::ClientError::PermissionDenied { .. }) => {
            eprintln!("error: {e}");
            return exit::UNREACHABLE;
        }
        Err(_) => None,
    };
    let doc = match from_daemon {
        Some(d) => d,
        None => match bgagent::state::read(&cfg.state_dir) {
            Ok(state) => bgagent::status::build(
                &state,
                &bgagent::release::Layout::new(&cfg.app_root),
                &cfg.state_dir,
                None,
                false,
                &cfg.processes,
            ),
            Err(e) => {
                eprintln!("error: {e}");
                return exit::FAILED;
            }
        },
    };
    if json {
        let v = if releases_only {
            doc["releases"].clone()
        } else {
            doc
        };
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else if releases_only {
        print!("{}", bgagent::status::render_releases(&doc));
    } else {
        print!("{}", bgagent::status::render_text(&doc));
    }
    exit::OK
}
