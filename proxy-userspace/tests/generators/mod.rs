//! Random Services and EndpointSlices for the property tests and the
//! parser fuzz targets: valid ones and every kind of wrong one an API server
//! or a hand-written manifest can hand us (bad IPs, ports out of range,
//! unknown protocols and types, missing names and specs, dual-stack, FQDN
//! and IPv6 slices, slices past the API server's 1,000 endpoints).
//!
//! Names, addresses and ports come from small pools so that random objects
//! collide: two Services on one ClusterIP, a slice moving between Services,
//! one backend shared by many frontends.

#![allow(dead_code)] // Each test crate uses its own part of this module.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        core::v1::{
            LoadBalancerIngress, LoadBalancerStatus, Service, ServicePort, ServiceSpec,
            ServiceStatus,
        },
        discovery::v1::{
            Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice, ForZone,
        },
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use proptest::{collection::vec, option, prelude::*, sample::select};

pub const NAMESPACES: &[&str] = &["default", "ns", ""];
pub const SERVICE_NAMES: &[&str] = &["a", "b", "c", "d", ""];
pub const SLICE_NAMES: &[&str] = &["a-1", "a-2", "b-1", "c-1", "x", ""];
pub const NODES: &[&str] = &["node-a", "node-b", ""];
pub const ZONES: &[&str] = &["zone-a", "zone-b"];
/// ClusterIPs and external addresses: valid and colliding, then wrong.
pub const SERVICE_IPS: &[&str] = &[
    "10.96.0.1",
    "10.96.0.2",
    "10.96.0.3",
    "10.96.0.4",
    "10.96.0.5",
    "10.96.1.1",
    "fd00::10",
    "fd00::11",
    "2001:db8::9",
];
pub const BAD_SERVICE_IPS: &[&str] = &[
    "192.168.200.11",
    "0.0.0.0",
    "255.255.255.255",
    "127.0.0.1",
    "::",
    "None",
    "",
    "10.96.0.300",
    "10.96.0",
    "not-an-ip",
    " 10.96.0.1",
];
pub const ENDPOINT_IPS: &[&str] = &[
    "10.244.0.1",
    "10.244.0.2",
    "10.244.0.3",
    "10.244.1.9",
    "fd00:244::1",
    "fd00:244::2",
];
pub const BAD_ENDPOINT_IPS: &[&str] = &["192.168.200.11", "fd00::5", "junk", "10.244.0.256", ""];
pub const PORT_NAMES: &[&str] = &["", "http", "dns"];
pub const PORTS: &[i32] = &[80, 53, 8080];
pub const BAD_PORTS: &[i32] = &[0, -1, 65535, 65536, i32::MIN, i32::MAX];
pub const NODE_PORTS: &[i32] = &[30080, 30081, 32767];
pub const BAD_NODE_PORTS: &[i32] = &[0, 29999, 70000, -30080];
pub const PROTOCOLS: &[&str] = &["TCP", "UDP"];
pub const BAD_PROTOCOLS: &[&str] = &["SCTP", "tcp", "ICMP", ""];
pub const TYPES: &[&str] = &["ClusterIP", "NodePort", "LoadBalancer"];
pub const BAD_TYPES: &[&str] = &["ExternalName", "Bogus", ""];
pub const POLICIES: &[&str] = &["Local", "Cluster"];
pub const BAD_POLICIES: &[&str] = &["local", ""];
pub const ADDRESS_TYPES: &[&str] = &["IPv4", "IPv6"];
pub const BAD_ADDRESS_TYPES: &[&str] = &["FQDN", "ipv4", ""];
pub const IP_FAMILIES: &[&str] = &["IPv4", "IPv6", "IPv5"];

/// Mostly a value of `valid`, sometimes one of `bad`.
fn mostly<T: Clone + std::fmt::Debug + 'static>(
    valid: &'static [T],
    bad: &'static [T],
) -> impl Strategy<Value = T> + Clone {
    prop_oneof![8 => select(valid), 1 => select(bad)]
}

