//! Parameters from SSM (moto's server as the endpoint) rendered into env.php, and the
//! promises around it: pagination, types, nesting, retries, a clear error when SSM is down,
//! nothing written on failure, PHP-literal round trips through the real php binary, and a
//! canary secret that must appear in no log line, status output or state file.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use proptest::prelude::*;
use support::text;

const BIN: &str = env!("CARGO_BIN_EXE_bgagent");

fn seed(moto: &support::Moto, prefix: &str, canary: &str) {
    seed_in(moto, "us-east-1", prefix, canary)
}

fn seed_in(moto: &support::Moto, region: &str, prefix: &str, canary: &str) {
    let mut p: Vec<(String, String, bool)> = vec![
        (format!("{prefix}/db/host"), "db.internal".into(), false),
        (format!("{prefix}/db/name"), "magento".into(), false),
        (format!("{prefix}/db/user"), "mage".into(), false),
        (format!("{prefix}/db/password"), canary.into(), true),
        (
            format!("{prefix}/crypt/key"),
            "k3y-0123456789abcdef".into(),
            true,
        ),
        (
            format!("{prefix}/backend/frontname"),
            "admin_x".into(),
            false,
        ),
        (
            format!("{prefix}/redis/host"),
            "cache.internal".into(),
            false,
        ),
        (format!("{prefix}/redis/port"), "6379".into(), false),
        (
            format!("{prefix}/install/date"),
            "Sun, 22 Nov 2026".into(),
            false,
        ),
        (format!("{prefix}/deep/a/b/c"), "nested".into(), false),
    ];
    for i in 0..14 {
        p.push((format!("{prefix}/extra/x{i}"), format!("v{i}"), false));
    }
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(support::put_parameters_in(&moto.endpoint(), region, &p));
}

struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    fn new(params_yaml: &str, template: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("env.php.j2"), template).unwrap();
        let cfg = format!(
            "app_root: app\nstate_dir: state\nsocket: {{ path: run/s.sock, group: null }}\napp: {{ kind: php, name: shop }}\n\
             {params_yaml}\ntemplates:\n  - source: env.php.j2\n    target: app/etc/env.php\n"
        );
        std::fs::write(dir.path().join("bgagent.yaml"), cfg).unwrap();
        let rel = dir.path().join("rel");
        std::fs::create_dir_all(rel.join("pub")).unwrap();
        std::fs::write(rel.join("pub/index.php"), "<?php echo 1;").unwrap();
        Node { dir }
    }
    fn cmd(&self, args: &[&str]) -> Output {
        let mut c = Command::new(BIN);
        c.arg("--config")
            .arg(self.dir.path().join("bgagent.yaml"))
            .args(args);
        for (k, v) in support::AWS_ENV {
            c.env(k, v);
        }
        c.output().unwrap()
    }
    fn deploy(&self) -> Output {
        self.cmd(&["deploy", self.dir.path().join("rel").to_str().unwrap()])
    }
    fn p(&self, rel: &str) -> std::path::PathBuf {
        self.dir.path().join(rel)
    }
}

fn ssm_params(endpoint: &str, prefix: &str, attempts: u32) -> String {
    format!(
        "params:\n  source: ssm\n  paths: [{prefix}]\n  region: us-east-1\n  endpoint_url: {endpoint}\n  max_attempts: {attempts}\n  initial_backoff: 20ms\n  max_backoff: 100ms"
    )
}

