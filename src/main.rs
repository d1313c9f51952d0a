mod cli;
mod kubernetes;

use anyhow::Context;
use clap::Parser;
use cli::{emit, BackendChoice, Cli, Command, LogFormat, Output};
use netwarden::app::{self, runtime};
use netwarden::config::{self, Config};
use netwarden::desired::DesiredState;
use netwarden::netfilter::canon::{Canonicaliser, Refusal};
use netwarden::netfilter::guard::GuardError;
use netwarden::netfilter::tools::Binaries;
use netwarden::{check, demo, telemetry};
use std::process::ExitCode;
use std::time::Duration;
use tracing_subscriber::EnvFilter;

/// Exit code for errors (bad config, cannot reach or change the kernel); 1 is kept for "drift"
/// in `check`; 3 is `run --netns NAME` ending with its namespace ([`app::EXIT_NETNS_GONE`]).
const EXIT_ERROR: u8 = 2;

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
        // Every field escaped: nothing logged can forge a line (see telemetry::logfmt).
        LogFormat::Text => builder.fmt_fields(telemetry::logfmt::EscapedFields).init(),
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
    let result = dispatch(cli.command);
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
            let lines: Vec<String> = text.lines().map(telemetry::logfmt::escape).collect();
            eprintln!("netwarden: {}", lines.join("\n"));
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// The agent and the commands that read no kernel state.
fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
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
        Command::Demo => demo_command(),
        inspect => inspect_command(inspect),
    }
}

/// The commands that look at the node: check, networkd, snapshot.
fn inspect_command(command: Command) -> anyhow::Result<ExitCode> {
    match command {
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
        other => anyhow::bail!("not a command that inspects the node: {other:?}"),
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

/// `--networkd-root`: a directory, or `off`.
fn networkd_root_of(arg: &str) -> Option<std::path::PathBuf> {
    (arg != "off").then(|| std::path::PathBuf::from(arg))
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
    let telemetry = telemetry::Telemetry::new();
    telemetry.config_loaded(true);
    let opts = app::HostOptions {
        netns,
        metrics_addr,
        adopted_state,
    };
    let (host, ()) = app::Host::prepare(opts, telemetry, || Ok(()))?;
    let app::Host { rt, env } = host;
    let app::Env {
        entered,
        telemetry,
        adopted_state,
    } = env;
    let path = path.to_path_buf();
    let ended = rt.block_on(async move {
        let (mut stop, hup) = netwarden::lifecycle::install().context("cannot handle signals")?;
        let protect = app::Protect {
            config: &cfg,
            desired: desired.clone(),
            chains: cfg.chains.clone(),
            sets: cfg.ipsets.clone(),
            pods: None,
        };
        let wiring = app::Wiring {
            backend,
            telemetry: telemetry.clone(),
            adopted_state,
        };
        let start = async {
            app::Engines::start(protect, wiring).await.map_err(|e| {
                match e.downcast::<GuardError>() {
                    Ok(e) => guard_error(&path, e),
                    Err(e) => e,
                }
            })
        };
        let engines = match app::unless_ended(&mut stop, entered.as_ref(), start).await? {
            Ok(engines) => engines,
            Err(ended) => return Ok(ended),
        };
        let (guard_tx, guard_rx) = tokio::sync::mpsc::channel(1);
        let (nft_tx, nft_rx) = tokio::sync::mpsc::channel(1);
        let followers = app::ReloadFollowers {
            guard: engines.canonicaliser().map(|canon| app::GuardSide {
                tx: guard_tx,
                canon,
            }),
            nftables: Some(nft_tx),
        };
        let reloads = app::reload_on_sighup(path, hup, text, telemetry.clone(), followers, &cfg);
        app::check_networkd(networkd_root, &desired, &telemetry);
        let inputs = app::Inputs {
            agent: Some(reloads),
            guard: Some(guard_rx),
            nftables: Some(nft_rx),
        };
        let beside = std::future::pending();
        engines
            .run_in(entered.as_ref(), stop.requested(), inputs, beside)
            .await
    })?;
    Ok(ended.code())
}

fn status(addr: &str, output: Output) -> anyhow::Result<ExitCode> {
    let (code, body) = telemetry::http::get(addr, "/status", None, Duration::from_secs(5))
        .with_context(|| format!("cannot reach the agent at {addr}"))?;
    anyhow::ensure!(
        code == 200,
        "the agent at {addr} answered {code}: {}",
        body.trim()
    );
    let status: telemetry::status::Status = serde_json::from_str(&body)
        .context("the agent's /status is not what this version reads")?;
    match output {
        Output::Table => emit(&telemetry::status::render_table(&status))?,
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
    let saved = adopted_state
        .map(netwarden::adopted_state::read)
        .transpose()?;
    if let Some(saved) = &saved {
        netwarden::adopted_state::merge(saved.clone(), &mut desired);
    }
    // Adopted nftables tables too, as the file last saw them.
    let configured: std::collections::HashSet<_> =
        cfg.nftables.tables.iter().map(|t| &t.key).collect();
    let nft_tables: Vec<_> = cfg
        .nftables
        .tables
        .iter()
        .cloned()
        .chain(saved.iter().flat_map(|s| {
            netwarden::nftables::adopt::from_saved(
                &cfg.nftables.adopt,
                |k| configured.contains(k),
                &s.nftables,
            )
            .0
            .into_values()
        }))
        .collect();
    // Adopted chains and sets are checked as the state file last saw them.
    let (adopted_chains, adopted_sets) = app::adoption(&cfg.adopt, adopted_state).desired();
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
        tables: rt.block_on(netwarden::nftables::engine::check(&nft_tables))?,
        protected: nft_tables.len(),
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
