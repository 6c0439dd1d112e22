//! Old releases removed off the critical path.
//!
//! Pruning a release of 20k files takes seconds; inside ApplicationStart it held back
//! ValidateService and readiness. Now, once ValidateService has passed (the node is ready),
//! the releases beyond `release.keep` (those that failed validation first, uncounted) and the
//! staging directories left by interrupted deployments (`.<id>.partial`, whatever deployment
//! left them) are renamed to `releases/.trash-<name>`: a rename each, done under the engine
//! lock, when no AfterInstall is building. A background thread then deletes the trash at idle
//! I/O priority, through the app root handle (no link inside is followed). A restarted daemon
//! resumes whatever trash is left; `bgagent status` lists it as `cleanup_pending`.

use std::sync::atomic::{AtomicBool, Ordering};

use tracing::{info, warn};

use crate::appdir::AppRoot;
use crate::release::{Layout, ReleaseError};

const TRASH_PREFIX: &str = ".trash-";

/// The names in releases/ to move to the trash, given every name there (`all`, staging ones
/// included): the cleanup plan over the releases, then every staging directory. Pure.
pub fn plan(all: &[String], keep: usize, protect: &[&str], failed: &[String]) -> Vec<String> {
    let releases: Vec<String> = all
        .iter()
        .filter(|n| !n.starts_with('.'))
        .cloned()
        .collect();
    let mut out = crate::release::cleanup_plan(&releases, failed, keep, protect);
    out.extend(
        all.iter()
            .filter(|n| n.starts_with('.') && n.ends_with(".partial"))
            .cloned(),
    );
    out
}

/// Renames each planned name into the trash; returns the names moved.
pub fn move_to_trash(app: &AppRoot, names: &[String]) -> Result<Vec<String>, ReleaseError> {
    let mut moved = Vec::new();
    for n in names {
        let base = format!("{TRASH_PREFIX}{}", n.trim_start_matches('.'));
        // A name already in the trash (the same id pruned before and not yet deleted).
        let mut to = base.clone();
        let mut k = 1;
        while app.list_all()?.contains(&to) {
            k += 1;
            to = format!("{base}.{k}");
        }
        app.rename_release(n, &to)?;
        moved.push(n.clone());
    }
    Ok(moved)
}

/// What is waiting to be deleted (names as they were before the move).
pub fn pending(layout: &Layout) -> Vec<String> {
    match AppRoot::open_existing(layout.root()) {
        Ok(Some(app)) => app
            .list_all()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|n| n.strip_prefix(TRASH_PREFIX).map(String::from))
            .collect(),
        _ => Vec::new(),
    }
}

static RUNNING: AtomicBool = AtomicBool::new(false);
static AGAIN: AtomicBool = AtomicBool::new(false);

/// Deletes the trash in a background thread at idle I/O priority; at most one such thread
/// runs (a call while it runs makes it look again before it ends).
pub fn spawn_deleter(layout: &Layout) {
    AGAIN.store(true, Ordering::SeqCst);
    if RUNNING.swap(true, Ordering::SeqCst) {
        return;
    }
    let root = layout.root().to_path_buf();
    let spawned = std::thread::Builder::new()
        .name("bgagent-cleanup".into())
        .spawn(move || {
            idle_io_priority();
            while AGAIN.swap(false, Ordering::SeqCst) {
                let Ok(Some(app)) = AppRoot::open_existing(&root) else {
                    break;
                };
                for n in app.list_all().unwrap_or_default() {
                    if !n.starts_with(TRASH_PREFIX) {
                        continue;
                    }
                    match app.remove_release(&n) {
                        Ok(()) => info!(
                            "cleanup: removed {} (old release or abandoned build)",
                            &n[TRASH_PREFIX.len()..]
                        ),
                        Err(e) => warn!("cleanup: {e}; it is retried at the next cleanup"),
                    }
                }
            }
            RUNNING.store(false, Ordering::SeqCst);
        });
    if let Err(e) = spawned {
        RUNNING.store(false, Ordering::SeqCst);
        warn!("cleanup: could not start its thread: {e}");
    }
}

/// This thread's disk I/O only when the disk is otherwise idle (ioprio class IDLE), so the
/// deletion never competes with serving or with the next deployment.
fn idle_io_priority() {
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_IDLE: libc::c_long = 3;
    const IOPRIO_CLASS_SHIFT: libc::c_long = 13;
    // SAFETY: ioprio_set takes three integers; who = 0 means the calling thread.
    let r = unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            0 as libc::c_long,
            IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT,
        )
    };
    if r != 0 {
        warn!(
            "cleanup: could not lower its I/O priority ({}); deleting at normal priority",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn plan_takes_old_and_failed_releases_and_every_staging_dir() {
        let all = names(&[
            ".20200101T000000Z-d-OLD.partial",
            ".trash-x",
            "1-d-1",
            "2-d-2",
            "3-d-3",
            "4-d-4",
        ]);
        assert_eq!(
            plan(&all, 2, &["4-d-4", "3-d-3"], &names(&["2-d-2"])),
            names(&["2-d-2", "1-d-1", ".20200101T000000Z-d-OLD.partial"])
        );
    }
}
