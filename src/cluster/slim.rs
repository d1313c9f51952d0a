//! The few fields the agent reads from each kind of object, deserialized straight from the API
//! server's JSON. Everything else (managedFields, the last-applied annotation, ports, status
//! noise) is skipped by the parser without being allocated, so a Service costs the agent its
//! namespace, name and addresses, not the 3 KB kubectl leaves on it. Pure.

use super::facts::{NodeFacts, ServiceFacts};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Metadata as the watch loop needs it: where the object is and its version.
#[derive(Clone, Copy, Debug)]
pub struct MetaRef<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub resource_version: &'a str,
}

impl MetaRef<'_> {
    /// The store key: `namespace/name` (`/name` for cluster-scoped objects).
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What every slim object offers the watch loop.
pub trait Object: serde::de::DeserializeOwned + Clone + Send + 'static {
    fn meta(&self) -> MetaRef<'_>;
}

// No `#[serde(flatten)]` in these structs: flattening makes serde buffer every unknown field
// (managedFields included) to hand it on, which is the allocation this module avoids.
macro_rules! meta_struct {
    ($name:ident { $($field:ident : $ty:ty),* }) => {
        #[derive(Clone, Debug, Default, Deserialize)]
        #[serde(rename_all = "camelCase")]
        pub struct $name {
            #[serde(default)]
            pub name: String,
            #[serde(default)]
            pub namespace: String,
            #[serde(default)]
            pub resource_version: String,
            $(#[serde(default)] pub $field: $ty,)*
        }
    };
}

meta_struct!(Meta {});
meta_struct!(LabelledMeta {
    labels: Option<BTreeMap<String, String>>
});
meta_struct!(NodeMeta {
    uid: String,
    labels: Option<BTreeMap<String, String>>,
    annotations: Option<BTreeMap<String, String>>
});

macro_rules! object {
    ($t:ty) => {
        impl Object for $t {
            fn meta(&self) -> MetaRef<'_> {
                MetaRef {
                    name: &self.metadata.name,
                    namespace: &self.metadata.namespace,
                    resource_version: &self.metadata.resource_version,
                }
            }
        }
    };
}

// ---- Node ----

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Node {
    #[serde(default)]
    pub metadata: NodeMeta,
    #[serde(default)]
    pub spec: NodeSpec,
    #[serde(default)]
    pub status: NodeStatus,
}
object!(Node);

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeSpec {
    #[serde(rename = "podCIDR", default)]
    pub pod_cidr: Option<String>,
    #[serde(rename = "podCIDRs", default)]
    pub pod_cidrs: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct NodeStatus {
    #[serde(default)]
    pub addresses: Option<Vec<NodeAddress>>,
    #[serde(default)]
    pub conditions: Option<Vec<Condition>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct NodeAddress {
    #[serde(rename = "type", default)]
    pub type_: String,
    #[serde(default)]
    pub address: String,
}

/// A Node condition as the API server holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type", default)]
    pub type_: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub message: String,
}

/// What the agent keeps of its Node: the facts (all labels and annotations: one object, and a
/// new config may ask for another key), its uid (for Events) and the agent's own condition.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeItem {
    pub facts: NodeFacts,
    pub uid: String,
    /// The condition of `condition_type`, as last seen on the Node.
    pub condition: Option<Condition>,
}

pub fn node_item(n: Node, condition_type: &str) -> NodeItem {
    let mut cidrs = n.spec.pod_cidrs.unwrap_or_default();
    if cidrs.is_empty() {
        cidrs.extend(n.spec.pod_cidr);
    }
    let addresses = n.status.addresses.unwrap_or_default();
    let of_type = |t: &str| {
        ips(addresses
            .iter()
            .filter(|a| a.type_ == t)
            .map(|a| &a.address))
    };
    NodeItem {
        facts: NodeFacts {
            name: n.metadata.name,
            pod_cidrs: cidrs.iter().filter_map(|c| c.parse().ok()).collect(),
            internal_ips: of_type("InternalIP"),
            external_ips: of_type("ExternalIP"),
            labels: n.metadata.labels.unwrap_or_default(),
            annotations: n.metadata.annotations.unwrap_or_default(),
        },
        uid: n.metadata.uid,
        condition: n
            .status
            .conditions
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.type_ == condition_type),
    }
}

