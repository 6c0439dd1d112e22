//! The declarative ownership and mode policy for release files.
//!
//! Operators state owner, group, directory and file modes, and the writable paths (var/,
//! generated/, pub/static, pub/media) with their own modes. [`Policy::placement`] answers, for
//! one relative path, the exact mode and owner it gets: a pure function, so the whole
//! permission plan can be printed and tested before anything is written. The release engine
//! applies it in the same pass that creates each file (no `chmod -R` afterwards).

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsutil::parse_mode;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct PermsConfig {
    /// User that owns release files. Unset: files belong to the user bgagent runs as.
    pub owner: Option<String>,
    /// Group of release files, usually the PHP-FPM pool's group. Unset: unchanged.
    pub group: Option<String>,
    pub dir_mode: String,
    pub file_mode: String,
    /// Mode of files that are executable in the artifact, and of `executable` paths.
    pub exec_file_mode: String,
    /// Keep the executable bit of files that have it in the artifact.
    pub preserve_exec: bool,
    /// Paths (relative to the release) that must be executable whatever the artifact says.
    pub executable: Vec<PathBuf>,
    /// Paths the application writes to, with their own modes (longest match wins).
    pub writable: Vec<WritablePath>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct WritablePath {
    pub path: PathBuf,
    #[serde(default = "default_writable_dir_mode")]
    pub dir_mode: String,
    #[serde(default = "default_writable_file_mode")]
    pub file_mode: String,
}

fn default_writable_dir_mode() -> String {
    "2770".into()
}
fn default_writable_file_mode() -> String {
    "0660".into()
}

impl Default for PermsConfig {
    fn default() -> Self {
        let w = |p: &str| WritablePath {
            path: PathBuf::from(p),
            dir_mode: default_writable_dir_mode(),
            file_mode: default_writable_file_mode(),
        };
        PermsConfig {
            owner: None,
            group: None,
            dir_mode: "0750".into(),
            file_mode: "0640".into(),
            exec_file_mode: "0750".into(),
            preserve_exec: true,
            executable: vec![PathBuf::from("bin/magento")],
            writable: vec![w("var"), w("generated"), w("pub/static"), w("pub/media")],
        }
    }
}

impl PermsConfig {
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (key, m, dir) in [
            ("permissions.dir_mode", &self.dir_mode, true),
            ("permissions.file_mode", &self.file_mode, false),
            ("permissions.exec_file_mode", &self.exec_file_mode, false),
        ] {
            if let Err(e) = parse_mode(m).and_then(|m| check_special_bits(m, dir)) {
                out.push((key.to_string(), e));
            }
        }
        for (i, w) in self.writable.iter().enumerate() {
            if let Err(e) = check_relative(&w.path) {
                out.push((format!("permissions.writable.{i}.path"), e));
            }
            for (k, m, dir) in [
                ("dir_mode", &w.dir_mode, true),
                ("file_mode", &w.file_mode, false),
            ] {
                if let Err(e) = parse_mode(m).and_then(|m| check_special_bits(m, dir)) {
                    out.push((format!("permissions.writable.{i}.{k}"), e));
                }
            }
        }
        for (i, p) in self.executable.iter().enumerate() {
            if let Err(e) = check_relative(p) {
                out.push((format!("permissions.executable.{i}"), e));
            }
        }
        out
    }
}

/// The setgid bit only on directories (files created inside inherit the group), the setuid
/// bit never. The shipped unit cannot say this (systemd's RestrictSUIDSGID= forbids both
/// bits everywhere, setgid directories included), so bgagent holds itself to it.
pub fn check_special_bits(mode: u32, dir: bool) -> Result<(), String> {
    if mode & 0o4000 != 0 {
        return Err(format!(
            "{mode:04o} has the setuid bit: bgagent never makes release files or directories setuid"
        ));
    }
    if !dir && mode & 0o2000 != 0 {
        return Err(format!(
            "{mode:04o} has the setgid bit: it belongs on directories (dir_mode), not on files"
        ));
    }
    Ok(())
}

/// A path inside the release: relative, no `..`.
pub fn check_relative(p: &Path) -> Result<(), String> {
    if p.as_os_str().is_empty() {
        return Err("path is empty".into());
    }
    for c in p.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            _ => {
                return Err(format!(
                    "`{}` must be relative to the release and must not contain `..`",
                    p.display()
                ));
            }
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
}

/// Mode and ownership for one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub mode: u32,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// The resolved policy: modes parsed, names turned into ids.
#[derive(Debug, Clone)]
pub struct Policy {
    uid: Option<u32>,
    gid: Option<u32>,
    dir_mode: u32,
    file_mode: u32,
    exec_file_mode: u32,
    preserve_exec: bool,
    executable: Vec<PathBuf>,
    /// Sorted longest first so the first match is the most specific.
    writable: Vec<(PathBuf, u32, u32)>,
}

