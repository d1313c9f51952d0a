//! The image and the version (issues 6 and 20): the Dockerfile is checked statically (there is
//! no container engine in CI) and with hadolint where `make deps` installed it; the version is
//! the same in Cargo.toml, `netwarden --version`, the image tag and labels deploy/base sets, and
//! the CHANGELOG.

mod kustomize;

use kustomize::render;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn cargo_version() -> String {
    std::fs::read_to_string(root().join("Cargo.toml"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("version = \"")
                .map(|v| v.trim_end_matches('"').to_owned())
        })
        .unwrap()
}

#[test]
fn the_version_is_the_same_everywhere() {
    let version = cargo_version();
    let o = render(&root().join("deploy/base"));
    let ds = o.iter().find(|x| x["kind"] == "DaemonSet").unwrap();
    let image = ds["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap();
    assert_eq!(
        kustomize::split_image(image),
        ("netwarden", Some(version.as_str()))
    );
    for obj in &o {
        assert_eq!(
            obj["metadata"]["labels"]["app.kubernetes.io/version"],
            version.as_str(),
            "{:?}",
            kustomize::id(obj)
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_netwarden"))
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("netwarden {version}")
    );
    let changelog = std::fs::read_to_string(root().join("CHANGELOG.md")).unwrap();
    assert!(
        changelog
            .lines()
            .any(|l| l.starts_with(&format!("## [{version}]"))),
        "CHANGELOG.md has no section for {version}"
    );
}

/// The instructions of a Dockerfile, continuation lines joined, comments dropped.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => {
                cur.push_str(part.trim_end());
                cur.push(' ');
            }
            None => {
                cur.push_str(t);
                let (op, args) = cur.split_once(' ').unwrap_or((&cur, ""));
                out.push((op.to_uppercase(), args.trim().to_owned()));
                cur.clear();
            }
        }
    }
    out
}

