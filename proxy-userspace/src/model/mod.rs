//! The desired load-balancing state: a pure function from Services and
//! EndpointSlices (and the node the proxy runs on) to frontends and their
//! backends, with kube-proxy's semantics.
//!
//! # Objects
//!
//! * A Service is skipped when it carries the label
//!   `service.kubernetes.io/service-proxy-name` with a value other than
//!   [`Options::service_proxy_name`] (it belongs to another proxy), when it
//!   is of type ExternalName (a DNS name, nothing to balance), and when it is
//!   headless (`clusterIP: None`). None of these is a problem.
//! * An EndpointSlice belongs to the Service named by its label
//!   `kubernetes.io/service-name` in its own namespace, whatever wrote it (the
//!   EndpointSlice controller, or a user for a Service without selector).
//!   Slices labelled `service.kubernetes.io/headless` are ignored, and so are
//!   slices of `addressType: FQDN`.
//!
//! # Endpoints of a service port
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
//!
//! # Frontends
//!
//! For each service port (TCP or UDP; SCTP and others are reported and
//! skipped):
//!
//! * one [`FrontendKind::ClusterIp`] frontend per address of
//!   `spec.clusterIPs` (or `spec.clusterIP`);
//! * for types NodePort and LoadBalancer with a `nodePort`, one
//!   [`FrontendKind::NodePort`] frontend per family of the cluster IPs, on
//!   the unspecified address (`0.0.0.0` / `::`), as in `SVC_MAP`;
//! * one [`FrontendKind::ExternalIp`] frontend per `spec.externalIPs`;
//! * for type LoadBalancer, one [`FrontendKind::LoadBalancerIp`] frontend
//!   per `status.loadBalancer.ingress[].ip`, except those with
//!   `ipMode: Proxy` (the load balancer proxies, so traffic arrives for the
//!   node, not for that address: KEP-1860).
//!
//! External and load-balancer addresses of a family the Service has no
//! cluster IP of are reported and skipped, as kube-proxy's proxier of that
//! family does not know the Service.
//!
//! Which set a frontend balances to (the two policies are independent):
//!
//! * `internalTrafficPolicy: Local` applies to the ClusterIP frontends: they
//!   use the local set. Otherwise they use the cluster set.
//! * `externalTrafficPolicy: Local` applies to the NodePort, external IP and
//!   load-balancer IP frontends: they use the local set. It is only
//!   meaningful for a Service reachable from outside (type NodePort or
//!   LoadBalancer, or a ClusterIP Service with externalIPs) and ignored on
//!   any other. Otherwise they use the cluster set.
//!
//! A frontend whose set is empty is kept, with no backend: the datapath
//! rejects its connections rather than letting them leak elsewhere.
//!
//! # Invalid input
//!
//! Never a panic, never an effect on other Services: what is invalid is
//! skipped and listed in [`DesiredState::problems`] with the object and a
//! reason. Services are handled in namespace/name order, so when two of them
//! claim one frontend (address, port, protocol) the first keeps it and the
//! second is reported.

pub mod cache;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use k8s_openapi::api::{
    core::v1::{Node, Service, ServiceSpec},
    discovery::v1::{Endpoint, EndpointSlice},
};

pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
pub const ANNOTATION_TOPOLOGY_MODE: &str = "service.kubernetes.io/topology-mode";
pub const ANNOTATION_TOPOLOGY_AWARE_HINTS: &str = "service.kubernetes.io/topology-aware-hints";
/// The API server accepts no more endpoints in one slice.
pub const MAX_ENDPOINTS_PER_SLICE: usize = 1000;

/// The node the proxy runs on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// The node's `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
}

