//! Socket-level load balancing in the lab: each node's pods and processes
//! live in a cgroup the lab made, the daemon attaches its cgroup programs
//! there, and real sockets show what they do.
//!
//! The daemon binary comes from KEP_BIN (set by `cargo xtask test`), or
//! target/release/kube-ebpf-proxy.

use std::collections::BTreeMap;
use std::fs;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use aya::programs::{SchedClassifier, TcAttachType};
use common::*;
use lab::{
    ETH0, Lab, Netns, Reply, Signal, TcpConn, TcpServer, addr, cgroup2_mount, error_kind,
    host_veth_name, require_root_or_skip, tcp_request, udp_request,
};
use proxy_common::SOCK_PROGS;

mod common;

const OFF: &[&str] = &["--socket-lb=false"];

fn conntrack_entries(c: &Cluster, node: &str) -> usize {
    let out = c
        .cli(node, &["inspect", "conntrack", "-o", "json"])
        .expect("inspect conntrack");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).expect("conntrack json");
    rows.len()
}

/// One request over a connected UDP socket: `remote` is what
/// `getpeername()` says, and the reply must come from there (the kernel
/// drops datagrams from any other source on a connected socket).
fn udp_connected_request(ns: &Netns, target: SocketAddrV4) -> Result<Reply> {
    let socket = ns.run(|| -> std::io::Result<UdpSocket> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect(target)?;
        Ok(s)
    })?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    socket.send(b"ping\n")?;
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf).context("connected udp reply")?;
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    let (identity, peer) = text.rsplit_once(' ').context("malformed reply")?;
    let v4 = |a: std::net::SocketAddr| match a {
        std::net::SocketAddr::V4(a) => a,
        other => panic!("{other} is not IPv4"),
    };
    Ok(Reply {
        identity: identity.to_string(),
        seen_peer: peer.trim().parse()?,
        local: v4(socket.local_addr()?),
        remote: v4(socket.peer_addr()?),
    })
}

type Request = fn(&Netns, SocketAddrV4) -> Result<Reply>;

/// Requests of every kind from `ns` to a ClusterIP whose one backend is
/// `backend`; each reply must come from the service address and show the
/// client's own address to the backend. Returns how many were sent.
fn every_kind_of_request(ns: &Netns, vip: SocketAddrV4, backend: &str, client: Ipv4Addr) -> u64 {
    let requests: [(&str, Request); 3] = [
        ("tcp", tcp_request),
        ("unconnected udp", udp_request),
        ("connected udp", udp_connected_request),
    ];
    for (kind, request) in requests {
        let r = request(ns, vip).unwrap_or_else(|e| panic!("{kind} to {vip}: {e:#}"));
        assert_eq!(r.identity, backend, "{kind} to {vip}");
        assert_eq!(r.remote, vip, "{kind}: the peer is the service address");
        assert_eq!(*r.seen_peer.ip(), client, "{kind}: client address kept");
    }
    requests.len() as u64
}

/// Ids of the programs attached to a cgroup, by attach type.
fn cgroup_programs(ns: &Netns, group: &Path) -> BTreeMap<String, String> {
    let out = ns
        .exec(
            "bpftool",
            &["-j", "cgroup", "show", group.to_str().unwrap()],
        )
        .expect("bpftool cgroup show");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if text.trim().is_empty() {
        return BTreeMap::new();
    }
    let rows: Vec<serde_json::Value> = serde_json::from_str(&text).expect("bpftool json");
    rows.iter()
        .map(|r| {
            (
                r["attach_type"].as_str().unwrap().to_string(),
                r["id"].to_string(),
            )
        })
        .collect()
}

/// The socket hooks, as bpftool names their attach types.
const SOCK_HOOKS: [&str; 4] = [
    "cgroup_inet4_connect",
    "cgroup_udp4_sendmsg",
    "cgroup_udp4_recvmsg",
    "cgroup_inet4_getpeername",
];

/// The cgroup v2 group of the calling thread.
fn thread_group() -> String {
    let text = fs::read_to_string("/proc/thread-self/cgroup").unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("cgroup v2 line")
        .to_string()
}

fn relative(group: &Path) -> String {
    let mount = cgroup2_mount().expect("cgroup2 mounted");
    format!("/{}", group.strip_prefix(&mount).unwrap().display())
}

