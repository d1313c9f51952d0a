//! The Kubernetes side of the agent: watchers and reflectors for this node's Node, the Services,
//! the API server's EndpointSlices and the ConfigMap; the expansion of the config whenever one of
//! them changes; the state file; Events on the Node.
//!
//! It runs on a thread and runtime of its own, started *before* the main thread enters `--netns`:
//! setns applies to the calling thread (and threads and sockets it creates later), so this thread
//! and every socket its client opens stay in the host's network namespace, where the API server
//! is reachable (with a DaemonSet on `hostNetwork`, that is the node's namespace anyway). The
//! reconcile loop runs on the main thread inside the namespace; the two talk over channels.

use super::events::{Aggregator, Draft};
use super::facts::{ClusterFacts, NodeFacts, ServiceFacts};
use super::statefile::{self, Saved, StateFileError};
use crate::config::{self, Config};
use crate::desired::{self, Expansion};
use crate::obs::{Notice, Telemetry};
use crate::pod_liveness::PodView;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    ConfigMap, Event, EventSource, Node, ObjectReference, Pod, Service,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use std::collections::HashSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use thiserror::Error;
use tokio::sync::{mpsc, watch as latest, Notify};
use tracing::{debug, error, info, warn};

/// Label of the EndpointSlices of `default/kubernetes` (the API server's endpoints).
const APISERVER_SLICES: &str = "kubernetes.io/service-name=kubernetes";
/// The name the API server gives its own EndpointSlice. Asked for as a field selector too, so
/// that RBAC can grant that one object by name (`resourceNames: [kubernetes]`).
const APISERVER_SLICE_NAME: &str = "kubernetes";
/// Namespace of Events about cluster-scoped objects such as Nodes.
const EVENTS_NAMESPACE: &str = "default";

#[derive(Clone, Debug)]
pub struct Options {
    pub kubeconfig: Option<PathBuf>,
    pub node_name: String,
    /// `None`: the client's default namespace (in a pod, its service account's).
    pub configmap_namespace: Option<String>,
    pub configmap_name: String,
    pub configmap_key: String,
    pub service_selector: Option<String>,
    pub state_file: PathBuf,
    /// Repairs are summed over this window per Event ([`super::events::WINDOW`]).
    pub event_window: std::time::Duration,
}

impl Options {
    fn source(&self, namespace: &str) -> String {
        format!(
            "ConfigMap {}/{} key {}",
            namespace, self.configmap_name, self.configmap_key
        )
    }
}

#[derive(Debug, Error)]
pub enum ClusterError {
    #[error("cannot start the Kubernetes thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("Kubernetes client configuration: {0}")]
    Client(String),
}

/// A config with its templates expanded: what to enforce from now on.
#[derive(Debug)]
pub struct Update {
    pub config: Arc<Config>,
    pub expansion: Expansion,
    /// From the state file (the API server has not answered yet).
    pub from_state_file: bool,
}

#[derive(Debug)]
pub enum Message {
    Update(Box<Update>),
    /// The client cannot be configured at all (bad kubeconfig, not in a cluster).
    Fatal(ClusterError),
}

/// Starts the Kubernetes thread. Call before entering a network namespace. Besides the updates,
/// it tells which IPs this node's pods hold (for `podLiveness` selectors; never synced while no
/// selector asks for it: the Pods are then not watched at all).
pub fn spawn(
    opts: Options,
    telemetry: Arc<Telemetry>,
) -> Result<(mpsc::Receiver<Message>, latest::Receiver<PodView>), ClusterError> {
    let (tx, rx) = mpsc::channel(16);
    let (pods_tx, pods_rx) = latest::channel(PodView::default());
    let (notices_tx, notices_rx) = mpsc::unbounded_channel();
    telemetry.set_notices(notices_tx.clone());
    std::thread::Builder::new()
        .name("kubernetes".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.blocking_send(Message::Fatal(ClusterError::Thread(e)));
                    return;
                }
            };
            rt.block_on(run(opts, tx, pods_tx, telemetry, notices_tx, notices_rx));
        })
        .map_err(ClusterError::Thread)?;
    Ok((rx, pods_rx))
}

