//! The YAML configuration: loading, error locations, unknown-key warnings, path resolution
//! and validation.
//!
//! Each concern owns its section (`release::ReleaseConfig`, `perms::PermsConfig`, ...);
//! this module aggregates them into [`Config`]. Loading is "parse, then resolve": the text is
//! deserialized into plain values (errors carry file, line and column), relative paths are
//! resolved against the config file's directory, then [`Config::validate`] checks the
//! cross-field rules without touching the system.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cache::CacheConfig;
use crate::drain::DrainConfig;
use crate::health::HealthConfig;
use crate::params::ParamsConfig;
use crate::perms::PermsConfig;
use crate::process::CommandSpec;
use crate::readiness::ReadinessConfig;
use crate::release::ReleaseConfig;
use crate::render::TemplateConfig;
use crate::services::ServicesConfig;

/// Where the config is read from when neither `--config` nor `BGAGENT_CONFIG` says.
pub const DEFAULT_PATH: &str = "/etc/bgagent/bgagent.yaml";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Config {
    /// Holds `releases/`, `shared/` and the `current` link. The web server serves
    /// `<app_root>/current/pub`.
    pub app_root: PathBuf,
    /// Persistent state: deployment in progress, event results, release history.
    pub state_dir: PathBuf,
    pub socket: SocketConfig,
    pub codedeploy: CodeDeployConfig,
    pub app: AppConfig,
    pub release: ReleaseConfig,
    pub permissions: PermsConfig,
    /// Where template parameters come from: none, file or ssm.
    pub params: ParamsConfig,
    /// Files rendered into each release before it goes live (app/etc/env.php).
    pub templates: Vec<TemplateConfig>,
    /// Cache generations (alternating Redis databases).
    pub cache: CacheConfig,
    /// nginx, php-fpm: config tests and graceful reloads.
    pub services: ServicesConfig,
    /// Checks ValidateService waits for.
    pub health: HealthConfig,
    /// Magento schema gate and once-per-deployment migrations.
    pub schema: crate::schema::SchemaConfig,
    /// URLs fetched before the node declares itself ready.
    pub warmup: crate::warmup::WarmupConfig,
    /// php-fpm's opcache across a switch: reload (today's) or precompile and switch warm.
    pub opcache: crate::opcache::OpcacheConfig,
    /// The readiness listener for the load balancer.
    pub readiness: ReadinessConfig,
    /// When a drain may end: the load balancer's probes, in-flight requests, an upper bound.
    pub drain: DrainConfig,
    pub validate: ValidateConfig,
    /// Magento's cron paused for the fleet while a deployment may upgrade the database.
    pub cron: crate::cron::CronConfig,
    /// Processes still running an old release's code after a switch: listed, and ended.
    pub processes: crate::procs::ProcessesConfig,
    /// Extra commands per lifecycle event, run after the event's own work, by argv.
    pub commands: std::collections::BTreeMap<String, Vec<CommandSpec>>,
    /// The config file's directory (set when loading).
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The config file itself (set when loading): the daemon re-reads it on SIGHUP.
    #[serde(skip)]
    pub file: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            app_root: PathBuf::from("/var/www/magento"),
            state_dir: PathBuf::from("/var/lib/bgagent"),
            socket: SocketConfig::default(),
            codedeploy: CodeDeployConfig::default(),
            app: AppConfig::default(),
            release: ReleaseConfig::default(),
            permissions: PermsConfig::default(),
            params: ParamsConfig::default(),
            templates: Vec::new(),
            cache: CacheConfig::default(),
            services: ServicesConfig::default(),
            health: HealthConfig::default(),
            readiness: ReadinessConfig::default(),
            warmup: Default::default(),
            opcache: Default::default(),
            schema: Default::default(),
            drain: DrainConfig::default(),
            validate: ValidateConfig::default(),
            processes: Default::default(),
            cron: Default::default(),
            commands: Default::default(),
            base_dir: PathBuf::from("/etc/bgagent"),
            file: PathBuf::from(DEFAULT_PATH),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(default)]
