//! The HTTP endpoints: `/metrics`, `/healthz`, `/readyz`, `/status`. Read-only (GET and HEAD),
//! HTTP/1.1 by hyper, on a thread and runtime of its own.
//!
//! With `--netns`, main binds the listening socket *before* entering the namespace: the
//! endpoints then live on the host's network (where Prometheus and the operator are), while the
//! agent watches the namespace.

use super::conns::{Admission, Table};
use super::metrics::{
    encode_openmetrics, encode_prometheus, wants_openmetrics, OPENMETRICS, PROMETHEUS_TEXT,
};
use super::Telemetry;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, Semaphore};

/// Connections held open at once. Every connection is accepted at once; beyond this many, an
/// idle one is closed to make room (see [`super::conns`]), so a client holding connections can
/// never make a probe wait. High enough that a few hundred idle connections are simply held
/// until their header timeout (closing one to make room only makes such a client open another
/// at once), low enough to stay well under the usual soft limit of 1024 open files and to bound
/// the memory they take.
const MAX_CONNECTIONS: usize = 512;
/// A client has this long to send its request headers (also between two requests of a
/// keep-alive connection).
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection lives at most this long (keep-alive included).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);
/// The loop must answer a liveness probe within this.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Binds the listening socket (call before entering a network namespace).
pub fn bind(addr: &str) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serves the endpoints on their own thread until the process exits.
pub fn spawn(listener: TcpListener, telemetry: Arc<Telemetry>) -> std::io::Result<SocketAddr> {
    spawn_with(listener, telemetry, MAX_CONNECTIONS)
}

fn spawn_with(
    listener: TcpListener,
    telemetry: Arc<Telemetry>,
    max_connections: usize,
) -> std::io::Result<SocketAddr> {
    let addr = listener.local_addr()?;
    std::thread::Builder::new()
        .name("nw-http".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the HTTP runtime; no metrics");
                    return;
                }
            };
            rt.block_on(serve(listener, telemetry, max_connections));
        })?;
    Ok(addr)
}

type Conns = Arc<Mutex<Table<oneshot::Sender<()>>>>;

fn lock(conns: &Conns) -> std::sync::MutexGuard<'_, Table<oneshot::Sender<()>>> {
    conns.lock().unwrap_or_else(|e| e.into_inner())
}

