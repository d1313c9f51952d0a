//! The `[Address]`, `[Route]` and `[RoutingPolicyRule]` sections of a .network file, and
//! `Address=` of `[Network]`, read as systemd 252 reads them.

use super::{unit, Broadcast, ConfAddress, ConfRoute, ConfRule};
use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr};

/// `Address=` as systemd reads it: a prefix length is optional (IPv4 then takes its class's, as
/// systemd 252's `in_addr_prefix_from_string_auto` does; IPv6 /128).
pub(super) fn conf_address(s: &str) -> Option<(IpAddr, u8)> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Some((net.addr(), net.prefix_len()));
    }
    let ip: IpAddr = s.parse().ok()?;
    let len = match ip {
        IpAddr::V4(v4) => match v4.octets()[0] {
            0..=127 => 8,
            128..=191 => 16,
            192..=223 => 24,
            _ => return None,
        },
        IpAddr::V6(_) => 128,
    };
    Some((ip, len))
}

pub(super) fn address_section(block: &[&unit::Entry]) -> Option<ConfAddress> {
    let mut a: Option<(IpAddr, u8)> = None;
    let mut peer = None;
    let mut broadcast = Broadcast::Unset;
    let mut label = None;
    for e in block {
        match e.key.as_str() {
            "Address" => a = conf_address(&e.value),
            "Peer" => peer = conf_address(&e.value).map(|(p, _)| p),
            "Broadcast" => {
                broadcast = match (unit::boolean(&e.value), e.value.parse::<Ipv4Addr>()) {
                    _ if e.value.is_empty() => Broadcast::Unset,
                    (Some(b), _) => Broadcast::Boolean(b),
                    (None, Ok(addr)) => Broadcast::Address(addr),
                    (None, Err(_)) => broadcast,
                }
            }
            "Label" => label = (!e.value.is_empty()).then(|| e.value.clone()),
            _ => {}
        }
    }
    let (address, prefix_len) = a?;
    Some(ConfAddress {
        address,
        prefix_len,
        peer,
        broadcast,
        label,
    })
}

fn table_value(s: &str) -> Option<u32> {
    crate::model::parse_table(s)
}

pub(super) fn route_section(block: &[&unit::Entry]) -> ConfRoute {
    let mut r = ConfRoute {
        destination: None,
        gateway: None,
        table: None,
        metric: None,
    };
    for e in block {
        match e.key.as_str() {
            "Destination" => {
                r.destination = conf_address(&e.value)
                    .and_then(|(a, l)| IpNet::new(a, l).ok())
                    .map(|n| n.trunc())
            }
            "Gateway" => r.gateway = e.value.parse().ok(),
            "Table" => r.table = table_value(&e.value),
            "Metric" => r.metric = e.value.parse().ok(),
            _ => {}
        }
    }
    r
}

pub(super) fn rule_section(block: &[&unit::Entry]) -> ConfRule {
    let mut r = ConfRule {
        priority: None,
        from: None,
        to: None,
        table: None,
        fwmark: None,
        iif: None,
        oif: None,
    };
    let net = |s: &str| {
        conf_address(s)
            .and_then(|(a, l)| IpNet::new(a, l).ok())
            .map(|n| n.trunc())
    };
    for e in block {
        match e.key.as_str() {
            "Priority" => r.priority = e.value.parse().ok(),
            "From" => r.from = net(&e.value),
            "To" => r.to = net(&e.value),
            "Table" => r.table = table_value(&e.value),
            "FirewallMark" => {
                let mark = e.value.split('/').next().unwrap_or_default();
                r.fwmark = match mark.strip_prefix("0x") {
                    Some(hex) => u32::from_str_radix(hex, 16).ok(),
                    None => mark.parse().ok(),
                }
            }
            "IncomingInterface" => r.iif = Some(e.value.clone()),
            "OutgoingInterface" => r.oif = Some(e.value.clone()),
            _ => {}
        }
    }
    r
}
