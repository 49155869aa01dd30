//! Sizing the conntrack and reverse-NAT maps (`--conntrack-max`) and the
//! IPv6 LRU maps (`--ipv6`), and carrying the entries of pinned maps of
//! another size over to new ones.
//!
//! LRU maps are preallocated: the kernel reserves their whole size when
//! they are created. With IPv6 off, the IPv6 LRU maps ([`IPV6_LRU_MAPS`])
//! are created with [`IPV6_OFF_ENTRIES`] entries instead: about 123 MiB
//! less kernel memory on a node that serves no IPv6. The other IPv6 maps
//! are hash maps without preallocation and cost nothing while empty.
//!
//! A map's size is fixed when it is created, and the loader reuses a pinned
//! map whatever its size. So before loading, [`plan`] finds the pins whose
//! size differs and points the loader at a temporary pin name instead: the
//! new programs get a new map of the wanted size, pinned there. After
//! loading (before the new programs are attached, while the previous run's
//! programs still serve from the old maps), [`Resize::finish`] copies every
//! entry of the old map into the new one, removes the old pin and renames
//! the temporary pin to the map's name.
//!
//! The copy goes in batches ([`super::batch`]): 100,000 flows (conntrack
//! and reverse NAT, 200,000 entries) in 0.1-0.18 s here, against 0.8-1.2 s
//! one entry at a time (test `a_resize_of_100000_flows_is_timed`). Flows that the old
//! programs create between the copy and the attachment of the new
//! programs (a few milliseconds) are not copied; their next
//! packets go through the new programs as new flows. A smaller map keeps
//! what fits: inserting beyond its size evicts the least recently used
//! entries, which here are the ones copied first (the old map's hash
//! order, not its recency).

use std::{
    fs, io,
    mem::size_of,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, Pod,
    maps::{MapData, MapInfo},
};
use proxy_common::*;

use super::batch;

/// The maps `--conntrack-max` sizes: conntrack and reverse NAT, both
/// families.
pub const SIZED_MAPS: [&str; 4] = [CT_MAP, RNAT_MAP, CT6_MAP, RNAT6_MAP];

/// The preallocated (LRU) IPv6 maps, which `--ipv6` sizes.
pub const IPV6_LRU_MAPS: [&str; 6] = [
    CT6_MAP,
    RNAT6_MAP,
    FRAG6_MAP,
    AFF6_MAP,
    SOCK_RNAT6_MAP,
    SOCK_FWD6_MAP,
];

/// Entries of each IPv6 LRU map with IPv6 off: a few flows still work
/// (an IPv6 Service that appears before the daemon is restarted is served,
/// its flows evicting each other), at a few KiB each.
pub const IPV6_OFF_ENTRIES: u32 = 64;

/// The size of every map this module sizes: conntrack and reverse NAT of
/// `conntrack_max` entries, and the IPv6 LRU maps at their full size with
/// `ipv6`, or [`IPV6_OFF_ENTRIES`].
pub fn sizes(conntrack_max: u32, ipv6: bool) -> Vec<(&'static str, u32)> {
    let full = |name: &str| match name {
        FRAG6_MAP => FRAG6_MAP_SIZE,
        AFF6_MAP => AFF6_MAP_SIZE,
        SOCK_RNAT6_MAP => SOCK_RNAT_MAP_SIZE,
        SOCK_FWD6_MAP => SOCK_FWD_MAP_SIZE,
        _ => conntrack_max,
    };
    let mut out = vec![(CT_MAP, conntrack_max), (RNAT_MAP, conntrack_max)];
    for name in IPV6_LRU_MAPS {
        out.push((name, if ipv6 { full(name) } else { IPV6_OFF_ENTRIES }));
    }
    out
}

/// Where a map of the new size is pinned until its entries are copied
/// (bpffs refuses dots in names).
pub fn temporary_pin(pin: &Path) -> PathBuf {
    let mut name = pin.file_name().unwrap_or_default().to_os_string();
    name.push("_resizing");
    pin.with_file_name(name)
}

/// The size of the map pinned at `pin`, if one is.
pub fn pinned_max_entries(pin: &Path) -> Result<Option<u32>> {
    if !pin.exists() {
        return Ok(None);
    }
    let info = MapInfo::from_pin(pin).with_context(|| format!("reading {}", pin.display()))?;
    Ok(Some(info.max_entries()))
}

