//! TCP and UDP: replies, tracked flows, new flows. Constant work per packet:
//! a handful of hash lookups, never a loop over services or backends.
//!
//! Lookups are ordered by the class of the destination address, so traffic
//! that has nothing to do with services costs few lookups:
//!
//! | destination                   | lookups                                         |
//! |-------------------------------|-------------------------------------------------|
//! | anything else (ingress)       | class, reverse NAT, (service CIDRs)             |
//! | anything else (egress)        | class, source class, (reverse NAT from a node address) |
//! | a ClusterIP                   | class, conntrack, then service + slot + backend |
//! | a node address / external IP  | class, reverse NAT, conntrack, then the frontend, NodePort |
//!
//! A class lookup is taken only for an address with its bit in the address
//! filter, a reverse-NAT lookup only for a packet from an address and port
//! that some reverse-NAT entry may come from (a backend a per-packet flow
//! went to): a pod's ordinary traffic pays two array reads for them
//! ([`proxy_common::filter`]).
//!
//! Written once for both families ([`Addr`]): IPv4 and IPv6 flows take the
//! same steps in their own maps.

use aya_ebpf::programs::TcContext;
use proxy_common::*;

use crate::{
    Hook, drop_packet,
    family::{Addr, Be, Nat, Scratch, Tuple, scratch},
    lb::{self, Pick, Scope},
    maps::{config, config_ref, count, count_service},
    nat,
    packet::{Frag, Ip, Ports, PortsError, TCP_RST, ports, remember_fragment},
    route, upgrade,
};

/// Map update flag: only if the key is not there yet.
const BPF_NOEXIST: u64 = 1;

/// Attempts at finding a free SNAT source port before giving up.
const SNAT_TRIES: u32 = 16;

/// Classes whose addresses carry frontends of their own.
const FRONTEND_ADDR: u8 = ADDR_CLUSTER_IP | ADDR_EXTERNAL;

/// What to do with the packet once the flow is handled. Forwarding,
/// rejecting and balancing a new flow are done by the caller so that their
/// stack frames do not stack on this function's: a chain of BPF calls
/// shares 512 bytes of stack.
pub enum Action {
    Pass,
    /// The packet was rewritten (its translation had these `NAT_F_*`
    /// flags): send it on its way.
    Forward(u8),
    /// Answer ICMP port unreachable, counted under this reason.
    Reject(Counter),
    /// A new flow to this frontend: hand it to [`new_flow`]. (Small on
    /// purpose: the caller's frame holds it.)
    New(Frontend),
}

/// The frontend a new flow is for.
pub struct Frontend {
    pub svc: SvcValue,
    /// Class of the destination address.
    pub class: u8,
}

// A BPF function of its own, as is the ICMP path.
#[inline(never)]
pub fn handle<A: Addr>(ctx: &TcContext, hook: Hook, ip: &Ip<A>) -> Result<Action, i32> {
    let class = ip.daddr.class();
    if class == 0 {
        return other_destination(ctx, hook, ip);
    }
    let ports = match ports(ctx, ip) {
        Ok(p) => p,
        Err(PortsError::Truncated) if class & ADDR_CLUSTER_IP != 0 => {
            return Err(drop_packet(Counter::DropMalformed));
        }
        Err(PortsError::UnknownFragment) if class & ADDR_CLUSTER_IP != 0 => {
            return Err(drop_packet(Counter::DropFragment));
        }
        Err(_) => return Ok(Action::Pass),
    };
    let s = scratch::<A>().ok_or_else(|| drop_packet(Counter::DropMapError))?;
    s.key = flow_key(ip, &ports);
    let key = &s.key;
    // Replies go to clients, never to a ClusterIP.
    if class & ADDR_CLUSTER_IP == 0
        && let Some(rev) = reverse_nat(key, &ports)?
    {
        return translate_reply(ctx, hook, ip, &ports, rev);
    }
    if let Some(fwd) = tracked(key, &ports)? {
        return translate(ctx, ip, &ports, fwd, Counter::Forward);
    }
    if !ports.has_l4 {
        // A later fragment of a flow we do not track.
        return if class & ADDR_CLUSTER_IP != 0 {
            Err(drop_packet(Counter::DropFragment))
        } else {
            Ok(Action::Pass)
        };
    }
    // A TCP segment that opens nothing, to an address of this node, belongs
    // to the node's own connections (a reply to one of its clients).
    // (A reply to a SNAT port of the node, too: the older datapath may
    // hold its entry during an upgrade.)
    if class & ADDR_HOST != 0 && ip.proto == IPPROTO_TCP && !ports.is_syn() {
        upgrade::defer_to_older()?;
        return Ok(Action::Pass);
    }
    let Some(svc) = frontend(ip, &ports, class) else {
        return if class & ADDR_CLUSTER_IP != 0 {
            Ok(Action::Reject(Counter::DropUnknownPort))
        } else {
            // Traffic for the node itself or for an external IP's other
            // ports: not ours (a UDP reply to a SNAT port: maybe the older
            // datapath's).
            upgrade::defer_to_older()?;
            Ok(Action::Pass)
        };
    };
    // Only a TCP SYN opens a flow that the older datapath cannot know.
    upgrade::defer_new_flow(ip.proto == IPPROTO_TCP && ports.is_syn())?;
    s.hash = lb::flow_hash(&s.key);
    Ok(Action::New(Frontend { svc, class }))
}

