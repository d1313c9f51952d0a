//! systemd-networkd (the distribution's own binary) running inside a network namespace of the
//! test's own, without systemd as PID 1.
//!
//! How, and why each piece is needed (established with Debian 12's systemd 252):
//!
//! - A *holder* process owns a private mount namespace (`unshare -m`, propagation private) and
//!   sits in the test's network namespace (`nsenter --net`). In that mount namespace it mounts a
//!   tmpfs at /run (with /run/systemd, /run/dbus, /run/udev/data), a fresh sysfs at /sys (so /sys
//!   shows the namespace's links, read-write: with a read-only /sys networkd takes "container
//!   mode" and does not flush foreign rules and routes, unlike on a real host), a tmpfs at
//!   /etc/systemd with the rig's own `network/` (the `.network` files) and `networkd.conf.d/`
//!   (drop-ins for networkd.conf) bind-mounted in it. Nothing of the host's /run, /sys or
//!   /etc/systemd is touched: the mounts exist only in that namespace. (/usr/lib/systemd/network
//!   is the host's, as on any node: its files match links this rig never has.)
//! - networkd (and, for `networkctl`, a private `dbus-daemon --system`) are started with
//!   `nsenter -t HOLDER -m -n` into that mount and network namespace. networkd drops to the
//!   `systemd-network` user by itself.
//! - networkd flushes foreign rules and routes only when it believes udev is present: the rig
//!   writes `/run/udev/data/n<ifindex>` with `I:1` for every link ([`Networkd::mark_udev`]; call
//!   it again after creating a link, before networkd is started or restarted).
//! - A restart is stop (SIGTERM, wait for the exit) and start again, as `systemctl restart` does.
//!
//! Drop kills only the processes the rig started, by pid; the mount namespace and its tmpfs go
//! away with the last of them, the temporary directory is removed.

