//! One Service to its frontends.
//!
//! For each service port (TCP or UDP; SCTP and others are reported and
//! skipped):
//!
//! * one [`FrontendKind::ClusterIp`] frontend per address of
//!   `spec.clusterIPs` (or `spec.clusterIP`), at most one per family; when
//!   `spec.ipFamilies` is set, each address must be of the family at its
//!   index, and addresses it has no entry for are skipped (a dual-stack
//!   Service is two Services, one per family, as kube-proxy runs one
//!   proxier per family: each family's frontends only get endpoints of
//!   that family's EndpointSlices);
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
//! Which set a frontend balances to (the two policies are independent; the
//! sets are chosen in [`super::endpoints`]):
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
//! A LoadBalancer Service with `externalTrafficPolicy: Local` and a
//! `healthCheckNodePort` also gets a [`HealthCheck`] with its count of
//! local ready endpoints.

use std::{collections::BTreeSet, net::IpAddr};

use crate::cidr::Cidr;

use k8s_openapi::api::{
    core::v1::{Service, ServicePort, ServiceSpec},
    discovery::v1::EndpointSlice,
};

use super::{
    DEFAULT_AFFINITY_TIMEOUT, DesiredState, Endpoint, Frontend, FrontendKey, FrontendKind,
    HealthCheck, LABEL_SERVICE_PROXY_NAME, NamespacedName, NodeInfo, Options, ProblemKind,
    Protocol, ServicePortEndpoints, ServicePortName,
    endpoints::{self, CheckedSlice, Family, Names, Topology, valid_port},
};

/// What one Service produces on its own, from its slices: its frontends
/// (without conflicts with other Services, which the caller resolves),
/// endpoint sets and problems.
pub fn service_state(
    svc: &Service,
    slices: &[&EndpointSlice],
    node: &NodeInfo,
    opts: &Options,
) -> DesiredState {
    let mut names = Names::default();
    let checked: Vec<CheckedSlice> = slices
        .iter()
        .map(|s| CheckedSlice::new(s, &mut names))
        .collect();
    let checked: Vec<&CheckedSlice> = checked.iter().collect();
    service_state_checked(svc, &checked, node, opts)
}

/// [`service_state`] from slices checked beforehand (as the
/// [`ModelCache`](super::ModelCache) keeps them).
pub fn service_state_checked(
    svc: &Service,
    slices: &[&CheckedSlice],
    node: &NodeInfo,
    opts: &Options,
) -> DesiredState {
    let mut b = Builder {
        node,
        id: NamespacedName::of(&svc.metadata),
        state: DesiredState::default(),
    };
    b.service(svc, slices, opts);
    b.state
}

struct Builder<'a> {
    node: &'a NodeInfo,
    /// The Service being built.
    id: NamespacedName,
    state: DesiredState,
}

/// What every port of a Service shares.
struct ServiceFacts<'s> {
    svc_type: String,
    cluster_ips: Vec<IpAddr>,
    families: Vec<Family>,
    external_ips: Vec<(IpAddr, FrontendKind)>,
    itp_local: bool,
    etp_local: bool,
    topology: Topology,
    slices: &'s [&'s CheckedSlice],
    affinity_timeout: Option<u32>,
    source_ranges: Vec<Cidr>,
}

impl ServiceFacts<'_> {
    fn has_node_ports(&self) -> bool {
        matches!(self.svc_type.as_str(), "NodePort" | "LoadBalancer")
    }
}

/// One service port, checked, with its endpoint sets.
struct PortFrontends {
    spn: ServicePortName,
    /// How problems name the port.
    what: String,
    protocol: Protocol,
    eps: ServicePortEndpoints,
}

