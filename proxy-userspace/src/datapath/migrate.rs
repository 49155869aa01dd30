//! Upgrades and downgrades over pinned maps: a daemon whose map layout
//! differs from the one pinned by the previous run.
//!
//! Map names end in their layout version (`KEP_CT_V1`,
//! proxy-common's layout.rs). Before loading, [`plan`] reads the names
//! pinned under `maps/`:
//!
//! * a pin of a later version than this build's map of the same base is
//!   a downgrade: the daemon refuses to start, with one line naming the
//!   pins and both versions, before it changes anything (the running
//!   datapath keeps serving);
//! * a pin of an earlier version is retired: its entries are carried
//!   over when this build has a [`Conversion`] for it (the state that
//!   established flows need: conntrack, reverse NAT), and the daemon
//!   rebuilds the map otherwise (desired state, configuration, counters).
//!
//! The loader creates this build's maps and pins them under their new
//! names; [`Plan::convert`] copies the converted entries in while the
//! previous run's programs still serve from the old maps, so the new
//! programs find every flow when they replace the old ones on the pinned
//! links. Once every pinned link runs the new programs, [`Plan::retire`]
//! copies again what the old programs created in between (a few
//! milliseconds), then removes the old pins.
//!
//! Copies only add keys the new map does not hold: an entry the new
//! programs wrote is newer than the old map's. That makes the steps safe
//! to repeat: a
//! daemon that dies anywhere before the old pins are removed leaves them,
//! and the next start carries them over again.

