//! Loading the eBPF object, pinning its maps, and attaching its programs to
//! devices with TCX links that are pinned too, so the datapath outlives the
//! daemon and a restarted daemon swaps its new programs in atomically.
//!
//! Layout under the bpffs directory (default /sys/fs/bpf/kube-ebpf-proxy):
//!
//! ```text
//! maps/KEP_SVC_V2 ...              one pin per map (proxy_common::ALL_MAPS)
//! links/<ifname>@<ifindex>-ingress one pin per attached device and direction
//! links/<ifname>@<ifindex>-egress
//! links-next/<ifname>@<ifindex>-... during an upgrade to a new map layout:
//!                                  the new programs' links, in front of the
//!                                  older ones (see [`migrate`])
//! ```
//!
//! bpffs refuses names with a dot (EPERM), and device names may have one
//! (VLANs: eth0.100), so names are percent-encoded in pins.
//!
//! Every map is reached as its aya type through one helper: [`open_pinned`]
//! for the pins (inspect, metrics), [`Datapath::map`] for the object just
//! loaded (the syncer's maps, the configuration).
//!
//! * [`devices`]: the node's devices and addresses, and attaching to them
//!   as they come and go;
//! * [`bpffs`]: making sure the pin directory is on a BPF filesystem.

mod batch;
pub mod bpffs;
pub mod devices;
pub mod filters;
pub mod migrate;
pub mod netfilter;
pub mod netlink_watch;
mod peer;
pub mod resize;
pub mod sockets;

use std::{
    collections::BTreeSet,
    fs, io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, Map, MapData, MapError},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
};
use proxy_common::{
    ADDR_FILTER_MAP, ALL_MAPS, CFG_F_CLUSTER_CIDR, CONFIG_MAP, CONFIG6_MAP, Config, Config6,
    ENDPOINT_FILTER_MAP, HAIRPIN_ADDR, HAIRPIN_ADDR6, PEER_DEV_MAP, PEER_DEV_WORDS, PROG_EGRESS,
    PROG_INGRESS, PROG_NOOP, REPLY_GATE_MAP, REPLY_SOURCE_MAP, SERVICE_CIDRS, UPGRADE_ALONE,
    UPGRADE_ATTACHING, UPGRADE_MAP, UPGRADE_OLDER_BEHIND,
};

/// The settings the datapath reads, from the daemon's: IPv4 CIDRs only
/// (IPv6 ones are for the IPv6 datapath). At most [`SERVICE_CIDRS`] IPv4
/// service CIDRs, none a /0 (it would drop all traffic). `switches` are the
/// `CFG_F_*` bits the daemon's flags set (masquerade-all, some devices,
/// host routing); the cluster CIDR's is set here.
pub fn datapath_config(
    snat_port_range: (u16, u16),
    cluster_cidr: &[crate::cidr::Cidr],
    service_cidrs: &[crate::cidr::Cidr],
    switches: u8,
) -> Result<Config> {
    let v4 = |c: &crate::cidr::Cidr| match c.network() {
        std::net::IpAddr::V4(a) => Some((a.octets(), c.prefix())),
        std::net::IpAddr::V6(_) => None,
    };
    let mut value = Config {
        snat_port_min: snat_port_range.0,
        snat_port_max: snat_port_range.1,
        hairpin_addr: HAIRPIN_ADDR,
        flags: switches,
        ..Config::default()
    };
    if let Some((addr, len)) = cluster_cidr.iter().find_map(v4) {
        value.cluster_cidr = addr;
        value.cluster_cidr_len = len;
        value.flags |= CFG_F_CLUSTER_CIDR;
    }
    for (i, (addr, len)) in service_ranges(service_cidrs, v4, "IPv4")?
        .into_iter()
        .enumerate()
    {
        value.service_cidrs[i] = addr;
        value.service_cidr_lens[i] = len;
    }
    Ok(value)
}

/// The service CIDRs of one family, checked: at most [`SERVICE_CIDRS`],
/// none a /0 (it would drop all traffic).
fn service_ranges<A>(
    service_cidrs: &[crate::cidr::Cidr],
    of_family: impl Fn(&crate::cidr::Cidr) -> Option<(A, u8)>,
    family: &str,
) -> Result<Vec<(A, u8)>> {
    let ranges: Vec<(A, u8)> = service_cidrs.iter().filter_map(of_family).collect();
    if ranges.len() > SERVICE_CIDRS {
        bail!(
            "--service-cluster-ip-range: at most {SERVICE_CIDRS} {family} CIDRs, got {}",
            ranges.len()
        );
    }
    if ranges.iter().any(|(_, len)| *len == 0) {
        bail!("--service-cluster-ip-range: a /0 would drop all traffic");
    }
    Ok(ranges)
}