// ---- Service ----

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Service {
    #[serde(default)]
    pub metadata: LabelledMeta,
    #[serde(default)]
    pub spec: ServiceSpec,
    #[serde(default)]
    pub status: ServiceStatus,
}
object!(Service);

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(rename = "type", default)]
    pub type_: Option<String>,
    #[serde(rename = "clusterIP", default)]
    pub cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs", default)]
    pub cluster_ips: Option<Vec<String>>,
    #[serde(rename = "externalIPs", default)]
    pub external_ips: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    #[serde(default)]
    pub load_balancer: Option<LoadBalancer>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct LoadBalancer {
    #[serde(default)]
    pub ingress: Option<Vec<Ingress>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Ingress {
    #[serde(default)]
    pub ip: Option<String>,
}

/// Shares equal strings (namespaces, Service types) between the objects that hold them.
#[derive(Debug, Default)]
pub struct Interner(Mutex<HashSet<Arc<str>>>);

impl Interner {
    pub fn get(&self, s: &str) -> Arc<str> {
        let mut set = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(shared) = set.get(s) {
            return shared.clone();
        }
        let shared: Arc<str> = s.into();
        set.insert(shared.clone());
        shared
    }
}

pub fn service_facts(s: Service, strings: &Interner) -> ServiceFacts {
    let cluster_ips = match s.spec.cluster_ips {
        Some(list) if !list.is_empty() => ips(&list),
        // "None" marks a headless Service: no address.
        _ => ips(s.spec.cluster_ip.iter()),
    };
    let lb = s
        .status
        .load_balancer
        .and_then(|lb| lb.ingress)
        .unwrap_or_default();
    ServiceFacts {
        namespace: strings.get(&s.metadata.namespace),
        name: s.metadata.name,
        kind: strings.get(s.spec.type_.as_deref().unwrap_or("ClusterIP")),
        labels: s.metadata.labels.unwrap_or_default(),
        cluster_ips,
        external_ips: ips(s.spec.external_ips.unwrap_or_default()),
        load_balancer_ips: ips(lb.iter().filter_map(|i| i.ip.as_ref())),
    }
}

// ---- EndpointSlice ----

#[derive(Clone, Debug, Default, Deserialize)]
pub struct EndpointSlice {
    #[serde(default)]
    pub metadata: Meta,
    #[serde(default)]
    pub endpoints: Option<Vec<Endpoint>>,
}
object!(EndpointSlice);

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Endpoint {
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub conditions: Option<EndpointConditions>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct EndpointConditions {
    #[serde(default)]
    pub ready: Option<bool>,
}

/// Addresses of endpoints that are not explicitly unready.
pub fn slice_ips(s: EndpointSlice) -> Vec<IpAddr> {
    s.endpoints
        .unwrap_or_default()
        .iter()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .flat_map(|e| ips(&e.addresses))
        .collect()
}

// ---- ConfigMap ----

#[derive(Clone, Debug, Default, Deserialize)]
pub struct ConfigMap {
    #[serde(default)]
    pub metadata: Meta,
    #[serde(default)]
    pub data: Option<BTreeMap<String, String>>,
}
object!(ConfigMap);

// ---- Pod ----

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Pod {
    #[serde(default)]
    pub metadata: Meta,
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default)]
    pub status: PodStatus,
}
object!(Pod);

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub host_network: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(rename = "podIP", default)]
    pub pod_ip: Option<String>,
    #[serde(rename = "podIPs", default)]
    pub pod_ips: Option<Vec<PodIp>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct PodIp {
    #[serde(default)]
    pub ip: String,
}

/// The IPs a pod holds on this node: `status.podIPs` (and `podIP`). None for `hostNetwork`
/// pods (they hold the node's addresses) and for pods that have finished (Succeeded, Failed):
/// their sandbox is gone and the CNI may give their IP to another pod.
pub fn pod_ips(p: &Pod) -> BTreeSet<IpAddr> {
    let finished = p
        .status
        .phase
        .as_deref()
        .is_some_and(|phase| phase == "Succeeded" || phase == "Failed");
    if p.spec.host_network == Some(true) || finished {
        return BTreeSet::new();
    }
    let listed = p.status.pod_ips.iter().flatten().map(|i| i.ip.as_str());
    ips(listed.chain(p.status.pod_ip.as_deref()))
        .into_iter()
        .collect()
}

