//! What nf_tables accepts for base chains (types, hooks and priorities per family) and what the
//! elements of a set's key type look like. Pure; used by the config checks and by the listing
//! parser (priorities are printed symbolically).

use super::model::NfFamily;
use ipnet::IpNet;
use std::net::IpAddr;

/// The hooks a family's base chains can attach to.
pub fn hooks(family: NfFamily) -> &'static [&'static str] {
    match family {
        NfFamily::Ip | NfFamily::Ip6 => {
            &["prerouting", "input", "forward", "output", "postrouting"]
        }
        NfFamily::Inet => &[
            "prerouting",
            "input",
            "forward",
            "output",
            "postrouting",
            "ingress",
        ],
        NfFamily::Arp => &["input", "output"],
        NfFamily::Bridge => &["prerouting", "input", "forward", "output", "postrouting"],
        NfFamily::Netdev => &["ingress", "egress"],
    }
}

/// Checks a base chain's type against its family and hook.
pub fn chain_type(family: NfFamily, kind: &str, hook: &str) -> Result<(), String> {
    match kind {
        "filter" => Ok(()),
        "nat" if matches!(family, NfFamily::Ip | NfFamily::Ip6 | NfFamily::Inet) => {
            if matches!(hook, "prerouting" | "input" | "output" | "postrouting") {
                Ok(())
            } else {
                Err(format!(
                    "a nat chain hooks into prerouting, input, output or postrouting, not {hook}"
                ))
            }
        }
        "route" if matches!(family, NfFamily::Ip | NfFamily::Ip6 | NfFamily::Inet) => {
            if hook == "output" {
                Ok(())
            } else {
                Err(format!("a route chain hooks into output, not {hook}"))
            }
        }
        "nat" | "route" => Err(format!("{family} tables have no {kind} chains")),
        other => Err(format!(
            "unknown chain type `{other}`: use filter, nat or route"
        )),
    }
}

/// The standard priority names nft knows for a family.
fn priority_names(family: NfFamily) -> &'static [(&'static str, i32)] {
    match family {
        NfFamily::Bridge => &[
            ("dstnat", -300),
            ("filter", -200),
            ("out", 100),
            ("srcnat", 300),
        ],
        _ => &[
            ("raw", -300),
            ("mangle", -150),
            ("dstnat", -100),
            ("filter", 0),
            ("security", 50),
            ("srcnat", 100),
        ],
    }
}

/// The hooks a standard priority name may be used with (nft refuses `dstnat` on an output
/// chain: "invalid priority expression value in this context"); `None`: any hook.
fn priority_hooks(family: NfFamily, name: &str) -> Option<&'static str> {
    match (family, name) {
        (_, "dstnat") => Some("prerouting"),
        (_, "srcnat") => Some("postrouting"),
        (NfFamily::Bridge, "out") => Some("output"),
        _ => None,
    }
}

/// A priority: a number, or a standard name with an optional offset (`dstnat - 10`), as nft
/// accepts and prints them for a chain on `hook`.
pub fn priority(family: NfFamily, hook: &str, s: &str) -> Result<i32, String> {
    let compact: String = s.split_whitespace().collect();
    let number = |t: &str| -> Option<i32> {
        let (neg, digits) = match t.strip_prefix('-') {
            Some(d) => (true, d),
            None => (false, t.strip_prefix('+').unwrap_or(t)),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let v: i64 = digits.parse().ok()?;
        i32::try_from(if neg { -v } else { v }).ok()
    };
    if let Some(v) = number(&compact) {
        return Ok(v);
    }
    let names = priority_names(family);
    let split = compact.find(['+', '-']).unwrap_or(compact.len());
    let (name, offset) = compact.split_at(split);
    let Some((_, base)) = names.iter().find(|(n, _)| *n == name) else {
        return Err(format!(
            "`{s}` is not a priority: use a number or one of {} (with an optional `+ N` / `- N`)",
            names.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
        ));
    };
    if let Some(h) = priority_hooks(family, name).filter(|h| *h != hook) {
        return Err(format!(
            "`{name}` is a priority of {h} chains only (nft refuses it on {hook}): write the number ({base}{})",
            if offset.is_empty() { String::new() } else { format!(" {offset}") }
        ));
    }
    if offset.is_empty() {
        return Ok(*base);
    }
    let off = number(offset).ok_or_else(|| format!("`{s}`: the offset is not a number"))?;
    base.checked_add(off)
        .ok_or_else(|| format!("`{s}` is out of range"))
}

/// One component of a set's key or a map's value, as far as netwarden checks elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Datatype {
    Ipv4,
    Ipv6,
    Service,
    Proto,
    Mark,
    Ifname,
    Ether,
    Verdict,
    /// Any other type: the element is only checked for what could break the transaction.
    Other,
}

