//! Who changed it: an rtnetlink notification's header carries the port id of the socket that
//! made the change. /proc/net/netlink maps the port id to the socket's inode, and a /proc/PID/fd
//! link `socket:[INODE]` to the process that holds it; /proc/PID/comm names it. Port 0 is the
//! kernel itself (a link went down, an address went away).
//!
//! /proc/net/netlink lists the sockets of the *reading thread's* network namespace. The agent
//! enters its namespace with setns before it starts any thread, so every thread, and the lookup
//! thread here, sees the agent's namespace through /proc/thread-self/net/netlink;
//! [`check_namespace_view`] verifies that at start with a socket of its own.
//!
//! The lookup runs on its own thread, after the repair was sent, so it never delays a repair;
//! names are cached by socket inode. A short-lived process (`ip rule del`) may be gone before the
//! lookup: it is then `unknown`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The port id of the kernel.
pub const KERNEL_PORT: u32 = 0;
/// Label for changes made by the kernel itself.
pub const KERNEL: &str = "kernel";
/// Label for a process that could not be found (gone before the lookup) or no notification.
pub const UNKNOWN: &str = "unknown";
/// Label for names beyond the cardinality cap.
pub const OTHER: &str = "other";
/// Distinct process names kept as label values; any further name is `other`.
pub const MAX_ACTORS: usize = 16;
/// Longest a full /proc scan may take before the rest is `unknown`.
const SCAN_BUDGET: Duration = Duration::from_millis(50);
/// Cached names (socket inode → name); the cache is dropped when it grows past this.
const CACHE_MAX: usize = 4096;
/// NETLINK_ROUTE, in /proc/net/netlink's `Eth` column.
const NETLINK_ROUTE: u32 = 0;

/// Port id → socket inode for one netlink protocol, from the text of /proc/net/netlink:
///
/// ```text
/// sk               Eth Pid        Groups   Rmem     Wmem     Dump  Locks    Drops    Inode
/// 00000000a1b2c3d4 0   1234       00000000 0        0        0     2        0        56789
/// ```
///
/// Columns are found by their header names; malformed lines are skipped.
pub fn parse_netlink_table(text: &str, protocol: u32) -> HashMap<u32, u64> {
    let mut lines = text.lines();
    let Some(header) = lines.next() else {
        return HashMap::new();
    };
    let cols: Vec<&str> = header.split_whitespace().collect();
    let find = |name: &str| cols.iter().position(|c| c.eq_ignore_ascii_case(name));
    let (Some(eth), Some(pid), Some(inode)) = (find("Eth"), find("Pid"), find("Inode")) else {
        return HashMap::new();
    };
    let mut table = HashMap::new();
    for line in lines {
        let f: Vec<&str> = line.split_whitespace().collect();
        let get = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok());
        if let (Some(e), Some(p), Some(n)) = (get(eth), get(pid), get(inode)) {
            if e == u64::from(protocol) && p <= u64::from(u32::MAX) && n != 0 {
                table.insert(p as u32, n);
            }
        }
    }
    table
}

/// The inode of a `socket:[INODE]` fd link.
pub fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// A process name fit for logs and label values: printable, at most 15 bytes (the kernel's
/// TASK_COMM_LEN - 1), never empty.
pub fn clean_name(comm: &str) -> String {
    let name: String = comm
        .trim_end_matches('\n')
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(15)
        .collect();
    if name.is_empty() {
        UNKNOWN.to_string()
    } else {
        name
    }
}

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

/// Names read the moment a change was notified, by port id (see [`watch_changes`]).
pub type Sightings = Arc<Mutex<HashMap<u32, (String, Instant)>>>;
/// How long a lookup waits for the watcher's sighting of a socket already gone.
const SIGHTING_WAIT: Duration = Duration::from_millis(5);
/// How long a sighting is trusted.
const SIGHTING_TTL: Duration = Duration::from_secs(10);

/// Resolves port ids to process names through /proc.
#[derive(Debug)]
pub struct Resolver {
    proc_root: PathBuf,
    cache: HashMap<u64, String>,
    sightings: Option<Sightings>,
}

impl Default for Resolver {
    fn default() -> Resolver {
        Resolver::new("/proc")
    }
}

