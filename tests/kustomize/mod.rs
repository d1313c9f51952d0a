//! The subset of kustomize (v5) that deploy/ uses, for tests/manifests.rs and the RBAC the fake
//! API server enforces in tests/kubernetes.rs. Any other kustomization field is refused, so a
//! new one cannot be silently ignored; tests/manifests.rs compares the output with
//! `kubectl kustomize` where kubectl is installed.
//!
//! A kustomization is built as kustomize builds it: its `resources` (files, or directories built
//! first), then its `components` (each adds its resources and generators and applies its patches
//! to everything accumulated so far), then its `configMapGenerator`, then its transformers in
//! kustomize's order: `patches` (strategic merge of maps: maps merge key by key, `null` deletes,
//! anything else replaces; the patch names its target by kind, namespace and name as they are
//! before this kustomization's `namespace:`), `namespace`, `labels`, `images`.
#![allow(dead_code)] // each test binary uses its own subset

use serde_json::{json, Map, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

pub fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
        .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

/// Strategic merge of maps as kustomize does it for the fields used here: maps merge key by key,
/// `null` deletes, anything else (strings, lists) replaces.
pub fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    b.remove(k);
                } else if let Some(old) = b.get_mut(k) {
                    merge(old, v);
                } else {
                    b.insert(k.clone(), v.clone());
                }
            }
        }
        (b, p) => *b = p.clone(),
    }
}

/// (kind, namespace, name).
pub fn id(o: &Value) -> (String, String, String) {
    let s = |v: &Value| v.as_str().unwrap_or("").to_owned();
    (
        s(&o["kind"]),
        s(&o["metadata"]["namespace"]),
        s(&o["metadata"]["name"]),
    )
}

/// Kinds without a namespace, among those kustomize knows (the ones that can occur here).
const CLUSTER_SCOPED: &[&str] = &[
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PriorityClass",
    "Node",
    "PersistentVolume",
    "StorageClass",
];

pub fn is_cluster_scoped(o: &Value) -> bool {
    CLUSTER_SCOPED.contains(&o["kind"].as_str().unwrap_or(""))
}

/// Renders a kustomization directory.
pub fn render(dir: &Path) -> Vec<Value> {
    let objects = build(dir, Vec::new(), "Kustomization");
    let ids: BTreeSet<_> = objects.iter().map(id).collect();
    assert_eq!(
        ids.len(),
        objects.len(),
        "{}: duplicate objects",
        dir.display()
    );
    objects
}

const FIELDS: &[&str] = &[
    "apiVersion",
    "kind",
    "resources",
    "components",
    "patches",
    "namespace",
    "labels",
    "images",
    "configMapGenerator",
];

fn list<'a>(k: &'a Map<String, Value>, key: &str) -> impl Iterator<Item = &'a Value> {
    k.get(key).and_then(Value::as_array).into_iter().flatten()
}

/// Builds `dir` (a Kustomization, or a Component applied to `acc`).
fn build(dir: &Path, mut acc: Vec<Value>, expect: &str) -> Vec<Value> {
    let k = yaml_docs(&dir.join("kustomization.yaml"));
    assert_eq!(k.len(), 1, "{}: one document", dir.display());
    let k = k[0].as_object().unwrap();
    for key in k.keys() {
        assert!(
            FIELDS.contains(&key.as_str()),
            "{}: `{key}` is not in the kustomize subset tests/kustomize renders; extend it",
            dir.display()
        );
    }
    assert_eq!(
        k.get("kind")
            .and_then(Value::as_str)
            .unwrap_or("Kustomization"),
        expect,
        "{}",
        dir.display()
    );
    for r in list(k, "resources") {
        let path = dir.join(r.as_str().unwrap());
        if path.is_dir() {
            acc.extend(render(&path));
        } else {
            acc.extend(yaml_docs(&path));
        }
    }
    for c in list(k, "components") {
        acc = build(&dir.join(c.as_str().unwrap()), acc, "Component");
    }
    for g in list(k, "configMapGenerator") {
        acc.push(generate_configmap(dir, g));
    }
    for p in list(k, "patches") {
        let p = p.as_object().unwrap();
        assert_eq!(
            p.keys().collect::<Vec<_>>(),
            ["path"],
            "{}: only `path` patches",
            dir.display()
        );
        for patch in yaml_docs(&dir.join(p["path"].as_str().unwrap())) {
            let target = acc
                .iter_mut()
                .find(|o| id(o) == id(&patch) && o["apiVersion"] == patch["apiVersion"])
                .unwrap_or_else(|| {
                    panic!("{}: patch target {:?} missing", dir.display(), id(&patch))
                });
            merge(target, &patch);
        }
    }
    if let Some(ns) = k.get("namespace") {
        set_namespace(&mut acc, ns.as_str().unwrap());
    }
    for l in list(k, "labels") {
        add_labels(&mut acc, l);
    }
    for i in list(k, "images") {
        set_image(&mut acc, i);
    }
    acc
}

