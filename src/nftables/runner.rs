//! The `nft` binary behind a narrow trait, so that the engine's decisions can be tested with a
//! fake. Arguments as a vector and the transaction on standard input, never a shell.
//!
//! Why `nft -f -` and not netlink batches of netwarden's own: a rule is nft language, and only
//! nft (libnftables) compiles it into the kernel's expressions; netwarden would have to carry a
//! second compiler. Why a process and not libnftables in-process: the library is a C parser and
//! evaluator whose crash would take the agent with it, and whose ABI would tie the build to one
//! distribution's library; spawning costs a few milliseconds a transaction (measured in
//! docs/benchmarks.md), which the event path pays once per repair, and it is what kube-proxy's
//! own nftables backend does too.
//!
//! The exception is a protected table deleted whole: it is put back from the kernel's own dump
//! of it, taken when it was last verified in sync, through the agent's netlink socket
//! ([`super::replay`] says why; the image is already compiled, so nothing needs nft).

use super::armed::Armed;
use super::model::{RuleText, TableKey};
use super::netlink::NetlinkError;
use super::replay::{Census, Image};
use std::future::Future;
use std::process::Stdio;
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

#[derive(Debug, Error)]
pub enum NftError {
    #[error("cannot run nft: {0} (is the nftables package installed?)")]
    Spawn(#[source] std::io::Error),
    #[error("`nft {args}` failed ({status}): {stderr}")]
    Failed {
        args: String,
        status: String,
        stderr: String,
    },
}

/// A transaction nft committed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// The nft process: nf_tables names it in the transaction's NEWGEN message.
    pub pid: Option<u32>,
    /// nft's echo (`-e -a`): each object added, as nft prints it, with its handle.
    pub echo: String,
}

pub trait Nft {
    /// `nft -a -s list table FAMILY NAME`; `None` when the table does not exist.
    fn list(&mut self, table: &TableKey) -> impl Future<Output = Result<Option<String>, NftError>>;
    /// `nft -e -a -f -` with the transaction on standard input.
    fn apply(&mut self, transaction: &str) -> impl Future<Output = Result<Applied, NftError>>;
    /// `nft list tables`: every table of the namespace.
    fn tables(&mut self) -> impl Future<Output = Result<Vec<TableKey>, NftError>>;
    /// The table's image ([`super::replay`]) if it holds `expected`; `None` when the table
    /// does not exist.
    fn capture(
        &mut self,
        table: &TableKey,
        expected: &Census,
    ) -> Result<Option<Image>, NetlinkError>;
    /// Commits the images in one transaction, valid only at generation `genid`; returns the
    /// id of the thread that committed (what nf_tables names in the transaction's NEWGEN).
    fn replay(&mut self, images: &[&Image], genid: u32) -> Result<u32, NetlinkError>;
    /// Arms images for the responder ([`super::responder`]), replacing what engine `owner`
    /// armed before; `at_gen`: the last generation the engine read.
    fn arm(&mut self, _owner: u64, _at_gen: Option<u32>, _armed: Vec<Armed>) {}
    /// The kernel's current generation, read before subscribing to the notifications: the
    /// generation an engine's first images are of.
    fn generation(&mut self) -> Option<u32> {
        None
    }
}

/// The real `nft`, and the process's netlink socket for images ([`super::netlink::shared`]).
#[derive(Clone, Debug)]
pub struct NftBinary {
    pub program: String,
}

impl Default for NftBinary {
    fn default() -> NftBinary {
        NftBinary {
            program: "nft".into(),
        }
    }
}

