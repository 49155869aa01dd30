//! The model, redone only where something changed.
//!
//! [`service_state`] computes what one Service produces from its
//! EndpointSlices. The cache keeps that per Service, recomputes it only for
//! Services whose object or slices changed (or all of them when the node
//! changes), and resolves frontends claimed by two Services (the first by
//! namespace/name keeps it) per frontend. At 10,000 Services a changed slice
//! costs one Service's computation instead of ten thousand.
//!
//! [`desired_state`] is this cache run once, so the scenario tests of the
//! model test this code.

use std::{
    collections::{BTreeMap, BTreeSet},
    hash::{DefaultHasher, Hash, Hasher},
    sync::Arc,
};

use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::Serialize;

use super::{
    CheckedSlice, DesiredState, Frontend, FrontendKey, HealthCheck, LABEL_HEADLESS,
    LABEL_SERVICE_NAME, Names, NamespacedName, NodeInfo, Options, Problem, ProblemKind,
    service::service_state_checked, slim, slim::SlimSlice,
};
use super::{ServicePortEndpoints, ServicePortName};

/// Computes the desired state (see the [model](super) documentation): the
/// cache run once over every object.
pub fn desired_state(
    services: &[Service],
    slices: &[EndpointSlice],
    node: &NodeInfo,
    opts: &Options,
) -> DesiredState {
    let mut cache = ModelCache::new(node.clone(), opts.clone());
    cache.replace(services, slices);
    cache.update();
    cache.state()
}

/// How many objects changed (added, modified, deleted): kube-proxy's
/// service and endpoint change counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ObjectChanges {
    pub services: u64,
    pub endpoint_slices: u64,
}

/// What identifies a version of an object: its resourceVersion when an API
/// server gave it one, its content otherwise (manifests).
fn fingerprint<T: Serialize>(meta: &ObjectMeta, obj: &T) -> u64 {
    let mut h = DefaultHasher::new();
    match &meta.resource_version {
        Some(rv) if !rv.is_empty() => ("rv", rv).hash(&mut h),
        _ => serde_json::to_string(obj).unwrap_or_default().hash(&mut h),
    }
    h.finish()
}

struct SliceEntry {
    fingerprint: u64,
    /// The Service it belongs to (its namespace, its service-name label).
    owner: NamespacedName,
    /// What the model reads of it (not the object).
    slice: Arc<CheckedSlice>,
}

/// An EndpointSlice checked ahead of time, as a manifest directory keeps
/// it per file: handing it to the cache again costs no copy.
#[derive(Clone, Debug)]
pub struct PreparedSlice {
    id: NamespacedName,
    /// The Service it belongs to; None if it is not ours (headless, or no
    /// service-name label).
    owner: Option<NamespacedName>,
    fingerprint: u64,
    slice: Arc<CheckedSlice>,
}

impl PreparedSlice {
    pub fn new(slice: &EndpointSlice, names: &mut Names) -> PreparedSlice {
        let id = NamespacedName::of(&slice.metadata);
        PreparedSlice {
            owner: owner_of(&id, &slice.metadata),
            fingerprint: fingerprint(&slice.metadata, slice),
            slice: Arc::new(CheckedSlice::new(slice, names)),
            id,
        }
    }

    pub fn id(&self) -> &NamespacedName {
        &self.id
    }
}

/// The Service a slice belongs to (its namespace, its service-name label);
/// None if it is headless or has no such label.
fn owner_of(id: &NamespacedName, meta: &ObjectMeta) -> Option<NamespacedName> {
    meta.labels
        .as_ref()
        .filter(|l| !l.contains_key(LABEL_HEADLESS))
        .and_then(|l| l.get(LABEL_SERVICE_NAME))
        .map(|svc| NamespacedName::new(&id.namespace, svc))
}

/// An EndpointSlice as the cache takes it: an object (checked if it
/// changed) or a [`PreparedSlice`].
pub trait SliceInput {
    fn id(&self) -> NamespacedName;
    fn owner(&self, id: &NamespacedName) -> Option<NamespacedName>;
    fn fingerprint(&self) -> u64;
    fn into_checked(self, names: &mut Names) -> Arc<CheckedSlice>;
}

