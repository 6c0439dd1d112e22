//! Service control: test configs, then reload gracefully, through systemd or configured
//! commands.
//!
//! Two backends: `systemd` (systemctl by argv) and `exec` (configured argv for test, reload,
//! start and stop, plus a pid file: hosts without systemd, and the tests). Before any reload
//! every service's config test runs (`nginx -t`, `php-fpm -t`); if one fails nothing is
//! reloaded and the switch does not happen, so the current release keeps serving. Reloads
//! are graceful (nginx HUP, php-fpm USR2) rather than stop and start. A php-fpm whose
//! `process_control_timeout` is 0 drops requests on reload: that is warned about.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::info;

use crate::process::{self, CommandSpec};

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Systemd,
    Exec,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ServiceKind {
    Nginx,
    PhpFpm,
    #[default]
    Other,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(default)]
pub struct ServicesConfig {
    pub backend: Backend,
    /// In reload order: php-fpm first (new workers), then nginx.
    pub list: Vec<ServiceConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(default)]
pub struct ServiceConfig {
    pub name: String,
    pub kind: ServiceKind,
    /// systemd unit; default: the name.
    pub unit: Option<String>,
    /// Overrides the global backend for this service.
    pub backend: Option<Backend>,
    /// Config test argv; defaults: `nginx -t`, `php-fpm<ver> -t` is not guessed: give it.
    pub test: Option<Vec<String>>,
    /// exec backend: reload argv; an element `{pid}` is replaced by the pid file's pid.
    pub reload: Option<Vec<String>>,
    pub start: Option<Vec<String>>,
    pub stop: Option<Vec<String>>,
    pub pid_file: Option<PathBuf>,
    /// php-fpm's main config, read to check process_control_timeout.
    pub config_file: Option<PathBuf>,
    /// php-fpm: the pool's FastCGI address (its `listen`: `unix:/run/php/php8.2-fpm.sock` or
    /// `127.0.0.1:9000`), for opcache control (`opcache.switch: warm`).
    pub fastcgi: Option<String>,
    /// Stop this service when draining (ApplicationStop/BeforeBlockTraffic).
    pub stop_on_drain: bool,
    /// Reload after a switch. Default: yes for php-fpm and others (new workers, fresh
    /// opcache); no for nginx, which serves `current/pub` through `$realpath_root` and so
    /// follows a switch without a reload. A reload makes old nginx workers close their idle
    /// keep-alive connections, which races clients sending on them: set this to true only
    /// when a release changes nginx's config. Config tests run either way.
    pub reload_on_switch: Option<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(
        "config test of {service} failed, so nothing was reloaded and the current release keeps serving: {source}"
    )]
    TestFailed {
        service: String,
        source: process::ProcessError,
    },
    #[error("controlling {service} failed: {source}")]
    Reload {
        service: String,
        source: process::ProcessError,
    },
    #[error("{service}: {message}")]
    Other { service: String, message: String },
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Test {
        service: String,
        argv: Vec<String>,
    },
    Reload {
        service: String,
        argv: Vec<String>,
        pid_file: Option<PathBuf>,
        /// php-fpm signalled through its pid file: the reload is done when a new master
        /// runs (see [`wait_reloaded`]), not when the signal is sent.
        reexecs: bool,
    },
}

impl ServiceConfig {
    fn backend(&self, global: Backend) -> Backend {
        self.backend.unwrap_or(global)
    }
    fn unit(&self) -> String {
        self.unit.clone().unwrap_or_else(|| self.name.clone())
    }
    fn test_argv(&self) -> Option<Vec<String>> {
        self.test.clone().or_else(|| match self.kind {
            ServiceKind::Nginx => Some(vec!["nginx".into(), "-t".into(), "-q".into()]),
            _ => None,
        })
    }
    fn reloads_on_switch(&self) -> bool {
        self.reload_on_switch
            .unwrap_or(self.kind != ServiceKind::Nginx)
    }
    fn reload_argv(&self, global: Backend) -> Option<Vec<String>> {
        match self.backend(global) {
            Backend::Systemd => Some(vec!["systemctl".into(), "reload".into(), self.unit()]),
            Backend::Exec => self.reload.clone(),
        }
    }
}

