//! `spec.neighbours`, `spec.links` and `spec.sysctls`: the node state beside rules, routes and
//! addresses. Checked like every other kind: each value on its own, every problem reported with
//! its position, two entries for one kernel object refused. Templates are not expanded in these
//! kinds (their values do not come from cluster facts), so a template here is an error.

use super::build::{Builder, Object};
use super::raw::{RawLink, RawNeighbour, RawNeighbourSelector, RawSpec, RawSysctl, Scalar};
use super::values;
use crate::model::neighbour::NeighbourState;
use crate::model::sysctl::{parse_key, DeviceSel, Scope, SysctlKey};
use crate::model::{
    DesiredFdb, DesiredLink, DesiredNeighbour, DesiredSysctl, FdbId, Mac, Mode, NeighbourId,
};
use std::collections::HashMap;

/// Smallest and largest MTU a link can be given (IPv4's minimum; the kernel checks each
/// device's own limits and refuses the rest).
const LINK_MTU_MIN: u32 = 68;
const LINK_MTU_MAX: u32 = 65535;
/// VXLAN network identifiers are 24 bits.
const VNI_MAX: u64 = (1 << 24) - 1;

/// The node state of a config.
#[derive(Default)]
pub(super) struct NodeState {
    pub neighbours: Vec<DesiredNeighbour>,
    pub fdb: Vec<DesiredFdb>,
    pub links: Vec<DesiredLink>,
    pub sysctls: Vec<DesiredSysctl>,
}

/// An interface name, or a pattern: a prefix ending in `*` (`cni*`; `*` alone: every link).
fn device_or_pattern(s: &str) -> Result<String, String> {
    match s.strip_suffix('*') {
        Some("") => Ok(s.to_owned()),
        Some(prefix) => values::ifname(prefix)
            .map(|_| s.to_owned())
            .map_err(|e| format!("{e} (a pattern is a device name prefix ending in `*`)")),
        None => values::ifname(s),
    }
}

fn lladdr(s: &str) -> Result<Mac, String> {
    s.parse::<Mac>().map_err(|()| {
        format!("`{s}` is not a link-layer address: write six hexadecimal octets, e.g. 0a:58:0a:f4:02:00")
    })
}

fn neighbour_state(s: &str) -> Result<NeighbourState, String> {
    match s {
        "permanent" => Ok(NeighbourState::Permanent),
        "noarp" => Ok(NeighbourState::Noarp),
        _ => Err(format!(
            "unknown state `{s}`: use permanent or noarp (other states are the kernel's cache)"
        )),
    }
}

/// What neighbour and FDB entries have in common, as checked.
struct Common {
    name: Option<String>,
    mode: Mode,
    device: Option<String>,
    lladdr: Option<Mac>,
}

