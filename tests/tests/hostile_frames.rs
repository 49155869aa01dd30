//! Hostile frames in the lab, with the real daemons: mutated Ethernet
//! frames written with AF_PACKET from outside the cluster (the client, onto
//! node-a's underlay device) and from a pod (onto its veth), aimed at a
//! ClusterIP, a NodePort, a node's own port and a pod. The frames are what
//! the TestRun fuzzer (proxy-userspace/tests/datapath_fuzz.rs) makes, in
//! short: truncated at every offset, IHL and total-length lies, every
//! fragment flag, TCP data offsets and flags, UDP length lies, bytes
//! flipped, ICMP errors quoting them. Afterwards both daemons are alive,
//! the drops are counted, and the services still answer from both places.
//!
//! The daemon binary comes from KEP_BIN (set by `cargo xtask test`), or
//! target/release/kube-ebpf-proxy.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Instant};

use common::*;
use lab::{
    ETH0, Netns, addr,
    servers::{tcp_request, udp_request},
};
use proxy_common::Counter;
use proxy_userspace::testkit::pktgen::{self, Pkt, TCP_ACK, TCP_SYN};

mod common;

/// Frames written from each of the two places.
const FRAMES: usize = 20_000;

/// xorshift64*: the same frames on every run of a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

/// A well-formed frame from `src` to one of `targets`, TCP or UDP.
fn base_frame(rng: &mut Rng, src: Ipv4Addr, targets: &[&str]) -> Vec<u8> {
    let dst = sa(targets[rng.below(targets.len())]);
    let src = std::net::SocketAddrV4::new(src, 20_000 + rng.below(40_000) as u16);
    match rng.below(3) {
        0 => Pkt::tcp(src, dst, TCP_SYN).build(),
        1 => {
            let mut p = Pkt::tcp(src, dst, TCP_ACK);
            p.payload = b"GET / HTTP/1.0\r\n\r\n".to_vec();
            p.build()
        }
        _ => Pkt::udp(src, dst, b"hostile").build(),
    }
}

const ETH: usize = 14;
const L4: usize = ETH + 20;

/// One of the fuzzer's mutations (or two of them) of a well-formed frame.
fn mutate(rng: &mut Rng, mut f: Vec<u8>) -> Vec<u8> {
    for _ in 0..1 + rng.below(2) {
        match rng.below(7) {
            0 => f.truncate(ETH + rng.below(f.len() - ETH + 1)),
            1 if f.len() > ETH => f[ETH] = 0x40 | rng.below(16) as u8,
            2 if f.len() > ETH + 4 => {
                let len = rng.next() as u16;
                f[ETH + 2..ETH + 4].copy_from_slice(&len.to_be_bytes());
            }
            3 if f.len() > ETH + 8 => {
                f[ETH + 6] = rng.byte();
                f[ETH + 7] = rng.byte();
            }
            4 if f.len() > L4 + 14 => {
                // TCP data offset and flags, or UDP length.
                f[L4 + 12] = (rng.below(16) as u8) << 4;
                f[L4 + 13] = rng.byte();
                f[L4 + 4] = rng.byte();
                f[L4 + 5] = rng.byte();
            }
            5 => {
                for _ in 0..1 + rng.below(4) {
                    let at = ETH + rng.below(f.len().clamp(ETH + 1, 64) - ETH);
                    if at < f.len() {
                        f[at] = rng.byte();
                    }
                }
            }
            _ => {
                // An ICMP error quoting the frame so far, cut anywhere.
                let quoted = &f[ETH.min(f.len())..];
                let quoted = &quoted[..rng.below(quoted.len() + 1)];
                let src = Ipv4Addr::new(10, 244, 2, 11);
                // Back to the frame's source, if it still has one.
                let dst = f
                    .get(ETH + 12..ETH + 16)
                    .and_then(|a| <[u8; 4]>::try_from(a).ok())
                    .map_or(addr::CLIENT_IP, Ipv4Addr::from);
                f = pktgen::icmp_error(src, dst, 3, rng.below(16) as u8, quoted);
            }
        }
    }
    f
}

/// The MAC address of `dev` in `ns`.
fn mac_of(ns: &Netns, dev: &str) -> [u8; 6] {
    let out = ns.ip(&["-j", "link", "show", "dev", dev]).expect("ip link");
    let links: serde_json::Value = serde_json::from_str(&out).expect("ip -j link");
    let text = links[0]["address"].as_str().expect("an address");
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).expect("hex"))
        .collect();
    bytes.try_into().expect("6 bytes")
}