impl SliceInput for &EndpointSlice {
    fn id(&self) -> NamespacedName {
        NamespacedName::of(&self.metadata)
    }
    fn owner(&self, id: &NamespacedName) -> Option<NamespacedName> {
        owner_of(id, &self.metadata)
    }
    fn fingerprint(&self) -> u64 {
        fingerprint(&self.metadata, *self)
    }
    fn into_checked(self, names: &mut Names) -> Arc<CheckedSlice> {
        Arc::new(CheckedSlice::new(self, names))
    }
}

/// A watcher store's slice: made an object again only when it is checked.
impl SliceInput for &SlimSlice {
    fn id(&self) -> NamespacedName {
        NamespacedName::of(&self.metadata)
    }
    fn owner(&self, id: &NamespacedName) -> Option<NamespacedName> {
        owner_of(id, &self.metadata)
    }
    fn fingerprint(&self) -> u64 {
        match &self.metadata.resource_version {
            Some(rv) if !rv.is_empty() => fingerprint(&self.metadata, &()),
            _ => fingerprint(&self.metadata, &self.to_slice()),
        }
    }
    fn into_checked(self, names: &mut Names) -> Arc<CheckedSlice> {
        Arc::new(CheckedSlice::new(&self.to_slice(), names))
    }
}

impl SliceInput for &PreparedSlice {
    fn id(&self) -> NamespacedName {
        self.id.clone()
    }
    fn owner(&self, _: &NamespacedName) -> Option<NamespacedName> {
        self.owner.clone()
    }
    fn fingerprint(&self) -> u64 {
        self.fingerprint
    }
    fn into_checked(self, _: &mut Names) -> Arc<CheckedSlice> {
        self.slice.clone()
    }
}

/// A Service as the cache takes it: borrowed (copied, without what the
/// model does not read, if it changed) or already shared (an API
/// watcher's store holds it: the cache keeps the same allocation).
pub trait ServiceInput {
    /// The very object the cache holds (nothing to compare).
    fn is(&self, _held: &Arc<Service>) -> bool {
        false
    }
    fn metadata(&self) -> &ObjectMeta;
    fn fingerprint(&self) -> u64;
    fn into_shared(self) -> Arc<Service>;
}

impl ServiceInput for &Service {
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn fingerprint(&self) -> u64 {
        fingerprint(&self.metadata, *self)
    }
    fn into_shared(self) -> Arc<Service> {
        let mut svc = self.clone();
        slim::service(&mut svc);
        Arc::new(svc)
    }
}

impl ServiceInput for Arc<Service> {
    fn is(&self, held: &Arc<Service>) -> bool {
        Arc::ptr_eq(self, held)
    }
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn fingerprint(&self) -> u64 {
        fingerprint(&self.metadata, self.as_ref())
    }
    fn into_shared(self) -> Arc<Service> {
        self
    }
}

pub struct ModelCache {
    node: NodeInfo,
    opts: Options,
    services: BTreeMap<NamespacedName, (u64, Arc<Service>)>,
    slices: BTreeMap<NamespacedName, SliceEntry>,
    /// Node and zone names the slices share.
    names: Names,
    /// Slice names of each Service, in name order.
    by_service: BTreeMap<NamespacedName, BTreeSet<String>>,
    /// The result of each Service on its own.
    parts: BTreeMap<NamespacedName, Part>,
    /// Services claiming each frontend; the first one has it.
    claims: BTreeMap<FrontendKey, Claimants>,
    /// The frontends in force (the first claimant's).
    winners: BTreeMap<FrontendKey, Frontend>,
    /// Problems of the input as a whole (duplicate objects).
    service_problems: Vec<Problem>,
    slice_problems: Vec<Problem>,
    dirty: BTreeSet<NamespacedName>,
    /// Services and slices that changed since [`ModelCache::take_changes`].
    changes: ObjectChanges,
}

