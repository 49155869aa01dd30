//! The probe filters' writer (see [`proxy_common::filter`]): the bitmaps
//! that spare the datapath a hash lookup for addresses without a class and
//! packets from anything but a backend.
//!
//! The daemon is their only writer. It sets a bit before it writes an
//! address or a backend ([`ProbeFilters::add_addr`],
//! [`ProbeFilters::add_endpoint`], called by the syncer's map writer), and,
//! at every start before the programs are attached, for every entry the
//! pinned maps hold already ([`ProbeFilters::prime`]): addresses and
//! backends, and the backend of every reverse-NAT and socket reverse entry
//! (a flow may outlive its backend), also in the pins of an earlier layout
//! an upgrade still carries over. A start after a run of a version without
//! filters, or after a downgrade and back, so finds every bit it needs.
//!
//! Removing an entry leaves its bit set: another member may share it, and
//! only a full read of the pins can tell. Churn (pods come and go, each
//! with a new address) so fills the filters with bits of what is gone, and
//! a filter with a bit in every slot spares nothing. Once the bits have
//! doubled since the last rebuild ([`ProbeFilters::rebuild_due`]), the
//! daemon rebuilds both from the pins ([`ProbeFilters::rebuild`]), which
//! clears the bits no pinned entry needs; a rebuild's cost, a read of every
//! pinned entry, so is spread over as many additions as the filters held.
//!
//! The filters are pinned like the state they stand for, so a restart's
//! old programs, which run until the new ones take their links, see the
//! bits the new daemon sets for what it writes meanwhile.

