//! How long protected objects were missing, as an independent rtnetlink listener
//! ([`netwarden::testing::listen::Listener`], arrival timestamps) sees it from inside the namespace.
//!
//! A rule or route is missing from its RTM_DEL* notification to its next RTM_NEW*. The kernel
//! also drops IPv4 routes *without* a notification: when the last IPv4 address of their link
//! goes away (systemd-networkd removes and re-adds its own address when it starts). So an
//! RTM_DELADDR of an IPv4 address on a link counts as the loss of every protected IPv4 route
//! through that link that is not already missing; [`Outage::settle`] checks the kernel's own
//! listing at the end, so a route that did survive is not counted.
//!
//! While a link has no IPv4 address nobody can put a route through a gateway on it back
//! (ENETUNREACH): [`Outage::longest_with_address`] leaves that time out of each outage of a
//! route on that link. Which addresses a link holds at the start is told with
//! [`Outage::seed_addresses`].

use anyhow::{anyhow, Context, Result};
use netwarden::desired::DesiredState;
use netwarden::model::{Family, RouteKey, RuleKey};
use netwarden::observe::decode;
use netwarden::testing::listen::{Listener, Seen};
use rtnetlink::packet_route::RouteNetlinkMessage as M;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

/// A listener subscribed inside the network namespace `netns`. The socket is bound there (by a
/// short-lived thread that enters the namespace), so the calling thread stays where it is.
pub fn listener_in(netns: &str) -> Result<Listener> {
    let netns = netns.to_string();
    std::thread::spawn(move || -> Result<Listener> {
        netwarden::netns::enter(&netns)?;
        Ok(Listener::start()?)
    })
    .join()
    .map_err(|_| anyhow!("the listener thread panicked"))?
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    Rule(RuleKey),
    Route(RouteKey),
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Rule(k) => write!(f, "rule {k}"),
            Key::Route(k) => write!(f, "route {k}"),
        }
    }
}

/// What the listener showed of the protected rules and routes.
#[derive(Debug)]
pub struct Outage {
    /// Every protected rule and route, with the ifindex of a route's device.
    protected: HashMap<Key, Option<u32>>,
    /// Missing now, since when.
    missing: HashMap<Key, Instant>,
    /// Of those, the ones whose loss was notified (an RTM_DEL*, not inferred from an address
    /// removal): their return is notified too.
    notified: HashSet<Key>,
    /// Per object: the longest it was missing.
    pub gaps: HashMap<Key, Duration>,
    /// Every outage seen: object, from, to.
    pub outages: Vec<(Key, Instant, Instant)>,
    /// IPv4 addresses each link holds, as far as the listener knows (see `seed_addresses`).
    link_addresses: HashMap<u32, HashSet<std::net::IpAddr>>,
    /// Per link: the times it had no IPv4 address (the end is `None` while it still has none).
    no_address: HashMap<u32, Vec<(Instant, Option<Instant>)>>,
    pub first_loss: Option<Instant>,
    /// The last RTM_DEL* of a protected object (losses inferred from an address left out).
    pub last_deleted: Option<Instant>,
    /// The first re-add of a protected object.
    pub first_back: Option<Instant>,
    /// The last loss (a deletion, or the silent drop with an address).
    pub last_loss: Option<Instant>,
    pub last_back: Option<Instant>,
    /// RTM_DEL* notifications of protected objects, and losses inferred from address removals.
    pub losses: usize,
    /// The listener's socket overran: notifications were lost, the figures are incomplete.
    pub overrun: bool,
    /// IPv4 addresses removed and not seen back yet (ifindex, address), since when.
    addresses_away: HashMap<(u32, std::net::IpAddr), Instant>,
    /// The longest an IPv4 address was away (networkd removes and re-adds its own): while it
    /// is, a route through a gateway on that link cannot be put back.
    pub longest_address_gap: Duration,
    /// IPv4 address removals seen.
    pub address_removals: usize,
    /// What was seen, in order (printed by [`Outage::summary`] when `NW_OUTAGE_TRACE` is set).
    pub trace: Vec<(Instant, String)>,
}

