//! Wiring of the lab: an underlay bridge, two routed nodes, an external
//! client, and pods attached Calico-style (a /32 per pod, proxy ARP on the
//! host-side veth, no bridge on the node).
//!
//! Every veth pair is created directly inside the namespaces it joins, so the
//! root namespace never sees an interface, even briefly.

use std::net::Ipv4Addr;

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

pub(crate) fn setup_underlay(underlay: &Netns) -> Result<()> {
    // The underlay only switches; whatever arrives for other subnets (say, a
    // pod IP from the client) must be dropped, whatever the host's default is.
    underlay.set_sysctl("net.ipv4.ip_forward", "0")?;
    underlay.ip(&["link", "set", "lo", "up"])?;
    underlay.ip(&["link", "add", UNDERLAY_BRIDGE, "type", "bridge"])?;
    let gw = format!("{}/{}", addr::UNDERLAY_GATEWAY, addr::UNDERLAY_PREFIX_LEN);
    underlay.ip(&["addr", "add", &gw, "dev", UNDERLAY_BRIDGE])?;
    underlay.ip(&["link", "set", UNDERLAY_BRIDGE, "up"])?;
    Ok(())
}

/// Sets up a node. Sysctls come first: new interfaces copy `conf/default`
/// when they are created, so this order makes them start with the right
/// values instead of whatever the host's defaults are.
pub(crate) fn setup_node(underlay: &Netns, node: &Netns, role: &str, ip: Ipv4Addr) -> Result<()> {
    for (key, value) in [
        ("net.ipv4.ip_forward", "1"),
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
    node.ip(&["link", "set", "lo", "up"])?;
    attach_to_underlay(underlay, node, role, ip)?;
    for other in addr::NODES.into_iter().filter(|&n| n != role) {
        let (Some(cidr), Some(via)) = (addr::pod_cidr(other), addr::node_ip(other)) else {
            continue;
        };
        let dst = format!("{cidr}/{}", addr::POD_PREFIX_LEN);
        node.ip(&["route", "add", &dst, "via", &via.to_string()])?;
    }
    Ok(())
}

pub(crate) fn setup_client(underlay: &Netns, client: &Netns) -> Result<()> {
    client.ip(&["link", "set", "lo", "up"])?;
    attach_to_underlay(underlay, client, addr::CLIENT, addr::CLIENT_IP)
}

/// Gives `ns` an `eth0` on the underlay bridge and a default route via it.
/// The bridge port is named after the role, which keeps
/// `ip -n <underlay> link` readable.
fn attach_to_underlay(underlay: &Netns, ns: &Netns, role: &str, ip: Ipv4Addr) -> Result<()> {
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
    ns.ip(&["link", "set", ETH0, "up"])?;
    let gw = addr::UNDERLAY_GATEWAY.to_string();
    ns.ip(&["route", "add", "default", "via", &gw])?;
    Ok(())
}

/// Connects a pod namespace to its node.
pub(crate) fn setup_pod(node: &Netns, pod: &Netns, ip: Ipv4Addr, host_veth: &str) -> Result<()> {
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

    let gw = addr::POD_GATEWAY.to_string();
    pod.ip(&["link", "set", "lo", "up"])?;
    pod.ip(&["addr", "add", &host, "dev", ETH0])?;
    pod.ip(&["link", "set", ETH0, "up"])?;
    pod.ip(&["route", "add", &gw, "dev", ETH0, "scope", "link"])?;
    pod.ip(&["route", "add", "default", "via", &gw, "dev", ETH0])?;
    Ok(())
}
