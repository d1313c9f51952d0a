//! The two text encodings of the registry: OpenMetrics 1.0 (prometheus-client's own) and the
//! Prometheus text format 0.0.4 derived from it, and which one a scraper asks for.

use prometheus_client::registry::Registry;

/// Media types of the two encodings.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether an Accept header asks for OpenMetrics over the Prometheus text format: the
/// OpenMetrics media type with a q-value above 0 and at least that of `text/plain` (Prometheus
/// itself sends `application/openmetrics-text;version=1.0.0,…,text/plain;version=0.0.4;q=0.5`).
pub fn wants_openmetrics(accept: &str) -> bool {
    let mut om = 0.0f32;
    let mut text = 0.0f32;
    for part in accept.split(',') {
        let mut params = part.split(';').map(str::trim);
        let media = params.next().unwrap_or("").to_ascii_lowercase();
        let q = params
            .filter_map(|p| p.strip_prefix("q="))
            .find_map(|v| v.parse::<f32>().ok())
            .unwrap_or(1.0);
        match media.as_str() {
            "application/openmetrics-text" => om = om.max(q),
            "text/plain" | "text/*" | "*/*" => text = text.max(q),
            _ => {}
        }
    }
    om > 0.0 && om >= text
}

/// Encodes the registry as OpenMetrics text.
pub fn encode_openmetrics(registry: &Registry) -> String {
    let mut out = String::with_capacity(8192);
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// Encodes the registry in the Prometheus text format 0.0.4.
pub fn encode_prometheus(registry: &Registry) -> String {
    to_prometheus_text(&encode_openmetrics(registry))
}

/// Rewrites OpenMetrics text as Prometheus text 0.0.4: counter families take their samples'
/// `_total` name in HELP and TYPE, `info`/`stateset`/`unknown` become gauge/gauge/untyped, and
/// the UNIT and EOF lines go. Samples are the same in both formats for the types used here.
pub fn to_prometheus_text(om: &str) -> String {
    let lines: Vec<&str> = om.lines().collect();
    let mut out = String::with_capacity(om.len());
    // Family name → (new name, new type), from the TYPE lines.
    let mut rename: std::collections::HashMap<&str, (String, &str)> = Default::default();
    for line in &lines {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some((name, ty)) = rest.split_once(' ') {
                let mapped = match ty {
                    "counter" => (format!("{name}_total"), "counter"),
                    "info" => (format!("{name}_info"), "gauge"),
                    "stateset" => (name.to_string(), "gauge"),
                    "unknown" => (name.to_string(), "untyped"),
                    other => (name.to_string(), other),
                };
                rename.insert(name, mapped);
            }
        }
    }
    for line in lines {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let new = rename.get(name).map(|(n, _)| n.as_str()).unwrap_or(name);
            out.push_str(&format!("# HELP {new} {help}\n"));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split_once(' ').map(|(n, _)| n).unwrap_or(rest);
            match rename.get(name) {
                Some((n, t)) => out.push_str(&format!("# TYPE {n} {t}\n")),
                None => out.push_str(&format!("{line}\n")),
            }
        } else if !line.contains("_created") {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}
