//! kube-proxy's own file (`apiVersion: kubeproxy.config.k8s.io/v1alpha1`,
//! `kind: KubeProxyConfiguration`), read as it is, so that a cluster's
//! existing `kube-proxy` ConfigMap can be mounted unchanged.
//!
//! Every field of kube-proxy's v1alpha1 type is known here and falls in one
//! of three groups (docs/migrating.md has the table):
//! * used: it means the same here (`hostnameOverride`, the bind addresses,
//!   `nodePortAddresses`, `clientConnection.kubeconfig`, the selected
//!   mode's `minSyncPeriod` and `masqueradeAll`, `clusterCIDR`,
//!   `logging.format` and `verbosity`);
//! * ignored: it configures something this proxy does not have (iptables
//!   marks, IPVS's dummy device, nf_conntrack sysctls, Windows); returned
//!   as [`Ignored`] when set to anything but its zero value, for the daemon
//!   to log once at start;
//! * refused: honouring it would need behaviour this proxy lacks, and
//!   ignoring it would change what traffic sees (`mode: kernelspace`, an
//!   IPVS scheduler other than round robin, a
//!   `detectLocalMode` other than by CIDR, `nodePortAddresses: [primary]`).
//!   The error names the field.
//!
//! A field kube-proxy does not have is refused too, as in our own kind.

use std::time::Duration;

use serde_yaml::{Mapping, Value};

use super::{FileConfig, parse_addr, parse_cidr, parse_cidr_list, parse_log_format};

/// `apiVersion` of kube-proxy's file.
pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
/// `kind` of kube-proxy's file.
pub const KIND: &str = "KubeProxyConfiguration";

/// A kube-proxy setting that is read but has no effect here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ignored {
    /// The field's path, `iptables.masqueradeBit`.
    pub field: String,
    /// Its value, as YAML on one line.
    pub value: String,
    /// Why it does not apply.
    pub why: &'static str,
}

/// kube-proxy's `mode`: which of its per-mode sections it reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// `""` or `iptables` (kube-proxy's default on Linux).
    IpTables,
    Ipvs,
    NfTables,
}

impl Mode {
    fn section(self) -> &'static str {
        match self {
            Mode::IpTables => "iptables",
            Mode::Ipvs => "ipvs",
            Mode::NfTables => "nftables",
        }
    }
}

/// Reads a kube-proxy file: the settings it gives, and what it set that
/// has no effect here; or every refused or bad field, one per line.
pub fn parse(text: &str) -> Result<(FileConfig, Vec<Ignored>), String> {
    let doc: Mapping = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    let mut r = Reader::default();
    let mode = r.mode(doc.get("mode"));
    for (key, value) in &doc {
        match key.as_str() {
            Some(key) => r.top_level(mode, key, value),
            None => r.errors.push(format!("{key:?}: not a field name")),
        }
    }
    r.check_node_port_default(mode, doc.get("nodePortAddresses"));
    if r.errors.is_empty() {
        Ok((r.config, r.ignored))
    } else {
        Err(r.errors.join("\n"))
    }
}

#[derive(Default)]
struct Reader {
    config: FileConfig,
    ignored: Vec<Ignored>,
    errors: Vec<String>,
}

// Why each ignored field does not apply.
const NO_FWMARK: &str = "the datapath translates in BPF; it uses no iptables mark";
const NO_RESYNC: &str =
    "no periodic full resync: every change is programmed, and a restart compares with the maps";
const CONNTRACK: &str = "connections are tracked in the datapath's own maps; the nf_conntrack \
     sysctls kube-proxy set stay as they are until the node reboots";
const OTHER_MODE: &str = "kube-proxy reads this section only in its mode, which is not `mode`";