impl Outage {
    /// The protected rules and routes of the config file at `config`; `ifindex` resolves a
    /// route's device name in the namespace.
    pub fn for_config(config: &Path, ifindex: impl Fn(&str) -> Option<u32>) -> Result<Outage> {
        let cfg = netwarden::config::load(config).map_err(|e| anyhow!("{e}"))?;
        let desired = DesiredState::from_config(&cfg);
        let mut protected = HashMap::new();
        for k in desired.rules.keys() {
            protected.insert(Key::Rule(k.clone()), None);
        }
        for (k, r) in &desired.routes {
            let index = match &r.device {
                Some(d) => Some(ifindex(d).with_context(|| format!("no link {d}"))?),
                None => None,
            };
            protected.insert(Key::Route(k.clone()), index);
        }
        Ok(Outage {
            protected,
            missing: HashMap::new(),
            notified: HashSet::new(),
            gaps: HashMap::new(),
            outages: Vec::new(),
            link_addresses: HashMap::new(),
            no_address: HashMap::new(),
            first_loss: None,
            last_deleted: None,
            first_back: None,
            last_loss: None,
            last_back: None,
            losses: 0,
            overrun: false,
            addresses_away: HashMap::new(),
            longest_address_gap: Duration::ZERO,
            address_removals: 0,
            trace: Vec::new(),
        })
    }

    pub fn protected(&self) -> usize {
        self.protected.len()
    }

    /// The IPv4 addresses the links hold now (ifindex, address), before anything happens.
    pub fn seed_addresses(&mut self, addresses: impl IntoIterator<Item = (u32, std::net::IpAddr)>) {
        for (index, address) in addresses {
            self.link_addresses
                .entry(index)
                .or_default()
                .insert(address);
        }
    }

    /// The longest outage of any object, less the time the link of a route had no IPv4 address
    /// during it; and that object.
    pub fn longest_with_address(&self) -> (Duration, Option<&Key>) {
        let mut worst = (Duration::ZERO, None);
        for (key, from, to) in &self.outages {
            let mut d = to.saturating_duration_since(*from);
            if let Some(Some(index)) = self.protected.get(key) {
                for (a, b) in self.no_address.get(index).into_iter().flatten() {
                    let start = (*a).max(*from);
                    let end = b.unwrap_or(*to).min(*to);
                    d = d.saturating_sub(end.saturating_duration_since(start));
                }
            }
            if d > worst.0 {
                worst = (d, Some(key));
            }
        }
        worst
    }

    /// The longest time a link had no IPv4 address.
    pub fn longest_without_address(&self) -> Duration {
        self.no_address
            .values()
            .flatten()
            .filter_map(|(a, b)| b.map(|b| b.saturating_duration_since(*a)))
            .max()
            .unwrap_or_default()
    }

    fn lose(&mut self, key: Key, at: Instant) {
        self.trace.push((at, format!("lost {key}")));
        self.losses += 1;
        self.first_loss.get_or_insert(at);
        self.last_loss = Some(at);
        self.missing.entry(key).or_insert(at);
    }

    fn back(&mut self, key: Key, at: Instant) {
        self.trace.push((at, format!("back {key}")));
        self.notified.remove(&key);
        if let Some(since) = self.missing.remove(&key) {
            let gap = at.saturating_duration_since(since);
            self.outages.push((key.clone(), since, at));
            self.first_back.get_or_insert(at);
            let longest = self.gaps.entry(key).or_default();
            *longest = (*longest).max(gap);
            self.last_back = Some(at);
        }
    }

