//! Who changed it: an rtnetlink notification's header carries the port id of the socket that
//! made the change. /proc/net/netlink maps the port id to the socket's inode, and a /proc/PID/fd
//! link `socket:[INODE]` to the process that holds it; /proc/PID/comm names it, /proc/PID/stat
//! gives its parent (an owner's child acts for the owner, see [`crate::adopt`]). Port 0 is the
//! kernel itself (a link went down, an address went away).
//!
//! Reading another process's /proc/PID/fd needs ptrace read access to it: denied, without
//! CAP_SYS_PTRACE, for a process of another uid (systemd-networkd runs as `systemd-network`) and
//! for a root process with capabilities the agent lacks (a privileged CNI container). Nothing
//! else the kernel offers maps a socket to its process (the socket table and sock_diag list
//! no owner; notifications carry the kernel's credentials, not the requester's), so the
//! DaemonSet grants CAP_SYS_PTRACE; docs/operator-guide.md ("Privileges") weighs it. Without it
//! only the port id itself is left: a process's first netlink socket gets its pid as port id
//! (in the pid namespace of the process: a container's init has pid 1 there), which names the
//! process without ptrace access — a *guess*, used only when nothing better is known.
//!
//! /proc/net/netlink lists the sockets of the *reading thread's* network namespace. The agent
//! enters its namespace with setns before it starts any thread, so every thread, and the lookup
//! thread here, sees the agent's namespace through /proc/thread-self/net/netlink;
//! [`check_namespace_view`] verifies that at start with a socket of its own.
//!
//! The lookup runs on its own thread, after the repair was sent, so it never delays a repair;
//! identities are cached by socket inode. A short-lived process (`ip rule del`) may be gone
//! before the lookup: the watcher ([`watch::watch_changes`]) identifies changers the moment the
//! change is notified; what neither finds is `unknown`.

mod procfs;
mod watch;

pub use procfs::{clean_name, parse_netlink_table, socket_inode};
pub use watch::{change_ports, spawn, spawn_filtered, watch_changes, Answer, Request, Spawned};

use procfs::NETLINK_ROUTE;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The port id of the kernel.
pub const KERNEL_PORT: u32 = 0;
/// Label for changes made by the kernel itself.
pub const KERNEL: &str = "kernel";
/// Label for a process that could not be found (gone before the lookup) or no notification.
pub const UNKNOWN: &str = crate::model::text::UNKNOWN_PROCESS;
/// Label for names beyond the cardinality cap.
pub const OTHER: &str = "other";
/// Distinct process names kept as label values; any further name is `other`.
pub const MAX_ACTORS: usize = 16;
/// Longest a full /proc scan may take before the rest is `unknown`.
const SCAN_BUDGET: Duration = Duration::from_millis(50);
/// Cached identities (socket inode → process); the cache is dropped when it grows past this.
const CACHE_MAX: usize = 4096;
/// Processes remembered as holders of sockets whose port id is not their pid.
const RECENT_HOLDERS: usize = 16;
/// The init process: it binds the sockets of socket-activated services (systemd-networkd's
/// netlink socket), which then make the changes.
const INIT: u32 = 1;

/// Caps the number of distinct actor label values: the first [`MAX_ACTORS`] names seen are kept,
/// later ones become `other`. `kernel`, `unknown` and `other` are always allowed.
#[derive(Clone, Debug)]
pub struct LabelCap {
    max: usize,
    seen: HashSet<String>,
}

impl Default for LabelCap {
    fn default() -> LabelCap {
        LabelCap::new(MAX_ACTORS)
    }
}

impl LabelCap {
    pub fn new(max: usize) -> LabelCap {
        LabelCap {
            max,
            seen: HashSet::new(),
        }
    }

    pub fn label(&mut self, name: &str) -> String {
        if matches!(name, KERNEL | UNKNOWN | OTHER) || self.seen.contains(name) {
            return name.to_string();
        }
        if self.seen.len() < self.max {
            self.seen.insert(name.to_string());
            return name.to_string();
        }
        OTHER.to_string()
    }
}

/// A process that made a change: its name and the names of its parent, grandparent… (init
/// excluded), as /proc showed them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub ancestors: Vec<String>,
}

impl Identity {
    /// A name with no known ancestors (`kernel`, `unknown`).
    pub fn named(name: &str) -> Identity {
        Identity {
            name: name.to_string(),
            ancestors: Vec::new(),
        }
    }

    fn of(proc_root: &Path, pid: u32) -> Option<Identity> {
        Some(Identity {
            name: procfs::read_comm(proc_root, pid)?,
            ancestors: procfs::ancestors(proc_root, pid),
        })
    }
}

