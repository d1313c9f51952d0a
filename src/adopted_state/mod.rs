//! The adopted-state file (`run --adopted-state PATH`): what `spec.adopt` adopted (rules,
//! routes, neighbour and FDB entries, iptables chains, ipsets, nftables tables), so that after
//! an agent restart they are protected at once, also those someone removed while the agent was
//! down. Written atomically by a thread of its own (the loop never waits for a
//! disk); a file that cannot be read is reported and ignored.

use crate::model::fast::HashMap;
use crate::model::neighbour::NeighbourState;
use crate::model::{
    DesiredFdb, DesiredNeighbour, DesiredRoute, FdbId, NeighbourId, ObjectId, RouteKey, RuleKey,
};
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use thiserror::Error;

pub mod schedule;
mod writer;

pub use writer::Writer;

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

/// An adopted neighbour entry as last seen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdoptedNeighbour {
    pub selector: String,
    pub device: String,
    pub address: IpAddr,
    /// As `ip neigh` prints it.
    pub lladdr: String,
    pub state: NeighbourState,
}

/// An adopted FDB entry of a VXLAN device as last seen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdoptedFdb {
    pub selector: String,
    pub device: String,
    /// As `bridge fdb` prints it.
    pub lladdr: String,
    /// The remote VTEP.
    pub dst: IpAddr,
    #[serde(default)]
    pub vni: Option<u32>,
}

impl AdoptedNeighbour {
    pub fn new(selector: &str, e: &DesiredNeighbour) -> AdoptedNeighbour {
        AdoptedNeighbour {
            selector: selector.to_owned(),
            device: e.device.clone(),
            address: e.address,
            lladdr: e.lladdr.to_string(),
            state: e.state,
        }
    }

    /// The entry, unnamed (its selector names it); `None` for a device name no interface can
    /// have (it would go into requests and logs) or a MAC that does not read.
    fn entry(&self) -> Option<DesiredNeighbour> {
        crate::config::valid_ifname(&self.device).ok()?;
        Some(DesiredNeighbour {
            name: String::new(),
            mode: crate::model::Mode::Observe,
            device: self.device.clone(),
            address: self.address,
            lladdr: self.lladdr.parse().ok()?,
            state: self.state,
        })
    }
}

impl AdoptedFdb {
    pub fn new(selector: &str, e: &DesiredFdb) -> AdoptedFdb {
        AdoptedFdb {
            selector: selector.to_owned(),
            device: e.device.clone(),
            lladdr: e.lladdr.to_string(),
            dst: e.dst,
            vni: e.vni,
        }
    }

    /// As [`AdoptedNeighbour::entry`].
    fn entry(&self) -> Option<DesiredFdb> {
        crate::config::valid_ifname(&self.device).ok()?;
        Some(DesiredFdb {
            name: String::new(),
            mode: crate::model::Mode::Observe,
            device: self.device.clone(),
            lladdr: self.lladdr.parse().ok()?,
            dst: self.dst,
            vni: self.vni,
        })
    }
}

/// The file. Each engine writes its own part (see [`Part`]); fields added since version 1 are
/// optional, so that older files still read.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdoptedState {
    pub version: u32,
    pub rules: Vec<AdoptedRule>,
    #[serde(default)]
    pub routes: Vec<AdoptedRoute>,
    /// iptables chains adopted by the netfilter guard, as last seen.
    #[serde(default)]
    pub chains: Vec<crate::netfilter::adopted::SavedChain>,
    #[serde(default)]
    pub ipsets: Vec<crate::netfilter::adopted::SavedAdoptedSet>,
    /// Neighbour and FDB entries adopted by the rtnetlink agent, as last seen.
    #[serde(default)]
    pub neighbours: Vec<AdoptedNeighbour>,
    #[serde(default)]
    pub fdb: Vec<AdoptedFdb>,
    /// nftables tables adopted by the nftables engine, as last seen.
    #[serde(default)]
    pub nftables: Vec<crate::nftables::adopt::SavedTable>,
}

