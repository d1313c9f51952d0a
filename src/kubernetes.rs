//! `netwarden run --configmap NS/NAME`: Kubernetes mode (docs/kubernetes.md).

use crate::cli::{BackendChoice, KubeArgs};
use anyhow::Context;
use netwarden::app;
use netwarden::cluster::{self, Message};
use netwarden::netfilter::canon::Canonicaliser;
use netwarden::netfilter::guard::{GuardError, GuardReload};
use netwarden::netfilter::tools::Binaries;
use netwarden::nftables::model::NftConfig;
use netwarden::{reconcile, telemetry};
use std::process::ExitCode;
use std::sync::Arc;
use tokio::sync::mpsc;

pub fn run(
    kube: KubeArgs,
    netns: Option<&str>,
    backend: BackendChoice,
    metrics_addr: Option<&str>,
    adopted_state: Option<std::path::PathBuf>,
    networkd_root: Option<std::path::PathBuf>,
) -> anyhow::Result<ExitCode> {
    let cm = kube.configmap.context("--configmap is required")?;
    let (namespace, name) = configmap_ref(&cm, kube.configmap_namespace.as_deref())?;
    let node_name = kube
        .node_name
        .context("Kubernetes mode needs the node's name: --node-name or NODE_NAME")?;
    if !(kube.api_backoff_scale > 0.0 && kube.api_backoff_scale <= 1.0) {
        anyhow::bail!("--api-backoff-scale must be in (0, 1]");
    }
    let opts = cluster::Options {
        kubeconfig: kube.kubeconfig,
        apiserver: kube.apiserver,
        node_name,
        configmap_namespace: namespace,
        configmap_name: name,
        configmap_key: kube.configmap_key,
        service_selector: kube.service_selector,
        state_file: kube.state_file,
        event_window: std::time::Duration::from_millis(kube.event_window_ms),
        condition_after: kube.node_condition_after,
        backoff_scale: kube.api_backoff_scale,
        netns_id: netns_id(netns),
    };
    one_malloc_arena();
    let host = app::HostOptions {
        netns,
        metrics_addr,
        adopted_state,
    };
    // The Kubernetes thread and its sockets stay on the host's network, where the API server is
    // (see src/cluster/run.rs).
    let telemetry = telemetry::Telemetry::new();
    let on_host = || Ok(cluster::spawn(opts, telemetry.clone())?);
    let (host, (updates, pods)) = app::Host::prepare(host, telemetry.clone(), on_host)?;
    let app::Host { rt, env: host } = host;
    let ended = rt.block_on(async move {
        let (mut stop, hup) = netwarden::lifecycle::install().context("cannot handle signals")?;
        ignore_sighup(hup);
        let start = start(updates, pods, backend, &host);
        let (first, mut updates, engines) =
            match app::unless_ended(&mut stop, host.entered.as_ref(), start).await? {
                Ok(started) => started,
                Err(ended) => return Ok(ended),
            };
        app::check_networkd(networkd_root, &first.expansion.desired, &host.telemetry);
        let (nft_tx, nft_rx) = mpsc::channel(4);
        let (reload_tx, reload_rx) = mpsc::channel(4);
        let (guard_tx, guard_rx) = mpsc::channel(4);
        let to = Followers {
            canon: engines.canonicaliser().context("the guard runs")?,
            telemetry: host.telemetry.clone(),
            agent: reload_tx,
            guard: guard_tx,
            nftables: nft_tx,
        };
        let forward = forward(first, &mut updates, to);
        let inputs = app::Inputs {
            agent: Some(reload_rx),
            guard: Some(guard_rx),
            nftables: Some(nft_rx),
        };
        engines
            .run_in(host.entered.as_ref(), stop.requested(), inputs, forward)
            .await
    })?;
    Ok(ended.code())
}

fn ignore_sighup(mut hup: tokio::signal::unix::Signal) {
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP ignored: in Kubernetes mode the config comes from the ConfigMap, applied on every edit");
        }
    });
}

/// Waits for the first config (nothing is enforced before the caches are ready or the state
/// file says what to), then starts the engines on it.
async fn start(
    mut updates: mpsc::Receiver<Message>,
    pods: tokio::sync::watch::Receiver<netwarden::pod_liveness::PodView>,
    backend: BackendChoice,
    host: &app::Env,
) -> anyhow::Result<(cluster::Update, mpsc::Receiver<Message>, app::Engines)> {
    let first = match updates.recv().await {
        Some(Message::Update(u)) => u,
        Some(Message::Fatal(e)) => return Err(anyhow::Error::new(e)),
        None => anyhow::bail!("the Kubernetes thread stopped"),
    };
    let ex = &first.expansion;
    // `spec.nftables` has no templates; a later change of the chain and set selectors reaches
    // the guard as a reload.
    let protect = app::Protect {
        config: &first.config,
        desired: ex.desired.clone(),
        chains: ex.chains.clone(),
        sets: ex.ipsets.clone(),
        pods: Some(pods),
    };
    let wiring = app::Wiring {
        backend,
        telemetry: host.telemetry.clone(),
        adopted_state: host.adopted_state.clone(),
    };
    let engines = app::Engines::start(protect, wiring).await?;
    Ok((*first, updates, engines))
}

/// Where [`forward`] sends each part of an update.
struct Followers {
    canon: Canonicaliser,
    telemetry: Arc<telemetry::Telemetry>,
    agent: mpsc::Sender<reconcile::Reload>,
    guard: mpsc::Sender<GuardReload>,
    nftables: mpsc::Sender<NftConfig>,
}

