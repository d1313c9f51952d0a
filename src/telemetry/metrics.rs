//! The metrics (all prefixed `netwarden_`; docs/metrics.md lists them) and their two text
//! encodings: OpenMetrics 1.0 (prometheus-client's own) and the Prometheus text format 0.0.4
//! derived from it.
//!
//! Counters and histograms are atomics updated by the reconcile loop; gauges that describe the
//! protected objects are computed at scrape time from the status board (a collector), so the
//! loop never walks every object to keep a gauge up to date.

use super::status::Board;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Metric, Registry, Unit};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

mod text;
pub use text::{
    encode_openmetrics, encode_prometheus, to_prometheus_text, wants_openmetrics, OPENMETRICS,
    PROMETHEUS_TEXT,
};

pub const PREFIX: &str = "netwarden";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

/// What was done about a forbidden set member: `removed` (enforce) or `reported` (observe).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ForbiddenLabels {
    pub result: &'static str,
}

/// Why an adopted object stopped being protected (see [`FORGET_REASONS`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ForgetLabels {
    pub kind: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DriftLabels {
    pub kind: &'static str,
    pub actor: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RepairLabels {
    pub kind: &'static str,
    /// applied, already_present, not_yet, failed
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: &'static str,
    /// An errno name (ENODEV), or `timeout` / `closed`.
    pub errno: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// Which state file: `adopted_state` (`--adopted-state`), `state` (Kubernetes mode).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FileLabels {
    pub file: &'static str,
}

/// A request to the Kubernetes API that failed: the resource, the verb, and what the server said
/// (`forbidden`, `unauthorized`, `too_many_requests`, `server_error`, `expired`, `unreachable`,
/// `timeout`, `not_found`, `other`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiFailureLabels {
    pub resource: &'static str,
    pub verb: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabels {
    pub resource: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabels {
    pub reason: &'static str,
}

/// How a burst of removals was repaired: `held` until it settled, or `as_it_goes`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BurstLabels {
    pub pace: &'static str,
}

/// What systemd-networkd would take away: `event` restart or reconfigure, `kind` of object.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AtRiskLabels {
    pub event: &'static str,
    pub kind: &'static str,
}

/// How an address left to its owner came back (see [`HANDOFF_OUTCOMES`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandoffLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// A metric the loop updates: its name (under `netwarden_`), help, unit, and where it is in
/// [`Metrics`].
struct Registered {
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    metric: fn(&Metrics) -> AnyMetric,
}

