//! Templates in config values: `{{ node.podCIDRs.ipv4 }}` stands for facts from the cluster
//! (docs/kubernetes.md has the reference). Pure: parsing happens at load time, so an unknown
//! template is an error with its file position; evaluation against [`ClusterFacts`] happens at
//! expansion time and yields the values as text, which the field's own parser then checks like
//! any literal.
//!
//! Grammar (one template per value, with optional literal text around it, e.g.
//! `"{{ node.internalIPs.ipv4 }}/32"`):
//!
//! ```text
//! {{ SOURCE [.ipv4|.ipv6] [(ARG=VALUE, ...)] }}     SOURCE: node.podCIDRs, node.internalIPs,
//! {{ node.labels[KEY] }}  {{ node.annotations[KEY] }}   node.externalIPs, services.clusterIPs,
//!                                                    services.externalIPs,
//!                                                    services.loadBalancerIPs, apiserver.endpoints
//! ```
//!
//! Only the `services.*` sources take arguments: `namespace=NS`, `type=ClusterIP|NodePort|
//! LoadBalancer|ExternalName`, `labels=SELECTOR` (`k=v`, `k!=v`, `k`, `!k`, comma-separated;
//! quote it when other arguments follow: `labels="app=x,tier=y", type=LoadBalancer`).

use crate::model::facts::{ClusterFacts, ServiceFacts};
use crate::model::Family;
use ipnet::IpNet;
use std::fmt;
use std::net::IpAddr;

/// A value with one template in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Templated {
    pub before: String,
    pub template: Template,
    pub after: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    pub source: Source,
    /// `.ipv4` / `.ipv6`: only values of that family.
    pub family: Option<Family>,
    /// As written between the braces, trimmed (for messages).
    pub text: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    NodePodCidrs,
    NodeInternalIps,
    NodeExternalIps,
    NodeLabel(String),
    NodeAnnotation(String),
    ServiceClusterIps(ServiceSelector),
    ServiceExternalIps(ServiceSelector),
    ServiceLoadBalancerIps(ServiceSelector),
    ApiserverEndpoints,
}

/// Which Services a `services.*` template looks at. Empty: all of them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceSelector {
    pub namespace: Option<String>,
    pub kind: Option<String>,
    pub labels: Vec<LabelRequirement>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

const SERVICE_TYPES: &[&str] = &["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"];

const KNOWN: &str = "node.podCIDRs, node.internalIPs, node.externalIPs, node.labels[KEY], node.annotations[KEY], services.clusterIPs, services.externalIPs, services.loadBalancerIPs, apiserver.endpoints";

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{{{ {} }}}}", self.text)
    }
}

/// Whether a value holds a template at all (then [`parse`] says whether it is a valid one).
pub fn has_template(s: &str) -> bool {
    s.contains("{{") || s.contains("}}")
}

/// Parses a value with a template in it.
pub fn parse(s: &str) -> Result<Templated, String> {
    let (before, rest) = s
        .split_once("{{")
        .ok_or_else(|| format!("`{s}` has `}}}}` without `{{{{`"))?;
    let (inner, after) = rest
        .split_once("}}")
        .ok_or_else(|| format!("`{s}` has `{{{{` without a closing `}}}}`"))?;
    if has_template(before) || has_template(after) {
        return Err(format!(
            "`{s}` holds more than one template: use one per value"
        ));
    }
    Ok(Templated {
        before: before.to_owned(),
        template: parse_inner(inner.trim())?,
        after: after.to_owned(),
    })
}

