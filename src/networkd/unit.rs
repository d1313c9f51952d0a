//! systemd's configuration file syntax, as systemd 252 reads `.network` files and networkd.conf:
//! `[Section]` headers, `Key=Value` lines, `#` and `;` comments (a whole line, after leading
//! whitespace), a trailing backslash continuing a line (replaced by a space), keys and values
//! stripped of surrounding whitespace. Values are returned as written: quoting and lists are the
//! business of each setting. Pure.

/// One `Key=Value` of a file, with where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub section: String,
    /// Which `[Section]` header of the file it is under (0 for the first): a `[Route]` block is
    /// one route.
    pub block: usize,
    pub key: String,
    pub value: String,
    pub line: usize,
}

/// The assignments of one file, in order, and what was wrong with its lines.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Unit {
    pub entries: Vec<Entry>,
    pub warnings: Vec<String>,
}

impl Unit {
    /// The values of `section.key`, in order (later ones override, for single-value settings).
    pub fn values<'a>(&'a self, section: &'a str, key: &'a str) -> impl Iterator<Item = &'a str> {
        self.entries
            .iter()
            .filter(move |e| e.section == section && e.key == key)
            .map(|e| e.value.as_str())
    }

    /// The entries of each `[section]` block that has any, in order.
    pub fn blocks(&self, section: &str) -> Vec<Vec<&Entry>> {
        let mut out: Vec<(usize, Vec<&Entry>)> = Vec::new();
        for e in self.entries.iter().filter(|e| e.section == section) {
            match out.last_mut() {
                Some((b, list)) if *b == e.block => list.push(e),
                _ => out.push((e.block, vec![e])),
            }
        }
        out.into_iter().map(|(_, l)| l).collect()
    }
}

/// Parses the text of one file.
pub fn parse(text: &str) -> Unit {
    let mut unit = Unit::default();
    let mut section: Option<(String, usize)> = None;
    let mut headers = 0;
    let mut continuation: Option<(String, usize)> = None;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (i, raw) in text.lines().enumerate() {
        let number = i + 1;
        let trimmed = raw.trim_start();
        if trimmed.starts_with('#') || trimmed.starts_with(';') {
            continue;
        }
        let (mut joined, start) = match continuation.take() {
            Some((mut c, start)) => {
                c.push_str(raw);
                (c, start)
            }
            None => (raw.to_string(), number),
        };
        if ends_escaped(&joined) {
            joined.pop();
            joined.push(' ');
            continuation = Some((joined, start));
            continue;
        }
        line(&mut unit, &mut section, &mut headers, &joined, start);
    }
    if let Some((rest, start)) = continuation {
        line(&mut unit, &mut section, &mut headers, &rest, start);
    }
    unit
}

/// Whether a line ends in a backslash that is not itself escaped.
fn ends_escaped(s: &str) -> bool {
    let mut escaped = false;
    for c in s.chars() {
        escaped = if escaped { false } else { c == '\\' };
    }
    escaped
}

fn line(
    unit: &mut Unit,
    section: &mut Option<(String, usize)>,
    headers: &mut usize,
    text: &str,
    number: usize,
) {
    let l = text.trim();
    if l.is_empty() {
        return;
    }
    if let Some(inner) = l.strip_prefix('[') {
        match inner.strip_suffix(']') {
            Some(name) => {
                *section = Some((name.to_string(), *headers));
                *headers += 1;
            }
            None => unit
                .warnings
                .push(format!("line {number}: invalid section header `{l}`")),
        }
        return;
    }
    let Some((sect, block)) = section.as_ref() else {
        unit.warnings
            .push(format!("line {number}: assignment outside of a section"));
        return;
    };
    let Some((key, value)) = l.split_once('=') else {
        unit.warnings
            .push(format!("line {number}: missing '=' in `{l}`"));
        return;
    };
    unit.entries.push(Entry {
        section: sect.clone(),
        block: *block,
        key: key.trim().to_string(),
        value: value.trim().to_string(),
        line: number,
    });
}

/// systemd's boolean (`parse_boolean`): 1/yes/y/true/t/on and 0/no/n/false/f/off, any case.
pub fn boolean(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "1" | "yes" | "y" | "true" | "t" | "on" => Some(true),
        "0" | "no" | "n" | "false" | "f" | "off" => Some(false),
        _ => None,
    }
}

/// Splits a list value into words as systemd's `extract_first_word` does with quotes
/// (`EXTRACT_UNQUOTE`): whitespace separates, single or double quotes group, backslash escapes.
pub fn words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (_, '\\') => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
                in_word = true;
            }
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_keys_comments_and_continuations() {
        let u = parse(
            "\u{feff}# comment\n[Match]\n  ; another\nName = eth0 \\\n  eth1\n\n[Network]\nAddress=10.0.0.1/24\nKeepConfiguration=static\nno equals sign\n[Route]\nGateway=10.0.0.254\n[Route]\nDestination=10.1.0.0/16\n",
        );
        assert_eq!(
            u.values("Match", "Name").collect::<Vec<_>>(),
            ["eth0    eth1"]
        );
        assert_eq!(
            u.values("Network", "KeepConfiguration").collect::<Vec<_>>(),
            ["static"]
        );
        assert_eq!(u.warnings.len(), 1, "{:?}", u.warnings);
        let routes = u.blocks("Route");
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[0][0].key, "Gateway");
        assert_eq!(routes[1][0].value, "10.1.0.0/16");
        assert!(u.blocks("Address").is_empty());
    }

    #[test]
    fn an_escaped_backslash_does_not_continue() {
        let u = parse("[A]\nK=a\\\\\nL=b\n");
        assert_eq!(u.values("A", "K").collect::<Vec<_>>(), ["a\\\\"]);
        assert_eq!(u.values("A", "L").collect::<Vec<_>>(), ["b"]);
    }

    #[test]
    fn booleans_and_words() {
        assert_eq!(boolean("Yes"), Some(true));
        assert_eq!(boolean("off"), Some(false));
        assert_eq!(boolean("maybe"), None);
        assert_eq!(
            words(" eth0  'en p1' \"x y\" a\\ b "),
            ["eth0", "en p1", "x y", "a b"]
        );
        assert!(words("   ").is_empty());
    }
}
