//! The two address families as the syncer sees them: a frontend key and a
//! backend of either family. Everything else the syncer keeps (service port
//! ids, backend ids, slots, names, affinity members) is one space for both
//! families, as the maps are (`proxy_common::v6`).

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use proxy_common::{Backend, Backend6, SvcKey, SvcKey6};

/// A frontend: its key in `KEP_SVC_V2` (IPv4) or `KEP_SVC6_V1` (IPv6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FeKey {
    V4(SvcKey),
    V6(SvcKey6),
}

impl From<SvcKey> for FeKey {
    fn from(k: SvcKey) -> FeKey {
        FeKey::V4(k)
    }
}

impl From<SvcKey6> for FeKey {
    fn from(k: SvcKey6) -> FeKey {
        FeKey::V6(k)
    }
}

impl FeKey {
    /// `addr:port/proto` of a frontend (port in host order).
    pub fn new(ip: IpAddr, port: u16, proto: u8) -> FeKey {
        let port = port.to_be_bytes();
        match ip {
            IpAddr::V4(a) => FeKey::V4(SvcKey {
                addr: a.octets(),
                port,
                proto,
                _pad: 0,
            }),
            IpAddr::V6(a) => FeKey::V6(SvcKey6 {
                addr: a.octets(),
                port,
                proto,
                _pad: 0,
            }),
        }
    }

    pub fn addr(&self) -> IpAddr {
        match self {
            FeKey::V4(k) => IpAddr::V4(Ipv4Addr::from(k.addr)),
            FeKey::V6(k) => IpAddr::V6(Ipv6Addr::from(k.addr)),
        }
    }

    /// A VIP (a ClusterIP, externalIP or LB IP) unless it is the
    /// unspecified address, which stands for a NodePort on every node
    /// address of its family.
    pub fn is_vip(&self) -> bool {
        !self.addr().is_unspecified()
    }
}

impl fmt::Display for FeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (port, proto) = match self {
            FeKey::V4(k) => (k.port, k.proto),
            FeKey::V6(k) => (k.port, k.proto),
        };
        let sa = std::net::SocketAddr::new(self.addr(), u16::from_be_bytes(port));
        write!(f, "{sa}/{proto}")
    }
}

/// A backend: its value in `KEP_BE_V1` (IPv4) or `KEP_BE6_V1` (IPv6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AnyBackend {
    V4(Backend),
    V6(Backend6),
}

impl From<Backend> for AnyBackend {
    fn from(b: Backend) -> AnyBackend {
        AnyBackend::V4(b)
    }
}

impl From<Backend6> for AnyBackend {
    fn from(b: Backend6) -> AnyBackend {
        AnyBackend::V6(b)
    }
}

impl AnyBackend {
    /// `addr:port` (host order), protocol and `BE_F_*` flags.
    pub fn new(ip: IpAddr, port: u16, proto: u8, flags: u8) -> AnyBackend {
        let port = port.to_be_bytes();
        match ip {
            IpAddr::V4(a) => AnyBackend::V4(Backend {
                addr: a.octets(),
                port,
                proto,
                flags,
            }),
            IpAddr::V6(a) => AnyBackend::V6(Backend6 {
                addr: a.octets(),
                port,
                proto,
                flags,
            }),
        }
    }

    pub fn is_v4(&self) -> bool {
        matches!(self, AnyBackend::V4(_))
    }
}
