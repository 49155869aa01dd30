//! The probe filters (`proxy_common::filter`) across restarts: every start
//! sets the bits of what the pinned maps hold before its programs run, and
//! the reply sources' bytes before it trusts them, so entries that no
//! filter knew of (written by a version without filters, or behind the
//! writer's back) are found by the new programs. A rebuild clears the bits
//! of what the pins no longer hold and keeps the rest. Run with
//! BPF_PROG_TEST_RUN on the pinned programs, in a network namespace of the
//! test's own, over pins under a directory of its own (removed also on
//! failure).

mod pins;
mod privileged;
use pins::PinDir;
use privileged::privileged;
use std::{
    fs,
    net::{IpAddr, SocketAddrV4},
};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{TestRun, TestRunOptions},
};
use proxy_common::*;
use proxy_userspace::{
    datapath::{Datapath, maps_dir, open_pinned},
    testkit::{
        pktgen::{self, Pkt, TCP_ACK, TCP_SYN},
        testns::NetNsGuard,
    },
};

const CLIENT: &str = "10.244.1.5:40000";
/// A backend no backend map names any more (its endpoint went away while
/// the connection lived), with a reverse-NAT entry.
const GONE_BACKEND: &str = "10.244.3.7:9000";
const VIP: &str = "10.96.0.10:80";
/// A ClusterIP in the address map, no port of it in the service map.
const BARE_VIP: &str = "10.96.0.99:80";

