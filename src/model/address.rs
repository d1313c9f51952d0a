//! Interface addresses (`ip address`).

use super::{Family, Mode};
use serde::Serialize;
use std::net::IpAddr;

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

/// Attributes of an address as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ObservedAddress {
    pub prefix_len: u8,
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
}

impl DesiredAddress {
    pub fn family(&self) -> Family {
        Family::of(&self.address)
    }

    pub fn describe(&self) -> String {
        format!("{}/{} dev {}", self.address, self.prefix_len, self.device)
    }
}