impl Reader {
    /// `mode`: which section applies. Refused: Windows' mode and unknown
    /// ones (kube-proxy refuses those too).
    fn mode(&mut self, value: Option<&Value>) -> Mode {
        match value.map(|v| self.string("mode", v)) {
            None | Some(None) => Mode::IpTables,
            Some(Some(m)) => match m.as_str() {
                "" | "iptables" => Mode::IpTables,
                "ipvs" => Mode::Ipvs,
                "nftables" => Mode::NfTables,
                "kernelspace" => {
                    self.refuse("mode", "\"kernelspace\" is kube-proxy's Windows mode");
                    Mode::IpTables
                }
                other => {
                    self.refuse(
                        "mode",
                        &format!("{other:?} is not a kube-proxy mode (iptables, ipvs, nftables)"),
                    );
                    Mode::IpTables
                }
            },
        }
    }

    fn top_level(&mut self, mode: Mode, key: &str, value: &Value) {
        match key {
            "apiVersion" | "kind" | "mode" => {}
            "hostnameOverride" => {
                self.config.hostname_override = self.non_empty(key, value);
            }
            "healthzBindAddress" => {
                self.config.healthz_bind_address = self.parsed(key, value, parse_addr);
            }
            "metricsBindAddress" => {
                self.config.metrics_bind_address = self.parsed(key, value, parse_addr);
            }
            "nodePortAddresses" => self.node_port_addresses(value),
            "clientConnection" => self.client_connection(value),
            "logging" => self.logging(value),
            "iptables" | "ipvs" | "nftables" if key != mode.section() => {
                self.ignore(key, value, OTHER_MODE);
            }
            "iptables" | "ipvs" | "nftables" => self.mode_section(key, value),
            "detectLocalMode" => self.detect_local_mode(value),
            // detectLocalMode ClusterCIDR: sources inside are the cluster's.
            "clusterCIDR" => {
                self.config.cluster_cidr = self.parsed(key, value, parse_cidr_list);
            }
            "conntrack" => self.conntrack(value),
            _ => self.ignorable(key, value),
        }
    }

    /// Top-level fields that configure nothing here.
    fn ignorable(&mut self, key: &str, value: &Value) {
        let why = match key {
            "featureGates" => "kube-proxy's feature gates; kube-ebpf-proxy has none",
            "bindAddress" => "kube-ebpf-proxy uses no primary node IP",
            "bindAddressHardFail" => {
                "failing to bind /metrics or /healthz always stops kube-ebpf-proxy"
            }
            "enableProfiling" => "no /debug/pprof handler",
            "showHiddenMetricsForVersion" => "no hidden metrics",
            "oomScoreAdj" => "the kubelet sets it from the pod's priority class",
            "configSyncPeriod" => NO_RESYNC,
            "portRange" => "unused by kube-proxy too",
            "detectLocal" => "only read with the detectLocalMode values that are refused",
            "winkernel" | "windowsRunAsService" => "Windows only",
            _ => {
                self.errors
                    .push(format!("unknown field `{key}` of {KIND} {API_VERSION}"));
                return;
            }
        };
        self.ignore(key, value, why);
    }

    /// The selected mode's section.
    fn mode_section(&mut self, section: &str, value: &Value) {
        for (key, v) in self.mapping(section, value) {
            let field = format!("{section}.{key}");
            match (section, key.as_str()) {
                (_, "minSyncPeriod") => {
                    if let Some(d) = self.parsed(&field, v, parse_duration) {
                        // 0 is kube-proxy's "default" (1 s); ours then.
                        self.config.min_sync_period_ms =
                            (!d.is_zero()).then_some(d.as_millis() as u64);
                    }
                }
                (_, "syncPeriod") => self.ignore(&field, v, NO_RESYNC),
                (_, "masqueradeBit") => self.ignore(&field, v, NO_FWMARK),
                ("iptables" | "nftables", "masqueradeAll") => self.masquerade_all(&field, v),
                ("iptables", "localhostNodePorts") => self.localhost_node_ports(&field, v),
                ("iptables", "snatNodeInternalIP") => self.refuse_true(
                    &field,
                    v,
                    "SNAT uses the address of the node the packet leaves by",
                ),
                ("ipvs", "scheduler") => self.ipvs_scheduler(&field, v),
                ("ipvs", "strictARP" | "excludeCIDRs") => {
                    self.ignore(&field, v, "there is no kube-ipvs0 device")
                }
                ("ipvs", "tcpTimeout" | "tcpFinTimeout" | "udpTimeout") => {
                    self.ignore(&field, v, CONNTRACK)
                }
                _ => self
                    .errors
                    .push(format!("unknown field `{field}` of {KIND} {API_VERSION}")),
            }
        }
    }

