//! IPv6 datapath unit tests: IPv6 frames built in Rust go through the real
//! TC programs with BPF_PROG_TEST_RUN, and the tests check addresses,
//! ports, checksums and verdicts of the output.
//!
//! The IPv6 maps are filled directly here (the syncer's IPv6 side is tested
//! with it), in the layout proxy_common::v6 documents. Each test runs in a
//! network namespace of its own (testkit::testns) with, in addition:
//!   d0 fd00:244:2::1/64 (no DAD), forwarding on, a permanent neighbour
//!   entry for fd00:244:2::11 (BACKEND_MAC) and none for fd00:244:2::12.

mod privileged;
use privileged::privileged;
use std::{
    net::{Ipv6Addr, SocketAddrV6},
    process::Command,
};

use aya::maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key};
use aya::programs::{TestRun, TestRunOptions};
use proxy_common::*;
use proxy_userspace::{
    datapath::{Datapath, filters::ProbeFilters},
    testkit::{
        pktgen::{
            TCP, TCP_ACK, TCP_SYN, UDP,
            v6::{
                DEST_OPTS, HOP_BY_HOP, ICMPV6, Parsed6, Pkt6, ext, fragment, icmp6, parse6, routing,
            },
        },
        testns::{BACKEND_MAC, NetNsGuard},
    },
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const VIP: &str = "[fd00:96::10]:80";
const CLIENT: &str = "[fd00:244:1::5]:40000";
/// A backend with a neighbour entry (the FIB lookup succeeds).
const BE_A: &str = "[fd00:244:2::11]:8080";
/// A backend without one.
const BE_B: &str = "[fd00:244:2::12]:8080";
const NODE_IP: &str = "fd00:c0a8::b";
const OUTSIDE: &str = "[2001:db8:1::7]:5555";
const NODEPORT: u16 = 30080;

fn sa(s: &str) -> SocketAddrV6 {
    s.parse().unwrap()
}

fn ip6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

/// Runs `ip` (or sysctl) in the test thread's network namespace.
fn run(cmd: &str, args: &str) {
    let out = Command::new(cmd).args(args.split(' ')).output().unwrap();
    assert!(out.status.success(), "{cmd} {args}: {out:?}");
}

struct Fixture {
    dp: Datapath,
    svc: HashMap<MapData, SvcKey6, SvcValue>,
    slots: HashMap<MapData, SlotKey, SlotValue>,
    backends: HashMap<MapData, BackendKey, Backend6>,
    addrs: HashMap<MapData, AddrKey6, AddrValue>,
    members: HashMap<MapData, AffMemberKey, u8>,
    ranges: LpmTrie<MapData, SrcRangeKey6, u8>,
    ct: HashMap<MapData, FlowKey6, NatEntry6>,
    aff: HashMap<MapData, AffKey6, AffValue>,
    stats: PerCpuArray<MapData, u64>,
    _config: Array<MapData, Config6>,
    /// Written as the daemon's map writer does: a bit before each address
    /// and backend.
    filters: ProbeFilters,
    next_svc_id: u32,
    // Last: the namespace goes after the maps and programs.
    _ns: NetNsGuard,
}

/// A frontend to program: its backends, flags and local count.
struct Frontend<'a> {
    addr: &'a str,
    proto: u8,
    backends: &'a [(&'a str, bool)],
    flags: u16,
    /// ETP Local: how many of the backends (the last ones) are local.
    local: u16,
    affinity_timeout: u32,
}

