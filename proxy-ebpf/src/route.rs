//! Sending a translated packet on its way with a FIB lookup and a redirect.
//!
//! Handing the packet back to the stack is not enough: a NodePort reply
//! rewritten to come from the node's own address would be dropped as a
//! martian, a reply from a ClusterIP fails strict reverse-path filtering, and
//! a packet of a node process was already routed towards the old
//! destination before the egress hook saw it.

use core::mem::{size_of, zeroed};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_INGRESS, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SRC,
        TC_ACT_OK, bpf_fib_lookup as FibParams,
    },
    helpers::generated::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    programs::TcContext,
};
use proxy_common::NAT_F_TO_LO;

use crate::{Hook, family::Addr, maps::KEP_PEERDEV};

/// The loopback device's index, the same in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

#[inline(always)]
pub fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the context pointer is valid for the whole program run.
    unsafe { (*ctx.skb.skb).ifindex }
}

#[inline(always)]
fn lookup<A: Addr>(ctx: &TcContext, src: A, dst: A, proto: u8, flags: u32) -> (i64, FibParams) {
    // SAFETY: bpf_fib_lookup is plain old data; all-zero is a valid request.
    let mut p: FibParams = unsafe { zeroed() };
    A::fib_request(&mut p, src, dst);
    p.l4_protocol = proto;
    p.ifindex = ifindex(ctx);
    // SAFETY: p is a valid, writable bpf_fib_lookup of the size we pass.
    let rc = unsafe { bpf_fib_lookup(ctx.as_ptr(), &mut p, size_of::<FibParams>() as i32, flags) };
    (rc, p)
}

/// Forwards a translated packet (its translation's `NAT_F_*` are `flags`):
/// straight to the egress of the device the FIB names, or, from the
/// ingress hook to a local pod, into the pod's own namespace (see
/// [`into_pod`]); to the stack when the destination is local or the FIB
/// has no answer. The addresses
/// are read back from the packet, which carries the new ones. A BPF
/// function of its own: its lookup parameters stay off the frames of the
/// flow handling.
#[inline(never)]
pub fn forward<A: Addr>(ctx: &TcContext, hook: Hook, flags: u8, proto: u8) -> i32 {
    if flags & NAT_F_TO_LO != 0 {
        return to_loopback(ctx);
    }
    let (Some(saddr), Some(daddr)) = (A::read(ctx, A::SRC_OFF), A::read(ctx, A::DST_OFF)) else {
        return TC_ACT_OK as i32;
    };
    // An input-style lookup from the device the packet is on, also on
    // egress: an output lookup would be pinned to that device (the kernel
    // takes `ifindex` as the output interface), and a local process's packet
    // may have to leave by another one.
    let (rc, p) = lookup(ctx, saddr, daddr, proto, 0);
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            let mut macs = [0u8; 12];
            macs[..6].copy_from_slice(&p.dmac);
            macs[6..].copy_from_slice(&p.smac);
            if ctx.store(0, &macs, 0).is_err() {
                return TC_ACT_OK as i32;
            }
            if hook == Hook::Ingress && into_pod(p.ifindex) {
                // SAFETY: plain helper call.
                return unsafe { bpf_redirect_peer(p.ifindex, 0) as i32 };
            }
            // SAFETY: plain helper call.
            unsafe { bpf_redirect(p.ifindex, 0) as i32 }
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            // Let the kernel resolve the neighbour (and queue the packet
            // meanwhile), using its own route lookup for the next hop.
            // SAFETY: a null params pointer is documented to mean "look up".
            unsafe { bpf_redirect_neigh(p.ifindex, core::ptr::null_mut(), 0, 0) as i32 }
        }
        _ => TC_ACT_OK as i32,
    }
}

/// Whether a packet for the device `ifindex` may go straight to its peer,
/// a pod's interface in the pod's namespace (bpf_redirect_peer): the
/// packet then skips the host-side veth's transmit, its egress hook and
/// the backlog queue a veth hands packets to, and is received in the pod
/// at once. The kernel allows that from the ingress hook only, and drops
/// the packet when the device has no peer in another namespace: the
/// daemon lists the devices that do. The MACs are the FIB's, as for a
/// plain redirect: the pod's own as destination.
#[inline(always)]
fn into_pod(ifindex: u32) -> bool {
    KEP_PEERDEV
        .get(ifindex / 64)
        .is_some_and(|word| word & (1 << (ifindex % 64)) != 0)
}

/// The address this node would use as source towards `dst`: what a
/// masquerading NAT picks for SNAT.
#[inline(always)]
pub fn source_for<A: Addr>(ctx: &TcContext, dst: A, proto: u8) -> Option<A> {
    let (rc, p) = lookup(ctx, A::ZERO, dst, proto, BPF_FIB_LOOKUP_SRC);
    let src = A::fib_source(&p);
    if (rc as u32 == BPF_FIB_LKUP_RET_SUCCESS || rc as u32 == BPF_FIB_LKUP_RET_NO_NEIGH)
        && src != A::ZERO
    {
        Some(src)
    } else {
        None
    }
}

/// Delivers a packet whose source and destination are both this node's
/// addresses into the node's stack, as if a local process had sent it over
/// lo: on any other device the kernel would drop it as a martian. lo's
/// address is all zeroes, and a frame for another MAC would be taken for
/// another host's.
#[inline(always)]
fn to_loopback(ctx: &TcContext) -> i32 {
    if ctx.store(0, &[0u8; 12], 0).is_err() {
        return TC_ACT_OK as i32;
    }
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(LOOPBACK_IFINDEX, BPF_F_INGRESS as u64) as i32 }
}
