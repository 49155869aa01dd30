//! Every manifest under deploy/ (recursively: the DaemonSet and its RBAC,
//! the migration Jobs, and the demo's manifests in deploy/examples/) is
//! parsed into its k8s-openapi type, and a field the type does not know is
//! an error, as `kubectl apply --validate=strict` would make it.
//!
//! k8s-openapi's types ignore unknown fields when deserializing, so a typo
//! (`hostNetwrok: true`) would parse into a DaemonSet without host
//! networking. The check: deserialize the document into its type, serialize
//! the typed value back to JSON, and require every field path of the source
//! document to be present in the round trip; a path that is not is reported
//! (`spec.template.spec.hostNetwrok`). Null values in the source are
//! skipped (the typed value drops them).
//!
//! Then the security stance of the shipped DaemonSet and ClusterRole is
//! asserted: not privileged, named capabilities each explained in a
//! comment, a seccomp profile and a read-only root filesystem for every
//! container of our image, host network, every taint tolerated,
//! system-node-critical, read-only access to services, endpointslices and
//! nodes; and the admission policy of deploy/admission/ refuses what
//! docs/security.md says it refuses.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use k8s_openapi::{
    api::{
        admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding},
        apps::v1::{DaemonSet, Deployment},
        batch::v1::Job,
        core::v1::{ConfigMap, Container, PodSpec, Service, ServiceAccount},
        discovery::v1::EndpointSlice,
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::{apis::meta::v1::ListMeta, util::intstr::IntOrString},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;

const NAME: &str = "kube-ebpf-proxy";
const NAMESPACE: &str = "kube-system";
/// The capabilities the daemon needs, measured (see the DaemonSet).
const DAEMON_CAPS: [&str; 3] = ["BPF", "NET_ADMIN", "PERFMON"];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// One document of a manifest file.
struct Doc {
    /// e.g. `deploy/kube-ebpf-proxy.yaml #5`.
    origin: String,
    /// Path of the file, for reading its comments.
    file: PathBuf,
    value: Value,
}

fn manifest_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            manifest_files(&path, out);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            out.push(path);
        }
    }
}

/// The documents of a YAML stream or a JSON stream (blank ones skipped).
fn parse_documents(text: &str, json: bool) -> Result<Vec<Value>, String> {
    let values: Vec<Value> = if json {
        serde_json::Deserializer::from_str(text)
            .into_iter::<Value>()
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?
    } else {
        serde_yaml::Deserializer::from_str(text)
            .map(Value::deserialize)
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?
    };
    Ok(values.into_iter().filter(|v| !v.is_null()).collect())
}

fn all_documents() -> Vec<Doc> {
    let mut files = Vec::new();
    manifest_files(&deploy_dir(), &mut files);
    let mut docs = Vec::new();
    for file in files {
        let text = fs::read_to_string(&file).unwrap();
        let json = file.extension().is_some_and(|e| e == "json");
        let shown = format!(
            "deploy/{}",
            file.strip_prefix(deploy_dir()).unwrap().display()
        );
        let values = parse_documents(&text, json).unwrap_or_else(|e| panic!("{shown}: {e}"));
        for (i, value) in values.into_iter().enumerate() {
            docs.push(Doc {
                origin: format!("{shown} #{}", i + 1),
                file: file.clone(),
                value,
            });
        }
    }
    docs
}

