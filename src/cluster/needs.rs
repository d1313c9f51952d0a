//! What a config's templates (and adopt selectors) need from the cluster, so that the agent
//! watches only that and keeps only the fields it reads. Pure.
//!
//! No `services.*` template: no Service watch at all. Otherwise only the Services some template
//! selects are kept (by namespace, type and labels), with only the address lists the templates
//! read and only the label keys their selectors test. When every `services.*` template names the
//! same namespace, only that namespace is watched.

use super::facts::{NodeFacts, ServiceFacts};
use crate::config::template::{LabelRequirement, ServiceSelector, Source};
use crate::config::Config;
use std::collections::BTreeSet;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// `node.labels[KEY]` keys.
    pub node_labels: BTreeSet<String>,
    /// `node.annotations[KEY]` keys.
    pub node_annotations: BTreeSet<String>,
    /// `None`: no `services.*` template.
    pub services: Option<ServiceNeeds>,
    /// `apiserver.endpoints` is used.
    pub apiserver: bool,
    /// An adopt selector asks for `podLiveness`.
    pub pods: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceNeeds {
    pub selectors: Vec<ServiceSelector>,
    pub cluster_ips: bool,
    pub external_ips: bool,
    pub load_balancer_ips: bool,
    /// Label keys the selectors test.
    pub label_keys: BTreeSet<String>,
}

/// What `cfg` needs.
pub fn needs(cfg: &Config) -> Needs {
    let mut n = Needs {
        pods: cfg.adopt.iter().any(|s| s.pod_liveness.is_some()),
        ..Needs::default()
    };
    for t in cfg.templates.templates() {
        let (sel, field) = match &t.source {
            Source::NodeLabel(k) => {
                n.node_labels.insert(k.clone());
                continue;
            }
            Source::NodeAnnotation(k) => {
                n.node_annotations.insert(k.clone());
                continue;
            }
            Source::ApiserverEndpoints => {
                n.apiserver = true;
                continue;
            }
            Source::NodePodCidrs | Source::NodeInternalIps | Source::NodeExternalIps => continue,
            Source::ServiceClusterIps(s) => (s, 0),
            Source::ServiceExternalIps(s) => (s, 1),
            Source::ServiceLoadBalancerIps(s) => (s, 2),
        };
        let s = n.services.get_or_insert_with(ServiceNeeds::default);
        match field {
            0 => s.cluster_ips = true,
            1 => s.external_ips = true,
            _ => s.load_balancer_ips = true,
        }
        for r in &sel.labels {
            let (LabelRequirement::Equals(k, _)
            | LabelRequirement::NotEquals(k, _)
            | LabelRequirement::Exists(k)
            | LabelRequirement::NotExists(k)) = r;
            s.label_keys.insert(k.clone());
        }
        if !s.selectors.contains(sel) {
            s.selectors.push(sel.clone());
        }
    }
    n
}

