//! opcache control over FastCGI against Debian's real php-fpm 8.2, started privately: the
//! snippets run from bgagent's private directory only, precompiling puts a release's scripts
//! into the pool's shared opcache, invalidation retires them, and a pool that does not
//! answer fails within the deadlines.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bgagent::opcache::{self, Addr, OpcacheConfig, Pool};

struct Bed {
    dir: tempfile::TempDir,
    web: support::Web,
    pool: Pool,
}

impl Bed {
    /// php-fpm and nginx serving `<dir>/app/current/pub`; the opcache API restricted to the
    /// snippet directory, as the docs recommend.
    fn start(extra: &[&str]) -> Bed {
        let dir = tempfile::tempdir().unwrap();
        let app = dir.path().join("app");
        std::fs::create_dir_all(app.join("releases")).unwrap();
        let snippets = dir.path().join("fcgi");
        let restrict = format!("opcache.restrict_api={}", snippets.display());
        let mut args = vec!["-d", &restrict, "-d", "opcache.file_update_protection=0"];
        for a in extra {
            args.extend(["-d", a]);
        }
        let web = support::Web::start_with(&app, &args);
        let cfg = OpcacheConfig {
            snippet_dir: snippets,
            timeout: Duration::from_secs(20),
            ..Default::default()
        };
        let pool = Pool::new(Addr::Unix(web.fpm_socket()), &cfg);
        Bed { dir, web, pool }
    }

    fn release(&self, id: &str, n: usize, per_request: usize) -> PathBuf {
        let r = self.dir.path().join("app/releases").join(id);
        support::autoload_app(&r, id, n, per_request, 2);
        r
    }

