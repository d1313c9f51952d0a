//! `netwarden check`: one look at the kernel, the drift as a table or JSON. Changes nothing.

use crate::desired::DesiredState;
use crate::model::Mode;
use crate::netfilter::plan::{ChainDrift, ChainFinding, SetDrift, SetFinding};
use crate::observe::kernel::{self, ObserveError};
use crate::observe::mirror::NeighbourInterest;
use crate::observe::{Mirror, RouteInterest};
use crate::plan::{self, Finding, Plan};
use serde::Serialize;

/// Reads the kernel once and plans against it. Device patterns are made to cover the links
/// there are (in `desired`, so that the report counts them).
pub async fn check(desired: &mut DesiredState) -> Result<Plan, ObserveError> {
    let mut handle = kernel::connect()?;
    // Only protected routes: adopted ones come from the adopted-state file, not from a dump.
    let mut mirror = Mirror::new(RouteInterest::Keys(
        desired.routes.keys().cloned().collect(),
    ));
    mirror.set_neighbour_interest(NeighbourInterest {
        neighbours: desired.neighbours.keys().cloned().collect(),
        fdb: desired.fdb.keys().cloned().collect(),
        devices: Vec::new(),
    });
    kernel::dump_all(&mut handle, &mut mirror).await?;
    let links: Vec<String> = mirror.links().map(|l| l.name.clone()).collect();
    desired.follow_links(links.iter().map(String::as_str));
    kernel::read_sysctls(&mut mirror, desired.sysctls.keys());
    Ok(plan::plan_all(desired, &mirror))
}

/// The JSON report's `kind` (its `apiVersion` is the config's, [`crate::config::API_VERSION`]).
pub const REPORT_KIND: &str = "CheckReport";

/// How many objects of each kind are protected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub rules: usize,
    pub routes: usize,
    pub addresses: usize,
    pub chains: usize,
    pub ipsets: usize,
    pub neighbours: usize,
    pub fdb: usize,
    /// Links and sysctls: those of a device pattern counted once per link it covers now.
    pub links: usize,
    pub sysctls: usize,
}

impl Counts {
    pub fn total(&self) -> usize {
        self.rules
            + self.routes
            + self.addresses
            + self.chains
            + self.ipsets
            + self.neighbours
            + self.fdb
            + self.links
            + self.sysctls
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n =
            |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
        write!(
            f,
            "{}, {}, {}, {}, {}",
            n(self.rules, "rule", "rules"),
            n(self.routes, "route", "routes"),
            n(self.addresses, "address", "addresses"),
            n(self.chains, "chain", "chains"),
            n(self.ipsets, "ipset", "ipsets")
        )?;
        // The kinds of node state are named when something of theirs is protected.
        for (count, one, many) in [
            (self.neighbours, "neighbour", "neighbours"),
            (self.fdb, "FDB entry", "FDB entries"),
            (self.links, "link", "links"),
            (self.sysctls, "sysctl", "sysctls"),
        ] {
            if count > 0 {
                write!(f, ", {}", n(count, one, many))?;
            }
        }
        Ok(())
    }
}

/// One protected object that is not as desired. Every kind has the same fields; chains and sets
/// also carry their structured `findings`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Item {
    /// rule, route, address, chain, ipset.
    pub kind: &'static str,
    pub name: String,
    pub object: String,
    pub mode: Mode,
    /// missing, different, pending.
    pub state: &'static str,
    /// What differs (`observed: …`, the findings) or why it is pending; empty when missing.
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub findings: Option<serde_json::Value>,
}

/// What `netwarden check` found: counts and the objects not as desired.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub api_version: &'static str,
    pub kind: &'static str,
    pub in_sync: bool,
    pub protected: Counts,
    /// Of the protected objects, those adopted through `spec.adopt`.
    pub adopted: usize,
    pub drift: Vec<Item>,
}

/// Protected rules and routes adopted through `spec.adopt` (their names say so).
fn adopted(desired: &DesiredState) -> usize {
    let a = |n: &str| crate::adopt::origin(n) == "adopted";
    desired.rules.values().filter(|r| a(&r.name)).count()
        + desired.routes.values().filter(|r| a(&r.name)).count()
}

fn kind_name(k: crate::model::Kind) -> &'static str {
    k.as_str()
}

fn mode_name(m: Mode) -> String {
    format!("{m:?}").to_lowercase()
}