pub fn ips(values: impl IntoIterator<Item = impl AsRef<str>>) -> Vec<IpAddr> {
    values
        .into_iter()
        .filter_map(|v| v.as_ref().parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn pod_ips_from_status_but_not_host_network_or_finished_pods() {
        let p = pod(json!({
            "metadata": {"name": "a"},
            "spec": {"nodeName": "n1", "containers": []},
            "status": {"phase": "Running", "podIP": "10.0.0.5",
                       "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}]}
        }));
        let got: Vec<String> = pod_ips(&p).iter().map(ToString::to_string).collect();
        assert_eq!(got, ["10.0.0.5", "fd00::5"]);
        let only_pod_ip = pod(json!({"metadata": {"name": "b"}, "status": {"podIP": "10.0.0.6"}}));
        assert_eq!(pod_ips(&only_pod_ip).len(), 1);
        let host = pod(json!({
            "metadata": {"name": "c"}, "spec": {"hostNetwork": true},
            "status": {"podIP": "10.200.0.1", "podIPs": [{"ip": "10.200.0.1"}]}
        }));
        assert!(pod_ips(&host).is_empty());
        let done = pod(json!({"metadata": {"name": "d"},
                              "status": {"phase": "Succeeded", "podIP": "10.0.0.7"}}));
        assert!(pod_ips(&done).is_empty());
        let pending = pod(json!({"metadata": {"name": "e"}, "status": {"phase": "Pending"}}));
        assert!(pod_ips(&pending).is_empty());
    }

    /// A Service as kubectl leaves it: managed fields, the last-applied annotation.
    fn realistic_service() -> serde_json::Value {
        json!({"apiVersion": "v1", "kind": "Service",
          "metadata": {"name": "web", "namespace": "shop", "uid": "u", "resourceVersion": "12",
            "labels": {"app": "web"},
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{\"big\": true}"},
            "managedFields": [{"manager": "kubectl-client-side-apply", "operation": "Update",
                               "fieldsV1": {"f:spec": {"f:ports": {".": {}}}}}]},
          "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.7", "clusterIPs": ["10.96.0.7", "fd00::7"],
                   "externalIPs": ["192.0.2.1", "not-an-ip"],
                   "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]},
          "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}, {"hostname": "lb.example"}]}}})
    }

    #[test]
    fn a_service_keeps_only_what_templates_read() {
        let s: Service = serde_json::from_value(realistic_service()).unwrap();
        assert_eq!(s.meta().key(), "shop/web");
        assert_eq!(s.meta().resource_version, "12");
        let strings = Interner::default();
        let f = service_facts(s, &strings);
        assert_eq!(&*f.kind, "LoadBalancer");
        assert_eq!(f.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(f.cluster_ips.len(), 2);
        assert_eq!(f.external_ips, ["192.0.2.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            f.load_balancer_ips,
            ["198.51.100.1".parse::<IpAddr>().unwrap()]
        );
        // Headless, and no type: a ClusterIP Service without an address.
        let headless: Service =
            serde_json::from_value(json!({"metadata": {"name": "h", "namespace": "x"},
            "spec": {"clusterIP": "None"}}))
            .unwrap();
        let f = service_facts(headless, &strings);
        assert_eq!((&*f.kind, f.cluster_ips.len()), ("ClusterIP", 0));
        // The same namespace or type is one string, shared.
        assert!(Arc::ptr_eq(&strings.get("ClusterIP"), &f.kind));
    }

    #[test]
    fn node_facts_uid_and_own_condition() {
        let n: Node = serde_json::from_value(json!({"metadata": {"name": "n1", "uid": "u1",
              "labels": {"a": "b"}, "annotations": {"k": "v"}, "managedFields": [{}]},
            "spec": {"podCIDR": "10.244.1.0/24"},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"},
                                     {"type": "Hostname", "address": "n1"}],
                       "conditions": [{"type": "Ready", "status": "True"},
                                      {"type": "NetworkStateProtected", "status": "False", "reason": "X"}]}}))
        .unwrap();
        let item = node_item(n, "NetworkStateProtected");
        assert_eq!(item.uid, "u1");
        assert_eq!(item.facts.pod_cidrs.len(), 1);
        assert_eq!(item.facts.internal_ips.len(), 1);
        assert_eq!(item.facts.annotations.len(), 1);
        let c = item.condition.unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "X"));
    }

    #[test]
    fn unready_endpoints_are_left_out() {
        let s: EndpointSlice = serde_json::from_value(
            json!({"metadata": {"name": "kubernetes", "namespace": "default"},
            "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": true}},
                          {"addresses": ["10.0.0.2"], "conditions": {"ready": false}},
                          {"addresses": ["10.0.0.3"]}]}),
        )
        .unwrap();
        assert_eq!(slice_ips(s).len(), 2);
    }
}
