//! Health checks as a load balancer sees them: real HTTP requests from the
//! outside client to each node's `healthCheckNodePort` of a LoadBalancer
//! Service with `externalTrafficPolicy: Local`, answered 200 or 503 as the
//! node's local endpoints come and go, closed when the Service goes; a
//! port another process holds is retried until it is free; and /healthz
//! fails on a node the API server says is going away.

use std::{net::SocketAddrV4, time::Duration};

use anyhow::Result;
use common::*;
use lab::{Netns, addr, apiserver::ApiServer};

mod common;

const HC_PORT: u16 = 32500;

/// A LoadBalancer Service with ETP Local and its slice: `web-lb` on
/// 10.96.0.40, NodePort 30040, health check on `hc_port`.
fn lb_local(
    name: &str,
    cluster_ip: &str,
    node_port: u16,
    hc_port: u16,
    eps: Vec<(&Backend, bool)>,
) -> String {
    let mut endpoints = String::new();
    for (b, ready) in &eps {
        endpoints.push_str(&format!(
            "  - addresses: [\"{}\"]\n    nodeName: {}\n    conditions:\n      ready: {ready}\n",
            b.ip, b.node
        ));
    }
    if endpoints.is_empty() {
        endpoints = "  []\n".into();
    }
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: lab
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  healthCheckNodePort: {hc_port}
  clusterIP: {cluster_ip}
  ports:
    - name: main
      port: 80
      targetPort: 8080
      nodePort: {node_port}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: lab
  labels:
    kubernetes.io/service-name: {name}
addressType: IPv4
ports:
  - name: main
    port: 8080
endpoints:
{endpoints}---
"
    )
}

fn at(node_ip: std::net::Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(node_ip, port)
}

/// (status, localEndpoints) of a health check, or None if it does not
/// answer.
fn check(ns: &Netns, target: SocketAddrV4) -> Option<(u16, u64)> {
    let (status, body) = http_get(ns, target, "/healthz").ok()?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    Some((status, v["localEndpoints"].as_u64()?))
}

fn wait_check(c: &Cluster, target: SocketAddrV4, want: Option<(u16, u64)>) {
    let client = c.lab.ns(addr::CLIENT);
    if let Err(e) = c.lab.wait_for(
        &format!("{target} answers {want:?}"),
        Duration::from_secs(5),
        || check(client, target) == want,
    ) {
        panic!("{e:#}: last {:?}\n{}", check(client, target), c.logs());
    }
}

