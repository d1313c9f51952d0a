//! systemd-networkd, seen from the agent: which protected objects its next restart or a
//! reconfigure would remove (or drop with an address), and the drop-ins that prevent it
//! (`netwarden networkd`; in Kubernetes mode a metric and a warning Event at start).
//!
//! Only as much of networkd's semantics as that decision needs, following systemd 252 (Debian 12,
//! Ubuntu 22.04's 249 and 24.04's 255 behave the same in these respects): its configuration
//! files and search paths ([`config`], with the syntax of [`unit`] and the globs of [`glob`]), and
//! what it drops when it (re)configures a link ([`predict`]). [`host`] reads a node; [`report`]
//! puts it together.

pub mod config;
pub mod glob;
pub mod host;
pub mod predict;
pub mod report;
pub mod unit;
