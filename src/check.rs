//! `netwarden check`: one look at the kernel, the drift as a table or JSON. Changes nothing.

use crate::desired::DesiredState;
use crate::observe::kernel::{self, ObserveError};
use crate::observe::{Mirror, RouteInterest};
use crate::plan::{self, Finding, Plan};
use serde::Serialize;

/// Reads the kernel once and plans against it.
pub async fn check(desired: &DesiredState) -> Result<Plan, ObserveError> {
    let mut handle = kernel::connect()?;
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
    drift: &'a [plan::Drift],
}

pub fn render_json(desired: &DesiredState, plan: &Plan) -> String {
    let report = Report {
        in_sync: plan.is_empty(),
        protected: desired.len(),
        drift: &plan.drift,
    };
    serde_json::to_string_pretty(&report).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

pub fn render_table(desired: &DesiredState, plan: &Plan) -> String {
    if plan.is_empty() {
        return format!("in sync: {} protected objects\n", desired.len());
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
        "{} of {} protected objects drifted\n",
        plan.drift.len(),
        desired.len()
    ));
    out
}
