//! systemd-networkd's effective configuration, read as systemd 252 reads it (only what decides
//! what a restart removes). Pure: files come through [`Tree`], which the host side implements
//! on a root directory and the tests on a map.
//!
//! - **networkd.conf**: `/etc/systemd/networkd.conf`, then the `*.conf` drop-ins of
//!   `networkd.conf.d/` in /etc/systemd, /run/systemd, /usr/local/lib/systemd, /usr/lib/systemd
//!   and /lib/systemd, ordered by file name (a name in an earlier directory hides the same name in
//!   later ones; an empty file or a symlink to /dev/null hides and says nothing). Later
//!   assignments win. `[Network] ManageForeignRoutingPolicyRules=` and `ManageForeignRoutes=`,
//!   both `yes` by default.
//! - **.network files**: `*.network` in the `systemd/network` directories of the same five
//!   places, masked and ordered the same way; each with its `NAME.network.d/*.conf` drop-ins.
//!   A file whose `[Match]` holds nothing is ignored, as networkd ignores it.

use super::glob::fnmatch;
use super::unit::{self, Unit};
use ipnet::IpNet;
use serde::Serialize;
use std::net::{IpAddr, Ipv4Addr};

mod sections;
use sections::{address_section, conf_address, route_section, rule_section};

/// Where systemd looks, in order of precedence (the last one is the split-/usr location; on a
/// merged-/usr system it is the same directory as the one before).
pub const PLACES: [&str; 5] = [
    "/etc/systemd",
    "/run/systemd",
    "/usr/local/lib/systemd",
    "/usr/lib/systemd",
    "/lib/systemd",
];

/// networkd.conf itself (only in /etc).
pub const CONF: &str = "/etc/systemd/networkd.conf";

/// Read access to the files networkd would read.
pub trait Tree {
    /// The regular files directly in `dir`: name and content; `None` content for an empty file
    /// or a symlink to /dev/null (a mask). An absent directory has none.
    fn list(&self, dir: &str) -> Vec<(String, Option<String>)>;
    /// One file's content (`None`: absent, empty or masked).
    fn read(&self, path: &str) -> Option<String>;
}

/// The files with `suffix` across `dirs`: an earlier directory's file hides a later one of the
/// same name; sorted by name. Masks are dropped after hiding.
pub fn layered(tree: &dyn Tree, dirs: &[String], suffix: &str) -> Vec<(String, String)> {
    let mut seen: Vec<(String, Option<(String, String)>)> = Vec::new();
    for dir in dirs {
        for (name, text) in tree.list(dir) {
            if !name.ends_with(suffix) || seen.iter().any(|(n, _)| *n == name) {
                continue;
            }
            let path = format!("{}/{name}", dir.trim_end_matches('/'));
            seen.push((name, text.map(|t| (path, t))));
        }
    }
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    seen.into_iter().filter_map(|(_, f)| f).collect()
}

/// networkd's manager-wide settings that decide what it removes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Settings {
    #[serde(rename = "manageForeignRoutingPolicyRules")]
    pub manage_foreign_rules: bool,
    #[serde(rename = "manageForeignRoutes")]
    pub manage_foreign_routes: bool,
    /// The files read, in order.
    pub files: Vec<String>,
    pub warnings: Vec<String>,
}

/// Reads networkd.conf and its drop-ins.
pub fn settings(tree: &dyn Tree) -> Settings {
    let mut s = Settings {
        manage_foreign_rules: true,
        manage_foreign_routes: true,
        files: Vec::new(),
        warnings: Vec::new(),
    };
    let mut files: Vec<(String, String)> = Vec::new();
    if let Some(text) = tree.read(CONF) {
        files.push((CONF.to_string(), text));
    }
    let dirs: Vec<String> = PLACES
        .iter()
        .map(|p| format!("{p}/networkd.conf.d"))
        .collect();
    files.extend(layered(tree, &dirs, ".conf"));
    for (path, text) in files {
        let u = unit::parse(&text);
        s.warnings
            .extend(u.warnings.iter().map(|w| format!("{path}: {w}")));
        for e in u.entries.iter().filter(|e| e.section == "Network") {
            let target = match e.key.as_str() {
                "ManageForeignRoutingPolicyRules" => &mut s.manage_foreign_rules,
                "ManageForeignRoutes" => &mut s.manage_foreign_routes,
                _ => continue,
            };
            match unit::boolean(&e.value) {
                Some(b) => *target = b,
                None => s.warnings.push(format!(
                    "{path}:{}: {}=`{}` is not a boolean; ignored, as networkd ignores it",
                    e.line, e.key, e.value
                )),
            }
        }
        s.files.push(path);
    }
    s
}

