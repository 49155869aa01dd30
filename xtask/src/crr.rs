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

use std::fmt::Write as _;
use std::fs;
use std::io::{self, ErrorKind, Read, Write};
use std::mem;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use lab::{Lab, Netns, Signal, addr};

use crate::kube_proxy_rules::{self, ClusterCidr, Service};

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
/// Filler endpoints start here (10.244.3.0, above both nodes' pod CIDRs)
/// and use this many addresses before the port moves on.
const FILLER_EP_BASE: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 0);
const FILLER_EP_SPAN: u32 = 60_000;
const FILLER_ENDPOINTS: u32 = 10;
/// Filler ClusterIPs: 10.100.0.0 + i, inside the default 10.96.0.0/12.
const FILLER_VIP_BASE: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 0);

/// kube-proxy's nftables mode takes minutes for a full load of this many
/// services on this machine kind (BASELINES.md: 173-216 s at 10,000).
const NFT_MAX_SERVICES: usize = 1000;
/// Warm-up before each measured run (neighbour entries, caches).
const WARMUP: Duration = Duration::from_millis(500);
/// A connection that makes no progress for this long counts as an error
/// (a lost SYN is retransmitted after 1 s).
const CONN_TIMEOUT: Duration = Duration::from_secs(2);
/// Errors above this share of all attempts fail the bench.
const MAX_ERROR_SHARE: f64 = 0.02;
const REQUEST: &[u8] = b"GET / HTTP/1.0\r\n\r\n";
const RESPONSE: &[u8] = b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n";

#[derive(Debug, Clone)]
pub struct Options {
    /// Length of each measured run.
    pub seconds: f64,
    /// Service counts, each measured in every mode.
    pub services: Vec<usize>,
    /// Connections in flight.
    pub concurrency: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Direct,
    Ebpf,
    Iptables,
    Nftables,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Direct => "direct to pod (no proxy)",
            Mode::Ebpf => "kube-ebpf-proxy",
            Mode::Iptables => "kube-proxy iptables (nf_tables backend)",
            Mode::Nftables => "kube-proxy nftables",
        }
    }
}

/// One line of the result table.
struct Row {
    mode: Mode,
    services: usize,
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
}

impl Measurement {
    fn rate(&self) -> f64 {
        self.stats.completed as f64 / self.stats.elapsed.as_secs_f64()
    }
}

struct Cpus {
    client: Option<usize>,
    server: Option<usize>,
}

