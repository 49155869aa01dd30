//! Datapath fuzzing: a seeded generator of mutated frames run through the
//! real `kep_ingress` and `kep_egress` with BPF_PROG_TEST_RUN, against maps
//! the real syncer filled (a ClusterIP with a backend, one without, a
//! NodePort).
//!
//! The frames: IPv4 TCP, UDP, ICMP errors (quoting valid, truncated or
//! garbage inner packets) and other protocols, aimed at the ClusterIPs,
//! the NodePort, as backend replies, and at addresses that are no service;
//! then mutated: IHL 0-15 (with options), total-length lies, every
//! fragment flag combination and offsets, TCP data offsets 0-15 and every
//! flag byte, UDP length lies, other ethertypes, flipped bytes, and
//! truncation. A third of the frames are IPv6 ([`v6`]): extension header
//! chains (fragments with every flag combination among them), payload
//! length lies, TCP and UDP header lies, ICMPv6 errors quoting garbage or
//! truncated packets, aimed at the IPv6 ClusterIPs, a NodePort on the
//! node's IPv6 address, as backend replies and elsewhere. Besides the
//! random frames, a few valid packets of both families are truncated at
//! every offset.
//!
//! Invariants, for every frame:
//! * the verdict is PASS, SHOT or REDIRECT;
//! * a frame that is no service traffic passes byte-identical;
//! * a frame the datapath rewrote is well-formed: its IP total (IPv6:
//!   payload) length covers its headers and fits in the frame, and
//!   checksums that were valid stay valid;
//! * every SHOT is counted under a drop reason;
//! * dropped frames add nothing to conntrack, reverse NAT or fragment maps
//!   (checked per window of frames: entries <= flows and first fragments
//!   let through).
//!
//! The generator knows addresses and ports only, not map layouts. The seed
//! is fixed; `KEP_SOAK=1` runs 3,000,000 frames with a fresh seed (printed;
//! `KEP_SEED=N` replays).

#[path = "datapath_fuzz/v6.rs"]
mod v6;

use std::{
    collections::BTreeSet,
    net::IpAddr,
    net::{Ipv4Addr, SocketAddrV4},
    time::Instant,
};

use aya::{
    maps::{HashMap, MapData, PerCpuArray},
    programs::{TestRun, TestRunOptions},
};
use proxy_common::*;
use proxy_userspace::{
    datapath::Datapath,
    sync::{Desired, FrontendWant, Syncer, lbmap::BpfLbMaps},
    testkit::{
        pktgen::{self, Pkt},
        testns::NetNsGuard,
    },
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// A ClusterIP whose port has no endpoint: rejected.
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 200, 11);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 11);
const SERVICE_PORT: u16 = 80;
const NODE_PORT: u16 = 30080;
const TARGET_PORT: u16 = 8080;

const DROPS: [Counter; 7] = [
    Counter::DropNoEndpoint,
    Counter::DropUnknownPort,
    Counter::DropMalformed,
    Counter::DropNoSnatPort,
    Counter::DropFragment,
    Counter::DropMapError,
    Counter::DropHelperError,
];

/// splitmix64: small, seedable, the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// True `n` times in `d`.
    fn chance(&mut self, n: usize, d: usize) -> bool {
        self.below(d) < n
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len())]
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// What a frame was aimed at, before mutation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Aim {
    ClusterIp,
    EmptyClusterIp,
    NodePort,
    BackendReply,
    /// An ICMP error, to anyone.
    IcmpError,
    /// No service's: must pass untouched.
    Other,
}

fn client(rng: &mut Rng) -> SocketAddrV4 {
    let ip = Ipv4Addr::new(10, 244, 1, 2 + rng.below(8) as u8);
    SocketAddrV4::new(ip, 32768 + rng.below(64) as u16)
}

fn elsewhere(rng: &mut Rng) -> SocketAddrV4 {
    let ip = Ipv4Addr::new(172, 16, rng.below(4) as u8, 1 + rng.below(200) as u8);
    SocketAddrV4::new(ip, rng.pick(&[80, 443, 8080, 30080, 53]))
}

