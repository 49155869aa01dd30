//! kube-proxy's Service semantics (issue 10) in the lab, with real sockets:
//! hostNetwork backends, NodePorts dialed from inside, external and
//! load-balancer IPs (also on a node's own address), traffic policies,
//! session affinity, source ranges, cluster-CIDR masquerade and
//! unallocated service addresses.

use std::{net::Ipv4Addr, time::Duration};

use common::*;
use lab::{TcpServer, addr, servers::tcp_request_timeout, tcp_request};

mod common;

/// A connection that must not get through, without waiting long.
const SHORT: Duration = Duration::from_millis(700);

/// One endpoint of a hand-written slice: address, node, ready.
struct Ep<'a>(&'a str, &'a str, bool);

/// A Service (spec lines after `ports`, and an optional status) with one
/// TCP port `port` -> `target`, and its EndpointSlice.
fn service(name: &str, spec: &str, status: &str, port: u16, target: u16, eps: &[Ep]) -> String {
    let mut endpoints = String::new();
    for Ep(ip, node, ready) in eps {
        endpoints.push_str(&format!(
            "  - addresses: [\"{ip}\"]\n    nodeName: {node}\n    conditions: {{ready: {ready}}}\n"
        ));
    }
    if endpoints.is_empty() {
        endpoints = "  []\n".into();
    }
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: lab}}
spec:
  ports: [{{name: main, protocol: TCP, port: {port}, targetPort: {target}}}]
{spec}
{status}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: lab
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports: [{{name: main, protocol: TCP, port: {target}}}]
endpoints:
{endpoints}---
"
    )
}

fn ok(ns: &lab::Netns, to: &str) -> lab::Reply {
    tcp_request(ns, sa(to)).unwrap_or_else(|e| panic!("{} -> {to}: {e:#}", ns.name()))
}

fn blocked(ns: &lab::Netns, to: &str) -> bool {
    tcp_request_timeout(ns, sa(to), SHORT).is_err()
}

const NODE_A: &str = "192.168.200.11";
const NODE_B: &str = "192.168.200.12";

#[test]
fn host_network_backends_and_node_ports_dialed_from_inside() {
    let manifests = [
        // The API server pattern: endpoints on the nodes' own addresses.
        service(
            "api",
            "  clusterIP: 10.96.0.1\n  type: NodePort",
            "",
            443,
            6443,
            &[Ep(NODE_A, addr::NODE_A, true)],
        )
        .replace("targetPort: 6443}", "targetPort: 6443, nodePort: 30443}"),
        service(
            "api-b",
            "  clusterIP: 10.96.0.2",
            "",
            443,
            6443,
            &[Ep(NODE_B, addr::NODE_B, true)],
        ),
        placement_manifests(),
    ]
    .concat();
    let Some(c) = Cluster::start("host_network", &manifests) else {
        return;
    };
    let _host_a =
        TcpServer::start(c.lab.ns(addr::NODE_A), sa("192.168.200.11:6443"), "host-a").unwrap();
    let _host_b =
        TcpServer::start(c.lab.ns(addr::NODE_B), sa("192.168.200.12:6443"), "host-b").unwrap();
    let pod = c.lab.ns(CLIENT_POD);
    let node_a = c.lab.ns(addr::NODE_A);
    let node_b = c.lab.ns(addr::NODE_B);
    // The daemon lets lo take local-source deliveries (a martian otherwise).
    assert_eq!(
        node_a
            .sysctl("net.ipv4.conf.lo.accept_local")
            .unwrap()
            .trim(),
        "1"
    );

    // hostNetwork backend on the client's own node: from a pod (the reply
    // only passes an egress hook) and from a node process (over lo).
    for (ns, who) in [(pod, "pod"), (node_a, "node-a")] {
        let r = ok(ns, "10.96.0.1:443");
        assert_eq!(
            (r.identity.as_str(), r.remote),
            ("host-a", sa("10.96.0.1:443")),
            "{who}"
        );
    }
    assert_eq!(
        *ok(pod, "10.96.0.1:443").seen_peer.ip(),
        CLIENT_POD_IP.parse::<Ipv4Addr>().unwrap()
    );
    // On another node, from both.
    assert_eq!(ok(node_b, "10.96.0.1:443").identity, "host-a");
    assert_eq!(ok(node_a, "10.96.0.2:443").identity, "host-b");
    assert_eq!(ok(pod, "10.96.0.2:443").identity, "host-b");

    // A NodePort on the node's own address, from its processes (over lo),
    // with pod backends here and on the other node, and a hostNetwork one.
    for _ in 0..10 {
        let r = ok(node_a, "192.168.200.11:30010");
        assert_eq!(r.remote, sa("192.168.200.11:30010"));
    }
    assert_eq!(ok(node_a, "192.168.200.11:30012").identity, "web-b1");
    assert_eq!(ok(node_a, "192.168.200.11:30443").identity, "host-a");
    // Another node's address, from a node process and a pod.
    assert_eq!(ok(node_a, "192.168.200.12:30011").identity, "web-a");
    for to in [
        "192.168.200.11:30012",
        "192.168.200.12:30012",
        "192.168.200.11:30443",
    ] {
        ok(pod, to);
    }
    // 127.0.0.1:NodePort is not served, as in kube-proxy's nftables mode.
    assert!(blocked(node_a, "127.0.0.1:30010"));
}