pub struct ValidateConfig {
    /// When ValidateService fails, switch back to the previous release at once.
    pub rollback_on_failure: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct SocketConfig {
    pub path: PathBuf,
    /// Group allowed to talk to the daemon besides root (and the daemon's own user).
    pub group: Option<String>,
    pub mode: String,
}

impl Default for SocketConfig {
    fn default() -> Self {
        SocketConfig {
            path: PathBuf::from("/run/bgagent/bgagent.sock"),
            group: Some("bgagent".into()),
            mode: "0660".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct CodeDeployConfig {
    /// The agent's `:root_dir:`; revisions are unpacked to
    /// `<deployment_root>/<DEPLOYMENT_GROUP_ID>/<DEPLOYMENT_ID>/deployment-archive`.
    pub deployment_root: PathBuf,
}

impl Default for CodeDeployConfig {
    fn default() -> Self {
        CodeDeployConfig {
            deployment_root: PathBuf::from("/opt/codedeploy-agent/deployment-root"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AppKind {
    /// Magento 2: generated/ and pub/static are expected in the artifact; schema gate applies.
    #[default]
    Magento,
    /// Any other PHP application.
    Php,
}

#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(default)]
pub struct AppConfig {
    pub kind: AppKind,
    /// Key namespace shared by the fleet (cache generations, migration lock); defaults to
    /// CodeDeploy's APPLICATION_NAME.
    pub name: Option<String>,
}

/// A config problem, located in the file where possible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub file: PathBuf,
    pub line: Option<u64>,
    pub column: Option<u64>,
    pub message: String,
}

impl std::fmt::Display for Issue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
            if let Some(c) = self.column {
                write!(f, ":{c}")?;
            }
        }
        write!(f, ": {}", self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The text could not be read into the config's shape. `warnings` are the unknown keys
    /// met before the failure: `missing field` is often a misspelt key.
    #[error("{issue}{}{}", if snippet.is_empty() { String::new() } else { format!("\n{snippet}") },
        .warnings.iter().map(|w| format!("\n  warning: {w}")).collect::<String>())]
    Parse {
        issue: Box<Issue>,
        snippet: String,
        warnings: Vec<Issue>,
    },
    /// Every validation error, and the unknown keys found on the way (a misspelt key is
    /// often why a required value is missing).
    #[error("invalid config:\n{}", .errors.iter().map(|i| format!("  {i}"))
        .chain(.warnings.iter().map(|w| format!("  warning: {w}")))
        .collect::<Vec<_>>().join("\n"))]
    Invalid {
        errors: Vec<Issue>,
        warnings: Vec<Issue>,
    },
}

/// A loaded config with the warnings found while loading it.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub path: PathBuf,
    /// Unknown keys, located: they are reported, never silently dropped.
    pub warnings: Vec<Issue>,
}

/// Reads, parses, resolves and validates the config at `path`.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let base = std::path::absolute(&base).unwrap_or(base);
    from_str(&text, path, &base)
}

/// The control socket's path from the config at `path`, read leniently: `bgagent hook` needs
/// nothing else, and a config being edited (unknown keys, an invalid value elsewhere, even a
/// YAML syntax error) must not break every hook while the daemon runs on the config it
/// loaded. Returns the path and, when the file could not be used, why the default was taken.
pub fn socket_path_lenient(path: &Path) -> (PathBuf, Option<String>) {
    #[derive(Deserialize)]
    struct Partial {
        #[serde(default)]
        socket: Option<PartialSocket>,
    }
    #[derive(Deserialize)]
    struct PartialSocket {
        #[serde(default)]
        path: Option<PathBuf>,
    }
    let default = SocketConfig::default().path;
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            return (
                default.clone(),
                Some(format!(
                    "could not read {} ({e}); using the default socket {}",
                    path.display(),
                    default.display()
                )),
            );
        }
    };
    // Only `socket.path` is read; every other key may hold anything.
    let parsed: Result<Partial, _> = serde_saphyr::from_str(&text);
    match parsed {
        Ok(Partial {
            socket: Some(PartialSocket { path: Some(p) }),
        }) => {
            if p.is_relative() {
                let base = path
                    .parent()
                    .filter(|b| !b.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                let base = std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf());
                (normalize_lexically(&base.join(p)), None)
            } else {
                (p, None)
            }
        }
        Ok(_) => (default, None),
        Err(e) => (
            default.clone(),
            Some(format!(
                "{} cannot be read for socket.path ({}); using the default socket {}; run `bgagent config check`",
                path.display(),
                strip_location(&e.without_snippet().to_string()),
                default.display()
            )),
        ),
    }
}

