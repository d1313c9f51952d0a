//! model → rtnetlink request messages, shaped the way iproute2 shapes them.

use crate::model::address::{FOREVER, SETTABLE_FLAGS};
use crate::model::{
    DesiredFdb, DesiredNeighbour, DesiredRoute, Family, ObservedAddress, RouteType, RuleAction,
    RuleKey,
};
use rtnetlink::packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteMetric, RouteProtocol, RouteScope,
    RouteType as NlRouteType,
};
use rtnetlink::packet_route::rule::{
    RuleAction as NlRuleAction, RuleAttribute, RuleFlags, RuleMessage,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use std::net::IpAddr;

fn af(f: Family) -> AddressFamily {
    match f {
        Family::Ipv4 => AddressFamily::Inet,
        Family::Ipv6 => AddressFamily::Inet6,
    }
}

/// The header's table byte: ids above 255 travel only in the TABLE attribute.
fn table_byte(t: u32) -> u8 {
    u8::try_from(t).unwrap_or(0)
}

/// Wraps a payload in a request header. `create`: add (EXCL, so an existing object is reported
/// as EEXIST instead of being duplicated); `replace`: add or replace in place; neither: delete.
pub fn request(
    payload: RouteNetlinkMessage,
    create: bool,
    replace: bool,
) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    if replace {
        header.flags |= NLM_F_CREATE | NLM_F_REPLACE;
    } else if create {
        header.flags |= NLM_F_CREATE | NLM_F_EXCL;
    }
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(payload));
    msg.finalize();
    msg
}

/// A route deletion that matches no route there is (0.0.0.0/32 in the main table, of protocol
/// 255): the kernel answers it with ESRCH, after taking the routing lock. See
/// `Applier::barrier`.
pub fn no_such_route() -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = AddressFamily::Inet;
    msg.header.destination_prefix_length = 32;
    msg.header.table = crate::model::TABLE_MAIN as u8;
    msg.header.protocol = RouteProtocol::from(255u8);
    msg.header.scope = RouteScope::NoWhere;
    msg.attributes
        .push(RouteAttribute::Destination(RouteAddress::Inet(
            std::net::Ipv4Addr::UNSPECIFIED,
        )));
    msg
}

pub fn rule(key: &RuleKey, protocol: Option<u8>) -> RuleMessage {
    let mut msg = RuleMessage::default();
    msg.header.family = af(key.family);
    msg.header.tos = key.tos;
    msg.header.table = table_byte(key.table);
    msg.header.action = match key.action {
        RuleAction::Lookup => NlRuleAction::ToTable,
        RuleAction::Blackhole => NlRuleAction::Blackhole,
        RuleAction::Unreachable => NlRuleAction::Unreachable,
        RuleAction::Prohibit => NlRuleAction::Prohibit,
        RuleAction::Other(a) => NlRuleAction::from(a),
    };
    if key.invert {
        msg.header.flags |= RuleFlags::Invert;
    }
    let a = &mut msg.attributes;
    a.push(RuleAttribute::Priority(key.priority));
    if let Some(n) = key.from {
        msg.header.src_len = n.prefix_len();
        a.push(RuleAttribute::Source(n.addr()));
    }
    if let Some(n) = key.to {
        msg.header.dst_len = n.prefix_len();
        a.push(RuleAttribute::Destination(n.addr()));
    }
    if let Some(i) = &key.iif {
        a.push(RuleAttribute::Iifname(i.clone()));
    }
    if let Some(o) = &key.oif {
        a.push(RuleAttribute::Oifname(o.clone()));
    }
    if let Some((mark, mask)) = key.fwmark {
        a.push(RuleAttribute::FwMark(mark));
        a.push(RuleAttribute::FwMask(mask));
    }
    if key.action == RuleAction::Lookup {
        a.push(RuleAttribute::Table(key.table));
    }
    if let Some(p) = protocol {
        a.push(RuleAttribute::Protocol(p.into()));
    }
    msg
}

fn route_address(ip: IpAddr) -> RouteAddress {
    match ip {
        IpAddr::V4(a) => RouteAddress::Inet(a),
        IpAddr::V6(a) => RouteAddress::Inet6(a),
    }
}

