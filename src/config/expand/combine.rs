//! The values a templated object expands to: every combination of its fields' values of one
//! family, and a set's entries with its members that `forbidden` covers left out. Pure.

// Through the parent's imports, so that this file names the same modules it does.
use super::{
    explicit_family, template, values, ClusterFacts, Family, Member, PendingCause, RawIpSet,
    Scalar, Spanned, Templated, MAX_EXPANSION,
};

/// Every combination of the fields' values whose families agree (with each other and with the
/// object's explicit family). `Err` says why there is none.
pub(super) fn combinations(
    fields: &[(String, Templated)],
    facts: &ClusterFacts,
    family: Option<Family>,
) -> Result<Vec<Vec<String>>, (PendingCause, String)> {
    let mut lists = Vec::with_capacity(fields.len());
    for (_, t) in fields {
        let Some(values) = t.values(facts) else {
            return Err((
                PendingCause::NoValue,
                format!("waiting for {}: no such value yet", t.template),
            ));
        };
        let had_values = !values.is_empty();
        let values: Vec<String> = values
            .into_iter()
            .filter(|v| {
                family.is_none() || template::family_of(v).is_none_or(|f| Some(f) == family)
            })
            .collect();
        if values.is_empty() {
            let of = family
                .map(|f| format!(" of family {f}"))
                .unwrap_or_default();
            // Values of another family only are as good as none: the object waits.
            let cause = if had_values {
                PendingCause::NoFamily
            } else {
                PendingCause::NoValue
            };
            return Err((
                cause,
                format!("waiting for {}: no value{of} yet", t.template),
            ));
        }
        lists.push(values);
    }
    let total = lists.iter().try_fold(1usize, |n, l| n.checked_mul(l.len()));
    if total.is_none_or(|n| n > MAX_EXPANSION) {
        return Err((
            PendingCause::TooMany,
            format!("its templates expand to more than {MAX_EXPANSION} objects: narrow them"),
        ));
    }
    let mut combos: Vec<Vec<String>> = vec![Vec::new()];
    for list in &lists {
        let mut next = Vec::with_capacity(combos.len() * list.len());
        for c in &combos {
            for v in list {
                let mut c = c.clone();
                c.push(v.clone());
                next.push(c);
            }
        }
        combos = next;
    }
    // One object per value of one family: a combination mixing families is no object.
    combos.retain(|c| {
        let mut fams = c.iter().filter_map(|v| template::family_of(v));
        let first = fams.next();
        fams.all(|f| Some(f) == first)
    });
    if combos.is_empty() {
        return Err((
            PendingCause::NoFamily,
            "its templates have no values of one family".to_owned(),
        ));
    }
    Ok(combos)
}

/// The set with each templated entry replaced by its values of the set's family. A member that a
/// forbidden entry covers is left out (that is what `forbidden` is for: an API server address
/// that some Service also lists must not enter the set), and noted.
pub(super) fn expand_set(
    s: &RawIpSet,
    fields: &[(String, Templated)],
    facts: &ClusterFacts,
) -> (RawIpSet, Vec<(PendingCause, String)>) {
    let family = explicit_family(&s.family).unwrap_or(Family::Ipv4);
    let mut notes = Vec::new();
    let mut raw = s.clone();
    let mut expand_list = |list: &Option<Vec<Scalar>>, name: &str| -> Option<Vec<Scalar>> {
        let list = list.as_ref()?;
        let mut out = Vec::with_capacity(list.len());
        for (j, entry) in list.iter().enumerate() {
            let key = format!("{name}[{j}]");
            let Some((_, t)) = fields.iter().find(|(f, _)| *f == key) else {
                out.push(entry.clone());
                continue;
            };
            let Some(at) = entry.as_ref() else { continue };
            match t.values(facts) {
                None => notes.push((
                    PendingCause::NoValue,
                    format!("{key}: waiting for {}: no such value yet", t.template),
                )),
                Some(values) => out.extend(
                    values
                        .into_iter()
                        .filter(|v| template::family_of(v).is_none_or(|f| f == family))
                        .map(|v| Some(Spanned::new(v, at.referenced, at.defined))),
                ),
            }
        }
        Some(out)
    };
    raw.forbidden = expand_list(&s.forbidden, "forbidden");
    raw.members = expand_list(&s.members, "members");
    let forbidden: Vec<ipnet::IpNet> = raw
        .forbidden
        .iter()
        .flatten()
        .flatten()
        .filter_map(|f| values::prefix(&f.value).ok())
        .collect();
    if let Some(members) = &mut raw.members {
        members.retain(|m| {
            let Some(m) = m else { return true };
            let Ok(member) = Member::parse(&m.value) else {
                return true;
            };
            match forbidden.iter().find(|f| member.overlaps(f)) {
                Some(f) => {
                    notes.push((
                        PendingCause::ForbiddenMember,
                        format!("member `{}` is forbidden by `{f}`: left out", m.value),
                    ));
                    false
                }
                None => true,
            }
        });
    }
    (raw, notes)
}