/// What the watcher identified the moment a change was notified.
#[derive(Clone, Debug)]
pub struct Sighting {
    pub who: Identity,
    pub at: Instant,
}

/// Sightings by port id (see [`watch_changes`]).
pub type Sightings = Arc<Mutex<HashMap<u32, Sighting>>>;
/// How long a lookup waits for the watcher's sighting of a socket already gone.
const SIGHTING_WAIT: Duration = Duration::from_millis(5);
/// How long a sighting is trusted.
const SIGHTING_TTL: Duration = Duration::from_secs(10);

/// Resolves port ids to processes through /proc.
#[derive(Debug)]
pub struct Resolver {
    proc_root: PathBuf,
    cache: HashMap<u64, Identity>,
    sightings: Option<Sightings>,
    /// Processes that held a socket whose port id was not their pid, most recent first: looked
    /// at before every other process (a daemon that opens a socket per request).
    recent: Vec<u32>,
    scan_budget: Duration,
}

impl Default for Resolver {
    fn default() -> Resolver {
        Resolver::new("/proc")
    }
}

/// Sockets found: inode → (the pid holding it, who that is).
type Holders = HashMap<u64, (u32, Identity)>;

impl Resolver {
    pub fn new(proc_root: impl Into<PathBuf>) -> Resolver {
        Resolver {
            proc_root: proc_root.into(),
            cache: HashMap::new(),
            sightings: None,
            recent: Vec::new(),
            scan_budget: SCAN_BUDGET,
        }
    }

    /// Also uses the identities [`watch_changes`] saw.
    pub fn with_sightings(mut self, sightings: Sightings) -> Resolver {
        self.sightings = Some(sightings);
        self
    }

    /// Scans every process for at most `budget` per lookup.
    pub fn with_scan_budget(mut self, budget: Duration) -> Resolver {
        self.scan_budget = budget;
        self
    }