    /// Folds one notification in.
    pub fn take(&mut self, (at, msg): &Seen) {
        let at = *at;
        let Some(msg) = msg else {
            self.overrun = true;
            return;
        };
        match msg {
            M::NewRule(m) | M::DelRule(m) => {
                let Some((k, _)) = decode::rule(m) else {
                    return;
                };
                let key = Key::Rule(k);
                if !self.protected.contains_key(&key) {
                    return;
                }
                if matches!(msg, M::NewRule(_)) {
                    self.back(key, at);
                } else {
                    self.last_deleted = Some(at);
                    self.notified.insert(key.clone());
                    self.lose(key, at);
                }
            }
            M::NewRoute(m) | M::DelRoute(m) => {
                let Some((k, _)) = decode::route(m) else {
                    return;
                };
                let key = Key::Route(k);
                if !self.protected.contains_key(&key) {
                    if k_is_new(msg) {
                        self.trace.push((at, format!("new unprotected {key}")));
                    }
                    return;
                }
                if matches!(msg, M::NewRoute(_)) {
                    self.back(key, at);
                } else {
                    self.last_deleted = Some(at);
                    self.notified.insert(key.clone());
                    self.lose(key, at);
                }
            }
            M::NewAddress(m) => {
                if let Some((k, _)) = decode::address(m) {
                    self.trace
                        .push((at, format!("new address {} on {}", k.address, k.ifindex)));
                    if let Some(since) = self.addresses_away.remove(&(k.ifindex, k.address)) {
                        let gap = at.saturating_duration_since(since);
                        self.longest_address_gap = self.longest_address_gap.max(gap);
                    }
                    if Family::of(&k.address) == Family::Ipv4 {
                        let held = self.link_addresses.entry(k.ifindex).or_default();
                        if held.is_empty() {
                            if let Some(open) = self
                                .no_address
                                .get_mut(&k.ifindex)
                                .and_then(|v| v.last_mut())
                                .filter(|(_, end)| end.is_none())
                            {
                                open.1 = Some(at);
                            }
                        }
                        held.insert(k.address);
                    }
                }
            }
            M::DelAddress(m) => {
                let Some((k, _)) = decode::address(m) else {
                    return;
                };
                if Family::of(&k.address) != Family::Ipv4 {
                    return;
                }
                self.trace
                    .push((at, format!("address {} gone from {}", k.address, k.ifindex)));
                self.address_removals += 1;
                self.addresses_away.insert((k.ifindex, k.address), at);
                let held = self.link_addresses.entry(k.ifindex).or_default();
                held.remove(&k.address);
                if held.is_empty() {
                    self.no_address
                        .entry(k.ifindex)
                        .or_default()
                        .push((at, None));
                }
                let dropped: Vec<Key> = self
                    .protected
                    .iter()
                    .filter(|(key, index)| {
                        matches!(key, Key::Route(r) if r.family == Family::Ipv4)
                            && **index == Some(k.ifindex)
                            && !self.missing.contains_key(*key)
                    })
                    .map(|(key, _)| key.clone())
                    .collect();
                for key in dropped {
                    self.lose(key, at);
                }
            }
            _ => {}
        }
    }

    /// Reads notifications until every object seen lost has been seen back and `present` (a
    /// look at the kernel) confirms it, or `within` passes. Objects `present` finds in place
    /// although their loss was only inferred (a route that survived an address removal) are no
    /// longer counted missing. Returns whether all is back.
    ///
    /// The kernel queues the notification of a re-add to every listener before a listing can show
    /// the object, but the listener's thread may not have read it yet (a busy machine runs it
    /// late): once `present` says yes, the re-adds of objects whose deletion was notified are
    /// read from the queue, each one certain to be there, so that none is counted missing (or
    /// never lost) for want of a read.
    pub fn settle(
        &mut self,
        listener: &Listener,
        within: Duration,
        mut present: impl FnMut() -> bool,
    ) -> bool {
        let deadline = Instant::now() + within;
        loop {
            while let Some(seen) = listener.next(Duration::from_millis(50)) {
                self.take(&seen);
                if Instant::now() >= deadline {
                    break;
                }
            }
            // Quiet for 50 ms.
            if present() {
                return self.read_notified_returns(listener, deadline);
            }
            if Instant::now() >= deadline {
                return false;
            }
        }
    }

