//! The deployment files (issues 6 and 20): the Dockerfile, the kustomize base, Namespace,
//! components and overlays in deploy/.
//!
//! - Everything is rendered with tests/kustomize, the subset of kustomize deploy/ uses; where
//!   `kubectl` is installed its `kubectl kustomize` output is compared with ours (Debian 12, where
//!   CI runs, packages neither kubectl nor kustomize).
//! - Every rendered built-in object validates offline, strictly (unknown fields are errors),
//!   against the schemas of Kubernetes 1.30 to 1.34 with `kubernetes-validate` (PyPI; `make deps`
//!   installs it in .tools/venv). The Prometheus Operator objects (ServiceMonitor,
//!   PrometheusRule) have no schema there: they are checked structurally here instead.
//! - An overlay that moves everything to another namespace is rendered and checked to agree with
//!   itself: the agent's ConfigMap, its RBAC (evaluated as the API server's authorizer does),
//!   the ServiceMonitor, the dashboard ConfigMap.
//! - Each overlay's config passes `netwarden validate`, in its ConfigMap form.
//! - The image (Dockerfile) and the version: tests/image.rs.

mod fake_apiserver;
mod kustomize;

use fake_apiserver::{Attributes, Rbac};
use kustomize::{id, render, yaml_docs, Overlay};
use serde_json::{Map, Value};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

