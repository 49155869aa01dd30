//! Map definitions. Names, layouts and sizes come from proxy-common; the
//! `#[btf_map]` form carries BTF so `bpftool map dump` prints field names.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SkStorage},
    macros::btf_map,
};
use proxy_common::*;

const NO_PREALLOC: usize = BPF_F_NO_PREALLOC as usize;

#[btf_map]
pub static KEP_SVC_V2: HashMap<SvcKey, SvcValue, { SVC_MAP_SIZE as usize }, NO_PREALLOC> =
    HashMap::new();

#[btf_map]
pub static KEP_SLOT_V1: HashMap<SlotKey, SlotValue, { SLOT_MAP_SIZE as usize }, NO_PREALLOC> =
    HashMap::new();

#[btf_map]
pub static KEP_BE_V1: HashMap<BackendKey, Backend, { BACKEND_MAP_SIZE as usize }, NO_PREALLOC> =
    HashMap::new();

#[btf_map]
pub static KEP_ADDR_V2: HashMap<AddrKey, AddrValue, { ADDR_MAP_SIZE as usize }, NO_PREALLOC> =
    HashMap::new();

// The test layout (feature `layout-v2-test`, proxy-common's layout.rs)
// names the conntrack and reverse-NAT maps `_V2`; the statics keep their
// names.
#[cfg_attr(not(feature = "layout-v2-test"), btf_map)]
#[cfg_attr(feature = "layout-v2-test", btf_map(name = "KEP_CT_V2"))]
pub static KEP_CT_V1: LruHashMap<FlowKey, NatEntry, { CT_MAP_SIZE as usize }> = LruHashMap::new();

#[cfg_attr(not(feature = "layout-v2-test"), btf_map)]
#[cfg_attr(feature = "layout-v2-test", btf_map(name = "KEP_RNAT_V2"))]
pub static KEP_RNAT_V1: LruHashMap<FlowKey, NatEntry, { RNAT_MAP_SIZE as usize }> =
    LruHashMap::new();

#[btf_map]
pub static KEP_FRAG_V1: LruHashMap<FragKey, FragValue, { FRAG_MAP_SIZE as usize }> =
    LruHashMap::new();

#[btf_map]
pub static KEP_SKPEER_V1: SkStorage<SockPeer> = SkStorage::new();

#[btf_map]
pub static KEP_SKRNAT_V1: LruHashMap<SockRevKey, SockNat, { SOCK_RNAT_MAP_SIZE as usize }> =
    LruHashMap::new();

#[btf_map]
pub static KEP_SKFWD_V1: LruHashMap<SockFwdKey, SockNat, { SOCK_FWD_MAP_SIZE as usize }> =
    LruHashMap::new();

#[btf_map]
pub static KEP_STATS_V2: PerCpuArray<u64, { COUNTER_COUNT as usize }> = PerCpuArray::new();

#[btf_map]
pub static KEP_CFG_V2: Array<Config, 1> = Array::new();

#[btf_map]
pub static KEP_SVCSTAT_V1: PerCpuArray<SvcStats, { SVC_ID_LIMIT as usize }> = PerCpuArray::new();

#[btf_map]
pub static KEP_AFF_V1: LruHashMap<AffKey, AffValue, { AFF_MAP_SIZE as usize }> = LruHashMap::new();

#[btf_map]
pub static KEP_AFFMEM_V1: HashMap<AffMemberKey, u8, { AFFMEM_MAP_SIZE as usize }, NO_PREALLOC> =
    HashMap::new();

#[btf_map]
pub static KEP_SRCRNG_V1: LpmTrie<SrcRangeKey, u8, { SRCRNG_MAP_SIZE as usize }, NO_PREALLOC> =
    LpmTrie::new();

/// Per-CPU working space of the flow logic ([`crate::family::scratch`]);
/// never pinned, never read by userspace.
#[btf_map]
pub static KEP_SCRATCH: PerCpuArray<[u64; crate::family::SCRATCH_WORDS], 1> = PerCpuArray::new();

/// Per-CPU place of the IPv6 header fields of the packet being handled
/// ([`crate::v6`]): parsed by one BPF function, read by the next, and off
/// both their stacks.
#[btf_map]
pub static KEP_IP6SCR: PerCpuArray<[u64; 6], 1> = PerCpuArray::new();

