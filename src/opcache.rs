//! opcache control through php-fpm's FastCGI socket: read the pool's opcache, precompile a
//! release into it before the switch, invalidate a retired release, reset.
//!
//! Why: a php-fpm reload (USR2) respawns every worker on an empty opcache, and the second
//! after it is 10-17x slower at p99. nginx passes `$realpath_root`, so each release has its
//! own real paths and opcache keys never collide: a new release can be compiled into the
//! running pool's shared opcache beside the old one, and `current` switched without any
//! reload, as long as there is room for both. This module does the talking; the decisions
//! ([`decide`], [`after_precompile`], [`hot_set`]) are pure functions over typed records.
//!
//! How, as cachetool does it: bgagent writes small PHP snippets into a private directory it
//! owns (never under the app root, so never reachable over HTTP; checked before every use:
//! a real directory owned by bgagent's user, writable by nobody else) and asks the pool to run
//! them over FastCGI (`SCRIPT_FILENAME` = the snippet). The snippets answer JSON that is read
//! into the records here. Every call has a connect deadline and an operation deadline.
//! Setting `opcache.restrict_api` to the snippet directory in the pool keeps the opcache API
//! away from the application's own scripts.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fastcgi_client::{Client, Params, Request};
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------------------
// Config

/// How `current` is switched with respect to php-fpm's opcache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SwitchMode {
    /// `warm` for every php-fpm service with a `fastcgi` address, `reload` for the others.
    /// The default since BENCHMARKS.md ("Warm switches") showed the warm switch meets its
    /// targets under load where the reload does not.
    #[default]
    Auto,
    /// The behaviour before warm switches: switch, then reload php-fpm (USR2). No FastCGI.
    Reload,
    /// Precompile the new release into the running pool, then switch without a reload when
    /// opcache has room for both releases. Needs `fastcgi` on the php-fpm service.
    Warm,
}

/// In `warm` mode, when php-fpm is reloaded anyway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ReloadPolicy {
    /// Only when opcache lacks room for both releases (or a reclaim is due).
    #[default]
    WhenNeeded,
    /// Every deploy: reload before the switch, precompile into the fresh opcache, switch.
    Always,
}

/// When a reload that reclaims wasted opcache memory runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ReclaimAt {
    /// In the next deploy's pre-switch phase: reload, precompile, then switch.
    #[default]
    NextDeploy,
    /// In the daily `reclaim_window` (UTC), when no deployment is in progress: reload, then
    /// precompile the current release's hot set into the fresh opcache.
    Window,
    /// Never by bgagent (the operator reloads in their own way).
    Never,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct OpcacheConfig {
    pub switch: SwitchMode,
    pub reload: ReloadPolicy,
    /// Where bgagent writes the PHP snippets the pool runs. Must be outside `app_root`; the
    /// pool's user must be able to read it (bgagent makes it 0755, snippets 0644).
    pub snippet_dir: PathBuf,
    #[serde(with = "crate::config::duration")]
    pub connect_timeout: Duration,
    /// Deadline of one FastCGI call.
    #[serde(with = "crate::config::duration")]
    pub timeout: Duration,
    /// The whole precompile step's time budget; what is left when it runs out is skipped
    /// (compiled on first request instead).
    #[serde(with = "crate::config::duration")]
    pub budget: Duration,
    /// Release-relative globs precompiled besides the old release's cached scripts
    /// (`*`, `?`, and `**` for any depth), e.g. `vendor/composer/*.php`.
    pub globs: Vec<String>,
    /// Files per FastCGI request.
    pub batch: usize,
    /// FastCGI requests at once (each takes one php-fpm worker from the live traffic).
    pub concurrency: usize,
    /// Free opcache memory (bytes) that must remain after the new release is in.
    pub min_free_memory: u64,
    /// Free opcache keys that must remain after the new release is in.
    pub min_free_keys: u64,
    /// Wasted memory (percent of the total) at which a reclaiming reload is scheduled.
    pub reclaim_wasted_percent: f64,
    pub reclaim_at: ReclaimAt,
    /// `HH:MM-HH:MM`, UTC, for `reclaim_at: window` (may pass midnight: `23:00-01:00`).
    pub reclaim_window: Option<String>,
}

impl Default for OpcacheConfig {
    fn default() -> Self {
        OpcacheConfig {
            switch: SwitchMode::Auto,
            reload: ReloadPolicy::WhenNeeded,
            snippet_dir: PathBuf::from("/run/bgagent-fcgi"),
            connect_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(30),
            budget: Duration::from_secs(30),
            globs: Vec::new(),
            batch: 200,
            concurrency: 2,
            min_free_memory: 16 << 20,
            min_free_keys: 1000,
            reclaim_wasted_percent: 10.0,
            reclaim_at: ReclaimAt::NextDeploy,
            reclaim_window: None,
        }
    }
}

impl OpcacheConfig {
    /// (dotted key, message) pairs. Pure.
    pub fn validate(&self, app_root: &Path) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if !self.snippet_dir.is_absolute() {
            out.push((
                "opcache.snippet_dir".into(),
                "must be an absolute path".into(),
            ));
        }
        if self.snippet_dir.starts_with(app_root) || app_root.starts_with(&self.snippet_dir) {
            out.push((
                "opcache.snippet_dir".into(),
                format!(
                    "{} overlaps app_root {}: the snippets must never be reachable over HTTP; use a directory outside it such as /run/bgagent-fcgi",
                    self.snippet_dir.display(),
                    app_root.display()
                ),
            ));
        }
        if self.batch == 0 {
            out.push(("opcache.batch".into(), "must be at least 1".into()));
        }
        if self.concurrency == 0 {
            out.push(("opcache.concurrency".into(), "must be at least 1".into()));
        }
        if !(0.0..=100.0).contains(&self.reclaim_wasted_percent) {
            out.push((
                "opcache.reclaim_wasted_percent".into(),
                "must be between 0 and 100".into(),
            ));
        }
        match (&self.reclaim_at, &self.reclaim_window) {
            (ReclaimAt::Window, None) => out.push((
                "opcache.reclaim_window".into(),
                "`reclaim_at: window` needs a window, e.g. \"02:00-04:00\" (UTC)".into(),
            )),
            (_, Some(w)) => {
                if let Err(m) = parse_window(w) {
                    out.push(("opcache.reclaim_window".into(), m));
                }
            }
            _ => {}
        }
        for (i, g) in self.globs.iter().enumerate() {
            if g.starts_with('/') || g.split('/').any(|s| s == "..") {
                out.push((
                    format!("opcache.globs.{i}"),
                    format!("`{g}` must be relative to the release, without `..`"),
                ));
            }
        }
        out
    }
}

/// Where a php-fpm pool listens: `unix:/run/php/php8.2-fpm.sock`, `/run/php/...sock`, or
/// `127.0.0.1:9000`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    Unix(PathBuf),
    Tcp(String),
}

