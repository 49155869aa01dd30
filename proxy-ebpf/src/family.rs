//! What differs between IPv4 and IPv6 for the flow logic: the address type,
//! the maps it is looked up in, and how an address is rewritten. The flow
//! handling ([`crate::flow`]), backend selection ([`crate::lb`]), rewriting
//! ([`crate::nat`]) and routing ([`crate::route`]) are written once, over
//! [`Addr`], and compiled for each family.
//!
//! The generic [`Tuple`], [`Nat`] and [`Be`] have the layouts of the maps'
//! own types (`FlowKey`/`FlowKey6`, `NatEntry`/`NatEntry6`,
//! `Backend`/`Backend6`), which stay plain structs so that their BTF, and
//! `bpftool map dump`, name them plainly.

use aya_ebpf::{bindings::bpf_fib_lookup as FibParams, programs::TcContext};
use proxy_common::{AffValue, Counter, FragValue, SvcValue};

use crate::{
    Hook,
    maps::{KEP_EPBITS_V1, KEP_SCRATCH, filter_has, may_send_replies},
    packet::Ip,
};

/// A flow as seen on the wire: the layout of `FlowKey` and `FlowKey6`.
///
/// The generic types are 8-byte aligned (the map types, all bytes, are
/// not) so that copies move words, not bytes: byte-wise copies of IPv6
/// addresses fill the BPF stack with spills. Map values are 8-byte aligned
/// by the kernel, so a map's entry is a valid [`Nat`] in place.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct Tuple<A> {
    pub saddr: A,
    pub daddr: A,
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Rewrite to this tuple: the layout of `NatEntry` and `NatEntry6`.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct Nat<A> {
    pub saddr: A,
    pub daddr: A,
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub svc_id: u32,
    pub backend_id: u32,
    /// `NAT_F_*`.
    pub flags: u8,
    pub _pad: [u8; 3],
    /// The test layout's field (proxy-common's layout.rs).
    #[cfg(feature = "layout-v2-test")]
    pub v2_test: [u8; 8],
}

/// A backend: the fields of `Backend` and `Backend6` the flow logic uses.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct Be<A> {
    pub addr: A,
    pub port: [u8; 2],
    /// `BE_F_*`.
    pub flags: u8,
}

/// The working state of a new flow, kept in a per-CPU map rather than on
/// the stack: a chain of BPF calls shares 512 bytes, and IPv6 tuples are
/// large.
#[repr(C)]
pub struct Scratch<A> {
    /// The flow as the client sent it.
    pub key: Tuple<A>,
    pub fwd: Nat<A>,
    pub rev: Nat<A>,
    /// A reverse-NAT key being claimed.
    pub reply: Tuple<A>,
    /// The flow that holds the SNAT port being claimed.
    pub holder: Tuple<A>,
    pub be: Be<A>,
    /// The source's [`crate::lb::Scope`] once it was needed.
    pub scope: u8,
    /// [`crate::lb::flow_hash`] of `key`, computed where the flow is found
    /// to be new (a frame outside the deepest call chain).
    pub hash: u32,
}

/// Size of the scratch map's value in 8-byte words: the IPv6 [`Scratch`].
#[cfg(not(feature = "layout-v2-test"))]
pub const SCRATCH_WORDS: usize = 31;
/// The test layout's [`Nat`] is 8 bytes longer.
#[cfg(feature = "layout-v2-test")]
pub const SCRATCH_WORDS: usize = 33;

/// This CPU's scratch space. A program run is never interrupted by another
/// on the same CPU, so it is ours until the run ends.
#[inline(always)]
pub fn scratch<A: Addr>() -> Option<&'static mut Scratch<A>> {
    const { assert!(core::mem::size_of::<Scratch<A>>() <= SCRATCH_WORDS * 8) };
    let p = KEP_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: 8-byte aligned and large enough (checked above); per-CPU.
    Some(unsafe { &mut *p.cast::<Scratch<A>>() })
}

