//! The container image, run by podman the way deploy/kube-ebpf-proxy.yaml
//! runs it: the DaemonSet's command, args, capabilities, seccomp profile,
//! read-only root, config file and bpffs mount are read from the shipped
//! manifest and turned into `podman run` options. The container joins
//! node-a's network namespace (hostNetwork), mounts the lab's bpffs where
//! the host's /sys/fs/bpf would be, reads its objects from the stand-in API
//! server with a kubeconfig holding a bearer token, and then real traffic
//! goes through a ClusterIP and a NodePort.
//!
//! The image is the archive `cargo xtask image` builds (KEP_IMAGE, or its
//! default path); `cargo xtask test` builds it before the lab tests. podman
//! keeps everything (storage, state, config) under the lab's directory, and
//! the containers and the image are removed when the test ends.

use std::{
    fs,
    io::{ErrorKind, Read, Write},
    net::{SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use common::*;
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Container, PodSpec},
};
use lab::{Netns, Signal, addr, apiserver::ApiServer, tcp_request, udp_request};
use serde::Deserialize;
use serde_json::{Value, json};

mod common;

/// The runtime's default seccomp profile (containers-common), which podman
/// applies for Kubernetes' `RuntimeDefault`.
const RUNTIME_DEFAULT_SECCOMP: &str = "/usr/share/containers/seccomp.json";
/// In the kubeconfig given to the daemon: must never show up in its log.
const TOKEN: &str = "kep-test-token-3f9c1e7a5b2d4068";
const NODE: &str = addr::NODE_A;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The image archive, or None (after a note) when there is none outside CI.
fn image_archive() -> Option<PathBuf> {
    let path = std::env::var_os("KEP_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/image/kube-ebpf-proxy.oci.tar"));
    if path.exists() {
        return Some(path);
    }
    let why = format!("no image at {}: run `cargo xtask image`", path.display());
    skip_or_fail(&why);
    None
}

/// A test that cannot run: fails in CI, skips with a note elsewhere.
fn skip_or_fail(why: &str) {
    let in_ci = std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    assert!(!in_ci, "{why} (a test that cannot run fails in CI)");
    eprintln!("skipping: {why}");
}

/// podman with everything it keeps under one directory of the lab.
struct Podman {
    dir: PathBuf,
}

impl Podman {
    /// Checks that podman runs at all.
    fn new(dir: PathBuf) -> Result<Podman> {
        fs::create_dir_all(&dir)?;
        // crun refuses this machine's hybrid cgroups; runc with cgroupfs
        // works. No default ulimits: the daemon needs none.
        fs::write(
            dir.join("containers.conf"),
            "[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = \"runc\"\n\
             cgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
        )?;
        let podman = Podman { dir };
        podman.run(&["version", "--format", "{{.Client.Version}}"])?;
        Ok(podman)
    }

    /// `env CONTAINERS_CONF=... podman <global options>`: program and
    /// arguments, so the lab can start it in a namespace.
    fn argv(&self) -> Vec<String> {
        let at = |p: &str| self.dir.join(p).display().to_string();
        [
            format!("CONTAINERS_CONF={}", at("containers.conf")),
            "podman".into(),
            "--root".into(),
            at("root"),
            "--runroot".into(),
            at("run"),
            "--tmpdir".into(),
            at("tmp"),
            "--network-config-dir".into(),
            at("net"),
            "--storage-driver".into(),
            "vfs".into(),
        ]
        .into()
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("env")
            .args(self.argv())
            .args(args)
            .output()
            .context("running podman (cargo xtask setup installs it)")?;
        ensure!(
            out.status.success(),
            "podman {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Containers first (they hold the image), then the image; the
        // directory itself goes with the lab's.
        for args in [
            &["rm", "--all", "--force", "--time", "2"][..],
            &["rmi", "--all", "--force"][..],
        ] {
            if let Err(e) = self.run(args) {
                eprintln!("podman cleanup: {e:#}");
            }
        }
    }
}

/// The shipped manifest's DaemonSet pod and its ConfigMap.
fn shipped_daemonset() -> (PodSpec, ConfigMap) {
    let text = fs::read_to_string(repo().join("deploy/kube-ebpf-proxy.yaml")).unwrap();
    let mut pod = None;
    let mut config = None;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value = Value::deserialize(doc).unwrap();
        match value["kind"].as_str() {
            Some("DaemonSet") => {
                let ds: DaemonSet = serde_json::from_value(value).unwrap();
                pod = ds.spec.unwrap().template.spec;
            }
            Some("ConfigMap") => config = Some(serde_json::from_value(value).unwrap()),
            _ => {}
        }
    }
    (pod.expect("a DaemonSet"), config.expect("a ConfigMap"))
}

