//! The Kubernetes side of the agent: watches of this node's Node and the ConfigMap, and of the
//! Services, the API server's EndpointSlices and this node's Pods when the config in force
//! needs them ([`super::needs`]); the expansion of the config whenever one of them changes; the
//! state file; Events and the Node condition ([`super::report`]).
//!
//! It runs on a thread and runtime of its own, started *before* the main thread enters `--netns`:
//! setns applies to the calling thread (and threads and sockets it creates later), so this thread
//! and every socket its client opens stay in the host's network namespace, where the API server
//! is reachable (with a DaemonSet on `hostNetwork`, that is the node's namespace anyway). The
//! reconcile loop runs on the main thread inside the namespace; the two talk over channels.

pub use super::client::ClusterError;
use super::facts::{ClusterFacts, ServiceFacts};
use super::needs::{self, Needs, ServiceNeeds};
use super::report::{self, Reporter};
use super::slim::{self, NodeItem};
use super::statefile::{self, Saved, StateFileError};
use super::watch::{self, Cache, Context, Health, Target};
use crate::config::{self, Config};
use crate::desired::{self, Expansion};
use crate::obs::{Notice, Telemetry};
use crate::pod_liveness::PodView;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch as latest, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

/// Label of the EndpointSlices of `default/kubernetes` (the API server's endpoints).
const APISERVER_SLICES: &str = "kubernetes.io/service-name=kubernetes";
/// The name the API server gives its own EndpointSlice. Asked for as a field selector too, so
/// that RBAC can grant that one object by name (`resourceNames: [kubernetes]`).
const APISERVER_SLICE_NAME: &str = "kubernetes";
/// The state file is written at most this often, and at most a tenth of the time (a busy
/// cluster changes Services all the time, and with every Service a template selects the file
/// can be megabytes; it is for restarts, a few seconds behind is fine).
const SAVE_EVERY: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
pub struct Options {
    pub kubeconfig: Option<PathBuf>,
    /// An explicit API server endpoint instead of the credentials' one.
    pub apiserver: Option<String>,
    pub node_name: String,
    /// `None`: the client's default namespace (in a pod, its service account's).
    pub configmap_namespace: Option<String>,
    pub configmap_name: String,
    pub configmap_key: String,
    pub service_selector: Option<String>,
    pub state_file: PathBuf,
    /// Repairs are summed over this window per Event ([`super::events::WINDOW`]).
    pub event_window: Duration,
    /// Protection failing for longer than this sets the Node condition to False.
    pub condition_after: Duration,
    /// Shrinks every retry delay of the API client (tests).
    pub backoff_scale: f64,
    /// The network namespace the agent enforces in (`dev:inode`), recorded in the state file.
    pub netns_id: Option<String>,
}

impl Options {
    fn source(&self, namespace: &str) -> String {
        format!(
            "ConfigMap {}/{} key {}",
            namespace, self.configmap_name, self.configmap_key
        )
    }
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
            let channels = Channels {
                tx,
                pods: pods_tx,
                notices: notices_tx,
            };
            rt.block_on(run(opts, channels, telemetry, notices_rx));
        })
        .map_err(ClusterError::Thread)?;
    Ok((rx, pods_rx))
}

struct Channels {
    tx: mpsc::Sender<Message>,
    pods: latest::Sender<PodView>,
    notices: mpsc::UnboundedSender<Notice>,
}

/// A config: its text, parsed, and what it needs from the cluster.
struct Loaded {
    text: String,
    config: Arc<Config>,
    needs: Needs,
}

