//! Parameter sources for templates: AWS SSM Parameter Store, or a YAML file.
//!
//! `ssm` reads every parameter under one or more path prefixes with GetParametersByPath
//! (recursive, with decryption, following every NextToken page), retrying throttling and
//! transient failures with exponential backoff and jitter. Parameters become a nested map
//! following the path under the prefix: `/magento/prod/db/host` under `/magento/prod` is
//! `db.host`. `file` reads the same shape from YAML, for local use and the examples.
//!
//! Values are held as [`Secret`]s from the moment they are read; errors name paths and
//! parameters, never values. Each parameter's version and type are kept (without the value)
//! so status can record what a release was rendered from, and drift can be detected.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::secret::Secret;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(tag = "source", rename_all = "lowercase", try_from = "ParamsRaw")]
pub enum ParamsConfig {
    /// No parameters (templates then see an empty `params` map).
    #[default]
    None,
    /// A YAML file of values. Keys listed under `secure:` in it are treated like
    /// SecureStrings (redacted in `render --dry-run`).
    File {
        path: PathBuf,
    },
    Ssm(SsmConfig),
}

/// `params:` as written: one flat map, read as a plain struct so that the config loader's
/// unknown-key warnings reach inside it (they cannot see into an internally tagged enum),
/// then checked into [`ParamsConfig`]: a key of the other source is an error naming it.
#[derive(Deserialize)]
struct ParamsRaw {
    #[serde(default)]
    source: Option<String>,
    path: Option<PathBuf>,
    paths: Option<Vec<String>>,
    region: Option<String>,
    endpoint_url: Option<String>,
    max_attempts: Option<u32>,
    #[serde(default, with = "crate::config::opt_duration")]
    initial_backoff: Option<Duration>,
    #[serde(default, with = "crate::config::opt_duration")]
    max_backoff: Option<Duration>,
    #[serde(default, with = "crate::config::opt_duration")]
    connect_timeout: Option<Duration>,
    #[serde(default, with = "crate::config::opt_duration")]
    timeout: Option<Duration>,
}

impl TryFrom<ParamsRaw> for ParamsConfig {
    type Error = String;

