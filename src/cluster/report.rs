//! What the agent tells the cluster about this node: Events (aggregated in
//! [`super::events`]) and the `NetworkStateProtected` condition ([`super::condition`]) on the
//! Node's status. One task: notices come in from the loops, posts and patches go out, retried
//! while the API server is away and sent as soon as it answers again.

use super::condition::{self, Condition, Tracker};
use super::events::{Aggregator, Outcome, Post};
use super::request;
use super::retry::{Backoff, Failure};
use super::slim::NodeItem;
use super::watch::{Cache, Health};
use crate::telemetry::metrics::{ConditionLabels, ResultLabels};
use crate::telemetry::{Notice, Telemetry};
use k8s_openapi::api::core::v1::{Event, EventSource, Node, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Patch, PatchParams, PostParams};
use kube::Client;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// Namespace of Events about cluster-scoped objects such as Nodes.
pub const EVENTS_NAMESPACE: &str = "default";
/// How often the condition is evaluated.
const TICK: Duration = Duration::from_secs(1);
/// A changed message alone (same status and reason) is patched at most this often.
const MESSAGE_EVERY: Duration = Duration::from_secs(60);
/// A post or patch not answered by then is given up (and retried): the client has no read
/// timeout of its own (watches must not have one).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Reporter {
    pub client: Client,
    pub node: String,
    pub nodes: Arc<Cache<NodeItem>>,
    pub telemetry: Arc<Telemetry>,
    pub health: Arc<Health>,
    /// Repairs are summed over this window per post.
    pub window: Duration,
    /// Objects put in place at start were removed while the agent was down (a restart in the
    /// same boot and network namespace, see docs/kubernetes.md): tell them.
    pub tell_start: bool,
    /// Failing for longer than this sets the condition to False.
    pub condition_after: Duration,
    pub backoff_scale: f64,
}

struct ConditionState {
    tracker: Tracker,
    /// What the Node holds, as far as the agent knows (`None`: not known yet).
    on_node: Option<Option<Condition>>,
    last_patch: Option<Instant>,
    next_try: Instant,
    backoff: Backoff,
    evaluated: Option<Condition>,
}

pub async fn run(r: Reporter, mut notices: mpsc::UnboundedReceiver<Notice>) {
    let nodes = kube::core::Request::new(<Node as kube::Resource>::url_path(&(), None));
    let mut agg = Aggregator::with(
        Instant::now(),
        r.window,
        super::events::BURST,
        super::events::REFILL,
    );
    let mut cond = ConditionState {
        tracker: Tracker::new(r.condition_after),
        on_node: None,
        last_patch: None,
        next_try: Instant::now(),
        backoff: Backoff::new(r.backoff_scale),
        evaluated: None,
    };
    let mut throttle = Throttle::default();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let due = agg.next_due();
        let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(
            due.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600)),
        ));
        tokio::select! {
            n = notices.recv() => match n {
                Some(Notice::PlacedAtStart { .. }) if !r.tell_start => {
                    debug!("objects put in place at start: a first start or a new boot, not drift");
                }
                Some(n) => {
                    if let Notice::ForbiddenRemoved { set, members } = &n {
                        cond.tracker.forbidden_removed(set, members.len() as u64, Instant::now());
                    }
                    agg.record(n, Instant::now(), SystemTime::now());
                }
                None => return,
            },
            _ = sleep, if due.is_some() => {
                let uid = r.nodes.snapshot().values().next().map(|n| n.uid.clone());
                while let Some(p) = agg.take(Instant::now()) {
                    let outcome = tokio::time::timeout(REQUEST_TIMEOUT, post(&r.client, &r.node, uid.clone(), &p))
                        .await
                        .unwrap_or(Outcome::Retry);
                    throttle.observe(&outcome);
                    let result = match &outcome {
                        Outcome::Created(_) => Some("created"),
                        Outcome::Updated => Some("updated"),
                        Outcome::Rejected => Some("rejected"),
                        _ => None,
                    };
                    if let Some(result) = result {
                        r.telemetry.metrics.kube_events.get_or_create(&ResultLabels { result }).inc();
                    }
                    agg.done(&p, outcome, Instant::now());
                }
            }
            _ = r.health.recovered.notified() => {
                agg.reachable_again();
                cond.next_try = Instant::now();
            }
            _ = tick.tick() => condition_step(&r, &nodes, &mut cond).await,
        }
        let dropped = agg.take_dropped();
        if dropped > 0 {
            warn!(dropped, "too many distinct Events waiting; dropped");
            r.telemetry
                .metrics
                .kube_events
                .get_or_create(&ResultLabels { result: "dropped" })
                .inc_by(dropped);
        }
        r.telemetry
            .metrics
            .kube_events_unsent
            .set(agg.unsent() as i64);
    }
}

