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
        #[arg(
            long,
            required_unless_present = "configmap",
            conflicts_with = "configmap"
        )]
        config: Option<PathBuf>,
        /// Kubernetes mode (docs/kubernetes.md).
        #[command(flatten)]
        kube: KubeArgs,
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
        /// Where the rules adopted through `spec.adopt` are kept across restarts (written
        /// atomically). Without it, adopted rules are protected only while the agent runs.
        #[arg(long, value_name = "PATH")]
        adopted_state: Option<PathBuf>,
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
        /// Also check the rules and routes adopted by a running agent (its --adopted-state).
        #[arg(long, value_name = "PATH")]
        adopted_state: Option<PathBuf>,
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
    Validate {
        file: PathBuf,
        /// Accept templates (`{{ node.podCIDRs.ipv4 }}`), as in a ConfigMap for Kubernetes mode.
        #[arg(long)]
        kubernetes: bool,
    },
    /// Run a self-contained demonstration in a sandbox network namespace.
    Demo,
}

/// Kubernetes mode: the config comes from a ConfigMap, templates in it are expanded with facts
/// from the cluster, repairs are told as Events on the Node (docs/kubernetes.md).
#[derive(clap::Args, Debug)]
pub struct KubeArgs {
    /// The ConfigMap holding the config, as NAMESPACE/NAME. Turns Kubernetes mode on.
    #[arg(long, env = "NETWARDEN_CONFIGMAP", value_name = "NAMESPACE/NAME")]
    pub configmap: Option<String>,
    /// The ConfigMap key holding the config.
    #[arg(long, default_value = "config.yaml", requires = "configmap")]
    pub configmap_key: String,
    /// kubeconfig file; default: the pod's service account, else $KUBECONFIG or ~/.kube/config.
    #[arg(long, requires = "configmap")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (the DaemonSet passes spec.nodeName through the downward API).
    #[arg(long, env = "NODE_NAME", requires = "configmap")]
    pub node_name: Option<String>,
    /// Only Services with these labels are watched (a Kubernetes label selector).
    #[arg(long, requires = "configmap")]
    pub service_selector: Option<String>,
    /// Where the last-known desired state is kept for restarts during API server outages.
    #[arg(long, default_value = "/var/lib/netwarden/state.json")]
    pub state_file: PathBuf,
    /// Repairs are summed over this many milliseconds per Event (tests shorten it).
    #[arg(long, hide = true, default_value_t = 10_000)]
    pub event_window_ms: u64,
}
