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

use super::{Datapath, Device};
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
    let mut out = BTreeSet::new();
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
        if ip.is_loopback() || link_local {
            continue;
        }
        if cidrs.is_empty() || cidrs.iter().any(|c| c.contains(ip)) {
            out.insert(ip);
        }
    }
    Ok(out)
}

/// The devices our programs are attached to, kept in step with the
/// devices of the namespace.
pub struct Attachments {
    filter: DeviceFilter,
    attached: BTreeSet<Device>,
    /// Devices whose attach failed: when to try again, and the delay after.
    retry: BTreeMap<Device, (Instant, Duration)>,
    list_errors: LogLimiter,
}

impl Attachments {
    pub fn new(filter: DeviceFilter) -> Attachments {
        Attachments {
            filter,
            attached: BTreeSet::new(),
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
        let now = Instant::now();
        self.retry.retain(|dev, _| current.contains(dev));
        for dev in current.difference(&self.attached.clone()) {
            if self.retry.get(dev).is_some_and(|(at, _)| now < *at) {
                continue;
            }
            self.attach(dp, dev, now);
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
        }
    }

    fn attach(&mut self, dp: &mut Datapath, dev: &Device, now: Instant) {
        match dp.attach(dev) {
            Ok(()) => {
                info!(device = %dev.name, ifindex = dev.index, "attached");
                self.attached.insert(dev.clone());
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
