//! Building and checking raw Ethernet/IPv4 packets, for the datapath tests
//! (BPF_PROG_TEST_RUN) and the datapath benchmark.

use std::net::{Ipv4Addr, SocketAddrV4};

pub use proxy_common::{IPPROTO_ICMP as ICMP, IPPROTO_TCP as TCP, IPPROTO_UDP as UDP};

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

pub const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// RFC 1071 internet checksum of `data`, as the value to store (big endian).
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += word as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.push(0);
    p.push(proto);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p
}

/// A packet description; [`Pkt::build`] turns it into bytes with correct
/// checksums.
#[derive(Clone, Debug)]
pub struct Pkt {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub proto: u8,
    pub tcp_flags: u8,
    pub ip_options: Vec<u8>,
    pub payload: Vec<u8>,
    pub ip_id: u16,
    /// Fragment offset in 8-byte units.
    pub frag_offset: u16,
    pub more_fragments: bool,
    /// Send UDP with checksum 0 ("none").
    pub udp_no_checksum: bool,
}

impl Pkt {
    pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Pkt {
        Pkt {
            src,
            dst,
            proto: TCP,
            tcp_flags: flags,
            ip_options: Vec::new(),
            payload: Vec::new(),
            ip_id: 0x1234,
            frag_offset: 0,
            more_fragments: false,
            udp_no_checksum: false,
        }
    }

    pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Pkt {
        Pkt {
            proto: UDP,
            tcp_flags: 0,
            payload: payload.to_vec(),
            ..Pkt::tcp(src, dst, 0)
        }
    }

    fn l4(&self) -> Vec<u8> {
        let (s, d) = (self.src.port().to_be_bytes(), self.dst.port().to_be_bytes());
        let mut l4 = Vec::new();
        match self.proto {
            TCP => {
                l4.extend_from_slice(&s);
                l4.extend_from_slice(&d);
                l4.extend_from_slice(&1000u32.to_be_bytes()); // seq
                l4.extend_from_slice(&0u32.to_be_bytes()); // ack
                l4.push(5 << 4);
                l4.push(self.tcp_flags);
                l4.extend_from_slice(&64240u16.to_be_bytes());
                l4.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
                l4.extend_from_slice(&self.payload);
                let mut sum_input = pseudo_header(*self.src.ip(), *self.dst.ip(), TCP, l4.len());
                sum_input.extend_from_slice(&l4);
                let c = checksum(&sum_input);
                l4[16..18].copy_from_slice(&c.to_be_bytes());
            }
            UDP => {
                let len = 8 + self.payload.len();
                l4.extend_from_slice(&s);
                l4.extend_from_slice(&d);
                l4.extend_from_slice(&(len as u16).to_be_bytes());
                l4.extend_from_slice(&[0, 0]);
                l4.extend_from_slice(&self.payload);
                if !self.udp_no_checksum {
                    let mut sum_input = pseudo_header(*self.src.ip(), *self.dst.ip(), UDP, len);
                    sum_input.extend_from_slice(&l4);
                    let c = match checksum(&sum_input) {
                        0 => 0xffff,
                        c => c,
                    };
                    l4[6..8].copy_from_slice(&c.to_be_bytes());
                }
            }
            _ => l4.extend_from_slice(&self.payload),
        }
        l4
    }

    /// The IP payload: the whole L4 segment (use [`Pkt::build_with_payload`]
    /// to send a slice of it as a fragment).
    pub fn ip_payload(&self) -> Vec<u8> {
        self.l4()
    }

    pub fn build(&self) -> Vec<u8> {
        self.build_with_payload(&self.l4())
    }

    /// Builds the Ethernet + IPv4 headers around `payload` (an L4 segment
    /// or a fragment of one).
    pub fn build_with_payload(&self, payload: &[u8]) -> Vec<u8> {
        ipv4_frame(
            *self.src.ip(),
            *self.dst.ip(),
            self.proto,
            &self.ip_options,
            self.ip_id,
            self.frag_offset,
            self.more_fragments,
            payload,
        )
    }
}

