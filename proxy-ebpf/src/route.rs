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
    helpers::generated::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use proxy_common::{NAT_F_TO_LO, NatEntry};

/// The loopback device's index, the same in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

const AF_INET: u8 = 2;

#[inline(always)]
pub fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the context pointer is valid for the whole program run.
    unsafe { (*ctx.skb.skb).ifindex }
}

#[inline(always)]
fn lookup(ctx: &TcContext, src: [u8; 4], dst: [u8; 4], proto: u8, flags: u32) -> (i64, FibParams) {
    // SAFETY: bpf_fib_lookup is plain old data; all-zero is a valid request.
    let mut p: FibParams = unsafe { zeroed() };
    p.family = AF_INET;
    p.l4_protocol = proto;
    p.ifindex = ifindex(ctx);
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    // SAFETY: p is a valid, writable bpf_fib_lookup of the size we pass.
    let rc = unsafe { bpf_fib_lookup(ctx.as_ptr(), &mut p, size_of::<FibParams>() as i32, flags) };
    (rc, p)
}

/// Forwards a packet that now carries the tuple `to`: straight to the
/// egress of the device the FIB names, or to the stack when the destination
/// is local or the FIB has no answer. A BPF function of its own: its
/// lookup parameters stay off the frames of the flow handling.
#[inline(never)]
pub fn forward(ctx: &TcContext, to: &NatEntry, proto: u8) -> i32 {
    if to.flags & NAT_F_TO_LO != 0 {
        return to_loopback(ctx);
    }
    // An input-style lookup from the device the packet is on, also on
    // egress: an output lookup would be pinned to that device (the kernel
    // takes `ifindex` as the output interface), and a local process's packet
    // may have to leave by another one.
    let (rc, p) = lookup(ctx, to.saddr, to.daddr, proto, 0);
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            let mut macs = [0u8; 12];
            macs[..6].copy_from_slice(&p.dmac);
            macs[6..].copy_from_slice(&p.smac);
            if ctx.store(0, &macs, 0).is_err() {
                return TC_ACT_OK as i32;
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

/// The address this node would use as source towards `dst`: what a
/// masquerading NAT picks for SNAT.
#[inline(always)]
pub fn source_for(ctx: &TcContext, dst: [u8; 4], proto: u8) -> Option<[u8; 4]> {
    let (rc, p) = lookup(ctx, [0; 4], dst, proto, BPF_FIB_LOOKUP_SRC);
    // SAFETY: reading the union member the kernel filled for AF_INET.
    let src = unsafe { p.__bindgen_anon_3.ipv4_src };
    if (rc as u32 == BPF_FIB_LKUP_RET_SUCCESS || rc as u32 == BPF_FIB_LKUP_RET_NO_NEIGH) && src != 0
    {
        Some(src.to_ne_bytes())
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