/// `KeepConfiguration=` (and the deprecated `CriticalConnection=`), as systemd 252 parses it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Keep {
    #[default]
    No,
    DhcpOnStop,
    Dhcp,
    Static,
    Yes,
}

impl Keep {
    pub fn parse(s: &str) -> Option<Keep> {
        if let Some(b) = unit::boolean(s) {
            return Some(if b { Keep::Yes } else { Keep::No });
        }
        Some(match s {
            "dhcp-on-stop" => Keep::DhcpOnStop,
            "dhcp" => Keep::Dhcp,
            "static" => Keep::Static,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Keep::No => "no",
            Keep::DhcpOnStop => "dhcp-on-stop",
            Keep::Dhcp => "dhcp",
            Keep::Static => "static",
            Keep::Yes => "yes",
        }
    }

    /// Foreign routes of `protocol` networkd leaves alone with this setting (its flags STATIC and
    /// DHCP; `yes` holds both).
    pub fn keeps_route_protocol(self, protocol: u8) -> bool {
        const STATIC: u8 = crate::model::PROTO_STATIC;
        const DHCP: u8 = 16;
        match protocol {
            STATIC => matches!(self, Keep::Static | Keep::Yes),
            DHCP => matches!(self, Keep::Dhcp | Keep::Yes),
            _ => false,
        }
    }
}

/// `Broadcast=` of an address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum Broadcast {
    /// Not set: networkd computes it when it adds the address (IPv4, prefix up to /30).
    #[default]
    Unset,
    /// `yes` or `no`: computed or none, when it adds it.
    Boolean(bool),
    Address(Ipv4Addr),
}

/// An address a .network file configures (`[Network] Address=`, `[Address]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConfAddress {
    pub address: IpAddr,
    pub prefix_len: u8,
    pub peer: Option<IpAddr>,
    pub broadcast: Broadcast,
    pub label: Option<String>,
}

impl ConfAddress {
    /// The broadcast address networkd compares with the kernel's when deciding whether an
    /// address it finds is the one it configures: only an explicit `Broadcast=ADDRESS` is set
    /// at that point (systemd 252 computes the default only when it adds the address).
    pub fn compared_broadcast(&self) -> Option<Ipv4Addr> {
        match self.broadcast {
            Broadcast::Address(a) => Some(a),
            _ => None,
        }
    }
}

/// A route a .network file configures (`[Route]`, `[Network] Gateway=`): only what identifies it
/// for the prediction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConfRoute {
    pub destination: Option<IpNet>,
    pub gateway: Option<IpAddr>,
    pub table: Option<u32>,
    pub metric: Option<u32>,
}

/// A rule a .network file configures (`[RoutingPolicyRule]`): what identifies it for the
/// prediction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConfRule {
    pub priority: Option<u32>,
    pub from: Option<IpNet>,
    pub to: Option<IpNet>,
    pub table: Option<u32>,
    pub fwmark: Option<u32>,
    pub iif: Option<String>,
    pub oif: Option<String>,
}

/// What one .network file says about matching and keeping.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Network {
    pub path: String,
    pub dropins: Vec<String>,
    pub names: Vec<String>,
    pub types: Vec<String>,
    pub kinds: Vec<String>,
    pub drivers: Vec<String>,
    pub macs: Vec<String>,
    pub permanent_macs: Vec<String>,
    /// `[Match]` keys present that the prediction does not evaluate (Path=, Property=, Host=,
    /// Virtualization=, ...): such a file is taken not to match, and said so.
    pub unevaluated: Vec<String>,
    pub unmanaged: bool,
    pub keep: Keep,
    pub addresses: Vec<ConfAddress>,
    pub routes: Vec<ConfRoute>,
    pub rules: Vec<ConfRule>,
    pub warnings: Vec<String>,
}

