//! A fake Kubernetes API server for the tests and the cluster bench: plain HTTP/1.1 on the host's
//! loopback, serving what netwarden's watchers and Event recorder use, the way kube-apiserver
//! does it:
//!
//! - list with a collection `resourceVersion`, field selectors (`metadata.name`,
//!   `metadata.namespace`, and `spec.nodeName` on Pods only, as the real server) and equality
//!   label selectors (`k=v`, `k!=v`, `k`, `!k`);
//! - Pods: [`pod`] builds one, [`FakeApiServer::apply_pod`] creates or updates it (a new IP),
//!   [`FakeApiServer::delete_pod`] deletes it;
//! - list in pages (`limit`, `continue`): every page is cut from one snapshot taken at the first
//!   page's resourceVersion, which every page reports; a page with more after it carries a
//!   continue token and, without selectors, `metadata.remainingItemCount`; a token older than
//!   the compacted history gets 410 Expired, as from etcd ([`FakeApiServer::list_pages`] tells
//!   what was served);
//! - watch (`?watch=true`) as a chunked stream of newline-delimited JSON events, resuming from a
//!   resourceVersion, with `BOOKMARK` events when asked for (`allowWatchBookmarks`);
//! - expiry: [`FakeApiServer::expire`] compacts the history and ends every open watch with an
//!   `ERROR` event carrying a 410 Status, as etcd compaction does; resuming from an older version
//!   gets 410 too, so the client has to relist;
//! - `resourceVersion=0` lists are served as from the watch cache: the whole list in one
//!   response, `limit` ignored, as kube-apiserver's cacher does before snapshot pagination
//!   (Kubernetes 1.34's ListFromCacheSnapshot); [`ListPage::from_cache`] tells them apart;
//! - RBAC, once [`FakeApiServer::enforce`]d (below), with kube-apiserver's 403 Status;
//!   [`FakeApiServer::revoke`] takes a grant away for a while, [`FakeApiServer::fail`] makes
//!   requests fail with another code;
//! - throttling: [`FakeApiServer::throttle`] answers the next N requests of a verb and resource
//!   with 429 (or 503) and `Retry-After`, before authorization as in kube-apiserver's handler
//!   chain: a `TooManyRequests` Status with `details.retryAfterSeconds` as the storage layer
//!   answers, or the plain text its max-in-flight and priority-and-fairness filters answer;
//! - create (POST) of Events (409 AlreadyExists for a name taken), kept for the test to read;
//! - PATCH (JSON merge and strategic merge, [`patch`]) of Events and of a Node's `status`
//!   subresource (`nodes/status`: only `status` changes, conditions merge by type);
//! - every request is logged with its time, answer and User-Agent ([`FakeApiServer::requests`]);
//! - [`FakeApiServer::stop`] / [`FakeApiServer::start_again`]: the server goes away and comes
//!   back on the same port with the same objects.
//!
//! Every request is recorded as (verb, API group, resource), so a test can compare what the agent
//! used with the RBAC in deploy/. With [`FakeApiServer::enforce`] the server authorizes every
//! request as one ServiceAccount against Roles, ClusterRoles and their bindings (the rendered
//! manifests), the way kube-apiserver's RBAC authorizer does: a RoleBinding grants in its own
//! namespace only, `resourceNames` match the object's name, and a list or watch has a name only
//! when its field selector asks for `metadata.name=NAME`, and a subresource is its own resource
//! (`nodes/status`). Refused requests get 403 Forbidden and are recorded
//! ([`FakeApiServer::denied`]).
#![allow(dead_code)] // each test binary uses its own subset

pub mod patch;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, watch};

mod list;
mod rbac;
mod request;
mod watching;
mod write;
use list::*;
pub use rbac::{Attributes, Rbac};
use request::*;
use watching::*;
use write::*;

/// (verb, API group ("" for core), resource).
pub type Access = (String, String, String);

#[derive(Clone, Debug)]
enum Change {
    Event {
        rv: u64,
        key: Key,
        kind: &'static str,
        object: Value,
    },
    /// History compacted: every open watch ends with 410.
    Expire,
    Bookmark,
}

