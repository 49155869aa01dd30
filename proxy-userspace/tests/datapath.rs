//! Datapath unit tests: packets built in Rust go through the real TC
//! programs with BPF_PROG_TEST_RUN, with maps filled by the real syncer, and
//! the tests check addresses, ports, checksums and verdicts of the output.
//!
//! Each test runs in a network namespace of its own (created with
//! `ip netns`, entered by the test thread, deleted afterwards) so that the
//! programs' FIB lookups see a known routing table:
//!   d0 (dummy) 10.244.2.1/24, forwarding on, a permanent neighbour entry
//!   for 10.244.2.11 (BACKEND_MAC) and none for the other backends.

mod privileged;
use privileged::privileged;
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{TestRun, TestRunOptions},
};
use proxy_common::*;
use proxy_userspace::{
    datapath::Datapath,
    sync::{
        AnyBackend, Desired, FrontendWant, Syncer,
        lbmap::{BpfLbMaps, Entry, Key, LbMaps},
    },
    testkit::{
        pktgen::{self, Pkt, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
        testns::{BACKEND_MAC, NetNsGuard},
    },
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

fn sa(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

struct Fixture {
    dp: Datapath,
    syncer: Syncer<BpfLbMaps>,
    ct: HashMap<MapData, FlowKey, NatEntry>,
    rnat: HashMap<MapData, FlowKey, NatEntry>,
    stats: PerCpuArray<MapData, u64>,
    config: Array<MapData, Config>,
    aff: HashMap<MapData, AffKey, AffValue>,
    // Last: the namespace goes after the maps and programs.
    _ns: NetNsGuard,
}

fn svc_key(s: SocketAddrV4, proto: u8) -> SvcKey {
    SvcKey {
        addr: s.ip().octets(),
        port: s.port().to_be_bytes(),
        proto,
        _pad: 0,
    }
}

fn backend(s: SocketAddrV4, proto: u8, local: bool) -> Backend {
    Backend {
        addr: s.ip().octets(),
        port: s.port().to_be_bytes(),
        proto,
        flags: if local { BE_F_LOCAL } else { 0 },
    }
}

const VIP: &str = "10.96.0.10:80";
const CLIENT: &str = "10.244.1.5:40000";
const NODE_IP: [u8; 4] = [192, 168, 200, 11];

impl Fixture {
    fn new(test: &str) -> Option<Fixture> {
        Fixture::with_debug(test, false)
    }

    fn with_debug(test: &str, debug: bool) -> Option<Fixture> {
        if !privileged(test) {
            return None;
        }
        let ns = NetNsGuard::new().expect("test namespace");
        let mut dp = Datapath::load_private(debug).expect("load datapath");
        let maps = BpfLbMaps::new(&mut dp).unwrap();
        let syncer = Syncer::adopt(maps).unwrap();
        let ct = dp.map(CT_MAP).unwrap();
        let rnat = dp.map(RNAT_MAP).unwrap();
        let stats = dp.map(STATS_MAP).unwrap();
        let config = dp.map(CONFIG_MAP).unwrap();
        let aff = dp.map(AFF_MAP).unwrap();
        Some(Fixture {
            dp,
            syncer,
            ct,
            rnat,
            stats,
            config,
            aff,
            _ns: ns,
        })
    }

    /// The standard services: a ClusterIP with the given backends (TCP and
    /// UDP on the same address) and a NodePort 30080 with the same ones.
    fn services(&mut self, backends: &[(&str, bool)]) {
        let mut d = Desired {
            node_addrs: BTreeSet::from([NODE_IP.into()]),
            ..Default::default()
        };
        for proto in [IPPROTO_TCP, IPPROTO_UDP] {
            let bes: Vec<AnyBackend> = backends
                .iter()
                .map(|(a, local)| backend(sa(a), proto, *local).into())
                .collect();
            d.frontends.insert(
                svc_key(sa(VIP), proto).into(),
                FrontendWant {
                    name: "default/web:http".into(),
                    flags: 0,
                    backends: bes.clone(),
                    ..Default::default()
                },
            );
            d.frontends.insert(
                svc_key(sa("0.0.0.0:30080"), proto).into(),
                FrontendWant {
                    name: "default/web:http".into(),
                    flags: SVC_F_EXTERNAL,
                    backends: bes,
                    ..Default::default()
                },
            );
        }
        let r = self.syncer.sync(&d);
        assert!(r.failed.is_empty(), "{:?}", r.failed);
    }

    fn run(&self, prog: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run_from(prog, 0, frame)
    }

    /// Runs `prog` on a packet that arrived on the device of index
    /// `ingress_ifindex` (0: sent by a process of this node).
    fn run_from(&self, prog: &str, ingress_ifindex: u32, frame: &[u8]) -> (u32, Vec<u8>) {
        let prog = self.dp.program(prog).unwrap();
        let mut out = vec![0u8; 2048];
        // A `struct __sk_buff`, all zero but ingress_ifindex (offset 36).
        let mut ctx = [0u8; 192];
        ctx[36..40].copy_from_slice(&ingress_ifindex.to_ne_bytes());
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: (ingress_ifindex != 0).then_some(&ctx[..]),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    fn ingress(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run(PROG_INGRESS, frame)
    }

    fn egress(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run(PROG_EGRESS, frame)
    }

    fn counter(&self, c: Counter) -> u64 {
        self.stats.get(&(c as u32), 0).unwrap().iter().sum()
    }

    /// Traffic counters of the frontend `key`, summed over CPUs.
    fn service_stats(&self, key: &SvcKey) -> SvcStats {
        let maps = self.syncer.maps();
        let id = maps.read_all().unwrap().services[key].svc_id;
        maps.service_stats(id).unwrap()
    }
}

/// Checks that the output is a valid packet and returns it parsed.
fn valid(out: &[u8]) -> pktgen::Parsed {
    let p = pktgen::parse(out).expect("output is an IPv4 packet");
    assert!(p.ip_checksum_ok, "IP checksum broken: {p:?}");
    assert_ne!(p.l4_checksum_ok, Some(false), "L4 checksum broken: {p:?}");
    p
}

fn endpoint(p: &pktgen::Parsed, src: bool) -> SocketAddrV4 {
    if src {
        SocketAddrV4::new(p.src, p.sport.unwrap())
    } else {
        SocketAddrV4::new(p.dst, p.dport.unwrap())
    }
}

#[test]
fn clusterip_tcp_is_dnated_and_replies_are_reverse_translated() {
    let Some(mut f) = Fixture::new("clusterip_tcp") else {
        return;
    };
    f.services(&[("10.244.2.11:8080", false)]);

    let (verdict, out) = f.ingress(&Pkt::tcp(sa(CLIENT), sa(VIP), TCP_SYN).build());
    let p = valid(&out);
    assert_eq!(endpoint(&p, true), sa(CLIENT), "source untouched");
    assert_eq!(endpoint(&p, false), sa("10.244.2.11:8080"));
    // The FIB knows the backend's neighbour: MACs set, redirected.
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(p.dst_mac, BACKEND_MAC);
    assert_eq!(f.counter(Counter::NewFlow), 1);

    let (_, out) =
        f.ingress(&Pkt::tcp(sa("10.244.2.11:8080"), sa(CLIENT), TCP_SYN | TCP_ACK).build());
    let p = valid(&out);
    assert_eq!(endpoint(&p, true), sa(VIP), "reply comes from the service");
    assert_eq!(endpoint(&p, false), sa(CLIENT));
    assert_eq!(f.counter(Counter::Reply), 1);

    let st = f.service_stats(&svc_key(sa(VIP), IPPROTO_TCP));
    assert_eq!((st.new_flows, st.packets), (1, 2), "{st:?}");
    assert_eq!(st.bytes, 2 * 54, "two 54-byte frames");
    let other = f.service_stats(&svc_key(sa(VIP), IPPROTO_UDP));
    assert_eq!(other, SvcStats::default());
}

#[test]
fn udp_with_and_without_checksum() {
    let Some(mut f) = Fixture::new("udp") else {
        return;
    };
    f.services(&[("10.244.2.12:5353", false)]);
    let (verdict, out) = f.ingress(&Pkt::udp(sa(CLIENT), sa(VIP), b"query").build());
    let p = valid(&out);
    assert_eq!(endpoint(&p, false), sa("10.244.2.12:5353"));
    assert_eq!(p.l4_checksum_ok, Some(true));
    // No neighbour entry for .12: the kernel resolves it (redirect_neigh).
    assert_eq!(verdict, TC_ACT_REDIRECT);

    let no_sum = Pkt {
        udp_no_checksum: true,
        ..Pkt::udp(sa("10.244.1.5:40001"), sa(VIP), b"query")
    };
    let (_, out) = f.ingress(&no_sum.build());
    let p = valid(&out);
    assert_eq!(endpoint(&p, false), sa("10.244.2.12:5353"));
    assert!(p.udp_checksum_zero, "a zero UDP checksum stays zero");
}

#[test]
fn a_flow_keeps_its_backend_and_new_flows_spread() {
    let Some(mut f) = Fixture::new("sticky") else {
        return;
    };
    let backends = [
        ("10.244.2.11:8080", false),
        ("10.244.2.12:8080", false),
        ("10.244.2.13:8080", false),
    ];
    f.services(&backends);
    let syn = Pkt::tcp(sa(CLIENT), sa(VIP), TCP_SYN).build();
    let first = endpoint(&valid(&f.ingress(&syn).1), false);
    let data = Pkt::tcp(sa(CLIENT), sa(VIP), TCP_ACK).build();
    for _ in 0..20 {
        assert_eq!(endpoint(&valid(&f.ingress(&data).1), false), first);
    }
    let mut seen = std::collections::BTreeMap::new();
    for port in 0..300u16 {
        let client = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 5), 20000 + port);
        let out = f.ingress(&Pkt::tcp(client, sa(VIP), TCP_SYN).build()).1;
        *seen.entry(endpoint(&valid(&out), false)).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    for n in seen.values() {
        assert!((60..=140).contains(n), "uneven spread {seen:?}");
    }
}

/// The conntrack maps are LRU: a full map evicts the least recently used
/// entry, which may be a live flow's. Its next segment (no SYN) is balanced
/// again, by a hash of its tuple: the same backend, counted.
#[test]
fn a_flow_whose_entry_was_evicted_keeps_its_backend() {
    let Some(mut f) = Fixture::new("evicted") else {
        return;
    };
    f.services(&[
        ("10.244.2.11:8080", false),
        ("10.244.2.12:8080", false),
        ("10.244.2.13:8080", false),
    ]);
    let mut backends = std::collections::BTreeSet::new();
    for port in 0..60u16 {
        let client = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 5), 30000 + port);
        let syn = Pkt::tcp(client, sa(VIP), TCP_SYN).build();
        let first = endpoint(&valid(&f.ingress(&syn).1), false);
        backends.insert(first);
        // What LRU eviction does to the flow's entries.
        let key = FlowKey {
            saddr: client.ip().octets(),
            daddr: sa(VIP).ip().octets(),
            sport: client.port().to_be_bytes(),
            dport: 80u16.to_be_bytes(),
            proto: IPPROTO_TCP,
            _pad: [0; 3],
        };
        let entry = f.ct.get(&key, 0).expect("tracked");
        f.ct.remove(&key).unwrap();
        let reply = FlowKey {
            saddr: entry.daddr,
            daddr: entry.saddr,
            sport: entry.dport,
            dport: entry.sport,
            proto: IPPROTO_TCP,
            _pad: [0; 3],
        };
        f.rnat.remove(&reply).unwrap();
        let data = Pkt::tcp(client, sa(VIP), TCP_ACK).build();
        let again = endpoint(&valid(&f.ingress(&data).1), false);
        assert_eq!(again, first, "flow from {client} moved after eviction");
        // And the reply is translated back again.
        let back = Pkt::tcp(first, client, TCP_ACK).build();
        assert_eq!(endpoint(&valid(&f.ingress(&back).1), true), sa(VIP));
    }
    assert_eq!(backends.len(), 3, "flows still spread: {backends:?}");
    assert_eq!(f.counter(Counter::FlowRecreated), 60);
    assert_eq!(f.counter(Counter::NewFlow), 120);
}

#[test]
fn nodeport_to_a_local_backend_keeps_the_client_address() {
    let Some(mut f) = Fixture::new("nodeport_local") else {
        return;
    };
    f.services(&[("10.244.2.11:8080", true)]);
    let client = sa("192.168.200.100:50000");
    let node_port = sa("192.168.200.11:30080");
    let (_, out) = f.ingress(&Pkt::tcp(client, node_port, TCP_SYN).build());
    let p = valid(&out);
    assert_eq!(endpoint(&p, true), client);
    assert_eq!(endpoint(&p, false), sa("10.244.2.11:8080"));
    let (_, out) = f.ingress(&Pkt::tcp(sa("10.244.2.11:8080"), client, TCP_SYN | TCP_ACK).build());
    let p = valid(&out);
    assert_eq!(endpoint(&p, true), node_port);
    assert_eq!(endpoint(&p, false), client);
}

#[test]
fn nodeport_to_a_remote_backend_is_snated() {
    let Some(mut f) = Fixture::new("nodeport_snat") else {
        return;
    };
    f.services(&[("10.244.2.11:8080", false)]);
    let client = sa("192.168.200.100:50000");
    let node_port = sa("192.168.200.11:30080");
    let (_, out) = f.ingress(&Pkt::tcp(client, node_port, TCP_SYN).build());
    let p = valid(&out);
    let snat = endpoint(&p, true);
    // The source the node would use towards the backend (d0's address).
    assert_eq!(*snat.ip(), Ipv4Addr::new(10, 244, 2, 1));
    assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&snat.port()));
    assert_eq!(endpoint(&p, false), sa("10.244.2.11:8080"));

    let (_, out) = f.ingress(&Pkt::tcp(sa("10.244.2.11:8080"), snat, TCP_SYN | TCP_ACK).build());
    let p = valid(&out);
    assert_eq!(endpoint(&p, true), node_port);
    assert_eq!(endpoint(&p, false), client);

    // A second client gets a different SNAT port.
    let (_, out) = f.ingress(&Pkt::tcp(sa("192.168.200.101:50000"), node_port, TCP_SYN).build());
    assert_ne!(endpoint(&valid(&out), true), snat);
}

