//! The one narrow interface through which load-balancing state reaches the
//! kernel: put or delete single entries of the desired-state maps, and read
//! them all back (to adopt what a previous run left pinned). The IPv6 maps
//! have entries of their own (`Service6`...); the maps without addresses
//! serve both families.
//!
//! [`BpfLbMaps`] writes the real maps; [`MemLbMaps`] keeps them in memory,
//! optionally with capacities, so the syncer is tested without root.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;

use crate::datapath::filters::{ProbeFilters, Rebuilt};
use aya::maps::{
    HashMap, MapData, MapError, PerCpuArray, PerCpuValues,
    lpm_trie::{Key as LpmKey, LpmTrie},
};
use proxy_common::{
    ADDR_MAP, ADDR6_MAP, AFFMEM_MAP, AddrKey, AddrKey6, AddrValue, AffMemberKey, BACKEND_MAP,
    BACKEND6_MAP, Backend, Backend6, BackendKey, NAME_MAP, SLOT_MAP, SRCRNG_MAP, SRCRNG6_MAP,
    SVC_MAP, SVC_STATS_MAP, SVC6_MAP, SlotKey, SlotValue, SrcRangeKey, SrcRangeKey6, SvcKey,
    SvcKey6, SvcName, SvcStats, SvcValue,
};

/// One entry of a desired-state map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    Service(SvcKey, SvcValue),
    Slot(SlotKey, SlotValue),
    Backend(BackendKey, Backend),
    Addr(AddrKey, AddrValue),
    /// The name of a service port id.
    Name(u32, SvcName),
    /// A backend an affinity frontend may keep its clients on.
    AffMember(AffMemberKey),
    /// A source range of a service port: the key and the prefix length of
    /// its address.
    SrcRange(SrcRangeKey, u8),
    Service6(SvcKey6, SvcValue),
    Backend6(BackendKey, Backend6),
    Addr6(AddrKey6, AddrValue),
    SrcRange6(SrcRangeKey6, u8),
}

/// The key of one entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    Service(SvcKey),
    Slot(SlotKey),
    Backend(BackendKey),
    Addr(AddrKey),
    Name(u32),
    AffMember(AffMemberKey),
    SrcRange(SrcRangeKey, u8),
    Service6(SvcKey6),
    Backend6(BackendKey),
    Addr6(AddrKey6),
    SrcRange6(SrcRangeKey6, u8),
}

impl Entry {
    pub fn key(&self) -> Key {
        match self {
            Entry::Service(k, _) => Key::Service(*k),
            Entry::Slot(k, _) => Key::Slot(*k),
            Entry::Backend(k, _) => Key::Backend(*k),
            Entry::Addr(k, _) => Key::Addr(*k),
            Entry::Name(id, _) => Key::Name(*id),
            Entry::AffMember(k) => Key::AffMember(*k),
            Entry::SrcRange(k, len) => Key::SrcRange(*k, *len),
            Entry::Service6(k, _) => Key::Service6(*k),
            Entry::Backend6(k, _) => Key::Backend6(*k),
            Entry::Addr6(k, _) => Key::Addr6(*k),
            Entry::SrcRange6(k, len) => Key::SrcRange6(*k, *len),
        }
    }
}

impl Key {
    pub fn map_name(&self) -> &'static str {
        match self {
            Key::Service(_) => SVC_MAP,
            Key::Slot(_) => SLOT_MAP,
            Key::Backend(_) => BACKEND_MAP,
            Key::Addr(_) => ADDR_MAP,
            Key::Name(_) => NAME_MAP,
            Key::AffMember(_) => AFFMEM_MAP,
            Key::SrcRange(..) => SRCRNG_MAP,
            Key::Service6(_) => SVC6_MAP,
            Key::Backend6(_) => BACKEND6_MAP,
            Key::Addr6(_) => ADDR6_MAP,
            Key::SrcRange6(..) => SRCRNG6_MAP,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("map {map} is full")]
    Full { map: &'static str },
    #[error("writing map {map}: {source}")]
    Other {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl WriteError {
    pub fn map(&self) -> &'static str {
        match self {
            WriteError::Full { map } | WriteError::Other { map, .. } => map,
        }
    }

    /// Label for the map-write-failure metric.
    pub fn label(&self) -> &'static str {
        match self {
            WriteError::Full { .. } => "full",
            WriteError::Other { .. } => "error",
        }
    }
}

/// Everything in the desired-state maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    pub services: BTreeMap<SvcKey, SvcValue>,
    pub slots: BTreeMap<SlotKey, SlotValue>,
    pub backends: BTreeMap<BackendKey, Backend>,
    pub addrs: BTreeMap<AddrKey, AddrValue>,
    pub names: BTreeMap<u32, String>,
    pub members: BTreeSet<AffMemberKey>,
    pub ranges: BTreeSet<(SrcRangeKey, u8)>,
    pub services6: BTreeMap<SvcKey6, SvcValue>,
    pub backends6: BTreeMap<BackendKey, Backend6>,
    pub addrs6: BTreeMap<AddrKey6, AddrValue>,
    pub ranges6: BTreeSet<(SrcRangeKey6, u8)>,
}