/// The IPv6 settings the datapath reads (`KEP_CFG6_V1`): the IPv6 cluster
/// CIDR and at most [`SERVICE_CIDRS`] IPv6 service CIDRs, none a /0. The
/// SNAT port range and masquerade-all come from [`datapath_config`]'s
/// value for both families.
pub fn datapath_config6(
    cluster_cidr: &[crate::cidr::Cidr],
    service_cidrs: &[crate::cidr::Cidr],
) -> Result<Config6> {
    let v6 = |c: &crate::cidr::Cidr| match c.network() {
        std::net::IpAddr::V6(a) => Some((a.octets(), c.prefix())),
        std::net::IpAddr::V4(_) => None,
    };
    let mut value = Config6 {
        hairpin_addr: HAIRPIN_ADDR6,
        ..Config6::default()
    };
    if let Some((addr, len)) = cluster_cidr.iter().find_map(v6) {
        value.cluster_cidr = addr;
        value.cluster_cidr_len = len;
        value.flags |= CFG_F_CLUSTER_CIDR;
    }
    for (i, (addr, len)) in service_ranges(service_cidrs, v6, "IPv6")?
        .into_iter()
        .enumerate()
    {
        value.service_cidrs[i] = addr;
        value.service_cidr_lens[i] = len;
    }
    Ok(value)
}

/// Where the kernel keeps lo's `accept_local`.
const LO_ACCEPT_LOCAL: &str = "/proc/sys/net/ipv4/conf/lo/accept_local";

/// Lets lo take the packets the datapath delivers into the node's own stack
/// with a source that is one of the node's addresses (a node process's
/// flow to a hostNetwork backend on this node, the replies to a node
/// process that dialed a NodePort on its own address). Without it the
/// kernel drops them as martians: only these paths fail, and the error
/// says so. Only lo's setting changes; lo carries nothing else that lacks
/// a route already.
pub fn enable_local_delivery() -> std::result::Result<bool, String> {
    match fs::read_to_string(LO_ACCEPT_LOCAL) {
        Ok(v) if v.trim() == "1" => Ok(false),
        Ok(_) => fs::write(LO_ACCEPT_LOCAL, "1")
            .map(|()| true)
            .map_err(|e| format!("writing {LO_ACCEPT_LOCAL}: {e}")),
        Err(e) => Err(format!("reading {LO_ACCEPT_LOCAL}: {e}")),
    }
}

/// The datapath object, built by build.rs from proxy-ebpf.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

/// Default place for our pins.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/kube-ebpf-proxy";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    /// The hooks a device gets. lo only gets egress: what leaves a node
    /// process for one of the node's own addresses passes there (a
    /// NodePort on the node's address, the replies of hostNetwork
    /// backends to node processes), and everything arriving on lo's
    /// ingress has passed its egress or was put there translated already.
    pub fn for_device(dev: &Device) -> &'static [Direction] {
        if dev.name == "lo" {
            &[Direction::Egress]
        } else {
            &Direction::BOTH
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }

    fn program(self) -> &'static str {
        match self {
            Direction::Ingress => PROG_INGRESS,
            Direction::Egress => PROG_EGRESS,
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            Direction::Ingress => TcAttachType::Ingress,
            Direction::Egress => TcAttachType::Egress,
        }
    }
}

/// A network device, identified by name and index (a device that is
/// deleted and created again under the same name is a different device).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Device {
    pub name: String,
    pub index: u32,
}

pub struct Datapath {
    ebpf: Ebpf,
    root: PathBuf,
    /// Why the socket-level programs could not be loaded, if they could
    /// not (an older kernel, say): reported when attaching them.
    sockets_unloadable: Option<String>,
    /// Pins of earlier map layouts, removed once the new programs run
    /// everywhere ([`Datapath::retire_old_layouts`]).
    old_layouts: migrate::Plan,
    /// During an upgrade to a new map layout: this load's flag telling its
    /// programs that the older ones run behind them (`KEP_UPGRADE`: they
    /// hand on what they would act on while being attached, then what they
    /// miss
    /// until the older maps are carried over; see [`migrate`]).
    older_behind: Option<Array<MapData, u32>>,
    /// The probe filters, until the map writer takes them
    /// ([`Datapath::take_filters`]).
    filters: Option<filters::ProbeFilters>,
    /// Taken at the first [`Datapath::trust_reply_sources`].
    reply_sources: Option<filters::ReplySources>,
}

pub fn maps_dir(root: &Path) -> PathBuf {
    root.join("maps")
}

pub fn links_dir(root: &Path) -> PathBuf {
    root.join("links")
}

/// Where the new programs' links wait during an upgrade to a new map
/// layout, in front of the older programs' links (see [`migrate`]).
pub fn next_links_dir(root: &Path) -> PathBuf {
    root.join("links-next")
}

