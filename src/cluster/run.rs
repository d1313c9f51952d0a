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
use super::facts::ClusterFacts;
use super::optional::{Optional, Stamp};
use super::options::Loaded;
pub use super::options::Options;
use super::report::{self, Reporter};
use super::slim::{self, NodeItem};
use super::statefile::{self, Saved, StateFileError};
use super::watch::{self, Cache, Context, Health, Target};
use crate::config::{self, Config};
use crate::desired::{self, Expansion};
use crate::pod_liveness::PodView;
use crate::telemetry::{Notice, Telemetry};
use kube::Client;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch as latest, Notify};
use tracing::{debug, error, info, warn};

/// The state file is written at most this often, and at most a tenth of the time (a busy
/// cluster changes Services all the time, and with every Service a template selects the file
/// can be megabytes; it is for restarts, a few seconds behind is fine).
const SAVE_EVERY: Duration = Duration::from_secs(2);

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
    let current: Option<Loaded> = restored.map(|(l, _)| l);
    let Some((client, namespace)) = connect(&opts, &ch.tx).await else {
        return;
    };
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
    let (nodes, maps) = watch_node_and_configmap(&opts, &namespace, &ctx);
    let reporter = Reporter {
        client,
        node: opts.node_name.clone(),
        nodes: nodes.clone(),
        telemetry: telemetry.clone(),
        health,
        window: opts.event_window,
        tell_start,
        condition_after: opts.condition_after,
        backoff_scale: opts.backoff_scale,
    };
    tokio::spawn(report::run(reporter, notices_rx));
    let mut optional = Optional::new(ctx, opts.clone(), ch.pods.clone());
    if let Some(c) = &current {
        optional.follow(&c.needs);
    }
    let mut follower = Follower {
        seen: current.as_ref().map(|c| c.text.clone()),
        current,
        candidate: None,
        announced: false,
        missing_said: false,
        last: None,
        last_pending: Vec::new(),
        save_due: None,
        next_save: None,
        opts,
        source,
        telemetry,
        ch,
        nodes,
        maps,
        optional,
    };
    loop {
        let save_timer = tokio::time::sleep_until(tokio::time::Instant::from_std(
            follower
                .save_due
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600)),
        ));
        tokio::select! {
            _ = notify.notified() => {}
            _ = save_timer, if follower.save_due.is_some() => {
                follower.save_when_due();
                continue;
            }
        }
        if follower.wake().await.is_break() {
            return;
        }
    }
}

/// The API client, and the ConfigMap's namespace; `None` (told as fatal) if the client cannot
/// be configured.
async fn connect(opts: &Options, tx: &mpsc::Sender<Message>) -> Option<(Client, String)> {
    let client =
        match super::client::client(opts.kubeconfig.as_deref(), opts.apiserver.as_deref()).await {
            Ok(c) => c,
            Err(e) => {
                let _ = tx.send(Message::Fatal(e)).await;
                return None;
            }
        };
    let namespace = opts
        .configmap_namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    Some((client, namespace))
}

/// The Node (for its facts and condition) and the ConfigMap (for the config's text).
fn watch_node_and_configmap(
    opts: &Options,
    namespace: &str,
    ctx: &Context,
) -> (Arc<Cache<NodeItem>>, Arc<Cache<Option<String>>>) {
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
    (nodes, maps)
}

/// The config loop between wake-ups: the config in force, the one waiting to take over, and
/// what was last sent and saved.
struct Follower {
    opts: Options,
    source: String,
    telemetry: Arc<Telemetry>,
    ch: Channels,
    nodes: Arc<Cache<NodeItem>>,
    maps: Arc<Cache<Option<String>>>,
    optional: Optional,
    current: Option<Loaded>,
    /// A new config waiting for the watches it needs to list.
    candidate: Option<Loaded>,
    /// The last ConfigMap text looked at (good or refused): a text is judged once.
    seen: Option<String>,
    announced: bool,
    missing_said: bool,
    last: Option<Stamp>,
    last_pending: Vec<config::Pending>,
    save_due: Option<Instant>,
    /// No write before this (after the last one).
    next_save: Option<Instant>,
}

