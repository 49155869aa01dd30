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

use aya_ebpf::programs::TcContext;
use proxy_common::*;

use crate::{
    Hook, drop_packet,
    lb::{self, Pick, Scope},
    maps::{
        KEP_BE_V1, KEP_CT_V1, KEP_RNAT_V1, KEP_SVC_V2, addr_class, config, config_ref, count,
        count_service, in_service_cidr,
    },
    nat,
    packet::{Frag, Ipv4, Ports, PortsError, ports, remember_fragment},
    route,
};

/// Attempts at finding a free SNAT source port before giving up.
const SNAT_TRIES: u32 = 16;

/// Before the daemon wrote its configuration: no cluster CIDR, no
/// masquerade-all.
static NO_CONFIG: Config = Config {
    snat_port_min: SNAT_PORT_MIN,
    snat_port_max: SNAT_PORT_MAX,
    hairpin_addr: HAIRPIN_ADDR,
    cluster_cidr: [0; 4],
    cluster_cidr_len: 0,
    flags: 0,
    _pad: [0; 2],
    service_cidrs: [[0; 4]; SERVICE_CIDRS],
    service_cidr_lens: [0; SERVICE_CIDRS],
};

/// Classes whose addresses carry frontends of their own.
const FRONTEND_ADDR: u8 = ADDR_CLUSTER_IP | ADDR_EXTERNAL;

