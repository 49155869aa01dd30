//! IPv6 and dual-stack Services in the lab: the real daemon on both nodes,
//! dual-stack pods (every backend serves on its IPv6 address too), real
//! sockets over IPv6.
//!
//! With `--socket-lb` on (the default) pods' and node processes' IPv6
//! sockets are balanced at `connect()`; `cargo xtask test` runs this suite
//! again with it off, for the per-packet path.

use std::{
    io::ErrorKind,
    net::{Ipv6Addr, SocketAddrV6},
    time::{Duration, Instant},
};

use common::*;
use lab::{
    TcpServer, UdpServer, addr, error_kind, servers::tcp_request_timeout, tcp_request, udp_request,
};

mod common;

fn sa6(s: &str) -> SocketAddrV6 {
    s.parse().unwrap()
}

/// The IPv6 address of a backend pod of the fixture.
fn ip6(b: &Backend) -> Ipv6Addr {
    addr::pod_ip6(b.node, b.ip.parse().unwrap()).unwrap()
}

fn client_pod_ip6() -> Ipv6Addr {
    addr::pod_ip6(addr::NODE_A, CLIENT_POD_IP.parse().unwrap()).unwrap()
}

/// A dual-stack Service `name` (TCP or UDP) on `v4` and `v6`, port 80 to
/// 8080, a NodePort, and one slice per family with `backends`.
fn dual(
    name: &str,
    v4: &str,
    v6: &str,
    proto: &str,
    node_port: u16,
    backends: &[&Backend],
) -> String {
    let mut v4_eps = String::new();
    let mut v6_eps = String::new();
    for b in backends {
        v4_eps += &format!("  - {{addresses: [\"{}\"], nodeName: {}}}\n", b.ip, b.node);
        v6_eps += &format!(
            "  - {{addresses: [\"{}\"], nodeName: {}}}\n",
            ip6(b),
            b.node
        );
    }
    if backends.is_empty() {
        v4_eps = "  []\n".into();
        v6_eps = "  []\n".into();
    }
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: lab}}
spec:
  type: NodePort
  clusterIP: {v4}
  clusterIPs: [{v4}, \"{v6}\"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  ports: [{{name: main, protocol: {proto}, port: 80, targetPort: 8080, nodePort: {node_port}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-v4, namespace: lab, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{{name: main, protocol: {proto}, port: 8080}}]
endpoints:
{v4_eps}---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-v6, namespace: lab, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv6
ports: [{{name: main, protocol: {proto}, port: 8080}}]
endpoints:
{v6_eps}---
"
    )
}

/// Services of these tests, TCP and UDP each: `.11` backend on node-a
/// (local to the client pod), `.12` on node-b (remote), `.13` without
/// endpoint.
fn manifests() -> String {
    let mut out = String::new();
    for (proto, n) in [("TCP", 0), ("UDP", 100)] {
        let p = proto.to_lowercase();
        out += &dual(
            &format!("local-{p}"),
            "10.96.0.11",
            "fd00:10:96::11",
            proto,
            30011 + n,
            &[&WEB_A],
        );
        out += &dual(
            &format!("remote-{p}"),
            "10.96.0.12",
            "fd00:10:96::12",
            proto,
            30012 + n,
            &[&WEB_B1],
        );
        out += &dual(
            &format!("empty-{p}"),
            "10.96.0.13",
            "fd00:10:96::13",
            proto,
            30013 + n,
            &[],
        );
    }
    out
}

/// The fixture's backends also serve on their IPv6 addresses.
struct V6Servers {
    _tcp: Vec<TcpServer<SocketAddrV6>>,
    _udp: Vec<UdpServer<SocketAddrV6>>,
}

fn serve_v6(c: &Cluster) -> V6Servers {
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    for b in BACKENDS {
        let at = SocketAddrV6::new(ip6(b), 8080, 0, 0);
        tcp.push(TcpServer::start(c.lab.ns(b.name), at, b.name).unwrap());
        udp.push(UdpServer::start(c.lab.ns(b.name), at, b.name).unwrap());
    }
    V6Servers {
        _tcp: tcp,
        _udp: udp,
    }
}