async fn client(opts: &Options) -> Result<Client, ClusterError> {
    let config = match &opts.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| ClusterError::Client(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| ClusterError::Client(format!("{}: {e}", path.display())))?
        }
        // In a pod: the service account; else $KUBECONFIG or ~/.kube/config.
        None => kube::Config::infer()
            .await
            .map_err(|e| ClusterError::Client(e.to_string()))?,
    };
    Client::try_from(config).map_err(|e| ClusterError::Client(e.to_string()))
}

/// Whether the API server answers, told on transitions only.
#[derive(Default)]
struct Health {
    failing: Mutex<std::collections::BTreeSet<&'static str>>,
}

impl Health {
    fn ok(&self, what: &'static str) {
        let mut f = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        if f.remove(what) && f.is_empty() {
            info!("API server reachable again; watches resumed");
        }
    }

    fn failed(&self, what: &'static str, e: &watcher::Error) {
        let mut f = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_empty() {
            warn!(watch = what, error = %e, "API server unreachable; enforcing the last-known state, retrying with backoff");
        } else {
            debug!(watch = what, error = %e, "watch failed");
        }
        f.insert(what);
    }
}

/// Runs one watcher into a reflector store, waking the builder on every change. Errors are
/// retried with kube-runtime's default backoff (exponential, capped); the store keeps its last
/// contents meanwhile, and a relist (after a 410 or a reconnect) replaces them atomically.
fn watch<K>(
    what: &'static str,
    api: Api<K>,
    config: watcher::Config,
    notify: Arc<Notify>,
    health: Arc<Health>,
) -> (Store<K>, Arc<AtomicBool>)
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    let ready = Arc::new(AtomicBool::new(false));
    let ready2 = ready.clone();
    tokio::spawn(async move {
        let stream = watcher(api, config).default_backoff().reflect(writer);
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(watcher::Event::InitDone) => {
                    debug!(watch = what, "listed");
                    ready2.store(true, Ordering::Release);
                    health.ok(what);
                    notify.notify_one();
                }
                Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                    health.ok(what);
                    notify.notify_one();
                }
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                Err(e) => health.failed(what, &e),
            }
        }
    });
    (store, ready)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn run(
    opts: Options,
    tx: mpsc::Sender<Message>,
    pods_tx: latest::Sender<PodView>,
    telemetry: Arc<Telemetry>,
    notices: mpsc::UnboundedSender<Notice>,
    notices_rx: mpsc::UnboundedReceiver<Notice>,
) {
    // What was enforced before a restart, until the API server answers.
    let mut last: Option<(String, Arc<Config>)> = None;
    let mut last_facts: Option<ClusterFacts> = None;
    match statefile::read(&opts.state_file) {
        Ok(None) => {
            info!(path = %opts.state_file.display(), "no state file; waiting for the API server before enforcing")
        }
        Ok(Some(saved)) => match config::parse_kubernetes(&saved.source, &saved.config) {
            Ok(cfg) => {
                let cfg = Arc::new(cfg);
                let expansion = desired::expand(&cfg, &saved.facts);
                info!(
                    path = %opts.state_file.display(),
                    written_at = saved.written_at,
                    protected = expansion.desired.len() + expansion.chains.len() + expansion.ipsets.len(),
                    "enforcing the last-known state from the state file until the API server answers"
                );
                telemetry
                    .board()
                    .set_templates_pending(expansion.pending.clone());
                last = Some((saved.config.clone(), cfg.clone()));
                last_facts = Some(saved.facts);
                let _ = tx
                    .send(Message::Update(Box::new(Update {
                        config: cfg,
                        expansion,
                        from_state_file: true,
                    })))
                    .await;
            }
            Err(e) => {
                error!(path = %opts.state_file.display(), error = %e, "state file ignored: its config is refused")
            }
        },
        Err(e @ (StateFileError::Corrupt { .. } | StateFileError::Version { .. })) => {
            // Set aside, so that the first write does not destroy it.
            match statefile::set_aside(&opts.state_file) {
                Ok(aside) => telemetry.state_file_set_aside("state", &aside, &e.to_string()),
                Err(io) => error!(error = %e, set_aside_error = %io, "state file ignored"),
            }
        }
        Err(e) => error!(error = %e, "state file ignored"),
    }
    let client = match client(&opts).await {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send(Message::Fatal(e)).await;
            return;
        }
    };
    let namespace = opts
        .configmap_namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let source = opts.source(&namespace);
    info!(source = %source, "watching the config");
    let notify = Arc::new(Notify::new());
    let health = Arc::new(Health::default());
    let by_name = |name: &str| format!("metadata.name={name}");
    let (nodes, nodes_ready) = watch(
        "node",
        Api::<Node>::all(client.clone()),
        watcher::Config::default().fields(&by_name(&opts.node_name)),
        notify.clone(),
        health.clone(),
    );
    let mut svc_config = watcher::Config::default();
    if let Some(sel) = &opts.service_selector {
        svc_config = svc_config.labels(sel);
    }
    let (services, services_ready) = watch(
        "services",
        Api::<Service>::all(client.clone()),
        svc_config,
        notify.clone(),
        health.clone(),
    );
    let (slices, slices_ready) = watch(
        "endpointslices",
        Api::<EndpointSlice>::namespaced(client.clone(), "default"),
        watcher::Config::default()
            .labels(APISERVER_SLICES)
            .fields(&by_name(APISERVER_SLICE_NAME)),
        notify.clone(),
        health.clone(),
    );
    let (maps, maps_ready) = watch(
        "configmap",
        Api::<ConfigMap>::namespaced(client.clone(), &namespace),
        watcher::Config::default().fields(&by_name(&opts.configmap_name)),
        notify.clone(),
        health.clone(),
    );
    tokio::spawn(record_events(
        client.clone(),
        opts.node_name.clone(),
        nodes.clone(),
        notices_rx,
        opts.event_window,
    ));

    let mut pods = PodWatch {
        client: client.clone(),
        node: opts.node_name.clone(),
        tx: pods_tx,
        health: health.clone(),
        task: None,
    };
    pods.follow(last.as_ref().map(|(_, c)| &**c));

    let all_ready = [nodes_ready, services_ready, slices_ready, maps_ready];
    let mut announced = false;
    let mut missing_said = false;
    // The last ConfigMap text looked at (good or refused): a text is judged once.
    let mut seen: Option<String> = last.as_ref().map(|(t, _)| t.clone());
    let mut last_pending: Vec<config::Pending> = Vec::new();
    loop {
        notify.notified().await;
        if !all_ready.iter().all(|r| r.load(Ordering::Acquire)) {
            continue;
        }
        if !announced {
            info!("caches ready");
            announced = true;
        }
        let text = maps.state().first().and_then(|cm| {
            cm.data
                .as_ref()
                .and_then(|d| d.get(&opts.configmap_key).cloned())
        });
        let mut config_changed = false;
        match text {
            None => {
                if !missing_said {
                    warn!(source = %source, "no such ConfigMap or key; keeping the config in force (if any)");
                    missing_said = true;
                }
            }
            Some(text) if seen.as_ref() == Some(&text) => {}
            Some(text) => {
                missing_said = false;
                seen = Some(text.clone());
                match config::parse_kubernetes(&source, &text) {
                    Ok(cfg) => {
                        telemetry.config_loaded(true);
                        info!(source = %source, "config loaded");
                        pods.follow(Some(&cfg));
                        last = Some((text, Arc::new(cfg)));
                        config_changed = true;
                    }
                    Err(e) => {
                        telemetry.config_loaded(false);
                        error!(source = %source, error = %e, "config refused; keeping the last good config");
                        let _ = notices.send(Notice::ConfigRejected {
                            source: source.clone(),
                            error: e.to_string(),
                        });
                    }
                }
            }
        }
        let facts = facts(&opts.node_name, &nodes, &services, &slices);
        let Some((text, cfg)) = &last else { continue };
        if !config_changed && last_facts.as_ref() == Some(&facts) {
            continue;
        }
        let started = Instant::now();
        let expansion = desired::expand(cfg, &facts);
        debug!(
            took_us = started.elapsed().as_micros() as u64,
            services = facts.services.len(),
            "desired state rebuilt"
        );
        // Told when they change, not on every Service event.
        if expansion.pending != last_pending {
            for p in expansion
                .pending
                .iter()
                .filter(|p| !last_pending.contains(p))
            {
                info!(name = %p.name, path = %p.path, cause = p.cause.as_str(), reason = %p.reason, "pending");
            }
            for p in last_pending
                .iter()
                .filter(|p| !expansion.pending.contains(p))
            {
                info!(name = %p.name, path = %p.path, "no longer pending");
            }
            last_pending = expansion.pending.clone();
        }
        // For /status and the pending gauge (also replacing what the state file's expansion said).
        telemetry
            .board()
            .set_templates_pending(expansion.pending.clone());
        let saved = Saved {
            version: statefile::VERSION,
            source: source.clone(),
            config: text.clone(),
            facts: facts.clone(),
            written_at: unix_now(),
        };
        last_facts = Some(facts);
        if tx
            .send(Message::Update(Box::new(Update {
                config: cfg.clone(),
                expansion,
                from_state_file: false,
            })))
            .await
            .is_err()
        {
            return;
        }
        // After the update is on its way: the file is for the next start, not this repair.
        if let Err(e) = statefile::write(&opts.state_file, &saved) {
            error!(error = %e, "state not saved");
        }
    }
}

