//! What kube-ebpf-proxy's programs cost inside the kernel during a run: the
//! kernel's BPF statistics (run time and run count of every program, kept
//! only while statistics are switched on) for the programs the lab's two
//! daemons hold (not those of any other kube-ebpf-proxy on the machine),
//! over the answers served.
//!
//! Statistics cost two clock reads per program run, so they are on only
//! for a short run of their own after the measured one: the rates stay
//! those of a proxy without them.
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::fd::OwnedFd;
use std::time::Duration;

use anyhow::{Context as _, Result};
use aya::programs::loaded_programs;
use lab::{Lab, addr};

/// Name, run time and runs of each of our loaded programs, by program id.
#[derive(Default)]
pub(super) struct Snapshot(BTreeMap<u32, (String, Duration, u64)>);

/// Switches the kernel's BPF run-time statistics on until the returned
/// descriptor is dropped.
pub(super) fn switch_on() -> Result<OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).context("enabling BPF statistics")
}

/// The ids of the BPF programs the lab's daemons hold descriptors of
/// (`prog_id` in /proc/<pid>/fdinfo).
pub(super) fn daemon_programs(lab: &Lab) -> Result<BTreeSet<u32>> {
    let mut ids = BTreeSet::new();
    for pid in addr::NODES.iter().filter_map(|n| lab.daemon_pid(n)) {
        let dir = format!("/proc/{pid}/fdinfo");
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
            // A descriptor closed since the listing has no fdinfo: skip it.
            let Ok(info) = fs::read_to_string(entry?.path()) else {
                continue;
            };
            ids.extend(
                info.lines()
                    .filter_map(|l| l.strip_prefix("prog_id:"))
                    .filter_map(|id| id.trim().parse::<u32>().ok()),
            );
        }
    }
    anyhow::ensure!(!ids.is_empty(), "the lab's daemons hold no BPF program");
    Ok(ids)
}

pub(super) fn snapshot(ids: &BTreeSet<u32>) -> Result<Snapshot> {
    let mut out = BTreeMap::new();
    for info in loaded_programs() {
        let info = info.context("listing loaded BPF programs")?;
        if !ids.contains(&info.id()) {
            continue;
        }
        if let Some(name) = info.name_as_str() {
            let entry = (name.to_string(), info.run_time(), info.run_count());
            out.insert(info.id(), entry);
        }
    }
    Ok(Snapshot(out))
}

/// Our programs' kernel time and runs between two snapshots.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct BpfCost {
    pub(super) time: Duration,
    pub(super) runs: u64,
}

impl BpfCost {
    /// The whole cost, and its parts by program name.
    pub(super) fn between(
        before: &Snapshot,
        after: &Snapshot,
    ) -> (BpfCost, BTreeMap<String, BpfCost>) {
        let mut total = BpfCost::default();
        let mut by_name: BTreeMap<String, BpfCost> = BTreeMap::new();
        for (id, (name, time, runs)) in &after.0 {
            let (t0, r0) = before.0.get(id).map_or((Duration::ZERO, 0), |b| (b.1, b.2));
            let part = BpfCost {
                time: time.saturating_sub(t0),
                runs: runs.saturating_sub(r0),
            };
            let named = by_name.entry(name.clone()).or_default();
            for c in [&mut total, named] {
                c.time += part.time;
                c.runs += part.runs;
            }
        }
        (total, by_name)
    }

    /// Nanoseconds and program runs per unit of work (connection or
    /// request).
    pub(super) fn per(&self, units: u64) -> Option<(f64, f64)> {
        (units > 0).then(|| {
            (
                self.time.as_nanos() as f64 / units as f64,
                self.runs as f64 / units as f64,
            )
        })
    }
}
