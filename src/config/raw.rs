//! The document as written: serde structs that only check the shape (known keys, mappings and
//! lists where they belong). Every scalar is kept as its source text with its position, so that
//! [`super::build`] can check values one by one and report all problems at once.

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize as DeriveDeserialize;
use serde_saphyr::localizer::Localizer;
use serde_saphyr::{DefaultMessageFormatter, Location, SnippetMode, Spanned};
use std::borrow::Cow;
use std::fmt;

/// A scalar as written. serde-saphyr hands integers and booleans over as their text when a
/// string is asked for, and an empty value or `~` becomes `None` (the field counts as absent).
pub(super) type Scalar = Option<Spanned<String>>;

#[derive(Debug, DeriveDeserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDocument {
    #[serde(rename = "apiVersion")]
    pub api_version: Scalar,
    pub kind: Scalar,
    #[allow(dead_code, reason = "checked for shape only; see RawMetadata")]
    pub metadata: Option<Spanned<RawMetadata>>,
    pub spec: Option<Spanned<RawSpec>>,
}

#[derive(Debug, DeriveDeserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetadata {
    #[allow(
        dead_code,
        reason = "accepted so Kubernetes-style files validate; nothing uses the name yet"
    )]
    pub name: Scalar,
}

#[derive(Debug, DeriveDeserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSpec {
    pub mode: Scalar,
    pub resync: Scalar,
    pub rules: Option<Vec<Spanned<RawRule>>>,
    pub routes: Option<Vec<Spanned<RawRoute>>>,
    pub addresses: Option<Vec<Spanned<RawAddress>>>,
    #[serde(rename = "pollInterval")]
    pub poll_interval: Scalar,
    pub chains: Option<Vec<Spanned<RawChain>>>,
    pub ipsets: Option<Vec<Spanned<RawIpSet>>>,
    pub adopt: Option<Vec<Spanned<RawAdopt>>>,
    pub nftables: Option<Vec<Spanned<RawNftTable>>>,
    pub neighbours: Option<Vec<Spanned<RawNeighbour>>>,
    pub links: Option<Vec<Spanned<RawLink>>>,
    pub sysctls: Option<Vec<Spanned<RawSysctl>>>,
}

/// A neighbour entry (`address`) or an FDB entry of a VXLAN device (`dst`).
#[derive(Clone, Debug, PartialEq, Eq, DeriveDeserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNeighbour {
    pub name: Scalar,
    pub device: Scalar,
    pub address: Scalar,
    pub lladdr: Scalar,
    pub state: Scalar,
    pub dst: Scalar,
    pub vni: Scalar,
    pub mode: Scalar,
}

#[derive(Clone, Debug, PartialEq, Eq, DeriveDeserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLink {
    pub name: Scalar,
    pub device: Scalar,
    pub up: Scalar,
    pub mtu: Scalar,
    pub mode: Scalar,
}

#[derive(Clone, Debug, PartialEq, Eq, DeriveDeserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSysctl {
    pub name: Scalar,
    pub key: Scalar,
    pub value: Scalar,
    pub mode: Scalar,
}

#[derive(Debug, DeriveDeserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdopt {
    pub name: Scalar,
    pub mode: Scalar,
    pub rules: Option<Spanned<RawRuleSelector>>,
    pub routes: Option<Spanned<RawRouteSelector>>,
    pub chains: Option<Spanned<RawChainSelector>>,
    pub ipsets: Option<Spanned<RawSetSelector>>,
    pub nftables: Option<Spanned<RawNftSelector>>,
    pub neighbours: Option<Spanned<RawNeighbourSelector>>,
    pub owners: Option<Vec<Scalar>>,
    #[serde(rename = "unknownActor")]
    pub unknown_actor: Scalar,
    #[serde(rename = "podLiveness")]
    pub pod_liveness: Scalar,
    #[serde(rename = "podLivenessGrace")]
    pub pod_liveness_grace: Scalar,
}