#[derive(Debug, thiserror::Error)]
pub enum PermsError {
    #[error("permissions.{key}: {message}")]
    Invalid { key: &'static str, message: String },
    #[error("permissions.owner: no user named `{0}` on this host (check /etc/passwd)")]
    NoSuchUser(String),
    #[error("permissions.group: no group named `{0}` on this host (check /etc/group)")]
    NoSuchGroup(String),
}

impl Policy {
    /// Resolves the config against this host (user and group names to ids).
    pub fn resolve(cfg: &PermsConfig) -> Result<Policy, PermsError> {
        let uid = match &cfg.owner {
            Some(name) => Some(
                lookup_user(name)
                    .ok_or_else(|| PermsError::NoSuchUser(name.clone()))?
                    .0,
            ),
            None => None,
        };
        let gid = match &cfg.group {
            Some(name) => {
                Some(lookup_group(name).ok_or_else(|| PermsError::NoSuchGroup(name.clone()))?)
            }
            None => None,
        };
        Self::with_ids(cfg, uid, gid)
    }

    /// Like [`Policy::resolve`] with ids given: pure.
    pub fn with_ids(
        cfg: &PermsConfig,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Result<Policy, PermsError> {
        let m = |key: &'static str, s: &str| {
            parse_mode(s).map_err(|message| PermsError::Invalid { key, message })
        };
        let mut writable = Vec::new();
        for w in &cfg.writable {
            writable.push((
                normalize(&w.path),
                m("writable.dir_mode", &w.dir_mode)?,
                m("writable.file_mode", &w.file_mode)?,
            ));
        }
        writable.sort_by_key(|(p, _, _)| std::cmp::Reverse(p.components().count()));
        Ok(Policy {
            uid,
            gid,
            dir_mode: m("dir_mode", &cfg.dir_mode)?,
            file_mode: m("file_mode", &cfg.file_mode)?,
            exec_file_mode: m("exec_file_mode", &cfg.exec_file_mode)?,
            preserve_exec: cfg.preserve_exec,
            executable: cfg.executable.iter().map(|p| normalize(p)).collect(),
            writable,
        })
    }

    pub fn uid(&self) -> Option<u32> {
        self.uid
    }

    pub fn gid(&self) -> Option<u32> {
        self.gid
    }