impl Resolver {
    pub fn new(proc_root: impl Into<PathBuf>) -> Resolver {
        Resolver {
            proc_root: proc_root.into(),
            cache: HashMap::new(),
            sightings: None,
        }
    }

    /// Also uses the names [`watch_changes`] saw.
    pub fn with_sightings(mut self, sightings: Sightings) -> Resolver {
        self.sightings = Some(sightings);
        self
    }

    /// The socket is gone: the watcher may be storing its sighting right now, in parallel. One
    /// `deadline` serves a whole lookup, so a burst of a thousand gone sockets (`ip rule flush`
    /// opens one per rule) waits once, not a thousand times.
    fn wait_for_sighting(&self, port: u32, deadline: Instant) -> Option<String> {
        self.sightings.as_ref()?;
        loop {
            if let Some(name) = self.sighting(port) {
                return Some(name);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn sighting(&self, port: u32) -> Option<String> {
        let s = self.sightings.as_ref()?.lock().ok()?;
        let (name, at) = s.get(&port)?;
        (at.elapsed() < SIGHTING_TTL).then(|| name.clone())
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

    /// Process names for port ids: `kernel` for 0, `unknown` when the socket or its process is
    /// gone (or the lookup ran out of time).
    pub fn resolve(&mut self, ports: &[u32]) -> HashMap<u32, String> {
        let mut out: HashMap<u32, String> = HashMap::new();
        let mut wanted: HashMap<u64, Vec<u32>> = HashMap::new();
        let deadline = Instant::now() + SIGHTING_WAIT;
        // A process's first netlink socket gets its pid as port id. A short-lived process (`ip
        // rule del`) exits within a fraction of a millisecond of its change: read the name
        // behind the pid first, while it may still be there; it is used only if the socket is
        // gone by the time the table is read (the process closed it or exited).
        let early: HashMap<u32, String> = ports
            .iter()
            .filter(|p| **p != KERNEL_PORT)
            .filter_map(|p| Some((*p, read_comm(&self.proc_root.join(p.to_string()))?)))
            .collect();
        let table = if ports.iter().any(|p| *p != KERNEL_PORT) {
            self.netlink_table()
        } else {
            HashMap::new()
        };
        for &port in ports {
            if port == KERNEL_PORT {
                out.insert(port, KERNEL.to_string());
                continue;
            }
            match table.get(&port) {
                None => {
                    let name = self
                        .wait_for_sighting(port, deadline)
                        .or_else(|| early.get(&port).cloned());
                    out.insert(port, name.unwrap_or_else(|| UNKNOWN.to_string()));
                }
                Some(inode) => match self.cache.get(inode) {
                    Some(name) => {
                        out.insert(port, name.clone());
                    }
                    None => wanted.entry(*inode).or_default().push(port),
                },
            }
        }
        if !wanted.is_empty() {
            // The first socket a process binds gets its pid as port id: look there first.
            let hints: Vec<u32> = wanted.values().flatten().copied().collect();
            let found = self.find_owners(&wanted.keys().copied().collect(), &hints);
            if self.cache.len() + found.len() > CACHE_MAX {
                self.cache.clear();
            }
            for (inode, ports) in wanted {
                let name = found.get(&inode).cloned();
                if let Some(n) = &name {
                    self.cache.insert(inode, n.clone());
                }
                for port in ports {
                    // Not found: the process exited between the table read and the scan.
                    let name = name
                        .clone()
                        .or_else(|| self.wait_for_sighting(port, deadline))
                        .or_else(|| early.get(&port).cloned());
                    out.insert(port, name.unwrap_or_else(|| UNKNOWN.to_string()));
                }
            }
        }
        out
    }

    /// Socket inode → name of the process holding it, for as many of `inodes` as can be found.
    fn find_owners(&self, inodes: &HashSet<u64>, hints: &[u32]) -> HashMap<u64, String> {
        let mut found = HashMap::new();
        for &pid in hints {
            self.scan_pid(pid, inodes, &mut found);
        }
        if found.len() == inodes.len() {
            return found;
        }
        let started = Instant::now();
        let mut pids: Vec<u32> = match std::fs::read_dir(&self.proc_root) {
            Ok(dir) => dir
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect(),
            Err(_) => return found,
        };
        // Newest first: the changer is likely a recent, short-lived process.
        pids.sort_unstable_by(|a, b| b.cmp(a));
        for pid in pids {
            if found.len() == inodes.len() || started.elapsed() > SCAN_BUDGET {
                break;
            }
            if !hints.contains(&pid) {
                self.scan_pid(pid, inodes, &mut found);
            }
        }
        found
    }

    fn scan_pid(&self, pid: u32, inodes: &HashSet<u64>, found: &mut HashMap<u64, String>) {
        let dir = self.proc_root.join(pid.to_string());
        let Ok(fds) = std::fs::read_dir(dir.join("fd")) else {
            return;
        };
        let mut mine = Vec::new();
        for fd in fds.flatten() {
            if let Ok(link) = std::fs::read_link(fd.path()) {
                if let Some(inode) = link.to_str().and_then(socket_inode) {
                    if inodes.contains(&inode) && !found.contains_key(&inode) {
                        mine.push(inode);
                    }
                }
            }
        }
        if mine.is_empty() {
            return;
        }
        let name = read_comm(&dir).unwrap_or_else(|| UNKNOWN.to_string());
        for inode in mine {
            found.insert(inode, name.clone());
        }
    }
}

fn read_comm(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join("comm"))
        .ok()
        .map(|c| clean_name(&c))
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

/// rtnetlink groups whose changes are watched: IPv4/IPv6 addresses, routes and rules. The loop
/// adds neighbour entries while some are protected (see `EventFilter::set_membership`): their
/// notifications name the changer for `ip neigh`-made changes; the kernel's own cache updates
/// have port 0 and are skipped at once.
const CHANGE_GROUPS: u32 = (1 << 4) | (1 << 6) | (1 << 7) | (1 << 8) | (1 << 10) | (1 << 18);
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_NEWNEIGH: u16 = 28;
const RTM_DELNEIGH: u16 = 29;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
/// A port sighted this recently is not looked up again.
const SIGHTING_FRESH: Duration = Duration::from_secs(1);

/// Port ids of the changes (additions, replacements, removals of addresses, routes and rules) in
/// a buffer of netlink messages.
pub fn change_ports(buf: &[u8]) -> Vec<u32> {
    let mut ports = Vec::new();
    let mut off = 0;
    while off + 16 <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap_or_default()) as usize;
        let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap_or_default());
        let port = u32::from_ne_bytes(buf[off + 12..off + 16].try_into().unwrap_or_default());
        if len < 16 {
            break;
        }
        let change = matches!(
            ty,
            RTM_NEWADDR
                | RTM_DELADDR
                | RTM_NEWROUTE
                | RTM_DELROUTE
                | RTM_NEWRULE
                | RTM_DELRULE
                | RTM_NEWNEIGH
                | RTM_DELNEIGH
        );
        if change && port != KERNEL_PORT {
            ports.push(port);
        }
        off += (len + 3) & !3;
    }
    ports
}

/// Watches changes on a socket of its own, on its own thread, and reads the name behind each
/// changer's port id at once, in parallel with the repair: a short-lived `ip rule del` is
/// usually gone by the time the repair is acknowledged, and this is the earliest moment it can
/// be seen. Best effort: a lost or late sighting leaves the lookup to [`Resolver`].
/// Returns the socket's filter: route notifications of foreign tables need no sighting (their
/// changes are never reported), and on a host with a churning big table they were most of this
/// thread's work.
pub fn watch_changes(
    sightings: Sightings,
    own_port: Option<u32>,
) -> std::io::Result<crate::observe::kernel::EventFilter> {
    use nix::sys::socket::{
        bind, recvmmsg, setsockopt, socket, sockopt, AddressFamily, MsgFlags, MultiHeaders,
        NetlinkAddr, SockFlag, SockProtocol, SockType,
    };
    use std::io::IoSliceMut;
    use std::os::fd::AsRawFd;
    /// Notification headers read per system call.
    const HEADERS: usize = 64;
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    let _ = setsockopt(&fd, sockopt::RcvBuf, &(4 << 20));
    if let Some(port) = own_port {
        // The agent's own repairs need no name; in a mass repair they would be half the traffic.
        use std::os::fd::AsFd;
        let _ = crate::observe::kernel::ignore_own_changes(fd.as_fd(), port);
    }
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, CHANGE_GROUPS))?;
    let filter = crate::observe::kernel::EventFilter::new(fd.try_clone()?, own_port);
    std::thread::Builder::new()
        .name("nw-sightings".into())
        .spawn(move || {
            // Not lowered: it must read the name before a short-lived process is gone.
            let proc_root = Path::new("/proc");
            // Only the 16-byte header of each notification is read (the rest of the datagram
            // is discarded by the kernel, MSG_TRUNC), up to HEADERS of them per system call: a
            // mass deletion sends tens of thousands, and this thread reading each in full, one
            // recv at a time, cost a tenth of the agent's CPU in a mass repair. Notifications
            // carry one message per datagram, so the header is the whole story.
            let mut heads = [[0u8; 16]; HEADERS];
            let mut headers = MultiHeaders::<()>::preallocate(HEADERS, None);
            let mut ports: Vec<u32> = Vec::with_capacity(HEADERS);
            loop {
                ports.clear();
                {
                    let mut slices: Vec<[IoSliceMut; 1]> =
                        heads.iter_mut().map(|h| [IoSliceMut::new(h)]).collect();
                    match recvmmsg(
                        fd.as_raw_fd(),
                        &mut headers,
                        slices.iter_mut(),
                        MsgFlags::MSG_WAITFORONE,
                        None,
                    ) {
                        Ok(results) => {
                            for r in results {
                                if let Some(head) = r.iovs().next() {
                                    ports.extend(change_ports(head));
                                }
                            }
                        }
                        // ENOBUFS: sightings were lost; the resolver still looks later.
                        Err(nix::errno::Errno::ENOBUFS | nix::errno::Errno::EINTR) => continue,
                        Err(_) => return,
                    }
                }
                let mut seen: Vec<(u32, String)> = Vec::new();
                let fresh: Vec<u32> = {
                    let Ok(s) = sightings.lock() else { return };
                    let now = Instant::now();
                    ports
                        .iter()
                        .copied()
                        .filter(|p| {
                            s.get(p)
                                .is_none_or(|(_, at)| now.duration_since(*at) >= SIGHTING_FRESH)
                        })
                        .collect()
                };
                for port in fresh {
                    if seen.iter().any(|(p, _)| *p == port) {
                        continue;
                    }
                    if let Some(name) = read_comm(&proc_root.join(port.to_string())) {
                        seen.push((port, name));
                    }
                }
                if seen.is_empty() {
                    continue;
                }
                let now = Instant::now();
                let Ok(mut s) = sightings.lock() else { return };
                if s.len() > 1024 {
                    s.retain(|_, (_, at)| now.duration_since(*at) < SIGHTING_TTL);
                }
                for (port, name) in seen {
                    s.insert(port, (name, now));
                }
            }
        })?;
    Ok(filter)
}

