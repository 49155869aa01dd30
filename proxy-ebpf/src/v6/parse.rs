//! The IPv6 header and its extension headers.
//!
//! The walk understands hop-by-hop options, routing, fragment,
//! authentication and destination options headers, at most
//! [`MAX_EXT_HEADERS`] of them. Whatever it does not understand ends the
//! walk: the packet's "protocol" is then that header's number, which is no
//! TCP, UDP or ICMPv6, so the packet passes untouched. A packet is never
//! taken for something it is not:
//!
//! * a routing header with segments left names a next hop, not the final
//!   destination: the packet is not ours here;
//! * a later fragment carries no L4 header, whatever follows its fragment
//!   header: its ports come from the first fragment ([`Frag::Later`]);
//! * a chain longer than [`MAX_EXT_HEADERS`], or one that runs past the end
//!   of the payload, is not parsed at all (the kernel drops the latter);
//! * a payload length longer than the frame is a lie the kernel's
//!   ipv6_rcv drops: not ours to touch either. One too short for the L4
//!   header after the chain sets [`Ip::l4_cut`], as for IPv4: service
//!   traffic is then dropped as malformed.
//!
//! A payload length of 0 on a frame longer than any 16-bit length can
//! describe is a jumbogram or a BIG TCP aggregate (the kernel's GRO leaves
//! those at 0): its payload is the rest of the frame.

use aya_ebpf::programs::TcContext;

use proxy_common::{IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};

use crate::packet::{ETH_HLEN, Frag, Ip, TCP_HLEN, UDP_HLEN, bytes};

pub const IP6_OFF: usize = ETH_HLEN;
pub const IP6_HLEN: usize = 40;
pub const IP6_SRC_OFF: usize = IP6_OFF + 8;
pub const IP6_DST_OFF: usize = IP6_OFF + 24;

/// Extension headers walked at most; real traffic carries one or two.
pub const MAX_EXT_HEADERS: usize = 6;

const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;

/// What an ICMPv6 error must carry for translation: its own header, the
/// quoted IPv6 header and 8 bytes of the quoted L4 header.
pub const ICMP6_ERROR_MIN: usize = 8 + IP6_HLEN + 8;

/// Parses IPv6 (the caller checked the Ethernet type). The extension
/// headers are copied out with bpf_skb_load_bytes: their offsets are
/// computed in a loop, and the verifier does not follow packet pointers
/// through that arithmetic. `None` when the
/// packet is not one to touch (see the module documentation).
#[inline(always)]
pub fn parse_ipv6(ctx: &TcContext) -> Option<Ip<[u8; 16]>> {
    let h: [u8; IP6_HLEN] = bytes(ctx, IP6_OFF)?;
    if h[0] >> 4 != 6 {
        return None;
    }
    let end = payload_end(ctx, u16::from_be_bytes([h[4], h[5]]))?;
    let mut ip = Ip {
        saddr: h[8..24].try_into().ok()?,
        daddr: h[24..40].try_into().ok()?,
        proto: h[6],
        l4: IP6_OFF + IP6_HLEN,
        l4_cut: false,
        id: [0; 4],
        frag: Frag::No,
    };
    for _ in 0..MAX_EXT_HEADERS {
        match ip.proto {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let e: [u8; 4] = ctx.load(ip.l4).ok()?;
                if ip.proto == NEXTHDR_ROUTING && e[3] != 0 {
                    return None;
                }
                ip.proto = e[0];
                ip.l4 += (e[1] as usize + 1) * 8;
            }
            NEXTHDR_AUTH => {
                let e: [u8; 2] = ctx.load(ip.l4).ok()?;
                ip.proto = e[0];
                ip.l4 += (e[1] as usize + 2) * 4;
            }
            NEXTHDR_FRAGMENT => {
                let e: [u8; 8] = ctx.load(ip.l4).ok()?;
                ip.proto = e[0];
                ip.l4 += 8;
                ip.id = [e[4], e[5], e[6], e[7]];
                let offset = u16::from_be_bytes([e[2], e[3]]) >> 3;
                let more = e[3] & 1 != 0;
                ip.frag = if offset != 0 {
                    Frag::Later
                } else if more {
                    Frag::First
                } else {
                    // An atomic fragment (RFC 6946): a whole datagram.
                    Frag::No
                };
            }
            _ => return with_l4_cut(ip, end),
        }
        // Every header is at least as long as what was read of it: one
        // that ends past the payload also was read past it.
        if ip.l4 > end {
            return None;
        }
        if ip.frag == Frag::Later {
            return Some(ip);
        }
    }
    match ip.proto {
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH | NEXTHDR_FRAGMENT => None,
        _ => with_l4_cut(ip, end),
    }
}

/// The frame offset where the payload ends, or `None` when the payload
/// length claims more than the frame holds. (Shorter is fine: the rest is
/// padding.)
#[inline(always)]
fn payload_end(ctx: &TcContext, payload_len: u16) -> Option<usize> {
    let start = IP6_OFF + IP6_HLEN;
    let in_frame = (ctx.len() as usize).saturating_sub(start);
    let len = match payload_len as usize {
        0 if in_frame > u16::MAX as usize => in_frame,
        len if len > in_frame => return None,
        len => len,
    };
    Some(start + len)
}

/// Sets [`Ip::l4_cut`] when the payload ends before the L4 header the
/// datapath reads (see [`parse_ipv4`](crate::packet::parse_ipv4)).
#[inline(always)]
fn with_l4_cut(mut ip: Ip<[u8; 16]>, end: usize) -> Option<Ip<[u8; 16]>> {
    let l4_min = match ip.proto {
        IPPROTO_TCP => TCP_HLEN,
        IPPROTO_UDP => UDP_HLEN,
        IPPROTO_ICMPV6 => ICMP6_ERROR_MIN,
        _ => 0,
    };
    ip.l4_cut = ip.l4 + l4_min > end;
    Some(ip)
}