#[allow(clippy::too_many_arguments)]
pub fn ipv4_frame(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    options: &[u8],
    id: u16,
    frag_offset: u16,
    more_fragments: bool,
    payload: &[u8],
) -> Vec<u8> {
    assert!(options.len().is_multiple_of(4) && options.len() <= 40);
    let ihl = 20 + options.len();
    let mut f = Vec::with_capacity(14 + ihl + payload.len());
    f.extend_from_slice(&DST_MAC);
    f.extend_from_slice(&SRC_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![0u8; 20];
    ip[0] = 0x40 | (ihl / 4) as u8;
    ip[2..4].copy_from_slice(&((ihl + payload.len()) as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&id.to_be_bytes());
    let frag = frag_offset | if more_fragments { 0x2000 } else { 0 };
    ip[6..8].copy_from_slice(&frag.to_be_bytes());
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    ip.extend_from_slice(options);
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(payload);
    f
}

/// An ICMP error (type/code) from `src` to `dst` quoting `quoted` (an IP
/// header plus at least 8 bytes of what followed it).
pub fn icmp_error(src: Ipv4Addr, dst: Ipv4Addr, ty: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let mut icmp = vec![ty, code, 0, 0, 0, 0, 0x05, 0xdc];
    icmp.extend_from_slice(quoted);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    ipv4_frame(src, dst, ICMP, &[], 0x4321, 0, false, &icmp)
}

/// What the tests check in a packet that came out of the datapath.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    /// Ports when the packet carries an L4 header.
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    pub ip_checksum_ok: bool,
    /// `None` when it cannot be checked (a fragment, UDP without checksum).
    pub l4_checksum_ok: Option<bool>,
    pub udp_checksum_zero: bool,
    /// The bytes after the IP header.
    pub l4: Vec<u8>,
}

pub fn parse(frame: &[u8]) -> Option<Parsed> {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[14..];
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if ihl < 20 || ip.len() < tot || tot < ihl {
        return None;
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let proto = ip[9];
    let l4 = &ip[ihl..tot];
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    let fragmented = frag & 0x3fff != 0;
    let first_or_whole = frag & 0x1fff == 0;
    let (mut sport, mut dport) = (None, None);
    if (proto == TCP || proto == UDP) && first_or_whole && l4.len() >= 4 {
        sport = Some(u16::from_be_bytes([l4[0], l4[1]]));
        dport = Some(u16::from_be_bytes([l4[2], l4[3]]));
    }
    let udp_checksum_zero = proto == UDP && l4.len() >= 8 && l4[6] == 0 && l4[7] == 0;
    let l4_checksum_ok = match proto {
        _ if fragmented => None,
        TCP | UDP if udp_checksum_zero => None,
        TCP | UDP => {
            let mut s = pseudo_header(src, dst, proto, l4.len());
            s.extend_from_slice(l4);
            Some(checksum(&s) == 0)
        }
        ICMP => Some(checksum(l4) == 0),
        _ => None,
    };
    Some(Parsed {
        dst_mac: frame[0..6].try_into().unwrap(),
        src_mac: frame[6..12].try_into().unwrap(),
        src,
        dst,
        proto,
        sport,
        dport,
        ip_checksum_ok: checksum(&ip[..ihl]) == 0,
        l4_checksum_ok,
        udp_checksum_zero,
        l4: l4.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_packets_have_valid_checksums() {
        let a: SocketAddrV4 = "10.0.0.1:1000".parse().unwrap();
        let b: SocketAddrV4 = "10.0.0.2:80".parse().unwrap();
        for pkt in [
            Pkt::tcp(a, b, TCP_SYN),
            Pkt::udp(a, b, b"hello"),
            Pkt {
                ip_options: vec![1, 1, 1, 0],
                ..Pkt::udp(a, b, b"odd")
            },
        ] {
            let p = parse(&pkt.build()).unwrap();
            assert!(p.ip_checksum_ok);
            assert_eq!(p.l4_checksum_ok, Some(true));
            assert_eq!(p.sport, Some(1000));
        }
        let mut bad = Pkt::tcp(a, b, TCP_SYN).build();
        bad[40] ^= 1;
        assert_eq!(parse(&bad).unwrap().l4_checksum_ok, Some(false));
    }
}

/// IPv6 frames: the same checks for the IPv6 datapath.
pub mod v6 {
    use std::net::{Ipv6Addr, SocketAddrV6};

    use super::{DST_MAC, SRC_MAC, TCP, UDP, checksum};

    pub const ICMPV6: u8 = proxy_common::IPPROTO_ICMPV6;
    pub const HOP_BY_HOP: u8 = 0;
    pub const ROUTING: u8 = 43;
    pub const FRAGMENT: u8 = 44;
    pub const DEST_OPTS: u8 = 60;

    fn pseudo_header(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, len: usize) -> Vec<u8> {
        let mut p = Vec::with_capacity(40);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(&(len as u32).to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, proto]);
        p
    }

    /// The checksum of an upper-layer message, pseudo-header included.
    pub fn l4_checksum(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, l4: &[u8]) -> u16 {
        let mut s = pseudo_header(src, dst, proto, l4.len());
        s.extend_from_slice(l4);
        checksum(&s)
    }

    /// An extension header of `kind` with `len8` 8-byte units after the
    /// first 8 (padding options); its next-header byte is set by
    /// [`Pkt6::build`].
    pub fn ext(kind: u8, len8: u8) -> (u8, Vec<u8>) {
        let mut h = vec![0u8; 8 + 8 * len8 as usize];
        h[1] = len8;
        // PadN over the rest of the options area.
        h[2] = 1;
        h[3] = (h.len() - 4) as u8;
        (kind, h)
    }

    /// A routing header (type 4, segment routing) with `segments_left`.
    pub fn routing(segments_left: u8) -> (u8, Vec<u8>) {
        let mut h = vec![0u8; 24];
        h[1] = 2;
        h[2] = 4;
        h[3] = segments_left;
        (ROUTING, h)
    }

    /// A fragment header: offset in 8-byte units, more fragments, id.
    pub fn fragment(offset: u16, more: bool, id: u32) -> (u8, Vec<u8>) {
        let mut h = vec![0u8; 8];
        h[2..4].copy_from_slice(&((offset << 3) | more as u16).to_be_bytes());
        h[4..8].copy_from_slice(&id.to_be_bytes());
        (FRAGMENT, h)
    }

    /// An IPv6 packet description, as [`super::Pkt`] for IPv4.
    #[derive(Clone, Debug)]
    pub struct Pkt6 {
        pub src: SocketAddrV6,
        pub dst: SocketAddrV6,
        pub proto: u8,
        pub tcp_flags: u8,
        /// Extension headers in order: (kind, bytes).
        pub ext: Vec<(u8, Vec<u8>)>,
        pub payload: Vec<u8>,
    }

    impl Pkt6 {
        pub fn tcp(src: SocketAddrV6, dst: SocketAddrV6, flags: u8) -> Pkt6 {
            Pkt6 {
                src,
                dst,
                proto: TCP,
                tcp_flags: flags,
                ext: Vec::new(),
                payload: Vec::new(),
            }
        }

        pub fn udp(src: SocketAddrV6, dst: SocketAddrV6, payload: &[u8]) -> Pkt6 {
            Pkt6 {
                proto: UDP,
                payload: payload.to_vec(),
                ..Pkt6::tcp(src, dst, 0)
            }
        }

        pub fn with_ext(mut self, ext: Vec<(u8, Vec<u8>)>) -> Pkt6 {
            self.ext = ext;
            self
        }

        /// The whole L4 segment with its checksum.
        pub fn l4(&self) -> Vec<u8> {
            let (s, d) = (self.src.port().to_be_bytes(), self.dst.port().to_be_bytes());
            let mut l4 = Vec::new();
            l4.extend_from_slice(&s);
            l4.extend_from_slice(&d);
            let csum_at = match self.proto {
                TCP => {
                    l4.extend_from_slice(&1000u32.to_be_bytes());
                    l4.extend_from_slice(&0u32.to_be_bytes());
                    l4.push(5 << 4);
                    l4.push(self.tcp_flags);
                    l4.extend_from_slice(&64240u16.to_be_bytes());
                    l4.extend_from_slice(&[0, 0, 0, 0]);
                    16
                }
                _ => {
                    l4.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                    l4.extend_from_slice(&[0, 0]);
                    6
                }
            };
            l4.extend_from_slice(&self.payload);
            let c = match l4_checksum(*self.src.ip(), *self.dst.ip(), self.proto, &l4) {
                0 if self.proto == UDP => 0xffff,
                c => c,
            };
            l4[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
            l4
        }

        pub fn build(&self) -> Vec<u8> {
            self.build_with_payload(&self.l4())
        }

        /// The frame around `payload` (an L4 segment or a fragment of one).
        pub fn build_with_payload(&self, payload: &[u8]) -> Vec<u8> {
            let mut chain = Vec::new();
            for (i, (_, h)) in self.ext.iter().enumerate() {
                let mut h = h.clone();
                h[0] = self.ext.get(i + 1).map_or(self.proto, |(k, _)| *k);
                chain.extend_from_slice(&h);
            }
            let first = self.ext.first().map_or(self.proto, |(k, _)| *k);
            chain.extend_from_slice(payload);
            ipv6_frame(*self.src.ip(), *self.dst.ip(), first, &chain)
        }
    }

    /// Ethernet + IPv6 header (next header `nh`) around `payload`.
    pub fn ipv6_frame(src: Ipv6Addr, dst: Ipv6Addr, nh: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::with_capacity(54 + payload.len());
        f.extend_from_slice(&DST_MAC);
        f.extend_from_slice(&SRC_MAC);
        f.extend_from_slice(&[0x86, 0xdd]);
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        f.push(nh);
        f.push(64);
        f.extend_from_slice(&src.octets());
        f.extend_from_slice(&dst.octets());
        f.extend_from_slice(payload);
        f
    }

    /// An ICMPv6 message (type, code, 4 bytes of data) quoting `body`.
    pub fn icmp6(
        src: Ipv6Addr,
        dst: Ipv6Addr,
        ty: u8,
        code: u8,
        data: u32,
        body: &[u8],
    ) -> Vec<u8> {
        let mut m = vec![ty, code, 0, 0];
        m.extend_from_slice(&data.to_be_bytes());
        m.extend_from_slice(body);
        let c = l4_checksum(src, dst, ICMPV6, &m);
        m[2..4].copy_from_slice(&c.to_be_bytes());
        ipv6_frame(src, dst, ICMPV6, &m)
    }

    /// What the tests check in an IPv6 packet out of the datapath.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Parsed6 {
        pub src: Ipv6Addr,
        pub dst: Ipv6Addr,
        /// The upper-layer protocol after the extension headers.
        pub proto: u8,
        /// Extension header kinds, in order.
        pub ext: Vec<u8>,
        pub sport: Option<u16>,
        pub dport: Option<u16>,
        /// `None` for fragments.
        pub l4_checksum_ok: Option<bool>,
        /// The bytes after the extension headers.
        pub l4: Vec<u8>,
    }

    pub fn parse6(frame: &[u8]) -> Option<Parsed6> {
        if frame.len() < 54 || frame[12..14] != [0x86, 0xdd] {
            return None;
        }
        let ip = &frame[14..];
        let plen = u16::from_be_bytes([ip[4], ip[5]]) as usize;
        if ip.len() < 40 + plen {
            return None;
        }
        let src = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).ok()?);
        let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).ok()?);
        let (mut nh, mut off, mut ext, mut fragmented) = (ip[6], 40, Vec::new(), false);
        while matches!(nh, HOP_BY_HOP | ROUTING | DEST_OPTS | FRAGMENT) {
            let h = ip.get(off..off + 8)?;
            ext.push(nh);
            let len = if nh == FRAGMENT {
                fragmented = true;
                8
            } else {
                (h[1] as usize + 1) * 8
            };
            nh = h[0];
            off += len;
        }
        let l4 = ip.get(off..40 + plen)?.to_vec();
        let ports = (nh == TCP || nh == UDP) && l4.len() >= 4;
        let l4_checksum_ok = (!fragmented && matches!(nh, TCP | UDP | ICMPV6))
            .then(|| l4_checksum(src, dst, nh, &l4) == 0);
        Some(Parsed6 {
            src,
            dst,
            proto: nh,
            ext,
            sport: ports.then(|| u16::from_be_bytes([l4[0], l4[1]])),
            dport: ports.then(|| u16::from_be_bytes([l4[2], l4[3]])),
            l4_checksum_ok,
            l4,
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn built_ipv6_packets_have_valid_checksums_and_chains() {
            let a: SocketAddrV6 = "[fd00::1]:1000".parse().unwrap();
            let b: SocketAddrV6 = "[fd00::2]:80".parse().unwrap();
            let p = Pkt6::tcp(a, b, super::super::TCP_SYN)
                .with_ext(vec![ext(HOP_BY_HOP, 0), ext(DEST_OPTS, 1)]);
            let parsed = parse6(&p.build()).unwrap();
            assert_eq!(parsed.ext, vec![HOP_BY_HOP, DEST_OPTS]);
            assert_eq!(parsed.proto, TCP);
            assert_eq!(parsed.l4_checksum_ok, Some(true));
            assert_eq!(parsed.dport, Some(80));
            let u = parse6(&Pkt6::udp(a, b, b"odd").build()).unwrap();
            assert_eq!(u.l4_checksum_ok, Some(true));
        }
    }
}
