//! IPv4 as an address family of the flow logic: its maps (`KEP_*_V*`) and
//! its header rewriting.

use aya_ebpf::{bindings::bpf_fib_lookup as FibParams, programs::TcContext};
use proxy_common::*;

use crate::{
    Hook,
    family::{Addr, Be, Nat, Tuple, map_access, map_types},
    maps::{
        KEP_AFF_V1, KEP_BE_V1, KEP_CT_V1, KEP_FRAG_V1, KEP_RNAT_V1, KEP_SRCRNG_V1, KEP_SVC_V2,
        addr_class, config, config_ref, in_service_cidr,
    },
    nat,
    packet::{IP_DST_OFF, IP_SRC_OFF, Ip},
    reject,
};

map_types!([u8; 4], FlowKey, NatEntry, Backend);

const AF_INET: u8 = 2;

#[inline(always)]
fn frag_key(ip: &Ip<[u8; 4]>) -> FragKey {
    FragKey {
        saddr: ip.saddr,
        daddr: ip.daddr,
        id: [ip.id[0], ip.id[1]],
        proto: ip.proto,
        _pad: 0,
    }
}

impl Addr for [u8; 4] {
    const ZERO: Self = [0; 4];
    const SRC_OFF: usize = IP_SRC_OFF;
    const DST_OFF: usize = IP_DST_OFF;

    #[inline(always)]
    fn class(self) -> u8 {
        addr_class(self)
    }

    #[inline(always)]
    fn endpoint_slot(self, port: [u8; 2]) -> u32 {
        endpoint_bit(self, port)
    }

    #[inline(always)]
    fn in_service_cidr(self) -> bool {
        in_service_cidr(self)
    }

    #[inline(always)]
    fn in_cluster_cidr(self) -> Option<bool> {
        let c = config_ref()?;
        (c.flags & CFG_F_CLUSTER_CIDR != 0)
            .then(|| in_prefix(self, c.cluster_cidr, c.cluster_cidr_len))
    }

    #[inline(always)]
    fn hairpin() -> Self {
        config().hairpin_addr
    }

    #[inline(always)]
    fn read(ctx: &TcContext, off: usize) -> Option<Self> {
        crate::packet::bytes::<4>(ctx, off)
    }

    map_access!(
        ct: KEP_CT_V1, rnat: KEP_RNAT_V1, svc: KEP_SVC_V2, svc_key: SvcKey,
        backends: KEP_BE_V1, aff: KEP_AFF_V1, aff_key: AffKey,
        ranges: KEP_SRCRNG_V1, range_key: SrcRangeKey, bits: 32,
        frags: KEP_FRAG_V1,
    );

    #[inline(always)]
    fn fib_request(p: &mut FibParams, src: Self, dst: Self) {
        p.family = AF_INET;
        p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
        p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    }

    #[inline(always)]
    fn fib_source(p: &FibParams) -> Self {
        // SAFETY: the union member the kernel fills for AF_INET.
        unsafe { p.__bindgen_anon_3.ipv4_src }.to_ne_bytes()
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
        nat::addr4(ctx, off, old, new, l4_csum, mangled)
    }

    #[inline(always)]
    fn reject(ctx: &TcContext, ip: &Ip<Self>, hook: Hook, reason: Counter) -> i32 {
        reject::port_unreachable(ctx, ip, hook, reason)
    }

    #[inline(always)]
    fn log_new_flow(ctx: &TcContext, key: &Tuple<Self>, svc_id: u32, be: &Be<Self>) {
        // Compiled in, but the verifier removes it unless the daemon was
        // started with --bpf-debug (AYA_LOG_LEVEL is a read-only global set
        // at load).
        aya_log_ebpf::debug!(
            ctx,
            "new flow {:i}:{} -> service port {} backend {:i}:{}",
            key.saddr,
            u16::from_be_bytes(key.sport),
            svc_id,
            be.addr,
            u16::from_be_bytes(be.port)
        );
    }
}
