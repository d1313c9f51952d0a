//! Links (`ip link`): the admin state and MTU of named devices, and the device patterns that
//! links and sysctls use to cover devices created later.

use super::Mode;
use serde::Serialize;

/// `eni*` matches every name starting with `eni` (`*` alone: every name); anything else matches
/// itself. The syntax of every device, chain and set name pattern in the config.
pub fn device_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

/// Whether a device given in the config is a pattern (ends in `*`) rather than one name.
pub fn is_pattern(device: &str) -> bool {
    device.ends_with('*')
}

/// A link the config protects, for one device. Entries with a device pattern are kept as
/// written ([`crate::desired::DesiredState::link_patterns`]) and become one of these per
/// matching link while that link exists.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DesiredLink {
    pub name: String,
    pub mode: Mode,
    /// The device: one name, or (in a pattern entry) a pattern.
    pub device: String,
    /// The link must be administratively up. (Never "down": netwarden does not take links down.)
    pub up: bool,
    pub mtu: Option<u32>,
    /// The pattern this entry was made from, for a link matched by one.
    pub pattern: Option<String>,
}

/// What the kernel says about a link's state that a protected link can ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObservedLink {
    pub up: bool,
    pub mtu: Option<u32>,
}

impl DesiredLink {
    /// Only what the config names is compared.
    pub fn matches(&self, observed: &ObservedLink) -> bool {
        (!self.up || observed.up) && self.mtu.is_none_or(|m| observed.mtu == Some(m))
    }

    /// The same entry for one device its pattern matches.
    pub fn for_device(&self, device: &str) -> DesiredLink {
        DesiredLink {
            device: device.to_owned(),
            pattern: Some(self.device.clone()),
            ..self.clone()
        }
    }

    pub fn describe(&self) -> String {
        let mut s = format!("link {}", self.device);
        if self.up {
            s.push_str(" up");
        }
        if let Some(m) = self.mtu {
            s.push_str(&format!(" mtu {m}"));
        }
        s
    }

    /// How an observed link differs, in the words of [`DesiredLink::describe`].
    pub fn describe_observed(observed: &ObservedLink) -> String {
        let state = if observed.up { "up" } else { "down" };
        match observed.mtu {
            Some(m) => format!("{state} mtu {m}"),
            None => state.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(up: bool, mtu: Option<u32>) -> DesiredLink {
        DesiredLink {
            name: "l".into(),
            mode: Mode::Enforce,
            device: "cni*".into(),
            up,
            mtu,
            pattern: None,
        }
    }

    #[test]
    fn patterns_match_prefixes_and_names_themselves() {
        assert!(device_matches("cni*", "cni0") && device_matches("cni*", "cni"));
        assert!(!device_matches("cni*", "xcni0"));
        assert!(device_matches("*", "lo"));
        assert!(device_matches("eth0", "eth0") && !device_matches("eth0", "eth01"));
        assert!(is_pattern("*") && !is_pattern("flannel.1"));
    }

    #[test]
    fn only_what_is_configured_is_compared() {
        let up = ObservedLink {
            up: true,
            mtu: Some(1500),
        };
        let down = ObservedLink { up: false, ..up };
        assert!(link(true, None).matches(&up));
        assert!(!link(true, None).matches(&down));
        assert!(
            link(false, Some(1500)).matches(&down),
            "state not asked for"
        );
        assert!(!link(false, Some(1450)).matches(&up));
        let one = link(true, Some(1450)).for_device("cni0");
        assert_eq!(one.device, "cni0");
        assert_eq!(one.pattern.as_deref(), Some("cni*"));
        assert_eq!(one.describe(), "link cni0 up mtu 1450");
        assert_eq!(DesiredLink::describe_observed(&down), "down mtu 1500");
    }
}
