//! The kernel mirror: observed state kept current from dumps and multicast events. Pure: it is fed
//! decoded messages and says what each one changed; the I/O lives in `observe::kernel`.

mod node;

use super::decode::{self, LinkInfo};
use crate::model::fast::{HashMap, HashSet};
use crate::model::neighbour::{ObservedFdb, ObservedNeighbour};
use crate::model::route::ObservedRoute;
use crate::model::sysctl::Setting;
use crate::model::{
    AddressKey, Family, FdbId, Mac, NeighbourId, ObservedAddress, RouteKey, RuleKey,
};
use std::net::IpAddr;

pub use node::NeighbourInterest;
use rtnetlink::packet_route::RouteNetlinkMessage;
use std::collections::BTreeSet;

/// Most tables read one by one (a table-filtered dump each); an interest spanning more tables is
/// read with one dump of every route.
pub const MAX_DUMP_TABLES: usize = 16;

/// Which routes the mirror keeps. A node can hold far more routes than netwarden protects (a BGP
/// full table); keeping only the protected identities bounds memory by the config, not the host.
#[derive(Clone, Debug, Default)]
pub enum RouteInterest {
    #[default]
    All,
    Keys(HashSet<RouteKey>),
    /// These identities, and every route in these (inclusive) table ranges: the tables of
    /// adopt selectors (`spec.adopt[].routes`), whose routes are not known ahead of time.
    KeysAndTables(HashSet<RouteKey>, Vec<(u32, u32)>),
}

impl RouteInterest {
    /// The tables that hold every route of interest, when there are few enough to dump them one
    /// by one (sorted); `None`: read every route. With a big foreign table beside, a re-dump then
    /// costs what is protected, not what the host carries.
    pub fn tables(&self) -> Option<Vec<u32>> {
        let (keys, ranges) = match self {
            RouteInterest::All => return None,
            RouteInterest::Keys(keys) => (keys, &[][..]),
            RouteInterest::KeysAndTables(keys, ranges) => (keys, &ranges[..]),
        };
        let mut tables: BTreeSet<u32> = keys.iter().map(|k| k.table).collect();
        for (lo, hi) in ranges {
            if hi.saturating_sub(*lo) >= MAX_DUMP_TABLES as u32 {
                return None;
            }
            tables.extend(*lo..=*hi);
        }
        (tables.len() <= MAX_DUMP_TABLES).then(|| tables.into_iter().collect())
    }

    fn wants(&self, key: &RouteKey) -> bool {
        match self {
            RouteInterest::All => true,
            RouteInterest::Keys(keys) => keys.contains(key),
            RouteInterest::KeysAndTables(keys, tables) => {
                keys.contains(key)
                    || tables
                        .iter()
                        .any(|(lo, hi)| *lo <= key.table && key.table <= *hi)
            }
        }
    }
}

/// What one message changed, for the reconcile loop to decide what to re-plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Nothing,
    Rule {
        key: RuleKey,
        removed: bool,
    },
    Route {
        key: RouteKey,
        removed: bool,
    },
    Address {
        key: AddressKey,
        removed: bool,
    },
    /// A rule the mirror already holds was added again (a notification, not a dump): the kernel
    /// may now hold it twice. Only a dump can tell.
    RuleAddedAgain {
        key: RuleKey,
    },
    /// A link appeared, went up, or was renamed: pending objects may now be applicable.
    LinkReady {
        index: u32,
    },
    /// A link went down or away: the kernel drops its routes without RTM_DELROUTE.
    LinkLost {
        index: u32,
    },
    /// Some other link attribute changed (its MTU, say).
    LinkOther {
        index: u32,
    },
    /// A protected neighbour entry was added, changed or removed.
    Neighbour {
        id: NeighbourId,
        removed: bool,
    },
    /// A remote of a protected FDB entry was added, changed or removed.
    Fdb {
        id: FdbId,
        removed: bool,
    },
    /// Settings of a device (or `all`/`default`) changed: a netconf notification or a read.
    Sysctl {
        family: Family,
        ifindex: i32,
    },
    /// A route the mirror does not keep was added: a gateway may be reachable through it now
    /// (systemd-networkd adds its address with `noprefixroute`, then the prefix route).
    RouteAppeared,
}