/// (group, resource, namespace, name).
type Key = (String, String, String, String);

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    /// Every change, for watches resuming from a resourceVersion.
    history: Vec<(u64, Key, &'static str, Value)>,
    /// Resuming from a version below this one gets 410 Gone (as etcd compacted at this
    /// revision: a watch from it has nothing missing, one from before it has).
    compacted: u64,
    accesses: BTreeSet<Access>,
    /// Watch requests served, for tests that wait for a relist.
    watches: u64,
    lists: u64,
    /// Snapshots of `objects` at a resourceVersion, for the later pages of a paged list (what
    /// etcd's MVCC gives the real server). The newest few are kept.
    snapshots: BTreeMap<u64, Arc<BTreeMap<Key, Value>>>,
    pages: Vec<ListPage>,
    /// Compact the history right after the next first page of this resource that has more
    /// (one-shot): its continue token is then too old.
    expire_after_first_page: Option<String>,
    /// RBAC in force; `None`: everything is allowed.
    rbac: Option<Rbac>,
    /// Grants of `rbac` taken away for a while ([`FakeApiServer::revoke`]).
    revoked: BTreeSet<Access>,
    denied: Vec<Attributes>,
    /// Requests answered with an error instead: (verb, resource) -> code.
    failures: BTreeMap<(String, String), u16>,
    /// Requests throttled: (verb, resource) -> how, and how many more times.
    throttles: BTreeMap<(String, String), Throttle>,
    requests: Vec<Served>,
}

/// One request, as served.
#[derive(Clone, Debug)]
pub struct Served {
    pub at: Instant,
    pub verb: String,
    pub group: String,
    /// `resource` or `resource/subresource`.
    pub resource: String,
    pub code: u16,
    pub user_agent: Option<String>,
    /// For lists: the query's `resourceVersion` (None: unset).
    pub resource_version: Option<String>,
}

/// How [`FakeApiServer::throttle`] answers.
#[derive(Clone, Debug)]
pub struct Throttle {
    /// 429, 503 (a server shutting down or not ready) or 500 (a storage timeout: kube-apiserver's
    /// `ServerTimeout`).
    pub code: u16,
    /// The `Retry-After` header as sent (whole seconds from kube-apiserver; anything for a
    /// test of what a client does with garbage).
    pub retry_after: String,
    /// Requests answered so before the throttle lifts.
    pub times: u32,
    /// The body: plain text as kube-apiserver's priority-and-fairness filter writes it, or (false)
    /// a Status as its storage layer does.
    pub plain_text: bool,
}

impl Throttle {
    /// A `TooManyRequests` Status with `Retry-After: seconds`, `times` times.
    pub fn status(times: u32, seconds: u64) -> Throttle {
        Throttle {
            code: 429,
            retry_after: seconds.to_string(),
            times,
            plain_text: false,
        }
    }

    /// Priority and fairness rejecting the request: 429, plain text, `Retry-After: seconds`.
    pub fn priority_and_fairness(times: u32, seconds: u64) -> Throttle {
        Throttle {
            plain_text: true,
            ..Throttle::status(times, seconds)
        }
    }

    fn response(&self, verb: &str, resource: &str) -> Response<Body> {
        let code = StatusCode::from_u16(self.code).unwrap();
        let builder = Response::builder()
            .status(code)
            .header("retry-after", self.retry_after.as_str());
        if self.plain_text {
            // Go's http.Error.
            return builder
                .header("content-type", "text/plain; charset=utf-8")
                .header("x-content-type-options", "nosniff")
                .body(
                    Full::new(Bytes::from_static(
                        b"Too many requests, please try again later.\n",
                    ))
                    .boxed(),
                )
                .unwrap();
        }
        let (reason, message) = match self.code {
            429 => (
                reason_of(429),
                format!("Too many requests: the server cannot {verb} {resource} right now"),
            ),
            500 => (
                "ServerTimeout",
                format!("the {verb} of {resource} did not complete in time, please try again"),
            ),
            code => (
                reason_of(code),
                format!("the server cannot {verb} {resource} right now"),
            ),
        };
        let mut body = status(self.code, reason, &message);
        if let Ok(seconds) = self.retry_after.parse::<u64>() {
            body["details"] = json!({"retryAfterSeconds": seconds});
        }
        builder
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())).boxed())
            .unwrap()
    }
}

/// Snapshots kept for paged lists; a continue token for an older one gets 410.
const SNAPSHOTS_KEPT: usize = 8;

/// One list response, as served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListPage {
    pub resource: String,
    /// `limit` asked for (0: none).
    pub limit: usize,
    /// Whether the request carried a continue token.
    pub continued: bool,
    /// The snapshot's resourceVersion (every page of one list reports the same).
    pub resource_version: u64,
    pub items: usize,
    /// `metadata.remainingItemCount`, when given.
    pub remaining: Option<usize>,
    /// Whether a continue token was returned.
    pub more: bool,
    /// Answered 410 Expired: the continue token was too old.
    pub expired: bool,
    /// `resourceVersion=0`: served from the watch cache, whole, `limit` ignored.
    pub from_cache: bool,
}

