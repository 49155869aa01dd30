//! The model's frontends as map entries, both families: a frontend's key,
//! backends and source ranges are all of its own family (the model keeps
//! them so).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use proxy_common::{
    BE_F_LOCAL, SVC_F_AFFINITY, SVC_F_DROP_EMPTY, SVC_F_ETP_LOCAL, SVC_F_EXTERNAL, SVC_F_SRC_RANGES,
};

use super::{AnyBackend, Desired, FeKey, FrontendWant, NodeAddrs};
use crate::model::{self, Frontend, FrontendKey, FrontendKind};

fn backends(backends: &[model::Endpoint], proto: u8, v4: bool) -> Vec<AnyBackend> {
    backends
        .iter()
        .filter(|b| b.ip.is_ipv4() == v4)
        .map(|b| {
            let flags = if b.local { BE_F_LOCAL } else { 0 };
            AnyBackend::new(b.ip, b.port, proto, flags)
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

/// The syncer's key of a model frontend.
pub fn fe_key(key: &FrontendKey) -> FeKey {
    FeKey::new(key.ip, key.port, key.protocol.number())
}

/// One frontend as the syncer wants it.
pub fn to_want(key: &FrontendKey, fe: &Frontend) -> (FeKey, FrontendWant) {
    let proto = key.protocol.number();
    let v4 = key.ip.is_ipv4();
    // externalTrafficPolicy Local: the primary set is the cluster set
    // (internal sources), the local set serves external ones.
    let (primary, local_backends) = match &fe.internal_backends {
        Some(cluster) => (
            backends(cluster, proto, v4),
            backends(&fe.backends, proto, v4),
        ),
        None => (backends(&fe.backends, proto, v4), Vec::new()),
    };
    let source_ranges = fe
        .source_ranges
        .iter()
        .filter(|c| c.is_ipv4() == v4)
        .map(|c| (c.network(), c.prefix()))
        .collect();
    (
        fe_key(key),
        FrontendWant {
            name: fe.service.to_string(),
            flags: flags(fe),
            backends: primary,
            local_backends,
            affinity_timeout: fe.affinity_timeout.unwrap_or(0),
            source_ranges,
            external_addr: matches!(
                fe.kind,
                FrontendKind::ExternalIp | FrontendKind::LoadBalancerIp
            ),
        },
    )
}

/// The node's addresses as the syncer takes them.
pub fn to_node_addrs(nodeport: &BTreeSet<IpAddr>, host: &BTreeSet<IpAddr>) -> NodeAddrs {
    NodeAddrs {
        nodeport: nodeport.clone(),
        host: host.union(nodeport).copied().collect(),
    }
}

/// Every frontend, for a full sync.
pub fn to_desired(
    frontends: &BTreeMap<FrontendKey, Frontend>,
    node_addrs: &BTreeSet<IpAddr>,
    host_addrs: &BTreeSet<IpAddr>,
) -> Desired {
    Desired {
        frontends: frontends.iter().map(|(k, f)| to_want(k, f)).collect(),
        node_addrs: node_addrs.clone(),
        host_addrs: host_addrs.clone(),
    }
}

/// The frontends in `changed` as syncer changes (None: gone).
pub fn to_changes(
    frontends: &BTreeMap<FrontendKey, Frontend>,
    changed: &BTreeSet<FrontendKey>,
) -> Vec<(FeKey, Option<FrontendWant>)> {
    changed
        .iter()
        .map(|k| match frontends.get(k) {
            Some(f) => {
                let (key, want) = to_want(k, f);
                (key, Some(want))
            }
            None => (fe_key(k), None),
        })
        .collect()
}