    fn masquerade_all(&mut self, field: &str, v: &Value) {
        match v {
            Value::Bool(b) => self.config.masquerade_all = Some(*b),
            Value::Null => {}
            other => self.errors.push(format!(
                "{field}: expected true or false, found {}",
                one_line(other)
            )),
        }
    }

    /// `conntrack`: `maxPerCore` and `min` size the datapath's conntrack
    /// maps (see `config::conntrack_max`); the nf_conntrack timeouts do not
    /// apply.
    fn conntrack(&mut self, value: &Value) {
        for (key, v) in self.mapping("conntrack", value) {
            let field = format!("conntrack.{key}");
            match key.as_str() {
                "maxPerCore" => self.config.conntrack_max_per_core = self.count(&field, v),
                "min" => self.config.conntrack_min = self.count(&field, v),
                _ => self.ignore(&field, v, CONNTRACK),
            }
        }
    }

    /// A non-negative integer that fits a map size; null is unset.
    fn count(&mut self, field: &str, v: &Value) -> Option<u32> {
        match v {
            Value::Null => None,
            Value::Number(n) => match n.as_u64().and_then(|n| u32::try_from(n).ok()) {
                Some(n) => Some(n),
                None => {
                    self.errors.push(format!(
                        "{field}: expected a count up to {}, found {n}",
                        u32::MAX
                    ));
                    None
                }
            },
            other => {
                self.errors.push(format!(
                    "{field}: expected a number, found {}",
                    one_line(other)
                ));
                None
            }
        }
    }

    /// Unset means true in iptables mode: NodePorts on 127.0.0.1. Never
    /// served here; asked for explicitly, refused.
    fn localhost_node_ports(&mut self, field: &str, v: &Value) {
        match v {
            Value::Null => self.ignored.push(Ignored {
                field: field.into(),
                value: "null (true in iptables mode)".into(),
                why: "NodePorts are not served on loopback addresses",
            }),
            _ => self.refuse_true(field, v, "NodePorts are not served on loopback addresses"),
        }
    }

    /// Round robin is what random selection approximates; the others
    /// (least connection, source hashing...) choose differently.
    fn ipvs_scheduler(&mut self, field: &str, v: &Value) {
        match self.string(field, v).as_deref() {
            None | Some("" | "rr") => {}
            Some(other) => self.refuse(
                field,
                &format!("{other:?}: backends are chosen at random per connection (as \"rr\")"),
            ),
        }
    }

    fn detect_local_mode(&mut self, value: &Value) {
        match self.string("detectLocalMode", value).as_deref() {
            None | Some("" | "ClusterCIDR") => {}
            Some(other) => self.refuse(
                "detectLocalMode",
                &format!("{other:?}: only \"ClusterCIDR\" (the default) is supported"),
            ),
        }
    }

    fn node_port_addresses(&mut self, value: &Value) {
        if value.is_null() {
            return;
        }
        let Some(items) = value.as_sequence() else {
            self.errors
                .push("nodePortAddresses: expected a list of CIDRs".into());
            return;
        };
        let mut cidrs = Vec::new();
        let mut all = false;
        for (i, item) in items.iter().enumerate() {
            let field = format!("nodePortAddresses[{i}]");
            match self.string(&field, item).as_deref() {
                Some("all") => all = true,
                Some("localhost") => {
                    self.refuse(&field, "NodePorts are not served on loopback addresses")
                }
                Some(s) => cidrs.extend(self.parsed(&field, &Value::from(s), parse_cidr)),
                None => {}
            }
        }
        // `all` with anything else is still every address.
        self.config.node_port_addresses = Some(if all { Vec::new() } else { cidrs });
    }

