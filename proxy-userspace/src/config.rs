//! The `--config` file: the settings of `kube-ebpf-proxy run` as YAML (or
//! JSON), for a ConfigMap. Flags given on the command line win over the file;
//! the file wins over the flags' defaults.
//!
//! ```yaml
//! apiVersion: kube-ebpf-proxy.config/v1alpha1
//! kind: KubeEbpfProxyConfiguration
//! hostnameOverride: node-a              # --hostname-override
//! healthzBindAddress: 0.0.0.0:10256     # --healthz-bind-address
//! metricsBindAddress: 127.0.0.1:10249   # --metrics-bind-address
//! nodePortAddresses: [192.168.0.0/16]   # --nodeport-addresses
//! clientConnection:
//!   kubeconfig: /etc/kube/config        # --kubeconfig
//! logging:
//!   format: json                        # --log-format
//!   level: info                         # --log-level (RUST_LOG wins)
//! master: https://10.0.0.1:6443         # --master
//! bpffs: /sys/fs/bpf/kube-ebpf-proxy    # --bpffs
//! devices: [eth0]                       # --devices
//! # manifests: /etc/objs               # --manifests, instead of an API server
//! snatPortRange: 61000-65535            # --snat-port-range
//! pollIntervalMs: 200                   # --poll-interval-ms
//! minSyncPeriodMs: 50                   # --min-sync-period-ms
//! serviceProxyName: ebpf                # --service-proxy-name
//! bpfDebug: false                       # --bpf-debug
//! ```
//!
//! * Field names are those of kube-proxy's `KubeProxyConfiguration`
//!   (`kubeproxy.config.k8s.io/v1alpha1`) where the meaning is the same
//!   (`hostnameOverride`, `healthzBindAddress`, `metricsBindAddress`,
//!   `nodePortAddresses`, `clientConnection.kubeconfig`, `logging.format`);
//!   the others are ours.
//! * kube-proxy's own file is read too, as it is ([`kube_proxy`]): what it
//!   says that means the same here is used, what configures nothing here is
//!   returned as [`Ignored`] (the daemon logs it once), and what cannot be
//!   honoured is refused with the field's name. `--config` may be given
//!   twice, kube-proxy's file then ours for the settings kube-proxy lacks:
//!   a later file's value replaces an earlier one's.
//! * Every field is optional except `apiVersion` and `kind`. An empty string
//!   for a name or path (`hostnameOverride: ""`, `kubeconfig: ""`) means unset,
//!   as in kube-proxy's files.
//! * Unknown fields are errors (a typo must not silently fall back to a
//!   default), and so are values the flag would refuse: every error names
//!   the field, and the line when the YAML parser knows it.
//! * `manifests` excludes `clientConnection.kubeconfig` and `master`, as
//!   `--manifests` excludes `--kubeconfig` and `--master`. Across the two
//!   sources the command line decides: `--manifests` on the command line
//!   ignores the file's `kubeconfig` and `master`, and `--kubeconfig` or
//!   `--master` there ignores the file's `manifests`.
//! * kube-proxy's `minSyncPeriod` (a duration, per proxy mode) is not read;
//!   ours is `minSyncPeriodMs`, in milliseconds like the flag.
//!
//! Merging: [`merge`] takes the parsed [`RunArgs`] and a predicate saying
//! which flags the user gave (clap's `ArgMatches::value_source`, see
//! [`given_on_command_line`]); every other setting the file has replaces the
//! flag's default. Comparing a value with its default would not do:
//! `--log-format text` given explicitly must beat `format: json` in the file.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use clap::{ArgMatches, parser::ValueSource};
use serde::Deserialize;

use crate::{
    cidr::Cidr,
    cli::{HostRouting, Ipv6Mode, LogFormat, RunArgs},
};

pub mod kube_proxy;
pub use kube_proxy::Ignored;

/// `apiVersion` of the file.
pub const API_VERSION: &str = "kube-ebpf-proxy.config/v1alpha1";
/// `kind` of the file.
pub const KIND: &str = "KubeEbpfProxyConfiguration";
/// kube-proxy's own configuration group: only v1alpha1 exists.
const KUBE_PROXY_GROUP: &str = "kubeproxy.config.k8s.io/";

