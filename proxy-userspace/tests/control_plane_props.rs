//! Property tests of the control plane: random Services and EndpointSlices
//! (valid and invalid, see `generators`), changed, deleted and replaced in
//! random order, handed to a [`ModelCache`] and a [`Syncer`] over
//! [`MemLbMaps`] exactly as the daemon does (a full sync first, then only
//! the frontends the model says changed), with restarts that adopt the maps.
//!
//! After every sync:
//! * the model equals the model built from scratch from the same objects;
//! * the maps hold what a fresh model and a fresh syncer would write, up to
//!   the choice of ids and generations;
//! * nothing leaks: every slot is reachable from its service entry's
//!   generation, every backend is used by a reachable slot, every name and
//!   address entry belongs to a live frontend, and the entry counts the
//!   daemon reports are the maps' sizes;
//! * nothing panics.
//!
//! The seed is fixed, so a run is reproducible; `KEP_SOAK=1` runs fifty
//! times the cases with a new seed (printed; `KEP_SEED=N` replays one).

mod generators;

use std::{
    cell::Cell,
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Instant,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use proptest::{
    collection::vec,
    prelude::*,
    sample::select,
    test_runner::{Config, RngSeed, TestCaseError, TestRunner},
};
use proxy_common::{
    ADDR_CLUSTER_IP, ADDR_EXTERNAL, ADDR_HOST, ADDR_NODEPORT, AddrValue, BackendKey, SlotKey,
    SvcValue,
};
use proxy_userspace::{
    model::{
        DesiredState, Frontend, FrontendKey, ModelCache, NamespacedName, NodeInfo, Options,
        ProblemKind,
    },
    sync::{
        AnyBackend, FeKey, Syncer, convert,
        lbmap::{MapContents, MemLbMaps},
    },
};

use generators::{NAMESPACES, NODES, SERVICE_NAMES, SLICE_NAMES, ZONES};

#[derive(Clone, Debug)]
enum Op {
    UpsertService(Box<Service>),
    DeleteService(NamespacedName),
    UpsertSlice(Box<EndpointSlice>),
    DeleteSlice(NamespacedName),
    /// A manifest directory read again: every object at once (duplicates
    /// included).
    Replace(Vec<Service>, Vec<EndpointSlice>),
    SetNode(NodeInfo),
    SetNodeAddrs(BTreeSet<IpAddr>),
    Sync,
    /// The daemon restarts: a fresh model and a syncer adopting the maps.
    Restart,
}

impl Op {
    fn objects(&self) -> usize {
        match self {
            Op::UpsertService(_) | Op::UpsertSlice(_) => 1,
            Op::Replace(s, e) => s.len() + e.len(),
            _ => 0,
        }
    }
}

fn name(names: &'static [&'static str]) -> impl Strategy<Value = NamespacedName> {
    (select(NAMESPACES), select(names)).prop_map(|(ns, n)| {
        NamespacedName::of(
            &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                namespace: Some(ns.to_string()),
                name: Some(n.to_string()),
                ..Default::default()
            },
        )
    })
}

fn node_addrs() -> impl Strategy<Value = BTreeSet<IpAddr>> {
    // 10.96.0.1 and fd00::10 are also ClusterIPs of the pool: a VIP and a
    // node address.
    let pool = [
        "192.168.200.11",
        "192.168.200.12",
        "10.96.0.1",
        "fd00:200::11",
        "fd00::10",
    ];
    proptest::sample::subsequence(pool.to_vec(), 0..=5)
        .prop_map(|v| v.into_iter().map(|a| a.parse().unwrap()).collect())
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => generators::service().prop_map(|s| Op::UpsertService(Box::new(s))),
        6 => generators::slice().prop_map(|e| Op::UpsertSlice(Box::new(e))),
        2 => name(SERVICE_NAMES).prop_map(Op::DeleteService),
        2 => name(SLICE_NAMES).prop_map(Op::DeleteSlice),
        1 => (vec(generators::service(), 0..6), vec(generators::slice(), 0..6))
            .prop_map(|(s, e)| Op::Replace(s, e)),
        1 => (select(NODES), proptest::option::of(select(ZONES))).prop_map(|(n, z)| {
            Op::SetNode(NodeInfo { name: n.into(), zone: z.map(Into::into) })
        }),
        1 => node_addrs().prop_map(Op::SetNodeAddrs),
        5 => Just(Op::Sync),
        1 => Just(Op::Restart),
    ]
}

fn options() -> Options {
    Options {
        service_proxy_name: Some("ebpf".into()),
    }
}

