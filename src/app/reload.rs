//! Config reloads on SIGHUP (`netwarden run` with a file): the file read again, checked as a
//! whole, and its parts handed to the engines that keep them.

use crate::config::{self, Config};
use crate::desired::DesiredState;
use crate::netfilter::canon::Canonicaliser;
use crate::netfilter::guard::{GuardError, GuardReload};
use crate::netfilter::tools::Binaries;
use crate::nftables::model::NftConfig;
use crate::reconcile::Reload;
use crate::telemetry::Telemetry;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The chains and sets side of a reload: where they go, and the canonicaliser that checks the
/// rule specs of a new config before any of it is applied.
pub struct GuardSide {
    pub tx: mpsc::Sender<GuardReload>,
    pub canon: Canonicaliser,
}

/// Where an accepted config's other parts go.
#[derive(Default)]
pub struct ReloadFollowers {
    /// Chains, ipsets, their adopt selectors and intervals: the netfilter guard.
    pub guard: Option<GuardSide>,
    /// `spec.nftables`: the nftables engine.
    pub nftables: Option<mpsc::Sender<NftConfig>>,
}

/// At most one read of the config file per this interval: a SIGHUP storm costs one read a
/// second, not one full reload and kernel re-read per signal, and the last signal of a storm is
/// always followed by a read.
pub const RELOAD_GAP: Duration = Duration::from_secs(1);

/// Re-reads the config file on each SIGHUP of `hup` (call from within the runtime). A file whose
/// text is the one read last (at start: `text`) is a no-op: nothing is parsed, nothing re-read
/// from the kernel, nothing reloaded. A config with errors is refused as a whole: the old one
/// stays, the error is logged and a failed reload is counted; a rule spec iptables cannot hold as
/// written is such an error. Returns the stream of accepted configs for the reconcile loop. The
/// chains and sets of an accepted config go to the guard at every such reload, changed or not: a
/// reload re-affirms them (a chain whose repair did not take is repaired again); its nftables
/// part goes to the nftables engine when it changed.
pub fn reload_on_sighup(
    path: PathBuf,
    mut hup: tokio::signal::unix::Signal,
    text: String,
    telemetry: Arc<Telemetry>,
    followers: ReloadFollowers,
    started_with: &Config,
) -> mpsc::Receiver<Reload> {
    use futures::FutureExt;
    let (tx, rx) = mpsc::channel(1);
    let ReloadFollowers { guard, nftables } = followers;
    let mut nft = started_with.nftables.clone();
    let mut last_text = text;
    tokio::spawn(async move {
        let mut last_read: Option<Instant> = None;
        while hup.recv().await.is_some() {
            if let Some(at) = last_read {
                tokio::time::sleep(RELOAD_GAP.saturating_sub(at.elapsed())).await;
            }
            // The signals that came while waiting are answered by this one read.
            while let Some(Some(())) = hup.recv().now_or_never() {}
            last_read = Some(Instant::now());
            let text = match config::read_text(&path) {
                Ok(t) => t,
                Err(e) => {
                    telemetry.config_loaded(false);
                    tracing::error!(error = %e, "config reload refused; keeping the config in use");
                    continue;
                }
            };
            if text == last_text {
                telemetry.config_unchanged();
                tracing::info!(file = %path.display(), "SIGHUP: config unchanged since it was last read; nothing to do");
                continue;
            }
            last_text = text;
            match config::parse(&path.display().to_string(), &last_text) {
                Ok(cfg) => {
                    if let Some(error) = refused_rule_specs(guard.as_ref(), &cfg).await {
                        telemetry.config_loaded(false);
                        tracing::error!(file = %path.display(), error = %error, "config reload refused; keeping the config in use");
                        continue;
                    }
                    telemetry.config_loaded(true);
                    if let Some(g) = &guard {
                        if g.tx.send(guard_reload_of(&cfg)).await.is_err() {
                            return;
                        }
                    }
                    if let Some(tx) = &nftables {
                        if cfg.nftables != nft {
                            nft = cfg.nftables.clone();
                            if tx.send(cfg.nftables.clone()).await.is_err() {
                                return;
                            }
                        }
                    }
                    let reload = reload_of(&cfg);
                    tracing::info!(
                        file = %path.display(),
                        protected = reload.desired.len(),
                        "config reloaded"
                    );
                    if tx.send(reload).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    telemetry.config_loaded(false);
                    tracing::error!(error = %e, "config reload refused; keeping the config in use");
                }
            }
        }
    });
    rx
}

/// The rule specs of `cfg` that iptables cannot hold as written, as the error that refuses it.
async fn refused_rule_specs(guard: Option<&GuardSide>, cfg: &Config) -> Option<GuardError> {
    let checked = guard?
        .canon
        .canonicalise(&Binaries, &cfg.chains, &cfg.ipsets)
        .await;
    (!checked.refused.is_empty()).then_some(GuardError::Refused(checked.refused))
}

fn guard_reload_of(cfg: &Config) -> GuardReload {
    GuardReload {
        chains: cfg.chains.clone(),
        sets: cfg.ipsets.clone(),
        adopt: cfg.adopt.clone(),
        poll: cfg.poll_interval,
        resync: cfg.resync,
    }
}

fn reload_of(cfg: &Config) -> Reload {
    Reload {
        desired: DesiredState::from_config(cfg),
        resync: cfg.resync,
    }
}