/// `configMapGenerator` with `files` and `disableNameSuffixHash: true` (a hashed name would be
/// the generator's own hash function, not reproduced here).
fn generate_configmap(dir: &Path, g: &Value) -> Value {
    let g = g.as_object().unwrap();
    for key in g.keys() {
        assert!(
            ["name", "namespace", "files", "options"].contains(&key.as_str()),
            "configMapGenerator: `{key}` not supported"
        );
    }
    let options = g.get("options").cloned().unwrap_or(json!({}));
    assert_eq!(
        options["disableNameSuffixHash"], true,
        "configMapGenerator: only with disableNameSuffixHash: true"
    );
    let mut data = Map::new();
    for f in g["files"].as_array().unwrap() {
        let f = f.as_str().unwrap();
        assert!(
            !f.contains('='),
            "configMapGenerator: `key=path` files not supported"
        );
        let text = std::fs::read_to_string(dir.join(f)).unwrap();
        let key = Path::new(f).file_name().unwrap().to_str().unwrap();
        data.insert(key.to_owned(), Value::String(text));
    }
    let mut metadata = json!({"name": g["name"]});
    if let Some(ns) = g.get("namespace") {
        metadata["namespace"] = ns.clone();
    }
    if let Some(labels) = options.get("labels") {
        metadata["labels"] = labels.clone();
    }
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
}

/// kustomize's `namespace:`: every namespaced object moves (whatever namespace it had), the
/// Namespace object is renamed, and ServiceAccount subjects of bindings follow when they name a
/// ServiceAccount of this build (or the `default` one).
fn set_namespace(objects: &mut [Value], ns: &str) {
    let accounts: BTreeSet<(String, String)> = objects
        .iter()
        .filter(|o| o["kind"] == "ServiceAccount")
        .map(|o| {
            let (_, n, name) = id(o);
            (n, name)
        })
        .collect();
    for o in objects.iter_mut() {
        if o["kind"] == "Namespace" {
            o["metadata"]["name"] = json!(ns);
        } else if !is_cluster_scoped(o) {
            o["metadata"]["namespace"] = json!(ns);
        }
        if matches!(
            o["kind"].as_str(),
            Some("RoleBinding" | "ClusterRoleBinding")
        ) {
            for s in o["subjects"].as_array_mut().into_iter().flatten() {
                let key = (
                    s["namespace"].as_str().unwrap_or("").to_owned(),
                    s["name"].as_str().unwrap_or("").to_owned(),
                );
                if s["kind"] == "ServiceAccount" && (key.1 == "default" || accounts.contains(&key))
                {
                    s["namespace"] = json!(ns);
                }
            }
        }
    }
}

