//! What the cluster tells about this node: the facts config templates refer to. Plain data, no
//! I/O: filled by Kubernetes mode ([`crate::cluster`]) from the watchers' caches (or read back
//! from the state file) and handed to the pure expansion ([`crate::desired::expand`]).

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

/// Everything templates can refer to. `node: None` means the Node object has not been seen
/// (yet): every `node.*` template is then pending.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterFacts {
    pub node: Option<NodeFacts>,
    /// Keyed by `namespace/name`, so iteration (and thus expansion) order is stable. Shared with
    /// the Service cache: taking the facts does not copy every Service (see `cluster::watch`).
    pub services: Arc<BTreeMap<String, Arc<ServiceFacts>>>,
    /// Addresses of the `default/kubernetes` EndpointSlices (the API server's endpoints).
    pub apiserver: Vec<IpAddr>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeFacts {
    pub name: String,
    pub pod_cidrs: Vec<IpNet>,
    pub internal_ips: Vec<IpAddr>,
    pub external_ips: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// One Service, as templates read it. Namespace and type are shared between the Services that
/// have the same (interned by the cache: with 50,000 Services, every byte counts 50,000 times).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceFacts {
    pub namespace: Arc<str>,
    pub name: String,
    /// `spec.type`: ClusterIP, NodePort, LoadBalancer or ExternalName.
    pub kind: Arc<str>,
    pub labels: BTreeMap<String, String>,
    pub cluster_ips: Vec<IpAddr>,
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` (hostname-only ingress entries carry no IP).
    pub load_balancer_ips: Vec<IpAddr>,
}
