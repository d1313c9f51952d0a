//! A config as `netwarden validate` reads it: a `ProtectedState` document, or a ConfigMap
//! manifest whose `data` holds one (the form the overlays in deploy/ ship, alone or among the
//! other objects of `kubectl kustomize` output). Errors inside the ConfigMap's document point at
//! the lines of the manifest when the document is a literal block (`config.yaml: |`), which is how
//! manifests hold it. Pure.

use super::{parse_mode, Config, ConfigError, FieldError};
use serde_json::Value;

/// A parsed config and where it came from.
#[derive(Debug)]
pub struct Document {
    pub config: Config,
    /// `ConfigMap NAMESPACE/NAME data.KEY` when it came from a ConfigMap manifest.
    pub configmap: Option<String>,
}

/// Parses `text` (named `source` in errors): a ConfigMap manifest is read from its `data[key]`,
/// with templates allowed (Kubernetes mode); anything else is a config document, with templates
/// allowed only when `kubernetes` is set.
///
/// # Errors
///
/// As [`super::parse`]; a manifest without a ConfigMap holding `key`, or with more than one, is a
/// [`ConfigError::Syntax`] naming them.
pub fn parse_document(
    source: &str,
    text: &str,
    key: &str,
    kubernetes: bool,
) -> Result<Document, ConfigError> {
    let docs = split_documents(text);
    let parsed: Option<Vec<(usize, &str, Value)>> = docs
        .iter()
        .map(|(start, doc)| {
            serde_saphyr::from_str::<Value>(doc)
                .ok()
                .map(|v| (*start, *doc, v))
        })
        .collect();
    let maps: Vec<(usize, &str, Value)> = parsed
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, _, v)| v["kind"] == "ConfigMap" && v["apiVersion"] == "v1")
        .collect();
    if maps.is_empty() {
        return Ok(Document {
            config: parse_mode(source, text, kubernetes)?,
            configmap: None,
        });
    }
    let name = |v: &Value| {
        format!(
            "{}/{}",
            v["metadata"]["namespace"].as_str().unwrap_or("-"),
            v["metadata"]["name"].as_str().unwrap_or("-")
        )
    };
    let holding: Vec<&(usize, &str, Value)> = maps
        .iter()
        .filter(|(_, _, v)| v["data"][key].is_string())
        .collect();
    let syntax = |message: String| ConfigError::Syntax {
        file: source.to_owned(),
        line: 0,
        column: 0,
        path: None,
        message,
    };
    let (start, doc, value) = match holding.as_slice() {
        [one] => *one,
        [] => {
            let names: Vec<String> = maps.iter().map(|(_, _, v)| name(v)).collect();
            return Err(syntax(format!(
                "no ConfigMap has data.{key} (ConfigMaps: {}); name the key with --configmap-key",
                names.join(", ")
            )));
        }
        many => {
            let names: Vec<String> = many.iter().map(|(_, _, v)| name(v)).collect();
            return Err(syntax(format!(
                "{} ConfigMaps have data.{key} ({}): validate one at a time",
                many.len(),
                names.join(", ")
            )));
        }
    };
    let inner = value["data"][key].as_str().unwrap_or_default();
    let label = format!("ConfigMap {} data.{key}", name(value));
    let config = match block_position(doc, key, inner) {
        Some((line, column)) => parse_mode(source, inner, true)
            .map_err(|e| shift(e, (start + line) as u64, column as u64))?,
        None => parse_mode(&format!("{source} ({label})"), inner, true)?,
    };
    Ok(Document {
        config,
        configmap: Some(label),
    })
}

/// The documents of a YAML stream, each with the 0-based index of its first line.
fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let mut start = 0usize;
    let mut offset = 0usize;
    let mut from = 0usize;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end();
        if bare == "---" || bare.starts_with("--- ") {
            docs.push((start, &text[from..offset]));
            start = i + 1;
            from = offset + line.len();
        }
        offset += line.len();
    }
    docs.push((start, &text[from..]));
    docs
}

/// Where the literal block holding `inner` under `key:` starts in `doc`: the number of lines
/// before its first line, and its indentation. `None` when `inner` is not written that way (a
/// quoted string, a folded block), so that lines cannot be mapped.
fn block_position(doc: &str, key: &str, inner: &str) -> Option<(usize, usize)> {
    let lines: Vec<&str> = doc.lines().collect();
    let quoted = [key.to_owned(), format!("\"{key}\""), format!("'{key}'")];
    let header = lines.iter().position(|l| {
        let t = l.trim_start();
        quoted.iter().any(|k| {
            t.strip_prefix(k.as_str())
                .and_then(|r| r.trim_start().strip_prefix(':'))
                .map(|r| r.split('#').next().unwrap_or("").trim())
                .is_some_and(|ind| {
                    ind.starts_with('|')
                        && ind[1..].chars().all(|c| matches!(c, '-' | '+' | '1'..='9'))
                })
        })
    })?;
    let body = &lines[header + 1..];
    let indent = body
        .iter()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())?;
    let kept: Vec<&str> = body
        .iter()
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() >= indent)
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect();
    (kept.join("\n").trim_end() == inner.trim_end()).then_some((header + 1, indent))
}

