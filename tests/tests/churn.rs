//! Churn: bursts of Services and EndpointSlices created, changed and
//! deleted through the stand-in API server, round after round, while a
//! request loop runs on a stable Service. After every round the pinned maps
//! hold exactly what they held before it; requests never fail; the daemon's
//! RSS does not grow from round to round; its syncs stay short.
//!
//! Each round's ClusterIPs are new, cycling through four ranges, as a
//! cluster's pod addresses are: the probe filters fill with the bits of
//! what is gone, and the daemon must rebuild them (clearing those bits)
//! without clearing one the stable Service needs.
//!
//! The suite runs 5 rounds of 2,000 Services (10,000 changes each);
//! `cargo xtask soak` (KEP_SOAK=1) runs 30 rounds of 5,000.

use std::{
    collections::BTreeMap,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use common::*;
use lab::{addr, apiserver::ApiServer, apiserver::Kind, servers::tcp_request_timeout};
use proxy_common::{ADDR_MAP, AFFMEM_MAP, BACKEND_MAP, NAME_MAP, SLOT_MAP, SRCRNG_MAP, SVC_MAP};
use serde_json::{Value, json};

mod common;

/// The maps that hold desired state (not traffic state): churn must leave
/// them as it found them.
const STATE_MAPS: [&str; 7] = [
    SVC_MAP,
    SLOT_MAP,
    BACKEND_MAP,
    ADDR_MAP,
    NAME_MAP,
    SRCRNG_MAP,
    AFFMEM_MAP,
];

fn soak() -> bool {
    std::env::var_os("KEP_SOAK").is_some()
}

fn name(i: usize) -> String {
    format!("churn-{i}")
}

/// Service `i` of a round of `services`: its ClusterIP is in the round's
/// range of four.
fn service(i: usize, round: usize, services: usize) -> Value {
    let k = i + services * (round % 4);
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name(i), "namespace": "lab"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": format!("10.96.{}.{}", 32 + k / 250, k % 250 + 1),
            "ports": [{"name": "main", "protocol": "TCP", "port": 80, "targetPort": 8080}]
        }
    })
}

/// The Service's slice, with `n` of the three backends as endpoints.
fn slice(i: usize, n: usize) -> Value {
    let endpoints: Vec<Value> = BACKENDS
        .iter()
        .take(n)
        .map(|b| json!({"addresses": [b.ip], "nodeName": b.node, "conditions": {"ready": true}}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{}-1", name(i)), "namespace": "lab",
            "labels": {"kubernetes.io/service-name": name(i)}
        },
        "addressType": "IPv4",
        "ports": [{"name": "main", "protocol": "TCP", "port": 8080}],
        "endpoints": endpoints
    })
}

/// Entries of each state map pinned under node-a's bpffs.
fn map_entries(c: &Cluster) -> BTreeMap<&'static str, usize> {
    let maps = c.bpffs(addr::NODE_A).join("maps");
    STATE_MAPS
        .iter()
        .map(|m| {
            let out = Command::new("bpftool")
                .args(["-j", "map", "dump", "pinned"])
                .arg(maps.join(m))
                .output()
                .expect("bpftool");
            assert!(out.status.success(), "bpftool on {m}: {out:?}");
            let dump: Vec<Value> = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
            (*m, dump.len())
        })
        .collect()
}

