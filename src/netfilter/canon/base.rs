//! The fallback when no scratch namespace can be made: the options every iptables prints the
//! same fixed way, put in that form. Pure.
//!
//! Only iptables' own options are touched, never an extension's: `-s`/`-d` (long names, a bare
//! address as a host prefix, a dotted mask as a length, host bits cleared, the any-address
//! dropped), `-i`/`-o`/`-p`/`-f` (long names; the protocol lowercase, by name, `all` dropped),
//! printed first in iptables' order (`-s -d -i -o -p -f`); and the match iptables loads by itself
//! for `--dport` and friends (`-p tcp --dport 80` → `-p tcp -m tcp --dport 80`, `--syn` as the
//! flags it stands for). Both backends print these alike (checked against iptables 1.8.9 nft and
//! legacy). What this does not know stays as written; a rule still printed otherwise is caught
//! when it does not take.

use super::RuleSpec;
use ipnet::IpNet;
use std::net::IpAddr;

/// iptables' own options, in the order `iptables-save` prints them.
const BASE: [&str; 6] = ["-s", "-d", "-i", "-o", "-p", "-f"];

fn long_name(t: &str) -> &str {
    match t {
        "--source" | "--src" => "-s",
        "--destination" | "--dst" => "-d",
        "--in-interface" => "-i",
        "--out-interface" => "-o",
        "--protocol" => "-p",
        "--fragment" => "-f",
        "--match" => "-m",
        "--jump" => "-j",
        "--goto" => "-g",
        other => other,
    }
}

/// A protocol as iptables-save names it; `None` for "any".
fn protocol(p: &str) -> Option<String> {
    let p = p.to_ascii_lowercase();
    Some(
        match p.as_str() {
            "all" | "0" => return None,
            "1" => "icmp",
            "6" => "tcp",
            "17" => "udp",
            "132" => "sctp",
            "136" => "udplite",
            "58" | "icmpv6" | "icmp6" => "ipv6-icmp",
            other => other,
        }
        .to_owned(),
    )
}

/// `10.1.2.3/255.255.0.0` → `10.1.0.0/16`; `None` when it is not one address (a list, a name).
fn address(v: &str) -> Option<IpNet> {
    let (addr, len) = v.split_once('/').map_or((v, None), |(a, l)| (a, Some(l)));
    let addr: IpAddr = addr.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len: u8 = match len {
        None => max,
        Some(l) => match l.parse::<u8>() {
            Ok(n) if n <= max => n,
            Ok(_) => return None,
            Err(_) => {
                // A dotted mask: contiguous ones only.
                let mask: IpAddr = l.parse().ok()?;
                let bits = match mask {
                    IpAddr::V4(m) => u32::from(m).leading_ones() as u8,
                    IpAddr::V6(_) => return None,
                };
                if IpNet::new(mask, bits).ok()?.netmask() != mask {
                    return None;
                }
                bits
            }
        },
    };
    Some(IpNet::new(addr, len).ok()?.trunc())
}

