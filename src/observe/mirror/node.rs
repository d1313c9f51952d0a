//! The mirror's neighbour and FDB entries, link changes made by the agent, and settings.

use super::{Change, Mirror};
use crate::model::fast::HashSet;
use crate::model::link::device_matches;
use crate::model::neighbour::{ObservedFdb, ObservedNeighbour};
use crate::model::sysctl::{Scope, Setting, SysctlKey, IFINDEX_ALL, IFINDEX_DEFAULT};
use crate::model::{Family, FdbId, Mac, NeighbourId};
use crate::observe::decode::{self, Netconf};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::neighbour::NeighbourMessage;
use std::net::IpAddr;

/// Which neighbour and FDB entries the mirror keeps: the protected ones (by device name), or
/// (for `snapshot`) those of some devices.
#[derive(Clone, Debug, Default)]
pub struct NeighbourInterest {
    pub neighbours: HashSet<NeighbourId>,
    pub fdb: HashSet<FdbId>,
    /// Every entry of the devices these patterns match, besides (adopt selectors, snapshot).
    pub devices: Vec<String>,
}

impl NeighbourInterest {
    fn device_wanted(&self, device: &str) -> bool {
        self.devices.iter().any(|p| device_matches(p, device))
    }
}

impl Mirror {
    pub fn set_neighbour_interest(&mut self, interest: NeighbourInterest) {
        self.neighbour_interest = interest;
    }

    /// Neighbour entries are dumped (and their notifications wanted) only when some are
    /// protected.
    pub fn wants_neighbours(&self) -> bool {
        !self.neighbour_interest.neighbours.is_empty()
            || !self.neighbour_interest.devices.is_empty()
    }

    pub fn wants_fdb(&self) -> bool {
        !self.neighbour_interest.fdb.is_empty() || !self.neighbour_interest.devices.is_empty()
    }

    /// Every neighbour entry kept: device index, address, entry.
    pub fn neighbours(&self) -> impl Iterator<Item = (u32, IpAddr, &ObservedNeighbour)> {
        self.neighbours.iter().map(|((i, a), n)| (*i, *a, n))
    }

    /// Every FDB remote kept: device index, MAC, remote.
    pub fn fdb_remotes(&self) -> impl Iterator<Item = (u32, Mac, &ObservedFdb)> {
        self.fdb
            .iter()
            .flat_map(|((i, mac, _), list)| list.iter().map(move |r| (*i, *mac, r)))
    }

