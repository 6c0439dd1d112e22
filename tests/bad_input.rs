//! Input from outside that used to be taken silently or answered unclearly: parameter files
//! whose YAML is not a string, templates that put a value into minijinja's error, malformed
//! CodeDeploy ids. Through the real binary.

mod support;

use std::path::PathBuf;
use std::process::{Command, Output};

use support::text;

const BIN: &str = env!("CARGO_BIN_EXE_bgagent");

struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    fn new(params: &str, template: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("p.yaml"), params).unwrap();
        std::fs::write(d.join("env.php.j2"), template).unwrap();
        std::fs::write(
            d.join("bgagent.yaml"),
            format!(
                "app_root: app\nstate_dir: state\nsocket: {{ path: run/s.sock, group: null }}\napp: {{ kind: php }}\n\
                 params: {{ source: file, path: {} }}\n\
                 templates:\n  - {{ source: env.php.j2, target: app/etc/env.php, check: [] }}\n",
                d.join("p.yaml").display()
            ),
        )
        .unwrap();
        std::fs::create_dir_all(d.join("rel/pub")).unwrap();
        std::fs::write(d.join("rel/pub/index.php"), "<?php").unwrap();
        Node { dir }
    }
    fn p(&self, s: &str) -> PathBuf {
        self.dir.path().join(s)
    }
    fn cmd(&self, args: &[&str]) -> Output {
        support::bgagent(&self.p("bgagent.yaml"), args)
    }
    fn deploy(&self) -> Output {
        self.cmd(&["deploy", self.p("rel").to_str().unwrap()])
    }
}

#[test]
fn unquoted_yaml_numbers_in_file_params_keep_their_exact_text() {
    // Read as YAML numbers these became 123, 0, 1000.0 and a rounded float: a wrong DB
    // password or crypt key, rendered without a word.
    let n = Node::new(
        "db:\n  password: 0123\n  key: 00000000000000000000000000000000\n  exp: 1e3\n  big: 123456789012345678901234567890\n  port: 3306\n  flag: true\n  quoted: \"0123\"\n",
        "<?php return [{{ params.db.password }}, {{ params.db.key }}, {{ params.db.exp }}, {{ params.db.big }}, {{ params.db.port }}, {{ params.db.flag }}, {{ params.db.quoted }}];\n",
    );
    let out = n.deploy();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        std::fs::read_to_string(n.p("app/current/app/etc/env.php")).unwrap(),
        "<?php return ['0123', '00000000000000000000000000000000', '1e3', '123456789012345678901234567890', '3306', 'true', '0123'];\n"
    );
}

#[test]
fn yaml_null_or_list_in_file_params_is_refused_at_its_line_and_column() {
    for (yaml, key, what) in [
        ("db:\n  host: h\n  password: ~\n", "db.password", "no value"),
        ("db:\n  host: h\n  password:\n", "db.password", "no value"),
        ("db:\n  host: h\n  hosts: [a, b]\n", "db.hosts", "list"),
    ] {
        let n = Node::new(yaml, "<?php return [{{ params.db.host }}];\n");
        let out = n.deploy();
        let t = text(&out);
        assert_eq!(out.status.code(), Some(1), "{t}");
        assert!(
            t.contains(&format!("line 3, column")) && t.contains(&format!("`{key}`")),
            "{t}"
        );
        assert!(t.contains(what), "{t}");
        assert!(t.contains("p.yaml"), "the file is named: {t}");
        assert!(!n.p("app/current").exists());
    }
}

#[test]
fn render_error_from_include_never_quotes_the_secret_in_its_name() {
    let n = Node::new(
        "db:\n  password: \"s3cret-canary\"\n",
        "<?php return [{% include params.db.password %}];\n",
    );
    let out = n.deploy();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("env.php.j2"), "{t}");
    assert!(
        !t.contains("s3cret-canary"),
        "the secret reached the error:\n{t}"
    );
    let state = std::fs::read_to_string(n.p("state/state.json")).unwrap_or_default();
    assert!(
        !state.contains("s3cret-canary"),
        "the secret reached state.json"
    );
}

#[test]
fn malformed_deployment_id_is_a_usage_error_and_a_10_kb_id_keeps_the_reason_in_the_tail() {
    let n = Node::new("a: \"b\"\n", "<?php\n");
    let hook = |id: &str| {
        Command::new(BIN)
            .arg("--config")
            .arg(n.p("bgagent.yaml"))
            .args(["hook", "BeforeInstall"])
            .env("DEPLOYMENT_ID", id)
            .env("LIFECYCLE_EVENT", "BeforeInstall")
            .output()
            .unwrap()
    };
    let out = hook("d-ABC\nINFO forged: AfterInstall succeeded");
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.contains("d-ABC\\nINFO forged"), "escaped: {t}");
    assert!(!t.contains("\nINFO forged"), "printed raw: {t}");
    let long = format!("d-{}", "A;".repeat(5000));
    let out = hook(&long);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    // CodeDeploy shows the last 2048 characters of a hook's output.
    let tail: String = t
        .chars()
        .rev()
        .take(2048)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    assert!(tail.contains("is not a CodeDeploy id"), "{tail}");
}

