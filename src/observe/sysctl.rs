//! Settings below /proc/sys/net, read and written as files: the only interface the kernel has
//! for `all`, `default` and IPv6 settings (netlink's IFLA_INET_CONF sets IPv4 settings of one
//! device only, and without the side effects a write here has: the netconf notification,
//! `forwarding` on every device when `all` is written).
//!
//! The files of net.* show the network namespace of the thread that opens them, so a read or
//! write from the agent's loop (which entered its namespace) reaches that namespace. In a
//! container /proc/sys is read-only; the directory is configurable so that a writable mount of
//! the host's /proc/sys/net can be used instead (the DaemonSet mounts it at
//! /host/proc/sys/net).

use crate::model::sysctl::SysctlKey;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Where net.* settings are, unless told otherwise.
pub const DEFAULT_DIR: &str = "/proc/sys/net";

static DIR: OnceLock<PathBuf> = OnceLock::new();

/// Sets the directory of net.* settings for the whole process (`--sysctl-dir`); the first
/// call wins.
pub fn set_dir(dir: PathBuf) {
    let _ = DIR.set(dir);
}

/// The directory of net.* settings ([`DEFAULT_DIR`] unless [`set_dir`] said otherwise).
pub fn dir() -> &'static Path {
    DIR.get_or_init(|| PathBuf::from(DEFAULT_DIR))
}

/// Settings as files below a directory: the real /proc/sys/net, or a test's directory.
#[derive(Clone, Debug)]
pub struct SysctlFs {
    root: PathBuf,
}

impl Default for SysctlFs {
    fn default() -> SysctlFs {
        SysctlFs::new(dir())
    }
}

impl SysctlFs {
    pub fn new(root: impl Into<PathBuf>) -> SysctlFs {
        SysctlFs { root: root.into() }
    }

    pub fn path(&self, key: &SysctlKey) -> PathBuf {
        self.root.join(key.path())
    }

    /// The value of a setting (a decimal integer, as the kernel prints it).
    pub fn read(&self, key: &SysctlKey) -> io::Result<u32> {
        let text = std::fs::read_to_string(self.path(key))?;
        text.trim()
            .parse::<i64>()
            .map(|v| v.clamp(0, i64::from(u32::MAX)) as u32)
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("`{}` is not a number", text.trim()),
                )
            })
    }

    /// Writes a setting: one `write` of the decimal value, as sysctl(8) does.
    pub fn write(&self, key: &SysctlKey, value: u32) -> io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(self.path(key))?;
        f.write_all(format!("{value}\n").as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::sysctl::{Scope, Setting};
    use crate::model::Family;

    #[test]
    fn settings_are_files_below_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let key = SysctlKey {
            scope: Scope::Device("flannel.1".into()),
            setting: Setting::find(Family::Ipv4, "rp_filter").unwrap(),
        };
        let fs = SysctlFs::new(dir.path());
        assert_eq!(fs.read(&key).unwrap_err().kind(), io::ErrorKind::NotFound);
        std::fs::create_dir_all(dir.path().join("ipv4/conf/flannel.1")).unwrap();
        std::fs::write(fs.path(&key), "2\n").unwrap();
        assert_eq!(fs.read(&key).unwrap(), 2);
        fs.write(&key, 0).unwrap();
        assert_eq!(std::fs::read_to_string(fs.path(&key)).unwrap(), "0\n");
        std::fs::write(fs.path(&key), "x\n").unwrap();
        assert_eq!(
            fs.read(&key).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }
}
