//! ICMP errors about a translated flow (fragmentation needed, port
//! unreachable, TTL exceeded) are translated back, so that the client's
//! socket recognises them: the quoted packet inside must show the tuple the
//! client sent, and an error sent by the backend itself must come from the
//! service address. Path MTU discovery through a service depends on this.

use aya_ebpf::programs::TcContext;
use proxy_common::{Counter, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    family::{Addr, Tuple},
    maps::count,
    nat::{csum_diff, fold},
    packet::{ICMP_QUOTE, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, Ip, bytes},
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;

// Its own BPF function, to keep its buffers off the main stack frame.
#[inline(never)]
/// `Some(flags)`: translated, to be forwarded by the caller (with the
/// `NAT_F_*` of the flow), outside this function's frame.
pub fn translate_error(ctx: &TcContext, ip: &Ip<[u8; 4]>) -> Result<Option<u8>, i32> {
    let pass = Ok(None);
    if ip.l4_cut {
        return pass;
    }
    let Some(icmp) = bytes::<8>(ctx, ip.l4) else {
        return pass;
    };
    if !matches!(
        icmp[0],
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB
    ) {
        return pass;
    }
    let inner_off = ip.l4 + 8;
    let Some(old) = bytes::<ICMP_QUOTE>(ctx, inner_off) else {
        return pass;
    };
    // Quotes with IP options are left alone: rare, and not worth the code.
    if old[0] != 0x45 || !(old[9] == IPPROTO_TCP || old[9] == IPPROTO_UDP) {
        return pass;
    }
    // The quoted packet went towards the backend; its reply tuple is the
    // reverse-NAT key of the flow.
    let key = Tuple {
        saddr: [old[16], old[17], old[18], old[19]],
        daddr: [old[12], old[13], old[14], old[15]],
        sport: [old[22], old[23]],
        dport: [old[20], old[21]],
        proto: old[9],
        _pad: [0; 3],
    };
    let Some(rev) = <[u8; 4]>::rnat(&key) else {
        return pass;
    };
    // SAFETY: valid for this program run; only read.
    let rev = unsafe { &*rev };

    // Quote as the client sent it: client -> service address.
    let mut new = old;
    new[12..16].copy_from_slice(&rev.daddr);
    new[16..20].copy_from_slice(&rev.saddr);
    new[20..22].copy_from_slice(&rev.dport);
    new[22..24].copy_from_slice(&rev.sport);
    new[10] = 0;
    new[11] = 0;
    let inner_sum = csum_diff(&[0u8; 0], &new[..20], 0);
    new[10..12].copy_from_slice(&fold(inner_sum).to_ne_bytes());

    let old_icmp_csum = u16::from_ne_bytes([icmp[2], icmp[3]]);
    let sum = csum_diff(&old, &new, !old_icmp_csum as u32);
    let icmp_csum = fold(sum);
    ctx.store(inner_off, &new, 0).map_err(|_| helper_error())?;
    ctx.store(ip.l4 + 2, &icmp_csum.to_ne_bytes(), 0)
        .map_err(|_| helper_error())?;

    // The outer header: to the client, and from the service address when
    // the backend itself reported the error.
    let outer_src = if ip.saddr == key.saddr {
        rev.saddr
    } else {
        ip.saddr
    };
    set_addr(ctx, IP_SRC_OFF, ip.saddr, outer_src)?;
    set_addr(ctx, IP_DST_OFF, ip.daddr, rev.daddr)?;
    count(Counter::IcmpError);
    Ok(Some(rev.flags))
}

#[inline(always)]
fn set_addr(ctx: &TcContext, off: usize, old: [u8; 4], new: [u8; 4]) -> Result<(), i32> {
    if old == new {
        return Ok(());
    }
    let (from, to) = (
        u32::from_ne_bytes(old) as u64,
        u32::from_ne_bytes(new) as u64,
    );
    ctx.l3_csum_replace(IP_CSUM_OFF, from, to, 4)
        .map_err(|_| helper_error())?;
    ctx.store(off, &new, 0).map_err(|_| helper_error())
}

#[inline(always)]
pub fn helper_error() -> i32 {
    crate::drop_packet(Counter::DropHelperError)
}