#[test]
fn render_without_a_flag_is_a_usage_error() {
    let n = Node::new("a: \"b\"\n", "<?php\n");
    let out = n.cmd(&["render"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--dry-run"), "{}", text(&out));
}

/// Issue 12 (log injection): APPLICATION_NAME and DEPLOYMENT_GROUP_NAME went from the hook's
/// environment into the daemon's log lines, status and Redis keys as they were, so a newline
/// in one forged a log line. They are refused as usage errors (exit 2) and shown escaped.
#[test]
fn application_or_group_name_with_a_newline_is_a_usage_error_shown_escaped() {
    let n = Node::new("a: \"b\"\n", "<?php\n");
    for var in ["APPLICATION_NAME", "DEPLOYMENT_GROUP_NAME"] {
        let out = Command::new(BIN)
            .arg("--config")
            .arg(n.p("bgagent.yaml"))
            .args(["hook", "BeforeInstall"])
            .env("DEPLOYMENT_ID", "d-NAME1")
            .env("DEPLOYMENT_GROUP_ID", "g-1")
            .env("LIFECYCLE_EVENT", "BeforeInstall")
            .env(var, "shop\nINFO forged: AfterInstall succeeded")
            .output()
            .unwrap();
        let t = text(&out);
        assert_eq!(out.status.code(), Some(2), "{var}: {t}");
        assert!(
            t.contains(var) && t.contains("shop\\nINFO forged"),
            "{var}: {t}"
        );
        assert!(!t.contains("\nINFO forged"), "{var} printed raw: {t}");
    }
}

/// `config check` on a config with one mistake of every kind `validate` and the host check
/// know: each is named once, by key, at its own line and column (flow style too), on stderr,
/// and users and groups that do not exist are listed with the rest instead of only after
/// the others are fixed. Before, flow-style keys had no line, and the host's errors stayed
/// hidden until the file was otherwise valid.
#[test]
fn config_check_names_every_mistake_once_at_its_line_including_missing_users_and_groups() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bgagent.yaml");
    std::fs::write(
        &cfg,
        r#"app_root: app
state_dir: state
socket: { path: run/s.sock, group: no-such-group-bg }
app: { kind: php }
permissions: { owner: no-such-user-bg }
templates:
  - { source: env.php.j2, target: app/etc/env.php, group: no-such-group-t, check: [php, -l, "{file}"] }
commands:
  AfterInstall:
    - { argv: [bin/magento, "{pdi}"], user: no-such-user-c }
health:
  checks:
    - { name: web, http: { url: "ftp://127.0.0.1/health" } }
    - name: cache
      redis: { url: "not a url" }
services:
  backend: exec
  list:
    - { name: php-fpm, reload: [kill, -USR2, "{pdi}"], pid_file: /run/php.pid }
"#,
    )
    .unwrap();
    let out = support::bgagent(&cfg, &["config", "check"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{err}");
    assert!(out.stdout.is_empty(), "errors go to stderr only");
    for (key, at, what) in [
        ("socket.group", "3:29", "no group named `no-such-group-bg`"),
        (
            "permissions.owner",
            "5:16",
            "no user named `no-such-user-bg`",
        ),
        (
            "templates.0.group",
            "7:52",
            "no group named `no-such-group-t`",
        ),
        ("templates.0.check", "7:76", "unknown placeholder `{file}`"),
        (
            "commands.AfterInstall.0.argv",
            "10:9",
            "unknown placeholder `{pdi}`",
        ),
        (
            "commands.AfterInstall.0.user",
            "10:39",
            "no user named `no-such-user-c`",
        ),
        (
            "health.checks.0.http.url",
            "13:28",
            "the scheme must be http:// or https://",
        ),
        (
            "health.checks.1.redis.url",
            "15:16",
            "`not a url` is not a URL",
        ),
        (
            "services.list.0.reload",
            "19:24",
            "unknown placeholder `{pdi}` (known here: {pid})",
        ),
    ] {
        let line = format!("bgagent.yaml:{at}: `{key}`: ");
        let hits: Vec<&str> = err.lines().filter(|l| l.contains(&line)).collect();
        assert_eq!(hits.len(), 1, "`{key}` once at {at}:\n{err}");
        assert!(hits[0].contains(what), "{key}: {}", hits[0]);
    }
}

/// An artifact path with a newline forged a log line ("revision at ...\nINFO fake: ...")
/// in BeforeInstall's result; every path from outside is shown escaped, on one line.
#[test]
fn an_artifact_path_with_a_newline_forged_a_log_line() {
    let n = Node::new("db: {}\n", "<?php return [];");
    let evil = n.p("rel\nINFO forged: deployment succeeded");
    std::fs::rename(n.p("rel"), &evil).unwrap();
    let out = n.cmd(&["deploy", evil.to_str().unwrap()]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(
        !t.lines().any(|l| l.starts_with("INFO forged")),
        "a forged line: {t}"
    );
    assert!(t.contains("rel\\nINFO forged"), "shown escaped: {t}");
    let missing = n.p("gone\nERROR forged");
    let out = n.cmd(&["deploy", missing.to_str().unwrap()]);
    let t = text(&out);
    assert_ne!(out.status.code(), Some(0), "{t}");
    assert!(
        !t.lines().any(|l| l.starts_with("ERROR forged")),
        "a forged line: {t}"
    );
}
