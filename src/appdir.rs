//! Directory handles for the app root and its releases: after intake, the only way bgagent
//! creates, writes, links, chmods, chowns, renames or deletes anything under the app root.
//!
//! bgagent runs as root; the artifact and the web user are adversaries. The artifact ships
//! symlinks (`app/etc -> ../pub/media`, `var -> pub/media`), and the web user can rename
//! and plant entries in every group-writable directory (shared/pub/media, var/...) at any
//! moment. A path string handed to `open`, `chmod`, `create_dir_all` or `remove_dir_all` is
//! resolved by the kernel through whatever links are there *at that instant*, so each of
//! them can be turned into a root write, chmod or delete outside the release.
//!
//! So: [`AppRoot`] is opened once from the configured app root (a path only root controls)
//! and holds `releases/` and `shared/` open; [`ReleaseDir`] holds one release open. Every
//! operation below them is relative to one of these file descriptors:
//!
//! - a directory inside is reached with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`:
//!   no symlink anywhere on the way is followed (not even one pointing back inside), and
//!   nothing above the handle is reachable. On kernels without openat2 (before 5.6, e.g.
//!   the Amazon Linux 2 4.14 kernel) the same is done by a walk of one `openat(O_NOFOLLOW |
//!   O_DIRECTORY)` per component, which gives the same guarantee for the plain relative
//!   paths used here (no `..`, checked);
//! - the last component is always acted on with an `*at` call on its parent's fd
//!   (`mkdirat`, `symlinkat`, `renameat`, `unlinkat`), which never follows it;
//! - modes and owners are set with `fchmod`/`fchown` on the fd of the directory or file
//!   just created, never by path (no mkdir-then-chmod-by-path window);
//! - a tree is deleted by an fd walk that never follows a link ([`remove_tree_at`]).
//!
//! A symlink where bgagent needs a directory (a render target's parent, a shared path's
//! parent) is refused with an error naming the entry; bgagent never writes through a link
//! it did not create.
//!
//! Why rustix's openat2 and not cap-std's `Dir`: rustix is already how intake and archive
//! extraction work (`*at` calls on raw fds, `fchown`, `ioctl_ficlone`), cap-std's `Dir` has
//! no owner change (that is in cap-fs-ext) and resolves symlinks that stay beneath the root,
//! which is more than bgagent wants: a link inside a release is content to serve, never a
//! path for root to write through. Both end in the same syscalls; one dependency is less.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags, ResolveFlags};

use crate::perms::{Kind, Placement, Policy};
use crate::release::ReleaseError;

use crate::release::io_err;

fn rx(
    action: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(rustix::io::Errno) -> ReleaseError {
    let f = io_err(action, path);
    move |e| f(e.into())
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Set once openat2 turned out to be missing (ENOSYS): walk instead from then on.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// The plain components of `rel`, or an error if it has anything else (`..`, `/`).
fn normal_components(rel: &Path) -> io::Result<Vec<&OsStr>> {
    let mut out = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("`{}` is not a plain relative path", rel.display()),
                ));
            }
        }
    }
    Ok(out)
}

/// Opens directory `rel` beneath `dir` without following any symlink on the way.
/// `ELOOP` or `ENOTDIR` mean a component is a symlink or not a directory.
pub fn open_dir_beneath(dir: BorrowedFd<'_>, rel: &Path) -> io::Result<OwnedFd> {
    let comps = normal_components(rel)?;
    if comps.is_empty() {
        return Ok(rustix::fs::openat(dir, c".", DIR_FLAGS, Mode::empty())?);
    }
    if !NO_OPENAT2.load(Ordering::Relaxed) {
        let clean: PathBuf = comps.iter().collect();
        match rustix::fs::openat2(
            dir,
            &clean,
            DIR_FLAGS,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        ) {
            Err(rustix::io::Errno::NOSYS) => NO_OPENAT2.store(true, Ordering::Relaxed),
            // EAGAIN: a rename raced the lookup; the walk below is not affected by that.
            Err(rustix::io::Errno::AGAIN) => {}
            r => return Ok(r?),
        }
    }
    walk_dirs(dir, &comps)
}

