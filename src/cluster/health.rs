//! Whether the API server answers: per watch, logged on transitions (with what the server said)
//! and counted in the metrics.

use super::retry::Failure;
use crate::telemetry::metrics::{ApiFailureLabels, ResourceLabels};
use crate::telemetry::Telemetry;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

/// A failure the server keeps answering is logged again at warn after this long.
const REWARN: Duration = Duration::from_secs(300);

/// Whether the API server answers, per watch; logs on transitions and counts failures.
pub struct Health {
    telemetry: Arc<Telemetry>,
    state: Mutex<BTreeMap<&'static str, (&'static str, Instant)>>,
    /// Other requests' last warning: what failed and when.
    warned: Mutex<BTreeMap<&'static str, (&'static str, Instant)>>,
    /// Woken when a failing watch works again (the Event recorder retries then).
    pub recovered: Notify,
}

impl Health {
    pub fn new(telemetry: Arc<Telemetry>) -> Arc<Health> {
        Arc::new(Health {
            telemetry,
            state: Mutex::new(BTreeMap::new()),
            warned: Mutex::new(BTreeMap::new()),
            recovered: Notify::new(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, (&'static str, Instant)>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn ok(&self, resource: &'static str) {
        let mut st = self.state();
        if st.remove(resource).is_some() {
            self.telemetry
                .metrics
                .kube_watch_failing
                .get_or_create(&ResourceLabels { resource })
                .set(0);
            info!(resource, "watch works again");
            if st.is_empty() {
                info!("API server reachable again; watches resumed");
            }
            self.recovered.notify_waiters();
        }
    }

    /// Forgets a watch that was stopped (its failures no longer matter).
    pub fn stopped(&self, resource: &'static str) {
        if self.state().remove(resource).is_some() {
            self.telemetry
                .metrics
                .kube_watch_failing
                .get_or_create(&ResourceLabels { resource })
                .set(0);
        }
    }

    /// A list or watch of `resource` failed; retried after `retry`.
    pub fn failed(&self, resource: &'static str, verb: &'static str, f: &Failure, retry: Duration) {
        self.count(resource, verb, f);
        if *f == Failure::Expired {
            debug!(
                resource,
                verb, "resourceVersion expired (410); listing again"
            );
            return;
        }
        self.telemetry
            .metrics
            .kube_watch_failing
            .get_or_create(&ResourceLabels { resource })
            .set(1);
        self.log(resource, verb, f, retry);
    }

    /// Another request failed (a patch of the Node's status); retried after `retry`.
    pub fn request_failed(
        &self,
        resource: &'static str,
        verb: &'static str,
        f: &Failure,
        retry: Duration,
    ) {
        self.count(resource, verb, f);
        let retry_in_ms = retry.as_millis() as u64;
        let now = Instant::now();
        let warn_now = {
            let mut w = self.warned.lock().unwrap_or_else(|e| e.into_inner());
            let again = w
                .get(resource)
                .is_none_or(|(r, at)| *r != f.label() || now.duration_since(*at) >= REWARN);
            if again {
                w.insert(resource, (f.label(), now));
            }
            again
        };
        match f {
            Failure::Answered {
                code,
                reason,
                message,
                ..
            } if warn_now => {
                let what = answered(*code);
                warn!(resource, verb, code, reason = ?reason, message = ?message, retry_in_ms, "{what}: cannot {verb} {resource}");
            }
            _ => debug!(resource, verb, error = %f, retry_in_ms, "request failed"),
        }
    }

    /// Another request works (again).
    pub fn request_ok(&self, resource: &'static str) {
        let mut w = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        if w.remove(resource).is_some() {
            info!(resource, "request works again");
        }
    }

    fn count(&self, resource: &'static str, verb: &'static str, f: &Failure) {
        self.telemetry
            .metrics
            .kube_request_failures
            .get_or_create(&ApiFailureLabels {
                resource,
                verb,
                reason: f.label(),
            })
            .inc();
    }

    fn log(&self, resource: &'static str, verb: &'static str, f: &Failure, retry: Duration) {
        let reason = f.label();
        let now = Instant::now();
        let mut st = self.state();
        let unreachable_before = st
            .values()
            .any(|(r, _)| matches!(*r, "unreachable" | "timeout"));
        let warn_now = match st.get(resource) {
            Some((r, at)) => *r != reason || now.duration_since(*at) >= REWARN,
            None => true,
        };
        if warn_now {
            st.insert(resource, (reason, now));
        } else {
            st.entry(resource).or_insert((reason, now));
        }
        let retry_in_ms = retry.as_millis() as u64;
        match f {
            Failure::Unreachable(e) if !unreachable_before => warn!(
                resource, verb, error = %e, retry_in_ms,
                "API server unreachable; enforcing the last-known state, retrying"
            ),
            Failure::Timeout if !unreachable_before => warn!(
                resource,
                verb,
                retry_in_ms,
                "API server does not answer in time; enforcing the last-known state, retrying"
            ),
            Failure::Answered {
                code,
                reason: status_reason,
                message,
                ..
            } if warn_now => {
                let what = answered(*code);
                warn!(
                    resource,
                    verb,
                    code,
                    reason = ?status_reason,
                    message = ?message,
                    retry_in_ms,
                    "{what}: cannot {verb} {resource}; enforcing the last-known state"
                );
            }
            _ => debug!(resource, verb, error = %f, retry_in_ms, "request failed"),
        }
    }
}

/// How a log line names an error the API server answered with.
fn answered(code: u16) -> &'static str {
    match code {
        403 => "forbidden",
        429 => "the API server throttles (too many requests)",
        _ => "the API server answered with an error",
    }
}