fn link_pin(root: &Path, dev: &Device, dir: Direction) -> PathBuf {
    links_dir(root).join(link_pin_name(dev, dir))
}

fn next_link_pin(root: &Path, dev: &Device, dir: Direction) -> PathBuf {
    next_links_dir(root).join(link_pin_name(dev, dir))
}

fn link_pin_name(dev: &Device, dir: Direction) -> String {
    let name = dev.name.replace('%', "%25").replace('.', "%2E");
    format!("{name}@{}-{}", dev.index, dir.suffix())
}

/// Sets the size of the maps `--conntrack-max` sizes, when given.
fn size_conntrack(loader: &mut EbpfLoader, conntrack_max: Option<u32>) {
    if let Some(max) = conntrack_max {
        for name in resize::SIZED_MAPS {
            loader.map_max_entries(name, max);
        }
    }
}

/// Whether the IPv6 LRU maps get their full size (see [`resize`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ipv6Maps {
    Full,
    /// [`resize::IPV6_OFF_ENTRIES`] entries each: IPv6 is off.
    Small,
}

fn decode_name(pinned: &str) -> String {
    pinned.replace("%2E", ".").replace("%25", "%")
}

impl Datapath {
    /// Loads the programs, reusing the maps pinned under `root` (so state
    /// survives restarts) or creating and pinning them. `debug` turns on the
    /// programs' debug events (aya-log); off, the verifier removes them.
    /// `conntrack_max` sizes the conntrack and reverse-NAT maps (default:
    /// the object's); pinned ones of another size are replaced, their
    /// entries copied (see [`resize`]).
    /// Pins of an earlier layout are carried over, of a later one refused
    /// before anything changes (see [`migrate`]).
    pub fn load(root: &Path, debug: bool, conntrack_max: Option<u32>) -> Result<Datapath> {
        Datapath::load_sized(root, debug, conntrack_max, Ipv6Maps::Full)
    }

    /// [`Datapath::load`], with the IPv6 LRU maps sized by `ipv6`.
    pub fn load_sized(
        root: &Path,
        debug: bool,
        conntrack_max: Option<u32>,
        ipv6: Ipv6Maps,
    ) -> Result<Datapath> {
        let old_layouts = migrate::plan(&maps_dir(root))?;
        fs::create_dir_all(maps_dir(root))?;
        fs::create_dir_all(links_dir(root))?;
        let max = conntrack_max.unwrap_or(proxy_common::CT_MAP_SIZE);
        let sizes = resize::sizes(max, ipv6 == Ipv6Maps::Full);
        let resizes = resize::plan(&maps_dir(root), &sizes)?;
        let pins: Vec<(&str, PathBuf)> = ALL_MAPS
            .iter()
            .map(|name| {
                let pin = match resizes.iter().find(|r| r.name == *name) {
                    Some(r) => r.temporary.clone(),
                    None => maps_dir(root).join(name),
                };
                (*name, pin)
            })
            .collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        for (name, entries) in &sizes {
            loader.map_max_entries(name, *entries);
        }
        let mut dp = Datapath::finish(loader, debug, &[PROG_INGRESS, PROG_EGRESS], root)
            .context("loading the eBPF object (are the pinned maps of another version?)")?;
        for r in &resizes {
            let copied = r.finish(&mut dp.ebpf)?;
            tracing::info!(
                map = r.name,
                from = r.from,
                to = r.to,
                copied,
                "resized a pinned map"
            );
        }
        dp.prime_filters(&old_layouts)?;
        let flag_pin = maps_dir(root).join(UPGRADE_MAP);
        if old_layouts.is_empty() {
            // An upgrade that died after removing the old pins.
            let _ = fs::remove_file(&flag_pin);
        } else {
            dp.start_upgrade(&flag_pin)?;
        }
        dp.old_layouts = old_layouts;
        Ok(dp)
    }

    /// Sets this load's `KEP_UPGRADE` for an upgrade and pins it at `pin`
    /// until [`Datapath::retire_old_layouts`], in place of the pin of an
    /// upgrade that died: if that one had let its programs open flows
    /// (they are in the new maps, unknown to the old programs), this one
    /// starts there too (`UPGRADE_OLDER_BEHIND`); otherwise its programs
    /// hand on what they would act on while being attached
    /// (`UPGRADE_ATTACHING`).
    fn start_upgrade(&mut self, pin: &Path) -> Result<()> {
        let died_at = MapData::from_pin(pin)
            .ok()
            .and_then(|d| Map::from_map_data(d).ok())
            .and_then(|m| Array::<MapData, u32>::try_from(m).ok())
            .and_then(|a| a.get(&0, 0).ok());
        let start = match died_at {
            Some(UPGRADE_OLDER_BEHIND | UPGRADE_ALONE) => UPGRADE_OLDER_BEHIND,
            _ => UPGRADE_ATTACHING,
        };
        let _ = fs::remove_file(pin);
        // Set before it is pinned: the pin never shows another state.
        let mut flag: Array<MapData, u32> = self.map(UPGRADE_MAP)?;
        flag.set(0, start, 0)?;
        flag.pin(pin)
            .with_context(|| format!("pinning {}", pin.display()))?;
        let flag = Array::try_from(Map::from_map_data(MapData::from_pin(pin)?)?)?;
        if died_at.is_some() {
            tracing::info!(
                died_at,
                start,
                "an earlier upgrade died before it finished; taking it over"
            );
        }
        self.older_behind = Some(flag);
        Ok(())
    }

