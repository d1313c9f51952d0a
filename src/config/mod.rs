//! The config file: a YAML `ProtectedState` document (schema in `docs/config.md`), parsed and
//! validated into model values. Pure apart from [`load`] reading the file.
//!
//! Parsing happens in two steps. serde checks the shape (known keys only, lists and mappings where
//! they belong) and keeps every scalar as its source text with its position; a shape error stops
//! there, as nothing after it can be trusted. Then every value is checked on its own and all
//! problems are reported together, each with its file position and field path, so an operator can
//! fix a file in one pass.

mod adopt;
mod build;
mod expand;
mod manifest;
mod netfilter;
mod nftables;
mod node;
mod raw;
mod routing;
pub mod template;
mod values;

#[cfg(test)]
mod tests;

use crate::model::{
    DesiredAddress, DesiredFdb, DesiredLink, DesiredNeighbour, DesiredRoute, DesiredRule,
    DesiredSysctl, Mode,
};
use crate::netfilter::model::{DesiredChain, DesiredSet};
use std::fmt;
use std::path::Path;
use std::time::Duration;

/// The only `apiVersion` this build understands.
pub const API_VERSION: &str = "netwarden.io/v1alpha1";
/// The only `kind` of document.
pub const KIND: &str = "ProtectedState";
/// Resync interval when the file names none.
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(60);
/// How often chains without nf_tables events (iptables-legacy) and ipsets are read.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// A validated config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Global default mode (`spec.mode`).
    pub mode: Mode,
    /// Interval of the full resync that backs up the netlink event stream.
    pub resync: Duration,
    /// Each object's mode is already resolved: its own `mode`, else the global one.
    pub rules: Vec<DesiredRule>,
    pub routes: Vec<DesiredRoute>,
    pub addresses: Vec<DesiredAddress>,
    pub chains: Vec<DesiredChain>,
    pub ipsets: Vec<DesiredSet>,
    pub neighbours: Vec<DesiredNeighbour>,
    pub fdb: Vec<DesiredFdb>,
    /// Links and sysctls: an entry whose device is a pattern (`cni*`) is kept as written.
    pub links: Vec<DesiredLink>,
    pub sysctls: Vec<DesiredSysctl>,
    /// Interval of the `iptables-save` / `ipset` polls and of the reads of settings the kernel
    /// does not notify (`spec.pollInterval`).
    pub poll_interval: Duration,
    /// Objects whose values hold templates (Kubernetes mode only): not in the lists above, they
    /// become objects when expanded against cluster facts ([`crate::desired::expand`]).
    pub templates: Templates,
    /// Selectors of kernel objects protected as they are seen (`spec.adopt`).
    pub adopt: Vec<crate::adopt::AdoptSelector>,
    /// Native nftables tables (`spec.nftables`).
    pub nftables: crate::nftables::model::NftConfig,
}

impl Config {
    /// Whether anything is enforced (the agent then needs to change the kernel). Objects with
    /// templates count as enforced: their mode is known once they are expanded.
    pub fn enforces_anything(&self) -> bool {
        let enforced = |m: &Mode| *m == Mode::Enforce;
        self.rules.iter().any(|o| enforced(&o.mode))
            || self.routes.iter().any(|o| enforced(&o.mode))
            || self.addresses.iter().any(|o| enforced(&o.mode))
            || self.chains.iter().any(|o| enforced(&o.mode))
            || self.ipsets.iter().any(|o| enforced(&o.mode))
            || self.adopt.iter().any(|o| enforced(&o.mode))
            || self.nftables.tables.iter().any(|t| enforced(&t.mode))
            || self.nftables.adopt.iter().any(|s| enforced(&s.adopt.mode))
            || !self.templates.is_empty()
    }
}

pub use expand::{Expanded, Pending, PendingCause, Templates};
pub use manifest::{parse_document, Document};

/// The check interface names in the config get (device names read back from a file too).
pub fn valid_ifname(s: &str) -> Result<String, String> {
    values::ifname(s)
}

pub use crate::netfilter::model::{valid_chain_name, valid_set_name};

/// Why a config file was refused. `Display` is the message for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read. The io error is part of the message rather than a `source`,
    /// so that printing the error alone says why.
    #[error("{file}: cannot read the file: {error}")]
    Read { file: String, error: std::io::Error },

    /// Larger than any config needs: refused before it is read to the end (`/dev/zero`, a log
    /// file named by mistake), so reading it cannot exhaust the agent's memory.
    #[error("{file}: the config is larger than {max} bytes; refusing it", max = MAX_CONFIG_BYTES)]
    TooLarge { file: String },

    /// Nothing but whitespace and comments: almost certainly a truncated or wrong file, and
    /// running with nothing protected is not what anyone asking for protection wants.
    #[error("{file}: the file is empty: it must hold a {KIND} document (apiVersion: {API_VERSION}, kind: {KIND})")]
    Empty { file: String },

    /// Not YAML, or YAML of the wrong shape (unknown key, a list where a value belongs, ...).
    /// `line`/`column` are 0 when the parser could not tell where.
    #[error("{}", format_syntax(file, *line, *column, path.as_deref(), message))]
    Syntax {
        file: String,
        line: u64,
        column: u64,
        /// Path of the offending field (`spec.rules[0].tabel`), when it could be determined.
        path: Option<String>,
        message: String,
    },

    /// Well-formed YAML with invalid values: every problem found, sorted by position.
    #[error("{}", format_invalid(.0))]
    Invalid(Vec<FieldError>),
}

