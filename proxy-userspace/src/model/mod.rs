//! The desired load-balancing state: a pure function from Services and
//! EndpointSlices (and the node the proxy runs on) to frontends and their
//! backends, with kube-proxy's semantics.
//!
//! * [`service`]: one Service to its frontends;
//! * [`endpoints`]: the endpoints of a service port (conditions, the
//!   terminating fallback, topology);
//! * [`cache`]: the [`ModelCache`], which keeps each Service's result and
//!   redoes only what changed; [`desired_state`] runs it once;
//! * [`service_cidrs`]: the service CIDRs in force (flags and ServiceCIDR
//!   objects).
//! * [`slim`]: what is kept of each object (the cache is the only copy the
//!   daemon holds, so it keeps only what the model reads).
//!
//! This module holds the types they share. Nothing here does I/O.
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
//! # Invalid input
//!
//! Never a panic, never an effect on other Services: what is invalid is
//! skipped and listed in [`DesiredState::problems`] with the object and a
//! reason. Services are handled in namespace/name order, so when two of them
//! claim one frontend (address, port, protocol) the first keeps it and the
//! second is reported.

pub mod cache;
pub mod endpoints;
pub mod service;
pub mod service_cidrs;
pub mod slim;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

use crate::cidr::Cidr;

use k8s_openapi::{api::core::v1::Node, apimachinery::pkg::apis::meta::v1::ObjectMeta};

pub use cache::{
    ModelCache, ObjectChanges, PreparedSlice, ServiceInput, SliceInput, desired_state,
};
pub use endpoints::{CheckedSlice, Names};
pub use service::{service_state, service_state_checked};

pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
pub const ANNOTATION_TOPOLOGY_MODE: &str = "service.kubernetes.io/topology-mode";
pub const ANNOTATION_TOPOLOGY_AWARE_HINTS: &str = "service.kubernetes.io/topology-aware-hints";
/// Kept on EndpointSlices: when the change they record was triggered.
pub const ANNOTATION_LAST_CHANGE_TRIGGER_TIME: &str =
    "endpoints.kubernetes.io/last-change-trigger-time";
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
    pub backends: Vec<Endpoint>,
    /// The backends are the local set, because of `internalTrafficPolicy:
    /// Local` (ClusterIP frontends) or `externalTrafficPolicy: Local` (the
    /// others).
    pub local_only: bool,
    /// `externalTrafficPolicy: Local` on an external frontend: the cluster
    /// set, which pods and processes of the node use (no external load
    /// balancer is involved for them, as kube-proxy's short-circuit).
    /// `backends` is the local set, for everyone else.
    pub internal_backends: Option<Vec<Endpoint>>,
    /// `internalTrafficPolicy: Local` with no local endpoint but endpoints
    /// on other nodes: connections are dropped rather than rejected, as
    /// kube-proxy does.
    pub drop_when_empty: bool,
    /// `sessionAffinity: ClientIP`: seconds a client keeps its backend
    /// without a new connection (`timeoutSeconds`, default 10800).
    pub affinity_timeout: Option<u32>,
    /// `loadBalancerSourceRanges`, on load-balancer IP frontends only (of
    /// the frontend's family): other sources are dropped.
    pub source_ranges: Vec<Cidr>,
}

impl Frontend {
    /// Whether one of the frontend's backends, for any client, has one of
    /// `addrs` (the node's own addresses: a hostNetwork backend here).
    pub fn has_backend_among(&self, addrs: &BTreeSet<IpAddr>) -> bool {
        self.backends
            .iter()
            .chain(self.internal_backends.iter().flatten())
            .any(|b| addrs.contains(&b.ip))
    }
}

/// kube-proxy's default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

/// An endpoint a frontend balances to, as the model sees it (kube-proxy's
/// `Endpoint`); the syncer turns it into a `proxy_common::Backend` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    /// The endpoint's `nodeName` is this node.
    pub local: bool,
    /// The endpoint is terminating (it is in the set as a fallback: no
    /// endpoint of the set was ready).
    pub terminating: bool,
}

