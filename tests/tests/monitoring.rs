//! What deploy/monitoring/ ships, checked against the real daemon: every
//! metric the Grafana dashboard queries is in a scrape of daemons watching
//! an API server (promtool parses that scrape), network programming latency
//! is measured from a slice's trigger time, and the PodMonitor selects the
//! DaemonSet's pods and metrics port.

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{SocketAddrV4, TcpStream},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use common::*;
use lab::{
    Netns, addr,
    apiserver::{ApiServer, Kind},
};
use serde::Deserialize;

mod common;

const DASHBOARD: &str = include_str!("../../deploy/monitoring/grafana-dashboard.json");
const PODMONITOR: &str = include_str!("../../deploy/monitoring/podmonitor.yaml");
const DEPLOY: &str = include_str!("../../deploy/kube-ebpf-proxy.yaml");
const TRIGGER: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// `GET /metrics` on the daemon of the node `ns` is (127.0.0.1:10249).
fn scrape(ns: &Netns) -> Result<String> {
    ns.run(|| -> Result<String> {
        let at: SocketAddrV4 = "127.0.0.1:10249".parse()?;
        let mut s = TcpStream::connect_timeout(&at.into(), Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET /metrics HTTP/1.0\r\nHost: {at}\r\n\r\n")?;
        let mut raw = String::new();
        s.read_to_string(&mut raw)?;
        let (head, body) = raw.split_once("\r\n\r\n").context("no HTTP header end")?;
        anyhow::ensure!(head.split(' ').nth(1) == Some("200"), "{head}");
        Ok(body.to_string())
    })
}

/// The names a scrape declares (`# TYPE`, with a histogram's series) and
/// the names it has samples for.
fn scraped_names(text: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut declared = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').unwrap();
        declared.insert(name.to_string());
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                declared.insert(format!("{name}{suffix}"));
            }
        }
    }
    let sampled = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect();
    (declared, sampled)
}

/// PromQL functions, aggregations and keywords the dashboard uses; any
/// other identifier outside label matchers is a metric name.
const PROMQL_WORDS: &[&str] = &[
    "sum",
    "max",
    "min",
    "avg",
    "topk",
    "rate",
    "increase",
    "histogram_quantile",
    "time",
    "label_values",
    "by",
    "without",
    "instance",
];

/// The metric names in a PromQL expression (or a Grafana
/// `label_values(metric, label)` query).
fn metric_names(expr: &str) -> Vec<String> {
    let mut text = String::new();
    // Drop label matchers {...}, ranges [...], strings and by (...) lists.
    let mut depth = 0;
    let mut chars = expr.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' | '[' => depth += 1,
            '}' | ']' => depth -= 1,
            '"' => {
                for c in chars.by_ref() {
                    if c == '"' {
                        break;
                    }
                }
            }
            _ if depth == 0 => text.push(c),
            _ => {}
        }
    }
    for keyword in ["by", "without"] {
        while let Some(at) = text.find(&format!("{keyword} (")) {
            let end = at + text[at..].find(')').unwrap();
            text.replace_range(at..=end, " ");
        }
    }
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| !w.is_empty() && !w.starts_with(|c: char| c.is_ascii_digit()))
        .filter(|w| !PROMQL_WORDS.contains(w))
        .map(str::to_string)
        .collect()
}

/// Every query of the dashboard: the panels' targets and the variables'.
fn dashboard_queries() -> Vec<String> {
    let d: serde_json::Value = serde_json::from_str(DASHBOARD).expect("valid JSON");
    let mut out = Vec::new();
    for panel in d["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    for var in d["templating"]["list"].as_array().unwrap() {
        if let Some(q) = var["query"]["query"].as_str() {
            out.push(q.to_string());
        }
    }
    out
}

fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap();
    k8s_openapi::jiff::Timestamp::new(d.as_secs() as i64, d.subsec_nanos() as i32)
        .unwrap()
        .to_string()
}

/// The lab with daemons watching a stand-in API server that holds `yaml`.
fn start(test: &str, yaml: &str) -> Option<(Cluster, ApiServer)> {
    let mut c = Cluster::build(test)?;
    let at = SocketAddrV4::new(addr::UNDERLAY_GATEWAY, 6443);
    let api = ApiServer::start_in(c.lab.ns(addr::UNDERLAY), at).expect("API server");
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_json::Value::deserialize(doc).expect("valid YAML");
        if !value.is_null() {
            api.apply_json(value).expect("apply");
        }
    }
    c.source_args = vec!["--master".into(), api.url()];
    c.start_daemons();
    Some((c, api))
}

