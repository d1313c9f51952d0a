//! `netwarden run --configmap NS/NAME`: Kubernetes mode (docs/kubernetes.md).

use crate::cli::{BackendChoice, KubeArgs};
use anyhow::Context;
use netwarden::cluster::{self, Message};
use netwarden::netfilter::guard::{Guard, GuardError, GuardReload};
use netwarden::netfilter::tools::Binaries;
use netwarden::{obs, reconcile};
use std::process::ExitCode;
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
    let telemetry = obs::Telemetry::new();
    let listener = crate::bind_metrics(metrics_addr)?;
    // Before entering the namespace: the Kubernetes thread and its sockets stay on the host's
    // network, where the API server is (see src/cluster/run.rs).
    let (mut updates, pods) = cluster::spawn(opts, telemetry.clone())?;
    let adopted_state = crate::check_adopted_state(adopted_state, &telemetry);
    let (rt, entered) = crate::runtime(netns)?;
    if let Some(listener) = listener {
        let addr = obs::http::spawn(listener, telemetry.clone())?;
        tracing::info!(%addr, "serving /metrics, /healthz, /readyz, /status");
    }
    let ended = rt.block_on(async move {
        let (mut stop, mut hup) =
            netwarden::lifecycle::install().context("cannot handle signals")?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP ignored: in Kubernetes mode the config comes from the ConfigMap, applied on every edit");
            }
        });
        let start = async {
            // Nothing is enforced before the caches are ready or the state file says what to.
            let first = match updates.recv().await {
                Some(Message::Update(u)) => u,
                Some(Message::Fatal(e)) => return Err(anyhow::Error::new(e)),
                None => anyhow::bail!("the Kubernetes thread stopped"),
            };
            let cfg = first.config.clone();
            let ex = first.expansion;
            crate::require_kernel_access(cfg.enforces_anything()).await?;
            // nftables wiring: the engine (src/nftables/) takes `spec.nftables` (no templates).
            let nft = netwarden::nftables::engine::Engine::start(cfg.nftables.clone(), cfg.resync)
                .await?
                .with_telemetry(telemetry.clone());
            // A later change of the chain and set selectors reaches the guard as a reload.
            let adoption = crate::adoption(&cfg.adopt, adopted_state.as_deref());
            let guard = Guard::start_adopting(
                ex.chains.clone(),
                ex.ipsets.clone(),
                cfg.poll_interval,
                cfg.resync,
                backend,
                adoption,
            )
            .await?
            .with_telemetry(telemetry.clone());
            let opts = reconcile::Options {
                resync: cfg.resync,
                telemetry: telemetry.clone(),
                adopted_state,
                pods: Some(pods),
            };
            let agent = reconcile::Agent::start(ex.desired.clone(), opts).await?;
            Ok::<_, anyhow::Error>((cfg, ex, nft, guard, agent))
        };
        // A stop during the wait for the cluster or the initial sync ends it where it is.
        let (cfg, ex, nft, guard, agent) = tokio::select! {
            _ = stop.requested() => {
                tracing::info!("shutting down during the initial sync; what is in place stays");
                return Ok(crate::Ended::Stopped);
            }
            _ = crate::netns_gone(entered.as_ref()) => return Ok(crate::Ended::NetnsGone),
            r = start => r?,
        };
        crate::check_networkd(networkd_root, &ex.desired, &telemetry);
        let (nft_tx, nft_rx) = mpsc::channel(4);
        let telemetry_reject = telemetry;
        let guard = guard.with_store(agent.adopted_store());
        let canon = guard.canonicaliser();
        let (reload_tx, reload_rx) = mpsc::channel(4);
        let (guard_tx, guard_rx) = mpsc::channel(4);
        // Fans the updates out to the two loops, each only when its part changed: a Service
        // change that moves no rule must not make the rtnetlink loop re-read the kernel. A
        // ConfigMap edit reaches the guard even when its chains stay the same: it re-affirms them.
        let forward = async move {
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
                if refused(&canon, &telemetry_reject, &e).await {
                    continue;
                }
                // A new parse of the ConfigMap (facts-only updates share the last one).
                let edited = !std::sync::Arc::ptr_eq(c, &last);
                last = c.clone();
                if c.nftables != nftables {
                    nftables = c.nftables.clone();
                    if nft_tx.send(c.nftables.clone()).await.is_err() {
                        break;
                    }
                }
                if e.desired != desired || c.resync != resync {
                    desired = e.desired.clone();
                    let reload = obs::Reload {
                        desired: e.desired,
                        resync: c.resync,
                    };
                    if reload_tx.send(reload).await.is_err() {
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
                    if guard_tx.send(reload).await.is_err() {
                        break;
                    }
                }
                (poll, resync) = (c.poll_interval, c.resync);
            }
            anyhow::bail!("the Kubernetes thread stopped")
        };
        tokio::select! {
            r = agent.run_with(stop.requested(), Some(reload_rx)) => { r?; }
            r = guard.run_with(Some(guard_rx)) => { r?; }
            r = forward => { r?; }
            r = nft.run(Some(nft_rx)) => { r?; }
            _ = crate::netns_gone(entered.as_ref()) => return Ok(crate::Ended::NetnsGone),
        }
        Ok::<_, anyhow::Error>(crate::Ended::Stopped)
    })?;
    Ok(ended.code())
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
    canon: &netwarden::netfilter::canon::Canonicaliser,
    telemetry: &obs::Telemetry,
    e: &netwarden::desired::Expansion,
) -> bool {
    let checked = canon.canonicalise(&Binaries, &e.chains, &e.ipsets).await;
    if checked.refused.is_empty() {
        return false;
    }
    let error = GuardError::Refused(checked.refused).to_string();
    tracing::error!(error = %error, "config refused; keeping the config in use");
    telemetry.config_loaded(false);
    telemetry.notice(obs::Notice::ConfigRejected {
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
