//! The model's frontends as map entries: IPv4 only for now (IPv6 frontends
//! stay in the model for later).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use proxy_common::{BE_F_LOCAL, Backend, SVC_F_EXTERNAL, SvcKey};

use super::{Desired, FrontendWant};
use crate::model::{Frontend, FrontendKey, FrontendKind};

/// One frontend as the syncer wants it; None for IPv6.
pub fn to_want(key: &FrontendKey, fe: &Frontend) -> Option<(SvcKey, FrontendWant)> {
    let IpAddr::V4(ip) = key.ip else {
        return None;
    };
    let proto = key.protocol.number();
    let backends = fe
        .backends
        .iter()
        .filter_map(|b| match b.ip {
            IpAddr::V4(addr) => Some(Backend {
                addr: addr.octets(),
                port: b.port.to_be_bytes(),
                proto,
                flags: if b.local { BE_F_LOCAL } else { 0 },
            }),
            IpAddr::V6(_) => None,
        })
        .collect();
    let external = !matches!(fe.kind, FrontendKind::ClusterIp);
    Some((
        SvcKey {
            addr: ip.octets(),
            port: key.port.to_be_bytes(),
            proto,
            _pad: 0,
        },
        FrontendWant {
            name: fe.service.to_string(),
            flags: if external { SVC_F_EXTERNAL } else { 0 },
            backends,
        },
    ))
}

/// Every frontend, for a full sync.
pub fn to_desired(
    frontends: &BTreeMap<FrontendKey, Frontend>,
    node_addrs: &BTreeSet<Ipv4Addr>,
) -> Desired {
    Desired {
        frontends: frontends
            .iter()
            .filter_map(|(k, f)| to_want(k, f))
            .collect(),
        node_addrs: node_addrs.iter().map(|a| a.octets()).collect(),
    }
}

/// The frontends in `changed` as syncer changes (None: gone).
pub fn to_changes(
    frontends: &BTreeMap<FrontendKey, Frontend>,
    changed: &BTreeSet<FrontendKey>,
) -> Vec<(SvcKey, Option<FrontendWant>)> {
    changed
        .iter()
        .filter_map(|k| match frontends.get(k) {
            Some(f) => to_want(k, f).map(|(sk, w)| (sk, Some(w))),
            None => {
                let IpAddr::V4(ip) = k.ip else { return None };
                Some((
                    SvcKey {
                        addr: ip.octets(),
                        port: k.port.to_be_bytes(),
                        proto: k.protocol.number(),
                        _pad: 0,
                    },
                    None,
                ))
            }
        })
        .collect()
}