pub trait LbMaps {
    fn put(&mut self, entry: &Entry) -> Result<(), WriteError>;
    /// Deleting an absent key is not an error.
    fn delete(&mut self, key: &Key) -> Result<(), WriteError>;
    /// Zeroes the traffic counters of a service port id about to be
    /// (re)used, so a new service does not inherit an old one's counts.
    fn reset_stats(&mut self, svc_id: u32) -> Result<(), WriteError>;
    /// Every entry (what a previous run left, at adoption).
    fn read_all(&self) -> anyhow::Result<MapContents>;
}

/// The real maps.
pub struct BpfLbMaps {
    services: HashMap<MapData, SvcKey, SvcValue>,
    slots: HashMap<MapData, SlotKey, SlotValue>,
    backends: HashMap<MapData, BackendKey, Backend>,
    addrs: HashMap<MapData, AddrKey, AddrValue>,
    names: HashMap<MapData, u32, SvcName>,
    stats: PerCpuArray<MapData, SvcStats>,
    members: HashMap<MapData, AffMemberKey, u8>,
    ranges: LpmTrie<MapData, SrcRangeKey, u8>,
    services6: HashMap<MapData, SvcKey6, SvcValue>,
    backends6: HashMap<MapData, BackendKey, Backend6>,
    addrs6: HashMap<MapData, AddrKey6, AddrValue>,
    ranges6: LpmTrie<MapData, SrcRangeKey6, u8>,
    /// Their bits are set before an address or a backend is written.
    filters: ProbeFilters,
}

fn lpm_key(k: &SrcRangeKey, len: u8) -> LpmKey<SrcRangeKey> {
    LpmKey::new(SrcRangeKey::prefix_len(len), *k)
}

fn lpm_key6(k: &SrcRangeKey6, len: u8) -> LpmKey<SrcRangeKey6> {
    LpmKey::new(SrcRangeKey6::prefix_len(len), *k)
}

/// Every (key, range length) of a source-range trie.
fn trie_keys<K: aya::Pod + Ord>(
    trie: &LpmTrie<MapData, K, u8>,
    max_len: u32,
) -> anyhow::Result<BTreeSet<(K, u8)>> {
    let mut out = BTreeSet::new();
    for k in trie.keys() {
        let k = k?;
        let len = k.prefix_len().saturating_sub(32).min(max_len) as u8;
        out.insert((k.data(), len));
    }
    Ok(out)
}

impl BpfLbMaps {
    pub fn new(dp: &mut crate::datapath::Datapath) -> anyhow::Result<Self> {
        Ok(BpfLbMaps {
            services: dp.map(SVC_MAP)?,
            slots: dp.map(SLOT_MAP)?,
            backends: dp.map(BACKEND_MAP)?,
            addrs: dp.map(ADDR_MAP)?,
            names: dp.map(NAME_MAP)?,
            stats: dp.map(SVC_STATS_MAP)?,
            members: dp.map(AFFMEM_MAP)?,
            ranges: dp.map(SRCRNG_MAP)?,
            services6: dp.map(SVC6_MAP)?,
            backends6: dp.map(BACKEND6_MAP)?,
            addrs6: dp.map(ADDR6_MAP)?,
            ranges6: dp.map(SRCRNG6_MAP)?,
            filters: dp.take_filters()?,
        })
    }

    /// How many bits each probe filter has set (addresses, endpoints).
    pub fn filter_bits(&self) -> (u32, u32) {
        self.filters.bits_set()
    }

    /// Whether the probe filters have filled enough to be rebuilt
    /// ([`ProbeFilters::rebuild_due`]).
    pub fn filter_rebuild_due(&self) -> bool {
        self.filters.rebuild_due()
    }

    /// Rebuilds the probe filters from the pins under `maps_dir`
    /// ([`ProbeFilters::rebuild`]).
    pub fn rebuild_filters(&mut self, maps_dir: &Path) -> anyhow::Result<Rebuilt> {
        self.filters.rebuild(maps_dir)
    }

    /// The probe filters' bits of an address or a backend, set before it
    /// is written: the datapath looks up only what has its bit.
    fn set_filter_bits(&mut self, entry: &Entry) -> Result<(), WriteError> {
        let set = match entry {
            Entry::Addr(k, _) => self.filters.add_addr(IpAddr::from(k.addr)),
            Entry::Addr6(k, _) => self.filters.add_addr(IpAddr::from(k.addr)),
            Entry::Backend(_, b) => self.filters.add_endpoint(IpAddr::from(b.addr), b.port),
            Entry::Backend6(_, b) => self.filters.add_endpoint(IpAddr::from(b.addr), b.port),
            _ => return Ok(()),
        };
        set.map_err(|e| WriteError::Other {
            map: entry.key().map_name(),
            source: std::io::Error::other(format!("{e:#}")),
        })
    }