#[derive(Debug, DeriveDeserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRouteSelector {
    pub family: Scalar,
    pub table: Scalar,
    pub protocols: Option<Vec<Scalar>>,
    pub device: Scalar,
}

#[derive(Debug, DeriveDeserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawChainSelector {
    pub family: Scalar,
    pub table: Scalar,
    pub names: Option<Vec<Scalar>>,
}

#[derive(Debug, DeriveDeserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNeighbourSelector {
    pub devices: Option<Vec<Scalar>>,
}

#[derive(Debug, DeriveDeserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSetSelector {
    pub names: Option<Vec<Scalar>>,
}

#[derive(Debug, DeriveDeserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRuleSelector {
    pub family: Scalar,
    pub priority: Scalar,
    pub table: Scalar,
    pub protocols: Option<Vec<Scalar>>,
}

#[derive(Debug, DeriveDeserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawChain {
    pub name: Scalar,
    pub family: Scalar,
    pub table: Scalar,
    pub chain: Scalar,
    pub rules: Option<Vec<Scalar>>,
    pub content: Scalar,
    pub jumps: Option<Vec<Spanned<RawJump>>>,
    pub mode: Scalar,
}

#[derive(Debug, DeriveDeserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawJump {
    pub chain: Scalar,
    pub rule: Scalar,
    pub position: Scalar,
}

#[derive(Clone, Debug, PartialEq, Eq, DeriveDeserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIpSet {
    pub name: Scalar,
    #[serde(rename = "type")]
    pub kind: Scalar,
    pub family: Scalar,
    pub members: Option<Vec<Scalar>>,
    pub membership: Scalar,
    pub forbidden: Option<Vec<Scalar>>,
    pub mode: Scalar,
    pub hashsize: Scalar,
    pub maxelem: Scalar,
    pub timeout: Scalar,
    pub counters: Scalar,
    pub comment: Scalar,
    pub skbinfo: Scalar,
}

#[derive(Clone, Debug, PartialEq, Eq, DeriveDeserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    pub name: Scalar,
    pub family: Scalar,
    pub priority: Scalar,
    pub from: Scalar,
    pub to: Scalar,
    pub iif: Scalar,
    pub oif: Scalar,
    pub fwmark: Scalar,
    pub fwmask: Scalar,
    pub table: Scalar,
    pub action: Scalar,
    pub protocol: Scalar,
    pub mode: Scalar,
}

#[derive(Clone, Debug, PartialEq, Eq, DeriveDeserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub name: Scalar,
    pub family: Scalar,
    pub table: Scalar,
    pub destination: Scalar,
    pub gateway: Scalar,
    pub device: Scalar,
    pub source: Scalar,
    pub metric: Scalar,
    pub scope: Scalar,
    #[serde(rename = "type")]
    pub kind: Scalar,
    pub protocol: Scalar,
    pub onlink: Scalar,
    pub mtu: Scalar,
    pub mode: Scalar,
}

#[derive(Clone, Debug, PartialEq, Eq, DeriveDeserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAddress {
    pub name: Scalar,
    pub device: Scalar,
    pub address: Scalar,
    #[serde(rename = "managedBy")]
    pub managed_by: Scalar,
    pub mode: Scalar,
}

/// A structural error from serde-saphyr, reduced to what the operator needs.
pub(super) struct StructuralError {
    pub line: u64,
    pub column: u64,
    pub path: Option<String>,
    pub message: String,
}

/// Wording hook that drops serde-saphyr's " at line X, column Y" suffix: our own format puts the
/// position first, like a compiler.
struct NoLocationSuffix;

impl Localizer for NoLocationSuffix {
    fn attach_location<'a>(&self, base: Cow<'a, str>, _loc: Location) -> Cow<'a, str> {
        base
    }
}