/// The endpoints of a packet aimed at `aim`.
fn ends(rng: &mut Rng, aim: Aim) -> (SocketAddrV4, SocketAddrV4) {
    let port = |rng: &mut Rng, usual: u16| {
        if rng.chance(1, 8) {
            rng.next() as u16
        } else {
            usual
        }
    };
    match aim {
        Aim::ClusterIp => (client(rng), SocketAddrV4::new(VIP, port(rng, SERVICE_PORT))),
        Aim::EmptyClusterIp => (client(rng), SocketAddrV4::new(EMPTY_VIP, SERVICE_PORT)),
        Aim::NodePort => (
            elsewhere(rng),
            SocketAddrV4::new(NODE_IP, port(rng, NODE_PORT)),
        ),
        Aim::BackendReply => (SocketAddrV4::new(BACKEND, TARGET_PORT), client(rng)),
        Aim::IcmpError | Aim::Other => (client(rng), elsewhere(rng)),
    }
}

/// A valid packet (checksums right) for `aim`.
fn base(rng: &mut Rng, aim: Aim) -> Vec<u8> {
    let (src, dst) = ends(rng, aim);
    let n = rng.pick(&[0, 1, 8, 100]);
    let payload = rng.bytes(n);
    let mut p = match rng.below(5) {
        0 | 1 => Pkt::tcp(src, dst, rng.next() as u8),
        2 | 3 => Pkt::udp(src, dst, &payload),
        _ => Pkt {
            proto: rng.pick(&[1, 47, 132, 0, 255]),
            payload: payload.clone(),
            ..Pkt::tcp(src, dst, 0)
        },
    };
    if p.proto == 6 {
        p.payload = payload;
    }
    if rng.chance(1, 8) {
        let n = 4 * (1 + rng.below(10));
        p.ip_options = rng.bytes(n);
    }
    if rng.chance(1, 8) {
        p.frag_offset = rng.pick(&[0, 1, 185, 0x1fff]);
        p.more_fragments = rng.chance(1, 2);
    }
    p.build()
}

/// An ICMP error quoting a packet of a service flow (as seen either way),
/// maybe truncated or spoiled, or garbage.
fn icmp_error(rng: &mut Rng) -> Vec<u8> {
    let aim = rng.pick(&[Aim::ClusterIp, Aim::NodePort, Aim::BackendReply, Aim::Other]);
    let mut quoted = base(rng, aim)[14..].to_vec();
    match rng.below(4) {
        0 => quoted.truncate(rng.below(quoted.len() + 1)),
        1 => {
            let n = rng.below(64);
            quoted = rng.bytes(n)
        }
        2 => mutate_ip(rng, &mut quoted),
        _ => {}
    }
    let (from, to) = if rng.chance(1, 2) {
        (Ipv4Addr::new(10, 244, 2, 1), *client(rng).ip())
    } else {
        (*elsewhere(rng).ip(), rng.pick(&[NODE_IP, BACKEND, VIP]))
    };
    let ty = rng.pick(&[3, 3, 11, 12, 4, 5, 0, 8]);
    pktgen::icmp_error(from, to, ty, rng.below(16) as u8, &quoted)
}

