//! Offenders in the shapes real ones have on a node, for the attribution tests: a process of
//! another uid holding NET_ADMIN as an ambient capability (as systemd runs systemd-networkd:
//! `User=systemd-network`, `AmbientCapabilities=CAP_NET_ADMIN …`), or root with every capability
//! (more than the agent has: a privileged CNI container, a root shell); changing things through
//! its first netlink socket (port id = pid) or a later one (port id ≠ pid); living on after the
//! change or exiting at once.
//!
//! The program is the real `ip` (or a symlink to it under another name, so that each offender
//! has a name of its own: the kernel names a process after the path it was started by). It runs
//! inside the test's namespace (entered before exec, as a process of the node would already be
//! there).
#![allow(dead_code)]

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// Who the offender is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Who {
    /// Root with every capability.
    Root,
    /// This uid (and gid), with NET_ADMIN as its only, ambient, capability.
    User(u32),
    /// Root with every capability in a PID namespace of its own, as a CNI daemon in a container
    /// without hostPID (aws-node's aws-k8s-agent): its port ids are pids of that namespace (its
    /// first socket: 1 here), which are other processes' on the node.
    Contained,
}

impl Who {
    /// A process of systemd-networkd's user (or of uid 4711 where that user does not exist).
    pub fn network_user() -> Who {
        let uid = std::fs::read_to_string("/etc/passwd")
            .ok()
            .and_then(|p| {
                p.lines()
                    .map(|l| l.split(':').collect::<Vec<_>>())
                    .find(|f| f.first() == Some(&"systemd-network"))
                    .and_then(|f| f.get(2)?.parse().ok())
            })
            .unwrap_or(4711);
        Who::User(uid)
    }
}

/// Which of its netlink sockets the offender changes things through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Socket {
    /// Its first NETLINK_ROUTE socket: the kernel gives it the process's pid as port id.
    First,
    /// A later one: the process already holds a socket bound to its pid (opened before `ip`
    /// starts and inherited by it), so the kernel gives `ip`'s socket another port id.
    Later,
}

/// A symlink to `ip` named `name` in `dir` (made readable by every user), so that the process
/// is named `name`.
pub fn named_ip(dir: &Path, name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.join(name);
    if !path.exists() {
        let ip = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("iproute2's ip");
        std::os::unix::fs::symlink(ip, &path).unwrap();
    }
    path
}

fn command(ns: &str, who: Who, socket: Socket, program: &Path) -> Command {
    let mut cmd = match who {
        Who::Root => Command::new(program),
        Who::Contained => {
            let mut cmd = Command::new("unshare");
            cmd.args(["--pid", "--fork", "--"]).arg(program);
            cmd
        }
        Who::User(uid) => {
            let mut cmd = Command::new("setpriv");
            cmd.args([
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".into(),
                "--inh-caps=-all,+net_admin".into(),
                "--ambient-caps=-all,+net_admin".into(),
                "--".into(),
            ])
            .arg(program);
            cmd
        }
    };
    super::deployed::in_netns(&mut cmd, ns);
    if socket == Socket::Later {
        // SAFETY: socket and bind are async-signal-safe system calls on plain memory.
        unsafe {
            cmd.pre_exec(|| {
                use nix::libc;
                let fd = libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let mut addr: libc::sockaddr_nl = std::mem::zeroed();
                addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
                let len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
                if libc::bind(fd, &addr as *const _ as *const libc::sockaddr, len) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Not close-on-exec: the program inherits it, and its own socket comes later.
                Ok(())
            });
        }
    }
    cmd
}

/// A long-lived offender: `PROGRAM -batch -`, which ran one line and holds its socket until
/// dropped (then its standard input is closed and it exits; killed by pid if it does not).
pub struct Offender {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Offender {
    pub fn batch(ns: &str, who: Who, socket: Socket, program: &Path, line: &str) -> Offender {
        let mut child = command(ns, who, socket, program)
            .args(["-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start the offender");
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
        Offender {
            child,
            stdin: Some(stdin),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Offender {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A short-lived offender: `PROGRAM ARGS…`, run to its end. Returns its pid; panics if it failed.
pub fn once(ns: &str, who: Who, socket: Socket, program: &Path, args: &[&str]) -> u32 {
    let mut child = command(ns, who, socket, program)
        .args(args)
        .stdout(Stdio::null())
        .spawn()
        .expect("start the offender");
    let pid = child.id();
    let status = child.wait().unwrap();
    assert!(status.success(), "{program:?} {args:?}: {status}");
    pid
}