async fn serve(listener: TcpListener, telemetry: Arc<Telemetry>, max_connections: usize) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot serve HTTP; no metrics");
            return;
        }
    };
    let conns: Conns = Arc::new(Mutex::new(Table::new(max_connections)));
    // Sockets open at once, those closed to make room and not yet dropped by their task
    // included: under a flood of new connections, accepting waits the moment it takes those
    // tasks to end, so that the open files stay bounded.
    let sockets = Arc::new(Semaphore::new(max_connections + max_connections / 4));
    loop {
        let Ok(socket) = sockets.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (stop_tx, stop_rx) = oneshot::channel();
        let id = match lock(&conns).admit(peer.ip(), stop_tx) {
            Admission::Admitted { id, evicted } => {
                if let Some(stop) = evicted {
                    let _ = stop.send(());
                }
                id
            }
            // Every slot is answering a request: closing this one is all that can be done.
            Admission::Refused => continue,
        };
        let telemetry = telemetry.clone();
        let conns = conns.clone();
        tokio::spawn(async move {
            let table = conns.clone();
            let service = hyper::service::service_fn(move |req| {
                let t = telemetry.clone();
                // Busy until hyper drops the response body, i.e. has written it.
                lock(&table).set_busy(id, true);
                let done = Idle {
                    conns: table.clone(),
                    id,
                };
                async move {
                    let r = handle(&t, req)
                        .await
                        .map(|body| Tracked { body, _done: done });
                    Ok::<_, std::convert::Infallible>(r)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                // A client may shut down its sending side once the request is out (`nc -N`,
                // scripts): answer it anyway. Without this, hyper dropped such a connection
                // unanswered whenever it saw the EOF before writing the response.
                .half_close(true)
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                // Closed to make room for a newer connection (dropping it closes the socket).
                _ = stop_rx => {}
                _ = tokio::time::sleep(CONNECTION_LIFETIME) => {}
            }
            lock(&conns).remove(id);
            drop(socket);
        });
    }
}

/// Marks a connection idle again when dropped (with the response body it travels in).
struct Idle {
    conns: Conns,
    id: u64,
}

impl Drop for Idle {
    fn drop(&mut self) {
        lock(&self.conns).set_busy(self.id, false);
    }
}

/// A response body that keeps its connection busy until hyper is done with it.
struct Tracked {
    body: Full<Bytes>,
    _done: Idle,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

fn response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

const PLAIN: &str = "text/plain; charset=utf-8";

async fn handle(t: &Telemetry, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = response(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "only GET and HEAD\n");
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let head = req.method() == Method::HEAD;
    let mut r = match req.uri().path() {
        "/metrics" => {
            let accept = req
                .headers()
                .get(hyper::header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if wants_openmetrics(accept) {
                response(
                    StatusCode::OK,
                    OPENMETRICS,
                    encode_openmetrics(t.registry()),
                )
            } else {
                response(
                    StatusCode::OK,
                    PROMETHEUS_TEXT,
                    encode_prometheus(t.registry()),
                )
            }
        }
        "/healthz" => {
            if t.ping(PING_TIMEOUT).await {
                response(StatusCode::OK, PLAIN, "ok\n")
            } else if !t.is_started() {
                // The initial dump and sync run before the loop answers probes.
                response(StatusCode::OK, PLAIN, "starting\n")
            } else {
                response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    PLAIN,
                    "the reconcile loop does not answer\n",
                )
            }
        }
        "/readyz" => match t.not_ready_reason() {
            None => response(StatusCode::OK, PLAIN, "ready\n"),
            Some(why) => response(StatusCode::SERVICE_UNAVAILABLE, PLAIN, why + "\n"),
        },
        "/status" => {
            let status = t.board().status();
            let body = serde_json::to_string_pretty(&status).unwrap_or_else(|_| "{}".into());
            response(StatusCode::OK, "application/json", body + "\n")
        }
        "/" => response(
            StatusCode::OK,
            "text/html; charset=utf-8",
            "<html><head><title>netwarden</title></head><body><h1>netwarden</h1><ul>\
             <li><a href=\"/metrics\">/metrics</a></li><li><a href=\"/healthz\">/healthz</a></li>\
             <li><a href=\"/readyz\">/readyz</a></li><li><a href=\"/status\">/status</a></li>\
             </ul></body></html>\n",
        ),
        _ => response(StatusCode::NOT_FOUND, PLAIN, "not found\n"),
    };
    if head {
        *r.body_mut() = Full::new(Bytes::new());
    }
    r
}

/// A plain HTTP/1.1 GET (no TLS, no redirects), for `netwarden status` and the tests: returns
/// the status code and the body.
pub fn get(
    addr: &str,
    path: &str,
    accept: Option<&str>,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    use std::io::{Error, ErrorKind};
    let target = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| Error::new(ErrorKind::InvalidInput, format!("no address for {addr}")))?;
    let mut s = TcpStream::connect_timeout(&target, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nUser-Agent: netwarden\r\n"
    );
    if let Some(a) = accept {
        req.push_str(&format!("Accept: {a}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| Error::new(ErrorKind::InvalidData, "malformed HTTP response"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| Error::new(ErrorKind::InvalidData, "malformed HTTP status line"))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:")
            && l.to_ascii_lowercase().contains("chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((code, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> (Arc<Telemetry>, String) {
        let t = Telemetry::new();
        let addr = spawn(bind("127.0.0.1:0").unwrap(), t.clone()).unwrap();
        (t, addr.to_string())
    }

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn endpoints_answer_and_negotiate_the_format() {
        let (t, addr) = server();
        let (code, body) = get(&addr, "/metrics", None, T).unwrap();
        assert_eq!(code, 200);
        assert!(
            body.contains("# TYPE netwarden_repairs_total counter"),
            "{body}"
        );
        assert!(!body.contains("# EOF"));
        let (code, body) = get(
            &addr,
            "/metrics",
            Some("application/openmetrics-text;version=1.0.0"),
            T,
        )
        .unwrap();
        assert_eq!(code, 200);
        assert!(body.ends_with("# EOF\n"), "{body}");
        assert_eq!(get(&addr, "/readyz", None, T).unwrap().0, 503);
        // Before the loop runs, the probe says "starting".
        assert_eq!(
            get(&addr, "/healthz", None, T).unwrap(),
            (200, "starting\n".into())
        );
        t.set_ready();
        assert_eq!(get(&addr, "/readyz", None, T).unwrap().0, 200);
        // Ready, but nothing answers the loop's pings: unhealthy.
        assert_eq!(get(&addr, "/healthz", None, T).unwrap().0, 503);
        assert_eq!(get(&addr, "/nope", None, T).unwrap().0, 404);
        let (code, body) = get(&addr, "/status", None, T).unwrap();
        assert_eq!(code, 200);
        let s: super::super::status::Status = serde_json::from_str(&body).unwrap();
        assert!(s.ready);
    }

    /// A stand-in for the reconcile loop that answers `pings` probes, then ends.
    fn answer_pings(t: &Telemetry, pings: usize) -> std::thread::JoinHandle<()> {
        let mut rx = t.take_pings().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        std::thread::spawn(move || {
            rt.block_on(async move {
                for _ in 0..pings {
                    if let Some(p) = rx.recv().await {
                        let _ = p.send(());
                    }
                }
            })
        })
    }

    #[test]
    fn healthz_follows_the_loop() {
        let (t, addr) = server();
        t.set_ready();
        let loop_ = answer_pings(&t, 1);
        assert_eq!(
            get(&addr, "/healthz", None, T).unwrap(),
            (200, "ok\n".into())
        );
        loop_.join().unwrap();
    }

    /// Raw bytes to the server; returns what came back (the server must survive all of it).
    fn raw(addr: &str, bytes: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn malformed_requests_are_refused_and_the_server_goes_on() {
        let (_t, addr) = server();
        let garbage = raw(&addr, b"GARBAGE\r\n\r\n");
        assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage:?}");
        let _ = raw(&addr, b"GET /metrics HTTP/9.9\r\n\r\n");
        let post = raw(
            &addr,
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
        );
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        assert!(post.contains("allow: GET, HEAD"), "{post}");
        let huge = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(200_000));
        let r = raw(&addr, huge.as_bytes());
        assert!(r.is_empty() || r.starts_with("HTTP/1.1 4"), "{r}");
        let head = raw(
            &addr,
            b"HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(!head.contains("# TYPE"));
        assert_eq!(raw(&addr, b""), "");
        // Still serving.
        assert_eq!(get(&addr, "/readyz", None, T).unwrap().0, 503);
    }

    /// The kubelet's liveness probe: a new connection, one GET, failed after `timeoutSeconds`
    /// (3 in deploy/base). Other clients hold 300 connections that send nothing and 100 that
    /// stopped half-way through their headers, far more than the server holds (64 here, to
    /// keep the test's file descriptors few): it closes them to make room, they do not make the
    /// probe wait. (On a server that accepted only 64 connections at once and left the others
    /// in the listen backlog, every probe timed out.)
    #[test]
    fn probes_are_answered_while_hundreds_of_connections_are_held() {
        let t = Telemetry::new();
        let addr = spawn_with(bind("127.0.0.1:0").unwrap(), t.clone(), 64)
            .unwrap()
            .to_string();
        t.set_ready();
        let loop_ = answer_pings(&t, 20);
        let mut held = Vec::new();
        for i in 0..400 {
            let mut s = TcpStream::connect(&addr).unwrap();
            if i >= 300 {
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: slow\r\nX-Slow: a")
                    .unwrap();
            }
            held.push(s);
        }
        for _ in 0..20 {
            let probe = get(&addr, "/healthz", None, Duration::from_secs(3));
            assert_eq!(probe.unwrap(), (200, "ok\n".into()));
        }
        loop_.join().unwrap();
        drop(held);
    }

    #[test]
    fn chunked_bodies_are_decoded() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            "hello world"
        );
    }
}
