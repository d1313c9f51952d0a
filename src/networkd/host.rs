//! Reading a node for `netwarden networkd`: networkd's files below a root directory (`/` on the
//! node; `/host` when the node's root is mounted there; `/proc/PID/root` for another mount
//! namespace), its processes in this network namespace, and the links, addresses, rules and
//! protected routes the kernel holds now. Changes nothing.

use super::config::{self, LinkFacts, Tree};
use super::predict::{Kernel, Present};
use super::report::{self, LinkState, Report, Running};
use crate::desired::DesiredState;
use crate::model::Family;
use crate::model::ObjectId;
use crate::observe::kernel::{self, ObserveError};
use crate::observe::{Mirror, RouteInterest};
use futures::TryStreamExt;
use rtnetlink::packet_route::link::{LinkAttribute, LinkInfo, LinkMessage, Prop};
use std::path::{Path, PathBuf};

/// The process name the kernel gives systemd-networkd (15 characters).
pub const COMM: &str = "systemd-network";

/// networkd's files below a root directory.
pub struct RootTree {
    root: PathBuf,
}

impl RootTree {
    pub fn new(root: impl Into<PathBuf>) -> RootTree {
        RootTree { root: root.into() }
    }

    fn at(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }
}

/// A file's content; `None` for an empty file or one that is (a link to) /dev/null: a mask.
fn content(path: &Path) -> Option<String> {
    if std::fs::read_link(path).is_ok_and(|t| t == Path::new("/dev/null")) {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    (!text.is_empty()).then_some(text)
}

impl Tree for RootTree {
    fn list(&self, dir: &str) -> Vec<(String, Option<String>)> {
        let Ok(entries) = std::fs::read_dir(self.at(dir)) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let path = e.path();
            let masked = std::fs::read_link(&path).is_ok_and(|t| t == Path::new("/dev/null"));
            // A symlink is followed (to a file); a directory is not a file.
            if !masked && !path.is_file() {
                continue;
            }
            out.push((e.file_name().to_string_lossy().into_owned(), content(&path)));
        }
        out
    }

    fn read(&self, path: &str) -> Option<String> {
        content(&self.at(path))
    }
}

/// networkd's processes in the calling thread's network namespace (another namespace's networkd
/// manages other links). A process whose namespace cannot be read (no CAP_SYS_PTRACE, as in the
/// DaemonSet, where the agent shares the node's namespace anyway) counts.
pub fn networkd_pids(proc_root: &Path) -> Vec<u32> {
    let ns = |p: &Path| std::fs::read_link(p.join("ns/net")).ok();
    let Some(mine) = ns(&proc_root.join("thread-self")) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let dir = proc_root.join(pid.to_string());
            std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim_end() == COMM)
                && ns(&dir).is_none_or(|theirs| theirs == mine)
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// What networkd's state files (below `root`) say of each link.
fn link_states(root: &Path, links: &[LinkFacts]) -> Vec<LinkState> {
    let mut out = Vec::new();
    for l in links {
        let path = root.join(format!("run/systemd/netif/links/{}", l.index));
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        let get = |k: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(k))
                .map(str::to_string)
        };
        out.push(LinkState {
            link: l.name.clone(),
            state: get("ADMIN_STATE=").unwrap_or_default(),
            network: get("NETWORK_FILE="),
        });
    }
    out
}

/// `Type=` as networkd computes it: udev's DEVTYPE, else the ARPHRD name in lower case.
fn iftype(root: &Path, link: (&str, u32), arphrd: u16) -> Option<String> {
    if let Some(t) = sysfs_devtype(root, link) {
        return Some(t);
    }
    Some(
        match arphrd {
            1 => "ether",
            32 => "infiniband",
            512 => "ppp",
            768 => "tunnel",
            769 => "tunnel6",
            772 => "loopback",
            776 => "sit",
            778 => "ipgre",
            823 => "ip6gre",
            801 => "ieee80211",
            65534 => "none",
            _ => return None,
        }
        .to_string(),
    )
}

/// The link's DEVTYPE in sysfs: below `root`, else in this process's own /sys. In the agent's
/// pod the node's root is mounted at /host without its /sys, and the container's own sysfs,
/// mounted in the node's network namespace (hostNetwork), shows the node's links; without it a
/// bridge or VLAN would count as `ether` and match a wired-NIC .network it does not match.
/// A uevent of another link of that name (a sysfs of another namespace) is not taken.
fn sysfs_devtype(root: &Path, (name, index): (&str, u32)) -> Option<String> {
    let own = Path::new("/");
    let roots: &[&Path] = if root == own { &[own] } else { &[root, own] };
    roots.iter().find_map(|r| {
        let text = std::fs::read_to_string(r.join(format!("sys/class/net/{name}/uevent"))).ok()?;
        devtype_of(&text, index)
    })?
}