impl fmt::Display for Endpoint {
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
    pub cluster: Vec<Endpoint>,
    /// The same rule applied to this node's endpoints; never narrowed by
    /// topology.
    pub local: Vec<Endpoint>,
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
    /// A healthCheckNodePort outside 1-65535.
    InvalidHealthCheckNodePort,
    /// A healthCheckNodePort an earlier Service has.
    DuplicateHealthCheckNodePort,
    /// A ServiceCIDR's `spec.cidrs` entry that is not a CIDR.
    InvalidServiceCidr,
    /// A loadBalancerSourceRanges entry that is not a CIDR.
    InvalidSourceRange,
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
            ProblemKind::InvalidHealthCheckNodePort => "invalid_health_check_node_port",
            ProblemKind::DuplicateHealthCheckNodePort => "duplicate_health_check_node_port",
            ProblemKind::InvalidServiceCidr => "invalid_service_cidr",
            ProblemKind::InvalidSourceRange => "invalid_source_range",
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
        // Cluster-scoped objects (ServiceCIDRs) have no namespace.
        match self.namespace.as_str() {
            "" => write!(f, "{} {}: {}", self.object_kind, self.name, self.reason),
            ns => write!(
                f,
                "{} {ns}/{}: {}",
                self.object_kind, self.name, self.reason
            ),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// Both families.
    pub frontends: BTreeMap<FrontendKey, Frontend>,
    /// The endpoint sets of every service port that has frontends.
    pub endpoints: BTreeMap<ServicePortName, ServicePortEndpoints>,
    /// The health checks this node serves, by Service.
    pub health_checks: BTreeMap<NamespacedName, HealthCheck>,
    pub problems: Vec<Problem>,
}

/// A Service's `healthCheckNodePort`, which every node serves over HTTP
/// for the load balancer (kube-proxy's service health server). Only
/// Services of type LoadBalancer with `externalTrafficPolicy: Local` have
/// one, as in kube-proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub node_port: u16,
    /// This node's ready endpoints of the Service, counted by address over
    /// all its ports (kube-proxy's `LocalReadyEndpoints`: an endpoint
    /// serving ports 80 and 443 counts once; terminating ones never count,
    /// so a node with only terminating endpoints fails the check). A
    /// dual-stack Service counts each family's and reports the larger, so
    /// a dual-stack pod counts once.
    pub local_endpoints: usize,
}

/// An object's namespace and name; an empty or missing namespace is
/// `default`, as the API server defaults it. Ordered by namespace, then
/// name.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamespacedName {
    pub namespace: String,
    pub name: String,
}

impl NamespacedName {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> NamespacedName {
        NamespacedName {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    pub fn of(meta: &ObjectMeta) -> NamespacedName {
        NamespacedName {
            namespace: meta
                .namespace
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "default".to_string()),
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

impl fmt::Display for NamespacedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl Problem {
    /// A problem of the object `id` (a `Service` or an `EndpointSlice`).
    pub fn new(
        kind: ProblemKind,
        object_kind: &'static str,
        id: &NamespacedName,
        reason: String,
    ) -> Problem {
        Problem {
            kind,
            object_kind,
            namespace: id.namespace.clone(),
            name: id.name.clone(),
            reason,
        }
    }
}

/// Records something skipped (and logs it at debug level: the daemon logs
/// the problems it has not shown yet after each sync).
fn skipped(
    problems: &mut Vec<Problem>,
    kind: ProblemKind,
    object_kind: &'static str,
    id: &NamespacedName,
    reason: String,
) {
    let p = Problem::new(kind, object_kind, id, reason);
    tracing::debug!(kind = kind.label(), "{p}");
    problems.push(p);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::manifests::parse_str;

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
    fn backends_among_addresses_count_for_every_client() {
        let ep = |ip: &str| Endpoint {
            ip: ip.parse().unwrap(),
            port: 6443,
            local: true,
            terminating: false,
        };
        let node: BTreeSet<IpAddr> = ["192.168.200.11".parse().unwrap()].into();
        let mut fe = Frontend {
            service: ServicePortName {
                namespace: "default".into(),
                name: "kubernetes".into(),
                port: String::new(),
            },
            kind: FrontendKind::NodePort,
            backends: vec![ep("10.244.1.5")],
            local_only: true,
            internal_backends: None,
            drop_when_empty: false,
            affinity_timeout: None,
            source_ranges: Vec::new(),
        };
        assert!(!fe.has_backend_among(&node));
        // externalTrafficPolicy Local: the node's clients use the cluster set.
        fe.internal_backends = Some(vec![ep("10.244.1.5"), ep("192.168.200.11")]);
        assert!(fe.has_backend_among(&node));
        fe.internal_backends = None;
        fe.backends.push(ep("192.168.200.11"));
        assert!(fe.has_backend_among(&node));
        assert!(!fe.has_backend_among(&BTreeSet::new()));
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
