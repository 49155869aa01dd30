//! Datapath benchmark (`cargo xtask bench`): nanoseconds per packet through
//! the TC ingress program, measured by the kernel with BPF_PROG_TEST_RUN,
//! next to a program that only returns, with 10, 10,000 and 100,000
//! services in the maps.
//!
//! Every measurement is one BPF_PROG_TEST_RUN call with repeat=1 (the
//! kernel reuses the packet across repeats, and a translated packet is no
//! longer the packet we meant to measure); the figure is the median over
//! many calls. The kernel's timer reads are inside every figure, the
//! trivial program's included, so "added" (figure minus trivial program) is
//! the cost of our work.
//!
//! A second table ([`family`]) puts IPv6 next to IPv4.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    time::Instant,
};

mod control_plane;
mod family;
mod socket;

use anyhow::{Context as _, Result, ensure};
use aya::programs::{TestRun, TestRunOptions};
use proxy_common::*;
use proxy_userspace::{
    datapath::Datapath,
    sync::{Desired, FrontendWant, Syncer, lbmap::BpfLbMaps},
    testkit::{
        pktgen::{Pkt, TCP_ACK, TCP_SYN},
        testns::NetNsGuard,
    },
};

const CALLS: usize = 20_000;
const SIZES: [usize; 3] = [10, 10_000, 100_000];
const BACKENDS_PER_SERVICE: usize = 10;
/// Distinct backend pods the services draw from.
const POD_POOL: usize = 10_000;

fn vip(i: usize) -> Ipv4Addr {
    // 10.96.0.0/12 holds a million addresses; i < 2^20.
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 1 + i as u32)
}

fn pod(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 0)) + 10 + i as u32)
}

/// A service whose backend is a local pod (its address above those of the
/// bench's 100,000 services, 10.96.0.1-10.97.134.160): the pod is on the bench
/// namespace's device `d0`, whose neighbour entry is there, so the FIB
/// lookup succeeds and the packet is redirected (see NetNsGuard).
const LOCAL_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 100, 0, 1), 80);
const LOCAL_POD: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 11), 8080);

fn desired(services: usize) -> Desired {
    let mut d = Desired {
        node_addrs: BTreeSet::from([std::net::IpAddr::from([192, 168, 200, 11])]),
        ..Default::default()
    };
    d.frontends.insert(
        SvcKey {
            addr: LOCAL_VIP.ip().octets(),
            port: LOCAL_VIP.port().to_be_bytes(),
            proto: IPPROTO_TCP,
            _pad: 0,
        }
        .into(),
        FrontendWant {
            name: "bench/local:http".into(),
            flags: 0,
            backends: vec![
                Backend {
                    addr: LOCAL_POD.ip().octets(),
                    port: LOCAL_POD.port().to_be_bytes(),
                    proto: IPPROTO_TCP,
                    flags: BE_F_LOCAL,
                }
                .into(),
            ],
            ..Default::default()
        },
    );
    for i in 0..services {
        let backends = (0..BACKENDS_PER_SERVICE)
            .map(|b| Backend {
                addr: pod((i * 7 + b) % POD_POOL).octets(),
                port: 8080u16.to_be_bytes(),
                proto: IPPROTO_TCP,
                flags: 0,
            })
            .map(Into::into)
            .collect();
        d.frontends.insert(
            SvcKey {
                addr: vip(i).octets(),
                port: 80u16.to_be_bytes(),
                proto: IPPROTO_TCP,
                _pad: 0,
            }
            .into(),
            FrontendWant {
                name: format!("bench/svc-{i}:http"),
                flags: 0,
                backends,
                ..Default::default()
            },
        );
    }
    d
}

struct Bench {
    dp: Datapath,
}

impl Bench {
    /// Median kernel-reported ns of one program run over `frames`.
    fn median(&self, prog: &str, frames: &mut dyn FnMut(usize) -> Vec<u8>) -> Result<f64> {
        self.median_from(prog, 0, frames)
    }

    /// [`Bench::median`] of packets that arrived on the device of index
    /// `ingress_ifindex` (0: sent by a process of this node), as the
    /// egress hook sees forwarded packets.
    fn median_from(
        &self,
        prog: &str,
        ingress_ifindex: u32,
        frames: &mut dyn FnMut(usize) -> Vec<u8>,
    ) -> Result<f64> {
        let p = self.dp.program(prog)?;
        let ctx = skb_context(ingress_ifindex);
        let mut out = vec![0u8; 512];
        let mut ns = Vec::with_capacity(CALLS);
        for i in 0..CALLS {
            let frame = frames(i);
            let r = p.test_run(TestRunOptions {
                data_in: Some(&frame),
                data_out: Some(&mut out),
                // The kernel's defaults when there is no device to name.
                ctx_in: (ingress_ifindex != 0).then_some(&ctx[..]),
                ..Default::default()
            })?;
            ns.push(r.duration.as_nanos() as u64);
        }
        ns.sort_unstable();
        Ok(ns[ns.len() / 2] as f64)
    }
}