impl<'a> Frontend<'a> {
    fn new(addr: &'a str, proto: u8, backends: &'a [(&'a str, bool)]) -> Frontend<'a> {
        Frontend {
            addr,
            proto,
            backends,
            flags: 0,
            local: 0,
            affinity_timeout: 0,
        }
    }
}

impl Fixture {
    fn new(test: &str) -> Option<Fixture> {
        if !privileged(test) {
            return None;
        }
        let ns = NetNsGuard::new().expect("test namespace");
        run("ip", "-6 addr add fd00:244:2::1/64 dev d0 nodad");
        run(
            "ip",
            "-6 neigh add fd00:244:2::11 lladdr 02:00:00:00:02:0b dev d0 nud permanent",
        );
        run("sysctl", "-qw net.ipv6.conf.all.forwarding=1");
        let mut dp = Datapath::load_private(false).expect("load datapath");
        let mut config: Array<MapData, Config6> = dp.map(CONFIG6_MAP).unwrap();
        config
            .set(
                0,
                Config6 {
                    hairpin_addr: HAIRPIN_ADDR6,
                    ..Default::default()
                },
                0,
            )
            .unwrap();
        let mut f = Fixture {
            svc: dp.map(SVC6_MAP).unwrap(),
            slots: dp.map(SLOT_MAP).unwrap(),
            backends: dp.map(BACKEND6_MAP).unwrap(),
            addrs: dp.map(ADDR6_MAP).unwrap(),
            members: dp.map(AFFMEM_MAP).unwrap(),
            ranges: dp.map(SRCRNG6_MAP).unwrap(),
            ct: dp.map(CT6_MAP).unwrap(),
            aff: dp.map(AFF6_MAP).unwrap(),
            stats: dp.map(STATS_MAP).unwrap(),
            _config: config,
            filters: dp.take_filters().unwrap(),
            dp,
            next_svc_id: 1,
            _ns: ns,
        };
        f.class(ip6(NODE_IP), ADDR_NODEPORT | ADDR_HOST);
        f.class(ip6("fd00:244:2::1"), ADDR_HOST);
        Some(f)
    }

    fn class(&mut self, addr: Ipv6Addr, class: u8) {
        let key = AddrKey6 {
            addr: addr.octets(),
        };
        self.filters.add_addr(addr.into()).unwrap();
        self.addrs
            .insert(
                key,
                AddrValue {
                    class,
                    _pad: [0; 3],
                },
                0,
            )
            .unwrap();
    }

    /// Programs a frontend; returns its service port id.
    fn frontend(&mut self, fe: Frontend) -> u32 {
        let svc_id = self.next_svc_id;
        self.next_svc_id += 1;
        for (i, (addr, local)) in fe.backends.iter().enumerate() {
            let backend_id = svc_id * 100 + i as u32;
            let be = sa(addr);
            let port = be.port().to_be_bytes();
            self.filters.add_endpoint((*be.ip()).into(), port).unwrap();
            self.backends
                .insert(
                    BackendKey { backend_id },
                    Backend6 {
                        addr: be.ip().octets(),
                        port: be.port().to_be_bytes(),
                        proto: fe.proto,
                        flags: if *local { BE_F_LOCAL } else { 0 },
                    },
                    0,
                )
                .unwrap();
            let slot = SlotKey {
                svc_id,
                generation: 1,
                slot: i as u16,
            };
            self.slots
                .insert(slot, SlotValue { backend_id }, 0)
                .unwrap();
            self.members
                .insert(AffMemberKey { svc_id, backend_id }, 1, 0)
                .unwrap();
        }
        let n = fe.backends.len() as u16;
        let addr = sa(fe.addr);
        self.svc
            .insert(
                SvcKey6 {
                    addr: addr.ip().octets(),
                    port: addr.port().to_be_bytes(),
                    proto: fe.proto,
                    _pad: 0,
                },
                SvcValue {
                    svc_id,
                    generation: 1,
                    count: n - fe.local,
                    local_count: fe.local,
                    flags: fe.flags,
                    affinity_timeout: fe.affinity_timeout,
                },
                0,
            )
            .unwrap();
        if !addr.ip().is_unspecified() {
            self.class(*addr.ip(), ADDR_CLUSTER_IP);
        }
        svc_id
    }

    /// The standard ClusterIP VIP (TCP and UDP) with `backends`.
    fn cluster_ip(&mut self, backends: &[(&str, bool)]) {
        self.frontend(Frontend::new(VIP, TCP, backends));
        self.frontend(Frontend::new(VIP, UDP, backends));
    }

    fn run(&self, prog: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        self.try_run(prog, frame).expect("BPF_PROG_TEST_RUN")
    }

    /// Verdict and output, or why the kernel refused the frame.
    fn try_run(&self, prog: &str, frame: &[u8]) -> Result<(u32, Vec<u8>), String> {
        let prog = self.dp.program(prog).unwrap();
        let mut out = vec![0u8; 2048];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .map_err(|e| format!("{e:#}"))?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out))
    }

    fn ingress(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run(PROG_INGRESS, frame)
    }

    fn counter(&self, c: Counter) -> u64 {
        self.stats.get(&(c as u32), 0).unwrap().iter().sum()
    }

    fn flows(&self) -> usize {
        self.ct.keys().count()
    }
}

/// The output parsed, with a valid L4 checksum.
fn valid(out: &[u8]) -> Parsed6 {
    let p = parse6(out).expect("output is an IPv6 packet");
    assert_ne!(p.l4_checksum_ok, Some(false), "L4 checksum broken: {p:?}");
    p
}

fn endpoint(p: &Parsed6, src: bool) -> SocketAddrV6 {
    if src {
        SocketAddrV6::new(p.src, p.sport.unwrap(), 0, 0)
    } else {
        SocketAddrV6::new(p.dst, p.dport.unwrap(), 0, 0)
    }
}

#[test]
fn clusterip_is_dnated_and_replies_are_reverse_translated() {
    let Some(mut f) = Fixture::new("clusterip_is_dnated_and_replies_are_reverse_translated") else {
        return;
    };
    f.cluster_ip(&[(BE_A, false)]);
    for proto in [TCP, UDP] {
        let first = match proto {
            TCP => Pkt6::tcp(sa(CLIENT), sa(VIP), TCP_SYN),
            _ => Pkt6::udp(sa(CLIENT), sa(VIP), b"hello"),
        };
        let (verdict, out) = f.ingress(&first.build());
        assert_eq!(verdict, TC_ACT_REDIRECT, "to the backend's device");
        let p = valid(&out);
        assert_eq!(p.proto, proto);
        assert_eq!(endpoint(&p, false), sa(BE_A));
        assert_eq!(
            endpoint(&p, true),
            sa(CLIENT),
            "the client keeps its address"
        );
        assert_eq!(out[..6], BACKEND_MAC, "the FIB's next hop");

        let reply = match proto {
            TCP => Pkt6::tcp(sa(BE_A), sa(CLIENT), TCP_SYN | TCP_ACK),
            _ => Pkt6::udp(sa(BE_A), sa(CLIENT), b"world"),
        };
        let (_, out) = f.ingress(&reply.build());
        let p = valid(&out);
        assert_eq!(
            endpoint(&p, true),
            sa(VIP),
            "the reply comes from the service"
        );
        assert_eq!(endpoint(&p, false), sa(CLIENT));
    }
    assert_eq!(f.counter(Counter::NewFlow), 2);
    assert_eq!(f.counter(Counter::Reply), 2);
}

#[test]
fn nodeport_to_a_remote_backend_is_snated_and_replies_return() {
    let Some(mut f) = Fixture::new("nodeport_to_a_remote_backend_is_snated_and_replies_return")
    else {
        return;
    };
    let np = format!("[::]:{NODEPORT}");
    let mut fe = Frontend::new(&np, TCP, &[(BE_A, false)]);
    fe.flags = SVC_F_EXTERNAL;
    f.frontend(fe);
    let node = SocketAddrV6::new(ip6(NODE_IP), NODEPORT, 0, 0);
    let (verdict, out) = f.ingress(&Pkt6::tcp(sa(OUTSIDE), node, TCP_SYN).build());
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let p = valid(&out);
    assert_eq!(endpoint(&p, false), sa(BE_A));
    assert_eq!(
        p.src,
        ip6("fd00:244:2::1"),
        "SNAT to the node's address towards the backend"
    );
    let snat_port = p.sport.unwrap();
    assert!(
        snat_port >= SNAT_PORT_MIN,
        "SNAT port {snat_port} out of range"
    );

    let reply = Pkt6::tcp(sa(BE_A), endpoint(&p, true), TCP_SYN | TCP_ACK);
    let (_, out) = f.ingress(&reply.build());
    let r = valid(&out);
    assert_eq!(endpoint(&r, true), node, "from the NodePort");
    assert_eq!(endpoint(&r, false), sa(OUTSIDE), "back to the client");
}

#[test]
fn no_endpoint_and_unknown_port_answer_icmpv6_port_unreachable() {
    let Some(mut f) = Fixture::new("no_endpoint_and_unknown_port_answer_icmpv6_port_unreachable")
    else {
        return;
    };
    f.frontend(Frontend::new(VIP, TCP, &[]));
    let unknown = SocketAddrV6::new(*sa(VIP).ip(), 81, 0, 0);
    for (dst, proto, reason) in [
        (sa(VIP), TCP, Counter::DropNoEndpoint),
        (unknown, UDP, Counter::DropUnknownPort),
    ] {
        let syn = match proto {
            TCP => Pkt6::tcp(sa(CLIENT), dst, TCP_SYN),
            _ => Pkt6::udp(sa(CLIENT), dst, b"x"),
        }
        .with_ext(vec![ext(DEST_OPTS, 0)]);
        let frame = syn.build();
        let (verdict, out) = f.ingress(&frame);
        assert_eq!(verdict, TC_ACT_REDIRECT, "sent back at once");
        let p = valid(&out);
        assert_eq!(p.proto, ICMPV6);
        assert_eq!(
            p.l4_checksum_ok,
            Some(true),
            "ICMPv6 checksum with pseudo-header"
        );
        assert_eq!((p.l4[0], p.l4[1]), (1, 4), "destination unreachable, port");
        assert_eq!(p.src, *dst.ip(), "from the address the client dialed");
        assert_eq!(p.dst, *sa(CLIENT).ip());
        assert_eq!(out[..6], frame[6..12], "back to the sender's MAC");
        let quoted = &p.l4[8..];
        assert_eq!(quoted, &frame[14..14 + quoted.len()], "quotes the packet");
        assert!(
            quoted.len() >= 40 + 8 + 8,
            "IPv6 header, extension, L4 header"
        );
        assert_eq!(f.counter(reason), 1, "{reason:?}");
    }
    assert_eq!(f.flows(), 0);
}

#[test]
fn extension_header_chains_are_walked_or_passed_untouched() {
    let Some(mut f) = Fixture::new("extension_header_chains_are_walked_or_passed_untouched") else {
        return;
    };
    f.cluster_ip(&[(BE_A, false)]);
    let syn = |port: u16| {
        let client = SocketAddrV6::new(*sa(CLIENT).ip(), port, 0, 0);
        Pkt6::tcp(client, sa(VIP), TCP_SYN)
    };
    // Understood chains: translated, the chain kept.
    let chains = [
        vec![ext(HOP_BY_HOP, 0)],
        vec![ext(HOP_BY_HOP, 0), ext(DEST_OPTS, 2), routing(0)],
        vec![ext(DEST_OPTS, 0), fragment(0, false, 7)],
    ];
    for (i, chain) in chains.into_iter().enumerate() {
        let kinds: Vec<u8> = chain.iter().map(|(k, _)| *k).collect();
        let (verdict, out) = f.ingress(&syn(41000 + i as u16).with_ext(chain).build());
        assert_eq!(verdict, TC_ACT_REDIRECT, "chain {kinds:?}");
        let p = valid(&out);
        assert_eq!(p.ext, kinds);
        assert_eq!(endpoint(&p, false), sa(BE_A), "chain {kinds:?}");
    }
    // Not understood, or not for this hop: passed as they are.
    let passed = [
        vec![routing(1)],
        vec![(253, ext(DEST_OPTS, 0).1)],
        vec![ext(DEST_OPTS, 0); 7],
    ];
    for (i, chain) in passed.into_iter().enumerate() {
        let frame = syn(42000 + i as u16).with_ext(chain).build();
        let (verdict, out) = f.ingress(&frame);
        assert_eq!(
            (verdict, &out),
            (TC_ACT_OK, &frame),
            "chain {i} passed untouched"
        );
    }
    assert_eq!(f.flows(), 3);
}

#[test]
fn truncated_headers_at_every_offset_are_never_translated() {
    let Some(mut f) = Fixture::new("truncated_headers_at_every_offset_are_never_translated") else {
        return;
    };
    f.cluster_ip(&[(BE_A, false)]);
    let frames = [
        Pkt6::tcp(sa(CLIENT), sa(VIP), TCP_SYN)
            .with_ext(vec![ext(HOP_BY_HOP, 1), fragment(0, true, 9)])
            .build(),
        Pkt6::udp(sa(CLIENT), sa(VIP), b"")
            .with_ext(vec![ext(DEST_OPTS, 0)])
            .build(),
    ];
    for frame in frames {
        for len in 14..frame.len() {
            let cut = &frame[..len];
            let (verdict, out) = match f.try_run(PROG_INGRESS, cut) {
                Ok(r) => r,
                // The kernel itself refuses IPv6 frames shorter than the
                // fixed header.
                Err(_) if len < 14 + 40 => continue,
                Err(e) => panic!("length {len}: {e}"),
            };
            assert!(
                verdict == TC_ACT_OK || verdict == TC_ACT_SHOT,
                "length {len}: verdict {verdict}"
            );
            if verdict == TC_ACT_OK {
                assert_eq!(out, cut, "length {len}: changed");
            }
        }
        let (verdict, _) = f.ingress(&frame);
        assert_eq!(verdict, TC_ACT_REDIRECT, "the whole frame is translated");
    }
    assert_eq!(f.flows(), 2, "only the whole frames opened flows");
}

/// `frame` with its IPv6 payload length set to `len`.
fn with_payload_len(frame: &[u8], len: u16) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[14 + 4..14 + 6].copy_from_slice(&len.to_be_bytes());
    f
}

