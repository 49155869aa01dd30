//! Filling in the cluster IPs and node ports that an API server would have
//! allocated (manifest mode).
//!
//! [`fill_in`] gives
//!
//! * a cluster IP to every Service that has none (`spec.clusterIP` and
//!   `spec.clusterIPs` unset or empty), unless it is headless (`None`) or of
//!   type ExternalName. The address comes from the service CIDR of each
//!   wanted family: `spec.ipFamilies` if set; otherwise every configured
//!   family when `spec.ipFamilyPolicy` asks for dual stack; otherwise the
//!   first configured CIDR. A Service that has one address and asks for
//!   dual stack gets the other family's (as the API server allocates a
//!   secondary family); `RequireDualStack` without a CIDR of each family
//!   gets nothing, with a failure (the API server refuses such a Service).
//!   `spec.ipFamilies` is then set to the families given, in order.
//! * a node port (from [`AllocConfig::node_ports`]) to every port of a
//!   NodePort or LoadBalancer Service that has none, unless a LoadBalancer
//!   sets `allocateLoadBalancerNodePorts: false`. Ports of one Service that
//!   have the same number and different protocols (DNS on 53/TCP and 53/UDP)
//!   get the same node port, as the API server gives them.
//! * a health check node port (from the same range) to every LoadBalancer
//!   Service with `externalTrafficPolicy: Local` that has none, as the API
//!   server does, so that the node serves its health check.
//!
//! Allocation is deterministic: it depends on the set of Services, never on
//! their order or the files they came from. Services are handled sorted by
//! namespace/name; a value's first candidate is a hash (FNV-1a) of
//! `namespace/name` (plus the port number for node ports), probed linearly
//! over the range until a free value is found. Values written explicitly in
//! any Service (cluster IPs, node ports, health check node ports) are taken
//! first, so an allocation never collides with them; the network address,
//! the first address (the `kubernetes` Service's) and, for IPv4, the
//! broadcast address of a CIDR are never given.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    ops::RangeInclusive,
};

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};

use crate::cidr::Cidr;

pub const DEFAULT_SERVICE_CIDR: &str = "10.96.0.0/12";
pub const DEFAULT_NODE_PORT_RANGE: RangeInclusive<u16> = 30000..=32767;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocConfig {
    /// At most one per address family; the first is the default family.
    pub service_cidrs: Vec<Cidr>,
    pub node_ports: RangeInclusive<u16>,
}

impl Default for AllocConfig {
    fn default() -> Self {
        AllocConfig {
            service_cidrs: vec![DEFAULT_SERVICE_CIDR.parse().expect("valid default CIDR")],
            node_ports: DEFAULT_NODE_PORT_RANGE,
        }
    }
}

impl AllocConfig {
    /// `--manifest-service-cidrs` (one per family, checked by preflight);
    /// empty: the default.
    pub fn with_service_cidrs(cidrs: &[Cidr]) -> AllocConfig {
        let mut config = AllocConfig::default();
        if !cidrs.is_empty() {
            config.service_cidrs = cidrs.to_vec();
        }
        config
    }
}

/// One value filled in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub namespace: String,
    pub name: String,
    pub value: Allocated,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Allocated {
    ClusterIp(IpAddr),
    NodePort {
        /// Index of the port in `spec.ports`.
        index: usize,
        port: i32,
        protocol: String,
        node_port: u16,
    },
    HealthCheckNodePort(u16),
}

/// What [`fill_in`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllocReport {
    pub allocated: Vec<Allocation>,
    /// Values that could not be allocated (range exhausted, family not
    /// configured); the Service is left without them.
    pub failures: Vec<String>,
}

/// Fills in missing cluster IPs and node ports (see the module
/// documentation) and logs each value given.
pub fn fill_in(services: &mut [Service], config: &AllocConfig) -> AllocReport {
    let mut report = AllocReport::default();
    let mut taken = Taken::explicit(services);
    for i in in_name_order(services) {
        let svc = &mut services[i];
        let owner = Owner {
            namespace: svc.metadata.namespace.clone().unwrap_or_default(),
            name: svc.metadata.name.clone().unwrap_or_default(),
        };
        let Some(spec) = svc.spec.as_mut() else {
            continue;
        };
        if needs_cluster_ip(spec) {
            give_cluster_ips(spec, config, &owner, &mut taken.ips, &mut report);
        }
        if needs_node_ports(spec) {
            give_node_ports(spec, config, &owner, &mut taken.ports, &mut report);
        }
        if needs_health_check_port(spec) {
            give_health_check_port(spec, config, &owner, &mut taken.ports, &mut report);
        }
    }
    report
}