/// A destination that is no service address: a reply to a client of ours
/// (ingress), a reply a hostNetwork backend of this node sends (egress,
/// from a node address), an unallocated service address, or not ours.
#[inline(always)]
fn other_destination<A: Addr>(ctx: &TcContext, hook: Hook, ip: &Ip<A>) -> Result<Action, i32> {
    if hook == Hook::Egress && ip.saddr.class() & ADDR_HOST == 0 {
        return unallocated_or_pass(ip);
    }
    let Ok(ports) = ports(ctx, ip) else {
        return unallocated_or_pass(ip);
    };
    match reverse_nat(&flow_key(ip, &ports), &ports)? {
        Some(rev) => translate_reply(ctx, hook, ip, &ports, rev),
        None => {
            upgrade::defer_to_older()?;
            let pass = unallocated_or_pass(ip)?;
            if hook == Hook::Ingress && host_routed(ip, &ports) {
                return Ok(Action::Forward(0));
            }
            Ok(pass)
        }
    }
}

/// With `--bpf-host-routing`: whether this untranslated packet goes to or
/// comes from a service's endpoint (the endpoint filter says maybe; a
/// false positive is routed as the stack would route it). Such traffic is
/// what socket-level load balancing leaves untranslated: sending it on by
/// the FIB, as translated traffic is, spares it the stack's forwarding
/// path, which costs more than the lookup. (Service CIDRs were dropped
/// before.)
#[inline(always)]
fn host_routed<A: Addr>(ip: &Ip<A>, ports: &Ports) -> bool {
    config_ref().is_some_and(|c| c.flags & CFG_F_HOST_ROUTING != 0)
        && (ip.daddr.may_be_endpoint(ports.dport) || ip.saddr.may_be_endpoint(ports.sport))
}

#[inline(always)]
fn unallocated_or_pass<A: Addr>(ip: &Ip<A>) -> Result<Action, i32> {
    if ip.daddr.in_service_cidr() {
        return Err(drop_packet(Counter::DropUnallocated));
    }
    Ok(Action::Pass)
}

#[inline(always)]
fn flow_key<A: Addr>(ip: &Ip<A>, ports: &Ports) -> Tuple<A> {
    Tuple {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: ports.sport,
        dport: ports.dport,
        proto: ip.proto,
        _pad: [0; 3],
    }
}