/// Runs the comparison and prints the table.
pub fn run(daemon: &Path, opts: &Options) -> Result<()> {
    ensure!(opts.seconds > 0.0, "--seconds must be positive");
    ensure!(opts.concurrency > 0, "--concurrency must be positive");
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
    for &n in &opts.services {
        for mode in [Mode::Direct, Mode::Ebpf, Mode::Iptables, Mode::Nftables] {
            if mode == Mode::Nftables && n > NFT_MAX_SERVICES {
                rows.push(Row {
                    mode,
                    services: n,
                    load: "-".into(),
                    outcome: Outcome::Skipped(format!(
                        "skipped: a full nftables load of {} services takes 173-216 s on this machine kind (BASELINES.md)",
                        thousands(n as f64)
                    )),
                });
                continue;
            }
            eprintln!(
                "crr: {} with {} services",
                mode.label(),
                thousands(n as f64)
            );
            let row = measure_mode(
                daemon,
                mode,
                n,
                duration,
                opts.concurrency,
                &cpus,
                &mut lab_dirs,
            )
            .with_context(|| format!("CRR, {} with {n} services", mode.label()))?;
            if let Outcome::Measured(m) = &row.outcome {
                eprintln!(
                    "crr:   {:.0}/s ({} connections, {} errors), load {}, spread {}, client TIME_WAIT {}, CPU client {} server {}",
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
            rows.push(row);
        }
    }

    print_table(&rows, opts);
    check_root_untouched(&root_rules_before, &lab_dirs)?;
    println!(
        "\nCRR comparison took {:.0} s; the root network namespace's ruleset is unchanged and no lab mount or directory is left.",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// One mode in one fresh lab.

/// A lab with three backend pods running [`FastServer`]s and a client pod.
/// Servers are declared first so they stop before the lab is torn down.
struct BenchLab {
    servers: Vec<FastServer>,
    lab: Lab,
}

impl BenchLab {
    fn new(cpus: &Cpus) -> Result<BenchLab> {
        let mut lab = Lab::new().context("building the lab (needs root)")?;
        let mut servers = Vec::new();
        for (node, name, ip) in BACKENDS {
            lab.add_pod_with_ip(node, name, ip)?;
            let at = SocketAddrV4::new(ip, BACKEND_PORT);
            servers.push(FastServer::start(lab.ns(name), at, cpus.server)?);
        }
        lab.add_pod_with_ip(addr::NODE_A, CLIENT_POD, CLIENT_IP)?;
        // The client pod's own namespace: reusing TIME_WAIT ports is its
        // business (the client normally has none, see the module docs).
        lab.ns(CLIENT_POD)
            .set_sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        Ok(BenchLab { servers, lab })
    }

    fn served(&self) -> Vec<u64> {
        self.servers.iter().map(FastServer::served).collect()
    }
}

fn measure_mode(
    daemon: &Path,
    mode: Mode,
    n: usize,
    duration: Duration,
    concurrency: usize,
    cpus: &Cpus,
    lab_dirs: &mut Vec<PathBuf>,
) -> Result<Row> {
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

    let load = match mode {
        Mode::Direct => "-".to_string(),
        Mode::Ebpf => start_ebpf(&mut bl.lab, daemon, &services)?,
        Mode::Iptables => {
            let file = bl.lab.dir().join("iptables.rules");
            fs::write(
                &file,
                kube_proxy_rules::iptables_restore(&services, CLUSTER_CIDR),
            )?;
            let took = timed(|| {
                bl.lab
                    .ns(addr::NODE_A)
                    .exec("iptables-restore", &[path_str(&file)?])
                    .map(drop)
            })?;
            fmt_duration(took)
        }
        Mode::Nftables => {
            let file = bl.lab.dir().join("kube-proxy.nft");
            fs::write(
                &file,
                kube_proxy_rules::nft_ruleset(&services, CLUSTER_CIDR),
            )?;
            let took = timed(|| {
                bl.lab
                    .ns(addr::NODE_A)
                    .exec("nft", &["-f", path_str(&file)?])
                    .map(drop)
            })?;
            fmt_duration(took)
        }
    };

    let quiet = wait_quiet();
    let client = bl.lab.ns(CLIENT_POD).clone();
    let warm = crr_in(&client, &targets, concurrency, WARMUP, cpus.client)?;
    check_errors(&warm, "warm-up")?;
    ensure!(
        warm.completed > 0,
        "no connection completed during the warm-up"
    );
    let before = bl.served();
    let cpu_before = per_cpu_times();
    let daemons_before = daemon_cpu(&bl.lab);
    let stats = crr_in(&client, &targets, concurrency, duration, cpus.client)?;
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
    let client_time_wait = client.run(count_time_wait)?;

    // Tear down what the mode set up, explicitly, so the kernel's cleanup
    // of the namespaces is light and does not overlap the next mode's
    // measurement (wait_quiet covers the rest).
    match mode {
        Mode::Direct => {}
        Mode::Ebpf => stop_ebpf(&mut bl.lab, daemon)?,
        Mode::Iptables | Mode::Nftables => {
            bl.lab.ns(addr::NODE_A).exec("nft", &["flush", "ruleset"])?;
        }
    }
    drop(bl);
    Ok(Row {
        mode,
        services: n,
        load,
        outcome: Outcome::Measured(Measurement {
            stats,
            spread,
            client_time_wait,
            client_cpu: cpu_use(cpus.client),
            server_cpu: cpu_use(cpus.server),
            daemon_cpu: daemons_before
                .zip(daemons_after)
                .map(|(b, a)| a.saturating_sub(b)),
            quiet,
        }),
    })
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

// ---------------------------------------------------------------------------
// Services and the kube-ebpf-proxy mode.

/// `n` services: `n - 1` fillers with 10 endpoints each, then the measured
/// one with the three real backends.
fn service_set(n: usize) -> Vec<Service> {
    let mut services: Vec<Service> = (0..n.saturating_sub(1) as u32)
        .map(|i| {
            let first = i * FILLER_ENDPOINTS;
            // Addresses repeat every FILLER_EP_SPAN endpoints, with the next
            // port, so every (address, port) is distinct; a slice's
            // endpoints share one port, and FILLER_EP_SPAN is a multiple of
            // FILLER_ENDPOINTS, so a service never straddles two ports.
            let port = BACKEND_PORT + (first / FILLER_EP_SPAN) as u16;
            Service {
                namespace: "bench".into(),
                name: format!("filler-{i:05}"),
                port_name: "http".into(),
                cluster_ip: Ipv4Addr::from(u32::from(FILLER_VIP_BASE) + i),
                port: 80,
                endpoints: (0..FILLER_ENDPOINTS)
                    .map(|j| {
                        let host = (first % FILLER_EP_SPAN) + j;
                        SocketAddrV4::new(Ipv4Addr::from(u32::from(FILLER_EP_BASE) + host), port)
                    })
                    .collect(),
            }
        })
        .collect();
    services.push(Service {
        namespace: "bench".into(),
        name: "web".into(),
        port_name: "http".into(),
        cluster_ip: *VIP.ip(),
        port: VIP.port(),
        endpoints: BACKENDS
            .iter()
            .map(|(_, _, ip)| SocketAddrV4::new(*ip, BACKEND_PORT))
            .collect(),
    });
    services
}

/// Services and EndpointSlices as one JSON `List` (hand-written: plain
/// ASCII names and addresses need no escaping).
fn manifests_json(services: &[Service]) -> String {
    let mut items = Vec::with_capacity(services.len() * 2);
    for s in services {
        let target = s.endpoints.first().map_or(BACKEND_PORT, SocketAddrV4::port);
        items.push(format!(
            r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"{name}","namespace":"{ns}"}},"spec":{{"clusterIP":"{vip}","ports":[{{"name":"{pn}","protocol":"TCP","port":{port},"targetPort":{target}}}]}}}}"#,
            name = s.name,
            ns = s.namespace,
            vip = s.cluster_ip,
            pn = s.port_name,
            port = s.port,
        ));
        let endpoints: Vec<String> = s
            .endpoints
            .iter()
            .map(|ep| {
                let node = BACKENDS.iter().find(|(_, _, ip)| ip == ep.ip()).map_or(
                    if u32::from(*ep.ip()) % 2 == 0 {
                        addr::NODE_A
                    } else {
                        addr::NODE_B
                    },
                    |b| b.0,
                );
                format!(r#"{{"addresses":["{}"],"nodeName":"{node}"}}"#, ep.ip())
            })
            .collect();
        items.push(format!(
            r#"{{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{{"name":"{name}-1","namespace":"{ns}","labels":{{"kubernetes.io/service-name":"{name}"}}}},"addressType":"IPv4","ports":[{{"name":"{pn}","protocol":"TCP","port":{target}}}],"endpoints":[{eps}]}}"#,
            name = s.name,
            ns = s.namespace,
            pn = s.port_name,
            eps = endpoints.join(","),
        ));
    }
    format!(
        "{{\"apiVersion\":\"v1\",\"kind\":\"List\",\"items\":[\n{}\n]}}\n",
        items.join(",\n")
    )
}

fn bpffs_of(lab: &Lab, node: &str) -> PathBuf {
    lab.dir().join(format!("{node}-bpffs"))
}

/// Starts the daemon on both nodes and waits until node-a has programmed
/// its maps and attached. Returns the load-time cell: the map write time
/// the daemon logs for its first sync, and the wall time from start to
/// ready (which includes loading the BPF programs and parsing manifests).
fn start_ebpf(lab: &mut Lab, daemon: &Path, services: &[Service]) -> Result<String> {
    let dir = lab.dir().join("manifests");
    fs::create_dir(&dir)?;
    fs::write(dir.join("services.json"), manifests_json(services))?;
    let started = Instant::now();
    for node in addr::NODES {
        let bpffs = bpffs_of(lab, node);
        lab.start_daemon(
            node,
            daemon,
            [
                "run".as_ref(),
                "--manifests".as_ref(),
                dir.as_os_str(),
                "--hostname-override".as_ref(),
                node.as_ref(),
                "--bpffs".as_ref(),
                bpffs.as_os_str(),
            ],
        )?;
    }
    let mut ready_after = None;
    lab.wait_for(
        "kube-ebpf-proxy synced and ready on node-a",
        Duration::from_secs(120),
        || {
            let log = lab.daemon_log(addr::NODE_A);
            let ready = log.contains(" synced ") && log.contains(" ready ");
            if ready {
                ready_after = Some(started.elapsed());
            }
            ready
        },
    )?;
    lab.wait_for(
        "kube-ebpf-proxy ready on node-b",
        Duration::from_secs(120),
        || lab.daemon_log(addr::NODE_B).contains(" ready "),
    )?;
    let log = lab.daemon_log(addr::NODE_A);
    let sync_us: u64 = log
        .lines()
        .find(|l| l.contains(" synced "))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("took_us="))
        })
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no took_us in the daemon's synced line:\n{log}"))?;
    Ok(format!(
        "{} maps (ready in {})",
        fmt_duration(Duration::from_micros(sync_us)),
        fmt_duration(ready_after.unwrap_or_default())
    ))
}

