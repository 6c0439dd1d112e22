//! Safe extraction of a release artifact (.tar, .tar.gz/.tgz, .zip) into a fresh, empty
//! release directory.
//!
//! An artifact is untrusted input. Rejected, with the offending entry named: absolute paths,
//! `..`, hard links, device files, FIFOs and sockets, symlinks that resolve outside the
//! release, setuid/setgid bits, duplicate files, and archives over the size or entry bounds.
//! Nothing is ever written outside the release directory: every path is created component by
//! component through directory file descriptors opened with `O_NOFOLLOW`, so a symlink entry
//! (`a -> /etc`) can never redirect a later entry (`a/passwd`). Modes and ownership come from
//! the permission policy and are applied as each entry is created. On any error the
//! destination is emptied again.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags};

use crate::perms::{Kind, Placement};

/// Bounds on what an archive may unpack to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bytes: u64,
    pub max_entries: u64,
}

/// What extraction produced.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Tar,
    TarGz,
    Zip,
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("refusing to extract {}: entry `{entry}` {reason}", crate::text::path(.archive))]
    Rejected {
        archive: PathBuf,
        entry: String,
        reason: String,
    },
    #[error("refusing to extract {}: {reason}", crate::text::path(.archive))]
    TooLarge { archive: PathBuf, reason: String },
    #[error(
        "{} is not a .tar, .tar.gz or .zip archive (checked its first bytes); give a directory or one of those",
        crate::text::path(.0)
    )]
    UnknownFormat(PathBuf),
    #[error("the artifact {} is {what}; give a directory or a .tar, .tar.gz or .zip file", crate::text::path(.path))]
    NotAFile { path: PathBuf, what: &'static str },
    #[error("the release directory {} must exist and be empty before extraction", crate::text::path(.0))]
    DestNotEmpty(PathBuf),
    #[error("failed to read {}: {source}", crate::text::path(.archive))]
    Read { archive: PathBuf, source: io::Error },
    #[error("failed to write `{entry}` from {}: {source}", crate::text::path(.archive))]
    Write {
        archive: PathBuf,
        entry: String,
        source: io::Error,
    },
}

/// What an artifact path is, checked without blocking: a FIFO, socket or device given as
/// the artifact would block a plain open or read forever (holding the work lock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArtifactKind {
    Dir,
    File,
}

/// Refuses anything but a directory or a regular file, naming what it is: stat first (no
/// open of a device, whose open may act), then an `O_NONBLOCK` open and `fstat` of what
/// was opened (a FIFO swapped in after the stat is caught there, without blocking).
pub fn artifact_kind(path: &Path) -> Result<ArtifactKind, ArchiveError> {
    open_artifact(path).map(|(_, k)| k)
}

fn open_artifact(path: &Path) -> Result<(File, ArtifactKind), ArchiveError> {
    let read = |source: io::Error| ArchiveError::Read {
        archive: path.to_path_buf(),
        source,
    };
    let kind_of = |mode: u32| -> Result<ArtifactKind, ArchiveError> {
        match rustix::fs::FileType::from_raw_mode(mode) {
            rustix::fs::FileType::Directory => Ok(ArtifactKind::Dir),
            rustix::fs::FileType::RegularFile => Ok(ArtifactKind::File),
            other => Err(ArchiveError::NotAFile {
                path: path.to_path_buf(),
                what: match other {
                    rustix::fs::FileType::Fifo => "a FIFO",
                    rustix::fs::FileType::Socket => "a socket",
                    rustix::fs::FileType::CharacterDevice => "a character device",
                    rustix::fs::FileType::BlockDevice => "a block device",
                    _ => "not a regular file",
                },
            }),
        }
    };
    let st = rustix::fs::stat(path).map_err(|e| read(e.into()))?;
    kind_of(st.st_mode)?;
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| read(e.into()))?;
    let st = rustix::fs::fstat(&fd).map_err(|e| read(e.into()))?;
    let kind = kind_of(st.st_mode)?;
    // A regular file ignores O_NONBLOCK; clear it all the same for the readers below.
    let _ = rustix::fs::fcntl_setfl(&fd, OFlags::empty());
    Ok((File::from(fd), kind))
}