/// Every metric the loop updates, in the order they are exported.
const REGISTERED: &[Registered] = &[
    Registered {
        name: "drift_detected",
        help: "Protected objects found removed or changed by someone else, by kind and by the process that did it (actor)",
        unit: None,
        metric: |m| AnyMetric::of(&m.drift_detected),
    },
    Registered {
        name: "repairs",
        help: "Repair attempts, by kind and result (applied, already_present, not_yet, failed)",
        unit: None,
        metric: |m| AnyMetric::of(&m.repairs),
    },
    Registered {
        name: "repair_duration",
        help: "Time from receiving the events that showed drift to the kernel's acknowledgement of the repair",
        unit: Some(Unit::Seconds),
        metric: |m| AnyMetric::of(&m.repair_duration),
    },
    Registered {
        name: "repairs_deferred",
        help: "Repairs held back because the object is contested (exponential backoff)",
        unit: None,
        metric: |m| AnyMetric::of(&m.repairs_deferred),
    },
    Registered {
        name: "resyncs",
        help: "Re-reads of kernel state, by reason (start, timer, overrun, link_down, address_removed, config_change)",
        unit: None,
        metric: |m| AnyMetric::of(&m.resyncs),
    },
    Registered {
        name: "netlink_overruns",
        help: "Times the event socket overran (ENOBUFS) and events were lost",
        unit: None,
        metric: |m| AnyMetric::of(&m.overruns),
    },
    Registered {
        name: "removal_bursts",
        help: "Bursts of removals (64 or more protected objects in one batch), by pace: held (repaired once they settled) or as_it_goes (a deleter that deletes each object once, such as systemd-networkd)",
        unit: None,
        metric: |m| AnyMetric::of(&m.bursts),
    },
    Registered {
        name: "netlink_events",
        help: "Kernel notifications received",
        unit: None,
        metric: |m| AnyMetric::of(&m.events),
    },
    Registered {
        name: "apply_errors",
        help: "Kernel requests that failed, by object kind and errno",
        unit: None,
        metric: |m| AnyMetric::of(&m.apply_errors),
    },
    Registered {
        name: "forbidden_members",
        help: "Forbidden members found in protected sets, by what was done (removed, reported)",
        unit: None,
        metric: |m| AnyMetric::of(&m.forbidden_members),
    },
    Registered {
        name: "adopted_forgotten",
        help: "Adopted objects no longer protected, by kind and reason (owner, unknown_actor, pod_gone, pod_grace_expired)",
        unit: None,
        metric: |m| AnyMetric::of(&m.adopted_forgotten),
    },
    Registered {
        name: "owner_handoffs",
        help: "Addresses removed by their owner (a network manager) and left to it to put back, by outcome: owner_restored (it did), grace_expired (it did not within the grace; the agent restored them)",
        unit: None,
        metric: |m| AnyMetric::of(&m.handoffs),
    },
    Registered {
        name: "networkd_objects_at_risk",
        help: "Protected objects systemd-networkd would take away (checked at start), by event (restart, reconfigure) and kind; absent when the check did not run",
        unit: None,
        metric: |m| AnyMetric::of(&m.networkd_at_risk),
    },
    Registered {
        name: "config_reloads",
        help: "Config loads (at start and on SIGHUP), by result (success, failure, unchanged: a SIGHUP found the file as it was)",
        unit: None,
        metric: |m| AnyMetric::of(&m.config_reloads),
    },
    Registered {
        name: "state_files_set_aside",
        help: "State files found unusable at start (corrupt, another format version) and renamed PATH.corrupt-<unix time> rather than overwritten, by file (adopted_state, state)",
        unit: None,
        metric: |m| AnyMetric::of(&m.state_files_set_aside),
    },
    Registered {
        name: "config_last_reload_success_timestamp",
        help: "When the config in use was loaded (Unix time)",
        unit: Some(Unit::Seconds),
        metric: |m| AnyMetric::of(&m.config_last_success),
    },
    Registered {
        name: "config_last_reload_successful",
        help: "Whether the last config load succeeded (1) or failed and the previous config is kept (0)",
        unit: None,
        metric: |m| AnyMetric::of(&m.config_last_ok),
    },
    Registered {
        name: "start_time",
        help: "When the agent started (Unix time)",
        unit: Some(Unit::Seconds),
        metric: |m| AnyMetric::of(&m.start_time),
    },
    Registered {
        name: "kubernetes_request_failures",
        help: "Kubernetes mode: requests to the API server that failed, by resource, verb and what the server said (reason)",
        unit: None,
        metric: |m| AnyMetric::of(&m.kube_request_failures),
    },
    Registered {
        name: "kubernetes_watch_failing",
        help: "Kubernetes mode: 1 while the watch of a resource fails (the agent enforces the last-known state), else 0",
        unit: None,
        metric: |m| AnyMetric::of(&m.kube_watch_failing),
    },
    Registered {
        name: "kubernetes_events",
        help: "Kubernetes mode: Events on the Node, by result (created, updated, rejected, dropped)",
        unit: None,
        metric: |m| AnyMetric::of(&m.kube_events),
    },
    Registered {
        name: "kubernetes_events_unsent",
        help: "Kubernetes mode: Events waiting to be posted (API server unreachable, or the rate limit)",
        unit: None,
        metric: |m| AnyMetric::of(&m.kube_events_unsent),
    },
    Registered {
        name: "network_state_protected",
        help: "Kubernetes mode: the NetworkStateProtected Node condition as evaluated, 1 (True) or 0 (False), labelled with its reason",
        unit: None,
        metric: |m| AnyMetric::of(&m.network_state_protected),
    },
];

/// A metric of any type, so that registration can go through a table.
#[derive(Debug)]
struct AnyMetric(Box<dyn Metric>);

impl AnyMetric {
    fn of<M: Metric + Clone>(m: &M) -> AnyMetric {
        AnyMetric(Box::new(m.clone()))
    }
}

