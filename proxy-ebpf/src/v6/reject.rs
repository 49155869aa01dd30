//! ICMPv6 destination unreachable, port unreachable (RFC 4443, type 1 code
//! 4), from the address the client dialed: what the IPv4 path answers with
//! ICMP port unreachable, built in place the same way
//! ([`crate::reject`]'s helpers). The quote is the IPv6 header, its
//! extension headers and the L4 header.

use aya_ebpf::programs::TcContext;
use proxy_common::{Counter, IPPROTO_ICMPV6};

use super::parse::{IP6_HLEN, IP6_OFF};
use crate::{
    Hook,
    nat::fold,
    packet::{ETH_HLEN, Ip, bytes},
    reject::{answer, csum, cut_and_open, l4_quote_len, send_back},
};

const ICMP6_DST_UNREACH: u8 = 1;
const ICMP6_PORT_UNREACH: u8 = 4;
/// Largest quote: the IPv6 header, 40 bytes of extension headers and a
/// 60-byte TCP header. Longer chains are dropped instead of answered.
const MAX_QUOTE: usize = IP6_HLEN + 40 + 60;
const NEW_HDRS: usize = IP6_HLEN + 8;

#[inline(always)]
pub fn port_unreachable(ctx: &TcContext, ip: &Ip<[u8; 16]>, hook: Hook, reason: Counter) -> i32 {
    aya_log_ebpf::debug!(
        ctx,
        "reject ({}) {:i} -> {:i}",
        reason.name(),
        ip.saddr,
        ip.daddr
    );
    answer(ip, reason, || build(ctx, ip, hook))
}

// Its own BPF function, for its buffers (see crate::reject).
#[inline(never)]
fn build(ctx: &TcContext, ip: &Ip<[u8; 16]>, hook: Hook) -> Option<i32> {
    let quote_len = (ip.l4 - IP6_OFF) + l4_quote_len(ctx, ip.l4, ip.proto)?;
    if quote_len > MAX_QUOTE {
        return None;
    }
    let eth: [u8; ETH_HLEN] = bytes(ctx, 0)?;
    let mut quote = [0u8; MAX_QUOTE];
    cut_and_open(ctx, &mut quote, quote_len, NEW_HDRS)?;

    let icmp_len = (8 + quote_len) as u16;
    let mut ip6 = [0u8; IP6_HLEN];
    ip6[0] = 0x60;
    ip6[4..6].copy_from_slice(&icmp_len.to_be_bytes());
    ip6[6] = IPPROTO_ICMPV6;
    ip6[7] = 64;
    ip6[8..24].copy_from_slice(&ip.daddr);
    ip6[24..40].copy_from_slice(&ip.saddr);

    // The checksum covers the pseudo-header: both addresses, the length
    // and the next header.
    let mut pseudo = [0u8; 8];
    pseudo[2..4].copy_from_slice(&icmp_len.to_be_bytes());
    pseudo[7] = IPPROTO_ICMPV6;
    let mut icmp = [0u8; 8];
    icmp[0] = ICMP6_DST_UNREACH;
    icmp[1] = ICMP6_PORT_UNREACH;
    let sum = csum(ip6[8..].as_mut_ptr(), 32, 0);
    let sum = csum(pseudo.as_mut_ptr(), 8, sum);
    let sum = csum(icmp.as_mut_ptr(), 8, sum);
    let sum = csum(quote.as_mut_ptr(), quote_len as u32, sum);
    icmp[2..4].copy_from_slice(&fold(sum).to_ne_bytes());

    ctx.store(IP6_OFF, &ip6, 0).ok()?;
    ctx.store(IP6_OFF + IP6_HLEN, &icmp, 0).ok()?;
    send_back(ctx, &eth, hook)
}