impl Loaded {
    fn new(text: String, config: Config) -> Loaded {
        let needs = needs::needs(&config);
        Loaded {
            text,
            config: Arc::new(config),
            needs,
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Reads the state file; what it held, enforced at once, and whether the kernel is as the agent
/// before this one left it (same boot, same network namespace).
async fn from_state_file(
    opts: &Options,
    telemetry: &Telemetry,
    tx: &mpsc::Sender<Message>,
) -> Option<(Loaded, bool)> {
    let saved = match statefile::read(&opts.state_file) {
        Ok(None) => {
            info!(path = %opts.state_file.display(), "no state file; waiting for the API server before enforcing");
            return None;
        }
        Ok(Some(saved)) => saved,
        Err(e @ (StateFileError::Corrupt { .. } | StateFileError::Version { .. })) => {
            // Set aside, so that the first write does not destroy it.
            match statefile::set_aside(&opts.state_file) {
                Ok(aside) => telemetry.state_file_set_aside("state", &aside, &e.to_string()),
                Err(io) => error!(error = %e, set_aside_error = %io, "state file ignored"),
            }
            return None;
        }
        Err(e) => {
            error!(error = %e, "state file ignored");
            return None;
        }
    };
    let cfg = match config::parse_kubernetes(&saved.source, &saved.config) {
        Ok(cfg) => cfg,
        Err(e) => {
            error!(path = %opts.state_file.display(), error = %e, "state file ignored: its config is refused");
            return None;
        }
    };
    let loaded = Loaded::new(saved.config.clone(), cfg);
    let expansion = desired::expand(&loaded.config, &saved.facts);
    let same_kernel = saved.boot_id.is_some()
        && saved.boot_id == statefile::boot_id()
        && saved.netns.is_some()
        && saved.netns == opts.netns_id;
    info!(
        path = %opts.state_file.display(),
        written_at = saved.written_at,
        protected = expansion.desired.len() + expansion.chains.len() + expansion.ipsets.len(),
        restart_in_same_boot = same_kernel,
        "enforcing the last-known state from the state file until the API server answers"
    );
    telemetry
        .board()
        .set_templates_pending(expansion.pending.clone());
    let _ = tx
        .send(Message::Update(Box::new(Update {
            config: loaded.config.clone(),
            expansion,
            from_state_file: true,
        })))
        .await;
    Some((loaded, same_kernel))
}

async fn run(
    opts: Options,
    ch: Channels,
    telemetry: Arc<Telemetry>,
    notices_rx: mpsc::UnboundedReceiver<Notice>,
) {
    // What was enforced before a restart, until the API server answers.
    let restored = from_state_file(&opts, &telemetry, &ch.tx).await;
    let tell_start = restored.as_ref().is_some_and(|(_, same)| *same);
    let mut current: Option<Loaded> = restored.map(|(l, _)| l);
    let client =
        match super::client::client(opts.kubeconfig.as_deref(), opts.apiserver.as_deref()).await {
            Ok(c) => c,
            Err(e) => {
                let _ = ch.tx.send(Message::Fatal(e)).await;
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
    let health = Health::new(telemetry.clone());
    let ctx = Context {
        client: client.clone(),
        health: health.clone(),
        notify: notify.clone(),
        backoff_scale: opts.backoff_scale,
    };
    let by_name = |name: &str| Some(format!("metadata.name={name}"));
    let (nodes, _) = watch::spawn(
        Target {
            resource: "nodes",
            path: "/api/v1/nodes".into(),
            fields: by_name(&opts.node_name),
            labels: None,
        },
        ctx.clone(),
        |n: slim::Node| Some(slim::node_item(n, super::condition::TYPE)),
    );
    let key = opts.configmap_key.clone();
    let (maps, _) = watch::spawn(
        Target {
            resource: "configmaps",
            path: format!("/api/v1/namespaces/{namespace}/configmaps"),
            fields: by_name(&opts.configmap_name),
            labels: None,
        },
        ctx.clone(),
        move |cm: slim::ConfigMap| Some(cm.data.and_then(|mut d| d.remove(&key))),
    );
    tokio::spawn(report::run(
        Reporter {
            client: client.clone(),
            node: opts.node_name.clone(),
            nodes: nodes.clone(),
            telemetry: telemetry.clone(),
            health: health.clone(),
            window: opts.event_window,
            tell_start,
            condition_after: opts.condition_after,
            backoff_scale: opts.backoff_scale,
        },
        notices_rx,
    ));
    let mut optional = Optional {
        ctx,
        opts: opts.clone(),
        pods_tx: ch.pods.clone(),
        services: None,
        slices: None,
        pods: None,
        epoch: 0,
    };
    if let Some(c) = &current {
        optional.follow(&c.needs);
    }

    let mut announced = false;
    let mut missing_said = false;
    // The last ConfigMap text looked at (good or refused): a text is judged once.
    let mut seen: Option<String> = current.as_ref().map(|c| c.text.clone());
    // A new config waiting for the watches it needs to list.
    let mut candidate: Option<Loaded> = None;
    let mut last: Option<Stamp> = None;
    let mut last_pending: Vec<config::Pending> = Vec::new();
    let mut save_due: Option<Instant> = None;
    // No write before this (after the last one).
    let mut next_save: Option<Instant> = None;
    loop {
        let save_timer = tokio::time::sleep_until(tokio::time::Instant::from_std(
            save_due.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600)),
        ));
        tokio::select! {
            _ = notify.notified() => {}
            _ = save_timer, if save_due.is_some() => {
                save_due = None;
                if let Some(c) = &current {
                    if optional.ready_for(&c.needs) {
                        next_save = save(&opts, &source, c, &optional.facts(&c.needs, &nodes));
                    }
                }
                continue;
            }
        }
        if !(nodes.ready() && maps.ready()) {
            continue;
        }
        if !announced {
            info!("Node and ConfigMap listed");
            announced = true;
        }
        let text = maps.snapshot().values().next().cloned().flatten();
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
                        let _ = ch.notices.send(Notice::ConfigAccepted {
                            source: source.clone(),
                        });
                        let loaded = Loaded::new(text, cfg);
                        optional.follow(&loaded.needs);
                        candidate = Some(loaded);
                    }
                    Err(e) => {
                        telemetry.config_loaded(false);
                        error!(source = %source, error = %e, "config refused; keeping the last good config");
                        let _ = ch.notices.send(Notice::ConfigRejected {
                            source: source.clone(),
                            error: e.to_string(),
                        });
                    }
                }
            }
        }
        // A new config takes over once what it needs is listed (a Service template must not
        // expand to nothing while the Services are being read).
        let wanted = candidate.as_ref().or(current.as_ref());
        if !wanted.is_some_and(|w| optional.ready_for(&w.needs)) {
            continue;
        }
        if let Some(c) = candidate.take() {
            current = Some(c);
        }
        let Some(cur) = &current else { continue };
        let facts = optional.facts(&cur.needs, &nodes);
        let stamp = optional.stamp(cur, &facts);
        if last.as_ref() == Some(&stamp) {
            continue;
        }
        let first_from_api = last.is_none();
        last = Some(stamp);
        let started = Instant::now();
        let expansion = desired::expand(&cur.config, &facts);
        debug!(
            took_us = started.elapsed().as_micros() as u64,
            services = facts.services.len(),
            "desired state rebuilt"
        );
        drop(facts);
        log_pending(&mut last_pending, &expansion.pending);
        // For /status and the pending gauge (also replacing what the state file's expansion said).
        telemetry
            .board()
            .set_templates_pending(expansion.pending.clone());
        if ch
            .tx
            .send(Message::Update(Box::new(Update {
                config: cur.config.clone(),
                expansion,
                from_state_file: false,
            })))
            .await
            .is_err()
        {
            return;
        }
        // After the update is on its way: the file is for the next start, not this repair.
        let now = Instant::now();
        let earliest = next_save.unwrap_or(now);
        if first_from_api || earliest <= now {
            next_save = save(&opts, &source, cur, &optional.facts(&cur.needs, &nodes));
            save_due = None;
        } else {
            save_due.get_or_insert(earliest);
        }
    }
}

