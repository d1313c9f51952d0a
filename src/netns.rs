//! Entering a named network namespace (`ip netns` names, under /run/netns).

use nix::sched::{setns, CloneFlags};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;
use thiserror::Error;

/// The cause is part of each message (and not a `source` too, which a chained report would print
/// twice).
#[derive(Debug, Error)]
pub enum NetnsError {
    #[error("network namespace {name}: cannot open {path}: {error}")]
    Open {
        name: String,
        path: PathBuf,
        error: std::io::Error,
    },
    /// setns needs CAP_SYS_ADMIN, which the DaemonSet's container does not have: in its pod
    /// (hostNetwork) a command is in the node's namespace already.
    #[error(
        "network namespace {name}: cannot enter it: {error} (entering a namespace needs \
         CAP_SYS_ADMIN; in the agent's pod, which is in the node's network namespace already, \
         leave out --netns)"
    )]
    Forbidden { name: String, error: nix::Error },
    #[error("network namespace {name}: cannot enter it: {error}")]
    Enter { name: String, error: nix::Error },
}

/// Path of a namespace given by name (in /run/netns) or by path.
pub fn path(name: &str) -> PathBuf {
    if name.contains('/') {
        PathBuf::from(name)
    } else {
        PathBuf::from("/run/netns").join(name)
    }
}

/// How often [`Entered::gone`] looks at the namespace's name.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// The namespace a thread entered, by name and identity (the nsfs inode), so that its removal
/// can be noticed: sockets opened in it keep it alive after `ip netns del`, with nothing left
/// that anyone else can reach or that is worth protecting.
#[derive(Clone, Debug)]
pub struct Entered {
    pub name: String,
    path: PathBuf,
    id: (u64, u64),
}

/// Moves the calling thread into the namespace. Call it before any thread or socket is created:
/// threads spawned afterwards, sockets opened afterwards and child processes inherit it.
pub fn enter(name: &str) -> Result<Entered, NetnsError> {
    let path = path(name);
    let file = std::fs::File::open(&path).map_err(|error| NetnsError::Open {
        name: name.to_string(),
        path: path.clone(),
        error,
    })?;
    let meta = file.metadata().map_err(|error| NetnsError::Open {
        name: name.to_string(),
        path: path.clone(),
        error,
    })?;
    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|error| {
        let name = name.to_string();
        match error {
            nix::Error::EPERM => NetnsError::Forbidden { name, error },
            error => NetnsError::Enter { name, error },
        }
    })?;
    Ok(Entered {
        name: name.to_string(),
        path,
        id: (meta.dev(), meta.ino()),
    })
}

impl Entered {
    /// Whether the name still leads to the namespace entered: false once it was removed
    /// (`ip netns del`; for a path such as `/proc/PID/ns/net`, once the process is gone) or
    /// replaced by another namespace of the same name. An error other than "not found" (a
    /// permission problem, say) proves nothing and counts as there.
    pub fn still_there(&self) -> bool {
        match std::fs::metadata(&self.path) {
            Ok(m) => (m.dev(), m.ino()) == self.id,
            Err(e) => e.kind() != std::io::ErrorKind::NotFound,
        }
    }

    /// Completes once the namespace is gone (looked at every second).
    pub async fn gone(&self) {
        loop {
            tokio::time::sleep(WATCH_EVERY).await;
            if !self.still_there() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_file_replaced_or_removed_is_gone() {
        // Any file stands in for a namespace here: identity is what is compared.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ns");
        std::fs::write(&path, b"").unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        let entered = Entered {
            name: "ns".into(),
            path: path.clone(),
            id: (meta.dev(), meta.ino()),
        };
        assert!(entered.still_there());
        let other = dir.path().join("other");
        std::fs::write(&other, b"").unwrap();
        std::fs::rename(&other, &path).unwrap();
        assert!(!entered.still_there(), "replaced under the same name");
        std::fs::remove_file(&path).unwrap();
        assert!(!entered.still_there(), "removed");
    }
}
