//! Running the iptables and ipset binaries: arguments as a vector, data on stdin, never a shell
//! with data in it. Also the backend choice (nft or legacy), made the way kube-proxy's iptables
//! wrapper makes it, and the scratch network namespace rule specs are printed in
//! ([`super::canon`]).
//!
//! The guard reaches the tools only through [`Tools`], so that its decisions can be tested with
//! a fake ([`super::fake`]); [`Binaries`] is the real thing.

mod scratch;

use super::model::TableId;
use super::parse::{self, ParseError, SavedSet, SavedTable};
use crate::model::Family;
use crate::nftables::armed::Armed;
use crate::nftables::netlink::NetlinkError;
use crate::nftables::replay::Image;
use std::collections::HashSet;
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

impl ToolError {
    /// What the tool printed on stderr, when it ran and failed.
    pub fn stderr(&self) -> Option<&str> {
        match self {
            ToolError::Failed { stderr, .. } => Some(stderr),
            _ => None,
        }
    }
}

/// Which iptables the host uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
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

/// One run in a scratch network namespace: sets created, restore input applied, one table read
/// back. Nothing of it is seen outside the namespace, which goes away with the run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScratchRun {
    pub table: TableId,
    /// Sets the rules refer to (`-m set --match-set NAME`): name, type, family (`inet`/`inet6`).
    pub sets: Vec<(String, String, &'static str)>,
    /// `iptables-restore --noflush` input.
    pub input: String,
}

/// The tools the guard runs. Each call is one tool run (or one short script of them).
// The guard runs on a current-thread runtime: its futures need not be `Send`, so the auto-trait
// bounds that `async fn` in a public trait cannot name are not needed.
#[allow(async_fn_in_trait)]
pub trait Tools {
    /// `iptables-save -t TABLE`. `None` when the table does not exist.
    async fn save_table(
        &self,
        backend: Backend,
        table: TableId,
    ) -> Result<Option<SavedTable>, ToolError>;
    /// One transaction (`iptables-restore --noflush -w`, input on stdin). Returns the tool's pid,
    /// which nf_tables names in the NEWGEN message of the transaction.
    async fn restore(
        &self,
        backend: Backend,
        family: Family,
        input: &str,
    ) -> Result<Option<u32>, ToolError>;
    /// `ipset list -n`: the names of every set.
    async fn ipset_names(&self) -> Result<HashSet<String>, ToolError>;
    /// `ipset save NAME` as printed; `None` when the set does not exist.
    async fn ipset_save_text(&self, name: &str) -> Result<Option<String>, ToolError>;
    /// `ipset restore -exist`, input on stdin.
    async fn ipset_restore(&self, input: &str) -> Result<(), ToolError>;
    /// Rules counted in `iptables-save` of one backend and family (backend detection); `None`
    /// when that iptables cannot be run.
    async fn count_rules(&self, backend: Backend, family: Family) -> Option<usize>;
    /// Runs `run` in a scratch network namespace and returns what `iptables-save -t TABLE`
    /// printed there; [`ScratchError::Unavailable`] when no namespace can be made.
    async fn scratch(&self, backend: Backend, run: &ScratchRun) -> Result<String, ScratchError>;
    /// The image of an iptables-nft chain and its jumps ([`crate::nftables::replay`]): the
    /// chain holds `rules` rules and each of `jumps` (chain, put first) one jump to it. `None`
    /// where images are not taken (the legacy backend, tools without netlink).
    fn capture_chain(
        &self,
        _backend: Backend,
        _table: TableId,
        _chain: &str,
        _rules: usize,
        _jumps: &[(String, bool)],
    ) -> Result<Option<Image>, NetlinkError> {
        Ok(None)
    }
    /// Creates (or replaces) a spare ([`crate::nftables::spare`]) with `build`, in one
    /// transaction at generation `genid`; returns its handle and the id nf_tables names in the
    /// transaction's NEWGEN. `None` where spares are not made.
    fn make_spare(
        &self,
        _backend: Backend,
        _table: TableId,
        _spare: &str,
        _build: &Image,
        _genid: u32,
    ) -> Result<Option<(u64, u32)>, NetlinkError> {
        Ok(None)
    }
    /// Deletes the spares named that are in `table`, in one transaction; returns the id
    /// nf_tables names in its NEWGEN, if it deleted any.
    fn drop_spares(
        &self,
        _backend: Backend,
        _table: TableId,
        _names: &[String],
    ) -> Result<Option<u32>, NetlinkError> {
        Ok(None)
    }
    /// Commits chain images in one transaction at generation `genid`; returns the id that
    /// nf_tables names in its NEWGEN.
    fn replay(&self, _images: &[&Image], _genid: u32) -> Result<u32, NetlinkError> {
        Err(NetlinkError::Io(std::io::ErrorKind::Unsupported.into()))
    }
    /// Arms chain images for the responder ([`crate::nftables::responder`]), replacing what
    /// guard `owner` armed before; `at_gen`: the last generation the guard read.
    fn arm(&self, _owner: u64, _at_gen: Option<u32>, _armed: Vec<Armed>) {}
    /// The kernel's current generation, read before subscribing to the notifications.
    fn generation(&self) -> Option<u32> {
        None
    }
}