/// A closed connection gives its SNAT port back: FINs both ways or an RST.
/// A half-closed one keeps it. Two ports, three clients.
#[test]
fn a_closed_flow_gives_its_snat_port_to_a_new_one() {
    let Some(mut f) = Fixture::new("snat_reclaim") else {
        return;
    };
    f.services(&[("10.244.2.11:8080", false)]);
    f.configure(|c| (c.snat_port_min, c.snat_port_max) = (61000, 61001));
    let node_port = sa("192.168.200.11:30080");
    let backend = sa("10.244.2.11:8080");
    let clients = [
        sa("192.168.200.100:50000"),
        sa("192.168.200.101:50000"),
        sa("192.168.200.102:50000"),
    ];
    let (_, a) = f.syn_to(clients[0], node_port);
    let (_, b) = f.syn_to(clients[1], node_port);
    let (port_a, port_b) = (endpoint(&a, true), endpoint(&b, true));
    assert_ne!(port_a, port_b);
    let refused = |f: &Fixture| {
        let before = f.counter(Counter::DropNoSnatPort);
        let (verdict, _) = f.ingress(&Pkt::tcp(clients[2], node_port, TCP_SYN).build());
        verdict == TC_ACT_SHOT && f.counter(Counter::DropNoSnatPort) == before + 1
    };
    assert!(refused(&f), "both ports are held");

    // A half-closes (its client's FIN only): the backend may still send.
    f.ingress(&Pkt::tcp(clients[0], node_port, TCP_FIN | TCP_ACK).build());
    assert!(refused(&f), "a half-closed flow keeps its port");
    // The backend's FIN closes it.
    let (_, out) = f.ingress(&Pkt::tcp(backend, port_a, TCP_FIN | TCP_ACK).build());
    assert_eq!(
        endpoint(&valid(&out), false),
        clients[0],
        "the reply still reaches A"
    );
    let (verdict, c) = f.syn_to(clients[2], node_port);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(endpoint(&c, true), port_a, "C took A's port");
    let (_, out) = f.ingress(&Pkt::tcp(backend, port_a, TCP_SYN | TCP_ACK).build());
    assert_eq!(
        endpoint(&valid(&out), false),
        clients[2],
        "replies on it go to C"
    );

    // B's backend resets: one RST frees the port.
    let fourth = sa("192.168.200.103:50000");
    let (verdict, _) = f.ingress(&Pkt::tcp(fourth, node_port, TCP_SYN).build());
    assert_eq!(verdict, TC_ACT_SHOT, "C holds A's port, B its own");
    f.ingress(&Pkt::tcp(backend, port_b, TCP_RST).build());
    let (verdict, d) = f.syn_to(fourth, node_port);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(endpoint(&d, true), port_b);
}