    /// kube-proxy's nftables mode serves NodePorts on the node's primary
    /// addresses when `nodePortAddresses` is unset; this proxy would serve
    /// them on every address.
    fn check_node_port_default(&mut self, mode: Mode, value: Option<&Value>) {
        let unset = value.is_none_or(|v| v.is_null() || v.as_sequence().is_some_and(Vec::is_empty));
        if mode == Mode::NfTables && unset {
            self.refuse(
                "nodePortAddresses",
                "unset means \"primary\" in nftables mode, which is not supported; \
                 list the node CIDRs NodePorts answer on",
            );
        }
    }

    fn client_connection(&mut self, value: &Value) {
        for (key, v) in self.mapping("clientConnection", value) {
            let field = format!("clientConnection.{key}");
            match key.as_str() {
                "kubeconfig" => {
                    self.config.kubeconfig = self.non_empty(&field, v).map(Into::into);
                }
                "acceptContentTypes" | "contentType" => {
                    self.ignore(&field, v, "the client speaks JSON")
                }
                "qps" | "burst" => {
                    self.ignore(&field, v, "the client only watches; it has no rate limit")
                }
                _ => self
                    .errors
                    .push(format!("unknown field `{field}` of {KIND} {API_VERSION}")),
            }
        }
    }

    /// `format` and `verbosity` are used; the rest of component-base's
    /// logging options are not.
    fn logging(&mut self, value: &Value) {
        for (key, v) in self.mapping("logging", value) {
            let field = format!("logging.{key}");
            match key.as_str() {
                "format" => {
                    let format = self.non_empty(&field, v);
                    self.config.log_format =
                        format.and_then(|f| self.parsed(&field, &Value::from(f), parse_log_format));
                }
                "verbosity" => self.config.log_level = self.verbosity(&field, v),
                _ => self.ignore(&field, v, "klog's option; logs go to stderr unbuffered"),
            }
        }
    }

    /// klog's verbosity as a level: 0-3 is kube-proxy's normal output
    /// (ours at info, the default), 4-5 its debugging, 6 and up tracing.
    fn verbosity(&mut self, field: &str, v: &Value) -> Option<String> {
        let n = match v {
            Value::Null => return None,
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.parse().ok(),
            _ => None,
        };
        let Some(n) = n else {
            self.errors
                .push(format!("{field}: expected a number, found {}", one_line(v)));
            return None;
        };
        match n {
            0..=3 => None,
            4..=5 => Some("debug".into()),
            _ => Some("trace".into()),
        }
    }

    // Helpers: each records its error under the field's name.

    fn refuse(&mut self, field: &str, why: &str) {
        self.errors
            .push(format!("{field}: {why} (kube-ebpf-proxy cannot honour it)"));
    }

    /// Refuses `true`; accepts false and unset.
    fn refuse_true(&mut self, field: &str, v: &Value, why: &str) {
        match v {
            Value::Bool(true) => self.refuse(field, &format!("true: {why}")),
            Value::Bool(false) | Value::Null => {}
            other => self.errors.push(format!(
                "{field}: expected true or false, found {}",
                one_line(other)
            )),
        }
    }

    /// Records every leaf under `field` that is set to anything but its
    /// zero value (kubeadm writes every field, mostly zero).
    fn ignore(&mut self, field: &str, value: &Value, why: &'static str) {
        match value {
            Value::Mapping(m) if !m.is_empty() => {
                for (k, v) in m {
                    let key = k.as_str().map_or_else(|| one_line(k), str::to_string);
                    self.ignore(&format!("{field}.{key}"), v, why);
                }
            }
            v if is_zero(v) => {}
            v => self.ignored.push(Ignored {
                field: field.into(),
                value: one_line(v),
                why,
            }),
        }
    }

