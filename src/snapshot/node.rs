//! The snapshot of node state: permanent neighbour entries and VXLAN FDB entries, links, and
//! the forwarding and rp_filter settings, of the devices the selectors pick.

use super::{matches, object_name, q, Names, Selectors};
use crate::model::neighbour::{Mac, NUD_NOARP, NUD_PERMANENT};
use crate::model::sysctl::{Scope, Setting, SysctlKey};
use crate::model::Family;
use crate::observe::kernel::{self, ObserveError};
use crate::observe::mirror::NeighbourInterest;
use crate::observe::Mirror;
use regex_automata::meta::Regex;
use std::fmt::Write;

/// The settings a snapshot protects: the ones the incidents are about.
const SETTINGS: [(Family, &str); 3] = [
    (Family::Ipv4, "forwarding"),
    (Family::Ipv4, "rp_filter"),
    (Family::Ipv6, "forwarding"),
];

/// Makes the mirror keep every neighbour and FDB entry of the matching devices (a first dump
/// of the links says which those are).
pub(super) async fn want_neighbours(
    handle: &mut rtnetlink::Handle,
    mirror: &mut Mirror,
    re: &Regex,
) -> Result<(), ObserveError> {
    kernel::dump(handle, mirror, kernel::Dump::Links).await?;
    // Names without `*` are patterns that match themselves.
    let devices: Vec<String> = mirror
        .links()
        .filter(|l| matches(re, &l.name) && !l.name.ends_with('*'))
        .map(|l| l.name.clone())
        .collect();
    mirror.set_neighbour_interest(NeighbourInterest {
        devices,
        ..Default::default()
    });
    Ok(())
}

/// The node state the selectors pick, as config sections. Reads the settings.
pub(super) fn render(sel: &Selectors, mirror: &mut Mirror) -> String {
    let mut names = Names::default();
    let mut out = String::new();
    if sel.neighbours.is_some() {
        out.push_str(&neighbours(mirror, &mut names));
    }
    if let Some(re) = &sel.links {
        out.push_str(&links(mirror, re, &mut names));
    }
    if let Some(re) = &sel.sysctls {
        out.push_str(&sysctls(mirror, re, &mut names));
    }
    out
}

fn device_name(mirror: &Mirror, ifindex: u32) -> Option<String> {
    mirror.link(ifindex).map(|l| l.name.clone())
}

fn neighbours(mirror: &Mirror, names: &mut Names) -> String {
    let mut entries: Vec<(String, String, Mac, &str)> = mirror
        .neighbours()
        // Multicast entries are the kernel's own (NOARP, made for every joined group).
        .filter(|(_, addr, _)| !addr.is_multicast())
        .filter_map(|(i, addr, n)| {
            let state = match n.state {
                NUD_PERMANENT => "permanent",
                NUD_NOARP => "noarp",
                // The kernel's cache: aged out and replaced on its own.
                _ => return None,
            };
            let mac = n.lladdr.as_deref().and_then(Mac::from_bytes)?;
            Some((device_name(mirror, i)?, addr.to_string(), mac, state))
        })
        .collect();
    entries.sort();
    let mut fdb: Vec<(String, Mac, String, Option<u32>)> = mirror
        .fdb_remotes()
        .filter_map(|(i, mac, r)| Some((device_name(mirror, i)?, mac, r.dst?.to_string(), r.vni)))
        .collect();
    fdb.sort();
    let mut body = String::new();
    for (dev, addr, mac, state) in entries {
        let name = names.get(object_name(&["neigh", &dev, &addr]));
        let _ = writeln!(
            body,
            "    - name: {name}\n      device: {}\n      address: {}\n      lladdr: '{mac}'\n      state: {state}",
            q(&dev),
            q(&addr)
        );
    }
    for (dev, mac, dst, vni) in fdb {
        let name = names.get(object_name(&["fdb", &dev, &mac.to_string(), &dst]));
        let _ = writeln!(
            body,
            "    - name: {name}\n      device: {}\n      lladdr: '{mac}'\n      dst: {}",
            q(&dev),
            q(&dst)
        );
        if let Some(v) = vni {
            let _ = writeln!(body, "      vni: {v}");
        }
    }
    if body.is_empty() {
        return String::new();
    }
    format!("  neighbours:\n{body}")
}

fn links(mirror: &Mirror, re: &Regex, names: &mut Names) -> String {
    let mut links: Vec<_> = mirror.links().filter(|l| matches(re, &l.name)).collect();
    links.sort_by(|a, b| a.name.cmp(&b.name));
    let mut body = String::new();
    for l in links {
        if !l.up && l.mtu.is_none() {
            continue;
        }
        let name = names.get(object_name(&["link", &l.name]));
        let _ = writeln!(body, "    - name: {name}\n      device: {}", q(&l.name));
        if l.up {
            body.push_str("      up: true\n");
        }
        if let Some(m) = l.mtu {
            let _ = writeln!(body, "      mtu: {m}");
        }
    }
    if body.is_empty() {
        return String::new();
    }
    format!("  links:\n{body}")
}

fn sysctls(mirror: &mut Mirror, re: &Regex, names: &mut Names) -> String {
    let mut devices: Vec<String> = mirror
        .links()
        .filter(|l| matches(re, &l.name))
        .map(|l| l.name.clone())
        .collect();
    devices.sort();
    let scopes = [Scope::All, Scope::Default]
        .into_iter()
        .chain(devices.into_iter().map(Scope::Device));
    let mut keys = Vec::new();
    for scope in scopes {
        for (family, setting) in SETTINGS {
            let setting = Setting::find(family, setting).expect("a known setting");
            keys.push(SysctlKey {
                scope: scope.clone(),
                setting,
            });
        }
    }
    kernel::read_sysctls(mirror, &keys);
    let mut body = String::new();
    for key in keys {
        // A device without IPv6 has no IPv6 settings: left out.
        let Some(value) = mirror.sysctl(&key) else {
            continue;
        };
        let family = key.setting.family().to_string();
        let name = names.get(object_name(&[
            "sysctl",
            &family,
            key.scope.name(),
            key.setting.name(),
        ]));
        let _ = writeln!(
            body,
            "    - name: {name}\n      key: {}\n      value: {value}",
            q(&key.to_string())
        );
    }
    if body.is_empty() {
        return String::new();
    }
    format!("  sysctls:\n{body}")
}
