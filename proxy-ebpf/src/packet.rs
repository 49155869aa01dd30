//! Header parsing. Reads go straight to packet memory (bounds-checked for the
//! verifier); when a header lies outside the linear part of the skb it is
//! pulled in first. Everything is kept in wire byte order.

use aya_ebpf::programs::TcContext;
use proxy_common::{FragValue, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

use crate::family::Addr;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: [u8; 2] = [0x08, 0x00];
pub const ETH_P_IPV6: [u8; 2] = [0x86, 0xdd];
pub const ETH_TYPE_OFF: usize = 12;
pub const IP_OFF: usize = ETH_HLEN;
pub const IP_CSUM_OFF: usize = IP_OFF + 10;
pub const IP_SRC_OFF: usize = IP_OFF + 12;
pub const IP_DST_OFF: usize = IP_OFF + 16;

pub const TCP_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
/// What an ICMP error must quote of the offending packet for translation:
/// its IPv4 header (without options) and 8 bytes of L4.
pub const ICMP_QUOTE: usize = 28;
/// An ICMP error's own header and the quote.
pub const ICMP_ERROR_MIN: usize = 8 + ICMP_QUOTE;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Copies `N` bytes at `off` out of the packet, pulling non-linear data in
/// when needed. `None` when the packet is shorter.
#[inline(always)]
pub fn bytes<const N: usize>(ctx: &TcContext, off: usize) -> Option<[u8; N]> {
    if let Some(v) = direct(ctx, off) {
        return Some(v);
    }
    // The header may sit in a paged fragment (GRO, large sends).
    ctx.pull_data((off + N) as u32).ok()?;
    direct(ctx, off)
}

/// Headers are looked for this far into a packet at the most. Offsets read
/// back from a map are unknown to the verifier; this bound lets it accept
/// them.
pub const MAX_HEADER_OFF: usize = 4096;

#[inline(always)]
fn direct<const N: usize>(ctx: &TcContext, off: usize) -> Option<[u8; N]> {
    if off > MAX_HEADER_OFF {
        return None;
    }
    // The verifier tracks the bound on this very pointer: check and read
    // through the same value.
    let start = ctx.data();
    let end = ctx.data_end();
    let p = start + off;
    if p + N > end {
        return None;
    }
    // SAFETY: bounds checked against data_end just above.
    Some(unsafe { core::ptr::read_unaligned(p as *const [u8; N]) })
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Frag {
    /// Not fragmented.
    No,
    /// First fragment: carries the L4 header.
    First,
    /// A later fragment: no L4 header; ports come from the first fragment.
    Later,
}

/// The IP header fields the datapath uses, of either family.
pub struct Ip<A> {
    pub saddr: A,
    pub daddr: A,
    /// The upper-layer protocol (for IPv6, after the extension headers).
    pub proto: u8,
    /// Offset of the L4 header (after IPv4 options or IPv6 extension
    /// headers).
    pub l4: usize,
    /// The total length is too short for the L4 header the datapath reads
    /// (TCP, UDP, or an ICMP error's quote), though the frame may be long
    /// enough: the rest is padding or a lie, never to be read as L4.
    /// (IPv6: the payload length, after the extension headers.)
    pub l4_cut: bool,
    /// The fragment identification (IPv4: 16 bits, then zeroes).
    pub id: [u8; 4],
    pub frag: Frag,
}

/// Parses IPv4 (the caller checked the Ethernet type). `None` for headers
/// the kernel itself will discard: those are not ours to touch.
#[inline(always)]
pub fn parse_ipv4(ctx: &TcContext) -> Option<Ip<[u8; 4]>> {
    // The addresses are read last, after the checks: read together with
    // the rest, their bytes stay live across the checks and spill to the
    // stack of the deepest call chain.
    let h: [u8; 10] = bytes(ctx, IP_OFF)?;
    let ihl = (h[0] & 0x0f) as usize * 4;
    if h[0] >> 4 != 4 || ihl < 20 {
        return None;
    }
    let tot_len = u16::from_be_bytes([h[2], h[3]]) as usize;
    let frag_field = u16::from_be_bytes([h[6], h[7]]);
    let more_fragments = frag_field & 0x2000 != 0;
    let frag = if frag_field & 0x1fff != 0 {
        Frag::Later
    } else if more_fragments {
        Frag::First
    } else {
        Frag::No
    };
    // A total length shorter than the IP header or longer than the frame is
    // a lie the kernel's ip_rcv drops: not ours to touch. (Shorter than the
    // frame is fine: Ethernet pads.)
    if tot_len < ihl || tot_len > (ctx.len() as usize).saturating_sub(IP_OFF) {
        return None;
    }
    // One too short for its L4 header is judged by who reads the header:
    // service traffic is dropped as malformed rather than forwarded with
    // the lie. Decided here, once, as a flag: a length carried along and
    // compared later costs the deepest call chain stack it does not have.
    let l4_min = match (frag, h[9]) {
        (Frag::Later, _) => 0,
        (_, IPPROTO_TCP) => TCP_HLEN,
        (_, IPPROTO_UDP) => UDP_HLEN,
        (_, IPPROTO_ICMP) => ICMP_ERROR_MIN,
        _ => 0,
    };
    let l4_cut = tot_len < ihl + l4_min;
    let a: [u8; 8] = bytes(ctx, IP_SRC_OFF)?;
    Some(Ip {
        saddr: [a[0], a[1], a[2], a[3]],
        daddr: [a[4], a[5], a[6], a[7]],
        proto: h[9],
        l4: IP_OFF + ihl,
        l4_cut,
        id: [h[4], h[5], 0, 0],
        frag,
    })
}

/// L4 fields of a TCP or UDP packet.
pub struct Ports {
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    /// TCP flags byte; 0 for UDP and later fragments.
    pub tcp_flags: u8,
    /// Offset of the L4 checksum when it must be kept up to date: `None`
    /// for later fragments (no L4 header) and UDP without checksum.
    pub csum_off: Option<usize>,
    /// Whether the L4 header is in this packet (false for later fragments).
    pub has_l4: bool,
}

pub enum PortsError {
    Truncated,
    /// A later fragment whose first fragment was not seen.
    UnknownFragment,
}

/// Reads the ports of a TCP or UDP packet; a later fragment gets the ports its
/// first fragment recorded with [`remember_fragment`].
#[inline(always)]
pub fn ports<A: Addr>(ctx: &TcContext, ip: &Ip<A>) -> Result<Ports, PortsError> {
    if ip.frag == Frag::Later {
        let v = A::fragment(ip).ok_or(PortsError::UnknownFragment)?;
        return Ok(Ports {
            sport: v.sport,
            dport: v.dport,
            tcp_flags: 0,
            csum_off: None,
            has_l4: false,
        });
    }
    if ip.l4_cut {
        return Err(PortsError::Truncated);
    }
    match ip.proto {
        IPPROTO_TCP => {
            let t: [u8; 20] = bytes(ctx, ip.l4).ok_or(PortsError::Truncated)?;
            if (t[12] >> 4) < 5 {
                return Err(PortsError::Truncated);
            }
            Ok(Ports {
                sport: [t[0], t[1]],
                dport: [t[2], t[3]],
                tcp_flags: t[13],
                csum_off: Some(ip.l4 + 16),
                has_l4: true,
            })
        }
        IPPROTO_UDP => {
            let u: [u8; 8] = bytes(ctx, ip.l4).ok_or(PortsError::Truncated)?;
            let has_csum = u[6] != 0 || u[7] != 0;
            Ok(Ports {
                sport: [u[0], u[1]],
                dport: [u[2], u[3]],
                tcp_flags: 0,
                csum_off: if has_csum { Some(ip.l4 + 6) } else { None },
                has_l4: true,
            })
        }
        _ => Err(PortsError::Truncated),
    }
}

/// A first fragment that is being translated records its ports so that the
/// later fragments of the datagram find the same flow.
#[inline(always)]
pub fn remember_fragment<A: Addr>(ip: &Ip<A>, ports: &Ports) {
    if ip.frag == Frag::First {
        let v = FragValue {
            sport: ports.sport,
            dport: ports.dport,
        };
        A::set_fragment(ip, v);
    }
}

impl Ports {
    /// A TCP SYN without ACK: the first packet of a new connection.
    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }

    #[inline(always)]
    pub fn is_closing(&self) -> bool {
        self.tcp_flags & (TCP_FIN | TCP_RST) != 0
    }
}
