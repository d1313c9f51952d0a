//! rtnetlink messages → model. Normalises away what dumps add and the config never says:
//! suppress_prefixlength -1, the table repeated in an attribute, `proto unspec`, IPv6's cached
//! clones.

use crate::model::neighbour::{ObservedFdb, ObservedNeighbour};
use crate::model::route::ObservedRoute;
use crate::model::sysctl::{Setting, NETCONFA_IFINDEX};
use crate::model::{
    AddressKey, Family, Mac, ObservedAddress, RouteKey, RouteType, RuleAction, RuleKey,
};
use ipnet::IpNet;
use rtnetlink::packet_core::{NetlinkBuffer, NetlinkMessage, Parseable};
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteMetric, RouteType as NlRouteType,
};
use rtnetlink::packet_route::rule::{
    RuleAction as NlRuleAction, RuleAttribute, RuleFlags, RuleMessage,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use std::net::IpAddr;
use std::ops::ControlFlow;

/// Hands `f` each well-formed rtnetlink message of one datagram, in order, until `f` breaks;
/// messages that do not parse are skipped, and a truncated or malformed header ends the walk.
pub fn each_message(
    data: &[u8],
    mut f: impl FnMut(NetlinkMessage<RouteNetlinkMessage>) -> ControlFlow<()>,
) -> ControlFlow<()> {
    let mut at = 0;
    while at + 16 <= data.len() {
        let slice = &data[at..];
        let Ok(nb) = NetlinkBuffer::new_checked(&slice) else {
            break;
        };
        let len = nb.length() as usize;
        if let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::parse(&nb) {
            f(msg)?;
        }
        if len == 0 {
            break;
        }
        at += (len + 3) & !3;
    }
    ControlFlow::Continue(())
}

/// What the mirror keeps of a link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    /// Administratively up (IFF_UP).
    pub up: bool,
    pub mtu: Option<u32>,
    /// A VXLAN device's own VNI: what its FDB remotes without a VNI of their own use.
    pub vxlan_id: Option<u32>,
}

pub fn family(af: AddressFamily) -> Option<Family> {
    match af {
        AddressFamily::Inet => Some(Family::Ipv4),
        AddressFamily::Inet6 => Some(Family::Ipv6),
        _ => None,
    }
}

fn net(addr: IpAddr, len: u8) -> Option<IpNet> {
    IpNet::new(addr, len).ok().map(|n| n.trunc())
}

