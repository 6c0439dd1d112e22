//! Config files rendered from parameters into each new release, env.php first of all.
//!
//! Three steps over plain values: [`render_all`] (pure: templates + parameters + deployment
//! facts -> file contents), then [`write_all`] (atomic: temp file beside the target, fsync,
//! owner and mode, check command such as `php -l`, rename), before the release goes live.
//!
//! minijinja runs with strict undefined: a missing parameter fails rendering, naming the
//! expression and the template line. For `.php` targets every value is emitted as a PHP
//! literal (single-quoted strings with only `\` and `'` escaped, bare numbers and booleans,
//! arrays for lists and maps), so no value can break out of env.php, whatever it holds.
//! `.json` targets get JSON literals; other targets plain text. Values with a NUL byte are
//! refused. Error messages name templates, lines and parameters, never values.

use std::path::{Path, PathBuf};
use std::time::Duration;

use minijinja::value::{Value, ValueKind};
use minijinja::{Environment, ErrorKind, UndefinedBehavior};
use serde::{Deserialize, Serialize};

use crate::params::ParamSet;
use crate::secret::Secret;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct TemplateConfig {
    /// The template file; relative paths resolve against the config file's directory.
    pub source: PathBuf,
    /// Where it goes, relative to the release root, e.g. app/etc/env.php.
    pub target: PathBuf,
    pub owner: Option<String>,
    pub group: Option<String>,
    /// Octal; default 0640. Never readable by others.
    #[serde(default = "default_mode")]
    pub mode: String,
    /// Run on the temp file before it replaces the target; `{path}` is replaced by its path.
    /// Default for .php targets: `[php, -l, "{path}"]`. `[]` disables the check.
    pub check: Option<Vec<String>>,
    /// How long the check may run before its process group is ended and the file refused.
    #[serde(default = "default_check_timeout", with = "crate::config::duration")]
    pub check_timeout: Duration,
}

fn default_check_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_mode() -> String {
    "0640".into()
}

impl TemplateConfig {
    pub fn validate(&self, i: usize) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Err(e) = crate::perms::check_relative(&self.target) {
            out.push((format!("templates.{i}.target"), e));
        }
        match crate::fsutil::parse_mode(&self.mode) {
            Err(e) => out.push((format!("templates.{i}.mode"), e)),
            Ok(m) if crate::perms::check_special_bits(m, false).is_err() => out.push((
                format!("templates.{i}.mode"),
                crate::perms::check_special_bits(m, false).unwrap_err(),
            )),
            Ok(m) if m & 0o007 != 0 => out.push((
                format!("templates.{i}.mode"),
                format!("{} lets every user on the host read or write the file; rendered files hold secrets: use 0640 or tighter", self.mode),
            )),
            Ok(_) => {}
        }
        out
    }

    fn check_argv(&self) -> Vec<String> {
        match &self.check {
            Some(c) => c.clone(),
            None if is_php(&self.target) => vec!["php".into(), "-l".into(), "{path}".into()],
            None => Vec::new(),
        }
    }
}

fn is_php(p: &Path) -> bool {
    p.extension().is_some_and(|e| e == "php")
}

/// One rendered file, not yet written. Its content is a secret.
pub struct Rendered {
    pub target: PathBuf,
    pub content: Secret<String>,
    pub mode: u32,
    pub owner: Option<String>,
    pub group: Option<String>,
    pub check: Vec<String>,
    pub check_timeout: Duration,
}

impl std::fmt::Debug for Rendered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Rendered({}, {} bytes)",
            self.target.display(),
            self.content.expose().len()
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("failed to read template {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "failed to render {template}, line {line}: `{expr}` is undefined (a missing parameter?)"
    )]
    Undefined {
        template: PathBuf,
        line: usize,
        expr: String,
    },
    #[error("failed to render {template}, line {line}: {what}")]
    Template {
        template: PathBuf,
        line: usize,
        what: String,
    },
    #[error("parameter {0} contains a NUL byte, which cannot be written into a config file")]
    Nul(String),
    #[error("failed to write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{check} rejected the rendered {target}{detail}; the target was left untouched")]
    Check {
        check: String,
        target: PathBuf,
        detail: String,
    },
    #[error("templates: {0}")]
    Owner(String),
    #[error(transparent)]
    Release(#[from] crate::release::ReleaseError),
}