/// Whether the API server asked the Event recorder to wait (a 429's or 5xx's `Retry-After`): said
/// once when an episode starts and once when it ends, not at every held post.
#[derive(Default)]
struct Throttle {
    since: Option<Instant>,
}

impl Throttle {
    fn observe(&mut self, outcome: &Outcome) {
        match outcome {
            Outcome::Throttled(wait) => {
                if self.since.is_none() {
                    warn!(
                        retry_after_s = wait.as_secs(),
                        "the API server asks to wait (Retry-After); Events are kept and posted after it"
                    );
                    self.since = Some(Instant::now());
                }
            }
            Outcome::Retry => {}
            _ => {
                if let Some(since) = self.since.take() {
                    info!(
                        throttled_ms = since.elapsed().as_millis() as u64,
                        "the API server takes Events again"
                    );
                }
            }
        }
    }
}

/// A stable name for a series' Event: a retried create that did reach the server gets 409, not
/// a second Event.
fn event_name(node: &str, p: &Post) -> String {
    let nanos = p
        .first
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    p.key.hash(&mut h);
    format!("{node}.netwarden.{nanos:x}{:04x}", h.finish() & 0xffff)
}

fn time(t: SystemTime) -> Time {
    let ts = k8s_openapi::jiff::Timestamp::try_from(t)
        .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now());
    Time(ts)
}

async fn post(client: &Client, node: &str, uid: Option<String>, p: &Post) -> Outcome {
    let events = kube::core::Request::new(<Event as kube::Resource>::url_path(
        &(),
        Some(EVENTS_NAMESPACE),
    ));
    let result = match &p.name {
        None => {
            let name = event_name(node, p);
            let ev = event(node, uid, p, &name);
            let request = serde_json::to_vec(&ev)
                .map_err(|e| e.to_string())
                .and_then(|body| {
                    events
                        .create(&PostParams::default(), body)
                        .map_err(|e| e.to_string())
                });
            match request {
                Err(e) => Err(Failure::Unreachable(e)),
                Ok(request) => match request::send(client, request).await {
                    Ok(_) => Ok(Outcome::Created(name)),
                    // An earlier attempt reached the server after all.
                    Err(Failure::Answered { code: 409, .. }) => Ok(Outcome::Created(name)),
                    Err(f) => Err(f),
                },
            }
        }
        Some(name) => {
            // As client-go's recorder: a strategic merge patch of the count, the last time and
            // the message.
            let patch = serde_json::json!({
                "count": p.count.min(i32::MAX as u64),
                "lastTimestamp": time(p.last),
                "message": p.message,
            });
            match events.patch(name, &PatchParams::default(), &Patch::Strategic(patch)) {
                Err(e) => Err(Failure::Unreachable(e.to_string())),
                Ok(request) => match request::send(client, request).await {
                    Ok(_) => Ok(Outcome::Updated),
                    Err(Failure::Answered { code: 404, .. }) => Ok(Outcome::Gone),
                    Err(f) => Err(f),
                },
            }
        }
    };
    match result {
        Ok(o) => {
            debug!(reason = p.key.reason, count = p.count, message = %p.message, "event posted");
            o
        }
        Err(f) => match f {
            Failure::Answered { code, .. } if code != 429 && code < 500 => {
                warn!(reason = p.key.reason, error = %f, "the API server refuses the Event; not retried");
                Outcome::Rejected
            }
            f => {
                debug!(reason = p.key.reason, error = %f, "cannot post the Event yet; kept and retried");
                match f.retry_after() {
                    Some(wait) => Outcome::Throttled(wait),
                    None => Outcome::Retry,
                }
            }
        },
    }
}

/// The Event that tells a series first.
fn event(node: &str, uid: Option<String>, p: &Post, name: &str) -> Event {
    Event {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
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
        reason: Some(p.key.reason.to_owned()),
        message: Some(p.message.clone()),
        type_: Some(p.kind.as_str().to_owned()),
        source: Some(EventSource {
            component: Some("netwarden".to_owned()),
            host: Some(node.to_owned()),
        }),
        reporting_component: Some("netwarden".to_owned()),
        reporting_instance: Some(node.to_owned()),
        count: Some(p.count.min(i32::MAX as u64) as i32),
        first_timestamp: Some(time(p.first)),
        last_timestamp: Some(time(p.last)),
        ..Default::default()
    }
}

fn same(on_node: &Option<Condition>, c: &Condition) -> (bool, bool) {
    match on_node {
        Some(n) => (
            n.status == c.status && n.reason == c.reason,
            n.message == c.message,
        ),
        None => (false, false),
    }
}

