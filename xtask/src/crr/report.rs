//! The report: the machine summary line and the result tables.
use std::fmt::Write as _;
use std::fs;
use std::thread::{self};
use std::time::Duration;

use super::{
    Mode, Options, Outcome, Row, WARMUP,
    cpu::{CpuUse, Cpus},
};

pub(super) fn machine_summary(cpus: &Cpus, opts: &Options) -> String {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let version = |p: &str, a: &str| {
        crate::cmd_output(p, &[a])
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|_| format!("{p}: not found"))
    };
    let pinning = match (cpus.client, cpus.server) {
        (Some(c), Some(s)) => format!("client on CPU {c}, servers on CPU {s}"),
        _ => "not pinned".into(),
    };
    format!(
        "Machine: Linux {}, {cores} CPUs ({model}); {}; {}. {pinning}; {} s runs, {} connections in flight.",
        kernel.trim(),
        version("iptables", "--version"),
        version("nft", "--version"),
        opts.seconds,
        opts.concurrency
    )
}

pub(super) fn cpu_text(c: Option<CpuUse>) -> String {
    c.map_or("-".into(), |c| {
        format!(
            "{:.0}% ({:.0}% user, {:.0}% softirq)",
            c.busy * 100.0,
            c.user * 100.0,
            c.softirq * 100.0
        )
    })
}

pub(super) fn print_table(rows: &[Row], opts: &Options) {
    print!("{}{}", rate_table(rows, opts), detail_table(rows));
}

/// Rates and ratios, with how they were measured.
fn rate_table(rows: &[Row], opts: &Options) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n| mode | services | rule/map load time | CRR/s | ratio to direct-to-pod | ratio to iptables at same N |"
    );
    let _ = writeln!(out, "|---|---:|---|---:|---:|---:|");
    let rate_of = |mode: Mode, n: usize| {
        rows.iter().find_map(|r| match &r.outcome {
            Outcome::Measured(m) if r.mode == mode && r.services == n => Some(m.rate()),
            _ => None,
        })
    };
    for r in rows {
        let (rate, direct, ipt) = match &r.outcome {
            Outcome::Skipped(why) => (why.clone(), "-".to_string(), "-".to_string()),
            Outcome::Measured(m) => {
                let rate = m.rate();
                let ratio = |base: Option<f64>, same: bool| match base {
                    _ if same => "-".to_string(),
                    Some(b) if b > 0.0 => format!("{:.2}", rate / b),
                    _ => "-".to_string(),
                };
                (
                    thousands(rate),
                    ratio(rate_of(Mode::Direct, r.services), r.mode == Mode::Direct),
                    ratio(
                        rate_of(Mode::Iptables, r.services),
                        matches!(r.mode, Mode::Direct | Mode::Iptables),
                    ),
                )
            }
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {rate} | {direct} | {ipt} |",
            r.mode.label(),
            thousands(r.services as f64),
            r.load
        );
    }
    let _ = writeln!(
        out,
        "\nCRR/s: connections answered to EOF per second over a {} s run, {} in flight, \
         after a {} ms warm-up; every mode in a fresh lab. \"direct to pod\" loads no rules \
         (its services column only names the group it was measured with, just before the \
         other modes of that N) and dials the 3 backends in turn. Load times: iptables-restore \
         (whole nat and filter tables) and nft -f (one transaction) wall time in node-a's \
         namespace; kube-ebpf-proxy: the map writes of its first sync as the daemon logs them, \
         and from process start to \"ready\" (BPF load and attach, manifest parsing included).",
        opts.seconds,
        opts.concurrency,
        WARMUP.as_millis()
    );
    out
}

/// Connections, errors, spread, TIME_WAIT and CPU of each measured run.
fn detail_table(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n| mode | services | connections | errors | backend spread (web-a / web-b1 / web-b2) | client TIME_WAIT after run | client CPU busy | server CPU busy | daemon CPU | machine idle before |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---|---:|---|---|---:|---|");
    for r in rows {
        if let Outcome::Measured(m) = &r.outcome {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.mode.label(),
                thousands(r.services as f64),
                thousands(m.stats.completed as f64),
                m.stats.errors,
                spread_text(&m.spread),
                m.client_time_wait,
                cpu_text(m.client_cpu),
                cpu_text(m.server_cpu),
                m.daemon_cpu
                    .map_or("-".into(), |d| format!("{} ms", d.as_millis())),
                if m.quiet { "yes" } else { "no (noisy)" }
            );
        }
    }
    out
}

pub(super) fn spread_text(spread: &[f64]) -> String {
    spread
        .iter()
        .map(|s| format!("{:.0}%", s * 100.0))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// 12345.6 -> "12,346".
pub(super) fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub(super) fn fmt_duration(d: Duration) -> String {
    if d < Duration::from_secs(10) {
        let ms = d.as_secs_f64() * 1000.0;
        if ms < 10.0 {
            format!("{ms:.1} ms")
        } else if ms < 10_000.0 && d < Duration::from_secs(1) {
            format!("{ms:.0} ms")
        } else {
            format!("{:.2} s", d.as_secs_f64())
        }
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn number_formats() {
        assert_eq!(thousands(12345.6), "12,346");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1_000_000.0), "1,000,000");
        assert_eq!(fmt_duration(Duration::from_micros(1500)), "1.5 ms");
        assert_eq!(fmt_duration(Duration::from_millis(140)), "140 ms");
        assert_eq!(fmt_duration(Duration::from_millis(3800)), "3.80 s");
        assert_eq!(fmt_duration(Duration::from_secs(14)), "14.0 s");
    }
}
