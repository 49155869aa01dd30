//! The real kube client (Api, kube-runtime's watcher and reflector, and the
//! daemon's KubeSource) against the stand-in API server, on 127.0.0.1: the
//! protocol, and recovery from dropped watches, compaction (410 Gone), an
//! outage and slow responses. No root needed.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{Node, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{ListParams, WatchEvent, WatchParams};
use kube::runtime::{WatchStreamExt as _, reflector, watcher};
use kube::{Api, Client, ResourceExt as _};
use lab::apiserver::{ApiServer, Kind};
use proxy_userspace::source::kube::{self as kube_source, KubeObjects, KubeOptions, KubeSource};

const CONVERGE: Duration = Duration::from_secs(40);

fn server() -> ApiServer {
    ApiServer::start("127.0.0.1:0".parse().unwrap()).expect("starting the stand-in")
}

fn options(server: &ApiServer) -> KubeOptions {
    KubeOptions {
        kubeconfig: None,
        master: Some(server.url()),
        node_name: "node-a".to_string(),
    }
}

/// A client built the way the daemon builds it.
async fn client(server: &ApiServer) -> Client {
    kube_source::client(&options(server)).await.unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
    Some(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

fn service(name: &str, ip: &str, port: i32) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(ip.into()),
            cluster_ips: Some(vec![ip.into()]),
            ports: Some(vec![ServicePort {
                port,
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn slice(name: &str, service: &str, ips: &[&str]) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            labels: labels(&[("kubernetes.io/service-name", service)]),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: ips
            .iter()
            .map(|ip| Endpoint {
                addresses: vec![ip.to_string()],
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn node(name: &str, zone: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: labels(&[("topology.kubernetes.io/zone", zone)]),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Polls `f` every 20 ms until it gives a value.
async fn eventually<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn within<T>(what: &str, limit: Duration, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Waits, as the daemon's sync loop would, for a snapshot that satisfies
/// `ok`.
async fn snapshot_until(
    source: &mut KubeSource,
    what: &str,
    ok: impl Fn(&KubeObjects) -> bool,
) -> KubeObjects {
    within(what, CONVERGE, async {
        loop {
            let snap = source.snapshot();
            if ok(&snap) {
                return snap;
            }
            source.changed().await;
        }
    })
    .await
}

fn names<K: kube::Resource>(objects: &[K]) -> Vec<String> {
    objects.iter().map(|o| o.name_any()).collect()
}

fn ips(snap: &KubeObjects, slice: &str) -> Vec<String> {
    snap.slices
        .iter()
        .find(|s| s.name_any() == slice)
        .map(|s| s.endpoints.iter().map(|e| e.addresses[0].clone()).collect())
        .unwrap_or_default()
}

/// A reflector as the kube-runtime docs build one, running in the
/// background; its store.
fn reflect<K>(api: Api<K>, config: watcher::Config) -> reflector::Store<K>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync,
    K: 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config)).default_backoff();
    tokio::spawn(stream.for_each(|_| async {}));
    reader
}

#[tokio::test]
async fn lists_gets_and_watches_speak_the_protocol() {
    let server = server();
    let client = client(&server).await;
    server.apply(&service("b", "10.96.0.2", 80));
    server.apply(&service("a", "10.96.0.1", 80));
    let mut headless = slice("h", "h", &["10.244.1.1"]);
    headless
        .labels_mut()
        .insert("service.kubernetes.io/headless".into(), String::new());
    server.apply(&headless);
    server.apply(&slice("a-1", "a", &["10.244.1.2"]));

    let services: Api<Service> = Api::all(client.clone());
    let list = services.list(&ListParams::default()).await.unwrap();
    assert_eq!(names(&list.items), ["a", "b"]);
    let rv = list.metadata.resource_version.clone().unwrap();
    assert_eq!(rv, "4");
    assert_eq!(list.items[0].resource_version().as_deref(), Some("2"));

    // Pagination, as the watcher's list does with a smaller page size.
    let page = services
        .list(&ListParams::default().limit(1))
        .await
        .unwrap();
    assert_eq!(names(&page.items), ["a"]);
    let token = page.metadata.continue_.clone().unwrap();
    let rest = services
        .list(&ListParams::default().limit(1).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(names(&rest.items), ["b"]);
    assert!(rest.metadata.continue_.is_none());

    let slices: Api<EndpointSlice> = Api::all(client.clone());
    let selected = slices
        .list(&ListParams::default().labels("!service.kubernetes.io/headless"))
        .await
        .unwrap();
    assert_eq!(names(&selected.items), ["a-1"]);
    let namespaced: Api<Service> = Api::namespaced(client.clone(), "default");
    assert_eq!(
        namespaced.get("a").await.unwrap().spec.unwrap().cluster_ip,
        Some("10.96.0.1".into())
    );
    let missing = namespaced.get("zzz").await.unwrap_err();
    assert!(matches!(missing, kube::Error::Api(s) if s.code == 404));
    assert_eq!(
        client.apiserver_version().await.unwrap().git_version,
        "v1.33.0-lab"
    );

    // A watch from the list's version: changes, a bookmark, a selector.
    let stream = services
        .watch(&WatchParams::default().timeout(30), &rv)
        .await
        .unwrap();
    let mut stream = std::pin::pin!(stream);
    server.apply(&service("c", "10.96.0.3", 80));
    server.apply(&service("a", "10.96.0.1", 8080));
    server.delete(Kind::Service, "default", "b");
    server.apply(&node("node-a", "z1"));
    server.bookmark();
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let event = within("watch events", CONVERGE, stream.try_next())
            .await
            .unwrap()
            .unwrap();
        seen.push(match event {
            WatchEvent::Added(s) => format!("ADDED {}", s.name_any()),
            WatchEvent::Modified(s) => format!("MODIFIED {}", s.name_any()),
            WatchEvent::Deleted(s) => {
                format!("DELETED {}@{}", s.name_any(), s.resource_version().unwrap())
            }
            WatchEvent::Bookmark(b) => format!("BOOKMARK {}", b.metadata.resource_version),
            WatchEvent::Error(e) => panic!("{e:?}"),
        });
    }
    assert_eq!(
        seen,
        ["ADDED c", "MODIFIED a", "DELETED b@7", "BOOKMARK 8"],
        "the node's change is not a Service's, but the bookmark carries its version"
    );

    let counters = server.counters();
    assert_eq!(counters.lists(Kind::Service), 3);
    assert_eq!(counters.watches(Kind::Service), 1);
    // What the kube client sends, for the record.
    for r in server.requests() {
        println!("{r}");
    }
}

#[tokio::test]
async fn a_watch_from_a_compacted_version_gets_410() {
    let server = server();
    let client = client(&server).await;
    server.apply(&service("a", "10.96.0.1", 80));
    server.apply(&service("b", "10.96.0.2", 80));
    server.compact();
    let services: Api<Service> = Api::all(client);
    let stream = services.watch(&WatchParams::default(), "1").await.unwrap();
    let events: Vec<_> = within("the stream to end", CONVERGE, stream.collect()).await;
    assert_eq!(events.len(), 1, "one ERROR event, then the end");
    match &events[0] {
        Ok(WatchEvent::Error(status)) => {
            assert_eq!((status.code, &*status.reason), (410, "Expired"))
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    assert_eq!(server.counters().gone(Kind::Service), 1);
    // From the current version, a resume works.
    let mut stream = services
        .watch(&WatchParams::default(), "2")
        .await
        .unwrap()
        .boxed();
    server.apply(&service("c", "10.96.0.3", 80));
    let event = within("an event", CONVERGE, stream.try_next())
        .await
        .unwrap();
    assert!(matches!(event, Some(WatchEvent::Added(s)) if s.name_any() == "c"));
}

#[tokio::test]
async fn a_reflector_follows_creates_updates_and_deletes() {
    let server = server();
    server.apply(&service("a", "10.96.0.1", 80));
    let store = reflect(
        Api::<Service>::all(client(&server).await),
        Default::default(),
    );
    within("the initial list", CONVERGE, store.wait_until_ready())
        .await
        .unwrap();
    assert_eq!(store.state().len(), 1);

    server.apply(&service("b", "10.96.0.2", 80));
    server.apply(&service("a", "10.96.0.1", 8080));
    eventually("create and update", CONVERGE, || {
        let state = store.state();
        let a = state.iter().find(|s| s.name_any() == "a")?;
        (state.len() == 2 && a.spec.as_ref()?.ports.as_ref()?[0].port == 8080).then_some(())
    })
    .await;
    server.delete(Kind::Service, "default", "a");
    eventually("the delete", CONVERGE, || {
        let left: Vec<_> = store.state().iter().map(|s| s.name_any()).collect();
        (left == ["b"]).then_some(())
    })
    .await;
    assert_eq!(server.counters().lists(Kind::Service), 1);
}

#[tokio::test]
async fn a_dropped_watch_resumes_without_a_relist() {
    let server = server();
    let store = reflect(
        Api::<Service>::all(client(&server).await),
        Default::default(),
    );
    within("the initial list", CONVERGE, store.wait_until_ready())
        .await
        .unwrap();
    eventually("the watch", CONVERGE, || {
        (server.watch_count() == 1).then_some(())
    })
    .await;
    for round in 0..3 {
        assert_eq!(server.drop_watches(), 1);
        let name = format!("s{round}");
        server.apply(&service(&name, "10.96.0.9", 80));
        eventually("the change after the drop", CONVERGE, || {
            store
                .state()
                .iter()
                .any(|s| s.name_any() == name)
                .then_some(())
        })
        .await;
        eventually("the new watch", CONVERGE, || {
            (server.watch_count() == 1).then_some(())
        })
        .await;
    }
    let c = server.counters();
    assert_eq!(c.lists(Kind::Service), 1, "resumed from the last version");
    assert_eq!(c.watches(Kind::Service), 4);
    assert_eq!(c.gone(Kind::Service), 0);
}

#[tokio::test]
async fn compaction_then_a_drop_gives_410_and_a_relist() {
    let server = server();
    server.apply(&service("a", "10.96.0.1", 80));
    let store = reflect(
        Api::<Service>::all(client(&server).await),
        Default::default(),
    );
    within("the initial list", CONVERGE, store.wait_until_ready())
        .await
        .unwrap();
    eventually("the watch", CONVERGE, || {
        (server.watch_count() == 1).then_some(())
    })
    .await;

    // Another kind moves the version on; the Service watcher does not see
    // it, and without a bookmark its version falls out of the history.
    server.apply(&node("node-a", "z1"));
    server.compact();
    server.drop_watches();
    eventually("a 410", CONVERGE, || {
        (server.counters().gone(Kind::Service) == 1).then_some(())
    })
    .await;
    eventually("the relist", CONVERGE, || {
        (server.counters().lists(Kind::Service) == 2).then_some(())
    })
    .await;
    server.apply(&service("b", "10.96.0.2", 80));
    eventually("convergence after the relist", CONVERGE, || {
        (store.state().len() == 2).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_bookmark_spares_the_relist() {
    let server = server();
    let store = reflect(
        Api::<Service>::all(client(&server).await),
        Default::default(),
    );
    within("the initial list", CONVERGE, store.wait_until_ready())
        .await
        .unwrap();
    eventually("the watch", CONVERGE, || {
        (server.watch_count() == 1).then_some(())
    })
    .await;
    server.apply(&node("node-a", "z1"));
    server.bookmark();
    // Give the bookmark time to reach the client before the history goes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.compact();
    server.drop_watches();
    server.apply(&service("b", "10.96.0.2", 80));
    eventually("the change", CONVERGE, || {
        (store.state().len() == 1).then_some(())
    })
    .await;
    let c = server.counters();
    assert_eq!((c.lists(Kind::Service), c.gone(Kind::Service)), (1, 0));
}

async fn ready_source(server: &ApiServer, proxy_name: Option<&str>) -> KubeSource {
    let mut source = KubeSource::start(client(server).await, "node-a", proxy_name);
    snapshot_until(&mut source, "readiness", |s| s.ready).await;
    source
}

#[tokio::test]
async fn kube_source_is_ready_only_after_every_initial_list() {
    let server = server();
    server.apply(&service("a", "10.96.0.1", 80));
    server.apply(&slice("a-1", "a", &["10.244.1.2"]));
    server.apply(&node("node-a", "z1"));
    server.apply(&node("node-b", "z2"));
    // Slow enough to look at the source before any list has completed.
    server.set_delay(Duration::from_millis(700));
    let started = Instant::now();
    let mut source = KubeSource::start(client(&server).await, "node-a", None);
    let early = source.snapshot();
    assert!(!early.ready && early.services.is_empty() && early.node.is_none());
    let snap = snapshot_until(&mut source, "readiness", |s| s.ready).await;
    assert!(started.elapsed() >= Duration::from_millis(700));
    assert_eq!(names(&snap.services), ["a"]);
    assert_eq!(ips(&snap, "a-1"), ["10.244.1.2"]);
    let node = snap.node.expect("this node");
    assert_eq!(node.name_any(), "node-a");
    assert_eq!(
        proxy_userspace::model::NodeInfo::from_node(&node)
            .zone
            .as_deref(),
        Some("z1")
    );
    // What the sync loop can log or export.
    let counters = source.counters();
    assert!(
        counters
            .values()
            .all(|c| c.ready && c.lists == 1 && c.errors == 0)
    );
    let requests = server.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.contains("fieldSelector=metadata.name%3Dnode-a")),
        "{requests:?}"
    );
}

#[tokio::test]
async fn kube_source_filters_like_kube_proxy() {
    let server = server();
    let mut other = service("other", "10.96.0.7", 80);
    other.labels_mut().insert(
        "service.kubernetes.io/service-proxy-name".into(),
        "ebpf".into(),
    );
    server.apply(&other);
    server.apply(&service("a", "10.96.0.1", 80));
    let mut headless = slice("h-1", "h", &["10.244.1.1"]);
    headless
        .labels_mut()
        .insert("service.kubernetes.io/headless".into(), String::new());
    server.apply(&headless);
    server.apply(&slice("a-1", "a", &["10.244.1.2"]));

    let plain = ready_source(&server, None).await.snapshot();
    assert_eq!(names(&plain.services), ["a"]);
    assert_eq!(names(&plain.slices), ["a-1"]);
    // With a proxy name, labelled Services come and the model picks.
    let named = ready_source(&server, Some("ebpf")).await.snapshot();
    assert_eq!(names(&named.services), ["a", "other"]);
    assert_eq!(names(&named.slices), ["a-1"]);
}

#[tokio::test]
async fn kube_source_follows_changes_and_drops() {
    let server = server();
    server.apply(&service("a", "10.96.0.1", 80));
    server.apply(&slice("a-1", "a", &["10.244.1.2"]));
    let mut source = ready_source(&server, None).await;
    server.apply(&slice("a-1", "a", &["10.244.1.2", "10.244.2.2"]));
    snapshot_until(&mut source, "the new endpoint", |s| {
        ips(s, "a-1").len() == 2
    })
    .await;
    server.drop_watches();
    server.apply(&node("node-a", "z9"));
    server.delete(Kind::EndpointSlice, "default", "a-1");
    let snap = snapshot_until(&mut source, "the node and the delete", |s| {
        s.node.is_some() && s.slices.is_empty()
    })
    .await;
    assert!(snap.ready);
    assert!(source.counters().values().all(|c| c.lists == 1));
}

#[tokio::test]
async fn an_outage_backs_off_and_converges() {
    let server = server();
    server.apply(&service("a", "10.96.0.1", 80));
    server.apply(&node("node-a", "z1"));
    let mut source = ready_source(&server, None).await;

    let before = server.counters();
    server.set_down(true);
    // Changes made meanwhile, and the history forgotten: the watchers
    // must re-list when the server is back.
    server.apply(&service("b", "10.96.0.2", 80));
    server.delete(Kind::Service, "default", "a");
    server.compact();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let during = server.counters();
    // The datapath's view is kept while the server is away.
    let kept = source.snapshot();
    assert!(kept.ready);
    assert_eq!(names(&kept.services), ["a"]);
    let attempts = during.attempts() - before.attempts();
    assert!(
        attempts < 20,
        "{attempts} connections or requests in 5 s of outage: a busy loop ({during:?})"
    );
    assert!(during.refused > before.refused, "the watchers did retry");

    let back = Instant::now();
    server.set_down(false);
    let snap = snapshot_until(&mut source, "convergence after the outage", |s| {
        names(&s.services) == ["b"]
    })
    .await;
    println!(
        "outage: {attempts} attempts in 5 s; converged {:?} after recovery",
        back.elapsed()
    );
    assert!(snap.ready);
    assert!(source.counters().values().all(|c| c.errors > 0));
    assert!(
        source.counters()["services"].lists >= 2,
        "re-listed after 410"
    );
}

#[tokio::test]
async fn slow_responses_still_converge() {
    let server = server();
    server.apply(&service("a", "10.96.0.1", 80));
    server.set_delay(Duration::from_millis(1500));
    let mut source = ready_source(&server, None).await;
    server.apply(&service("b", "10.96.0.2", 80));
    // A drop under delay: the resumed watch starts 1.5 s late, and the
    // change made meanwhile still arrives.
    server.drop_watches();
    server.apply(&service("c", "10.96.0.3", 80));
    snapshot_until(&mut source, "the changes", |s| s.services.len() == 3).await;
    assert!(
        source
            .counters()
            .values()
            .all(|c| c.errors == 0 && c.lists == 1)
    );
}

#[tokio::test]
async fn the_daemons_client_reads_a_kubeconfig() {
    let server = server();
    server.apply(&service("a", "10.96.0.1", 80));
    let path = std::env::temp_dir().join(format!("lab-kubeconfig-{}", std::process::id()));
    server.write_kubeconfig(&path).unwrap();
    let opts = KubeOptions {
        kubeconfig: Some(path.clone()),
        master: None,
        node_name: "node-a".into(),
    };
    let client = kube_source::client(&opts).await.unwrap();
    std::fs::remove_file(&path).unwrap();
    let list = Api::<Service>::all(client)
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(names(&list.items), ["a"]);
}

/// Decodes an HTTP/1.1 chunked body, checking the framing on the way.
fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let at = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size = usize::from_str_radix(std::str::from_utf8(&body[..at]).unwrap(), 16).unwrap();
        body = &body[at + 2..];
        if size == 0 {
            assert_eq!(body, b"\r\n", "the last chunk ends the body");
            return out;
        }
        out.extend_from_slice(&body[..size]);
        assert_eq!(&body[size..size + 2], b"\r\n");
        body = &body[size + 2..];
    }
}

#[test]
fn a_watch_is_a_chunked_stream_of_json_lines() {
    use std::io::{Read as _, Write as _};
    let server = server();
    server.apply(&service("a", "10.96.0.1", 80));
    server.apply(&node("node-a", "z1"));
    let mut conn = std::net::TcpStream::connect(server.addr()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        conn,
        "GET /api/v1/services?watch=true&resourceVersion=0&timeoutSeconds=1&allowWatchBookmarks=true \
         HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    let body = String::from_utf8(dechunk(&raw[split + 4..])).unwrap();
    let events: Vec<serde_json::Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["ADDED", "BOOKMARK"], "{body}");
    assert_eq!(events[0]["object"]["kind"], "Service");
    assert_eq!(events[1]["object"]["metadata"]["resourceVersion"], "2");
}

#[test]
fn serves_inside_a_lab_namespace() {
    if !lab::require_root_or_skip("serves_inside_a_lab_namespace") {
        return;
    }
    let lab = lab::Lab::new().unwrap();
    let at = std::net::SocketAddrV4::new(lab::addr::UNDERLAY_GATEWAY, 6443);
    let server = ApiServer::start_in(lab.ns(lab::addr::UNDERLAY), at).unwrap();
    server.apply(&service("a", "10.96.0.1", 80));
    assert_eq!(server.url(), "http://192.168.200.1:6443");
    // The daemon's client, from node-a's namespace, across the underlay.
    let opts = options(&server);
    let listed = lab.ns(lab::addr::NODE_A).run(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let client = kube_source::client(&opts).await.unwrap();
            Api::<Service>::all(client)
                .list(&ListParams::default())
                .await
                .map(|l| names(&l.items))
        })
    });
    assert_eq!(listed.unwrap(), ["a"]);
}