/// Linux picks a source port per destination, so a client may dial two
/// frontends of one backend from the same port. The backend must not see
/// one tuple for two connections: the second flow's source port is
/// remapped (as netfilter's NAT does on such a clash), and each reply
/// finds its own frontend.
#[test]
fn a_source_port_reused_towards_another_frontend_is_remapped() {
    let Some(mut f) = Fixture::new("port_reuse") else {
        return;
    };
    f.services(&[("10.244.1.11:8080", true)]);
    let (client, backend) = (sa(CLIENT), sa("10.244.1.11:8080"));
    let node_port = sa("192.168.200.11:30080");
    let (_, first) = f.syn_to(client, sa(VIP));
    assert_eq!(endpoint(&first, true), client, "the first keeps its port");
    let (_, second) = f.syn_to(client, node_port);
    assert_eq!(endpoint(&second, false), backend);
    let remapped = endpoint(&second, true);
    assert_eq!(remapped.ip(), client.ip(), "the client's address is kept");
    assert_ne!(
        remapped.port(),
        client.port(),
        "the second gets another port"
    );
    for (to, frontend) in [(client, sa(VIP)), (remapped, node_port)] {
        let (_, out) = f.ingress(&Pkt::tcp(backend, to, TCP_SYN | TCP_ACK).build());
        let p = valid(&out);
        assert_eq!(
            (endpoint(&p, true), endpoint(&p, false)),
            (frontend, client)
        );
    }
    let (_, out) = f.ingress(&Pkt::tcp(client, sa(VIP), TCP_ACK).build());
    assert_eq!(endpoint(&valid(&out), true), client, "the first keeps it");
}

#[test]
fn hairpin_gets_a_link_local_source() {
    let Some(mut f) = Fixture::new("hairpin") else {
        return;
    };
    f.services(&[("10.244.2.11:8080", false)]);
    let me = sa("10.244.2.11:41000");
    let (_, out) = f.ingress(&Pkt::tcp(me, sa(VIP), TCP_SYN).build());
    let p = valid(&out);
    assert_eq!(p.src, Ipv4Addr::from(HAIRPIN_ADDR));
    assert_eq!(endpoint(&p, false), sa("10.244.2.11:8080"));
    let reply = Pkt::tcp(
        sa("10.244.2.11:8080"),
        endpoint(&p, true),
        TCP_SYN | TCP_ACK,
    );
    let p = valid(&f.ingress(&reply.build()).1);
    assert_eq!(endpoint(&p, true), sa(VIP));
    assert_eq!(endpoint(&p, false), me);
}

#[test]
fn egress_translates_only_local_processes_traffic_to_a_clusterip() {
    let Some(mut f) = Fixture::new("egress") else {
        return;
    };
    f.services(&[("10.244.2.11:8080", false)]);
    let host = sa("192.168.200.11:45000");
    let (verdict, out) = f.egress(&Pkt::tcp(host, sa(VIP), TCP_SYN).build());
    let p = valid(&out);
    assert_eq!(endpoint(&p, false), sa("10.244.2.11:8080"));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    // A reply to the node, at ingress, is translated back.
    let p = valid(
        &f.ingress(&Pkt::tcp(sa("10.244.2.11:8080"), host, TCP_ACK).build())
            .1,
    );
    assert_eq!(endpoint(&p, true), sa(VIP));
    // Other egress traffic is not touched.
    let other = Pkt::tcp(host, sa("10.244.2.11:8080"), TCP_SYN).build();
    assert_eq!(f.egress(&other), (TC_ACT_OK, other));
}

#[test]
fn egress_leaves_forwarded_packets_to_their_ingress_hook_unless_only_some_devices_have_it() {
    let Some(mut f) = Fixture::new("egress_forwarded") else {
        return;
    };
    f.services(&[("10.244.2.11:8080", false)]);
    // A pod's packet to a ClusterIP that reached an egress hook without
    // being translated: it came in by a device, whose ingress hook had it.
    let syn = Pkt::tcp(sa(CLIENT), sa(VIP), TCP_SYN).build();
    assert_eq!(f.run_from(PROG_EGRESS, 2, &syn), (TC_ACT_OK, syn.clone()));
    assert_eq!(f.counter(Counter::NewFlow), 0);
    // With --devices, that device may lack the ingress hook: egress
    // translates the packet, as it does a node process's.
    f.configure(|c| c.flags = CFG_F_SOME_DEVICES);
    let (verdict, out) = f.run_from(PROG_EGRESS, 2, &syn);
    assert_eq!(endpoint(&valid(&out), false), sa("10.244.2.11:8080"));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(f.counter(Counter::NewFlow), 1);
}

#[test]
fn other_traffic_passes_untouched() {
    let Some(mut f) = Fixture::new("passthrough") else {
        return;
    };
    f.services(&[("10.244.2.11:8080", false)]);
    let mut frames = vec![
        Pkt::tcp(sa(CLIENT), sa("10.244.2.11:8080"), TCP_SYN).build(),
        Pkt::udp(sa(CLIENT), sa("10.244.2.12:53"), b"x").build(),
        // To the node on a port that is no NodePort.
        Pkt::tcp(sa("192.168.200.100:5000"), sa("192.168.200.11:22"), TCP_SYN).build(),
        // ICMP echo to a ClusterIP.
        pktgen::ipv4_frame(
            Ipv4Addr::new(10, 244, 1, 5),
            Ipv4Addr::new(10, 96, 0, 10),
            pktgen::ICMP,
            &[],
            1,
            0,
            false,
            &[8, 0, 0xf7, 0xff, 0, 0, 0, 0],
        ),
    ];
    // IPv6 (to a made-up address) and ARP.
    let mut v6 = vec![0u8; 14 + 40 + 8];
    v6[12..14].copy_from_slice(&[0x86, 0xdd]);
    v6[14] = 0x60;
    v6[14 + 6] = 17;
    frames.push(v6);
    let mut arp = vec![0u8; 42];
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    frames.push(arp);
    for frame in frames {
        assert_eq!(f.ingress(&frame), (TC_ACT_OK, frame.clone()));
        assert_eq!(f.egress(&frame), (TC_ACT_OK, frame.clone()));
    }
    assert_eq!(f.counter(Counter::NewFlow), 0);
}

#[test]
fn truncated_and_malformed_headers() {
    let Some(mut f) = Fixture::new("malformed") else {
        return;
    };
    f.services(&[("10.244.2.11:8080", false)]);
    let syn = Pkt::tcp(sa(CLIENT), sa(VIP), TCP_SYN).build();

    // TCP header cut short, to a ClusterIP: dropped and counted. Elsewhere:
    // not ours to judge.
    let mut cut = syn[..14 + 20 + 10].to_vec();
    cut[16..18].copy_from_slice(&30u16.to_be_bytes());
    assert_eq!(f.ingress(&cut).0, TC_ACT_SHOT);
    assert_eq!(f.counter(Counter::DropMalformed), 1);
    let mut cut_other = Pkt::tcp(sa(CLIENT), sa("10.244.2.11:80"), TCP_SYN).build();
    cut_other.truncate(14 + 20 + 10);
    assert_eq!(f.ingress(&cut_other), (TC_ACT_OK, cut_other.clone()));

    // Wrong version, IHL < 5, total length below the header length: passed
    // to the kernel, which drops them. (A frame shorter than an IP header
    // cannot be fed in: BPF_PROG_TEST_RUN itself refuses it with EINVAL.)
    let mut v5 = syn.clone();
    v5[14] = 0x55;
    let mut ihl4 = syn.clone();
    ihl4[14] = 0x44;
    let mut tot = syn.clone();
    tot[16..18].copy_from_slice(&10u16.to_be_bytes());
    for (what, frame) in [("v5", v5), ("ihl4", ihl4), ("tot", tot)] {
        assert_eq!(f.ingress(&frame), (TC_ACT_OK, frame.clone()), "{what}");
    }
    // A TCP data offset below 5 to a ClusterIP is malformed too.
    let mut doff = syn.clone();
    doff[14 + 20 + 12] = 0x20;
    assert_eq!(f.ingress(&doff).0, TC_ACT_SHOT);
    assert_eq!(f.counter(Counter::NewFlow), 0);
}

#[test]
fn ip_options_shift_the_l4_header() {
    let Some(mut f) = Fixture::new("ip_options") else {
        return;
    };
    f.services(&[("10.244.2.11:8080", false)]);
    let pkt = Pkt {
        // Two NOPs, then a record-route-ish option of 6 bytes.
        ip_options: vec![1, 1, 7, 6, 4, 0, 0, 0],
        ..Pkt::tcp(sa(CLIENT), sa(VIP), TCP_SYN)
    };
    let out = f.ingress(&pkt.build()).1;
    let p = valid(&out);
    assert_eq!(endpoint(&p, false), sa("10.244.2.11:8080"));
    assert_eq!(
        &out[14 + 20..14 + 28],
        &pkt.ip_options[..],
        "options intact"
    );
}