/// Writes `frames` onto `dev` of `ns` with an AF_PACKET socket, addressed
/// from `src_mac` to `dst_mac`. Returns how many the kernel took.
fn write_frames(
    ns: &Netns,
    dev: &str,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    frames: &[Vec<u8>],
) -> usize {
    let dev = std::ffi::CString::new(dev).unwrap();
    ns.run(|| {
        // SAFETY: plain socket calls on a socket this closure owns.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let ifindex = libc::if_nametoindex(dev.as_ptr());
            assert!(ifindex > 0, "no device {dev:?}");
            let mut to: libc::sockaddr_ll = std::mem::zeroed();
            to.sll_family = libc::AF_PACKET as u16;
            to.sll_ifindex = ifindex as i32;
            to.sll_halen = 6;
            to.sll_addr[..6].copy_from_slice(&dst_mac);
            let mut sent = 0;
            for f in frames {
                let mut f = f.clone();
                f[..6].copy_from_slice(&dst_mac);
                f[6..12].copy_from_slice(&src_mac);
                let n = libc::sendto(
                    fd,
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    (&raw const to).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                if n == f.len() as isize {
                    sent += 1;
                }
            }
            libc::close(fd);
            sent
        }
    })
}

/// The datapath's drop counters on `node`, by reason.
fn drops(c: &Cluster, node: &str) -> BTreeMap<String, u64> {
    let mut counters = c.counters(node);
    counters.retain(|name, _| Counter::ALL.iter().any(|c| c.is_drop() && c.name() == name));
    counters
}

/// The services answer from outside (NodePort) and from the pod
/// (ClusterIP), over TCP and UDP.
fn services_answer(c: &Cluster) {
    let client = c.lab.ns(addr::CLIENT);
    let pod = c.lab.ns(CLIENT_POD);
    let nodeport = std::net::SocketAddrV4::new(addr::NODE_A_IP, 30010);
    for (ns, target) in [(client, nodeport), (pod, sa("10.96.0.10:80"))] {
        let r =
            tcp_request(ns, target).unwrap_or_else(|e| panic!("TCP {target}: {e:#}\n{}", c.logs()));
        assert!(r.identity.starts_with("web-"), "{r:?}");
        let r =
            udp_request(ns, target).unwrap_or_else(|e| panic!("UDP {target}: {e:#}\n{}", c.logs()));
        assert!(r.identity.starts_with("web-"), "{r:?}");
    }
}

#[test]
fn mutated_frames_from_outside_and_from_a_pod_leave_the_daemons_serving() {
    let Some(mut c) = Cluster::start("hostile_frames", &placement_manifests()) else {
        return;
    };
    services_answer(&c);
    let node_a = c.lab.ns(addr::NODE_A);
    let before = drops(&c, addr::NODE_A);
    let pod_veth = c.lab.pod(CLIENT_POD).expect("client pod").host_veth.clone();
    let targets = [
        "10.96.0.10:80",
        "10.96.0.11:80",
        "10.96.0.12:80",
        "10.96.0.10:81",
        "192.168.200.11:30010",
        "192.168.200.11:30012",
        "192.168.200.11:22",
        "10.244.2.11:8080",
    ];
    let mut rng = Rng(0x6b65_705f_6675_7a7a);
    let mut frames = |src: Ipv4Addr| -> Vec<Vec<u8>> {
        (0..FRAMES)
            .map(|_| {
                let base = base_frame(&mut rng, src, &targets);
                mutate(&mut rng, base)
            })
            .collect()
    };
    let from_outside = frames(addr::CLIENT_IP);
    let from_pod = frames(CLIENT_POD_IP.parse().unwrap());

    let started = Instant::now();
    let client = c.lab.ns(addr::CLIENT);
    let outside = write_frames(
        client,
        ETH0,
        mac_of(client, ETH0),
        mac_of(node_a, ETH0),
        &from_outside,
    );
    let pod = c.lab.ns(CLIENT_POD);
    let inside = write_frames(
        pod,
        ETH0,
        mac_of(pod, ETH0),
        mac_of(node_a, &pod_veth),
        &from_pod,
    );
    println!(
        "{outside} frames from outside and {inside} from a pod written in {:?}",
        started.elapsed()
    );
    assert_eq!(
        (outside, inside),
        (FRAMES, FRAMES),
        "the kernel took every frame"
    );

    for node in addr::NODES {
        assert!(
            c.lab.daemon_exited(node).is_none(),
            "the daemon of {node} died\n{}",
            c.logs()
        );
    }
    let after = drops(&c, addr::NODE_A);
    let counted: BTreeMap<_, _> = after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect();
    println!("node-a counted, by reason: {counted:?}");
    assert!(
        counted.get("malformed").copied().unwrap_or(0) > 0,
        "malformed frames to services are counted: {counted:?}"
    );
    services_answer(&c);
}