pub(super) fn describe_error(text: &str, err: &serde_saphyr::Error) -> StructuralError {
    let message = operator_message(err);
    let (line, column) = err
        .location()
        .filter(|l| *l != Location::UNKNOWN)
        .map_or((0, 0), |l| (l.line(), l.column()));
    // serde's messages name the offending key ("unknown field `tabel`") but not where it sits;
    // find the path by position in a shape-only parse of the same text.
    let path = if line == 0 {
        None
    } else {
        let about_key = matches!(
            innermost(err),
            serde_saphyr::Error::DuplicateMappingKey { .. }
        ) || message.starts_with("unknown field");
        // Built from the document's keys: printed on one line whatever they hold.
        path_at(text, (line, column), about_key).map(|p| crate::model::text::escape(&p))
    };
    StructuralError {
        line,
        column,
        path,
        message,
    }
}

/// The error itself, without the wrappers that only add snippets or alias locations.
fn innermost(mut err: &serde_saphyr::Error) -> &serde_saphyr::Error {
    use serde_saphyr::Error;
    while let Error::WithSnippet { error, .. } | Error::AliasError { error, .. } = err {
        err = error;
    }
    err
}

/// serde-saphyr's wording, except where it speaks parser internals ("mapping start") or addresses
/// the developer ("use `from_str_multiple`").
fn operator_message(err: &serde_saphyr::Error) -> String {
    use serde_saphyr::Error;
    match innermost(err) {
        Error::Unexpected { expected, .. } => match *expected {
            "mapping start" => "expected a mapping (`key: value` entries) here".to_owned(),
            "sequence start" => "expected a list (`- item` entries) here".to_owned(),
            "string scalar" => "expected a single value here, not a list or a mapping".to_owned(),
            other => format!("expected {other}"),
        },
        Error::MultipleDocuments { .. } => {
            "the file holds more than one YAML document (a second `---`): netwarden reads exactly one"
                .to_owned()
        }
        Error::DuplicateMappingKey { key: Some(key), .. } => format!("duplicate key `{key}`"),
        Error::DuplicateMappingKey { key: None, .. } => "duplicate key".to_owned(),
        _ => {
            let formatter = DefaultMessageFormatter.with_localizer(&NoLocationSuffix);
            let mut options = serde_saphyr::RenderOptions::new(&formatter);
            options.snippets = SnippetMode::Off;
            err.render_with_options(options)
        }
    }
}

/// The shape of any YAML node with positions: enough to turn a position back into a path.
enum Shape {
    Leaf,
    Seq(Vec<Spanned<Shape>>),
    Map(Vec<(Spanned<String>, Spanned<Shape>)>),
}

impl<'de> Deserialize<'de> for Shape {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ShapeVisitor;

        impl<'de> Visitor<'de> for ShapeVisitor {
            type Value = Shape;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any YAML node")
            }

            fn visit_bool<E>(self, _: bool) -> Result<Shape, E> {
                Ok(Shape::Leaf)
            }

            fn visit_i64<E>(self, _: i64) -> Result<Shape, E> {
                Ok(Shape::Leaf)
            }

            fn visit_u64<E>(self, _: u64) -> Result<Shape, E> {
                Ok(Shape::Leaf)
            }

            fn visit_f64<E>(self, _: f64) -> Result<Shape, E> {
                Ok(Shape::Leaf)
            }

            fn visit_str<E>(self, _: &str) -> Result<Shape, E> {
                Ok(Shape::Leaf)
            }

            fn visit_unit<E>(self) -> Result<Shape, E> {
                Ok(Shape::Leaf)
            }

            fn visit_none<E>(self) -> Result<Shape, E> {
                Ok(Shape::Leaf)
            }

            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Shape, D::Error> {
                Shape::deserialize(d)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Shape, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Shape::Seq(items))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Shape, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<Spanned<String>>()? {
                    let value = map.next_value()?;
                    entries.push((key, value));
                }
                Ok(Shape::Map(entries))
            }
        }

        deserializer.deserialize_any(ShapeVisitor)
    }
}

