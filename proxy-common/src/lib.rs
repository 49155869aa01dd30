//! Map key and value types shared by the eBPF datapath and the userspace
//! controller.
//!
//! # Layout rules
//!
//! * Every type is `#[repr(C)]` and derives [`bytemuck::Pod`], which refuses
//!   to compile if the compiler would insert hidden padding: every padding
//!   byte is an explicit `_pad` field that writers set to zero, so two keys
//!   that mean the same thing are the same bytes.
//! * Addresses and ports are byte arrays in wire (network) order. The datapath
//!   copies them straight out of packets, the layout is identical on every
//!   host, and `bpftool map dump` prints them as bytes (`[10,96,0,10]`).
//! * A map's name carries a version suffix (`_V1`). A change to a key or value
//!   layout, or to what a field means, bumps the suffix: a daemon of the new
//!   version then creates fresh maps next to the pinned old ones instead of
//!   misreading them, and `cleanup` removes both.
//! * Map names fit the kernel's 15 usable characters.
//!
//! The maps are kept apart by job, as in Cilium's `lb.h`: frontends
//! ([`SvcKey`] → [`SvcValue`]), backend slots ([`SlotKey`] → [`SlotValue`]),
//! backends ([`BackendKey`] → [`Backend`]), address classes
//! ([`AddrKey`] → [`AddrValue`]), and the two halves of connection tracking:
//! original-direction entries ([`CT_MAP`]) and reply-direction reverse-NAT
//! entries ([`RNAT_MAP`]), both [`FlowKey`] → [`NatEntry`].
//!
//! IPv6 has twins of the maps that hold addresses (`KEP_SVC6_V1` ...), in
//! [`v6`]; the maps without addresses serve both families.
#![no_std]

use bytemuck::{Pod, Zeroable};

pub mod filter;
pub mod layout;
pub mod v6;
pub use filter::*;
pub use v6::*;

/// Frontends: (address, port, protocol) → service port. NodePorts use the
/// address 0.0.0.0 and apply to every address in [`ADDR_MAP`] with the
/// [`ADDR_NODEPORT`] bit.
pub const SVC_MAP: &str = "KEP_SVC_V2";
/// Backend slots of a service port: (service port id, generation, slot) →
/// backend id.
pub const SLOT_MAP: &str = "KEP_SLOT_V1";
/// Backends: backend id → address, port, protocol and flags.
pub const BACKEND_MAP: &str = "KEP_BE_V1";
/// Address classes: a bitmask of `ADDR_*` per address (ClusterIP, NodePort
/// address, externalIP/LB IP, address of this node).
pub const ADDR_MAP: &str = "KEP_ADDR_V2";
/// Connection tracking, original direction: the flow as the client sent it →
/// the tuple it is rewritten to.
#[cfg(not(feature = "layout-v2-test"))]
pub const CT_MAP: &str = "KEP_CT_V1";
/// The test layout's conntrack ([`layout`]).
#[cfg(feature = "layout-v2-test")]
pub const CT_MAP: &str = "KEP_CT_V2";
/// Reverse NAT, reply direction: the reply as the backend sends it → the
/// tuple the client expects.
#[cfg(not(feature = "layout-v2-test"))]
pub const RNAT_MAP: &str = "KEP_RNAT_V1";
/// The test layout's reverse NAT ([`layout`]).
#[cfg(feature = "layout-v2-test")]
pub const RNAT_MAP: &str = "KEP_RNAT_V2";
/// Fragments: first fragment's (addresses, IP id, protocol) → its ports, so
/// later fragments of a datagram follow the first one.
pub const FRAG_MAP: &str = "KEP_FRAG_V1";
/// Per-CPU packet counters, indexed by [`Counter`].
pub const STATS_MAP: &str = "KEP_STATS_V2";
/// Datapath configuration, a single [`Config`] at index 0.
pub const CONFIG_MAP: &str = "KEP_CFG_V2";
/// sessionAffinity ClientIP: (service port id, client address) → the
/// client's backend and when it last opened a flow (LRU, [`AFF_MAP_SIZE`]).
pub const AFF_MAP: &str = "KEP_AFF_V1";
/// Backends an affinity frontend may still use: (service port id, backend
/// id) → 1. An affine backend that left this set is replaced at once.
pub const AFFMEM_MAP: &str = "KEP_AFFMEM_V1";
/// loadBalancerSourceRanges (LPM trie): (service port id, source prefix) → 1.
pub const SRCRNG_MAP: &str = "KEP_SRCRNG_V1";
/// Per-CPU traffic counters of each service port, indexed by service port id
/// ([`SvcStats`]).
pub const SVC_STATS_MAP: &str = "KEP_SVCSTAT_V1";
/// Names of the service ports (`namespace/name:port`), by service port id
/// ([`SvcName`]): inspection works from the pins alone, daemon or not.
pub const NAME_MAP: &str = "KEP_NAME_V1";

