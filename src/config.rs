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
    pub drain: DrainConfig,
    pub validate: ValidateConfig,
    /// Extra commands per lifecycle event, run after the event's own work, by argv.
    pub commands: std::collections::BTreeMap<String, Vec<CommandSpec>>,
    /// The config file's directory (set when loading).
    #[serde(skip)]
    pub base_dir: PathBuf,
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
            commands: Default::default(),
            base_dir: PathBuf::from("/etc/bgagent"),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(default)]
pub struct DrainConfig {
    /// How long in-flight requests get after /ready turns 503, before anything stops: the
    /// target group's deregistration delay (or the load balancer's health-check interval
    /// times its unhealthy threshold, whichever is longer).
    #[serde(with = "duration")]
    pub deregistration_delay: std::time::Duration,
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
                e.to_string()
            },
            warnings: warnings.clone(),
        }
    })?;
    config.resolve_paths(base);
    let issues = config.validate();
    if !issues.is_empty() {
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
            }
        }
        out
    }
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
            continue;
        }
        let mut hit = None;
        for (i, line) in lines.iter().enumerate().skip(from) {
            let ind = indent(line);
            let t = line.trim_start();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            if i > from
                && (ind as i64) <= parent_indent
                && !(t.starts_with("- ") && ind as i64 == parent_indent)
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
        let (i, ind) = hit?;
        parent_indent = ind as i64;
        from = i + 1;
        found = Some((i as u64 + 1, ind as u64 + 1));
    }
    found
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
    fn locate_key_finds_sequence_items() {
        let text = "a:\n  list:\n    - name: x\n    - name: y\n      bogus: 1\n";
        assert_eq!(locate_key(text, "a.list.1.bogus"), Some((5, 7)));
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