    /// Traffic counters of a service port, summed over CPUs.
    pub fn service_stats(&self, svc_id: u32) -> anyhow::Result<SvcStats> {
        Ok(SvcStats::sum(self.stats.get(&svc_id, 0)?.iter()))
    }
}

fn write_error(map: &'static str, e: MapError) -> WriteError {
    match e {
        MapError::SyscallError(s) => {
            // The kernel answers E2BIG when a hash map has max_entries
            // elements, ENOMEM when it cannot allocate one.
            match s.io_error.raw_os_error() {
                Some(libc::E2BIG) | Some(libc::ENOMEM) => WriteError::Full { map },
                _ => WriteError::Other {
                    map,
                    source: s.io_error,
                },
            }
        }
        other => WriteError::Other {
            map,
            source: std::io::Error::other(other.to_string()),
        },
    }
}

fn ignore_missing(map: &'static str, r: Result<(), MapError>) -> Result<(), WriteError> {
    match r {
        Ok(()) => Ok(()),
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(s)) if s.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(write_error(map, e)),
    }
}

fn collect<K: aya::Pod + Ord, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
) -> anyhow::Result<BTreeMap<K, V>> {
    let mut out = BTreeMap::new();
    for item in map.iter() {
        let (k, v) = item?;
        out.insert(k, v);
    }
    Ok(out)
}

impl LbMaps for BpfLbMaps {
    fn put(&mut self, entry: &Entry) -> Result<(), WriteError> {
        let map = entry.key().map_name();
        self.set_filter_bits(entry)?;
        match entry {
            Entry::Service(k, v) => self.services.insert(k, v, 0),
            Entry::Slot(k, v) => self.slots.insert(k, v, 0),
            Entry::Backend(k, v) => self.backends.insert(k, v, 0),
            Entry::Addr(k, v) => self.addrs.insert(k, v, 0),
            Entry::Name(k, v) => self.names.insert(k, v, 0),
            Entry::AffMember(k) => self.members.insert(k, 1, 0),
            Entry::SrcRange(k, len) => self.ranges.insert(&lpm_key(k, *len), 1, 0),
            Entry::Service6(k, v) => self.services6.insert(k, v, 0),
            Entry::Backend6(k, v) => self.backends6.insert(k, v, 0),
            Entry::Addr6(k, v) => self.addrs6.insert(k, v, 0),
            Entry::SrcRange6(k, len) => self.ranges6.insert(&lpm_key6(k, *len), 1, 0),
        }
        .map_err(|e| write_error(map, e))
    }

    fn delete(&mut self, key: &Key) -> Result<(), WriteError> {
        let map = key.map_name();
        let r = match key {
            Key::Service(k) => self.services.remove(k),
            Key::Slot(k) => self.slots.remove(k),
            Key::Backend(k) => self.backends.remove(k),
            Key::Addr(k) => self.addrs.remove(k),
            Key::Name(k) => self.names.remove(k),
            Key::AffMember(k) => self.members.remove(k),
            Key::SrcRange(k, len) => self.ranges.remove(&lpm_key(k, *len)),
            Key::Service6(k) => self.services6.remove(k),
            Key::Backend6(k) => self.backends6.remove(k),
            Key::Addr6(k) => self.addrs6.remove(k),
            Key::SrcRange6(k, len) => self.ranges6.remove(&lpm_key6(k, *len)),
        };
        ignore_missing(map, r)
    }

    fn reset_stats(&mut self, svc_id: u32) -> Result<(), WriteError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| WriteError::Other {
            map: SVC_STATS_MAP,
            source: e,
        })?;
        let zeros = PerCpuValues::try_from(vec![SvcStats::default(); cpus]).map_err(|e| {
            WriteError::Other {
                map: SVC_STATS_MAP,
                source: e,
            }
        })?;
        self.stats
            .set(svc_id, zeros, 0)
            .map_err(|e| write_error(SVC_STATS_MAP, e))
    }

    fn read_all(&self) -> anyhow::Result<MapContents> {
        Ok(MapContents {
            services: collect(&self.services)?,
            slots: collect(&self.slots)?,
            backends: collect(&self.backends)?,
            addrs: collect(&self.addrs)?,
            names: collect(&self.names)?
                .into_iter()
                .map(|(id, n)| (id, n.as_str().to_string()))
                .collect(),
            members: self.members.keys().collect::<Result<_, _>>()?,
            ranges: trie_keys(&self.ranges, 32)?,
            services6: collect(&self.services6)?,
            backends6: collect(&self.backends6)?,
            addrs6: collect(&self.addrs6)?,
            ranges6: trie_keys(&self.ranges6, 128)?,
        })
    }
}