fn stop_ebpf(lab: &mut Lab, daemon: &Path) -> Result<()> {
    for node in addr::NODES {
        let status = lab.stop_daemon(node, Signal::SIGTERM)?;
        ensure!(status.success(), "daemon on {node} exited with {status}");
        let bpffs = bpffs_of(lab, node);
        lab.ns(node).exec(
            path_str(daemon)?,
            &["cleanup", "--bpffs", path_str(&bpffs)?],
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Server: one thread per backend pod.

struct FastServer {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl FastServer {
    fn start(ns: &Netns, at: SocketAddrV4, cpu: Option<usize>) -> Result<FastServer> {
        let listener = ns
            .run(|| TcpListener::bind(at))
            .with_context(|| format!("listening on {at} in {}", ns.name()))?;
        // Nonblocking, polled with a timeout, so the stop flag is seen.
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let (flag, count) = (Arc::clone(&stop), Arc::clone(&served));
        let thread = thread::Builder::new()
            .name(format!("crr-server-{at}"))
            .spawn(move || {
                if let Some(cpu) = cpu
                    && let Err(e) = pin_to_cpu(cpu)
                {
                    eprintln!("crr: server {at}: pinning to CPU {cpu}: {e}");
                }
                serve(&listener, &flag, &count);
            })?;
        Ok(FastServer {
            stop,
            served,
            thread: Some(thread),
        })
    }

    fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for FastServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// accept -> read the request -> write the answer -> close, one connection
/// at a time. Reading first matters: closing with unread data would send a
/// reset instead of a FIN.
fn serve(listener: &TcpListener, stop: &AtomicBool, served: &AtomicU64) {
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::Relaxed) {
        if !poll_in(listener.as_raw_fd(), 100) {
            continue;
        }
        loop {
            let mut stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                // A connection reset while queued, or a signal: next one.
                Err(_) => continue,
            };
            // Accepted sockets do not inherit O_NONBLOCK: reads block, but
            // never for long (a client that stalls is cut off).
            if stream
                .set_read_timeout(Some(Duration::from_secs(1)))
                .is_err()
            {
                continue;
            }
            let mut got = 0;
            let complete = loop {
                match stream.read(&mut buf[got..]) {
                    Ok(0) | Err(_) => break false,
                    Ok(n) => {
                        got += n;
                        if buf[..got].ends_with(b"\r\n\r\n") || got == buf.len() {
                            break true;
                        }
                    }
                }
            };
            if complete && stream.write_all(RESPONSE).is_ok() {
                served.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn poll_in(fd: RawFd, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, timeout_ms) > 0 }
}

// ---------------------------------------------------------------------------
// Client: one pinned thread, `concurrency` connections in flight.

#[derive(Debug, Default)]
struct CrrStats {
    completed: u64,
    errors: u64,
    elapsed: Duration,
    first_error: Option<String>,
}

/// Runs [`crr_loop`] on a thread in `ns`, pinned to `cpu`.
fn crr_in(
    ns: &Netns,
    targets: &[SocketAddrV4],
    concurrency: usize,
    duration: Duration,
    cpu: Option<usize>,
) -> Result<CrrStats> {
    ns.run(|| {
        if let Some(cpu) = cpu {
            pin_to_cpu(cpu).with_context(|| format!("pinning the client to CPU {cpu}"))?;
        }
        crr_loop(targets, concurrency, duration).context("client loop")
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ConnState {
    Connecting,
    Reading,
}

struct Conn {
    fd: OwnedFd,
    state: ConnState,
    since: Instant,
    got: usize,
}

fn last_err(what: &str) -> String {
    format!("{what}: {}", io::Error::last_os_error())
}

/// Opens a nonblocking connection to `target` and registers it with epoll
/// (writable = connected).
fn open_conn(ep: RawFd, slot: usize, target: SocketAddrV4) -> Result<Conn, String> {
    // SAFETY: plain socket syscalls on descriptors we own; the sockaddr is
    // fully initialised and outlives the call.
    unsafe {
        let fd = libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        );
        if fd < 0 {
            return Err(last_err("socket"));
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: target.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*target.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            fd.as_raw_fd(),
            (&raw const sa).cast(),
            mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        if rc != 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(last_err("connect"));
        }
        let mut ev = libc::epoll_event {
            events: libc::EPOLLOUT as u32,
            u64: slot as u64,
        };
        if libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd.as_raw_fd(), &mut ev) != 0 {
            return Err(last_err("epoll_ctl add"));
        }
        Ok(Conn {
            fd,
            state: ConnState::Connecting,
            since: Instant::now(),
            got: 0,
        })
    }
}

enum Step {
    /// Still in flight.
    Pending,
    /// Answer read to EOF.
    Done,
    Failed(String),
}

/// Advances a connection after epoll reported `events` for it.
fn step(ep: RawFd, conn: &mut Conn, events: u32, slot: usize, buf: &mut [u8]) -> Step {
    let fd = conn.fd.as_raw_fd();
    // SAFETY: syscalls on a descriptor we own with buffers that outlive them.
    unsafe {
        if conn.state == ConnState::Connecting {
            let mut err: libc::c_int = 0;
            let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
            if libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&raw mut err).cast(),
                &mut len,
            ) != 0
            {
                return Step::Failed(last_err("getsockopt"));
            }
            if err != 0 {
                return Step::Failed(format!("connect: {}", io::Error::from_raw_os_error(err)));
            }
            if events & libc::EPOLLOUT as u32 == 0 {
                return Step::Pending;
            }
            let n = libc::send(
                fd,
                REQUEST.as_ptr().cast(),
                REQUEST.len(),
                libc::MSG_NOSIGNAL,
            );
            if n != REQUEST.len() as isize {
                return Step::Failed(last_err("send"));
            }
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: slot as u64,
            };
            if libc::epoll_ctl(ep, libc::EPOLL_CTL_MOD, fd, &mut ev) != 0 {
                return Step::Failed(last_err("epoll_ctl mod"));
            }
            conn.state = ConnState::Reading;
            conn.since = Instant::now();
            return Step::Pending;
        }
        loop {
            let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
            if n > 0 {
                conn.got += n as usize;
                conn.since = Instant::now();
                continue;
            }
            if n == 0 {
                return if conn.got >= RESPONSE.len() {
                    Step::Done
                } else {
                    Step::Failed(format!("short answer ({} bytes)", conn.got))
                };
            }
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) => Step::Pending,
                Some(libc::EINTR) => continue,
                _ => Step::Failed(format!("read: {e}")),
            };
        }
    }
}

/// For `duration`, keeps `concurrency` connections in flight to `targets`
/// (round-robin) and counts those answered to EOF. Connections still open
/// at the end are closed and not counted.
fn crr_loop(targets: &[SocketAddrV4], concurrency: usize, duration: Duration) -> Result<CrrStats> {
    // SAFETY: epoll_create1 returns a new descriptor we then own.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    ensure!(ep >= 0, "epoll_create1: {}", io::Error::last_os_error());
    // SAFETY: ep is a fresh descriptor owned by nobody else.
    let ep_owned = unsafe { OwnedFd::from_raw_fd(ep) };
    let mut stats = CrrStats::default();
    let mut next = 0usize;
    let mut pick = || {
        let t = targets[next % targets.len()];
        next += 1;
        t
    };
    let fail = |stats: &mut CrrStats, why: String| {
        stats.errors += 1;
        stats.first_error.get_or_insert(why);
    };
    let mut slots: Vec<Option<Conn>> = Vec::with_capacity(concurrency);
    let start = Instant::now();
    let deadline = start + duration;
    for slot in 0..concurrency {
        match open_conn(ep, slot, pick()) {
            Ok(c) => slots.push(Some(c)),
            Err(why) => {
                fail(&mut stats, why);
                slots.push(None);
            }
        }
    }
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; concurrency];
    let mut buf = [0u8; 1024];
    let mut last_sweep = start;
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let wait_ms = (deadline - now).as_millis().clamp(1, 50) as i32;
        // SAFETY: the buffer holds `concurrency` events.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), concurrency as i32, wait_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            bail!("epoll_wait: {e}");
        }
        let mut reopen = Vec::new();
        for ev in &events[..n as usize] {
            let (bits, slot) = (ev.events, ev.u64 as usize);
            let Some(conn) = slots[slot].as_mut() else {
                continue;
            };
            match step(ep, conn, bits, slot, &mut buf) {
                Step::Pending => {}
                Step::Done => {
                    // Count only what finished inside the window.
                    if Instant::now() < deadline {
                        stats.completed += 1;
                    }
                    reopen.push(slot);
                }
                Step::Failed(why) => {
                    fail(&mut stats, why);
                    reopen.push(slot);
                }
            }
        }
        // Stalled connections (a lost packet, a broken datapath) are errors.
        let now = Instant::now();
        if now - last_sweep > Duration::from_millis(100) {
            last_sweep = now;
            for (slot, conn) in slots.iter().enumerate() {
                match conn {
                    Some(c) if now - c.since > CONN_TIMEOUT => {
                        let state = match c.state {
                            ConnState::Connecting => "connecting",
                            ConnState::Reading => "waiting for the answer",
                        };
                        fail(
                            &mut stats,
                            format!("timed out {state} after {CONN_TIMEOUT:?}"),
                        );
                        reopen.push(slot);
                    }
                    None => reopen.push(slot),
                    _ => {}
                }
            }
        }
        for slot in reopen {
            // Dropping the OwnedFd closes the socket, which also removes it
            // from the epoll set.
            slots[slot] = None;
            if Instant::now() >= deadline {
                continue;
            }
            match open_conn(ep, slot, pick()) {
                Ok(c) => slots[slot] = Some(c),
                Err(why) => fail(&mut stats, why),
            }
        }
        // A datapath that refuses everything fails fast instead of
        // spinning through the ports for the whole run.
        if stats.errors > 1000 && stats.errors > stats.completed {
            break;
        }
    }
    stats.elapsed = start.elapsed().min(duration).max(Duration::from_millis(1));
    drop(slots);
    drop(ep_owned);
    Ok(stats)
}

