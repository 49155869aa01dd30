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
//! | `connect4`     | service → backend; remembers backend → service          |
//! | `sendmsg4`     | unconnected UDP: the same, per datagram, sticky per socket |
//! | `recvmsg4`     | UDP: a datagram from the backend comes from the service |
//! | `getpeername4` | the peer is the service address                         |
//!
//! The reverse entries are keyed by the socket's cookie (as Cilium's
//! `lb4_reverse_sk` map is), so one socket's translation never shows in
//! another's.
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
    maps::{KEP_SKFWD_V1, KEP_SKRNAT_V1, KEP_SVC_V2, addr_class, config_ref, count, count_service},
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
    forward(&ctx, Call::Connect)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn kep_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, Call::Sendmsg)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn kep_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn kep_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx);
    ALLOW
}

/// The destination a socket names, as wire-order bytes.
#[inline(always)]
fn dest(ctx: &SockAddrContext) -> ([u8; 4], [u8; 2]) {
    // SAFETY: the context is valid for the program run; both fields are
    // read with the 4-byte loads the verifier requires.
    let (ip, port) = unsafe { ((*ctx.sock_addr).user_ip4, (*ctx.sock_addr).user_port) };
    // user_ip4 holds the address in network order and user_port the port in
    // network order in its low 16 bits: their in-memory bytes are the wire's.
    (ip.to_ne_bytes(), (port as u16).to_ne_bytes())
}

#[inline(always)]
fn set_dest(ctx: &SockAddrContext, addr: [u8; 4], port: [u8; 2]) {
    // SAFETY: as in dest(); both fields are writable for these hooks.
    unsafe {
        (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes(addr);
        (*ctx.sock_addr).user_port = u16::from_ne_bytes(port) as u32;
    }
}

#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: plain helper call on the program's own context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

#[inline(always)]
fn forward(ctx: &SockAddrContext, call: Call) -> i32 {
    // SAFETY: as in dest().
    let proto = unsafe { (*ctx.sock_addr).protocol } as u8;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return ALLOW;
    }
    let (addr, port) = dest(ctx);
    let class = addr_class(addr);
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
    if svc.flags & SVC_F_SRC_RANGES != 0 || (svc.flags & SVC_F_ETP_LOCAL != 0 && !pods_internal()) {
        return ALLOW;
    }
    let cookie = cookie(ctx);
    let pick = match call {
        Call::Sendmsg => sticky_backend(ctx, cookie, addr, port, &svc),
        Call::Connect => pick_backend(ctx, &svc),
    };
    let be = match pick {
        Pick::Backend(backend_id, be) => SockNat {
            addr: be.addr,
            port: be.port,
            _pad: [0; 2],
            svc_id: svc.svc_id,
            backend_id,
        },
        Pick::Reject(reason) => return refuse(proto, reason),
        // Dropped (Local policy without local endpoint) or a map missing an
        // entry mid-update: the per-packet path decides, and drops alike.
        Pick::Drop(_) => return ALLOW,
    };
    if !remember_service(cookie, addr, port, &be) {
        // Without the reverse entry the socket would see the backend's
        // address: leave this one to the per-packet path.
        count(Counter::DropMapError);
        return ALLOW;
    }
    set_dest(ctx, be.addr, be.port);
    count(Counter::SocketLb);
    ALLOW
}

/// Whether the per-packet path counts pods as internal clients for
/// externalTrafficPolicy Local: only when it knows the cluster CIDR (as
/// kube-proxy's detect-local). Otherwise such frontends are left to it.
#[inline(always)]
fn pods_internal() -> bool {
    config_ref().is_some_and(|c| c.flags & CFG_F_CLUSTER_CIDR != 0)
}

#[inline(always)]
fn masquerade_all() -> bool {
    config_ref().is_some_and(|c| c.flags & CFG_F_MASQUERADE_ALL != 0)
}