fn mostly_str(
    valid: &'static [&'static str],
    bad: &'static [&'static str],
) -> impl Strategy<Value = String> + Clone {
    mostly(valid, bad).prop_map(str::to_string)
}

/// Mostly given, sometimes absent.
fn often<S: Strategy>(s: S) -> impl Strategy<Value = Option<S::Value>> {
    option::weighted(0.8, s)
}

fn pick(pool: &'static [&'static str]) -> impl Strategy<Value = String> {
    select(pool).prop_map(str::to_string)
}

fn maybe(pool: &'static [&'static str]) -> impl Strategy<Value = Option<String>> {
    option::of(pick(pool))
}

pub fn meta(names: &'static [&'static str]) -> impl Strategy<Value = ObjectMeta> {
    (maybe(NAMESPACES), option::weighted(0.95, pick(names))).prop_map(|(namespace, name)| {
        ObjectMeta {
            namespace,
            name,
            ..Default::default()
        }
    })
}

fn service_port() -> impl Strategy<Value = ServicePort> {
    (
        maybe(PORT_NAMES),
        mostly(PORTS, BAD_PORTS),
        often(mostly_str(PROTOCOLS, BAD_PROTOCOLS)),
        option::of(mostly(NODE_PORTS, BAD_NODE_PORTS)),
        option::of(mostly(PORTS, BAD_PORTS)),
    )
        .prop_map(|(name, port, protocol, node_port, target)| ServicePort {
            name,
            port,
            protocol,
            node_port,
            target_port: target.map(IntOrString::Int),
            ..Default::default()
        })
}

/// Mostly ports named as the API server requires (each a different name
/// when there are several), sometimes whatever came.
fn service_ports() -> impl Strategy<Value = Vec<ServicePort>> {
    prop_oneof![
        6 => vec(service_port(), 1..4).prop_map(|mut ports| {
            let several = ports.len() > 1;
            for (i, p) in ports.iter_mut().enumerate() {
                p.name = several.then(|| ["http", "dns", "metrics"][i].to_string());
            }
            ports
        }),
        1 => vec(service_port(), 0..4),
    ]
}

fn service_spec() -> impl Strategy<Value = ServiceSpec> {
    (
        option::weighted(0.9, mostly_str(SERVICE_IPS, BAD_SERVICE_IPS)),
        option::weighted(0.15, vec(mostly_str(SERVICE_IPS, BAD_SERVICE_IPS), 0..3)),
        option::weighted(0.2, vec(mostly_str(SERVICE_IPS, BAD_SERVICE_IPS), 0..3)),
        option::of(mostly_str(TYPES, BAD_TYPES)),
        option::weighted(0.95, service_ports()),
        (
            option::of(mostly_str(POLICIES, BAD_POLICIES)),
            option::of(mostly_str(POLICIES, BAD_POLICIES)),
            option::weighted(0.15, vec(pick(IP_FAMILIES), 0..3)),
        ),
    )
        .prop_map(
            |(cluster_ip, cluster_ips, external_ips, type_, ports, (etp, itp, families))| {
                ServiceSpec {
                    cluster_ip,
                    cluster_ips,
                    external_ips,
                    type_,
                    ports,
                    external_traffic_policy: etp,
                    internal_traffic_policy: itp,
                    ip_families: families,
                    ..Default::default()
                }
            },
        )
}

fn lb_status() -> impl Strategy<Value = Option<ServiceStatus>> {
    option::weighted(
        0.2,
        (
            option::of(mostly_str(SERVICE_IPS, BAD_SERVICE_IPS)),
            maybe(&["VIP", "Proxy"]),
        ),
    )
    .prop_map(|s| {
        s.map(|(ip, ip_mode)| ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![LoadBalancerIngress {
                    ip,
                    ip_mode,
                    ..Default::default()
                }]),
            }),
            ..Default::default()
        })
    })
}

