//! Turning desired frontends into map entries, incrementally.
//!
//! The syncer mirrors what it wrote, so a sync touches only frontends whose
//! backends or flags changed. A changed backend set is written as slots of a
//! new generation and published by one update of the service entry; a packet
//! therefore sees the old set or the new one, never a mix. A write that fails
//! (a full map) is rolled back for that frontend, which keeps its previous
//! state, and is reported; other frontends are unaffected.
//!
//! Both address families go through one syncer: frontends and backends of
//! either family ([`family`]), one space of service port ids and backend
//! ids, the family's own service, backend, address and source-range maps.
//!
//! * [`convert`]: the model's frontends as [`FrontendWant`]s;
//! * [`lbmap`]: the one interface through which entries reach the maps;
//! * [`backends`]: backend ids and their references, service port ids;
//! * [`adopt`]: on start the syncer adopts what a previous run left in the
//!   pinned maps ([`Syncer::adopt`]): entries that are still right stay
//!   untouched, so a restart does not disturb traffic; stale ones are
//!   removed.

pub mod adopt;
pub mod backends;
pub mod convert;
pub mod family;
pub mod lbmap;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use proxy_common::{
    ADDR_CLUSTER_IP, ADDR_EXTERNAL, ADDR_HOST, ADDR_NODEPORT, AddrKey, AddrKey6, AddrValue,
    AffMemberKey, BackendKey, SVC_F_AFFINITY, SVC_F_SRC_RANGES, SlotKey, SlotValue, SrcRangeKey,
    SrcRangeKey6, SvcName, SvcValue,
};

pub use self::family::{AnyBackend, FeKey};
use self::{
    backends::{Backends, ServicePortIds},
    lbmap::{Entry, Key, LbMaps, WriteError},
};

/// What one frontend should do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrontendWant {
    /// `namespace/name:port` (for logs, metrics and inspection).
    pub name: String,
    /// `SVC_F_*`.
    pub flags: u16,
    /// The primary set, in slot order (each backend gets one slot), of the
    /// frontend's family.
    pub backends: Vec<AnyBackend>,
    /// The local set (`SVC_F_ETP_LOCAL`), in the slots after the primary set.
    pub local_backends: Vec<AnyBackend>,
    /// Seconds (`SVC_F_AFFINITY`).
    pub affinity_timeout: u32,
    /// Source prefixes allowed, address and length (`SVC_F_SRC_RANGES`), of
    /// the frontend's family.
    pub source_ranges: Vec<(IpAddr, u8)>,
    /// The address is an externalIP or load-balancer IP (`ADDR_EXTERNAL`:
    /// only its frontends are ours), not a ClusterIP.
    pub external_addr: bool,
}

impl FrontendWant {
    /// Both sets as they go into slots, capped at [`MAX_BACKENDS`] in all.
    fn slotted(&self) -> (&[AnyBackend], &[AnyBackend]) {
        let primary = &self.backends[..self.backends.len().min(MAX_BACKENDS)];
        let room = MAX_BACKENDS - primary.len();
        let local = &self.local_backends[..self.local_backends.len().min(room)];
        (primary, local)
    }

    /// Affinity members: every backend id in the slots.
    fn members(&self, ids: &[u32]) -> BTreeSet<u32> {
        if self.flags & SVC_F_AFFINITY == 0 {
            return BTreeSet::new();
        }
        ids.iter().copied().collect()
    }

    fn ranges(&self) -> BTreeSet<(IpAddr, u8)> {
        if self.flags & SVC_F_SRC_RANGES == 0 {
            return BTreeSet::new();
        }
        self.source_ranges.iter().copied().collect()
    }
}

/// The addresses of this node, both families.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeAddrs {
    /// Those NodePorts answer on (`--nodeport-addresses`).
    pub nodeport: BTreeSet<IpAddr>,
    /// Every address of the node (a NodePort address is one too).
    pub host: BTreeSet<IpAddr>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub frontends: BTreeMap<FeKey, FrontendWant>,
    /// Addresses NodePorts answer on.
    pub node_addrs: BTreeSet<IpAddr>,
    /// Other addresses of this node (hostNetwork backends answer from
    /// them).
    pub host_addrs: BTreeSet<IpAddr>,
}

impl Desired {
    fn addrs(&self) -> NodeAddrs {
        NodeAddrs {
            nodeport: self.node_addrs.clone(),
            host: self.host_addrs.union(&self.node_addrs).copied().collect(),
        }
    }
}

/// A frontend as it is in the maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Programmed {
    svc_id: u32,
    generation: u16,
    flags: u16,
    /// Primary set, then local set.
    backend_ids: Vec<u32>,
    local_count: u16,
    affinity_timeout: u32,
    /// Affinity membership entries written (backend ids).
    members: BTreeSet<u32>,
    /// Source range entries written.
    ranges: BTreeSet<(IpAddr, u8)>,
    external_addr: bool,
}

/// What a sync did.
#[derive(Debug, Default)]
pub struct SyncReport {
    /// Frontends written (created or changed).
    pub frontends_written: usize,
    pub frontends_removed: usize,
    /// Individual map writes and deletes.
    pub writes: usize,
    /// Frontends that could not be written, and why.
    pub failed: Vec<(String, WriteError)>,
}

pub struct Syncer<M: LbMaps> {
    maps: M,
    frontends: BTreeMap<FeKey, Programmed>,
    names: BTreeMap<u32, String>,
    backends: Backends,
    /// Address classes written, both families.
    addrs: BTreeMap<IpAddr, AddrValue>,
    /// Entries found at adoption that nothing refers to.
    garbage: Vec<Key>,
    svc_ids: ServicePortIds,
    /// The desired state last asked for; a sync is a diff against it.
    wanted: BTreeMap<FeKey, FrontendWant>,
    node_addrs: NodeAddrs,
    /// Frontends whose last write failed: retried at every sync.
    failed: BTreeSet<FeKey>,
    /// Programmed frontends per VIP address and kind (true: external).
    vips: BTreeMap<(IpAddr, bool), usize>,
    /// Addresses to check again at the next sync: found in the pins, or
    /// whose write failed (a full map).
    stale_addrs: BTreeSet<IpAddr>,
}