#[test]
fn external_and_load_balancer_ips_take_only_their_ports() {
    let web = [
        Ep("10.244.1.11", addr::NODE_A, true),
        Ep("10.244.2.11", addr::NODE_B, true),
    ];
    let manifests = [
        // An externalIP that is node-a's own address.
        service(
            "ext",
            "  clusterIP: 10.96.0.20\n  externalIPs: [192.168.200.11]",
            "",
            8443,
            8080,
            &web,
        ),
        service(
            "lb",
            "  clusterIP: 10.96.0.21\n  type: LoadBalancer\n  \
             loadBalancerSourceRanges: [192.168.200.100/32, 10.244.0.0/16]",
            "status: {loadBalancer: {ingress: [{ip: 192.168.50.10}]}}",
            80,
            8080,
            &web,
        ),
    ]
    .concat();
    let Some(c) = Cluster::start("external_ips", &manifests) else {
        return;
    };
    let client = c.lab.ns(addr::CLIENT);
    // The LB IP is routed to node-a, as a load balancer would send it.
    client
        .ip(&["route", "add", "192.168.50.10/32", "via", NODE_A])
        .unwrap();
    // The node's own service on another port, and a server the node dials.
    let _ssh = TcpServer::start(c.lab.ns(addr::NODE_A), sa("192.168.200.11:2222"), "sshd").unwrap();
    let _out = TcpServer::start(client, sa("192.168.200.100:8443"), "outside").unwrap();

    let hits = backends_hit(client, sa("192.168.200.11:8443"), 20);
    assert_eq!(
        hits.keys().collect::<Vec<_>>(),
        ["web-a", "web-b1"],
        "{hits:?}"
    );
    assert_eq!(
        ok(client, "192.168.200.11:2222").identity,
        "sshd",
        "other ports untouched"
    );
    let node_a = c.lab.ns(addr::NODE_A);
    let r = ok(node_a, "192.168.200.100:8443");
    assert_eq!(
        r.identity, "outside",
        "the node's own connections still work"
    );
    // Pods and node processes reach the external IP too.
    ok(c.lab.ns(CLIENT_POD), "192.168.200.11:8443");
    ok(c.lab.ns(addr::NODE_B), "192.168.200.11:8443");

    // The LB IP: from the allowed client and pods; node-b is outside the
    // source ranges.
    ok(client, "192.168.50.10:80");
    ok(c.lab.ns(CLIENT_POD), "192.168.50.10:80");
    assert!(blocked(c.lab.ns(addr::NODE_B), "192.168.50.10:80"));
    assert!(
        blocked(client, "192.168.50.10:81"),
        "not a port of the Service"
    );
    // The ranges apply to the LB IP only: the ClusterIP is open.
    ok(c.lab.ns(addr::NODE_B), "10.96.0.21:80");
    let stats = c.cli(addr::NODE_B, &["inspect", "stats"]).unwrap();
    assert!(stats.contains("source_range"), "{stats}");
}