#[test]
fn a_dual_stack_service_is_programmed_for_both_families() {
    let Some(c) = Cluster::start("ipv6_programmed", &manifests()) else {
        return;
    };
    let services = c.cli(addr::NODE_A, &["inspect", "services"]).unwrap();
    for line in [
        "[fd00:10:96::11]:80",
        "[fd00:10:96::12]:80",
        "[*]:30011",
        "10.96.0.11:80",
        "*:30011",
    ] {
        assert!(services.contains(line), "{line} missing:\n{services}");
    }
    let a6 = format!("[{}]:8080", ip6(&WEB_A));
    let row = services
        .lines()
        .find(|l| l.contains("[fd00:10:96::11]:80") && l.contains("TCP"))
        .unwrap();
    assert!(row.contains(&a6), "{row}");
    assert!(
        !row.contains("10.244."),
        "an IPv6 frontend has IPv6 backends only: {row}"
    );
    let backends = c.cli(addr::NODE_A, &["inspect", "backends"]).unwrap();
    assert!(backends.contains(&a6), "{backends}");
}

#[test]
fn manifests_get_ipv6_cluster_ips_from_the_ipv6_service_cidr() {
    let svc = "apiVersion: v1
kind: Service
metadata: {name: v6only, namespace: lab}
spec: {ipFamilies: [IPv6], ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: dual, namespace: lab}
spec: {clusterIP: 10.96.0.77, ipFamilyPolicy: RequireDualStack, ports: [{port: 80}]}
";
    let Some(c) = Cluster::start_with(
        "ipv6_allocation",
        svc,
        &["--manifest-service-cidrs", "10.96.0.0/12,fd00:10:96::/108"],
    ) else {
        return;
    };
    let services = c.cli(addr::NODE_A, &["inspect", "services"]).unwrap();
    let v6_rows: Vec<&str> = services
        .lines()
        .filter(|l| l.contains("[fd00:10:96::"))
        .collect();
    assert_eq!(v6_rows.len(), 2, "{services}");
    assert!(
        v6_rows.iter().any(|l| l.contains("lab/v6only")),
        "{services}"
    );
    assert!(v6_rows.iter().any(|l| l.contains("lab/dual")), "{services}");
    assert!(services.contains("10.96.0.77:80"), "{services}");
}

#[test]
fn pods_and_node_processes_reach_an_ipv6_clusterip_over_tcp_and_udp() {
    let Some(c) = Cluster::start("ipv6_clusterip", &manifests()) else {
        return;
    };
    let _v6 = serve_v6(&c);
    let pod = c.lab.ns(CLIENT_POD);
    let node = c.lab.ns(addr::NODE_A);
    for (vip, backend) in [
        ("[fd00:10:96::11]:80", "web-a"),
        ("[fd00:10:96::12]:80", "web-b1"),
    ] {
        let vip = sa6(vip);
        let r = tcp_request(pod, vip).unwrap_or_else(|e| panic!("{vip}: {e:#}"));
        assert_eq!((r.identity.as_str(), r.remote), (backend, vip));
        assert_eq!(*r.seen_peer.ip(), client_pod_ip6(), "pod address kept");
        let r = udp_request(pod, vip).unwrap_or_else(|e| panic!("udp {vip}: {e:#}"));
        assert_eq!((r.identity.as_str(), r.remote), (backend, vip));

        let r = tcp_request(node, vip).unwrap_or_else(|e| panic!("node {vip}: {e:#}"));
        assert_eq!((r.identity.as_str(), r.remote), (backend, vip));
        let r = udp_request(node, vip).unwrap_or_else(|e| panic!("node udp {vip}: {e:#}"));
        assert_eq!((r.identity.as_str(), r.remote), (backend, vip));
    }
}

