//! A lab of Linux network namespaces for integration tests and demos of
//! kube-ebpf-proxy. It never touches the root network namespace, and dropping
//! a [`Lab`] (also during a panic) removes everything it created.
//!
//! Topology (addresses in [`addr`]):
//!
//! ```text
//!   client 192.168.200.100 ──┐
//!                            │ underlay: bridge br0 192.168.200.1/24
//!   node-a eth0 .11 ─────────┤ (default router; does not forward)
//!   node-b eth0 .12 ─────────┘
//!
//!   node-a: pods in 10.244.1.0/24, route 10.244.2.0/24 via node-b
//!   node-b: pods in 10.244.2.0/24, route 10.244.1.0/24 via node-a
//!   pod: eth0 POD_IP/32, default via 169.254.1.1 (proxy ARP on the node's
//!        host-side veth), node route POD_IP/32 dev <host veth>
//! ```
//!
//! IPv6 beside it (dual-stack, DAD off, every address `nodad`):
//!
//! ```text
//!   underlay br0 fd00:200::1/64; node-a ::11, node-b ::12, client ::100
//!   node-a: pods in fd00:10:244:1::/64, node-b: fd00:10:244:2::/64
//!           (a pod's IPv6 address ends in its IPv4 address: addr::pod_ip6)
//!   pod: eth0 POD_IP6/128, default via fe80::1 (every host-side veth has it)
//! ```
//!
//! The client knows no pod routes: it reaches pods only through a proxy.
//!
//! ```no_run
//! use std::net::SocketAddrV4;
//! use lab::{Lab, TcpServer, addr, tcp_request};
//!
//! # fn main() -> anyhow::Result<()> {
//! if !lab::require_root_or_skip("example") {
//!     return Ok(());
//! }
//! let mut lab = Lab::new()?;
//! let ip = lab.add_pod(addr::NODE_B, "web")?;
//! let _server = TcpServer::start(lab.ns("web"), SocketAddrV4::new(ip, 80), "web")?;
//! let reply = tcp_request(lab.ns(addr::NODE_A), SocketAddrV4::new(ip, 80))?;
//! assert_eq!(reply.identity, "web");
//! assert_eq!(*reply.seen_peer.ip(), addr::NODE_A_IP);
//! # Ok(())
//! # }
//! ```

pub mod addr;
pub mod apiserver;
mod cgroup;
mod daemon;
mod instance;
mod lab;
mod leftovers;
mod mounts;
mod netns;
mod privilege;
pub mod servers;
mod topology;
mod wait;

pub use cgroup::cgroup2_mount;
pub use lab::{Lab, Pod, STOP_TIMEOUT};
pub use netns::{Netns, NsThread};
pub use nix::sys::signal::Signal;
pub use privilege::require_root_or_skip;
pub use servers::{
    LabAddr, Reply, TcpConn, TcpServer, UdpServer, error_kind, tcp_request, udp_request,
};
pub use topology::{ETH0, UNDERLAY_BRIDGE, host_veth_name};
pub use wait::wait_until;
