//! Liveness from the cluster (`podLiveness` on an adopt selector): adopted objects tied to a pod IP
//! are forgotten once no pod on this node holds that IP any more. Pure: the Kubernetes thread
//! provides [`PodView`]s, the reconcile loop asks [`Tracker::judge`] what to forget.
//!
//! A CNI adds the per-pod rules during CNI ADD, before the API server shows the pod's IP, so an
//! IP not held *yet* is no reason to forget. Two things are:
//! - the IP was seen held by a node pod and is not any more (the pod was deleted, or its IP
//!   changed): [`Reason::PodGone`];
//! - the IP has not been held by any node pod for the selector's grace period, measured on views
//!   that could be trusted (a missed deletion must not stay protected forever):
//!   [`Reason::Grace`].
//!
//! Nothing is decided on a view that cannot be trusted: before the Pod cache has synced, or
//! while the API server is unreachable (the cache may be stale).

use ipnet::IpNet;
use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Grace period when a selector names none.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(120);

/// The IPs the pods of this node hold, as the Pod cache shows them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodView {
    /// The cache has been listed at least once.
    pub synced: bool,
    /// The last thing the watch said was not an error: the API server is reachable.
    pub fresh: bool,
    pub ips: HashSet<IpAddr>,
}

impl PodView {
    /// Whether decisions may be taken on this view.
    pub fn usable(&self) -> bool {
        self.synced && self.fresh
    }
}

/// Why an adopted object was forgotten.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Its IP was held by a node pod and is no longer.
    PodGone,
    /// Its IP has not been held by any node pod for the grace period.
    Grace,
}

impl Reason {
    /// The metric label and log value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::PodGone => "pod_gone",
            Reason::Grace => "pod_grace_expired",
        }
    }
}

/// The pod IP an adopted rule is tied to: its `from`, else its `to`, when that is a host prefix
/// (/32, /128).
pub fn rule_ip(from: Option<&IpNet>, to: Option<&IpNet>) -> Option<IpAddr> {
    from.and_then(host).or_else(|| to.and_then(host))
}

/// The pod IP an adopted route is tied to: its destination, when that is a host prefix.
pub fn route_ip(destination: &IpNet) -> Option<IpAddr> {
    host(destination)
}

fn host(net: &IpNet) -> Option<IpAddr> {
    (net.prefix_len() == net.max_prefix_len()).then(|| net.addr())
}

#[derive(Clone, Debug)]
struct Entry {
    ip: IpAddr,
    grace: Duration,
    /// Seen held by a node pod since it was tracked.
    held_once: bool,
    /// Found not held on a usable view since then (and not held since).
    unheld_since: Option<Instant>,
}

/// What a look at a view calls for.
#[derive(Debug, PartialEq, Eq)]
pub struct Judgement<K> {
    /// Stop protecting these.
    pub forget: Vec<(K, Reason)>,
    /// Forgotten earlier and still in the kernel, their IP held by a pod again: adopt them again.
    pub revive: Vec<K>,
}

/// The adopted objects tied to pod IPs, and those forgotten for liveness while still in the
/// kernel (dismissed: not adopted again while they stay, unless a pod holds their IP again).
#[derive(Debug)]
pub struct Tracker<K> {
    entries: HashMap<K, Entry>,
    dismissed: HashMap<K, IpAddr>,
    /// The last view judged could be trusted: deadlines mean something.
    usable: bool,
}

impl<K> Default for Tracker<K> {
    fn default() -> Self {
        Tracker {
            entries: HashMap::new(),
            dismissed: HashMap::new(),
            usable: false,
        }
    }
}

impl<K: Clone + Eq + Hash> Tracker<K> {
    /// Follows an adopted object tied to `ip`. Tracking it again keeps what is known of it
    /// (a new grace period applies from now on).
    pub fn track(&mut self, key: K, ip: IpAddr, grace: Duration) {
        self.dismissed.remove(&key);
        match self.entries.get_mut(&key) {
            Some(e) if e.ip == ip => e.grace = grace,
            _ => {
                self.entries.insert(
                    key,
                    Entry {
                        ip,
                        grace,
                        held_once: false,
                        unheld_since: None,
                    },
                );
            }
        }
    }

