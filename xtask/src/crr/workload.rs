//! The workload: the services (fillers and the measured one), the
//! kube-ebpf-proxy mode (daemons on both nodes) and the backend servers.
use std::ffi::OsStr;
use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use lab::{Lab, Signal, addr};

use crate::kube_proxy_rules::Service;

use super::{
    BACKEND_PORT, BACKENDS, CLIENT_IP, CLIENT_POD, VIP, cpu::Cpus, path_str, report::fmt_duration,
    server::FastServer,
};

/// Filler endpoints start here (10.244.3.0, above both nodes' pod CIDRs)
/// and use this many addresses before the port moves on.
const FILLER_EP_BASE: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 0);
const FILLER_EP_SPAN: u32 = 60_000;
const FILLER_ENDPOINTS: u32 = 10;
/// Filler ClusterIPs: 10.100.0.0 + i, inside the default 10.96.0.0/12.
const FILLER_VIP_BASE: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 0);

/// `n` services: `n - 1` fillers with 10 endpoints each, then the measured
/// one with the three real backends.
pub(super) fn service_set(n: usize) -> Vec<Service> {
    let mut services: Vec<Service> = (0..n.saturating_sub(1) as u32)
        .map(|i| {
            let first = i * FILLER_ENDPOINTS;
            // Addresses repeat every FILLER_EP_SPAN endpoints, with the next
            // port, so every (address, port) is distinct; a slice's
            // endpoints share one port, and FILLER_EP_SPAN is a multiple of
            // FILLER_ENDPOINTS, so a service never straddles two ports.
            let port = BACKEND_PORT + (first / FILLER_EP_SPAN) as u16;
            Service {
                namespace: "bench".into(),
                name: format!("filler-{i:05}"),
                port_name: "http".into(),
                cluster_ip: Ipv4Addr::from(u32::from(FILLER_VIP_BASE) + i),
                port: 80,
                endpoints: (0..FILLER_ENDPOINTS)
                    .map(|j| {
                        let host = (first % FILLER_EP_SPAN) + j;
                        SocketAddrV4::new(Ipv4Addr::from(u32::from(FILLER_EP_BASE) + host), port)
                    })
                    .collect(),
            }
        })
        .collect();
    services.push(Service {
        namespace: "bench".into(),
        name: "web".into(),
        port_name: "http".into(),
        cluster_ip: *VIP.ip(),
        port: VIP.port(),
        endpoints: BACKENDS
            .iter()
            .map(|(_, _, ip)| SocketAddrV4::new(*ip, BACKEND_PORT))
            .collect(),
    });
    services
}

/// Services and EndpointSlices as one JSON `List` (hand-written: plain
/// ASCII names and addresses need no escaping).
pub(super) fn manifests_json(services: &[Service]) -> String {
    let mut items = Vec::with_capacity(services.len() * 2);
    for s in services {
        let target = s.endpoints.first().map_or(BACKEND_PORT, SocketAddrV4::port);
        items.push(format!(
            r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"{name}","namespace":"{ns}"}},"spec":{{"clusterIP":"{vip}","ports":[{{"name":"{pn}","protocol":"TCP","port":{port},"targetPort":{target}}}]}}}}"#,
            name = s.name,
            ns = s.namespace,
            vip = s.cluster_ip,
            pn = s.port_name,
            port = s.port,
        ));
        let endpoints: Vec<String> = s
            .endpoints
            .iter()
            .map(|ep| {
                let node = BACKENDS.iter().find(|(_, _, ip)| ip == ep.ip()).map_or(
                    if u32::from(*ep.ip()) % 2 == 0 {
                        addr::NODE_A
                    } else {
                        addr::NODE_B
                    },
                    |b| b.0,
                );
                format!(r#"{{"addresses":["{}"],"nodeName":"{node}"}}"#, ep.ip())
            })
            .collect();
        items.push(format!(
            r#"{{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{{"name":"{name}-1","namespace":"{ns}","labels":{{"kubernetes.io/service-name":"{name}"}}}},"addressType":"IPv4","ports":[{{"name":"{pn}","protocol":"TCP","port":{target}}}],"endpoints":[{eps}]}}"#,
            name = s.name,
            ns = s.namespace,
            pn = s.port_name,
            eps = endpoints.join(","),
        ));
    }
    format!(
        "{{\"apiVersion\":\"v1\",\"kind\":\"List\",\"items\":[\n{}\n]}}\n",
        items.join(",\n")
    )
}

pub(super) fn bpffs_of(lab: &Lab, node: &str) -> PathBuf {
    lab.dir().join(format!("{node}-bpffs"))
}