#[test]
fn payload_length_lies_are_passed_or_dropped_never_translated() {
    let Some(mut f) = Fixture::new("payload_length_lies_are_passed_or_dropped_never_translated")
    else {
        return;
    };
    f.cluster_ip(&[(BE_A, false)]);
    let syn = Pkt6::tcp(sa(CLIENT), sa(VIP), TCP_SYN)
        .with_ext(vec![ext(DEST_OPTS, 0)])
        .build();
    let udp = Pkt6::udp(sa(CLIENT), sa(VIP), b"hi").build();
    let payload = |frame: &[u8]| (frame.len() - 14 - 40) as u16;

    // Longer than the frame, or ending inside the extension chain: the
    // kernel drops those itself; passed untouched.
    for frame in [
        with_payload_len(&syn, payload(&syn) + 1),
        with_payload_len(&syn, u16::MAX),
        with_payload_len(&syn, 4),
    ] {
        let (verdict, out) = f.ingress(&frame);
        assert_eq!((verdict, &out), (TC_ACT_OK, &frame), "passed untouched");
    }
    // Ending inside the L4 header, though the frame holds all of it:
    // malformed service traffic.
    let cut = [
        with_payload_len(&syn, 8 + 19),
        with_payload_len(&syn, 8),
        with_payload_len(&udp, 7),
        // No jumbogram on a frame this short: the payload is empty.
        with_payload_len(&udp, 0),
    ];
    for frame in &cut {
        let (verdict, _) = f.ingress(frame);
        assert_eq!(verdict, TC_ACT_SHOT);
    }
    assert_eq!(f.counter(Counter::DropMalformed), cut.len() as u64);
    assert_eq!(f.flows(), 0, "no flow from a lie");

    // Shorter than the frame but covering the headers: the rest is
    // padding, and the packet is translated.
    let mut padded = udp.clone();
    padded.extend_from_slice(&[0u8; 6]);
    let (verdict, out) = f.ingress(&padded);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(&out[14 + 40 + 2..14 + 40 + 4], &8080u16.to_be_bytes());
    let (verdict, to_backend) = f.ingress(&syn);
    assert_eq!(verdict, TC_ACT_REDIRECT);

    // An ICMPv6 error whose payload length ends inside the quote, though
    // the frame holds a whole one: not taken for a quote.
    let client = *sa(CLIENT).ip();
    let quoted = [&to_backend[14..14 + 40], &to_backend[14 + 48..14 + 56]].concat();
    let mut quoted = quoted;
    quoted[6] = TCP; // without its destination options
    let ptb = icmp6(*sa(BE_A).ip(), client, 2, 0, 1280, &quoted);
    let short = with_payload_len(&ptb, payload(&ptb) - 1);
    let (verdict, out) = f.ingress(&short);
    assert_eq!((verdict, &out), (TC_ACT_OK, &short), "passed untouched");
    assert_eq!(f.counter(Counter::IcmpError), 0);
    let (_, out) = f.ingress(&ptb);
    assert_eq!(
        valid(&out).src,
        *sa(VIP).ip(),
        "the whole quote is translated"
    );
    assert_eq!(f.counter(Counter::IcmpError), 1);
}