/// Devices whose peer is a pod's (see `PEER_DEV_MAP`): bit `i % 64` of
/// word `i / 64` is set for ifindex `i`. An array, whose lookups the
/// verifier inlines: a hash lookup here cost a translated packet 30-40 ns
/// more in kep-bench, this 0-20.
#[btf_map]
pub static KEP_PEERDEV: Array<u64, { PEER_DEV_WORDS as usize }> = Array::new();

/// Whether an older datapath runs behind this one
/// ([`proxy_common::UPGRADE_MAP`], [`crate::upgrade`]); never pinned.
#[btf_map]
pub static KEP_UPGRADE: Array<u32, 1> = Array::new();

/// Probe filters ([`proxy_common::filter`]): a clear bit spares the
/// lookup in [`KEP_ADDR_V2`]/[`KEP_ADDR6_V1`] (addresses) or in the
/// reverse-NAT maps (backend endpoints). Written by the daemon only.
#[btf_map]
pub static KEP_ADDRBITS_V1: Array<u64, { FILTER_WORDS as usize }> = Array::new();

#[btf_map]
pub static KEP_EPBITS_V1: Array<u64, { FILTER_WORDS as usize }> = Array::new();

/// Sources of reverse-NAT entries ([`proxy_common::REPLY_SOURCE_MAP`]).
#[btf_map]
pub static KEP_RSRC_V1: Array<u8, { FILTER_BITS as usize }> = Array::new();

/// This load's trust in [`KEP_RSRC_V1`] ([`proxy_common::REPLY_GATE_MAP`]);
/// never pinned.
#[btf_map]
pub static KEP_RGATE: Array<u32, 1> = Array::new();

/// Whether a reverse-NAT entry may come from the endpoint of `slot`
/// ([`crate::family::Addr::endpoint_slot`]): its byte in [`KEP_RSRC_V1`]
/// once this load trusts it, else its bit in the endpoint filter.
#[inline(always)]
pub fn may_send_replies(slot: u32) -> bool {
    if KEP_RGATE.get(0).is_some_and(|ready| *ready != 0) {
        KEP_RSRC_V1.get(slot).is_none_or(|b| *b != 0)
    } else {
        filter_has(&KEP_EPBITS_V1, slot)
    }
}

/// Before a reverse-NAT entry from the endpoint of `slot` is written.
#[inline(always)]
pub fn mark_reply_source(slot: u32) {
    if let Some(b) = KEP_RSRC_V1.get_ptr_mut(slot) {
        // SAFETY: a byte of the map's value area; a plain store, so no
        // other writer's byte is undone. Read first: most are set already,
        // and a store would dirty the cache line on every new flow.
        unsafe {
            if *b == 0 {
                *b = 1;
            }
        }
    }
}

/// Whether `bit` of a probe filter is set: whether the lookup it stands
/// for may find something. (A word the verifier cannot prove there is
/// read as "look it up".)
#[inline(always)]
pub fn filter_has(filter: &Array<u64, { FILTER_WORDS as usize }>, bit: u32) -> bool {
    let (word, mask) = filter_word(bit);
    filter.get(word).is_none_or(|w| *w & mask != 0)
}

/// Written and read by userspace only; defined here so that the object
/// carries it (and its BTF) like every other map.
#[btf_map]
pub static KEP_NAME_V1: HashMap<u32, SvcName, { SVC_MAP_SIZE as usize }, NO_PREALLOC> =
    HashMap::new();

/// Counts a translated packet of a service port, or (with `new_flow`) a
/// new flow it balanced.
#[inline(always)]
pub fn count_service(svc_id: u32, bytes: u32, new_flow: bool) {
    if let Some(s) = KEP_SVCSTAT_V1.get_ptr_mut(svc_id) {
        // SAFETY: per-CPU slot, see count().
        unsafe {
            if new_flow {
                (*s).new_flows += 1;
            } else {
                (*s).packets += 1;
                (*s).bytes += bytes as u64;
            }
        }
    }
}

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = KEP_STATS_V2.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU slot is only touched by programs on this CPU,
        // which do not preempt each other.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub fn addr_class(addr: [u8; 4]) -> u8 {
    if !filter_has(&KEP_ADDRBITS_V1, addr_bit(addr)) {
        return 0;
    }
    // SAFETY: the value is copied out before anything else can touch it.
    match unsafe { KEP_ADDR_V2.get(AddrKey { addr }) } {
        Some(v) => v.class,
        None => 0,
    }
}

