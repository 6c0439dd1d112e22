//! Processes still running an old release's code after a switch (issue 15, item 3): real
//! PHP CLI consumers started the way cron and supervisors start them, found by cwd, by
//! command line and (a native worker shipped in the release) by executable, listed in `bgagent status`, then ended (SIGTERM, SIGKILL after the grace)
//! by the next deploy's ApplicationStart; a process outside the old release is untouched.
//! Run through the real binary as `bgagent deploy DIR`.

mod support;

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use support::text;

struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let n = Node { dir };
        n.configure("processes: { end_old: false }\n");
        n
    }
    fn configure(&self, extra: &str) {
        let cfg = format!(
            "app_root: app\nstate_dir: state\nsocket: {{ path: run/s.sock, group: null }}\n\
             app: {{ kind: php, name: shop }}\n{extra}"
        );
        std::fs::write(self.p("bgagent.yaml"), cfg).unwrap();
    }
    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    fn bgagent(&self, args: &[&str]) -> Output {
        support::bgagent(&self.p("bgagent.yaml"), args)
    }
    fn deploy(&self, version: &str) -> Output {
        let s = self.p(&format!("src-{version}"));
        for d in ["app/etc", "bin", "pub", "var"] {
            std::fs::create_dir_all(s.join(d)).unwrap();
        }
        std::fs::write(s.join("app/etc/config.php"), "<?php return [];").unwrap();
        std::fs::write(s.join("bin/magento"), "#!/usr/bin/env php\n<?php").unwrap();
        std::fs::write(s.join("pub/index.php"), format!("<?php echo '{version}';")).unwrap();
        // A queue consumer: waits for messages for ever (PHP's default SIGTERM action ends it).
        std::fs::write(
            s.join("bin/consumer.php"),
            "<?php while (true) { sleep(1); }",
        )
        .unwrap();
        // One that ignores SIGTERM, as a consumer busy in a long job may.
        std::fs::write(
            s.join("bin/stubborn.php"),
            "<?php pcntl_signal(SIGTERM, SIG_IGN); while (true) { sleep(1); pcntl_signal_dispatch(); }",
        )
        .unwrap();
        // A native worker shipped in the release (found by its executable).
        std::fs::copy("/bin/sleep", s.join("bin/worker")).unwrap();
        let o = self.bgagent(&["deploy", s.to_str().unwrap()]);
        assert!(o.status.success(), "deploy {version}: {}", text(&o));
        o
    }
    fn current(&self) -> PathBuf {
        std::fs::canonicalize(self.p("app/current")).unwrap()
    }
    fn status(&self) -> serde_json::Value {
        let o = self.bgagent(&["status", "--json"]);
        assert!(o.status.success(), "{}", text(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    }
}

/// `php ARGS` in `cwd`, in its own session (no terminal), as a supervisor starts it.
fn php(cwd: &Path, args: &[&str]) -> Child {
    let mut c = Command::new("php");
    c.args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    unsafe {
        c.pre_exec(|| {
            let _ = rustix::process::setsid();
            Ok(())
        });
    }
    c.spawn().unwrap()
}

struct Reap(Vec<Child>);
impl Drop for Reap {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn pids_in(list: &serde_json::Value) -> Vec<(i64, String)> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["pid"].as_i64().unwrap(),
                p["by"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn old_release_consumers_are_listed_then_ended_after_the_switch_and_others_untouched() {
    let n = Node::new();
    n.deploy("v1");
    let old = n.current();
    // Started from `current` (cron's `cd current && php bin/magento queue:consumers:start`):
    // the kernel keeps the resolved directory, releases/<v1>.
    let by_cwd = php(&n.p("app/current"), &["bin/consumer.php"]);
    // Started elsewhere, naming the release's script by its path.
    let by_arg = php(&n.p(""), &[old.join("bin/consumer.php").to_str().unwrap()]);
    let stubborn = php(&old, &["bin/stubborn.php"]);
    // Started through `current` from elsewhere: its argv names `current`, its executable
    // (resolved by the kernel) is releases/<v1>/bin/worker.
    let mut w = Command::new(n.p("app/current/bin/worker"));
    w.arg("300")
        .current_dir(n.p(""))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    unsafe {
        w.pre_exec(|| {
            let _ = rustix::process::setsid();
            Ok(())
        });
    }
    let by_exe = w.spawn().unwrap();
    // A PHP process of something else: never touched.
    std::fs::create_dir_all(n.p("elsewhere")).unwrap();
    std::fs::copy(old.join("bin/consumer.php"), n.p("elsewhere/consumer.php")).unwrap();
    let bystander = php(&n.p("elsewhere"), &["consumer.php"]);
    let ids = [
        by_cwd.id(),
        by_arg.id(),
        stubborn.id(),
        bystander.id(),
        by_exe.id(),
    ]
    .map(|i| i as i64);
    let mut kids = Reap(vec![by_cwd, by_arg, stubborn, bystander, by_exe]);
    // Give php a moment to exec (its cmdline is `php ...` from the start; this only avoids
    // reading a process still in fork).
    std::thread::sleep(std::time::Duration::from_millis(300));

    // They run the current release: nothing is old yet.
    let s = n.status();
    assert_eq!(s["old_processes"], serde_json::json!([]), "{s:#}");

    // v2 with processes.end_old: false: listed, left running.
    let o = n.deploy("v2");
    let s = n.status();
    let listed = pids_in(&s["old_processes"]);
    assert!(
        listed.contains(&(ids[0], "cwd".into())),
        "{listed:?}\n{s:#}"
    );
    assert!(listed.contains(&(ids[1], "cmdline".into())), "{listed:?}");
    assert!(listed.contains(&(ids[2], "cwd".into())), "{listed:?}");
    assert!(listed.contains(&(ids[4], "exe".into())), "{listed:?}");
    assert!(!listed.iter().any(|(p, _)| *p == ids[3]), "{listed:?}");
    let release_v1 = old.file_name().unwrap().to_str().unwrap();
    assert!(
        s["old_processes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["release"] == release_v1),
        "{s:#}"
    );
    let log = text(&o);
    assert!(
        log.contains(&format!("process {} (php", ids[0]))
            && log.contains("processes.end_old is false"),
        "{log}"
    );
    let human = text(&n.bgagent(&["status"]));
    assert!(
        human.contains(&format!("old code:   pid {} php", ids[0])),
        "{human}"
    );
    for c in &mut kids.0 {
        assert!(
            c.try_wait().unwrap().is_none(),
            "a process was ended with end_old: false"
        );
    }

    // v3 ending them: SIGTERM, and SIGKILL for the one that ignores it.
    n.configure("processes: { end_old: true, grace: 1s, kill_wait: 5s }\n");
    let o = n.deploy("v3");
    let log = text(&o);
    let sig = |c: &mut Child| c.wait().unwrap().signal();
    assert_eq!(sig(&mut kids.0[0]), Some(15), "{log}");
    assert_eq!(sig(&mut kids.0[1]), Some(15), "{log}");
    assert_eq!(sig(&mut kids.0[2]), Some(9), "{log}");
    assert_eq!(sig(&mut kids.0[4]), Some(15), "{log}");
    assert!(
        kids.0[3].try_wait().unwrap().is_none(),
        "the bystander was signalled: {log}"
    );
    assert!(log.contains("ended by SIGTERM"), "{log}");
    assert!(log.contains("ended by SIGKILL"), "{log}");
    assert!(log.contains("4 process(es) of old releases ended"), "{log}");

    let s = n.status();
    assert_eq!(s["old_processes"], serde_json::json!([]), "{s:#}");
    let sweep = &s["last_process_sweep"];
    let fates: Vec<(i64, String)> = sweep["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["pid"].as_i64().unwrap(),
                p["fate"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        fates,
        vec![
            (ids[0], "terminated".into()),
            (ids[1], "terminated".into()),
            (ids[2], "killed".into()),
            (ids[4], "terminated".into())
        ]
        .into_iter()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect::<Vec<_>>(),
        "{s:#}"
    );
    assert_eq!(
        sweep["current"],
        n.current().file_name().unwrap().to_str().unwrap()
    );
}
