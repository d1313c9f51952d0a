use super::*;

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

/// `(pid, ppid, comm, kernel thread, socket inodes held)`.
type Process = (u32, u32, &'static str, bool, &'static [u64]);

/// A fake /proc with a netlink table (`port inode` pairs) and processes.
fn fake_proc(table: &[(i64, u64)], processes: &[Process]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("thread-self/net")).unwrap();
    let mut text = String::from("sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode\n");
    for (i, (port, inode)) in table.iter().enumerate() {
        text.push_str(&format!("{i} 0 {port} 0 0 0 0 2 0 {inode}\n"));
    }
    std::fs::write(root.join("thread-self/net/netlink"), text).unwrap();
    for &(pid, ppid, comm, kthread, inodes) in processes {
        let p = root.join(pid.to_string());
        std::fs::create_dir_all(p.join("fd")).unwrap();
        std::fs::write(p.join("comm"), format!("{comm}\n")).unwrap();
        let flags = if kthread { 0x0020_8040 } else { 0x0040_0100 };
        std::fs::write(
            p.join("stat"),
            format!("{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 {flags} 0 0 0"),
        )
        .unwrap();
        std::os::unix::fs::symlink("/dev/null", p.join("fd/0")).unwrap();
        for (i, inode) in inodes.iter().enumerate() {
            std::os::unix::fs::symlink(
                format!("socket:[{inode}]"),
                p.join(format!("fd/{}", i + 3)),
            )
            .unwrap();
        }
    }
    dir
}

#[test]
fn resolver_finds_holders_with_their_ancestors_and_caches_them() {
    let dir = fake_proc(
        &[(4242, 98765), (-5, 555)],
        &[
            (4242, 4000, "ip", false, &[98765]),
            (4000, 1, "kube-router", false, &[]),
            (10, 1, "fighter", false, &[555]),
            (11, 1, "bash", false, &[1]),
        ],
    );
    let mut r = Resolver::new(dir.path());
    let who = r.identify(&[4242, 0, 999]);
    assert_eq!(who[&4242].name, "ip");
    assert_eq!(who[&4242].ancestors, ["kube-router"]);
    assert_eq!(who[&0], Identity::named(KERNEL));
    assert_eq!(who[&999].name, UNKNOWN, "a socket that is gone");
    // A socket that is gone, but the process whose pid is its port id is there: a guess.
    assert_eq!(r.resolve(&[10])[&10], "fighter");
    assert_eq!(r.cache.get(&98765).map(|w| w.name.as_str()), Some("ip"));
    // The process exits but its socket is still listed (cached by inode).
    std::fs::remove_dir_all(dir.path().join("4242")).unwrap();
    assert_eq!(r.resolve(&[4242])[&4242], "ip");
}

#[test]
fn resolver_scans_every_process_when_the_port_is_not_a_pid_and_remembers_the_holder() {
    let dir = fake_proc(
        &[(3000000000, 555)],
        &[
            (10, 1, "fighter", false, &[555]),
            (12, 1, "bash", false, &[]),
        ],
    );
    let mut r = Resolver::new(dir.path());
    assert_eq!(r.resolve(&[3000000000])[&3000000000], "fighter");
    assert_eq!(r.recent, [10], "looked at first next time");
}

#[test]
fn a_socket_init_bound_for_a_service_is_the_services() {
    // Socket activation: init (pid 1) bound the socket (port 1) and keeps it; networkd, of
    // another uid, received it and makes the changes through it.
    let dir = fake_proc(
        &[(1, 700)],
        &[
            (1, 0, "systemd", false, &[700]),
            (812, 1, "systemd-network", false, &[700]),
        ],
    );
    let mut r = Resolver::new(dir.path());
    assert_eq!(r.resolve(&[1])[&1], "systemd-network");
    // Held by init alone: init it is.
    let dir = fake_proc(&[(1, 700)], &[(1, 0, "systemd", false, &[700])]);
    assert_eq!(Resolver::new(dir.path()).resolve(&[1])[&1], "systemd");
}

#[test]
fn a_port_is_not_guessed_to_be_init_or_a_kernel_thread() {
    // The sockets are gone; the port ids are pids in the offenders' own pid namespaces (a
    // container's init is pid 1 there). The host's processes with those pids did nothing.
    let dir = fake_proc(
        &[],
        &[
            (1, 0, "systemd", false, &[]),
            (2, 0, "kthreadd", true, &[]),
            (3, 2, "rcu_gp", true, &[]),
            (700, 1, "containerd", false, &[]),
        ],
    );
    let mut r = Resolver::new(dir.path());
    let names = r.resolve(&[1, 2, 3, 700]);
    assert_eq!(names[&1], UNKNOWN);
    assert_eq!(names[&2], UNKNOWN);
    assert_eq!(names[&3], UNKNOWN);
    assert_eq!(names[&700], "containerd", "a user-space process may be it");
}

#[test]
fn sightings_name_what_is_gone_by_the_lookup() {
    let dir = fake_proc(&[], &[]);
    let sightings: Sightings = Arc::default();
    sightings.lock().unwrap().insert(
        77,
        Sighting {
            who: Identity {
                name: "ip".into(),
                ancestors: vec!["aws-k8s-agent".into()],
            },
            at: Instant::now(),
        },
    );
    let mut r = Resolver::new(dir.path()).with_sightings(sightings);
    assert_eq!(r.identify(&[77])[&77].ancestors, ["aws-k8s-agent"]);
    assert_eq!(r.resolve(&[78])[&78], UNKNOWN);
}

#[test]
fn this_thread_sees_its_own_namespace() {
    // Read-only: opens a socket and reads /proc; fine in any namespace.
    check_namespace_view().unwrap();
}

#[test]
fn resolves_a_live_socket_of_this_process() {
    let (_fd, port) = bound_netlink_socket();
    let me = clean_name(&std::fs::read_to_string("/proc/self/comm").unwrap());
    let names = Resolver::default().resolve(&[port]);
    assert_eq!(names[&port], me);
}

/// A NETLINK_ROUTE socket of this process with the port the kernel picked.
fn bound_netlink_socket() -> (std::os::fd::OwnedFd, u32) {
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
    let port = getsockname::<NetlinkAddr>(fd.as_raw_fd()).unwrap().pid();
    (fd, port)
}

/// What a held burst asks once it is quiet: is a deleter still holding its socket? Yes while this
/// test's socket is open, no once it is closed; the kernel (port 0) holds none.
#[test]
fn a_port_is_open_while_its_socket_is_and_not_after() {
    let (fd, port) = bound_netlink_socket();
    let resolver = Resolver::default();
    assert!(resolver.any_open(&[KERNEL_PORT, port]));
    drop(fd);
    assert!(!resolver.any_open(&[KERNEL_PORT, port]));
    assert!(!resolver.any_open(&[KERNEL_PORT]));
    assert!(!resolver.any_open(&[]));
}

#[test]
fn processes_are_scanned_newest_first_across_the_pid_wraparound() {
    // The last pid handed out was 120: 120 and below are the newest, then the old high ones.
    assert_eq!(
        newest_first(vec![5, 32000, 120, 31000, 7, 119], Some(120)),
        [120, 119, 7, 5, 32000, 31000]
    );
    assert_eq!(newest_first(vec![5, 300, 7], None), [300, 7, 5]);
}
