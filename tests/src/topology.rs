//! Wiring of the lab: an underlay bridge, two routed nodes, an external
//! client, and pods attached Calico-style (a /32 per pod, proxy ARP on the
//! host-side veth, no bridge on the node).
//!
//! Every veth pair is created directly inside the namespaces it joins, so the
//! root namespace never sees an interface, even briefly.
//!
//! Everything is dual-stack: each IPv4 address has an IPv6 one beside it
//! ([`addr`]). Duplicate address detection is off in every namespace (and
//! every address is added `nodad`): a fresh veth's addresses, link-local
//! ones included, would otherwise stay tentative for about a second, and a
//! test's first IPv6 packets would be lost.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::Result;

use crate::addr;
use crate::netns::Netns;

/// Name of the bridge in the underlay namespace.
pub const UNDERLAY_BRIDGE: &str = "br0";
/// Name of the underlay-facing interface in nodes and the client, and of the
/// interface inside each pod.
pub const ETH0: &str = "eth0";

/// Host-side veth name of a pod, derived from its IP so it is unique within a
/// node, stable, and short enough (10 chars) for IFNAMSIZ.
pub fn host_veth_name(pod_ip: Ipv4Addr) -> String {
    format!("kp{:08x}", u32::from(pod_ip))
}

/// Turns duplicate address detection off for the interfaces `ns` will
/// get (they copy `conf/default` when created).
fn no_dad(ns: &Netns) -> Result<()> {
    for key in [
        "net.ipv6.conf.all.accept_dad",
        "net.ipv6.conf.default.accept_dad",
    ] {
        ns.set_sysctl(key, "0")?;
    }
    Ok(())
}

/// `ip -6 addr add ADDR/LEN dev DEV nodad`.
fn add_addr6(ns: &Netns, ip: Ipv6Addr, len: u8, dev: &str) -> Result<()> {
    let cidr = format!("{ip}/{len}");
    ns.ip(&["-6", "addr", "add", &cidr, "dev", dev, "nodad"])?;
    Ok(())
}

pub(crate) fn setup_underlay(underlay: &Netns) -> Result<()> {
    // The underlay only switches; whatever arrives for other subnets (say, a
    // pod IP from the client) must be dropped, whatever the host's default is.
    underlay.set_sysctl("net.ipv4.ip_forward", "0")?;
    underlay.set_sysctl("net.ipv6.conf.all.forwarding", "0")?;
    no_dad(underlay)?;
    underlay.ip(&["link", "set", "lo", "up"])?;
    underlay.ip(&["link", "add", UNDERLAY_BRIDGE, "type", "bridge"])?;
    let gw = format!("{}/{}", addr::UNDERLAY_GATEWAY, addr::UNDERLAY_PREFIX_LEN);
    underlay.ip(&["addr", "add", &gw, "dev", UNDERLAY_BRIDGE])?;
    add_addr6(
        underlay,
        addr::UNDERLAY6_GATEWAY,
        addr::UNDERLAY6_PREFIX_LEN,
        UNDERLAY_BRIDGE,
    )?;
    underlay.ip(&["link", "set", UNDERLAY_BRIDGE, "up"])?;
    Ok(())
}

/// Sets up a node. Sysctls come first: new interfaces copy `conf/default`
/// when they are created, so this order makes them start with the right
/// values instead of whatever the host's defaults are.
pub(crate) fn setup_node(underlay: &Netns, node: &Netns, role: &str, ip: Ipv4Addr) -> Result<()> {
    for (key, value) in [
        ("net.ipv4.ip_forward", "1"),
        // Also sets conf/default, so every later device forwards IPv6 too.
        ("net.ipv6.conf.all.forwarding", "1"),
        // Forwarded pod and service traffic often arrives on an interface
        // other than the one the reverse route points to.
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
        // Node-to-node traffic goes out the interface it came in on (eth0);
        // redirects would teach peers shortcuts that bypass the node.
        ("net.ipv4.conf.all.send_redirects", "0"),
        ("net.ipv4.conf.default.send_redirects", "0"),
    ] {
        node.set_sysctl(key, value)?;
    }
    no_dad(node)?;
    node.ip(&["link", "set", "lo", "up"])?;
    let ip6 = addr::node_ip6(role).expect("nodes have IPv6 addresses");
    attach_to_underlay(underlay, node, role, ip, ip6)?;
    for other in addr::NODES.into_iter().filter(|&n| n != role) {
        let (Some(cidr), Some(via)) = (addr::pod_cidr(other), addr::node_ip(other)) else {
            continue;
        };
        let dst = format!("{cidr}/{}", addr::POD_PREFIX_LEN);
        node.ip(&["route", "add", &dst, "via", &via.to_string()])?;
        let (Some(cidr6), Some(via6)) = (addr::pod6_cidr(other), addr::node_ip6(other)) else {
            continue;
        };
        let dst6 = format!("{cidr6}/{}", addr::POD6_PREFIX_LEN);
        node.ip(&["-6", "route", "add", &dst6, "via", &via6.to_string()])?;
    }
    Ok(())
}