#[test]
fn a_dual_stack_service_answers_on_both_families() {
    let Some(c) = Cluster::start("ipv6_dual", &manifests()) else {
        return;
    };
    let _v6 = serve_v6(&c);
    let pod = c.lab.ns(CLIENT_POD);
    let r4 = tcp_request(pod, sa("10.96.0.12:80")).unwrap();
    let r6 = tcp_request(pod, sa6("[fd00:10:96::12]:80")).unwrap();
    assert_eq!(
        (r4.identity.as_str(), r6.identity.as_str()),
        ("web-b1", "web-b1")
    );
    assert_eq!(r4.remote, sa("10.96.0.12:80"));
    assert_eq!(r6.remote, sa6("[fd00:10:96::12]:80"));
    if socket_lb_on() {
        // connect6 sent the pod straight to the backend: no per-packet
        // translation, so nothing in conntrack.
        return;
    }
    // The per-packet path: `inspect conntrack` shows the flow as the pod
    // sent it and as it was rewritten.
    let ct = c.cli(addr::NODE_A, &["inspect", "conntrack"]).unwrap();
    let flow = format!("[{}]", client_pod_ip6());
    let to_backend = format!("[{}]:8080", ip6(&WEB_B1));
    assert!(
        ct.lines().any(|l| l.contains(&flow)
            && l.contains("[fd00:10:96::12]:80")
            && l.contains(&to_backend)),
        "{ct}"
    );
}

