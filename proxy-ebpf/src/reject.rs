//! Rejecting a connection the way kube-proxy does: ICMP port unreachable
//! from the address the client dialed, for TCP and UDP alike (kube-proxy's
//! REJECT rules send icmp-port-unreachable). A TCP client's connect() then
//! fails at once with ECONNREFUSED instead of timing out.
//!
//! The packet is turned into the ICMP error in place (by the helpers
//! here, which the ICMPv6 error of [`crate::v6`] uses too): trimmed to its IP
//! header plus its L4 header (RFC 792 asks for at least 8 bytes; RFC 1812
//! allows more), grown by a new IP and ICMP header, and sent back where it
//! came from.
//!
//! Why the whole TCP header: a packet from a local socket or a veth carries
//! CHECKSUM_PARTIAL, and the kernel refuses to trim it in front of the L4
//! checksum field (bpf_skb_change_tail answers EINVAL).

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    helpers::generated::{bpf_csum_diff, bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes},
    programs::TcContext,
};
use proxy_common::{Counter, IPPROTO_ICMP, IPPROTO_TCP};

use crate::{
    Hook,
    maps::count,
    nat::fold,
    packet::{ETH_HLEN, Frag, IP_OFF, Ip, bytes},
    route::ifindex,
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
/// Largest quote: a 60-byte IP header (with options) plus a 60-byte TCP
/// header.
const MAX_QUOTE: usize = 120;
const NEW_HDRS: usize = 20 + 8;

#[inline(always)]
pub fn port_unreachable(ctx: &TcContext, ip: &Ip<[u8; 4]>, hook: Hook, reason: Counter) -> i32 {
    aya_log_ebpf::debug!(
        ctx,
        "reject ({}) {:i} -> {:i}",
        reason.name(),
        ip.saddr,
        ip.daddr
    );
    answer(ip, reason, || build(ctx, ip, hook))
}

/// Counts the reason and answers with what `build` makes of the packet (of
/// either family); a later fragment, which cannot be quoted, is dropped.
#[inline(always)]
pub fn answer<A>(ip: &Ip<A>, reason: Counter, build: impl FnOnce() -> Option<i32>) -> i32 {
    count(reason);
    if ip.frag == Frag::Later {
        return TC_ACT_SHOT as i32;
    }
    build().unwrap_or_else(|| crate::drop_packet(Counter::DropHelperError))
}

// A function of its own (a BPF-to-BPF call): its buffers would otherwise
// add to the stack frame of the whole program, which has 512 bytes.
#[inline(never)]
fn build(ctx: &TcContext, ip: &Ip<[u8; 4]>, hook: Hook) -> Option<i32> {
    let ihl = ip.l4 - IP_OFF;
    if !(20..=60).contains(&ihl) {
        return None;
    }
    let quote_len = ihl + l4_quote_len(ctx, ip.l4, ip.proto)?;
    if quote_len > MAX_QUOTE {
        return None;
    }
    let eth: [u8; ETH_HLEN] = bytes(ctx, 0)?;
    let mut quote = [0u8; MAX_QUOTE];
    cut_and_open(ctx, &mut quote, quote_len, NEW_HDRS)?;

    let mut iph = [0u8; 20];
    iph[0] = 0x45;
    iph[1] = 0xc0; // network control, as the kernel's own ICMP errors
    iph[2..4].copy_from_slice(&((NEW_HDRS + quote_len) as u16).to_be_bytes());
    iph[8] = 64;
    iph[9] = IPPROTO_ICMP;
    iph[12..16].copy_from_slice(&ip.daddr);
    iph[16..20].copy_from_slice(&ip.saddr);
    let sum = csum(iph.as_mut_ptr(), 20, 0);
    iph[10..12].copy_from_slice(&fold(sum).to_ne_bytes());

    let mut icmp = [0u8; 8];
    icmp[0] = ICMP_DEST_UNREACH;
    icmp[1] = ICMP_PORT_UNREACH;
    let sum = csum(icmp.as_mut_ptr(), 8, 0);
    let sum = csum(quote.as_mut_ptr(), quote_len as u32, sum);
    icmp[2..4].copy_from_slice(&fold(sum).to_ne_bytes());

    ctx.store(IP_OFF, &iph, 0).ok()?;
    ctx.store(IP_OFF + 20, &icmp, 0).ok()?;
    send_back(ctx, &eth, hook)
}

/// How much of the L4 header to quote: all of TCP's (see the module
/// documentation), UDP's 8 bytes.
#[inline(always)]
pub fn l4_quote_len(ctx: &TcContext, l4: usize, proto: u8) -> Option<usize> {
    if proto != IPPROTO_TCP {
        return Some(8);
    }
    let tcp: [u8; 13] = bytes(ctx, l4)?;
    let doff = (tcp[12] >> 4) as usize * 4;
    (20..=60).contains(&doff).then_some(doff)
}

/// Copies the first `len` bytes after the Ethernet header into `quote`,
/// trims the packet to them and opens `room` bytes in front of them for
/// the new IP and ICMP headers.
#[inline(always)]
pub fn cut_and_open<const N: usize>(
    ctx: &TcContext,
    quote: &mut [u8; N],
    len: usize,
    room: usize,
) -> Option<()> {
    if len == 0 || len > N {
        return None;
    }
    // SAFETY: len is at most N, the buffer's size; plain helper calls on
    // our own skb.
    unsafe {
        if bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            ETH_HLEN as u32,
            quote.as_mut_ptr().cast(),
            len as u32,
        ) != 0
        {
            return None;
        }
        if bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + len) as u32, 0) != 0 {
            return None;
        }
    }
    ctx.adjust_room(room as i32, BPF_ADJ_ROOM_MAC, 0).ok()
}

/// Sends the error back where the packet came from, with the Ethernet
/// addresses of `eth` swapped: out of the device it arrived on, or, for a
/// packet a local process was sending, into the node's own stack.
#[inline(always)]
pub fn send_back(ctx: &TcContext, eth: &[u8; ETH_HLEN], hook: Hook) -> Option<i32> {
    let mut new_eth = [0u8; ETH_HLEN];
    new_eth[..6].copy_from_slice(&eth[6..12]);
    new_eth[6..12].copy_from_slice(&eth[..6]);
    new_eth[12..].copy_from_slice(&eth[12..]);
    ctx.store(0, &new_eth, 0).ok()?;
    let flags = match hook {
        Hook::Ingress => 0,
        Hook::Egress => BPF_F_INGRESS as u64,
    };
    // SAFETY: plain helper call.
    Some(unsafe { bpf_redirect(ifindex(ctx), flags) as i32 })
}

/// The one's complement sum of `len` bytes at `data` added to `seed`.
#[inline(always)]
pub fn csum(data: *mut u8, len: u32, seed: i64) -> i64 {
    // SAFETY: `data` points at `len` readable bytes of our stack.
    unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, data.cast(), len, seed as u32) }
}