pub(crate) fn setup_client(underlay: &Netns, client: &Netns) -> Result<()> {
    no_dad(client)?;
    client.ip(&["link", "set", "lo", "up"])?;
    attach_to_underlay(
        underlay,
        client,
        addr::CLIENT,
        addr::CLIENT_IP,
        addr::CLIENT_IP6,
    )
}

/// Gives `ns` an `eth0` on the underlay bridge and default routes (both
/// families) via it. The bridge port is named after the role, which keeps
/// `ip -n <underlay> link` readable.
fn attach_to_underlay(
    underlay: &Netns,
    ns: &Netns,
    role: &str,
    ip: Ipv4Addr,
    ip6: Ipv6Addr,
) -> Result<()> {
    ns.ip(&[
        "link",
        "add",
        ETH0,
        "type",
        "veth",
        "peer",
        "name",
        role,
        "netns",
        underlay.name(),
    ])?;
    underlay.ip(&["link", "set", role, "master", UNDERLAY_BRIDGE, "up"])?;
    let cidr = format!("{ip}/{}", addr::UNDERLAY_PREFIX_LEN);
    ns.ip(&["addr", "add", &cidr, "dev", ETH0])?;
    add_addr6(ns, ip6, addr::UNDERLAY6_PREFIX_LEN, ETH0)?;
    ns.ip(&["link", "set", ETH0, "up"])?;
    let gw = addr::UNDERLAY_GATEWAY.to_string();
    ns.ip(&["route", "add", "default", "via", &gw])?;
    let gw6 = addr::UNDERLAY6_GATEWAY.to_string();
    ns.ip(&["-6", "route", "add", "default", "via", &gw6])?;
    Ok(())
}

/// Connects a pod namespace to its node, with `ip` and `ip6`.
pub(crate) fn setup_pod(
    node: &Netns,
    pod: &Netns,
    (ip, ip6): (Ipv4Addr, Ipv6Addr),
    host_veth: &str,
) -> Result<()> {
    // Before the veth exists: its pod end copies the pod's conf/default.
    no_dad(pod)?;
    node.ip(&[
        "link",
        "add",
        host_veth,
        "type",
        "veth",
        "peer",
        "name",
        ETH0,
        "netns",
        pod.name(),
    ])?;
    // The node answers the pod's ARP for the fake gateway 169.254.1.1.
    node.set_sysctl(&format!("net.ipv4.conf.{host_veth}.proxy_arp"), "1")?;
    // Proxy ARP replies to broadcast requests are otherwise held back for a
    // random time of up to 0.8 s, which stalls each pod's first packet.
    node.set_sysctl(&format!("net.ipv4.neigh.{host_veth}.proxy_delay"), "0")?;
    node.ip(&["link", "set", host_veth, "up"])?;
    let host = format!("{ip}/32");
    node.ip(&["route", "add", &host, "dev", host_veth, "scope", "link"])?;
    // IPv6 has no proxy ARP to lean on: the host side owns the pods'
    // link-local gateway address itself.
    add_addr6(node, addr::POD6_GATEWAY, 64, host_veth)?;
    let host6 = format!("{ip6}/128");
    node.ip(&["-6", "route", "add", &host6, "dev", host_veth])?;

    let gw = addr::POD_GATEWAY.to_string();
    pod.ip(&["link", "set", "lo", "up"])?;
    pod.ip(&["addr", "add", &host, "dev", ETH0])?;
    add_addr6(pod, ip6, 128, ETH0)?;
    pod.ip(&["link", "set", ETH0, "up"])?;
    pod.ip(&["route", "add", &gw, "dev", ETH0, "scope", "link"])?;
    pod.ip(&["route", "add", "default", "via", &gw, "dev", ETH0])?;
    let gw6 = addr::POD6_GATEWAY.to_string();
    pod.ip(&["-6", "route", "add", "default", "via", &gw6, "dev", ETH0])?;
    Ok(())
}
