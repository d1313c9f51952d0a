//! The diff for one ipset: members missing, forbidden or (when `exact`) extra, and a set
//! missing or of another type. Pure.

use super::display_list;
use crate::model::{Family, Mode};
use crate::netfilter::model::{Content, DesiredSet, Member, SetType};
use crate::netfilter::parse::SavedSet;
use ipnet::IpNet;
use serde::Serialize;
use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "finding", rename_all = "snake_case")]
pub enum SetFinding {
    Missing,
    /// The set exists with another type or family: netwarden never destroys a set, so this
    /// needs a person.
    WrongType {
        observed: String,
    },
    /// The set exists with creation options other than the config names (`timeout`, …): they
    /// cannot change without destroying the set, so this needs a person too.
    OptionsDiffer {
        differences: String,
    },
    MembersMissing {
        #[serde(serialize_with = "display_list")]
        members: Vec<Member>,
    },
    Extra {
        #[serde(serialize_with = "display_list")]
        members: Vec<Member>,
    },
    Forbidden {
        #[serde(serialize_with = "display_list")]
        members: Vec<Member>,
    },
}

impl fmt::Display for SetFinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let few = |m: &[Member]| {
            let shown: Vec<String> = m.iter().take(3).map(ToString::to_string).collect();
            let more = if m.len() > 3 { ", …" } else { "" };
            format!("{} ({}{more})", m.len(), shown.join(", "))
        };
        match self {
            SetFinding::Missing => f.write_str("set missing"),
            SetFinding::WrongType { observed } => {
                write!(
                    f,
                    "set exists as `{observed}`; not repaired (it would have to be destroyed)"
                )
            }
            SetFinding::OptionsDiffer { differences } => write!(
                f,
                "set created with other options: {differences}; not repaired (it would have to be destroyed)"
            ),
            SetFinding::MembersMissing { members } => {
                write!(f, "members missing: {}", few(members))
            }
            SetFinding::Extra { members } => write!(f, "extra members: {}", few(members)),
            SetFinding::Forbidden { members } => {
                write!(f, "forbidden members present: {}", few(members))
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SetDrift {
    pub name: String,
    pub mode: Mode,
    pub object: String,
    pub findings: Vec<SetFinding>,
}

impl SetFinding {
    /// Whether a repair can fix it (a set's type and creation options cannot be changed).
    pub fn repairable(&self) -> bool {
        !matches!(
            self,
            SetFinding::WrongType { .. } | SetFinding::OptionsDiffer { .. }
        )
    }
}

impl SetDrift {
    pub fn forbidden(&self) -> &[Member] {
        self.findings
            .iter()
            .find_map(|f| match f {
                SetFinding::Forbidden { members } => Some(members.as_slice()),
                _ => None,
            })
            .unwrap_or(&[])
    }
}

/// A set to create: name, type, family and the `create` option words.
pub type SetCreate = (String, SetType, Family, Vec<String>);

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetRepair {
    pub create: Option<SetCreate>,
    pub add: Vec<(String, Member)>,
    pub del: Vec<(String, Member)>,
}

impl SetRepair {
    pub fn is_empty(&self) -> bool {
        self.create.is_none() && self.add.is_empty() && self.del.is_empty()
    }

    pub fn extend(&mut self, other: SetRepair) {
        debug_assert!(other.create.is_none() || self.create.is_none());
        if other.create.is_some() {
            self.create = other.create;
        }
        self.add.extend(other.add);
        self.del.extend(other.del);
    }
}

/// Plans one set. `seen`: the set's creation options as last seen, when it was seen: a missing
/// set is created with them (and the config's options over them), as its owner had made it.
pub fn plan_set(
    d: &DesiredSet,
    observed: Option<&SavedSet>,
    seen: Option<&[String]>,
) -> (Option<SetDrift>, Vec<SetRepair>) {
    let enforce = d.mode == Mode::Enforce;
    let mut findings = Vec::new();
    let mut repair = SetRepair::default();
    let family = crate::netfilter::model::ipset_family(d.family);
    let empty = crate::model::fast::HashSet::default();
    let members = match observed {
        None => {
            findings.push(SetFinding::Missing);
            if enforce {
                let words = d.options.create_words(seen.unwrap_or_default());
                repair.create = Some((d.set.clone(), d.kind, d.family, words));
            }
            &empty
        }
        Some(s)
            if s.kind != d.kind.as_str() || s.family.as_deref().is_some_and(|f| f != family) =>
        {
            let observed = format!("{} family {}", s.kind, s.family.as_deref().unwrap_or("-"));
            findings.push(SetFinding::WrongType { observed });
            let drift = SetDrift {
                name: d.name.clone(),
                mode: d.mode,
                object: d.set.clone(),
                findings,
            };
            return (Some(drift), Vec::new());
        }
        Some(s) => {
            if let Some(differences) = d.options.conflict(&s.options) {
                findings.push(SetFinding::OptionsDiffer { differences });
            }
            &s.members
        }
    };
    let (missing, forbidden, extra) = member_diff(d, members);
    if enforce {
        repair.add = missing.iter().map(|m| (d.set.clone(), *m)).collect();
        repair.del = forbidden
            .iter()
            .chain(&extra)
            .map(|m| (d.set.clone(), *m))
            .collect();
    }
    // A missing set's members are implied by "set missing".
    if !missing.is_empty() && observed.is_some() {
        findings.push(SetFinding::MembersMissing { members: missing });
    }
    if !extra.is_empty() {
        findings.push(SetFinding::Extra { members: extra });
    }
    if !forbidden.is_empty() {
        findings.push(SetFinding::Forbidden { members: forbidden });
    }
    let drift = (!findings.is_empty()).then(|| SetDrift {
        name: d.name.clone(),
        mode: d.mode,
        object: d.set.clone(),
        findings,
    });
    let repairs = if repair.is_empty() {
        Vec::new()
    } else {
        vec![repair]
    };
    (drift, repairs)
}

/// Members missing, forbidden ones present, and (for `exact`) extra ones, the last two sorted.
fn member_diff(
    d: &DesiredSet,
    members: &crate::model::fast::HashSet<Member>,
) -> (Vec<Member>, Vec<Member>, Vec<Member>) {
    let missing: Vec<Member> = d
        .members
        .iter()
        .filter(|m| !members.contains(m))
        .copied()
        .collect();
    let mut forbidden: Vec<Member> = members
        .iter()
        .filter(|m| d.forbids(m).is_some())
        .copied()
        .collect();
    forbidden.sort();
    let mut extra: Vec<Member> = if d.membership == Content::Exact {
        let want: crate::model::fast::HashSet<&Member> = d.members.iter().collect();
        members
            .iter()
            .filter(|m| !want.contains(m) && d.forbids(m).is_none())
            .copied()
            .collect()
    } else {
        Vec::new()
    };
    extra.sort();
    (missing, forbidden, extra)
}

/// Forbidden prefixes that a desired member overlaps (config validation uses this).
pub fn conflicts(members: &[Member], forbidden: &[IpNet]) -> Vec<(Member, IpNet)> {
    members
        .iter()
        .filter_map(|m| forbidden.iter().find(|f| m.overlaps(f)).map(|f| (*m, *f)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(membership: Content, mode: Mode) -> DesiredSet {
        DesiredSet {
            name: "svip".into(),
            mode,
            set: "kube-router-svip".into(),
            kind: SetType::HashIp,
            family: Family::Ipv4,
            options: Default::default(),
            members: vec![
                Member::parse("10.0.0.1").unwrap(),
                Member::parse("10.0.0.2").unwrap(),
            ],
            membership,
            forbidden: vec!["10.96.0.1/32".parse().unwrap()],
        }
    }

    fn saved(members: &[&str]) -> SavedSet {
        SavedSet {
            kind: "hash:ip".into(),
            family: Some("inet".into()),
            options: Vec::new(),
            members: members.iter().map(|m| Member::parse(m).unwrap()).collect(),
            other: Vec::new(),
        }
    }

    #[test]
    fn sets_get_missing_members_and_lose_forbidden_ones() {
        let d = set(Content::Contains, Mode::Enforce);
        let (drift, repair) = plan_set(
            &d,
            Some(&saved(&["10.0.0.1", "10.96.0.1", "10.9.9.9"])),
            None,
        );
        let drift = drift.unwrap();
        assert_eq!(drift.forbidden(), &[Member::parse("10.96.0.1").unwrap()]);
        assert_eq!(
            repair[0].add,
            vec![(
                "kube-router-svip".into(),
                Member::parse("10.0.0.2").unwrap()
            )]
        );
        assert_eq!(
            repair[0].del,
            vec![(
                "kube-router-svip".into(),
                Member::parse("10.96.0.1").unwrap()
            )]
        );
        // Exact also removes strangers.
        let d = set(Content::Exact, Mode::Enforce);
        let (_, repair) = plan_set(
            &d,
            Some(&saved(&["10.0.0.1", "10.0.0.2", "10.9.9.9"])),
            None,
        );
        assert_eq!(
            repair[0].del,
            vec![(
                "kube-router-svip".into(),
                Member::parse("10.9.9.9").unwrap()
            )]
        );
        // Observe: reported, nothing planned.
        let d = set(Content::Exact, Mode::Observe);
        let (drift, repair) = plan_set(&d, Some(&saved(&["10.96.0.1"])), None);
        assert_eq!(drift.unwrap().forbidden().len(), 1);
        assert!(repair.is_empty());
    }

    #[test]
    fn missing_set_is_created_wrong_type_is_left_alone() {
        let d = set(Content::Exact, Mode::Enforce);
        let (drift, repair) = plan_set(&d, None, None);
        assert_eq!(drift.unwrap().findings, vec![SetFinding::Missing]);
        assert_eq!(
            repair[0].create,
            Some((
                "kube-router-svip".into(),
                SetType::HashIp,
                Family::Ipv4,
                Vec::new()
            ))
        );
        assert_eq!(repair[0].add.len(), 2);
        let mut wrong = saved(&[]);
        wrong.kind = "hash:net".into();
        let (drift, repair) = plan_set(&d, Some(&wrong), None);
        assert!(matches!(
            drift.unwrap().findings[0],
            SetFinding::WrongType { .. }
        ));
        assert!(repair.is_empty());
        assert!(plan_set(&d, Some(&saved(&["10.0.0.1", "10.0.0.2"])), None)
            .0
            .is_none());
    }

    #[test]
    fn a_set_is_recreated_with_the_options_it_had_and_other_options_are_reported() {
        let mut d = set(Content::Contains, Mode::Enforce);
        let seen: Vec<String> = ["hashsize", "1024", "maxelem", "65536", "timeout", "0"]
            .map(String::from)
            .to_vec();
        let (_, repair) = plan_set(&d, None, Some(&seen));
        assert_eq!(
            repair[0].create.as_ref().unwrap().3,
            seen,
            "as its owner made it"
        );
        d.options.timeout = Some(0);
        let mut without = saved(&["10.0.0.1", "10.0.0.2"]);
        without.options = vec!["hashsize".into(), "1024".into()];
        let (drift, repair) = plan_set(&d, Some(&without), None);
        let drift = drift.unwrap();
        assert_eq!(
            drift.findings,
            vec![SetFinding::OptionsDiffer {
                differences: "no timeout (config: timeout 0)".into()
            }]
        );
        assert!(!drift.findings[0].repairable());
        assert!(repair.is_empty(), "nothing a repair could change");
        without.options = seen;
        assert!(plan_set(&d, Some(&without), None).0.is_none());
    }
}
