//! PATCH as kube-apiserver applies the two kinds the agent sends: JSON merge patch (RFC 7386)
//! and strategic merge patch, which is a merge patch except for lists with a merge key. Of those,
//! the agent only patches a Node's `status.conditions` (merge key `type`): an entry replaces the
//! fields it names in the condition of its type, or is added; the other conditions stay.

use serde_json::Value;

pub const MERGE: &str = "application/merge-patch+json";
pub const STRATEGIC: &str = "application/strategic-merge-patch+json";

/// Applies `patch` to `target` (RFC 7386: `null` deletes a key, objects merge, anything else
/// replaces), merging lists by key where `strategic` says so.
pub fn apply(target: &mut Value, patch: &Value, strategic: bool, path: &str) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let t = target.as_object_mut().unwrap();
    for (k, v) in p {
        let here = format!("{path}.{k}");
        match v {
            Value::Null => {
                t.remove(k);
            }
            Value::Array(items) if strategic && merge_key(&here).is_some() => {
                let key = merge_key(&here).unwrap();
                let list = t
                    .entry(k.clone())
                    .or_insert_with(|| Value::Array(Vec::new()));
                if !list.is_array() {
                    *list = Value::Array(Vec::new());
                }
                let list = list.as_array_mut().unwrap();
                for item in items {
                    match list.iter_mut().find(|e| e[key] == item[key]) {
                        Some(existing) => apply(existing, item, strategic, &here),
                        None => list.push(item.clone()),
                    }
                }
            }
            _ => {
                let slot = t.entry(k.clone()).or_insert(Value::Null);
                apply(slot, v, strategic, &here);
            }
        }
    }
}

/// The merge key of a list, as the Kubernetes API's `patchMergeKey` says (only the lists the
/// agent patches).
fn merge_key(path: &str) -> Option<&'static str> {
    match path {
        ".status.conditions" => Some("type"),
        _ => None,
    }
}
