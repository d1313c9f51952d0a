//! The task that keeps protected chains and sets in place, beside the rtnetlink agent.
//!
//! nft backend: an nf_tables notification touching a protected chain (or a chain holding one of
//! its jumps) marks its table; at the end of that transaction (NEWGEN) what the notifications
//! alone prove missing is written back at once ([`crate::netfilter::blind`]), then only the
//! marked tables are read, judged and repaired (which verifies the first repair). Transactions
//! committed by netwarden's own restores are recognised by the NEWGEN sender pid and not re-read.
//! Legacy backend: the protected tables are read every `pollInterval`. Sets (never notified):
//! `ipset save NAME` every `pollInterval`, parsed and planned only when the text differs from the
//! last in-sync read.
//!
//! Split by concern: [`chains`] (read, plan, repair, verify; fights), [`sets`] (configured sets),
//! [`adopted`] (what `spec.adopt` protects), [`images`] and [`spares`] (deleted chains put back
//! at once), [`reload`], [`ledger`] (one record per protected object: pure), [`report`] (board,
//! metrics, notices). The tools are reached through [`Tools`] only.

mod adopted;
mod chains;
mod check;
mod images;
mod ledger;
mod reload;
mod report;
mod sets;
mod spares;
#[cfg(test)]
mod tests;

pub use adopted::Adoption;
pub use check::{check, CheckError, CheckResult};

use super::canon::{Canonicaliser, Refusal};
use super::events::{NftEvent, NftEvents};
use super::model::{ChainKey, DesiredChain, DesiredSet, Table, TableId};
use super::tools::{Backend, BackendChoice, Binaries, Tools};
use crate::adopt::AdoptSelector;
use crate::model::Mode;
use crate::telemetry::status::State;
use crate::telemetry::Telemetry;
use chains::Cause;
use ledger::Ledger;
use report::Out;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