    fn mapping<'v>(&mut self, field: &str, value: &'v Value) -> Vec<(String, &'v Value)> {
        match value {
            Value::Null => Vec::new(),
            Value::Mapping(m) => m
                .iter()
                .map(|(k, v)| (k.as_str().map_or_else(|| one_line(k), str::to_string), v))
                .collect(),
            other => {
                self.errors.push(format!(
                    "{field}: expected a mapping, found {}",
                    one_line(other)
                ));
                Vec::new()
            }
        }
    }

    fn string(&mut self, field: &str, value: &Value) -> Option<String> {
        match value {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            other => {
                self.errors.push(format!(
                    "{field}: expected a string, found {}",
                    one_line(other)
                ));
                None
            }
        }
    }

    /// A string where empty means unset, as kube-proxy reads it.
    fn non_empty(&mut self, field: &str, value: &Value) -> Option<String> {
        self.string(field, value).filter(|s| !s.is_empty())
    }

    fn parsed<T>(
        &mut self,
        field: &str,
        value: &Value,
        parse: fn(&str) -> Result<T, String>,
    ) -> Option<T> {
        let s = self.non_empty(field, value)?;
        parse(s.trim())
            .map_err(|e| self.errors.push(format!("{field}: {e}")))
            .ok()
    }
}

/// kubeadm writes every field; these values mean "not set".
fn is_zero(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => matches!(s.as_str(), "" | "0" | "0s"),
        Value::Sequence(s) => s.is_empty(),
        Value::Mapping(m) => m.is_empty(),
        Value::Bool(true) | Value::Tagged(_) => false,
    }
}

fn one_line(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| format!("{v:?}"))
}

/// A Go duration as kube-proxy's files write them: `1s`, `500ms`, `1m30s`,
/// `1.5s`, `0s`, `0`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration (e.g. 1s, 500ms, 1m30s)");
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = s;
    let mut total = 0f64;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (number, tail) = rest.split_at(digits);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let seconds = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += number.parse::<f64>().map_err(|_| bad())? * seconds;
        rest = tail;
    }
    if s.is_empty() {
        return Err(bad());
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, path::PathBuf};

    use k8s_openapi::api::core::v1::ConfigMap;

    use super::*;
    use crate::config::parse_with_notes;

    /// `kubectl -n kube-system get configmap kube-proxy -o yaml` on a
    /// cluster made by `kubeadm init --pod-network-cidr 10.244.0.0/16`
    /// (kubeadm writes every field of the type, mostly zero).
    const KUBEADM_CONFIGMAP: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata:
  name: kube-proxy
  namespace: kube-system
  labels:
    app: kube-proxy
  annotations:
    kubeadm.kubernetes.io/component-config.hash: sha256:0b1c3f5a7e
data:
  config.conf: |-
    apiVersion: kubeproxy.config.k8s.io/v1alpha1
    bindAddress: 0.0.0.0
    bindAddressHardFail: false
    clientConnection:
      acceptContentTypes: ""
      burst: 0
      contentType: ""
      kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
      qps: 0
    clusterCIDR: 10.244.0.0/16
    configSyncPeriod: 0s
    conntrack:
      maxPerCore: null
      min: null
      tcpBeLiberal: false
      tcpCloseWaitTimeout: null
      tcpEstablishedTimeout: null
      udpStreamTimeout: 0s
      udpTimeout: 0s
    detectLocal:
      bridgeInterface: ""
      interfaceNamePrefix: ""
    detectLocalMode: ""
    enableProfiling: false
    healthzBindAddress: ""
    hostnameOverride: ""
    iptables:
      localhostNodePorts: null
      masqueradeAll: false
      masqueradeBit: null
      minSyncPeriod: 0s
      syncPeriod: 0s
    ipvs:
      excludeCIDRs: null
      minSyncPeriod: 0s
      scheduler: ""
      strictARP: false
      syncPeriod: 0s
      tcpFinTimeout: 0s
      tcpTimeout: 0s
      udpTimeout: 0s
    kind: KubeProxyConfiguration
    logging:
      flushFrequency: 0
      options:
        json:
          infoBufferSize: "0"
        text:
          infoBufferSize: "0"
      verbosity: 0
    metricsBindAddress: ""
    mode: ""
    nftables:
      masqueradeAll: false
      masqueradeBit: null
      minSyncPeriod: 0s
      syncPeriod: 0s
    nodePortAddresses: null
    oomScoreAdj: null
    portRange: ""
    showHiddenMetricsForVersion: ""
    winkernel:
      enableDSR: false
      forwardHealthCheckVip: false
      networkName: ""
      rootHnsEndpointName: ""
      sourceVip: ""
  kubeconfig.conf: |-
    apiVersion: v1
    kind: Config
    clusters:
    - cluster:
        certificate-authority: /var/run/secrets/kubernetes.io/serviceaccount/ca.crt
        server: https://10.0.0.10:6443
      name: default
    contexts:
    - context:
        cluster: default
        namespace: default
        user: default
      name: default
    current-context: default
    users:
    - name: default
      user:
        tokenFile: /var/run/secrets/kubernetes.io/serviceaccount/token
