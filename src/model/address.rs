//! Interface addresses (`ip address`).

use super::{Family, Mode};
use serde::Serialize;
use std::net::{IpAddr, Ipv4Addr};

/// Identity of an address as observed: the interface index and the local address. (IPv6 refuses a
/// second prefix length for the same address; for IPv4 we treat a different prefix length as the
/// same address with a drifted attribute, so a protected address is never kept twice.)
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct AddressKey {
    pub ifindex: u32,
    pub address: IpAddr,
}

/// Identity of a protected address: the device is a name here (it may not exist yet).
pub type DesiredAddressKey = (String, IpAddr);

/// Attributes of an address as the kernel reports it: everything a re-add must give back for the
/// address to be the one its owner made. systemd-networkd, for one, compares the broadcast and
/// label of its configured address with the kernel's; an address put back without them is no
/// longer the one it configured (see docs/operator-guide.md, "Addresses a manager owns").
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ObservedAddress {
    pub prefix_len: u8,
    /// IFA_BROADCAST (IPv4).
    pub broadcast: Option<Ipv4Addr>,
    /// IFA_ADDRESS where it differs from the local address: the peer of a point-to-point address.
    pub peer: Option<IpAddr>,
    /// IFA_LABEL (IPv4; the kernel reports the device name when none was set).
    pub label: Option<String>,
    /// IFA_FLAGS, all of them (the kernel's state flags included).
    pub flags: u32,
    /// The scope (RT_SCOPE_*).
    pub scope: u8,
    /// IFA_PROTO: who added it (Linux 6.1 and later; 0 or absent: unspecified).
    pub protocol: Option<u8>,
    /// IFA_RT_PRIORITY: the metric of the prefix route the kernel adds for it.
    pub route_priority: Option<u32>,
    /// Valid and preferred lifetimes left, in seconds, as last reported (`None`: forever).
    pub valid_lft: Option<u32>,
    pub preferred_lft: Option<u32>,
}

/// The IFA_F_* flags a request may set (the rest are the kernel's own state: permanent,
/// tentative, deprecated, secondary, DAD failed).
pub const SETTABLE_FLAGS: u32 = 0x02 // nodad
    | 0x04 // optimistic
    | 0x10 // homeaddress
    | 0x100 // mngtmpaddr
    | 0x200 // noprefixroute
    | 0x400; // autojoin

/// Lifetime value the kernel uses for "forever".
pub const FOREVER: u32 = u32::MAX;

impl ObservedAddress {
    /// Only the prefix length: an address as configured, when nothing else is known of it.
    pub fn with_prefix(prefix_len: u8) -> ObservedAddress {
        ObservedAddress {
            prefix_len,
            ..ObservedAddress::default()
        }
    }

    /// How `ip address` would show the attributes beyond the prefix length (for logs).
    pub fn describe_extras(&self) -> String {
        let mut s = String::new();
        if let Some(p) = self.peer {
            s.push_str(&format!(" peer {p}"));
        }
        if let Some(b) = self.broadcast {
            s.push_str(&format!(" brd {b}"));
        }
        if self.flags & 0x200 != 0 {
            s.push_str(" noprefixroute");
        }
        if let Some(p) = self.protocol.filter(|p| *p != 0) {
            s.push_str(&format!(" proto {p}"));
        }
        if let Some(v) = self.valid_lft {
            s.push_str(&format!(" valid_lft {v}"));
        }
        s
    }
}

/// An address that the config protects. The device is a name; it is resolved to an index against
/// the links that exist.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DesiredAddress {
    pub name: String,
    pub mode: Mode,
    pub device: String,
    pub address: IpAddr,
    pub prefix_len: u8,
    /// The process that owns the address (`managedBy`): when it removes the address, it gets
    /// the first chance to put it back (see `crate::handoff`).
    pub managed_by: Option<String>,
}

impl DesiredAddress {
    pub fn family(&self) -> Family {
        Family::of(&self.address)
    }

    pub fn describe(&self) -> String {
        format!("{}/{} dev {}", self.address, self.prefix_len, self.device)
    }
}
