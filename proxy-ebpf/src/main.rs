//! kube-ebpf-proxy's datapath: TC programs that load-balance Service traffic.
//!
//! `kep_ingress` runs on the ingress of every device of the node (pod veths
//! and uplinks); it translates new and tracked flows towards backends and
//! translates replies back. `kep_egress` runs on their egress (and on lo's)
//! and handles what local processes send, which never passes an ingress
//! hook: flows to service addresses, and the replies of hostNetwork
//! backends. See docs/architecture.md for the packet walks.
//!
//! Both programs serve IPv4 and IPv6: the flow logic is written once over
//! the address family ([`family`]); parsing, ICMP and rejecting are the
//! family's own ([`v6`] for IPv6).
#![no_std]
#![no_main]

mod family;
mod flow;
mod icmp;
mod lb;
mod maps;
mod nat;
mod packet;
mod reject;
mod route;
mod sock;
mod upgrade;
mod v4;
mod v6;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use family::Addr;
use packet::{ETH_P_IP, ETH_P_IPV6, ETH_TYPE_OFF, Ip};
use proxy_common::{CFG_F_SOME_DEVICES, Counter, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Ingress,
    Egress,
}

#[classifier]
pub fn kep_ingress(ctx: TcContext) -> i32 {
    match try_handle(&ctx, Hook::Ingress) {
        Ok(action) | Err(action) => action,
    }
}

#[classifier]
pub fn kep_egress(ctx: TcContext) -> i32 {
    if handled_at_ingress(&ctx) {
        return TC_ACT_OK as i32;
    }
    match try_handle(&ctx, Hook::Egress) {
        Ok(action) | Err(action) => action,
    }
}

/// Whether the packet arrived on a device of this node whose ingress hook
/// has handled it already (translated, or found it is not ours): the
/// egress hook is for what the node sends itself (node processes,
/// hostNetwork backends' replies, the ICMP errors the stack generates),
/// whose packets carry no ingress device. Every forwarded packet, and
/// every packet our ingress hook redirected, then costs the egress hook a
/// field read instead of a parse and two map lookups. With `--devices`
/// (`CFG_F_SOME_DEVICES`) a packet may have come in by a device without
/// the ingress hook, and egress handles it as before.
#[inline(always)]
fn handled_at_ingress(ctx: &TcContext) -> bool {
    // SAFETY: the context pointer is valid for the whole program run.
    let arrived_on = unsafe { (*ctx.skb.skb).ingress_ifindex };
    arrived_on != 0 && maps::config_ref().is_none_or(|c| c.flags & CFG_F_SOME_DEVICES == 0)
}

/// The benchmark's baseline: the cost of running any TC program at all.
#[classifier]
pub fn kep_noop(_ctx: TcContext) -> i32 {
    TC_ACT_OK as i32
}

#[inline(always)]
fn try_handle(ctx: &TcContext, hook: Hook) -> Result<i32, i32> {
    match packet::bytes::<2>(ctx, ETH_TYPE_OFF) {
        Some(ETH_P_IP) => Ok(handle_ipv4(ctx, hook)),
        Some(ETH_P_IPV6) => v6::handle(ctx, hook),
        // ARP, VLAN tags, anything else: not ours.
        _ => Ok(TC_ACT_OK as i32),
    }
}

/// A BPF function of its own, so that the programs' own frame, which the
/// longer IPv6 chain stacks on too, stays small; the TCP and UDP verdict is
/// inlined into it: one BPF call fewer on IPv4's hot path. It returns the
/// verdict as a plain i32: a `Result` may come back through a pointer to
/// the caller's stack, which the verifier refuses ("cannot return stack
/// pointer").
#[inline(never)]
fn handle_ipv4(ctx: &TcContext, hook: Hook) -> i32 {
    match try_ipv4(ctx, hook) {
        Ok(action) | Err(action) => action,
    }
}

#[inline(always)]
fn try_ipv4(ctx: &TcContext, hook: Hook) -> Result<i32, i32> {
    let Some(ip) = packet::parse_ipv4(ctx) else {
        return Ok(TC_ACT_OK as i32);
    };
    match ip.proto {
        IPPROTO_TCP | IPPROTO_UDP => flow_verdict(ctx, hook, &ip),
        // Errors are translated on egress too: the node's own stack sends
        // "fragmentation needed" when it forwards a translated packet too
        // large for the next link (the FIB lookup hands those to the
        // stack), and that error leaves towards the client by the egress
        // hook only. It is on its way out already.
        IPPROTO_ICMP => Ok(match icmp::translate_error(ctx, &ip)? {
            Some(flags) if hook == Hook::Ingress => {
                route::forward::<[u8; 4]>(ctx, hook, flags, IPPROTO_ICMP)
            }
            _ => TC_ACT_OK as i32,
        }),
        _ => Ok(TC_ACT_OK as i32),
    }
}

/// TCP and UDP of IPv6: [`flow_verdict`] as a BPF function of its own, so
/// that the parser's frame and the flow's do not add up (a chain of calls
/// shares 512 bytes of stack).
#[inline(never)]
pub fn flow_verdict_v6(ctx: &TcContext, hook: Hook, ip: &Ip<[u8; 16]>) -> Result<i32, i32> {
    flow_verdict(ctx, hook, ip)
}

/// TCP and UDP, of either family. The flow handling, the new flow's two
/// halves and forwarding are BPF functions of their own, called one after
/// the other, so that their frames do not add up.
#[inline(always)]
fn flow_verdict<A: Addr>(ctx: &TcContext, hook: Hook, ip: &Ip<A>) -> Result<i32, i32> {
    let mut action = flow::handle(ctx, hook, ip)?;
    if let flow::Action::New(fe) = &action {
        action = flow::new_flow(ctx, hook, ip, fe)?;
    }
    Ok(match action {
        flow::Action::Pass | flow::Action::New(_) => TC_ACT_OK as i32,
        flow::Action::Forward(flags) => route::forward::<A>(ctx, hook, flags, ip.proto),
        flow::Action::Reject(reason) => A::reject(ctx, ip, hook, reason),
    })
}

/// Counts a drop reason and returns the verdict that drops the packet.
#[inline(always)]
pub fn drop_packet(reason: Counter) -> i32 {
    maps::count(reason);
    TC_ACT_SHOT as i32
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
