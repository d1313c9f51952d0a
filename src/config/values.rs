//! Parsers for single scalar values. Each returns the operator-facing reason on failure; the
//! caller adds the file position and the field path.
//!
//! Every scalar arrives as the text YAML wrote (integers and booleans included), so that the
//! range and format rules live here rather than in serde, and an out-of-range number is reported
//! against its field instead of as an opaque type error.

use crate::model::{self, route, Family, Mode, RouteType, RuleAction};
use ipnet::IpNet;
use std::net::IpAddr;
use std::time::Duration;

/// Longest interface name the kernel accepts (IFNAMSIZ minus the terminating NUL).
const IFNAME_MAX: usize = 15;

/// Longest object name; the same limit as a Kubernetes label value, so names can be reused there.
const NAME_MAX: usize = 63;

pub(super) const RESYNC_MIN: Duration = Duration::from_secs(1);
pub(super) const RESYNC_MAX: Duration = Duration::from_secs(24 * 60 * 60);

/// An unsigned integer in `min..=max`, decimal or (when `hex`) `0x`-prefixed hexadecimal.
pub(super) fn uint(s: &str, min: u64, max: u64, hex: bool) -> Result<u64, String> {
    let not_a_number = || {
        if hex {
            format!("`{s}` is not a number (use decimal or 0x-prefixed hex)")
        } else {
            format!("`{s}` is not a number")
        }
    };
    let out_of_range = || format!("`{s}` is out of range: must be between {min} and {max}");
    let hex_digits = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X"));
    let value = match hex_digits {
        Some(digits) if hex => {
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(not_a_number());
            }
            // All digits are valid, so the only possible failure is overflow.
            u64::from_str_radix(digits, 16).map_err(|_| out_of_range())?
        }
        _ => {
            // Checked by hand because `u64::from_str` also takes a leading `+`.
            let (negative, digits) = match s.strip_prefix('-') {
                Some(rest) => (true, rest),
                None => (false, s),
            };
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(not_a_number());
            }
            if negative {
                return Err(out_of_range());
            }
            digits.parse::<u64>().map_err(|_| out_of_range())?
        }
    };
    if value < min || value > max {
        return Err(out_of_range());
    }
    Ok(value)
}

pub(super) fn u32_value(s: &str, min: u32, hex: bool) -> Result<u32, String> {
    let v = uint(s, min.into(), u32::MAX.into(), hex)?;
    // `uint` checked the range, so this cannot fail; map it anyway rather than cast.
    u32::try_from(v).map_err(|_| format!("`{s}` is out of range"))
}

/// A routing table: a number 1..=4294967295 or one of the names in iproute2's `rt_tables`.
pub(super) fn table(s: &str) -> Result<u32, String> {
    let looks_numeric = s.starts_with(|c: char| c.is_ascii_digit() || c == '-');
    if !looks_numeric {
        return model::parse_table(s).ok_or_else(|| {
            format!("unknown table `{s}`: use a number between 1 and 4294967295 or main, local, default")
        });
    }
    // Table 0 is RT_TABLE_UNSPEC: the kernel would pick a table itself, which cannot be protected.
    let id = u32_value(s, 1, false)?;
    model::parse_table(&id.to_string()).ok_or_else(|| format!("`{s}` is not a table"))
}

/// A route protocol: a number 0..=255 or an `rt_protos` name.
pub(super) fn protocol(s: &str) -> Result<u8, String> {
    model::parse_protocol(s).ok_or_else(|| {
        if s.starts_with(|c: char| c.is_ascii_digit() || c == '-') {
            format!("`{s}` is out of range: must be between 0 and 255")
        } else {
            format!("unknown protocol `{s}`: use a number between 0 and 255 or a name such as static, boot, kernel, bird, bgp")
        }
    })
}

pub(super) fn scope(s: &str) -> Result<u8, String> {
    route::parse_scope(s).ok_or_else(|| {
        if s.starts_with(|c: char| c.is_ascii_digit() || c == '-') {
            format!("`{s}` is out of range: must be between 0 and 255")
        } else {
            format!("unknown scope `{s}`: use global, universe, site, link, host or a number between 0 and 255")
        }
    })
}

