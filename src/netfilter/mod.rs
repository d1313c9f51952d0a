//! iptables chains and ipsets: the second protector beside the rtnetlink [`crate::reconcile`]
//! agent.
//!
//! Pure layers: [`model`], [`rulespec`] (tokenising and validating rule specs), [`parse`]
//! (`iptables-save` / `ipset save` output), [`plan`] (the diff), [`blind`] (repairs from
//! notifications alone), [`render`] (restore input), [`adopted`] (judging adopted chains and
//! sets). Effectful: [`tools`] (the iptables and ipset binaries behind a trait, with arguments as
//! vectors and data on stdin; `tools/scratch.rs`: a scratch namespace per run), [`canon`] (rule
//! specs printed by iptables in a scratch namespace), [`events`] (the nf_tables netlink socket)
//! and [`guard`] (the task that keeps them in place).

pub mod adopted;
pub mod blind;
pub mod canon;
pub mod events;
#[cfg(test)]
pub mod fake;
pub mod guard;
pub mod model;
pub mod parse;
pub mod plan;
pub mod render;
pub mod rulespec;
pub mod tools;
