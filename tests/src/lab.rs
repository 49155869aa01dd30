//! The lab: namespaces for an underlay, two nodes, a client and any number
//! of pods, plus daemons running in them. Dropping it (also while unwinding
//! from a panic) removes all of it.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::Signal;

use crate::cgroup::{self, LabCgroups};
use crate::daemon::{self, Daemon};
use crate::instance::LabId;
use crate::netns::{self, Netns};
use crate::{addr, leftovers, mounts, topology, wait};

/// How long [`Lab::stop_daemon`] waits before killing.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long dropping a lab waits for daemons to exit after SIGTERM.
const DROP_GRACE: Duration = Duration::from_secs(2);

/// A pod: its own namespace, attached to a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub name: String,
    pub node: String,
    pub ip: Ipv4Addr,
    /// Its IPv6 address ([`addr::pod_ip6`]): every pod is dual-stack.
    pub ip6: Ipv6Addr,
    /// The pod's veth peer in the node's namespace.
    pub host_veth: String,
}

/// A lab of network namespaces; see the crate docs for the topology.
pub struct Lab {
    dir: PathBuf,
    /// By lab name: "underlay", "node-a", "node-b", "client", pod names.
    namespaces: BTreeMap<String, Netns>,
    pods: BTreeMap<String, Pod>,
    /// By the lab name of the namespace they run in.
    daemons: BTreeMap<String, Daemon>,
    /// Each node's cgroup (none without cgroup v2); removed after the
    /// daemons stopped and the namespaces are gone.
    cgroups: Option<LabCgroups>,
    /// Last field: stays registered as live until everything above is gone,
    /// so no concurrent `Lab::new` mistakes our names for leftovers.
    id: LabId,
}

impl Lab {
    /// Builds underlay, node-a, node-b and client (no pods). Also removes
    /// leftovers of labs whose process died without cleaning up.
    pub fn new() -> Result<Lab> {
        leftovers::remove();
        let id = LabId::register();
        // Canonical, so that it compares equal to mount points in mountinfo.
        let dir = std::env::temp_dir().canonicalize()?.join(id.prefix());
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // From here on, an early return drops `lab` and so undoes the work.
        let mut lab = Lab {
            dir,
            namespaces: BTreeMap::new(),
            pods: BTreeMap::new(),
            daemons: BTreeMap::new(),
            cgroups: None,
            id,
        };
        lab.cgroups = LabCgroups::create(&lab.id.prefix(), &addr::NODES)?;
        for role in [addr::UNDERLAY, addr::NODE_A, addr::NODE_B, addr::CLIENT] {
            lab.create_ns(role, role, Some(role))?;
        }
        let underlay = &lab.namespaces[addr::UNDERLAY];
        topology::setup_underlay(underlay)?;
        for node in addr::NODES {
            let ip = addr::node_ip(node).expect("NODES have IPs");
            topology::setup_node(underlay, &lab.namespaces[node], node, ip)
                .with_context(|| format!("setting up {node}"))?;
        }
        topology::setup_client(underlay, &lab.namespaces[addr::CLIENT])?;
        Ok(lab)
    }

    /// Creates a namespace; its threads and processes join the cgroup of
    /// `node`, if that is a node.
    fn create_ns(&mut self, lab_name: &str, role: &str, node: Option<&str>) -> Result<()> {
        let ns = Netns::create(&format!("{}-{role}", self.id.prefix()))?;
        let ns = ns.with_cgroup(node.and_then(|n| self.cgroup(n)));
        self.namespaces.insert(lab_name.to_string(), ns);
        Ok(())
    }

    /// The cgroup v2 group of a node's pods and processes (and its daemon),
    /// which the lab made; `None` without cgroup v2. The daemons started by
    /// [`Lab::start_daemon`] attach their socket programs there.
    pub fn cgroup(&self, node: &str) -> Option<&Path> {
        self.cgroups.as_ref()?.node(node)
    }

    /// Adds a pod on `node` with the next free address of the node's pod
    /// CIDR, counting from .11. Works while daemons run.
    pub fn add_pod(&mut self, node: &str, name: &str) -> Result<Ipv4Addr> {
        let cidr = addr::pod_cidr(node).with_context(|| format!("{node:?} is not a node"))?;
        let ip = (addr::FIRST_POD_HOST..=254)
            .map(|host| Ipv4Addr::from(u32::from(cidr) + u32::from(host)))
            .find(|ip| self.pods.values().all(|p| p.ip != *ip))
            .with_context(|| format!("pod CIDR of {node} is full"))?;
        self.add_pod_with_ip(node, name, ip)?;
        Ok(ip)
    }

    /// Adds a pod with a chosen IP (and the IPv6 address
    /// [`addr::pod_ip6`] derives from it). An IP outside the node's pod CIDR
    /// is allowed, but the other node has no route to it.
    pub fn add_pod_with_ip(&mut self, node: &str, name: &str, ip: Ipv4Addr) -> Result<()> {
        ensure!(addr::pod_cidr(node).is_some(), "{node:?} is not a node");
        let valid_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.';
        ensure!(
            !name.is_empty() && name.len() <= 64 && name.chars().all(valid_char),
            "pod name {name:?}: use 1-64 of [A-Za-z0-9._-]"
        );
        ensure!(
            !self.namespaces.contains_key(name),
            "name {name:?} is already taken"
        );
        if let Some(other) = self.pods.values().find(|p| p.ip == ip) {
            bail!("{ip} already belongs to pod {}", other.name);
        }
        let host_veth = topology::host_veth_name(ip);
        let ip6 = addr::pod_ip6(node, ip).expect("checked: a node");
        self.create_ns(name, &format!("pod-{name}"), Some(node))?;
        let wired = topology::setup_pod(
            &self.namespaces[node],
            &self.namespaces[name],
            (ip, ip6),
            &host_veth,
        );
        if let Err(e) = wired {
            // Deleting the pod's namespace also removes its veth pair and
            // with it the node's route.
            if let Some(ns) = self.namespaces.remove(name) {
                let _ = netns::delete(ns.name());
            }
            return Err(e.context(format!("adding pod {name} on {node}")));
        }
        self.pods.insert(
            name.to_string(),
            Pod {
                name: name.to_string(),
                node: node.to_string(),
                ip,
                ip6,
                host_veth,
            },
        );
        Ok(())
    }