fn parse_inner(text: &str) -> Result<Template, String> {
    let unknown = || format!("unknown template `{{{{ {text} }}}}`: use one of {KNOWN}");
    // `node.labels[KEY]` / `node.annotations[KEY]`: the key may contain dots and slashes.
    for (prefix, label) in [("node.labels[", true), ("node.annotations[", false)] {
        if let Some(rest) = text.strip_prefix(prefix) {
            let key = rest
                .strip_suffix(']')
                .ok_or_else(|| format!("`{{{{ {text} }}}}`: missing `]` after the key"))?;
            let key = unquote(key.trim());
            if key.is_empty() || key.chars().any(|c| c.is_whitespace() || c == '"') {
                return Err(format!(
                    "`{{{{ {text} }}}}`: `{key}` is not a label or annotation key"
                ));
            }
            let source = if label {
                Source::NodeLabel(key.to_owned())
            } else {
                Source::NodeAnnotation(key.to_owned())
            };
            return Ok(Template {
                source,
                family: None,
                text: text.to_owned(),
            });
        }
    }
    let (path, args) = match text.split_once('(') {
        Some((p, a)) => {
            let a = a
                .strip_suffix(')')
                .ok_or_else(|| format!("`{{{{ {text} }}}}`: missing `)` after the arguments"))?;
            (p.trim(), Some(a))
        }
        None => (text, None),
    };
    let (path, family) = match path.rsplit_once('.') {
        Some((p, "ipv4")) => (p, Some(Family::Ipv4)),
        Some((p, "ipv6")) => (p, Some(Family::Ipv6)),
        _ => (path, None),
    };
    let selector = match args {
        Some(a) if path.starts_with("services.") => {
            selector(a).map_err(|e| format!("`{{{{ {text} }}}}`: {e}"))?
        }
        Some(_) => {
            return Err(format!(
                "`{{{{ {text} }}}}`: only services.* templates take arguments"
            ))
        }
        None => ServiceSelector::default(),
    };
    let source = match path {
        "node.podCIDRs" => Source::NodePodCidrs,
        "node.internalIPs" => Source::NodeInternalIps,
        "node.externalIPs" => Source::NodeExternalIps,
        "services.clusterIPs" => Source::ServiceClusterIps(selector),
        "services.externalIPs" => Source::ServiceExternalIps(selector),
        "services.loadBalancerIPs" => Source::ServiceLoadBalancerIps(selector),
        "apiserver.endpoints" => Source::ApiserverEndpoints,
        _ => return Err(unknown()),
    };
    Ok(Template {
        source,
        family,
        text: text.to_owned(),
    })
}

fn unquote(s: &str) -> &str {
    s.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(s)
}

/// Splits `a=b, labels="x=y,z", c=d` at the commas outside quotes.
fn split_args(s: &str) -> Result<Vec<String>, String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            ',' if !quoted => parts.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    if quoted {
        return Err("unbalanced `\"`".to_owned());
    }
    parts.push(cur);
    Ok(parts
        .into_iter()
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect())
}

fn selector(args: &str) -> Result<ServiceSelector, String> {
    let mut sel = ServiceSelector::default();
    let mut labels: Option<String> = None;
    for part in split_args(args)? {
        let (key, value) = match part.split_once('=') {
            Some((k, v)) => (k.trim(), unquote(v.trim())),
            None => ("", part.as_str()),
        };
        match key {
            "namespace" if sel.namespace.is_none() => {
                if value.is_empty() {
                    return Err("`namespace=` needs a value".to_owned());
                }
                sel.namespace = Some(value.to_owned());
            }
            "type" if sel.kind.is_none() => {
                if !SERVICE_TYPES.contains(&value) {
                    return Err(format!(
                        "unknown Service type `{value}`: use {}",
                        SERVICE_TYPES.join(", ")
                    ));
                }
                sel.kind = Some(value.to_owned());
            }
            "labels" if labels.is_none() => labels = Some(value.to_owned()),
            "namespace" | "type" | "labels" => return Err(format!("`{key}` is given twice")),
            // An unquoted `labels=a=b,c=d` splits into `labels=a=b` and `c=d`: the rest of the
            // selector, as long as it follows `labels`.
            _ if labels.is_some() => {
                let l = labels.get_or_insert_with(String::new);
                l.push(',');
                l.push_str(&part);
            }
            _ => {
                return Err(format!(
                    "unknown argument `{part}`: use namespace=NS, type=TYPE, labels=SELECTOR"
                ))
            }
        }
    }
    if let Some(l) = labels {
        sel.labels = label_selector(&l)?;
    }
    Ok(sel)
}