/// (count, sum) of a histogram in a scrape.
fn histogram(text: &str, name: &str) -> Option<(f64, f64)> {
    let value = |suffix: &str| -> Option<f64> {
        let prefix = format!("{name}_{suffix} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))?
            .parse()
            .ok()
    };
    Some((value("count")?, value("sum")?))
}

#[test]
fn every_metric_the_dashboard_queries_is_in_a_real_scrape() -> Result<()> {
    let Some((c, api)) = start("dashboard_metrics", &placement_manifests()) else {
        return Ok(());
    };
    let node = c.lab.ns(addr::NODE_A).clone();
    // Traffic, so that the per-Service families have series.
    lab::tcp_request(c.lab.ns(CLIENT_POD), sa("10.96.0.11:80"))?;

    // An EndpointSlice change whose trigger was 1.5 s ago, as the
    // controller would stamp it. Like kube-proxy, the daemon ignores
    // trigger times from before it started watching: let 2 s pass first.
    std::thread::sleep(Duration::from_secs(2));
    let name = "kubeproxy_network_programming_duration_seconds";
    let before = histogram(&scrape(&node)?, name).context("the histogram")?;
    assert_eq!(before.0, 0.0, "no slice change yet");
    let triggered = SystemTime::now() - Duration::from_millis(1500);
    let mut slice = api
        .get(Kind::EndpointSlice, "lab", "web-11-tcp-1")
        .context("the slice")?;
    slice["metadata"]["annotations"] = serde_json::json!({ TRIGGER: rfc3339(triggered) });
    api.apply_json(slice)?;
    let mut text = String::new();
    c.lab.wait_for(
        "the change to be programmed",
        Duration::from_secs(10),
        || {
            text = scrape(&node).unwrap_or_else(|e| format!("{e:#}"));
            histogram(&text, name).is_some_and(|(count, _)| count >= 1.0)
        },
    )?;
    let (count, sum) = histogram(&text, name).unwrap();
    eprintln!("{name}: count {count}, sum {sum:.3} s");
    assert_eq!(count, 1.0, "one change with a trigger time");
    assert!((1.5..10.0).contains(&sum), "from the trigger time: {sum}");

    // promtool reads the scrape and finds nothing to flag.
    let path = c.lab.dir().join("scrape.txt");
    std::fs::write(&path, &text)?;
    let out = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&path)?)
        .output()?;
    let complaints =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && complaints.trim().is_empty(),
        "promtool: {complaints}"
    );

    let (declared, sampled) = scraped_names(&text);
    let queries = dashboard_queries();
    let mut names = BTreeSet::new();
    for q in &queries {
        let found = metric_names(q);
        assert!(!found.is_empty(), "no metric in {q}");
        names.extend(found);
    }
    let missing: Vec<_> = names.iter().filter(|n| !declared.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "queried by the dashboard, absent from /metrics: {missing:?}\n{text}"
    );
    // Declared is not enough: every series the dashboard plots exists.
    let unsampled: Vec<_> = names.iter().filter(|n| !sampled.contains(*n)).collect();
    assert!(
        unsampled.is_empty(),
        "declared without a sample: {unsampled:?}"
    );
    eprintln!(
        "{} queries, {} metrics, all in the scrape with samples",
        queries.len(),
        names.len()
    );
    Ok(())
}

#[test]
fn the_metric_name_parser_reads_promql() {
    let q = "histogram_quantile(0.99, sum by (le) (rate(a_b_bucket{instance=~\"$instance\", \
             x=\"y z\"}[$__rate_interval]))) / process_max_fds";
    assert_eq!(metric_names(q), ["a_b_bucket", "process_max_fds"]);
    assert_eq!(
        metric_names("label_values(kubeproxy_sync_proxy_rules_last_timestamp_seconds, instance)"),
        ["kubeproxy_sync_proxy_rules_last_timestamp_seconds"]
    );
    // Every query names one of our metrics, and nothing else.
    for q in dashboard_queries() {
        for name in metric_names(&q) {
            assert!(
                ["kubeproxy_", "kube_ebpf_proxy_", "process_"]
                    .iter()
                    .any(|p| name.starts_with(p)),
                "{name} in {q}"
            );
        }
    }
}

#[test]
fn the_podmonitor_selects_the_daemonsets_pods_and_metrics_port() {
    let pm: serde_yaml::Value = serde_yaml::from_str(PODMONITOR).unwrap();
    assert_eq!(pm["kind"].as_str(), Some("PodMonitor"));
    assert_eq!(pm["apiVersion"].as_str(), Some("monitoring.coreos.com/v1"));
    let ds = serde_yaml::Deserializer::from_str(DEPLOY)
        .map(|doc| serde_yaml::Value::deserialize(doc).unwrap())
        .find(|d| d["kind"].as_str() == Some("DaemonSet"))
        .expect("a DaemonSet");
    assert_eq!(pm["metadata"]["namespace"], ds["metadata"]["namespace"]);
    let pod_labels = ds["spec"]["template"]["metadata"]["labels"]
        .as_mapping()
        .unwrap();
    for (k, v) in pm["spec"]["selector"]["matchLabels"].as_mapping().unwrap() {
        assert_eq!(pod_labels.get(k), Some(v), "pod label {k:?}");
    }
    let port = pm["spec"]["podMetricsEndpoints"][0]["port"]
        .as_str()
        .unwrap();
    let ports = &ds["spec"]["template"]["spec"]["containers"][0]["ports"];
    let declared = ports
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"].as_str() == Some(port))
        .unwrap_or_else(|| panic!("no container port named {port}"));
    assert_eq!(declared["containerPort"].as_u64(), Some(10249));
}