#[test]
fn lab_puts_each_nodes_pods_and_processes_in_a_group_of_its_own() {
    if !require_root_or_skip("lab cgroups") {
        return;
    }
    assert!(cgroup2_mount().is_some(), "this machine kind has cgroup v2");
    let before = thread_group();
    let mut lab = Lab::new().unwrap();
    lab.add_pod(addr::NODE_A, "pod-a").unwrap();
    lab.add_pod(addr::NODE_B, "pod-b").unwrap();
    let group_a = lab.cgroup(addr::NODE_A).unwrap().to_path_buf();
    let group_b = lab.cgroup(addr::NODE_B).unwrap().to_path_buf();
    assert_ne!(group_a, group_b);
    assert_eq!(
        fs::read_to_string(group_a.join("cgroup.type"))
            .unwrap()
            .trim(),
        "threaded"
    );
    for (ns, group) in [
        (addr::NODE_A, Some(&group_a)),
        ("pod-a", Some(&group_a)),
        (addr::NODE_B, Some(&group_b)),
        ("pod-b", Some(&group_b)),
        (addr::CLIENT, None),
    ] {
        let seen = lab.ns(ns).run(thread_group);
        match group {
            Some(g) => assert_eq!(seen, relative(g), "a thread in {ns}"),
            None => {
                assert_ne!(seen, relative(&group_a));
                assert_ne!(seen, relative(&group_b));
            }
        }
    }
    // A process started in a pod's namespace is in its node's group too.
    let out = lab.ns("pod-b").exec("cat", &["/proc/self/cgroup"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l == format!("0::{}", relative(&group_b))),
        "{text}"
    );
    drop(lab);
    assert!(!group_a.exists() && !group_b.exists(), "groups removed");
    assert_eq!(thread_group(), before, "the test process moved back");
}

/// ClusterIP from a pod and from a process of the node, to a local and a
/// remote backend: TCP, unconnected and connected UDP. With socket-level
/// load balancing the sockets are connected to the backend itself: the
/// per-packet path balances nothing and tracks no flow; without it, the
/// per-packet path does the same work and the sockets see the same.
fn clusterip_both_ways(test: &str, extra: &[&str]) -> (Cluster, u64) {
    let c = Cluster::start_with(test, &placement_manifests(), extra).expect("root");
    let sent = requests_to_both_backends(&c);
    (c, sent)
}

/// Every kind of request from the client pod and from node-a's own
/// namespace to a Service of a backend of node-a and one of node-b.
fn requests_to_both_backends(c: &Cluster) -> u64 {
    let client_pod: Ipv4Addr = CLIENT_POD_IP.parse().unwrap();
    let mut sent = 0;
    for (vip, backend) in [("10.96.0.11:80", "web-a"), ("10.96.0.12:80", "web-b1")] {
        sent += every_kind_of_request(c.lab.ns(CLIENT_POD), sa(vip), backend, client_pod);
        sent += every_kind_of_request(c.lab.ns(addr::NODE_A), sa(vip), backend, addr::NODE_A_IP);
    }
    sent
}

#[test]
fn clusterip_sockets_connect_straight_to_the_backend() {
    if !require_root_or_skip("socket lb clusterip") {
        return;
    }
    let (c, sent) = clusterip_both_ways("sock-clusterip", &[]);
    let group = c.lab.cgroup(addr::NODE_A).unwrap();
    let attached = cgroup_programs(c.lab.ns(addr::NODE_A), group);
    for hook in SOCK_HOOKS {
        assert!(attached.contains_key(hook), "{hook} attached: {attached:?}");
    }
    for node in addr::NODES {
        let n = c.counters(node);
        assert_eq!(
            n["new_flow"], 0,
            "{node}: the per-packet path balanced nothing"
        );
        assert_eq!(n["forward"], 0, "{node}: no packet translated: {n:?}");
        assert_eq!(conntrack_entries(&c, node), 0, "{node}: no flow tracked");
    }
    // Connected UDP sends go through connect(), unconnected ones through
    // sendmsg(): one socket-level decision per request.
    let n = c.counters(addr::NODE_A);
    assert!(n["socket_lb"] >= sent, "{sent} requests, {n:?}");
}

