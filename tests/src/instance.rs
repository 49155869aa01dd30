//! Naming of lab instances. Everything a lab creates (namespaces, its temp
//! dir) starts with `kep<pid>x<counter>`, which keeps labs of parallel tests
//! and processes apart and tells, after a crash, whose leftovers are whose.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;

const PREFIX: &str = "kep";

static NEXT_COUNTER: AtomicU32 = AtomicU32::new(0);
/// Counters of this process's labs that are alive. A name carrying our own
/// pid but a counter not in here was left by an earlier process that had the
/// same pid.
static LIVE: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

/// Identity of one lab; registered as live from creation until drop.
#[derive(Debug)]
pub(crate) struct LabId {
    counter: u32,
}

impl LabId {
    pub(crate) fn register() -> LabId {
        let counter = NEXT_COUNTER.fetch_add(1, Ordering::Relaxed);
        live().insert(counter);
        LabId { counter }
    }

    /// `kep<pid>x<counter>`: the start of every name this lab creates.
    pub(crate) fn prefix(&self) -> String {
        format!("{PREFIX}{}x{}", std::process::id(), self.counter)
    }
}

impl Drop for LabId {
    fn drop(&mut self) {
        live().remove(&self.counter);
    }
}

fn live() -> std::sync::MutexGuard<'static, BTreeSet<u32>> {
    // A panic while holding this lock cannot leave the set inconsistent.
    LIVE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether `name` is something a lab created (`kep<pid>x<counter>` alone or
/// followed by `-...`) and its lab can no longer be alive: its process is
/// gone, or it is our own pid with a counter we never handed out or already
/// released. Names of any other form are never stale.
pub(crate) fn is_stale(name: &str) -> bool {
    let Some((pid, counter)) = parse(name) else {
        return false;
    };
    if pid == std::process::id() {
        return !live().contains(&counter);
    }
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    // Signal 0 only checks existence; EPERM still means "alive".
    matches!(kill(Pid::from_raw(raw), None), Err(Errno::ESRCH))
}

fn parse(name: &str) -> Option<(u32, u32)> {
    let rest = name.strip_prefix(PREFIX)?;
    let (pid, rest) = rest.split_once('x')?;
    let counter = match rest.split_once('-') {
        Some((counter, _role)) => counter,
        None => rest,
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(counter) {
        return None;
    }
    Some((pid.parse().ok()?, counter.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_lab_names() {
        assert_eq!(parse("kep123x4-node-a"), Some((123, 4)));
        assert_eq!(parse("kep123x4"), Some((123, 4)));
        assert_eq!(parse("kep123x4-pod-x-y"), Some((123, 4)));
        assert_eq!(parse("kep123x"), None);
        assert_eq!(parse("kepx4-a"), None);
        assert_eq!(parse("kep12a3x4-a"), None);
        assert_eq!(parse("kep123x4a"), None);
        assert_eq!(parse("other"), None);
        assert_eq!(parse("cni-1234"), None);
    }

    #[test]
    fn own_live_lab_is_not_stale() {
        let id = LabId::register();
        let name = format!("{}-node-a", id.prefix());
        assert!(!is_stale(&name));
        drop(id);
        assert!(is_stale(&name));
        assert!(!is_stale("unrelated-netns"));
    }
}