fn ip_checksum(ip: &mut [u8]) {
    let ihl = ((ip[0] & 0x0f) as usize * 4).clamp(20, ip.len().min(60));
    ip[10..12].copy_from_slice(&[0, 0]);
    let c = pktgen::checksum(&ip[..ihl]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
}

/// One header lie or odd value in an IP packet (no Ethernet header).
fn mutate_ip(rng: &mut Rng, ip: &mut [u8]) {
    if ip.len() < 20 {
        return;
    }
    let ihl = (ip[0] & 0x0f) as usize * 4;
    match rng.below(8) {
        0 => ip[0] = (ip[0] & 0xf0) | rng.below(16) as u8,
        1 => ip[0] = ((rng.below(16) as u8) << 4) | (ip[0] & 0x0f),
        2 => {
            let len = u16::from_be_bytes([ip[2], ip[3]]);
            let lie = match rng.below(4) {
                0 => rng.next() as u16,
                1 => len.wrapping_add(1 + rng.below(64) as u16),
                2 => len.saturating_sub(1 + rng.below(64) as u16),
                _ => rng.pick(&[0, 19, 20, 0xffff]),
            };
            ip[2..4].copy_from_slice(&lie.to_be_bytes());
        }
        // Every flag combination (reserved, DF, MF), an offset or none.
        3 => {
            let flags = (rng.below(8) as u16) << 13;
            let offset = rng.pick(&[0, 0, 1, 2, 185, 0x1fff]);
            ip[6..8].copy_from_slice(&(flags | offset).to_be_bytes());
        }
        4 if ip.len() >= ihl + 14 && ip[9] == 6 => {
            let l4 = &mut ip[ihl..];
            l4[12] = ((rng.below(16) as u8) << 4) | (l4[12] & 0x0f);
            l4[13] = rng.next() as u8;
        }
        5 if ip.len() >= ihl + 8 && ip[9] == 17 => {
            let any = rng.next() as u16;
            let lie = rng.pick(&[0, 1, 7, 8, 9, 0xffff, any]);
            ip[ihl + 4..ihl + 6].copy_from_slice(&lie.to_be_bytes());
        }
        6 => ip[9] = rng.pick(&[6, 17, 1, 0, 41, 255]),
        _ => {
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(ip.len());
                ip[at] = rng.next() as u8;
            }
        }
    }
    if rng.chance(7, 8) {
        ip_checksum(ip);
    }
}

/// A random frame and what it was aimed at.
fn frame(rng: &mut Rng) -> (Vec<u8>, Aim) {
    let aim = rng.pick(&[
        Aim::ClusterIp,
        Aim::ClusterIp,
        Aim::EmptyClusterIp,
        Aim::NodePort,
        Aim::NodePort,
        Aim::BackendReply,
        Aim::IcmpError,
        Aim::Other,
        Aim::Other,
    ]);
    if rng.chance(1, 3) {
        let f = v6::frame(rng, aim);
        return (truncate_maybe(rng, f), aim);
    }
    let mut f = match aim {
        Aim::IcmpError => icmp_error(rng),
        _ => base(rng, aim),
    };
    let mut ip = f.split_off(14);
    for _ in 0..rng.below(4) {
        mutate_ip(rng, &mut ip);
    }
    f.extend_from_slice(&ip);
    if rng.chance(1, 16) {
        let any = rng.next() as u16;
        let et: u16 = rng.pick(&[0x86dd, 0x0806, 0x8100, 0x88a8, any]);
        f[12..14].copy_from_slice(&et.to_be_bytes());
    }
    (truncate_maybe(rng, f), aim)
}

fn truncate_maybe(rng: &mut Rng, mut f: Vec<u8>) -> Vec<u8> {
    if rng.chance(1, 8) {
        f.truncate(14 + rng.below(f.len() - 13));
    }
    f
}

struct Fixture {
    dp: Datapath,
    ct: HashMap<MapData, FlowKey, NatEntry>,
    rnat: HashMap<MapData, FlowKey, NatEntry>,
    frag: HashMap<MapData, FragKey, FragValue>,
    ct6: HashMap<MapData, FlowKey6, NatEntry6>,
    rnat6: HashMap<MapData, FlowKey6, NatEntry6>,
    frag6: HashMap<MapData, FragKey6, FragValue>,
    stats: PerCpuArray<MapData, u64>,
    _syncer: Syncer<BpfLbMaps>,
    _ns: NetNsGuard,
}

fn frontend6(addr: std::net::Ipv6Addr, port: u16, proto: u8) -> SvcKey6 {
    SvcKey6 {
        addr: addr.octets(),
        port: port.to_be_bytes(),
        proto,
        _pad: 0,
    }
}

fn frontend(addr: Ipv4Addr, port: u16, proto: u8) -> SvcKey {
    SvcKey {
        addr: addr.octets(),
        port: port.to_be_bytes(),
        proto,
        _pad: 0,
    }
}

