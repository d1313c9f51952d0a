//! `spec.adopt`: selectors of kernel objects protected as they are seen, and their owners.

use super::build::{Builder, Object};
use super::raw::{
    RawAdopt, RawChainSelector, RawRouteSelector, RawRuleSelector, RawSetSelector, RawSpec,
};
use super::values;
use crate::adopt::{
    AdoptSelector, ChainSelector, Range, RouteSelector, RuleSelector, SetSelector, UnknownActor,
};
use crate::model::Family;
use crate::model::Mode;
use crate::netfilter::model::Table;
use crate::pod_liveness::DEFAULT_GRACE;
use serde_saphyr::Spanned;
use std::time::Duration;

/// Bounds of `podLivenessGrace`: shorter than a second would race the API server's view of a
/// pod the CNI is still setting up.
const GRACE_MIN: Duration = Duration::from_secs(1);
const GRACE_MAX: Duration = Duration::from_secs(24 * 60 * 60);

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
        let (owners, mut ok) = self.owners(obj, a);
        if !self.adopts_something(obj, a) {
            return None;
        }
        let rules = self.given(&a.rules, &mut ok, |b, raw| b.rule_selector(obj, raw));
        let routes = self.given(&a.routes, &mut ok, |b, raw| b.route_selector(obj, raw));
        let chains = self.given(&a.chains, &mut ok, |b, raw| b.chain_selector(obj, raw));
        let ipsets = self.given(&a.ipsets, &mut ok, |b, raw| b.set_selector(obj, raw));
        let neighbours = self.given(&a.neighbours, &mut ok, |b, raw| {
            b.neighbour_selector(obj, raw)
        });
        let pod_liveness = self.pod_liveness(obj, a);
        ok &= pod_liveness.is_ok();
        let name = name?;
        ok.then_some(AdoptSelector {
            name,
            mode,
            rules,
            routes,
            chains,
            ipsets,
            neighbours,
            owners,
            unknown_actor: unknown,
            pod_liveness: pod_liveness.ok().flatten(),
        })
    }

    /// `owners` (required, not empty), and whether every one is valid.
    fn owners(&mut self, obj: &Object, a: &RawAdopt) -> (Vec<String>, bool) {
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
        (owners, owners_ok)
    }

    /// An entry must select something to adopt (reported when it does not).
    fn adopts_something(&mut self, obj: &Object, a: &RawAdopt) -> bool {
        if a.rules.is_none()
            && a.routes.is_none()
            && a.chains.is_none()
            && a.ipsets.is_none()
            && a.nftables.is_none()
            && a.neighbours.is_none()
        {
            self.error(
                obj.at,
                obj.path.clone(),
                "adopts nothing: give `rules` (priority, table, protocols, family), `routes` (table, protocols, device, family), `chains` (names, table, family), `ipsets` (names), `nftables` (tables, family) or `neighbours` (devices)",
            );
            return false;
        }
        true
    }

    /// A selector the entry may give: `None` when it does not; an invalid one (reported) clears
    /// `ok`.
    fn given<R, S>(
        &mut self,
        raw: &Option<R>,
        ok: &mut bool,
        check: impl FnOnce(&mut Self, &R) -> Option<S>,
    ) -> Option<S> {
        let selector = check(self, raw.as_ref()?);
        *ok &= selector.is_some();
        selector
    }

    /// `podLiveness` and its grace period: `Ok(None)` when off, `Err` when invalid (reported).
    fn pod_liveness(&mut self, obj: &Object, a: &RawAdopt) -> Result<Option<Duration>, ()> {
        let on = match &a.pod_liveness {
            None => false,
            Some(_) => self
                .opt(&a.pod_liveness, obj.field("podLiveness"), values::boolean)
                .ok_or(())?,
        };
        let grace = match &a.pod_liveness_grace {
            None => Some(DEFAULT_GRACE),
            Some(_) => self.opt(&a.pod_liveness_grace, obj.field("podLivenessGrace"), |s| {
                values::duration_within(s, "the grace period", GRACE_MIN, GRACE_MAX)
            }),
        };
        if let (Some(g), false) = (&a.pod_liveness_grace, on) {
            self.error(
                g.referenced,
                obj.field("podLivenessGrace"),
                "applies only with `podLiveness: true`",
            );
            return Err(());
        }
        if let (Some(p), true, false) = (&a.pod_liveness, on, self.kubernetes) {
            // In file mode no Pod is watched: the option would silently do nothing.
            self.error(
                p.referenced,
                obj.field("podLiveness"),
                "needs Kubernetes mode (`run --configmap`): only there are the node's Pods watched",
            );
            return Err(());
        }
        match (on, grace) {
            (false, _) => Ok(None),
            (true, Some(g)) => Ok(Some(g)),
            (true, None) => Err(()),
        }
    }

    fn protocols(&mut self, list: &Option<Vec<super::raw::Scalar>>, path: &str) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        let mut ok = true;
        for (j, p) in list.iter().flatten().enumerate() {
            match self.opt(p, format!("{path}.protocols[{j}]"), values::protocol) {
                Some(p) => out.push(p),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn rule_selector(
        &mut self,
        obj: &Object,
        raw: &Spanned<RawRuleSelector>,
    ) -> Option<RuleSelector> {
        let path = obj.field("rules");
        let r = &raw.value;
        let family = self.opt(&r.family, format!("{path}.family"), values::family);
        let prio = self.opt(&r.priority, format!("{path}.priority"), |s| {
            range(s, priority)
        });
        let table = self.opt(&r.table, format!("{path}.table"), |s| {
            range(s, values::table)
        });
        let protocols = self.protocols(&r.protocols, &path);
        let mut ok = protocols.is_some()
            && (r.family.is_none() || family.is_some())
            && (r.priority.is_none() || prio.is_some())
            && (r.table.is_none() || table.is_some());
        if r.priority.is_none()
            && r.table.is_none()
            && r.protocols.as_ref().is_none_or(Vec::is_empty)
        {
            // Adopting every rule would also protect what the owner of the host set up.
            self.error(
                raw.referenced,
                path,
                "selects every rule: give at least one of priority, table, protocols",
            );
            ok = false;
        }
        ok.then(|| RuleSelector {
            family,
            priority: prio,
            table,
            protocols: protocols.unwrap_or_default(),
        })
    }

    fn route_selector(
        &mut self,
        obj: &Object,
        raw: &Spanned<RawRouteSelector>,
    ) -> Option<RouteSelector> {
        let path = obj.field("routes");
        let r = &raw.value;
        let family = self.opt(&r.family, format!("{path}.family"), values::family);
        let table = self.opt(&r.table, format!("{path}.table"), |s| {
            range(s, values::table)
        });
        let device = self.opt(&r.device, format!("{path}.device"), device_pattern);
        let protocols = self.protocols(&r.protocols, &path);
        let mut ok = protocols.is_some()
            && (r.family.is_none() || family.is_some())
            && (r.table.is_none() || table.is_some())
            && (r.device.is_none() || device.is_some());
        if r.table.is_none() {
            // The mirror keeps only the routes of these tables (a node may hold a full BGP table).
            self.error(
                raw.referenced,
                format!("{path}.table"),
                "is required: the tables whose routes may be adopted (a number, a name or a range such as 2-100)",
            );
            ok = false;
        }
        ok.then(|| RouteSelector {
            family,
            table,
            protocols: protocols.unwrap_or_default(),
            device,
        })
    }
}

impl Builder<'_> {
    /// Name patterns: required, at least one, each checked by `check` (on the prefix of a
    /// `*` pattern, as the names it matches are written into restore input).
    pub(super) fn name_patterns(
        &mut self,
        list: &Option<Vec<super::raw::Scalar>>,
        at: serde_saphyr::Location,
        path: &str,
        check: fn(&str) -> Result<String, String>,
        example: &str,
    ) -> Option<Vec<String>> {
        let mut out = Vec::new();
        let mut ok = true;
        for (j, p) in list.iter().flatten().enumerate() {
            match self.opt(p, format!("{path}.names[{j}]"), |s| {
                name_pattern(s, check, example)
            }) {
                Some(p) => out.push(p),
                None => ok = false,
            }
        }
        if list.as_ref().is_none_or(Vec::is_empty) {
            self.error(
                at,
                format!("{path}.names"),
                format!("is required: the names to adopt, exact or a prefix ending in `*` (`{example}`)"),
            );
            ok = false;
        }
        ok.then_some(out)
    }

    fn chain_selector(
        &mut self,
        obj: &Object,
        raw: &Spanned<RawChainSelector>,
    ) -> Option<ChainSelector> {
        let path = obj.field("chains");
        let r = &raw.value;
        let family = self.opt(&r.family, format!("{path}.family"), values::family);
        let table = self.opt(&r.table, format!("{path}.table"), super::netfilter::table);
        let names = self.name_patterns(
            &r.names,
            raw.referenced,
            &path,
            super::netfilter::chain_name,
            "KUBE-ROUTER-*",
        );
        let ok = (r.family.is_none() || family.is_some()) && (r.table.is_none() || table.is_some());
        (ok && names.is_some()).then(|| ChainSelector {
            // Like `spec.chains`: IPv4 unless told.
            family: family.unwrap_or(Family::Ipv4),
            tables: table.map_or_else(|| Table::ALL.to_vec(), |t| vec![t]),
            names: names.unwrap_or_default(),
        })
    }

    fn set_selector(&mut self, obj: &Object, raw: &Spanned<RawSetSelector>) -> Option<SetSelector> {
        let path = obj.field("ipsets");
        let names = self.name_patterns(
            &raw.value.names,
            raw.referenced,
            &path,
            super::netfilter::set_name,
            "kube-router-*",
        )?;
        Some(SetSelector { names })
    }
}

