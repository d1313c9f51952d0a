//! Per-interface network settings (`net.ipv4.conf.DEVICE.SETTING`, `net.ipv6.conf.…`), for one
//! device, for `all` or for `default`.
//!
//! Only the settings listed in [`SETTINGS`] can be protected: each with the values that mean
//! something, and whether the kernel says when it changes. Changes of `forwarding`, `rp_filter`,
//! `proxy_arp`/`proxy_ndp` and `ignore_routes_with_linkdown` are notified (RTM_NEWNETCONF,
//! RTNLGRP_IPV4_NETCONF / RTNLGRP_IPV6_NETCONF); the others are read every `pollInterval`.
//! Checked on Linux 6.18: `bc_forwarding`, `accept_local` and `accept_ra` change silently.

use super::{Family, Mode};
use serde::Serialize;
use std::fmt;
use std::path::PathBuf;

/// NETCONFA_* attribute types of RTM_NEWNETCONF.
pub const NETCONFA_IFINDEX: u16 = 1;
pub const NETCONFA_FORWARDING: u16 = 2;
pub const NETCONFA_RP_FILTER: u16 = 3;
pub const NETCONFA_PROXY_NEIGH: u16 = 5;
pub const NETCONFA_IGNORE_ROUTES_WITH_LINKDOWN: u16 = 6;
/// NETCONFA_IFINDEX of the `all` and `default` settings.
pub const IFINDEX_ALL: i32 = -1;
pub const IFINDEX_DEFAULT: i32 = -2;

/// What netwarden knows about a setting.
#[derive(Debug)]
pub struct SettingInfo {
    pub family: Family,
    pub name: &'static str,
    /// The highest meaningful value (the lowest is 0). The kernel itself checks few of them.
    pub max: u32,
    /// The RTM_NEWNETCONF attribute that reports a change, if the kernel reports one.
    pub netconf: Option<u16>,
}

const fn s(family: Family, name: &'static str, max: u32, netconf: Option<u16>) -> SettingInfo {
    SettingInfo {
        family,
        name,
        max,
        netconf,
    }
}

use Family::{Ipv4 as V4, Ipv6 as V6};

/// Every setting that can be protected.
pub const SETTINGS: &[SettingInfo] = &[
    s(V4, "forwarding", 1, Some(NETCONFA_FORWARDING)),
    s(V4, "rp_filter", 2, Some(NETCONFA_RP_FILTER)),
    s(V4, "proxy_arp", 1, Some(NETCONFA_PROXY_NEIGH)),
    s(
        V4,
        "ignore_routes_with_linkdown",
        1,
        Some(NETCONFA_IGNORE_ROUTES_WITH_LINKDOWN),
    ),
    s(V4, "accept_local", 1, None),
    s(V4, "route_localnet", 1, None),
    s(V4, "src_valid_mark", 1, None),
    s(V4, "send_redirects", 1, None),
    s(V4, "accept_redirects", 1, None),
    s(V4, "arp_filter", 1, None),
    s(V4, "arp_ignore", 8, None),
    s(V4, "arp_announce", 2, None),
    s(V4, "bc_forwarding", 1, None),
    s(V6, "forwarding", 1, Some(NETCONFA_FORWARDING)),
    s(V6, "proxy_ndp", 1, Some(NETCONFA_PROXY_NEIGH)),
    s(
        V6,
        "ignore_routes_with_linkdown",
        1,
        Some(NETCONFA_IGNORE_ROUTES_WITH_LINKDOWN),
    ),
    s(V6, "accept_ra", 2, None),
    s(V6, "accept_redirects", 1, None),
    s(V6, "disable_ipv6", 1, None),
];

/// One of [`SETTINGS`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Setting(u8);

impl Setting {
    pub fn find(family: Family, name: &str) -> Option<Setting> {
        SETTINGS
            .iter()
            .position(|i| i.family == family && i.name == name)
            .map(|i| Setting(i as u8))
    }

    /// The setting an RTM_NEWNETCONF attribute of a family reports.
    pub fn of_netconf(family: Family, attr: u16) -> Option<Setting> {
        SETTINGS
            .iter()
            .position(|i| i.family == family && i.netconf == Some(attr))
            .map(|i| Setting(i as u8))
    }