/// An address family, implemented by its address type (`[u8; 4]`,
/// `[u8; 16]`).
pub trait Addr: Copy + PartialEq + 'static {
    /// The unspecified address (NodePort frontends, "no address").
    const ZERO: Self;
    /// Offsets of the source and destination address in the frame.
    const SRC_OFF: usize;
    const DST_OFF: usize;

    /// The `ADDR_*` class bits of this address (0: none).
    fn class(self) -> u8;
    /// The slot of this address and port in the endpoint filters
    /// ([`proxy_common::filter`]).
    fn endpoint_slot(self, port: [u8; 2]) -> u32;
    /// Whether this address and port may be a backend's: a socket's
    /// translated peer (false: certainly not).
    #[inline(always)]
    fn may_be_endpoint(self, port: [u8; 2]) -> bool {
        filter_has(&KEP_EPBITS_V1, self.endpoint_slot(port))
    }
    /// Whether a reverse-NAT entry may translate a reply from this address
    /// and port (false: certainly not).
    #[inline(always)]
    fn may_send_replies(self, port: [u8; 2]) -> bool {
        may_send_replies(self.endpoint_slot(port))
    }
    /// Whether this address lies in a service CIDR of its family.
    fn in_service_cidr(self) -> bool;
    /// Whether this address lies in the family's cluster CIDR; `None` when
    /// no cluster CIDR of the family is configured.
    fn in_cluster_cidr(self) -> Option<bool>;
    /// The hairpin source address of the family.
    fn hairpin() -> Self;
    /// The address at `off` in the packet.
    fn read(ctx: &TcContext, off: usize) -> Option<Self>;

    /// The conntrack entry in place.
    fn ct(key: &Tuple<Self>) -> Option<*mut Nat<Self>>;
    fn set_ct(key: &Tuple<Self>, value: &Nat<Self>) -> Result<(), i32>;
    /// The reverse-NAT entry in place.
    fn rnat(key: &Tuple<Self>) -> Option<*mut Nat<Self>>;
    fn set_rnat(key: &Tuple<Self>, value: &Nat<Self>, flags: u64) -> Result<(), i32>;
    fn service(addr: Self, port: [u8; 2], proto: u8) -> Option<SvcValue>;
    fn backend(backend_id: u32) -> Option<Be<Self>>;
    fn affinity(svc_id: u32, client: Self) -> Option<AffValue>;
    fn set_affinity(svc_id: u32, client: Self, value: AffValue);
    /// Whether `client` is inside the loadBalancerSourceRanges of `svc_id`.
    fn source_allowed(svc_id: u32, client: Self) -> bool;
    /// The ports a first fragment recorded for a later one.
    fn fragment(ip: &Ip<Self>) -> Option<FragValue>;
    fn set_fragment(ip: &Ip<Self>, ports: FragValue);

    /// Fills the family, source and destination of a FIB lookup.
    fn fib_request(p: &mut FibParams, src: Self, dst: Self);
    /// The source address a FIB lookup with `BPF_FIB_LOOKUP_SRC` chose.
    fn fib_source(p: &FibParams) -> Self;
    /// Rewrites the address at `off` from `old` to `new`, keeping the
    /// checksums (the L4 one at `l4_csum`, when there is one) right.
    fn rewrite_addr(
        ctx: &TcContext,
        off: usize,
        old: Self,
        new: Self,
        l4_csum: Option<usize>,
        mangled: u64,
    ) -> Result<(), i32>;
    /// Answers the packet with the family's ICMP port unreachable.
    fn reject(ctx: &TcContext, ip: &Ip<Self>, hook: Hook, reason: Counter) -> i32;
    /// The debug event of a new flow (removed by the verifier unless the
    /// daemon runs with --bpf-debug).
    fn log_new_flow(ctx: &TcContext, key: &Tuple<Self>, svc_id: u32, be: &Be<Self>);
}

