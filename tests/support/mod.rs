//! Starts real components privately for the integration tests: each in its own temp
//! directory, on 127.0.0.1 and a free port, stopped by PID when dropped.
#![allow(dead_code)]

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
    let creds = aws_sdk_ssm::config::Credentials::new("testing", "testing", None, None, "test");
    let conf = aws_sdk_ssm::Config::builder()
        .behavior_version(aws_sdk_ssm::config::BehaviorVersion::latest())
        .region(aws_sdk_ssm::config::Region::new("us-east-1"))
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
