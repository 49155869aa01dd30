//! The lab fixture for kube-ebpf-proxy tests: backends serving in pods on
//! both nodes, a client pod, a manifest directory and the daemon running
//! in both node namespaces.
#![allow(dead_code)] // each test binary uses a different part

use std::{
    collections::BTreeMap,
    fs,
    io::{Read, Write},
    net::{SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result};
use lab::{
    Lab, Netns, TcpServer, UdpServer, addr, apiserver::ApiServer, require_root_or_skip, tcp_request,
};
use serde::Deserialize;

pub fn daemon_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("KEP_BIN") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/kube-ebpf-proxy");
    assert!(
        p.exists(),
        "{} is missing: run `cargo xtask test` (or set KEP_BIN)",
        p.display()
    );
    p
}

/// Whether the lab's daemons run with socket-level load balancing: on,
/// unless the test run sets KEP_SOCKET_LB=false (the daemons inherit it).
pub fn socket_lb_on() -> bool {
    std::env::var("KEP_SOCKET_LB").map_or(true, |v| v != "false")
}

pub fn sa(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

/// A backend pod: where it runs, its name, its IP.
pub struct Backend {
    pub node: &'static str,
    pub name: &'static str,
    pub ip: &'static str,
}

/// A Service with its EndpointSlice, in manifest YAML.
pub struct Svc<'a> {
    pub name: &'a str,
    pub cluster_ip: &'a str,
    pub port: u16,
    pub target: u16,
    pub protocol: &'a str,
    pub node_port: Option<u16>,
    /// (backend, ready)
    pub endpoints: Vec<(&'a Backend, bool)>,
}

impl Svc<'_> {
    pub fn yaml(&self) -> String {
        let svc_type = if self.node_port.is_some() {
            "NodePort"
        } else {
            "ClusterIP"
        };
        let node_port = self
            .node_port
            .map(|p| format!("\n      nodePort: {p}"))
            .unwrap_or_default();
        let mut endpoints = String::new();
        for (b, ready) in &self.endpoints {
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
  type: {svc_type}
  clusterIP: {ip}
  ports:
    - name: main
      protocol: {proto}
      port: {port}
      targetPort: {target}{node_port}
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
    protocol: {proto}
    port: {target}
endpoints:
{endpoints}",
            name = self.name,
            ip = self.cluster_ip,
            proto = self.protocol,
            port = self.port,
            target = self.target,
        )
    }
}

/// A lab with backends serving, the daemon's manifest directory, and
/// daemons started on both nodes.
pub struct Cluster {
    pub lab: Lab,
    pub manifests: PathBuf,
    /// Where the daemons read objects: `--manifests DIR` or `--master URL`.
    pub source_args: Vec<String>,
    /// Extra `run` arguments for every daemon start.
    pub extra_args: Vec<String>,
    _tcp: Vec<TcpServer>,
    _udp: Vec<UdpServer>,
}

pub const WEB_A: Backend = Backend {
    node: addr::NODE_A,
    name: "web-a",
    ip: "10.244.1.11",
};
pub const WEB_B1: Backend = Backend {
    node: addr::NODE_B,
    name: "web-b1",
    ip: "10.244.2.11",
};
pub const WEB_B2: Backend = Backend {
    node: addr::NODE_B,
    name: "web-b2",
    ip: "10.244.2.12",
};
pub const BACKENDS: [&Backend; 3] = [&WEB_A, &WEB_B1, &WEB_B2];
/// Client pod on node-a.
pub const CLIENT_POD: &str = "client-a";
pub const CLIENT_POD_IP: &str = "10.244.1.50";

impl Cluster {
    /// Builds the lab, starts TCP and UDP servers on port 8080 in every
    /// backend, writes `manifests` and starts the daemons.
    pub fn start(test: &str, manifests: &str) -> Option<Cluster> {
        Cluster::start_with(test, manifests, &[])
    }

    pub fn start_with(test: &str, manifests: &str, extra_args: &[&str]) -> Option<Cluster> {
        let mut c = Cluster::build(test)?;
        c.extra_args = extra_args.iter().map(|s| s.to_string()).collect();
        c.write_manifests(manifests);
        c.start_daemons();
        Some(c)
    }