impl NodeInfo {
    pub fn from_node(node: &Node) -> NodeInfo {
        NodeInfo {
            name: node.metadata.name.clone().unwrap_or_default(),
            zone: node
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_ZONE))
                .filter(|z| !z.is_empty())
                .cloned(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// Services labelled `service.kubernetes.io/service-proxy-name` are
    /// handled only if the label has this value. Unlabelled Services are
    /// always handled.
    pub service_proxy_name: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => proxy_common::IPPROTO_TCP,
            Protocol::Udp => proxy_common::IPPROTO_UDP,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A port of a Service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    /// The port's name; empty for an unnamed port.
    pub port: String,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    ExternalIp,
    LoadBalancerIp,
}

impl FrontendKind {
    /// Reached from outside the cluster (`SVC_F_EXTERNAL`).
    pub fn is_external(self) -> bool {
        self != FrontendKind::ClusterIp
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FrontendKind::ClusterIp => "cluster-ip",
            FrontendKind::NodePort => "node-port",
            FrontendKind::ExternalIp => "external-ip",
            FrontendKind::LoadBalancerIp => "load-balancer-ip",
        }
    }
}

impl fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendKey {
    /// The frontend's address; `0.0.0.0` or `::` for a NodePort.
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}/{}", self.port, self.protocol),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}/{}", self.port, self.protocol),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub service: ServicePortName,
    pub kind: FrontendKind,
    /// Sorted by address and port, without duplicates, all of the
    /// frontend's address family.
    pub backends: Vec<Backend>,
    /// The backends are the local set, because of `internalTrafficPolicy:
    /// Local` (ClusterIP frontends) or `externalTrafficPolicy: Local` (the
    /// others).
    pub local_only: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub ip: IpAddr,
    pub port: u16,
    /// The endpoint's `nodeName` is this node.
    pub local: bool,
    /// The endpoint is terminating (it is in the set as a fallback: no
    /// endpoint of the set was ready).
    pub terminating: bool,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}", self.port)?,
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}", self.port)?,
        }
        if self.local {
            f.write_str(" local")?;
        }
        if self.terminating {
            f.write_str(" terminating")?;
        }
        Ok(())
    }
}

/// The two endpoint sets of a service port, both address families together
/// (each family's set is chosen on its own; see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortEndpoints {
    pub protocol: Protocol,
    /// Ready endpoints, or the serving terminating ones if none is ready;
    /// narrowed by topology hints when the Service asks for it.
    pub cluster: Vec<Backend>,
    /// The same rule applied to this node's endpoints; never narrowed by
    /// topology.
    pub local: Vec<Backend>,
}

/// What kind of thing went wrong; [`ProblemKind::label`] is a stable metric
/// label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProblemKind {
    /// Two objects of one kind with the same namespace and name.
    DuplicateObject,
    /// A Service without spec.
    MissingSpec,
    /// Neither headless nor with a cluster IP (nothing allocated one).
    MissingClusterIp,
    InvalidClusterIp,
    /// A port, node port or slice port outside 1-65535.
    InvalidPort,
    /// Two ports of one Service with the same name.
    DuplicatePortName,
    /// SCTP, or an unknown protocol.
    UnsupportedProtocol,
    /// An externalIP or load-balancer ingress IP that is not an address.
    InvalidExternalIp,
    /// An externalIP or load-balancer IP of a family the Service has no
    /// cluster IP of.
    WrongIpFamily,
    /// An endpoint without address, or whose address is not one of the
    /// slice's family.
    InvalidEndpointAddress,
    /// More than [`MAX_ENDPOINTS_PER_SLICE`] endpoints.
    SliceTooLarge,
    /// An unknown addressType.
    InvalidSlice,
    /// A frontend claimed by an earlier Service (or port).
    DuplicateFrontend,
}

impl ProblemKind {
    pub fn label(self) -> &'static str {
        match self {
            ProblemKind::DuplicateObject => "duplicate_object",
            ProblemKind::MissingSpec => "missing_spec",
            ProblemKind::MissingClusterIp => "missing_cluster_ip",
            ProblemKind::InvalidClusterIp => "invalid_cluster_ip",
            ProblemKind::InvalidPort => "invalid_port",
            ProblemKind::DuplicatePortName => "duplicate_port_name",
            ProblemKind::UnsupportedProtocol => "unsupported_protocol",
            ProblemKind::InvalidExternalIp => "invalid_external_ip",
            ProblemKind::WrongIpFamily => "wrong_ip_family",
            ProblemKind::InvalidEndpointAddress => "invalid_endpoint_address",
            ProblemKind::SliceTooLarge => "slice_too_large",
            ProblemKind::InvalidSlice => "invalid_slice",
            ProblemKind::DuplicateFrontend => "duplicate_frontend",
        }
    }
}

