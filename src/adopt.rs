//! Adopted state (`spec.adopt`): kernel objects that no config can name ahead of time (per-pod
//! rules of a CNI) are protected from the moment they are seen, exactly as they were seen, and
//! forgotten when one of their owners removes them. Pure: selector matching and the
//! restore-or-forget decision; the loop does the I/O.

use crate::model::{DesiredRule, Family, Mode, RuleKey};

/// What to do with an adopted object removed by a process that could not be identified.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnknownActor {
    /// Treat the removal as drift (the safe default: networkd restarts are the common case).
    #[default]
    Restore,
    /// Treat it as the owner's.
    Forget,
}

/// An inclusive range of numbers.
pub type Range = (u32, u32);

/// Which rules a selector adopts; every criterion given must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleSelector {
    pub family: Option<Family>,
    pub priority: Option<Range>,
    pub table: Option<Range>,
    /// Protocols the rule may carry (empty: any).
    pub protocols: Vec<u8>,
}

/// One `spec.adopt` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdoptSelector {
    pub name: String,
    pub mode: Mode,
    pub rules: RuleSelector,
    /// Command names (as in /proc/PID/comm, at most 15 bytes) whose removals are legitimate.
    pub owners: Vec<String>,
    pub unknown_actor: UnknownActor,
}

/// Who removed an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Actor<'a> {
    /// The kernel itself (port 0): an address or link went away.
    Kernel,
    /// A process, by command name.
    Process(&'a str),
    /// Nobody could be identified (the socket and process were gone).
    Unknown,
}

/// What a removal of an adopted object calls for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Drift: put it back.
    Restore,
    /// The owner removed it: stop protecting it.
    Forget,
}

fn within(range: Option<Range>, v: u32) -> bool {
    range.is_none_or(|(lo, hi)| lo <= v && v <= hi)
}

impl RuleSelector {
    /// Does a kernel rule with this identity and protocol fall under the selector?
    pub fn matches(&self, key: &RuleKey, protocol: Option<u8>) -> bool {
        self.family.is_none_or(|f| f == key.family)
            && within(self.priority, key.priority)
            && within(self.table, key.table)
            && (self.protocols.is_empty() || protocol.is_some_and(|p| self.protocols.contains(&p)))
    }
}

impl AdoptSelector {
    /// Is `name` (a command name as /proc shows it) one of the owners?
    pub fn is_owner(&self, name: &str) -> bool {
        self.owners
            .iter()
            .any(|o| crate::obs::attribution::clean_name(o) == name)
    }

    /// The restore-or-forget decision for a removal made by `actor`.
    pub fn decide(&self, actor: Actor<'_>) -> Verdict {
        match actor {
            Actor::Process(name) if self.is_owner(name) => Verdict::Forget,
            Actor::Process(_) | Actor::Kernel => Verdict::Restore,
            Actor::Unknown => match self.unknown_actor {
                UnknownActor::Restore => Verdict::Restore,
                UnknownActor::Forget => Verdict::Forget,
            },
        }
    }

    /// The desired rule an adopted kernel rule becomes: exactly what was seen.
    pub fn adopt_rule(&self, key: &RuleKey, protocol: Option<u8>) -> DesiredRule {
        DesiredRule {
            name: self.object_name(key),
            mode: self.mode,
            key: key.clone(),
            protocol,
        }
    }

    /// Names of adopted objects say where they come from: `adopted:<selector>/<priority>`.
    fn object_name(&self, key: &RuleKey) -> String {
        format!("{ADOPTED_PREFIX}{}/{}", self.name, key.priority)
    }
}

/// Prefix of the names of adopted objects (`status` and `check` show it as their origin).
pub const ADOPTED_PREFIX: &str = "adopted:";

/// The origin of a protected object, from its name.
pub fn origin(name: &str) -> &'static str {
    if name.starts_with(ADOPTED_PREFIX) {
        "adopted"
    } else {
        "config"
    }
}

