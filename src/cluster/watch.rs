//! List-and-watch of one kind of object into a [`Cache`] of what the agent keeps of each (a
//! projection: a few fields, or nothing for objects no template selects). The agent's own loop
//! rather than kube-runtime's watcher, for three reasons:
//!
//! - the list is read as it arrives ([`super::listing`]): a `resourceVersion=0` list is served
//!   from the API server's watch cache in one response, which must not be buffered whole;
//! - the retry delay depends on what went wrong ([`super::retry`]): promptly while the server is
//!   unreachable, so facts are current about a second after it answers again; a 410 relists at
//!   once; errors the server answers back off to 30 s and stay backed off across a list that
//!   succeeds before a watch that fails; a 429 or 5xx waits at least its `Retry-After`
//!   ([`super::request`] keeps the header that kube's typed calls drop);
//! - failures are told with what the server said (`forbidden: … list services …`) and counted.
//!
//! As client-go's reflector: the list asks for `resourceVersion=0` (any version: the watch cache
//! answers, with the whole list in one response); after a 410 (a watch or a continue token too
//! old) the next list asks for the most recent version (`resourceVersion` unset, from etcd, in
//! pages of 500 of one snapshot), since the cache that served the last list may be behind; the
//! watch resumes from the list's resourceVersion with bookmarks and is re-opened when the
//! server ends it.

use super::cache::key_hash;
pub use super::cache::Cache;
pub use super::health::Health;
use super::listing::ListReader;
use super::request;
use super::retry::{Backoff, Failure};
use super::slim::Object;
use http_body_util::BodyExt;
use kube::api::{ListParams, WatchEvent, WatchParams};
use kube::Client;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tracing::info;

/// Page size of a list from etcd.
const PAGE: u32 = 500;
/// A list that has not completed by then is abandoned (the API server's own request timeout
/// is one minute).
const LIST_TIMEOUT: Duration = Duration::from_secs(90);
/// The server ends a watch after this; a watch silent for longer than it plus a margin is dead.
const WATCH_SECONDS: u32 = 290;
const WATCH_IDLE: Duration = Duration::from_secs(WATCH_SECONDS as u64 + 30);

/// Where and what to watch.
#[derive(Clone, Debug)]
pub struct Target {
    /// The resource, for logs and metrics (`services`).
    pub resource: &'static str,
    /// The collection's URL path (`/api/v1/services`).
    pub path: String,
    pub fields: Option<String>,
    pub labels: Option<String>,
}

/// What the watches share.
#[derive(Clone)]
pub struct Context {
    pub client: Client,
    pub health: Arc<Health>,
    /// Woken on every change of the cache and when it is (re)listed or fails.
    pub notify: Arc<Notify>,
    /// Shrinks every retry delay (tests).
    pub backoff_scale: f64,
}

/// Starts watching `target` into a new cache; `project` turns an object into what is kept
/// (`None`: nothing, and any earlier version is dropped).
pub fn spawn<O, I, P>(
    target: Target,
    ctx: Context,
    project: P,
) -> (Arc<Cache<I>>, tokio::task::JoinHandle<()>)
where
    O: Object,
    I: Clone + PartialEq + Send + Sync + 'static,
    P: Fn(O) -> Option<I> + Send + Sync + 'static,
{
    let cache = Cache::new();
    let task = tokio::spawn(run(target, ctx, project, cache.clone()));
    (cache, task)
}