/// Whether [`fill_in`] would give `svc` anything (if no Service needs a
/// value, it need not run).
pub fn needs_allocation(svc: &Service) -> bool {
    svc.spec.as_ref().is_some_and(|spec| {
        needs_cluster_ip(spec)
            || (needs_node_ports(spec)
                && spec
                    .ports
                    .iter()
                    .flatten()
                    .any(|p| p.node_port.unwrap_or(0) == 0))
    })
}

/// Values no allocation may give.
struct Taken {
    ips: BTreeSet<IpAddr>,
    ports: BTreeSet<u16>,
}

impl Taken {
    /// Everything written explicitly: taken before anything is given.
    fn explicit(services: &[Service]) -> Taken {
        let mut taken = Taken {
            ips: BTreeSet::new(),
            ports: BTreeSet::new(),
        };
        for spec in services.iter().filter_map(|s| s.spec.as_ref()) {
            for ip in explicit_cluster_ips(spec) {
                if let Ok(ip) = ip.parse::<IpAddr>() {
                    taken.ips.insert(ip);
                }
            }
            let node_ports = spec.ports.iter().flatten().filter_map(|p| p.node_port);
            for np in node_ports.chain(spec.health_check_node_port) {
                if let Ok(np) = u16::try_from(np) {
                    taken.ports.insert(np);
                }
            }
        }
        taken
    }
}

/// Indexes of `services` sorted by namespace and name.
fn in_name_order(services: &[Service]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..services.len()).collect();
    order.sort_by_key(|&i| {
        let m = &services[i].metadata;
        (
            m.namespace.clone().unwrap_or_default(),
            m.name.clone().unwrap_or_default(),
        )
    });
    order
}

/// The Service values are given to.
struct Owner {
    namespace: String,
    name: String,
}

impl Owner {
    /// `namespace/name`: the seed of its values' first candidates.
    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Logs and records a value given.
    fn give(&self, value: Allocated, report: &mut AllocReport) {
        let key = self.key();
        match &value {
            Allocated::ClusterIp(ip) => {
                tracing::info!(service = %key, cluster_ip = %ip, "allocated cluster IP")
            }
            Allocated::NodePort {
                port,
                protocol,
                node_port,
                ..
            } => tracing::info!(
                service = %key, port, protocol, node_port, "allocated node port"
            ),
            Allocated::HealthCheckNodePort(port) => {
                tracing::info!(service = %key, port, "allocated health check node port")
            }
        }
        report.allocated.push(Allocation {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            value,
        });
    }
}

fn fail(report: &mut AllocReport, msg: String) {
    tracing::warn!("{msg}");
    report.failures.push(msg);
}

/// A cluster IP from each wanted family's service CIDR.
fn give_cluster_ips(
    spec: &mut ServiceSpec,
    config: &AllocConfig,
    owner: &Owner,
    used_ips: &mut BTreeSet<IpAddr>,
    report: &mut AllocReport,
) {
    let key = owner.key();
    let mut ips: Vec<IpAddr> = explicit_cluster_ips(spec)
        .filter_map(|s| s.parse().ok())
        .take(1)
        .collect();
    let wanted = wanted_cidrs(spec, config, &key, &mut report.failures);
    if spec.ip_family_policy.as_deref() == Some("RequireDualStack")
        && !(wanted.iter().any(|c| c.is_ipv4()) && wanted.iter().any(|c| !c.is_ipv4()))
    {
        let msg = format!("{key}: RequireDualStack needs a service CIDR of each family");
        return fail(report, msg);
    }
    let missing = wanted
        .into_iter()
        .filter(|c| !ips.iter().any(|ip| ip.is_ipv4() == c.is_ipv4()));
    let had = ips.len();
    for cidr in missing.collect::<Vec<_>>() {
        match pick_ip(&cidr, fnv1a(key.as_bytes()), used_ips) {
            Some(ip) => {
                used_ips.insert(ip);
                ips.push(ip);
                owner.give(Allocated::ClusterIp(ip), report);
            }
            None => fail(report, format!("{key}: no free cluster IP in {cidr}")),
        }
    }
    if ips.len() > had
        && let Some(first) = ips.first()
    {
        spec.cluster_ip = Some(first.to_string());
        spec.cluster_ips = Some(ips.iter().map(IpAddr::to_string).collect());
        let family = |ip: &IpAddr| if ip.is_ipv4() { "IPv4" } else { "IPv6" }.to_string();
        spec.ip_families = Some(ips.iter().map(family).collect());
    }
}