/// Socket-level load balancing of a connected socket, reverse direction:
/// the socket's own storage (`BPF_MAP_TYPE_SK_STORAGE`) holding the
/// backend `connect()` was sent to and the service it dialed
/// ([`SockPeer`]), so that `getpeername()` and the source of a received
/// datagram show the service. The kernel frees it with the socket: no
/// hash insert per connection, nothing to evict. Userspace cannot list it.
pub const SOCK_PEER_MAP: &str = "KEP_SKPEER_V1";
/// Socket-level load balancing of unconnected UDP, reverse direction:
/// (socket cookie, backend address and port) → the service address the
/// socket sent to, so that the source of a received datagram shows the
/// service. One socket may send to many services, so this is a hash, not
/// the socket's storage. (Sockets connected by an earlier version that
/// wrote every socket here are still read.)
pub const SOCK_RNAT_MAP: &str = "KEP_SKRNAT_V1";
/// Socket-level load balancing of unconnected UDP: (socket cookie, service
/// address, port) → the backend chosen for it, so every datagram a socket
/// sends to one service goes to one backend, as the conntrack entry of the
/// per-packet path keeps it.
pub const SOCK_FWD_MAP: &str = "KEP_SKFWD_V1";

/// Devices a translated packet may be handed straight to the peer of
/// (bpf_redirect_peer): a bitmap of ifindexes, [`PEER_DEV_WORDS`] words of
/// 64 bits, a bit set for each veth of this namespace whose peer is in
/// another one (a pod's). Filled by the daemon as it attaches to devices;
/// not pinned (each load fills its own), so not in [`ALL_MAPS`].
pub const PEER_DEV_MAP: &str = "KEP_PEERDEV";
/// Whether an older datapath runs behind this one on the same hooks, and
/// what it gets: a `u32` at index 0, `UPGRADE_*`, set during an upgrade to
/// a new map layout (see proxy-userspace's `datapath/migrate.rs`). Never
/// pinned: each load has its own, so that the older programs, which may
/// share every other map, never read the newer ones' value.
pub const UPGRADE_MAP: &str = "KEP_UPGRADE";
/// [`UPGRADE_MAP`]: no older datapath behind; every packet is handled.
pub const UPGRADE_ALONE: u32 = 0;
/// [`UPGRADE_MAP`]: the new programs are being attached in front of the
/// older ones, device by device: they hand on every packet they would act
/// on, so that a flow is served by one datapath on every device it
/// crosses.
pub const UPGRADE_ATTACHING: u32 = 1;
/// [`UPGRADE_MAP`]: attached everywhere, the older maps being carried
/// over: the new programs open flows (TCP SYNs) and serve those they have
/// entries for, and hand the rest to the older programs.
pub const UPGRADE_OLDER_BEHIND: u32 = 2;

/// Every map name, for pinning and cleanup (the IPv6 ones included).
pub const ALL_MAPS: [&str; 32] = [
    SVC_MAP,
    SLOT_MAP,
    BACKEND_MAP,
    ADDR_MAP,
    CT_MAP,
    RNAT_MAP,
    FRAG_MAP,
    STATS_MAP,
    CONFIG_MAP,
    SVC_STATS_MAP,
    NAME_MAP,
    AFF_MAP,
    AFFMEM_MAP,
    SRCRNG_MAP,
    SOCK_PEER_MAP,
    SOCK_RNAT_MAP,
    SOCK_FWD_MAP,
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
    ADDR_FILTER_MAP,
    ENDPOINT_FILTER_MAP,
    REPLY_SOURCE_MAP,
];