/// In-memory maps with optional capacities, for tests.
#[derive(Clone, Debug, Default)]
pub struct MemLbMaps {
    pub state: MapContents,
    /// Capacity per map name; absent means unlimited.
    pub capacity: BTreeMap<&'static str, usize>,
    /// Every write, in order, for tests that check ordering.
    pub log: Vec<String>,
}

impl MemLbMaps {
    fn check(&self, map: &'static str, len: usize, exists: bool) -> Result<(), WriteError> {
        match self.capacity.get(map) {
            Some(cap) if !exists && len >= *cap => Err(WriteError::Full { map }),
            _ => Ok(()),
        }
    }
}

impl LbMaps for MemLbMaps {
    fn put(&mut self, entry: &Entry) -> Result<(), WriteError> {
        let map = entry.key().map_name();
        let s = &self.state;
        match entry {
            Entry::Service(k, _) => {
                self.check(map, s.services.len(), s.services.contains_key(k))?
            }
            Entry::Slot(k, _) => self.check(map, s.slots.len(), s.slots.contains_key(k))?,
            Entry::Backend(k, _) => {
                self.check(map, s.backends.len(), s.backends.contains_key(k))?
            }
            Entry::Addr(k, _) => self.check(map, s.addrs.len(), s.addrs.contains_key(k))?,
            Entry::AffMember(k) => self.check(map, s.members.len(), s.members.contains(k))?,
            Entry::SrcRange(k, len) => {
                let exists = s.ranges.contains(&(*k, *len));
                self.check(map, s.ranges.len(), exists)?
            }
            Entry::Service6(k, _) => {
                self.check(map, s.services6.len(), s.services6.contains_key(k))?
            }
            Entry::Backend6(k, _) => {
                self.check(map, s.backends6.len(), s.backends6.contains_key(k))?
            }
            Entry::Addr6(k, _) => self.check(map, s.addrs6.len(), s.addrs6.contains_key(k))?,
            Entry::SrcRange6(k, len) => {
                let exists = s.ranges6.contains(&(*k, *len));
                self.check(map, s.ranges6.len(), exists)?
            }
            Entry::Name(..) => {}
        }
        let s = &mut self.state;
        match entry {
            Entry::Service(k, v) => s.services.insert(*k, *v).is_some(),
            Entry::Slot(k, v) => s.slots.insert(*k, *v).is_some(),
            Entry::Backend(k, v) => s.backends.insert(*k, *v).is_some(),
            Entry::Addr(k, v) => s.addrs.insert(*k, *v).is_some(),
            Entry::Name(k, v) => s.names.insert(*k, v.as_str().to_string()).is_some(),
            Entry::AffMember(k) => !s.members.insert(*k),
            Entry::SrcRange(k, len) => !s.ranges.insert((*k, *len)),
            Entry::Service6(k, v) => s.services6.insert(*k, *v).is_some(),
            Entry::Backend6(k, v) => s.backends6.insert(*k, *v).is_some(),
            Entry::Addr6(k, v) => s.addrs6.insert(*k, *v).is_some(),
            Entry::SrcRange6(k, len) => !s.ranges6.insert((*k, *len)),
        };
        self.log.push(match entry {
            Entry::Name(k, v) => format!("put Name({k}, {:?})", v.as_str()),
            other => format!("put {other:?}"),
        });
        Ok(())
    }

    fn delete(&mut self, key: &Key) -> Result<(), WriteError> {
        let s = &mut self.state;
        match key {
            Key::Service(k) => s.services.remove(k).is_some(),
            Key::Slot(k) => s.slots.remove(k).is_some(),
            Key::Backend(k) => s.backends.remove(k).is_some(),
            Key::Addr(k) => s.addrs.remove(k).is_some(),
            Key::Name(k) => s.names.remove(k).is_some(),
            Key::AffMember(k) => s.members.remove(k),
            Key::SrcRange(k, len) => s.ranges.remove(&(*k, *len)),
            Key::Service6(k) => s.services6.remove(k).is_some(),
            Key::Backend6(k) => s.backends6.remove(k).is_some(),
            Key::Addr6(k) => s.addrs6.remove(k).is_some(),
            Key::SrcRange6(k, len) => s.ranges6.remove(&(*k, *len)),
        };
        self.log.push(format!("delete {key:?}"));
        Ok(())
    }

    fn reset_stats(&mut self, svc_id: u32) -> Result<(), WriteError> {
        self.log.push(format!("reset_stats {svc_id}"));
        Ok(())
    }

    fn read_all(&self) -> anyhow::Result<MapContents> {
        Ok(self.state.clone())
    }
}
