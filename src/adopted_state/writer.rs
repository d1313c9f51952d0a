//! The thread that writes the adopted-state file. The engines hand their parts over without
//! waiting for a disk and without copying much (the nftables engine's tables are shared, not
//! cloned); the thread writes them as [`super::schedule`] says: at most once per interval while
//! changes keep coming, the newest state at the end of it. [`Writer::flush`] (the agent's stop)
//! writes what is pending at once.

use super::schedule::{Next, Schedule, INTERVAL};
use super::{read, AdoptedState, VERSION};
use crate::netfilter::adopted::{SavedAdoptedSet, SavedChain};
use crate::nftables::adopt::SavedTable;
use crate::nftables::model::DesiredTable;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The adopted nftables tables as the engine holds them, each with the selector that adopted
/// it: shared with the engine (a copy would cost a busy owner's every change a deep clone of
/// tables of thousands of elements), made into [`SavedTable`]s only when written.
pub type SharedTables = Vec<(String, Arc<DesiredTable>)>;

/// What has been handed over and not yet taken by a write, per part of the file: the rtnetlink
/// agent owns the rules, routes, neighbour and FDB entries, the netfilter guard the chains and
/// sets, the nftables engine the tables.
#[derive(Default)]
struct Pending {
    core: Option<AdoptedState>,
    netfilter: Option<(Vec<SavedChain>, Vec<SavedAdoptedSet>)>,
    nftables: Option<SharedTables>,
}

struct Slot {
    pending: Pending,
    schedule: Schedule,
    /// Hand-overs so far, how many of them the last finished write covered, and whether it
    /// reached the disk.
    handed: u64,
    written: u64,
    ok: bool,
    /// Flushes waiting: what is pending is written at once.
    flushing: usize,
    /// Every [`Writer`] is gone: write what is pending, then end.
    closed: bool,
}

struct Shared {
    slot: Mutex<Slot>,
    /// A hand-over, a flush or the close, for the thread.
    wake: Condvar,
    /// A write finished, for [`Writer::flush`].
    wrote: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        // The thread never panics holding the lock; a poisoned one still holds a usable slot.
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Closes the slot when the last [`Writer`] goes.
struct Open(Arc<Shared>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.wake.notify_all();
    }
}

/// Hands the engines' parts of the file to its thread. Shared (cloned) by the rtnetlink agent,
/// the guard and the nftables engine: each replaces its own part, the file holds all of them.
#[derive(Clone)]
pub struct Writer {
    shared: Arc<Shared>,
    _open: Arc<Open>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Writer")
    }
}

impl Writer {
    pub fn spawn(path: PathBuf) -> std::io::Result<Writer> {
        Writer::spawn_every(path, INTERVAL)
    }

    /// [`Writer::spawn`] writing at most once per `interval`.
    pub fn spawn_every(path: PathBuf, interval: Duration) -> std::io::Result<Writer> {
        let shared = Arc::new(Shared {
            slot: Mutex::new(Slot {
                pending: Pending::default(),
                schedule: Schedule::new(interval),
                handed: 0,
                written: 0,
                ok: true,
                flushing: 0,
                closed: false,
            }),
            wake: Condvar::new(),
            wrote: Condvar::new(),
        });
        // The part nobody has handed over yet stays what the file holds.
        let mut state = read(&path).unwrap_or_default();
        state.version = VERSION;
        let thread = shared.clone();
        std::thread::Builder::new()
            .name("nw-adopted-state".into())
            .spawn(move || run(&thread, &path, state))?;
        Ok(Writer {
            _open: Arc::new(Open(shared.clone())),
            shared,
        })
    }

    fn hand_over(&self, put: impl FnOnce(&mut Pending)) {
        let mut slot = self.shared.lock();
        put(&mut slot.pending);
        slot.handed += 1;
        slot.schedule.changed();
        drop(slot);
        self.shared.wake.notify_all();
    }

    /// Saves the rules, routes, neighbour and FDB entries of `state` (its chains and sets are
    /// the guard's, its tables the nftables engine's).
    pub fn save(&self, state: AdoptedState) {
        self.hand_over(|p| p.core = Some(state));
    }

    /// Saves the adopted chains and sets.
    pub fn save_netfilter(&self, chains: Vec<SavedChain>, ipsets: Vec<SavedAdoptedSet>) {
        self.hand_over(|p| p.netfilter = Some((chains, ipsets)));
    }

    /// Saves the adopted nftables tables.
    pub fn save_nftables(&self, tables: SharedTables) {
        self.hand_over(|p| p.nftables = Some(tables));
    }

