//! Fuzz targets for the two parsers a user feeds by hand: the manifests
//! parser (`--manifests`) and the config parser (`--config`). Inputs are
//! arbitrary text, text made of YAML and JSON tokens, and structured but
//! wrong documents: valid objects with one node replaced, removed or
//! retyped. Neither parser may panic; a manifest document that is not
//! kept is reported as a problem; valid objects read back unchanged.
//!
//! Seeded like control_plane_props; `KEP_SOAK=1` runs fifty times more.

mod generators;

use std::time::Instant;

use proptest::{
    collection::vec,
    prelude::*,
    sample::select,
    test_runner::{Config, RngSeed, TestRunner},
};
use proxy_userspace::{config, source::manifests};
use serde_json::Value;

fn soak() -> bool {
    std::env::var_os("KEP_SOAK").is_some_and(|v| v != "0")
}

fn runner(cases: u32) -> TestRunner {
    let seed = match std::env::var("KEP_SEED") {
        Ok(s) => s.parse().expect("KEP_SEED is a number"),
        Err(_) if soak() => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
        Err(_) => 0x6b65_7032,
    };
    eprintln!("seed {seed} (KEP_SEED={seed} replays it)");
    TestRunner::new(Config {
        cases: if soak() { cases * 50 } else { cases },
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        ..Config::default()
    })
}

/// Runs `test` on `cases` values of `strategy`; prints how many ran.
fn fuzz<S: Strategy>(
    what: &str,
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let started = Instant::now();
    let mut runner = runner(cases);
    let result = runner.run(&strategy, test);
    eprintln!(
        "{what}: {} inputs, {:.1} s",
        runner.config().cases,
        started.elapsed().as_secs_f64()
    );
    if let Err(e) = result {
        panic!("{what}: {e}");
    }
}

const TOKENS: &[&str] = &[
    "---\n",
    "...\n",
    "\n",
    "  ",
    "\t",
    "- ",
    ": ",
    "{",
    "}",
    "[",
    "]",
    ",",
    "\"",
    "'",
    "#",
    "&a ",
    "*a",
    "!!binary ",
    "!!map ",
    "? ",
    "|\n",
    ">-\n",
    "%YAML 1.2\n",
    "\u{feff}",
    "\\u0000",
    "apiVersion: v1\n",
    "apiVersion: discovery.k8s.io/v1\n",
    "kind: Service\n",
    "kind: EndpointSlice\n",
    "kind: List\n",
    "items:\n",
    "metadata: {name: a}\n",
    "spec:\n",
    "ports: [{port: 80}]\n",
    "addressType: IPv4\n",
    "endpoints: [{addresses: [10.0.0.1]}]\n",
    "clusterIP: 10.96.0.1\n",
    "\"kind\": \"Service\"",
    "\"items\": [",
    "null",
    "1e999",
    "-0",
    "99999999999999999999999",
    "apiVersion: kube-ebpf-proxy.config/v1alpha1\n",
    "kind: KubeEbpfProxyConfiguration\n",
    "snatPortRange: ",
    "nodePortAddresses: ",
    "clientConnection: ",
    "logging: {format: ",
    "65536-1",
    "10.0.0.0/33",
    "::/129",
];

/// Text made of YAML and JSON tokens: it gets past the first checks.
fn token_soup() -> impl Strategy<Value = String> {
    vec(select(TOKENS), 0..40).prop_map(|t| t.concat())
}

/// Any text: random characters, or random bytes read as UTF-8 lossily.
fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        vec(any::<u8>(), 0..256).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        token_soup(),
    ]
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e300f64..1e300).prop_map(Value::from),
        select(vec!["", "None", "10.96.0.1", "fd00::1", "65536", "-1"]).prop_map(Value::from),
        Just(Value::from("x".repeat(300))),
        ".{0,12}".prop_map(Value::from),
    ]
}

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            vec((".{0,8}", inner), 0..4).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// How to spoil a document.
#[derive(Clone, Debug)]
enum Mutation {
    /// Replace the node at this index (pre-order) with a value.
    Replace(usize, Value),
    /// Remove the node at this index from its parent.
    Remove(usize),
    /// Wrap the node at this index in a list.
    Wrap(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<usize>(), json_value()).prop_map(|(i, v)| Mutation::Replace(i, v)),
        2 => any::<usize>().prop_map(Mutation::Remove),
        1 => any::<usize>().prop_map(Mutation::Wrap),
    ]
}

