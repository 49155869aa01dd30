//! `cargo xtask demo`: the embedded default, end to end. A lab of network
//! namespaces (two nodes, pods, an outside client) gets the manifests of
//! deploy/examples/, the daemon runs on both nodes, and real connections go
//! through a ClusterIP and a NodePort; then the maps are shown and
//! everything is torn down.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use lab::{Lab, TcpServer, UdpServer, addr, tcp_request, udp_request};

use crate::root;

/// Backend pods of deploy/examples/: (node, name, IP, port).
const PODS: &[(&str, &str, [u8; 4], u16)] = &[
    (addr::NODE_A, "web-a", [10, 244, 1, 11], 8080),
    (addr::NODE_B, "web-b1", [10, 244, 2, 11], 8080),
    (addr::NODE_B, "web-b2", [10, 244, 2, 12], 8080),
    (addr::NODE_A, "dns-a", [10, 244, 1, 12], 5353),
    (addr::NODE_B, "dns-b", [10, 244, 2, 13], 5353),
    (addr::NODE_A, "backend-1", [10, 244, 1, 13], 8080),
    (addr::NODE_B, "backend-2", [10, 244, 2, 14], 8080),
];

fn section(title: &str) {
    println!("\n=== {title} ===");
}

pub fn run(daemon: &Path) -> Result<()> {
    let (mut lab, servers) = build_lab()?;
    start_daemons(&mut lab, daemon)?;
    show_traffic(&lab)?;
    let bpffs = lab.dir().join("node-a-bpffs");
    show_maps(&lab, daemon, &bpffs)?;
    teardown(&mut lab, daemon)?;
    drop(servers);
    drop(lab);
    println!("lab removed");
    Ok(())
}

/// The servers of the backend pods: they answer while they are alive.
type Servers = (Vec<TcpServer>, Vec<UdpServer>);

/// Two nodes, the backend pods of deploy/examples/ with their servers, and
/// a client pod.
fn build_lab() -> Result<(Lab, Servers)> {
    let mut lab = Lab::new().context("building the lab (needs root)")?;
    let mut servers = (Vec::new(), Vec::new());
    for (node, name, ip, port) in PODS {
        let ip = Ipv4Addr::from(*ip);
        lab.add_pod_with_ip(node, name, ip)?;
        let at = SocketAddrV4::new(ip, *port);
        servers.0.push(TcpServer::start(lab.ns(name), at, name)?);
        servers.1.push(UdpServer::start(lab.ns(name), at, name)?);
    }
    lab.add_pod_with_ip(addr::NODE_A, "pod-client", Ipv4Addr::new(10, 244, 1, 50))?;

    section("lab");
    println!(
        "node-a {} (pods 10.244.1.0/24), node-b {} (pods 10.244.2.0/24), outside client {}",
        addr::NODE_A_IP,
        addr::NODE_B_IP,
        addr::CLIENT_IP
    );
    for p in lab.pods() {
        println!("  pod {:<10} {:<12} on {}", p.name, p.ip, p.node);
    }
    Ok((lab, servers))
}

/// The daemon on both nodes, on the manifests of deploy/examples/; waits
/// until both say they are ready.
fn start_daemons(lab: &mut Lab, daemon: &Path) -> Result<()> {
    let examples = root().join("deploy/examples");
    for node in addr::NODES {
        let bpffs = lab.dir().join(format!("{node}-bpffs"));
        lab.start_daemon(
            node,
            daemon,
            [
                "run".as_ref(),
                "--manifests".as_ref(),
                examples.as_os_str(),
                "--hostname-override".as_ref(),
                node.as_ref(),
                "--bpffs".as_ref(),
                bpffs.as_os_str(),
            ],
        )?;
    }
    for node in addr::NODES {
        let ready = lab.wait_for("daemon ready", Duration::from_secs(10), || {
            lab.daemon_log(node).contains(" ready ")
        });
        if let Err(e) = ready {
            bail!("{e:#}\n{}", lab.daemon_log(node));
        }
    }
    section("daemon log of node-a");
    print!("{}", lab.daemon_log(addr::NODE_A));
    Ok(())
}

