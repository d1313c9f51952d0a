//! What a request names: the path's group, version, resource and object, the query, and the
//! field and label selectors of a list or watch.

use super::*;

/// What a request path names.
pub(super) struct Target {
    pub(super) group: String,
    pub(super) version: String,
    pub(super) namespace: Option<String>,
    pub(super) resource: String,
    pub(super) name: Option<String>,
    /// `status` of `nodes/NAME/status`.
    pub(super) subresource: Option<String>,
}

impl Target {
    /// `resource` or `resource/subresource`, as RBAC names it.
    pub(super) fn rbac_resource(&self) -> String {
        match &self.subresource {
            Some(sub) => format!("{}/{sub}", self.resource),
            None => self.resource.clone(),
        }
    }
}

pub(super) fn target(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match parts.as_slice() {
        ["api", v, rest @ ..] => (String::new(), v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (g.to_string(), v.to_string(), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (resource, name, subresource) = match rest {
        [r] => (r.to_string(), None, None),
        [r, n] => (r.to_string(), Some(n.to_string()), None),
        [r, n, sub] => (r.to_string(), Some(n.to_string()), Some(sub.to_string())),
        _ => return None,
    };
    Some(Target {
        group,
        version,
        namespace,
        resource,
        name,
        subresource,
    })
}

pub(super) fn kind_of(resource: &str) -> &'static str {
    match resource {
        "nodes" => "Node",
        "services" => "Service",
        "endpointslices" => "EndpointSlice",
        "configmaps" => "ConfigMap",
        "events" => "Event",
        "pods" => "Pod",
        _ => "Unknown",
    }
}

pub(super) fn query(req: &Request<hyper::body::Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

pub(super) fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("00");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A label requirement: key, `Some((equals, value))` or `None` for an existence test, and
/// whether the key must exist.
pub(super) type LabelReq = (String, Option<(bool, String)>, bool);

/// Field and label selectors.
pub(super) struct Filter {
    pub(super) namespace: Option<String>,
    pub(super) fields: Vec<(String, bool, String)>,
    pub(super) labels: Vec<LabelReq>,
}

impl Filter {
    pub(super) fn parse(
        q: &BTreeMap<String, String>,
        namespace: Option<String>,
    ) -> Result<Filter, String> {
        let mut fields = Vec::new();
        for req in q
            .get("fieldSelector")
            .map(String::as_str)
            .unwrap_or("")
            .split(',')
        {
            if req.is_empty() {
                continue;
            }
            let (k, eq, v) = if let Some((k, v)) = req.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = req.split_once("==").or_else(|| req.split_once('=')) {
                (k, true, v)
            } else {
                return Err(format!("invalid field selector `{req}`"));
            };
            if !matches!(k, "metadata.name" | "metadata.namespace" | "spec.nodeName") {
                return Err(format!("field label not supported: {k}"));
            }
            fields.push((k.to_owned(), eq, v.to_owned()));
        }
        let mut labels = Vec::new();
        for req in q
            .get("labelSelector")
            .map(String::as_str)
            .unwrap_or("")
            .split(',')
        {
            if req.is_empty() {
                continue;
            }
            if let Some((k, v)) = req.split_once("!=") {
                labels.push((k.to_owned(), Some((false, v.to_owned())), true));
            } else if let Some((k, v)) = req.split_once("==").or_else(|| req.split_once('=')) {
                labels.push((k.to_owned(), Some((true, v.to_owned())), true));
            } else if let Some(k) = req.strip_prefix('!') {
                labels.push((k.to_owned(), None, false));
            } else if req.contains([' ', '(']) {
                return Err(format!("set-based selector not supported here: `{req}`"));
            } else {
                labels.push((req.to_owned(), None, true));
            }
        }
        Ok(Filter {
            namespace,
            fields,
            labels,
        })
    }

    pub(super) fn matches(&self, key: &Key, object: &Value) -> bool {
        if self.namespace.as_ref().is_some_and(|ns| *ns != key.2) {
            return false;
        }
        for (k, eq, v) in &self.fields {
            let actual = match k.as_str() {
                "metadata.name" => key.3.as_str(),
                "spec.nodeName" => object["spec"]["nodeName"].as_str().unwrap_or(""),
                _ => key.2.as_str(),
            };
            if (actual == v) != *eq {
                return false;
            }
        }
        let labels = &object["metadata"]["labels"];
        for (k, value, exists) in &self.labels {
            let actual = labels[k].as_str();
            let ok = match value {
                Some((true, v)) => actual == Some(v.as_str()),
                Some((false, v)) => actual != Some(v.as_str()),
                None => actual.is_some() == *exists,
            };
            if !ok {
                return false;
            }
        }
        true
    }
}