/// Capacities. Hash maps holding desired state are created without
/// preallocation, so capacity costs memory only when used.
pub const SVC_MAP_SIZE: u32 = 262_144;
pub const SLOT_MAP_SIZE: u32 = 2_097_152;
pub const BACKEND_MAP_SIZE: u32 = 1_048_576;
pub const ADDR_MAP_SIZE: u32 = 262_144;
pub const CT_MAP_SIZE: u32 = 262_144;
pub const RNAT_MAP_SIZE: u32 = 262_144;
pub const FRAG_MAP_SIZE: u32 = 8_192;
/// Client addresses remembered for sessionAffinity, all Services together;
/// the least recently used is forgotten first.
pub const AFF_MAP_SIZE: u32 = 65_536;
pub const AFFMEM_MAP_SIZE: u32 = 1_048_576;
pub const SRCRNG_MAP_SIZE: u32 = 65_536;
/// One entry per (unconnected UDP socket, backend) pair; sockets connected
/// before an upgrade from a version that kept every socket here hold
/// theirs until they close or are evicted.
pub const SOCK_RNAT_MAP_SIZE: u32 = 262_144;
/// One entry per (unconnected UDP socket, service) pair.
pub const SOCK_FWD_MAP_SIZE: u32 = 65_536;
/// Words of [`PEER_DEV_MAP`]: ifindexes below 2^20 (128 KiB). A node
/// allocates ifindexes upwards, one or two per pod it ever ran; a device
/// above the range takes the plain redirect.
pub const PEER_DEV_WORDS: u32 = 16_384;
/// Service port ids are below this (the syncer reuses freed ids).
pub const SVC_ID_LIMIT: u32 = SVC_MAP_SIZE;

/// Names of the TC programs in the object.
pub const PROG_INGRESS: &str = "kep_ingress";
pub const PROG_EGRESS: &str = "kep_egress";
/// A program that only returns; the benchmark's baseline.
pub const PROG_NOOP: &str = "kep_noop";
/// Socket-level load balancing: cgroup programs, attached to the cgroup v2
/// root. `connect()` (TCP and UDP) and `sendmsg()` (unconnected UDP) to a
/// service go straight to a backend; `recvmsg()` and `getpeername()` show
/// the service address again.
pub const PROG_CONNECT4: &str = "kep_connect4";
pub const PROG_SENDMSG4: &str = "kep_sendmsg4";
pub const PROG_RECVMSG4: &str = "kep_recvmsg4";
pub const PROG_GETPEERNAME4: &str = "kep_getpeername4";
/// Every socket-level program, IPv6 ones included.
pub const SOCK_PROGS: [&str; 8] = [
    PROG_CONNECT4,
    PROG_SENDMSG4,
    PROG_RECVMSG4,
    PROG_GETPEERNAME4,
    PROG_CONNECT6,
    PROG_SENDMSG6,
    PROG_RECVMSG6,
    PROG_GETPEERNAME6,
];

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Identifiers of service ports, below [`SVC_ID_LIMIT`].
pub type SvcId = u32;

/// Key of [`SVC_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SvcKey {
    /// Service address; 0.0.0.0 for a NodePort.
    pub addr: [u8; 4],
    pub port: [u8; 2],
    /// [`IPPROTO_TCP`] or [`IPPROTO_UDP`].
    pub proto: u8,
    pub _pad: u8,
}