/// A rule and its protocol (`None` for unspec), or `None` for families we do not handle.
pub fn rule(msg: &RuleMessage) -> Option<(RuleKey, Option<u8>)> {
    let fam = family(msg.header.family)?;
    let mut key = RuleKey {
        family: fam,
        priority: 0,
        from: None,
        to: None,
        iif: None,
        oif: None,
        fwmark: None,
        table: u32::from(msg.header.table),
        action: match msg.header.action {
            NlRuleAction::ToTable => RuleAction::Lookup,
            NlRuleAction::Blackhole => RuleAction::Blackhole,
            NlRuleAction::Unreachable => RuleAction::Unreachable,
            NlRuleAction::Prohibit => RuleAction::Prohibit,
            other => RuleAction::Other(u8::from(other)),
        },
        tos: msg.header.tos,
        invert: msg.header.flags.contains(RuleFlags::Invert),
        extra: None,
    };
    let mut protocol = None;
    let (mut mark, mut mask) = (None, None);
    let mut extra: Vec<String> = Vec::new();
    for attr in &msg.attributes {
        match attr {
            RuleAttribute::Priority(p) => key.priority = *p,
            RuleAttribute::Source(a) => key.from = net(*a, msg.header.src_len),
            RuleAttribute::Destination(a) => key.to = net(*a, msg.header.dst_len),
            RuleAttribute::Iifname(n) => key.iif = Some(n.clone()),
            RuleAttribute::Oifname(n) => key.oif = Some(n.clone()),
            RuleAttribute::FwMark(m) => mark = Some(*m),
            RuleAttribute::FwMask(m) => mask = Some(*m),
            RuleAttribute::Table(t) => key.table = *t,
            RuleAttribute::Protocol(p) => protocol = Some(u8::from(*p)).filter(|p| *p != 0),
            RuleAttribute::SuppressPrefixLen(v) | RuleAttribute::SuppressIfGroup(v)
                if *v == u32::MAX => {}
            RuleAttribute::L3MDev(false) => {}
            RuleAttribute::TunId(0) => {}
            RuleAttribute::Goto(g) => extra.push(format!("goto {g}")),
            RuleAttribute::SuppressPrefixLen(v) => extra.push(format!("suppress_prefixlength {v}")),
            RuleAttribute::SuppressIfGroup(v) => extra.push(format!("suppress_ifgroup {v}")),
            RuleAttribute::L3MDev(true) => extra.push("l3mdev".into()),
            RuleAttribute::TunId(t) => extra.push(format!("tun_id {t}")),
            RuleAttribute::UidRange(r) => extra.push(format!("uidrange {}-{}", r.start, r.end)),
            RuleAttribute::IpProtocol(p) => extra.push(format!("ipproto {p:?}")),
            RuleAttribute::SourcePortRange(r) => extra.push(format!("sport {}-{}", r.start, r.end)),
            RuleAttribute::DestinationPortRange(r) => {
                extra.push(format!("dport {}-{}", r.start, r.end))
            }
            RuleAttribute::Realm(r) => extra.push(format!("realms {r:?}")),
            _ => {}
        }
    }
    key.fwmark = crate::model::rule::normalise_fwmark(mark, mask);
    if key.action != RuleAction::Lookup {
        key.table = 0;
    }
    if !extra.is_empty() {
        key.extra = Some(extra.join(" "));
    }
    Some((key, protocol))
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// A route, or `None` for families we do not handle and for IPv6's cached clones.
pub fn route(msg: &RouteMessage) -> Option<(RouteKey, ObservedRoute)> {
    let fam = family(msg.header.address_family)?;
    if msg.header.flags.contains(RouteFlags::Cloned) {
        return None;
    }
    let mut table = u32::from(msg.header.table);
    let mut destination = fam.any();
    let mut source_prefix = None;
    let mut metric = 0;
    let mut observed = ObservedRoute {
        kind: match msg.header.kind {
            NlRouteType::Unicast => RouteType::Unicast,
            NlRouteType::Local => RouteType::Local,
            NlRouteType::BlackHole => RouteType::Blackhole,
            NlRouteType::Unreachable => RouteType::Unreachable,
            NlRouteType::Prohibit => RouteType::Prohibit,
            other => RouteType::Other(u8::from(other)),
        },
        gateway: None,
        oif: None,
        prefsrc: None,
        scope: u8::from(msg.header.scope),
        protocol: u8::from(msg.header.protocol),
        onlink: msg.header.flags.contains(RouteFlags::Onlink),
        mtu: None,
        multipath: false,
    };
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(a) => {
                if let Some(n) =
                    route_addr(a).and_then(|a| net(a, msg.header.destination_prefix_length))
                {
                    destination = n;
                }
            }
            RouteAttribute::Source(a) => {
                source_prefix = route_addr(a)
                    .and_then(|a| net(a, msg.header.source_prefix_length))
                    .filter(|n| n.prefix_len() != 0);
            }
            RouteAttribute::Gateway(a) => observed.gateway = route_addr(a),
            RouteAttribute::PrefSource(a) => observed.prefsrc = route_addr(a),
            RouteAttribute::Oif(i) => observed.oif = Some(*i),
            RouteAttribute::Priority(p) => metric = *p,
            RouteAttribute::Metrics(ms) => {
                for m in ms {
                    if let RouteMetric::Mtu(v) = m {
                        observed.mtu = Some(*v);
                    }
                }
            }
            RouteAttribute::MultiPath(_) | RouteAttribute::Via(_) | RouteAttribute::NhId(_) => {
                observed.multipath = true
            }
            _ => {}
        }
    }
    let key = RouteKey {
        family: fam,
        table,
        destination,
        metric,
        tos: msg.header.tos,
        source_prefix,
    };
    Some((key, observed))
}

/// An address, or `None` for families we do not handle.
pub fn address(msg: &AddressMessage) -> Option<(AddressKey, ObservedAddress)> {
    family(msg.header.family)?;
    let mut local = None;
    let mut peer = None;
    let mut observed = ObservedAddress {
        prefix_len: msg.header.prefix_len,
        flags: u32::from(msg.header.flags.bits()),
        scope: u8::from(msg.header.scope),
        ..ObservedAddress::default()
    };
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(a) => local = Some(*a),
            AddressAttribute::Address(a) => peer = Some(*a),
            AddressAttribute::Broadcast(b) => observed.broadcast = Some(*b),
            AddressAttribute::Label(l) => observed.label = Some(l.clone()),
            AddressAttribute::Flags(f) => observed.flags = f.bits(),
            AddressAttribute::Protocol(p) => observed.protocol = Some(u8::from(*p)),
            AddressAttribute::RoutePriority(p) => observed.route_priority = Some(*p),
            AddressAttribute::CacheInfo(c) => {
                let left = |v: u32| (v != crate::model::address::FOREVER).then_some(v);
                observed.valid_lft = left(c.ifa_valid);
                observed.preferred_lft = left(c.ifa_preferred);
            }
            _ => {}
        }
    }
    // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer on point-to-point links
    // and equal to IFA_LOCAL otherwise. IPv6 sends only IFA_ADDRESS unless it is point-to-point.
    let address = local.or(peer)?;
    observed.peer = peer.filter(|p| *p != address);
    Some((
        AddressKey {
            ifindex: msg.header.index,
            address,
        },
        observed,
    ))
}

