//! Command-line interface.

use clap::{Parser, Subcommand, ValueEnum};
pub use netwarden::netfilter::tools::BackendChoice;
use std::io::Write;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "netwarden",
    version,
    about = "Keeps ip rules, routes and addresses in place, repairing drift from netlink events"
)]
pub struct Cli {
    /// Log level (off, error, warn, info, debug, trace) or comma-separated TARGET=LEVEL
    /// directives (`warn,netwarden::reconcile=debug`). Default: $RUST_LOG, else info.
    #[arg(
        long,
        global = true,
        env = "NETWARDEN_LOG_LEVEL",
        value_parser = log_filter
    )]
    pub log_level: Option<String>,
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

/// `spec.mode` of a snapshot.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotMode {
    Enforce,
    Observe,
}

/// How much of a chain's rules or a set's members a snapshot owns.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ownership {
    /// Require what is there now; never remove anything else.
    Contains,
    /// Exactly what is there now: anything else is removed.
    Exact,
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
        /// Where net.* settings (`spec.sysctls`) are read and written: /proc/sys/net, or a
        /// writable mount of it (in a container /proc/sys is read-only; the DaemonSet mounts
        /// the host's at /host/proc/sys/net).
        #[arg(long, env = "NETWARDEN_SYSCTL_DIR", value_name = "DIR", default_value = netwarden::observe::sysctl::DEFAULT_DIR)]
        sysctl_dir: PathBuf,
        /// The node's root directory as seen by the agent, for the check at start of what
        /// systemd-networkd's next restart would remove (`netwarden networkd`); `off` skips it.
        #[arg(long, value_name = "DIR", default_value = "/")]
        networkd_root: String,
    },
    /// Ask a running agent for the state of each protected object and its last repair.
    Status {
        /// The agent's HTTP address (its --metrics-addr).
        #[arg(long, default_value = "127.0.0.1:10370")]
        addr: String,
        /// Output format: a table, or JSON (kind Status, docs/cli.md).
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Compare the kernel with the config once. Exit 0 in sync, 1 drift, 2 error.
    Check {
        /// Config file (apiVersion netwarden.io/v1alpha1, kind ProtectedState).
        #[arg(long)]
        config: PathBuf,
        /// Look inside this network namespace (a name under /run/netns, or a path).
        #[arg(long)]
        netns: Option<String>,
        /// Output format: a table, or JSON (kind CheckReport, docs/cli.md).
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// iptables backend for protected chains: auto picks the one holding rules.
        #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
        iptables_backend: BackendChoice,
        /// Also check the rules and routes adopted by a running agent (its --adopted-state).
        #[arg(long, value_name = "PATH")]
        adopted_state: Option<PathBuf>,
        /// Where net.* settings (`spec.sysctls`) are read and written: /proc/sys/net, or a
        /// writable mount of it (in a container /proc/sys is read-only; the DaemonSet mounts
        /// the host's at /host/proc/sys/net).
        #[arg(long, env = "NETWARDEN_SYSCTL_DIR", value_name = "DIR", default_value = netwarden::observe::sysctl::DEFAULT_DIR)]
        sysctl_dir: PathBuf,
    },
    /// Print a config that protects what is live now, filtered by selectors (a kind without a
    /// selector is left out). The output validates; review it before use.
    Snapshot {
        /// Look inside this network namespace (a name under /run/netns, or a path).
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
        /// nftables tables to protect (`kube-proxy|flannel`): a regex matched at the start of the
        /// table name; the tables iptables-nft manages are left out.
        #[arg(long)]
        nft_tables: Option<String>,
        /// Devices whose permanent neighbour entries and VXLAN FDB entries (with a remote) to
        /// protect: a regex matched at the start of the name (`flannel`).
        #[arg(long)]
        neighbours: Option<String>,
        /// Devices whose admin state (up) and MTU to protect: a regex as above.
        #[arg(long)]
        links: Option<String>,
        /// Devices whose IPv4 forwarding and rp_filter and IPv6 forwarding to protect, besides
        /// those of `all` and `default` (always included): a regex as above; `'$'` for `all`
        /// and `default` alone.
        #[arg(long)]
        sysctls: Option<String>,
        /// `spec.mode` of the config: enforce repairs drift, observe only reports it.
        #[arg(long, value_enum, default_value_t = SnapshotMode::Enforce)]
        mode: SnapshotMode,
        /// `content` of the chains (iptables and nftables): contains requires today's rules and leaves others alone;
        /// exact also removes rules added later.
        #[arg(long, value_enum, default_value_t = Ownership::Contains)]
        content: Ownership,
        /// `membership` of the sets (ipsets, nftables sets and maps): contains requires today's members and leaves others alone;
        /// exact also removes members added later.
        #[arg(long, value_enum, default_value_t = Ownership::Contains)]
        membership: Ownership,
        /// iptables backend to read chains from: auto picks the one holding rules.
        #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
        iptables_backend: BackendChoice,
    },
    /// What systemd-networkd's next restart (or a reconfigure) would remove of what a config
    /// protects, and the drop-ins that prevent it. Exit 0 nothing at risk at a restart, 1 at
    /// risk, 2 error. Changes nothing unless --write-root is given; never restarts networkd.
    Networkd {
        /// Config file whose protected objects to look for (as `check` takes it).
        #[arg(long)]
        config: PathBuf,
        /// Look at the links of this network namespace (a name under /run/netns, or a path).
        #[arg(long)]
        netns: Option<String>,
        /// The node's root directory as seen from here: networkd's configuration and state are
        /// read below it (`/host` when the node's root is mounted there).
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// Output format: a table, or JSON.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Write the drop-ins below this directory (`/` for the node itself: the
        /// /etc/systemd/... paths shown). They take effect at networkd's next start.
        #[arg(long, value_name = "DIR")]
        write_root: Option<PathBuf>,
    },
    /// Validate a config file, or a ConfigMap manifest holding one (`-`: standard input).
    /// Exit 0 valid, 2 invalid.
    Validate {
        /// A ProtectedState document, or a ConfigMap (or `kubectl kustomize` output with one)
        /// whose data holds it; `-` reads standard input.
        file: String,
        /// Accept templates (`{{ node.podCIDRs.ipv4 }}`), as in a ConfigMap for Kubernetes mode
        /// (implied for a ConfigMap manifest).
        #[arg(long)]
        kubernetes: bool,
        /// The key of a ConfigMap manifest's data holding the config.
        #[arg(long, default_value = "config.yaml")]
        configmap_key: String,
    },
    /// Run a self-contained demonstration in a sandbox network namespace.
    Demo,
}

