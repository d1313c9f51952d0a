//! After a repair: what the echo teaches about how nft prints the config's rules, and the read
//! back that says whether the repair took.

use super::{Engine, Planned};
use crate::nftables::model::{RuleText, TableKey};
use crate::nftables::plan::{self, Repair};
use crate::nftables::runner::{self, Nft};
use crate::telemetry::status::{State, NFTABLES_KIND};
use tracing::{error, warn};

impl<N: Nft> Engine<N> {
    /// Rules the config writes otherwise than nft prints them, from the echo of the `add rule`
    /// commands just applied (same order): compared in the printed form from now on.
    pub(super) fn learn(&mut self, repairs: &[Repair], echo: &str) {
        let sent: Vec<(TableKey, RuleText)> = repairs
            .iter()
            .flat_map(|r| {
                r.ops.iter().filter_map(move |op| match op {
                    plan::Op::AddRule { rule, .. } => Some((r.table.clone(), rule.clone())),
                    _ => None,
                })
            })
            .collect();
        let echoed = runner::echoed_rules(echo);
        if sent.len() != echoed.len() {
            return;
        }
        for ((table, written), (_, chain, printed)) in sent.into_iter().zip(echoed) {
            if written == printed {
                continue;
            }
            let aliases = self.aliases.entry(table.clone()).or_default();
            if aliases.insert(written.full(), printed.clone()).is_none() {
                warn!(kind = NFTABLES_KIND, table = %table, chain = %chain, config = %written, printed = %printed, "nft prints this rule otherwise than the config writes it; comparing the printed form from now on (write it that way in the config)");
            }
        }
    }

    /// Reads each repaired table back. A table still drifting although nobody else committed a
    /// change to it since: the repair does not take (a rule or element nft prints otherwise
    /// than the config writes it); it is reported and only reported from then on, so nothing is
    /// added forever. A change by someone else is a new drift, left to its own notification.
    pub(super) async fn verify(&mut self, applied: &[Planned]) -> Vec<TableKey> {
        let mut settled = Vec::new();
        for p in applied {
            let Some(desired) = self.desired(&p.key) else {
                continue;
            };
            let observed = match self.read(&p.key).await {
                Ok(o) => o,
                Err(e) => {
                    error!(kind = NFTABLES_KIND, table = %p.key, error = %e, "cannot read the table back");
                    continue;
                }
            };
            let aliases = self.aliases.get(&p.key).cloned().unwrap_or_default();
            let (drift, _) = plan::plan_table(&desired, observed.as_ref(), &aliases);
            let Some(drift) = drift else {
                if observed.is_some_and(|o| super::replaying::Images::worth_one(&desired, &o)) {
                    settled.push(p.key.clone());
                }
                continue;
            };
            if self.drain_queued().is_err() || self.watch.touched(&p.key) {
                continue;
            }
            error!(kind = NFTABLES_KIND, name = %p.name, table = %p.key, drift = %drift.summary(), "the repair did not take: nft prints these objects otherwise than the config writes them (write them as `nft list table` prints them; `netwarden snapshot --nft-tables` does). Only reporting this table from now on");
            self.stuck.insert(p.name.clone());
            self.board_state(&p.name, State::Drifted, Some("repair does not take".into()));
            self.reported.insert(p.name.clone(), drift.summary());
        }
        settled
    }
}
