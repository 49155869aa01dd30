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

/// While the new programs are attached device by device, they hand every
/// packet to the older ones: a flow is then never opened by one datapath
/// on one device and answered on a device where only the other runs.
#[inline(always)]
pub fn attaching() -> bool {
    state() == UPGRADE_ATTACHING
}

/// Whether an older datapath runs behind this one with flows of its own:
/// set once the new programs are attached everywhere, until the older
/// maps' entries are carried over; cleared before the older programs are
/// detached.
#[inline(always)]
pub fn older_behind() -> bool {
    state() == UPGRADE_OLDER_BEHIND
}

/// A packet this datapath has no entry for and would pass or track anew:
/// during an upgrade the older programs get it, with the older maps (a
/// reply or a segment of a flow they translated after the first copy).
/// `Err(TCX_NEXT)` then, `Ok(())` otherwise (the caller's own verdict).
#[inline(always)]
pub fn defer_to_older() -> Result<(), i32> {
    if older_behind() {
        return Err(TCX_NEXT);
    }
    Ok(())
}

/// An entry carried over from the older maps (`NAT_F_CARRIED` in its
/// flags): while the older programs run, only their maps are sure to hold
/// its current state (they may have given its tuple or port to a new flow
/// after the copy), so its packets are theirs. `Err(TCX_NEXT)` then.
#[inline(always)]
pub fn defer_carried(flags: u8) -> Result<(), i32> {
    if flags & NAT_F_CARRIED != 0 {
        return defer_to_older();
    }
    Ok(())
}
