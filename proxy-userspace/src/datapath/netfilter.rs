//! Whether the node's network namespace filters or rewrites forwarded
//! traffic with netfilter: `--bpf-host-routing=auto` sends traffic on from
//! the ingress hook only while nothing there would miss it.
//!
//! Host routing redirects a packet from the device it arrived on straight
//! to the one it leaves by, so it passes none of the prerouting, forward or
//! postrouting hooks (nor a netdev chain). Those are where a CNI enforces
//! NetworkPolicy or masquerades; the input and output hooks (a host
//! firewall) see the same traffic either way. So a hook counts as in use
//! when:
//!
//! * nftables (and iptables-nft, which writes nftables): a base chain on
//!   one of those hooks (in the ip, ip6, inet or bridge family, or any in
//!   netdev) has a rule or a drop policy;
//! * iptables-legacy and ip6tables-legacy: a built-in chain on one of those
//!   hooks, in a table that exists, has a rule. A drop policy on a legacy
//!   chain without rules is not seen (reading it would need the whole
//!   table); a node that drops every forwarded packet serves no pods anyway.
//!
//! nftables announces its changes on a netlink group ([`NFTABLES_GROUP`]);
//! iptables-legacy does not, so the daemon also checks at every tick.

use std::{fs, io, mem, os::fd::AsRawFd};

use nix::{
    errno::Errno,
    sys::socket::{
        AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
        socket,
    },
};

/// nfnetlink's nftables multicast group (NFNLGRP_NFTABLES), as a bind mask.
pub const NFTABLES_GROUP: u32 = 1 << (7 - 1);

/// The first netfilter hook in use that host routing would bypass,
/// described; None when there is none.
pub fn bypassed_hook() -> io::Result<Option<String>> {
    if let Some(why) = nftables_hook()? {
        return Ok(Some(why));
    }
    for family in [Legacy::V4, Legacy::V6] {
        if let Some(why) = family.hook_with_rules()? {
            return Ok(Some(why));
        }
    }
    Ok(None)
}

// ---- nftables, over nfnetlink ----

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_GETRULE: u16 = 7;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NF_DROP: u32 = 0;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
/// Attribute types carry the nested and byte-order flags in their top bits.
const NLA_TYPE_MASK: u16 = 0x3fff;

/// Netfilter families (NFPROTO_*) and their hooks that forwarded traffic
/// passes.
const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_NETDEV: u8 = 5;
const NFPROTO_BRIDGE: u8 = 7;
const NFPROTO_IPV6: u8 = 10;
const HOOK_PREROUTING: u32 = 0;
const HOOK_FORWARD: u32 = 2;
const HOOK_POSTROUTING: u32 = 4;
const HOOK_INET_INGRESS: u32 = 5;

/// A base chain, as nftables lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BaseChain {
    family: u8,
    table: String,
    name: String,
    hook: u32,
    drops: bool,
}

impl BaseChain {
    /// Whether packets sent on by host routing would have passed it.
    fn on_forwarding_path(&self) -> bool {
        let routed = [HOOK_PREROUTING, HOOK_FORWARD, HOOK_POSTROUTING];
        match self.family {
            NFPROTO_IPV4 | NFPROTO_IPV6 | NFPROTO_BRIDGE => routed.contains(&self.hook),
            NFPROTO_INET => routed.contains(&self.hook) || self.hook == HOOK_INET_INGRESS,
            NFPROTO_NETDEV => true,
            _ => false,
        }
    }

    fn describe(&self, what: &str) -> String {
        let family = match self.family {
            NFPROTO_INET => "inet",
            NFPROTO_IPV4 => "ip",
            NFPROTO_IPV6 => "ip6",
            NFPROTO_BRIDGE => "bridge",
            NFPROTO_NETDEV => "netdev",
            _ => "?",
        };
        let hook = match (self.family, self.hook) {
            (NFPROTO_NETDEV, 0) => "ingress",
            (NFPROTO_NETDEV, _) => "egress",
            (_, h) => hook_name(h),
        };
        format!(
            "nftables chain {family} {} {} ({hook}) {what}",
            self.table, self.name
        )
    }
}

