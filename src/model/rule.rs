//! ip policy rules (`ip rule`).

use super::{protocol_name, selector, table_name, Family, Mode};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::fmt;

/// What a rule does when it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    Lookup,
    Blackhole,
    Unreachable,
    Prohibit,
    /// Any other action (goto, nop, …): never produced by config, only observed.
    Other(u8),
}

impl RuleAction {
    pub fn parse(s: &str) -> Option<RuleAction> {
        Some(match s {
            "lookup" => RuleAction::Lookup,
            "blackhole" => RuleAction::Blackhole,
            "unreachable" => RuleAction::Unreachable,
            "prohibit" => RuleAction::Prohibit,
            _ => return None,
        })
    }
}

/// Identity of a rule as the kernel's `rule_exists()` sees it (minus the protocol, which we treat
/// as an attribute so that a rule dumped with `proto unspec` still matches a config that does not
/// name one).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RuleKey {
    pub family: Family,
    pub priority: u32,
    pub from: Option<IpNet>,
    pub to: Option<IpNet>,
    pub iif: Option<String>,
    pub oif: Option<String>,
    /// (mark, mask); the mask is 0xffffffff when a mark is given without one, as the kernel does.
    pub fwmark: Option<(u32, u32)>,
    /// Table looked up; 0 for actions that do not look up a table.
    pub table: u32,
    pub action: RuleAction,
    pub tos: u8,
    /// The `not` flag: never set from config.
    pub invert: bool,
    /// Selectors the config cannot express (suppress_prefixlength, uidrange, ports, …), rendered
    /// as text. A kernel rule carrying any of them is a different rule from every configured one.
    pub extra: Option<String>,
}

impl RuleKey {
    /// Builds a normalised key from config-level values.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        family: Family,
        priority: u32,
        from: Option<IpNet>,
        to: Option<IpNet>,
        iif: Option<String>,
        oif: Option<String>,
        fwmark: Option<u32>,
        fwmask: Option<u32>,
        table: u32,
        action: RuleAction,
    ) -> RuleKey {
        RuleKey {
            family,
            priority,
            from: selector(from),
            to: selector(to),
            iif,
            oif,
            fwmark: normalise_fwmark(fwmark, fwmask),
            table: if action == RuleAction::Lookup {
                table
            } else {
                0
            },
            action,
            tos: 0,
            invert: false,
            extra: None,
        }
    }
}

/// The kernel sets the mask to all ones when a non-zero mark comes without a mask, and keeps no
/// mark at all for mark 0 without a mask.
pub fn normalise_fwmark(mark: Option<u32>, mask: Option<u32>) -> Option<(u32, u32)> {
    match (mark.unwrap_or(0), mask) {
        (0, None) | (0, Some(0)) => None,
        (m, None) => Some((m, u32::MAX)),
        (m, Some(k)) => Some((m, k)),
    }
}

impl fmt::Display for RuleKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}:", self.family, self.priority)?;
        if self.invert {
            f.write_str(" not")?;
        }
        match &self.from {
            Some(n) => write!(f, " from {n}")?,
            None => f.write_str(" from all")?,
        }
        if let Some(n) = &self.to {
            write!(f, " to {n}")?;
        }
        if self.tos != 0 {
            write!(f, " tos {:#x}", self.tos)?;
        }
        if let Some((m, k)) = self.fwmark {
            if k == u32::MAX {
                write!(f, " fwmark {m:#x}")?;
            } else {
                write!(f, " fwmark {m:#x}/{k:#x}")?;
            }
        }
        if let Some(i) = &self.iif {
            write!(f, " iif {i}")?;
        }
        if let Some(o) = &self.oif {
            write!(f, " oif {o}")?;
        }
        if let Some(e) = &self.extra {
            write!(f, " {e}")?;
        }
        match self.action {
            RuleAction::Lookup => write!(f, " lookup {}", table_name(self.table)),
            RuleAction::Blackhole => f.write_str(" blackhole"),
            RuleAction::Unreachable => f.write_str(" unreachable"),
            RuleAction::Prohibit => f.write_str(" prohibit"),
            RuleAction::Other(a) => write!(f, " action {a}"),
        }
    }
}

/// A rule that the config protects.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DesiredRule {
    pub name: String,
    pub mode: Mode,
    pub key: RuleKey,
    /// Protocol to compare and to set; `None` means "any" (and none is set when adding).
    pub protocol: Option<u8>,
}

impl DesiredRule {
    /// Does a kernel rule with this key and protocol satisfy this desired rule?
    pub fn matches_protocol(&self, observed: Option<u8>) -> bool {
        self.protocol.is_none() || self.protocol == observed
    }

    pub fn describe(&self) -> String {
        match self.protocol {
            Some(p) => format!("{} proto {}", self.key, protocol_name(p)),
            None => self.key.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(from: &str, table: u32, action: RuleAction) -> RuleKey {
        RuleKey::new(
            Family::Ipv4,
            100,
            Some(from.parse().unwrap()),
            None,
            None,
            None,
            None,
            None,
            table,
            action,
        )
    }

    #[test]
    fn keys_normalise_selectors_and_tables() {
        assert_eq!(
            key("10.244.1.7/24", 77, RuleAction::Lookup),
            key("10.244.1.0/24", 77, RuleAction::Lookup)
        );
        let bh = key("10.0.0.0/8", 77, RuleAction::Blackhole);
        assert_eq!(bh.table, 0, "non-lookup actions carry no table");
        assert_eq!(key("0.0.0.0/0", 77, RuleAction::Lookup).from, None);
    }

    #[test]
    fn fwmark_mask_defaults_like_the_kernel() {
        assert_eq!(normalise_fwmark(Some(0x10), None), Some((0x10, u32::MAX)));
        assert_eq!(normalise_fwmark(Some(0x10), Some(0xff)), Some((0x10, 0xff)));
        assert_eq!(normalise_fwmark(Some(0), Some(0xff)), Some((0, 0xff)));
        assert_eq!(normalise_fwmark(None, None), None);
        assert_eq!(normalise_fwmark(Some(0), None), None);
    }

    #[test]
    fn display_reads_like_ip_rule() {
        let k = key("10.244.1.0/24", 77, RuleAction::Lookup);
        assert_eq!(k.to_string(), "ipv4 100: from 10.244.1.0/24 lookup 77");
    }

    #[test]
    fn unspecified_protocol_matches_any() {
        let d = DesiredRule {
            name: "r".into(),
            mode: Mode::Enforce,
            key: key("10.0.0.0/8", 77, RuleAction::Lookup),
            protocol: None,
        };
        assert!(d.matches_protocol(None));
        assert!(d.matches_protocol(Some(4)));
        let d = DesiredRule {
            protocol: Some(4),
            ..d
        };
        assert!(d.matches_protocol(Some(4)));
        assert!(!d.matches_protocol(None));
    }
}