/// Opens file `rel` beneath `dir` for reading, following no symlink on the way nor at the
/// end: `Ok(None)` when it (or a directory on the way) does not exist. What bgagent reads
/// from a release (db_schema.xml, env.php) is content the artifact controls; this keeps a
/// planted link from making root read something outside.
pub fn open_file_beneath(dir: BorrowedFd<'_>, rel: &Path) -> io::Result<Option<OwnedFd>> {
    let comps = normal_components(rel)?;
    let Some((name, parents)) = comps.split_last() else {
        return Err(io::ErrorKind::InvalidInput.into());
    };
    let parent_rel: PathBuf = parents.iter().collect();
    let parent = match open_dir_beneath(dir, &parent_rel) {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    match rustix::fs::openat(
        &parent,
        *name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
    ) {
        Ok(fd) => {
            let st = rustix::fs::fstat(&fd)?;
            if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "not a regular file",
                ));
            }
            Ok(Some(fd))
        }
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(rustix::io::Errno::LOOP) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "it is a symlink; bgagent does not read through links in a release",
        )),
        Err(e) => Err(e.into()),
    }
}

/// Reads file `rel` beneath `dir` (see [`open_file_beneath`]), at most `max` bytes.
pub fn read_beneath(dir: BorrowedFd<'_>, rel: &Path, max: u64) -> io::Result<Option<Vec<u8>>> {
    let Some(fd) = open_file_beneath(dir, rel)? else {
        return Ok(None);
    };
    let mut buf = Vec::new();
    io::Read::read_to_end(
        &mut io::Read::take(std::fs::File::from(fd), max + 1),
        &mut buf,
    )?;
    if buf.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {max} bytes"),
        ));
    }
    Ok(Some(buf))
}

/// The entries of directory `rel` beneath `dir` that are directories or symlinks, sorted,
/// each with whether it is a symlink (not followed). Empty when `rel` does not exist.
pub fn list_dirs_beneath(dir: BorrowedFd<'_>, rel: &Path) -> io::Result<Vec<(String, bool)>> {
    let d = match open_dir_beneath(dir, rel) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    let mut rd = rustix::fs::Dir::read_from(&d)?;
    while let Some(e) = rd.read() {
        let e = e?;
        let name = String::from_utf8_lossy(e.file_name().to_bytes()).into_owned();
        if name == "." || name == ".." {
            continue;
        }
        let st = rustix::fs::statat(&d, e.file_name(), AtFlags::SYMLINK_NOFOLLOW)?;
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => out.push((name, false)),
            FileType::Symlink => out.push((name, true)),
            _ => {}
        }
    }
    out.sort();
    Ok(out)
}

/// One `openat(O_NOFOLLOW | O_DIRECTORY)` per component.
fn walk_dirs(dir: BorrowedFd<'_>, comps: &[&OsStr]) -> io::Result<OwnedFd> {
    let mut cur = rustix::fs::openat(dir, c".", DIR_FLAGS, Mode::empty())?;
    for c in comps {
        cur = rustix::fs::openat(&cur, *c, DIR_FLAGS, Mode::empty())?;
    }
    Ok(cur)
}

/// Why `name` in `parent` cannot be used as a directory, for the refusal message.
fn not_a_dir_reason(parent: BorrowedFd<'_>, name: &OsStr) -> String {
    match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => {
            match rustix::fs::readlinkat(parent, name, Vec::new()) {
                Ok(t) => format!(
                    "it is a symlink (to {}); bgagent never writes through a link",
                    crate::text::escape(&String::from_utf8_lossy(t.to_bytes()))
                ),
                Err(_) => "it is a symlink; bgagent never writes through a link".into(),
            }
        }
        Ok(_) => "it is not a directory".into(),
        Err(e) => format!("it cannot be inspected: {}", io::Error::from(e)),
    }
}

