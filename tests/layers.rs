//! The layering README describes, checked against the code: every library module belongs to one
//! layer of README's list, imports (use lines and inline `crate::`/`super::` paths, test code
//! left out) go only to its own layer or lower ones, no two modules import each other and no
//! circle runs between the list's modules.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Files of the binary crate: their `crate::` is the binary, and they are the top layer anyway.
const BINARY_FILES: &[&str] = &["main.rs", "cli.rs", "kubernetes.rs"];

type ModPath = Vec<String>;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// README's layer list: the fenced block after the line `Layers, lowest first`. Each line is a
/// layer's name followed by the modules in it (a module stands for its submodules too, unless a
/// submodule is listed on its own).
fn layers() -> Vec<(String, Vec<ModPath>)> {
    let readme = fs::read_to_string(root().join("README.md")).expect("README.md");
    let start = readme
        .find("Layers, lowest first")
        .expect("README names its layers (`Layers, lowest first`)");
    let block = &readme[start..];
    let open = block.find("```").expect("layer block") + 3;
    let body = &block[open..];
    let body = &body[body.find('\n').expect("block line") + 1..];
    let body = &body[..body.find("```").expect("layer block end")];
    body.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut words = l.split_whitespace();
            let name = words.next().expect("layer name").to_owned();
            let mods = words
                .map(|m| m.split("::").map(str::to_owned).collect())
                .collect();
            (name, mods)
        })
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/a/b.rs` is `a::b`, `src/a/mod.rs` is `a`, `src/lib.rs` the crate root.
fn module_of(rel: &Path) -> ModPath {
    let mut parts: ModPath = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().expect("file name");
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_owned());
    }
    parts
}

/// Source without comments, string and char literals (so that their braces and paths do not
/// count).
fn strip_comments_and_strings(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0;
                while i < b.len() {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'r' if (b.get(i + 1) == Some(&b'"') || b.get(i + 1) == Some(&b'#'))
                && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')) =>
            {
                // Raw string r#"..."#.
                let mut j = i + 1;
                let mut hashes = 0;
                while b.get(j) == Some(&b'#') {
                    hashes += 1;
                    j += 1;
                }
                if b.get(j) != Some(&b'"') {
                    out.push('r');
                    i += 1;
                    continue;
                }
                j += 1;
                let close: Vec<u8> = std::iter::once(b'"')
                    .chain(std::iter::repeat_n(b'#', hashes))
                    .collect();
                while j < b.len() && !b[j..].starts_with(&close) {
                    j += 1;
                }
                i = j + close.len();
                out.push_str("\"\"");
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
                out.push_str("\"\"");
            }
            b'\'' => {
                // A char literal ('x', '\n', '{') or a lifetime ('a).
                if b.get(i + 1) == Some(&b'\\') {
                    let mut j = i + 2;
                    while j < b.len() && b[j] != b'\'' {
                        j += 1;
                    }
                    i = j + 1;
                    out.push_str("' '");
                } else if b.get(i + 2) == Some(&b'\'') {
                    i += 3;
                    out.push_str("' '");
                } else {
                    out.push('\'');
                    i += 1;
                }
            }
            _ => {
                let ch = src[i..].chars().next().expect("char");
                out.push(ch);
                i += ch.len_utf8();
            }
        }
    }
    out
}

/// Source with every `#[cfg(test)]` item (and `#[cfg(test)] mod x;` line) left out.
fn strip_test_code(src: &str) -> String {
    const MARK: &str = "#[cfg(test)]";
    let mut out = String::new();
    let mut rest = src;
    while let Some(at) = rest.find(MARK) {
        out.push_str(&rest[..at]);
        let after = &rest[at + MARK.len()..];
        let semi = after.find(';');
        let brace = after.find('{');
        let end = match (semi, brace) {
            (Some(s), Some(b)) if s < b => s + 1,
            (Some(s), None) => s + 1,
            (_, Some(b)) => {
                let mut depth = 0;
                let mut end = after.len();
                for (k, c) in after[b..].char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = b + k + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                end
            }
            (None, None) => after.len(),
        };
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// The files of the `#[cfg(test)] mod x;` modules a file declares (test code as a whole).
fn test_files(file: &Path) -> Vec<PathBuf> {
    let text = fs::read_to_string(file).expect("source file");
    let dir = file.parent().expect("dir");
    let name = file.file_stem().expect("stem").to_string_lossy();
    let children = if name == "mod" || name == "lib" {
        dir.to_path_buf()
    } else {
        dir.join(&*name)
    };
    let mut found = Vec::new();
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    for (i, line) in lines.iter().enumerate() {
        if *line != "#[cfg(test)]" {
            continue;
        }
        let mut explicit = None;
        for next in &lines[i + 1..] {
            if let Some(p) = next.strip_prefix("#[path = \"") {
                explicit = Some(dir.join(p.trim_end_matches("\"]")));
            } else if next.starts_with("#[") {
                continue;
            } else {
                let decl = next
                    .trim_start_matches("pub(crate) ")
                    .trim_start_matches("pub ");
                if let Some(m) = decl.strip_prefix("mod ").and_then(|m| m.strip_suffix(';')) {
                    found.push(
                        explicit
                            .take()
                            .unwrap_or_else(|| children.join(format!("{m}.rs"))),
                    );
                    found.push(children.join(m).join("mod.rs"));
                }
                break;
            }
        }
    }
    found
}

/// Expands a use tree (`a::{b, c::{d, e}}`) into its paths.
fn expand_use_tree(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        let path = tree.split(" as ").next().unwrap_or(tree).trim();
        return vec![path.trim_end_matches("::*").to_owned()];
    };
    let prefix = tree[..open].trim_end_matches("::").trim();
    let inner = &tree[open + 1..tree.rfind('}').expect("closing brace")];
    let mut items = Vec::new();
    let (mut depth, mut cur) = (0, String::new());
    for c in inner.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            _ => {}
        }
        if c == ',' && depth == 0 {
            items.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    items.push(cur);
    items
        .iter()
        .filter(|i| !i.trim().is_empty())
        .flat_map(|i| expand_use_tree(i))
        .map(|p| match (prefix.is_empty(), p == "self") {
            (true, _) => p,
            (false, true) => prefix.to_owned(),
            (false, false) => format!("{prefix}::{p}"),
        })
        .collect()
}

/// Every path a file names that starts at `crate::`, `super::` or `self::` (use lines and
/// inline paths).
fn named_paths(code: &str) -> Vec<String> {
    let mut paths = Vec::new();
    let mut rest = code;
    // use lines: `use x;` and `pub(crate) use x;`, with their trees expanded.
    while let Some(at) = rest.find("use ") {
        let before = rest[..at].chars().last();
        let after = &rest[at + 4..];
        rest = after;
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let Some(end) = after.find(';') else { break };
        let tree: String = after[..end]
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if tree.starts_with("crate") || tree.starts_with("super") || tree.starts_with("self") {
            paths.extend(expand_use_tree(&tree));
        }
    }
    // inline paths.
    let bytes = code.as_bytes();
    for start in ["crate::", "super::", "self::"] {
        for (at, _) in code.match_indices(start) {
            if at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_') {
                continue;
            }
            let end = code[at..]
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .map_or(code.len(), |e| at + e);
            let path = code[at..end].trim_end_matches(':');
            if path.contains("::") {
                paths.push(path.to_owned());
            }
        }
    }
    paths.sort();
    paths.dedup();
    paths
}

