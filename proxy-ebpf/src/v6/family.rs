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
    family::{Addr, Be, Nat, Tuple, map_types},
    maps::{
        KEP_ADDR6_V1, KEP_AFF6_V1, KEP_BE6_V1, KEP_CFG6_V1, KEP_CT6_V1, KEP_FRAG6_V1, KEP_RNAT6_V1,
        KEP_SRCRNG6_V1, KEP_SVC6_V1,
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
        // SAFETY: copied out at once.
        unsafe { KEP_ADDR6_V1.get(AddrKey6 { addr: self }) }.map_or(0, |v| v.class)
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

    #[inline(always)]
    fn ct(key: &Tuple<Self>) -> Option<*mut Nat<Self>> {
        // Same layout (see map_types!).
        KEP_CT6_V1.get_ptr_mut(key.as_key()).map(|p| p.cast())
    }

    #[inline(always)]
    fn set_ct(key: &Tuple<Self>, value: &Nat<Self>) -> Result<(), i32> {
        KEP_CT6_V1.insert(key.as_key(), value.as_entry(), 0)
    }

    #[inline(always)]
    fn rnat(key: &Tuple<Self>) -> Option<&'static Nat<Self>> {
        // SAFETY: copied out at once.
        unsafe { KEP_RNAT6_V1.get(key.as_key()) }.map(Nat::<Self>::from_entry)
    }

    #[inline(always)]
    fn set_rnat(key: &Tuple<Self>, value: &Nat<Self>, flags: u64) -> Result<(), i32> {
        KEP_RNAT6_V1.insert(key.as_key(), value.as_entry(), flags)
    }

    #[inline(always)]
    fn service(addr: Self, port: [u8; 2], proto: u8) -> Option<SvcValue> {
        let key = SvcKey6 {
            addr,
            port,
            proto,
            _pad: 0,
        };
        // SAFETY: copied out at once.
        unsafe { KEP_SVC6_V1.get(key) }.copied()
    }

    #[inline(always)]
    fn backend(backend_id: u32) -> Option<Be<Self>> {
        // SAFETY: copied out at once.
        unsafe { KEP_BE6_V1.get(BackendKey { backend_id }) }.map(Be::from)
    }

    #[inline(always)]
    fn affinity(svc_id: u32, client: Self) -> Option<AffValue> {
        // SAFETY: copied out at once.
        unsafe { KEP_AFF6_V1.get(AffKey6 { svc_id, client }) }.copied()
    }

    #[inline(always)]
    fn set_affinity(svc_id: u32, client: Self, value: AffValue) {
        // As for IPv4: losing the entry only costs the client its affinity.
        let _ = KEP_AFF6_V1.insert(AffKey6 { svc_id, client }, value, 0);
    }

    #[inline(always)]
    fn source_allowed(svc_id: u32, client: Self) -> bool {
        let key = aya_ebpf::maps::lpm_trie::Key::new(
            SrcRangeKey6::prefix_len(128),
            SrcRangeKey6 {
                svc_id: svc_id.to_be_bytes(),
                addr: client,
            },
        );
        KEP_SRCRNG6_V1.get(&key).is_some()
    }

    #[inline(always)]
    fn fragment(ip: &Ip<Self>) -> Option<FragValue> {
        // SAFETY: copied out at once.
        unsafe { KEP_FRAG6_V1.get(frag_key(ip)) }.copied()
    }

    #[inline(always)]
    fn set_fragment(ip: &Ip<Self>, ports: FragValue) {
        let _ = KEP_FRAG6_V1.insert(frag_key(ip), ports, 0);
    }

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