    /// A namespace by lab name: "underlay", "node-a", "node-b", "client" or a
    /// pod name. Panics on unknown names (a bug in the test).
    pub fn ns(&self, name: &str) -> &Netns {
        self.try_ns(name).unwrap_or_else(|| {
            let known: Vec<&String> = self.namespaces.keys().collect();
            panic!("lab has no namespace {name:?}; known: {known:?}")
        })
    }

    /// Like [`Lab::ns`], without panicking.
    pub fn try_ns(&self, name: &str) -> Option<&Netns> {
        self.namespaces.get(name)
    }

    /// A pod by name.
    pub fn pod(&self, name: &str) -> Option<&Pod> {
        self.pods.get(name)
    }

    /// All pods, by name.
    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.pods.values()
    }

    /// This lab's private directory (under the system temp dir); removed,
    /// after unmounting whatever is mounted below it, when the lab drops.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn log_path(&self, ns: &str) -> PathBuf {
        self.dir.join(format!("daemon-{ns}.log"))
    }

    /// Starts `program` inside namespace `ns` (normally a node), with stdout
    /// and stderr appended to a log in [`Lab::dir`]. It shares our mount
    /// namespace, so bpffs mounts and pins it makes are visible here (and
    /// /sys is the root namespace's sysfs: look devices up by netlink or
    /// ioctl, not /sys/class/net). In a node it runs in the node's cgroup
    /// with `KEP_CGROUP_ROOT` naming that group, elsewhere with
    /// `KEP_SOCKET_LB=false`: a daemon of the lab never attaches to a
    /// cgroup the lab did not make. One
    /// daemon per namespace; call from the thread that owns the lab (the
    /// daemon is killed when the thread that started it exits).
    pub fn start_daemon(
        &mut self,
        ns: &str,
        program: &Path,
        args: impl IntoIterator<Item = impl AsRef<OsStr>>,
    ) -> Result<()> {
        if let Some(running) = self.daemons.get_mut(ns)
            && running.exited().is_none()
        {
            bail!("a daemon (pid {}) already runs in {ns}", running.pid());
        }
        let netns = self
            .try_ns(ns)
            .with_context(|| format!("lab has no namespace {ns:?}"))?;
        let env = cgroup::daemon_env(netns.cgroup());
        let daemon = Daemon::start(netns, program, args, &env, &self.log_path(ns))?;
        self.daemons.insert(ns.to_string(), daemon);
        Ok(())
    }

    /// Sends `signal` to the daemon in `ns` and waits up to [`STOP_TIMEOUT`]
    /// for it to exit. If it already exited, returns that status without
    /// signalling. Not exiting in time is an error (it is killed then).
    pub fn stop_daemon(&mut self, ns: &str, signal: Signal) -> Result<ExitStatus> {
        let daemon = self
            .daemons
            .remove(ns)
            .with_context(|| format!("no daemon in {ns}"))?;
        daemon
            .stop(signal, STOP_TIMEOUT)
            .with_context(|| format!("stopping daemon in {ns}"))
    }

    /// The pid of the daemon in `ns`, if one was started and not stopped.
    pub fn daemon_pid(&self, ns: &str) -> Option<u32> {
        self.daemons.get(ns).map(Daemon::pid)
    }

    /// The exit status of the daemon in `ns` if it has exited on its own;
    /// `None` while it runs (or if there is none).
    pub fn daemon_exited(&mut self, ns: &str) -> Option<ExitStatus> {
        self.daemons.get_mut(ns).and_then(Daemon::exited)
    }

    /// Everything the daemons of `ns` have written so far (all runs).
    pub fn daemon_log(&self, ns: &str) -> String {
        daemon::read_log(&self.log_path(ns))
    }

    /// Polls `f` until it returns true. On timeout the error names `what`
    /// and carries the tail of every daemon's log, which usually says why.
    pub fn wait_for(&self, what: &str, timeout: Duration, f: impl FnMut() -> bool) -> Result<()> {
        wait::wait_until(what, timeout, f).map_err(|e| {
            let tails: String = self
                .daemons
                .keys()
                .map(|ns| {
                    format!(
                        "\n--- daemon log of {ns} (tail) ---\n{}",
                        daemon::log_tail(&self.log_path(ns), 20)
                    )
                })
                .collect();
            anyhow::anyhow!("{e:#}{tails}")
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        daemon::stop_all(
            std::mem::take(&mut self.daemons).into_values().collect(),
            DROP_GRACE,
        );
        let unmounted = mounts::unmount_under(&self.dir);
        if let Err(e) = &unmounted {
            eprintln!("lab: {e:#}");
        }
        for ns in std::mem::take(&mut self.namespaces).into_values() {
            if let Err(e) = netns::delete(ns.name()) {
                eprintln!("lab: {e:#}");
            }
        }
        // Never recurse into a filesystem that is still mounted.
        if unmounted.is_ok()
            && let Err(e) = std::fs::remove_dir_all(&self.dir)
        {
            eprintln!("lab: removing {}: {e}", self.dir.display());
        }
    }
}
