//! kube-ebpf-proxy in the lab: the real daemon runs in both node namespaces
//! with a manifest directory, and real TCP and UDP sockets in pod, node and
//! client namespaces prove what reaches which backend.
//!
//! The daemon binary comes from KEP_BIN (set by `cargo xtask test`), or
//! target/release/kube-ebpf-proxy.

use std::{
    collections::BTreeMap,
    fs,
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use common::*;
use lab::{
    Lab, Signal, TcpConn, addr, error_kind, require_root_or_skip, servers::tcp_request_timeout,
    tcp_request, udp_request,
};
use proxy_common::SOCK_PROGS;

mod common;

#[test]
fn clusterip_from_pods_and_node_processes_to_local_and_remote_backends() {
    let Some(c) = Cluster::start("clusterip", &placement_manifests()) else {
        return;
    };
    let pod = c.lab.ns(CLIENT_POD);
    for (vip, backend) in [("10.96.0.11:80", "web-a"), ("10.96.0.12:80", "web-b1")] {
        let r = tcp_request(pod, sa(vip)).unwrap_or_else(|e| panic!("{vip}: {e:#}"));
        assert_eq!(r.identity, backend);
        assert_eq!(
            r.remote,
            sa(vip),
            "the reply comes from the service address"
        );
        assert_eq!(
            *r.seen_peer.ip(),
            CLIENT_POD_IP.parse::<Ipv4Addr>().unwrap()
        );

        let r = udp_request(pod, sa(vip)).unwrap_or_else(|e| panic!("udp {vip}: {e:#}"));
        assert_eq!(r.identity, backend);
        assert_eq!(r.remote, sa(vip));

        // A process of the node itself.
        let node = c.lab.ns(addr::NODE_A);
        let r = tcp_request(node, sa(vip)).unwrap_or_else(|e| panic!("node {vip}: {e:#}"));
        assert_eq!(r.identity, backend);
        assert_eq!(r.remote, sa(vip));
        let r = udp_request(node, sa(vip)).unwrap_or_else(|e| panic!("node udp {vip}: {e:#}"));
        assert_eq!(r.identity, backend);
        assert_eq!(r.remote, sa(vip));
    }
}

#[test]
fn nodeport_from_outside_to_local_and_remote_backends() {
    let Some(c) = Cluster::start("nodeport", &placement_manifests()) else {
        return;
    };
    let client = c.lab.ns(addr::CLIENT);
    let node_a = SocketAddrV4::new(addr::NODE_A_IP, 0);
    // 30011: backend on node-a (local), 30012: backend on node-b (remote).
    for (port, backend, local) in [(30011, "web-a", true), (30012, "web-b1", false)] {
        let target = SocketAddrV4::new(*node_a.ip(), port);
        let r = tcp_request(client, target).unwrap_or_else(|e| panic!("{target}: {e:#}"));
        assert_eq!(r.identity, backend);
        assert_eq!(
            r.remote, target,
            "the reply comes from the node address dialed"
        );
        if local {
            assert_eq!(*r.seen_peer.ip(), addr::CLIENT_IP, "client address kept");
        } else {
            assert_eq!(*r.seen_peer.ip(), addr::NODE_A_IP, "SNATed to node-a");
            assert!(r.seen_peer.port() >= 61000);
        }
        let r = udp_request(client, target).unwrap_or_else(|e| panic!("udp {target}: {e:#}"));
        assert_eq!(r.identity, backend);
        assert_eq!(r.remote, target);
    }
    // Every node answers every NodePort.
    let target = SocketAddrV4::new(addr::NODE_B_IP, 30011);
    let r = tcp_request(client, target).unwrap();
    assert_eq!(r.identity, "web-a");
    assert_eq!(r.remote, target);
    assert_eq!(*r.seen_peer.ip(), addr::NODE_B_IP);
}

/// Packets the host-side veth `dev` of `node` has transmitted.
fn tx_packets(node: &lab::Netns, dev: &str) -> u64 {
    let out = node.ip(&["-j", "-s", "link", "show", "dev", dev]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["stats64"]["tx"]["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("no tx packets in {out}"))
}

#[test]
fn translated_packets_for_a_local_pod_go_straight_into_its_namespace() {
    let Some(c) = Cluster::start("peer", &placement_manifests()) else {
        return;
    };
    // From outside, so the flow is translated per packet with socket-level
    // load balancing on or off: NodePort 30011 of node-a, whose backend
    // web-a is on node-a.
    let client = c.lab.ns(addr::CLIENT);
    let target = SocketAddrV4::new(addr::NODE_A_IP, 30011);
    let node = c.lab.ns(addr::NODE_A);
    let veth = lab::host_veth_name(WEB_A.ip.parse().unwrap());
    // The first request also has node-a resolve web-a's MAC: until then
    // the kernel's neighbour code sends the packets, through the veth.
    tcp_request(client, target).unwrap();
    let before = tx_packets(node, &veth);
    const REQUESTS: u64 = 10;
    for _ in 0..REQUESTS {
        let r = tcp_request(client, target).unwrap();
        assert_eq!(r.identity, WEB_A.name);
        assert_eq!(*r.seen_peer.ip(), addr::CLIENT_IP);
    }
    // Each request is at least 4 packets towards web-a (SYN, ACK, request,
    // FIN). Redirected into the pod's namespace (bpf_redirect_peer), they
    // never pass the host side's transmit; the few left are the
    // neighbour code's (ARP probes).
    let sent = tx_packets(node, &veth) - before;
    assert!(
        sent < REQUESTS,
        "{sent} packets left by {veth}: translated packets went through the host-side veth"
    );
}

#[test]
fn new_connections_spread_and_an_open_one_stays() {
    let Some(c) = Cluster::start("spread", &placement_manifests()) else {
        return;
    };
    let pod = c.lab.ns(CLIENT_POD);
    let vip = sa("10.96.0.10:80");
    let mut open = TcpConn::open(pod, vip).unwrap();
    let pinned = open.request().unwrap().identity;

    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    for i in 0..300 {
        let r = tcp_request(pod, vip).unwrap_or_else(|e| panic!("connection {i}: {e:#}"));
        assert_eq!(r.remote, vip);
        *counts.entry(r.identity).or_default() += 1;
        if i % 50 == 0 {
            assert_eq!(open.request().unwrap().identity, pinned);
        }
    }
    eprintln!("300 connections: {counts:?}");
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (b, n) in &counts {
        let share = *n as f64 / 300.0;
        assert!(
            (0.20..=0.47).contains(&share),
            "{b} got {share:.2}: {counts:?}"
        );
    }
    assert_eq!(
        open.request().unwrap().identity,
        pinned,
        "the open connection stayed"
    );
}

#[test]
fn an_endpoint_turned_not_ready_is_no_longer_chosen_within_a_second() {
    let all = |b2_ready| {
        web(
            vec![(&WEB_A, true), (&WEB_B1, true), (&WEB_B2, b2_ready)],
            "10.96.0.10",
            Some(30010),
        )
    };
    let Some(c) = Cluster::start("not_ready", &all(true)) else {
        return;
    };
    let pod = c.lab.ns(CLIENT_POD);
    let vip = sa("10.96.0.10:80");
    assert!(backends_hit(pod, vip, 60).contains_key("web-b2"));
    let mut open = TcpConn::open(pod, vip).unwrap();
    let first = open.request().unwrap().identity;

    let t0 = Instant::now();
    c.write_manifests(&all(false));
    c.lab
        .wait_for("web-b2 unused", Duration::from_secs(1), || {
            !backends_hit(pod, vip, 15).contains_key("web-b2")
        })
        .unwrap();
    let took = t0.elapsed();
    let hit = backends_hit(pod, vip, 90);
    eprintln!("not-ready endpoint dropped after {took:?}; then {hit:?}");
    assert!(!hit.contains_key("web-b2"), "{hit:?}");
    assert!(took < Duration::from_secs(1));
    // kube-proxy keeps established connections to a not-ready endpoint.
    assert_eq!(open.request().unwrap().identity, first);
}

#[test]
fn a_pod_created_after_the_daemon_started_uses_a_clusterip_within_a_second() {
    let Some(mut c) = Cluster::start("new_pod", &placement_manifests()) else {
        return;
    };
    let t0 = Instant::now();
    let ip = c.lab.add_pod(addr::NODE_B, "late").unwrap();
    let veth = c.lab.pod("late").unwrap().host_veth.clone();
    let links = c.bpffs(addr::NODE_B).join("links");
    c.lab
        .wait_for("programs on the new veth", Duration::from_secs(1), || {
            fs::read_dir(&links)
                .map(|d| {
                    d.flatten().any(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .starts_with(&format!("{veth}@"))
                    })
                })
                .unwrap_or(false)
        })
        .unwrap();
    let attached = t0.elapsed();
    let pod = c.lab.ns("late");
    c.lab
        .wait_for("a request from the new pod", Duration::from_secs(1), || {
            tcp_request_timeout(pod, sa("10.96.0.11:80"), Duration::from_millis(200)).is_ok()
        })
        .unwrap();
    eprintln!(
        "new pod {ip}: attached after {attached:?}, served after {:?}",
        t0.elapsed()
    );
    assert!(t0.elapsed() < Duration::from_secs(1));
    let r = tcp_request(pod, sa("10.96.0.12:80")).unwrap();
    assert_eq!(r.identity, "web-b1");
    assert_eq!(*r.seen_peer.ip(), ip);
}

#[test]
fn no_endpoint_and_unknown_ports_are_refused_like_kube_proxy() {
    let manifests = [
        web(vec![], "10.96.0.20", Some(30020)),
        web(vec![(&WEB_A, false)], "10.96.0.21", None),
        placement_manifests(),
    ]
    .concat();
    let Some(c) = Cluster::start("refused", &manifests) else {
        return;
    };
    let pod = c.lab.ns(CLIENT_POD);
    for target in ["10.96.0.20:80", "10.96.0.21:80", "10.96.0.11:81"] {
        let started = Instant::now();
        let err = tcp_request(pod, sa(target)).expect_err(target);
        assert_eq!(
            error_kind(&err),
            Some(ErrorKind::ConnectionRefused),
            "{target}: {err:#}"
        );
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "refused at once"
        );
        // A connected UDP socket reports the ICMP error as ECONNREFUSED.
        let e = pod.run(|| -> Result<()> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            s.connect(target)?;
            s.send(b"x")?;
            let mut buf = [0u8; 64];
            match s.recv(&mut buf) {
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => Ok(()),
                other => bail!("{target}: expected ECONNREFUSED, got {other:?}"),
            }
        });
        e.unwrap();
    }
    // From outside, a NodePort without endpoint is refused too.
    let err = tcp_request(
        c.lab.ns(addr::CLIENT),
        SocketAddrV4::new(addr::NODE_A_IP, 30020),
    )
    .expect_err("nodeport without endpoints");
    assert_eq!(error_kind(&err), Some(ErrorKind::ConnectionRefused));
    // And the other services keep working.
    assert_eq!(
        tcp_request(pod, sa("10.96.0.11:80")).unwrap().identity,
        "web-a"
    );
}