#[test]
fn clusterip_sockets_see_the_same_with_socket_lb_off() {
    if !require_root_or_skip("socket lb off clusterip") {
        return;
    }
    let (c, sent) = clusterip_both_ways("sock-off-clusterip", OFF);
    let group = c.lab.cgroup(addr::NODE_A).unwrap();
    assert!(
        cgroup_programs(c.lab.ns(addr::NODE_A), group).is_empty(),
        "nothing attached to the node's cgroup"
    );
    let n = c.counters(addr::NODE_A);
    assert_eq!(n["socket_lb"], 0);
    assert!(n["new_flow"] >= sent, "{sent} requests, {n:?}");
}

/// Packets the kernel forwarded in `ns` so far (`Ip: ForwDatagrams` of the
/// namespace's /proc/net/snmp; thread-self: /proc/self/net is the main
/// thread's namespace).
fn forwarded_datagrams(ns: &Netns) -> u64 {
    let snmp = ns
        .run(|| fs::read_to_string("/proc/thread-self/net/snmp"))
        .expect("/proc/net/snmp");
    let mut ip = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (ip.next().unwrap(), ip.next().unwrap());
    let at = names
        .split_whitespace()
        .position(|n| n == "ForwDatagrams")
        .expect("ForwDatagrams column");
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

/// Both nodes' forwarded packets while `traffic` runs.
fn forwarded_during(c: &Cluster, traffic: impl FnOnce()) -> u64 {
    let total = |c: &Cluster| -> u64 {
        addr::NODES
            .iter()
            .map(|n| forwarded_datagrams(c.lab.ns(n)))
            .sum()
    };
    let before = total(c);
    traffic();
    total(c) - before
}

/// BPF host routing: socket-balanced traffic (a pod to a local and a
/// remote backend, a node process to a remote one; TCP, connected and
/// unconnected UDP) is sent on by the ingress hook's FIB lookup and
/// redirect, so neither node's stack forwards one packet of it: with
/// `--bpf-host-routing=true`, and with the default (`auto`) on these nodes,
/// whose netfilter hooks have no rules. With `false` the stacks forward
/// every one; the sockets see the same. Traffic to a pod address and port
/// no Service names still takes the stack's path.
#[test]
fn bpf_host_routing_takes_socket_balanced_traffic_past_the_stacks_forwarding() {
    if !require_root_or_skip("bpf host routing") {
        return;
    }
    let mut forwarded = Vec::new();
    let modes: [&[&str]; 3] = [
        &["--bpf-host-routing=true"],
        &[],
        &["--bpf-host-routing=false"],
    ];
    for extra in modes {
        let c = Cluster::start_with("host-routing", &placement_manifests(), extra).expect("root");
        let mut sent = 0;
        let n = forwarded_during(&c, || sent = requests_to_both_backends(&c));
        forwarded.push((n, sent));
        if extra.is_empty() {
            assert_eq!(host_routing_gauge(&c), "1", "auto, without netfilter rules");
            let elsewhere = forwarded_during(&c, || {
                c.lab.ns(CLIENT_POD).run(|| {
                    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                    s.send_to(b"x", (WEB_B1.ip, 9)).unwrap();
                });
            });
            eprintln!("a datagram to a port no Service names: {elsewhere} forwarded");
            assert!(
                elsewhere >= 2,
                "a datagram to a port no Service names is forwarded by both nodes: {elsewhere}"
            );
        }
    }
    let [(forced, sent), (auto, _), (off, _)] = forwarded[..] else {
        unreachable!()
    };
    eprintln!(
        "packets forwarded by the stacks for {sent} requests: {forced} with host routing, \
         {auto} with auto, {off} without"
    );
    assert_eq!(
        (forced, auto),
        (0, 0),
        "host routing: the stacks forwarded nothing of {sent} requests"
    );
    assert!(
        off >= sent,
        "without host routing the stacks forward every request's packets: {off} for {sent}"
    );
}

/// node-a's `kube_ebpf_proxy_bpf_host_routing` gauge.
fn host_routing_gauge(c: &Cluster) -> String {
    let metrics = http_metrics(c.lab.ns(addr::NODE_A));
    let line = metrics
        .lines()
        .find(|l| l.starts_with("kube_ebpf_proxy_bpf_host_routing "))
        .unwrap_or_else(|| panic!("no host-routing gauge:\n{metrics}"));
    line.rsplit(' ').next().unwrap().to_string()
}

/// Runs `program` in node-a's namespace; it must succeed.
fn on_node_a(c: &Cluster, program: &str, args: &[&str]) -> String {
    let out = c.lab.ns(addr::NODE_A).exec(program, args).expect(program);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits for node-a's host-routing gauge to read `want`; returns how long
/// it took.
fn host_routing_becomes(c: &Cluster, want: &str, why: &str) -> Duration {
    let started = Instant::now();
    c.lab
        .wait_for(why, Duration::from_secs(10), || {
            host_routing_gauge(c) == want
        })
        .unwrap_or_else(|e| panic!("{e:#}"));
    started.elapsed()
}

/// The packets a rule's counter shows in `listing` (`nft list` or
/// `iptables -v -x` output), summed over its counters.
fn counted_packets(listing: &str, after: &str) -> u64 {
    let words: Vec<&str> = listing.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| w[0] == after)
        .filter_map(|w| w[1].parse::<u64>().ok())
        .sum()
}

/// `--bpf-host-routing=auto` yields to netfilter: a counting rule on
/// node-a's forward hook (where a CNI enforces NetworkPolicy) turns host
/// routing off on node-a, so the rule sees the pod's socket-balanced
/// requests; when it goes, host routing is back on. nftables announces its
/// change at once; an iptables-legacy rule, which nothing announces, is
/// seen at the next tick (2 s). A rule on the input hook (a host firewall)
/// leaves host routing on.
#[test]
fn bpf_host_routing_auto_yields_to_netfilter_rules_on_the_forwarding_path() {
    if !require_root_or_skip("bpf host routing auto") {
        return;
    }
    let c = Cluster::start_with("host-routing-auto", &placement_manifests(), &[]).expect("root");
    let client_pod: Ipv4Addr = CLIENT_POD_IP.parse().unwrap();
    let pod_requests = |c: &Cluster| {
        let mut sent = 0;
        for (vip, backend) in [("10.96.0.11:80", "web-a"), ("10.96.0.12:80", "web-b1")] {
            sent += every_kind_of_request(c.lab.ns(CLIENT_POD), sa(vip), backend, client_pod);
        }
        sent
    };
    assert_eq!(host_routing_gauge(&c), "1");

    let firewall = "add table inet host; add chain inet host in \
                    { type filter hook input priority 0; }; add rule inet host in counter";
    on_node_a(&c, "nft", &[firewall]);
    let ruleset = "add table inet cni; add chain inet cni relay \
                   { type filter hook forward priority 0; }; add rule inet cni relay counter";
    on_node_a(&c, "nft", &[ruleset]);
    let took = host_routing_becomes(&c, "0", "host routing off for an nftables forward rule");
    eprintln!("nftables rule: host routing off after {took:?}");
    let sent = pod_requests(&c);
    let listing = on_node_a(&c, "nft", &["list", "chain", "inet", "cni", "relay"]);
    let counted = counted_packets(&listing, "packets");
    eprintln!("the forward rule counted {counted} packets of {sent} requests");
    assert!(
        counted >= 2 * sent,
        "the rule sees every request and reply: {counted} packets for {sent} requests"
    );
    on_node_a(&c, "nft", &["delete table inet cni"]);
    let took = host_routing_becomes(&c, "1", "host routing on when the rule goes");
    eprintln!("nftables rule gone: host routing on after {took:?}");
    let before = forwarded_datagrams(c.lab.ns(addr::NODE_A));
    pod_requests(&c);
    assert_eq!(
        forwarded_datagrams(c.lab.ns(addr::NODE_A)),
        before,
        "node-a's stack forwards nothing again"
    );

    on_node_a(&c, "iptables-legacy", &["-A", "FORWARD", "-j", "ACCEPT"]);
    let took = host_routing_becomes(&c, "0", "host routing off for an iptables-legacy rule");
    eprintln!("iptables-legacy rule: host routing off after {took:?}");
    let sent = pod_requests(&c);
    let listing = on_node_a(&c, "iptables-legacy", &["-L", "FORWARD", "-v", "-x", "-n"]);
    let counted: u64 = listing
        .lines()
        .filter(|l| l.contains("ACCEPT"))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    assert!(
        counted >= 2 * sent,
        "the legacy rule sees every request and reply: {counted} packets for {sent} requests"
    );
    on_node_a(&c, "iptables-legacy", &["-F", "FORWARD"]);
    host_routing_becomes(&c, "1", "host routing on when the legacy rule goes");
    let log = c.lab.daemon_log(addr::NODE_A);
    assert!(
        log.contains("iptables-legacy table filter: the built-in forward chain has rules"),
        "the reason is logged:\n{log}"
    );
}

/// A pod dialing a NodePort on its own node's address is connected to the
/// backend at the socket; on another node's address the request is served
/// too. Either way the reply comes from the address dialed.
fn nodeport_from_pod(extra: &[&str]) -> Cluster {
    let c = Cluster::start_with("sock-nodeport", &placement_manifests(), extra).expect("root");
    let pod = c.lab.ns(CLIENT_POD);
    for (node_ip, port, backend) in [
        (addr::NODE_A_IP, 30011, "web-a"),
        (addr::NODE_A_IP, 30012, "web-b1"),
        (addr::NODE_B_IP, 30012, "web-b1"),
    ] {
        let target = SocketAddrV4::new(node_ip, port);
        let r = tcp_request(pod, target).unwrap_or_else(|e| panic!("{target}: {e:#}"));
        assert_eq!(r.identity, backend, "{target}");
        assert_eq!(r.remote, target, "{target}: peer is the address dialed");
        let r = udp_request(pod, target).unwrap_or_else(|e| panic!("udp {target}: {e:#}"));
        assert_eq!(r.identity, backend, "udp {target}");
        assert_eq!(
            r.remote, target,
            "udp {target}: reply from the address dialed"
        );
    }
    c
}

#[test]
fn nodeport_from_a_pod_both_ways() {
    if !require_root_or_skip("socket lb nodeport") {
        return;
    }
    let c = nodeport_from_pod(&[]);
    let on = c.counters(addr::NODE_A);
    assert!(
        on["socket_lb"] >= 4,
        "node-a's NodePorts at the socket: {on:?}"
    );
    drop(c);
    let c = nodeport_from_pod(OFF);
    assert_eq!(c.counters(addr::NODE_A)["socket_lb"], 0);
}

/// A service without endpoint and a port that is no frontend of a
/// ClusterIP: connect() fails at once with ECONNREFUSED, with socket-level
/// load balancing (refused at the socket) and without (ICMP reject).
fn refused(extra: &[&str]) -> Cluster {
    let manifests = [placement_manifests(), web(vec![], "10.96.0.20", None)].concat();
    let c = Cluster::start_with("sock-refuse", &manifests, extra).expect("root");
    for (ns, target) in [
        (CLIENT_POD, "10.96.0.20:80"),
        (CLIENT_POD, "10.96.0.11:81"),
        (addr::NODE_A, "10.96.0.20:80"),
    ] {
        let started = Instant::now();
        let err = TcpConn::open(c.lab.ns(ns), sa(target))
            .map(|_| ())
            .expect_err(target);
        assert_eq!(
            error_kind(&err),
            Some(ErrorKind::ConnectionRefused),
            "{target}: {err:#}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{target}: at once"
        );
    }
    let n = c.counters(addr::NODE_A);
    assert!(n["no_endpoint"] >= 2 && n["unknown_port"] >= 1, "{n:?}");
    c
}

#[test]
fn no_endpoint_is_refused_at_connect_both_ways() {
    if !require_root_or_skip("socket lb refuse") {
        return;
    }
    let c = refused(&[]);
    // Refused at the socket: no SYN left, so the per-packet path saw none.
    assert_eq!(c.counters(addr::NODE_A)["forward"], 0);
    drop(c);
    refused(OFF);
}

#[test]
fn restarts_swap_socket_programs_in_place_and_cleanup_removes_them() -> Result<()> {
    if !require_root_or_skip("socket lb restart") {
        return Ok(());
    }
    let mut c = Cluster::start_with("sock-restart", &placement_manifests(), &[]).expect("root");
    let vip = sa("10.96.0.12:80");
    let group = c.lab.cgroup(addr::NODE_A).unwrap().to_path_buf();
    let node = |c: &Cluster| c.lab.ns(addr::NODE_A).clone();
    let before = cgroup_programs(&node(&c), &group);
    assert_eq!(before.len(), SOCK_PROGS.len(), "{before:?}");
    let mut open = TcpConn::open(c.lab.ns(CLIENT_POD), vip)?;
    assert_eq!(open.request()?.identity, "web-b1");

    c.lab.stop_daemon(addr::NODE_A, Signal::SIGTERM)?;
    let sock_before = c.counters(addr::NODE_A)["socket_lb"];
    let r = tcp_request(c.lab.ns(CLIENT_POD), vip).context("while the daemon is down")?;
    assert_eq!(r.remote, vip);
    assert!(
        c.counters(addr::NODE_A)["socket_lb"] > sock_before,
        "the socket programs keep working without the daemon"
    );

    c.start_daemon(addr::NODE_A);
    let after = cgroup_programs(&node(&c), &group);
    assert_eq!(
        after.len(),
        SOCK_PROGS.len(),
        "swapped, not added: {after:?}"
    );
    for hook in SOCK_HOOKS {
        assert_ne!(before[hook], after[hook], "{hook}: the new program runs");
    }
    assert_eq!(
        open.request()?.identity,
        "web-b1",
        "old connection still answers"
    );
    // Its storage lives on in the pinned socket-storage map.
    assert_eq!(
        open.peer_now()?,
        vip,
        "getpeername of a socket connected before the restart"
    );
    assert_eq!(tcp_request(c.lab.ns(CLIENT_POD), vip)?.remote, vip);

    // Restarted with socket-level load balancing off: the links go.
    c.lab.stop_daemon(addr::NODE_A, Signal::SIGTERM)?;
    c.extra_args = OFF.iter().map(|s| s.to_string()).collect();
    c.start_daemon(addr::NODE_A);
    assert!(cgroup_programs(&node(&c), &group).is_empty());
    c.extra_args.clear();
    c.lab.stop_daemon(addr::NODE_A, Signal::SIGTERM)?;
    c.start_daemon(addr::NODE_A);
    assert_eq!(cgroup_programs(&node(&c), &group).len(), SOCK_PROGS.len());

    c.lab.stop_daemon(addr::NODE_A, Signal::SIGTERM)?;
    c.cli(addr::NODE_A, &["cleanup"])?;
    assert!(
        cgroup_programs(&node(&c), &group).is_empty(),
        "cleanup detached the socket programs"
    );
    Ok(())
}

#[test]
fn an_unusable_cgroup_root_leaves_the_per_packet_path_serving() {
    if !require_root_or_skip("socket lb fallback") {
        return;
    }
    // A directory that is no cgroup: the daemon must start all the same.
    let not_a_cgroup = std::env::temp_dir();
    let extra = ["--cgroup-root", not_a_cgroup.to_str().unwrap()];
    let c = Cluster::start_with("sock-fallback", &placement_manifests(), &extra).expect("root");
    let log = c.lab.daemon_log(addr::NODE_A);
    assert_eq!(
        log.matches("socket-level load balancing is off").count(),
        1,
        "logged once:\n{log}"
    );
    let r = tcp_request(c.lab.ns(CLIENT_POD), sa("10.96.0.12:80")).unwrap();
    assert_eq!(r.identity, "web-b1");
    let n = c.counters(addr::NODE_A);
    assert_eq!(n["socket_lb"], 0);
    assert!(n["new_flow"] >= 1);
    let metrics = http_metrics(c.lab.ns(addr::NODE_A));
    assert!(
        metrics.contains("kube_ebpf_proxy_socket_lb_enabled 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kube_ebpf_proxy_socket_lb_attach_failures_total 1"),
        "{metrics}"
    );
}

fn http_metrics(ns: &Netns) -> String {
    use std::io::{Read, Write};
    ns.run(|| {
        let mut s = std::net::TcpStream::connect("127.0.0.1:10249").expect("metrics endpoint");
        write!(s, "GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    })
}

/// sessionAffinity ClientIP and internalTrafficPolicy Local, as YAML.
fn policy_manifests() -> String {
    let slice = |name: &str, eps: &[(&str, &str)]| {
        let endpoints: String = eps
            .iter()
            .map(|(ip, node)| {
                format!("  - addresses: [\"{ip}\"]\n    nodeName: {node}\n    conditions: {{ready: true}}\n")
            })
            .collect();
        format!(
            "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: lab
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports: [{{name: main, protocol: TCP, port: 8080}}]
endpoints:
{endpoints}---
"
        )
    };
    let service = |name: &str, ip: &str, spec: &str| {
        format!(
            "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: lab}}
spec:
  clusterIP: {ip}
  ports: [{{name: main, protocol: TCP, port: 80, targetPort: 8080}}]
{spec}
---
"
        )
    };
    let all = [
        (WEB_A.ip, WEB_A.node),
        (WEB_B1.ip, WEB_B1.node),
        (WEB_B2.ip, WEB_B2.node),
    ];
    [
        service("sticky", "10.96.0.32", "  sessionAffinity: ClientIP"),
        slice("sticky", &all),
        service("local-only", "10.96.0.33", "  internalTrafficPolicy: Local"),
        slice("local-only", &all[1..]),
    ]
    .concat()
}

/// Affinity keeps a client on one backend; internalTrafficPolicy Local
/// with no endpoint on the client's node drops (a timeout, not a refusal).
fn policies(extra: &[&str]) -> Cluster {
    let c = Cluster::start_with("sock-policies", &policy_manifests(), extra).expect("root");
    for ns in [CLIENT_POD, addr::NODE_A] {
        let hits = backends_hit(c.lab.ns(ns), sa("10.96.0.32:80"), 15);
        assert_eq!(hits.len(), 1, "{ns}: one backend for all: {hits:?}");
        assert_eq!(hits.values().sum::<u32>(), 15, "{ns}: {hits:?}");
        let err = lab::servers::tcp_request_timeout(
            c.lab.ns(ns),
            sa("10.96.0.33:80"),
            Duration::from_millis(700),
        )
        .expect_err("no local endpoint on node-a");
        assert_ne!(
            error_kind(&err),
            Some(ErrorKind::ConnectionRefused),
            "{ns}: dropped, {err:#}"
        );
    }
    // Clients on node-b have local endpoints.
    let hits = backends_hit(c.lab.ns(addr::NODE_B), sa("10.96.0.33:80"), 6);
    assert!(
        hits.keys().all(|b| b.starts_with("web-b")) && hits.values().sum::<u32>() == 6,
        "{hits:?}"
    );
    c
}

#[test]
fn affinity_and_local_traffic_policy_both_ways() {
    if !require_root_or_skip("socket lb policies") {
        return;
    }
    let c = policies(&[]);
    let n = c.counters(addr::NODE_A);
    assert!(
        n["socket_lb"] >= 30,
        "affinity decided at the socket: {n:?}"
    );
    assert!(n["no_local_endpoint"] >= 2, "{n:?}");
    drop(c);
    let c = policies(OFF);
    assert_eq!(c.counters(addr::NODE_A)["socket_lb"], 0);
}

/// How many tcx programs run on `ifname`'s `hook` in `ns`.
fn tcx_programs(ns: &Netns, ifname: &str, hook: TcAttachType) -> usize {
    ns.run(|| SchedClassifier::query_tcx(ifname, hook))
        .unwrap_or_else(|e| panic!("{ifname} {hook:?}: {e}"))
        .1
        .len()
}

/// The egress programs on the client pod's host-side device and on
/// node-a's link, and node-a's pod-egress gauge.
fn egress_hooks(c: &Cluster) -> (usize, usize, String) {
    let node = c.lab.ns(addr::NODE_A);
    let veth = host_veth_name(CLIENT_POD_IP.parse().unwrap());
    let gauge = http_metrics(node)
        .lines()
        .find(|l| l.starts_with("kube_ebpf_proxy_pod_egress_hook "))
        .unwrap_or("no gauge")
        .to_string();
    (
        tcx_programs(node, &veth, TcAttachType::Egress),
        tcx_programs(node, ETH0, TcAttachType::Egress),
        gauge,
    )
}

/// A LoadBalancer Service whose one backend is a hostNetwork process of
/// node-a (192.168.200.11:6443), with source ranges: socket LB leaves a
/// pod's connection to it to the per-packet path, whose replies leave
/// node-a's stack towards the pod by the egress hook.
fn host_backend_with_source_ranges() -> String {
    "apiVersion: v1
kind: Service
metadata: {name: api-lb, namespace: lab}
spec:
  clusterIP: 10.96.0.40
  type: LoadBalancer
  loadBalancerSourceRanges: [10.244.0.0/16]
  ports: [{name: main, protocol: TCP, port: 443, targetPort: 6443}]
status: {loadBalancer: {ingress: [{ip: 192.168.50.40}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: api-lb-1
  namespace: lab
  labels: {kubernetes.io/service-name: api-lb}
addressType: IPv4
ports: [{name: main, protocol: TCP, port: 6443}]
endpoints:
- addresses: [192.168.200.11]
  nodeName: node-a
  conditions: {ready: true}
---
"
    .into()
}

#[test]
fn pods_devices_get_the_egress_hook_only_for_a_hostnetwork_backend_of_their_node() {
    let Some(c) = Cluster::start("pod_egress", &placement_manifests()) else {
        return;
    };
    let pod = c.lab.ns(CLIENT_POD);
    assert_eq!(
        tcp_request(pod, sa("10.96.0.12:80")).unwrap().remote,
        sa("10.96.0.12:80")
    );
    // Socket LB translates the pod's connections: its device's egress
    // hook would only return at once. The node's link keeps its own.
    let (pod_egress, link_egress, gauge) = egress_hooks(&c);
    let expected = usize::from(!socket_lb_on());
    assert_eq!(
        (pod_egress, link_egress),
        (expected, 1),
        "{gauge}\n{}",
        c.logs()
    );
    assert_eq!(gauge, format!("kube_ebpf_proxy_pod_egress_hook {expected}"));

    // A hostNetwork backend on node-a: the hook is given back before the
    // frontend is written, and the reply of a per-packet flow to it gets
    // the service's address back on its way to the pod.
    let _api =
        TcpServer::start(c.lab.ns(addr::NODE_A), sa("192.168.200.11:6443"), "host-a").unwrap();
    c.write_manifests(&(placement_manifests() + &host_backend_with_source_ranges()));
    c.lab
        .wait_for("the pod's egress hook", Duration::from_secs(10), || {
            egress_hooks(&c).0 == 1
        })
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    let mut reply = None;
    c.lab
        .wait_for("the hostNetwork backend", Duration::from_secs(10), || {
            reply = tcp_request(pod, sa("192.168.50.40:443")).ok();
            reply.is_some()
        })
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    let r = reply.unwrap();
    assert_eq!(
        (r.identity.as_str(), r.remote),
        ("host-a", sa("192.168.50.40:443"))
    );
    assert_eq!(egress_hooks(&c).2, "kube_ebpf_proxy_pod_egress_hook 1");
    let log = c.lab.daemon_log(addr::NODE_A);
    assert!(
        log.contains("lab/api-lb:main") && log.contains("has a hostNetwork backend on this node"),
        "{log}"
    );
}

#[test]
fn a_restart_with_socket_lb_takes_the_earlier_runs_egress_hook_off_pods_devices() -> Result<()> {
    if !require_root_or_skip("pod egress restart") {
        return Ok(());
    }
    let mut c =
        Cluster::start_with("pod-egress-restart", &placement_manifests(), OFF).expect("root");
    let vip = sa("10.96.0.12:80");
    // A per-packet flow, held across the restart.
    let mut open = TcpConn::open(c.lab.ns(CLIENT_POD), vip)?;
    assert_eq!(open.request()?.identity, "web-b1");
    assert_eq!(egress_hooks(&c).0, 1, "socket LB off: pods have the hook");

    c.lab.stop_daemon(addr::NODE_A, Signal::SIGTERM)?;
    c.extra_args = vec!["--socket-lb=true".into()];
    c.start_daemon(addr::NODE_A);
    let (pod, link, gauge) = egress_hooks(&c);
    assert_eq!((pod, link), (0, 1), "{gauge}");
    assert_eq!(gauge, "kube_ebpf_proxy_pod_egress_hook 0");
    let veth = host_veth_name(CLIENT_POD_IP.parse().unwrap());
    let pins: Vec<String> = fs::read_dir(c.bpffs(addr::NODE_A).join("links"))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    assert!(
        pins.iter()
            .any(|p| p.starts_with(&veth) && p.ends_with("-ingress"))
            && !pins
                .iter()
                .any(|p| p.starts_with(&veth) && p.ends_with("-egress")),
        "{pins:?}"
    );
    // The flow translated per packet before keeps its translation: its
    // packets reach the pod forwarded, after the ingress hooks.
    assert_eq!(open.request()?.identity, "web-b1");
    assert_eq!(tcp_request(c.lab.ns(CLIENT_POD), vip)?.remote, vip);
    Ok(())
}
