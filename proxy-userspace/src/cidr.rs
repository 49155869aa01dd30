//! CIDR blocks: `--nodeport-addresses` (as kube-proxy takes them) and the
//! service CIDRs cluster IPs are allocated from in manifest mode.

use std::{fmt, net::IpAddr, str::FromStr};

/// An address block, normalised to its network address (`10.96.1.2/12` is
/// `10.96.0.0/12`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Cidr, String> {
        let bits = bits_of(addr);
        if prefix > bits {
            return Err(format!("prefix /{prefix} is too long for {addr}"));
        }
        Ok(Cidr {
            network: from_u128(addr, to_u128(addr) & mask(bits - prefix)),
            prefix,
        })
    }

    pub fn network(&self) -> IpAddr {
        self.network
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn is_ipv4(&self) -> bool {
        self.network.is_ipv4()
    }

    /// Bits of an address that the prefix leaves free.
    pub fn host_bits(&self) -> u32 {
        (bits_of(self.network) - self.prefix) as u32
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.offset_of(ip).is_some()
    }

    /// Offset of `ip` from the network address, if inside.
    pub fn offset_of(&self, ip: IpAddr) -> Option<u128> {
        if ip.is_ipv4() != self.is_ipv4() {
            return None;
        }
        let off = to_u128(ip).wrapping_sub(to_u128(self.network));
        let hb = self.host_bits();
        (hb >= 128 || off >> hb == 0).then_some(off)
    }

    /// The address at `offset` from the network address (the caller keeps
    /// it within the block).
    pub fn at(&self, offset: u128) -> IpAddr {
        from_u128(self.network, to_u128(self.network).wrapping_add(offset))
    }
}

/// The network mask with `host_bits` free bits, as a 128-bit number.
fn mask(host_bits: u8) -> u128 {
    if host_bits >= 128 {
        0
    } else {
        !((1u128 << host_bits) - 1)
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR (address/prefix)"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?}: {addr:?} is not an IP address"))?;
        let max = bits_of(addr);
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("{s:?}: prefix must be 0..={max}"))?;
        Cidr::new(addr, prefix).map_err(|e| format!("{s:?}: {e}"))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

fn bits_of(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a).into(),
        IpAddr::V6(a) => a.into(),
    }
}

fn from_u128(like: IpAddr, v: u128) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::V4((v as u32).into()),
        IpAddr::V6(_) => IpAddr::V6(v.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_matches() {
        let c: Cidr = "192.168.200.0/24".parse().unwrap();
        assert!(c.contains("192.168.200.11".parse().unwrap()));
        assert!(!c.contains("192.168.201.11".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        assert!("10.0.0.0".parse::<Cidr>().is_err());
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("x/8".parse::<Cidr>().is_err());
    }

    #[test]
    fn normalised_to_the_network_address() {
        let c: Cidr = "10.96.1.2/12".parse().unwrap();
        assert_eq!(c.to_string(), "10.96.0.0/12");
        assert!(c.contains("10.111.255.255".parse().unwrap()));
        assert!(!c.contains("10.112.0.0".parse().unwrap()));
        assert_eq!(c.at(5), "10.96.0.5".parse::<IpAddr>().unwrap());
        assert_eq!(c.offset_of("10.96.1.0".parse().unwrap()), Some(256));
        assert!(
            "::/0"
                .parse::<Cidr>()
                .unwrap()
                .contains("::5".parse().unwrap())
        );
    }
}
