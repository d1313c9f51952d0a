//! Adopted neighbour and FDB entries carried into a desired state: after a reload (from the
//! config before it) and at start (from the adopted-state file). One rule for both, so that a
//! restart keeps exactly what a reload would. Pure.

use super::DesiredState;
use crate::model::fast::HashMap;
use crate::model::{DesiredFdb, DesiredNeighbour, FdbId, NeighbourId, ObjectId};

impl DesiredState {
    /// Protects again the adopted entries of `adopted` (by the name of the selector that adopted
    /// them), as `neighbours` and `fdb` hold them, while a selector of the same name still covers
    /// their device, also those missing from the kernel right now (they are to be repaired).
    /// Named and moded by that selector. Entries this state names itself (the config wins), or
    /// of which `neighbours`/`fdb` hold no copy, are left out. Returns the entries kept, by
    /// selector.
    pub fn keep_adopted_node(
        &mut self,
        adopted: impl IntoIterator<Item = (ObjectId, String)>,
        neighbours: &HashMap<NeighbourId, DesiredNeighbour>,
        fdb: &HashMap<FdbId, DesiredFdb>,
    ) -> HashMap<ObjectId, String> {
        let mut kept = HashMap::default();
        for (id, selector) in adopted {
            if self.protects(&id) {
                continue; // the config names it itself
            }
            let Some(sel) = self.adopt.iter().find(|s| s.name == selector) else {
                continue;
            };
            match &id {
                ObjectId::Neighbour(n) => {
                    let Some(e) = neighbours.get(n).and_then(|e| sel.readopt_neighbour(e)) else {
                        continue;
                    };
                    self.neighbours.insert(n.clone(), e);
                }
                ObjectId::Fdb(f) => {
                    let Some(e) = fdb.get(f).and_then(|e| sel.readopt_fdb(e)) else {
                        continue;
                    };
                    self.fdb.insert(f.clone(), e);
                }
                _ => continue,
            }
            kept.insert(id, selector);
        }
        kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adopt::{AdoptSelector, NeighbourSelector, UnknownActor};
    use crate::model::neighbour::NeighbourState;
    use crate::model::{Mac, Mode};

    fn selector(name: &str, mode: Mode, devices: &[&str]) -> AdoptSelector {
        AdoptSelector {
            name: name.into(),
            mode,
            rules: None,
            routes: None,
            chains: None,
            ipsets: None,
            neighbours: Some(NeighbourSelector {
                devices: devices.iter().map(|d| d.to_string()).collect(),
            }),
            owners: vec!["flanneld".into()],
            unknown_actor: UnknownActor::Restore,
            pod_liveness: None,
        }
    }

    const MAC: Mac = Mac([0x0a, 0x58, 0x0a, 0xf4, 0x02, 0x00]);

    fn neighbour(device: &str, address: &str) -> DesiredNeighbour {
        DesiredNeighbour {
            name: format!("adopted:flannel/{device}/{address}"),
            mode: Mode::Observe,
            device: device.into(),
            address: address.parse().unwrap(),
            lladdr: MAC,
            state: NeighbourState::Permanent,
        }
    }

    fn fdb(device: &str) -> DesiredFdb {
        DesiredFdb {
            name: format!("adopted:flannel/{device}/{MAC}"),
            mode: Mode::Observe,
            device: device.into(),
            lladdr: MAC,
            dst: "192.168.1.12".parse().unwrap(),
            vni: Some(1),
        }
    }

    type Before = (
        Vec<(ObjectId, String)>,
        HashMap<NeighbourId, DesiredNeighbour>,
        HashMap<FdbId, DesiredFdb>,
    );

    /// The entries of flannel.1 and vxlan.calico as adopted by `flannel`, and what they were.
    fn before() -> Before {
        let n1 = neighbour("flannel.1", "10.244.2.0");
        let n2 = neighbour("vxlan.calico", "10.244.3.0");
        let f1 = fdb("flannel.1");
        let adopted = vec![
            (ObjectId::Neighbour(n1.id()), "flannel".to_owned()),
            (ObjectId::Neighbour(n2.id()), "flannel".to_owned()),
            (ObjectId::Fdb(f1.id()), "flannel".to_owned()),
        ];
        let neighbours = [n1, n2].into_iter().map(|n| (n.id(), n)).collect();
        let fdb = [(f1.id(), f1)].into_iter().collect();
        (adopted, neighbours, fdb)
    }

    fn with(selectors: Vec<AdoptSelector>) -> DesiredState {
        DesiredState {
            adopt: selectors,
            ..Default::default()
        }
    }

    #[test]
    fn entries_stay_while_their_selector_covers_their_device_renamed_and_moded_by_it() {
        let (adopted, mut neighbours, fdb) = before();
        // A name from the file goes nowhere: the selector names the entry.
        for n in neighbours.values_mut() {
            n.name = "forged\nline".into();
        }
        let mut d = with(vec![selector(
            "flannel",
            Mode::Enforce,
            &["flannel.1", "vxlan*"],
        )]);
        let kept = d.keep_adopted_node(adopted, &neighbours, &fdb);
        assert_eq!(kept.len(), 3);
        assert_eq!((d.neighbours.len(), d.fdb.len()), (2, 1));
        assert!(d.neighbours.values().all(|n| n.mode == Mode::Enforce));
        let n = &d.neighbours[&neighbour("flannel.1", "10.244.2.0").id()];
        assert_eq!(n.name, "adopted:flannel/flannel.1/10.244.2.0");
        assert!(d.fdb.values().all(|f| f.mode == Mode::Enforce));
        // As it was seen otherwise: MAC, remote and VNI.
        let f = d.fdb.values().next().unwrap();
        assert_eq!((f.lladdr, f.vni), (MAC, Some(1)));
    }

    #[test]
    fn a_narrowed_renamed_or_removed_selector_lets_its_entries_go() {
        let (adopted, neighbours, fdb) = before();
        // Narrowed to flannel.1: vxlan.calico's entry goes.
        let mut d = with(vec![selector("flannel", Mode::Enforce, &["flannel.1"])]);
        let kept = d.keep_adopted_node(adopted.clone(), &neighbours, &fdb);
        assert_eq!(kept.len(), 2);
        assert!(d.neighbours.keys().all(|n| n.device == "flannel.1"));
        // Another selector covers the devices now: not the one that adopted them, so none
        // (a selector's owners judged entries another adopted).
        let mut d = with(vec![selector("calico", Mode::Enforce, &["*"])]);
        assert!(d
            .keep_adopted_node(adopted.clone(), &neighbours, &fdb)
            .is_empty());
        assert!(d.neighbours.is_empty() && d.fdb.is_empty());
        // No selector at all.
        let mut d = with(vec![]);
        assert!(d.keep_adopted_node(adopted, &neighbours, &fdb).is_empty());
        assert!(d.neighbours.is_empty());
    }

    #[test]
    fn the_config_wins_and_entries_without_a_copy_are_left_out() {
        let (adopted, neighbours, fdb) = before();
        let mut d = with(vec![selector("flannel", Mode::Enforce, &["*"])]);
        // The config names flannel.1's neighbour entry itself (another MAC): it stays the
        // config's, not adopted.
        let own = DesiredNeighbour {
            name: "vtep-node2".into(),
            lladdr: Mac([2, 0, 0, 0, 0, 2]),
            ..neighbour("flannel.1", "10.244.2.0")
        };
        d.neighbours.insert(own.id(), own.clone());
        // No copy of the FDB entry (the config before the reload did not hold it).
        let kept = d.keep_adopted_node(adopted, &neighbours, &HashMap::default());
        assert_eq!(kept.len(), 1);
        assert!(kept.contains_key(&ObjectId::Neighbour(
            neighbour("vxlan.calico", "10.244.3.0").id()
        )));
        assert_eq!(d.neighbours.get(&own.id()), Some(&own));
        assert!(d.fdb.is_empty());
        let _ = fdb;
    }

    #[test]
    fn multicast_neighbour_entries_are_never_kept() {
        let n = neighbour("flannel.1", "ff02::1");
        let adopted = vec![(ObjectId::Neighbour(n.id()), "flannel".to_owned())];
        let neighbours = [(n.id(), n)].into_iter().collect();
        let mut d = with(vec![selector("flannel", Mode::Enforce, &["*"])]);
        assert!(d
            .keep_adopted_node(adopted, &neighbours, &HashMap::default())
            .is_empty());
    }
}
