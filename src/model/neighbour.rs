//! Neighbour entries (`ip neigh`: ARP and NDP) and forwarding database entries of VXLAN
//! devices (`bridge fdb … self`), as flannel's and Calico's VXLAN backends install them: for
//! every other node, a permanent neighbour entry (its VTEP address → its VTEP MAC) and an FDB
//! entry (that MAC → the node's address).
//!
//! Identity, as the kernel keeps them:
//! - a neighbour entry: the device and the neighbour's address (the neighbour table's key); the
//!   link-layer address and the state are attributes (`ip neigh replace` changes them in place);
//! - an FDB entry of a unicast MAC: the device and the MAC. A VXLAN device keeps one remote per
//!   unicast MAC and `bridge fdb replace` changes its `dst` in place, so `dst` and `vni` are
//!   attributes. For the all-zeros MAC (and multicast MACs) the device keeps a list of remotes,
//!   each added with `bridge fdb append`: there `dst` is part of the identity.

use super::{Family, Mode};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// NUD_NOARP and NUD_PERMANENT (`ndm_state`).
pub const NUD_NOARP: u16 = 0x40;
pub const NUD_PERMANENT: u16 = 0x80;

/// An Ethernet (EUI-48) link-layer address: what VXLAN devices and their neighbours use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// The all-zeros MAC and multicast MACs: a VXLAN device keeps several remotes for them.
    pub fn has_many_remotes(&self) -> bool {
        self.0 == [0; 6] || self.0[0] & 1 == 1
    }

    pub fn from_bytes(b: &[u8]) -> Option<Mac> {
        Some(Mac(b.try_into().ok()?))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for Mac {
    type Err = ();

    /// Six hexadecimal octets separated by `:` (or `-`), as `ip` prints them.
    fn from_str(s: &str) -> Result<Mac, ()> {
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(());
        }
        let mut out = [0u8; 6];
        for (o, p) in out.iter_mut().zip(parts) {
            if p.is_empty() || p.len() > 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| ())?;
        }
        Ok(Mac(out))
    }
}

/// The state a protected neighbour entry is kept in: entries in any other state (reachable,
/// stale, …) are the kernel's cache, aged out and replaced on their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NeighbourState {
    Permanent,
    Noarp,
}

impl NeighbourState {
    pub fn bits(self) -> u16 {
        match self {
            NeighbourState::Permanent => NUD_PERMANENT,
            NeighbourState::Noarp => NUD_NOARP,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            NeighbourState::Permanent => "permanent",
            NeighbourState::Noarp => "noarp",
        }
    }
}

/// The `ip neigh` name of a state (`ndm_state`).
pub fn state_name(bits: u16) -> String {
    match bits {
        0x00 => "none".into(),
        0x01 => "incomplete".into(),
        0x02 => "reachable".into(),
        0x04 => "stale".into(),
        0x08 => "delay".into(),
        0x10 => "probe".into(),
        0x20 => "failed".into(),
        NUD_NOARP => "noarp".into(),
        NUD_PERMANENT => "permanent".into(),
        n => format!("state {n:#x}"),
    }
}

/// Identity of a protected neighbour entry (the device is a name: it may not exist yet).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct NeighbourId {
    pub device: String,
    pub address: IpAddr,
}

/// A neighbour entry the config protects.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DesiredNeighbour {
    pub name: String,
    pub mode: Mode,
    pub device: String,
    pub address: IpAddr,
    pub lladdr: Mac,
    pub state: NeighbourState,
}

/// A neighbour entry as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedNeighbour {
    /// Absent while the entry has none (incomplete, failed).
    pub lladdr: Option<Vec<u8>>,
    pub state: u16,
}

impl DesiredNeighbour {
    pub fn id(&self) -> NeighbourId {
        NeighbourId {
            device: self.device.clone(),
            address: self.address,
        }
    }

    pub fn family(&self) -> Family {
        Family::of(&self.address)
    }

    /// The link-layer address and the state are compared: an entry with the right address in a
    /// cache state would be aged out by the kernel.
    pub fn matches(&self, o: &ObservedNeighbour) -> bool {
        o.state == self.state.bits() && o.lladdr.as_deref() == Some(&self.lladdr.0[..])
    }

    pub fn describe(&self) -> String {
        format!(
            "{} lladdr {} dev {} {}",
            self.address,
            self.lladdr,
            self.device,
            self.state.name()
        )
    }
}

impl ObservedNeighbour {
    pub fn describe(&self) -> String {
        let lladdr = match self.lladdr.as_deref().and_then(Mac::from_bytes) {
            Some(m) => m.to_string(),
            None if self.lladdr.is_some() => "(not an Ethernet address)".into(),
            None => "none".into(),
        };
        format!("lladdr {lladdr} {}", state_name(self.state))
    }
}

/// Identity of a protected FDB entry: `dst` only for MACs that hold several remotes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct FdbId {
    pub device: String,
    pub lladdr: Mac,
    pub dst: Option<IpAddr>,
}

impl FdbId {
    pub fn new(device: String, lladdr: Mac, dst: IpAddr) -> FdbId {
        FdbId {
            device,
            lladdr,
            dst: lladdr.has_many_remotes().then_some(dst),
        }
    }
}