/// The reverse-NAT entry of a reply. A FIN or RST marks it: together with
/// the conntrack entry's mark, that frees a SNAT port (see [`snat_port`]).
/// During an upgrade, the entry may be the older datapath's
/// ([`upgrade::defer_entry`]). Only a backend some per-packet flow went to
/// sends replies we translate: a packet from anything else (a client, a
/// pod that serves nothing, a backend only socket-balanced connections
/// reach) skips the lookup.
#[inline(always)]
fn reverse_nat<A: Addr>(key: &Tuple<A>, ports: &Ports) -> Result<Option<&'static Nat<A>>, i32> {
    if !key.saddr.may_send_replies(key.sport) {
        return Ok(None);
    }
    let Some(entry) = A::rnat(key) else {
        return Ok(None);
    };
    // SAFETY: as in `tracked`.
    unsafe {
        upgrade::defer_entry((*entry).flags, false)?;
        mark_closing(entry, ports);
        Ok(Some(&*entry))
    }
}

/// Records a FIN or RST on the entry of its direction.
///
/// # Safety
/// `entry` points into a map value for this program run.
#[inline(always)]
unsafe fn mark_closing<A: Addr>(entry: *mut Nat<A>, ports: &Ports) {
    if !ports.is_closing() {
        return;
    }
    let mark = if ports.tcp_flags & TCP_RST != 0 {
        NAT_F_CLOSING | NAT_F_RESET
    } else {
        NAT_F_CLOSING
    };
    // A concurrent update of the same entry can at worst lose a bit.
    unsafe {
        if (*entry).flags & mark != mark {
            (*entry).flags |= mark;
        }
    }
}

/// The conntrack entry of a flow that keeps its backend. During an
/// upgrade, the entry may be the older datapath's
/// ([`upgrade::defer_entry`]).
#[inline(always)]
fn tracked<A: Addr>(key: &Tuple<A>, ports: &Ports) -> Result<Option<&'static Nat<A>>, i32> {
    let Some(entry) = A::ct(key) else {
        return Ok(None);
    };
    // SAFETY: the pointer is valid for this program run; a concurrent
    // update of the same entry can at worst lose a flag bit.
    let fwd = unsafe { &*entry };
    upgrade::defer_entry(fwd.flags, ports.is_syn())?;
    if !still_valid(fwd, ports) {
        return Ok(None);
    }
    unsafe {
        mark_closing(entry, ports);
        Ok(Some(&*entry))
    }
}

/// The frontend of a new flow: the address's own (ClusterIP, external IP)
/// or, on a NodePort address, the NodePort (the unspecified address).
#[inline(always)]
fn frontend<A: Addr>(ip: &Ip<A>, ports: &Ports, class: u8) -> Option<SvcValue> {
    if class & FRONTEND_ADDR != 0
        && let Some(svc) = A::service(ip.daddr, ports.dport, ip.proto)
    {
        return Some(svc);
    }
    if class & ADDR_NODEPORT == 0 {
        return None;
    }
    A::service(A::ZERO, ports.dport, ip.proto)
}

/// Whether a tracked flow keeps its backend. A new TCP connection reusing
/// the tuple of a closed one, and any UDP packet, re-check that the backend
/// still exists, so a removed endpoint is not used again.
#[inline(always)]
fn still_valid<A: Addr>(fwd: &Nat<A>, ports: &Ports) -> bool {
    if !ports.has_l4 {
        return true;
    }
    let syn = ports.is_syn();
    if syn && fwd.flags & NAT_F_CLOSING != 0 {
        return false;
    }
    if !syn && ports.tcp_flags != 0 {
        return true;
    }
    match A::backend(fwd.backend_id) {
        Some(be) => be.addr == fwd.daddr && be.port == fwd.dport,
        None => false,
    }
}

/// Where the source of a new flow stands for externalTrafficPolicy Local:
/// a process of this node or a pod of the cluster CIDR is internal.
#[inline(always)]
fn scope<A: Addr>(hook: Hook, saddr: A) -> Scope {
    let internal = hook == Hook::Egress
        || saddr.in_cluster_cidr() == Some(true)
        || saddr.class() & ADDR_HOST != 0;
    if internal {
        Scope::Internal
    } else {
        Scope::External
    }
}