/// A chain or set name, or a prefix of one followed by `*`, checked like the names config
/// protects itself.
fn name_pattern(
    s: &str,
    check: fn(&str) -> Result<String, String>,
    example: &str,
) -> Result<String, String> {
    match s.strip_suffix('*') {
        Some("") => Err(format!(
            "`*` would adopt every one: give a prefix (`{example}`)"
        )),
        Some(prefix) => check(prefix)
            .map(|_| s.to_owned())
            .map_err(|e| format!("{e} (a prefix may end in `*`: `{example}`)")),
        None => check(s),
    }
}

/// An interface name, or a prefix of one followed by `*`.
fn device_pattern(s: &str) -> Result<String, String> {
    let name = s.strip_suffix('*').unwrap_or(s);
    if name.is_empty() && s == "*" {
        return Err("`*` matches every device: leave `device` out instead".into());
    }
    values::ifname(name)
        .map(|_| s.to_owned())
        .map_err(|e| format!("{e} (a prefix may end in `*`: `eni*`)"))
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
        assert_eq!(device_pattern("eni*").as_deref(), Ok("eni*"));
        assert_eq!(device_pattern("eth0").as_deref(), Ok("eth0"));
        assert!(device_pattern("*").is_err());
        assert!(device_pattern("a/b*").is_err());
    }

    #[test]
    fn name_patterns_refuse_what_could_inject() {
        let chain = |s| name_pattern(s, super::super::netfilter::chain_name, "X-*");
        let set = |s| name_pattern(s, super::super::netfilter::set_name, "x-*");
        assert_eq!(chain("KUBE-ROUTER-*").as_deref(), Ok("KUBE-ROUTER-*"));
        assert_eq!(chain("KUBE-ROUTER-X").as_deref(), Ok("KUBE-ROUTER-X"));
        assert!(chain("*").is_err());
        assert!(chain("A\nCOMMIT*").is_err());
        assert!(chain("A B").is_err());
        assert!(chain("ACCEPT").is_err(), "a target");
        assert!(chain(":X*").is_err());
        assert!(chain("A*B").is_err(), "`*` only at the end");
        assert_eq!(set("kube-router-*").as_deref(), Ok("kube-router-*"));
        assert!(set("a\nflush*").is_err());
        assert!(set("a b").is_err());
        assert!(set("*").is_err());
    }

    fn parse_k8s(body: &str) -> Result<crate::config::Config, crate::config::ConfigError> {
        let text = format!("apiVersion: netwarden.io/v1alpha1\nkind: ProtectedState\n{body}");
        crate::config::parse_kubernetes("cm", &text)
    }

    const POD_SELECTOR: &str = "spec:
  adopt:
    - name: vpc-cni
      rules:
        priority: 512-1536
      owners: [aws-k8s-agent]
      podLiveness: true