use std::{
    collections::HashMap,
    fs, io,
    mem::size_of,
    os::fd::AsFd,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::MapData;
use bytemuck::Pod;
use proxy_common::{ALL_MAPS, layout::split_version};

use super::batch;

/// Carries the entries of a map of an earlier layout into this build's.
#[derive(Clone, Copy, Debug)]
pub struct Conversion {
    /// The earlier map's name.
    pub from: &'static str,
    /// This build's map.
    pub to: &'static str,
    /// Copies the entries of the map pinned at the first path into the one
    /// pinned at the second, converted, and records what it wrote in the
    /// third ([`copy_converted`]); returns how many were written.
    pub copy: fn(&Path, &Path, &mut Written) -> Result<usize>,
}

/// The conversions this build knows. None in the shipped layouts (every
/// conntrack and reverse-NAT map is at version 1); the test layout carries
/// the four maps whose value it changes.
pub fn conversions() -> Vec<Conversion> {
    #[cfg(feature = "layout-v2-test")]
    {
        use proxy_common::{layout::*, *};
        vec![
            Conversion {
                from: CT_MAP_V1,
                to: CT_MAP,
                copy: |from, to, w| copy_converted::<FlowKey, _, _>(from, to, w, nat_from_v1),
            },
            Conversion {
                from: RNAT_MAP_V1,
                to: RNAT_MAP,
                copy: |from, to, w| copy_converted::<FlowKey, _, _>(from, to, w, nat_from_v1),
            },
            Conversion {
                from: CT6_MAP_V1,
                to: CT6_MAP,
                copy: |from, to, w| copy_converted::<FlowKey6, _, _>(from, to, w, nat6_from_v1),
            },
            Conversion {
                from: RNAT6_MAP_V1,
                to: RNAT6_MAP,
                copy: |from, to, w| copy_converted::<FlowKey6, _, _>(from, to, w, nat6_from_v1),
            },
        ]
    }
    #[cfg(not(feature = "layout-v2-test"))]
    Vec::new()
}

/// The maps established flows need: an earlier layout of one of these
/// without a [`Conversion`] loses those flows' state (worth a warning).
const FLOW_STATE_BASES: [&str; 8] = [
    "KEP_CT",
    "KEP_RNAT",
    "KEP_CT6",
    "KEP_RNAT6",
    "KEP_SKRNAT",
    "KEP_SKRNAT6",
    "KEP_SKFWD",
    "KEP_SKFWD6",
];

/// A pin of an earlier layout, and what becomes of it.
#[derive(Clone, Debug)]
pub struct Retiring {
    pub pin: PathBuf,
    /// This build's map of the same base.
    pub successor: &'static str,
    pub conversion: Option<Conversion>,
}

/// What [`plan`] found: the pins of earlier layouts.
#[derive(Debug, Default)]
pub struct Plan {
    pub retiring: Vec<Retiring>,
    /// What the copies wrote into each of this build's maps.
    written: HashMap<&'static str, Written>,
}

/// The entries a copy wrote into a new map (key, converted value, as
/// bytes): an entry still holding that value was not touched by the new
/// programs since, and a later copy may update it from the old map.
pub type Written = HashMap<Vec<u8>, Vec<u8>>;

/// This build's map with the same base as `name`, and both versions.
fn successor_of(name: &str) -> Option<(&'static str, u32, u32)> {
    let (base, version) = split_version(name)?;
    ALL_MAPS.iter().find_map(|ours| {
        let (our_base, our_version) = split_version(ours)?;
        (our_base == base).then_some((*ours, version, our_version))
    })
}

/// Reads the map pins under `maps_dir`. A pin of a later layout than this
/// build's is an error (one line, every such pin named); pins of earlier
/// layouts are returned, with their conversion when this build has one.
/// Names that are no map of ours (a `_resizing` pin, say) are left alone.
pub fn plan(maps_dir: &Path) -> Result<Plan> {
    plan_with(maps_dir, &conversions())
}

/// The map names pinned under `maps_dir`, sorted (none without the
/// directory).
fn pinned_names(maps_dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = match fs::read_dir(maps_dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", maps_dir.display())),
    };
    names.sort();
    Ok(names)
}

/// When pins under `maps_dir` are of a later layout than this build's:
/// the first half of the one line that says so, naming each beside this
/// build's map (`<dir> holds maps of a newer layout than this build knows:
/// KEP_CT_V2 (this build: KEP_CT_V1), ...`). The daemon refuses to start
/// with it, `inspect` declines to read them with it.
pub fn newer_layouts(maps_dir: &Path) -> Result<Option<String>> {
    let newer: Vec<String> = pinned_names(maps_dir)?
        .into_iter()
        .filter_map(|name| {
            let (successor, version, ours) = successor_of(&name)?;
            (version > ours).then(|| format!("{name} (this build: {successor})"))
        })
        .collect();
    if newer.is_empty() {
        return Ok(None);
    }
    Ok(Some(format!(
        "{} holds maps of a newer layout than this build knows: {}",
        maps_dir.display(),
        newer.join(", ")
    )))
}

fn plan_with(maps_dir: &Path, conversions: &[Conversion]) -> Result<Plan> {
    if let Some(newer) = newer_layouts(maps_dir)? {
        bail!(
            "{newer}; refusing to start over them (the datapath pinned there keeps serving): \
             run the newer build, or `kube-ebpf-proxy cleanup` first, which drops established \
             connections"
        );
    }
    let names = pinned_names(maps_dir)?;
    let mut plan = Plan::default();
    for name in names {
        let Some((successor, version, ours)) = successor_of(&name) else {
            continue;
        };
        if version < ours {
            plan.retiring.push(Retiring {
                pin: maps_dir.join(&name),
                successor,
                conversion: conversions.iter().find(|c| c.from == name).copied(),
            });
        }
    }
    Ok(plan)
}

/// Entries carried over from one map.
#[derive(Debug)]
pub struct Carried {
    pub from: PathBuf,
    pub to: &'static str,
    pub entries: usize,
    pub took: Duration,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.retiring.is_empty()
    }

    /// Copies the entries of every old map with a conversion into this
    /// build's map, pinned under `maps_dir` by the loader.
    pub fn convert(&mut self, maps_dir: &Path) -> Result<Vec<Carried>> {
        let mut out = Vec::new();
        for r in &self.retiring {
            let Some(c) = r.conversion else { continue };
            if !r.pin.exists() {
                continue;
            }
            let started = Instant::now();
            let written = self.written.entry(c.to).or_default();
            let entries = (c.copy)(&r.pin, &maps_dir.join(c.to), written)
                .with_context(|| format!("carrying {} over to {}", r.pin.display(), c.to))?;
            out.push(Carried {
                from: r.pin.clone(),
                to: c.to,
                entries,
                took: started.elapsed(),
            });
        }
        Ok(out)
    }

    /// Copies what the previous run's programs created since the last copy
    /// ([`Plan::convert`] again); returns the entries added.
    pub fn catch_up(&mut self, maps_dir: &Path) -> Result<usize> {
        Ok(self.convert(maps_dir)?.iter().map(|c| c.entries).sum())
    }

    /// Once no program of the previous run serves any more: removes the
    /// old pins (the kernel frees a map when nothing holds it).
    pub fn remove_pins(&mut self) -> Result<()> {
        for r in self.retiring.drain(..) {
            let (base, _) = split_version(r.successor).unwrap_or_default();
            if r.conversion.is_none() && FLOW_STATE_BASES.contains(&base) {
                tracing::warn!(
                    pin = %r.pin.display(),
                    successor = r.successor,
                    "no conversion from this earlier layout: its flows are tracked anew"
                );
            }
            match fs::remove_file(&r.pin) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("removing {}", r.pin.display()));
                }
            }
            tracing::info!(pin = %r.pin.display(), successor = r.successor, "removed the pin of an earlier map layout");
        }
        Ok(())
    }
}

