//! The IPv6 maps: the twins of the IPv4 maps that are keyed by, or hold, an
//! address. The same layout rules apply (see the crate documentation).
//!
//! Shared with IPv4, because nothing in them depends on the family:
//!
//! * service port ids ([`SvcId`]), their slots ([`SLOT_MAP`]), names
//!   ([`NAME_MAP`]), traffic counters ([`SVC_STATS_MAP`]) and affinity
//!   members ([`AFFMEM_MAP`]): one id space for both families. A dual-stack
//!   Service has one service port id per family and frontend, as it has one
//!   per frontend already.
//! * backend ids: one id space for both families too. An IPv6 backend's id
//!   is a key of [`BACKEND6_MAP`], never of [`BACKEND_MAP`], so a slot names
//!   exactly one backend in exactly one map and the frontend's family says
//!   which map to read.
//! * [`SvcValue`], [`AddrValue`], [`AffValue`], [`FragValue`]: no address.
//! * the datapath counters ([`STATS_MAP`], [`Counter`]) and the SNAT port
//!   range and masquerade-all flag of [`CONFIG_MAP`].
//!
//! Why a [`BACKEND6_MAP`] rather than a wider [`Backend`]: growing
//! [`Backend`] to 16 address bytes would make every IPv4 backend 20 bytes
//! instead of 8 (a million entries), bump `KEP_BE_V1` so that an upgrade
//! starts from an empty backend map while pinned slots still point into the
//! old one, and change the IPv4 path's lookups. A map per family leaves the
//! IPv4 path and its pinned state as they are.

use bytemuck::{Pod, Zeroable};

use crate::*;

/// Frontends: (address, port, protocol) → service port, as [`SVC_MAP`].
/// NodePorts use the address `::` and apply to every address in
/// [`ADDR6_MAP`] with the [`ADDR_NODEPORT`] bit.
pub const SVC6_MAP: &str = "KEP_SVC6_V1";
/// Backends with an IPv6 address: backend id → [`Backend6`].
pub const BACKEND6_MAP: &str = "KEP_BE6_V1";
/// Address classes of IPv6 addresses (`ADDR_*` bits), as [`ADDR_MAP`].
pub const ADDR6_MAP: &str = "KEP_ADDR6_V1";
/// Connection tracking of IPv6 flows, original direction, as [`CT_MAP`].
#[cfg(not(feature = "layout-v2-test"))]
pub const CT6_MAP: &str = "KEP_CT6_V1";
/// The test layout's IPv6 conntrack ([`crate::layout`]).
#[cfg(feature = "layout-v2-test")]
pub const CT6_MAP: &str = "KEP_CT6_V2";
/// Reverse NAT of IPv6 flows, reply direction, as [`RNAT_MAP`].
#[cfg(not(feature = "layout-v2-test"))]
pub const RNAT6_MAP: &str = "KEP_RNAT6_V1";
/// The test layout's IPv6 reverse NAT ([`crate::layout`]).
#[cfg(feature = "layout-v2-test")]
pub const RNAT6_MAP: &str = "KEP_RNAT6_V2";
/// IPv6 fragments: (addresses, fragment header id, protocol) → ports of
/// the first fragment, as [`FRAG_MAP`].
pub const FRAG6_MAP: &str = "KEP_FRAG6_V1";
/// sessionAffinity ClientIP for IPv6 clients, as [`AFF_MAP`].
pub const AFF6_MAP: &str = "KEP_AFF6_V1";
/// loadBalancerSourceRanges with IPv6 prefixes (LPM trie), as
/// [`SRCRNG_MAP`].
pub const SRCRNG6_MAP: &str = "KEP_SRCRNG6_V1";
/// The IPv6 half of the datapath configuration: a single [`Config6`] at
/// index 0.
pub const CONFIG6_MAP: &str = "KEP_CFG6_V1";

/// Socket-level load balancing of connected IPv6 sockets: as
/// [`SOCK_PEER_MAP`] ([`SockPeer6`]).
pub const SOCK_PEER6_MAP: &str = "KEP_SKPEER6_V1";
/// Socket-level load balancing of unconnected IPv6 UDP, reverse direction:
/// as [`SOCK_RNAT_MAP`] ([`SockRevKey6`] → [`SockNat6`]).
pub const SOCK_RNAT6_MAP: &str = "KEP_SKRNAT6_V1";
/// Socket-level load balancing of unconnected IPv6 UDP: as [`SOCK_FWD_MAP`]
/// ([`SockFwdKey6`] → [`SockNat6`]).
pub const SOCK_FWD6_MAP: &str = "KEP_SKFWD6_V1";

/// The IPv6 socket-level programs, as their IPv4 twins ([`SOCK_PROGS`]).
pub const PROG_CONNECT6: &str = "kep_connect6";
pub const PROG_SENDMSG6: &str = "kep_sendmsg6";
pub const PROG_RECVMSG6: &str = "kep_recvmsg6";
pub const PROG_GETPEERNAME6: &str = "kep_getpeername6";