impl Fixture {
    fn new(test: &str) -> Option<Fixture> {
        if !nix::unistd::geteuid().is_root() {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{test} needs root and CI=true: refusing to skip");
            }
            eprintln!("skipping {test}: needs root");
            return None;
        }
        let ns = NetNsGuard::new().expect("test namespace");
        let mut dp = Datapath::load_private(false).expect("load datapath");
        let mut syncer = Syncer::adopt(BpfLbMaps::new(&mut dp).unwrap()).unwrap();
        let mut d = Desired {
            node_addrs: BTreeSet::from([IpAddr::from(NODE_IP), v6::NODE_IP.into()]),
            ..Default::default()
        };
        for proto in [IPPROTO_TCP, IPPROTO_UDP] {
            let be = Backend {
                addr: BACKEND.octets(),
                port: TARGET_PORT.to_be_bytes(),
                proto,
                flags: 0,
            };
            let want = |flags, backends: Vec<Backend>| FrontendWant {
                name: "fuzz/web:http".into(),
                flags,
                backends: backends.into_iter().map(Into::into).collect(),
                ..Default::default()
            };
            let fe = &mut d.frontends;
            fe.insert(frontend(VIP, SERVICE_PORT, proto).into(), want(0, vec![be]));
            fe.insert(
                frontend(EMPTY_VIP, SERVICE_PORT, proto).into(),
                want(0, vec![]),
            );
            let np = frontend(Ipv4Addr::UNSPECIFIED, NODE_PORT, proto);
            fe.insert(np.into(), want(SVC_F_EXTERNAL, vec![be]));
            let be6 = Backend6 {
                addr: v6::BACKEND.octets(),
                port: TARGET_PORT.to_be_bytes(),
                proto,
                flags: 0,
            };
            let want6 = |flags, backends: Vec<Backend6>| FrontendWant {
                name: "fuzz/web6:http".into(),
                flags,
                backends: backends.into_iter().map(Into::into).collect(),
                ..Default::default()
            };
            let vip6 = frontend6(v6::VIP, SERVICE_PORT, proto);
            fe.insert(vip6.into(), want6(0, vec![be6]));
            let empty6 = frontend6(v6::EMPTY_VIP, SERVICE_PORT, proto);
            fe.insert(empty6.into(), want6(0, vec![]));
            let np6 = frontend6(std::net::Ipv6Addr::UNSPECIFIED, NODE_PORT, proto);
            fe.insert(np6.into(), want6(SVC_F_EXTERNAL, vec![be6]));
        }
        let r = syncer.sync(&d);
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        Some(Fixture {
            ct: dp.map(CT_MAP).unwrap(),
            rnat: dp.map(RNAT_MAP).unwrap(),
            frag: dp.map(FRAG_MAP).unwrap(),
            ct6: dp.map(CT6_MAP).unwrap(),
            rnat6: dp.map(RNAT6_MAP).unwrap(),
            frag6: dp.map(FRAG6_MAP).unwrap(),
            stats: dp.map(STATS_MAP).unwrap(),
            dp,
            _syncer: syncer,
            _ns: ns,
        })
    }

    /// Verdict and output, or why the kernel refused the frame.
    fn run(&self, prog: &str, frame: &[u8]) -> Result<(u32, Vec<u8>), String> {
        let mut out = vec![0u8; frame.len() + 256];
        let r = self
            .dp
            .program(prog)
            .unwrap()
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .map_err(|e| format!("{e:#}"))?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out))
    }

    fn counter(&self, c: Counter) -> u64 {
        self.stats.get(&(c as u32), 0).unwrap().iter().sum()
    }

    fn drops(&self) -> u64 {
        DROPS.iter().map(|c| self.counter(*c)).sum()
    }

    /// Entries in conntrack, reverse NAT and the fragment maps of both
    /// families; empties them.
    fn take_state_entries(&mut self) -> [usize; 3] {
        [
            take_all(&mut self.ct) + take_all(&mut self.ct6),
            take_all(&mut self.rnat) + take_all(&mut self.rnat6),
            take_all(&mut self.frag) + take_all(&mut self.frag6),
        ]
    }
}

/// Empties `map`; returns how many entries it had.
fn take_all<K: aya::Pod, V: aya::Pod>(map: &mut HashMap<MapData, K, V>) -> usize {
    let keys: Vec<K> = map.keys().flatten().collect();
    for k in &keys {
        let _ = map.remove(k);
    }
    keys.len()
}