/// Every entry of the hash map pinned at `from` (values `Old`) into the one
/// pinned at `to` (values `New`), converted. A key `to` lacks is added; a
/// key `to` holds is kept (an entry the new programs wrote or changed is
/// newer than the old map's), unless `to` still holds what an earlier copy
/// wrote there (`written`): the old programs changed it since (a port of a
/// closed flow given to a new one, a flag), and their change is carried
/// too. Read and written in batches ([`super::batch`]). Returns the
/// entries written.
pub fn copy_converted<K: Pod, Old: Pod, New: Pod>(
    from: &Path,
    to: &Path,
    written: &mut Written,
    convert: impl Fn(&Old) -> New,
) -> Result<usize> {
    let (ks, old_vs, new_vs) = (size_of::<K>(), size_of::<Old>(), size_of::<New>());
    let old = open_sized(from, ks, old_vs)?;
    let new = open_sized(to, ks, new_vs)?;
    let (old_keys, old_values) = batch::read_all(old.fd().as_fd(), ks, old_vs)?;
    let (new_keys, new_values) = batch::read_all(new.fd().as_fd(), ks, new_vs)?;
    let present: HashMap<&[u8], &[u8]> = new_keys
        .chunks_exact(ks)
        .zip(new_values.chunks_exact(new_vs))
        .collect();
    let mut added = Entries::default();
    let mut updated = Entries::default();
    for (k, v) in old_keys
        .chunks_exact(ks)
        .zip(old_values.chunks_exact(old_vs))
    {
        let old: Old = bytemuck::pod_read_unaligned(v);
        let value = convert(&old);
        let value = bytemuck::bytes_of(&value);
        match present.get(k) {
            None => added.push(k, value),
            Some(&now) if now != value && written.get(k).is_some_and(|w| w == now) => {
                updated.push(k, value)
            }
            Some(_) => {}
        }
    }
    let fd = new.fd().as_fd();
    let n = batch::insert_absent(fd, &added.keys, &added.values, ks, new_vs)?
        + batch::overwrite(fd, &updated.keys, &updated.values, ks, new_vs)?;
    for entries in [added, updated] {
        for (k, v) in entries
            .keys
            .chunks_exact(ks)
            .zip(entries.values.chunks_exact(new_vs))
        {
            written.insert(k.to_vec(), v.to_vec());
        }
    }
    Ok(n)
}

