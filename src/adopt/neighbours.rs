//! Adopted neighbour and FDB entries (`spec.adopt[].neighbours`): the permanent entries a VXLAN
//! backend (flanneld, calico-node) adds on its device for every other node, protected as they
//! appear. Pure.
//!
//! While an adopted entry exists its content is its owner's: a new MAC or remote (a node's VTEP
//! device was re-created) is followed, never fought. A removal is judged as for rules: by an
//! owner, forgotten; by anyone else or the kernel, restored; by nobody known, `unknownActor`.
//! The kernel names the remover of a neighbour entry, but never that of an FDB entry of a VXLAN
//! device; backends add and remove the two as a pair (neighbour: VTEP address → MAC; FDB: MAC →
//! the node), so an adopted FDB entry is forgotten with the adopted neighbour entry of the same
//! device and MAC.

use super::{AdoptSelector, ADOPTED_PREFIX};
use crate::model::link::device_matches;
use crate::model::neighbour::{
    NeighbourState, ObservedFdb, ObservedNeighbour, NUD_NOARP, NUD_PERMANENT,
};
use crate::model::{DesiredFdb, DesiredNeighbour, FdbId, Mac, NeighbourId};

/// Which devices' entries a selector adopts: names, or prefixes ending in `*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NeighbourSelector {
    pub devices: Vec<String>,
}

impl NeighbourSelector {
    pub fn matches(&self, device: &str) -> bool {
        self.devices.iter().any(|p| device_matches(p, device))
    }
}

/// The first selector that adopts the entries of a device.
pub fn select_neighbours<'a>(
    selectors: &'a [AdoptSelector],
    device: &str,
) -> Option<&'a AdoptSelector> {
    selectors
        .iter()
        .find(|s| s.neighbours.as_ref().is_some_and(|n| n.matches(device)))
}

impl AdoptSelector {
    /// The protected entry a kernel neighbour entry becomes, exactly as seen; `None` for what
    /// is not adopted: the kernel's cache (any state but permanent and noarp), multicast
    /// entries (the kernel's own) and link-layer addresses that are not Ethernet ones.
    pub fn adopt_neighbour(
        &self,
        id: &NeighbourId,
        observed: &ObservedNeighbour,
    ) -> Option<DesiredNeighbour> {
        let state = match observed.state {
            NUD_PERMANENT => NeighbourState::Permanent,
            NUD_NOARP => NeighbourState::Noarp,
            _ => return None,
        };
        if id.address.is_multicast() {
            return None;
        }
        Some(DesiredNeighbour {
            name: self.neighbour_name(&id.device, id.address),
            mode: self.mode,
            device: id.device.clone(),
            address: id.address,
            lladdr: Mac::from_bytes(observed.lladdr.as_deref()?)?,
            state,
        })
    }

    /// An adopted neighbour entry as it was seen (the adopted-state file, the config before a
    /// reload), protected again if this selector still covers its device; named and moded by
    /// this selector, not by what the file says. Multicast entries never are.
    pub fn readopt_neighbour(&self, e: &DesiredNeighbour) -> Option<DesiredNeighbour> {
        let covered = self
            .neighbours
            .as_ref()
            .is_some_and(|n| n.matches(&e.device));
        (covered && !e.address.is_multicast()).then(|| DesiredNeighbour {
            name: self.neighbour_name(&e.device, e.address),
            mode: self.mode,
            ..e.clone()
        })
    }

    /// As [`AdoptSelector::readopt_neighbour`], for an FDB entry.
    pub fn readopt_fdb(&self, e: &DesiredFdb) -> Option<DesiredFdb> {
        let covered = self
            .neighbours
            .as_ref()
            .is_some_and(|n| n.matches(&e.device));
        covered.then(|| DesiredFdb {
            name: self.fdb_name(&e.device, e.lladdr),
            mode: self.mode,
            ..e.clone()
        })
    }

    fn neighbour_name(&self, device: &str, address: std::net::IpAddr) -> String {
        format!("{ADOPTED_PREFIX}{}/{device}/{address}", self.name)
    }

    fn fdb_name(&self, device: &str, lladdr: Mac) -> String {
        format!("{ADOPTED_PREFIX}{}/{device}/{lladdr}", self.name)
    }

    /// The protected FDB entry a remote becomes, exactly as seen (its VNI too); `None` without
    /// a remote or when the kernel learned it (neither permanent nor static).
    pub fn adopt_fdb(&self, id: &FdbId, observed: &ObservedFdb) -> Option<DesiredFdb> {
        if observed.state & (NUD_PERMANENT | NUD_NOARP) == 0 {
            return None;
        }
        let dst = observed.dst?;
        Some(DesiredFdb {
            name: self.fdb_name(&id.device, id.lladdr),
            mode: self.mode,
            device: id.device.clone(),
            lladdr: id.lladdr,
            dst,
            vni: observed.vni,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adopt::UnknownActor;
    use crate::model::Mode;

    fn flannel() -> AdoptSelector {
        AdoptSelector {
            name: "flannel".into(),
            mode: Mode::Enforce,
            rules: None,
            routes: None,
            chains: None,
            ipsets: None,
            neighbours: Some(NeighbourSelector {
                devices: vec!["flannel.1".into(), "vxlan*".into()],
            }),
            owners: vec!["flanneld".into()],
            unknown_actor: UnknownActor::Restore,
            pod_liveness: None,
        }
    }

    #[test]
    fn permanent_unicast_entries_of_the_devices_are_adopted_as_seen() {
        let sels = [flannel()];
        assert!(select_neighbours(&sels, "flannel.1").is_some());
        assert!(select_neighbours(&sels, "vxlan.calico").is_some());
        assert!(select_neighbours(&sels, "eth0").is_none());
        let s = &sels[0];
        let id = NeighbourId {
            device: "flannel.1".into(),
            address: "10.244.2.0".parse().unwrap(),
        };
        let mac = vec![0x0a, 0x58, 0x0a, 0xf4, 0x02, 0x00];
        let permanent = ObservedNeighbour {
            lladdr: Some(mac.clone()),
            state: NUD_PERMANENT,
        };
        let n = s.adopt_neighbour(&id, &permanent).unwrap();
        assert_eq!(n.name, "adopted:flannel/flannel.1/10.244.2.0");
        assert_eq!(n.lladdr.0.to_vec(), mac);
        let cached = ObservedNeighbour {
            state: 0x02,
            ..permanent.clone()
        };
        assert!(s.adopt_neighbour(&id, &cached).is_none());
        let multicast = NeighbourId {
            address: "ff02::1".parse().unwrap(),
            ..id.clone()
        };
        assert!(s.adopt_neighbour(&multicast, &permanent).is_none());

        let fid = FdbId {
            device: "flannel.1".into(),
            lladdr: Mac::from_bytes(&mac).unwrap(),
            dst: None,
        };
        let remote = ObservedFdb {
            dst: Some("192.168.1.12".parse().unwrap()),
            vni: Some(7),
            state: NUD_PERMANENT | NUD_NOARP,
        };
        let f = s.adopt_fdb(&fid, &remote).unwrap();
        assert_eq!((f.vni, f.dst), (Some(7), remote.dst.unwrap()));
        assert!(s
            .adopt_fdb(
                &fid,
                &ObservedFdb {
                    state: 0x02,
                    ..remote.clone()
                }
            )
            .is_none());
        assert!(s
            .adopt_fdb(
                &fid,
                &ObservedFdb {
                    dst: None,
                    ..remote
                }
            )
            .is_none());
    }
}
