//! `--conntrack-max`: the conntrack and reverse-NAT maps of both families
//! get the size asked for, and pinned maps of another size (from an earlier
//! run) are replaced by maps of the new size holding the same entries.
//! `--ipv6`: with IPv6 off the IPv6 LRU maps are small, and grow (their
//! entries kept) when IPv6 is on at a later start.
//!
//! The maps are pinned under a directory of this test's own on a bpffs
//! (under /sys/fs/bpf, mounted if needed), removed afterwards also on
//! failure.

mod pins;
mod privileged;
use pins::PinDir;
use privileged::privileged;
use std::{fs, path::Path};

use aya::maps::{HashMap, MapData, MapInfo};
use proxy_common::*;
use proxy_userspace::datapath::{
    Datapath, Ipv6Maps, maps_dir, open_pinned,
    resize::{IPV6_LRU_MAPS, IPV6_OFF_ENTRIES, SIZED_MAPS, sizes},
};

fn max_entries(root: &Path, map: &str) -> u32 {
    MapInfo::from_pin(maps_dir(root).join(map))
        .unwrap()
        .max_entries()
}

fn flow(i: u32) -> (FlowKey, NatEntry) {
    let key = FlowKey {
        saddr: [10, 244, (i >> 8) as u8, i as u8],
        daddr: [10, 96, 0, 10],
        sport: 40000u16.to_be_bytes(),
        dport: 80u16.to_be_bytes(),
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    };
    let value = NatEntry {
        saddr: key.saddr,
        daddr: [10, 244, 2, 11],
        sport: key.sport,
        dport: 8080u16.to_be_bytes(),
        svc_id: 7,
        backend_id: i,
        flags: 0,
        _pad: [0; 3],
    };
    (key, value)
}

fn flow6(i: u32) -> (FlowKey6, NatEntry6) {
    let mut saddr = [0u8; 16];
    saddr[0] = 0xfd;
    saddr[15] = i as u8;
    let key = FlowKey6 {
        saddr,
        daddr: [0xfd; 16],
        sport: 40000u16.to_be_bytes(),
        dport: 80u16.to_be_bytes(),
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    };
    let value = NatEntry6 {
        saddr,
        daddr: [0xfe; 16],
        sport: key.sport,
        dport: 8080u16.to_be_bytes(),
        svc_id: 7,
        backend_id: i,
        flags: 0,
        _pad: [0; 3],
    };
    (key, value)
}

/// The pinned IPv4 conntrack entries, sorted by backend id.
fn ct_entries(root: &Path) -> Vec<(FlowKey, NatEntry)> {
    let ct: HashMap<MapData, FlowKey, NatEntry> = open_pinned(root, CT_MAP).unwrap();
    let mut all: Vec<_> = ct.iter().map(Result::unwrap).collect();
    all.sort_by_key(|(_, v)| v.backend_id);
    all
}

fn no_temporary_pins(root: &Path) {
    let left: Vec<String> = fs::read_dir(maps_dir(root))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with("_resizing"))
        .collect();
    assert!(left.is_empty(), "temporary pins left: {left:?}");
}

#[test]
fn pinned_conntrack_maps_are_resized_with_their_flows() {
    if !privileged("pinned_conntrack_maps_are_resized_with_their_flows") {
        return;
    }
    let dir = PinDir::new("resize");
    let root = dir.0.as_path();
    let written: Vec<_> = (0..100).map(flow).collect();
    {
        let mut dp = Datapath::load(root, false, Some(1024)).expect("first load");
        let mut ct: HashMap<MapData, FlowKey, NatEntry> = dp.map(CT_MAP).unwrap();
        for (k, v) in &written {
            ct.insert(k, v, 0).unwrap();
        }
        let mut ct6: HashMap<MapData, FlowKey6, NatEntry6> = dp.map(CT6_MAP).unwrap();
        for (k, v) in (0..10).map(flow6) {
            ct6.insert(k, v, 0).unwrap();
        }
    }
    for map in SIZED_MAPS {
        assert_eq!(max_entries(root, map), 1024, "{map}");
    }

    // Grown: every flow is carried over, in both families.
    drop(Datapath::load(root, false, Some(4096)).expect("grown"));
    for map in SIZED_MAPS {
        assert_eq!(max_entries(root, map), 4096, "{map}");
    }
    assert_eq!(
        ct_entries(root)
            .iter()
            .map(|(k, v)| (k.saddr, v.backend_id))
            .collect::<Vec<_>>(),
        written
            .iter()
            .map(|(k, v)| (k.saddr, v.backend_id))
            .collect::<Vec<_>>()
    );
    let ct6: HashMap<MapData, FlowKey6, NatEntry6> = open_pinned(root, CT6_MAP).unwrap();
    assert_eq!(ct6.keys().count(), 10);
    no_temporary_pins(root);

    // The same size again: the pinned maps are kept as they are.
    drop(Datapath::load(root, false, Some(4096)).expect("same size"));
    assert_eq!(ct_entries(root).len(), 100);

    // Shrunk below the entries held: the new map keeps what fits.
    drop(Datapath::load(root, false, Some(64)).expect("shrunk"));
    assert_eq!(max_entries(root, CT_MAP), 64);
    let kept = ct_entries(root).len();
    println!("shrunk 4096 -> 64 with 100 flows: {kept} kept");
    assert!(kept > 0 && kept <= 64, "{kept}");
    no_temporary_pins(root);

    // No size asked for: the object's default.
    drop(Datapath::load(root, false, None).expect("default"));
    assert_eq!(max_entries(root, CT_MAP), CT_MAP_SIZE);
    assert_eq!(ct_entries(root).len(), kept);
}