#[test]
fn health_check_ports_follow_local_endpoints_and_services() -> Result<()> {
    let Some(c) = Cluster::start(
        "hc_follow",
        &lb_local(
            "web-lb",
            "10.96.0.40",
            30040,
            HC_PORT,
            vec![(&WEB_A, true), (&WEB_B1, true), (&WEB_B2, false)],
        ),
    ) else {
        return Ok(());
    };
    let client = c.lab.ns(addr::CLIENT);
    let (a, b) = (at(addr::NODE_A_IP, HC_PORT), at(addr::NODE_B_IP, HC_PORT));

    // The answer a load balancer gets: kube-proxy's JSON and headers.
    let (status, head, body) = http_get_full(client, a, "/")?;
    assert_eq!(status, 200, "{head}\n{body}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("content-type: application/json"), "{head}");
    assert!(lower.contains("x-content-type-options: nosniff"), "{head}");
    assert!(
        lower.contains("x-load-balancing-endpoint-weight: 1"),
        "{head}"
    );
    let v: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(v["service"]["namespace"], "lab");
    assert_eq!(v["service"]["name"], "web-lb");
    assert_eq!(v["serviceProxyHealthy"], true);
    // node-b has one ready endpoint (web-b2 is not ready).
    assert_eq!(check(client, b), Some((200, 1)));

    // node-a's endpoint turns not ready: node-a fails, node-b still passes.
    c.write_manifests(&lb_local(
        "web-lb",
        "10.96.0.40",
        30040,
        HC_PORT,
        vec![(&WEB_A, false), (&WEB_B1, true), (&WEB_B2, true)],
    ));
    wait_check(&c, a, Some((503, 0)));
    wait_check(&c, b, Some((200, 2)));
    // And back.
    c.write_manifests(&lb_local(
        "web-lb",
        "10.96.0.40",
        30040,
        HC_PORT,
        vec![(&WEB_A, true)],
    ));
    wait_check(&c, a, Some((200, 1)));
    wait_check(&c, b, Some((503, 0)));

    // The Service goes: both ports close.
    c.write_manifests(&placement_manifests());
    wait_check(&c, a, None);
    wait_check(&c, b, None);
    let refused = http_get(client, a, "/");
    assert!(refused.is_err(), "still answering: {refused:?}");
    Ok(())
}

#[test]
fn a_taken_health_check_port_is_retried_and_others_serve() -> Result<()> {
    let Some(mut c) = Cluster::build("hc_taken") else {
        return Ok(());
    };
    // Another process on node-a holds the port before the daemon starts.
    let holder = c
        .lab
        .ns(addr::NODE_A)
        .run(|| std::net::TcpListener::bind(("0.0.0.0", HC_PORT)))?;
    c.write_manifests(
        &[
            lb_local("web-lb", "10.96.0.40", 30040, HC_PORT, vec![(&WEB_A, true)]),
            lb_local(
                "web-lb2",
                "10.96.0.41",
                30041,
                HC_PORT + 1,
                vec![(&WEB_A, true)],
            ),
        ]
        .concat(),
    );
    c.start_daemons();
    // The daemon runs, serves the other check, and says why this one is not.
    wait_check(&c, at(addr::NODE_A_IP, HC_PORT + 1), Some((200, 1)));
    assert!(
        c.lab
            .daemon_log(addr::NODE_A)
            .contains("health check port cannot be bound")
    );
    let (_, metrics) = http_get(
        c.lab.ns(addr::NODE_A),
        "127.0.0.1:10249".parse()?,
        "/metrics",
    )?;
    assert!(
        metrics.contains("kube_ebpf_proxy_health_check_listeners{state=\"failing\"} 1"),
        "{metrics}"
    );
    // Once the port is free, the retry takes it (backoff: at most ~4 s here).
    drop(holder);
    let client = c.lab.ns(addr::CLIENT);
    c.lab
        .wait_for("retried bind", Duration::from_secs(10), || {
            check(client, at(addr::NODE_A_IP, HC_PORT)) == Some((200, 1))
        })?;
    Ok(())
}

#[test]
fn health_checks_bind_only_the_nodeport_addresses() -> Result<()> {
    let Some(c) = Cluster::start_with(
        "hc_addresses",
        &lb_local("web-lb", "10.96.0.40", 30040, HC_PORT, vec![(&WEB_A, true)]),
        &["--nodeport-addresses", "192.168.200.0/24"],
    ) else {
        return Ok(());
    };
    let node = c.lab.ns(addr::NODE_A);
    wait_check(&c, at(addr::NODE_A_IP, HC_PORT), Some((200, 1)));
    let lo = http_get(node, at(std::net::Ipv4Addr::LOCALHOST, HC_PORT), "/");
    assert!(lo.is_err(), "loopback is not a NodePort address: {lo:?}");
    Ok(())
}

/// /healthz against the stand-in API server: this node's Node marked for
/// deletion by the autoscaler, then unmarked, then being deleted.
#[test]
fn healthz_fails_while_the_node_is_going_away() -> Result<()> {
    let Some(mut c) = Cluster::build("healthz_eligible") else {
        return Ok(());
    };
    let api = ApiServer::start_in(
        c.lab.ns(addr::UNDERLAY),
        SocketAddrV4::new(addr::UNDERLAY_GATEWAY, 6443),
    )?;
    let node = |extra: serde_json::Value| {
        let mut n = serde_json::json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": addr::NODE_A}});
        if let (Some(n), Some(extra)) = (n.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                n.insert(k.clone(), v.clone());
            }
        }
        api.apply_json(n).expect("apply Node");
    };
    node(serde_json::json!({}));
    c.source_args = vec!["--master".into(), api.url()];
    c.start_daemons();
    let client = c.lab.ns(addr::CLIENT);
    let healthz = |node_ip, path: &str| {
        let (status, body) = http_get(client, at(node_ip, 10256), path).ok()?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        Some((status, v["nodeEligible"].as_bool()))
    };
    let wait = |what: &str, path: &str, want: (u16, Option<bool>)| {
        if let Err(e) = c.lab.wait_for(what, Duration::from_secs(5), || {
            healthz(addr::NODE_A_IP, path) == Some(want)
        }) {
            panic!("{e:#}: {:?}\n{}", healthz(addr::NODE_A_IP, path), c.logs());
        }
    };
    wait("eligible", "/healthz", (200, Some(true)));

    node(serde_json::json!({"spec": {"taints": [
        {"key": "ToBeDeletedByClusterAutoscaler", "value": "1700000000", "effect": "NoSchedule"}]}}));
    wait("marked for deletion", "/healthz", (503, Some(false)));
    // /livez ignores eligibility; the other node (no Node object) is fine.
    assert_eq!(healthz(addr::NODE_A_IP, "/livez"), Some((200, None)));
    assert_eq!(
        healthz(addr::NODE_B_IP, "/healthz"),
        Some((200, Some(true)))
    );

    node(serde_json::json!({}));
    wait("unmarked", "/healthz", (200, Some(true)));
    node(serde_json::json!({"metadata": {"name": addr::NODE_A,
        "deletionTimestamp": "2026-01-02T03:04:05Z", "finalizers": ["lab/hold"]}}));
    wait("being deleted", "/healthz", (503, Some(false)));
    Ok(())
}