/// What to do with the packet once the flow is handled. Forwarding,
/// rejecting and balancing a new flow are done by the caller so that their
/// stack frames do not stack on this function's: a chain of BPF calls
/// shares 512 bytes of stack.
pub enum Action {
    Pass,
    /// The packet was rewritten to this tuple: send it on its way.
    Forward(NatEntry),
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
pub fn handle(ctx: &TcContext, hook: Hook, ip: &Ipv4) -> Result<Action, i32> {
    let class = addr_class(ip.daddr);
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
    let key = flow_key(ip, &ports);
    // Replies go to clients, never to a ClusterIP.
    if class & ADDR_CLUSTER_IP == 0
        && let Some(rev) = reverse_nat(&key)
    {
        return translate_reply(ctx, hook, ip, &ports, &rev);
    }
    if let Some(fwd) = tracked(&key, &ports) {
        return translate(ctx, ip, &ports, &fwd, Counter::Forward);
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
    if class & ADDR_HOST != 0 && ip.proto == IPPROTO_TCP && !ports.is_syn() {
        return Ok(Action::Pass);
    }
    let Some(svc) = frontend(ip, &ports, class) else {
        return if class & ADDR_CLUSTER_IP != 0 {
            Ok(Action::Reject(Counter::DropUnknownPort))
        } else {
            // Traffic for the node itself or for an external IP's other
            // ports: not ours.
            Ok(Action::Pass)
        };
    };
    Ok(Action::New(Frontend { svc, class }))
}

/// A destination that is no service address: a reply to a client of ours
/// (ingress), a reply a hostNetwork backend of this node sends (egress,
/// from a node address), an unallocated service address, or not ours.
#[inline(always)]
fn other_destination(ctx: &TcContext, hook: Hook, ip: &Ipv4) -> Result<Action, i32> {
    if hook == Hook::Egress && addr_class(ip.saddr) & ADDR_HOST == 0 {
        return unallocated_or_pass(ip);
    }
    let Ok(ports) = ports(ctx, ip) else {
        return unallocated_or_pass(ip);
    };
    match reverse_nat(&flow_key(ip, &ports)) {
        Some(rev) => translate_reply(ctx, hook, ip, &ports, &rev),
        None => unallocated_or_pass(ip),
    }
}

#[inline(always)]
fn unallocated_or_pass(ip: &Ipv4) -> Result<Action, i32> {
    if in_service_cidr(ip.daddr) {
        return Err(drop_packet(Counter::DropUnallocated));
    }
    Ok(Action::Pass)
}

#[inline(always)]
fn flow_key(ip: &Ipv4, ports: &Ports) -> FlowKey {
    FlowKey {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: ports.sport,
        dport: ports.dport,
        proto: ip.proto,
        _pad: [0; 3],
    }
}

#[inline(always)]
fn reverse_nat(key: &FlowKey) -> Option<NatEntry> {
    // SAFETY: copied out at once.
    unsafe { KEP_RNAT_V1.get(*key) }.copied()
}

/// The conntrack entry of a flow that keeps its backend.
#[inline(always)]
fn tracked(key: &FlowKey, ports: &Ports) -> Option<NatEntry> {
    let entry = KEP_CT_V1.get_ptr_mut(*key)?;
    // SAFETY: the pointer is valid for this program run; a concurrent
    // update of the same entry can at worst lose a flag bit.
    let fwd = unsafe { *entry };
    if !still_valid(&fwd, ports) {
        return None;
    }
    if ports.is_closing() && fwd.flags & NAT_F_CLOSING == 0 {
        unsafe { (*entry).flags |= NAT_F_CLOSING };
    }
    Some(fwd)
}

/// The frontend of a new flow: the address's own (ClusterIP, external IP)
/// or, on a NodePort address, the NodePort (address 0.0.0.0).
#[inline(always)]
fn frontend(ip: &Ipv4, ports: &Ports, class: u8) -> Option<SvcValue> {
    let mut key = SvcKey {
        addr: ip.daddr,
        port: ports.dport,
        proto: ip.proto,
        _pad: 0,
    };
    if class & FRONTEND_ADDR != 0 {
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

/// Whether a tracked flow keeps its backend. A new TCP connection reusing
/// the tuple of a closed one, and any UDP packet, re-check that the backend
/// still exists, so a removed endpoint is not used again.
#[inline(always)]
fn still_valid(fwd: &NatEntry, ports: &Ports) -> bool {
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
    // SAFETY: copied out at once.
    match unsafe {
        KEP_BE_V1.get(BackendKey {
            backend_id: fwd.backend_id,
        })
    } {
        Some(be) => be.addr == fwd.daddr && be.port == fwd.dport,
        None => false,
    }
}

/// Where the source of a new flow stands for externalTrafficPolicy Local:
/// a process of this node or a pod of the cluster CIDR is internal.
#[inline(always)]
fn scope(hook: Hook, saddr: [u8; 4], cfg: &Config) -> Scope {
    let internal = hook == Hook::Egress
        || (cfg.flags & CFG_F_CLUSTER_CIDR != 0
            && in_prefix(saddr, cfg.cluster_cidr, cfg.cluster_cidr_len))
        || addr_class(saddr) & ADDR_HOST != 0;
    if internal {
        Scope::Internal
    } else {
        Scope::External
    }
}

/// Balances a new flow, sets up its conntrack and reverse-NAT entries and
/// rewrites its first packet.
#[inline(never)]
pub fn new_flow(ctx: &TcContext, hook: Hook, ip: &Ipv4, fe: &Frontend) -> Result<Action, i32> {
    let (svc, class) = (&fe.svc, fe.class);
    // Read again rather than kept in the caller's frame (see Action::New).
    let Ok(ports) = ports(ctx, ip) else {
        return Err(drop_packet(Counter::DropMalformed));
    };
    let (ports, key) = (&ports, &flow_key(ip, &ports));
    let cfg = config_ref().unwrap_or(&NO_CONFIG);
    let mut scope_seen = None;
    let pick = lb::select(svc, key.saddr, || {
        let s = scope(hook, key.saddr, &cfg);
        scope_seen = Some(s);
        s
    });
    let (backend_id, be) = match pick {
        Pick::Backend(id, be) => (id, be),
        Pick::Reject(reason) => return Ok(Action::Reject(reason)),
        Pick::Drop(reason) => return Err(drop_packet(reason)),
    };
    let mut fwd = NatEntry {
        saddr: key.saddr,
        daddr: be.addr,
        sport: key.sport,
        dport: be.port,
        svc_id: svc.svc_id,
        backend_id,
        flags: 0,
        _pad: [0; 3],
    };
    // The reply must look like it comes from the frontend the client dialed.
    let mut rev = NatEntry {
        saddr: key.daddr,
        daddr: key.saddr,
        sport: key.dport,
        dport: key.sport,
        svc_id: svc.svc_id,
        backend_id,
        flags: 0,
        _pad: [0; 3],
    };
    if hook == Hook::Egress {
        fwd.flags = NAT_F_HOST | delivery_to_self(be.addr);
        // A node process dialing one of the node's own addresses: the reply
        // will come from that address, to that address.
        rev.flags = NAT_F_HOST
            | if class & ADDR_HOST != 0 {
                NAT_F_TO_LO
            } else {
                0
            };
    }
    let internal = || scope_seen.unwrap_or_else(|| scope(hook, key.saddr, &cfg)) == Scope::Internal;
    let snat_to = match snat_reason(hook, key, svc, &be, &cfg, internal) {
        Snat::No => None,
        Snat::Hairpin => Some(config().hairpin_addr),
        Snat::ToNode => Some(route::source_for(ctx, be.addr, key.proto).unwrap_or(key.daddr)),
    };
    match snat_to {
        None => claim_reply(key, &be, &rev)?,
        Some(src) => {
            fwd.sport = snat_port(src, &be, key.proto, &rev)?;
            fwd.saddr = src;
            fwd.flags |= NAT_F_SNAT;
        }
    }
    KEP_CT_V1
        .insert(*key, fwd, 0)
        .map_err(|_| drop_packet(Counter::DropMapError))?;
    count(Counter::NewFlow);
    count_service(svc.svc_id, 0, true);
    log_new_flow(ctx, key, svc, &be);
    translate(ctx, ip, ports, &fwd, Counter::Forward)
}

/// A node process's flow to a backend that is this node itself (hostNetwork)
/// must be delivered into the node's stack, not sent out with a local
/// destination.
#[inline(always)]
fn delivery_to_self(backend: [u8; 4]) -> u8 {
    if addr_class(backend) & ADDR_HOST != 0 {
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
fn snat_reason(
    hook: Hook,
    key: &FlowKey,
    svc: &SvcValue,
    be: &Backend,
    cfg: &Config,
    internal: impl FnOnce() -> bool,
) -> Snat {
    if hook == Hook::Egress {
        return Snat::No;
    }
    if be.addr == key.saddr {
        return Snat::Hairpin;
    }
    let masquerade = if cfg.flags & CFG_F_MASQUERADE_ALL != 0 {
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
        cfg.flags & CFG_F_CLUSTER_CIDR != 0
            && !in_prefix(key.saddr, cfg.cluster_cidr, cfg.cluster_cidr_len)
    };
    // A backend that is this node itself (hostNetwork) answers through this
    // node anyway, and a packet from and to the node's own address would
    // be a martian.
    if masquerade && addr_class(be.addr) & ADDR_HOST == 0 {
        Snat::ToNode
    } else {
        Snat::No
    }
}

/// The reverse-NAT entry of a flow whose source is kept.
#[inline(always)]
fn claim_reply(key: &FlowKey, be: &Backend, rev: &NatEntry) -> Result<(), i32> {
    let reply = FlowKey {
        saddr: be.addr,
        daddr: key.saddr,
        sport: be.port,
        dport: key.sport,
        proto: key.proto,
        _pad: [0; 3],
    };
    KEP_RNAT_V1
        .insert(reply, *rev, 0)
        .map_err(|_| drop_packet(Counter::DropMapError))
}

#[inline(always)]
fn log_new_flow(ctx: &TcContext, key: &FlowKey, svc: &SvcValue, be: &Backend) {
    // Compiled in, but the verifier removes it unless the daemon was started
    // with --bpf-debug (AYA_LOG_LEVEL is a read-only global set at load).
    aya_log_ebpf::debug!(
        ctx,
        "new flow {:i}:{} -> service port {} backend {:i}:{}",
        key.saddr,
        u16::from_be_bytes(key.sport),
        svc.svc_id,
        be.addr,
        u16::from_be_bytes(be.port)
    );
}

/// Picks a source port for SNAT that no other flow from `src` to this
/// backend uses, by claiming its reverse-NAT entry (BPF_NOEXIST).
#[inline(always)]
fn snat_port(src: [u8; 4], be: &Backend, proto: u8, rev: &NatEntry) -> Result<[u8; 2], i32> {
    let cfg = config();
    let span = (cfg.snat_port_max - cfg.snat_port_min) as u32 + 1;
    // SAFETY: plain helper call.
    let start = unsafe { aya_ebpf::helpers::generated::bpf_get_prandom_u32() };
    for i in 0..SNAT_TRIES {
        let port = (cfg.snat_port_min as u32 + start.wrapping_add(i) % span) as u16;
        let port = port.to_be_bytes();
        let reply = FlowKey {
            saddr: be.addr,
            daddr: src,
            sport: be.port,
            dport: port,
            proto,
            _pad: [0; 3],
        };
        const BPF_NOEXIST: u64 = 1;
        if KEP_RNAT_V1.insert(reply, *rev, BPF_NOEXIST).is_ok() {
            return Ok(port);
        }
    }
    Err(drop_packet(Counter::DropNoSnatPort))
}

/// A reply translated back to the frontend. On egress (a hostNetwork
/// backend of this node answering) the route was chosen for the client
/// already: the packet only continues.
#[inline(always)]
fn translate_reply(
    ctx: &TcContext,
    hook: Hook,
    ip: &Ipv4,
    ports: &Ports,
    rev: &NatEntry,
) -> Result<Action, i32> {
    let action = translate(ctx, ip, ports, rev, Counter::Reply)?;
    if hook == Hook::Egress {
        return Ok(Action::Pass);
    }
    Ok(action)
}

#[inline(always)]
fn translate(
    ctx: &TcContext,
    ip: &Ipv4,
    ports: &Ports,
    to: &NatEntry,
    counter: Counter,
) -> Result<Action, i32> {
    if ip.frag == Frag::First {
        remember_fragment(ip, ports);
    }
    nat::rewrite(ctx, ip, ports, to)?;
    count(counter);
    count_service(to.svc_id, ctx.len(), false);
    Ok(Action::Forward(*to))
}
