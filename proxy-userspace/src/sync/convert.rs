//! The model's frontends as map entries: IPv4 only for now (IPv6 frontends
//! stay in the model for later).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use proxy_common::{
    BE_F_LOCAL, Backend, SVC_F_AFFINITY, SVC_F_DROP_EMPTY, SVC_F_ETP_LOCAL, SVC_F_EXTERNAL,
    SVC_F_SRC_RANGES, SvcKey,
};

use super::{Desired, FrontendWant, NodeAddrs};
use crate::model::{self, Frontend, FrontendKey, FrontendKind};

fn v4_backends(backends: &[model::Endpoint], proto: u8) -> Vec<Backend> {
    backends
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
        .collect()
}

/// The frontend's `SVC_F_*` flags.
fn flags(fe: &Frontend) -> u16 {
    let mut flags = 0;
    if fe.kind.is_external() {
        flags |= SVC_F_EXTERNAL;
    }
    if fe.internal_backends.is_some() {
        flags |= SVC_F_ETP_LOCAL;
    }
    if fe.drop_when_empty {
        flags |= SVC_F_DROP_EMPTY;
    }
    if fe.affinity_timeout.is_some() {
        flags |= SVC_F_AFFINITY;
    }
    if !fe.source_ranges.is_empty() {
        flags |= SVC_F_SRC_RANGES;
    }
    flags
}

/// One frontend as the syncer wants it; None for IPv6.
pub fn to_want(key: &FrontendKey, fe: &Frontend) -> Option<(SvcKey, FrontendWant)> {
    let IpAddr::V4(ip) = key.ip else {
        return None;
    };
    let proto = key.protocol.number();
    // externalTrafficPolicy Local: the primary set is the cluster set
    // (internal sources), the local set serves external ones.
    let (backends, local_backends) = match &fe.internal_backends {
        Some(cluster) => (
            v4_backends(cluster, proto),
            v4_backends(&fe.backends, proto),
        ),
        None => (v4_backends(&fe.backends, proto), Vec::new()),
    };
    let source_ranges = fe
        .source_ranges
        .iter()
        .filter_map(|c| match c.network() {
            IpAddr::V4(a) => Some((a.octets(), c.prefix())),
            IpAddr::V6(_) => None,
        })
        .collect();
    Some((
        SvcKey {
            addr: ip.octets(),
            port: key.port.to_be_bytes(),
            proto,
            _pad: 0,
        },
        FrontendWant {
            name: fe.service.to_string(),
            flags: flags(fe),
            backends,
            local_backends,
            affinity_timeout: fe.affinity_timeout.unwrap_or(0),
            source_ranges,
            external_addr: matches!(
                fe.kind,
                FrontendKind::ExternalIp | FrontendKind::LoadBalancerIp
            ),
        },
    ))
}

/// The node's addresses as the syncer takes them.
pub fn to_node_addrs(nodeport: &BTreeSet<Ipv4Addr>, host: &BTreeSet<Ipv4Addr>) -> NodeAddrs {
    NodeAddrs {
        nodeport: nodeport.iter().map(|a| a.octets()).collect(),
        host: host.iter().chain(nodeport).map(|a| a.octets()).collect(),
    }
}

/// Every frontend, for a full sync.
pub fn to_desired(
    frontends: &BTreeMap<FrontendKey, Frontend>,
    node_addrs: &BTreeSet<Ipv4Addr>,
    host_addrs: &BTreeSet<Ipv4Addr>,
) -> Desired {
    Desired {
        frontends: frontends
            .iter()
            .filter_map(|(k, f)| to_want(k, f))
            .collect(),
        node_addrs: node_addrs.iter().map(|a| a.octets()).collect(),
        host_addrs: host_addrs.iter().map(|a| a.octets()).collect(),
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
