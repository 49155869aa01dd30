//! The endpoints of a service port: conditions, merging of slices, the
//! terminating fallback and topology, as kube-proxy's `CategorizeEndpoints`
//! chooses them.
//!
//! * A service port matches the slice port with the same name (an unnamed
//!   service port matches a slice port whose name is empty or missing) and
//!   protocol (TCP when unset, on both sides). The backend port is the slice
//!   port's number; a slice without a matching port gives the service port
//!   no endpoint.
//! * Only an endpoint's first address is used (the API says the addresses
//!   are fungible and consumers may use the first only).
//! * Conditions: `ready` unless `ready: false`; `serving` is `serving`, or
//!   `ready` when unset; `terminating` only when `terminating: true`.
//! * The slices of a Service are merged. One address and port in several
//!   slices (an endpoint moving between slices) counts once, with the best
//!   conditions seen (ready, then serving and terminating, then neither;
//!   among equals, the slice whose name sorts first).
//! * Everything below is done for each address family on its own (a
//!   dual-stack Service is two services, as kube-proxy runs one proxier per
//!   family); a frontend only gets backends of its own family.
//! * The *cluster set* is the ready endpoints; when there is none, the
//!   endpoints that are serving and terminating (KEP-1669: let connections
//!   drain to terminating pods rather than fail while a rollout replaces
//!   the last ready one). The *local set* is built with the same rule from
//!   the endpoints whose `nodeName` is this node.
//! * Topology aware routing: with `spec.trafficDistribution: PreferClose`
//!   (or its newer name `PreferSameZone`), or the annotation
//!   `service.kubernetes.io/topology-mode: Auto` (or the older
//!   `service.kubernetes.io/topology-aware-hints: Auto`), the cluster set is
//!   narrowed to the endpoints hinted for this node's zone, if every endpoint
//!   of the set has zone hints and at least one is hinted for this zone;
//!   otherwise (hints missing somewhere, no endpoint for this zone, the node
//!   has no zone) the set is kept whole. `PreferSameNode` first narrows by
//!   node hints in the same way, then falls back to zone hints. Local sets
//!   are never narrowed (they are as narrow as it gets).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use k8s_openapi::api::{
    core::v1::{Service, ServiceSpec},
    discovery::v1::{Endpoint as ApiEndpoint, EndpointSlice},
};

use super::{
    ANNOTATION_TOPOLOGY_AWARE_HINTS, ANNOTATION_TOPOLOGY_MODE, Endpoint, MAX_ENDPOINTS_PER_SLICE,
    NamespacedName, NodeInfo, Problem, ProblemKind, Protocol, ServicePortEndpoints,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Family {
    V4,
    V6,
}

impl Family {
    pub(super) fn of(ip: IpAddr) -> Family {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }

    pub(super) fn unspecified(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Family::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        }
    }
}

/// An endpoint of a slice, checked.
#[derive(Clone, Debug)]
struct SliceEndpoint {
    ip: IpAddr,
    local: bool,
    ready: bool,
    serving: bool,
    terminating: bool,
    /// Zone hints; None when there is none.
    zones: Option<Vec<String>>,
    /// Node hints; None when there is none.
    nodes: Option<Vec<String>>,
}

impl SliceEndpoint {
    /// Merge preference between copies of one address and port.
    fn rank(&self) -> u8 {
        if self.ready {
            2
        } else if self.serving && self.terminating {
            1
        } else {
            0
        }
    }
}

/// A slice of the Service, checked.
pub(super) struct CheckedSlice {
    /// (name, protocol, port) of each valid port; protocol as written,
    /// upper-case, TCP when unset.
    ports: Vec<(String, String, u16)>,
    endpoints: Vec<SliceEndpoint>,
}

/// How the cluster set is narrowed by topology.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Topology {
    None,
    Zone,
    NodeThenZone,
}