/// Moves error positions of the inner document to the manifest's lines.
fn shift(e: ConfigError, lines: u64, columns: u64) -> ConfigError {
    match e {
        ConfigError::Syntax {
            file,
            line,
            column,
            path,
            message,
        } if line > 0 => ConfigError::Syntax {
            file,
            line: line + lines,
            column: column + columns,
            path,
            message,
        },
        ConfigError::Invalid(errors) => ConfigError::Invalid(
            errors
                .into_iter()
                .map(|f| FieldError {
                    line: if f.line > 0 { f.line + lines } else { 0 },
                    column: if f.line > 0 { f.column + columns } else { 0 },
                    ..f
                })
                .collect(),
        ),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"# a comment
apiVersion: v1
kind: ConfigMap
metadata:
  name: netwarden
  namespace: kube-system
data:
  config.yaml: |
    apiVersion: netwarden.io/v1alpha1
    kind: ProtectedState
    spec:
      rules:
        - name: overlay
          priority: 100
          from: "{{ node.podCIDRs.ipv4 }}"
          table: 77
"#;

    #[test]
    fn a_configmap_manifest_is_read_from_its_data_with_templates() {
        let d = parse_document("cm.yaml", MANIFEST, "config.yaml", false).unwrap();
        assert_eq!(
            d.configmap.as_deref(),
            Some("ConfigMap kube-system/netwarden data.config.yaml")
        );
        assert_eq!(d.config.templates.len(), 1);
        // Among other objects, as `kubectl kustomize` prints them.
        let stream = format!("apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: x\n---\n{MANIFEST}---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: other\ndata:\n  a: b\n");
        let d = parse_document("all.yaml", &stream, "config.yaml", false).unwrap();
        assert_eq!(d.config.templates.len(), 1);
    }

    #[test]
    fn errors_point_at_the_manifest_lines() {
        let bad = MANIFEST.replace("          table: 77", "          tabel: 77");
        let e = parse_document("cm.yaml", &bad, "config.yaml", false)
            .unwrap_err()
            .to_string();
        // `tabel` is on line 16 of the manifest, column 11.
        assert!(e.starts_with("cm.yaml:16:11: "), "{e}");
        // After another document too.
        let stream = format!("kind: Namespace\napiVersion: v1\nmetadata:\n  name: n\n---\n{bad}");
        let e = parse_document("all.yaml", &stream, "config.yaml", false)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("all.yaml:21:11: "), "{e}");
        let invalid = MANIFEST.replace("priority: 100", "priority: -1");
        let e = parse_document("cm.yaml", &invalid, "config.yaml", false)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("cm.yaml:14:"), "{e}");
    }

    #[test]
    fn a_missing_or_ambiguous_key_is_an_error() {
        let e = parse_document("cm.yaml", MANIFEST, "other.yaml", false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no ConfigMap has data.other.yaml"), "{e}");
        let two = format!(
            "{MANIFEST}---\n{}",
            MANIFEST.replace("name: netwarden", "name: b")
        );
        let e = parse_document("cm.yaml", &two, "config.yaml", false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 ConfigMaps have data.config.yaml"), "{e}");
    }

    #[test]
    fn a_plain_config_is_parsed_as_before() {
        let plain = "apiVersion: netwarden.io/v1alpha1\nkind: ProtectedState\nspec:\n  rules:\n    - name: r\n      priority: 100\n      from: \"{{ node.podCIDRs }}\"\n      table: 77\n";
        let e = parse_document("c.yaml", plain, "config.yaml", false).unwrap_err();
        assert!(e.to_string().starts_with("c.yaml:7:"), "{e}");
        let d = parse_document("c.yaml", plain, "config.yaml", true).unwrap();
        assert!(d.configmap.is_none());
        // A quoted document: positions are the inner document's, and say so.
        let quoted = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: quoted}\ndata:\n  config.yaml: \"apiVersion: netwarden.io/v1alpha1\\nkind: ProtectedState\\nspec:\\n  tabel: 1\\n\"\n";
        let e = parse_document("q.yaml", quoted, "config.yaml", false)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("q.yaml (ConfigMap -/quoted data.config.yaml):4:"),
            "{e}"
        );
    }
}