fn findings_detail<T: std::fmt::Display>(findings: &[T]) -> String {
    findings
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl Report {
    /// The report of rules, routes and addresses alone.
    pub fn new(desired: &DesiredState, plan: &Plan) -> Report {
        let drift = plan
            .drift
            .iter()
            .map(|d| {
                let (state, detail) = match &d.finding {
                    Finding::Missing => ("missing", String::new()),
                    Finding::Different { observed } => {
                        ("different", format!("observed: {observed}"))
                    }
                    Finding::Pending { reason } => ("pending", reason.clone()),
                };
                Item {
                    kind: kind_name(d.kind),
                    name: d.name.clone(),
                    object: d.object.clone(),
                    mode: d.mode,
                    state,
                    detail,
                    findings: None,
                }
            })
            .collect::<Vec<_>>();
        Report {
            api_version: crate::config::API_VERSION,
            kind: REPORT_KIND,
            in_sync: drift.is_empty(),
            protected: Counts {
                rules: desired.rules.len(),
                routes: desired.routes.len(),
                addresses: desired.addresses.len(),
                neighbours: desired.neighbours.len(),
                fdb: desired.fdb.len(),
                links: desired.links.len(),
                sysctls: desired.sysctls.len(),
                ..Counts::default()
            },
            adopted: adopted(desired),
            drift,
        }
    }

    /// Adds the chains and sets: how many are protected (`adopted` of them through
    /// `spec.adopt`) and their drift.
    pub fn with_netfilter(mut self, nf: NetfilterReport) -> Report {
        self.protected.chains = nf.chains_protected;
        self.protected.ipsets = nf.ipsets_protected;
        self.adopted += nf.adopted;
        for d in nf.chains {
            let missing = d.findings.contains(&ChainFinding::Missing);
            self.drift.push(Item {
                kind: "chain",
                state: if missing { "missing" } else { "different" },
                detail: if missing {
                    String::new()
                } else {
                    findings_detail(&d.findings)
                },
                findings: serde_json::to_value(&d.findings).ok(),
                name: d.name,
                object: d.object,
                mode: d.mode,
            });
        }
        for d in nf.ipsets {
            let missing = d.findings.contains(&SetFinding::Missing);
            self.drift.push(Item {
                kind: "ipset",
                state: if missing { "missing" } else { "different" },
                detail: if missing {
                    String::new()
                } else {
                    findings_detail(&d.findings)
                },
                findings: serde_json::to_value(&d.findings).ok(),
                name: d.name,
                object: d.object,
                mode: d.mode,
            });
        }
        self.in_sync = self.drift.is_empty();
        self
    }

    pub fn render_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self)
            .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
        s.push('\n');
        s
    }

    /// A first line that counts every protected kind, then a row per object not as desired.
    pub fn render_table(&self) -> String {
        let origin = match self.adopted {
            0 => String::new(),
            n => format!(" ({n} adopted)"),
        };
        let total = self.protected.total();
        if self.in_sync {
            return format!(
                "in sync: {total} protected objects{origin}: {}\n",
                self.protected
            );
        }
        let mut out = format!(
            "drift: {} of {total} protected objects{origin}: {}\n",
            self.drift.len(),
            self.protected
        );
        let rows: Vec<[String; 6]> = self
            .drift
            .iter()
            .map(|d| {
                [
                    d.kind.to_string(),
                    d.name.clone(),
                    mode_name(d.mode),
                    d.state.to_string(),
                    d.object.clone(),
                    d.detail.clone(),
                ]
            })
            .collect();
        let header = ["KIND", "NAME", "MODE", "STATE", "OBJECT", "DETAIL"].map(String::from);
        let mut widths = header.clone().map(|h| h.len());
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.len());
            }
        }
        for r in std::iter::once(&header).chain(&rows) {
            let line: Vec<String> = r
                .iter()
                .zip(widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
        out
    }
}

/// Drift of iptables chains and ipsets (`netfilter::guard::check`), reported beside the rest.
#[derive(Default)]
pub struct NetfilterReport {
    pub chains: Vec<ChainDrift>,
    pub ipsets: Vec<SetDrift>,
    pub chains_protected: usize,
    pub ipsets_protected: usize,
    /// Of those, the chains and sets adopted through `spec.adopt` (from the adopted-state file).
    pub adopted: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Kind;
    use crate::plan::Drift;

    fn desired() -> DesiredState {
        let cfg = crate::config::parse(
            "t.yaml",
            "apiVersion: netwarden.io/v1alpha1\nkind: ProtectedState\nspec:\n  rules:\n    - name: r\n      priority: 100\n      from: 10.0.0.0/8\n      table: 77\n",
        )
        .unwrap();
        DesiredState::from_config(&cfg)
    }

    fn missing_rule(desired: &DesiredState) -> Plan {
        let (id, rule) = desired.rules.iter().next().unwrap();
        Plan {
            drift: vec![Drift {
                id: crate::model::ObjectId::Rule(id.clone()),
                kind: Kind::Rule,
                name: rule.name.clone(),
                object: id.to_string(),
                mode: Mode::Enforce,
                finding: Finding::Missing,
            }],
            steps: Vec::new(),
        }
    }