impl Addr {
    pub fn parse(s: &str) -> Result<Addr, String> {
        let s = s.trim();
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(Addr::Unix(PathBuf::from(p)));
        }
        if s.starts_with('/') {
            return Ok(Addr::Unix(PathBuf::from(s)));
        }
        match s.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => Ok(Addr::Tcp(s.into())),
            _ => Err(format!(
                "`{s}` is not a FastCGI address: write unix:/run/php/php8.2-fpm.sock or 127.0.0.1:9000 (php-fpm's `listen`)"
            )),
        }
    }
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
            Addr::Tcp(a) => write!(f, "{a}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Errors

#[derive(Debug, thiserror::Error)]
pub enum OpcacheError {
    #[error("cannot connect to php-fpm at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("php-fpm at {addr} did not accept a connection within {after:?}")]
    ConnectTimeout { addr: String, after: Duration },
    #[error("php-fpm at {addr} did not answer {snippet} within {after:?}")]
    Timeout {
        addr: String,
        snippet: String,
        after: Duration,
    },
    #[error("FastCGI exchange with php-fpm at {addr} failed: {source}")]
    Protocol {
        addr: String,
        source: fastcgi_client::ClientError,
    },
    #[error("php-fpm at {addr} answered {status} to {snippet}: {message}")]
    Php {
        addr: String,
        snippet: String,
        status: u16,
        message: String,
    },
    #[error("{snippet} in the pool at {addr} says: {message}")]
    Snippet {
        addr: String,
        snippet: String,
        message: String,
    },
    #[error(
        "the snippet directory {dir} is unsafe ({problem}): it must be a real directory owned by bgagent's user and writable by nobody else; fix it or point opcache.snippet_dir elsewhere"
    )]
    UnsafeDir { dir: PathBuf, problem: String },
    #[error("cannot write the snippet {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("unreadable answer from {snippet} at {addr}: {message}; the answer began: {head}")]
    Parse {
        addr: String,
        snippet: String,
        message: String,
        head: String,
    },
}

// ---------------------------------------------------------------------------------------
// Snippets

/// The PHP snippets bgagent runs inside the pool. Each answers JSON (compile: one JSON line
/// per file, so a fatal compile error in one file loses only that file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Snippet {
    Status,
    Compile,
    Invalidate,
    Reset,
}

impl Snippet {
    pub const ALL: [Snippet; 4] = [
        Snippet::Status,
        Snippet::Compile,
        Snippet::Invalidate,
        Snippet::Reset,
    ];
    pub fn file_name(self) -> &'static str {
        match self {
            Snippet::Status => "bgagent-opcache-status.php",
            Snippet::Compile => "bgagent-opcache-compile.php",
            Snippet::Invalidate => "bgagent-opcache-invalidate.php",
            Snippet::Reset => "bgagent-opcache-reset.php",
        }
    }
    fn source(self) -> &'static str {
        match self {
            Snippet::Status => SNIPPET_STATUS,
            Snippet::Compile => SNIPPET_COMPILE,
            Snippet::Invalidate => SNIPPET_INVALIDATE,
            Snippet::Reset => SNIPPET_RESET,
        }
    }
}

const SNIPPET_HEAD: &str = "<?php\n// Written by bgagent (rewritten before every use; edits are lost). Runs inside the php-fpm pool over FastCGI.\nheader('Content-Type: application/json');\nif (!function_exists('opcache_get_status')) { echo json_encode(['ok' => false, 'error' => 'the opcache extension is not loaded in this pool']); return; }\n";

const SNIPPET_STATUS: &str = r#"$with = ($_SERVER['BGAGENT_SCRIPTS'] ?? '0') === '1';
$s = @opcache_get_status($with);
if (!is_array($s)) { $e = error_get_last(); echo json_encode(['ok' => false, 'error' => 'opcache_get_status() returned false: ' . ($e['message'] ?? 'opcache is off (opcache.enable=0) or restricted (opcache.restrict_api)')]); return; }
$m = $s['memory_usage'] ?? []; $st = $s['opcache_statistics'] ?? []; $i = $s['interned_strings_usage'] ?? [];
$scripts = [];
// Invalidated entries stay listed until a restart: only scripts still served count.
if ($with) { foreach (($s['scripts'] ?? []) as $v) { if (opcache_is_script_cached($v['full_path'])) { $scripts[] = [$v['full_path'], $v['memory_consumption'], $v['hits']]; } } }
echo json_encode([
  'ok' => true, 'snippet' => __FILE__, 'pid' => getmypid(),
  'enabled' => (bool)($s['opcache_enabled'] ?? false), 'cache_full' => (bool)($s['cache_full'] ?? false),
  'restart_pending' => (bool)($s['restart_pending'] ?? false),
  'used_memory' => $m['used_memory'] ?? 0, 'free_memory' => $m['free_memory'] ?? 0, 'wasted_memory' => $m['wasted_memory'] ?? 0,
  'cached_scripts' => $st['num_cached_scripts'] ?? 0, 'cached_keys' => $st['num_cached_keys'] ?? 0, 'max_cached_keys' => $st['max_cached_keys'] ?? 0,
  'hits' => $st['hits'] ?? 0, 'misses' => $st['misses'] ?? 0, 'start_time' => $st['start_time'] ?? 0,
  'interned_used' => $i['used_memory'] ?? 0, 'interned_free' => $i['free_memory'] ?? 0,
  'validate_timestamps' => (bool)ini_get('opcache.validate_timestamps'), 'file_update_protection' => (int)ini_get('opcache.file_update_protection'),
  'scripts' => $scripts,
], JSON_UNESCAPED_SLASHES | JSON_INVALID_UTF8_SUBSTITUTE);
"#;

const SNIPPET_COMPILE: &str = r#"$t0 = microtime(true);
$budget = ((int)($_SERVER['BGAGENT_BUDGET_MS'] ?? '0')) / 1000.0;
$files = array_values(array_filter(explode("\n", (string)file_get_contents('php://input')), 'strlen'));
echo "{\"start\":" . count($files) . "}\n";
$full = false;
foreach ($files as $n => $f) {
  if (microtime(true) - $t0 > $budget) { echo json_encode(['end' => $n, 'why' => 'budget']) . "\n"; return; }
  if (opcache_is_script_cached($f)) { echo json_encode(['i' => $n, 'r' => 'already']) . "\n"; continue; }
  error_clear_last();
  try { $ok = @opcache_compile_file($f); }
  catch (\Throwable $e) { echo json_encode(['i' => $n, 'r' => 'failed', 'm' => get_class($e) . ': ' . $e->getMessage()], JSON_INVALID_UTF8_SUBSTITUTE) . "\n"; continue; }
  if (!$ok) { $e = error_get_last(); echo json_encode(['i' => $n, 'r' => 'failed', 'm' => $e['message'] ?? 'opcache_compile_file() returned false'], JSON_INVALID_UTF8_SUBSTITUTE) . "\n"; continue; }
  if (opcache_is_script_cached($f)) { echo json_encode(['i' => $n, 'r' => 'compiled']) . "\n"; continue; }
  echo json_encode(['i' => $n, 'r' => 'not_cached']) . "\n";
  $s = @opcache_get_status(false);
  if (is_array($s) && !empty($s['cache_full'])) { echo json_encode(['end' => $n + 1, 'why' => 'cache_full']) . "\n"; return; }
}
echo json_encode(['end' => count($files), 'why' => 'done']) . "\n";
"#;

