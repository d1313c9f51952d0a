//! The task that keeps protected nftables tables in place, beside the rtnetlink agent and the
//! iptables guard.
//!
//! A notification touching a protected table marks it; the NEWGEN message that ends the
//! transaction makes the engine put back at once the tables deleted whole that have an image
//! ([`replaying`]), then read every marked table (one known to be deleted is not read), plan,
//! and repair the rest in one `nft -f` transaction, then read them back to verify.
//! Transactions of its own `nft` are recognised by pid. A table changed again right after each
//! repair is contested: its repairs back off ([`crate::telemetry::contest`]) and are never given up.

mod adoption;
mod replaying;
mod report;
mod verify;

use super::adopt;
use super::events::{Event, Events};
use super::listing::{self, ObservedTable};
use super::model::{DesiredTable, NftConfig, TableKey};
use super::plan::{self, Aliases, Repair, TableDrift};
use super::render;
use super::runner::{self, Nft, NftError};
use super::watch::{Touched, Watch};
use crate::model::Mode;
use crate::telemetry::contest::{Backoff, Contest, Decision};
use crate::telemetry::status::{State, NFTABLES_KIND};
use crate::telemetry::Telemetry;
use futures::FutureExt;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

#[derive(Debug, Error)]
pub enum EngineError {
    #[error("cannot subscribe to nf_tables notifications: {0}")]
    Subscribe(#[source] std::io::Error),
    #[error("nf_tables notification socket failed: {0}")]
    Events(#[source] std::io::Error),
}

/// Counters (also exported as metrics).
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub reads: u64,
    pub transactions: u64,
    pub repairs: u64,
    pub failures: u64,
    pub forbidden: u64,
    /// Tables put back from their image (see [`replaying`]).
    pub replays: u64,
}

/// Why tables are being synced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Why {
    Start,
    Events,
    Retry,
    Resync,
}

/// A table planned in one sync.
struct Planned {
    key: TableKey,
    name: String,
    drift: TableDrift,
    repair: Option<Repair>,
    actor: String,
}

pub struct Engine<N: Nft> {
    nft: N,
    tables: Vec<DesiredTable>,
    /// `spec.adopt[].nftables` selectors, and the tables adopted through them (as last seen;
    /// shared with the adopted-state writer, which saves them without a copy).
    selectors: Vec<adopt::Selector>,
    adopted: BTreeMap<TableKey, Arc<DesiredTable>>,
    /// Adopted tables whose copy comes from the adopted-state file and has not been compared
    /// with the kernel yet (see [`Engine::judge_adopted`]).
    from_file: HashSet<TableKey>,
    /// Where the adopted tables are saved (the adopted-state file), when there is one.
    store: Option<crate::adopted_state::Writer>,
    /// Names of the parent, grandparent… of the processes of recent transactions, read when
    /// their NEWGEN arrived (only while something is adopted: kube-proxy's `nft` acts for it).
    ancestors: HashMap<u32, Vec<String>>,
    events: Option<Events>,
    watch: Watch,
    /// Printed forms of the config's rules, learned from nft's echo, per table.
    aliases: HashMap<TableKey, Aliases>,
    /// Tables whose repair did not take: only reported from then on.
    stuck: HashSet<String>,
    /// What was last said about each table, so logs speak of transitions.
    reported: HashMap<String, String>,
    /// Pids of netwarden's own recent `nft` processes.
    own: VecDeque<u32>,
    contest: Contest<String>,
    /// Images of protected tables, to put a deleted one back at once.
    images: replaying::Images,
    /// This engine's number with the responder ([`crate::nftables::armed::new_owner`]).
    owner: u64,
    resync: Duration,
    pub stats: Stats,
    telemetry: Option<Arc<Telemetry>>,
}

impl Engine<runner::NftBinary> {
    /// Subscribes to the notifications, then brings every protected table in place once; logs
    /// `nftables in sync`. With nothing to protect, opens nothing and runs nothing. `saved`:
    /// the tables the adopted-state file kept (see [`Engine::start_with`]).
    pub async fn start(
        cfg: NftConfig,
        resync: Duration,
        saved: &[adopt::SavedTable],
    ) -> Result<Self, EngineError> {
        Engine::start_with(runner::NftBinary::default(), cfg, resync, true, saved).await
    }
}