/// What the rtnetlink agent protects from the file: the objects [`merge`] kept, by selector.
#[derive(Debug, Default)]
pub struct Merged {
    pub rules: HashMap<RuleKey, String>,
    pub routes: HashMap<RouteKey, String>,
    /// Neighbour and FDB entries.
    pub node: HashMap<ObjectId, String>,
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
    #[error("adopted-state file {path}: {why}; and it cannot be set aside: {source}")]
    SetAside {
        path: PathBuf,
        why: String,
        #[source]
        source: std::io::Error,
    },
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

/// Adds the saved rules, routes, neighbour and FDB entries whose selector still exists and
/// still covers them to `desired` (objects the config names itself win); returns them by
/// selector. The chains and sets are the guard's ([`crate::netfilter::guard::Adoption`]), the
/// tables the nftables engine's.
pub fn merge(saved: AdoptedState, desired: &mut crate::desired::DesiredState) -> Merged {
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
        // A device name goes into requests and logs: only one the kernel could have shown.
        if let Some(device) = &r.route.device {
            if crate::config::valid_ifname(device).is_err() {
                continue;
            }
        }
        let Some(sel) = desired.adopt.iter().find(|s| s.name == r.selector) else {
            continue;
        };
        if let Some(route) = sel.readopt_route(&r.route) {
            routes.insert(key.clone(), sel.name.clone());
            desired.routes.insert(key, route);
        }
    }
    let node = merge_node(&saved.neighbours, &saved.fdb, desired);
    Merged {
        rules,
        routes,
        node,
    }
}

/// The saved neighbour and FDB entries, kept as a reload keeps them
/// ([`crate::desired::DesiredState::keep_adopted_node`]); those that do not read back are not.
fn merge_node(
    neighbours: &[AdoptedNeighbour],
    fdb: &[AdoptedFdb],
    desired: &mut crate::desired::DesiredState,
) -> HashMap<ObjectId, String> {
    let mut adopted = Vec::new();
    let mut n_entries: HashMap<NeighbourId, DesiredNeighbour> = HashMap::default();
    let mut f_entries: HashMap<FdbId, DesiredFdb> = HashMap::default();
    for n in neighbours {
        if let Some(e) = n.entry() {
            adopted.push((ObjectId::Neighbour(e.id()), n.selector.clone()));
            n_entries.insert(e.id(), e);
        }
    }
    for f in fdb {
        if let Some(e) = f.entry() {
            adopted.push((ObjectId::Fdb(e.id()), f.selector.clone()));
            f_entries.insert(e.id(), e);
        }
    }
    desired.keep_adopted_node(adopted, &n_entries, &f_entries)
}

