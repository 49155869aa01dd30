//! Which devices can take a translated packet straight into their peer's
//! network namespace (bpf_redirect_peer): veth and netkit devices whose
//! peer lives in another namespace, as a pod's interface does. The kernel
//! drops a packet redirected so to any other device, so the datapath only
//! does it for the devices listed in `PEER_DEV_MAP`.
//!
//! Neither the kind of a device nor the namespace of its peer is in sysfs:
//! both are asked of the kernel with one RTM_GETLINK request (what
//! `ip -d link show` prints as `veth` and `link-netnsid`).

use std::{io, os::fd::AsRawFd};

use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, recv, send, socket,
};

// rtnetlink.h, netlink.h, if_link.h.
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const IFLA_LINKINFO: u16 = 18;
const IFLA_LINK_NETNSID: u16 = 37;
const IFLA_INFO_KIND: u16 = 1;
/// The attribute type without the "nested" and "byte order" flags.
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLMSG_HDR_LEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;

/// Device kinds whose peer bpf_redirect_peer delivers to.
const PEER_KINDS: [&str; 2] = ["veth", "netkit"];

/// Whether the device of index `ifindex` (of the caller's namespace) is a
/// veth or netkit device whose peer is in another namespace.
pub fn peer_in_other_namespace(ifindex: u32) -> io::Result<bool> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    send(fd.as_raw_fd(), &request(ifindex), MsgFlags::empty())?;
    let mut buf = vec![0u8; 32 * 1024];
    let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
    let link = parse_reply(&buf[..n])?;
    Ok(link.netnsid && PEER_KINDS.contains(&link.kind.as_str()))
}

/// An RTM_GETLINK request for one device.
fn request(ifindex: u32) -> Vec<u8> {
    let len = NLMSG_HDR_LEN + IFINFOMSG_LEN;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&RTM_GETLINK.to_ne_bytes());
    m.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // sequence number
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
    // struct ifinfomsg: family (AF_UNSPEC), pad, type, index, flags, change.
    m.extend_from_slice(&[0, 0, 0, 0]);
    m.extend_from_slice(&ifindex.to_ne_bytes());
    m.extend_from_slice(&[0; 8]);
    m
}

/// What the datapath needs to know of a device.
#[derive(Debug, Default, PartialEq, Eq)]
struct Link {
    /// `IFLA_INFO_KIND` ("veth", "bridge"; empty for physical devices).
    kind: String,
    /// Whether the device's link (a veth's peer) is in another namespace.
    netnsid: bool,
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn malformed() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "malformed RTM_NEWLINK reply")
}

/// Parses the kernel's answer: an RTM_NEWLINK, or an error (ENODEV for a
/// device gone meanwhile).
fn parse_reply(msg: &[u8]) -> io::Result<Link> {
    let len = u32_at(msg, 0).ok_or_else(malformed)? as usize;
    let msg = msg.get(..len).ok_or_else(malformed)?;
    match u16_at(msg, 4).ok_or_else(malformed)? {
        NLMSG_ERROR => {
            let errno = u32_at(msg, NLMSG_HDR_LEN).ok_or_else(malformed)? as i32;
            Err(io::Error::from_raw_os_error(-errno))
        }
        RTM_NEWLINK => {
            let mut link = Link::default();
            for (kind, value) in attributes(msg.get(NLMSG_HDR_LEN + IFINFOMSG_LEN..).unwrap_or(&[]))
            {
                match kind {
                    IFLA_LINK_NETNSID => link.netnsid = true,
                    IFLA_LINKINFO => {
                        if let Some((_, name)) =
                            attributes(value).find(|(k, _)| *k == IFLA_INFO_KIND)
                        {
                            let name = name.split(|b| *b == 0).next().unwrap_or(&[]);
                            link.kind = String::from_utf8_lossy(name).into_owned();
                        }
                    }
                    _ => {}
                }
            }
            Ok(link)
        }
        _ => Err(malformed()),
    }
}

/// The netlink attributes in `b`: (type, payload), each padded to 4 bytes.
fn attributes(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = u16_at(b, 0)? as usize;
        let kind = u16_at(b, 2)? & NLA_TYPE_MASK;
        let value = b.get(4..len)?;
        b = b.get(len.next_multiple_of(4)..).unwrap_or(&[]);
        Some((kind, value))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(value);
        a.resize(a.len().next_multiple_of(4), 0);
        a
    }

    fn newlink(attrs: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = attrs.concat();
        let mut m = request(7);
        m[4..6].copy_from_slice(&RTM_NEWLINK.to_ne_bytes());
        m.extend_from_slice(&body);
        let len = m.len() as u32;
        m[..4].copy_from_slice(&len.to_ne_bytes());
        m
    }

    #[test]
    fn a_veth_with_its_peer_elsewhere_is_told_from_other_devices() {
        let kind = |k: &str| attr(IFLA_LINKINFO | 0x8000, &attr(IFLA_INFO_KIND, k.as_bytes()));
        let ifname = attr(3, b"veth1\0");
        let pod_veth = newlink(&[
            ifname.clone(),
            kind("veth\0"),
            attr(IFLA_LINK_NETNSID, &[0; 4]),
        ]);
        assert_eq!(
            parse_reply(&pod_veth).unwrap(),
            Link {
                kind: "veth".into(),
                netnsid: true
            }
        );
        let same_ns_veth = newlink(&[ifname.clone(), kind("veth")]);
        assert!(!parse_reply(&same_ns_veth).unwrap().netnsid);
        let physical = newlink(&[ifname]);
        assert_eq!(parse_reply(&physical).unwrap(), Link::default());
    }

    #[test]
    fn an_error_reply_is_the_kernels_errno() {
        let mut m = request(7);
        m[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m[16..20].copy_from_slice(&(-libc::ENODEV).to_ne_bytes());
        let e = parse_reply(&m).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENODEV));
    }

    #[test]
    fn loopback_is_no_peer_device() {
        // Works in any namespace, without privileges: lo is index 1
        // everywhere.
        assert!(!peer_in_other_namespace(1).unwrap());
    }
}
