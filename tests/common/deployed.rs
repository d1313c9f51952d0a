//! The agent in the shape the DaemonSet runs it: the container's security context is read from
//! deploy/base/daemonset.yaml (so the tests and the manifest cannot drift apart) and reproduced
//! with util-linux `setpriv` around the agent binary, started inside the test's network namespace
//! (hostNetwork: it never enters a namespace itself, which would need CAP_SYS_ADMIN) and in the
//! host's PID namespace (hostPID).
//!
//! What a container runtime (runc, crun) gives a root container with `capabilities: {drop: [ALL],
//! add: [X, Y]}`: bounding set {X, Y}; the permitted and effective sets of the root process it
//! execs are then {X, Y} as well; no inheritable (containerd and CRI-O stopped setting it:
//! CVE-2022-24769) and no ambient capabilities. `allowPrivilegeEscalation: false` is the
//! process's no_new_privs bit. Not reproduced: the read-only root filesystem, the RuntimeDefault
//! seccomp profile (neither restricts what the agent does in these tests: it writes only to the
//! state paths the tests give it, and the profile allows its system calls) and the AppArmor
//! profile (`Unconfined` in the manifest: what the rig's processes have without AppArmor).
#![allow(dead_code)] // each test binary (and the attribution bench) uses its own subset

use k8s_openapi::api::apps::v1::DaemonSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The DaemonSet the tests read the shape from.
pub fn daemonset_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/base/daemonset.yaml")
}

/// The container's privileges, as the DaemonSet grants them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Privileges {
    /// Capabilities added after `drop: [ALL]`, as Kubernetes spells them (`NET_ADMIN`).
    pub capabilities: Vec<String>,
    /// `runAsUser`.
    pub uid: u32,
    /// `allowPrivilegeEscalation: false`.
    pub no_new_privs: bool,
}

impl Privileges {
    /// Reads deploy/base/daemonset.yaml. Panics on anything the rig does not reproduce (another
    /// network or PID namespace, a privileged container, capabilities not dropped first), so a
    /// manifest change the rig cannot follow fails loudly instead of being tested as something
    /// else.
    pub fn of_daemonset() -> Privileges {
        let path = daemonset_path();
        let text = std::fs::read_to_string(&path).expect("read deploy/base/daemonset.yaml");
        let ds: DaemonSet = serde_saphyr::from_str(&text).expect("the DaemonSet parses");
        Privileges::of(&ds)
    }

    fn of(ds: &DaemonSet) -> Privileges {
        let pod = ds
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("a pod template");
        assert_eq!(
            pod.host_network,
            Some(true),
            "the rig runs the agent in the node's network namespace (hostNetwork)"
        );
        assert_eq!(
            pod.host_pid,
            Some(true),
            "the rig runs the agent in the node's PID namespace (hostPID)"
        );
        let [container] = pod.containers.as_slice() else {
            panic!("the rig models one container");
        };
        let sc = container
            .security_context
            .as_ref()
            .expect("a securityContext");
        assert_ne!(sc.privileged, Some(true), "a privileged container");
        let caps = sc.capabilities.as_ref().expect("capabilities");
        assert_eq!(
            caps.drop.as_deref(),
            Some(&["ALL".to_string()][..]),
            "the rig models `drop: [ALL]` (the runtime's default set otherwise)"
        );
        let capabilities = caps.add.clone().unwrap_or_default();
        let uid = sc.run_as_user.expect("runAsUser") as u32;
        Privileges {
            capabilities,
            uid,
            no_new_privs: sc.allow_privilege_escalation == Some(false),
        }
    }

    /// The same with `extra` capabilities (a measurement of what a capability changes).
    pub fn with(mut self, extra: &[&str]) -> Privileges {
        self.capabilities
            .extend(extra.iter().map(|c| c.to_string()));
        self
    }

    /// The same without `names` (a measurement of what a capability changes).
    pub fn without(mut self, names: &[&str]) -> Privileges {
        self.capabilities.retain(|c| !names.contains(&c.as_str()));
        self
    }

    /// `setpriv` options that make the program it execs run with these privileges.
    pub fn setpriv_args(&self) -> Vec<String> {
        let caps: String = self
            .capabilities
            .iter()
            .map(|c| format!(",+{}", c.to_ascii_lowercase()))
            .collect();
        let mut args = vec![
            format!("--reuid={}", self.uid),
            format!("--regid={}", self.uid),
            "--clear-groups".into(),
            format!("--bounding-set=-all{caps}"),
            "--inh-caps=-all".into(),
            "--ambient-caps=-all".into(),
        ];
        if self.no_new_privs {
            args.push("--no-new-privs".into());
        }
        args
    }

