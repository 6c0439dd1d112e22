//! Release layout, intake and switching.
//!
//! Under the app root:
//!
//! ```text
//! releases/<id>/      one directory per release, never modified after it went live
//! shared/             persistent paths (pub/media, var/log, ...) linked into every release
//! current -> releases/<id>
//! ```
//!
//! Intake from a directory (CodeDeploy's unpacked `deployment-archive`) builds the release
//! without a full copy where the filesystem allows: a reflink, else a hard link, else a copy.
//! Ownership and modes come from [`crate::perms::Policy`] and are applied in the same pass that
//! creates each entry, through directory file descriptors (`*at` syscalls), with a few worker
//! threads. `current` is switched by renaming a new symlink over it, so it always exists.

use std::ffi::{CStr, OsStr};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags};
use serde::{Deserialize, Serialize};

use crate::appdir::{AppRoot, ReleaseDir};
use crate::fsutil;
use crate::perms::{Kind, Policy};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct ReleaseConfig {
    /// Releases kept on disk; current and previous are never pruned.
    pub keep: usize,
    /// How files are brought in from a directory: auto (reflink, hard link, copy), reflink,
    /// hardlink or copy.
    pub intake: IntakeMode,
    /// Persistent paths, relative to the release, linked to `<app_root>/shared/<path>`.
    pub shared_paths: Vec<PathBuf>,
    /// Upper bound on an archive's total unpacked size, in bytes.
    pub max_bytes: u64,
    /// Upper bound on the number of entries in an archive.
    pub max_entries: u64,
    /// Free space that must remain after the new release (BeforeInstall pre-flight), bytes.
    pub min_free_bytes: u64,
}

impl Default for ReleaseConfig {
    fn default() -> Self {
        ReleaseConfig {
            keep: 5,
            intake: IntakeMode::Auto,
            shared_paths: [
                "pub/media",
                "var/log",
                "var/session",
                "var/report",
                "var/export",
            ]
            .into_iter()
            .map(PathBuf::from)
            .collect(),
            max_bytes: 16 << 30,
            max_entries: 2_000_000,
            min_free_bytes: 512 << 20,
        }
    }
}

impl ReleaseConfig {
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if self.keep < 2 {
            out.push((
                "release.keep".into(),
                "must be at least 2 (the current and the previous release are always kept)".into(),
            ));
        }
        for (i, p) in self.shared_paths.iter().enumerate() {
            if let Err(e) = crate::perms::check_relative(p) {
                out.push((format!("release.shared_paths.{i}"), e));
            }
        }
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum IntakeMode {
    #[default]
    Auto,
    /// Reflink, else copy: for sources that must not share inodes with the release.
    #[serde(skip)]
    AutoNoLink,
    Reflink,
    Hardlink,
    Copy,
}

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("failed to {action} {}: {source}", crate::text::path(.path))]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("refusing to write under {}: {reason}", crate::text::path(.path))]
    Refused { path: PathBuf, reason: String },
    #[error("refusing to take {} into the release: {reason}", crate::text::path(.path))]
    Unsafe { path: PathBuf, reason: String },
    #[error("release `{}` does not exist under {}", crate::text::escape(.0), crate::text::path(.1))]
    NoSuchRelease(String, PathBuf),
    #[error("the release source {} does not exist or is not a directory", crate::text::path(.0))]
    NoSource(PathBuf),
    #[error("the release directory {} already exists; refusing to overwrite it", crate::text::path(.0))]
    Exists(PathBuf),
}