/// Objects by key, the first of a key kept (as the model keeps them).
fn first_of_each<T: Clone>(
    objects: &[T],
    meta: impl Fn(&T) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> BTreeMap<NamespacedName, T> {
    let mut out = BTreeMap::new();
    for o in objects {
        out.entry(NamespacedName::of(meta(o)))
            .or_insert_with(|| o.clone());
    }
    out
}

/// What the runs did, to show that they exercised something.
#[derive(Default)]
struct Figures {
    syncs: usize,
    /// Frontends programmed, summed over syncs.
    frontends: usize,
    /// Of them, IPv6 ones (in `KEP_SVC6_V1`).
    frontends6: usize,
    failed_writes: usize,
}

thread_local! {
    static FIGURES: std::cell::RefCell<Figures> = Default::default();
}

/// The daemon's model and syncer, and the objects it was told about.
struct Proxy {
    model: ModelCache,
    syncer: Syncer<MemLbMaps>,
    synced_once: bool,
    node: NodeInfo,
    node_addrs: BTreeSet<IpAddr>,
    services: BTreeMap<NamespacedName, Service>,
    slices: BTreeMap<NamespacedName, EndpointSlice>,
    /// Map capacities (None: unlimited): writes may fail, and failing
    /// frontends keep their old state, so the maps may lag the model.
    limited: bool,
}

fn node() -> NodeInfo {
    NodeInfo {
        name: "node-a".into(),
        zone: Some("zone-a".into()),
    }
}

impl Proxy {
    fn new(maps: MemLbMaps) -> Proxy {
        Proxy {
            model: ModelCache::new(node(), options()),
            limited: !maps.capacity.is_empty(),
            syncer: Syncer::adopt(maps).expect("empty maps adopt"),
            synced_once: false,
            node: node(),
            node_addrs: BTreeSet::from([
                "192.168.200.11".parse().unwrap(),
                "fd00:200::11".parse().unwrap(),
            ]),
            services: BTreeMap::new(),
            slices: BTreeMap::new(),
        }
    }

    fn step(&mut self, op: Op) -> Result<(), TestCaseError> {
        match op {
            Op::UpsertService(s) => {
                self.model.upsert_service(&*s);
                self.services.insert(NamespacedName::of(&s.metadata), *s);
            }
            Op::DeleteService(id) => {
                self.model.delete_service(&id);
                self.services.remove(&id);
            }
            Op::UpsertSlice(e) => {
                self.model.upsert_slice(&*e);
                self.slices.insert(NamespacedName::of(&e.metadata), *e);
            }
            Op::DeleteSlice(id) => {
                self.model.delete_slice(&id);
                self.slices.remove(&id);
            }
            Op::Replace(s, e) => {
                self.model.replace(&s, &e);
                self.services = first_of_each(&s, |s| &s.metadata);
                self.slices = first_of_each(&e, |e| &e.metadata);
            }
            Op::SetNode(n) => {
                self.model.set_node(n.clone());
                self.node = n;
            }
            Op::SetNodeAddrs(a) => self.node_addrs = a,
            Op::Sync => return self.sync_and_check(),
            Op::Restart => {
                let maps = self.syncer.maps().clone();
                self.syncer = Syncer::adopt(maps)
                    .map_err(|e| TestCaseError::fail(format!("adopting the maps: {e:#}")))?;
                self.model = ModelCache::new(self.node.clone(), options());
                self.model
                    .replace(self.services.values(), self.slices.values());
                self.synced_once = false;
            }
        }
        Ok(())
    }

    /// What the daemon's sync does: the first one compares everything,
    /// later ones hand over what the model changed.
    fn sync(&mut self) -> usize {
        let changed = self.model.update();
        let report = if self.synced_once {
            // Every node address here is a NodePort address too.
            let addrs = convert::to_node_addrs(&self.node_addrs, &self.node_addrs);
            let changes = convert::to_changes(self.model.frontends(), &changed);
            self.syncer.apply(&changes, Some(&addrs))
        } else {
            self.synced_once = true;
            self.syncer.sync(&convert::to_desired(
                self.model.frontends(),
                &self.node_addrs,
                &self.node_addrs,
            ))
        };
        FIGURES.with(|f| {
            let mut f = f.borrow_mut();
            f.syncs += 1;
            f.frontends += self.syncer.frontend_count();
            f.frontends6 += self.syncer.maps().state.services6.len();
            f.failed_writes += report.failed.len();
        });
        report.failed.len()
    }

    fn sync_and_check(&mut self) -> Result<(), TestCaseError> {
        let failed = self.sync();
        let maps = &self.syncer.maps().state;
        let view = consistent(maps).map_err(TestCaseError::fail)?;
        check_entry_counts(&self.syncer)?;
        if self.limited {
            return Ok(());
        }
        prop_assert_eq!(failed, 0, "no capacity, yet a write failed");
        let (scratch_model, scratch_maps) = self.built_from_scratch();
        prop_assert_eq!(
            comparable(self.model.state()),
            comparable(scratch_model),
            "the incremental model differs from the model built from scratch"
        );
        let scratch_view = consistent(&scratch_maps.state).map_err(TestCaseError::fail)?;
        prop_assert_eq!(
            &view,
            &scratch_view,
            "the maps differ from a from-scratch build"
        );
        check_addresses(maps, &self.node_addrs, self.model.frontends())
    }

    /// A fresh model and a fresh syncer given the same objects.
    fn built_from_scratch(&self) -> (DesiredState, MemLbMaps) {
        let mut model = ModelCache::new(self.node.clone(), options());
        model.replace(self.services.values(), self.slices.values());
        model.update();
        let mut syncer = Syncer::adopt(MemLbMaps::default()).expect("empty maps adopt");
        syncer.sync(&convert::to_desired(
            model.frontends(),
            &self.node_addrs,
            &self.node_addrs,
        ));
        (model.state(), syncer.maps().clone())
    }
}

/// The model's state without the duplicate-object problems, which only
/// a replace with duplicates reports (the mirror holds each key once).
fn comparable(mut s: DesiredState) -> DesiredState {
    s.problems
        .retain(|p| p.kind != ProblemKind::DuplicateObject);
    s
}

/// What a packet can see of one frontend: independent of ids and
/// generations.
#[derive(Debug, PartialEq, Eq)]
struct FrontendView {
    flags: u16,
    backends: Vec<AnyBackend>,
    name: Option<String>,
}

/// The frontends as the datapath sees them (both families), after checking
/// that every entry is reachable, every reference resolves, and a
/// frontend's backends are of its own family's map.
fn consistent(m: &MapContents) -> Result<BTreeMap<FeKey, FrontendView>, String> {
    let mut ids = BTreeSet::new();
    let mut reachable_slots = BTreeSet::new();
    let mut used_backends = BTreeSet::new();
    let mut view = BTreeMap::new();
    let services = m.services.iter().map(|(k, v)| (FeKey::V4(*k), v));
    let services6 = m.services6.iter().map(|(k, v)| (FeKey::V6(*k), v));
    let all: Vec<(FeKey, &SvcValue)> = services.chain(services6).collect();
    for (key, v) in all {
        if !ids.insert(v.svc_id) {
            return Err(format!("service id {} used twice", v.svc_id));
        }
        let mut backends = Vec::new();
        // The primary set, then the local set (externalTrafficPolicy Local).
        for slot in 0..v.count + v.local_count {
            let sk = SlotKey {
                svc_id: v.svc_id,
                generation: v.generation,
                slot,
            };
            let s = m
                .slots
                .get(&sk)
                .ok_or(format!("{key:?}: slot {sk:?} missing"))?;
            let bk = BackendKey {
                backend_id: s.backend_id,
            };
            let b: Option<AnyBackend> = match key {
                FeKey::V4(_) => m.backends.get(&bk).map(|b| (*b).into()),
                FeKey::V6(_) => m.backends6.get(&bk).map(|b| (*b).into()),
            };
            let b = b.ok_or(format!(
                "{sk:?}: backend {bk:?} missing in its family's map"
            ))?;
            reachable_slots.insert(sk);
            used_backends.insert(bk);
            backends.push(b);
        }
        let name = m.names.get(&v.svc_id).cloned();
        view.insert(
            key,
            FrontendView {
                flags: v.flags,
                backends,
                name,
            },
        );
    }
    if let Some(k) = m.slots.keys().find(|k| !reachable_slots.contains(k)) {
        return Err(format!("slot {k:?} leaked (no service entry reaches it)"));
    }
    let all_backends = m.backends.keys().chain(m.backends6.keys());
    if let Some(k) = all_backends.clone().find(|k| !used_backends.contains(k)) {
        return Err(format!("backend {k:?} leaked (no slot uses it)"));
    }
    if all_backends.count() != m.backends.len() + m.backends6.len()
        || m.backends.keys().any(|k| m.backends6.contains_key(k))
    {
        return Err("a backend id is in both families' maps".into());
    }
    if let Some(id) = m.names.keys().find(|id| !ids.contains(id)) {
        return Err(format!("name of service id {id} leaked"));
    }
    Ok(view)
}

/// Address classes (bits): a ClusterIP or an external/LB IP while a
/// programmed frontend uses it, a NodePort and host address for every node
/// address.
fn check_addresses(
    m: &MapContents,
    node_addrs: &BTreeSet<IpAddr>,
    frontends: &BTreeMap<FrontendKey, Frontend>,
) -> Result<(), TestCaseError> {
    let mut want: BTreeMap<IpAddr, u8> = BTreeMap::new();
    for a in node_addrs {
        *want.entry(*a).or_default() |= ADDR_NODEPORT | ADDR_HOST;
    }
    for (k, f) in frontends {
        let (sk, w) = convert::to_want(k, f);
        let programmed = match sk {
            FeKey::V4(k) => m.services.contains_key(&k),
            FeKey::V6(k) => m.services6.contains_key(&k),
        };
        if !sk.is_vip() || !programmed {
            continue;
        }
        let bit = if w.external_addr {
            ADDR_EXTERNAL
        } else {
            ADDR_CLUSTER_IP
        };
        *want.entry(sk.addr()).or_default() |= bit;
    }
    let want: BTreeMap<IpAddr, AddrValue> = want
        .into_iter()
        .map(|(k, class)| {
            (
                k,
                AddrValue {
                    class,
                    _pad: [0; 3],
                },
            )
        })
        .collect();
    let got: BTreeMap<IpAddr, AddrValue> = m
        .addrs
        .iter()
        .map(|(k, v)| (IpAddr::from(k.addr), *v))
        .chain(m.addrs6.iter().map(|(k, v)| (IpAddr::from(k.addr), *v)))
        .collect();
    prop_assert_eq!(&got, &want, "address classes");
    Ok(())
}

/// The entry counts the daemon exports are the maps' sizes.
fn check_entry_counts(s: &Syncer<MemLbMaps>) -> Result<(), TestCaseError> {
    let m = &s.maps().state;
    let sizes = [
        m.services.len(),
        m.services6.len(),
        m.slots.len(),
        m.backends.len(),
        m.backends6.len(),
        m.addrs.len(),
        m.addrs6.len(),
    ];
    let counts: Vec<usize> = s.entry_counts().iter().map(|(_, n)| *n).collect();
    prop_assert_eq!(counts, sizes.to_vec(), "entry counts vs map sizes");
    Ok(())
}

fn soak() -> bool {
    std::env::var_os("KEP_SOAK").is_some_and(|v| v != "0")
}

/// Fixed seed and case count; the soak multiplies the cases by fifty and
/// draws a seed (printed), or takes `KEP_SEED`.
fn config(cases: u32) -> Config {
    let seed = match std::env::var("KEP_SEED") {
        Ok(s) => s.parse().expect("KEP_SEED is a number"),
        Err(_) if soak() => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
        Err(_) => 0x6b65_7031,
    };
    eprintln!("seed {seed} (KEP_SEED={seed} replays it)");
    Config {
        cases: if soak() { cases * 50 } else { cases },
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        max_shrink_iters: 4096,
        ..Config::default()
    }
}

/// Runs `ops` sequences on proxies made by `maps`, ends with a sync, and
/// prints the figures.
fn run(
    cases: u32,
    max_ops: usize,
    maps: fn() -> MemLbMaps,
    finish: fn(&mut Proxy) -> Result<(), TestCaseError>,
) {
    let started = Instant::now();
    let mut runner = TestRunner::new(config(cases));
    let (objects, steps) = (Cell::new(0usize), Cell::new(0usize));
    let result = runner.run(&vec(op(), 1..max_ops), |ops| {
        objects.set(objects.get() + ops.iter().map(Op::objects).sum::<usize>());
        steps.set(steps.get() + ops.len());
        let mut p = Proxy::new(maps());
        for op in ops {
            p.step(op)?;
        }
        p.sync_and_check()?;
        finish(&mut p)
    });
    FIGURES.with(|f| {
        let f = f.borrow();
        eprintln!(
            "{} cases, {} operations, {} objects fuzzed, {} syncs, {:.1} frontends \
             per sync ({:.1} IPv6), {} failed frontend writes, {:.1} s",
            runner.config().cases,
            steps.get(),
            objects.get(),
            f.syncs,
            f.frontends as f64 / f.syncs.max(1) as f64,
            f.frontends6 as f64 / f.syncs.max(1) as f64,
            f.failed_writes,
            started.elapsed().as_secs_f64()
        )
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn incremental_syncs_equal_a_from_scratch_build_and_leak_nothing() {
    run(128, 60, MemLbMaps::default, |_| Ok(()));
}

/// Small maps: writes fail. Whatever failed, nothing leaks or dangles at
/// any time, and once there is room again one sync brings the maps to the
/// from-scratch build.
#[test]
fn full_maps_leak_nothing_and_recover_when_room_returns() {
    fn small() -> MemLbMaps {
        let mut m = MemLbMaps::default();
        m.capacity.insert(proxy_common::SVC_MAP, 5);
        m.capacity.insert(proxy_common::SLOT_MAP, 8);
        m.capacity.insert(proxy_common::BACKEND_MAP, 5);
        m.capacity.insert(proxy_common::ADDR_MAP, 3);
        m
    }
    run(64, 30, small, |p| {
        p.syncer.maps_mut().capacity.clear();
        p.limited = false;
        p.sync_and_check()
    });
}
