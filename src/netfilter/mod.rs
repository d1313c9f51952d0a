//! iptables chains and ipsets: the second protector beside the rtnetlink [`crate::reconcile`]
//! agent.
//!
//! Pure layers: [`model`], [`rulespec`] (tokenising and validating rule specs), [`parse`]
//! (`iptables-save` / `ipset save` output), [`plan`] (the diff), [`render`] (restore input).
//! Effectful: [`tools`] (running the iptables and ipset binaries with argument vectors and stdin),
//! [`events`] (the nf_tables netlink socket) and [`guard`] (the task that keeps them in place).

pub mod adopted;
pub mod events;
pub mod guard;
pub mod model;
pub mod parse;
pub mod plan;
pub mod render;
pub mod rulespec;
pub mod tools;