/// The frontend is reached from outside the cluster (a NodePort, an
/// externalIP or a load-balancer IP): traffic to a backend on another node is
/// SNATed to this node so the reply comes back through it, as kube-proxy does
/// for externalTrafficPolicy Cluster.
pub const SVC_F_EXTERNAL: u16 = 1;
/// externalTrafficPolicy Local: external sources use the local set (and are
/// dropped, not rejected, when it is empty); internal sources (pods of
/// `--cluster-cidr`, this node) use the primary set. Client address kept.
pub const SVC_F_ETP_LOCAL: u16 = 2;
/// An empty primary set drops instead of rejecting (internalTrafficPolicy
/// Local with endpoints on other nodes only, as kube-proxy).
pub const SVC_F_DROP_EMPTY: u16 = 4;
/// sessionAffinity ClientIP, for [`SvcValue::affinity_timeout`] seconds.
pub const SVC_F_AFFINITY: u16 = 8;
/// loadBalancerSourceRanges apply: sources outside [`SRCRNG_MAP`]'s
/// prefixes of this service port are dropped.
pub const SVC_F_SRC_RANGES: u16 = 16;

/// Value of [`SVC_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SvcValue {
    /// Service port id: names the service port in counters and inspection,
    /// and is the first half of its slot keys.
    pub svc_id: SvcId,
    /// Generation of the slots in use. A new backend set is written under a
    /// new generation and becomes visible with the single update of this
    /// value, so a packet sees either the old set or the new one.
    pub generation: u16,
    /// The primary set: slots `[0, count)` of that generation; 0 means no
    /// ready endpoint, and new connections are rejected with ICMP port
    /// unreachable (dropped with [`SVC_F_DROP_EMPTY`]).
    pub count: u16,
    /// The local set ([`SVC_F_ETP_LOCAL`] only): slots
    /// `[count, count + local_count)`, this node's endpoints.
    pub local_count: u16,
    /// `SVC_F_*`.
    pub flags: u16,
    /// Seconds a client keeps its backend without opening a new flow
    /// ([`SVC_F_AFFINITY`] only).
    pub affinity_timeout: u32,
}

/// Key of [`SLOT_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SlotKey {
    pub svc_id: u32,
    pub generation: u16,
    pub slot: u16,
}

/// Value of [`SLOT_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SlotValue {
    pub backend_id: u32,
}

/// Key of [`BACKEND_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct BackendKey {
    pub backend_id: u32,
}

/// The backend runs on this node: NodePort traffic to it keeps the client's
/// source address.
pub const BE_F_LOCAL: u8 = 1;

/// Value of [`BACKEND_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Backend {
    pub addr: [u8; 4],
    pub port: [u8; 2],
    pub proto: u8,
    /// `BE_F_*`.
    pub flags: u8,
}

/// Key of [`ADDR_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct AddrKey {
    pub addr: [u8; 4],
}

/// A ClusterIP: ports that are not frontends are rejected.
pub const ADDR_CLUSTER_IP: u8 = 1;
/// An address of this node that NodePorts answer on.
pub const ADDR_NODEPORT: u8 = 2;
/// An externalIP or load-balancer IP: only its own (port, protocol)
/// frontends are ours; everything else to it passes untouched (it may be an
/// address of the node, whose SSH and kubelet must keep working).
pub const ADDR_EXTERNAL: u8 = 4;
/// Any address of this node: replies that local processes (hostNetwork
/// backends) send from it need reverse NAT on egress.
pub const ADDR_HOST: u8 = 8;

/// Value of [`ADDR_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct AddrValue {
    /// A bitmask of `ADDR_*`.
    pub class: u8,
    pub _pad: [u8; 3],
}

/// Key of [`AFF_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct AffKey {
    pub svc_id: SvcId,
    pub client: [u8; 4],
}

/// Value of [`AFF_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct AffValue {
    pub backend_id: u32,
    /// Seconds since boot (monotonic clock) of the client's last new flow.
    pub last_seen: u32,
}

/// Key of [`AFFMEM_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct AffMemberKey {
    pub svc_id: SvcId,
    pub backend_id: u32,
}

/// Data of an [`SRCRNG_MAP`] key (behind the LPM trie's prefix length,
/// which is 32 + the range's prefix length: the service port id always
/// matches in full).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SrcRangeKey {
    /// Service port id, big-endian (LPM tries match bytes from the first).
    pub svc_id: [u8; 4],
    pub addr: [u8; 4],
}