    pub fn info(self) -> &'static SettingInfo {
        &SETTINGS[usize::from(self.0)]
    }

    pub fn family(self) -> Family {
        self.info().family
    }

    pub fn name(self) -> &'static str {
        self.info().name
    }

    /// The kernel notifies changes: read at every full refresh and kept current by events.
    pub fn notified(self) -> bool {
        self.info().netconf.is_some()
    }

    /// Every setting of a family.
    pub fn of_family(family: Family) -> impl Iterator<Item = Setting> {
        (0..SETTINGS.len())
            .filter(move |i| SETTINGS[*i].family == family)
            .map(|i| Setting(i as u8))
    }

    /// The names of a family's settings, for messages.
    pub fn names(family: Family) -> Vec<&'static str> {
        SETTINGS
            .iter()
            .filter(|i| i.family == family)
            .map(|i| i.name)
            .collect()
    }
}

impl fmt::Debug for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.family(), self.name())
    }
}

/// Which device's setting: `all`, `default` (what new devices start with) or one device.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Scope {
    All,
    Default,
    Device(String),
}

impl Scope {
    /// The name in sysctl paths and keys.
    pub fn name(&self) -> &str {
        match self {
            Scope::All => "all",
            Scope::Default => "default",
            Scope::Device(d) => d,
        }
    }

    /// `all` is written first and `default` next: writing `all` sets `forwarding` on every
    /// device, which must not undo a device's own protected value.
    pub fn rank(&self) -> u8 {
        match self {
            Scope::All => 0,
            Scope::Default => 1,
            Scope::Device(_) => 2,
        }
    }
}

/// Identity of a protected setting (one file under /proc/sys/net).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct SysctlKey {
    pub scope: Scope,
    pub setting: Setting,
}

impl SysctlKey {
    /// The file below /proc/sys/net (device names as they are: `flannel.1`).
    pub fn path(&self) -> PathBuf {
        let family = match self.setting.family() {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        };
        [family, "conf", self.scope.name(), self.setting.name()]
            .iter()
            .collect()
    }
}

impl fmt::Display for SysctlKey {
    /// As sysctl(8) writes it: a `.` in a device name becomes `/`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let family = match self.setting.family() {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        };
        write!(
            f,
            "net.{family}.conf.{}.{}",
            self.scope.name().replace('.', "/"),
            self.setting.name()
        )
    }
}

/// Where a config entry applies: `all`, `default`, one device, or a device pattern (`lxc*`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DeviceSel {
    All,
    Default,
    Device(String),
    Pattern(String),
}

/// A sysctl key as the config writes it, taken apart: `net.ipv4.conf.DEVICE.SETTING`
/// (`net.ipv4.ip_forward` is `net.ipv4.conf.all.forwarding`, as in the kernel). A `/` in the
/// device stands for a `.` (sysctl(8)'s convention); dots are kept too, as the setting is the
/// last component. `check_device` validates a device name or pattern.
pub fn parse_key(
    key: &str,
    check_device: impl Fn(&str) -> Result<(), String>,
) -> Result<(DeviceSel, Setting), String> {
    let hint = "write it as sysctl does, e.g. `net.ipv4.conf.all.forwarding` or `net.ipv4.conf.eth0.rp_filter`";
    if key == "net.ipv4.ip_forward" {
        let setting = Setting::find(Family::Ipv4, "forwarding").expect("in SETTINGS");
        return Ok((DeviceSel::All, setting));
    }
    let (family, rest) = if let Some(r) = key.strip_prefix("net.ipv4.conf.") {
        (Family::Ipv4, r)
    } else if let Some(r) = key.strip_prefix("net.ipv6.conf.") {
        (Family::Ipv6, r)
    } else {
        return Err(format!(
            "`{key}` is not a per-interface network setting: {hint}"
        ));
    };
    let Some((device, name)) = rest.rsplit_once('.') else {
        return Err(format!("`{key}` names no setting: {hint}"));
    };
    let setting = Setting::find(family, name).ok_or_else(|| {
        format!(
            "`{name}` is not an {family} setting netwarden protects: use one of {}",
            Setting::names(family).join(", ")
        )
    })?;
    let device = device.replace('/', ".");
    let sel = match device.as_str() {
        "all" => DeviceSel::All,
        "default" => DeviceSel::Default,
        d => {
            check_device(d)?;
            if super::link::is_pattern(d) {
                DeviceSel::Pattern(d.to_owned())
            } else {
                DeviceSel::Device(d.to_owned())
            }
        }
    };
    Ok((sel, setting))
}

