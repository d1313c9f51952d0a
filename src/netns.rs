//! Entering a named network namespace (`ip netns` names, under /run/netns).

use nix::sched::{setns, CloneFlags};
use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum NetnsError {
    #[error("network namespace {name}: cannot open {path}: {source}")]
    Open {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("network namespace {name}: cannot enter it: {source}")]
    Enter {
        name: String,
        #[source]
        source: nix::Error,
    },
}

/// Path of a namespace given by name (in /run/netns) or by path.
pub fn path(name: &str) -> PathBuf {
    if name.contains('/') {
        PathBuf::from(name)
    } else {
        PathBuf::from("/run/netns").join(name)
    }
}

/// Moves the calling thread into the namespace. Call it before any thread or socket is created:
/// threads spawned afterwards, sockets opened afterwards and child processes inherit it.
pub fn enter(name: &str) -> Result<(), NetnsError> {
    let path = path(name);
    let file = std::fs::File::open(&path).map_err(|source| NetnsError::Open {
        name: name.to_string(),
        path: path.clone(),
        source,
    })?;
    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
        name: name.to_string(),
        source,
    })
}