/// `labels:` with `pairs` and `includeTemplates` (never `includeSelectors`).
fn add_labels(objects: &mut [Value], l: &Value) {
    let l = l.as_object().unwrap();
    for key in l.keys() {
        assert!(
            ["pairs", "includeTemplates"].contains(&key.as_str()),
            "labels: `{key}` not supported"
        );
    }
    let pairs = l["pairs"].as_object().unwrap();
    let templates = l.get("includeTemplates") == Some(&Value::Bool(true));
    for o in objects.iter_mut() {
        let mut at = vec!["/metadata/labels"];
        if templates && o.pointer("/spec/template/metadata").is_some() {
            at.push("/spec/template/metadata/labels");
        }
        for path in at {
            let parent = path.rsplit_once('/').unwrap().0;
            if o.pointer(path).is_none() {
                o.pointer_mut(parent).unwrap()["labels"] = json!({});
            }
            let labels = o.pointer_mut(path).unwrap().as_object_mut().unwrap();
            for (k, v) in pairs {
                labels.insert(k.clone(), v.clone());
            }
        }
    }
}

/// `images:` with `name`, `newName`, `newTag`, on the containers of pod templates.
fn set_image(objects: &mut [Value], i: &Value) {
    let i = i.as_object().unwrap();
    for key in i.keys() {
        assert!(
            ["name", "newName", "newTag"].contains(&key.as_str()),
            "images: `{key}` not supported"
        );
    }
    for o in objects.iter_mut() {
        for list in ["containers", "initContainers"] {
            let Some(cs) = o
                .pointer_mut(&format!("/spec/template/spec/{list}"))
                .and_then(Value::as_array_mut)
            else {
                continue;
            };
            for c in cs {
                let image = c["image"].as_str().unwrap().to_owned();
                let (name, tag) = split_image(&image);
                if name != i["name"].as_str().unwrap() {
                    continue;
                }
                let name = i.get("newName").and_then(Value::as_str).unwrap_or(name);
                let tag = i.get("newTag").and_then(Value::as_str).or(tag);
                c["image"] = json!(match tag {
                    Some(t) => format!("{name}:{t}"),
                    None => name.to_owned(),
                });
            }
        }
    }
}

/// `registry:5000/name:tag` → (`registry:5000/name`, `Some("tag")`).
pub fn split_image(image: &str) -> (&str, Option<&str>) {
    assert!(!image.contains('@'), "image digests not supported: {image}");
    let slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[slash..].rfind(':') {
        Some(c) => (&image[..slash + c], Some(&image[slash + c + 1..])),
        None => (image, None),
    }
}

/// A relative path from `from` (a directory) to `to`, as kustomization files need.
pub fn relative(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<_> = from.components().collect();
    let to: Vec<_> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for c in &to[common..] {
        out.push(c);
    }
    out
}

/// An overlay as an operator writes one: in a temporary directory under the target dir (kustomize
/// wants relative paths), with `namespace:`, resources, components and patch files (copied in).
pub struct Overlay {
    pub dir: tempfile::TempDir,
}

impl Overlay {
    pub fn new(
        namespace: &str,
        resources: &[&Path],
        components: &[&Path],
        patches: &[&Path],
    ) -> Overlay {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let rel = |p: &Path| {
            let p = p.canonicalize().unwrap();
            relative(dir.path(), &p).display().to_string()
        };
        let mut k = json!({
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "namespace": namespace,
            "resources": resources.iter().map(|p| rel(p)).collect::<Vec<_>>(),
        });
        if !components.is_empty() {
            k["components"] = json!(components.iter().map(|p| rel(p)).collect::<Vec<_>>());
        }
        let mut names = Vec::new();
        for (n, p) in patches.iter().enumerate() {
            let name = format!("patch-{n}.yaml");
            std::fs::copy(p, dir.path().join(&name)).unwrap();
            names.push(json!({"path": name}));
        }
        if !names.is_empty() {
            k["patches"] = json!(names);
        }
        std::fs::write(
            dir.path().join("kustomization.yaml"),
            serde_json::to_string_pretty(&k).unwrap(),
        )
        .unwrap();
        Overlay { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn render(&self) -> Vec<Value> {
        render(self.path())
    }
}