impl ServicesConfig {
    /// Cross-field rules, as (dotted key, message) pairs. Pure.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (i, s) in self.list.iter().enumerate() {
            for (verb, argv) in [("reload", &s.reload), ("stop", &s.stop)] {
                if argv.as_ref().is_some_and(|a| uses_pid(a)) && s.pid_file.is_none() {
                    out.push((
                        format!("services.list.{i}.{verb}"),
                        format!(
                            "uses {{pid}} but service `{}` has no pid_file: set pid_file to the file holding its main process id",
                            s.name
                        ),
                    ));
                }
            }
            if s.start.as_ref().is_some_and(|a| uses_pid(a)) {
                out.push((
                    format!("services.list.{i}.start"),
                    format!(
                        "uses {{pid}}, but `start` runs when service `{}` is not running, so there is no pid to put there; remove it",
                        s.name
                    ),
                ));
            }
        }
        out
    }
}

fn uses_pid(argv: &[String]) -> bool {
    argv.iter().any(|a| a.contains("{pid}"))
}

/// The reload plan: every config test first, then the reloads, in the configured order.
/// Pure.
pub fn plan_reload(cfg: &ServicesConfig) -> Vec<Action> {
    let mut out = Vec::new();
    for s in &cfg.list {
        if let Some(argv) = s.test_argv() {
            out.push(Action::Test {
                service: s.name.clone(),
                argv,
            });
        }
    }
    for s in cfg.list.iter().filter(|s| s.reloads_on_switch()) {
        if let Some(argv) = s.reload_argv(cfg.backend) {
            out.push(Action::Reload {
                service: s.name.clone(),
                argv,
                pid_file: s.pid_file.clone(),
                reexecs: s.kind == ServiceKind::PhpFpm,
            });
        }
    }
    out
}

/// The reloads after a switch (or a rollback), without the tests: those ran before the
/// switch.
pub async fn reload_after_switch(cfg: &ServicesConfig) -> Result<(), ServiceError> {
    reload_after_switch_except(cfg, &[]).await
}

/// The same, leaving out the services named in `skip` (php-fpm pools already holding the
/// new release in opcache: see `opcache`).
pub async fn reload_after_switch_except(
    cfg: &ServicesConfig,
    skip: &[String],
) -> Result<(), ServiceError> {
    let plan: Vec<_> = plan_reload(cfg)
        .into_iter()
        .filter(|a| matches!(a, Action::Reload { service, .. } if !skip.contains(service)))
        .collect();
    apply(&plan).await
}

/// Reloads the one service `name` (its configured reload, whatever `reload_on_switch` says).
pub async fn reload_service(cfg: &ServicesConfig, name: &str) -> Result<(), ServiceError> {
    let plan: Vec<_> = cfg
        .list
        .iter()
        .filter(|s| s.name == name)
        .filter_map(|s| {
            Some(Action::Reload {
                service: s.name.clone(),
                argv: s.reload_argv(cfg.backend)?,
                pid_file: s.pid_file.clone(),
                reexecs: s.kind == ServiceKind::PhpFpm,
            })
        })
        .collect();
    apply(&plan).await
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Start,
    Stop,
}

/// The argv that starts or stops `s`: systemctl for the systemd backend, the configured
/// command for exec (None when none is configured). Pure.
pub fn control_argv(cfg: &ServicesConfig, s: &ServiceConfig, verb: Verb) -> Option<Vec<String>> {
    match s.backend(cfg.backend) {
        Backend::Systemd => Some(vec![
            "systemctl".into(),
            match verb {
                Verb::Start => "start",
                Verb::Stop => "stop",
            }
            .into(),
            s.unit(),
        ]),
        Backend::Exec => match verb {
            Verb::Start => s.start.clone(),
            Verb::Stop => s.stop.clone(),
        },
    }
}

