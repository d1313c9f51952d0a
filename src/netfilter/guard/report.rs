//! Where the guard tells what it did: the status board (`/status`, the state gauges), the
//! metrics, and notices (Kubernetes Events). Nothing is told in `check`, which has no telemetry.

use crate::telemetry::metrics::{
    DriftLabels, ForbiddenLabels, ForgetLabels, KindLabels, RepairLabels,
};
use crate::telemetry::status::State;
use crate::telemetry::{Notice, Telemetry};
use std::sync::Arc;

#[derive(Default)]
pub(super) struct Out {
    telemetry: Option<Arc<Telemetry>>,
    /// Whether repairs are told as notices: not while a reload places newly configured chains
    /// and sets, which nobody had removed.
    pub announce: bool,
}

impl Out {
    pub fn new() -> Out {
        Out {
            telemetry: None,
            announce: true,
        }
    }

    pub fn set_telemetry(&mut self, t: Arc<Telemetry>) {
        self.telemetry = Some(t);
    }

    /// Publishes the protected chains and sets: `(kind, name, object, mode)`.
    pub fn catalog(&self, catalog: Vec<(&'static str, String, String, String)>) {
        if let Some(t) = &self.telemetry {
            t.board().set_netfilter_catalog(catalog);
        }
    }

    pub fn state(&self, name: &str, state: State, reason: Option<String>) {
        if let Some(t) = &self.telemetry {
            t.board().set_netfilter_state(name, state, reason);
        }
    }

    /// A contested chain: its state and who keeps removing it (when known).
    pub fn contested(&self, name: &str, fighter: Option<&str>, delay_ms: u64) {
        if let Some(t) = &self.telemetry {
            let mut b = t.board();
            b.set_netfilter_state(
                name,
                State::Contested,
                Some(format!(
                    "changed again right after each repair; repairs back off ({delay_ms} ms)"
                )),
            );
            if let Some(f) = fighter {
                b.set_netfilter_fighter(name, f);
            }
        }
    }

    pub fn repaired(&self, name: &str, actor: &str) {
        if let Some(t) = &self.telemetry {
            t.board()
                .record_netfilter_repair(name, actor, crate::telemetry::status::unix_now());
        }
    }

    pub fn forgotten(&self, kind: &'static str, reason: &'static str) {
        if let Some(t) = &self.telemetry {
            t.metrics
                .adopted_forgotten
                .get_or_create(&ForgetLabels { kind, reason })
                .inc();
        }
    }

    pub fn drift(&self, kind: &'static str, actor: &str, n: usize) {
        if let Some(t) = &self.telemetry {
            // nf_tables process names are 15 characters at most; the label set stays small.
            t.metrics
                .drift_detected
                .get_or_create(&DriftLabels {
                    kind,
                    actor: actor.to_string(),
                })
                .inc_by(n as u64);
        }
    }

    pub fn repairs(&self, kind: &'static str, result: &'static str, n: usize) {
        if let Some(t) = &self.telemetry {
            t.metrics
                .repairs
                .get_or_create(&RepairLabels { kind, result })
                .inc_by(n as u64);
        }
    }

    pub fn deferred(&self, kind: &'static str) {
        if let Some(t) = &self.telemetry {
            t.metrics
                .repairs_deferred
                .get_or_create(&KindLabels { kind })
                .inc();
        }
    }

    pub fn forbidden(&self, result: &'static str, n: usize) {
        if let Some(t) = &self.telemetry {
            t.metrics
                .forbidden_members
                .get_or_create(&ForbiddenLabels { result })
                .inc_by(n as u64);
        }
    }

    /// Tells the cluster (Kubernetes mode: an Event on the Node, aggregated there).
    pub fn tell(&self, n: Notice) {
        if let (Some(t), true) = (&self.telemetry, self.announce) {
            t.notice(n);
        }
    }
}
