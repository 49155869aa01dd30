//! Socket-level load balancing: cgroup programs that translate a service
//! address once, when a socket names it, instead of every packet.
//!
//! A pod or a process of the node that connects to a ClusterIP (or to a
//! NodePort, on any node address) is connected straight to the backend the
//! service picks: its packets are addressed to the backend from the first
//! SYN on, so the per-packet programs find nothing to translate (no
//! conntrack, no reverse NAT). What the socket reports is translated back:
//!
//! | hook           | does                                                    |
//! |----------------|---------------------------------------------------------|
//! | `connect4`     | service → backend; the socket's storage keeps both      |
//! | `sendmsg4`     | unconnected UDP: the same, per datagram, sticky per socket, remembered by cookie |
//! | `recvmsg4`     | UDP: a datagram from the backend comes from the service |
//! | `getpeername4` | the peer is the service address                         |
//!
//! The `connect6`, `sendmsg6`, `recvmsg6` and `getpeername6` twins do the
//! same for IPv6 sockets with the IPv6 maps: the logic is written once over
//! [`SockFamily`].
//!
//! A connected socket keeps its translation in its own storage (an
//! SK_STORAGE map): writing it costs an allocation the kernel frees with
//! the socket, where a hash insert keyed by the socket's cookie (as
//! Cilium's `lb4_reverse_sk` is) cost about 500 ns of connect4's 700 and
//! left an entry behind for LRU eviction. An unconnected UDP socket may
//! send to many services, so its reverse entries are keyed by its cookie
//! in a hash, written only when they change. Either way one socket's
//! translation never shows in another's.
//!
//! The backend is chosen by [`lb::select`], the function the per-packet
//! path uses, with the client's scope internal (a pod or a process of this
//! node): session affinity, traffic policies and empty sets decide alike.
//! Affinity is keyed by the socket's network namespace (Cilium keys it by
//! the netns cookie too): the socket's own address is not chosen yet at
//! connect().
//!
//! What the programs leave alone goes on to the per-packet path, which
//! decides the same way: a UDP datagram to a service without endpoint (the
//! ICMP reject reaches the socket as before), a flow the service drops
//! (Local traffic policy without local endpoint), an externalTrafficPolicy
//! Local frontend while the cluster CIDR is unknown (then the per-packet
//! path counts pods as external clients), a frontend with
//! loadBalancerSourceRanges (they are checked against the source address,
//! which a socket does not have before connect()), everything while
//! `--masquerade-all` asks for SNAT, and anything that is not a frontend.

