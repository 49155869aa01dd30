//! Control-plane figures: programming 10,000 Services x 10 endpoints from
//! empty, the latency of one EndpointSlice change with 10,000 Services
//! present, and the daemon's memory at 10,000 and 50,000 Services.
//!
//! The first two run the daemon's own path in-process (objects ->
//! ModelCache -> Syncer -> real BPF maps, private to this benchmark); the
//! memory figure runs the real daemon on a manifest directory.

use std::{
    collections::BTreeSet,
    fs,
    net::Ipv4Addr,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use proxy_userspace::{
    datapath::Datapath,
    model::{ModelCache, NodeInfo, Options},
    sync::{Syncer, convert, lbmap::BpfLbMaps},
};
use serde_json::json;

const ENDPOINTS: usize = 10;

fn service(i: usize) -> serde_json::Value {
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 1 + i as u32);
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{i}"), "namespace": "bench", "resourceVersion": "1"},
        "spec": {"clusterIP": ip.to_string(),
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}
    })
}

fn slice(i: usize, version: usize) -> serde_json::Value {
    let endpoints: Vec<_> = (0..ENDPOINTS)
        .map(|b| {
            // 10,000 pods in 10.244.0.0/16, shared by the services; the
            // version shifts one endpoint to make a change.
            let n = (i * 7 + b + if b == 0 { version } else { 0 }) % 10_000;
            json!({"addresses": [format!("10.244.{}.{}", n / 250, n % 250 + 1)],
                   "nodeName": if b % 3 == 0 { "node-a" } else { "node-b" }})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{i}-abcde"), "namespace": "bench",
                     "resourceVersion": version.to_string(),
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints
    })
}

fn objects(n: usize) -> Result<(Vec<Service>, Vec<EndpointSlice>)> {
    let services = (0..n)
        .map(|i| serde_json::from_value(service(i)))
        .collect::<Result<_, _>>()?;
    let slices = (0..n)
        .map(|i| serde_json::from_value(slice(i, 1)))
        .collect::<Result<_, _>>()?;
    Ok((services, slices))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn run(dp: &mut Datapath) -> Result<()> {
    let n = 10_000;
    let (services, slices) = objects(n)?;
    // Watch events reach the model as upserts of the objects they name
    // (KubeSource::feed), which is what is timed below.
    let node_addrs = BTreeSet::from([Ipv4Addr::new(192, 168, 200, 11)]);
    let mut model = ModelCache::new(
        NodeInfo {
            name: "node-a".into(),
            zone: None,
        },
        Options::default(),
    );
    let mut syncer = Syncer::adopt(BpfLbMaps::new(dp)?)?;

    let started = Instant::now();
    model.replace(&services, &slices);
    model.update();
    let report = syncer.sync(&convert::to_desired(
        model.frontends(),
        &node_addrs,
        &BTreeSet::new(),
    ));
    let from_empty = started.elapsed();
    ensure!(report.failed.is_empty(), "{:?}", report.failed);
    ensure!(
        syncer.frontend_count() == n,
        "{} frontends",
        syncer.frontend_count()
    );

    // One slice changes (as a watch event would bring it), 100 times.
    let addrs = convert::to_node_addrs(&node_addrs, &BTreeSet::new());
    let mut took = Vec::new();
    let mut writes = 0;
    for round in 0..100 {
        let i = (round * 97) % n;
        let changed_slice: EndpointSlice = serde_json::from_value(slice(i, round + 2))?;
        let t = Instant::now();
        model.upsert_slice(&changed_slice);
        let changed = model.update();
        let changes = convert::to_changes(model.frontends(), &changed);
        let report = syncer.apply(&changes, Some(&addrs));
        took.push(t.elapsed());
        ensure!(
            report.failed.is_empty() && report.frontends_written == 1,
            "{report:?}"
        );
        writes += report.writes;
    }
    took.sort();

    println!();
    println!("Control plane ({n} Services x {ENDPOINTS} endpoints, one ClusterIP port each):");
    println!();
    println!("| measurement | figure |");
    println!("|---|---:|");
    println!(
        "| program {n} Services from empty (model + map writes) | {:.0} ms |",
        from_empty.as_secs_f64() * 1e3
    );
    println!(
        "| one EndpointSlice change to maps updated, median of 100 | {:.2} ms |",
        percentile(&took, 0.5).as_secs_f64() * 1e3
    );
    println!(
        "| same, p99 | {:.2} ms |",
        percentile(&took, 0.99).as_secs_f64() * 1e3
    );
    println!(
        "| map writes per change (new slots, switch, old slots, backends) | {:.1} |",
        writes as f64 / 100.0
    );
    Ok(())
}

/// VmRSS of the real daemon once it has programmed `n` Services from a
/// manifest directory (one JSON List), in KiB.
pub fn daemon_rss(n: usize, scratch: &Path) -> Result<u64> {
    let dir = scratch.join(format!("manifests-{n}"));
    fs::create_dir_all(&dir)?;
    let items: Vec<_> = (0..n).flat_map(|i| [service(i), slice(i, 1)]).collect();
    fs::write(
        dir.join("services.json"),
        serde_json::to_vec(&json!({"apiVersion": "v1", "kind": "List", "items": items}))?,
    )?;
    let daemon = std::env::current_exe()?
        .parent()
        .context("bench binary has a directory")?
        .join("kube-ebpf-proxy");
    let bpffs = scratch.join(format!("bpffs-{n}"));
    let log = scratch.join(format!("daemon-{n}.log"));
    let mut child = Command::new(&daemon)
        .args(["run", "--hostname-override", "node-a", "--manifests"])
        .arg(&dir)
        .arg("--bpffs")
        .arg(&bpffs)
        .args([
            "--metrics-bind-address",
            "127.0.0.1:0",
            "--healthz-bind-address",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("starting {}", daemon.display()))?;
    let started = Instant::now();
    let result = loop {
        if fs::read_to_string(&log)?.contains(" ready ") {
            let status = fs::read_to_string(format!("/proc/{}/status", child.id()))?;
            let rss = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
                .context("no VmRSS")?;
            break Ok(rss);
        }
        if started.elapsed() > Duration::from_secs(300) || child.try_wait()?.is_some() {
            break Err(anyhow::anyhow!(
                "daemon not ready: {}",
                fs::read_to_string(&log).unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = child.kill();
    let _ = child.wait();
    let cleanup = Command::new(&daemon)
        .arg("cleanup")
        .arg("--bpffs")
        .arg(&bpffs)
        .output()?;
    if !cleanup.status.success() {
        bail!("cleanup: {}", String::from_utf8_lossy(&cleanup.stderr));
    }
    let _ = fs::remove_dir_all(&dir);
    result
}