fn format_syntax(file: &str, line: u64, column: u64, path: Option<&str>, message: &str) -> String {
    let position = if line == 0 {
        file.to_owned()
    } else {
        format!("{file}:{line}:{column}")
    };
    match path {
        Some(p) => format!("{position}: {p}: {message}"),
        None => format!("{position}: {message}"),
    }
}

fn format_invalid(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// One invalid value. `field` is the path of the field (`spec.rules[2].priority`), or of the
/// object for problems with the object as a whole (`spec.routes[0]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub file: String,
    pub line: u64,
    pub column: u64,
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file, self.line, self.column, self.field, self.message
        )
    }
}

/// Largest config accepted, from a file, standard input or a ConfigMap: 16 MiB, far above any
/// real one (a ConfigMap holds at most 1 MiB; 10,000 routes take about 1 MiB of YAML).
pub const MAX_CONFIG_BYTES: usize = 16 << 20;

/// Reads and parses a config file; errors name the file as given.
///
/// # Errors
///
/// [`ConfigError::Read`] when the file cannot be read, [`ConfigError::TooLarge`], else as
/// [`parse`].
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = read_text(path)?;
    parse(&path.display().to_string(), &text)
}

/// Reads a config file's text, at most [`MAX_CONFIG_BYTES`] of it (a special file such as
/// `/dev/zero` or a pipe never ends).
///
/// # Errors
///
/// [`ConfigError::Read`] (also for text that is not UTF-8), [`ConfigError::TooLarge`].
pub fn read_text(path: &Path) -> Result<String, ConfigError> {
    let source = path.display().to_string();
    match std::fs::File::open(path) {
        Ok(f) => read_from(&source, f),
        Err(error) => Err(ConfigError::Read {
            file: source,
            error,
        }),
    }
}

/// [`read_text`] of any reader (standard input); `source` names it in errors.
///
/// # Errors
///
/// As [`read_text`].
pub fn read_from(source: &str, reader: impl std::io::Read) -> Result<String, ConfigError> {
    use std::io::Read;
    let read_error = |error| ConfigError::Read {
        file: source.to_owned(),
        error,
    };
    let mut bytes = Vec::new();
    reader
        .take(MAX_CONFIG_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLarge {
            file: source.to_owned(),
        });
    }
    String::from_utf8(bytes).map_err(|e| {
        read_error(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not UTF-8 text ({})", e.utf8_error()),
        ))
    })
}

/// Parses config text; `source` names it in error messages (usually the file path).
///
/// # Errors
///
/// [`ConfigError::Empty`], [`ConfigError::Syntax`] for text that is not YAML or not shaped like a
/// `ProtectedState` document, [`ConfigError::Invalid`] with every invalid value.
pub fn parse(source: &str, text: &str) -> Result<Config, ConfigError> {
    parse_mode(source, text, false)
}

fn parse_mode(source: &str, text: &str, kubernetes: bool) -> Result<Config, ConfigError> {
    if text.len() > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLarge {
            file: source.to_owned(),
        });
    }
    if is_blank(text) {
        return Err(ConfigError::Empty {
            file: source.to_owned(),
        });
    }
    let doc: serde_saphyr::Spanned<raw::RawDocument> =
        serde_saphyr::from_str(text).map_err(|err| {
            let e = raw::describe_error(text, &err);
            ConfigError::Syntax {
                file: source.to_owned(),
                line: e.line,
                column: e.column,
                path: e.path,
                message: e.message,
            }
        })?;
    build::build_with(source, text, doc, kubernetes).map_err(ConfigError::Invalid)
}

/// [`parse`] for Kubernetes mode: values may hold templates (`{{ node.podCIDRs.ipv4 }}`), which
/// are checked here and expanded later against cluster facts.
///
/// # Errors
///
/// As [`parse`]; an unknown or misplaced template is an [`ConfigError::Invalid`] field error.
pub fn parse_kubernetes(source: &str, text: &str) -> Result<Config, ConfigError> {
    parse_mode(source, text, true)
}

/// A duration given on the command line (`30s`, `5m`, `1h`), as the config writes them: from
/// `min` to `max`; `what` names the flag in messages.
pub fn duration_arg(s: &str, what: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    values::duration_within(s, what, min, max)
}

/// Only whitespace and comment lines (and a byte-order mark, which editors add unseen).
fn is_blank(text: &str) -> bool {
    text.trim_start_matches('\u{feff}').lines().all(|line| {
        let line = line.trim();
        line.is_empty() || line.starts_with('#')
    })
}
