//! Scenarios for the desired-state model: objects in (inline YAML), the
//! frontends, endpoint sets and problems out, rendered as text lines.
//!
//! Rendering:
//!
//! ```text
//! fe <ip:port/proto> <kind> <ns/name:port> [local-only] -> <backends | none> [extras]
//! ep <ns/name:port> cluster: <backends | none> | local: <backends | none>
//! problem <label> <object kind> <ns/name>
//! hc <ns/name> port <healthCheckNodePort> local <local ready endpoints>
//! ```
//!
//! A backend is `ip:port`, followed by `local` and `terminating` when set.
//! Extras, when set: `| internal: <backends>` (externalTrafficPolicy Local:
//! the set pods and node processes use), `| drop-when-empty`, `| affinity
//! <seconds>s`, `| ranges <cidrs>`.
//! `fe` and `problem` lines are always compared; `ep` lines only in cases
//! whose expectation has some.

use std::path::Path;

use proxy_userspace::{
    model::{DesiredState, NodeInfo, Options, desired_state},
    source::{allocate, manifests},
};

struct Case {
    name: &'static str,
    yaml: String,
    /// (node name, zone).
    node: (&'static str, Option<&'static str>),
    service_proxy_name: Option<&'static str>,
    want: &'static str,
}

fn case(name: &'static str, yaml: String, want: &'static str) -> Case {
    Case {
        name,
        yaml,
        node: ("node-a", Some("zone-a")),
        service_proxy_name: None,
        want,
    }
}

// ---- terse object builders (flow-style YAML) ----

/// A Service; `spec` is the inside of a flow mapping.
fn svc(name: &str, spec: &str) -> String {
    format!(
        "---\n{{apiVersion: v1, kind: Service, metadata: {{name: {name}}}, spec: {{{spec}}}}}\n"
    )
}

/// A Service with metadata given in full (labels, annotations, namespace).
fn svc_meta(meta: &str, spec: &str) -> String {
    format!("---\n{{apiVersion: v1, kind: Service, metadata: {{{meta}}}, spec: {{{spec}}}}}\n")
}

/// An EndpointSlice of `service`; `ports` is a flow sequence, `endpoints`
/// are flow mappings.
fn slice_of(family: &str, name: &str, service: &str, ports: &str, endpoints: &[String]) -> String {
    let mut s = format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}, labels: {{kubernetes.io/service-name: {service}}}}}\n\
         addressType: {family}\nports: {ports}\nendpoints:\n"
    );
    if endpoints.is_empty() {
        s.push_str("  []\n");
    }
    for e in endpoints {
        s.push_str(&format!("- {e}\n"));
    }
    s
}

fn slice(name: &str, service: &str, ports: &str, endpoints: &[String]) -> String {
    slice_of("IPv4", name, service, ports, endpoints)
}

/// An endpoint. `cond` is one of: "" (no conditions: ready), "ready",
/// "unready", "term" (terminating, serving), "term-down" (terminating, not
/// serving), "term-unset" (terminating, serving unset), or raw flow YAML
/// for the conditions.
fn ep(ip: &str, node: &str, cond: &str) -> String {
    ep_hints(ip, node, cond, "")
}

/// An endpoint with `hints` (the inside of a flow mapping, e.g.
/// `forZones: [{name: zone-a}]`).
fn ep_hints(ip: &str, node: &str, cond: &str, hints: &str) -> String {
    let conditions = match cond {
        "" => String::new(),
        "ready" => "{ready: true}".into(),
        "unready" => "{ready: false}".into(),
        "term" => "{ready: false, serving: true, terminating: true}".into(),
        "term-down" => "{ready: false, serving: false, terminating: true}".into(),
        "term-unset" => "{ready: false, terminating: true}".into(),
        raw => raw.to_string(),
    };
    let mut fields = vec![format!("addresses: [\"{ip}\"]")];
    if !node.is_empty() {
        fields.push(format!("nodeName: {node}"));
    }
    if !conditions.is_empty() {
        fields.push(format!("conditions: {conditions}"));
    }
    if !hints.is_empty() {
        fields.push(format!("hints: {{{hints}}}"));
    }
    format!("{{{}}}", fields.join(", "))
}

fn zones(z: &[&str]) -> String {
    let list: Vec<String> = z.iter().map(|z| format!("{{name: {z}}}")).collect();
    format!("forZones: [{}]", list.join(", "))
}

const HTTP: &str = "[{name: http, port: 8080}]";

/// The usual Service: `web`, 10.96.0.10, port `http` 80, plus `extra`.
fn web(extra: &str) -> String {
    let sep = if extra.is_empty() { "" } else { ", " };
    svc(
        "web",
        &format!(
            "clusterIP: 10.96.0.10, ports: [{{name: http, port: 80, nodePort: 30080}}]{sep}{extra}"
        ),
    )
}

/// `web` of type NodePort with `extra`.
fn web_np(extra: &str) -> String {
    let sep = if extra.is_empty() { "" } else { ", " };
    web(&format!("type: NodePort{sep}{extra}"))
}

fn web_slice(endpoints: &[String]) -> String {
    slice("web-1", "web", HTTP, endpoints)
}

fn cat(parts: &[String]) -> String {
    parts.concat()
}

// ---- rendering and running ----

