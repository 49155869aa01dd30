//! Fixed addresses and names of the lab topology.
//!
//! They are constants (not chosen at run time) so that example manifests,
//! demos and tests can refer to them literally.

use std::net::Ipv4Addr;

/// Lab names of the fixed namespaces, as accepted by [`crate::Lab::ns`].
pub const UNDERLAY: &str = "underlay";
pub const NODE_A: &str = "node-a";
pub const NODE_B: &str = "node-b";
pub const CLIENT: &str = "client";

/// Prefix length of the underlay subnet 192.168.200.0/24.
pub const UNDERLAY_PREFIX_LEN: u8 = 24;
/// `br0` in the underlay namespace; the default router of nodes and client.
pub const UNDERLAY_GATEWAY: Ipv4Addr = Ipv4Addr::new(192, 168, 200, 1);
/// `eth0` of node-a.
pub const NODE_A_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 200, 11);
/// `eth0` of node-b.
pub const NODE_B_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 200, 12);
/// `eth0` of the external client.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 200, 100);

/// Prefix length of each node's pod CIDR.
pub const POD_PREFIX_LEN: u8 = 24;
/// Pod CIDR of node-a: 10.244.1.0/24.
pub const NODE_A_POD_CIDR: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 0);
/// Pod CIDR of node-b: 10.244.2.0/24.
pub const NODE_B_POD_CIDR: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 0);
/// Host part of the first address handed out by [`crate::Lab::add_pod`].
pub const FIRST_POD_HOST: u8 = 11;

/// Link-local next hop of every pod's default route. Nobody owns it: the
/// host-side veth answers ARP for it with proxy ARP (the Calico layout), so
/// pods need no per-node gateway address.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// Underlay address of a node, by lab name.
pub fn node_ip(node: &str) -> Option<Ipv4Addr> {
    match node {
        NODE_A => Some(NODE_A_IP),
        NODE_B => Some(NODE_B_IP),
        _ => None,
    }
}

/// Network address of a node's pod CIDR (prefix [`POD_PREFIX_LEN`]).
pub fn pod_cidr(node: &str) -> Option<Ipv4Addr> {
    match node {
        NODE_A => Some(NODE_A_POD_CIDR),
        NODE_B => Some(NODE_B_POD_CIDR),
        _ => None,
    }
}

/// The lab's nodes, in a fixed order.
pub const NODES: [&str; 2] = [NODE_A, NODE_B];