    /// The lab with pods and servers, no daemon yet; the daemons will read
    /// the manifest directory unless `source_args` says otherwise.
    pub fn build(test: &str) -> Option<Cluster> {
        if !require_root_or_skip(test) {
            return None;
        }
        let mut lab = Lab::new().expect("lab");
        let mut tcp = Vec::new();
        let mut udp = Vec::new();
        for b in BACKENDS {
            lab.add_pod_with_ip(b.node, b.name, b.ip.parse().unwrap())
                .unwrap();
            let at = SocketAddrV4::new(b.ip.parse().unwrap(), 8080);
            tcp.push(TcpServer::start(lab.ns(b.name), at, b.name).unwrap());
            udp.push(UdpServer::start(lab.ns(b.name), at, b.name).unwrap());
        }
        lab.add_pod_with_ip(addr::NODE_A, CLIENT_POD, CLIENT_POD_IP.parse().unwrap())
            .unwrap();
        let dir = lab.dir().join("manifests");
        fs::create_dir(&dir).unwrap();
        Some(Cluster {
            source_args: vec!["--manifests".into(), dir.display().to_string()],
            lab,
            manifests: dir,
            extra_args: Vec::new(),
            _tcp: tcp,
            _udp: udp,
        })
    }

    pub fn start_daemons(&mut self) {
        for node in addr::NODES {
            self.start_daemon(node);
        }
    }

    pub fn bpffs(&self, node: &str) -> PathBuf {
        self.lab.dir().join(format!("{node}-bpffs"))
    }

    pub fn start_daemon(&mut self, node: &str) {
        self.start_daemon_bin(node, &daemon_bin());
    }

    /// The arguments every daemon of `node` gets.
    pub fn daemon_args(&self, node: &str) -> Vec<String> {
        let args = [
            "run".to_string(),
            "--hostname-override".into(),
            node.into(),
            "--bpffs".into(),
            self.bpffs(node).display().to_string(),
        ];
        // A fast safety poll, unless the test sets its own (to prove that
        // notifications alone do the work).
        let poll = ["--poll-interval-ms".to_string(), "100".into()];
        let own_poll = self.extra_args.iter().any(|a| a == "--poll-interval-ms");
        args.into_iter()
            .chain(poll.into_iter().filter(|_| !own_poll))
            .chain(self.source_args.iter().cloned())
            .chain(self.extra_args.iter().cloned())
            .collect()
    }

    /// Starts `bin` (another build of the daemon) as `node`'s daemon and
    /// waits until it is ready.
    pub fn start_daemon_bin(&mut self, node: &str, bin: &Path) {
        let args = self.daemon_args(node);
        // The log is appended across restarts: wait for one more "ready".
        let ready = |c: &Cluster| c.lab.daemon_log(node).matches(" ready ").count();
        let before = ready(self);
        self.lab.start_daemon(node, bin, args).unwrap();
        if let Err(e) = self
            .lab
            .wait_for("daemon ready", Duration::from_secs(10), || {
                ready(self) > before
            })
        {
            panic!("{e:#}\n--- {node} log ---\n{}", self.lab.daemon_log(node));
        }
    }

    /// Replaces the manifest directory's content atomically (write, rename).
    pub fn write_manifests(&self, text: &str) {
        let tmp = self.manifests.with_extension("tmp");
        fs::write(&tmp, text).unwrap();
        fs::rename(&tmp, self.manifests.join("services.yaml")).unwrap();
    }

    pub fn logs(&self) -> String {
        addr::NODES
            .iter()
            .map(|n| format!("--- {n} ---\n{}", self.lab.daemon_log(n)))
            .collect()
    }

    /// The datapath's counters on `node` (`inspect stats`), by name.
    pub fn counters(&self, node: &str) -> BTreeMap<String, u64> {
        let out = self
            .cli(node, &["inspect", "stats", "-o", "json"])
            .expect("inspect stats: the daemon must answer");
        let rows: Vec<serde_json::Value> = serde_json::from_str(&out).expect("stats json");
        // Counter rows, then the maps' fill rows (no `counter`).
        rows.iter()
            .filter_map(|r| Some((r["counter"].as_str()?.to_string(), r["packets"].as_u64()?)))
            .collect()
    }