/// DEVTYPE in a link's uevent text (`Some(None)`: none), if the text is of the link `index`.
fn devtype_of(uevent: &str, index: u32) -> Option<Option<String>> {
    let value = |k: &str| uevent.lines().find_map(|l| l.strip_prefix(k));
    if value("IFINDEX=").is_some_and(|i| i.trim().parse() != Ok(index)) {
        return None;
    }
    Some(
        value("DEVTYPE=")
            .filter(|t| !t.is_empty())
            .map(str::to_string),
    )
}

/// The driver, as `ethtool -i` (SIOCETHTOOL, ETHTOOL_GDRVINFO) reports it.
fn driver(name: &str) -> Option<String> {
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        data: *mut DrvInfo,
        pad: [u8; 16],
    }
    const SIOCETHTOOL: nix::libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 3;
    if name.len() >= 16 {
        return None;
    }
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .ok()?;
    // SAFETY: zeroed plain-old-data structs; the kernel writes at most sizeof(DrvInfo) into
    // `info`, which lives until after the call.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut req = IfReq {
        name: [0; 16],
        data: &mut info,
        pad: [0; 16],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: a valid socket and a valid ifreq pointing at a valid ethtool_drvinfo.
    let r = unsafe { nix::libc::ioctl(fd.as_raw_fd(), SIOCETHTOOL as _, &mut req) };
    if r != 0 {
        return None;
    }
    let end = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
    let d = String::from_utf8_lossy(&info.driver[..end]).into_owned();
    (!d.is_empty()).then_some(d)
}

fn mac(bytes: &[u8]) -> Option<String> {
    (bytes.len() == 6).then(|| {
        bytes
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    })
}

fn link_facts(root: &Path, m: &LinkMessage) -> LinkFacts {
    let mut f = LinkFacts {
        index: m.header.index,
        loopback: m
            .header
            .flags
            .contains(rtnetlink::packet_route::link::LinkFlags::Loopback),
        ..LinkFacts::default()
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => f.name = n.clone(),
            LinkAttribute::Address(b) => f.mac = mac(b),
            LinkAttribute::PermAddress(b) => f.permanent_mac = mac(b),
            LinkAttribute::PropList(props) => {
                for p in props {
                    if let Prop::AltIfName(n) = p {
                        f.altnames.push(n.clone());
                    }
                }
            }
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        f.kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    f.iftype = iftype(
        root,
        (&f.name, f.index),
        u16::from(m.header.link_layer_type),
    );
    f.driver = driver(&f.name);
    f
}

/// What the kernel holds: the links (for `[Match]`), every address, and the protected objects
/// present (and how many are missing).
pub async fn kernel(
    root: &Path,
    desired: &DesiredState,
) -> Result<(Kernel, Vec<Present>, usize), ObserveError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(ObserveError::Socket)?;
    tokio::spawn(connection);
    let messages: Vec<LinkMessage> =
        handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| ObserveError::Dump {
                what: "links",
                source: std::io::Error::other(e.to_string()),
            })?;
    let links: Vec<LinkFacts> = messages.iter().map(|m| link_facts(root, m)).collect();
    let mut h = kernel::connect()?;
    let mut mirror = Mirror::new(RouteInterest::Keys(
        desired.routes.keys().cloned().collect(),
    ));
    kernel::dump_all(&mut h, &mut mirror).await?;
    let addresses = mirror
        .addresses
        .iter()
        .map(|(k, a)| (k.ifindex, k.address, a.clone()))
        .collect();
    let (present, missing) = present(desired, &mirror);
    Ok((Kernel { links, addresses }, present, missing))
}

/// The protected objects the mirror holds, and how many it does not.
fn present(desired: &DesiredState, m: &Mirror) -> (Vec<Present>, usize) {
    let mut out = Vec::new();
    let mut missing = 0;
    for (key, r) in &desired.rules {
        match m.rules.get(key).and_then(|p| p.first()) {
            Some(protocol) => out.push(Present::Rule {
                id: ObjectId::Rule(key.clone()),
                name: r.name.clone(),
                key: key.clone(),
                protocol: *protocol,
            }),
            None => missing += 1,
        }
    }
    for (key, r) in &desired.routes {
        match m.routes.get(key).and_then(|l| l.first()) {
            Some(route) => out.push(Present::Route {
                id: ObjectId::Route(key.clone()),
                name: r.name.clone(),
                key: key.clone(),
                route: route.clone(),
            }),
            None => missing += 1,
        }
    }
    for (dk, a) in &desired.addresses {
        let index = m.link_index(&dk.0);
        let here = index.is_some_and(|ifindex| {
            m.addresses.contains_key(&crate::model::AddressKey {
                ifindex,
                address: dk.1,
            })
        });
        match (index, here) {
            (Some(ifindex), true) => out.push(Present::Address {
                id: ObjectId::Address(dk.clone()),
                name: a.name.clone(),
                ifindex,
                address: dk.1,
            }),
            _ => missing += 1,
        }
    }
    let _ = Family::Ipv4;
    (out, missing)
}

