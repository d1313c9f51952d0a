//! What systemd-networkd's next restart, or a reconfigure of a link, does to the protected
//! objects, following systemd 252 (src/network: `link_drop_foreign_config`,
//! `link_drop_managed_config`), and the drop-ins that prevent what can be prevented. Pure.
//!
//! - **Rules**: with `ManageForeignRoutingPolicyRules=yes`, when any link it manages is
//!   (re)configured without `KeepConfiguration=yes`, networkd removes every rule whose protocol is
//!   not `kernel` and that no `[RoutingPolicyRule]` of a managed link configures.
//! - **Routes**: with `ManageForeignRoutes=yes`, the routes through a managed link (and routes
//!   without a device, such as blackholes, when any link is configured) whose protocol is not
//!   `kernel`, that no `[Route]`/`Gateway=` configures and that `KeepConfiguration=static`
//!   (protocol `static`) or `dhcp` (protocol `dhcp`) does not keep.
//! - **Addresses** of a managed link: one its .network does not configure is removed; one it does
//!   is kept only if it compares equal to the configured one (prefix, peer, and for IPv4 its
//!   label and broadcast: networkd 252 sets a default broadcast only when it adds the address, so
//!   an address it added itself compares unequal and is removed and added again).
//!   `KeepConfiguration=static` keeps addresses with an infinite lifetime, `dhcp` the others.
//!   A reconfigure first removes the addresses networkd configured, whatever the settings.
//! - **Dropped with an address**: when every IPv4 address of a link goes, the kernel drops every
//!   IPv4 route through it (no notification); when only some go, the routes whose preferred
//!   source they were.
//!
//! Loopback links and `[Link] Unmanaged=yes` links are left alone, as networkd leaves them.

use super::config::{network_for, ConfRoute, ConfRule, Keep, LinkFacts, Network, Settings};
use crate::model::ObjectId;
use crate::model::{Family, Kind, ObservedAddress, ObservedRoute, RouteKey, RuleKey, PROTO_KERNEL};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

/// What the kernel holds, as far as the prediction needs it.
#[derive(Clone, Debug, Default)]
pub struct Kernel {
    pub links: Vec<LinkFacts>,
    /// Every address: link index, address, attributes.
    pub addresses: Vec<(u32, IpAddr, ObservedAddress)>,
}

/// A protected object present in the kernel now.
#[derive(Clone, Debug)]
pub enum Present {
    Rule {
        id: ObjectId,
        name: String,
        key: RuleKey,
        protocol: Option<u8>,
    },
    Route {
        id: ObjectId,
        name: String,
        key: RouteKey,
        route: ObservedRoute,
    },
    Address {
        id: ObjectId,
        name: String,
        ifindex: u32,
        address: IpAddr,
    },
}

/// What happens to a protected object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    /// networkd deletes it (for good).
    Removed,
    /// networkd removes it and adds it again (its own address).
    Readded,
    /// The kernel drops it when an address goes.
    DroppedWithAddress,
}

impl Effect {
    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Removed => "removed",
            Effect::Readded => "readded",
            Effect::DroppedWithAddress => "dropped_with_address",
        }
    }
}

/// A protected object the event would take away.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AtRisk {
    #[serde(skip)]
    pub id: ObjectId,
    pub kind: Kind,
    pub name: String,
    pub effect: Effect,
    /// Why, in networkd's terms.
    pub why: String,
}

/// A link networkd manages, and with what.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Managed {
    pub link: String,
    pub network: String,
    #[serde(rename = "keepConfiguration")]
    pub keep: Keep,
    /// Files that come first and might apply instead (keys not evaluated).
    pub doubtful: Vec<String>,
}

/// Which event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// networkd starts or restarts (also `networkctl reload` after a .network file changed, for
    /// the links whose file changed).
    Restart,
    /// `networkctl reconfigure LINK` of every managed link.
    Reconfigure,
}