    /// Keeps only the tracked objects `keep` says are still adopted.
    pub fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        self.entries.retain(|k, _| keep(k));
    }

    pub fn is_tracked(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many tracked objects have had their IP seen held by a pod.
    pub fn held(&self) -> usize {
        self.entries.values().filter(|e| e.held_once).count()
    }

    /// Forgotten for liveness and still in the kernel: not to be adopted again.
    pub fn is_dismissed(&self, key: &K) -> bool {
        self.dismissed.contains_key(key)
    }

    /// Whether anything is dismissed (the loop skips the lookups otherwise).
    pub fn has_dismissed(&self) -> bool {
        !self.dismissed.is_empty()
    }

    /// The object left the kernel (or the config changed): if it comes back it is new.
    pub fn undismiss(&mut self, key: &K) {
        self.dismissed.remove(key);
    }

    /// Keeps only the dismissed objects `keep` says are still in the kernel.
    pub fn retain_dismissed(&mut self, mut keep: impl FnMut(&K) -> bool) {
        self.dismissed.retain(|k, _| keep(k));
    }

    /// Looks at a view at `now`. Forgotten objects leave the tracker and are dismissed.
    pub fn judge(&mut self, view: &PodView, now: Instant) -> Judgement<K> {
        self.usable = view.usable();
        let mut out = Judgement {
            forget: Vec::new(),
            revive: Vec::new(),
        };
        if !self.usable {
            return out;
        }
        for (key, e) in &mut self.entries {
            if view.ips.contains(&e.ip) {
                e.held_once = true;
                e.unheld_since = None;
            } else if e.held_once {
                out.forget.push((key.clone(), Reason::PodGone));
            } else {
                let since = *e.unheld_since.get_or_insert(now);
                if now.saturating_duration_since(since) >= e.grace {
                    out.forget.push((key.clone(), Reason::Grace));
                }
            }
        }
        for (key, _) in &out.forget {
            if let Some(e) = self.entries.remove(key) {
                self.dismissed.insert(key.clone(), e.ip);
            }
        }
        out.revive = self
            .dismissed
            .iter()
            .filter(|(_, ip)| view.ips.contains(ip))
            .map(|(k, _)| k.clone())
            .collect();
        for key in &out.revive {
            self.dismissed.remove(key);
        }
        out
    }

    /// When the next grace period runs out (only while the last view could be trusted: the
    /// loop must not spin on a deadline that no judgement can act on).
    pub fn next_deadline(&self) -> Option<Instant> {
        if !self.usable {
            return None;
        }
        self.entries
            .values()
            .filter(|e| !e.held_once)
            .filter_map(|e| e.unheld_since.map(|s| s + e.grace))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(ips: &[&str]) -> PodView {
        PodView {
            synced: true,
            fresh: true,
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const GRACE: Duration = Duration::from_secs(120);

    #[test]
    fn tied_ips_are_host_prefixes() {
        let n = |s: &str| s.parse::<IpNet>().unwrap();
        assert_eq!(rule_ip(Some(&n("10.0.0.5/32")), None), Some(ip("10.0.0.5")));
        assert_eq!(rule_ip(None, Some(&n("10.0.0.6/32"))), Some(ip("10.0.0.6")));
        assert_eq!(
            rule_ip(Some(&n("10.0.0.0/24")), Some(&n("10.0.0.6/32"))),
            Some(ip("10.0.0.6")),
            "the host prefix of the two"
        );
        assert_eq!(rule_ip(Some(&n("10.0.0.0/24")), None), None);
        assert_eq!(rule_ip(None, None), None);
        assert_eq!(route_ip(&n("fd00::7/128")), Some(ip("fd00::7")));
        assert_eq!(route_ip(&n("fd00::/64")), None);
        assert_eq!(route_ip(&n("0.0.0.0/0")), None);
    }

    #[test]
    fn a_pod_deleted_or_moved_forgets_its_objects() {
        let t0 = Instant::now();
        let mut t = Tracker::default();
        t.track("a", ip("10.0.0.5"), GRACE);
        t.track("b", ip("10.0.0.6"), GRACE);
        t.track("c", ip("10.0.0.7"), GRACE);
        let j = t.judge(&view(&["10.0.0.5", "10.0.0.6", "10.0.0.7"]), t0);
        assert!(j.forget.is_empty() && j.revive.is_empty());
        assert_eq!(t.held(), 3);
        // Pod of a deleted; pod of b got another IP.
        let j = t.judge(&view(&["10.0.0.7", "10.0.0.9"]), t0);
        let mut f = j.forget.clone();
        f.sort_by_key(|(k, _)| *k);
        assert_eq!(f, vec![("a", Reason::PodGone), ("b", Reason::PodGone)]);
        assert!(!t.is_tracked(&"a") && t.is_tracked(&"c"));
        assert!(t.is_dismissed(&"a"));
        assert!(t.judge(&view(&["10.0.0.7"]), t0).forget.is_empty(), "once");
    }

    #[test]
    fn an_ip_not_held_yet_is_kept_through_the_grace_period() {
        let t0 = Instant::now();
        let mut t = Tracker::default();
        // The CNI added the rule before the API server shows the pod's IP.
        t.track("early", ip("10.0.0.5"), GRACE);
        t.track("never", ip("10.0.0.6"), GRACE);
        assert!(t.judge(&view(&[]), t0).forget.is_empty());
        assert_eq!(t.next_deadline(), Some(t0 + GRACE));
        let t1 = t0 + GRACE / 2;
        assert!(t.judge(&view(&["10.0.0.5"]), t1).forget.is_empty());
        assert_eq!(t.next_deadline(), Some(t0 + GRACE), "early is held now");
        let j = t.judge(&view(&["10.0.0.5"]), t0 + GRACE);
        assert_eq!(j.forget, vec![("never", Reason::Grace)]);
        assert_eq!(t.next_deadline(), None);
        // Held once: its pod's deletion forgets it at once, no grace.
        let j = t.judge(&view(&[]), t0 + GRACE);
        assert_eq!(j.forget, vec![("early", Reason::PodGone)]);
    }

    #[test]
    fn nothing_is_decided_on_a_view_that_cannot_be_trusted() {
        let t0 = Instant::now();
        let mut t = Tracker::default();
        t.track("a", ip("10.0.0.5"), GRACE);
        t.track("b", ip("10.0.0.6"), GRACE);
        let unsynced = PodView::default();
        assert!(t.judge(&unsynced, t0).forget.is_empty());
        assert_eq!(t.next_deadline(), None, "no clock before the cache synced");
        // Grace counts from the first trusted view.
        let t1 = t0 + GRACE * 2;
        assert!(t.judge(&view(&["10.0.0.5"]), t1).forget.is_empty());
        // The API server goes away: the cache may be stale.
        let mut stale = view(&[]);
        stale.fresh = false;
        let t2 = t1 + GRACE * 3;
        assert!(t.judge(&stale, t2).forget.is_empty());
        assert_eq!(t.next_deadline(), None, "no spinning on a stale view");
        // Back: the fresh view decides.
        let j = t.judge(&view(&[]), t2);
        let mut f = j.forget;
        f.sort_by_key(|(k, _)| *k);
        assert_eq!(f, vec![("a", Reason::PodGone), ("b", Reason::Grace)]);
    }

    #[test]
    fn dismissed_objects_come_back_with_a_pod() {
        let t0 = Instant::now();
        let mut t = Tracker::default();
        t.track("a", ip("10.0.0.5"), GRACE);
        t.track("b", ip("10.0.0.6"), GRACE);
        t.judge(&view(&["10.0.0.5", "10.0.0.6"]), t0);
        t.judge(&view(&[]), t0);
        assert!(t.has_dismissed() && t.is_dismissed(&"a") && t.is_dismissed(&"b"));
        t.undismiss(&"b");
        let j = t.judge(&view(&["10.0.0.5", "10.0.0.6"]), t0);
        assert_eq!(j.revive, vec!["a"], "b left the kernel: nothing to revive");
        assert!(!t.is_dismissed(&"a"));
        // Tracking again starts afresh.
        t.track("a", ip("10.0.0.5"), GRACE);
        assert!(t.judge(&view(&[]), t0).forget.is_empty());
        t.retain(|_| false);
        assert!(t.is_empty());
    }

    #[test]
    fn tracking_again_keeps_what_is_known() {
        let t0 = Instant::now();
        let mut t = Tracker::default();
        t.track("a", ip("10.0.0.5"), GRACE);
        t.judge(&view(&["10.0.0.5"]), t0);
        t.track("a", ip("10.0.0.5"), GRACE / 2);
        assert_eq!(t.judge(&view(&[]), t0).forget, vec![("a", Reason::PodGone)]);
        assert_eq!(t.len(), 0);
    }
}