/// Parses config text; `file` is only used in messages, `base` resolves relative paths.
pub fn from_str(text: &str, file: &Path, base: &Path) -> Result<Loaded, ConfigError> {
    let mut unknown = Vec::new();
    let parsed: Result<Config, serde_saphyr::Error> =
        serde_saphyr::with_deserializer_from_str(text, |de| {
            serde_ignored::deserialize(de, |p| unknown.push(p.to_string()))
        });
    // An issue about `key`, at the key's place in the file when it can be found.
    let at = |key: &str, message: String| {
        let (line, column) = locate_key(text, key).unzip();
        Issue {
            file: file.to_path_buf(),
            line,
            column,
            message,
        }
    };
    let warnings = unknown
        .iter()
        .map(|key| {
            at(
                key,
                format!("unknown key `{key}` (ignored; check its spelling and indentation)"),
            )
        })
        .collect::<Vec<_>>();
    let mut config = parsed.map_err(|e| {
        let message = strip_location(&e.without_snippet().to_string());
        // A check made after a whole map was read (params) is reported at the map's start;
        // when its message names the offending key, point at that key instead.
        let named = message
            .strip_prefix('`')
            .and_then(|m| m.split_once("` does not apply to `source:"))
            .and_then(|(key, _)| locate_key(text, &format!("params.{key}")));
        let loc = e.location().map(|l| (l.line(), l.column()));
        let (line, column) = named.or(loc).unzip();
        // Name the key, as validation errors do: `release.keep`: invalid u64.
        let message = match line.and_then(|l| key_at(text, l)) {
            Some(key) if named.is_none() && !message.contains(&format!("`{key}`")) => {
                format!("`{key}`: {message}")
            }
            _ => message,
        };
        ConfigError::Parse {
            issue: Box::new(Issue {
                file: file.to_path_buf(),
                line,
                column,
                message,
            }),
            snippet: if named.is_some() {
                String::new()
            } else {
                code_frame(&e.to_string())
            },
            warnings: warnings.clone(),
        }
    })?;
    config.resolve_paths(base);
    config.file = file.to_path_buf();
    let mut issues = config.validate();
    if !issues.is_empty() {
        // Everything wrong in one listing: what only this host can tell too (users, groups).
        issues.extend(config.check_host());
        return Err(ConfigError::Invalid {
            warnings,
            errors: issues
                .into_iter()
                .map(|(key, message)| at(&key, format!("`{key}`: {message}")))
                .collect(),
        });
    }
    Ok(Loaded {
        config,
        path: file.to_path_buf(),
        warnings,
    })
}