use anyhow::{anyhow, bail, ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BINARY: &str = "/lib/systemd/systemd-networkd";
/// The name the kernel reports for networkd (`comm` is truncated to 15 characters).
pub const COMM: &str = "systemd-network";
const WAIT: Duration = Duration::from_secs(10);

/// Runs in the holder: set up the private mounts, report, then wait to be killed.
const HOLDER: &str = r#"set -e
mount --make-rprivate /
mount -t tmpfs -o mode=0755 netwarden-rig /run
mkdir -p /run/systemd /run/dbus /run/udev/data
umount -l /sys
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=0755 netwarden-rig-etc /etc/systemd
mkdir -p /etc/systemd/network /etc/systemd/networkd.conf.d
mount --bind "$1" /etc/systemd/network
mount --bind "$2" /etc/systemd/networkd.conf.d
echo ready
exec sleep infinity
"#;

pub struct Networkd {
    netns: String,
    dir: tempfile::TempDir,
    holder: Child,
    daemon: Option<Child>,
    dbus: Option<Child>,
    /// networkd's standard error (it logs at debug level), over all its runs.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Networkd {
    /// Prepares the private mount namespace for the network namespace `netns` (a name under
    /// /run/netns), with `files` (name, content) as /etc/systemd/network, and marks the links
    /// that exist now as initialised by udev. networkd is not started yet.
    pub fn new(netns: &str, files: &[(&str, &str)]) -> Result<Networkd> {
        ensure!(
            Path::new(BINARY).exists(),
            "{BINARY} is missing (Debian's systemd package)"
        );
        ensure!(
            Path::new("/etc/systemd").is_dir(),
            "/etc/systemd is missing: it is the mount point of the rig's configuration"
        );
        let dir = tempfile::Builder::new().prefix("nw-networkd").tempdir()?;
        let network = dir.path().join("network");
        std::fs::create_dir(&network)?;
        for (name, text) in files {
            std::fs::write(network.join(name), text)?;
        }
        let conf = dir.path().join("networkd.conf.d");
        std::fs::create_dir(&conf)?;
        let mut holder = Command::new("unshare")
            .args(["-m", "--propagation", "private", "--", "nsenter"])
            .arg(format!("--net=/run/netns/{netns}"))
            .args(["--", "sh", "-c", HOLDER, "netwarden-rig-holder"])
            .arg(&network)
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run unshare")?;
        let stdout = holder.stdout.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let ready = rx.recv_timeout(WAIT).unwrap_or_default();
        if ready.trim() != "ready" {
            let _ = holder.kill();
            let _ = holder.wait();
            let mut err = String::new();
            if let Some(mut e) = holder.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            bail!("the mount namespace for networkd could not be set up: {err}");
        }
        let rig = Networkd {
            netns: netns.to_string(),
            dir,
            holder,
            daemon: None,
            dbus: None,
            log: Arc::new(Mutex::new(Vec::new())),
        };
        rig.mark_udev()?;
        Ok(rig)
    }

    /// The root directory as the private mount namespace sees it (its /run, its /sys).
    fn root(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.holder.id()))
    }

    /// Path of a file inside the private mount namespace.
    pub fn path(&self, inside: &str) -> PathBuf {
        self.root().join(inside.trim_start_matches('/'))
    }

    /// The links of the namespace: (ifindex, name), from the private sysfs.
    pub fn links(&self) -> Result<Vec<(u32, String)>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(self.path("/sys/class/net"))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let index = std::fs::read_to_string(entry.path().join("ifindex"))?;
            out.push((index.trim().parse()?, name));
        }
        Ok(out)
    }

    pub fn ifindex(&self, link: &str) -> Result<u32> {
        self.links()?
            .into_iter()
            .find(|(_, n)| n == link)
            .map(|(i, _)| i)
            .ok_or_else(|| anyhow!("no link {link} in {}", self.netns))
    }

    /// Writes the udev database entry (`I:1`: initialised) of every link that exists now.
    pub fn mark_udev(&self) -> Result<()> {
        for (index, _) in self.links()? {
            std::fs::write(self.path(&format!("/run/udev/data/n{index}")), "I:1\n")?;
        }
        Ok(())
    }

    /// Writes (or replaces) a file in /etc/systemd/network; networkd reads it at its next start
    /// or `networkctl reload`.
    pub fn write_file(&self, name: &str, text: &str) -> Result<()> {
        std::fs::write(self.dir.path().join("network").join(name), text)?;
        Ok(())
    }

    /// Writes (or replaces) a drop-in in /etc/systemd/networkd.conf.d; networkd reads it at its
    /// next start.
    pub fn write_conf(&self, name: &str, text: &str) -> Result<()> {
        std::fs::write(self.dir.path().join("networkd.conf.d").join(name), text)?;
        Ok(())
    }

    /// Writes a file at `path` below the rig's /etc/systemd (`network/10-veth0.network.d/x.conf`),
    /// creating its directories: what `netwarden networkd --write-root` would write there.
    pub fn write_etc(&self, path: &str, text: &str) -> Result<()> {
        let (top, rest) = path
            .split_once('/')
            .ok_or_else(|| anyhow!("{path}: not below network/ or networkd.conf.d/"))?;
        ensure!(
            top == "network" || top == "networkd.conf.d",
            "{path}: only network/ and networkd.conf.d/ are the rig's"
        );
        let full = self.dir.path().join(top).join(rest);
        std::fs::create_dir_all(full.parent().unwrap())?;
        std::fs::write(full, text)?;
        Ok(())
    }

    /// The holder's pid: `/proc/PID/root` is the private mount namespace's view.
    pub fn holder_pid(&self) -> u32 {
        self.holder.id()
    }

    /// Starts networkd (debug logging to standard error, collected in [`Networkd::log`]).
    pub fn start(&mut self) -> Result<()> {
        ensure!(self.daemon.is_none(), "networkd is already running");
        // Forget the link states of a previous run, so that `wait_configured` waits for this one.
        if let Ok(dir) = std::fs::read_dir(self.path("/run/systemd/netif/links")) {
            for entry in dir.flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let mut child = Command::new("nsenter")
            .args([
                "-t",
                &self.holder.id().to_string(),
                "-m",
                "-n",
                "--",
                BINARY,
            ])
            .env("SYSTEMD_LOG_LEVEL", "debug")
            .env("SYSTEMD_LOG_TARGET", "console")
            .env("SYSTEMD_LOG_COLOR", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run nsenter")?;
        let stderr = child.stderr.take().unwrap();
        let log = self.log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log.lock().unwrap().push(line);
            }
        });
        self.daemon = Some(child);
        Ok(())
    }

    /// The pid of the running networkd.
    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    /// Waits (bounded) until networkd has configured `link` (its state file says
    /// `ADMIN_STATE=configured`).
    pub fn wait_configured(&mut self, link: &str) -> Result<()> {
        let index = self.ifindex(link)?;
        let state = self.path(&format!("/run/systemd/netif/links/{index}"));
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(text) = std::fs::read_to_string(&state) {
                if text.lines().any(|l| l == "ADMIN_STATE=configured") {
                    return Ok(());
                }
            }
            if let Some(child) = self.daemon.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "networkd exited ({status}) before configuring {link}:\n{}",
                        self.log_text()
                    );
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "networkd did not configure {link} within {WAIT:?}; state: {:?}; log:\n{}",
                    std::fs::read_to_string(&state).ok(),
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The link's `ADMIN_STATE` as networkd's state file says (`configured`, `configuring`,
    /// `failed`, ...), if there is one yet.
    pub fn admin_state(&self, link: &str) -> Option<String> {
        let index = self.ifindex(link).ok()?;
        let text = std::fs::read_to_string(self.path(&format!("/run/systemd/netif/links/{index}")))
            .ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("ADMIN_STATE="))
            .map(str::to_string)
    }

    /// Waits (bounded by `within`) until networkd is done with `link`, one way or the other:
    /// `configured` or `failed`. Returns the state (or the last one seen, at the deadline).
    pub fn wait_settled(&self, link: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let state = self.admin_state(link).unwrap_or_default();
            if state == "configured" || state == "failed" || Instant::now() >= deadline {
                return state;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Forgets the log collected so far (a long run at debug level grows it).
    pub fn clear_log(&self) {
        self.log.lock().unwrap().clear();
    }

    /// SIGTERM, then waits (bounded) for the exit; SIGKILL if it does not come.
    pub fn stop(&mut self) -> Result<()> {
        let Some(child) = self.daemon.take() else {
            return Ok(());
        };
        terminate(child, "systemd-networkd")
    }

    /// `systemctl restart systemd-networkd`: stop, then start.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.start()
    }

    /// Starts a private `dbus-daemon --system` (for `networkctl`), and waits for its socket.
    pub fn start_dbus(&mut self) -> Result<()> {
        ensure!(self.dbus.is_none(), "dbus-daemon is already running");
        let child = Command::new("nsenter")
            .args(["-t", &self.holder.id().to_string(), "-m", "-n", "--"])
            .args(["dbus-daemon", "--system", "--nofork", "--nopidfile"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot run dbus-daemon")?;
        self.dbus = Some(child);
        let socket = self.path("/run/dbus/system_bus_socket");
        let deadline = Instant::now() + WAIT;
        while !socket.exists() {
            ensure!(
                Instant::now() < deadline,
                "dbus-daemon did not create its socket within {WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Runs `networkctl ARGS` in the private namespaces (needs [`Networkd::start_dbus`]).
    pub fn networkctl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("nsenter")
            .args(["-t", &self.holder.id().to_string(), "-m", "-n", "--"])
            .arg("networkctl")
            .args(args)
            .output()
            .context("cannot run networkctl")?;
        ensure!(
            out.status.success(),
            "networkctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The log lines (of every run so far) that contain `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

/// SIGTERM a child of ours, wait (bounded) for it; SIGKILL if it does not exit.
fn terminate(mut child: Child, what: &str) -> Result<()> {
    let pid = Pid::from_raw(child.id() as i32);
    if child.try_wait()?.is_none() {
        let _ = kill(pid, Signal::SIGTERM);
    }
    let deadline = Instant::now() + WAIT;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} (pid {pid}) did not exit within {WAIT:?} of SIGTERM; killed");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

impl Drop for Networkd {
    fn drop(&mut self) {
        if let Some(child) = self.daemon.take() {
            let _ = terminate(child, "systemd-networkd");
        }
        if let Some(child) = self.dbus.take() {
            let _ = terminate(child, "dbus-daemon");
        }
        // The last process of the mount namespace: its tmpfs and mounts go with it.
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}
