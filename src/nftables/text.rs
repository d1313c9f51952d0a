//! Checks and normal forms for the text that ends up in an `nft -f` transaction: identifiers,
//! comments, rules, set declarations and elements. Pure.
//!
//! Every value is checked so that it cannot leave its place in the transaction: nft reads `;`
//! and a line break as the end of a command and `#` as the start of a comment, so outside double
//! quotes a rule may hold neither; braces must balance (a `}` would close the block around it);
//! an element may not hold a `,` (the next element). nft strings cannot escape a `"`, so a
//! comment holds none.

use super::model::RuleText;

/// NFT_NAME_MAXLEN (256) minus the terminating NUL.
pub const NAME_MAX: usize = 255;
/// nft refuses longer comments (NFT_USERDATA_MAXLEN is 256, nft itself stops at 128).
pub const COMMENT_MAX: usize = 128;

/// A table, chain or set name as nft's scanner reads an unquoted identifier: a letter, `_` or
/// `.`, then letters, digits, `/`, `-`, `_`, `.` (kube-proxy's chains hold `/`).
pub fn identifier(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= NAME_MAX
        && s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_' || c == '.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.'));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "`{}` is not an nft name: use 1 to {NAME_MAX} characters from A-Z, a-z, 0-9, '/', '-', '_', '.', starting with a letter, '_' or '.'",
            s.escape_debug()
        ))
    }
}

/// A comment: printable, no `"`, at most [`COMMENT_MAX`] bytes.
pub fn comment(s: &str) -> Result<String, String> {
    if s.len() > COMMENT_MAX {
        return Err(format!(
            "is {} bytes long: nft takes at most {COMMENT_MAX}",
            s.len()
        ));
    }
    if s.contains('"') || s.chars().any(char::is_control) {
        return Err(format!(
            "`{}` holds a `\"` or a control character: nft strings cannot carry them",
            s.escape_debug()
        ));
    }
    Ok(s.to_owned())
}

/// What is outside double quotes in `s`, quotes checked: `None` when a quote is left open.
fn unquoted(s: &str) -> Option<String> {
    let mut out = String::new();
    let mut quoted = false;
    for c in s.chars() {
        if c == '"' {
            quoted = !quoted;
            out.push(' ');
        } else if !quoted {
            out.push(c);
        }
    }
    (!quoted).then_some(out)
}

/// Braces opened minus braces closed, outside double quotes.
pub fn unquoted_balance(s: &str) -> i32 {
    let mut b = Balance::default();
    b.feed(s);
    b.depth
}

/// [`unquoted_balance`] of a text read piece by piece: each piece is scanned once (an
/// `elements = { … }` list of thousands spans thousands of lines; scanning all of it again at
/// every line made a listing's parse quadratic).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Balance {
    quoted: bool,
    depth: i32,
}

impl Balance {
    /// Adds the next piece of the text.
    pub fn feed(&mut self, s: &str) {
        for c in s.chars() {
            match c {
                '"' => self.quoted = !self.quoted,
                '{' if !self.quoted => self.depth += 1,
                '}' if !self.quoted => self.depth -= 1,
                _ => {}
            }
        }
    }

    /// Braces opened minus braces closed so far.
    pub fn depth(&self) -> i32 {
        self.depth
    }
}

/// Collapses runs of whitespace outside double quotes into one space, and trims.
pub fn collapse(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut quoted = false;
    let mut space = false;
    for c in s.trim().chars() {
        if c == '"' {
            quoted = !quoted;
        }
        if !quoted && c.is_whitespace() {
            space = true;
            continue;
        }
        if space && !out.is_empty() {
            out.push(' ');
        }
        space = false;
        out.push(c);
    }
    out
}

/// Checks `s` against what could break out of one command: control characters, an unclosed
/// quote, and outside quotes `;`, `#`, `\` and unbalanced braces. `extra` lists further
/// characters refused outside quotes.
pub fn contained(s: &str, what: &str, extra: &[char]) -> Result<(), String> {
    if s.trim().is_empty() {
        return Err(format!(
            "is empty: write the {what} as `nft list` prints it"
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(format!(
            "`{}` holds a line break or control character: one {what} per entry",
            s.escape_debug()
        ));
    }
    let Some(bare) = unquoted(s) else {
        return Err(format!("`{s}` leaves a `\"` open"));
    };
    for c in [';', '#', '\\'].iter().chain(extra) {
        if bare.contains(*c) {
            return Err(format!(
                "`{s}` holds `{c}` outside quotes: nft would read it as {}",
                match c {
                    ';' => "the end of the command".to_owned(),
                    '#' => "the start of a comment".to_owned(),
                    '\\' => "a line continuation".to_owned(),
                    other => format!("a separator (`{other}`)"),
                }
            ));
        }
    }
    let mut depth = 0i32;
    for c in bare.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            _ => {}
        }
        if depth < 0 {
            return Err(format!("`{s}` closes a `}}` it did not open"));
        }
    }
    if depth != 0 {
        return Err(format!("`{s}` leaves a `{{` open"));
    }
    Ok(())
}