/// A pinned map being replaced by one of another size.
#[derive(Debug)]
pub struct Resize {
    pub name: &'static str,
    pub pin: PathBuf,
    pub temporary: PathBuf,
    pub from: u32,
    pub to: u32,
}

/// The pinned maps (under `maps_dir`) whose size is not the one `sizes`
/// gives. A temporary pin left by a run that died before renaming it
/// becomes the map's pin again when the map's own pin is gone (it holds the
/// copied flows), and is removed otherwise (the copy is redone).
pub fn plan(maps_dir: &Path, sizes: &[(&'static str, u32)]) -> Result<Vec<Resize>> {
    let mut out = Vec::new();
    for &(name, max) in sizes {
        let pin = maps_dir.join(name);
        let temporary = temporary_pin(&pin);
        if temporary.exists() {
            if pin.exists() {
                fs::remove_file(&temporary)
                    .with_context(|| format!("removing {}", temporary.display()))?;
            } else {
                fs::rename(&temporary, &pin)
                    .with_context(|| format!("renaming {}", temporary.display()))?;
            }
        }
        match pinned_max_entries(&pin)? {
            Some(from) if from != max => out.push(Resize {
                name,
                pin,
                temporary,
                from,
                to: max,
            }),
            _ => {}
        }
    }
    Ok(out)
}

impl Resize {
    /// Copies the old map's entries into the new one (taken from `ebpf`,
    /// which pinned it at the temporary name), then swaps the pins.
    /// Returns the entries copied.
    pub fn finish(&self, ebpf: &mut Ebpf) -> Result<usize> {
        if ebpf.map(self.name).is_none() {
            bail!("map {} missing", self.name);
        }
        let new = &self.temporary;
        let copied = match self.name {
            CT_MAP | RNAT_MAP => copy::<FlowKey, NatEntry>(&self.pin, new),
            CT6_MAP | RNAT6_MAP => copy::<FlowKey6, NatEntry6>(&self.pin, new),
            FRAG6_MAP => copy::<FragKey6, FragValue>(&self.pin, new),
            AFF6_MAP => copy::<AffKey6, AffValue>(&self.pin, new),
            SOCK_RNAT6_MAP => copy::<SockRevKey6, SockNat6>(&self.pin, new),
            _ => copy::<SockFwdKey6, SockNat6>(&self.pin, new),
        }
        .with_context(|| format!("copying {} into its new map", self.pin.display()))?;
        match fs::remove_file(&self.pin) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", self.pin.display()));
            }
            _ => {}
        }
        fs::rename(&self.temporary, &self.pin)
            .with_context(|| format!("renaming {}", self.temporary.display()))?;
        Ok(copied)
    }
}

/// Every entry of the map pinned at `from` into the one pinned at `to`
/// (`K` and `V` its layout), in batches ([`super::batch`]). Nothing writes
/// the new map yet: its programs are not attached. Entries written or
/// deleted while being read (the old programs still run) may or may not
/// be copied.
fn copy<K: Pod, V: Pod>(from: &Path, to: &Path) -> Result<usize> {
    let (key_size, value_size) = (size_of::<K>(), size_of::<V>());
    let open =
        |pin: &Path| MapData::from_pin(pin).with_context(|| format!("opening {}", pin.display()));
    let (old, new) = (open(from)?, open(to)?);
    let (keys, values) = batch::read_all(old.fd().as_fd(), key_size, value_size)?;
    Ok(batch::overwrite(
        new.fd().as_fd(),
        &keys,
        &values,
        key_size,
        value_size,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_off_shrinks_only_the_ipv6_lru_maps() {
        let off = sizes(1000, false);
        assert_eq!(off[..2], [(CT_MAP, 1000), (RNAT_MAP, 1000)]);
        assert!(off[2..].iter().all(|(_, n)| *n == IPV6_OFF_ENTRIES));
        let on = sizes(1000, true);
        assert!(on.contains(&(CT6_MAP, 1000)));
        assert!(on.contains(&(AFF6_MAP, AFF6_MAP_SIZE)));
        assert_eq!(on.len(), 2 + IPV6_LRU_MAPS.len());
    }

    #[test]
    fn the_temporary_pin_has_no_dot_and_sits_beside_the_map() {
        let t = temporary_pin(Path::new("/sys/fs/bpf/kep/maps/KEP_CT_V1"));
        assert_eq!(t, Path::new("/sys/fs/bpf/kep/maps/KEP_CT_V1_resizing"));
        assert!(!t.file_name().unwrap().to_string_lossy().contains('.'));
    }
}
