//! Command-line interface.

use clap::{Parser, Subcommand, ValueEnum};
pub use netwarden::netfilter::tools::BackendChoice;
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
        /// iptables backend for protected chains: auto picks the one holding rules.
        #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
        iptables_backend: BackendChoice,
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
        #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
        iptables_backend: BackendChoice,
    },
    /// Print a config that protects what is live now, filtered by selectors (a kind without a
    /// selector is left out). The output validates; review it before use.
    Snapshot {
        #[arg(long)]
        netns: Option<String>,
        /// Route tables whose routes to protect (comma-separated: 77,100,main).
        #[arg(long, value_delimiter = ',')]
        tables: Vec<String>,
        /// Rule priorities to protect, A-B inclusive (e.g. 100-32765).
        #[arg(long)]
        priorities: Option<String>,
        /// User chains to protect: a regex matched at the start of the name (`CNI-` is a prefix).
        #[arg(long)]
        chains: Option<String>,
        /// ipsets to protect: a regex matched at the start of the name.
        #[arg(long)]
        sets: Option<String>,
        /// Devices whose addresses to protect: a regex matched at the start of the name.
        #[arg(long)]
        addresses: Option<String>,
        #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
        iptables_backend: BackendChoice,
    },
    /// Validate a config file. Exit 0 valid, 2 invalid.
    Validate { file: PathBuf },
    /// Run a self-contained demonstration in a sandbox network namespace.
    Demo,
}