impl SrcRangeKey {
    /// The trie key of `addr/len` for a service port.
    pub const fn prefix_len(range_len: u8) -> u32 {
        32 + range_len as u32
    }
}

/// A flow as seen on the wire: key of [`CT_MAP`] and [`RNAT_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct FlowKey {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl FlowKey {
    /// The same flow seen from the other end.
    pub const fn reversed(&self) -> FlowKey {
        FlowKey {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// The source was rewritten too (NodePort to a remote backend).
pub const NAT_F_SNAT: u8 = 1;
/// A FIN or RST was seen in this entry's direction: a later SYN on this
/// tuple starts a new connection. On a SNATed flow's conntrack and
/// reverse-NAT entries both, its SNAT port may be given to a new flow.
pub const NAT_F_CLOSING: u8 = 2;
/// The entry was created by the egress program (a process of the node).
pub const NAT_F_HOST: u8 = 4;
/// Deliver the translated packet into the node's own stack through lo's
/// ingress: its source and destination are both addresses of this node, and
/// arriving on any other device it would be dropped as a martian.
pub const NAT_F_TO_LO: u8 = 8;
/// An RST was seen in this entry's direction: the connection is gone, and
/// its SNAT port may be given to a new flow.
pub const NAT_F_RESET: u8 = 16;
/// Carried over from an earlier map layout by an upgrade (see
/// proxy-userspace's `datapath/migrate.rs`): while the older datapath runs
/// behind the new one, the older maps hold its current state (the older
/// programs may have given its tuple or port to a new flow since the
/// copy), so the new programs hand its packets on.
pub const NAT_F_CARRIED: u8 = 32;

/// Value of [`CT_MAP`] and [`RNAT_MAP`]: rewrite the packet to this tuple.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct NatEntry {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    /// Service port the flow was balanced by.
    pub svc_id: u32,
    /// Backend chosen for the flow.
    pub backend_id: u32,
    /// `NAT_F_*`.
    pub flags: u8,
    pub _pad: [u8; 3],
    /// The field the test layout adds ([`layout`], feature
    /// `layout-v2-test` only).
    #[cfg(feature = "layout-v2-test")]
    pub v2_test: [u8; 8],
}

/// Key of [`FRAG_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FragKey {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub id: [u8; 2],
    pub proto: u8,
    pub _pad: u8,
}

/// Value of [`FRAG_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FragValue {
    pub sport: [u8; 2],
    pub dport: [u8; 2],
}

/// Key of [`SOCK_RNAT_MAP`]: a backend as one socket sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockRevKey {
    /// The socket's cookie (`bpf_get_socket_cookie`), unique while it lives.
    pub cookie: u64,
    pub addr: [u8; 4],
    pub port: [u8; 2],
    pub _pad: [u8; 2],
}

/// Value of [`SOCK_PEER_MAP`]: the backend a connected socket was sent to
/// and the service address it dialed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockPeer {
    pub backend: [u8; 4],
    pub service: [u8; 4],
    pub backend_port: [u8; 2],
    pub service_port: [u8; 2],
}

/// Key of [`SOCK_FWD_MAP`]: a service address as one socket dialed it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockFwdKey {
    pub cookie: u64,
    pub addr: [u8; 4],
    pub port: [u8; 2],
    pub _pad: [u8; 2],
}

/// Value of [`SOCK_RNAT_MAP`] (the service address) and of [`SOCK_FWD_MAP`]
/// (the backend address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockNat {
    pub addr: [u8; 4],
    pub port: [u8; 2],
    pub _pad: [u8; 2],
    pub svc_id: u32,
    pub backend_id: u32,
}

/// Value of [`SVC_STATS_MAP`]: both directions of the service port's flows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SvcStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