fn sa(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

/// The source of what the ingress program made of `frame`.
fn ingress_source(dp: &Datapath, frame: &[u8]) -> SocketAddrV4 {
    let mut out = vec![0u8; 2048];
    let r = dp
        .program(PROG_INGRESS)
        .unwrap()
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    let p = pktgen::parse(&out).expect("an IPv4 packet");
    SocketAddrV4::new(p.src, p.sport.unwrap())
}

fn unknown_port_drops(root: &std::path::Path) -> u64 {
    let stats: PerCpuArray<MapData, u64> = open_pinned(root, STATS_MAP).unwrap();
    stats
        .get(&(Counter::DropUnknownPort as u32), 0)
        .unwrap()
        .iter()
        .sum()
}

/// What a version without filters leaves: a reverse-NAT entry of a
/// backend that is gone, and a ClusterIP in the address map.
fn write_behind_the_writers_back(root: &std::path::Path) {
    let (client, gone) = (sa(CLIENT), sa(GONE_BACKEND));
    let key = FlowKey {
        saddr: gone.ip().octets(),
        daddr: client.ip().octets(),
        sport: gone.port().to_be_bytes(),
        dport: client.port().to_be_bytes(),
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    };
    let to_client = NatEntry {
        saddr: sa(VIP).ip().octets(),
        daddr: key.daddr,
        sport: sa(VIP).port().to_be_bytes(),
        dport: key.dport,
        svc_id: 1,
        backend_id: 77,
        flags: 0,
        _pad: [0; 3],
    };
    let mut rnat: HashMap<MapData, FlowKey, NatEntry> = open_pinned(root, RNAT_MAP).unwrap();
    rnat.insert(key, to_client, 0).unwrap();
    let mut addrs: HashMap<MapData, AddrKey, AddrValue> = open_pinned(root, ADDR_MAP).unwrap();
    let class = AddrValue {
        class: ADDR_CLUSTER_IP,
        _pad: [0; 3],
    };
    let bare = AddrKey {
        addr: sa(BARE_VIP).ip().octets(),
    };
    addrs.insert(bare, class, 0).unwrap();
}

#[test]
fn a_start_sets_the_bits_of_every_pinned_address_and_reverse_entry() {
    if !privileged("probe_filters_prime") {
        return;
    }
    let _ns = NetNsGuard::new().expect("test namespace");
    let pins = PinDir::new("prime");
    let root = pins.0.as_path();
    let reply = Pkt::tcp(sa(GONE_BACKEND), sa(CLIENT), TCP_ACK).build();
    let to_bare = Pkt::tcp(sa(CLIENT), sa(BARE_VIP), TCP_SYN).build();
    {
        let dp = Datapath::load(root, false, None).expect("load pinned");
        write_behind_the_writers_back(root);
        assert_eq!(
            ingress_source(&dp, &reply),
            sa(GONE_BACKEND),
            "without its bit the entry is not looked up"
        );
        ingress_source(&dp, &to_bare);
        assert_eq!(unknown_port_drops(root), 0, "nor is the address");
    }
    // A version without filters had no such pins.
    for filter in [ADDR_FILTER_MAP, ENDPOINT_FILTER_MAP] {
        fs::remove_file(maps_dir(root).join(filter)).unwrap();
    }
    let mut dp = Datapath::load(root, false, None).expect("load pinned again");
    assert_eq!(
        ingress_source(&dp, &reply),
        sa(VIP),
        "the reply of the pinned flow is translated"
    );
    // Trusting the reply sources marks the pinned entries' first.
    assert_eq!(dp.trust_reply_sources().unwrap(), Some(1));
    assert_eq!(
        ingress_source(&dp, &reply),
        sa(VIP),
        "and with the reply sources trusted"
    );
    let mut out = vec![0u8; 2048];
    dp.program(PROG_INGRESS)
        .unwrap()
        .test_run(TestRunOptions {
            data_in: Some(&to_bare),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    assert_eq!(
        unknown_port_drops(root),
        1,
        "the pinned ClusterIP is one again: its unknown port is refused"
    );
}

/// Whether a pinned filter has `bit` set.
fn pinned_bit(root: &std::path::Path, filter: &str, bit: u32) -> bool {
    let words: Array<MapData, u64> = open_pinned(root, filter).unwrap();
    let (word, mask) = filter_word(bit);
    words.get(&word, 0).unwrap() & mask != 0
}

fn endpoint_slot(s: &str) -> u32 {
    let a = sa(s);
    endpoint_bit(a.ip().octets(), a.port().to_be_bytes())
}

#[test]
fn a_rebuild_clears_the_bits_of_what_no_pin_holds_and_keeps_the_rest() {
    if !privileged("probe_filters_rebuild") {
        return;
    }
    // Once written, then removed: no pinned map holds them any more.
    const STALE_BACKEND: &str = "10.244.9.9:8080";
    const STALE_VIP: &str = "10.96.0.77";
    let _ns = NetNsGuard::new().expect("test namespace");
    let pins = PinDir::new("rebuild");
    let root = pins.0.as_path();
    let mut dp = Datapath::load(root, false, None).expect("load pinned");
    write_behind_the_writers_back(root);
    let mut filters = dp.take_filters().unwrap();
    let stale_vip: std::net::Ipv4Addr = STALE_VIP.parse().unwrap();
    let stale = sa(STALE_BACKEND);
    filters.add_addr(IpAddr::V4(stale_vip)).unwrap();
    filters
        .add_endpoint(IpAddr::V4(*stale.ip()), stale.port().to_be_bytes())
        .unwrap();
    let stale_addr_bit = addr_bit(stale_vip.octets());
    let (kept_addr_bit, kept_endpoint_bit) = (
        addr_bit(sa(BARE_VIP).ip().octets()),
        endpoint_slot(GONE_BACKEND),
    );
    assert_ne!(
        stale_addr_bit, kept_addr_bit,
        "the test's addresses share a bit"
    );
    assert_ne!(endpoint_slot(STALE_BACKEND), kept_endpoint_bit);
    assert!(pinned_bit(root, ADDR_FILTER_MAP, stale_addr_bit));
    assert!(!pinned_bit(root, ADDR_FILTER_MAP, kept_addr_bit));

    let rebuilt = filters.rebuild(&maps_dir(root)).expect("rebuild");

    assert_eq!(
        (rebuilt.addr_bits_cleared, rebuilt.endpoint_bits_cleared),
        (1, 1),
        "{rebuilt:?}"
    );
    assert_eq!(
        rebuilt.bits_set,
        (1, 1),
        "the pins hold one address, one endpoint"
    );
    assert_eq!(filters.bits_set(), rebuilt.bits_set);
    assert!(!pinned_bit(root, ADDR_FILTER_MAP, stale_addr_bit));
    assert!(!pinned_bit(
        root,
        ENDPOINT_FILTER_MAP,
        endpoint_slot(STALE_BACKEND)
    ));
    assert!(pinned_bit(root, ADDR_FILTER_MAP, kept_addr_bit));
    assert!(pinned_bit(root, ENDPOINT_FILTER_MAP, kept_endpoint_bit));
    let reply = Pkt::tcp(sa(GONE_BACKEND), sa(CLIENT), TCP_ACK).build();
    assert_eq!(
        ingress_source(&dp, &reply),
        sa(VIP),
        "the reply of the pinned flow is still translated"
    );
    assert!(!filters.rebuild_due(), "nothing has filled since");
}