impl ModelCache {
    pub fn new(node: NodeInfo, opts: Options) -> ModelCache {
        ModelCache {
            node,
            opts,
            services: BTreeMap::new(),
            slices: BTreeMap::new(),
            names: Names::default(),
            by_service: BTreeMap::new(),
            parts: BTreeMap::new(),
            claims: BTreeMap::new(),
            winners: BTreeMap::new(),
            service_problems: Vec::new(),
            slice_problems: Vec::new(),
            dirty: BTreeSet::new(),
            changes: ObjectChanges::default(),
        }
    }

    /// A new node name or zone changes every Service's local and topology
    /// sets.
    pub fn set_node(&mut self, node: NodeInfo) {
        if node != self.node {
            self.node = node;
            self.dirty.extend(self.services.keys().cloned());
        }
    }

    pub fn node(&self) -> &NodeInfo {
        &self.node
    }

    /// Replaces every object (a manifest directory read again); only
    /// Services whose object or slices differ are marked for recomputation,
    /// and only changed objects are copied.
    pub fn replace<S: ServiceInput, E: SliceInput>(
        &mut self,
        services: impl IntoIterator<Item = S>,
        slices: impl IntoIterator<Item = E>,
    ) {
        self.replace_services(services);
        self.replace_slices(slices);
    }

    /// Replaces every Service (see [`ModelCache::replace`]).
    pub fn replace_services<S: ServiceInput>(&mut self, services: impl IntoIterator<Item = S>) {
        self.service_problems.clear();
        let sorted = sorted_unique(services, "Service", &mut self.service_problems, |s| {
            NamespacedName::of(s.metadata())
        });
        let gone = absent(&self.services, &sorted);
        for (key, svc) in sorted {
            self.put_service(key, svc);
        }
        for id in gone {
            self.delete_service(&id);
        }
    }

    /// Replaces every EndpointSlice (see [`ModelCache::replace`]).
    pub fn replace_slices<E: SliceInput>(&mut self, slices: impl IntoIterator<Item = E>) {
        self.slice_problems.clear();
        let sorted = sorted_unique(slices, "EndpointSlice", &mut self.slice_problems, |s| {
            s.id()
        });
        let gone = absent(&self.slices, &sorted);
        for (key, slice) in sorted {
            self.put_slice(key, slice);
        }
        for id in gone {
            self.delete_slice(&id);
        }
    }

    /// A Service was added or changed (a watch event).
    pub fn upsert_service(&mut self, svc: impl ServiceInput) {
        self.put_service(NamespacedName::of(svc.metadata()), svc);
    }

    pub fn delete_service(&mut self, id: &NamespacedName) {
        if self.services.remove(id).is_some() {
            self.dirty.insert(id.clone());
            self.changes.services += 1;
        }
    }

    /// An EndpointSlice was added or changed (a watch event).
    pub fn upsert_slice(&mut self, slice: impl SliceInput) {
        self.put_slice(slice.id(), slice);
    }

    pub fn delete_slice(&mut self, id: &NamespacedName) {
        if let Some(old) = self.slices.remove(id) {
            self.unlink_slice(id, &old.owner);
            self.changes.endpoint_slices += 1;
        }
    }

    /// How many Services and EndpointSlices changed (added, modified,
    /// deleted) since the last call.
    pub fn take_changes(&mut self) -> ObjectChanges {
        std::mem::take(&mut self.changes)
    }

    fn put_service(&mut self, key: NamespacedName, svc: impl ServiceInput) {
        if self
            .services
            .get(&key)
            .is_some_and(|(_, held)| svc.is(held))
        {
            return;
        }
        let fp = svc.fingerprint();
        if self.services.get(&key).is_some_and(|(old, _)| *old == fp) {
            return;
        }
        self.dirty.insert(key.clone());
        self.changes.services += 1;
        self.services.insert(key, (fp, svc.into_shared()));
    }

