//! The watches a config may or may not need (Services, the API server's EndpointSlices, this
//! node's Pods), started and stopped as the config in force says, and the cluster facts read
//! from them.

use super::facts::{ClusterFacts, ServiceFacts};
use super::needs::{Needs, ServiceNeeds};
use super::options::{Loaded, Options};
use super::slim::{self, NodeItem};
use super::watch::{self, Cache, Context, Target};
use crate::pod_liveness::PodView;
use std::net::IpAddr;
use std::sync::Arc;
use tokio::sync::{watch as latest, Notify};
use tokio::task::JoinHandle;
use tracing::info;

/// Label of the EndpointSlices of `default/kubernetes` (the API server's endpoints).
const APISERVER_SLICES: &str = "kubernetes.io/service-name=kubernetes";
/// The name the API server gives its own EndpointSlice. Asked for as a field selector too, so
/// that RBAC can grant that one object by name (`resourceNames: [kubernetes]`).
const APISERVER_SLICE_NAME: &str = "kubernetes";

/// What an expansion was made from; the same stamp again means nothing to do.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Stamp {
    config: String,
    node: Option<super::facts::NodeFacts>,
    apiserver: Vec<IpAddr>,
    /// (watch epoch, cache generation) of the Services.
    services: Option<(u64, u64)>,
}

/// A running watch and its cache.
type Watching<I> = (Arc<Cache<I>>, JoinHandle<()>);

/// The Service watch: what it keeps, and its epoch (a restart starts a new cache).
struct ServiceWatch {
    needs: ServiceNeeds,
    epoch: u64,
    cache: Arc<Cache<Arc<ServiceFacts>>>,
    task: JoinHandle<()>,
}

/// The watches a config may or may not need.
pub(super) struct Optional {
    ctx: Context,
    opts: Options,
    pods_tx: latest::Sender<PodView>,
    services: Option<ServiceWatch>,
    slices: Option<Watching<Vec<IpAddr>>>,
    pods: Option<[JoinHandle<()>; 2]>,
    /// Bumped at each (re)start of the Service watch.
    epoch: u64,
}

impl Optional {
    /// None running yet.
    pub(super) fn new(ctx: Context, opts: Options, pods_tx: latest::Sender<PodView>) -> Self {
        Optional {
            ctx,
            opts,
            pods_tx,
            services: None,
            slices: None,
            pods: None,
            epoch: 0,
        }
    }

    /// Starts, restarts or stops the watches as `needs` says.
    pub(super) fn follow(&mut self, needs: &Needs) {
        self.follow_services(needs.services.as_ref());
        match (needs.apiserver, self.slices.take()) {
            (true, None) => {
                self.slices = Some(watch::spawn(
                    Target {
                        resource: "endpointslices",
                        path: "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices".into(),
                        fields: Some(format!("metadata.name={APISERVER_SLICE_NAME}")),
                        labels: Some(APISERVER_SLICES.into()),
                    },
                    self.ctx.clone(),
                    |s: slim::EndpointSlice| Some(slim::slice_ips(s)),
                ));
            }
            (false, Some((_, task))) => {
                task.abort();
                self.ctx.health.stopped("endpointslices");
                info!("no longer watching EndpointSlices: no template uses apiserver.endpoints");
            }
            (_, kept) => self.slices = kept,
        }
        match (needs.pods, self.pods.take()) {
            (true, None) => {
                info!(node = %self.opts.node_name, "watching this node's Pods (podLiveness)");
                self.pods = Some(watch_pods(
                    &self.ctx,
                    &self.opts.node_name,
                    self.pods_tx.clone(),
                ));
            }
            (false, Some(tasks)) => {
                tasks.iter().for_each(JoinHandle::abort);
                self.ctx.health.stopped("pods");
                self.pods_tx.send_replace(PodView::default());
                info!("no longer watching Pods: no selector asks for podLiveness");
            }
            (_, kept) => self.pods = kept,
        }
    }

