//! Sysctl steps: written as files (see `observe::sysctl`), at once, before the netlink batch.

use super::{ApplyError, Outcome};
use crate::observe::sysctl::SysctlFs;
use crate::plan::{Op, Step};
use nix::errno::Errno;

/// The outcome of a step that writes settings; `None` for any other step.
pub(super) fn write_step(fs: &SysctlFs, step: &Step) -> Option<Outcome> {
    let mut outcome = None;
    for op in &step.ops {
        let Op::SetSysctl { key, value } = op else {
            return None;
        };
        let result = fs
            .write(key, *value)
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(nix::libc::EIO)));
        outcome = Some(match result {
            Ok(()) => Outcome::Applied,
            // The device is gone or not there yet (or this kernel has no such setting).
            Err(Errno::ENOENT) => Outcome::NotYet(Errno::ENODEV),
            Err(errno) => Outcome::Failed(ApplyError::Write {
                path: fs.path(key).display().to_string(),
                errno,
            }),
        });
        if outcome != Some(Outcome::Applied) {
            break;
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::sysctl::{Scope, Setting};
    use crate::model::{Family, ObjectId, SysctlKey};

    fn step(device: &str) -> Step {
        let key = SysctlKey {
            scope: Scope::Device(device.into()),
            setting: Setting::find(Family::Ipv4, "rp_filter").unwrap(),
        };
        Step {
            id: ObjectId::Sysctl(key.clone()),
            name: "s".into(),
            ops: vec![Op::SetSysctl { key, value: 0 }],
        }
    }

    #[test]
    fn a_missing_device_is_not_yet_and_other_steps_are_not_ours() {
        let dir = tempfile::tempdir().unwrap();
        let fs = SysctlFs::new(dir.path());
        assert_eq!(
            write_step(&fs, &step("eth9")),
            Some(Outcome::NotYet(Errno::ENODEV))
        );
        std::fs::create_dir_all(dir.path().join("ipv4/conf/eth0")).unwrap();
        std::fs::write(dir.path().join("ipv4/conf/eth0/rp_filter"), "2\n").unwrap();
        assert_eq!(write_step(&fs, &step("eth0")), Some(Outcome::Applied));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("ipv4/conf/eth0/rp_filter")).unwrap(),
            "0\n"
        );
        let rule = Step {
            id: ObjectId::Link("eth0".into()),
            name: "l".into(),
            ops: vec![Op::SetLink {
                ifindex: 2,
                up: true,
                mtu: None,
            }],
        };
        assert_eq!(write_step(&fs, &rule), None);
    }
}