    /// Reads until every object whose deletion was notified is seen back (see
    /// [`Outage::settle`]), then forgets what is missing only by inference. False when the
    /// deadline passes first.
    fn read_notified_returns(&mut self, listener: &Listener, deadline: Instant) -> bool {
        while !self.overrun && self.missing.keys().any(|k| self.notified.contains(k)) {
            let Some(seen) = deadline
                .checked_duration_since(Instant::now())
                .and_then(|left| listener.next(left))
            else {
                return false;
            };
            self.take(&seen);
        }
        self.missing.clear();
        self.notified.clear();
        true
    }

    /// Objects missing now, as far as the listener knows.
    pub fn missing(&self) -> Vec<String> {
        self.missing.keys().map(Key::to_string).collect()
    }

    /// Objects that were lost at least once.
    pub fn lost(&self) -> HashSet<&Key> {
        self.gaps.keys().collect()
    }

    /// Objects that were lost at least once, back since or not.
    pub fn lost_ever(&self) -> HashSet<&Key> {
        self.gaps.keys().chain(self.missing.keys()).collect()
    }

    /// Reads notifications until none came for `quiet` (or `within` passed): the offender is
    /// done, nobody repairs. Unlike [`Outage::settle`], what is missing stays missing.
    pub fn read_until_quiet(&mut self, listener: &Listener, quiet: Duration, within: Duration) {
        let deadline = Instant::now() + within;
        while let Some(seen) = listener.next(quiet) {
            self.take(&seen);
            if Instant::now() >= deadline {
                return;
            }
        }
    }

    pub fn longest(&self) -> Duration {
        self.gaps.values().copied().max().unwrap_or_default()
    }

    /// From the first loss to the last re-add.
    pub fn span(&self) -> Duration {
        match (self.first_loss, self.last_back) {
            (Some(a), Some(b)) => b.saturating_duration_since(a),
            _ => Duration::ZERO,
        }
    }

    /// From the first loss to the last: how long the offender took to remove it all.
    pub fn flush(&self) -> Duration {
        match (self.first_loss, self.last_loss) {
            (Some(a), Some(b)) => b.saturating_duration_since(a),
            _ => Duration::ZERO,
        }
    }

    /// One line for the test output.
    pub fn summary(&self, what: &str) -> String {
        let worst = self
            .gaps
            .iter()
            .max_by_key(|(_, d)| **d)
            .map(|(k, _)| format!(" ({k})"))
            .unwrap_or_default();
        let mut trace = String::new();
        if std::env::var_os("NW_OUTAGE_TRACE").is_some() {
            let t0 = self.trace.first().map(|(t, _)| *t);
            for (at, line) in &self.trace {
                let rel = t0
                    .map(|t| ms(at.saturating_duration_since(t)))
                    .unwrap_or(0.0);
                trace += &format!("\n  {rel:9.3} ms  {line}");
            }
        }
        let (addressed, _) = self.longest_with_address();
        format!(
            "{what}: {} of {} protected objects lost ({} losses), longest missing {:.3} ms{worst} ({:.3} ms less the time its link had no address), first loss to last re-add {:.3} ms, longest IPv4 address gap {:.3} ms{}",
            self.gaps.len(),
            self.protected.len(),
            self.losses,
            ms(self.longest()),
            ms(addressed),
            ms(self.span()),
            ms(self.longest_address_gap),
            if self.overrun { " (listener overran: incomplete)" } else { "" },
        ) + &trace
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn k_is_new(msg: &M) -> bool {
    matches!(msg, M::NewRoute(_))
}
