//! Kubernetes mode: cluster facts for config templates, the ConfigMap as live config, Events and
//! a condition on the Node, and the state file that carries the agent through API server
//! outages.
//!
//! Pure: `facts` (what templates read; plain data in [`crate::model::facts`]), `needs` (what a
//! config needs watched), `slim` (the fields read from each object), `listing` (a list response read as it arrives), `retry` (when to ask
//! again), `events` (aggregation of Events), `condition` (the Node condition). Effectful:
//! `client`, `request` (requests whose answers keep their headers), `cache`, `health`, `watch` (list and watch into caches), `report` (Events and the condition),
//! `statefile`, `optional` (the watches a config may or may not need), `run` (the thread that
//! ties them together).

pub mod cache;
pub mod client;
pub mod condition;
pub mod events;
pub mod health;
pub mod listing;
pub mod needs;
mod optional;
mod options;
pub mod report;
pub mod request;
pub mod retry;
pub mod run;
pub mod slim;
pub mod statefile;
pub mod watch;

pub use crate::model::facts;

pub use run::{spawn, ClusterError, Message, Options, Update};

#[cfg(test)]
mod expand_tests;