const SNIPPET_INVALIDATE: &str = r#"$files = array_values(array_filter(explode("\n", (string)file_get_contents('php://input')), 'strlen'));
$done = 0; $absent = 0;
foreach ($files as $f) { if (opcache_is_script_cached($f)) { if (opcache_invalidate($f, true)) { $done++; } } else { $absent++; } }
echo json_encode(['ok' => true, 'invalidated' => $done, 'not_cached' => $absent]);
"#;

const SNIPPET_RESET: &str = r#"echo json_encode(['ok' => (bool)opcache_reset()]);
"#;

/// The snippet directory, checked and (re)written. Nothing is run from it until this passed.
fn prepare_snippets(dir: &Path) -> Result<(), OpcacheError> {
    let unsafe_dir = |problem: String| OpcacheError::UnsafeDir {
        dir: dir.to_path_buf(),
        problem,
    };
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .create(dir)
                .map_err(|e| unsafe_dir(format!("cannot create it: {e}")))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| unsafe_dir(format!("cannot set its mode: {e}")))?;
        }
        Err(e) => return Err(unsafe_dir(format!("cannot inspect it: {e}"))),
        Ok(_) => {}
    }
    let md = std::fs::symlink_metadata(dir).map_err(|e| unsafe_dir(e.to_string()))?;
    if !md.file_type().is_dir() {
        return Err(unsafe_dir("not a directory (a symlink?)".into()));
    }
    let me = rustix::process::geteuid().as_raw();
    if md.uid() != me {
        return Err(unsafe_dir(format!(
            "owned by uid {}, not bgagent's uid {me}",
            md.uid()
        )));
    }
    if md.mode() & 0o022 != 0 {
        return Err(unsafe_dir(format!(
            "mode {:04o} lets others write",
            md.mode() & 0o7777
        )));
    }
    for s in Snippet::ALL {
        let path = dir.join(s.file_name());
        let body = format!("{SNIPPET_HEAD}{}", s.source());
        let same = std::fs::symlink_metadata(&path)
            .ok()
            .filter(|m| m.file_type().is_file() && m.uid() == me && m.mode() & 0o7777 == 0o644)
            .and_then(|_| std::fs::read(&path).ok())
            .is_some_and(|b| b == body.as_bytes());
        if !same {
            crate::fsutil::write_atomic(&path, body.as_bytes(), 0o644)
                .map_err(|source| OpcacheError::Write { path, source })?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Typed answers

/// What `opcache_get_status()` says about the pool, as the status snippet reduces it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
pub struct OpcacheStatus {
    /// The snippet that answered (its path as PHP saw it).
    pub snippet: String,
    pub pid: u32,
    pub enabled: bool,
    pub cache_full: bool,
    pub restart_pending: bool,
    pub used_memory: u64,
    pub free_memory: u64,
    pub wasted_memory: u64,
    pub cached_scripts: u64,
    pub cached_keys: u64,
    pub max_cached_keys: u64,
    pub hits: u64,
    pub misses: u64,
    pub start_time: u64,
    pub interned_used: u64,
    pub interned_free: u64,
    pub validate_timestamps: bool,
    pub file_update_protection: u64,
    /// Empty unless asked for.
    pub scripts: Vec<CachedScript>,
}

/// One cached script: (full path, memory, hits), as the snippet lists it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct CachedScript(pub String, pub u64, pub u64);

impl CachedScript {
    pub fn path(&self) -> &str {
        &self.0
    }
    pub fn memory(&self) -> u64 {
        self.1
    }
    pub fn hits(&self) -> u64 {
        self.2
    }
}

impl OpcacheStatus {
    pub fn total_memory(&self) -> u64 {
        self.used_memory + self.free_memory + self.wasted_memory
    }
    pub fn wasted_percent(&self) -> f64 {
        percent(self.wasted_memory, self.total_memory())
    }
    pub fn hit_rate(&self) -> f64 {
        percent(self.hits, self.hits + self.misses)
    }
    pub fn free_keys(&self) -> u64 {
        self.max_cached_keys.saturating_sub(self.cached_keys)
    }
}

fn percent(a: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        a as f64 * 100.0 / total as f64
    }
}

#[derive(Deserialize)]
struct Failure {
    ok: bool,
    #[serde(default)]
    error: String,
}

/// What one precompile run did.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct CompileReport {
    /// Files asked for.
    pub listed: usize,
    pub compiled: usize,
    /// Already in opcache (compiled by an earlier run or by a request).
    pub already: usize,
    /// Compiled but not kept: opcache full, or the file is younger than
    /// `opcache.file_update_protection` seconds.
    pub not_cached: usize,
    /// Left out: the budget ran out or opcache filled up. They compile on first request.
    pub skipped: usize,
    pub failed: usize,
    /// The first few failures: (path, message).
    pub failures: Vec<(String, String)>,
    pub cache_full: bool,
    pub budget_exhausted: bool,
    pub ms: u64,
}

impl CompileReport {
    fn absorb(&mut self, o: CompileReport) {
        self.compiled += o.compiled;
        self.already += o.already;
        self.not_cached += o.not_cached;
        self.skipped += o.skipped;
        self.failed += o.failed;
        for f in o.failures {
            if self.failures.len() < MAX_FAILURES_KEPT {
                self.failures.push(f);
            }
        }
        self.cache_full |= o.cache_full;
        self.budget_exhausted |= o.budget_exhausted;
    }

    /// One line for the event log.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} compiled, {} already cached, {} failed, {} skipped, {} not kept, of {} in {} ms",
            self.compiled,
            self.already,
            self.failed,
            self.skipped,
            self.not_cached,
            self.listed,
            self.ms
        );
        if self.budget_exhausted {
            s.push_str(" (time budget ran out)");
        }
        if self.cache_full {
            s.push_str(" (opcache is full)");
        }
        s
    }
}

const MAX_FAILURES_KEPT: usize = 10;

#[derive(Deserialize)]
#[serde(untagged)]
enum CompileLine {
    Start {
        #[allow(dead_code)]
        start: usize,
    },
    File {
        i: usize,
        r: String,
        #[serde(default)]
        m: String,
    },
    End {
        end: usize,
        why: String,
    },
}

/// Reads the compile snippet's lines for the batch `files`. Returns the report and the index
/// the batch stopped at without an `end` line (a fatal error), if it did. Pure.
fn read_compile_lines(files: &[PathBuf], text: &str) -> (CompileReport, Option<usize>) {
    let mut r = CompileReport::default();
    let mut next = 0usize;
    for line in text.lines().filter(|l| l.starts_with('{')) {
        match serde_json::from_str::<CompileLine>(line) {
            Ok(CompileLine::Start { .. }) => {}
            Ok(CompileLine::File { i, r: res, m }) => {
                next = i + 1;
                match res.as_str() {
                    "compiled" => r.compiled += 1,
                    "already" => r.already += 1,
                    "not_cached" => r.not_cached += 1,
                    _ => {
                        r.failed += 1;
                        if r.failures.len() < MAX_FAILURES_KEPT {
                            let p = files.get(i).map(|p| p.display().to_string());
                            r.failures.push((p.unwrap_or_default(), m));
                        }
                    }
                }
            }
            Ok(CompileLine::End { end, why }) => {
                r.skipped += files.len().saturating_sub(end);
                r.cache_full = why == "cache_full";
                r.budget_exhausted = why == "budget";
                return (r, None);
            }
            Err(_) => {}
        }
    }
    (r, Some(next))
}