pub(super) fn family(s: &str) -> Result<Family, String> {
    match s {
        "ipv4" => Ok(Family::Ipv4),
        "ipv6" => Ok(Family::Ipv6),
        _ => Err(format!("unknown family `{s}`: use ipv4 or ipv6")),
    }
}

pub(super) fn mode(s: &str) -> Result<Mode, String> {
    match s {
        "enforce" => Ok(Mode::Enforce),
        "observe" => Ok(Mode::Observe),
        _ => Err(format!("unknown mode `{s}`: use enforce or observe")),
    }
}

pub(super) fn rule_action(s: &str) -> Result<RuleAction, String> {
    RuleAction::parse(s).ok_or_else(|| {
        format!("unknown action `{s}`: use lookup, blackhole, unreachable or prohibit")
    })
}

pub(super) fn route_type(s: &str) -> Result<RouteType, String> {
    RouteType::parse(s).ok_or_else(|| {
        format!("unknown type `{s}`: use unicast, local, blackhole, unreachable or prohibit")
    })
}

/// YAML 1.2 core-schema booleans only: `yes`/`on` are too easy to write by accident.
pub(super) fn boolean(s: &str) -> Result<bool, String> {
    match s {
        "true" | "True" | "TRUE" => Ok(true),
        "false" | "False" | "FALSE" => Ok(false),
        _ => Err(format!("`{s}` is not a boolean: use true or false")),
    }
}

/// A duration written as an integer and a unit (`500ms`, `30s`, `5m`, `1h`), within the bounds
/// the reconcile loop can sensibly use.
pub(super) fn resync(s: &str) -> Result<Duration, String> {
    duration_within(s, "resync", RESYNC_MIN, RESYNC_MAX)
}

/// A duration written as an integer and a unit, from `min` (whole seconds) to `max` (whole
/// hours); `what` names the setting in messages.
pub(super) fn duration_within(
    s: &str,
    what: &str,
    min: Duration,
    max: Duration,
) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let format_hint = || {
        format!(
            "`{s}` is not a duration: write an integer and a unit ms, s, m or h, e.g. 30s or 5m"
        )
    };
    if digits.is_empty() {
        return Err(format_hint());
    }
    let per_unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(format_hint()),
    };
    let too_long = || {
        format!(
            "`{s}` is too long: {what} must be at most {}h",
            max.as_secs() / 3600
        )
    };
    let n: u64 = digits.parse().map_err(|_| too_long())?;
    let ms = n.checked_mul(per_unit_ms).ok_or_else(too_long)?;
    let d = Duration::from_millis(ms);
    if d < min {
        return Err(format!(
            "`{s}` is too short: {what} must be at least {}s",
            min.as_secs()
        ));
    }
    if d > max {
        return Err(too_long());
    }
    Ok(d)
}

/// Object names are used in logs, metrics labels and error messages, so keep them plain.
pub(super) fn object_name(s: &str) -> Result<String, String> {
    let ok_chars = s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if s.is_empty() || s.len() > NAME_MAX || !ok_chars {
        return Err(format!(
            "`{s}` is not a valid name: use 1 to {NAME_MAX} characters from A-Z, a-z, 0-9, '.', '_', '-'"
        ));
    }
    Ok(s.to_owned())
}

/// A process name as the kernel reports it (`comm`) and the agent's actor labels show it. Longer
/// names are accepted and compared on their first 15 bytes, the kernel's limit: so
/// `systemd-networkd` names the process the kernel calls `systemd-network`.
pub(super) fn process_name(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > NAME_MAX || s.contains('/') || s.chars().any(char::is_whitespace) {
        return Err(format!(
            "`{s}` is not a process name: 1 to {NAME_MAX} characters, no '/' or whitespace (as `ps -o comm` shows it, e.g. systemd-networkd or NetworkManager)"
        ));
    }
    Ok(s.to_owned())
}