/// The watch of this node's Pods, running while some adopt selector asks for `podLiveness`.
struct PodWatch {
    client: Client,
    node: String,
    tx: latest::Sender<PodView>,
    health: Arc<Health>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl PodWatch {
    /// Starts or stops the watch as the config in force asks.
    fn follow(&mut self, cfg: Option<&Config>) {
        let want = cfg.is_some_and(|c| c.adopt.iter().any(|s| s.pod_liveness.is_some()));
        match (want, self.task.take()) {
            (true, None) => {
                info!(node = %self.node, "watching this node's Pods (podLiveness)");
                self.task = Some(tokio::spawn(watch_pods(
                    Api::all(self.client.clone()),
                    self.node.clone(),
                    self.tx.clone(),
                    self.health.clone(),
                )));
            }
            (false, Some(task)) => {
                task.abort();
                self.health.ok("pods");
                self.tx.send_replace(PodView::default());
                info!("no longer watching Pods: no selector asks for podLiveness");
            }
            (_, task) => self.task = task,
        }
    }
}

/// Watches the Pods bound to `node` (field selector `spec.nodeName`, as the kubelet does) and
/// publishes the IPs they hold. Until the first list is complete the view is not synced; after
/// a watch error it is not fresh until the watch delivers again (a relist, or a change): the
/// reconcile loop decides nothing on such a view.
async fn watch_pods(api: Api<Pod>, node: String, tx: latest::Sender<PodView>, health: Arc<Health>) {
    let (store, writer) = reflector::store();
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let stream = watcher(api, config).default_backoff().reflect(writer);
    futures::pin_mut!(stream);
    let mut synced = false;
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(watcher::Event::InitDone) => {
                synced = true;
                health.ok("pods");
                publish_pods(&tx, &store, synced);
            }
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                health.ok("pods");
                publish_pods(&tx, &store, synced);
            }
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Err(e) => {
                health.failed("pods", &e);
                tx.send_if_modified(|v| std::mem::replace(&mut v.fresh, false));
            }
        }
    }
}