impl Config {
    fn resolve_paths(&mut self, base: &Path) {
        let r = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = normalize_lexically(&base.join(&*p));
            }
        };
        r(&mut self.app_root);
        r(&mut self.state_dir);
        r(&mut self.socket.path);
        r(&mut self.codedeploy.deployment_root);
        r(&mut self.opcache.snippet_dir);
        if let ParamsConfig::File { path } = &mut self.params {
            r(path);
        }
        for t in &mut self.templates {
            r(&mut t.source);
        }
        for c in &mut self.health.checks {
            if let crate::health::CheckKind::Mysql(m) = &mut c.kind
                && let Some(f) = &mut m.password_file
            {
                r(f);
            }
        }
        if let Some(f) = self
            .schema
            .database
            .as_mut()
            .and_then(|d| d.password_file.as_mut())
        {
            r(f);
        }
        self.base_dir = base.to_path_buf();
    }

    /// Cross-field rules, as (dotted key, message) pairs. Pure: touches nothing on disk.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Err(m) = crate::fsutil::parse_mode(&self.socket.mode) {
            out.push(("socket.mode".into(), m));
        }
        out.extend(self.release.validate());
        out.extend(self.permissions.validate());
        out.extend(self.cache.validate());
        out.extend(self.processes.validate());
        out.extend(self.cron.validate());
        out.extend(self.drain.validate());
        out.extend(self.opcache.validate(&self.app_root));
        for (i, s) in self.services.list.iter().enumerate() {
            if let Some(a) = &s.fastcgi
                && let Err(m) = crate::opcache::Addr::parse(a)
            {
                out.push((format!("services.list.{i}.fastcgi"), m));
            }
        }
        if self.opcache.switch == crate::opcache::SwitchMode::Warm
            && !self.services.list.iter().any(|s| s.fastcgi.is_some())
        {
            out.push((
                "opcache.switch".into(),
                "`warm` needs the php-fpm pool's FastCGI address: set `fastcgi` (php-fpm's `listen`, e.g. unix:/run/php/php8.2-fpm.sock) on the php-fpm service".into(),
            ));
        }
        out.extend(self.services.validate());
        for (i, t) in self.templates.iter().enumerate() {
            out.extend(t.validate(i));
        }
        for (ev, cmds) in &self.commands {
            if crate::lifecycle::Event::parse(ev).is_err() {
                out.push((
                    format!("commands.{ev}"),
                    format!("`{ev}` is not a lifecycle event"),
                ));
            }
            for (i, c) in cmds.iter().enumerate() {
                if c.argv.is_empty() {
                    out.push((format!("commands.{ev}.{i}.argv"), "is empty".into()));
                }
                out.extend(unknown_placeholders(
                    &format!("commands.{ev}.{i}.argv"),
                    &c.argv,
                    &[],
                ));
            }
        }
        if let Some(m) = &self.schema.migration {
            out.extend(unknown_placeholders("schema.migration.argv", &m.argv, &[]));
        }
        if self.schema.breaking == crate::schema::Breaking::Maintenance
            && self.cache.redis.is_none()
        {
            out.push((
                "schema.breaking".into(),
                "`maintenance` needs cache.redis: the fleet's Redis is how every node learns to turn Magento's maintenance flag on".into(),
            ));
        }
        if let Some(f) = &self.schema.class_file
            && let Err(m) = crate::perms::check_relative(f)
        {
            out.push(("schema.class_file".into(), m));
        }
        for (i, s) in self.services.list.iter().enumerate() {
            for (verb, argv) in [
                ("test", &s.test),
                ("reload", &s.reload),
                ("start", &s.start),
                ("stop", &s.stop),
            ] {
                if let Some(argv) = argv {
                    out.extend(unknown_placeholders(
                        &format!("services.list.{i}.{verb}"),
                        argv,
                        &["{pid}"],
                    ));
                }
            }
        }
        for (i, t) in self.templates.iter().enumerate() {
            if let Some(argv) = &t.check {
                out.extend(unknown_placeholders(
                    &format!("templates.{i}.check"),
                    argv,
                    &["{path}"],
                ));
            }
        }
        let mut urls: Vec<(String, &str, &[&str])> = Vec::new();
        for (i, c) in self.health.checks.iter().enumerate() {
            match &c.kind {
                crate::health::CheckKind::Http(h) => urls.push((
                    format!("health.checks.{i}.http.url"),
                    &h.url,
                    &["http", "https"],
                )),
                crate::health::CheckKind::Redis { url } => urls.push((
                    format!("health.checks.{i}.redis.url"),
                    url,
                    &["redis", "rediss", "unix"],
                )),
                _ => {}
            }
        }
        for (i, u) in self.warmup.urls.iter().enumerate() {
            urls.push((format!("warmup.urls.{i}.url"), &u.url, &["http", "https"]));
        }
        if let Some(r) = &self.cache.redis {
            urls.push(("cache.redis".into(), r, &["redis", "rediss", "unix"]));
        }
        for (key, url, schemes) in urls {
            match reqwest::Url::parse(url) {
                Err(e) => out.push((key, format!("`{url}` is not a URL: {e}"))),
                Ok(u) if !schemes.contains(&u.scheme()) => out.push((
                    key,
                    format!(
                        "`{url}`: the scheme must be {}",
                        schemes
                            .iter()
                            .map(|s| format!("{s}://"))
                            .collect::<Vec<_>>()
                            .join(" or ")
                    ),
                )),
                Ok(_) => {}
            }
        }
        out
    }

    /// Keys a running daemon cannot take on SIGHUP (the socket and listener are bound, the
    /// state directory locked, the app root's layout opened): they need a restart.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.app_root != new.app_root {
            out.push("app_root");
        }
        if self.state_dir != new.state_dir {
            out.push("state_dir");
        }
        if self.socket.path != new.socket.path
            || self.socket.group != new.socket.group
            || self.socket.mode != new.socket.mode
        {
            out.push("socket");
        }
        if self.readiness.listen != new.readiness.listen {
            out.push("readiness.listen");
        }
        if self.readiness.status_listen != new.readiness.status_listen {
            out.push("readiness.status_listen");
        }
        out
    }

    /// What only this host can answer: the socket group, and every owner and group the
    /// config names, exist. Run by `bgagent config check` and when the daemon (re)loads.
    pub fn check_host(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut user = |key: String, name: &Option<String>| {
            if let Some(n) = name
                && crate::perms::lookup_user(n).is_none()
            {
                out.push((key, format!("no user named `{n}` on this host")));
            }
        };
        user("permissions.owner".into(), &self.permissions.owner);
        for (i, t) in self.templates.iter().enumerate() {
            user(format!("templates.{i}.owner"), &t.owner);
        }
        for (ev, cmds) in &self.commands {
            for (i, c) in cmds.iter().enumerate() {
                user(format!("commands.{ev}.{i}.user"), &c.user);
            }
        }
        if let Some(m) = &self.schema.migration {
            user("schema.migration.user".into(), &m.user);
        }
        let mut group = |key: String, name: &Option<String>, why: &str| {
            if let Some(n) = name
                && crate::perms::lookup_group(n).is_none()
            {
                out.push((key, format!("no group named `{n}` on this host{why}")));
            }
        };
        group(
            "socket.group".into(),
            &self.socket.group,
            " (the package's sysusers file creates `bgagent`)",
        );
        group("permissions.group".into(), &self.permissions.group, "");
        for (i, t) in self.templates.iter().enumerate() {
            group(format!("templates.{i}.group"), &t.group, "");
        }
        for (ev, cmds) in &self.commands {
            for (i, c) in cmds.iter().enumerate() {
                group(format!("commands.{ev}.{i}.group"), &c.group, "");
            }
        }
        if let Some(m) = &self.schema.migration {
            group("schema.migration.group".into(), &m.group, "");
        }
        out
    }
}

