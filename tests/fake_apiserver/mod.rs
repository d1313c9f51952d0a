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

mod rbac;
pub use rbac::{Attributes, Rbac};

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
    /// 429, or 503 (a server shutting down or not ready).
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
        let mut body = status(
            self.code,
            reason_of(self.code),
            &format!("Too many requests: the server cannot {verb} {resource} right now"),
        );
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

/// What a request path names.
struct Target {
    group: String,
    version: String,
    namespace: Option<String>,
    resource: String,
    name: Option<String>,
    /// `status` of `nodes/NAME/status`.
    subresource: Option<String>,
}

impl Target {
    /// `resource` or `resource/subresource`, as RBAC names it.
    fn rbac_resource(&self) -> String {
        match &self.subresource {
            Some(sub) => format!("{}/{sub}", self.resource),
            None => self.resource.clone(),
        }
    }
}

fn target(path: &str) -> Option<Target> {
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

fn kind_of(resource: &str) -> &'static str {
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

fn query(req: &Request<hyper::body::Incoming>) -> BTreeMap<String, String> {
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

fn decode(s: &str) -> String {
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
type LabelReq = (String, Option<(bool, String)>, bool);

/// Field and label selectors.
struct Filter {
    namespace: Option<String>,
    fields: Vec<(String, bool, String)>,
    labels: Vec<LabelReq>,
}

impl Filter {
    fn parse(q: &BTreeMap<String, String>, namespace: Option<String>) -> Result<Filter, String> {
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

    fn matches(&self, key: &Key, object: &Value) -> bool {
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

/// A continue token: the snapshot's resourceVersion and the last key served. The real server's
/// is base64 JSON; clients treat it as opaque, so hex of the same JSON does.
fn continue_token(rv: u64, last: &Key) -> String {
    let text = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": [last.0, last.1, last.2, last.3]})
        .to_string();
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

fn parse_continue(token: &str) -> Option<(u64, Key)> {
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
struct Items {
    json: Vec<u8>,
    count: usize,
}

/// One page of `map`'s matching objects after `after`: the items, the last key served, and how
/// many match beyond it.
fn page_of(
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

fn list(
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

fn line(kind: &str, object: &Value) -> Bytes {
    let mut s = json!({"type": kind, "object": object}).to_string();
    s.push('\n');
    Bytes::from(s)
}

fn watch_stream(
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

async fn create(inner: &Inner, t: Target, req: Request<hyper::body::Incoming>) -> Response<Body> {
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
async fn patch_object(
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
