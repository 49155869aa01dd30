//! Exhaustion, in the lab with the real daemons: a conntrack map far
//! smaller than the flows sent through it (`--conntrack-max`), and a SNAT
//! port range of a few ports (`--snat-port-range`). Socket-level load
//! balancing is off so that the client pod's flows take the per-packet
//! path and its conntrack.
//!
//! The daemon binary comes from KEP_BIN (set by `cargo xtask test`), or
//! target/release/kube-ebpf-proxy.

use std::{collections::BTreeMap, time::Instant};

use common::*;
use lab::{
    addr,
    servers::{TcpConn, tcp_request},
};

mod common;

/// The datapath's counters and each LRU map's (entries, max) on `node`.
fn stats(c: &Cluster, node: &str) -> (BTreeMap<String, u64>, BTreeMap<String, (u64, u64)>) {
    let out = c
        .cli(node, &["inspect", "stats", "-o", "json"])
        .expect("inspect stats");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).expect("stats json");
    let mut counters = BTreeMap::new();
    let mut maps = BTreeMap::new();
    for r in &rows {
        if let (Some(name), Some(n)) = (r["counter"].as_str(), r["packets"].as_u64()) {
            counters.insert(name.to_string(), n);
        }
        if let (Some(map), Some(n), Some(max)) =
            (r["map"].as_str(), r["entries"].as_u64(), r["max"].as_u64())
        {
            maps.insert(map.to_string(), (n, max));
        }
    }
    (counters, maps)
}

const CONNTRACK_MAX: u64 = 16;
const LIVE: usize = 6;
const CHURN: usize = 300;

/// The conntrack maps are LRU: beyond their size, new flows evict the least
/// recently used entries instead of failing. Live flows whose entries were
/// evicted are balanced again to the same backend (the pick hashes the
/// tuple), counted as `flow_recreated`, and keep working.
#[test]
fn a_full_conntrack_evicts_and_live_flows_keep_their_backend() {
    let max = CONNTRACK_MAX.to_string();
    let Some(c) = Cluster::start_with(
        "exhaustion_conntrack",
        &placement_manifests(),
        &["--socket-lb=false", "--conntrack-max", &max],
    ) else {
        return;
    };
    let vip = sa("10.96.0.10:80");
    let client = c.lab.ns(CLIENT_POD);
    let (_, maps) = stats(&c, addr::NODE_A);
    for map in ["KEP_CT_V1", "KEP_RNAT_V1", "KEP_CT6_V1", "KEP_RNAT6_V1"] {
        assert_eq!(maps[map].1, CONNTRACK_MAX, "{map}: {maps:?}");
    }

    let mut live: Vec<(TcpConn<_>, String)> = (0..LIVE)
        .map(|_| {
            let mut conn = TcpConn::open(client, vip).expect("live connection");
            let who = conn.request().expect("first request").identity;
            (conn, who)
        })
        .collect();

    // Far more flows than the map holds.
    let started = Instant::now();
    let ok = (0..CHURN)
        .filter(|_| tcp_request(client, vip).is_ok())
        .count();
    let churn_time = started.elapsed();
    let (after_churn, maps) = stats(&c, addr::NODE_A);
    println!(
        "conntrack max {CONNTRACK_MAX}: {ok}/{CHURN} new connections answered in {churn_time:?}; \
         KEP_CT_V1 {:?}, KEP_RNAT_V1 {:?} (entries, max)",
        maps["KEP_CT_V1"], maps["KEP_RNAT_V1"]
    );
    assert_eq!(ok, CHURN, "LRU conntrack: new flows are not refused");
    assert!(maps["KEP_CT_V1"].0 <= CONNTRACK_MAX, "{maps:?}");

    // The live flows' entries were evicted: each keeps its backend.
    for (conn, who) in &mut live {
        let again = conn
            .request()
            .unwrap_or_else(|e| panic!("live flow failed after eviction: {e:#}\n{}", c.logs()));
        assert_eq!(&again.identity, who, "a live flow moved to another backend");
    }
    let (counters, _) = stats(&c, addr::NODE_A);
    let recreated = counters["flow_recreated"];
    println!(
        "{LIVE} live connections kept their backends; flow_recreated {recreated}, new_flow {}, \
         map_error drops {}",
        counters["new_flow"], counters["map_error"]
    );
    assert!(recreated >= LIVE as u64, "{counters:?}");
    assert_eq!(counters["map_error"], after_churn["map_error"]);
    assert_eq!(counters["map_error"], 0, "{counters:?}");
}

const SNAT_PORTS: usize = 4;

/// NodePort flows from outside to a backend on the other node are SNATed
/// to a port of `--snat-port-range`. With 4 ports, 4 connections hold them
/// all: the 5th is dropped and counted as `no_snat_port`, the 4 keep
/// working. Once they close (FINs both ways), their ports are given to new
/// flows: the node recovers as soon as the load is gone.
#[test]
fn an_exhausted_snat_port_range_drops_new_flows_and_keeps_live_ones() {
    let Some(c) = Cluster::start_with(
        "exhaustion_snat",
        &placement_manifests(),
        &["--snat-port-range", "62000-62003"],
    ) else {
        return;
    };
    let client = c.lab.ns(addr::CLIENT);
    let nodeport = std::net::SocketAddrV4::new(addr::NODE_A_IP, 30012);
    let mut live: Vec<TcpConn<_>> = (0..SNAT_PORTS)
        .map(|i| {
            let mut conn = TcpConn::open(client, nodeport)
                .unwrap_or_else(|e| panic!("connection {i}: {e:#}\n{}", c.logs()));
            assert_eq!(conn.request().expect("request").identity, "web-b1");
            conn
        })
        .collect();
    let (before, _) = stats(&c, addr::NODE_A);
    let refused =
        TcpConn::open_timeout(client, nodeport, std::time::Duration::from_millis(1500)).is_err();
    let (after, _) = stats(&c, addr::NODE_A);
    let dropped = after["no_snat_port"] - before["no_snat_port"];
    println!(
        "snat range of {SNAT_PORTS} ports: connection {} refused: {refused}, no_snat_port drops \
         {dropped} (SYN and its retransmissions)",
        SNAT_PORTS + 1
    );
    assert!(refused, "a 5th flow got a port out of 4");
    assert!(dropped >= 1, "{after:?}");
    for conn in &mut live {
        assert_eq!(conn.request().expect("live flow").identity, "web-b1");
    }
    drop(live);
    let started = Instant::now();
    let mut recovered = None;
    while started.elapsed() < std::time::Duration::from_secs(3) {
        if TcpConn::open_timeout(client, nodeport, std::time::Duration::from_millis(300)).is_ok() {
            recovered = Some(started.elapsed());
            break;
        }
    }
    println!("after the 4 connections closed: a new one got through after {recovered:?}");
    let recovered = recovered.expect("no connection got through within 3 s of the others closing");
    let again: Vec<TcpConn<_>> = (0..SNAT_PORTS - 1)
        .map(|i| TcpConn::open(client, nodeport).unwrap_or_else(|e| panic!("again {i}: {e:#}")))
        .collect();
    println!(
        "the first in {recovered:?}, then {} more: all {SNAT_PORTS} ports reused",
        again.len()
    );
}
