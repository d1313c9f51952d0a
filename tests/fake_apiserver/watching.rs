//! Watches: a chunked stream of newline-delimited events from a resourceVersion on, with
//! bookmarks when asked for, ended by a 410 `ERROR` event at expiry.

use super::*;

pub(super) fn line(kind: &str, object: &Value) -> Bytes {
    let mut s = json!({"type": kind, "object": object}).to_string();
    s.push('\n');
    Bytes::from(s)
}

pub(super) fn watch_stream(
    inner: Arc<Inner>,
    t: &Target,
    filter: Filter,
    q: &BTreeMap<String, String>,
    mut stop: watch::Receiver<bool>,
) -> Response<Body> {
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|s| s.parse().ok())
        .unwrap_or(300u64);
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1024);
    let kind = kind_of(&t.resource);
    let api_version = if t.group.is_empty() {
        t.version.clone()
    } else {
        format!("{}/{}", t.group, t.version)
    };
    let (group, resource) = (t.group.clone(), t.resource.clone());
    // Subscribe and read the history under one lock: nothing falls in between.
    let (mut live, backlog, last, expired) = {
        let mut st = inner.state.lock().unwrap();
        st.watches += 1;
        let live = inner.changes.subscribe();
        let expired = from != 0 && from < st.compacted;
        let backlog: Vec<(u64, Key, &'static str, Value)> = st
            .history
            .iter()
            .filter(|(rv, k, _, o)| {
                *rv > from && k.0 == group && k.1 == resource && filter.matches(k, o)
            })
            .cloned()
            .collect();
        (live, backlog, st.rv, expired)
    };
    tokio::spawn(async move {
        let gone = status(410, "Expired", &format!("too old resource version: {from}"));
        if expired {
            let _ = tx.send(line("ERROR", &gone)).await;
            return;
        }
        for (_, _, k, o) in &backlog {
            if tx.send(line(k, o)).await.is_err() {
                return;
            }
        }
        let mut seen = last;
        let deadline = tokio::time::sleep(Duration::from_secs(timeout));
        tokio::pin!(deadline);
        loop {
            let change = tokio::select! {
                _ = &mut deadline => return,
                _ = stop.changed() => return,
                c = live.recv() => c,
            };
            let msg = match change {
                Ok(Change::Event {
                    rv,
                    key,
                    kind: k,
                    object,
                }) => {
                    if rv <= seen
                        || key.0 != group
                        || key.1 != resource
                        || !filter.matches(&key, &object)
                    {
                        continue;
                    }
                    seen = rv;
                    line(k, &object)
                }
                Ok(Change::Bookmark) if bookmarks => {
                    let rv = inner.state.lock().unwrap().rv;
                    line(
                        "BOOKMARK",
                        &json!({"kind": kind, "apiVersion": api_version,
                        "metadata": {"resourceVersion": rv.to_string(),
                                     "annotations": {"k8s.io/initial-events-end": "true"}}}),
                    )
                }
                Ok(Change::Bookmark) => continue,
                Ok(Change::Expire) | Err(_) => {
                    let _ = tx.send(line("ERROR", &gone)).await;
                    return;
                }
            };
            if tx.send(msg).await.is_err() {
                return;
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(StreamBody::new(stream).boxed())
        .unwrap()
}