/// Opens an archive: a regular file, or an error naming what it is.
fn open_archive(path: &Path) -> Result<File, ArchiveError> {
    match open_artifact(path)? {
        (f, ArtifactKind::File) => Ok(f),
        (_, ArtifactKind::Dir) => Err(ArchiveError::UnknownFormat(path.to_path_buf())),
    }
}

/// Detects the format from the first bytes, not the name.
pub fn detect(path: &Path) -> Result<Format, ArchiveError> {
    let mut f = open_archive(path)?;
    let mut head = [0u8; 512];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(source) => {
                return Err(ArchiveError::Read {
                    archive: path.to_path_buf(),
                    source,
                });
            }
        }
    }
    let head = &head[..n];
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Format::TarGz)
    } else if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        Ok(Format::Zip)
    } else if (n >= 262 && &head[257..262] == b"ustar") || (n == 512 && tar_checksum_ok(head)) {
        // POSIX/GNU tar carry "ustar"; old v7 tar has only the header checksum to go by.
        Ok(Format::Tar)
    } else {
        Err(ArchiveError::UnknownFormat(path.to_path_buf()))
    }
}

fn tar_checksum_ok(h: &[u8]) -> bool {
    let field = &h[148..156];
    let digits: String = field
        .iter()
        .take_while(|b| **b != 0 && **b != b' ')
        .map(|b| *b as char)
        .skip_while(|c| *c == ' ')
        .collect();
    let Ok(want) = u32::from_str_radix(digits.trim(), 8) else {
        return false;
    };
    let sum: u32 = h
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                32
            } else {
                *b as u32
            }
        })
        .sum();
    sum == want && h[..100].iter().any(|b| *b != 0)
}

/// The kind of an archive entry, before validation.
enum Item {
    Dir,
    File,
    Symlink(PathBuf),
    HardLink,
    Special(&'static str),
}

/// Extracts `archive` into the empty directory `dest`, placing each entry per `placement`.
pub fn extract(
    archive: &Path,
    dest: &Path,
    limits: &Limits,
    placement: &dyn Fn(&Path, Kind, u32) -> Placement,
) -> Result<Report, ArchiveError> {
    let root = rustix::fs::open(
        dest,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|_| ArchiveError::DestNotEmpty(dest.to_path_buf()))?;
    extract_at(archive, root.as_fd(), dest, limits, placement)
}

/// Extracts `archive` into the empty directory open as `dest` (`shown` names it in
/// messages): every entry is created relative to that fd.
pub fn extract_at(
    archive: &Path,
    dest: BorrowedFd<'_>,
    shown: &Path,
    limits: &Limits,
    placement: &dyn Fn(&Path, Kind, u32) -> Placement,
) -> Result<Report, ArchiveError> {
    let empty = rustix::fs::Dir::read_from(dest)
        .map(|mut d| {
            std::iter::from_fn(|| d.read())
                .flatten()
                .all(|e| matches!(e.file_name().to_bytes(), b"." | b".."))
        })
        .unwrap_or(false);
    if !empty {
        return Err(ArchiveError::DestNotEmpty(shown.to_path_buf()));
    }
    let format = detect(archive)?;
    let root = dest
        .try_clone_to_owned()
        .map_err(|source| ArchiveError::Write {
            archive: archive.to_path_buf(),
            entry: ".".into(),
            source,
        })?;
    let mut w = Writer::new(archive, root, limits, placement)?;
    let res = match format {
        Format::Tar => open_archive(archive).and_then(|f| w.tar(f)),
        Format::TarGz => open_archive(archive).and_then(|f| {
            // Decompress on a second thread while this one writes files, as `tar -xzf`
            // does with its gzip child: the two halves take about as long as each other.
            std::thread::scope(|s| {
                let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(8);
                s.spawn(move || {
                    let mut gz = flate2::read::MultiGzDecoder::new(io::BufReader::with_capacity(
                        256 << 10,
                        f,
                    ));
                    loop {
                        let mut chunk = vec![0u8; 1 << 20];
                        let mut filled = 0;
                        let res = loop {
                            match gz.read(&mut chunk[filled..]) {
                                Ok(0) => break Ok(()),
                                Ok(n) => {
                                    filled += n;
                                    if filled == chunk.len() {
                                        break Ok(());
                                    }
                                }
                                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                                Err(e) => break Err(e),
                            }
                        };
                        let done = filled < chunk.len();
                        chunk.truncate(filled);
                        if filled > 0 && tx.send(Ok(chunk)).is_err() {
                            return; // the writer stopped (an entry was refused)
                        }
                        if let Err(e) = res {
                            let _ = tx.send(Err(e));
                            return;
                        }
                        if done {
                            return;
                        }
                    }
                });
                w.tar(ChannelReader {
                    rx,
                    chunk: Vec::new(),
                    pos: 0,
                })
            })
        }),
        Format::Zip => w.zip(),
    };
    let report = w.report;
    drop(w);
    match res {
        Ok(()) => Ok(report),
        Err(e) => {
            let _ = crate::appdir::empty_dir_fd(dest, shown);
            Err(e)
        }
    }
}

/// The archive side of a copy: remembers whether a read failed.
struct ReadSide<'r> {
    inner: &'r mut dyn Read,
    failed: bool,
}