/// A node port for every port that has none; ports with one number share
/// one node port.
fn give_node_ports(
    spec: &mut ServiceSpec,
    config: &AllocConfig,
    owner: &Owner,
    used_ports: &mut BTreeSet<u16>,
    report: &mut AllocReport,
) {
    let key = owner.key();
    // Node ports of this Service by port number, to share one between
    // protocols.
    let mut by_number: BTreeMap<i32, u16> = BTreeMap::new();
    for p in spec.ports.iter().flatten() {
        if let Some(np) = p.node_port.and_then(|n| u16::try_from(n).ok())
            && np != 0
        {
            by_number.entry(p.port).or_insert(np);
        }
    }
    for (index, p) in spec.ports.iter_mut().flatten().enumerate() {
        if p.node_port.is_some_and(|n| n != 0) {
            continue;
        }
        let Some(np) = node_port_for(p, &key, &by_number, config, used_ports) else {
            let msg = format!(
                "{key}: no free node port in {}-{} for port {}",
                config.node_ports.start(),
                config.node_ports.end(),
                p.port
            );
            fail(report, msg);
            continue;
        };
        used_ports.insert(np);
        by_number.insert(p.port, np);
        p.node_port = Some(np.into());
        let value = Allocated::NodePort {
            index,
            port: p.port,
            protocol: p.protocol.clone().unwrap_or_else(|| "TCP".to_string()),
            node_port: np,
        };
        owner.give(value, report);
    }
}

/// The node port of another protocol on the same number, or a free one.
fn node_port_for(
    p: &ServicePort,
    key: &str,
    by_number: &BTreeMap<i32, u16>,
    config: &AllocConfig,
    used_ports: &BTreeSet<u16>,
) -> Option<u16> {
    match by_number.get(&p.port) {
        Some(np) => Some(*np),
        None => {
            let seed = fnv1a(format!("{key}/{}", p.port).as_bytes());
            pick_port(&config.node_ports, seed, used_ports)
        }
    }
}

fn explicit_cluster_ips(spec: &ServiceSpec) -> impl Iterator<Item = &str> {
    spec.cluster_ip
        .as_deref()
        .into_iter()
        .chain(spec.cluster_ips.iter().flatten().map(String::as_str))
}

fn needs_cluster_ip(spec: &ServiceSpec) -> bool {
    spec.type_.as_deref() != Some("ExternalName")
        && (explicit_cluster_ips(spec).all(str::is_empty) || needs_second_family(spec))
}

/// One cluster IP written, and dual stack asked for.
fn needs_second_family(spec: &ServiceSpec) -> bool {
    let written: BTreeSet<&str> = explicit_cluster_ips(spec)
        .filter(|s| !s.is_empty())
        .collect();
    let dual = matches!(
        spec.ip_family_policy.as_deref(),
        Some("PreferDualStack" | "RequireDualStack")
    ) || spec.ip_families.as_ref().is_some_and(|f| f.len() > 1);
    dual && written.len() == 1 && !written.contains("None")
}

/// A free port for the Service's health check.
fn give_health_check_port(
    spec: &mut ServiceSpec,
    config: &AllocConfig,
    owner: &Owner,
    used_ports: &mut BTreeSet<u16>,
    report: &mut AllocReport,
) {
    let key = owner.key();
    let seed = fnv1a(format!("{key}/health").as_bytes());
    match pick_port(&config.node_ports, seed, used_ports) {
        Some(port) => {
            used_ports.insert(port);
            spec.health_check_node_port = Some(port.into());
            owner.give(Allocated::HealthCheckNodePort(port), report);
        }
        None => fail(report, format!("{key}: no free health check node port")),
    }
}