/// Starts or stops the services marked `stop_on_drain`; returns their names. With the exec
/// backend a service whose pid file names a live process is not started again (systemctl
/// start is idempotent by itself).
pub async fn drain_control(cfg: &ServicesConfig, verb: Verb) -> Result<Vec<String>, ServiceError> {
    let mut done = Vec::new();
    for s in cfg.list.iter().filter(|s| s.stop_on_drain) {
        let exec = s.backend(cfg.backend) == Backend::Exec;
        if exec && verb == Verb::Start && pid_alive(s.pid_file.as_deref()) {
            continue;
        }
        // ApplicationStop after BeforeBlockTraffic drains a second time: a service the first
        // drain stopped is not stopped again (its stop command would fail on it).
        if exec && verb == Verb::Stop && s.pid_file.is_some() && !pid_alive(s.pid_file.as_deref()) {
            info!("{} is already stopped", s.name);
            continue;
        }
        let Some(argv) = control_argv(cfg, s, verb) else {
            continue;
        };
        let pid = match (&s.pid_file, verb) {
            (Some(p), Verb::Stop) if exec && uses_pid(&argv) => {
                Some(read_pid(p).map_err(|message| ServiceError::Other {
                    service: s.name.clone(),
                    message,
                })?)
            }
            _ => None,
        };
        run_argv(&argv, pid)
            .await
            .map_err(|source| ServiceError::Reload {
                service: s.name.clone(),
                source,
            })?;
        info!(
            "{} {}",
            if verb == Verb::Start {
                "started"
            } else {
                "stopped"
            },
            s.name
        );
        done.push(s.name.clone());
    }
    Ok(done)
}

/// Whether the pid file names a running process (a zombie, exited but not yet reaped, is
/// not running).
fn pid_alive(pid_file: Option<&Path>) -> bool {
    pid_file
        .and_then(|p| read_pid(p).ok())
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .and_then(|stat| {
            // "pid (comm) S ...": the state follows the last ')'.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|s| s != "Z"))
        })
        .unwrap_or(false)
}

/// Runs only the config tests.
pub async fn test_all(cfg: &ServicesConfig) -> Result<(), ServiceError> {
    for a in plan_reload(cfg) {
        if let Action::Test { service, argv } = a {
            run_argv(&argv, None)
                .await
                .map_err(|source| ServiceError::TestFailed { service, source })?;
        }
    }
    Ok(())
}

/// Applies a reload plan: stops at the first failure.
pub async fn apply(plan: &[Action]) -> Result<(), ServiceError> {
    for a in plan {
        match a {
            Action::Test { service, argv } => {
                run_argv(argv, None)
                    .await
                    .map_err(|source| ServiceError::TestFailed {
                        service: service.clone(),
                        source,
                    })?;
            }
            Action::Reload {
                service,
                argv,
                pid_file,
                reexecs,
            } => {
                let pid = match pid_file {
                    Some(p) if uses_pid(argv) => {
                        Some(read_pid(p).map_err(|message| ServiceError::Other {
                            service: service.clone(),
                            message,
                        })?)
                    }
                    _ => None,
                };
                // Taken before the signal: what "the pid file was written again" compares to.
                let before = pid_file
                    .as_deref()
                    .filter(|_| *reexecs)
                    .zip(pid)
                    .map(|(p, pid)| (p, PidFileMark::of(p, pid)));
                run_argv(argv, pid)
                    .await
                    .map_err(|source| ServiceError::Reload {
                        service: service.clone(),
                        source,
                    })?;
                if let Some((p, before)) = before {
                    wait_reloaded(p, &before, RELOAD_WAIT)
                        .await
                        .map_err(|message| ServiceError::Other {
                            service: service.clone(),
                            message,
                        })?;
                }
                info!("reloaded {service}");
            }
        }
    }
    Ok(())
}

async fn run_argv(argv: &[String], pid: Option<u32>) -> Result<(), process::ProcessError> {
    // Config validation guarantees a pid file wherever `{pid}` is used; the pid was read
    // from it by the caller.
    let argv: Vec<String> = argv
        .iter()
        .map(|a| match pid {
            Some(p) => a.replace("{pid}", &p.to_string()),
            None => a.clone(),
        })
        .collect();
    let mut spec = CommandSpec::new(&argv.iter().map(String::as_str).collect::<Vec<_>>());
    spec.timeout = Duration::from_secs(60);
    process::run(&spec, None, &Default::default())
        .await
        .map(|_| ())
}

