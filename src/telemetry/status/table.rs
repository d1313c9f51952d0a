//! The table `netwarden status` prints: one line per protected object, the pending templated
//! objects, and a summary line.

use super::{State, Status, NOT_SYNCED};

/// "3s ago", "2m ago", "5h ago", "4d ago".
pub fn ago(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match s {
        0..=119 => format!("{s}s ago"),
        120..=7199 => format!("{}m ago", s / 60),
        7200..=172_799 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

const HEADER: [&str; 8] = [
    "KIND",
    "NAME",
    "STATE",
    "MODE",
    "REPAIRS",
    "LAST REPAIR",
    "BY",
    "OBJECT",
];

/// The table `netwarden status` prints.
pub fn render_table(status: &Status) -> String {
    let mut out = aligned(&object_rows(status));
    for p in &status.pending {
        let at = if p.path.is_empty() {
            String::new()
        } else {
            format!(" ({})", p.path)
        };
        out.push_str(&format!(
            "pending  {}{at}: {} [{}]\n",
            p.name, p.reason, p.cause
        ));
    }
    out.push_str(&summary(status));
    out
}

/// One row per object, in [`HEADER`]'s columns.
fn object_rows(status: &Status) -> Vec<[String; 8]> {
    status
        .objects
        .iter()
        .map(|o| {
            let state = match (&o.fighter, o.state) {
                (Some(f), State::Contested) => format!("contested ({f})"),
                _ => o.state.as_str().to_string(),
            };
            [
                o.kind.clone(),
                o.name.clone(),
                state,
                o.mode.clone(),
                o.repairs.to_string(),
                o.last_repair_unix
                    .map(|t| ago(status.now_unix - t))
                    .unwrap_or_else(|| "-".into()),
                o.last_actor.clone().unwrap_or_else(|| "-".into()),
                match &o.reason {
                    Some(r) => format!("{} ({r})", o.object),
                    None => o.object.clone(),
                },
            ]
        })
        .collect()
}

/// The header and the rows in columns as wide as their widest cell (the last one unpadded).
fn aligned(rows: &[[String; 8]]) -> String {
    let mut widths = HEADER.map(str::len);
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let last = cells.len() - 1;
        for (i, c) in cells.iter().enumerate() {
            if i == last {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        out.push('\n');
    };
    line(HEADER.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

/// `N objects, N in sync, N not[; N templated objects pending][; not ready: …]`.
fn summary(status: &Status) -> String {
    let not_in_sync = status
        .objects
        .iter()
        .filter(|o| o.state != State::InSync)
        .count();
    let pending = if status.pending.is_empty() {
        String::new()
    } else {
        format!(
            "; {} templated object{} pending",
            status.pending.len(),
            if status.pending.len() == 1 { "" } else { "s" }
        )
    };
    let readiness = match (status.ready, status.not_ready.as_deref()) {
        (true, _) => String::new(),
        (false, None | Some(NOT_SYNCED)) => "; initial sync not done yet".to_owned(),
        (false, Some(why)) => format!("; not ready: {why}"),
    };
    format!(
        "{} objects, {} in sync, {} not{pending}{readiness}\n",
        status.objects.len(),
        status.objects.len() - not_in_sync,
        not_in_sync,
    )
}
