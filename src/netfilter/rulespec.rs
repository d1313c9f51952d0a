//! Rule specs: the text after `-A CHAIN` in `iptables-save` output. Tokenised the way
//! `iptables-restore` reads a line (whitespace separates, double quotes group, a backslash escapes
//! the next character), compared token by token, and rendered back with the quoting
//! `iptables-save` uses. Config rule specs are also *validated* here: they end up inside
//! `iptables-restore` input, so nothing in them may act as a line, a header or a command.

use std::fmt;
use thiserror::Error;

/// A tokenised rule. Two specs that differ only in quoting or spacing are equal.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleSpec(Vec<String>);

/// Why a config rule spec was refused. Each message says what the text would have done.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum RuleSpecError {
    #[error("is empty: write the rule as iptables-save prints it after `-A CHAIN`")]
    Empty,
    #[error("contains a line break or control character: one rule is one line of restore input, and a second line could carry any command")]
    ControlCharacter,
    #[error("`{0}` is a table header: a rule spec is only what follows `-A CHAIN`, and the table is set by `table`")]
    TableHeader(String),
    #[error("`COMMIT` ends a restore transaction: it cannot be part of a rule")]
    Commit,
    #[error("`{0}` is a chain declaration: chains are declared by netwarden from `chain`, and declaring one flushes it")]
    ChainDeclaration(String),
    #[error("starts with `#`: iptables-restore would read the line as a comment")]
    Comment,
    #[error(
        "`{0}` {1}: a rule spec holds matches and a target only, netwarden adds the command itself"
    )]
    Command(String, &'static str),
    #[error("has an unclosed double quote")]
    UnclosedQuote,
    #[error("has a single quote: iptables-restore does not group with single quotes; use double quotes as iptables-save does")]
    SingleQuote,
}

/// Command options that would make a rule line do something else than append one rule.
fn command_option(token: &str) -> Option<&'static str> {
    Some(match token {
        "-F" | "--flush" => "flushes a chain",
        "-X" | "--delete-chain" => "deletes a chain",
        "-Z" | "--zero" => "zeroes counters",
        "-P" | "--policy" => "sets a builtin chain's policy",
        "-N" | "--new-chain" => "creates a chain",
        "-E" | "--rename-chain" => "renames a chain",
        "-A" | "--append" => "appends to another chain",
        "-I" | "--insert" => "inserts into another chain",
        "-D" | "--delete" => "deletes a rule",
        "-R" | "--replace" => "replaces a rule",
        "-L" | "--list" | "-S" | "--list-rules" | "-C" | "--check" => "is not a rule option",
        "-t" | "--table" => "switches the table",
        _ => return None,
    })
}

/// Splits a line as iptables-restore does. `strict` refuses single quotes (config input).
fn tokenize(s: &str, strict: bool) -> Result<Vec<String>, RuleSpecError> {
    let mut tokens = Vec::new();
    let mut current = String::new();
    let mut in_token = false;
    let mut quoted = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                // iptables-save escapes `"`, `\` and `'` inside quotes; keep the next char as is.
                if let Some(n) = chars.next() {
                    current.push(n);
                }
                in_token = true;
            }
            '"' => {
                quoted = !quoted;
                in_token = true;
            }
            '\'' if strict && !quoted => return Err(RuleSpecError::SingleQuote),
            c if c.is_whitespace() && !quoted => {
                if in_token {
                    tokens.push(std::mem::take(&mut current));
                    in_token = false;
                }
            }
            c => {
                current.push(c);
                in_token = true;
            }
        }
    }
    if quoted {
        return Err(RuleSpecError::UnclosedQuote);
    }
    if in_token {
        tokens.push(current);
    }
    Ok(tokens)
}

impl RuleSpec {
    /// Validates a rule spec from config.
    pub fn parse(s: &str) -> Result<RuleSpec, RuleSpecError> {
        if s.chars().any(char::is_control) {
            return Err(RuleSpecError::ControlCharacter);
        }
        let trimmed = s.trim_start();
        if trimmed.starts_with('#') {
            return Err(RuleSpecError::Comment);
        }
        if trimmed.starts_with('*') {
            let header = trimmed.split_whitespace().next().unwrap_or("*");
            return Err(RuleSpecError::TableHeader(header.to_owned()));
        }
        if trimmed.starts_with(':') {
            let decl = trimmed.split_whitespace().next().unwrap_or(":");
            return Err(RuleSpecError::ChainDeclaration(decl.to_owned()));
        }
        let tokens = tokenize(s, true)?;
        let Some(first) = tokens.first() else {
            return Err(RuleSpecError::Empty);
        };
        if first == "COMMIT" {
            return Err(RuleSpecError::Commit);
        }
        for t in &tokens {
            if t == "COMMIT" {
                return Err(RuleSpecError::Commit);
            }
            if let Some(what) = command_option(t) {
                return Err(RuleSpecError::Command(t.clone(), what));
            }
        }
        Ok(RuleSpec(tokens))
    }