#[test]
fn fragments_follow_their_first_fragment() {
    let Some(mut f) = Fixture::new("fragments") else {
        return;
    };
    f.services(&[("10.244.2.11:5353", false)]);
    let whole = Pkt::udp(sa(CLIENT), sa(VIP), &[7u8; 40]);
    let l4 = whole.ip_payload();
    let first = Pkt {
        more_fragments: true,
        ip_id: 77,
        ..whole.clone()
    }
    .build_with_payload(&l4[..24]);
    let second = Pkt {
        frag_offset: 3,
        ip_id: 77,
        ..whole.clone()
    }
    .build_with_payload(&l4[24..]);

    let p = valid(&f.ingress(&first).1);
    assert_eq!(endpoint(&p, false), sa("10.244.2.11:5353"));
    let out = f.ingress(&second).1;
    let p = valid(&out);
    assert_eq!(p.dst, Ipv4Addr::new(10, 244, 2, 11));
    assert_eq!(
        p.l4,
        l4[24..].to_vec(),
        "payload of a later fragment untouched"
    );
    // The L4 checksum of the reassembled datagram is still right.
    let mut datagram = valid(&f.ingress(&first).1).l4;
    datagram.extend_from_slice(&p.l4);
    let rebuilt = pktgen::ipv4_frame(p.src, p.dst, pktgen::UDP, &[], 1, 0, false, &datagram);
    assert_eq!(pktgen::parse(&rebuilt).unwrap().l4_checksum_ok, Some(true));

    // A later fragment whose first fragment never came: dropped.
    let orphan = Pkt {
        frag_offset: 3,
        ip_id: 78,
        ..whole
    }
    .build_with_payload(&l4[24..]);
    assert_eq!(f.ingress(&orphan).0, TC_ACT_SHOT);
    assert_eq!(f.counter(Counter::DropFragment), 1);
}

/// ICMP port unreachable, in place of the packet, from the address dialed,
/// quoting the IP header and the L4 header (8 bytes for UDP, the whole
/// header for TCP).
fn assert_port_unreachable(out: &[u8], verdict: u32, sent: &[u8]) {
    let quote = if sent[14 + 9] == pktgen::TCP { 40 } else { 28 };
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let p = valid(out);
    assert_eq!(p.proto, pktgen::ICMP);
    assert_eq!(p.src, Ipv4Addr::new(10, 96, 0, 10));
    assert_eq!(p.dst, Ipv4Addr::new(10, 244, 1, 5));
    assert_eq!(&p.l4[..2], &[3, 3], "type 3 code 3");
    assert_eq!(
        &p.l4[8..],
        &sent[14..14 + quote],
        "quotes IP and L4 headers"
    );
    assert_eq!(p.dst_mac, pktgen::SRC_MAC, "sent back to the sender");
}

#[test]
fn no_endpoint_and_unknown_port_are_rejected_with_icmp() {
    let Some(mut f) = Fixture::new("reject") else {
        return;
    };
    f.services(&[]);
    for frame in [
        Pkt::tcp(sa(CLIENT), sa(VIP), TCP_SYN).build(),
        Pkt::udp(sa(CLIENT), sa(VIP), b"q").build(),
    ] {
        let (verdict, out) = f.ingress(&frame);
        assert_port_unreachable(&out, verdict, &frame);
    }
    assert_eq!(f.counter(Counter::DropNoEndpoint), 2);
    let unknown = Pkt::tcp(sa(CLIENT), sa("10.96.0.10:81"), TCP_SYN).build();
    let (verdict, out) = f.ingress(&unknown);
    assert_port_unreachable(&out, verdict, &unknown);
    assert_eq!(f.counter(Counter::DropUnknownPort), 1);
}

#[test]
fn icmp_errors_about_a_flow_are_translated_back() {
    let Some(mut f) = Fixture::new("icmp_error") else {
        return;
    };
    f.services(&[("10.244.2.11:8080", false)]);
    let sent = valid(&f.ingress(&Pkt::tcp(sa(CLIENT), sa(VIP), TCP_ACK).build()).1);
    assert_eq!(endpoint(&sent, false), sa("10.244.2.11:8080"));
    // The backend says "fragmentation needed" about what it received.
    let translated = Pkt::tcp(sa(CLIENT), sa("10.244.2.11:8080"), TCP_ACK).build();
    let err = pktgen::icmp_error(
        Ipv4Addr::new(10, 244, 2, 11),
        Ipv4Addr::new(10, 244, 1, 5),
        3,
        4,
        &translated[14..14 + 28],
    );
    let p = valid(&f.ingress(&err).1);
    assert_eq!(p.src, Ipv4Addr::new(10, 96, 0, 10), "from the service");
    let inner = &p.l4[8..];
    assert_eq!(&inner[12..16], &[10, 244, 1, 5]);
    assert_eq!(&inner[16..20], &[10, 96, 0, 10]);
    assert_eq!(u16::from_be_bytes([inner[22], inner[23]]), 80);
    assert_eq!(pktgen::checksum(&inner[..20]), 0, "inner IP checksum");
    assert_eq!(f.counter(Counter::IcmpError), 1);
}

#[test]
fn a_removed_backend_is_not_reused_by_new_connections_on_an_old_tuple() {
    let Some(mut f) = Fixture::new("reselect") else {
        return;
    };
    f.services(&[("10.244.2.11:5353", false)]);
    let q = Pkt::udp(sa(CLIENT), sa(VIP), b"q").build();
    assert_eq!(
        endpoint(&valid(&f.ingress(&q).1), false),
        sa("10.244.2.11:5353")
    );
    f.services(&[("10.244.2.12:5353", false)]);
    assert_eq!(
        endpoint(&valid(&f.ingress(&q).1), false),
        sa("10.244.2.12:5353"),
        "UDP flow moved off the removed backend"
    );

    // TCP: an established connection stays, a new SYN on a closed tuple
    // is balanced again.
    f.services(&[("10.244.2.11:5353", false), ("10.244.2.12:5353", false)]);
    let syn = Pkt::tcp(sa(CLIENT), sa(VIP), TCP_SYN).build();
    let first = endpoint(&valid(&f.ingress(&syn).1), false);
    let fin = Pkt::tcp(sa(CLIENT), sa(VIP), TCP_FIN | TCP_ACK).build();
    assert_eq!(endpoint(&valid(&f.ingress(&fin).1), false), first);
    let key = FlowKey {
        saddr: [10, 244, 1, 5],
        daddr: [10, 96, 0, 10],
        sport: 40000u16.to_be_bytes(),
        dport: 80u16.to_be_bytes(),
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    };
    assert_ne!(f.ct.get(&key, 0).unwrap().flags & NAT_F_CLOSING, 0);
    let before = f.counter(Counter::NewFlow);
    f.ingress(&syn);
    assert_eq!(
        f.counter(Counter::NewFlow),
        before + 1,
        "SYN after FIN is a new flow"
    );
    assert!(f.rnat.iter().count() >= 2);
}

/// Removing a backend leaves its probe-filter bit set: a connection that
/// outlives its backend (an endpoint removed while the connection lasts)
/// still has its replies translated.
#[test]
fn replies_of_a_flow_whose_backend_was_removed_are_still_translated() {
    let Some(mut f) = Fixture::new("removed_backend_replies") else {
        return;
    };
    f.services(&[("10.244.2.11:8080", false)]);
    f.ingress(&Pkt::tcp(sa(CLIENT), sa(VIP), TCP_SYN).build());
    f.services(&[("10.244.2.12:8080", false)]);
    let maps = f.syncer.maps().read_all().unwrap();
    assert!(
        maps.backends.values().all(|b| b.addr != [10, 244, 2, 11]),
        "the backend is gone from the maps"
    );
    let reply = Pkt::tcp(sa("10.244.2.11:8080"), sa(CLIENT), TCP_SYN | TCP_ACK).build();
    let p = valid(&f.ingress(&reply).1);
    assert_eq!(endpoint(&p, true), sa(VIP), "reply comes from the service");
}

/// A reverse-NAT entry written behind the programs' back: the reply `key`
/// of backend `backend_id` comes from [`VIP`].
fn from_the_vip(key: &FlowKey, backend_id: u32) -> NatEntry {
    NatEntry {
        saddr: sa(VIP).ip().octets(),
        daddr: key.daddr,
        sport: sa(VIP).port().to_be_bytes(),
        dport: key.dport,
        svc_id: 1,
        backend_id,
        flags: 0,
        _pad: [0; 3],
    }
}

