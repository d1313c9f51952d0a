//! A scratch network namespace for one run of the iptables tools: the rule specs of the config
//! are restored there and read back, so that they can be compared in the form the kernel will
//! hold (see [`crate::netfilter::canon`]). The namespace belongs to the run's processes only and goes away
//! with them: nothing is seen in the node's namespaces, and nothing is mounted or named.
//!
//! The namespace comes from util-linux `unshare`. First with a user namespace of its own
//! (`--user --net --keep-caps`), which needs no capability beyond those the agent has in its
//! DaemonSet (NET_ADMIN, NET_RAW): the tools run with CAP_NET_ADMIN over the scratch namespace
//! only. Where user namespaces are not allowed, `--net` alone, which needs CAP_SYS_ADMIN.
//! `NETWARDEN_SCRATCH_NETNS=off` turns the scratch namespace off (rule specs are then compared as
//! written).

use super::{self as tools, Backend, ScratchError, ScratchRun, ToolError};

/// Creates the sets (name, type, family triples), applies the restore input from stdin, prints
/// the table. The data never becomes script text: it arrives as arguments and on stdin.
const SCRIPT: &str = r#"set -e
restore=$1; save=$2; table=$3; shift 3
while [ "$#" -ge 3 ]; do ipset create "$1" "$2" family "$3"; shift 3; done
"$restore" --noflush
exec "$save" -t "$table"
"#;

/// The environment variable that turns the scratch namespace off.
pub const DISABLE_ENV: &str = "NETWARDEN_SCRATCH_NETNS";

pub fn disabled() -> bool {
    std::env::var(DISABLE_ENV).is_ok_and(|v| matches!(v.as_str(), "off" | "0" | "false" | "no"))
}

pub async fn run(backend: Backend, job: &ScratchRun) -> Result<String, ScratchError> {
    if disabled() {
        return Err(ScratchError::Unavailable(format!("{DISABLE_ENV}=off")));
    }
    let restore = backend.restore_binary(job.table.family);
    let save = backend.save_binary(job.table.family);
    let mut script: Vec<&str> = vec![
        "sh",
        "-c",
        SCRIPT,
        "sh",
        &restore,
        &save,
        job.table.table.as_str(),
    ];
    for (name, kind, family) in &job.sets {
        script.extend([name.as_str(), kind.as_str(), family]);
    }
    let mut why = Vec::new();
    for how in [&["--user", "--net", "--keep-caps"][..], &["--net"][..]] {
        let args: Vec<&str> = how
            .iter()
            .copied()
            .chain(["--"])
            .chain(script.iter().copied())
            .collect();
        match tools::run("unshare", &args, Some(&job.input)).await {
            Ok(out) => return Ok(out.stdout),
            Err(ToolError::Failed { stderr, .. }) if stderr.starts_with("unshare:") => {
                why.push(stderr);
            }
            Err(e @ ToolError::Spawn { .. }) => {
                return Err(ScratchError::Unavailable(e.to_string()));
            }
            Err(e) => {
                return Err(ScratchError::Refused(
                    e.stderr().map_or_else(|| e.to_string(), str::to_owned),
                ))
            }
        }
    }
    Err(ScratchError::Unavailable(why.join("; ")))
}
