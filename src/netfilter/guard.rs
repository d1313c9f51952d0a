//! The task that keeps protected chains and sets in place, beside the rtnetlink agent.
//!
//! nft backend: an nf_tables notification touching a protected chain (or a chain holding one of
//! its jumps) marks its table; at the end of that transaction (NEWGEN) only the marked tables are
//! read and repaired. Transactions committed by netwarden's own restores are recognised by the
//! NEWGEN sender pid and not re-read. Legacy backend: the protected tables are read every
//! `pollInterval`. Sets (never notified): `ipset save NAME` every `pollInterval`, parsed and
//! planned only when the text differs from the last in-sync read.

use super::adopted::{self, AdoptedChain, AdoptedSet, Outcome};
use super::events::{NftEvent, NftEvents};
use super::model::{ChainKey, DesiredChain, DesiredSet, Table, TableId};
use super::plan::{self, ChainDrift, SetDrift, SetFinding};
use super::render;
use super::tools::{self, Backend, BackendChoice, ToolError};
use crate::adopt::{Actor, AdoptSelector};
use crate::model::Mode;
use crate::obs::metrics::{DriftLabels, ForbiddenLabels, ForgetLabels, RepairLabels};
use crate::obs::status::State;
use crate::obs::{Notice, Telemetry};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

/// Repairs of one table in a row that may not converge before a chain is only reported.
const MAX_ATTEMPTS: u32 = 3;
/// Restores in one sync of a table at most, while other processes keep changing it.
const MAX_ROUNDS: u32 = 16;