#[test]
fn fragments_follow_their_first_fragment() {
    let Some(mut f) = Fixture::new("fragments_follow_their_first_fragment") else {
        return;
    };
    f.cluster_ip(&[(BE_A, false)]);
    let pkt = Pkt6::udp(sa(CLIENT), sa(VIP), &[7u8; 64]);
    let l4 = pkt.l4();
    let first = pkt
        .clone()
        .with_ext(vec![fragment(0, true, 0xabcd)])
        .build_with_payload(&l4[..32]);
    let later = pkt
        .clone()
        .with_ext(vec![fragment(4, false, 0xabcd)])
        .build_with_payload(&l4[32..]);
    let (verdict, out) = f.ingress(&first);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let p = parse6(&out).unwrap();
    assert_eq!(endpoint(&p, false), sa(BE_A));
    let (verdict, out) = f.ingress(&later);
    assert_eq!(verdict, TC_ACT_REDIRECT, "follows the first fragment");
    let p = parse6(&out).unwrap();
    assert_eq!(p.dst, *sa(BE_A).ip());
    assert_eq!(
        p.l4,
        l4[32..],
        "no L4 header to rewrite in a later fragment"
    );

    let stray = pkt
        .with_ext(vec![fragment(4, false, 0x1111)])
        .build_with_payload(&l4[32..]);
    let (verdict, _) = f.ingress(&stray);
    assert_eq!(
        verdict, TC_ACT_SHOT,
        "a later fragment of an unknown datagram"
    );
    assert_eq!(f.counter(Counter::DropFragment), 1);
}