/// The links networkd manages (a matching .network, not unmanaged), by index.
pub fn managed_links(nets: &[Network], links: &[LinkFacts]) -> Vec<(LinkFacts, Network, Managed)> {
    let mut out = Vec::new();
    for l in links {
        let (net, doubtful) = network_for(nets, l);
        let Some(net) = net.filter(|n| !n.unmanaged) else {
            continue;
        };
        out.push((
            l.clone(),
            net.clone(),
            Managed {
                link: l.name.clone(),
                network: net.path.clone(),
                keep: net.keep,
                doubtful: doubtful.iter().map(|n| n.path.clone()).collect(),
            },
        ));
    }
    out
}

/// What happens to each address of a managed link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AddressFate {
    Kept,
    Removed,
    Readded,
}

fn address_fate(
    event: Event,
    link: &LinkFacts,
    net: &Network,
    address: &IpAddr,
    a: &ObservedAddress,
) -> AddressFate {
    if let IpAddr::V6(v6) = address {
        if v6.segments()[0] & 0xffc0 == 0xfe80 {
            return AddressFate::Kept; // the kernel's (or dropped elsewhere)
        }
    }
    let configured = net.addresses.iter().find(|c| {
        c.address == *address
            && (Family::of(address) == Family::Ipv6 || c.prefix_len == a.prefix_len)
    });
    if event == Event::Reconfigure && configured.is_some() {
        // link_drop_managed_config: networkd's own addresses go first, whatever the settings.
        return AddressFate::Readded;
    }
    if net.keep == Keep::Yes {
        return AddressFate::Kept;
    }
    let dynamic = a.preferred_lft.is_some();
    if matches!(net.keep, Keep::Dhcp | Keep::Static) && dynamic == (net.keep == Keep::Dhcp) {
        return AddressFate::Kept;
    }
    match configured {
        None => AddressFate::Removed,
        Some(c) => {
            let label = a.label.clone().filter(|l| *l != link.name);
            let equal = c.prefix_len == a.prefix_len
                && c.peer == a.peer
                && (Family::of(address) == Family::Ipv6
                    || (c.label == label && c.compared_broadcast() == a.broadcast));
            if equal {
                AddressFate::Kept
            } else {
                AddressFate::Readded
            }
        }
    }
}

fn rule_configured(c: &ConfRule, key: &RuleKey) -> bool {
    c.priority.is_none_or(|p| p == key.priority)
        && c.from == key.from
        && c.to == key.to
        && c.table.unwrap_or(crate::model::TABLE_MAIN) == key.table
        && c.fwmark == key.fwmark.map(|(m, _)| m)
        && c.iif == key.iif
        && c.oif == key.oif
}

fn route_configured(c: &ConfRoute, key: &RouteKey, r: &ObservedRoute) -> bool {
    let dst = c.destination.unwrap_or_else(|| key.family.any());
    dst == key.destination
        && c.table.unwrap_or(crate::model::TABLE_MAIN) == key.table
        && c.metric.unwrap_or(0) == key.metric
        && c.gateway == r.gateway
}

/// The protected objects `event` would take away.
pub fn predict(
    event: Event,
    settings: &Settings,
    nets: &[Network],
    kernel: &Kernel,
    present: &[Present],
) -> Vec<AtRisk> {
    let managed = managed_links(nets, &kernel.links);
    let scene = Scene::new(event, settings, kernel, &managed);
    let mut out: Vec<AtRisk> = present
        .iter()
        .filter_map(|p| {
            let (id, kind, name, fate) = match p {
                Present::Rule {
                    id,
                    name,
                    key,
                    protocol,
                } => (id, Kind::Rule, name, scene.rule_effect(key, *protocol)),
                Present::Route {
                    id,
                    name,
                    key,
                    route,
                } => (id, Kind::Route, name, scene.route_effect(key, route)),
                Present::Address {
                    id,
                    name,
                    ifindex,
                    address,
                } => (
                    id,
                    Kind::Address,
                    name,
                    scene.address_effect(*ifindex, address),
                ),
            };
            let (effect, why) = fate?;
            Some(AtRisk {
                id: id.clone(),
                kind,
                name: name.clone(),
                effect,
                why,
            })
        })
        .collect();
    out.sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
    out
}