impl Topology {
    /// What the Service asks for.
    pub(super) fn of(svc: &Service, spec: &ServiceSpec) -> Topology {
        match spec.traffic_distribution.as_deref() {
            Some("PreferClose" | "PreferSameZone") => return Topology::Zone,
            Some("PreferSameNode") => return Topology::NodeThenZone,
            _ => {}
        }
        let annotations = svc.metadata.annotations.as_ref();
        let auto = |key| {
            annotations
                .and_then(|a| a.get(key))
                .is_some_and(|v: &String| v.eq_ignore_ascii_case("auto"))
        };
        if auto(ANNOTATION_TOPOLOGY_MODE) || auto(ANNOTATION_TOPOLOGY_AWARE_HINTS) {
            Topology::Zone
        } else {
            Topology::None
        }
    }
}

pub(super) fn valid_port(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p != 0)
}

/// Checks a slice once for all ports of its Service; None if it is
/// skipped whole. What is skipped is added to `problems`.
pub(super) fn check_slice(
    slice: &EndpointSlice,
    node: &NodeInfo,
    problems: &mut Vec<Problem>,
) -> Option<CheckedSlice> {
    let id = NamespacedName::of(&slice.metadata);
    let mut skip = |kind, reason| super::skipped(problems, kind, "EndpointSlice", &id, reason);
    let family = match slice.address_type.as_str() {
        "IPv4" => Family::V4,
        "IPv6" => Family::V6,
        "FQDN" => return None,
        other => {
            skip(
                ProblemKind::InvalidSlice,
                format!("addressType {other:?} is not IPv4, IPv6 or FQDN; skipped"),
            );
            return None;
        }
    };
    if slice.endpoints.len() > MAX_ENDPOINTS_PER_SLICE {
        skip(
            ProblemKind::SliceTooLarge,
            format!(
                "{} endpoints, more than the {MAX_ENDPOINTS_PER_SLICE} allowed; skipped",
                slice.endpoints.len()
            ),
        );
        return None;
    }
    let mut ports = Vec::new();
    for p in slice.ports.iter().flatten() {
        // A port without number means "all ports": nothing to translate
        // to, as for kube-proxy.
        let Some(number) = p.port else { continue };
        let pname = p.name.clone().unwrap_or_default();
        match valid_port(number) {
            Some(n) => ports.push((
                pname,
                p.protocol.clone().unwrap_or_else(|| "TCP".to_string()),
                n,
            )),
            None => skip(
                ProblemKind::InvalidPort,
                format!("port {pname:?}: {number} is not a port (1-65535); skipped"),
            ),
        }
    }
    let mut endpoints = Vec::new();
    for (i, ep) in slice.endpoints.iter().enumerate() {
        match check_endpoint(ep, family, node) {
            Ok(e) => endpoints.push(e),
            Err(reason) => skip(
                ProblemKind::InvalidEndpointAddress,
                format!("endpoint {i}: {reason}; skipped"),
            ),
        }
    }
    Some(CheckedSlice { ports, endpoints })
}

fn check_endpoint(
    ep: &ApiEndpoint,
    family: Family,
    node: &NodeInfo,
) -> Result<SliceEndpoint, String> {
    let first = ep.addresses.first().ok_or("no address")?;
    let ip: IpAddr = first
        .parse()
        .map_err(|_| format!("{first:?} is not an IP address"))?;
    if Family::of(ip) != family {
        return Err(format!("{ip} is not an address of the slice's family"));
    }
    let c = ep.conditions.as_ref();
    let ready = c.and_then(|c| c.ready) != Some(false);
    let serving = c.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = c.and_then(|c| c.terminating) == Some(true);
    let hints = ep.hints.as_ref();
    let zones = hints
        .and_then(|h| h.for_zones.as_ref())
        .filter(|z| !z.is_empty())
        .map(|z| z.iter().map(|z| z.name.clone()).collect());
    let nodes = hints
        .and_then(|h| h.for_nodes.as_ref())
        .filter(|n| !n.is_empty())
        .map(|n| n.iter().map(|n| n.name.clone()).collect());
    Ok(SliceEndpoint {
        ip,
        local: !node.name.is_empty() && ep.node_name.as_deref() == Some(&node.name),
        ready,
        serving,
        terminating,
        zones,
        nodes,
    })
}