/// A frame as the backend received it, quoted in an ICMPv6 error.
fn quote(frame: &[u8], n: usize) -> Vec<u8> {
    frame[14..14 + n].to_vec()
}

#[test]
fn icmpv6_errors_about_a_flow_are_translated_back() {
    let Some(mut f) = Fixture::new("icmpv6_errors_about_a_flow_are_translated_back") else {
        return;
    };
    f.cluster_ip(&[(BE_A, false)]);
    let (_, to_backend) = f.ingress(&Pkt6::tcp(sa(CLIENT), sa(VIP), TCP_SYN).build());
    let client = *sa(CLIENT).ip();
    // Packet Too Big from the backend itself, quoting a long packet.
    let mut long = to_backend.clone();
    long.extend_from_slice(&[0u8; 100]);
    let ptb = icmp6(*sa(BE_A).ip(), client, 2, 0, 1280, &quote(&long, 148));
    let (verdict, out) = f.ingress(&ptb);
    assert_ne!(verdict, TC_ACT_SHOT);
    let p = valid(&out);
    assert_eq!(p.l4_checksum_ok, Some(true));
    assert_eq!(
        (p.l4[0], &p.l4[4..8]),
        (2, &1280u32.to_be_bytes()[..]),
        "PTB, MTU kept"
    );
    assert_eq!(p.src, *sa(VIP).ip(), "from the service address");
    assert_eq!(p.dst, client);
    let inner = &p.l4[8..];
    assert_eq!(
        &inner[24..40],
        &sa(VIP).ip().octets(),
        "quote shows the service"
    );
    assert_eq!(&inner[42..44], &80u16.to_be_bytes());
    // From a router on the way: the source stays the router's.
    let router = ip6("fd00:244:2::fe");
    let unreach = icmp6(router, client, 3, 0, 0, &quote(&to_backend, 48));
    let (_, out) = f.ingress(&unreach);
    let p = valid(&out);
    assert_eq!((p.src, p.dst), (router, client));
    assert_eq!(&p.l4[8 + 24..8 + 40], &sa(VIP).ip().octets());
    assert_eq!(f.counter(Counter::IcmpError), 2);

    // Quotes that are too short, or of flows we do not know: untouched.
    let short = icmp6(*sa(BE_A).ip(), client, 1, 4, 0, &quote(&to_backend, 44));
    let mut foreign_flow = to_backend.clone();
    foreign_flow[14 + 40 + 1] ^= 1; // another source port
    let foreign = icmp6(*sa(BE_A).ip(), client, 1, 4, 0, &quote(&foreign_flow, 48));
    for frame in [short, foreign] {
        let (verdict, out) = f.ingress(&frame);
        assert_eq!((verdict, out), (TC_ACT_OK, frame));
    }
    assert_eq!(f.counter(Counter::IcmpError), 2);
}

