//! `spec.adopt`: selectors of kernel objects protected as they are seen, and their owners.

use super::build::{Builder, Object};
use super::raw::{RawAdopt, RawSpec};
use super::values;
use crate::adopt::{AdoptSelector, Range, RuleSelector, UnknownActor};
use crate::model::Mode;

/// An inclusive range `lo-hi`, or one number; `parse` checks each bound.
fn range(s: &str, parse: impl Fn(&str) -> Result<u32, String>) -> Result<Range, String> {
    let (lo, hi) = match s.split_once('-') {
        Some((lo, hi)) if !lo.is_empty() => (parse(lo.trim())?, parse(hi.trim())?),
        _ => {
            let v = parse(s)?;
            (v, v)
        }
    };
    if lo > hi {
        return Err(format!(
            "`{s}` is an empty range: the first bound must not be above the second"
        ));
    }
    Ok((lo, hi))
}

fn priority(s: &str) -> Result<u32, String> {
    values::u32_value(s, 0, false)
}

fn unknown_actor(s: &str) -> Result<UnknownActor, String> {
    match s {
        "restore" => Ok(UnknownActor::Restore),
        "forget" => Ok(UnknownActor::Forget),
        _ => Err(format!("`{s}` is not a policy: use restore or forget")),
    }
}

/// A command name as /proc/PID/comm shows it: 1 to 15 printable bytes, no `/`.
fn owner(s: &str) -> Result<String, String> {
    let ok = !s.is_empty() && s.len() <= 15 && s.bytes().all(|b| b.is_ascii_graphic() && b != b'/');
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "`{s}` is not a command name: use 1 to 15 printable characters, as /proc/PID/comm shows them"
        ))
    }
}

impl Builder<'_> {
    pub(super) fn adopt(&mut self, spec: &RawSpec, global: Mode) -> Vec<AdoptSelector> {
        let mut out = Vec::new();
        for (i, item) in spec.adopt.iter().flatten().enumerate() {
            let obj = Object {
                at: item.referenced,
                path: format!("spec.adopt[{i}]"),
            };
            if let Some(s) = self.adopt_one(&obj, &item.value, global) {
                out.push(s);
            }
        }
        out
    }

    fn adopt_one(&mut self, obj: &Object, a: &RawAdopt, global: Mode) -> Option<AdoptSelector> {
        let name = self.req(&a.name, obj, "name", values::object_name);
        let mode = self
            .opt(&a.mode, obj.field("mode"), values::mode)
            .unwrap_or(global);
        let unknown = self
            .opt(&a.unknown_actor, obj.field("unknownActor"), unknown_actor)
            .unwrap_or_default();
        let mut owners = Vec::new();
        let mut owners_ok = true;
        for (j, o) in a.owners.iter().flatten().enumerate() {
            match self.opt(o, format!("{}.owners[{j}]", obj.path), owner) {
                Some(o) => owners.push(o),
                None => owners_ok = false,
            }
        }
        if a.owners.as_ref().is_none_or(Vec::is_empty) {
            self.error(
                obj.at,
                obj.field("owners"),
                "is required: name the processes whose removals are legitimate (e.g. aws-k8s-agent)",
            );
            owners_ok = false;
        }
        let Some(raw_rules) = &a.rules else {
            self.error(
                obj.at,
                obj.field("rules"),
                "is required: say which rules to adopt (priority, table, protocols, family)",
            );
            return None;
        };
        let rpath = obj.field("rules");
        let r = &raw_rules.value;
        let family = self.opt(&r.family, format!("{rpath}.family"), values::family);
        let prio = self.opt(&r.priority, format!("{rpath}.priority"), |s| {
            range(s, priority)
        });
        let table = self.opt(&r.table, format!("{rpath}.table"), |s| {
            range(s, values::table)
        });
        let mut protocols = Vec::new();
        let mut protocols_ok = true;
        for (j, p) in r.protocols.iter().flatten().enumerate() {
            match self.opt(p, format!("{rpath}.protocols[{j}]"), values::protocol) {
                Some(p) => protocols.push(p),
                None => protocols_ok = false,
            }
        }
        let mut ok = owners_ok
            && protocols_ok
            && (r.family.is_none() || family.is_some())
            && (r.priority.is_none() || prio.is_some())
            && (r.table.is_none() || table.is_some());
        if r.family.is_none() && r.priority.is_none() && r.table.is_none() && protocols.is_empty() {
            // Adopting every rule would also protect what the owner of the host set up.
            self.error(
                raw_rules.referenced,
                rpath,
                "selects every rule: give at least one of priority, table, protocols",
            );
            ok = false;
        }
        let name = name?;
        ok.then_some(AdoptSelector {
            name,
            mode,
            rules: RuleSelector {
                family,
                priority: prio,
                table,
                protocols,
            },
            owners,
            unknown_actor: unknown,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(range("512-1536", priority), Ok((512, 1536)));
        assert_eq!(range("512", priority), Ok((512, 512)));
        assert_eq!(range("2-main", values::table), Ok((2, 254)));
        assert!(range("9-3", priority).unwrap_err().contains("empty range"));
        assert!(range("-3", priority).is_err());
        assert!(range("a-3", priority).is_err());
        assert!(range("1-", priority).is_err());
    }

    #[test]
    fn owners_and_policies() {
        assert_eq!(owner("aws-k8s-agent").as_deref(), Ok("aws-k8s-agent"));
        assert!(owner("a-very-long-process-name").is_err());
        assert!(owner("a b").is_err());
        assert!(owner("").is_err());
        assert_eq!(unknown_actor("forget"), Ok(UnknownActor::Forget));
        assert!(unknown_actor("keep").is_err());
    }
}