struct Crate {
    /// Each module's file (relative to src/) and the modules it imports.
    modules: BTreeMap<ModPath, (String, BTreeSet<ModPath>)>,
}

fn read_crate() -> Crate {
    let src = root().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let tests: BTreeSet<PathBuf> = files.iter().flat_map(|f| test_files(f)).collect();
    let mut texts = BTreeMap::new();
    for path in files {
        let rel = path.strip_prefix(&src).expect("under src").to_path_buf();
        if BINARY_FILES.iter().any(|b| rel == Path::new(b)) || tests.contains(&path) {
            continue;
        }
        let text = fs::read_to_string(&path).expect("source file");
        let code = strip_test_code(&strip_comments_and_strings(&text));
        texts.insert(module_of(&rel), (rel.display().to_string(), code));
    }
    let known: BTreeSet<ModPath> = texts.keys().cloned().collect();
    let mut modules = BTreeMap::new();
    for (module, (file, code)) in &texts {
        let mut imports = BTreeSet::new();
        for path in named_paths(code) {
            let mut segs = path.split("::").filter(|s| !s.is_empty());
            let mut at: ModPath = match segs.next() {
                Some("crate") => Vec::new(),
                // A mod.rs is its own module: `super` is its parent.
                Some("super") | Some("self") => module.clone(),
                _ => continue,
            };
            let mut segs = segs.peekable();
            if path.starts_with("super") {
                at.pop();
            }
            while segs.peek() == Some(&"super") {
                segs.next();
                at.pop();
            }
            // The deepest module the path names (the rest are items in it).
            for seg in segs {
                let mut next = at.clone();
                next.push(seg.to_owned());
                if known.contains(&next) {
                    at = next;
                } else {
                    break;
                }
            }
            if &at != module {
                imports.insert(at);
            }
        }
        modules.insert(module.clone(), (file.clone(), imports));
    }
    Crate { modules }
}