#[derive(Debug, Error)]
pub enum ScratchError {
    /// No scratch namespace could be made (no user namespaces and no CAP_SYS_ADMIN, no
    /// `unshare`): rule specs cannot be printed by iptables before they are written.
    #[error("no scratch network namespace can be made: {0}")]
    Unavailable(String),
    /// The tools ran and refused the input.
    #[error("{0}")]
    Refused(String),
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

/// The backend in use and how it was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Detected {
    pub backend: Backend,
    /// Rules counted per backend (nft, legacy); `None` when the backend was given.
    pub counts: Option<[usize; 2]>,
}

/// nft or legacy: whichever holds more rules (IPv4 and IPv6 together); nft on a tie, as it is
/// the default of every current distribution. This is what kube-proxy's iptables wrapper does.
/// Logs nothing: `run` says what it found, `check` and `snapshot` keep their output clean.
pub async fn detect_with<T: Tools>(tools: &T, choice: BackendChoice) -> Detected {
    let backend = match choice {
        BackendChoice::Nft => Backend::Nft,
        BackendChoice::Legacy => Backend::Legacy,
        BackendChoice::Auto => {
            let mut counts = [0usize; 2];
            for (i, backend) in [Backend::Nft, Backend::Legacy].into_iter().enumerate() {
                for family in [Family::Ipv4, Family::Ipv6] {
                    counts[i] += tools.count_rules(backend, family).await.unwrap_or(0);
                }
            }
            let backend = if counts[1] > counts[0] {
                Backend::Legacy
            } else {
                Backend::Nft
            };
            return Detected {
                backend,
                counts: Some(counts),
            };
        }
    };
    Detected {
        backend,
        counts: None,
    }
}

/// [`detect_with`] the real tools.
pub async fn detect(choice: BackendChoice) -> Backend {
    detect_with(&Binaries, choice).await.backend
}

/// The real tools.
#[derive(Clone, Copy, Debug, Default)]
pub struct Binaries;

impl Tools for Binaries {
    async fn save_table(
        &self,
        backend: Backend,
        table: TableId,
    ) -> Result<Option<SavedTable>, ToolError> {
        let program = backend.save_binary(table.family);
        let out = run(&program, &["-t", table.table.as_str()], None).await?;
        let mut tables = parse::iptables_save(&out.stdout).map_err(|source| ToolError::Parse {
            program: program.clone(),
            source,
        })?;
        Ok(tables.remove(table.table.as_str()))
    }

    async fn restore(
        &self,
        backend: Backend,
        family: Family,
        input: &str,
    ) -> Result<Option<u32>, ToolError> {
        let program = backend.restore_binary(family);
        Ok(run(&program, &["--noflush", "-w"], Some(input)).await?.pid)
    }

