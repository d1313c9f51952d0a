//! State files (the cluster state file, the adopted-state file): replaced atomically, and set
//! aside rather than overwritten when they cannot be read.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Moves an unusable file out of the way, to `PATH.corrupt-<unix time>` (`-2`, `-3`… if that
/// exists): kept for whoever wants to know what went wrong, instead of being overwritten by the
/// next write. Returns the new path.
pub fn set_aside(path: &Path) -> std::io::Result<PathBuf> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "state".into());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let stamp = format!("{name}.corrupt-{now}");
    let mut aside = path.with_file_name(&stamp);
    let mut n = 1;
    while aside.exists() {
        n += 1;
        aside = path.with_file_name(format!("{stamp}-{n}"));
    }
    std::fs::rename(path, &aside)?;
    Ok(aside)
}

/// Replaces a file atomically: temporary file in the same directory, fsync, rename, fsync of
/// the directory.
pub fn write_atomic(path: &Path, json: &[u8]) -> std::io::Result<()> {
    write_atomic_with(path, |mut f| f.write_all(json))
}

/// [`write_atomic`] with the content written by `fill`.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&std::fs::File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("state");
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let f = std::fs::File::create(&tmp)?;
        fill(&f)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    // The rename itself is durable only once the directory is synced.
    std::fs::File::open(dir).and_then(|d| d.sync_all())
}