#[derive(Debug, Error)]
pub enum GuardError {
    #[error("cannot subscribe to nf_tables notifications: {0}")]
    Subscribe(#[source] std::io::Error),
    #[error("nf_tables notification socket failed: {0}")]
    Events(#[source] std::io::Error),
    #[error("{}", refusals(.0))]
    Refused(Vec<Refusal>),
}

fn refusals(r: &[Refusal]) -> String {
    let lines: Vec<String> = r.iter().map(|r| format!("  {r}")).collect();
    format!(
        "rule specs iptables cannot hold as written (write each as `iptables-save` prints it):\n{}",
        lines.join("\n")
    )
}

/// Counters (exported as metrics by the observability layer).
#[derive(Clone, Debug, Default)]
pub struct GuardStats {
    pub chain_repairs: u64,
    pub set_repairs: u64,
    pub repair_failures: u64,
    /// Forbidden members seen in a protected set (removed in enforce mode, reported in observe).
    pub forbidden_members: u64,
    pub forbidden_removed: u64,
    pub table_reads: u64,
    pub set_reads: u64,
}

/// New chains and sets for a running guard (a ConfigMap edit or new facts; SIGHUP in file mode).
/// Sent at every reload, also when nothing changed: a reload re-affirms the chains, and a chain
/// whose repair did not take is repaired again.
#[derive(Clone, Debug, PartialEq)]
pub struct GuardReload {
    pub chains: Vec<DesiredChain>,
    pub sets: Vec<DesiredSet>,
    /// Every `spec.adopt` selector; the guard keeps those that name chains or ipsets.
    pub adopt: Vec<AdoptSelector>,
    pub poll: Duration,
    pub resync: Duration,
}

pub struct Guard<T: Tools = Binaries> {
    tools: T,
    canon: Canonicaliser,
    backend: Backend,
    chains: Vec<DesiredChain>,
    sets: Vec<DesiredSet>,
    poll: Duration,
    resync: Duration,
    events: Option<NftEvents>,
    /// Chains whose changes matter, per table: the protected ones and those holding jumps.
    watched: HashMap<TableId, HashSet<String>>,
    ledger: Ledger,
    /// Images of protected chains, to put a deleted one back at once.
    images: images::ChainImages,
    /// This guard's number with the responder ([`crate::nftables::armed::new_owner`]).
    owner: u64,
    /// Pids of netwarden's own recent restores.
    own: VecDeque<u32>,
    /// Own restores whose NEWGEN has not come through the notification socket yet, with when
    /// they were applied: a transaction read before that NEWGEN committed before the restore, so
    /// what its notifications say is no longer the whole story (the restore may have repaired
    /// it already): no repair from the notifications alone then, only the read.
    unseen: Vec<(u32, Instant)>,
    pub stats: GuardStats,
    out: Out,
    adoption: Adoption,
    /// The process whose nf_tables transaction is being checked (from its NEWGEN message);
    /// `None` for polls and resyncs, where nobody is known.
    actor: Option<String>,
    /// Names of the parent, grandparent… of `actor`, read when its NEWGEN arrived (a CNI's
    /// `iptables` child acts for the CNI).
    ancestors: Vec<String>,
    /// Where adopted chains and sets are saved (the adopted-state file), when there is one.
    store: Option<crate::adopted_state::Writer>,
}

/// The notifications of the transaction being received, per table.
type Pending = BTreeMap<TableId, super::blind::Touches>;

impl Guard<Binaries> {
    /// Detects the backend, subscribes to notifications and brings everything in place once.
    /// Logs `chains and sets in sync` when done.
    pub async fn start(
        chains: Vec<DesiredChain>,
        sets: Vec<DesiredSet>,
        poll: Duration,
        resync: Duration,
        choice: BackendChoice,
    ) -> Result<Guard, GuardError> {
        Guard::start_adopting(chains, sets, poll, resync, choice, Adoption::default()).await
    }

    /// [`Guard::start`], also adopting chains and sets as `adoption` says.
    pub async fn start_adopting(
        chains: Vec<DesiredChain>,
        sets: Vec<DesiredSet>,
        poll: Duration,
        resync: Duration,
        choice: BackendChoice,
        adoption: Adoption,
    ) -> Result<Guard, GuardError> {
        let canon = Canonicaliser::new(choice);
        Guard::start_with(Binaries, canon, chains, sets, (poll, resync), adoption).await
    }
}

impl<T: Tools> Guard<T> {
    /// Starts with the given tools; `canon` finds the backend and the rules' printed forms. A
    /// rule that cannot be made canonical refuses the whole start.
    pub async fn start_with(
        tools: T,
        canon: Canonicaliser,
        chains: Vec<DesiredChain>,
        sets: Vec<DesiredSet>,
        (poll, resync): (Duration, Duration),
        adoption: Adoption,
    ) -> Result<Guard<T>, GuardError> {
        // Nothing to protect: no tools run, no socket.
        let reads_chains = !chains.is_empty() || adoption.adopts_chains();
        let backend = if reads_chains {
            let found = canon.detect(&tools).await;
            if let Some([nft, legacy]) = found.counts {
                info!(
                    backend = found.backend.as_str(),
                    nft_rules = nft,
                    legacy_rules = legacy,
                    "iptables backend detected"
                );
            }
            found.backend
        } else {
            Backend::Nft
        };
        let canonical = canon.canonicalise(&tools, &chains, &sets).await;
        if !canonical.refused.is_empty() {
            return Err(GuardError::Refused(canonical.refused));
        }
        chains::log_canonical(&canonical);
        let mut gen = None;
        let events = if backend == Backend::Nft && reads_chains {
            gen = tools.generation();
            Some(NftEvents::subscribe().map_err(GuardError::Subscribe)?)
        } else {
            None
        };
        let watched = watched_tables(&canonical.chains, &adoption);
        let mut guard = Guard {
            tools,
            canon,
            backend,
            chains: canonical.chains,
            sets,
            poll,
            resync,
            events,
            watched,
            ledger: Ledger::default(),
            images: images::ChainImages::at(gen),
            owner: crate::nftables::armed::new_owner(),
            own: VecDeque::new(),
            unseen: Vec::new(),
            stats: GuardStats::default(),
            out: Out::new(),
            adoption,
            actor: None,
            ancestors: Vec::new(),
            store: None,
        };
        if !guard.is_idle() {
            let started = Instant::now();
            let tables: BTreeSet<TableId> = guard.watched.keys().copied().collect();
            guard.sync_tables(&tables, Cause::Place).await;
            guard.sync_sets(true).await;
            info!(
                chains = guard.chains.len(),
                ipsets = guard.sets.len(),
                adopted_chains = guard.adoption.chains.len(),
                adopted_ipsets = guard.adoption.sets.len(),
                backend = guard.backend.as_str(),
                events = guard.events.is_some(),
                poll_ms = guard.poll.as_millis() as u64,
                still_drifted = guard.ledger.reported(),
                took_us = started.elapsed().as_micros() as u64,
                "chains and sets in sync"
            );
        }
        Ok(guard)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The canonicaliser (shared with the reload path, which checks a new config's rule specs
    /// before any of it is applied).
    pub fn canonicaliser(&self) -> Canonicaliser {
        self.canon.clone()
    }

    fn is_idle(&self) -> bool {
        self.chains.is_empty() && self.sets.is_empty() && self.adoption.selectors.is_empty()
    }

    /// Saves adopted chains and sets to the adopted-state file through `store` (shared with the
    /// rtnetlink agent, which writes the rules and routes), from now on and at once.
    pub fn with_store(mut self, store: Option<crate::adopted_state::Writer>) -> Guard<T> {
        self.store = store;
        self.save_adopted();
        self
    }

    fn save_adopted(&self) {
        if let Some(store) = &self.store {
            store.save_netfilter(
                self.adoption.chains.values().map(Into::into).collect(),
                self.adoption.sets.values().map(Into::into).collect(),
            );
        }
    }

    /// Counts repairs and forbidden members in the agent's metrics, and publishes the chains and
    /// sets on its status board.
    pub fn with_telemetry(mut self, telemetry: Arc<Telemetry>) -> Guard<T> {
        self.out.set_telemetry(telemetry);
        self.publish();
        // What the initial sync found, before there was a board to tell.
        for (name, r) in self.ledger.records() {
            if r.gave_up {
                let why = "repair does not take: rules printed otherwise than written";
                self.out.state(name, State::Drifted, Some(why.into()));
            } else if let Some(e) = &r.failing {
                self.out.state(name, State::Drifted, Some(e.clone()));
            } else if let Some(text) = &r.reported {
                self.out.state(name, State::ObserveOnly, Some(text.clone()));
            }
        }
        self
    }

    /// Publishes the chains and sets, configured and adopted, on the status board (`status`,
    /// the protected-object gauges).
    fn publish(&self) {
        let mode = |m: Mode| format!("{m:?}").to_lowercase();
        let (adopted_chains, adopted_sets) = self.adoption.desired();
        let chains = self.chains.iter().chain(&adopted_chains);
        let sets = self.sets.iter().chain(&adopted_sets);
        let catalog = chains
            .map(|c| ("chain", c.name.clone(), c.key.to_string(), mode(c.mode)))
            .chain(sets.map(|s| ("ipset", s.name.clone(), s.set.clone(), mode(s.mode))))
            .collect();
        self.out.catalog(catalog);
    }

    /// Runs until an unrecoverable error; with nothing to protect, never returns.
    pub async fn run(self) -> Result<(), GuardError> {
        self.run_with(None).await
    }

    /// [`Guard::run`], also taking new chains and sets from `reloads`.
    pub async fn run_with(
        mut self,
        mut reloads: Option<mpsc::Receiver<GuardReload>>,
    ) -> Result<(), GuardError> {
        if self.is_idle() && reloads.is_none() {
            return std::future::pending().await;
        }
        let timer = |every: Duration| {
            let mut t = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        };
        let mut poll = timer(self.poll);
        let mut resync = timer(self.resync);
        let mut all: BTreeSet<TableId> = self.watched.keys().copied().collect();
        let mut pending = Pending::new();
        loop {
            // Everything read is judged: what may be put back at once is armed.
            self.make_spare();
            self.arm_images();
            // The earliest held-back repair of a contested chain (or end of a fight).
            let deadline = self.ledger.next_deadline();
            let backoff = tokio::time::sleep_until(tokio::time::Instant::from_std(
                deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600)),
            ));
            tokio::select! {
                Some(r) = next_reload(&mut reloads) => {
                    self.reload(r).await?;
                    all = self.watched.keys().copied().collect();
                    pending.clear();
                    poll = timer(self.poll);
                    resync = timer(self.resync);
                }
                batch = next_events(&mut self.events) => {
                    let batch = batch.map_err(GuardError::Events)?;
                    for ev in batch {
                        self.on_event(ev, &mut pending, &all).await;
                    }
                }
                _ = backoff, if deadline.is_some() => self.on_backoff_timer().await,
                _ = poll.tick() => {
                    if self.events.is_none() {
                        self.sync_tables(&all, Cause::Drift).await;
                    }
                    self.sync_sets(false).await;
                }
                _ = resync.tick() => {
                    self.sync_tables(&all, Cause::Drift).await;
                    self.sync_sets(true).await;
                }
            }
        }
    }

    /// One nf_tables notification: a change marks its table (with what it did); the end of a
    /// transaction repairs the marked tables.
    async fn on_event(&mut self, ev: NftEvent, pending: &mut Pending, all: &BTreeSet<TableId>) {
        match ev {
            NftEvent::Touch {
                family,
                table,
                chain,
                removed,
                object,
            } => {
                let Some(table) = Table::parse(&table) else {
                    return;
                };
                let id = TableId { family, table };
                let Some(watched) = self.watched.get(&id) else {
                    return;
                };
                let adopted = |c: &String| {
                    self.adoption.covers(&ChainKey {
                        family,
                        table,
                        chain: c.clone(),
                    })
                };
                if chain
                    .as_ref()
                    .is_none_or(|c| watched.contains(c) || adopted(c))
                {
                    debug!(table = %id, chain = ?chain, removed, "nf_tables change");
                    pending
                        .entry(id)
                        .or_default()
                        .add(chain.as_deref(), object, removed);
                }
            }
            NftEvent::NewGen { gen, pid, process } => {
                self.images.gen = gen.or(self.images.gen);
                let relayers = self.events.as_ref().map_or(&[][..], NftEvents::relayers);
                if pid.is_some_and(|p| self.own.contains(&p) || relayers.contains(&p)) {
                    // Our own restore: already verified after applying it.
                    self.unseen.retain(|(p, _)| Some(*p) != pid);
                    pending.clear();
                    return;
                }
                if pending.is_empty() {
                    return;
                }
                // A restore without changes commits nothing: its NEWGEN never comes.
                self.unseen
                    .retain(|(_, at)| at.elapsed() < images::UNSEEN_FOR);
                let stale = !self.unseen.is_empty();
                debug!(pid = ?pid, process = ?process, "transaction touched protected chains");
                // NEWGEN names the process that committed the transaction: the actor of what
                // the re-read finds drifted.
                self.actor = Some(process.unwrap_or_else(|| "unknown".into()));
                // Read now, before the tools run: the process is about to exit (its parent can
                // still be read while it is a zombie).
                if let (Some(pid), true) = (pid, self.adoption.adopts_chains()) {
                    self.ancestors = crate::telemetry::attribution::ancestors(pid);
                }
                for (id, touches) in std::mem::take(pending) {
                    self.images.forget_changed(&self.chains, id, &touches);
                    let applied = match stale {
                        false => {
                            let replayed = self.replay_deleted(id, &touches);
                            self.repair_blind(id, &touches, &replayed).await
                        }
                        true => None,
                    };
                    self.sync_table(id, Cause::Drift, applied).await;
                }
                self.actor = None;
                self.ancestors.clear();
            }
            NftEvent::Overrun => {
                warn!("nf_tables notifications were lost (socket overrun); re-reading the protected tables");
                pending.clear();
                self.unseen.clear();
                self.images.clear();
                self.sync_tables(all, Cause::Drift).await;
            }
        }
    }

    /// Held-back repairs of contested chains whose time has come; fights that stopped; failed
    /// repairs to try again.
    async fn on_backoff_timer(&mut self) {
        let (due, calmed) = self.ledger.poll(Instant::now());
        for c in &calmed {
            let fighter = c.fighter.as_deref().unwrap_or("unknown");
            info!(kind = "chain", name = %c.id, actor = fighter, "no longer contested");
            if !self.ledger.is_reported(&c.id) {
                self.out.state(&c.id, State::InSync, None);
            }
        }
        let tables: BTreeSet<TableId> = due.iter().filter_map(|n| self.table_of(n)).collect();
        for id in tables {
            self.sync_table(id, Cause::Retry, None).await;
        }
        for n in &due {
            self.ledger.retry_done(n);
        }
        // Failed repairs: read again and repaired if still needed, as a poll would.
        let failed = self.ledger.failed_due(Instant::now());
        let tables: BTreeSet<TableId> = failed.iter().filter_map(|n| self.table_of(n)).collect();
        for id in tables {
            self.sync_table(id, Cause::Drift, None).await;
        }
    }

    /// The table of a protected chain (configured or adopted), by object name.
    fn table_of(&self, name: &str) -> Option<TableId> {
        let (adopted, _) = self.adoption.desired();
        self.chains
            .iter()
            .chain(&adopted)
            .find(|c| c.name == name)
            .map(|c| c.key.table_id())
    }
}

/// netwarden leaves no spare behind.
impl<T: Tools> Drop for Guard<T> {
    fn drop(&mut self) {
        let chains = std::mem::take(&mut self.chains);
        self.drop_spares_of(&chains);
    }
}

fn watched_tables(
    chains: &[DesiredChain],
    adoption: &Adoption,
) -> HashMap<TableId, HashSet<String>> {
    let mut watched: HashMap<TableId, HashSet<String>> = HashMap::new();
    // Adopted chains are matched by name when their notifications arrive; the table is read.
    for id in adoption.tables() {
        watched.entry(id).or_default();
    }
    for c in chains {
        let w = watched.entry(c.key.table_id()).or_default();
        w.insert(c.key.chain.clone());
        w.insert(spares::spare_name(c));
        w.extend(c.jumps.iter().map(|j| j.chain.clone()));
    }
    watched
}

async fn next_reload(r: &mut Option<mpsc::Receiver<GuardReload>>) -> Option<GuardReload> {
    match r {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

/// The next batch of notifications, or never when there is no socket (legacy backend).
async fn next_events(events: &mut Option<NftEvents>) -> std::io::Result<Vec<NftEvent>> {
    match events {
        Some(e) => e.next().await,
        None => std::future::pending().await,
    }
}

fn digest(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}