impl EncodeMetric for AnyMetric {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        self.0.metric_type()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn duration_histogram() -> Histogram {
    // 10 µs to ~5 s, doubling: fine enough for the tens of microseconds a repair takes.
    Histogram::new(exponential_buckets(10e-6, 2.0, 20))
}

/// Every metric the loop updates. Cheap to update: atomics behind a read lock per label set.
#[derive(Debug)]
pub struct Metrics {
    pub drift_detected: Family<DriftLabels, Counter>,
    pub repairs: Family<RepairLabels, Counter>,
    pub repair_duration: Family<KindLabels, Histogram, fn() -> Histogram>,
    pub repairs_deferred: Family<KindLabels, Counter>,
    pub resyncs: Family<ReasonLabels, Counter>,
    pub overruns: Counter,
    pub bursts: Family<BurstLabels, Counter>,
    pub events: Counter,
    pub apply_errors: Family<ErrorLabels, Counter>,
    pub forbidden_members: Family<ForbiddenLabels, Counter>,
    pub adopted_forgotten: Family<ForgetLabels, Counter>,
    pub handoffs: Family<HandoffLabels, Counter>,
    pub networkd_at_risk: Family<AtRiskLabels, Gauge>,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub state_files_set_aside: Family<FileLabels, Counter>,
    pub config_last_success: Gauge<f64, AtomicU64>,
    pub config_last_ok: Gauge,
    pub start_time: Gauge<f64, AtomicU64>,
    /// Kubernetes mode (src/cluster): requests that failed, watches failing now, Events.
    pub kube_request_failures: Family<ApiFailureLabels, Counter>,
    pub kube_watch_failing: Family<ResourceLabels, Gauge>,
    pub kube_events: Family<ResultLabels, Counter>,
    pub kube_events_unsent: Gauge,
    /// The Node condition as evaluated: one series, labelled with its reason, 1 (True) or 0.
    pub network_state_protected: Family<ConditionLabels, Gauge>,
}

impl Metrics {
    /// Builds the metrics and a registry holding them and the board's gauges.
    pub fn new(board: Arc<Mutex<Board>>) -> (Metrics, Registry) {
        let m = Metrics {
            drift_detected: Family::default(),
            repairs: Family::default(),
            repair_duration: Family::new_with_constructor(duration_histogram),
            repairs_deferred: Family::default(),
            resyncs: Family::default(),
            overruns: Counter::default(),
            bursts: Family::default(),
            events: Counter::default(),
            apply_errors: Family::default(),
            forbidden_members: Family::default(),
            adopted_forgotten: Family::default(),
            handoffs: Family::default(),
            networkd_at_risk: Family::default(),
            config_reloads: Family::default(),
            state_files_set_aside: Family::default(),
            config_last_success: Gauge::default(),
            config_last_ok: Gauge::default(),
            start_time: Gauge::default(),
            kube_request_failures: Family::default(),
            kube_watch_failing: Family::default(),
            kube_events: Family::default(),
            kube_events_unsent: Gauge::default(),
            network_state_protected: Family::default(),
        };
        // The agent's own metrics under `netwarden_`; the standard process metrics beside them,
        // without the prefix, as every Prometheus client library names them.
        let mut root = Registry::default();
        let r = root.sub_registry_with_prefix(PREFIX);
        for d in REGISTERED {
            match &d.unit {
                Some(unit) => r.register_with_unit(d.name, d.help, unit.clone(), (d.metric)(&m)),
                None => r.register(d.name, d.help, (d.metric)(&m)),
            }
        }
        let build: Family<BuildLabels, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        r.register("build_info", "Build information; always 1", build);
        r.register_collector(Box::new(BoardCollector(board)));
        root.register_collector(Box::new(super::process::ProcessCollector));
        m.precreate();
        (m, root)
    }