/// TIME_WAIT sockets of the calling thread's network namespace.
fn count_time_wait() -> Result<usize> {
    // /proc/self/net would show the main thread's namespace.
    let text = fs::read_to_string("/proc/thread-self/net/tcp")?;
    Ok(text
        .lines()
        .skip(1)
        .filter(|l| l.split_whitespace().nth(3) == Some("06"))
        .count())
}

// ---------------------------------------------------------------------------
// Machine: CPUs, quiet, root namespace.

fn pin_to_cpu(cpu: usize) -> io::Result<()> {
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
fn pick_cpus() -> Result<Cpus> {
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
fn per_cpu_times() -> Vec<(usize, Vec<u64>)> {
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
struct CpuUse {
    busy: f64,
    user: f64,
    softirq: f64,
}

impl CpuUse {
    fn between(
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

fn cpu_text(c: Option<CpuUse>) -> String {
    c.map_or("-".into(), |c| {
        format!(
            "{:.0}% ({:.0}% user, {:.0}% softirq)",
            c.busy * 100.0,
            c.user * 100.0,
            c.softirq * 100.0
        )
    })
}

/// Aggregate CPU time (busy, total) in jiffies from /proc/stat.
fn cpu_times() -> Option<(u64, u64)> {
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
fn wait_quiet() -> bool {
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
fn daemon_cpu(lab: &Lab) -> Option<Duration> {
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

fn machine_summary(cpus: &Cpus, opts: &Options) -> String {
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

// ---------------------------------------------------------------------------
// Output.

fn print_table(rows: &[Row], opts: &Options) {
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
    print!("{out}");
}

fn spread_text(spread: &[f64]) -> String {
    spread
        .iter()
        .map(|s| format!("{:.0}%", s * 100.0))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// 12345.6 -> "12,346".
fn thousands(v: f64) -> String {
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

fn fmt_duration(d: Duration) -> String {
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

fn timed(f: impl FnOnce() -> Result<()>) -> Result<Duration> {
    let started = Instant::now();
    f()?;
    Ok(started.elapsed())
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_set_shape() {
        let s = service_set(10_000);
        assert_eq!(s.len(), 10_000);
        assert_eq!(s.last().unwrap().cluster_ip, *VIP.ip());
        assert_eq!(s.last().unwrap().endpoints.len(), 3);
        let mut eps = std::collections::BTreeSet::new();
        for svc in &s[..s.len() - 1] {
            assert_eq!(svc.endpoints.len(), 10);
            // One port per slice.
            assert!(
                svc.endpoints
                    .iter()
                    .all(|e| e.port() == svc.endpoints[0].port())
            );
            for e in &svc.endpoints {
                // Never one of the real pods, always in the cluster CIDR.
                assert!(u32::from(*e.ip()) >= u32::from(FILLER_EP_BASE));
                assert_eq!(e.ip().octets()[..2], [10, 244]);
                assert!(eps.insert(*e), "{e} twice");
            }
        }
        assert_eq!(service_set(1).len(), 1);
    }

    #[test]
    fn manifests_are_one_list() {
        let text = manifests_json(&service_set(3));
        assert!(text.starts_with("{\"apiVersion\":\"v1\",\"kind\":\"List\""));
        assert_eq!(text.matches("\"kind\":\"Service\"").count(), 3);
        assert_eq!(text.matches("\"kind\":\"EndpointSlice\"").count(), 3);
        assert!(text.contains(r#"{"addresses":["10.244.1.11"],"nodeName":"node-a"}"#));
        assert!(text.contains(r#""clusterIP":"10.96.10.10""#));
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