    /// Carries the entries of the pinned maps of an earlier layout over
    /// into this load's maps (see [`migrate`]). Called just before the new
    /// programs are attached: flows the previous programs create after the
    /// copy are caught up by [`Datapath::retire_old_layouts`].
    pub fn carry_old_layouts(&mut self) -> Result<()> {
        for c in self.old_layouts.convert(&maps_dir(&self.root))? {
            tracing::info!(
                from = %c.from.display(),
                to = c.to,
                entries = c.entries,
                ms = format!("{:.1}", c.took.as_secs_f64() * 1e3),
                "carried a map of an earlier layout over"
            );
        }
        Ok(())
    }

    /// Whether pins of an earlier map layout wait for
    /// [`Datapath::retire_old_layouts`].
    pub fn has_old_layouts(&self) -> bool {
        !self.old_layouts.is_empty()
    }

    /// To be called once this load's programs run on every pinned link, in
    /// front of the previous run's, handing on what they would act on (so far the
    /// previous programs serve every flow, and this load's write nothing):
    ///
    /// 1. carries over what the previous programs created or changed since
    ///    the first copy;
    /// 2. lets this load's programs open flows and serve those they know,
    ///    handing the rest on (UPGRADE_OLDER_BEHIND), and carries over
    ///    what the previous programs created meanwhile;
    /// 3. lets this load's programs handle every packet (the previous ones
    ///    see none from then on) and carries over what the previous ones
    ///    created between the copy of 2 and that moment;
    /// 4. puts this load's links in place of theirs (which detaches them)
    ///    and removes the pins of earlier layouts.
    ///
    /// Returns the entries carried over in 1, 2 and 3. Tried once: after a
    /// failure the old pins stay, and the next start goes through the
    /// upgrade again.
    pub fn retire_old_layouts(&mut self) -> Result<[usize; 3]> {
        let maps = maps_dir(&self.root);
        let mut plan = std::mem::take(&mut self.old_layouts);
        let mut flag = self.older_behind.take();
        let mut set = |value, what| match &mut flag {
            Some(flag) => flag.set(0, value, 0).context(what),
            None => Ok(()),
        };
        let attached = plan.catch_up(&maps)?;
        set(UPGRADE_OLDER_BEHIND, "letting the new programs open flows")?;
        tracing::info!(
            caught_up = attached,
            "the new programs run in front of the older ones everywhere and open flows now"
        );
        let behind = plan.catch_up(&maps)?;
        set(
            UPGRADE_ALONE,
            "letting the new programs handle every packet",
        )?;
        let alone = plan.catch_up(&maps)?;
        promote_next_links(&self.root)?;
        plan.remove_pins()?;
        let _ = fs::remove_file(maps_dir(&self.root).join(UPGRADE_MAP));
        Ok([attached, behind, alone])
    }

    /// Loads the programs with private, unpinned maps: for datapath tests
    /// and benchmarks, which must not touch a running daemon's state.
    pub fn load_private(debug: bool) -> Result<Datapath> {
        Datapath::load_private_sized(debug, None)
    }

    /// [`Datapath::load_private`] with conntrack maps of `conntrack_max`
    /// entries.
    pub fn load_private_sized(debug: bool, conntrack_max: Option<u32>) -> Result<Datapath> {
        let mut loader = EbpfLoader::new();
        size_conntrack(&mut loader, conntrack_max);
        let mut dp = Datapath::finish(
            loader,
            debug,
            &[PROG_INGRESS, PROG_EGRESS, PROG_NOOP],
            Path::new(""),
        )?;
        dp.filters = Some(dp.open_filters(true)?);
        Ok(dp)
    }

    fn open_filters(&mut self, fresh: bool) -> Result<filters::ProbeFilters> {
        filters::ProbeFilters::open(
            self.map(ADDR_FILTER_MAP)?,
            self.map(ENDPOINT_FILTER_MAP)?,
            fresh,
        )
    }