// ---------------------------------------------------------------------------------------
// The pool

/// One php-fpm pool reached over FastCGI, with the deadlines every call gets.
#[derive(Debug, Clone)]
pub struct Pool {
    pub addr: Addr,
    pub snippet_dir: PathBuf,
    pub connect_timeout: Duration,
    pub timeout: Duration,
}

/// A snippet's answer.
struct Answer {
    status: u16,
    body: String,
    stderr: String,
}

impl Answer {
    fn error(&self, addr: &Addr, snippet: Snippet) -> OpcacheError {
        let mut message = crate::text::truncate(self.body.trim(), 300);
        if !self.stderr.trim().is_empty() {
            message = format!(
                "{message} ({})",
                crate::text::truncate(self.stderr.trim(), 300)
            );
        }
        if self.status == 404 {
            message.push_str(
                "; the pool's user must be able to read the snippet directory, and the pool must not be chrooted or limited by open_basedir",
            );
        }
        OpcacheError::Php {
            addr: addr.to_string(),
            snippet: snippet.file_name().into(),
            status: self.status,
            message,
        }
    }
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

impl Pool {
    pub fn new(addr: Addr, cfg: &OpcacheConfig) -> Pool {
        Pool {
            addr,
            snippet_dir: cfg.snippet_dir.clone(),
            connect_timeout: cfg.connect_timeout,
            timeout: cfg.timeout,
        }
    }

    async fn connect(&self) -> Result<Box<dyn Stream>, OpcacheError> {
        let addr = self.addr.to_string();
        let fut = async {
            Ok::<Box<dyn Stream>, std::io::Error>(match &self.addr {
                Addr::Unix(p) => Box::new(tokio::net::UnixStream::connect(p).await?),
                Addr::Tcp(a) => Box::new(tokio::net::TcpStream::connect(a.as_str()).await?),
            })
        };
        match tokio::time::timeout(self.connect_timeout, fut).await {
            Err(_) => Err(OpcacheError::ConnectTimeout {
                addr,
                after: self.connect_timeout,
            }),
            Ok(Err(source)) => Err(OpcacheError::Connect { addr, source }),
            Ok(Ok(s)) => Ok(s),
        }
    }

    /// Runs `snippet` in the pool with `body` on its stdin; returns its output (after the
    /// CGI headers). Both deadlines apply. An answer other than 200 is an error.
    async fn run(
        &self,
        snippet: Snippet,
        extra: &[(&str, String)],
        body: &[u8],
    ) -> Result<String, OpcacheError> {
        let a = self.exchange(snippet, extra, body).await?;
        if a.status != 200 {
            return Err(a.error(&self.addr, snippet));
        }
        Ok(a.body)
    }

    /// One FastCGI request: the HTTP status, the output after the CGI headers, and what PHP
    /// wrote to stderr.
    async fn exchange(
        &self,
        snippet: Snippet,
        extra: &[(&str, String)],
        body: &[u8],
    ) -> Result<Answer, OpcacheError> {
        prepare_snippets(&self.snippet_dir)?;
        let stream = self.connect().await?;
        let script = self.snippet_dir.join(snippet.file_name());
        let script = script.to_string_lossy().into_owned();
        let name = format!("/{}", snippet.file_name());
        let dir = self.snippet_dir.to_string_lossy().into_owned();
        let mut params = Params::default()
            .request_method("POST")
            .script_filename(script)
            .script_name(name.clone())
            .request_uri(name.clone())
            .document_uri(name)
            .document_root(dir)
            .remote_addr("127.0.0.1")
            .remote_port(0)
            .server_addr("127.0.0.1")
            .server_port(0)
            .server_name("bgagent")
            .content_type("text/plain")
            .content_length(body.len());
        for (k, v) in extra {
            params = params.custom(k.to_string(), v.clone());
        }
        let client = Client::new_tokio(stream);
        let addr = self.addr.to_string();
        let out = tokio::time::timeout(
            self.timeout,
            client.execute_once(Request::new(params, body)),
        )
        .await
        .map_err(|_| OpcacheError::Timeout {
            addr: addr.clone(),
            snippet: snippet.file_name().into(),
            after: self.timeout,
        })?
        .map_err(|source| OpcacheError::Protocol {
            addr: addr.clone(),
            source,
        })?;
        let stdout =
            String::from_utf8_lossy(out.stdout.as_deref().unwrap_or_default()).into_owned();
        let stderr =
            String::from_utf8_lossy(out.stderr.as_deref().unwrap_or_default()).into_owned();
        let (head, body) = stdout
            .split_once("\r\n\r\n")
            .unwrap_or(("", stdout.as_str()));
        let status = head
            .lines()
            .find_map(|l| l.strip_prefix("Status:"))
            .and_then(|s| s.trim().split(' ').next()?.parse::<u16>().ok())
            .unwrap_or(200);
        Ok(Answer {
            status,
            body: body.to_string(),
            stderr,
        })
    }

    fn parse<T: for<'de> Deserialize<'de>>(
        &self,
        snippet: Snippet,
        body: &str,
    ) -> Result<T, OpcacheError> {
        let parse_err = |message: String| OpcacheError::Parse {
            addr: self.addr.to_string(),
            snippet: snippet.file_name().into(),
            message,
            head: crate::text::truncate(body.trim(), 200),
        };
        let f: Failure = serde_json::from_str(body).map_err(|e| parse_err(e.to_string()))?;
        if !f.ok {
            return Err(OpcacheError::Snippet {
                addr: self.addr.to_string(),
                snippet: snippet.file_name().into(),
                message: f.error,
            });
        }
        serde_json::from_str(body).map_err(|e| parse_err(e.to_string()))
    }

    /// The pool's opcache; with `scripts`, every cached script too.
    pub async fn status(&self, scripts: bool) -> Result<OpcacheStatus, OpcacheError> {
        let flag = if scripts { "1" } else { "0" }.to_string();
        let body = self
            .run(Snippet::Status, &[("BGAGENT_SCRIPTS", flag)], b"")
            .await?;
        self.parse(Snippet::Status, &body)
    }