/// The runtime's default profile with what current runtimes add for
/// CAP_BPF and CAP_PERFMON (containerd since 1.6.x, Docker since 23.0):
/// bpf(2) and perf_event_open(2) allowed to a container holding them. The
/// containers-common release here still asks for CAP_SYS_ADMIN.
fn runtime_default_with_cap_bpf() -> Value {
    let text = fs::read_to_string(RUNTIME_DEFAULT_SECCOMP).unwrap();
    let mut profile: Value = serde_json::from_str(&text).unwrap();
    let gated = [("bpf", "CAP_BPF"), ("perf_event_open", "CAP_PERFMON")];
    let rules = profile["syscalls"].as_array_mut().unwrap();
    // The existing rules keep their meaning for CAP_SYS_ADMIN; the EPERM
    // rule for everyone else must not shadow the new allowance.
    for rule in rules.iter_mut() {
        let errno = rule["action"] == "SCMP_ACT_ERRNO";
        let names = rule["names"].as_array_mut().unwrap();
        names.retain(|n| !(errno && gated.iter().any(|(s, _)| n == *s)));
    }
    rules.retain(|r| !r["names"].as_array().unwrap().is_empty());
    for (syscall, cap) in gated {
        rules.push(json!({
            "names": [syscall],
            "action": "SCMP_ACT_ALLOW",
            "includes": {"caps": [cap]},
        }));
    }
    profile
}

/// Host directories standing in for the node's, by hostPath.
struct Host {
    dir: PathBuf,
    bpffs: PathBuf,
    netns: PathBuf,
}

/// `podman run` options for the DaemonSet's container, as the kubelet
/// would set it up, and the container's arguments.
fn run_options(pod: &PodSpec, config: &ConfigMap, host: &Host) -> (Vec<String>, Vec<String>) {
    assert_eq!(pod.containers.len(), 1);
    let c = &pod.containers[0];
    let mut opts = vec!["--network".to_string()];
    assert_eq!(pod.host_network, Some(true));
    opts.push(format!("ns:{}", host.netns.display()));
    opts.extend(security_options(pod, c, &host.dir));
    opts.extend(volume_options(pod, c, config, host));
    opts.extend(env_options(c));
    let entrypoint = c.command.as_ref().unwrap();
    assert_eq!(entrypoint.len(), 1);
    opts.extend(["--entrypoint".into(), entrypoint[0].clone()]);
    let args = c.args.iter().flatten();
    let args = args.map(|a| a.replace("$(NODE_NAME)", NODE)).collect();
    (opts, args)
}

fn security_options(pod: &PodSpec, c: &Container, dir: &Path) -> Vec<String> {
    let sc = c.security_context.as_ref().unwrap();
    assert_ne!(sc.privileged, Some(true));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    let mut opts = vec!["--cap-drop=all".to_string()];
    for cap in caps.add.iter().flatten() {
        opts.push(format!("--cap-add=CAP_{cap}"));
    }
    if sc.read_only_root_filesystem == Some(true) {
        // Kubernetes adds no tmpfs to a read-only root; podman would.
        opts.extend(["--read-only".into(), "--read-only-tmpfs=false".into()]);
    }
    if sc.allow_privilege_escalation == Some(false) {
        opts.push("--security-opt=no-new-privileges".into());
    }
    if let Some(uid) = sc.run_as_user {
        opts.push(format!("--user={uid}"));
    }
    let seccomp = sc
        .seccomp_profile
        .as_ref()
        .or(pod
            .security_context
            .as_ref()
            .and_then(|s| s.seccomp_profile.as_ref()))
        .expect("a seccomp profile");
    assert_eq!(seccomp.type_, "RuntimeDefault");
    let profile = dir.join("seccomp-runtime-default.json");
    fs::write(&profile, runtime_default_with_cap_bpf().to_string()).unwrap();
    opts.push(format!("--security-opt=seccomp={}", profile.display()));
    opts
}