    /// Sets the probe filters' bits for what the pins hold, before any of
    /// this load's programs runs (see [`filters`]).
    fn prime_filters(&mut self, old_layouts: &migrate::Plan) -> Result<()> {
        let started = std::time::Instant::now();
        let mut filters = self.open_filters(false)?;
        let earlier: Vec<(PathBuf, &'static str)> = old_layouts
            .retiring
            .iter()
            .map(|r| (r.pin.clone(), r.successor))
            .collect();
        let primed = filters.prime(&maps_dir(&self.root), &earlier)?;
        let (addr_bits, endpoint_bits) = filters.bits_set();
        tracing::info!(
            addrs = primed.addrs,
            endpoints = primed.endpoints,
            addr_bits,
            endpoint_bits,
            ms = format!("{:.1}", started.elapsed().as_secs_f64() * 1e3),
            "probe filters hold every pinned address and backend"
        );
        self.filters = Some(filters);
        Ok(())
    }

    /// Lets this load's programs skip the reverse-NAT lookup of a reply
    /// from an endpoint no reverse-NAT entry comes from (see
    /// [`filters::ReplySources`]), after setting the sources of the
    /// pinned entries. To be called once every pinned link runs this
    /// load's programs and no earlier layout waits to be retired; returns
    /// the pinned entries found, `None` when trusted already.
    pub fn trust_reply_sources(&mut self) -> Result<Option<usize>> {
        if self.reply_sources_trusted() {
            return Ok(None);
        }
        let mut sources = match self.reply_sources.take() {
            Some(s) => s,
            None => {
                filters::ReplySources::new(self.map(REPLY_SOURCE_MAP)?, self.map(REPLY_GATE_MAP)?)
            }
        };
        let found = sources.prime_and_trust(self.pinned_maps_dir().as_deref());
        self.reply_sources = Some(sources);
        found.map(Some)
    }

    /// The addresses replies of pinned reverse-NAT entries come from (none
    /// for a datapath without pins): the backends of the per-packet flows
    /// an earlier run translated and that may still be open.
    pub fn reverse_nat_sources(&self) -> Result<BTreeSet<IpAddr>> {
        let Some(maps_dir) = self.pinned_maps_dir() else {
            return Ok(BTreeSet::new());
        };
        Ok(filters::reverse_nat_sources(&maps_dir)?
            .into_iter()
            .map(|(addr, _)| addr)
            .collect())
    }

    /// Whether this load's programs trust the reply sources
    /// ([`Datapath::trust_reply_sources`] succeeded).
    pub fn reply_sources_trusted(&self) -> bool {
        self.reply_sources.as_ref().is_some_and(|r| r.trusted())
    }

    /// The probe filters, for the one writer of addresses and backends
    /// (see [`filters`]).
    pub fn take_filters(&mut self) -> Result<filters::ProbeFilters> {
        self.filters
            .take()
            .context("the probe filters were taken already")
    }

    fn finish(
        mut loader: EbpfLoader,
        debug: bool,
        programs: &[&str],
        root: &Path,
    ) -> Result<Datapath> {
        // aya-log-ebpf's level is a read-only global the verifier sees as a
        // constant: at 0 every log statement is dead code and removed.
        static DEBUG: u8 = aya_log::Level::Debug as u8;
        static OFF: u8 = 0;
        loader.override_global(aya_log::LEVEL, if debug { &DEBUG } else { &OFF }, false);
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        for name in programs {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing"))?
                .try_into()?;
            load_retrying(name, || prog.load())?;
        }
        // Now, while every map of the object is still open: programs are
        // loaded with the map fds the loader put into them, and the daemon
        // takes (and may close) maps once loaded. Not fatal: without them
        // the per-packet path serves everything.
        let sockets_unloadable = sockets::load(&mut ebpf).err().map(|e| format!("{e:#}"));
        Ok(Datapath {
            ebpf,
            root: root.to_path_buf(),
            sockets_unloadable,
            old_layouts: migrate::Plan::default(),
            older_behind: None,
            filters: None,
            reply_sources: None,
        })
    }

    /// The reader of the programs' debug events (when loaded with `debug`).
    pub fn logger<L: log::Log>(&mut self, logger: L) -> Result<aya_log::EbpfLogger<L>> {
        Ok(aya_log::EbpfLogger::init_with_logger(
            &mut self.ebpf,
            logger,
        )?)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where this datapath's maps are pinned (`None` for a private one).
    pub fn pinned_maps_dir(&self) -> Option<PathBuf> {
        (!self.root.as_os_str().is_empty()).then(|| maps_dir(&self.root))
    }

    /// Takes a map out of the object as its aya type (each map can be
    /// taken once).
    pub fn map<T: TryFrom<Map, Error = MapError>>(&mut self, name: &str) -> Result<T> {
        let map = self
            .ebpf
            .take_map(name)
            .with_context(|| format!("map {name} missing or already taken"))?;
        typed(map, name)
    }

    /// Writes the datapath's settings (`KEP_CFG_V2`).
    pub fn write_config(&mut self, value: Config) -> Result<()> {
        let mut cfg: Array<_, Config> = self.map(CONFIG_MAP)?;
        cfg.set(0, value, 0)?;
        Ok(())
    }

    /// Writes the datapath's IPv6 settings (`KEP_CFG6_V1`).
    pub fn write_config6(&mut self, value: Config6) -> Result<()> {
        let mut cfg: Array<_, Config6> = self.map(CONFIG6_MAP)?;
        cfg.set(0, value, 0)?;
        Ok(())
    }

    /// Copies the programs' aya-log events into our log as they come (when
    /// loaded with `debug`). Runs as a task on the current tokio runtime.
    pub fn forward_debug_events(&mut self) -> Result<()> {
        let logger = self.logger(log::logger())?;
        // SAFETY: the logger owns its ring buffer's fd, which stays open and
        // the same for as long as the AsyncFd holds the logger.
        let mut logger = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        }
        .map_err(|e| anyhow::anyhow!("watching the debug-event ring buffer: {e}"))?;
        tokio::spawn(async move {
            loop {
                let Ok(mut guard) = logger.readable_mut().await else {
                    break;
                };
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        });
        tracing::info!("forwarding datapath debug events (--bpf-debug)");
        Ok(())
    }

    pub fn program(&self, name: &str) -> Result<&SchedClassifier> {
        Ok(self
            .ebpf
            .program(name)
            .with_context(|| format!("program {name} missing"))?
            .try_into()?)
    }

    /// Attaches the programs of `hooks` to `dev`; a pinned link from an
    /// earlier run is updated to the new program in place (no moment
    /// without a program), and an earlier run's link of a hook not in
    /// `hooks` is removed. During an upgrade to a new map layout the
    /// earlier run's link stays: the new programs get a link of their own
    /// in front of it, pinned under `links-next/` until
    /// [`Datapath::retire_old_layouts`] (a link there from an interrupted
    /// upgrade is updated in place). `peer`: `dev` is a veth or netkit
    /// device whose peer is in another namespace (see `peer`).
    pub fn attach(&mut self, dev: &Device, hooks: &[Direction], peer: bool) -> Result<()> {
        for dir in hooks.iter().copied() {
            let pin = link_pin(&self.root, dev, dir);
            let next = next_link_pin(&self.root, dev, dir);
            if self.older_behind.is_none() {
                // An upgrade interrupted after the older maps were retired.
                promote(&next, &pin)?;
            }
            // Held until attached: the order names the older link by its fd.
            let older = match self.older_behind {
                Some(_) => PinnedLink::from_pin(&pin)
                    .ok()
                    .map(|l| SchedClassifierLink::try_from(FdLink::from(l)))
                    .transpose()?,
                None => None,
            };
            let (target, order) = match &older {
                Some(older) => (next, LinkOrder::before_link(older)?),
                None => (pin, LinkOrder::default()),
            };
            let prog: &mut SchedClassifier = self
                .ebpf
                .program_mut(dir.program())
                .context("program missing")?
                .try_into()?;
            attach_pinned(prog, dev, dir, &target, order)?;
            drop(older);
        }
        if self.older_behind.is_none() {
            for dir in Direction::BOTH.into_iter().filter(|d| !hooks.contains(d)) {
                unpin_link(&link_pin(&self.root, dev, dir))?;
            }
        }
        self.list_peer_device(dev, peer);
        Ok(())
    }

    /// Lists `dev` in `PEER_DEV_MAP` if it is a pod's veth (`peer`: its
    /// peer in another namespace): translated packets for it then go
    /// straight into the pod (see `peer`). Not fatal: unlisted, they take
    /// the plain redirect.
    fn list_peer_device(&mut self, dev: &Device, peer: bool) {
        if !peer {
            return;
        }
        match self.set_peer_device(dev.index, true) {
            Ok(()) => {
                tracing::debug!(device = %dev.name, "packets for it go into its peer's namespace")
            }
            Err(e) => tracing::warn!(
                device = %dev.name,
                error = %format!("{e:#}"),
                "not listed as a pod's device; packets for it take the plain redirect"
            ),
        }
    }

    /// Sets or clears the bit of `ifindex` in `PEER_DEV_MAP` (a device
    /// beyond the bitmap stays unlisted). The daemon is the map's only
    /// writer.
    fn set_peer_device(&mut self, ifindex: u32, on: bool) -> Result<()> {
        let (word, bit) = (ifindex / 64, 1u64 << (ifindex % 64));
        if word >= PEER_DEV_WORDS {
            return Ok(());
        }
        let map = self.ebpf.map_mut(PEER_DEV_MAP).context("peer device map")?;
        let mut map: Array<_, u64> = Array::try_from(map)?;
        let old = map.get(&word, 0)?;
        let new = if on { old | bit } else { old & !bit };
        if new != old {
            map.set(word, new, 0)?;
        }
        Ok(())
    }

    /// Whether the pin directory is still on a BPF filesystem. Unmounted
    /// under us, the links pinned there lose their last reference and the
    /// kernel detaches them: the programs no longer see a packet.
    pub fn pins_intact(&self) -> bool {
        bpffs::is_bpffs(&self.root)
    }

    /// Devices with a pinned link of ours.
    pub fn attached(&self) -> Result<BTreeSet<Device>> {
        pinned_devices(&self.root)
    }

    /// Detaches from a device (or forgets a device that no longer exists).
    pub fn detach(&mut self, dev: &Device) -> Result<()> {
        // The links go even if the bit could not be cleared.
        let unlisted = self.set_peer_device(dev.index, false);
        detach_pins(&self.root, dev)?;
        unlisted
    }

    /// Attaches the socket-level programs to a cgroup v2 directory, or swaps
    /// them into the links a previous run pinned; see [`sockets`].
    pub fn attach_sockets(&mut self, cgroup: &Path) -> Result<()> {
        if let Some(why) = &self.sockets_unloadable {
            bail!("the socket programs did not load: {why}");
        }
        sockets::attach(&mut self.ebpf, &self.root, cgroup)
    }

    /// Attaches the socket-level programs to a cgroup without pins.
    pub fn attach_sockets_unpinned(&mut self, cgroup: &Path) -> Result<()> {
        if let Some(why) = &self.sockets_unloadable {
            bail!("the socket programs did not load: {why}");
        }
        sockets::attach_unpinned(&mut self.ebpf, cgroup)
    }

    /// Run count and total run time of a socket-level program.
    pub fn socket_program_stats(&self, name: &str) -> Result<(u64, std::time::Duration)> {
        sockets::run_stats(&self.ebpf, name)
    }

    /// Removes the socket-level links; returns how many there were.
    pub fn detach_sockets(&mut self) -> Result<usize> {
        sockets::detach_all(&self.root)
    }
}

/// Attaches `prog` to `dev` in `order` and pins the link at `pin`, or
/// updates the link pinned there to `prog`.
fn attach_pinned(
    prog: &mut SchedClassifier,
    dev: &Device,
    dir: Direction,
    pin: &Path,
    order: LinkOrder,
) -> Result<()> {
    if let Ok(old) = PinnedLink::from_pin(pin) {
        let link = SchedClassifierLink::try_from(FdLink::from(old))?;
        prog.attach_to_link(link)
            .with_context(|| format!("replacing {} on {}", dir.suffix(), dev.name))?;
        return Ok(());
    }
    if let Some(parent) = pin.parent() {
        fs::create_dir_all(parent)?;
    }
    let id = prog
        .attach_with_options(
            &dev.name,
            dir.attach_type(),
            TcAttachOptions::TcxOrder(order),
        )
        .with_context(|| format!("attaching {} to {}", dir.suffix(), dev.name))?;
    let link: FdLink = prog.take_link(id)?.try_into()?;
    link.pin(pin)
        .with_context(|| format!("pinning {}", pin.display()))?;
    Ok(())
}

/// Puts the link pinned at `next` in place of the one pinned at `pin`: one
/// rename, which drops the last reference to the replaced link (the kernel
/// detaches it). Nothing to do without a link at `next`.
fn promote(next: &Path, pin: &Path) -> Result<()> {
    match fs::rename(next, pin) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("moving {} to {}", next.display(), pin.display())),
    }
}

