//! The snapshot of rules, routes and addresses: the ones in the selected priorities, tables and
//! devices, as config entries (or a comment where the config cannot express one).

use super::{matches, object_name, q, Names, Selectors};
use crate::model::route::scope_name;
use crate::model::{
    protocol_name, table_name, ObservedRoute, RouteKey, RouteType, RuleAction, RuleKey,
    PROTO_UNSPEC,
};
use crate::observe::Mirror;
use regex_automata::meta::Regex;
use std::fmt::Write;

/// `spec.rules`, `spec.routes` and `spec.addresses` of what the selectors pick.
pub(super) fn render(sel: &Selectors, mirror: &Mirror) -> String {
    let mut names = Names::default();
    let mut out = String::new();
    if let Some(range) = sel.priorities {
        out.push_str(&render_rules(mirror, range, &mut names));
    }
    if !sel.tables.is_empty() {
        out.push_str(&render_routes(mirror, &sel.tables, &mut names));
    }
    if let Some(re) = &sel.addresses {
        out.push_str(&render_addresses(mirror, re, &mut names));
    }
    out
}

fn action_name(a: RuleAction) -> Option<&'static str> {
    Some(match a {
        RuleAction::Lookup => "lookup",
        RuleAction::Blackhole => "blackhole",
        RuleAction::Unreachable => "unreachable",
        RuleAction::Prohibit => "prohibit",
        _ => return None,
    })
}

/// The rules whose priority is in `lo..=hi`, by family and priority.
fn render_rules(mirror: &Mirror, (lo, hi): (u32, u32), names: &mut Names) -> String {
    let mut rules: Vec<_> = mirror
        .rules
        .iter()
        .filter(|(k, _)| (lo..=hi).contains(&k.priority))
        .collect();
    rules.sort_by(|a, b| {
        (a.0.family, a.0.priority)
            .cmp(&(b.0.family, b.0.priority))
            .then(a.0.to_string().cmp(&b.0.to_string()))
    });
    let mut body = String::new();
    for (k, protocols) in rules {
        render_rule(&mut body, k, protocols.first().copied().flatten(), names);
    }
    if body.is_empty() {
        return body;
    }
    format!("  rules:\n{body}")
}

/// One rule's entry, or a comment if the config cannot express it.
fn render_rule(body: &mut String, k: &RuleKey, protocol: Option<u8>, names: &mut Names) {
    let action = action_name(k.action);
    let Some(action) = action.filter(|_| !k.invert && k.extra.is_none() && k.tos == 0) else {
        let _ = writeln!(body, "    # not expressible in the config, left out: {k}");
        return;
    };
    let name = names.get(object_name(&[
        "rule",
        &k.family.to_string(),
        &k.priority.to_string(),
    ]));
    let _ = writeln!(
        body,
        "    - name: {name}\n      family: {}\n      priority: {}",
        k.family, k.priority
    );
    if let Some(f) = k.from {
        let _ = writeln!(body, "      from: {}", q(&f.to_string()));
    }
    if let Some(t) = k.to {
        let _ = writeln!(body, "      to: {}", q(&t.to_string()));
    }
    if let Some(i) = &k.iif {
        let _ = writeln!(body, "      iif: {}", q(i));
    }
    if let Some(o) = &k.oif {
        let _ = writeln!(body, "      oif: {}", q(o));
    }
    if let Some((mark, mask)) = k.fwmark {
        let _ = writeln!(
            body,
            "      fwmark: {}\n      fwmask: {}",
            q(&format!("{mark:#x}")),
            q(&format!("{mask:#x}"))
        );
    }
    let _ = writeln!(body, "      action: {action}");
    if k.action == RuleAction::Lookup {
        let _ = writeln!(body, "      table: {}", q(&table_name(k.table)));
    }
    if let Some(p) = protocol.filter(|p| *p != PROTO_UNSPEC) {
        let _ = writeln!(body, "      protocol: {}", q(&protocol_name(p)));
    }
}

/// The routes of the selected tables, by family, table, destination and metric.
fn render_routes(mirror: &Mirror, tables: &[u32], names: &mut Names) -> String {
    let mut routes: Vec<_> = mirror
        .routes
        .iter()
        .filter(|(k, _)| tables.contains(&k.table))
        .collect();
    routes.sort_by_key(|(k, _)| (k.family, k.table, k.destination.to_string(), k.metric));
    let mut body = String::new();
    for (k, observed) in routes {
        for r in observed {
            let device = r.oif.and_then(|i| mirror.link(i)).map(|l| l.name.as_str());
            render_route(&mut body, k, r, device, names);
        }
    }
    if body.is_empty() {
        return body;
    }
    format!("  routes:\n{body}")
}