/// An ip, ip6, inet or bridge hook's name.
fn hook_name(hook: u32) -> &'static str {
    match hook {
        HOOK_PREROUTING => "prerouting",
        1 => "input",
        HOOK_FORWARD => "forward",
        3 => "output",
        HOOK_POSTROUTING => "postrouting",
        HOOK_INET_INGRESS => "ingress",
        _ => "?",
    }
}

fn nftables_hook() -> io::Result<Option<String>> {
    let chains = nft_dump(NFT_MSG_GETCHAIN, 0, &[], usize::MAX, |family, attrs| {
        parse_base_chain(family, attrs)
    })?;
    for chain in chains.into_iter().flatten() {
        if !chain.on_forwarding_path() {
            continue;
        }
        if chain.drops {
            return Ok(Some(chain.describe("drops by policy")));
        }
        let filter = [
            attr_str(NFTA_RULE_TABLE, &chain.table),
            attr_str(NFTA_RULE_CHAIN, &chain.name),
        ]
        .concat();
        // One rule is enough to know.
        let rules = nft_dump(NFT_MSG_GETRULE, chain.family, &filter, 1, |_, _| ())?;
        if !rules.is_empty() {
            return Ok(Some(chain.describe("has rules")));
        }
    }
    Ok(None)
}

/// A chain message's base chain; None for a chain without a hook.
fn parse_base_chain(family: u8, attrs: &[u8]) -> Option<BaseChain> {
    let mut chain = BaseChain {
        family,
        table: String::new(),
        name: String::new(),
        hook: u32::MAX,
        drops: false,
    };
    for (kind, value) in Attrs(attrs) {
        match kind {
            NFTA_CHAIN_TABLE => chain.table = nul_terminated(value),
            NFTA_CHAIN_NAME => chain.name = nul_terminated(value),
            NFTA_CHAIN_POLICY => chain.drops = be32(value) == Some(NF_DROP),
            NFTA_CHAIN_HOOK => {
                let hook = Attrs(value).find(|(k, _)| *k == NFTA_HOOK_HOOKNUM);
                chain.hook = hook.and_then(|(_, v)| be32(v))?;
            }
            _ => {}
        }
    }
    (chain.hook != u32::MAX).then_some(chain)
}

/// Dumps one kind of nftables object (of `family`, 0 for all, filtered by
/// `filter`'s attributes) and maps each message's family and attributes,
/// up to `limit` messages.
fn nft_dump<T>(
    msg: u16,
    family: u8,
    filter: &[u8],
    limit: usize,
    mut each: impl FnMut(u8, &[u8]) -> T,
) -> io::Result<Vec<T>> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
    let kind = (NFNL_SUBSYS_NFTABLES << 8) | msg;
    let len = NLMSG_HDRLEN + NFGENMSG_LEN + filter.len();
    let mut request = Vec::with_capacity(len);
    request.extend_from_slice(&(len as u32).to_ne_bytes());
    request.extend_from_slice(&kind.to_ne_bytes());
    request.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    request.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    request.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel
    request.extend_from_slice(&[family, 0, 0, 0]); // nfgenmsg: family, version 0, resource 0
    request.extend_from_slice(filter);
    send(fd.as_raw_fd(), &request, MsgFlags::empty())?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Err(Errno::EINTR) => continue,
            other => other?,
        };
        for (kind, payload) in Messages(&buf[..n]) {
            match kind {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let code = payload
                        .get(..4)
                        .map_or(0, |b| i32::from_ne_bytes(b.try_into().expect("four bytes")));
                    if code != 0 {
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                    return Ok(out);
                }
                _ if payload.len() >= NFGENMSG_LEN => {
                    out.push(each(payload[0], &payload[NFGENMSG_LEN..]));
                    // Closing the socket drops the rest of the dump.
                    if out.len() >= limit {
                        return Ok(out);
                    }
                }
                _ => {}
            }
        }
    }
}

/// Netlink messages in a buffer: (type, payload).
struct Messages<'a>(&'a [u8]);

impl<'a> Iterator for Messages<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let header = self.0.get(..NLMSG_HDRLEN)?;
        let len = u32::from_ne_bytes(header[..4].try_into().ok()?) as usize;
        let kind = u16::from_ne_bytes(header[4..6].try_into().ok()?);
        let payload = self.0.get(NLMSG_HDRLEN..len)?;
        self.0 = self.0.get(align4(len)..).unwrap_or(&[]);
        Some((kind, payload))
    }
}