/// Every link of `links-next/` in place of its device's older link (see
/// [`promote`]), then the directory is removed.
fn promote_next_links(root: &Path) -> Result<()> {
    let dir = next_links_dir(root);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    for entry in entries {
        let name = entry?.file_name();
        promote(&dir.join(&name), &links_dir(root).join(&name))?;
    }
    let _ = fs::remove_dir(&dir);
    Ok(())
}

/// How often a load the verifier gave up with EAGAIN is tried.
const LOAD_TRIES: u32 = 5;

/// Loads a program, again when the kernel answers EAGAIN: the verifier
/// gives up that way when a signal arrives for the loading thread during a
/// long verification (a busy machine, a child process exiting), and libbpf
/// retries the same way. Any other error is the verifier's verdict.
pub(crate) fn load_retrying(
    name: &str,
    mut load: impl FnMut() -> std::result::Result<(), aya::programs::ProgramError>,
) -> Result<()> {
    let mut tries = 1;
    loop {
        match load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && tries < LOAD_TRIES =>
            {
                tries += 1;
            }
            result => return result.with_context(|| format!("verifier rejected {name}")),
        }
    }
}

/// Devices named by the link pins under `root`.
pub fn pinned_devices(root: &Path) -> Result<BTreeSet<Device>> {
    let mut out = BTreeSet::new();
    let entries = match fs::read_dir(links_dir(root)) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e.into()),
    };
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let Some((dev, _dir)) = name.rsplit_once('-') else {
            continue;
        };
        let Some((ifname, index)) = dev.rsplit_once('@') else {
            continue;
        };
        if let Ok(index) = index.parse() {
            out.insert(Device {
                name: decode_name(ifname),
                index,
            });
        }
    }
    Ok(out)
}