pub fn service() -> impl Strategy<Value = Service> {
    (
        meta(SERVICE_NAMES),
        option::weighted(0.95, service_spec()),
        lb_status(),
        option::weighted(0.05, maybe(&["ebpf", "other"])),
    )
        .prop_map(|(mut metadata, spec, status, proxy_name)| {
            if let Some(value) = proxy_name {
                metadata.labels = Some(BTreeMap::from([(
                    "service.kubernetes.io/service-proxy-name".to_string(),
                    value.unwrap_or_default(),
                )]));
            }
            Service {
                metadata,
                spec,
                status,
            }
        })
}

fn conditions() -> impl Strategy<Value = Option<EndpointConditions>> {
    option::weighted(
        0.7,
        (
            option::of(any::<bool>()),
            option::of(any::<bool>()),
            option::of(any::<bool>()),
        ),
    )
    .prop_map(|c| {
        c.map(|(ready, serving, terminating)| EndpointConditions {
            ready,
            serving,
            terminating,
        })
    })
}

fn hints() -> impl Strategy<Value = Option<EndpointHints>> {
    option::weighted(0.2, vec(pick(ZONES), 0..2)).prop_map(|zones| {
        zones.map(|z| EndpointHints {
            for_zones: Some(z.into_iter().map(|name| ForZone { name }).collect()),
            ..Default::default()
        })
    })
}

fn endpoint() -> impl Strategy<Value = Endpoint> {
    (
        prop_oneof![
            8 => vec(mostly_str(ENDPOINT_IPS, BAD_ENDPOINT_IPS), 1..2),
            1 => vec(mostly_str(ENDPOINT_IPS, BAD_ENDPOINT_IPS), 0..4),
        ],
        conditions(),
        maybe(NODES),
        hints(),
    )
        .prop_map(|(addresses, conditions, node_name, hints)| Endpoint {
            addresses,
            conditions,
            node_name,
            hints,
            ..Default::default()
        })
}

/// Endpoints that are all different (10.245.x.y), `n` of them: the slices
/// around the API server's limit of 1,000.
fn distinct_endpoints(n: usize) -> Vec<Endpoint> {
    (0..n)
        .map(|i| Endpoint {
            addresses: vec![format!("10.245.{}.{}", i / 250, i % 250 + 1)],
            ..Default::default()
        })
        .collect()
}

fn endpoints() -> impl Strategy<Value = Vec<Endpoint>> {
    prop_oneof![
        40 => vec(endpoint(), 0..6),
        1 => (998usize..=1001).prop_map(distinct_endpoints),
    ]
}

fn endpoint_port() -> impl Strategy<Value = EndpointPort> {
    (
        maybe(PORT_NAMES),
        often(mostly(PORTS, BAD_PORTS)),
        often(mostly_str(PROTOCOLS, BAD_PROTOCOLS)),
    )
        .prop_map(|(name, port, protocol)| EndpointPort {
            name,
            port,
            protocol,
            ..Default::default()
        })
}

fn slice_labels() -> impl Strategy<Value = Option<BTreeMap<String, String>>> {
    (
        option::weighted(0.9, pick(SERVICE_NAMES)),
        option::weighted(0.05, Just(())),
    )
        .prop_map(|(service, headless)| {
            let mut labels = BTreeMap::new();
            if let Some(s) = service {
                labels.insert("kubernetes.io/service-name".to_string(), s);
            }
            if headless.is_some() {
                labels.insert("service.kubernetes.io/headless".to_string(), String::new());
            }
            Some(labels)
        })
}

pub fn slice() -> impl Strategy<Value = EndpointSlice> {
    (
        meta(SLICE_NAMES),
        slice_labels(),
        mostly_str(ADDRESS_TYPES, BAD_ADDRESS_TYPES),
        option::weighted(0.9, vec(endpoint_port(), 0..3)),
        endpoints(),
    )
        .prop_map(|(mut metadata, labels, address_type, ports, endpoints)| {
            metadata.labels = labels;
            EndpointSlice {
                metadata,
                address_type,
                endpoints,
                ports,
            }
        })
}
