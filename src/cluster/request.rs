//! Requests to the API server through kube's client, with the answer's headers kept: kube's
//! typed calls turn an error response into its Status and drop the `Retry-After` a throttling
//! server sends, which [`super::retry`] needs. So the agent sends the requests kube builds and
//! reads the answers itself: an error response becomes its [`Failure`], a watch's body a stream
//! of events.

use super::retry::Failure;
use http_body_util::BodyExt;
use kube::api::WatchEvent;
use kube::client::Body;
use kube::Client;
use serde::de::DeserializeOwned;

/// Sends `request`; a response with an error code is its [`Failure`] (with what its
/// `Retry-After` asks for).
pub async fn send(
    client: &Client,
    request: http::Request<Vec<u8>>,
) -> Result<http::Response<Body>, Failure> {
    let response = client
        .send(request.map(Body::from))
        .await
        .map_err(|e| Failure::of(&e))?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let wait = response
        .headers()
        .get(http::header::RETRY_AFTER)
        .map(|v| v.as_bytes().to_vec());
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| Failure::of(&e))?
        .to_bytes();
    Err(Failure::of_response(
        status.as_u16(),
        wait.as_deref(),
        &body,
    ))
}

/// The longest watch event line read. etcd refuses objects over 1.5 MiB by default, so a
/// real event is far shorter; a body that never ends its line must not grow the agent's memory
/// without bound (the watch is dropped and started again).
const MAX_EVENT: usize = 16 << 20;

/// A watch response's body read as newline-delimited events.
pub struct EventStream {
    body: Body,
    lines: Lines,
}

impl EventStream {
    pub fn new(response: http::Response<Body>) -> EventStream {
        EventStream {
            body: response.into_body(),
            lines: Lines::default(),
        }
    }

    /// The next event; `None` when the server ended the watch. An `ERROR` event is returned as
    /// it came (the caller reads its Status); a line that is a bare Status is its failure.
    pub async fn next<O: DeserializeOwned>(&mut self) -> Result<Option<WatchEvent<O>>, Failure> {
        loop {
            if let Some(line) = self.lines.next() {
                return event(&line).map(Some);
            }
            match self.body.frame().await {
                // A partial last line is dropped: the watch ended inside it.
                None => return Ok(None),
                Some(frame) => {
                    if let Ok(data) = frame.map_err(|e| Failure::of(&e))?.into_data() {
                        self.lines.feed(&data);
                    }
                    if self.lines.pending() > MAX_EVENT {
                        return Err(Failure::Unreachable(format!(
                            "watch event longer than {MAX_EVENT} bytes"
                        )));
                    }
                }
            }
        }
    }
}

fn event<O: DeserializeOwned>(line: &[u8]) -> Result<WatchEvent<O>, Failure> {
    serde_json::from_slice(line).map_err(|e| {
        match serde_json::from_slice::<kube::core::Status>(line) {
            Ok(s) if s.code != 0 => Failure::of_response(s.code, None, line),
            _ => Failure::Unreachable(format!("watch event does not parse: {e}")),
        }
    })
}

/// Splits bytes into lines as they arrive. Pure.
#[derive(Default)]
struct Lines {
    buf: Vec<u8>,
    /// Everything before this is handed out.
    start: usize,
}

impl Lines {
    fn feed(&mut self, chunk: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(chunk);
    }

    /// Bytes received and not yet handed out as a line.
    fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete line that is not blank, without its end.
    fn next(&mut self) -> Option<Vec<u8>> {
        loop {
            let rest = &self.buf[self.start..];
            let n = rest.iter().position(|b| *b == b'\n')?;
            let line = rest[..n].trim_ascii().to_vec();
            self.start += n + 1;
            if !line.is_empty() {
                return Some(line);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Service;

    #[test]
    fn lines_whatever_the_chunks() {
        let text = b"{\"a\":1}\n\n {\"b\":2}\r\n{\"c\":";
        for size in [1, 2, 5, text.len()] {
            let mut l = Lines::default();
            let mut got = Vec::new();
            for chunk in text.chunks(size) {
                l.feed(chunk);
                while let Some(line) = l.next() {
                    got.push(String::from_utf8(line).unwrap());
                }
            }
            assert_eq!(got, ["{\"a\":1}", "{\"b\":2}"], "chunks of {size}");
            // The partial line waits for its end.
            l.feed(b"3}\n");
            assert_eq!(l.next().as_deref(), Some(&b"{\"c\":3}"[..]));
            assert_eq!(l.next(), None);
            assert_eq!(l.pending(), 0);
        }
        let mut l = Lines::default();
        l.feed(b"{\"a\":1}\n{\"b\"");
        assert!(l.next().is_some());
        assert_eq!(l.pending(), 4, "what waits for its line end");
    }

    #[test]
    fn events_and_error_lines() {
        let added = br#"{"type":"ADDED","object":{"apiVersion":"v1","kind":"Service","metadata":{"name":"a","resourceVersion":"7"}}}"#;
        match event::<Service>(added) {
            Ok(WatchEvent::Added(s)) => assert_eq!(s.metadata.name.as_deref(), Some("a")),
            other => panic!("{other:?}"),
        }
        let gone = br#"{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"too old resource version","reason":"Expired","code":410}}"#;
        assert!(matches!(
            event::<Service>(gone),
            Ok(WatchEvent::Error(s)) if s.code == 410
        ));
        let status = br#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"internal","reason":"InternalError","code":500}"#;
        assert!(matches!(
            event::<Service>(status),
            Err(Failure::Answered { code: 500, .. })
        ));
        assert!(matches!(
            event::<Service>(b"not json"),
            Err(Failure::Unreachable(_))
        ));
    }
}
