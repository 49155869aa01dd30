//! Upgrades and downgrades over pinned maps of another layout, with the
//! real daemons. Two builds: the daemon (KEP_BIN, map layout 1) and the
//! daemon of the test layout (KEP_BIN_LAYOUT_V2, feature `layout-v2-test`:
//! the conntrack and reverse-NAT values of both families are 8 bytes
//! longer and their maps are named `_V2`; proxy-common's layout.rs).
//! `cargo xtask test` builds both; with CI=true a missing one fails.
//!
//! Socket-level load balancing is off, so that the client pod's flows take
//! the per-packet path and need their conntrack entries; the outside
//! client's NodePort flows always do (one to a local backend, one SNATed
//! to a remote one: without their entries both break).

use std::{
    net::SocketAddrV4,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::{
    maps::{HashMap, MapData, PerCpuArray},
    programs::{SchedClassifier, TcAttachType},
};
use common::*;
use lab::{Netns, NsThread, Signal, TcpConn, addr, servers::tcp_request_on};
use proxy_common::{CT_MAP, Counter, FlowKey, IPPROTO_TCP, NatEntry, RNAT_MAP, STATS_MAP};
use proxy_userspace::datapath::open_pinned;

mod common;

/// The test layout's names of the maps it changes.
const CT_V2: &str = "KEP_CT_V2";
const RNAT_V2: &str = "KEP_RNAT_V2";
/// Entries that are no real flow, put into node-a's conntrack and
/// reverse-NAT maps (each) before the upgrade: a node with many flows.
const SYNTHETIC: u32 = 100_000;

/// The daemon of the test layout, or None (skip) outside CI when it was
/// not built.
fn layout_v2_bin() -> Option<PathBuf> {
    let path = std::env::var_os("KEP_BIN_LAYOUT_V2")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/release/kube-ebpf-proxy-layout-v2-test")
        });
    if path.exists() {
        return Some(path);
    }
    let why = format!(
        "{} is missing: `cargo xtask test` builds it (proxy-userspace, feature layout-v2-test)",
        path.display()
    );
    let in_ci = std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    assert!(!in_ci, "{why}");
    eprintln!("skipping: {why}");
    None
}

fn node_a(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(addr::NODE_A_IP, port)
}

/// Writes `n` made-up flows into `node`'s layout-1 conntrack and
/// reverse-NAT maps (no packet matches them).
fn fill_synthetic(c: &Cluster, node: &str, n: u32) {
    let root = c.bpffs(node);
    for map in [CT_MAP, RNAT_MAP] {
        let mut m: HashMap<MapData, FlowKey, NatEntry> = open_pinned(&root, map).unwrap();
        for i in 0..n {
            let [_, b, c2, d] = i.to_be_bytes();
            let key = FlowKey {
                saddr: [10, 250 + b, c2, d],
                daddr: [10, 96, 200, 1],
                sport: [0x80, 0x00],
                dport: [0, 80],
                proto: IPPROTO_TCP,
                _pad: [0; 3],
            };
            let value = NatEntry {
                saddr: key.saddr,
                daddr: [10, 244, 9, 9],
                sport: key.sport,
                dport: [0x1f, 0x90],
                svc_id: 1,
                backend_id: 1,
                flags: 0,
                _pad: [0; 3],
            };
            m.insert(key, value, 0).unwrap();
        }
    }
}

/// `flow_recreated` on `node`: TCP segments without SYN that found no
/// conntrack entry. The counters' map is the same in both layouts.
fn flow_recreated(c: &Cluster, node: &str) -> u64 {
    let stats: PerCpuArray<MapData, u64> = open_pinned(&c.bpffs(node), STATS_MAP).unwrap();
    stats
        .get(&(Counter::FlowRecreated as u32), 0)
        .unwrap()
        .iter()
        .sum()
}

/// The test layout's conntrack value: layout 1's, then 8 bytes that a
/// converted entry carries as `migrated` (proxy-common's layout.rs).
#[repr(C)]
#[derive(Clone, Copy)]
struct NatEntryV2 {
    v1: NatEntry,
    v2_test: [u8; 8],
}

// SAFETY: repr(C) of Pod fields without padding (24 + 8 bytes).
unsafe impl aya::Pod for NatEntryV2 {}

/// Whether the held connection's conntrack entry on node-a was carried
/// over from layout 1 (not tracked anew by the new programs).
fn carried_over(c: &Cluster, conn: &TcpConn) -> bool {
    let ct: HashMap<MapData, FlowKey, NatEntryV2> =
        open_pinned(&c.bpffs(addr::NODE_A), CT_V2).unwrap();
    let (from, to) = (conn.local(), conn.remote());
    let key = FlowKey {
        saddr: from.ip().octets(),
        daddr: to.ip().octets(),
        sport: from.port().to_be_bytes(),
        dport: to.port().to_be_bytes(),
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    };
    ct.get(&key, 0).is_ok_and(|v| &v.v2_test == b"migrated")
}