/// The match iptables loads by itself for a protocol's options (`-p tcp --dport 80`).
fn own_match(proto: &str) -> Option<(&'static str, &'static [&'static str])> {
    Some(match proto {
        "tcp" => (
            "tcp",
            &[
                "--sport",
                "--dport",
                "--source-port",
                "--destination-port",
                "--tcp-flags",
                "--syn",
                "--tcp-option",
            ],
        ),
        "udp" => (
            "udp",
            &["--sport", "--dport", "--source-port", "--destination-port"],
        ),
        "sctp" => ("sctp", &["--sport", "--dport", "--chunk-types"]),
        "icmp" => ("icmp", &["--icmp-type"]),
        "ipv6-icmp" => ("icmp6", &["--icmpv6-type"]),
        _ => return None,
    })
}

/// The rule with iptables' own options in printed form; `None` when it is not understood well
/// enough to be rewritten safely (then it stays as written).
pub fn normalise(rule: &RuleSpec) -> Option<RuleSpec> {
    let t: Vec<&str> = rule.tokens().iter().map(String::as_str).collect();
    let mut base: [Option<(bool, String)>; 6] = Default::default();
    let mut rest: Vec<String> = Vec::new();
    let mut i = 0;
    while i < t.len() {
        let negated = t[i] == "!";
        let at = if negated { i + 1 } else { i };
        let Some(name) = t.get(at).map(|x| long_name(x)) else {
            rest.push(t[i].to_owned());
            break;
        };
        match BASE.iter().position(|b| *b == name) {
            Some(5) => {
                base[5] = Some((negated, String::new()));
                i = at + 1;
            }
            Some(k) => {
                // A value that looks like an option: not understood (a comment saying `-p`?).
                let value = t.get(at + 1).filter(|v| !v.starts_with('-'))?;
                let value = match k {
                    0 | 1 => {
                        let net = address(value)?;
                        if net.prefix_len() == 0 && !negated {
                            i = at + 2;
                            continue;
                        }
                        net.to_string()
                    }
                    4 => match protocol(value) {
                        Some(p) => p,
                        None if !negated => {
                            i = at + 2;
                            continue;
                        }
                        None => return None,
                    },
                    _ => (*value).to_owned(),
                };
                if base[k].is_some() {
                    return None;
                }
                base[k] = Some((negated, value));
                i = at + 2;
            }
            None => {
                if name == "-j" || name == "-g" {
                    // The target and its options end the rule as iptables prints it.
                    rest.push(name.to_owned());
                    rest.extend(t[i + 1..].iter().map(|s| (*s).to_owned()));
                    break;
                }
                rest.push(if negated {
                    "!".to_owned()
                } else {
                    name.to_owned()
                });
                i += 1;
            }
        }
    }
    let proto = base[4].as_ref().map(|(_, p)| p.clone());
    let rest = implicit_matches(rest, proto.as_deref());
    let mut out: Vec<String> = Vec::new();
    for (k, b) in base.iter().enumerate() {
        let Some((negated, value)) = b else { continue };
        if *negated {
            out.push("!".into());
        }
        out.push(BASE[k].into());
        if k != 5 {
            out.push(value.clone());
        }
    }
    out.extend(rest);
    RuleSpec::from_tokens(out)
}

/// Inserts `-m PROTO` before the first option of the protocol's match when no `-m PROTO` comes
/// before it, and spells those options as printed.
fn implicit_matches(rest: Vec<String>, proto: Option<&str>) -> Vec<String> {
    let Some((name, options)) = proto.and_then(own_match) else {
        return rest;
    };
    let mut out: Vec<String> = Vec::new();
    let mut loaded = false;
    for (i, tok) in rest.iter().enumerate() {
        if tok == "-j" || tok == "-g" {
            out.extend(rest[i..].iter().cloned());
            break;
        }
        if tok == "-m" && rest.get(i + 1).is_some_and(|n| n == name) {
            loaded = true;
        }
        if !options.contains(&tok.as_str()) {
            out.push(tok.clone());
            continue;
        }
        if !loaded {
            let at = if out.last().is_some_and(|l| l == "!") {
                out.len() - 1
            } else {
                out.len()
            };
            out.splice(at..at, ["-m".to_owned(), name.to_owned()]);
            loaded = true;
        }
        match tok.as_str() {
            "--source-port" => out.push("--sport".into()),
            "--destination-port" => out.push("--dport".into()),
            "--syn" => out.extend(["--tcp-flags", "FIN,SYN,RST,ACK", "SYN"].map(String::from)),
            _ => out.push(tok.clone()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> RuleSpec {
        RuleSpec::parse(s).unwrap()
    }

    /// Each pair: as written, and as iptables 1.8.9 (nft and legacy alike) printed it.
    #[test]
    fn prints_what_iptables_prints() {
        let cases = [
            (
                "-p tcp -s 1.2.3.4 -i eth0 --dport 80 -j ACCEPT",
                "-s 1.2.3.4/32 -i eth0 -p tcp -m tcp --dport 80 -j ACCEPT",
            ),
            (
                "-m comment --comment x -s 1.2.3.4 -j ACCEPT",
                "-s 1.2.3.4/32 -m comment --comment x -j ACCEPT",
            ),
            (
                "-p tcp -m comment --comment x --dport 80 -j ACCEPT",
                "-p tcp -m comment --comment x -m tcp --dport 80 -j ACCEPT",
            ),
            (
                "-p TCP ! --dport 80 -d 10.1.2.3/255.255.0.0 -j ACCEPT",
                "-d 10.1.0.0/16 -p tcp -m tcp ! --dport 80 -j ACCEPT",
            ),
            (
                "-p 17 --source-port 53 -j ACCEPT",
                "-p udp -m udp --sport 53 -j ACCEPT",
            ),
            (
                "-p tcp --syn -j ACCEPT",
                "-p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j ACCEPT",
            ),
            ("-s 0.0.0.0/0 -p all -j ACCEPT", "-j ACCEPT"),
            (
                "! -s 10.0.0.1 -o eth1 -p icmp --icmp-type 8 -j ACCEPT",
                "! -s 10.0.0.1/32 -o eth1 -p icmp -m icmp --icmp-type 8 -j ACCEPT",
            ),
            ("-i eth0 -f -j ACCEPT", "-i eth0 -f -j ACCEPT"),
            (
                "-p sctp --dport 80 -j ACCEPT",
                "-p sctp -m sctp --dport 80 -j ACCEPT",
            ),
            ("-p udplite -j ACCEPT", "-p udplite -j ACCEPT"),
            (
                "-s fd00:0:0::1 -p ipv6-icmp --icmpv6-type 128 -j ACCEPT",
                "-s fd00::1/128 -p ipv6-icmp -m icmp6 --icmpv6-type 128 -j ACCEPT",
            ),
            (
                "-d fd00:10:244:0:0:0:0:0/56 -p 58 -j ACCEPT",
                "-d fd00:10:244::/56 -p ipv6-icmp -j ACCEPT",
            ),
            (
                "--source 10.244.0.0/16 -m tcp -p tcp --dport 80 --jump MASQUERADE --random-fully",
                "-s 10.244.0.0/16 -p tcp -m tcp --dport 80 -j MASQUERADE --random-fully",
            ),
        ];
        for (written, printed) in cases {
            assert_eq!(normalise(&r(written)), Some(r(printed)), "{written}");
        }
    }

    #[test]
    fn what_it_cannot_be_sure_of_stays_as_written() {
        for written in [
            "-s 10.0.0.1,10.0.0.2 -j RETURN",
            "-d example.com -j ACCEPT",
            "-s 10.0.0.0/255.0.255.0 -j ACCEPT",
            "-s 10.0.0.1 -s 10.0.0.2 -j ACCEPT",
        ] {
            assert_eq!(normalise(&r(written)), None, "{written}");
        }
    }
}
