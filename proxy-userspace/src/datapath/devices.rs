//! The node's network devices and addresses, read through netlink-backed
//! libc calls so they are those of the daemon's network namespace.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
};

use anyhow::Result;

use crate::{cidr::Cidr, datapath::Device};

/// Which devices get our programs: every device but loopback, or the ones
/// named with `--devices`.
#[derive(Clone, Debug, Default)]
pub struct DeviceFilter {
    pub only: Vec<String>,
}

impl DeviceFilter {
    pub fn wants(&self, name: &str) -> bool {
        if self.only.is_empty() {
            name != "lo"
        } else {
            self.only.iter().any(|n| n == name)
        }
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

/// IPv4 addresses NodePorts answer on: every address of the node except
/// loopback ones, or those within `--nodeport-addresses` when given.
pub fn nodeport_addresses(cidrs: &[Cidr]) -> Result<BTreeSet<Ipv4Addr>> {
    let mut out = BTreeSet::new();
    for ifa in nix::ifaddrs::getifaddrs()? {
        let Some(addr) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) else {
            continue;
        };
        let ip = addr.ip();
        if ip.is_loopback() {
            continue;
        }
        if cidrs.is_empty() || cidrs.iter().any(|c| c.contains(IpAddr::V4(ip))) {
            out.insert(ip);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_filter_skips_loopback_only() {
        let f = DeviceFilter::default();
        assert!(!f.wants("lo"));
        assert!(f.wants("eth0"));
        let f = DeviceFilter {
            only: vec!["eth1".into()],
        };
        assert!(f.wants("eth1"));
        assert!(!f.wants("eth0"));
    }
}