/// The `--config` file, checked. `None` leaves the flag's value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileConfig {
    /// `--hostname-override`: this node's name.
    pub hostname_override: Option<String>,
    /// `--healthz-bind-address`: /healthz and /livez.
    pub healthz_bind_address: Option<SocketAddr>,
    /// `--metrics-bind-address`: /metrics.
    pub metrics_bind_address: Option<SocketAddr>,
    /// `--nodeport-addresses`: NodePorts answer on node addresses within
    /// these CIDRs (empty: every address).
    pub node_port_addresses: Option<Vec<Cidr>>,
    /// `clientConnection.kubeconfig`: `--kubeconfig`.
    pub kubeconfig: Option<PathBuf>,
    /// `logging.format`: `--log-format`.
    pub log_format: Option<LogFormat>,
    /// `logging.level`: `--log-level` (ours; kube-proxy's `verbosity` is a
    /// klog number).
    pub log_level: Option<String>,
    /// `--master`: the API server's URL (a flag only, in kube-proxy).
    pub master: Option<String>,
    /// `--bpffs`: where maps and links are pinned.
    pub bpffs: Option<PathBuf>,
    /// `--devices`: attach only to these devices (empty: every device).
    pub devices: Option<Vec<String>>,
    /// `--manifests`: Service and EndpointSlice manifests instead of an API
    /// server.
    pub manifests: Option<PathBuf>,
    /// `--snat-port-range`: (FIRST, LAST).
    pub snat_port_range: Option<(u16, u16)>,
    /// `--poll-interval-ms`.
    pub poll_interval_ms: Option<u64>,
    /// `--min-sync-period-ms`.
    pub min_sync_period_ms: Option<u64>,
    /// `--service-proxy-name`: serve the Services labelled
    /// `service.kubernetes.io/service-proxy-name` with this value.
    pub service_proxy_name: Option<String>,
    /// `--bpf-debug`: the datapath's debug events in the log.
    pub bpf_debug: Option<bool>,
    /// `clusterCIDR` (comma separated, as kube-proxy's): `--cluster-cidr`.
    pub cluster_cidr: Option<Vec<Cidr>>,
    /// `masqueradeAll`: `--masquerade-all`.
    pub masquerade_all: Option<bool>,
    /// kube-proxy's `conntrack.maxPerCore`: with `conntrack_min`, sizes the
    /// conntrack maps when `--conntrack-max` is not given (0: leave them).
    pub conntrack_max_per_core: Option<u32>,
    /// kube-proxy's `conntrack.min`.
    pub conntrack_min: Option<u32>,
    /// `serviceClusterIPRange` (ours; comma separated):
    /// `--service-cluster-ip-range`.
    pub service_cluster_ip_range: Option<Vec<Cidr>>,
    /// `manifestServiceCIDRs` (ours; comma separated):
    /// `--manifest-service-cidrs`.
    pub manifest_service_cidrs: Option<Vec<Cidr>>,
    /// `--socket-lb`: socket-level load balancing.
    pub socket_lb: Option<bool>,
    /// `bpfHostRouting` (ours: `auto`, `true` or `false`):
    /// `--bpf-host-routing`.
    pub bpf_host_routing: Option<HostRouting>,
    /// `ipv6` (ours: `auto`, `on` or `off`): `--ipv6`.
    pub ipv6: Option<Ipv6Mode>,
    /// `--cgroup-root`: the cgroup v2 directory socket-level load balancing
    /// applies to.
    pub cgroup_root: Option<PathBuf>,
}

/// The file as written: every field a known name and a YAML type (serde
/// reports unknown fields and wrong types with their path and line); values
/// are checked in [`FileConfig::try_from`], whose errors name the field.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Raw {
    // Checked by parse_str first; here so that they are known fields.
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    hostname_override: Option<String>,
    healthz_bind_address: Option<String>,
    metrics_bind_address: Option<String>,
    node_port_addresses: Option<Vec<String>>,
    client_connection: Option<RawClientConnection>,
    logging: Option<RawLogging>,
    master: Option<String>,
    bpffs: Option<String>,
    devices: Option<Vec<String>>,
    manifests: Option<String>,
    snat_port_range: Option<String>,
    poll_interval_ms: Option<u64>,
    min_sync_period_ms: Option<u64>,
    service_proxy_name: Option<String>,
    bpf_debug: Option<bool>,
    #[serde(rename = "clusterCIDR")]
    cluster_cidr: Option<String>,
    masquerade_all: Option<bool>,
    #[serde(rename = "serviceClusterIPRange")]
    service_cluster_ip_range: Option<String>,
    #[serde(rename = "manifestServiceCIDRs")]
    manifest_service_cidrs: Option<String>,
    #[serde(rename = "socketLB")]
    socket_lb: Option<bool>,
    /// A YAML boolean or `auto`: read as its text.
    bpf_host_routing: Option<String>,
    ipv6: Option<String>,
    cgroup_root: Option<String>,
    conntrack: Option<RawConntrack>,
}

/// kube-proxy's `conntrack`: the sizing fields (the nf_conntrack timeouts
/// have no meaning here).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConntrack {
    max_per_core: Option<u32>,
    min: Option<u32>,
}

/// kube-proxy's `clientConnection`; only `kubeconfig` has a meaning here.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawClientConnection {
    kubeconfig: Option<String>,
}

/// kube-proxy's `logging`; only `format`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawLogging {
    format: Option<String>,
    level: Option<String>,
}

impl TryFrom<Raw> for FileConfig {
    /// Every bad value, one per line, each naming its field.
    type Error = String;

