//! Running the iptables and ipset binaries: arguments as a vector, data on stdin, never a shell.
//! Also the backend choice (nft or legacy), made the way kube-proxy's iptables wrapper makes it.

use super::model::TableId;
use super::parse::{self, ParseError, SavedSet, SavedTable, SetHeader};
use crate::model::Family;
use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

#[derive(Debug, Error)]
pub enum ToolError {
    #[error("cannot run {program}: {source} (is the iptables/ipset package installed?)")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{program} {args}` failed ({status}): {stderr}")]
    Failed {
        program: String,
        args: String,
        status: String,
        stderr: String,
    },
    #[error("cannot read the output of {program}: {source}")]
    Parse {
        program: String,
        #[source]
        source: ParseError,
    },
}

/// Which iptables the host uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    Nft,
    Legacy,
}

/// `--iptables-backend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BackendChoice {
    #[default]
    Auto,
    Nft,
    Legacy,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }

    fn binary(self, family: Family, what: &str) -> String {
        let base = match family {
            Family::Ipv4 => "iptables",
            Family::Ipv6 => "ip6tables",
        };
        format!("{base}-{}-{what}", self.as_str())
    }

    pub fn save_binary(self, family: Family) -> String {
        self.binary(family, "save")
    }

    pub fn restore_binary(self, family: Family) -> String {
        self.binary(family, "restore")
    }
}

/// Output of a finished tool.
pub struct Ran {
    pub stdout: String,
    /// Process id of the tool: nf_tables names it in the NEWGEN message of its transaction.
    pub pid: Option<u32>,
}

/// Runs `program args…`, writing `stdin` to it; fails on a non-zero exit.
pub async fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<Ran, ToolError> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let spawn_error = |source| ToolError::Spawn {
        program: program.to_owned(),
        source,
    };
    let mut child = cmd.spawn().map_err(spawn_error)?;
    let pid = child.id();
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A tool that exits early closes the pipe; its exit status and stderr say why.
        let _ = pipe.write_all(data.as_bytes()).await;
        drop(pipe);
    }
    let out = child.wait_with_output().await.map_err(spawn_error)?;
    if !out.status.success() {
        return Err(ToolError::Failed {
            program: program.to_owned(),
            args: args.join(" "),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(Ran {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        pid,
    })
}

/// nft or legacy: whichever holds more rules (IPv4 and IPv6 together); nft on a tie, as it is
/// the default of every current distribution. This is what kube-proxy's iptables wrapper does.
pub async fn detect(choice: BackendChoice) -> Backend {
    match choice {
        BackendChoice::Nft => return Backend::Nft,
        BackendChoice::Legacy => return Backend::Legacy,
        BackendChoice::Auto => {}
    }
    let mut counts = [0usize; 2];
    for (i, backend) in [Backend::Nft, Backend::Legacy].into_iter().enumerate() {
        for family in [Family::Ipv4, Family::Ipv6] {
            if let Ok(out) = run(&backend.save_binary(family), &[], None).await {
                counts[i] += parse::count_rules(&out.stdout);
            }
        }
    }
    let backend = if counts[1] > counts[0] {
        Backend::Legacy
    } else {
        Backend::Nft
    };
    tracing::info!(
        backend = backend.as_str(),
        nft_rules = counts[0],
        legacy_rules = counts[1],
        "iptables backend detected"
    );
    backend
}

/// Reads one table (`iptables-save -t TABLE`). `None` when the table does not exist.
pub async fn save_table(backend: Backend, table: TableId) -> Result<Option<SavedTable>, ToolError> {
    let program = backend.save_binary(table.family);
    let out = run(&program, &["-t", table.table.as_str()], None).await?;
    let mut tables = parse::iptables_save(&out.stdout).map_err(|source| ToolError::Parse {
        program: program.clone(),
        source,
    })?;
    Ok(tables.remove(table.table.as_str()))
}

/// Applies one transaction (`iptables-restore --noflush -w`, input on stdin). Returns the pid.
pub async fn restore(
    backend: Backend,
    family: Family,
    input: &str,
) -> Result<Option<u32>, ToolError> {
    let program = backend.restore_binary(family);
    Ok(run(&program, &["--noflush", "-w"], Some(input)).await?.pid)
}

/// `ipset list -t`: every set's header, without members.
pub async fn ipset_headers() -> Result<HashMap<String, SetHeader>, ToolError> {
    let out = run("ipset", &["list", "-t"], None).await?;
    Ok(parse::ipset_list_terse(&out.stdout))
}

/// `ipset list -n`: the names of every set.
pub async fn ipset_names() -> Result<HashSet<String>, ToolError> {
    let out = run("ipset", &["list", "-n"], None).await?;
    Ok(out
        .stdout
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect())
}

/// `ipset save NAME` as printed; `None` when the set does not exist.
pub async fn ipset_save_text(name: &str) -> Result<Option<String>, ToolError> {
    match run("ipset", &["save", name], None).await {
        Ok(out) => Ok(Some(out.stdout)),
        Err(ToolError::Failed { stderr, .. }) if stderr.contains("does not exist") => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn parse_set(name: &str, text: &str) -> Result<Option<SavedSet>, ToolError> {
    let mut sets = parse::ipset_save(text).map_err(|source| ToolError::Parse {
        program: "ipset".into(),
        source,
    })?;
    Ok(sets.remove(name))
}

/// `ipset save NAME`: one set with its members.
pub async fn ipset_save(name: &str) -> Result<Option<SavedSet>, ToolError> {
    match ipset_save_text(name).await? {
        Some(text) => parse_set(name, &text),
        None => Ok(None),
    }
}

/// `ipset restore -exist`, input on stdin.
pub async fn ipset_restore(input: &str) -> Result<(), ToolError> {
    run("ipset", &["restore", "-exist"], Some(input))
        .await
        .map(drop)
}