/// Most slots a frontend can have (the slot index is a u16).
pub const MAX_BACKENDS: usize = u16::MAX as usize;

/// What a frontend write created before its switch, to roll back if a
/// later write fails.
#[derive(Default)]
struct Created {
    backends: Vec<u32>,
    slots: Vec<SlotKey>,
    /// Affinity members and source ranges.
    extras: Vec<Key>,
}

impl<M: LbMaps> Syncer<M> {
    fn empty(maps: M) -> Self {
        Syncer {
            maps,
            frontends: BTreeMap::new(),
            names: BTreeMap::new(),
            backends: Backends::default(),
            addrs: BTreeMap::new(),
            garbage: Vec::new(),
            svc_ids: ServicePortIds::default(),
            wanted: BTreeMap::new(),
            node_addrs: NodeAddrs::default(),
            failed: BTreeSet::new(),
            vips: BTreeMap::new(),
            stale_addrs: BTreeSet::new(),
        }
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    /// Names of the service ports by id, for counters and inspection.
    pub fn names(&self) -> &BTreeMap<u32, String> {
        &self.names
    }

    /// Number of frontends programmed.
    pub fn frontend_count(&self) -> usize {
        self.frontends.len()
    }

    /// Whether an IPv6 frontend is programmed. `FeKey` orders every IPv4
    /// key first, so the last key tells (no walk: the daemon asks at every
    /// tick).
    pub fn has_ipv6_frontends(&self) -> bool {
        matches!(self.frontends.keys().next_back(), Some(FeKey::V6(_)))
    }

    /// Entries this syncer keeps in each desired-state map.
    pub fn entry_counts(&self) -> [(&'static str, usize); 7] {
        let v4 = |k: &&FeKey| matches!(k, FeKey::V4(_));
        let services = self.frontends.keys().filter(v4).count();
        let backends = self.backends.count_v4();
        let addrs = self.addrs.keys().filter(|a| a.is_ipv4()).count();
        [
            (proxy_common::SVC_MAP, services),
            (proxy_common::SVC6_MAP, self.frontends.len() - services),
            (
                proxy_common::SLOT_MAP,
                self.frontends.values().map(|p| p.backend_ids.len()).sum(),
            ),
            (proxy_common::BACKEND_MAP, backends),
            (proxy_common::BACKEND6_MAP, self.backends.len() - backends),
            (proxy_common::ADDR_MAP, addrs),
            (proxy_common::ADDR6_MAP, self.addrs.len() - addrs),
        ]
    }

    /// Brings the maps to `desired`: a diff against the last desired
    /// state, then [`Syncer::apply`]. Also removes frontends adopted from
    /// the pins that are no longer wanted.
    pub fn sync(&mut self, desired: &Desired) -> SyncReport {
        let mut changes: Vec<(FeKey, Option<FrontendWant>)> = desired
            .frontends
            .iter()
            .filter(|(k, w)| self.wanted.get(k) != Some(w) || !self.frontends.contains_key(k))
            .map(|(k, w)| (*k, Some(w.clone())))
            .collect();
        changes.extend(
            self.wanted
                .keys()
                .chain(self.frontends.keys())
                .filter(|k| !desired.frontends.contains_key(k))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .map(|k| (*k, None)),
        );
        self.apply(&changes, Some(&desired.addrs()))
    }

    /// Applies changed frontends (None: removed) and, if given, the new set
    /// of node addresses. The work is proportional to the change, not to
    /// the number of frontends.
    pub fn apply(
        &mut self,
        changes: &[(FeKey, Option<FrontendWant>)],
        node_addrs: Option<&NodeAddrs>,
    ) -> SyncReport {
        let mut report = SyncReport::default();
        let mut touched: BTreeSet<FeKey> = std::mem::take(&mut self.failed);
        for (key, want) in changes {
            match want {
                Some(w) => self.wanted.insert(*key, w.clone()),
                None => self.wanted.remove(key),
            };
            touched.insert(*key);
        }
        let mut addrs: BTreeSet<IpAddr> = BTreeSet::new();
        if let Some(node_addrs) = node_addrs {
            let old = &self.node_addrs;
            addrs.extend(old.nodeport.symmetric_difference(&node_addrs.nodeport));
            addrs.extend(old.host.symmetric_difference(&node_addrs.host));
            self.node_addrs = node_addrs.clone();
        }
        // Removals first: their ids are free for the frontends added below.
        for key in &touched {
            if !self.wanted.contains_key(key) && self.frontends.contains_key(key) {
                self.remove_frontend(key, &mut report.writes);
                report.frontends_removed += 1;
                addrs.insert(key.addr());
            }
        }
        // Backends the removals freed make room for the writes below.
        self.collect_garbage(&mut report.writes);
        for key in &touched {
            let Some(want) = self.wanted.get(key).cloned() else {
                continue;
            };
            if self.is_current(key, &want) {
                let svc_id = self.frontends[key].svc_id;
                // A renamed owner (or a name lost in a crash) is only a
                // label: failing to write it is not worth failing the sync.
                let _ = self.write_name(svc_id, &want.name, &mut report.writes);
                continue;
            }
            match self.write_frontend(key, &want, &mut report.writes) {
                Ok(()) => {
                    report.frontends_written += 1;
                    addrs.insert(key.addr());
                }
                Err(e) => {
                    self.failed.insert(*key);
                    report.failed.push((want.name.clone(), e));
                }
            }
        }
        addrs.extend(std::mem::take(&mut self.stale_addrs));
        addrs.retain(|a| !a.is_unspecified());
        self.sync_addrs(&addrs, &mut report);
        self.collect_garbage(&mut report.writes);
        report
    }

    fn is_current(&self, key: &FeKey, want: &FrontendWant) -> bool {
        let Some(p) = self.frontends.get(key) else {
            return false;
        };
        let (primary, local) = want.slotted();
        p.flags == want.flags
            && p.external_addr == want.external_addr
            && p.affinity_timeout == want.affinity_timeout
            && p.ranges == want.ranges()
            && p.local_count as usize == local.len()
            && p.backend_ids.len() == primary.len() + local.len()
            && p.backend_ids
                .iter()
                .zip(primary.iter().chain(local))
                .all(|(id, b)| self.backends.get(*id) == Some(b))
    }

    fn write_frontend(
        &mut self,
        key: &FeKey,
        want: &FrontendWant,
        writes: &mut usize,
    ) -> Result<(), WriteError> {
        let (primary, local) = want.slotted();
        let slotted: Vec<AnyBackend> = primary.iter().chain(local).copied().collect();
        let mut created = Created::default();
        // Backends first: a slot must never point at a missing backend.
        let ids = match self.write_backends(&slotted, &mut created, writes) {
            Ok(ids) => ids,
            Err(e) => {
                self.undo(&created, writes);
                return Err(e);
            }
        };
        let old = self.frontends.get(key).cloned();
        let new = Programmed {
            flags: want.flags,
            local_count: local.len() as u16,
            affinity_timeout: want.affinity_timeout,
            members: want.members(&ids),
            ranges: want.ranges(),
            external_addr: want.external_addr,
            backend_ids: ids,
            ..Programmed::default()
        };
        let result = self
            .switch_to(key, old.as_ref(), &new, &mut created, writes)
            .inspect_err(|_| self.undo(&created, writes));
        let (svc_id, generation) = result?;
        self.switched(key, old, &new, writes);
        let _ = self.write_name(svc_id, &want.name, writes);
        self.frontends.insert(
            *key,
            Programmed {
                svc_id,
                generation,
                ..new
            },
        );
        Ok(())
    }

    /// Bookkeeping once a frontend's new state is live: ids, address
    /// users, references; then the old generation and extras go.
    fn switched(
        &mut self,
        key: &FeKey,
        old: Option<Programmed>,
        new: &Programmed,
        writes: &mut usize,
    ) {
        match &old {
            None => self.count_vip(key, new.external_addr, true),
            Some(o) if o.external_addr != new.external_addr => {
                self.count_vip(key, o.external_addr, false);
                self.count_vip(key, new.external_addr, true);
            }
            Some(_) => {}
        }
        for id in &new.backend_ids {
            self.backends.add_ref(*id);
        }
        if let Some(old) = old {
            self.release(&old, writes);
            let gone = Programmed {
                members: &old.members - &new.members,
                ranges: &old.ranges - &new.ranges,
                ..old
            };
            self.delete_extras(&gone, writes);
        }
    }

    fn count_vip(&mut self, key: &FeKey, external: bool, up: bool) {
        if !key.is_vip() {
            return;
        }
        let k = (key.addr(), external);
        if up {
            *self.vips.entry(k).or_default() += 1;
        } else if let Some(n) = self.vips.get_mut(&k) {
            *n -= 1;
            if *n == 0 {
                self.vips.remove(&k);
            }
        }
    }

    /// Deletes the affinity members and source ranges listed in `p`.
    fn delete_extras(&mut self, p: &Programmed, writes: &mut usize) {
        let keys = extra_keys(p.svc_id, &p.members, &p.ranges);
        for key in keys {
            if self.maps.delete(&key).is_ok() {
                *writes += 1;
            }
        }
    }

    /// The ids of `backends`, writing those not in the map yet.
    fn write_backends(
        &mut self,
        backends: &[AnyBackend],
        created: &mut Created,
        writes: &mut usize,
    ) -> Result<Vec<u32>, WriteError> {
        let mut ids = Vec::with_capacity(backends.len());
        for b in backends {
            let id = match self.backends.id_of(b) {
                Some(id) => id,
                None => {
                    let k = BackendKey {
                        backend_id: self.backends.next_id(),
                    };
                    let entry = match b {
                        AnyBackend::V4(b) => Entry::Backend(k, *b),
                        AnyBackend::V6(b) => Entry::Backend6(k, *b),
                    };
                    self.maps.put(&entry)?;
                    *writes += 1;
                    let id = self.backends.insert_new(*b);
                    created.backends.push(id);
                    id
                }
            };
            ids.push(id);
        }
        Ok(ids)
    }

    /// Writes the slots of a new generation of the frontend (or of a new
    /// frontend), then its service entry: the switch, from which on packets
    /// use the new slots. Returns its id and generation.
    fn switch_to(
        &mut self,
        key: &FeKey,
        old: Option<&Programmed>,
        new: &Programmed,
        created: &mut Created,
        writes: &mut usize,
    ) -> Result<(u32, u16), WriteError> {
        let (svc_id, generation) = match old {
            Some(p) => (p.svc_id, p.generation.wrapping_add(1)),
            None => {
                let id = self.svc_ids.peek().ok_or(WriteError::Full {
                    map: proxy_common::SVC_MAP,
                })?;
                // A new service must not inherit an old one's counts.
                self.maps.reset_stats(id)?;
                (id, 0)
            }
        };
        let ids = &new.backend_ids;
        for (i, id) in ids.iter().enumerate() {
            let sk = SlotKey {
                svc_id,
                generation,
                slot: i as u16,
            };
            self.maps
                .put(&Entry::Slot(sk, SlotValue { backend_id: *id }))?;
            *writes += 1;
            created.slots.push(sk);
        }
        // Members and ranges the frontend gains, before the switch (those it
        // loses go after it).
        let none = Programmed::default();
        let (old_members, old_ranges) =
            old.map_or((&none.members, &none.ranges), |o| (&o.members, &o.ranges));
        let added = extra_keys(
            svc_id,
            &(&new.members - old_members),
            &(&new.ranges - old_ranges),
        );
        for key in added {
            let entry = match key {
                Key::AffMember(k) => Entry::AffMember(k),
                Key::SrcRange(k, len) => Entry::SrcRange(k, len),
                Key::SrcRange6(k, len) => Entry::SrcRange6(k, len),
                _ => unreachable!("extra_keys makes members and ranges only"),
            };
            self.maps.put(&entry)?;
            *writes += 1;
            created.extras.push(key);
        }
        let value = SvcValue {
            svc_id,
            generation,
            count: ids.len() as u16 - new.local_count,
            local_count: new.local_count,
            flags: new.flags,
            affinity_timeout: new.affinity_timeout,
        };
        self.maps.put(&match key {
            FeKey::V4(k) => Entry::Service(*k, value),
            FeKey::V6(k) => Entry::Service6(*k, value),
        })?;
        *writes += 1;
        if old.is_none() {
            self.svc_ids.take(svc_id);
        }
        Ok((svc_id, generation))
    }

    /// Rolls back a frontend write that failed before its switch.
    fn undo(&mut self, created: &Created, writes: &mut usize) {
        for key in &created.extras {
            if self.maps.delete(key).is_ok() {
                *writes += 1;
            }
        }
        for sk in &created.slots {
            if self.maps.delete(&Key::Slot(*sk)).is_ok() {
                *writes += 1;
            }
        }
        for id in &created.backends {
            if self.delete_backend(*id).is_ok() {
                *writes += 1;
            }
            self.backends.forget(*id);
        }
    }

    /// Deletes the slots of a generation no longer in use and drops its
    /// backend references; unreferenced backends go in collect_garbage.
    fn release(&mut self, old: &Programmed, writes: &mut usize) {
        for slot in 0..old.backend_ids.len() {
            let sk = SlotKey {
                svc_id: old.svc_id,
                generation: old.generation,
                slot: slot as u16,
            };
            if self.maps.delete(&Key::Slot(sk)).is_ok() {
                *writes += 1;
            }
        }
        for id in &old.backend_ids {
            self.backends.release(*id);
        }
    }

    fn remove_frontend(&mut self, key: &FeKey, writes: &mut usize) {
        let Some(old) = self.frontends.remove(key) else {
            return;
        };
        self.count_vip(key, old.external_addr, false);
        // The service entry first: no new flow may pick a slot being
        // deleted.
        let service = match key {
            FeKey::V4(k) => Key::Service(*k),
            FeKey::V6(k) => Key::Service6(*k),
        };
        if self.maps.delete(&service).is_ok() {
            *writes += 1;
        }
        self.release(&old, writes);
        self.delete_extras(&old, writes);
        if self.maps.delete(&Key::Name(old.svc_id)).is_ok() {
            *writes += 1;
        }
        self.names.remove(&old.svc_id);
        self.svc_ids.release(old.svc_id);
    }

    fn write_name(
        &mut self,
        svc_id: u32,
        name: &str,
        writes: &mut usize,
    ) -> Result<(), WriteError> {
        if self.names.get(&svc_id).map(String::as_str) == Some(name) {
            return Ok(());
        }
        self.maps.put(&Entry::Name(svc_id, SvcName::new(name)))?;
        *writes += 1;
        self.names.insert(svc_id, name.to_string());
        Ok(())
    }

    /// The class bits of an address: ClusterIP or external IP while a
    /// programmed frontend of that kind uses it, NodePort address, address
    /// of this node.
    fn class_of(&self, addr: &IpAddr) -> u8 {
        let mut c = 0;
        if self.vips.contains_key(&(*addr, false)) {
            c |= ADDR_CLUSTER_IP;
        }
        if self.vips.contains_key(&(*addr, true)) {
            c |= ADDR_EXTERNAL;
        }
        if self.node_addrs.nodeport.contains(addr) {
            c |= ADDR_NODEPORT;
        }
        if self.node_addrs.host.contains(addr) {
            c |= ADDR_HOST;
        }
        c
    }

    /// Re-derives the class of the addresses a sync touched.
    fn sync_addrs(&mut self, touched: &BTreeSet<IpAddr>, report: &mut SyncReport) {
        for addr in touched {
            let want = Some(self.class_of(addr)).filter(|c| *c != 0).map(class);
            if self.addrs.get(addr) == want.as_ref() {
                continue;
            }
            let result = match (want, addr) {
                (Some(v), IpAddr::V4(a)) => self.maps.put(&Entry::Addr(addr_key(*a), v)),
                (Some(v), IpAddr::V6(a)) => self.maps.put(&Entry::Addr6(addr_key6(*a), v)),
                (None, IpAddr::V4(a)) => self.maps.delete(&Key::Addr(addr_key(*a))),
                (None, IpAddr::V6(a)) => self.maps.delete(&Key::Addr6(addr_key6(*a))),
            };
            match result {
                Ok(()) => {
                    report.writes += 1;
                    match want {
                        Some(v) => self.addrs.insert(*addr, v),
                        None => self.addrs.remove(addr),
                    };
                }
                Err(e) => {
                    self.stale_addrs.insert(*addr);
                    report.failed.push((format!("address {addr}"), e))
                }
            }
        }
    }

    /// Deletes a backend's entry from the map of its family.
    fn delete_backend(&mut self, id: u32) -> Result<(), WriteError> {
        let k = BackendKey { backend_id: id };
        match self.backends.get(id) {
            Some(AnyBackend::V6(_)) => self.maps.delete(&Key::Backend6(k)),
            _ => self.maps.delete(&Key::Backend(k)),
        }
    }

    fn collect_garbage(&mut self, writes: &mut usize) {
        for key in std::mem::take(&mut self.garbage) {
            if self.maps.delete(&key).is_ok() {
                *writes += 1;
            }
        }
        for id in self.backends.take_unused() {
            if self.delete_backend(id).is_ok() {
                *writes += 1;
                self.backends.remove(id);
            }
        }
    }
}

/// The map keys of a frontend's affinity members and source ranges.
fn extra_keys(svc_id: u32, members: &BTreeSet<u32>, ranges: &BTreeSet<(IpAddr, u8)>) -> Vec<Key> {
    let members = members.iter().map(|backend_id| {
        Key::AffMember(AffMemberKey {
            svc_id,
            backend_id: *backend_id,
        })
    });
    let ranges = ranges.iter().map(|(addr, len)| match addr {
        IpAddr::V4(a) => Key::SrcRange(
            SrcRangeKey {
                svc_id: svc_id.to_be_bytes(),
                addr: a.octets(),
            },
            *len,
        ),
        IpAddr::V6(a) => Key::SrcRange6(
            SrcRangeKey6 {
                svc_id: svc_id.to_be_bytes(),
                addr: a.octets(),
            },
            *len,
        ),
    });
    members.chain(ranges).collect()
}

fn addr_key(a: std::net::Ipv4Addr) -> AddrKey {
    AddrKey { addr: a.octets() }
}

fn addr_key6(a: std::net::Ipv6Addr) -> AddrKey6 {
    AddrKey6 { addr: a.octets() }
}

fn class(class: u8) -> AddrValue {
    AddrValue {
        class,
        _pad: [0; 3],
    }
}

#[cfg(test)]
mod tests {
    use proxy_common::{Backend, IPPROTO_TCP, SVC_F_EXTERNAL, SvcKey};

    use super::*;
    use lbmap::MemLbMaps;

    fn be(last: u8, port: u16) -> Backend {
        Backend {
            addr: [10, 244, 1, last],
            port: port.to_be_bytes(),
            proto: IPPROTO_TCP,
            flags: 0,
        }
    }

    fn key(last: u8, port: u16) -> SvcKey {
        SvcKey {
            addr: [10, 96, 0, last],
            port: port.to_be_bytes(),
            proto: IPPROTO_TCP,
            _pad: 0,
        }
    }

    fn want(name: &str, backends: &[Backend]) -> FrontendWant {
        FrontendWant {
            name: name.into(),
            flags: 0,
            backends: backends.iter().map(|b| (*b).into()).collect(),
            ..Default::default()
        }
    }

    fn desired(items: &[(SvcKey, FrontendWant)]) -> Desired {
        Desired {
            frontends: items
                .iter()
                .map(|(k, w)| ((*k).into(), w.clone()))
                .collect(),
            node_addrs: BTreeSet::from([IpAddr::from([192, 168, 200, 11])]),
            ..Default::default()
        }
    }

    /// Backends a new flow to `k` can pick, read from the maps the way the
    /// datapath does: service entry, slots of its generation, backends.
    fn datapath_view(m: &MemLbMaps, k: &SvcKey) -> Option<Vec<Backend>> {
        let s = &m.state;
        let v = s.services.get(k)?;
        Some(
            (0..v.count)
                .map(|slot| {
                    let sk = SlotKey {
                        svc_id: v.svc_id,
                        generation: v.generation,
                        slot,
                    };
                    let id = s.slots[&sk].backend_id;
                    s.backends[&BackendKey { backend_id: id }]
                })
                .collect(),
        )
    }

    #[test]
    fn first_sync_writes_everything_and_second_nothing() {
        let mut s = Syncer::adopt(MemLbMaps::default()).unwrap();
        let d = desired(&[
            (key(1, 80), want("a", &[be(1, 8080), be(2, 8080)])),
            (key(2, 53), want("b", &[be(3, 53)])),
        ]);
        let r = s.sync(&d);
        assert!(r.failed.is_empty());
        assert_eq!(r.frontends_written, 2);
        let m = s.maps();
        assert_eq!(
            datapath_view(m, &key(1, 80)).unwrap(),
            vec![be(1, 8080), be(2, 8080)]
        );
        assert_eq!(datapath_view(m, &key(2, 53)).unwrap(), vec![be(3, 53)]);
        assert_eq!(
            m.state.addrs[&AddrKey {
                addr: [10, 96, 0, 1]
            }]
                .class,
            ADDR_CLUSTER_IP
        );
        assert_eq!(
            m.state.addrs[&AddrKey {
                addr: [192, 168, 200, 11]
            }]
                .class,
            ADDR_NODEPORT | ADDR_HOST
        );
        let r = s.sync(&d);
        assert_eq!(r.writes, 0, "an unchanged state must not be rewritten");
    }

    #[test]
    fn a_change_touches_only_its_frontend_and_swaps_generations() {
        let mut s = Syncer::adopt(MemLbMaps::default()).unwrap();
        s.sync(&desired(&[
            (key(1, 80), want("a", &[be(1, 8080), be(2, 8080)])),
            (key(2, 80), want("b", &[be(3, 8080)])),
        ]));
        let before = s.maps().state.services[&key(1, 80)];
        s.maps_mut().log.clear();
        let r = s.sync(&desired(&[
            (key(1, 80), want("a", &[be(2, 8080), be(4, 8080)])),
            (key(2, 80), want("b", &[be(3, 8080)])),
        ]));
        assert_eq!(r.frontends_written, 1);
        let m = s.maps();
        let after = m.state.services[&key(1, 80)];
        assert_eq!(after.svc_id, before.svc_id);
        assert_eq!(after.generation, before.generation + 1);
        assert_eq!(
            datapath_view(m, &key(1, 80)).unwrap(),
            vec![be(2, 8080), be(4, 8080)]
        );
        // Old generation gone, backend 1 (unreferenced) gone, backend 2 kept.
        assert!(
            m.state
                .slots
                .keys()
                .all(|k| k.svc_id != before.svc_id || k.generation == after.generation)
        );
        assert!(!m.state.backends.values().any(|b| *b == be(1, 8080)));
        assert!(
            m.log.iter().all(|l| !l.contains("10, 96, 0, 2")),
            "b was touched: {:?}",
            m.log
        );
        // The new backend and the new slots were written before the switch,
        // and the old slots deleted after it.
        let switch = m
            .log
            .iter()
            .position(|l| l.starts_with("put Service"))
            .unwrap();
        assert!(
            m.log[..switch]
                .iter()
                .all(|l| l.starts_with("put Backend") || l.starts_with("put Slot"))
        );
        assert!(m.log[switch + 1..].iter().all(|l| l.starts_with("delete")));
    }

    #[test]
    fn removal_deletes_service_slots_unshared_backends_and_vip() {
        let mut s = Syncer::adopt(MemLbMaps::default()).unwrap();
        s.sync(&desired(&[
            (key(1, 80), want("a", &[be(1, 8080), be(2, 8080)])),
            (key(2, 80), want("b", &[be(2, 8080)])),
        ]));
        let r = s.sync(&desired(&[(key(2, 80), want("b", &[be(2, 8080)]))]));
        assert_eq!(r.frontends_removed, 1);
        let m = &s.maps().state;
        assert!(!m.services.contains_key(&key(1, 80)));
        assert_eq!(m.slots.len(), 1);
        assert_eq!(
            m.backends.values().copied().collect::<Vec<_>>(),
            vec![be(2, 8080)]
        );
        assert!(!m.addrs.contains_key(&AddrKey {
            addr: [10, 96, 0, 1]
        }));
    }

    #[test]
    fn a_full_map_leaves_the_old_state_and_other_frontends_alone() {
        let mut maps = MemLbMaps::default();
        maps.capacity.insert(proxy_common::SLOT_MAP, 4);
        let mut s = Syncer::adopt(maps).unwrap();
        s.sync(&desired(&[(
            key(1, 80),
            want("a", &[be(1, 8080), be(2, 8080)]),
        )]));
        let before = s.maps().state.clone();
        // a would need 3 more slots next to its 2 old ones; c fits in 1.
        let r = s.sync(&desired(&[
            (
                key(1, 80),
                want("a", &[be(1, 8080), be(2, 8080), be(3, 8080)]),
            ),
            (key(3, 80), want("c", &[be(1, 8080)])),
        ]));
        assert_eq!(r.failed.len(), 1);
        assert_eq!(r.failed[0].0, "a");
        assert_eq!(r.failed[0].1.label(), "full");
        let m = s.maps();
        assert_eq!(m.state.services[&key(1, 80)], before.services[&key(1, 80)]);
        assert_eq!(
            datapath_view(m, &key(1, 80)).unwrap(),
            vec![be(1, 8080), be(2, 8080)]
        );
        assert_eq!(datapath_view(m, &key(3, 80)).unwrap(), vec![be(1, 8080)]);
        assert!(
            !m.state.backends.values().any(|b| *b == be(3, 8080)),
            "rolled back"
        );
        assert_eq!(m.state.slots.len(), 3);
    }

    #[test]
    fn adopting_pinned_state_rewrites_nothing_and_removes_stale_entries() {
        let d = desired(&[
            (key(1, 80), want("a", &[be(1, 8080), be(2, 8080)])),
            (
                SvcKey {
                    addr: [0; 4],
                    ..key(0, 30080)
                },
                FrontendWant {
                    flags: SVC_F_EXTERNAL,
                    ..want("a", &[be(1, 8080)])
                },
            ),
        ]);
        let mut first = Syncer::adopt(MemLbMaps::default()).unwrap();
        first.sync(&d);
        let mut maps = first.maps().clone();
        // Leftovers of a crash: a slot of an abandoned generation and an
        // orphan backend.
        maps.state.slots.insert(
            SlotKey {
                svc_id: 1,
                generation: 7,
                slot: 0,
            },
            SlotValue { backend_id: 1 },
        );
        maps.state
            .backends
            .insert(BackendKey { backend_id: 99 }, be(99, 1));
        maps.log.clear();
        let mut second = Syncer::adopt(maps).unwrap();
        let r = second.sync(&d);
        assert_eq!(r.frontends_written, 0);
        let m = second.maps();
        assert!(m.log.iter().all(|l| l.starts_with("delete")), "{:?}", m.log);
        assert_eq!(r.writes, 2);
        assert_eq!(m.state, first.maps().state);
    }

    #[test]
    fn service_port_ids_are_reused_with_fresh_counters_and_named() {
        let mut s = Syncer::adopt(MemLbMaps::default()).unwrap();
        s.sync(&desired(&[
            (key(1, 80), want("a", &[be(1, 80)])),
            (key(2, 80), want("b", &[be(1, 80)])),
        ]));
        let a_id = s.maps().state.services[&key(1, 80)].svc_id;
        assert_eq!(s.maps().state.names[&a_id], "a");
        s.maps_mut().log.clear();
        s.sync(&desired(&[
            (key(2, 80), want("b", &[be(1, 80)])),
            (key(3, 80), want("c", &[be(1, 80)])),
        ]));
        let m = s.maps();
        assert_eq!(
            m.state.services[&key(3, 80)].svc_id,
            a_id,
            "freed id reused"
        );
        assert_eq!(m.state.names[&a_id], "c");
        assert_eq!(m.state.names.len(), 2);
        let reset = m
            .log
            .iter()
            .position(|l| *l == format!("reset_stats {a_id}"));
        let switch = m.log.iter().position(|l| l.starts_with("put Service"));
        assert!(reset.unwrap() < switch.unwrap(), "{:?}", m.log);
    }

    #[test]
    fn apply_touches_only_the_changes_and_retries_what_failed() {
        let mut maps = MemLbMaps::default();
        maps.capacity.insert(proxy_common::BACKEND_MAP, 2);
        let mut s = Syncer::adopt(maps).unwrap();
        s.sync(&desired(&[(key(1, 80), want("a", &[be(1, 80)]))]));
        s.maps_mut().log.clear();
        // b needs two new backends but only one fits: it fails, a is untouched.
        let r = s.apply(
            &[(key(2, 80).into(), Some(want("b", &[be(2, 80), be(3, 80)])))],
            None,
        );
        assert_eq!(r.failed.len(), 1);
        assert!(s.maps().log.iter().all(|l| !l.contains("10, 96, 0, 1]")));
        assert!(!s.maps().state.addrs.contains_key(&AddrKey {
            addr: [10, 96, 0, 2]
        }));
        // Removing a frees room; the failed frontend is retried by the next
        // apply even though it did not change.
        let r = s.apply(&[(key(1, 80).into(), None)], None);
        assert_eq!(
            (r.frontends_removed, r.frontends_written),
            (1, 1),
            "{:?}",
            r.failed
        );
        assert_eq!(
            datapath_view(s.maps(), &key(2, 80)).unwrap(),
            vec![be(2, 80), be(3, 80)]
        );
        let addrs = &s.maps().state.addrs;
        assert!(!addrs.contains_key(&AddrKey {
            addr: [10, 96, 0, 1]
        }));
        assert_eq!(
            addrs[&AddrKey {
                addr: [10, 96, 0, 2]
            }]
                .class,
            ADDR_CLUSTER_IP
        );
        assert_eq!(
            addrs[&AddrKey {
                addr: [192, 168, 200, 11]
            }]
                .class,
            ADDR_NODEPORT | ADDR_HOST
        );
    }

    /// Found by control_plane_props: an address whose write failed was
    /// never written once there was room, until something touched it.
    #[test]
    fn an_address_that_did_not_fit_is_written_once_there_is_room() {
        let mut maps = MemLbMaps::default();
        maps.capacity.insert(proxy_common::ADDR_MAP, 1);
        let mut s = Syncer::adopt(maps).unwrap();
        let r = s.sync(&desired(&[(key(1, 80), want("a", &[be(1, 80)]))]));
        assert_eq!(r.failed.len(), 1, "the node address does not fit");
        s.maps_mut().capacity.clear();
        let r = s.apply(&[], None);
        assert!(r.failed.is_empty());
        assert_eq!(
            s.maps().state.addrs[&AddrKey {
                addr: [192, 168, 200, 11]
            }]
                .class,
            ADDR_NODEPORT | ADDR_HOST
        );
    }

    /// Found by control_plane_props: a service entry pinned without its
    /// address entry (a full map, or a crash between the two writes) was
    /// adopted as current, and its address never written.
    #[test]
    fn an_adopted_frontend_without_its_address_gets_it() {
        let d = desired(&[(key(1, 80), want("a", &[be(1, 80)]))]);
        let mut s = Syncer::adopt(MemLbMaps::default()).unwrap();
        s.sync(&d);
        let mut maps = s.maps().clone();
        let vip = AddrKey {
            addr: [10, 96, 0, 1],
        };
        maps.state.addrs.remove(&vip);
        let mut s = Syncer::adopt(maps).unwrap();
        let r = s.sync(&d);
        assert!(r.failed.is_empty());
        assert_eq!(s.maps().state.addrs[&vip].class, ADDR_CLUSTER_IP);
    }

    #[test]
    fn no_ready_endpoint_is_a_service_with_zero_slots() {
        let mut s = Syncer::adopt(MemLbMaps::default()).unwrap();
        s.sync(&desired(&[(key(1, 80), want("a", &[]))]));
        assert_eq!(s.maps().state.services[&key(1, 80)].count, 0);
    }
    /// An externalIP frontend with every extra: local set, affinity,
    /// source ranges.
    fn rich(backends: &[Backend], local: &[Backend], ranges: &[([u8; 4], u8)]) -> FrontendWant {
        FrontendWant {
            name: "x".into(),
            flags: proxy_common::SVC_F_EXTERNAL
                | proxy_common::SVC_F_ETP_LOCAL
                | SVC_F_AFFINITY
                | SVC_F_SRC_RANGES,
            backends: backends.iter().map(|b| (*b).into()).collect(),
            local_backends: local.iter().map(|b| (*b).into()).collect(),
            affinity_timeout: 30,
            source_ranges: ranges.iter().map(|(a, l)| (IpAddr::from(*a), *l)).collect(),
            external_addr: true,
        }
    }

    #[test]
    fn local_sets_affinity_members_and_source_ranges_follow_the_frontend() {
        let mut s = Syncer::adopt(MemLbMaps::default()).unwrap();
        let lb = SvcKey {
            addr: [192, 168, 200, 11],
            ..key(0, 443)
        };
        let r1 = ([10, 0, 0, 0], 8);
        let mut d = desired(&[(lb, rich(&[be(1, 80), be(2, 80)], &[be(2, 80)], &[r1]))]);
        d.host_addrs = BTreeSet::from([IpAddr::from([192, 168, 200, 12])]);
        assert!(s.sync(&d).failed.is_empty());
        let st = &s.maps().state;
        let v = st.services[&lb];
        assert_eq!((v.count, v.local_count, v.affinity_timeout), (2, 1, 30));
        let local_slot = SlotKey {
            svc_id: v.svc_id,
            generation: v.generation,
            slot: 2,
        };
        let local_id = st.slots[&local_slot].backend_id;
        assert_eq!(
            st.backends[&BackendKey {
                backend_id: local_id
            }],
            be(2, 80)
        );
        assert_eq!(st.members.len(), 2, "one member per distinct backend");
        assert_eq!(
            st.ranges
                .iter()
                .map(|(k, l)| (k.addr, *l))
                .collect::<Vec<_>>(),
            [r1]
        );
        // An LB IP that is a node address, and another node address.
        let class_of = |a: [u8; 4]| st.addrs[&AddrKey { addr: a }].class;
        assert_eq!(
            class_of([192, 168, 200, 11]),
            ADDR_EXTERNAL | ADDR_NODEPORT | ADDR_HOST
        );
        assert_eq!(class_of([192, 168, 200, 12]), ADDR_HOST);

        // Backend 1 leaves, a range changes: members and ranges follow.
        let r2 = ([172, 16, 0, 0], 12);
        d.frontends
            .insert(lb.into(), rich(&[be(2, 80)], &[be(2, 80)], &[r2]));
        assert!(s.sync(&d).failed.is_empty());
        let st = &s.maps().state;
        assert_eq!(st.members.len(), 1);
        assert_eq!(
            st.ranges
                .iter()
                .map(|(k, l)| (k.addr, *l))
                .collect::<Vec<_>>(),
            [r2]
        );
        assert_eq!(s.sync(&d).writes, 0, "unchanged: nothing rewritten");

        // A restart adopts all of it without a write.
        let maps = s.maps().clone();
        let mut again = Syncer::adopt(maps).unwrap();
        assert_eq!(again.sync(&d).writes, 0);

        // Gone: everything of it goes.
        d.frontends.clear();
        again.sync(&d);
        let st = &again.maps().state;
        assert!(st.members.is_empty() && st.ranges.is_empty() && st.services.is_empty());
        assert_eq!(
            st.addrs[&AddrKey {
                addr: [192, 168, 200, 11]
            }]
                .class,
            ADDR_NODEPORT | ADDR_HOST
        );
    }

    fn be6(last: u8) -> AnyBackend {
        AnyBackend::new(
            format!("fd00:10:244:1::{last}").parse().unwrap(),
            8080,
            IPPROTO_TCP,
            0,
        )
    }

    fn key6(addr: &str, port: u16) -> FeKey {
        FeKey::new(addr.parse().unwrap(), port, IPPROTO_TCP)
    }

    #[test]
    fn ipv6_frontends_are_told_from_the_last_key() {
        let mut s = Syncer::adopt(MemLbMaps::default()).unwrap();
        assert!(!s.has_ipv6_frontends(), "empty");
        let mut d = desired(&[(key(1, 80), want("a", &[be(1, 8080)]))]);
        assert!(s.sync(&d).failed.is_empty());
        assert!(!s.has_ipv6_frontends(), "IPv4 only");
        let vip6 = key6("fd00::10", 80);
        d.frontends.insert(vip6, want("a6", &[]));
        assert!(s.sync(&d).failed.is_empty());
        assert!(s.has_ipv6_frontends(), "beside IPv4");
        d.frontends.remove(&vip6);
        assert!(s.sync(&d).failed.is_empty());
        assert!(!s.has_ipv6_frontends(), "removed again");
    }

    /// Both families in one syncer: one id space, each family's own
    /// service, backend, address and source-range maps; a restart adopts
    /// them; removal leaves nothing.
    #[test]
    fn ipv6_frontends_go_to_the_ipv6_maps_beside_ipv4_ones() {
        let mut s = Syncer::adopt(MemLbMaps::default()).unwrap();
        let mut d = desired(&[(key(1, 80), want("a", &[be(1, 8080)]))]);
        let vip6 = key6("fd00::10", 80);
        let np6 = key6("::", 30080);
        let lb6 = key6("2001:db8::9", 80);
        d.frontends.insert(
            vip6,
            FrontendWant {
                name: "a6".into(),
                backends: vec![be6(1), be6(2)],
                ..Default::default()
            },
        );
        d.frontends.insert(
            np6,
            FrontendWant {
                name: "a6".into(),
                flags: SVC_F_EXTERNAL,
                backends: vec![be6(1)],
                ..Default::default()
            },
        );
        d.frontends.insert(
            lb6,
            FrontendWant {
                name: "a6".into(),
                flags: SVC_F_EXTERNAL | SVC_F_SRC_RANGES | SVC_F_AFFINITY,
                backends: vec![be6(2)],
                affinity_timeout: 5,
                source_ranges: vec![("2001:db8:1::".parse().unwrap(), 48)],
                external_addr: true,
                ..Default::default()
            },
        );
        let node6: IpAddr = "fd00:200::11".parse().unwrap();
        d.node_addrs.insert(node6);
        let r = s.sync(&d);
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        let st = &s.maps().state;
        assert_eq!((st.services.len(), st.services6.len()), (1, 3));
        assert_eq!((st.backends.len(), st.backends6.len()), (1, 2));
        let ids: BTreeSet<u32> = st
            .services
            .values()
            .chain(st.services6.values())
            .map(|v| v.svc_id)
            .collect();
        assert_eq!(ids.len(), 4, "one id space for both families");
        let ids: BTreeSet<u32> = st
            .backends
            .keys()
            .chain(st.backends6.keys())
            .map(|k| k.backend_id)
            .collect();
        assert_eq!(ids.len(), 3, "one backend id space");
        let class6 = |a: &str| {
            st.addrs6[&AddrKey6 {
                addr: a.parse::<std::net::Ipv6Addr>().unwrap().octets(),
            }]
                .class
        };
        assert_eq!(class6("fd00::10"), ADDR_CLUSTER_IP);
        assert_eq!(class6("2001:db8::9"), ADDR_EXTERNAL);
        assert_eq!(class6("fd00:200::11"), ADDR_NODEPORT | ADDR_HOST);
        assert_eq!(st.addrs6.len(), 3, "no entry for ::");
        assert_eq!(st.ranges6.len(), 1);
        assert!(st.ranges.is_empty());
        assert_eq!(st.members.len(), 1);
        // The slots of the IPv6 ClusterIP name IPv6 backends.
        let v = st.services6[&match vip6 {
            FeKey::V6(k) => k,
            _ => unreachable!(),
        }];
        for slot in 0..v.count {
            let sk = SlotKey {
                svc_id: v.svc_id,
                generation: v.generation,
                slot,
            };
            let id = st.slots[&sk].backend_id;
            assert!(st.backends6.contains_key(&BackendKey { backend_id: id }));
        }
        assert_eq!(s.entry_counts()[1], (proxy_common::SVC6_MAP, 3));
        assert_eq!(s.sync(&d).writes, 0, "unchanged: nothing rewritten");

        // A restart adopts both families without a write.
        let mut again = Syncer::adopt(s.maps().clone()).unwrap();
        assert_eq!(again.sync(&d).writes, 0);

        // The IPv6 frontends go; IPv4 stays untouched.
        d.frontends.retain(|k, _| matches!(k, FeKey::V4(_)));
        d.node_addrs.remove(&node6);
        again.sync(&d);
        let st = &again.maps().state;
        assert!(st.services6.is_empty() && st.backends6.is_empty() && st.addrs6.is_empty());
        assert!(st.ranges6.is_empty() && st.members.is_empty());
        assert_eq!(
            (st.services.len(), st.backends.len(), st.slots.len()),
            (1, 1, 1)
        );
    }
}