/// Netlink attributes in a buffer: (type without flags, value).
struct Attrs<'a>(&'a [u8]);

impl<'a> Iterator for Attrs<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let header = self.0.get(..4)?;
        let len = u16::from_ne_bytes([header[0], header[1]]) as usize;
        let kind = u16::from_ne_bytes([header[2], header[3]]) & NLA_TYPE_MASK;
        let value = self.0.get(4..len)?;
        self.0 = self.0.get(align4(len)..).unwrap_or(&[]);
        Some((kind, value))
    }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A NUL-terminated string attribute, padded.
fn attr_str(kind: u16, value: &str) -> Vec<u8> {
    let len = 4 + value.len() + 1;
    let mut out = Vec::with_capacity(align4(len));
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value.as_bytes());
    out.resize(align4(len), 0);
    out
}

fn nul_terminated(value: &[u8]) -> String {
    let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end]).into_owned()
}

fn be32(value: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(value.get(..4)?.try_into().ok()?))
}

// ---- iptables-legacy, over its getsockopt interface ----

#[derive(Copy, Clone)]
enum Legacy {
    V4,
    V6,
}

/// `struct ipt_getinfo` (and `ip6t_getinfo`, the same): where each built-in
/// chain's first rule and its policy are, as offsets into the table.
#[repr(C)]
struct GetInfo {
    name: [u8; 32],
    valid_hooks: u32,
    hook_entry: [u32; 5],
    underflow: [u32; 5],
    num_entries: u32,
    size: u32,
}

/// IPT_SO_GET_INFO and IP6T_SO_GET_INFO.
const SO_GET_INFO: libc::c_int = 64;

impl Legacy {
    fn tool(self) -> &'static str {
        match self {
            Legacy::V4 => "iptables-legacy",
            Legacy::V6 => "ip6tables-legacy",
        }
    }

    /// A built-in prerouting, forward or postrouting chain with a rule,
    /// in the tables this namespace has. Only listed tables are asked
    /// about: asking for another would create it.
    fn hook_with_rules(self) -> io::Result<Option<String>> {
        let names = match self {
            // The calling thread's namespace (a test's), which is the
            // process's in the daemon.
            Legacy::V4 => "/proc/thread-self/net/ip_tables_names",
            Legacy::V6 => "/proc/thread-self/net/ip6_tables_names",
        };
        let tables = match fs::read_to_string(names) {
            Ok(t) => t,
            // No ip_tables module: no legacy tables.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        for table in tables.lines().map(str::trim).filter(|t| !t.is_empty()) {
            let info = self.info(table)?;
            let hook = [HOOK_PREROUTING, HOOK_FORWARD, HOOK_POSTROUTING]
                .into_iter()
                .find(|&h| chain_has_rules(&info, h));
            if let Some(h) = hook {
                return Ok(Some(format!(
                    "{} table {table}: the built-in {} chain has rules",
                    self.tool(),
                    hook_name(h)
                )));
            }
        }
        Ok(None)
    }

    fn info(self, table: &str) -> io::Result<GetInfo> {
        let (domain, level) = match self {
            Legacy::V4 => (libc::AF_INET, libc::SOL_IP),
            Legacy::V6 => (libc::AF_INET6, libc::SOL_IPV6),
        };
        // Any socket of the family reaches netfilter's getsockopt (the IP
        // layer hands on what it does not know); a UDP one needs no
        // CAP_NET_RAW, which iptables' raw socket would and the DaemonSet
        // does not have. The kernel asks for CAP_NET_ADMIN.
        // SAFETY: plain socket(2); the descriptor is owned at once.
        let fd = unsafe { libc::socket(domain, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor nothing else owns.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // SAFETY: GetInfo is plain integers and bytes; all-zero is valid.
        let mut info: GetInfo = unsafe { mem::zeroed() };
        let name = table.as_bytes();
        if name.len() >= info.name.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "table name too long",
            ));
        }
        info.name[..name.len()].copy_from_slice(name);
        let mut len = mem::size_of::<GetInfo>() as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes into `info`.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                level,
                SO_GET_INFO,
                (&mut info as *mut GetInfo).cast(),
                &mut len,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(info)
    }
}