pub fn link(msg: &LinkMessage) -> LinkInfo {
    use rtnetlink::packet_route::link::{InfoData, InfoVxlan, LinkInfo as Info};
    let mut info = LinkInfo {
        index: msg.header.index,
        name: String::new(),
        up: msg.header.flags.contains(LinkFlags::Up),
        mtu: None,
        vxlan_id: None,
    };
    for a in &msg.attributes {
        match a {
            LinkAttribute::IfName(n) => info.name = n.clone(),
            LinkAttribute::Mtu(m) => info.mtu = Some(*m),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let Info::Data(InfoData::Vxlan(v)) = i {
                        info.vxlan_id = v.iter().find_map(|x| match x {
                            InfoVxlan::Id(id) => Some(*id),
                            _ => None,
                        });
                    }
                }
            }
            _ => {}
        }
    }
    info
}

/// A neighbour entry, by device index and address; `None` for proxy entries, other families
/// and messages without an address.
pub fn neighbour(msg: &NeighbourMessage) -> Option<(u32, IpAddr, ObservedNeighbour)> {
    family(msg.header.family)?;
    if msg.header.flags.contains(NeighbourFlags::Proxy) {
        return None;
    }
    let mut address = None;
    let mut lladdr = None;
    for a in &msg.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                address = Some(IpAddr::V4(*v4))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                address = Some(IpAddr::V6(*v6))
            }
            NeighbourAttribute::LinkLayerAddress(l) => lladdr = Some(l.clone()),
            _ => {}
        }
    }
    let observed = ObservedNeighbour {
        lladdr,
        state: u16::from(msg.header.state),
    };
    Some((msg.header.ifindex, address?, observed))
}

/// One remote of an FDB entry a device keeps itself (NTF_SELF: a VXLAN device's), by device
/// index and MAC; `None` for other families, entries of a bridge's own table (NTF_MASTER) and
/// messages without a MAC.
pub fn fdb(msg: &NeighbourMessage) -> Option<(u32, Mac, ObservedFdb)> {
    if msg.header.family != AddressFamily::Bridge || !msg.header.flags.contains(NeighbourFlags::Own)
    {
        return None;
    }
    let mut mac = None;
    let mut observed = ObservedFdb {
        dst: None,
        vni: None,
        state: u16::from(msg.header.state),
    };
    for a in &msg.attributes {
        match a {
            NeighbourAttribute::LinkLayerAddress(l) => mac = Mac::from_bytes(l),
            NeighbourAttribute::Destination(d) => {
                observed.dst = match d {
                    NeighbourAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
                    NeighbourAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
                    // AF_BRIDGE messages carry the remote as raw bytes.
                    NeighbourAddress::Other(b) => ip_of_bytes(b),
                    _ => None,
                }
            }
            NeighbourAttribute::Vni(v) => observed.vni = Some(*v),
            _ => {}
        }
    }
    Some((msg.header.ifindex, mac?, observed))
}

fn ip_of_bytes(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(b).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(b).ok()?)),
        _ => None,
    }
}

/// RTM_NEWNETCONF and RTM_DELNETCONF (netlink-packet-route does not know them).
pub const RTM_NEWNETCONF: u16 = 80;
pub const RTM_DELNETCONF: u16 = 81;

/// A netconf notification: a family's settings of one device (or of `all` / `default`,
/// [`IFINDEX_ALL`](crate::model::sysctl::IFINDEX_ALL)) that changed, with their values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Netconf {
    pub family: Family,
    pub ifindex: i32,
    pub values: Vec<(Setting, u32)>,
}

/// Decodes the payload of an RTM_NEWNETCONF message: `struct netconfmsg` (the family, padded to
/// 4 bytes), then NETCONFA_* attributes of 4 bytes each. `None` for other families or a message
/// without an ifindex.
pub fn netconf(payload: &[u8]) -> Option<Netconf> {
    let family = match *payload.first()? {
        2 => Family::Ipv4,
        10 => Family::Ipv6,
        _ => return None,
    };
    let mut ifindex = None;
    let mut values = Vec::new();
    let mut at = 4;
    while at + 4 <= payload.len() {
        let len = usize::from(u16::from_ne_bytes([payload[at], payload[at + 1]]));
        let kind = u16::from_ne_bytes([payload[at + 2], payload[at + 3]]);
        if len < 4 || at + len > payload.len() {
            break;
        }
        if len >= 8 {
            let v = i32::from_ne_bytes(payload[at + 4..at + 8].try_into().ok()?);
            if kind == NETCONFA_IFINDEX {
                ifindex = Some(v);
            } else if let Some(s) = Setting::of_netconf(family, kind) {
                values.push((s, v.max(0) as u32));
            }
        }
        at += (len + 3) & !3;
    }
    Some(Netconf {
        family,
        ifindex: ifindex?,
        values,
    })
}
