//! netwarden: keeps a Linux node's ip rules, routes and addresses the way they are meant to be.
//!
//! Layers, from pure to effectful, are listed in README.md (Layout) and checked by
//! `tests/layers.rs`: [`model`], [`config`], [`desired`], [`plan`] are pure; [`observe`],
//! [`apply`], the engines ([`reconcile`], [`netfilter`], [`nftables`]), [`telemetry`], [`cluster`] and
//! [`app`] (the wiring) are effectful; `testing` is test support, not the production API.

pub mod adopt;
pub mod adopted_state;
pub mod app;
pub mod apply;
pub mod check;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod desired;
pub mod files;
pub mod handoff;
pub mod lifecycle;
pub mod model;
pub mod netfilter;
pub mod netns;
pub mod networkd;
pub mod nftables;
pub mod observe;
pub mod plan;
pub mod pod_liveness;
pub mod reconcile;
pub mod snapshot;
pub mod telemetry;
#[doc(hidden)]
pub mod testing;