/// A built-in chain's rules come before its policy: with none, its first
/// entry is the policy.
fn chain_has_rules(info: &GetInfo, hook: u32) -> bool {
    let h = hook as usize;
    info.valid_hooks & (1 << hook) != 0 && info.hook_entry[h] != info.underflow[h]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
        let len = 4 + value.len();
        let mut out = (len as u16).to_ne_bytes().to_vec();
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(value);
        out.resize(align4(len), 0);
        out
    }

    fn chain_message(table: &str, name: &str, hook: Option<u32>, policy: u32) -> Vec<u8> {
        let mut attrs = [
            attr_str(NFTA_CHAIN_TABLE, table),
            attr_str(NFTA_CHAIN_NAME, name),
        ]
        .concat();
        if let Some(h) = hook {
            // Nested, with the flag the kernel sets.
            let nested = attr(NFTA_HOOK_HOOKNUM, &h.to_be_bytes());
            attrs.extend(attr(NFTA_CHAIN_HOOK | 0x8000, &nested));
            attrs.extend(attr(NFTA_CHAIN_POLICY, &policy.to_be_bytes()));
        }
        attrs
    }

    #[test]
    fn base_chains_are_read_from_their_attributes() {
        let msg = chain_message("filter", "FORWARD", Some(HOOK_FORWARD), NF_DROP);
        let chain = parse_base_chain(NFPROTO_IPV4, &msg).unwrap();
        assert_eq!(
            chain,
            BaseChain {
                family: NFPROTO_IPV4,
                table: "filter".into(),
                name: "FORWARD".into(),
                hook: HOOK_FORWARD,
                drops: true,
            }
        );
        // A regular chain (no hook) is no base chain.
        let msg = chain_message("filter", "KUBE-SVC", None, 1);
        assert_eq!(parse_base_chain(NFPROTO_IPV4, &msg), None);
    }

    #[test]
    fn only_hooks_on_the_forwarding_path_count() {
        let chain = |family, hook| BaseChain {
            family,
            table: "t".into(),
            name: "c".into(),
            hook,
            drops: false,
        };
        let table = [
            (NFPROTO_IPV4, HOOK_PREROUTING, true),
            (NFPROTO_IPV4, 1, false), // input: a host firewall
            (NFPROTO_IPV6, HOOK_FORWARD, true),
            (NFPROTO_IPV6, 3, false), // output
            (NFPROTO_INET, HOOK_POSTROUTING, true),
            (NFPROTO_INET, HOOK_INET_INGRESS, true),
            (NFPROTO_BRIDGE, HOOK_FORWARD, true),
            (NFPROTO_NETDEV, 0, true),
            (3, 0, false), // arp
        ];
        for (family, hook, counts) in table {
            assert_eq!(
                chain(family, hook).on_forwarding_path(),
                counts,
                "family {family} hook {hook}"
            );
        }
    }

    #[test]
    fn a_legacy_chain_has_rules_when_its_first_entry_is_not_its_policy() {
        // SAFETY: plain integers and bytes.
        let mut info: GetInfo = unsafe { mem::zeroed() };
        info.valid_hooks = 0b01110; // filter: input, forward, output
        info.hook_entry = [0, 0, 152, 304, 0];
        info.underflow = [0, 0, 152, 304, 0];
        assert!(!chain_has_rules(&info, HOOK_FORWARD));
        info.hook_entry[2] = 152;
        info.underflow[2] = 304;
        assert!(chain_has_rules(&info, HOOK_FORWARD));
        // A hook the table does not have.
        assert!(!chain_has_rules(&info, HOOK_PREROUTING));
    }

    #[test]
    fn messages_and_attributes_walk_their_padding() {
        let a = [attr_str(1, "ab"), attr(2, &[7, 7, 7, 7, 7])].concat();
        let got: Vec<_> = Attrs(&a).collect();
        assert_eq!(got, [(1, &b"ab\0"[..]), (2, &[7u8; 5][..])]);
        // A truncated attribute ends the walk instead of reading past it
        // (cut into its value, not only its padding).
        assert_eq!(Attrs(&a[..a.len() - 3]).count(), 2);
        assert_eq!(Attrs(&a[..a.len() - 4]).count(), 1);
    }
}