/// Something skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub kind: ProblemKind,
    /// `Service` or `EndpointSlice`.
    pub object_kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}/{}: {}",
            self.object_kind, self.namespace, self.name, self.reason
        )
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// Both families; the datapath programs IPv4 only for now.
    pub frontends: BTreeMap<FrontendKey, Frontend>,
    /// The endpoint sets of every service port that has frontends.
    pub endpoints: BTreeMap<ServicePortName, ServicePortEndpoints>,
    pub problems: Vec<Problem>,
}

/// Computes the desired state (see the module documentation). The same
/// computation as [`crate::model_cache::ModelCache`], which the daemon uses
/// to redo only what changed.
pub fn desired_state(
    services: &[Service],
    slices: &[EndpointSlice],
    node: &NodeInfo,
    opts: &Options,
) -> DesiredState {
    let mut cache = crate::model_cache::ModelCache::new(node.clone(), opts.clone());
    cache.replace(services, slices);
    cache.update();
    cache.state()
}

/// What one Service produces on its own, from its slices: its frontends
/// (without conflicts with other Services, which the caller resolves),
/// endpoint sets and problems.
pub fn service_state(
    svc: &Service,
    slices: &[&EndpointSlice],
    node: &NodeInfo,
    opts: &Options,
) -> DesiredState {
    let (ns, name) = obj_key(&svc.metadata);
    let mut b = Builder {
        node,
        state: DesiredState::default(),
    };
    b.service(svc, &ns, &name, slices, opts);
    b.state
}

/// A problem of an object as a whole (a duplicate, say).
pub fn object_problem(
    kind: ProblemKind,
    object_kind: &'static str,
    ns: &str,
    name: &str,
    reason: String,
) -> Problem {
    Problem {
        kind,
        object_kind,
        namespace: ns.to_string(),
        name: name.to_string(),
        reason,
    }
}