/// Renders every template with the real values. Pure: nothing is written.
pub fn render_all(
    templates: &[TemplateConfig],
    base_dir: &Path,
    params: &ParamSet,
    facts: &serde_json::Value,
) -> Result<Vec<Rendered>, RenderError> {
    for p in params.by_key.values() {
        if p.value.expose().contains('\0') {
            return Err(RenderError::Nul(p.name.clone()));
        }
    }
    render_with(templates, base_dir, params.tree(false), facts)
}

/// Renders with every SecureString replaced by `<redacted:NAME>`, for `render --dry-run`.
pub fn render_redacted(
    templates: &[TemplateConfig],
    base_dir: &Path,
    params: &ParamSet,
    facts: &serde_json::Value,
) -> Result<Vec<Rendered>, RenderError> {
    render_with(templates, base_dir, params.tree(true), facts)
}

fn render_with(
    templates: &[TemplateConfig],
    base_dir: &Path,
    tree: serde_json::Value,
    facts: &serde_json::Value,
) -> Result<Vec<Rendered>, RenderError> {
    let ctx = Value::from(minijinja::value::Serde(
        serde_json::json!({ "params": tree, "deploy": facts }),
    ));
    let mut out = Vec::new();
    for t in templates {
        let path = if t.source.is_relative() {
            base_dir.join(&t.source)
        } else {
            t.source.clone()
        };
        let source = std::fs::read_to_string(&path).map_err(|source| RenderError::Read {
            path: path.clone(),
            source,
        })?;
        let content = render_one(&path, &source, &t.target, &ctx)?;
        out.push(Rendered {
            target: t.target.clone(),
            content: Secret::new(content),
            mode: crate::fsutil::parse_mode(&t.mode).unwrap_or(0o640),
            owner: t.owner.clone(),
            group: t.group.clone(),
            check: t.check_argv(),
            check_timeout: t.check_timeout,
        });
    }
    Ok(out)
}

/// Marks an error detail written by bgagent (which never holds a value), so it is shown.
const OWN_DETAIL: &str = "bgagent: ";

/// Renders one template source for `target` (whose extension picks the value syntax).
pub fn render_one(
    template: &Path,
    source: &str,
    target: &Path,
    ctx: &Value,
) -> Result<String, RenderError> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    if let Ok(syntax) = minijinja::syntax::SyntaxConfig::builder()
        .keep_trailing_newline(true)
        .build()
    {
        env.set_syntax(syntax);
    }
    // Debug info would print the context (secrets) with an error: never.
    #[cfg(debug_assertions)]
    env.set_debug(false);
    // Parameters are strings (SSM has no other type): `boolean` turns "false" into PHP's
    // false, where the string 'false' would read as true.
    env.add_filter("boolean", boolean);
    let php = is_php(target);
    let json = target.extension().is_some_and(|e| e == "json");
    if php || json {
        env.set_formatter(move |out, _state, value| {
            let lit = if php {
                php_literal(value)
            } else {
                json_literal(value)
            };
            let lit = lit.map_err(|what| {
                minijinja::Error::new(ErrorKind::InvalidOperation, format!("{OWN_DETAIL}{what}"))
            })?;
            out.write_str(&lit)
                .map_err(|_| minijinja::Error::new(ErrorKind::WriteFailure, "write failed"))
        });
    }
    let name = template.display().to_string();
    let err = |e: minijinja::Error| {
        let line = e.line().unwrap_or(0);
        if e.kind() == ErrorKind::UndefinedError {
            // The range may cover only the failing attribute: widen it to the whole dotted
            // name so the message names the parameter.
            let expr = e
                .range()
                .and_then(|r| {
                    let bytes = source.as_bytes();
                    let mut start = r.start.min(bytes.len());
                    while start > 0
                        && (bytes[start - 1].is_ascii_alphanumeric()
                            || b"._".contains(&bytes[start - 1]))
                    {
                        start -= 1;
                    }
                    source.get(start..r.end)
                })
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|| "a value".into());
            RenderError::Undefined {
                template: template.to_path_buf(),
                line,
                expr,
            }
        } else {
            // Never the context, and a detail only where it cannot hold a value: minijinja
            // puts values into details (the name given to include/import/extends, the
            // operands of a failed operation), and a parameter value is a secret.
            let what = match (e.kind(), e.detail()) {
                (ErrorKind::SyntaxError, Some(d)) => format!("{}: {d}", e.kind()),
                (_, Some(d)) if d.starts_with(OWN_DETAIL) => {
                    format!("{}: {}", e.kind(), &d[OWN_DETAIL.len()..])
                }
                (ErrorKind::TemplateNotFound, _) => format!(
                    "{} (include, import and extends are not supported: rendered files are built from one template; the name is not shown, it may be a parameter value)",
                    e.kind()
                ),
                (k, Some(_)) => {
                    format!("{k} (details not shown: they may quote a parameter value)")
                }
                (k, None) => k.to_string(),
            };
            RenderError::Template {
                template: template.to_path_buf(),
                line,
                what,
            }
        }
    };
    env.add_template_owned(name.clone(), source.to_string())
        .map_err(err)?;
    let tmpl = env.get_template(&name).map_err(err)?;
    tmpl.render(ctx).map_err(err)
}