impl Builder<'_> {
    pub(super) fn node_state(&mut self, spec: &RawSpec, global: Mode) -> NodeState {
        let mut out = NodeState::default();
        let mut neighbour_keys: HashMap<NeighbourId, (String, u64)> = HashMap::new();
        let mut fdb_keys: HashMap<FdbId, (String, u64)> = HashMap::new();
        for (i, item) in spec.neighbours.iter().flatten().enumerate() {
            let obj = Object {
                at: item.referenced,
                path: format!("spec.neighbours[{i}]"),
            };
            match self.neighbour(&obj, &item.value, global) {
                Some(Entry::Neighbour(n)) => {
                    let what = || format!("{} dev {}", n.address, n.device);
                    self.unique_identity(
                        &mut neighbour_keys,
                        n.id(),
                        &n.name,
                        &obj,
                        "neighbour",
                        what,
                    );
                    out.neighbours.push(n);
                }
                Some(Entry::Fdb(f)) => {
                    let id = f.id();
                    let what = || match id.dst {
                        Some(d) => format!("{} dev {} dst {d}", id.lladdr, id.device),
                        None => format!(
                            "{} dev {} (one remote per unicast MAC)",
                            id.lladdr, id.device
                        ),
                    };
                    self.unique_identity(&mut fdb_keys, f.id(), &f.name, &obj, "FDB entry", what);
                    out.fdb.push(f);
                }
                None => {}
            }
        }
        let mut link_keys: HashMap<String, (String, u64)> = HashMap::new();
        for (i, item) in spec.links.iter().flatten().enumerate() {
            let obj = Object {
                at: item.referenced,
                path: format!("spec.links[{i}]"),
            };
            if let Some(l) = self.link(&obj, &item.value, global) {
                let what = || l.device.clone();
                self.unique_identity(
                    &mut link_keys,
                    l.device.clone(),
                    &l.name,
                    &obj,
                    "link",
                    what,
                );
                out.links.push(l);
            }
        }
        let mut sysctl_keys: HashMap<SysctlKey, (String, u64)> = HashMap::new();
        for (i, item) in spec.sysctls.iter().flatten().enumerate() {
            let obj = Object {
                at: item.referenced,
                path: format!("spec.sysctls[{i}]"),
            };
            if let Some(s) = self.sysctl(&obj, &item.value, global) {
                let what = || s.key.to_string();
                self.unique_identity(
                    &mut sysctl_keys,
                    s.key.clone(),
                    &s.name,
                    &obj,
                    "setting",
                    what,
                );
                out.sysctls.push(s);
            }
        }
        out
    }

    /// `spec.adopt[].neighbours`: the devices whose entries are adopted.
    pub(super) fn neighbour_selector(
        &mut self,
        obj: &Object,
        raw: &serde_saphyr::Spanned<RawNeighbourSelector>,
    ) -> Option<crate::adopt::NeighbourSelector> {
        let path = obj.field("neighbours");
        let mut devices = Vec::new();
        let mut ok = true;
        for (j, d) in raw.value.devices.iter().flatten().enumerate() {
            match self.opt(d, format!("{path}.devices[{j}]"), device_or_pattern) {
                Some(d) => devices.push(d),
                None => ok = false,
            }
        }
        if raw.value.devices.as_ref().is_none_or(Vec::is_empty) {
            self.error(
                raw.referenced,
                format!("{path}.devices"),
                "is required: name the devices whose entries are adopted (e.g. flannel.1)",
            );
            ok = false;
        }
        ok.then_some(crate::adopt::NeighbourSelector { devices })
    }

    /// Templates are not expanded in these kinds: each one found is an error.
    fn no_templates(&mut self, obj: &Object, fields: &[(&str, &Scalar)]) {
        self.scan(obj, &[], fields);
    }

    fn neighbour(&mut self, obj: &Object, r: &RawNeighbour, global: Mode) -> Option<Entry> {
        let before = self.errors.len();
        self.no_templates(
            obj,
            &[
                ("device", &r.device),
                ("address", &r.address),
                ("lladdr", &r.lladdr),
                ("dst", &r.dst),
            ],
        );
        let name = self.name(&r.name, obj);
        let mode = self
            .opt(&r.mode, obj.field("mode"), values::mode)
            .unwrap_or(global);
        let device = self.req(&r.device, obj, "device", values::ifname);
        let lladdr = self.req(&r.lladdr, obj, "lladdr", lladdr);
        let common = Common {
            name,
            mode,
            device,
            lladdr,
        };
        match (&r.address, &r.dst) {
            (Some(_), None) => self.neighbour_entry(obj, r, before, common),
            (None, Some(_)) => self.fdb_entry(obj, r, before, common),
            (Some(_), Some(_)) => {
                self.error(
                    obj.at,
                    obj.path.clone(),
                    "give `address` (a neighbour entry, `ip neigh`) or `dst` (an FDB entry of a VXLAN device, `bridge fdb`), not both",
                );
                None
            }
            (None, None) => {
                self.error(
                    obj.at,
                    obj.path.clone(),
                    "needs `address` (a neighbour entry, `ip neigh`) or `dst` (an FDB entry of a VXLAN device, `bridge fdb`)",
                );
                None
            }
        }
    }

    /// A neighbour entry (`address`): its state, and no `vni`. `before`: the error count
    /// before the entry was checked.
    fn neighbour_entry(
        &mut self,
        obj: &Object,
        r: &RawNeighbour,
        before: usize,
        common: Common,
    ) -> Option<Entry> {
        let address = self.req(&r.address, obj, "address", values::address);
        let state = self
            .opt(&r.state, obj.field("state"), neighbour_state)
            .unwrap_or(NeighbourState::Permanent);
        if let Some(v) = &r.vni {
            self.error(
                v.referenced,
                obj.field("vni"),
                "`vni` belongs to an FDB entry (with `dst`), not to a neighbour entry",
            );
        }
        if self.errors.len() != before {
            return None;
        }
        Some(Entry::Neighbour(DesiredNeighbour {
            name: common.name?,
            mode: common.mode,
            device: common.device?,
            address: address?,
            lladdr: common.lladdr?,
            state,
        }))
    }

    /// An FDB entry (`dst`): its VNI, and no `state` (always permanent).
    fn fdb_entry(
        &mut self,
        obj: &Object,
        r: &RawNeighbour,
        before: usize,
        common: Common,
    ) -> Option<Entry> {
        let dst = self.req(&r.dst, obj, "dst", values::address);
        let vni = self.opt(&r.vni, obj.field("vni"), |s| {
            values::uint(s, 0, VNI_MAX, false).map(|v| v as u32)
        });
        if let Some(s) = &r.state {
            self.error(
                s.referenced,
                obj.field("state"),
                "FDB entries are always added `permanent`: remove `state`",
            );
        }
        if self.errors.len() != before {
            return None;
        }
        Some(Entry::Fdb(DesiredFdb {
            name: common.name?,
            mode: common.mode,
            device: common.device?,
            lladdr: common.lladdr?,
            dst: dst?,
            vni,
        }))
    }

    fn link(&mut self, obj: &Object, r: &RawLink, global: Mode) -> Option<DesiredLink> {
        let before = self.errors.len();
        self.no_templates(obj, &[("device", &r.device)]);
        let name = self.name(&r.name, obj);
        let mode = self
            .opt(&r.mode, obj.field("mode"), values::mode)
            .unwrap_or(global);
        let device = self.req(&r.device, obj, "device", device_or_pattern);
        let up = self.opt(&r.up, obj.field("up"), values::boolean);
        if let (Some(false), Some(raw)) = (up, &r.up) {
            self.error(
                raw.referenced,
                obj.field("up"),
                "`up: false` is not supported: netwarden brings links up, it never takes one down (leave `up` out to not compare the state)",
            );
        }
        let mtu = self.opt(&r.mtu, obj.field("mtu"), |s| {
            values::uint(s, LINK_MTU_MIN.into(), LINK_MTU_MAX.into(), false).map(|v| v as u32)
        });
        if r.up.is_none() && r.mtu.is_none() {
            self.error(
                obj.at,
                obj.path.clone(),
                "needs `up: true`, `mtu` or both: nothing to protect",
            );
        }
        if self.errors.len() != before {
            return None;
        }
        Some(DesiredLink {
            name: name?,
            mode,
            device: device?,
            up: up.unwrap_or(false),
            mtu,
            pattern: None,
        })
    }

    fn sysctl(&mut self, obj: &Object, r: &RawSysctl, global: Mode) -> Option<DesiredSysctl> {
        let before = self.errors.len();
        self.no_templates(obj, &[("key", &r.key), ("value", &r.value)]);
        let name = self.name(&r.name, obj);
        let mode = self
            .opt(&r.mode, obj.field("mode"), values::mode)
            .unwrap_or(global);
        let key = self.req(&r.key, obj, "key", |s| {
            parse_key(s, |d| device_or_pattern(d).map(|_| ()))
        });
        let value = match &key {
            Some((_, setting)) => {
                let max = setting.info().max;
                self.req(&r.value, obj, "value", |s| {
                    values::uint(s, 0, max.into(), false)
                        .map(|v| v as u32)
                        .map_err(|e| format!("{e} for {}", setting.name()))
                })
            }
            // Without a known setting the value is still checked as far as it can be.
            None => self.req(&r.value, obj, "value", |s| {
                values::uint(s, 0, u32::MAX.into(), false).map(|v| v as u32)
            }),
        };
        if self.errors.len() != before {
            return None;
        }
        let (sel, setting) = key?;
        let scope = match sel {
            DeviceSel::All => Scope::All,
            DeviceSel::Default => Scope::Default,
            DeviceSel::Device(d) | DeviceSel::Pattern(d) => Scope::Device(d),
        };
        Some(DesiredSysctl {
            name: name?,
            mode,
            key: SysctlKey { scope, setting },
            value: value?,
            pattern: None,
        })
    }
}