/// Views of the generic types as a family's map types, which have the same
/// fields in the same order: keys and entries go to the maps by reference,
/// without copies on the (small) BPF stack.
macro_rules! map_types {
    ($addr:ty, $key:ident, $nat:ident, $backend:ident) => {
        const _: () = {
            use core::mem::{align_of, size_of};
            assert!(size_of::<Tuple<$addr>>() == size_of::<$key>());
            assert!(align_of::<Tuple<$addr>>() >= align_of::<$key>());
            assert!(size_of::<Nat<$addr>>() == size_of::<$nat>());
        };

        impl Tuple<$addr> {
            #[inline(always)]
            pub fn as_key(&self) -> &$key {
                // SAFETY: both are repr(C) with the same field types in the
                // same order (sizes checked above); Tuple is more aligned.
                unsafe { &*(self as *const Self).cast::<$key>() }
            }
        }

        impl Nat<$addr> {
            #[inline(always)]
            pub fn as_entry(&self) -> &$nat {
                // SAFETY: as for Tuple::as_key.
                unsafe { &*(self as *const Self).cast::<$nat>() }
            }
        }

        impl From<&$backend> for Be<$addr> {
            #[inline(always)]
            fn from(b: &$backend) -> Be<$addr> {
                Be {
                    addr: b.addr,
                    port: b.port,
                    flags: b.flags,
                }
            }
        }
    };
}

pub(crate) use map_types;

/// The trait methods that only look up or update a family's maps, the same
/// for both families but for the maps' names and key types.
macro_rules! map_access {
    (
        ct: $ct:ident, rnat: $rnat:ident, svc: $svc:ident, svc_key: $svc_key:ident,
        backends: $backends:ident, aff: $aff:ident, aff_key: $aff_key:ident,
        ranges: $ranges:ident, range_key: $range_key:ident, bits: $bits:expr,
        frags: $frags:ident $(,)?
    ) => {
        #[inline(always)]
        fn ct(key: &Tuple<Self>) -> Option<*mut Nat<Self>> {
            // Same layout (see map_types!).
            $ct.get_ptr_mut(key.as_key()).map(|p| p.cast())
        }

        #[inline(always)]
        fn set_ct(key: &Tuple<Self>, value: &Nat<Self>) -> Result<(), i32> {
            $ct.insert(key.as_key(), value.as_entry(), 0)
        }

        #[inline(always)]
        fn rnat(key: &Tuple<Self>) -> Option<*mut Nat<Self>> {
            // Same layout (see map_types!).
            $rnat.get_ptr_mut(key.as_key()).map(|p| p.cast())
        }

        /// Marks the entry's source first ([`crate::maps::mark_reply_source`]).
        #[inline(always)]
        fn set_rnat(key: &Tuple<Self>, value: &Nat<Self>, flags: u64) -> Result<(), i32> {
            crate::maps::mark_reply_source(key.saddr.endpoint_slot(key.sport));
            $rnat.insert(key.as_key(), value.as_entry(), flags)
        }

        #[inline(always)]
        fn service(addr: Self, port: [u8; 2], proto: u8) -> Option<SvcValue> {
            let key = $svc_key {
                addr,
                port,
                proto,
                _pad: 0,
            };
            // SAFETY: copied out at once.
            unsafe { $svc.get(key) }.copied()
        }

        #[inline(always)]
        fn backend(backend_id: u32) -> Option<Be<Self>> {
            // SAFETY: copied out at once.
            unsafe { $backends.get(BackendKey { backend_id }) }.map(Be::from)
        }

        #[inline(always)]
        fn affinity(svc_id: u32, client: Self) -> Option<AffValue> {
            // SAFETY: copied out at once.
            unsafe { $aff.get($aff_key { svc_id, client }) }.copied()
        }

        #[inline(always)]
        fn set_affinity(svc_id: u32, client: Self, value: AffValue) {
            // A full LRU evicts its oldest entry; an error here only costs the
            // client its affinity, never the flow.
            let _ = $aff.insert($aff_key { svc_id, client }, value, 0);
        }

        #[inline(always)]
        fn source_allowed(svc_id: u32, client: Self) -> bool {
            let key = aya_ebpf::maps::lpm_trie::Key::new(
                $range_key::prefix_len($bits),
                $range_key {
                    svc_id: svc_id.to_be_bytes(),
                    addr: client,
                },
            );
            $ranges.get(&key).is_some()
        }

        #[inline(always)]
        fn fragment(ip: &Ip<Self>) -> Option<FragValue> {
            // SAFETY: copied out at once.
            unsafe { $frags.get(frag_key(ip)) }.copied()
        }

        #[inline(always)]
        fn set_fragment(ip: &Ip<Self>, ports: FragValue) {
            let _ = $frags.insert(frag_key(ip), ports, 0);
        }
    };
}

pub(crate) use map_access;