/// Field paths of `source` missing from `round_trip`.
fn unknown_paths(source: &Value, round_trip: &Value, path: &str, out: &mut Vec<String>) {
    match source {
        Value::Object(fields) => {
            for (key, value) in fields {
                if value.is_null() {
                    continue;
                }
                let here = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match round_trip.get(key) {
                    Some(rt) if round_trip.is_object() => unknown_paths(value, rt, &here, out),
                    _ => out.push(here),
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let here = format!("{path}[{i}]");
                match round_trip.as_array().and_then(|a| a.get(i)) {
                    Some(rt) => unknown_paths(item, rt, &here, out),
                    None => out.push(here),
                }
            }
        }
        _ => {}
    }
}

/// Deserializes `doc` into `T` and back; every field of `doc` must survive.
fn round_trip<T: DeserializeOwned + Serialize>(doc: &Value, prefix: &str) -> Result<(), String> {
    let typed: T = serde_json::from_value(doc.clone()).map_err(|e| {
        format!(
            "does not deserialize into {}: {e}",
            std::any::type_name::<T>()
        )
    })?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let mut unknown = Vec::new();
    unknown_paths(doc, &back, prefix, &mut unknown);
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(format!("unknown field(s): {}", unknown.join(", ")))
    }
}

/// Checks one document against the type its apiVersion and kind name.
fn check_document(doc: &Value) -> Result<(), String> {
    check_at(doc, "")
}

fn check_at(doc: &Value, prefix: &str) -> Result<(), String> {
    let api_version = doc.get("apiVersion").and_then(Value::as_str);
    let kind = doc.get("kind").and_then(Value::as_str);
    let at = |p: &str| {
        if prefix.is_empty() {
            p.to_string()
        } else {
            format!("{prefix}.{p}")
        }
    };
    match (api_version, kind) {
        (Some("v1"), Some("ServiceAccount")) => round_trip::<ServiceAccount>(doc, prefix),
        (Some("v1"), Some("ConfigMap")) => round_trip::<ConfigMap>(doc, prefix),
        (Some("v1"), Some("Service")) => round_trip::<Service>(doc, prefix),
        (Some("rbac.authorization.k8s.io/v1"), Some("ClusterRole")) => {
            round_trip::<ClusterRole>(doc, prefix)
        }
        (Some("rbac.authorization.k8s.io/v1"), Some("ClusterRoleBinding")) => {
            round_trip::<ClusterRoleBinding>(doc, prefix)
        }
        (Some("apps/v1"), Some("DaemonSet")) => round_trip::<DaemonSet>(doc, prefix),
        (Some("apps/v1"), Some("Deployment")) => round_trip::<Deployment>(doc, prefix),
        (Some("batch/v1"), Some("Job")) => round_trip::<Job>(doc, prefix),
        (Some("discovery.k8s.io/v1"), Some("EndpointSlice")) => {
            round_trip::<EndpointSlice>(doc, prefix)
        }
        (Some("admissionregistration.k8s.io/v1"), Some("ValidatingAdmissionPolicy")) => {
            round_trip::<ValidatingAdmissionPolicy>(doc, prefix)
        }
        (Some("admissionregistration.k8s.io/v1"), Some("ValidatingAdmissionPolicyBinding")) => {
            round_trip::<ValidatingAdmissionPolicyBinding>(doc, prefix)
        }
        // A mixed list (kubectl's `kind: List`): each item by its own kind.
        (Some("v1"), Some("List")) => {
            let fields = doc.as_object().ok_or("a List is a mapping")?;
            let mut problems = Vec::new();
            for key in fields.keys() {
                if !["apiVersion", "kind", "metadata", "items"].contains(&key.as_str()) {
                    problems.push(format!("unknown field(s): {}", at(key)));
                }
            }
            if let Some(meta) = doc.get("metadata")
                && let Err(e) = round_trip::<ListMeta>(meta, &at("metadata"))
            {
                problems.push(e);
            }
            let items = doc.get("items").and_then(Value::as_array);
            for (i, item) in items.into_iter().flatten().enumerate() {
                if let Err(e) = check_at(item, &at(&format!("items[{i}]"))) {
                    problems.push(format!("{}: {e}", at(&format!("items[{i}]"))));
                }
            }
            if problems.is_empty() {
                Ok(())
            } else {
                Err(problems.join("; "))
            }
        }
        (v, k) => Err(format!(
            "no k8s-openapi type here for apiVersion {v:?} kind {k:?} (add it to check_at)"
        )),
    }
}

