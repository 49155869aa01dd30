//! The mistakes a new operator makes, tried with the real daemon in a lab
//! node: a wrong path or name given at start is refused with one line that
//! says what is wrong, before anything is pinned or attached; something
//! that goes away while the daemon runs keeps the state it had, is warned
//! about once, and again only when that changes.

use std::{
    fs,
    net::SocketAddrV4,
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::ExitStatus,
    time::Duration,
};

use common::*;
use lab::{Lab, addr, require_root_or_skip, tcp_request};

mod common;

/// What the daemon wrote (every run), without the lab's own header lines.
fn output(lab: &Lab, node: &str) -> Vec<String> {
    lab.daemon_log(node)
        .lines()
        .filter(|l| !l.starts_with("==== lab:"))
        .map(str::to_string)
        .collect()
}

/// Starts `program args` in node-a and waits for it to exit on its own.
fn exit_of(lab: &mut Lab, program: &Path, args: &[String]) -> ExitStatus {
    lab.start_daemon(addr::NODE_A, program, args).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while lab.daemon_exited(addr::NODE_A).is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon did not exit:\n{}",
            lab.daemon_log(addr::NODE_A)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = lab.stop_daemon(addr::NODE_A, lab::Signal::SIGTERM).unwrap();
    assert!(status.signal().is_none(), "killed: {status:?}");
    status
}

/// `run` with `args` in node-a must exit with status 1 and exactly one line
/// containing every one of `says`; nothing may be pinned at its bpffs.
fn assert_refused(test: &str, args: &[&str], says: &[&str]) {
    assert_refused_with(test, None, args, says)
}

