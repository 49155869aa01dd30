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
//!   datapath keeps serving); `inspect` declines the same way
//!   ([`newer_layouts`]);
//! * a pin of an earlier version is retired: its entries are carried
//!   over when this build has a [`Conversion`] for it (the state that
//!   established flows need: conntrack, reverse NAT), and the daemon
//!   rebuilds the map otherwise (desired state, configuration, counters).
//!
//! # The swap: both datapaths run until the old flows are carried
//!
//! The loader creates this build's maps and pins them under their new
//! names; [`Plan::convert`] copies the converted entries in while the
//! previous run's programs serve from the old maps. Then, per device and
//! direction, the new program gets a tcx link of its own in front of the
//! previous run's link (pinned under `links-next/`), instead of replacing
//! its program: tcx runs the programs of a hook in order until one returns
//! anything but `TCX_NEXT`. A flag of the new load (`KEP_UPGRADE`, never
//! pinned, so that older programs sharing the other maps never read it)
//! tells the new programs what to do:
//!
//! 1. `UPGRADE_ATTACHING` while they are attached device by device: they
//!    hand on every packet they would act on, so a flow is never opened by
//!    one datapath and answered on a device where only the other runs. A
//!    catch-up copy follows once they run everywhere.
//! 2. `UPGRADE_OLDER_BEHIND`: they open flows (a TCP SYN; a kept source
//!    port is remapped, since the old maps may hold the same port to the
//!    same backend), serve the flows they opened, and hand on what they
//!    have no entry for (a reply, a segment, a UDP datagram) and what hits
//!    an entry carried over (`NAT_F_CARRIED`, set by every conversion: the
//!    old programs may have given its tuple or port to a new flow since
//!    the copy). A carried port is never reclaimed. Another catch-up copy.
//! 3. `UPGRADE_ALONE`: they handle every packet; the old programs see none.
//!    A last catch-up copy takes what the old ones created during the
//!    previous copy.
//!
//! Then one rename per hook puts the new link's pin in place of the old
//! one, which drops the old link's last reference (the kernel detaches
//! it), and the old map pins are removed
//! ([`super::Datapath::retire_old_layouts`]).
//!
//! A copy adds the keys the new map lacks, and overwrites an entry only
//! while it still holds what an earlier copy of this run wrote there
//! ([`Written`]): the new programs did not touch it, and the old ones
//! changed it since. (A new program's write between the copy's read and
//! its write can be lost: a closing flag at worst.)
//!
//! # Crashes and restarts
//!
//! A daemon killed anywhere leaves a datapath that serves: before the
//! attach, the old programs alone; during it, new programs in front (in
//! whatever state their flag was) and the old ones behind. The next start
//! sees the old map pins again and goes through the upgrade again: it
//! copies (adding only what is missing: an entry written by the dead run's
//! programs is newer), updates the links under `links-next/` to its own
//! programs in place, and finishes. The flag is pinned as
//! `maps/KEP_UPGRADE` during an upgrade: if the dead run's programs had
//! begun to open flows (in the new maps only), the next run's start at
//! `UPGRADE_OLDER_BEHIND` too, not by handing every packet on. Killed after some renames, the hooks
//! already renamed get a new link in front of a new link, which is
//! harmless; killed after the old map pins are removed, the next start has
//! no upgrade to do and moves any link left under `links-next/` into
//! place. A restart of the same layout has no old pins: its programs
//! replace the pinned links' programs in place, as always.
//!
//! # Which maps need a conversion
//!
//! Every map whose entries are live state that the daemon cannot rebuild
//! from the Services needs a [`Conversion`] when its layout changes
//! ([`LIVE_STATE_BASES`]; without one the daemon warns). In the shipped
//! layouts none has a predecessor, and the test layout changes only the
//! conntrack and reverse-NAT values, so these have no conversion yet; a
//! map whose layout does not change keeps its name and its pin, entries
//! and all. What a layout change without a conversion would break:
//!
//! * conntrack and reverse NAT (`KEP_CT`, `KEP_RNAT` and IPv6): a
//!   NodePort flow's replies are no longer translated (the connection
//!   breaks), a ClusterIP flow is balanced again;
//! * session affinity (`KEP_AFF`, `KEP_AFF6`): no connection breaks (the
//!   conntrack holds them), but each client's next new connection is
//!   balanced afresh, so a client may move to another backend before its
//!   `timeoutSeconds`, once per upgrade;
//! * socket-level reverse NAT (`KEP_SKPEER`, `KEP_SKPEER6`, each
//!   connected socket's own storage, which no conversion can reach since
//!   userspace cannot list it; `KEP_SKRNAT`, `KEP_SKRNAT6`, by socket
//!   cookie, which the kernel keeps): a socket connected before the
//!   upgrade then shows the backend, not the Service, to `getpeername()`,
//!   and an unconnected UDP socket's replies come from the backend's
//!   address, which a client that checks the source of replies (a DNS
//!   resolver) drops;
//! * socket-level UDP stickiness (`KEP_SKFWD`, `KEP_SKFWD6`): an
//!   unconnected UDP socket's next datagram to a Service is balanced
//!   afresh, and may reach another backend.
//!
//! Their entries convert like the conntrack's: key kept, value converted
//! field by field, written in proxy-common's layout.rs beside the old
//! layout's type, listed in [`conversions`], with a unit test.

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

/// The maps of live state the daemon cannot rebuild (flows, sockets,
/// affinities): an earlier layout of one of these without a [`Conversion`]
/// loses that state (worth a warning; see the module's docs for what
/// breaks).
pub const LIVE_STATE_BASES: [&str; 12] = [
    "KEP_CT",
    "KEP_RNAT",
    "KEP_CT6",
    "KEP_RNAT6",
    "KEP_AFF",
    "KEP_AFF6",
    "KEP_SKPEER",
    "KEP_SKPEER6",
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
            if r.conversion.is_none() && LIVE_STATE_BASES.contains(&base) {
                tracing::warn!(
                    pin = %r.pin.display(),
                    successor = r.successor,
                    "no conversion from this earlier layout: its flows, sockets or affinities \
                     start anew"
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
    fn every_live_state_base_is_a_map_of_this_build() {
        for base in LIVE_STATE_BASES {
            assert!(
                ALL_MAPS
                    .iter()
                    .any(|m| split_version(m).is_some_and(|(b, _)| b == base)),
                "{base}"
            );
        }
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