impl SvcStats {
    /// The sum of per-CPU (or per-frontend) counters.
    pub fn sum<'a>(all: impl IntoIterator<Item = &'a SvcStats>) -> SvcStats {
        all.into_iter().fold(SvcStats::default(), |a, s| SvcStats {
            packets: a.packets + s.packets,
            bytes: a.bytes + s.bytes,
            new_flows: a.new_flows + s.new_flows,
        })
    }
}

/// Longest `namespace/name:port` kept (63 + 1 + 63 + 1 + 15 fits).
pub const SVC_NAME_LEN: usize = 160;

/// Value of [`NAME_MAP`]: the name, NUL-padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct SvcName {
    pub name: [u8; SVC_NAME_LEN],
}

impl SvcName {
    /// Truncates names that do not fit.
    pub fn new(name: &str) -> SvcName {
        let mut out = [0u8; SVC_NAME_LEN];
        let n = name.len().min(SVC_NAME_LEN);
        out[..n].copy_from_slice(&name.as_bytes()[..n]);
        SvcName { name: out }
    }

    pub fn as_str(&self) -> &str {
        let end = self
            .name
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(SVC_NAME_LEN);
        core::str::from_utf8(&self.name[..end]).unwrap_or("<invalid utf-8>")
    }
}

/// `--cluster-cidr` is set: [`Config::cluster_cidr`] is valid.
pub const CFG_F_CLUSTER_CIDR: u8 = 1;
/// `--masquerade-all`: every new flow from outside this node is SNATed.
pub const CFG_F_MASQUERADE_ALL: u8 = 2;
/// `--devices`: only some devices have the ingress program, so a packet
/// that arrived on another one may reach the egress hook untranslated.
/// Without it, the egress hook leaves every packet that arrived on a device
/// alone (the ingress hook there handled it) and only handles what the
/// node itself sends.
pub const CFG_F_SOME_DEVICES: u8 = 4;
/// `--bpf-host-routing`: traffic to or from a service's endpoint that needs
/// no translation (a socket-balanced connection, a pod dialing a backend's
/// own address) is sent on from the ingress hook by a FIB lookup and a
/// redirect, as translated traffic is, instead of the stack's forwarding
/// path (and the netfilter hooks on it).
pub const CFG_F_HOST_ROUTING: u8 = 8;
/// Most service CIDRs the datapath checks for unallocated addresses.
pub const SERVICE_CIDRS: usize = 4;

/// Value of [`CONFIG_MAP`] at index 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Config {
    /// Source ports used when NodePort traffic is SNATed, host byte order,
    /// inclusive. Kept out of the node's ephemeral range so they cannot
    /// collide with the node's own connections.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// Source address given to a pod's connection that a service balanced
    /// back to the pod itself (hairpin): the pod would drop a packet from
    /// its own address, so it sees this link-local address instead.
    pub hairpin_addr: [u8; 4],
    /// `--cluster-cidr` (with [`CFG_F_CLUSTER_CIDR`]): sources inside are
    /// pods; ClusterIP traffic from elsewhere to a remote backend is SNATed,
    /// and counts as external for externalTrafficPolicy Local.
    pub cluster_cidr: [u8; 4],
    pub cluster_cidr_len: u8,
    /// `CFG_F_*`.
    pub flags: u8,
    pub _pad: [u8; 2],
    /// Service CIDRs (prefix length 0: unused). A destination inside one
    /// that is no ClusterIP is dropped.
    pub service_cidrs: [[u8; 4]; SERVICE_CIDRS],
    pub service_cidr_lens: [u8; SERVICE_CIDRS],
}

/// Whether `addr` is inside `net/len` (len 0: never, an unset prefix).
#[inline(always)]
pub fn in_prefix(addr: [u8; 4], net: [u8; 4], len: u8) -> bool {
    if len == 0 || len > 32 {
        return false;
    }
    let mask = u32::MAX << (32 - len as u32);
    (u32::from_be_bytes(addr) ^ u32::from_be_bytes(net)) & mask == 0
}

/// Default SNAT source port range: above Linux's default ephemeral range
/// (32768-60999) and the NodePort range (30000-32767).
pub const SNAT_PORT_MIN: u16 = 61_000;
pub const SNAT_PORT_MAX: u16 = 65_535;
/// Default hairpin source address (link-local, never routed off the node).
pub const HAIRPIN_ADDR: [u8; 4] = [169, 254, 42, 1];

