//! Socket-level load balancing in the lab: each node's pods and processes
//! live in a cgroup the lab made, the daemon attaches its cgroup programs
//! there, and real sockets show what they do.
//!
//! The daemon binary comes from KEP_BIN (set by `cargo xtask test`), or
//! target/release/kube-ebpf-proxy.

use std::fs;
use std::path::Path;

use lab::{Lab, addr, cgroup2_mount, require_root_or_skip};

mod common;

/// The cgroup v2 group of the calling thread.
fn thread_group() -> String {
    let text = fs::read_to_string("/proc/thread-self/cgroup").unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("cgroup v2 line")
        .to_string()
}

fn relative(group: &Path) -> String {
    let mount = cgroup2_mount().expect("cgroup2 mounted");
    format!("/{}", group.strip_prefix(&mount).unwrap().display())
}

#[test]
fn lab_puts_each_nodes_pods_and_processes_in_a_group_of_its_own() {
    if !require_root_or_skip("lab cgroups") {
        return;
    }
    assert!(cgroup2_mount().is_some(), "this machine kind has cgroup v2");
    let before = thread_group();
    let mut lab = Lab::new().unwrap();
    lab.add_pod(addr::NODE_A, "pod-a").unwrap();
    lab.add_pod(addr::NODE_B, "pod-b").unwrap();
    let group_a = lab.cgroup(addr::NODE_A).unwrap().to_path_buf();
    let group_b = lab.cgroup(addr::NODE_B).unwrap().to_path_buf();
    assert_ne!(group_a, group_b);
    assert_eq!(
        fs::read_to_string(group_a.join("cgroup.type"))
            .unwrap()
            .trim(),
        "threaded"
    );
    for (ns, group) in [
        (addr::NODE_A, Some(&group_a)),
        ("pod-a", Some(&group_a)),
        (addr::NODE_B, Some(&group_b)),
        ("pod-b", Some(&group_b)),
        (addr::CLIENT, None),
    ] {
        let seen = lab.ns(ns).run(thread_group);
        match group {
            Some(g) => assert_eq!(seen, relative(g), "a thread in {ns}"),
            None => {
                assert_ne!(seen, relative(&group_a));
                assert_ne!(seen, relative(&group_b));
            }
        }
    }
    // A process started in a pod's namespace is in its node's group too.
    let out = lab.ns("pod-b").exec("cat", &["/proc/self/cgroup"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l == format!("0::{}", relative(&group_b))),
        "{text}"
    );
    drop(lab);
    assert!(!group_a.exists() && !group_b.exists(), "groups removed");
    assert_eq!(thread_group(), before, "the test process moved back");
}