/// Documents and List items, flattened, with their kind.
fn objects(docs: &[Doc]) -> Vec<(&Doc, &Value)> {
    let mut out = Vec::new();
    for doc in docs {
        if doc.value.get("kind").and_then(Value::as_str) == Some("List") {
            for item in doc.value["items"].as_array().into_iter().flatten() {
                out.push((doc, item));
            }
        } else {
            out.push((doc, &doc.value));
        }
    }
    out
}

/// The one object of this kind, name (and namespace) in deploy/.
fn find<'a, T: DeserializeOwned>(
    docs: &'a [Doc],
    kind: &str,
    ns: Option<&str>,
    name: &str,
) -> (T, &'a Doc) {
    let found: Vec<_> = objects(docs)
        .into_iter()
        .filter(|(_, v)| {
            v["kind"] == kind
                && v["metadata"]["name"] == name
                && v["metadata"]["namespace"].as_str() == ns
        })
        .collect();
    assert_eq!(found.len(), 1, "{kind} {ns:?}/{name} in deploy/");
    let (doc, value) = found[0];
    (serde_json::from_value(value.clone()).unwrap(), doc)
}

/// Pod templates of every workload in deploy/, with where they come from.
fn pod_specs(docs: &[Doc]) -> Vec<(String, PodSpec)> {
    let mut out = Vec::new();
    for (doc, v) in objects(docs) {
        let spec = match v["kind"].as_str() {
            Some("DaemonSet") => serde_json::from_value::<DaemonSet>(v.clone())
                .unwrap()
                .spec
                .and_then(|s| s.template.spec),
            Some("Deployment") => serde_json::from_value::<Deployment>(v.clone())
                .unwrap()
                .spec
                .and_then(|s| s.template.spec),
            Some("Job") => serde_json::from_value::<Job>(v.clone())
                .unwrap()
                .spec
                .and_then(|s| s.template.spec),
            _ => None,
        };
        if let Some(spec) = spec {
            out.push((format!("{} {}", doc.origin, v["kind"]), spec));
        }
    }
    out
}

fn all_containers(spec: &PodSpec) -> impl Iterator<Item = &Container> {
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
}

#[test]
fn every_manifest_in_deploy_is_its_kubernetes_type_with_no_unknown_field() {
    let docs = all_documents();
    let failures: Vec<String> = docs
        .iter()
        .filter_map(|d| {
            check_document(&d.value)
                .err()
                .map(|e| format!("{}: {e}", d.origin))
        })
        .collect();
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));

    // Not vacuous: the walk reached every kind shipped, examples included.
    let kinds: BTreeSet<&str> = objects(&docs)
        .into_iter()
        .filter_map(|(_, v)| v["kind"].as_str())
        .collect();
    for kind in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
        "Job",
        "Service",
        "EndpointSlice",
        "Deployment",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ] {
        assert!(
            kinds.contains(kind),
            "no {kind} found in deploy/: {kinds:?}"
        );
    }
    assert!(
        docs.iter().any(|d| d.origin.starts_with("deploy/examples/")
            && d.origin.contains(".json")
            && d.value["kind"] == "List"),
        "the JSON List of deploy/examples/ was read"
    );
}

/// The shipped DaemonSet document, as text, for mutilating.
fn daemonset_yaml() -> String {
    let text = fs::read_to_string(deploy_dir().join("kube-ebpf-proxy.yaml")).unwrap();
    text.split("\n---\n")
        .find(|d| d.contains("\nkind: DaemonSet\n"))
        .expect("a DaemonSet document")
        .to_string()
}

fn check_yaml(text: &str) -> Result<(), String> {
    let docs = parse_documents(text, false)?;
    assert_eq!(docs.len(), 1);
    check_document(&docs[0])
}

