//! The standard process metrics (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
//! `process_open_fds`, …) that the Prometheus client libraries of other languages export and
//! dashboards expect, read from /proc/self at scrape time. The parsing is pure; a field that
//! cannot be read leaves its metric out rather than exporting a wrong value.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

/// What /proc says about a process.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<f64>,
    pub virtual_bytes: Option<f64>,
    pub start_time_seconds: Option<f64>,
    pub open_fds: Option<f64>,
    pub max_fds: Option<f64>,
}

/// Fields of /proc/PID/stat after the command name (which may hold spaces and parentheses):
/// (utime + stime in ticks, starttime in ticks since boot, vsize in bytes, rss in pages).
pub fn parse_stat(stat: &str) -> Option<(u64, u64, u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state): field N is f[N - 3].
    let n = |i: usize| f.get(i - 3)?.parse::<u64>().ok();
    Some((n(14)? + n(15)?, n(22)?, n(23)?, n(24)?))
}

/// `btime` of /proc/stat: boot time, Unix seconds.
pub fn parse_btime(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// The soft limit of open files from /proc/PID/limits (`None` when unlimited: not a number a
/// dashboard can divide by).
pub fn parse_max_fds(limits: &str) -> Option<f64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn sysconf(var: nix::unistd::SysconfVar) -> Option<f64> {
    nix::unistd::sysconf(var).ok().flatten().map(|v| v as f64)
}

impl ProcessStats {
    /// This process, now.
    pub fn read() -> ProcessStats {
        use nix::unistd::SysconfVar;
        let ticks = sysconf(SysconfVar::CLK_TCK).filter(|t| *t > 0.0);
        let page = sysconf(SysconfVar::PAGE_SIZE);
        let stat = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| parse_stat(&s));
        let btime = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| parse_btime(&s));
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            // The directory's own descriptor, open while it is read, is not counted.
            .map(|d| d.count().saturating_sub(1) as f64);
        let max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|s| parse_max_fds(&s));
        let (cpu, start, vsize, rss) = match stat {
            Some((cpu, start, vsize, rss)) => (Some(cpu), Some(start), Some(vsize), Some(rss)),
            None => (None, None, None, None),
        };
        ProcessStats {
            cpu_seconds: cpu.zip(ticks).map(|(c, t)| c as f64 / t),
            resident_bytes: rss.zip(page).map(|(r, p)| r as f64 * p),
            virtual_bytes: vsize.map(|v| v as f64),
            start_time_seconds: start
                .zip(ticks)
                .zip(btime)
                .map(|((s, t), b)| b as f64 + s as f64 / t),
            open_fds,
            max_fds,
        }
    }
}

/// The collector, registered at the top of the registry (no `netwarden_` prefix).
#[derive(Debug)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let p = ProcessStats::read();
        if let Some(v) = p.cpu_seconds {
            let m = encoder.encode_descriptor(
                "process_cpu",
                "Total user and system CPU time spent",
                Some(&Unit::Seconds),
                MetricType::Counter,
            )?;
            ConstCounter::new(v).encode(m)?;
        }
        let gauges = [
            (
                "process_resident_memory",
                "Resident memory size",
                Some(Unit::Bytes),
                p.resident_bytes,
            ),
            (
                "process_virtual_memory",
                "Virtual memory size",
                Some(Unit::Bytes),
                p.virtual_bytes,
            ),
            (
                "process_start_time",
                "Start time of the process since the Unix epoch",
                Some(Unit::Seconds),
                p.start_time_seconds,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                None,
                p.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                None,
                p.max_fds,
            ),
        ];
        for (name, help, unit, value) in gauges {
            if let Some(v) = value {
                let m = encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?;
                ConstGauge::new(v).encode(m)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (nw (x) y) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 3 0 12345 104857600 2560 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(parse_stat(stat), Some((300, 12345, 104_857_600, 2560)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (a) S 1 2"), None);
    }

    #[test]
    fn btime_and_limits() {
        assert_eq!(
            parse_btime("cpu  1 2 3\nbtime 1700000000\nprocesses 5\n"),
            Some(1_700_000_000)
        );
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \nMax open files            1048576              1048576              files     \n";
        assert_eq!(parse_max_fds(limits), Some(1_048_576.0));
        assert_eq!(
            parse_max_fds("Max open files  unlimited unlimited files\n"),
            None
        );
    }

    #[test]
    fn this_process_reads_sensibly() {
        let p = ProcessStats::read();
        assert!(p.resident_bytes.unwrap() > 1e6, "{p:?}");
        assert!(p.virtual_bytes.unwrap() >= p.resident_bytes.unwrap());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let started = p.start_time_seconds.unwrap();
        assert!(
            started <= now + 1.0 && started > now - 3600.0,
            "{started} vs {now}"
        );
        assert!(p.open_fds.unwrap() >= 3.0 && p.open_fds.unwrap() < p.max_fds.unwrap());
        assert!(p.cpu_seconds.unwrap() >= 0.0);
    }
}
