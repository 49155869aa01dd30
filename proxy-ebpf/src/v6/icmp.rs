//! ICMPv6 errors about a translated flow (destination unreachable, packet
//! too big, time exceeded, parameter problem) are translated back, as the
//! IPv4 path does for ICMP ([`crate::icmp`]): the quoted packet shows the
//! tuple the client sent, the error comes from the service address when
//! the backend sent it, and goes to the client. Packet Too Big passes
//! through this way, so path MTU discovery works through a service.
//!
//! Quotes whose IPv6 header is followed by extension headers, or that are
//! too short to hold the ports (by the frame or by the payload length),
//! are left alone, as are errors about flows
//! we do not know.

use aya_ebpf::programs::TcContext;
use proxy_common::{Counter, IPPROTO_TCP, IPPROTO_UDP};

use super::parse::IP6_HLEN;
use crate::{
    family::{Addr, Tuple},
    icmp::helper_error,
    maps::count,
    nat::csum_diff,
    packet::{Ip, bytes},
};

/// ICMPv6 error types (RFC 4443); everything from 128 up is informational
/// (echo, neighbour discovery, router discovery, MLD) and passes.
const ICMP6_DST_UNREACH: u8 = 1;
const ICMP6_PARAM_PROB: u8 = 4;
/// The quoted IPv6 header plus the 8 quoted L4 bytes.
const QUOTE: usize = IP6_HLEN + 8;

// Its own BPF function, to keep its buffers off the flow path's frames.
#[inline(never)]
/// `Some(flags)`: translated, to be forwarded by the caller (with the
/// `NAT_F_*` of the flow), outside this function's frame.
pub fn translate_error(ctx: &TcContext, ip: &Ip<[u8; 16]>) -> Result<Option<u8>, i32> {
    let pass = Ok(None);
    // The payload length ends before the quote: the rest is no quote.
    if ip.l4_cut {
        return pass;
    }
    let Some(icmp) = bytes::<8>(ctx, ip.l4) else {
        return pass;
    };
    if !(ICMP6_DST_UNREACH..=ICMP6_PARAM_PROB).contains(&icmp[0]) {
        return pass;
    }
    let inner_off = ip.l4 + 8;
    let Some(old) = bytes::<QUOTE>(ctx, inner_off) else {
        return pass;
    };
    if old[0] >> 4 != 6 || !(old[6] == IPPROTO_TCP || old[6] == IPPROTO_UDP) {
        return pass;
    }
    let addr = |i: usize| -> [u8; 16] { old[i..i + 16].try_into().unwrap_or([0; 16]) };
    // The quoted packet went towards the backend; its reply tuple is the
    // reverse-NAT key of the flow.
    let key = Tuple {
        saddr: addr(24),
        daddr: addr(8),
        sport: [old[42], old[43]],
        dport: [old[40], old[41]],
        proto: old[6],
        _pad: [0; 3],
    };
    let Some(rev) = <[u8; 16]>::rnat(&key) else {
        return pass;
    };
    // SAFETY: valid for this program run; only read.
    let rev = unsafe { &*rev };

    // Quote as the client sent it: client -> service address.
    let mut new = old;
    new[8..24].copy_from_slice(&rev.daddr);
    new[24..40].copy_from_slice(&rev.saddr);
    new[40..42].copy_from_slice(&rev.dport);
    new[42..44].copy_from_slice(&rev.sport);
    let csum_off = ip.l4 + 2;
    let diff = csum_diff(&old, &new, 0);
    ctx.store(inner_off, &new, 0).map_err(|_| helper_error())?;
    ctx.l4_csum_replace(csum_off, 0, diff as u32 as u64, 0)
        .map_err(|_| helper_error())?;

    // The outer header (in the checksum's pseudo-header): to the client,
    // and from the service address when the backend itself reported it.
    let outer_src = if ip.saddr == key.saddr {
        rev.saddr
    } else {
        ip.saddr
    };
    if outer_src != ip.saddr {
        <[u8; 16]>::rewrite_addr(
            ctx,
            <[u8; 16]>::SRC_OFF,
            ip.saddr,
            outer_src,
            Some(csum_off),
            0,
        )?;
    }
    if rev.daddr != ip.daddr {
        <[u8; 16]>::rewrite_addr(
            ctx,
            <[u8; 16]>::DST_OFF,
            ip.daddr,
            rev.daddr,
            Some(csum_off),
            0,
        )?;
    }
    count(Counter::IcmpError);
    Ok(Some(rev.flags))
}