    /// The socket is gone: the watcher may be storing its sighting right now, in parallel. One
    /// `deadline` serves a whole lookup, so a burst of a thousand gone sockets (`ip rule flush`
    /// opens one per rule) waits once, not a thousand times.
    fn wait_for_sighting(&self, port: u32, deadline: Instant) -> Option<Identity> {
        self.sightings.as_ref()?;
        loop {
            if let Some(who) = self.sighting(port) {
                return Some(who);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn sighting(&self, port: u32) -> Option<Identity> {
        let s = self.sightings.as_ref()?.lock().ok()?;
        let x = s.get(&port)?;
        (x.at.elapsed() < SIGHTING_TTL).then(|| x.who.clone())
    }

    /// The process whose pid is `port`, if it may have bound it: a process's first netlink
    /// socket gets the process's pid as port id, *in the process's own pid namespace*. Not
    /// PID 1 (the port of a container's init — pid 1 in its namespace — or of a socket that
    /// init bound for a service), not a kernel thread (holds no user socket: the port is a pid
    /// of another namespace). Read without ptrace access.
    fn guess(&self, port: u32) -> Option<Identity> {
        if port <= INIT {
            return None;
        }
        if procfs::read_stat(&self.proc_root, port)?.kernel_thread {
            return None;
        }
        Identity::of(&self.proc_root, port)
    }

    /// The netlink socket table of the calling thread's network namespace.
    fn netlink_table(&self) -> HashMap<u32, u64> {
        for path in ["thread-self/net/netlink", "self/net/netlink"] {
            if let Ok(text) = std::fs::read_to_string(self.proc_root.join(path)) {
                return parse_netlink_table(&text, NETLINK_ROUTE);
            }
        }
        HashMap::new()
    }

    /// Whether any of `ports` (the kernel's aside) is still bound by an open NETLINK_ROUTE
    /// socket in the calling thread's namespace: its process may still be at work. Reads
    /// /proc/net/netlink only (no ptrace access needed). A port closed since may have been taken
    /// by another socket meanwhile; ports are pids or random, so that is rare, and costs only a
    /// longer wait.
    pub fn any_open(&self, ports: &[u32]) -> bool {
        let ports: Vec<u32> = ports
            .iter()
            .copied()
            .filter(|p| *p != KERNEL_PORT)
            .collect();
        if ports.is_empty() {
            return false;
        }
        let table = self.netlink_table();
        ports.iter().any(|p| table.contains_key(p))
    }

    /// Process names for port ids: `kernel` for 0, `unknown` when the socket or its process is
    /// gone (or the lookup ran out of time).
    pub fn resolve(&mut self, ports: &[u32]) -> HashMap<u32, String> {
        self.identify(ports)
            .into_iter()
            .map(|(port, who)| (port, who.name))
            .collect()
    }

    /// The processes behind port ids, with their ancestors (see [`Resolver::resolve`]).
    pub fn identify(&mut self, ports: &[u32]) -> HashMap<u32, Identity> {
        self.lookup(ports, true)
    }

    /// As [`Resolver::identify`], without waiting for sightings (the watcher's own lookup).
    pub fn identify_now(&mut self, ports: &[u32]) -> HashMap<u32, Identity> {
        self.lookup(ports, false)
    }

    fn lookup(&mut self, ports: &[u32], wait: bool) -> HashMap<u32, Identity> {
        let mut out: HashMap<u32, Identity> = HashMap::new();
        let mut wanted: HashMap<u64, Vec<u32>> = HashMap::new();
        let deadline = Instant::now() + if wait { SIGHTING_WAIT } else { Duration::ZERO };
        // A short-lived process (`ip rule del`) exits within a fraction of a millisecond of its
        // change: read the process behind the pid first, while it may still be there; it is
        // used only if nothing better is found.
        let guesses: HashMap<u32, Identity> = ports
            .iter()
            .filter(|p| **p != KERNEL_PORT)
            .filter_map(|p| Some((*p, self.guess(*p)?)))
            .collect();
        let table = if ports.iter().any(|p| *p != KERNEL_PORT) {
            self.netlink_table()
        } else {
            HashMap::new()
        };
        for &port in ports {
            if port == KERNEL_PORT {
                out.insert(port, Identity::named(KERNEL));
                continue;
            }
            match table.get(&port) {
                None => {
                    let who = self
                        .wait_for_sighting(port, deadline)
                        .or_else(|| guesses.get(&port).cloned());
                    out.insert(port, who.unwrap_or_else(|| Identity::named(UNKNOWN)));
                }
                Some(inode) => match self.cache.get(inode) {
                    Some(who) => {
                        out.insert(port, who.clone());
                    }
                    None => wanted.entry(*inode).or_default().push(port),
                },
            }
        }
        if wanted.is_empty() {
            return out;
        }
        let found = self.find_holders(&wanted);
        if self.cache.len() + found.len() > CACHE_MAX {
            self.cache.clear();
        }
        for (inode, ports) in wanted {
            let who = found.get(&inode).map(|(_, who)| who.clone());
            if let Some(w) = &who {
                self.cache.insert(inode, w.clone());
            }
            for port in ports {
                // Not found: no access to the holder's fds, or it exited between the table
                // read and the scan.
                let who = who
                    .clone()
                    .or_else(|| self.wait_for_sighting(port, deadline))
                    .or_else(|| guesses.get(&port).cloned());
                out.insert(port, who.unwrap_or_else(|| Identity::named(UNKNOWN)));
            }
        }
        out
    }

    /// Socket inode → the process holding it, for as many of the `wanted` sockets (inode → its
    /// port ids) as can be found. Looks first at the pids the port ids name, then at processes
    /// that held such sockets before, then at every process, newest first, for at most the scan
    /// budget. A socket held by init and by another process (socket activation: init bound it,
    /// the service uses it) is the other process's. A socket whose port id names a process
    /// whose fds the agent may not read is not searched for further: that process most likely
    /// holds it (its first socket), it stays the guess, and without the privilege the scan
    /// would mostly meet closed doors too.
    fn find_holders(&mut self, wanted: &HashMap<u64, Vec<u32>>) -> Holders {
        let mut found = Holders::new();
        let inodes: HashSet<u64> = wanted.keys().copied().collect();
        let ports: Vec<u32> = wanted.values().flatten().copied().collect();
        let mut closed: HashSet<u64> = HashSet::new();
        let mut looked: HashSet<u32> = HashSet::new();
        for (inode, ports) in wanted {
            for &pid in ports {
                // Port 1 is most often a container's init, not the node's: always searched.
                let denied =
                    looked.insert(pid) && self.scan_pid(pid, &inodes, &mut found) == Access::Denied;
                if denied && pid != INIT {
                    closed.insert(*inode);
                }
            }
        }
        let done = |found: &Holders| {
            inodes
                .iter()
                .all(|i| closed.contains(i) || found.get(i).is_some_and(|(pid, _)| *pid != INIT))
        };
        for pid in self.recent.clone() {
            if done(&found) {
                break;
            }
            if looked.insert(pid) {
                self.scan_pid(pid, &inodes, &mut found);
            }
        }
        if !done(&found) {
            let started = Instant::now();
            let pids: Vec<u32> = match std::fs::read_dir(&self.proc_root) {
                Ok(dir) => dir
                    .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .collect(),
                Err(_) => Vec::new(),
            };
            let last = std::fs::read_to_string(self.proc_root.join("sys/kernel/ns_last_pid"))
                .ok()
                .and_then(|t| t.trim().parse().ok());
            for pid in newest_first(pids, last) {
                if done(&found) || started.elapsed() > self.scan_budget {
                    break;
                }
                if looked.insert(pid) {
                    self.scan_pid(pid, &inodes, &mut found);
                }
            }
        }
        for (pid, _) in found.values() {
            if !ports.contains(pid) && *pid != INIT {
                self.recent.retain(|p| p != pid);
                self.recent.insert(0, *pid);
                self.recent.truncate(RECENT_HOLDERS);
            }
        }
        found
    }

    /// Records which of `inodes` process `pid` holds.
    fn scan_pid(&self, pid: u32, inodes: &HashSet<u64>, found: &mut Holders) -> Access {
        let dir = self.proc_root.join(pid.to_string());
        let fds = match std::fs::read_dir(dir.join("fd")) {
            Ok(fds) => fds,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return Access::Denied,
            Err(_) => return Access::Gone,
        };
        let mut mine = Vec::new();
        let mut denied = false;
        for fd in fds.flatten() {
            match std::fs::read_link(fd.path()) {
                Ok(link) => {
                    if let Some(inode) = link.to_str().and_then(socket_inode) {
                        let better = found.get(&inode).is_none_or(|(p, _)| *p == INIT);
                        if inodes.contains(&inode) && better && !mine.contains(&inode) {
                            mine.push(inode);
                        }
                    }
                }
                Err(e) => denied |= e.kind() == std::io::ErrorKind::PermissionDenied,
            }
        }
        if !mine.is_empty() {
            let who =
                Identity::of(&self.proc_root, pid).unwrap_or_else(|| Identity::named(UNKNOWN));
            for inode in mine {
                if pid != INIT || !found.contains_key(&inode) {
                    found.insert(inode, (pid, who.clone()));
                }
            }
        }
        if denied {
            Access::Denied
        } else {
            Access::Read
        }
    }
}

/// Pids in the order they were probably created, newest first: the changer is likely a recent,
/// short-lived process. Pids are handed out upwards from the last one (`last`, from
/// /proc/sys/kernel/ns_last_pid) and wrap around at pid_max, which a busy node reaches within
/// hours: the pids at or below the last one come first, then those above it.
fn newest_first(mut pids: Vec<u32>, last: Option<u32>) -> Vec<u32> {
    let last = last.unwrap_or(u32::MAX);
    pids.sort_unstable_by_key(|p| (*p > last, std::cmp::Reverse(*p)));
    pids
}

/// Whether a process's fds could be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    Read,
    /// No ptrace access (or no permission on its fd directory).
    Denied,
    /// No such process.
    Gone,
}

/// Names of the parent, grandparent… of process `pid` (at most four, init excluded), from
/// /proc (no ptrace access needed); empty when it is already gone.
pub fn ancestors(pid: u32) -> Vec<String> {
    procfs::ancestors(Path::new("/proc"), pid)
}

/// Checks that the calling thread's /proc view of netlink sockets is its own network namespace:
/// opens a NETLINK_ROUTE socket, lets the kernel pick its port, and looks for that port with the
/// socket's inode in /proc/thread-self/net/netlink.
pub fn check_namespace_view() -> Result<(), String> {
    use nix::sys::socket::{
        bind, getsockname, socket, AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType,
    };
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )
    .map_err(|e| format!("cannot open a netlink socket: {e}"))?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(|e| format!("cannot bind: {e}"))?;
    let addr: NetlinkAddr = getsockname(fd.as_raw_fd()).map_err(|e| format!("getsockname: {e}"))?;
    let inode = nix::sys::stat::fstat(&fd)
        .map_err(|e| format!("fstat: {e}"))?
        .st_ino;
    let table = Resolver::default().netlink_table();
    match table.get(&addr.pid()) {
        Some(&i) if i == inode => Ok(()),
        Some(_) => Err(format!(
            "port {} belongs to another socket in /proc/thread-self/net/netlink",
            addr.pid()
        )),
        None => Err(format!(
            "port {} is not listed in /proc/thread-self/net/netlink ({} sockets listed)",
            addr.pid(),
            table.len()
        )),
    }
}

#[cfg(test)]
mod tests;
