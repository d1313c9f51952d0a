//! The finding of `netwarden networkd` (and of the agent's check at start in Kubernetes mode):
//! what networkd's next restart and a reconfigure would take away, and what prevents it. Pure:
//! built from what [`super::host`] read; rendered as text or JSON.

use super::config::{LinkFacts, Network, Settings};
use super::predict::{self, AtRisk, DropIn, Event, Kernel, Managed, Present};
use serde::Serialize;
use std::fmt::Write as _;

/// systemd-networkd's processes in this network namespace, and the links it says it manages.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Running {
    pub pids: Vec<u32>,
    /// From its state files (/run/systemd/netif/links): link, ADMIN_STATE, NETWORK_FILE.
    pub links: Vec<LinkState>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LinkState {
    pub link: String,
    pub state: String,
    pub network: Option<String>,
}

/// The JSON report's `kind` (its `apiVersion` is the config's).
pub const REPORT_KIND: &str = "NetworkdReport";

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    #[serde(rename = "apiVersion")]
    pub api_version: &'static str,
    pub kind: &'static str,
    pub running: bool,
    pub networkd: Running,
    pub settings: Settings,
    /// The links networkd's configuration on disk gives a .network file (what its next start
    /// manages).
    pub managed: Vec<Managed>,
    /// Protected objects the next restart (or a reload after a .network change) takes away.
    pub restart: Vec<AtRisk>,
    /// Protected objects a `networkctl reconfigure` of the managed links takes away.
    pub reconfigure: Vec<AtRisk>,
    /// What prevents the restart's part.
    pub dropins: Vec<DropIn>,
    /// What a restart would still take away with the drop-ins in place.
    #[serde(rename = "restartWithDropins")]
    pub restart_with_dropins: Vec<AtRisk>,
    /// Protected objects not in the kernel now (not predicted).
    pub missing: usize,
    pub warnings: Vec<String>,
}

impl Report {
    /// Objects at risk at the next restart.
    pub fn at_risk(&self) -> usize {
        self.restart.len()
    }
}

/// Builds the report.
pub fn analyse(
    running: Running,
    settings: Settings,
    nets: &[Network],
    kernel: &Kernel,
    present: &[Present],
    missing: usize,
) -> Report {
    let restart = predict::predict(Event::Restart, &settings, nets, kernel, present);
    let reconfigure = predict::predict(Event::Reconfigure, &settings, nets, kernel, present);
    let dropins = predict::dropins(&restart, nets, kernel, present);
    let (s2, n2) = predict::with_dropins(&settings, nets, &dropins);
    let restart_with_dropins = predict::predict(Event::Restart, &s2, &n2, kernel, present);
    let mut warnings = settings.warnings.clone();
    for n in nets {
        warnings.extend(n.warnings.iter().cloned());
    }
    let managed: Vec<Managed> = predict::managed_links(nets, &kernel.links)
        .into_iter()
        .map(|(_, _, m)| m)
        .collect();
    for m in &managed {
        for d in &m.doubtful {
            warnings.push(format!(
                "{d} comes before {} and may apply to {} instead: its [Match] has keys this command does not evaluate",
                m.network, m.link
            ));
        }
    }
    Report {
        api_version: crate::config::API_VERSION,
        kind: REPORT_KIND,
        running: !running.pids.is_empty(),
        networkd: running,
        settings,
        managed,
        restart,
        reconfigure,
        dropins,
        restart_with_dropins,
        missing,
        warnings,
    }
}

fn list(out: &mut String, items: &[AtRisk]) {
    if items.is_empty() {
        out.push_str("  nothing protected\n");
    }
    for a in items {
        let _ = writeln!(
            out,
            "  {:<8} {:<32} {:<21} {}",
            a.kind.to_string(),
            a.name,
            a.effect.as_str(),
            a.why
        );
    }
}

/// The report for a person.
pub fn render_table(r: &Report) -> String {
    let mut out = String::new();
    if r.running {
        let pids: Vec<String> = r.networkd.pids.iter().map(u32::to_string).collect();
        let _ = writeln!(out, "systemd-networkd: running (pid {})", pids.join(", "));
    } else {
        out.push_str("systemd-networkd: not running in this network namespace (what follows is for its next start)\n");
    }
    for l in &r.networkd.links {
        let _ = writeln!(
            out,
            "  {:<16} {:<12} {}",
            l.link,
            l.state,
            l.network.as_deref().unwrap_or("-")
        );
    }
    let _ = writeln!(
        out,
        "settings: ManageForeignRoutingPolicyRules={} ManageForeignRoutes={} (from {})",
        yes_no(r.settings.manage_foreign_rules),
        yes_no(r.settings.manage_foreign_routes),
        if r.settings.files.is_empty() {
            "defaults".to_string()
        } else {
            r.settings.files.join(", ")
        }
    );
    if r.managed.is_empty() {
        out.push_str("links it manages: none\n");
    } else {
        out.push_str("links it manages:\n");
        for m in &r.managed {
            let _ = writeln!(
                out,
                "  {:<16} {} (KeepConfiguration={})",
                m.link,
                m.network,
                m.keep.as_str()
            );
        }
    }
    out.push_str("\nits next restart (or a reload of a changed .network file) would take away:\n");
    list(&mut out, &r.restart);
    out.push_str("\na `networkctl reconfigure` of its links would take away:\n");
    list(&mut out, &r.reconfigure);
    if r.missing > 0 {
        let _ = writeln!(
            out,
            "\n{} protected objects are not in the kernel now (not predicted; see `netwarden check`).",
            r.missing
        );
    }
    if r.dropins.is_empty() {
        out.push_str("\nno drop-in needed: a restart removes nothing protected.\n");
    } else {
        out.push_str("\nto prevent what a restart would take away, these drop-ins (read when networkd starts; `netwarden networkd --write-root /` writes them, networkd is not restarted):\n");
        for d in &r.dropins {
            let _ = writeln!(out, "\n# {}\n{}", d.path, d.text.trim_end());
        }
        out.push_str("\nwith them, a restart would take away:\n");
        list(&mut out, &r.restart_with_dropins);
        if !r.reconfigure.is_empty() {
            out.push_str("(a reconfigure still removes networkd's own addresses and what depends on them: no setting prevents that; the agent repairs it)\n");
        }
    }
    for w in &r.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    out
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// A link's facts, for tests and callers that build a [`Kernel`] by hand.
pub fn link(index: u32, name: &str) -> LinkFacts {
    LinkFacts {
        index,
        name: name.into(),
        ..LinkFacts::default()
    }
}