/// The lines `node`'s last started daemon wrote.
fn last_run(c: &Cluster, node: &str) -> Vec<String> {
    let log = c.lab.daemon_log(node);
    let run = log.rsplit("==== lab:").next().unwrap_or_default();
    run.lines().skip(1).map(str::to_string).collect()
}

/// The value of `key=` in a line, without quotes.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    Some(line[at..].split(' ').next()?.trim_matches('"'))
}

/// New connections, one after another, over several targets, counting
/// the ones that failed and the slowest; stopped and joined on drop. Each
/// target's connections are opened by a thread that stays in its client's
/// namespace (tens of thousands of connections per run: a thread each
/// was one hang in a lab run, joining one of them).
struct RequestLoop {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    slowest_ms: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl RequestLoop {
    fn start(targets: Vec<(Netns, SocketAddrV4)>) -> RequestLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let slowest_ms = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, ok, slowest_ms, errors) =
                (stop.clone(), ok.clone(), slowest_ms.clone(), errors.clone());
            std::thread::spawn(move || {
                let clients: Vec<(NsThread, SocketAddrV4)> = targets
                    .iter()
                    .map(|(ns, target)| (ns.thread(), *target))
                    .collect();
                let began = Instant::now();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let (client, target) = &clients[i % clients.len()];
                    let started = Instant::now();
                    match tcp_request_on(client, *target, Duration::from_secs(3)) {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            let at = started.duration_since(began).as_secs_f64();
                            errors
                                .lock()
                                .unwrap()
                                .push(format!("at {at:.3} s, {target}: {e:#}"));
                            0
                        }
                    };
                    let ms = started.elapsed().as_millis() as u64;
                    slowest_ms.fetch_max(ms, Ordering::Relaxed);
                    i += 1;
                }
            })
        };
        RequestLoop {
            stop,
            ok,
            slowest_ms,
            errors,
            thread: Some(thread),
        }
    }

    /// Stops the loop: (succeeded, failed with their errors, slowest ms).
    fn finish(mut self) -> (u64, Vec<String>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        let errors = self.errors.lock().unwrap().clone();
        (
            self.ok.load(Ordering::Relaxed),
            errors,
            self.slowest_ms.load(Ordering::Relaxed),
        )
    }
}

impl Drop for RequestLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A connection held open across the upgrade, and the backend it has.
struct Held {
    what: &'static str,
    conn: TcpConn,
    backend: String,
}

fn hold(c: &Cluster) -> Vec<Held> {
    let pod = c.lab.ns(CLIENT_POD);
    let outside = c.lab.ns(addr::CLIENT);
    [
        ("pod to ClusterIP", pod, sa("10.96.0.10:80")),
        ("pod to ClusterIP", pod, sa("10.96.0.12:80")),
        ("outside to NodePort, local backend", outside, node_a(30011)),
        (
            "outside to NodePort, remote backend (SNAT)",
            outside,
            node_a(30012),
        ),
    ]
    .into_iter()
    .map(|(what, ns, target)| {
        let mut conn = TcpConn::open(ns, target).unwrap();
        let backend = conn.request().unwrap().identity;
        Held {
            what,
            conn,
            backend,
        }
    })
    .collect()
}

/// Every held connection still answers, in both directions, from its
/// backend.
fn assert_held_work(c: &Cluster, held: &mut [Held], when: &str) {
    for h in held {
        for _ in 0..3 {
            let reply = h
                .conn
                .request()
                .unwrap_or_else(|e| panic!("{} broke {when}: {e:#}\n{}", h.what, c.logs()));
            assert_eq!(reply.identity, h.backend, "{} moved {when}", h.what);
        }
    }
}

