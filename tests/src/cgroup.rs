//! cgroup v2 groups for the lab's nodes, so that each node's daemon attaches
//! its socket-level programs to a group of its own and sees only the sockets
//! of that node's pods and processes.
//!
//! The lab's sockets are made by threads of the test process (see
//! [`crate::Netns::run`]), so the groups are *threaded* cgroups: a thread
//! that enters a node's namespace also joins the node's group, and sockets
//! belong to the group of the thread that created them. Threads of one
//! process may sit in different groups only inside one threaded domain, so
//! the test process moves into a domain of its own while it has labs:
//!
//! ```text
//! <cgroup2 mount>/kep<pid>x<n>/                 the process's domain (all its threads)
//!                   kep<pid>x<m>-node-a/        threaded: node-a's pods, node processes, daemon
//!                   kep<pid>x<m>-node-b/
//! ```
//!
//! Nothing is ever attached to or created in a group the lab did not make;
//! when the last lab goes, the process moves back where it was and the
//! groups are removed.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use anyhow::{Context, Result, bail};

use crate::instance::{self, LabId};

/// Where the cgroup v2 hierarchy is mounted (on hybrid hosts the `unified`
/// mount, not /sys/fs/cgroup), from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        // Fields: id parent dev root mount-point options... - fstype source ...
        let (before, after) = line.split_once(" - ")?;
        let fstype = after.split(' ').next()?;
        let mount_point = before.split(' ').nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

/// The process's threaded domain, shared by all its labs.
struct Domain {
    path: PathBuf,
    /// The process's group before it moved in, to move back to.
    original: PathBuf,
    labs: usize,
    _id: LabId,
}

static DOMAIN: Mutex<Option<Domain>> = Mutex::new(None);

fn domain() -> MutexGuard<'static, Option<Domain>> {
    DOMAIN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// This process's cgroup v2 group, from /proc/self/cgroup (`0::/path`).
fn own_group(mount: &Path) -> Result<PathBuf> {
    let text = fs::read_to_string("/proc/self/cgroup")?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("no cgroup v2 line in /proc/self/cgroup")?;
    Ok(mount.join(rel.trim_start_matches('/')))
}

fn move_process(to: &Path) -> Result<()> {
    let procs = to.join("cgroup.procs");
    fs::write(&procs, std::process::id().to_string())
        .with_context(|| format!("moving the test process to {}", to.display()))
}

/// Joins the process's domain, creating it for the first lab.
fn enter_domain(mount: &Path) -> Result<PathBuf> {
    let mut guard = domain();
    if let Some(d) = guard.as_mut() {
        d.labs += 1;
        return Ok(d.path.clone());
    }
    let id = LabId::register();
    let path = mount.join(id.prefix());
    let original = own_group(mount)?;
    fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
    if let Err(e) = move_process(&path) {
        let _ = fs::remove_dir(&path);
        return Err(e);
    }
    *guard = Some(Domain {
        path: path.clone(),
        original,
        labs: 1,
        _id: id,
    });
    Ok(path)
}

fn leave_domain() {
    let mut guard = domain();
    let Some(d) = guard.as_mut() else { return };
    d.labs -= 1;
    if d.labs > 0 {
        return;
    }
    let d = guard.take().expect("checked above");
    if let Err(e) = move_process(&d.original) {
        eprintln!("lab: {e:#}");
        return;
    }
    if let Err(e) = fs::remove_dir(&d.path) {
        eprintln!("lab: removing cgroup {}: {e}", d.path.display());
    }
}

/// One lab's node groups.
pub(crate) struct LabCgroups {
    domain: PathBuf,
    nodes: BTreeMap<String, PathBuf>,
}

impl LabCgroups {
    /// Threaded groups for `nodes`, named after the lab. `None` when the
    /// host has no cgroup v2 mount: the lab then runs without socket-level
    /// load balancing.
    pub(crate) fn create(prefix: &str, nodes: &[&str]) -> Result<Option<LabCgroups>> {
        let Some(mount) = cgroup2_mount() else {
            return Ok(None);
        };
        let domain = enter_domain(&mount)?;
        // From here on, dropping `groups` undoes the work.
        let mut groups = LabCgroups {
            domain,
            nodes: BTreeMap::new(),
        };
        for node in nodes {
            let path = groups.domain.join(format!("{prefix}-{node}"));
            fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
            groups.nodes.insert(node.to_string(), path.clone());
            fs::write(path.join("cgroup.type"), "threaded")
                .with_context(|| format!("making {} threaded", path.display()))?;
        }
        Ok(Some(groups))
    }

    /// The group of a node.
    pub(crate) fn node(&self, node: &str) -> Option<&Path> {
        self.nodes.get(node).map(PathBuf::as_path)
    }
}

impl Drop for LabCgroups {
    fn drop(&mut self) {
        for path in self.nodes.values() {
            if let Err(e) = remove_group(path, &self.domain) {
                eprintln!("lab: {e:#}");
            }
        }
        leave_domain();
    }
}

/// Moves what still runs in a group (threads of this process, say a server
/// thread) back to the domain, then removes the group.
fn remove_group(path: &Path, domain: &Path) -> Result<()> {
    let threads = fs::read_to_string(path.join("cgroup.threads")).unwrap_or_default();
    for tid in threads.split_whitespace() {
        // A thread may exit meanwhile; what counts is the rmdir below.
        let _ = fs::write(domain.join("cgroup.threads"), tid);
    }
    fs::remove_dir(path).with_context(|| format!("removing cgroup {}", path.display()))
}

/// Writes "0" to a group's `cgroup.threads`: moves the calling thread in.
pub(crate) fn join(group: &Path) -> Result<()> {
    fs::write(group.join("cgroup.threads"), "0")
        .with_context(|| format!("joining cgroup {}", group.display()))
}

/// Removes the groups of labs whose process died without cleaning up.
/// A group something still runs in is left alone.
pub(crate) fn remove_leftovers() {
    let Some(mount) = cgroup2_mount() else { return };
    let Ok(entries) = fs::read_dir(&mount) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !instance::is_stale(&name) || !entry.path().is_dir() {
            continue;
        }
        if let Err(e) = remove_tree(&entry.path()) {
            eprintln!("lab: keeping leftover cgroup {name}: {e:#}");
        }
    }
}

fn remove_tree(path: &Path) -> Result<()> {
    for entry in fs::read_dir(path)?.flatten() {
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    let procs = fs::read_to_string(path.join("cgroup.threads")).unwrap_or_default();
    if !procs.trim().is_empty() {
        bail!("tasks still run in {}", path.display());
    }
    fs::remove_dir(path).with_context(|| format!("removing {}", path.display()))
}

/// Environment of a daemon the lab starts: a node's daemon attaches its
/// socket programs to the node's group (`KEP_CGROUP_ROOT`), any other has
/// socket-level load balancing off, never reaching for the host's root
/// cgroup. Flags given on the command line win over both.
pub(crate) fn daemon_env(group: Option<&Path>) -> Vec<(&'static str, &std::ffi::OsStr)> {
    match group {
        Some(group) => vec![("KEP_CGROUP_ROOT", group.as_os_str())],
        None => vec![("KEP_SOCKET_LB", "false".as_ref())],
    }
}