    /// After a reload: waits (until `within` passes) for the pool to answer from a new opcache
    /// (its start time differs from `old_start`). A reload returns before the old workers have
    /// finished their last requests; a precompile sent before this would fill the opcache
    /// that is about to go away. Returns whether the new opcache answered.
    pub async fn wait_fresh(&self, old_start: u64, within: Duration) -> bool {
        let t0 = Instant::now();
        loop {
            if let Ok(s) = self.status(false).await
                && s.start_time != old_start
            {
                return true;
            }
            if t0.elapsed() >= within {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Invalidates `files` (forced); returns how many were cached and are now invalid.
    pub async fn invalidate(&self, files: &[PathBuf]) -> Result<u64, OpcacheError> {
        #[derive(Deserialize)]
        struct Answer {
            invalidated: u64,
        }
        let mut n = 0;
        for chunk in files.chunks(2000) {
            let body = self
                .run(Snippet::Invalidate, &[], list_body(chunk).as_bytes())
                .await?;
            n += self
                .parse::<Answer>(Snippet::Invalidate, &body)?
                .invalidated;
        }
        Ok(n)
    }

    /// `opcache_reset()`: the whole cache is emptied once no request uses it.
    pub async fn reset(&self) -> Result<(), OpcacheError> {
        let body = self.run(Snippet::Reset, &[], b"").await?;
        #[derive(Deserialize)]
        struct Answer {}
        self.parse::<Answer>(Snippet::Reset, &body).map(|_| ())
    }

    /// Compiles one batch; a fatal error inside a file ends the request, so the rest of the
    /// batch is retried after that file (bounded: each retry makes progress).
    async fn compile_batch(
        &self,
        files: &[PathBuf],
        deadline: Instant,
    ) -> Result<CompileReport, OpcacheError> {
        let mut total = CompileReport::default();
        let mut from = 0;
        while from < files.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                total.skipped += files.len() - from;
                total.budget_exhausted = true;
                break;
            }
            let part = &files[from..];
            let budget_ms = left.as_millis().to_string();
            // A compile error sets the answer's status to 500 and the snippet goes on: its
            // lines are read whatever the status.
            let a = self
                .exchange(
                    Snippet::Compile,
                    &[("BGAGENT_BUDGET_MS", budget_ms)],
                    list_body(part).as_bytes(),
                )
                .await?;
            let body = a.body.as_str();
            if !body.contains("{\"start\":") {
                if a.status != 200 {
                    return Err(a.error(&self.addr, Snippet::Compile));
                }
                // Not the compile snippet's output: an error page, a disabled opcache.
                let f: Result<Failure, _> = serde_json::from_str(&body);
                return Err(OpcacheError::Snippet {
                    addr: self.addr.to_string(),
                    snippet: Snippet::Compile.file_name().into(),
                    message: match f {
                        Ok(f) => f.error,
                        Err(_) => crate::text::truncate(body.trim(), 300),
                    },
                });
            }
            let (r, died_at) = read_compile_lines(part, body);
            total.absorb(r);
            match died_at {
                None => break,
                Some(i) => {
                    total.failed += 1;
                    if total.failures.len() < MAX_FAILURES_KEPT {
                        total.failures.push((
                            part.get(i)
                                .map(|p| p.display().to_string())
                                .unwrap_or_default(),
                            "a fatal error while compiling ended the request (see php-fpm's log)"
                                .into(),
                        ));
                    }
                    from += i + 1;
                }
            }
        }
        Ok(total)
    }
}

fn list_body(files: &[PathBuf]) -> String {
    let mut s = String::new();
    for f in files {
        // A newline inside a name would split it; such files are never cached by path anyway.
        if let Some(t) = f.to_str().filter(|t| !t.contains('\n')) {
            s.push_str(t);
            s.push('\n');
        }
    }
    s
}

/// Compiles `files` into the pool's opcache within `budget`, `concurrency` FastCGI requests
/// of `batch` files at a time, hottest first (the order given). A batch that cannot run (the
/// pool stopped answering) stops the whole run with its error.
pub async fn precompile(
    pool: &Pool,
    files: &[PathBuf],
    budget: Duration,
    batch: usize,
    concurrency: usize,
) -> Result<CompileReport, OpcacheError> {
    let t0 = Instant::now();
    let deadline = t0 + budget;
    let pool = Arc::new(pool.clone());
    let batches: Vec<Vec<PathBuf>> = files.chunks(batch.max(1)).map(|c| c.to_vec()).collect();
    let mut total = CompileReport {
        listed: files.len(),
        ..Default::default()
    };
    let mut set = tokio::task::JoinSet::new();
    let mut queue = batches.into_iter();
    let mut err = None;
    loop {
        while set.len() < concurrency.max(1) && err.is_none() && !total.cache_full {
            let Some(b) = queue.next() else { break };
            let p = pool.clone();
            set.spawn(async move {
                let n = b.len();
                (n, p.compile_batch(&b, deadline).await)
            });
        }
        let Some(done) = set.join_next().await else {
            break;
        };
        match done {
            Ok((_, Ok(r))) => total.absorb(r),
            Ok((n, Err(e))) => {
                total.skipped += n;
                err.get_or_insert(e);
            }
            Err(e) => {
                err.get_or_insert(OpcacheError::Snippet {
                    addr: pool.addr.to_string(),
                    snippet: Snippet::Compile.file_name().into(),
                    message: format!("the precompile task failed: {e}"),
                });
            }
        }
    }
    // Batches never started (opcache full, an error) are skipped.
    total.skipped += queue.map(|b| b.len()).sum::<usize>();
    total.ms = t0.elapsed().as_millis() as u64;
    match err {
        Some(e) if total.compiled + total.already == 0 => Err(e),
        _ => Ok(total),
    }
}

// ---------------------------------------------------------------------------------------
// Pure decisions

/// The scripts of the release at `old_root` that opcache holds, mapped to the same relative
/// paths under `new_root`, hottest first: (new path, memory the old copy takes). `old_roots`
/// are the spellings of the old release's directory PHP may have used (the path as
/// configured and its real path). Pure.
pub fn hot_set(
    scripts: &[CachedScript],
    old_roots: &[PathBuf],
    new_root: &Path,
) -> Vec<(PathBuf, u64)> {
    let mut hits: Vec<(&CachedScript, PathBuf)> = scripts
        .iter()
        .filter_map(|s| {
            let p = Path::new(s.path());
            old_roots
                .iter()
                .find_map(|r| p.strip_prefix(r).ok())
                .filter(|rel| !rel.as_os_str().is_empty())
                .map(|rel| (s, new_root.join(rel)))
        })
        .collect();
    hits.sort_by(|a, b| b.0.hits().cmp(&a.0.hits()).then(a.1.cmp(&b.1)));
    hits.into_iter().map(|(s, p)| (p, s.memory())).collect()
}

/// Cached scripts per release id, for status and for invalidating retired releases:
/// id -> (scripts, memory). Scripts outside `releases_dirs` are counted under "".
pub fn by_release(
    scripts: &[CachedScript],
    releases_dirs: &[PathBuf],
) -> BTreeMap<String, ReleaseCache> {
    let mut out: BTreeMap<String, ReleaseCache> = BTreeMap::new();
    for s in scripts {
        let id = release_of(Path::new(s.path()), releases_dirs).unwrap_or_default();
        let e = out.entry(id).or_default();
        e.scripts += 1;
        e.memory += s.memory();
    }
    out
}

/// The release id a cached path belongs to, if it lies in a releases directory.
pub fn release_of(path: &Path, releases_dirs: &[PathBuf]) -> Option<String> {
    releases_dirs.iter().find_map(|d| {
        let rel = path.strip_prefix(d).ok()?;
        let first = rel.components().next()?;
        Some(first.as_os_str().to_string_lossy().into_owned())
    })
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct ReleaseCache {
    pub scripts: u64,
    pub memory: u64,
}

/// What the new release is expected to take in opcache.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Need {
    pub memory: u64,
    pub keys: u64,
}

/// Estimates what `files` will take: files the old release has cached cost what their old
/// copies cost; others cost the average cached script. Keys scale by the pool's keys per
/// script (a script can have more than one key). Pure.
pub fn estimate_need(status: &OpcacheStatus, hot: &[(PathBuf, u64)], extra_files: usize) -> Need {
    let avg = if status.cached_scripts == 0 {
        0
    } else {
        status.used_memory / status.cached_scripts
    };
    let scripts = (hot.len() + extra_files) as u64;
    let keys_per_script = if status.cached_scripts == 0 {
        1.0
    } else {
        (status.cached_keys as f64 / status.cached_scripts as f64).max(1.0)
    };
    Need {
        memory: hot.iter().map(|(_, m)| *m).sum::<u64>() + avg * extra_files as u64,
        keys: (scripts as f64 * keys_per_script).ceil() as u64,
    }
}

/// How a switch treats php-fpm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Plan {
    /// Precompile, switch, no reload.
    Warm,
    /// Reload before the switch, precompile into the fresh opcache, switch, no reload.
    ReloadThenWarm,
    /// Today's: switch, then reload.
    ReloadAfterSwitch,
}

impl Plan {
    pub fn describe(self) -> &'static str {
        match self {
            Plan::Warm => "switch without a php-fpm reload",
            Plan::ReloadThenWarm => "reload php-fpm before the switch, precompile, then switch",
            Plan::ReloadAfterSwitch => "switch, then reload php-fpm",
        }
    }
}

