//! Probe filters: bitmaps that tell the datapath when a hash lookup cannot
//! find anything, so that traffic which has nothing to do with services
//! (a pod talking to a pod) skips it.
//!
//! Each is an array of [`FILTER_WORDS`] 64-bit words, [`FILTER_BITS`] bits,
//! one bit per hash value. The verifier inlines an array lookup: testing a
//! bit costs a multiply, a shift and one load, where a hash-map lookup
//! costs a hash over the key and a bucket walk (about 25-30 ns each in
//! kep-bench, of the non-service path's 100 ns over an empty program).
//!
//! A clear bit means "certainly absent"; a set bit means "look it up". So
//! a bit must be set before the entry it stands for can be found, and is
//! never cleared while such an entry may still be there: the daemon sets
//! bits (it is their only writer) before it writes an address or a
//! backend, and sets those of every entry already in the maps when it
//! starts. Removing an entry leaves its bit: a bit of something gone only
//! costs the lookup it would have cost anyway. Once the bits have doubled
//! since the last rebuild, the daemon rebuilds the filters from the maps,
//! clearing the bits no entry needs.
//!
//! * [`ADDR_FILTER_MAP`]: every address in [`crate::ADDR_MAP`] or
//!   [`crate::ADDR6_MAP`]. A destination without its bit has class 0 (no
//!   ClusterIP, NodePort address, external IP or node address).
//! * [`ENDPOINT_FILTER_MAP`]: every backend (address, port) in
//!   [`crate::BACKEND_MAP`] or [`crate::BACKEND6_MAP`], and the source of
//!   every reverse-NAT entry and the backend of every socket reverse entry
//!   found at start or at a rebuild. Every reply the reverse-NAT maps
//!   translate comes from a backend (the key of an entry is the backend's
//!   address and port), and every peer a socket's reverse entry translates
//!   is one: a packet or a peer without its bit skips that lookup.
//!
//! Both families share a map; their hashes differ.
//!
//! [`REPLY_SOURCE_MAP`] narrows the endpoint filter for the per-packet
//! path: a byte per endpoint slot, set by the datapath itself before it
//! writes a reverse-NAT entry (a plain byte store, which neither the
//! daemon nor another CPU can undo with a read-modify-write of its own),
//! and by the daemon for every reverse-NAT entry pinned when it attaches.
//! A backend that only socket-balanced connections reach has no byte, and
//! its replies skip the reverse-NAT lookup (a cache miss in a map of a
//! quarter million buckets, on every reply). It is complete only once no
//! program that does not set it can write a reverse-NAT entry any more:
//! each load's [`REPLY_GATE_MAP`] says when its programs may trust it.

/// Addresses with a class ([`crate::ADDR_MAP`], [`crate::ADDR6_MAP`]).
pub const ADDR_FILTER_MAP: &str = "KEP_ADDRBITS_V1";
/// Backend endpoints, the sources of translated replies.
pub const ENDPOINT_FILTER_MAP: &str = "KEP_EPBITS_V1";

/// Sources of reverse-NAT entries: a `u8` per endpoint slot
/// ([`endpoint_bit`], [`endpoint6_bit`]), 1 MiB; nonzero: some entry may
/// come from an endpoint of that slot.
pub const REPLY_SOURCE_MAP: &str = "KEP_RSRC_V1";
/// Per load, never pinned: a `u32` at index 0, nonzero once
/// [`REPLY_SOURCE_MAP`] holds the source of every reverse-NAT entry (set
/// by the daemon when its programs run on every device and it has set
/// the bytes of what the pins hold). Until then the endpoint filter gates
/// the reverse-NAT lookup.
pub const REPLY_GATE_MAP: &str = "KEP_RGATE";

/// Bits of a filter: 2^20, 128 KiB. With 100,000 backends set, one
/// endpoint in ten that is none still gets the lookup.
pub const FILTER_BITS_LOG2: u32 = 20;
pub const FILTER_BITS: u32 = 1 << FILTER_BITS_LOG2;
/// Words of a filter map.
pub const FILTER_WORDS: u32 = FILTER_BITS / 64;

/// The word index and the mask of a bit.
#[inline(always)]
pub fn filter_word(bit: u32) -> (u32, u64) {
    (bit >> 6, 1u64 << (bit & 63))
}

/// Fibonacci hashing: the top bits of the product depend on every bit of
/// `x`, so addresses that differ in any octet spread.
#[inline(always)]
fn spread(x: u32) -> u32 {
    x.wrapping_mul(0x9E37_79B1) >> (32 - FILTER_BITS_LOG2)
}

/// An address's 4 bytes as a number in network order: consecutive
/// addresses are consecutive numbers, which Fibonacci hashing spreads
/// evenly.
#[inline(always)]
fn word(b: [u8; 4]) -> u32 {
    u32::from_be_bytes(b)
}

