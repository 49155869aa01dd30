//! IPv6 frames for the datapath fuzzer: TCP, UDP, ICMPv6 (errors quoting
//! valid, truncated, mutated or garbage packets, and informational
//! messages) and other protocols, behind random extension header chains
//! (hop-by-hop, destination options, routing with and without segments
//! left, authentication, unknown headers, fragments with every flag
//! combination), aimed at the IPv6 ClusterIPs, the NodePort on the node's
//! IPv6 address, as backend replies and elsewhere; then mutated: version,
//! payload length lies, next-header and extension length bytes, TCP data
//! offsets and flags, UDP length lies, flipped bytes.
//!
//! [`Walk`] is the fuzzer's own reading of a chain, independent of the
//! datapath's: it says which frames lie about their length and which are
//! first fragments.

use std::net::{Ipv6Addr, SocketAddrV6};

use proxy_userspace::testkit::pktgen::{
    TCP, UDP,
    v6::{DEST_OPTS, FRAGMENT, HOP_BY_HOP, ICMPV6, Pkt6, ext, fragment, icmp6, routing},
};

use super::{Aim, Rng};

pub const VIP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
pub const EMPTY_VIP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x20);
pub const NODE_IP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xc0a8, 0, 0, 0, 0, 0, 0xb);
pub const BACKEND: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 2, 0, 0, 0, 0, 0x11);

const ETH_P_IPV6: [u8; 2] = [0x86, 0xdd];
const AUTH: u8 = 51;

fn client(rng: &mut Rng) -> SocketAddrV6 {
    let ip = Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 2 + rng.below(8) as u16);
    SocketAddrV6::new(ip, 32768 + rng.below(64) as u16, 0, 0)
}

fn elsewhere(rng: &mut Rng) -> SocketAddrV6 {
    let ip = Ipv6Addr::new(
        0x2001,
        0xdb8,
        rng.below(4) as u16,
        0,
        0,
        0,
        0,
        1 + rng.below(200) as u16,
    );
    SocketAddrV6::new(ip, rng.pick(&[80, 443, 8080, 30080, 53]), 0, 0)
}

fn ends(rng: &mut Rng, aim: Aim) -> (SocketAddrV6, SocketAddrV6) {
    let port = |rng: &mut Rng, usual: u16| {
        if rng.chance(1, 8) {
            rng.next() as u16
        } else {
            usual
        }
    };
    let at = |ip, port| SocketAddrV6::new(ip, port, 0, 0);
    match aim {
        Aim::ClusterIp => (client(rng), at(VIP, port(rng, super::SERVICE_PORT))),
        Aim::EmptyClusterIp => (client(rng), at(EMPTY_VIP, super::SERVICE_PORT)),
        Aim::NodePort => (elsewhere(rng), at(NODE_IP, port(rng, super::NODE_PORT))),
        Aim::BackendReply => (at(BACKEND, super::TARGET_PORT), client(rng)),
        Aim::IcmpError | Aim::Other => (client(rng), elsewhere(rng)),
    }
}

/// One extension header, of any kind the datapath knows or not.
fn extension(rng: &mut Rng) -> (u8, Vec<u8>) {
    match rng.below(7) {
        0 => ext(HOP_BY_HOP, rng.pick(&[0, 0, 1, 30])),
        // Long ones too; a frame must stay within the page BPF_PROG_TEST_RUN
        // takes (8 x 328 bytes at most here).
        1 => ext(DEST_OPTS, rng.pick(&[0, 0, 2, 40])),
        2 => routing(rng.pick(&[0, 0, 1, 255])),
        3 => {
            // AH: its length counts 4-byte units, less 2.
            let units = rng.pick(&[1u8, 4, 0]);
            let mut h = vec![0u8; (units as usize + 2) * 4];
            h[1] = units;
            (AUTH, h)
        }
        4 => (rng.pick(&[253, 254, 59, 135]), ext(DEST_OPTS, 0).1),
        // Every flag combination: offset or none, reserved bits, M.
        _ => {
            let offset = rng.pick(&[0, 0, 0, 1, 4, 185, 0x1fff]);
            let (_, mut h) = fragment(offset, rng.chance(1, 2), rng.below(4) as u32);
            h[3] |= (rng.below(4) as u8) << 1;
            h[1] = rng.pick(&[0, 0, 0, 0xff]);
            (FRAGMENT, h)
        }
    }
}