/// What the endpoint filter rules out is not looked up: a packet from an
/// address and port that is no backend skips the reverse-NAT lookup, so a
/// pod's ordinary traffic costs one bit test there. Shown with an entry
/// written behind the writer's back (as a version without filters would
/// have): invisible until its source becomes a backend, which sets the
/// bit (and every start sets the bits of what the pins hold, see
/// probe_filters.rs).
#[test]
fn reverse_nat_is_looked_up_only_for_replies_from_backends() {
    let Some(mut f) = Fixture::new("endpoint_filter") else {
        return;
    };
    f.services(&[("10.244.2.11:8080", false)]);
    let from = sa("10.244.3.7:9000");
    let key = key_of(from, sa(CLIENT));
    f.rnat.insert(key, from_the_vip(&key, 77), 0).unwrap();
    let reply = Pkt::tcp(from, sa(CLIENT), TCP_ACK).build();
    let p = valid(&f.ingress(&reply).1);
    assert_eq!(endpoint(&p, true), from, "no bit, no lookup: untouched");

    f.put(Entry::Backend(
        BackendKey { backend_id: 77 },
        backend(from, IPPROTO_TCP, false),
    ));
    let p = valid(&f.ingress(&reply).1);
    assert_eq!(
        endpoint(&p, true),
        sa(VIP),
        "a backend's reply is looked up"
    );
}

/// Once the reply sources are trusted (the daemon does so when its
/// programs run everywhere), only a backend some per-packet flow went to
/// has its replies looked up: the programs mark a flow's backend as they
/// write its reverse-NAT entry. A backend only socket-balanced
/// connections reach (no entry, no mark) skips the lookup, which misses
/// the cache on every reply of a new connection otherwise.
#[test]
fn trusted_reply_sources_look_up_only_backends_of_per_packet_flows() {
    let Some(mut f) = Fixture::new("reply_sources") else {
        return;
    };
    f.services(&[("10.244.2.11:8080", false)]);
    f.put(Entry::Backend(
        BackendKey { backend_id: 78 },
        backend(sa("10.244.2.12:8080"), IPPROTO_TCP, false),
    ));
    assert_eq!(f.dp.trust_reply_sources().unwrap(), Some(0), "no pins");
    assert_eq!(f.dp.trust_reply_sources().unwrap(), None, "once");

    f.ingress(&Pkt::tcp(sa(CLIENT), sa(VIP), TCP_SYN).build());
    let reply = Pkt::tcp(sa("10.244.2.11:8080"), sa(CLIENT), TCP_SYN | TCP_ACK).build();
    let p = valid(&f.ingress(&reply).1);
    assert_eq!(endpoint(&p, true), sa(VIP), "the flow's backend was marked");

    let other = sa("10.244.2.12:8080");
    let key = key_of(other, sa("10.244.1.5:40001"));
    f.rnat.insert(key, from_the_vip(&key, 78), 0).unwrap();
    let reply = Pkt::tcp(other, sa("10.244.1.5:40001"), TCP_ACK).build();
    let p = valid(&f.ingress(&reply).1);
    assert_eq!(
        endpoint(&p, true),
        other,
        "an unmarked backend is not looked up"
    );
}

/// A log::Log that keeps the messages.
#[derive(Clone, Default)]
struct Collect(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl log::Log for Collect {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        self.0.lock().unwrap().push(record.args().to_string());
    }
    fn flush(&self) {}
}

#[test]
fn debug_events_are_emitted_only_when_asked_for() {
    for debug in [false, true] {
        let Some(mut f) = Fixture::with_debug("debug_events", debug) else {
            return;
        };
        f.services(&[("10.244.2.11:8080", false)]);
        let seen = Collect::default();
        let mut logger = f.dp.logger(seen.clone()).unwrap();
        f.ingress(&Pkt::tcp(sa(CLIENT), sa(VIP), TCP_SYN).build());
        f.ingress(&Pkt::tcp(sa(CLIENT), sa("10.96.0.10:81"), TCP_SYN).build());
        logger.flush();
        let lines = seen.0.lock().unwrap().clone();
        if debug {
            assert!(
                lines
                    .iter()
                    .any(|l| l.contains("new flow 10.244.1.5:40000 -> service port")
                        && l.contains("backend 10.244.2.11:8080")),
                "{lines:?}"
            );
            assert!(
                lines
                    .iter()
                    .any(|l| l.contains("reject (unknown_port) 10.244.1.5 -> 10.96.0.10")),
                "{lines:?}"
            );
        } else {
            assert!(lines.is_empty(), "events while off: {lines:?}");
        }
    }
}

// ---------------------------------------------------------------------------
// Service semantics (issue 10): frontends written entry by entry, as the
// datapath ABI describes them, so each rule is tested on its own.

/// This node's address in the test namespace (d0's): the FIB answers
/// "local" for it, as on a real node.
const NODE: [u8; 4] = [10, 244, 2, 1];
const LB_IP: &str = "192.168.50.10:443";

/// A frontend as the datapath sees it.
struct Fe {
    key: SvcKey,
    svc_id: u32,
    primary: Vec<Backend>,
    local: Vec<Backend>,
    flags: u16,
    affinity_timeout: u32,
}

impl Fe {
    fn new(key: SvcKey, svc_id: u32, primary: &[Backend]) -> Fe {
        Fe {
            key,
            svc_id,
            primary: primary.to_vec(),
            local: Vec::new(),
            flags: 0,
            affinity_timeout: 0,
        }
    }
}

fn be(s: &str, local: bool) -> Backend {
    backend(sa(s), IPPROTO_TCP, local)
}

/// Backend ids of the raw frontends: derived from the address, so one
/// backend has one id in every frontend.
fn backend_id(b: &Backend) -> u32 {
    1_000 + u32::from_be_bytes(b.addr) % 100_000 + u16::from_be_bytes(b.port) as u32 * 7
}

impl Fixture {
    fn put(&mut self, e: Entry) {
        self.syncer.maps_mut().put(&e).unwrap();
    }

    fn addr(&mut self, addr: [u8; 4], class: u8) {
        self.put(Entry::Addr(
            AddrKey { addr },
            AddrValue {
                class,
                _pad: [0; 3],
            },
        ));
    }

    /// Writes a frontend: its backends, its slots (primary then local set,
    /// generation 0) and the service entry; affinity frontends get their
    /// membership entries.
    fn frontend(&mut self, fe: &Fe) {
        for (slot, b) in fe.primary.iter().chain(&fe.local).enumerate() {
            let backend_id = backend_id(b);
            self.put(Entry::Backend(BackendKey { backend_id }, *b));
            let key = SlotKey {
                svc_id: fe.svc_id,
                generation: 0,
                slot: slot as u16,
            };
            self.put(Entry::Slot(key, SlotValue { backend_id }));
            if fe.flags & SVC_F_AFFINITY != 0 {
                self.member(fe.svc_id, backend_id, true);
            }
        }
        let value = SvcValue {
            svc_id: fe.svc_id,
            generation: 0,
            count: fe.primary.len() as u16,
            local_count: fe.local.len() as u16,
            flags: fe.flags,
            affinity_timeout: fe.affinity_timeout,
        };
        self.put(Entry::Service(fe.key, value));
    }

    fn member(&mut self, svc_id: u32, backend_id: u32, present: bool) {
        let k = AffMemberKey { svc_id, backend_id };
        if present {
            self.put(Entry::AffMember(k));
        } else {
            self.syncer.maps_mut().delete(&Key::AffMember(k)).unwrap();
        }
    }

    fn configure(&mut self, f: impl FnOnce(&mut Config)) {
        let mut c = Config {
            snat_port_min: SNAT_PORT_MIN,
            snat_port_max: SNAT_PORT_MAX,
            hairpin_addr: HAIRPIN_ADDR,
            ..Config::default()
        };
        f(&mut c);
        self.config.set(0, c, 0).unwrap();
    }

    /// Sends a SYN at ingress and returns where it went.
    fn syn_to(&self, client: SocketAddrV4, to: SocketAddrV4) -> (u32, pktgen::Parsed) {
        let (verdict, out) = self.ingress(&Pkt::tcp(client, to, TCP_SYN).build());
        (verdict, valid(&out))
    }
}

fn tcp_key(s: &str) -> SvcKey {
    svc_key(sa(s), IPPROTO_TCP)
}

