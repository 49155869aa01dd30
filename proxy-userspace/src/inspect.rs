//! `kube-ebpf-proxy inspect`: the pinned maps, decoded, IPv4 and IPv6
//! (the IPv6 maps of an older daemon's pins may be absent: then there is
//! just no IPv6 row). Works whether or not the daemon runs, since it only
//! reads the pins.

use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

use anyhow::{Result, bail};
use aya::maps::{HashMap, MapData, PerCpuArray};
use proxy_common::*;
use serde::Serialize;

use crate::{
    cli::{InspectWhat, OutputFormat},
    datapath::{maps_dir, open_pinned},
};

/// Fails with one line when nothing is pinned at `root`, saying whether a
/// daemon runs (and where it pins), or when maps of a newer layout than
/// this build's are pinned there (a newer daemon's), naming them, instead
/// of the kernel's error for the first map that is not there.
pub fn require_pins(root: &Path) -> Result<()> {
    if let Some(newer) = crate::datapath::migrate::newer_layouts(&maps_dir(root))? {
        bail!(
            "{newer}: a newer kube-ebpf-proxy pinned them and serves from them; inspect them \
             with that build"
        );
    }
    if maps_dir(root).join(SVC_MAP).exists() {
        return Ok(());
    }
    let daemons: Vec<String> = running_daemons()
        .into_iter()
        .map(|(pid, bpffs)| match bpffs {
            Some(b) => format!("pid {pid} with --bpffs {b}"),
            None => format!("pid {pid} with the default --bpffs or its config file's"),
        })
        .collect();
    if daemons.is_empty() {
        bail!(
            "nothing is pinned at {}, and no kube-ebpf-proxy daemon is running here \
             (`kube-ebpf-proxy run` pins its maps there)",
            root.display()
        );
    }
    bail!(
        "nothing is pinned at {}; a kube-ebpf-proxy daemon is running: {} \
         (give inspect the same --bpffs)",
        root.display(),
        daemons.join("; ")
    )
}

/// `kube-ebpf-proxy run` processes this /proc shows: pid and the `--bpffs`
/// they were given on the command line.
fn running_daemons() -> Vec<(u32, Option<String>)> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out: Vec<(u32, Option<String>)> = dir
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let program = Path::new(args.first()?).file_name()?.to_str()?;
            let is_daemon = program == "kube-ebpf-proxy" && args.get(1).is_some_and(|a| a == "run");
            is_daemon.then(|| (pid, bpffs_arg(&args)))
        })
        .collect();
    out.sort();
    out
}

fn bpffs_arg(args: &[String]) -> Option<String> {
    args.iter()
        .enumerate()
        .find_map(|(i, a)| match a.strip_prefix("--bpffs") {
            Some("") => args.get(i + 1).cloned(),
            Some(rest) => rest.strip_prefix('=').map(str::to_string),
            None => None,
        })
}

fn endpoint(addr: impl Into<IpAddr>, port: [u8; 2]) -> String {
    SocketAddr::new(addr.into(), u16::from_be_bytes(port)).to_string()
}

fn v4(addr: [u8; 4]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(addr))
}

fn v6(addr: [u8; 16]) -> IpAddr {
    IpAddr::V6(Ipv6Addr::from(addr))
}

fn proto_name(p: u8) -> &'static str {
    match p {
        IPPROTO_TCP => "TCP",
        IPPROTO_UDP => "UDP",
        _ => "?",
    }
}

#[derive(Serialize)]
pub struct ServiceRow {
    /// `namespace/name:port`, from the name map.
    pub service: String,
    pub frontend: String,
    pub protocol: &'static str,
    pub kind: &'static str,
    pub svc_id: u32,
    pub generation: u16,
    pub backends: Vec<String>,
}

#[derive(Serialize)]
pub struct BackendRow {
    pub id: u32,
    pub address: String,
    pub protocol: &'static str,
    pub local: bool,
}

#[derive(Serialize)]
pub struct FlowRow {
    pub direction: &'static str,
    pub protocol: &'static str,
    pub from: String,
    pub to: String,
    pub rewritten_from: String,
    pub rewritten_to: String,
    pub svc_id: u32,
    pub backend_id: u32,
    pub flags: Vec<&'static str>,
}

#[derive(Serialize)]
pub struct CounterRow {
    pub counter: &'static str,
    pub drop: bool,
    pub packets: u64,
}