/// A valid IPv6 packet (checksums right, no Ethernet header) for `aim`.
pub fn base(rng: &mut Rng, aim: Aim) -> Vec<u8> {
    let (src, dst) = ends(rng, aim);
    let n = rng.pick(&[0, 1, 8, 100]);
    let payload = rng.bytes(n);
    let mut p = match rng.below(5) {
        0 | 1 => Pkt6 {
            payload,
            ..Pkt6::tcp(src, dst, rng.next() as u8)
        },
        2 | 3 => Pkt6::udp(src, dst, &payload),
        _ => Pkt6 {
            proto: rng.pick(&[ICMPV6, 132, 59, 0, 255]),
            payload,
            ..Pkt6::tcp(src, dst, 0)
        },
    };
    if rng.chance(1, 3) {
        p.ext = (0..1 + rng.below(8)).map(|_| extension(rng)).collect();
    }
    let frame = if matches!(p.proto, TCP | UDP) {
        p.build()
    } else {
        p.build_with_payload(&p.payload)
    };
    frame[14..].to_vec()
}

/// An ICMPv6 message: an error quoting a packet of a service flow (maybe
/// truncated, spoiled or garbage), or an informational one.
pub fn icmp_message(rng: &mut Rng) -> Vec<u8> {
    let aim = rng.pick(&[Aim::ClusterIp, Aim::NodePort, Aim::BackendReply, Aim::Other]);
    let mut quoted = base(rng, aim);
    // An error quotes as much as fits in the minimum MTU (RFC 4443).
    quoted.truncate(1280 - 48);
    match rng.below(4) {
        0 => quoted.truncate(rng.below(quoted.len() + 1)),
        1 => {
            let n = rng.below(80);
            quoted = rng.bytes(n)
        }
        2 => mutate_ip(rng, &mut quoted),
        _ => {}
    }
    let (from, to) = if rng.chance(1, 2) {
        (
            Ipv6Addr::new(0xfd00, 0x244, 2, 0, 0, 0, 0, 1),
            *client(rng).ip(),
        )
    } else {
        (*elsewhere(rng).ip(), rng.pick(&[NODE_IP, BACKEND, VIP]))
    };
    let ty = rng.pick(&[
        1, 1, 2, 2, 3, 4, 0, 5, 127, 128, 129, 133, 134, 135, 136, 143,
    ]);
    let any = rng.next() as u32;
    let data = rng.pick(&[0, 1280, 1500, 0xffff_ffff, any]);
    icmp6(from, to, ty, rng.below(8) as u8, data, &quoted)[14..].to_vec()
}

/// The fuzzer's reading of an IPv6 packet's chain (no Ethernet header).
pub struct Walk {
    /// Upper-layer protocol, or the header that ended the walk.
    pub proto: u8,
    /// Offset of the upper-layer header.
    pub l4: usize,
    /// (offset, more fragments) of a fragment header.
    pub frag: Option<(u16, bool)>,
}

pub fn walk(ip: &[u8]) -> Option<Walk> {
    let mut w = Walk {
        proto: *ip.get(6)?,
        l4: 40,
        frag: None,
    };
    // The datapath walks 6 at most; a longer chain is passed.
    for _ in 0..8 {
        let h = ip.get(w.l4..w.l4 + 2)?;
        let len = match w.proto {
            HOP_BY_HOP | 43 | DEST_OPTS => (h[1] as usize + 1) * 8,
            AUTH => (h[1] as usize + 2) * 4,
            FRAGMENT => {
                let f = u16::from_be_bytes(ip.get(w.l4 + 2..w.l4 + 4)?.try_into().ok()?);
                w.frag = Some((f >> 3, f & 1 != 0));
                8
            }
            _ => return Some(w),
        };
        w.proto = h[0];
        w.l4 += len;
        if matches!(w.frag, Some((off, _)) if off != 0) {
            return Some(w);
        }
    }
    Some(w)
}

