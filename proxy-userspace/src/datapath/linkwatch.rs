//! Wakes the daemon when a device or an address of its network namespace
//! appears, changes or goes: a NETLINK_ROUTE socket subscribed to the link
//! and address groups (what `ip monitor link address` listens to). A new
//! pod's veth then gets the programs as soon as the kernel announces it,
//! instead of at the next poll.
//!
//! The messages are not parsed: any of them makes the daemon list devices
//! and addresses again (cheap, and always right), so a lost message (the
//! socket's buffer overflowing under a burst, ENOBUFS) is a wake-up like
//! any other. The daemon keeps a slow safety poll besides.

use std::{
    io,
    os::fd::{AsRawFd, OwnedFd, RawFd},
};

use nix::{
    errno::Errno,
    sys::socket::{
        AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, socket,
    },
};
use tokio::io::{Interest, unix::AsyncFd};

/// Multicast groups: links, IPv4 and IPv6 addresses (rtnetlink.h).
const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;

/// A netlink socket hearing of link and address changes.
pub struct LinkWatch {
    fd: AsyncFd<Raw>,
}

struct Raw(OwnedFd);

impl AsRawFd for Raw {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl LinkWatch {
    pub fn new() -> io::Result<LinkWatch> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        let groups = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups))?;
        // SAFETY: Raw owns the descriptor and gives that same one until
        // the AsyncFd (its only owner) drops it.
        let fd = unsafe { AsyncFd::register_with_interest(Raw(fd), Interest::READABLE) }?;
        Ok(LinkWatch { fd })
    }

    /// Resolves when a link or address changed, with every message queued
    /// so far consumed. Cancel-safe.
    pub async fn changed(&mut self) -> io::Result<()> {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let mut ready = self.fd.readable().await?;
            let mut heard = false;
            loop {
                match recv(
                    ready.get_inner().as_raw_fd(),
                    &mut buf,
                    MsgFlags::MSG_DONTWAIT,
                ) {
                    Ok(0) => break,
                    Ok(_) => heard = true,
                    // Messages were lost: something changed.
                    Err(Errno::ENOBUFS) => heard = true,
                    Err(Errno::EAGAIN) => {
                        ready.clear_ready();
                        break;
                    }
                    Err(Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if heard {
                return Ok(());
            }
        }
    }
}