    /// Reads a rule as `iptables-save` printed it (already trusted: only tokenised).
    pub fn from_saved(s: &str) -> Result<RuleSpec, RuleSpecError> {
        let tokens = tokenize(s, false)?;
        if tokens.is_empty() {
            return Err(RuleSpecError::Empty);
        }
        Ok(RuleSpec(tokens))
    }

    /// A rule from tokens (already validated ones, rearranged): `None` if one of them could act
    /// as restore input on its own (a line break, `COMMIT`).
    pub fn from_tokens(tokens: Vec<String>) -> Option<RuleSpec> {
        let safe = !tokens.is_empty()
            && tokens
                .iter()
                .all(|t| t != "COMMIT" && !t.chars().any(char::is_control));
        safe.then_some(RuleSpec(tokens))
    }

    pub fn tokens(&self) -> &[String] {
        &self.0
    }

    /// The chain this rule jumps or goes to (`-j X` / `-g X`), if any.
    pub fn target(&self) -> Option<&str> {
        self.0
            .windows(2)
            .find(|w| matches!(w[0].as_str(), "-j" | "--jump" | "-g" | "--goto"))
            .map(|w| w[1].as_str())
    }
}

/// Quotes a token the way `iptables-save` does (`xtables_save_string`): bare when it is only
/// safe characters, else in double quotes with `"`, `\` and `'` escaped.
fn write_token(f: &mut fmt::Formatter<'_>, t: &str) -> fmt::Result {
    let safe = !t.is_empty()
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./:!,=+@%[]~^".contains(c))
        && !t.starts_with('#');
    if safe {
        return f.write_str(t);
    }
    f.write_str("\"")?;
    for c in t.chars() {
        if matches!(c, '"' | '\\' | '\'') {
            f.write_str("\\")?;
        }
        write!(f, "{c}")?;
    }
    f.write_str("\"")
}

impl fmt::Display for RuleSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, t) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write_token(f, t)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> RuleSpec {
        RuleSpec::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn quoting_and_spacing_do_not_matter() {
        let a = ok(r#"-s 10.244.0.0/16 -m comment --comment "flanneld masq" -j RETURN"#);
        let b = ok(r#"-s  10.244.0.0/16 -m comment --comment flanneld" masq"   -j RETURN "#);
        assert_eq!(a, b);
        assert_eq!(a.tokens()[5], "flanneld masq");
        assert_eq!(
            a.to_string(),
            r#"-s 10.244.0.0/16 -m comment --comment "flanneld masq" -j RETURN"#
        );
        assert_eq!(a.target(), Some("RETURN"));
    }

    #[test]
    fn render_round_trips_awkward_values() {
        let r = ok(r#"-m comment --comment "a \"b\" c\\d" -j LOG --log-prefix "x: ""#);
        let back = RuleSpec::from_saved(&r.to_string()).unwrap();
        assert_eq!(back, r);
        assert_eq!(r.tokens()[3], r#"a "b" c\d"#);
    }

    #[test]
    fn injections_are_refused() {
        use RuleSpecError::*;
        let cases: &[(&str, RuleSpecError)] = &[
            ("-j ACCEPT\n-F", ControlCharacter),
            ("-j ACCEPT\r", ControlCharacter),
            ("*filter", TableHeader("*filter".into())),
            ("COMMIT", Commit),
            ("-j ACCEPT COMMIT", Commit),
            (":KUBE-X - [0:0]", ChainDeclaration(":KUBE-X".into())),
            ("# hidden", Comment),
            ("-F", Command("-F".into(), "flushes a chain")),
            ("-j ACCEPT -X", Command("-X".into(), "deletes a chain")),
            ("-Z FORWARD", Command("-Z".into(), "zeroes counters")),
            (
                "-P FORWARD DROP",
                Command("-P".into(), "sets a builtin chain's policy"),
            ),
            (
                "-t filter -j ACCEPT",
                Command("-t".into(), "switches the table"),
            ),
            (
                "--delete-chain POSTROUTING",
                Command("--delete-chain".into(), "deletes a chain"),
            ),
            ("-m comment --comment \"open", UnclosedQuote),
            ("-m comment --comment 'a b'", SingleQuote),
            ("   ", Empty),
        ];
        for (input, want) in cases {
            assert_eq!(RuleSpec::parse(input).as_ref(), Err(want), "{input:?}");
        }
        // Quoted, the same words are values, not commands; still no COMMIT anywhere.
        assert!(RuleSpec::parse("-m comment --comment \"-F me\" -j ACCEPT").is_ok());
    }
}
