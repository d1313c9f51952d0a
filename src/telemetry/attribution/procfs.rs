//! What /proc says about netlink sockets and processes, parsed without I/O where possible, and
//! the small readers around it. None of the files read here needs ptrace access to the process
//! (`comm`, `stat` and `/proc/net/netlink` are readable by anyone); only `/proc/PID/fd`, read by
//! the resolver, does.

use std::collections::HashMap;
use std::path::Path;

/// NETLINK_ROUTE, in /proc/net/netlink's `Eth` column.
pub const NETLINK_ROUTE: u32 = 0;
/// `PF_KTHREAD` in the flags of /proc/PID/stat: a kernel thread.
const PF_KTHREAD: u64 = 0x0020_0000;
/// How many ancestors of a process are named (init excluded).
pub const MAX_ANCESTORS: usize = 4;

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

/// What /proc/PID/stat says that attribution uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    pub ppid: u32,
    pub kernel_thread: bool,
}

/// Parses /proc/PID/stat (`pid (comm) state ppid pgrp session tty tpgid flags …`; the command
/// name may hold spaces and parentheses, so fields are counted after the last `)`).
pub fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ppid = fields.get(1)?.parse().ok()?;
    let flags: u64 = fields.get(6)?.parse().ok()?;
    Some(Stat {
        ppid,
        kernel_thread: flags & PF_KTHREAD != 0,
    })
}

pub use crate::model::text::clean_name;

/// The name of process `pid` (its `comm`), cleaned.
pub fn read_comm(proc_root: &Path, pid: u32) -> Option<String> {
    std::fs::read_to_string(proc_root.join(pid.to_string()).join("comm"))
        .ok()
        .map(|c| clean_name(&c))
}

pub fn read_stat(proc_root: &Path, pid: u32) -> Option<Stat> {
    std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat"))
        .ok()
        .and_then(|s| parse_stat(&s))
}

/// Names of the parent, grandparent… of `pid` (at most [`MAX_ANCESTORS`], init excluded);
/// empty when the process is already gone. A process that has exited but not been reaped yet
/// (a zombie) still shows its parent.
pub fn ancestors(proc_root: &Path, pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    let mut pid = pid;
    for _ in 0..MAX_ANCESTORS {
        let Some(parent) = read_stat(proc_root, pid).map(|s| s.ppid) else {
            break;
        };
        if parent <= 1 {
            break;
        }
        let Some(comm) = read_comm(proc_root, parent) else {
            break;
        };
        out.push(comm);
        pid = parent;
    }
    out
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
        assert_eq!(clean_name("\n"), super::super::UNKNOWN);
    }

    #[test]
    fn stat_gives_the_parent_and_whether_it_is_a_kernel_thread() {
        let user = "4242 (iptables) S 4200 4242 1 0 -1 4194560 120 0 0 0 0 0 0 0 20 0 1 0 5000";
        assert_eq!(
            parse_stat(user),
            Some(Stat {
                ppid: 4200,
                kernel_thread: false
            })
        );
        // The name may hold spaces and parentheses.
        assert_eq!(
            parse_stat("7 (a) b (c) R 1 7 7 0 -1 4194560 0").map(|s| s.ppid),
            Some(1)
        );
        let kthread = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 1";
        assert!(parse_stat(kthread).unwrap().kernel_thread);
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 0"), None, "too short");
    }

    #[test]
    fn ancestors_walk_up_to_init() {
        let dir = tempfile::tempdir().unwrap();
        for (pid, ppid, comm) in [(30, 20, "ip"), (20, 10, "sh"), (10, 1, "kube-router")] {
            let p = dir.path().join(pid.to_string());
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("comm"), format!("{comm}\n")).unwrap();
            std::fs::write(
                p.join("stat"),
                format!("{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 4194560 0"),
            )
            .unwrap();
        }
        assert_eq!(ancestors(dir.path(), 30), ["sh", "kube-router"]);
        assert!(ancestors(dir.path(), 10).is_empty(), "init is not named");
        assert!(ancestors(dir.path(), 99).is_empty(), "gone");
    }
}