fn publish_pods(tx: &latest::Sender<PodView>, store: &Store<Pod>, synced: bool) {
    let view = PodView {
        synced,
        fresh: true,
        ips: store.state().iter().flat_map(|p| pod_ips(p)).collect(),
    };
    tx.send_if_modified(|v| {
        let changed = *v != view;
        if changed {
            *v = view;
        }
        changed
    });
}

/// The IPs a pod holds on this node: `status.podIPs` (and `podIP`). None for `hostNetwork`
/// pods (they hold the node's addresses) and for pods that have finished (Succeeded, Failed):
/// their sandbox is gone and the CNI may give their IP to another pod.
pub fn pod_ips(p: &Pod) -> HashSet<IpAddr> {
    let host_network = p.spec.as_ref().and_then(|s| s.host_network) == Some(true);
    let status = p.status.as_ref();
    let finished = status
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|phase| phase == "Succeeded" || phase == "Failed");
    if host_network || finished {
        return HashSet::new();
    }
    let listed = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .map(|i| i.ip.as_str());
    ips(listed.chain(status.and_then(|s| s.pod_ip.as_deref())))
        .into_iter()
        .collect()
}

fn ips(values: impl IntoIterator<Item = impl AsRef<str>>) -> Vec<IpAddr> {
    values
        .into_iter()
        .filter_map(|v| v.as_ref().parse().ok())
        .collect()
}

