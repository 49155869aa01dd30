//! Upgrades to a new map layout: while the daemon carries the older
//! datapath's flows over, the new programs run in front of the older ones
//! on every hook (tcx links of the same device and direction), and hand
//! the older programs what only the older maps may know.
//!
//! TCX semantics (net/core/dev.c `tcx_run`, `sch_handle_ingress`,
//! `sch_handle_egress`; include/net/tcx.h `tcx_action_code`): the programs
//! of a hook run in order until one returns anything but `TCX_NEXT` (-1,
//! `TC_ACT_UNSPEC`); the chain's verdict is that program's. When the last
//! program returns `TCX_NEXT`, the kernel runs the classic tc filters of
//! the device (clsact), and without any it lets the packet pass: a new
//! program with nothing behind it that defers a packet passes it.

use proxy_common::{NAT_F_CARRIED, UPGRADE_ATTACHING, UPGRADE_OLDER_BEHIND};

use crate::maps::KEP_UPGRADE;

/// The verdict that runs the next program of the hook.
pub const TCX_NEXT: i32 = -1;

#[inline(always)]
fn state() -> u32 {
    KEP_UPGRADE.get(0).copied().unwrap_or(0)
}

/// Whether an older datapath runs behind this one with flows of its own
/// and this one opens flows (set once the new programs are attached
/// everywhere, until the older maps' entries are carried over; cleared
/// before the older programs are detached).
#[inline(always)]
pub fn older_behind() -> bool {
    state() == UPGRADE_OLDER_BEHIND
}

/// A packet this datapath has no entry for and would pass: during an
/// upgrade the older programs get it, with the older maps (a reply or a
/// segment of a flow they translated after the first copy).
/// `Err(TCX_NEXT)` then, `Ok(())` otherwise (the caller's own verdict).
///
/// While the new programs are attached device by device
/// (`UPGRADE_ATTACHING`) they hand on every packet they would act on:
/// a flow is then never opened by one datapath on one device and answered
/// on a device where only the other runs. (Packets they only pass, such
/// as a pod's traffic to a pod on egress, they pass themselves, as the
/// older programs would: no check on that path.)
#[inline(always)]
pub fn defer_to_older() -> Result<(), i32> {
    match state() {
        UPGRADE_ATTACHING | UPGRADE_OLDER_BEHIND => Err(TCX_NEXT),
        _ => Ok(()),
    }
}

/// A new flow: while attaching, the older programs open it; then only a
/// TCP SYN (`syn`) is opened here, as the older maps may hold the flow of
/// any other packet.
#[inline(always)]
pub fn defer_new_flow(syn: bool) -> Result<(), i32> {
    match state() {
        UPGRADE_ATTACHING => Err(TCX_NEXT),
        UPGRADE_OLDER_BEHIND if !syn => Err(TCX_NEXT),
        _ => Ok(()),
    }
}

/// A packet that found an entry here (its `flags`): while attaching, the
/// older programs serve it; then, an entry carried over from the older
/// maps (`NAT_F_CARRIED`) is theirs, since only their maps are sure to
/// hold its current state (they may have given its tuple or port to a new
/// flow after the copy); a SYN (`syn`) on it opens a flow here.
#[inline(always)]
pub fn defer_entry(flags: u8, syn: bool) -> Result<(), i32> {
    match state() {
        UPGRADE_ATTACHING => Err(TCX_NEXT),
        UPGRADE_OLDER_BEHIND if flags & NAT_F_CARRIED != 0 && !syn => Err(TCX_NEXT),
        _ => Ok(()),
    }
}