    fn netfilter() -> NetfilterReport {
        NetfilterReport {
            chains: vec![ChainDrift {
                name: "c".into(),
                mode: Mode::Observe,
                object: "ipv4 nat X".into(),
                findings: vec![ChainFinding::JumpMissing {
                    chain: "POSTROUTING".into(),
                    rule: crate::netfilter::rulespec::RuleSpec::parse("-j X").unwrap(),
                }],
            }],
            ipsets: vec![SetDrift {
                name: "s".into(),
                mode: Mode::Enforce,
                object: "s".into(),
                findings: vec![SetFinding::Missing],
            }],
            chains_protected: 2,
            ipsets_protected: 1,
            adopted: 1,
        }
    }

    #[test]
    fn the_first_line_counts_every_kind() {
        let d = desired();
        let r = Report::new(&d, &Plan::default()).with_netfilter(NetfilterReport {
            chains_protected: 2,
            ipsets_protected: 1,
            ..Default::default()
        });
        assert_eq!(
            r.render_table(),
            "in sync: 4 protected objects: 1 rule, 0 routes, 0 addresses, 2 chains, 1 ipset\n"
        );
        let r = Report::new(&d, &missing_rule(&d)).with_netfilter(netfilter());
        let table = r.render_table();
        let mut lines = table.lines();
        assert_eq!(
            lines.next().unwrap(),
            "drift: 3 of 4 protected objects (1 adopted): 1 rule, 0 routes, 0 addresses, 2 chains, 1 ipset"
        );
        assert!(lines.next().unwrap().starts_with("KIND"));
        assert!(table.contains("jump missing in POSTROUTING"), "{table}");
    }

    #[test]
    fn every_item_has_the_same_shape() {
        let d = desired();
        let r = Report::new(&d, &missing_rule(&d)).with_netfilter(netfilter());
        let v: serde_json::Value = serde_json::from_str(&r.render_json()).unwrap();
        assert_eq!(v["apiVersion"], crate::config::API_VERSION);
        assert_eq!(v["kind"], REPORT_KIND);
        assert_eq!(v["inSync"], false);
        assert_eq!(v["protected"]["chains"], 2);
        let items = v["drift"].as_array().unwrap();
        assert_eq!(items.len(), 3);
        for item in items {
            for key in ["kind", "name", "object", "mode", "state", "detail"] {
                assert!(item.get(key).is_some(), "{key} missing in {item}");
            }
        }
        assert_eq!(items[1]["kind"], "chain");
        assert_eq!(items[1]["state"], "different");
        assert_eq!(items[1]["findings"][0]["finding"], "jump_missing");
        assert_eq!(items[2]["state"], "missing");
        assert!(items[0].get("findings").is_none());
    }
}

/// Drift of nftables tables (`nftables::engine::check`), reported after the chains and sets.
#[derive(Default, Serialize)]
pub struct NftReport {
    pub tables: Vec<crate::nftables::plan::TableDrift>,
    #[serde(skip)]
    pub protected: usize,
}

impl NftReport {
    /// One row per finding; empty when no table is protected.
    pub fn render_table(&self) -> String {
        if self.protected == 0 {
            return String::new();
        }
        if self.tables.is_empty() {
            return format!("nftables tables in sync: {} protected\n", self.protected);
        }
        let mut out = String::from("KIND       NAME  MODE  OBJECT  DRIFT\n");
        for d in &self.tables {
            for f in &d.findings {
                out.push_str(&format!(
                    "nft_table  {}  {}  {}  {f}\n",
                    d.name,
                    format!("{:?}", d.mode).to_lowercase(),
                    d.object
                ));
            }
        }
        out.push_str(&format!(
            "{} of {} protected nftables tables drifted\n",
            self.tables.len(),
            self.protected
        ));
        out
    }

    /// Adds `nftables` to the JSON report and folds it into `in_sync`.
    pub fn merge_json(&self, core: &str) -> String {
        let Ok(mut v) = serde_json::from_str::<serde_json::Value>(core) else {
            return core.to_owned();
        };
        let in_sync = v["in_sync"].as_bool().unwrap_or(false) && self.tables.is_empty();
        v["in_sync"] = in_sync.into();
        v["nftables"] = serde_json::json!({
            "protected": self.protected,
            "drift": serde_json::to_value(&self.tables).unwrap_or_default(),
        });
        serde_json::to_string_pretty(&v).unwrap_or_else(|_| core.to_owned())
    }
}