/// Kubernetes mode: the config comes from a ConfigMap, templates in it are expanded with facts
/// from the cluster, repairs are told as Events on the Node (docs/kubernetes.md).
#[derive(clap::Args, Debug)]
pub struct KubeArgs {
    /// The ConfigMap holding the config, as NAMESPACE/NAME, or NAME in --configmap-namespace.
    /// Turns Kubernetes mode on.
    #[arg(long, env = "NETWARDEN_CONFIGMAP", value_name = "[NAMESPACE/]NAME")]
    pub configmap: Option<String>,
    /// The namespace of a --configmap given as NAME (the DaemonSet passes the pod's own through
    /// the downward API); default: the client's (in a pod, its service account's namespace).
    #[arg(long, env = "POD_NAMESPACE", requires = "configmap")]
    pub configmap_namespace: Option<String>,
    /// The ConfigMap key holding the config.
    #[arg(long, default_value = "config.yaml", requires = "configmap")]
    pub configmap_key: String,
    /// kubeconfig file; default: the pod's service account, else $KUBECONFIG or ~/.kube/config.
    #[arg(long, requires = "configmap")]
    pub kubeconfig: Option<PathBuf>,
    /// The API server to talk to (`https://HOST:PORT`, or HOST:PORT), instead of the one the
    /// credentials name: in a pod that is the `kubernetes` Service VIP, reached through the
    /// datapath the agent may be repairing. The host must be in the API server's certificate.
    #[arg(
        long,
        env = "NETWARDEN_APISERVER",
        value_name = "URL",
        requires = "configmap"
    )]
    pub apiserver: Option<String>,
    /// This node's name (the DaemonSet passes spec.nodeName through the downward API).
    #[arg(long, env = "NODE_NAME", requires = "configmap")]
    pub node_name: Option<String>,
    /// Only Services with these labels are watched (a Kubernetes label selector).
    #[arg(long, requires = "configmap")]
    pub service_selector: Option<String>,
    /// Where the last-known desired state is kept for restarts during API server outages.
    #[arg(long, default_value = "/var/lib/netwarden/state.json")]
    pub state_file: PathBuf,
    /// Protection failing for longer than this (objects pending, repairs failing, an object
    /// fought over, forbidden set members coming back) sets the Node condition
    /// NetworkStateProtected to False.
    #[arg(long, default_value = "5m", value_name = "DURATION", value_parser = condition_after)]
    pub node_condition_after: std::time::Duration,
    /// Repairs are summed over this many milliseconds per Event (tests shorten it).
    #[arg(long, hide = true, default_value_t = 10_000)]
    pub event_window_ms: u64,
    /// Multiplies every API retry delay (tests run the same schedule faster).
    #[arg(long, hide = true, default_value_t = 1.0)]
    pub api_backoff_scale: f64,
}