/// Balances a new flow, sets up its conntrack and reverse-NAT entries and
/// rewrites its first packet. In two BPF functions, called one after the
/// other so that their frames do not add up; what the first decides waits
/// in this CPU's scratch space.
#[inline(always)]
pub fn new_flow<A: Addr>(
    ctx: &TcContext,
    hook: Hook,
    ip: &Ip<A>,
    fe: &Frontend,
) -> Result<Action, i32> {
    if let Some(reason) = choose_backend(ctx, hook, ip, fe)? {
        return Ok(Action::Reject(reason));
    }
    set_up_flow(ctx, hook, ip, fe)
}

/// Picks the backend and fills in the scratch space's key, translations and
/// backend. `Some(reason)`: reject the packet.
#[inline(never)]
fn choose_backend<A: Addr>(
    ctx: &TcContext,
    hook: Hook,
    ip: &Ip<A>,
    fe: &Frontend,
) -> Result<Option<Counter>, i32> {
    let (svc, class) = (&fe.svc, fe.class);
    // Read again rather than kept in the caller's frame (see Action::New).
    let Ok(ports) = ports(ctx, ip) else {
        return Err(drop_packet(Counter::DropMalformed));
    };
    let s = scratch::<A>().ok_or_else(|| drop_packet(Counter::DropMapError))?;
    s.key = flow_key(ip, &ports);
    s.scope = SCOPE_UNKNOWN;
    let client = s.key.saddr;
    let pick = lb::select_by(svc, client, s.hash, || {
        let scope = scope(hook, client);
        s.scope = scope as u8;
        scope
    });
    let (backend_id, be) = match pick {
        Pick::Backend(id, be) => (id, be),
        Pick::Reject(reason) => return Ok(Some(reason)),
        Pick::Drop(reason) => return Err(drop_packet(reason)),
    };
    let key = &s.key;
    s.fwd = Nat {
        saddr: key.saddr,
        daddr: be.addr,
        sport: key.sport,
        dport: be.port,
        svc_id: svc.svc_id,
        backend_id,
        flags: 0,
        _pad: [0; 3],
        #[cfg(feature = "layout-v2-test")]
        v2_test: [0; 8],
    };
    // The reply must look like it comes from the frontend the client dialed.
    s.rev = Nat {
        saddr: key.daddr,
        daddr: key.saddr,
        sport: key.dport,
        dport: key.sport,
        svc_id: svc.svc_id,
        backend_id,
        flags: 0,
        _pad: [0; 3],
        #[cfg(feature = "layout-v2-test")]
        v2_test: [0; 8],
    };
    if hook == Hook::Egress {
        s.fwd.flags = NAT_F_HOST | delivery_to_self(be.addr);
        // A node process dialing one of the node's own addresses: the reply
        // will come from that address, to that address.
        s.rev.flags = NAT_F_HOST
            | if class & ADDR_HOST != 0 {
                NAT_F_TO_LO
            } else {
                0
            };
    }
    s.be = be;
    Ok(None)
}

/// `Scratch::scope` before the source's scope was needed.
const SCOPE_UNKNOWN: u8 = u8::MAX;

/// SNATs the flow chosen by [`choose_backend`] if it must be, records it
/// and rewrites the packet.
#[inline(never)]
fn set_up_flow<A: Addr>(
    ctx: &TcContext,
    hook: Hook,
    ip: &Ip<A>,
    fe: &Frontend,
) -> Result<Action, i32> {
    let svc = &fe.svc;
    let Ok(ports) = ports(ctx, ip) else {
        return Err(drop_packet(Counter::DropMalformed));
    };
    let s = scratch::<A>().ok_or_else(|| drop_packet(Counter::DropMapError))?;
    let (key, be) = (&s.key, &s.be);
    let internal = || match s.scope {
        SCOPE_UNKNOWN => scope(hook, key.saddr) == Scope::Internal,
        known => known == Scope::Internal as u8,
    };
    let snat_to = match snat_reason(hook, key, svc, be, internal) {
        Snat::No => None,
        Snat::Hairpin => Some(A::hairpin()),
        Snat::ToNode => Some(route::source_for(ctx, be.addr, key.proto).unwrap_or(key.daddr)),
    };
    match snat_to {
        None => {
            // During an upgrade the older maps may hold that live flow
            // unseen: remapped too.
            if upgrade::older_behind() || !claim_reply(s)? {
                // The client reused this source port towards another
                // frontend of the same backend, and that flow is live: the
                // backend would see one tuple for two connections. The
                // source port is remapped, as netfilter's NAT does on such
                // a clash.
                let client = s.key.saddr;
                s.fwd.sport = snat_port(s, client)?;
                s.fwd.flags |= NAT_F_SNAT;
            }
        }
        Some(src) => {
            s.fwd.sport = snat_port(s, src)?;
            s.fwd.saddr = src;
            s.fwd.flags |= NAT_F_SNAT;
        }
    }
    let s = &*s;
    A::set_ct(&s.key, &s.fwd).map_err(|_| drop_packet(Counter::DropMapError))?;
    count(Counter::NewFlow);
    if ip.proto == IPPROTO_TCP && !ports.is_syn() {
        count(Counter::FlowRecreated);
    }
    count_service(svc.svc_id, 0, true);
    A::log_new_flow(ctx, &s.key, svc.svc_id, &s.be);
    translate(ctx, ip, &ports, &s.fwd, Counter::Forward)
}

