//! bpftool reads every pinned map with named fields: the maps carry BTF
//! for their keys and values (`#[btf_map]`, built with `--btf`), so an
//! operator on the node sees structures, not hex. Every map pinned under
//! the bpffs is checked, so a new map without BTF fails here.

use anyhow::{Context as _, Result};
use common::*;
use lab::addr;

mod common;

/// The map's entries as `bpftool -j map dump` gives them, with BTF.
fn dump(c: &Cluster, path: &str) -> Result<Vec<serde_json::Value>> {
    let out = c
        .lab
        .ns(addr::NODE_A)
        .exec("bpftool", &["-j", "map", "dump", "pinned", path])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| String::from_utf8_lossy(&out.stdout).into_owned())?;
    Ok(v.as_array().context("a JSON array")?.clone())
}

/// `bpftool -j map show` of the map: its type, BTF id and so on.
fn show(c: &Cluster, path: &str) -> Result<serde_json::Value> {
    let out = c
        .lab
        .ns(addr::NODE_A)
        .exec("bpftool", &["-j", "map", "show", "pinned", path])?;
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// A formatted value, or for a per-CPU map the first CPU's value.
fn inner_value(v: &serde_json::Value) -> &serde_json::Value {
    match v.as_array().and_then(|cpus| cpus.first()) {
        Some(cpu) => cpu.get("value").unwrap_or(cpu),
        None => v,
    }
}

#[test]
fn every_pinned_map_dumps_with_named_fields() -> Result<()> {
    let Some(c) = Cluster::start("bpftool_fields", &placement_manifests()) else {
        return Ok(());
    };
    // Connections, so that conntrack and the counters have entries: a pod's
    // (balanced at its socket when socket-level LB is on) and an outside
    // client's to a NodePort (balanced per packet, with conntrack).
    lab::tcp_request(c.lab.ns(CLIENT_POD), sa("10.96.0.11:80"))?;
    lab::tcp_request(c.lab.ns(addr::CLIENT), sa("192.168.200.11:30011"))?;
    let maps = c.bpffs(addr::NODE_A).join("maps");
    let mut checked = Vec::new();
    let mut empty = Vec::new();
    let mut socket_storage = Vec::new();
    for entry in std::fs::read_dir(&maps)? {
        let path = entry?.path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("KEP_SKPEER") {
            // Socket storage hangs off the sockets: the kernel walks no
            // keys of it, so bpftool cannot dump it. It still needs BTF
            // (the kernel refuses one without).
            let info = show(&c, &path.display().to_string())?;
            assert_eq!(info["type"], "sk_storage", "{name}: {info}");
            assert!(info["btf_id"].as_u64() > Some(0), "{name}: no BTF: {info}");
            socket_storage.push(name);
            continue;
        }
        let entries = dump(&c, &path.display().to_string())?;
        let Some(first) = entries.first() else {
            empty.push(name);
            continue;
        };
        let formatted = first
            .get("formatted")
            .with_context(|| format!("{name}: no BTF-formatted entry: {first}"))?;
        let key = formatted.get("key").context("formatted key")?;
        let value = formatted
            .get("value")
            .or_else(|| formatted.get("values"))
            .context("formatted value")?;
        // A struct must come with its field names; a counter is a number
        // (KEP_STATS_V1's u64 per reason), a key may be an array index.
        let inner = inner_value(value);
        eprintln!(
            "{name}: key {} value {}",
            serde_json::to_string(key)?,
            serde_json::to_string(inner)?
        );
        match inner {
            serde_json::Value::Object(fields) => {
                assert!(!fields.is_empty(), "{name}: unnamed value {value}")
            }
            serde_json::Value::Number(_) => {}
            other => panic!("{name}: neither named fields nor a number: {other}"),
        }
        assert!(
            key.is_object() || key.is_number(),
            "{name}: key neither named fields nor an index: {key}"
        );
        checked.push(name);
    }
    eprintln!(
        "checked {checked:?}; empty (nothing to dump) {empty:?}; socket storage {socket_storage:?}"
    );
    assert_eq!(socket_storage.len(), 2, "{socket_storage:?}");
    // Every map has entries once a connection went through, but those of
    // features these manifests do not use: fragments, session affinity,
    // source ranges, socket-level LB state, IPv6.
    const UNUSED_HERE: [&str; 6] = [
        "KEP_FRAG",
        "KEP_AFF",
        "KEP_SRCRNG",
        "KEP_SK",
        "KEP_SCR",
        "6_V",
    ];
    assert!(
        empty.iter().all(|m| UNUSED_HERE
            .iter()
            .any(|u| m.starts_with(u) || m.contains(u))),
        "unexpectedly empty: {empty:?}"
    );
    assert!(checked.len() >= 8, "{checked:?}");
    Ok(())
}
