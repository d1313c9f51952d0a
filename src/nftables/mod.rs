//! Native nftables: tables, chains, rules, sets and maps that kube-proxy's nftables mode,
//! flannel, Calico and others write with `nft`, protected like the iptables chains of
//! [`crate::netfilter`] but self-contained (its own notification socket, reads and transactions).
//!
//! Pure: [`model`], [`text`] (what may go into a transaction), [`schema`] (hooks, priorities,
//! element types), [`listing`] (`nft list` output), [`plan`] (the diff), [`render`] (the `nft -f`
//! transaction), [`replay`] (a table's last verified image and the batch that restores it),
//! [`spare`] (an iptables-nft chain's spare and the batch that renames it into the chain),
//! [`watch`] (which tables the notifications touched), [`armed`] (which armed image a
//! transaction fires). Effectful: [`runner`] (the `nft` binary and the agent's own netlink
//! socket, [`netlink`], behind a trait tests can fake), [`events`] (the nf_tables notification
//! socket), [`responder`] (the thread that commits armed images) and [`engine`] (the task).

pub mod adopt;
pub mod armed;
pub mod engine;
pub mod events;
pub mod listing;
pub mod model;
pub mod netlink;
pub mod plan;
pub mod render;
pub mod replay;
pub mod responder;
pub mod runner;
pub mod schema;
pub mod spare;
pub mod text;
pub mod watch;
