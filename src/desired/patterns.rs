//! Device patterns (`cni*`, `lxc*`): links and settings for links that exist now, and for those
//! created later. Pure: the loop hands in the names of the links that exist whenever they change.
//!
//! An entry naming one device wins over any pattern matching it; among patterns, the first in
//! the file wins (validation refuses two entries with the same device or pattern).

use super::DesiredState;
use crate::model::link::{device_matches, is_pattern};
use crate::model::sysctl::{DesiredSysctl, Scope, SysctlKey};
use std::collections::BTreeSet;

/// Whether a config's sysctl entry names a device pattern.
pub(super) fn is_pattern_entry(s: &DesiredSysctl) -> bool {
    matches!(&s.key.scope, Scope::Device(d) if is_pattern(d))
}

impl DesiredState {
    /// Whether any entry has a device pattern (the loop then follows the links).
    pub fn has_patterns(&self) -> bool {
        !self.link_patterns.is_empty() || !self.sysctl_patterns.is_empty()
    }

    /// Makes the pattern entries cover exactly `links` (the names of the links that exist):
    /// one object per matching link, none for links that are gone. True if that changed
    /// anything.
    pub fn follow_links<'a>(&mut self, links: impl IntoIterator<Item = &'a str>) -> bool {
        if !self.has_patterns() {
            return false;
        }
        let names: BTreeSet<&str> = links.into_iter().collect();
        let mut changed = false;

        let mut links = self.links.clone();
        links.retain(|_, l| l.pattern.is_none());
        for name in &names {
            if links.contains_key(*name) {
                continue;
            }
            if let Some(p) = self
                .link_patterns
                .iter()
                .find(|p| device_matches(&p.device, name))
            {
                links.insert((*name).to_owned(), p.for_device(name));
            }
        }
        if links != self.links {
            self.links = links;
            changed = true;
        }

        let mut sysctls = self.sysctls.clone();
        sysctls.retain(|_, s| s.pattern.is_none());
        for name in &names {
            for p in &self.sysctl_patterns {
                if !device_matches(p.key.scope.name(), name) {
                    continue;
                }
                let key = SysctlKey {
                    scope: Scope::Device((*name).to_owned()),
                    setting: p.key.setting,
                };
                // An exact entry, or an earlier pattern, has it already.
                sysctls.entry(key).or_insert_with(|| p.for_device(name));
            }
        }
        if sysctls != self.sysctls {
            self.sysctls = sysctls;
            changed = true;
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::sysctl::Setting;
    use crate::model::{DesiredLink, Family, Mode};

    fn link(name: &str, device: &str, mtu: u32) -> DesiredLink {
        DesiredLink {
            name: name.into(),
            mode: Mode::Enforce,
            device: device.into(),
            up: true,
            mtu: Some(mtu),
            pattern: None,
        }
    }

    fn sysctl(name: &str, device: &str, setting: &str, value: u32) -> DesiredSysctl {
        DesiredSysctl {
            name: name.into(),
            mode: Mode::Enforce,
            key: SysctlKey {
                scope: match device {
                    "all" => Scope::All,
                    d => Scope::Device(d.into()),
                },
                setting: Setting::find(Family::Ipv4, setting).unwrap(),
            },
            value,
            pattern: None,
        }
    }

    fn state() -> DesiredState {
        let exact = link("cni0-exact", "cni0", 1400);
        let s_exact = sysctl("lxc1-rp", "lxc1", "rp_filter", 1);
        let all = sysctl("all-rp", "all", "rp_filter", 0);
        DesiredState {
            links: [(exact.device.clone(), exact)].into_iter().collect(),
            link_patterns: vec![link("cni", "cni*", 1450), link("every", "*", 1500)],
            sysctls: [(s_exact.key.clone(), s_exact), (all.key.clone(), all)]
                .into_iter()
                .collect(),
            sysctl_patterns: vec![
                sysctl("lxc-rp", "lxc*", "rp_filter", 0),
                sysctl("any-rp", "*", "rp_filter", 2),
                sysctl("lxc-fwd", "lxc*", "forwarding", 1),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn exact_entries_win_then_the_first_pattern() {
        let mut d = state();
        assert!(d.follow_links(["cni0", "cni1", "lxc1", "lxc2", "eth0"]));
        assert_eq!(d.links["cni0"].name, "cni0-exact");
        assert_eq!(d.links["cni0"].pattern, None);
        assert_eq!(d.links["cni1"].name, "cni");
        assert_eq!(d.links["cni1"].pattern.as_deref(), Some("cni*"));
        assert_eq!(d.links["eth0"].name, "every");
        assert_eq!(d.links.len(), 5);
        let rp = |dev: &str| {
            let key = SysctlKey {
                scope: Scope::Device(dev.into()),
                setting: Setting::find(Family::Ipv4, "rp_filter").unwrap(),
            };
            d.sysctls.get(&key).map(|s| (s.name.clone(), s.value))
        };
        assert_eq!(rp("lxc1"), Some(("lxc1-rp".into(), 1)));
        assert_eq!(rp("lxc2"), Some(("lxc-rp".into(), 0)));
        assert_eq!(rp("eth0"), Some(("any-rp".into(), 2)));
        // all-rp + lxc1-rp, rp_filter on 5 links (one exact), forwarding on lxc1 and lxc2.
        assert_eq!(d.sysctls.len(), 1 + 5 + 2);
        assert!(
            !d.follow_links(["cni0", "cni1", "lxc1", "lxc2", "eth0"]),
            "no change"
        );
    }

    #[test]
    fn links_that_go_take_their_pattern_objects_and_nothing_else() {
        let mut d = state();
        d.follow_links(["cni0", "cni1", "lxc1", "lxc2"]);
        assert!(d.follow_links(["lxc2"]));
        assert_eq!(
            d.links.len(),
            2,
            "the exact cni0 stays, pending: {:?}",
            d.links.keys()
        );
        assert!(d.links.contains_key("cni0") && d.links.contains_key("lxc2"));
        assert_eq!(
            d.sysctls.len(),
            2 + 2,
            "all-rp, lxc1-rp (exact), lxc2's two"
        );
        // No patterns: nothing to follow.
        let mut plain = DesiredState::default();
        assert!(!plain.has_patterns() && !plain.follow_links(["eth0"]));
    }
}