/// Arguments that look like a placeholder (`{name}`) but are not one of `known`: a typo such
/// as `{pdi}` would otherwise reach the command verbatim.
fn unknown_placeholders(key: &str, argv: &[String], known: &[&str]) -> Vec<(String, String)> {
    argv.iter()
        .filter(|a| {
            a.len() > 2
                && a.starts_with('{')
                && a.ends_with('}')
                && a[1..a.len() - 1]
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !known.contains(&a.as_str())
        })
        .map(|a| {
            let hint = if known.is_empty() {
                "this command has no placeholders".to_string()
            } else {
                format!("known here: {}", known.join(", "))
            };
            (
                key.to_string(),
                format!("unknown placeholder `{a}` ({hint})"),
            )
        })
        .collect()
}

/// Removes `.` and folds `dir/..` without touching the filesystem, so paths in messages
/// read as operators wrote them.
pub fn normalize_lexically(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out
}

/// saphyr appends "at line L, column C" to messages; we print the location in front instead.
fn strip_location(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// Finds the line and column of a dotted key path (as serde_ignored reports it, with
/// sequence indices as numbers) in block-style YAML. Best effort: `None` when the key cannot be
/// found, e.g. in flow style.
pub fn locate_key(text: &str, path: &str) -> Option<(u64, u64)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut from = 0usize;
    let mut parent_indent: i64 = -1;
    let mut found = None;
    let mut in_item = false;
    for seg in path.split('.') {
        if let Ok(index) = seg.parse::<usize>() {
            // The index-th "- " item below the parent.
            let mut n = 0;
            let mut hit = None;
            for (i, line) in lines.iter().enumerate().skip(from) {
                let ind = indent(line);
                let t = line.trim_start();
                if t.is_empty() || t.starts_with('#') {
                    continue;
                }
                if (ind as i64) <= parent_indent && !t.starts_with('-') {
                    break;
                }
                if t.starts_with("- ") || t == "-" {
                    if n == index {
                        hit = Some((i, ind));
                        break;
                    }
                    n += 1;
                }
            }
            let (i, ind) = hit?;
            // Keys of the item sit two columns right of the dash.
            parent_indent = ind as i64;
            from = i;
            found = Some((i as u64 + 1, ind as u64 + 1));
            in_item = true;
            continue;
        }
        let mut hit = None;
        for (i, line) in lines.iter().enumerate().skip(from) {
            let ind = indent(line);
            let t = line.trim_start();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            // A sequence's items may sit at their key's own indent (`list:\n- a`), but
            // inside an item the next item at the dash's indent ends the search.
            if i > from
                && (ind as i64) <= parent_indent
                && (in_item || !(t.starts_with("- ") && ind as i64 == parent_indent))
            {
                break;
            }
            let (t, extra) = match t.strip_prefix("- ") {
                Some(rest) => (rest, 2),
                None => (t, 0),
            };
            let key_matches = t
                .strip_prefix(seg)
                .is_some_and(|rest| rest.trim_start().starts_with(':'))
                || t.strip_prefix(&format!("\"{seg}\""))
                    .is_some_and(|rest| rest.trim_start().starts_with(':'));
            if key_matches && (ind + extra) as i64 > parent_indent {
                hit = Some((i, ind + extra));
                break;
            }
        }
        let Some((i, ind)) = hit else {
            // Flow style (`drain: { deregistration_delay: 30s }`, `- { name: web, http: { url:
            // ... } }`): the key sits on the line found so far, right of what was found there.
            // Otherwise the deepest part of the path that was found is the best location.
            let Some((line, col)) = found else {
                return None;
            };
            let l = lines.get(line as usize - 1)?;
            let start = (col as usize - 1).min(l.len());
            let Some(at) = flow_key(&l[start..], seg) else {
                return found;
            };
            found = Some((line, (start + at) as u64 + 1));
            continue;
        };
        parent_indent = ind as i64;
        from = i + 1;
        found = Some((i as u64 + 1, ind as u64 + 1));
        in_item = false;
    }
    found
}