/// An interface name the kernel would accept (`dev_valid_name()`).
pub(super) fn ifname(s: &str) -> Result<String, String> {
    let reason = if s.is_empty() {
        Some("it is empty".to_owned())
    } else if s.len() > IFNAME_MAX {
        Some(format!("it is longer than {IFNAME_MAX} bytes"))
    } else if s == "." || s == ".." {
        Some("`.` and `..` are reserved".to_owned())
    } else if s.contains(['/', ':']) {
        Some("it contains '/' or ':'".to_owned())
    } else if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("it contains whitespace or control characters".to_owned())
    } else {
        None
    };
    match reason {
        Some(r) => Err(format!("`{s}` is not a valid interface name: {r}")),
        None => Ok(s.to_owned()),
    }
}

fn ip(s: &str) -> Result<IpAddr, String> {
    s.parse()
        .map_err(|_| format!("`{s}` is not an IPv4 or IPv6 address"))
}

/// `ADDRESS/LEN` with LEN checked against the family, reporting which half is wrong.
fn net_with_len(s: &str, addr: &str, len: &str) -> Result<IpNet, String> {
    let a = ip(addr)
        .map_err(|_| format!("`{s}` is not a valid prefix: `{addr}` is not an IP address"))?;
    let max: u8 = match a {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    };
    let bad_len = || {
        format!(
            "`{s}` is not a valid prefix: the prefix length must be between 0 and {max} for {}",
            Family::of(&a)
        )
    };
    if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad_len());
    }
    let l: u8 = len.parse().map_err(|_| bad_len())?;
    IpNet::new(a, l).map_err(|_| bad_len())
}

/// A prefix, or a bare address meaning the host prefix (/32 or /128). Host bits are refused:
/// `10.1.0.0/8` is more likely a typo for `/16` than a wish to protect all of 10.0.0.0/8, and the
/// kernel refuses such IPv4 routes anyway.
pub(super) fn prefix(s: &str) -> Result<IpNet, String> {
    let net = match s.split_once('/') {
        Some((addr, len)) => net_with_len(s, addr, len)?,
        None => ip(s).map(IpNet::from)?,
    };
    if net.trunc() != net {
        return Err(format!(
            "`{s}` has host bits set: the prefix would be `{}`",
            net.trunc()
        ));
    }
    Ok(net)
}

/// An address with an explicit prefix length, as an interface address needs one.
pub(super) fn interface_address(s: &str) -> Result<IpNet, String> {
    match s.split_once('/') {
        Some((addr, len)) => net_with_len(s, addr, len),
        None => {
            ip(s)?;
            Err(format!(
                "`{s}` has no prefix length: write it explicitly, e.g. `{s}/24` or `{s}/64`"
            ))
        }
    }
}

/// A bare address (gateway, preferred source).
pub(super) fn address(s: &str) -> Result<IpAddr, String> {
    if s.contains('/') {
        return Err(format!(
            "`{s}` must be a single address without a prefix length"
        ));
    }
    ip(s)
}

/// Rule selector: a prefix, a bare address, or `all`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Selector {
    All,
    Net(IpNet),
}

impl Selector {
    pub(super) fn family(self) -> Option<Family> {
        match self {
            Selector::All => None,
            Selector::Net(n) => Some(Family::of_net(&n)),
        }
    }

    pub(super) fn net(self) -> Option<IpNet> {
        match self {
            Selector::All => None,
            Selector::Net(n) => Some(n),
        }
    }
}

pub(super) fn selector(s: &str) -> Result<Selector, String> {
    if s == "all" {
        return Ok(Selector::All);
    }
    prefix(s)
        .map(Selector::Net)
        .map_err(|e| format!("{e} (use a prefix, an address or `all`)"))
}