fn needs_health_check_port(spec: &ServiceSpec) -> bool {
    spec.type_.as_deref() == Some("LoadBalancer")
        && spec.external_traffic_policy.as_deref() == Some("Local")
        && spec.health_check_node_port.is_none_or(|p| p == 0)
}

fn needs_node_ports(spec: &ServiceSpec) -> bool {
    match spec.type_.as_deref() {
        Some("NodePort") => true,
        Some("LoadBalancer") => spec.allocate_load_balancer_node_ports != Some(false),
        _ => false,
    }
}

fn wanted_cidrs(
    spec: &ServiceSpec,
    config: &AllocConfig,
    key: &str,
    failures: &mut Vec<String>,
) -> Vec<Cidr> {
    let of_family = |v4: bool| config.service_cidrs.iter().find(|c| c.is_ipv4() == v4);
    let mut out = Vec::new();
    if let Some(families) = spec.ip_families.as_ref().filter(|f| !f.is_empty()) {
        for fam in families {
            let cidr = match fam.as_str() {
                "IPv4" => of_family(true),
                "IPv6" => of_family(false),
                _ => None,
            };
            match cidr {
                Some(c) => out.push(*c),
                None => {
                    let msg = format!("{key}: no service CIDR for ipFamily {fam:?}");
                    tracing::warn!("{msg}");
                    failures.push(msg);
                }
            }
        }
    } else if matches!(
        spec.ip_family_policy.as_deref(),
        Some("PreferDualStack" | "RequireDualStack")
    ) {
        for v4 in [true, false] {
            if let Some(c) = of_family(v4) {
                out.push(*c);
            }
        }
        // The configured order decides the primary family.
        if config.service_cidrs.first().is_some_and(|c| !c.is_ipv4()) {
            out.reverse();
        }
    } else if let Some(c) = config.service_cidrs.first() {
        out.push(*c);
    }
    out
}

/// Offsets of a service CIDR that may be given: `[first, last]`, or None if
/// the CIDR is too small.
fn usable(cidr: &Cidr) -> Option<(u128, u128)> {
    let hb = cidr.host_bits();
    let last_offset = if hb >= 128 {
        u128::MAX
    } else {
        (1u128 << hb) - 1
    };
    // Offset 0 is the network address, 1 the `kubernetes` Service; an IPv4
    // CIDR's last address is its broadcast address.
    let last = if cidr.is_ipv4() {
        last_offset.checked_sub(1)?
    } else {
        last_offset
    };
    (last >= 2).then_some((2, last))
}

fn pick_ip(cidr: &Cidr, seed: u64, used: &BTreeSet<IpAddr>) -> Option<IpAddr> {
    let (first, last) = usable(cidr)?;
    let count = last - first + 1;
    // At most `taken` candidates are taken, so `taken + 1` probes find a free
    // one if there is one.
    let taken = used.iter().filter(|ip| cidr.contains(**ip)).count() as u128;
    let start = seed as u128 % count;
    for step in 0..count.min(taken + 1) {
        let off = first + (start + step) % count;
        let ip = cidr.at(off);
        if !used.contains(&ip) {
            return Some(ip);
        }
    }
    None
}

fn pick_port(range: &RangeInclusive<u16>, seed: u64, used: &BTreeSet<u16>) -> Option<u16> {
    if range.is_empty() {
        return None;
    }
    let first = u32::from(*range.start());
    let count = u32::from(*range.end()) - first + 1;
    let start = (seed % u64::from(count)) as u32;
    (0..count)
        .map(|step| (first + (start + step) % count) as u16)
        .find(|p| !used.contains(p))
}