    /// Writes everything handed over so far at once and waits (at most `within`) until it is
    /// written or its write failed (logged; tried again an interval later). True when it was
    /// written.
    pub fn flush(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut slot = self.shared.lock();
        let target = slot.handed;
        slot.flushing += 1;
        self.shared.wake.notify_all();
        while slot.written < target {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            slot = self
                .shared
                .wrote
                .wait_timeout(slot, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        slot.flushing -= 1;
        slot.written >= target && slot.ok
    }
}

/// The thread: waits for what the schedule says, writes, until every [`Writer`] is gone (what
/// is pending then is written first).
fn run(shared: &Shared, path: &std::path::Path, mut state: AdoptedState) {
    let mut failing = false;
    let mut slot = shared.lock();
    loop {
        let now = Instant::now();
        let hurry = slot.flushing > 0 || slot.closed;
        match slot.schedule.next(now, hurry) {
            Next::Idle if slot.closed => return,
            Next::Idle => slot = shared.wake.wait(slot).unwrap_or_else(|e| e.into_inner()),
            Next::At(due) => {
                let wait = due.saturating_duration_since(now);
                slot = shared
                    .wake
                    .wait_timeout(slot, wait)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            Next::Now => {
                let pending = std::mem::take(&mut slot.pending);
                let upto = slot.handed;
                slot.schedule.writing(now);
                drop(slot);
                take(&mut state, pending);
                let ok = write(path, &state, &mut failing);
                slot = shared.lock();
                slot.written = upto;
                slot.ok = ok;
                shared.wrote.notify_all();
                if !ok {
                    if slot.closed {
                        // Nobody is left to hand anything over: no retry (the error is logged).
                        return;
                    }
                    slot.schedule.failed();
                }
            }
        }
    }
}

/// The parts handed over replace those of `state`.
fn take(state: &mut AdoptedState, pending: Pending) {
    if let Some(core) = pending.core {
        state.rules = core.rules;
        state.routes = core.routes;
        state.neighbours = core.neighbours;
        state.fdb = core.fdb;
    }
    if let Some((chains, ipsets)) = pending.netfilter {
        state.chains = chains;
        state.ipsets = ipsets;
    }
    if let Some(tables) = pending.nftables {
        state.nftables = tables
            .iter()
            .map(|(selector, t)| SavedTable::new(selector, t))
            .collect();
    }
}

/// One write of the whole file; errors are logged when they begin and when they end.
fn write(path: &std::path::Path, state: &AdoptedState, failing: &mut bool) -> bool {
    let started = Instant::now();
    let result = serde_json::to_vec_pretty(state)
        .map_err(std::io::Error::from)
        .and_then(|json| crate::files::write_atomic(path, &json).map(|()| json.len()));
    match result {
        Ok(bytes) => {
            if std::mem::take(failing) {
                tracing::info!(path = %path.display(), "the adopted-state file is written again");
            }
            let took_us = started.elapsed().as_micros() as u64;
            tracing::debug!(bytes, took_us, "adopted state written");
            true
        }
        Err(e) => {
            if !std::mem::replace(failing, true) {
                tracing::error!(path = %path.display(), error = %e, "cannot write the adopted-state file; tried again every second until it can be");
            }
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adopted_state::{AdoptedFdb, AdoptedNeighbour, AdoptedRoute, AdoptedRule};
    use crate::model::neighbour::NeighbourState;
    use crate::model::{DesiredRoute, Family, RouteKey, RuleAction, RuleKey};

    fn wait_for(path: &std::path::Path, want: &AdoptedState, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while read(path).map(|s| s != *want).unwrap_or(true) {
            assert!(Instant::now() < deadline, "{what}: {:?}", read(path));
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn rules_and_routes() -> AdoptedState {
        AdoptedState {
            version: VERSION,
            rules: vec![AdoptedRule {
                selector: "vpc-cni".into(),
                key: RuleKey::new(
                    Family::Ipv4,
                    1536,
                    Some("10.1.1.20/32".parse().unwrap()),
                    None,
                    None,
                    None,
                    None,
                    None,
                    2,
                    RuleAction::Lookup,
                ),
                protocol: Some(4),
            }],
            routes: vec![AdoptedRoute {
                selector: "eni".into(),
                route: DesiredRoute {
                    name: "adopted:eni/0.0.0.0/0".into(),
                    mode: crate::model::Mode::Enforce,
                    key: RouteKey::new(Family::Ipv4, 2, "0.0.0.0/0".parse().unwrap(), None),
                    kind: crate::model::RouteType::Unicast,
                    gateway: Some("10.1.1.1".parse().unwrap()),
                    device: Some("eni1".into()),
                    prefsrc: None,
                    scope: Some(0),
                    protocol: Some(3),
                    onlink: false,
                    mtu: None,
                },
            }],
            ..Default::default()
        }
    }

    #[test]
    fn each_engine_writes_its_own_part_and_a_new_writer_keeps_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adopted.json");
        let state = rules_and_routes();
        let w = Writer::spawn(path.clone()).unwrap();
        w.save(state.clone());
        wait_for(&path, &state, "not written");

        // The guard's part joins the agent's; the agent's next save keeps it.
        let chain = SavedChain {
            selector: "kube-router".into(),
            key: crate::netfilter::model::ChainKey {
                family: Family::Ipv4,
                table: crate::netfilter::model::Table::Nat,
                chain: "KUBE-ROUTER-X".into(),
            },
            rules: vec!["-j RETURN".into()],
        };
        w.save_netfilter(vec![chain.clone()], vec![]);
        let state = AdoptedState {
            routes: vec![],
            ..state
        };
        w.save(state.clone());
        let want = AdoptedState {
            chains: vec![chain],
            ..state.clone()
        };
        wait_for(&path, &want, "not merged");
        // A new writer (agent restart) starts from what the file holds.
        drop(w);
        let w = Writer::spawn(path.clone()).unwrap();
        w.save(AdoptedState::default());
        let want = AdoptedState {
            version: VERSION,
            chains: want.chains.clone(),
            ..AdoptedState::default()
        };
        wait_for(&path, &want, "guard part lost");
    }

    #[test]
    fn the_nftables_part_is_the_engines_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adopted.json");
        let table = DesiredTable {
            name: "adopted:kube-proxy/ip/kube-proxy".into(),
            mode: crate::model::Mode::Enforce,
            key: crate::nftables::model::TableKey {
                family: crate::nftables::model::NfFamily::Ip,
                name: "kube-proxy".into(),
            },
            comment: None,
            dormant: None,
            chains: vec![],
            sets: vec![],
        };
        let w = Writer::spawn(path.clone()).unwrap();
        w.save_nftables(vec![("kube-proxy".into(), Arc::new(table.clone()))]);
        let n = AdoptedNeighbour {
            selector: "flannel".into(),
            device: "flannel.1".into(),
            address: "10.244.2.0".parse().unwrap(),
            lladdr: "0a:58:0a:f4:02:00".into(),
            state: NeighbourState::Permanent,
        };
        let f = AdoptedFdb {
            selector: "flannel".into(),
            device: "flannel.1".into(),
            lladdr: "0a:58:0a:f4:02:00".into(),
            dst: "192.168.1.12".parse().unwrap(),
            vni: Some(1),
        };
        w.save(AdoptedState {
            neighbours: vec![n.clone()],
            fdb: vec![f.clone()],
            ..Default::default()
        });
        let want = AdoptedState {
            version: VERSION,
            neighbours: vec![n],
            fdb: vec![f],
            nftables: vec![SavedTable::new("kube-proxy", &table)],
            ..Default::default()
        };
        wait_for(&path, &want, "tables and neighbours");
    }

    /// A long interval: what is written at all is written by the schedule's first write or by
    /// a flush, never by a timer running out within the test.
    const LONG: Duration = Duration::from_secs(3600);

    #[test]
    fn changes_that_keep_coming_are_held_and_a_flush_writes_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adopted.json");
        let w = Writer::spawn_every(path.clone(), LONG).unwrap();
        let first = rules_and_routes();
        w.save(first.clone());
        wait_for(&path, &first, "the first change is written at once");
        let mut newest = first.clone();
        for i in 0..50u8 {
            newest.rules[0].protocol = Some(i);
            w.save(newest.clone());
        }
        assert!(w.flush(Duration::from_secs(10)), "flushed in time");
        // Flushed: on disk already, no waiting.
        assert_eq!(read(&path).unwrap(), newest, "the newest state");
    }

    #[test]
    fn held_changes_are_written_when_the_last_writer_goes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adopted.json");
        let w = Writer::spawn_every(path.clone(), LONG).unwrap();
        let mut state = rules_and_routes();
        w.save(state.clone());
        wait_for(&path, &state, "the first change");
        state.routes.clear();
        let other = w.clone();
        w.save(state.clone());
        drop(w);
        std::thread::sleep(Duration::from_millis(50));
        assert_ne!(read(&path).unwrap(), state, "held while a writer is left");
        drop(other);
        wait_for(&path, &state, "written at the close");
    }

    #[test]
    fn a_write_that_fails_is_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        // The file's directory is a file at first: no write can succeed.
        let blocker = dir.path().join("state");
        std::fs::write(&blocker, b"").unwrap();
        let path = blocker.join("adopted.json");
        let w = Writer::spawn_every(path.clone(), Duration::from_millis(20)).unwrap();
        let state = rules_and_routes();
        w.save(state.clone());
        std::thread::sleep(Duration::from_millis(50));
        std::fs::remove_file(&blocker).unwrap();
        // No further change: the retry alone writes it.
        wait_for(&path, &state, "retried");
    }
}