#[test]
fn misspelled_fields_are_rejected_with_their_path() {
    let shipped = daemonset_yaml();
    check_yaml(&shipped).expect("the shipped DaemonSet is clean");

    let typo = shipped.replacen("hostNetwork: true", "hostNetwrok: true", 1);
    assert_ne!(typo, shipped);
    let e = check_yaml(&typo).unwrap_err();
    assert!(e.contains("spec.template.spec.hostNetwrok"), "{e}");

    // Deep in a container, in a list.
    let typo = shipped.replacen("readOnlyRootFilesystem:", "readOnlyRootFileSystem:", 1);
    let e = check_yaml(&typo).unwrap_err();
    assert!(
        e.contains("spec.template.spec.containers[0].securityContext.readOnlyRootFileSystem"),
        "{e}"
    );

    // A value of the wrong type does not deserialize at all.
    let typo = shipped.replacen("hostNetwork: true", "hostNetwork: \"yes\"", 1);
    let e = check_yaml(&typo).unwrap_err();
    assert!(e.contains("does not deserialize"), "{e}");

    // An unknown kind is not waved through.
    let typo = shipped.replacen("kind: DaemonSet", "kind: DaemonSett", 1);
    let e = check_yaml(&typo).unwrap_err();
    assert!(e.contains("DaemonSett"), "{e}");

    // Inside a JSON List item.
    let list = fs::read_to_string(deploy_dir().join("examples/dns.json")).unwrap();
    let typo = list.replacen("\"clusterIP\"", "\"clusterIp\"", 1);
    assert_ne!(typo, list);
    let docs = parse_documents(&typo, true).unwrap();
    let e = check_document(&docs[0]).unwrap_err();
    assert!(e.contains("items[0].spec.clusterIp"), "{e}");
}

