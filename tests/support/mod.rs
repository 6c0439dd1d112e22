//! Starts real components privately for the integration tests: each in its own temp
//! directory, on 127.0.0.1 and a free port, stopped by PID when dropped.
#![allow(dead_code)]

pub mod fleet;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Fails with the fix when a tool is missing.
pub fn require(bin: &str) -> PathBuf {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
    {
        let p = Path::new(dir).join(bin);
        if p.exists() {
            return p;
        }
    }
    panic!("{bin} is not installed: run scripts/install-test-deps.sh");
}

/// Writes the Magento model (tests/fixtures/magento-model, see its Model.php) into `dst`, a
/// release or a revision directory, with the overlay tests/fixtures/magento-variants/<variant>
/// on top when given ("additive": Vendor_Shop 1.1.0 with a new table and a nullable column;
/// "breaking": Vendor_Shop 1.2.0 renaming shop_product.price). `dst` gets no env.php: bgagent
/// renders it (or the test writes it).
pub fn magento_model(dst: &Path, variant: Option<&str>) {
    std::fs::create_dir_all(dst).unwrap();
    let fx = repo().join("tests/fixtures");
    let mut srcs = vec![fx.join("magento-model")];
    if let Some(v) = variant {
        srcs.push(fx.join("magento-variants").join(v));
    }
    for src in srcs {
        assert!(src.is_dir(), "no fixture {}", src.display());
        let out = Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", src.display()))
            .arg(dst)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cp: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn wait_port(port: u16, what: &str, log: &Path) {
    let t0 = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if t0.elapsed() > Duration::from_secs(20) {
            panic!(
                "{what} did not listen on {port}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The instance metadata service stand-in (tests/support/imds.py, IMDSv2 only).
pub struct Imds {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Imds {
    pub fn start(role: &str, region: &str) -> Imds {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let log = dir.path().join("imds.log");
        let child = Command::new(require("python3"))
            .arg(repo().join("tests/support/imds.py"))
            .args([&port.to_string(), role, region])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        wait_port(port, "the IMDS stand-in", &log);
        Imds { child, port, dir }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The requests it answered, one line each: METHOD PATH STATUS.
    pub fn requests(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("imds.log")).unwrap_or_default()
    }
}

impl Drop for Imds {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// moto's server as the SSM endpoint.
pub struct Moto {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Moto {
    pub fn start() -> Moto {
        let venv = std::env::var("BGAGENT_MOTO_VENV")
            .map(PathBuf::from)
            .unwrap_or_else(|_| repo().join("target/venv-moto"));
        let bin = venv.join("bin/moto_server");
        assert!(
            bin.exists(),
            "{} missing: run scripts/install-test-deps.sh",
            bin.display()
        );
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let log = dir.path().join("moto.log");
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.path().join("moto.err")).unwrap())
            .spawn()
            .unwrap();
        wait_port(port, "moto_server", &log);
        Moto {
            child,
            port,
            _dir: dir,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// moto's request log ("PUT /latest/api/token HTTP/1.1" 200 ...), one line a request.
    pub fn requests(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("moto.err")).unwrap_or_default()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Dummy credentials and region for the SDK talking to moto (moto accepts any signature).
pub const AWS_ENV: [(&str, &str); 4] = [
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_REGION", "us-east-1"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
];

/// Puts parameters into moto with the SDK: (name, value, secure).
pub async fn put_parameters(endpoint: &str, params: &[(String, String, bool)]) {
    put_parameters_in(endpoint, "us-east-1", params).await
}

/// The same, in another region (moto keeps one store per region).
pub async fn put_parameters_in(endpoint: &str, region: &str, params: &[(String, String, bool)]) {
    let creds = aws_sdk_ssm::config::Credentials::new("testing", "testing", None, None, "test");
    let conf = aws_sdk_ssm::Config::builder()
        .behavior_version(aws_sdk_ssm::config::BehaviorVersion::latest())
        .region(aws_sdk_ssm::config::Region::new(region.to_string()))
        .credentials_provider(creds)
        .endpoint_url(endpoint)
        .build();
    let c = aws_sdk_ssm::Client::from_conf(conf);
    for (name, value, secure) in params {
        let t = if *secure {
            aws_sdk_ssm::types::ParameterType::SecureString
        } else {
            aws_sdk_ssm::types::ParameterType::String
        };
        c.put_parameter()
            .name(name)
            .value(value)
            .r#type(t)
            .overwrite(true)
            .send()
            .await
            .unwrap();
    }
}

fn read_pid(p: &Path) -> Option<i32> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

fn kill_pidfile(p: &Path) {
    if let Some(pid) = read_pid(p) {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let t0 = Instant::now();
        while Path::new(&format!("/proc/{pid}")).exists() && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub struct Redis {
    pub port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_with(&[])
    }

    /// With extra server options, e.g. `["--enable-debug-command", "yes"]` for DEBUG POPULATE.
    /// No persistence (like many production cache servers): a restart loses every key.
    pub fn start_with(extra: &[&str]) -> Redis {
        let r = Redis {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        r.launch();
        r
    }

    fn launch(&self) {
        let bin = require("redis-server");
        let dir = &self.dir;
        let st = Command::new(bin)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "yes",
            ])
            .arg("--dir")
            .arg(dir.path())
            .arg("--pidfile")
            .arg(dir.path().join("redis.pid"))
            .arg("--logfile")
            .arg(dir.path().join("redis.log"))
            .args(&self.extra)
            .status()
            .unwrap();
        assert!(st.success());
        wait_port(self.port, "redis", &dir.path().join("redis.log"));
    }

    /// Stops the server (its data goes with it: no persistence) and starts it again on the
    /// same port.
    pub fn restart(&self) {
        kill_pidfile(&self.dir.path().join("redis.pid"));
        let t0 = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(t0.elapsed() < Duration::from_secs(10), "redis did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.launch();
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `redis-cli -n DB ARGS` against this server; its reply, trimmed.
    pub fn cli(&self, db: u32, args: &[&str]) -> String {
        let out = Command::new(require("redis-cli"))
            .args(["-p", &self.port.to_string(), "-n", &db.to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        kill_pidfile(&self.dir.path().join("redis.pid"));
    }
}

pub struct MariaDb {
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

impl MariaDb {
    pub fn start() -> MariaDb {
        let install = require("mariadb-install-db");
        let server = require("mariadbd");
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // A private tmpdir: parallel bootstraps sharing /tmp trip over each other's temp tables.
        std::fs::create_dir_all(d.join("tmp")).unwrap();
        let out = Command::new(install)
            .args([
                "--no-defaults",
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ])
            .arg(format!("--tmpdir={}", d.join("tmp").display()))
            .arg(format!("--datadir={}", d.join("db").display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mariadb-install-db: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let log = d.join("mariadb.err");
        let child = Command::new(server)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", d.join("db").display()))
            .arg(format!("--socket={}", d.join("mysqld.sock").display()))
            .arg(format!("--tmpdir={}", d.join("tmp").display()))
            .arg(format!("--port={port}"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--pid-file={}", d.join("mariadbd.pid").display()))
            .arg(format!("--log-error={}", log.display()))
            .args([
                "--user=root",
                "--skip-name-resolve",
                "--innodb-buffer-pool-size=64M",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_port(port, "mariadbd", &log);
        let m = MariaDb { port, child, dir };
        m.sql("CREATE DATABASE app; CREATE USER 'app'@'127.0.0.1' IDENTIFIED BY 'apppass'; GRANT ALL ON *.* TO 'app'@'127.0.0.1'; FLUSH PRIVILEGES;");
        m
    }

    /// Runs SQL as root through the socket, by argv.
    pub fn sql(&self, q: &str) -> String {
        let out = Command::new(require("mariadb"))
            .arg("--no-defaults")
            .arg(format!(
                "--socket={}",
                self.dir.path().join("mysqld.sock").display()
            ))
            .args(["-uroot", "-N", "-B", "-e", q])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mariadb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// php-fpm and nginx serving `<app_root>/current/pub` with $realpath_root.
pub struct Web {
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub fpm_bin: PathBuf,
}

impl Web {
    pub fn start(app_root: &Path) -> Web {
        Web::start_with(app_root, &[])
    }

    /// The same, with more php-fpm arguments (`-d opcache.memory_consumption=8`, ...).
    pub fn start_with(app_root: &Path, fpm_args: &[&str]) -> Web {
        Web::start_full(app_root, fpm_args, None)
    }

    /// One node of a fleet: every response carries `X-Node: <node>` (set by nginx, so even a
    /// response PHP never saw names the node). nginx's stub_status answers on `/nginx_status`
    /// (loopback only) for the drain's in-flight count on every [`Web`] (see [`nginx_conf`]).
    pub fn start_node(app_root: &Path, node: &str) -> Web {
        Web::start_full(app_root, &[], Some(node))
    }

    fn start_full(app_root: &Path, fpm_args: &[&str], node: Option<&str>) -> Web {
        let fpm_bin = ["php-fpm8.2", "php-fpm"]
            .iter()
            .find_map(|b| {
                ["/usr/sbin", "/usr/bin"]
                    .iter()
                    .map(|d| Path::new(d).join(b))
                    .find(|p| p.exists())
            })
            .expect("php-fpm is not installed: run scripts/install-test-deps.sh");
        let dir = tempfile::tempdir().unwrap();
        let d = &dir.path().to_path_buf();
        for sub in ["run", "logs", "tmp"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        std::fs::write(
            d.join("php-fpm.conf"),
            format!(
                "[global]\npid = {d}/run/php-fpm.pid\nerror_log = {d}/logs/php-fpm.log\ndaemonize = yes\nprocess_control_timeout = 10s\n\
                 [www]\nlisten = {d}/run/php-fpm.sock\nlisten.mode = 0666\npm = static\npm.max_children = 4\nclear_env = no\n",
                d = d.display()
            ),
        )
        .unwrap();
        let port = free_port();
        let mut conf = nginx_conf(d, app_root, port);
        if let Some(node) = node {
            let server = format!("server {{ listen 127.0.0.1:{port};");
            assert!(conf.contains(&server), "{conf}");
            conf = conf.replace(
                &server,
                &format!("{server} add_header X-Node {node} always;\n"),
            );
        }
        std::fs::write(d.join("nginx.conf"), conf).unwrap();
        // Built before anything starts: if nginx fails, dropping it stops php-fpm.
        let web = Web { port, dir, fpm_bin };
        let out = Command::new(&web.fpm_bin)
            .args(fpm_args)
            .arg("-R")
            .arg("-y")
            .arg(d.join("php-fpm.conf"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "php-fpm: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = Command::new(require("nginx"))
            .arg("-p")
            .arg(d)
            .arg("-c")
            .arg(d.join("nginx.conf"))
            .arg("-e")
            .arg(d.join("logs/nginx.err"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nginx: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_port(port, "nginx", &d.join("logs/nginx.err"));
        web
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.port, path)
    }

    /// php-fpm's socket, as a FastCGI address.
    pub fn fpm_socket(&self) -> PathBuf {
        self.dir.path().join("run/php-fpm.sock")
    }

    /// The php-fpm master's pid and its workers' pids, sorted: a reload (USR2) changes both.
    pub fn fpm_pids(&self) -> (i32, Vec<i32>) {
        let master = read_pid(&self.dir.path().join("run/php-fpm.pid")).unwrap_or(0);
        let mut workers: Vec<i32> = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|s| {
                        let rest = &s[s.rfind(')')? + 2..];
                        rest.split(' ').nth(1)?.parse::<i32>().ok()
                    })
                    == Some(master)
            })
            .collect();
        workers.sort();
        (master, workers)
    }
}

/// An autoloaded PHP app in `root` (Composer's shape): `n` classes under vendor/acme/lib that
/// extend and use each other, a class map in vendor/composer/autoload_classmap.php, and
/// pub/index.php loading `per_request` of them and answering `release=<RELEASE_ID>`.
/// `bulk` methods per class make each class take more opcache memory.
pub fn autoload_app(root: &Path, id: &str, n: usize, per_request: usize, bulk: usize) {
    let lib = root.join("vendor/acme/lib");
    std::fs::create_dir_all(&lib).unwrap();
    std::fs::create_dir_all(root.join("vendor/composer")).unwrap();
    std::fs::create_dir_all(root.join("pub")).unwrap();
    let mut map = String::from("<?php\nreturn [\n");
    for i in 0..n {
        let parent = if i % 10 == 0 {
            String::new()
        } else {
            format!(" extends C{}", i - 1)
        };
        let mut body = format!(
            "<?php\nnamespace Acme;\nclass C{i}{parent} {{\n    public function v{i}(int $x): int {{ return $x + {i}; }}\n"
        );
        for m in 0..bulk {
            body.push_str(&format!(
                "    public function m{m}(array $a): array {{ $o = []; foreach ($a as $k => $v) {{ $o[$k . '_{m}'] = is_int($v) ? $v * {m} : strrev((string) $v); }} return $o; }}\n"
            ));
        }
        body.push_str("}\n");
        std::fs::write(lib.join(format!("C{i}.php")), body).unwrap();
        map.push_str(&format!(
            "    'Acme\\\\C{i}' => __DIR__ . '/../acme/lib/C{i}.php',\n"
        ));
    }
    map.push_str("];\n");
    std::fs::write(root.join("vendor/composer/autoload_classmap.php"), map).unwrap();
    std::fs::write(
        root.join("vendor/autoload.php"),
        "<?php\n$map = require __DIR__ . '/composer/autoload_classmap.php';\nspl_autoload_register(function ($c) use ($map) { if (isset($map[$c])) { require $map[$c]; } });\n",
    )
    .unwrap();
    std::fs::write(
        root.join("pub/index.php"),
        format!(
            "<?php\nrequire __DIR__ . '/../vendor/autoload.php';\nheader('Content-Type: text/plain');\n$s = 0;\nfor ($i = 0; $i < {per_request}; $i++) {{ $c = 'Acme\\\\C' . $i; $o = new $c(); $m = 'v' . $i; $s += $o->$m(1); }}\necho 'release=' . trim((string) @file_get_contents(__DIR__ . '/../RELEASE_ID')) . \"\\n\";\n"
        ),
    )
    .unwrap();
    std::fs::write(root.join("pub/health.php"), "<?php echo \"OK\\n\";\n").unwrap();
    std::fs::write(root.join("RELEASE_ID"), id).unwrap();
}

/// A built Magento 2 revision in `dir`, as CodeDeploy's agent unpacks it: app/etc, bin/magento
/// (not executable: the permission policy makes it so), generated/, var/, pub/static,
/// pub/media, vendor/ with Composer's relative symlinks. pub/index.php is the fixture's
/// (`release=<id>`); pub/health_check.php answers `OK`, or 500 when `broken` (a release that
/// fails its health checks).
pub fn magento_revision(dir: &Path, id: &str, broken: bool) {
    for sub in [
        "app/etc",
        "bin",
        "generated/code/Magento/Framework",
        "generated/metadata",
        "var/cache",
        "var/view_preprocessed",
        "pub/static/frontend/Magento/luma/en_US/css",
        "pub/media",
        "vendor/magento/framework/App",
        "vendor/laminas/laminas-cli/bin",
        "vendor/bin",
        "vendor/composer",
    ] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    let w = |p: &str, body: &str| std::fs::write(dir.join(p), body).unwrap();
    w(
        "app/etc/config.php",
        "<?php\nreturn ['modules' => ['Magento_Store' => 1, 'Magento_Theme' => 1]];\n",
    );
    w(
        "bin/magento",
        "#!/usr/bin/env php\n<?php\nrequire __DIR__ . '/../vendor/autoload.php';\n",
    );
    w(
        "generated/code/Magento/Framework/Interceptor.php",
        "<?php class Interceptor {}\n",
    );
    w("generated/metadata/global.php", "a:0:{}\n");
    w("var/view_preprocessed/.keep", "compiled\n");
    w(
        "pub/static/frontend/Magento/luma/en_US/css/styles-m.css",
        "body{}\n",
    );
    w("pub/static/deployed_version.txt", "1700000000\n");
    w("vendor/autoload.php", "<?php // composer autoload\n");
    w(
        "vendor/magento/framework/App/Bootstrap.php",
        "<?php namespace Magento\\Framework\\App; class Bootstrap {}\n",
    );
    w(
        "vendor/laminas/laminas-cli/bin/laminas",
        "#!/usr/bin/env php\n<?php echo 'laminas';\n",
    );
    std::os::unix::fs::symlink(
        "../laminas/laminas-cli/bin/laminas",
        dir.join("vendor/bin/laminas"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        "../magento/framework",
        dir.join("vendor/composer/framework-link"),
    )
    .unwrap();
    std::fs::copy(
        repo().join("tests/fixtures/app/pub/index.php"),
        dir.join("pub/index.php"),
    )
    .unwrap();
    w(
        "pub/health_check.php",
        "<?php\nif (file_exists(__DIR__ . '/../BROKEN')) { http_response_code(500); echo \"broken release\\n\"; exit; }\necho \"OK\\n\";\n",
    );
    w("RELEASE_ID", id);
    if broken {
        w("BROKEN", "");
    }
}

pub fn nginx_conf(d: &Path, app_root: &Path, port: u16) -> String {
    format!(
        "user root; worker_processes 2; pid {d}/run/nginx.pid; error_log {d}/logs/nginx.err warn;\n\
         events {{ worker_connections 256; }}\n\
         http {{ access_log off;\n\
           client_body_temp_path {d}/tmp/body; proxy_temp_path {d}/tmp/proxy; fastcgi_temp_path {d}/tmp/fcgi;\n\
           uwsgi_temp_path {d}/tmp/uwsgi; scgi_temp_path {d}/tmp/scgi;\n\
           server {{ listen 127.0.0.1:{port}; root {app}/current/pub; index index.php;\n\
             location / {{ try_files $uri /index.php$is_args$args; }}\n\
             location = /nginx_status {{ stub_status; allow 127.0.0.1; deny all; }}\n\
             location ~ \\.php$ {{ include /etc/nginx/fastcgi_params;\n\
               fastcgi_param SCRIPT_FILENAME $realpath_root$fastcgi_script_name;\n\
               fastcgi_param DOCUMENT_ROOT $realpath_root;\n\
               fastcgi_pass unix:{d}/run/php-fpm.sock; }} }} }}\n",
        d = d.display(),
        app = app_root.display()
    )
}

/// A bare HTTP/1.1 GET on loopback (Connection: close): (status, body).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    );
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    let status = buf
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

impl Drop for Web {
    fn drop(&mut self) {
        kill_pidfile(&self.dir.path().join("run/nginx.pid"));
        kill_pidfile(&self.dir.path().join("run/php-fpm.pid"));
    }
}

/// HAProxy as the load balancer stand-in: one backend server (`web_port`) whose health check
/// is bgagent's readiness endpoint (`ready_port` /ready), like an ALB target group.
pub struct Haproxy {
    pub port: u16,
    child: Child,
    pub dir: tempfile::TempDir,
}

impl Haproxy {
    pub fn start(web_port: u16, ready_port: u16) -> Haproxy {
        let bin = require("haproxy");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let cfg = format!(
            "global\n  stats socket {d}/admin.sock mode 600 level admin\ndefaults\n  mode http\n  timeout connect 2s\n  timeout client 10s\n  timeout server 10s\n\
             frontend fe\n  bind 127.0.0.1:{port}\n  default_backend be\n\
             backend be\n  option httpchk GET /ready\n  server node1 127.0.0.1:{web_port} check port {ready_port} inter 100ms fall 1 rise 1\n",
            d = dir.path().display()
        );
        let child = spawn_haproxy(bin, dir.path(), &cfg, port);
        Haproxy { port, child, dir }
    }

    /// The backend server's status as HAProxy sees it (UP, DOWN, ...), via the admin socket.
    pub fn server_status(&self) -> String {
        use std::io::{Read, Write};
        let Ok(mut s) = std::os::unix::net::UnixStream::connect(self.dir.path().join("admin.sock"))
        else {
            return String::new();
        };
        let _ = s.write_all(b"show stat\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.lines()
            .find(|l| l.starts_with("be,node1,"))
            .and_then(|l| l.split(',').nth(17))
            .unwrap_or("")
            .to_string()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// HAProxy as an ALB with one target group over several nodes: `(name, web_port,
/// ready_port)` each, health-checked on the node's readiness endpoint (`/ready` every
/// `inter 100ms fall 1 rise 1`, say). Servers start registered or deregistered (weight 0);
/// the harness registers and deregisters targets through the admin
/// socket ([`Pool::register`]), as CodeDeploy's AllowTraffic and BlockTraffic move them in an
/// ALB. Weights, not maintenance mode: HAProxy stops health-checking a server in maintenance
/// and brings it back UP before any check has passed, while an ALB routes to a newly
/// registered target only once it passed its health check; a server at weight 0 keeps being
/// checked, so on registration it gets requests only if its `/ready` says 200.
/// `retries 0`: an ALB does not retry a request a target refused, so neither does this.
pub struct Pool {
    pub port: u16,
    child: Child,
    pub dir: tempfile::TempDir,
}

/// One server of a [`Pool`] as HAProxy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerStat {
    /// UP or DOWN (its health check), MAINT, ...
    pub status: String,
    /// 0: deregistered (no new requests); 1: registered.
    pub weight: u32,
    /// Requests (sessions) the server holds now.
    pub current: u64,
}

impl Pool {
    /// `check`: the server line's check parameters (`inter 100ms fall 1 rise 1`: the target
    /// group's interval and thresholds); `registered`: whether the targets start registered.
    pub fn start(servers: &[(&str, u16, u16)], check: &str, registered: bool) -> Pool {
        let bin = require("haproxy");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut cfg = format!(
            "global\n  stats socket {d}/admin.sock mode 600 level admin\n\
             defaults\n  mode http\n  retries 0\n  timeout connect 2s\n  timeout client 10s\n  timeout server 10s\n  timeout check 1s\n\
             frontend fe\n  bind 127.0.0.1:{port}\n  default_backend be\n\
             backend be\n  balance roundrobin\n  option httpchk GET /ready\n",
            d = dir.path().display()
        );
        let weight = u32::from(registered);
        for (name, web, ready) in servers {
            cfg.push_str(&format!(
                "  server {name} 127.0.0.1:{web} check port {ready} {check} weight {weight}\n"
            ));
        }
        let child = spawn_haproxy(bin, dir.path(), &cfg, port);
        Pool { port, child, dir }
    }

    /// One command on the admin socket, and its answer.
    pub fn admin(&self, cmd: &str) -> String {
        use std::io::{Read, Write};
        let sock = self.dir.path().join("admin.sock");
        let mut s = std::os::unix::net::UnixStream::connect(&sock)
            .unwrap_or_else(|e| panic!("HAProxy's admin socket {}: {e}", sock.display()));
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(format!("{cmd}\n").as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    /// Registers the target (it gets requests while its health check passes) or deregisters
    /// it (no new requests; those in flight finish).
    pub fn register(&self, server: &str, registered: bool) {
        let w = u32::from(registered);
        let out = self.admin(&format!("set weight be/{server} {w}"));
        assert!(out.trim().is_empty(), "set weight be/{server} {w}: {out}");
    }

    pub fn stat(&self, server: &str) -> ServerStat {
        let out = self.admin("show stat");
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("be,{server},")))
            .unwrap_or_else(|| panic!("no server {server} in HAProxy's stats:\n{out}"));
        let f: Vec<&str> = line.split(',').collect();
        ServerStat {
            status: f[17].to_string(),
            weight: f[18].parse().unwrap_or(0),
            current: f[4].parse().unwrap_or(0),
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Both streams of a finished command, for assertions and their failure messages.
/// Polls `done` every 20 ms until it holds; after `secs` fails the test with `what` (a bound
/// on a hang, not a speed claim).
pub fn wait_until(secs: u64, what: &str, done: impl FnMut() -> bool) {
    wait_until_or(secs, what, String::new, done)
}

/// The same, adding `context()` (a daemon's log, say) to the failure.
pub fn wait_until_or(
    secs: u64,
    what: &str,
    context: impl Fn() -> String,
    mut done: impl FnMut() -> bool,
) {
    let t0 = Instant::now();
    while !done() {
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "{what} (waited {secs} s)\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// CodeDeploy's lifecycle events of an in-place deployment behind a load balancer, in the
/// order it runs them (the tests take the part they need: a node's first deployment, for
/// one, starts at BeforeInstall).
pub const IN_PLACE: [&str; 9] = [
    "BeforeBlockTraffic",
    "AfterBlockTraffic",
    "ApplicationStop",
    "BeforeInstall",
    "AfterInstall",
    "ApplicationStart",
    "ValidateService",
    "BeforeAllowTraffic",
    "AfterAllowTraffic",
];

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_bgagent");

/// `bgagent --config <config> ARGS`, run to its end.
pub fn bgagent(config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap()
}

/// `bgagent --config <config> hook EVENT` with the environment CodeDeploy gives a hook for
/// deployment `dep` of application `shop` in deployment group `group`, for the caller to run
/// (`.output()`) or start (`.spawn()`).
pub fn hook_command(config: &Path, event: &str, dep: &str, group: &str) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("--config")
        .arg(config)
        .args(["hook", event])
        .env("DEPLOYMENT_ID", dep)
        .env("DEPLOYMENT_GROUP_ID", group)
        .env("APPLICATION_NAME", "shop");
    cmd
}

/// Starts `bin --config <config> daemon` with both streams in `log`, and returns once its
/// control socket accepts connections; a daemon not up within 10 s fails the test with its
/// log.
pub fn spawn_daemon(bin: &str, config: &Path, socket: &Path, log: &Path) -> Child {
    spawn_daemon_with(bin, config, socket, log, &[])
}

/// The same, with more variables in the daemon's environment.
pub fn spawn_daemon_with(
    bin: &str,
    config: &Path,
    socket: &Path,
    log: &Path,
    env: &[(&str, &str)],
) -> Child {
    let out = std::fs::File::create(log).unwrap();
    let child = Command::new(bin)
        .arg("--config")
        .arg(config)
        .arg("daemon")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the daemon ({}) did not open {} within 10 s:\n{}",
            config.display(),
            socket.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// The bgagent daemon of a one-node test, run on `dir`/bgagent.yaml with its control socket
/// at `dir`/run/bgagent.sock (where the node's config puts it) and both streams in
/// `dir`/daemon.log. Stopped as systemd stops it when dropped: declare it before whatever
/// it uses (its directory, the web server) so that it goes first.
pub struct Daemon {
    dir: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    /// The daemon of the node in `dir`, not started yet.
    pub fn new(dir: &Path) -> Daemon {
        Daemon {
            dir: dir.to_path_buf(),
            child: None,
        }
    }

    /// Starts it; returns once its socket accepts connections.
    pub fn start(&mut self) {
        self.start_with(&[]);
    }

    /// The same, with more variables in the daemon's environment.
    pub fn start_with(&mut self, env: &[(&str, &str)]) {
        assert!(
            self.child.is_none(),
            "the daemon in {} runs already",
            self.dir.display()
        );
        self.child = Some(spawn_daemon_with(
            BIN,
            &self.dir.join("bgagent.yaml"),
            &self.dir.join("run/bgagent.sock"),
            &self.dir.join("daemon.log"),
            env,
        ));
    }

    /// Stops it as systemd does (SIGTERM), if it runs.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_daemon(&mut c);
        }
    }

    /// Stops it as systemd does, then starts it again.
    pub fn restart(&mut self) {
        self.stop();
        self.start();
    }

    /// Kills it with SIGKILL (a crash: nothing is cleaned up) and reaps it.
    pub fn kill(&mut self) {
        let mut c = self.child.take().expect("the daemon runs");
        c.kill().unwrap();
        c.wait().unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Stops a daemon as systemd does (SIGTERM) and reaps it.
pub fn stop_daemon(child: &mut Child) {
    // Already ended and reaped (stopped by the test itself): its pid may be another
    // process's by now, so no signal goes to it.
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// Writes `cfg` to `dir`/haproxy.cfg, starts HAProxy on it (logs beside it) and waits for
/// its frontend on `port`.
fn spawn_haproxy(bin: PathBuf, dir: &Path, cfg: &str, port: u16) -> Child {
    std::fs::write(dir.join("haproxy.cfg"), cfg).unwrap();
    let child = Command::new(bin)
        .arg("-Ws")
        .arg("-f")
        .arg(dir.join("haproxy.cfg"))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("haproxy.log")).unwrap())
        .stderr(std::fs::File::create(dir.join("haproxy.err")).unwrap())
        .spawn()
        .unwrap();
    wait_port(port, "haproxy", &dir.join("haproxy.err"));
    child
}