fn position(l: &Location) -> (u64, u64) {
    (l.line(), l.column())
}

/// A node or key found at the error position.
struct Hit {
    depth: usize,
    is_key: bool,
    path: String,
}

fn collect_hits(
    node: &Spanned<Shape>,
    at: (u64, u64),
    path: &str,
    depth: usize,
    hits: &mut Vec<Hit>,
) {
    if !path.is_empty() && position(&node.referenced) == at {
        hits.push(Hit {
            depth,
            is_key: false,
            path: path.to_owned(),
        });
    }
    match &node.value {
        Shape::Leaf => {}
        Shape::Seq(items) => {
            for (i, item) in items.iter().enumerate() {
                collect_hits(item, at, &format!("{path}[{i}]"), depth + 1, hits);
            }
        }
        Shape::Map(entries) => {
            for (key, value) in entries {
                let p = if path.is_empty() {
                    key.value.clone()
                } else {
                    format!("{path}.{}", key.value)
                };
                if position(&key.referenced) == at {
                    hits.push(Hit {
                        depth: depth + 1,
                        is_key: true,
                        path: p.clone(),
                    });
                }
                collect_hits(value, at, &p, depth + 1, hits);
            }
        }
    }
}

/// The path (`spec.rules[2].table`) of the key or value at a position. Several nodes can start
/// at the same position (a block mapping starts where its first key does), so errors about keys
/// take the deepest key and errors about values the outermost value.
fn path_at(text: &str, at: (u64, u64), about_key: bool) -> Option<String> {
    // The strict parse failed for a structural reason; if even this lenient one fails, the text
    // is broken YAML and the position alone has to do.
    // Duplicate keys are allowed here so that a duplicate-key error can still be placed.
    let options = serde_saphyr::options! {
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::LastWins,
    };
    let root: Spanned<Shape> = serde_saphyr::from_str_with_options(text, options).ok()?;
    let mut hits = Vec::new();
    collect_hits(&root, at, "", 0, &mut hits);
    let best = if about_key {
        hits.iter().filter(|h| h.is_key).max_by_key(|h| h.depth)
    } else {
        hits.iter().min_by_key(|h| h.depth)
    };
    best.or_else(|| hits.first()).map(|h| h.path.clone())
}

// `spec.nftables` (checked in `super::nftables`).

#[derive(Debug, DeriveDeserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNftTable {
    pub name: Scalar,
    pub family: Scalar,
    pub table: Scalar,
    pub comment: Scalar,
    pub dormant: Scalar,
    pub mode: Scalar,
    pub chains: Option<Vec<Spanned<RawNftChain>>>,
    pub sets: Option<Vec<Spanned<RawNftSet>>>,
    pub maps: Option<Vec<Spanned<RawNftSet>>>,
}

#[derive(Debug, DeriveDeserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNftChain {
    pub name: Scalar,
    #[serde(rename = "type")]
    pub kind: Scalar,
    pub hook: Scalar,
    pub priority: Scalar,
    pub policy: Scalar,
    pub device: Scalar,
    pub comment: Scalar,
    pub content: Scalar,
    pub rules: Option<Vec<Scalar>>,
}

#[derive(Debug, DeriveDeserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNftSet {
    pub name: Scalar,
    #[serde(rename = "type")]
    pub kind: Scalar,
    #[serde(rename = "typeof")]
    pub type_of: Scalar,
    pub flags: Option<Vec<Scalar>>,
    pub timeout: Scalar,
    pub comment: Scalar,
    pub elements: Option<Vec<Scalar>>,
    pub membership: Scalar,
    pub forbidden: Option<Vec<Scalar>>,
}

#[derive(Debug, DeriveDeserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNftSelector {
    pub family: Scalar,
    /// Table names, exact or a prefix ending in `*` (as for chain and set selectors).
    pub names: Option<Vec<Scalar>>,
}