    /// `setpriv ARGS -- PROGRAM` (run inside the namespace with [`in_netns`]).
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new("setpriv");
        cmd.args(self.setpriv_args()).arg("--").arg(program);
        cmd
    }

    /// [`Privileges::command`] started inside the namespace /run/netns/`ns` ([`in_netns`]): a
    /// program as the DaemonSet's container runs it on the node (the agent, or a command through
    /// `kubectl exec`).
    pub fn command_in(&self, program: &Path, ns: &str) -> Command {
        let mut cmd = self.command(program);
        in_netns(&mut cmd, ns);
        cmd
    }
}

/// Makes `cmd` start inside the network namespace /run/netns/`ns` (the test runs as root; the
/// child enters before it execs, so the program never needs CAP_SYS_ADMIN).
pub fn in_netns(cmd: &mut Command, ns: &str) {
    let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("open the namespace");
    // SAFETY: setns is async-signal-safe; the file is opened before the fork and only read by
    // the child. The closure owns it, so it stays open until the Command is dropped.
    unsafe {
        cmd.pre_exec(move || {
            if nix::libc::setns(file.as_raw_fd(), nix::libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Forwards TCP connections from the host's loopback to `target` inside the namespace `ns`,
/// so that HTTP clients written for an agent on the host's loopback reach one that serves inside
/// the namespace (as the DaemonSet's agent serves on the node's network). Returns the host
/// address. The forwarding threads end with the connections; the listener lives as long as the
/// test binary.
pub fn forward(ns: &str, target: SocketAddr) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the forwarder");
    let addr = listener.local_addr().unwrap().to_string();
    let (ask, asked) =
        std::sync::mpsc::channel::<std::sync::mpsc::Sender<std::io::Result<TcpStream>>>();
    // A thread that lives in the namespace: sockets it opens belong to it for good, whichever
    // thread uses them afterwards.
    let netns = std::fs::File::open(format!("/run/netns/{ns}")).expect("open the namespace");
    std::thread::spawn(move || {
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        for reply in asked {
            let _ = reply.send(TcpStream::connect(target));
        }
    });
    std::thread::spawn(move || {
        for client in listener.incoming().map_while(Result::ok) {
            let (tx, rx) = std::sync::mpsc::channel();
            if ask.send(tx).is_err() {
                return;
            }
            let Ok(Ok(upstream)) = rx.recv() else {
                continue;
            };
            pipe(client, upstream);
        }
    });
    addr
}

/// Makes a TCP service on the host's loopback (`addr`, e.g. the fake API server) reachable at the
/// same address inside the namespace `ns`: the DaemonSet's agent reaches the API server over the
/// node's network, and the rig's node is the namespace. The listener lives as long as the test
/// binary.
pub fn reach_host(ns: &str, addr: SocketAddr) {
    let netns = std::fs::File::open(format!("/run/netns/{ns}")).expect("open the namespace");
    // Bound by a thread that entered the namespace: the socket stays there. The accepting thread
    // below is the caller's child, in the host's namespace, where it connects to `addr`.
    let listener = std::thread::spawn(move || {
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        TcpListener::bind(addr)
    })
    .join()
    .expect("the binding thread")
    .expect("bind inside the namespace");
    std::thread::spawn(move || {
        for client in listener.incoming().map_while(Result::ok) {
            if let Ok(upstream) = TcpStream::connect(addr) {
                pipe(client, upstream);
            }
        }
    });
}

/// Copies bytes both ways until either side closes.
fn pipe(a: TcpStream, b: TcpStream) {
    let copy = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let mut buf = [0u8; 16 << 10];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 || to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(std::net::Shutdown::Write);
        });
    };
    let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    copy(a, b2);
    copy(b, a2);
}

/// `setpriv ARGS -- PROGRAM` as a process of the DaemonSet's container (`kubectl exec` in the
/// agent's pod): inside the namespace `ns` (hostNetwork) and in a mount namespace of its own whose
/// /sys shows the namespace's links, as the container's sysfs, mounted in the node's network
/// namespace, shows the node's (`ip netns exec` makes both).
pub fn in_container(privileges: &Privileges, ns: &str, program: &Path) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "setpriv"])
        .args(privileges.setpriv_args())
        .arg("--")
        .arg(program);
    cmd
}
