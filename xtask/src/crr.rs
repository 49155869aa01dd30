//! `cargo xtask bench`, part two: new connections per second (CRR, one TCP
//! connection per request) through a ClusterIP, side by side in one run:
//!
//! * direct to pod: no proxy, the client dials the three backend pods in
//!   turn (the floor every proxy is measured against);
//! * kube-ebpf-proxy: the real daemon on both nodes, programmed from a
//!   manifest directory;
//! * kube-proxy's iptables mode and nftables mode: rule sets shaped like the
//!   ones kube-proxy writes (kube_proxy_rules.rs), loaded with
//!   `iptables-restore` / `nft -f` in node-a's namespace.
//!
//! The shape follows ../shared/BASELINES.md: three backend pods (one on
//! node-a, two on node-b, so a ClusterIP sends 1/3 of the connections to
//! the client's node and 2/3 to the other one), a client pod on node-a,
//! ClusterIP 10.96.10.10:80 -> 8080. With N services, N-1 are fillers with
//! 10 endpoints each at made-up pod addresses in the cluster CIDR that are
//! never dialed, and the measured service comes last (last in
//! KUBE-SERVICES for iptables). Every mode runs in a fresh lab, so no
//! conntrack entry, rule or pin of one mode is seen by the next; before each
//! measurement the machine is let settle until both CPUs are idle (the
//! kernel cleans up a deleted namespace in the background).
//!
//! Load generator: one thread in the client pod's namespace, pinned to one
//! CPU, keeps a fixed number of connections in flight (16, like
//! `wrk -c16`) with nonblocking sockets and epoll; each connection is
//! connect, write a request, read until EOF, close. The servers are one
//! thread per backend pod (accept, read the request, write a short answer,
//! close; no thread per connection), all pinned to the other CPU. Softirq
//! work for the client's packets (the node's forwarding and the proxy's
//! translation) runs on the client's CPU, so that CPU bounds the rate and a
//! proxy's per-connection cost shows up directly.
//!
//! The server closes first, so TIME_WAIT sockets pile up on the servers and
//! none on the client: its ephemeral ports are free again one round trip
//! after each connection and 5 s runs at >10k/s do not run out of ports
//! (the TIME_WAIT count of the client is printed after every run to show
//! it; tcp_tw_reuse=1 is set in the client pod anyway).
//!
//! Here: the modes and the run. [`workload`]: the services, the
//! kube-ebpf-proxy mode and the backend servers; [`loadgen`]: the client;
//! [`cpu`]: pinning and CPU accounting; [`report`]: the tables.

mod bpfcost;
mod cpu;
mod keepalive;
mod loadgen;
mod report;
mod server;
mod workload;

use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use lab::addr;

use crate::kube_proxy_rules::{self, ClusterCidr, Service};

use self::{
    bpfcost::BpfCost,
    cpu::{CpuUse, Cpus, daemon_cpu, per_cpu_times, pick_cpus, wait_quiet},
    keepalive::keepalive_loop,
    loadgen::{CrrStats, count_time_wait, crr_loop},
    report::{cpu_text, fmt_duration, machine_summary, print_table, spread_text, thousands},
    workload::{BenchLab, service_set, start_ebpf, stop_ebpf},
};

/// The measured service.
const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 10, 10), 80);
const BACKEND_PORT: u16 = 8080;
/// Backend pods: (node, name, address).
const BACKENDS: [(&str, &str, Ipv4Addr); 3] = [
    (addr::NODE_A, "web-a", Ipv4Addr::new(10, 244, 1, 11)),
    (addr::NODE_B, "web-b1", Ipv4Addr::new(10, 244, 2, 11)),
    (addr::NODE_B, "web-b2", Ipv4Addr::new(10, 244, 2, 12)),
];
const CLIENT_POD: &str = "crr-client";
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 50);
const CLUSTER_CIDR: ClusterCidr = ClusterCidr {
    addr: Ipv4Addr::new(10, 244, 0, 0),
    prefix_len: 16,
};

