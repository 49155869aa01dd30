//! TCP and UDP: replies, tracked flows, new flows. Constant work per packet:
//! a handful of hash lookups, never a loop over services or backends.
//!
//! Lookups are ordered by the class of the destination address, so traffic
//! that has nothing to do with services costs two lookups:
//!
//! | destination        | lookups                                         |
//! |--------------------|-------------------------------------------------|
//! | anything else      | class, reverse NAT (a reply to a client?)       |
//! | a ClusterIP        | class, conntrack, then service + slot + backend |
//! | a node address     | class, reverse NAT, conntrack, then NodePort    |

use aya_ebpf::{helpers::generated::bpf_get_prandom_u32, programs::TcContext};
use proxy_common::*;

use crate::{
    Hook, drop_packet,
    maps::{
        KEP_BE_V1, KEP_CT_V1, KEP_RNAT_V1, KEP_SLOT_V1, KEP_SVC_V1, addr_class, config, count,
        count_service,
    },
    nat,
    packet::{Frag, Ipv4, Ports, PortsError, ports, remember_fragment},
    route,
};

/// Attempts at finding a free SNAT source port before giving up.
const SNAT_TRIES: u32 = 16;

/// What to do with the packet once the flow is handled. Forwarding and
/// rejecting are done by the caller so that their stack frames do not stack
/// on this function's: a chain of BPF calls shares 512 bytes of stack.
pub enum Action {
    Pass,
    /// The packet was rewritten to this tuple: send it on its way.
    Forward(NatEntry),
    /// Answer ICMP port unreachable, counted under this reason.
    Reject(Counter),
}

