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
//! What the programs leave alone goes on to the per-packet path, which
//! decides the same way: a UDP datagram to a service without endpoint (the
//! ICMP reject reaches the socket as before), and anything that is not a
//! frontend.

use aya_ebpf::{
    EbpfContext,
    helpers::generated::{bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use proxy_common::*;

use crate::maps::{
    KEP_BE_V1, KEP_SKFWD_V1, KEP_SKRNAT_V1, KEP_SLOT_V1, KEP_SVC_V1, addr_class, count,
    count_service,
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
    // A ClusterIP frontend is its own address; a NodePort is 0.0.0.0 and
    // answers on every address of the node.
    let svc_addr = match class {
        ADDR_VIP => addr,
        ADDR_NODE => [0; 4],
        _ => return ALLOW,
    };
    let svc_key = SvcKey {
        addr: svc_addr,
        port,
        proto,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    let Some(svc) = (unsafe { KEP_SVC_V1.get(svc_key) }).copied() else {
        return if class == ADDR_VIP {
            refuse(proto, Counter::DropUnknownPort)
        } else {
            // The node's own traffic, not a NodePort.
            ALLOW
        };
    };
    if svc.count == 0 {
        return refuse(proto, Counter::DropNoEndpoint);
    }
    let cookie = cookie(ctx);
    let chosen = match call {
        Call::Sendmsg => sticky_backend(cookie, addr, port, &svc),
        Call::Connect => pick_backend(&svc),
    };
    let Some(be) = chosen else {
        // A slot or backend missing mid-update: the per-packet path decides.
        return ALLOW;
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

/// The backend of a new flow of the service: a random slot of the current
/// generation.
#[inline(always)]
fn pick_backend(svc: &SvcValue) -> Option<SockNat> {
    // SAFETY: plain helper call.
    let random = unsafe { bpf_get_prandom_u32() };
    let slot = SlotKey {
        svc_id: svc.svc_id,
        generation: svc.generation,
        slot: (random % svc.count as u32) as u16,
    };
    // SAFETY: copied out at once.
    let backend_id = unsafe { KEP_SLOT_V1.get(slot) }?.backend_id;
    // SAFETY: copied out at once.
    let be = unsafe { KEP_BE_V1.get(BackendKey { backend_id }) }?;
    count_service(svc.svc_id, 0, true);
    Some(SockNat {
        addr: be.addr,
        port: be.port,
        _pad: [0; 2],
        svc_id: svc.svc_id,
        backend_id,
    })
}

/// For unconnected UDP: the backend this socket's earlier datagrams to the
/// service went to while it still exists, else a new pick, remembered.
#[inline(always)]
fn sticky_backend(cookie: u64, addr: [u8; 4], port: [u8; 2], svc: &SvcValue) -> Option<SockNat> {
    let key = SockFwdKey {
        cookie,
        addr,
        port,
        _pad: [0; 2],
    };
    // SAFETY: copied out at once.
    if let Some(prev) = unsafe { KEP_SKFWD_V1.get(key) }.copied()
        && prev.svc_id == svc.svc_id
        && backend_exists(&prev)
    {
        return Some(prev);
    }
    let be = pick_backend(svc)?;
    // Losing this entry only costs stickiness, never correctness.
    let _ = KEP_SKFWD_V1.insert(key, be, 0);
    Some(be)
}

/// Whether the backend id still names this address (an endpoint removed and
/// its id reused for another must not keep receiving the socket's traffic).
#[inline(always)]
fn backend_exists(nat: &SockNat) -> bool {
    // SAFETY: copied out at once.
    match unsafe {
        KEP_BE_V1.get(BackendKey {
            backend_id: nat.backend_id,
        })
    } {
        Some(be) => be.addr == nat.addr && be.port == nat.port,
        None => false,
    }
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
