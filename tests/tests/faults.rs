//! Faults under a running daemon, in the lab: SIGKILL in the middle of a
//! large sync, and the bpffs its pins live on unmounted. Each ends with the
//! datapath serving the right state, and prints how long that took. (The
//! API server's faults are in kube.rs, a device deleted while attached in
//! operator_mistakes.rs.)
//!
//! The daemon binary comes from KEP_BIN (set by `cargo xtask test`), or
//! target/release/kube-ebpf-proxy.

use std::{
    fs,
    time::{Duration, Instant},
};

use common::*;
use lab::{Signal, addr, servers::tcp_request_timeout};

mod common;

/// Services in the large file: enough that a sync takes a while.
const BIG: usize = 5000;
/// The frontends of `placement_manifests`.
const PLACEMENT_FRONTENDS: usize = 12;

fn big_vip(i: usize) -> String {
    format!("10.96.{}.{}", 16 + i / 250, i % 250 + 1)
}

/// BIG ClusterIP Services (TCP, port 80), each with web-b1 as its endpoint.
fn big_manifests() -> String {
    (0..BIG)
        .map(|i| {
            let name = format!("big-{i}");
            let ip = big_vip(i);
            Svc {
                name: &name,
                cluster_ip: &ip,
                port: 80,
                target: 8080,
                protocol: "TCP",
                node_port: None,
                endpoints: vec![(&WEB_B1, true)],
            }
            .yaml()
                + "---\n"
        })
        .collect()
}

fn answers(c: &Cluster, vip: &str) -> Option<String> {
    tcp_request_timeout(
        c.lab.ns(CLIENT_POD),
        sa(&format!("{vip}:80")),
        Duration::from_millis(300),
    )
    .ok()
    .map(|r| r.identity)
}

/// The value of `key=` in the last line of node-a's log that has it.
fn last_logged(c: &Cluster, key: &str) -> Option<usize> {
    let log = c.lab.daemon_log(addr::NODE_A);
    let at = log.rfind(&format!("{key}="))?;
    let digits: String = log[at + key.len() + 1..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The stable Service answers from web-a; counts the requests that did not.
fn stable_fails(c: &Cluster) -> usize {
    usize::from(answers(c, "10.96.0.11").as_deref() != Some(WEB_A.name))
}

#[test]
fn sigkill_in_the_middle_of_a_large_sync_converges_after_restart() {
    let Some(mut c) = Cluster::start("kill_mid_sync", &placement_manifests()) else {
        return;
    };
    let big = c.manifests.join("big.yaml");
    let text = big_manifests();
    let full = PLACEMENT_FRONTENDS + BIG;
    let mut failed = 0;
    // The kill has to land while the sync runs, which starts when the
    // daemon has read the file; how long it lasts depends on the machine,
    // so a few delays after that are tried, from short to long.
    let loaded = format!("manifests loaded services={}", 6 + BIG);
    let mut hit = None;
    for delay_ms in (30u64..=150).step_by(6) {
        let seen_before = c.lab.daemon_log(addr::NODE_A).matches(&loaded).count();
        fs::write(&big, &text).unwrap();
        let t0 = Instant::now();
        while c.lab.daemon_log(addr::NODE_A).matches(&loaded).count() == seen_before {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "never loaded\n{}",
                c.logs()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        c.lab.stop_daemon(addr::NODE_A, Signal::SIGKILL).unwrap();
        // No daemon: the datapath keeps serving what it has.
        failed += stable_fails(&c);
        let t0 = Instant::now();
        c.start_daemon(addr::NODE_A);
        let adopted = last_logged(&c, "adopted_frontends").unwrap();
        c.lab
            .wait_for(
                "the restarted daemon synced",
                Duration::from_secs(30),
                || last_logged(&c, "frontends") == Some(full),
            )
            .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
        let took = t0.elapsed();
        failed += stable_fails(&c);
        eprintln!(
            "killed {delay_ms} ms after the file was read: {adopted} of {full} frontends pinned"
        );
        if adopted > PLACEMENT_FRONTENDS && adopted < full {
            hit = Some((delay_ms, adopted, took));
            break;
        }
        // Before or after the sync: start over without the file.
        fs::remove_file(&big).unwrap();
        c.lab
            .wait_for(
                "the large file's Services removed",
                Duration::from_secs(30),
                || answers(&c, &big_vip(BIG - 1)).is_none(),
            )
            .unwrap();
    }
    let Some((delay_ms, adopted, took)) = hit else {
        panic!(
            "no kill landed inside the sync of {BIG} Services\n{}",
            c.logs()
        );
    };
    eprintln!(
        "SIGKILL {delay_ms} ms after the file was read, {adopted} of {full} frontends pinned: \
         restarted, adopted and synced in {took:?}; {failed} stable-Service requests failed"
    );
    for i in [0, BIG / 2, BIG - 1] {
        assert_eq!(
            answers(&c, &big_vip(i)).as_deref(),
            Some(WEB_B1.name),
            "big-{i}"
        );
    }
    assert_eq!(failed, 0, "the stable Service kept answering");
    // Nothing half-written stays: node-b, never killed, pins the same.
    let services = |node| {
        c.cli(node, &["inspect", "services"])
            .unwrap()
            .lines()
            .filter(|l| l.contains("lab/big-"))
            .count()
    };
    assert_eq!(services(addr::NODE_A), services(addr::NODE_B));
}

#[test]
fn the_bpffs_unmounted_under_the_daemon_makes_it_exit_and_a_restart_serves_again() {
    let Some(mut c) = Cluster::start("bpffs_unmounted", &placement_manifests()) else {
        return;
    };
    let bpffs = c.bpffs(addr::NODE_A);
    let t0 = Instant::now();
    let umount = c
        .lab
        .ns(addr::NODE_A)
        .exec("umount", &["-l", bpffs.to_str().unwrap()])
        .unwrap();
    assert!(umount.status.success(), "{umount:?}");
    // The links pinned there are gone with it: the daemon must not go on
    // as if it served. It exits with the reason.
    let exited = loop {
        if let Some(status) = c.lab.daemon_exited(addr::NODE_A) {
            break status;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "still running\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(!exited.success(), "{exited:?}");
    assert!(
        c.lab
            .daemon_log(addr::NODE_A)
            .contains("was unmounted under the daemon"),
        "{}",
        c.logs()
    );
    eprintln!(
        "bpffs unmounted: the daemon exited after {:?}",
        t0.elapsed()
    );

    // What the DaemonSet does next: start it again. It mounts a fresh
    // bpffs, loads, programs and attaches anew.
    c.start_daemon(addr::NODE_A);
    c.lab
        .wait_for("served after the restart", Duration::from_secs(10), || {
            answers(&c, "10.96.0.11").as_deref() == Some(WEB_A.name)
        })
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    eprintln!(
        "unmounted, exited, restarted: serving {:?} after the unmount",
        t0.elapsed()
    );
    let pinned = c.cli(addr::NODE_A, &["inspect", "services"]).unwrap();
    assert!(pinned.contains("lab/web-11-tcp"), "{pinned}");
}
