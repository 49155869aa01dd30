//! A throwaway network namespace for datapath tests and benchmarks, so that
//! the programs' FIB lookups see a known routing table instead of the
//! machine's:
//!
//!   d0 (veth, peer d1) 10.244.2.1/24, forwarding on, a permanent neighbour
//!   entry for 10.244.2.11 ([`BACKEND_MAC`]) and none for other addresses.
//!
//! The calling thread enters it; on drop the thread returns to its previous
//! namespace and the namespace is deleted.

use std::{
    fs::File,
    os::fd::AsFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result, bail};
use nix::sched::{CloneFlags, setns};

pub const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x0b];

pub struct NetNsGuard {
    name: String,
    previous: File,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl NetNsGuard {
    pub fn new() -> Result<NetNsGuard> {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "kepdp{}x{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name])?;
        let guard = NetNsGuard {
            previous: File::open("/proc/thread-self/ns/net")?,
            name,
        };
        let ns = File::open(format!("/run/netns/{}", guard.name))?;
        setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).context("entering the test namespace")?;
        let n = guard.name.as_str();
        for cmd in [
            "link set lo up",
            // This kernel has no dummy driver; a veth pair inside the
            // namespace serves as well.
            "link add d0 type veth peer name d1",
            "link set d1 up",
            "link set d0 up",
            "addr add 10.244.2.1/24 dev d0",
            "neigh add 10.244.2.11 lladdr 02:00:00:00:02:0b dev d0 nud permanent",
        ] {
            let mut args = vec!["-n", n];
            args.extend(cmd.split(' '));
            ip(&args)?;
        }
        ip(&["netns", "exec", n, "sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        Ok(guard)
    }
}

impl Drop for NetNsGuard {
    fn drop(&mut self) {
        let _ = setns(self.previous.as_fd(), CloneFlags::CLONE_NEWNET);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
