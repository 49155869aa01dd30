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
