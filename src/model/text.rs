//! Text that came from outside (a file, the kernel, the API server, another process) made safe
//! to print in a line of text: one helper, used by the text log formatter
//! ([`crate::telemetry::logfmt`]) and wherever such text is printed or put into a message.

use std::fmt::{self, Write};

/// Whether a character must not reach a text log as it is.
pub fn must_escape(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{200b}'..='\u{200f}' // zero-width characters, LTR/RTL marks
            | '\u{2028}'..='\u{202e}' // line/paragraph separators, bidi embeddings and overrides
            | '\u{2060}'..='\u{206f}' // word joiner, invisible operators, bidi isolates
            | '\u{feff}') // zero-width no-break space
}

/// Writes what it is given with [`must_escape`] characters escaped.
pub struct Escaped<W>(pub W);

impl<W: Write> Write for Escaped<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(at) = rest.find(must_escape) {
            self.0.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().unwrap_or_default();
            for e in c.escape_debug() {
                self.0.write_char(e)?;
            }
            rest = &rest[at + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

/// `text` with [`must_escape`] characters escaped.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let _ = Escaped(&mut out).write_str(text);
    out
}

/// The name given to a process whose name is unknown (or empty).
pub const UNKNOWN_PROCESS: &str = "unknown";

/// A process name fit for logs and label values: printable, at most 15 bytes (the kernel's
/// TASK_COMM_LEN - 1), never empty.
pub fn clean_name(comm: &str) -> String {
    let name: String = comm
        .trim_end_matches('\n')
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(15)
        .collect();
    if name.is_empty() {
        UNKNOWN_PROCESS.to_string()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_could_forge_or_hide_text() {
        assert_eq!(escape("plain text, ünïcode"), "plain text, ünïcode");
        assert_eq!(
            escape("eni1\n2026-01-01T00:00:00Z  INFO netwarden: forged"),
            "eni1\\n2026-01-01T00:00:00Z  INFO netwarden: forged"
        );
        assert_eq!(escape("a\r\tb\u{1b}[31m"), "a\\r\\tb\\u{1b}[31m");
        assert_eq!(escape("x\u{202e}gpj.exe"), "x\\u{202e}gpj.exe");
        assert_eq!(escape("\u{85}\u{2028}"), "\\u{85}\\u{2028}");
    }
}
