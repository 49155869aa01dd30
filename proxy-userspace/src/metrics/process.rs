//! The standard `process_*` metrics every Prometheus client exports (the
//! names client_golang's process collector gives kube-proxy), read from
//! /proc at scrape time. prometheus-client has no process collector, and
//! the `prometheus` crate's one lives in that crate's own registry; reading
//! five values from /proc needs neither.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

/// Collects the daemon's own process figures when scraped.
#[derive(Debug, Default)]
pub struct ProcessCollector;

/// One reading of /proc/self.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessFigures {
    pub cpu_seconds: f64,
    pub resident_bytes: f64,
    pub virtual_bytes: f64,
    pub start_time_seconds: f64,
    pub open_fds: f64,
    pub max_fds: f64,
}

impl ProcessFigures {
    /// Reads /proc/self/stat, /proc/stat's boot time, /proc/self/fd and
    /// the file descriptor limit.
    pub fn read() -> std::io::Result<ProcessFigures> {
        let stat = std::fs::read_to_string("/proc/self/stat")?;
        let boot = std::fs::read_to_string("/proc/stat")?;
        let open_fds = std::fs::read_dir("/proc/self/fd")?.count();
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes only the struct it is given.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: sysconf reads a constant of the system.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let bad = |what: &str| std::io::Error::other(format!("unexpected {what}"));
        let fields = stat_fields(&stat).ok_or_else(|| bad("/proc/self/stat"))?;
        let boot_time = boot_time(&boot).ok_or_else(|| bad("/proc/stat"))?;
        let ticks = ticks.max(1) as f64;
        Ok(ProcessFigures {
            cpu_seconds: (fields.utime + fields.stime) as f64 / ticks,
            resident_bytes: (fields.rss_pages * page.max(0) as u64) as f64,
            virtual_bytes: fields.vsize as f64,
            start_time_seconds: boot_time as f64 + fields.start_ticks as f64 / ticks,
            // The directory listing itself holds one: not ours to count.
            open_fds: open_fds.saturating_sub(1) as f64,
            max_fds: limit.rlim_cur as f64,
        })
    }
}

/// The fields of /proc/self/stat used here (proc(5) numbers them from 1).
#[derive(Debug, PartialEq, Eq)]
struct StatFields {
    utime: u64,
    stime: u64,
    start_ticks: u64,
    vsize: u64,
    rss_pages: u64,
}

fn stat_fields(stat: &str) -> Option<StatFields> {
    // The command name (field 2) is in parentheses and may hold spaces and
    // parentheses itself: count from the last ')', which is field 2's end.
    let after = &stat[stat.rfind(')')? + 1..];
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // `after` starts at field 3 (state): field n is f[n - 3].
    let at = |n: usize| f.get(n - 3).copied();
    Some(StatFields {
        utime: at(14)?,
        stime: at(15)?,
        start_ticks: at(22)?,
        vsize: at(23)?,
        rss_pages: at(24)?,
    })
}

fn boot_time(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> std::fmt::Result {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(v).encode(metric)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let p = match ProcessFigures::read() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "reading /proc/self failed");
                return Ok(());
            }
        };
        let help = "Total user and system CPU time spent in seconds";
        let metric =
            encoder.encode_descriptor("process_cpu_seconds", help, None, MetricType::Counter)?;
        ConstCounter::new(p.cpu_seconds).encode(metric)?;
        let e = &mut encoder;
        gauge(
            e,
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            p.resident_bytes,
        )?;
        gauge(
            e,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            p.virtual_bytes,
        )?;
        gauge(
            e,
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds",
            p.start_time_seconds,
        )?;
        gauge(
            e,
            "process_open_fds",
            "Number of open file descriptors",
            p.open_fds,
        )?;
        gauge(
            e,
            "process_max_fds",
            "Maximum number of open file descriptors",
            p.max_fds,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_past_a_command_name_with_spaces() {
        // A real line's shape (proc(5)), with a hostile command name.
        let line = "4242 (kube (ebpf) proxy) S 1 4242 4242 0 -1 4194560 1013 0 0 0 \
                    37 12 0 0 20 0 3 0 889 28672000 2150 18446744073709551615 1 1 0 0 0 0 0 \
                    0 0 0 0 0 17 1 0 0 0 0 0";
        let f = stat_fields(line).unwrap();
        assert_eq!(
            f,
            StatFields {
                utime: 37,
                stime: 12,
                start_ticks: 889,
                vsize: 28_672_000,
                rss_pages: 2150,
            }
        );
        assert_eq!(stat_fields("4242 (truncated"), None);
    }

    #[test]
    fn this_process_reads_plausibly() {
        let before = ProcessFigures::read().unwrap();
        // Burn CPU until /proc shows it (on a busy machine 100 ms of wall
        // time may be 20 ms of CPU); a counter that never grows fails.
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while ProcessFigures::read().unwrap().cpu_seconds < before.cpu_seconds + 0.05 {
            for _ in 0..1_000_000 {
                x = x.wrapping_add(std::hint::black_box(1));
            }
            assert!(start.elapsed().as_secs() < 30, "CPU time does not grow");
        }
        // Other tests of this binary open and close files meanwhile: open
        // enough that the difference shows anyway.
        let files: Vec<_> = (0..50)
            .map(|_| std::fs::File::open("/proc/self/stat").unwrap())
            .collect();
        let after = ProcessFigures::read().unwrap();
        drop(files);
        assert!(x > 0);
        assert!(
            after.cpu_seconds >= before.cpu_seconds + 0.05,
            "{before:?} {after:?}"
        );
        assert!(
            after.open_fds >= before.open_fds + 40.0,
            "{before:?} {after:?}"
        );
        assert!(after.resident_bytes > 1e6, "{after:?}");
        assert!(after.virtual_bytes >= after.resident_bytes, "{after:?}");
        assert!(after.max_fds >= after.open_fds, "{after:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        // Started before now, and not before this test binary could have.
        assert!(after.start_time_seconds <= now + 1.0, "{after:?}");
        assert!(after.start_time_seconds > now - 3600.0, "{after:?}");
    }
}