/// One route's entry, a comment if the config cannot express it, or nothing for a unicast
/// route with neither gateway nor device.
fn render_route(
    body: &mut String,
    k: &RouteKey,
    r: &ObservedRoute,
    device: Option<&str>,
    names: &mut Names,
) {
    let configurable = !matches!(r.kind, RouteType::Other(_));
    if !configurable || r.multipath || k.tos != 0 || k.source_prefix.is_some() {
        let _ = writeln!(
            body,
            "    # not expressible in the config, left out: {} table {} {}",
            k.family,
            table_name(k.table),
            k.destination
        );
        return;
    }
    if r.kind == RouteType::Unicast && r.gateway.is_none() && device.is_none() {
        return;
    }
    let name = names.get(object_name(&[
        "route",
        &k.family.to_string(),
        &table_name(k.table),
        &k.destination.to_string(),
    ]));
    let _ = writeln!(
        body,
        "    - name: {name}\n      family: {}\n      table: {}\n      destination: {}\n      metric: {}\n      type: {}",
        k.family,
        q(&table_name(k.table)),
        q(&k.destination.to_string()),
        k.metric,
        r.kind
    );
    if let Some(g) = r.gateway {
        let _ = writeln!(body, "      gateway: {}", q(&g.to_string()));
    }
    if let (Some(d), true) = (device, r.kind.forwards()) {
        let _ = writeln!(body, "      device: {}", q(d));
    }
    if let Some(s) = r.prefsrc {
        let _ = writeln!(body, "      source: {}", q(&s.to_string()));
    }
    if r.scope != 0 {
        let _ = writeln!(body, "      scope: {}", scope_name(r.scope));
    }
    if r.protocol != PROTO_UNSPEC {
        let _ = writeln!(body, "      protocol: {}", q(&protocol_name(r.protocol)));
    }
    if r.onlink && r.gateway.is_some() {
        let _ = writeln!(body, "      onlink: true");
    }
    if let Some(m) = r.mtu {
        let _ = writeln!(body, "      mtu: {m}");
    }
}

/// The addresses of the matching devices (not loopback's, not link-local ones).
fn render_addresses(mirror: &Mirror, re: &Regex, names: &mut Names) -> String {
    let mut addrs: Vec<_> = mirror
        .addresses
        .iter()
        .filter_map(|(k, a)| {
            let dev = mirror.link(k.ifindex)?.name.clone();
            let link_local = match k.address {
                std::net::IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
                std::net::IpAddr::V4(v4) => v4.is_loopback(),
            };
            let lo = dev == "lo";
            (matches(re, &dev) && !link_local && !lo).then_some((dev, k.address, a.prefix_len))
        })
        .collect();
    addrs.sort();
    let mut out = String::new();
    if addrs.is_empty() {
        return out;
    }
    out.push_str("  addresses:\n");
    for (dev, addr, len) in addrs {
        let name = names.get(object_name(&["address", &dev, &addr.to_string()]));
        let _ = writeln!(
            out,
            "    - name: {name}\n      device: {}\n      address: {}",
            q(&dev),
            q(&format!("{addr}/{len}"))
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Family, TABLE_MAIN};

    fn rule(priority: u32, action: RuleAction) -> RuleKey {
        RuleKey::new(
            Family::Ipv4,
            priority,
            Some("10.0.0.0/8".parse().unwrap()),
            None,
            None,
            None,
            Some(0x10),
            None,
            TABLE_MAIN,
            action,
        )
    }

    #[test]
    fn rules_the_config_cannot_express_are_comments_and_names_are_unique() {
        let mut names = Names::default();
        let mut body = String::new();
        render_rule(
            &mut body,
            &rule(100, RuleAction::Lookup),
            Some(4),
            &mut names,
        );
        render_rule(
            &mut body,
            &rule(100, RuleAction::Blackhole),
            None,
            &mut names,
        );
        let mut inverted = rule(200, RuleAction::Lookup);
        inverted.invert = true;
        render_rule(&mut body, &inverted, None, &mut names);
        assert!(body.starts_with("    - name: rule-ipv4-100\n      family: ipv4\n      priority: 100\n      from: '10.0.0.0/8'\n"));
        assert!(body.contains("      fwmark: '0x10'\n      fwmask: '0xffffffff'\n"));
        assert!(
            body.contains("      action: lookup\n      table: 'main'\n      protocol: 'static'\n")
        );
        assert!(body.contains("    - name: rule-ipv4-100-2\n"));
        assert!(body.contains("      action: blackhole\n"));
        let left_out = format!("    # not expressible in the config, left out: {inverted}\n");
        assert!(body.ends_with(&left_out), "{body}");
    }
}
