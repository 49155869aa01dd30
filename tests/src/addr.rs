//! Fixed addresses and names of the lab topology.
//!
//! They are constants (not chosen at run time) so that example manifests,
//! demos and tests can refer to them literally.

use std::net::{Ipv4Addr, Ipv6Addr};

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

/// The IPv6 underlay beside the IPv4 one: fd00:200::/64.
pub const UNDERLAY6_PREFIX_LEN: u8 = 64;
/// `br0`'s IPv6 address; the nodes' and client's IPv6 default router.
pub const UNDERLAY6_GATEWAY: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 1);
/// `eth0` of node-a, IPv6.
pub const NODE_A_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x11);
/// `eth0` of node-b, IPv6.
pub const NODE_B_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x12);
/// `eth0` of the external client, IPv6.
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x100);

/// Prefix length of each node's IPv6 pod CIDR.
pub const POD6_PREFIX_LEN: u8 = 64;
/// IPv6 pod CIDR of node-a: fd00:10:244:1::/64.
pub const NODE_A_POD6_CIDR: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 0);
/// IPv6 pod CIDR of node-b: fd00:10:244:2::/64.
pub const NODE_B_POD6_CIDR: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 2, 0, 0, 0, 0);

/// Link-local next hop of every pod's IPv6 default route: the address of
/// every host-side veth (link-local addresses are per link, so all of them
/// can have the same one), as 169.254.1.1 is for IPv4.
pub const POD6_GATEWAY: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// Underlay address of a node, by lab name.
pub fn node_ip(node: &str) -> Option<Ipv4Addr> {
    match node {
        NODE_A => Some(NODE_A_IP),
        NODE_B => Some(NODE_B_IP),
        _ => None,
    }
}

/// IPv6 underlay address of a node, by lab name.
pub fn node_ip6(node: &str) -> Option<Ipv6Addr> {
    match node {
        NODE_A => Some(NODE_A_IP6),
        NODE_B => Some(NODE_B_IP6),
        _ => None,
    }
}

/// Network address of a node's IPv6 pod CIDR (prefix [`POD6_PREFIX_LEN`]).
pub fn pod6_cidr(node: &str) -> Option<Ipv6Addr> {
    match node {
        NODE_A => Some(NODE_A_POD6_CIDR),
        NODE_B => Some(NODE_B_POD6_CIDR),
        _ => None,
    }
}

/// The IPv6 address of a pod of `node` whose IPv4 address is `ip`: the
/// node's IPv6 pod CIDR with the IPv4 address in the last 32 bits, so
/// 10.244.1.11 on node-a is fd00:10:244:1::af4:10b (unique as the IPv4
/// address is, and computable by tests).
pub fn pod_ip6(node: &str, ip: Ipv4Addr) -> Option<Ipv6Addr> {
    let cidr = pod6_cidr(node)?;
    Some(Ipv6Addr::from(u128::from(cidr) | u128::from(u32::from(ip))))
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