fn volume_options(pod: &PodSpec, c: &Container, config: &ConfigMap, host: &Host) -> Vec<String> {
    let mut opts = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == m.name)
            .unwrap();
        let source = if let Some(path) = &volume.host_path {
            assert_eq!(path.path, "/sys/fs/bpf", "the only hostPath");
            host.bpffs.clone()
        } else if let Some(cm) = &volume.config_map {
            assert_eq!(Some(&cm.name), config.metadata.name.as_ref());
            let dir = host.dir.join(format!("volume-{}", m.name));
            fs::create_dir_all(&dir).unwrap();
            for (key, text) in config.data.iter().flatten() {
                fs::write(dir.join(key), text).unwrap();
            }
            dir
        } else {
            panic!("volume {} of an unknown kind", volume.name)
        };
        let mut spec = format!("type=bind,src={},dst={}", source.display(), m.mount_path);
        if m.read_only == Some(true) {
            spec.push_str(",ro=true");
        }
        match m.mount_propagation.as_deref() {
            Some("HostToContainer") => spec.push_str(",bind-propagation=rslave"),
            None | Some("None") => {}
            Some(other) => panic!("mountPropagation {other} is not mapped"),
        }
        opts.extend(["--mount".into(), spec]);
    }
    opts
}

fn env_options(c: &Container) -> Vec<String> {
    let mut opts = Vec::new();
    for var in c.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(v), None) => v.clone(),
            (None, Some(from)) => {
                let field = from.field_ref.as_ref().unwrap();
                assert_eq!(field.field_path, "spec.nodeName");
                NODE.to_string()
            }
            _ => panic!("env {} of an unknown kind", var.name),
        };
        opts.extend(["--env".into(), format!("{}={value}", var.name)]);
    }
    opts
}

/// The kubeconfig the container reads: the stand-in API server, and a
/// bearer token.
fn write_kubeconfig(dir: &Path, api: &ApiServer) -> PathBuf {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: {}\n\
         users:\n- name: lab\n  user:\n    token: {TOKEN}\ncontexts:\n- name: lab\n  context:\n    \
         cluster: lab\n    user: lab\ncurrent-context: lab\n",
        api.url()
    );
    let kubeconfig = dir.join("kubeconfig");
    fs::write(&kubeconfig, text).unwrap();
    kubeconfig
}

fn apply_yaml(api: &ApiServer, yaml: &str) {
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = Value::deserialize(doc).unwrap();
        if !value.is_null() {
            api.apply_json(value).unwrap();
        }
    }
}