/// Creates directory `name` in `parent` with placement `pl` (owner, then the exact mode, on
/// the new directory's own fd), or opens it if it is already a real directory. A symlink or
/// anything else there is refused, naming `shown`.
fn mkdir_or_open(
    parent: BorrowedFd<'_>,
    name: &OsStr,
    pl: Placement,
    shown: &Path,
) -> Result<OwnedFd, ReleaseError> {
    let created = match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(pl.mode & 0o777)) {
        Ok(()) => true,
        Err(rustix::io::Errno::EXIST) => false,
        Err(e) => return Err(rx("create", shown)(e)),
    };
    let fd = match rustix::fs::openat(parent, name, DIR_FLAGS, Mode::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::LOOP) | Err(rustix::io::Errno::NOTDIR) => {
            return Err(ReleaseError::Refused {
                path: shown.to_path_buf(),
                reason: not_a_dir_reason(parent, name),
            });
        }
        Err(e) => return Err(rx("open directory", shown)(e)),
    };
    if created {
        set_owner_mode(&fd, pl, shown)?;
    }
    Ok(fd)
}

/// Owner first (chown may clear setgid), then the exact mode, both on the fd.
fn set_owner_mode(fd: &OwnedFd, pl: Placement, shown: &Path) -> Result<(), ReleaseError> {
    if pl.uid.is_some() || pl.gid.is_some() {
        rustix::fs::fchown(
            fd,
            pl.uid.map(rustix::fs::Uid::from_raw),
            pl.gid.map(rustix::fs::Gid::from_raw),
        )
        .map_err(rx("chown", shown))?;
    }
    rustix::fs::fchmod(fd, Mode::from_raw_mode(pl.mode)).map_err(rx("chmod", shown))
}

/// Opens (creating what is missing, each new directory with `placement(rel_so_far)`) the
/// directory `rel` beneath `base`. `shown_base` is only for messages.
fn mkdirs_beneath(
    base: BorrowedFd<'_>,
    shown_base: &Path,
    rel: &Path,
    placement: &dyn Fn(&Path) -> Placement,
) -> Result<OwnedFd, ReleaseError> {
    let comps = normal_components(rel).map_err(io_err("create", shown_base.join(rel)))?;
    let mut cur = rustix::fs::openat(base, c".", DIR_FLAGS, Mode::empty())
        .map_err(rx("open directory", shown_base))?;
    let mut so_far = PathBuf::new();
    for c in comps {
        so_far.push(c);
        cur = mkdir_or_open(
            cur.as_fd(),
            c,
            placement(&so_far),
            &shown_base.join(&so_far),
        )?;
    }
    Ok(cur)
}

/// Removes `name` in `parent` and, if it is a directory, everything below it, without ever
/// following a symlink: links are unlinked, not entered. Missing is fine.
pub fn remove_tree_at(
    parent: BorrowedFd<'_>,
    name: &OsStr,
    shown: &Path,
) -> Result<(), ReleaseError> {
    let st = match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(rx("inspect", shown)(e)),
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return rustix::fs::unlinkat(parent, name, AtFlags::empty()).map_err(rx("remove", shown));
    }
    let dir = match rustix::fs::openat(parent, name, DIR_FLAGS, Mode::empty()) {
        Ok(d) => d,
        // Swapped for a link or file since the stat: unlink that instead.
        Err(rustix::io::Errno::LOOP) | Err(rustix::io::Errno::NOTDIR) => {
            return rustix::fs::unlinkat(parent, name, AtFlags::empty())
                .map_err(rx("remove", shown));
        }
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(rx("open directory", shown)(e)),
    };
    empty_dir_fd(dir.as_fd(), shown)?;
    match rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(rx("remove", shown)(e)),
    }
}