/// kube-proxy's nftables mode takes minutes for a full load of this many
/// services on this machine kind (BASELINES.md: 173-216 s at 10,000).
const NFT_MAX_SERVICES: usize = 1000;
/// Warm-up before each measured run (neighbour entries, caches).
const WARMUP: Duration = Duration::from_millis(500);
/// The run after a kube-ebpf-proxy mode's measured one in which the
/// kernel's BPF statistics are on (see bpfcost.rs).
const BPF_COST_RUN: Duration = Duration::from_secs(1);
/// A connection that makes no progress for this long counts as an error
/// (a lost SYN is retransmitted after 1 s).
const CONN_TIMEOUT: Duration = Duration::from_secs(2);
/// Errors above this share of all attempts fail the bench.
const MAX_ERROR_SHARE: f64 = 0.02;
const REQUEST: &[u8] = b"GET / HTTP/1.0\r\n\r\n";

#[derive(Debug, Clone)]
pub struct Options {
    /// Length of each measured run.
    pub seconds: f64,
    /// Service counts, each measured in every mode.
    pub services: Vec<usize>,
    /// Connections in flight.
    pub concurrency: usize,
    /// Every mode is measured once per round, modes interleaved.
    pub rounds: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Direct,
    Ebpf,
    /// kube-ebpf-proxy with `--bpf-host-routing=false`: socket-balanced
    /// packets forwarded by the stack instead of redirected by the ingress
    /// hook (which the default, `auto`, does on these nodes: they have no
    /// netfilter rules).
    EbpfNoHostRouting,
    /// kube-ebpf-proxy with `--socket-lb=false`: the per-packet path only.
    EbpfPerPacket,
    Iptables,
    Nftables,
}

impl Mode {
    const ALL: [Mode; 6] = [
        Mode::Direct,
        Mode::Ebpf,
        Mode::EbpfNoHostRouting,
        Mode::EbpfPerPacket,
        Mode::Iptables,
        Mode::Nftables,
    ];

    /// The daemon's extra `run` flags in our modes; `None` for the others.
    fn daemon_flags(self) -> Option<&'static [&'static str]> {
        match self {
            Mode::Ebpf => Some(&[]),
            Mode::EbpfNoHostRouting => Some(&["--bpf-host-routing=false"]),
            Mode::EbpfPerPacket => Some(&["--socket-lb=false"]),
            Mode::Direct | Mode::Iptables | Mode::Nftables => None,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Mode::Direct => "direct to pod (no proxy)",
            Mode::Ebpf => "kube-ebpf-proxy (defaults: socket LB, host routing auto)",
            Mode::EbpfNoHostRouting => "kube-ebpf-proxy (socket LB), --bpf-host-routing=false",
            Mode::EbpfPerPacket => "kube-ebpf-proxy, --socket-lb=false",
            Mode::Iptables => "kube-proxy iptables (nf_tables backend)",
            Mode::Nftables => "kube-proxy nftables",
        }
    }
}

/// What the client does in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    /// A new connection per request (CRR).
    Crr,
    /// Requests over connections that stay open, one in flight on each.
    KeepAlive,
}

impl Workload {
    const ALL: [Workload; 2] = [Workload::Crr, Workload::KeepAlive];

    /// Runs the client on a thread in `ns`, pinned to `cpu`.
    fn run_in(
        self,
        ns: &lab::Netns,
        targets: &[SocketAddrV4],
        concurrency: usize,
        duration: Duration,
        cpu: Option<usize>,
    ) -> Result<CrrStats> {
        ns.run(|| {
            if let Some(cpu) = cpu {
                cpu::pin_to_cpu(cpu).with_context(|| format!("pinning the client to CPU {cpu}"))?;
            }
            match self {
                Workload::Crr => crr_loop(targets, concurrency, duration).context("client loop"),
                Workload::KeepAlive => {
                    keepalive_loop(targets, concurrency, duration).context("keep-alive client")
                }
            }
        })
    }
}

/// One line of the result table.
struct Row {
    mode: Mode,
    workload: Workload,
    services: usize,
    /// 1-based round.
    round: usize,
    load: String,
    outcome: Outcome,
}

enum Outcome {
    Measured(Measurement),
    Skipped(String),
}