#[test]
fn hostnetwork_backend_reached_from_a_pod_is_reverse_translated_on_egress() {
    let Some(mut f) = Fixture::new("hostnet_pod") else {
        return;
    };
    f.addr(NODE, ADDR_HOST | ADDR_NODEPORT);
    f.addr([10, 96, 0, 1], ADDR_CLUSTER_IP);
    f.frontend(&Fe::new(
        tcp_key("10.96.0.1:443"),
        1,
        &[be("10.244.2.1:6443", true)],
    ));

    let pod = sa("10.244.1.5:40000");
    let (verdict, p) = f.syn_to(pod, sa("10.96.0.1:443"));
    assert_eq!(endpoint(&p, false), sa("10.244.2.1:6443"));
    assert_eq!(endpoint(&p, true), pod, "the API server sees the pod");
    assert_eq!(verdict, TC_ACT_OK, "a local destination goes to the stack");

    // The reply is sent by a local process: it only passes an egress hook.
    let reply = Pkt::tcp(sa("10.244.2.1:6443"), pod, TCP_SYN | TCP_ACK).build();
    let (verdict, out) = f.egress(&reply);
    let p = valid(&out);
    assert_eq!(endpoint(&p, true), sa("10.96.0.1:443"));
    assert_eq!(endpoint(&p, false), pod);
    assert_eq!(verdict, TC_ACT_OK, "routed already: it continues");
    assert_eq!(f.counter(Counter::Reply), 1);

    // The node's own traffic from that address is not touched.
    let other = Pkt::tcp(sa("10.244.2.1:6443"), sa("10.244.1.6:40000"), TCP_ACK).build();
    assert_eq!(f.egress(&other), (TC_ACT_OK, other));
}

#[test]
fn hostnetwork_backend_reached_from_its_own_node_goes_through_lo() {
    let Some(mut f) = Fixture::new("hostnet_node") else {
        return;
    };
    f.addr(NODE, ADDR_HOST | ADDR_NODEPORT);
    f.addr([10, 96, 0, 1], ADDR_CLUSTER_IP);
    f.frontend(&Fe::new(
        tcp_key("10.96.0.1:443"),
        1,
        &[be("10.244.2.1:6443", true)],
    ));

    let me = sa("10.244.2.1:45000");
    let (verdict, out) = f.egress(&Pkt::tcp(me, sa("10.96.0.1:443"), TCP_SYN).build());
    let p = valid(&out);
    assert_eq!(endpoint(&p, false), sa("10.244.2.1:6443"));
    assert_eq!(endpoint(&p, true), me);
    // Redirected into lo's ingress, with lo's (all-zero) MAC addresses.
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!((p.dst_mac, p.src_mac), ([0; 6], [0; 6]));

    // The reply leaves over lo: translated there.
    let (verdict, out) = f.egress(&Pkt::tcp(sa("10.244.2.1:6443"), me, TCP_SYN | TCP_ACK).build());
    let p = valid(&out);
    assert_eq!(endpoint(&p, true), sa("10.96.0.1:443"));
    assert_eq!(endpoint(&p, false), me);
    assert_eq!(verdict, TC_ACT_OK);
}

#[test]
fn nodeport_dialed_by_a_node_process_on_its_own_address() {
    let Some(mut f) = Fixture::new("nodeport_self") else {
        return;
    };
    f.addr(NODE, ADDR_HOST | ADDR_NODEPORT);
    let mut fe = Fe::new(
        tcp_key("0.0.0.0:30080"),
        1,
        &[be("10.244.2.11:8080", false)],
    );
    fe.flags = SVC_F_EXTERNAL;
    f.frontend(&fe);

    // Over lo's egress: to the pod, the node's address kept (no SNAT: the
    // reply comes to this node anyway).
    let me = sa("10.244.2.1:45000");
    let (verdict, out) = f.egress(&Pkt::tcp(me, sa("10.244.2.1:30080"), TCP_SYN).build());
    let p = valid(&out);
    assert_eq!(endpoint(&p, false), sa("10.244.2.11:8080"));
    assert_eq!(endpoint(&p, true), me);
    assert_eq!((verdict, p.dst_mac), (TC_ACT_REDIRECT, BACKEND_MAC));

    // The pod's reply, at its veth's ingress: from the node's address to
    // the node's address, so into lo's ingress (not a martian).
    let (verdict, out) =
        f.ingress(&Pkt::tcp(sa("10.244.2.11:8080"), me, TCP_SYN | TCP_ACK).build());
    let p = valid(&out);
    assert_eq!(endpoint(&p, true), sa("10.244.2.1:30080"));
    assert_eq!(endpoint(&p, false), me);
    assert_eq!((verdict, p.dst_mac), (TC_ACT_REDIRECT, [0; 6]));

    // A hostNetwork backend behind the NodePort: in and out over lo.
    let mut fe = Fe::new(tcp_key("0.0.0.0:30081"), 2, &[be("10.244.2.1:8443", true)]);
    fe.flags = SVC_F_EXTERNAL;
    f.frontend(&fe);
    let (verdict, out) = f.egress(&Pkt::tcp(me, sa("10.244.2.1:30081"), TCP_SYN).build());
    assert_eq!(endpoint(&valid(&out), false), sa("10.244.2.1:8443"));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let (verdict, out) = f.egress(&Pkt::tcp(sa("10.244.2.1:8443"), me, TCP_ACK).build());
    assert_eq!(endpoint(&valid(&out), true), sa("10.244.2.1:30081"));
    assert_eq!(verdict, TC_ACT_OK);
}

#[test]
fn an_external_ip_on_a_node_address_takes_only_its_own_ports() {
    let Some(mut f) = Fixture::new("external_ports") else {
        return;
    };
    f.addr(NODE, ADDR_HOST | ADDR_NODEPORT | ADDR_EXTERNAL);
    f.frontend(&Fe::new(
        tcp_key("10.244.2.1:443"),
        1,
        &[be("10.244.2.11:8080", true)],
    ));

    let client = sa("192.168.200.100:50000");
    let (_, p) = f.syn_to(client, sa("10.244.2.1:443"));
    assert_eq!(
        endpoint(&p, false),
        sa("10.244.2.11:8080"),
        "the Service's port"
    );
    let untouched = [
        // SSH to the node.
        Pkt::tcp(client, sa("10.244.2.1:22"), TCP_SYN).build(),
        // A reply to the node's own connection from a server's port 443
        // (the same port number as the Service's).
        Pkt::tcp(
            sa("192.168.200.100:443"),
            sa("10.244.2.1:443"),
            TCP_SYN | TCP_ACK,
        )
        .build(),
        Pkt::tcp(sa("192.168.200.100:80"), sa("10.244.2.1:45000"), TCP_ACK).build(),
        Pkt::udp(sa("192.168.200.100:53"), sa("10.244.2.1:45000"), b"answer").build(),
    ];
    for frame in untouched {
        assert_eq!(f.ingress(&frame), (TC_ACT_OK, frame.clone()));
        assert_eq!(f.egress(&frame), (TC_ACT_OK, frame.clone()));
    }
    assert_eq!(f.counter(Counter::DropUnknownPort), 0, "never rejected");

    // An LB IP that is no node address: its other ports pass too.
    f.addr([192, 168, 50, 10], ADDR_EXTERNAL);
    f.frontend(&Fe::new(tcp_key(LB_IP), 2, &[be("10.244.2.11:8080", true)]));
    let other = Pkt::tcp(client, sa("192.168.50.10:80"), TCP_SYN).build();
    assert_eq!(f.ingress(&other), (TC_ACT_OK, other));
    assert_eq!(
        endpoint(&f.syn_to(client, sa(LB_IP)).1, false),
        sa("10.244.2.11:8080")
    );
}

#[test]
fn session_affinity_keeps_a_client_on_its_backend_until_it_leaves() {
    let Some(mut f) = Fixture::new("affinity") else {
        return;
    };
    f.addr([10, 96, 0, 10], ADDR_CLUSTER_IP);
    let backends = [
        be("10.244.2.11:8080", false),
        be("10.244.2.12:8080", false),
        be("10.244.2.13:8080", false),
    ];
    let mut fe = Fe::new(tcp_key(VIP), 1, &backends);
    fe.flags = SVC_F_AFFINITY;
    fe.affinity_timeout = 10_800;
    f.frontend(&fe);

    let dial = |f: &Fixture, client: &str, port: u16| {
        let c = SocketAddrV4::new(client.parse().unwrap(), port);
        endpoint(&f.syn_to(c, sa(VIP)).1, false)
    };
    let first = dial(&f, "10.244.1.5", 20000);
    for port in 20001..20030 {
        assert_eq!(
            dial(&f, "10.244.1.5", port),
            first,
            "same client, same backend"
        );
    }
    // Other clients spread over all backends.
    let others: BTreeSet<_> = (0..60)
        .map(|i| dial(&f, &format!("10.244.1.{}", 100 + i), 30000))
        .collect();
    assert_eq!(others.len(), 3, "{others:?}");

    // The affine backend turns not ready: gone from the slots and the
    // members; the client moves at once, and stays on its new backend.
    let gone = *backends
        .iter()
        .find(|b| b.addr == first.ip().octets())
        .unwrap();
    let rest: Vec<Backend> = backends.iter().copied().filter(|b| *b != gone).collect();
    let mut fe = Fe::new(tcp_key(VIP), 1, &rest);
    fe.flags = SVC_F_AFFINITY;
    fe.affinity_timeout = 10_800;
    f.frontend(&fe);
    f.put(Entry::Slot(
        SlotKey {
            svc_id: 1,
            generation: 0,
            slot: 2,
        },
        SlotValue {
            backend_id: backend_id(&gone),
        },
    ));
    f.member(1, backend_id(&gone), false);
    let second = dial(&f, "10.244.1.5", 21000);
    assert_ne!(second, first);
    for port in 21001..21010 {
        assert_eq!(dial(&f, "10.244.1.5", port), second);
    }
}