#[derive(Clone, Debug, Default)]
pub struct Mirror {
    links: HashMap<u32, LinkInfo>,
    link_by_name: HashMap<String, u32>,
    /// Protocol of each kernel rule with that identity (`None` = unspec). Usually one; a rule added
    /// without NLM_F_EXCL can exist twice, and a dump counts every copy (see `ingest_dumped`).
    pub rules: HashMap<RuleKey, Vec<Option<u8>>>,
    /// Usually one per key; `ip route append` can make several IPv4 aliases with one identity.
    pub routes: HashMap<RouteKey, Vec<ObservedRoute>>,
    pub addresses: HashMap<AddressKey, ObservedAddress>,
    /// Protected neighbour entries only (a node's neighbour table can be large).
    neighbours: HashMap<(u32, IpAddr), ObservedNeighbour>,
    /// Remotes of protected FDB entries, by device index, MAC and (for MACs with several
    /// remotes) remote.
    fdb: HashMap<(u32, Mac, Option<IpAddr>), Vec<ObservedFdb>>,
    /// Settings by family, device index (or IFINDEX_ALL / IFINDEX_DEFAULT) and setting.
    sysctls: HashMap<(Family, i32, Setting), u32>,
    neighbour_interest: NeighbourInterest,
    /// The attributes addresses had when they were last removed (until they come back): a repair
    /// puts an address back exactly as it was. Kept across dumps.
    departed: HashMap<AddressKey, ObservedAddress>,
    interest: RouteInterest,
    /// `interest.tables()`, computed once: asked for on every turn of the reconcile loop.
    tables: Option<Vec<u32>>,
}

impl Mirror {
    pub fn new(interest: RouteInterest) -> Mirror {
        Mirror {
            tables: interest.tables(),
            interest,
            ..Mirror::default()
        }
    }

    pub fn set_interest(&mut self, interest: RouteInterest) {
        self.tables = interest.tables();
        self.interest = interest;
    }

    /// The tables holding every route the mirror keeps, when few (see [`RouteInterest::tables`]).
    pub fn route_tables(&self) -> Option<&[u32]> {
        self.tables.as_deref()
    }

    pub fn link_index(&self, name: &str) -> Option<u32> {
        self.link_by_name.get(name).copied()
    }

    pub fn link(&self, index: u32) -> Option<&LinkInfo> {
        self.links.get(&index)
    }

    pub fn links(&self) -> impl Iterator<Item = &LinkInfo> {
        self.links.values()
    }

    /// The attributes of an address that is gone, as it was when it went (see `departed`).
    pub fn departed_address(&self, key: &AddressKey) -> Option<&ObservedAddress> {
        self.departed.get(key)
    }

