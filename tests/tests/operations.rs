//! Running kube-ebpf-proxy like an operator does: a real Prometheus scrapes
//! it, /healthz answers, and the daemon is killed and restarted under load
//! without a failed request.

use std::{
    net::SocketAddrV4,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use common::*;
use lab::{Netns, Signal, TcpConn, addr, servers::tcp_request_on};

mod common;

fn node_a(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(addr::NODE_A_IP, port)
}

/// The value of a PromQL instant query, if it has exactly one sample.
fn prom_query(ns: &Netns, query: &str) -> Option<f64> {
    let q: String = query
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (status, body) = http_get(
        ns,
        "127.0.0.1:9090".parse().unwrap(),
        &format!("/api/v1/query?query={q}"),
    )
    .ok()?;
    if status != 200 {
        return None;
    }
    // {"status":"success","data":{"resultType":"vector","result":[{"metric":{...},"value":[t,"N"]}]}}
    let results = body.split("\"value\":[").collect::<Vec<_>>();
    if results.len() != 2 {
        return None;
    }
    results[1].split('"').nth(1)?.parse().ok()
}

#[test]
fn prometheus_scrapes_per_service_counters_that_grow_with_traffic() -> Result<()> {
    let Some(mut c) = Cluster::start_with(
        "prometheus",
        &placement_manifests(),
        &["--metrics-bind-address", "0.0.0.0:10249"],
    ) else {
        return Ok(());
    };
    let client = c.lab.ns(addr::CLIENT).clone();
    let pod = c.lab.ns(CLIENT_POD).clone();

    // Some traffic first, so every family has a series.
    lab::tcp_request(&pod, sa("10.96.0.11:80"))?;
    let (status, text) = http_get(&client, node_a(10249), "/metrics")?;
    assert_eq!(status, 200);
    for name in [
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_network_programming_duration_seconds_count",
        "kubeproxy_sync_proxy_rules_service_changes_total",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "kube_ebpf_proxy_service_new_connections_total{namespace=\"lab\",name=\"web-11-tcp\",port=\"main\"} 1",
        "kube_ebpf_proxy_datapath_drops_total{reason=\"no_endpoint\"}",
        "kube_ebpf_proxy_conntrack_entries{map=\"KEP_CT_V1\",ip_family=\"IPv4\"}",
        "kube_ebpf_proxy_conntrack_entries{map=\"KEP_CT6_V1\",ip_family=\"IPv6\"}",
        "kube_ebpf_proxy_frontends{ip_family=\"IPv4\"}",
        "kube_ebpf_proxy_backends{ip_family=\"IPv6\"}",
        "kube_ebpf_proxy_desired_map_fill_ratio{map=\"KEP_SVC_V2\"}",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }

    // promtool lints the exposition.
    let path = c.lab.dir().join("metrics.txt");
    std::fs::write(&path, &text)?;
    let out = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&path)?)
        .output()?;
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && complaints.trim().is_empty(),
        "promtool: {complaints}"
    );

    // A real Prometheus, outside the node, scraping every second.
    let dir = c.lab.dir().join("prometheus");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: kube-ebpf-proxy\n    static_configs:\n      - targets: ['{}']\n",
            node_a(10249)
        ),
    )?;
    c.lab.start_daemon(
        addr::CLIENT,
        std::path::Path::new("/usr/bin/prometheus"),
        [
            format!("--config.file={}", dir.join("prometheus.yml").display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            "--web.listen-address=127.0.0.1:9090".into(),
        ],
    )?;
    let query = "kube_ebpf_proxy_service_new_connections_total{name=\"web-11-tcp\"}";
    let mut first = None;
    c.lab
        .wait_for("the first scrape", Duration::from_secs(30), || {
            first = prom_query(&client, query);
            first.is_some()
        })?;
    let first = first.unwrap();
    for _ in 0..20 {
        lab::tcp_request(&pod, sa("10.96.0.11:80"))?;
    }
    let mut seen = first;
    let grew = c
        .lab
        .wait_for("counters to grow", Duration::from_secs(15), || {
            seen = prom_query(&client, query).unwrap_or(seen);
            seen >= first + 20.0
        });
    if let Err(e) = grew {
        bail!(
            "{e:#}: {first} -> {seen}\n{}",
            c.lab.daemon_log(addr::CLIENT)
        );
    }
    eprintln!("Prometheus saw {query} go from {first} to {seen}");
    // Packets and bytes are counted by the per-packet path. The pod's
    // connections above went straight to the backend if socket-level load
    // balancing is on; the same Service's NodePort from outside always
    // takes the per-packet path.
    for _ in 0..20 {
        lab::tcp_request(&client, node_a(30011))?;
    }
    let packets_query = "kube_ebpf_proxy_service_packets_total{name=\"web-11-tcp\"}";
    let mut packets = 0.0;
    let counted = c
        .lab
        .wait_for("packet counters to grow", Duration::from_secs(15), || {
            packets = prom_query(&client, packets_query).unwrap_or(packets);
            packets >= 20.0 * 4.0
        });
    counted.with_context(|| format!("at least 4 packets per connection, got {packets}"))?;
    Ok(())
}