/// Lowers the calling thread's scheduling priority (nice 10): on a busy node the attribution
/// threads yield the CPU to the reconcile loop, which does the repairs.
fn lower_priority() {
    // SAFETY: plain syscalls on the calling thread; setpriority with a thread id affects only
    // that thread on Linux.
    unsafe {
        let tid = nix::libc::gettid();
        nix::libc::setpriority(nix::libc::PRIO_PROCESS, tid as nix::libc::id_t, 10);
    }
}

/// A lookup on the attribution thread.
#[derive(Debug)]
pub struct Request {
    pub id: u64,
    pub ports: Vec<u32>,
}

/// Its answer: port id → process name (not yet capped as a label).
#[derive(Debug)]
pub struct Answer {
    pub id: u64,
    pub names: HashMap<u32, String>,
}

/// Starts the attribution thread (in the calling thread's network namespace). Requests go in
/// through the returned sender; answers come out through `answers`.
pub fn spawn(
    answers: tokio::sync::mpsc::UnboundedSender<Answer>,
    own_port: Option<u32>,
) -> std::io::Result<std::sync::mpsc::Sender<Request>> {
    spawn_filtered(answers, own_port).map(|(tx, _)| tx)
}

/// [`spawn`], also returning the filter of the socket that watches changes (none if it could not
/// be opened), to narrow it to the route tables of interest.
pub fn spawn_filtered(
    answers: tokio::sync::mpsc::UnboundedSender<Answer>,
    own_port: Option<u32>,
) -> std::io::Result<(
    std::sync::mpsc::Sender<Request>,
    Option<crate::observe::kernel::EventFilter>,
)> {
    let (tx, rx) = std::sync::mpsc::channel::<Request>();
    let sightings: Sightings = Arc::default();
    let mut resolver = Resolver::default();
    let filter = match watch_changes(sightings.clone(), own_port) {
        Ok(filter) => {
            resolver = resolver.with_sightings(sightings);
            Some(filter)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch changes as they happen");
            None
        }
    };
    std::thread::Builder::new()
        .name("nw-attribution".into())
        .spawn(move || {
            lower_priority();
            if let Err(e) = check_namespace_view() {
                tracing::warn!(error = %e, "attribution of changes to processes may be wrong");
            }
            // Requests that queued up while a lookup ran are looked up together: during a mass
            // repair there is one per batch of events, and each lookup reads the whole netlink
            // socket table and may wait for sightings.
            while let Ok(first) = rx.recv() {
                let mut requests = vec![first];
                requests.extend(rx.try_iter());
                let mut ports: Vec<u32> = requests
                    .iter()
                    .flat_map(|r| r.ports.iter().copied())
                    .collect();
                ports.sort_unstable();
                ports.dedup();
                let names = resolver.resolve(&ports);
                for req in requests {
                    let mine = req
                        .ports
                        .iter()
                        .filter_map(|p| Some((*p, names.get(p)?.clone())))
                        .collect();
                    if answers
                        .send(Answer {
                            id: req.id,
                            names: mine,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
            }
        })?;
    Ok((tx, filter))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
sk               Eth Pid        Groups   Rmem     Wmem     Dump  Locks    Drops    Inode
ffff8f0a4a6b3800 0   0          00000000 0        0        0     2        0        12
ffff8f0a4a6b4000 0   4242       000c07d1 0        0        0     2        0        98765
ffff8f0a4a6b4800 9   4242       00000001 0        0        0     2        0        98766
ffff8f0a4a6b5000 0   -2147483641 00000000 0       0        0     2        0        98767
ffff8f0a4a6b5800 0   3221225472 00000000 0        0        0     2        0        98768
garbage line
ffff8f0a4a6b6000 0   77
";

    #[test]
    fn netlink_table_maps_route_ports_to_inodes() {
        let t = parse_netlink_table(TABLE, NETLINK_ROUTE);
        assert_eq!(
            t.get(&4242),
            Some(&98765),
            "the audit socket (Eth 9) is not a route socket"
        );
        assert_eq!(t.get(&0), Some(&12));
        assert_eq!(t.get(&3221225472), Some(&98768), "large port ids");
        assert_eq!(t.len(), 3, "{t:?}");
        assert_eq!(parse_netlink_table(TABLE, 9).get(&4242), Some(&98766));
        assert!(parse_netlink_table("", 0).is_empty());
        assert!(parse_netlink_table("no header here\n1 2 3", 0).is_empty());
    }

    #[test]
    fn socket_links_and_names() {
        assert_eq!(socket_inode("socket:[98765]"), Some(98765));
        assert_eq!(socket_inode("pipe:[98765]"), None);
        assert_eq!(socket_inode("socket:[x]"), None);
        assert_eq!(clean_name("ip\n"), "ip");
        assert_eq!(clean_name("a\tb"), "a?b");
        assert_eq!(clean_name("a-very-long-process-name"), "a-very-long-pro");
        assert_eq!(clean_name("\n"), UNKNOWN);
    }

    #[test]
    fn label_cap_folds_late_names_into_other() {
        let mut cap = LabelCap::new(2);
        assert_eq!(cap.label("ip"), "ip");
        assert_eq!(cap.label("python3"), "python3");
        assert_eq!(cap.label("networkd"), OTHER);
        assert_eq!(cap.label("ip"), "ip", "known names stay");
        assert_eq!(cap.label(KERNEL), KERNEL);
        assert_eq!(cap.label(UNKNOWN), UNKNOWN);
    }

    /// A fake /proc: the port's socket held by pid 4242 (`ip`), another by pid 10 (`fighter`).
    fn fake_proc() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("thread-self/net")).unwrap();
        std::fs::write(
            root.join("thread-self/net/netlink"),
            "sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode\n\
             1 0 4242 0 0 0 0 2 0 98765\n\
             2 0 -5 0 0 0 0 2 0 555\n",
        )
        .unwrap();
        for (pid, comm, inode) in [(4242, "ip", 98765), (10, "fighter", 555), (11, "bash", 1)] {
            let p = root.join(pid.to_string());
            std::fs::create_dir_all(p.join("fd")).unwrap();
            std::fs::write(p.join("comm"), format!("{comm}\n")).unwrap();
            std::os::unix::fs::symlink(format!("socket:[{inode}]"), p.join("fd/3")).unwrap();
            std::os::unix::fs::symlink("/dev/null", p.join("fd/0")).unwrap();
        }
        dir
    }

    #[test]
    fn resolver_finds_owners_and_caches_them() {
        let dir = fake_proc();
        let mut r = Resolver::new(dir.path());
        // Port 4294967291 is -5 as printed by an old kernel: parsed as i32 text, so not listed.
        let names = r.resolve(&[4242, 0, 999]);
        assert_eq!(names[&4242], "ip");
        assert_eq!(names[&0], KERNEL);
        assert_eq!(names[&999], UNKNOWN, "a socket that is gone");
        // A socket that is gone, but the process whose pid is its port id was seen.
        assert_eq!(r.resolve(&[10])[&10], "fighter");
        assert_eq!(r.cache.get(&98765).map(String::as_str), Some("ip"));
        // The process exits but its socket is still listed (cached by inode).
        std::fs::remove_dir_all(dir.path().join("4242")).unwrap();
        assert_eq!(r.resolve(&[4242])[&4242], "ip");
    }

    #[test]
    fn resolver_scans_every_process_when_the_port_is_not_a_pid() {
        let dir = fake_proc();
        std::fs::write(
            dir.path().join("thread-self/net/netlink"),
            "sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode\n1 0 3000000000 0 0 0 0 2 0 555\n",
        )
        .unwrap();
        let mut r = Resolver::new(dir.path());
        assert_eq!(r.resolve(&[3000000000])[&3000000000], "fighter");
    }

    #[test]
    fn change_ports_are_read_from_message_headers() {
        let msg = |len: u32, ty: u16, port: u32| {
            let mut m = Vec::new();
            m.extend_from_slice(&len.to_ne_bytes());
            m.extend_from_slice(&ty.to_ne_bytes());
            m.extend_from_slice(&0u16.to_ne_bytes());
            m.extend_from_slice(&0u32.to_ne_bytes());
            m.extend_from_slice(&port.to_ne_bytes());
            m.resize(((len + 3) & !3) as usize, 0);
            m
        };
        let mut buf = msg(20, RTM_DELRULE, 4242);
        buf.extend(msg(16, RTM_NEWRULE, 7));
        buf.extend(msg(18, RTM_DELROUTE, 0));
        buf.extend(msg(16, 16 /* RTM_NEWLINK */, 8));
        buf.extend(msg(16, RTM_DELADDR, 99));
        buf.extend([1, 2, 3]);
        assert_eq!(change_ports(&buf), [4242, 7, 99]);
        assert!(change_ports(&msg(8, RTM_DELRULE, 1)[..8]).is_empty());
        assert!(
            change_ports(&[0u8; 32]).is_empty(),
            "a zero length stops the walk"
        );
    }

    #[test]
    fn this_thread_sees_its_own_namespace() {
        // Read-only: opens a socket and reads /proc; fine in any namespace.
        check_namespace_view().unwrap();
    }

    #[test]
    fn resolves_a_live_socket_of_this_process() {
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
        .unwrap();
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).unwrap();
        let addr: NetlinkAddr = getsockname(fd.as_raw_fd()).unwrap();
        let me = clean_name(&std::fs::read_to_string("/proc/self/comm").unwrap());
        let names = Resolver::default().resolve(&[addr.pid()]);
        assert_eq!(names[&addr.pid()], me);
    }
}
