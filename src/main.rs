mod cli;
mod kubernetes;

use anyhow::Context;
use clap::Parser;
use cli::{emit, BackendChoice, Cli, Command, LogFormat, Output};
use netwarden::config::{self, Config};
use netwarden::desired::DesiredState;
use netwarden::netfilter::canon::{Canonicaliser, Refusal};
use netwarden::netfilter::guard::{Guard, GuardError};
use netwarden::netfilter::tools::Binaries;
use netwarden::{check, demo, netns, obs, reconcile};
use std::process::ExitCode;
use std::time::Duration;
use tracing_subscriber::EnvFilter;

/// Exit code for errors (bad config, cannot reach or change the kernel); 1 is kept for "drift"
/// in `check`.
const EXIT_ERROR: u8 = 2;
/// `run --netns NAME`: the namespace was removed (or replaced) under the agent.
const EXIT_NETNS_GONE: u8 = 3;

/// The log filter: --log-level (or NETWARDEN_LOG_LEVEL), else RUST_LOG, else `info`. A filter
/// that does not parse is an error, not a silent fallback.
fn init_logging(cli: &Cli) -> anyhow::Result<()> {
    let text = match (&cli.log_level, std::env::var("RUST_LOG")) {
        (Some(level), _) => level.clone(),
        (None, Ok(env)) if !env.trim().is_empty() => {
            cli::log_filter(&env).map_err(|e| anyhow::anyhow!("RUST_LOG: {e}"))?
        }
        _ => "info".to_owned(),
    };
    let filter = EnvFilter::try_new(&text)?;
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match cli.log_format {
        // Every field escaped: nothing logged can forge a line (see obs::logfmt).
        LogFormat::Text => builder.fmt_fields(obs::logfmt::EscapedFields).init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}

fn main() -> ExitCode {
    // Before anything else: a SIGTERM before `run` installs its handlers must not kill it.
    netwarden::lifecycle::hold();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. }) {
        netwarden::lifecycle::release();
    }
    if let Err(e) = init_logging(&cli) {
        eprintln!("netwarden: {e:#}");
        return ExitCode::from(EXIT_ERROR);
    }
    let running = matches!(cli.command, Command::Run { .. });
    // Settings are read and written below this directory by whichever command needs them.
    if let Command::Run { sysctl_dir, .. } | Command::Check { sysctl_dir, .. } = &cli.command {
        netwarden::observe::sysctl::set_dir(sysctl_dir.clone());
    }
    let result = match cli.command {
        Command::Validate {
            file,
            kubernetes,
            configmap_key,
        } => validate(&file, kubernetes, &configmap_key),
        Command::Run {
            config: Some(config),
            kube: _,
            netns,
            iptables_backend,
            metrics_addr,
            adopted_state,
            sysctl_dir: _,
            networkd_root,
        } => run(
            &config,
            netns.as_deref(),
            iptables_backend,
            metrics_addr.as_deref(),
            adopted_state,
            networkd_root_of(&networkd_root),
        ),
        Command::Run {
            config: None,
            kube,
            netns,
            iptables_backend,
            metrics_addr,
            adopted_state,
            sysctl_dir: _,
            networkd_root,
        } => kubernetes::run(
            kube,
            netns.as_deref(),
            iptables_backend,
            metrics_addr.as_deref(),
            adopted_state,
            networkd_root_of(&networkd_root),
        ),
        Command::Status { addr, output } => status(&addr, output),
        Command::Check {
            config,
            netns,
            output,
            iptables_backend,
            adopted_state,
            sysctl_dir: _,
        } => check(
            &config,
            netns.as_deref(),
            output,
            iptables_backend,
            adopted_state.as_deref(),
        ),
        Command::Demo => demo_command(),
        Command::Networkd {
            config,
            netns,
            root,
            output,
            write_root,
        } => networkd(
            &config,
            netns.as_deref(),
            &root,
            output,
            write_root.as_deref(),
        ),
        Command::Snapshot {
            netns,
            tables,
            priorities,
            chains,
            sets,
            addresses,
            neighbours,
            links,
            sysctls,
            mode,
            content,
            membership,
            nft_tables,
            iptables_backend,
        } => snapshot(
            netns.as_deref(),
            &tables,
            priorities.as_deref(),
            [
                chains, sets, addresses, nft_tables, neighbours, links, sysctls,
            ],
            (mode, content, membership),
            iptables_backend,
        ),
    };
    match result {
        Ok(code) => code,
        Err(e) if running => {
            // The agent's last log line, escaped like the others.
            tracing::error!(error = %format!("{e:#}"), "netwarden run failed");
            ExitCode::from(EXIT_ERROR)
        }
        Err(e) => {
            // A list of errors keeps its lines; nothing within a line is printed raw.
            let text = format!("{e:#}");
            let lines: Vec<String> = text.lines().map(obs::logfmt::escape).collect();
            eprintln!("netwarden: {}", lines.join("\n"));
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn load(path: &std::path::Path) -> anyhow::Result<Config> {
    // The config error already names the file, line and field.
    config::load(path).map_err(|e| anyhow::anyhow!("{e}"))
}

fn validate(file: &str, kubernetes: bool, key: &str) -> anyhow::Result<ExitCode> {
    // Bounded, like every config read: `validate /dev/zero` is an error, not a growing heap.
    let (source, text) = if file == "-" {
        let source = "<stdin>".to_owned();
        let text = config::read_from(&source, std::io::stdin().lock());
        (source, text)
    } else {
        (
            file.to_owned(),
            config::read_text(std::path::Path::new(file)),
        )
    };
    let text = text.map_err(|e| anyhow::anyhow!("{e}"))?;
    // The config error already names the file, line and field.
    let doc = config::parse_document(&source, &text, key, kubernetes)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let cfg = &doc.config;
    let what = match &doc.configmap {
        Some(cm) => format!("{source}: {cm}"),
        None => source.clone(),
    };
    rule_forms(&source, cfg)?;
    emit(&format!(
        "{what}: valid: {} rules, {} routes, {} addresses, {} chains, {} ipsets, resync {:?}\n",
        cfg.rules.len(),
        cfg.routes.len(),
        cfg.addresses.len(),
        cfg.chains.len(),
        cfg.ipsets.len(),
        cfg.resync
    ))?;
    if !cfg.nftables.tables.is_empty() {
        emit(&format!(
            "{what}: {} nftables tables\n",
            cfg.nftables.tables.len()
        ))?;
    }
    let node = [
        (cfg.neighbours.len(), "neighbour entries"),
        (cfg.fdb.len(), "FDB entries"),
        (cfg.links.len(), "links"),
        (cfg.sysctls.len(), "sysctls"),
    ];
    if node.iter().any(|(n, _)| *n > 0) {
        let list: Vec<String> = node.iter().map(|(n, what)| format!("{n} {what}")).collect();
        emit(&format!("{what}: and {}\n", list.join(", ")))?;
    }
    if !cfg.templates.is_empty() {
        emit(&format!(
            "{what}: {} objects with templates\n",
            cfg.templates.len()
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `validate`: the rule specs as iptables-nft prints them, in a scratch namespace (nothing of the
/// node's is read or changed). A rule that cannot be made canonical is an error; one spelled
/// otherwise than printed is said (it is compared in the printed form).
fn rule_forms(source: &str, cfg: &Config) -> anyhow::Result<()> {
    if cfg.chains.is_empty() {
        return Ok(());
    }
    let (rt, _) = runtime(None)?;
    let canon = Canonicaliser::new(BackendChoice::Nft);
    let out = rt.block_on(canon.canonicalise(&Binaries, &cfg.chains, &cfg.ipsets));
    if let Some(why) = &out.unavailable {
        eprintln!(
            "{source}: rule specs not checked against iptables ({why}): only iptables' own options are put in printed form; write the rest as iptables-save prints them"
        );
    }
    for r in &out.rewritten {
        eprintln!(
            "{source}: {}: iptables prints `{}` as `{}`; it is compared in that form",
            r.site, r.written, r.printed
        );
    }
    if !out.refused.is_empty() {
        anyhow::bail!("{}", refused(source, &out.refused));
    }
    Ok(())
}

/// The guard's start error, with the file named where rule specs were refused.
fn guard_error(path: &std::path::Path, e: GuardError) -> anyhow::Error {
    match e {
        GuardError::Refused(r) => anyhow::anyhow!("{}", refused(&path.display().to_string(), &r)),
        e => e.into(),
    }
}

/// Rule specs that cannot be made canonical, one per line with the file.
fn refused(source: &str, r: &[Refusal]) -> String {
    r.iter()
        .map(|r| {
            format!(
                "{source}: {}: {} (chain `{}`): `{}`",
                r.site, r.why, r.chain, r.rule
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Enters the namespace (setns moves the calling thread only: threads started before, such as the
/// Kubernetes one, stay on the host's network) and builds a single-threaded runtime: the repair
/// path is one event → one request, and staying on one thread avoids cross-thread wakeups.
pub(crate) fn runtime(
    netns: Option<&str>,
) -> anyhow::Result<(tokio::runtime::Runtime, Option<netns::Entered>)> {
    let entered = netns.map(netns::enter).transpose()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    Ok((rt, entered))
}

/// How `run` ended, when it did not fail.
pub(crate) enum Ended {
    /// SIGTERM or SIGINT.
    Stopped,
    /// The namespace given by `--netns` was removed.
    NetnsGone,
}

impl Ended {
    pub(crate) fn code(self) -> ExitCode {
        match self {
            Ended::Stopped => ExitCode::SUCCESS,
            Ended::NetnsGone => ExitCode::from(EXIT_NETNS_GONE),
        }
    }
}

/// Completes when the namespace the agent entered is gone (never, without `--netns`), saying so.
pub(crate) async fn netns_gone(entered: Option<&netns::Entered>) {
    match entered {
        Some(ns) => {
            ns.gone().await;
            tracing::error!(
                netns = %ns.name,
                "network namespace removed (or replaced) under the agent: nothing left to protect; exiting"
            );
        }
        None => std::future::pending().await,
    }
}

/// Refuses to start (exit 2) when the kernel would refuse every repair: without CAP_NET_ADMIN
/// over the namespace. An agent that only observes needs no such right and goes on.
pub(crate) async fn require_kernel_access(enforces: bool) -> anyhow::Result<()> {
    match netwarden::apply::check_write_access().await {
        Ok(()) => Ok(()),
        Err(e) if e.is_permission() && !enforces => {
            tracing::warn!(error = %e, "the kernel refuses changes from this process (no CAP_NET_ADMIN?); fine while everything is observed, but a repair will be refused");
            Ok(())
        }
        Err(e) if e.is_permission() => Err(anyhow::anyhow!(
            "no kernel access: the kernel refuses changes to this network namespace ({e}); \
             netwarden needs CAP_NET_ADMIN in it to repair anything"
        )),
        Err(e) => Err(anyhow::anyhow!("cannot reach the kernel: {e}")),
    }
}

/// `--networkd-root`: a directory, or `off`.
fn networkd_root_of(arg: &str) -> Option<std::path::PathBuf> {
    (arg != "off").then(|| std::path::PathBuf::from(arg))
}

/// Starts the check at start of what systemd-networkd would remove (see `networkd::host`).
pub(crate) fn check_networkd(
    root: Option<std::path::PathBuf>,
    desired: &DesiredState,
    telemetry: &std::sync::Arc<obs::Telemetry>,
) {
    if let Some(root) = root {
        tokio::spawn(netwarden::networkd::host::check_at_start(
            root,
            desired.clone(),
            telemetry.clone(),
        ));
    }
}

fn run(
    path: &std::path::Path,
    netns: Option<&str>,
    backend: BackendChoice,
    metrics_addr: Option<&str>,
    adopted_state: Option<std::path::PathBuf>,
    networkd_root: Option<std::path::PathBuf>,
) -> anyhow::Result<ExitCode> {
    let text = config::read_text(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let cfg =
        config::parse(&path.display().to_string(), &text).map_err(|e| anyhow::anyhow!("{e}"))?;
    let desired = DesiredState::from_config(&cfg);
    let telemetry = obs::Telemetry::new();
    telemetry.config_loaded(true);
    let listener = bind_metrics(metrics_addr)?;
    let (rt, entered) = runtime(netns)?;
    if let Some(listener) = listener {
        let addr = obs::http::spawn(listener, telemetry.clone())?;
        tracing::info!(%addr, "serving /metrics, /healthz, /readyz, /status");
    }
    let path = path.to_path_buf();
    let adopted_state = check_adopted_state(adopted_state, &telemetry);
    let ended = rt.block_on(async move {
        let (mut stop, hup) = netwarden::lifecycle::install().context("cannot handle signals")?;
        let checked = desired.clone();
        let start = async {
            require_kernel_access(cfg.enforces_anything()).await?;
            // nftables wiring: the engine (src/nftables/) starts first.
            let nft = netwarden::nftables::engine::Engine::start(cfg.nftables.clone(), cfg.resync)
                .await?
                .with_telemetry(telemetry.clone());
            // Chains and sets first: `initial sync done` then means everything is in place.
            let adoption = adoption(&cfg.adopt, adopted_state.as_deref());
            let guard = Guard::start_adopting(
                cfg.chains.clone(),
                cfg.ipsets.clone(),
                cfg.poll_interval,
                cfg.resync,
                backend,
                adoption,
            )
            .await
            .map_err(|e| guard_error(&path, e))?
            .with_telemetry(telemetry.clone());
            let opts = reconcile::Options {
                resync: cfg.resync,
                telemetry: telemetry.clone(),
                adopted_state,
                pods: None,
            };
            let agent = reconcile::Agent::start(desired, opts).await?;
            Ok::<_, anyhow::Error>((nft, guard, agent))
        };
        // A stop or the end of the namespace during the initial sync ends it where it is: what
        // was applied stays, nothing is undone.
        let (nft, guard, agent) = tokio::select! {
            _ = stop.requested() => {
                tracing::info!("shutting down during the initial sync; what is in place stays");
                return Ok(Ended::Stopped);
            }
            _ = netns_gone(entered.as_ref()) => return Ok(Ended::NetnsGone),
            r = start => r?,
        };
        let (guard_tx, guard_rx) = tokio::sync::mpsc::channel(1);
        let (nft_tx, nft_rx) = tokio::sync::mpsc::channel(1);
        let reloads = obs::reload_on_sighup(
            path,
            hup,
            text,
            telemetry.clone(),
            obs::ReloadFollowers {
                guard: Some(obs::GuardSide {
                    tx: guard_tx,
                    canon: guard.canonicaliser(),
                }),
                nftables: Some(nft_tx),
            },
            &cfg,
        );
        check_networkd(networkd_root, &checked, &telemetry);
        // One writer for the file: the agent's, which the guard shares for its part.
        let guard = guard.with_store(agent.adopted_store());
        tokio::select! {
            r = agent.run_with(stop.requested(), Some(reloads)) => { r?; }
            r = guard.run_with(Some(guard_rx)) => { r?; }
            r = nft.run(Some(nft_rx)) => { r?; }
            _ = netns_gone(entered.as_ref()) => return Ok(Ended::NetnsGone),
        }
        Ok::<_, anyhow::Error>(Ended::Stopped)
    })?;
    Ok(ended.code())
}

/// Sets an unusable adopted-state file aside before anything reads or writes it (see
/// [`netwarden::adopted_state::read_or_set_aside`]). Returns the path to keep adopted state in:
/// none if the file can be neither read nor set aside, so that nothing overwrites it.
pub(crate) fn check_adopted_state(
    path: Option<std::path::PathBuf>,
    telemetry: &obs::Telemetry,
) -> Option<std::path::PathBuf> {
    let path = path?;
    match netwarden::adopted_state::read_or_set_aside(&path) {
        Ok((_, None)) => Some(path),
        Ok((_, Some((aside, why)))) => {
            telemetry.state_file_set_aside("adopted_state", &aside, &why.to_string());
            Some(path)
        }
        Err(e) => {
            tracing::error!(error = %e, "adopted state is neither read nor saved");
            None
        }
    }
}

/// The chain and set selectors of `spec.adopt`, with the chains and sets the adopted-state
/// file kept for them (a file that cannot be read is reported by the agent and ignored here).
pub(crate) fn adoption(
    selectors: &[netwarden::adopt::AdoptSelector],
    state: Option<&std::path::Path>,
) -> netwarden::netfilter::guard::Adoption {
    let saved = state.and_then(|p| netwarden::adopted_state::read(p).ok());
    netwarden::netfilter::guard::Adoption::new(selectors, saved.as_ref())
}

/// Binds the HTTP endpoints' port. Call before entering the namespace, so that the endpoints are
/// on the host's network.
pub(crate) fn bind_metrics(
    metrics_addr: Option<&str>,
) -> anyhow::Result<Option<std::net::TcpListener>> {
    Ok(match metrics_addr {
        Some("off") => None,
        Some(addr) => Some(
            obs::http::bind(addr).with_context(|| format!("cannot listen on {addr}"))?,
        ),
        None => obs::http::bind(obs::DEFAULT_METRICS_ADDR)
            .map_err(|e| {
                tracing::warn!(addr = obs::DEFAULT_METRICS_ADDR, error = %e, "no HTTP endpoints")
            })
            .ok(),
    })
}

fn status(addr: &str, output: Output) -> anyhow::Result<ExitCode> {
    let (code, body) = obs::http::get(addr, "/status", None, Duration::from_secs(5))
        .with_context(|| format!("cannot reach the agent at {addr}"))?;
    anyhow::ensure!(
        code == 200,
        "the agent at {addr} answered {code}: {}",
        body.trim()
    );
    let status: obs::status::Status = serde_json::from_str(&body)
        .context("the agent's /status is not what this version reads")?;
    match output {
        Output::Table => emit(&obs::status::render_table(&status))?,
        Output::Json => emit(&format!("{}\n", serde_json::to_string_pretty(&status)?))?,
    }
    Ok(ExitCode::SUCCESS)
}

fn check(
    path: &std::path::Path,
    netns: Option<&str>,
    output: Output,
    backend: BackendChoice,
    adopted_state: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    let cfg = load(path)?;
    let mut desired = DesiredState::from_config(&cfg);
    if let Some(state) = adopted_state {
        let saved = netwarden::adopted_state::read(state)?;
        netwarden::adopted_state::merge(saved, &mut desired);
    }
    // Adopted chains and sets are checked as the state file last saw them.
    let (adopted_chains, adopted_sets) = adoption(&cfg.adopt, adopted_state).desired();
    let adopted = adopted_chains.len() + adopted_sets.len();
    let chains: Vec<_> = cfg.chains.iter().cloned().chain(adopted_chains).collect();
    let sets: Vec<_> = cfg.ipsets.iter().cloned().chain(adopted_sets).collect();
    let (rt, _) = runtime(netns)?;
    let plan = rt.block_on(check::check(&mut desired))?;
    let canon = Canonicaliser::new(backend);
    let found = rt
        .block_on(netwarden::netfilter::guard::check(
            &Binaries, &canon, &chains, &sets,
        ))
        .map_err(|e| match e {
            netwarden::netfilter::guard::CheckError::Refused(r) => {
                anyhow::anyhow!("{}", refused(&path.display().to_string(), &r))
            }
            e => e.into(),
        })?;
    if let Some(why) = &found.unchecked {
        eprintln!(
            "netwarden: rule specs compared as written, but for iptables' own options ({why})"
        );
    }
    // nftables wiring.
    let nft = check::NftReport {
        tables: rt.block_on(netwarden::nftables::engine::check(&cfg.nftables.tables))?,
        protected: cfg.nftables.tables.len(),
    };
    let nf = check::NetfilterReport {
        chains: found.chains,
        ipsets: found.sets,
        chains_protected: chains.len(),
        ipsets_protected: sets.len(),
        adopted,
    };
    let report = check::Report::new(&desired, &plan).with_netfilter(nf);
    match output {
        Output::Table => emit(&format!("{}{}", report.render_table(), nft.render_table()))?,
        Output::Json => emit(&format!(
            "{}\n",
            nft.merge_json(report.render_json().trim_end())
        ))?,
    }
    Ok(if report.in_sync && nft.tables.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn networkd(
    path: &std::path::Path,
    netns: Option<&str>,
    root: &std::path::Path,
    output: Output,
    write_root: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    use netwarden::networkd::{host, report};
    let cfg = load(path)?;
    let desired = DesiredState::from_config(&cfg);
    let (rt, _entered) = runtime(netns)?;
    let found = rt.block_on(host::report(root, &desired))?;
    match output {
        Output::Table => emit(&report::render_table(&found))?,
        Output::Json => emit(&format!("{}\n", serde_json::to_string_pretty(&found)?))?,
    }
    if let Some(dir) = write_root {
        if found.dropins.is_empty() {
            eprintln!("netwarden: nothing to write: a restart removes nothing protected");
        }
        for p in host::write(dir, &found.dropins)
            .with_context(|| format!("cannot write the drop-ins below {}", dir.display()))?
        {
            eprintln!(
                "netwarden: wrote {} (read at networkd's next start; networkd was not restarted)",
                p.display()
            );
        }
    }
    Ok(if found.at_risk() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn demo_command() -> anyhow::Result<ExitCode> {
    let mut out = cli::Stdout;
    demo::run(&mut out, Duration::from_secs(10))?;
    Ok(ExitCode::SUCCESS)
}

fn snapshot(
    netns: Option<&str>,
    tables: &[String],
    priorities: Option<&str>,
    [chains, sets, addresses, nft_tables, neighbours, links, sysctls]: [Option<String>; 7],
    (mode, content, membership): (cli::SnapshotMode, cli::Ownership, cli::Ownership),
    backend: BackendChoice,
) -> anyhow::Result<ExitCode> {
    use netwarden::netfilter::model::Content;
    use netwarden::snapshot::{self, Selectors, Style};
    let re = |p: Option<String>| {
        p.map(|p| snapshot::selector(&p))
            .transpose()
            .map_err(anyhow::Error::msg)
    };
    let sel = Selectors {
        tables: tables
            .iter()
            .map(|t| {
                netwarden::model::parse_table(t)
                    .ok_or_else(|| anyhow::anyhow!("--tables: unknown table `{t}`"))
            })
            .collect::<anyhow::Result<_>>()?,
        priorities: priorities
            .map(snapshot::priorities)
            .transpose()
            .map_err(|e| anyhow::anyhow!("--priorities {e}"))?,
        chains: re(chains)?,
        sets: re(sets)?,
        addresses: re(addresses)?,
        nft_tables: re(nft_tables)?,
        neighbours: re(neighbours)?,
        links: re(links)?,
        sysctls: re(sysctls)?,
    };
    if sel.is_empty() {
        tracing::warn!("no selector given (--tables, --priorities, --chains, --sets, --addresses, --nft-tables, --neighbours, --links, --sysctls): the snapshot protects nothing");
    }
    let ownership = |o: cli::Ownership| match o {
        cli::Ownership::Contains => Content::Contains,
        cli::Ownership::Exact => Content::Exact,
    };
    let style = Style {
        mode: match mode {
            cli::SnapshotMode::Enforce => netwarden::model::Mode::Enforce,
            cli::SnapshotMode::Observe => netwarden::model::Mode::Observe,
        },
        content: ownership(content),
        membership: ownership(membership),
    };
    let command = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
    let (rt, _) = runtime(netns)?;
    let text = rt.block_on(snapshot::take(
        &sel,
        style,
        backend,
        &format!("netwarden {command}"),
    ))?;
    emit(&text)?;
    Ok(ExitCode::SUCCESS)
}