/// Datapath counters, the index into [`STATS_MAP`]. Drop reasons are also the
/// metric label values (see [`Counter::name`]).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A new flow was balanced to a backend.
    NewFlow = 0,
    /// A packet of a tracked flow was translated towards its backend.
    Forward = 1,
    /// A reply was translated back to the service address.
    Reply = 2,
    /// A packet was rejected: service port without ready endpoint.
    DropNoEndpoint = 3,
    /// A packet was rejected: port that is no frontend of a ClusterIP.
    DropUnknownPort = 4,
    /// A header was truncated or malformed.
    DropMalformed = 5,
    /// No free SNAT source port for a NodePort flow.
    DropNoSnatPort = 6,
    /// A later fragment whose first fragment was not seen.
    DropFragment = 7,
    /// A map lookup or update failed (full map, missing slot).
    DropMapError = 8,
    /// A packet was rewritten or redirected by a helper that failed.
    DropHelperError = 9,
    /// ICMP errors about a translated flow, translated back.
    IcmpError = 10,
    /// Dropped: externalTrafficPolicy (or internalTrafficPolicy) Local and
    /// no endpoint on this node.
    DropNoLocalEndpoint = 11,
    /// Dropped: source outside the loadBalancerSourceRanges.
    DropSourceRange = 12,
    /// Dropped: an address of a service CIDR that no Service holds.
    DropUnallocated = 13,
    /// A socket's connect() or sendmsg() to a service was sent straight to a
    /// backend (socket-level load balancing).
    SocketLb = 14,
    /// A TCP segment that opens nothing (no SYN) found no conntrack entry
    /// (evicted from the full LRU map, or from before the map was reset)
    /// and was balanced again: to the same backend while the service's
    /// backend set is unchanged, since the pick hashes the flow's tuple.
    FlowRecreated = 15,
}

pub const COUNTER_COUNT: u32 = 16;

impl Counter {
    pub const ALL: [Counter; COUNTER_COUNT as usize] = [
        Counter::NewFlow,
        Counter::Forward,
        Counter::Reply,
        Counter::DropNoEndpoint,
        Counter::DropUnknownPort,
        Counter::DropMalformed,
        Counter::DropNoSnatPort,
        Counter::DropFragment,
        Counter::DropMapError,
        Counter::DropHelperError,
        Counter::IcmpError,
        Counter::DropNoLocalEndpoint,
        Counter::DropSourceRange,
        Counter::DropUnallocated,
        Counter::SocketLb,
        Counter::FlowRecreated,
    ];