impl Datatype {
    pub fn parse(name: &str) -> Datatype {
        match name {
            "ipv4_addr" => Datatype::Ipv4,
            "ipv6_addr" => Datatype::Ipv6,
            "inet_service" => Datatype::Service,
            "inet_proto" => Datatype::Proto,
            "mark" => Datatype::Mark,
            "ifname" => Datatype::Ifname,
            "ether_addr" => Datatype::Ether,
            "verdict" => Datatype::Verdict,
            _ => Datatype::Other,
        }
    }

    /// The type of a `typeof` expression, for the expressions CNIs use.
    pub fn of_expression(expr: &str) -> Datatype {
        let e: Vec<&str> = expr.split_whitespace().collect();
        match e.as_slice() {
            ["ip", "saddr" | "daddr"] => Datatype::Ipv4,
            ["ip6", "saddr" | "daddr"] => Datatype::Ipv6,
            ["tcp" | "udp" | "sctp" | "th" | "udplite", "sport" | "dport"] => Datatype::Service,
            ["meta", "l4proto"] | ["ip", "protocol"] | ["ip6", "nexthdr"] => Datatype::Proto,
            ["meta" | "ct", "mark"] => Datatype::Mark,
            ["meta", "iifname" | "oifname"] => Datatype::Ifname,
            ["ether", "saddr" | "daddr"] => Datatype::Ether,
            _ => Datatype::Other,
        }
    }

    fn address(self) -> Option<bool> {
        match self {
            Datatype::Ipv4 => Some(false),
            Datatype::Ipv6 => Some(true),
            _ => None,
        }
    }
}

/// A set declaration as nft prints it: `type A . B [: C]` or `typeof EXPR . EXPR [: EXPR]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Declaration {
    pub key: Vec<Datatype>,
    pub value: Option<Vec<Datatype>>,
}

/// Parses and checks a set's `type` (datatype names) or `typeof` (expressions), returning the
/// declaration line as nft prints it.
pub fn declaration(kind: &str, text: &str, map: bool) -> Result<(String, Declaration), String> {
    let text = super::text::collapse(text);
    let ok_chars = text
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b' ' | b'.' | b'_' | b'-' | b':'));
    if text.is_empty() || !ok_chars {
        return Err(format!(
            "`{text}` is not a set type: datatype names (or, for typeof, expressions) joined by ` . `"
        ));
    }
    let (key, value) = match text.split_once(" : ") {
        Some((k, v)) => (k, Some(v)),
        None => (text.as_str(), None),
    };
    match (map, value) {
        (true, None) => {
            return Err(format!(
                "`{text}` has no value type: a map is `KEY : VALUE` (`ipv4_addr . inet_proto . inet_service : verdict`)"
            ))
        }
        (false, Some(_)) => return Err(format!("`{text}` has a value type: use a map")),
        _ => {}
    }
    let parse = |part: &str| -> Vec<Datatype> {
        part.split(" . ")
            .map(|c| {
                if kind == "typeof" {
                    Datatype::of_expression(c)
                } else {
                    Datatype::parse(c.trim())
                }
            })
            .collect()
    };
    if kind == "type" {
        if let Some(bad) = key
            .split(" . ")
            .chain(value)
            .find(|c| c.contains(' ') || c.is_empty())
        {
            return Err(format!(
                "`{bad}` is not a datatype name (`ipv4_addr`, `inet_service`, …); join several with ` . `"
            ));
        }
    }
    let decl = Declaration {
        key: parse(key),
        // `typeof … : verdict` is printed as a type name too.
        value: value.map(|v| {
            if v == "verdict" {
                vec![Datatype::Verdict]
            } else {
                parse(v)
            }
        }),
    };
    Ok((format!("{kind} {text}"), decl))
}

/// Checks an element's key (and value) against the set's declaration. `interval`: the set
/// holds prefixes and ranges.
pub fn check_element(
    e: &super::model::Element,
    decl: &Declaration,
    interval: bool,
) -> Result<(), String> {
    check_parts(&e.key, &decl.key, interval, "key")?;
    if let (Some(v), Some(types)) = (&e.value, &decl.value) {
        check_parts(v, types, false, "value")?;
    }
    Ok(())
}