/// A route request for `route`, whose device (if any) has index `oif`.
pub fn route(route: &DesiredRoute, oif: Option<u32>) -> RouteMessage {
    let key = &route.key;
    let mut msg = RouteMessage::default();
    msg.header.address_family = af(key.family);
    msg.header.destination_prefix_length = key.destination.prefix_len();
    msg.header.tos = key.tos;
    msg.header.table = table_byte(key.table);
    msg.header.protocol = RouteProtocol::from(route.protocol_to_set());
    msg.header.scope = RouteScope::from(route.scope_to_set());
    msg.header.kind = match route.kind {
        RouteType::Unicast => NlRouteType::Unicast,
        RouteType::Local => NlRouteType::Local,
        RouteType::Blackhole => NlRouteType::BlackHole,
        RouteType::Unreachable => NlRouteType::Unreachable,
        RouteType::Prohibit => NlRouteType::Prohibit,
        RouteType::Other(t) => NlRouteType::from(t),
    };
    if route.onlink {
        msg.header.flags |= RouteFlags::Onlink;
    }
    let a = &mut msg.attributes;
    a.push(RouteAttribute::Table(key.table));
    if key.destination.prefix_len() != 0 {
        a.push(RouteAttribute::Destination(route_address(
            key.destination.addr(),
        )));
    }
    if let Some(g) = route.gateway {
        a.push(RouteAttribute::Gateway(route_address(g)));
    }
    if let Some(i) = oif {
        a.push(RouteAttribute::Oif(i));
    }
    if let Some(s) = route.prefsrc {
        a.push(RouteAttribute::PrefSource(route_address(s)));
    }
    a.push(RouteAttribute::Priority(key.metric));
    if let Some(m) = route.mtu {
        a.push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(m)]));
    }
    msg
}

/// `ip neigh replace ADDRESS lladdr MAC dev DEVICE nud STATE`.
pub fn neighbour(n: &DesiredNeighbour, ifindex: u32) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = af(n.family());
    msg.header.ifindex = ifindex;
    msg.header.state = NeighbourState::from(n.state.bits());
    msg.header.kind = NlRouteType::Unicast;
    msg.attributes
        .push(NeighbourAttribute::Destination(n.address.into()));
    msg.attributes
        .push(NeighbourAttribute::LinkLayerAddress(n.lladdr.0.to_vec()));
    msg
}

/// `bridge fdb replace MAC dev DEVICE dst DST [vni VNI] self permanent` (`append` for a MAC
/// with several remotes: the request flags say which).
pub fn fdb(f: &DesiredFdb, ifindex: u32) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = ifindex;
    msg.header.state = NeighbourState::Permanent;
    msg.header.flags = NeighbourFlags::Own;
    msg.attributes
        .push(NeighbourAttribute::LinkLayerAddress(f.lladdr.0.to_vec()));
    msg.attributes
        .push(NeighbourAttribute::Destination(f.dst.into()));
    if let Some(v) = f.vni {
        msg.attributes.push(NeighbourAttribute::Vni(v));
    }
    msg
}

/// `ip link set DEVICE up` and/or `mtu N` (RTM_SETLINK: only what is asked changes).
pub fn set_link(ifindex: u32, up: bool, mtu: Option<u32>) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.index = ifindex;
    if up {
        msg.header.flags |= LinkFlags::Up;
        msg.header.change_mask |= LinkFlags::Up;
    }
    if let Some(m) = mtu {
        msg.attributes.push(LinkAttribute::Mtu(m));
    }
    msg
}

pub fn address(ifindex: u32, address: IpAddr, prefix_len: u8) -> AddressMessage {
    address_as(ifindex, address, &ObservedAddress::with_prefix(prefix_len))
}