    fn try_from(raw: Raw) -> Result<FileConfig, String> {
        let mut errors = Errors(Vec::new());
        let (format, level) = raw.logging.map_or((None, None), |l| (l.format, l.level));
        let config = FileConfig {
            hostname_override: non_empty(raw.hostname_override),
            healthz_bind_address: errors.parse(
                "healthzBindAddress",
                raw.healthz_bind_address,
                parse_addr,
            ),
            metrics_bind_address: errors.parse(
                "metricsBindAddress",
                raw.metrics_bind_address,
                parse_addr,
            ),
            node_port_addresses: raw.node_port_addresses.map(|list| {
                let items = list.into_iter().enumerate();
                items
                    .filter_map(|(i, c)| {
                        errors.parse(&format!("nodePortAddresses[{i}]"), Some(c), parse_cidr)
                    })
                    .collect()
            }),
            kubeconfig: non_empty(raw.client_connection.and_then(|c| c.kubeconfig))
                .map(PathBuf::from),
            log_format: errors.parse("logging.format", format, parse_log_format),
            log_level: non_empty(level),
            master: non_empty(raw.master),
            bpffs: non_empty(raw.bpffs).map(PathBuf::from),
            devices: raw.devices,
            manifests: non_empty(raw.manifests).map(PathBuf::from),
            snat_port_range: errors.parse("snatPortRange", raw.snat_port_range, parse_port_range),
            poll_interval_ms: raw.poll_interval_ms,
            min_sync_period_ms: raw.min_sync_period_ms,
            service_proxy_name: non_empty(raw.service_proxy_name),
            bpf_debug: raw.bpf_debug,
            cluster_cidr: errors.parse("clusterCIDR", raw.cluster_cidr, parse_cidr_list),
            masquerade_all: raw.masquerade_all,
            service_cluster_ip_range: errors.parse(
                "serviceClusterIPRange",
                raw.service_cluster_ip_range,
                parse_cidr_list,
            ),
            manifest_service_cidrs: errors.parse(
                "manifestServiceCIDRs",
                raw.manifest_service_cidrs,
                parse_cidr_list,
            ),
            socket_lb: raw.socket_lb,
            bpf_host_routing: errors.parse(
                "bpfHostRouting",
                raw.bpf_host_routing,
                parse_host_routing,
            ),
            ipv6: errors.parse("ipv6", raw.ipv6, parse_ipv6_mode),
            cgroup_root: non_empty(raw.cgroup_root).map(PathBuf::from),
            conntrack_max_per_core: raw.conntrack.as_ref().and_then(|c| c.max_per_core),
            conntrack_min: raw.conntrack.as_ref().and_then(|c| c.min),
        };
        if config.manifests.is_some() && (config.kubeconfig.is_some() || config.master.is_some()) {
            errors.0.push(
                "manifests: reads Services from files instead of an API server; \
                 it excludes clientConnection.kubeconfig and master"
                    .into(),
            );
        }
        if errors.0.is_empty() {
            Ok(config)
        } else {
            Err(errors.0.join("\n"))
        }
    }
}

/// Bad values seen so far, each as "field: reason".
struct Errors(Vec<String>);

impl Errors {
    /// Parses a field's value (surrounding spaces ignored), recording the
    /// error under the field's name.
    fn parse<T>(
        &mut self,
        field: &str,
        value: Option<String>,
        parse: fn(&str) -> Result<T, String>,
    ) -> Option<T> {
        match parse(value?.trim()) {
            Ok(v) => Some(v),
            Err(e) => {
                self.0.push(format!("{field}: {e}"));
                None
            }
        }
    }
}

/// A comma-separated list of CIDRs ("" is none).
pub(crate) fn parse_cidr_list(s: &str) -> Result<Vec<Cidr>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(parse_cidr)
        .collect()
}

/// An empty string means unset, as in kube-proxy's files.
fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

/// Reads and checks a `--config` file; errors name the file.
pub fn load(path: &Path) -> Result<FileConfig> {
    Ok(load_with_notes(path)?.0)
}

/// Reads and checks a `--config` file of either kind, with what it set
/// that has no effect here; errors name the file.
pub fn load_with_notes(path: &Path) -> Result<(FileConfig, Vec<Ignored>)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the config file {}", path.display()))?;
    parse_with_notes(&text).with_context(|| format!("config file {}", path.display()))
}

/// Reads every `--config` file in order and merges each into `args` (see
/// [`merge`]): a later file's value replaces an earlier one's, a flag given
/// on the command line beats them all. Returns the settings and what the
/// files set that has no effect here.
pub fn load_all(
    paths: &[PathBuf],
    mut args: RunArgs,
    explicit: &dyn Fn(&str) -> bool,
) -> Result<(RunArgs, Vec<Ignored>)> {
    let mut ignored = Vec::new();
    let mut source_files = Vec::new();
    for path in paths {
        let (file, notes) = load_with_notes(path)?;
        if file.manifests.is_some() || file.kubeconfig.is_some() || file.master.is_some() {
            source_files.push(path.display().to_string());
        }
        args = merge(&file, args, explicit);
        ignored.extend(notes);
    }
    if args.manifests.is_some() && (args.kubeconfig.is_some() || args.master.is_some()) {
        bail!(
            "manifests and an API server (kubeconfig or master) both set, by {}: \
             keep one of them",
            source_files.join(" and ")
        );
    }
    Ok((args, ignored))
}

/// Parses and checks the text of a `--config` file.
pub fn parse_str(text: &str) -> Result<FileConfig> {
    Ok(parse_with_notes(text)?.0)
}

/// Parses and checks the text of a `--config` file of either kind: ours,
/// or kube-proxy's (with what it set that has no effect here).
pub fn parse_with_notes(text: &str) -> Result<(FileConfig, Vec<Ignored>)> {
    // Type first, so that a kube-proxy file of another version gets a
    // useful answer rather than "unknown field `mode`".
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct TypeMeta {
        api_version: Option<String>,
        kind: Option<String>,
    }
    if text.trim().is_empty() {
        bail!("the file is empty; it needs at least apiVersion: {API_VERSION} and kind: {KIND}");
    }
    let meta: TypeMeta = serde_yaml::from_str(text).context("not a YAML mapping")?;
    match (meta.api_version.as_deref(), meta.kind.as_deref()) {
        (Some(API_VERSION), Some(KIND)) => {}
        (Some(kube_proxy::API_VERSION), Some(kube_proxy::KIND)) => {
            return kube_proxy::parse(text).map_err(|e| anyhow::anyhow!("{e}"));
        }
        (Some(v), k) if v.starts_with(KUBE_PROXY_GROUP) => bail!(
            "apiVersion {v:?}, kind {}: kube-ebpf-proxy reads kube-proxy's apiVersion {}, \
             kind {}, or its own apiVersion {API_VERSION}, kind {KIND}",
            k.map_or("(none)".into(), |k| format!("{k:?}")),
            kube_proxy::API_VERSION,
            kube_proxy::KIND,
        ),
        (v, k) => bail!(
            "expected apiVersion {API_VERSION} and kind {KIND} (or kube-proxy's {} {}), \
             found apiVersion {} and kind {}",
            kube_proxy::API_VERSION,
            kube_proxy::KIND,
            v.map_or("(none)".into(), |v| format!("{v:?}")),
            k.map_or("(none)".into(), |k| format!("{k:?}")),
        ),
    }
    // serde_yaml's messages carry the field's path and the line.
    let raw: Raw = serde_yaml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
    let config = FileConfig::try_from(raw).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((config, Vec::new()))
}