use std::{
    net::IpAddr,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use aya::maps::{Array, MapData};
use bytemuck::Pod;
use proxy_common::{
    ADDR_MAP, ADDR6_MAP, AddrKey, AddrKey6, BACKEND_MAP, BACKEND6_MAP, Backend, Backend6,
    FILTER_WORDS, FlowKey, FlowKey6, RNAT_MAP, RNAT6_MAP, SOCK_RNAT_MAP, SOCK_RNAT6_MAP,
    SockRevKey, SockRevKey6, addr_bit, addr6_bit, endpoint_bit, endpoint6_bit, filter_word,
};

use super::batch;

/// One filter map and what it holds (the daemon is its only writer).
struct Filter {
    map: Array<MapData, u64>,
    words: Vec<u64>,
    /// Bits set in `words`, kept as they are set (the metrics read it at
    /// every sync).
    bits_set: u32,
}

impl Filter {
    /// A filter as the map holds it (`fresh`: a map just created, all
    /// zeroes, which need not be read).
    fn open(map: Array<MapData, u64>, fresh: bool) -> Result<Filter> {
        let words = if fresh {
            vec![0; FILTER_WORDS as usize]
        } else {
            (0..FILTER_WORDS)
                .map(|i| map.get(&i, 0))
                .collect::<Result<Vec<u64>, _>>()
                .context("reading a probe filter")?
        };
        let bits_set = words.iter().map(|w| w.count_ones()).sum();
        Ok(Filter {
            map,
            words,
            bits_set,
        })
    }

    fn set(&mut self, bit: u32) -> Result<()> {
        let (word, mask) = filter_word(bit);
        let w = &mut self.words[word as usize];
        if *w & mask == 0 {
            *w |= mask;
            self.map
                .set(word, *w, 0)
                .context("writing a probe filter")?;
            self.bits_set += 1;
        }
        Ok(())
    }

    /// Makes the filter hold `wanted`, writing only the words that differ
    /// (each word is one element, so a reader sees either its old or its
    /// new value). Returns how many bits were cleared.
    fn replace(&mut self, wanted: &[u64]) -> Result<u32> {
        let mut cleared = 0;
        for (i, (w, &want)) in self.words.iter_mut().zip(wanted).enumerate() {
            if *w != want {
                self.map
                    .set(i as u32, want, 0)
                    .context("rewriting a probe filter")?;
                cleared += (*w & !want).count_ones();
                *w = want;
            }
        }
        self.bits_set = self.words.iter().map(|w| w.count_ones()).sum();
        Ok(cleared)
    }
}

/// Sets `slot`'s bit in a filter's words being built.
fn set_bit(words: &mut [u64], slot: u32) {
    let (word, mask) = filter_word(slot);
    words[word as usize] |= mask;
}

/// What a pinned entry needs a bit for.
enum Member {
    Addr(IpAddr),
    Endpoint(IpAddr, [u8; 2]),
}

/// Hands `visit` every member of the entries pinned under `maps_dir` and
/// of the reverse entries of the pins in `earlier` (see
/// [`ProbeFilters::prime`]). The backend maps are read before the reverse
/// maps: a program writes a reverse entry only for a backend it read from
/// a backend map, so an entry written after this read is of a backend
/// that read saw, unless the syncer removed the backend while the program
/// ran (see [`ProbeFilters::rebuild`]).
fn for_each_pinned(
    maps_dir: &Path,
    earlier: &[(PathBuf, &'static str)],
    mut visit: impl FnMut(Member) -> Result<()>,
) -> Result<()> {
    let pin = |name: &str| maps_dir.join(name);
    for a in keys::<AddrKey>(&pin(ADDR_MAP))? {
        visit(Member::Addr(a.addr.into()))?;
    }
    for a in keys::<AddrKey6>(&pin(ADDR6_MAP))? {
        visit(Member::Addr(a.addr.into()))?;
    }
    for b in values::<Backend>(&pin(BACKEND_MAP))? {
        visit(Member::Endpoint(b.addr.into(), b.port))?;
    }
    for b in values::<Backend6>(&pin(BACKEND6_MAP))? {
        visit(Member::Endpoint(b.addr.into(), b.port))?;
    }
    for (addr, port) in pinned_reverse_sources(maps_dir, earlier)? {
        visit(Member::Endpoint(addr, port))?;
    }
    Ok(())
}

/// The sources of every reverse entry pinned under `maps_dir` (both
/// families, reverse NAT and socket reverse entries) and in `earlier`.
fn pinned_reverse_sources(
    maps_dir: &Path,
    earlier: &[(PathBuf, &'static str)],
) -> Result<Vec<(IpAddr, [u8; 2])>> {
    let reverse_pins = [RNAT_MAP, RNAT6_MAP, SOCK_RNAT_MAP, SOCK_RNAT6_MAP]
        .into_iter()
        .map(|name| (maps_dir.join(name), name))
        .chain(earlier.iter().cloned());
    let mut sources = Vec::new();
    for (path, successor) in reverse_pins {
        sources.extend(reverse_sources(&path, successor)?);
    }
    Ok(sources)
}

/// A rebuild starts once both filters together hold this many bits (below
/// it, at most 0.4% of a filter's slots are set: a non-member's lookup is
/// spared at least 99 times in 100) and twice as many as the last rebuild
/// left.
const REBUILD_MIN_BITS: u32 = 4_096;

fn rebuild_due(bits_set: u32, left_by_last: u32) -> bool {
    bits_set >= REBUILD_MIN_BITS.max(left_by_last.saturating_mul(2))
}

/// Both probe filters of a datapath.
pub struct ProbeFilters {
    addrs: Filter,
    endpoints: Filter,
    /// The bits both filters held after the last rebuild (0 before the
    /// first, or after one that failed).
    rebuilt_at: u32,
}

/// What [`ProbeFilters::prime`] found in the pins.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Primed {
    pub addrs: usize,
    pub endpoints: usize,
}

/// What [`ProbeFilters::rebuild`] cleared, and what each filter holds
/// after it.
#[derive(Debug)]
pub struct Rebuilt {
    pub addr_bits_cleared: u32,
    pub endpoint_bits_cleared: u32,
    pub bits_set: (u32, u32),
}

impl ProbeFilters {
    pub(super) fn open(
        addrs: Array<MapData, u64>,
        endpoints: Array<MapData, u64>,
        fresh: bool,
    ) -> Result<Self> {
        Ok(ProbeFilters {
            addrs: Filter::open(addrs, fresh)?,
            endpoints: Filter::open(endpoints, fresh)?,
            rebuilt_at: 0,
        })
    }

    /// Before `addr` is written to an address map.
    pub fn add_addr(&mut self, addr: IpAddr) -> Result<()> {
        self.addrs.set(match addr {
            IpAddr::V4(a) => addr_bit(a.octets()),
            IpAddr::V6(a) => addr6_bit(a.octets()),
        })
    }

    /// Before a backend at `addr` and `port` (wire order) is written.
    pub fn add_endpoint(&mut self, addr: IpAddr, port: [u8; 2]) -> Result<()> {
        self.endpoints.set(endpoint_slot(addr, port))
    }

    /// The bits set in each filter (addresses, endpoints): how full they
    /// are, for the metrics.
    pub fn bits_set(&self) -> (u32, u32) {
        (self.addrs.bits_set, self.endpoints.bits_set)
    }

    /// Sets the bits of every entry pinned under `maps_dir`, and of the
    /// reverse entries of the pins in `earlier` (maps of an earlier layout
    /// an upgrade carries over, whose keys are this build's: a conversion
    /// changes values only). Missing pins are skipped.
    pub fn prime(
        &mut self,
        maps_dir: &Path,
        earlier: &[(PathBuf, &'static str)],
    ) -> Result<Primed> {
        let mut primed = Primed::default();
        for_each_pinned(maps_dir, earlier, |member| {
            match member {
                Member::Addr(a) => {
                    self.add_addr(a)?;
                    primed.addrs += 1;
                }
                Member::Endpoint(a, port) => {
                    self.add_endpoint(a, port)?;
                    primed.endpoints += 1;
                }
            }
            Ok(())
        })?;
        Ok(primed)
    }

    /// Whether the filters have filled enough since the last rebuild to be
    /// rebuilt (see the module's docs).
    pub fn rebuild_due(&self) -> bool {
        let (addrs, endpoints) = self.bits_set();
        rebuild_due(addrs + endpoints, self.rebuilt_at)
    }

    /// Rebuilds both filters from the entries pinned under `maps_dir`:
    /// clears the bits no pinned entry needs, keeps the others. Not while
    /// the pins of an earlier layout are carried over (their programs
    /// write entries this read does not see). A program that read a
    /// backend just before the syncer removed it may write its reverse
    /// entry after the read: the reverse maps are read again once the
    /// filters are written, and the bits of what they hold set again.
    pub fn rebuild(&mut self, maps_dir: &Path) -> Result<Rebuilt> {
        // A failed rebuild is tried again only once the bits double.
        let (addrs, endpoints) = self.bits_set();
        self.rebuilt_at = addrs + endpoints;
        let mut wanted_addrs = vec![0u64; FILTER_WORDS as usize];
        let mut wanted_endpoints = vec![0u64; FILTER_WORDS as usize];
        for_each_pinned(maps_dir, &[], |member| {
            match member {
                Member::Addr(a) => set_bit(&mut wanted_addrs, addr_slot(a)),
                Member::Endpoint(a, port) => set_bit(&mut wanted_endpoints, endpoint_slot(a, port)),
            }
            Ok(())
        })?;
        let addr_bits_cleared = self.addrs.replace(&wanted_addrs)?;
        let endpoint_bits_cleared = self.endpoints.replace(&wanted_endpoints)?;
        for (addr, port) in pinned_reverse_sources(maps_dir, &[])? {
            self.add_endpoint(addr, port)?;
        }
        let (addrs, endpoints) = self.bits_set();
        self.rebuilt_at = addrs + endpoints;
        Ok(Rebuilt {
            addr_bits_cleared,
            endpoint_bits_cleared,
            bits_set: (addrs, endpoints),
        })
    }
}

/// The slot of an address in the address filters.
fn addr_slot(addr: IpAddr) -> u32 {
    match addr {
        IpAddr::V4(a) => addr_bit(a.octets()),
        IpAddr::V6(a) => addr6_bit(a.octets()),
    }
}

/// The slot of an endpoint in the endpoint filters
/// ([`proxy_common::filter`]).
fn endpoint_slot(addr: IpAddr, port: [u8; 2]) -> u32 {
    match addr {
        IpAddr::V4(a) => endpoint_bit(a.octets(), port),
        IpAddr::V6(a) => endpoint6_bit(a.octets(), port),
    }
}

/// The source (a backend's address and port) of every reverse-NAT entry
/// pinned under `maps_dir`, both families.
pub fn reverse_nat_sources(maps_dir: &Path) -> Result<Vec<(IpAddr, [u8; 2])>> {
    let mut sources = reverse_sources(&maps_dir.join(RNAT_MAP), RNAT_MAP)?;
    sources.extend(reverse_sources(&maps_dir.join(RNAT6_MAP), RNAT6_MAP)?);
    Ok(sources)
}

/// The backend (address, port) of every entry of a reverse map (`kind`:
/// this build's name of it) pinned at `path`: a reverse-NAT entry's
/// source, a socket reverse entry's peer.
fn reverse_sources(path: &Path, kind: &str) -> Result<Vec<(IpAddr, [u8; 2])>> {
    Ok(match kind {
        RNAT_MAP => keys::<FlowKey>(path)?
            .into_iter()
            .map(|k| (k.saddr.into(), k.sport))
            .collect(),
        RNAT6_MAP => keys::<FlowKey6>(path)?
            .into_iter()
            .map(|k| (k.saddr.into(), k.sport))
            .collect(),
        SOCK_RNAT_MAP => keys::<SockRevKey>(path)?
            .into_iter()
            .map(|k| (k.addr.into(), k.port))
            .collect(),
        SOCK_RNAT6_MAP => keys::<SockRevKey6>(path)?
            .into_iter()
            .map(|k| (k.addr.into(), k.port))
            .collect(),
        _ => Vec::new(),
    })
}

/// The sources of the reverse-NAT entries ([`proxy_common::REPLY_SOURCE_MAP`])
/// and this load's trust in them ([`proxy_common::REPLY_GATE_MAP`]).
pub struct ReplySources {
    sources: Array<MapData, u8>,
    gate: Array<MapData, u32>,
    trusted: bool,
}

impl ReplySources {
    pub(super) fn new(sources: Array<MapData, u8>, gate: Array<MapData, u32>) -> Self {
        ReplySources {
            sources,
            gate,
            trusted: false,
        }
    }

    /// Sets the byte of the source of every reverse-NAT entry pinned under
    /// `maps_dir` (none for a datapath without pins), then lets this
    /// load's programs trust the bytes. Only once no program that does not
    /// set them can write a reverse-NAT entry: every pinned link runs this
    /// load's programs and no earlier layout's run behind them. Returns
    /// the entries found. Each byte is one element: a write never undoes
    /// what the programs set meanwhile.
    pub fn prime_and_trust(&mut self, maps_dir: Option<&Path>) -> Result<usize> {
        let mut slots = std::collections::BTreeSet::new();
        let mut entries = 0;
        if let Some(dir) = maps_dir {
            for (addr, port) in reverse_nat_sources(dir)? {
                slots.insert(endpoint_slot(addr, port));
                entries += 1;
            }
        }
        for slot in slots {
            self.sources
                .set(slot, 1, 0)
                .context("writing the reply sources")?;
        }
        self.gate
            .set(0, 1, 0)
            .context("trusting the reply sources")?;
        self.trusted = true;
        Ok(entries)
    }

    /// Whether this load's programs trust the bytes.
    pub fn trusted(&self) -> bool {
        self.trusted
    }
}

/// The keys of the hash map pinned at `pin` (none without the pin).
fn keys<K: Pod>(pin: &Path) -> Result<Vec<K>> {
    let (keys, _) = entries(pin, size_of::<K>(), None)?;
    Ok(decode(&keys))
}

/// The values of the hash map pinned at `pin`.
fn values<V: Pod>(pin: &Path) -> Result<Vec<V>> {
    let (_, values) = entries(pin, 0, Some(size_of::<V>()))?;
    Ok(decode(&values))
}

fn decode<T: Pod>(packed: &[u8]) -> Vec<T> {
    packed
        .chunks_exact(size_of::<T>())
        .map(bytemuck::pod_read_unaligned)
        .collect()
}

/// Every entry of the map pinned at `pin`, packed, after checking the
/// sizes the caller reads (`key_size` 0 or `value_size` None: any).
fn entries(pin: &Path, key_size: usize, value_size: Option<usize>) -> Result<(Vec<u8>, Vec<u8>)> {
    if !pin.exists() {
        return Ok((Vec::new(), Vec::new()));
    }
    let map = MapData::from_pin(pin).with_context(|| format!("opening {}", pin.display()))?;
    let info = map.info()?;
    let (ks, vs) = (info.key_size() as usize, info.value_size() as usize);
    anyhow::ensure!(
        (key_size == 0 || ks == key_size) && value_size.is_none_or(|v| v == vs),
        "{}: keys of {ks} bytes and values of {vs}, not the layout this build reads",
        pin.display()
    );
    batch::read_all(map.fd().as_fd(), ks, vs).with_context(|| format!("reading {}", pin.display()))
}

#[cfg(test)]
mod tests {
    use proxy_common::FILTER_BITS;

    use super::*;

    #[test]
    fn a_rebuild_is_due_once_the_bits_double_and_never_below_the_floor() {
        // (bits set, left by the last rebuild, due)
        let cases = [
            (0, 0, false),
            (REBUILD_MIN_BITS - 1, 0, false),
            (REBUILD_MIN_BITS, 0, true),
            (REBUILD_MIN_BITS, REBUILD_MIN_BITS, false),
            (2 * REBUILD_MIN_BITS - 1, REBUILD_MIN_BITS, false),
            (2 * REBUILD_MIN_BITS, REBUILD_MIN_BITS, true),
            (150_000, 100_000, false),
            (200_000, 100_000, true),
            (REBUILD_MIN_BITS, 10, true),
            // More than half of all slots still set after a rebuild: the
            // bits cannot double any more, and no rebuild would spare much.
            (2 * FILTER_BITS, FILTER_BITS + 1, false),
        ];
        for (bits, last, due) in cases {
            assert_eq!(
                rebuild_due(bits, last),
                due,
                "{bits} bits, {last} at the last"
            );
        }
    }

    #[test]
    fn set_bit_sets_the_bit_filter_word_names() {
        let mut words = vec![0u64; FILTER_WORDS as usize];
        set_bit(&mut words, 0);
        set_bit(&mut words, 65);
        set_bit(&mut words, 65);
        set_bit(&mut words, FILTER_BITS - 1);
        let set: u32 = words.iter().map(|w| w.count_ones()).sum();
        assert_eq!(set, 3);
        assert_eq!(words[0], 1);
        assert_eq!(words[1], 2);
        assert_eq!(words[FILTER_WORDS as usize - 1], 1 << 63);
    }
}