fn condition_after(s: &str) -> Result<std::time::Duration, String> {
    netwarden::config::duration_arg(
        s,
        "--node-condition-after",
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(24 * 3600),
    )
}

/// Checks a log filter: levels (`off`, `error`, `warn`, `info`, `debug`, `trace`) and
/// `TARGET=LEVEL` directives, comma-separated. tracing itself would take a bare word as a target
/// to log at every level, so a misspelt level would silently log nothing: refused here.
pub fn log_filter(s: &str) -> Result<String, String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let is_level = |l: &str| LEVELS.iter().any(|x| x.eq_ignore_ascii_case(l.trim()));
    if s.trim().is_empty() {
        return Err(
            "empty: use a level (off, error, warn, info, debug, trace) or TARGET=LEVEL".into(),
        );
    }
    for d in s.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = d.rsplit_once('=').map_or(d, |(_, l)| l);
        if !is_level(level) {
            return Err(format!(
                "`{d}`: not a level (off, error, warn, info, debug, trace) or TARGET=LEVEL"
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(s).map_err(|e| format!("`{s}`: {e}"))?;
    Ok(s.to_owned())
}

/// Standard output for the commands' reports. A reader that goes away early (`netwarden check
/// -o json | head`) closes the pipe: the rest is dropped quietly and the command still exits
/// with its own code, instead of failing on EPIPE (Rust ignores SIGPIPE, so every write would
/// return the error and `print!` would panic).
pub struct Stdout;

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match std::io::stdout().lock().write(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(buf.len()),
            r => r,
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match std::io::stdout().lock().flush() {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            r => r,
        }
    }
}

/// Writes a report to standard output (see [`Stdout`]).
pub fn emit(text: &str) -> std::io::Result<()> {
    let mut out = Stdout;
    out.write_all(text.as_bytes())?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_option_has_help_text() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let builtin = matches!(a.get_id().as_str(), "help" | "version");
                if !builtin && !a.is_hide_set() && a.get_help().is_none() {
                    missing.push(format!("{path} {}", a.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {} (the command)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "netwarden", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:?}");
    }

    #[test]
    fn log_filters_are_checked() {
        for ok in [
            "info",
            "DEBUG",
            "warn,netwarden::reconcile=debug",
            "netwarden=trace",
            "off",
        ] {
            assert_eq!(log_filter(ok).as_deref(), Ok(ok), "{ok}");
        }
        for bad in [
            "",
            "verbose",
            "infoo",
            "netwarden",
            "netwarden=loud",
            "info,=x",
        ] {
            assert!(log_filter(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn output_has_a_short_flag() {
        let cli = Cli::try_parse_from(["netwarden", "status", "-o", "json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Status {
                output: Output::Json,
                ..
            }
        ));
        assert!(
            Cli::try_parse_from(["netwarden", "check", "--config", "x", "-o", "yaml"]).is_err()
        );
    }
}