/// The frontend a socket names: the address's own (ClusterIP, external IP)
/// or, on a NodePort address, the NodePort (address 0.0.0.0); the same
/// order as the per-packet path's.
#[inline(always)]
fn frontend(addr: [u8; 4], port: [u8; 2], proto: u8, class: u8) -> Option<SvcValue> {
    let mut key = SvcKey {
        addr,
        port,
        proto,
        _pad: 0,
    };
    if class & (ADDR_CLUSTER_IP | ADDR_EXTERNAL) != 0 {
        // SAFETY: copied out at once.
        if let Some(svc) = unsafe { KEP_SVC_V2.get(key) } {
            return Some(*svc);
        }
    }
    if class & ADDR_NODEPORT == 0 {
        return None;
    }
    key.addr = [0; 4];
    // SAFETY: copied out at once.
    unsafe { KEP_SVC_V2.get(key) }.copied()
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
fn pick_backend(ctx: &SockAddrContext, svc: &SvcValue) -> Pick<[u8; 4]> {
    let pick = lb::select(svc, client_id(ctx), || Scope::Internal);
    if let Pick::Backend(..) = pick {
        count_service(svc.svc_id, 0, true);
    }
    pick
}

/// Who the client is, for session affinity: its network namespace (a pod,
/// or the node), as a key in 0.0.0.0/8, which no packet carries as its
/// source, so it never meets a client address of the per-packet path.
#[inline(always)]
fn client_id(ctx: &SockAddrContext) -> [u8; 4] {
    // SAFETY: plain helper call on the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let low = (netns as u32).to_be_bytes();
    [0, low[1], low[2], low[3]]
}

/// For unconnected UDP: the backend this socket's earlier datagrams to the
/// service went to while it still exists, else a new pick, remembered.
#[inline(always)]
fn sticky_backend(
    ctx: &SockAddrContext,
    cookie: u64,
    addr: [u8; 4],
    port: [u8; 2],
    svc: &SvcValue,
) -> Pick<[u8; 4]> {
    let key = SockFwdKey {
        cookie,
        addr,
        port,
        _pad: [0; 2],
    };
    // SAFETY: copied out at once.
    if let Some(prev) = unsafe { KEP_SKFWD_V1.get(key) }.copied()
        && prev.svc_id == svc.svc_id
        && let Some(be) = backend_of(&prev)
    {
        return Pick::Backend(prev.backend_id, be);
    }
    let pick = pick_backend(ctx, svc);
    if let Pick::Backend(backend_id, be) = &pick {
        let chosen = SockNat {
            addr: be.addr,
            port: be.port,
            _pad: [0; 2],
            svc_id: svc.svc_id,
            backend_id: *backend_id,
        };
        // Losing this entry only costs stickiness, never correctness.
        let _ = KEP_SKFWD_V1.insert(key, chosen, 0);
    }
    pick
}

/// The backend while its id still names this address (an endpoint removed
/// and its id reused for another must not keep receiving the socket's
/// traffic).
#[inline(always)]
fn backend_of(nat: &SockNat) -> Option<Be<[u8; 4]>> {
    let be = <[u8; 4]>::backend(nat.backend_id)?;
    (be.addr == nat.addr && be.port == nat.port).then_some(be)
}

#[inline(always)]
fn remember_service(cookie: u64, addr: [u8; 4], port: [u8; 2], be: &SockNat) -> bool {
    let key = SockRevKey {
        cookie,
        addr: be.addr,
        port: be.port,
        _pad: [0; 2],
    };
    let service = SockNat {
        addr,
        port,
        _pad: [0; 2],
        svc_id: be.svc_id,
        backend_id: be.backend_id,
    };
    KEP_SKRNAT_V1.insert(key, service, 0).is_ok()
}

/// recvmsg() and getpeername(): a backend this socket was sent to shows as
/// the service address it dialed.
#[inline(always)]
fn reverse(ctx: &SockAddrContext) {
    let (addr, port) = dest(ctx);
    let key = SockRevKey {
        cookie: cookie(ctx),
        addr,
        port,
        _pad: [0; 2],
    };
    // SAFETY: copied out at once.
    if let Some(service) = unsafe { KEP_SKRNAT_V1.get(key) }.copied() {
        set_dest(ctx, service.addr, service.port);
    }
}
