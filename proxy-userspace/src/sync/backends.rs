//! Backend ids and their references, and service port ids.
//!
//! A backend (address, port, protocol, flags) has one id and one entry in
//! `KEP_BE_V1` (or `KEP_BE6_V1` for IPv6: one id space for both families),
//! whatever number of slots refer to it; the entry is deleted once no slot
//! does. Service port ids index the per-service counter array,
//! so they are reused, lowest first, to stay below its size.

use std::collections::{BTreeMap, BTreeSet};

use proxy_common::SVC_ID_LIMIT;

use super::AnyBackend;

/// The backends in the map, by value and by id, with how many slots refer
/// to each.
#[derive(Debug)]
pub struct Backends {
    ids: BTreeMap<AnyBackend, u32>,
    by_id: BTreeMap<u32, AnyBackend>,
    refs: BTreeMap<u32, usize>,
    /// Backends whose last reference went away (or that were adopted with
    /// none): checked by [`Backends::take_unused`].
    unreferenced: BTreeSet<u32>,
    next_id: u32,
}

impl Default for Backends {
    fn default() -> Self {
        Backends {
            ids: BTreeMap::new(),
            by_id: BTreeMap::new(),
            refs: BTreeMap::new(),
            unreferenced: BTreeSet::new(),
            // Id 0 is never given.
            next_id: 1,
        }
    }
}

impl Backends {
    /// A backend found in the pins, with no reference yet.
    pub fn adopt(&mut self, id: u32, b: AnyBackend) {
        self.by_id.insert(id, b);
        self.refs.insert(id, 0);
        // Two ids for one backend (should not happen): the later one is
        // garbage once unreferenced.
        self.ids.entry(b).or_insert(id);
        self.next_id = self.next_id.max(id + 1);
    }

    /// After adoption: every backend no adopted slot refers to is a
    /// candidate for deletion.
    pub fn mark_unreferenced(&mut self) {
        self.unreferenced = self
            .refs
            .iter()
            .filter(|(_, r)| **r == 0)
            .map(|(id, _)| *id)
            .collect();
    }

    pub fn contains(&self, id: u32) -> bool {
        self.by_id.contains_key(&id)
    }

    pub fn get(&self, id: u32) -> Option<&AnyBackend> {
        self.by_id.get(&id)
    }

    pub fn id_of(&self, b: &AnyBackend) -> Option<u32> {
        self.ids.get(b).copied()
    }

    /// The id the next new backend gets (ids are never reused while the
    /// daemon runs).
    pub fn next_id(&self) -> u32 {
        self.next_id
    }

    /// Records a backend just written under [`Backends::next_id`].
    pub fn insert_new(&mut self, b: AnyBackend) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        self.ids.insert(b, id);
        self.by_id.insert(id, b);
        self.refs.insert(id, 0);
        id
    }

    /// Forgets a backend whose write was rolled back.
    pub fn forget(&mut self, id: u32) {
        if let Some(b) = self.by_id.remove(&id) {
            self.ids.remove(&b);
        }
        self.refs.remove(&id);
    }

    /// A slot now refers to `id`.
    pub fn add_ref(&mut self, id: u32) {
        *self.refs.entry(id).or_default() += 1;
    }

    /// A slot no longer refers to `id`.
    pub fn release(&mut self, id: u32) {
        if let Some(r) = self.refs.get_mut(&id) {
            *r = r.saturating_sub(1);
            if *r == 0 {
                self.unreferenced.insert(id);
            }
        }
    }

    /// Backends that lost their last reference and got none since: their
    /// entries can go.
    pub fn take_unused(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.unreferenced)
            .into_iter()
            .filter(|id| self.refs.get(id) == Some(&0))
            .collect()
    }

    /// Drops a backend whose entry was deleted.
    pub fn remove(&mut self, id: u32) {
        self.refs.remove(&id);
        if let Some(b) = self.by_id.remove(&id)
            && self.ids.get(&b) == Some(&id)
        {
            self.ids.remove(&b);
        }
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// How many are IPv4 backends.
    pub fn count_v4(&self) -> usize {
        self.by_id.values().filter(|b| b.is_v4()).count()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// Service port ids: reused, lowest first, so they stay below
/// [`SVC_ID_LIMIT`], the size of the per-service counter array.
#[derive(Debug)]
pub struct ServicePortIds {
    free: BTreeSet<u32>,
    next: u32,
}

impl Default for ServicePortIds {
    fn default() -> Self {
        ServicePortIds {
            free: BTreeSet::new(),
            next: 1,
        }
    }
}

impl ServicePortIds {
    /// The ids adopted frontends use; the others below them are free.
    pub fn adopt(&mut self, used: &BTreeSet<u32>) {
        self.next = used.last().map_or(1, |max| max + 1);
        self.free = (1..self.next).filter(|id| !used.contains(id)).collect();
    }

    /// The id a new frontend would get; None when every id is in use.
    pub fn peek(&self) -> Option<u32> {
        match self.free.first() {
            Some(id) => Some(*id),
            None if self.next < SVC_ID_LIMIT => Some(self.next),
            None => None,
        }
    }

    /// Takes the id [`ServicePortIds::peek`] gave.
    pub fn take(&mut self, id: u32) {
        if !self.free.remove(&id) {
            self.next += 1;
        }
    }

    pub fn release(&mut self, id: u32) {
        self.free.insert(id);
    }
}