/// Fans the updates out to the engines, each only when its part changed: a Service change that
/// moves no rule must not make the rtnetlink loop re-read the kernel. A ConfigMap edit reaches
/// the guard even when its chains stay the same: it re-affirms them.
async fn forward(
    first: cluster::Update,
    updates: &mut mpsc::Receiver<Message>,
    to: Followers,
) -> anyhow::Result<()> {
    let (cfg, ex) = (first.config, first.expansion);
    let (mut desired, mut chains, mut sets) = (ex.desired, ex.chains, ex.ipsets);
    let mut adopt = cfg.adopt.clone();
    let mut nftables = cfg.nftables.clone();
    let mut last = cfg.clone();
    let (mut poll, mut resync) = (cfg.poll_interval, cfg.resync);
    while let Some(m) = updates.recv().await {
        let u = match m {
            Message::Update(u) => u,
            Message::Fatal(e) => return Err(anyhow::Error::new(e)),
        };
        let (c, e) = (&u.config, u.expansion);
        if refused(&to.canon, &to.telemetry, &e).await {
            continue;
        }
        // A new parse of the ConfigMap (facts-only updates share the last one).
        let edited = !Arc::ptr_eq(c, &last);
        last = c.clone();
        if c.nftables != nftables {
            nftables = c.nftables.clone();
            if to.nftables.send(c.nftables.clone()).await.is_err() {
                break;
            }
        }
        if e.desired != desired || c.resync != resync {
            desired = e.desired.clone();
            let reload = reconcile::Reload {
                desired: e.desired,
                resync: c.resync,
            };
            if to.agent.send(reload).await.is_err() {
                break;
            }
        }
        if edited
            || e.chains != chains
            || e.ipsets != sets
            || c.adopt != adopt
            || c.poll_interval != poll
            || c.resync != resync
        {
            (chains, sets, adopt) = (e.chains.clone(), e.ipsets.clone(), c.adopt.clone());
            let reload = GuardReload {
                chains: e.chains,
                sets: e.ipsets,
                adopt: c.adopt.clone(),
                poll: c.poll_interval,
                resync: c.resync,
            };
            if to.guard.send(reload).await.is_err() {
                break;
            }
        }
        (poll, resync) = (c.poll_interval, c.resync);
    }
    anyhow::bail!("the Kubernetes thread stopped")
}

/// `--configmap NAMESPACE/NAME`, or `NAME` in `--configmap-namespace` (POD_NAMESPACE); `None`:
/// the client's default namespace.
fn configmap_ref(arg: &str, namespace: Option<&str>) -> anyhow::Result<(Option<String>, String)> {
    let bad = || anyhow::anyhow!("--configmap `{arg}`: use NAMESPACE/NAME or NAME");
    let namespace = namespace.map(str::trim).filter(|n| !n.is_empty());
    match arg.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((Some(ns.to_owned()), name.to_owned()))
        }
        Some(_) => Err(bad()),
        None if arg.is_empty() => Err(bad()),
        None => Ok((namespace.map(str::to_owned), arg.to_owned())),
    }
}

/// Rule specs iptables cannot hold as written refuse a ConfigMap edit as a whole: logged,
/// counted and told as `ConfigRejected`; the config in use stays.
async fn refused(
    canon: &Canonicaliser,
    telemetry: &telemetry::Telemetry,
    e: &netwarden::desired::Expansion,
) -> bool {
    let checked = canon.canonicalise(&Binaries, &e.chains, &e.ipsets).await;
    if checked.refused.is_empty() {
        return false;
    }
    let error = GuardError::Refused(checked.refused).to_string();
    tracing::error!(error = %error, "config refused; keeping the config in use");
    telemetry.config_loaded(false);
    telemetry.notice(telemetry::Notice::ConfigRejected {
        source: "ConfigMap".into(),
        error,
    });
    true
}

/// The network namespace the agent will enforce in, as `dev:inode` of its file: recorded in the
/// state file, so that the next start knows whether it finds the same kernel state.
fn netns_id(netns: Option<&str>) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let path = match netns {
        Some(n) => netwarden::netns::path(n),
        None => std::path::PathBuf::from("/proc/self/ns/net"),
    };
    std::fs::metadata(path)
        .ok()
        .map(|m| format!("{}:{}", m.dev(), m.ino()))
}

/// One malloc arena for every thread. glibc gives each thread that allocates an arena of its
/// own, and memory freed in one is not reused by another: the Kubernetes thread's big, brief
/// allocations (a list of 50,000 Services read, the desired state expanded from them) and the
/// main thread's (an `ipset save` of the set they fill, read back) then add up instead of
/// taking turns; with 50,000 Services that was 10 MiB more at the peak, growing with each
/// change. The threads' small allocations are served by glibc's per-thread caches first, so the
/// shared arena's lock is rarely taken on the repair path. Call before any thread starts.
fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a malloc parameter, and is called before other threads exist.
    unsafe {
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::configmap_ref;

    #[test]
    fn the_configmap_namespace_comes_from_the_argument_or_the_pod() {
        let r = |a, ns| configmap_ref(a, ns).map_err(|e| e.to_string());
        assert_eq!(
            r("kube-system/nw", Some("x")),
            Ok((Some("kube-system".into()), "nw".into()))
        );
        assert_eq!(
            r("nw", Some("kube-system")),
            Ok((Some("kube-system".into()), "nw".into()))
        );
        assert_eq!(r("nw", None), Ok((None, "nw".into())));
        assert_eq!(r("nw", Some(" ")), Ok((None, "nw".into())));
        for bad in ["", "/nw", "ns/", "a/b/c"] {
            assert!(r(bad, None).is_err(), "{bad}");
        }
    }
}