/// A node process's flow to a backend that is this node itself (hostNetwork)
/// must be delivered into the node's stack, not sent out with a local
/// destination.
#[inline(always)]
fn delivery_to_self<A: Addr>(backend: A) -> u8 {
    if backend.class() & ADDR_HOST != 0 {
        NAT_F_TO_LO
    } else {
        0
    }
}

enum Snat {
    No,
    /// The client pod is its own backend.
    Hairpin,
    /// To this node's address, so that the reply comes back through it.
    ToNode,
}

/// kube-proxy's masquerade decisions, except that a flow to a backend on
/// this node keeps the client's address (the reply passes this node
/// anyway). Flows of node processes (egress) come from a node address
/// already.
#[inline(always)]
fn snat_reason<A: Addr>(
    hook: Hook,
    key: &Tuple<A>,
    svc: &SvcValue,
    be: &Be<A>,
    internal: impl FnOnce() -> bool,
) -> Snat {
    if hook == Hook::Egress {
        return Snat::No;
    }
    if be.addr == key.saddr {
        return Snat::Hairpin;
    }
    let masquerade_all = config_ref().is_some_and(|c| c.flags & CFG_F_MASQUERADE_ALL != 0);
    let masquerade = if masquerade_all {
        true
    } else if be.flags & BE_F_LOCAL != 0 {
        false
    } else if svc.flags & SVC_F_EXTERNAL != 0 {
        // externalTrafficPolicy Local: pods are short-circuited to the
        // cluster set without masquerade, as kube-proxy does.
        svc.flags & SVC_F_ETP_LOCAL == 0 || !internal()
    } else {
        // A ClusterIP dialed from outside the cluster CIDR (routers
        // announcing the service range): the backend's reply must come back
        // through this node.
        key.saddr.in_cluster_cidr() == Some(false)
    };
    // A backend that is this node itself (hostNetwork) answers through this
    // node anyway, and a packet from and to the node's own address would
    // be a martian.
    if masquerade && be.addr.class() & ADDR_HOST == 0 {
        Snat::ToNode
    } else {
        Snat::No
    }
}

/// Claims the reverse-NAT entry of a flow whose source is kept: false when
/// a live flow holds it (see [`port_reclaimable`]).
#[inline(always)]
fn claim_reply<A: Addr>(s: &mut Scratch<A>) -> Result<bool, i32> {
    s.reply = Tuple {
        saddr: s.be.addr,
        daddr: s.key.saddr,
        sport: s.be.port,
        dport: s.key.sport,
        proto: s.key.proto,
        _pad: [0; 3],
    };
    if A::set_rnat(&s.reply, &s.rev, BPF_NOEXIST).is_ok() {
        return Ok(true);
    }
    let client = s.key.saddr;
    if !port_reclaimable(s, client) {
        return Ok(false);
    }
    A::set_rnat(&s.reply, &s.rev, 0).map_err(|_| drop_packet(Counter::DropMapError))?;
    Ok(true)
}

