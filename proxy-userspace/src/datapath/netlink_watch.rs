//! Wakes the daemon when the kernel announces a change on a netlink group:
//! a device or an address of its network namespace appears, changes or goes
//! (NETLINK_ROUTE's link and address groups, what `ip monitor link address`
//! listens to), or an nftables table, chain or rule does (nfnetlink's
//! nftables group, what `nft monitor` listens to). A new pod's veth then
//! gets the programs as soon as the kernel announces it, instead of at the
//! next poll.
//!
//! The messages are not parsed: any of them makes the daemon look again
//! (cheap, and always right), so a lost message (the socket's buffer
//! overflowing under a burst, ENOBUFS) is a wake-up like any other. The
//! daemon keeps a slow safety poll besides.

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

/// A netlink socket hearing of changes.
pub struct NetlinkWatch {
    fd: AsyncFd<Raw>,
}

struct Raw(OwnedFd);

impl AsRawFd for Raw {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl NetlinkWatch {
    /// Links and addresses.
    pub fn links() -> io::Result<NetlinkWatch> {
        let groups = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR;
        Self::subscribe(SockProtocol::NetlinkRoute, groups)
    }

    /// nftables' tables, chains and rules.
    pub fn nftables() -> io::Result<NetlinkWatch> {
        Self::subscribe(
            SockProtocol::NetlinkNetFilter,
            super::netfilter::NFTABLES_GROUP,
        )
    }

    fn subscribe(protocol: SockProtocol, groups: u32) -> io::Result<NetlinkWatch> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            protocol,
        )?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups))?;
        // SAFETY: Raw owns the descriptor and gives that same one until
        // the AsyncFd (its only owner) drops it.
        let fd = unsafe { AsyncFd::register_with_interest(Raw(fd), Interest::READABLE) }?;
        Ok(NetlinkWatch { fd })
    }

    /// Resolves when something changed, with every message queued so far
    /// consumed. Cancel-safe.
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
