//! TEMPORARY placeholder until the archive helper delivers; replaced before commit.
use crate::perms::{Kind, Placement};
use std::path::Path;
pub struct Limits {
    pub max_bytes: u64,
    pub max_entries: u64,
}
pub struct Report {
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
}
#[derive(Debug, thiserror::Error)]
#[error("archive intake is not built yet")]
pub struct ArchiveError;
pub fn extract(
    _a: &Path,
    _d: &Path,
    _l: &Limits,
    _p: &dyn Fn(&Path, Kind, u32) -> Placement,
) -> Result<Report, ArchiveError> {
    Err(ArchiveError)
}
