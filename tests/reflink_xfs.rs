//! Intake by reflink, on a real XFS filesystem (reflink=1) made in a file and loop-mounted
//! for the test. The machine's own disk is ext4, which cannot reflink, so without this the
//! reflink path (and its fallback order) would go untested. Needs root and mkfs.xfs
//! (xfsprogs, installed by scripts/install-test-deps.sh); says why and passes vacuously only
//! when not root.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use bgagent::perms::{PermsConfig, Policy};
use bgagent::release::{IntakeMode, intake_dir};

struct XfsMount {
    dir: tempfile::TempDir,
}

impl XfsMount {
    fn new() -> XfsMount {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("xfs.img");
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(512 << 20).unwrap();
        drop(f);
        run(Command::new("mkfs.xfs")
            .args(["-q", "-m", "reflink=1"])
            .arg(&img));
        std::fs::create_dir(dir.path().join("mnt")).unwrap();
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(dir.path().join("mnt")));
        XfsMount { dir }
    }
    fn root(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Drop for XfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.root()).status();
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether `filefrag -v` reports the file's extents as shared (a reflink's mark).
fn extents_shared(p: &Path) -> bool {
    let out = Command::new("filefrag").arg("-v").arg(p).output().unwrap();
    String::from_utf8_lossy(&out.stdout).contains("shared")
}

#[test]
fn intake_reflinks_on_xfs_and_the_release_is_independent_of_its_source() {
    if rustix::process::geteuid().as_raw() != 0 {
        eprintln!("reflink test skipped: mounting an XFS image needs root");
        return;
    }
    let m = XfsMount::new();
    let src = m.root().join("deployment-archive");
    for i in 0..50 {
        let d = src.join(format!("vendor/p{i}/src"));
        std::fs::create_dir_all(&d).unwrap();
        // Big enough to have a data extent of its own (not inline).
        std::fs::write(d.join("F.php"), format!("<?php // {i}\n").repeat(2000)).unwrap();
    }
    std::fs::create_dir_all(src.join("bin")).unwrap();
    std::fs::write(src.join("bin/magento"), "#!/usr/bin/env php\n".repeat(500)).unwrap();
    std::fs::set_permissions(src.join("bin/magento"), PermissionsExt::from_mode(0o755)).unwrap();
    let policy = Policy::with_ids(&PermsConfig::default(), None, None).unwrap();

    for mode in [
        IntakeMode::Auto,
        IntakeMode::AutoNoLink,
        IntakeMode::Reflink,
    ] {
        let dest = m.root().join(format!("release-{mode:?}"));
        let r = intake_dir(&src, &dest, mode, &policy).unwrap();
        assert_eq!(r.files, 51, "{mode:?}");
        assert_eq!(
            (r.reflinked, r.hardlinked, r.copied),
            (51, 0, 0),
            "{mode:?}: every file reflinked"
        );
        let a = src.join("vendor/p7/src/F.php");
        let b = dest.join("vendor/p7/src/F.php");
        assert_ne!(
            std::fs::metadata(&a).unwrap().ino(),
            std::fs::metadata(&b).unwrap().ino(),
            "{mode:?}: a reflink is a file of its own"
        );
        assert!(
            extents_shared(&b),
            "{mode:?}: the data is shared with the source"
        );
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        // The policy applies to the release without touching the source's modes.
        let mode_of = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode_of(&b), 0o640, "{mode:?}");
        assert_eq!(mode_of(&dest.join("bin/magento")), 0o750, "{mode:?}");
        assert_eq!(mode_of(&a), 0o644, "{mode:?}: source untouched");
        // Writing to the release leaves the source as it was.
        std::fs::write(&b, "<?php // changed").unwrap();
        assert!(
            std::fs::read_to_string(&a)
                .unwrap()
                .starts_with("<?php // 7")
        );
    }
}