/// Every IPv6 map name (also in [`ALL_MAPS`]).
pub const V6_MAPS: [&str; 12] = [
    SVC6_MAP,
    BACKEND6_MAP,
    ADDR6_MAP,
    CT6_MAP,
    RNAT6_MAP,
    FRAG6_MAP,
    AFF6_MAP,
    SRCRNG6_MAP,
    CONFIG6_MAP,
    SOCK_PEER6_MAP,
    SOCK_RNAT6_MAP,
    SOCK_FWD6_MAP,
];

/// Capacities: as the IPv4 twins' ([`SVC_MAP_SIZE`] ...).
pub const SVC6_MAP_SIZE: u32 = SVC_MAP_SIZE;
pub const BACKEND6_MAP_SIZE: u32 = BACKEND_MAP_SIZE;
pub const ADDR6_MAP_SIZE: u32 = ADDR_MAP_SIZE;
pub const CT6_MAP_SIZE: u32 = CT_MAP_SIZE;
pub const RNAT6_MAP_SIZE: u32 = RNAT_MAP_SIZE;
pub const FRAG6_MAP_SIZE: u32 = FRAG_MAP_SIZE;
pub const AFF6_MAP_SIZE: u32 = AFF_MAP_SIZE;
pub const SRCRNG6_MAP_SIZE: u32 = SRCRNG_MAP_SIZE;

pub const IPPROTO_ICMPV6: u8 = 58;

/// Key of [`SVC6_MAP`] (value: [`SvcValue`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SvcKey6 {
    /// Service address; `::` for a NodePort.
    pub addr: [u8; 16],
    pub port: [u8; 2],
    /// [`IPPROTO_TCP`] or [`IPPROTO_UDP`].
    pub proto: u8,
    pub _pad: u8,
}

/// Value of [`BACKEND6_MAP`] (key: [`BackendKey`]); the fields mean what
/// [`Backend`]'s do.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Backend6 {
    pub addr: [u8; 16],
    pub port: [u8; 2],
    pub proto: u8,
    /// `BE_F_*`.
    pub flags: u8,
}

/// Key of [`ADDR6_MAP`] (value: [`AddrValue`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct AddrKey6 {
    pub addr: [u8; 16],
}

/// An IPv6 flow as seen on the wire: key of [`CT6_MAP`] and [`RNAT6_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct FlowKey6 {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl FlowKey6 {
    /// The same flow seen from the other end.
    pub const fn reversed(&self) -> FlowKey6 {
        FlowKey6 {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// Value of [`CT6_MAP`] and [`RNAT6_MAP`]: rewrite the packet to this
/// tuple. The fields mean what [`NatEntry`]'s do (`NAT_F_*` flags).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct NatEntry6 {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub svc_id: u32,
    pub backend_id: u32,
    pub flags: u8,
    pub _pad: [u8; 3],
    /// As [`NatEntry::v2_test`].
    #[cfg(feature = "layout-v2-test")]
    pub v2_test: [u8; 8],
}

/// Key of [`FRAG6_MAP`] (value: [`FragValue`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FragKey6 {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// The fragment header's identification (32 bits in IPv6).
    pub id: [u8; 4],
    /// The upper-layer protocol after the fragment header.
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Key of [`AFF6_MAP`] (value: [`AffValue`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct AffKey6 {
    pub svc_id: SvcId,
    pub client: [u8; 16],
}

/// Data of an [`SRCRNG6_MAP`] key (value: 1). The trie's prefix length is
/// 32 + the range's prefix length ([`SrcRangeKey6::prefix_len`]): the
/// service port id always matches in full.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SrcRangeKey6 {
    /// Service port id, big-endian (LPM tries match bytes from the first).
    pub svc_id: [u8; 4],
    pub addr: [u8; 16],
}

impl SrcRangeKey6 {
    /// The trie key of `addr/len` for a service port.
    pub const fn prefix_len(range_len: u8) -> u32 {
        32 + range_len as u32
    }
}

/// Key of [`SOCK_RNAT6_MAP`]: a backend as one socket sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockRevKey6 {
    pub cookie: u64,
    pub addr: [u8; 16],
    pub port: [u8; 2],
    pub _pad: [u8; 6],
}

/// Value of [`SOCK_PEER6_MAP`]: as [`SockPeer`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockPeer6 {
    pub backend: [u8; 16],
    pub service: [u8; 16],
    pub backend_port: [u8; 2],
    pub service_port: [u8; 2],
}

/// Key of [`SOCK_FWD6_MAP`]: a service address as one socket dialed it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockFwdKey6 {
    pub cookie: u64,
    pub addr: [u8; 16],
    pub port: [u8; 2],
    pub _pad: [u8; 6],
}

/// Value of [`SOCK_RNAT6_MAP`] (the service address) and [`SOCK_FWD6_MAP`]
/// (the backend address), as [`SockNat`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockNat6 {
    pub addr: [u8; 16],
    pub port: [u8; 2],
    pub _pad: [u8; 2],
    pub svc_id: u32,
    pub backend_id: u32,
}