/// How full one of the LRU maps the datapath writes is.
#[derive(Debug, Serialize)]
pub struct MapFillRow {
    pub map: &'static str,
    pub entries: u64,
    pub max: u32,
}

/// The fill of the conntrack, reverse-NAT and affinity maps (IPv6 ones when
/// pinned), their sizes read from the pins (`--conntrack-max` sets them).
/// Entries are counted by walking the keys: one syscall per entry.
pub fn map_fill(root: &Path) -> Result<Vec<MapFillRow>> {
    fn fill<K: aya::Pod, V: aya::Pod>(root: &Path, map: &'static str) -> Result<MapFillRow> {
        let max = crate::datapath::resize::pinned_max_entries(&maps_dir(root).join(map))?
            .unwrap_or_default();
        let m: HashMap<MapData, K, V> = open_pinned(root, map)?;
        Ok(MapFillRow {
            map,
            entries: m.keys().count() as u64,
            max,
        })
    }
    let mut rows = vec![
        fill::<FlowKey, NatEntry>(root, CT_MAP)?,
        fill::<FlowKey, NatEntry>(root, RNAT_MAP)?,
        fill::<AffKey, AffValue>(root, AFF_MAP)?,
    ];
    if maps_dir(root).join(CT6_MAP).exists() {
        rows.push(fill::<FlowKey6, NatEntry6>(root, CT6_MAP)?);
        rows.push(fill::<FlowKey6, NatEntry6>(root, RNAT6_MAP)?);
    }
    if maps_dir(root).join(AFF6_MAP).exists() {
        rows.push(fill::<AffKey6, AffValue>(root, AFF6_MAP)?);
    }
    Ok(rows)
}

fn hash<K: aya::Pod + Ord, V: aya::Pod>(root: &Path, name: &str) -> Result<Vec<(K, V)>> {
    let map: HashMap<MapData, K, V> = open_pinned(root, name)?;
    let mut rows: Vec<(K, V)> = map.iter().collect::<Result<_, _>>()?;
    rows.sort_by_key(|a| a.0);
    Ok(rows)
}

/// An IPv6 map: empty when it is not pinned (a daemon from before IPv6).
fn hash6<K: aya::Pod + Ord, V: aya::Pod>(root: &Path, name: &str) -> Result<Vec<(K, V)>> {
    if !maps_dir(root).join(name).exists() {
        return Ok(Vec::new());
    }
    hash(root, name)
}

/// A frontend as both families' service maps hold it: address, port,
/// protocol, value.
type Frontend = (IpAddr, [u8; 2], u8, SvcValue);

pub fn services(root: &Path) -> Result<Vec<ServiceRow>> {
    let slots: BTreeMap<SlotKey, SlotValue> = hash(root, SLOT_MAP)?.into_iter().collect();
    let mut backends: BTreeMap<u32, String> = BTreeMap::new();
    for (k, b) in hash::<BackendKey, Backend>(root, BACKEND_MAP)? {
        backends.insert(k.backend_id, endpoint(v4(b.addr), b.port));
    }
    for (k, b) in hash6::<BackendKey, Backend6>(root, BACKEND6_MAP)? {
        backends.insert(k.backend_id, endpoint(v6(b.addr), b.port));
    }
    let names: BTreeMap<u32, SvcName> = hash(root, NAME_MAP)?.into_iter().collect();
    let mut frontends: Vec<Frontend> = hash::<SvcKey, SvcValue>(root, SVC_MAP)?
        .into_iter()
        .map(|(k, v)| (v4(k.addr), k.port, k.proto, v))
        .collect();
    frontends.extend(
        hash6::<SvcKey6, SvcValue>(root, SVC6_MAP)?
            .into_iter()
            .map(|(k, v)| (v6(k.addr), k.port, k.proto, v)),
    );
    Ok(frontends
        .into_iter()
        .map(|fe| service_row(fe, &slots, &backends, &names))
        .collect())
}