    /// Creates the series whose label values are known in advance at 0, so that they exist
    /// from the first scrape (rate() and increase() need a starting point, dashboards a line).
    fn precreate(&self) {
        for kind in super::status::KINDS {
            for result in REPAIR_RESULTS {
                let _ = self.repairs.get_or_create(&RepairLabels { kind, result });
            }
            let _ = self.repairs_deferred.get_or_create(&KindLabels { kind });
            let _ = self.repair_duration.get_or_create(&KindLabels { kind });
        }
        for reason in RESYNC_REASONS {
            let _ = self.resyncs.get_or_create(&ReasonLabels { reason });
        }
        for result in ["success", "failure", "unchanged"] {
            let _ = self.config_reloads.get_or_create(&ResultLabels { result });
        }
        for file in ["adopted_state", "state"] {
            let _ = self
                .state_files_set_aside
                .get_or_create(&FileLabels { file });
        }
        for kind in ["chain", "ipset", super::status::NFTABLES_KIND] {
            for result in ["applied", "failed"] {
                let _ = self.repairs.get_or_create(&RepairLabels { kind, result });
            }
        }
        let _ = self.repairs_deferred.get_or_create(&KindLabels {
            kind: super::status::NFTABLES_KIND,
        });
        for kind in [
            "rule",
            "route",
            "neighbour",
            "fdb",
            "chain",
            "ipset",
            super::status::NFTABLES_KIND,
        ] {
            for reason in FORGET_REASONS {
                let _ = self
                    .adopted_forgotten
                    .get_or_create(&ForgetLabels { kind, reason });
            }
        }
        for pace in ["held", "as_it_goes"] {
            let _ = self.bursts.get_or_create(&BurstLabels { pace });
        }
        for outcome in HANDOFF_OUTCOMES {
            let _ = self.handoffs.get_or_create(&HandoffLabels { outcome });
        }
        for result in ["removed", "reported"] {
            let _ = self
                .forbidden_members
                .get_or_create(&ForbiddenLabels { result });
        }
        for result in EVENT_RESULTS {
            let _ = self.kube_events.get_or_create(&ResultLabels { result });
        }
    }
}

/// Why adopted objects are forgotten: removed by an owner; removed by a process that could not
/// be identified under `unknownActor: forget`; `podLiveness`: the pod holding the IP is gone, or
/// no pod has held the IP for the grace period.
pub const FORGET_REASONS: [&str; 4] = ["owner", "unknown_actor", "pod_gone", "pod_grace_expired"];

/// What happened to an Event: `created`, `updated` (its count and message), `rejected` (the API
/// server refused it for good), `dropped` (too many distinct Events waiting).
pub const EVENT_RESULTS: [&str; 4] = ["created", "updated", "rejected", "dropped"];

/// How an address left to its owner came back: put back by the owner, or by the agent once the
/// grace ran out.
pub const HANDOFF_OUTCOMES: [&str; 2] = ["owner_restored", "grace_expired"];

pub const REPAIR_RESULTS: [&str; 4] = ["applied", "already_present", "not_yet", "failed"];
pub const RESYNC_REASONS: [&str; 7] = [
    "start",
    "timer",
    "overrun",
    "link_down",
    "address_removed",
    "config_change",
    "rule_added_again",
];

/// What opens a sample's labels in the text formats.
const LABELS_OPEN: char = '{';

/// The name of every sample the agent can export (`_total`, `_bucket`, `_sum`, `_count`
/// included), for checks of dashboards and alerts against what really exists.
pub fn exported_names() -> std::collections::BTreeSet<String> {
    let (m, r) = Metrics::new(Arc::new(Mutex::new(Board::default())));
    // Give the families without pre-created series one series each.
    m.drift_detected
        .get_or_create(&DriftLabels {
            kind: "rule",
            actor: "x".into(),
        })
        .inc();
    m.apply_errors
        .get_or_create(&ErrorLabels {
            kind: "rule",
            errno: "EINVAL".into(),
        })
        .inc();
    m.kube_request_failures
        .get_or_create(&ApiFailureLabels {
            resource: "services",
            verb: "list",
            reason: "forbidden",
        })
        .inc();
    m.kube_watch_failing
        .get_or_create(&ResourceLabels {
            resource: "services",
        })
        .set(0);
    m.network_state_protected
        .get_or_create(&ConditionLabels {
            reason: "Protected",
        })
        .set(1);
    let text = encode_prometheus(&r);
    let mut names: std::collections::BTreeSet<String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split([LABELS_OPEN, ' ']).next())
        .map(str::to_string)
        .collect();
    // contested_objects has no series on an empty board; it exists all the same.
    names.insert(format!("{PREFIX}_contested_objects"));
    names
}

/// Gauges computed from the board at scrape time.
#[derive(Debug)]
struct BoardCollector(Arc<Mutex<Board>>);