    fn try_from(r: ParamsRaw) -> Result<Self, String> {
        let ssm_keys = [
            ("paths", r.paths.is_some()),
            ("region", r.region.is_some()),
            ("endpoint_url", r.endpoint_url.is_some()),
            ("max_attempts", r.max_attempts.is_some()),
            ("initial_backoff", r.initial_backoff.is_some()),
            ("max_backoff", r.max_backoff.is_some()),
            ("connect_timeout", r.connect_timeout.is_some()),
            ("timeout", r.timeout.is_some()),
        ];
        let only = |source: &str, allowed: &[&str]| -> Result<(), String> {
            let mut given: Vec<&str> = ssm_keys
                .iter()
                .filter(|(_, set)| *set)
                .map(|(k, _)| *k)
                .collect();
            if r.path.is_some() {
                given.push("path");
            }
            match given.iter().find(|k| !allowed.contains(k)) {
                Some(k) => Err(format!(
                    "`{k}` does not apply to `source: {source}`{}",
                    match (source, *k) {
                        ("ssm", "path") => " (SSM takes `paths`, a list of prefixes)",
                        ("file", "paths") => " (a file source takes one `path`)",
                        _ => "",
                    }
                )),
                None => Ok(()),
            }
        };
        match r.source.as_deref() {
            None | Some("none") => {
                only("none", &[])?;
                Ok(ParamsConfig::None)
            }
            Some("file") => {
                only("file", &["path"])?;
                let path = r
                    .path
                    .ok_or("`source: file` needs `path`, the YAML file of values")?;
                Ok(ParamsConfig::File { path })
            }
            Some("ssm") => {
                only(
                    "ssm",
                    &[
                        "paths",
                        "region",
                        "endpoint_url",
                        "max_attempts",
                        "initial_backoff",
                        "max_backoff",
                        "connect_timeout",
                        "timeout",
                    ],
                )?;
                let d = SsmConfig::default();
                Ok(ParamsConfig::Ssm(SsmConfig {
                    paths: r.paths.unwrap_or_default(),
                    region: r.region,
                    endpoint_url: r.endpoint_url,
                    max_attempts: r.max_attempts.unwrap_or(d.max_attempts),
                    initial_backoff: r.initial_backoff.unwrap_or(d.initial_backoff),
                    max_backoff: r.max_backoff.unwrap_or(d.max_backoff),
                    connect_timeout: r.connect_timeout.unwrap_or(d.connect_timeout),
                    timeout: r.timeout.unwrap_or(d.timeout),
                }))
            }
            Some(other) => Err(format!(
                "unknown params source `{other}`: use none, file or ssm"
            )),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct SsmConfig {
    /// Path prefixes, e.g. `/magento/prod`. Later prefixes win on a name clash.
    pub paths: Vec<String>,
    /// Region; unset: the standard chain (AWS_REGION, profile, instance metadata).
    pub region: Option<String>,
    /// Endpoint override (VPC endpoint, or a test stand-in).
    pub endpoint_url: Option<String>,
    /// Attempts per request before giving up.
    pub max_attempts: u32,
    #[serde(with = "crate::config::duration")]
    pub initial_backoff: Duration,
    #[serde(with = "crate::config::duration")]
    pub max_backoff: Duration,
    /// Deadline for the TCP and TLS connection to the endpoint, per attempt.
    #[serde(with = "crate::config::duration")]
    pub connect_timeout: Duration,
    /// Deadline for one request, from sending to the whole answer read, per attempt: an
    /// endpoint that accepts and never answers fails the attempt after this long.
    #[serde(with = "crate::config::duration")]
    pub timeout: Duration,
}

impl Default for SsmConfig {
    fn default() -> Self {
        SsmConfig {
            paths: Vec::new(),
            region: None,
            endpoint_url: None,
            max_attempts: 6,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            timeout: Duration::from_secs(10),
        }
    }
}

impl SsmConfig {
    /// The longest reading one page may take: every attempt at its timeout plus the
    /// backoffs between them. The whole read is bounded by this per page as well, so not
    /// even a stall the SDK's own timeouts miss (credentials, region lookup) holds a hook.
    pub fn page_budget(&self) -> Duration {
        let n = self.max_attempts.max(1);
        (self.timeout + self.connect_timeout) * n + self.max_backoff * n.saturating_sub(1)
    }
}

/// A parameter's identity without its value: what status records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamVersion {
    pub version: i64,
    /// `String`, `StringList`, `SecureString`, or `File`/`FileSecure` for the file source.
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Debug, Clone)]
pub struct Param {
    /// Full name, e.g. `/magento/prod/db/password` (or `db.password` from a file).
    pub name: String,
    pub value: Secret<String>,
    pub secure: bool,
    pub version: ParamVersion,
}

/// Parameters as a tree: key path under the prefix -> parameter.
#[derive(Debug, Clone, Default)]
pub struct ParamSet {
    /// Dotted key (`db.host`) -> parameter. Kept flat; [`ParamSet::tree`] nests it.
    pub by_key: BTreeMap<String, Param>,
}

impl ParamSet {
    pub fn len(&self) -> usize {
        self.by_key.len()
    }
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Parameter name -> version and type, no values.
    pub fn versions(&self) -> BTreeMap<String, ParamVersion> {
        self.by_key
            .values()
            .map(|p| (p.name.clone(), p.version.clone()))
            .collect()
    }