/// Why the node could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Observe(#[from] ObserveError),
    /// networkd runs here but keeps its state elsewhere: its configuration would not be found
    /// either, and "nothing at risk" would be a wrong answer.
    #[error(
        "systemd-networkd runs (pid {pid}) but its state is not below {root} (no \
         run/systemd/netif/links there): give the node's root directory with --root (`/host` in \
         the agent's pod)"
    )]
    RootElsewhere { pid: u32, root: String },
}

/// Everything `netwarden networkd` says, for the node seen below `root` and the calling
/// thread's network namespace.
pub async fn report(root: &Path, desired: &DesiredState) -> Result<Report, HostError> {
    let pids = networkd_pids(Path::new("/proc"));
    if let Some(&pid) = pids.first() {
        if !root.join("run/systemd/netif/links").is_dir() {
            return Err(HostError::RootElsewhere {
                pid,
                root: root.display().to_string(),
            });
        }
    }
    let tree = RootTree::new(root);
    let settings = config::settings(&tree);
    let nets = config::networks(&tree);
    let (kernel, present, missing) = kernel(root, desired).await?;
    let running = Running {
        pids,
        links: link_states(root, &kernel.links),
    };
    Ok(report::analyse(
        running, settings, &nets, &kernel, &present, missing,
    ))
}

/// Writes the drop-ins below `root` (`/` for the node itself). A file of the same name with other
/// content is replaced; nothing is restarted. Returns the paths written.
pub fn write(root: &Path, dropins: &[super::predict::DropIn]) -> std::io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for d in dropins {
        let path = root.join(d.path.trim_start_matches('/'));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // Written whole and renamed: networkd never reads half a file.
        let tmp = path.with_extension("conf.netwarden-tmp");
        std::fs::write(&tmp, &d.text)?;
        std::fs::rename(&tmp, &path)?;
        written.push(path);
    }
    Ok(written)
}

/// The agent's check at start: the finding as `netwarden_networkd_objects_at_risk` and, when a
/// restart would take protected objects away, one notice (a warning Event in Kubernetes mode).
/// A node without networkd's files or process has nothing at risk.
pub async fn check_at_start(
    root: PathBuf,
    desired: DesiredState,
    telemetry: std::sync::Arc<crate::telemetry::Telemetry>,
) {
    use crate::telemetry::metrics::AtRiskLabels;
    let found = match report(&root, &desired).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cannot check what systemd-networkd would remove");
            return;
        }
    };
    for (event, list) in [
        ("restart", &found.restart),
        ("reconfigure", &found.reconfigure),
    ] {
        for kind in ["rule", "route", "address"] {
            let n = list.iter().filter(|a| a.kind.to_string() == kind).count();
            telemetry
                .metrics
                .networkd_at_risk
                .get_or_create(&AtRiskLabels { event, kind })
                .set(n as i64);
        }
    }
    if found.restart.is_empty() {
        tracing::debug!(
            running = found.running,
            managed = found.managed.len(),
            "systemd-networkd: a restart removes nothing protected"
        );
        return;
    }
    let names: Vec<String> = found
        .restart
        .iter()
        .take(5)
        .map(|a| a.name.clone())
        .collect();
    tracing::warn!(
        objects = found.restart.len(),
        names = %names.join(","),
        running = found.running,
        "systemd-networkd's next restart would remove protected objects; `netwarden networkd` prints the drop-in that prevents it"
    );
    telemetry.notice(crate::telemetry::Notice::NetworkdAtRisk {
        objects: found.restart.len(),
        names,
        preventable: found.restart_with_dropins.len() < found.restart.len(),
    });
}

#[cfg(test)]
mod tests {
    use super::devtype_of;

    #[test]
    fn a_uevent_counts_only_for_its_own_link() {
        let bridge = "DEVTYPE=bridge\nINTERFACE=cni0\nIFINDEX=4\n";
        assert_eq!(devtype_of(bridge, 4), Some(Some("bridge".into())));
        // Another namespace's cni0.
        assert_eq!(devtype_of(bridge, 7), None);
        // A veth says no DEVTYPE: the ARPHRD name decides.
        assert_eq!(devtype_of("INTERFACE=veth0\nIFINDEX=2\n", 2), Some(None));
    }
}