/// Regression (found by the lab's path MTU test): the node's own stack
/// answers a translated packet too large for the next link with Packet Too
/// Big, which leaves towards the client through the egress program; it was
/// passed with its quote showing the backend, which the client's socket
/// ignores (path MTU discovery stalled).
#[test]
fn packet_too_big_sent_by_the_node_is_translated_on_egress() {
    let Some(mut f) = Fixture::new("packet_too_big_sent_by_the_node_is_translated_on_egress")
    else {
        return;
    };
    f.cluster_ip(&[(BE_A, false)]);
    let (_, to_backend) = f.ingress(&Pkt6::tcp(sa(CLIENT), sa(VIP), TCP_SYN).build());
    let node = ip6("fd00:244:2::1");
    let client = *sa(CLIENT).ip();
    let ptb = icmp6(node, client, 2, 0, 1280, &quote(&to_backend, 48));
    let (verdict, out) = f.run(PROG_EGRESS, &ptb);
    assert_eq!(verdict, TC_ACT_OK, "on its way out already");
    let p = valid(&out);
    assert_eq!((p.src, p.dst), (node, client), "the node's own error");
    let inner = &p.l4[8..];
    assert_eq!(
        &inner[24..40],
        &sa(VIP).ip().octets(),
        "quote shows the service"
    );
    assert_eq!(&inner[42..44], &80u16.to_be_bytes());
    assert_eq!(f.counter(Counter::IcmpError), 1);
}

#[test]
fn neighbour_discovery_and_router_traffic_pass_untouched() {
    let Some(mut f) = Fixture::new("neighbour_discovery_and_router_traffic_pass_untouched") else {
        return;
    };
    f.cluster_ip(&[(BE_A, false)]);
    let vip = *sa(VIP).ip();
    let solicited = ip6("ff02::1:ff00:10");
    let mut ns_body = vec![0u8; 4];
    ns_body.extend_from_slice(&vip.octets());
    let frames = [
        // Neighbour solicitation for the ClusterIP, advertisement, router
        // solicitation and advertisement, echo to the ClusterIP.
        icmp6(ip6("fe80::1"), solicited, 135, 0, 0, &vip.octets()),
        icmp6(
            ip6("fe80::2"),
            ip6("fe80::1"),
            136,
            0,
            0x6000_0000,
            &vip.octets(),
        ),
        icmp6(ip6("fe80::1"), ip6("ff02::2"), 133, 0, 0, &[]),
        icmp6(ip6("fe80::2"), ip6("ff02::1"), 134, 0, 0x4000_0708, &[0; 8]),
        icmp6(*sa(CLIENT).ip(), vip, 128, 0, 1, b"ping"),
    ];
    for frame in frames {
        for prog in [PROG_INGRESS, PROG_EGRESS] {
            let (verdict, out) = f.run(prog, &frame);
            assert_eq!(
                (verdict, &out),
                (TC_ACT_OK, &frame),
                "{prog}: type {}",
                frame[54]
            );
        }
    }
}

#[test]
fn session_affinity_keeps_a_client_on_its_backend() {
    let Some(mut f) = Fixture::new("session_affinity_keeps_a_client_on_its_backend") else {
        return;
    };
    let backends = [(BE_A, false), (BE_B, false)];
    let mut fe = Frontend::new(VIP, TCP, &backends);
    fe.flags = SVC_F_AFFINITY;
    fe.affinity_timeout = 10_800;
    let svc_id = f.frontend(fe);
    let mut seen = std::collections::BTreeSet::new();
    for port in 0..20 {
        let client = SocketAddrV6::new(*sa(CLIENT).ip(), 40000 + port, 0, 0);
        let (_, out) = f.ingress(&Pkt6::tcp(client, sa(VIP), TCP_SYN).build());
        seen.insert(endpoint(&valid(&out), false));
    }
    assert_eq!(seen.len(), 1, "one backend for every flow: {seen:?}");
    let key = AffKey6 {
        svc_id,
        client: sa(CLIENT).ip().octets(),
    };
    assert!(
        f.aff.get(&key, 0).is_ok(),
        "the client's backend is remembered"
    );
}

