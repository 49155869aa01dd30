//! kube-ebpf-proxy watching an API server: the stand-in API server (lab's
//! `apiserver`, the real list/watch protocol) runs in the underlay
//! namespace, the daemons on both nodes talk to it with the real kube
//! client, and real traffic shows what reached the datapath: creates,
//! updates, deletes, and recovery from dropped watches, 410 Gone, an
//! outage, 500s and 429s, and a watch that hangs, with traffic flowing on
//! the last state meanwhile; each prints how long convergence took.

use std::{
    collections::BTreeMap,
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use anyhow::Result;
use common::*;
use lab::{addr, apiserver::Kind, servers::tcp_request_timeout, tcp_request};

mod common;

fn reaches(c: &Cluster, target: &str) -> Option<String> {
    tcp_request_timeout(c.lab.ns(CLIENT_POD), sa(target), Duration::from_millis(300))
        .ok()
        .map(|r| r.identity)
}

/// Waits until `f` holds, returns how long it took.
fn converges(c: &Cluster, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    if let Err(e) = c.lab.wait_for(what, timeout, &mut f) {
        panic!("{e:#}\n{}", c.logs());
    }
    t0.elapsed()
}

#[test]
fn creates_updates_and_deletes_reach_the_datapath() -> Result<()> {
    let Some((c, api)) = start_with_api("kube_crud", &placement_manifests()) else {
        return Ok(());
    };
    let pod = c.lab.ns(CLIENT_POD);
    assert_eq!(tcp_request(pod, sa("10.96.0.11:80"))?.identity, "web-a");
    assert_eq!(tcp_request(pod, sa("10.96.0.12:80"))?.identity, "web-b1");

    // Create.
    let t = Instant::now();
    apply_yaml(&api, &web(vec![(&WEB_B2, true)], "10.96.0.30", None));
    let took = converges(&c, "new Service served", Duration::from_secs(2), || {
        reaches(&c, "10.96.0.30:80").as_deref() == Some("web-b2")
    });
    eprintln!("create: served after {took:?}");

    // Update: an endpoint turned not ready is no longer chosen.
    let vip = sa("10.96.0.10:80");
    apply_yaml(
        &api,
        &web(
            vec![(&WEB_A, true), (&WEB_B1, true), (&WEB_B2, false)],
            "10.96.0.10",
            Some(30010),
        ),
    );
    converges(&c, "web-b2 not chosen", Duration::from_secs(2), || {
        !backends_hit(pod, vip, 15).contains_key("web-b2")
    });
    assert!(!backends_hit(pod, vip, 60).contains_key("web-b2"));

    // Update: an endpoint removed from the slice.
    apply_yaml(&api, &web(vec![(&WEB_A, true)], "10.96.0.10", Some(30010)));
    converges(&c, "only web-a", Duration::from_secs(2), || {
        backends_hit(pod, vip, 15).keys().eq(["web-a"].iter())
    });

    // Update: the port renamed in Service and slice together.
    let renamed = web(vec![(&WEB_B1, true)], "10.96.0.12", Some(30012)).replace("main", "web");
    apply_yaml(&api, &renamed);
    converges(
        &c,
        "renamed port still served",
        Duration::from_secs(2),
        || {
            reaches(&c, "10.96.0.12:80").as_deref() == Some("web-b1")
                && c.cli(addr::NODE_A, &["inspect", "services"])
                    .is_ok_and(|o| o.contains("lab/web-12-tcp:web"))
        },
    );

    // Delete the slice: no endpoint, refused.
    api.delete(Kind::EndpointSlice, "lab", "web-30-tcp-1");
    converges(
        &c,
        "refused without endpoints",
        Duration::from_secs(2),
        || {
            tcp_request_timeout(pod, sa("10.96.0.30:80"), Duration::from_millis(300))
                .err()
                .and_then(|e| lab::error_kind(&e))
                == Some(std::io::ErrorKind::ConnectionRefused)
        },
    );
    // Delete the Service: its address is no service any more.
    api.delete(Kind::Service, "lab", "web-30-tcp");
    converges(&c, "frontend removed", Duration::from_secs(2), || {
        c.cli(addr::NODE_A, &["inspect", "services"])
            .is_ok_and(|o| !o.contains("lab/web-30-tcp") && o.contains("lab/web-30-udp"))
    });
    assert_eq!(reaches(&c, "10.96.0.11:80").as_deref(), Some("web-a"));
    eprintln!("all changes converged {:?} after the first", t.elapsed());
    Ok(())
}

#[test]
fn dropped_watches_410_and_an_outage_are_survived() -> Result<()> {
    let Some((c, api)) = start_with_api("kube_faults", &placement_manifests()) else {
        return Ok(());
    };
    let pod = c.lab.ns(CLIENT_POD);
    let vip = sa("10.96.0.10:80");

    // Dropped watches: resumed, and the next change arrives.
    api.drop_watches();
    apply_yaml(&api, &web(vec![(&WEB_A, true)], "10.96.0.10", Some(30010)));
    let took = converges(
        &c,
        "change after dropped watches",
        Duration::from_secs(5),
        || backends_hit(pod, vip, 10).keys().eq(["web-a"].iter()),
    );
    eprintln!("after dropped watches: converged in {took:?}");

    // 410 Gone: the watchers are cut off, a change is made, and history is
    // compacted past their resourceVersion before they can come back.
    let before = api.counters();
    api.set_down(true);
    apply_yaml(&api, &web(vec![(&WEB_B1, true)], "10.96.0.10", Some(30010)));
    api.compact();
    std::thread::sleep(Duration::from_millis(200));
    api.set_down(false);
    let took = converges(&c, "change after 410", Duration::from_secs(60), || {
        backends_hit(pod, vip, 10).keys().eq(["web-b1"].iter())
    });
    let after = api.counters();
    eprintln!(
        "after 410: converged in {took:?}; 410s sent: {}, relists: {}",
        after.gone(Kind::Service) + after.gone(Kind::EndpointSlice)
            - before.gone(Kind::Service)
            - before.gone(Kind::EndpointSlice),
        after.lists(Kind::EndpointSlice) - before.lists(Kind::EndpointSlice)
    );
    assert!(after.lists(Kind::EndpointSlice) > before.lists(Kind::EndpointSlice));

    // An outage: traffic keeps flowing on the last known state, the
    // daemons do not busy-loop, and they converge once it is back.
    api.set_down(true);
    let down = Instant::now();
    let attempts_before = api.counters().attempts();
    let mut served = BTreeMap::new();
    while down.elapsed() < Duration::from_secs(5) {
        let r = tcp_request(pod, vip)?;
        *served.entry(r.identity).or_insert(0) += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let attempts = api.counters().attempts() - attempts_before;
    eprintln!("5 s outage: {served:?} served, {attempts} connection attempts by 2 daemons");
    assert!(served.keys().eq(["web-b1"].iter()));
    assert!(attempts < 60, "backoff, not a busy loop: {attempts}");
    apply_yaml(&api, &web(vec![(&WEB_B2, true)], "10.96.0.10", Some(30010)));
    api.set_down(false);
    let took = converges(
        &c,
        "change made during the outage",
        Duration::from_secs(90),
        || backends_hit(pod, vip, 10).keys().eq(["web-b2"].iter()),
    );
    eprintln!("after the outage: converged in {took:?}");
    // The daemons are healthy again.
    assert!(c.lab.daemon_log(addr::NODE_A).contains(" ready "));
    Ok(())
}

/// The datapath's drops of traffic to unallocated service addresses, from
/// node-a's metrics.
fn unallocated_drops(c: &Cluster) -> u64 {
    let (_, text) =
        http_get(c.lab.ns(addr::NODE_A), sa("127.0.0.1:10249"), "/metrics").expect("metrics");
    text.lines()
        .find_map(|l| {
            l.strip_prefix(
                "kube_ebpf_proxy_datapath_drops_total{reason=\"unallocated_service_ip\"} ",
            )
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn service_cidr_objects_make_unallocated_addresses_drop() -> Result<()> {
    // A Service in a range that no flag names.
    let svc = web(vec![(&WEB_A, true)], "10.97.0.10", None);
    let Some((c, api)) = start_with_api("kube_servicecidr", &[placement_manifests(), svc].concat())
    else {
        return Ok(());
    };
    let pod = c.lab.ns(CLIENT_POD);
    let unallocated = sa("10.97.0.55:80");
    let attempt = || tcp_request_timeout(pod, unallocated, Duration::from_millis(200)).is_ok();

    // No ServiceCIDR yet: the datapath does not know the range.
    assert!(!attempt());
    assert_eq!(unallocated_drops(&c), 0, "{}", c.logs());

    api.apply_json(serde_json::json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
        "metadata": {"name": "extra"},
        "spec": {"cidrs": ["10.97.0.0/16"]}
    }))?;
    converges(&c, "service CIDRs written", Duration::from_secs(5), || {
        c.lab.daemon_log(addr::NODE_A).contains("10.97.0.0/16")
    });
    assert!(!attempt());
    let drops = unallocated_drops(&c);
    assert!(drops >= 1, "the SYN to {unallocated} is dropped: {drops}");
    // The Service inside the range is served, and other traffic is untouched.
    assert_eq!(reaches(&c, "10.97.0.10:80").as_deref(), Some("web-a"));
    assert_eq!(reaches(&c, "10.96.0.11:80").as_deref(), Some("web-a"));
    assert_eq!(
        unallocated_drops(&c),
        drops,
        "served traffic is not dropped"
    );

    // The object goes: the range is no longer enforced.
    api.delete(Kind::ServiceCidr, "", "extra");
    converges(
        &c,
        "service CIDRs rewritten",
        Duration::from_secs(5),
        || c.lab.daemon_log(addr::NODE_A).contains("service_cidrs=[]"),
    );
    assert!(!attempt());
    assert_eq!(unallocated_drops(&c), drops);
    Ok(())
}

/// Requests to `vip` for `period`, one every 20 ms: which backends
/// answered, and how many requests failed.
fn serve_for(c: &Cluster, vip: SocketAddrV4, period: Duration) -> (BTreeMap<String, u32>, u32) {
    let (mut served, mut failed) = (BTreeMap::new(), 0);
    let t0 = Instant::now();
    while t0.elapsed() < period {
        match tcp_request_timeout(c.lab.ns(CLIENT_POD), vip, Duration::from_secs(1)) {
            Ok(r) => *served.entry(r.identity).or_insert(0) += 1,
            Err(_) => failed += 1,
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (served, failed)
}

#[test]
fn errors_500_and_429_keep_the_state_back_off_and_converge() -> Result<()> {
    let Some((c, api)) = start_with_api("kube_errors", &placement_manifests()) else {
        return Ok(());
    };
    let vip = sa("10.96.0.10:80");
    let everyone = [WEB_A.name, WEB_B1.name, WEB_B2.name];
    for (status, only) in [(500, &WEB_A), (429, &WEB_B1)] {
        let before = api.counters().failed;
        api.set_failing(Some(status));
        // A change the daemons cannot see yet.
        apply_yaml(&api, &web(vec![(only, true)], "10.96.0.10", Some(30010)));
        let (served, failed) = serve_for(&c, vip, Duration::from_secs(4));
        let answered = api.counters().failed - before;
        eprintln!(
            "4 s of {status}s: {served:?} served, {failed} failed, {answered} requests answered {status}"
        );
        assert_eq!(failed, 0, "the last state keeps serving");
        assert!(served.keys().all(|b| everyone.contains(&b.as_str())));
        assert!(answered >= 1, "the daemons tried again");
        assert!(answered < 60, "backoff, not a busy loop: {answered}");

        api.set_failing(None);
        let took = converges(
            &c,
            "change made during the errors",
            Duration::from_secs(60),
            || {
                backends_hit(c.lab.ns(CLIENT_POD), vip, 10)
                    .keys()
                    .eq([only.name].iter())
            },
        );
        eprintln!("after the {status}s: converged in {took:?}");
    }
    Ok(())
}

#[test]
fn a_watch_that_hangs_is_given_up_and_the_change_arrives() -> Result<()> {
    let Some((c, api)) = start_with_api("kube_hang", &placement_manifests()) else {
        return Ok(());
    };
    let vip = sa("10.96.0.10:80");
    // Every daemon's slice watch is re-opened into a server that answers
    // with headers and then nothing.
    api.set_hanging_watches(true);
    api.drop_watches();
    c.lab.wait_for(
        "both daemons' slice watches hang",
        Duration::from_secs(30),
        || api.counters().hung(Kind::EndpointSlice) >= 2,
    )?;
    // Later watches would work: only the hung ones are stuck.
    api.set_hanging_watches(false);
    let hung_at = Instant::now();
    apply_yaml(&api, &web(vec![(&WEB_B2, true)], "10.96.0.10", Some(30010)));
    let (served, failed) = serve_for(&c, vip, Duration::from_secs(3));
    assert_eq!(failed, 0, "the last state keeps serving: {served:?}");
    assert!(
        served.len() > 1,
        "the change has not arrived through a hung watch: {served:?}"
    );
    converges(
        &c,
        "change behind a hung watch",
        Duration::from_secs(180),
        || {
            backends_hit(c.lab.ns(CLIENT_POD), vip, 10)
                .keys()
                .eq(["web-b2"].iter())
        },
    );
    eprintln!(
        "a hung watch: given up and the change served {:?} after it hung",
        hung_at.elapsed()
    );
    Ok(())
}
