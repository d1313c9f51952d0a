//! Kubernetes mode: cluster facts for config templates, the ConfigMap as live config, Events on
//! the Node, and the state file that carries the agent through API server outages.

pub mod events;
pub mod facts;
pub mod run;
pub mod statefile;

pub use run::{spawn, ClusterError, Message, Options, Update};

#[cfg(test)]
mod expand_tests;