#[test]
fn external_traffic_policy_local_drops_without_local_endpoint() {
    let Some(mut f) = Fixture::new("external_traffic_policy_local_drops_without_local_endpoint")
    else {
        return;
    };
    let np = format!("[::]:{NODEPORT}");
    let mut fe = Frontend::new(&np, TCP, &[(BE_A, false)]);
    fe.flags = SVC_F_EXTERNAL | SVC_F_ETP_LOCAL;
    f.frontend(fe);
    let node = SocketAddrV6::new(ip6(NODE_IP), NODEPORT, 0, 0);
    let (verdict, _) = f.ingress(&Pkt6::tcp(sa(OUTSIDE), node, TCP_SYN).build());
    assert_eq!(verdict, TC_ACT_SHOT, "dropped, not rejected");
    assert_eq!(f.counter(Counter::DropNoLocalEndpoint), 1);
    assert_eq!(f.flows(), 0);
}

#[test]
fn load_balancer_source_ranges_drop_other_sources() {
    let Some(mut f) = Fixture::new("load_balancer_source_ranges_drop_other_sources") else {
        return;
    };
    let lb = "[2001:db8:ff::1]:443";
    let mut fe = Frontend::new(lb, TCP, &[(BE_A, false)]);
    fe.flags = SVC_F_EXTERNAL | SVC_F_SRC_RANGES;
    let svc_id = f.frontend(fe);
    f.class(*sa(lb).ip(), ADDR_EXTERNAL);
    let range = SrcRangeKey6 {
        svc_id: svc_id.to_be_bytes(),
        addr: ip6("2001:db8:1::").octets(),
    };
    f.ranges
        .insert(&Key::new(SrcRangeKey6::prefix_len(48), range), 1, 0)
        .unwrap();
    let (verdict, out) = f.ingress(&Pkt6::tcp(sa(OUTSIDE), sa(lb), TCP_SYN).build());
    assert_eq!(verdict, TC_ACT_REDIRECT, "inside the range");
    assert_eq!(endpoint(&valid(&out), false), sa(BE_A));
    let stranger = sa("[2001:db8:2::7]:5555");
    let (verdict, _) = f.ingress(&Pkt6::tcp(stranger, sa(lb), TCP_SYN).build());
    assert_eq!(verdict, TC_ACT_SHOT, "outside the range");
    assert_eq!(f.counter(Counter::DropSourceRange), 1);
}

#[test]
fn hostnetwork_backends_and_node_processes_use_the_egress_hook() {
    let Some(mut f) = Fixture::new("hostnetwork_backends_and_node_processes_use_the_egress_hook")
    else {
        return;
    };
    // The backend is a process of this node, on its own address.
    let node_be = "[fd00:244:2::1]:10250";
    f.frontend(Frontend::new(VIP, TCP, &[(node_be, true)]));
    let (_, out) = f.ingress(&Pkt6::tcp(sa(CLIENT), sa(VIP), TCP_SYN).build());
    assert_eq!(endpoint(&valid(&out), false), sa(node_be));
    // Its reply leaves through the egress hook and must show the service.
    let reply = Pkt6::tcp(sa(node_be), sa(CLIENT), TCP_SYN | TCP_ACK).build();
    let (verdict, out) = f.run(PROG_EGRESS, &reply);
    assert_eq!(verdict, TC_ACT_OK, "routed for the client already");
    let p = valid(&out);
    assert_eq!(endpoint(&p, true), sa(VIP));
    assert_eq!(endpoint(&p, false), sa(CLIENT));

    // A node process dialing the ClusterIP is translated on egress; a pod's
    // packet seen on egress (it was handled on ingress) is not.
    let node_client = sa("[fd00:244:2::1]:45000");
    let (_, out) = f.run(
        PROG_EGRESS,
        &Pkt6::tcp(node_client, sa(VIP), TCP_SYN).build(),
    );
    assert_eq!(endpoint(&valid(&out), false), sa(node_be));
    let pod = Pkt6::tcp(
        sa("[fd00:244:1::9]:45000"),
        sa("[fd00:244:2::11]:80"),
        TCP_SYN,
    )
    .build();
    let (verdict, out) = f.run(PROG_EGRESS, &pod);
    assert_eq!((verdict, out), (TC_ACT_OK, pod));
}

/// A small deterministic generator (no dependency, reproducible runs).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % n.max(1)
    }
}