    /// Number of objects held, a bound on memory.
    pub fn len(&self) -> usize {
        self.links.len()
            + self.rules.len()
            + self.routes.len()
            + self.addresses.len()
            + self.neighbours.len()
            + self.fdb.len()
            + self.sysctls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Folds in one message of a dump. A dump lists every copy of a rule, so each is counted
    /// (the mirror was cleared before it); everything else as [`Mirror::ingest`].
    pub fn ingest_dumped(&mut self, msg: &RouteNetlinkMessage) {
        if let RouteNetlinkMessage::NewRule(m) = msg {
            if let Some((key, proto)) = decode::rule(m) {
                self.rules.entry(key).or_default().push(proto);
            }
            return;
        }
        self.ingest(msg);
    }

    /// Forgets every rule before a rule dump is fed in.
    pub fn clear_rules(&mut self) {
        self.rules.clear();
    }

    pub fn clear(&mut self) {
        self.links.clear();
        self.link_by_name.clear();
        self.rules.clear();
        self.routes.clear();
        self.addresses.clear();
        self.neighbours.clear();
        self.fdb.clear();
        self.sysctls.clear();
    }

    /// Forgets the routes of `family` (all when `None`) before a route re-dump is fed in.
    pub fn clear_routes(&mut self, family: Option<Family>) {
        match family {
            None => self.routes.clear(),
            Some(f) => self.routes.retain(|k, _| k.family != f),
        }
    }

    /// Forgets the routes of `family` (all when `None`) in one table before its re-dump is fed in.
    pub fn clear_table(&mut self, family: Option<Family>, table: u32) {
        self.routes
            .retain(|k, _| k.table != table || family.is_some_and(|f| k.family != f));
    }

    /// Feeds one message (from a dump or an event) and says what it changed.
    pub fn ingest(&mut self, msg: &RouteNetlinkMessage) -> Change {
        use RouteNetlinkMessage as M;
        match msg {
            M::NewRule(m) | M::DelRule(m) => match decode::rule(m) {
                Some((key, proto)) => self.ingest_rule(key, proto, matches!(msg, M::DelRule(_))),
                None => Change::Nothing,
            },
            M::NewRoute(m) | M::DelRoute(m) => match decode::route(m) {
                Some((key, route)) => self.ingest_route(key, route, matches!(msg, M::DelRoute(_))),
                None => Change::Nothing,
            },
            M::NewAddress(m) | M::DelAddress(m) => match decode::address(m) {
                Some((key, addr)) => {
                    self.ingest_address(key, addr, matches!(msg, M::DelAddress(_)))
                }
                None => Change::Nothing,
            },
            M::NewLink(m) => self.new_link(decode::link(m)),
            M::SetLink(m) => self.set_link(m),
            M::DelLink(m) => self.del_link(m.header.index),
            M::NewNeighbour(m) | M::DelNeighbour(m) => {
                self.ingest_neighbour(m, matches!(msg, M::DelNeighbour(_)))
            }
            _ => Change::Nothing,
        }
    }

    /// One copy of a rule added or removed.
    fn ingest_rule(&mut self, key: RuleKey, proto: Option<u8>, removed: bool) -> Change {
        if removed {
            if let Some(list) = self.rules.get_mut(&key) {
                let at = list.iter().position(|p| *p == proto).unwrap_or(0);
                list.remove(at);
                if list.is_empty() {
                    self.rules.remove(&key);
                }
            }
        } else {
            let list = self.rules.entry(key.clone()).or_default();
            // A notification read after a dump can repeat a rule the dump already showed,
            // so it is not counted twice here; the caller re-dumps the rules to count.
            if list.contains(&proto) {
                return Change::RuleAddedAgain { key };
            }
            list.push(proto);
        }
        Change::Rule { key, removed }
    }

    /// A route added, replaced or removed; one outside the interest is only noticed.
    fn ingest_route(&mut self, key: RouteKey, route: ObservedRoute, removed: bool) -> Change {
        if !self.interest.wants(&key) {
            return if removed {
                Change::Nothing
            } else {
                Change::RouteAppeared
            };
        }
        if removed {
            if let Some(list) = self.routes.get_mut(&key) {
                match list.iter().position(|r| *r == route) {
                    Some(at) => {
                        list.remove(at);
                    }
                    // A delete names the identity; attributes in it may be partial.
                    None => list.clear(),
                }
                if list.is_empty() {
                    self.routes.remove(&key);
                }
            }
        } else {
            let list = self.routes.entry(key.clone()).or_default();
            // NEWROUTE for an existing identity is a replace unless it was an append; we
            // cannot tell from the notification, so keep the latest attributes only.
            list.clear();
            list.push(route);
        }
        Change::Route { key, removed }
    }

    /// An address added or removed (what it was is kept among the departed).
    fn ingest_address(&mut self, key: AddressKey, addr: ObservedAddress, removed: bool) -> Change {
        if removed {
            let known = self.addresses.remove(&key);
            if self.departed.len() >= MAX_DEPARTED {
                self.departed.clear();
            }
            self.departed
                .insert(key.clone(), merge_departed(known, addr));
        } else {
            self.departed.remove(&key);
            self.addresses.insert(key.clone(), addr);
        }
        Change::Address { key, removed }
    }

    /// A link appeared or changed: ready when it is new, renamed or came up.
    fn new_link(&mut self, info: LinkInfo) -> Change {
        let index = info.index;
        let previous = self.links.insert(index, info.clone());
        if let Some(prev) = &previous {
            if prev.name != info.name {
                self.link_by_name.remove(&prev.name);
            }
        }
        self.link_by_name.insert(info.name.clone(), index);
        match previous {
            None => Change::LinkReady { index },
            Some(prev) if prev.name != info.name => Change::LinkReady { index },
            Some(prev) if !prev.up && info.up => Change::LinkReady { index },
            Some(prev) if prev.up && !info.up => Change::LinkLost { index },
            Some(_) => Change::LinkOther { index },
        }
    }

    /// A link went, with its addresses and whatever was kept by device.
    fn del_link(&mut self, index: u32) -> Change {
        if let Some(prev) = self.links.remove(&index) {
            self.link_by_name.remove(&prev.name);
        }
        self.addresses.retain(|k, _| k.ifindex != index);
        self.forget_device(index);
        self.departed.retain(|k, _| k.ifindex != index);
        Change::LinkLost { index }
    }
}

/// Addresses whose last attributes are kept after they went (a host with churning temporary
/// IPv6 addresses must not grow the mirror without end).
const MAX_DEPARTED: usize = 4096;

/// What to remember of a removed address: what the mirror last knew of it (a notification or a
/// dump: complete), with the lifetimes the deletion reported (they run down as time passes). The
/// deletion alone when the mirror did not know it.
fn merge_departed(known: Option<ObservedAddress>, deleted: ObservedAddress) -> ObservedAddress {
    match known {
        None => deleted,
        Some(known) => ObservedAddress {
            valid_lft: deleted.valid_lft.or(known.valid_lft),
            preferred_lft: deleted.preferred_lft.or(known.preferred_lft),
            ..known
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::encode;
    use crate::model::{RouteType, RuleAction};
    use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};

    /// A protected blackhole route: the shape the route tests need, encoded with `encode::route`.
    fn blackhole(table: u32, dst: &str) -> crate::model::DesiredRoute {
        crate::model::DesiredRoute {
            name: "r".into(),
            mode: crate::model::Mode::Enforce,
            key: RouteKey::new(Family::Ipv4, table, dst.parse().unwrap(), None),
            kind: RouteType::Blackhole,
            gateway: None,
            device: None,
            prefsrc: None,
            scope: None,
            protocol: None,
            onlink: false,
            mtu: None,
        }
    }

    fn link(index: u32, name: &str, up: bool) -> LinkMessage {
        let mut m = LinkMessage::default();
        m.header.index = index;
        if up {
            m.header.flags |= LinkFlags::Up;
        }
        m.attributes.push(LinkAttribute::IfName(name.into()));
        m
    }

    fn rule_key() -> RuleKey {
        RuleKey::new(
            Family::Ipv4,
            100,
            Some("10.244.0.0/24".parse().unwrap()),
            None,
            None,
            None,
            None,
            None,
            77,
            RuleAction::Lookup,
        )
    }

    #[test]
    fn dumps_count_every_copy_of_a_rule_and_notifications_flag_a_repeat() {
        let mut m = Mirror::default();
        let msg = RouteNetlinkMessage::NewRule(encode::rule(&rule_key(), None));
        m.ingest_dumped(&msg);
        m.ingest_dumped(&msg);
        assert_eq!(m.rules[&rule_key()], vec![None, None]);
        m.clear_rules();
        assert!(m.rules.is_empty());
        assert_eq!(
            m.ingest(&msg),
            Change::Rule {
                key: rule_key(),
                removed: false
            }
        );
        // A notification of a rule already held: maybe a second copy, maybe the dump's echo.
        assert_eq!(m.ingest(&msg), Change::RuleAddedAgain { key: rule_key() });
        assert_eq!(m.rules[&rule_key()], vec![None]);
    }

    #[test]
    fn rules_come_and_go() {
        let mut m = Mirror::default();
        let msg = encode::rule(&rule_key(), None);
        let c = m.ingest(&RouteNetlinkMessage::NewRule(msg.clone()));
        assert_eq!(
            c,
            Change::Rule {
                key: rule_key(),
                removed: false
            }
        );
        assert_eq!(m.rules[&rule_key()], vec![None]);
        m.ingest(&RouteNetlinkMessage::DelRule(msg));
        assert!(m.rules.is_empty());
    }

    #[test]
    fn links_report_readiness_and_loss() {
        let mut m = Mirror::default();
        use RouteNetlinkMessage as M;
        assert_eq!(
            m.ingest(&M::NewLink(link(5, "eth0", false))),
            Change::LinkReady { index: 5 }
        );
        assert_eq!(m.link_index("eth0"), Some(5));
        assert_eq!(
            m.ingest(&M::NewLink(link(5, "eth0", true))),
            Change::LinkReady { index: 5 }
        );
        assert_eq!(
            m.ingest(&M::NewLink(link(5, "eth0", true))),
            Change::LinkOther { index: 5 }
        );
        assert_eq!(
            m.ingest(&M::NewLink(link(5, "eth0", false))),
            Change::LinkLost { index: 5 }
        );
        assert_eq!(
            m.ingest(&M::NewLink(link(5, "wan0", false))),
            Change::LinkReady { index: 5 }
        );
        assert_eq!(m.link_index("eth0"), None);
        assert_eq!(
            m.ingest(&M::DelLink(link(5, "wan0", false))),
            Change::LinkLost { index: 5 }
        );
        assert_eq!(m.link_index("wan0"), None);
    }

    #[test]
    fn routes_of_adopted_tables_are_kept() {
        let protected = blackhole(100, "10.1.0.0/16");
        let mut m = Mirror::new(RouteInterest::KeysAndTables(
            HashSet::from_iter([protected.key.clone()]),
            vec![(150, 160)],
        ));
        for (r, kept) in [
            (&protected, true),
            (&blackhole(150, "10.2.0.0/16"), true),
            (&blackhole(160, "10.3.0.0/16"), true),
            (&blackhole(161, "10.4.0.0/16"), false),
            (&blackhole(100, "10.5.0.0/16"), false),
        ] {
            let c = m.ingest(&RouteNetlinkMessage::NewRoute(encode::route(r, None)));
            let want = if kept {
                Change::Route {
                    key: r.key.clone(),
                    removed: false,
                }
            } else {
                Change::RouteAppeared
            };
            assert_eq!(c, want, "{:?}", r.key);
            assert_eq!(m.routes.contains_key(&r.key), kept);
        }
    }

    #[test]
    fn the_tables_to_dump_are_those_of_the_interest_when_few() {
        let key = |table| RouteKey::new(Family::Ipv4, table, "10.1.0.0/16".parse().unwrap(), None);
        assert_eq!(RouteInterest::All.tables(), None);
        let keys: HashSet<RouteKey> = HashSet::from_iter([key(100), key(254), key(100)]);
        assert_eq!(
            RouteInterest::Keys(keys.clone()).tables(),
            Some(vec![100, 254])
        );
        assert_eq!(
            RouteInterest::Keys(HashSet::default()).tables(),
            Some(vec![])
        );
        assert_eq!(
            RouteInterest::KeysAndTables(keys.clone(), vec![(150, 152), (1000, 1000)]).tables(),
            Some(vec![100, 150, 151, 152, 254, 1000])
        );
        // A wide adopt range (or none: every table) is read with one full dump.
        assert_eq!(
            RouteInterest::KeysAndTables(keys.clone(), vec![(0, u32::MAX)]).tables(),
            None
        );
        let many: Vec<(u32, u32)> = (0..20).map(|t| (t, t)).collect();
        assert_eq!(RouteInterest::KeysAndTables(keys, many).tables(), None);
    }

    #[test]
    fn clearing_a_table_keeps_the_others() {
        let mut m = Mirror::default();
        for r in [blackhole(100, "10.1.0.0/16"), blackhole(101, "10.1.0.0/16")] {
            m.ingest(&RouteNetlinkMessage::NewRoute(encode::route(&r, None)));
        }
        m.clear_table(Some(Family::Ipv6), 100);
        assert_eq!(m.routes.len(), 2);
        m.clear_table(None, 100);
        assert_eq!(m.routes.keys().map(|k| k.table).collect::<Vec<_>>(), [101]);
    }

    #[test]
    fn routes_outside_the_interest_are_not_kept() {
        let protected = blackhole(100, "10.1.0.0/16");
        let foreign = blackhole(100, "10.2.0.0/16");
        let mut m = Mirror::new(RouteInterest::Keys(HashSet::from_iter([protected
            .key
            .clone()])));
        let c = m.ingest(&RouteNetlinkMessage::NewRoute(encode::route(
            &foreign, None,
        )));
        assert_eq!(c, Change::RouteAppeared);
        let c = m.ingest(&RouteNetlinkMessage::DelRoute(encode::route(
            &foreign, None,
        )));
        assert_eq!(c, Change::Nothing);
        let c = m.ingest(&RouteNetlinkMessage::NewRoute(encode::route(
            &protected, None,
        )));
        assert_eq!(
            c,
            Change::Route {
                key: protected.key.clone(),
                removed: false
            }
        );
        assert_eq!(m.routes.len(), 1);
    }
}
