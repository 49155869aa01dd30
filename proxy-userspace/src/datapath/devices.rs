//! The node's network devices and addresses, read through netlink-backed
//! libc calls so they are those of the daemon's network namespace, and
//! [`Attachments`]: the programs attached to every selected device as
//! devices come and go.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::Result;
use tracing::{debug, info, warn};

use super::{Datapath, Device, Direction, peer};
use crate::{
    cidr::Cidr,
    log_limit::{LogLimiter, REMIND_EVERY},
};

/// Which devices get our programs: every device, or the ones named with
/// `--devices` and lo (whose egress carries node processes' traffic to the
/// node's own addresses: see `Direction::for_device`).
#[derive(Clone, Debug, Default)]
pub struct DeviceFilter {
    pub only: Vec<String>,
}

impl DeviceFilter {
    pub fn wants(&self, name: &str) -> bool {
        self.only.is_empty() || name == "lo" || self.only.iter().any(|n| n == name)
    }
}

/// Devices of this network namespace that `filter` selects.
pub fn list(filter: &DeviceFilter) -> Result<BTreeSet<Device>> {
    Ok(nix::net::if_::if_nameindex()?
        .iter()
        .filter_map(|i| {
            let name = i.name().to_str().ok()?.to_string();
            filter.wants(&name).then_some(Device {
                name,
                index: i.index(),
            })
        })
        .collect())
}

/// Addresses NodePorts answer on, both families: every address of the
/// node except loopback and IPv6 link-local ones (the same fe80:: address
/// may be on many links, and a NodePort is never dialed on one), or those
/// within `--nodeport-addresses` when given.
pub fn nodeport_addresses(cidrs: &[Cidr]) -> Result<BTreeSet<IpAddr>> {
    Ok(node_addresses()?
        .into_iter()
        .map(|(_, ip)| ip)
        .filter(|ip| cidrs.is_empty() || cidrs.iter().any(|c| c.contains(*ip)))
        .collect())
}

/// Names of the devices that hold a node address (see
/// [`node_addresses`]): the node's links, never a pod's host-side device,
/// which has none or a link-local one only.
pub fn addressed_devices() -> Result<BTreeSet<String>> {
    Ok(node_addresses()?
        .into_iter()
        .map(|(device, _)| device)
        .collect())
}

/// Every address of the node but loopback and IPv6 link-local ones, with
/// the name of its device.
fn node_addresses() -> Result<Vec<(String, IpAddr)>> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs()? {
        let Some(addr) = ifa.address.as_ref() else {
            continue;
        };
        let ip = if let Some(a) = addr.as_sockaddr_in() {
            IpAddr::V4(a.ip())
        } else if let Some(a) = addr.as_sockaddr_in6() {
            IpAddr::V6(a.ip())
        } else {
            continue;
        };
        let link_local = matches!(ip, IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80);
        if !ip.is_loopback() && !link_local {
            out.push((ifa.interface_name, ip));
        }
    }
    Ok(out)
}

/// The devices our programs are attached to, kept in step with the
/// devices of the namespace.
///
/// A pod's host-side device (a veth or netkit whose peer is in another
/// namespace, holding no node address) gets the egress hook only while
/// [`Attachments::set_pod_egress`] says pods need it. What egress does
/// there is for packets the node itself sends a pod within a translated
/// flow: the replies of a hostNetwork backend of this node and the ICMP
/// errors the node's stack sends about a translated packet. With socket
/// LB, a pod's connections are translated at the socket and those
/// packets need nothing; every other packet for a pod arrived by a device
/// whose ingress hook saw it, and egress would only return at once.
pub struct Attachments {
    filter: DeviceFilter,
    attached: BTreeSet<Device>,
    /// The attached devices that are pods' (see above).
    pods: BTreeSet<Device>,
    pod_egress: bool,
    /// Devices whose attach failed: when to try again, and the delay after.
    retry: BTreeMap<Device, (Instant, Duration)>,
    list_errors: LogLimiter,
}

impl Attachments {
    pub fn new(filter: DeviceFilter) -> Attachments {
        Attachments {
            filter,
            attached: BTreeSet::new(),
            pods: BTreeSet::new(),
            pod_egress: true,
            retry: BTreeMap::new(),
            list_errors: LogLimiter::reminding(REMIND_EVERY),
        }
    }

    pub fn len(&self) -> usize {
        self.attached.len()
    }

    pub fn is_empty(&self) -> bool {
        self.attached.is_empty()
    }

    /// Whether this run attached (or swapped its programs into) `dev`.
    pub fn has(&self, dev: &Device) -> bool {
        self.attached.contains(dev)
    }

    /// Whether pods' devices get the egress hook.
    pub fn pod_egress(&self) -> bool {
        self.pod_egress
    }

    /// Gives pods' devices the egress hook, or takes it off them (a link
    /// an earlier run pinned there too). A device it fails on counts as
    /// not attached: the next refresh attaches it again, with the hooks
    /// of the moment.
    pub fn set_pod_egress(&mut self, dp: &mut Datapath, on: bool) {
        self.pod_egress = on;
        for dev in self.pods.clone() {
            if let Err(e) = dp.attach(&dev, self.hooks(&dev, true), true) {
                warn!(device = %dev.name, error = %format!("{e:#}"), "changing the egress hook of a pod's device failed; tried again");
                self.attached.remove(&dev);
                self.pods.remove(&dev);
            }
        }
    }