/// Folds an IPv6 address into 32 bits, every word mixed in.
#[inline(always)]
fn fold6(a: [u8; 16]) -> u32 {
    let w = |i: usize| word([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    let mut h = w(0);
    h = (h.rotate_left(7) ^ w(4)).wrapping_mul(0x85EB_CA6B);
    h = (h.rotate_left(7) ^ w(8)).wrapping_mul(0xC2B2_AE35);
    h.rotate_left(7) ^ w(12)
}

/// Endpoint slots of one address: its ports spread over 64 neighbouring
/// slots, one 64-bit word of a bitmap or one 64-byte cache line of
/// [`REPLY_SOURCE_MAP`]. A client's packets from ever new ports then touch
/// the one line of its address, not a line per connection (a cache miss
/// each, which cost more than the lookup the filter spares); a line is
/// shared by the addresses that hash to it, one in 16,384.
const PORT_SLOTS_LOG2: u32 = 6;

#[inline(always)]
fn endpoint_slot(addr_hash: u32, port: [u8; 2]) -> u32 {
    let line = addr_hash.wrapping_mul(0x9E37_79B1) >> (32 - (FILTER_BITS_LOG2 - PORT_SLOTS_LOG2));
    let port =
        (u16::from_le_bytes(port) as u32).wrapping_mul(0x27D4_EB2F) >> (32 - PORT_SLOTS_LOG2);
    line << PORT_SLOTS_LOG2 | port
}

/// The bit of an IPv4 address in [`ADDR_FILTER_MAP`].
#[inline(always)]
pub fn addr_bit(addr: [u8; 4]) -> u32 {
    spread(word(addr))
}

/// The bit of an IPv6 address in [`ADDR_FILTER_MAP`].
#[inline(always)]
pub fn addr6_bit(addr: [u8; 16]) -> u32 {
    spread(fold6(addr) ^ 0x6666_6666)
}

/// The slot of an IPv4 endpoint (address, port in wire order) in
/// [`ENDPOINT_FILTER_MAP`] and [`REPLY_SOURCE_MAP`].
#[inline(always)]
pub fn endpoint_bit(addr: [u8; 4], port: [u8; 2]) -> u32 {
    endpoint_slot(word(addr), port)
}

/// The slot of an IPv6 endpoint, as [`endpoint_bit`].
#[inline(always)]
pub fn endpoint6_bit(addr: [u8; 16], port: [u8; 2]) -> u32 {
    endpoint_slot(fold6(addr) ^ 0x6666_6666, port)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::collections::BTreeSet;

    use super::*;

    fn distinct(bits: impl Iterator<Item = u32>) -> usize {
        bits.collect::<BTreeSet<_>>().len()
    }

    #[test]
    fn bits_stay_inside_the_filter() {
        for a in [[0; 4], [255; 4], [10, 96, 0, 1]] {
            assert!(addr_bit(a) < FILTER_BITS);
            assert!(endpoint_bit(a, [255, 255]) < FILTER_BITS);
        }
        assert!(addr6_bit([255; 16]) < FILTER_BITS);
        assert!(endpoint6_bit([255; 16], [0, 80]) < FILTER_BITS);
        let (w, m) = filter_word(FILTER_BITS - 1);
        assert_eq!((w, m), (FILTER_WORDS - 1, 1 << 63));
    }

    /// 10,000 consecutive ClusterIPs, or pods' endpoints on one port, take
    /// nearly as many bits: few collisions, so few needless lookups.
    #[test]
    fn consecutive_addresses_and_endpoints_spread() {
        let ip = |i: u32| (0x0a60_0000u32 + i).to_be_bytes();
        assert!(distinct((0..10_000).map(|i| addr_bit(ip(i)))) > 9_900);
        let eps = (0..10_000).map(|i| endpoint_bit(ip(i), 8080u16.to_be_bytes()));
        assert!(distinct(eps) > 9_900);
        // The ports of one address stay in its 64 slots (one word, one
        // cache line), all of them used.
        let ports: std::vec::Vec<u32> = (0..1_000)
            .map(|p| endpoint_bit([10, 244, 1, 5], (30_000u16 + p).to_be_bytes()))
            .collect();
        assert_eq!(distinct(ports.iter().copied()), 64);
        assert!(ports.iter().all(|b| b >> 6 == ports[0] >> 6));
        let ip6 = |i: u32| {
            let mut a = [0xfd, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            a[12..].copy_from_slice(&i.to_be_bytes());
            a
        };
        assert!(distinct((0..10_000).map(|i| addr6_bit(ip6(i)))) > 9_900);
        let eps6 = (0..10_000).map(|i| endpoint6_bit(ip6(i), 53u16.to_be_bytes()));
        assert!(distinct(eps6) > 9_900);
    }

    /// The port is part of an endpoint: a pod's reply port and its client
    /// ports are different bits.
    #[test]
    fn an_endpoint_is_its_address_and_port() {
        let a = [10, 244, 1, 5];
        assert_ne!(endpoint_bit(a, [0x1f, 0x90]), endpoint_bit(a, [0x90, 0x1f]));
        assert_ne!(
            endpoint_bit(a, [0, 80]),
            endpoint_bit([10, 244, 1, 6], [0, 80])
        );
    }
}
