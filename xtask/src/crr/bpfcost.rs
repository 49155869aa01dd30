//! What kube-ebpf-proxy's programs cost inside the kernel during a run: the
//! kernel's BPF statistics (run time and run count of every program, kept
//! only while statistics are switched on) for the programs whose names
//! start with `kep_`, on both nodes, over the answers served.
//!
//! Statistics cost two clock reads per program run, so they are on only
//! for a short run of their own after the measured one: the rates stay
//! those of a proxy without them.
use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::time::Duration;

use anyhow::{Context as _, Result};
use aya::programs::loaded_programs;

/// Our programs' names start with this (the kernel keeps 15 bytes of a
/// program's name).
const PREFIX: &str = "kep_";

/// Run time and runs of each of our loaded programs, by program id.
#[derive(Default)]
pub(super) struct Snapshot(BTreeMap<u32, (Duration, u64)>);

/// Switches the kernel's BPF run-time statistics on until the returned
/// descriptor is dropped.
pub(super) fn switch_on() -> Result<OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).context("enabling BPF statistics")
}

pub(super) fn snapshot() -> Result<Snapshot> {
    let mut out = BTreeMap::new();
    for info in loaded_programs() {
        let info = info.context("listing loaded BPF programs")?;
        if info.name_as_str().is_some_and(|n| n.starts_with(PREFIX)) {
            out.insert(info.id(), (info.run_time(), info.run_count()));
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
    pub(super) fn between(before: &Snapshot, after: &Snapshot) -> BpfCost {
        let mut cost = BpfCost::default();
        for (id, (time, runs)) in &after.0 {
            let (t0, r0) = before.0.get(id).copied().unwrap_or_default();
            cost.time += time.saturating_sub(t0);
            cost.runs += runs.saturating_sub(r0);
        }
        cost
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