/// The `boolean` filter: a parameter's text as a boolean, strictly. `true`, `yes`, `on`, `1`
/// and `false`, `no`, `off`, `0` (any case, surrounding spaces ignored), booleans, and the
/// numbers 1 and 0; anything else is an error that does not quote the value (it may be a
/// secret), so a typo can never render as true.
fn boolean(v: &Value) -> Result<bool, minijinja::Error> {
    let b = match v.kind() {
        ValueKind::Bool => Some(v.is_true()),
        ValueKind::Number => match v.as_i64() {
            Some(1) => Some(true),
            Some(0) => Some(false),
            _ => None,
        },
        ValueKind::String => match v
            .as_str()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase()
            .as_str()
        {
            "true" | "yes" | "on" | "1" => Some(true),
            "false" | "no" | "off" | "0" => Some(false),
            _ => None,
        },
        _ => None,
    };
    b.ok_or_else(|| {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!(
                "{OWN_DETAIL}the boolean filter takes true/false, yes/no, on/off or 1/0 (any case); this value is none of them (not shown: it may be a secret)"
            ),
        )
    })
}

/// A PHP string literal that PHP reads back byte for byte: single quotes, only `\` and `'`
/// escaped (the only escapes PHP honours inside single quotes).
pub fn php_string(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('\'');
    for c in s.chars() {
        if c == '\\' || c == '\'' {
            o.push('\\');
        }
        o.push(c);
    }
    o.push('\'');
    o
}

/// Any template value as a PHP literal.
pub fn php_literal(v: &Value) -> Result<String, String> {
    Ok(match v.kind() {
        ValueKind::None | ValueKind::Undefined => "null".into(),
        ValueKind::Bool => {
            if v.is_true() {
                "true".into()
            } else {
                "false".into()
            }
        }
        ValueKind::Number => {
            if let Some(i) = v.as_i64() {
                i.to_string()
            } else {
                let f: f64 = f64::try_from(v.clone())
                    .map_err(|_| "a number PHP cannot represent".to_string())?;
                if !f.is_finite() {
                    return Err("a non-finite number cannot be written as a PHP literal".into());
                }
                let s = format!("{f:?}");
                if s.contains(['.', 'e', 'E']) {
                    s
                } else {
                    format!("{s}.0")
                }
            }
        }
        ValueKind::String => {
            let s = v.as_str().unwrap_or_default();
            if s.contains('\0') {
                return Err("a value contains a NUL byte".into());
            }
            php_string(s)
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Result<Vec<String>, String> = v
                .try_iter()
                .map_err(|_| "a list that cannot be iterated".to_string())?
                .map(|x| php_literal(&x))
                .collect();
            format!("[{}]", items?.join(", "))
        }
        ValueKind::Map => {
            let mut parts = Vec::new();
            for k in v
                .try_iter()
                .map_err(|_| "a map that cannot be iterated".to_string())?
            {
                let val = v
                    .get_item(&k)
                    .map_err(|_| "a map entry that cannot be read".to_string())?;
                let key = match k.as_i64() {
                    Some(i) if k.kind() == ValueKind::Number => i.to_string(),
                    _ => php_string(k.as_str().unwrap_or(&k.to_string())),
                };
                parts.push(format!("{key} => {}", php_literal(&val)?));
            }
            format!("[{}]", parts.join(", "))
        }
        _ => {
            return Err(format!(
                "a {} value cannot be written as a PHP literal",
                v.kind()
            ));
        }
    })
}