impl Read for ReadSide<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = self.inner.read(buf);
        if r.is_err() {
            self.failed = true;
        }
        r
    }
}

/// Reads the chunks another thread sends, in order; the stream ends when the sender is gone.
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    chunk: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    self.chunk = chunk;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// The entry names in a zip's central directory, in order, duplicates kept (read from the
/// end-of-central-directory record, zip64 included). At most `max` + 1 names are read.
fn zip_central_names(path: &Path, max: u64) -> io::Result<Vec<Vec<u8>>> {
    use std::io::{Seek, SeekFrom};
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut f = open_archive(path).map_err(|e| io::Error::other(e.to_string()))?;
    let len = f.seek(SeekFrom::End(0))?;
    let tail_len = len.min(65_557 + 20);
    f.seek(SeekFrom::Start(len - tail_len))?;
    let mut tail = vec![0u8; tail_len as usize];
    f.read_exact(&mut tail)?;
    let pos = (0..tail.len().saturating_sub(21))
        .rev()
        .find(|&i| tail[i..].starts_with(b"PK\x05\x06"))
        .ok_or_else(|| bad("no end of central directory record"))?;
    let u16at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as u64;
    let u32at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as u64;
    let u64at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let mut count = u16at(&tail, pos + 10);
    let mut cd = u32at(&tail, pos + 16);
    if (count == 0xffff || cd == 0xffff_ffff)
        && pos >= 20
        && tail[pos - 20..].starts_with(b"PK\x06\x07")
    {
        let z64 = u64at(&tail, pos - 20 + 8);
        f.seek(SeekFrom::Start(z64))?;
        let mut rec = [0u8; 56];
        f.read_exact(&mut rec)?;
        if !rec.starts_with(b"PK\x06\x06") {
            return Err(bad("bad zip64 end of central directory record"));
        }
        count = u64at(&rec, 32);
        cd = u64at(&rec, 48);
    }
    f.seek(SeekFrom::Start(cd))?;
    let mut r = io::BufReader::new(f);
    let mut names = Vec::new();
    for _ in 0..count.min(max.saturating_add(1)) {
        let mut h = [0u8; 46];
        r.read_exact(&mut h)?;
        if !h.starts_with(b"PK\x01\x02") {
            return Err(bad("bad central directory entry"));
        }
        let (n, x, c) = (u16at(&h, 28), u16at(&h, 30), u16at(&h, 32));
        let mut name = vec![0u8; n as usize];
        r.read_exact(&mut name)?;
        io::copy(&mut (&mut r).take(x + c), &mut io::sink())?;
        names.push(name);
    }
    Ok(names)
}

/// Validates an entry name: relative, no `..`, no NUL; `./` prefixes dropped.
fn clean_name(raw: &[u8]) -> Result<PathBuf, String> {
    if raw.contains(&0) {
        return Err("contains a NUL byte".into());
    }
    let Ok(text) = std::str::from_utf8(raw) else {
        return Err("is not valid UTF-8 (shown with \\x escapes)".into());
    };
    if text.chars().any(char::is_control) {
        return Err(
            "contains a control character such as a newline (shown escaped); such a name can forge log lines"
                .into(),
        );
    }
    let p = Path::new(OsStr::from_bytes(raw));
    if p.is_absolute() {
        return Err("is an absolute path".into());
    }
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err("escapes the release directory (contains `..`)".into());
            }
            _ => return Err("is an absolute path".into()),
        }
    }
    Ok(out)
}