/// For each hook with a link pinned by `node`'s daemon: how many tcx
/// programs run there.
fn programs_per_hook(c: &Cluster, node: &str) -> Vec<(String, usize)> {
    let names: Vec<String> = std::fs::read_dir(c.bpffs(node).join("links"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let hooks: Vec<(String, String, TcAttachType)> = names
        .iter()
        .filter_map(|name| {
            let (dev, dir) = name.rsplit_once('-')?;
            let (ifname, _) = dev.rsplit_once('@')?;
            let ifname = ifname.replace("%2E", ".").replace("%25", "%");
            let attach = match dir {
                "ingress" => TcAttachType::Ingress,
                "egress" => TcAttachType::Egress,
                _ => return None,
            };
            Some((name.clone(), ifname, attach))
        })
        .collect();
    assert!(!hooks.is_empty(), "{node}: no link pinned: {names:?}");
    c.lab.ns(node).run(|| {
        hooks
            .iter()
            .map(|(name, ifname, attach)| {
                let (_, programs) = SchedClassifier::query_tcx(ifname, *attach)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                (name.clone(), programs.len())
            })
            .collect()
    })
}

/// Replaces `node`'s daemon with `bin` over the same pins; how long from
/// the stop to the new one's "ready".
fn swap(c: &mut Cluster, node: &str, bin: &Path) -> Duration {
    let started = Instant::now();
    c.lab.stop_daemon(node, Signal::SIGTERM).unwrap();
    c.start_daemon_bin(node, bin);
    started.elapsed()
}

/// The entries and milliseconds of node's "carried ... over" lines.
fn carried(c: &Cluster, node: &str) -> Vec<(String, u64, f64)> {
    last_run(c, node)
        .iter()
        .filter(|l| l.contains("carried a map of an earlier layout over"))
        .map(|l| {
            (
                field(l, "to").unwrap_or("?").to_string(),
                field(l, "entries")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
                field(l, "ms")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(f64::NAN),
            )
        })
        .collect()
}

#[test]
fn an_upgrade_to_a_new_map_layout_keeps_established_connections() {
    let Some(v2) = layout_v2_bin() else {
        return;
    };
    let Some(mut c) = Cluster::start_with(
        "upgrade_layout",
        &placement_manifests(),
        &["--socket-lb=false"],
    ) else {
        return;
    };
    let mut held = hold(&c);
    fill_synthetic(&c, addr::NODE_A, SYNTHETIC);
    let recreated_before = flow_recreated(&c, addr::NODE_A);
    // New connections from the held ones' pod and client: Linux reuses a
    // source port towards another destination, and a new flow that would
    // take a live one's reverse-NAT key is remapped, during the swap too.
    let pod = c.lab.ns(CLIENT_POD).clone();
    let requests = RequestLoop::start(vec![
        (pod.clone(), sa("10.96.0.10:80")),
        (pod, node_a(30010)),
        (c.lab.ns(addr::CLIENT).clone(), node_a(30012)),
    ]);
    let began = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    let (took, at): (Vec<Duration>, Vec<String>) = addr::NODES
        .iter()
        .map(|n| {
            let at = format!("{:.3} s", began.elapsed().as_secs_f64());
            (swap(&mut c, n, &v2), at)
        })
        .unzip();
    std::thread::sleep(Duration::from_millis(300));
    let (ok, failed, slowest_ms) = requests.finish();
    assert_held_work(&c, &mut held, "after the upgrade");
    let recreated = flow_recreated(&c, addr::NODE_A) - recreated_before;

    let moved = carried(&c, addr::NODE_A);
    let retired = last_run(&c, addr::NODE_A)
        .into_iter()
        .find(|l| l.contains("the new programs run everywhere"))
        .map(|l| ["caught_up", "ms"].map(|k| format!("{k}={}", field(&l, k).unwrap_or("?"))));
    println!("node-a: retired the older datapath ({retired:?}); from SIGTERM to ready: {took:?}");
    println!(
        "upgrade layout 1 -> 2 on both nodes (swaps began at {at:?} and took {took:?}): {} held connections kept \
         their backends and entries; {ok} new connections during the swaps, {} failed \
         ({failed:?}), slowest {slowest_ms} ms; flow_recreated {recreated}; node-a carried \
         (map, entries, ms): {moved:?}",
        held.len(),
        failed.len()
    );
    for h in &held {
        assert!(carried_over(&c, &h.conn), "{}: not carried over", h.what);
    }
    // A flow the old programs opened after the first copy is served by
    // them, behind the new ones, until the catch-up copy (see
    // docs/architecture.md, Upgrades): none fails.
    assert!(failed.is_empty(), "new connections failed: {failed:#?}");
    for map in [CT_V2, RNAT_V2] {
        let entries = moved.iter().find(|m| m.0 == map).map_or(0, |m| m.1);
        assert!(entries >= SYNTHETIC as u64, "{map}: {moved:?}");
    }
    for node in addr::NODES {
        let maps = c.bpffs(node).join("maps");
        for (gone, there) in [(CT_MAP, CT_V2), (RNAT_MAP, RNAT_V2)] {
            assert!(!maps.join(gone).exists(), "{node}: {gone} still pinned");
            assert!(maps.join(there).exists(), "{node}: {there} not pinned");
        }
        let log = last_run(&c, node).join("\n");
        assert!(
            log.contains("pins of the earlier map layout removed"),
            "{log}"
        );
        assert!(!c.bpffs(node).join("links-next").exists(), "{node}");
        for (hook, programs) in programs_per_hook(&c, node) {
            assert_eq!(
                programs, 1,
                "{node} {hook}: the older program is still attached"
            );
        }
    }

    downgrade_is_refused(&mut c, &mut held);
}

/// The daemon of layout 1 over the pins of layout 2: exit status 1 and one
/// line naming the pins and both versions; the datapath pinned there keeps
/// serving the held connections.
fn downgrade_is_refused(c: &mut Cluster, held: &mut [Held]) {
    let node = addr::NODE_A;
    c.lab.stop_daemon(node, Signal::SIGTERM).unwrap();
    let args = c.daemon_args(node);
    c.lab.start_daemon(node, &daemon_bin(), args).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = c.lab.daemon_exited(node) {
            break Some(status);
        }
        assert!(
            Instant::now() < deadline,
            "the older daemon did not exit:\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = last_run(c, node);
    println!("downgrade: {status:?}: {out:?}");
    assert_eq!(status.unwrap().code(), Some(1), "{out:#?}");
    assert_eq!(out.len(), 1, "one line, not: {out:#?}");
    for says in [
        "holds maps of a newer layout than this build knows",
        &format!("{CT_V2} (this build: {CT_MAP})"),
        &format!("{RNAT_V2} (this build: {RNAT_MAP})"),
        "refusing to start",
    ] {
        assert!(out[0].contains(says), "{:?} does not say {says:?}", out[0]);
    }
    let maps = c.bpffs(node).join("maps");
    assert!(!maps.join(CT_MAP).exists(), "the refused daemon pinned");
    assert_held_work(c, held, "after the refused downgrade");
}

/// The daemon of the new layout killed (SIGKILL) during its swap: as soon
/// as it attached to a first device (its programs hand on what they would
/// act on), and as soon as its programs open flows: the datapath it
/// leaves serves (held and new connections), and the next start of the
/// same build takes the upgrade over and finishes it (old pins removed,
/// one program per hook).
#[test]
fn a_daemon_killed_during_the_swap_leaves_a_serving_datapath_that_the_next_start_finishes() {
    let Some(v2) = layout_v2_bin() else {
        return;
    };
    for (name, kill_at) in [
        ("upgrade_killed_attaching", "attached device="),
        ("upgrade_killed_behind", "open flows now"),
    ] {
        killed_during_the_swap(&v2, name, kill_at);
    }
}

fn killed_during_the_swap(v2: &Path, name: &str, kill_at: &str) {
    let Some(mut c) = Cluster::start_with(name, &placement_manifests(), &["--socket-lb=false"])
    else {
        return;
    };
    let node = addr::NODE_A;
    let mut held = hold(&c);
    fill_synthetic(&c, node, SYNTHETIC);
    let pod = c.lab.ns(CLIENT_POD).clone();
    let requests = RequestLoop::start(vec![
        (pod.clone(), sa("10.96.0.10:80")),
        (pod, node_a(30010)),
        (c.lab.ns(addr::CLIENT).clone(), node_a(30012)),
    ]);
    c.lab.stop_daemon(node, Signal::SIGTERM).unwrap();
    let args = c.daemon_args(node);
    c.lab.start_daemon(node, v2, args).unwrap();
    let reached = |c: &Cluster| last_run(c, node).iter().any(|l| l.contains(kill_at));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !reached(&c) {
        assert!(Instant::now() < deadline, "no attach:\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(2));
    }
    c.lab.stop_daemon(node, Signal::SIGKILL).unwrap();
    let killed_after = last_run(&c, node);
    std::thread::sleep(Duration::from_millis(500));
    assert_held_work(&c, &mut held, "after the kill");
    c.start_daemon_bin(node, v2);
    std::thread::sleep(Duration::from_millis(300));
    let (ok, failed, slowest_ms) = requests.finish();
    assert_held_work(&c, &mut held, "after the next start");
    let finished = last_run(&c, node);
    println!(
        "{name}: killed after {} log lines (last: {:?}); {ok} new connections, {} failed ({failed:?}), \
         slowest {slowest_ms} ms; next start: {:?}",
        killed_after.len(),
        killed_after.last(),
        failed.len(),
        finished
            .iter()
            .filter(|l| l.contains("earlier upgrade") || l.contains("run everywhere"))
            .collect::<Vec<_>>()
    );
    assert!(failed.is_empty(), "new connections failed: {failed:#?}");
    let maps = c.bpffs(node).join("maps");
    for (gone, there) in [(CT_MAP, CT_V2), (RNAT_MAP, RNAT_V2)] {
        assert!(!maps.join(gone).exists(), "{gone} still pinned");
        assert!(maps.join(there).exists(), "{there} not pinned");
    }
    assert!(!c.bpffs(node).join("links-next").exists());
    for (hook, programs) in programs_per_hook(&c, node) {
        assert_eq!(programs, 1, "{hook}: the older program is still attached");
    }
}
