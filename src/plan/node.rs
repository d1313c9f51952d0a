//! The plan of neighbour and FDB entries, links and sysctls. Pure, like the rest of the plan:
//! only protected objects ever appear, and nothing is deleted.

use super::{record, Dirty, Finding, ObjectId, Op, Plan};
use crate::desired::DesiredState;
use crate::model::link::{DesiredLink, ObservedLink};
use crate::model::sysctl::Scope;
use crate::model::{DesiredFdb, DesiredNeighbour, DesiredSysctl};
use crate::observe::mirror::Mirror;

pub(super) fn plan_all(desired: &DesiredState, observed: &Mirror, plan: &mut Plan) {
    for n in desired.neighbours.values() {
        plan_neighbour(n, observed, plan);
    }
    for f in desired.fdb.values() {
        plan_fdb(f, observed, plan);
    }
    for l in desired.links.values() {
        plan_link(l, observed, plan);
    }
    for s in desired.sysctls.values() {
        plan_sysctl(s, observed, plan);
    }
}

pub(super) fn plan_dirty(
    desired: &DesiredState,
    observed: &Mirror,
    dirty: &Dirty,
    plan: &mut Plan,
) {
    for k in &dirty.neighbours {
        if let Some(n) = desired.neighbours.get(k) {
            plan_neighbour(n, observed, plan);
        }
    }
    for k in &dirty.fdb {
        if let Some(f) = desired.fdb.get(k) {
            plan_fdb(f, observed, plan);
        }
    }
    for k in &dirty.links {
        if let Some(l) = desired.links.get(k) {
            plan_link(l, observed, plan);
        }
    }
    for k in &dirty.sysctls {
        if let Some(s) = desired.sysctls.get(k) {
            plan_sysctl(s, observed, plan);
        }
    }
}

/// The index of a device, or the object is recorded as pending.
fn device_or_pending(
    plan: &mut Plan,
    id: &ObjectId,
    device: &str,
    (name, object, mode): (&str, String, crate::model::Mode),
    observed: &Mirror,
) -> Option<u32> {
    let index = observed.link_index(device);
    if index.is_none() {
        let reason = format!("device {device} does not exist");
        record(
            plan,
            id.clone(),
            name,
            object,
            mode,
            Finding::Pending { reason },
            vec![],
        );
    }
    index
}

fn plan_neighbour(n: &DesiredNeighbour, observed: &Mirror, plan: &mut Plan) {
    let id = ObjectId::Neighbour(n.id());
    let what = (n.name.as_str(), n.describe(), n.mode);
    let Some(ifindex) = device_or_pending(plan, &id, &n.device, what, observed) else {
        return;
    };
    let finding = match observed.neighbour(ifindex, n.address) {
        Some(o) if n.matches(o) => return,
        Some(o) => Finding::Different {
            observed: o.describe(),
        },
        None => Finding::Missing,
    };
    let ops = vec![Op::PutNeighbour {
        neighbour: n.clone(),
        ifindex,
    }];
    record(plan, id, &n.name, n.describe(), n.mode, finding, ops);
}

fn plan_fdb(f: &DesiredFdb, observed: &Mirror, plan: &mut Plan) {
    let id = ObjectId::Fdb(f.id());
    let what = (f.name.as_str(), f.describe(), f.mode);
    let Some(ifindex) = device_or_pending(plan, &id, &f.device, what, observed) else {
        return;
    };
    let vni = observed.link(ifindex).and_then(|l| l.vxlan_id);
    let remotes = observed.fdb(ifindex, &f.id());
    let finding = match remotes.first() {
        _ if remotes.iter().any(|o| f.matches(o, vni)) => return,
        Some(o) => Finding::Different {
            observed: o.describe(),
        },
        None => Finding::Missing,
    };
    let ops = vec![Op::PutFdb {
        fdb: f.clone(),
        ifindex,
    }];
    record(plan, id, &f.name, f.describe(), f.mode, finding, ops);
}