/// Route destination: a prefix, a bare address, or `default`.
pub(super) fn destination(s: &str) -> Result<Option<IpNet>, String> {
    if s == "default" {
        return Ok(None);
    }
    prefix(s)
        .map(Some)
        .map_err(|e| format!("{e} (use a prefix, an address or `default`)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(uint("100", 0, 200, false), Ok(100));
        assert_eq!(uint("0x10", 0, 200, true), Ok(16));
        assert_eq!(uint("0XfF", 0, 300, true), Ok(255));
        assert!(uint("0x10", 0, 200, false)
            .unwrap_err()
            .contains("not a number"));
        assert!(uint("+5", 0, 200, false)
            .unwrap_err()
            .contains("not a number"));
        assert!(uint("-1", 0, 200, false)
            .unwrap_err()
            .contains("out of range"));
        assert!(uint("201", 0, 200, false)
            .unwrap_err()
            .contains("out of range"));
        assert!(uint("99999999999999999999999", 0, 200, false)
            .unwrap_err()
            .contains("out of range"));
        assert!(uint("0x", 0, 200, true)
            .unwrap_err()
            .contains("not a number"));
        assert!(uint("1.5", 0, 200, false)
            .unwrap_err()
            .contains("not a number"));
    }

    #[test]
    fn tables() {
        assert_eq!(table("main"), Ok(254));
        assert_eq!(table("4294967295"), Ok(u32::MAX));
        assert!(table("0").unwrap_err().contains("out of range"));
        assert!(table("-1").unwrap_err().contains("out of range"));
        assert!(table("4294967296").unwrap_err().contains("out of range"));
        assert!(table("mian").unwrap_err().contains("unknown table"));
    }

    #[test]
    fn durations() {
        assert_eq!(
            resync("500ms"),
            Err("`500ms` is too short: resync must be at least 1s".into())
        );
        assert_eq!(resync("1000ms"), Ok(Duration::from_secs(1)));
        assert_eq!(resync("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(resync("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(resync("24h"), Ok(Duration::from_secs(86_400)));
        assert!(resync("25h").unwrap_err().contains("at most 24h"));
        assert!(resync("99999999999999999999h")
            .unwrap_err()
            .contains("at most 24h"));
        assert!(resync("60").unwrap_err().contains("not a duration"));
        assert!(resync("1.5s").unwrap_err().contains("not a duration"));
        assert!(resync("s").unwrap_err().contains("not a duration"));
        assert!(resync("1d").unwrap_err().contains("not a duration"));
    }

    #[test]
    fn names() {
        assert!(object_name("overlay-from-pods_1.x").is_ok());
        assert!(object_name("").is_err());
        assert!(object_name("has space").is_err());
        assert!(object_name(&"a".repeat(64)).is_err());
        assert!(ifname("eth0").is_ok());
        assert!(ifname("veth1234567890ab").is_err(), "16 bytes");
        assert!(ifname("a/b").is_err());
        assert!(ifname("eth0:1").is_err());
        assert!(ifname("a b").is_err());
        assert!(ifname("..").is_err());
    }

    #[test]
    fn prefixes_and_addresses() {
        assert_eq!(prefix("10.0.0.1"), Ok("10.0.0.1/32".parse().unwrap()));
        assert_eq!(prefix("fd00::1"), Ok("fd00::1/128".parse().unwrap()));
        assert!(prefix("10.0.0.300/8")
            .unwrap_err()
            .contains("`10.0.0.300` is not an IP address"));
        assert!(prefix("10.0.0.0/33")
            .unwrap_err()
            .contains("between 0 and 32"));
        assert!(prefix("fd00::/129")
            .unwrap_err()
            .contains("between 0 and 128"));
        assert!(prefix("10.0.0.0/").is_err());
        assert!(prefix("foo")
            .unwrap_err()
            .contains("not an IPv4 or IPv6 address"));
        assert_eq!(selector("all"), Ok(Selector::All));
        assert_eq!(destination("default"), Ok(None));
        assert!(interface_address("10.0.0.1")
            .unwrap_err()
            .contains("no prefix length"));
        assert!(address("10.0.0.1/32").is_err());
    }
}