#[test]
fn dockerfile_is_multi_stage_pinned_and_runs_the_agent() {
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let ins = instructions(&text);
    // FROM [--platform=…] IMAGE AS NAME
    let platform_of = |a: &str| {
        a.split_whitespace()
            .find_map(|w| w.strip_prefix("--platform="))
            .map(str::to_owned)
    };
    let froms: Vec<String> = ins
        .iter()
        .filter(|(op, _)| op == "FROM")
        .map(|(_, a)| {
            a.split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    assert_eq!(froms.len(), 2, "{froms:?}");
    for from in &froms {
        let image = from.split_whitespace().next().unwrap();
        let (name, tag) = image
            .split_once(':')
            .unwrap_or_else(|| panic!("{image}: no tag"));
        assert!(!tag.is_empty() && tag != "latest", "{image}: pin a tag");
        assert!(!name.is_empty());
    }
    assert!(froms[0].starts_with("rust:1.") && froms[0].contains("bookworm AS build"));
    // The build toolchain is at least the crate's rust-version.
    let msrv = std::fs::read_to_string(root().join("Cargo.toml"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("rust-version = \"")
                .map(|v| v.trim_end_matches('"').to_owned())
        })
        .unwrap();
    let minor = |v: &str| {
        v.split('.')
            .nth(1)
            .unwrap()
            .split('-')
            .next()
            .unwrap()
            .parse::<u32>()
            .unwrap()
    };
    assert!(minor(froms[0].split_whitespace().next().unwrap()) >= minor(&msrv));
    assert!(froms[1].starts_with("debian:bookworm-slim"));

    // amd64 and arm64 from this one file: the build stage runs on the build machine's platform
    // and cross-compiles for TARGETARCH (a runtime stage without --platform is the target's).
    let build_from = ins.iter().find(|(op, _)| op == "FROM").unwrap();
    assert_eq!(
        platform_of(&build_from.1).as_deref(),
        Some("$BUILDPLATFORM")
    );
    let runtime_from = ins.iter().rfind(|(op, _)| op == "FROM").unwrap();
    assert_eq!(platform_of(&runtime_from.1), None);
    let build_end = ins.iter().rposition(|(op, _)| op == "FROM").unwrap();
    let build = &ins[..build_end];
    assert!(build.iter().any(|(op, a)| op == "ARG" && a == "TARGETARCH"));
    let build_text: String = build
        .iter()
        .map(|(_, a)| a.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    for (arch, triple) in [
        ("amd64", "x86_64-unknown-linux-gnu"),
        ("arm64", "aarch64-unknown-linux-gnu"),
    ] {
        assert!(
            build_text.contains(&format!("{arch})")) && build_text.contains(triple),
            "no {arch} ({triple}) in the build stage"
        );
        let env = format!(
            "CARGO_TARGET_{}_LINKER",
            triple.to_uppercase().replace('-', "_")
        );
        assert!(build_text.contains(&env), "no {env}");
    }
    assert!(build_text.contains("rustup target add"));
    // The binary is the `dist` profile's: stripped of its symbols.
    let cargo_build = build
        .iter()
        .find(|(op, a)| op == "RUN" && a.contains("cargo build"))
        .unwrap();
    assert!(cargo_build.1.contains("--profile dist") && cargo_build.1.contains("--locked"));
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let dist = manifest
        .split("[profile.dist]")
        .nth(1)
        .expect("[profile.dist]");
    assert!(dist.contains("strip = \"symbols\""), "{dist}");

    // The runtime stage installs the tools the agent runs, and only those.
    let runtime_start = ins.iter().rposition(|(op, _)| op == "FROM").unwrap();
    let runtime = &ins[runtime_start..];
    let install = runtime
        .iter()
        .find(|(op, a)| op == "RUN" && a.contains("apt-get install"))
        .map(|(_, a)| a.split_whitespace().collect::<Vec<_>>())
        .expect("apt-get install in the runtime stage");
    let at = install.iter().position(|w| *w == "install").unwrap();
    let packages: BTreeSet<&str> = install[at + 1..]
        .iter()
        .take_while(|w| **w != "&&")
        .filter(|w| !w.starts_with('-'))
        .copied()
        .collect();
    assert_eq!(packages, BTreeSet::from(["iptables", "ipset", "nftables"]));
    assert!(runtime
        .iter()
        .any(|(op, a)| op == "COPY" && a.starts_with("--from=build") && a.contains("netwarden")));
    // Root on purpose (capabilities need it), stated explicitly; the entrypoint execs the agent.
    let user = runtime.iter().rfind(|(op, _)| op == "USER").expect("USER");
    assert!(["0", "0:0", "root"].contains(&user.1.as_str()), "{user:?}");
    let entry = runtime
        .iter()
        .rfind(|(op, _)| op == "ENTRYPOINT")
        .expect("ENTRYPOINT");
    let entry: Vec<String> = serde_json::from_str(&entry.1).expect("ENTRYPOINT in exec form");
    let script = std::fs::read_to_string(root().join("deploy/entrypoint.sh")).unwrap();
    assert!(runtime.iter().any(|(op, a)| op == "COPY"
        && a.starts_with("deploy/entrypoint.sh")
        && a.ends_with(&entry[0])));
    assert!(script
        .lines()
        .last()
        .unwrap()
        .starts_with("exec /usr/local/bin/netwarden \"$@\""));
    let sh = Command::new("sh")
        .arg("-n")
        .arg(root().join("deploy/entrypoint.sh"))
        .status()
        .unwrap();
    assert!(sh.success());
    assert!(runtime.iter().any(|(op, a)| op == "EXPOSE" && a == "10370"));
    // Everything the build stage copies exists (include_str! needs examples/).
    for (op, a) in &ins[..runtime_start] {
        if op == "COPY" {
            let parts: Vec<&str> = a.split_whitespace().collect();
            for src in &parts[..parts.len() - 1] {
                assert!(root().join(src).exists(), "COPY {src}: missing");
            }
        }
    }
    // The image's default command is the DaemonSet's: the ConfigMap of the pod's namespace.
    let cmd = runtime.iter().rfind(|(op, _)| op == "CMD").expect("CMD");
    let cmd: Vec<String> = serde_json::from_str(&cmd.1).unwrap();
    assert_eq!(cmd, ["run", "--configmap", "netwarden"]);
    // hadolint, where installed (`make deps` puts it in .tools/venv).
    let hadolint = root().join(".tools/venv/bin/hadolint");
    if hadolint.exists() {
        let out = Command::new(&hadolint)
            .arg("--no-color")
            .arg(root().join("Dockerfile"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "hadolint:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        eprintln!("hadolint not installed (make deps): Dockerfile lint skipped");
    }
    // The Dockerfile parser itself can fail.
    assert_eq!(
        instructions("FROM a:1 \\\n  AS b\n# c\nRUN x")[0].1,
        "a:1 AS b"
    );
}