impl Follower {
    /// A watch changed: judge a new ConfigMap text, and expand and send the config in force if
    /// what it was made from changed. Breaks when the reconcile loop is gone.
    async fn wake(&mut self) -> ControlFlow<()> {
        if !(self.nodes.ready() && self.maps.ready()) {
            return ControlFlow::Continue(());
        }
        if !self.announced {
            info!("Node and ConfigMap listed");
            self.announced = true;
        }
        let text = self.maps.snapshot().values().next().cloned().flatten();
        self.judge_text(text);
        let Some((facts, first_from_api)) = self.take_over() else {
            return ControlFlow::Continue(());
        };
        let Some(cur) = &self.current else {
            return ControlFlow::Continue(());
        };
        let started = Instant::now();
        let expansion = desired::expand(&cur.config, &facts);
        debug!(
            took_us = started.elapsed().as_micros() as u64,
            services = facts.services.len(),
            "desired state rebuilt"
        );
        drop(facts);
        log_pending(&mut self.last_pending, &expansion.pending);
        // For /status and the pending gauge (also replacing what the state file's expansion said).
        self.telemetry
            .board()
            .set_templates_pending(expansion.pending.clone());
        let update = Update {
            config: cur.config.clone(),
            expansion,
            from_state_file: false,
        };
        if self
            .ch
            .tx
            .send(Message::Update(Box::new(update)))
            .await
            .is_err()
        {
            return ControlFlow::Break(());
        }
        // After the update is on its way: the file is for the next start, not this repair.
        self.save_after_update(first_from_api);
        ControlFlow::Continue(())
    }

    /// The ConfigMap's text (if any), judged once: a good config becomes the candidate, a
    /// refused one is told and the last good config stays.
    fn judge_text(&mut self, text: Option<String>) {
        let source = &self.source;
        let Some(text) = text else {
            if !self.missing_said {
                warn!(source = %source, "no such ConfigMap or key; keeping the config in force (if any)");
                self.missing_said = true;
            }
            return;
        };
        if self.seen.as_ref() == Some(&text) {
            return;
        }
        self.missing_said = false;
        self.seen = Some(text.clone());
        match config::parse_kubernetes(source, &text) {
            Ok(cfg) => {
                self.telemetry.config_loaded(true);
                info!(source = %source, "config loaded");
                let _ = self.ch.notices.send(Notice::ConfigAccepted {
                    source: source.clone(),
                });
                let loaded = Loaded::new(text, cfg);
                self.optional.follow(&loaded.needs);
                self.candidate = Some(loaded);
            }
            Err(e) => {
                self.telemetry.config_loaded(false);
                error!(source = %source, error = %e, "config refused; keeping the last good config");
                let _ = self.ch.notices.send(Notice::ConfigRejected {
                    source: source.clone(),
                    error: e.to_string(),
                });
            }
        }
    }

    /// A new config takes over once what it needs is listed (a Service template must not
    /// expand to nothing while the Services are being read). Then, if what the config in force
    /// expands from changed: the facts to expand it with, and whether this is the first
    /// expansion from the API server.
    fn take_over(&mut self) -> Option<(ClusterFacts, bool)> {
        let wanted = self.candidate.as_ref().or(self.current.as_ref());
        if !wanted.is_some_and(|w| self.optional.ready_for(&w.needs)) {
            return None;
        }
        if let Some(c) = self.candidate.take() {
            self.current = Some(c);
        }
        let cur = self.current.as_ref()?;
        let facts = self.optional.facts(&cur.needs, &self.nodes);
        let stamp = self.optional.stamp(cur, &facts);
        if self.last.as_ref() == Some(&stamp) {
            return None;
        }
        let first_from_api = self.last.is_none();
        self.last = Some(stamp);
        Some((facts, first_from_api))
    }

    /// The save timer fired: write the state file if the config in force can be expanded.
    fn save_when_due(&mut self) {
        self.save_due = None;
        if let Some(c) = &self.current {
            if self.optional.ready_for(&c.needs) {
                let facts = self.optional.facts(&c.needs, &self.nodes);
                self.next_save = save(&self.opts, &self.source, c, &facts);
            }
        }
    }

    /// After an update: write the state file now (the first from the API server, or when the
    /// last write is long enough ago), or when the next write may come.
    fn save_after_update(&mut self, first_from_api: bool) {
        let Some(cur) = &self.current else { return };
        let now = Instant::now();
        let earliest = self.next_save.unwrap_or(now);
        if first_from_api || earliest <= now {
            let facts = self.optional.facts(&cur.needs, &self.nodes);
            self.next_save = save(&self.opts, &self.source, cur, &facts);
            self.save_due = None;
        } else {
            self.save_due.get_or_insert(earliest);
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