    fn follow_services(&mut self, needs: Option<&ServiceNeeds>) {
        if self.services.as_ref().map(|s| &s.needs) == needs {
            return;
        }
        if let Some(ServiceWatch { task, .. }) = self.services.take() {
            task.abort();
            self.ctx.health.stopped("services");
        }
        let Some(needs) = needs else {
            info!("not watching Services: no template uses services.*");
            return;
        };
        let path = match needs.namespace() {
            Some(ns) => format!("/api/v1/namespaces/{ns}/services"),
            None => "/api/v1/services".to_owned(),
        };
        info!(path = %path, "watching Services (only those templates select are kept)");
        let keep = needs.clone();
        let strings = slim::Interner::default();
        let (cache, task) = watch::spawn(
            Target {
                resource: "services",
                path,
                fields: None,
                labels: self.opts.service_selector.clone(),
            },
            self.ctx.clone(),
            move |s: slim::Service| keep.keep(slim::service_facts(s, &strings)).map(Arc::new),
        );
        self.epoch += 1;
        self.services = Some(ServiceWatch {
            needs: needs.clone(),
            epoch: self.epoch,
            cache,
            task,
        });
    }

    /// Whether every watch `needs` asks for has listed (Pods excepted: pod liveness decides on
    /// its own when its view is usable).
    pub(super) fn ready_for(&self, needs: &Needs) -> bool {
        let services = match (&needs.services, &self.services) {
            (None, _) => true,
            (Some(n), Some(w)) => *n == w.needs && w.cache.ready(),
            (Some(_), None) => false,
        };
        let slices = !needs.apiserver || self.slices.as_ref().is_some_and(|(c, _)| c.ready());
        services && slices
    }

    pub(super) fn facts(&self, needs: &Needs, nodes: &Cache<NodeItem>) -> ClusterFacts {
        let node = nodes
            .snapshot()
            .values()
            .find(|n| n.facts.name == self.opts.node_name)
            .map(|n| needs.node_facts(&n.facts));
        let services = match (&needs.services, &self.services) {
            (Some(_), Some(w)) => w.cache.snapshot(),
            _ => Arc::default(),
        };
        let mut apiserver: Vec<IpAddr> = match (needs.apiserver, &self.slices) {
            (true, Some((cache, _))) => cache.snapshot().values().flatten().copied().collect(),
            _ => Vec::new(),
        };
        apiserver.sort_unstable();
        apiserver.dedup();
        ClusterFacts {
            node,
            services,
            apiserver,
        }
    }

    pub(super) fn stamp(&self, cur: &Loaded, facts: &ClusterFacts) -> Stamp {
        Stamp {
            config: cur.text.clone(),
            node: facts.node.clone(),
            apiserver: facts.apiserver.clone(),
            services: self
                .services
                .as_ref()
                .filter(|_| cur.needs.services.is_some())
                .map(|w| (w.epoch, w.cache.generation())),
        }
    }
}

/// Watches the Pods bound to `node` (field selector `spec.nodeName`, as the kubelet does) and
/// publishes the IPs they hold. Until the first list is complete the view is not synced; while
/// the watch fails it is not fresh: the reconcile loop decides nothing on such a view.
fn watch_pods(ctx: &Context, node: &str, tx: latest::Sender<PodView>) -> [JoinHandle<()>; 2] {
    let notify = Arc::new(Notify::new());
    let (cache, task) = watch::spawn(
        Target {
            resource: "pods",
            path: "/api/v1/pods".into(),
            fields: Some(format!("spec.nodeName={node}")),
            labels: None,
        },
        Context {
            notify: notify.clone(),
            ..ctx.clone()
        },
        |p: slim::Pod| Some(slim::pod_ips(&p)),
    );
    let publisher = tokio::spawn(async move {
        loop {
            notify.notified().await;
            let view = PodView {
                synced: cache.listed(),
                fresh: !cache.failing(),
                ips: cache.snapshot().values().flatten().copied().collect(),
            };
            tx.send_if_modified(|v| {
                let changed = *v != view;
                if changed {
                    *v = view;
                }
                changed
            });
        }
    });
    [task, publisher]
}