fn check_parts(text: &str, types: &[Datatype], interval: bool, what: &str) -> Result<(), String> {
    let parts: Vec<&str> = if types == [Datatype::Verdict] {
        vec![text]
    } else {
        text.split(" . ").map(str::trim).collect()
    };
    if parts.len() != types.len() {
        return Err(format!(
            "`{text}`: the {what} has {} part(s), the set's type {}",
            parts.len(),
            types.len()
        ));
    }
    for (part, t) in parts.iter().zip(types) {
        check_one(part, *t, interval).map_err(|e| format!("`{text}`: {e}"))?;
    }
    Ok(())
}

fn check_one(p: &str, t: Datatype, interval: bool) -> Result<(), String> {
    let fail = |want: &str| Err(format!("`{p}` is not {want}"));
    match t {
        Datatype::Ipv4 | Datatype::Ipv6 => {
            let v6 = t.address() == Some(true);
            let want = if v6 {
                "an IPv6 address"
            } else {
                "an IPv4 address"
            };
            if address_item(p, v6, interval).is_none() {
                return if interval || (!p.contains('/') && !p.contains('-')) {
                    fail(want)
                } else {
                    Err(format!("`{p}`: prefixes and ranges need `flags interval`"))
                };
            }
            Ok(())
        }
        Datatype::Service => {
            let ok = |s: &str| s.parse::<u16>().is_ok();
            let good = match p.split_once('-') {
                Some((a, b)) if interval => ok(a) && ok(b),
                _ => ok(p),
            };
            if good {
                Ok(())
            } else {
                fail("a port (0 to 65535)")
            }
        }
        Datatype::Proto => {
            let named = p.bytes().all(|b| b.is_ascii_lowercase() || b == b'-');
            if named || p.parse::<u8>().is_ok() {
                Ok(())
            } else {
                fail("a protocol (`tcp`, `udp`, or 0 to 255)")
            }
        }
        Datatype::Mark => {
            let ok = match p.strip_prefix("0x") {
                Some(h) => u32::from_str_radix(h, 16).is_ok(),
                None => p.parse::<u32>().is_ok(),
            };
            if ok {
                Ok(())
            } else {
                fail("a mark (a 32-bit number, decimal or 0x hex)")
            }
        }
        Datatype::Ifname => {
            if p.len() >= 3 && p.starts_with('"') && p.ends_with('"') {
                Ok(())
            } else {
                fail("a quoted interface name (`\"eth0\"`)")
            }
        }
        Datatype::Ether => {
            let parts: Vec<&str> = p.split(':').collect();
            let ok = parts.len() == 6
                && parts
                    .iter()
                    .all(|x| x.len() == 2 && x.bytes().all(|b| b.is_ascii_hexdigit()));
            if ok {
                Ok(())
            } else {
                fail("a MAC address (`00:11:22:33:44:55`)")
            }
        }
        Datatype::Verdict => {
            let w: Vec<&str> = p.split_whitespace().collect();
            match w.as_slice() {
                ["accept" | "drop" | "continue" | "return"] => Ok(()),
                ["jump" | "goto", chain] if super::text::identifier(chain).is_ok() => Ok(()),
                _ => fail("a verdict (accept, drop, continue, return, jump CHAIN, goto CHAIN)"),
            }
        }
        Datatype::Other => Ok(()),
    }
}

/// An element in the form nft prints it, for the parts whose type netwarden knows: addresses
/// compressed (`fd00::1`), marks as `0x%08x`, ports without leading zeros, MAC addresses in
/// lower case. Call after [`check_element`].
pub fn canonical_element(e: &super::model::Element, decl: &Declaration) -> super::model::Element {
    super::model::Element {
        key: canonical_parts(&e.key, &decl.key),
        value: match (&e.value, &decl.value) {
            (Some(v), Some(t)) if t.as_slice() != [Datatype::Verdict] => {
                Some(canonical_parts(v, t))
            }
            (v, _) => v.clone(),
        },
    }
}

fn canonical_parts(text: &str, types: &[Datatype]) -> String {
    let parts: Vec<&str> = text.split(" . ").map(str::trim).collect();
    if parts.len() != types.len() {
        return text.to_owned();
    }
    parts
        .iter()
        .zip(types)
        .map(|(p, t)| canonical_one(p, *t))
        .collect::<Vec<_>>()
        .join(" . ")
}