impl<N: Nft> Engine<N> {
    /// [`Engine::start`] with another `nft`; `subscribe: false` (tests) reads no notifications.
    /// The `saved` tables that a selector still covers are adopted before the first read, so
    /// that one deleted while the agent was down is judged as deleted by nobody known
    /// (`unknownActor`), as adopted iptables chains are.
    pub async fn start_with(
        nft: N,
        cfg: NftConfig,
        resync: Duration,
        subscribe: bool,
        saved: &[adopt::SavedTable],
    ) -> Result<Self, EngineError> {
        let mut nft = nft;
        let mut gen = None;
        let events = if subscribe && !(cfg.tables.is_empty() && cfg.adopt.is_empty()) {
            gen = nft.generation();
            Some(super::responder::subscribe().map_err(EngineError::Subscribe)?)
        } else {
            None
        };
        let mut watch = Watch::new(cfg.tables.iter().map(|t| t.key.clone()));
        watch.set_adopt(cfg.adopt.clone());
        let configured: HashSet<&TableKey> = cfg.tables.iter().map(|t| &t.key).collect();
        let (adopted, refused) = adopt::from_saved(&cfg.adopt, |k| configured.contains(k), saved);
        for why in refused {
            warn!(kind = NFTABLES_KIND, table = %why, "an adopted table of the adopted-state file does not read back: not restored");
        }
        let mut engine = Engine {
            nft,
            watch,
            tables: cfg.tables,
            selectors: cfg.adopt,
            from_file: adopted.keys().cloned().collect(),
            adopted: adopted.into_iter().map(|(k, t)| (k, Arc::new(t))).collect(),
            store: None,
            ancestors: HashMap::new(),
            events,
            aliases: HashMap::new(),
            stuck: HashSet::new(),
            reported: HashMap::new(),
            own: VecDeque::new(),
            contest: Contest::new(Backoff::default()),
            images: replaying::Images::at(gen),
            owner: crate::nftables::armed::new_owner(),
            resync,
            stats: Stats::default(),
            telemetry: None,
        };
        if !engine.is_idle() {
            let started = Instant::now();
            engine.sync_all(Why::Start).await;
            engine.from_file.clear();
            info!(
                tables = engine.tables.len(),
                adopted = engine.adopted.len(),
                still_drifted = engine.reported.len(),
                took_us = started.elapsed().as_micros() as u64,
                "nftables in sync"
            );
        }
        Ok(engine)
    }

    fn is_idle(&self) -> bool {
        self.tables.is_empty() && self.selectors.is_empty()
    }

    /// Saves the adopted tables to the adopted-state file through `store` (shared with the
    /// other engines, each writing its own part), now and whenever they change.
    pub fn with_store(mut self, store: Option<crate::adopted_state::Writer>) -> Self {
        self.store = store;
        self.save_adopted();
        self
    }

    /// Hands the adopted tables, as last seen, to the adopted-state writer: shared, not copied
    /// (an owner like kube-proxy changes its table at every Service change; the writer makes
    /// them into the file's form only when it writes, at most once per interval).
    fn save_adopted(&self) {
        let Some(store) = &self.store else { return };
        let tables = self
            .adopted
            .iter()
            .filter_map(|(k, t)| {
                let sel = adopt::select(&self.selectors, k)?;
                Some((sel.adopt.name.clone(), Arc::clone(t)))
            })
            .collect();
        store.save_nftables(tables);
    }

    /// Counts repairs in the agent's metrics and publishes the tables on the status board.
    pub fn with_telemetry(mut self, telemetry: Arc<Telemetry>) -> Self {
        self.telemetry = Some(telemetry);
        self.publish();
        self
    }

    fn remember_own(&mut self, pid: Option<u32>) {
        if let Some(pid) = pid {
            self.own.push_back(pid);
            if self.own.len() > 16 {
                self.own.pop_front();
            }
        }
    }