/// Returns `args` with every setting that was not given on the command
/// line taken from `file` (when the file has it). `explicit(id)` says whether
/// the user gave the argument whose clap id is `id` (for the derived
/// [`RunArgs`], the field name: `"hostname_override"`, `"bpffs"`...); see
/// [`given_on_command_line`]. Pure: no I/O.
pub fn merge(file: &FileConfig, mut args: RunArgs, explicit: &dyn Fn(&str) -> bool) -> RunArgs {
    let f = file;
    // clap's derive names each argument after its field.
    macro_rules! take {
        ($field:ident, $from_file:expr) => {
            fill(explicit, stringify!($field), &mut args.$field, $from_file)
        };
    }
    // Where Services come from: the command line's choice, if it made one.
    if !(explicit("kubeconfig") || explicit("master")) {
        take!(manifests, f.manifests.clone().map(Some));
    }
    if !explicit("manifests") {
        take!(kubeconfig, f.kubeconfig.clone().map(Some));
        take!(master, f.master.clone().map(Some));
    }
    take!(service_proxy_name, f.service_proxy_name.clone().map(Some));
    take!(min_sync_period_ms, f.min_sync_period_ms);
    take!(bpf_debug, f.bpf_debug);
    take!(socket_lb, f.socket_lb);
    take!(bpf_host_routing, f.bpf_host_routing);
    take!(ipv6, f.ipv6);
    take!(cgroup_root, f.cgroup_root.clone().map(Some));
    take!(hostname_override, f.hostname_override.clone().map(Some));
    take!(bpffs, f.bpffs.clone());
    take!(devices, f.devices.clone());
    take!(nodeport_addresses, f.node_port_addresses.clone());
    take!(snat_port_range, f.snat_port_range);
    take!(poll_interval_ms, f.poll_interval_ms);
    take!(log_format, f.log_format);
    take!(log_level, f.log_level.clone().map(Some));
    take!(metrics_bind_address, f.metrics_bind_address);
    take!(healthz_bind_address, f.healthz_bind_address);
    take!(cluster_cidr, f.cluster_cidr.clone());
    take!(masquerade_all, f.masquerade_all);
    take!(service_cluster_ip_range, f.service_cluster_ip_range.clone());
    take!(manifest_service_cidrs, f.manifest_service_cidrs.clone());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let from_file = conntrack_max(f.conntrack_max_per_core, f.conntrack_min, cores);
    take!(conntrack_max, from_file.map(Some));
    args
}

/// kube-proxy's sizing of conntrack: `max(maxPerCore * cores, min)`, where
/// a `maxPerCore` of 0 (or unset) leaves the size as it is (`None`).
pub fn conntrack_max(per_core: Option<u32>, min: Option<u32>, cores: u32) -> Option<u32> {
    let per_core = per_core.filter(|n| *n > 0)?;
    Some(per_core.saturating_mul(cores).max(min.unwrap_or(0)))
}

/// Sets `*target` to the file's value unless the flag `id` was given.
pub fn fill<T>(explicit: &dyn Fn(&str) -> bool, id: &str, target: &mut T, from_file: Option<T>) {
    if explicit(id) {
        return;
    }
    if let Some(value) = from_file {
        *target = value;
    }
}

/// "Was this argument given by the user": on the command line, or through
/// an environment variable bound to the flag (clap's `env`), which is just
/// as explicit. Pass the `run` subcommand's matches.
pub fn given_on_command_line(matches: &ArgMatches) -> impl Fn(&str) -> bool + '_ {
    |id| {
        matches!(
            matches.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    }
}

/// IP:PORT to listen on.
pub(crate) fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("{s:?} is not IP:PORT (e.g. 0.0.0.0:10256, [::]:10256)"))
}

/// Source ports FIRST-LAST, 0 < FIRST <= LAST, as `--snat-port-range`.
pub fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?} is not a port range FIRST-LAST"))?;
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .map_err(|_| format!("{s:?}: {p:?} is not a port (1-65535)"))
    };
    let (first, last) = (port(a)?, port(b)?);
    if first == 0 || first > last {
        return Err(format!("{s:?}: need 0 < FIRST <= LAST"));
    }
    Ok((first, last))
}

/// `text` or `json` (kube-proxy's `logging.format` values).
pub(crate) fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(format!("{s:?} is not a log format (text or json)")),
    }
}

/// `auto`, `on` or `off` (`--ipv6`).
pub(crate) fn parse_ipv6_mode(s: &str) -> Result<Ipv6Mode, String> {
    match s {
        "auto" => Ok(Ipv6Mode::Auto),
        "on" => Ok(Ipv6Mode::On),
        "off" => Ok(Ipv6Mode::Off),
        _ => Err(format!("{s:?} is not an IPv6 mode (auto, on or off)")),
    }
}