fn render(state: &DesiredState) -> Vec<String> {
    let list = |v: &[proxy_userspace::model::Endpoint]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.iter()
                .map(|b| b.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let mut out = Vec::new();
    for (key, fe) in &state.frontends {
        let mut extras = String::new();
        if let Some(internal) = &fe.internal_backends {
            extras += &format!(" | internal: {}", list(internal));
        }
        if fe.drop_when_empty {
            extras += " | drop-when-empty";
        }
        if let Some(t) = fe.affinity_timeout {
            extras += &format!(" | affinity {t}s");
        }
        if !fe.source_ranges.is_empty() {
            let ranges: Vec<String> = fe.source_ranges.iter().map(|c| c.to_string()).collect();
            extras += &format!(" | ranges {}", ranges.join(","));
        }
        out.push(format!(
            "fe {key} {} {}{} -> {}{extras}",
            fe.kind,
            fe.service,
            if fe.local_only { " local-only" } else { "" },
            list(&fe.backends)
        ));
    }
    for (spn, eps) in &state.endpoints {
        out.push(format!(
            "ep {spn} cluster: {} | local: {}",
            list(&eps.cluster),
            list(&eps.local)
        ));
    }
    for (id, hc) in &state.health_checks {
        out.push(format!(
            "hc {id} port {} local {}",
            hc.node_port, hc.local_endpoints
        ));
    }
    for p in &state.problems {
        out.push(format!(
            "problem {} {} {}/{}",
            p.kind.label(),
            p.object_kind,
            p.namespace,
            p.name
        ));
    }
    out
}

fn run(c: &Case) -> Result<(), String> {
    let objects = manifests::parse_str(&c.yaml, c.name);
    if !objects.problems.is_empty() {
        return Err(format!(
            "case {:?}: the YAML itself has problems: {:?}",
            c.name, objects.problems
        ));
    }
    let node = NodeInfo {
        name: c.node.0.to_string(),
        zone: c.node.1.map(str::to_string),
    };
    let opts = Options {
        service_proxy_name: c.service_proxy_name.map(str::to_string),
    };
    let state = desired_state(&objects.services, &objects.slices, &node, &opts);
    let want: Vec<String> = c
        .want
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    let with_eps = want.iter().any(|l| l.starts_with("ep "));
    let got: Vec<String> = render(&state)
        .into_iter()
        .filter(|l| with_eps || !l.starts_with("ep "))
        .collect();

    // Every scenario must come out the same whatever the input order.
    let mut services = objects.services.clone();
    let mut slices = objects.slices.clone();
    services.reverse();
    slices.reverse();
    let reversed = desired_state(&services, &slices, &node, &opts);
    if reversed != state {
        return Err(format!(
            "case {:?}: depends on input order:\n{}\n--- vs ---\n{}",
            c.name,
            render(&state).join("\n"),
            render(&reversed).join("\n")
        ));
    }

    if got != want {
        return Err(format!(
            "case {:?}:\n--- want\n{}\n--- got\n{}\n--- problems\n{}",
            c.name,
            want.join("\n"),
            got.join("\n"),
            state
                .problems
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        ));
    }
    Ok(())
}

fn run_all(cases: Vec<Case>) {
    let mut failures = Vec::new();
    let n = cases.len();
    for c in &cases {
        if let Err(e) = run(c) {
            failures.push(e);
        }
    }
    if !failures.is_empty() {
        panic!(
            "{} of {n} scenarios failed:\n\n{}",
            failures.len(),
            failures.join("\n\n")
        );
    }
}

// ---- scenarios ----

#[test]
fn cluster_policy() {
    run_all(vec![
        case(
            "ready endpoints only; no conditions means ready; local flag from nodeName",
            cat(&[
                web(""),
                web_slice(&[
                    ep("10.0.0.1", "node-a", "ready"),
                    ep("10.0.0.2", "node-b", ""),
                    ep("10.0.0.3", "node-b", "unready"),
                    ep("10.0.0.4", "node-a", "{ready: false, serving: true}"),
                ]),
            ]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.1:8080 local, 10.0.0.2:8080
             ep default/web:http cluster: 10.0.0.1:8080 local, 10.0.0.2:8080 | local: 10.0.0.1:8080 local",
        ),
        case(
            "all terminating: fall back to serving terminating endpoints",
            cat(&[
                web(""),
                web_slice(&[
                    ep("10.0.0.1", "node-a", "term"),
                    ep("10.0.0.2", "node-b", "term-down"),
                    ep("10.0.0.3", "node-b", "unready"),
                    ep("10.0.0.4", "node-b", "term"),
                ]),
            ]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.1:8080 local terminating, 10.0.0.4:8080 terminating",
        ),
        case(
            "mixed: ready endpoints win over terminating ones",
            cat(&[
                web(""),
                web_slice(&[
                    ep("10.0.0.1", "node-a", "term"),
                    ep("10.0.0.2", "node-b", "ready"),
                ]),
            ]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.2:8080
             ep default/web:http cluster: 10.0.0.2:8080 | local: 10.0.0.1:8080 local terminating",
        ),
        case(
            "terminating with serving unset is serving = ready = false: not a fallback",
            cat(&[web(""), web_slice(&[ep("10.0.0.1", "node-b", "term-unset")])]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> none",
        ),
        case(
            "not ready but serving and not terminating: no fallback",
            cat(&[
                web(""),
                web_slice(&[ep("10.0.0.1", "node-b", "{ready: false, serving: true}")]),
            ]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> none",
        ),
        case(
            "ready and terminating both set: ready counts",
            cat(&[
                web(""),
                web_slice(&[ep(
                    "10.0.0.1",
                    "node-b",
                    "{ready: true, serving: true, terminating: true}",
                )]),
            ]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.1:8080 terminating",
        ),
        case(
            "no slice at all: a frontend without backend (rejects)",
            web(""),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> none
             ep default/web:http cluster: none | local: none",
        ),
    ]);
}

#[test]
fn local_policies() {
    run_all(vec![
        case(
            "ITP Local, all endpoints remote: ClusterIP has none",
            cat(&[
                web("internalTrafficPolicy: Local"),
                web_slice(&[ep("10.0.0.2", "node-b", ""), ep("10.0.0.3", "node-c", "")]),
            ]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http local-only -> none | drop-when-empty
             ep default/web:http cluster: 10.0.0.2:8080, 10.0.0.3:8080 | local: none",
        ),
        case(
            "ITP Local, all endpoints local",
            cat(&[
                web("internalTrafficPolicy: Local"),
                web_slice(&[ep("10.0.0.1", "node-a", ""), ep("10.0.0.2", "node-a", "")]),
            ]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http local-only -> 10.0.0.1:8080 local, 10.0.0.2:8080 local",
        ),
        case(
            "ITP Local, some local",
            cat(&[
                web("internalTrafficPolicy: Local"),
                web_slice(&[
                    ep("10.0.0.1", "node-a", ""),
                    ep("10.0.0.2", "node-b", ""),
                    ep("10.0.0.3", "node-a", "unready"),
                ]),
            ]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http local-only -> 10.0.0.1:8080 local",
        ),
        case(
            "ITP Local, local endpoint only terminating while remote ones are ready: local fallback",
            cat(&[
                web("internalTrafficPolicy: Local"),
                web_slice(&[ep("10.0.0.1", "node-a", "term"), ep("10.0.0.2", "node-b", "")]),
            ]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http local-only -> 10.0.0.1:8080 local terminating
             ep default/web:http cluster: 10.0.0.2:8080 | local: 10.0.0.1:8080 local terminating",
        ),
        case(
            "ETP Local on NodePort: NodePort local, ClusterIP cluster",
            cat(&[
                web_np("externalTrafficPolicy: Local"),
                web_slice(&[ep("10.0.0.1", "node-a", ""), ep("10.0.0.2", "node-b", "")]),
            ]),
            "fe 0.0.0.0:30080/TCP node-port default/web:http local-only -> 10.0.0.1:8080 local \
                | internal: 10.0.0.1:8080 local, 10.0.0.2:8080
             fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.1:8080 local, 10.0.0.2:8080",
        ),
        case(
            "ETP Local on LoadBalancer, all endpoints remote: external frontends have none",
            cat(&[
                web(
                    "type: LoadBalancer, externalTrafficPolicy: Local, externalIPs: [192.0.2.7]}, \
                     status: {loadBalancer: {ingress: [{ip: 198.51.100.9}, {hostname: lb.example.com}]}",
                ),
                web_slice(&[ep("10.0.0.2", "node-b", "")]),
            ]),
            "fe 0.0.0.0:30080/TCP node-port default/web:http local-only -> none | internal: 10.0.0.2:8080
             fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.2:8080
             fe 192.0.2.7:80/TCP external-ip default/web:http local-only -> none | internal: 10.0.0.2:8080
             fe 198.51.100.9:80/TCP load-balancer-ip default/web:http local-only -> none \
                | internal: 10.0.0.2:8080",
        ),
        case(
            "ETP Local, all local",
            cat(&[
                web_np("externalTrafficPolicy: Local"),
                web_slice(&[ep("10.0.0.1", "node-a", "")]),
            ]),
            "fe 0.0.0.0:30080/TCP node-port default/web:http local-only -> 10.0.0.1:8080 local \
                | internal: 10.0.0.1:8080 local
             fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.1:8080 local",
        ),
        case(
            "ETP Local, local endpoints only terminating",
            cat(&[
                web_np("externalTrafficPolicy: Local"),
                web_slice(&[
                    ep("10.0.0.1", "node-a", "term"),
                    ep("10.0.0.3", "node-a", "term-down"),
                    ep("10.0.0.2", "node-b", ""),
                ]),
            ]),
            "fe 0.0.0.0:30080/TCP node-port default/web:http local-only -> 10.0.0.1:8080 local terminating \
                | internal: 10.0.0.2:8080
             fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.2:8080",
        ),
        case(
            "ITP Local and ETP Cluster are independent",
            cat(&[
                web_np("internalTrafficPolicy: Local, externalTrafficPolicy: Cluster"),
                web_slice(&[ep("10.0.0.1", "node-a", ""), ep("10.0.0.2", "node-b", "")]),
            ]),
            "fe 0.0.0.0:30080/TCP node-port default/web:http -> 10.0.0.1:8080 local, 10.0.0.2:8080
             fe 10.96.0.10:80/TCP cluster-ip default/web:http local-only -> 10.0.0.1:8080 local",
        ),
        case(
            "endpoint without nodeName is never local",
            cat(&[
                web("internalTrafficPolicy: Local"),
                web_slice(&[ep("10.0.0.1", "", "")]),
            ]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http local-only -> none | drop-when-empty",
        ),
    ]);
}

#[test]
fn affinity_and_source_ranges() {
    run_all(vec![
        case(
            "sessionAffinity ClientIP: default timeout on every frontend",
            cat(&[
                web_np("sessionAffinity: ClientIP"),
                web_slice(&[ep("10.0.0.1", "node-a", "")]),
            ]),
            "fe 0.0.0.0:30080/TCP node-port default/web:http -> 10.0.0.1:8080 local | affinity 10800s
             fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.1:8080 local | affinity 10800s",
        ),
        case(
            "sessionAffinity ClientIP with timeoutSeconds; None is no affinity",
            cat(&[
                web("sessionAffinity: ClientIP, \
                     sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}"),
                web_slice(&[ep("10.0.0.1", "node-a", "")]),
                svc("other", "clusterIP: 10.96.0.11, sessionAffinity: None, ports: [{port: 80}]"),
            ]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.1:8080 local | affinity 60s
             fe 10.96.0.11:80/TCP cluster-ip default/other -> none",
        ),
        case(
            "loadBalancerSourceRanges: on the LB IP only; a bad range is reported, the others kept",
            cat(&[
                web(
                    "type: LoadBalancer, externalIPs: [192.0.2.7], \
                     loadBalancerSourceRanges: [10.0.0.0/8, ' 192.168.1.0/24', bogus]}, \
                     status: {loadBalancer: {ingress: [{ip: 198.51.100.9}]}",
                ),
                web_slice(&[ep("10.0.0.1", "node-a", "")]),
            ]),
            "fe 0.0.0.0:30080/TCP node-port default/web:http -> 10.0.0.1:8080 local
             fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.1:8080 local
             fe 192.0.2.7:80/TCP external-ip default/web:http -> 10.0.0.1:8080 local
             fe 198.51.100.9:80/TCP load-balancer-ip default/web:http -> 10.0.0.1:8080 local \
                | ranges 10.0.0.0/8,192.168.1.0/24
             problem invalid_source_range Service default/web",
        ),
    ]);
}

/// `web` of type LoadBalancer, ETP Local, with a healthCheckNodePort.
fn web_lb_local(hc_port: &str) -> String {
    web(&format!(
        "type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: {hc_port}"
    ))
}

#[test]
fn health_checks() {
    run_all(vec![
        case(
            "LoadBalancer ETP Local: local ready endpoints counted, terminating and remote not",
            cat(&[
                web_lb_local("32100"),
                web_slice(&[
                    ep("10.0.0.1", "node-a", ""),
                    ep("10.0.0.4", "node-a", "term"),
                    ep("10.0.0.2", "node-b", ""),
                ]),
            ]),
            "fe 0.0.0.0:30080/TCP node-port default/web:http local-only -> 10.0.0.1:8080 local | internal: 10.0.0.1:8080 local, 10.0.0.2:8080
             fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.1:8080 local, 10.0.0.2:8080
             hc default/web port 32100 local 1",
        ),
        case(
            "only terminating local endpoints: they serve, the check fails (0)",
            cat(&[
                web_lb_local("32100"),
                web_slice(&[ep("10.0.0.4", "node-a", "term"), ep("10.0.0.2", "node-b", "")]),
            ]),
            "fe 0.0.0.0:30080/TCP node-port default/web:http local-only -> 10.0.0.4:8080 local terminating | internal: 10.0.0.2:8080
             fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.2:8080
             hc default/web port 32100 local 0",
        ),
        case(
            "a dual-stack pod counts once",
            cat(&[
                svc(
                    "web",
                    "type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: 32100, \
                     clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10, 'fd00::10'], \
                     ports: [{name: http, port: 80}]",
                ),
                web_slice(&[ep("10.0.0.1", "node-a", "")]),
                slice_of("IPv6", "web-v6", "web", HTTP, &[ep("fd00:1::1", "node-a", "")]),
            ]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.1:8080 local
             fe [fd00::10]:80/TCP cluster-ip default/web:http -> [fd00:1::1]:8080 local
             hc default/web port 32100 local 1",
        ),
        case(
            "one pod serving two ports counts once; two pods twice",
            cat(&[
                svc(
                    "web",
                    "type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: 32100,                      clusterIP: 10.96.0.10, ports: [{name: http, port: 80}, {name: https, port: 443}]",
                ),
                slice(
                    "web-1",
                    "web",
                    "[{name: http, port: 8080}, {name: https, port: 8443}]",
                    &[ep("10.0.0.1", "node-a", ""), ep("10.0.0.3", "node-a", "")],
                ),
            ]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.1:8080 local, 10.0.0.3:8080 local
             fe 10.96.0.10:443/TCP cluster-ip default/web:https -> 10.0.0.1:8443 local, 10.0.0.3:8443 local
             hc default/web port 32100 local 2",
        ),
        case(
            "no health check: ETP Cluster, NodePort type, or no port",
            cat(&[
                web("type: LoadBalancer, externalTrafficPolicy: Cluster, healthCheckNodePort: 32100"),
                svc(
                    "np",
                    "type: NodePort, externalTrafficPolicy: Local, healthCheckNodePort: 32101,                      clusterIP: 10.96.0.11, ports: [{port: 80, nodePort: 30081}]",
                ),
                svc(
                    "lb",
                    "type: LoadBalancer, externalTrafficPolicy: Local, clusterIP: 10.96.0.12,                      ports: [{port: 80, nodePort: 30082}]",
                ),
            ]),
            "fe 0.0.0.0:30080/TCP node-port default/web:http -> none
             fe 0.0.0.0:30081/TCP node-port default/np local-only -> none | internal: none
             fe 0.0.0.0:30082/TCP node-port default/lb local-only -> none | internal: none
             fe 10.96.0.10:80/TCP cluster-ip default/web:http -> none
             fe 10.96.0.11:80/TCP cluster-ip default/np -> none
             fe 10.96.0.12:80/TCP cluster-ip default/lb -> none",
        ),
        case(
            "an invalid or taken healthCheckNodePort: no health check, frontends unaffected",
            cat(&[
                web_lb_local("70000"),
                web_slice(&[ep("10.0.0.1", "node-a", "")]),
                svc(
                    "a",
                    "type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: 32200,                      clusterIP: 10.96.0.11, ports: [{port: 80, nodePort: 30081}]",
                ),
                svc(
                    "b",
                    "type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: 32200,                      clusterIP: 10.96.0.12, ports: [{port: 80, nodePort: 30082}]",
                ),
            ]),
            "fe 0.0.0.0:30080/TCP node-port default/web:http local-only -> 10.0.0.1:8080 local | internal: 10.0.0.1:8080 local
             fe 0.0.0.0:30081/TCP node-port default/a local-only -> none | internal: none
             fe 0.0.0.0:30082/TCP node-port default/b local-only -> none | internal: none
             fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.1:8080 local
             fe 10.96.0.11:80/TCP cluster-ip default/a -> none
             fe 10.96.0.12:80/TCP cluster-ip default/b -> none
             hc default/a port 32200 local 0
             problem invalid_health_check_node_port Service default/web
             problem duplicate_health_check_node_port Service default/b",
        ),
    ]);
}

#[test]
fn policies_on_services_not_reachable_from_outside() {
    run_all(vec![
        case(
            "ETP Local on a ClusterIP service is ignored (and nodePort unused)",
            cat(&[
                web("externalTrafficPolicy: Local"),
                web_slice(&[ep("10.0.0.2", "node-b", "")]),
            ]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.2:8080",
        ),
        case(
            "ETP Local on a ClusterIP service with externalIPs applies to the externalIPs only",
            cat(&[
                web("externalTrafficPolicy: Local, externalIPs: [192.0.2.7]"),
                web_slice(&[ep("10.0.0.1", "node-a", ""), ep("10.0.0.2", "node-b", "")]),
            ]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.1:8080 local, 10.0.0.2:8080
             fe 192.0.2.7:80/TCP external-ip default/web:http local-only -> 10.0.0.1:8080 local \
                | internal: 10.0.0.1:8080 local, 10.0.0.2:8080",
        ),
        case(
            "load-balancer status on a non-LoadBalancer service is not a frontend",
            cat(&[
                web("}, status: {loadBalancer: {ingress: [{ip: 198.51.100.9}]}"),
                web_slice(&[ep("10.0.0.2", "node-b", "")]),
            ]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.2:8080",
        ),
        case(
            "load-balancer ingress with ipMode Proxy is not a frontend",
            cat(&[
                web("type: LoadBalancer}, status: {loadBalancer: {ingress: \
                     [{ip: 198.51.100.9, ipMode: Proxy}, {ip: 198.51.100.10, ipMode: VIP}]}"),
                web_slice(&[ep("10.0.0.2", "node-b", "")]),
            ]),
            "fe 0.0.0.0:30080/TCP node-port default/web:http -> 10.0.0.2:8080
             fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.2:8080
             fe 198.51.100.10:80/TCP load-balancer-ip default/web:http -> 10.0.0.2:8080",
        ),
    ]);
}

fn zoned() -> String {
    web_slice(&[
        ep_hints("10.0.0.1", "node-a", "", &zones(&["zone-a"])),
        ep_hints("10.0.0.2", "node-b", "", &zones(&["zone-b"])),
        ep_hints("10.0.0.3", "node-c", "", &zones(&["zone-a"])),
    ])
}

#[test]
fn topology() {
    let mut no_zone = case(
        "node without zone: no filtering",
        cat(&[web("trafficDistribution: PreferClose"), zoned()]),
        "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.1:8080 local, 10.0.0.2:8080, 10.0.0.3:8080",
    );
    no_zone.node = ("node-a", None);
    run_all(vec![
        case(
            "PreferClose: only endpoints hinted for this zone",
            cat(&[web("trafficDistribution: PreferClose"), zoned()]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.1:8080 local, 10.0.0.3:8080",
        ),
        case(
            "hints are ignored without PreferClose or the annotation",
            cat(&[web(""), zoned()]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.1:8080 local, 10.0.0.2:8080, 10.0.0.3:8080",
        ),
        case(
            "annotation topology-mode: Auto",
            cat(&[
                svc_meta(
                    "name: web, annotations: {service.kubernetes.io/topology-mode: Auto}",
                    "clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]",
                ),
                zoned(),
            ]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.1:8080 local, 10.0.0.3:8080",
        ),
        case(
            "one endpoint without hints: no filtering",
            cat(&[
                web("trafficDistribution: PreferClose"),
                web_slice(&[
                    ep_hints("10.0.0.1", "node-a", "", &zones(&["zone-a"])),
                    ep("10.0.0.2", "node-b", ""),
                ]),
            ]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.1:8080 local, 10.0.0.2:8080",
        ),
        case(
            "unready endpoint without hints does not count",
            cat(&[
                web("trafficDistribution: PreferClose"),
                web_slice(&[
                    ep_hints("10.0.0.1", "node-a", "", &zones(&["zone-a"])),
                    ep_hints("10.0.0.2", "node-b", "", &zones(&["zone-b"])),
                    ep("10.0.0.3", "node-b", "unready"),
                ]),
            ]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.1:8080 local",
        ),
        case(
            "zone mismatch: no endpoint hinted for this zone, no filtering",
            cat(&[
                web("trafficDistribution: PreferClose"),
                web_slice(&[
                    ep_hints("10.0.0.2", "node-b", "", &zones(&["zone-b"])),
                    ep_hints("10.0.0.3", "node-c", "", &zones(&["zone-c"])),
                ]),
            ]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.2:8080, 10.0.0.3:8080",
        ),
        case(
            "several zones in one endpoint's hints",
            cat(&[
                web("trafficDistribution: PreferClose"),
                web_slice(&[
                    ep_hints("10.0.0.2", "node-b", "", &zones(&["zone-b", "zone-a"])),
                    ep_hints("10.0.0.3", "node-c", "", &zones(&["zone-c"])),
                    ep_hints("10.0.0.4", "node-d", "", &zones(&["zone-a"])),
                ]),
            ]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.2:8080, 10.0.0.4:8080",
        ),
        no_zone,
        case(
            "local set is never narrowed by topology",
            cat(&[
                web("trafficDistribution: PreferClose, internalTrafficPolicy: Local"),
                web_slice(&[
                    ep_hints("10.0.0.1", "node-a", "", &zones(&["zone-b"])),
                    ep_hints("10.0.0.2", "node-b", "", &zones(&["zone-a"])),
                    ep_hints("10.0.0.4", "node-a", "", &zones(&["zone-a"])),
                ]),
            ]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http local-only -> 10.0.0.1:8080 local, 10.0.0.4:8080 local
             ep default/web:http cluster: 10.0.0.2:8080, 10.0.0.4:8080 local | local: 10.0.0.1:8080 local, 10.0.0.4:8080 local",
        ),
        case(
            "NodePort with ETP Cluster uses the narrowed cluster set",
            cat(&[web_np("trafficDistribution: PreferClose"), zoned()]),
            "fe 0.0.0.0:30080/TCP node-port default/web:http -> 10.0.0.1:8080 local, 10.0.0.3:8080
             fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.1:8080 local, 10.0.0.3:8080",
        ),
        case(
            "PreferSameNode: node hints first",
            cat(&[
                web("trafficDistribution: PreferSameNode"),
                web_slice(&[
                    ep_hints(
                        "10.0.0.1",
                        "node-a",
                        "",
                        "forNodes: [{name: node-a}], forZones: [{name: zone-a}]",
                    ),
                    ep_hints(
                        "10.0.0.3",
                        "node-c",
                        "",
                        "forNodes: [{name: node-c}], forZones: [{name: zone-a}]",
                    ),
                ]),
            ]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.1:8080 local",
        ),
        case(
            "PreferSameNode without node hints falls back to zone hints",
            cat(&[web("trafficDistribution: PreferSameNode"), zoned()]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.1:8080 local, 10.0.0.3:8080",
        ),
    ]);
}

#[test]
fn port_matching() {
    run_all(vec![
        case(
            "ports matched by name; the backend port is the slice's",
            cat(&[
                svc(
                    "web",
                    "clusterIP: 10.96.0.10, ports: [{name: http, port: 80}, {name: metrics, port: 9090}]",
                ),
                slice(
                    "web-1",
                    "web",
                    "[{name: metrics, port: 9100}, {name: admin, port: 7000}, {name: http, port: 8080}]",
                    &[ep("10.0.0.1", "node-b", "")],
                ),
            ]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.1:8080
             fe 10.96.0.10:9090/TCP cluster-ip default/web:metrics -> 10.0.0.1:9100",
        ),
        case(
            "unnamed service port matches empty and missing slice port names, not named ones",
            cat(&[
                svc("db", "clusterIP: 10.96.0.20, ports: [{port: 5432}]"),
                slice(
                    "db-1",
                    "db",
                    "[{name: '', port: 15432}]",
                    &[ep("10.0.0.1", "node-b", "")],
                ),
                slice(
                    "db-2",
                    "db",
                    "[{port: 15432}]",
                    &[ep("10.0.0.2", "node-b", "")],
                ),
                slice(
                    "db-3",
                    "db",
                    "[{name: pg, port: 15432}]",
                    &[ep("10.0.0.3", "node-b", "")],
                ),
            ]),
            "fe 10.96.0.20:5432/TCP cluster-ip default/db -> 10.0.0.1:15432, 10.0.0.2:15432",
        ),
        case(
            "protocol must match too",
            cat(&[
                svc(
                    "dns",
                    "clusterIP: 10.96.0.53, ports: [{name: dns, port: 53, protocol: UDP}, \
                     {name: dns-tcp, port: 53, protocol: TCP}, {name: odd, port: 99}]",
                ),
                slice(
                    "dns-1",
                    "dns",
                    "[{name: dns, port: 5353, protocol: UDP}, {name: dns-tcp, port: 5354}, \
                     {name: odd, port: 999, protocol: UDP}]",
                    &[ep("10.0.0.1", "node-b", "")],
                ),
            ]),
            "fe 10.96.0.53:53/TCP cluster-ip default/dns:dns-tcp -> 10.0.0.1:5354
             fe 10.96.0.53:53/UDP cluster-ip default/dns:dns -> 10.0.0.1:5353
             fe 10.96.0.53:99/TCP cluster-ip default/dns:odd -> none",
        ),
        case(
            "a slice port without number is skipped",
            cat(&[
                web(""),
                web_slice(&[]),
                slice(
                    "web-2",
                    "web",
                    "[{name: http}]",
                    &[ep("10.0.0.1", "node-b", "")],
                ),
            ]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> none",
        ),
    ]);
}

#[test]
fn slices_merge() {
    run_all(vec![
        case(
            "several slices merge; one address and port counts once, with its best conditions",
            cat(&[
                web(""),
                web_slice(&[ep("10.0.0.1", "node-a", ""), ep("10.0.0.2", "node-b", "unready")]),
                slice(
                    "web-2",
                    "web",
                    HTTP,
                    &[ep("10.0.0.1", "node-a", ""), ep("10.0.0.2", "node-b", ""), ep("10.0.0.3", "node-c", "")],
                ),
                slice("web-3", "web", "[{name: http, port: 8081}]", &[ep("10.0.0.1", "node-a", "")]),
            ]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.1:8080 local, 10.0.0.1:8081 local, 10.0.0.2:8080, 10.0.0.3:8080",
        ),
        case(
            "only slices of the same namespace and service name are linked",
            cat(&[
                web(""),
                slice("other-1", "other", HTTP, &[ep("10.0.0.9", "node-b", "")]),
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {name: web-x, namespace: elsewhere, labels: {kubernetes.io/service-name: web}}\n\
                 addressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.0.0.8]}]\n"
                    .to_string(),
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {name: web-unlabelled}\n\
                 addressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.0.0.7]}]\n"
                    .to_string(),
                web_slice(&[ep("10.0.0.1", "node-b", "")]),
            ]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.1:8080",
        ),
        case(
            "only an endpoint's first address is used",
            cat(&[
                web(""),
                web_slice(&["{addresses: [10.0.0.1, 10.0.0.2, 10.0.0.3]}".to_string()]),
            ]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.1:8080",
        ),
        case(
            "FQDN slices are ignored",
            cat(&[
                web(""),
                slice_of("FQDN", "web-f", "web", HTTP, &["{addresses: [db.example.com]}".to_string()]),
            ]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> none",
        ),
    ]);
}

#[test]
fn skipped_services() {
    let mut mine = case(
        "service-proxy-name equal to ours is handled",
        svc_meta(
            "name: web, labels: {service.kubernetes.io/service-proxy-name: mine}",
            "clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]",
        ),
        "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> none",
    );
    mine.service_proxy_name = Some("mine");
    let mut theirs = case(
        "service-proxy-name of another proxy is skipped even when we have a name",
        svc_meta(
            "name: web, labels: {service.kubernetes.io/service-proxy-name: theirs}",
            "clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]",
        ),
        "",
    );
    theirs.service_proxy_name = Some("mine");
    run_all(vec![
        case(
            "headless: nothing at all",
            cat(&[
                svc("h", "clusterIP: None, ports: [{name: http, port: 80}]"),
                slice("h-1", "h", HTTP, &[ep("10.0.0.1", "node-a", "")]),
            ]),
            "",
        ),
        case(
            "headless via clusterIPs",
            svc("h", "clusterIPs: [None], ports: [{name: http, port: 80}]"),
            "",
        ),
        case(
            "ExternalName: nothing, even with externalIPs",
            svc(
                "e",
                "type: ExternalName, externalName: db.example.com, externalIPs: [192.0.2.1], ports: [{port: 80}]",
            ),
            "",
        ),
        case(
            "service-proxy-name label: skipped when we have no name",
            svc_meta(
                "name: web, labels: {service.kubernetes.io/service-proxy-name: other}",
                "clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]",
            ),
            "",
        ),
        mine,
        theirs,
        case(
            "slices labelled headless are ignored",
            cat(&[
                web(""),
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {name: web-h, labels: {kubernetes.io/service-name: web, service.kubernetes.io/headless: ''}}\n\
                 addressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.0.0.1]}]\n"
                    .to_string(),
            ]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> none",
        ),
        case(
            "a Service without selector with hand-written slices works",
            cat(&[
                svc("external-database", "clusterIP: 10.96.0.30, ports: [{protocol: TCP, port: 80, targetPort: 9376}]"),
                slice(
                    "external-database-1",
                    "external-database",
                    "[{name: '', appProtocol: http, protocol: TCP, port: 9376}]",
                    &["{addresses: [\"10.4.5.6\", \"10.1.2.3\"]}".to_string()],
                ),
            ]),
            "fe 10.96.0.30:80/TCP cluster-ip default/external-database -> 10.4.5.6:9376",
        ),
    ]);
}

#[test]
fn dual_stack() {
    let dual = "clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10, 'fd00::10'], \
                ipFamilyPolicy: RequireDualStack, type: NodePort, \
                ports: [{name: http, port: 80, nodePort: 30080}]";
    run_all(vec![
        case(
            "frontends per family get backends of their family",
            cat(&[
                svc("web", dual),
                web_slice(&[ep("10.0.0.1", "node-a", "")]),
                slice_of(
                    "IPv6",
                    "web-v6",
                    "web",
                    HTTP,
                    &[ep("fd00:1::1", "node-b", "")],
                ),
            ]),
            "fe 0.0.0.0:30080/TCP node-port default/web:http -> 10.0.0.1:8080 local
             fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.1:8080 local
             fe [::]:30080/TCP node-port default/web:http -> [fd00:1::1]:8080
             fe [fd00::10]:80/TCP cluster-ip default/web:http -> [fd00:1::1]:8080",
        ),
        case(
            "terminating fallback is decided per family",
            cat(&[
                svc("web", dual),
                web_slice(&[
                    ep("10.0.0.1", "node-a", "term"),
                    ep("10.0.0.2", "node-b", "unready"),
                ]),
                slice_of(
                    "IPv6",
                    "web-v6",
                    "web",
                    HTTP,
                    &[
                        ep("fd00:1::1", "node-b", ""),
                        ep("fd00:1::2", "node-b", "term"),
                    ],
                ),
            ]),
            "fe 0.0.0.0:30080/TCP node-port default/web:http -> 10.0.0.1:8080 local terminating
             fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.1:8080 local terminating
             fe [::]:30080/TCP node-port default/web:http -> [fd00:1::1]:8080
             fe [fd00::10]:80/TCP cluster-ip default/web:http -> [fd00:1::1]:8080",
        ),
        case(
            "ipFamilies [IPv6, IPv4]: IPv6 primary, each family its own slices",
            cat(&[
                svc(
                    "web",
                    "clusterIP: 'fd00::10', clusterIPs: ['fd00::10', 10.96.0.10], \
                     ipFamilies: [IPv6, IPv4], ipFamilyPolicy: PreferDualStack, \
                     ports: [{name: http, port: 80}]",
                ),
                web_slice(&[ep("10.0.0.1", "node-b", "")]),
                slice_of("IPv6", "web-v6", "web", HTTP, &[ep("fd00:1::1", "node-a", "")]),
            ]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.1:8080
             fe [fd00::10]:80/TCP cluster-ip default/web:http -> [fd00:1::1]:8080 local
             ep default/web:http cluster: 10.0.0.1:8080, [fd00:1::1]:8080 local | local: [fd00:1::1]:8080 local",
        ),
        case(
            "an address not of its ipFamilies entry: the Service is skipped",
            svc(
                "web",
                "clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10, 'fd00::10'], \
                 ipFamilies: [IPv6, IPv4], ports: [{name: http, port: 80}]",
            ),
            "problem invalid_cluster_ip Service default/web",
        ),
        case(
            "clusterIPs beyond ipFamilies are skipped, with a problem",
            svc(
                "web",
                "clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10, 'fd00::10'], \
                 ipFamilies: [IPv4], ipFamilyPolicy: SingleStack, ports: [{name: http, port: 80}]",
            ),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> none
             problem invalid_cluster_ip Service default/web",
        ),
        case(
            "LB IPs and externalIPs of both families; source ranges per family",
            cat(&[
                svc(
                    "web",
                    "type: LoadBalancer, clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10, 'fd00::10'], \
                     ports: [{name: http, port: 80, nodePort: 30080}], \
                     externalIPs: [192.0.2.7, '2001:db8::7'], \
                     loadBalancerSourceRanges: [10.0.0.0/8, '2001:db8:1::/48']}, \
                     status: {loadBalancer: {ingress: [{ip: 198.51.100.9}, {ip: '2001:db8::9'}]}",
                ),
                web_slice(&[ep("10.0.0.1", "node-a", "")]),
                slice_of("IPv6", "web-v6", "web", HTTP, &[ep("fd00:1::1", "node-a", "")]),
            ]),
            "fe 0.0.0.0:30080/TCP node-port default/web:http -> 10.0.0.1:8080 local
             fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.1:8080 local
             fe 192.0.2.7:80/TCP external-ip default/web:http -> 10.0.0.1:8080 local
             fe 198.51.100.9:80/TCP load-balancer-ip default/web:http -> 10.0.0.1:8080 local | ranges 10.0.0.0/8
             fe [::]:30080/TCP node-port default/web:http -> [fd00:1::1]:8080 local
             fe [2001:db8::7]:80/TCP external-ip default/web:http -> [fd00:1::1]:8080 local
             fe [2001:db8::9]:80/TCP load-balancer-ip default/web:http -> [fd00:1::1]:8080 local \
                | ranges 2001:db8:1::/48
             fe [fd00::10]:80/TCP cluster-ip default/web:http -> [fd00:1::1]:8080 local",
        ),
        case(
            "ETP Local, ITP Local and affinity apply to each family on its own",
            cat(&[
                svc(
                    "web",
                    "type: NodePort, clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10, 'fd00::10'], \
                     ports: [{name: http, port: 80, nodePort: 30080}], \
                     externalTrafficPolicy: Local, internalTrafficPolicy: Local, \
                     sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 30}}",
                ),
                web_slice(&[ep("10.0.0.1", "node-a", ""), ep("10.0.0.2", "node-b", "")]),
                slice_of("IPv6", "web-v6", "web", HTTP, &[ep("fd00:1::2", "node-b", "")]),
            ]),
            "fe 0.0.0.0:30080/TCP node-port default/web:http local-only -> 10.0.0.1:8080 local \
                | internal: 10.0.0.1:8080 local, 10.0.0.2:8080 | affinity 30s
             fe 10.96.0.10:80/TCP cluster-ip default/web:http local-only -> 10.0.0.1:8080 local | affinity 30s
             fe [::]:30080/TCP node-port default/web:http local-only -> none \
                | internal: [fd00:1::2]:8080 | affinity 30s
             fe [fd00::10]:80/TCP cluster-ip default/web:http local-only -> none | drop-when-empty | affinity 30s",
        ),
        case(
            "IPv6 only: no IPv4 anywhere",
            cat(&[
                svc(
                    "web",
                    "clusterIP: 'fd00::10', clusterIPs: ['fd00::10'], ipFamilies: [IPv6], \
                     ipFamilyPolicy: SingleStack, type: NodePort, \
                     ports: [{name: http, port: 80, nodePort: 30080}, {name: dns, port: 53, protocol: UDP}]",
                ),
                slice_of(
                    "IPv6",
                    "web-v6",
                    "web",
                    "[{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}]",
                    &[ep("fd00:1::1", "node-a", ""), ep("fd00:1::2", "node-b", "unready")],
                ),
            ]),
            "fe [::]:30080/TCP node-port default/web:http -> [fd00:1::1]:8080 local
             fe [fd00::10]:53/UDP cluster-ip default/web:dns -> [fd00:1::1]:5353 local
             fe [fd00::10]:80/TCP cluster-ip default/web:http -> [fd00:1::1]:8080 local",
        ),
        case(
            "single-stack IPv6 service: NodePort on ::, IPv4 slices unused",
            cat(&[
                svc(
                    "web",
                    "clusterIP: 'fd00::10', type: NodePort, ports: [{name: http, port: 80, nodePort: 30080}]",
                ),
                web_slice(&[ep("10.0.0.1", "node-a", "")]),
            ]),
            "fe [::]:30080/TCP node-port default/web:http -> none
             fe [fd00::10]:80/TCP cluster-ip default/web:http -> none",
        ),
    ]);
}

#[test]
fn invalid_objects_are_skipped_alone() {
    let big: Vec<String> = (0..1001)
        .map(|i| format!("{{addresses: [10.1.{}.{}]}}", i / 250, i % 250 + 1))
        .collect();
    run_all(vec![
        case(
            "unparsable clusterIP skips that service only",
            cat(&[
                svc("bad", "clusterIP: 10.96.0.300, ports: [{port: 80}]"),
                web(""),
            ]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> none
             problem invalid_cluster_ip Service default/bad",
        ),
        case(
            "clusterIP disagreeing with clusterIPs, and two of one family",
            cat(&[
                svc(
                    "a",
                    "clusterIP: 10.96.0.1, clusterIPs: [10.96.0.2], ports: [{port: 80}]",
                ),
                svc(
                    "b",
                    "clusterIPs: [10.96.0.3, 10.96.0.4], ports: [{port: 80}]",
                ),
            ]),
            "problem invalid_cluster_ip Service default/a
             problem invalid_cluster_ip Service default/b",
        ),
        case(
            "missing clusterIP (nothing allocated one)",
            svc("nope", "ports: [{port: 80}]"),
            "problem missing_cluster_ip Service default/nope",
        ),
        case(
            "endpoint address that is not an IP, or not of the slice's family",
            cat(&[
                web(""),
                web_slice(&[
                    "{addresses: [not-an-ip]}".to_string(),
                    "{addresses: ['fd00::1']}".to_string(),
                    "{addresses: []}".to_string(),
                    ep("10.0.0.1", "node-b", ""),
                ]),
            ]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.1:8080
             problem invalid_endpoint_address EndpointSlice default/web-1
             problem invalid_endpoint_address EndpointSlice default/web-1
             problem invalid_endpoint_address EndpointSlice default/web-1",
        ),
        case(
            "ports 0 and above 65535 are skipped, the other port works",
            cat(&[
                svc(
                    "p",
                    "clusterIP: 10.96.0.40, type: NodePort, ports: [{name: zero, port: 0}, \
                     {name: big, port: 70000}, {name: ok, port: 80, nodePort: 70000}]",
                ),
                slice(
                    "p-1",
                    "p",
                    "[{name: ok, port: 8080}, {name: big, port: 0}, {name: zero, port: 65536}]",
                    &[ep("10.0.0.1", "node-b", "")],
                ),
            ]),
            "fe 10.96.0.40:80/TCP cluster-ip default/p:ok -> 10.0.0.1:8080
             problem invalid_port EndpointSlice default/p-1
             problem invalid_port EndpointSlice default/p-1
             problem invalid_port Service default/p
             problem invalid_port Service default/p
             problem invalid_port Service default/p",
        ),
        case(
            "a slice over 1000 endpoints is skipped, the other slice is used",
            cat(&[
                web(""),
                slice("web-big", "web", HTTP, &big),
                web_slice(&[ep("10.0.0.1", "node-b", "")]),
            ]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> 10.0.0.1:8080
             problem slice_too_large EndpointSlice default/web-big",
        ),
        case(
            "duplicate frontend: the first by namespace/name keeps it",
            cat(&[
                svc(
                    "zz",
                    "clusterIP: 10.96.0.10, ports: [{name: http, port: 80}, {name: other, port: 81}]",
                ),
                web(""),
            ]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> none
             fe 10.96.0.10:81/TCP cluster-ip default/zz:other -> none
             problem duplicate_frontend Service default/zz",
        ),
        case(
            "duplicate NodePort between services",
            cat(&[
                svc(
                    "a",
                    "clusterIP: 10.96.0.11, type: NodePort, ports: [{port: 80, nodePort: 30000}]",
                ),
                svc(
                    "b",
                    "clusterIP: 10.96.0.12, type: NodePort, ports: [{port: 80, nodePort: 30000}]",
                ),
            ]),
            "fe 0.0.0.0:30000/TCP node-port default/a -> none
             fe 10.96.0.11:80/TCP cluster-ip default/a -> none
             fe 10.96.0.12:80/TCP cluster-ip default/b -> none
             problem duplicate_frontend Service default/b",
        ),
        case(
            "SCTP and unknown protocols are skipped, TCP still works",
            cat(&[svc(
                "s",
                "clusterIP: 10.96.0.50, ports: [{name: sctp, port: 80, protocol: SCTP}, \
                     {name: odd, port: 81, protocol: QUIC}, {name: tcp, port: 80}]",
            )]),
            "fe 10.96.0.50:80/TCP cluster-ip default/s:tcp -> none
             problem unsupported_protocol Service default/s
             problem unsupported_protocol Service default/s",
        ),
        case(
            "two ports with one name",
            svc(
                "d",
                "clusterIP: 10.96.0.60, ports: [{name: x, port: 80}, {name: x, port: 81}]",
            ),
            "fe 10.96.0.60:80/TCP cluster-ip default/d:x -> none
             problem duplicate_port_name Service default/d",
        ),
        case(
            "invalid externalIP, and one of a family without cluster IP",
            web("externalIPs: [192.0.2.1, bogus, '2001:db8::1']"),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> none
             fe 192.0.2.1:80/TCP external-ip default/web:http -> none
             problem invalid_external_ip Service default/web
             problem wrong_ip_family Service default/web",
        ),
        case(
            "unknown addressType",
            cat(&[
                web(""),
                slice_of("IPv5", "web-5", "web", HTTP, &[ep("10.0.0.1", "", "")]),
            ]),
            "fe 10.96.0.10:80/TCP cluster-ip default/web:http -> none
             problem invalid_slice EndpointSlice default/web-5",
        ),
        case(
            "a Service without spec",
            "{apiVersion: v1, kind: Service, metadata: {name: bare}}\n".to_string(),
            "problem missing_spec Service default/bare",
        ),
    ]);
}

#[test]
fn duplicate_objects_in_model_input() {
    // The loader refuses duplicates already; the model copes on its own too.
    let objects = manifests::parse_str(&web(""), "x");
    let mut services = objects.services.clone();
    let mut second = services[0].clone();
    second.spec.as_mut().unwrap().cluster_ip = Some("10.96.0.99".into());
    services.push(second);
    let state = desired_state(&services, &[], &NodeInfo::default(), &Options::default());
    assert_eq!(state.frontends.len(), 1);
    assert_eq!(state.problems.len(), 1);
    assert_eq!(state.problems[0].kind.label(), "duplicate_object");
}

#[test]
fn seeds_work_as_written() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/seeds/app");
    let mut objects = manifests::load_dir(&dir).unwrap();
    assert!(objects.problems.is_empty(), "{:?}", objects.problems);
    let report = allocate::fill_in(&mut objects.services, &allocate::AllocConfig::default());
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    let node = NodeInfo {
        name: "node-a".into(),
        zone: None,
    };
    let state = desired_state(
        &objects.services,
        &objects.slices,
        &node,
        &Options::default(),
    );
    // The allocated addresses are part of the expectation on purpose: they
    // must not change between releases (a new address breaks connections).
    let got = render(&state);
    let want = [
        "fe 0.0.0.0:31000/TCP node-port default/frontend-service -> none",
        "fe 10.98.157.3:80/TCP cluster-ip default/external-database -> 10.4.5.6:9376",
        "fe 10.106.198.109:80/TCP cluster-ip default/backend-service -> none",
        "fe 10.111.167.115:80/TCP cluster-ip default/frontend-service -> none",
        "ep default/backend-service cluster: none | local: none",
        "ep default/external-database cluster: 10.4.5.6:9376 | local: none",
        "ep default/frontend-service cluster: none | local: none",
    ];
    assert_eq!(got, want, "\n{}", got.join("\n"));
}
