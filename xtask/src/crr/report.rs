//! The report: the machine summary line and the result tables.
use std::fmt::Write as _;
use std::fs;
use std::thread::{self};
use std::time::Duration;

use super::{
    Measurement, Mode, Options, Outcome, Row, WARMUP, Workload,
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

impl Workload {
    fn title(self) -> &'static str {
        match self {
            Workload::Crr => "New connections per second (CRR: one connection per request)",
            Workload::KeepAlive => "Keep-alive requests per second (connections stay open)",
        }
    }

    /// The rate column's name, and what one unit of work is.
    fn unit(self) -> (&'static str, &'static str) {
        match self {
            Workload::Crr => ("CRR/s", "conn"),
            Workload::KeepAlive => ("requests/s", "request"),
        }
    }

    /// How the client works, for the note under the table.
    fn method(self, opts: &Options) -> String {
        match self {
            Workload::Crr => format!(
                "connections answered to EOF per second, {} in flight",
                opts.concurrency
            ),
            Workload::KeepAlive => format!(
                "answers per second over {} kept connections (the {} in flight rounded up to a \
                 multiple of the 3 backends, opened before the run until each backend holds \
                 the same number, as direct-to-pod does), one request in flight on each",
                opts.concurrency.div_ceil(3) * 3,
                opts.concurrency
            ),
        }
    }
}

pub(super) fn print_table(rows: &[Row], workload: Workload, opts: &Options) {
    print!(
        "\n### {}\n{}{}{}",
        workload.title(),
        rate_table(rows, workload, opts),
        summary_table(rows, workload),
        detail_table(rows)
    );
}

/// The rate of `mode` at `n` services in `round`, if it was measured.
fn rate_of(rows: &[Row], mode: Mode, n: usize, round: usize) -> Option<f64> {
    rows.iter().find_map(|r| match &r.outcome {
        Outcome::Measured(m) if r.mode == mode && r.services == n && r.round == round => {
            Some(m.rate())
        }
        _ => None,
    })
}

fn ratio_text(rate: f64, base: Option<f64>, same: bool) -> String {
    match base {
        _ if same => "-".to_string(),
        Some(b) if b > 0.0 => format!("{:.2}", rate / b),
        _ => "-".to_string(),
    }
}

fn bpf_text(v: Option<(f64, f64)>) -> String {
    v.map_or("-".into(), |(ns, runs)| {
        format!("{} ({runs:.1})", thousands(ns))
    })
}

fn us_text(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}"))
}

/// Each round's rates and ratios (to the same round's direct and iptables
/// runs), with the busy CPU time per connection.
fn rate_table(rows: &[Row], workload: Workload, opts: &Options) -> String {
    let mut out = String::new();
    let (rate, per) = workload.unit();
    let _ = writeln!(
        out,
        "\n| mode | services | round | rule/map load time | {rate} | ratio to direct-to-pod | ratio to iptables | client CPU µs/{per} | server CPU µs/{per} | our BPF programs ns/{per} (runs) |"
    );
    let _ = writeln!(out, "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let cells = match &r.outcome {
            Outcome::Skipped(why) => [
                why.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ],
            Outcome::Measured(m) => {
                let rate = m.rate();
                let direct = rate_of(rows, Mode::Direct, r.services, r.round);
                let ipt = rate_of(rows, Mode::Iptables, r.services, r.round);
                [
                    thousands(rate),
                    ratio_text(rate, direct, r.mode == Mode::Direct),
                    ratio_text(rate, ipt, matches!(r.mode, Mode::Direct | Mode::Iptables)),
                    us_text(m.cpu_per_conn_us(m.client_cpu)),
                    us_text(m.cpu_per_conn_us(m.server_cpu)),
                    bpf_text(m.bpf_per_answer()),
                ]
            }
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            r.mode.label(),
            thousands(r.services as f64),
            r.round,
            r.load,
            cells.join(" | ")
        );
    }
    let _ = writeln!(
        out,
        "\n{rate}: {} over a {} s run, \
         after a {} ms warm-up; every mode in a fresh lab, the modes interleaved round after \
         round ({} rounds) so that a drift of the shared machine hits them alike: the ratio \
         of a round (to direct-to-pod of the same round) is the figure. \"direct to pod\" loads \
         no rules and dials the 3 backends in turn. CPU µs/{per}: the busy share of the \
         client's (or the servers') CPU from /proc/stat, times the run, over the {per}s \
         served; softirq work of the client's packets (forwarding, the proxy's translation) \
         lands on the client's CPU. Load times: iptables-restore (whole nat and filter tables) \
         and nft -f (one transaction) wall time in node-a's namespace; kube-ebpf-proxy: the \
         map writes of its first sync as the daemon logs them, and from process start to \
         \"ready\" (BPF load and attach, manifest parsing included). Our BPF programs: the \
         kernel's run time of every kube-ebpf-proxy program (TC and socket hooks, both \
         nodes) over the answers served, and how many program runs that was, in a {} ms run \
         after the measured one with the kernel's BPF statistics on (they cost two clock \
         reads per run, so they are off while the rate is measured).",
        workload.method(opts),
        opts.seconds,
        WARMUP.as_millis(),
        opts.rounds,
        super::BPF_COST_RUN.as_millis()
    );
    out
}