/// Removes our links from `dev`: unpinning a TCX link that nothing else
/// holds detaches it.
pub fn detach_pins(root: &Path, dev: &Device) -> Result<()> {
    let pins = Direction::BOTH
        .into_iter()
        .flat_map(|dir| [next_link_pin(root, dev, dir), link_pin(root, dev, dir)]);
    for pin in pins {
        unpin_link(&pin)?;
    }
    Ok(())
}

/// Detaches the link pinned at `pin`, if there is one, and removes the pin.
fn unpin_link(pin: &Path) -> Result<()> {
    match PinnedLink::from_pin(pin) {
        Ok(link) => drop(link.unpin()?),
        Err(_) if !pin.exists() => {}
        Err(_) => fs::remove_file(pin)?,
    }
    Ok(())
}

/// Removes every pin (links first, so no program runs on half-removed
/// maps) and the directory itself.
pub fn cleanup(root: &Path) -> Result<()> {
    sockets::detach_all(root)?;
    for dev in pinned_devices(root)? {
        detach_pins(root, &dev)?;
    }
    let maps = maps_dir(root);
    // Links of an interrupted upgrade, then the maps.
    for dir in [next_links_dir(root), maps.clone()] {
        if !dir.exists() {
            continue;
        }
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    for dir in [next_links_dir(root), links_dir(root), maps] {
        match fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => bail!("removing {}: {e}", dir.display()),
        }
    }
    Ok(())
}