/// 64-bit FNV-1a: small, and stable across Rust releases (unlike std's
/// hasher).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::manifests::parse_str;

    fn services(yaml: &str) -> Vec<Service> {
        let o = parse_str(yaml, "test");
        assert_eq!(o.problems, vec![]);
        o.services
    }

    fn spec_of<'a>(svcs: &'a [Service], name: &str) -> &'a ServiceSpec {
        svcs.iter()
            .find(|s| s.metadata.name.as_deref() == Some(name))
            .unwrap()
            .spec
            .as_ref()
            .unwrap()
    }

    fn cluster_ip(svcs: &[Service], name: &str) -> Option<String> {
        spec_of(svcs, name).cluster_ip.clone()
    }

    fn node_ports(svcs: &[Service], name: &str) -> Vec<Option<i32>> {
        spec_of(svcs, name)
            .ports
            .iter()
            .flatten()
            .map(|p| p.node_port)
            .collect()
    }

    const MIXED: &str = r#"
{apiVersion: v1, kind: Service, metadata: {name: a}, spec: {ports: [{port: 80}]}}
---
{apiVersion: v1, kind: Service, metadata: {name: b, namespace: x}, spec: {type: NodePort, ports: [{name: http, port: 80}, {name: https, port: 443, nodePort: 30443}]}}
---
{apiVersion: v1, kind: Service, metadata: {name: fixed}, spec: {clusterIP: 10.96.0.10, ports: [{port: 53}]}}
---
{apiVersion: v1, kind: Service, metadata: {name: headless}, spec: {clusterIP: None, ports: [{port: 80}]}}
---
{apiVersion: v1, kind: Service, metadata: {name: ext}, spec: {type: ExternalName, externalName: example.com}}
---
{apiVersion: v1, kind: Service, metadata: {name: lb}, spec: {type: LoadBalancer, ports: [{port: 80}]}}
---
{apiVersion: v1, kind: Service, metadata: {name: lb-no-np}, spec: {type: LoadBalancer, allocateLoadBalancerNodePorts: false, ports: [{port: 80}]}}
---
{apiVersion: v1, kind: Service, metadata: {name: dns}, spec: {type: NodePort, ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}]}}
"#;

    #[test]
    fn fills_in_what_is_missing_and_nothing_else() {
        let mut svcs = services(MIXED);
        let cidr: Cidr = DEFAULT_SERVICE_CIDR.parse().unwrap();
        let report = fill_in(&mut svcs, &AllocConfig::default());
        assert_eq!(report.failures, Vec::<String>::new());
        for name in ["a", "b", "lb", "lb-no-np", "dns"] {
            let ip: IpAddr = cluster_ip(&svcs, name).unwrap().parse().unwrap();
            assert!(cidr.contains(ip), "{name}: {ip}");
            assert_ne!(ip, "10.96.0.1".parse::<IpAddr>().unwrap());
            assert_ne!(ip, "10.96.0.10".parse::<IpAddr>().unwrap());
            assert_eq!(
                spec_of(&svcs, name).cluster_ips.as_deref(),
                Some(&[ip.to_string()][..])
            );
        }
        assert_eq!(cluster_ip(&svcs, "fixed").as_deref(), Some("10.96.0.10"));
        assert_eq!(cluster_ip(&svcs, "headless").as_deref(), Some("None"));
        assert_eq!(cluster_ip(&svcs, "ext"), None);
        assert_eq!(node_ports(&svcs, "a"), [None]);
        assert_eq!(node_ports(&svcs, "fixed"), [None]);
        assert_eq!(node_ports(&svcs, "lb-no-np"), [None]);
        let b = node_ports(&svcs, "b");
        assert_eq!(b[1], Some(30443));
        assert!((30000..=32767).contains(&b[0].unwrap()) && b[0] != Some(30443));
        let lb = node_ports(&svcs, "lb");
        assert!(lb[0].is_some());
        let dns = node_ports(&svcs, "dns");
        assert!(dns[0].is_some());
        assert_eq!(dns[0], dns[1], "one node port for 53/UDP and 53/TCP");
        // 5 cluster IPs, b:http, lb, dns (once for both protocols... logged
        // twice, one per port).
        assert_eq!(report.allocated.len(), 5 + 1 + 1 + 2);
        // All distinct.
        let all_ips: BTreeSet<_> = ["a", "b", "lb", "lb-no-np", "dns", "fixed"]
            .iter()
            .map(|n| cluster_ip(&svcs, n))
            .collect();
        assert_eq!(all_ips.len(), 6);
    }

    #[test]
    fn a_local_load_balancer_gets_a_health_check_port() {
        let mut svcs = services(
            "apiVersion: v1\nkind: Service\nmetadata: {name: lb, namespace: ns}\n\
             spec: {type: LoadBalancer, externalTrafficPolicy: Local, ports: [{port: 80}]}\n\
             ---\napiVersion: v1\nkind: Service\nmetadata: {name: fixed, namespace: ns}\n\
             spec: {type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: 32000, \
             ports: [{port: 80}]}\n\
             ---\napiVersion: v1\nkind: Service\nmetadata: {name: cluster, namespace: ns}\n\
             spec: {type: LoadBalancer, ports: [{port: 80}]}\n",
        );
        let report = fill_in(&mut svcs, &AllocConfig::default());
        let hc = |n| spec_of(&svcs, n).health_check_node_port;
        let lb = hc("lb").expect("allocated");
        assert!((30000..=32767).contains(&lb) && lb != 32000);
        assert_ne!(
            Some(lb),
            node_ports(&svcs, "lb")[0],
            "distinct from the node port"
        );
        assert_eq!(hc("fixed"), Some(32000));
        assert_eq!(hc("cluster"), None, "ETP Cluster has none");
        assert_eq!(
            report
                .allocated
                .iter()
                .filter(|a| matches!(a.value, Allocated::HealthCheckNodePort(_)))
                .count(),
            1
        );
    }

    #[test]
    fn independent_of_order() {
        let mut one = services(MIXED);
        let mut two = one.clone();
        two.reverse();
        fill_in(&mut one, &AllocConfig::default());
        fill_in(&mut two, &AllocConfig::default());
        two.reverse();
        assert_eq!(one, two);
    }

    #[test]
    fn never_collides_with_explicit_values() {
        // Hash the service to find its first choice, then pin another
        // service (read later) to that very address and port.
        let mut probe = services(
            "{apiVersion: v1, kind: Service, metadata: {name: a}, spec: {type: NodePort, ports: [{port: 80}]}}",
        );
        fill_in(&mut probe, &AllocConfig::default());
        let first_ip = cluster_ip(&probe, "a").unwrap();
        let first_port = node_ports(&probe, "a")[0].unwrap();
        let mut svcs = services(&format!(
            "{{apiVersion: v1, kind: Service, metadata: {{name: a}}, spec: {{type: NodePort, ports: [{{port: 80}}]}}}}
---
{{apiVersion: v1, kind: Service, metadata: {{name: z}}, spec: {{clusterIP: {first_ip}, type: NodePort, ports: [{{port: 81, nodePort: {first_port}}}]}}}}"
        ));
        fill_in(&mut svcs, &AllocConfig::default());
        let ip = cluster_ip(&svcs, "a").unwrap();
        assert_ne!(ip, first_ip);
        assert_ne!(node_ports(&svcs, "a")[0], Some(first_port));
        // Linear probing: the next address.
        let first: std::net::Ipv4Addr = first_ip.parse().unwrap();
        assert_eq!(
            ip,
            std::net::Ipv4Addr::from(u32::from(first) + 1).to_string()
        );
    }

    #[test]
    fn small_cidr_skips_reserved_and_exhausts() {
        let config = AllocConfig {
            service_cidrs: vec!["10.0.0.0/30".parse().unwrap()],
            node_ports: 30000..=30001,
        };
        // /30: .0 network, .1 kubernetes, .3 broadcast: only .2 is free.
        let mut svcs = services(
            "{apiVersion: v1, kind: Service, metadata: {name: a}, spec: {type: NodePort, ports: [{port: 1}, {port: 2}, {port: 3}]}}
---
{apiVersion: v1, kind: Service, metadata: {name: b}, spec: {}}",
        );
        let report = fill_in(&mut svcs, &config);
        assert_eq!(cluster_ip(&svcs, "a").as_deref(), Some("10.0.0.2"));
        assert_eq!(cluster_ip(&svcs, "b"), None);
        let mut ports = node_ports(&svcs, "a");
        ports.sort();
        assert_eq!(ports, [None, Some(30000), Some(30001)]);
        assert_eq!(report.failures.len(), 2, "{:?}", report.failures);
    }

    #[test]
    fn dual_stack() {
        let config = AllocConfig {
            service_cidrs: vec![
                "10.96.0.0/12".parse().unwrap(),
                "fd00:96::/112".parse().unwrap(),
            ],
            node_ports: DEFAULT_NODE_PORT_RANGE,
        };
        let mut svcs = services(
            "{apiVersion: v1, kind: Service, metadata: {name: single}, spec: {}}
---
{apiVersion: v1, kind: Service, metadata: {name: dual}, spec: {ipFamilyPolicy: PreferDualStack}}
---
{apiVersion: v1, kind: Service, metadata: {name: v6first}, spec: {ipFamilies: [IPv6, IPv4]}}",
        );
        fill_in(&mut svcs, &config);
        let fams = |name: &str| -> Vec<bool> {
            spec_of(&svcs, name)
                .cluster_ips
                .iter()
                .flatten()
                .map(|ip| ip.parse::<IpAddr>().unwrap().is_ipv4())
                .collect()
        };
        assert_eq!(fams("single"), [true]);
        assert_eq!(fams("dual"), [true, false]);
        assert_eq!(fams("v6first"), [false, true]);
        let v6: IpAddr = spec_of(&svcs, "v6first").cluster_ips.as_ref().unwrap()[0]
            .parse()
            .unwrap();
        assert!(config.service_cidrs[1].contains(v6));
    }

    #[test]
    fn ipv6_and_dual_stack_from_configured_cidrs() {
        let v6_only = AllocConfig::with_service_cidrs(&["fd00:96::/108".parse().unwrap()]);
        let dual = AllocConfig::with_service_cidrs(&[
            "10.96.0.0/12".parse().unwrap(),
            "fd00:96::/108".parse().unwrap(),
        ]);
        let text = "{apiVersion: v1, kind: Service, metadata: {name: plain}, spec: {}}
---
{apiVersion: v1, kind: Service, metadata: {name: second}, spec: {clusterIP: 10.96.0.10, ipFamilyPolicy: RequireDualStack}}
---
{apiVersion: v1, kind: Service, metadata: {name: required}, spec: {ipFamilyPolicy: RequireDualStack}}
---
{apiVersion: v1, kind: Service, metadata: {name: v6}, spec: {ipFamilies: [IPv6]}}";
        let families = |svcs: &[Service], name: &str| -> Vec<String> {
            spec_of(svcs, name).ip_families.clone().unwrap_or_default()
        };
        // IPv6 only: the default family is IPv6; dual stack cannot be had.
        let mut svcs = services(text);
        let report = fill_in(&mut svcs, &v6_only);
        let plain: IpAddr = cluster_ip(&svcs, "plain").unwrap().parse().unwrap();
        assert!(v6_only.service_cidrs[0].contains(plain));
        assert_eq!(families(&svcs, "plain"), ["IPv6"]);
        assert_eq!(families(&svcs, "v6"), ["IPv6"]);
        assert_eq!(cluster_ip(&svcs, "required"), None);
        assert_eq!(
            spec_of(&svcs, "second").cluster_ips,
            None,
            "left as written"
        );
        assert_eq!(report.failures.len(), 2, "{:?}", report.failures);
        // Dual stack: a written IPv4 address gets its IPv6 partner.
        let mut svcs = services(text);
        let report = fill_in(&mut svcs, &dual);
        assert!(report.failures.is_empty(), "{:?}", report.failures);
        let second = spec_of(&svcs, "second").cluster_ips.clone().unwrap();
        assert_eq!(second[0], "10.96.0.10");
        assert!(dual.service_cidrs[1].contains(second[1].parse().unwrap()));
        assert_eq!(families(&svcs, "second"), ["IPv4", "IPv6"]);
        assert_eq!(families(&svcs, "required"), ["IPv4", "IPv6"]);
        assert_eq!(families(&svcs, "plain"), ["IPv4"]);
        // Deterministic: the same again.
        let mut again = services(text);
        fill_in(&mut again, &dual);
        assert_eq!(svcs, again);
    }
}