/// Real connections through a ClusterIP (from a pod and from the node),
/// over UDP, and through a NodePort from outside.
fn show_traffic(lab: &Lab) -> Result<()> {
    section("pod client (node-a) -> ClusterIP web 10.96.0.10:80, 12 new TCP connections");
    let web: SocketAddrV4 = "10.96.0.10:80".parse()?;
    let mut seen = BTreeMap::new();
    for _ in 0..12 {
        let r = tcp_request(lab.ns("pod-client"), web)?;
        println!(
            "  answered by {:<7} (reply from {}, backend saw {})",
            r.identity, r.remote, r.seen_peer
        );
        *seen.entry(r.identity).or_insert(0) += 1;
    }
    println!("  spread: {seen:?}");

    section("node-a itself -> ClusterIP web 10.96.0.10:80");
    let r = tcp_request(lab.ns(addr::NODE_A), web)?;
    println!("  answered by {} (reply from {})", r.identity, r.remote);

    section("pod-client -> ClusterIP dns 10.96.0.53:53 over UDP");
    for _ in 0..4 {
        let r = udp_request(
            lab.ns("pod-client"),
            "10.96.0.53:53".parse::<std::net::SocketAddrV4>()?,
        )?;
        println!("  answered by {:<6} (reply from {})", r.identity, r.remote);
    }

    section("outside client -> NodePort 30080 on both nodes");
    for node_ip in [addr::NODE_A_IP, addr::NODE_B_IP] {
        for _ in 0..3 {
            let target = SocketAddrV4::new(node_ip, 30080);
            let r = tcp_request(lab.ns(addr::CLIENT), target)?;
            println!(
                "  {target} answered by {:<7} (reply from {}, backend saw {})",
                r.identity, r.remote, r.seen_peer
            );
        }
    }

    section("seed example: backend-service (ClusterIP 10.96.0.80:80 -> :8080)");
    let r = tcp_request(
        lab.ns("pod-client"),
        "10.96.0.80:80".parse::<std::net::SocketAddrV4>()?,
    )?;
    println!("  answered by {} (reply from {})", r.identity, r.remote);
    Ok(())
}

/// What node-a's daemon wrote: `inspect`, a bpftool map dump, and the
/// pinned TCX links.
fn show_maps(lab: &Lab, daemon: &Path, bpffs: &Path) -> Result<()> {
    let bpffs = bpffs.to_str().context("lab path")?;
    for what in ["services", "conntrack", "stats"] {
        section(&format!("kube-ebpf-proxy inspect {what} (node-a)"));
        let out = lab.ns(addr::NODE_A).exec(
            daemon.to_str().context("path")?,
            &["inspect", what, "--bpffs", bpffs],
        )?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    section("bpftool map dump pinned <bpffs>/maps/KEP_SVC_V2 (first entries, node-a)");
    let map = format!("{bpffs}/maps/KEP_SVC_V2");
    let out = lab
        .ns(addr::NODE_A)
        .exec("bpftool", &["map", "dump", "pinned", &map])?;
    for line in String::from_utf8_lossy(&out.stdout).lines().take(24) {
        println!("{line}");
    }
    section("pinned TCX links (node-a): bpftool link show pinned <bpffs>/links/...");
    let mut pins: Vec<_> = std::fs::read_dir(format!("{bpffs}/links"))?
        .flatten()
        .collect();
    pins.sort_by_key(|e| e.file_name());
    for pin in pins {
        let path = pin.path();
        let out = lab.ns(addr::NODE_A).exec(
            "bpftool",
            &["link", "show", "pinned", path.to_str().context("path")?],
        )?;
        let first = String::from_utf8_lossy(&out.stdout);
        println!(
            "  {:<26} {}",
            pin.file_name().to_string_lossy(),
            first.lines().next().unwrap_or("")
        );
    }
    Ok(())
}

/// Stops both daemons and removes what they pinned.
fn teardown(lab: &mut Lab, daemon: &Path) -> Result<()> {
    section("teardown");
    for node in addr::NODES {
        lab.stop_daemon(node, lab::Signal::SIGTERM)?;
        let bpffs = lab.dir().join(format!("{node}-bpffs"));
        let out = lab.ns(node).exec(
            daemon.to_str().context("path")?,
            &["cleanup", "--bpffs", bpffs.to_str().context("path")?],
        )?;
        print!("{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}
