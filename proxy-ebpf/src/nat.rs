//! Rewriting addresses and ports. Checksums are updated incrementally with
//! the kernel helpers, which also handle CHECKSUM_PARTIAL packets from local
//! sockets (only the pseudo-header part is adjusted) and UDP's "no checksum".

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use proxy_common::{Counter, IPPROTO_UDP};

use crate::{
    drop_packet,
    family::{Addr, Nat},
    packet::{IP_CSUM_OFF, Ip, Ports},
};

/// Rewrites the packet's addresses and ports to those of `to`.
#[inline(always)]
pub fn rewrite<A: Addr>(
    ctx: &TcContext,
    ip: &Ip<A>,
    ports: &Ports,
    to: &Nat<A>,
) -> Result<(), i32> {
    // A zero UDP checksum means "none"; MARK_MANGLED_0 keeps a computed zero
    // from turning into that.
    let mangled = if ip.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    if to.saddr != ip.saddr {
        A::rewrite_addr(ctx, A::SRC_OFF, ip.saddr, to.saddr, ports.csum_off, mangled)?;
    }
    if to.daddr != ip.daddr {
        A::rewrite_addr(ctx, A::DST_OFF, ip.daddr, to.daddr, ports.csum_off, mangled)?;
    }
    if ports.has_l4 {
        if to.sport != ports.sport {
            port(ctx, ip.l4, ports.sport, to.sport, ports.csum_off, mangled)?;
        }
        if to.dport != ports.dport {
            port(
                ctx,
                ip.l4 + 2,
                ports.dport,
                to.dport,
                ports.csum_off,
                mangled,
            )?;
        }
    }
    Ok(())
}

/// An IPv4 address: the IP header checksum covers it, and the L4 checksum
/// through the pseudo-header.
#[inline(always)]
pub fn addr4(
    ctx: &TcContext,
    off: usize,
    old: [u8; 4],
    new: [u8; 4],
    l4_csum: Option<usize>,
    mangled: u64,
) -> Result<(), i32> {
    let from = u32::from_ne_bytes(old) as u64;
    let to = u32::from_ne_bytes(new) as u64;
    if let Some(csum) = l4_csum {
        ctx.l4_csum_replace(csum, from, to, BPF_F_PSEUDO_HDR as u64 | mangled | 4)
            .map_err(|_| drop_packet(Counter::DropHelperError))?;
    }
    ctx.l3_csum_replace(IP_CSUM_OFF, from, to, 4)
        .map_err(|_| drop_packet(Counter::DropHelperError))?;
    ctx.store(off, &new, 0)
        .map_err(|_| drop_packet(Counter::DropHelperError))
}

/// An IPv6 address: no IP header checksum, only the L4 checksum through
/// the pseudo-header, adjusted by the difference of the 16 bytes.
#[inline(always)]
pub fn addr6(
    ctx: &TcContext,
    off: usize,
    old: [u8; 16],
    new: [u8; 16],
    l4_csum: Option<usize>,
    mangled: u64,
) -> Result<(), i32> {
    if let Some(csum) = l4_csum {
        let diff = csum_diff(&old, &new, 0);
        // Size 0: `to` is a checksum difference to fold in.
        ctx.l4_csum_replace(
            csum,
            0,
            diff as u32 as u64,
            BPF_F_PSEUDO_HDR as u64 | mangled,
        )
        .map_err(|_| drop_packet(Counter::DropHelperError))?;
    }
    ctx.store(off, &new, 0)
        .map_err(|_| drop_packet(Counter::DropHelperError))
}

/// The one's complement difference of replacing `from` by `to` (both
/// multiples of 4 bytes), added to `seed`.
#[inline(always)]
pub fn csum_diff(from: &[u8], to: &[u8], seed: u32) -> i64 {
    let from_ptr = if from.is_empty() {
        core::ptr::null_mut()
    } else {
        from.as_ptr() as *mut u32
    };
    // SAFETY: both slices are readable memory of the sizes passed; the
    // helper does not write through its pointers.
    unsafe {
        aya_ebpf::helpers::generated::bpf_csum_diff(
            from_ptr,
            from.len() as u32,
            to.as_ptr() as *mut u32,
            to.len() as u32,
            seed,
        )
    }
}

#[inline(always)]
fn port(
    ctx: &TcContext,
    off: usize,
    old: [u8; 2],
    new: [u8; 2],
    l4_csum: Option<usize>,
    mangled: u64,
) -> Result<(), i32> {
    if let Some(csum) = l4_csum {
        let from = u16::from_ne_bytes(old) as u64;
        let to = u16::from_ne_bytes(new) as u64;
        ctx.l4_csum_replace(csum, from, to, mangled | 2)
            .map_err(|_| drop_packet(Counter::DropHelperError))?;
    }
    ctx.store(off, &new, 0)
        .map_err(|_| drop_packet(Counter::DropHelperError))
}

/// Folds a 32-bit one's complement sum into the 16-bit checksum field value.
#[inline(always)]
pub fn fold(sum: i64) -> u16 {
    let mut s = sum as u64 & 0xffff_ffff;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}