fn php_include_json(file: &Path) -> serde_json::Value {
    support::require("php");
    let out = Command::new("php")
        .args([
            "-r",
            "echo json_encode(include $argv[1], JSON_UNESCAPED_UNICODE|JSON_UNESCAPED_SLASHES);",
        ])
        .arg(file)
        .output()
        .unwrap();
    assert!(out.status.success(), "php: {}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
}

const CANARY: &str = "CANARY-7f3a'\\\"$x{y}?><?php\nexit;";

#[test]
fn ssm_parameters_render_into_env_php_and_the_canary_stays_out_of_logs() {
    let moto = support::Moto::start();
    seed(&moto, "/shop/prod", CANARY);
    let template = std::fs::read_to_string(support::repo().join("packaging/templates/env.php.j2")).unwrap()
        // nested paths, and the last page's parameters (unreachable code, but parsed by php -l)
        + "$nested = [{{ params.deep.a.b.c }}, {{ params.extra.x13 }}];\n";
    let node = Node::new(&ssm_params(&moto.endpoint(), "/shop/prod", 3), &template);
    let out = node.deploy();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("read SSM parameters under /shop/prod (3 page(s))"),
        "24 parameters take 3 pages of 10: {t}"
    );
    assert!(
        t.contains("rendered 1 template(s) from 24 parameter(s)"),
        "{t}"
    );

    // The file: the real php reads back every value byte for byte, canary included.
    let env = node.p("app/current/app/etc/env.php");
    let php = php_include_json(&env);
    assert!(
        std::fs::read_to_string(&env)
            .unwrap()
            .contains("$nested = ['nested', 'v13'];")
    );
    assert_eq!(php["db"]["connection"]["default"]["password"], CANARY);
    assert_eq!(php["db"]["connection"]["default"]["host"], "db.internal");
    assert_eq!(
        php["cache"]["frontend"]["page_cache"]["backend_options"]["database"],
        1
    );
    assert_eq!(php["deployment"]["blue_green"]["enabled"], true);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&env).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o640);

    // Status records versions and types, no values.
    let st = node.cmd(&["status", "--json"]);
    let sj: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(
        sj["current_release"]["params"]["/shop/prod/db/password"]["type"],
        "SecureString"
    );
    assert_eq!(
        sj["current_release"]["params"]["/shop/prod/db/password"]["version"],
        1
    );

    // --dry-run redacts, --check sees no drift, then drift after a change in SSM.
    let dry = node.cmd(&["render", "--dry-run"]);
    assert!(dry.status.success(), "{}", text(&dry));
    assert!(
        text(&dry).contains("'<redacted:/shop/prod/db/password>'"),
        "{}",
        text(&dry)
    );
    let chk = node.cmd(&["render", "--check"]);
    assert_eq!(chk.status.code(), Some(0), "{}", text(&chk));
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(support::put_parameters(
            &moto.endpoint(),
            &[("/shop/prod/db/host".into(), "db2.internal".into(), false)],
        ));
    let chk = node.cmd(&["render", "--check"]);
    assert_eq!(chk.status.code(), Some(1), "{}", text(&chk));
    assert!(
        text(&chk).contains("/shop/prod/db/host (version 1 -> 2)"),
        "{}",
        text(&chk)
    );

    // The canary: in no output, status, or state file (the journal gets the same events
    // as these log lines).
    let state = std::fs::read_to_string(node.p("state/state.json")).unwrap();
    for (what, s) in [
        ("deploy output", t),
        ("status", text(&st)),
        ("dry run", text(&dry)),
        ("check", text(&chk)),
        ("state.json", state),
    ] {
        assert!(!s.contains("CANARY-7f3a"), "the canary leaked into {what}");
    }
}

#[test]
fn ssm_down_retries_then_fails_clearly_and_nothing_is_written() {
    let port = support::free_port(); // nothing listens here
    let node = Node::new(
        &ssm_params(&format!("http://127.0.0.1:{port}"), "/shop/prod", 3),
        "<?php return {{ params.db.host }};",
    );
    let out = node.deploy();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("attempt 1/3") && t.contains("attempt 2/3"),
        "retries are logged: {t}"
    );
    assert!(
        t.contains("failed to read SSM parameters under /shop/prod after 3 attempt(s)"),
        "{t}"
    );
    assert!(!node.p("app/current").exists(), "nothing went live");
    let releases: Vec<_> = std::fs::read_dir(node.p("app/releases")).unwrap().collect();
    assert!(
        releases.is_empty(),
        "no half-built release is left: {releases:?}"
    );
}

