//! Lists: one snapshot cut into pages (continue tokens, `remainingItemCount`), or the whole list
//! at once as from the watch cache (`resourceVersion=0`).

use super::*;

/// A continue token: the snapshot's resourceVersion and the last key served. The real server's
/// is base64 JSON; clients treat it as opaque, so hex of the same JSON does.
pub(super) fn continue_token(rv: u64, last: &Key) -> String {
    let text = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": [last.0, last.1, last.2, last.3]})
        .to_string();
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn parse_continue(token: &str) -> Option<(u64, Key)> {
    let bytes: Vec<u8> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect::<Option<_>>()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    let start = v["start"].as_array()?;
    let part = |i: usize| start.get(i).and_then(Value::as_str).map(str::to_owned);
    Some((v["rv"].as_u64()?, (part(0)?, part(1)?, part(2)?, part(3)?)))
}

/// Items of a list response, already serialized (a list of 50,000 objects is not cloned).
pub(super) struct Items {
    pub(super) json: Vec<u8>,
    pub(super) count: usize,
}

/// One page of `map`'s matching objects after `after`: the items, the last key served, and how
/// many match beyond it.
pub(super) fn page_of(
    map: &BTreeMap<Key, Value>,
    after: Option<&Key>,
    limit: usize,
    matches: impl Fn(&Key, &Value) -> bool,
) -> (Items, Option<Key>, usize) {
    use std::ops::Bound;
    let from = after.map_or(Bound::Unbounded, Bound::Excluded);
    let mut matching = map
        .range::<Key, _>((from, Bound::Unbounded))
        .filter(|(k, v)| matches(k, v));
    let mut items = Items {
        json: b"[".to_vec(),
        count: 0,
    };
    let mut last = None;
    for (k, v) in matching
        .by_ref()
        .take(if limit == 0 { usize::MAX } else { limit })
    {
        if items.count > 0 {
            items.json.push(b',');
        }
        serde_json::to_writer(&mut items.json, v).unwrap();
        items.count += 1;
        last = Some(k);
    }
    items.json.push(b']');
    let last = last.cloned();
    (items, last, matching.count())
}

pub(super) fn list(
    inner: &Inner,
    t: &Target,
    filter: &Filter,
    q: &BTreeMap<String, String>,
) -> Response<Body> {
    let mut st = inner.state.lock().unwrap();
    st.lists += 1;
    let token = q.get("continue").filter(|c| !c.is_empty());
    // resourceVersion=0: any version will do, so the watch cache answers, with everything it
    // holds (it does not paginate: `limit` is ignored).
    let from_cache = token.is_none() && q.get("resourceVersion").is_some_and(|v| v == "0");
    let limit: usize = match from_cache {
        true => 0,
        false => q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(0),
    };
    let matches = |k: &Key, v: &Value| k.0 == t.group && k.1 == t.resource && filter.matches(k, v);
    let (rv, (items, last, rest)) = match token {
        // A later page: cut from the first page's snapshot, after the last key it served.
        Some(token) => {
            if q.get("resourceVersion").is_some_and(|v| !v.is_empty()) {
                return full(
                    StatusCode::BAD_REQUEST,
                    status(
                        400,
                        "BadRequest",
                        "specifying resource version is not allowed when using continue",
                    ),
                );
            }
            let Some((rv, after)) = parse_continue(token) else {
                return full(
                    StatusCode::BAD_REQUEST,
                    status(400, "BadRequest", "continue key is not valid"),
                );
            };
            match st.snapshots.get(&rv) {
                // Compaction drops the snapshots: what is gone is too old.
                Some(snap) => (rv, page_of(snap, Some(&after), limit, matches)),
                _ => {
                    st.pages.push(ListPage {
                        resource: t.resource.clone(),
                        limit,
                        continued: true,
                        resource_version: rv,
                        items: 0,
                        remaining: None,
                        more: false,
                        expired: true,
                        from_cache: false,
                    });
                    return full(
                        StatusCode::GONE,
                        status(
                            410,
                            "Expired",
                            "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                        ),
                    );
                }
            }
        }
        None => {
            let page = page_of(&st.objects, None, limit, matches);
            if page.2 > 0 && !st.snapshots.contains_key(&st.rv) {
                // More pages to come: they are cut from the objects as they are now.
                let (rv, snap) = (st.rv, Arc::new(st.objects.clone()));
                st.snapshots.insert(rv, snap);
                while st.snapshots.len() > SNAPSHOTS_KEPT {
                    st.snapshots.pop_first();
                }
            }
            (st.rv, page)
        }
    };
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if let (true, Some(last)) = (rest > 0, &last) {
        metadata["continue"] = json!(continue_token(rv, last));
        // As the real server: a count only when no selector filters what is left.
        if filter.fields.is_empty() && filter.labels.is_empty() {
            metadata["remainingItemCount"] = json!(rest);
        }
    }
    let page = ListPage {
        resource: t.resource.clone(),
        limit,
        continued: token.is_some(),
        resource_version: rv,
        items: items.count,
        remaining: metadata["remainingItemCount"].as_u64().map(|n| n as usize),
        more: rest > 0,
        expired: false,
        from_cache,
    };
    st.pages.push(page);
    if rest > 0 && token.is_none() && st.expire_after_first_page.as_ref() == Some(&t.resource) {
        st.expire_after_first_page = None;
        st.compacted = st.rv;
        st.history.clear();
        st.snapshots.clear();
        drop(st);
        // Open watches end too, as with [`FakeApiServer::expire`].
        let _ = inner.changes.send(Change::Expire);
    }
    let api_version = if t.group.is_empty() {
        t.version.clone()
    } else {
        format!("{}/{}", t.group, t.version)
    };
    let mut body = json!({"kind": format!("{}List", kind_of(&t.resource)),
                          "apiVersion": api_version, "metadata": metadata})
    .to_string()
    .into_bytes();
    body.pop();
    body.extend_from_slice(b",\"items\":");
    body.extend_from_slice(&items.json);
    body.push(b'}');
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .unwrap()
}
