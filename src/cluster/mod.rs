//! Kubernetes mode: cluster facts for config templates, the ConfigMap as live config, Events on
//! the Node, and the state file that carries the agent through API server outages.

pub mod facts;

#[cfg(test)]
mod expand_tests;