#[test]
fn a_temporary_pin_left_by_a_dead_run_is_recovered() {
    if !privileged("a_temporary_pin_left_by_a_dead_run_is_recovered") {
        return;
    }
    let dir = PinDir::new("recover");
    let root = dir.0.as_path();
    {
        let mut dp = Datapath::load(root, false, Some(512)).expect("first load");
        let mut ct: HashMap<MapData, FlowKey, NatEntry> = dp.map(CT_MAP).unwrap();
        let (k, v) = flow(1);
        ct.insert(k, v, 0).unwrap();
    }
    // A run that died between removing the old pin and renaming the new.
    let pin = maps_dir(root).join(CT_MAP);
    fs::rename(&pin, maps_dir(root).join(format!("{CT_MAP}_resizing"))).unwrap();
    drop(Datapath::load(root, false, Some(512)).expect("after the crash"));
    assert_eq!(ct_entries(root).len(), 1);
    no_temporary_pins(root);
}

/// The kernel memory a pinned map holds (bpftool's `bytes_memlock`).
fn memlock(root: &Path, map: &str) -> u64 {
    let pin = maps_dir(root).join(map);
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(&pin)
        .output()
        .expect("bpftool");
    assert!(out.status.success(), "bpftool: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["bytes_memlock"].as_u64().expect("bytes_memlock")
}

fn ipv6_lru_memory_mib(root: &Path) -> f64 {
    let bytes: u64 = IPV6_LRU_MAPS.iter().map(|m| memlock(root, m)).sum();
    bytes as f64 / (1024.0 * 1024.0)
}

#[test]
fn ipv6_off_makes_small_ipv6_maps_that_grow_with_their_entries_when_on() {
    if !privileged("ipv6_off_makes_small_ipv6_maps_that_grow_with_their_entries_when_on") {
        return;
    }
    let dir = PinDir::new("ipv6maps");
    let root = dir.0.as_path();
    {
        let mut dp = Datapath::load_sized(root, false, None, Ipv6Maps::Small).expect("IPv6 off");
        let mut ct6: HashMap<MapData, FlowKey6, NatEntry6> = dp.map(CT6_MAP).unwrap();
        for (k, v) in (0..10).map(flow6) {
            ct6.insert(k, v, 0).unwrap();
        }
    }
    for map in IPV6_LRU_MAPS {
        assert_eq!(max_entries(root, map), IPV6_OFF_ENTRIES, "{map}");
    }
    for map in [CT_MAP, RNAT_MAP] {
        assert_eq!(max_entries(root, map), CT_MAP_SIZE, "{map}: IPv4 untouched");
    }
    let small = ipv6_lru_memory_mib(root);

    // IPv6 on at the next start: full size, the flows carried over.
    drop(Datapath::load_sized(root, false, None, Ipv6Maps::Full).expect("IPv6 on"));
    for (map, entries) in sizes(CT_MAP_SIZE, true) {
        assert_eq!(max_entries(root, map), entries, "{map}");
    }
    let ct6: HashMap<MapData, FlowKey6, NatEntry6> = open_pinned(root, CT6_MAP).unwrap();
    assert_eq!(ct6.keys().count(), 10);
    drop(ct6);
    no_temporary_pins(root);
    let full = ipv6_lru_memory_mib(root);
    println!("IPv6 LRU maps: {full:.1} MiB full, {small:.2} MiB with IPv6 off");
    assert!(full > 50.0 && small < 1.0, "{full} / {small}");

    // Off again: small again, what fits kept.
    drop(Datapath::load_sized(root, false, None, Ipv6Maps::Small).expect("IPv6 off again"));
    assert_eq!(max_entries(root, CT6_MAP), IPV6_OFF_ENTRIES);
    let ct6: HashMap<MapData, FlowKey6, NatEntry6> = open_pinned(root, CT6_MAP).unwrap();
    assert_eq!(ct6.keys().count(), 10);
    no_temporary_pins(root);
}

/// The real daemon in a test namespace (manifests mode, no Services,
/// socket-level LB off) until its IPv6 conntrack map is pinned; returns
/// that map's size.
fn daemon_ct6_size(root: &Path) -> u32 {
    let manifests = std::env::temp_dir().join(format!("kep-ipv6auto-{}", std::process::id()));
    fs::create_dir_all(&manifests).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kube-ebpf-proxy"))
        .args(["run", "--socket-lb=false", "--poll-interval-ms", "100"])
        .arg("--manifests")
        .arg(&manifests)
        .arg("--bpffs")
        .arg(root)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the daemon");
    let pin = maps_dir(root).join(CT6_MAP);
    let started = std::time::Instant::now();
    // Pinned under the temporary name first when resized: wait for that
    // one to be gone too.
    let resizing = maps_dir(root).join(format!("{CT6_MAP}_resizing"));
    while !(pin.exists() && !resizing.exists() && started.elapsed().as_secs() >= 1) {
        assert!(started.elapsed().as_secs() < 20, "no {CT6_MAP} pinned");
        assert!(child.try_wait().unwrap().is_none(), "the daemon exited");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let size = max_entries(root, CT6_MAP);
    let _ = child.kill();
    let _ = child.wait();
    let _ = fs::remove_dir_all(&manifests);
    size
}

#[test]
fn the_daemon_sizes_ipv6_maps_down_on_an_ipv4_only_node_and_up_when_ipv6_comes() {
    let test = "the_daemon_sizes_ipv6_maps_down_on_an_ipv4_only_node_and_up_when_ipv6_comes";
    if !privileged(test) {
        return;
    }
    // IPv4 on d0 only (its link-local IPv6 address does not count).
    let _ns = proxy_userspace::testkit::testns::NetNsGuard::new().expect("test namespace");
    let dir = PinDir::new("ipv6auto");
    let root = dir.0.as_path();
    assert_eq!(daemon_ct6_size(root), IPV6_OFF_ENTRIES, "IPv4-only node");
    let ip = std::process::Command::new("ip")
        .args([
            "-6",
            "addr",
            "add",
            "fd00:244:2::1/64",
            "dev",
            "d0",
            "nodad",
        ])
        .status()
        .unwrap();
    assert!(ip.success());
    assert_eq!(daemon_ct6_size(root), CT_MAP_SIZE, "an IPv6 address now");
    no_temporary_pins(root);
}

/// A resize of 100,000 flows (conntrack and reverse NAT: 200,000 entries)
/// costs the reload this much more than a reload at the same size.
#[test]
fn a_resize_of_100000_flows_is_timed() {
    if !privileged("a_resize_of_100000_flows_is_timed") {
        return;
    }
    let dir = PinDir::new("resize_timed");
    let root = dir.0.as_path();
    {
        let mut dp = Datapath::load(root, false, Some(131_072)).expect("first load");
        for map in [CT_MAP, RNAT_MAP] {
            let mut m: HashMap<MapData, FlowKey, NatEntry> = dp.map(map).unwrap();
            for (mut k, v) in (0..100_000).map(flow) {
                // flow() repeats after 65,536: the port tells them apart.
                k.sport = (40_000 + (v.backend_id >> 16) as u16).to_be_bytes();
                m.insert(k, v, 0).unwrap();
            }
        }
    }
    let timed = |max| {
        let started = std::time::Instant::now();
        drop(Datapath::load(root, false, Some(max)).expect("load"));
        started.elapsed()
    };
    let resized = timed(262_144);
    let same = timed(262_144);
    assert_eq!(ct_entries(root).len(), 100_000);
    no_temporary_pins(root);
    println!(
        "resize of 2 x 100,000 entries: load {resized:?}, reload at the same size {same:?}: \
         the copy costs about {:?}",
        resized.saturating_sub(same)
    );
}