    fn put_slice(&mut self, key: NamespacedName, slice: impl SliceInput) {
        let Some(owner) = slice.owner(&key) else {
            // Headless, or no service-name label: not ours (any earlier
            // version of it is dropped).
            tracing::debug!(slice = %key, "EndpointSlice ignored");
            self.delete_slice(&key);
            return;
        };
        let fp = slice.fingerprint();
        if let Some(old) = self.slices.get(&key) {
            if old.fingerprint == fp && old.owner == owner {
                return;
            }
            let old_owner = old.owner.clone();
            self.unlink_slice(&key, &old_owner);
        }
        self.link_slice(&key, &owner);
        self.changes.endpoint_slices += 1;
        self.slices.insert(
            key,
            SliceEntry {
                fingerprint: fp,
                owner,
                slice: slice.into_checked(&mut self.names),
            },
        );
    }

    fn link_slice(&mut self, key: &NamespacedName, owner: &NamespacedName) {
        self.by_service
            .entry(owner.clone())
            .or_default()
            .insert(key.name.clone());
        self.dirty.insert(owner.clone());
    }

    fn unlink_slice(&mut self, key: &NamespacedName, owner: &NamespacedName) {
        if let Some(names) = self.by_service.get_mut(owner) {
            names.remove(&key.name);
            if names.is_empty() {
                self.by_service.remove(owner);
            }
        }
        self.dirty.insert(owner.clone());
    }

    /// Recomputes what changed; returns the frontends whose winning state
    /// changed (added, modified or removed).
    pub fn update(&mut self) -> BTreeSet<FrontendKey> {
        let mut touched: BTreeSet<FrontendKey> = BTreeSet::new();
        for svc_key in std::mem::take(&mut self.dirty) {
            if let Some(old) = self.parts.remove(&svc_key) {
                for (fk, _) in old.frontends.iter() {
                    if let Some(c) = self.claims.get_mut(fk) {
                        c.remove(&svc_key);
                    }
                    touched.insert(*fk);
                }
            }
            let Some((_, svc)) = self.services.get(&svc_key) else {
                continue;
            };
            let slices: Vec<&CheckedSlice> = self
                .by_service
                .get(&svc_key)
                .into_iter()
                .flatten()
                .filter_map(|name| {
                    self.slices
                        .get(&NamespacedName::new(&svc_key.namespace, name))
                })
                .map(|e| e.slice.as_ref())
                .collect();
            let part = Part::from(service_state_checked(svc, &slices, &self.node, &self.opts));
            for (fk, _) in part.frontends.iter() {
                self.claims.entry(*fk).or_default().insert(svc_key.clone());
                touched.insert(*fk);
            }
            self.parts.insert(svc_key, part);
        }
        let mut changed = BTreeSet::new();
        for fk in touched {
            let winner = self
                .claims
                .get(&fk)
                .and_then(|c| c.first())
                .and_then(|owner| self.parts.get(owner))
                .and_then(|p| p.frontend(&fk));
            if self.winners.get(&fk) != winner {
                match winner {
                    Some(w) => self.winners.insert(fk, w.clone()),
                    None => self.winners.remove(&fk),
                };
                changed.insert(fk);
            }
            if self.claims.get(&fk).is_some_and(Claimants::is_empty) {
                self.claims.remove(&fk);
            }
        }
        changed
    }

    pub fn frontends(&self) -> &BTreeMap<FrontendKey, Frontend> {
        &self.winners
    }

    /// The health checks this node serves. Of two Services with one
    /// `healthCheckNodePort`, the first by namespace/name keeps it (the
    /// other is in [`ModelCache::problems`]).
    pub fn health_checks(&self) -> BTreeMap<NamespacedName, HealthCheck> {
        self.resolve_health_checks().0
    }

    /// The health checks in force, and the Services whose port an earlier
    /// Service has.
    fn resolve_health_checks(&self) -> (BTreeMap<NamespacedName, HealthCheck>, Vec<Problem>) {
        let mut by_port: BTreeMap<u16, &NamespacedName> = BTreeMap::new();
        let mut checks = BTreeMap::new();
        let mut problems = Vec::new();
        for (id, hc) in self.parts.values().flat_map(|p| p.health_checks.iter()) {
            match by_port.get(&hc.node_port) {
                Some(owner) => problems.push(Problem::new(
                    ProblemKind::DuplicateHealthCheckNodePort,
                    "Service",
                    id,
                    format!(
                        "healthCheckNodePort {} is taken by {owner}; no health check",
                        hc.node_port
                    ),
                )),
                None => {
                    by_port.insert(hc.node_port, id);
                    checks.insert(id.clone(), *hc);
                }
            }
        }
        (checks, problems)
    }