#[test]
fn external_traffic_policy_local_and_session_affinity() {
    let both = [
        Ep("10.244.1.11", addr::NODE_A, true),
        Ep("10.244.2.11", addr::NODE_B, true),
    ];
    let manifests = [
        service(
            "local",
            "  clusterIP: 10.96.0.30\n  type: NodePort\n  externalTrafficPolicy: Local",
            "",
            80,
            8080,
            &both,
        )
        .replace("targetPort: 8080}", "targetPort: 8080, nodePort: 30030}"),
        service(
            "only-b",
            "  clusterIP: 10.96.0.31\n  type: NodePort\n  externalTrafficPolicy: Local",
            "",
            80,
            8080,
            &[Ep("10.244.2.11", addr::NODE_B, true)],
        )
        .replace("targetPort: 8080}", "targetPort: 8080, nodePort: 30031}"),
        service(
            "sticky",
            "  clusterIP: 10.96.0.32\n  sessionAffinity: ClientIP",
            "",
            80,
            8080,
            &[
                Ep("10.244.1.11", addr::NODE_A, true),
                Ep("10.244.2.11", addr::NODE_B, true),
                Ep("10.244.2.12", addr::NODE_B, true),
            ],
        ),
    ]
    .concat();
    // Pods count as internal (all endpoints) when the cluster CIDR is known.
    let Some(c) = Cluster::start_with(
        "etp_local",
        &manifests,
        &["--cluster-cidr", "10.244.0.0/16"],
    ) else {
        return;
    };
    let client = c.lab.ns(addr::CLIENT);
    for (node, backend) in [(NODE_A, "web-a"), (NODE_B, "web-b1")] {
        for _ in 0..5 {
            let r = ok(client, &format!("{node}:30030"));
            assert_eq!(r.identity, backend, "local endpoint only");
            assert_eq!(r.seen_peer.ip(), &addr::CLIENT_IP, "client address kept");
        }
    }
    // No local endpoint on node-a: dropped (no refusal), while node-b and
    // pods (internal traffic, all endpoints) are served.
    let e = tcp_request_timeout(client, sa("192.168.200.11:30031"), SHORT).unwrap_err();
    assert_ne!(
        lab::error_kind(&e),
        Some(std::io::ErrorKind::ConnectionRefused),
        "{e:#}"
    );
    assert_eq!(ok(client, "192.168.200.12:30031").identity, "web-b1");
    assert_eq!(
        ok(c.lab.ns(CLIENT_POD), "192.168.200.11:30031").identity,
        "web-b1"
    );

    // Affinity: one backend for the client pod, until it turns not ready.
    let pod = c.lab.ns(CLIENT_POD);
    let hits = backends_hit(pod, sa("10.96.0.32:80"), 20);
    assert_eq!(hits.len(), 1, "{hits:?}");
    let first = hits.keys().next().unwrap().clone();
    let ip = match first.as_str() {
        "web-a" => "10.244.1.11",
        "web-b1" => "10.244.2.11",
        _ => "10.244.2.12",
    };
    let not_ready = manifests.replace(
        &format!(
            "[\"{ip}\"]\n    nodeName: {}\n    conditions: {{ready: true}}",
            node_of(ip)
        ),
        &format!(
            "[\"{ip}\"]\n    nodeName: {}\n    conditions: {{ready: false}}",
            node_of(ip)
        ),
    );
    assert_ne!(not_ready, manifests);
    c.write_manifests(&not_ready);
    lab::wait_until(
        "the affine backend replaced",
        Duration::from_secs(5),
        || tcp_request(pod, sa("10.96.0.32:80")).is_ok_and(|r| r.identity != first),
    )
    .expect("the affine backend is replaced");
    let hits = backends_hit(pod, sa("10.96.0.32:80"), 10);
    assert_eq!(hits.len(), 1, "sticky again: {hits:?}");
    assert!(!hits.contains_key(&first));
}

fn node_of(pod_ip: &str) -> &'static str {
    if pod_ip.starts_with("10.244.1.") {
        addr::NODE_A
    } else {
        addr::NODE_B
    }
}

#[test]
fn cluster_cidr_masquerade_and_unallocated_service_addresses() {
    let Some(c) = Cluster::start_with(
        "cluster_cidr",
        &placement_manifests(),
        &[
            "--cluster-cidr",
            "10.244.0.0/16",
            "--service-cluster-ip-range",
            "10.96.0.0/16",
        ],
    ) else {
        return;
    };
    let client = c.lab.ns(addr::CLIENT);
    // A router announcing the service range: towards node-a.
    client
        .ip(&["route", "add", "10.96.0.0/16", "via", NODE_A])
        .unwrap();
    let r = ok(client, "10.96.0.12:80");
    assert_eq!(r.identity, "web-b1");
    assert_eq!(
        r.seen_peer.ip().to_string(),
        NODE_A,
        "masqueraded to node-a"
    );
    let r = ok(client, "10.96.0.11:80");
    assert_eq!(
        r.seen_peer.ip(),
        &addr::CLIENT_IP,
        "a local backend sees the client"
    );
    let r = ok(c.lab.ns(CLIENT_POD), "10.96.0.12:80");
    assert_eq!(
        r.seen_peer.ip().to_string(),
        CLIENT_POD_IP,
        "pods are not masqueraded"
    );

    // An address of the service range that no Service holds: dropped on
    // the node, from pods and node processes alike.
    for ns in [c.lab.ns(CLIENT_POD), c.lab.ns(addr::NODE_A), client] {
        assert!(blocked(ns, "10.96.0.99:80"), "{}", ns.name());
    }
    let stats = c.cli(addr::NODE_A, &["inspect", "stats"]).unwrap();
    let line = stats
        .lines()
        .find(|l| l.contains("unallocated_service_ip"))
        .unwrap_or_else(|| panic!("{stats}"));
    assert!(!line.trim_end().ends_with(" 0"), "{line}");
}