/// What is known of a link for `[Match]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LinkFacts {
    pub index: u32,
    pub name: String,
    pub altnames: Vec<String>,
    /// `Type=`: udev's DEVTYPE, else the ARPHRD name in lower case (`ether`, `loopback`, ...).
    pub iftype: Option<String>,
    /// `Kind=`: the rtnetlink link kind (`veth`, `bridge`, `vxlan`, ...).
    pub kind: Option<String>,
    /// `Driver=`: as `ethtool -i` reports it.
    pub driver: Option<String>,
    /// Lower-case `aa:bb:cc:dd:ee:ff`.
    pub mac: Option<String>,
    pub permanent_mac: Option<String>,
    pub loopback: bool,
}

/// Whether a .network file applies to a link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fit {
    Yes,
    No,
    /// Every key it evaluates matches, but it has keys it does not evaluate.
    Unknown(Vec<String>),
}

/// systemd's `net_condition_test_strv`: patterns, `!` negating; an empty list matches.
fn test_strv(patterns: &[String], value: Option<&str>) -> bool {
    if patterns.is_empty() {
        return true;
    }
    let mut matched = false;
    let mut positive = false;
    for p in patterns {
        let (invert, pat) = match p.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, p.as_str()),
        };
        positive |= !invert;
        if value.is_some_and(|v| fnmatch(pat, v)) {
            if invert {
                return false;
            }
            matched = true;
        }
    }
    if positive {
        matched
    } else {
        true
    }
}

impl Network {
    /// Whether the file applies to the link (systemd's `net_match_config`).
    pub fn fits(&self, link: &LinkFacts) -> Fit {
        let in_set = |set: &[String], v: &Option<String>| {
            set.is_empty() || v.as_ref().is_some_and(|v| set.contains(v))
        };
        let name = test_strv(&self.names, Some(&link.name))
            || link
                .altnames
                .iter()
                .any(|a| test_strv(&self.names, Some(a)));
        let ok = name
            && in_set(&self.macs, &link.mac)
            && in_set(&self.permanent_macs, &link.permanent_mac)
            && test_strv(&self.types, link.iftype.as_deref())
            && test_strv(&self.kinds, link.kind.as_deref())
            && test_strv(&self.drivers, link.driver.as_deref());
        match (ok, self.unevaluated.is_empty()) {
            (false, _) => Fit::No,
            (true, true) => Fit::Yes,
            (true, false) => Fit::Unknown(self.unevaluated.clone()),
        }
    }
}

/// `[Match]` keys that take lists of patterns (empty value: reset).
const LISTS: [&str; 4] = ["Name", "Type", "Kind", "Driver"];
/// `[Match]` keys the prediction does not evaluate.
const UNEVALUATED: [&str; 13] = [
    "Path",
    "Property",
    "WLANInterfaceType",
    "SSID",
    "BSSID",
    "Host",
    "Virtualization",
    "KernelCommandLine",
    "KernelVersion",
    "Credential",
    "Architecture",
    "Firmware",
    "Condition",
];

/// Reads every .network file with its drop-ins, in the order networkd tries them.
pub fn networks(tree: &dyn Tree) -> Vec<Network> {
    let dirs: Vec<String> = PLACES.iter().map(|p| format!("{p}/network")).collect();
    let mut out = Vec::new();
    for (path, text) in layered(tree, &dirs, ".network") {
        let name = path.rsplit('/').next().unwrap_or_default().to_string();
        let dropin_dirs: Vec<String> = dirs.iter().map(|d| format!("{d}/{name}.d")).collect();
        let dropins = layered(tree, &dropin_dirs, ".conf");
        let mut units = vec![(path.clone(), unit::parse(&text))];
        units.extend(dropins.iter().map(|(p, t)| (p.clone(), unit::parse(t))));
        let mut net = network(&units);
        net.path = path;
        net.dropins = dropins.into_iter().map(|(p, _)| p).collect();
        let empty = net.names.is_empty()
            && net.types.is_empty()
            && net.kinds.is_empty()
            && net.drivers.is_empty()
            && net.macs.is_empty()
            && net.permanent_macs.is_empty()
            && net.unevaluated.is_empty();
        if !empty {
            out.push(net);
        }
    }
    out
}