    fn switch(&self, id: &str) {
        let link = self.dir.path().join("app/current");
        let tmp = self.dir.path().join("app/current.tmp");
        std::os::unix::fs::symlink(format!("releases/{id}"), &tmp).unwrap();
        std::fs::rename(tmp, link).unwrap();
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Bounds a call that has its own deadlines, so a broken deadline fails the test instead of
/// hanging it.
fn run<T>(f: impl std::future::Future<Output = T>) -> T {
    rt().block_on(async {
        tokio::time::timeout(Duration::from_secs(60), f)
            .await
            .expect("the call outlived its own deadlines")
    })
}

fn cached_under(s: &opcache::OpcacheStatus, root: &Path) -> Vec<String> {
    let mut v: Vec<String> = s
        .scripts
        .iter()
        .filter(|c| Path::new(c.path()).starts_with(root))
        .map(|c| c.path().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn snippets_run_from_the_private_dir_and_the_app_cannot_call_the_opcache_api() {
    let bed = Bed::start(&[]);
    let r = bed.release("r1", 20, 20);
    bed.switch("r1");
    // The app's own script asks for opcache's status through nginx: restricted.
    std::fs::write(
        r.join("pub/peek.php"),
        "<?php echo 'api=', var_export(@opcache_get_status(false) !== false, true), \"\\n\";",
    )
    .unwrap();
    let (code, body) = bed.web.get("/peek.php");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("api=false"),
        "restrict_api did not hold: {body}"
    );
    // bgagent's snippet, run over FastCGI from the private directory: allowed.
    let s = run(bed.pool.status(false)).unwrap();
    assert!(s.enabled);
    assert!(
        Path::new(&s.snippet).starts_with(&bed.pool.snippet_dir),
        "the snippet ran from {}, not from {}",
        s.snippet,
        bed.pool.snippet_dir.display()
    );
    assert!(s.max_cached_keys > 0 && s.free_memory > 0, "{s:?}");
    // The snippet directory is bgagent's: 0755, snippets 0644, nothing else in it.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&bed.pool.snippet_dir)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o022, 0);
    // A snippet dir others may write into is refused before anything runs in the pool.
    std::fs::set_permissions(
        &bed.pool.snippet_dir,
        std::fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    let e = run(bed.pool.status(false)).unwrap_err().to_string();
    assert!(e.contains("lets others write"), "{e}");
}

#[test]
fn precompile_puts_the_new_release_paths_into_the_pool_before_any_request() {
    let bed = Bed::start(&[]);
    let a = bed.release("A", 300, 100);
    let b = bed.release("B", 300, 100);
    bed.switch("A");
    for _ in 0..8 {
        assert_eq!(bed.web.get("/").0, 200);
    }
    let before = run(bed.pool.status(true)).unwrap();
    let a_cached = cached_under(&before, &a);
    assert!(a_cached.len() >= 100, "{}", a_cached.len());
    assert!(
        cached_under(&before, &b).is_empty(),
        "B cached before precompile"
    );
    // The hot set: A's cached scripts at B's paths, plus a glob for the rest of B's classes.
    let hot = opcache::hot_set(&before.scripts, &[a.clone()], &b);
    assert_eq!(hot.len(), a_cached.len());
    let mut files: Vec<PathBuf> = hot.iter().map(|(p, _)| p.clone()).collect();
    for f in opcache::glob_files(&b, &["vendor/acme/**/*.php".to_string()]) {
        if !files.contains(&f) {
            files.push(f);
        }
    }
    let report = run(opcache::precompile(
        &bed.pool,
        &files,
        Duration::from_secs(30),
        50,
        2,
    ))
    .unwrap();
    assert_eq!(report.compiled, files.len(), "{report:?}");
    assert_eq!((report.failed, report.skipped), (0, 0), "{report:?}");
    let after = run(bed.pool.status(true)).unwrap();
    let b_cached = cached_under(&after, &b);
    assert_eq!(b_cached.len(), files.len());
    assert!(b_cached.contains(&b.join("pub/index.php").display().to_string()));
    assert!(b_cached.contains(&b.join("vendor/acme/lib/C299.php").display().to_string()));
    // Nothing requested B yet: every B entry is unhit, compiled by the precompile alone.
    assert!(
        after
            .scripts
            .iter()
            .filter(|c| Path::new(c.path()).starts_with(&b))
            .all(|c| c.hits() == 0)
    );
    // A second run finds them all cached.
    let again = run(opcache::precompile(
        &bed.pool,
        &files,
        Duration::from_secs(30),
        50,
        2,
    ))
    .unwrap();
    assert_eq!(again.already, files.len(), "{again:?}");
    // Grouped by release for status.
    let by = opcache::by_release(&after.scripts, &[bed.dir.path().join("app/releases")]);
    assert_eq!(by["B"].scripts as usize, files.len());
    assert_eq!(by["A"].scripts as usize, a_cached.len());
    // Retiring A: its scripts leave the cache and their memory counts as wasted.
    let n = run(bed
        .pool
        .invalidate(&a_cached.iter().map(PathBuf::from).collect::<Vec<_>>()))
    .unwrap();
    assert_eq!(n as usize, a_cached.len());
    let retired = run(bed.pool.status(true)).unwrap();
    assert!(cached_under(&retired, &a).is_empty());
    assert!(retired.wasted_memory > after.wasted_memory, "{retired:?}");
    assert_eq!(cached_under(&retired, &b).len(), files.len());
}

#[test]
fn a_file_that_does_not_compile_fails_alone_and_the_rest_is_compiled() {
    let bed = Bed::start(&[]);
    let r = bed.release("r1", 5, 5);
    let lib = r.join("vendor/acme/lib");
    // A parse error (an exception inside the snippet) and a compile-time fatal error (ends
    // the FastCGI request: the rest of the batch goes in another one).
    std::fs::write(lib.join("Parse.php"), "<?php function (").unwrap();
    std::fs::write(
        lib.join("Fatal.php"),
        "<?php function twice() {}\nfunction twice() {}\n",
    )
    .unwrap();
    let files = vec![
        lib.join("C0.php"),
        lib.join("Parse.php"),
        lib.join("C1.php"),
        lib.join("Fatal.php"),
        lib.join("C2.php"),
        lib.join("Missing.php"),
        lib.join("C3.php"),
    ];
    let rep = run(opcache::precompile(
        &bed.pool,
        &files,
        Duration::from_secs(30),
        100,
        1,
    ))
    .unwrap();
    assert_eq!((rep.compiled, rep.failed), (4, 3), "{rep:?}");
    let failed: Vec<&str> = rep.failures.iter().map(|(p, _)| p.as_str()).collect();
    for f in ["Parse.php", "Fatal.php", "Missing.php"] {
        assert!(
            failed.iter().any(|p| p.ends_with(f)),
            "{f} not among {failed:?}"
        );
    }
}

#[test]
fn a_pool_that_is_not_there_or_never_answers_fails_within_the_deadlines() {
    let d = tempfile::tempdir().unwrap();
    let cfg = OpcacheConfig {
        snippet_dir: d.path().join("fcgi"),
        connect_timeout: Duration::from_millis(500),
        timeout: Duration::from_millis(800),
        ..Default::default()
    };
    let gone = Pool::new(Addr::Unix(d.path().join("nothing.sock")), &cfg);
    let e = run(gone.status(false)).unwrap_err().to_string();
    assert!(
        e.contains("cannot connect to php-fpm at unix:") && e.contains("nothing.sock"),
        "{e}"
    );
    // Listens but never accepts: the connection is made (backlog), no byte comes back.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let stalled = Pool::new(Addr::Tcp(addr.clone()), &cfg);
    let e = run(stalled.status(false)).unwrap_err().to_string();
    assert!(e.contains(&addr) && e.contains("did not answer"), "{e}");
    drop(l);
}