struct Inner {
    state: Mutex<State>,
    changes: broadcast::Sender<Change>,
}

pub struct FakeApiServer {
    inner: Arc<Inner>,
    pub addr: SocketAddr,
    stop: Option<watch::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeApiServer {
    /// Starts on a free port of 127.0.0.1.
    pub fn start() -> FakeApiServer {
        let (changes, _) = broadcast::channel(65_536);
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                rv: 100,
                ..Default::default()
            }),
            changes,
        });
        let mut s = FakeApiServer {
            inner,
            addr: "127.0.0.1:0".parse().unwrap(),
            stop: None,
            thread: None,
        };
        s.serve();
        s
    }

    fn serve(&mut self) {
        let listener = std::net::TcpListener::bind(self.addr).expect("bind the fake API server");
        listener.set_nonblocking(true).unwrap();
        self.addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = watch::channel(false);
        let inner = self.inner.clone();
        self.thread = Some(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(accept_loop(listener, inner, stop_rx));
        }));
        self.stop = Some(stop_tx);
    }

    /// The server goes away: the listener closes and every connection (watches included) drops.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Back on the same port with the same objects (history compacted, as after an etcd restore:
    /// resuming watches get 410 and relist).
    pub fn start_again(&mut self) {
        {
            let mut st = self.inner.state.lock().unwrap();
            st.compacted = st.rv;
            st.snapshots.clear();
        }
        self.serve();
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig pointing at this server.
    pub fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\nusers:\n- name: fake\n  user:\n    token: fake-token\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\n",
                self.url()
            ),
        )
        .unwrap();
        path
    }

    /// Creates or replaces an object (ADDED / MODIFIED). `group` is "" for core/v1.
    pub fn apply(&self, group: &str, resource: &str, mut object: Value) {
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        let name = object["metadata"]["name"]
            .as_str()
            .expect("metadata.name")
            .to_owned();
        let key = (group.to_owned(), resource.to_owned(), ns, name.clone());
        let mut st = self.inner.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let existed = st.objects.get(&key).cloned();
        let uid = existed
            .as_ref()
            .and_then(|o| o["metadata"]["uid"].as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("uid-{resource}-{name}-{rv}"));
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        object["metadata"]["uid"] = json!(uid);
        object["metadata"]["creationTimestamp"] = json!("2024-01-01T00:00:00Z");
        let kind = if existed.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        st.objects.insert(key.clone(), object.clone());
        st.history.push((rv, key.clone(), kind, object.clone()));
        let _ = self.inner.changes.send(Change::Event {
            rv,
            key,
            kind,
            object,
        });
    }

    pub fn delete(&self, group: &str, resource: &str, ns: &str, name: &str) {
        let key = (
            group.to_owned(),
            resource.to_owned(),
            ns.to_owned(),
            name.to_owned(),
        );
        let mut st = self.inner.state.lock().unwrap();
        let Some(mut object) = st.objects.remove(&key) else {
            panic!("no {resource} {ns}/{name} to delete");
        };
        st.rv += 1;
        let rv = st.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.history
            .push((rv, key.clone(), "DELETED", object.clone()));
        let _ = self.inner.changes.send(Change::Event {
            rv,
            key,
            kind: "DELETED",
            object,
        });
    }

    /// Creates a running Pod bound to `node` with `ips` (the first is `status.podIP`), or
    /// updates it (its IPs changed).
    pub fn apply_pod(&self, ns: &str, name: &str, node: &str, ips: &[&str]) {
        self.apply("", "pods", pod(ns, name, node, ips));
    }

    pub fn delete_pod(&self, ns: &str, name: &str) {
        self.delete("", "pods", ns, name);
    }

    /// Compacts the history and ends every open watch with 410 Expired.
    pub fn expire(&self) {
        {
            let mut st = self.inner.state.lock().unwrap();
            st.compacted = st.rv;
            st.history.clear();
            st.snapshots.clear();
        }
        let _ = self.inner.changes.send(Change::Expire);
    }

    /// Compacts the history right after the next first page of `resource` that has more pages,
    /// as if etcd compacted while a client pages through a list: its continue gets 410.
    pub fn expire_after_first_page(&self, resource: &str) {
        self.inner.state.lock().unwrap().expire_after_first_page = Some(resource.to_owned());
    }

    /// Sends a BOOKMARK to every watch that asked for them.
    pub fn bookmark(&self) {
        let _ = self.inner.changes.send(Change::Bookmark);
    }

    /// From now on, requests are authorized as a ServiceAccount with these grants.
    pub fn enforce(&self, rbac: Rbac) {
        self.inner.state.lock().unwrap().rbac = Some(rbac);
    }

    /// The requests refused by RBAC so far.
    pub fn denied(&self) -> Vec<Attributes> {
        self.inner.state.lock().unwrap().denied.clone()
    }

    /// Takes a grant of the enforced RBAC away: such requests get 403 from now on.
    pub fn revoke(&self, verb: &str, group: &str, resource: &str) {
        let grant = (verb.to_owned(), group.to_owned(), resource.to_owned());
        let mut st = self.inner.state.lock().unwrap();
        let granted = st
            .rbac
            .as_ref()
            .is_some_and(|r| r.grants().contains(&grant));
        assert!(granted, "{grant:?} is not granted by the enforced RBAC");
        st.revoked.insert(grant);
    }

    /// Gives a revoked grant back.
    pub fn grant(&self, verb: &str, group: &str, resource: &str) {
        let grant = (verb.to_owned(), group.to_owned(), resource.to_owned());
        self.inner.state.lock().unwrap().revoked.remove(&grant);
    }

    /// Answers `verb` on `resource` with `code` (a Status of kube-apiserver's reason for it)
    /// from now on; `None` stops.
    pub fn fail(&self, verb: &str, resource: &str, code: Option<u16>) {
        let key = (verb.to_owned(), resource.to_owned());
        let mut st = self.inner.state.lock().unwrap();
        match code {
            Some(c) => st.failures.insert(key, c),
            None => st.failures.remove(&key),
        };
    }

    /// Answers the next `throttle.times` requests of `verb` on `resource` (`nodes/status` for
    /// the subresource) with `throttle`, then serves them again.
    pub fn throttle(&self, verb: &str, resource: &str, throttle: Throttle) {
        let key = (verb.to_owned(), resource.to_owned());
        let mut st = self.inner.state.lock().unwrap();
        if throttle.times == 0 {
            st.throttles.remove(&key);
        } else {
            st.throttles.insert(key, throttle);
        }
    }

    /// Every request served so far, in order.
    pub fn requests(&self) -> Vec<Served> {
        self.inner.state.lock().unwrap().requests.clone()
    }

    /// Every (verb, group, resource) requested so far (refused ones included).
    pub fn accesses(&self) -> BTreeSet<Access> {
        self.inner.state.lock().unwrap().accesses.clone()
    }

    /// Every list response served for `resource`, in order.
    pub fn list_pages(&self, resource: &str) -> Vec<ListPage> {
        let st = self.inner.state.lock().unwrap();
        st.pages
            .iter()
            .filter(|p| p.resource == resource)
            .cloned()
            .collect()
    }

    /// (lists, watches) served so far.
    pub fn counts(&self) -> (u64, u64) {
        let st = self.inner.state.lock().unwrap();
        (st.lists, st.watches)
    }

    /// The objects of a resource (Events posted by the agent: `("", "events")`).
    pub fn objects(&self, group: &str, resource: &str) -> Vec<Value> {
        let st = self.inner.state.lock().unwrap();
        st.objects
            .iter()
            .filter(|(k, _)| k.0 == group && k.1 == resource)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn accept_loop(
    listener: std::net::TcpListener,
    inner: Arc<Inner>,
    mut stop: watch::Receiver<bool>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let inner = inner.clone();
                let stop = stop.clone();
                conns.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let inner = inner.clone();
                        let stop = stop.clone();
                        async move { Ok::<_, Infallible>(handle(inner, req, stop).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        }
    }
    // Dropping the set aborts every connection: clients see the server vanish.
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap()
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

async fn handle(
    inner: Arc<Inner>,
    req: Request<hyper::body::Incoming>,
    stop: watch::Receiver<bool>,
) -> Response<Body> {
    let Some(t) = target(req.uri().path()) else {
        return full(
            StatusCode::NOT_FOUND,
            status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        );
    };
    let q = query(&req);
    let watching = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
    let verb = match (req.method().clone(), &t.name, watching) {
        (Method::GET, None, true) => "watch",
        (Method::GET, None, false) => "list",
        (Method::GET, Some(_), _) => "get",
        (Method::POST, _, _) => "create",
        (Method::PATCH, _, _) => "patch",
        (Method::PUT, _, _) => "update",
        (Method::DELETE, _, _) => "delete",
        _ => "unknown",
    };
    let user_agent = req
        .headers()
        .get(hyper::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let served = Served {
        at: Instant::now(),
        verb: verb.to_owned(),
        group: t.group.clone(),
        resource: t.rbac_resource(),
        code: 0,
        user_agent,
        resource_version: q.get("resourceVersion").cloned(),
    };
    let response = respond(&inner, t, verb, q, req, stop).await;
    let mut st = inner.state.lock().unwrap();
    st.requests.push(Served {
        code: response.status().as_u16(),
        ..served
    });
    response
}

/// The reason kube-apiserver gives with a code.
fn reason_of(code: u16) -> &'static str {
    match code {
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        409 => "Conflict",
        410 => "Expired",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    }
}

async fn respond(
    inner: &Arc<Inner>,
    t: Target,
    verb: &str,
    q: BTreeMap<String, String>,
    req: Request<hyper::body::Incoming>,
    stop: watch::Receiver<bool>,
) -> Response<Body> {
    let resource = t.rbac_resource();
    let filter = match Filter::parse(&q, t.namespace.clone()) {
        Ok(f) => f,
        Err(e) => return full(StatusCode::BAD_REQUEST, status(400, "BadRequest", &e)),
    };
    let attributes = Attributes {
        verb: verb.to_owned(),
        group: t.group.clone(),
        resource: resource.clone(),
        namespace: t.namespace.clone(),
        // kube-apiserver's RequestInfo: a list or watch names an object only through an exact
        // metadata.name field selector.
        name: t.name.clone().or_else(|| {
            matches!(verb, "list" | "watch")
                .then(|| {
                    filter
                        .fields
                        .iter()
                        .find(|(k, eq, _)| k == "metadata.name" && *eq)
                        .map(|(_, _, v)| v.clone())
                })
                .flatten()
        }),
    };
    {
        let mut st = inner.state.lock().unwrap();
        // Flow control comes before authorization in kube-apiserver's handler chain.
        let key = (verb.to_owned(), resource.clone());
        if let Some(throttle) = st.throttles.get_mut(&key) {
            let response = throttle.response(verb, &resource);
            throttle.times -= 1;
            if throttle.times == 0 {
                st.throttles.remove(&key);
            }
            return response;
        }
        // Authorization comes next; what is refused is recorded as used all the same (the
        // agent asked for it).
        st.accesses
            .insert((verb.to_owned(), t.group.clone(), resource.clone()));
        let grant = (verb.to_owned(), t.group.clone(), resource.clone());
        if let Some(rbac) = &st.rbac {
            if !rbac.allows(&attributes) || st.revoked.contains(&grant) {
                let body = rbac.forbidden(&attributes);
                st.denied.push(attributes);
                return full(StatusCode::FORBIDDEN, body);
            }
        }
        if let Some(code) = st.failures.get(&(verb.to_owned(), resource.clone())) {
            let code = *code;
            let message = format!("the server cannot {verb} {resource} right now");
            return full(
                StatusCode::from_u16(code).unwrap(),
                status(code, reason_of(code), &message),
            );
        }
    }
    // Field labels are per resource: spec.nodeName exists for Pods only.
    if t.resource != "pods" && filter.fields.iter().any(|(k, _, _)| k == "spec.nodeName") {
        let e = "field label not supported: spec.nodeName";
        return full(StatusCode::BAD_REQUEST, status(400, "BadRequest", e));
    }
    match verb {
        "list" => list(inner, &t, &filter, &q),
        "watch" => watch_stream(inner.clone(), &t, filter, &q, stop),
        "create" => create(inner, t, req).await,
        "patch" => patch_object(inner, t, req).await,
        "get" => {
            let key = (
                t.group,
                t.resource,
                t.namespace.unwrap_or_default(),
                t.name.unwrap_or_default(),
            );
            match inner.state.lock().unwrap().objects.get(&key) {
                Some(o) => full(StatusCode::OK, o.clone()),
                None => full(StatusCode::NOT_FOUND, status(404, "NotFound", "not found")),
            }
        }
        _ => full(
            StatusCode::METHOD_NOT_ALLOWED,
            status(405, "MethodNotAllowed", verb),
        ),
    }
}

/// A running Pod bound to `node`, holding `ips` (none: its IP is not known yet).
pub fn pod(ns: &str, name: &str, node: &str, ips: &[&str]) -> Value {
    let mut status = json!({"phase": "Running"});
    if let Some(first) = ips.first() {
        status["podIP"] = json!(first);
        status["podIPs"] = json!(ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>());
    }
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns},
           "spec": {"nodeName": node, "containers": [{"name": "c", "image": "pause"}]},
           "status": status})
}
