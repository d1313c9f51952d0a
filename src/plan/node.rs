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