const VERSIONS: &[&str] = &["1.30.0", "1.31.0", "1.32.0", "1.33.0", "1.34.0"];
const OVERLAYS: &[&str] = &["kube-router", "canal-flannel", "aws-vpc-cni"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy(path: &str) -> PathBuf {
    root().join("deploy").join(path)
}

/// Every directory an operator applies or builds on: the Namespace, the base (also through
/// deploy/ itself) and the overlays.
fn shipped_dirs() -> Vec<PathBuf> {
    [deploy("namespace"), root().join("deploy"), deploy("base")]
        .into_iter()
        .chain(OVERLAYS.iter().map(|o| deploy("examples").join(o)))
        .collect()
}

/// What an operator writes to run the agent in a namespace of their own: the base, every
/// optional part, and the AWS VPC CNI overlay's config (it asks for podLiveness).
fn other_namespace(ns: &str) -> Overlay {
    Overlay::new(
        ns,
        &[&deploy("base")],
        &[
            &deploy("components/pod-liveness"),
            &deploy("components/kube-prometheus-stack"),
            &deploy("grafana"),
        ],
        &[&deploy("examples/aws-vpc-cni/configmap.yaml")],
    )
}

fn find<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

fn config_of(objects: &[Value]) -> String {
    find(objects, "ConfigMap")["data"]["config.yaml"]
        .as_str()
        .expect("data.config.yaml")
        .to_owned()
}

fn sorted(mut v: Vec<Value>) -> Vec<Value> {
    v.sort_by_key(id);
    v
}

#[test]
fn our_rendering_matches_kubectl_kustomize_where_kubectl_exists() {
    let overlay = other_namespace("kube-system");
    let dirs: Vec<PathBuf> = shipped_dirs()
        .into_iter()
        .chain([overlay.path().to_path_buf()])
        .collect();
    for dir in dirs {
        let ours = sorted(render(&dir));
        let Ok(out) = Command::new("kubectl").arg("kustomize").arg(&dir).output() else {
            eprintln!("kubectl not installed: comparison with kubectl kustomize skipped");
            return;
        };
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let theirs: Vec<Value> =
            serde_saphyr::from_multiple(&String::from_utf8(out.stdout).unwrap()).unwrap();
        assert_eq!(
            ours,
            sorted(theirs),
            "{}: render() differs from kubectl",
            dir.display()
        );
    }
}

#[test]
fn render_applies_patches_and_refuses_unknown_fields() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("cm.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a, namespace: n}\ndata: {x: '1', y: '2'}\n",
    )
    .unwrap();
    std::fs::write(
        d.join("p.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a, namespace: n}\ndata: {x: '3', y: ~}\n",
    )
    .unwrap();
    std::fs::write(
        d.join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [cm.yaml]\npatches: [{path: p.yaml}]\n",
    )
    .unwrap();
    let o = render(d);
    assert_eq!(o[0]["data"], serde_json::json!({"x": "3"}));
    // namespace: moves every namespaced object and renames a Namespace.
    std::fs::write(
        d.join("ns.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: n}\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {name: c}\n",
    )
    .unwrap();
    std::fs::write(
        d.join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: m\nresources: [cm.yaml, ns.yaml]\n",
    )
    .unwrap();
    let o = render(d);
    let ids: BTreeSet<_> = o.iter().map(id).collect();
    assert_eq!(
        ids,
        BTreeSet::from([
            ("ConfigMap".into(), "m".into(), "a".into()),
            ("Namespace".into(), "".into(), "m".into()),
            ("ClusterRole".into(), "".into(), "c".into()),
        ])
    );
    std::fs::write(
        d.join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [cm.yaml]\nnamePrefix: x-\n",
    )
    .unwrap();
    assert!(std::panic::catch_unwind(|| render(d)).is_err());
}

fn kubernetes_validate() -> PathBuf {
    if let Some(p) = std::env::var_os("KUBERNETES_VALIDATE") {
        return p.into();
    }
    let venv = root().join(".tools/venv/bin/kubernetes-validate");
    if venv.exists() {
        return venv;
    }
    "kubernetes-validate".into()
}

/// Runs kubernetes-validate (strict) on the objects for one Kubernetes version: Ok or its report.
fn schema_check(objects: &[Value], version: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("objects.yaml");
    let text: Vec<String> = objects
        .iter()
        .map(|o| serde_json::to_string(o).unwrap())
        .collect();
    std::fs::write(&file, text.join("\n---\n")).unwrap();
    let out = Command::new(kubernetes_validate())
        .args(["--strict", "--quiet", "-k", version])
        .arg(&file)
        .output()
        .expect("kubernetes-validate (PyPI; `make deps` installs it in .tools/venv)");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every object here has a schema: a warning (no schema found) is a failure too.
    if out.status.success() && !report.contains("ERROR") && !report.contains("WARN") {
        Ok(())
    } else {
        Err(report)
    }
}

fn is_crd(o: &Value) -> bool {
    o["apiVersion"]
        .as_str()
        .unwrap()
        .starts_with("monitoring.coreos.com/")
}

#[test]
fn base_and_overlays_validate_against_kubernetes_schemas() {
    let mut all = Vec::new();
    let overlay = other_namespace("kube-system");
    for dir in shipped_dirs()
        .into_iter()
        .chain([overlay.path().to_path_buf()])
    {
        let objects = render(&dir);
        let expected = match dir.file_name().unwrap().to_str().unwrap() {
            "namespace" => 1,
            "aws-vpc-cni" => 12,
            _ if dir == overlay.path() => 13,
            _ => 10,
        };
        assert_eq!(
            objects.len(),
            expected,
            "{}: {:?}",
            dir.display(),
            objects.iter().map(id).collect::<Vec<_>>()
        );
        // The Namespace object is applied on its own, never with the agent.
        let namespaces = objects.iter().filter(|o| o["kind"] == "Namespace").count();
        assert_eq!(
            namespaces,
            usize::from(dir.ends_with("namespace")),
            "{}",
            dir.display()
        );
        all.extend(objects.into_iter().filter(|o| !is_crd(o)));
    }
    for v in VERSIONS {
        if let Err(report) = schema_check(&all, v) {
            panic!("Kubernetes {v}:\n{report}");
        }
    }
    // The check can fail: a misspelt field is refused.
    let mut bad = render(&root().join("deploy"));
    bad.retain(|o| o["kind"] == "DaemonSet");
    let spec = bad[0]["spec"]["template"]["spec"].as_object_mut().unwrap();
    spec.insert("hostNetwrk".into(), Value::Bool(true));
    let report = schema_check(&bad, VERSIONS[0]).unwrap_err();
    assert!(report.contains("hostNetwrk"), "{report}");
}

fn container(objects: &[Value]) -> &Value {
    &find(objects, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect()
}

/// The ConfigMap the agent of a rendered DaemonSet reads: `--configmap [NS/]NAME`, the namespace
/// otherwise from POD_NAMESPACE, resolved as the kubelet resolves the downward API.
fn configmap_read_by(objects: &[Value]) -> (String, String) {
    let ds = find(objects, "DaemonSet");
    let c = container(objects);
    let args = strings(&c["args"]);
    let value = args[args.iter().position(|a| *a == "--configmap").unwrap() + 1];
    if let Some((ns, name)) = value.split_once('/') {
        return (ns.to_owned(), name.to_owned());
    }
    let env = c["env"].as_array().unwrap();
    let pod_ns = env
        .iter()
        .find(|e| e["name"] == "POD_NAMESPACE")
        .expect("POD_NAMESPACE for a --configmap without a namespace");
    assert_eq!(
        pod_ns["valueFrom"]["fieldRef"]["fieldPath"], "metadata.namespace",
        "POD_NAMESPACE from the downward API"
    );
    (
        ds["metadata"]["namespace"].as_str().unwrap().to_owned(),
        value.to_owned(),
    )
}

/// The agent's ServiceAccount and what RBAC grants it, evaluated like the API server does.
fn rbac_of(objects: &[Value]) -> Rbac {
    let sa = find(objects, "ServiceAccount");
    let pod = &find(objects, "DaemonSet")["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], sa["metadata"]["name"]);
    Rbac::for_service_account(
        objects,
        sa["metadata"]["namespace"].as_str().unwrap(),
        sa["metadata"]["name"].as_str().unwrap(),
    )
}

fn request(
    verb: &str,
    group: &str,
    resource: &str,
    ns: Option<&str>,
    name: Option<&str>,
) -> Attributes {
    Attributes {
        verb: verb.into(),
        group: group.into(),
        resource: resource.into(),
        namespace: ns.map(Into::into),
        name: name.map(Into::into),
    }
}

/// Checks the RBAC of rendered manifests against what the agent asks for (src/cluster/run.rs),
/// and that it allows nothing next to it.
fn check_rbac(objects: &[Value], pods: bool) {
    let rbac = rbac_of(objects);
    let (ns, cm) = configmap_read_by(objects);
    let allowed = |a: &Attributes| rbac.allows(a);
    for verb in ["list", "watch"] {
        for a in [
            request(verb, "", "configmaps", Some(&ns), Some(&cm)),
            request(verb, "", "nodes", None, Some("node-1")),
            request(verb, "", "services", None, None),
            request(
                verb,
                "discovery.k8s.io",
                "endpointslices",
                Some("default"),
                Some("kubernetes"),
            ),
        ] {
            assert!(allowed(&a), "not allowed: {a:?}");
        }
        let pod_list = request(verb, "", "pods", None, None);
        assert_eq!(allowed(&pod_list), pods, "{pod_list:?}");
        for a in [
            request(verb, "", "configmaps", Some(&ns), None),
            request(verb, "", "configmaps", Some(&ns), Some("other")),
            request(verb, "", "configmaps", Some("elsewhere"), Some(&cm)),
            request(verb, "", "configmaps", None, Some(&cm)),
            request(
                verb,
                "discovery.k8s.io",
                "endpointslices",
                Some("default"),
                None,
            ),
            request(verb, "", "secrets", Some(&ns), None),
        ] {
            assert!(!allowed(&a), "allowed: {a:?}");
        }
    }
    // Events: created, and updated when they happen again (aggregation, src/cluster/events.rs);
    // the Node condition: a patch of the status subresource and nothing else of the Node.
    for a in [
        request("create", "", "events", Some("default"), None),
        request("patch", "", "events", Some("default"), Some("node-1.abc")),
        request("patch", "", "nodes/status", None, Some("node-1")),
    ] {
        assert!(allowed(&a), "not allowed: {a:?}");
    }
    for verb in ["get", "update", "patch", "delete"] {
        assert!(
            !allowed(&request(verb, "", "nodes", None, Some("node-1"))),
            "{verb} nodes"
        );
    }
    for verb in ["get", "update"] {
        assert!(
            !allowed(&request(verb, "", "nodes/status", None, Some("node-1"))),
            "{verb} nodes/status"
        );
    }
    for verb in ["get", "update", "delete", "create", "patch"] {
        assert!(
            !allowed(&request(verb, "", "configmaps", Some(&ns), Some(&cm))),
            "{verb}"
        );
        assert!(
            !allowed(&request(verb, "", "services", Some("default"), Some("x"))),
            "{verb}"
        );
    }
}

#[test]
fn rbac_grants_what_the_agent_asks_for_and_nothing_beside() {
    for dir in shipped_dirs()
        .into_iter()
        .filter(|d| !d.ends_with("namespace"))
    {
        let o = render(&dir);
        check_rbac(&o, dir.ends_with("aws-vpc-cni"));
    }
    // The evaluation can fail: without the Role, the ConfigMap cannot be read.
    let mut o = render(&deploy("base"));
    o.retain(|o| o["kind"] != "Role");
    let rbac = rbac_of(&o);
    assert!(!rbac.allows(&request(
        "list",
        "",
        "configmaps",
        Some("netwarden"),
        Some("netwarden")
    )));
}

#[test]
fn an_overlay_in_another_namespace_agrees_with_itself() {
    let o = other_namespace("kube-system").render();
    // Everything namespaced moved; nothing is left in `netwarden`, and no Namespace object.
    for obj in &o {
        let (kind, ns, name) = id(obj);
        assert_ne!(kind, "Namespace");
        if !kustomize::is_cluster_scoped(obj) {
            assert_eq!(ns, "kube-system", "{kind} {name}");
        }
        for s in obj["subjects"].as_array().into_iter().flatten() {
            assert_eq!(s["namespace"], "kube-system", "{kind} {name}: {s}");
        }
    }
    // The agent reads the overlay's ConfigMap, which holds the AWS VPC CNI config.
    let (ns, name) = configmap_read_by(&o);
    let cm = o
        .iter()
        .find(|x| x["kind"] == "ConfigMap" && x["metadata"]["name"] == name.as_str())
        .expect("the ConfigMap the agent reads");
    assert_eq!(cm["metadata"]["namespace"], ns.as_str());
    assert!(cm["data"]["config.yaml"]
        .as_str()
        .unwrap()
        .contains("aws-vpc-cni"));
    // Its RBAC covers that ConfigMap, the Pods (podLiveness) and nothing in `netwarden`.
    check_rbac(&o, true);
    assert!(!rbac_of(&o).allows(&request(
        "list",
        "",
        "configmaps",
        Some("netwarden"),
        Some(&name)
    )));
    // Prometheus finds the Service from the ServiceMonitor's own namespace, and the stack's
    // selector label is on both Prometheus Operator objects.
    let sm = find(&o, "ServiceMonitor");
    let svc = find(&o, "Service");
    assert_eq!(sm["metadata"]["namespace"], svc["metadata"]["namespace"]);
    let selector = &sm["spec"]["namespaceSelector"];
    assert!(
        selector.is_null() || strings(&selector["matchNames"]).contains(&"kube-system"),
        "{selector}"
    );
    for kind in ["ServiceMonitor", "PrometheusRule"] {
        assert_eq!(
            find(&o, kind)["metadata"]["labels"]["release"],
            "kube-prometheus-stack"
        );
    }
    // The dashboard ConfigMap for the Grafana sidecar is the JSON file, byte for byte.
    let dash = o
        .iter()
        .find(|x| x["metadata"]["labels"]["grafana_dashboard"] == "1")
        .expect("the dashboard ConfigMap");
    let json = std::fs::read_to_string(deploy("grafana/netwarden.json")).unwrap();
    assert_eq!(dash["data"]["netwarden.json"], json.as_str());
    serde_json::from_str::<Value>(dash["data"]["netwarden.json"].as_str().unwrap()).unwrap();
}

#[test]
fn daemonset_is_least_privilege_and_host_wide() {
    let o = render(&root().join("deploy"));
    let ds = find(&o, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    // src/telemetry/attribution.rs reads /proc/PID/fd of the node's processes.
    assert_eq!(pod["hostPID"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert!(pod["tolerations"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["operator"] == "Exists" && t.get("key").is_none() && t.get("effect").is_none()));
    // It tolerates every taint: only the node selector keeps it off Windows nodes.
    assert_eq!(pod["nodeSelector"]["kubernetes.io/os"], "linux");
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
    let sa = find(&o, "ServiceAccount");
    assert_eq!(pod["serviceAccountName"], sa["metadata"]["name"]);
    assert_eq!(sa["metadata"]["namespace"], ds["metadata"]["namespace"]);
    let binding = find(&o, "ClusterRoleBinding");
    assert_eq!(
        binding["subjects"][0]["namespace"],
        sa["metadata"]["namespace"]
    );

    let c = container(&o);
    let sc = &c["securityContext"];
    assert_ne!(sc["privileged"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    let add: BTreeSet<&str> = strings(&sc["capabilities"]["add"]).into_iter().collect();
    // SYS_PTRACE and DAC_READ_SEARCH: attribution of changes to processes of another uid or
    // with more capabilities (tests/observability.rs runs the agent with exactly this set).
    assert_eq!(
        add,
        BTreeSet::from(["NET_ADMIN", "NET_RAW", "SYS_PTRACE", "DAC_READ_SEARCH"])
    );
    // The same on AppArmor nodes (the runtime's default profile closes ptrace read access).
    assert_eq!(sc["appArmorProfile"]["type"], "Unconfined");

    let env = c["env"].as_array().unwrap();
    assert!(env
        .iter()
        .any(|e| e["name"] == "NODE_NAME"
            && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"));
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(c[probe]["httpGet"]["path"], path);
        assert_eq!(c[probe]["httpGet"]["port"], 10370);
    }
    // No CPU limit (CFS throttling would delay repairs); requests for both, a memory limit.
    let res = &c["resources"];
    assert!(res["requests"]["cpu"].is_string() && res["requests"]["memory"].is_string());
    assert!(res["limits"]["memory"].is_string());
    assert!(res["limits"].get("cpu").is_none(), "{res}");
    assert_eq!(c["terminationMessagePolicy"], "FallbackToLogsOnError");
    // RUST_LOG is what the binary reads when no --log-level is given.
    assert!(env.iter().any(|e| e["name"] == "RUST_LOG"));

    // The args name the ConfigMap (in the pod's own namespace), the state file on the hostPath
    // and the metrics port.
    let args = strings(&c["args"]);
    let arg = |flag: &str| args[args.iter().position(|a| *a == flag).unwrap() + 1];
    let cm = find(&o, "ConfigMap");
    assert_eq!(
        configmap_read_by(&o),
        (
            cm["metadata"]["namespace"].as_str().unwrap().to_owned(),
            cm["metadata"]["name"].as_str().unwrap().to_owned()
        )
    );
    assert!(
        !arg("--configmap").contains('/'),
        "the namespace comes from the pod"
    );
    assert_eq!(arg("--metrics-addr"), "0.0.0.0:10370");
    let mounts = c["volumeMounts"].as_array().unwrap();
    let volumes = pod["volumes"].as_array().unwrap();
    let host_path_at = |mount: &str| {
        let m = mounts.iter().find(|m| m["mountPath"] == mount).unwrap();
        let v = volumes.iter().find(|v| v["name"] == m["name"]).unwrap();
        v["hostPath"]["path"].as_str().unwrap().to_owned()
    };
    assert_eq!(host_path_at("/var/lib/netwarden"), "/var/lib/netwarden");
    assert!(arg("--state-file").starts_with("/var/lib/netwarden/"));
    assert_eq!(host_path_at("/run/xtables.lock"), "/run/xtables.lock");
    // Settings are written through the host's /proc/sys/net (the container's is read-only),
    // where --sysctl-dir points.
    assert_eq!(host_path_at(arg("--sysctl-dir")), "/proc/sys/net");
    // Every volume mounted by the read-only container is a hostPath or an emptyDir.
    assert!(volumes
        .iter()
        .all(|v| v.get("hostPath").is_some() || v.get("emptyDir").is_some()));

    // Every flag the DaemonSet passes is one `netwarden run` knows.
    let help = Command::new(env!("CARGO_BIN_EXE_netwarden"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for a in args.iter().filter(|a| a.starts_with("--")) {
        assert!(help.contains(a), "`netwarden run` has no {a}:\n{help}");
    }
    assert_eq!(args[0], "run");
}

#[test]
fn service_monitor_and_prometheus_rule_match_the_service_and_alerts() {
    let o = render(&root().join("deploy"));
    let svc = find(&o, "Service");
    let pod_labels = &find(&o, "DaemonSet")["spec"]["template"]["metadata"]["labels"];
    for (k, v) in svc["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&pod_labels[k], v, "Service selector {k}");
    }
    let port = &svc["spec"]["ports"][0];
    assert_eq!(port["port"], 10370);
    assert!(container(&o)["ports"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == port["targetPort"] && p["containerPort"] == 10370));

    let sm = find(&o, "ServiceMonitor");
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    for (k, v) in sm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(
            &svc["metadata"]["labels"][k], v,
            "ServiceMonitor selector {k}"
        );
    }
    assert_eq!(sm["spec"]["endpoints"][0]["port"], port["name"]);
    assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
    // No namespaceSelector: the ServiceMonitor's own namespace, which is the Service's.
    assert!(sm["spec"].get("namespaceSelector").is_none());
    assert_eq!(sm["metadata"]["namespace"], svc["metadata"]["namespace"]);
    // The alerts and dashboard assume job="netwarden": the ServiceMonitor's jobLabel gives it.
    let job_label = sm["spec"]["jobLabel"].as_str().unwrap();
    assert_eq!(svc["metadata"]["labels"][job_label], "netwarden");

    let rule = find(&o, "PrometheusRule");
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    let alerts = yaml_docs(&root().join("deploy/prometheus/alerts.yaml"));
    assert_eq!(
        rule["spec"]["groups"], alerts[0]["groups"],
        "prometheusrule.yaml is stale: run deploy/prometheus/gen-prometheusrule.sh"
    );
    let spec: &Map<String, Value> = rule["spec"].as_object().unwrap();
    assert_eq!(spec.keys().collect::<Vec<_>>(), ["groups"]);
}

fn validate_kubernetes(config: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.yaml");
    std::fs::write(&file, config).unwrap();
    Command::new(env!("CARGO_BIN_EXE_netwarden"))
        .args(["validate", "--kubernetes"])
        .arg(&file)
        .output()
        .unwrap()
}

fn validate_stdin(text: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_netwarden"))
        .args(["validate", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn overlay_configs_pass_netwarden_validate_and_protect_the_incident_objects() {
    for overlay in OVERLAYS {
        let o = render(&root().join("deploy/examples").join(overlay));
        let config = config_of(&o);
        let out = validate_kubernetes(&config);
        assert!(
            out.status.success(),
            "{overlay}: netwarden validate --kubernetes:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let doc: Value = serde_saphyr::from_str(&config).unwrap();
        let spec = &doc["spec"];
        let list = |k: &str| spec[k].as_array().cloned().unwrap_or_default();
        match *overlay {
            "kube-router" => {
                assert!(list("rules")
                    .iter()
                    .any(|r| r["table"] == 77
                        && r["from"].as_str().unwrap().contains("node.podCIDRs")));
                let sets = list("ipsets");
                for name in ["kube-router-svip", "inet6:kube-router-svip"] {
                    let set = sets.iter().find(|s| s["name"] == name).unwrap();
                    let forbidden = strings(&set["forbidden"]).join(" ");
                    assert!(forbidden.contains("apiserver.endpoints"), "{name}");
                    assert!(forbidden.contains("node.internalIPs"), "{name}");
                    assert_ne!(set["membership"], "exact", "{name} must not remove members");
                }
            }
            "canal-flannel" => {
                let chains = list("chains");
                let postrtg = chains
                    .iter()
                    .find(|c| c["chain"] == "FLANNEL-POSTRTG")
                    .unwrap();
                assert_eq!(postrtg["table"], "nat");
                assert!(postrtg["jumps"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|j| j["chain"] == "POSTROUTING"
                        && j["rule"].as_str().unwrap().ends_with("-j FLANNEL-POSTRTG")));
                assert!(strings(&postrtg["rules"])
                    .iter()
                    .any(|r| r.contains("MASQUERADE")));
                let fwd = chains.iter().find(|c| c["chain"] == "FLANNEL-FWD").unwrap();
                assert_eq!(fwd["table"], "filter");
                assert!(fwd["jumps"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|j| j["chain"] == "FORWARD"));
            }
            "aws-vpc-cni" => {
                assert!(list("rules").iter().any(|r| r["priority"] == 1024));
                assert!(list("adopt")
                    .iter()
                    .any(|a| a["podLiveness"] == true && a["owners"][0] == "aws-k8s-agent"));
                assert!(list("routes").iter().any(|r| r["destination"] == "default"
                    && r["gateway"].as_str().unwrap().contains("node.annotations")));
            }
            _ => unreachable!(),
        }
    }
    // The check can fail: a misspelt field in an overlay's config is refused.
    let o = render(&root().join("deploy/examples/kube-router"));
    // In the form the overlays ship it: the ConfigMap manifest itself, and the whole rendered
    // overlay on standard input (`kubectl kustomize … | netwarden validate -`).
    for overlay in OVERLAYS {
        let manifest = deploy("examples").join(overlay).join("configmap.yaml");
        let out = Command::new(env!("CARGO_BIN_EXE_netwarden"))
            .arg("validate")
            .arg(&manifest)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{overlay}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("ConfigMap netwarden/netwarden data.config.yaml: valid"),
            "{stdout}"
        );
        let stream: Vec<String> = render(&deploy("examples").join(overlay))
            .iter()
            .map(|o| serde_json::to_string(o).unwrap())
            .collect();
        let out = validate_stdin(&stream.join("\n---\n"));
        assert!(
            out.status.success(),
            "{overlay} on stdin: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = validate_kubernetes(&config_of(&o).replace("table: 77", "tabel: 77"));
    assert_eq!(out.status.code(), Some(2));
    // Templates need --kubernetes: the overlays really use Kubernetes mode.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.yaml");
    std::fs::write(&file, config_of(&o)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_netwarden"))
        .arg("validate")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