    /// The indexes of the existing devices that hold protected neighbour entries.
    pub fn neighbour_devices(&self) -> Vec<u32> {
        let interest = &self.neighbour_interest;
        let of_devices = self
            .links()
            .filter(|l| interest.device_wanted(&l.name))
            .map(|l| l.index);
        let mut out: Vec<u32> = interest
            .neighbours
            .iter()
            .filter_map(|n| self.link_index(&n.device))
            .chain(of_devices)
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    pub fn neighbour(&self, ifindex: u32, address: IpAddr) -> Option<&ObservedNeighbour> {
        self.neighbours.get(&(ifindex, address))
    }

    /// The remotes the kernel holds for a protected FDB entry on device `ifindex`.
    pub fn fdb(&self, ifindex: u32, id: &FdbId) -> &[ObservedFdb] {
        self.fdb
            .get(&(ifindex, id.lladdr, id.dst))
            .map_or(&[], Vec::as_slice)
    }

    /// Forgets the neighbour and FDB entries before they are dumped again.
    pub fn clear_neighbours(&mut self) {
        self.neighbours.clear();
        self.fdb.clear();
    }

    /// What a device's removal takes with it.
    pub(super) fn forget_device(&mut self, index: u32) {
        self.neighbours.retain(|(i, _), _| *i != index);
        self.fdb.retain(|(i, ..), _| *i != index);
        let index = index as i32;
        self.sysctls.retain(|(_, i, _), _| *i != index);
    }

    pub(super) fn ingest_neighbour(&mut self, m: &NeighbourMessage, removed: bool) -> Change {
        if let Some((ifindex, address, observed)) = decode::neighbour(m) {
            let Some(device) = self.link(ifindex).map(|l| l.name.clone()) else {
                return Change::Nothing;
            };
            let id = NeighbourId { device, address };
            let interest = &self.neighbour_interest;
            if !interest.neighbours.contains(&id) && !interest.device_wanted(&id.device) {
                return Change::Nothing;
            }
            if removed {
                self.neighbours.remove(&(ifindex, address));
            } else {
                self.neighbours.insert((ifindex, address), observed);
            }
            return Change::Neighbour { id, removed };
        }
        let Some((ifindex, mac, observed)) = decode::fdb(m) else {
            return Change::Nothing;
        };
        let Some(device) = self.link(ifindex).map(|l| l.name.clone()) else {
            return Change::Nothing;
        };
        let dst = observed.dst.filter(|_| mac.has_many_remotes());
        let id = FdbId {
            device,
            lladdr: mac,
            dst,
        };
        let interest = &self.neighbour_interest;
        if !interest.fdb.contains(&id) && !interest.device_wanted(&id.device) {
            return Change::Nothing;
        }
        let remotes = self.fdb.entry((ifindex, mac, dst)).or_default();
        if removed {
            remotes.retain(|r| r.dst != observed.dst || r.vni != observed.vni);
            if remotes.is_empty() {
                self.fdb.remove(&(ifindex, mac, dst));
            }
        } else if mac.has_many_remotes() {
            // One remote per (dst, vni) in the list.
            remotes.retain(|r| r.dst != observed.dst || r.vni != observed.vni);
            remotes.push(observed);
        } else {
            // A unicast MAC has one remote: a notification replaces it.
            *remotes = vec![observed];
        }
        Change::Fdb { id, removed }
    }

    /// The agent's own RTM_SETLINK, once the kernel took it.
    pub(super) fn set_link(&mut self, m: &LinkMessage) -> Change {
        let index = m.header.index;
        let Some(link) = self.links.get_mut(&index) else {
            return Change::Nothing;
        };
        if m.header.change_mask.contains(LinkFlags::Up) {
            link.up = m.header.flags.contains(LinkFlags::Up);
        }
        for a in &m.attributes {
            if let LinkAttribute::Mtu(mtu) = a {
                link.mtu = Some(*mtu);
            }
        }
        Change::LinkOther { index }
    }

    /// Folds in an RTM_NEWNETCONF notification.
    pub fn ingest_netconf(&mut self, n: &Netconf) -> Change {
        for (setting, value) in &n.values {
            self.sysctls.insert((n.family, n.ifindex, *setting), *value);
        }
        Change::Sysctl {
            family: n.family,
            ifindex: n.ifindex,
        }
    }

    /// Where a setting is kept: by family, device index (or all/default) and setting; `None`
    /// for a device that does not exist.
    fn sysctl_slot(&self, key: &SysctlKey) -> Option<(Family, i32, Setting)> {
        let index = match &key.scope {
            Scope::All => IFINDEX_ALL,
            Scope::Default => IFINDEX_DEFAULT,
            Scope::Device(d) => self.link_index(d)? as i32,
        };
        Some((key.setting.family(), index, key.setting))
    }

    /// The value of a setting as last read or notified.
    pub fn sysctl(&self, key: &SysctlKey) -> Option<u32> {
        self.sysctls.get(&self.sysctl_slot(key)?).copied()
    }

    /// A setting's value as read (or written by the agent). Returns the change if it differs.
    pub fn set_sysctl(&mut self, key: &SysctlKey, value: u32) -> Change {
        let Some(slot) = self.sysctl_slot(key) else {
            return Change::Nothing;
        };
        if self.sysctls.insert(slot, value) == Some(value) {
            return Change::Nothing;
        }
        Change::Sysctl {
            family: slot.0,
            ifindex: slot.1,
        }
    }

    /// Forgets a setting that could not be read (the device went away meanwhile).
    pub fn forget_sysctl(&mut self, key: &SysctlKey) {
        if let Some(slot) = self.sysctl_slot(key) {
            self.sysctls.remove(&slot);
        }
    }

    /// The name of the device behind a settings index (`all`, `default`, a link).
    pub fn sysctl_scope(&self, ifindex: i32) -> Option<Scope> {
        match ifindex {
            IFINDEX_ALL => Some(Scope::All),
            IFINDEX_DEFAULT => Some(Scope::Default),
            i => Some(Scope::Device(
                self.link(u32::try_from(i).ok()?)?.name.clone(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::encode;
    use crate::model::neighbour::{NeighbourState, NUD_PERMANENT};
    use crate::model::{DesiredFdb, DesiredNeighbour, Mode};
    use rtnetlink::packet_route::RouteNetlinkMessage as M;

    fn mirror_with_link() -> Mirror {
        let mut m = Mirror::default();
        let mut l = LinkMessage::default();
        l.header.index = 7;
        l.attributes.push(LinkAttribute::IfName("flannel.1".into()));
        l.attributes.push(LinkAttribute::Mtu(1450));
        m.ingest(&M::NewLink(l));
        m
    }

    fn neighbour(address: &str) -> DesiredNeighbour {
        DesiredNeighbour {
            name: "n".into(),
            mode: Mode::Enforce,
            device: "flannel.1".into(),
            address: address.parse().unwrap(),
            lladdr: "0a:58:0a:f4:02:00".parse().unwrap(),
            state: NeighbourState::Permanent,
        }
    }

    fn fdb(mac: &str, dst: &str) -> DesiredFdb {
        DesiredFdb {
            name: "f".into(),
            mode: Mode::Enforce,
            device: "flannel.1".into(),
            lladdr: mac.parse().unwrap(),
            dst: dst.parse().unwrap(),
            vni: None,
        }
    }

    #[test]
    fn only_protected_neighbours_are_kept() {
        let mut m = mirror_with_link();
        let ours = neighbour("10.244.2.0");
        m.set_neighbour_interest(NeighbourInterest {
            neighbours: [ours.id()].into_iter().collect(),
            ..Default::default()
        });
        let add = |n: &DesiredNeighbour| M::NewNeighbour(encode::neighbour(n, 7));
        assert_eq!(m.ingest(&add(&neighbour("10.244.3.0"))), Change::Nothing);
        assert_eq!(
            m.ingest(&add(&ours)),
            Change::Neighbour {
                id: ours.id(),
                removed: false
            }
        );
        assert_eq!(m.neighbour(7, ours.address).unwrap().state, NUD_PERMANENT);
        assert_eq!(m.len(), 2, "the link and one entry");
        m.ingest(&M::DelNeighbour(encode::neighbour(&ours, 7)));
        assert!(m.neighbour(7, ours.address).is_none());
        // A device's removal takes its entries along.
        m.ingest(&add(&ours));
        let mut l = LinkMessage::default();
        l.header.index = 7;
        m.ingest(&M::DelLink(l));
        assert!(m.neighbour(7, ours.address).is_none());
    }

    #[test]
    fn a_unicast_fdb_entry_has_one_remote_a_flood_entry_a_list() {
        let mut m = mirror_with_link();
        let a = fdb("0a:58:0a:f4:02:00", "192.168.1.12");
        let b = fdb("0a:58:0a:f4:02:00", "192.168.1.13");
        let f1 = fdb("00:00:00:00:00:00", "192.168.1.12");
        let f2 = fdb("00:00:00:00:00:00", "192.168.1.13");
        m.set_neighbour_interest(NeighbourInterest {
            fdb: [a.id(), f1.id(), f2.id()].into_iter().collect(),
            ..Default::default()
        });
        let add = |f: &DesiredFdb| M::NewNeighbour(encode::fdb(f, 7));
        m.ingest(&add(&a));
        m.ingest(&add(&b));
        assert_eq!(m.fdb(7, &a.id()).len(), 1, "replaced in place");
        assert_eq!(m.fdb(7, &a.id())[0].dst, Some(b.dst));
        m.ingest(&add(&f1));
        m.ingest(&add(&f2));
        assert_eq!(m.fdb(7, &f1.id()).len(), 1);
        assert_eq!(m.fdb(7, &f2.id()).len(), 1);
        m.ingest(&M::DelNeighbour(encode::fdb(&f1, 7)));
        assert!(m.fdb(7, &f1.id()).is_empty());
        assert_eq!(m.fdb(7, &f2.id()).len(), 1);
    }

    #[test]
    fn settings_follow_netconf_reads_and_the_agents_writes() {
        let mut m = mirror_with_link();
        let rp = Setting::find(Family::Ipv4, "rp_filter").unwrap();
        let key = SysctlKey {
            scope: Scope::Device("flannel.1".into()),
            setting: rp,
        };
        assert_eq!(m.sysctl(&key), None);
        let n = Netconf {
            family: Family::Ipv4,
            ifindex: 7,
            values: vec![(rp, 2)],
        };
        assert_eq!(
            m.ingest_netconf(&n),
            Change::Sysctl {
                family: Family::Ipv4,
                ifindex: 7
            }
        );
        assert_eq!(m.sysctl(&key), Some(2));
        assert_eq!(m.set_sysctl(&key, 2), Change::Nothing, "unchanged");
        assert_ne!(m.set_sysctl(&key, 0), Change::Nothing);
        assert_eq!(m.sysctl(&key), Some(0));
        assert_eq!(m.sysctl_scope(7), Some(Scope::Device("flannel.1".into())));
        assert_eq!(m.sysctl_scope(IFINDEX_ALL), Some(Scope::All));
        let gone = SysctlKey {
            scope: Scope::Device("eth9".into()),
            setting: rp,
        };
        assert_eq!(m.set_sysctl(&gone, 1), Change::Nothing);
    }

    #[test]
    fn the_agents_set_link_updates_state_and_mtu() {
        let mut m = mirror_with_link();
        m.ingest(&M::SetLink(encode::set_link(7, true, Some(1400))));
        let l = m.link(7).unwrap();
        assert!(l.up);
        assert_eq!(l.mtu, Some(1400));
        m.ingest(&M::SetLink(encode::set_link(7, false, None)));
        assert!(
            m.link(7).unwrap().up,
            "a request without the flag changes nothing"
        );
    }
}