#[test]
fn session_affinity_expires_after_its_timeout() {
    let Some(mut f) = Fixture::new("affinity_timeout") else {
        return;
    };
    f.addr([10, 96, 0, 10], ADDR_CLUSTER_IP);
    // The slots hold only .12; .11 is a member the client was affine to.
    let mut fe = Fe::new(tcp_key(VIP), 1, &[be("10.244.2.12:8080", false)]);
    fe.flags = SVC_F_AFFINITY;
    fe.affinity_timeout = 60;
    f.frontend(&fe);
    let old = be("10.244.2.11:8080", false);
    f.put(Entry::Backend(
        BackendKey {
            backend_id: backend_id(&old),
        },
        old,
    ));
    f.member(1, backend_id(&old), true);
    // bpf_ktime_get_ns is CLOCK_MONOTONIC.
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) },
        0
    );
    let now = ts.tv_sec as u32;
    let key = AffKey {
        svc_id: 1,
        client: [10, 244, 1, 5],
    };
    let remembered = |last_seen| AffValue {
        backend_id: backend_id(&old),
        last_seen,
    };

    f.aff.insert(key, remembered(now - 30), 0).unwrap();
    assert_eq!(
        endpoint(&f.syn_to(sa(CLIENT), sa(VIP)).1, false),
        sa("10.244.2.11:8080"),
        "30 s < 60 s: still affine"
    );
    let refreshed = f.aff.get(&key, 0).unwrap();
    assert!(refreshed.last_seen >= now, "a new flow refreshes the entry");

    f.aff.insert(key, remembered(now - 61), 0).unwrap();
    let c2 = sa("10.244.1.5:40001");
    assert_eq!(
        endpoint(&f.syn_to(c2, sa(VIP)).1, false),
        sa("10.244.2.12:8080"),
        "expired"
    );
    assert_eq!(
        f.aff.get(&key, 0).unwrap().backend_id,
        backend_id(&be("10.244.2.12:8080", false))
    );
}

#[test]
fn external_traffic_policy_local_serves_outside_clients_locally_only() {
    let Some(mut f) = Fixture::new("etp_local") else {
        return;
    };
    f.configure(|c| {
        c.flags = CFG_F_CLUSTER_CIDR;
        c.cluster_cidr = [10, 244, 0, 0];
        c.cluster_cidr_len = 16;
    });
    f.addr(NODE_IP, ADDR_HOST | ADDR_NODEPORT);
    let remote = be("10.244.3.11:8080", false);
    let local = be("10.244.2.11:8080", true);
    let mut fe = Fe::new(tcp_key("0.0.0.0:30080"), 1, &[remote, local]);
    fe.local = vec![local];
    fe.flags = SVC_F_EXTERNAL | SVC_F_ETP_LOCAL;
    f.frontend(&fe);

    let node_port = sa("192.168.200.11:30080");
    for port in 0..20 {
        let outside = SocketAddrV4::new(Ipv4Addr::new(192, 168, 200, 100), 50000 + port);
        let (_, p) = f.syn_to(outside, node_port);
        assert_eq!(endpoint(&p, false), sa("10.244.2.11:8080"), "local only");
        assert_eq!(endpoint(&p, true), outside, "client address kept");
    }
    // Pods use every endpoint, without masquerade (kube-proxy's
    // short-circuit).
    let seen: BTreeSet<_> = (0..40)
        .map(|i| {
            let pod = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 5), 40000 + i);
            let (_, p) = f.syn_to(pod, node_port);
            assert_eq!(endpoint(&p, true), pod);
            endpoint(&p, false)
        })
        .collect();
    assert_eq!(seen.len(), 2, "{seen:?}");

    // No local endpoint: outside clients are dropped, not rejected; pods
    // are still served.
    let mut fe = Fe::new(tcp_key("0.0.0.0:30080"), 1, &[remote]);
    fe.flags = SVC_F_EXTERNAL | SVC_F_ETP_LOCAL;
    f.frontend(&fe);
    let syn = Pkt::tcp(sa("192.168.200.100:51000"), node_port, TCP_SYN).build();
    assert_eq!(f.ingress(&syn).0, TC_ACT_SHOT);
    assert_eq!(f.counter(Counter::DropNoLocalEndpoint), 1);
    let (_, p) = f.syn_to(sa("10.244.1.5:41000"), node_port);
    assert_eq!(endpoint(&p, false), sa("10.244.3.11:8080"));
}

#[test]
fn internal_traffic_policy_local_without_local_endpoint_drops() {
    let Some(mut f) = Fixture::new("itp_local") else {
        return;
    };
    f.addr([10, 96, 0, 10], ADDR_CLUSTER_IP);
    let mut fe = Fe::new(tcp_key(VIP), 1, &[]);
    fe.flags = SVC_F_DROP_EMPTY;
    f.frontend(&fe);
    let syn = Pkt::tcp(sa(CLIENT), sa(VIP), TCP_SYN).build();
    assert_eq!(f.ingress(&syn).0, TC_ACT_SHOT, "dropped, no ICMP");
    assert_eq!(f.egress(&syn).0, TC_ACT_SHOT);
    assert_eq!(f.counter(Counter::DropNoLocalEndpoint), 2);
    assert_eq!(f.counter(Counter::DropNoEndpoint), 0);
}

#[test]
fn load_balancer_source_ranges_drop_other_sources() {
    let Some(mut f) = Fixture::new("source_ranges") else {
        return;
    };
    f.addr([192, 168, 50, 10], ADDR_EXTERNAL);
    let mut fe = Fe::new(tcp_key(LB_IP), 7, &[be("10.244.2.11:8080", true)]);
    fe.flags = SVC_F_EXTERNAL | SVC_F_SRC_RANGES;
    f.frontend(&fe);
    for (net, len) in [([192, 168, 200, 0], 24), ([203, 0, 113, 7], 32)] {
        let key = SrcRangeKey {
            svc_id: 7u32.to_be_bytes(),
            addr: net,
        };
        f.put(Entry::SrcRange(key, len));
    }
    for allowed in ["192.168.200.100:50000", "203.0.113.7:50000"] {
        let (_, p) = f.syn_to(sa(allowed), sa(LB_IP));
        assert_eq!(endpoint(&p, false), sa("10.244.2.11:8080"), "{allowed}");
    }
    for denied in [
        "192.168.201.1:50000",
        "203.0.113.8:50000",
        "10.244.1.5:50000",
    ] {
        let syn = Pkt::tcp(sa(denied), sa(LB_IP), TCP_SYN).build();
        assert_eq!(f.ingress(&syn).0, TC_ACT_SHOT, "{denied}");
    }
    assert_eq!(f.counter(Counter::DropSourceRange), 3);
    // Another service port's ranges do not count.
    let mut other = Fe::new(
        tcp_key("192.168.50.10:80"),
        8,
        &[be("10.244.2.11:8080", true)],
    );
    other.flags = SVC_F_EXTERNAL | SVC_F_SRC_RANGES;
    f.frontend(&other);
    let syn = Pkt::tcp(sa("192.168.200.100:50001"), sa("192.168.50.10:80"), TCP_SYN).build();
    assert_eq!(f.ingress(&syn).0, TC_ACT_SHOT);
}