fn ruleset(ns: &lab::Netns) -> String {
    let mut out = String::new();
    for (cmd, args) in [
        ("iptables-save", &[][..]),
        ("nft", &["list", "ruleset"][..]),
    ] {
        let o = ns
            .exec(cmd, args)
            .unwrap_or_else(|e| panic!("{cmd}: {e:#}"));
        // iptables-save stamps its output with the time.
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            if !line.starts_with('#') {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[test]
fn no_iptables_or_nftables_rule_is_written() {
    if !require_root_or_skip("rules") {
        return;
    }
    let before: Vec<String> = {
        let lab = Lab::new().unwrap();
        addr::NODES.iter().map(|n| ruleset(lab.ns(n))).collect()
    };
    let Some(c) = Cluster::start("rules", &placement_manifests()) else {
        return;
    };
    tcp_request(c.lab.ns(CLIENT_POD), sa("10.96.0.10:80")).unwrap();
    tcp_request(
        c.lab.ns(addr::CLIENT),
        SocketAddrV4::new(addr::NODE_A_IP, 30012),
    )
    .unwrap();
    for (i, n) in addr::NODES.iter().enumerate() {
        assert_eq!(ruleset(c.lab.ns(n)), before[i], "rules changed on {n}");
    }
}

/// Ids of the TCX links pinned under `bpffs` (Debian's bpftool 7.1 does
/// not list TCX attachments in `net show`, so we go through the pins).
fn pinned_link_ids(ns: &lab::Netns, bpffs: &Path) -> Vec<String> {
    let mut ids = Vec::new();
    for pin in fs::read_dir(bpffs.join("links")).unwrap().flatten() {
        let pin = pin.path();
        let out = ns
            .exec(
                "bpftool",
                &["-j", "link", "show", "pinned", pin.to_str().unwrap()],
            )
            .unwrap();
        let json = String::from_utf8_lossy(&out.stdout).into_owned();
        let id = json
            .split("\"id\":")
            .nth(1)
            .and_then(|rest| rest.split([',', '}']).next())
            .unwrap_or_else(|| panic!("no link id in {json}"));
        ids.push(id.trim().to_string());
    }
    ids
}

fn link_exists(ns: &lab::Netns, id: &str) -> bool {
    ns.exec("bpftool", &["link", "show", "id", id]).is_ok()
}

#[test]
fn the_datapath_outlives_the_daemon_and_cleanup_removes_everything() -> Result<()> {
    let Some(mut c) = Cluster::start("cleanup", &placement_manifests()) else {
        return Ok(());
    };
    let pod_ns = CLIENT_POD;
    let vip = sa("10.96.0.12:80");
    tcp_request(c.lab.ns(pod_ns), vip)?;
    // 3 devices on node-a: eth0 with 2 links, the pods' web-a and
    // client-a with their ingress link (and their egress one when socket
    // LB is off for this run), lo's egress, and the socket-level links
    // (one per program, both families) unless socket LB is off.
    let node = c.lab.ns(addr::NODE_A);
    let links = pinned_link_ids(node, &c.bpffs(addr::NODE_A));
    let (pod_links, socket_links) = match socket_lb_on() {
        true => (2, SOCK_PROGS.len()),
        false => (4, 0),
    };
    assert_eq!(links.len(), 3 + pod_links + socket_links, "{links:?}");
    assert!(links.iter().all(|id| link_exists(node, id)));

    c.lab.stop_daemon(addr::NODE_A, Signal::SIGTERM)?;
    let r = tcp_request(c.lab.ns(pod_ns), vip).context("after the daemon exited")?;
    assert_eq!(r.identity, "web-b1");

    let out = c.cli(addr::NODE_A, &["inspect", "services"])?;
    assert!(
        out.contains("10.96.0.12:80"),
        "inspect without daemon:\n{out}"
    );

    c.cli(addr::NODE_A, &["cleanup"])?;
    let node = c.lab.ns(addr::NODE_A);
    let left: Vec<_> = links.iter().filter(|id| link_exists(node, id)).collect();
    assert!(left.is_empty(), "links left after cleanup: {left:?}");
    assert!(!c.bpffs(addr::NODE_A).exists(), "pins and mount removed");
    assert!(
        tcp_request_timeout(c.lab.ns(pod_ns), vip, Duration::from_millis(500)).is_err(),
        "no proxy left on node-a"
    );
    Ok(())
}

#[test]
// Per-packet path (socket-level LB off), IPv4's twin of ipv6.rs's test: a
// pod uploads through a ClusterIP to a backend on the other node while
// node-a's underlay link has an MTU of 1280. Node-a's stack answers the
// pod's 1500-byte DF segments with "fragmentation needed", quoting them as
// translated (to the backend), and that error leaves towards the pod by
// the egress hook: the pod's socket only lowers its MSS if the quote shows
// the ClusterIP it dialed.
fn path_mtu_discovery_works_through_a_clusterip() {
    let manifests = Svc {
        name: "sink",
        cluster_ip: "10.96.0.20",
        port: 80,
        target: 9090,
        protocol: "TCP",
        node_port: None,
        endpoints: vec![(&WEB_B1, true)],
    }
    .yaml();
    let Some(c) = Cluster::start_with("pmtu", &manifests, &["--socket-lb=false"]) else {
        return;
    };
    let sink = SocketAddrV4::new(WEB_B1.ip.parse().unwrap(), 9090);
    upload_over_a_1280_byte_link(&c, sa("10.96.0.20:80").into(), sink.into());
    let route = c
        .lab
        .ns(CLIENT_POD)
        .ip(&["route", "get", "10.96.0.20"])
        .unwrap();
    assert!(
        route.contains("mtu 1280"),
        "the pod learned the path MTU: {route}"
    );
}