#[test]
fn healthz_and_livez_answer_like_kube_proxy() -> Result<()> {
    let Some(c) = Cluster::start("healthz", &placement_manifests()) else {
        return Ok(());
    };
    let client = c.lab.ns(addr::CLIENT);
    for path in ["/healthz", "/livez"] {
        let (status, body) = http_get(client, node_a(10256), path)?;
        assert_eq!(status, 200, "{path}: {body}");
        assert!(body.starts_with("{\"lastUpdated\":\"20"), "{path}: {body}");
        assert!(body.contains("\"currentTime\""), "{path}: {body}");
    }
    // Metrics stay on localhost by default, like kube-proxy's.
    assert!(http_get(client, node_a(10249), "/metrics").is_err());
    let (status, _) = http_get(
        c.lab.ns(addr::NODE_A),
        "127.0.0.1:10249".parse()?,
        "/metrics",
    )?;
    assert_eq!(status, 200);
    Ok(())
}

#[test]
fn restarts_under_load_drop_no_request_and_keep_connections() -> Result<()> {
    let Some(mut c) = Cluster::start("restarts", &placement_manifests()) else {
        return Ok(());
    };
    let pod = c.lab.ns(CLIENT_POD).clone();
    let client = c.lab.ns(addr::CLIENT).clone();
    let mut long_lived = TcpConn::open(&pod, sa("10.96.0.10:80"))?;
    let pinned = long_lived.request()?.identity;

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    // Stops the loop however this test ends, before the lab goes away.
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let _stop_guard = StopOnDrop(stop.clone());
    let looper = {
        let (stop, ok, failed, errors) = (stop.clone(), ok.clone(), failed.clone(), errors.clone());
        std::thread::spawn(move || {
            // Threads that stay in the clients' namespaces: no thread per
            // connection (see `Netns::thread`).
            let targets = [
                (pod.thread(), sa("10.96.0.10:80")),
                (client.thread(), node_a(30010)),
                (client.thread(), node_a(30012)),
            ];
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let (client, target) = &targets[i % targets.len()];
                match tcp_request_on(client, *target, Duration::from_secs(2)) {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        errors.lock().unwrap().push(format!("{target}: {e:#}"));
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                i += 1;
            }
        })
    };

    let started = Instant::now();
    let restarts = [Signal::SIGKILL; 5].into_iter().chain([Signal::SIGTERM]);
    for (n, signal) in restarts.enumerate() {
        std::thread::sleep(Duration::from_millis(300));
        c.lab.stop_daemon(addr::NODE_A, signal)?;
        // The datapath keeps serving while no daemon runs.
        std::thread::sleep(Duration::from_millis(300));
        c.start_daemon(addr::NODE_A);
        let log = c.lab.daemon_log(addr::NODE_A);
        assert!(
            log.matches("adopted_frontends=12").count() > n,
            "restart {n} did not adopt:\n{log}"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    looper.join().unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!(
        "6 restarts in {:?}: {ok} requests succeeded, {failed} failed",
        started.elapsed()
    );
    assert_eq!(failed, 0, "{:?}", errors.lock().unwrap());
    assert!(ok > 50, "the loop ran ({ok})");
    assert_eq!(
        long_lived.request()?.identity,
        pinned,
        "the old connection still works"
    );
    Ok(())
}
