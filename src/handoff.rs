//! Addresses a network manager owns: when their owner removes them, the owner gets the first
//! chance to put them back. Pure: the caller passes the time and owns the timer (the loop sleeps
//! until [`Handoff::next_deadline`] and then calls [`Handoff::expired`]).
//!
//! systemd-networkd removes its own static address and adds it again whenever it starts or
//! reconfigures a link. Another writer that puts the address back in between, without the
//! broadcast address networkd gave it, makes networkd 252 loop on the address (65,536 requests)
//! and mark the link `failed`; with the broadcast it does not (`cargo bench --bench
//! networkd_address`, docs/benchmarks.md). The agent re-adds an address exactly as it was (see
//! `ObservedAddress`) and, when the remover is the address's owner, does not re-add it at all
//! unless the owner has not done so within [`OWNER_GRACE`]: a manager doing its own
//! remove-and-add is left alone, a manager that is gone or failed is still covered.

use crate::model::fast::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// How long the owner of an address has to put it back before the agent does. networkd's own
/// remove → add gap is a few milliseconds on an idle node and stays under a quarter of a second
/// with thousands of objects being repaired at once (the benches measure both): this leaves it
/// a wide margin, and bounds the outage when the owner does not come back.
pub const OWNER_GRACE: Duration = Duration::from_secs(1);

/// Process names (as the kernel reports them, at most 15 bytes) of network managers that remove
/// and re-add the addresses they configure: their removals are handed off even when the config
/// does not say who owns the address.
pub const MANAGERS: &[&str] = &["systemd-network", "NetworkManager"];

/// The kernel's limit on a process name (`comm`), which is how owners are compared.
const COMM_MAX: usize = 15;

/// Who removed the address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Remover<'a> {
    /// The kernel (its link went away or down).
    Kernel,
    /// Not known: the process was gone before the lookup, or processes cannot be looked up.
    Unknown,
    Process(&'a str),
}

/// What to do about a removed address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    RepairNow,
    /// Leave it to its owner (named) for [`OWNER_GRACE`].
    AwaitOwner(String),
}

/// Whether a process name is the owner's name (compared as the kernel truncates names).
pub fn same_process(configured: &str, comm: &str) -> bool {
    let cut = |s: &str| -> String { s.bytes().take(COMM_MAX).map(char::from).collect() };
    cut(configured) == cut(comm)
}

/// Decides for one removal. `owner`: the address's `managedBy`, if any.
pub fn judge(owner: Option<&str>, remover: Remover<'_>) -> Verdict {
    match (owner, remover) {
        (_, Remover::Kernel) => Verdict::RepairNow,
        (Some(o), Remover::Process(p)) if same_process(o, p) => Verdict::AwaitOwner(p.to_string()),
        // A manager doing its remove-and-add is left alone even on an address the config gives
        // to someone else: putting it back first is what breaks it.
        (_, Remover::Process(p)) if MANAGERS.contains(&p) => Verdict::AwaitOwner(p.to_string()),
        (_, Remover::Process(_)) => Verdict::RepairNow,
        // Maybe the owner, maybe not: the owner's chance costs at most the grace.
        (Some(o), Remover::Unknown) => Verdict::AwaitOwner(o.to_string()),
        (None, Remover::Unknown) => Verdict::RepairNow,
    }
}

#[derive(Clone, Debug)]
struct Wait {
    owner: String,
    /// Netlink port of the removal (for attribution when the agent restores it after all).
    port: u32,
    since: Instant,
    until: Instant,
}

/// A finished wait.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ended<K> {
    pub id: K,
    pub owner: String,
    pub port: u32,
    pub waited: Duration,
}

/// The addresses left to their owners, and until when.
#[derive(Clone, Debug)]
pub struct Handoff<K> {
    grace: Duration,
    waits: HashMap<K, Wait>,
}

impl<K: Clone + Eq + Hash> Default for Handoff<K> {
    fn default() -> Self {
        Handoff::new(OWNER_GRACE)
    }
}

impl<K: Clone + Eq + Hash> Handoff<K> {
    pub fn new(grace: Duration) -> Handoff<K> {
        Handoff {
            grace,
            waits: HashMap::default(),
        }
    }

    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// Leaves `id` to `owner` from `now`. A second removal while waiting keeps the first
    /// deadline: an owner that keeps removing does not keep the address away for longer.
    pub fn await_owner(&mut self, id: &K, owner: &str, port: u32, now: Instant) {
        let grace = self.grace;
        self.waits.entry(id.clone()).or_insert_with(|| Wait {
            owner: owner.to_string(),
            port,
            since: now,
            until: now + grace,
        });
    }

    pub fn is_waiting(&self, id: &K) -> bool {
        !self.waits.is_empty() && self.waits.contains_key(id)
    }

    /// The owner of a waiting address.
    pub fn owner(&self, id: &K) -> Option<&str> {
        self.waits.get(id).map(|w| w.owner.as_str())
    }