enum Entry {
    Neighbour(DesiredNeighbour),
    Fdb(DesiredFdb),
}

#[cfg(test)]
mod tests {
    use crate::config::parse;
    use crate::model::neighbour::NeighbourState;
    use crate::model::sysctl::Scope;
    use crate::model::{Family, Mode};

    fn spec(body: &str) -> Result<crate::config::Config, String> {
        parse(
            "t.yaml",
            &format!("apiVersion: netwarden.io/v1alpha1\nkind: ProtectedState\nspec:\n{body}"),
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn every_field_of_the_node_state_kinds() {
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/configs/valid/full.yaml"),
        )
        .unwrap();
        let c = parse("full.yaml", &text).unwrap();
        let [n] = &c.neighbours[..] else {
            panic!("{:?}", c.neighbours)
        };
        assert_eq!(
            (n.device.as_str(), n.address.to_string(), n.state),
            ("flannel.1", "10.244.2.0".into(), NeighbourState::Permanent)
        );
        assert_eq!(n.lladdr.to_string(), "0a:58:0a:f4:02:00");
        let [f] = &c.fdb[..] else {
            panic!("{:?}", c.fdb)
        };
        assert_eq!((f.vni, f.mode), (Some(1), Mode::Observe));
        assert_eq!(f.dst.to_string(), "192.168.1.12");
        assert_eq!(c.links.len(), 2);
        assert!(c.links[0].up && c.links[0].mtu == Some(1450));
        assert!(!c.links[1].up && c.links[1].device == "veth*");
        let keys: Vec<String> = c.sysctls.iter().map(|s| s.key.to_string()).collect();
        assert_eq!(
            keys,
            [
                "net.ipv4.conf.all.forwarding",
                "net.ipv4.conf.veth*.rp_filter",
                "net.ipv6.conf.default.forwarding"
            ]
        );
        assert_eq!(c.sysctls[2].key.setting.family(), Family::Ipv6);
        assert_eq!(c.sysctls[2].key.scope, Scope::Default);
        assert_eq!(c.sysctls[2].mode, Mode::Observe);
        // The desired state keeps pattern entries aside.
        let d = crate::desired::DesiredState::from_config(&c);
        assert_eq!((d.links.len(), d.link_patterns.len()), (1, 1));
        assert_eq!((d.sysctls.len(), d.sysctl_patterns.len()), (2, 1));
        assert_eq!(d.poll, c.poll_interval);
    }

    #[test]
    fn every_problem_of_an_entry_is_reported() {
        let err = spec(
            "  neighbours:\n    - name: n\n      device: a/b\n      address: 10.0.0.300\n      lladdr: x\n      vni: 7\n",
        )
        .unwrap_err();
        for want in [
            "t.yaml:6:15: spec.neighbours[0].device: `a/b` is not a valid interface name",
            "t.yaml:7:16: spec.neighbours[0].address:",
            "t.yaml:8:15: spec.neighbours[0].lladdr: `x` is not a link-layer address",
            "t.yaml:9:12: spec.neighbours[0].vni: `vni` belongs to an FDB entry",
        ] {
            assert!(err.contains(want), "{want}\n{err}");
        }
        let err = spec(
            "  neighbours:\n    - name: n\n      device: vx0\n      lladdr: 0a:58:0a:f4:02:00\n",
        )
        .unwrap_err();
        assert!(err.contains("spec.neighbours[0]: needs `address`"), "{err}");
        let err = spec("  sysctls:\n    - name: s\n      key: net.ipv4.conf.all.forwarding\n")
            .unwrap_err();
        assert!(err.contains("spec.sysctls[0].value: is required"), "{err}");
        let err = spec("  links:\n    - name: l\n      device: eth0\n      mtu: 67\n").unwrap_err();
        assert!(err.contains("must be between 68 and 65535"), "{err}");
        // Two patterns for one device are fine (the first wins); one pattern twice is not.
        let ok = spec("  links:\n    - {name: a, device: \"c*\", mtu: 1400}\n    - {name: b, device: \"*\", mtu: 1500}\n");
        assert!(ok.is_ok(), "{ok:?}");
        let err = spec("  links:\n    - {name: a, device: \"c*\", mtu: 1400}\n    - {name: b, device: \"c*\", up: true}\n").unwrap_err();
        assert!(err.contains("protects the same link as `a`"), "{err}");
    }

    #[test]
    fn adopt_selectors_name_the_devices_of_neighbour_entries() {
        let c = spec("  adopt:\n    - name: flannel\n      neighbours:\n        devices: [flannel.1, \"vxlan*\"]\n      owners: [flanneld]\n").unwrap();
        let n = c.adopt[0].neighbours.as_ref().unwrap();
        assert!(n.matches("flannel.1") && n.matches("vxlan.calico") && !n.matches("eth0"));
        let err = spec("  adopt:\n    - name: flannel\n      neighbours: {devices: []}\n      owners: [flanneld]\n").unwrap_err();
        assert!(
            err.contains("spec.adopt[0].neighbours.devices: is required"),
            "{err}"
        );
        let err = spec("  adopt:\n    - name: flannel\n      neighbours: {devices: [\"a b\"]}\n      owners: [flanneld]\n").unwrap_err();
        assert!(err.contains("spec.adopt[0].neighbours.devices[0]"), "{err}");
    }

    #[test]
    fn flood_entries_are_one_per_remote() {
        let two = "  neighbours:\n    - {name: a, device: vx0, lladdr: \"00:00:00:00:00:00\", dst: 10.0.0.1}\n    - {name: b, device: vx0, lladdr: \"00:00:00:00:00:00\", dst: 10.0.0.2}\n";
        let c = spec(two).unwrap();
        assert_eq!(c.fdb.len(), 2);
        let same = two.replace("10.0.0.2", "10.0.0.1");
        let err = spec(&same).unwrap_err();
        assert!(
            err.contains("00:00:00:00:00:00 dev vx0 dst 10.0.0.1"),
            "{err}"
        );
    }
}