/// The cluster and local sets of one service port.
pub(super) fn endpoint_sets(
    slices: &[CheckedSlice],
    port_name: &str,
    protocol: Protocol,
    node: &NodeInfo,
    topology: Topology,
) -> ServicePortEndpoints {
    let all = merge(slices, port_name, protocol);
    let mut out = ServicePortEndpoints {
        protocol,
        cluster: Vec::new(),
        local: Vec::new(),
    };
    for family in [Family::V4, Family::V6] {
        let of_family: Vec<(u16, &SliceEndpoint)> = all
            .iter()
            .filter(|(_, e)| Family::of(e.ip) == family)
            .copied()
            .collect();
        let cluster = choose(&of_family);
        let cluster = narrow_by_topology(cluster, node, topology);
        let local_eps: Vec<(u16, &SliceEndpoint)> =
            of_family.iter().filter(|(_, e)| e.local).copied().collect();
        let local = choose(&local_eps);
        out.cluster
            .extend(cluster.iter().map(|(p, e)| endpoint(*p, e)));
        out.local.extend(local.iter().map(|(p, e)| endpoint(*p, e)));
    }
    out.cluster.sort();
    out.local.sort();
    out
}

/// The slices' endpoints of one service port, merged: one entry per address
/// and port, the best copy; as (backend port, endpoint).
fn merge<'a>(
    slices: &'a [CheckedSlice],
    port_name: &str,
    protocol: Protocol,
) -> Vec<(u16, &'a SliceEndpoint)> {
    let mut merged: BTreeMap<(IpAddr, u16), &SliceEndpoint> = BTreeMap::new();
    for slice in slices {
        let Some((_, _, target)) = slice
            .ports
            .iter()
            .find(|(n, p, _)| n == port_name && p == protocol.as_str())
        else {
            continue;
        };
        for ep in &slice.endpoints {
            merged
                .entry((ep.ip, *target))
                .and_modify(|e| {
                    if ep.rank() > e.rank() {
                        *e = ep;
                    }
                })
                .or_insert(ep);
        }
    }
    merged.iter().map(|((_, p), e)| (*p, *e)).collect()
}

fn endpoint(port: u16, e: &SliceEndpoint) -> Endpoint {
    Endpoint {
        ip: e.ip,
        port,
        local: e.local,
        terminating: e.terminating,
    }
}

/// Ready endpoints, or if there is none the serving and terminating ones.
fn choose<'a>(eps: &[(u16, &'a SliceEndpoint)]) -> Vec<(u16, &'a SliceEndpoint)> {
    let ready: Vec<_> = eps.iter().filter(|(_, e)| e.ready).copied().collect();
    if !ready.is_empty() {
        return ready;
    }
    eps.iter()
        .filter(|(_, e)| e.serving && e.terminating)
        .copied()
        .collect()
}

fn narrow_by_topology<'a>(
    set: Vec<(u16, &'a SliceEndpoint)>,
    node: &NodeInfo,
    topology: Topology,
) -> Vec<(u16, &'a SliceEndpoint)> {
    // Keeps the endpoints whose hints name `want`, if every endpoint has
    // hints and one names it.
    fn by_hints<'a>(
        set: &[(u16, &'a SliceEndpoint)],
        hints: impl Fn(&SliceEndpoint) -> Option<&Vec<String>>,
        want: &str,
    ) -> Option<Vec<(u16, &'a SliceEndpoint)>> {
        if set.is_empty() || !set.iter().all(|(_, e)| hints(e).is_some()) {
            return None;
        }
        let kept: Vec<_> = set
            .iter()
            .filter(|(_, e)| hints(e).is_some_and(|h| h.iter().any(|z| z == want)))
            .copied()
            .collect();
        (!kept.is_empty()).then_some(kept)
    }
    if topology == Topology::NodeThenZone
        && !node.name.is_empty()
        && let Some(kept) = by_hints(&set, |e| e.nodes.as_ref(), &node.name)
    {
        return kept;
    }
    if topology != Topology::None
        && let Some(zone) = &node.zone
        && let Some(kept) = by_hints(&set, |e| e.zones.as_ref(), zone)
    {
        return kept;
    }
    set
}