fn json_literal(v: &Value) -> Result<String, String> {
    serde_json::to_string(v).map_err(|_| "a value that cannot be written as JSON".into())
}

/// Writes every rendered file into the release, atomically, running each file's check on
/// the temp file first. A failed check leaves the target untouched and no temp file behind.
/// Everything goes through the release handle: parents (app/, app/etc/) are made with the
/// policy's modes and owners, and a symlink on the way (`app/etc -> ../pub/media`) is
/// refused by name, never written through.
pub fn write_all(
    rendered: &[Rendered],
    release: &crate::appdir::ReleaseDir,
    policy: &crate::perms::Policy,
) -> Result<(), RenderError> {
    for r in rendered {
        write_one(r, release, policy)?;
    }
    Ok(())
}

fn write_one(
    r: &Rendered,
    release: &crate::appdir::ReleaseDir,
    policy: &crate::perms::Policy,
) -> Result<(), RenderError> {
    let uid = match &r.owner {
        Some(o) => Some(
            crate::perms::lookup_user(o)
                .ok_or_else(|| RenderError::Owner(format!("no user named `{o}`")))?
                .0,
        ),
        None => None,
    };
    let gid = match &r.group {
        Some(g) => Some(
            crate::perms::lookup_group(g)
                .ok_or_else(|| RenderError::Owner(format!("no group named `{g}`")))?,
        ),
        None => None,
    };
    let pl = crate::perms::Placement {
        mode: r.mode,
        uid,
        gid,
    };
    release.write_atomic(
        &r.target,
        r.content.expose().as_bytes(),
        pl,
        policy,
        |tmp| {
            if r.check.is_empty() {
                Ok(())
            } else {
                run_check(&r.check, r.check_timeout, tmp, &r.target)
            }
        },
    )?
}

