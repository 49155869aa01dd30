//! CPU accounting: pinning, per-CPU busy shares from /proc/stat, waiting
//! for a quiet machine, the daemons' CPU time.
use std::fs;
use std::io;
use std::mem;
use std::thread::{self};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use lab::{Lab, addr};

pub(super) struct Cpus {
    pub(super) client: Option<usize>,
    pub(super) server: Option<usize>,
}

pub(super) fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set; sched_setaffinity(0, ..)
    // applies to the calling thread only.
    unsafe {
        let mut set: libc::cpu_set_t = mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The first allowed CPU for the servers, the second for the client (as in
/// BASELINES.md: servers on CPU 0, client on CPU 1). With one CPU, nothing
/// is pinned.
pub(super) fn pick_cpus() -> Result<Cpus> {
    // SAFETY: sched_getaffinity fills the zeroed set we pass.
    let allowed: Vec<usize> = unsafe {
        let mut set: libc::cpu_set_t = mem::zeroed();
        if libc::sched_getaffinity(0, mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            bail!("sched_getaffinity: {}", io::Error::last_os_error());
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    };
    Ok(match allowed.as_slice() {
        [server, client, ..] => Cpus {
            client: Some(*client),
            server: Some(*server),
        },
        _ => {
            eprintln!("crr: fewer than 2 CPUs allowed; client and servers are not pinned");
            Cpus {
                client: None,
                server: None,
            }
        }
    })
}

/// Per-CPU times from /proc/stat: for `cpuN`, the fields user, nice,
/// system, idle, iowait, irq, softirq, steal (jiffies), by N.
pub(super) fn per_cpu_times() -> Vec<(usize, Vec<u64>)> {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    stat.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let cpu = f.next()?.strip_prefix("cpu")?.parse().ok()?;
            Some((cpu, f.take(8).filter_map(|v| v.parse().ok()).collect()))
        })
        .collect()
}

/// Where one CPU's time went during a run, in shares of the run.
#[derive(Debug, Clone, Copy)]
pub(super) struct CpuUse {
    pub(super) busy: f64,
    pub(super) user: f64,
    pub(super) softirq: f64,
}

impl CpuUse {
    pub(super) fn between(
        before: &[(usize, Vec<u64>)],
        after: &[(usize, Vec<u64>)],
        cpu: usize,
    ) -> Option<CpuUse> {
        let get =
            |v: &[(usize, Vec<u64>)]| v.iter().find(|(c, _)| *c == cpu).map(|(_, f)| f.clone());
        let (b, a) = (get(before)?, get(after)?);
        let d: Vec<f64> = a
            .iter()
            .zip(&b)
            .map(|(x, y)| x.saturating_sub(*y) as f64)
            .collect();
        let total: f64 = d.iter().sum();
        if d.len() < 8 || total <= 0.0 {
            return None;
        }
        Some(CpuUse {
            busy: 1.0 - (d[3] + d[4]) / total,
            user: (d[0] + d[1]) / total,
            softirq: d[6] / total,
        })
    }
}

/// Aggregate CPU time (busy, total) in jiffies from /proc/stat.
pub(super) fn cpu_times() -> Option<(u64, u64)> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = fields.iter().take(8).sum();
    // idle + iowait
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Waits (up to 20 s) until the CPUs have been under 5 % busy for 300 ms:
/// the kernel tears deleted namespaces down (conntrack, sockets in
/// TIME_WAIT, rules) in a worker after we return, and other work on the
/// machine would skew the run. Returns whether it went quiet.
pub(super) fn wait_quiet() -> bool {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        let Some((b0, t0)) = cpu_times() else {
            return false;
        };
        thread::sleep(Duration::from_millis(300));
        let Some((b1, t1)) = cpu_times() else {
            return false;
        };
        if t1 > t0 && ((b1 - b0) as f64) < 0.05 * (t1 - t0) as f64 {
            return true;
        }
    }
    eprintln!(
        "crr: the machine did not go quiet within 20 s (other work on it?); measuring anyway"
    );
    false
}

/// User + system CPU time of the daemons the lab runs (kube-ebpf-proxy on
/// both nodes), from /proc/<pid>/stat; `None` without daemons.
pub(super) fn daemon_cpu(lab: &Lab) -> Option<Duration> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let mut ticks = 0;
    let mut any = false;
    for node in addr::NODES {
        let Some(pid) = lab.daemon_pid(node) else {
            continue;
        };
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the parenthesised command name; utime and stime
        // are the 14th and 15th fields of the whole line.
        let rest = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        ticks += f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        any = true;
    }
    any.then(|| Duration::from_millis(ticks * 1000 / hz))
}