/// A `struct __sk_buff` for BPF_PROG_TEST_RUN: all zero (the kernel's
/// defaults) but `ingress_ifindex`, which the kernel copies into the
/// packet's `skb_iif`.
fn skb_context(ingress_ifindex: u32) -> Vec<u8> {
    /// Size of `struct __sk_buff` and the offset of `ingress_ifindex`.
    const SK_BUFF_SIZE: usize = 192;
    const INGRESS_IFINDEX_OFF: usize = 36;
    let mut ctx = vec![0u8; SK_BUFF_SIZE];
    ctx[INGRESS_IFINDEX_OFF..INGRESS_IFINDEX_OFF + 4]
        .copy_from_slice(&ingress_ifindex.to_ne_bytes());
    ctx
}

fn main() -> Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the benchmark loads BPF programs: run it as root"
    );
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut datapath_only = false;
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [] => {}
        // The per-packet table alone (a few seconds: for comparing builds
        // in alternating runs).
        ["datapath"] => datapath_only = true,
        // The socket-level table alone (for comparing builds likewise).
        ["socket"] => {
            let _ns = NetNsGuard::new()?;
            let mut dp = Datapath::load_private(false)?;
            let mut syncer = Syncer::adopt(BpfLbMaps::new(&mut dp)?)?;
            return socket::figures(&mut dp, &mut syncer, desired);
        }
        // The control-plane figures alone.
        ["control-plane"] => {
            let _ns = NetNsGuard::new()?;
            return control_plane_figures();
        }
        // The IPv4 / IPv6 comparison alone.
        ["families"] => {
            let _ns = NetNsGuard::new()?;
            return family::figures();
        }
        // A child of control_plane_figures (see control_plane::model_rss).
        ["model-rss", n] => return control_plane::model_rss(n.parse()?),
        // The daemon's memory and change latency at one size alone.
        ["daemon-rss", n] => {
            let _ns = NetNsGuard::new()?;
            let scratch = std::env::temp_dir().join(format!("kep-bench-{}", std::process::id()));
            std::fs::create_dir_all(&scratch)?;
            let d = control_plane::daemon_run(n.parse()?, &scratch);
            let _ = std::fs::remove_dir_all(&scratch);
            let d = d?;
            println!("rss {} KiB, new file {:?}", d.rss_kib, d.new_file);
            return Ok(());
        }
        _ => anyhow::bail!(
            "usage: kep-bench [datapath | socket | control-plane | families | daemon-rss N]"
        ),
    }
    let _ns = NetNsGuard::new()?;
    let mut bench = Bench {
        dp: Datapath::load_private(false)?,
    };
    let maps = BpfLbMaps::new(&mut bench.dp)?;
    let mut syncer = Syncer::adopt(maps)?;
    list_peer_device(&mut bench.dp)?;

    println!(
        "Datapath benchmark: median ns per packet over {CALLS} BPF_PROG_TEST_RUN calls (repeat=1),"
    );
    println!(
        "kernel {}, {BACKENDS_PER_SERVICE} backends per service",
        kernel()?
    );
    println!();
    println!(
        "| services | trivial program | non-service traffic | established flow | established, to a local pod | new flow | egress, forwarded | egress, node process | programming time |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for services in SIZES {
        let started = Instant::now();
        let report = syncer.sync(&desired(services));
        let took = started.elapsed();
        ensure!(
            report.failed.is_empty(),
            "programming failed: {:?}",
            report.failed
        );
        let c = packet_costs(&mut bench, services)?;
        let cell = |v: f64| format!("{v:.0} (+{:.0})", v - c.noop);
        println!(
            "| {services} | {:.0} | {} | {} | {} | {} | {} | {} | {:.0} ms |",
            c.noop,
            cell(c.pass),
            cell(c.established),
            cell(c.to_local_pod),
            cell(c.new_flow),
            cell(c.egress_forwarded),
            cell(c.egress_local),
            took.as_secs_f64() * 1e3
        );
    }
    println!();
    println!("Cells: median ns (added over the trivial program). The first columns are");
    println!("kep_ingress (an established flow: to a remote backend the FIB has no route to, and");
    println!("to a backend pod of this node, the FIB naming its device); the egress columns are");
    println!("kep_egress on non-service traffic, a packet another device of the node received");
    println!("(forwarded) and one a node process sent.");
    println!("Programming time: the syncer writing the services added since the previous row,");
    println!("from userspace.");
    if datapath_only {
        return Ok(());
    }
    socket::figures(&mut bench.dp, &mut syncer, desired)?;
    family::figures()?;

    // Fresh maps for the control-plane figures.
    drop(syncer);
    control_plane_figures()
}