#[test]
fn the_daemonset_runs_with_named_capabilities_and_no_privilege() {
    let docs = all_documents();
    let (ds, doc): (DaemonSet, _) = find(&docs, "DaemonSet", Some(NAMESPACE), NAME);
    let pod = ds.spec.unwrap().template.spec.unwrap();

    assert_eq!(pod.host_network, Some(true), "hostNetwork");
    assert_eq!(pod.host_pid, None, "no hostPID");
    assert_eq!(pod.host_ipc, None, "no hostIPC");
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "tolerates every taint: {:?}",
        pod.tolerations
    );
    assert_eq!(pod.service_account_name.as_deref(), Some(NAME));
    let _: (ServiceAccount, _) = find(&docs, "ServiceAccount", Some(NAMESPACE), NAME);
    assert!(pod.init_containers.is_none(), "no init container needed");

    let text = fs::read_to_string(&doc.file).unwrap();
    assert_eq!(pod.containers.len(), 1);
    let c = &pod.containers[0];
    let sc = c.security_context.as_ref().expect("a securityContext");
    assert_eq!(sc.privileged, Some(false), "not privileged");
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    assert_eq!(
        added,
        BTreeSet::from(DAEMON_CAPS),
        "exactly the measured set"
    );
    for cap in &added {
        // Each one explained where it is added.
        let comment = format!("# CAP_{cap}: ");
        assert!(
            text.contains(&comment),
            "no comment {comment:?} explaining {cap}"
        );
    }

    // The node's name from the downward API, passed to the daemon.
    let env = c.env.as_ref().unwrap();
    let node_name = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref());
    assert_eq!(field.map(|f| f.field_path.as_str()), Some("spec.nodeName"));
    let args = c.args.as_ref().unwrap();
    assert_eq!(args[0], "run");
    assert!(args.contains(&"--hostname-override=$(NODE_NAME)".to_string()));
    // The API server's own address, not the kubernetes Service's ClusterIP
    // (which needs a service proxy to be reached).
    for var in ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"] {
        let set = env.iter().find(|e| e.name == var);
        assert!(
            set.and_then(|e| e.value.as_deref())
                .is_some_and(|v| !v.is_empty()),
            "{var} set in the DaemonSet"
        );
    }

    // The host's bpffs, mounted where the config pins.
    let volumes: BTreeMap<&str, _> = pod
        .volumes
        .iter()
        .flatten()
        .map(|v| (v.name.as_str(), v))
        .collect();
    let mounts = c.volume_mounts.as_ref().unwrap();
    let bpffs = mounts
        .iter()
        .find(|m| m.mount_path == "/sys/fs/bpf")
        .unwrap();
    let host = volumes[bpffs.name.as_str()].host_path.as_ref().unwrap();
    assert_eq!(host.path, "/sys/fs/bpf");

    // The config file: mounted from the ConfigMap, and it parses.
    let config_arg = args
        .iter()
        .find_map(|a| a.strip_prefix("--config="))
        .expect("--config");
    let config_path = Path::new(config_arg);
    let mount = mounts
        .iter()
        .find(|m| Path::new(&m.mount_path) == config_path.parent().unwrap())
        .expect("the config's directory is a mount");
    let cm_name = &volumes[mount.name.as_str()]
        .config_map
        .as_ref()
        .expect("from a ConfigMap")
        .name;
    let (cm, _): (ConfigMap, _) = find(&docs, "ConfigMap", Some(NAMESPACE), cm_name);
    let key = config_path.file_name().unwrap().to_str().unwrap();
    let config = proxy_userspace::config::parse_str(&cm.data.unwrap()[key]).unwrap();
    assert!(
        config
            .bpffs
            .as_ref()
            .unwrap()
            .starts_with(&bpffs.mount_path)
    );

    // The cleanup Job removes what the daemon pins.
    let (_, cleanup) = pod_specs(&docs)
        .into_iter()
        .find(|(origin, _)| origin.contains("kube-ebpf-proxy-cleanup-job"))
        .expect("the cleanup Job");
    let command = cleanup.containers[0].command.clone().unwrap();
    assert_eq!(command[1], "cleanup");
    assert!(
        command.contains(&format!(
            "--bpffs={}",
            config.bpffs.as_ref().unwrap().display()
        )),
        "{command:?}"
    );

    // Probes on the health port the config binds.
    let port = config.healthz_bind_address.unwrap().port();
    for (probe, path) in [
        (c.liveness_probe.as_ref(), "/livez"),
        (c.readiness_probe.as_ref(), "/healthz"),
    ] {
        let get = probe.unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.port, IntOrString::Int(i32::from(port)));
    }
}

#[test]
fn containers_of_our_image_are_never_privileged() {
    let docs = all_documents();
    let mut seen = 0;
    for (origin, pod) in pod_specs(&docs) {
        for c in all_containers(&pod) {
            if !c
                .image
                .as_deref()
                .unwrap_or("")
                .contains("/kube-ebpf-proxy:")
            {
                continue;
            }
            seen += 1;
            let sc = c.security_context.as_ref().unwrap();
            assert_ne!(sc.privileged, Some(true), "{origin} {}", c.name);
            let caps = sc.capabilities.as_ref().unwrap();
            assert!(caps.drop.iter().flatten().any(|d| d == "ALL"), "{origin}");
            for cap in caps.add.iter().flatten() {
                assert!(DAEMON_CAPS.contains(&cap.as_str()), "{origin}: {cap}");
            }
        }
    }
    assert!(seen >= 2, "the DaemonSet and the cleanup Job");
}

/// The seccomp profile a container runs with: its own, else its pod's.
fn seccomp_type<'a>(pod: &'a PodSpec, c: &'a Container) -> Option<&'a str> {
    let own = c
        .security_context
        .as_ref()
        .and_then(|s| s.seccomp_profile.as_ref());
    let pods = pod
        .security_context
        .as_ref()
        .and_then(|s| s.seccomp_profile.as_ref());
    own.or(pods).map(|p| p.type_.as_str())
}