/// What the event does to the node as a whole: the managed links, whether their
/// (re)configuration drops foreign configuration, and the fate of each address.
struct Scene<'a> {
    event: Event,
    settings: &'a Settings,
    kernel: &'a Kernel,
    by_index: HashMap<u32, (&'a LinkFacts, &'a Network)>,
    /// The .network files of the managed links (what networkd configures).
    configuring: Vec<&'a Network>,
    /// Whether any managed link drops foreign configuration.
    any_drops: bool,
    fates: HashMap<(u32, IpAddr), AddressFate>,
    /// Per link: how many IPv4 addresses it has, and those that go.
    v4: BTreeMap<u32, (usize, Vec<IpAddr>)>,
}

impl<'a> Scene<'a> {
    fn new(
        event: Event,
        settings: &'a Settings,
        kernel: &'a Kernel,
        managed: &'a [(LinkFacts, Network, Managed)],
    ) -> Self {
        let mut scene = Scene {
            event,
            settings,
            kernel,
            by_index: managed.iter().map(|(l, n, _)| (l.index, (l, n))).collect(),
            configuring: managed.iter().map(|(_, n, _)| n).collect(),
            any_drops: false,
            fates: HashMap::new(),
            v4: BTreeMap::new(),
        };
        scene.any_drops = managed.iter().any(|(l, _, _)| scene.drops(l.index));
        scene.fates = scene.address_fates();
        scene.v4 = scene.ipv4_going();
        scene
    }

    /// Whether the link's (re)configuration drops foreign configuration.
    fn drops(&self, index: u32) -> bool {
        self.by_index
            .get(&index)
            .is_some_and(|(l, n)| !l.loopback && n.keep != Keep::Yes)
    }

    /// The fate of every address of a managed link (loopback excepted).
    fn address_fates(&self) -> HashMap<(u32, IpAddr), AddressFate> {
        let mut fates = HashMap::new();
        for (index, address, a) in &self.kernel.addresses {
            let Some((l, n)) = self.by_index.get(index) else {
                continue;
            };
            if l.loopback {
                continue;
            }
            let fate = if self.event == Event::Restart && !self.drops(*index) {
                AddressFate::Kept
            } else {
                address_fate(self.event, l, n, address, a)
            };
            fates.insert((*index, *address), fate);
        }
        fates
    }

    /// Per link: its IPv4 addresses counted, and those that go.
    fn ipv4_going(&self) -> BTreeMap<u32, (usize, Vec<IpAddr>)> {
        let mut v4: BTreeMap<u32, (usize, Vec<IpAddr>)> = BTreeMap::new();
        for (index, address, _) in &self.kernel.addresses {
            if Family::of(address) != Family::Ipv4 {
                continue;
            }
            let e = v4.entry(*index).or_default();
            e.0 += 1;
            if matches!(
                self.fates.get(&(*index, *address)),
                Some(AddressFate::Removed | AddressFate::Readded)
            ) {
                e.1.push(*address);
            }
        }
        v4
    }

    fn name_of(&self, index: u32) -> String {
        self.kernel
            .links
            .iter()
            .find(|l| l.index == index)
            .map(|l| l.name.clone())
            .unwrap_or_else(|| format!("#{index}"))
    }