#[test]
fn clusterip_from_outside_the_cluster_cidr_is_masqueraded_to_remote_backends() {
    let Some(mut f) = Fixture::new("cluster_cidr") else {
        return;
    };
    f.addr([10, 96, 0, 10], ADDR_CLUSTER_IP);
    f.frontend(&Fe::new(tcp_key(VIP), 1, &[be("10.244.2.11:8080", false)]));
    f.frontend(&Fe::new(
        tcp_key("10.96.0.10:81"),
        2,
        &[be("10.244.2.12:8080", true)],
    ));
    let outside = sa("192.168.77.5:40000");

    // Without --cluster-cidr: today's behaviour, the source is kept.
    let (_, p) = f.syn_to(outside, sa(VIP));
    assert_eq!(endpoint(&p, true), outside);

    f.configure(|c| {
        c.flags = CFG_F_CLUSTER_CIDR;
        c.cluster_cidr = [10, 244, 0, 0];
        c.cluster_cidr_len = 16;
    });
    let outside = sa("192.168.77.5:40001");
    let (_, p) = f.syn_to(outside, sa(VIP));
    let snat = endpoint(&p, true);
    assert_eq!(*snat.ip(), Ipv4Addr::from(NODE), "the node's address");
    assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&snat.port()));
    let reply = Pkt::tcp(sa("10.244.2.11:8080"), snat, TCP_SYN | TCP_ACK).build();
    let p = valid(&f.ingress(&reply).1);
    assert_eq!(
        (endpoint(&p, true), endpoint(&p, false)),
        (sa(VIP), outside)
    );
    // A pod keeps its address; so does an outside client of a local backend.
    assert_eq!(endpoint(&f.syn_to(sa(CLIENT), sa(VIP)).1, true), sa(CLIENT));
    let (_, p) = f.syn_to(sa("192.168.77.5:40002"), sa("10.96.0.10:81"));
    assert_eq!(endpoint(&p, true), sa("192.168.77.5:40002"));

    // --masquerade-all: every flow.
    f.configure(|c| c.flags = CFG_F_MASQUERADE_ALL);
    let pod = sa("10.244.1.5:40003");
    assert_eq!(
        *endpoint(&f.syn_to(pod, sa(VIP)).1, true).ip(),
        Ipv4Addr::from(NODE)
    );
}

#[test]
fn unallocated_service_addresses_are_dropped() {
    let Some(mut f) = Fixture::new("unallocated") else {
        return;
    };
    f.services(&[("10.244.2.11:8080", false)]);
    f.configure(|c| {
        c.service_cidrs[0] = [10, 96, 0, 0];
        c.service_cidr_lens[0] = 12;
        c.service_cidrs[1] = [172, 30, 0, 0];
        c.service_cidr_lens[1] = 16;
    });
    for dst in ["10.96.0.99:80", "10.100.1.1:53", "172.30.5.5:443"] {
        let syn = Pkt::tcp(sa(CLIENT), sa(dst), TCP_SYN).build();
        assert_eq!(f.ingress(&syn).0, TC_ACT_SHOT, "{dst}");
        assert_eq!(f.egress(&syn).0, TC_ACT_SHOT, "{dst} from a node process");
    }
    assert_eq!(f.counter(Counter::DropUnallocated), 6);
    // Allocated ones work, their unknown ports are still rejected, and
    // addresses outside the service CIDRs pass.
    assert_eq!(
        endpoint(&f.syn_to(sa(CLIENT), sa(VIP)).1, false),
        sa("10.244.2.11:8080")
    );
    let unknown = Pkt::tcp(sa(CLIENT), sa("10.96.0.10:81"), TCP_SYN).build();
    let (verdict, out) = f.ingress(&unknown);
    assert_port_unreachable(&out, verdict, &unknown);
    let outside = Pkt::tcp(sa(CLIENT), sa("10.112.0.1:80"), TCP_SYN).build();
    assert_eq!(f.ingress(&outside), (TC_ACT_OK, outside));
}

fn key_of(from: SocketAddrV4, to: SocketAddrV4) -> FlowKey {
    FlowKey {
        saddr: from.ip().octets(),
        daddr: to.ip().octets(),
        sport: from.port().to_be_bytes(),
        dport: to.port().to_be_bytes(),
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    }
}

/// `TCX_NEXT` (-1) as BPF_PROG_TEST_RUN reports it: the next program of
/// the hook gets the packet.
const TCX_NEXT: u32 = u32::MAX;

/// During an upgrade to a new map layout the new programs run in front of
/// the older ones. While attached device by device (UPGRADE_ATTACHING)
/// they hand on every packet they would act on (a SYN, here). Then (UPGRADE_OLDER_BEHIND) what they have
/// no entry for, and would pass or track anew, goes to the older programs
/// untouched (a reply, a segment of a flow the older ones translated, a
/// UDP datagram); a SYN opens its flow here (its source port remapped: the
/// older maps may hold a flow of the same port to the same backend), and
/// that flow's packets are served here. Alone again, the same packets are
/// handled as always.
#[test]
fn with_an_older_datapath_behind_misses_go_to_it_and_syns_are_served() {
    let Some(mut f) = Fixture::new("older_behind") else {
        return;
    };
    f.services(&[("10.244.2.11:8080", false)]);
    let mut older: Array<MapData, u32> = f.dp.map(UPGRADE_MAP).unwrap();
    older.set(0, UPGRADE_ATTACHING, 0).unwrap();
    let client = sa("10.244.1.5:40001");
    let syn = Pkt::tcp(client, sa(VIP), TCP_SYN).build();
    for prog in [PROG_INGRESS, PROG_EGRESS] {
        let (verdict, out) = f.run(prog, &syn);
        assert_eq!((verdict, &out), (TCX_NEXT, &syn), "{prog} while attaching");
    }
    older.set(0, UPGRADE_OLDER_BEHIND, 0).unwrap();
    let backend = sa("10.244.2.11:8080");
    let node_port = SocketAddrV4::new(NODE_IP.into(), 30080);
    let deferred = [
        ("a reply", Pkt::tcp(backend, sa(CLIENT), TCP_ACK).build()),
        ("a segment", Pkt::tcp(sa(CLIENT), sa(VIP), TCP_ACK).build()),
        ("a datagram", Pkt::udp(sa(CLIENT), sa(VIP), b"q").build()),
        (
            "a reply to a SNAT port",
            Pkt::tcp(backend, sa("192.168.200.11:61000"), TCP_ACK).build(),
        ),
        (
            "a NodePort segment",
            Pkt::tcp(sa("192.168.200.100:50000"), node_port, TCP_ACK).build(),
        ),
    ];
    for (what, frame) in &deferred {
        let (verdict, out) = f.ingress(frame);
        assert_eq!(verdict, TCX_NEXT, "{what}");
        assert_eq!(&out, frame, "{what}: changed");
    }
    assert_eq!(f.counter(Counter::NewFlow), 0);
    assert_eq!(f.ct.keys().count() + f.rnat.keys().count(), 0);

    let (verdict, out) = f.ingress(&syn);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let p = valid(&out);
    assert_eq!(endpoint(&p, false), backend);
    let remapped = endpoint(&p, true);
    assert_eq!(*remapped.ip(), *client.ip());
    assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&remapped.port()));
    let (_, out) = f.ingress(&Pkt::tcp(backend, remapped, TCP_SYN | TCP_ACK).build());
    let p = valid(&out);
    assert_eq!((endpoint(&p, true), endpoint(&p, false)), (sa(VIP), client));
    let (_, out) = f.ingress(&Pkt::tcp(client, sa(VIP), TCP_ACK).build());
    assert_eq!(endpoint(&valid(&out), false), backend);

    // An entry carried over from the older maps is theirs while they run.
    let carried = sa("10.244.1.5:40002");
    let key = key_of(carried, sa(VIP));
    let mut entry = f.ct.get(&key_of(client, sa(VIP)), 0).unwrap();
    entry.sport = key.sport;
    entry.flags |= NAT_F_CARRIED;
    f.ct.insert(key, entry, 0).unwrap();
    let segment = Pkt::tcp(carried, sa(VIP), TCP_ACK).build();
    assert_eq!(f.ingress(&segment).0, TCX_NEXT, "a carried flow's segment");

    older.set(0, UPGRADE_ALONE, 0).unwrap();
    let (verdict, out) = f.ingress(&segment);
    assert_eq!(verdict, TC_ACT_REDIRECT, "a carried flow's segment, alone");
    assert_eq!(endpoint(&valid(&out), false), backend);
    let (verdict, _) = f.ingress(&deferred[0].1);
    assert_eq!(verdict, TC_ACT_OK, "an unknown reply passes");
    let (verdict, out) = f.ingress(&deferred[1].1);
    assert_eq!(verdict, TC_ACT_REDIRECT, "a segment is tracked anew");
    assert_eq!(endpoint(&valid(&out), false), backend);
    assert_eq!(f.counter(Counter::FlowRecreated), 1);
}