/// The facts, from the caches.
fn facts(
    node_name: &str,
    nodes: &Store<Node>,
    services: &Store<Service>,
    slices: &Store<EndpointSlice>,
) -> ClusterFacts {
    let node = nodes
        .state()
        .into_iter()
        .find(|n| n.metadata.name.as_deref() == Some(node_name))
        .map(|n| node_facts(&n));
    let services = services
        .state()
        .iter()
        .map(|s| {
            let f = service_facts(s);
            (format!("{}/{}", f.namespace, f.name), f)
        })
        .collect();
    let mut apiserver: Vec<IpAddr> = slices
        .state()
        .iter()
        .flat_map(|s| apiserver_ips(s))
        .collect();
    apiserver.sort_unstable();
    apiserver.dedup();
    ClusterFacts {
        node,
        services,
        apiserver,
    }
}

pub fn node_facts(n: &Node) -> NodeFacts {
    let spec = n.spec.as_ref();
    let mut cidrs: Vec<String> = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
    if cidrs.is_empty() {
        cidrs.extend(spec.and_then(|s| s.pod_cidr.clone()));
    }
    let addresses = n
        .status
        .as_ref()
        .and_then(|s| s.addresses.clone())
        .unwrap_or_default();
    let of_type = |t: &str| {
        ips(addresses
            .iter()
            .filter(|a| a.type_ == t)
            .map(|a| a.address.clone()))
    };
    NodeFacts {
        name: n.metadata.name.clone().unwrap_or_default(),
        pod_cidrs: cidrs.iter().filter_map(|c| c.parse().ok()).collect(),
        internal_ips: of_type("InternalIP"),
        external_ips: of_type("ExternalIP"),
        labels: n.metadata.labels.clone().unwrap_or_default(),
        annotations: n.metadata.annotations.clone().unwrap_or_default(),
    }
}

pub fn service_facts(s: &Service) -> ServiceFacts {
    // Parsed straight from the object, without copying its strings first: a relist turns
    // every Service of the cluster into facts (the rebuild bench: 10,000 of them).
    let spec = s.spec.as_ref();
    let cluster_ips = match spec.and_then(|s| s.cluster_ips.as_deref()) {
        Some(list) if !list.is_empty() => ips(list),
        _ => ips(spec.and_then(|s| s.cluster_ip.as_deref())),
    };
    let lb = s
        .status
        .as_ref()
        .and_then(|st| st.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_deref())
        .unwrap_or_default();
    ServiceFacts {
        namespace: s.metadata.namespace.clone().unwrap_or_default(),
        name: s.metadata.name.clone().unwrap_or_default(),
        kind: spec
            .and_then(|s| s.type_.clone())
            .unwrap_or_else(|| "ClusterIP".to_owned()),
        labels: s.metadata.labels.clone().unwrap_or_default(),
        // "None" marks a headless Service: no address.
        cluster_ips,
        external_ips: ips(spec
            .and_then(|s| s.external_ips.as_deref())
            .unwrap_or_default()),
        load_balancer_ips: ips(lb.iter().filter_map(|i| i.ip.as_deref())),
    }
}

