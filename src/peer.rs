//! Acting for a client of the control socket without lending it root's eyes.
//!
//! `bgagent deploy PATH` sent by a socket-group member used to make the root daemon read
//! PATH: a tree the member itself cannot read (a confused deputy). Now the client opens the
//! artifact as itself and passes the open file over the socket (SCM_RIGHTS), so nothing on
//! the way to it is resolved by root; for a directory the daemon then walks the tree from
//! that descriptor and refuses it unless the caller could read every directory and file in
//! it (by owner, group and mode bits; POSIX ACLs are not consulted, so an ACL that grants
//! more is refused and one that takes away is not seen). Symlinks are never followed by
//! intake, so they are not checked.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};

/// Who is asking: uid and every group (primary and supplementary).
#[derive(Debug, Clone)]
pub struct Peer {
    pub uid: u32,
    pub gids: Vec<u32>,
}

impl Peer {
    /// The peer of a socket: its uid and gid, and its supplementary groups read from
    /// /proc/<pid>/status.
    pub fn of(uid: u32, gid: u32, pid: Option<i32>) -> Peer {
        let mut gids = vec![gid];
        if let Some(s) = pid.and_then(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
            && let Some(l) = s.lines().find(|l| l.starts_with("Groups:"))
        {
            gids.extend(
                l.split_whitespace()
                    .skip(1)
                    .filter_map(|g| g.parse::<u32>().ok()),
            );
        }
        Peer { uid, gids }
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// Whether the peer has all of `want` (4 read, 2 write, 1 search/exec) on `st`.
    fn can(&self, st: &Stat, want: u32) -> bool {
        if self.is_root() {
            return true;
        }
        let mode = st.st_mode;
        let bits = if st.st_uid == self.uid {
            (mode >> 6) & 7
        } else if self.gids.contains(&st.st_gid) {
            (mode >> 3) & 7
        } else {
            mode & 7
        };
        bits & want == want
    }
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// What a passed artifact is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passed {
    Dir,
    File,
}

/// Checks an artifact the peer opened and passed: a regular file (readable by
/// construction: the peer opened it), or a directory whose whole tree the peer could read.
/// The error names the first entry it could not, relative to `shown`.
pub fn check_passed(fd: &OwnedFd, peer: &Peer, shown: &Path) -> Result<Passed, String> {
    let st =
        rustix::fs::fstat(fd).map_err(|e| format!("cannot inspect the passed artifact: {e}"))?;
    match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => Ok(Passed::File),
        FileType::Directory => {
            if !peer.is_root() {
                if !peer.can(&st, 5) {
                    return Err(denied(peer, shown, Path::new("")));
                }
                walk(fd.as_fd(), peer, shown, &mut PathBuf::new(), 0)?;
            }
            Ok(Passed::Dir)
        }
        _ => Err(format!(
            "the artifact {} is not a directory or a regular file; give a directory or a .tar, .tar.gz or .zip file",
            crate::text::path(shown)
        )),
    }
}

fn denied(peer: &Peer, shown: &Path, rel: &Path) -> String {
    format!(
        "uid {} cannot read {}: bgagent deploys only what its caller could read (fix the permissions, or deploy as root)",
        peer.uid,
        crate::text::path(&shown.join(rel))
    )
}

fn walk(
    dir: BorrowedFd<'_>,
    peer: &Peer,
    shown: &Path,
    rel: &mut PathBuf,
    depth: usize,
) -> Result<(), String> {
    if depth > 256 {
        return Err(format!(
            "{} is nested more than 256 directories deep",
            crate::text::path(&shown.join(&*rel))
        ));
    }
    let io = |e: rustix::io::Errno, rel: &Path| {
        format!("cannot read {}: {e}", crate::text::path(&shown.join(rel)))
    };
    let mut rd = rustix::fs::Dir::read_from(dir).map_err(|e| io(e, rel))?;
    while let Some(e) = rd.read() {
        let e = e.map_err(|e| io(e, rel))?;
        let name = e.file_name();
        if matches!(name.to_bytes(), b"." | b"..") {
            continue;
        }
        rel.push(OsStr::from_bytes(name.to_bytes()));
        let st =
            rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| io(e, rel))?;
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => {
                if !peer.can(&st, 5) {
                    return Err(denied(peer, shown, rel));
                }
                let sub = rustix::fs::openat(dir, name, DIR_FLAGS, Mode::empty())
                    .map_err(|e| io(e, rel))?;
                walk(sub.as_fd(), peer, shown, rel, depth + 1)?;
            }
            FileType::RegularFile if !peer.can(&st, 4) => {
                return Err(denied(peer, shown, rel));
            }
            _ => {}
        }
        rel.pop();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn mode_bits_decide_by_owner_then_group_then_other() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, "x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        let st = rustix::fs::stat(&f).unwrap();
        let owner = Peer {
            uid: st.st_uid,
            gids: vec![],
        };
        let group = Peer {
            uid: 4242,
            gids: vec![st.st_gid],
        };
        let other = Peer {
            uid: 4242,
            gids: vec![4242],
        };
        assert!(owner.can(&st, 4) && owner.can(&st, 2));
        assert!(group.can(&st, 4) && !group.can(&st, 2));
        assert!(!other.can(&st, 4));
    }
}