/// Reads the file at start. A file that cannot be used (corrupt, or of another format version)
/// is renamed `PATH.corrupt-<unix time>` and the state starts empty: the agent's next write
/// would otherwise destroy what may be the only evidence of what went wrong. Returns the state
/// and, for a file set aside, where it went and why.
///
/// # Errors
///
/// A file that cannot be read, or an unusable one that cannot be renamed (nothing may then
/// write the file: the caller keeps no adopted state).
pub fn read_or_set_aside(
    path: &Path,
) -> Result<(AdoptedState, Option<(PathBuf, AdoptedStateError)>), AdoptedStateError> {
    match read(path) {
        Ok(state) => Ok((state, None)),
        Err(e @ (AdoptedStateError::Corrupt { .. } | AdoptedStateError::Version { .. })) => {
            let aside =
                crate::files::set_aside(path).map_err(|source| AdoptedStateError::SetAside {
                    path: path.to_owned(),
                    why: e.to_string(),
                    source,
                })?;
            Ok((AdoptedState::default(), Some((aside, e))))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Family;

    #[test]
    fn bad_files_do_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adopted.json");
        assert_eq!(read(&path).unwrap(), AdoptedState::default(), "no file");
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

    fn eni_route(protocol: u8, device: &str) -> AdoptedRoute {
        AdoptedRoute {
            selector: "eni".into(),
            route: DesiredRoute {
                name: "adopted:eni/10.1.2.0/24\nforged line".into(),
                mode: crate::model::Mode::Observe,
                key: RouteKey::new(Family::Ipv4, 100, "10.1.2.0/24".parse().unwrap(), None),
                kind: crate::model::RouteType::Unicast,
                gateway: None,
                device: Some(device.into()),
                prefsrc: None,
                scope: Some(253),
                protocol: Some(protocol),
                onlink: false,
                mtu: None,
            },
        }
    }

    fn with_selector(routes: crate::adopt::RouteSelector) -> crate::desired::DesiredState {
        crate::desired::DesiredState {
            adopt: vec![crate::adopt::AdoptSelector {
                name: "eni".into(),
                mode: crate::model::Mode::Enforce,
                rules: None,
                routes: Some(routes),
                chains: None,
                ipsets: None,
                neighbours: None,
                owners: vec!["aws-k8s-agent".into()],
                unknown_actor: crate::adopt::UnknownActor::Restore,
                pod_liveness: None,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn saved_routes_are_checked_against_every_field_of_their_selector() {
        let saved = |routes| AdoptedState {
            version: VERSION,
            routes,
            ..Default::default()
        };
        let all = vec![
            eni_route(3, "eni1"), // boot, eni1
            AdoptedRoute {
                route: DesiredRoute {
                    key: RouteKey::new(Family::Ipv4, 100, "10.1.3.0/24".parse().unwrap(), None),
                    ..eni_route(4, "eni1").route
                },
                ..eni_route(4, "eni1")
            }, // static, eni1
            AdoptedRoute {
                route: DesiredRoute {
                    key: RouteKey::new(Family::Ipv4, 100, "10.1.4.0/24".parse().unwrap(), None),
                    ..eni_route(4, "veth9").route
                },
                ..eni_route(4, "veth9")
            }, // static, veth9
        ];
        // Narrowed to protocol static on eni*: only the second is put back.
        let mut desired = with_selector(crate::adopt::RouteSelector {
            table: Some((100, 100)),
            protocols: vec![4],
            device: Some("eni*".into()),
            ..Default::default()
        });
        let routes = merge(saved(all.clone()), &mut desired).routes;
        let kept: Vec<String> = desired
            .routes
            .keys()
            .map(|k| k.destination.to_string())
            .collect();
        assert_eq!(kept, ["10.1.3.0/24"]);
        assert_eq!(routes.len(), 1);
        // Named and moded by the selector, not by the file.
        let route = desired.routes.values().next().unwrap();
        assert_eq!(route.name, "adopted:eni/10.1.3.0/24");
        assert_eq!(route.mode, crate::model::Mode::Enforce);
        // The whole selector as it was: all three.
        let mut desired = with_selector(crate::adopt::RouteSelector {
            table: Some((100, 100)),
            ..Default::default()
        });
        merge(saved(all), &mut desired);
        assert_eq!(desired.routes.len(), 3);
        // A device name no interface can have is not trusted.
        let mut desired = with_selector(crate::adopt::RouteSelector {
            table: Some((100, 100)),
            ..Default::default()
        });
        merge(saved(vec![eni_route(3, "eni1\n\u{1b}[31m")]), &mut desired);
        assert!(desired.routes.is_empty());
    }

    #[test]
    fn an_unusable_file_is_set_aside_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adopted.json");
        let (state, aside) = read_or_set_aside(&path).unwrap();
        assert_eq!(state, AdoptedState::default(), "no file");
        assert!(aside.is_none());
        for bad in [
            &b"{\"version\": 1, \"rules\": ["[..],
            b"{\"version\": 9, \"rules\": []}",
        ] {
            std::fs::write(&path, bad).unwrap();
            let (state, aside) = read_or_set_aside(&path).unwrap();
            assert_eq!(state, AdoptedState::default());
            let (aside, _why) = aside.expect("set aside");
            assert!(!path.exists());
            assert_eq!(std::fs::read(&aside).unwrap(), bad);
            let name = aside.file_name().unwrap().to_string_lossy().into_owned();
            assert!(name.starts_with("adopted.json.corrupt-"), "{name}");
        }
        // Twice within the same second: both kept.
        let kept = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(kept, 2);
    }

    #[test]
    fn a_file_of_before_neighbours_and_tables_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adopted.json");
        std::fs::write(
            &path,
            br#"{"version": 1, "rules": [], "routes": [], "chains": []}"#,
        )
        .unwrap();
        let state = read(&path).unwrap();
        assert!(state.neighbours.is_empty() && state.fdb.is_empty() && state.nftables.is_empty());
    }

    fn flannel(devices: &[&str]) -> crate::adopt::AdoptSelector {
        crate::adopt::AdoptSelector {
            name: "flannel".into(),
            mode: crate::model::Mode::Enforce,
            rules: None,
            routes: None,
            chains: None,
            ipsets: None,
            neighbours: Some(crate::adopt::NeighbourSelector {
                devices: devices.iter().map(|d| d.to_string()).collect(),
            }),
            owners: vec!["flanneld".into()],
            unknown_actor: crate::adopt::UnknownActor::Restore,
            pod_liveness: None,
        }
    }

    fn vtep(device: &str, address: &str, lladdr: &str) -> (AdoptedNeighbour, AdoptedFdb) {
        (
            AdoptedNeighbour {
                selector: "flannel".into(),
                device: device.into(),
                address: address.parse().unwrap(),
                lladdr: lladdr.into(),
                state: NeighbourState::Permanent,
            },
            AdoptedFdb {
                selector: "flannel".into(),
                device: device.into(),
                lladdr: lladdr.into(),
                dst: "192.168.1.12".parse().unwrap(),
                vni: Some(1),
            },
        )
    }

    #[test]
    fn saved_neighbour_and_fdb_entries_join_while_their_selector_covers_them() {
        let (n1, f1) = vtep("flannel.1", "10.244.2.0", "0a:58:0a:f4:02:00");
        let (n2, f2) = vtep("vxlan.calico", "10.244.3.0", "0a:58:0a:f4:03:00");
        // A device name no interface can have, a MAC that does not read: not trusted.
        let (n3, f3) = vtep("flannel.1\n\u{1b}[31m", "10.244.4.0", "0a:58:0a:f4:04:00");
        let (n4, f4) = vtep("flannel.1", "10.244.5.0", "0a:58:zz:f4:05:00");
        let saved = AdoptedState {
            version: VERSION,
            neighbours: vec![n1.clone(), n2, n3, n4],
            fdb: vec![f1.clone(), f2, f3, f4],
            ..Default::default()
        };
        let mut desired = crate::desired::DesiredState {
            adopt: vec![flannel(&["flannel.*"])],
            ..Default::default()
        };
        let merged = merge(saved.clone(), &mut desired);
        assert_eq!(merged.node.len(), 2, "{:?}", merged.node);
        let n = desired.neighbours.values().next().unwrap();
        assert_eq!(
            (n.name.as_str(), n.lladdr.to_string()),
            ("adopted:flannel/flannel.1/10.244.2.0", n1.lladdr.clone())
        );
        let f = desired.fdb.values().next().unwrap();
        assert_eq!((f.dst, f.vni), (f1.dst, Some(1)));
        // Saved again as it was read.
        assert_eq!(AdoptedNeighbour::new("flannel", n), n1);
        assert_eq!(AdoptedFdb::new("flannel", f), f1);

        // The selector is gone: nothing comes back.
        let mut desired = crate::desired::DesiredState::default();
        assert!(merge(saved.clone(), &mut desired).node.is_empty());
        assert!(desired.neighbours.is_empty() && desired.fdb.is_empty());

        // The config names the neighbour entry itself: the config's wins.
        let own = DesiredNeighbour {
            name: "vtep-node2".into(),
            ..n.clone()
        };
        let mut desired = crate::desired::DesiredState {
            adopt: vec![flannel(&["flannel.*"])],
            ..Default::default()
        };
        desired.neighbours.insert(own.id(), own.clone());
        let merged = merge(saved, &mut desired);
        assert_eq!(merged.node.len(), 1, "only the FDB entry");
        assert_eq!(desired.neighbours.values().next(), Some(&own));
    }
}