struct Writer<'a> {
    archive: &'a Path,
    root: OwnedFd,
    limits: &'a Limits,
    placement: &'a dyn Fn(&Path, Kind, u32) -> Placement,
    report: Report,
    entries: u64,
    /// What the archive created, to refuse duplicates and writes through links.
    seen: HashMap<PathBuf, bool>, // path -> is_dir
    /// The directories from the root down to the last entry's parent, open, with the mode
    /// each was given: archives list a directory's entries together, depth first, so the
    /// next entry's parent is usually this one or shares most of its path.
    open_dirs: Vec<(std::ffi::OsString, OwnedFd, u32)>,
    root_mode: u32,
    /// The umask, when it alone decides what open/mkdir make of a mode (no default ACL).
    umask: Option<u32>,
}

impl<'a> Writer<'a> {
    fn new(
        archive: &'a Path,
        root: OwnedFd,
        limits: &'a Limits,
        placement: &'a dyn Fn(&Path, Kind, u32) -> Placement,
    ) -> Result<Writer<'a>, ArchiveError> {
        let root_mode = rustix::fs::fstat(&root)
            .map(|st| st.st_mode & 0o7777)
            .unwrap_or(0o2000); // unknown: treat as setgid, so every mode is set explicitly
        let umask = if crate::release::has_default_acl_fd(root.as_fd()) {
            None
        } else {
            crate::fsutil::current_umask()
        };
        Ok(Writer {
            archive,
            root,
            limits,
            placement,
            report: Report::default(),
            entries: 0,
            seen: HashMap::new(),
            open_dirs: Vec::new(),
            root_mode,
            umask,
        })
    }

    fn reject(&self, entry: &str, reason: impl Into<String>) -> ArchiveError {
        ArchiveError::Rejected {
            archive: self.archive.to_path_buf(),
            entry: entry.to_string(),
            reason: reason.into(),
        }
    }

    fn werr(&self, entry: &Path, source: io::Error) -> ArchiveError {
        ArchiveError::Write {
            archive: self.archive.to_path_buf(),
            entry: entry.display().to_string(),
            source,
        }
    }

    fn tar<R: Read>(&mut self, r: R) -> Result<(), ArchiveError> {
        let mut ar = tar::Archive::new(r);
        let read_err = |source| ArchiveError::Read {
            archive: self.archive.to_path_buf(),
            source,
        };
        let entries = ar.entries().map_err(read_err)?;
        for entry in entries {
            let mut entry = entry.map_err(|source| ArchiveError::Read {
                archive: self.archive.to_path_buf(),
                source,
            })?;
            let raw = entry.path_bytes().into_owned();
            let shown = crate::text::escape_bytes(&raw);
            // PAX-format sparse files (GNU.sparse.* keys) would otherwise come out as a
            // `GNUSparseFile.NNN/...` file holding the sparse map: refused like GNU sparse.
            let pax_sparse = entry
                .pax_extensions()
                .map_err(|source| ArchiveError::Read {
                    archive: self.archive.to_path_buf(),
                    source,
                })?
                .is_some_and(|exts| {
                    exts.flatten()
                        .any(|x| x.key_bytes().starts_with(b"GNU.sparse."))
                });
            if pax_sparse {
                return Err(self.reject(
                    &shown,
                    "is a sparse file (PAX format); bgagent does not extract sparse files: build the artifact without --sparse",
                ));
            }
            let mode = entry.header().mode().unwrap_or(0o644);
            use tar::EntryType as T;
            let item = match entry.header().entry_type() {
                T::Regular | T::Continuous => Item::File,
                T::Directory => Item::Dir,
                T::Symlink => {
                    let target = entry
                        .link_name_bytes()
                        .map(|b| PathBuf::from(OsStr::from_bytes(&b)))
                        .unwrap_or_default();
                    Item::Symlink(target)
                }
                T::Link => Item::HardLink,
                T::Char | T::Block => Item::Special("is a device file"),
                T::Fifo => Item::Special("is a FIFO"),
                T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink => continue,
                _ => {
                    Item::Special("has an entry type bgagent does not extract (sparse or unknown)")
                }
            };
            let declared = entry.header().entry_size().unwrap_or(0);
            let before = self.report.bytes;
            self.entry(&shown, &raw, item, mode, &mut entry)?;
            let got = self.report.bytes - before;
            if got < declared && matches!(entry.header().entry_type(), T::Regular | T::Continuous) {
                return Err(self.reject(
                    &shown,
                    format!("holds {got} of the {declared} bytes its header declares (truncated archive)"),
                ));
            }
        }
        Ok(())
    }

    fn zip(&mut self) -> Result<(), ArchiveError> {
        let f = open_archive(self.archive)?;
        let mut z =
            zip::ZipArchive::new(io::BufReader::new(f)).map_err(|e| ArchiveError::Read {
                archive: self.archive.to_path_buf(),
                source: io::Error::other(e),
            })?;
        // The zip reader keys entries by name: of two entries with one name the last wins,
        // unseen. Read the central directory's names ourselves and refuse a repeat.
        let raw = zip_central_names(self.archive, self.limits.max_entries).map_err(|source| {
            ArchiveError::Read {
                archive: self.archive.to_path_buf(),
                source,
            }
        })?;
        let mut names = std::collections::HashSet::new();
        for n in &raw {
            if !names.insert(n.as_slice()) {
                return Err(self.reject(
                    &crate::text::escape_bytes(n),
                    "appears twice in the archive (a zip reader would silently take the last)",
                ));
            }
        }
        for i in 0..z.len() {
            let mut file = z.by_index(i).map_err(|e| ArchiveError::Read {
                archive: self.archive.to_path_buf(),
                source: io::Error::other(e),
            })?;
            let raw = file.name_raw().to_vec();
            let shown = crate::text::escape_bytes(&raw);
            // zip-slip: enclosed_name() refuses names that leave the directory; our own
            // clean_name() below says why.
            if file.enclosed_name().is_none() {
                let reason = clean_name(&raw)
                    .err()
                    .unwrap_or_else(|| "escapes the release directory".into());
                return Err(self.reject(&shown, reason));
            }
            // unix_mode() clears setuid/setgid; read the raw attributes so they are refused,
            // not silently dropped.
            let unix = match file.unix_mode() {
                Some(m) => m | ((file.external_attributes() >> 16) & 0o6000),
                None => 0,
            };
            let mode = unix & 0o7777;
            let ftype = unix & 0o170000;
            let item = if file.is_dir() {
                Item::Dir
            } else if file.is_symlink() {
                let mut target = Vec::new();
                (&mut file)
                    .take(4096)
                    .read_to_end(&mut target)
                    .map_err(|source| ArchiveError::Read {
                        archive: self.archive.to_path_buf(),
                        source,
                    })?;
                Item::Symlink(PathBuf::from(OsStr::from_bytes(&target)))
            } else if ftype != 0 && ftype != 0o100000 {
                Item::Special("is a device file, FIFO or socket")
            } else {
                Item::File
            };
            let mode = if mode == 0 { 0o644 } else { mode };
            self.entry(&shown, &raw, item, mode, &mut file)?;
        }
        Ok(())
    }

    fn entry(
        &mut self,
        shown: &str,
        raw: &[u8],
        item: Item,
        mode: u32,
        data: &mut dyn Read,
    ) -> Result<(), ArchiveError> {
        let rel = clean_name(raw).map_err(|r| self.reject(shown, r))?;
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(ArchiveError::TooLarge {
                archive: self.archive.to_path_buf(),
                reason: format!(
                    "it has more than {} entries (release.max_entries)",
                    self.limits.max_entries
                ),
            });
        }
        if rel.as_os_str().is_empty() {
            return match item {
                Item::Dir => Ok(()), // "./" itself
                _ => Err(self.reject(shown, "has an empty name")),
            };
        }
        if mode & 0o6000 != 0 {
            return Err(self.reject(shown, "has the setuid or setgid bit"));
        }
        match &item {
            Item::HardLink => {
                return Err(
                    self.reject(shown, "is a hard link (not allowed in a release artifact)")
                );
            }
            Item::Special(why) => return Err(self.reject(shown, *why)),
            _ => {}
        }
        // Never write through something the archive made that is not a directory.
        let mut prefix = PathBuf::new();
        for c in rel.parent().into_iter().flat_map(|p| p.components()) {
            prefix.push(c);
            if self.seen.get(&prefix) == Some(&false) {
                return Err(self.reject(
                    shown,
                    format!(
                        "would be written through `{}`, which is not a directory",
                        prefix.display()
                    ),
                ));
            }
        }
        match self.seen.get(&rel) {
            Some(true) if matches!(item, Item::Dir) => return Ok(()),
            Some(_) => return Err(self.reject(shown, "appears twice in the archive")),
            None => {}
        }
        let name = rel
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        let parent_rel = rel.parent().map(Path::to_path_buf).unwrap_or_default();
        self.ensure_parent(&parent_rel, shown)?;
        let (parent, parent_mode) = match self.open_dirs.last() {
            Some((_, fd, mode)) => (fd, *mode),
            None => (&self.root, self.root_mode),
        };
        match item {
            Item::Dir => {
                let pl = (self.placement)(&rel, Kind::Dir, mode);
                let created = match rustix::fs::mkdirat(
                    parent,
                    name.as_os_str(),
                    Mode::from_raw_mode(pl.mode & 0o777),
                ) {
                    Ok(()) => true,
                    // Made earlier as some entry's parent. A non-directory of that name is
                    // caught by the NOFOLLOW|DIRECTORY open below.
                    Err(rustix::io::Errno::EXIST) => false,
                    Err(e) => return Err(self.werr(&rel, e.into())),
                };
                let fd = self.open_dir_at(parent, &name, &rel)?;
                let exact = created && self.mkdir_is_exact(pl.mode, parent_mode);
                self.set(&fd, &rel, pl, exact)?;
                self.seen.insert(rel, true);
                if created {
                    self.report.dirs += 1;
                }
                // Its entries come next: keep it open as the next parent.
                self.open_dirs.push((name, fd, pl.mode));
            }
            Item::File => {
                let pl = (self.placement)(&rel, Kind::File, mode);
                let fd = rustix::fs::openat(
                    parent,
                    name.as_os_str(),
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(pl.mode & 0o777),
                )
                .map_err(|e| self.werr(&rel, e.into()))?;
                let mut out = File::from(fd);
                let remaining = self.limits.max_bytes.saturating_sub(self.report.bytes);
                // A failure to read the archive (a truncated gzip stream) is a read error of
                // the archive, not a failure to write the entry.
                let mut src = ReadSide {
                    inner: data,
                    failed: false,
                };
                let copied = io::copy(&mut (&mut src).take(remaining.saturating_add(1)), &mut out);
                let n = match copied {
                    Ok(n) => n,
                    Err(source) if src.failed => {
                        return Err(ArchiveError::Read {
                            archive: self.archive.to_path_buf(),
                            source: io::Error::new(
                                source.kind(),
                                format!(
                                    "{source} (while reading entry `{shown}`: the archive is truncated or corrupt)"
                                ),
                            ),
                        });
                    }
                    Err(e) => return Err(self.werr(&rel, e)),
                };
                if n > remaining {
                    return Err(ArchiveError::TooLarge {
                        archive: self.archive.to_path_buf(),
                        reason: format!(
                            "it unpacks to more than {} bytes (release.max_bytes), reached at `{shown}`",
                            self.limits.max_bytes
                        ),
                    });
                }
                // The parent's setgid bit does not reach a file's mode.
                let exact = self.mkdir_is_exact(pl.mode, 0);
                self.set(&out, &rel, pl, exact)?;
                self.seen.insert(rel, false);
                self.report.bytes += n;
                self.report.files += 1;
            }
            Item::Symlink(target) => {
                if !crate::release::link_stays_inside(&rel, &target) {
                    return Err(self.reject(
                        shown,
                        format!(
                            "is a symlink to `{}`, which resolves outside the release",
                            target.display()
                        ),
                    ));
                }
                rustix::fs::symlinkat(&target, parent, name.as_os_str())
                    .map_err(|e| self.werr(&rel, e.into()))?;
                let pl = (self.placement)(&rel, Kind::Symlink, 0o777);
                if pl.uid.is_some() || pl.gid.is_some() {
                    rustix::fs::chownat(
                        parent,
                        name.as_os_str(),
                        pl.uid.map(rustix::fs::Uid::from_raw),
                        pl.gid.map(rustix::fs::Gid::from_raw),
                        AtFlags::SYMLINK_NOFOLLOW,
                    )
                    .map_err(|e| self.werr(&rel, e.into()))?;
                }
                self.seen.insert(rel, false);
                self.report.symlinks += 1;
            }
            Item::HardLink | Item::Special(_) => {}
        }
        Ok(())
    }

    /// Gives an entry created by this writer its owner, then (unless mkdir/open already
    /// gave it exactly) its mode: chown may clear mode bits, so the mode comes last.
    fn set(
        &self,
        fd: impl AsFd,
        rel: &Path,
        pl: Placement,
        exact: bool,
    ) -> Result<(), ArchiveError> {
        let fd = fd.as_fd();
        if pl.uid.is_some() || pl.gid.is_some() {
            rustix::fs::fchown(
                fd,
                pl.uid.map(rustix::fs::Uid::from_raw),
                pl.gid.map(rustix::fs::Gid::from_raw),
            )
            .map_err(|e| self.werr(rel, e.into()))?;
        }
        if !exact {
            rustix::fs::fchmod(fd, Mode::from_raw_mode(pl.mode))
                .map_err(|e| self.werr(rel, e.into()))?;
        }
        Ok(())
    }

    /// Whether mkdirat/openat with `mode & 0o777` produced exactly `mode`: no special bits,
    /// nothing the umask removes, and no setgid parent passing its bit on.
    fn mkdir_is_exact(&self, mode: u32, parent_mode: u32) -> bool {
        self.umask.is_some_and(|u| mode & u == 0) && mode & 0o7000 == 0 && parent_mode & 0o2000 == 0
    }

    /// Opens directory `name` in `parent`; NOFOLLOW|DIRECTORY proves it is a real directory
    /// this writer may change.
    fn open_dir_at(
        &self,
        parent: &OwnedFd,
        name: &OsStr,
        rel: &Path,
    ) -> Result<OwnedFd, ArchiveError> {
        rustix::fs::openat(
            parent,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.werr(rel, e.into()))
    }

    /// Makes the top of `open_dirs` the directory `parent_rel`, keeping the directories the
    /// last parent shares with it, opening (or creating, with the policy's modes) the rest,
    /// and never following a symlink.
    fn ensure_parent(&mut self, parent_rel: &Path, shown: &str) -> Result<(), ArchiveError> {
        let comps: Vec<&OsStr> = parent_rel.components().map(|c| c.as_os_str()).collect();
        let keep = self
            .open_dirs
            .iter()
            .zip(comps.iter())
            .take_while(|((have, _, _), want)| have.as_os_str() == **want)
            .count();
        self.open_dirs.truncate(keep);
        let mut so_far: PathBuf = comps[..keep].iter().collect();
        for &c in &comps[keep..] {
            so_far.push(c);
            let (fd, parent_mode) = match self.open_dirs.last() {
                Some((_, fd, mode)) => (fd, *mode),
                None => (&self.root, self.root_mode),
            };
            let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            let (next, mode) = match rustix::fs::openat(fd, c, flags, Mode::empty()) {
                Ok(n) => {
                    let mode = rustix::fs::fstat(&n)
                        .map(|st| st.st_mode & 0o7777)
                        .map_err(|e| self.werr(&so_far, e.into()))?;
                    (n, mode)
                }
                Err(rustix::io::Errno::NOENT) => {
                    let pl = (self.placement)(&so_far, Kind::Dir, 0o755);
                    rustix::fs::mkdirat(fd, c, Mode::from_raw_mode(pl.mode & 0o777))
                        .map_err(|e| self.werr(&so_far, e.into()))?;
                    let n = self.open_dir_at(fd, c, &so_far)?;
                    let exact = self.mkdir_is_exact(pl.mode, parent_mode);
                    self.set(&n, &so_far, pl, exact)?;
                    self.seen.insert(so_far.clone(), true);
                    self.report.dirs += 1;
                    (n, pl.mode)
                }
                Err(rustix::io::Errno::LOOP) | Err(rustix::io::Errno::NOTDIR) => {
                    return Err(self.reject(
                        shown,
                        format!(
                            "would be written through `{}`, which is not a directory",
                            so_far.display()
                        ),
                    ));
                }
                Err(e) => return Err(self.werr(&so_far, e.into())),
            };
            self.open_dirs.push((c.to_os_string(), next, mode));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_cleaned_or_rejected() {
        assert_eq!(clean_name(b"./a/b").unwrap(), PathBuf::from("a/b"));
        assert_eq!(clean_name(b"./").unwrap(), PathBuf::new());
        assert!(clean_name(b"/etc/passwd").unwrap_err().contains("absolute"));
        assert!(clean_name(b"a/../../x").unwrap_err().contains(".."));
        assert!(clean_name(b"a\0b").is_err());
    }
}