/// Removes everything inside the open directory `dir`, never following a link.
pub fn empty_dir_fd(dir: BorrowedFd<'_>, shown: &Path) -> Result<(), ReleaseError> {
    // Names first, then removal: removing while reading a directory may skip entries.
    loop {
        let mut names: Vec<(CString, bool)> = Vec::new();
        let mut rd = rustix::fs::Dir::read_from(dir).map_err(rx("read", shown))?;
        while let Some(e) = rd.read() {
            let e = e.map_err(rx("read", shown))?;
            let b = e.file_name().to_bytes();
            if b == b"." || b == b".." {
                continue;
            }
            names.push((
                e.file_name().to_owned(),
                e.file_type() == FileType::Directory,
            ));
            if names.len() >= 4096 {
                break;
            }
        }
        if names.is_empty() {
            return Ok(());
        }
        for (n, is_dir) in names {
            let child_shown = shown.join(OsStr::from_bytes(n.to_bytes()));
            if is_dir {
                remove_tree_at(dir, OsStr::from_bytes(n.to_bytes()), &child_shown)?;
            } else {
                match rustix::fs::unlinkat(dir, n.as_c_str(), AtFlags::empty()) {
                    Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                    // d_type said file but it is a directory now (or the fs gives no d_type).
                    Err(rustix::io::Errno::ISDIR) | Err(rustix::io::Errno::PERM) => {
                        remove_tree_at(dir, OsStr::from_bytes(n.to_bytes()), &child_shown)?
                    }
                    Err(e) => return Err(rx("remove", child_shown)(e)),
                }
            }
        }
    }
}

/// The app root, opened once: `releases/` and `shared/` held open, `current` switched in it.
#[derive(Debug)]
pub struct AppRoot {
    path: PathBuf,
    root: OwnedFd,
    releases: OwnedFd,
    shared: OwnedFd,
}

impl AppRoot {
    /// Opens the app root (creating it, `releases/` and `shared/` if missing). The app root
    /// path comes from root's config and is the one path resolved by name.
    pub fn open(path: &Path) -> Result<AppRoot, ReleaseError> {
        std::fs::create_dir_all(path).map_err(io_err("create", path))?;
        let root =
            rustix::fs::open(path, DIR_FLAGS, Mode::empty()).map_err(rx("open directory", path))?;
        // releases/ and shared/ are the app root's own: root-owned 0755 unless already there.
        let pl = Placement {
            mode: 0o755,
            uid: None,
            gid: None,
        };
        let releases = mkdir_or_open(
            root.as_fd(),
            OsStr::new("releases"),
            pl,
            &path.join("releases"),
        )?;
        let shared = mkdir_or_open(root.as_fd(), OsStr::new("shared"), pl, &path.join("shared"))?;
        Ok(AppRoot {
            path: path.to_path_buf(),
            root,
            releases,
            shared,
        })
    }