/// A Kubernetes equality-based label selector (`k=v`, `k==v`, `k!=v`, `k`, `!k`).
pub fn label_selector(s: &str) -> Result<Vec<LabelRequirement>, String> {
    let key_ok = |k: &str| {
        !k.is_empty()
            && k.len() <= 317
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
    };
    let value_ok = |v: &str| {
        v.len() <= 63
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    let mut out = Vec::new();
    for req in s.split(',').map(str::trim).filter(|r| !r.is_empty()) {
        let r = if let Some((k, v)) = req.split_once("!=") {
            LabelRequirement::NotEquals(k.trim().to_owned(), v.trim().to_owned())
        } else if let Some((k, v)) = req.split_once("==").or_else(|| req.split_once('=')) {
            LabelRequirement::Equals(k.trim().to_owned(), v.trim().to_owned())
        } else if let Some(k) = req.strip_prefix('!') {
            LabelRequirement::NotExists(k.trim().to_owned())
        } else {
            LabelRequirement::Exists(req.to_owned())
        };
        let (k, v) = match &r {
            LabelRequirement::Equals(k, v) | LabelRequirement::NotEquals(k, v) => (k, Some(v)),
            LabelRequirement::Exists(k) | LabelRequirement::NotExists(k) => (k, None),
        };
        if !key_ok(k) || v.is_some_and(|v| !value_ok(v)) {
            return Err(format!(
                "`{req}` is not a label requirement (k=v, k!=v, k, !k)"
            ));
        }
        out.push(r);
    }
    if out.is_empty() {
        return Err("the label selector is empty".to_owned());
    }
    Ok(out)
}

impl ServiceSelector {
    pub fn matches(&self, s: &ServiceFacts) -> bool {
        self.namespace
            .as_ref()
            .is_none_or(|n| n.as_str() == &*s.namespace)
            && self.kind.as_ref().is_none_or(|k| k.as_str() == &*s.kind)
            && self.labels.iter().all(|r| match r {
                LabelRequirement::Equals(k, v) => s.labels.get(k) == Some(v),
                LabelRequirement::NotEquals(k, v) => s.labels.get(k) != Some(v),
                LabelRequirement::Exists(k) => s.labels.contains_key(k),
                LabelRequirement::NotExists(k) => !s.labels.contains_key(k),
            })
    }
}

/// The family of a value, if it is an address or a prefix.
pub fn family_of(value: &str) -> Option<Family> {
    let addr = value.split(['/', ',']).next().unwrap_or(value);
    addr.parse::<IpAddr>().ok().map(|a| Family::of(&a))
}

impl Template {
    /// Evaluates against the facts; `None` when the fact does not exist (yet), e.g. the Node has
    /// not been seen or has no such annotation. A list may be empty (no Service matches).
    pub fn values(&self, facts: &ClusterFacts) -> Option<Vec<String>> {
        let ips = |v: &[IpAddr]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        let services = |sel: &ServiceSelector, pick: fn(&ServiceFacts) -> &Vec<IpAddr>| {
            let mut out: Vec<IpAddr> = facts
                .services
                .values()
                .filter(|s| sel.matches(s))
                .flat_map(|s| pick(s).iter().copied())
                .collect();
            out.sort_unstable();
            out.dedup();
            ips(&out)
        };
        let all = match &self.source {
            Source::NodePodCidrs => facts
                .node
                .as_ref()?
                .pod_cidrs
                .iter()
                .map(IpNet::to_string)
                .collect(),
            Source::NodeInternalIps => ips(&facts.node.as_ref()?.internal_ips),
            Source::NodeExternalIps => ips(&facts.node.as_ref()?.external_ips),
            Source::NodeLabel(k) => vec![facts.node.as_ref()?.labels.get(k)?.clone()],
            Source::NodeAnnotation(k) => vec![facts.node.as_ref()?.annotations.get(k)?.clone()],
            Source::ServiceClusterIps(sel) => services(sel, |s| &s.cluster_ips),
            Source::ServiceExternalIps(sel) => services(sel, |s| &s.external_ips),
            Source::ServiceLoadBalancerIps(sel) => services(sel, |s| &s.load_balancer_ips),
            Source::ApiserverEndpoints => ips(&facts.apiserver),
        };
        Some(match self.family {
            None => all,
            Some(f) => all
                .into_iter()
                .filter(|v| family_of(v) == Some(f))
                .collect(),
        })
    }

    /// A stand-in value of the template's kind (of its family, else of `hint`), to check the
    /// rest of an object at load time.
    pub fn sample(&self, hint: Option<Family>) -> &'static str {
        let v6 = self.family.or(hint) == Some(Family::Ipv6);
        match (&self.source, v6) {
            (Source::NodePodCidrs, false) => "192.0.2.0/24",
            (Source::NodePodCidrs, true) => "2001:db8::/64",
            (_, false) => "192.0.2.1",
            (_, true) => "2001:db8::1",
        }
    }
}

impl Templated {
    /// The full values (`before` + each value + `after`), or `None` when the fact is missing.
    pub fn values(&self, facts: &ClusterFacts) -> Option<Vec<String>> {
        Some(
            self.template
                .values(facts)?
                .into_iter()
                .map(|v| format!("{}{v}{}", self.before, self.after))
                .collect(),
        )
    }

