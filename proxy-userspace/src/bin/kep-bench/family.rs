//! IPv4 next to IPv6: ns per packet of an established and a new flow to a
//! ClusterIP, both families in the same maps of one datapath, with the
//! same number of services of each family. The rounds alternate between
//! the families so that the machine's drift (a shared, noisy host) falls on
//! both alike; the figure is the median of the rounds' medians.
//!
//! The services are written into the maps directly (the layout is
//! proxy_common's), not by the syncer: this compares the datapath's two
//! paths, not the control plane.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

use anyhow::Result;
use aya::maps::{HashMap, MapData};
use proxy_common::*;
use proxy_userspace::{
    datapath::{Datapath, filters::ProbeFilters},
    testkit::pktgen::{Pkt, TCP_ACK, TCP_SYN, v6::Pkt6},
};

use crate::Bench;

const SIZES: [usize; 2] = [10, 100_000];
const BACKENDS: usize = 10;
const ROUNDS: usize = 5;
/// Backend pods the services draw from, per family.
const POD_POOL: u32 = 10_000;
/// IPv6 service port ids start here, above the IPv4 ones.
const V6_IDS: u32 = 150_000;

fn vip4(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 1 + i as u32)
}

fn vip6(i: usize) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0)) + 1 + i as u128)
}

fn pod6(i: u32) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 0)) + 10 + i as u128)
}

/// The maps both families' services go into.
struct Maps {
    svc: HashMap<MapData, SvcKey, SvcValue>,
    svc6: HashMap<MapData, SvcKey6, SvcValue>,
    slots: HashMap<MapData, SlotKey, SlotValue>,
    backends: HashMap<MapData, BackendKey, Backend>,
    backends6: HashMap<MapData, BackendKey, Backend6>,
    addrs: HashMap<MapData, AddrKey, AddrValue>,
    addrs6: HashMap<MapData, AddrKey6, AddrValue>,
    /// Set before each address and backend, as the daemon's writer does.
    filters: ProbeFilters,
}

const CLUSTER_IP: AddrValue = AddrValue {
    class: ADDR_CLUSTER_IP,
    _pad: [0; 3],
};

impl Maps {
    fn take(dp: &mut Datapath) -> Result<Maps> {
        Ok(Maps {
            svc: dp.map(SVC_MAP)?,
            svc6: dp.map(SVC6_MAP)?,
            slots: dp.map(SLOT_MAP)?,
            backends: dp.map(BACKEND_MAP)?,
            backends6: dp.map(BACKEND6_MAP)?,
            addrs: dp.map(ADDR_MAP)?,
            addrs6: dp.map(ADDR6_MAP)?,
            filters: dp.take_filters()?,
        })
    }

    /// The backends of both families (ids: IPv4 `i`, IPv6 `POD_POOL + i`).
    fn backends(&mut self) -> Result<()> {
        for i in 0..POD_POOL {
            let port = 8080u16.to_be_bytes();
            let addr = (u32::from(Ipv4Addr::new(10, 244, 0, 10)) + i).to_be_bytes();
            let be = Backend {
                addr,
                port,
                proto: IPPROTO_TCP,
                flags: 0,
            };
            self.filters.add_endpoint(addr.into(), port)?;
            self.backends.insert(BackendKey { backend_id: i }, be, 0)?;
            let be6 = Backend6 {
                addr: pod6(i).octets(),
                port,
                proto: IPPROTO_TCP,
                flags: 0,
            };
            let key = BackendKey {
                backend_id: POD_POOL + i,
            };
            self.filters.add_endpoint(pod6(i).into(), port)?;
            self.backends6.insert(key, be6, 0)?;
        }
        Ok(())
    }

    /// Services `from..to` of both families.
    fn services(&mut self, from: usize, to: usize) -> Result<()> {
        for i in from..to {
            for (svc_id, first_backend) in [(i as u32 + 1, 0), (V6_IDS + i as u32, POD_POOL)] {
                for b in 0..BACKENDS {
                    let backend_id = first_backend + ((i * 7 + b) as u32 % POD_POOL);
                    let slot = SlotKey {
                        svc_id,
                        generation: 1,
                        slot: b as u16,
                    };
                    self.slots.insert(slot, SlotValue { backend_id }, 0)?;
                }
            }
            let value = |svc_id| SvcValue {
                svc_id,
                generation: 1,
                count: BACKENDS as u16,
                ..Default::default()
            };
            let port = 80u16.to_be_bytes();
            let key = SvcKey {
                addr: vip4(i).octets(),
                port,
                proto: IPPROTO_TCP,
                _pad: 0,
            };
            self.svc.insert(key, value(i as u32 + 1), 0)?;
            let key6 = SvcKey6 {
                addr: vip6(i).octets(),
                port,
                proto: IPPROTO_TCP,
                _pad: 0,
            };
            self.svc6.insert(key6, value(V6_IDS + i as u32), 0)?;
            let addr = AddrKey {
                addr: vip4(i).octets(),
            };
            self.filters.add_addr(vip4(i).into())?;
            self.addrs.insert(addr, CLUSTER_IP, 0)?;
            let addr6 = AddrKey6 {
                addr: vip6(i).octets(),
            };
            self.filters.add_addr(vip6(i).into())?;
            self.addrs6.insert(addr6, CLUSTER_IP, 0)?;
        }
        Ok(())
    }
}