use aya_ebpf::{
    EbpfContext,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use proxy_common::*;

use crate::{
    family::{Addr, Be},
    lb::{self, Pick, Scope},
    maps::{
        KEP_SKFWD_V1, KEP_SKFWD6_V1, KEP_SKPEER_V1, KEP_SKPEER6_V1, KEP_SKRNAT_V1, KEP_SKRNAT6_V1,
        config_ref, count, count_service,
    },
};

/// Verdicts of a cgroup sock_addr program.
const ALLOW: i32 = 1;
const DENY: i32 = 0;
/// errno of a refused connection, which `bpf_set_retval` makes `connect()`
/// return instead of the EPERM of a plain denial.
const ECONNREFUSED: i32 = 111;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Call {
    Connect,
    Sendmsg,
}

#[cgroup_sock_addr(connect4)]
pub fn kep_connect4(ctx: SockAddrContext) -> i32 {
    forward::<[u8; 4]>(&ctx, Call::Connect)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn kep_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward::<[u8; 4]>(&ctx, Call::Sendmsg)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn kep_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse::<[u8; 4]>(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn kep_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse::<[u8; 4]>(&ctx);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn kep_connect6(ctx: SockAddrContext) -> i32 {
    forward::<[u8; 16]>(&ctx, Call::Connect)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn kep_sendmsg6(ctx: SockAddrContext) -> i32 {
    forward::<[u8; 16]>(&ctx, Call::Sendmsg)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn kep_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse::<[u8; 16]>(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn kep_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse::<[u8; 16]>(&ctx);
    ALLOW
}

/// A socket's service address or backend, of either family: the fields
/// of `SockNat` and `SockNat6`.
#[derive(Clone, Copy, PartialEq)]
pub struct SockNatOf<A> {
    pub addr: A,
    pub port: [u8; 2],
    pub svc_id: u32,
    pub backend_id: u32,
}

/// What the socket hooks need of a family beyond [`Addr`]: the socket
/// address fields and the socket maps.
pub trait SockFamily: Addr {
    /// The destination a socket names, as wire-order bytes.
    fn dest(ctx: &SockAddrContext) -> (Self, [u8; 2]);
    fn set_dest(ctx: &SockAddrContext, addr: Self, port: [u8; 2]);
    /// The affinity key of the socket's network namespace: an address no
    /// packet carries as its source.
    fn netns_client(netns: [u8; 4]) -> Self;
    /// The connected socket's own entry: the service it dialed, if it was
    /// sent to this backend.
    fn peer_service(ctx: &SockAddrContext, addr: Self, port: [u8; 2]) -> Option<(Self, [u8; 2])>;
    /// Keeps `backend` and the `service` it stands for in the socket's own
    /// storage.
    fn set_peer(
        ctx: &SockAddrContext,
        backend: &SockNatOf<Self>,
        service: &SockNatOf<Self>,
    ) -> bool;
    /// The reverse entry of an unconnected socket (backend as this socket
    /// sees it → service).
    fn service_of(cookie: u64, addr: Self, port: [u8; 2]) -> Option<SockNatOf<Self>>;
    fn set_service_of(cookie: u64, addr: Self, port: [u8; 2], nat: &SockNatOf<Self>) -> bool;
    /// The forward entry (service as this socket dialed it → backend).
    fn backend_for(cookie: u64, addr: Self, port: [u8; 2]) -> Option<SockNatOf<Self>>;
    fn set_backend_for(cookie: u64, addr: Self, port: [u8; 2], nat: &SockNatOf<Self>);
}

/// The socket maps of a family, keyed and valued by its types.
macro_rules! sock_maps {
    ($peer:ident, $peer_value:ident, $rnat:ident, $fwd:ident, $rev_key:ident, $fwd_key:ident, $nat:ident, $pad:expr) => {
        fn peer_service(
            ctx: &SockAddrContext,
            addr: Self,
            port: [u8; 2],
        ) -> Option<(Self, [u8; 2])> {
            // SAFETY: the storage of the context's own socket, read at once.
            let peer = unsafe { $peer.get_ptr_mut(ctx).as_ref() }?;
            (peer.backend == addr && peer.backend_port == port)
                .then_some((peer.service, peer.service_port))
        }

        fn set_peer(
            ctx: &SockAddrContext,
            backend: &SockNatOf<Self>,
            service: &SockNatOf<Self>,
        ) -> bool {
            // SAFETY: as in peer_service(); created zeroed if missing.
            let Some(peer) = (unsafe { $peer.get_or_insert_ptr_mut(ctx, None).as_mut() }) else {
                return false;
            };
            *peer = $peer_value {
                backend: backend.addr,
                service: service.addr,
                backend_port: backend.port,
                service_port: service.port,
            };
            true
        }

        fn service_of(cookie: u64, addr: Self, port: [u8; 2]) -> Option<SockNatOf<Self>> {
            let key = $rev_key {
                cookie,
                addr,
                port,
                _pad: $pad,
            };
            // SAFETY: copied out at once.
            unsafe { $rnat.get(key) }.map(|n| SockNatOf {
                addr: n.addr,
                port: n.port,
                svc_id: n.svc_id,
                backend_id: n.backend_id,
            })
        }

        fn set_service_of(cookie: u64, addr: Self, port: [u8; 2], n: &SockNatOf<Self>) -> bool {
            let key = $rev_key {
                cookie,
                addr,
                port,
                _pad: $pad,
            };
            let value = $nat {
                addr: n.addr,
                port: n.port,
                _pad: [0; 2],
                svc_id: n.svc_id,
                backend_id: n.backend_id,
            };
            $rnat.insert(key, value, 0).is_ok()
        }

        fn backend_for(cookie: u64, addr: Self, port: [u8; 2]) -> Option<SockNatOf<Self>> {
            let key = $fwd_key {
                cookie,
                addr,
                port,
                _pad: $pad,
            };
            // SAFETY: copied out at once.
            unsafe { $fwd.get(key) }.map(|n| SockNatOf {
                addr: n.addr,
                port: n.port,
                svc_id: n.svc_id,
                backend_id: n.backend_id,
            })
        }

        fn set_backend_for(cookie: u64, addr: Self, port: [u8; 2], n: &SockNatOf<Self>) {
            let key = $fwd_key {
                cookie,
                addr,
                port,
                _pad: $pad,
            };
            let value = $nat {
                addr: n.addr,
                port: n.port,
                _pad: [0; 2],
                svc_id: n.svc_id,
                backend_id: n.backend_id,
            };
            // Losing this entry only costs stickiness, never correctness.
            let _ = $fwd.insert(key, value, 0);
        }
    };
}

impl SockFamily for [u8; 4] {
    #[inline(always)]
    fn dest(ctx: &SockAddrContext) -> (Self, [u8; 2]) {
        // SAFETY: the context is valid for the program run; both fields are
        // read with the 4-byte loads the verifier requires.
        let (ip, port) = unsafe { ((*ctx.sock_addr).user_ip4, (*ctx.sock_addr).user_port) };
        // user_ip4 holds the address in network order and user_port the
        // port in network order in its low 16 bits: their in-memory bytes
        // are the wire's.
        (ip.to_ne_bytes(), (port as u16).to_ne_bytes())
    }

    #[inline(always)]
    fn set_dest(ctx: &SockAddrContext, addr: Self, port: [u8; 2]) {
        // SAFETY: as in dest(); both fields are writable for these hooks.
        unsafe {
            (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes(addr);
            (*ctx.sock_addr).user_port = u16::from_ne_bytes(port) as u32;
        }
    }

    /// In 0.0.0.0/8.
    #[inline(always)]
    fn netns_client(netns: [u8; 4]) -> Self {
        [0, netns[1], netns[2], netns[3]]
    }

    sock_maps!(
        KEP_SKPEER_V1,
        SockPeer,
        KEP_SKRNAT_V1,
        KEP_SKFWD_V1,
        SockRevKey,
        SockFwdKey,
        SockNat,
        [0; 2]
    );
}

impl SockFamily for [u8; 16] {
    #[inline(always)]
    fn dest(ctx: &SockAddrContext) -> (Self, [u8; 2]) {
        let mut addr = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            // SAFETY: as for IPv4, one 4-byte load per word.
            let w = unsafe { (*ctx.sock_addr).user_ip6[i] };
            addr[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            i += 1;
        }
        // SAFETY: as for IPv4.
        let port = unsafe { (*ctx.sock_addr).user_port };
        (addr, (port as u16).to_ne_bytes())
    }

    #[inline(always)]
    fn set_dest(ctx: &SockAddrContext, addr: Self, port: [u8; 2]) {
        let mut i = 0;
        while i < 4 {
            let w = u32::from_ne_bytes([
                addr[i * 4],
                addr[i * 4 + 1],
                addr[i * 4 + 2],
                addr[i * 4 + 3],
            ]);
            // SAFETY: writable for these hooks, one 4-byte store per word.
            unsafe { (*ctx.sock_addr).user_ip6[i] = w };
            i += 1;
        }
        // SAFETY: as for IPv4.
        unsafe { (*ctx.sock_addr).user_port = u16::from_ne_bytes(port) as u32 };
    }

    /// In ::/96 (the deprecated IPv4-compatible addresses).
    #[inline(always)]
    fn netns_client(netns: [u8; 4]) -> Self {
        let mut a = [0u8; 16];
        a[13..].copy_from_slice(&netns[1..]);
        a
    }

    sock_maps!(
        KEP_SKPEER6_V1,
        SockPeer6,
        KEP_SKRNAT6_V1,
        KEP_SKFWD6_V1,
        SockRevKey6,
        SockFwdKey6,
        SockNat6,
        [0; 6]
    );
}

#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: plain helper call on the program's own context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

#[inline(always)]
fn forward<A: SockFamily>(ctx: &SockAddrContext, call: Call) -> i32 {
    // SAFETY: the context is valid for the program run.
    let proto = unsafe { (*ctx.sock_addr).protocol } as u8;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return ALLOW;
    }
    let (addr, port) = A::dest(ctx);
    let class = addr.class();
    // With --masquerade-all every service connection is SNATed to the node,
    // which only the per-packet path does.
    if class == 0 || masquerade_all() {
        return ALLOW;
    }
    let Some(svc) = frontend(addr, port, proto, class) else {
        return if class & ADDR_CLUSTER_IP != 0 {
            refuse(proto, Counter::DropUnknownPort)
        } else {
            // The node's own traffic, or an external IP's other ports.
            ALLOW
        };
    };
    if svc.flags & SVC_F_SRC_RANGES != 0
        || (svc.flags & SVC_F_ETP_LOCAL != 0 && A::ZERO.in_cluster_cidr().is_none())
    {
        // Source ranges need the source address; ETP Local needs to know
        // pods as internal clients (the family's cluster CIDR), as
        // kube-proxy's detect-local: left to the per-packet path.
        return ALLOW;
    }
    // Only unconnected UDP keys its entries by the socket's cookie.
    let (cookie, pick) = match call {
        Call::Sendmsg => {
            let cookie = cookie(ctx);
            (cookie, sticky_backend(ctx, cookie, addr, port, &svc))
        }
        Call::Connect => (0, pick_backend(ctx, &svc)),
    };
    let be = match pick {
        Pick::Backend(backend_id, be) => SockNatOf {
            addr: be.addr,
            port: be.port,
            svc_id: svc.svc_id,
            backend_id,
        },
        Pick::Reject(reason) => return refuse(proto, reason),
        // Dropped (Local policy without local endpoint) or a map missing an
        // entry mid-update: the per-packet path decides, and drops alike.
        Pick::Drop(_) => return ALLOW,
    };
    // The reverse entry: this socket's backend shows as the service.
    let service = SockNatOf { addr, port, ..be };
    let remembered = match call {
        Call::Connect => A::set_peer(ctx, &be, &service),
        Call::Sendmsg => remember_service(cookie, &be, &service),
    };
    if !remembered {
        // Without the reverse entry the socket would see the backend's
        // address: leave this one to the per-packet path.
        count(Counter::DropMapError);
        return ALLOW;
    }
    A::set_dest(ctx, be.addr, be.port);
    count(Counter::SocketLb);
    ALLOW
}

/// An unconnected socket's reverse entry for `be`. Its datagrams to one
/// service all go to one backend, so the entry is written only when it is
/// new or changed: a write replaces an LRU element (a few hundred ns), a
/// lookup is a fraction of that.
#[inline(always)]
fn remember_service<A: SockFamily>(cookie: u64, be: &SockNatOf<A>, service: &SockNatOf<A>) -> bool {
    if A::service_of(cookie, be.addr, be.port).is_some_and(|known| known == *service) {
        return true;
    }
    A::set_service_of(cookie, be.addr, be.port, service)
}

#[inline(always)]
fn masquerade_all() -> bool {
    config_ref().is_some_and(|c| c.flags & CFG_F_MASQUERADE_ALL != 0)
}

/// The frontend a socket names: the address's own (ClusterIP, external IP)
/// or, on a NodePort address, the NodePort (the unspecified address); the
/// same order as the per-packet path's.
#[inline(always)]
fn frontend<A: Addr>(addr: A, port: [u8; 2], proto: u8, class: u8) -> Option<SvcValue> {
    if class & (ADDR_CLUSTER_IP | ADDR_EXTERNAL) != 0
        && let Some(svc) = A::service(addr, port, proto)
    {
        return Some(svc);
    }
    if class & ADDR_NODEPORT == 0 {
        return None;
    }
    A::service(A::ZERO, port, proto)
}

/// A service the TC path would reject with ICMP port unreachable. A TCP
/// connect() fails at once with ECONNREFUSED, as it does when the ICMP error
/// arrives. UDP goes on unchanged, so the socket gets the ICMP error on
/// send as it always did, and connect() on it still succeeds.
#[inline(always)]
fn refuse(proto: u8, reason: Counter) -> i32 {
    if proto != IPPROTO_TCP {
        return ALLOW;
    }
    count(reason);
    // SAFETY: plain helper call.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    DENY
}

/// The backend of a new flow of the service, chosen as the per-packet path
/// chooses for an internal client.
#[inline(always)]
fn pick_backend<A: SockFamily>(ctx: &SockAddrContext, svc: &SvcValue) -> Pick<A> {
    let pick = lb::select(svc, client_id::<A>(ctx), || Scope::Internal);
    if let Pick::Backend(..) = pick {
        count_service(svc.svc_id, 0, true);
    }
    pick
}

/// Who the client is, for session affinity: its network namespace (a pod,
/// or the node), as an address no packet carries as its source, so it
/// never meets a client address of the per-packet path.
#[inline(always)]
fn client_id<A: SockFamily>(ctx: &SockAddrContext) -> A {
    // SAFETY: plain helper call on the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    A::netns_client((netns as u32).to_be_bytes())
}

/// For unconnected UDP: the backend this socket's earlier datagrams to the
/// service went to while it still exists, else a new pick, remembered.
#[inline(always)]
fn sticky_backend<A: SockFamily>(
    ctx: &SockAddrContext,
    cookie: u64,
    addr: A,
    port: [u8; 2],
    svc: &SvcValue,
) -> Pick<A> {
    if let Some(prev) = A::backend_for(cookie, addr, port)
        && prev.svc_id == svc.svc_id
        && let Some(be) = backend_of(&prev)
    {
        return Pick::Backend(prev.backend_id, be);
    }
    let pick = pick_backend(ctx, svc);
    if let Pick::Backend(backend_id, be) = &pick {
        let chosen = SockNatOf {
            addr: be.addr,
            port: be.port,
            svc_id: svc.svc_id,
            backend_id: *backend_id,
        };
        A::set_backend_for(cookie, addr, port, &chosen);
    }
    pick
}

/// The backend while its id still names this address (an endpoint removed
/// and its id reused for another must not keep receiving the socket's
/// traffic).
#[inline(always)]
fn backend_of<A: SockFamily>(nat: &SockNatOf<A>) -> Option<Be<A>> {
    let be = A::backend(nat.backend_id)?;
    (be.addr == nat.addr && be.port == nat.port).then_some(be)
}

/// recvmsg() and getpeername(): a backend this socket was sent to shows as
/// the service address it dialed.
#[inline(always)]
fn reverse<A: SockFamily>(ctx: &SockAddrContext) {
    let (addr, port) = A::dest(ctx);
    // A connected socket's own entry first: it needs no filter bit, so a
    // connection to an endpoint since removed (whose bit a rebuild of the
    // filters clears) still shows the service.
    if let Some((service, service_port)) = A::peer_service(ctx, addr, port) {
        A::set_dest(ctx, service, service_port);
        return;
    }
    // A peer that is no backend (every accepted connection's client) was
    // never translated: no cookie, no lookup.
    if !addr.may_be_endpoint(port) {
        return;
    }
    if let Some(service) = A::service_of(cookie(ctx), addr, port) {
        A::set_dest(ctx, service.addr, service.port);
    }
}
