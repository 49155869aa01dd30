//! `kube-ebpf-proxy inspect`: the pinned maps, decoded. Works whether or not
//! the daemon runs, since it only reads the pins.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use anyhow::Result;
use aya::maps::{HashMap, MapData, PerCpuArray};
use proxy_common::*;
use serde::Serialize;

use crate::{
    cli::{InspectWhat, OutputFormat},
    datapath::open_pinned,
};

fn endpoint(addr: [u8; 4], port: [u8; 2]) -> String {
    SocketAddrV4::new(Ipv4Addr::from(addr), u16::from_be_bytes(port)).to_string()
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

fn hash<K: aya::Pod + Ord, V: aya::Pod>(root: &Path, name: &str) -> Result<Vec<(K, V)>> {
    let map: HashMap<MapData, K, V> = open_pinned(root, name)?;
    let mut rows: Vec<(K, V)> = map.iter().collect::<Result<_, _>>()?;
    rows.sort_by_key(|a| a.0);
    Ok(rows)
}

pub fn services(root: &Path) -> Result<Vec<ServiceRow>> {
    let slots: std::collections::BTreeMap<SlotKey, SlotValue> =
        hash::<SlotKey, SlotValue>(root, SLOT_MAP)?
            .into_iter()
            .collect();
    let backends: std::collections::BTreeMap<BackendKey, Backend> =
        hash::<BackendKey, Backend>(root, BACKEND_MAP)?
            .into_iter()
            .collect();
    let names: std::collections::BTreeMap<u32, SvcName> =
        hash::<u32, SvcName>(root, NAME_MAP)?.into_iter().collect();
    let mut rows = Vec::new();
    for (k, v) in hash::<SvcKey, SvcValue>(root, SVC_MAP)? {
        let bes = (0..v.count)
            .map(|slot| {
                let sk = SlotKey {
                    svc_id: v.svc_id,
                    generation: v.generation,
                    slot,
                };
                match slots.get(&sk).and_then(|s| {
                    backends.get(&BackendKey {
                        backend_id: s.backend_id,
                    })
                }) {
                    Some(b) => endpoint(b.addr, b.port),
                    None => "<missing>".into(),
                }
            })
            .collect();
        rows.push(ServiceRow {
            service: names
                .get(&v.svc_id)
                .map_or_else(|| "?".to_string(), |n| n.as_str().to_string()),
            frontend: if k.addr == [0; 4] {
                format!("*:{}", u16::from_be_bytes(k.port))
            } else {
                endpoint(k.addr, k.port)
            },
            protocol: proto_name(k.proto),
            kind: if k.addr == [0; 4] {
                "NodePort"
            } else if v.flags & SVC_F_EXTERNAL != 0 {
                "External"
            } else {
                "ClusterIP"
            },
            svc_id: v.svc_id,
            generation: v.generation,
            backends: bes,
        });
    }
    Ok(rows)
}

pub fn backends(root: &Path) -> Result<Vec<BackendRow>> {
    Ok(hash::<BackendKey, Backend>(root, BACKEND_MAP)?
        .into_iter()
        .map(|(k, b)| BackendRow {
            id: k.backend_id,
            address: endpoint(b.addr, b.port),
            protocol: proto_name(b.proto),
            local: b.flags & BE_F_LOCAL != 0,
        })
        .collect())
}

pub fn conntrack(root: &Path) -> Result<Vec<FlowRow>> {
    let mut rows = Vec::new();
    for (map, direction) in [(CT_MAP, "original"), (RNAT_MAP, "reply")] {
        for (k, v) in hash::<FlowKey, NatEntry>(root, map)? {
            let mut flags = Vec::new();
            for (bit, name) in [
                (NAT_F_SNAT, "snat"),
                (NAT_F_CLOSING, "closing"),
                (NAT_F_HOST, "host"),
            ] {
                if v.flags & bit != 0 {
                    flags.push(name);
                }
            }
            rows.push(FlowRow {
                direction,
                protocol: proto_name(k.proto),
                from: endpoint(k.saddr, k.sport),
                to: endpoint(k.daddr, k.dport),
                rewritten_from: endpoint(v.saddr, v.sport),
                rewritten_to: endpoint(v.daddr, v.dport),
                svc_id: v.svc_id,
                backend_id: v.backend_id,
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
        InspectWhat::Stats => show(
            counters(root)?,
            json,
            &["COUNTER", "DROP", "PACKETS"],
            |r| vec![r.counter.into(), r.drop.to_string(), r.packets.to_string()],
        ),
    }
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