async fn run<O, I, P>(target: Target, ctx: Context, project: P, cache: Arc<Cache<I>>)
where
    O: Object,
    I: Clone + PartialEq + Send + Sync + 'static,
    P: Fn(O) -> Option<I> + Send + Sync + 'static,
{
    let mut backoff = Backoff::new(ctx.backoff_scale);
    let mut version: Option<String> = None;
    // After a 410: the cache that served the last list may be behind; read from etcd once.
    let mut most_recent = false;
    loop {
        let (verb, result) = match &version {
            None => {
                let started = Instant::now();
                let r = list(&ctx.client, &target, &project, &cache, most_recent).await;
                if let Ok((_, n)) = &r {
                    info!(
                        resource = target.resource,
                        objects = n,
                        kept = cache.snapshot().len(),
                        took_ms = started.elapsed().as_millis() as u64,
                        "listed"
                    );
                    most_recent = false;
                }
                ("list", r.map(|(v, _)| Some(v)))
            }
            Some(from) => {
                let r = watch(&ctx, &target, &project, &cache, from, &mut backoff).await;
                ("watch", r)
            }
        };
        match result {
            Ok(Some(v)) => {
                version = Some(v);
                ctx.health.ok(target.resource);
                ctx.notify.notify_one();
            }
            // The watch ended normally (its timeout): open it again from where it was.
            Ok(None) => {}
            Err((f, resume)) => {
                if f == Failure::Expired {
                    most_recent = true;
                    version = None;
                } else if let Some(v) = resume {
                    version = Some(v);
                }
                let delay = backoff.after(&f);
                ctx.health.failed(target.resource, verb, &f, delay);
                if f != Failure::Expired && cache.set_failing(true) {
                    ctx.notify.notify_one();
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

type Outcome<T> = Result<T, (Failure, Option<String>)>;

/// Lists every page into the cache; the list's resourceVersion and the objects read.
async fn list<O, I, P>(
    client: &Client,
    target: &Target,
    project: &P,
    cache: &Cache<I>,
    most_recent: bool,
) -> Outcome<(String, usize)>
where
    O: Object,
    I: Clone + PartialEq,
    P: Fn(O) -> Option<I>,
{
    // What a relist saw, by the hash of its key (8 bytes a Service rather than its key: a
    // collision, one in 2^64, would keep a deleted object until the next relist). The first
    // list has nothing to forget.
    let relist = cache.begin_relist();
    let mut seen = HashSet::new();
    let mut token: Option<String> = None;
    let mut objects = 0;
    loop {
        let mut lp = ListParams {
            label_selector: target.labels.clone(),
            field_selector: target.fields.clone(),
            limit: Some(PAGE),
            continue_token: token.clone(),
            ..ListParams::default()
        };
        if token.is_none() && !most_recent {
            // Any version, from the watch cache, which answers with everything at once
            // (kube-core leaves `resourceVersion=0` out when a limit is set).
            lp.resource_version = Some("0".to_owned());
            lp.limit = None;
        }
        let page = tokio::time::timeout(
            LIST_TIMEOUT,
            list_page(client, target, &lp, |o: O| {
                let key = o.meta().key();
                if relist {
                    seen.insert(key_hash(&key));
                }
                objects += 1;
                cache.put(key, project(o));
            }),
        )
        .await
        .map_err(|_| (Failure::Timeout, None))?
        .map_err(|f| (f, None))?;
        match page.continue_token {
            Some(t) if !t.is_empty() => token = Some(t),
            _ => {
                cache.end_relist(relist.then_some(&seen));
                return Ok((page.resource_version, objects));
            }
        }
    }
}

async fn list_page<O: Object>(
    client: &Client,
    target: &Target,
    lp: &ListParams,
    mut each: impl FnMut(O),
) -> Result<super::listing::ListMeta, Failure> {
    let request = kube::core::Request::new(&target.path)
        .list(lp)
        .map_err(|e| Failure::Unreachable(e.to_string()))?;
    let mut body = request::send(client, request).await?.into_body();
    let mut reader = ListReader::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Failure::of(&e))?;
        if let Ok(data) = frame.into_data() {
            reader
                .feed(&data, &mut each)
                .map_err(|e| Failure::Unreachable(format!("list of {}: {e}", target.resource)))?;
        }
    }
    reader
        .finish()
        .map_err(|e| Failure::Unreachable(format!("list of {}: {e}", target.resource)))
}

/// Watches from `from` until the server ends the watch (`Ok(None)`), or it fails (with the
/// version to resume from). Delivered changes go into the cache as they come.
async fn watch<O, I, P>(
    ctx: &Context,
    target: &Target,
    project: &P,
    cache: &Cache<I>,
    from: &str,
    backoff: &mut Backoff,
) -> Outcome<Option<String>>
where
    O: Object,
    I: Clone + PartialEq,
    P: Fn(O) -> Option<I>,
{
    let wp = WatchParams {
        label_selector: target.labels.clone(),
        field_selector: target.fields.clone(),
        timeout: Some(WATCH_SECONDS),
        bookmarks: true,
        ..WatchParams::default()
    };
    let mut version = from.to_owned();
    let request = kube::core::Request::new(&target.path)
        .watch(&wp, from)
        .map_err(|e| (Failure::Unreachable(e.to_string()), Some(version.clone())))?;
    let response = tokio::time::timeout(LIST_TIMEOUT, request::send(&ctx.client, request))
        .await
        .map_err(|_| (Failure::Timeout, Some(version.clone())))?
        .map_err(|f| (f, Some(version.clone())))?;
    let mut stream = request::EventStream::new(response);
    // The server took the watch: it answers.
    ctx.health.ok(target.resource);
    if cache.set_failing(false) {
        ctx.notify.notify_one();
    }
    loop {
        let next = tokio::time::timeout(WATCH_IDLE, stream.next::<O>()).await;
        let event = match next {
            Err(_) => {
                let f = Failure::Unreachable("watch silent past its timeout".into());
                return Err((f, Some(version)));
            }
            Ok(Err(f)) => return Err((f, Some(version))),
            Ok(Ok(None)) => {
                backoff.healthy();
                return Ok(None);
            }
            Ok(Ok(Some(event))) => event,
        };
        backoff.healthy();
        let changed =
            apply(event, project, cache, &mut version).map_err(|f| (f, Some(version.clone())))?;
        if changed {
            ctx.notify.notify_one();
        }
    }
}

/// One watch event into the cache; whether the cache changed. Every event carries the version
/// to resume from; an error event ends the watch.
fn apply<O, I, P>(
    event: WatchEvent<O>,
    project: &P,
    cache: &Cache<I>,
    version: &mut String,
) -> Result<bool, Failure>
where
    O: Object,
    I: Clone + PartialEq,
    P: Fn(O) -> Option<I>,
{
    match event {
        WatchEvent::Added(o) | WatchEvent::Modified(o) => {
            let meta = o.meta();
            *version = meta.resource_version.to_owned();
            let key = meta.key();
            Ok(cache.put(key, project(o)))
        }
        WatchEvent::Deleted(o) => {
            let meta = o.meta();
            *version = meta.resource_version.to_owned();
            Ok(cache.put(meta.key(), None))
        }
        WatchEvent::Bookmark(b) => {
            *version = b.metadata.resource_version;
            Ok(false)
        }
        WatchEvent::Error(s) if s.code == 410 => Err(Failure::Expired),
        WatchEvent::Error(s) => Err(Failure::Answered {
            code: s.code,
            reason: s.reason,
            message: s.message,
            retry_after: None,
        }),
    }
}