fn plan_link(l: &DesiredLink, observed: &Mirror, plan: &mut Plan) {
    let id = ObjectId::Link(l.device.clone());
    let what = (l.name.as_str(), l.describe(), l.mode);
    let Some(ifindex) = device_or_pending(plan, &id, &l.device, what, observed) else {
        return;
    };
    let Some(info) = observed.link(ifindex) else {
        return;
    };
    let o = ObservedLink {
        up: info.up,
        mtu: info.mtu,
    };
    if l.matches(&o) {
        return;
    }
    let finding = Finding::Different {
        observed: DesiredLink::describe_observed(&o),
    };
    let ops = vec![Op::SetLink {
        ifindex,
        up: l.up && !o.up,
        mtu: l.mtu.filter(|m| o.mtu != Some(*m)),
    }];
    record(plan, id, &l.name, l.describe(), l.mode, finding, ops);
}

fn plan_sysctl(s: &DesiredSysctl, observed: &Mirror, plan: &mut Plan) {
    let id = ObjectId::Sysctl(s.key.clone());
    if let Scope::Device(d) = &s.key.scope {
        let what = (s.name.as_str(), s.describe(), s.mode);
        if device_or_pending(plan, &id, d, what, observed).is_none() {
            return;
        }
    }
    let finding = match observed.sysctl(&s.key) {
        Some(v) if v == s.value => return,
        Some(v) => Finding::Different {
            observed: format!("{} = {v}", s.key),
        },
        // Not read (yet): the write says whether it exists.
        None => Finding::Missing,
    };
    let ops = vec![Op::SetSysctl {
        key: s.key.clone(),
        value: s.value,
    }];
    record(plan, id, &s.name, s.describe(), s.mode, finding, ops);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::{encode, record};
    use crate::model::neighbour::NeighbourState;
    use crate::model::sysctl::{Setting, SysctlKey};
    use crate::model::{Family, Mode};
    use crate::observe::mirror::NeighbourInterest;
    use crate::plan::plan_all;
    use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
    use rtnetlink::packet_route::RouteNetlinkMessage as M;

    fn link(m: &mut Mirror, index: u32, name: &str, up: bool, mtu: u32) {
        let mut l = LinkMessage::default();
        l.header.index = index;
        if up {
            l.header.flags |= LinkFlags::Up;
        }
        l.attributes.push(LinkAttribute::IfName(name.into()));
        l.attributes.push(LinkAttribute::Mtu(mtu));
        m.ingest(&M::NewLink(l));
    }

    fn neighbour() -> DesiredNeighbour {
        DesiredNeighbour {
            name: "vtep".into(),
            mode: Mode::Enforce,
            device: "flannel.1".into(),
            address: "10.244.2.0".parse().unwrap(),
            lladdr: "0a:58:0a:f4:02:00".parse().unwrap(),
            state: NeighbourState::Permanent,
        }
    }

    fn fdb() -> DesiredFdb {
        DesiredFdb {
            name: "fdb".into(),
            mode: Mode::Enforce,
            device: "flannel.1".into(),
            lladdr: "0a:58:0a:f4:02:00".parse().unwrap(),
            dst: "192.168.1.12".parse().unwrap(),
            vni: None,
        }
    }

    fn sysctl(scope: Scope, value: u32) -> DesiredSysctl {
        DesiredSysctl {
            name: "rp".into(),
            mode: Mode::Enforce,
            key: SysctlKey {
                scope,
                setting: Setting::find(Family::Ipv4, "rp_filter").unwrap(),
            },
            value,
            pattern: None,
        }
    }

    fn desired() -> DesiredState {
        let n = neighbour();
        let f = fdb();
        let l = DesiredLink {
            name: "flannel-up".into(),
            mode: Mode::Enforce,
            device: "flannel.1".into(),
            up: true,
            mtu: Some(1450),
            pattern: None,
        };
        let s = sysctl(Scope::Device("flannel.1".into()), 0);
        let all = sysctl(Scope::All, 0);
        DesiredState {
            neighbours: [(n.id(), n)].into_iter().collect(),
            fdb: [(f.id(), f)].into_iter().collect(),
            links: [(l.device.clone(), l)].into_iter().collect(),
            sysctls: [(s.key.clone(), s), (all.key.clone(), all)]
                .into_iter()
                .collect(),
            ..Default::default()
        }
    }

    fn mirror(d: &DesiredState) -> Mirror {
        let mut m = Mirror::default();
        m.set_neighbour_interest(NeighbourInterest {
            neighbours: d.neighbours.keys().cloned().collect(),
            fdb: d.fdb.keys().cloned().collect(),
            devices: Vec::new(),
        });
        m
    }

    fn apply(m: &mut Mirror, plan: &Plan) {
        for op in plan.steps.iter().flat_map(|s| &s.ops) {
            record(m, op);
        }
    }

    #[test]
    fn everything_waits_for_its_device_then_is_put_in_place() {
        let d = desired();
        let mut m = mirror(&d);
        let p = plan_all(&d, &m);
        let pending = |p: &Plan| {
            p.drift
                .iter()
                .filter(|x| matches!(x.finding, Finding::Pending { .. }))
                .count()
        };
        assert_eq!(pending(&p), 4, "all but `all`: {p:#?}");
        assert_eq!(p.steps.len(), 1);
        link(&mut m, 7, "flannel.1", false, 1500);
        let p = plan_all(&d, &m);
        assert_eq!(pending(&p), 0);
        // The link first, then its setting (after `all`), then the entries on it.
        let kinds: Vec<&str> = p.steps.iter().map(|s| s.id.kind().as_str()).collect();
        assert_eq!(
            kinds,
            ["link", "sysctl", "sysctl", "fdb", "neighbour"],
            "{p:#?}"
        );
        assert!(matches!(
            p.steps[0].ops[..],
            [Op::SetLink {
                ifindex: 7,
                up: true,
                mtu: Some(1450)
            }]
        ));
        assert!(matches!(&p.steps[1].id, ObjectId::Sysctl(k) if k.scope == Scope::All));
        apply(&mut m, &p);
        assert!(plan_all(&d, &m).is_empty(), "{:#?}", plan_all(&d, &m));
    }

    #[test]
    fn only_what_differs_is_repaired() {
        let d = desired();
        let mut m = mirror(&d);
        link(&mut m, 7, "flannel.1", true, 1400);
        let p = plan_all(&d, &m);
        apply(&mut m, &p);
        // Up already: only the MTU is set.
        let l = p
            .steps
            .iter()
            .find(|s| s.id.kind().as_str() == "link")
            .unwrap();
        assert_eq!(
            l.ops,
            [Op::SetLink {
                ifindex: 7,
                up: false,
                mtu: Some(1450)
            }]
        );
        // Another MAC and another remote: different, replaced in place.
        let mut other = neighbour();
        other.lladdr = "0a:58:0a:f4:09:09".parse().unwrap();
        m.ingest(&M::NewNeighbour(encode::neighbour(&other, 7)));
        let mut moved = fdb();
        moved.dst = "192.168.1.99".parse().unwrap();
        m.ingest(&M::NewNeighbour(encode::fdb(&moved, 7)));
        let key = sysctl(Scope::All, 0).key;
        m.set_sysctl(&key, 2);
        let p = plan_all(&d, &m);
        let observed: Vec<String> = p
            .drift
            .iter()
            .map(|x| match &x.finding {
                Finding::Different { observed } => observed.clone(),
                f => format!("{f:?}"),
            })
            .collect();
        assert_eq!(
            observed,
            [
                "net.ipv4.conf.all.rp_filter = 2",
                "dst 192.168.1.99",
                "lladdr 0a:58:0a:f4:09:09 permanent"
            ]
        );
        apply(&mut m, &p);
        assert!(plan_all(&d, &m).is_empty());
    }

    #[test]
    fn observe_mode_reports_and_changes_nothing() {
        let mut d = desired();
        for l in d.links.values_mut() {
            l.mode = Mode::Observe;
        }
        let mut m = mirror(&d);
        link(&mut m, 7, "flannel.1", false, 1450);
        let p = plan_all(&d, &m);
        assert!(p.drift.iter().any(|x| x.kind.as_str() == "link"));
        assert!(!p.steps.iter().any(|s| s.id.kind().as_str() == "link"));
    }
}