/// Lists `d0` as a pod's device, as the daemon lists a veth whose peer is
/// in another namespace, so that packets for [`LOCAL_POD`] take the path
/// into the pod (bpf_redirect_peer). (d0's peer is not in another
/// namespace, but BPF_PROG_TEST_RUN only runs the program: the redirect
/// it asks for is not carried out.) A datapath without that map (older
/// builds, for comparison) takes the plain redirect.
fn list_peer_device(dp: &mut Datapath) -> Result<()> {
    let Ok(mut map) = dp.map::<aya::maps::Array<_, u64>>("KEP_PEERDEV") else {
        return Ok(());
    };
    let d0 = nix::net::if_::if_nametoindex("d0")?;
    map.set(d0 / 64, 1 << (d0 % 64), 0)?;
    Ok(())
}

/// Median ns per packet with `services` programmed.
struct PacketCosts {
    /// The trivial program: the cost of BPF_PROG_TEST_RUN itself.
    noop: f64,
    /// A packet to no service.
    pass: f64,
    established: f64,
    /// An established flow to a backend pod of this node (FIB lookup
    /// succeeds; the packet is redirected).
    to_local_pod: f64,
    new_flow: f64,
    /// kep_egress, non-service traffic another device received.
    egress_forwarded: f64,
    /// kep_egress, non-service traffic a node process sent.
    egress_local: f64,
}

fn packet_costs(bench: &mut Bench, services: usize) -> Result<PacketCosts> {
    let client = Ipv4Addr::new(10, 244, 1, 5);
    // The measured service is the last one programmed.
    let target = SocketAddrV4::new(vip(services - 1), 80);

    let other = Pkt::tcp(
        SocketAddrV4::new(client, 40000),
        SocketAddrV4::new(pod(1), 8080),
        TCP_ACK,
    )
    .build();
    let noop = bench.median(PROG_NOOP, &mut |_| other.clone())?;
    let pass = bench.median(PROG_INGRESS, &mut |_| other.clone())?;
    // Index 2: the namespace's first device after lo.
    let egress_forwarded = bench.median_from(PROG_EGRESS, 2, &mut |_| other.clone())?;
    let egress_local = bench.median(PROG_EGRESS, &mut |_| other.clone())?;

    // A source port of its own per size: the same port towards the
    // previous size's frontend would share its backend's reply tuple, and
    // the datapath would remap this flow's port (one more rewrite a
    // packet), as it does for a client reusing a port towards two
    // frontends of one backend.
    let est_src = SocketAddrV4::new(client, 40000 + services.ilog10() as u16);
    let established = established_flow(bench, est_src, target)?;
    let local_src = SocketAddrV4::new(client, 50000 + services.ilog10() as u16);
    let to_local_pod = established_flow(bench, local_src, LOCAL_VIP)?;

    // A new source port (and, every 40000 calls, address) per call.
    let base = services as u32 * 3;
    let new_flow = bench.median(PROG_INGRESS, &mut |i| {
        let n = base + i as u32;
        let src = SocketAddrV4::new(
            Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 245, 0, 0)) + n / 40000),
            (1024 + n % 40000) as u16,
        );
        Pkt::tcp(src, target, TCP_SYN).build()
    })?;
    Ok(PacketCosts {
        noop,
        pass,
        established,
        to_local_pod,
        new_flow,
        egress_forwarded,
        egress_local,
    })
}

/// Median ns of a packet of the flow `from` -> `to` once its SYN opened
/// it.
fn established_flow(bench: &mut Bench, from: SocketAddrV4, to: SocketAddrV4) -> Result<f64> {
    let syn = Pkt::tcp(from, to, TCP_SYN).build();
    bench
        .median(PROG_INGRESS, &mut |_| syn.clone())
        .context("warm-up")?;
    let ack = Pkt::tcp(from, to, TCP_ACK).build();
    bench.median(PROG_INGRESS, &mut |_| ack.clone())
}

/// Control-plane figures on fresh maps, memory, and the daemon's change
/// latency in manifests mode.
fn control_plane_figures() -> Result<()> {
    let mut dp = Datapath::load_private(false)?;
    control_plane::run(&mut dp)?;
    drop(dp);
    let scratch = std::env::temp_dir().join(format!("kep-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let mib = |kib: u64| kib as f64 / 1024.0;
    for n in [1_000, 10_000, 50_000] {
        let model = control_plane::model_rss_in_child(n)?;
        println!(
            "| RSS with {n} Services, objects as the API watchers hand them over (in-process) | {:.0} MiB |",
            mib(model)
        );
        let d = control_plane::daemon_run(n, &scratch)?;
        println!(
            "| daemon RSS with {n} Services programmed (manifests) | {:.0} MiB |",
            mib(d.rss_kib)
        );
        println!(
            "| daemon: a new Service in a new manifest file to maps updated, {n} Services | {:.0} ms |",
            d.new_file.as_secs_f64() * 1e3
        );
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}

fn kernel() -> Result<String> {
    Ok(nix::sys::utsname::uname()?
        .release()
        .to_string_lossy()
        .into_owned())
}
