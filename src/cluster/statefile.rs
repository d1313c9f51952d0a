//! The state file: the last config and cluster facts the agent enforced, so that after a restart
//! while the API server is unreachable it enforces what it enforced before instead of nothing.
//! The desired state itself is not stored: it is re-expanded from these two (expansion is pure and
//! deterministic), which keeps the file small and readable and independent of internal types.
//!
//! Written atomically (temporary file in the same directory, fsync, rename, fsync of the
//! directory): a crash leaves the old file or the new one, never half of one. A file that cannot
//! be read or parsed is reported and ignored, never a reason to stop.

use super::facts::ClusterFacts;
use crate::files::write_atomic_with;
pub use crate::files::{set_aside, write_atomic};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Bumped when the format changes incompatibly; other versions are ignored.
pub const VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    pub version: u32,
    /// Where the config came from (`ConfigMap kube-system/netwarden key config.yaml`).
    pub source: String,
    /// The config text as it was in the ConfigMap.
    pub config: String,
    pub facts: ClusterFacts,
    /// Seconds since the epoch, for operators reading the file.
    pub written_at: u64,
    /// The kernel's boot and the network namespace this state was enforced in: an agent
    /// starting in the same ones finds the kernel as its predecessor left it, so what is
    /// missing then was removed while no agent ran (docs/kubernetes.md, "At start").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`), if readable.
pub fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

#[derive(Debug, Error)]
pub enum StateFileError {
    #[error("state file {path}: cannot read it: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path}: corrupt or truncated at line {line}, column {column}: {message}")]
    Corrupt {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("state file {path}: format version {found}, this agent reads version {VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("state file {path}: cannot write it: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Reads the state file; `Ok(None)` when there is none.
pub fn read(path: &Path) -> Result<Option<Saved>, StateFileError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateFileError::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    // The version first, so that a future format is named as such rather than as corrupt.
    #[derive(Deserialize)]
    struct Header {
        version: u32,
    }
    let corrupt = |e: serde_json::Error| StateFileError::Corrupt {
        path: path.to_owned(),
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    };
    let header: Header = serde_json::from_slice(&bytes).map_err(corrupt)?;
    if header.version != VERSION {
        return Err(StateFileError::Version {
            path: path.to_owned(),
            found: header.version,
        });
    }
    serde_json::from_slice(&bytes).map(Some).map_err(corrupt)
}

/// Replaces the state file atomically. Written as it is serialized (with every Service a
/// template selects, the text can be megabytes: it is never held whole in memory).
pub fn write(path: &Path, saved: &Saved) -> Result<(), StateFileError> {
    write_atomic_with(path, |f| {
        let mut w = std::io::BufWriter::new(f);
        serde_json::to_writer_pretty(&mut w, saved)?;
        w.flush()
    })
    .map_err(|source| StateFileError::Write {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::facts::NodeFacts;

    fn saved() -> Saved {
        Saved {
            version: VERSION,
            source: "ConfigMap kube-system/netwarden key config.yaml".into(),
            config: "apiVersion: netwarden.io/v1alpha1\nkind: ProtectedState\n".into(),
            facts: ClusterFacts {
                node: Some(NodeFacts {
                    name: "n1".into(),
                    pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
                    ..Default::default()
                }),
                apiserver: vec!["10.0.0.1".parse().unwrap()],
                ..Default::default()
            },
            written_at: 1,
            boot_id: boot_id(),
            netns: Some("4:4026531840".into()),
        }
    }

    #[test]
    fn round_trip_and_missing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.json");
        assert!(read(&path).unwrap().is_none());
        write(&path, &saved()).unwrap();
        assert_eq!(read(&path).unwrap(), Some(saved()));
        // Replaced, and no temporary file left beside it.
        let mut s = saved();
        s.written_at = 2;
        write(&path, &s).unwrap();
        assert_eq!(read(&path).unwrap().unwrap().written_at, 2);
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["state.json"]);
    }

    #[test]
    fn truncated_corrupt_and_future_files_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let full = serde_json::to_string_pretty(&saved()).unwrap();
        std::fs::write(&path, &full[..full.len() / 2]).unwrap();
        let e = read(&path).unwrap_err().to_string();
        assert!(e.contains("corrupt or truncated at line"), "{e}");
        std::fs::write(&path, b"\x00\xffgarbage").unwrap();
        assert!(matches!(read(&path), Err(StateFileError::Corrupt { .. })));
        std::fs::write(&path, full.replace("\"version\": 1", "\"version\": 9")).unwrap();
        let e = read(&path).unwrap_err().to_string();
        assert!(e.contains("format version 9"), "{e}");
        // A directory where the file should be.
        let e = read(dir.path()).unwrap_err();
        assert!(matches!(e, StateFileError::Read { .. }), "{e}");
    }
}