/// (namespace, name); an empty or missing namespace is "default".
pub fn obj_key(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> (String, String) {
    (
        meta.namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".to_string()),
        meta.name.clone().unwrap_or_default(),
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn of(ip: IpAddr) -> Family {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }

    fn unspecified(self) -> IpAddr {
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
struct CheckedSlice {
    /// (name, protocol, port) of each valid port; protocol as written,
    /// upper-case, TCP when unset.
    ports: Vec<(String, String, u16)>,
    endpoints: Vec<SliceEndpoint>,
}

/// How the cluster set is narrowed by topology.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    None,
    Zone,
    NodeThenZone,
}

struct Builder<'a> {
    node: &'a NodeInfo,
    state: DesiredState,
}

impl Builder<'_> {
    fn problem(
        &mut self,
        kind: ProblemKind,
        object_kind: &'static str,
        ns: &str,
        name: &str,
        reason: String,
    ) {
        let p = Problem {
            kind,
            object_kind,
            namespace: ns.to_string(),
            name: name.to_string(),
            reason,
        };
        tracing::debug!(kind = kind.label(), "{p}");
        self.state.problems.push(p);
    }

    fn service(
        &mut self,
        svc: &Service,
        ns: &str,
        name: &str,
        slices: &[&EndpointSlice],
        opts: &Options,
    ) {
        let svc_problem = |b: &mut Self, kind, reason: String| {
            b.problem(kind, "Service", ns, name, reason);
        };
        if let Some(proxy) = svc
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_SERVICE_PROXY_NAME))
            && opts.service_proxy_name.as_deref() != Some(proxy.as_str())
        {
            tracing::debug!(service = %format!("{ns}/{name}"), proxy, "Service of another proxy skipped");
            return;
        }
        let Some(spec) = &svc.spec else {
            svc_problem(self, ProblemKind::MissingSpec, "no spec".to_string());
            return;
        };
        let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
        if svc_type == "ExternalName" {
            return;
        }
        let Some(cluster_ips) = self.cluster_ips(spec, ns, name) else {
            return;
        };
        let families: Vec<Family> = cluster_ips.iter().map(|ip| Family::of(*ip)).collect();

        let external_ips = self.external_ips(svc, spec, &families, ns, name);
        let externally_accessible =
            matches!(svc_type, "NodePort" | "LoadBalancer") || !external_ips.is_empty();
        let itp_local = spec.internal_traffic_policy.as_deref() == Some("Local");
        // ETP is defined for externally accessible Services only; the API
        // server refuses it elsewhere, and it is ignored here if present.
        let etp_local =
            externally_accessible && spec.external_traffic_policy.as_deref() == Some("Local");
        let topology = topology_mode(svc, spec);

        let checked: Vec<CheckedSlice> =
            slices.iter().filter_map(|s| self.check_slice(s)).collect();

        let mut port_names = BTreeSet::new();
        for port in spec.ports.iter().flatten() {
            let port_name = port.name.clone().unwrap_or_default();
            let spn = ServicePortName {
                namespace: ns.to_string(),
                name: name.to_string(),
                port: port_name.clone(),
            };
            let what = if port_name.is_empty() {
                format!("port {}", port.port)
            } else {
                format!("port {port_name:?}")
            };
            if !port_names.insert(port_name.clone()) {
                svc_problem(
                    self,
                    ProblemKind::DuplicatePortName,
                    format!("{what}: a second port with this name; skipped"),
                );
                continue;
            }
            let protocol_str = port.protocol.as_deref().unwrap_or("TCP");
            let protocol = match protocol_str {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                other => {
                    svc_problem(
                        self,
                        ProblemKind::UnsupportedProtocol,
                        format!("{what}: protocol {other} is not supported; skipped"),
                    );
                    continue;
                }
            };
            let Some(number) = valid_port(port.port) else {
                svc_problem(
                    self,
                    ProblemKind::InvalidPort,
                    format!("{what}: {} is not a port (1-65535); skipped", port.port),
                );
                continue;
            };

            let eps = endpoint_sets(&checked, &port_name, protocol, self.node, topology);

            let add = |b: &mut Self, ip: IpAddr, port: u16, kind: FrontendKind| {
                let local_only = match kind {
                    FrontendKind::ClusterIp => itp_local,
                    _ => etp_local,
                };
                let set = if local_only { &eps.local } else { &eps.cluster };
                let key = FrontendKey { ip, port, protocol };
                let backends: Vec<Backend> = set
                    .iter()
                    .filter(|be| be.ip.is_ipv4() == ip.is_ipv4())
                    .copied()
                    .collect();
                if let Some(other) = b.state.frontends.get(&key) {
                    let reason = format!(
                        "{what}: {kind} frontend {key} is taken by {} ({}); skipped",
                        other.service, other.kind
                    );
                    b.problem(ProblemKind::DuplicateFrontend, "Service", ns, name, reason);
                    return;
                }
                b.state.frontends.insert(
                    key,
                    Frontend {
                        service: spn.clone(),
                        kind,
                        backends,
                        local_only,
                    },
                );
            };

            for ip in &cluster_ips {
                add(self, *ip, number, FrontendKind::ClusterIp);
            }
            if matches!(svc_type, "NodePort" | "LoadBalancer")
                && let Some(np) = port.node_port.filter(|n| *n != 0)
            {
                match valid_port(np) {
                    Some(np) => {
                        for fam in &families {
                            add(self, fam.unspecified(), np, FrontendKind::NodePort);
                        }
                    }
                    None => svc_problem(
                        self,
                        ProblemKind::InvalidPort,
                        format!("{what}: nodePort {np} is not a port (1-65535); no NodePort"),
                    ),
                }
            }
            for (ip, kind) in &external_ips {
                add(self, *ip, number, *kind);
            }
            self.state.endpoints.insert(spn.clone(), eps);
        }
    }

    /// The Service's cluster IPs; None if it has no frontend at all
    /// (headless, or invalid: then with a problem).
    fn cluster_ips(&mut self, spec: &ServiceSpec, ns: &str, name: &str) -> Option<Vec<IpAddr>> {
        let mut raw: Vec<&str> = spec
            .cluster_ips
            .iter()
            .flatten()
            .map(String::as_str)
            .filter(|s| !s.is_empty())
            .collect();
        let single = spec.cluster_ip.as_deref().filter(|s| !s.is_empty());
        if raw.is_empty() {
            raw.extend(single);
        }
        if raw.contains(&"None") || single == Some("None") {
            // Headless: DNS only.
            return None;
        }
        let mut fail = |kind, reason: String| {
            self.problem(kind, "Service", ns, name, reason);
            None
        };
        if raw.is_empty() {
            return fail(
                ProblemKind::MissingClusterIp,
                "no clusterIP (and not headless); skipped".to_string(),
            );
        }
        if let Some(single) = single
            && single != raw[0]
        {
            return fail(
                ProblemKind::InvalidClusterIp,
                format!(
                    "clusterIP {single} is not clusterIPs[0] {}; skipped",
                    raw[0]
                ),
            );
        }
        let mut ips = Vec::new();
        for s in &raw {
            match s.parse::<IpAddr>() {
                Ok(ip) => ips.push(ip),
                Err(_) => {
                    return fail(
                        ProblemKind::InvalidClusterIp,
                        format!("clusterIP {s:?} is not an IP address; skipped"),
                    );
                }
            }
        }
        let dual_ok = ips.len() == 1 || (ips.len() == 2 && ips[0].is_ipv4() != ips[1].is_ipv4());
        if !dual_ok {
            return fail(
                ProblemKind::InvalidClusterIp,
                format!("clusterIPs {raw:?}: at most one address per family; skipped"),
            );
        }
        Some(ips)
    }

    /// externalIPs and load-balancer IPs, checked.
    fn external_ips(
        &mut self,
        svc: &Service,
        spec: &ServiceSpec,
        families: &[Family],
        ns: &str,
        name: &str,
    ) -> Vec<(IpAddr, FrontendKind)> {
        let mut out = Vec::new();
        let mut candidates: Vec<(&str, FrontendKind)> = spec
            .external_ips
            .iter()
            .flatten()
            .map(|s| (s.as_str(), FrontendKind::ExternalIp))
            .collect();
        if spec.type_.as_deref() == Some("LoadBalancer") {
            for ingress in svc
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref())
                .into_iter()
                .flatten()
            {
                let Some(ip) = ingress.ip.as_deref().filter(|s| !s.is_empty()) else {
                    continue; // a hostname: nothing to program
                };
                if ingress.ip_mode.as_deref() == Some("Proxy") {
                    continue;
                }
                candidates.push((ip, FrontendKind::LoadBalancerIp));
            }
        }
        for (s, kind) in candidates {
            let what = match kind {
                FrontendKind::ExternalIp => "externalIP",
                _ => "load-balancer ingress IP",
            };
            let Ok(ip) = s.parse::<IpAddr>() else {
                self.problem(
                    ProblemKind::InvalidExternalIp,
                    "Service",
                    ns,
                    name,
                    format!("{what} {s:?} is not an IP address; skipped"),
                );
                continue;
            };
            if !families.contains(&Family::of(ip)) {
                self.problem(
                    ProblemKind::WrongIpFamily,
                    "Service",
                    ns,
                    name,
                    format!("{what} {ip}: the Service has no cluster IP of its family; skipped"),
                );
                continue;
            }
            out.push((ip, kind));
        }
        out
    }

    /// Checks a slice once for all ports of its Service; None if it is
    /// skipped whole.
    fn check_slice(&mut self, slice: &EndpointSlice) -> Option<CheckedSlice> {
        let (ns, name) = obj_key(&slice.metadata);
        let family = match slice.address_type.as_str() {
            "IPv4" => Family::V4,
            "IPv6" => Family::V6,
            "FQDN" => return None,
            other => {
                self.problem(
                    ProblemKind::InvalidSlice,
                    "EndpointSlice",
                    &ns,
                    &name,
                    format!("addressType {other:?} is not IPv4, IPv6 or FQDN; skipped"),
                );
                return None;
            }
        };
        if slice.endpoints.len() > MAX_ENDPOINTS_PER_SLICE {
            self.problem(
                ProblemKind::SliceTooLarge,
                "EndpointSlice",
                &ns,
                &name,
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
                None => self.problem(
                    ProblemKind::InvalidPort,
                    "EndpointSlice",
                    &ns,
                    &name,
                    format!("port {pname:?}: {number} is not a port (1-65535); skipped"),
                ),
            }
        }
        let mut endpoints = Vec::new();
        for (i, ep) in slice.endpoints.iter().enumerate() {
            match self.check_endpoint(ep, family) {
                Ok(e) => endpoints.push(e),
                Err(reason) => self.problem(
                    ProblemKind::InvalidEndpointAddress,
                    "EndpointSlice",
                    &ns,
                    &name,
                    format!("endpoint {i}: {reason}; skipped"),
                ),
            }
        }
        Some(CheckedSlice { ports, endpoints })
    }

    fn check_endpoint(&self, ep: &Endpoint, family: Family) -> Result<SliceEndpoint, String> {
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
            local: !self.node.name.is_empty() && ep.node_name.as_deref() == Some(&self.node.name),
            ready,
            serving,
            terminating,
            zones,
            nodes,
        })
    }
}