impl Builder<'_> {
    fn problem(&mut self, kind: ProblemKind, reason: String) {
        super::skipped(&mut self.state.problems, kind, "Service", &self.id, reason);
    }

    fn service(&mut self, svc: &Service, slices: &[&CheckedSlice], opts: &Options) {
        if let Some(proxy) = svc
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_SERVICE_PROXY_NAME))
            && opts.service_proxy_name.as_deref() != Some(proxy.as_str())
        {
            tracing::debug!(service = %self.id, proxy, "Service of another proxy skipped");
            return;
        }
        let Some(spec) = &svc.spec else {
            self.problem(ProblemKind::MissingSpec, "no spec".to_string());
            return;
        };
        let Some(facts) = self.facts(svc, spec, slices) else {
            return;
        };
        let mut port_names = BTreeSet::new();
        let mut local_ready = BTreeSet::new();
        for port in spec.ports.iter().flatten() {
            let Some(pf) = self.check_port(port, &mut port_names, &facts) else {
                continue;
            };
            self.port_frontends(port, &pf, &facts);
            local_ready.extend(pf.eps.local.iter().filter(|e| !e.terminating).map(|e| e.ip));
            self.state.endpoints.insert(pf.spn, pf.eps);
        }
        // A dual-stack pod has an address of each family: it counts once
        // (kube-proxy's health check of a family counts that family's).
        let per_family = |v4| local_ready.iter().filter(|ip| ip.is_ipv4() == v4).count();
        let local_endpoints = per_family(true).max(per_family(false));
        self.health_check(spec, &facts, local_endpoints);
    }

    /// kube-proxy serves a health check for a LoadBalancer Service with
    /// `externalTrafficPolicy: Local` that has a `healthCheckNodePort` (the
    /// API server allocates one to every such Service). An invalid port is
    /// reported; the Service's frontends are not affected.
    fn health_check(&mut self, spec: &ServiceSpec, facts: &ServiceFacts, local_endpoints: usize) {
        if facts.svc_type != "LoadBalancer" || !facts.etp_local {
            return;
        }
        let Some(raw) = spec.health_check_node_port.filter(|p| *p != 0) else {
            return;
        };
        match valid_port(raw) {
            Some(node_port) => {
                self.state.health_checks.insert(
                    self.id.clone(),
                    HealthCheck {
                        node_port,
                        local_endpoints,
                    },
                );
            }
            None => self.problem(
                ProblemKind::InvalidHealthCheckNodePort,
                format!("healthCheckNodePort {raw} is not a port (1-65535); no health check"),
            ),
        }
    }

    /// What the Service's ports share; None when it has no frontend at all
    /// (ExternalName, headless, or without a valid cluster IP).
    fn facts<'s>(
        &mut self,
        svc: &Service,
        spec: &ServiceSpec,
        slices: &'s [&'s CheckedSlice],
    ) -> Option<ServiceFacts<'s>> {
        let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
        if svc_type == "ExternalName" {
            return None;
        }
        let cluster_ips = self.cluster_ips(spec)?;
        let families: Vec<Family> = cluster_ips.iter().map(|ip| Family::of(*ip)).collect();
        let external_ips = self.external_ips(svc, spec, &families);
        let externally_accessible =
            matches!(svc_type, "NodePort" | "LoadBalancer") || !external_ips.is_empty();
        for slice in slices {
            self.state.problems.extend_from_slice(slice.problems());
        }
        let source_ranges = self.source_ranges(spec);
        Some(ServiceFacts {
            svc_type: svc_type.to_string(),
            cluster_ips,
            families,
            external_ips,
            itp_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
            // ETP is defined for externally accessible Services only; the
            // API server refuses it elsewhere, and it is ignored here if
            // present.
            etp_local: externally_accessible
                && spec.external_traffic_policy.as_deref() == Some("Local"),
            topology: Topology::of(svc, spec),
            slices,
            affinity_timeout: affinity_timeout(spec),
            source_ranges,
        })
    }

    /// A port's name, protocol and number checked, and its endpoint sets;
    /// None (with a problem) if the port is skipped.
    fn check_port(
        &mut self,
        port: &ServicePort,
        port_names: &mut BTreeSet<String>,
        facts: &ServiceFacts,
    ) -> Option<PortFrontends> {
        let port_name = port.name.clone().unwrap_or_default();
        let what = if port_name.is_empty() {
            format!("port {}", port.port)
        } else {
            format!("port {port_name:?}")
        };
        if !port_names.insert(port_name.clone()) {
            self.problem(
                ProblemKind::DuplicatePortName,
                format!("{what}: a second port with this name; skipped"),
            );
            return None;
        }
        let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            other => {
                self.problem(
                    ProblemKind::UnsupportedProtocol,
                    format!("{what}: protocol {other} is not supported; skipped"),
                );
                return None;
            }
        };
        if valid_port(port.port).is_none() {
            self.problem(
                ProblemKind::InvalidPort,
                format!("{what}: {} is not a port (1-65535); skipped", port.port),
            );
            return None;
        }
        let eps = endpoints::endpoint_sets(
            facts.slices,
            &port_name,
            protocol,
            self.node,
            facts.topology,
        );
        Some(PortFrontends {
            spn: ServicePortName {
                namespace: self.id.namespace.clone(),
                name: self.id.name.clone(),
                port: port_name,
            },
            what,
            protocol,
            eps,
        })
    }

    /// The frontends of one checked port: cluster IPs, node ports, external
    /// and load-balancer IPs.
    fn port_frontends(&mut self, port: &ServicePort, pf: &PortFrontends, facts: &ServiceFacts) {
        let number = valid_port(port.port).expect("checked by check_port");
        for ip in &facts.cluster_ips {
            self.add(pf, facts, *ip, number, FrontendKind::ClusterIp);
        }
        if facts.has_node_ports()
            && let Some(np) = port.node_port.filter(|n| *n != 0)
        {
            match valid_port(np) {
                Some(np) => {
                    for fam in &facts.families {
                        self.add(pf, facts, fam.unspecified(), np, FrontendKind::NodePort);
                    }
                }
                None => self.problem(
                    ProblemKind::InvalidPort,
                    format!(
                        "{}: nodePort {np} is not a port (1-65535); no NodePort",
                        pf.what
                    ),
                ),
            }
        }
        for (ip, kind) in &facts.external_ips {
            self.add(pf, facts, *ip, number, *kind);
        }
    }

    /// One frontend, unless an earlier port or Service of this one has it.
    fn add(
        &mut self,
        pf: &PortFrontends,
        facts: &ServiceFacts,
        ip: IpAddr,
        port: u16,
        kind: FrontendKind,
    ) {
        let is_cluster_ip = kind == FrontendKind::ClusterIp;
        let local_only = if is_cluster_ip {
            facts.itp_local
        } else {
            facts.etp_local
        };
        let key = FrontendKey {
            ip,
            port,
            protocol: pf.protocol,
        };
        let of_family = |set: &[Endpoint]| -> Vec<Endpoint> {
            set.iter()
                .filter(|be| be.ip.is_ipv4() == ip.is_ipv4())
                .copied()
                .collect()
        };
        let cluster = of_family(&pf.eps.cluster);
        let backends = if local_only {
            of_family(&pf.eps.local)
        } else {
            cluster.clone()
        };
        // kube-proxy drops (not rejects) when a Local policy finds no local
        // endpoint but the Service has some elsewhere.
        let drop_when_empty =
            local_only && is_cluster_ip && backends.is_empty() && !cluster.is_empty();
        let internal_backends = (local_only && !is_cluster_ip).then_some(cluster);
        let source_ranges = match kind {
            FrontendKind::LoadBalancerIp => facts
                .source_ranges
                .iter()
                .filter(|c| c.is_ipv4() == ip.is_ipv4())
                .copied()
                .collect(),
            _ => Vec::new(),
        };
        if let Some(other) = self.state.frontends.get(&key) {
            let reason = format!(
                "{}: {kind} frontend {key} is taken by {} ({}); skipped",
                pf.what, other.service, other.kind
            );
            self.problem(ProblemKind::DuplicateFrontend, reason);
            return;
        }
        self.state.frontends.insert(
            key,
            Frontend {
                service: pf.spn.clone(),
                kind,
                backends,
                local_only,
                internal_backends,
                drop_when_empty,
                affinity_timeout: facts.affinity_timeout,
                source_ranges,
            },
        );
    }

    /// The Service's cluster IPs; None if it has no frontend at all
    /// (headless, or invalid: then with a problem).
    fn cluster_ips(&mut self, spec: &ServiceSpec) -> Option<Vec<IpAddr>> {
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
            self.problem(kind, reason);
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
        self.by_ip_families(spec, ips)
    }

    /// The cluster IPs `spec.ipFamilies` names, when it is set: kube-proxy's
    /// proxier of a family takes the address at the index of its family in
    /// `ipFamilies`. An address of another family than its `ipFamilies`
    /// entry makes the Service invalid (the API server never writes one);
    /// addresses beyond the list are skipped, with a problem.
    /// `ipFamilyPolicy` says which families to allocate (manifest mode's
    /// [`crate::source::allocate`] reads it), not which to serve.
    fn by_ip_families(&mut self, spec: &ServiceSpec, mut ips: Vec<IpAddr>) -> Option<Vec<IpAddr>> {
        let Some(families) = spec.ip_families.as_ref().filter(|f| !f.is_empty()) else {
            return Some(ips);
        };
        for (i, (ip, family)) in ips.iter().zip(families).enumerate() {
            let named = match family.as_str() {
                "IPv4" => Some(Family::V4),
                "IPv6" => Some(Family::V6),
                _ => None,
            };
            if named != Some(Family::of(*ip)) {
                self.problem(
                    ProblemKind::InvalidClusterIp,
                    format!("clusterIPs[{i}] {ip} is not of ipFamilies[{i}] {family:?}; skipped"),
                );
                return None;
            }
        }
        if ips.len() > families.len() {
            for ip in ips.drain(families.len()..).collect::<Vec<_>>() {
                self.problem(
                    ProblemKind::InvalidClusterIp,
                    format!("clusterIP {ip}: ipFamilies {families:?} has no entry for it; skipped"),
                );
            }
        }
        Some(ips)
    }

    /// `loadBalancerSourceRanges` that parse; the others are reported (the
    /// valid ones still apply: a range left out only narrows who may
    /// connect).
    fn source_ranges(&mut self, spec: &ServiceSpec) -> Vec<Cidr> {
        let mut out = Vec::new();
        for raw in spec.load_balancer_source_ranges.iter().flatten() {
            match raw.trim().parse::<Cidr>() {
                Ok(c) => out.push(c),
                Err(e) => self.problem(
                    ProblemKind::InvalidSourceRange,
                    format!("loadBalancerSourceRanges: {e}; skipped"),
                ),
            }
        }
        out
    }

    /// externalIPs and load-balancer IPs, checked.
    fn external_ips(
        &mut self,
        svc: &Service,
        spec: &ServiceSpec,
        families: &[Family],
    ) -> Vec<(IpAddr, FrontendKind)> {
        let mut out = Vec::new();
        let mut candidates: Vec<(&str, FrontendKind)> = spec
            .external_ips
            .iter()
            .flatten()
            .map(|s| (s.as_str(), FrontendKind::ExternalIp))
            .collect();
        if spec.type_.as_deref() == Some("LoadBalancer") {
            candidates.extend(load_balancer_ips(svc).map(|ip| (ip, FrontendKind::LoadBalancerIp)));
        }
        for (s, kind) in candidates {
            let what = match kind {
                FrontendKind::ExternalIp => "externalIP",
                _ => "load-balancer ingress IP",
            };
            let Ok(ip) = s.parse::<IpAddr>() else {
                self.problem(
                    ProblemKind::InvalidExternalIp,
                    format!("{what} {s:?} is not an IP address; skipped"),
                );
                continue;
            };
            if !families.contains(&Family::of(ip)) {
                self.problem(
                    ProblemKind::WrongIpFamily,
                    format!("{what} {ip}: the Service has no cluster IP of its family; skipped"),
                );
                continue;
            }
            out.push((ip, kind));
        }
        out
    }
}

/// The load balancer's ingress addresses that traffic is sent to (not
/// hostnames, not `ipMode: Proxy`).
/// `sessionAffinity: ClientIP` and its timeout (kube-proxy's default when
/// unset; the API server keeps it within 1..=86400).
fn affinity_timeout(spec: &ServiceSpec) -> Option<u32> {
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return None;
    }
    let seconds = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds)
        .filter(|s| *s > 0)
        .map_or(DEFAULT_AFFINITY_TIMEOUT, |s| s as u32);
    Some(seconds)
}

fn load_balancer_ips(svc: &Service) -> impl Iterator<Item = &str> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter(|ingress| ingress.ip_mode.as_deref() != Some("Proxy"))
        // A hostname: nothing to program.
        .filter_map(|ingress| ingress.ip.as_deref().filter(|s| !s.is_empty()))
}