"#;

    fn kubeadm_config() -> String {
        let cm: ConfigMap = serde_yaml::from_str(KUBEADM_CONFIGMAP).unwrap();
        let data: BTreeMap<String, String> = cm.data.unwrap();
        data["config.conf"].clone()
    }

    /// kubeadm's file with `edit` applied to its text.
    fn kubeadm_with(edits: &[(&str, &str)]) -> String {
        let mut text = kubeadm_config();
        for (from, to) in edits {
            assert!(text.contains(from), "{from} not in the kubeadm file");
            text = text.replacen(from, to, 1);
        }
        text
    }

    fn parsed(text: &str) -> (FileConfig, Vec<Ignored>) {
        parse_with_notes(text).unwrap_or_else(|e| panic!("{e:#}\n---\n{text}"))
    }

    fn refused(text: &str) -> String {
        format!("{:#}", parse_with_notes(text).unwrap_err())
    }

    fn fields(ignored: &[Ignored]) -> Vec<&str> {
        ignored.iter().map(|i| i.field.as_str()).collect()
    }

    #[test]
    fn kubeadms_default_configmap_is_accepted_as_it_is() {
        let (c, ignored) = parsed(&kubeadm_config());
        assert_eq!(
            c.kubeconfig,
            Some(PathBuf::from("/var/lib/kube-proxy/kubeconfig.conf"))
        );
        // Empty strings are unset: the flags' defaults stay.
        assert_eq!(c.hostname_override, None);
        assert_eq!(c.healthz_bind_address, None);
        assert_eq!(c.metrics_bind_address, None);
        assert_eq!(c.node_port_addresses, None);
        assert_eq!(c.min_sync_period_ms, None);
        assert_eq!(c.log_level, None);
        // Only what is set to something is reported, each once.
        assert_eq!(
            fields(&ignored),
            ["bindAddress", "iptables.localhostNodePorts"]
        );
        // kubeadm's podSubnet: pods are the cluster's (detectLocalMode).
        assert_eq!(
            c.cluster_cidr
                .map(|v| v.iter().map(|c| c.to_string()).collect::<Vec<_>>()),
            Some(vec!["10.244.0.0/16".to_string()])
        );
        assert_eq!(ignored[0].value, "\"0.0.0.0\"");
    }

    #[test]
    fn used_fields_reach_the_settings() {
        let text = kubeadm_with(&[
            ("hostnameOverride: \"\"", "hostnameOverride: node-a"),
            (
                "healthzBindAddress: \"\"",
                "healthzBindAddress: 0.0.0.0:20256",
            ),
            (
                "metricsBindAddress: \"\"",
                "metricsBindAddress: 0.0.0.0:20249",
            ),
            (
                "nodePortAddresses: null",
                "nodePortAddresses: [192.168.0.0/16, 10.0.0.0/8]",
            ),
            (
                "minSyncPeriod: 0s\n  syncPeriod",
                "minSyncPeriod: 1.5s\n  syncPeriod",
            ),
            ("verbosity: 0", "verbosity: 4"),
            ("flushFrequency: 0", "flushFrequency: 0\n  format: json"),
        ]);
        let (c, _) = parsed(&text);
        assert_eq!(c.hostname_override.as_deref(), Some("node-a"));
        assert_eq!(c.healthz_bind_address.unwrap().port(), 20256);
        assert_eq!(c.metrics_bind_address.unwrap().port(), 20249);
        assert_eq!(c.node_port_addresses.unwrap().len(), 2);
        // iptables' section (mode ""): the first minSyncPeriod in the file.
        assert_eq!(c.min_sync_period_ms, Some(1500));
        assert_eq!(c.log_level.as_deref(), Some("debug"));
        assert_eq!(c.log_format, Some(crate::cli::LogFormat::Json));
        let text = kubeadm_with(&[("masqueradeAll: false", "masqueradeAll: true")]);
        assert_eq!(parsed(&text).0.masquerade_all, Some(true));
    }

    #[test]
    fn the_selected_modes_section_is_read_and_the_others_ignored() {
        let text = kubeadm_with(&[
            ("mode: \"\"", "mode: ipvs"),
            ("scheduler: \"\"", "scheduler: rr"),
            ("strictARP: false", "strictARP: true"),
            // iptables' section is not read in ipvs mode.
            ("masqueradeAll: false", "masqueradeAll: true"),
        ]);
        let (_, ignored) = parsed(&text);
        let f = fields(&ignored);
        assert!(f.contains(&"ipvs.strictARP"), "{f:?}");
        assert!(f.contains(&"iptables.masqueradeAll"), "{f:?}");
        // localhostNodePorts is iptables-only: not mentioned in ipvs mode.
        assert!(!f.contains(&"iptables.localhostNodePorts"), "{f:?}");
        // The ipvs section's minSyncPeriod is the one used.
        let text = kubeadm_with(&[
            ("mode: \"\"", "mode: ipvs"),
            (
                "minSyncPeriod: 0s\n  scheduler",
                "minSyncPeriod: 2s\n  scheduler",
            ),
        ]);
        assert_eq!(parsed(&text).0.min_sync_period_ms, Some(2000));
    }

    #[test]
    fn fields_that_cannot_be_honoured_are_refused_by_name() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("mode: \"\"", "mode: kernelspace")],
                "mode: \"kernelspace\"",
            ),
            (&[("mode: \"\"", "mode: userspace")], "mode: \"userspace\""),
            (
                &[
                    ("mode: \"\"", "mode: ipvs"),
                    ("scheduler: \"\"", "scheduler: lc"),
                ],
                "ipvs.scheduler: \"lc\"",
            ),
            (
                &[("localhostNodePorts: null", "localhostNodePorts: true")],
                "iptables.localhostNodePorts: true",
            ),
            (
                &[("detectLocalMode: \"\"", "detectLocalMode: NodeCIDR")],
                "detectLocalMode: \"NodeCIDR\"",
            ),
            (
                &[("nodePortAddresses: null", "nodePortAddresses: [primary]")],
                "nodePortAddresses[0]",
            ),
            (
                &[("nodePortAddresses: null", "nodePortAddresses: [localhost]")],
                "nodePortAddresses[0]: NodePorts are not served on loopback",
            ),
            // nftables' default for nodePortAddresses is `primary`.
            (
                &[("mode: \"\"", "mode: nftables")],
                "nodePortAddresses: unset",
            ),
        ];
        for (edits, expected) in cases {
            let e = refused(&kubeadm_with(edits));
            assert!(e.contains(expected), "{edits:?}: {e}");
        }
        // nftables with the addresses listed is fine.
        let text = kubeadm_with(&[
            ("mode: \"\"", "mode: nftables"),
            ("nodePortAddresses: null", "nodePortAddresses: [10.0.0.0/8]"),
        ]);
        parsed(&text);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_errors_naming_them() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "portRange: \"\"",
                "portRnage: \"\"",
                "unknown field `portRnage`",
            ),
            (
                "qps: 0",
                "qps: 0\n  timeout: 5s",
                "unknown field `clientConnection.timeout`",
            ),
            ("scheduler: \"\"", "scheduler: \"\"\n  x: 1", ""),
            (
                "healthzBindAddress: \"\"",
                "healthzBindAddress: 0.0.0.0",
                "healthzBindAddress",
            ),
            ("verbosity: 0", "verbosity: loud", "logging.verbosity"),
            (
                "hostnameOverride: \"\"",
                "hostnameOverride: [a]",
                "hostnameOverride: expected a string",
            ),
            (
                "minSyncPeriod: 0s\n  syncPeriod",
                "minSyncPeriod: soon\n  syncPeriod",
                "iptables.minSyncPeriod",
            ),
        ];
        for (from, to, expected) in cases {
            let text = kubeadm_with(&[(from, to)]);
            if expected.is_empty() {
                // Unknown fields of a section kube-proxy does not read in
                // this mode are not looked at.
                parsed(&text);
                continue;
            }
            let e = refused(&text);
            assert!(e.contains(expected), "{to}: {e}");
        }
    }

    #[test]
    fn every_kube_proxy_field_is_known() {
        // Every top-level field of kube-proxy's v1alpha1 type, set to a
        // value that is not refused: none may be "unknown".
        let text = "apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
featureGates: {SomeGate: true}
clientConnection: {kubeconfig: /k, acceptContentTypes: a, contentType: b, qps: 5, burst: 10}
logging: {format: text, verbosity: 2, flushFrequency: 5s, vmodule: [], options: {}}
hostnameOverride: n
bindAddress: 10.0.0.1
healthzBindAddress: 0.0.0.0:10256
metricsBindAddress: 127.0.0.1:10249
bindAddressHardFail: true
enableProfiling: true
showHiddenMetricsForVersion: '1.30'
mode: iptables
iptables: {masqueradeBit: 14, masqueradeAll: false, localhostNodePorts: false, snatNodeInternalIP: false, syncPeriod: 30s, minSyncPeriod: 1s}
ipvs: {scheduler: sh}
nftables: {masqueradeAll: true}
winkernel: {networkName: x}
detectLocalMode: ClusterCIDR
detectLocal: {bridgeInterface: br0}
clusterCIDR: 10.244.0.0/16
nodePortAddresses: [all]
oomScoreAdj: -999
conntrack: {maxPerCore: 32768, min: 131072, tcpEstablishedTimeout: 24h0m0s}
configSyncPeriod: 15m
portRange: ''
windowsRunAsService: false
";
        let (c, ignored) = parsed(text);
        assert_eq!(
            c.node_port_addresses,
            Some(Vec::new()),
            "all: every address"
        );
        assert_eq!(c.min_sync_period_ms, Some(1000));
        assert_eq!(c.conntrack_max_per_core, Some(32768));
        assert_eq!(c.conntrack_min, Some(131072));
        let f = fields(&ignored);
        for expected in [
            "featureGates.SomeGate",
            "clientConnection.qps",
            "logging.flushFrequency",
            "bindAddress",
            "enableProfiling",
            "iptables.masqueradeBit",
            "iptables.syncPeriod",
            "ipvs.scheduler",
            "nftables.masqueradeAll",
            "winkernel.networkName",
            "detectLocal.bridgeInterface",
            "oomScoreAdj",
            "conntrack.tcpEstablishedTimeout",
            "configSyncPeriod",
        ] {
            assert!(f.contains(&expected), "{expected} not in {f:?}");
        }
    }

    #[test]
    fn go_durations_parse() {
        let ms = |s: &str| parse_duration(s).map(|d| d.as_millis());
        assert_eq!(ms("0s"), Ok(0));
        assert_eq!(ms("0"), Ok(0));
        assert_eq!(ms("500ms"), Ok(500));
        assert_eq!(ms("1.5s"), Ok(1500));
        assert_eq!(ms("1m30s"), Ok(90_000));
        assert_eq!(ms("2h22m"), Ok(8_520_000));
        for bad in ["", "5", "5x", "s", "1s5"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