#[test]
fn a_missing_parameter_names_itself_and_the_live_release_keeps_serving() {
    let d = tempfile::tempdir().unwrap();
    let params = d.path().join("p.yaml");
    std::fs::write(&params, "db:\n  host: h\n").unwrap();
    let yaml = format!("params:\n  source: file\n  path: {}", params.display());
    let good = Node::new(&yaml, "<?php return [{{ params.db.host }}];");
    assert!(good.deploy().status.success());
    let live = std::fs::read_link(good.p("app/current")).unwrap();
    std::fs::write(
        good.p("env.php.j2"),
        "<?php\nreturn [\n  {{ params.db.hots }},\n];\n",
    )
    .unwrap();
    let out = good.deploy();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("line 3") && t.contains("`params.db.hots` is undefined"),
        "{t}"
    );
    assert_eq!(std::fs::read_link(good.p("app/current")).unwrap(), live);
    assert_eq!(
        std::fs::read_dir(good.p("app/releases")).unwrap().count(),
        1
    );

    // A syntax error caught by php -l: reported by line, content not echoed.
    support::require("php");
    std::fs::write(
        good.p("env.php.j2"),
        "<?php\nreturn [ {{ params.db.host }} \n",
    )
    .unwrap();
    let out = good.deploy();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("php -l rejected the rendered app/etc/env.php"),
        "{t}"
    );
    assert_eq!(std::fs::read_link(good.p("app/current")).unwrap(), live);
}

/// The check's output went to pipes nobody read while it ran: a check printing more than a
/// pipe holds blocked until the fixed 60 s limit and was then reported as "ran for more than
/// 60 s". Its exit code is what counts, and its output (which may quote a secret) is not shown.
#[test]
fn a_check_that_prints_more_than_a_pipe_holds_is_judged_by_its_exit_code() {
    support::require("php");
    let node = Node::new("", "<?php return ['secret-ish' => 1];");
    let live = node.deploy();
    assert!(live.status.success(), "{}", text(&live));
    let cfg = std::fs::read_to_string(node.p("bgagent.yaml")).unwrap();
    std::fs::write(
        node.p("bgagent.yaml"),
        format!(
            "{cfg}    check: [php, -r, 'echo str_repeat(\"x\", 300000); exit(3);', \"{{path}}\"]\n"
        ),
    )
    .unwrap();
    let out = node.deploy();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("rejected the rendered app/etc/env.php (exit 3)"),
        "{t}"
    );
    assert!(
        !t.contains("xxxxxxxx"),
        "the check's output is not shown: {t}"
    );
}

/// At its deadline only the check itself was killed: what it had started lived on. The whole
/// process group is ended, the deadline is the template's `check_timeout`, and the error says
/// which key to raise.
#[test]
fn a_check_killed_at_its_timeout_left_its_children_running() {
    let node = Node::new("", "<?php return [];");
    assert!(node.deploy().status.success());
    let live = std::fs::read_link(node.p("app/current")).unwrap();
    let pidfile = node.p("child.pid");
    let cfg = std::fs::read_to_string(node.p("bgagent.yaml")).unwrap();
    std::fs::write(
        node.p("bgagent.yaml"),
        format!(
            "{cfg}    check: [sh, -c, 'sleep 300 & echo $! > \"$0\"; wait', {}]\n    check_timeout: 1s\n",
            pidfile.display()
        ),
    )
    .unwrap();
    let out = node.deploy();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("raise templates[].check_timeout"), "{t}");
    assert_eq!(std::fs::read_link(node.p("app/current")).unwrap(), live);
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The child was SIGKILLed with the group; it may linger as a zombie only until init
    // reaps it, so look at its state, not its existence.
    let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.split_whitespace().nth(2).is_some_and(|st| st == "Z"))
        .unwrap_or(false);
    assert!(!alive, "the check's child {pid} is still running");
}

