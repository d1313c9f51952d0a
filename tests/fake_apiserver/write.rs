//! Writes: create (POST) of Events and PATCH of Events and of a Node's status subresource.

use super::*;

pub(super) async fn create(
    inner: &Inner,
    t: Target,
    req: Request<hyper::body::Incoming>,
) -> Response<Body> {
    let Ok(body) = req.into_body().collect().await else {
        return full(
            StatusCode::BAD_REQUEST,
            status(400, "BadRequest", "unreadable body"),
        );
    };
    let mut object: Value = match serde_json::from_slice(&body.to_bytes()) {
        Ok(v) => v,
        Err(e) => {
            return full(
                StatusCode::BAD_REQUEST,
                status(400, "BadRequest", &e.to_string()),
            )
        }
    };
    let ns = t.namespace.clone().unwrap_or_default();
    if object["metadata"]["name"].as_str().is_none() {
        let prefix = object["metadata"]["generateName"]
            .as_str()
            .unwrap_or("x-")
            .to_owned();
        let n = inner.state.lock().unwrap().rv + 1;
        object["metadata"]["name"] = json!(format!("{prefix}{n:05}"));
    }
    object["metadata"]["namespace"] = json!(ns);
    let name = object["metadata"]["name"].as_str().unwrap().to_owned();
    let key = (t.group, t.resource, ns, name);
    let mut st = inner.state.lock().unwrap();
    if st.objects.contains_key(&key) {
        return full(
            StatusCode::CONFLICT,
            status(409, "AlreadyExists", "already exists"),
        );
    }
    st.rv += 1;
    object["metadata"]["resourceVersion"] = json!(st.rv.to_string());
    st.objects.insert(key, object.clone());
    full(StatusCode::CREATED, object)
}

/// PATCH of an object, or of a Node's status (only `status` changes). Bumps the
/// resourceVersion and tells watches (MODIFIED), as any write.
pub(super) async fn patch_object(
    inner: &Inner,
    t: Target,
    req: Request<hyper::body::Incoming>,
) -> Response<Body> {
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let strategic = match content_type.split(';').next().unwrap_or("").trim() {
        patch::STRATEGIC => true,
        patch::MERGE => false,
        other => {
            return full(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                status(
                    415,
                    "UnsupportedMediaType",
                    &format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got `{other}`)"),
                ),
            )
        }
    };
    if t.subresource.as_deref().is_some_and(|s| s != "status") {
        return full(
            StatusCode::NOT_FOUND,
            status(404, "NotFound", "no such subresource"),
        );
    }
    let Ok(body) = req.into_body().collect().await else {
        return full(
            StatusCode::BAD_REQUEST,
            status(400, "BadRequest", "unreadable body"),
        );
    };
    let mut p: Value = match serde_json::from_slice(&body.to_bytes()) {
        Ok(v) => v,
        Err(e) => {
            return full(
                StatusCode::BAD_REQUEST,
                status(400, "BadRequest", &e.to_string()),
            )
        }
    };
    if t.subresource.is_some() {
        // The status subresource ignores everything but status.
        p = json!({"status": p["status"].clone()});
    } else if let Some(m) = p.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
        m.remove("name");
        m.remove("namespace");
    }
    let key = (
        t.group.clone(),
        t.resource.clone(),
        t.namespace.clone().unwrap_or_default(),
        t.name.clone().unwrap_or_default(),
    );
    let mut st = inner.state.lock().unwrap();
    let Some(mut object) = st.objects.get(&key).cloned() else {
        let message = format!("{} \"{}\" not found", t.resource, key.3);
        return full(StatusCode::NOT_FOUND, status(404, "NotFound", &message));
    };
    patch::apply(&mut object, &p, strategic, "");
    st.rv += 1;
    let rv = st.rv;
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    st.objects.insert(key.clone(), object.clone());
    st.history
        .push((rv, key.clone(), "MODIFIED", object.clone()));
    let _ = inner.changes.send(Change::Event {
        rv,
        key,
        kind: "MODIFIED",
        object: object.clone(),
    });
    full(StatusCode::OK, object)
}