    pub fn cli(&self, node: &str, args: &[&str]) -> Result<String> {
        let bpffs = self.bpffs(node).display().to_string();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--bpffs", &bpffs]);
        let out = self
            .lab
            .ns(node)
            .exec(daemon_bin().to_str().unwrap(), &all)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

pub fn web(endpoints: Vec<(&Backend, bool)>, cluster_ip: &str, node_port: Option<u16>) -> String {
    let mut out = String::new();
    for proto in ["TCP", "UDP"] {
        out.push_str(
            &Svc {
                // One Service per cluster IP and protocol.
                name: &format!(
                    "web-{}-{}",
                    cluster_ip.rsplit('.').next().unwrap(),
                    proto.to_lowercase()
                ),
                cluster_ip,
                port: 80,
                target: 8080,
                protocol: proto,
                node_port,
                endpoints: endpoints.clone(),
            }
            .yaml(),
        );
        out.push_str("---\n");
    }
    out
}

/// Services of the basic tests: one per backend placement.
pub fn placement_manifests() -> String {
    [
        web(vec![(&WEB_A, true)], "10.96.0.11", Some(30011)),
        web(vec![(&WEB_B1, true)], "10.96.0.12", Some(30012)),
        web(
            vec![(&WEB_A, true), (&WEB_B1, true), (&WEB_B2, true)],
            "10.96.0.10",
            Some(30010),
        ),
    ]
    .concat()
}

/// Sends `n` new connections and returns which backends answered.
pub fn backends_hit(ns: &lab::Netns, vip: SocketAddrV4, n: usize) -> BTreeMap<String, u32> {
    let mut hit = BTreeMap::new();
    for _ in 0..n {
        if let Ok(r) = tcp_request(ns, vip) {
            *hit.entry(r.identity).or_default() += 1;
        }
    }
    hit
}

/// A plain HTTP/1.0 GET from inside `ns`: (status, headers and body
/// split at the blank line).
pub fn http_get_full(
    ns: &Netns,
    target: SocketAddrV4,
    path: &str,
) -> Result<(u16, String, String)> {
    ns.run(|| -> Result<(u16, String, String)> {
        let mut s = TcpStream::connect_timeout(&target.into(), Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {target}\r\n\r\n")?;
        let mut raw = String::new();
        s.read_to_string(&mut raw)?;
        let (head, body) = raw.split_once("\r\n\r\n").context("no HTTP header end")?;
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("no status code")?;
        Ok((status, head.to_string(), body.to_string()))
    })
}

/// A plain HTTP/1.0 GET from inside `ns`: (status, body).
pub fn http_get(ns: &Netns, target: SocketAddrV4, path: &str) -> Result<(u16, String)> {
    http_get_full(ns, target, path).map(|(status, _, body)| (status, body))
}

/// Every document of a manifest string, to the API server.
pub fn apply_yaml(api: &ApiServer, yaml: &str) {
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_json::Value::deserialize(doc).expect("valid YAML");
        if !value.is_null() {
            api.apply_json(value).expect("apply");
        }
    }
}

/// The lab with daemons watching a stand-in API server that holds `yaml`.
pub fn start_with_api(test: &str, yaml: &str) -> Option<(Cluster, ApiServer)> {
    let mut c = Cluster::build(test)?;
    let at = SocketAddrV4::new(addr::UNDERLAY_GATEWAY, 6443);
    let api = ApiServer::start_in(c.lab.ns(addr::UNDERLAY), at).expect("API server");
    apply_yaml(&api, yaml);
    c.source_args = vec!["--master".into(), api.url()];
    c.start_daemons();
    Some((c, api))
}

/// A sink on `at` in `ns`: reads each connection to its end and answers
/// with the byte count.
pub fn byte_counting_server(ns: &Netns, at: std::net::SocketAddr) -> std::net::TcpListener {
    let listener = ns
        .run(|| std::net::TcpListener::bind(at))
        .expect("bind the sink");
    let accepting = listener.try_clone().unwrap();
    std::thread::spawn(move || {
        for conn in accepting.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut buf = [0u8; 65536];
                let mut total = 0usize;
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    total += n;
                }
                let _ = write!(conn, "{total}");
            });
        }
    });
    listener
}

/// Path MTU discovery through `vip` on node-a: its underlay link gets an
/// MTU of 1280, and the client pod uploads 256 KiB through `vip` to a sink
/// in WEB_B1's pod at `sink`, with real 1500-byte frames (segmentation
/// offload's large packets, which veths carry whatever the MTU, are turned
/// off). Panics unless every byte arrives.
pub fn upload_over_a_1280_byte_link(
    c: &Cluster,
    vip: std::net::SocketAddr,
    sink: std::net::SocketAddr,
) {
    let _sink = byte_counting_server(c.lab.ns(WEB_B1.name), sink);
    c.lab
        .ns(addr::NODE_A)
        .ip(&["link", "set", "eth0", "mtu", "1280"])
        .unwrap();
    c.lab
        .ns(CLIENT_POD)
        .ip(&["link", "set", "eth0", "gso_max_segs", "1"])
        .unwrap();
    let sent = 256 * 1024;
    let started = std::time::Instant::now();
    let got = c.lab.ns(CLIENT_POD).run(|| -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(15)))?;
        s.set_write_timeout(Some(Duration::from_secs(15)))?;
        s.write_all(&vec![7u8; sent])?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)?;
        Ok(reply)
    });
    let got = got.unwrap_or_else(|e| panic!("upload through {vip}: {e}\n{}", c.logs()));
    eprintln!(
        "{sent} bytes through a 1280-byte link in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(got, sent.to_string(), "every byte arrived");
}
