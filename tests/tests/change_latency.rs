//! Changes reach the datapath from notifications, not from polling: every
//! daemon here runs with a one-minute safety poll, so what happens within a
//! second was started by inotify (manifest files) or by netlink (devices).
//! The figures are printed, not asserted beyond "within a second".
//!
//! The daemon binary comes from KEP_BIN (set by `cargo xtask test`), or
//! target/release/kube-ebpf-proxy.

use std::{
    fs,
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use common::*;
use lab::{addr, servers::tcp_request_timeout};

mod common;

/// No poll within any test's time: only notifications act.
const SLOW_POLL: [&str; 2] = ["--poll-interval-ms", "60000"];

fn answers(c: &Cluster, vip: SocketAddrV4) -> Option<String> {
    tcp_request_timeout(c.lab.ns(CLIENT_POD), vip, Duration::from_millis(200))
        .ok()
        .map(|r| r.identity)
}

/// Waits up to a second for `vip` to answer from `backend` (or, with None,
/// to stop answering); returns how long it took.
fn wait_answer(c: &Cluster, what: &str, vip: SocketAddrV4, backend: Option<&str>) -> Duration {
    let t0 = Instant::now();
    c.lab
        .wait_for(what, Duration::from_secs(1), || {
            answers(c, vip).as_deref() == backend
        })
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    let took = t0.elapsed();
    eprintln!("{what}: {took:?}");
    took
}

#[test]
fn manifest_files_added_changed_and_removed_are_served_from_inotify() {
    let Some(c) = Cluster::start_with("inotify_files", &placement_manifests(), &SLOW_POLL) else {
        return;
    };
    let vip = sa("10.96.0.20:80");
    let file = c.manifests.join("extra.yaml");
    assert_eq!(answers(&c, vip), None);

    // Added: written in place (truncate, write, close).
    fs::write(&file, web(vec![(&WEB_A, true)], "10.96.0.20", None)).unwrap();
    wait_answer(&c, "a new file's Service", vip, Some("web-a"));

    // Changed in place: the endpoint moves.
    fs::write(&file, web(vec![(&WEB_B1, true)], "10.96.0.20", None)).unwrap();
    wait_answer(&c, "a changed file's endpoint", vip, Some("web-b1"));

    // Removed.
    fs::remove_file(&file).unwrap();
    wait_answer(&c, "a removed file's Service", vip, None);

    // The other files' Services were never touched.
    assert_eq!(answers(&c, sa("10.96.0.11:80")).as_deref(), Some("web-a"));
}

/// node-a's syncs so far (its sync-duration histogram's count).
fn syncs(c: &Cluster) -> u64 {
    let at = sa("127.0.0.1:10249");
    let (status, body) = http_get(c.lab.ns(addr::NODE_A), at, "/metrics").unwrap();
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix("kubeproxy_sync_proxy_rules_duration_seconds_count "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the sync count in node-a's metrics")
}

#[test]
fn an_editor_style_atomic_rename_is_served_from_inotify() {
    let Some(c) = Cluster::start_with("inotify_rename", &placement_manifests(), &SLOW_POLL) else {
        return;
    };
    let vip = sa("10.96.0.21:80");
    let file = c.manifests.join("edited.yaml");
    // As vim or `kubectl`-like tools save: a hidden temporary, then rename.
    let save = |text: String| {
        let tmp = c.manifests.join(".edited.yaml.swp");
        fs::write(&tmp, text).unwrap();
        fs::rename(&tmp, &file).unwrap();
    };
    save(web(vec![(&WEB_A, true)], "10.96.0.21", None));
    wait_answer(&c, "a file renamed into place", vip, Some("web-a"));
    // The temporary alone changes no manifest: no sync, which would hold
    // the rename's back by --min-sync-period-ms.
    let before = syncs(&c);
    let tmp = c.manifests.join(".edited.yaml.swp");
    fs::write(&tmp, web(vec![(&WEB_B1, true)], "10.96.0.21", None)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(syncs(&c), before, "a hidden file was synced");
    fs::remove_file(&tmp).unwrap();
    save(web(vec![(&WEB_B2, true)], "10.96.0.21", None));
    wait_answer(&c, "a file replaced by a rename", vip, Some("web-b2"));
}

#[test]
fn a_new_veth_gets_the_programs_from_the_netlink_notification() {
    let Some(mut c) = Cluster::start_with("netlink_veth", &placement_manifests(), &SLOW_POLL)
    else {
        return;
    };
    let t0 = Instant::now();
    c.lab.add_pod(addr::NODE_B, "late").unwrap();
    let veth = c.lab.pod("late").unwrap().host_veth.clone();
    let links = c.bpffs(addr::NODE_B).join("links");
    c.lab
        .wait_for("programs on the new veth", Duration::from_secs(1), || {
            fs::read_dir(&links)
                .map(|d| {
                    d.flatten().any(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .starts_with(&format!("{veth}@"))
                    })
                })
                .unwrap_or(false)
        })
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    eprintln!("new veth {veth}: attached after {:?}", t0.elapsed());
    let pod = c.lab.ns("late");
    c.lab
        .wait_for("a request from the new pod", Duration::from_secs(1), || {
            tcp_request_timeout(pod, sa("10.96.0.11:80"), Duration::from_millis(200)).is_ok()
        })
        .unwrap();
}