    /// Runs until the notification socket fails; with nothing to protect and no reloads, never
    /// returns.
    pub async fn run(
        mut self,
        mut reloads: Option<mpsc::Receiver<NftConfig>>,
    ) -> Result<(), EngineError> {
        let mut resync =
            tokio::time::interval_at(tokio::time::Instant::now() + self.resync, self.resync);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Everything read is judged: what may be put back at once is armed.
            self.arm_images();
            let deadline = self.contest.next_deadline();
            tokio::select! {
                Some(cfg) = next_reload(&mut reloads) => self.reload(cfg).await?,
                batch = next_events(&mut self.events) => {
                    let batch = batch.map_err(EngineError::Events)?;
                    self.fold(&batch);
                }
                _ = sleep_until(deadline) => {
                    let (due, calmed) = self.contest.poll(Instant::now());
                    for c in calmed {
                        info!(kind = NFTABLES_KIND, name = %c.id, fighter = c.fighter.as_deref().unwrap_or("unknown"), "no longer contested");
                        self.board_state(&c.id, State::InSync, None);
                    }
                    let retry = self.touched_by_name(&due);
                    if !retry.is_empty() {
                        self.sync(retry, Why::Retry).await;
                    }
                }
                _ = resync.tick() => self.sync_all(Why::Resync).await,
            }
            // Whatever any of the above read (a verification reads the notifications that
            // arrived meanwhile) is repaired now, not when the next datagram happens to come.
            self.settle().await?;
        }
    }

    /// Repairs what the notifications read so far show, until nothing is left: a verification
    /// may read further notifications (someone changed a table again right after a repair),
    /// and those are handled here rather than when the next datagram happens to arrive.
    async fn settle(&mut self) -> Result<(), EngineError> {
        loop {
            // Whatever else is queued now belongs to the same burst.
            self.drain_queued()?;
            let (touched, overrun) = self.watch.take();
            if overrun {
                warn!("nf_tables notifications were lost (socket overrun); re-reading the protected tables");
                self.sync_all(Why::Resync).await;
            } else if touched.is_empty() {
                return Ok(());
            } else {
                self.sync(touched, Why::Events).await;
            }
        }
    }

    fn fold(&mut self, batch: &[Event]) {
        // The responder's commits are the engine's own too.
        let relayers = self.events.as_ref().map_or(&[][..], Events::relayers);
        let own: Vec<u32> = self.own.iter().chain(relayers).copied().collect();
        for ev in batch {
            if let Event::NewGen { pid: Some(pid), .. } = ev {
                // Read now: the process is about to exit (a zombie's parent can still be read).
                if !self.selectors.is_empty() && !own.contains(pid) {
                    if self.ancestors.len() > 64 {
                        self.ancestors.clear();
                    }
                    self.ancestors
                        .insert(*pid, crate::telemetry::attribution::ancestors(*pid));
                }
            }
            let ended = self.watch.on_event(ev, |p| own.contains(&p));
            self.images.on_event(ev, &ended);
        }
    }

    /// Reads the datagrams already queued, without waiting.
    fn drain_queued(&mut self) -> Result<(), EngineError> {
        loop {
            let Some(events) = self.events.as_mut() else {
                return Ok(());
            };
            match events.next().now_or_never() {
                Some(Ok(batch)) => self.fold(&batch),
                Some(Err(e)) => return Err(EngineError::Events(e)),
                None => return Ok(()),
            }
        }
    }

    fn touched_by_name(&self, names: &[String]) -> BTreeMap<TableKey, Touched> {
        self.tables
            .iter()
            .filter(|t| names.contains(&t.name))
            .map(|t| {
                let fighter = self.contest.fighter(&t.name).map(str::to_owned);
                (
                    t.key.clone(),
                    Touched {
                        gone: false,
                        actor: fighter,
                        pid: None,
                    },
                )
            })
            .collect()
    }

    async fn reload(&mut self, cfg: NftConfig) -> Result<(), EngineError> {
        // The images are of tables the new config may not protect as the old one did.
        self.nft.arm(self.owner, None, Vec::new());
        if self.events.is_none() && !(cfg.tables.is_empty() && cfg.adopt.is_empty()) {
            self.images.gen = self.nft.generation();
            self.events = Some(super::responder::subscribe().map_err(EngineError::Subscribe)?);
        }
        self.tables = cfg.tables;
        self.selectors = cfg.adopt;
        // Adopted tables no selector covers any more (or that spec.nftables names now) are
        // forgotten and left as they are.
        let configured: HashSet<TableKey> = self.tables.iter().map(|t| t.key.clone()).collect();
        let selectors = &self.selectors;
        self.adopted.retain(|k, c| {
            let keep = !configured.contains(k) && adopt::select(selectors, k).is_some();
            if !keep {
                info!(kind = NFTABLES_KIND, name = %c.name, table = %k, "no adopt selector covers the table any more (or spec.nftables protects it now): forgotten, left as it is");
            }
            keep
        });
        self.save_adopted();
        let names: HashSet<String> = self
            .tables
            .iter()
            .chain(self.adopted.values().map(|t| &**t))
            .map(|t| t.name.clone())
            .collect();
        self.watch
            .set_watched(self.tables.iter().map(|t| t.key.clone()));
        self.watch.set_adopt(self.selectors.clone());
        self.reported.retain(|n, _| names.contains(n));
        self.stuck.retain(|n| names.contains(n));
        self.contest.retain(|n| names.contains(n));
        self.images.clear();
        self.publish();
        self.sync_all(Why::Start).await;
        info!(tables = self.tables.len(), "nftables reloaded");
        Ok(())
    }

    /// Every protected table, every adopted one, and (with adopt selectors) every table a
    /// selector matches now.
    async fn sync_all(&mut self, why: Why) {
        let mut keys: Vec<TableKey> = self
            .tables
            .iter()
            .map(|t| t.key.clone())
            .chain(self.adopted.keys().cloned())
            .collect();
        if !self.selectors.is_empty() {
            match self.nft.tables().await {
                Ok(live) => keys.extend(
                    live.into_iter()
                        .filter(|k| adopt::select(&self.selectors, k).is_some()),
                ),
                Err(e) => error!(kind = NFTABLES_KIND, error = %e, "cannot list the tables"),
            }
        }
        let untouched = Touched {
            gone: false,
            actor: None,
            pid: None,
        };
        let all = keys.into_iter().map(|k| (k, untouched.clone())).collect();
        self.sync(all, why).await;
    }

    /// The protected table with this key, stuck ones demoted to observe.
    fn desired(&self, key: &TableKey) -> Option<DesiredTable> {
        let mut d = self
            .tables
            .iter()
            .find(|t| &t.key == key)
            .or_else(|| self.adopted.get(key).map(|t| &**t))?
            .clone();
        if self.stuck.contains(&d.name) {
            d.mode = Mode::Observe;
        }
        Some(d)
    }

    async fn read(&mut self, key: &TableKey) -> Result<Option<ObservedTable>, String> {
        self.stats.reads += 1;
        let text = self.nft.list(key).await.map_err(|e| e.to_string())?;
        match text {
            None => Ok(None),
            Some(t) => listing::parse(&t, key)
                .map(Some)
                .map_err(|e| format!("cannot read the listing of {key}: {e}")),
        }
    }

    /// Puts back at once the deleted tables that have an image; then reads (unless known
    /// gone), plans and repairs the touched tables: every repair in one transaction, then each
    /// read back. Tables found in sync get an image if they have none.
    async fn sync(&mut self, mut touched: BTreeMap<TableKey, Touched>, why: Why) {
        let started = Instant::now();
        let mut replayed = self.replay_gone(&touched, started);
        // Perhaps put back by the responder: read, not assumed gone.
        for key in &replayed.reread {
            if let Some(t) = touched.get_mut(key) {
                t.gone = false;
            }
        }
        let (planned, mut settled) = self.plan_touched(touched, &replayed, why).await;
        let apply = self.decide(planned, &mut replayed.decided);
        if !apply.is_empty() {
            let repairs: Vec<Repair> = apply.iter().filter_map(|p| p.repair.clone()).collect();
            let transaction = render::transaction(&repairs);
            debug!(transaction = %transaction, "nft transaction");
            self.stats.transactions += 1;
            for p in &apply {
                self.images.written(&p.key);
            }
            match self.nft.apply(&transaction).await {
                Ok(applied) => {
                    self.remember_own(applied.pid);
                    self.learn(&repairs, &applied.echo);
                    let took = started.elapsed();
                    for p in &apply {
                        self.restored(p, why, took, "nft");
                    }
                    settled.extend(self.verify(&apply).await);
                }
                Err(e) => self.failed(&apply, &e),
            }
        }
        self.capture_settled(&settled);
    }

    /// Reads and plans each touched table this engine keeps. Returns the drifted tables and
    /// those in sync.
    async fn plan_touched(
        &mut self,
        touched: BTreeMap<TableKey, Touched>,
        replayed: &replaying::Replayed,
        why: Why,
    ) -> (Vec<Planned>, Vec<TableKey>) {
        let mut planned = Vec::new();
        let mut settled = Vec::new();
        for (key, t) in touched {
            let configured = self.tables.iter().any(|d| d.key == key);
            if !configured && adopt::select(&self.selectors, &key).is_none() {
                continue;
            }
            let from_image = replayed.tables.contains(&key);
            let observed = if t.gone && !from_image {
                None
            } else {
                match self.read(&key).await {
                    Ok(o) => o,
                    Err(e) => {
                        error!(kind = NFTABLES_KIND, table = %key, error = %e, "cannot read the table");
                        continue;
                    }
                }
            };
            if !configured && !self.judge_adopted(&key, &t, observed.as_ref()) {
                continue;
            }
            let Some(desired) = self.desired(&key) else {
                continue;
            };
            let aliases = self.aliases.get(&key).cloned().unwrap_or_default();
            if from_image {
                self.restored_from_image(&t, &desired, &aliases, why, replayed.took);
            }
            let (drift, repair) = plan::plan_table(&desired, observed.as_ref(), &aliases);
            let Some(drift) = drift else {
                self.in_sync(&desired.name);
                if observed.is_some_and(|o| replaying::Images::worth_one(&desired, &o)) {
                    settled.push(key);
                }
                continue;
            };
            planned.push(Planned {
                key,
                name: desired.name.clone(),
                drift,
                repair,
                actor: t.actor.unwrap_or_else(|| "unknown".into()),
            });
        }
        (planned, settled)
    }

    /// The drifted tables to repair now; the others are reported, or held back while
    /// contested. `decided`: contest decisions already taken in this sync.
    fn decide(
        &mut self,
        planned: Vec<Planned>,
        decided: &mut HashMap<String, Decision>,
    ) -> Vec<Planned> {
        let now = Instant::now();
        let mut apply = Vec::new();
        for p in planned {
            if p.repair.is_none() {
                self.report(&p.drift);
                continue;
            }
            let decision = decided
                .remove(&p.name)
                .unwrap_or_else(|| self.contest.on_drift(&p.name, now));
            match decision {
                Decision::Now { .. } => apply.push(p),
                Decision::Later {
                    newly_contested, ..
                } => self.hold(&p, newly_contested),
            }
        }
        apply
    }
}

async fn next_reload(r: &mut Option<mpsc::Receiver<NftConfig>>) -> Option<NftConfig> {
    match r {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

async fn next_events(events: &mut Option<Events>) -> std::io::Result<Vec<Event>> {
    match events {
        Some(e) => e.next().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Reads every protected table once, changing nothing (`netwarden check`).
pub async fn check(tables: &[DesiredTable]) -> Result<Vec<TableDrift>, NftError> {
    let mut nft = runner::NftBinary::default();
    let mut out = Vec::new();
    for t in tables {
        let observed = match nft.list(&t.key).await? {
            Some(text) => Some(listing::parse(&text, &t.key).map_err(|e| NftError::Failed {
                args: format!("-a -s list table {}", t.key),
                status: "0".into(),
                stderr: format!("cannot read the listing: {e}"),
            })?),
            None => None,
        };
        out.extend(plan::plan_table(t, observed.as_ref(), &Aliases::new()).0);
    }
    Ok(out)
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