/// Opens a pinned map of a running (or stopped) daemon as its aya type
/// (`HashMap<MapData, K, V>`, `PerCpuArray<MapData, V>`...).
pub fn open_pinned<T: TryFrom<Map, Error = MapError>>(root: &Path, name: &str) -> Result<T> {
    let path = maps_dir(root).join(name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    typed(Map::from_map_data(data)?, name)
}

/// A map as the aya type its user expects; an error names the map.
fn typed<T: TryFrom<Map, Error = MapError>>(map: Map, name: &str) -> Result<T> {
    T::try_from(map).with_context(|| format!("map {name} is not of the expected kind"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_links_take_the_place_of_the_older_ones_and_their_directory_goes() {
        let root = std::env::temp_dir().join(format!("kep-next-test-{}", std::process::id()));
        let dev = Device {
            name: "eth0".into(),
            index: 2,
        };
        fs::create_dir_all(links_dir(&root)).unwrap();
        fs::create_dir_all(next_links_dir(&root)).unwrap();
        fs::write(link_pin(&root, &dev, Direction::Ingress), b"older").unwrap();
        fs::write(next_link_pin(&root, &dev, Direction::Ingress), b"newer").unwrap();
        // A device the older run never attached: the new link is its only one.
        fs::write(next_link_pin(&root, &dev, Direction::Egress), b"newer").unwrap();
        promote_next_links(&root).unwrap();
        let read = |dir| fs::read(link_pin(&root, &dev, dir)).unwrap();
        let (ingress, egress) = (read(Direction::Ingress), read(Direction::Egress));
        let next_gone = !next_links_dir(&root).exists();
        fs::remove_dir_all(&root).unwrap();
        assert_eq!((ingress, egress), (b"newer".to_vec(), b"newer".to_vec()));
        assert!(next_gone);
    }

    #[test]
    fn link_pins_have_no_dots_and_name_their_device() {
        let root = Path::new("/x");
        let dev = Device {
            name: "eth0.100%a-b@c".into(),
            index: 7,
        };
        let pin = link_pin(root, &dev, Direction::Egress);
        let file = pin.file_name().unwrap().to_str().unwrap();
        assert!(!file.contains('.'), "{file}");
        let dir = std::env::temp_dir().join(format!("kep-pin-test-{}", std::process::id()));
        fs::create_dir_all(links_dir(&dir)).unwrap();
        fs::write(links_dir(&dir).join(file), b"").unwrap();
        let found = pinned_devices(&dir).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(found.into_iter().collect::<Vec<_>>(), vec![dev]);
    }
}