/// What the runs saw.
#[derive(Default, Debug)]
struct Tally {
    frames: u64,
    /// Refused by BPF_PROG_TEST_RUN itself (too short to be run).
    refused: u64,
    /// Frames whose IP total length lies (longer than the frame, or
    /// shorter than its headers): never rewritten.
    length_lies: u64,
    /// Of those, IPv6 payload length lies.
    length_lies_v6: u64,
    /// IPv6 frames run, and rewritten.
    v6: u64,
    v6_rewritten: u64,
    pass: u64,
    shot: u64,
    redirect: u64,
    rewritten: u64,
    untouched_other: u64,
    /// In the current window: frames let through that may create state.
    window_flows: u64,
    window_first_fragments: u64,
}

fn is_first_fragment(frame: &[u8]) -> bool {
    v6::is_first_fragment(frame)
        || frame.len() >= 34 && frame[12..14] == [8, 0] && {
            let f = u16::from_be_bytes([frame[20], frame[21]]);
            f & 0x2000 != 0 && f & 0x1fff == 0
        }
}

fn is_ipv6(frame: &[u8]) -> bool {
    frame.get(12..14) == Some(&[0x86, 0xdd])
}

/// Checks one frame's result; returns a description of what is wrong.
fn check(
    frame: &[u8],
    aim: Aim,
    verdict: u32,
    out: &[u8],
    drops_before: u64,
    f: &Fixture,
    t: &mut Tally,
) -> Result<(), String> {
    t.frames += 1;
    t.v6 += is_ipv6(frame) as u64;
    match verdict {
        TC_ACT_OK => t.pass += 1,
        TC_ACT_REDIRECT => t.redirect += 1,
        TC_ACT_SHOT => {
            t.shot += 1;
            if f.drops() <= drops_before {
                return Err("dropped without a drop reason counted".into());
            }
            return Ok(());
        }
        v => return Err(format!("verdict {v}")),
    }
    if aim == Aim::Other && (frame[12..14] == [8, 0] || is_ipv6(frame)) {
        if verdict != TC_ACT_OK || out != frame {
            return Err("no service traffic, yet not passed byte-identical".into());
        }
        t.untouched_other += 1;
    }
    if lies_about_its_length(frame) {
        t.length_lies += 1;
        t.length_lies_v6 += is_ipv6(frame) as u64;
    }
    t.window_flows += 1;
    if is_first_fragment(frame) {
        t.window_first_fragments += 1;
    }
    if out == frame {
        return Ok(());
    }
    t.rewritten += 1;
    if is_ipv6(frame) {
        t.v6_rewritten += 1;
        return well_formed_v6(out, frame);
    }
    well_formed(out, frame)
}

/// A rewritten IPv6 frame: a payload length that covers its chain and L4
/// header and fits in the frame, and an L4 checksum still valid if it was.
fn well_formed_v6(out: &[u8], input: &[u8]) -> Result<(), String> {
    if v6::lies_about_its_length(out) {
        return Err("rewritten, and its IPv6 payload length does not match its content".into());
    }
    let p = pktgen::v6::parse6(out).ok_or("rewritten into something that is not IPv6")?;
    let was_ok = pktgen::v6::parse6(input).and_then(|p| p.l4_checksum_ok) == Some(true);
    if was_ok && p.l4_checksum_ok == Some(false) {
        return Err("a valid L4 checksum was broken".into());
    }
    Ok(())
}

/// A rewritten frame: IPv4 with a valid header checksum, a total length
/// that covers its header and its L4 header and fits in the frame (the
/// rest may be Ethernet padding), and an L4 checksum still valid if it
/// was.
fn well_formed(out: &[u8], input: &[u8]) -> Result<(), String> {
    if lies_about_its_length(out) {
        return Err("rewritten, and its IP total length does not match its content".into());
    }
    let p = pktgen::parse(out).ok_or("rewritten into something that is not IPv4")?;
    // Checksums are updated incrementally: one that was wrong stays wrong.
    if !p.ip_checksum_ok && ip_checksum_ok(input) {
        return Err("a valid IP checksum was broken".into());
    }
    let was_ok = pktgen::parse(input).and_then(|p| p.l4_checksum_ok) == Some(true);
    if was_ok && p.l4_checksum_ok == Some(false) {
        return Err("a valid L4 checksum was broken".into());
    }
    Ok(())
}