#[derive(Debug, Error)]
pub enum GuardError {
    #[error("cannot subscribe to nf_tables notifications: {0}")]
    Subscribe(#[source] std::io::Error),
    #[error("nf_tables notification socket failed: {0}")]
    Events(#[source] std::io::Error),
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
#[derive(Clone, Debug, PartialEq)]
pub struct GuardReload {
    pub chains: Vec<DesiredChain>,
    pub sets: Vec<DesiredSet>,
    /// Every `spec.adopt` selector; the guard keeps those that name chains or ipsets.
    pub adopt: Vec<AdoptSelector>,
    pub poll: Duration,
    pub resync: Duration,
}

/// What the guard adopts (`spec.adopt[].chains`, `spec.adopt[].ipsets`) and what it has adopted.
#[derive(Clone, Debug, Default)]
pub struct Adoption {
    /// Only the selectors that name chains or ipsets.
    pub selectors: Vec<AdoptSelector>,
    pub chains: BTreeMap<ChainKey, AdoptedChain>,
    pub sets: BTreeMap<String, AdoptedSet>,
}

impl Adoption {
    /// The chain and set selectors of `selectors`, with what the adopted-state file kept for
    /// them (protected at once after a restart, also if removed while the agent was down).
    pub fn new(
        selectors: &[AdoptSelector],
        saved: Option<&crate::adopted_state::AdoptedState>,
    ) -> Adoption {
        let selectors = Adoption::netfilter_selectors(selectors);
        let (chains, sets) = match saved {
            Some(st) => adopted::from_saved(&selectors, &st.chains, &st.ipsets),
            None => Default::default(),
        };
        Adoption {
            selectors,
            chains,
            sets,
        }
    }

    /// The selectors that name chains or ipsets.
    fn netfilter_selectors(selectors: &[AdoptSelector]) -> Vec<AdoptSelector> {
        selectors
            .iter()
            .filter(|s| s.chains.is_some() || s.ipsets.is_some())
            .cloned()
            .collect()
    }

    /// The tables chain selectors look into.
    fn tables(&self) -> BTreeSet<TableId> {
        self.selectors
            .iter()
            .filter_map(|s| s.chains.as_ref())
            .flat_map(|c| {
                c.tables.iter().map(|&table| TableId {
                    family: c.family,
                    table,
                })
            })
            .chain(self.chains.keys().map(ChainKey::table_id))
            .collect()
    }

    fn adopts_chains(&self) -> bool {
        !self.chains.is_empty() || self.selectors.iter().any(|s| s.chains.is_some())
    }

    fn adopts_sets(&self) -> bool {
        !self.sets.is_empty() || self.selectors.iter().any(|s| s.ipsets.is_some())
    }

    /// Does a change of this chain concern adoption?
    fn covers(&self, key: &ChainKey) -> bool {
        self.chains.contains_key(key) || crate::adopt::select_chain(&self.selectors, key).is_some()
    }

    fn mode(&self, selector: &str) -> Mode {
        self.selectors
            .iter()
            .find(|s| s.name == selector)
            .map_or(Mode::Observe, |s| s.mode)
    }

    /// Adopted chains and sets, as `check` and `status` list them beside the configured ones.
    pub fn desired(&self) -> (Vec<DesiredChain>, Vec<DesiredSet>) {
        let chains = self
            .chains
            .values()
            .map(|c| c.desired(self.mode(&c.selector)))
            .collect();
        let sets = self
            .sets
            .values()
            .map(|s| s.desired(self.mode(&s.selector)))
            .collect();
        (chains, sets)
    }
}

pub struct Guard {
    choice: BackendChoice,
    backend: Backend,
    chains: Vec<DesiredChain>,
    sets: Vec<DesiredSet>,
    poll: Duration,
    resync: Duration,
    events: Option<NftEvents>,
    /// Chains whose changes matter, per table: the protected ones and those holding jumps.
    watched: HashMap<TableId, HashSet<String>>,
    /// Digest of the last `ipset save` text of each protected set that was in sync.
    headers: HashMap<String, u64>,
    /// What was last said about each object, so logs speak of transitions, not repeats.
    reported: HashMap<String, String>,
    /// Objects a repair did not fix (the kernel prints the rules differently from the config):
    /// only reported from then on, so that `contains` does not append a rule every poll.
    stuck: HashSet<String>,
    /// Pids of netwarden's own recent restores.
    own: VecDeque<u32>,
    /// Forbidden members already reported per observe-mode set: reported once, not every poll.
    known_forbidden: HashMap<String, HashSet<super::model::Member>>,
    pub stats: GuardStats,
    /// Where repairs and forbidden members are counted for /metrics (none in `check`).
    telemetry: Option<Arc<Telemetry>>,
    /// The process whose nf_tables transaction is being checked (from its NEWGEN message);
    /// `None` for polls and resyncs, where nobody is known.
    actor: Option<String>,
    adoption: Adoption,
    /// Names of the parent, grandparent… of `actor`, read when its NEWGEN arrived (a CNI's
    /// `iptables` child acts for the CNI).
    ancestors: Vec<String>,
    /// Where adopted chains and sets are saved (the adopted-state file), when there is one.
    store: Option<crate::adopted_state::Writer>,
    /// Whether repairs are told as notices (Events): not while a reload puts newly configured
    /// chains and sets in place, which nobody had removed.
    announce: bool,
}

impl Guard {
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
        // Nothing to protect: no tools run, no socket.
        let reads_chains = !chains.is_empty() || adoption.adopts_chains();
        let backend = if reads_chains {
            tools::detect(choice).await
        } else {
            Backend::Nft
        };
        let events = if backend == Backend::Nft && reads_chains {
            Some(NftEvents::subscribe().map_err(GuardError::Subscribe)?)
        } else {
            None
        };
        let watched = watched_tables(&chains, &adoption);
        let mut guard = Guard {
            choice,
            backend,
            chains,
            sets,
            poll,
            resync,
            events,
            watched,
            headers: HashMap::new(),
            reported: HashMap::new(),
            stuck: HashSet::new(),
            own: VecDeque::new(),
            known_forbidden: HashMap::new(),
            stats: GuardStats::default(),
            telemetry: None,
            actor: None,
            adoption,
            ancestors: Vec::new(),
            store: None,
            announce: true,
        };
        if !guard.is_idle() {
            let started = Instant::now();
            let tables: BTreeSet<TableId> = guard.watched.keys().copied().collect();
            guard.sync_tables(&tables).await;
            guard.sync_sets(true).await;
            info!(
                chains = guard.chains.len(),
                ipsets = guard.sets.len(),
                adopted_chains = guard.adoption.chains.len(),
                adopted_ipsets = guard.adoption.sets.len(),
                backend = guard.backend.as_str(),
                events = guard.events.is_some(),
                poll_ms = guard.poll.as_millis() as u64,
                still_drifted = guard.reported.len(),
                took_us = started.elapsed().as_micros() as u64,
                "chains and sets in sync"
            );
        }
        Ok(guard)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    fn is_idle(&self) -> bool {
        self.chains.is_empty() && self.sets.is_empty() && self.adoption.selectors.is_empty()
    }

    /// Saves adopted chains and sets to the adopted-state file through `store` (shared with the
    /// rtnetlink agent, which writes the rules and routes), from now on and at once.
    pub fn with_store(mut self, store: Option<crate::adopted_state::Writer>) -> Guard {
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

    /// Runs until an unrecoverable error; with nothing to protect, never returns.
    /// Counts repairs and forbidden members in the agent's metrics.
    pub fn with_telemetry(mut self, telemetry: Arc<Telemetry>) -> Guard {
        self.telemetry = Some(telemetry);
        self.publish();
        self
    }

    /// Publishes the chains and sets, configured and adopted, on the status board (`status`,
    /// the protected-object gauges).
    fn publish(&self) {
        let Some(t) = &self.telemetry else { return };
        let mode = |m: Mode| format!("{m:?}").to_lowercase();
        let (adopted_chains, adopted_sets) = self.adoption.desired();
        let chains = self.chains.iter().chain(&adopted_chains);
        let sets = self.sets.iter().chain(&adopted_sets);
        let catalog = chains
            .map(|c| ("chain", c.name.clone(), c.key.to_string(), mode(c.mode)))
            .chain(sets.map(|s| ("ipset", s.name.clone(), s.set.clone(), mode(s.mode))))
            .collect();
        t.board().set_netfilter_catalog(catalog);
    }

    fn board_state(&self, name: &str, state: crate::obs::status::State, reason: Option<String>) {
        if let Some(t) = &self.telemetry {
            t.board().set_netfilter_state(name, state, reason);
        }
    }

    fn board_repair(&self, name: &str, actor: &str) {
        if let Some(t) = &self.telemetry {
            t.board()
                .record_netfilter_repair(name, actor, crate::obs::status::unix_now());
        }
    }

    fn count_forgotten(&self, kind: &'static str, reason: &'static str) {
        if let Some(t) = &self.telemetry {
            t.metrics
                .adopted_forgotten
                .get_or_create(&ForgetLabels { kind, reason })
                .inc();
        }
    }

    fn count_drift(&self, kind: &'static str, actor: &str, n: usize) {
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

    /// Tells the cluster (Kubernetes mode: an Event on the Node, aggregated there).
    fn tell(&self, n: Notice) {
        if let (Some(t), true) = (&self.telemetry, self.announce) {
            t.notice(n);
        }
    }

    fn count_repairs(&self, kind: &'static str, result: &'static str, n: usize) {
        if let Some(t) = &self.telemetry {
            t.metrics
                .repairs
                .get_or_create(&RepairLabels { kind, result })
                .inc_by(n as u64);
        }
    }

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
        let mut dirty: BTreeSet<TableId> = BTreeSet::new();
        loop {
            tokio::select! {
                Some(r) = next_reload(&mut reloads) => {
                    self.reload(r).await?;
                    all = self.watched.keys().copied().collect();
                    dirty.clear();
                    poll = timer(self.poll);
                    resync = timer(self.resync);
                }
                batch = next_events(&mut self.events) => {
                    let batch = batch.map_err(GuardError::Events)?;
                    for ev in batch {
                        match ev {
                            NftEvent::Touch { family, table, chain, removed } => {
                                let Some(table) = Table::parse(&table) else { continue };
                                let id = TableId { family, table };
                                let Some(watched) = self.watched.get(&id) else { continue };
                                let adopted = |c: &String| self.adoption.covers(&ChainKey { family, table: id.table, chain: c.clone() });
                                if chain.as_ref().is_none_or(|c| watched.contains(c) || adopted(c)) {
                                    debug!(table = %id, chain = ?chain, removed, "nf_tables change");
                                    dirty.insert(id);
                                }
                            }
                            NftEvent::NewGen { pid, process } => {
                                if dirty.is_empty() {
                                    continue;
                                }
                                if pid.is_some_and(|p| self.own.contains(&p)) {
                                    // Our own restore: already verified after applying it.
                                    dirty.clear();
                                    continue;
                                }
                                debug!(pid = ?pid, process = ?process, "transaction touched protected chains");
                                // NEWGEN names the process that committed the transaction: the
                                // actor of what the re-read finds drifted.
                                self.actor = Some(process.unwrap_or_else(|| "unknown".into()));
                                // Read now, before the tools run: the process is about to exit
                                // (its parent can still be read while it is a zombie).
                                if let (Some(pid), true) = (pid, self.adoption.adopts_chains()) {
                                    self.ancestors = ancestors(pid);
                                }
                                let tables = std::mem::take(&mut dirty);
                                self.sync_tables(&tables).await;
                                self.actor = None;
                                self.ancestors.clear();
                            }
                            NftEvent::Overrun => {
                                warn!("nf_tables notifications were lost (socket overrun); re-reading the protected tables");
                                dirty.clear();
                                self.sync_tables(&all).await;
                            }
                        }
                    }
                }
                _ = poll.tick() => {
                    if self.events.is_none() {
                        self.sync_tables(&all).await;
                    }
                    self.sync_sets(false).await;
                }
                _ = resync.tick() => {
                    self.sync_tables(&all).await;
                    self.sync_sets(true).await;
                }
            }
        }
    }

    /// New chains and sets: protect these from now on. What is no longer listed stops being
    /// protected and is left as it is in the kernel.
    ///
    /// New adopt selectors: chains and sets they no longer cover are forgotten (left in the
    /// kernel as they are) and the ones they newly cover are adopted, both by the table and set
    /// reads below.
    async fn reload(&mut self, r: GuardReload) -> Result<(), GuardError> {
        let selectors = Adoption::netfilter_selectors(&r.adopt);
        let read_chains = !self.chains.is_empty() || self.adoption.adopts_chains();
        let will_read_chains = !r.chains.is_empty()
            || !self.adoption.chains.is_empty()
            || selectors.iter().any(|s| s.chains.is_some());
        if will_read_chains && !read_chains && self.events.is_none() {
            // Started with no chains: no backend was detected and no socket opened.
            self.backend = tools::detect(self.choice).await;
            if self.backend == Backend::Nft {
                self.events = Some(NftEvents::subscribe().map_err(GuardError::Subscribe)?);
            }
        }
        if selectors != self.adoption.selectors {
            info!(
                selectors = %selectors.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(","),
                "chain and set adopt selectors reloaded"
            );
            self.adoption.selectors = selectors;
        }
        self.chains = r.chains;
        self.sets = r.sets;
        self.poll = r.poll;
        self.resync = r.resync;
        self.watched = watched_tables(&self.chains, &self.adoption);
        let names: HashSet<String> = self
            .chains
            .iter()
            .map(|c| c.name.clone())
            .chain(self.sets.iter().map(|s| s.name.clone()))
            .collect();
        self.reported.retain(|n, _| names.contains(n));
        self.stuck.retain(|n| names.contains(n));
        self.known_forbidden.retain(|n, _| names.contains(n));
        // Members may have changed with the same set text: plan every set again.
        self.headers.clear();
        let tables: BTreeSet<TableId> = self.watched.keys().copied().collect();
        self.announce = false;
        self.sync_tables(&tables).await;
        self.sync_sets(true).await;
        self.publish();
        self.announce = true;
        info!(
            chains = self.chains.len(),
            ipsets = self.sets.len(),
            "chains and sets reloaded"
        );
        Ok(())
    }

    /// Reads, plans and repairs the given tables. Each repair is verified by reading again; a
    /// table still drifting is repaired again (someone may be removing things concurrently, as
    /// `iptables -D …; iptables -F …; iptables -X …` does in three transactions). When the same
    /// drift survives [`MAX_ATTEMPTS`] restores in a row the chains still drifting are only
    /// reported; a drift that keeps changing (a fight) is repaired up to [`MAX_ROUNDS`] times.
    async fn sync_tables(&mut self, tables: &BTreeSet<TableId>) {
        for &id in tables {
            let mut attempt = 0;
            let mut rounds = 0;
            let mut last: Option<Vec<ChainDrift>> = None;
            loop {
                let started = Instant::now();
                let Some(observed) = self.read_table(id).await else {
                    break;
                };
                self.judge_chains(id, observed.as_ref());
                let desired = self.desired_chains(id);
                let refs: Vec<&DesiredChain> = desired.iter().collect();
                let (drifts, repair) = plan::plan_table(&refs, observed.as_ref());
                if repair.is_empty() {
                    self.report_chains(id, &drifts);
                    break;
                }
                // Only the very drift a restore just fixed, seen again, counts toward giving up
                // (a rule iptables-save prints otherwise). Another drift is someone else removing
                // rules meanwhile: a fight, which must never turn the chain to report-only.
                if last.as_ref() != Some(&drifts) {
                    attempt = 0;
                }
                if attempt == MAX_ATTEMPTS {
                    self.give_up(&drifts, observed.as_ref());
                    self.report_chains(id, &drifts);
                    break;
                }
                // Bounded under a fight; the fighter's next change brings us back here.
                rounds += 1;
                if rounds > MAX_ROUNDS {
                    let actor = self.actor.clone().unwrap_or_else(|| "unknown".into());
                    for d in drifts.iter().filter(|d| d.mode == Mode::Enforce) {
                        warn!(kind = "chain", name = %d.name, actor = %actor, "contested: changed again right after each repair; left until the next change");
                        self.tell(Notice::Contested {
                            kind: "chain",
                            name: d.name.clone(),
                            actor: actor.clone(),
                        });
                    }
                    self.report_chains(id, &drifts);
                    break;
                }
                attempt += 1;
                last = Some(drifts.clone());
                let input = render::iptables_restore(id.table, &repair);
                debug!(table = %id, input = %input, attempt, "restoring");
                match tools::restore(self.backend, id.family, &input).await {
                    Ok(pid) => {
                        if let Some(pid) = pid {
                            self.own.push_back(pid);
                            if self.own.len() > 16 {
                                self.own.pop_front();
                            }
                        }
                        let names: Vec<&str> = drifts
                            .iter()
                            .filter(|d| d.mode == Mode::Enforce)
                            .map(|d| d.name.as_str())
                            .collect();
                        self.stats.chain_repairs += names.len() as u64;
                        self.count_repairs("chain", "applied", names.len());
                        let actor = self.actor.as_deref().unwrap_or("unknown");
                        for n in &names {
                            self.board_repair(n, actor);
                        }
                        if attempt == 1 && !names.is_empty() {
                            self.count_drift("chain", actor, names.len());
                            // Once per drift, like the metric: a re-apply of the same drift
                            // is not another chain restored.
                            self.tell(Notice::Restored {
                                counts: vec![("chain", names.len() as u64)],
                                actor: actor.to_owned(),
                            });
                        }
                        info!(
                            kind = "chain",
                            table = %id,
                            actor,
                            names = %names.join(","),
                            what = %drifts.iter().flat_map(|d| d.findings.iter().map(ToString::to_string)).collect::<Vec<_>>().join("; "),
                            took_us = started.elapsed().as_micros() as u64,
                            attempt,
                            "restored"
                        );
                    }
                    Err(e) => {
                        self.stats.repair_failures += 1;
                        self.count_repairs("chain", "failed", drifts.len());
                        error!(kind = "chain", table = %id, error = %e, "repair failed");
                        for d in drifts.iter().filter(|d| d.mode == Mode::Enforce) {
                            self.board_state(&d.name, State::Drifted, Some(e.to_string()));
                        }
                        self.report_chains(id, &drifts);
                        break;
                    }
                }
            }
        }
    }

    /// Repairs were applied and the chains still drift: most likely a rule written otherwise
    /// than iptables-save prints it, which no number of re-applies fixes.
    fn give_up(&mut self, drifts: &[ChainDrift], observed: Option<&super::parse::SavedTable>) {
        for d in drifts.iter().filter(|d| d.mode == Mode::Enforce) {
            let chain = observed.and_then(|t| {
                t.chains
                    .get(d.object.rsplit(' ').next().unwrap_or_default())
            });
            let printed: Vec<String> = chain
                .map(|c| c.rules.iter().map(|r| format!("`{r}`")).collect())
                .unwrap_or_default();
            error!(
                kind = "chain",
                name = %d.name,
                object = %d.object,
                drift = %d.findings.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
                printed = %printed.join(", "),
                "repair did not take after {MAX_ATTEMPTS} attempts: iptables-save probably prints these rules differently from the config; write them exactly as iptables-save prints them (`netwarden snapshot` does). Only reporting this chain from now on"
            );
            self.board_state(&d.name, State::Drifted, Some("repair does not take".into()));
            self.stuck.insert(d.name.clone());
        }
    }

    async fn read_table(&mut self, id: TableId) -> Option<Option<super::parse::SavedTable>> {
        self.stats.table_reads += 1;
        match tools::save_table(self.backend, id).await {
            Ok(t) => Some(t),
            Err(e) => {
                error!(table = %id, error = %e, "cannot read the table");
                None
            }
        }
    }

    /// Adoption's view of a fresh read of table `id`: new chains adopted, owners' changes
    /// followed, chains their owner removed forgotten; the chains to restore keep their copy.
    fn judge_chains(&mut self, id: TableId, observed: Option<&super::parse::SavedTable>) {
        if !self.adoption.adopts_chains() {
            return;
        }
        let actor_name = self.actor.clone();
        let actor = match actor_name.as_deref() {
            None | Some("unknown") => Actor::Unknown,
            Some(p) => Actor::Process(p),
        };
        let configured: HashSet<&ChainKey> = self.chains.iter().map(|c| &c.key).collect();
        // Selectors of this table's adopted chains, for the log of those forgotten.
        let before: HashMap<ChainKey, String> = self
            .adoption
            .chains
            .iter()
            .filter(|(k, _)| k.table_id() == id)
            .map(|(k, c)| (k.clone(), c.selector.clone()))
            .collect();
        let outcomes = adopted::judge_table(
            &self.adoption.selectors,
            &mut self.adoption.chains,
            id,
            observed,
            actor,
            &self.ancestors,
            &|k| configured.contains(k),
        );
        let actor = actor_name.as_deref().unwrap_or("unknown");
        for (key, outcome) in &outcomes {
            let copy = self.adoption.chains.get(key);
            let selector = copy
                .map(|c| c.selector.as_str())
                .or_else(|| before.get(key).map(String::as_str))
                .unwrap_or("-");
            let rules = copy.map_or(0, |c| c.rules.len());
            match outcome {
                Outcome::Restore => {
                    debug!(kind = "chain", selector = %selector, object = %key, actor = %actor, "adopted chain removed or emptied by someone else: drift")
                }
                Outcome::Forgotten if !self.adoption.covers(key) || configured.contains(key) => {
                    info!(kind = "chain", selector = %selector, object = %key, "no adopt selector covers the chain any more (or spec.chains protects it now): forgotten as adopted, left as it is")
                }
                Outcome::Forgotten => {
                    info!(kind = "chain", selector = %selector, object = %key, actor = %actor, ancestors = %self.ancestors.join(","), "adopted chain removed by an owner (or, under unknownActor: forget, by nobody known): forgotten");
                    // A named actor that makes a selector forget is an owner (or acts for one).
                    let reason = if actor == "unknown" {
                        "unknown_actor"
                    } else {
                        "owner"
                    };
                    self.count_forgotten("chain", reason);
                }
                Outcome::Adopted => {
                    info!(kind = "chain", selector = %selector, object = %key, rules, "adopted")
                }
                Outcome::Updated => {
                    debug!(kind = "chain", selector = %selector, object = %key, actor, rules, "adopted chain changed: copy updated")
                }
            }
        }
        if outcomes.iter().any(|(_, o)| *o != Outcome::Restore) {
            self.save_adopted();
            self.publish();
        }
    }

    /// The protected chains of a table (configured and adopted), stuck ones demoted to observe.
    fn desired_chains(&self, id: TableId) -> Vec<DesiredChain> {
        let adopted = self
            .adoption
            .chains
            .values()
            .filter(|c| c.key.table_id() == id)
            .map(|c| c.desired(self.adoption.mode(&c.selector)));
        self.chains
            .iter()
            .filter(|c| c.key.table_id() == id)
            .cloned()
            .chain(adopted)
            .map(|mut c| {
                if self.stuck.contains(&c.name) {
                    c.mode = Mode::Observe;
                }
                c
            })
            .collect()
    }

    fn report_chains(&mut self, id: TableId, drifts: &[ChainDrift]) {
        let mut seen = HashSet::new();
        for d in drifts {
            seen.insert(d.name.clone());
            if d.mode == Mode::Enforce {
                continue;
            }
            let text = d
                .findings
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            if self.reported.get(&d.name) != Some(&text) {
                warn!(kind = "chain", name = %d.name, object = %d.object, mode = "observe", drift = %text, "drift");
                if !self.stuck.contains(&d.name) {
                    self.board_state(&d.name, State::ObserveOnly, Some(text.clone()));
                }
                self.reported.insert(d.name.clone(), text);
            }
        }
        for c in self.desired_chains(id) {
            if !seen.contains(&c.name) && self.reported.remove(&c.name).is_some() {
                info!(kind = "chain", name = %c.name, "back in sync");
                self.board_state(&c.name, State::InSync, None);
            }
        }
    }

    /// Adopted sets: every set whose name a selector matches is read (`ipset list -n`, then
    /// `ipset save NAME`, skipped when the text did not change), adopted or followed as seen;
    /// a destroyed one is recreated as last seen or forgotten, as the unknown-actor policy says
    /// (ipset names no actor).
    async fn sync_adopted_sets(&mut self, full: bool) {
        if !self.adoption.adopts_sets() {
            return;
        }
        let names = match tools::ipset_names().await {
            Ok(n) => n,
            Err(e) => {
                error!(error = %e, "cannot list the sets");
                return;
            }
        };
        let configured: HashSet<String> = self.sets.iter().map(|s| s.set.clone()).collect();
        let candidates: BTreeSet<String> = names
            .iter()
            .filter(|n| {
                !configured.contains(n.as_str())
                    && crate::adopt::select_set(&self.adoption.selectors, n).is_some()
            })
            .cloned()
            .chain(self.adoption.sets.keys().cloned())
            .collect();
        let mut changed = false;
        for name in candidates {
            let copy = self.adoption.sets.get(&name);
            let sel = match copy {
                Some(c) => self.adoption.selectors.iter().find(|s| {
                    s.name == c.selector && s.ipsets.as_ref().is_some_and(|i| i.matches(&name))
                }),
                None => crate::adopt::select_set(&self.adoption.selectors, &name),
            };
            let Some(sel) = sel.filter(|_| !configured.contains(&name)).cloned() else {
                // No selector covers it any more: no longer protected.
                if self.adoption.sets.remove(&name).is_some() {
                    info!(kind = "ipset", set = %name, "no adopt selector covers the set any more: forgotten, left as it is");
                }
                changed = true;
                continue;
            };
            let (text, digest) = if names.contains(&name) {
                self.stats.set_reads += 1;
                match tools::ipset_save_text(&name).await {
                    Ok(t) => {
                        let d = t.as_deref().map(digest);
                        (t, d)
                    }
                    Err(e) => {
                        error!(set = %name, error = %e, "cannot read the set");
                        continue;
                    }
                }
            } else {
                (None, None)
            };
            let key = format!("{}{name}", crate::adopt::ADOPTED_PREFIX);
            if !full && digest.is_some() && digest == self.headers.get(&key).copied() {
                continue;
            }
            let seen = match text
                .as_deref()
                .map(|t| tools::parse_set(&name, t))
                .transpose()
            {
                Ok(s) => s.flatten(),
                Err(e) => {
                    error!(set = %name, error = %e, "cannot read the set");
                    continue;
                }
            };
            if let Some(why) = seen
                .as_ref()
                .and_then(|s| adopted::set_unadoptable(&name, s))
            {
                if copy.is_none() && self.reported.get(&key) != Some(&why) {
                    warn!(kind = "ipset", selector = %sel.name, set = %name, reason = %why, "not adopted");
                    self.reported.insert(key.clone(), why);
                }
            }
            let options = text
                .as_deref()
                .map(|t| adopted::create_options(t, &name))
                .unwrap_or_default();
            let (now, outcome) = adopted::judge_set(
                &sel,
                self.adoption.sets.get(&name),
                &name,
                seen.as_ref().map(|s| (s, options)),
            );
            match &now {
                Some(n) => {
                    self.adoption.sets.insert(name.clone(), n.clone());
                }
                None => {
                    self.adoption.sets.remove(&name);
                }
            }
            match digest {
                Some(d) => self.headers.insert(key.clone(), d),
                None => self.headers.remove(&key),
            };
            let Some(outcome) = outcome else { continue };
            let members = now.as_ref().map_or(0, |n| n.members.len());
            match outcome {
                Outcome::Adopted => {
                    info!(kind = "ipset", selector = %sel.name, set = %name, members, "adopted")
                }
                Outcome::Updated => {
                    debug!(kind = "ipset", selector = %sel.name, set = %name, members, "adopted set changed: copy updated")
                }
                Outcome::Forgotten if seen.is_none() => {
                    info!(kind = "ipset", selector = %sel.name, set = %name, "adopted set destroyed (ipset names no actor; unknownActor: forget): forgotten");
                    self.count_forgotten("ipset", "unknown_actor");
                }
                Outcome::Forgotten => {
                    info!(kind = "ipset", selector = %sel.name, set = %name, "adopted set changed into one that cannot be restored: forgotten")
                }
                Outcome::Restore => {
                    let Some(set) = now else { continue };
                    self.restore_adopted_set(&sel, &set).await;
                    continue;
                }
            }
            changed = true;
        }
        if changed {
            self.save_adopted();
            self.publish();
        }
    }

    async fn restore_adopted_set(&mut self, sel: &AdoptSelector, set: &AdoptedSet) {
        let name = adopted::set_name(&sel.name, &set.name);
        if sel.mode != Mode::Enforce {
            if self.reported.get(&name).map(String::as_str) != Some("set missing") {
                warn!(kind = "ipset", name = %name, set = %set.name, mode = "observe", drift = "set missing", "drift");
                self.board_state(&name, State::ObserveOnly, Some("set missing".into()));
                self.reported.insert(name, "set missing".into());
            }
            return;
        }
        let started = Instant::now();
        match tools::ipset_restore(&adopted::restore_set(set)).await {
            Ok(()) => {
                self.stats.set_repairs += 1;
                self.count_repairs("ipset", "applied", 1);
                self.reported.remove(&name);
                self.board_repair(&name, "unknown");
                info!(kind = "ipset", name = %name, set = %set.name, actor = "unknown", members = set.members.len(), what = "set missing", took_us = started.elapsed().as_micros() as u64, "restored");
            }
            Err(e) => {
                self.stats.repair_failures += 1;
                self.count_repairs("ipset", "failed", 1);
                error!(kind = "ipset", name = %name, error = %e, "repair failed");
            }
        }
    }

    /// Checks the protected sets. Each set is read with `ipset save NAME` (no header-only
    /// shortcut: swapping one member for another leaves `ipset list -t` unchanged); when the
    /// text is byte-for-byte what it was at the last in-sync read, nothing is parsed or
    /// planned, which keeps a quiet 10,000-member set cheap. `full` re-plans regardless.
    async fn sync_sets(&mut self, full: bool) {
        self.sync_adopted_sets(full).await;
        if self.sets.is_empty() {
            return;
        }
        let started = Instant::now();
        let mut drifts: Vec<SetDrift> = Vec::new();
        let mut repairs = Vec::new();
        let sets = self.sets.clone();
        for d in &sets {
            self.stats.set_reads += 1;
            let text = match tools::ipset_save_text(&d.set).await {
                Ok(t) => t,
                Err(e) => {
                    error!(set = %d.set, error = %e, "cannot read the set");
                    continue;
                }
            };
            let digest = text.as_deref().map(digest);
            if !full && digest.is_some() && digest == self.headers.get(&d.set).copied() {
                continue;
            }
            let observed = match text
                .as_deref()
                .map(|t| tools::parse_set(&d.set, t))
                .transpose()
            {
                Ok(o) => o.flatten(),
                Err(e) => {
                    error!(set = %d.set, error = %e, "cannot read the set");
                    continue;
                }
            };
            let (drift, repair) = plan::plan_set(d, observed.as_ref());
            match drift {
                None => {
                    self.known_forbidden.remove(&d.name);
                    if let Some(h) = digest {
                        self.headers.insert(d.set.clone(), h);
                    }
                    if self.reported.remove(&d.name).is_some() {
                        info!(kind = "ipset", name = %d.name, "back in sync");
                        self.board_state(&d.name, State::InSync, None);
                    }
                }
                Some(drift) => {
                    self.headers.remove(&d.set);
                    drifts.push(drift);
                }
            }
            repairs.extend(repair);
        }
        let applied = if repairs.is_empty() {
            true
        } else {
            let input = render::ipset_restore(&repairs);
            match tools::ipset_restore(&input).await {
                Ok(()) => true,
                Err(e) => {
                    self.stats.repair_failures += 1;
                    self.count_repairs("ipset", "failed", repairs.len());
                    error!(kind = "ipset", error = %e, "repair failed");
                    false
                }
            }
        };
        let took = started.elapsed();
        for d in &drifts {
            let text = d
                .findings
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            let mut forbidden = d.forbidden().to_vec();
            if d.mode == Mode::Observe {
                // Still there since the last poll: already reported and counted.
                let known = self.known_forbidden.entry(d.name.clone()).or_default();
                let now: HashSet<_> = forbidden.iter().copied().collect();
                forbidden.retain(|m| !known.contains(m));
                *known = now;
            }
            if !forbidden.is_empty() {
                self.stats.forbidden_members += forbidden.len() as u64;
                let removed = d.mode == Mode::Enforce && applied;
                if removed {
                    self.stats.forbidden_removed += forbidden.len() as u64;
                    self.tell(Notice::ForbiddenRemoved {
                        set: d.object.clone(),
                        members: forbidden.iter().map(ToString::to_string).collect(),
                    });
                }
                if let Some(t) = &self.telemetry {
                    let result = if removed { "removed" } else { "reported" };
                    t.metrics
                        .forbidden_members
                        .get_or_create(&ForbiddenLabels { result })
                        .inc_by(forbidden.len() as u64);
                }
                for m in &forbidden {
                    warn!(
                        kind = "ipset",
                        name = %d.name,
                        set = %d.object,
                        member = %m,
                        action = if removed { "removed" } else { "reported" },
                        mode = if d.mode == Mode::Enforce { "enforce" } else { "observe" },
                        forbidden_total = self.stats.forbidden_members,
                        "forbidden member in protected set"
                    );
                }
            }
            if d.mode == Mode::Enforce && applied {
                self.stats.set_repairs += 1;
                self.count_repairs("ipset", "applied", 1);
                // Forbidden members alone are told as such, not as a set restored.
                if d.findings
                    .iter()
                    .any(|f| !matches!(f, SetFinding::Forbidden { .. }))
                {
                    // Sets are polled: who changed one is not known.
                    self.tell(Notice::Restored {
                        counts: vec![("ipset", 1)],
                        actor: "unknown".to_owned(),
                    });
                }
                info!(kind = "ipset", name = %d.name, set = %d.object, what = %text, took_us = took.as_micros() as u64, "restored");
                self.board_repair(&d.name, "unknown");
            } else if self.reported.get(&d.name) != Some(&text) {
                warn!(kind = "ipset", name = %d.name, set = %d.object, mode = "observe", drift = %text, "drift");
                let state = if d.mode == Mode::Observe {
                    State::ObserveOnly
                } else {
                    State::Drifted
                };
                self.board_state(&d.name, state, Some(text.clone()));
                self.reported.insert(d.name.clone(), text);
            }
        }
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
        w.extend(c.jumps.iter().map(|j| j.chain.clone()));
    }
    watched
}

/// Names of the parent, grandparent… of a process (at most four, init excluded), from /proc.
/// Empty when the process is already gone.
fn ancestors(pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    let mut pid = pid;
    for _ in 0..4 {
        let Some(parent) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| adopted::parent_pid(&s))
        else {
            break;
        };
        if parent <= 1 {
            break;
        }
        let Ok(comm) = std::fs::read_to_string(format!("/proc/{parent}/comm")) else {
            break;
        };
        out.push(comm.trim_end().to_owned());
        pid = parent;
    }
    out
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

/// Reads every protected chain and set once, changing nothing (`netwarden check`).
pub async fn check(
    chains: &[DesiredChain],
    sets: &[DesiredSet],
    choice: BackendChoice,
) -> Result<(Vec<ChainDrift>, Vec<SetDrift>), ToolError> {
    let mut chain_drifts = Vec::new();
    if !chains.is_empty() {
        let backend = tools::detect(choice).await;
        for (id, desired) in plan::by_table(chains) {
            let observed = tools::save_table(backend, id).await?;
            chain_drifts.extend(plan::plan_table(&desired, observed.as_ref()).0);
        }
    }
    let mut set_drifts = Vec::new();
    for d in sets {
        let observed = tools::ipset_save(&d.set).await?;
        set_drifts.extend(plan::plan_set(d, observed.as_ref()).0);
    }
    Ok((chain_drifts, set_drifts))
}

fn digest(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}