/// The node's metrics tell the families apart: IPv6 flows in the IPv6
/// conntrack, frontends and backends counted per family.
fn assert_metrics_per_family(node: &lab::Netns) {
    let at = "127.0.0.1:10249".parse().unwrap();
    let (status, text) = http_get(node, at, "/metrics").expect("scrape");
    assert_eq!(status, 200);
    let value = |series: &str| -> f64 {
        let line = text.lines().find(|l| l.starts_with(&format!("{series} ")));
        let line = line.unwrap_or_else(|| panic!("{series} missing in\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let ct6 = "kube_ebpf_proxy_conntrack_entries{map=\"KEP_CT6_V1\",ip_family=\"IPv6\"}";
    assert!(value(ct6) >= 1.0, "{ct6}");
    let ct4 = "kube_ebpf_proxy_conntrack_entries{map=\"KEP_CT_V1\",ip_family=\"IPv4\"}";
    assert_eq!(value(ct4), 0.0, "no IPv4 flow yet");
    for family in ["IPv4", "IPv6"] {
        let fe = format!("kube_ebpf_proxy_frontends{{ip_family=\"{family}\"}}");
        assert!(value(&fe) >= 12.0, "{fe}: 6 ClusterIPs and 6 NodePorts");
        let be = format!("kube_ebpf_proxy_backends{{ip_family=\"{family}\"}}");
        assert!(value(&be) >= 4.0, "{be}: 2 pods, TCP and UDP");
    }
}

#[test]
fn nodeport_over_ipv6_from_outside_to_local_and_remote_backends() {
    let Some(c) = Cluster::start("ipv6_nodeport", &manifests()) else {
        return;
    };
    let _v6 = serve_v6(&c);
    let client = c.lab.ns(addr::CLIENT);
    for (port, backend, local) in [(30011, "web-a", true), (30012, "web-b1", false)] {
        let target = SocketAddrV6::new(addr::NODE_A_IP6, port, 0, 0);
        let r = tcp_request(client, target).unwrap_or_else(|e| panic!("{target}: {e:#}"));
        assert_eq!((r.identity.as_str(), r.remote), (backend, target));
        if local {
            assert_eq!(*r.seen_peer.ip(), addr::CLIENT_IP6, "client address kept");
        } else {
            assert_eq!(*r.seen_peer.ip(), addr::NODE_A_IP6, "SNATed to node-a");
        }
        let udp_target = SocketAddrV6::new(addr::NODE_A_IP6, port + 100, 0, 0);
        let r = udp_request(client, udp_target).unwrap_or_else(|e| panic!("{udp_target}: {e:#}"));
        assert_eq!((r.identity.as_str(), r.remote), (backend, udp_target));
    }
    assert_metrics_per_family(c.lab.ns(addr::NODE_A));
    // Every node answers every NodePort.
    let target = SocketAddrV6::new(addr::NODE_B_IP6, 30011, 0, 0);
    let r = tcp_request(client, target).unwrap();
    assert_eq!((r.identity.as_str(), r.remote), ("web-a", target));
}

#[test]
// Refused at connect() by the socket program (connect6), as IPv4 is by
// connect4. Without socket-level load balancing (--socket-lb=false) the
// per-packet path's ICMPv6 error reaches the socket while connect() still
// holds it, Linux keeps it as a soft error (TcpExtLockDroppedIcmps), and
// the SYN retransmitted after 1 s is the one refused.
fn an_ipv6_service_without_endpoint_refuses_at_once() {
    let Some(c) = Cluster::start("ipv6_refused", &manifests()) else {
        return;
    };
    for ns in [addr::NODE_A, CLIENT_POD] {
        let started = Instant::now();
        let err = tcp_request_timeout(
            c.lab.ns(ns),
            sa6("[fd00:10:96::13]:80"),
            Duration::from_secs(3),
        )
        .unwrap_err();
        assert_eq!(
            error_kind(&err),
            Some(ErrorKind::ConnectionRefused),
            "{ns}: {err:#}"
        );
        let took = started.elapsed();
        // See above: without the socket programs, the retransmitted SYN.
        let limit = if socket_lb_on() { 500 } else { 1500 };
        assert!(
            took < Duration::from_millis(limit),
            "{ns}: not at once ({took:?})"
        );
        // A port of the ClusterIP that is no service port: refused too.
        let err = tcp_request_timeout(
            c.lab.ns(ns),
            sa6("[fd00:10:96::11]:81"),
            Duration::from_secs(3),
        )
        .unwrap_err();
        assert_eq!(
            error_kind(&err),
            Some(ErrorKind::ConnectionRefused),
            "{ns}: {err:#}"
        );
    }
}

/// An IPv6-only Service `name`: `spec` lines after `ports`, an optional
/// status, TCP port `port` -> 8080, endpoints (address, node).
fn v6_service(name: &str, spec: &str, status: &str, port: u16, eps: &[(Ipv6Addr, &str)]) -> String {
    let mut endpoints = String::new();
    for (ip, node) in eps {
        endpoints += &format!("  - {{addresses: [\"{ip}\"], nodeName: {node}}}\n");
    }
    if endpoints.is_empty() {
        endpoints = "  []\n".into();
    }
    let target = if spec.contains("hostNetwork") {
        6443
    } else {
        8080
    };
    let spec = spec.replace("hostNetwork", "");
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: lab}}
spec:
  ipFamilies: [IPv6]
  ports: [{{name: main, protocol: TCP, port: {port}, targetPort: {target}}}]
{spec}
{status}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: lab, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv6
ports: [{{name: main, protocol: TCP, port: {target}}}]
endpoints:
{endpoints}---
"
    )
}

#[test]
fn ipv6_external_traffic_policy_local_and_session_affinity() {
    let both = [(ip6(&WEB_A), addr::NODE_A), (ip6(&WEB_B1), addr::NODE_B)];
    let three = [
        (ip6(&WEB_A), addr::NODE_A),
        (ip6(&WEB_B1), addr::NODE_B),
        (ip6(&WEB_B2), addr::NODE_B),
    ];
    let manifests = [
        v6_service(
            "local",
            "  clusterIP: \"fd00:10:96::30\"\n  type: NodePort\n  externalTrafficPolicy: Local",
            "",
            80,
            &both,
        )
        .replace("targetPort: 8080}", "targetPort: 8080, nodePort: 30030}"),
        v6_service(
            "sticky",
            "  clusterIP: \"fd00:10:96::32\"\n  sessionAffinity: ClientIP",
            "",
            80,
            &three,
        ),
    ]
    .concat();
    let Some(c) = Cluster::start_with(
        "ipv6_etp_local",
        &manifests,
        &["--cluster-cidr", "10.244.0.0/16,fd00:10:244::/56"],
    ) else {
        return;
    };
    let _v6 = serve_v6(&c);
    let client = c.lab.ns(addr::CLIENT);
    for (node, backend) in [(addr::NODE_A_IP6, "web-a"), (addr::NODE_B_IP6, "web-b1")] {
        for _ in 0..5 {
            let r = tcp_request(client, SocketAddrV6::new(node, 30030, 0, 0)).unwrap();
            assert_eq!(r.identity, backend, "local endpoint only");
            assert_eq!(*r.seen_peer.ip(), addr::CLIENT_IP6, "client address kept");
        }
    }
    // Affinity: one backend for the client pod, over many connections.
    let pod = c.lab.ns(CLIENT_POD);
    let mut hits = std::collections::BTreeSet::new();
    for _ in 0..20 {
        hits.insert(
            tcp_request(pod, sa6("[fd00:10:96::32]:80"))
                .unwrap()
                .identity,
        );
    }
    assert_eq!(hits.len(), 1, "{hits:?}");
}

#[test]
fn ipv6_source_ranges_and_host_network_backends() {
    let manifests = [
        v6_service(
            "api",
            "  clusterIP: \"fd00:10:96::1\"\n  hostNetwork",
            "",
            443,
            &[(addr::NODE_A_IP6, addr::NODE_A)],
        ),
        v6_service(
            "lb",
            "  clusterIP: \"fd00:10:96::21\"\n  type: LoadBalancer\n  \
             loadBalancerSourceRanges: [\"fd00:200::100/128\"]",
            "status: {loadBalancer: {ingress: [{ip: \"2001:db8:50::10\"}]}}",
            80,
            &[(ip6(&WEB_A), addr::NODE_A), (ip6(&WEB_B1), addr::NODE_B)],
        ),
    ]
    .concat();
    let Some(c) = Cluster::start("ipv6_ranges_host", &manifests) else {
        return;
    };
    let _v6 = serve_v6(&c);
    let _host = TcpServer::start(
        c.lab.ns(addr::NODE_A),
        SocketAddrV6::new(addr::NODE_A_IP6, 6443, 0, 0),
        "host-a",
    )
    .unwrap();
    // hostNetwork backend: from a pod of its node, its node, the other node.
    let api = sa6("[fd00:10:96::1]:443");
    for ns in [CLIENT_POD, addr::NODE_A, addr::NODE_B] {
        let r = tcp_request(c.lab.ns(ns), api).unwrap_or_else(|e| panic!("{ns}: {e:#}"));
        assert_eq!((r.identity.as_str(), r.remote), ("host-a", api), "{ns}");
    }
    // The LB IP is routed to node-a, as a load balancer would send it:
    // the client is in the source ranges, node-b is not.
    let lb = sa6("[2001:db8:50::10]:80");
    for ns in [addr::CLIENT, addr::NODE_B] {
        c.lab
            .ns(ns)
            .ip(&[
                "-6",
                "route",
                "add",
                "2001:db8:50::10/128",
                "via",
                "fd00:200::11",
            ])
            .unwrap();
    }
    let r = tcp_request(c.lab.ns(addr::CLIENT), lb).unwrap();
    assert_eq!(r.remote, lb);
    let blocked = tcp_request_timeout(c.lab.ns(addr::NODE_B), lb, Duration::from_millis(700));
    assert!(blocked.is_err(), "outside the source ranges: {blocked:?}");
}

#[test]
fn ipv6_cluster_cidr_masquerade_and_unallocated_service_addresses() {
    let Some(c) = Cluster::start_with(
        "ipv6_cluster_cidr",
        &manifests(),
        &[
            "--cluster-cidr",
            "10.244.0.0/16,fd00:10:244::/56",
            "--service-cluster-ip-range",
            "10.96.0.0/16,fd00:10:96::/112",
        ],
    ) else {
        return;
    };
    let _v6 = serve_v6(&c);
    let client = c.lab.ns(addr::CLIENT);
    // A router announcing the IPv6 service range: towards node-a.
    client
        .ip(&[
            "-6",
            "route",
            "add",
            "fd00:10:96::/112",
            "via",
            "fd00:200::11",
        ])
        .unwrap();
    let r = tcp_request(client, sa6("[fd00:10:96::12]:80")).unwrap();
    assert_eq!(r.identity, "web-b1");
    assert_eq!(*r.seen_peer.ip(), addr::NODE_A_IP6, "masqueraded to node-a");
    let r = tcp_request(client, sa6("[fd00:10:96::11]:80")).unwrap();
    assert_eq!(
        *r.seen_peer.ip(),
        addr::CLIENT_IP6,
        "a local backend sees the client"
    );
    let r = tcp_request(c.lab.ns(CLIENT_POD), sa6("[fd00:10:96::12]:80")).unwrap();
    assert_eq!(
        *r.seen_peer.ip(),
        client_pod_ip6(),
        "pods are not masqueraded"
    );

    // An address of the IPv6 service range that no Service holds: dropped
    // on the node, from pods, node processes and outside alike.
    for ns in [CLIENT_POD, addr::NODE_A, addr::CLIENT] {
        let r = tcp_request_timeout(
            c.lab.ns(ns),
            sa6("[fd00:10:96::99]:80"),
            Duration::from_millis(700),
        );
        assert!(r.is_err(), "{ns}: {r:?}");
    }
    let stats = c.cli(addr::NODE_A, &["inspect", "stats"]).unwrap();
    let line = stats
        .lines()
        .find(|l| l.contains("unallocated_service_ip"))
        .unwrap_or_else(|| panic!("{stats}"));
    assert!(!line.trim_end().ends_with(" 0"), "{line}");
}

#[test]
fn ipv6_node_ports_and_external_ips_dialed_from_inside() {
    let manifests = [
        manifests(),
        v6_service(
            "ext",
            "  clusterIP: \"fd00:10:96::20\"\n  externalIPs: [\"fd00:200::11\"]",
            "",
            8443,
            &[(ip6(&WEB_B1), addr::NODE_B)],
        ),
    ]
    .concat();
    let Some(c) = Cluster::start("ipv6_from_inside", &manifests) else {
        return;
    };
    let _v6 = serve_v6(&c);
    let node_a = c.lab.ns(addr::NODE_A);
    let pod = c.lab.ns(CLIENT_POD);
    // A node process to its own address's NodePort, and to the other
    // node's; a pod to both.
    for (ns, who) in [(node_a, "node-a"), (pod, "pod")] {
        for (node, port, backend) in [
            (addr::NODE_A_IP6, 30011, "web-a"),
            (addr::NODE_A_IP6, 30012, "web-b1"),
            (addr::NODE_B_IP6, 30011, "web-a"),
        ] {
            let to = SocketAddrV6::new(node, port, 0, 0);
            let r = tcp_request(ns, to).unwrap_or_else(|e| panic!("{who} -> {to}: {e:#}"));
            assert_eq!((r.identity.as_str(), r.remote), (backend, to), "{who}");
        }
    }
    // An externalIP that is node-a's own address, from the client.
    let to = sa6("[fd00:200::11]:8443");
    let r = tcp_request(c.lab.ns(addr::CLIENT), to).unwrap();
    assert_eq!((r.identity.as_str(), r.remote), ("web-b1", to));
}

#[test]
// Per-packet path (socket-level LB off): a pod uploads through an IPv6
// ClusterIP to a backend on the other node while node-a's underlay link
// has an MTU of 1280. Node-a's stack answers the pod's 1500-byte segments
// with Packet Too Big, quoting them as translated (to the backend); the
// pod's socket only finds it, and lowers its MSS, if the quote shows the
// ClusterIP it dialed.
fn path_mtu_discovery_works_through_an_ipv6_clusterip() {
    let Some(c) = Cluster::start_with("ipv6_pmtu", &manifests(), &["--socket-lb=false"]) else {
        return;
    };
    upload_over_a_1280_byte_link(
        &c,
        sa6("[fd00:10:96::12]:80").into(),
        SocketAddrV6::new(ip6(&WEB_B1), 8080, 0, 0).into(),
    );
    let route = c
        .lab
        .ns(CLIENT_POD)
        .ip(&["-6", "route", "get", "fd00:10:96::12"])
        .unwrap();
    assert!(
        route.contains("mtu 1280"),
        "the pod learned the path MTU: {route}"
    );
}

/// IPv6-only Services of [`an_ipv6_only_node_serves_its_services`]:
/// `name`, its ClusterIP, its NodePort, its one backend.
fn v6_only(name: &str, cluster_ip: &str, node_port: u16, backend: &Backend) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: lab}}
spec:
  type: NodePort
  clusterIP: \"{cluster_ip}\"
  clusterIPs: [\"{cluster_ip}\"]
  ipFamilies: [IPv6]
  ipFamilyPolicy: SingleStack
  ports: [{{name: main, protocol: TCP, port: 80, targetPort: 8080, nodePort: {node_port}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: lab, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv6
ports: [{{name: main, protocol: TCP, port: 8080}}]
endpoints:
  - {{addresses: [\"{}\"], nodeName: {}}}
---
",
        ip6(backend),
        backend.node
    )
}

#[test]
// A node without IPv4: node-a's underlay device has no IPv4 address and
// node-a no IPv4 default route before its daemon starts (its pods keep
// their IPv4 addresses, unused here). IPv6-only Services answer from a pod
// of that node (ClusterIP) and from outside (its NodePort), to a backend on
// the node and to one on the other node.
fn an_ipv6_only_node_serves_its_services() {
    let Some(mut c) = Cluster::build("ipv6_only_node") else {
        return;
    };
    let _v6 = serve_v6(&c);
    let node_a = c.lab.ns(addr::NODE_A);
    node_a
        .ip(&["-4", "addr", "flush", "dev", lab::ETH0])
        .unwrap();
    let _ = node_a.ip(&["-4", "route", "del", "default"]);
    let left = node_a
        .ip(&["-4", "-o", "addr", "show", "scope", "global"])
        .unwrap();
    assert!(left.trim().is_empty(), "node-a keeps IPv4: {left}");
    c.write_manifests(
        &[
            v6_only("only-local", "fd00:10:96::21", 30021, &WEB_A),
            v6_only("only-remote", "fd00:10:96::22", 30022, &WEB_B1),
        ]
        .concat(),
    );
    c.start_daemons();
    let client = c.lab.ns(addr::CLIENT);
    for (vip, node_port, backend) in [
        ("[fd00:10:96::21]:80", 30021, "web-a"),
        ("[fd00:10:96::22]:80", 30022, "web-b1"),
    ] {
        let r = tcp_request(c.lab.ns(CLIENT_POD), sa6(vip))
            .unwrap_or_else(|e| panic!("pod to {vip}: {e:#}\n{}", c.logs()));
        assert_eq!(r.identity, backend, "pod to {vip}");
        let target = SocketAddrV6::new(addr::NODE_A_IP6, node_port, 0, 0);
        let r = tcp_request(client, target)
            .unwrap_or_else(|e| panic!("outside to {target}: {e:#}\n{}", c.logs()));
        assert_eq!(r.identity, backend, "outside to {target}");
    }
    assert!(
        c.lab.daemon_exited(addr::NODE_A).is_none(),
        "the daemon of the IPv6-only node runs"
    );
}

#[test]
// A UDP datagram larger than the link's MTU leaves the client pod in
// fragments, on both families. With socket-level load balancing off the
// later fragments (no UDP header) follow their first through the datapath
// to the same backend, which reassembles the datagram and answers from the
// ClusterIP; with it on, the socket sends to the backend itself.
fn fragmented_datagrams_reach_the_backend_on_both_families() {
    let Some(c) = Cluster::start("fragments", &manifests()) else {
        return;
    };
    let _v6 = serve_v6(&c);
    for vip in ["10.96.0.12:80", "[fd00:10:96::12]:80"] {
        let vip: std::net::SocketAddr = vip.parse().unwrap();
        let got = c.lab.ns(CLIENT_POD).run(|| -> std::io::Result<_> {
            let any = if vip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
            let s = std::net::UdpSocket::bind(any)?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.send_to(&[b'x'; 4000], vip)?;
            let mut buf = [0u8; 2048];
            let (n, from) = s.recv_from(&mut buf)?;
            Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
        });
        let (reply, from) =
            got.unwrap_or_else(|e| panic!("a 4000-byte datagram to {vip}: {e}\n{}", c.logs()));
        assert!(reply.starts_with("web-b1 "), "{vip}: {reply:?}");
        assert_eq!(from, vip, "answered from the ClusterIP");
    }
}