/// The condition as evaluated changed: the gauge follows, and a new status or reason is logged.
fn evaluated(r: &Reporter, before: Option<&Condition>, c: &Condition) {
    let gauge = &r.telemetry.metrics.network_state_protected;
    if let Some(old) = before {
        gauge.remove(&ConditionLabels { reason: old.reason });
    }
    gauge
        .get_or_create(&ConditionLabels { reason: c.reason })
        .set(i64::from(c.status));
    if before.is_none_or(|o| o.status != c.status || o.reason != c.reason) {
        info!(condition = condition::TYPE, status = c.status_str(), reason = c.reason, message = %c.message, "node condition");
    }
}

/// The status patch that sets the condition (`lastTransitionTime` only when the status
/// changes). Strategic merge: `conditions` merges by `type`, the node's other conditions stay.
fn condition_patch(c: &Condition, transition: bool, wall: &Time) -> serde_json::Value {
    let mut entry = serde_json::json!({
        "type": condition::TYPE,
        "status": c.status_str(),
        "reason": c.reason,
        "message": c.message,
        "lastHeartbeatTime": wall,
    });
    if transition {
        entry["lastTransitionTime"] = serde_json::json!(wall);
    }
    serde_json::json!({"status": {"conditions": [entry]}})
}

/// Evaluates the condition and patches the Node when it changed.
async fn condition_step(r: &Reporter, nodes: &kube::core::Request, st: &mut ConditionState) {
    // Before the initial sync the board says nothing yet; before the Node is listed, what it
    // holds is not known.
    if !r.telemetry.is_ready() || !r.nodes.ready() {
        return;
    }
    let now = Instant::now();
    let unhealthy = r.telemetry.board().unhealthy();
    st.tracker.observe(unhealthy, now);
    let c = st.tracker.evaluate(now);
    if st.evaluated.as_ref() != Some(&c) {
        evaluated(r, st.evaluated.as_ref(), &c);
        st.evaluated = Some(c.clone());
    }
    let on_node = st.on_node.get_or_insert_with(|| {
        r.nodes.snapshot().values().next().and_then(|n| {
            n.condition.as_ref().map(|nc| Condition {
                status: nc.status == "True",
                reason: if nc.reason == c.reason { c.reason } else { "" },
                message: nc.message.clone(),
            })
        })
    });
    let (same_status, same_message) = same(on_node, &c);
    let message_due = st
        .last_patch
        .is_none_or(|t| now.duration_since(t) >= MESSAGE_EVERY);
    if (same_status && (same_message || !message_due)) || now < st.next_try {
        return;
    }
    let transition = on_node.as_ref().is_none_or(|n| n.status != c.status);
    let patch = condition_patch(&c, transition, &time(SystemTime::now()));
    let patched = match nodes.patch_subresource(
        "status",
        &r.node,
        &PatchParams::default(),
        &Patch::Strategic(patch),
    ) {
        Err(e) => Err(Failure::Unreachable(e.to_string())),
        Ok(request) => tokio::time::timeout(REQUEST_TIMEOUT, request::send(&r.client, request))
            .await
            .map_err(|_| Failure::Timeout)
            .and_then(|r| r),
    };
    match patched {
        Ok(_) => {
            debug!(
                status = c.status_str(),
                reason = c.reason,
                "node condition set"
            );
            st.on_node = Some(Some(c));
            st.last_patch = Some(now);
            st.backoff.healthy();
            r.health.request_ok("nodes/status");
        }
        Err(f) => {
            let delay = st.backoff.after(&f);
            st.next_try = now + delay;
            r.health.request_failed("nodes/status", "patch", &f, delay);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_condition_patch_sets_the_transition_time_only_on_a_transition() {
        let c = Condition {
            status: false,
            reason: "Failing",
            message: "2 objects cannot be repaired".into(),
        };
        let wall = time(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        let patch = condition_patch(&c, true, &wall);
        let entry = &patch["status"]["conditions"][0];
        assert_eq!(entry["type"], condition::TYPE);
        assert_eq!(entry["status"], "False");
        assert_eq!(entry["reason"], "Failing");
        assert_eq!(entry["message"], "2 objects cannot be repaired");
        assert_eq!(entry["lastHeartbeatTime"], "2023-11-14T22:13:20Z");
        assert_eq!(entry["lastTransitionTime"], entry["lastHeartbeatTime"]);
        let heartbeat = condition_patch(&c, false, &wall);
        assert!(heartbeat["status"]["conditions"][0]
            .get("lastTransitionTime")
            .is_none());
    }
}
