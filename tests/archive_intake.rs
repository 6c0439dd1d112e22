//! Each archive rejection rule, with a hostile archive made in the test; and the same
//! through the real binary, where the live release must keep serving.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use bgagent::archive::{self, ArchiveError, Limits};
use bgagent::perms::{Kind, PermsConfig, Placement, Policy};

/// (name, type, mode, data, link target)
type Entry<'a> = (&'a str, tar::EntryType, u32, &'a [u8], Option<&'a str>);

const LIMITS: Limits = Limits {
    max_bytes: 1 << 20,
    max_entries: 100,
};

/// Raw tar entry: name written straight into the header, so the builder's own checks do not
/// stop a hostile name.
fn raw_entry(
    b: &mut tar::Builder<Vec<u8>>,
    name: &str,
    kind: tar::EntryType,
    mode: u32,
    data: &[u8],
    link: Option<&str>,
) {
    let mut h = tar::Header::new_old();
    {
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(l) = link {
            old.linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
    }
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(data.len() as u64);
    h.set_cksum();
    b.append(&h, data).unwrap();
}

fn tar_of(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (n, k, m, d, l) in entries {
        raw_entry(&mut b, n, *k, *m, d, *l);
    }
    b.into_inner().unwrap()
}

fn gz(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

struct Case {
    dir: tempfile::TempDir,
}

impl Case {
    fn new() -> Case {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("dest")).unwrap();
        std::fs::create_dir(dir.path().join("outside")).unwrap();
        Case { dir }
    }
    fn dest(&self) -> PathBuf {
        self.dir.path().join("dest")
    }
    fn extract(&self, name: &str, bytes: &[u8]) -> Result<archive::Report, ArchiveError> {
        self.extract_with(name, bytes, &PermsConfig::default(), &LIMITS)
    }
    fn extract_with(
        &self,
        name: &str,
        bytes: &[u8],
        perms: &PermsConfig,
        limits: &Limits,
    ) -> Result<archive::Report, ArchiveError> {
        let p = self.dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let policy = Policy::with_ids(perms, None, None).unwrap();
        archive::extract(&p, &self.dest(), limits, &|rel: &Path,
                                                     k: Kind,
                                                     m: u32|
         -> Placement {
            policy.placement(rel, k, m)
        })
    }
    /// After a rejection: nothing outside, and the destination left empty.
    fn assert_clean(&self) {
        assert_eq!(
            std::fs::read_dir(self.dir.path().join("outside"))
                .unwrap()
                .count(),
            0
        );
        assert_eq!(
            std::fs::read_dir(self.dest()).unwrap().count(),
            0,
            "dest not emptied"
        );
        for e in std::fs::read_dir(self.dir.path()).unwrap() {
            let n = e.unwrap().file_name().into_string().unwrap();
            assert!(
                ["dest", "outside"].contains(&n.as_str())
                    || n.ends_with(".tar")
                    || n.ends_with(".gz")
                    || n.ends_with(".zip"),
                "stray {n}"
            );
        }
    }
}

fn rejects(entries: &[Entry<'_>], entry: &str, why: &str) {
    for compress in [false, true] {
        let c = Case::new();
        let t = tar_of(entries);
        let (name, bytes) = if compress {
            ("a.tar.gz", gz(&t))
        } else {
            ("a.tar", t)
        };
        let e = c.extract(name, &bytes).unwrap_err().to_string();
        assert!(e.contains(&format!("`{entry}`")), "entry not named: {e}");
        assert!(e.contains(why), "reason `{why}` missing: {e}");
        c.assert_clean();
    }
}

use tar::EntryType as T;

#[test]
fn absolute_path() {
    rejects(
        &[
            ("ok.txt", T::Regular, 0o644, b"x", None),
            ("/etc/cron.d/evil", T::Regular, 0o644, b"x", None),
        ],
        "/etc/cron.d/evil",
        "absolute",
    );
}

#[test]
fn dot_dot() {
    rejects(
        &[("a/../../outside/x", T::Regular, 0o644, b"x", None)],
        "a/../../outside/x",
        "..",
    );
}

#[test]
fn hard_link() {
    rejects(
        &[
            ("f", T::Regular, 0o644, b"x", None),
            ("h", T::Link, 0o644, b"", Some("f")),
        ],
        "h",
        "hard link",
    );
}

#[test]
fn device_and_fifo() {
    rejects(&[("dev", T::Char, 0o644, b"", None)], "dev", "device");
    rejects(&[("dev", T::Block, 0o644, b"", None)], "dev", "device");
    rejects(&[("pipe", T::Fifo, 0o644, b"", None)], "pipe", "FIFO");
}

#[test]
fn symlinks_outside() {
    rejects(
        &[("l", T::Symlink, 0o777, b"", Some("/etc"))],
        "l",
        "outside the release",
    );
    rejects(
        &[("a/l", T::Symlink, 0o777, b"", Some("../../outside"))],
        "a/l",
        "outside the release",
    );
}

#[test]
fn exact_modes_in_any_order_and_large_gzip_streams() {
    // Modes the umask would narrow (0775 under 022), a setgid parent (var, 2770) whose child
    // has a plain mode, directories made implicitly and then named by a later entry, and
    // enough data to cross many of the decompression thread's chunks.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let tar_bytes = tar_of(&[
        ("a/b/c/f.php", T::Regular, 0o644, b"<?php", None),
        ("a/big.bin", T::Regular, 0o644, &big, None),
        ("a/b/", T::Directory, 0o755, b"", None),
        ("var/plain/deeper/x", T::Regular, 0o644, b"x", None),
        ("var/cache/", T::Directory, 0o755, b"", None),
        ("z/", T::Directory, 0o755, b"", None),
        ("z/y/", T::Directory, 0o755, b"", None),
        ("a/b/c/g.php", T::Regular, 0o644, b"<?php", None),
    ]);
    let mut perms = PermsConfig {
        dir_mode: "0775".into(),
        ..PermsConfig::default()
    };
    perms.writable.push(bgagent::perms::WritablePath {
        path: "var/plain".into(),
        dir_mode: "0750".into(),
        file_mode: "0640".into(),
    });
    for (name, bytes) in [("m.tar", tar_bytes.clone()), ("m.tar.gz", gz(&tar_bytes))] {
        let c = Case::new();
        let limits = Limits {
            max_bytes: 64 << 20,
            ..LIMITS
        };
        let r = c
            .extract_with(name, &bytes, &perms, &limits)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(r.files, 4, "{name}");
        assert_eq!(r.dirs, 9, "{name}: each directory counted once");
        let m = |p: &str| {
            std::fs::symlink_metadata(c.dest().join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        for d in ["a", "a/b", "a/b/c", "z", "z/y"] {
            assert_eq!(m(d), 0o775, "{name}: {d}");
        }
        assert_eq!(m("var"), 0o2770, "{name}");
        assert_eq!(m("var/cache"), 0o2770, "{name}");
        assert_eq!(
            m("var/plain"),
            0o750,
            "{name}: no setgid inherited from var"
        );
        assert_eq!(m("var/plain/deeper"), 0o750, "{name}");
        assert_eq!(m("var/plain/deeper/x"), 0o640, "{name}");
        assert_eq!(m("a/b/c/g.php"), 0o640, "{name}");
        assert_eq!(
            std::fs::read(c.dest().join("a/big.bin")).unwrap(),
            big,
            "{name}"
        );
    }
    // A .tar.gz cut inside the compressed stream: the decompression thread's error reaches
    // the writer, which names the archive and leaves the destination empty.
    let mut cut = gz(&tar_bytes);
    cut.truncate(cut.len() / 2);
    let c = Case::new();
    let e = c.extract("cut.tar.gz", &cut).unwrap_err().to_string();
    assert!(e.contains("cut.tar.gz"), "{e}");
    c.assert_clean();
}

#[test]
fn truncated_and_multi_member_archives() {
    // a tar cut in the middle of a file's data
    let mut t = tar_of(&[("big.bin", T::Regular, 0o644, &[7u8; 4096], None)]);
    t.truncate(512 + 1000);
    let c = Case::new();
    let e = c.extract("cut.tar", &t).unwrap_err().to_string();
    assert!(e.contains("`big.bin`") && e.contains("truncated"), "{e}");
    c.assert_clean();
    // two gzip members (as `cat a.tar.gz b.tar.gz` or parallel gzip make): read to the end
    let first = tar_of(&[("a.txt", T::Regular, 0o644, b"a", None)]);
    let second = tar_of(&[("b.txt", T::Regular, 0o644, b"b", None)]);
    let mut both = gz(&first[..first.len() - 1024]); // without the end-of-archive blocks
    both.extend(gz(&second));
    let c = Case::new();
    let r = c.extract("two.tar.gz", &both).unwrap();
    assert_eq!(r.files, 2);
    assert!(c.dest().join("b.txt").exists());
}

#[test]
fn symlink_chain_escape() {
    // each link looks inside on its own; together `x` resolves to ../outside
    rejects(
        &[
            ("d/", T::Directory, 0o755, b"", None),
            ("d/l", T::Symlink, 0o777, b"", Some("..")),
            ("x", T::Symlink, 0o777, b"", Some("d/l/../outside")),
        ],
        "x",
        "outside the release",
    );
}

#[test]
fn write_through_symlink() {
    // an inside link that points at a directory is fine as a link, but nothing may be written through it
    rejects(
        &[
            ("d/", T::Directory, 0o755, b"", None),
            ("a", T::Symlink, 0o777, b"", Some("d")),
            ("a/x", T::Regular, 0o644, b"x", None),
        ],
        "a/x",
        "not a directory",
    );
}

#[test]
fn setuid_and_setgid() {
    rejects(
        &[("bin/su", T::Regular, 0o4755, b"x", None)],
        "bin/su",
        "setuid",
    );
    rejects(
        &[("shared/", T::Directory, 0o2755, b"", None)],
        "shared/",
        "setgid",
    );
}

#[test]
fn duplicates() {
    rejects(
        &[
            ("f", T::Regular, 0o644, b"x", None),
            ("f", T::Regular, 0o644, b"y", None),
        ],
        "f",
        "twice",
    );
}

#[test]
fn too_many_entries_and_bytes() {
    let names: Vec<String> = (0..101).map(|i| format!("f{i}")).collect();
    let entries: Vec<_> = names
        .iter()
        .map(|n| (n.as_str(), T::Regular, 0o644, &b"x"[..], None))
        .collect();
    let c = Case::new();
    let e = c
        .extract("many.tar", &tar_of(&entries))
        .unwrap_err()
        .to_string();
    assert!(e.contains("more than 100 entries"), "{e}");
    c.assert_clean();

    let big = vec![7u8; (1 << 20) + 1];
    let c = Case::new();
    let e = c
        .extract(
            "big.tar.gz",
            &gz(&tar_of(&[("big.bin", T::Regular, 0o644, &big, None)])),
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("more than 1048576 bytes") && e.contains("big.bin"),
        "{e}"
    );
    c.assert_clean();
}

#[test]
fn non_empty_destination_and_unknown_format() {
    let c = Case::new();
    std::fs::write(c.dest().join("keep"), "x").unwrap();
    let e = c
        .extract("a.tar", &tar_of(&[("f", T::Regular, 0o644, b"x", None)]))
        .unwrap_err();
    assert!(matches!(e, ArchiveError::DestNotEmpty(_)));
    assert_eq!(std::fs::read_to_string(c.dest().join("keep")).unwrap(), "x");

    let c = Case::new();
    let e = c
        .extract("release.tar.gz", b"this is not an archive at all")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("release.tar.gz is not a .tar, .tar.gz or .zip"),
        "{e}"
    );
}

fn zip_of(f: impl FnOnce(&mut zip::ZipWriter<std::io::Cursor<Vec<u8>>>)) -> Vec<u8> {
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    f(&mut z);
    z.finish().unwrap().into_inner()
}

#[test]
fn zip_slip_and_zip_symlink_outside() {
    use zip::write::SimpleFileOptions;
    let o = SimpleFileOptions::default();
    let c = Case::new();
    let z = zip_of(|z| {
        z.start_file("ok.txt", o).unwrap();
        z.write_all(b"x").unwrap();
        z.start_file("../outside/evil", o).unwrap();
        z.write_all(b"x").unwrap();
    });
    let e = c.extract("a.zip", &z).unwrap_err().to_string();
    assert!(e.contains("`../outside/evil`") && e.contains(".."), "{e}");
    c.assert_clean();

    let c = Case::new();
    let z = zip_of(|z| z.add_symlink("lnk", "/etc/passwd", o).unwrap());
    let e = c.extract("b.zip", &z).unwrap_err().to_string();
    assert!(e.contains("`lnk`") && e.contains("outside"), "{e}");
    c.assert_clean();

    let c = Case::new();
    let mut z = zip_of(|z| {
        z.start_file("bin/x", o.unix_permissions(0o755)).unwrap();
        z.write_all(b"x").unwrap();
    });
    // The zip writer drops setuid bits, so set them in the central directory by hand:
    // external attributes (offset 38 of the central header) hold the unix mode << 16.
    let at = z.windows(4).position(|w| w == b"PK\x01\x02").unwrap() + 38;
    z[at..at + 4].copy_from_slice(&((0o104755u32) << 16).to_le_bytes());
    let e = c.extract("c.zip", &z).unwrap_err().to_string();
    assert!(e.contains("setuid"), "{e}");
    c.assert_clean();
}

#[test]
fn good_archives_extract_with_policy_modes() {
    use zip::write::SimpleFileOptions;
    let tar_bytes = tar_of(&[
        ("./", T::Directory, 0o755, b"", None),
        ("./pub/index.php", T::Regular, 0o666, b"<?php echo 1;", None),
        (
            "./bin/magento",
            T::Regular,
            0o755,
            b"#!/usr/bin/env php",
            None,
        ),
        ("./var/cache/x", T::Regular, 0o644, b"c", None),
        ("./pub/link.php", T::Symlink, 0o777, b"", Some("index.php")),
    ]);
    let zip_bytes = zip_of(|z| {
        let o = SimpleFileOptions::default();
        z.start_file("pub/index.php", o.unix_permissions(0o666))
            .unwrap();
        z.write_all(b"<?php echo 1;").unwrap();
        z.start_file("bin/magento", o.unix_permissions(0o755))
            .unwrap();
        z.write_all(b"#!/usr/bin/env php").unwrap();
        z.start_file("var/cache/x", o).unwrap();
        z.write_all(b"c").unwrap();
        z.add_symlink("pub/link.php", "index.php", o).unwrap();
    });
    for (name, bytes) in [
        ("r.tar", tar_bytes.clone()),
        ("r.tar.gz", gz(&tar_bytes)),
        ("r.zip", zip_bytes),
    ] {
        let c = Case::new();
        let r = c
            .extract(name, &bytes)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((r.files, r.symlinks), (3, 1), "{name}");
        let m = |p: &str| {
            std::fs::symlink_metadata(c.dest().join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(
            m("pub/index.php"),
            0o640,
            "{name}: policy, not the archive's 0666"
        );
        assert_eq!(m("bin/magento"), 0o750, "{name}");
        assert_eq!(m("var/cache/x"), 0o660, "{name}");
        assert_eq!(m("var"), 0o2770, "{name}");
        assert_eq!(m("pub"), 0o750, "{name}");
        assert_eq!(
            std::fs::read_to_string(c.dest().join("pub/link.php")).unwrap(),
            "<?php echo 1;"
        );
    }
}

#[test]
fn hostile_artifact_through_the_binary_leaves_the_live_release_serving() {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("bgagent.yaml");
    std::fs::write(&cfg, "app_root: app\nstate_dir: state\nsocket: { path: run/s.sock, group: null }\napp: { kind: php }\n").unwrap();
    let good = gz(&tar_of(&[(
        "pub/index.php",
        T::Regular,
        0o644,
        b"<?php echo 'v1';",
        None,
    )]));
    let evil = gz(&tar_of(&[
        ("pub/index.php", T::Regular, 0o644, b"x", None),
        ("../../escape", T::Regular, 0o644, b"x", None),
    ]));
    std::fs::write(d.path().join("good.tar.gz"), good).unwrap();
    std::fs::write(d.path().join("evil.tar.gz"), evil).unwrap();
    let bin = env!("CARGO_BIN_EXE_bgagent");
    let run = |a: &str| {
        Command::new(bin)
            .arg("--config")
            .arg(&cfg)
            .args(["deploy", a])
            .output()
            .unwrap()
    };
    let out = run(d.path().join("good.tar.gz").to_str().unwrap());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let live = std::fs::read_link(d.path().join("app/current")).unwrap();
    let out = run(d.path().join("evil.tar.gz").to_str().unwrap());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("entry `../../escape`"), "{text}");
    assert_eq!(
        std::fs::read_link(d.path().join("app/current")).unwrap(),
        live
    );
    assert_eq!(
        std::fs::read_to_string(d.path().join("app/current/pub/index.php")).unwrap(),
        "<?php echo 'v1';"
    );
    assert!(!d.path().join("escape").exists());
    // no half-built release left behind
    assert_eq!(
        std::fs::read_dir(d.path().join("app/releases"))
            .unwrap()
            .count(),
        1
    );
}

/// A zip written byte by byte (stored entries), so it can hold what zip writers refuse:
/// two entries with one name.
fn zip_raw(entries: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in entries {
        let mut crc = flate2::Crc::new();
        crc.update(data);
        let crc = crc.sum();
        let offset = out.len() as u32;
        out.extend_from_slice(b"PK\x03\x04");
        out.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // version, flags, stored, time, date
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(name);
        out.extend_from_slice(data);
        central.extend_from_slice(b"PK\x01\x02");
        central.extend_from_slice(&[20, 3, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // made by unix
        central.extend_from_slice(&crc.to_le_bytes());
        central.extend_from_slice(&(data.len() as u32).to_le_bytes());
        central.extend_from_slice(&(data.len() as u32).to_le_bytes());
        central.extend_from_slice(&(name.len() as u16).to_le_bytes());
        central.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]); // extra, comment, disk, int attr
        central.extend_from_slice(&((0o100644u32) << 16).to_le_bytes());
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(name);
    }
    let cd_offset = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(b"PK\x05\x06\0\0\0\0");
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&cd_offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

#[test]
fn zip_duplicate_entries_where_the_last_silently_won() {
    let z = zip_raw(&[
        (b"pub/index.php", b"<?php echo 'reviewed';"),
        (b"pub/index.php", b"<?php system($_GET['c']);"),
    ]);
    let c = Case::new();
    let e = c.extract("dup.zip", &z).unwrap_err().to_string();
    assert!(e.contains("`pub/index.php`") && e.contains("twice"), "{e}");
    c.assert_clean();
    // the same archive without the repeat extracts (the hand-made zip is valid)
    let c = Case::new();
    c.extract("one.zip", &zip_raw(&[(b"pub/index.php", b"<?php")]))
        .unwrap();
    assert!(c.dest().join("pub/index.php").is_file());
}

/// A tar entry with a name of raw bytes (a GNU long-name entry carries any bytes).
fn tar_raw_name(name: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(T::Regular);
    h.set_mode(0o644);
    h.set_size(1);
    let name = <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(name);
    b.append_data(&mut h, Path::new(name), &b"x"[..]).unwrap();
    b.into_inner().unwrap()
}

#[test]
fn names_with_control_characters_or_invalid_utf8_are_refused_and_shown_escaped() {
    for (name, shown) in [
        (
            &b"pub/a\nINFO forged line.php"[..],
            "pub/a\\nINFO forged line.php",
        ),
        (&b"pub/\x1b[31mred.php"[..], "pub/\\u{1b}[31mred.php"),
        (&b"pub/caf\xe9.php"[..], "pub/caf\\xe9.php"),
    ] {
        let c = Case::new();
        let e = c
            .extract("n.tar", &tar_raw_name(name))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("`{shown}`")), "{e}");
        assert!(
            !e.contains('\n') && !e.contains('\x1b'),
            "printed raw: {e:?}"
        );
        c.assert_clean();
    }
}

#[test]
fn pax_sparse_entries_are_refused_like_gnu_sparse() {
    // What `tar --sparse --format=pax` writes: a PAX header with GNU.sparse.* keys, then a
    // regular entry named GNUSparseFile.<pid>/<name> whose data starts with the sparse map.
    let mut b = tar::Builder::new(Vec::new());
    let mut pax = Vec::new();
    for (k, v) in [
        ("GNU.sparse.major", "1"),
        ("GNU.sparse.minor", "0"),
        ("GNU.sparse.name", "var/big.db"),
        ("GNU.sparse.realsize", "1048576"),
    ] {
        let rec = format!(" {k}={v}\n");
        let mut len = rec.len() + 1;
        if format!("{len}{rec}").len() != len {
            len += 1;
        }
        pax.extend_from_slice(format!("{len}{rec}").as_bytes());
    }
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(T::XHeader);
    h.set_size(pax.len() as u64);
    h.set_mode(0o644);
    b.append_data(&mut h, "PaxHeaders/big.db", &pax[..])
        .unwrap();
    let data = b"1\n0\n512\n";
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(T::Regular);
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    b.append_data(&mut h, "var/GNUSparseFile.0/big.db", &data[..])
        .unwrap();
    let t = b.into_inner().unwrap();
    let c = Case::new();
    let e = c.extract("sparse.tar", &t).unwrap_err().to_string();
    assert!(e.contains("sparse"), "{e}");
    assert!(!c.dest().join("var/GNUSparseFile.0").exists());
    c.assert_clean();
}

#[test]
fn truncated_gzip_is_a_read_error_not_a_write_failure() {
    let t = tar_of(&[("pub/big.js", T::Regular, 0o644, &[b'x'; 200_000][..], None)]);
    // Random-ish data so the compressed stream is long enough to cut in the middle.
    let data: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let t2 = tar_of(&[("pub/big.js", T::Regular, 0o644, &data, None)]);
    for t in [t, t2] {
        let mut z = gz(&t);
        z.truncate(z.len() / 2);
        let c = Case::new();
        let e = c.extract("cut.tar.gz", &z).unwrap_err();
        assert!(matches!(e, ArchiveError::Read { .. }), "{e}");
        assert!(e.to_string().starts_with("failed to read"), "{e}");
        c.assert_clean();
    }
}

#[test]
fn fifo_given_as_the_artifact_is_refused_instead_of_blocking_deploy() {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("bgagent.yaml");
    std::fs::write(&cfg, "app_root: app\nstate_dir: state\nsocket: { path: run/s.sock, group: null }\napp: { kind: php }\n").unwrap();
    let fifo = d.path().join("artifact.tar.gz");
    let st = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(st.success());
    let mut child = Command::new(env!("CARGO_BIN_EXE_bgagent"))
        .arg("--config")
        .arg(&cfg)
        .arg("deploy")
        .arg(&fifo)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A bound on a hang, not a timing assertion: the refusal needs no I/O at all.
    let t0 = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > std::time::Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`bgagent deploy FIFO` blocked (killed after 60 s)");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("is a FIFO"), "{text}");
    assert!(!d.path().join("app/current").exists());
}