    fn rule_effect(&self, key: &RuleKey, protocol: Option<u8>) -> Option<(Effect, String)> {
        if !self.settings.manage_foreign_rules || !self.any_drops || protocol == Some(PROTO_KERNEL)
        {
            return None;
        }
        let configured = self
            .configuring
            .iter()
            .any(|n| n.rules.iter().any(|c| rule_configured(c, key)));
        (!configured).then(|| {
            (
                Effect::Removed,
                "a foreign rule: ManageForeignRoutingPolicyRules=yes".into(),
            )
        })
    }

    fn route_effect(&self, key: &RouteKey, route: &ObservedRoute) -> Option<(Effect, String)> {
        if self.foreign_route_removed(key, route) {
            let on = route
                .oif
                .map(|i| format!(" on {}", self.name_of(i)))
                .unwrap_or_default();
            return Some((
                Effect::Removed,
                format!("a foreign route{on}: ManageForeignRoutes=yes"),
            ));
        }
        self.route_dropped_with_address(key, route)
    }

    /// networkd removes the route as foreign configuration.
    fn foreign_route_removed(&self, key: &RouteKey, route: &ObservedRoute) -> bool {
        let foreign = self.settings.manage_foreign_routes
            && route.protocol != PROTO_KERNEL
            && !self
                .configuring
                .iter()
                .any(|n| n.routes.iter().any(|c| route_configured(c, key, route)));
        match route.oif {
            Some(oif) => {
                foreign
                    && self.drops(oif)
                    && !self.by_index[&oif]
                        .1
                        .keep
                        .keeps_route_protocol(route.protocol)
            }
            None => foreign && self.any_drops,
        }
    }

    /// The kernel drops an IPv4 route when the last IPv4 address of its link goes, or its
    /// preferred source.
    fn route_dropped_with_address(
        &self,
        key: &RouteKey,
        route: &ObservedRoute,
    ) -> Option<(Effect, String)> {
        let oif = route.oif?;
        if key.family != Family::Ipv4 {
            return None;
        }
        let (count, gone) = self.v4.get(&oif)?;
        let last = !gone.is_empty() && gone.len() == *count;
        let source = route.prefsrc.filter(|s| gone.contains(s));
        if !last && source.is_none() {
            return None;
        }
        let what = match source {
            Some(s) if !last => format!("its preferred source {s}"),
            _ => format!("the last IPv4 address of {}", self.name_of(oif)),
        };
        Some((
            Effect::DroppedWithAddress,
            format!(
                "the kernel drops it when networkd removes {what} ({})",
                gone_list(gone)
            ),
        ))
    }

    fn address_effect(&self, ifindex: u32, address: &IpAddr) -> Option<(Effect, String)> {
        let network = || network_of(&self.by_index, ifindex);
        match self.fates.get(&(ifindex, *address))? {
            AddressFate::Removed => Some((
                Effect::Removed,
                format!("{} does not configure it", network()),
            )),
            AddressFate::Readded if self.event == Event::Reconfigure => Some((
                Effect::Readded,
                "networkd removes the addresses it configured and adds them again".to_string(),
            )),
            AddressFate::Readded => Some((
                Effect::Readded,
                format!(
                    "it differs from the one {} configures (networkd 252 compares the broadcast and label it would set) and is removed and added again",
                    network()
                ),
            )),
            AddressFate::Kept => None,
        }
    }
}

fn gone_list(gone: &[IpAddr]) -> String {
    gone.iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn network_of(by_index: &HashMap<u32, (&LinkFacts, &Network)>, index: u32) -> String {
    by_index
        .get(&index)
        .map(|(_, n)| n.path.rsplit('/').next().unwrap_or_default().to_string())
        .unwrap_or_default()
}

/// A file that would prevent what a restart takes away.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DropIn {
    /// Where it goes (absolute, on the node).
    pub path: String,
    pub text: String,
}

/// The drop-in file name netwarden suggests (after the usual vendor ones).
pub const DROPIN_NAME: &str = "60-netwarden.conf";