/// A plain HTTP/1.0 GET from inside `ns`: (status, body).
fn http_get(ns: &Netns, target: SocketAddrV4, path: &str) -> std::io::Result<(u16, String)> {
    ns.run(|| {
        let mut s = TcpStream::connect_timeout(&target.into(), Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {target}\r\n\r\n")?;
        let mut raw = String::new();
        s.read_to_string(&mut raw)?;
        let status = raw.split(' ').nth(1).and_then(|c| c.parse().ok());
        let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
        Ok((status.unwrap_or(0), body.unwrap_or_default()))
    })
}

/// The lab, the API server in the underlay, node-a's bpffs mounted.
fn lab_with_api_server() -> Option<(Cluster, ApiServer)> {
    let c = Cluster::build("container_image")?;
    let at = SocketAddrV4::new(addr::UNDERLAY_GATEWAY, 6443);
    let api = ApiServer::start_in(c.lab.ns(addr::UNDERLAY), at).expect("API server");
    apply_yaml(&api, &placement_manifests());
    let bpffs = c.bpffs(NODE);
    fs::create_dir(&bpffs).unwrap();
    nix::mount::mount(
        Some("bpf"),
        &bpffs,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .expect("mounting the lab's bpffs");
    Some((c, api))
}

/// podman for this lab, or None (after a note) when it cannot run here.
fn podman_in(c: &Cluster) -> Option<Podman> {
    match Podman::new(c.lab.dir().join("podman")) {
        Ok(p) => Some(p),
        Err(e) => {
            skip_or_fail(&format!("podman cannot run: {e:#}"));
            None
        }
    }
}

#[test]
fn the_image_runs_as_the_daemonset_does_and_serves_a_cluster_ip() -> Result<()> {
    let Some(archive) = image_archive() else {
        return Ok(());
    };
    let Some((mut c, api)) = lab_with_api_server() else {
        return Ok(());
    };
    let Some(podman) = podman_in(&c) else {
        return Ok(());
    };
    let t0 = Instant::now();
    podman.run(&["load", "--quiet", "--input", archive.to_str().unwrap()])?;
    eprintln!("image loaded in {:?}", t0.elapsed());

    let host = Host {
        dir: c.lab.dir().join("host"),
        bpffs: c.bpffs(NODE),
        netns: c.lab.ns(NODE).path().to_path_buf(),
    };
    fs::create_dir(&host.dir)?;
    let kubeconfig = write_kubeconfig(&host.dir, &api);
    let (pod, config) = shipped_daemonset();
    let (mut opts, mut args) = run_options(&pod, &config, &host);
    // The lab's deviation from a cluster: the API server is named by a
    // kubeconfig (a bearer token, plain HTTP) instead of in-cluster.
    opts.extend([
        "--mount".into(),
        format!(
            "type=bind,src={},dst=/etc/kubernetes/kubeconfig,ro=true",
            kubeconfig.display()
        ),
        // Everything the API client and its HTTP and TLS layers log, to
        // look for the token in.
        "--env".into(),
        "RUST_LOG=info,kube_client=trace,kube_runtime=trace,hyper=trace,hyper_util=trace,tower=trace,tower_http=trace,rustls=trace,h2=trace".into(),
    ]);
    args.push("--kubeconfig=/etc/kubernetes/kubeconfig".into());

    if runtime_default_gates_bpf_on_sys_admin() {
        refused_by_the_unmodified_runtime_default(&podman, &opts, &args)?;
    } else {
        eprintln!("this runtime's default profile already allows bpf(2) with CAP_BPF");
    }

    // A legacy rule on the input hook: with the DaemonSet's capabilities
    // the daemon must read the legacy table (and nftables) to find that
    // host routing bypasses nothing. One it could not read would turn host
    // routing off.
    let rule = ["-A", "INPUT", "-j", "ACCEPT"];
    let out = c.lab.ns(NODE).exec("iptables-legacy", &rule)?;
    ensure!(out.status.success(), "iptables-legacy: {out:?}");
    let t0 = Instant::now();
    start_container(&mut c, &podman, &opts, &args);
    eprintln!("container ready in {:?}", t0.elapsed());
    serves_traffic(&c);
    ports_reachable_as_documented(&c);
    pins_are_on_the_hosts_bpffs(&c);
    let log = c.lab.daemon_log(NODE);
    assert!(
        log.contains("no netfilter hook on the forwarding path has rules"),
        "host routing decided from the netfilter hooks read: {log}"
    );
    // Not vacuous: the API client's trace output is there.
    assert!(log.contains("\"target\":\"kube_client::client\""), "{log}");
    assert!(
        !log.contains(TOKEN),
        "the bearer token is in the daemon's log"
    );

    // A pod replaced or deleted: the datapath stays (pinned), traffic flows.
    let status = c.lab.stop_daemon(NODE, Signal::SIGTERM)?;
    assert!(status.success(), "the container exited with {status}");
    let reply = tcp_request(c.lab.ns(CLIENT_POD), sa("10.96.0.10:80"))?;
    assert!(reply.identity.starts_with("web-"));
    drop(podman);
    Ok(())
}

/// Whether the installed default profile allows bpf(2) only to holders of
/// CAP_SYS_ADMIN (containers-common before its CAP_BPF rule).
fn runtime_default_gates_bpf_on_sys_admin() -> bool {
    let text = fs::read_to_string(RUNTIME_DEFAULT_SECCOMP).unwrap();
    let profile: Value = serde_json::from_str(&text).unwrap();
    let allowing: Vec<&Value> = profile["syscalls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            r["action"] == "SCMP_ACT_ALLOW"
                && r["names"].as_array().unwrap().contains(&json!("bpf"))
        })
        .collect();
    !allowing.is_empty()
        && allowing
            .iter()
            .all(|r| r["includes"]["caps"] == json!(["CAP_SYS_ADMIN"]))
}

/// Without the CAP_BPF rule, the runtime's default profile (this
/// containers-common's) refuses bpf(2): the daemon must fail, clearly.
fn refused_by_the_unmodified_runtime_default(
    podman: &Podman,
    opts: &[String],
    args: &[String],
) -> Result<()> {
    // podman's own default profile applies when none is given.
    let opts = opts
        .iter()
        .filter(|o| !o.starts_with("--security-opt=seccomp="));
    let out = Command::new("env")
        .args(podman.argv())
        .args(["run", "--rm", "--timeout", "60"])
        .args(opts)
        .arg(kep_image())
        .args(args)
        .output()?;
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    ensure!(
        !out.status.success(),
        "the daemon ran under a profile that refuses bpf(2)"
    );
    ensure!(
        text.contains("Operation not permitted"),
        "the failure does not say why: {text}"
    );
    Ok(())
}

fn kep_image() -> &'static str {
    concat!("localhost/kube-ebpf-proxy:", env!("CARGO_PKG_VERSION"))
}

