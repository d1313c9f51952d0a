//! Text logs that nothing logged can forge: every field of every event (the message too) goes
//! through [`Escaped`], which writes control characters (newline, carriage return, escape, …)
//! and the invisible Unicode characters that reorder or hide text (bidi overrides, zero-width
//! characters, line separators) as Rust escapes (`\n`, `\u{1b}`, `\u{202e}`). A name from a
//! state file, an interface or process name, a config key or an API server message can then
//! neither start a line of its own that reads like one of the agent's nor recolour or rewrite
//! the terminal it is read on.
//!
//! Done once for all fields, not at each call site, so that no new log line can forget it. JSON
//! logs need none of this: their encoder escapes every string.

pub use crate::model::text::{escape, must_escape, Escaped};
use std::fmt::{self, Write};
use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::FormatFields;

/// The fields of a text log line, as tracing-subscriber's default formatter writes them
/// (`message key=value key="string"`), escaped.
#[derive(Clone, Copy, Debug, Default)]
pub struct EscapedFields;

impl<'writer> FormatFields<'writer> for EscapedFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut visitor = Visitor {
            writer: &mut writer,
            result: Ok(()),
            first: true,
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct Visitor<'a, 'w> {
    writer: &'a mut Writer<'w>,
    result: fmt::Result,
    first: bool,
}

impl Visit for Visitor<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        let separator = if std::mem::take(&mut self.first) {
            ""
        } else {
            " "
        };
        let name = field.name();
        let name = name.strip_prefix("r#").unwrap_or(name);
        self.result = if name == "message" {
            write!(self.writer, "{separator}")
        } else {
            write!(self.writer, "{separator}{name}=")
        }
        .and_then(|()| write!(Escaped(&mut *self.writer), "{value:?}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_field_of_a_text_line_is_escaped() {
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || buf.clone())
            .with_ansi(false)
            .without_time()
            .fmt_fields(EscapedFields)
            .finish();
        let name = "pods\nINFO netwarden: forged";
        let error = std::io::Error::other("bad \u{1b}[2J");
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(name = %name, debug = ?name, plain = name, count = 3, error = %error, "restored {}", "a\u{1b}b");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(
            text.contains(concat!(
                r#"restored a\u{1b}b name=pods\nINFO netwarden: forged "#,
                r#"debug="pods\nINFO netwarden: forged" plain="pods\nINFO netwarden: forged" "#,
                r#"count=3 error=bad \u{1b}[2J"#
            )),
            "{text}"
        );
    }
}