/// Packed keys and values to write.
#[derive(Default)]
struct Entries {
    keys: Vec<u8>,
    values: Vec<u8>,
}

impl Entries {
    fn push(&mut self, key: &[u8], value: &[u8]) {
        self.keys.extend_from_slice(key);
        self.values.extend_from_slice(value);
    }
}

/// The map pinned at `pin`, checked to have the key and value sizes of
/// the layout the conversion expects.
fn open_sized(pin: &Path, key_size: usize, value_size: usize) -> Result<MapData> {
    let data = MapData::from_pin(pin).with_context(|| format!("opening {}", pin.display()))?;
    let info = data.info()?;
    let found = (info.key_size() as usize, info.value_size() as usize);
    if found != (key_size, value_size) {
        bail!(
            "{}: keys of {} bytes and values of {}, not the {key_size} and {value_size} of its layout",
            pin.display(),
            found.0,
            found.1
        );
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(pins: &[&str]) -> PathBuf {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("kep-migrate-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        for p in pins {
            fs::write(dir.join(p), b"").unwrap();
        }
        dir
    }

    fn never(_: &Path, _: &Path, _: &mut Written) -> Result<usize> {
        unreachable!()
    }

    #[test]
    fn this_builds_pins_need_nothing() {
        let dir = dir_with(&ALL_MAPS);
        let plan = plan(&dir).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert!(plan.is_empty(), "{plan:?}");
    }

    #[test]
    fn earlier_layouts_retire_with_their_conversion_if_any() {
        // KEP_SVC_V2 is this build's services map: V1 is rebuilt.
        let dir = dir_with(&["KEP_SVC_V1", "KEP_CT_V0", "KEP_CT_V1_resizing", "other"]);
        let conversions = [Conversion {
            from: "KEP_CT_V0",
            to: proxy_common::CT_MAP,
            copy: never,
        }];
        let plan = plan_with(&dir, &conversions).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        let found: Vec<_> = plan
            .retiring
            .iter()
            .map(|r| {
                let name = r.pin.file_name().unwrap().to_string_lossy().into_owned();
                (name, r.successor, r.conversion.map(|c| c.from))
            })
            .collect();
        assert_eq!(
            found,
            vec![
                ("KEP_CT_V0".into(), proxy_common::CT_MAP, Some("KEP_CT_V0")),
                ("KEP_SVC_V1".into(), proxy_common::SVC_MAP, None),
            ]
        );
    }

    #[test]
    fn a_newer_layout_is_refused_in_one_line_naming_the_pins() {
        let dir = dir_with(&["KEP_CT_V9", "KEP_RNAT6_V7", "KEP_SVC_V1"]);
        let err = format!("{:#}", plan(&dir).unwrap_err());
        fs::remove_dir_all(&dir).unwrap();
        assert!(!err.contains('\n'), "{err}");
        assert!(
            err.contains(&format!("KEP_CT_V9 (this build: {})", proxy_common::CT_MAP)),
            "{err}"
        );
        assert!(
            err.contains("KEP_RNAT6_V7 (this build: KEP_RNAT6_V"),
            "{err}"
        );
        assert!(err.contains("refusing to start"), "{err}");
        assert!(!err.contains("KEP_SVC_V1"), "{err}");
    }

    #[test]
    fn no_maps_directory_is_a_first_start() {
        let plan = plan(Path::new("/nonexistent/kep/maps")).unwrap();
        assert!(plan.is_empty());
    }

    #[cfg(feature = "layout-v2-test")]
    #[test]
    fn the_test_layout_converts_its_four_maps_from_version_1() {
        let dir = dir_with(&["KEP_CT_V1", "KEP_RNAT_V1", "KEP_CT6_V1", "KEP_RNAT6_V1"]);
        let plan = plan(&dir).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(plan.retiring.len(), 4);
        assert!(plan.retiring.iter().all(|r| r.conversion.is_some()));
    }
}