    /// The nested map templates see. `redact` replaces secure values by a marker.
    pub fn tree(&self, redact: bool) -> serde_json::Value {
        let mut root = serde_json::Map::new();
        for (key, p) in &self.by_key {
            let parts: Vec<&str> = key.split('.').collect();
            let mut node = &mut root;
            for part in &parts[..parts.len() - 1] {
                let entry = node
                    .entry(part.to_string())
                    .or_insert_with(|| serde_json::Value::Object(Default::default()));
                if !entry.is_object() {
                    // `a` is a value and `a/b` exists too: the deeper one wins, and a
                    // template reaching `a` as a value fails with "undefined".
                    *entry = serde_json::Value::Object(Default::default());
                }
                node = match entry.as_object_mut() {
                    Some(m) => m,
                    None => unreachable!("made an object just above"),
                };
            }
            let v = if redact && p.secure {
                format!("<redacted:{}>", p.name)
            } else {
                p.value.expose().clone()
            };
            let leaf = parts[parts.len() - 1].to_string();
            if !node.get(&leaf).is_some_and(|x| x.is_object()) {
                node.insert(leaf, serde_json::Value::String(v));
            }
        }
        serde_json::Value::Object(root)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ParamsError {
    #[error("failed to read parameters file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error(
        "failed to read SSM parameters under {path} after {attempts} attempt(s): {message}. Check the instance role (ssm:GetParametersByPath, kms:Decrypt), the region and params.endpoint_url"
    )]
    Ssm {
        path: String,
        attempts: u32,
        message: String,
    },
    #[error("SSM parameter {name} is not under any configured path")]
    Outside { name: String },
    #[error("params.paths is empty: name at least one SSM path prefix such as /magento/prod")]
    NoPaths,
}

/// Reads all parameters from the configured source.
pub async fn load(cfg: &ParamsConfig, base_dir: &Path) -> Result<ParamSet, ParamsError> {
    match cfg {
        ParamsConfig::None => Ok(ParamSet::default()),
        ParamsConfig::File { path } => load_file(&resolve(base_dir, path)),
        ParamsConfig::Ssm(ssm) => load_ssm(ssm).await,
    }
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_relative() {
        base.join(p)
    } else {
        p.to_path_buf()
    }
}

/// What changed since `recorded`: names whose version or type changed, new names, and
/// names that disappeared. Names only.
pub fn diff(
    recorded: &BTreeMap<String, ParamVersion>,
    now: &BTreeMap<String, ParamVersion>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (name, v) in now {
        match recorded.get(name) {
            None => out.push(format!("{name} (new)")),
            Some(old) if old != v => {
                out.push(format!("{name} (version {} -> {})", old.version, v.version))
            }
            _ => {}
        }
    }
    for name in recorded.keys() {
        if !now.contains_key(name) {
            out.push(format!("{name} (removed)"));
        }
    }
    out
}

fn load_file(path: &Path) -> Result<ParamSet, ParamsError> {
    let err = |message: String| ParamsError::File {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let doc: serde_json::Value = serde_saphyr::from_str(&text).map_err(|e| {
        // saphyr's message names the location, never the value.
        err(e.without_snippet().to_string())
    })?;
    let secure: Vec<String> = doc
        .get("secure")
        .and_then(|s| s.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let mut set = ParamSet::default();
    if !doc.is_object() {
        return Err(err("the file must hold a map of values".into()));
    }
    // Values again, as written: YAML would read `0123` as 123, `1e3` as 1000.0 and `~` as
    // nothing, silently changing a password or a key. Numbers and booleans keep the exact
    // text of the file; null and lists are refused at their line and column.
    let tree: YamlNode =
        serde_saphyr::from_str(&text).map_err(|e| err(e.without_snippet().to_string()))?;
    let YamlNode::Map(top) = tree else {
        return Err(err("the file must hold a map of values".into()));
    };
    let mut flat = Vec::new();
    for (k, v) in top {
        if k != "secure" {
            flatten(&text, &k, v, &mut flat).map_err(err)?;
        }
    }
    for (key, value) in flat {
        let is_secure = secure.contains(&key);
        set.by_key.insert(
            key.clone(),
            Param {
                name: key,
                value: Secret::new(value),
                secure: is_secure,
                version: ParamVersion {
                    version: 0,
                    kind: if is_secure {
                        "FileSecure".into()
                    } else {
                        "File".into()
                    },
                },
            },
        );
    }
    Ok(set)
}

/// A parameters file as written, every value with where it is.
enum YamlNode {
    Map(Vec<(String, serde_saphyr::Spanned<YamlNode>)>),
    Str(String),
    /// A number or boolean: its text is taken from the file.
    Plain,
    Null,
    List,
}

impl<'de> Deserialize<'de> for YamlNode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = YamlNode;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of values")
            }
            fn visit_str<E>(self, v: &str) -> Result<YamlNode, E> {
                Ok(YamlNode::Str(v.to_string()))
            }
            fn visit_string<E>(self, v: String) -> Result<YamlNode, E> {
                Ok(YamlNode::Str(v))
            }
            fn visit_bool<E>(self, _: bool) -> Result<YamlNode, E> {
                Ok(YamlNode::Plain)
            }
            fn visit_i64<E>(self, _: i64) -> Result<YamlNode, E> {
                Ok(YamlNode::Plain)
            }
            fn visit_u64<E>(self, _: u64) -> Result<YamlNode, E> {
                Ok(YamlNode::Plain)
            }
            fn visit_i128<E>(self, _: i128) -> Result<YamlNode, E> {
                Ok(YamlNode::Plain)
            }
            fn visit_u128<E>(self, _: u128) -> Result<YamlNode, E> {
                Ok(YamlNode::Plain)
            }
            fn visit_f64<E>(self, _: f64) -> Result<YamlNode, E> {
                Ok(YamlNode::Plain)
            }
            fn visit_unit<E>(self) -> Result<YamlNode, E> {
                Ok(YamlNode::Null)
            }
            fn visit_none<E>(self) -> Result<YamlNode, E> {
                Ok(YamlNode::Null)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<YamlNode, A::Error> {
                while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(YamlNode::List)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<YamlNode, A::Error> {
                let mut out = Vec::new();
                while let Some(k) = a.next_key::<String>()? {
                    out.push((k, a.next_value::<serde_saphyr::Spanned<YamlNode>>()?));
                }
                Ok(YamlNode::Map(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// Flattens `node` under `key` into (dotted key, value) pairs. Errors name the key, line
/// and column, never a value.
fn flatten(
    text: &str,
    key: &str,
    node: serde_saphyr::Spanned<YamlNode>,
    out: &mut Vec<(String, String)>,
) -> Result<(), String> {
    let at = &node.defined;
    let here = format!("line {}, column {}: `{key}`", at.line(), at.column());
    match node.value {
        YamlNode::Map(m) => {
            for (k, v) in m {
                flatten(text, &format!("{key}.{k}"), v, out)?;
            }
        }
        YamlNode::Str(s) => out.push((key.to_string(), s)),
        YamlNode::Plain => {
            let span = at.span();
            let raw = span
                .byte_offset()
                .zip(span.byte_len())
                .and_then(|(o, l)| text.get(o as usize..(o + l) as usize))
                .map(str::trim)
                .filter(|r| !r.is_empty())
                .ok_or_else(|| format!("{here} is not a quoted string and its text could not be read back; quote it"))?;
            out.push((key.to_string(), raw.to_string()));
        }
        YamlNode::Null => {
            return Err(format!(
                "{here} has no value (YAML null: empty, `~` or `null`); write \"\" for an empty string, or quote the text"
            ));
        }
        YamlNode::List => {
            return Err(format!(
                "{here} is a list; parameters are strings (or maps of them): quote it, or give one key per item"
            ));
        }
    }
    Ok(())
}

/// `/magento/prod/db/host` under `/magento/prod` -> `db.host`.
pub fn key_under(prefix: &str, name: &str) -> Option<String> {
    let p = prefix.trim_end_matches('/');
    let rest = name.strip_prefix(p)?;
    let rest = rest.strip_prefix('/')?;
    if rest.is_empty() {
        return None;
    }
    Some(
        rest.split('/')
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("."),
    )
}

/// Backoff before attempt `n` (1-based retry count): exponential, capped, full jitter.
pub fn backoff(n: u32, initial: Duration, max: Duration, jitter: f64) -> Duration {
    let exp = initial.saturating_mul(1u32 << n.min(16));
    let capped = exp.min(max);
    capped.mul_f64(jitter.clamp(0.0, 1.0))
}

async fn client(cfg: &SsmConfig) -> aws_sdk_ssm::Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        // Retries are ours (below), so a refused connection is retried like throttling.
        .retry_config(aws_config::retry::RetryConfig::disabled())
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(cfg.connect_timeout)
                .read_timeout(cfg.timeout)
                .operation_attempt_timeout(cfg.timeout)
                .operation_timeout(cfg.timeout)
                .build(),
        );
    if let Some(r) = &cfg.region {
        loader = loader.region(aws_config::Region::new(r.clone()));
    }
    if let Some(e) = &cfg.endpoint_url {
        loader = loader.endpoint_url(e.clone());
    }
    let shared = loader.load().await;
    aws_sdk_ssm::Client::new(&shared)
}

async fn load_ssm(cfg: &SsmConfig) -> Result<ParamSet, ParamsError> {
    if cfg.paths.is_empty() {
        return Err(ParamsError::NoPaths);
    }
    let endpoint = cfg.endpoint_url.clone().unwrap_or_else(|| "SSM".into());
    let client = tokio::time::timeout(cfg.page_budget(), client(cfg))
        .await
        .map_err(|_| ParamsError::Ssm {
            path: cfg.paths[0].clone(),
            attempts: 1,
            message: format!(
                "setting up the SSM client (region, credentials) for {endpoint} stalled for {} s",
                cfg.page_budget().as_secs()
            ),
        })?;
    let mut set = ParamSet::default();
    for prefix in &cfg.paths {
        let mut token: Option<String> = None;
        let mut pages = 0;
        loop {
            let page = match tokio::time::timeout(
                cfg.page_budget(),
                fetch_page(&client, cfg, prefix, token.clone()),
            )
            .await
            {
                Ok(r) => r?,
                Err(_) => {
                    return Err(ParamsError::Ssm {
                        path: prefix.clone(),
                        attempts: cfg.max_attempts,
                        message: format!(
                            "{endpoint} did not answer within {} s (stalled)",
                            cfg.page_budget().as_secs()
                        ),
                    });
                }
            };
            pages += 1;
            for p in page.parameters() {
                let name = p.name().unwrap_or_default().to_string();
                let Some(key) = key_under(prefix, &name) else {
                    return Err(ParamsError::Outside { name });
                };
                let kind = p
                    .r#type()
                    .map(|t| t.as_str().to_string())
                    .unwrap_or_default();
                set.by_key.insert(
                    key,
                    Param {
                        secure: kind == "SecureString",
                        value: Secret::new(p.value().unwrap_or_default().to_string()),
                        version: ParamVersion {
                            version: p.version(),
                            kind,
                        },
                        name,
                    },
                );
            }
            token = page
                .next_token()
                .map(String::from)
                .filter(|t| !t.is_empty());
            if token.is_none() {
                break;
            }
        }
        info!("read SSM parameters under {prefix} ({pages} page(s))");
    }
    info!("{} parameter(s) from SSM", set.len());
    Ok(set)
}

async fn fetch_page(
    client: &aws_sdk_ssm::Client,
    cfg: &SsmConfig,
    prefix: &str,
    token: Option<String>,
) -> Result<aws_sdk_ssm::operation::get_parameters_by_path::GetParametersByPathOutput, ParamsError>
{
    let attempts = cfg.max_attempts.max(1);
    let mut last = String::new();
    for attempt in 1..=attempts {
        let res = client
            .get_parameters_by_path()
            .path(prefix)
            .recursive(true)
            .with_decryption(true)
            .max_results(10)
            .set_next_token(token.clone())
            .send()
            .await;
        match res {
            Ok(out) => return Ok(out),
            Err(e) => {
                let (retryable, msg) = classify(&e);
                // Name what stalled or failed: the endpoint, and the deadline that ran out.
                last = format!(
                    "{}: {}",
                    cfg.endpoint_url.as_deref().unwrap_or("the SSM endpoint"),
                    msg.replace(
                        "params.timeout",
                        &format!("params.timeout ({} ms)", cfg.timeout.as_millis())
                    )
                );
                if !retryable || attempt == attempts {
                    return Err(ParamsError::Ssm {
                        path: prefix.to_string(),
                        attempts: attempt,
                        message: last,
                    });
                }
                let wait = backoff(
                    attempt - 1,
                    cfg.initial_backoff,
                    cfg.max_backoff,
                    fastrand::f64(),
                );
                warn!(
                    "reading SSM parameters under {prefix} failed (attempt {attempt}/{attempts}): {last}; retrying in {} ms",
                    wait.as_millis()
                );
                tokio::time::sleep(wait).await;
            }
        }
    }
    Err(ParamsError::Ssm {
        path: prefix.to_string(),
        attempts,
        message: last,
    })
}

/// Whether an SSM error is worth retrying, and a message that holds no parameter value.
fn classify<E, R>(e: &aws_sdk_ssm::error::SdkError<E, R>) -> (bool, String)
where
    E: aws_sdk_ssm::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    use aws_sdk_ssm::error::SdkError;
    match e {
        SdkError::DispatchFailure(d) => {
            if d.is_io() {
                (
                    true,
                    "could not reach the endpoint (connection failed)".into(),
                )
            } else if d.is_timeout() {
                (true, "could not reach the endpoint (timed out)".into())
            } else {
                // Before anything was sent: most often no credentials (the instance role
                // could not be read from the instance metadata service). Its causes say which;
                // they come from no response, so they hold no parameter value.
                (true, format!("the request was not sent: {}", causes(e)))
            }
        }
        SdkError::TimeoutError(_) => (
            true,
            "the endpoint did not answer within params.timeout (stalled)".into(),
        ),
        SdkError::ResponseError(_) => (true, "the response could not be read".into()),
        SdkError::ServiceError(s) => {
            let err = s.err();
            let code = err.code().unwrap_or("Unknown").to_string();
            let retry = matches!(
                code.as_str(),
                "ThrottlingException"
                    | "Throttling"
                    | "TooManyRequestsException"
                    | "InternalServerError"
                    | "ServiceUnavailable"
            ) || code.contains("Throttl");
            (retry, format!("{code}: {}", err.message().unwrap_or("")))
        }
        SdkError::ConstructionFailure(_) => (
            false,
            format!("the request could not be built: {}", causes(e)),
        ),
        _ => (false, "unexpected SDK error".into()),
    }
}

/// The Display of each error below `e`, joined, without repeats, bounded. For errors raised
/// before a request is sent only: a response's errors may quote its body.
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = e.source();
    while let Some(c) = next {
        let text = c.to_string();
        // The connector's kind ("other") says nothing to an operator.
        if text != "other" && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = c.source();
    }
    let joined = if parts.is_empty() {
        e.to_string()
    } else {
        parts.join(": ")
    };
    crate::text::truncate(&joined, 700)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_path_under_the_prefix() {
        assert_eq!(
            key_under("/magento/prod", "/magento/prod/db/host").as_deref(),
            Some("db.host")
        );
        assert_eq!(
            key_under("/magento/prod/", "/magento/prod/crypt/key").as_deref(),
            Some("crypt.key")
        );
        assert_eq!(key_under("/magento/prod", "/magento/production/x"), None);
        assert_eq!(key_under("/magento/prod", "/magento/prod"), None);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let i = Duration::from_millis(100);
        let m = Duration::from_secs(2);
        assert_eq!(backoff(0, i, m, 1.0), Duration::from_millis(100));
        assert_eq!(backoff(3, i, m, 1.0), Duration::from_millis(800));
        assert_eq!(backoff(10, i, m, 1.0), m);
        assert_eq!(backoff(10, i, m, 0.5), Duration::from_secs(1));
    }

    #[test]
    fn diff_names_changes_only() {
        let v = |n| ParamVersion {
            version: n,
            kind: "String".into(),
        };
        let a = BTreeMap::from([
            ("/a".to_string(), v(1)),
            ("/b".to_string(), v(1)),
            ("/c".to_string(), v(1)),
        ]);
        let b = BTreeMap::from([
            ("/a".to_string(), v(1)),
            ("/b".to_string(), v(2)),
            ("/d".to_string(), v(1)),
        ]);
        assert_eq!(
            diff(&a, &b),
            vec!["/b (version 1 -> 2)", "/d (new)", "/c (removed)"]
        );
    }

    #[test]
    fn file_source_nests_and_marks_secure() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("p.yaml");
        std::fs::write(
            &p,
            "db:\n  host: h\n  password: \"p'w\"\n  port: 3306\nsecure: [db.password]\n",
        )
        .unwrap();
        let set = load_file(&p).unwrap();
        let t = set.tree(false);
        assert_eq!(t["db"]["host"], "h");
        assert_eq!(t["db"]["port"], "3306");
        assert_eq!(set.tree(true)["db"]["password"], "<redacted:db.password>");
        assert_eq!(set.versions()["db.password"].kind, "FileSecure");
    }
}