/// The choice for one pool, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub plan: Plan,
    pub reason: String,
}

/// Chooses how to switch. `status`: the pool's opcache, or why it could not be read;
/// `reclaim`: a reclaiming reload scheduled for this deploy. Pure.
pub fn decide(
    cfg: &OpcacheConfig,
    status: Result<&OpcacheStatus, &str>,
    need: Need,
    reclaim: Option<&str>,
) -> Decision {
    let d = |plan, reason: String| Decision { plan, reason };
    if cfg.switch == SwitchMode::Reload {
        return d(Plan::ReloadAfterSwitch, "opcache.switch is `reload`".into());
    }
    let s = match status {
        Err(e) => {
            return d(
                Plan::ReloadAfterSwitch,
                format!("the pool's opcache could not be read ({e})"),
            );
        }
        Ok(s) => s,
    };
    if !s.enabled {
        return d(Plan::ReloadAfterSwitch, "opcache is off in the pool".into());
    }
    if cfg.reload == ReloadPolicy::Always {
        return d(Plan::ReloadThenWarm, "opcache.reload is `always`".into());
    }
    if let Some(r) = reclaim.filter(|_| cfg.reclaim_at == ReclaimAt::NextDeploy) {
        return d(Plan::ReloadThenWarm, format!("a reclaim is due: {r}"));
    }
    let free_after = s.free_memory.saturating_sub(need.memory);
    let keys_after = s.free_keys().saturating_sub(need.keys);
    if s.free_memory < need.memory + cfg.min_free_memory {
        return d(
            Plan::ReloadThenWarm,
            format!(
                "opcache lacks room for both releases: {} free, the new release needs about {}, and {} must stay free (opcache.min_free_memory)",
                mib(s.free_memory),
                mib(need.memory),
                mib(cfg.min_free_memory)
            ),
        );
    }
    if s.free_keys() < need.keys + cfg.min_free_keys {
        return d(
            Plan::ReloadThenWarm,
            format!(
                "opcache lacks keys for both releases: {} free of {}, the new release needs about {}, and {} must stay free (opcache.min_free_keys)",
                s.free_keys(),
                s.max_cached_keys,
                need.keys,
                cfg.min_free_keys
            ),
        );
    }
    d(
        Plan::Warm,
        format!(
            "opcache has room for both releases: {} and {} keys free after the new release's {} and {} keys",
            mib(free_after),
            keys_after,
            mib(need.memory),
            need.keys
        ),
    )
}

/// After a precompile for a no-reload switch: Some(reason) when the switch must reload after
/// all (opcache filled up: the rest of the new release could not be cached). Pure.
pub fn after_precompile(
    cfg: &OpcacheConfig,
    report: &CompileReport,
    status: &OpcacheStatus,
) -> Option<String> {
    if report.cache_full || status.cache_full {
        return Some("opcache filled up during the precompile".into());
    }
    if status.free_memory < cfg.min_free_memory {
        return Some(format!(
            "only {} of opcache memory is free after the precompile (opcache.min_free_memory is {})",
            mib(status.free_memory),
            mib(cfg.min_free_memory)
        ));
    }
    None
}

/// A reclaiming reload is due when wasted memory passed the threshold. Pure.
pub fn reclaim_due(cfg: &OpcacheConfig, status: &OpcacheStatus) -> Option<String> {
    if cfg.reclaim_at == ReclaimAt::Never {
        return None;
    }
    let w = status.wasted_percent();
    (status.wasted_memory > 0 && w >= cfg.reclaim_wasted_percent).then(|| {
        format!(
            "wasted opcache memory is {w:.1}% ({}), at or above opcache.reclaim_wasted_percent {}%",
            mib(status.wasted_memory),
            cfg.reclaim_wasted_percent
        )
    })
}

/// `HH:MM-HH:MM` as (start, end) minutes of the day. Pure.
pub fn parse_window(s: &str) -> Result<(u32, u32), String> {
    let bad = || format!("`{s}` is not a window such as \"02:00-04:00\" (UTC, HH:MM-HH:MM)");
    let minutes = |t: &str| -> Option<u32> {
        let (h, m) = t.trim().split_once(':')?;
        let (h, m) = (h.parse::<u32>().ok()?, m.parse::<u32>().ok()?);
        (h <= 24 && m < 60 && h * 60 + m <= 1440).then_some(h * 60 + m)
    };
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let (a, b) = (minutes(a).ok_or_else(bad)?, minutes(b).ok_or_else(bad)?);
    if a == b {
        return Err(bad());
    }
    Ok((a, b))
}

/// Whether `minute` (of the day) lies in the window; a window may pass midnight. Pure.
pub fn in_window((start, end): (u32, u32), minute: u32) -> bool {
    if start < end {
        (start..end).contains(&minute)
    } else {
        minute >= start || minute < end
    }
}

pub fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1048576.0)
}

// ---------------------------------------------------------------------------------------
// What the state file keeps (status shows it)