/// Tells pending templated objects when they change, not on every Service event.
fn log_pending(last: &mut Vec<config::Pending>, now: &[config::Pending]) {
    if now == last.as_slice() {
        return;
    }
    for p in now.iter().filter(|p| !last.contains(p)) {
        info!(name = %p.name, path = %p.path, cause = p.cause.as_str(), reason = %p.reason, "pending");
    }
    for p in last.iter().filter(|p| !now.contains(p)) {
        info!(name = %p.name, path = %p.path, "no longer pending");
    }
    *last = now.to_vec();
}

/// Writes the state file; when the next write may come.
fn save(opts: &Options, source: &str, cur: &Loaded, facts: &ClusterFacts) -> Option<Instant> {
    let started = Instant::now();
    let saved = Saved {
        version: statefile::VERSION,
        source: source.to_owned(),
        config: cur.text.clone(),
        facts: facts.clone(),
        written_at: unix_now(),
        boot_id: statefile::boot_id(),
        netns: opts.netns_id.clone(),
    };
    if let Err(e) = statefile::write(&opts.state_file, &saved) {
        error!(error = %e, "state not saved");
    }
    let took = started.elapsed();
    debug!(took_ms = took.as_millis() as u64, "state saved");
    Some(Instant::now() + SAVE_EVERY.max(took * 10))
}

/// What an expansion was made from; the same stamp again means nothing to do.
#[derive(Debug, PartialEq, Eq)]
struct Stamp {
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
struct Optional {
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
    /// Starts, restarts or stops the watches as `needs` says.
    fn follow(&mut self, needs: &Needs) {
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
    fn ready_for(&self, needs: &Needs) -> bool {
        let services = match (&needs.services, &self.services) {
            (None, _) => true,
            (Some(n), Some(w)) => *n == w.needs && w.cache.ready(),
            (Some(_), None) => false,
        };
        let slices = !needs.apiserver || self.slices.as_ref().is_some_and(|(c, _)| c.ready());
        services && slices
    }

    fn facts(&self, needs: &Needs, nodes: &Cache<NodeItem>) -> ClusterFacts {
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

    fn stamp(&self, cur: &Loaded, facts: &ClusterFacts) -> Stamp {
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