    /// The address is back (someone added it): the wait is over.
    pub fn returned(&mut self, id: &K, now: Instant) -> Option<Ended<K>> {
        let w = self.waits.remove(id)?;
        Some(Ended {
            id: id.clone(),
            owner: w.owner,
            port: w.port,
            waited: now.saturating_duration_since(w.since),
        })
    }

    /// When the earliest wait runs out.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.waits.values().map(|w| w.until).min()
    }

    /// The waits that ran out by `now`: their owners did not put them back; they are the
    /// caller's to repair.
    pub fn expired(&mut self, now: Instant) -> Vec<Ended<K>> {
        let mut out = Vec::new();
        self.waits.retain(|id, w| {
            if w.until > now {
                return true;
            }
            out.push(Ended {
                id: id.clone(),
                owner: std::mem::take(&mut w.owner),
                port: w.port,
                waited: now.saturating_duration_since(w.since),
            });
            false
        });
        out
    }

    /// Forgets waits of objects no longer protected (after a config change).
    pub fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        self.waits.retain(|id, _| keep(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn owners_and_managers_get_the_first_chance() {
        let nd = Remover::Process("systemd-network");
        assert_eq!(
            judge(None, nd),
            Verdict::AwaitOwner("systemd-network".into())
        );
        assert_eq!(
            judge(Some("systemd-networkd"), nd),
            Verdict::AwaitOwner("systemd-network".into()),
            "the configured name is compared as the kernel truncates it"
        );
        assert_eq!(
            judge(Some("wicked"), Remover::Process("wicked")),
            Verdict::AwaitOwner("wicked".into())
        );
        // A manager is left alone even on an address configured for another owner.
        assert_eq!(
            judge(Some("wicked"), Remover::Process("NetworkManager")),
            Verdict::AwaitOwner("NetworkManager".into())
        );
    }

    #[test]
    fn everyone_else_is_repaired_at_once() {
        assert_eq!(judge(None, Remover::Process("ip")), Verdict::RepairNow);
        assert_eq!(
            judge(Some("systemd-networkd"), Remover::Process("ip")),
            Verdict::RepairNow
        );
        assert_eq!(judge(Some("wicked"), Remover::Kernel), Verdict::RepairNow);
        assert_eq!(judge(None, Remover::Kernel), Verdict::RepairNow);
        assert_eq!(judge(None, Remover::Unknown), Verdict::RepairNow);
    }

    #[test]
    fn an_unknown_remover_of_an_owned_address_may_be_its_owner() {
        assert_eq!(
            judge(Some("systemd-networkd"), Remover::Unknown),
            Verdict::AwaitOwner("systemd-networkd".into())
        );
    }

    #[test]
    fn process_names_compare_on_the_kernels_fifteen_bytes() {
        assert!(same_process("systemd-networkd", "systemd-network"));
        assert!(same_process("NetworkManager", "NetworkManager"));
        assert!(!same_process("NetworkManager", "NetworkManage"));
        assert!(!same_process("ip", "ipset"));
    }

    #[test]
    fn a_wait_ends_when_the_owner_puts_it_back() {
        let mut h: Handoff<u32> = Handoff::default();
        let t0 = Instant::now();
        assert_eq!(h.next_deadline(), None);
        h.await_owner(&1, "systemd-network", 77, t0);
        assert!(h.is_waiting(&1));
        assert!(!h.is_waiting(&2));
        assert_eq!(h.owner(&1), Some("systemd-network"));
        assert_eq!(h.next_deadline(), Some(t0 + OWNER_GRACE));
        let back = h.returned(&1, t0 + 17 * MS).unwrap();
        assert_eq!(back.waited, 17 * MS);
        assert_eq!(back.owner, "systemd-network");
        assert_eq!(back.port, 77);
        assert!(!h.is_waiting(&1));
        assert_eq!(h.next_deadline(), None);
        assert!(h.expired(t0 + OWNER_GRACE).is_empty());
        assert_eq!(h.returned(&1, t0), None, "nothing to end twice");
    }

    #[test]
    fn a_wait_runs_out_after_the_grace_and_is_not_extended() {
        let mut h: Handoff<u32> = Handoff::new(100 * MS);
        let t0 = Instant::now();
        h.await_owner(&1, "systemd-network", 7, t0);
        h.await_owner(&2, "NetworkManager", 8, t0 + 50 * MS);
        // Removed again while waiting: the first deadline stays.
        h.await_owner(&1, "systemd-network", 7, t0 + 60 * MS);
        assert_eq!(h.next_deadline(), Some(t0 + 100 * MS));
        assert!(h.expired(t0 + 99 * MS).is_empty());
        let due = h.expired(t0 + 100 * MS);
        assert_eq!(
            due,
            [Ended {
                id: 1,
                owner: "systemd-network".into(),
                port: 7,
                waited: 100 * MS
            }]
        );
        assert!(!h.is_waiting(&1));
        assert_eq!(h.next_deadline(), Some(t0 + 150 * MS));
        h.retain(|id| *id != 2);
        assert_eq!(h.next_deadline(), None);
    }
}
