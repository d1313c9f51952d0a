//! A throw-away network namespace driven with the real iproute2, removed when dropped (also on
//! panic). Used by `netwarden demo`, the benchmarks and the integration tests; never touches the
//! namespace the caller runs in.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SandboxError {
    #[error("cannot run ip: {0} (is iproute2 installed?)")]
    Spawn(#[source] std::io::Error),
    #[error("`ip {args}` failed: {stderr}")]
    Failed { args: String, stderr: String },
}

pub struct Sandbox {
    pub name: String,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl Sandbox {
    /// Creates `PREFIX-PID-N` with its loopback up.
    pub fn create(prefix: &str) -> Result<Sandbox, SandboxError> {
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        run_ip(&["netns", "add", &name])?;
        let sandbox = Sandbox { name };
        sandbox.ip(&["link", "set", "lo", "up"])?;
        Ok(sandbox)
    }

    /// Runs `ip -n NAME ARGS…` and returns its standard output.
    pub fn ip(&self, args: &[&str]) -> Result<String, SandboxError> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run_ip(&all)
    }

    /// Runs `ip -n NAME OPTIONS… -force -batch -` with `lines` on standard input: one process for
    /// many changes, as fast as iproute2 can go. Options such as `-6` apply to every line.
    pub fn batch(&self, options: &[&str], lines: &str) -> Result<(), SandboxError> {
        let mut child = Command::new("ip")
            .args(["-n", &self.name])
            .args(options)
            .args(["-force", "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(SandboxError::Spawn)?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(lines.as_bytes())
                .map_err(SandboxError::Spawn)?;
        }
        let out = child.wait_with_output().map_err(SandboxError::Spawn)?;
        if out.status.success() {
            Ok(())
        } else {
            Err(SandboxError::Failed {
                args: "-batch".into(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

pub fn run_ip(args: &[&str]) -> Result<String, SandboxError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(SandboxError::Spawn)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(SandboxError::Failed {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}
