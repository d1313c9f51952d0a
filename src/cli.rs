//! Command-line interface.

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "netwarden",
    version,
    about = "Keeps ip rules, routes and addresses in place, repairing drift from netlink events"
)]
pub struct Cli {
    /// Log level (error, warn, info, debug, trace) or a tracing filter directive.
    #[arg(
        long,
        global = true,
        default_value = "info",
        env = "NETWARDEN_LOG_LEVEL"
    )]
    pub log_level: String,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent: protect what the config names until stopped (SIGTERM/SIGINT).
    Run {
        /// Config file (apiVersion netwarden.io/v1alpha1, kind ProtectedState).
        #[arg(long)]
        config: PathBuf,
        /// Work inside this network namespace (a name under /run/netns, or a path).
        #[arg(long)]
        netns: Option<String>,
        /// Address of the HTTP endpoints (/metrics, /healthz, /readyz, /status), or `off`.
        /// Bound before entering --netns: the endpoints stay on the host's network.
        /// Default 0.0.0.0:10370 (if that port is taken, the agent runs without them).
        #[arg(long, env = "NETWARDEN_METRICS_ADDR")]
        metrics_addr: Option<String>,
    },
    /// Ask a running agent for the state of each protected object and its last repair.
    Status {
        /// The agent's HTTP address (its --metrics-addr).
        #[arg(long, default_value = "127.0.0.1:10370")]
        addr: String,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Compare the kernel with the config once. Exit 0 in sync, 1 drift, 2 error.
    Check {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        netns: Option<String>,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Validate a config file. Exit 0 valid, 2 invalid.
    Validate { file: PathBuf },
    /// Run a self-contained demonstration in a sandbox network namespace.
    Demo,
}