fn canonical_one(p: &str, t: Datatype) -> String {
    let addr = |s: &str| s.parse::<IpAddr>().map(|a| a.to_string()).ok();
    match t {
        Datatype::Ipv4 | Datatype::Ipv6 => {
            if let Some(a) = addr(p) {
                return a;
            }
            if let Ok(n) = p.parse::<IpNet>() {
                return n.to_string();
            }
            match p
                .split_once('-')
                .and_then(|(a, b)| Some((addr(a)?, addr(b)?)))
            {
                Some((a, b)) => format!("{a}-{b}"),
                None => p.to_owned(),
            }
        }
        Datatype::Mark => {
            let v = match p.strip_prefix("0x") {
                Some(h) => u32::from_str_radix(h, 16).ok(),
                None => p.parse::<u32>().ok(),
            };
            v.map_or_else(|| p.to_owned(), |v| format!("0x{v:08x}"))
        }
        Datatype::Service => match p.split_once('-') {
            Some((a, b)) => match (a.parse::<u16>(), b.parse::<u16>()) {
                (Ok(a), Ok(b)) => format!("{a}-{b}"),
                _ => p.to_owned(),
            },
            None => p
                .parse::<u16>()
                .map_or_else(|_| p.to_owned(), |v| v.to_string()),
        },
        Datatype::Ether => p.to_ascii_lowercase(),
        _ => p.to_owned(),
    }
}

/// An address element: an address, or with `interval` a prefix or a range. As a prefix (a range
/// is covered by the prefixes of its ends).
fn address_item(p: &str, v6: bool, interval: bool) -> Option<Vec<IpNet>> {
    let addr = |s: &str| -> Option<IpAddr> {
        let a: IpAddr = s.parse().ok()?;
        (a.is_ipv6() == v6).then_some(a)
    };
    if let Some(a) = addr(p) {
        return Some(vec![IpNet::from(a)]);
    }
    if !interval {
        return None;
    }
    if let Ok(n) = p.parse::<IpNet>() {
        return (n.addr().is_ipv6() == v6).then_some(vec![n]);
    }
    let (a, b) = p.split_once('-')?;
    Some(vec![IpNet::from(addr(a)?), IpNet::from(addr(b)?)])
}

/// The addresses an element's first key part covers, when the set is keyed by addresses: the
/// address, the prefix, or the two ends of a range. `None` for other keys.
pub fn element_nets(key: &str, decl: &Declaration) -> Option<Vec<IpNet>> {
    let first = decl.key.first()?.address()?;
    let part = key.split(" . ").next()?.trim();
    address_item(part, first, true)
}

/// Whether the set's key starts with an address (its forbidden entries are prefixes).
pub fn keyed_by_address(decl: &Declaration) -> bool {
    decl.key.first().and_then(|t| t.address()).is_some()
}