fn valid_port(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p != 0)
}

fn topology_mode(svc: &Service, spec: &ServiceSpec) -> Topology {
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

/// The cluster and local sets of one service port.
fn endpoint_sets(
    slices: &[CheckedSlice],
    port_name: &str,
    protocol: Protocol,
    node: &NodeInfo,
    topology: Topology,
) -> ServicePortEndpoints {
    // Merge the slices: one entry per address and port, the best copy.
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
    let all: Vec<(u16, &SliceEndpoint)> = merged.iter().map(|((_, p), e)| (*p, *e)).collect();

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
            .extend(cluster.iter().map(|(p, e)| backend(*p, e)));
        out.local.extend(local.iter().map(|(p, e)| backend(*p, e)));
    }
    out.cluster.sort();
    out.local.sort();
    out
}

fn backend(port: u16, e: &SliceEndpoint) -> Backend {
    Backend {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::parse_str;

    #[test]
    fn node_info_from_node() {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "eu-1a"}}
        }))
        .unwrap();
        assert_eq!(
            NodeInfo::from_node(&node),
            NodeInfo {
                name: "n1".into(),
                zone: Some("eu-1a".into())
            }
        );
        let bare: Node =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "n2"}})).unwrap();
        assert_eq!(NodeInfo::from_node(&bare).zone, None);
    }

    #[test]
    fn problems_name_the_object_and_the_reason() {
        let o = parse_str(
            "{apiVersion: v1, kind: Service, metadata: {name: a, namespace: shop}, \
             spec: {clusterIP: 10.96.0.1, ports: [{name: web, port: 80, protocol: SCTP}]}}\n\
             ---\n\
             {apiVersion: v1, kind: Service, metadata: {name: b, namespace: shop}, \
             spec: {clusterIP: 10.96.0.1, ports: [{port: 80}, {name: x, port: 80}]}}\n",
            "t",
        );
        let state = desired_state(
            &o.services,
            &o.slices,
            &NodeInfo::default(),
            &Options::default(),
        );
        let shown: Vec<String> = state.problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            shown,
            [
                "Service shop/a: port \"web\": protocol SCTP is not supported; skipped",
                "Service shop/b: port \"x\": cluster-ip frontend 10.96.0.1:80/TCP is taken by \
                 shop/b (cluster-ip); skipped",
            ]
        );
        assert_eq!(state.problems[0].kind.label(), "unsupported_protocol");
        let fe = &state.frontends[&FrontendKey {
            ip: "10.96.0.1".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
        }];
        assert_eq!(fe.service.to_string(), "shop/b");
        assert_eq!(state.endpoints[&fe.service].protocol, Protocol::Tcp);
    }
}