    /// Stable name, used as a metric label.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::NewFlow => "new_flow",
            Counter::Forward => "forward",
            Counter::Reply => "reply",
            Counter::DropNoEndpoint => "no_endpoint",
            Counter::DropUnknownPort => "unknown_port",
            Counter::DropMalformed => "malformed",
            Counter::DropNoSnatPort => "no_snat_port",
            Counter::DropFragment => "fragment",
            Counter::DropMapError => "map_error",
            Counter::DropHelperError => "helper_error",
            Counter::IcmpError => "icmp_error",
            Counter::DropNoLocalEndpoint => "no_local_endpoint",
            Counter::DropSourceRange => "source_range",
            Counter::DropUnallocated => "unallocated_service_ip",
            Counter::SocketLb => "socket_lb",
            Counter::FlowRecreated => "flow_recreated",
        }
    }

    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Counter::DropNoEndpoint
                | Counter::DropUnknownPort
                | Counter::DropMalformed
                | Counter::DropNoSnatPort
                | Counter::DropFragment
                | Counter::DropMapError
                | Counter::DropHelperError
                | Counter::DropNoLocalEndpoint
                | Counter::DropSourceRange
                | Counter::DropUnallocated
        )
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: every type is repr(C), bytemuck::Pod (no padding, any bit
    // pattern valid), which is what aya::Pod requires.
    unsafe impl aya::Pod for SvcKey {}
    unsafe impl aya::Pod for SvcValue {}
    unsafe impl aya::Pod for SlotKey {}
    unsafe impl aya::Pod for SlotValue {}
    unsafe impl aya::Pod for BackendKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for AddrKey {}
    unsafe impl aya::Pod for AddrValue {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for NatEntry {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragValue {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for SvcStats {}
    unsafe impl aya::Pod for SvcName {}
    unsafe impl aya::Pod for AffKey {}
    unsafe impl aya::Pod for AffValue {}
    unsafe impl aya::Pod for AffMemberKey {}
    unsafe impl aya::Pod for SrcRangeKey {}
    unsafe impl aya::Pod for SockRevKey {}
    unsafe impl aya::Pod for SockFwdKey {}
    unsafe impl aya::Pod for SockNat {}
    unsafe impl aya::Pod for SockPeer {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn sizes_are_stable() {
        // A failing assertion here means a layout changed: bump the map
        // name's version suffix.
        assert_eq!(size_of::<SvcKey>(), 8);
        assert_eq!(size_of::<SvcValue>(), 16);
        assert_eq!(size_of::<SlotKey>(), 8);
        assert_eq!(size_of::<SlotValue>(), 4);
        assert_eq!(size_of::<Backend>(), 8);
        assert_eq!(size_of::<AddrValue>(), 4);
        assert_eq!(size_of::<FlowKey>(), 16);
        #[cfg(not(feature = "layout-v2-test"))]
        assert_eq!(size_of::<NatEntry>(), 24);
        #[cfg(feature = "layout-v2-test")]
        assert_eq!(size_of::<NatEntry>(), 32);
        assert_eq!(size_of::<FragKey>(), 12);
        assert_eq!(size_of::<Config>(), 36);
        assert_eq!(size_of::<AffKey>(), 8);
        assert_eq!(size_of::<AffValue>(), 8);
        assert_eq!(size_of::<AffMemberKey>(), 8);
        assert_eq!(size_of::<SrcRangeKey>(), 8);
        assert_eq!(size_of::<SvcStats>(), 24);
        assert_eq!(size_of::<SvcName>(), SVC_NAME_LEN);
        assert_eq!(size_of::<SockRevKey>(), 16);
        assert_eq!(size_of::<SockFwdKey>(), 16);
        assert_eq!(size_of::<SockNat>(), 16);
        assert_eq!(size_of::<SockPeer>(), 12);
    }

    #[test]
    fn map_names_fit_the_kernel() {
        for name in ALL_MAPS {
            assert!(name.len() <= 15, "{name} is too long");
        }
    }

    #[test]
    fn names_round_trip_and_truncate() {
        assert_eq!(SvcName::new("ns/web:http").as_str(), "ns/web:http");
        let long = "x".repeat(300);
        assert_eq!(SvcName::new(&long).as_str().len(), SVC_NAME_LEN);
    }

    #[test]
    fn counter_table_is_complete() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }

    #[test]
    fn prefixes_match_by_leading_bits() {
        assert!(in_prefix([10, 244, 3, 7], [10, 244, 0, 0], 16));
        assert!(!in_prefix([10, 245, 0, 1], [10, 244, 0, 0], 16));
        assert!(in_prefix([1, 2, 3, 4], [1, 2, 3, 4], 32));
        assert!(!in_prefix([1, 2, 3, 4], [0, 0, 0, 0], 0), "len 0 is unset");
        assert!(in_prefix([200, 0, 0, 1], [128, 0, 0, 0], 1));
    }

    #[test]
    fn reversed_flow_swaps_ends() {
        let k = FlowKey {
            saddr: [1, 1, 1, 1],
            daddr: [2, 2, 2, 2],
            sport: [0, 1],
            dport: [0, 2],
            proto: IPPROTO_TCP,
            _pad: [0; 3],
        };
        let r = k.reversed();
        assert_eq!(r.saddr, k.daddr);
        assert_eq!(r.dport, k.sport);
        assert_eq!(r.reversed(), k);
    }
}