/// A forwarding database entry of a VXLAN device that the config protects.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DesiredFdb {
    pub name: String,
    pub mode: Mode,
    pub device: String,
    pub lladdr: Mac,
    /// The remote VTEP (the other node's address).
    pub dst: IpAddr,
    /// Compared only when given.
    pub vni: Option<u32>,
}

/// One remote of an FDB entry as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedFdb {
    pub dst: Option<IpAddr>,
    /// Only when it differs from the device's own VNI (the kernel leaves it out otherwise).
    pub vni: Option<u32>,
    pub state: u16,
}

impl DesiredFdb {
    pub fn id(&self) -> FdbId {
        FdbId::new(self.device.clone(), self.lladdr, self.dst)
    }

    /// `device_vni`: the VXLAN device's own VNI, which a remote without one uses.
    pub fn matches(&self, o: &ObservedFdb, device_vni: Option<u32>) -> bool {
        o.dst == Some(self.dst) && self.vni.is_none_or(|v| o.vni.or(device_vni) == Some(v))
    }

    pub fn describe(&self) -> String {
        let mut s = format!("{} dev {} dst {}", self.lladdr, self.device, self.dst);
        if let Some(v) = self.vni {
            s.push_str(&format!(" vni {v}"));
        }
        s.push_str(" self permanent");
        s
    }
}

impl ObservedFdb {
    pub fn describe(&self) -> String {
        let mut s = match self.dst {
            Some(d) => format!("dst {d}"),
            None => "no dst".to_owned(),
        };
        if let Some(v) = self.vni {
            s.push_str(&format!(" vni {v}"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(s: &str) -> Mac {
        s.parse().unwrap()
    }

    #[test]
    fn macs_parse_and_print_as_ip_does() {
        assert_eq!(mac("0A:58:0a:f4:02:0").to_string(), "0a:58:0a:f4:02:00");
        assert_eq!(mac("02-00-00-00-00-01"), mac("02:00:00:00:00:01"));
        for bad in [
            "",
            "0a:58:0a:f4:02",
            "0a:58:0a:f4:02:00:01",
            "0g:00:00:00:00:00",
            "000:0:0:0:0:0",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
        assert!(mac("00:00:00:00:00:00").has_many_remotes());
        assert!(mac("01:00:5e:00:00:01").has_many_remotes());
        assert!(!mac("0a:58:0a:f4:02:00").has_many_remotes());
    }

    #[test]
    fn the_remote_is_identity_only_for_macs_with_many_remotes() {
        let dst: IpAddr = "192.168.1.12".parse().unwrap();
        let unicast = FdbId::new("flannel.1".into(), mac("0a:58:0a:f4:02:00"), dst);
        assert_eq!(unicast.dst, None);
        let flood = FdbId::new("vx0".into(), mac("00:00:00:00:00:00"), dst);
        assert_eq!(flood.dst, Some(dst));
    }

    #[test]
    fn fdb_vni_is_compared_against_the_device_default_when_absent() {
        let d = DesiredFdb {
            name: "f".into(),
            mode: Mode::Enforce,
            device: "vx0".into(),
            lladdr: mac("0a:58:0a:f4:02:00"),
            dst: "192.168.1.12".parse().unwrap(),
            vni: Some(1),
        };
        let o = ObservedFdb {
            dst: Some(d.dst),
            vni: None,
            state: NUD_PERMANENT | NUD_NOARP,
        };
        assert!(d.matches(&o, Some(1)));
        assert!(!d.matches(&o, Some(2)));
        assert!(d.matches(
            &ObservedFdb {
                vni: Some(1),
                ..o.clone()
            },
            Some(2)
        ));
        let other = ObservedFdb {
            dst: Some("192.168.1.13".parse().unwrap()),
            ..o.clone()
        };
        assert!(!d.matches(&other, Some(1)));
        assert!(DesiredFdb { vni: None, ..d }.matches(&o, None));
    }

    #[test]
    fn neighbours_compare_lladdr_and_state() {
        let d = DesiredNeighbour {
            name: "n".into(),
            mode: Mode::Enforce,
            device: "flannel.1".into(),
            address: "10.244.2.0".parse().unwrap(),
            lladdr: mac("0a:58:0a:f4:02:00"),
            state: NeighbourState::Permanent,
        };
        let ok = ObservedNeighbour {
            lladdr: Some(d.lladdr.0.to_vec()),
            state: NUD_PERMANENT,
        };
        assert!(d.matches(&ok));
        assert!(!d.matches(&ObservedNeighbour {
            state: 0x02,
            ..ok.clone()
        }));
        assert!(!d.matches(&ObservedNeighbour {
            lladdr: Some(vec![0; 6]),
            ..ok.clone()
        }));
        assert!(!d.matches(&ObservedNeighbour {
            lladdr: None,
            state: 0x20
        }));
        assert_eq!(
            ObservedNeighbour {
                lladdr: None,
                state: 0x20
            }
            .describe(),
            "lladdr none failed"
        );
        assert_eq!(
            d.describe(),
            "10.244.2.0 lladdr 0a:58:0a:f4:02:00 dev flannel.1 permanent"
        );
    }
}
