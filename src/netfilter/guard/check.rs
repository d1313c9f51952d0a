//! `netwarden check` for chains and sets: one read of each, changing nothing.

use super::refusals;
use crate::netfilter::canon::{Canonicaliser, Refusal};
use crate::netfilter::model::{DesiredChain, DesiredSet};
use crate::netfilter::plan::{self, ChainDrift, SetDrift};
use crate::netfilter::tools::{self, ToolError, Tools};
use thiserror::Error;

/// What `netwarden check` reports for chains and sets.
#[derive(Debug, Default)]
pub struct CheckResult {
    pub chains: Vec<ChainDrift>,
    pub sets: Vec<SetDrift>,
    /// Why rule specs were compared as written, if they were.
    pub unchecked: Option<String>,
}

#[derive(Debug, Error)]
pub enum CheckError {
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error("{}", refusals(.0))]
    Refused(Vec<Refusal>),
}

/// Reads every protected chain and set once, changing nothing (`netwarden check`). Rule specs
/// are compared in the form iptables prints them; one that cannot be made canonical is an error.
pub async fn check<T: Tools>(
    tools: &T,
    canon: &Canonicaliser,
    chains: &[DesiredChain],
    sets: &[DesiredSet],
) -> Result<CheckResult, CheckError> {
    let mut out = CheckResult::default();
    if !chains.is_empty() {
        let canonical = canon.canonicalise(tools, chains, sets).await;
        if !canonical.refused.is_empty() {
            return Err(CheckError::Refused(canonical.refused));
        }
        out.unchecked = canonical.unavailable;
        let backend = canon.backend(tools).await;
        for (id, desired) in plan::by_table(&canonical.chains) {
            let observed = tools.save_table(backend, id).await?;
            out.chains
                .extend(plan::plan_table(&desired, observed.as_ref()).0);
        }
    }
    for d in sets {
        let observed = tools::ipset_save(tools, &d.set).await?;
        out.sets
            .extend(plan::plan_set(d, observed.as_ref(), None).0);
    }
    Ok(out)
}