/// Per mode and service count: every round's ratio to direct, their
/// median, the median CPU time per connection (client + servers), and
/// the median in-kernel time of our programs per connection.
fn summary_table(rows: &[Row], workload: Workload) -> String {
    let mut out = String::new();
    let (_, per) = workload.unit();
    let _ = writeln!(
        out,
        "\n| mode | services | ratio to direct, per round | median ratio | median CPU µs/{per} (client + servers) | median our BPF ns/{per} |"
    );
    let _ = writeln!(out, "|---|---:|---|---:|---:|---:|");
    let mut keys: Vec<(usize, usize)> = Vec::new();
    for r in rows {
        let key = (
            r.services,
            Mode::ALL.iter().position(|m| *m == r.mode).unwrap_or(0),
        );
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    for (n, mode_index) in keys {
        let mode = Mode::ALL[mode_index];
        let measured: Vec<(&Row, &Measurement)> = rows
            .iter()
            .filter(|r| r.mode == mode && r.services == n)
            .filter_map(|r| match &r.outcome {
                Outcome::Measured(m) => Some((r, m)),
                Outcome::Skipped(_) => None,
            })
            .collect();
        if measured.is_empty() {
            continue;
        }
        let ratios: Vec<f64> = measured
            .iter()
            .filter_map(|(r, m)| Some(m.rate() / rate_of(rows, Mode::Direct, n, r.round)?))
            .collect();
        let cpu: Vec<f64> = measured
            .iter()
            .filter_map(|(_, m)| {
                Some(m.cpu_per_conn_us(m.client_cpu)? + m.cpu_per_conn_us(m.server_cpu)?)
            })
            .collect();
        let bpf: Vec<f64> = measured
            .iter()
            .filter_map(|(_, m)| Some(m.bpf_per_answer()?.0))
            .collect();
        let per_round: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            mode.label(),
            thousands(n as f64),
            per_round.join(", "),
            median(&ratios).map_or("-".into(), |m| format!("{m:.2}")),
            us_text(median(&cpu)),
            median(&bpf).map_or("-".into(), thousands)
        );
    }
    out
}

fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[n / 2]),
        n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// Connections, errors, spread, TIME_WAIT and CPU of each measured run.
fn detail_table(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n| mode | services | round | answers | errors | backend spread (web-a / web-b1 / web-b2) | client TIME_WAIT after run | client CPU busy | server CPU busy | daemon CPU | machine idle before |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---|---:|---|---|---:|---|");
    for r in rows {
        if let Outcome::Measured(m) = &r.outcome {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.mode.label(),
                thousands(r.services as f64),
                r.round,
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
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

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