";

    #[test]
    fn pod_liveness_is_opt_in_with_a_default_grace() {
        let c = parse_k8s(POD_SELECTOR).unwrap();
        assert_eq!(c.adopt[0].pod_liveness, Some(DEFAULT_GRACE));
        let c = parse_k8s(&format!("{POD_SELECTOR}      podLivenessGrace: 5s\n")).unwrap();
        assert_eq!(c.adopt[0].pod_liveness, Some(Duration::from_secs(5)));
        let off = POD_SELECTOR.replace("podLiveness: true", "podLiveness: false");
        assert_eq!(parse_k8s(&off).unwrap().adopt[0].pod_liveness, None);
        let absent = POD_SELECTOR.replace("      podLiveness: true\n", "");
        assert_eq!(parse_k8s(&absent).unwrap().adopt[0].pod_liveness, None);
    }

    fn errors(r: Result<crate::config::Config, crate::config::ConfigError>) -> String {
        match r {
            Err(crate::config::ConfigError::Invalid(e)) => e
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n"),
            other => panic!("expected validation errors, got {other:?}"),
        }
    }

    #[test]
    fn pod_liveness_is_validated() {
        let file_mode = crate::config::parse(
            "f.yaml",
            &format!("apiVersion: netwarden.io/v1alpha1\nkind: ProtectedState\n{POD_SELECTOR}"),
        );
        let e = errors(file_mode);
        assert!(
            e.starts_with("f.yaml:9:20: spec.adopt[0].podLiveness: needs Kubernetes mode"),
            "{e}"
        );
        let e = errors(parse_k8s(&POD_SELECTOR.replace("true", "yes please")));
        assert!(
            e.contains("spec.adopt[0].podLiveness: `yes please` is not a boolean"),
            "{e}"
        );
        let e = errors(parse_k8s(&format!(
            "{POD_SELECTOR}      podLivenessGrace: 500ms\n"
        )));
        assert!(
            e.contains(
                "podLivenessGrace: `500ms` is too short: the grace period must be at least 1s"
            ),
            "{e}"
        );
        let e = errors(parse_k8s(&format!(
            "{POD_SELECTOR}      podLivenessGrace: 2d\n"
        )));
        assert!(
            e.contains("podLivenessGrace: `2d` is not a duration"),
            "{e}"
        );
        let alone = POD_SELECTOR.replace("podLiveness: true", "podLivenessGrace: 30s");
        let e = errors(parse_k8s(&alone));
        assert!(
            e.contains("podLivenessGrace: applies only with `podLiveness: true`"),
            "{e}"
        );
    }
}