/// The byte offset of `key:` as a key inside a flow mapping in `text` (after `{` or `,`).
fn flow_key(text: &str, key: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(pos) = text[from..].find(key) {
        let at = from + pos;
        let before = text[..at].trim_end();
        let after = text[at + key.len()..].trim_start();
        if (before.ends_with('{') || before.ends_with(',')) && after.starts_with(':') {
            return Some(at);
        }
        from = at + key.len();
    }
    None
}

/// The dotted key (as [`locate_key`] takes it) of the mapping key on 1-based `line`, found
/// by walking up to each less indented parent. Best effort, block style only.
pub fn key_at(text: &str, line: u64) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let idx = usize::try_from(line).ok()?.checked_sub(1)?;
    let key_of = |l: &str| -> Option<(usize, String, bool)> {
        let t = l.trim_start();
        let (t, item, extra) = match t.strip_prefix("- ") {
            Some(rest) => (rest, true, 2),
            None => (t, false, 0),
        };
        let (k, _) = t.split_once(':')?;
        let k = k.trim().trim_matches('"');
        (!k.is_empty() && !k.contains(' ') && !k.starts_with('#'))
            .then(|| (indent(l) + extra, k.to_string(), item))
    };
    let (mut ind, key, mut item) = key_of(lines.get(idx)?)?;
    let mut item_indent = indent(lines[idx]);
    let mut path = vec![key];
    for i in (0..idx).rev() {
        let l = lines[i];
        let t = l.trim_start();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let dash = t.starts_with("- ");
        if item && dash && indent(l) == item_indent {
            continue; // an earlier item of the same list: counted below
        }
        if !item && dash && indent(l) + 2 == ind {
            // The key sits inside this list item (not on its first line).
            item = true;
            item_indent = indent(l);
            continue;
        }
        if indent(l) < ind.min(if item { item_indent + 1 } else { ind })
            && let Some((k_ind, k, k_item)) = key_of(l)
        {
            if item {
                // The list hangs under this key: count the items above ours.
                let n = lines[i + 1..=idx]
                    .iter()
                    .filter(|x| indent(x) == item_indent && x.trim_start().starts_with("- "))
                    .count();
                path.push(n.saturating_sub(1).to_string());
            }
            path.push(k);
            ind = k_ind;
            item = k_item;
            item_indent = indent(l);
            if ind == 0 {
                break;
            }
        }
    }
    path.reverse();
    Some(path.join("."))
}

/// saphyr's rendered error without its first line (the message, already said with the
/// location in front) and its `--> <input>` line: only the code frame stays.
fn code_frame(rendered: &str) -> String {
    rendered
        .lines()
        .skip_while(|l| l.starts_with("error:"))
        .filter(|l| !l.trim_start().starts_with("-->"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

/// Serde helpers for durations written as human strings ("30s", "500ms", "2m").
pub mod duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!("`{s}` is not a duration such as \"30s\": {e}"))
        })
    }
}