fn ip_checksum_ok(frame: &[u8]) -> bool {
    let ihl = (frame[14] & 0x0f) as usize * 4;
    ihl >= 20 && frame.len() >= 14 + ihl && pktgen::checksum(&frame[14..14 + ihl]) == 0
}

/// An IPv4 frame whose total length is longer than the frame, or shorter
/// than its own header plus (unless a later fragment) its L4 header.
fn lies_about_its_length(frame: &[u8]) -> bool {
    if is_ipv6(frame) {
        return v6::lies_about_its_length(frame);
    }
    if frame.len() < 34 || frame[12..14] != [8, 0] {
        return false;
    }
    let ip = &frame[14..];
    let ihl = (ip[0] & 0x0f) as usize * 4;
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let later_fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0;
    let l4_min = match ip[9] {
        _ if later_fragment => 0,
        6 => 20,
        17 | 1 => 8,
        _ => 0,
    };
    tot > ip.len() || tot < ihl.max(20) + l4_min
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn kernel_refuses(frame: &[u8]) -> bool {
    match frame.get(12..14) {
        None | Some([]) => true,
        Some([0x08, 0x00]) => frame.len() < 34,
        Some([0x86, 0xdd]) => frame.len() < 54,
        _ => frame.len() <= 14,
    }
}

/// Runs `frame` through `prog` and checks it; panics with the frame.
fn one(f: &Fixture, prog: &str, frame: &[u8], aim: Aim, t: &mut Tally) {
    let before = f.drops();
    let (verdict, out) = match f.run(prog, frame) {
        Ok(r) => r,
        // The kernel's test run wants more than an Ethernet header, and a
        // whole IP header after an IP ethertype.
        Err(_) if kernel_refuses(frame) => {
            t.refused += 1;
            return;
        }
        Err(e) => panic!(
            "test run refused a {}-byte frame: {e}\n in {}",
            frame.len(),
            hex(frame)
        ),
    };
    if let Err(e) = check(frame, aim, verdict, &out, before, f, t) {
        panic!(
            "{prog}, {aim:?}: {e}\n verdict {verdict}\n in  {}\n out {}",
            hex(frame),
            hex(&out)
        );
    }
}

/// The end of a window: state entries only from frames let through.
fn close_window(f: &mut Fixture, t: &mut Tally) {
    let [ct, rnat, frag] = f.take_state_entries();
    let flows = t.window_flows as usize;
    assert!(
        ct <= flows,
        "{ct} conntrack entries from {flows} frames let through"
    );
    assert!(
        rnat <= flows,
        "{rnat} reverse NAT entries from {flows} frames let through"
    );
    let firsts = t.window_first_fragments as usize;
    assert!(
        frag <= firsts,
        "{frag} fragment entries from {firsts} first fragments let through"
    );
    t.window_flows = 0;
    t.window_first_fragments = 0;
}

fn seed() -> u64 {
    let soak = std::env::var_os("KEP_SOAK").is_some_and(|v| v != "0");
    let seed = match std::env::var("KEP_SEED") {
        Ok(s) => s.parse().expect("KEP_SEED is a number"),
        Err(_) if soak => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
        Err(_) => 0x6b65_7033,
    };
    eprintln!("seed {seed} (KEP_SEED={seed} replays it)");
    seed
}

fn frames_to_run() -> u64 {
    if std::env::var_os("KEP_SOAK").is_some_and(|v| v != "0") {
        3_000_000
    } else {
        150_000
    }
}

#[test]
fn mutated_frames_get_a_sane_verdict_and_leave_no_state_when_dropped() {
    let Some(mut f) = Fixture::new("datapath_fuzz") else {
        return;
    };
    let started = Instant::now();
    let mut rng = Rng(seed());
    let mut t = Tally::default();
    let total = frames_to_run();
    while t.frames < total {
        let (frame, aim) = frame(&mut rng);
        let prog = if rng.chance(1, 2) {
            PROG_INGRESS
        } else {
            PROG_EGRESS
        };
        one(&f, prog, &frame, aim, &mut t);
        if t.frames.is_multiple_of(2000) {
            close_window(&mut f, &mut t);
        }
    }
    close_window(&mut f, &mut t);
    eprintln!(
        "{} frames ({} IPv6) in {:.1} s: {} passed ({} not service traffic, byte-identical), \
         {} redirected, {} dropped, {} rewritten ({} IPv6); {} with a lying IP total or \
         payload length ({} IPv6), none rewritten",
        t.frames,
        t.v6,
        started.elapsed().as_secs_f64(),
        t.pass,
        t.untouched_other,
        t.redirect,
        t.shot,
        t.rewritten,
        t.v6_rewritten,
        t.length_lies,
        t.length_lies_v6,
    );
    assert!(
        t.shot > 0 && t.redirect > 0 && t.untouched_other > 0 && t.length_lies > 0,
        "{t:?}"
    );
    assert!(t.v6_rewritten > 0 && t.length_lies_v6 > 0, "{t:?}");
}

/// Valid packets of every kind, truncated at every offset, through both
/// programs.
#[test]
fn frames_truncated_at_every_offset_get_a_sane_verdict() {
    let Some(mut f) = Fixture::new("datapath_truncated") else {
        return;
    };
    let mut rng = Rng(seed() ^ 1);
    let mut t = Tally::default();
    let aims = [
        Aim::ClusterIp,
        Aim::EmptyClusterIp,
        Aim::NodePort,
        Aim::BackendReply,
        Aim::IcmpError,
        Aim::Other,
    ];
    for round in 0..60 {
        let aim = aims[round % aims.len()];
        let full = match aim {
            _ if round >= 40 => v6::valid_frame(&mut rng, aim),
            Aim::IcmpError => icmp_error(&mut rng),
            _ => base(&mut rng, aim),
        };
        for len in 0..=full.len() {
            for prog in [PROG_INGRESS, PROG_EGRESS] {
                one(&f, prog, &full[..len], aim, &mut t);
            }
        }
        close_window(&mut f, &mut t);
    }
    eprintln!("{t:?}");
}

/// Regression (found by the fuzzer): a SYN to a ClusterIP whose IP total
/// length lies was translated and forwarded with the lie. Longer than the
/// frame: passed untouched, for the kernel to drop. Too short for the TCP
/// header: dropped as malformed (passed, it would be routed on towards the
/// default gateway). The honest frame is still translated.
#[test]
fn a_lying_ip_total_length_is_never_translated() {
    let Some(f) = Fixture::new("datapath_length_lies") else {
        return;
    };
    let client = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 2), 40000);
    let honest = Pkt::tcp(
        client,
        SocketAddrV4::new(VIP, SERVICE_PORT),
        pktgen::TCP_SYN,
    )
    .build();
    let with_total_length = |tot: usize| {
        let mut frame = honest.clone();
        frame[16..18].copy_from_slice(&(tot as u16).to_be_bytes());
        ip_checksum(&mut frame[14..]);
        frame
    };
    let ip_len = honest.len() - 14;
    for prog in [PROG_INGRESS, PROG_EGRESS] {
        let (verdict, _) = f.run(prog, &honest).unwrap();
        assert_eq!(
            verdict, TC_ACT_REDIRECT,
            "{prog}: the honest SYN is translated"
        );
        let longer = with_total_length(ip_len + 10);
        let (verdict, out) = f.run(prog, &longer).unwrap();
        assert_eq!(
            (verdict, &out),
            (TC_ACT_OK, &longer),
            "{prog}: longer than the frame"
        );

        let malformed = f.counter(Counter::DropMalformed);
        let (verdict, _) = f.run(prog, &with_total_length(20 + 10)).unwrap();
        assert_eq!(verdict, TC_ACT_SHOT, "{prog}: too short for its TCP header");
        assert_eq!(f.counter(Counter::DropMalformed), malformed + 1);
    }
}
