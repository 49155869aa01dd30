//! Starting from what a previous run left in the pinned maps.
//!
//! Frontends, their slots and backends are taken over as they are, so the
//! first sync rewrites only what differs from the desired state and a
//! restart does not disturb traffic. What nothing refers to (slots of an
//! old generation, names of a gone service port, unreferenced backends) is
//! deleted at the first sync; every pinned address class, and the class of
//! every adopted frontend's address, is re-derived then.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use proxy_common::{ADDR_CLUSTER_IP, ADDR_EXTERNAL, AddrValue, SlotKey, SvcValue};

use super::{
    AnyBackend, FeKey, Programmed, Syncer,
    lbmap::{Key, LbMaps, MapContents},
};

impl<M: LbMaps> Syncer<M> {
    /// Starts from what is in the maps already.
    pub fn adopt(maps: M) -> anyhow::Result<Self> {
        let pinned = maps.read_all()?;
        let mut s = Syncer::empty(maps);
        s.addrs = pinned_addrs(&pinned);
        for (k, b) in &pinned.backends {
            s.backends.adopt(k.backend_id, AnyBackend::V4(*b));
        }
        for (k, b) in &pinned.backends6 {
            s.backends.adopt(k.backend_id, AnyBackend::V6(*b));
        }
        let live_slots = s.adopt_frontends(&pinned);
        s.adopt_extras(&pinned);
        for sk in pinned.slots.keys() {
            if !live_slots.contains(sk) {
                s.garbage.push(Key::Slot(*sk));
            }
        }
        s.backends.mark_unreferenced();
        // Every pinned address is re-derived at the first sync, and so is
        // every adopted VIP: the previous run may have died (or found the
        // map full) between a service entry and its address entry.
        s.stale_addrs = s.addrs.keys().copied().collect();
        s.stale_addrs.extend(s.vips.keys().map(|(addr, _)| *addr));
        let used: BTreeSet<u32> = s.frontends.values().map(|p| p.svc_id).collect();
        s.svc_ids.adopt(&used);
        for (id, name) in pinned.names {
            if used.contains(&id) {
                s.names.insert(id, name);
            } else {
                s.garbage.push(Key::Name(id));
            }
        }
        Ok(s)
    }

    /// Takes over every pinned service entry with the backends of its
    /// current generation; returns the slots in use.
    fn adopt_frontends(&mut self, pinned: &MapContents) -> BTreeSet<SlotKey> {
        let mut live_slots = BTreeSet::new();
        let addrs = pinned_addrs(pinned);
        let services = pinned.services.iter().map(|(k, v)| (FeKey::V4(*k), v));
        let services6 = pinned.services6.iter().map(|(k, v)| (FeKey::V6(*k), v));
        for (key, v) in services.chain(services6) {
            let backend_ids = self.adopt_slots(&key, v, pinned, &mut live_slots);
            // An external IP's address has the external class alone (a
            // ClusterIP's may have it too, if both share it).
            let external_addr = addrs
                .get(&key.addr())
                .is_some_and(|c| c.class & (ADDR_EXTERNAL | ADDR_CLUSTER_IP) == ADDR_EXTERNAL);
            self.frontends.insert(
                key,
                Programmed {
                    svc_id: v.svc_id,
                    generation: v.generation,
                    flags: v.flags,
                    backend_ids,
                    local_count: v.local_count,
                    affinity_timeout: v.affinity_timeout,
                    external_addr,
                    ..Programmed::default()
                },
            );
            if key.is_vip() {
                *self.vips.entry((key.addr(), external_addr)).or_default() += 1;
            }
        }
        live_slots
    }

    /// The backend ids of a service entry's slots, each referenced once (a
    /// backend of the other family counts as a hole).
    fn adopt_slots(
        &mut self,
        key: &FeKey,
        v: &SvcValue,
        pinned: &MapContents,
        live_slots: &mut BTreeSet<SlotKey>,
    ) -> Vec<u32> {
        // A hole (missing slot or backend) becomes u32::MAX, which never
        // matches a wanted backend: the frontend is rewritten at the next
        // sync, and its old slots are deleted then.
        let slot_count = v.count.saturating_add(v.local_count);
        let mut ids = Vec::with_capacity(slot_count as usize);
        for slot in 0..slot_count {
            let sk = SlotKey {
                svc_id: v.svc_id,
                generation: v.generation,
                slot,
            };
            match pinned.slots.get(&sk) {
                Some(sv)
                    if self
                        .backends
                        .get(sv.backend_id)
                        .is_some_and(|b| b.is_v4() == matches!(key, FeKey::V4(_))) =>
                {
                    ids.push(sv.backend_id);
                    self.backends.add_ref(sv.backend_id);
                    live_slots.insert(sk);
                }
                _ => ids.push(u32::MAX),
            }
        }
        ids
    }

    /// Affinity members and source ranges found in the pins: kept with
    /// their frontend, garbage without one.
    fn adopt_extras(&mut self, pinned: &MapContents) {
        let by_id: BTreeMap<u32, FeKey> =
            self.frontends.iter().map(|(k, p)| (p.svc_id, *k)).collect();
        for m in &pinned.members {
            match by_id.get(&m.svc_id).and_then(|k| self.frontends.get_mut(k)) {
                Some(p) => {
                    p.members.insert(m.backend_id);
                }
                None => self.garbage.push(Key::AffMember(*m)),
            }
        }
        for (r, len) in &pinned.ranges {
            let svc_id = u32::from_be_bytes(r.svc_id);
            match by_id.get(&svc_id).and_then(|k| self.frontends.get_mut(k)) {
                Some(p) => {
                    p.ranges.insert((IpAddr::V4(Ipv4Addr::from(r.addr)), *len));
                }
                None => self.garbage.push(Key::SrcRange(*r, *len)),
            }
        }
        for (r, len) in &pinned.ranges6 {
            let svc_id = u32::from_be_bytes(r.svc_id);
            match by_id.get(&svc_id).and_then(|k| self.frontends.get_mut(k)) {
                Some(p) => {
                    p.ranges.insert((IpAddr::V6(Ipv6Addr::from(r.addr)), *len));
                }
                None => self.garbage.push(Key::SrcRange6(*r, *len)),
            }
        }
    }
}

/// The address classes of both families, by address.
fn pinned_addrs(pinned: &MapContents) -> BTreeMap<IpAddr, AddrValue> {
    let v4 = pinned
        .addrs
        .iter()
        .map(|(k, v)| (IpAddr::V4(Ipv4Addr::from(k.addr)), *v));
    let v6 = pinned
        .addrs6
        .iter()
        .map(|(k, v)| (IpAddr::V6(Ipv6Addr::from(k.addr)), *v));
    v4.chain(v6).collect()
}