    /// Everything skipped, in namespace/name order.
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = self.service_problems.clone();
        out.extend(self.slice_problems.iter().cloned());
        for (key, part) in &self.parts {
            out.extend(part.problems.iter().cloned());
            for (fk, fe) in part.frontends.iter() {
                let Some(owner) = self.claims.get(fk).and_then(|c| c.first()) else {
                    continue;
                };
                if owner != key {
                    let other = &self.winners[fk];
                    out.push(Problem::new(
                        ProblemKind::DuplicateFrontend,
                        "Service",
                        key,
                        format!(
                            "port {:?}: {} frontend {fk} is taken by {} ({}); skipped",
                            fe.service.port, fe.kind, other.service, other.kind
                        ),
                    ));
                }
            }
        }
        out.extend(self.resolve_health_checks().1);
        out
    }

    /// The whole desired state (as [`desired_state`] returns it).
    pub fn state(&self) -> DesiredState {
        let mut endpoints = BTreeMap::new();
        for part in self.parts.values() {
            endpoints.extend(part.endpoints.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        DesiredState {
            frontends: self.winners.clone(),
            endpoints,
            health_checks: self.health_checks(),
            problems: self.problems(),
        }
    }
}

/// One Service's result, kept compact: sorted boxed slices, not maps (a
/// B-tree map allocates a whole node, ~1.4 KB here, for a single entry,
/// and most Services have one port).
struct Part {
    frontends: Box<[(FrontendKey, Frontend)]>,
    endpoints: Box<[(ServicePortName, ServicePortEndpoints)]>,
    problems: Box<[Problem]>,
    /// Nearly always none or one.
    health_checks: Box<[(NamespacedName, HealthCheck)]>,
}

impl From<DesiredState> for Part {
    fn from(state: DesiredState) -> Part {
        Part {
            frontends: state.frontends.into_iter().collect(),
            endpoints: state.endpoints.into_iter().collect(),
            problems: state.problems.into(),
            health_checks: state.health_checks.into_iter().collect(),
        }
    }
}

impl Part {
    fn frontend(&self, key: &FrontendKey) -> Option<&Frontend> {
        let i = self.frontends.binary_search_by(|(k, _)| k.cmp(key)).ok()?;
        Some(&self.frontends[i].1)
    }
}

/// The Services claiming one frontend, sorted (nearly always one).
#[derive(Default)]
struct Claimants(Vec<NamespacedName>);

impl Claimants {
    fn insert(&mut self, id: NamespacedName) {
        if let Err(at) = self.0.binary_search(&id) {
            self.0.insert(at, id);
        }
    }

    fn remove(&mut self, id: &NamespacedName) {
        if let Ok(at) = self.0.binary_search(id) {
            self.0.remove(at);
        }
    }

    fn first(&self) -> Option<&NamespacedName> {
        self.0.first()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The objects by key, sorted, each key once: of two objects with one name
/// the first in input order is kept (deterministic for sorted input) and the
/// other reported. Keys are computed once.
fn sorted_unique<T>(
    objects: impl IntoIterator<Item = T>,
    kind: &'static str,
    problems: &mut Vec<Problem>,
    id: fn(&T) -> NamespacedName,
) -> Vec<(NamespacedName, T)> {
    let mut sorted: Vec<(NamespacedName, T)> = objects.into_iter().map(|o| (id(&o), o)).collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    sorted.dedup_by(|later, first| {
        let dup = later.0 == first.0;
        if dup {
            problems.push(Problem::new(
                ProblemKind::DuplicateObject,
                kind,
                &later.0,
                format!("a second {kind} with this namespace and name; skipped"),
            ));
        }
        dup
    });
    sorted
}

/// Keys held that the new objects no longer have.
fn absent<V, T>(
    held: &BTreeMap<NamespacedName, V>,
    sorted: &[(NamespacedName, T)],
) -> Vec<NamespacedName> {
    held.keys()
        .filter(|k| sorted.binary_search_by(|(s, _)| s.cmp(k)).is_err())
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, ip: &str) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"clusterIP": ip, "ports": [{"port": 80, "targetPort": 8080}]}
        }))
        .unwrap()
    }

    fn slice(svc: &str, name: &str, ips: &[&str]) -> EndpointSlice {
        let eps: Vec<_> = ips
            .iter()
            .map(|ip| serde_json::json!({"addresses": [ip]}))
            .collect();
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns",
                         "labels": {LABEL_SERVICE_NAME: svc}},
            "addressType": "IPv4",
            "ports": [{"port": 8080}],
            "endpoints": eps
        }))
        .unwrap()
    }

    fn key(ip: &str) -> FrontendKey {
        FrontendKey {
            ip: ip.parse().unwrap(),
            port: 80,
            protocol: crate::model::Protocol::Tcp,
        }
    }

    #[test]
    fn only_changed_services_are_recomputed() {
        let mut c = ModelCache::new(NodeInfo::default(), Options::default());
        let services = vec![svc("a", "10.96.0.1"), svc("b", "10.96.0.2")];
        let mut slices = vec![
            slice("a", "a-1", &["10.0.0.1"]),
            slice("b", "b-1", &["10.0.0.2"]),
        ];
        c.replace(&services, &slices);
        assert_eq!(c.update().len(), 2);
        c.replace(&services, &slices);
        assert!(c.dirty.is_empty(), "nothing changed");
        assert!(c.update().is_empty());

        slices[1] = slice("b", "b-1", &["10.0.0.2", "10.0.0.3"]);
        c.replace(&services, &slices);
        assert_eq!(c.dirty, BTreeSet::from([NamespacedName::new("ns", "b")]));
        assert_eq!(c.update(), BTreeSet::from([key("10.96.0.2")]));
        assert_eq!(c.frontends()[&key("10.96.0.2")].backends.len(), 2);

        // A slice moving to another Service dirties both.
        slices[1] = slice("a", "b-1", &["10.0.0.2"]);
        c.replace(&services, &slices);
        assert_eq!(c.dirty.len(), 2);
        c.update();
        assert_eq!(c.frontends()[&key("10.96.0.1")].backends.len(), 2);
        assert!(c.frontends()[&key("10.96.0.2")].backends.is_empty());
    }

    #[test]
    fn a_frontend_passes_to_the_next_claimant_when_its_owner_goes() {
        let mut c = ModelCache::new(NodeInfo::default(), Options::default());
        let both = vec![svc("a", "10.96.0.9"), svc("b", "10.96.0.9")];
        let slices = vec![
            slice("a", "a-1", &["10.0.0.1"]),
            slice("b", "b-1", &["10.0.0.2"]),
        ];
        c.replace(&both, &slices);
        c.update();
        assert_eq!(c.frontends()[&key("10.96.0.9")].service.name, "a");
        let problems = c.problems();
        assert_eq!(problems.len(), 1);
        assert_eq!(
            (problems[0].name.as_str(), problems[0].kind),
            ("b", ProblemKind::DuplicateFrontend)
        );

        c.replace(&both[1..], &slices);
        assert_eq!(c.update(), BTreeSet::from([key("10.96.0.9")]));
        assert_eq!(c.frontends()[&key("10.96.0.9")].service.name, "b");
        assert!(c.problems().is_empty());
    }

    #[test]
    fn a_new_node_recomputes_everything() {
        let mut c = ModelCache::new(NodeInfo::default(), Options::default());
        c.replace(
            &[svc("a", "10.96.0.1")],
            &[slice("a", "a-1", &["10.0.0.1"])],
        );
        c.update();
        c.set_node(NodeInfo {
            name: "n1".into(),
            zone: None,
        });
        assert_eq!(c.dirty.len(), 1);
    }
}