/// JSON pointers to every node below the root, in pre-order.
fn node_paths(v: &Value, at: &str, out: &mut Vec<String>) {
    let children: Vec<(String, &Value)> = match v {
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, c)| (i.to_string(), c))
            .collect(),
        Value::Object(o) => o
            .iter()
            .map(|(k, c)| (k.replace('~', "~0").replace('/', "~1"), c))
            .collect(),
        _ => return,
    };
    for (key, c) in children {
        let path = format!("{at}/{key}");
        out.push(path.clone());
        node_paths(c, &path, out);
    }
}

fn mutate(v: &mut Value, m: &Mutation) {
    let mut paths = Vec::new();
    node_paths(v, "", &mut paths);
    let (Mutation::Replace(i, _) | Mutation::Remove(i) | Mutation::Wrap(i)) = m;
    let Some(path) = paths.get(i % paths.len().max(1)) else {
        return;
    };
    match m {
        Mutation::Replace(_, new) => *v.pointer_mut(path).expect("listed") = new.clone(),
        Mutation::Wrap(_) => {
            let node = v.pointer_mut(path).expect("listed");
            *node = Value::Array(vec![node.take()]);
        }
        Mutation::Remove(_) => {
            let (parent, last) = path.rsplit_once('/').expect("a pointer has a slash");
            match v.pointer_mut(parent).expect("listed") {
                Value::Array(a) => drop(a.remove(last.parse::<usize>().expect("an index"))),
                Value::Object(o) => drop(o.remove(&last.replace("~1", "/").replace("~0", "~"))),
                _ => unreachable!("only arrays and objects have children"),
            }
        }
    }
}

/// Documents as text: YAML documents separated by `---`, a JSON stream,
/// or one `List` holding them all.
fn render(docs: &[Value], style: u8) -> String {
    match style % 3 {
        0 => docs
            .iter()
            .map(|d| {
                format!(
                    "---\n{}",
                    serde_yaml::to_string(d).expect("JSON values are YAML")
                )
            })
            .collect(),
        1 => docs.iter().map(|d| format!("{d}\n")).collect(),
        _ => serde_yaml::to_string(&serde_json::json!({
            "apiVersion": "v1", "kind": "List", "items": docs
        }))
        .expect("JSON values are YAML"),
    }
}

fn object_docs() -> impl Strategy<Value = Vec<Value>> {
    vec(
        prop_oneof![
            generators::service().prop_map(|s| serde_json::to_value(s).expect("serializes")),
            generators::slice().prop_map(|s| serde_json::to_value(s).expect("serializes")),
        ],
        1..5,
    )
}

#[test]
fn manifests_parser_survives_any_text() {
    fuzz("manifests, any text", 3000, any_text(), |text| {
        let objects = manifests::parse_str(&text, "fuzz");
        // Every kept object has the name the parser insists on.
        for s in &objects.services {
            prop_assert!(s.metadata.name.as_deref().is_some_and(|n| !n.is_empty()));
        }
        Ok(())
    });
}

/// A document the manifests parser must keep or report.
fn is_ours(d: &Value) -> bool {
    matches!(
        (d["apiVersion"].as_str(), d["kind"].as_str()),
        (Some("v1"), Some("Service")) | (Some("discovery.k8s.io/v1"), Some("EndpointSlice"))
    )
}