    /// The mode and owner of `rel` (relative to the release root). `src_mode` is the mode the
    /// artifact gave it, consulted only for the executable bit.
    pub fn placement(&self, rel: &Path, kind: Kind, src_mode: u32) -> Placement {
        let writable = self.writable.iter().find(|(p, _, _)| rel.starts_with(p));
        let mode = match kind {
            Kind::Symlink => 0o777,
            Kind::Dir => writable.map(|w| w.1).unwrap_or(self.dir_mode),
            Kind::File => {
                let exec = self.executable.iter().any(|p| p == rel)
                    || (self.preserve_exec && src_mode & 0o111 != 0);
                match (writable, exec) {
                    (_, true) => self.exec_file_mode,
                    (Some(w), false) => w.2,
                    (None, false) => self.file_mode,
                }
            }
        };
        Placement {
            mode,
            uid: self.uid,
            gid: self.gid,
        }
    }
}

fn normalize(p: &Path) -> PathBuf {
    p.components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect()
}

/// Looks up a user by name, or by numeric uid: (uid, primary gid). The primary group comes
/// from the passwd entry; a numeric uid without one has no known group (None), which callers
/// that need a group must ask for instead of guessing. NSS (files, LDAP, sssd) answers through
/// nix, which also retries with a larger buffer for large entries.
pub fn lookup_user(name: &str) -> Option<(u32, Option<u32>)> {
    use nix::unistd::{Uid, User};
    if let Ok(id) = name.parse::<u32>() {
        let gid = User::from_uid(Uid::from_raw(id))
            .ok()
            .flatten()
            .map(|u| u.gid.as_raw());
        return Some((id, gid));
    }
    User::from_name(name)
        .ok()
        .flatten()
        .map(|u| (u.uid.as_raw(), Some(u.gid.as_raw())))
}

/// Looks up a group by name (or numeric gid).
pub fn lookup_group(name: &str) -> Option<u32> {
    if let Ok(id) = name.parse::<u32>() {
        return Some(id);
    }
    nix::unistd::Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

/// The name of group `gid`, or the number when it has none.
pub fn group_name(gid: u32) -> String {
    nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
        .ok()
        .flatten()
        .map(|g| g.name)
        .unwrap_or_else(|| gid.to_string())
}

/// The supplementary groups of `user` (by name) with `primary` among them.
pub fn group_list(user: &str, primary: u32) -> Vec<u32> {
    let Ok(name) = std::ffi::CString::new(user) else {
        return vec![primary];
    };
    let mut groups: Vec<u32> =
        nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(primary))
            .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
            .unwrap_or_default();
    if !groups.contains(&primary) {
        groups.push(primary);
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy::with_ids(&PermsConfig::default(), Some(33), Some(33)).unwrap()
    }

    #[test]
    fn setuid_modes_and_setgid_files_are_refused_setgid_dirs_allowed() {
        // The unit has no RestrictSUIDSGID= (it would refuse the 2770 writable dirs), so
        // config validation is what keeps setuid files out of releases.
        assert!(PermsConfig::default().validate().is_empty());
        let mut c = PermsConfig {
            file_mode: "4750".into(),
            exec_file_mode: "2750".into(),
            dir_mode: "4750".into(),
            ..PermsConfig::default()
        };
        c.writable[0].file_mode = "2660".into();
        let keys: Vec<String> = c.validate().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "permissions.dir_mode",
                "permissions.file_mode",
                "permissions.exec_file_mode",
                "permissions.writable.0.file_mode"
            ]
        );
    }

    #[test]
    fn code_is_read_only_and_writable_paths_get_their_modes() {
        let p = policy();
        assert_eq!(
            p.placement(Path::new("vendor/a/b.php"), Kind::File, 0o644)
                .mode,
            0o640
        );
        assert_eq!(
            p.placement(Path::new("vendor/a"), Kind::Dir, 0o755).mode,
            0o750
        );
        assert_eq!(p.placement(Path::new("var"), Kind::Dir, 0o755).mode, 0o2770);
        assert_eq!(
            p.placement(Path::new("var/cache/x"), Kind::File, 0o644)
                .mode,
            0o660
        );
        assert_eq!(
            p.placement(Path::new("pub/static/a.css"), Kind::File, 0o644)
                .mode,
            0o660
        );
        // pub itself is code, not writable
        assert_eq!(
            p.placement(Path::new("pub/index.php"), Kind::File, 0o644)
                .mode,
            0o640
        );
        // a sibling whose name merely starts with a writable path is not writable
        assert_eq!(
            p.placement(Path::new("variables.php"), Kind::File, 0o644)
                .mode,
            0o640
        );
    }

    #[test]
    fn executables_keep_their_bit() {
        let p = policy();
        assert_eq!(
            p.placement(Path::new("bin/magento"), Kind::File, 0o644)
                .mode,
            0o750
        );
        assert_eq!(
            p.placement(Path::new("vendor/bin/phinx"), Kind::File, 0o755)
                .mode,
            0o750
        );
        assert_eq!(
            p.placement(Path::new("var/x.sh"), Kind::File, 0o755).mode,
            0o750
        );
    }

    #[test]
    fn longest_writable_match_wins() {
        let mut cfg = PermsConfig::default();
        cfg.writable.push(WritablePath {
            path: "var/log".into(),
            dir_mode: "0700".into(),
            file_mode: "0600".into(),
        });
        let p = Policy::with_ids(&cfg, None, None).unwrap();
        assert_eq!(
            p.placement(Path::new("var/log/a.log"), Kind::File, 0).mode,
            0o600
        );
        assert_eq!(
            p.placement(Path::new("var/cache/a"), Kind::File, 0).mode,
            0o660
        );
    }

    #[test]
    fn validation_names_the_key() {
        let mut cfg = PermsConfig::default();
        cfg.writable[1].path = "../etc".into();
        cfg.file_mode = "0xyz".into();
        let v = cfg.validate();
        assert!(v.iter().any(|(k, _)| k == "permissions.writable.1.path"));
        assert!(v.iter().any(|(k, _)| k == "permissions.file_mode"));
    }

    #[test]
    fn lookup_root() {
        assert_eq!(lookup_user("root"), Some((0, Some(0))));
        assert_eq!(lookup_user("0"), Some((0, Some(0))));
        assert_eq!(lookup_group("root"), Some(0));
        assert_eq!(lookup_user("no-such-user-bgagent"), None);
        assert_eq!(group_list("root", 0), vec![0]);
    }

    /// Regression: a numeric owner without a passwd entry was given gid = uid, a group
    /// nobody chose.
    #[test]
    fn a_numeric_uid_without_an_entry_has_no_guessed_group() {
        assert_eq!(lookup_user("4000000123"), Some((4000000123, None)));
    }
}