    async fn ipset_names(&self) -> Result<HashSet<String>, ToolError> {
        let out = run("ipset", &["list", "-n"], None).await?;
        Ok(out
            .stdout
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect())
    }

    async fn ipset_save_text(&self, name: &str) -> Result<Option<String>, ToolError> {
        match run("ipset", &["save", name], None).await {
            Ok(out) => Ok(Some(out.stdout)),
            Err(ToolError::Failed { stderr, .. }) if stderr.contains("does not exist") => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn ipset_restore(&self, input: &str) -> Result<(), ToolError> {
        run("ipset", &["restore", "-exist"], Some(input))
            .await
            .map(drop)
    }

    async fn count_rules(&self, backend: Backend, family: Family) -> Option<usize> {
        let out = run(&backend.save_binary(family), &[], None).await.ok()?;
        Some(parse::count_rules(&out.stdout))
    }

    async fn scratch(&self, backend: Backend, job: &ScratchRun) -> Result<String, ScratchError> {
        scratch::run(backend, job).await
    }

    fn capture_chain(
        &self,
        backend: Backend,
        table: TableId,
        chain: &str,
        rules: usize,
        jumps: &[(String, bool)],
    ) -> Result<Option<Image>, NetlinkError> {
        if backend != Backend::Nft {
            return Ok(None);
        }
        let family = nfproto(table.family);
        crate::nftables::netlink::shared(|c| {
            c.capture_chain(family, table.table.as_str(), chain, rules, jumps)
        })
    }

    fn make_spare(
        &self,
        backend: Backend,
        table: TableId,
        spare: &str,
        build: &Image,
        genid: u32,
    ) -> Result<Option<(u64, u32)>, NetlinkError> {
        if backend != Backend::Nft {
            return Ok(None);
        }
        let family = nfproto(table.family);
        let name = table.table.as_str();
        let handle =
            crate::nftables::netlink::shared(|c| c.make_spare(family, name, spare, build, genid))?;
        Ok(Some((handle, nix::unistd::gettid().as_raw() as u32)))
    }

    fn drop_spares(
        &self,
        backend: Backend,
        table: TableId,
        names: &[String],
    ) -> Result<Option<u32>, NetlinkError> {
        if backend != Backend::Nft {
            return Ok(None);
        }
        let family = nfproto(table.family);
        let table = table.table.as_str();
        let dropped = crate::nftables::netlink::shared(|c| c.drop_spares(family, table, names))?;
        Ok((dropped > 0).then(|| nix::unistd::gettid().as_raw() as u32))
    }

    fn replay(&self, images: &[&Image], genid: u32) -> Result<u32, NetlinkError> {
        crate::nftables::responder::replay(images, genid)
    }

    fn arm(&self, owner: u64, at_gen: Option<u32>, armed: Vec<Armed>) {
        crate::nftables::responder::arm(owner, at_gen, armed);
    }

    fn generation(&self) -> Option<u32> {
        crate::nftables::netlink::shared(|c| c.generation()).ok()
    }
}

/// The NFPROTO_* number of an iptables family.
pub fn nfproto(family: Family) -> u8 {
    match family {
        Family::Ipv4 => 2,
        Family::Ipv6 => 10,
    }
}

/// Parses one set out of `ipset save NAME` text.
pub fn parse_set(name: &str, text: &str) -> Result<Option<SavedSet>, ToolError> {
    let mut sets = parse::ipset_save(text).map_err(|source| ToolError::Parse {
        program: "ipset".into(),
        source,
    })?;
    Ok(sets.remove(name))
}

/// `ipset save NAME` through `tools`: one set with its members.
pub async fn ipset_save<T: Tools>(tools: &T, name: &str) -> Result<Option<SavedSet>, ToolError> {
    match tools.ipset_save_text(name).await? {
        Some(text) => parse_set(name, &text),
        None => Ok(None),
    }
}