/// Frames of one family: an established flow's packet, and a new flow's
/// first packet for call `i`.
trait Frames {
    fn established(&self) -> Vec<u8>;
    fn syn(&self) -> Vec<u8>;
    fn new_flow(&self, i: u32) -> Vec<u8>;
}

struct V4(SocketAddrV4);
struct V6(SocketAddrV6);

impl Frames for V4 {
    fn established(&self) -> Vec<u8> {
        Pkt::tcp("10.244.1.5:40000".parse().unwrap(), self.0, TCP_ACK).build()
    }
    fn syn(&self) -> Vec<u8> {
        Pkt::tcp("10.244.1.5:40000".parse().unwrap(), self.0, TCP_SYN).build()
    }
    fn new_flow(&self, n: u32) -> Vec<u8> {
        let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 245, 0, 0)) + n / 40000);
        let src = SocketAddrV4::new(src, (1024 + n % 40000) as u16);
        Pkt::tcp(src, self.0, TCP_SYN).build()
    }
}

impl Frames for V6 {
    fn established(&self) -> Vec<u8> {
        Pkt6::tcp("[fd00:244:1::5]:40000".parse().unwrap(), self.0, TCP_ACK).build()
    }
    fn syn(&self) -> Vec<u8> {
        Pkt6::tcp("[fd00:244:1::5]:40000".parse().unwrap(), self.0, TCP_SYN).build()
    }
    fn new_flow(&self, n: u32) -> Vec<u8> {
        let base = u128::from(Ipv6Addr::new(0xfd00, 0x245, 0, 0, 0, 0, 0, 0));
        let src = Ipv6Addr::from(base + (n / 40000) as u128);
        let src = SocketAddrV6::new(src, (1024 + n % 40000) as u16, 0, 0);
        Pkt6::tcp(src, self.0, TCP_SYN).build()
    }
}

/// Median ns of established and new-flow packets over `rounds`, one call
/// of each per round.
struct Costs {
    established: Vec<f64>,
    new_flow: Vec<f64>,
}

fn round(bench: &Bench, frames: &dyn Frames, base: u32, costs: &mut Costs) -> Result<()> {
    let syn = frames.syn();
    bench.median(PROG_INGRESS, &mut |_| syn.clone())?;
    let ack = frames.established();
    costs
        .established
        .push(bench.median(PROG_INGRESS, &mut |_| ack.clone())?);
    costs
        .new_flow
        .push(bench.median(PROG_INGRESS, &mut |i| frames.new_flow(base + i as u32))?);
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Prints the IPv4 / IPv6 table.
pub fn figures() -> Result<()> {
    let mut bench = Bench {
        dp: Datapath::load_private(false)?,
    };
    let mut maps = Maps::take(&mut bench.dp)?;
    maps.backends()?;
    println!();
    println!(
        "IPv4 and IPv6: median ns per packet to a ClusterIP, {ROUNDS} alternating rounds of {} calls",
        crate::CALLS
    );
    println!();
    println!(
        "| services per family | IPv4 established | IPv6 established | IPv6/IPv4 | IPv4 new flow | IPv6 new flow | IPv6/IPv4 |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let mut programmed = 0;
    for services in SIZES {
        maps.services(programmed, services)?;
        programmed = services;
        let v4 = V4(SocketAddrV4::new(vip4(services - 1), 80));
        let v6 = V6(SocketAddrV6::new(vip6(services - 1), 80, 0, 0));
        let new = || Costs {
            established: Vec::new(),
            new_flow: Vec::new(),
        };
        let (mut c4, mut c6) = (new(), new());
        for r in 0..ROUNDS {
            // A fresh range of sources per round and size.
            let base = (services as u32 % 7 + r as u32) * 3 * crate::CALLS as u32;
            if r % 2 == 0 {
                round(&bench, &v4, base, &mut c4)?;
                round(&bench, &v6, base, &mut c6)?;
            } else {
                round(&bench, &v6, base, &mut c6)?;
                round(&bench, &v4, base, &mut c4)?;
            }
        }
        let (e4, e6) = (median(c4.established), median(c6.established));
        let (n4, n6) = (median(c4.new_flow), median(c6.new_flow));
        println!(
            "| {services} | {e4:.0} | {e6:.0} | {:.2} | {n4:.0} | {n6:.0} | {:.2} |",
            e6 / e4,
            n6 / n4
        );
    }
    Ok(())
}
