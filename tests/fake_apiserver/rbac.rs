//! RBAC as kube-apiserver's authorizer evaluates it, for one ServiceAccount: the grants of the
//! rendered manifests (Roles, ClusterRoles and their bindings), and the 403 Status it answers a
//! refused request with.

use super::Access;
use serde_json::{json, Value};
use std::collections::BTreeSet;

/// What RBAC decides on: kube-apiserver's request attributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attributes {
    pub verb: String,
    pub group: String,
    /// With the subresource, if any: `nodes/status`.
    pub resource: String,
    /// `None` for cluster-scoped objects and requests across all namespaces.
    pub namespace: Option<String>,
    /// The object's name: from the path, or for list/watch from a `metadata.name=` field selector.
    pub name: Option<String>,
}

#[derive(Clone, Debug)]
struct PolicyRule {
    verbs: Vec<String>,
    groups: Vec<String>,
    resources: Vec<String>,
    names: Vec<String>,
}

impl PolicyRule {
    fn parse(rule: &Value) -> PolicyRule {
        let strings = |k: &str| -> Vec<String> {
            rule[k]
                .as_array()
                .into_iter()
                .flatten()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect()
        };
        PolicyRule {
            verbs: strings("verbs"),
            groups: strings("apiGroups"),
            resources: strings("resources"),
            names: strings("resourceNames"),
        }
    }

    fn allows(&self, a: &Attributes) -> bool {
        let has = |list: &[String], v: &str| list.iter().any(|x| x == "*" || x == v);
        has(&self.verbs, &a.verb)
            && has(&self.groups, &a.group)
            && has(&self.resources, &a.resource)
            && (self.names.is_empty() || a.name.as_ref().is_some_and(|n| self.names.contains(n)))
    }
}

/// The rules that apply to one ServiceAccount, each with where it applies (`None`: everywhere,
/// from a ClusterRoleBinding; `Some(ns)`: from a RoleBinding in `ns`).
#[derive(Clone, Debug, Default)]
pub struct Rbac {
    /// `system:serviceaccount:NAMESPACE:NAME`, as refusals name it.
    user: String,
    rules: Vec<(Option<String>, PolicyRule)>,
}

impl Rbac {
    /// The grants of ServiceAccount `namespace/name` in `objects` (rendered manifests).
    pub fn for_service_account(objects: &[Value], namespace: &str, name: &str) -> Rbac {
        let subject_matches = |s: &Value| match s["kind"].as_str() {
            Some("ServiceAccount") => s["name"] == name && s["namespace"] == namespace,
            Some("Group") => {
                let g = s["name"].as_str().unwrap_or("");
                g == "system:serviceaccounts"
                    || g == "system:authenticated"
                    || g == format!("system:serviceaccounts:{namespace}")
            }
            _ => false,
        };
        let role = |kind: &str, ns: Option<&str>, role_name: &str| {
            objects.iter().find(|o| {
                o["kind"] == kind
                    && o["metadata"]["name"] == role_name
                    && ns.is_none_or(|ns| o["metadata"]["namespace"] == ns)
            })
        };
        let mut rules = Vec::new();
        for b in objects {
            let scope = match b["kind"].as_str() {
                Some("ClusterRoleBinding") => None,
                Some("RoleBinding") => {
                    Some(b["metadata"]["namespace"].as_str().unwrap().to_owned())
                }
                _ => continue,
            };
            if !b["subjects"]
                .as_array()
                .into_iter()
                .flatten()
                .any(subject_matches)
            {
                continue;
            }
            let r = &b["roleRef"];
            let role_name = r["name"].as_str().unwrap();
            let found = match r["kind"].as_str() {
                Some("ClusterRole") => role("ClusterRole", None, role_name),
                // A RoleBinding's Role is in the binding's namespace.
                Some("Role") => scope
                    .as_deref()
                    .and_then(|ns| role("Role", Some(ns), role_name)),
                _ => None,
            };
            // A binding to a role that does not exist grants nothing, as in a real cluster.
            for rule in found
                .into_iter()
                .flat_map(|f| f["rules"].as_array().unwrap())
            {
                rules.push((scope.clone(), PolicyRule::parse(rule)));
            }
        }
        Rbac {
            user: format!("system:serviceaccount:{namespace}:{name}"),
            rules,
        }
    }

    pub fn allows(&self, a: &Attributes) -> bool {
        self.rules.iter().any(|(scope, rule)| {
            let in_scope = match (scope, &a.namespace) {
                (None, _) => true,
                (Some(s), Some(ns)) => s == ns,
                (Some(_), None) => false,
            };
            in_scope && rule.allows(a)
        })
    }

    /// Every (verb, API group, resource) granted.
    pub fn grants(&self) -> BTreeSet<Access> {
        let mut out = BTreeSet::new();
        for (_, r) in &self.rules {
            for v in &r.verbs {
                for g in &r.groups {
                    for res in &r.resources {
                        out.insert((v.clone(), g.clone(), res.clone()));
                    }
                }
            }
        }
        out
    }

    /// The Status kube-apiserver answers a request RBAC refuses with: the object's name when
    /// the request has one, the subresource as part of the resource (`nodes/status`).
    pub fn forbidden(&self, a: &Attributes) -> Value {
        let plural = a.resource.split('/').next().unwrap_or(&a.resource);
        let what = match &a.name {
            Some(n) => format!("{plural} \"{n}\""),
            None => plural.to_owned(),
        };
        let scope = match &a.namespace {
            Some(ns) => format!("in the namespace \"{ns}\""),
            None => "at the cluster scope".to_owned(),
        };
        let message = format!(
            "{what} is forbidden: User \"{}\" cannot {} resource \"{}\" in API group \"{}\" {scope}",
            self.user, a.verb, a.resource, a.group
        );
        let mut details = json!({"group": a.group, "kind": plural});
        if let Some(n) = &a.name {
            details["name"] = json!(n);
        }
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": "Forbidden", "details": details, "code": 403})
    }
}