    /// The hooks `dev` gets; `pod`: it is a pod's device.
    fn hooks(&self, dev: &Device, pod: bool) -> &'static [Direction] {
        if pod && !self.pod_egress {
            &[Direction::Ingress]
        } else {
            Direction::for_device(dev)
        }
    }

    /// Links pinned by an earlier run: those of devices still here get the
    /// new programs swapped in by [`Attachments::refresh`] (atomically,
    /// through the link); those of vanished devices are dropped now.
    pub fn drop_vanished_pins(&self, dp: &mut Datapath) -> Result<()> {
        let current = list(&self.filter)?;
        for dev in dp.attached()? {
            if !current.contains(&dev) {
                dp.detach(&dev)?;
            }
        }
        Ok(())
    }

    /// Attaches to new devices and forgets vanished ones.
    pub fn refresh(&mut self, dp: &mut Datapath) {
        let current = match list(&self.filter) {
            Ok(d) => d,
            Err(e) => {
                let e = format!("{e:#}");
                if let Some(times) = self.list_errors.failed(&e) {
                    warn!(error = %e, times, "listing devices failed");
                }
                return;
            }
        };
        if let Some(times) = self.list_errors.succeeded() {
            info!(failed = times, "listing devices works again");
        }
        // Unknown, every device is taken for a node's link (both hooks).
        let addressed = addressed_devices()
            .inspect_err(
                |e| warn!(error = %format!("{e:#}"), "listing the devices' addresses failed"),
            )
            .ok();
        if let Some(addressed) = &addressed {
            self.give_egress_to_addressed(dp, addressed);
        }
        let now = Instant::now();
        self.retry.retain(|dev, _| current.contains(dev));
        for dev in current.difference(&self.attached.clone()) {
            if self.retry.get(dev).is_some_and(|(at, _)| now < *at) {
                continue;
            }
            self.attach(dp, dev, addressed.as_ref(), now);
        }
        for dev in self
            .attached
            .difference(&current)
            .cloned()
            .collect::<Vec<_>>()
        {
            if let Err(e) = dp.detach(&dev) {
                warn!(device = %dev.name, error = %format!("{e:#}"), "detach failed");
            }
            if self.filter.only.is_empty() {
                debug!(device = %dev.name, "device gone");
            } else {
                // Named by the operator: worth saying, once per absence.
                warn!(device = %dev.name, "device named in --devices is gone; attached again when it returns");
            }
            self.attached.remove(&dev);
            self.pods.remove(&dev);
        }
    }

    /// A device taken for a pod's that has a node address now is a link
    /// of the node after all: it gets the egress hook.
    fn give_egress_to_addressed(&mut self, dp: &mut Datapath, addressed: &BTreeSet<String>) {
        let now_addressed: Vec<Device> = self
            .pods
            .iter()
            .filter(|dev| addressed.contains(&dev.name))
            .cloned()
            .collect();
        for dev in now_addressed {
            self.pods.remove(&dev);
            match dp.attach(&dev, Direction::for_device(&dev), true) {
                Ok(()) => {
                    info!(device = %dev.name, "has a node address now: attached to its egress too")
                }
                // Attached again, with backoff, by this refresh.
                Err(e) => {
                    warn!(device = %dev.name, error = %format!("{e:#}"), "attach failed");
                    self.attached.remove(&dev);
                }
            }
        }
    }

    fn attach(
        &mut self,
        dp: &mut Datapath,
        dev: &Device,
        addressed: Option<&BTreeSet<String>>,
        now: Instant,
    ) {
        let peer = match peer::peer_in_other_namespace(dev.index) {
            Ok(peer) => peer,
            Err(e) => {
                warn!(device = %dev.name, error = %format!("{e:#}"), "asking for the device's peer failed: taken for a node's link");
                false
            }
        };
        let pod = peer && addressed.is_some_and(|a| !a.contains(&dev.name));
        match dp.attach(dev, self.hooks(dev, pod), peer) {
            Ok(()) => {
                info!(device = %dev.name, ifindex = dev.index, pod, "attached");
                self.attached.insert(dev.clone());
                if pod {
                    self.pods.insert(dev.clone());
                }
                self.retry.remove(dev);
            }
            // A device can vanish between listing and attaching (a pod
            // being deleted); the next round sees it gone. Otherwise try
            // again later, backing off to once a minute.
            Err(e) => {
                let delay = self
                    .retry
                    .get(dev)
                    .map_or(Duration::from_secs(1), |(_, d)| {
                        (*d * 2).min(Duration::from_secs(60))
                    });
                warn!(device = %dev.name, error = %format!("{e:#}"), retry_in_s = delay.as_secs(), "attach failed");
                self.retry.insert(dev.clone(), (now + delay, delay));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lo_is_always_wanted() {
        let f = DeviceFilter::default();
        assert!(f.wants("lo"));
        assert!(f.wants("eth0"));
        let f = DeviceFilter {
            only: vec!["eth1".into()],
        };
        assert!(f.wants("eth1"));
        assert!(f.wants("lo"));
        assert!(!f.wants("eth0"));
    }
}