/// Runs the check by argv on the temp file. Its output may quote the file (and so a
/// secret): only the exit status and a line number are reported.
fn run_check(
    argv: &[String],
    timeout: Duration,
    tmp: &Path,
    target: &Path,
) -> Result<(), RenderError> {
    let args: Vec<std::ffi::OsString> = argv
        .iter()
        .map(|a| {
            if a == "{path}" {
                tmp.as_os_str().to_owned()
            } else {
                a.into()
            }
        })
        .collect();
    let shown = argv
        .iter()
        .filter(|a| *a != "{path}")
        .cloned()
        .collect::<Vec<_>>()
        .join(" ");
    let fail = |detail: String| RenderError::Check {
        check: shown.clone(),
        target: target.to_path_buf(),
        detail,
    };
    let ran = crate::process::run_private(&args, timeout).map_err(|e| match e {
        crate::process::ProcessError::TimedOut { timeout, .. } => fail(format!(
            " (it ran for more than {} s and its process group was ended; raise templates[].check_timeout if the check is just slow)",
            timeout.as_secs_f64()
        )),
        crate::process::ProcessError::Spawn { source, .. } => {
            fail(format!(" (could not run it: {source})"))
        }
        other => fail(format!(" ({other})")),
    })?;
    if ran.status.success() {
        return Ok(());
    }
    let line = ran
        .output
        .split(" on line ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .filter(|n| !n.is_empty())
        .map(|n| format!(": syntax error on line {n}"))
        .unwrap_or_default();
    use std::os::unix::process::ExitStatusExt;
    let how = match (ran.status.code(), ran.status.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "failed".to_string(),
    };
    Err(fail(format!(" ({how}){line}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(src: &str, target: &str, ctx: serde_json::Value) -> Result<String, RenderError> {
        render_one(
            Path::new("t.j2"),
            src,
            Path::new(target),
            &Value::from(minijinja::value::Serde(ctx)),
        )
    }

    #[test]
    fn php_literals() {
        assert_eq!(php_string(r"it's a \ test"), r"'it\'s a \\ test'");
        let out = render(
            "<?php return [{{ s }}, {{ n }}, {{ f }}, {{ b }}, {{ l }}, {{ m }}, {{ z }}];",
            "env.php",
            serde_json::json!({"s": "a'b", "n": 3306, "f": 1.5, "b": true, "l": [1, "x"], "m": {"k": "v"}, "z": null}),
        )
        .unwrap();
        assert_eq!(
            out,
            "<?php return ['a\\'b', 3306, 1.5, true, [1, 'x'], ['k' => 'v'], null];"
        );
    }

    #[test]
    fn a_string_parameter_false_rendered_as_the_string_false_which_php_reads_as_true() {
        // SSM parameters are strings: {{ params.x }} of "false" is 'false', truthy in PHP.
        // The boolean filter gives the PHP literal.
        let ctx = serde_json::json!({"p": {"a": "false", "b": "TRUE", "c": " off ", "d": "1", "e": true, "f": 0}});
        let out = render(
            "<?php return [{{ p.a | boolean }}, {{ p.b | boolean }}, {{ p.c | boolean }}, {{ p.d | boolean }}, {{ p.e | boolean }}, {{ p.f | boolean }}, {{ p.a }}];",
            "env.php",
            ctx,
        )
        .unwrap();
        assert_eq!(
            out,
            "<?php return [false, true, false, true, true, false, 'false'];"
        );
        // Anything else is an error at its line that does not quote the value.
        for bad in ["flase", "", "7", "s3cr3t-value"] {
            let e = render(
                "<?php\nreturn [\n 'x' => {{ p.x | boolean }},\n];",
                "env.php",
                serde_json::json!({"p": {"x": bad}}),
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("line 3") && e.contains("boolean filter"), "{e}");
            assert!(bad.is_empty() || !e.contains(bad), "the value leaked: {e}");
        }
        // In a condition as well (not only in output).
        let out = render(
            "{% if p.a | boolean %}on{% else %}off{% endif %}",
            "x.conf",
            serde_json::json!({"p": {"a": "No"}}),
        )
        .unwrap();
        assert_eq!(out, "off");
    }

    #[test]
    fn non_php_targets_are_plain_text() {
        assert_eq!(
            render("host={{ h }}", "x.conf", serde_json::json!({"h": "a'b"})).unwrap(),
            "host=a'b"
        );
        assert_eq!(
            render(
                "{\"h\": {{ h }}}",
                "x.json",
                serde_json::json!({"h": "a\"b"})
            )
            .unwrap(),
            "{\"h\": \"a\\\"b\"}"
        );
    }

    #[test]
    fn missing_parameter_names_the_expression_and_line() {
        let e = render(
            "<?php\nreturn [\n 'host' => {{ params.db.hots }},\n];",
            "env.php",
            serde_json::json!({"params": {"db": {"host": "h"}}}),
        )
        .unwrap_err();
        let s = e.to_string();
        assert!(s.contains("line 3") && s.contains("params.db.hots"), "{s}");
    }

    #[test]
    fn world_readable_modes_are_refused() {
        let t = TemplateConfig {
            source: "a".into(),
            target: "app/etc/env.php".into(),
            owner: None,
            group: None,
            mode: "0644".into(),
            check: None,
            check_timeout: default_check_timeout(),
        };
        assert_eq!(t.validate(0)[0].0, "templates.0.mode");
        assert_eq!(t.check_argv(), vec!["php", "-l", "{path}"]);
        for m in ["4640", "2640"] {
            let t = TemplateConfig {
                mode: m.into(),
                ..t.clone()
            };
            let v = t.validate(0);
            assert_eq!(v.len(), 1, "{m}: {v:?}");
            assert!(
                v[0].1.contains("setuid") || v[0].1.contains("setgid"),
                "{v:?}"
            );
        }
    }
}