#[test]
fn nul_bytes_are_refused_by_name() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("p.yaml");
    std::fs::write(&p, "db:\n  password: \"a\\0b\"\nsecure: [db.password]\n").unwrap();
    let set = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(bgagent::params::load(
            &bgagent::params::ParamsConfig::File { path: p },
            d.path(),
        ))
        .unwrap();
    let t = bgagent::render::TemplateConfig {
        source: d.path().join("t.j2"),
        target: "app/etc/env.php".into(),
        owner: None,
        group: None,
        mode: "0640".into(),
        check: Some(vec![]),
        check_timeout: std::time::Duration::from_secs(60),
    };
    std::fs::write(&t.source, "<?php return {{ params.db.password }};").unwrap();
    let e = bgagent::render::render_all(&[t], d.path(), &set, &serde_json::json!({})).unwrap_err();
    assert_eq!(
        e.to_string(),
        "parameter db.password contains a NUL byte, which cannot be written into a config file"
    );
}

#[test]
fn golden_env_php() {
    let d = tempfile::tempdir().unwrap();
    let set = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(bgagent::params::load(
            &bgagent::params::ParamsConfig::File {
                path: support::repo().join("examples/params.yaml"),
            },
            d.path(),
        ))
        .unwrap();
    let t = bgagent::render::TemplateConfig {
        source: support::repo().join("packaging/templates/env.php.j2"),
        target: "app/etc/env.php".into(),
        owner: None,
        group: None,
        mode: "0640".into(),
        check: None,
        check_timeout: std::time::Duration::from_secs(60),
    };
    let cfg = bgagent::config::Config::default();
    let facts = bgagent::events::template_facts(
        &cfg,
        "20261122T120000Z-d-GOLDEN",
        "d-GOLDEN",
        "shop",
        None,
        &cfg.cache.facts(1, "shop"),
    );
    let out = bgagent::render::render_all(&[t], d.path(), &set, &facts).unwrap();
    let got = out[0].content.expose();
    let golden = support::repo().join("tests/golden/env.php");
    if std::env::var_os("BGAGENT_BLESS").is_some() {
        std::fs::write(&golden, got).unwrap();
    }
    assert_eq!(
        got,
        &std::fs::read_to_string(&golden).unwrap(),
        "set BGAGENT_BLESS=1 to accept a change"
    );
    let parsed = php_include_json(&golden);
    assert_eq!(
        parsed["cache"]["frontend"]["default"]["backend_options"]["database"],
        3
    );
    assert_eq!(
        parsed["cache"]["frontend"]["default"]["id_prefix"],
        "shop_1_"
    );
    assert_eq!(parsed["session"]["redis"]["database"], 2);
}

fn tricky() -> impl Strategy<Value = String> {
    let pieces = prop::sample::select(vec![
        "'", "\\", "\\'", "'\\", "$", "{", "}", "${x}", "\n", "\r\n", "?>", "<?php", "\"", "é",
        "日本", "🙂", "\t", " ", "a", "0", "\\\\", "''", "*/", "/*", "#", "//",
    ]);
    prop::collection::vec(pieces, 0..12).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn any_string_round_trips_through_php(values in prop::collection::vec(tricky(), 1..16), extra in "\\PC{0,24}") {
        let mut all = values.clone();
        all.push(extra);
        let ctx = minijinja::Value::from(minijinja::value::Serde(serde_json::json!({ "v": all })));
        let mut src = String::from("<?php\nreturn [\n");
        for i in 0..all.len() {
            src.push_str(&format!("  {{{{ v[{i}] }}}},\n"));
        }
        src.push_str("];\n");
        let rendered = bgagent::render::render_one(Path::new("t.j2"), &src, Path::new("env.php"), &ctx).unwrap();
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("env.php");
        std::fs::write(&f, rendered).unwrap();
        let back = php_include_json(&f);
        prop_assert_eq!(back, serde_json::json!(all));
    }
}

