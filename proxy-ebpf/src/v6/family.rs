//! IPv6 as an address family of the flow logic: its maps
//! (`KEP_*6_V1`, proxy_common::v6) and its header rewriting.

use aya_ebpf::{bindings::bpf_fib_lookup as FibParams, programs::TcContext};
use proxy_common::*;

use super::{
    parse::{IP6_DST_OFF, IP6_SRC_OFF},
    reject,
};
use crate::{
    Hook,
    family::{Addr, Be, Nat, Tuple, map_access, map_types},
    maps::{
        KEP_ADDR6_V1, KEP_ADDRBITS_V1, KEP_AFF6_V1, KEP_BE6_V1, KEP_CFG6_V1, KEP_CT6_V1,
        KEP_FRAG6_V1, KEP_RNAT6_V1, KEP_SRCRNG6_V1, KEP_SVC6_V1, filter_has,
    },
    nat,
    packet::Ip,
};

map_types!([u8; 16], FlowKey6, NatEntry6, Backend6);

const AF_INET6: u8 = 10;

#[inline(always)]
fn frag_key(ip: &Ip<[u8; 16]>) -> FragKey6 {
    FragKey6 {
        saddr: ip.saddr,
        daddr: ip.daddr,
        id: ip.id,
        proto: ip.proto,
        _pad: [0; 3],
    }
}

#[inline(always)]
fn words(a: [u8; 16]) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

impl Addr for [u8; 16] {
    const ZERO: Self = [0; 16];
    const SRC_OFF: usize = IP6_SRC_OFF;
    const DST_OFF: usize = IP6_DST_OFF;

    #[inline(always)]
    fn class(self) -> u8 {
        if !filter_has(&KEP_ADDRBITS_V1, addr6_bit(self)) {
            return 0;
        }
        // SAFETY: copied out at once.
        unsafe { KEP_ADDR6_V1.get(AddrKey6 { addr: self }) }.map_or(0, |v| v.class)
    }

    #[inline(always)]
    fn endpoint_slot(self, port: [u8; 2]) -> u32 {
        endpoint6_bit(self, port)
    }

    #[inline(always)]
    fn in_service_cidr(self) -> bool {
        let Some(c) = KEP_CFG6_V1.get(0) else {
            return false;
        };
        let mut i = 0;
        while i < SERVICE_CIDRS {
            if in_prefix6(self, c.service_cidrs[i], c.service_cidr_lens[i]) {
                return true;
            }
            i += 1;
        }
        false
    }

    #[inline(always)]
    fn in_cluster_cidr(self) -> Option<bool> {
        let c = KEP_CFG6_V1.get(0)?;
        (c.flags & CFG_F_CLUSTER_CIDR != 0)
            .then(|| in_prefix6(self, c.cluster_cidr, c.cluster_cidr_len))
    }

    #[inline(always)]
    fn hairpin() -> Self {
        match KEP_CFG6_V1.get(0) {
            Some(c) if c.hairpin_addr != [0; 16] => c.hairpin_addr,
            _ => HAIRPIN_ADDR6,
        }
    }

    #[inline(always)]
    fn read(ctx: &TcContext, off: usize) -> Option<Self> {
        crate::packet::bytes::<16>(ctx, off)
    }

    map_access!(
        ct: KEP_CT6_V1, rnat: KEP_RNAT6_V1, svc: KEP_SVC6_V1, svc_key: SvcKey6,
        backends: KEP_BE6_V1, aff: KEP_AFF6_V1, aff_key: AffKey6,
        ranges: KEP_SRCRNG6_V1, range_key: SrcRangeKey6, bits: 128,
        frags: KEP_FRAG6_V1,
    );

    #[inline(always)]
    fn fib_request(p: &mut FibParams, src: Self, dst: Self) {
        p.family = AF_INET6;
        p.__bindgen_anon_3.ipv6_src = words(src);
        p.__bindgen_anon_4.ipv6_dst = words(dst);
    }

    #[inline(always)]
    fn fib_source(p: &FibParams) -> Self {
        // SAFETY: the union member the kernel fills for AF_INET6.
        let w = unsafe { p.__bindgen_anon_3.ipv6_src };
        let mut a = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            a[i * 4..i * 4 + 4].copy_from_slice(&w[i].to_ne_bytes());
            i += 1;
        }
        a
    }

    #[inline(always)]
    fn rewrite_addr(
        ctx: &TcContext,
        off: usize,
        old: Self,
        new: Self,
        l4_csum: Option<usize>,
        mangled: u64,
    ) -> Result<(), i32> {
        nat::addr6(ctx, off, old, new, l4_csum, mangled)
    }

    #[inline(always)]
    fn reject(ctx: &TcContext, ip: &Ip<Self>, hook: Hook, reason: Counter) -> i32 {
        reject::port_unreachable(ctx, ip, hook, reason)
    }

    #[inline(always)]
    fn log_new_flow(ctx: &TcContext, key: &Tuple<Self>, svc_id: u32, be: &Be<Self>) {
        // Removed by the verifier unless the daemon runs with --bpf-debug.
        aya_log_ebpf::debug!(
            ctx,
            "new flow [{:i}]:{} -> service port {} backend [{:i}]:{}",
            key.saddr,
            u16::from_be_bytes(key.sport),
            svc_id,
            be.addr,
            u16::from_be_bytes(be.port)
        );
    }
}