/// Starts the daemon on both nodes and waits until node-a has programmed
/// its maps and attached. Returns the load-time cell: the map write time
/// the daemon logs for its first sync, and the wall time from start to
/// ready (which includes loading the BPF programs and parsing manifests).
/// `flags` are extra `run` flags (`--socket-lb=false`: every connection
/// takes the per-packet path).
pub(super) fn start_ebpf(
    lab: &mut Lab,
    daemon: &Path,
    services: &[Service],
    flags: &[&str],
) -> Result<String> {
    let dir = lab.dir().join("manifests");
    fs::create_dir(&dir)?;
    fs::write(dir.join("services.json"), manifests_json(services))?;
    let started = Instant::now();
    for node in addr::NODES {
        let bpffs = bpffs_of(lab, node);
        lab.start_daemon(
            node,
            daemon,
            [
                "run".as_ref(),
                "--manifests".as_ref(),
                dir.as_os_str(),
                "--hostname-override".as_ref(),
                node.as_ref(),
                "--bpffs".as_ref(),
                bpffs.as_os_str(),
            ]
            .into_iter()
            .chain(flags.iter().map(OsStr::new)),
        )?;
    }
    let mut ready_after = None;
    lab.wait_for(
        "kube-ebpf-proxy synced and ready on node-a",
        Duration::from_secs(120),
        || {
            let log = lab.daemon_log(addr::NODE_A);
            let ready = log.contains(" synced ") && log.contains(" ready ");
            if ready {
                ready_after = Some(started.elapsed());
            }
            ready
        },
    )?;
    lab.wait_for(
        "kube-ebpf-proxy ready on node-b",
        Duration::from_secs(120),
        || lab.daemon_log(addr::NODE_B).contains(" ready "),
    )?;
    let log = lab.daemon_log(addr::NODE_A);
    // What the mode measures depends on it: say it beside the figures.
    if let Some(line) = log.lines().find(|l| l.contains("BPF host routing ")) {
        let said = line
            .split_once("BPF host routing ")
            .map_or(line, |(_, s)| s);
        println!("    node-a: BPF host routing {said}");
    }
    let sync_us: u64 = log
        .lines()
        .find(|l| l.contains(" synced "))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("took_us="))
        })
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no took_us in the daemon's synced line:\n{log}"))?;
    Ok(format!(
        "{} maps (ready in {})",
        fmt_duration(Duration::from_micros(sync_us)),
        fmt_duration(ready_after.unwrap_or_default())
    ))
}

pub(super) fn stop_ebpf(lab: &mut Lab, daemon: &Path) -> Result<()> {
    for node in addr::NODES {
        let status = lab.stop_daemon(node, Signal::SIGTERM)?;
        ensure!(status.success(), "daemon on {node} exited with {status}");
        let bpffs = bpffs_of(lab, node);
        lab.ns(node).exec(
            path_str(daemon)?,
            &["cleanup", "--bpffs", path_str(&bpffs)?],
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The lab the servers run in.

/// A lab with three backend pods running [`FastServer`]s and a client pod.
/// Servers are declared first so they stop before the lab is torn down.
pub(super) struct BenchLab {
    servers: Vec<FastServer>,
    pub(super) lab: Lab,
}

impl BenchLab {
    pub(super) fn new(cpus: &Cpus) -> Result<BenchLab> {
        let mut lab = Lab::new().context("building the lab (needs root)")?;
        let mut servers = Vec::new();
        for (index, (node, name, ip)) in (0u8..).zip(BACKENDS) {
            lab.add_pod_with_ip(node, name, ip)?;
            let at = SocketAddrV4::new(ip, BACKEND_PORT);
            servers.push(FastServer::start(lab.ns(name), at, index, cpus.server)?);
        }
        lab.add_pod_with_ip(addr::NODE_A, CLIENT_POD, CLIENT_IP)?;
        // The client pod's own namespace: reusing TIME_WAIT ports is its
        // business (the client normally has none, see the module docs).
        lab.ns(CLIENT_POD)
            .set_sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        Ok(BenchLab { servers, lab })
    }

    pub(super) fn served(&self) -> Vec<u64> {
        self.servers.iter().map(FastServer::served).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_set_shape() {
        let s = service_set(10_000);
        assert_eq!(s.len(), 10_000);
        assert_eq!(s.last().unwrap().cluster_ip, *VIP.ip());
        assert_eq!(s.last().unwrap().endpoints.len(), 3);
        let mut eps = std::collections::BTreeSet::new();
        for svc in &s[..s.len() - 1] {
            assert_eq!(svc.endpoints.len(), 10);
            // One port per slice.
            assert!(
                svc.endpoints
                    .iter()
                    .all(|e| e.port() == svc.endpoints[0].port())
            );
            for e in &svc.endpoints {
                // Never one of the real pods, always in the cluster CIDR.
                assert!(u32::from(*e.ip()) >= u32::from(FILLER_EP_BASE));
                assert_eq!(e.ip().octets()[..2], [10, 244]);
                assert!(eps.insert(*e), "{e} twice");
            }
        }
        assert_eq!(service_set(1).len(), 1);
    }

    #[test]
    fn manifests_are_one_list() {
        let text = manifests_json(&service_set(3));
        assert!(text.starts_with("{\"apiVersion\":\"v1\",\"kind\":\"List\""));
        assert_eq!(text.matches("\"kind\":\"Service\"").count(), 3);
        assert_eq!(text.matches("\"kind\":\"EndpointSlice\"").count(), 3);
        assert!(text.contains(r#"{"addresses":["10.244.1.11"],"nodeName":"node-a"}"#));
        assert!(text.contains(r#""clusterIP":"10.96.10.10""#));
    }
}