/// One pool's opcache as bgagent last saw it and last used it.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct PoolRecord {
    /// The FastCGI address.
    pub fastcgi: String,
    /// The last switch's choice for this pool.
    #[serde(default)]
    pub last_switch: Option<SwitchRecord>,
    /// The opcache after the last step that read it.
    #[serde(default)]
    pub snapshot: Option<Snapshot>,
    /// Why a reclaiming reload is due (wasted memory past the threshold); it runs in the
    /// next deploy's pre-switch phase.
    #[serde(default)]
    pub reclaim_due: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct SwitchRecord {
    pub at: String,
    pub release: String,
    pub plan: Option<Plan>,
    /// Why this plan.
    pub reason: String,
    /// The precompile before the switch, when one ran.
    #[serde(default)]
    pub precompile: Option<CompileReport>,
    /// php-fpm reloaded: `before_switch`, `after_switch`, or none.
    #[serde(default)]
    pub reloaded: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct Snapshot {
    pub at: String,
    pub used_memory: u64,
    pub free_memory: u64,
    pub wasted_memory: u64,
    pub wasted_percent: f64,
    pub cached_scripts: u64,
    pub cached_keys: u64,
    pub max_cached_keys: u64,
    pub hit_rate: f64,
    /// Cached scripts per release id (scripts outside the releases directory under "").
    pub releases: BTreeMap<String, ReleaseCache>,
}

impl Snapshot {
    /// `releases` counted only when the status listed the scripts.
    pub fn of(s: &OpcacheStatus, releases_dirs: &[PathBuf], at: String) -> Snapshot {
        Snapshot {
            at,
            used_memory: s.used_memory,
            free_memory: s.free_memory,
            wasted_memory: s.wasted_memory,
            wasted_percent: (s.wasted_percent() * 10.0).round() / 10.0,
            cached_scripts: s.cached_scripts,
            cached_keys: s.cached_keys,
            max_cached_keys: s.max_cached_keys,
            hit_rate: (s.hit_rate() * 10.0).round() / 10.0,
            releases: by_release(&s.scripts, releases_dirs),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Globs

/// Files under `root` matching the release-relative `globs` (`*`, `?` within a segment,
/// `**` for any number of directories), sorted. Symlinks are not followed (a release's
/// vendor links must not lead the walk outside it). Files only.
pub fn glob_files(root: &Path, globs: &[String]) -> Vec<PathBuf> {
    let mut out = BTreeSet::new();
    for g in globs {
        let segs: Vec<&str> = g.split('/').filter(|s| !s.is_empty()).collect();
        walk(root, &segs, &mut out, 0);
    }
    out.into_iter().collect()
}

fn walk(dir: &Path, segs: &[&str], out: &mut BTreeSet<PathBuf>, depth: usize) {
    if depth > 64 {
        return;
    }
    let Some((first, rest)) = segs.split_first() else {
        return;
    };
    if *first == "**" {
        // zero directories
        walk(dir, rest, out, depth + 1);
        // one or more
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), segs, out, depth + 1);
                }
            }
        }
        return;
    }
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if !seg_match(first.as_bytes(), name.as_bytes()) {
            continue;
        }
        let Ok(t) = e.file_type() else { continue };
        if rest.is_empty() {
            if t.is_file() {
                out.insert(e.path());
            }
        } else if t.is_dir() {
            walk(&e.path(), rest, out, depth + 1);
        }
    }
}