/// Starts the container in the foreground, through the lab (its output is
/// the node's daemon log), and waits for the daemon's first sync.
fn start_container(c: &mut Cluster, podman: &Podman, opts: &[String], args: &[String]) {
    let mut argv = podman.argv();
    argv.extend(["run".into(), "--rm".into(), "--name".into(), "kep".into()]);
    argv.extend(opts.iter().cloned());
    argv.push(kep_image().into());
    argv.extend(args.iter().cloned());
    c.lab.start_daemon(NODE, Path::new("env"), argv).unwrap();
    // logging.format is json in the shipped config.
    let ready = |c: &Cluster| c.lab.daemon_log(NODE).contains("\"message\":\"ready\"");
    if let Err(e) = c.lab.wait_for(
        "the daemon ready in its container",
        Duration::from_secs(60),
        || ready(c),
    ) {
        panic!("{e:#}\n--- log ---\n{}", c.lab.daemon_log(NODE));
    }
}

/// A pod on node-a reaches backends on both nodes through a ClusterIP, TCP
/// and UDP; an outside client reaches a remote backend through a NodePort.
fn serves_traffic(c: &Cluster) {
    let pod = c.lab.ns(CLIENT_POD);
    let hit = backends_hit(pod, sa("10.96.0.10:80"), 30);
    for b in BACKENDS {
        assert!(hit.contains_key(b.name), "{} not reached: {hit:?}", b.name);
    }
    assert_eq!(hit.values().sum::<u32>(), 30, "every connection answered");
    let reply = udp_request(pod, sa("10.96.0.11:80")).unwrap();
    assert_eq!(reply.identity, WEB_A.name);
    let node_port = SocketAddrV4::new(addr::NODE_A_IP, 30012);
    let reply = tcp_request(c.lab.ns(addr::CLIENT), node_port).unwrap();
    assert_eq!(reply.identity, WEB_B1.name);
}

/// Health on every address of the node, metrics on its loopback only (the
/// shipped config's bind addresses; docs/security.md).
fn ports_reachable_as_documented(c: &Cluster) {
    let outside = c.lab.ns(addr::CLIENT);
    let (status, body) = http_get(
        outside,
        SocketAddrV4::new(addr::NODE_A_IP, 10256),
        "/healthz",
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let err = http_get(
        outside,
        SocketAddrV4::new(addr::NODE_A_IP, 10249),
        "/metrics",
    )
    .expect_err("metrics are not served on the node's address");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    let (status, body) = http_get(c.lab.ns(NODE), sa("127.0.0.1:10249"), "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(
        body.contains("kube_ebpf_proxy_service_new_connections_total{"),
        "{body}"
    );
}

/// What the container pinned is in the host's bpffs: the host's own binary
/// reads it there.
fn pins_are_on_the_hosts_bpffs(c: &Cluster) {
    let pins = c.bpffs(NODE).join("kube-ebpf-proxy");
    let out = Command::new(daemon_bin())
        .args(["inspect", "services", "--bpffs"])
        .arg(&pins)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("10.96.0.10"), "{text}");
}