fn service_row(
    (addr, port, proto, v): Frontend,
    slots: &BTreeMap<SlotKey, SlotValue>,
    backends: &BTreeMap<u32, String>,
    names: &BTreeMap<u32, SvcName>,
) -> ServiceRow {
    let bes = (0..v.count)
        .map(|slot| {
            let sk = SlotKey {
                svc_id: v.svc_id,
                generation: v.generation,
                slot,
            };
            slots
                .get(&sk)
                .and_then(|s| backends.get(&s.backend_id))
                .cloned()
                .unwrap_or_else(|| "<missing>".into())
        })
        .collect();
    let node_port = addr.is_unspecified();
    ServiceRow {
        service: names
            .get(&v.svc_id)
            .map_or_else(|| "?".to_string(), |n| n.as_str().to_string()),
        frontend: match (node_port, addr) {
            (true, IpAddr::V4(_)) => format!("*:{}", u16::from_be_bytes(port)),
            (true, IpAddr::V6(_)) => format!("[*]:{}", u16::from_be_bytes(port)),
            (false, _) => endpoint(addr, port),
        },
        protocol: proto_name(proto),
        kind: if node_port {
            "NodePort"
        } else if v.flags & SVC_F_EXTERNAL != 0 {
            "External"
        } else {
            "ClusterIP"
        },
        svc_id: v.svc_id,
        generation: v.generation,
        backends: bes,
    }
}

pub fn backends(root: &Path) -> Result<Vec<BackendRow>> {
    let row = |id, addr: IpAddr, port, proto, flags: u8| BackendRow {
        id,
        address: endpoint(addr, port),
        protocol: proto_name(proto),
        local: flags & BE_F_LOCAL != 0,
    };
    let mut rows: Vec<BackendRow> = hash::<BackendKey, Backend>(root, BACKEND_MAP)?
        .into_iter()
        .map(|(k, b)| row(k.backend_id, v4(b.addr), b.port, b.proto, b.flags))
        .collect();
    rows.extend(
        hash6::<BackendKey, Backend6>(root, BACKEND6_MAP)?
            .into_iter()
            .map(|(k, b)| row(k.backend_id, v6(b.addr), b.port, b.proto, b.flags)),
    );
    Ok(rows)
}

/// A conntrack or reverse-NAT entry of either family: (from, to) as the
/// packet has them, then as they are rewritten.
struct Flow {
    proto: u8,
    ends: [(IpAddr, [u8; 2]); 4],
    svc_id: u32,
    backend_id: u32,
    flags: u8,
}

fn flows(root: &Path, v4_map: &str, v6_map: &str) -> Result<Vec<Flow>> {
    let mut out: Vec<Flow> = hash::<FlowKey, NatEntry>(root, v4_map)?
        .into_iter()
        .map(|(k, v)| Flow {
            proto: k.proto,
            ends: [
                (v4(k.saddr), k.sport),
                (v4(k.daddr), k.dport),
                (v4(v.saddr), v.sport),
                (v4(v.daddr), v.dport),
            ],
            svc_id: v.svc_id,
            backend_id: v.backend_id,
            flags: v.flags,
        })
        .collect();
    out.extend(
        hash6::<FlowKey6, NatEntry6>(root, v6_map)?
            .into_iter()
            .map(|(k, v)| Flow {
                proto: k.proto,
                ends: [
                    (v6(k.saddr), k.sport),
                    (v6(k.daddr), k.dport),
                    (v6(v.saddr), v.sport),
                    (v6(v.daddr), v.dport),
                ],
                svc_id: v.svc_id,
                backend_id: v.backend_id,
                flags: v.flags,
            }),
    );
    Ok(out)
}

pub fn conntrack(root: &Path) -> Result<Vec<FlowRow>> {
    let mut rows = Vec::new();
    for (maps, direction) in [
        ((CT_MAP, CT6_MAP), "original"),
        ((RNAT_MAP, RNAT6_MAP), "reply"),
    ] {
        for f in flows(root, maps.0, maps.1)? {
            let mut flags = Vec::new();
            for (bit, name) in [
                (NAT_F_SNAT, "snat"),
                (NAT_F_CLOSING, "closing"),
                (NAT_F_RESET, "reset"),
                (NAT_F_HOST, "host"),
            ] {
                if f.flags & bit != 0 {
                    flags.push(name);
                }
            }
            let [from, to, rewritten_from, rewritten_to] = f.ends.map(|(a, p)| endpoint(a, p));
            rows.push(FlowRow {
                direction,
                protocol: proto_name(f.proto),
                from,
                to,
                rewritten_from,
                rewritten_to,
                svc_id: f.svc_id,
                backend_id: f.backend_id,
                flags,
            });
        }
    }
    Ok(rows)
}

pub fn counters(root: &Path) -> Result<Vec<CounterRow>> {
    let stats: PerCpuArray<MapData, u64> = open_pinned(root, STATS_MAP)?;
    Counter::ALL
        .iter()
        .map(|c| {
            Ok(CounterRow {
                counter: c.name(),
                drop: c.is_drop(),
                packets: stats.get(&(*c as u32), 0)?.iter().sum(),
            })
        })
        .collect()
}

fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(header.iter().map(|s| s.to_string()).collect());
    out.push('\n');
    for r in rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    out
}

pub fn render(root: &Path, what: InspectWhat, format: OutputFormat) -> Result<String> {
    let json = format == OutputFormat::Json;
    match what {
        InspectWhat::Services => show(
            services(root)?,
            json,
            &[
                "SERVICE", "FRONTEND", "PROTO", "KIND", "ID", "GEN", "BACKENDS",
            ],
            service_cells,
        ),
        InspectWhat::Backends => show(
            backends(root)?,
            json,
            &["ID", "BACKEND", "PROTO", "LOCAL"],
            |r| {
                vec![
                    r.id.to_string(),
                    r.address,
                    r.protocol.into(),
                    r.local.to_string(),
                ]
            },
        ),
        InspectWhat::Conntrack => show(
            conntrack(root)?,
            json,
            &[
                "DIR",
                "PROTO",
                "FROM",
                "TO",
                "REWRITTEN FROM",
                "REWRITTEN TO",
                "SVC",
                "BE",
                "FLAGS",
            ],
            flow_cells,
        ),
        InspectWhat::Stats => stats(root, json),
    }
}

/// The counters, then each LRU map's entries and size. JSON: one array,
/// counter rows (`counter`, `drop`, `packets`) then map rows (`map`,
/// `entries`, `max`).
fn stats(root: &Path, json: bool) -> Result<String> {
    let counters = counters(root)?;
    let maps = map_fill(root)?;
    if json {
        let mut rows: Vec<serde_json::Value> = counters
            .iter()
            .map(serde_json::to_value)
            .collect::<Result<_, _>>()?;
        for m in &maps {
            rows.push(serde_json::to_value(m)?);
        }
        return Ok(serde_json::to_string_pretty(&rows)?);
    }
    let mut out = show(counters, false, &["COUNTER", "DROP", "PACKETS"], |r| {
        vec![r.counter.into(), r.drop.to_string(), r.packets.to_string()]
    })?;
    out.push('\n');
    out.push_str(&show(maps, false, &["MAP", "ENTRIES", "MAX"], |r| {
        vec![r.map.into(), r.entries.to_string(), r.max.to_string()]
    })?);
    Ok(out)
}

/// Rows as pretty JSON, or as a table with `header` and a row's `cells`.
fn show<R: Serialize>(
    rows: Vec<R>,
    json: bool,
    header: &[&str],
    cells: fn(R) -> Vec<String>,
) -> Result<String> {
    if json {
        return Ok(serde_json::to_string_pretty(&rows)?);
    }
    Ok(table(header, rows.into_iter().map(cells).collect()))
}

fn service_cells(r: ServiceRow) -> Vec<String> {
    vec![
        r.service,
        r.frontend,
        r.protocol.into(),
        r.kind.into(),
        r.svc_id.to_string(),
        r.generation.to_string(),
        if r.backends.is_empty() {
            "(none: rejected)".into()
        } else {
            r.backends.join(",")
        },
    ]
}

fn flow_cells(r: FlowRow) -> Vec<String> {
    vec![
        r.direction.into(),
        r.protocol.into(),
        r.from,
        r.to,
        r.rewritten_from,
        r.rewritten_to,
        r.svc_id.to_string(),
        r.backend_id.to_string(),
        r.flags.join(","),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_pins_are_named_in_one_line_as_a_newer_daemons() {
        let root = std::env::temp_dir().join(format!("kep-inspect-{}", std::process::id()));
        let maps = maps_dir(&root);
        fs::create_dir_all(&maps).unwrap();
        for name in [SVC_MAP, "KEP_CT_V9", "KEP_RNAT_V9", "KEP_NAME_V1"] {
            fs::write(maps.join(name), b"").unwrap();
        }
        let err = format!("{:#}", require_pins(&root).unwrap_err());
        fs::remove_dir_all(&root).unwrap();
        assert!(!err.contains('\n'), "{err}");
        for says in [
            "holds maps of a newer layout than this build knows",
            &format!("KEP_CT_V9 (this build: {CT_MAP})"),
            &format!("KEP_RNAT_V9 (this build: {RNAT_MAP})"),
            "a newer kube-ebpf-proxy pinned them",
        ] {
            assert!(err.contains(says), "{err:?} does not say {says:?}");
        }
        assert!(!err.contains("KEP_NAME_V1"), "{err}");
    }
}
