//! Choosing a backend for a new flow: the one place where a frontend's
//! rules apply (source ranges, traffic policies, session affinity, empty
//! sets). The TC programs use it for every new flow; the socket-level hooks
//! call the same function, and both families compile it.

use aya_ebpf::helpers::generated::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use proxy_common::*;

use crate::{
    family::{Addr, Be},
    maps::{KEP_AFFMEM_V1, KEP_SLOT_V1},
};

/// Where a new flow comes from, for externalTrafficPolicy Local.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Scope {
    /// A pod of the cluster or a process of this node: no external load
    /// balancer is involved, so every endpoint may serve it.
    Internal,
    /// Anything else: externalTrafficPolicy Local applies.
    External,
}

/// The outcome of [`select`].
pub enum Pick<A> {
    Backend(u32, Be<A>),
    /// Answer ICMP port unreachable (kube-proxy's REJECT), counted so.
    Reject(Counter),
    /// Drop silently, counted so.
    Drop(Counter),
}

/// Picks the backend of a new flow from `client` to the frontend `svc` at
/// random. `scope` is only read for externalTrafficPolicy Local frontends,
/// so the caller may compute it lazily.
#[inline(always)]
pub fn select<A: Addr>(svc: &SvcValue, client: A, scope: impl FnOnce() -> Scope) -> Pick<A> {
    // SAFETY: plain helper call.
    select_by(svc, client, unsafe { bpf_get_prandom_u32() }, scope)
}

/// [`select`] with the slot chosen by `spread` (a random number, or a hash
/// of the flow's tuple so that the same flow gets the same backend again
/// while the backend set is unchanged).
#[inline(always)]
pub fn select_by<A: Addr>(
    svc: &SvcValue,
    client: A,
    spread: u32,
    scope: impl FnOnce() -> Scope,
) -> Pick<A> {
    if svc.flags & SVC_F_SRC_RANGES != 0 && !A::source_allowed(svc.svc_id, client) {
        return Pick::Drop(Counter::DropSourceRange);
    }
    if svc.count == 0 {
        return if svc.flags & SVC_F_DROP_EMPTY != 0 {
            Pick::Drop(Counter::DropNoLocalEndpoint)
        } else {
            Pick::Reject(Counter::DropNoEndpoint)
        };
    }
    let local_only = svc.flags & SVC_F_ETP_LOCAL != 0 && scope() == Scope::External;
    let (first, n) = if local_only {
        if svc.local_count == 0 {
            return Pick::Drop(Counter::DropNoLocalEndpoint);
        }
        (svc.count, svc.local_count)
    } else {
        (0, svc.count)
    };
    if svc.flags & SVC_F_AFFINITY == 0 {
        return slot_of(svc, first, n, spread);
    }
    with_affinity(svc, client, first, n, local_only, spread)
}

/// The slot `spread % n` from `first`.
#[inline(always)]
fn slot_of<A: Addr>(svc: &SvcValue, first: u16, n: u16, spread: u32) -> Pick<A> {
    let slot = SlotKey {
        svc_id: svc.svc_id,
        generation: svc.generation,
        slot: first + (spread % n as u32) as u16,
    };
    // SAFETY: copied out at once.
    let Some(backend_id) = (unsafe { KEP_SLOT_V1.get(slot) }).map(|s| s.backend_id) else {
        return Pick::Drop(Counter::DropMapError);
    };
    match A::backend(backend_id) {
        Some(be) => Pick::Backend(backend_id, be),
        None => Pick::Drop(Counter::DropMapError),
    }
}

/// sessionAffinity ClientIP: the client's backend while it is still a
/// member of the frontend (and local, when only local ones may serve) and
/// the client opened a flow within the timeout; otherwise a fresh pick,
/// remembered. Like kube-proxy, the timeout counts from the last new flow.
#[inline(always)]
fn with_affinity<A: Addr>(
    svc: &SvcValue,
    client: A,
    first: u16,
    n: u16,
    local_only: bool,
    spread: u32,
) -> Pick<A> {
    // SAFETY: plain helper call.
    let now = (unsafe { bpf_ktime_get_ns() } / 1_000_000_000) as u32;
    if let Some(aff) = A::affinity(svc.svc_id, client)
        && now.wrapping_sub(aff.last_seen) <= svc.affinity_timeout
        && is_member(svc.svc_id, aff.backend_id)
        && let Some(be) = A::backend(aff.backend_id)
        && (!local_only || be.flags & BE_F_LOCAL != 0)
    {
        remember(svc.svc_id, client, aff.backend_id, now);
        return Pick::Backend(aff.backend_id, be);
    }
    let pick = slot_of(svc, first, n, spread);
    if let Pick::Backend(id, _) = pick {
        remember(svc.svc_id, client, id, now);
    }
    pick
}

#[inline(always)]
fn is_member(svc_id: SvcId, backend_id: u32) -> bool {
    // SAFETY: only tested for presence.
    unsafe { KEP_AFFMEM_V1.get(AffMemberKey { svc_id, backend_id }) }.is_some()
}

#[inline(always)]
fn remember<A: Addr>(svc_id: SvcId, client: A, backend_id: u32, now: u32) {
    let value = AffValue {
        backend_id,
        last_seen: now,
    };
    A::set_affinity(svc_id, client, value);
}

/// A hash of a flow's tuple as the client sent it (murmur3's finalizer over
/// its 32-bit words; the padding is zero): the same flow always gets the
/// same slot, so a flow whose conntrack entry was evicted from the full LRU
/// map is balanced to the backend it had, while the set is unchanged.
#[inline(always)]
pub fn flow_hash<A: Addr>(key: &crate::family::Tuple<A>) -> u32 {
    const WORDS: usize = 16;
    let words = core::mem::size_of::<crate::family::Tuple<A>>() / 4;
    let p = (key as *const crate::family::Tuple<A>).cast::<u32>();
    let mut h: u32 = 0x9e37_79b9;
    for i in 0..WORDS {
        if i >= words {
            break;
        }
        // SAFETY: within the tuple (i < its size in words).
        let w = unsafe { p.add(i).read_unaligned() };
        h = (h ^ w).wrapping_mul(0xcc9e_2d51);
        h = h.rotate_left(13);
    }
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}