/// The drop-ins that prevent what `at_risk` (a restart's prediction) lists: networkd.conf
/// settings for foreign rules and routes, `KeepConfiguration=` for the links whose addresses go.
pub fn dropins(
    at_risk: &[AtRisk],
    nets: &[Network],
    kernel: &Kernel,
    present: &[Present],
) -> Vec<DropIn> {
    let mut out = Vec::new();
    let rules = at_risk
        .iter()
        .any(|a| a.kind == Kind::Rule && a.effect == Effect::Removed);
    let routes = at_risk
        .iter()
        .any(|a| a.kind == Kind::Route && a.effect == Effect::Removed);
    if rules || routes {
        let mut text = String::from("# Written by `netwarden networkd`: networkd leaves the rules and routes it did not\n# configure alone (read when networkd starts).\n[Network]\n");
        if rules {
            text.push_str("ManageForeignRoutingPolicyRules=no\n");
        }
        if routes {
            text.push_str("ManageForeignRoutes=no\n");
        }
        out.push(DropIn {
            path: format!("/etc/systemd/networkd.conf.d/{DROPIN_NAME}"),
            text,
        });
    }
    // Links whose addresses go (a protected address, or routes dropped with them).
    let managed = managed_links(nets, &kernel.links);
    let mut links: Vec<u32> = Vec::new();
    for a in at_risk {
        let index = present.iter().find_map(|p| match p {
            Present::Address { id, ifindex, .. } if *id == a.id => Some(*ifindex),
            Present::Route { id, route, .. }
                if *id == a.id && a.effect == Effect::DroppedWithAddress =>
            {
                route.oif
            }
            _ => None,
        });
        if let Some(i) = index.filter(|i| !links.contains(i)) {
            links.push(i);
        }
    }
    for index in links {
        let Some((link, net, _)) = managed.iter().find(|(l, _, _)| l.index == index) else {
            continue;
        };
        let (mut finite, mut infinite) = (false, false);
        for (_, _, a) in kernel.addresses.iter().filter(|(i, _, _)| *i == index) {
            if a.preferred_lft.is_some() {
                finite = true;
            } else {
                infinite = true;
            }
        }
        let keep = match (infinite, finite) {
            (true, true) => Keep::Yes,
            (false, true) => Keep::Dhcp,
            _ => Keep::Static,
        };
        let file = net.path.rsplit('/').next().unwrap_or_default();
        out.push(DropIn {
            path: format!("/etc/systemd/network/{file}.d/{DROPIN_NAME}"),
            text: format!(
                "# Written by `netwarden networkd`: networkd keeps {}'s addresses when it starts, so the\n# routes through it are not dropped with them (read when networkd starts or reloads).\n[Network]\nKeepConfiguration={}\n",
                link.name,
                keep.as_str()
            ),
        });
    }
    out
}

/// The settings and files as they would be with `dropins` in place (to predict again).
pub fn with_dropins(
    settings: &Settings,
    nets: &[Network],
    dropins: &[DropIn],
) -> (Settings, Vec<Network>) {
    let mut s = settings.clone();
    let mut n = nets.to_vec();
    for d in dropins {
        for line in d.text.lines() {
            match line {
                "ManageForeignRoutingPolicyRules=no" => s.manage_foreign_rules = false,
                "ManageForeignRoutes=no" => s.manage_foreign_routes = false,
                l => {
                    let Some(keep) = l.strip_prefix("KeepConfiguration=").and_then(Keep::parse)
                    else {
                        continue;
                    };
                    let file = d
                        .path
                        .strip_prefix("/etc/systemd/network/")
                        .and_then(|p| p.split_once(".d/"))
                        .map(|(f, _)| f);
                    for net in n.iter_mut() {
                        if Some(net.path.rsplit('/').next().unwrap_or_default()) == file {
                            net.keep = keep;
                        }
                    }
                }
            }
        }
    }
    (s, n)
}

#[cfg(test)]
#[path = "predict_tests.rs"]
mod tests;
