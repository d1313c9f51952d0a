//! `netwarden check`: one look at the kernel, the drift as a table or JSON. Changes nothing.

use crate::desired::DesiredState;
use crate::observe::kernel::{self, ObserveError};
use crate::observe::{Mirror, RouteInterest};
use crate::plan::{self, Finding, Plan};
use serde::Serialize;

/// Reads the kernel once and plans against it.
pub async fn check(desired: &DesiredState) -> Result<Plan, ObserveError> {
    let mut handle = kernel::connect()?;
    // Only protected routes: adopted ones come from the adopted-state file, not from a dump.
    let mut mirror = Mirror::new(RouteInterest::Keys(
        desired.routes.keys().cloned().collect(),
    ));
    kernel::dump_all(&mut handle, &mut mirror).await?;
    Ok(plan::plan_all(desired, &mirror))
}

#[derive(Serialize)]
struct Report<'a> {
    in_sync: bool,
    protected: usize,
    /// Of the protected objects, those adopted through `spec.adopt` (origin `adopted`).
    adopted: usize,
    drift: &'a [plan::Drift],
}

/// Protected objects adopted through `spec.adopt` (their names say so).
fn adopted(desired: &DesiredState) -> usize {
    let a = |n: &str| crate::adopt::origin(n) == "adopted";
    desired.rules.values().filter(|r| a(&r.name)).count()
        + desired.routes.values().filter(|r| a(&r.name)).count()
}

pub fn render_json(desired: &DesiredState, plan: &Plan) -> String {
    let report = Report {
        in_sync: plan.is_empty(),
        protected: desired.len(),
        adopted: adopted(desired),
        drift: &plan.drift,
    };
    serde_json::to_string_pretty(&report).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

pub fn render_table(desired: &DesiredState, plan: &Plan) -> String {
    let origin = match adopted(desired) {
        0 => String::new(),
        n => format!(" ({n} adopted)"),
    };
    if plan.is_empty() {
        return format!("in sync: {} protected objects{origin}\n", desired.len());
    }
    let rows: Vec<[String; 6]> = plan
        .drift
        .iter()
        .map(|d| {
            let (state, detail) = match &d.finding {
                Finding::Missing => ("missing", String::new()),
                Finding::Different { observed } => ("different", format!("observed: {observed}")),
                Finding::Pending { reason } => ("pending", reason.clone()),
            };
            [
                d.kind.to_string(),
                d.name.clone(),
                format!("{:?}", d.mode).to_lowercase(),
                state.to_string(),
                d.object.clone(),
                detail,
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
    let mut out = String::new();
    for r in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out.push_str(&format!(
        "{} of {} protected objects{origin} drifted\n",
        plan.drift.len(),
        desired.len()
    ));
    out
}

/// Drift of iptables chains and ipsets (`netfilter::guard::check`), reported beside the rest.
#[derive(Default, Serialize)]
pub struct NetfilterReport {
    pub chains: Vec<crate::netfilter::plan::ChainDrift>,
    pub ipsets: Vec<crate::netfilter::plan::SetDrift>,
    #[serde(skip)]
    pub protected: usize,
    /// Of those, the chains and sets adopted through `spec.adopt` (from the adopted-state file).
    #[serde(skip)]
    pub adopted: usize,
}

impl NetfilterReport {
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.ipsets.is_empty()
    }

    /// Rows like the core table's; empty when no chain or set is protected.
    pub fn render_table(&self) -> String {
        if self.protected == 0 {
            return String::new();
        }
        let origin = match self.adopted {
            0 => String::new(),
            n => format!(" ({n} adopted)"),
        };
        if self.is_empty() {
            return format!(
                "chains and sets in sync: {} protected{origin}\n",
                self.protected
            );
        }
        let mut out = String::from("KIND   NAME  MODE  OBJECT  DRIFT\n");
        let mode = |m: crate::model::Mode| format!("{m:?}").to_lowercase();
        for d in &self.chains {
            for f in &d.findings {
                out.push_str(&format!(
                    "chain  {}  {}  {}  {f}\n",
                    d.name,
                    mode(d.mode),
                    d.object
                ));
            }
        }
        for d in &self.ipsets {
            for f in &d.findings {
                out.push_str(&format!(
                    "ipset  {}  {}  {}  {f}\n",
                    d.name,
                    mode(d.mode),
                    d.object
                ));
            }
        }
        out.push_str(&format!(
            "{} of {} protected chains and sets{origin} drifted\n",
            self.chains.len() + self.ipsets.len(),
            self.protected
        ));
        out
    }

    /// Adds `chains` and `ipsets` to the core JSON report and folds them into `in_sync`.
    pub fn merge_json(&self, core: &str) -> String {
        let Ok(mut v) = serde_json::from_str::<serde_json::Value>(core) else {
            return core.to_owned();
        };
        let in_sync = v["in_sync"].as_bool().unwrap_or(false) && self.is_empty();
        v["in_sync"] = in_sync.into();
        v["chains"] = serde_json::to_value(&self.chains).unwrap_or_default();
        v["ipsets"] = serde_json::to_value(&self.ipsets).unwrap_or_default();
        v["chains_and_sets"] = serde_json::json!({
            "protected": self.protected,
            "adopted": self.adopted,
        });
        serde_json::to_string_pretty(&v).unwrap_or_else(|_| core.to_owned())
    }
}
