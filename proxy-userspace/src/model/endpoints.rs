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
    collections::{BTreeMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
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

/// An endpoint of a slice, checked: about 80 bytes, where the API object
/// holds several hundred (node and hint names are shared).
#[derive(Clone, Debug, PartialEq, Eq)]
struct SliceEndpoint {
    ip: IpAddr,
    ready: bool,
    serving: bool,
    terminating: bool,
    /// The endpoint's `nodeName`.
    node: Option<Arc<str>>,
    /// Zone hints; None when there is none.
    zones: Option<Box<[Arc<str>]>>,
    /// Node hints; None when there is none.
    nodes: Option<Box<[Arc<str>]>>,
}

impl SliceEndpoint {
    fn is_local(&self, node: &NodeInfo) -> bool {
        !node.name.is_empty() && self.node.as_deref() == Some(node.name.as_str())
    }

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

/// What the model reads of an EndpointSlice, checked once when it arrives
/// (the model keeps this, not the object). It does not depend on the node:
/// whether an endpoint is local is decided when a Service is computed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckedSlice {
    /// (name, protocol, port) of each valid port; protocol as written,
    /// upper-case, TCP when unset.
    ports: Box<[SlicePort]>,
    endpoints: Box<[SliceEndpoint]>,
    /// What was skipped, reported with the Service the slice belongs to.
    problems: Box<[Problem]>,
    /// The `endpoints.kubernetes.io/last-change-trigger-time` annotation.
    last_change_trigger_time: Option<Box<str>>,
}

/// A slice port: (name, protocol, number).
type SlicePort = (Box<str>, Box<str>, u16);

/// Shares the strings many endpoints repeat (node names, zones).
#[derive(Default)]
pub struct Names(HashSet<Arc<str>>);

impl Names {
    fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.0.get(name) {
            return n.clone();
        }
        let n: Arc<str> = Arc::from(name);
        self.0.insert(n.clone());
        n
    }
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

impl CheckedSlice {
    /// Checks a slice once for all ports of its Service and every node.
    /// A slice skipped whole has no ports and no endpoints.
    pub fn new(slice: &EndpointSlice, names: &mut Names) -> CheckedSlice {
        let mut problems = Vec::new();
        let mut checked = check_slice(slice, names, &mut problems).unwrap_or_default();
        checked.problems = problems.into();
        checked.last_change_trigger_time = slice
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(super::ANNOTATION_LAST_CHANGE_TRIGGER_TIME))
            .map(|t| t.as_str().into());
        checked
    }

    /// What was skipped in the slice.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    /// The slice's `endpoints.kubernetes.io/last-change-trigger-time`.
    pub fn last_change_trigger_time(&self) -> Option<&str> {
        self.last_change_trigger_time.as_deref()
    }
}

fn check_slice(
    slice: &EndpointSlice,
    names: &mut Names,
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
        let pname = p.name.as_deref().unwrap_or_default();
        match valid_port(number) {
            Some(n) => ports.push((
                pname.into(),
                p.protocol.as_deref().unwrap_or("TCP").into(),
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
        match check_endpoint(ep, family, names) {
            Ok(e) => endpoints.push(e),
            Err(reason) => skip(
                ProblemKind::InvalidEndpointAddress,
                format!("endpoint {i}: {reason}; skipped"),
            ),
        }
    }
    Some(CheckedSlice {
        ports: ports.into(),
        endpoints: endpoints.into(),
        ..Default::default()
    })
}

fn check_endpoint(
    ep: &ApiEndpoint,
    family: Family,
    names: &mut Names,
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
        .map(|z| z.iter().map(|z| names.get(&z.name)).collect());
    let nodes = hints
        .and_then(|h| h.for_nodes.as_ref())
        .filter(|n| !n.is_empty())
        .map(|n| n.iter().map(|n| names.get(&n.name)).collect());
    Ok(SliceEndpoint {
        ip,
        node: ep.node_name.as_deref().map(|n| names.get(n)),
        ready,
        serving,
        terminating,
        zones,
        nodes,
    })
}

/// The cluster and local sets of one service port.
pub(super) fn endpoint_sets(
    slices: &[&CheckedSlice],
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
        let local_eps: Vec<(u16, &SliceEndpoint)> = of_family
            .iter()
            .filter(|(_, e)| e.is_local(node))
            .copied()
            .collect();
        let local = choose(&local_eps);
        out.cluster
            .extend(cluster.iter().map(|(p, e)| endpoint(*p, e, node)));
        out.local
            .extend(local.iter().map(|(p, e)| endpoint(*p, e, node)));
    }
    out.cluster.sort();
    out.local.sort();
    out
}

/// The slices' endpoints of one service port, merged: one entry per address
/// and port, the best copy; as (backend port, endpoint).
fn merge<'a>(
    slices: &[&'a CheckedSlice],
    port_name: &str,
    protocol: Protocol,
) -> Vec<(u16, &'a SliceEndpoint)> {
    let mut merged: BTreeMap<(IpAddr, u16), &SliceEndpoint> = BTreeMap::new();
    for slice in slices {
        let Some((_, _, target)) = slice
            .ports
            .iter()
            .find(|(n, p, _)| &**n == port_name && &**p == protocol.as_str())
        else {
            continue;
        };
        for ep in slice.endpoints.iter() {
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

fn endpoint(port: u16, e: &SliceEndpoint, node: &NodeInfo) -> Endpoint {
    Endpoint {
        ip: e.ip,
        port,
        local: e.is_local(node),
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
        hints: impl Fn(&SliceEndpoint) -> Option<&[Arc<str>]>,
        want: &str,
    ) -> Option<Vec<(u16, &'a SliceEndpoint)>> {
        if set.is_empty() || !set.iter().all(|(_, e)| hints(e).is_some()) {
            return None;
        }
        let kept: Vec<_> = set
            .iter()
            .filter(|(_, e)| hints(e).is_some_and(|h| h.iter().any(|z| &**z == want)))
            .copied()
            .collect();
        (!kept.is_empty()).then_some(kept)
    }
    if topology == Topology::NodeThenZone
        && !node.name.is_empty()
        && let Some(kept) = by_hints(&set, |e| e.nodes.as_deref(), &node.name)
    {
        return kept;
    }
    if topology != Topology::None
        && let Some(zone) = &node.zone
        && let Some(kept) = by_hints(&set, |e| e.zones.as_deref(), zone)
    {
        return kept;
    }
    set
}