    pub fn sample(&self, hint: Option<Family>) -> String {
        format!(
            "{}{}{}",
            self.before,
            self.template.sample(hint),
            self.after
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::facts::NodeFacts;

    fn facts() -> ClusterFacts {
        let mut f = ClusterFacts {
            node: Some(NodeFacts {
                name: "n1".into(),
                pod_cidrs: vec![
                    "10.244.1.0/24".parse().unwrap(),
                    "fd00:10::/64".parse().unwrap(),
                ],
                internal_ips: vec!["10.0.0.5".parse().unwrap()],
                external_ips: vec![],
                labels: [("zone".to_owned(), "a".to_owned())].into(),
                annotations: [(
                    "flannel.alpha.coreos.com/public-ip".to_owned(),
                    "203.0.113.9".to_owned(),
                )]
                .into(),
            }),
            apiserver: vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
            ..Default::default()
        };
        for (ns, name, kind, app, ip) in [
            ("kube-system", "lb1", "LoadBalancer", "x", "198.51.100.1"),
            ("kube-system", "lb2", "LoadBalancer", "y", "198.51.100.2"),
            ("default", "lb3", "LoadBalancer", "x", "198.51.100.3"),
            ("default", "c1", "ClusterIP", "x", ""),
        ] {
            std::sync::Arc::make_mut(&mut f.services).insert(
                format!("{ns}/{name}"),
                std::sync::Arc::new(ServiceFacts {
                    namespace: ns.into(),
                    name: name.into(),
                    kind: kind.into(),
                    labels: [("app".to_owned(), app.to_owned())].into(),
                    cluster_ips: vec!["10.96.0.10".parse().unwrap()],
                    external_ips: vec![],
                    load_balancer_ips: ip.parse().into_iter().collect(),
                }),
            );
        }
        f
    }

    fn eval(s: &str) -> Option<Vec<String>> {
        parse(s).unwrap().values(&facts())
    }

    #[test]
    fn node_facts() {
        assert_eq!(
            eval("{{ node.podCIDRs.ipv4 }}"),
            Some(vec!["10.244.1.0/24".into()])
        );
        assert_eq!(
            eval("{{node.podCIDRs.ipv6}}"),
            Some(vec!["fd00:10::/64".into()])
        );
        assert_eq!(eval("{{ node.podCIDRs }}").unwrap().len(), 2);
        assert_eq!(
            eval("{{ node.internalIPs.ipv4 }}/32"),
            Some(vec!["10.0.0.5/32".into()])
        );
        assert_eq!(
            eval("{{ node.annotations[flannel.alpha.coreos.com/public-ip] }}"),
            Some(vec!["203.0.113.9".into()])
        );
        assert_eq!(eval("{{ node.labels[\"zone\"] }}"), Some(vec!["a".into()]));
        // Missing facts are pending (None), not empty.
        assert_eq!(eval("{{ node.labels[nope] }}"), None);
        let t = parse("{{ node.podCIDRs }}").unwrap();
        assert_eq!(t.values(&ClusterFacts::default()), None);
    }

    #[test]
    fn services_and_apiserver() {
        assert_eq!(
            eval("{{ services.loadBalancerIPs(namespace=kube-system, labels=app=x) }}"),
            Some(vec!["198.51.100.1".into()])
        );
        assert_eq!(eval("{{ services.loadBalancerIPs }}").unwrap().len(), 3);
        assert_eq!(
            eval("{{ services.loadBalancerIPs(labels=\"app!=x\", type=LoadBalancer) }}"),
            Some(vec!["198.51.100.2".into()])
        );
        // Deduplicated: every Service has the same ClusterIP here.
        assert_eq!(
            eval("{{ services.clusterIPs(type=ClusterIP) }}"),
            Some(vec!["10.96.0.10".into()])
        );
        assert_eq!(eval("{{ services.externalIPs }}"), Some(vec![]));
        assert_eq!(
            eval("{{ apiserver.endpoints.ipv6 }}"),
            Some(vec!["fd00::1".into()])
        );
        assert_eq!(eval("{{ apiserver.endpoints }}").unwrap().len(), 2);
    }

    #[test]
    fn refused() {
        for (s, msg) in [
            ("{{ node.podCIDR }}", "unknown template"),
            ("{{ node.podCIDRs.ipv5 }}", "unknown template"),
            ("{{ node.podCIDRs(namespace=x) }}", "only services"),
            (
                "{{ services.clusterIPs(type=Foo) }}",
                "unknown Service type",
            ),
            ("{{ services.clusterIPs(color=red) }}", "unknown argument"),
            ("{{ services.clusterIPs(labels=\"a=b) }}", "unbalanced"),
            (
                "{{ services.clusterIPs(labels=a b) }}",
                "not a label requirement",
            ),
            ("{{ node.podCIDRs", "without a closing"),
            ("node.podCIDRs }}", "without `{{`"),
            ("{{ a }}{{ b }}", "more than one"),
            ("{{ node.labels[zone }}", "missing `]`"),
        ] {
            let e = parse(s).unwrap_err();
            assert!(e.contains(msg), "{s}: {e}");
        }
    }
}