/// An IPv6 frame whose payload length is longer than the frame, or
/// shorter than its chain plus (unless a later fragment) its L4 header.
/// A jumbogram length (0) counts as a lie: no frame here is that long.
pub fn lies_about_its_length(frame: &[u8]) -> bool {
    if frame.len() < 54 || frame[12..14] != ETH_P_IPV6 {
        return false;
    }
    let ip = &frame[14..];
    let plen = u16::from_be_bytes([ip[4], ip[5]]) as usize;
    if 40 + plen > ip.len() {
        return true;
    }
    let Some(w) = walk(&ip[..40 + plen]) else {
        return true;
    };
    let l4_min = match w.proto {
        _ if matches!(w.frag, Some((off, _)) if off != 0) => 0,
        TCP => 20,
        UDP => 8,
        ICMPV6 => 56,
        _ => 0,
    };
    w.l4 + l4_min > 40 + plen
}

pub fn is_first_fragment(frame: &[u8]) -> bool {
    frame.len() >= 54
        && frame[12..14] == ETH_P_IPV6
        && walk(&frame[14..]).is_some_and(|w| w.frag == Some((0, true)))
}

/// One header lie or odd value in an IPv6 packet (no Ethernet header).
pub fn mutate_ip(rng: &mut Rng, ip: &mut [u8]) {
    if ip.len() < 40 {
        return;
    }
    let w = walk(ip);
    let l4 = w.as_ref().map_or(ip.len(), |w| w.l4.min(ip.len()));
    let proto = w.as_ref().map_or(0, |w| w.proto);
    match rng.below(8) {
        0 => ip[0] = ((rng.below(16) as u8) << 4) | (ip[0] & 0x0f),
        1 | 2 => {
            let len = u16::from_be_bytes([ip[4], ip[5]]);
            let lie = match rng.below(5) {
                0 => rng.next() as u16,
                1 => len.wrapping_add(1 + rng.below(64) as u16),
                2 => len.saturating_sub(1 + rng.below(64) as u16),
                3 => (l4 - 40 + rng.below(20)) as u16,
                _ => rng.pick(&[0, 7, 8, 0xffff]),
            };
            ip[4..6].copy_from_slice(&lie.to_be_bytes());
        }
        3 => ip[6] = rng.pick(&[TCP, UDP, ICMPV6, HOP_BY_HOP, 43, FRAGMENT, AUTH, DEST_OPTS]),
        4 if l4 > 40 => {
            // A length or next-header byte inside the chain.
            let at = 40 + rng.below(l4 - 40);
            ip[at] = rng.next() as u8;
        }
        5 if ip.len() >= l4 + 14 && proto == TCP => {
            ip[l4 + 12] = ((rng.below(16) as u8) << 4) | (ip[l4 + 12] & 0x0f);
            ip[l4 + 13] = rng.next() as u8;
        }
        6 if ip.len() >= l4 + 8 && proto == UDP => {
            let any = rng.next() as u16;
            let lie = rng.pick(&[0, 1, 7, 8, 9, 0xffff, any]);
            ip[l4 + 4..l4 + 6].copy_from_slice(&lie.to_be_bytes());
        }
        _ => {
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(ip.len());
                ip[at] = rng.next() as u8;
            }
        }
    }
}

/// A random IPv6 frame (Ethernet header included), mutated.
pub fn frame(rng: &mut Rng, aim: Aim) -> Vec<u8> {
    let mut ip = packet(rng, aim);
    for _ in 0..rng.below(4) {
        mutate_ip(rng, &mut ip);
    }
    with_ethernet(&ip)
}

/// A valid IPv6 frame aimed at `aim`.
pub fn valid_frame(rng: &mut Rng, aim: Aim) -> Vec<u8> {
    let ip = packet(rng, aim);
    with_ethernet(&ip)
}

fn packet(rng: &mut Rng, aim: Aim) -> Vec<u8> {
    match aim {
        Aim::IcmpError => icmp_message(rng),
        _ => base(rng, aim),
    }
}

fn with_ethernet(ip: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + ip.len());
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01]);
    f.extend_from_slice(&ETH_P_IPV6);
    f.extend_from_slice(ip);
    f
}
