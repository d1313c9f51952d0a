//! BIRD 2 (Debian's `bird2`) running in the foreground inside a test's network namespace, with
//! its config, control socket and pid file in a temporary directory of its own. Killed by pid on
//! drop.

use anyhow::{bail, ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);

pub struct Bird {
    dir: tempfile::TempDir,
    child: Child,
    /// BIRD's standard error (the config should say `log stderr all;`).
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Bird {
    /// Writes `conf` and runs `bird -f -c CONF -s SOCK -P PIDFILE` in `netns` (`ip netns exec`
    /// execs bird in place, so the child's pid is bird's); waits (bounded) until `birdc` answers.
    pub fn start(netns: &str, conf: &str) -> Result<Bird> {
        let dir = tempfile::Builder::new().prefix("nw-bird").tempdir()?;
        std::fs::write(dir.path().join("bird.conf"), conf)?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns, "bird", "-f", "-c"])
            .arg(dir.path().join("bird.conf"))
            .arg("-s")
            .arg(dir.path().join("bird.ctl"))
            .arg("-P")
            .arg(dir.path().join("bird.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run bird (Debian package bird2)")?;
        let log = netwarden::testing::lines::collect(child.stderr.take().unwrap());
        let mut bird = Bird { dir, child, log };
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = bird.child.try_wait()? {
                bail!("bird exited ({status}):\n{}", bird.log_text());
            }
            if bird.birdc(&["show", "status"]).is_ok() {
                return Ok(bird);
            }
            ensure!(
                Instant::now() < deadline,
                "bird did not answer on its control socket within {WAIT:?}:\n{}",
                bird.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("bird.ctl")
    }

    /// `birdc -s SOCK ARGS…`; fails if birdc does, or if BIRD answers with an error (codes 8xxx
    /// and 9xxx).
    pub fn birdc(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("birdc")
            .arg("-s")
            .arg(self.socket())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("cannot run birdc")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(
            out.status.success(),
            "birdc {args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            !text
                .lines()
                .any(|l| l.starts_with('8') || l.starts_with('9')),
            "birdc {args:?}: {text}"
        );
        Ok(text)
    }

    /// Replaces the config file and runs `birdc configure`; waits for BIRD to confirm it.
    pub fn configure(&self, conf: &str) -> Result<String> {
        std::fs::write(self.dir.path().join("bird.conf"), conf)?;
        let out = self.birdc(&["configure"])?;
        ensure!(
            out.contains("Reconfigured") || out.contains("Reconfiguration in progress"),
            "birdc configure: {out}"
        );
        Ok(out)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        let pid = Pid::from_raw(self.child.id() as i32);
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = kill(pid, Signal::SIGTERM);
            let deadline = Instant::now() + WAIT;
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
}