/// The daemon's configuration; the defaults (no cluster CIDR, no service
/// CIDR) until it has written one.
#[inline(always)]
pub fn config() -> Config {
    match KEP_CFG_V2.get(0) {
        Some(c) if c.snat_port_min != 0 && c.snat_port_min <= c.snat_port_max => *c,
        _ => Config {
            snat_port_min: SNAT_PORT_MIN,
            snat_port_max: SNAT_PORT_MAX,
            hairpin_addr: HAIRPIN_ADDR,
            ..Config::default()
        },
    }
}

/// The daemon's configuration in place (no copy on the stack), `None`
/// until it has written one.
#[inline(always)]
pub fn config_ref() -> Option<&'static Config> {
    KEP_CFG_V2.get(0)
}

/// Whether `addr` lies in a service CIDR (the caller knows it is no
/// ClusterIP): kube-proxy drops traffic to unallocated service addresses.
#[inline(always)]
pub fn in_service_cidr(addr: [u8; 4]) -> bool {
    let Some(c) = KEP_CFG_V2.get(0) else {
        return false;
    };
    let mut i = 0;
    while i < SERVICE_CIDRS {
        if in_prefix(addr, c.service_cidrs[i], c.service_cidr_lens[i]) {
            return true;
        }
        i += 1;
    }
    false
}

// IPv6 twins of the maps that hold addresses (proxy_common::v6).

#[btf_map]
pub static KEP_SVC6_V1: HashMap<SvcKey6, SvcValue, { SVC6_MAP_SIZE as usize }, NO_PREALLOC> =
    HashMap::new();

#[btf_map]
pub static KEP_BE6_V1: HashMap<BackendKey, Backend6, { BACKEND6_MAP_SIZE as usize }, NO_PREALLOC> =
    HashMap::new();

#[btf_map]
pub static KEP_ADDR6_V1: HashMap<AddrKey6, AddrValue, { ADDR6_MAP_SIZE as usize }, NO_PREALLOC> =
    HashMap::new();

#[cfg_attr(not(feature = "layout-v2-test"), btf_map)]
#[cfg_attr(feature = "layout-v2-test", btf_map(name = "KEP_CT6_V2"))]
pub static KEP_CT6_V1: LruHashMap<FlowKey6, NatEntry6, { CT6_MAP_SIZE as usize }> =
    LruHashMap::new();

#[cfg_attr(not(feature = "layout-v2-test"), btf_map)]
#[cfg_attr(feature = "layout-v2-test", btf_map(name = "KEP_RNAT6_V2"))]
pub static KEP_RNAT6_V1: LruHashMap<FlowKey6, NatEntry6, { RNAT6_MAP_SIZE as usize }> =
    LruHashMap::new();

#[btf_map]
pub static KEP_FRAG6_V1: LruHashMap<FragKey6, FragValue, { FRAG6_MAP_SIZE as usize }> =
    LruHashMap::new();

#[btf_map]
pub static KEP_AFF6_V1: LruHashMap<AffKey6, AffValue, { AFF6_MAP_SIZE as usize }> =
    LruHashMap::new();

#[btf_map]
pub static KEP_SRCRNG6_V1: LpmTrie<SrcRangeKey6, u8, { SRCRNG6_MAP_SIZE as usize }, NO_PREALLOC> =
    LpmTrie::new();

#[btf_map]
pub static KEP_CFG6_V1: Array<Config6, 1> = Array::new();

#[btf_map]
pub static KEP_SKPEER6_V1: SkStorage<SockPeer6> = SkStorage::new();

#[btf_map]
pub static KEP_SKRNAT6_V1: LruHashMap<SockRevKey6, SockNat6, { SOCK_RNAT_MAP_SIZE as usize }> =
    LruHashMap::new();

#[btf_map]
pub static KEP_SKFWD6_V1: LruHashMap<SockFwdKey6, SockNat6, { SOCK_FWD_MAP_SIZE as usize }> =
    LruHashMap::new();