/// A setting the config protects, for `all`, `default` or one device. Entries with a device
/// pattern are kept as written ([`crate::desired::DesiredState::sysctl_patterns`], `scope`
/// holding the pattern) and become one of these per matching link while that link exists.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DesiredSysctl {
    pub name: String,
    pub mode: Mode,
    pub key: SysctlKey,
    pub value: u32,
    /// The pattern this entry was made from, for a link matched by one.
    pub pattern: Option<String>,
}

impl DesiredSysctl {
    pub fn describe(&self) -> String {
        format!("{} = {}", self.key, self.value)
    }

    /// The same entry for one device its pattern matches.
    pub fn for_device(&self, device: &str) -> DesiredSysctl {
        DesiredSysctl {
            key: SysctlKey {
                scope: Scope::Device(device.to_owned()),
                setting: self.key.setting,
            },
            pattern: Some(self.key.scope.name().to_owned()),
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(_: &str) -> Result<(), String> {
        Ok(())
    }

    fn parse(key: &str) -> Result<(DeviceSel, Setting), String> {
        parse_key(key, ok)
    }

    #[test]
    fn keys_parse_as_sysctl_writes_them() {
        let (sel, s) = parse("net.ipv4.conf.all.forwarding").unwrap();
        assert_eq!(
            (sel, s.name(), s.family()),
            (DeviceSel::All, "forwarding", Family::Ipv4)
        );
        assert_eq!(
            parse("net.ipv4.ip_forward").unwrap(),
            parse("net.ipv4.conf.all.forwarding").unwrap()
        );
        let (sel, s) = parse("net.ipv6.conf.default.forwarding").unwrap();
        assert_eq!((sel, s.family()), (DeviceSel::Default, Family::Ipv6));
        assert_eq!(
            parse("net.ipv4.conf.flannel/1.rp_filter").unwrap().0,
            DeviceSel::Device("flannel.1".into())
        );
        assert_eq!(
            parse("net.ipv4.conf.flannel.1.rp_filter").unwrap().0,
            DeviceSel::Device("flannel.1".into())
        );
        assert_eq!(
            parse("net.ipv4.conf.lxc*.rp_filter").unwrap().0,
            DeviceSel::Pattern("lxc*".into())
        );
        assert!(parse("net.ipv6.conf.all.rp_filter")
            .unwrap_err()
            .contains("not an ipv6 setting"));
        assert!(parse("kernel.panic")
            .unwrap_err()
            .contains("not a per-interface network setting"));
        assert!(parse("net.ipv4.conf.all")
            .unwrap_err()
            .contains("names no setting"));
        assert!(
            parse_key("net.ipv4.conf.a b.rp_filter", |d| Err(format!("bad {d}")))
                .unwrap_err()
                .contains("bad a b")
        );
    }

    #[test]
    fn keys_print_and_map_to_proc_paths() {
        let k = SysctlKey {
            scope: Scope::Device("flannel.1".into()),
            setting: Setting::find(Family::Ipv4, "rp_filter").unwrap(),
        };
        assert_eq!(k.to_string(), "net.ipv4.conf.flannel/1.rp_filter");
        assert_eq!(k.path(), PathBuf::from("ipv4/conf/flannel.1/rp_filter"));
        let all = SysctlKey {
            scope: Scope::All,
            setting: Setting::find(Family::Ipv6, "forwarding").unwrap(),
        };
        assert_eq!(all.path(), PathBuf::from("ipv6/conf/all/forwarding"));
        assert!(Scope::All.rank() < Scope::Default.rank());
    }

    #[test]
    fn netconf_attributes_map_to_the_notified_settings() {
        let rp = Setting::of_netconf(Family::Ipv4, NETCONFA_RP_FILTER).unwrap();
        assert_eq!(rp.name(), "rp_filter");
        assert!(rp.notified());
        assert_eq!(
            Setting::of_netconf(Family::Ipv6, NETCONFA_PROXY_NEIGH)
                .unwrap()
                .name(),
            "proxy_ndp"
        );
        assert_eq!(Setting::of_netconf(Family::Ipv6, NETCONFA_RP_FILTER), None);
        assert!(!Setting::find(Family::Ipv6, "accept_ra").unwrap().notified());
        // Every name is unique within its family.
        for (i, a) in SETTINGS.iter().enumerate() {
            for b in &SETTINGS[i + 1..] {
                assert!(a.family != b.family || a.name != b.name, "{}", a.name);
            }
        }
    }
}