#[test]
fn manifests_parser_reports_every_spoiled_document() {
    let strategy = (object_docs(), vec(mutation(), 0..4), any::<u8>());
    fuzz(
        "manifests, spoiled objects",
        600,
        strategy,
        |(mut docs, muts, style)| {
            for (i, m) in muts.iter().enumerate() {
                let n = docs.len();
                mutate(&mut docs[i % n], m);
            }
            let text = render(&docs, style);
            let objects = manifests::parse_str(&text, "fuzz");
            let kept = objects.services.len() + objects.slices.len();
            // A Service or EndpointSlice document is kept or reported,
            // never lost in silence; nothing is invented.
            let ours = docs.iter().filter(|d| is_ours(d)).count();
            prop_assert!(
                kept <= docs.len(),
                "{kept} kept of {} documents",
                docs.len()
            );
            prop_assert!(
                kept + objects.problems.len() >= ours,
                "{ours} Services and slices, {kept} kept, {} problems",
                objects.problems.len()
            );
            Ok(())
        },
    );
}

/// Unspoiled objects with a name read back as they were written (with the
/// default namespace filled in), in every rendering.
#[test]
fn manifests_parser_reads_valid_objects_back() {
    let strategy = (object_docs(), any::<u8>());
    fuzz("manifests, round trip", 300, strategy, |(docs, style)| {
        let objects = manifests::parse_str(&render(&docs, style), "fuzz");
        let mut read: Vec<Value> = objects
            .services
            .iter()
            .map(|s| serde_json::to_value(s).expect("serializes"))
            .chain(
                objects
                    .slices
                    .iter()
                    .map(|s| serde_json::to_value(s).expect("serializes")),
            )
            .collect();
        let mut want = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for d in &docs {
            let mut d = d.clone();
            let meta = &mut d["metadata"];
            if meta["name"].as_str().is_none_or(str::is_empty) {
                continue;
            }
            if meta["namespace"].as_str().is_none_or(str::is_empty) {
                meta["namespace"] = "default".into();
            }
            let id = (meta["namespace"].to_string(), meta["name"].to_string());
            let id = (d["kind"].to_string(), id);
            if seen.insert(id) {
                want.push(d);
            }
        }
        let key = |v: &Value| v.to_string();
        read.sort_by_key(key);
        want.sort_by_key(key);
        prop_assert_eq!(read, want);
        Ok(())
    });
}

#[test]
fn config_parser_survives_any_text() {
    fuzz("config, any text", 3000, any_text(), |text| {
        let _ = config::parse_str(&text);
        Ok(())
    });
}

/// A config file with every field set, valid.
fn valid_config() -> Value {
    serde_json::json!({
        "apiVersion": config::API_VERSION,
        "kind": config::KIND,
        "hostnameOverride": "node-a",
        "healthzBindAddress": "0.0.0.0:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        "nodePortAddresses": ["192.168.0.0/16"],
        "clientConnection": {"kubeconfig": "/etc/kube/config"},
        "logging": {"format": "json", "level": "info"},
        "master": "https://10.0.0.1:6443",
        "bpffs": "/sys/fs/bpf/kube-ebpf-proxy",
        "devices": ["eth0"],
        "snatPortRange": "61000-65535",
        "pollIntervalMs": 200,
        "minSyncPeriodMs": 50,
        "serviceProxyName": "ebpf",
        "bpfDebug": false
    })
}

#[test]
fn config_parser_refuses_spoiled_files_without_panicking() {
    let valid = valid_config();
    let text = serde_yaml::to_string(&valid).expect("YAML");
    config::parse_str(&text).expect("the valid config parses");
    let strategy = (vec(mutation(), 1..4), any::<bool>());
    fuzz("config, spoiled files", 1500, strategy, |(muts, json)| {
        let mut v = valid.clone();
        for m in &muts {
            mutate(&mut v, m);
        }
        let text = if json {
            v.to_string()
        } else {
            serde_yaml::to_string(&v).expect("YAML")
        };
        if let Err(e) = config::parse_str(&text) {
            // One line an operator can act on.
            let msg = format!("{e:#}");
            prop_assert!(!msg.is_empty() && !msg.contains("panicked"), "{msg}");
        }
        Ok(())
    });
}
