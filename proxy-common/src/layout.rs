//! Map layouts of earlier versions, and how their entries become entries of
//! this version's maps.
//!
//! A map's name ends in its layout version (`KEP_CT_V1`). A daemon started
//! over the pins of an earlier one finds, for a map of a new layout, only
//! the pin of the old one. What established flows need (conntrack, reverse
//! NAT) is carried over: the old entries are read, converted by a function
//! of this module, and written into the new map before the new programs
//! attach in front of the old ones, and again until the old programs are
//! detached (proxy-userspace's `datapath/migrate.rs` does the copying and
//! keeps the list of which map becomes which). A converted flow entry is
//! flagged [`crate::NAT_F_CARRIED`]: the new programs leave its packets to
//! the old ones while both run. Maps of desired state, configuration and
//! counters are rebuilt by the daemon instead.
//!
//! The shipped layouts have no predecessor with entries to convert: every
//! conntrack and reverse-NAT map is at version 1. The feature
//! `layout-v2-test` builds the next layout, for the upgrade test only: the
//! value of the conntrack and reverse-NAT maps of both families
//! ([`crate::NatEntry`], [`crate::NatEntry6`]) grows by an 8-byte field,
//! their names become `_V2`, and the version-1 layouts below are kept with
//! the conversion. A real layout change is written the same way, without
//! the feature.

/// Splits a versioned map name into its base and version:
/// `KEP_CT6_V12` is (`KEP_CT6`, 12). `None` for a name without a version.
pub fn split_version(name: &str) -> Option<(&str, u32)> {
    let (base, version) = name.rsplit_once("_V")?;
    if base.is_empty() || version.is_empty() || !version.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((base, version.parse().ok()?))
}

#[cfg(feature = "layout-v2-test")]
pub use v1::*;

/// Layout 1 of the conntrack and reverse-NAT maps, as the test layout's
/// predecessor.
#[cfg(feature = "layout-v2-test")]
mod v1 {
    use bytemuck::{Pod, Zeroable};

    use crate::{NatEntry, NatEntry6};

    pub const CT_MAP_V1: &str = "KEP_CT_V1";
    pub const RNAT_MAP_V1: &str = "KEP_RNAT_V1";
    pub const CT6_MAP_V1: &str = "KEP_CT6_V1";
    pub const RNAT6_MAP_V1: &str = "KEP_RNAT6_V1";

    /// What a converted entry carries in the test layout's new field, so
    /// that an entry carried over can be told from one the new programs
    /// wrote (zeros).
    pub const MIGRATED: [u8; 8] = *b"migrated";

    /// Value of `KEP_CT_V1` and `KEP_RNAT_V1`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
    pub struct NatEntryV1 {
        pub saddr: [u8; 4],
        pub daddr: [u8; 4],
        pub sport: [u8; 2],
        pub dport: [u8; 2],
        pub svc_id: u32,
        pub backend_id: u32,
        pub flags: u8,
        pub _pad: [u8; 3],
    }

    /// Value of `KEP_CT6_V1` and `KEP_RNAT6_V1`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
    pub struct NatEntry6V1 {
        pub saddr: [u8; 16],
        pub daddr: [u8; 16],
        pub sport: [u8; 2],
        pub dport: [u8; 2],
        pub svc_id: u32,
        pub backend_id: u32,
        pub flags: u8,
        pub _pad: [u8; 3],
    }

    /// A version-1 conntrack or reverse-NAT entry in the test layout: every
    /// field kept, flagged [`crate::NAT_F_CARRIED`] (as every conversion of
    /// a flow's entry must: the new programs leave it to the older ones
    /// while they run), the new field marked [`MIGRATED`].
    pub fn nat_from_v1(old: &NatEntryV1) -> NatEntry {
        NatEntry {
            saddr: old.saddr,
            daddr: old.daddr,
            sport: old.sport,
            dport: old.dport,
            svc_id: old.svc_id,
            backend_id: old.backend_id,
            flags: old.flags | crate::NAT_F_CARRIED,
            _pad: [0; 3],
            v2_test: MIGRATED,
        }
    }

