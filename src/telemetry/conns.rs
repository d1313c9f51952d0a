//! The HTTP server's table of open connections, and which one to close when a new connection
//! needs room. Pure: the server does the I/O.
//!
//! Every connection is accepted at once (nothing waits in the kernel's listen backlog, where a
//! kubelet probe would sit behind whoever filled it). When the table is full, the connection to
//! close is an idle one (not answering a request) of the peer that holds the most connections,
//! the oldest of those: a client holding hundreds of idle or half-sent connections pays for them
//! itself, another client's keep-alive connection is left alone, and a probe (the newest
//! connection of its peer) gets its answer before it could become anyone's victim.

use std::collections::BTreeMap;
use std::net::IpAddr;

/// One open connection, as the table sees it.
#[derive(Debug)]
pub struct Entry<C> {
    pub peer: IpAddr,
    /// Answering a request right now: never closed to make room.
    pub busy: bool,
    /// What the server needs to close it (its task's stop signal).
    pub handle: C,
}

/// Open connections by id; ids grow, so the smallest is the oldest.
#[derive(Debug)]
pub struct Table<C> {
    max: usize,
    next: u64,
    conns: BTreeMap<u64, Entry<C>>,
}

/// What admitting a new connection means.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission<C> {
    /// Admitted under this id; `evicted`: the connection closed to make room, if any.
    Admitted { id: u64, evicted: Option<C> },
    /// Every slot is answering a request: the new connection is closed at once.
    Refused,
}

impl<C> Table<C> {
    pub fn new(max: usize) -> Table<C> {
        Table {
            max: max.max(1),
            next: 0,
            conns: BTreeMap::new(),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.conns.len()
    }

    /// Takes in a new connection from `peer`, closing another one if the table is full.
    pub fn admit(&mut self, peer: IpAddr, handle: C) -> Admission<C> {
        let mut evicted = None;
        if self.conns.len() >= self.max {
            match self.victim(peer) {
                Some(id) => evicted = self.conns.remove(&id).map(|e| e.handle),
                None => return Admission::Refused,
            }
        }
        let id = self.next;
        self.next += 1;
        self.conns.insert(
            id,
            Entry {
                peer,
                busy: false,
                handle,
            },
        );
        Admission::Admitted { id, evicted }
    }

    /// Marks a connection as answering a request (or done with it).
    pub fn set_busy(&mut self, id: u64, busy: bool) {
        if let Some(e) = self.conns.get_mut(&id) {
            e.busy = busy;
        }
    }

    /// Forgets a connection that ended (a no-op for one already evicted).
    pub fn remove(&mut self, id: u64) {
        self.conns.remove(&id);
    }

    /// The oldest idle connection of the peer holding the most connections (the newcomer
    /// `peer` counted), among peers that have an idle one.
    fn victim(&self, peer: IpAddr) -> Option<u64> {
        let mut held: std::collections::HashMap<IpAddr, usize> = std::collections::HashMap::new();
        *held.entry(peer).or_default() += 1;
        for e in self.conns.values() {
            *held.entry(e.peer).or_default() += 1;
        }
        // Iterating oldest first, the first idle connection found for a count wins ties.
        let mut best: Option<(usize, u64)> = None;
        for (id, e) in &self.conns {
            if e.busy {
                continue;
            }
            let n = held[&e.peer];
            if best.is_none_or(|(m, _)| n > m) {
                best = Some((n, *id));
            }
        }
        best.map(|(_, id)| id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn admitted<C: std::fmt::Debug>(a: Admission<C>) -> (u64, Option<C>) {
        match a {
            Admission::Admitted { id, evicted } => (id, evicted),
            Admission::Refused => panic!("refused"),
        }
    }

    #[test]
    fn room_is_made_from_the_peer_holding_the_most_oldest_first() {
        let mut t = Table::new(4);
        let (prom, _) = admitted(t.admit(ip("10.0.0.9"), "prometheus"));
        for h in ["a0", "a1", "a2"] {
            assert_eq!(admitted(t.admit(ip("10.0.0.66"), h)).1, None);
        }
        // Full: a newcomer from a third peer closes the flooding peer's oldest, not the
        // scraper's older keep-alive connection.
        assert_eq!(admitted(t.admit(ip("10.0.0.1"), "probe")).1, Some("a0"));
        // The flooding peer's next connection costs it its own next oldest.
        assert_eq!(admitted(t.admit(ip("10.0.0.66"), "a3")).1, Some("a1"));
        assert_eq!(t.len(), 4);
        t.remove(prom);
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn a_probe_from_the_flooding_peer_is_the_last_of_its_connections_to_go() {
        let mut t = Table::new(3);
        for h in ["x0", "x1"] {
            admitted(t.admit(ip("127.0.0.1"), h));
        }
        let (probe, _) = admitted(t.admit(ip("127.0.0.1"), "probe"));
        assert_eq!(admitted(t.admit(ip("127.0.0.1"), "x2")).1, Some("x0"));
        assert_eq!(admitted(t.admit(ip("127.0.0.1"), "x3")).1, Some("x1"));
        // Answering its request: never closed; the next oldest idle one goes instead.
        t.set_busy(probe, true);
        assert_eq!(admitted(t.admit(ip("127.0.0.1"), "x4")).1, Some("x2"));
    }

    #[test]
    fn a_table_of_busy_connections_refuses_newcomers() {
        let mut t = Table::new(2);
        let (a, _) = admitted(t.admit(ip("::1"), 1));
        let (b, _) = admitted(t.admit(ip("::1"), 2));
        t.set_busy(a, true);
        t.set_busy(b, true);
        assert_eq!(t.admit(ip("::1"), 3), Admission::Refused);
        t.set_busy(b, false);
        assert_eq!(admitted(t.admit(ip("::1"), 3)).1, Some(2));
        // Removing what was evicted already changes nothing.
        t.remove(b);
        assert_eq!(t.len(), 2);
    }
}