#[test]
fn containers_of_our_image_have_seccomp_and_a_read_only_root() {
    let mut seen = 0;
    for (origin, pod) in pod_specs(&all_documents()) {
        for c in all_containers(&pod) {
            if !c
                .image
                .as_deref()
                .unwrap_or("")
                .contains("/kube-ebpf-proxy:")
            {
                continue;
            }
            seen += 1;
            let what = format!("{origin} {}", c.name);
            // RuntimeDefault at least: never Unconfined, never unset (which
            // some runtimes take as Unconfined).
            assert_eq!(seccomp_type(&pod, c), Some("RuntimeDefault"), "{what}");
            let sc = c.security_context.as_ref().unwrap();
            assert_eq!(sc.read_only_root_filesystem, Some(true), "{what}");
            assert_eq!(sc.allow_privilege_escalation, Some(false), "{what}");
        }
    }
    assert!(seen >= 2, "the DaemonSet and the cleanup Job");

    // Not vacuous: a container-level Unconfined overrides the pod's.
    let docs = all_documents();
    let (ds, _): (DaemonSet, _) = find(&docs, "DaemonSet", Some(NAMESPACE), NAME);
    let mut pod = ds.spec.unwrap().template.spec.unwrap();
    let sc = pod.containers[0].security_context.as_mut().unwrap();
    sc.seccomp_profile = Some(k8s_openapi::api::core::v1::SeccompProfile {
        type_: "Unconfined".into(),
        ..Default::default()
    });
    assert_eq!(seccomp_type(&pod, &pod.containers[0]), Some("Unconfined"));
}

#[test]
fn bidirectional_propagation_only_in_privileged_containers() {
    // The API server refuses it otherwise; catch it before a cluster does.
    for (origin, pod) in pod_specs(&all_documents()) {
        for c in all_containers(&pod) {
            let privileged = c
                .security_context
                .as_ref()
                .and_then(|s| s.privileged)
                .unwrap_or(false);
            for m in c.volume_mounts.iter().flatten() {
                assert!(
                    privileged || m.mount_propagation.as_deref() != Some("Bidirectional"),
                    "{origin} {}: {} is Bidirectional in an unprivileged container",
                    c.name,
                    m.mount_path
                );
            }
        }
    }
}

#[test]
fn the_cluster_role_only_reads_services_slices_and_nodes() {
    let docs = all_documents();
    let (role, _): (ClusterRole, _) = find(&docs, "ClusterRole", None, NAME);
    let read = ["get", "list", "watch"];
    let allowed: BTreeMap<(&str, &str), &[&str]> = BTreeMap::from([
        (("", "services"), &read[..]),
        (("", "nodes"), &read[..]),
        (("discovery.k8s.io", "endpointslices"), &read[..]),
        (("", "events"), &["create", "patch"][..]),
        (("events.k8s.io", "events"), &["create", "patch"][..]),
    ]);
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(rule.non_resource_urls.is_none(), "{rule:?}");
        assert!(rule.resource_names.is_none(), "{rule:?}");
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    let ok = allowed
                        .get(&(group.as_str(), resource.as_str()))
                        .is_some_and(|verbs| verbs.contains(&verb.as_str()));
                    assert!(ok, "{verb} on {group:?}/{resource} is not allowed");
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    // And what the daemon needs is there.
    for (group, resource, verbs) in [
        ("", "services", &read[..]),
        ("", "nodes", &read[..]),
        ("discovery.k8s.io", "endpointslices", &read[..]),
        ("", "events", &["create"][..]),
        ("events.k8s.io", "events", &["create"][..]),
    ] {
        for verb in verbs {
            assert!(
                granted.contains(&(group.into(), resource.into(), verb.to_string())),
                "missing {verb} on {group:?}/{resource}"
            );
        }
    }

    let (binding, _): (ClusterRoleBinding, _) = find(&docs, "ClusterRoleBinding", None, NAME);
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(binding.role_ref.name, NAME);
    let subjects = binding.subjects.unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(subjects[0].name, NAME);
    assert_eq!(subjects[0].namespace.as_deref(), Some(NAMESPACE));
}