impl NftBinary {
    async fn run(
        &self,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<(String, Option<u32>), NftError> {
        let mut cmd = Command::new(&self.program);
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(NftError::Spawn)?;
        let pid = child.id();
        if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // nft reads all of it before it commits; an early exit closes the pipe and its
            // status and standard error say why.
            let _ = pipe.write_all(data.as_bytes()).await;
            drop(pipe);
        }
        let out = child.wait_with_output().await.map_err(NftError::Spawn)?;
        if !out.status.success() {
            return Err(NftError::Failed {
                args: args.join(" "),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok((String::from_utf8_lossy(&out.stdout).into_owned(), pid))
    }
}

impl Nft for NftBinary {
    async fn tables(&mut self) -> Result<Vec<TableKey>, NftError> {
        let (out, _) = self.run(&["list", "tables"], None).await?;
        Ok(out
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                match (w.next(), w.next(), w.next()) {
                    (Some("table"), Some(f), Some(n)) => Some(TableKey {
                        family: super::model::NfFamily::parse(f)?,
                        name: n.to_owned(),
                    }),
                    _ => None,
                }
            })
            .collect())
    }

    async fn list(&mut self, table: &TableKey) -> Result<Option<String>, NftError> {
        let family = table.family.as_str();
        match self
            .run(&["-a", "-s", "list", "table", family, &table.name], None)
            .await
        {
            Ok((out, _)) => Ok(Some(out)),
            Err(NftError::Failed { stderr, .. })
                if stderr.contains("No such file or directory") =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    async fn apply(&mut self, transaction: &str) -> Result<Applied, NftError> {
        let (echo, pid) = self
            .run(&["-e", "-a", "-f", "-"], Some(transaction))
            .await?;
        Ok(Applied { pid, echo })
    }

    fn capture(
        &mut self,
        table: &TableKey,
        expected: &Census,
    ) -> Result<Option<Image>, NetlinkError> {
        super::netlink::shared(|c| c.capture(table, expected))
    }

    fn replay(&mut self, images: &[&Image], genid: u32) -> Result<u32, NetlinkError> {
        super::responder::replay(images, genid)
    }

    fn arm(&mut self, owner: u64, at_gen: Option<u32>, armed: Vec<Armed>) {
        super::responder::arm(owner, at_gen, armed);
    }

    fn generation(&mut self) -> Option<u32> {
        super::netlink::shared(|c| c.generation()).ok()
    }
}

/// The rules nft's echo printed for each `add rule` of a transaction, in order, as
/// (table, chain, printed rule).
pub fn echoed_rules(echo: &str) -> Vec<(String, String, RuleText)> {
    echo.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("add rule ")?;
            let rest = match rest.rfind(" # handle ") {
                Some(at) => &rest[..at],
                None => rest,
            };
            let mut it = rest.splitn(4, ' ');
            let (family, table, chain, mut rule) = (it.next()?, it.next()?, it.next()?, it.next()?);
            // nft's echo may put where the rule went first (`handle 2 …`, the rule before it).
            for word in ["handle ", "position "] {
                if let Some((n, r)) = rule.strip_prefix(word).and_then(|r| r.split_once(' ')) {
                    if n.bytes().all(|b| b.is_ascii_digit()) {
                        rule = r;
                    }
                }
            }
            let (body, comment) = super::text::split_comment(&super::text::collapse(rule));
            Some((
                format!("{family} {table}"),
                chain.to_owned(),
                RuleText { body, comment },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_echo() {
        let echo = "add table ip x # handle 225\nadd chain ip x c # handle 1\nadd rule ip x c meta mark & 0x00004000 == 0x00000000 return comment \"a b\" # handle 2\nadd rule ip x c handle 2 masquerade fully-random # handle 3\nadd element ip x s { 10.96.0.7 }\n# new generation 328 by process 25373 (nft)\n";
        assert_eq!(
            echoed_rules(echo),
            vec![
                (
                    "ip x".into(),
                    "c".into(),
                    RuleText {
                        body: "meta mark & 0x00004000 == 0x00000000 return".into(),
                        comment: Some("a b".into())
                    }
                ),
                (
                    "ip x".into(),
                    "c".into(),
                    RuleText {
                        body: "masquerade fully-random".into(),
                        comment: None
                    }
                )
            ]
        );
    }
}
