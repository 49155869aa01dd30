//! IPv6: parsing (the fixed header and its extension headers), ICMPv6
//! errors about translated flows, and ICMPv6 port unreachable. TCP and UDP
//! flows go through the same flow logic as IPv4 ([`crate::flow`]), with
//! the IPv6 maps ([`family`]).
//!
//! Neighbour discovery, router solicitations and advertisements, MLD and
//! echo are ICMPv6 types that are no errors: they pass untouched, as does
//! every protocol but TCP, UDP and ICMPv6.

mod family;
mod icmp;
pub mod parse;
mod reject;

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use proxy_common::{IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    Hook,
    maps::KEP_IP6SCR,
    packet::{Frag, Ip},
};

/// An IPv6 packet. The header fields wait in a per-CPU map between the
/// parser and the flow logic: IPv6 addresses are large, and the chain of
/// BPF calls below shares 512 bytes of stack.
#[inline(always)]
pub fn handle(ctx: &TcContext, hook: Hook) -> Result<i32, i32> {
    if !parse_into_place(ctx) {
        return Ok(TC_ACT_OK as i32);
    }
    let Some(ip) = parsed() else {
        return Ok(TC_ACT_OK as i32);
    };
    match ip.proto {
        IPPROTO_TCP | IPPROTO_UDP => crate::flow_verdict_v6(ctx, hook, ip),
        // Errors are translated on egress too: the node's own stack sends
        // Packet Too Big when it forwards a translated packet too large
        // for the next link (the FIB lookup hands those to the stack), and
        // that error leaves towards the client by the egress hook only.
        // It is on its way out already.
        IPPROTO_ICMPV6 if ip.frag == Frag::No => Ok(match icmp::translate_error(ctx, ip)? {
            Some(flags) if hook == Hook::Ingress => {
                crate::route::forward::<[u8; 16]>(ctx, hook, flags, IPPROTO_ICMPV6)
            }
            _ => TC_ACT_OK as i32,
        }),
        _ => Ok(TC_ACT_OK as i32),
    }
}

/// This CPU's place for the parsed IPv6 header.
#[inline(always)]
fn parsed() -> Option<&'static mut Ip<[u8; 16]>> {
    const { assert!(core::mem::size_of::<Ip<[u8; 16]>>() <= 6 * 8) };
    let p = KEP_IP6SCR.get_ptr_mut(0)?;
    // SAFETY: 8-byte aligned and large enough (checked above); per-CPU,
    // and nothing else uses it.
    Some(unsafe { &mut *p.cast::<Ip<[u8; 16]>>() })
}

/// Parses the packet into [`parsed`]; false when it is not ours.
#[inline(never)]
fn parse_into_place(ctx: &TcContext) -> bool {
    let Some(place) = parsed() else {
        return false;
    };
    match parse::parse_ipv6(ctx) {
        Some(ip) => {
            *place = ip;
            true
        }
        None => false,
    }
}