fn assert_refused_with(test: &str, wrapper: Option<&[&str]>, args: &[&str], says: &[&str]) {
    if !require_root_or_skip(test) {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let bpffs = lab.dir().join("bpffs");
    let mut all: Vec<String> = wrapper
        .into_iter()
        .flatten()
        .map(|s| s.to_string())
        .collect();
    all.push(daemon_bin().display().to_string());
    all.extend(["run", "--hostname-override", addr::NODE_A].map(String::from));
    if !args.contains(&"--bpffs") {
        all.extend(["--bpffs".to_string(), bpffs.display().to_string()]);
    }
    all.extend(
        args.iter()
            .map(|s| s.replace("$LAB", &lab.dir().display().to_string())),
    );
    let program = PathBuf::from(all.remove(0));
    let status = exit_of(&mut lab, &program, &all);
    let out = output(&lab, addr::NODE_A);
    assert_eq!(status.code(), Some(1), "{out:#?}");
    assert_eq!(out.len(), 1, "one line, not: {out:#?}");
    for s in says {
        let s = s.replace("$LAB", &lab.dir().display().to_string());
        assert!(out[0].contains(&s), "{:?} does not say {s:?}", out[0]);
    }
    assert!(
        !bpffs.join("maps").exists(),
        "something was pinned before refusing"
    );
}

#[test]
fn a_manifest_directory_that_does_not_exist_is_refused_in_one_line() {
    assert_refused(
        "manifests_missing",
        &["--manifests", "$LAB/no-such-dir"],
        &["--manifests $LAB/no-such-dir: no such directory"],
    );
}

#[test]
fn a_manifest_path_that_is_a_file_is_refused_in_one_line() {
    assert_refused(
        "manifests_file",
        &["--manifests", "/proc/self/status"],
        &["--manifests /proc/self/status: not a directory"],
    );
}

#[test]
fn a_kubeconfig_that_cannot_be_read_is_refused_in_one_line() {
    assert_refused(
        "kubeconfig_missing",
        &["--kubeconfig", "$LAB/no-such-config"],
        &["--kubeconfig $LAB/no-such-config: No such file or directory"],
    );
}

#[test]
fn a_kubeconfig_that_does_not_parse_is_refused_in_one_line() {
    let garbage = std::env::temp_dir().join(format!("kep-bad-kubeconfig-{}", std::process::id()));
    fs::write(&garbage, "apiVersion: v1\nclusters: {not: [a list\n").unwrap();
    let path = garbage.display().to_string();
    assert_refused(
        "kubeconfig_garbage",
        &["--kubeconfig", &path],
        &[&format!(
            "--kubeconfig {path}: failed to parse kubeconfig YAML"
        )],
    );
    let _ = fs::remove_file(&garbage);
}

#[test]
fn a_device_that_does_not_exist_is_refused_in_one_line() {
    assert_refused(
        "devices_missing",
        &["--manifests", "$LAB", "--devices", "eth0,eth9"],
        &[
            "--devices names eth9, which this network namespace does not have",
            "eth0",
        ],
    );
}

#[test]
fn a_bpffs_path_that_is_a_file_is_refused_in_one_line() {
    assert_refused(
        "bpffs_file",
        &["--manifests", "$LAB", "--bpffs", "/proc/self/status"],
        &["--bpffs /proc/self/status: not a directory"],
    );
}

#[test]
fn a_bpffs_path_with_files_in_it_is_not_mounted_over() {
    if !require_root_or_skip("bpffs_not_empty") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("kep-not-empty-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("precious"), "keep me").unwrap();
    let path = dir.display().to_string();
    assert_refused(
        "bpffs_not_empty",
        &["--manifests", "$LAB", "--bpffs", &path],
        &[&format!(
            "--bpffs {path}: not on a BPF filesystem, and not empty"
        )],
    );
    assert_eq!(fs::read_to_string(dir.join("precious")).unwrap(), "keep me");
    fs::remove_dir_all(&dir).unwrap();
}

/// Without CAP_SYS_ADMIN (a container that was not given the host's
/// bpffs) the mount fails: one line that says what to do.
#[test]
fn a_bpffs_that_cannot_be_mounted_is_refused_in_one_line() {
    assert_refused_with(
        "bpffs_no_mount",
        Some(&[
            "/usr/bin/setpriv",
            "--bounding-set=-sys_admin",
            "--inh-caps=-sys_admin",
        ]),
        &["--manifests", "$LAB"],
        &[
            "--bpffs $LAB/bpffs: mounting bpffs at $LAB/bpffs failed: Operation not permitted",
            "mount bpffs there first",
        ],
    );
}

/// Lines of node-a's log that contain `what`.
fn count(c: &Cluster, what: &str) -> usize {
    c.lab.daemon_log(addr::NODE_A).matches(what).count()
}

fn assert_serves(c: &Cluster) {
    let reply = tcp_request(c.lab.ns(CLIENT_POD), sa("10.96.0.11:80"))
        .unwrap_or_else(|e| panic!("ClusterIP does not answer: {e:#}\n{}", c.logs()));
    assert_eq!(reply.identity, WEB_A.name);
}

#[test]
fn a_manifest_directory_that_vanishes_keeps_the_state_and_is_warned_about_once_per_change() {
    let Some(mut c) = Cluster::build("manifests_vanish") else {
        return;
    };
    c.write_manifests(&placement_manifests());
    c.start_daemon(addr::NODE_A);
    assert_serves(&c);
    let gone = c.manifests.with_extension("gone");
    const FAILED: &str = "reading manifests failed";
    // Polled every 100 ms: three seconds is thirty failed reads.
    fs::rename(&c.manifests, &gone).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(count(&c, FAILED), 1, "{}", c.logs());
    assert_serves(&c);

    fs::rename(&gone, &c.manifests).unwrap();
    c.lab
        .wait_for("readable again", Duration::from_secs(5), || {
            count(&c, "manifest directory readable again") == 1
        })
        .unwrap();
    assert!(
        c.lab.daemon_log(addr::NODE_A).contains("failed_reads="),
        "the recovery says how many reads failed"
    );
    assert_serves(&c);

    fs::rename(&c.manifests, &gone).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(count(&c, FAILED), 2, "warned again: the state changed");
    fs::rename(&gone, &c.manifests).unwrap();
    assert_serves(&c);
}

/// A veth pair inside node-a (no dummy driver on every kernel): kepv0 is
/// the device named in --devices.
fn add_device(node: &lab::Netns) {
    node.ip(&[
        "link", "add", "kepv0", "type", "veth", "peer", "name", "kepv1",
    ])
    .unwrap();
    node.ip(&["link", "set", "kepv0", "up"]).unwrap();
    node.ip(&["link", "set", "kepv1", "up"]).unwrap();
}

#[test]
fn a_named_device_that_vanishes_is_warned_about_once_and_attached_again() {
    let Some(mut c) = Cluster::build("device_vanish") else {
        return;
    };
    let node = c.lab.ns(addr::NODE_A).clone();
    add_device(&node);
    c.extra_args = vec!["--devices".into(), "eth0,kepv0".into()];
    c.write_manifests(&placement_manifests());
    c.start_daemon(addr::NODE_A);
    const ATTACHED: &str = "attached device=kepv0";
    const GONE: &str = "device named in --devices is gone";
    assert_eq!(count(&c, ATTACHED), 1, "{}", c.logs());

    node.ip(&["link", "del", "kepv0"]).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(count(&c, GONE), 1, "{}", c.logs());
    assert!(
        c.lab.daemon_exited(addr::NODE_A).is_none(),
        "the daemon is alive"
    );

    add_device(&node);
    c.lab
        .wait_for("attached again", Duration::from_secs(5), || {
            count(&c, ATTACHED) == 2
        })
        .unwrap();
    assert_eq!(count(&c, GONE), 1);
    // Only eth0 and kepv0 have our programs: a NodePort from outside to a
    // backend on node-b goes in and out through eth0 alone.
    let node_port = SocketAddrV4::new(addr::NODE_A_IP, 30012);
    let reply = tcp_request(c.lab.ns(addr::CLIENT), node_port).unwrap();
    assert_eq!(reply.identity, WEB_B1.name);
}

#[test]
fn inspect_without_pins_says_nothing_is_pinned_and_which_daemon_runs() {
    let Some(mut c) = Cluster::build("inspect_no_pins") else {
        return;
    };
    c.write_manifests(&placement_manifests());
    c.start_daemon(addr::NODE_A);
    let empty = c.lab.dir().join("empty");
    fs::create_dir(&empty).unwrap();
    let out = c
        .lab
        .ns(addr::NODE_A)
        .command(daemon_bin())
        .unwrap()
        .args(["inspect", "services", "--bpffs"])
        .arg(&empty)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let pid = c.lab.daemon_pid(addr::NODE_A).unwrap();
    let daemon_bpffs = c.bpffs(addr::NODE_A).display().to_string();
    for want in [
        format!("nothing is pinned at {}", empty.display()),
        format!("pid {pid} with --bpffs {daemon_bpffs}"),
    ] {
        assert!(stderr.contains(&want), "{stderr:?} does not say {want:?}");
    }
    assert!(!stderr.contains("BPF_OBJ_GET"), "{stderr}");
    // The daemon's own path still inspects.
    let table = c.cli(addr::NODE_A, &["inspect", "services"]).unwrap();
    assert!(table.contains("10.96.0.11:80"), "{table}");
}