/// Random chains of extension headers, some spoiled in their next-header
/// or length bytes, some truncated: every verdict is a sane one, and a
/// packet the datapath changed is still a valid one (its L4 checksum right
/// where a correct parser finds the L4 header).
#[test]
fn random_extension_chains_get_sane_verdicts_and_valid_outputs() {
    let Some(mut f) = Fixture::new("random_extension_chains_get_sane_verdicts_and_valid_outputs")
    else {
        return;
    };
    f.cluster_ip(&[(BE_A, false)]);
    let mut rng = Rng(0x6b6570);
    let kinds = [HOP_BY_HOP, DEST_OPTS, 253];
    let (mut changed, mut unchecked) = (0, 0);
    for n in 0..3000 {
        let mut chain = Vec::new();
        for _ in 0..rng.below(5) {
            chain.push(match rng.below(5) {
                0 => routing(rng.below(2) as u8),
                1 => fragment(0, false, n),
                _ => ext(kinds[rng.below(kinds.len())], rng.below(3) as u8),
            });
        }
        let client = SocketAddrV6::new(*sa(CLIENT).ip(), 1024 + n as u16, 0, 0);
        let pkt = match rng.below(2) {
            0 => Pkt6::tcp(client, sa(VIP), TCP_SYN),
            _ => Pkt6::udp(client, sa(VIP), b"fuzz"),
        };
        let chain_len: usize = chain.iter().map(|(_, h)| h.len()).sum();
        let mut frame = pkt.with_ext(chain).build();
        if chain_len > 0 && rng.below(3) == 0 {
            // Spoil a next-header or length byte of the chain.
            let at = 54 + rng.below(chain_len);
            frame[at] = rng.below(256) as u8;
        }
        // A truncated packet (shorter than its payload length says) may
        // still be translated when its L4 header is whole, as in IPv4; the
        // kernel drops it afterwards. Only its verdict is checked.
        let truncated = rng.below(4) == 0;
        if truncated {
            frame.truncate(54 + rng.below(frame.len() - 54));
        }
        for prog in [PROG_INGRESS, PROG_EGRESS] {
            let (verdict, out) = f.run(prog, &frame);
            assert!(
                [TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT].contains(&verdict),
                "{prog} #{n}: verdict {verdict}"
            );
            if verdict == TC_ACT_SHOT || out == frame || truncated {
                unchecked += 1;
                continue;
            }
            changed += 1;
            let p = parse6(&out).unwrap_or_else(|| panic!("{prog} #{n}: not IPv6: {out:?}"));
            assert_ne!(p.l4_checksum_ok, Some(false), "{prog} #{n}: {p:?}");
        }
    }
    assert!(
        changed > 500 && unchecked > 500,
        "{changed} changed, {unchecked} not checked"
    );
}

/// A cgroup made for one test, with this process in it; dropping moves the
/// process back and removes the cgroup (also when the test fails).
struct TestCgroup {
    path: std::path::PathBuf,
    original: std::path::PathBuf,
}

impl TestCgroup {
    fn enter(name: &str) -> TestCgroup {
        use proxy_userspace::datapath::sockets::cgroup2_mount;
        let mount = cgroup2_mount().expect("a cgroup v2 mount");
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let rel = own.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
        let group = TestCgroup {
            path: mount.join(format!("{name}-{}", std::process::id())),
            original: mount.join(rel.trim_start_matches('/')),
        };
        std::fs::create_dir(&group.path).unwrap();
        move_process(&group.path);
        group
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        move_process(&self.original);
        let _ = std::fs::remove_dir(&self.path);
    }
}

fn move_process(to: &std::path::Path) {
    let pid = std::process::id().to_string();
    if let Err(e) = std::fs::write(to.join("cgroup.procs"), pid) {
        eprintln!("moving into {}: {e}", to.display());
    }
}

/// connect6, getpeername6, sendmsg6 and recvmsg6: real IPv6 sockets in a
/// cgroup with only the socket programs attached (no TC program), so a
/// connection to the ClusterIP works only if the socket hooks translate it.
#[test]
fn ipv6_sockets_connect_straight_to_the_backend_and_see_the_service() {
    use std::{
        io::Read,
        net::{TcpListener, TcpStream, UdpSocket},
    };
    let Some(mut f) =
        Fixture::new("ipv6_sockets_connect_straight_to_the_backend_and_see_the_service")
    else {
        return;
    };
    let backend = sa("[::1]:18081");
    f.frontend(Frontend::new(VIP, TCP, &[("[::1]:18081", true)]));
    f.frontend(Frontend::new(VIP, UDP, &[("[::1]:18081", true)]));
    let empty = "[fd00:96::11]:80";
    f.frontend(Frontend::new(empty, TCP, &[]));
    let listener = TcpListener::bind(backend).unwrap();
    let server = UdpSocket::bind(backend).unwrap();
    let cgroup = TestCgroup::enter("kep-v6-sock");
    f.dp.attach_sockets_unpinned(&cgroup.path).unwrap();

    let stream = TcpStream::connect(sa(VIP)).expect("connect6 sends it to the backend");
    assert_eq!(stream.peer_addr().unwrap(), sa(VIP).into(), "getpeername6");
    let (mut accepted, from) = listener.accept().unwrap();
    assert_eq!(from, stream.local_addr().unwrap());
    drop(stream);
    let _ = accepted.read(&mut [0u8; 1]);

    let client = UdpSocket::bind("[::1]:0").unwrap();
    client.send_to(b"ping", sa(VIP)).unwrap();
    let mut buf = [0u8; 16];
    let (n, peer) = server.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"ping", "sendmsg6 sent it to the backend");
    server.send_to(b"pong", peer).unwrap();
    let (n, from) = client.recv_from(&mut buf).unwrap();
    assert_eq!(
        (&buf[..n], from),
        (&b"pong"[..], sa(VIP).into()),
        "recvmsg6"
    );

    let refused = TcpStream::connect(sa(empty)).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(f.counter(Counter::SocketLb) >= 2);
    drop(cgroup);
}