    /// [`nat_from_v1`] for IPv6.
    pub fn nat6_from_v1(old: &NatEntry6V1) -> NatEntry6 {
        NatEntry6 {
            saddr: old.saddr,
            daddr: old.daddr,
            sport: old.sport,
            dport: old.dport,
            svc_id: old.svc_id,
            backend_id: old.backend_id,
            flags: old.flags | crate::NAT_F_CARRIED,
            _pad: [0; 3],
            v2_test: MIGRATED,
        }
    }

    #[cfg(feature = "user")]
    // SAFETY: repr(C), bytemuck::Pod (no padding, any bit pattern valid).
    unsafe impl aya::Pod for NatEntryV1 {}
    #[cfg(feature = "user")]
    // SAFETY: as above.
    unsafe impl aya::Pod for NatEntry6V1 {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_split_off_map_names() {
        assert_eq!(split_version("KEP_CT_V1"), Some(("KEP_CT", 1)));
        assert_eq!(split_version("KEP_SVC6_V12"), Some(("KEP_SVC6", 12)));
        assert_eq!(split_version("KEP_CT_V1_resizing"), None);
        assert_eq!(split_version("KEP_CT"), None);
        assert_eq!(split_version("_V3"), None);
        assert_eq!(split_version("KEP_CT_V"), None);
        assert_eq!(split_version("KEP_CT_Vx"), None);
    }

    #[test]
    fn every_map_name_has_a_version() {
        for name in crate::ALL_MAPS {
            assert!(split_version(name).is_some(), "{name}");
        }
    }

    #[cfg(feature = "layout-v2-test")]
    #[test]
    fn a_v1_entry_keeps_every_field_in_the_test_layout() {
        use crate::*;
        let old = NatEntryV1 {
            saddr: [10, 244, 1, 50],
            daddr: [10, 244, 2, 11],
            sport: [0x9c, 0x40],
            dport: [0x1f, 0x90],
            svc_id: 7,
            backend_id: 3,
            flags: NAT_F_SNAT | NAT_F_CLOSING,
            _pad: [0; 3],
        };
        let new = nat_from_v1(&old);
        assert_eq!(
            (new.saddr, new.daddr, new.sport, new.dport),
            (old.saddr, old.daddr, old.sport, old.dport)
        );
        assert_eq!(
            (new.svc_id, new.backend_id, new.flags),
            (7, 3, old.flags | NAT_F_CARRIED)
        );
        assert_eq!(new.v2_test, MIGRATED);
        // The old layout is the new one's first 24 bytes, but for the flag.
        let carried = NatEntryV1 {
            flags: old.flags | NAT_F_CARRIED,
            ..old
        };
        let new_bytes = bytemuck::bytes_of(&new);
        assert_eq!(&new_bytes[..24], bytemuck::bytes_of(&carried));
        assert_eq!(core::mem::size_of::<NatEntryV1>(), 24);
        assert_ne!(CT_MAP, CT_MAP_V1);
        assert_eq!(split_version(CT_MAP), Some(("KEP_CT", 2)));
    }

    #[cfg(feature = "layout-v2-test")]
    #[test]
    fn a_v1_ipv6_entry_keeps_every_field_in_the_test_layout() {
        use crate::*;
        let old = NatEntry6V1 {
            saddr: [0xfd; 16],
            daddr: [0x20; 16],
            sport: [1, 2],
            dport: [3, 4],
            svc_id: 9,
            backend_id: 11,
            flags: NAT_F_HOST,
            _pad: [0; 3],
        };
        let new = nat6_from_v1(&old);
        let carried = NatEntry6V1 {
            flags: NAT_F_HOST | NAT_F_CARRIED,
            ..old
        };
        assert_eq!(
            &bytemuck::bytes_of(&new)[..48],
            bytemuck::bytes_of(&carried)
        );
        assert_eq!(new.v2_test, MIGRATED);
        assert_eq!(split_version(RNAT6_MAP), Some(("KEP_RNAT6", 2)));
    }
}