/// `*` and `?` within one path segment. Pure.
fn seg_match(p: &[u8], s: &[u8]) -> bool {
    match (p.split_first(), s.split_first()) {
        (None, None) => true,
        (Some((b'*', pr)), _) => seg_match(pr, s) || (!s.is_empty() && seg_match(p, &s[1..])),
        (Some((b'?', pr)), Some((_, sr))) => seg_match(pr, sr),
        (Some((a, pr)), Some((b, sr))) if a == b => seg_match(pr, sr),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(free: u64, keys: u64, max_keys: u64) -> OpcacheStatus {
        OpcacheStatus {
            enabled: true,
            used_memory: 10 << 20,
            free_memory: free,
            cached_scripts: 100,
            cached_keys: keys,
            max_cached_keys: max_keys,
            ..Default::default()
        }
    }

    fn warm() -> OpcacheConfig {
        OpcacheConfig {
            switch: SwitchMode::Warm,
            min_free_memory: 1 << 20,
            min_free_keys: 10,
            ..Default::default()
        }
    }

    #[test]
    fn addresses_parse_and_bad_ones_say_what_to_write() {
        assert_eq!(
            Addr::parse("unix:/run/php/fpm.sock"),
            Ok(Addr::Unix("/run/php/fpm.sock".into()))
        );
        assert_eq!(
            Addr::parse("/run/php/fpm.sock"),
            Ok(Addr::Unix("/run/php/fpm.sock".into()))
        );
        assert_eq!(
            Addr::parse("127.0.0.1:9000"),
            Ok(Addr::Tcp("127.0.0.1:9000".into()))
        );
        assert!(Addr::parse("php-fpm").unwrap_err().contains("unix:"));
    }

    #[test]
    fn decide_auto_is_warm_for_a_pool_with_an_address() {
        let d = decide(
            &OpcacheConfig::default(),
            Ok(&st(64 << 20, 0, 1000)),
            Need::default(),
            None,
        );
        assert_eq!(d.plan, Plan::Warm, "{}", d.reason);
    }

    #[test]
    fn decide_reload_mode_never_talks_of_room() {
        let cfg = OpcacheConfig {
            switch: SwitchMode::Reload,
            ..Default::default()
        };
        let d = decide(&cfg, Err("x"), Need::default(), None);
        assert_eq!(d.plan, Plan::ReloadAfterSwitch);
        assert!(d.reason.contains("`reload`"));
    }

    #[test]
    fn decide_warm_when_room_reload_first_when_short() {
        let cfg = warm();
        let need = Need {
            memory: 4 << 20,
            keys: 100,
        };
        let d = decide(&cfg, Ok(&st(8 << 20, 100, 1000)), need, None);
        assert_eq!(d.plan, Plan::Warm, "{}", d.reason);
        let d = decide(&cfg, Ok(&st(5 << 20 - 1, 100, 1000)), need, None);
        assert_eq!(d.plan, Plan::ReloadThenWarm);
        assert!(d.reason.contains("lacks room"), "{}", d.reason);
        let d = decide(&cfg, Ok(&st(64 << 20, 900, 1000)), need, None);
        assert_eq!(d.plan, Plan::ReloadThenWarm);
        assert!(d.reason.contains("lacks keys"), "{}", d.reason);
    }

    #[test]
    fn decide_unreadable_pool_or_off_opcache_takes_the_reload_path_with_the_reason() {
        let d = decide(&warm(), Err("connection refused"), Need::default(), None);
        assert_eq!(d.plan, Plan::ReloadAfterSwitch);
        assert!(d.reason.contains("connection refused"));
        let mut s = st(64 << 20, 0, 1000);
        s.enabled = false;
        assert_eq!(
            decide(&warm(), Ok(&s), Need::default(), None).plan,
            Plan::ReloadAfterSwitch
        );
    }

    #[test]
    fn decide_always_and_reclaim_reload_before_the_switch() {
        let mut cfg = warm();
        let s = st(64 << 20, 0, 1000);
        assert_eq!(
            decide(&cfg, Ok(&s), Need::default(), Some("wasted 20%")).plan,
            Plan::ReloadThenWarm
        );
        cfg.reload = ReloadPolicy::Always;
        assert_eq!(
            decide(&cfg, Ok(&s), Need::default(), None).plan,
            Plan::ReloadThenWarm
        );
    }

    #[test]
    fn hot_set_maps_old_paths_to_new_hottest_first() {
        let scripts = vec![
            CachedScript("/app/releases/A/pub/index.php".into(), 100, 5),
            CachedScript("/real/app/releases/A/vendor/x.php".into(), 200, 50),
            CachedScript("/app/releases/B/other.php".into(), 300, 99),
            CachedScript("/elsewhere/x.php".into(), 1, 1),
        ];
        let hot = hot_set(
            &scripts,
            &["/app/releases/A".into(), "/real/app/releases/A".into()],
            Path::new("/app/releases/C"),
        );
        assert_eq!(
            hot,
            vec![
                (PathBuf::from("/app/releases/C/vendor/x.php"), 200),
                (PathBuf::from("/app/releases/C/pub/index.php"), 100)
            ]
        );
        let by = by_release(&scripts, &["/app/releases".into()]);
        assert_eq!(by["A"].scripts, 1);
        assert_eq!(by["B"].memory, 300);
        assert_eq!(by[""].scripts, 2);
    }

    #[test]
    fn need_uses_old_costs_and_the_average_for_new_files() {
        let s = st(0, 200, 1000); // 100 scripts, 10 MiB used, 2 keys a script
        let n = estimate_need(&s, &[("/a".into(), 1000), ("/b".into(), 3000)], 10);
        assert_eq!(n.memory, 4000 + 10 * ((10 << 20) / 100));
        assert_eq!(n.keys, 24);
    }

    #[test]
    fn compile_lines_count_and_a_fatal_error_points_at_the_file() {
        let files: Vec<PathBuf> = ["/a", "/b", "/c", "/d"].iter().map(PathBuf::from).collect();
        let ok = "{\"start\":4}\n{\"i\":0,\"r\":\"compiled\"}\n{\"i\":1,\"r\":\"already\"}\n{\"i\":2,\"r\":\"failed\",\"m\":\"ParseError: x\"}\n{\"end\":3,\"why\":\"budget\"}\n";
        let (r, died) = read_compile_lines(&files, ok);
        assert_eq!(died, None);
        assert_eq!((r.compiled, r.already, r.failed, r.skipped), (1, 1, 1, 1));
        assert!(r.budget_exhausted);
        assert_eq!(r.failures[0].0, "/c");
        let fatal = "{\"start\":4}\n{\"i\":0,\"r\":\"compiled\"}\nPHP Fatal error";
        let (r, died) = read_compile_lines(&files, fatal);
        assert_eq!((r.compiled, died), (1, Some(1)));
    }

    #[test]
    fn reclaim_windows_parse_and_may_pass_midnight() {
        assert_eq!(parse_window("02:00-04:30"), Ok((120, 270)));
        assert!(parse_window("2-4").unwrap_err().contains("HH:MM-HH:MM"));
        assert!(parse_window("03:00-03:00").is_err());
        assert!(parse_window("25:00-03:00").is_err());
        assert!(in_window((120, 270), 120) && !in_window((120, 270), 270));
        assert!(in_window((1380, 60), 1439) && in_window((1380, 60), 0));
        assert!(!in_window((1380, 60), 61));
        assert!(in_window((0, 1440), 0) && in_window((0, 1440), 1439));
        let mut c = OpcacheConfig {
            reclaim_at: ReclaimAt::Window,
            ..Default::default()
        };
        assert!(!c.validate(Path::new("/app")).is_empty());
        c.reclaim_window = Some("01:00-02:00".into());
        assert!(c.validate(Path::new("/app")).is_empty());
    }

    #[test]
    fn a_due_reclaim_reloads_in_the_deploy_only_with_next_deploy() {
        let mut cfg = warm();
        let s = st(64 << 20, 0, 1000);
        cfg.reclaim_at = ReclaimAt::Window;
        assert_eq!(
            decide(&cfg, Ok(&s), Need::default(), Some("wasted 20%")).plan,
            Plan::Warm
        );
    }

    #[test]
    fn reclaim_is_due_past_the_threshold_unless_never() {
        let mut cfg = warm();
        let mut s = st(10 << 20, 0, 1000);
        s.wasted_memory = 5 << 20; // 5 of 25 MiB = 20%
        assert!(reclaim_due(&cfg, &s).unwrap().contains("20.0%"));
        cfg.reclaim_wasted_percent = 25.0;
        assert_eq!(reclaim_due(&cfg, &s), None);
        cfg.reclaim_wasted_percent = 5.0;
        cfg.reclaim_at = ReclaimAt::Never;
        assert_eq!(reclaim_due(&cfg, &s), None);
    }

    #[test]
    fn snippet_dir_inside_app_root_or_relative_is_refused() {
        let mut c = OpcacheConfig {
            snippet_dir: "/var/www/magento/fcgi".into(),
            ..Default::default()
        };
        let e = c.validate(Path::new("/var/www/magento"));
        assert!(e[0].1.contains("never be reachable over HTTP"), "{e:?}");
        c.snippet_dir = "fcgi".into();
        assert!(!c.validate(Path::new("/var/www/magento")).is_empty());
        c.snippet_dir = "/run/bgagent-fcgi".into();
        assert!(c.validate(Path::new("/var/www/magento")).is_empty());
    }

    #[test]
    fn snippet_dir_writable_by_others_is_refused_and_nothing_is_written() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("fcgi");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = prepare_snippets(&dir).unwrap_err().to_string();
        assert!(e.contains("lets others write"), "{e}");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare_snippets(&dir).unwrap();
        let p = dir.join(Snippet::Status.file_name());
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777,
            0o644
        );
        // A tampered snippet is rewritten before use.
        std::fs::write(&p, "<?php echo 'evil';").unwrap();
        prepare_snippets(&dir).unwrap();
        assert!(
            std::fs::read_to_string(&p)
                .unwrap()
                .contains("opcache_get_status")
        );
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(
            prepare_snippets(&link)
                .unwrap_err()
                .to_string()
                .contains("symlink")
        );
    }

    #[test]
    fn config_errors_name_the_key_and_what_to_write() {
        let load = |text: &str| {
            crate::config::from_str(text, Path::new("/etc/b.yaml"), Path::new("/etc"))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let e = load("app_root: /srv/app\nopcache: { switch: warm }\n");
        assert!(
            e.contains("`opcache.switch`") && e.contains("set `fastcgi`"),
            "{e}"
        );
        let e = load(
            "app_root: /srv/app\nservices: { list: [ { name: fpm, kind: php-fpm, fastcgi: fpm-sock } ] }\n",
        );
        assert!(
            e.contains("services.list.0.fastcgi") && e.contains("unix:"),
            "{e}"
        );
        let e = load("app_root: /srv/app\nopcache: { snippet_dir: /srv/app/shared/fcgi }\n");
        assert!(e.contains("reachable over HTTP"), "{e}");
        // auto without any fastcgi address: valid, and today's reload.
        assert_eq!(load("app_root: /srv/app\n"), "");
    }

    #[test]
    fn globs_match_segments_and_any_depth() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        for f in [
            "vendor/composer/autoload_real.php",
            "vendor/composer/x.txt",
            "app/code/A/B/C.php",
            "app/code/D.php",
            "app/etc/env.php",
        ] {
            std::fs::create_dir_all(r.join(f).parent().unwrap()).unwrap();
            std::fs::write(r.join(f), "").unwrap();
        }
        let got = glob_files(
            r,
            &["vendor/composer/*.php".into(), "app/code/**/*.php".into()],
        );
        let rel: Vec<_> = got
            .iter()
            .map(|p| p.strip_prefix(r).unwrap().to_str().unwrap().to_string())
            .collect();
        assert_eq!(
            rel,
            vec![
                "app/code/A/B/C.php",
                "app/code/D.php",
                "vendor/composer/autoload_real.php"
            ]
        );
        assert!(seg_match(b"a?c*", b"abcdef"));
        assert!(!seg_match(b"a?c", b"ac"));
    }
}