fn rss_kib(c: &Cluster) -> u64 {
    let pid = c.lab.daemon_pid(addr::NODE_A).expect("daemon running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// The longest sync node-a logged after byte `from` of its log, in µs.
fn longest_sync_us(c: &Cluster, from: usize) -> u64 {
    let log = c.lab.daemon_log(addr::NODE_A);
    log[from.min(log.len())..]
        .lines()
        .filter(|l| l.contains(" synced "))
        .filter_map(|l| l.split("took_us=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// node-a's probe filter rebuilds: (address bits cleared, ms) of each.
fn filter_rebuilds(c: &Cluster) -> Vec<(u64, f64)> {
    let field = |l: &str, name: &str| -> Option<String> {
        let v = l.split(&format!("{name}=")).nth(1)?;
        Some(v.split_whitespace().next()?.trim_matches('"').to_string())
    };
    c.lab
        .daemon_log(addr::NODE_A)
        .lines()
        .filter(|l| l.contains("probe filters rebuilt"))
        .filter_map(|l| {
            let cleared = field(l, "addr_bits_cleared")?.parse().ok()?;
            Some((cleared, field(l, "ms")?.parse().ok()?))
        })
        .collect()
}

/// Requests to the stable Service until stopped: (succeeded, failed).
struct RequestLoop {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl RequestLoop {
    fn start(c: &Cluster) -> RequestLoop {
        let ns = c.lab.ns(CLIENT_POD).clone();
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let thread = {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match tcp_request_timeout(&ns, sa("10.96.0.11:80"), Duration::from_secs(2)) {
                        Ok(r) if r.identity == WEB_A.name => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        RequestLoop {
            stop,
            ok,
            failed,
            thread: Some(thread),
        }
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// Stops the loop however the test ends, before the lab goes away.
impl Drop for RequestLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits until node-a's map `map` holds `entries`.
fn wait_entries(c: &Cluster, what: &str, map: &str, entries: usize) {
    c.lab
        .wait_for(what, Duration::from_secs(60), || {
            map_entries(c)[map] == entries
        })
        .unwrap_or_else(|e| panic!("{e:#}: {:?}\n{}", map_entries(c), c.logs()));
}

/// One round: a burst of creates, every slice changed, every object
/// deleted; each phase waits until the datapath has it, so that every
/// object is really programmed and removed.
fn churn(
    c: &Cluster,
    api: &ApiServer,
    (round, services): (usize, usize),
    before: &BTreeMap<&str, usize>,
) {
    for i in 0..services {
        api.apply_json(service(i, round, services)).unwrap();
        api.apply_json(slice(i, 1 + i % 3)).unwrap();
    }
    let frontends = before[SVC_MAP] + services;
    wait_entries(c, "every Service programmed", SVC_MAP, frontends);
    let slots = |n: fn(usize) -> usize| before[SLOT_MAP] + (0..services).map(n).sum::<usize>();
    wait_entries(
        c,
        "every endpoint programmed",
        SLOT_MAP,
        slots(|i| 1 + i % 3),
    );
    for i in 0..services {
        api.apply_json(slice(i, 3 - i % 3)).unwrap();
    }
    wait_entries(
        c,
        "every slice change programmed",
        SLOT_MAP,
        slots(|i| 3 - i % 3),
    );
    for i in 0..services {
        api.delete(Kind::EndpointSlice, "lab", &format!("{}-1", name(i)));
        api.delete(Kind::Service, "lab", &name(i));
    }
}

#[test]
fn churn_leaves_the_maps_as_it_found_them_and_fails_no_request() {
    let Some((c, api)) = start_with_api("churn", &placement_manifests()) else {
        return;
    };
    let (rounds, services) = if soak() { (30, 5000) } else { (5, 2000) };
    let before = map_entries(&c);
    let requests = RequestLoop::start(&c);
    let mut rss = Vec::new();
    for round in 1..=rounds {
        let log_from = c.lab.daemon_log(addr::NODE_A).len();
        let t0 = Instant::now();
        churn(&c, &api, (round, services), &before);
        let programmed = t0.elapsed();
        c.lab
            .wait_for(
                "the maps back where they were",
                Duration::from_secs(60),
                || map_entries(&c) == before,
            )
            .unwrap_or_else(|e| panic!("{e:#}: {:?} vs {before:?}\n{}", map_entries(&c), c.logs()));
        let converged = t0.elapsed();
        let longest = longest_sync_us(&c, log_from);
        rss.push(rss_kib(&c));
        let (ok, failed) = requests.counts();
        eprintln!(
            "round {round}: {} changes programmed in {programmed:?}, maps back after {converged:?}, \
             longest sync {} ms, RSS {} MiB; requests {ok} ok, {failed} failed",
            services * 5,
            longest / 1000,
            rss.last().unwrap() / 1024
        );
        assert!(longest < 2_000_000, "a sync took {longest} µs");
    }
    let (ok, failed) = requests.counts();
    drop(requests);
    assert_eq!(failed, 0, "{ok} requests succeeded");
    let rebuilds = filter_rebuilds(&c);
    eprintln!("probe filter rebuilds (address bits cleared, ms): {rebuilds:?}");
    assert!(
        rebuilds
            .iter()
            .any(|&(cleared, _)| cleared >= services as u64),
        "a rebuild cleared the bits of a round's gone ClusterIPs: {rebuilds:?}"
    );
    assert!(ok > 100, "the request loop ran: {ok}");
    // The first round grows the allocator's pools; later rounds reuse them.
    let (first, last) = (rss[0], *rss.last().unwrap());
    assert!(
        last <= first + first / 10 + 4096,
        "RSS grew from {first} KiB after round 1 to {last} KiB: {rss:?}"
    );
}
