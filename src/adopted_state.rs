//! The adopted-state file (`run --adopted-state PATH`): the rules adopted through `spec.adopt`,
//! so that after an agent restart they are protected at once, also those someone removed while
//! the agent was down. Written atomically by a thread of its own (the loop never waits for a
//! disk); a file that cannot be read is reported and ignored.

use crate::model::fast::HashMap;
use crate::model::{DesiredRoute, RouteKey, RuleKey};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use thiserror::Error;

/// Bumped when the format changes incompatibly.
pub const VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdoptedRule {
    /// The `spec.adopt` selector that adopted it.
    pub selector: String,
    pub key: RuleKey,
    pub protocol: Option<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdoptedRoute {
    pub selector: String,
    /// The route as it was seen (device by name).
    pub route: DesiredRoute,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdoptedState {
    pub version: u32,
    pub rules: Vec<AdoptedRule>,
    #[serde(default)]
    pub routes: Vec<AdoptedRoute>,
}

#[derive(Debug, Error)]
pub enum AdoptedStateError {
    #[error("adopted-state file {path}: cannot read it: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("adopted-state file {path}: corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "adopted-state file {path}: format version {found}, this agent reads version {VERSION}"
    )]
    Version { path: PathBuf, found: u32 },
}

/// Reads the file; an empty state when there is none.
pub fn read(path: &Path) -> Result<AdoptedState, AdoptedStateError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(AdoptedState::default()),
        Err(source) => {
            return Err(AdoptedStateError::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    let state: AdoptedState =
        serde_json::from_slice(&bytes).map_err(|source| AdoptedStateError::Corrupt {
            path: path.to_owned(),
            source,
        })?;
    if state.version != VERSION {
        return Err(AdoptedStateError::Version {
            path: path.to_owned(),
            found: state.version,
        });
    }
    Ok(state)
}

/// Adds the saved objects whose selector still exists and still covers them to `desired`
/// (objects the config names itself win); returns the adopted rules and routes by selector.
pub fn merge(
    saved: AdoptedState,
    desired: &mut crate::desired::DesiredState,
) -> (HashMap<RuleKey, String>, HashMap<RouteKey, String>) {
    let mut rules = HashMap::default();
    let mut routes = HashMap::default();
    for r in saved.rules {
        if desired.rules.contains_key(&r.key) {
            continue;
        }
        let Some(sel) = desired.adopt.iter().find(|s| s.name == r.selector) else {
            continue;
        };
        if sel
            .rules
            .as_ref()
            .is_some_and(|s| s.matches(&r.key, r.protocol))
        {
            let rule = sel.adopt_rule(&r.key, r.protocol);
            rules.insert(r.key.clone(), sel.name.clone());
            desired.rules.insert(r.key, rule);
        }
    }
    for r in saved.routes {
        let key = r.route.key.clone();
        if desired.routes.contains_key(&key) {
            continue;
        }
        let Some(sel) = desired.adopt.iter().find(|s| s.name == r.selector) else {
            continue;
        };
        let covered = sel.routes.as_ref().is_some_and(|s| {
            s.family.is_none_or(|f| f == key.family)
                && s.table
                    .is_none_or(|(lo, hi)| lo <= key.table && key.table <= hi)
        });
        if covered {
            let mut route = r.route;
            route.mode = sel.mode;
            routes.insert(key.clone(), sel.name.clone());
            desired.routes.insert(key, route);
        }
    }
    (rules, routes)
}

/// Writes snapshots on a thread of its own; only the newest of those queued is written.
#[derive(Debug)]
pub struct Writer {
    tx: mpsc::Sender<AdoptedState>,
}

impl Writer {
    pub fn spawn(path: PathBuf) -> std::io::Result<Writer> {
        let (tx, rx) = mpsc::channel::<AdoptedState>();
        std::thread::Builder::new()
            .name("nw-adopted-state".into())
            .spawn(move || {
                while let Ok(mut state) = rx.recv() {
                    while let Ok(newer) = rx.try_recv() {
                        state = newer;
                    }
                    let json = match serde_json::to_vec_pretty(&state) {
                        Ok(j) => j,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot encode the adopted state");
                            continue;
                        }
                    };
                    if let Err(e) = crate::cluster::statefile::write_atomic(&path, &json) {
                        tracing::error!(path = %path.display(), error = %e, "cannot write the adopted-state file");
                    }
                }
            })?;
        Ok(Writer { tx })
    }

    pub fn save(&self, state: AdoptedState) {
        let _ = self.tx.send(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Family, RuleAction};

    #[test]
    fn round_trip_and_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adopted.json");
        assert_eq!(read(&path).unwrap(), AdoptedState::default(), "no file");
        let state = AdoptedState {
            version: VERSION,
            rules: vec![AdoptedRule {
                selector: "vpc-cni".into(),
                key: RuleKey::new(
                    Family::Ipv4,
                    1536,
                    Some("10.1.1.20/32".parse().unwrap()),
                    None,
                    None,
                    None,
                    None,
                    None,
                    2,
                    RuleAction::Lookup,
                ),
                protocol: Some(4),
            }],
            routes: vec![AdoptedRoute {
                selector: "eni".into(),
                route: DesiredRoute {
                    name: "adopted:eni/0.0.0.0/0".into(),
                    mode: crate::model::Mode::Enforce,
                    key: crate::model::RouteKey::new(
                        Family::Ipv4,
                        2,
                        "0.0.0.0/0".parse().unwrap(),
                        None,
                    ),
                    kind: crate::model::RouteType::Unicast,
                    gateway: Some("10.1.1.1".parse().unwrap()),
                    device: Some("eni1".into()),
                    prefsrc: None,
                    scope: Some(0),
                    protocol: Some(3),
                    onlink: false,
                    mtu: None,
                },
            }],
        };
        let w = Writer::spawn(path.clone()).unwrap();
        w.save(state.clone());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while read(&path).map(|s| s.rules.is_empty()).unwrap_or(true) {
            assert!(std::time::Instant::now() < deadline, "not written");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(read(&path).unwrap(), state);

        std::fs::write(&path, b"{\"version\": 1, \"rules\": [").unwrap();
        assert!(matches!(
            read(&path),
            Err(AdoptedStateError::Corrupt { .. })
        ));
        std::fs::write(&path, b"{\"version\": 9, \"rules\": []}").unwrap();
        assert!(matches!(
            read(&path),
            Err(AdoptedStateError::Version { found: 9, .. })
        ));
    }
}