/// Endpoints that are not explicitly unready.
pub fn apiserver_ips(s: &EndpointSlice) -> Vec<IpAddr> {
    s.endpoints
        .iter()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .flat_map(|e| ips(&e.addresses))
        .collect()
}

/// Turns notices into Events on the Node, aggregated and rate-limited.
async fn record_events(
    client: Client,
    node: String,
    nodes: Store<Node>,
    mut notices: mpsc::UnboundedReceiver<Notice>,
    window: std::time::Duration,
) {
    let api: Api<Event> = Api::namespaced(client, EVENTS_NAMESPACE);
    let mut agg = Aggregator::with(
        Instant::now(),
        window,
        super::events::BURST,
        super::events::REFILL,
    );
    loop {
        let due = agg.next_due();
        let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(
            due.unwrap_or_else(|| Instant::now() + std::time::Duration::from_secs(3600)),
        ));
        tokio::select! {
            n = notices.recv() => match n {
                Some(n) => agg.record(n, Instant::now()),
                None => return,
            },
            _ = sleep, if due.is_some() => {
                let uid = nodes.state().first().and_then(|n| n.metadata.uid.clone());
                for d in agg.take_due(Instant::now()) {
                    post(&api, &node, uid.clone(), d).await;
                }
            }
        }
    }
}

async fn post(api: &Api<Event>, node: &str, uid: Option<String>, d: Draft) {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let ev = Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{node}.netwarden.")),
            namespace: Some(EVENTS_NAMESPACE.to_owned()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Node".to_owned()),
            name: Some(node.to_owned()),
            uid,
            ..Default::default()
        },
        reason: Some(d.reason.to_owned()),
        message: Some(d.message.clone()),
        type_: Some(d.kind.as_str().to_owned()),
        source: Some(EventSource {
            component: Some("netwarden".to_owned()),
            host: Some(node.to_owned()),
        }),
        reporting_component: Some("netwarden".to_owned()),
        reporting_instance: Some(node.to_owned()),
        count: Some(1),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &ev).await {
        Ok(_) => debug!(reason = d.reason, message = %d.message, "event posted"),
        Err(e) => warn!(reason = d.reason, error = %e, "cannot post the event"),
    }
}

#[cfg(test)]
mod tests {
    use super::pod_ips;
    use k8s_openapi::api::core::v1::Pod;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn pod_ips_from_status_but_not_host_network_or_finished_pods() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "a"},
            "spec": {"nodeName": "n1", "containers": []},
            "status": {"phase": "Running", "podIP": "10.0.0.5",
                       "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}]}
        }));
        let mut got: Vec<String> = pod_ips(&p).iter().map(ToString::to_string).collect();
        got.sort();
        assert_eq!(got, ["10.0.0.5", "fd00::5"]);
        let only_pod_ip = pod(serde_json::json!({
            "metadata": {"name": "b"}, "spec": {"containers": []},
            "status": {"podIP": "10.0.0.6"}
        }));
        assert_eq!(pod_ips(&only_pod_ip).len(), 1);
        let host = pod(serde_json::json!({
            "metadata": {"name": "c"}, "spec": {"hostNetwork": true, "containers": []},
            "status": {"podIP": "10.200.0.1", "podIPs": [{"ip": "10.200.0.1"}]}
        }));
        assert!(pod_ips(&host).is_empty());
        let done = pod(serde_json::json!({
            "metadata": {"name": "d"}, "spec": {"containers": []},
            "status": {"phase": "Succeeded", "podIP": "10.0.0.7"}
        }));
        assert!(pod_ips(&done).is_empty());
        let pending = pod(serde_json::json!({
            "metadata": {"name": "e"}, "spec": {"containers": []},
            "status": {"phase": "Pending"}
        }));
        assert!(pod_ips(&pending).is_empty());
    }
}
