//! Reads a Kubernetes list response (`{"kind": …, "metadata": {…}, "items": [ … ]}`) as it
//! arrives, one item at a time. Pure and incremental: fed the body's chunks, it hands each item
//! to the caller as soon as its last byte is in, and keeps at most one partial item.
//!
//! Why: a list served from the API server's watch cache (`resourceVersion=0`) ignores `limit`,
//! so it is one response holding every object — about 3 KB per Service as kubectl leaves them
//! (managedFields, the last-applied annotation), 150 MB for 50,000. Buffering that body, as a
//! plain `Api::list` does, would exceed the agent's memory limit several times over; read this
//! way, each item is turned into the few fields the agent keeps and dropped.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use thiserror::Error;

/// The list's own metadata.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct ListMeta {
    #[serde(rename = "resourceVersion", default)]
    pub resource_version: String,
    /// More pages follow (a paginated list).
    #[serde(rename = "continue", default)]
    pub continue_token: Option<String>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ListError {
    #[error("list response is not JSON at byte {at}: {what}")]
    Syntax { at: usize, what: String },
    #[error("list response ends before it is complete")]
    Truncated,
    #[error("list item {index} does not parse: {message}")]
    Item { index: usize, message: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    /// Before the opening `{`.
    Start,
    /// Expecting a key (or `}`).
    Key {
        first: bool,
    },
    /// After a key, expecting `:` then its value.
    Value(String),
    /// Inside `items`, expecting an item, `,` or `]`.
    Items {
        first: bool,
    },
    /// After a value, expecting `,` or `}`.
    After,
    Done,
}

/// An incremental reader of one list response.
pub struct ListReader {
    buf: Vec<u8>,
    /// Everything before this is consumed.
    pos: usize,
    /// Bytes dropped from the front of `buf` so far (for error positions).
    dropped: usize,
    state: State,
    meta: ListMeta,
    items: usize,
}

impl Default for ListReader {
    fn default() -> Self {
        ListReader {
            buf: Vec::new(),
            pos: 0,
            dropped: 0,
            state: State::Start,
            meta: ListMeta::default(),
            items: 0,
        }
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// The end (exclusive) of the JSON value starting at `buf[start]`, if it is complete in `buf`.
/// Only the structure is checked here (brackets and strings); serde checks the rest.
fn value_end(buf: &[u8], start: usize) -> Result<Option<usize>, String> {
    let Some(&first) = buf.get(start) else {
        return Ok(None);
    };
    match first {
        b'"' => Ok(string_end(buf, start)),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = start;
            while i < buf.len() {
                match buf[i] {
                    b'"' => match string_end(buf, i) {
                        Some(end) => {
                            i = end;
                            continue;
                        }
                        None => return Ok(None),
                    },
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Ok(Some(i + 1));
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            Ok(None)
        }
        b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => {
            // A scalar ends at a delimiter, which always follows inside an object.
            Ok(buf[start..]
                .iter()
                .position(|b| matches!(b, b',' | b'}' | b']') || is_ws(*b))
                .map(|n| start + n))
        }
        other => Err(format!("unexpected `{}`", other as char)),
    }
}

/// The end (exclusive) of the string starting at `buf[start]` (a `"`), if complete.
fn string_end(buf: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    while i < buf.len() {
        match buf[i] {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

impl ListReader {
    pub fn new() -> ListReader {
        ListReader::default()
    }

    fn syntax(&self, what: impl Into<String>) -> ListError {
        ListError::Syntax {
            at: self.dropped + self.pos,
            what: what.into(),
        }
    }

    /// The next byte that is not whitespace, consuming the whitespace.
    fn peek(&mut self) -> Option<u8> {
        while self.pos < self.buf.len() && is_ws(self.buf[self.pos]) {
            self.pos += 1;
        }
        self.buf.get(self.pos).copied()
    }

    /// Feeds a chunk of the body; `item` gets every item completed by it, in order.
    pub fn feed<T: DeserializeOwned>(
        &mut self,
        chunk: &[u8],
        mut item: impl FnMut(T),
    ) -> Result<(), ListError> {
        // Drop what is consumed before growing, so the buffer holds at most one partial item
        // and one chunk.
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.dropped += self.pos;
            self.pos = 0;
        }
        self.buf.extend_from_slice(chunk);
        while self.step(&mut item)? {}
        Ok(())
    }

    /// One step of the state machine; false when more input is needed (or the list is done).
    fn step<T: DeserializeOwned>(&mut self, item: &mut impl FnMut(T)) -> Result<bool, ListError> {
        let Some(b) = self.peek() else {
            return Ok(false);
        };
        match std::mem::replace(&mut self.state, State::Done) {
            State::Start if b == b'{' => {
                self.pos += 1;
                self.state = State::Key { first: true };
            }
            State::Start => return Err(self.syntax("a list is an object")),
            State::Key { first: true } if b == b'}' => {
                self.pos += 1;
                self.state = State::Done;
            }
            State::Key { first } if b == b'"' => {
                let Some(end) = string_end(&self.buf, self.pos) else {
                    self.state = State::Key { first };
                    return Ok(false);
                };
                let key: String = serde_json::from_slice(&self.buf[self.pos..end])
                    .map_err(|e| self.syntax(e.to_string()))?;
                self.pos = end;
                self.state = State::Value(key);
            }
            State::Key { .. } => return Err(self.syntax("expected a key")),
            State::Value(key) => return self.value(b, key),
            State::Items { first } => match b {
                b']' => {
                    self.pos += 1;
                    self.state = State::After;
                }
                b',' if !first => {
                    self.pos += 1;
                    self.state = State::Items { first: true };
                }
                _ => return self.item(first, item),
            },
            State::After => match b {
                b',' => {
                    self.pos += 1;
                    self.state = State::Key { first: false };
                }
                b'}' => {
                    self.pos += 1;
                    self.state = State::Done;
                }
                _ => return Err(self.syntax("expected `,` or `}`")),
            },
            State::Done => return Err(self.syntax("data after the end of the list")),
        }
        Ok(true)
    }

    /// At `b`, after a key: the `:` and its value. `items` opens the item list; `metadata` is
    /// kept; other values are skipped whole.
    fn value(&mut self, b: u8, key: String) -> Result<bool, ListError> {
        if b != b':' {
            return Err(self.syntax("expected `:`"));
        }
        // Look past the colon without consuming it until the value is in.
        let colon = self.pos;
        self.pos += 1;
        let Some(v) = self.peek() else {
            self.pos = colon;
            self.state = State::Value(key);
            return Ok(false);
        };
        if key == "items" && v == b'[' {
            self.pos += 1;
            self.state = State::Items { first: true };
            return Ok(true);
        }
        let end = match value_end(&self.buf, self.pos) {
            Ok(Some(end)) => end,
            Ok(None) => {
                self.pos = colon;
                self.state = State::Value(key);
                return Ok(false);
            }
            Err(e) => return Err(self.syntax(e)),
        };
        if key == "metadata" {
            self.meta = serde_json::from_slice(&self.buf[self.pos..end])
                .map_err(|e| self.syntax(format!("metadata: {e}")))?;
        }
        self.pos = end;
        self.state = State::After;
        Ok(true)
    }

    /// One item of the list, handed to `item` once it is all in.
    fn item<T: DeserializeOwned>(
        &mut self,
        first: bool,
        item: &mut impl FnMut(T),
    ) -> Result<bool, ListError> {
        let end = match value_end(&self.buf, self.pos) {
            Ok(Some(end)) => end,
            Ok(None) => {
                self.state = State::Items { first };
                return Ok(false);
            }
            Err(e) => return Err(self.syntax(e)),
        };
        let parsed =
            serde_json::from_slice(&self.buf[self.pos..end]).map_err(|e| ListError::Item {
                index: self.items,
                message: e.to_string(),
            })?;
        self.items += 1;
        self.pos = end;
        self.state = State::Items { first: false };
        item(parsed);
        Ok(true)
    }

    /// The body ended: the list's metadata, or an error if it was cut short.
    pub fn finish(mut self) -> Result<ListMeta, ListError> {
        if self.state != State::Done {
            return Err(ListError::Truncated);
        }
        match self.peek() {
            None => Ok(self.meta),
            Some(_) => Err(self.syntax("data after the end of the list")),
        }
    }

    /// Items read so far.
    pub fn items(&self) -> usize {
        self.items
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[derive(Debug, Deserialize, PartialEq)]
    struct Item {
        metadata: Meta,
    }
    #[derive(Debug, Deserialize, PartialEq)]
    struct Meta {
        name: String,
    }

    fn body(n: usize) -> String {
        let items: Vec<Value> = (0..n)
            .map(|i| {
                json!({"metadata": {"name": format!("s{i}"),
                  "annotations": {"x": "a \"quoted\" } ] { [ value\\"},
                  "managedFields": [{"fieldsV1": {"f:spec": {"f:ports": {}}}}]},
                  "spec": {"n": [1, 2.5, -3e2, true, false, null]}})
            })
            .collect();
        json!({"kind": "ServiceList", "apiVersion": "v1",
               "metadata": {"resourceVersion": "4711", "continue": "tok"},
               "items": items})
        .to_string()
    }

    fn read_in_chunks(text: &str, size: usize) -> Result<(Vec<String>, ListMeta), ListError> {
        let mut r = ListReader::new();
        let mut names = Vec::new();
        for chunk in text.as_bytes().chunks(size) {
            r.feed(chunk, |i: Item| names.push(i.metadata.name))?;
        }
        Ok((names, r.finish()?))
    }

    #[test]
    fn items_and_metadata_whatever_the_chunks() {
        let text = body(7);
        let want: Vec<String> = (0..7).map(|i| format!("s{i}")).collect();
        for size in [1, 2, 3, 7, 64, 1000, text.len()] {
            let (names, meta) = read_in_chunks(&text, size).unwrap();
            assert_eq!(names, want, "chunks of {size}");
            assert_eq!(meta.resource_version, "4711");
            assert_eq!(meta.continue_token.as_deref(), Some("tok"));
        }
    }

    #[test]
    fn keys_in_any_order_whitespace_and_empty_lists() {
        let text = "{ \"items\" : [ {\"metadata\":{\"name\":\"a\"}} ,\n {\"metadata\":{\"name\":\"b\"}} ] ,\r\n \"metadata\" : { \"resourceVersion\" : \"9\" } , \"kind\":\"X\" }";
        let (names, meta) = read_in_chunks(text, 5).unwrap();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(meta.resource_version, "9");
        assert_eq!(meta.continue_token, None);
        let (names, meta) = read_in_chunks("{\"metadata\":{},\"items\":[]}", 3).unwrap();
        assert!(names.is_empty());
        assert_eq!(meta, ListMeta::default());
        // `items: null`, as Go encodes a nil slice.
        let (names, _) = read_in_chunks("{\"items\":null}", 4).unwrap();
        assert!(names.is_empty());
    }

    #[test]
    fn truncated_and_malformed_bodies_are_errors() {
        let text = body(3);
        for cut in [0, 1, 10, text.len() / 2, text.len() - 1] {
            assert!(read_in_chunks(&text[..cut], 16).is_err(), "cut at {cut}");
        }
        assert!(matches!(
            read_in_chunks("[1,2]", 2),
            Err(ListError::Syntax { .. })
        ));
        assert!(matches!(
            read_in_chunks("{\"items\":[{\"metadata\":{}}]}", 2),
            Err(ListError::Item { index: 0, .. })
        ));
        assert!(read_in_chunks("{\"items\":[]} x", 2).is_err());
        assert!(read_in_chunks("{\"a\" 1}", 2).is_err());
    }

    #[test]
    fn the_buffer_holds_about_one_item() {
        let text = body(2_000);
        let mut r = ListReader::new();
        let mut n = 0;
        let mut largest = 0;
        for chunk in text.as_bytes().chunks(8192) {
            r.feed(chunk, |_: Item| n += 1).unwrap();
            largest = largest.max(r.buf.len());
        }
        assert_eq!(n, 2_000);
        assert!(largest < 8192 + 1024, "{largest} bytes buffered");
        r.finish().unwrap();
    }
}