impl Needs {
    /// The node's facts with only the labels and annotations templates read.
    pub fn node_facts(&self, full: &NodeFacts) -> NodeFacts {
        let keep = |map: &std::collections::BTreeMap<String, String>, keys: &BTreeSet<String>| {
            map.iter()
                .filter(|(k, _)| keys.contains(*k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        NodeFacts {
            labels: keep(&full.labels, &self.node_labels),
            annotations: keep(&full.annotations, &self.node_annotations),
            ..full.clone()
        }
    }
}

impl ServiceNeeds {
    /// The one namespace all templates select, if they agree on one: only it is watched.
    pub fn namespace(&self) -> Option<&str> {
        let first = self.selectors.first()?.namespace.as_deref()?;
        self.selectors
            .iter()
            .all(|s| s.namespace.as_deref() == Some(first))
            .then_some(first)
    }

    /// The facts of a Service worth keeping: `None` when no template selects it; else only the
    /// fields some template reads.
    pub fn keep(&self, mut f: ServiceFacts) -> Option<ServiceFacts> {
        if !self.selectors.iter().any(|s| s.matches(&f)) {
            return None;
        }
        // A new map rather than `retain`: a map emptied in place keeps its node allocated
        // (half a kilobyte a Service).
        f.labels = std::mem::take(&mut f.labels)
            .into_iter()
            .filter(|(k, _)| self.label_keys.contains(k))
            .collect();
        if !self.cluster_ips {
            f.cluster_ips = Vec::new();
        }
        if !self.external_ips {
            f.external_ips = Vec::new();
        }
        if !self.load_balancer_ips {
            f.load_balancer_ips = Vec::new();
        }
        f.cluster_ips.shrink_to_fit();
        f.external_ips.shrink_to_fit();
        f.load_balancer_ips.shrink_to_fit();
        Some(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(spec: &str) -> Config {
        let text =
            format!("apiVersion: netwarden.io/v1alpha1\nkind: ProtectedState\nspec:\n{spec}");
        crate::config::parse_kubernetes("test", &text).unwrap()
    }

    fn svc(ns: &str, kind: &str, labels: &[(&str, &str)]) -> ServiceFacts {
        ServiceFacts {
            namespace: ns.into(),
            name: "s".into(),
            kind: kind.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            cluster_ips: vec!["10.96.0.1".parse().unwrap()],
            external_ips: vec!["192.0.2.1".parse().unwrap()],
            load_balancer_ips: vec!["198.51.100.1".parse().unwrap()],
        }
    }

    #[test]
    fn no_service_template_no_service_watch() {
        let n = needs(&config(
            "  rules:\n    - name: r\n      priority: 100\n      from: \"{{ node.podCIDRs.ipv4 }}\"\n      table: 77\n",
        ));
        assert_eq!(n.services, None);
        assert!(!n.apiserver && !n.pods);
        assert!(n.node_labels.is_empty());
    }

    #[test]
    fn only_selected_services_and_read_fields_are_kept() {
        let n = needs(&config(
            "  ipsets:\n    - name: lb\n      type: hash:ip\n      members: [\"{{ services.loadBalancerIPs(type=LoadBalancer, namespace=shop) }}\", \"{{ services.externalIPs(namespace=shop, labels=\\\"app=web\\\") }}\"]\n      forbidden: [\"{{ apiserver.endpoints }}\", \"{{ node.annotations[a/b] }}\"]\n",
        ));
        assert!(n.apiserver);
        assert_eq!(n.node_annotations.iter().collect::<Vec<_>>(), ["a/b"]);
        let s = n.services.unwrap();
        assert_eq!(s.namespace(), Some("shop"));
        assert!(s.load_balancer_ips && s.external_ips && !s.cluster_ips);
        assert_eq!(s.keep(svc("other", "LoadBalancer", &[])), None);
        let kept = s
            .keep(svc("shop", "ClusterIP", &[("app", "web"), ("team", "x")]))
            .unwrap();
        assert!(kept.cluster_ips.is_empty(), "no template reads clusterIPs");
        assert_eq!(kept.external_ips.len(), 1);
        assert_eq!(kept.labels.len(), 1, "only the label keys selectors test");
        assert_eq!(s.keep(svc("shop", "ClusterIP", &[("app", "db")])), None);
        assert!(s.keep(svc("shop", "LoadBalancer", &[])).is_some());
    }

    #[test]
    fn templates_of_several_namespaces_watch_all() {
        let n = needs(&config(
            "  ipsets:\n    - name: lb\n      type: hash:ip\n      members: [\"{{ services.clusterIPs(namespace=a) }}\", \"{{ services.clusterIPs }}\"]\n",
        ));
        assert_eq!(n.services.unwrap().namespace(), None);
    }

    #[test]
    fn node_facts_keep_only_the_keys_read() {
        let n = needs(&config(
            "  rules:\n    - name: r\n      priority: 100\n      from: \"{{ node.labels[zone] }}\"\n      table: 77\n",
        ));
        let full = NodeFacts {
            name: "n1".into(),
            labels: [("zone", "10.0.0.0/8"), ("other", "x")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            annotations: [("big".to_string(), "y".repeat(1000))].into(),
            ..Default::default()
        };
        let f = n.node_facts(&full);
        assert_eq!(f.labels.len(), 1);
        assert!(f.annotations.is_empty());
        assert_eq!(f.name, "n1");
    }
}