struct Measurement {
    stats: CrrStats,
    /// Share of the measured connections each backend served.
    spread: Vec<f64>,
    client_time_wait: usize,
    /// How busy the client's and the servers' CPUs were during the run.
    client_cpu: Option<CpuUse>,
    server_cpu: Option<CpuUse>,
    /// CPU time the kube-ebpf-proxy daemons (both nodes) used during the run.
    daemon_cpu: Option<Duration>,
    /// Whether the machine was idle before the run (other work on it makes
    /// the numbers noisy).
    quiet: bool,
    /// kube-ebpf-proxy modes: our programs' kernel time in the statistics
    /// run, and the answers served in it.
    bpf: Option<(BpfCost, u64)>,
}

impl Measurement {
    fn rate(&self) -> f64 {
        self.stats.completed as f64 / self.stats.elapsed.as_secs_f64()
    }

    /// Busy CPU time per connection on one CPU, in microseconds: the
    /// share of the run that CPU was busy, times the run, over the
    /// connections served. Steadier than the rate on a shared machine.
    fn cpu_per_conn_us(&self, cpu: Option<CpuUse>) -> Option<f64> {
        let busy = cpu?.busy * self.stats.elapsed.as_secs_f64();
        (self.stats.completed > 0).then(|| busy * 1e6 / self.stats.completed as f64)
    }

    /// Our programs' in-kernel nanoseconds and runs per answer.
    fn bpf_per_answer(&self) -> Option<(f64, f64)> {
        let (cost, answers) = self.bpf?;
        cost.per(answers)
    }
}