/// Value of [`CONFIG6_MAP`] at index 0: what [`Config`] says per family.
/// The SNAT port range and [`CFG_F_MASQUERADE_ALL`] are read from
/// [`Config`] for both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Config6 {
    /// Source given to a pod's connection that a service balanced back to
    /// the pod itself (hairpin). Not link-local: a pod resolves fe80::/64
    /// on its own link, where nothing answers for it.
    pub hairpin_addr: [u8; 16],
    /// The IPv6 `--cluster-cidr` (with [`CFG_F_CLUSTER_CIDR`] in
    /// [`Config6::flags`]): as [`Config::cluster_cidr`].
    pub cluster_cidr: [u8; 16],
    pub cluster_cidr_len: u8,
    /// [`CFG_F_CLUSTER_CIDR`] only ([`CFG_F_MASQUERADE_ALL`] is read from
    /// [`Config`]).
    pub flags: u8,
    pub _pad: [u8; 2],
    /// IPv6 service CIDRs (prefix length 0: unused), as
    /// [`Config::service_cidrs`].
    pub service_cidrs: [[u8; 16]; SERVICE_CIDRS],
    pub service_cidr_lens: [u8; SERVICE_CIDRS],
}

/// Default IPv6 hairpin source: a unique-local address that no cluster
/// should use (fd6b:6570::/32 spells "kep"), never routed off the node.
pub const HAIRPIN_ADDR6: [u8; 16] = [
    0xfd, 0x6b, 0x65, 0x70, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x2a, 0x01,
];

/// Whether `addr` is inside `net/len` (len 0: never, an unset prefix).
/// In 64-bit halves: BPF has no 128-bit shifts.
#[inline(always)]
pub fn in_prefix6(addr: [u8; 16], net: [u8; 16], len: u8) -> bool {
    if len == 0 || len > 128 {
        return false;
    }
    let half = |a: &[u8; 16], i: usize| {
        u64::from_be_bytes([
            a[i],
            a[i + 1],
            a[i + 2],
            a[i + 3],
            a[i + 4],
            a[i + 5],
            a[i + 6],
            a[i + 7],
        ])
    };
    // Whether the top `bits` bits of `diff` are zero.
    let same = |diff: u64, bits: u32| bits == 0 || diff >> (64 - bits) == 0;
    let len = len as u32;
    same(half(&addr, 0) ^ half(&net, 0), len.min(64))
        && same(half(&addr, 8) ^ half(&net, 8), len.saturating_sub(64))
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: as for the IPv4 types: repr(C), bytemuck::Pod.
    unsafe impl aya::Pod for SvcKey6 {}
    unsafe impl aya::Pod for Backend6 {}
    unsafe impl aya::Pod for AddrKey6 {}
    unsafe impl aya::Pod for FlowKey6 {}
    unsafe impl aya::Pod for NatEntry6 {}
    unsafe impl aya::Pod for FragKey6 {}
    unsafe impl aya::Pod for AffKey6 {}
    unsafe impl aya::Pod for SrcRangeKey6 {}
    unsafe impl aya::Pod for Config6 {}
    unsafe impl aya::Pod for SockRevKey6 {}
    unsafe impl aya::Pod for SockFwdKey6 {}
    unsafe impl aya::Pod for SockNat6 {}
    unsafe impl aya::Pod for SockPeer6 {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn sizes_are_stable() {
        // A failing assertion here means a layout changed: bump the map
        // name's version suffix.
        assert_eq!(size_of::<SvcKey6>(), 20);
        assert_eq!(size_of::<Backend6>(), 20);
        assert_eq!(size_of::<AddrKey6>(), 16);
        assert_eq!(size_of::<FlowKey6>(), 40);
        #[cfg(not(feature = "layout-v2-test"))]
        assert_eq!(size_of::<NatEntry6>(), 48);
        #[cfg(feature = "layout-v2-test")]
        assert_eq!(size_of::<NatEntry6>(), 56);
        assert_eq!(size_of::<FragKey6>(), 40);
        assert_eq!(size_of::<AffKey6>(), 20);
        assert_eq!(size_of::<SrcRangeKey6>(), 20);
        assert_eq!(size_of::<Config6>(), 104);
        assert_eq!(size_of::<SockRevKey6>(), 32);
        assert_eq!(size_of::<SockFwdKey6>(), 32);
        assert_eq!(size_of::<SockNat6>(), 28);
        assert_eq!(size_of::<SockPeer6>(), 36);
    }

    #[test]
    fn v6_maps_are_all_maps() {
        for name in V6_MAPS {
            assert!(ALL_MAPS.contains(&name), "{name} missing from ALL_MAPS");
        }
    }

    #[test]
    fn v6_prefixes_match_by_leading_bits() {
        let net = [0xfd, 0, 0x10, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let mut inside = net;
        inside[15] = 10;
        assert!(in_prefix6(inside, net, 108));
        assert!(in_prefix6(inside, inside, 128));
        let mut outside = net;
        outside[3] = 0x97;
        assert!(!in_prefix6(outside, net, 32));
        assert!(!in_prefix6(inside, [0; 16], 0), "len 0 is unset");
    }
}