/// Whether an element key falls foul of a forbidden prefix: equal to it, inside it, or holding it.
pub fn overlaps(nets: &[IpNet], forbidden: &IpNet) -> bool {
    if nets.len() == 2 {
        // A range: forbidden if either end is inside, or the prefix sits between the ends.
        let (lo, hi) = (nets[0].addr(), nets[1].addr());
        let f = forbidden.network();
        return forbidden.contains(&lo) || forbidden.contains(&hi) || (lo <= f && f <= hi);
    }
    nets.iter()
        .any(|n| n.contains(forbidden) || forbidden.contains(n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nftables::model::Element;

    #[test]
    fn priorities_resolve_like_nft() {
        assert_eq!(priority(NfFamily::Ip, "prerouting", "dstnat"), Ok(-100));
        assert_eq!(
            priority(NfFamily::Ip, "prerouting", "dstnat - 10"),
            Ok(-110)
        );
        assert_eq!(priority(NfFamily::Inet, "input", "filter + 5"), Ok(5));
        assert_eq!(
            priority(NfFamily::Netdev, "ingress", "filter - 10"),
            Ok(-10)
        );
        assert_eq!(priority(NfFamily::Bridge, "postrouting", "srcnat"), Ok(300));
        assert_eq!(priority(NfFamily::Ip, "output", "-300"), Ok(-300));
        assert!(priority(NfFamily::Ip, "output", "out").is_err());
        assert!(priority(NfFamily::Ip, "prerouting", "dstnat - x").is_err());
        assert!(priority(NfFamily::Ip, "input", "99999999999").is_err());
        let e = priority(NfFamily::Ip, "forward", "dstnat - 10").unwrap_err();
        assert!(e.contains("a priority of prerouting chains only"), "{e}");
    }

    #[test]
    fn chain_types_and_hooks() {
        assert!(chain_type(NfFamily::Ip, "nat", "postrouting").is_ok());
        assert!(chain_type(NfFamily::Ip, "nat", "forward").is_err());
        assert!(chain_type(NfFamily::Netdev, "nat", "ingress").is_err());
        assert!(chain_type(NfFamily::Ip, "route", "output").is_ok());
        assert!(chain_type(NfFamily::Ip, "x", "output").is_err());
        assert!(hooks(NfFamily::Netdev).contains(&"ingress"));
        assert!(!hooks(NfFamily::Arp).contains(&"forward"));
    }

    fn el(key: &str, value: Option<&str>) -> Element {
        Element {
            key: key.into(),
            value: value.map(Into::into),
        }
    }

    #[test]
    fn elements_are_checked_against_the_type() {
        let (line, d) = declaration(
            "type",
            "ipv4_addr . inet_proto . inet_service : verdict",
            true,
        )
        .unwrap();
        assert_eq!(line, "type ipv4_addr . inet_proto . inet_service : verdict");
        assert!(check_element(
            &el("10.96.0.1 . tcp . 443", Some("goto svc-a/b")),
            &d,
            false
        )
        .is_ok());
        assert!(check_element(&el("10.96.0.1 . tcp", Some("accept")), &d, false).is_err());
        assert!(check_element(&el("fd00::1 . tcp . 443", Some("accept")), &d, false).is_err());
        assert!(check_element(&el("10.96.0.1 . tcp . 70000", Some("accept")), &d, false).is_err());
        assert!(check_element(&el("10.96.0.1 . tcp . 443", Some("jump")), &d, false).is_err());
        let (_, d) = declaration("type", "ipv4_addr", false).unwrap();
        assert!(check_element(&el("10.0.0.0/8", None), &d, false).is_err());
        assert!(check_element(&el("10.0.0.0/8", None), &d, true).is_ok());
        assert!(check_element(&el("10.0.0.1-10.0.0.9", None), &d, true).is_ok());
        let (_, d) = declaration("typeof", "ip saddr . tcp dport", false).unwrap();
        assert_eq!(d.key, vec![Datatype::Ipv4, Datatype::Service]);
        assert!(check_element(&el("1.2.3.4 . 80", None), &d, false).is_ok());
        assert!(declaration("type", "ipv4_addr; flush", false).is_err());
        assert!(declaration("type", "ipv4_addr", true).is_err());
        let (_, d) = declaration("type", "mark", false).unwrap();
        assert!(check_element(&el("0x00004000", None), &d, false).is_ok());
        let (_, d) = declaration("type", "ifname", false).unwrap();
        assert!(check_element(&el("eth0", None), &d, false).is_err());
    }

    #[test]
    fn elements_take_the_form_nft_prints() {
        let (_, d) = declaration("type", "ipv6_addr . mark . inet_service", false).unwrap();
        let e = canonical_element(&el("FD00:0::0001 . 16384 . 0443", None), &d);
        assert_eq!(e.key, "fd00::1 . 0x00004000 . 443");
        let (_, d) = declaration("type", "ether_addr : ipv4_addr", true).unwrap();
        let e = canonical_element(&el("00:AA:22:33:44:55", Some("10.0.0.01")), &d);
        assert_eq!(
            (e.key.as_str(), e.value.as_deref()),
            ("00:aa:22:33:44:55", Some("10.0.0.01"))
        );
    }

    #[test]
    fn forbidden_prefixes_overlap() {
        let (_, d) = declaration("type", "ipv4_addr . inet_service", false).unwrap();
        let f: IpNet = "10.200.0.0/24".parse().unwrap();
        let nets = element_nets("10.200.0.1 . 443", &d).unwrap();
        assert!(overlaps(&nets, &f));
        let nets = element_nets("10.201.0.1 . 443", &d).unwrap();
        assert!(!overlaps(&nets, &f));
        let nets = element_nets("10.0.0.0/8", &d).unwrap();
        assert!(overlaps(&nets, &f), "a prefix holding the forbidden one");
        let nets = element_nets("10.199.0.0-10.201.0.0", &d).unwrap();
        assert!(overlaps(&nets, &f), "a range around it");
        let (_, d) = declaration("type", "inet_service", false).unwrap();
        assert_eq!(element_nets("443", &d), None);
    }
}