/// Runs the comparison and prints the table.
pub fn run(daemon: &Path, opts: &Options) -> Result<()> {
    ensure!(opts.seconds > 0.0, "--seconds must be positive");
    ensure!(opts.concurrency > 0, "--concurrency must be positive");
    ensure!(opts.rounds > 0, "--rounds must be positive");
    ensure!(
        opts.services.iter().all(|&n| n >= 1),
        "every service count must be at least 1 (the measured service)"
    );
    let started = Instant::now();
    let cpus = pick_cpus()?;
    let duration = Duration::from_secs_f64(opts.seconds);
    println!("\n## New connections per second through a ClusterIP (CRR)\n");
    println!("{}", machine_summary(&cpus, opts));
    let root_rules_before = root_ruleset()?;

    let mut rows = Vec::new();
    let mut lab_dirs = Vec::new();
    for (n, round, mode) in schedule(opts) {
        if mode == Mode::Nftables && n > NFT_MAX_SERVICES {
            if round == 1 {
                rows.extend(Workload::ALL.map(|workload| Row {
                    mode,
                    workload,
                    services: n,
                    round,
                    load: "-".into(),
                    outcome: Outcome::Skipped(format!(
                        "skipped: a full nftables load of {} services takes 173-216 s on this machine kind (BASELINES.md)",
                        thousands(n as f64)
                    )),
                }));
            }
            continue;
        }
        eprintln!(
            "crr: round {round}: {} with {} services",
            mode.label(),
            thousands(n as f64)
        );
        let measured = measure_mode(
            daemon,
            (mode, round),
            n,
            duration,
            opts.concurrency,
            &cpus,
            &mut lab_dirs,
        )
        .with_context(|| format!("CRR, {} with {n} services", mode.label()))?;
        measured.iter().for_each(log_row);
        rows.extend(measured);
    }

    for workload in Workload::ALL {
        let of_workload: Vec<Row> = rows.extract_if(.., |r| r.workload == workload).collect();
        print_table(&of_workload, workload, opts);
    }
    check_root_untouched(&root_rules_before, &lab_dirs)?;
    println!(
        "\nCRR comparison took {:.0} s; the root network namespace's ruleset is unchanged and no lab mount or directory is left.",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// One mode in one fresh lab.

fn log_row(row: &Row) {
    if let Outcome::Measured(m) = &row.outcome {
        eprintln!(
            "crr:   {:?}: {:.0}/s ({} answers, {} errors), load {}, spread {}, client TIME_WAIT {}, CPU client {} server {}",
            row.workload,
            m.rate(),
            m.stats.completed,
            m.stats.errors,
            row.load,
            spread_text(&m.spread),
            m.client_time_wait,
            cpu_text(m.client_cpu),
            cpu_text(m.server_cpu)
        );
    }
}

/// (services, round, mode) in the order they are measured: for each service
/// count, round after round, every mode once per round.
fn schedule(opts: &Options) -> Vec<(usize, usize, Mode)> {
    let mut out = Vec::new();
    for &n in &opts.services {
        for round in 1..=opts.rounds {
            out.extend(Mode::ALL.iter().map(|&mode| (n, round, mode)));
        }
    }
    out
}

fn measure_mode(
    daemon: &Path,
    (mode, round): (Mode, usize),
    n: usize,
    duration: Duration,
    concurrency: usize,
    cpus: &Cpus,
    lab_dirs: &mut Vec<PathBuf>,
) -> Result<Vec<Row>> {
    let services = service_set(n);
    let mut bl = BenchLab::new(cpus)?;
    lab_dirs.push(bl.lab.dir().to_path_buf());
    let targets: Vec<SocketAddrV4> = match mode {
        Mode::Direct => BACKENDS
            .iter()
            .map(|(_, _, ip)| SocketAddrV4::new(*ip, BACKEND_PORT))
            .collect(),
        _ => vec![VIP],
    };
    let load = load_mode(&mut bl, mode, daemon, &services)?;
    let mut rows = Vec::new();
    for workload in Workload::ALL {
        let ours = mode.daemon_flags().is_some();
        let measurement = measure(&bl, workload, &targets, concurrency, duration, cpus)
            .and_then(|mut m| {
                if ours {
                    m.bpf = Some(bpf_cost(&bl, workload, &targets, concurrency, cpus)?);
                }
                Ok(m)
            })
            .with_context(|| format!("{workload:?}"))?;
        rows.push(Row {
            mode,
            workload,
            services: n,
            round,
            load: load.clone(),
            outcome: Outcome::Measured(measurement),
        });
    }
    // Tear down what the mode set up, explicitly, so the kernel's cleanup
    // of the namespaces is light and does not overlap the next mode's
    // measurement (wait_quiet covers the rest).
    match mode {
        Mode::Iptables | Mode::Nftables => {
            bl.lab.ns(addr::NODE_A).exec("nft", &["flush", "ruleset"])?;
        }
        _ if mode.daemon_flags().is_some() => stop_ebpf(&mut bl.lab, daemon)?,
        _ => {}
    }
    drop(bl);
    Ok(rows)
}

/// Sets the mode up in the lab: the daemons, or the rules loaded in
/// node-a's namespace. Returns the load-time cell.
fn load_mode(bl: &mut BenchLab, mode: Mode, daemon: &Path, services: &[Service]) -> Result<String> {
    if let Some(flags) = mode.daemon_flags() {
        return start_ebpf(&mut bl.lab, daemon, services, flags);
    }
    let (file, program, args) = match mode {
        Mode::Iptables => {
            let file = bl.lab.dir().join("iptables.rules");
            let rules = kube_proxy_rules::iptables_restore(services, CLUSTER_CIDR);
            fs::write(&file, rules)?;
            (file, "iptables-restore", vec![])
        }
        Mode::Nftables => {
            let file = bl.lab.dir().join("kube-proxy.nft");
            fs::write(&file, kube_proxy_rules::nft_ruleset(services, CLUSTER_CIDR))?;
            (file, "nft", vec!["-f"])
        }
        _ => return Ok("-".to_string()),
    };
    let took = timed(|| {
        let mut args = args.clone();
        args.push(path_str(&file)?);
        bl.lab.ns(addr::NODE_A).exec(program, &args).map(drop)
    })?;
    Ok(fmt_duration(took))
}

/// A warm-up, then the measured run from the client pod, with the CPU
/// figures around it and the backends' shares.
fn measure(
    bl: &BenchLab,
    workload: Workload,
    targets: &[SocketAddrV4],
    concurrency: usize,
    duration: Duration,
    cpus: &Cpus,
) -> Result<Measurement> {
    let quiet = wait_quiet();
    let client = bl.lab.ns(CLIENT_POD).clone();
    let warm = workload.run_in(&client, targets, concurrency, WARMUP, cpus.client)?;
    check_errors(&warm, "warm-up")?;
    ensure!(
        warm.completed > 0,
        "no connection completed during the warm-up"
    );
    let before = bl.served();
    let cpu_before = per_cpu_times();
    let daemons_before = daemon_cpu(&bl.lab);
    let stats = workload.run_in(&client, targets, concurrency, duration, cpus.client)?;
    let daemons_after = daemon_cpu(&bl.lab);
    let cpu_after = per_cpu_times();
    let after = bl.served();
    let cpu_use = |cpu: Option<usize>| CpuUse::between(&cpu_before, &cpu_after, cpu?);
    check_errors(&stats, "measured run")?;
    let served: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    let total: u64 = served.iter().sum::<u64>().max(1);
    let spread: Vec<f64> = served.iter().map(|&s| s as f64 / total as f64).collect();
    // Every backend must get its share, or the rules/maps are not what we
    // meant to measure.
    ensure!(
        spread.iter().all(|&s| s > 0.2),
        "uneven spread over the backends: {}",
        spread_text(&spread)
    );
    Ok(Measurement {
        stats,
        spread,
        client_time_wait: client.run(count_time_wait)?,
        client_cpu: cpu_use(cpus.client),
        server_cpu: cpu_use(cpus.server),
        daemon_cpu: daemons_before
            .zip(daemons_after)
            .map(|(b, a)| a.saturating_sub(b)),
        quiet,
        bpf: None,
    })
}

/// A short run with the kernel's BPF statistics on: our programs' time in
/// it, and the answers served.
fn bpf_cost(
    bl: &BenchLab,
    workload: Workload,
    targets: &[SocketAddrV4],
    concurrency: usize,
    cpus: &Cpus,
) -> Result<(BpfCost, u64)> {
    let client = bl.lab.ns(CLIENT_POD).clone();
    let ids = bpfcost::daemon_programs(&bl.lab)?;
    let _on = bpfcost::switch_on()?;
    let before = bpfcost::snapshot(&ids)?;
    let stats = workload.run_in(&client, targets, concurrency, BPF_COST_RUN, cpus.client)?;
    let after = bpfcost::snapshot(&ids)?;
    check_errors(&stats, "BPF statistics run")?;
    let (total, by_name) = BpfCost::between(&before, &after);
    let parts: Vec<String> = by_name
        .iter()
        .filter_map(|(name, c)| {
            let (ns, runs) = c.per(stats.completed)?;
            (c.runs > 0).then(|| format!("{name} {ns:.0} ns ({runs:.1} runs)"))
        })
        .collect();
    eprintln!(
        "crr:   {workload:?}, our BPF programs per answer: {}",
        parts.join(", ")
    );
    Ok((total, stats.completed))
}

fn check_errors(stats: &CrrStats, what: &str) -> Result<()> {
    let attempts = stats.completed + stats.errors;
    if attempts > 0 && stats.errors as f64 > MAX_ERROR_SHARE * attempts as f64 {
        bail!(
            "{what}: {} of {attempts} connections failed (first error: {})",
            stats.errors,
            stats.first_error.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}

fn root_ruleset() -> Result<String> {
    crate::cmd_output("nft", &["list", "ruleset"])
}

fn check_root_untouched(before: &str, lab_dirs: &[PathBuf]) -> Result<()> {
    let after = root_ruleset()?;
    ensure!(
        after == before,
        "the root namespace's nftables/iptables ruleset changed during the bench:\nbefore:\n{before}\nafter:\n{after}"
    );
    let mounts = fs::read_to_string("/proc/self/mountinfo")?;
    for dir in lab_dirs {
        let d = dir.to_string_lossy();
        ensure!(!dir.exists(), "lab directory {d} is still there");
        ensure!(
            !mounts.contains(d.as_ref()),
            "something is still mounted under {d}"
        );
    }
    Ok(())
}

fn timed(f: impl FnOnce() -> Result<()>) -> Result<Duration> {
    let started = Instant::now();
    f()?;
    Ok(started.elapsed())
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}