/// `auto`, `true` or `false` (`--bpf-host-routing`).
fn parse_host_routing(s: &str) -> Result<HostRouting, String> {
    match s {
        "auto" => Ok(HostRouting::Auto),
        "true" => Ok(HostRouting::True),
        "false" => Ok(HostRouting::False),
        _ => Err(format!(
            "{s:?} is not a host-routing mode (auto, true or false)"
        )),
    }
}

pub(crate) fn parse_cidr(s: &str) -> Result<Cidr, String> {
    if s == "primary" {
        return Err(
            "\"primary\" (kube-proxy's node-IP shorthand) is not supported; list CIDRs".into(),
        );
    }
    s.parse()
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use clap::{CommandFactory as _, FromArgMatches as _};
    use k8s_openapi::api::core::v1::ConfigMap;

    use super::*;
    use crate::cli::{Cli, Command};

    /// The manifests users apply; the ConfigMap's config must always parse.
    const SHIPPED: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/kube-ebpf-proxy.yaml"
    ));

    fn shipped_config() -> String {
        let maps: Vec<ConfigMap> = serde_yaml::Deserializer::from_str(SHIPPED)
            .filter_map(|doc| {
                let v = serde_yaml::Value::deserialize(doc).unwrap();
                (v.get("kind").and_then(|k| k.as_str()) == Some("ConfigMap"))
                    .then(|| serde_yaml::from_value(v).unwrap())
            })
            .collect();
        assert_eq!(
            maps.len(),
            1,
            "one ConfigMap in deploy/kube-ebpf-proxy.yaml"
        );
        let data: &BTreeMap<String, String> = maps[0].data.as_ref().unwrap();
        data.get("config.yaml")
            .expect("the ConfigMap holds config.yaml")
            .clone()
    }

    /// `kube-ebpf-proxy run ARGS...` as main.rs sees it: the args and which
    /// flags were given.
    fn run_with(argv: &[&str], file: &FileConfig) -> RunArgs {
        let mut full = vec!["kube-ebpf-proxy", "run"];
        full.extend_from_slice(argv);
        let matches = Cli::command().try_get_matches_from(full).unwrap();
        let Command::Run(args) = Cli::from_arg_matches(&matches).unwrap().command else {
            panic!("not run")
        };
        let (_, run) = matches.subcommand().unwrap();
        merge(file, *args, &given_on_command_line(run))
    }

    fn err(text: &str) -> String {
        format!("{:#}", parse_str(text).unwrap_err())
    }

    const HEAD: &str =
        "apiVersion: kube-ebpf-proxy.config/v1alpha1\nkind: KubeEbpfProxyConfiguration\n";

    #[test]
    fn the_shipped_configmap_config_parses() {
        let text = shipped_config();
        let c = parse_str(&text).unwrap_or_else(|e| panic!("{e:#}\n---\n{text}"));
        // Kept as kube-proxy has them: health on every address (load
        // balancers probe it), metrics on the node only.
        assert_eq!(
            c.healthz_bind_address,
            Some("0.0.0.0:10256".parse().unwrap())
        );
        assert_eq!(
            c.metrics_bind_address,
            Some("127.0.0.1:10249".parse().unwrap())
        );
        assert_eq!(
            c.bpffs.as_deref(),
            Some(Path::new("/sys/fs/bpf/kube-ebpf-proxy"))
        );
        // Per-node and per-cluster settings are not in the shared file.
        assert_eq!(c.hostname_override, None);
        assert_eq!(c.manifests, None);
        // And it merges into a run without flags.
        let args = run_with(&[], &c);
        assert_eq!(args.log_format, LogFormat::Json);
    }

    #[test]
    fn every_field_parses() {
        let text = format!(
            "{HEAD}hostnameOverride: node-a
healthzBindAddress: 127.0.0.1:20256
metricsBindAddress: '[::1]:20249'
nodePortAddresses: [192.168.0.0/16, 10.0.0.0/8]
clientConnection:
  kubeconfig: /etc/kube/config
logging:
  format: json
master: https://10.0.0.1:6443
bpffs: /sys/fs/bpf/other
devices: [eth0, eth1]
snatPortRange: 62000-62100
pollIntervalMs: 500
minSyncPeriodMs: 1000
serviceProxyName: ebpf
socketLB: false
bpfHostRouting: true
ipv6: off
cgroupRoot: /sys/fs/cgroup/kubepods
"
        );
        let c = parse_str(&text).unwrap();
        assert_eq!(c.socket_lb, Some(false));
        assert_eq!(c.bpf_host_routing, Some(HostRouting::True));
        assert_eq!(c.ipv6, Some(Ipv6Mode::Off));
        assert_eq!(
            c.cgroup_root,
            Some(PathBuf::from("/sys/fs/cgroup/kubepods"))
        );
        assert_eq!(c.hostname_override.as_deref(), Some("node-a"));
        assert_eq!(c.healthz_bind_address.unwrap().port(), 20256);
        assert!(c.metrics_bind_address.unwrap().is_ipv6());
        assert_eq!(c.node_port_addresses.as_ref().unwrap().len(), 2);
        assert_eq!(c.kubeconfig, Some(PathBuf::from("/etc/kube/config")));
        assert_eq!(c.log_format, Some(LogFormat::Json));
        assert_eq!(c.master.as_deref(), Some("https://10.0.0.1:6443"));
        assert_eq!(
            c.devices.as_deref(),
            Some(&["eth0".into(), "eth1".into()][..])
        );
        assert_eq!(c.snat_port_range, Some((62000, 62100)));
        assert_eq!(c.poll_interval_ms, Some(500));
        assert_eq!(c.min_sync_period_ms, Some(1000));
        assert_eq!(c.service_proxy_name.as_deref(), Some("ebpf"));
        assert_eq!(c.manifests, None);
    }

    fn dp_config(args: &RunArgs) -> anyhow::Result<proxy_common::Config> {
        crate::datapath::datapath_config(
            args.snat_port_range,
            &args.cluster_cidr,
            &args.service_cluster_ip_range,
            args.datapath_switches(),
        )
    }

    #[test]
    fn service_semantics_settings_from_the_file_and_flags() {
        let file = parse_str(&format!(
            "{HEAD}clusterCIDR: 10.244.0.0/16,fd00:10:244::/56\nmasqueradeAll: true\n\
             serviceClusterIPRange: '10.96.0.0/12, 172.30.0.0/16'\n"
        ))
        .unwrap();
        let args = run_with(&[], &file);
        assert_eq!(args.cluster_cidr.len(), 2);
        assert!(args.masquerade_all);
        let cfg = dp_config(&args).unwrap();
        assert_eq!(
            (cfg.cluster_cidr, cfg.cluster_cidr_len),
            ([10, 244, 0, 0], 16)
        );
        assert_eq!(
            cfg.flags,
            proxy_common::CFG_F_CLUSTER_CIDR | proxy_common::CFG_F_MASQUERADE_ALL
        );
        assert_eq!(cfg.service_cidrs[..2], [[10, 96, 0, 0], [172, 30, 0, 0]]);
        assert_eq!(cfg.service_cidr_lens, [12, 16, 0, 0]);
        // A flag wins over the file.
        let args = run_with(&["--cluster-cidr", "10.1.0.0/16"], &file);
        assert_eq!(args.cluster_cidr, ["10.1.0.0/16".parse().unwrap()]);
        // Without any: no cluster CIDR, no masquerade, nothing dropped.
        let cfg = dp_config(&run_with(&[], &FileConfig::default())).unwrap();
        assert_eq!((cfg.flags, cfg.service_cidr_lens), (0, [0; 4]));
        // Host routing, from the file or the command line.
        let file = parse_str(&format!("{HEAD}bpfHostRouting: true\n")).unwrap();
        let cfg = dp_config(&run_with(&[], &file)).unwrap();
        assert_eq!(cfg.flags, proxy_common::CFG_F_HOST_ROUTING);
        let args = run_with(&["--bpf-host-routing=false"], &file);
        assert_eq!(dp_config(&args).unwrap().flags, 0);
        // auto (the default) is the daemon's to decide: not forced on.
        let file = parse_str(&format!("{HEAD}bpfHostRouting: auto\n")).unwrap();
        assert_eq!(file.bpf_host_routing, Some(HostRouting::Auto));
        assert_eq!(dp_config(&run_with(&[], &file)).unwrap().flags, 0);
        assert!(err(&format!("{HEAD}bpfHostRouting: sometimes\n")).contains("bpfHostRouting"));
        // Bad values name their field; too many service CIDRs are refused.
        assert!(err(&format!("{HEAD}clusterCIDR: 10.244.0.0\n")).contains("clusterCIDR"));
        let five = "10.1.0.0/16,10.2.0.0/16,10.3.0.0/16,10.4.0.0/16,10.5.0.0/16";
        let args = run_with(
            &["--service-cluster-ip-range", five],
            &FileConfig::default(),
        );
        assert!(dp_config(&args).is_err());
    }

    #[test]
    fn empty_strings_mean_unset_as_in_kube_proxy_files() {
        let c = parse_str(&format!(
            "{HEAD}hostnameOverride: ''\nclientConnection: {{kubeconfig: ''}}\nmaster: ''\n"
        ))
        .unwrap();
        assert_eq!(c.hostname_override, None);
        assert_eq!(c.kubeconfig, None);
        assert_eq!(c.master, None);
    }

    #[test]
    fn the_file_fills_what_no_flag_gave() {
        let file = parse_str(&format!(
            "{HEAD}hostnameOverride: from-file
bpffs: /file/bpffs
devices: [eth9]
nodePortAddresses: [10.0.0.0/8]
snatPortRange: 50000-50010
pollIntervalMs: 1000
logging: {{format: json}}
metricsBindAddress: 0.0.0.0:9999
healthzBindAddress: 0.0.0.0:9998
manifests: /file/manifests
"
        ))
        .unwrap();
        let args = run_with(&[], &file);
        assert_eq!(args.hostname_override.as_deref(), Some("from-file"));
        assert_eq!(args.bpffs, PathBuf::from("/file/bpffs"));
        assert_eq!(args.devices, ["eth9"]);
        assert_eq!(args.nodeport_addresses, ["10.0.0.0/8".parse().unwrap()]);
        assert_eq!(args.snat_port_range, (50000, 50010));
        assert_eq!(args.poll_interval_ms, 1000);
        assert_eq!(args.log_format, LogFormat::Json);
        assert_eq!(args.metrics_bind_address.port(), 9999);
        assert_eq!(args.healthz_bind_address.port(), 9998);
        assert_eq!(args.manifests, Some(PathBuf::from("/file/manifests")));
    }

    #[test]
    fn conntrack_is_sized_as_kube_proxy_does() {
        assert_eq!(conntrack_max(Some(32768), Some(131072), 2), Some(131072));
        assert_eq!(conntrack_max(Some(32768), Some(131072), 8), Some(262144));
        assert_eq!(conntrack_max(Some(100), None, 3), Some(300));
        // maxPerCore 0 or unset: leave the size alone, whatever min says.
        assert_eq!(conntrack_max(Some(0), Some(131072), 4), None);
        assert_eq!(conntrack_max(None, Some(131072), 4), None);
        assert_eq!(conntrack_max(Some(u32::MAX), None, 4), Some(u32::MAX));
    }

    #[test]
    fn conntrack_from_the_file_unless_the_flag_is_given() {
        let file = parse_str(&format!(
            "{HEAD}conntrack: {{maxPerCore: 1000000, min: 5}}\n"
        ))
        .unwrap();
        let cores = std::thread::available_parallelism().unwrap().get() as u32;
        assert_eq!(run_with(&[], &file).conntrack_max, Some(1_000_000 * cores));
        let args = run_with(&["--conntrack-max", "64"], &file);
        assert_eq!(args.conntrack_max, Some(64));
        let zero = parse_str(&format!("{HEAD}conntrack: {{maxPerCore: 0, min: 5}}\n")).unwrap();
        assert_eq!(run_with(&[], &zero).conntrack_max, None);
    }

    #[test]
    fn flags_win_even_when_they_repeat_the_default() {
        let file = parse_str(&format!(
            "{HEAD}hostnameOverride: from-file
bpffs: /file/bpffs
devices: [eth9]
snatPortRange: 50000-50010
logging: {{format: json}}
healthzBindAddress: 0.0.0.0:9998
"
        ))
        .unwrap();
        let args = run_with(
            &[
                "--hostname-override",
                "from-flag",
                "--devices",
                "eth0,eth1",
                // Both equal to the defaults: still explicit, still win.
                "--log-format",
                "text",
                "--bpffs",
                crate::datapath::DEFAULT_BPFFS,
            ],
            &file,
        );
        assert_eq!(args.hostname_override.as_deref(), Some("from-flag"));
        assert_eq!(args.devices, ["eth0", "eth1"]);
        assert_eq!(args.log_format, LogFormat::Text);
        assert_eq!(args.bpffs, PathBuf::from(crate::datapath::DEFAULT_BPFFS));
        // Not given: from the file.
        assert_eq!(args.snat_port_range, (50000, 50010));
        assert_eq!(args.healthz_bind_address.port(), 9998);
        // In neither: the flag's default.
        assert_eq!(args.poll_interval_ms, 2000);
        assert_eq!(args.metrics_bind_address.port(), 10249);
    }

    #[test]
    fn the_api_server_settings_merge_like_the_others() {
        let file = parse_str(&format!(
            "{HEAD}clientConnection: {{kubeconfig: /file/kubeconfig}}
master: https://10.0.0.1:6443
serviceProxyName: ebpf
minSyncPeriodMs: 1000
"
        ))
        .unwrap();
        let args = run_with(&[], &file);
        assert_eq!(args.kubeconfig, Some(PathBuf::from("/file/kubeconfig")));
        assert_eq!(args.master.as_deref(), Some("https://10.0.0.1:6443"));
        assert_eq!(args.service_proxy_name.as_deref(), Some("ebpf"));
        assert_eq!(args.min_sync_period_ms, 1000);
        let args = run_with(&["--master", "http://127.0.0.1:8080"], &file);
        assert_eq!(args.master.as_deref(), Some("http://127.0.0.1:8080"));
        assert_eq!(args.kubeconfig, Some(PathBuf::from("/file/kubeconfig")));
    }

    #[test]
    fn the_command_line_chooses_between_manifests_and_an_api_server() {
        let api = parse_str(&format!(
            "{HEAD}clientConnection: {{kubeconfig: /file/kubeconfig}}\nmaster: https://a:6443\n"
        ))
        .unwrap();
        let args = run_with(&["--manifests", "/flag/objs"], &api);
        assert_eq!(args.manifests, Some(PathBuf::from("/flag/objs")));
        assert_eq!((args.kubeconfig, args.master), (None, None));

        let files = parse_str(&format!("{HEAD}manifests: /file/objs\n")).unwrap();
        let args = run_with(&["--kubeconfig", "/flag/kubeconfig"], &files);
        assert_eq!(args.manifests, None);
        assert_eq!(args.kubeconfig, Some(PathBuf::from("/flag/kubeconfig")));
        let args = run_with(&[], &files);
        assert_eq!(args.manifests, Some(PathBuf::from("/file/objs")));

        // In one file, both is a contradiction.
        let e = err(&format!("{HEAD}manifests: /objs\nmaster: https://a:6443\n"));
        assert!(
            e.contains("excludes clientConnection.kubeconfig and master"),
            "{e}"
        );
    }

    #[test]
    fn every_flag_of_run_has_its_setting_in_the_file() {
        // merge asks `explicit` about each argument it fills: every `run`
        // argument must be asked about (a new flag needs its field here).
        let asked = std::cell::RefCell::new(BTreeSet::new());
        let record = |id: &str| {
            asked.borrow_mut().insert(id.to_string());
            false
        };
        let matches = Cli::command()
            .try_get_matches_from(["kube-ebpf-proxy", "run"])
            .unwrap();
        let Command::Run(args) = Cli::from_arg_matches(&matches).unwrap().command else {
            panic!()
        };
        merge(&FileConfig::default(), *args, &record);
        let cli = Cli::command();
        let run = cli.find_subcommand("run").unwrap();
        let ids: BTreeSet<String> = run
            .get_arguments()
            .map(|a| a.get_id().to_string())
            // The file's own flag, and clap's.
            .filter(|id| !["config", "help"].contains(&id.as_str()))
            .collect();
        let asked = asked.into_inner();
        let missing: Vec<_> = ids.difference(&asked).collect();
        assert!(
            missing.is_empty(),
            "run flags without a config field: {missing:?}"
        );
        let unknown: Vec<_> = asked.difference(&ids).collect();
        assert!(
            unknown.is_empty(),
            "merge asks about unknown ids: {unknown:?}"
        );
    }

    #[test]
    fn an_unknown_field_is_an_error_naming_it() {
        let e = err(&format!("{HEAD}nodePortAddress: [10.0.0.0/8]\n"));
        assert!(e.contains("unknown field `nodePortAddress`"), "{e}");
        assert!(
            e.contains("nodePortAddresses"),
            "lists the known fields: {e}"
        );
        assert!(e.contains("line 3"), "{e}");
        // Nested: kube-proxy's client settings we do not have.
        let e = err(&format!("{HEAD}clientConnection:\n  qps: 5\n"));
        assert!(e.contains("clientConnection"), "{e}");
        assert!(e.contains("unknown field `qps`"), "{e}");
    }

    #[test]
    fn bad_values_are_clear_errors() {
        let cases = [
            (
                "nodePortAddresses: [10.0.0.0]",
                "nodePortAddresses",
                "is not a CIDR",
            ),
            (
                "nodePortAddresses: [10.0.0.0/33]",
                "nodePortAddresses",
                "prefix must be",
            ),
            (
                "nodePortAddresses: [primary]",
                "nodePortAddresses",
                "list CIDRs",
            ),
            (
                "snatPortRange: 70000-1",
                "snatPortRange",
                "\"70000\" is not a port",
            ),
            (
                "snatPortRange: 5-1",
                "snatPortRange",
                "need 0 < FIRST <= LAST",
            ),
            ("snatPortRange: 61000", "snatPortRange", "FIRST-LAST"),
            (
                "healthzBindAddress: 0.0.0.0",
                "healthzBindAddress",
                "is not IP:PORT",
            ),
            ("logging: {format: xml}", "logging.format", "text or json"),
            ("pollIntervalMs: soon", "pollIntervalMs", "invalid type"),
            ("devices: eth0", "devices", "invalid type"),
        ];
        for (line, field, reason) in cases {
            let e = err(&format!("{HEAD}{line}\n"));
            assert!(e.contains(field), "{line}: {e}");
            assert!(e.contains(reason), "{line}: {e}");
        }
    }

    #[test]
    fn the_type_is_checked_first() {
        let e = err(
            "apiVersion: kubeproxy.config.k8s.io/v1beta1\nkind: KubeProxyConfiguration\nmode: nftables\n",
        );
        assert!(e.contains("kube-proxy's apiVersion"), "{e}");
        assert!(e.contains(kube_proxy::API_VERSION), "{e}");
        assert!(e.contains(API_VERSION), "{e}");
        let e = err("bpffs: /x\n");
        assert!(e.contains("found apiVersion (none)"), "{e}");
        let e = err(" \n");
        assert!(e.contains("empty"), "{e}");
        let e = err("- a list\n");
        assert!(e.contains("not a YAML mapping"), "{e}");
    }

    #[test]
    fn kube_proxys_file_then_ours_merge_in_order() {
        let dir = std::env::temp_dir().join(format!("kep-config-two-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let theirs = dir.join("kube-proxy.conf");
        std::fs::write(
            &theirs,
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
             bindAddress: 0.0.0.0\nmetricsBindAddress: 0.0.0.0:10249\n\
             clientConnection: {kubeconfig: /var/lib/kube-proxy/kubeconfig.conf}\n\
             iptables: {minSyncPeriod: 1s}\n",
        )
        .unwrap();
        let ours = dir.join("ours.yaml");
        std::fs::write(&ours, format!("{HEAD}minSyncPeriodMs: 20\nbpffs: /x\n")).unwrap();
        let contradicting = dir.join("manifests.yaml");
        std::fs::write(&contradicting, format!("{HEAD}manifests: /objs\n")).unwrap();
        let no_flags = |_: &str| false;
        let defaults = || run_with(&[], &FileConfig::default());
        let two = [theirs.clone(), ours];
        let result = load_all(&two, defaults(), &no_flags);
        let refused = load_all(&[theirs, contradicting], defaults(), &no_flags);
        std::fs::remove_dir_all(&dir).unwrap();
        let (args, ignored) = result.unwrap();
        assert_eq!(args.metrics_bind_address.port(), 10249);
        assert!(args.metrics_bind_address.ip().is_unspecified());
        assert_eq!(
            args.kubeconfig,
            Some(PathBuf::from("/var/lib/kube-proxy/kubeconfig.conf"))
        );
        // The later file replaces the earlier one's value.
        assert_eq!(args.min_sync_period_ms, 20);
        assert_eq!(args.bpffs, PathBuf::from("/x"));
        assert_eq!(ignored.len(), 1, "{ignored:?}");
        assert_eq!(ignored[0].field, "bindAddress");
        let e = format!("{:#}", refused.unwrap_err());
        assert!(e.contains("keep one of them"), "{e}");
    }

    #[test]
    fn load_names_the_file() {
        let dir = std::env::temp_dir().join(format!("kep-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.yaml");
        std::fs::write(&path, format!("{HEAD}snatPortRange: 5-1\n")).unwrap();
        let e = format!("{:#}", load(&path).unwrap_err());
        std::fs::write(&path, format!("{HEAD}pollIntervalMs: 50\n")).unwrap();
        let ok = load(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert_eq!(ok.poll_interval_ms, Some(50));
        let e = format!("{:#}", load(&dir.join("missing.yaml")).unwrap_err());
        assert!(e.contains("missing.yaml"), "{e}");
    }
}