/// The first selector that adopts a kernel rule.
pub fn select_rule<'a>(
    selectors: &'a [AdoptSelector],
    key: &RuleKey,
    protocol: Option<u8>,
) -> Option<&'a AdoptSelector> {
    selectors.iter().find(|s| s.rules.matches(key, protocol))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RuleAction;

    fn rule(priority: u32, table: u32) -> RuleKey {
        RuleKey::new(
            Family::Ipv4,
            priority,
            Some("10.0.0.5/32".parse().unwrap()),
            None,
            None,
            None,
            None,
            None,
            table,
            RuleAction::Lookup,
        )
    }

    fn vpc(policy: UnknownActor) -> AdoptSelector {
        AdoptSelector {
            name: "vpc-cni".into(),
            mode: Mode::Enforce,
            rules: RuleSelector {
                family: Some(Family::Ipv4),
                priority: Some((512, 1536)),
                table: None,
                protocols: vec![],
            },
            owners: vec!["aws-k8s-agent".into(), "aws-cni".into()],
            unknown_actor: policy,
        }
    }

    #[test]
    fn rules_match_by_priority_table_protocol_family() {
        let s = vpc(UnknownActor::Restore);
        assert!(s.rules.matches(&rule(512, 254), None));
        assert!(s.rules.matches(&rule(1536, 2), Some(3)));
        assert!(!s.rules.matches(&rule(511, 254), None));
        assert!(!s.rules.matches(&rule(1537, 254), None));
        let mut v6 = rule(512, 254);
        v6.family = Family::Ipv6;
        assert!(!s.rules.matches(&v6, None), "family");

        let t = RuleSelector {
            table: Some((2, 10)),
            protocols: vec![4],
            ..RuleSelector::default()
        };
        assert!(t.matches(&rule(100, 5), Some(4)));
        assert!(!t.matches(&rule(100, 5), Some(3)), "other protocol");
        assert!(!t.matches(&rule(100, 5), None), "no protocol");
        assert!(!t.matches(&rule(100, 254), Some(4)), "table out of range");
        assert!(
            RuleSelector::default().matches(&rule(1, 1), None),
            "empty selector adopts all"
        );
    }

    #[test]
    fn first_matching_selector_wins() {
        let a = vpc(UnknownActor::Restore);
        let mut b = vpc(UnknownActor::Forget);
        b.name = "all".into();
        b.rules = RuleSelector::default();
        let sels = [a, b];
        assert_eq!(
            select_rule(&sels, &rule(512, 254), None).unwrap().name,
            "vpc-cni"
        );
        assert_eq!(
            select_rule(&sels, &rule(32000, 254), None).unwrap().name,
            "all"
        );
        assert!(select_rule(&sels[..1], &rule(32000, 254), None).is_none());
    }

    #[test]
    fn decision_table() {
        use Actor::*;
        use Verdict::*;
        let cases = [
            (UnknownActor::Restore, Process("aws-k8s-agent"), Forget),
            (UnknownActor::Restore, Process("aws-cni"), Forget),
            (UnknownActor::Restore, Process("systemd-network"), Restore),
            (UnknownActor::Restore, Process("ip"), Restore),
            (UnknownActor::Restore, Kernel, Restore),
            (UnknownActor::Restore, Unknown, Restore),
            (UnknownActor::Forget, Process("aws-k8s-agent"), Forget),
            (UnknownActor::Forget, Process("ip"), Restore),
            (UnknownActor::Forget, Kernel, Restore),
            (UnknownActor::Forget, Unknown, Forget),
        ];
        for (policy, actor, want) in cases {
            assert_eq!(vpc(policy).decide(actor), want, "{policy:?} {actor:?}");
        }
    }

    #[test]
    fn owners_compare_as_proc_shows_them() {
        let mut s = vpc(UnknownActor::Restore);
        s.owners = vec!["a-very-long-process-name".into()];
        // /proc/PID/comm keeps 15 bytes.
        assert!(s.is_owner("a-very-long-pro"));
        assert!(!s.is_owner("a-very-long"));
    }

    #[test]
    fn adopted_rules_keep_what_was_seen_and_say_their_origin() {
        let s = vpc(UnknownActor::Restore);
        let d = s.adopt_rule(&rule(1536, 2), Some(4));
        assert_eq!(d.key, rule(1536, 2));
        assert_eq!(d.protocol, Some(4));
        assert_eq!(d.name, "adopted:vpc-cni/1536");
        assert_eq!(origin(&d.name), "adopted");
        assert_eq!(origin("pods"), "config");
    }
}