/// The production path: no credentials and no region anywhere but the instance metadata
/// service. The SDK's standard chain must take the instance role's credentials and the region
/// from IMDSv2 (a session token first, then the role). The stand-in refuses IMDSv1.
#[test]
fn credentials_and_region_come_from_the_instance_metadata_service_v2() {
    let moto = support::Moto::start();
    // Only in eu-west-1, the region the metadata service gives: found there or not at all.
    seed_in(&moto, "eu-west-1", "/shop/imds", "imds-s3cret");
    let imds = support::Imds::start("shop-node-role", "eu-west-1");
    let node = imds_node(&moto);
    let out = without_aws_settings(&node, &imds.endpoint());
    let t = text(&out);
    assert!(out.status.success(), "{t}\nIMDS:\n{}", imds.requests());
    let php = php_include_json(&node.p("app/current/app/etc/env.php"));
    assert_eq!(php["host"], "db.internal");
    assert_eq!(php["password"], "imds-s3cret");
    for secret in [
        "imds-s3cret",
        "imds-stand-in-secret",
        "imds-stand-in-session-token",
    ] {
        assert!(!t.contains(secret), "`{secret}` reached the output: {t}");
    }
    // IMDSv2: a token first, then the role's credentials and the region, all with the token.
    let log = imds.requests();
    let at = |line: &str| {
        log.lines()
            .position(|l| l == line)
            .unwrap_or_else(|| panic!("the IMDS stand-in saw no `{line}`:\n{log}"))
    };
    let token = at("PUT /latest/api/token 200");
    assert!(token < at("GET /latest/meta-data/iam/security-credentials/shop-node-role 200"));
    at("GET /latest/meta-data/placement/region 200");
    assert!(
        !log.contains(" 401"),
        "a request went without a token:\n{log}"
    );
}

/// No instance role (the metadata service is not there): the error says credentials, and
/// where to look; nothing is deployed.
#[test]
fn without_an_instance_role_the_error_names_the_credentials() {
    let moto = support::Moto::start();
    seed(&moto, "/shop/imds", "imds-s3cret");
    let node = imds_node(&moto);
    let closed = format!("http://127.0.0.1:{}", support::free_port());
    let out = without_aws_settings(&node, &closed);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("the request was not sent") && t.contains("credentials"),
        "the cause is named: {t}"
    );
    assert!(t.contains("Check the instance role"), "{t}");
    assert!(!node.p("app/current").exists(), "nothing went live");
    // The SDK's own warnings (with raw responses in them) stay out of the output.
    assert!(
        !t.contains("failed to load region from IMDS") && !t.contains("FailedToLoadToken"),
        "{t}"
    );
}

fn imds_node(moto: &support::Moto) -> Node {
    let params = format!(
        "params:\n  source: ssm\n  paths: [/shop/imds]\n  endpoint_url: {}\n  max_attempts: 2\n  initial_backoff: 20ms\n  max_backoff: 100ms",
        moto.endpoint()
    );
    Node::new(
        &params,
        "<?php return ['host' => {{ params.db.host }}, 'password' => {{ params.db.password }}];\n",
    )
}

/// `bgagent deploy` with no AWS setting from the environment or a profile, only the
/// metadata service's address.
fn without_aws_settings(node: &Node, imds: &str) -> Output {
    let home = node.p("home");
    std::fs::create_dir_all(&home).unwrap();
    let mut c = Command::new(BIN);
    c.arg("--config")
        .arg(node.p("bgagent.yaml"))
        .arg("deploy")
        .arg(node.p("rel"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("AWS_") {
            c.env_remove(k);
        }
    }
    // The default log filter: the test checks what it keeps out.
    c.env_remove("BGAGENT_LOG");
    c.env("HOME", &home)
        .env("AWS_CONFIG_FILE", home.join("no-config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", home.join("no-credentials"))
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds);
    c.output().unwrap()
}