pub(crate) fn io_err(
    action: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(io::Error) -> ReleaseError {
    let path = path.into();
    move |source| ReleaseError::Io {
        action,
        path,
        source,
    }
}

/// The directories under the app root.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Layout {
        Layout { root: root.into() }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn releases_dir(&self) -> PathBuf {
        self.root.join("releases")
    }
    pub fn release_dir(&self, id: &str) -> PathBuf {
        self.releases_dir().join(id)
    }
    pub fn shared_dir(&self) -> PathBuf {
        self.root.join("shared")
    }
    pub fn current_link(&self) -> PathBuf {
        self.root.join("current")
    }

    /// Opens the app root as a handle (creating releases/ and shared/ if missing): every
    /// change under the app root goes through it.
    pub fn open(&self) -> Result<AppRoot, ReleaseError> {
        AppRoot::open(&self.root)
    }

    /// Creates releases/ and shared/ if missing.
    pub fn ensure(&self) -> Result<(), ReleaseError> {
        self.open().map(drop)
    }

    /// The release `current` points at, if any.
    pub fn current(&self) -> Option<String> {
        let target = std::fs::read_link(self.current_link()).ok()?;
        target
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
    }

    /// Release ids on disk, oldest first (ids start with a UTC timestamp, so they sort).
    /// Names that are not UTF-8 were not made by bgagent and are left out.
    pub fn list(&self) -> Result<Vec<String>, ReleaseError> {
        match AppRoot::open_existing(&self.root) {
            Ok(Some(app)) => app.list(),
            Ok(None) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Points `current` at release `id`, atomically (through the app root handle).
    pub fn switch_to(&self, id: &str) -> Result<(), ReleaseError> {
        self.open()?.switch_to(id)
    }

    /// Removes the releases that `failed` validation, then the others beyond `keep`, oldest
    /// first; never `protect`ed ones (current, the rollback target). Through the app root
    /// handle: no link inside a release is followed.
    pub fn prune(
        &self,
        keep: usize,
        protect: &[&str],
        failed: &[String],
    ) -> Result<Vec<String>, ReleaseError> {
        self.open()?.prune(keep, protect, failed)
    }

    /// Links each shared path of release `id` to `shared/<path>`: see
    /// [`AppRoot::link_shared`].
    pub fn link_shared(
        &self,
        id: &str,
        shared_paths: &[PathBuf],
        policy: &Policy,
    ) -> Result<(), ReleaseError> {
        let app = self.open()?;
        let rel = app.open_release(id)?;
        app.link_shared(&rel, shared_paths, policy)
    }
}

/// Which releases to delete: the oldest beyond `keep`, never a protected one. Pure.
pub fn prune_plan(ids_oldest_first: &[String], keep: usize, protect: &[&str]) -> Vec<String> {
    let excess = ids_oldest_first.len().saturating_sub(keep);
    ids_oldest_first
        .iter()
        .filter(|id| !protect.contains(&id.as_str()))
        .take(excess)
        .cloned()
        .collect()
}

/// Which releases to delete: every release that failed validation (it is never a rollback
/// target, and does not count toward `keep`), then the oldest of the others beyond `keep`;
/// never a protected one. Pure.
pub fn cleanup_plan(
    ids_oldest_first: &[String],
    failed: &[String],
    keep: usize,
    protect: &[&str],
) -> Vec<String> {
    let (bad, good): (Vec<String>, Vec<String>) = ids_oldest_first
        .iter()
        .cloned()
        .partition(|id| failed.contains(id));
    let mut plan: Vec<String> = bad
        .into_iter()
        .filter(|id| !protect.contains(&id.as_str()))
        .collect();
    plan.extend(prune_plan(&good, keep, protect));
    plan
}

/// A new release id: UTC timestamp, then a tag (deployment id), safe as a directory name.
pub fn new_release_id(now: std::time::SystemTime, tag: &str) -> String {
    let ts: String = humantime::format_rfc3339_seconds(now)
        .to_string()
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect();
    format!("{ts}-{}", release_tag(tag))
}

/// The part of a release id that names its deployment: the id with anything that is not
/// `[A-Za-z0-9_-]` replaced, at most 64 characters.
pub fn release_tag(deployment_id: &str) -> String {
    deployment_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect()
}

/// `id`, or `id.2`, `id.3`, ... if a directory of that name is already on disk (a retry in
/// the same second as an attempt whose release could not be removed). Pure.
pub fn unused_release_id(id: &str, on_disk: &[String]) -> String {
    if !on_disk.iter().any(|d| d == id) {
        return id.to_string();
    }
    (2..)
        .map(|n| format!("{id}.{n}"))
        .find(|c| !on_disk.iter().any(|d| d == c))
        .expect("an unused suffix")
}

/// Release directories that an interrupted or failed attempt of deployment `tag` left
/// behind: on disk, named `<timestamp>-<tag>` (or with a `.<n>` suffix), but never recorded
/// as built, and neither `protect`ed (current, previous). Pure.
pub fn leftover_plan(
    on_disk: &[String],
    recorded: &dyn Fn(&str) -> bool,
    tag: &str,
    protect: &[&str],
) -> Vec<String> {
    on_disk
        .iter()
        .filter(|id| {
            let Some((_, rest)) = id.split_once('-') else {
                return false;
            };
            let ours = rest == tag
                || rest
                    .strip_prefix(tag)
                    .and_then(|s| s.strip_prefix('.'))
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            ours && !recorded(id) && !protect.contains(&id.as_str())
        })
        .cloned()
        .collect()
}

/// What intake did, for the log and the benchmark.
#[derive(Debug, Default, Clone, Serialize)]
pub struct IntakeReport {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    pub reflinked: u64,
    pub hardlinked: u64,
    pub copied: u64,
}

const STRAT_REFLINK: u8 = 0;
const STRAT_HARDLINK: u8 = 1;
const STRAT_COPY: u8 = 2;

/// A directory whose entries are still to be created. `fds` are its source and destination
/// directories, opened from their parents by one name (no path walk from the root, no
/// symlink followed); when too many are pending, only the path is kept and it is opened later.
struct DirJob {
    rel: PathBuf,
    fds: Option<(OwnedFd, OwnedFd)>,
    /// The mode the destination directory was given: its children inherit a setgid bit.
    mode: u32,
}

/// Directory fd pairs that may wait in the queue at once (well under the default soft limit
/// of 1024 open files).
const MAX_QUEUED_FD_PAIRS: usize = 128;

struct Shared<'a> {
    policy: &'a Policy,
    src_root: &'a Path,
    src_fd: BorrowedFd<'a>,
    dest_fd: BorrowedFd<'a>,
    strategy: AtomicU8,
    /// The process umask, when known and no default ACL applies: a new directory then has
    /// exactly the mode given to mkdirat unless the mode has bits the umask removes.
    umask: Option<u32>,
    queued_fds: AtomicUsize,
    queue: Mutex<(Vec<DirJob>, usize)>, // (pending dirs, dirs in progress)
    cv: Condvar,
    error: Mutex<Option<ReleaseError>>,
    files: AtomicU64,
    dirs: AtomicU64,
    symlinks: AtomicU64,
    bytes: AtomicU64,
    reflinked: AtomicU64,
    hardlinked: AtomicU64,
    copied: AtomicU64,
}

/// Builds release directory `dest` (which must not exist) from the tree at `src`, applying
/// `policy` to every entry as it is created. On error the partial `dest` is removed.
pub fn intake_dir(
    src: &Path,
    dest: &Path,
    mode: IntakeMode,
    policy: &Policy,
) -> Result<IntakeReport, ReleaseError> {
    if !src.is_dir() {
        return Err(ReleaseError::NoSource(src.to_path_buf()));
    }
    let root_pl = policy.placement(Path::new(""), Kind::Dir, 0o755);
    let dir = ReleaseDir::create_at_path(dest, root_pl)?;
    let result = intake_into(src, &dir, mode, policy);
    if result.is_err() {
        let _ = dir.empty();
        let _ = std::fs::remove_dir(dest);
    }
    result
}

/// Builds the release in the new, empty directory `dest` (already given the policy's root
/// placement) from the tree at `src`, applying `policy` to every entry as it is created.
/// Every directory on both sides is reached from its parent's fd (or from the root's fd
/// without following any link), never by a path from `/`. On error `dest` may hold a
/// partial tree: the caller removes it.
pub fn intake_into(
    src: &Path,
    dest_dir: &ReleaseDir,
    mode: IntakeMode,
    policy: &Policy,
) -> Result<IntakeReport, ReleaseError> {
    let src_root_fd = rustix::fs::open(
        src,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|_| ReleaseError::NoSource(src.to_path_buf()))?;
    let dest = dest_dir.path();
    let root_mode = rustix::fs::fstat(dest_dir.fd())
        .map(|st| st.st_mode & 0o7777)
        .map_err(|e| io_err("inspect", dest)(e.into()))?;
    let result = (|| {
        let shared = Shared {
            policy,
            src_root: src,
            src_fd: src_root_fd.as_fd(),
            dest_fd: dest_dir.fd(),
            strategy: AtomicU8::new(match mode {
                IntakeMode::Auto | IntakeMode::AutoNoLink | IntakeMode::Reflink => STRAT_REFLINK,
                IntakeMode::Hardlink => STRAT_HARDLINK,
                IntakeMode::Copy => STRAT_COPY,
            }),
            umask: if has_default_acl_fd(dest_dir.fd()) {
                None
            } else {
                fsutil::current_umask()
            },
            queued_fds: AtomicUsize::new(0),
            queue: Mutex::new((
                vec![DirJob {
                    rel: PathBuf::new(),
                    fds: None,
                    mode: root_mode,
                }],
                0,
            )),
            cv: Condvar::new(),
            error: Mutex::new(None),
            files: AtomicU64::new(0),
            dirs: AtomicU64::new(0),
            symlinks: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            reflinked: AtomicU64::new(0),
            hardlinked: AtomicU64::new(0),
            copied: AtomicU64::new(0),
        };
        let strict = !matches!(mode, IntakeMode::Auto | IntakeMode::AutoNoLink);
        let no_link = mode == IntakeMode::AutoNoLink;
        // The work is syscalls that block on the filesystem: two threads per core keep the
        // cores busy.
        let workers = std::thread::available_parallelism()
            .map(|n| n.get() * 2)
            .unwrap_or(2)
            .clamp(2, 8);
        std::thread::scope(|s| {
            let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
            for _ in 0..workers {
                let done_tx = done_tx.clone();
                let shared = &shared;
                s.spawn(move || {
                    worker(shared, dest, strict, no_link);
                    let _ = done_tx.send(());
                });
            }
            drop(done_tx);
            // This thread carries the event's span: it reports progress for a terminal
            // while the workers copy.
            let mut meter = crate::progress::Meter::new("intake", "entries", None);
            let count = || {
                shared.files.load(Ordering::Relaxed)
                    + shared.dirs.load(Ordering::Relaxed)
                    + shared.symlinks.load(Ordering::Relaxed)
            };
            let mut finished = 0;
            while finished < workers {
                match done_rx.recv_timeout(crate::progress::Meter::EVERY) {
                    Ok(()) => finished += 1,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => meter.update(count(), ""),
                    // A worker that panicked: the scope reports it.
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            meter.finish(count(), "");
        });
        if let Some(e) = shared.error.lock().map(|mut g| g.take()).unwrap_or(None) {
            return Err(e);
        }
        Ok(IntakeReport {
            files: shared.files.into_inner(),
            dirs: shared.dirs.into_inner(),
            symlinks: shared.symlinks.into_inner(),
            bytes: shared.bytes.into_inner(),
            reflinked: shared.reflinked.into_inner(),
            hardlinked: shared.hardlinked.into_inner(),
            copied: shared.copied.into_inner(),
        })
    })();
    result
}

fn worker(sh: &Shared<'_>, dest: &Path, strict: bool, no_link: bool) {
    loop {
        let job = {
            let Ok(mut q) = sh.queue.lock() else { return };
            loop {
                if sh.error.lock().map(|e| e.is_some()).unwrap_or(true) {
                    sh.cv.notify_all();
                    return;
                }
                // Depth first: the queue stays short, so most jobs keep their open fds.
                if let Some(d) = q.0.pop() {
                    q.1 += 1;
                    break d;
                }
                if q.1 == 0 {
                    sh.cv.notify_all();
                    return;
                }
                q = match sh.cv.wait(q) {
                    Ok(q) => q,
                    Err(_) => return,
                };
            }
        };
        let res = copy_dir_entries(sh, dest, job, strict, no_link);
        if let Ok(mut q) = sh.queue.lock() {
            match res {
                Ok(subdirs) => q.0.extend(subdirs),
                Err(e) => {
                    if let Ok(mut slot) = sh.error.lock() {
                        slot.get_or_insert(e);
                    }
                }
            }
            q.1 -= 1;
        }
        sh.cv.notify_all();
    }
}

/// Opens `rel` beneath the root fd `base` without following any link (a directory of a
/// tree being built may have been swapped for a link by a writer of its group).
fn open_dir(base: BorrowedFd<'_>, shown: &Path, rel: &Path) -> Result<OwnedFd, ReleaseError> {
    crate::appdir::open_dir_beneath(base, rel).map_err(io_err("open directory", shown.join(rel)))
}

/// Creates the entries of one source directory in the destination; returns its
/// subdirectories (relative paths) for the queue.
fn copy_dir_entries(
    sh: &Shared<'_>,
    dest_root: &Path,
    job: DirJob,
    strict: bool,
    no_link: bool,
) -> Result<Vec<DirJob>, ReleaseError> {
    let rel = job.rel.as_path();
    let (src_fd, dst_fd) = match job.fds {
        Some(pair) => {
            sh.queued_fds.fetch_sub(1, Ordering::Relaxed);
            pair
        }
        None => (
            open_dir(sh.src_fd, sh.src_root, rel)?,
            open_dir(sh.dest_fd, dest_root, rel)?,
        ),
    };
    let parent_setgid = job.mode & 0o2000 != 0;
    let mut dir =
        Dir::read_from(&src_fd).map_err(|e| io_err("read", sh.src_root.join(rel))(e.into()))?;
    let mut subdirs = Vec::new();
    while let Some(entry) = dir.read() {
        let entry = entry.map_err(|e| io_err("read", sh.src_root.join(rel))(e.into()))?;
        let name: &CStr = entry.file_name();
        let bytes = name.to_bytes();
        if bytes == b"." || bytes == b".." {
            continue;
        }
        let child_rel = rel.join(OsStr::from_bytes(bytes));
        // getdents already says what a directory is; only files and links need a stat (the
        // executable bit, and whether a hard link already has the right mode and owner).
        let st = match entry.file_type() {
            FileType::Directory => None,
            _ => Some(
                rustix::fs::statat(&src_fd, name, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| io_err("inspect", sh.src_root.join(&child_rel))(e.into()))?,
            ),
        };
        let ft = st
            .as_ref()
            .map(|s| FileType::from_raw_mode(s.st_mode))
            .unwrap_or(FileType::Directory);
        let src_mode = st.as_ref().map(|s| s.st_mode & 0o7777).unwrap_or(0o755);
        match (ft, st) {
            (FileType::Directory, _) => {
                let pl = sh.policy.placement(&child_rel, Kind::Dir, src_mode);
                rustix::fs::mkdirat(&dst_fd, name, Mode::from_raw_mode(pl.mode))
                    .map_err(|e| io_err("create", dest_root.join(&child_rel))(e.into()))?;
                // mkdirat gave exactly pl.mode unless the umask narrowed it, the mode has
                // special bits (mkdir ignores setgid) or the parent passes its setgid bit on.
                let exact = sh.umask.is_some_and(|u| pl.mode & u == 0)
                    && pl.mode & 0o7000 == 0
                    && !parent_setgid;
                let fds = if sh.queued_fds.fetch_add(1, Ordering::Relaxed) < MAX_QUEUED_FD_PAIRS {
                    let pair =
                        open_child_dir(&src_fd, name, sh.src_root, &child_rel).and_then(|s| {
                            Ok((s, open_child_dir(&dst_fd, name, dest_root, &child_rel)?))
                        });
                    match pair {
                        Ok(pair) => Some(pair),
                        Err(e) => {
                            sh.queued_fds.fetch_sub(1, Ordering::Relaxed);
                            return Err(e);
                        }
                    }
                } else {
                    sh.queued_fds.fetch_sub(1, Ordering::Relaxed);
                    None
                };
                // Owner first: chown may clear mode bits, chmod then sets them exactly.
                match &fds {
                    Some((_, d)) => {
                        if pl.uid.is_some() || pl.gid.is_some() {
                            rustix::fs::fchown(d, uid(pl.uid), gid(pl.gid)).map_err(|e| {
                                io_err("chown", dest_root.join(&child_rel))(e.into())
                            })?;
                        }
                        if !exact {
                            rustix::fs::fchmod(d, Mode::from_raw_mode(pl.mode)).map_err(|e| {
                                io_err("chmod", dest_root.join(&child_rel))(e.into())
                            })?;
                        }
                    }
                    None => set_at(
                        &dst_fd, name, pl.mode, !exact, pl.uid, pl.gid, dest_root, &child_rel,
                    )?,
                }
                sh.dirs.fetch_add(1, Ordering::Relaxed);
                subdirs.push(DirJob {
                    rel: child_rel,
                    fds,
                    mode: pl.mode,
                });
            }
            (FileType::RegularFile, Some(st)) => {
                if src_mode & 0o6000 != 0 {
                    return Err(ReleaseError::Unsafe {
                        path: sh.src_root.join(&child_rel),
                        reason: "it has the setuid or setgid bit".into(),
                    });
                }
                let pl = sh.policy.placement(&child_rel, Kind::File, src_mode);
                place_file(
                    sh, &src_fd, &dst_fd, name, &st, pl, dest_root, &child_rel, strict, no_link,
                )?;
                sh.files.fetch_add(1, Ordering::Relaxed);
                sh.bytes.fetch_add(st.st_size as u64, Ordering::Relaxed);
            }
            (FileType::Symlink, _) => {
                let target = rustix::fs::readlinkat(&src_fd, name, Vec::new())
                    .map_err(|e| io_err("read link", sh.src_root.join(&child_rel))(e.into()))?;
                let target = PathBuf::from(OsStr::from_bytes(target.to_bytes()));
                if !link_stays_inside(&child_rel, &target) {
                    return Err(ReleaseError::Unsafe {
                        path: sh.src_root.join(&child_rel),
                        reason: format!(
                            "it is a symlink to {} which resolves outside the release",
                            target.display()
                        ),
                    });
                }
                rustix::fs::symlinkat(&target, &dst_fd, name)
                    .map_err(|e| io_err("create link", dest_root.join(&child_rel))(e.into()))?;
                let pl = sh.policy.placement(&child_rel, Kind::Symlink, 0);
                if pl.uid.is_some() || pl.gid.is_some() {
                    rustix::fs::chownat(
                        &dst_fd,
                        name,
                        uid(pl.uid),
                        gid(pl.gid),
                        AtFlags::SYMLINK_NOFOLLOW,
                    )
                    .map_err(|e| io_err("chown", dest_root.join(&child_rel))(e.into()))?;
                }
                sh.symlinks.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                return Err(ReleaseError::Unsafe {
                    path: sh.src_root.join(&child_rel),
                    reason: "it is a device file, FIFO or socket".into(),
                });
            }
        }
    }
    Ok(subdirs)
}

fn uid(u: Option<u32>) -> Option<rustix::fs::Uid> {
    u.map(rustix::fs::Uid::from_raw)
}
fn gid(g: Option<u32>) -> Option<rustix::fs::Gid> {
    g.map(rustix::fs::Gid::from_raw)
}

#[allow(clippy::too_many_arguments)]
fn set_at(
    dir: &OwnedFd,
    name: &CStr,
    mode: u32,
    chmod: bool,
    u: Option<u32>,
    g: Option<u32>,
    dest_root: &Path,
    rel: &Path,
) -> Result<(), ReleaseError> {
    if u.is_some() || g.is_some() {
        rustix::fs::chownat(dir, name, uid(u), gid(g), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| io_err("chown", dest_root.join(rel))(e.into()))?;
    }
    if chmod {
        rustix::fs::chmodat(dir, name, Mode::from_raw_mode(mode), AtFlags::empty())
            .map_err(|e| io_err("chmod", dest_root.join(rel))(e.into()))?;
    }
    Ok(())
}

/// Opens directory `name` inside `parent` without following a symlink.
fn open_child_dir(
    parent: &OwnedFd,
    name: &CStr,
    root: &Path,
    rel: &Path,
) -> Result<OwnedFd, ReleaseError> {
    rustix::fs::openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err("open directory", root.join(rel))(e.into()))
}

/// Whether new entries under `dir` get their modes from a default ACL rather than the umask.
pub(crate) fn has_default_acl_fd(dir: BorrowedFd<'_>) -> bool {
    !matches!(
        rustix::fs::fgetxattr(dir, "system.posix_acl_default", &mut [0u8; 0][..]),
        Err(rustix::io::Errno::NODATA) | Err(rustix::io::Errno::OPNOTSUPP)
    )
}

#[allow(clippy::too_many_arguments)]
fn place_file(
    sh: &Shared<'_>,
    src_dir: &OwnedFd,
    dst_dir: &OwnedFd,
    name: &CStr,
    st: &rustix::fs::Stat,
    pl: crate::perms::Placement,
    dest_root: &Path,
    rel: &Path,
    strict: bool,
    no_link: bool,
) -> Result<(), ReleaseError> {
    // A file that already has another name may be linked to anything on this filesystem
    // (the artifact's owner made that link): linking it too would put the policy's mode and
    // owner on that other file. It is copied; only files with one name are linked.
    let shared_inode = st.st_nlink > 1;
    let mut linked = false;
    loop {
        let strat = sh.strategy.load(Ordering::Relaxed);
        let attempt: io::Result<()> = match strat {
            STRAT_HARDLINK if shared_inode => clone_or_copy(src_dir, dst_dir, name, pl.mode, false)
                .map(|_| {
                    sh.copied.fetch_add(1, Ordering::Relaxed);
                }),
            STRAT_HARDLINK => rustix::fs::linkat(src_dir, name, dst_dir, name, AtFlags::empty())
                .map_err(io::Error::from)
                .map(|_| {
                    linked = true;
                    sh.hardlinked.fetch_add(1, Ordering::Relaxed);
                }),
            _ => clone_or_copy(src_dir, dst_dir, name, pl.mode, strat == STRAT_REFLINK).map(|_| {
                if strat == STRAT_REFLINK {
                    sh.reflinked.fetch_add(1, Ordering::Relaxed);
                } else {
                    sh.copied.fetch_add(1, Ordering::Relaxed);
                }
            }),
        };
        match attempt {
            Ok(()) => break,
            Err(e) if !strict && strat != STRAT_COPY && fallback_worthy(&e) => {
                // Filesystem can't reflink (or link across devices): degrade once for all.
                let next = if no_link { STRAT_COPY } else { strat + 1 };
                let _ =
                    sh.strategy
                        .compare_exchange(strat, next, Ordering::Relaxed, Ordering::Relaxed);
                let _ = rustix::fs::unlinkat(dst_dir, name, AtFlags::empty());
                continue;
            }
            Err(e) => return Err(io_err("create", dest_root.join(rel))(e)),
        }
    }
    // A hard link shares the inode: skip what is already right (saves two syscalls a file).
    // Owner first: chown clears setuid/setgid bits, chmod then sets the mode exactly.
    let same_mode = (st.st_mode & 0o7777) == pl.mode;
    let same_owner = pl.uid.is_none_or(|u| u == st.st_uid) && pl.gid.is_none_or(|g| g == st.st_gid);
    let chown = (pl.uid.is_some() || pl.gid.is_some()) && !(linked && same_owner);
    if chown {
        rustix::fs::chownat(
            dst_dir,
            name,
            uid(pl.uid),
            gid(pl.gid),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| io_err("chown", dest_root.join(rel))(e.into()))?;
    }
    if !linked || !same_mode || (chown && pl.mode & 0o6000 != 0) {
        rustix::fs::chmodat(
            dst_dir,
            name,
            Mode::from_raw_mode(pl.mode),
            AtFlags::empty(),
        )
        .map_err(|e| io_err("chmod", dest_root.join(rel))(e.into()))?;
    }
    Ok(())
}

fn fallback_worthy(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP)
            | Some(libc::EXDEV)
            | Some(libc::EINVAL)
            | Some(libc::EPERM)
            | Some(libc::EMLINK)
            | Some(libc::ENOTTY)
    )
}