/// One .network file (the file, then its drop-ins in order).
fn network(units: &[(String, Unit)]) -> Network {
    let mut n = Network::default();
    let mut critical: Option<bool> = None;
    let mut keep: Option<Keep> = None;
    for (path, u) in units {
        n.warnings
            .extend(u.warnings.iter().map(|w| format!("{path}: {w}")));
        for e in &u.entries {
            if e.section == "Match" {
                match_entry(&mut n, &e.key, &e.value);
                continue;
            }
            if let Err(what) = setting(&mut n, e, &mut keep, &mut critical) {
                n.warnings.push(format!(
                    "{path}:{}: {}=`{}`: {what}; ignored, as networkd ignores it",
                    e.line, e.key, e.value
                ));
            }
        }
        for block in u.blocks("Address") {
            if let Some(a) = address_section(&block) {
                n.addresses.push(a);
            }
        }
        for block in u.blocks("Route") {
            n.routes.push(route_section(&block));
        }
        for block in u.blocks("RoutingPolicyRule") {
            n.rules.push(rule_section(&block));
        }
    }
    n.keep = match (keep, critical) {
        (Some(k), _) => k,
        // The deprecated CriticalConnection=yes keeps foreign static configuration too.
        (None, Some(true)) => Keep::Yes,
        _ => Keep::No,
    };
    n
}

/// One `[Match]` setting: a list (an empty value clears it), or a key not evaluated (noted).
fn match_entry(n: &mut Network, key: &str, value: &str) {
    match key {
        k if LISTS.contains(&k) => {
            let list = match k {
                "Name" => &mut n.names,
                "Type" => &mut n.types,
                "Kind" => &mut n.kinds,
                _ => &mut n.drivers,
            };
            if value.is_empty() {
                list.clear();
            } else {
                list.extend(unit::words(value));
            }
        }
        k @ ("MACAddress" | "PermanentMACAddress") => {
            let list = if k == "MACAddress" {
                &mut n.macs
            } else {
                &mut n.permanent_macs
            };
            if value.is_empty() {
                list.clear();
            } else {
                list.extend(unit::words(value).iter().map(|m| m.to_ascii_lowercase()));
            }
        }
        k if (UNEVALUATED.contains(&k) || k.starts_with("Condition"))
            && !n.unevaluated.iter().any(|u| u == k) =>
        {
            n.unevaluated.push(k.to_string());
        }
        _ => {}
    }
}

/// One setting outside `[Match]` that the prediction reads; `Err`: why its value is ignored.
fn setting(
    n: &mut Network,
    e: &unit::Entry,
    keep: &mut Option<Keep>,
    critical: &mut Option<bool>,
) -> Result<(), &'static str> {
    match (e.section.as_str(), e.key.as_str()) {
        ("Link", "Unmanaged") => n.unmanaged = unit::boolean(&e.value).ok_or("not a boolean")?,
        ("Network", "KeepConfiguration") => {
            *keep = Some(Keep::parse(&e.value).ok_or("not a KeepConfiguration= value")?);
        }
        ("DHCP" | "DHCPv4", "CriticalConnection") => *critical = unit::boolean(&e.value),
        ("Network", "Address") => {
            let (address, prefix_len) = conf_address(&e.value).ok_or("not an address")?;
            n.addresses.push(ConfAddress {
                address,
                prefix_len,
                peer: None,
                broadcast: Broadcast::Unset,
                label: None,
            });
        }
        ("Network", "Gateway") => {
            let g = e.value.parse::<IpAddr>().map_err(|_| "not an address")?;
            n.routes.push(ConfRoute {
                destination: None,
                gateway: Some(g),
                table: None,
                metric: None,
            });
        }
        _ => {}
    }
    Ok(())
}

/// Which .network file networkd gives a link: the first that matches. The files with keys the
/// prediction does not evaluate that came first, and might apply instead, are returned too.
pub fn network_for<'a>(
    nets: &'a [Network],
    link: &LinkFacts,
) -> (Option<&'a Network>, Vec<&'a Network>) {
    let mut doubtful = Vec::new();
    for n in nets {
        match n.fits(link) {
            Fit::Yes => return (Some(n), doubtful),
            Fit::Unknown(_) => doubtful.push(n),
            Fit::No => {}
        }
    }
    (None, doubtful)
}

#[cfg(test)]
#[path = "config_tests.rs"]
pub(crate) mod tests;