impl Collector for BoardCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (counts, contested, ready, origins, pending) = {
            let b = self.0.lock().unwrap_or_else(|e| e.into_inner());
            (
                b.state_counts(),
                b.contested_by_actor(),
                b.ready,
                b.origin_counts(),
                b.templates_pending_counts(),
            )
        };
        let mut m = encoder.encode_descriptor(
            "protected_objects",
            "Protected objects by kind and state (in_sync, pending, drifted, contested, observe_only)",
            None,
            MetricType::Gauge,
        )?;
        for ((kind, state), n) in counts {
            let labels = [("kind", kind), ("state", state.as_str())];
            ConstGauge::new(n as i64).encode(m.encode_family(&labels)?)?;
        }
        let mut m = encoder.encode_descriptor(
            "protected_objects_by_origin",
            "Protected objects by kind and origin (config: named in the config; adopted: through spec.adopt)",
            None,
            MetricType::Gauge,
        )?;
        for ((kind, origin), n) in origins {
            let labels = [("kind", kind), ("origin", origin)];
            ConstGauge::new(n as i64).encode(m.encode_family(&labels)?)?;
        }
        let mut m = encoder.encode_descriptor(
            "contested_objects",
            "Objects being fought over right now, by kind and by the process that keeps removing them",
            None,
            MetricType::Gauge,
        )?;
        for ((kind, actor), n) in contested {
            let labels = [("kind", kind), ("actor", actor.as_str())];
            ConstGauge::new(n as i64).encode(m.encode_family(&labels)?)?;
        }
        let mut m = encoder.encode_descriptor(
            "pending_templated_objects",
            "Templated objects not protected (yet), by reason (no_value, no_family, too_many, invalid_value, forbidden_member, duplicate)",
            None,
            MetricType::Gauge,
        )?;
        for (reason, n) in pending {
            ConstGauge::new(n as i64).encode(m.encode_family(&[("reason", reason)])?)?;
        }
        let m = encoder.encode_descriptor(
            "ready",
            "1 once the initial sync is done",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::from(ready)).encode(m)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> (Metrics, Registry) {
        Metrics::new(Arc::new(Mutex::new(Board::default())))
    }

    #[test]
    fn accept_header_negotiation() {
        assert!(wants_openmetrics(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        ));
        assert!(wants_openmetrics("application/openmetrics-text"));
        assert!(!wants_openmetrics("text/plain"));
        assert!(!wants_openmetrics("*/*"));
        assert!(!wants_openmetrics(""));
        assert!(!wants_openmetrics(
            "application/openmetrics-text;q=0,text/plain"
        ));
        assert!(!wants_openmetrics(
            "text/plain;q=0.9, application/openmetrics-text;q=0.5"
        ));
        assert!(!wants_openmetrics(";;;,,=q;q=x"));
    }

    #[test]
    fn both_formats_carry_every_metric() {
        let (m, r) = registry();
        m.drift_detected
            .get_or_create(&DriftLabels {
                kind: "rule",
                actor: "ip".into(),
            })
            .inc();
        m.repair_duration
            .get_or_create(&KindLabels { kind: "rule" })
            .observe(42e-6);
        m.start_time.set(1.7e9);
        let om = encode_openmetrics(&r);
        assert!(om.ends_with("# EOF\n"));
        assert!(
            om.contains("# TYPE netwarden_drift_detected counter\n"),
            "{om}"
        );
        assert!(om.contains("netwarden_drift_detected_total{kind=\"rule\",actor=\"ip\"} 1\n"));
        assert!(om.contains("# UNIT netwarden_repair_duration_seconds seconds\n"));
        assert!(om.contains("netwarden_build_info{version=\""));
        assert!(
            om.contains("netwarden_protected_objects{kind=\"rule\",state=\"in_sync\"} 0\n"),
            "{om}"
        );

        let text = encode_prometheus(&r);
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"));
        assert!(
            text.contains("# TYPE netwarden_drift_detected_total counter\n"),
            "{text}"
        );
        assert!(text.contains("# HELP netwarden_drift_detected_total Protected objects"));
        assert!(text.contains("# TYPE netwarden_repair_duration_seconds histogram\n"));
        assert!(
            text.contains(
                "netwarden_repair_duration_seconds_bucket{le=\"0.00008\",kind=\"rule\"} 1\n"
            ),
            "{text}"
        );
        assert!(text.contains("netwarden_repairs_total{kind=\"route\",result=\"failed\"} 0\n"));
        assert!(text.contains("# TYPE netwarden_build_info gauge\n"));
        assert!(text.contains("# TYPE netwarden_ready gauge\n"));
        assert!(
            text.contains("# TYPE process_cpu_seconds_total counter\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE process_resident_memory_bytes gauge\n"));
        assert!(om.contains("# TYPE process_cpu_seconds counter\n"), "{om}");
        assert!(om.contains("\nprocess_open_fds "), "{om}");
    }

    #[test]
    fn exported_names_cover_every_family() {
        let names = exported_names();
        for n in [
            "netwarden_drift_detected_total",
            "netwarden_repairs_total",
            "netwarden_repair_duration_seconds_bucket",
            "netwarden_repair_duration_seconds_count",
            "netwarden_protected_objects",
            "netwarden_contested_objects",
            "netwarden_apply_errors_total",
            "netwarden_forbidden_members_total",
            "netwarden_pending_templated_objects",
            "netwarden_build_info",
            "netwarden_config_last_reload_success_timestamp_seconds",
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_virtual_memory_bytes",
            "process_start_time_seconds",
            "process_open_fds",
            "process_max_fds",
        ] {
            assert!(names.contains(n), "{n} missing from {names:?}");
        }
    }
}