/// A rule as nft prints it: statements, then optionally `comment "…"`. The comment, when there
/// is one, is split off (it identifies the rule).
pub fn rule(s: &str) -> Result<RuleText, String> {
    contained(s, "rule", &[])?;
    let s = collapse(s);
    let (body, comment) = split_comment(&s);
    if let Some(c) = &comment {
        self::comment(c)?;
    }
    if body.is_empty() {
        return Err("has a comment but no statements".into());
    }
    if unquoted(&body).is_some_and(|b| b.split_whitespace().any(|w| w == "comment")) {
        return Err(format!(
            "`{s}`: the comment must come last, as nft prints it (`… accept comment \"why\"`)"
        ));
    }
    Ok(RuleText { body, comment })
}

/// `… comment "x"` → (`…`, `x`); the comment is the last thing nft prints on a rule.
pub fn split_comment(s: &str) -> (String, Option<String>) {
    if let Some(stripped) = s.strip_suffix('"') {
        if let Some(at) = stripped.rfind(" comment \"") {
            let body = &s[..at];
            let text = &stripped[at + " comment \"".len()..];
            if !text.contains('"') {
                return (body.trim().to_owned(), Some(text.to_owned()));
            }
        }
        if let Some(text) = stripped.strip_prefix("comment \"") {
            if !text.contains('"') {
                return (String::new(), Some(text.to_owned()));
            }
        }
    }
    (s.trim().to_owned(), None)
}

/// A set or map element: `key` or (maps) `key : value`, as nft prints it. Attributes nft prints
/// after an element (`timeout 30s`, `expires …`, `comment "…"`, `counter …`) are not part of its
/// identity and are refused in the config.
pub fn element(s: &str, map: bool) -> Result<super::model::Element, String> {
    contained(s, "element", &[',', '{', '}'])?;
    let s = collapse(s);
    let (key, value) = match s.split_once(" : ") {
        Some((k, v)) => (k.trim().to_owned(), Some(v.trim().to_owned())),
        None => (s.clone(), None),
    };
    match (map, &value) {
        (true, None) => {
            return Err(format!(
                "`{s}` has no value: map elements are `KEY : VALUE` (`10.96.0.1 . tcp . 443 : goto service-x`)"
            ))
        }
        (false, Some(_)) => {
            return Err(format!(
                "`{s}` has a value (` : `): only maps hold values"
            ))
        }
        _ => {}
    }
    for word in ["timeout", "expires", "comment", "counter"] {
        let in_key = key.split_whitespace().any(|w| w == word);
        let in_value = value
            .as_deref()
            .is_some_and(|v| v.split_whitespace().any(|w| w == word));
        if in_key || in_value {
            return Err(format!(
                "`{s}`: element options (`{word} …`) are not supported: give the element alone"
            ));
        }
    }
    Ok(super::model::Element { key, value })
}

/// An element as `nft list` prints it inside `elements = { … }`: the key and value, with
/// `timeout`, `expires`, `comment` and counters dropped (they are not its identity).
pub fn listed_element(s: &str, map: bool) -> super::model::Element {
    let s = collapse(s);
    let words = words(&s);
    let mut key = Vec::new();
    let mut value = Vec::new();
    let mut in_value = false;
    let mut skip = 0;
    for (i, w) in words.iter().enumerate() {
        if skip > 0 {
            skip -= 1;
            continue;
        }
        match w.as_str() {
            "timeout" | "expires" | "comment" => {
                skip = 1;
                continue;
            }
            "counter" => {
                // `counter` or `counter packets N bytes M`.
                if words.get(i + 1).map(String::as_str) == Some("packets") {
                    skip = 4;
                }
                continue;
            }
            ":" if map && !in_value => {
                in_value = true;
                continue;
            }
            _ => {}
        }
        if in_value {
            value.push(w.as_str());
        } else {
            key.push(w.as_str());
        }
    }
    super::model::Element {
        key: key.join(" "),
        value: in_value.then(|| value.join(" ")),
    }
}