fn clone_or_copy(
    src_dir: &OwnedFd,
    dst_dir: &OwnedFd,
    name: &CStr,
    mode: u32,
    reflink: bool,
) -> io::Result<()> {
    let src = rustix::fs::openat(
        src_dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let dst = rustix::fs::openat(
        dst_dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode & 0o777),
    )?;
    if reflink {
        return rustix::fs::ioctl_ficlone(&dst, &src).map_err(io::Error::from);
    }
    let mut s = std::fs::File::from(src);
    let mut d = std::fs::File::from(dst);
    // std::io::copy uses copy_file_range/sendfile between files.
    std::io::copy(&mut s, &mut d)?;
    let _ = d.as_fd();
    Ok(())
}

/// Whether a symlink at `link_rel` (relative to the release root) pointing at `target`
/// resolves inside the release. Absolute targets never do. A `..` is allowed only at the
/// start of the target: the link's own ancestors are real directories (nothing is created
/// through a link), so leading `..`s are counted exactly; a `..` after a name could follow
/// another link first (`d/l -> ..`, then `x -> d/l/../outside`) and is refused.
pub fn link_stays_inside(link_rel: &Path, target: &Path) -> bool {
    if target.is_absolute() || target.as_os_str().is_empty() {
        return false;
    }
    let mut depth: i64 = link_rel.components().count() as i64 - 1; // the link's directory
    let mut seen_name = false;
    for c in target.components() {
        match c {
            Component::ParentDir => {
                if seen_name {
                    return false;
                }
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            Component::Normal(_) => {
                seen_name = true;
                depth += 1
            }
            Component::CurDir => {}
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::perms::PermsConfig;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    /// Issue 11 item 3: a release that failed validation is pruned first and does not
    /// count toward `release.keep`.
    fn cleanup_removes_failed_releases_first_and_does_not_count_them() {
        let ids: Vec<String> = ["a", "b", "c", "d", "e"].map(String::from).to_vec();
        let failed = vec!["d".to_string(), "b".to_string()];
        // keep 3 good ones (a, c, e), and remove both failed
        assert_eq!(cleanup_plan(&ids, &failed, 3, &["e"]), vec!["b", "d"]);
        // keep 2: the oldest good one goes too
        assert_eq!(cleanup_plan(&ids, &failed, 2, &["e"]), vec!["b", "d", "a"]);
        // a failed release that is current (no switch-back) stays
        assert_eq!(cleanup_plan(&ids, &failed, 3, &["d", "c"]), vec!["b"]);
    }

    #[test]
    fn prune_keeps_newest_and_protected() {
        let all = ids(&["1", "2", "3", "4", "5", "6"]);
        assert_eq!(prune_plan(&all, 3, &["6", "5"]), ids(&["1", "2", "3"]));
        // an old release that is still current is never pruned
        assert_eq!(prune_plan(&all, 3, &["1", "6"]), ids(&["2", "3", "4"]));
        assert!(prune_plan(&all, 10, &[]).is_empty());
    }

    #[test]
    fn links_inside_and_outside() {
        assert!(link_stays_inside(Path::new("a/b/link"), Path::new("../c")));
        assert!(link_stays_inside(Path::new("a/link"), Path::new("../c")));
        assert!(!link_stays_inside(Path::new("link"), Path::new("../c")));
        assert!(!link_stays_inside(
            Path::new("a/link"),
            Path::new("../../c")
        ));
        assert!(!link_stays_inside(
            Path::new("a/link"),
            Path::new("/etc/passwd")
        ));
        // a `..` after a name could step back out through another link: refused
        assert!(!link_stays_inside(
            Path::new("a/link"),
            Path::new("./x/../y")
        ));
        assert!(!link_stays_inside(
            Path::new("x"),
            Path::new("d/l/../outside")
        ));
        assert!(link_stays_inside(
            Path::new("a/b/link"),
            Path::new("../../c/d")
        ));
    }

    #[test]
    fn retry_ids_and_leftovers_of_an_interrupted_attempt() {
        let disk: Vec<String> = [
            "20261122T180300Z-d-A",
            "20261122T180351Z-d-K",
            "20261122T180351Z-d-K.2",
            "20261122T180352Z-d-KX",
            "20261122T180352Z-d-K-2",
            "20261122T180353Z-d-K.x",
            "20261122T180354Z-d-K",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            unused_release_id("20261122T180400Z-d-K", &disk),
            "20261122T180400Z-d-K"
        );
        assert_eq!(
            unused_release_id("20261122T180351Z-d-K", &disk),
            "20261122T180351Z-d-K.3"
        );
        let recorded = |id: &str| id == "20261122T180354Z-d-K";
        // Another deployment's (d-KX, d-K-2), a non-numeric suffix, a recorded release and a
        // protected one are all kept.
        assert_eq!(
            leftover_plan(&disk, &recorded, "d-K", &["20261122T180351Z-d-K.2"]),
            vec!["20261122T180351Z-d-K".to_string()]
        );
        assert_eq!(
            leftover_plan(&disk, &|_| false, "d-K", &[]),
            vec![
                "20261122T180351Z-d-K".to_string(),
                "20261122T180351Z-d-K.2".to_string(),
                "20261122T180354Z-d-K".to_string()
            ]
        );
    }

    #[test]
    fn release_ids_sort_by_time_and_are_safe_names() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let id = new_release_id(t, "d-ABC/../x");
        assert_eq!(id, "20231114T221320Z-d-ABC____x");
    }

    fn tree(root: &Path) {
        std::fs::create_dir_all(root.join("vendor/a/src")).unwrap();
        std::fs::create_dir_all(root.join("var/cache")).unwrap();
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::write(root.join("vendor/a/src/X.php"), "<?php // x").unwrap();
        std::fs::write(root.join("var/cache/c"), "c").unwrap();
        std::fs::write(root.join("bin/magento"), "#!/usr/bin/env php").unwrap();
        std::os::unix::fs::symlink("../vendor/a", root.join("bin/a")).unwrap();
    }

    #[test]
    fn intake_applies_policy_in_every_mode() {
        for mode in [
            IntakeMode::Auto,
            IntakeMode::AutoNoLink,
            IntakeMode::Hardlink,
            IntakeMode::Copy,
        ] {
            let d = tempfile::tempdir().unwrap();
            let src = d.path().join("src");
            tree(&src);
            let dest = d.path().join("rel");
            let policy = Policy::with_ids(&PermsConfig::default(), None, None).unwrap();
            let r = intake_dir(&src, &dest, mode, &policy).unwrap();
            assert_eq!((r.files, r.symlinks), (3, 1), "{mode:?}");
            let m = |p: &str| {
                std::fs::symlink_metadata(dest.join(p))
                    .unwrap()
                    .permissions()
                    .mode()
                    & 0o7777
            };
            assert_eq!(m("vendor/a/src/X.php"), 0o640);
            assert_eq!(m("vendor"), 0o750);
            assert_eq!(m("var/cache"), 0o2770);
            assert_eq!(m("var/cache/c"), 0o660);
            assert_eq!(m("bin/magento"), 0o750);
            assert_eq!(
                std::fs::read_link(dest.join("bin/a")).unwrap(),
                Path::new("../vendor/a")
            );
            assert_eq!(
                std::fs::read_to_string(dest.join("vendor/a/src/X.php")).unwrap(),
                "<?php // x"
            );
            let a = std::fs::metadata(src.join("var/cache/c")).unwrap();
            let b = std::fs::metadata(dest.join("var/cache/c")).unwrap();
            match mode {
                IntakeMode::Hardlink => assert_eq!(a.ino(), b.ino()),
                // the operator's own files are never linked, so never re-moded
                IntakeMode::AutoNoLink | IntakeMode::Copy => {
                    assert_ne!(a.ino(), b.ino());
                    assert_eq!(a.permissions().mode() & 0o777, 0o644);
                }
                _ => {}
            }
        }
    }

    #[test]
    fn intake_sets_exact_dir_modes_past_umask_setgid_and_fd_budget() {
        // Wider than the fd budget, so some directories are opened by path later; modes the
        // umask narrows (0775 under 022), a setgid parent whose child must not inherit it,
        // and a setgid child.
        assert!(fsutil::current_umask().is_some());
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        for i in 0..(MAX_QUEUED_FD_PAIRS * 3) {
            std::fs::create_dir_all(src.join(format!("vendor/p{i}/src"))).unwrap();
            std::fs::write(src.join(format!("vendor/p{i}/src/F.php")), "<?php").unwrap();
        }
        std::fs::create_dir_all(src.join("var/plain/deeper")).unwrap();
        std::fs::create_dir_all(src.join("var/cache")).unwrap();
        let mut cfg = PermsConfig {
            dir_mode: "0775".into(),
            ..PermsConfig::default()
        };
        cfg.writable.push(crate::perms::WritablePath {
            path: PathBuf::from("var/plain"),
            dir_mode: "0750".into(),
            file_mode: "0640".into(),
        });
        let policy = Policy::with_ids(&cfg, None, None).unwrap();
        let dest = d.path().join("rel");
        let r = intake_dir(&src, &dest, IntakeMode::Hardlink, &policy).unwrap();
        assert_eq!(r.files, (MAX_QUEUED_FD_PAIRS * 3) as u64);
        let m = |p: &str| {
            std::fs::symlink_metadata(dest.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        for i in 0..(MAX_QUEUED_FD_PAIRS * 3) {
            assert_eq!(m(&format!("vendor/p{i}")), 0o775, "vendor/p{i}");
            assert_eq!(m(&format!("vendor/p{i}/src")), 0o775, "vendor/p{i}/src");
            assert_eq!(m(&format!("vendor/p{i}/src/F.php")), 0o640);
        }
        assert_eq!(m("vendor"), 0o775);
        assert_eq!(m("var"), 0o2770);
        assert_eq!(m("var/cache"), 0o2770);
        assert_eq!(m("var/plain"), 0o750);
        assert_eq!(m("var/plain/deeper"), 0o750);
    }

    #[test]
    fn intake_rejects_escaping_symlink_and_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        tree(&src);
        std::os::unix::fs::symlink("/etc/passwd", src.join("vendor/evil")).unwrap();
        let dest = d.path().join("rel");
        let policy = Policy::with_ids(&PermsConfig::default(), None, None).unwrap();
        let e = intake_dir(&src, &dest, IntakeMode::Auto, &policy).unwrap_err();
        assert!(e.to_string().contains("vendor/evil"), "{e}");
        assert!(!dest.exists());
    }

    #[test]
    fn switch_and_shared_links() {
        let d = tempfile::tempdir().unwrap();
        let layout = Layout::new(d.path());
        layout.ensure().unwrap();
        let policy = Policy::with_ids(&PermsConfig::default(), None, None).unwrap();
        for id in ["r1", "r2"] {
            let src = d.path().join(format!("src-{id}"));
            tree(&src);
            std::fs::create_dir_all(src.join("pub/media")).unwrap();
            std::fs::write(src.join("pub/media/shipped.jpg"), "x").unwrap();
            intake_dir(&src, &layout.release_dir(id), IntakeMode::Auto, &policy).unwrap();
            layout
                .link_shared(id, &[PathBuf::from("pub/media")], &policy)
                .unwrap();
        }
        std::fs::write(layout.shared_dir().join("pub/media/upload.jpg"), "u").unwrap();
        layout.switch_to("r1").unwrap();
        assert_eq!(layout.current().as_deref(), Some("r1"));
        layout.switch_to("r2").unwrap();
        assert_eq!(layout.current().as_deref(), Some("r2"));
        assert_eq!(
            std::fs::read_to_string(layout.current_link().join("pub/media/upload.jpg")).unwrap(),
            "u"
        );
        assert!(layout.switch_to("nope").is_err());
        assert_eq!(layout.list().unwrap(), ids(&["r1", "r2"]));
    }
}