fn show(m: &[String]) -> String {
    if m.is_empty() {
        "crate".to_owned()
    } else {
        m.join("::")
    }
}

/// The most specific entry of the layer list that holds `module`: (layer index, entry).
fn place(layers: &[(String, Vec<ModPath>)], module: &[String]) -> Option<(usize, ModPath)> {
    layers
        .iter()
        .enumerate()
        .flat_map(|(i, (_, mods))| mods.iter().map(move |m| (i, m)))
        .filter(|(_, m)| module.starts_with(m))
        .max_by_key(|(_, m)| m.len())
        .map(|(i, m)| (i, m.clone()))
}

fn is_ancestor(a: &[String], b: &[String]) -> bool {
    b.len() > a.len() && b.starts_with(a)
}

#[test]
fn imports_follow_the_layers_readme_describes() {
    let layers = layers();
    assert!(layers.len() >= 5, "README lists its layers: {layers:?}");
    let krate = read_crate();
    let mut problems = Vec::new();

    // Every module has a place, and imports only its own layer or lower ones.
    for (module, (file, imports)) in &krate.modules {
        if module.is_empty() {
            continue; // lib.rs only declares the modules.
        }
        let Some((layer, _)) = place(&layers, module) else {
            problems.push(format!(
                "src/{file}: module {} is in no layer of README's list",
                show(module)
            ));
            continue;
        };
        for import in imports {
            if import.is_empty() || is_ancestor(import, module) || is_ancestor(module, import) {
                continue;
            }
            if let Some((to, _)) = place(&layers, import) {
                if to > layer {
                    problems.push(format!(
                        "src/{file}: imports crate::{} (layer {}) from layer {}",
                        show(import),
                        layers[to].0,
                        layers[layer].0
                    ));
                }
            }
        }
    }

    // No two modules import each other.
    for (module, (file, imports)) in &krate.modules {
        for import in imports {
            if is_ancestor(import, module) || is_ancestor(module, import) || import <= module {
                continue;
            }
            if let Some((other, back)) = krate.modules.get(import) {
                if back.contains(module) {
                    problems.push(format!(
                        "src/{file} and src/{other} import each other ({} <-> {})",
                        show(module),
                        show(import)
                    ));
                }
            }
        }
    }

    // No circle between the modules of the list.
    let mut graph: BTreeMap<ModPath, BTreeSet<ModPath>> = BTreeMap::new();
    for (module, (_, imports)) in &krate.modules {
        let Some((_, from)) = place(&layers, module) else {
            continue;
        };
        for import in imports {
            if let Some((_, to)) = place(&layers, import) {
                if to != from {
                    graph.entry(from.clone()).or_default().insert(to);
                }
            }
        }
    }
    if let Some(circle) = find_circle(&graph) {
        let names: Vec<String> = circle.iter().map(|m| show(m)).collect();
        problems.push(format!("circle between modules: {}", names.join(" -> ")));
    }

    assert!(
        problems.is_empty(),
        "imports against the layers (README.md, Layout):\n  {}",
        problems.join("\n  ")
    );
}

fn find_circle(graph: &BTreeMap<ModPath, BTreeSet<ModPath>>) -> Option<Vec<ModPath>> {
    fn visit(
        node: &ModPath,
        graph: &BTreeMap<ModPath, BTreeSet<ModPath>>,
        stack: &mut Vec<ModPath>,
        done: &mut BTreeSet<ModPath>,
    ) -> Option<Vec<ModPath>> {
        if let Some(at) = stack.iter().position(|n| n == node) {
            let mut circle = stack[at..].to_vec();
            circle.push(node.clone());
            return Some(circle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.clone());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(node.clone());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

#[test]
fn the_checker_reads_use_trees_and_skips_test_code() {
    let code = strip_test_code(&strip_comments_and_strings(
        "use crate::{a::{b, c::D}, e};\n// crate::zz\nfn f() { crate::g::h(); let s = \"crate::no\"; }\n\
         #[cfg(test)]\nmod tests { use crate::t; fn x() { let c = '{'; } }\nuse super::s;\n",
    ));
    let mut paths = named_paths(&code);
    paths.sort();
    assert_eq!(
        paths,
        [
            "crate::a::b",
            "crate::a::c::D",
            "crate::e",
            "crate::g::h",
            "super::s"
        ]
    );
}