/// Whitespace-separated words, a double-quoted string (with its quotes) being one word.
pub fn words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        if c == '"' {
            quoted = !quoted;
        }
        if c.is_whitespace() && !quoted {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Splits `s` at `sep` where it is outside quotes and braces.
pub fn split_top(s: &str, sep: char) -> Vec<&str> {
    let mut out = Vec::new();
    let mut quoted = false;
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '{' if !quoted => depth += 1,
            '}' if !quoted => depth -= 1,
            c if c == sep && !quoted && depth == 0 => {
                out.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_balance_fed_in_pieces_is_that_of_the_whole() {
        let pieces = ["elements = { 1 : \"a {", "b\" : {", "x }, 2 : \"}\"", "}"];
        let mut b = Balance::default();
        for (i, p) in pieces.iter().enumerate() {
            b.feed(p);
            assert_eq!(b.depth(), unquoted_balance(&pieces[..=i].concat()), "{i}");
        }
        assert_eq!(b.depth(), 0);
        // A quote left open in one piece still holds in the next.
        let mut b = Balance::default();
        b.feed("{ \"a");
        b.feed("}\"");
        assert_eq!(b.depth(), 1);
    }

    #[test]
    fn identifiers_are_what_nft_reads_unquoted() {
        assert!(identifier("kube-proxy").is_ok());
        assert!(identifier("service-2QRHZV4L-default/kubernetes/tcp/https").is_ok());
        assert!(identifier("_x.y").is_ok());
        for bad in ["", "1abc", "a b", "a;b", "a\nb", "a\"b", "-x", "a{", "a#b"] {
            assert!(identifier(bad).is_err(), "{bad:?}");
        }
        assert!(identifier(&"a".repeat(256)).is_err());
    }

    #[test]
    fn rules_cannot_leave_their_command() {
        let r = rule("ip daddr @cluster-ips   reject comment \"Reject; traffic # x\"").unwrap();
        assert_eq!(r.body, "ip daddr @cluster-ips reject");
        assert_eq!(r.comment.as_deref(), Some("Reject; traffic # x"));
        assert_eq!(
            r.full(),
            "ip daddr @cluster-ips reject comment \"Reject; traffic # x\""
        );
        let v = rule("numgen random mod 2 vmap { 0 : goto a, 1 : goto b }").unwrap();
        assert_eq!(v.comment, None);
        for bad in [
            "accept; flush ruleset",
            "accept\nflush ruleset",
            "accept # comment",
            "accept }",
            "ip saddr { 1.1.1.1",
            "accept comment \"open",
            "meta mark set 1 \\",
            "",
            "comment \"only\"",
            "comment \"a\" accept",
        ] {
            assert!(rule(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn elements() {
        let e = element("10.96.0.1 . tcp . 443 : goto service-x/y", true).unwrap();
        assert_eq!(e.key, "10.96.0.1 . tcp . 443");
        assert_eq!(e.value.as_deref(), Some("goto service-x/y"));
        assert!(element("fd00::1", false).is_ok());
        assert!(element("00:11:22:33:44:55", false).is_ok());
        for (bad, map) in [
            ("10.0.0.1, 10.0.0.2", false),
            ("10.0.0.1 }", false),
            ("10.0.0.1 : accept", false),
            ("10.0.0.1", true),
            ("10.0.0.1 timeout 1h", false),
            ("10.0.0.1; flush ruleset", false),
        ] {
            assert!(element(bad, map).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn listed_elements_lose_their_attributes() {
        let e = listed_element("10.0.0.0/8 timeout 30s expires 29s984ms", false);
        assert_eq!(e.key, "10.0.0.0/8");
        let e = listed_element("172.16.0.1 expires 59m59s comment \"x, y\"", false);
        assert_eq!(e.key, "172.16.0.1");
        let e = listed_element(
            "10.96.0.10 . udp . 53 counter packets 1 bytes 2 : goto svc",
            true,
        );
        assert_eq!(
            (e.key.as_str(), e.value.as_deref()),
            ("10.96.0.10 . udp . 53", Some("goto svc"))
        );
        assert_eq!(listed_element("\"eth0\"", false).key, "\"eth0\"");
    }

    #[test]
    fn splitting_respects_quotes_and_braces() {
        assert_eq!(
            split_top("a, \"b, c\", { d, e }, f", ','),
            vec!["a", " \"b, c\"", " { d, e }", " f"]
        );
        assert_eq!(collapse("  a   \"b   c\"\t d "), "a \"b   c\" d");
    }
}