// A BPF function of its own, as is the ICMP path.
#[inline(never)]
pub fn handle(ctx: &TcContext, hook: Hook, ip: &Ipv4) -> Result<Action, i32> {
    let pass = Ok(Action::Pass);
    let class = addr_class(ip.daddr);
    // On egress only local processes' packets to a ClusterIP are ours:
    // everything else was translated at ingress already, or is not
    // service traffic.
    if hook == Hook::Egress && class != ADDR_VIP {
        return pass;
    }
    let ports = match ports(ctx, ip) {
        Ok(p) => p,
        Err(PortsError::Truncated) if class == ADDR_VIP => {
            return Err(drop_packet(Counter::DropMalformed));
        }
        Err(PortsError::UnknownFragment) if class == ADDR_VIP => {
            return Err(drop_packet(Counter::DropFragment));
        }
        Err(_) => return pass,
    };
    let key = FlowKey {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: ports.sport,
        dport: ports.dport,
        proto: ip.proto,
        _pad: [0; 3],
    };

    if hook == Hook::Ingress && class != ADDR_VIP {
        // SAFETY: copied out at once.
        if let Some(rev) = unsafe { KEP_RNAT_V1.get(key) }.copied() {
            return translate(ctx, ip, &ports, &rev, Counter::Reply);
        }
        if class == 0 {
            return pass;
        }
    }

    if let Some(entry) = KEP_CT_V1.get_ptr_mut(key) {
        // SAFETY: the pointer is valid for this program run; a concurrent
        // update of the same entry can at worst lose a flag bit.
        let fwd = unsafe { *entry };
        if still_valid(&fwd, &ports) {
            if ports.is_closing() && fwd.flags & NAT_F_CLOSING == 0 {
                unsafe { (*entry).flags |= NAT_F_CLOSING };
            }
            return translate(ctx, ip, &ports, &fwd, Counter::Forward);
        }
    }
    if !ports.has_l4 {
        // A later fragment of a flow we do not track.
        return if class == ADDR_VIP {
            Err(drop_packet(Counter::DropFragment))
        } else {
            pass
        };
    }

    // A new flow: the frontend is the ClusterIP, or for a node address the
    // NodePort (address 0.0.0.0).
    let svc_key = SvcKey {
        addr: if class == ADDR_VIP { ip.daddr } else { [0; 4] },
        port: ports.dport,
        proto: ip.proto,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    let Some(svc) = (unsafe { KEP_SVC_V1.get(svc_key) }).copied() else {
        return if class == ADDR_VIP {
            Ok(Action::Reject(Counter::DropUnknownPort))
        } else {
            // Traffic for the node itself, not a NodePort.
            pass
        };
    };
    if svc.count == 0 {
        return Ok(Action::Reject(Counter::DropNoEndpoint));
    }
    new_flow(ctx, hook, ip, &ports, &key, &svc)
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

#[inline(always)]
fn new_flow(
    ctx: &TcContext,
    hook: Hook,
    ip: &Ipv4,
    ports: &Ports,
    key: &FlowKey,
    svc: &SvcValue,
) -> Result<Action, i32> {
    // SAFETY: plain helper call.
    let random = unsafe { bpf_get_prandom_u32() };
    let slot = SlotKey {
        svc_id: svc.svc_id,
        generation: svc.generation,
        slot: (random % svc.count as u32) as u16,
    };
    // SAFETY: copied out at once.
    let Some(backend_id) = (unsafe { KEP_SLOT_V1.get(slot) }).map(|s| s.backend_id) else {
        return Err(drop_packet(Counter::DropMapError));
    };
    // SAFETY: copied out at once.
    let Some(be) = (unsafe { KEP_BE_V1.get(BackendKey { backend_id }) }).copied() else {
        return Err(drop_packet(Counter::DropMapError));
    };

    let host = if hook == Hook::Egress { NAT_F_HOST } else { 0 };
    let mut fwd = NatEntry {
        saddr: key.saddr,
        daddr: be.addr,
        sport: key.sport,
        dport: be.port,
        svc_id: svc.svc_id,
        backend_id,
        flags: host,
        _pad: [0; 3],
    };
    // The reply must look like it comes from the frontend the client dialed.
    let rev = NatEntry {
        saddr: key.daddr,
        daddr: key.saddr,
        sport: key.dport,
        dport: key.sport,
        svc_id: svc.svc_id,
        backend_id,
        flags: host,
        _pad: [0; 3],
    };

    let snat_to = if be.addr == key.saddr {
        // Hairpin: the pod would drop a packet from its own address.
        Some(config().hairpin_addr)
    } else if svc.flags & SVC_F_EXTERNAL != 0 && be.flags & BE_F_LOCAL == 0 && hook == Hook::Ingress
    {
        // A NodePort to another node: make the reply come back through us.
        Some(route::source_for(ctx, be.addr, key.proto).unwrap_or(key.daddr))
    } else {
        None
    };

    match snat_to {
        None => {
            let reply = FlowKey {
                saddr: be.addr,
                daddr: key.saddr,
                sport: be.port,
                dport: key.sport,
                proto: key.proto,
                _pad: [0; 3],
            };
            KEP_RNAT_V1
                .insert(reply, rev, 0)
                .map_err(|_| drop_packet(Counter::DropMapError))?;
        }
        Some(src) => {
            let port = snat_port(src, &be, key.proto, &rev)?;
            fwd.saddr = src;
            fwd.sport = port;
            fwd.flags |= NAT_F_SNAT;
        }
    }
    KEP_CT_V1
        .insert(*key, fwd, 0)
        .map_err(|_| drop_packet(Counter::DropMapError))?;
    count(Counter::NewFlow);
    count_service(svc.svc_id, 0, true);
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
    translate(ctx, ip, ports, &fwd, Counter::Forward)
}

/// Picks a source port for SNAT that no other flow from `src` to this
/// backend uses, by claiming its reverse-NAT entry (BPF_NOEXIST).
#[inline(always)]
fn snat_port(src: [u8; 4], be: &Backend, proto: u8, rev: &NatEntry) -> Result<[u8; 2], i32> {
    let cfg = config();
    let span = (cfg.snat_port_max - cfg.snat_port_min) as u32 + 1;
    // SAFETY: plain helper call.
    let start = unsafe { bpf_get_prandom_u32() };
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