/// Like [`duration`], for `Option<Duration>`.
pub mod opt_duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = Option::<String>::deserialize(d)?;
        s.map(|s| {
            humantime::parse_duration(&s).map_err(|e| {
                serde::de::Error::custom(format!("`{s}` is not a duration such as \"30s\": {e}"))
            })
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Loaded, ConfigError> {
        from_str(
            text,
            Path::new("/etc/bgagent/bgagent.yaml"),
            Path::new("/etc/bgagent"),
        )
    }

    #[test]
    fn schema_breaking_maintenance_needs_cache_redis_and_class_file_is_a_release_path() {
        let e = parse("app_root: /a\nschema:\n  breaking: maintenance\n  class_file: /etc/x\n")
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("`schema.breaking`: `maintenance` needs cache.redis"),
            "{e}"
        );
        assert!(e.contains("`schema.class_file`"), "{e}");
        parse("app_root: /a\ncache: { redis: \"redis://127.0.0.1:6379\" }\nschema:\n  breaking: maintenance\n  class_file: etc/schema-change\n")
            .unwrap();
    }

    #[test]
    fn relative_paths_resolve_against_the_config_directory() {
        let l = parse("app_root: ../app\nstate_dir: /var/lib/x\n").unwrap();
        assert_eq!(l.config.app_root, Path::new("/etc/app"));
        assert_eq!(l.config.state_dir, Path::new("/var/lib/x"));
    }

    #[test]
    fn unknown_keys_are_warned_with_their_line() {
        let l = parse("app_root: /a\nrelease:\n  keep: 3\n  kepp: 4\n").unwrap();
        assert_eq!(l.warnings.len(), 1);
        let w = &l.warnings[0];
        assert_eq!((w.line, w.column), (Some(4), Some(3)));
        assert!(w.message.contains("release.kepp"), "{}", w.message);
        assert_eq!(w.to_string().split(':').nth(1), Some("4"));
    }

    #[test]
    fn an_invalid_config_still_reports_its_unknown_keys() {
        // `kep` misspelt and `keep` too low: the error comes with the warning that explains it.
        let e = parse("app_root: /a\nrelease:\n  kep: 5\n  keep: 1\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/etc/bgagent/bgagent.yaml:4:3: `release.keep`"),
            "{e}"
        );
        assert!(
            e.contains("warning: /etc/bgagent/bgagent.yaml:3:3: unknown key `release.kep`"),
            "{e}"
        );
    }

    #[test]
    fn params_keys_are_checked_per_source() {
        // A misspelt key inside params is warned like any other, with its line.
        let l = parse(
            "app_root: /a\nparams:\n  source: ssm\n  paths: [/m/prod]\n  regoin: eu-west-1\n",
        )
        .unwrap();
        assert_eq!(l.warnings.len(), 1, "{:?}", l.warnings);
        assert!(
            l.warnings[0].message.contains("params.regoin"),
            "{}",
            l.warnings[0].message
        );
        assert_eq!(l.warnings[0].line, Some(5));
        match &l.config.params {
            ParamsConfig::Ssm(s) => assert_eq!(s.paths, vec!["/m/prod".to_string()]),
            other => panic!("{other:?}"),
        }
        // A key of the other source is an error that says what to write instead.
        let e = parse("app_root: /a\nparams:\n  source: ssm\n  path: /m/prod\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`path` does not apply to `source: ssm`") && e.contains("`paths`"),
            "{e}"
        );
        assert!(
            e.starts_with("/etc/bgagent/bgagent.yaml:4:3: "),
            "at the key itself: {e}"
        );
        let e = parse("app_root: /a\nparams:\n  source: file\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs `path`"), "{e}");
        let e = parse("app_root: /a\nparams:\n  source: vault\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown params source `vault`"), "{e}");
        // The file source still resolves its path against the config's directory.
        let l = parse("app_root: /a\nparams:\n  source: file\n  path: params.yaml\n").unwrap();
        assert_eq!(
            l.config.params,
            ParamsConfig::File {
                path: "/etc/bgagent/params.yaml".into()
            }
        );
    }

    #[test]
    fn type_errors_carry_file_line_and_column() {
        let e = parse("app_root: /a\nrelease:\n  keep: three\n").unwrap_err();
        match e {
            ConfigError::Parse { issue, .. } => {
                assert_eq!((issue.line, issue.column), (Some(3), Some(9)));
                assert!(
                    issue
                        .to_string()
                        .starts_with("/etc/bgagent/bgagent.yaml:3:9: ")
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_parse_failure_also_lists_the_unknown_keys_met_before_it() {
        // `sorce` misspelt: serde says `source` is missing; the warning says why.
        let text = "app_root: /a\ntemplates:\n  - sorce: env.php.j2\n    target: app/etc/env.php\n";
        let e = parse(text).unwrap_err();
        let s = e.to_string();
        match &e {
            ConfigError::Parse {
                issue, warnings, ..
            } => {
                assert!(issue.message.contains("source"), "{s}");
                assert_eq!(warnings.len(), 1, "{s}");
                assert_eq!(
                    (warnings[0].line, warnings[0].column),
                    (Some(3), Some(5)),
                    "{s}"
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            s.contains("warning: /etc/bgagent/bgagent.yaml:3:5: unknown key `templates.0.sorce`"),
            "{s}"
        );
    }

    #[test]
    fn invalid_values_are_located() {
        let e = parse("socket:\n  mode: rw\n").unwrap_err();
        let s = e.to_string();
        assert!(s.contains("bgagent.yaml:2:3: `socket.mode`"), "{s}");
    }

    #[test]
    fn hooks_read_the_socket_path_leniently() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("bgagent.yaml");
        // Being edited: an invalid value and an unknown key elsewhere; the socket still reads.
        std::fs::write(
            &f,
            "socket:\n  path: run/x.sock\nrelease:\n  keep: lots\nnew_key: 1\n",
        )
        .unwrap();
        assert!(load(&f).is_err());
        assert_eq!(socket_path_lenient(&f), (d.path().join("run/x.sock"), None));
        // No socket section: the default, no complaint.
        std::fs::write(&f, "app_root: /a\n").unwrap();
        assert_eq!(
            socket_path_lenient(&f),
            (PathBuf::from("/run/bgagent/bgagent.sock"), None)
        );
        // Not YAML at all: the default, with the reason.
        std::fs::write(&f, "socket: [unclosed\n").unwrap();
        let (p, why) = socket_path_lenient(&f);
        assert_eq!(p, PathBuf::from("/run/bgagent/bgagent.sock"));
        assert!(why.unwrap().contains("cannot be read for socket.path"));
    }

    /// Regression: a type error said `invalid u64` twice (the message, then saphyr's
    /// rendering of it) and never which key.
    #[test]
    fn a_type_error_names_its_key_and_says_it_once() {
        let e = parse("app_root: /a\nrelease:\n  intake: auto\n  keep: lots\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/etc/bgagent/bgagent.yaml:4:9: `release.keep`: invalid"),
            "{e}"
        );
        // Once as the message; the code frame only points at the value (`^ invalid u64`).
        let said = e
            .lines()
            .filter(|l| l.contains("invalid u64"))
            .collect::<Vec<_>>();
        assert_eq!(said.len(), 2, "{e}");
        assert!(said[1].trim_start().starts_with("|"), "{e}");
        assert!(e.contains("keep: lots"), "the code frame stays: {e}");
        let text = "a:\n  list:\n    - name: x\n    - name: y\n      bogus: 1\n";
        assert_eq!(key_at(text, 5).as_deref(), Some("a.list.1.bogus"));
        assert_eq!(key_at(text, 3).as_deref(), Some("a.list.0.name"));
        assert_eq!(key_at(text, 4).as_deref(), Some("a.list.1.name"));
    }

    #[test]
    fn locate_key_finds_sequence_items() {
        let text = "a:\n  list:\n    - name: x\n    - name: y\n      bogus: 1\n";
        assert_eq!(locate_key(text, "a.list.1.bogus"), Some((5, 7)));
    }

    #[test]
    fn locate_key_finds_flow_style_keys() {
        let text = "drain: { deregistration_delay: 30s }\nhealth:\n  checks:\n    - { name: web, http: { url: \"ftp://x\" } }\n";
        assert_eq!(
            locate_key(text, "drain.deregistration_delay"),
            Some((1, 10))
        );
        assert_eq!(locate_key(text, "health.checks.0.http.url"), Some((4, 28)));
        // A key that is not written at all: the deepest part that is.
        assert_eq!(locate_key(text, "health.checks.0.redis.url"), Some((4, 5)));
        // Not in the next item, though it has the key.
        let text = "checks:\n  - { name: a }\n  - name: b\n    http: { url: x }\n";
        assert_eq!(locate_key(text, "checks.0.http"), Some((2, 3)));
        assert_eq!(locate_key(text, "checks.1.http"), Some((4, 5)));
        let text = "templates:\n- source: a\n  target: b\n- source: c\n";
        assert_eq!(locate_key(text, "templates.1.source"), Some((4, 3)));
    }
}

#[cfg(test)]
mod resolve_tests {
    use super::*;

    #[test]
    fn password_files_resolve_against_the_config_directory() {
        let l = from_str(
            "health:\n  checks:\n    - name: db\n      mysql: { host: h, user: u, password_file: pw }\n",
            Path::new("/etc/bgagent/bgagent.yaml"),
            Path::new("/etc/bgagent"),
        )
        .unwrap();
        match &l.config.health.checks[0].kind {
            crate::health::CheckKind::Mysql(m) => {
                assert_eq!(
                    m.password_file.as_deref(),
                    Some(Path::new("/etc/bgagent/pw"))
                )
            }
            other => panic!("{other:?}"),
        }
    }
}