fn read_pid(p: &Path) -> Result<u32, String> {
    let s = std::fs::read_to_string(p)
        .map_err(|e| format!("cannot read pid file {}: {e}", p.display()))?;
    s.trim()
        .parse()
        .map_err(|_| format!("pid file {} does not hold a pid", p.display()))
}

/// How long a php-fpm reload may take: its old workers get `process_control_timeout` to
/// finish their requests before the master re-execs.
const RELOAD_WAIT: Duration = Duration::from_secs(60);

/// The pid file as it was before a reload's signal.
struct PidFileMark {
    pid: u32,
    written: Option<(std::time::SystemTime, u64)>,
}

impl PidFileMark {
    fn of(p: &Path, pid: u32) -> PidFileMark {
        use std::os::unix::fs::MetadataExt;
        PidFileMark {
            pid,
            written: std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.ino()))),
        }
    }
}

/// Whether `pid` is a process that has not ended (a zombie has ended: nobody may have
/// reaped the old master yet).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.get(s.rfind(')')? + 2..)?;
            rest.chars().next()
        })
        .is_some_and(|state| state != 'Z' && state != 'X')
}

/// php-fpm takes USR2 by re-executing itself in place, once its old workers are done (up to
/// `process_control_timeout`). Daemonized (`daemonize = yes`), the new image forks again: the
/// new master writes its own pid to the pid file and the old pid exits once the new master
/// is ready to handle connections. In the foreground (systemd's Type=notify) the pid stays
/// and the re-executed master writes the pid file again. So the reload is done when the pid
/// file was written since the signal and names a running master, and, when that master is
/// a new process, the old one has ended. The old check returned at once: the pid file still
/// named the old, running master.
async fn wait_reloaded(p: &Path, before: &PidFileMark, within: Duration) -> Result<(), String> {
    let t0 = std::time::Instant::now();
    loop {
        if let Ok(pid) = read_pid(p) {
            let rewritten = pid != before.pid || PidFileMark::of(p, pid).written != before.written;
            if rewritten && running(pid) && (pid == before.pid || !running(before.pid)) {
                return Ok(());
            }
        }
        if t0.elapsed() >= within {
            return Err(format!(
                "php-fpm did not come back from its reload within {} s: the pid file {} still names {} (the master before the reload was {}); see php-fpm's error_log",
                within.as_secs(),
                p.display(),
                read_pid(p).map_or_else(|e| e, |pid| pid.to_string()),
                before.pid
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Warns when php-fpm will drop requests on reload. Returns the warning, if any.
pub fn check_php_fpm_config(s: &ServiceConfig) -> Option<String> {
    if s.kind != ServiceKind::PhpFpm {
        return None;
    }
    let file = s.config_file.as_ref()?;
    let text = std::fs::read_to_string(file).ok()?;
    let value = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with(';'))
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == "process_control_timeout")
        .map(|(_, v)| v.trim().trim_end_matches('s').to_string());
    match value.as_deref() {
        None | Some("0") => Some(format!(
            "{}: process_control_timeout is 0 in {}: a graceful reload then kills busy workers and drops requests; set it to e.g. 10s in the [global] section",
            s.name,
            file.display()
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ServicesConfig {
        ServicesConfig {
            backend: Backend::Systemd,
            list: vec![
                ServiceConfig {
                    name: "php8.2-fpm".into(),
                    kind: ServiceKind::PhpFpm,
                    test: Some(vec!["php-fpm8.2".into(), "-t".into()]),
                    ..Default::default()
                },
                ServiceConfig {
                    name: "nginx".into(),
                    kind: ServiceKind::Nginx,
                    ..Default::default()
                },
            ],
        }
    }

    #[test]
    fn plan_tests_everything_before_reloading_anything() {
        let p = plan_reload(&cfg());
        let kinds: Vec<_> = p.iter().map(|a| matches!(a, Action::Test { .. })).collect();
        // nginx is tested but not reloaded unless asked: it follows the switch by itself
        assert_eq!(kinds, vec![true, true, false]);
        let mut c = cfg();
        c.list[1].reload_on_switch = Some(true);
        assert_eq!(plan_reload(&c).len(), 4);
        assert_eq!(
            p[1],
            Action::Test {
                service: "nginx".into(),
                argv: vec!["nginx".into(), "-t".into(), "-q".into()]
            }
        );
        assert_eq!(
            p[2],
            Action::Reload {
                service: "php8.2-fpm".into(),
                argv: vec!["systemctl".into(), "reload".into(), "php8.2-fpm".into()],
                pid_file: None,
                reexecs: true
            }
        );
    }

    #[test]
    fn control_argv_per_backend() {
        let c = cfg();
        assert_eq!(
            control_argv(&c, &c.list[1], Verb::Stop),
            Some(vec!["systemctl".to_string(), "stop".into(), "nginx".into()])
        );
        let mut exec = c.list[1].clone();
        exec.backend = Some(Backend::Exec);
        assert_eq!(
            control_argv(&c, &exec, Verb::Start),
            None,
            "exec needs a configured command"
        );
        exec.start = Some(vec!["nginx".into()]);
        assert_eq!(
            control_argv(&c, &exec, Verb::Start),
            Some(vec!["nginx".to_string()])
        );
    }

    /// Issue 11 item 8: `{pid}` was substituted only in `reload`; in `stop` it became an
    /// empty argument and in `start` it can have no value, and `config check` said OK.
    #[test]
    fn pid_placeholder_needs_a_pid_file_and_is_refused_in_start() {
        let mut c = cfg();
        c.backend = Backend::Exec;
        c.list[1].stop = Some(vec!["kill".into(), "-QUIT".into(), "{pid}".into()]);
        c.list[1].start = Some(vec!["nginx".into(), "--pid={pid}".into()]);
        let errs = c.validate();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert_eq!(errs[0].0, "services.list.1.stop");
        assert!(errs[0].1.contains("no pid_file"), "{errs:?}");
        assert_eq!(errs[1].0, "services.list.1.start");
        c.list[1].pid_file = Some("/run/nginx.pid".into());
        c.list[1].start = Some(vec!["nginx".into()]);
        assert!(c.validate().is_empty());
    }

    #[tokio::test]
    async fn stop_gets_the_pid_and_a_stopped_service_is_not_stopped_again() {
        let d = tempfile::tempdir().unwrap();
        let pid_file = d.path().join("svc.pid");
        let log = d.path().join("stops");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        std::fs::write(&pid_file, child.id().to_string()).unwrap();
        let c = ServicesConfig {
            backend: Backend::Exec,
            list: vec![ServiceConfig {
                name: "svc".into(),
                stop_on_drain: true,
                pid_file: Some(pid_file.clone()),
                stop: Some(vec![
                    "sh".into(),
                    "-c".into(),
                    "echo \"$1\" >> \"$2\" && kill \"$1\"".into(),
                    "sh".into(),
                    "{pid}".into(),
                    log.display().to_string(),
                ]),
                ..Default::default()
            }],
        };
        assert_eq!(
            drain_control(&c, Verb::Stop).await.unwrap(),
            vec!["svc".to_string()]
        );
        child.wait().unwrap();
        assert_eq!(
            std::fs::read_to_string(&log).unwrap().trim(),
            child.id().to_string()
        );
        // the second drain (ApplicationStop after BeforeBlockTraffic) leaves it alone
        assert!(drain_control(&c, Verb::Stop).await.unwrap().is_empty());
        assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 1);
    }

    #[test]
    fn php_fpm_without_process_control_timeout_is_warned() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("php-fpm.conf");
        let mut s = ServiceConfig {
            name: "fpm".into(),
            kind: ServiceKind::PhpFpm,
            config_file: Some(f.clone()),
            ..Default::default()
        };
        std::fs::write(&f, "[global]\n;process_control_timeout = 10s\n").unwrap();
        assert!(
            check_php_fpm_config(&s)
                .unwrap()
                .contains("process_control_timeout is 0")
        );
        std::fs::write(&f, "[global]\nprocess_control_timeout = 10s\n").unwrap();
        assert_eq!(check_php_fpm_config(&s), None);
        s.kind = ServiceKind::Nginx;
        assert_eq!(check_php_fpm_config(&s), None);
    }
}