    /// Opens an existing app root without creating anything: None if it or its releases/
    /// is not there yet (read-only callers: list, status).
    pub fn open_existing(path: &Path) -> Result<Option<AppRoot>, ReleaseError> {
        let root = match rustix::fs::open(path, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(e) => return Err(rx("open directory", path)(e)),
        };
        let open = |name: &CStr| match rustix::fs::openat(&root, name, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => Ok(Some(fd)),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(rx(
                "open directory",
                path.join(OsStr::from_bytes(name.to_bytes())),
            )(e)),
        };
        let (Some(releases), Some(shared)) = (open(c"releases")?, open(c"shared")?) else {
            return Ok(None);
        };
        Ok(Some(AppRoot {
            path: path.to_path_buf(),
            root,
            releases,
            shared,
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where release `id` is, for messages, template facts and commands run in it.
    pub fn release_path(&self, id: &str) -> PathBuf {
        self.path.join("releases").join(id)
    }

    /// The release `current` points at, if any.
    pub fn current(&self) -> Option<String> {
        let t = rustix::fs::readlinkat(&self.root, c"current", Vec::new()).ok()?;
        let t = PathBuf::from(OsString::from_vec(t.into_bytes()));
        t.file_name().and_then(|n| n.to_str()).map(str::to_string)
    }

    /// Names in releases/ that are directories, oldest first, staging (`.`) names skipped.
    /// A name that is not UTF-8 was not made by bgagent: it is skipped with a warning so it
    /// cannot stop pruning.
    pub fn list(&self) -> Result<Vec<String>, ReleaseError> {
        self.list_all()
            .map(|v| v.into_iter().filter(|n| !n.starts_with('.')).collect())
    }

    /// Every UTF-8 directory name in releases/, staging ones included, sorted.
    pub fn list_all(&self) -> Result<Vec<String>, ReleaseError> {
        let shown = self.path.join("releases");
        let mut rd = rustix::fs::Dir::read_from(&self.releases).map_err(rx("read", &shown))?;
        let mut ids = Vec::new();
        while let Some(e) = rd.read() {
            let e = e.map_err(rx("read", &shown))?;
            let b = e.file_name().to_bytes();
            if b == b"." || b == b".." {
                continue;
            }
            let is_dir = match e.file_type() {
                FileType::Directory => true,
                FileType::Unknown => {
                    rustix::fs::statat(&self.releases, e.file_name(), AtFlags::SYMLINK_NOFOLLOW)
                        .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory)
                }
                _ => false,
            };
            if !is_dir {
                continue;
            }
            match std::str::from_utf8(b) {
                Ok(s) => ids.push(s.to_string()),
                Err(_) => tracing::warn!(
                    "ignoring {}/{}: not a release name bgagent makes (not UTF-8); remove it by hand",
                    shown.display(),
                    crate::text::escape(&String::from_utf8_lossy(b))
                ),
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Whether release `id` is a real directory in releases/ (a link there is not a release).
    pub fn has_release(&self, id: &str) -> bool {
        valid_name(id)
            && rustix::fs::statat(&self.releases, id, AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory)
    }

    /// Opens release `id` (a real directory, not a link).
    pub fn open_release(&self, id: &str) -> Result<ReleaseDir, ReleaseError> {
        let path = self.release_path(id);
        if !valid_name(id) {
            return Err(ReleaseError::NoSuchRelease(
                id.into(),
                self.path.join("releases"),
            ));
        }
        let fd = match rustix::fs::openat(&self.releases, id, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => {
                return Err(ReleaseError::NoSuchRelease(
                    id.into(),
                    self.path.join("releases"),
                ));
            }
            Err(rustix::io::Errno::LOOP) | Err(rustix::io::Errno::NOTDIR) => {
                return Err(ReleaseError::Refused {
                    path,
                    reason: not_a_dir_reason(self.releases.as_fd(), OsStr::new(id)),
                });
            }
            Err(e) => return Err(rx("open directory", path)(e)),
        };
        Ok(ReleaseDir { fd, path })
    }

    /// Creates the new, empty directory `name` in releases/ with placement `pl` (a release
    /// being built gets the policy's root mode whatever it is built from).
    pub fn create_release(&self, name: &str, pl: Placement) -> Result<ReleaseDir, ReleaseError> {
        let path = self.release_path(name);
        if !valid_name(name) {
            return Err(io_err("create", &path)(io::ErrorKind::InvalidInput.into()));
        }
        match rustix::fs::mkdirat(&self.releases, name, Mode::from_raw_mode(pl.mode & 0o777)) {
            Ok(()) => {}
            Err(rustix::io::Errno::EXIST) => return Err(ReleaseError::Exists(path)),
            Err(e) => return Err(rx("create", path)(e)),
        }
        let fd = rustix::fs::openat(&self.releases, name, DIR_FLAGS, Mode::empty())
            .map_err(rx("open directory", &path))?;
        let dir = ReleaseDir { fd, path };
        set_owner_mode(&dir.fd, pl, &dir.path)?;
        Ok(dir)
    }

    /// Renames `from` to `to` within releases/, never over an existing entry.
    pub fn rename_release(&self, from: &str, to: &str) -> Result<(), ReleaseError> {
        if !valid_name(from) || !valid_name(to) {
            return Err(io_err("rename", self.release_path(from))(
                io::ErrorKind::InvalidInput.into(),
            ));
        }
        rustix::fs::renameat_with(
            &self.releases,
            from,
            &self.releases,
            to,
            RenameFlags::NOREPLACE,
        )
        .map_err(rx("move into place", self.release_path(from)))?;
        let _ = rustix::fs::fsync(&self.releases);
        Ok(())
    }

    /// Removes `name` from releases/ (a release, a staging dir, or a stray link), without
    /// following any link inside it.
    pub fn remove_release(&self, name: &str) -> Result<(), ReleaseError> {
        if !valid_name(name) {
            return Err(io_err("remove", self.release_path(name))(
                io::ErrorKind::InvalidInput.into(),
            ));
        }
        remove_tree_at(
            self.releases.as_fd(),
            OsStr::new(name),
            &self.release_path(name),
        )
    }

    /// Points `current` at release `id`, atomically: a new link beside it renamed over it.
    pub fn switch_to(&self, id: &str) -> Result<(), ReleaseError> {
        if !self.has_release(id) {
            return Err(ReleaseError::NoSuchRelease(
                id.into(),
                self.path.join("releases"),
            ));
        }
        let link = self.path.join("current");
        let tmp = format!(
            ".current.tmp-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        );
        let target = Path::new("releases").join(id);
        rustix::fs::symlinkat(&target, &self.root, tmp.as_str())
            .map_err(rx("switch the current link", &link))?;
        if let Err(e) = rustix::fs::renameat(&self.root, tmp.as_str(), &self.root, c"current") {
            let _ = rustix::fs::unlinkat(&self.root, tmp.as_str(), AtFlags::empty());
            return Err(rx("switch the current link", &link)(e));
        }
        rustix::fs::fsync(&self.root).map_err(rx("sync", &self.path))
    }

    /// Removes the releases that `failed` validation, then the others beyond `keep`, oldest
    /// first; never `protect`ed ones.
    pub fn prune(
        &self,
        keep: usize,
        protect: &[&str],
        failed: &[String],
    ) -> Result<Vec<String>, ReleaseError> {
        let plan = crate::release::cleanup_plan(&self.list()?, failed, keep, protect);
        for id in &plan {
            self.remove_release(id)?;
        }
        Ok(plan)
    }

    /// Links each shared path of `release` to `shared/<path>`, creating the shared side with
    /// the policy's modes and owners. Whatever the artifact had at that path is removed
    /// first (never through a link); a shared path's parent in the release must be a real
    /// directory, and every directory on the shared side too: a link there is refused.
    pub fn link_shared(
        &self,
        release: &ReleaseDir,
        shared_paths: &[PathBuf],
        policy: &Policy,
    ) -> Result<(), ReleaseError> {
        let shared_shown = self.path.join("shared");
        for p in shared_paths {
            let comps = normal_components(p).map_err(io_err("link shared path", p))?;
            let Some((last, parents)) = comps.split_last() else {
                continue;
            };
            drop(mkdirs_beneath(
                self.shared.as_fd(),
                &shared_shown,
                p,
                &|r| policy.placement(r, Kind::Dir, 0o755),
            )?);
            let parent_rel: PathBuf = parents.iter().collect();
            let parent = mkdirs_beneath(release.fd.as_fd(), &release.path, &parent_rel, &|r| {
                policy.placement(r, Kind::Dir, 0o755)
            })?;
            let in_release = release.path.join(p);
            if let Ok(st) = rustix::fs::statat(&parent, *last, AtFlags::SYMLINK_NOFOLLOW)
                && FileType::from_raw_mode(st.st_mode) == FileType::Directory
            {
                let non_empty = rustix::fs::openat(&parent, *last, DIR_FLAGS, Mode::empty())
                    .ok()
                    .and_then(|d| rustix::fs::Dir::read_from(&d).ok())
                    .map(|mut rd| {
                        std::iter::from_fn(|| rd.read())
                            .flatten()
                            .any(|e| !matches!(e.file_name().to_bytes(), b"." | b".."))
                    })
                    .unwrap_or(false);
                if non_empty {
                    tracing::warn!(
                        "the artifact ships content in shared path {}; it is replaced by the link to {}",
                        p.display(),
                        shared_shown.join(p).display()
                    );
                }
            }
            remove_tree_at(parent.as_fd(), last, &in_release)?;
            // Relative link: releases/<id>/<p> -> ../..(/..)*/shared/<p>
            let mut target = PathBuf::new();
            for _ in 0..comps.len() + 1 {
                target.push("..");
            }
            target.push("shared");
            target.push(p);
            rustix::fs::symlinkat(&target, &parent, *last)
                .map_err(rx("link shared path", &in_release))?;
        }
        Ok(())
    }
}

/// A name bgagent may use inside releases/: one plain component.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

/// One release directory, open. Everything written into a release after intake goes
/// through here.
#[derive(Debug)]
pub struct ReleaseDir {
    fd: OwnedFd,
    path: PathBuf,
}

impl ReleaseDir {
    /// Creates the new directory `path` (its parent resolved by name: for tests and for
    /// tools building a release outside an app root) with placement `pl`, set on its fd.
    pub fn create_at_path(path: &Path, pl: Placement) -> Result<ReleaseDir, ReleaseError> {
        if path.symlink_metadata().is_ok() {
            return Err(ReleaseError::Exists(path.to_path_buf()));
        }
        let (parent, name) = match (path.parent(), path.file_name()) {
            (Some(p), Some(n)) => (
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                },
                n,
            ),
            _ => return Err(io_err("create", path)(io::ErrorKind::InvalidInput.into())),
        };
        let pfd = rustix::fs::open(parent, DIR_FLAGS, Mode::empty())
            .map_err(rx("open directory", parent))?;
        rustix::fs::mkdirat(&pfd, name, Mode::from_raw_mode(pl.mode & 0o777))
            .map_err(rx("create", path))?;
        let fd = rustix::fs::openat(&pfd, name, DIR_FLAGS, Mode::empty())
            .map_err(rx("open directory", path))?;
        let dir = ReleaseDir {
            fd,
            path: path.to_path_buf(),
        };
        set_owner_mode(&dir.fd, pl, path)?;
        Ok(dir)
    }

    /// Removes everything inside the release (not the directory itself), never through a
    /// link: what a failed intake leaves is emptied this way.
    pub fn empty(&self) -> Result<(), ReleaseError> {
        empty_dir_fd(self.fd.as_fd(), &self.path)
    }

    /// Whether the release directory has no entries.
    pub fn is_empty(&self) -> Result<bool, ReleaseError> {
        let mut rd = rustix::fs::Dir::read_from(&self.fd).map_err(rx("read", &self.path))?;
        while let Some(e) = rd.read() {
            let e = e.map_err(rx("read", &self.path))?;
            if !matches!(e.file_name().to_bytes(), b"." | b"..") {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Where the release is, for messages and for commands run in it (never for writing).
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Opens (creating what is missing with `policy`'s directory modes and owners) directory
    /// `rel` of the release. A symlink or non-directory on the way is refused by name.
    pub fn dirs(&self, rel: &Path, policy: &Policy) -> Result<OwnedFd, ReleaseError> {
        mkdirs_beneath(self.fd.as_fd(), &self.path, rel, &|r| {
            policy.placement(r, Kind::Dir, 0o755)
        })
    }

    /// Writes `bytes` to `rel` atomically: parents made with the policy's modes (never
    /// through a link), a temp file created `O_EXCL` beside the target, owner and `mode` set
    /// on its fd, synced, `check` run on it (given a path that reaches that very file), then
    /// renamed over the target (a link at the target is replaced, not followed).
    pub fn write_atomic<E>(
        &self,
        rel: &Path,
        bytes: &[u8],
        pl: Placement,
        policy: &Policy,
        check: impl FnOnce(&Path) -> Result<(), E>,
    ) -> Result<Result<(), E>, ReleaseError> {
        let shown = self.path.join(rel);
        let comps = normal_components(rel).map_err(io_err("write", &shown))?;
        let Some((name, parents)) = comps.split_last() else {
            return Err(io_err("write", &shown)(io::ErrorKind::InvalidInput.into()));
        };
        let parent_rel: PathBuf = parents.iter().collect();
        let parent = self.dirs(&parent_rel, policy)?;
        let tmp = format!(
            ".{}.tmp-{}-{:08x}",
            name.to_string_lossy(),
            std::process::id(),
            fastrand::u32(..)
        );
        let f = rustix::fs::openat(
            &parent,
            tmp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(pl.mode & 0o700),
        )
        .map_err(rx("write", &shown))?;
        let result = (|| {
            let mut file = std::fs::File::from(f);
            io::Write::write_all(&mut file, bytes).map_err(io_err("write", &shown))?;
            file.sync_all().map_err(io_err("write", &shown))?;
            let fd: OwnedFd = file.into();
            set_owner_mode(&fd, pl, &shown)?;
            // The check (php -l) gets /proc/<pid>/fd/<n>: it opens this very inode, whatever
            // is renamed in the release meanwhile.
            let via = PathBuf::from(format!(
                "/proc/{}/fd/{}",
                std::process::id(),
                std::os::fd::AsRawFd::as_raw_fd(&fd)
            ));
            if let Err(e) = check(&via) {
                return Ok(Err(e));
            }
            drop(fd);
            rustix::fs::renameat(&parent, tmp.as_str(), &parent, *name)
                .map_err(rx("write", &shown))?;
            rustix::fs::fsync(&parent).map_err(rx("sync", &shown))?;
            Ok(Ok(()))
        })();
        if !matches!(result, Ok(Ok(()))) {
            let _ = rustix::fs::unlinkat(&parent, tmp.as_str(), AtFlags::empty());
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn walk_and_openat2_refuse_every_symlink_on_the_way() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        std::os::unix::fs::symlink("a", d.path().join("l")).unwrap();
        std::os::unix::fs::symlink("b", d.path().join("a/lb")).unwrap();
        let root = rustix::fs::open(d.path(), DIR_FLAGS, Mode::empty()).unwrap();
        for walk in [false, true] {
            let open = |p: &str| {
                if walk {
                    normal_components(Path::new(p)).and_then(|c| walk_dirs(root.as_fd(), &c))
                } else {
                    open_dir_beneath(root.as_fd(), Path::new(p))
                }
            };
            assert!(open("a/b").is_ok());
            assert!(open("l/b").is_err(), "walk={walk}");
            assert!(open("a/lb").is_err(), "walk={walk}");
            assert!(open("../x").is_err());
        }
    }

    #[test]
    fn remove_tree_never_enters_a_link() {
        let d = tempfile::tempdir().unwrap();
        let outside = d.path().join("outside");
        std::fs::create_dir_all(outside.join("keep")).unwrap();
        std::fs::write(outside.join("keep/f"), "x").unwrap();
        let t = d.path().join("t");
        std::fs::create_dir_all(t.join("x/y")).unwrap();
        std::fs::write(t.join("x/y/f"), "x").unwrap();
        std::os::unix::fs::symlink(&outside, t.join("x/link")).unwrap();
        std::os::unix::fs::symlink(&outside, t.join("x/y/link2")).unwrap();
        let root = rustix::fs::open(d.path(), DIR_FLAGS, Mode::empty()).unwrap();
        remove_tree_at(root.as_fd(), OsStr::new("t"), &t).unwrap();
        assert!(!t.exists());
        assert_eq!(
            std::fs::read_to_string(outside.join("keep/f")).unwrap(),
            "x"
        );
    }

    #[test]
    fn write_atomic_sets_mode_on_the_fd_and_parents_get_policy_modes() {
        let d = tempfile::tempdir().unwrap();
        let app = AppRoot::open(d.path()).unwrap();
        let policy = Policy::with_ids(&crate::perms::PermsConfig::default(), None, None).unwrap();
        let rel = app
            .create_release("r1", policy.placement(Path::new(""), Kind::Dir, 0o755))
            .unwrap();
        let pl = Placement {
            mode: 0o640,
            uid: None,
            gid: None,
        };
        rel.write_atomic(Path::new("app/etc/env.php"), b"<?php", pl, &policy, |_| {
            Ok::<(), ()>(())
        })
        .unwrap()
        .unwrap();
        let m = |p: &str| {
            std::fs::metadata(d.path().join("releases/r1").join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(m("app/etc/env.php"), 0o640);
        assert_eq!(m("app"), 0o750);
        assert_eq!(m("app/etc"), 0o750);
        assert_eq!(m(""), 0o750);
        // A failed check leaves no temp file and no target.
        let r = rel
            .write_atomic(Path::new("app/etc/config.php"), b"x", pl, &policy, |p| {
                assert!(std::fs::read(p).unwrap() == b"x");
                Err("no")
            })
            .unwrap();
        assert_eq!(r, Err("no"));
        assert_eq!(
            std::fs::read_dir(d.path().join("releases/r1/app/etc"))
                .unwrap()
                .count(),
            1
        );
    }
}