/// Picks a source port for SNAT that no other flow from `src` to this
/// backend uses, by claiming its reverse-NAT entry (BPF_NOEXIST), or by
/// taking over the entry of a flow that is over (see [`port_reclaimable`]):
/// otherwise a closed connection would hold its port until LRU eviction,
/// and a small range would stay exhausted after the load is gone.
#[inline(always)]
fn snat_port<A: Addr>(s: &mut Scratch<A>, src: A) -> Result<[u8; 2], i32> {
    let cfg = config();
    let span = (cfg.snat_port_max - cfg.snat_port_min) as u32 + 1;
    // SAFETY: plain helper call.
    let start = unsafe { aya_ebpf::helpers::generated::bpf_get_prandom_u32() };
    s.reply = Tuple {
        saddr: s.be.addr,
        daddr: src,
        sport: s.be.port,
        dport: [0; 2],
        proto: s.key.proto,
        _pad: [0; 3],
    };
    for i in 0..SNAT_TRIES {
        let port = (cfg.snat_port_min as u32 + start.wrapping_add(i) % span) as u16;
        s.reply.dport = port.to_be_bytes();
        if A::set_rnat(&s.reply, &s.rev, BPF_NOEXIST).is_ok()
            || (port_reclaimable(s, src) && A::set_rnat(&s.reply, &s.rev, 0).is_ok())
        {
            return Ok(s.reply.dport);
        }
    }
    Err(drop_packet(Counter::DropNoSnatPort))
}

/// Whether the reverse-NAT entry at `s.reply` (a SNAT port, or a kept
/// client's source port) may be given to a new flow from `src`: its flow's
/// conntrack entry is gone or belongs to another
/// flow now, an RST was seen, or both directions sent a FIN. (Two CPUs
/// reclaiming the same port at the same instant can both win; the later
/// write holds it. That takes an exhausted range and closed flows.)
#[inline(never)]
fn port_reclaimable<A: Addr>(s: &mut Scratch<A>, src: A) -> bool {
    let Some(rev) = A::rnat(&s.reply) else {
        return true;
    };
    // SAFETY: valid for this program run; only read.
    let rev = unsafe { &*rev };
    // The older programs may have given a carried port to a live flow.
    if upgrade::defer_entry(rev.flags, false).is_err() {
        return false;
    }
    // In the scratch space: an IPv6 tuple on this frame would overflow the
    // deepest call chain's stack.
    s.holder = Tuple {
        saddr: rev.daddr,
        daddr: rev.saddr,
        sport: rev.dport,
        dport: rev.sport,
        proto: s.reply.proto,
        _pad: [0; 3],
    };
    let Some(fwd) = A::ct(&s.holder) else {
        return true;
    };
    // SAFETY: as above.
    let fwd = unsafe { &*fwd };
    if fwd.saddr != src || fwd.sport != s.reply.dport {
        return true;
    }
    (fwd.flags | rev.flags) & NAT_F_RESET != 0 || fwd.flags & rev.flags & NAT_F_CLOSING != 0
}

/// A reply translated back to the frontend. On egress (a hostNetwork
/// backend of this node answering) the route was chosen for the client
/// already: the packet only continues.
#[inline(always)]
fn translate_reply<A: Addr>(
    ctx: &TcContext,
    hook: Hook,
    ip: &Ip<A>,
    ports: &Ports,
    rev: &'static Nat<A>,
) -> Result<Action, i32> {
    let action = translate(ctx, ip, ports, rev, Counter::Reply)?;
    if hook == Hook::Egress {
        return Ok(Action::Pass);
    }
    Ok(action)
}

#[inline(always)]
fn translate<A: Addr>(
    ctx: &TcContext,
    ip: &Ip<A>,
    ports: &Ports,
    to: &'static Nat<A>,
    counter: Counter,
) -> Result<Action, i32> {
    if ip.frag == Frag::First {
        remember_fragment(ip, ports);
    }
    nat::rewrite(ctx, ip, ports, to)?;
    count(counter);
    count_service(to.svc_id, ctx.len(), false);
    Ok(Action::Forward(to.flags))
}