/// The shipped policy's one validation, evaluated as the API server would:
/// `object` is the Service after the change, `oldObject` before it (null on
/// CREATE). True admits.
struct ExternalIpPolicy {
    program: cel::Program,
    env: std::sync::Arc<cel::Env>,
}

impl ExternalIpPolicy {
    fn shipped() -> ExternalIpPolicy {
        let docs = all_documents();
        let name = "kube-ebpf-proxy-deny-service-external-ips";
        let (policy, _): (ValidatingAdmissionPolicy, _) =
            find(&docs, "ValidatingAdmissionPolicy", None, name);
        let spec = policy.spec.unwrap();
        assert_eq!(spec.failure_policy.as_deref(), Some("Fail"));
        let rules = spec.match_constraints.unwrap().resource_rules.unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!(
            rules[0].resources.as_deref(),
            Some(&["services".to_string()][..])
        );
        let ops: BTreeSet<&str> = rules[0]
            .operations
            .iter()
            .flatten()
            .map(String::as_str)
            .collect();
        assert_eq!(ops, BTreeSet::from(["CREATE", "UPDATE"]));
        let validations = spec.validations.unwrap();
        assert_eq!(validations.len(), 1);

        let (binding, _): (ValidatingAdmissionPolicyBinding, _) =
            find(&docs, "ValidatingAdmissionPolicyBinding", None, name);
        let binding = binding.spec.unwrap();
        assert_eq!(binding.policy_name.as_deref(), Some(name));
        assert_eq!(
            binding.validation_actions.as_deref(),
            Some(&["Deny".to_string()][..])
        );

        let env = std::sync::Arc::new(cel::Env::stdlib());
        let program = env
            .compile(&validations[0].expression)
            .unwrap_or_else(|e| panic!("the policy's CEL does not parse: {e}"));
        ExternalIpPolicy { program, env }
    }

    fn admits(&self, object: &Value, old_object: Option<&Value>) -> bool {
        let mut ctx = cel::Context::with_env(self.env.clone());
        ctx.add_variable("object", object).unwrap();
        ctx.add_variable("oldObject", old_object.unwrap_or(&Value::Null))
            .unwrap();
        match self.program.execute(&ctx) {
            Ok(cel::Value::Bool(b)) => b,
            other => panic!("the policy evaluated to {other:?} for {object}"),
        }
    }
}

fn service_with_external_ips(ips: Option<&[&str]>) -> Value {
    let mut spec = serde_json::json!({"type": "ClusterIP", "ports": [{"port": 80}]});
    if let Some(ips) = ips {
        spec["externalIPs"] = serde_json::json!(ips);
    }
    serde_json::json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "team-a"}, "spec": spec})
}

#[test]
fn the_external_ip_policy_refuses_new_addresses() {
    let policy = ExternalIpPolicy::shipped();
    let none = service_with_external_ips(None);
    let empty = service_with_external_ips(Some(&[]));
    let one = service_with_external_ips(Some(&["203.0.113.7"]));
    let two = service_with_external_ips(Some(&["203.0.113.7", "8.8.8.8"]));
    let other = service_with_external_ips(Some(&["8.8.8.8"]));

    // CREATE: without externalIPs (or with an empty list) only.
    assert!(policy.admits(&none, None));
    assert!(policy.admits(&empty, None));
    assert!(!policy.admits(&one, None));
    // UPDATE: keeping or dropping addresses is fine, adding is not.
    assert!(policy.admits(&one, Some(&one)));
    assert!(policy.admits(&one, Some(&two)));
    assert!(policy.admits(&none, Some(&one)));
    assert!(policy.admits(&none, Some(&none)));
    assert!(!policy.admits(&two, Some(&one)));
    assert!(!policy.admits(&other, Some(&one)));
    assert!(!policy.admits(&one, Some(&none)));
}
