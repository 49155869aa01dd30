//! Control-plane figures: programming 10,000 Services x 10 endpoints from
//! empty, the latency of one EndpointSlice change with 10,000 Services
//! present, memory at 1,000, 10,000 and 50,000 Services, and how long a
//! new manifest file takes to be programmed.
//!
//! The first two run the daemon's own path in-process (objects ->
//! ModelCache -> Syncer -> real BPF maps, private to this benchmark).
//! Memory is measured twice: in a child process that takes the objects one
//! by one as the API watchers hand them over ([`model_rss`], API-server
//! mode without the network), and in the real daemon on a manifest
//! directory ([`daemon_run`]), which also times a new file.

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
    model::{ModelCache, NodeInfo, Options, slim},
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
    let node_addrs = BTreeSet::from([std::net::IpAddr::V4(Ipv4Addr::new(192, 168, 200, 11))]);
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

/// VmRSS of this process, in KiB.
fn own_rss() -> Result<u64> {
    rss_of("self")
}

fn rss_of(pid: &str) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .context("no VmRSS")
}

/// Run in a child process (`kep-bench model-rss N`): takes `n` Services and
/// their slices one at a time as the API watchers hand them over (slimmed;
/// the watchers' stores keep the slices in their compact form, the model
/// shares the Service objects), programs private maps, and prints its VmRSS in KiB.
pub fn model_rss(n: usize) -> Result<()> {
    let mut dp = Datapath::load_private(false)?;
    let mut model = ModelCache::new(
        NodeInfo {
            name: "node-a".into(),
            zone: None,
        },
        Options::default(),
    );
    let mut syncer = Syncer::adopt(BpfLbMaps::new(&mut dp)?)?;
    let mut store = Vec::with_capacity(n);
    for i in 0..n {
        let mut svc: Service = serde_json::from_value(service(i))?;
        slim::service(&mut svc);
        model.upsert_service(std::sync::Arc::new(svc));
        let s: EndpointSlice = serde_json::from_value(slice(i, 1))?;
        let s = slim::SlimSlice::from(s);
        model.upsert_slice(&s);
        store.push(s);
    }
    model.update();
    let node_addrs = BTreeSet::from([std::net::IpAddr::V4(Ipv4Addr::new(192, 168, 200, 11))]);
    let report = syncer.sync(&convert::to_desired(
        model.frontends(),
        &node_addrs,
        &BTreeSet::new(),
    ));
    ensure!(report.failed.is_empty(), "{:?}", report.failed);
    release_freed_memory();
    println!("{}", own_rss()?);
    Ok(())
}

/// [`model_rss`] in a fresh process.
pub fn model_rss_in_child(n: usize) -> Result<u64> {
    let out = Command::new(std::env::current_exe()?)
        .args(["model-rss", &n.to_string()])
        .stderr(Stdio::inherit())
        .output()?;
    ensure!(out.status.success(), "model-rss {n} failed");
    Ok(String::from_utf8(out.stdout)?.trim().parse()?)
}

fn release_freed_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What [`daemon_run`] measured.
pub struct DaemonFigures {
    /// VmRSS once ready, in KiB.
    pub rss_kib: u64,
    /// From writing a new file with one more Service to the daemon's
    /// "synced" line for it.
    pub new_file: Duration,
}

/// Runs the real daemon on a manifest directory of `n` Services (one JSON
/// List): its VmRSS once it has programmed them, then how long a Service in
/// a new file takes to be programmed.
pub fn daemon_run(n: usize, scratch: &Path) -> Result<DaemonFigures> {
    let dir = scratch.join(format!("manifests-{n}"));
    fs::create_dir_all(&dir)?;
    let items: Vec<_> = (0..n).flat_map(|i| [service(i), slice(i, 1)]).collect();
    fs::write(
        dir.join("services.json"),
        serde_json::to_vec(&json!({"apiVersion": "v1", "kind": "List", "items": items}))?,
    )?;
    drop(items);
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
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("starting {}", daemon.display()))?;
    let result = measure_daemon(child.id(), n, &dir, &log);
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

fn measure_daemon(pid: u32, n: usize, dir: &Path, log: &Path) -> Result<DaemonFigures> {
    wait_for_log(log, " ready ", Duration::from_secs(300))?;
    let rss_kib = rss_of(&pid.to_string())?;
    // A new Service (and its slice) in a new file, written whole under a
    // hidden name and renamed, as an editor or `kubectl`-like tool would.
    let extra = json!({"apiVersion": "v1", "kind": "List", "items": [service(n), slice(n, 1)]});
    let tmp = dir.join(".new.json.tmp");
    fs::write(&tmp, serde_json::to_vec(&extra)?)?;
    let synced = format!("frontends={}", n + 1);
    let started = Instant::now();
    fs::rename(&tmp, dir.join("new.json"))?;
    wait_for_log(log, &synced, Duration::from_secs(60))?;
    Ok(DaemonFigures {
        rss_kib,
        new_file: started.elapsed(),
    })
}

/// Waits until the log holds `needle`, looking every millisecond.
fn wait_for_log(log: &Path, needle: &str, timeout: Duration) -> Result<()> {
    let started = Instant::now();
    loop {
        let text = fs::read_to_string(log)?;
        if text.contains(needle) {
            return Ok(());
        }
        if started.elapsed() > timeout {
            bail!("daemon log has no {needle:?}: {text}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