/// An address with the attributes it had (see [`ObservedAddress`]): broadcast, peer, label, the
/// flags a request may set, protocol, prefix route metric, lifetimes. The scope is the kernel's
/// default for the address unless one was seen.
pub fn address_as(ifindex: u32, address: IpAddr, attrs: &ObservedAddress) -> AddressMessage {
    use rtnetlink::packet_route::address::{AddressFlags, AddressHeaderFlags, CacheInfo};
    let mut msg = AddressMessage::default();
    msg.header.index = ifindex;
    msg.header.prefix_len = attrs.prefix_len;
    msg.header.scope = if attrs.scope != 0 {
        AddressScope::from(attrs.scope)
    } else if address.is_loopback() {
        AddressScope::Host
    } else {
        AddressScope::Universe
    };
    let flags = attrs.flags & SETTABLE_FLAGS;
    msg.header.flags = AddressHeaderFlags::from_bits_retain(flags as u8);
    let peer = attrs.peer.unwrap_or(address);
    match address {
        IpAddr::V4(_) => {
            msg.header.family = AddressFamily::Inet;
            msg.attributes.push(AddressAttribute::Local(address));
            msg.attributes.push(AddressAttribute::Address(peer));
            if let Some(b) = attrs.broadcast {
                msg.attributes.push(AddressAttribute::Broadcast(b));
            }
            if let Some(l) = &attrs.label {
                msg.attributes.push(AddressAttribute::Label(l.clone()));
            }
        }
        IpAddr::V6(_) => {
            msg.header.family = AddressFamily::Inet6;
            if attrs.peer.is_some() {
                msg.attributes.push(AddressAttribute::Local(address));
            }
            msg.attributes.push(AddressAttribute::Address(peer));
        }
    }
    if flags > 0xff {
        msg.attributes
            .push(AddressAttribute::Flags(AddressFlags::from_bits_retain(
                flags,
            )));
    }
    if let Some(p) = attrs.protocol.filter(|p| *p != 0) {
        msg.attributes.push(AddressAttribute::Protocol(p.into()));
    }
    if let Some(p) = attrs.route_priority {
        msg.attributes.push(AddressAttribute::RoutePriority(p));
    }
    if attrs.valid_lft.is_some() || attrs.preferred_lft.is_some() {
        let mut lifetimes = CacheInfo::default();
        lifetimes.ifa_valid = attrs.valid_lft.unwrap_or(FOREVER);
        lifetimes.ifa_preferred = attrs.preferred_lft.unwrap_or(FOREVER);
        msg.attributes.push(AddressAttribute::CacheInfo(lifetimes));
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Mode, RouteKey};
    use crate::observe::decode;
    use rtnetlink::packet_core::{Emitable, NetlinkBuffer, Parseable};

    /// Emits the request to bytes and parses it back, as the kernel would receive it.
    fn wire(msg: NetlinkMessage<RouteNetlinkMessage>) -> RouteNetlinkMessage {
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.emit(&mut buf);
        let parsed = NetlinkMessage::<RouteNetlinkMessage>::parse(
            &NetlinkBuffer::new_checked(&buf).unwrap(),
        )
        .unwrap();
        match parsed.payload {
            NetlinkPayload::InnerMessage(m) => m,
            other => panic!("unexpected payload {other:?}"),
        }
    }

    #[test]
    fn rule_round_trips_through_the_wire() {
        let key = RuleKey::new(
            Family::Ipv4,
            100,
            Some("10.244.1.0/24".parse().unwrap()),
            Some("10.96.0.0/12".parse().unwrap()),
            Some("eth0".into()),
            None,
            Some(0x10),
            Some(0xff),
            1000,
            RuleAction::Lookup,
        );
        let msg = request(
            RouteNetlinkMessage::NewRule(rule(&key, Some(4))),
            true,
            false,
        );
        assert_eq!(msg.header.flags & NLM_F_EXCL, NLM_F_EXCL);
        let RouteNetlinkMessage::NewRule(back) = wire(msg) else {
            panic!()
        };
        assert_eq!(
            back.header.table, 0,
            "tables above 255 only in the attribute"
        );
        assert_eq!(decode::rule(&back), Some((key, Some(4))));
    }

    #[test]
    fn route_round_trips_through_the_wire() {
        let d = DesiredRoute {
            name: "r".into(),
            mode: Mode::Enforce,
            key: RouteKey::new(Family::Ipv6, 77, "fd00:1::/64".parse().unwrap(), None),
            kind: RouteType::Unicast,
            gateway: Some("fd00::1".parse().unwrap()),
            device: Some("eth0".into()),
            prefsrc: None,
            scope: None,
            protocol: None,
            onlink: true,
            mtu: Some(1400),
        };
        let msg = request(
            RouteNetlinkMessage::NewRoute(route(&d, Some(7))),
            true,
            true,
        );
        assert_eq!(msg.header.flags & NLM_F_REPLACE, NLM_F_REPLACE);
        let RouteNetlinkMessage::NewRoute(back) = wire(msg) else {
            panic!()
        };
        let (key, obs) = decode::route(&back).unwrap();
        assert_eq!(key, d.key);
        assert_eq!(key.metric, 1024);
        assert_eq!(obs.protocol, crate::model::PROTO_BOOT);
        assert!(d.matches(&obs, Some(7)));
    }

    #[test]
    fn ipv4_address_carries_local_and_address() {
        let msg = address(3, "10.0.0.1".parse().unwrap(), 24);
        let (key, obs) = decode::address(&msg).unwrap();
        assert_eq!(key.ifindex, 3);
        assert_eq!(obs.prefix_len, 24);
        assert_eq!(msg.attributes.len(), 2);
    }
}
