//! Making sure our pin directory lives on a BPF filesystem.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};

/// The usual bpffs mount point: when our directory is meant to be under it
/// but nothing is mounted there (sysfs refuses mkdir), bpffs is mounted
/// there first, as most distributions do at boot.
const SYS_BPF: &str = "/sys/fs/bpf";

pub fn is_bpffs(path: &Path) -> bool {
    statfs(path)
        .map(|s| s.filesystem_type() == BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// Mounts bpffs at `at`, for the pin directory `dir` (`at` itself or
/// /sys/fs/bpf above it).
fn mount_bpffs(at: &Path, dir: &Path) -> Result<()> {
    if let Err(e) = mount(Some("bpf"), at, Some("bpf"), MsFlags::empty(), None::<&str>) {
        bail!(
            "--bpffs {}: mounting bpffs at {} failed: {} (mount bpffs there first, \
             e.g. the host's /sys/fs/bpf)",
            dir.display(),
            at.display(),
            e.desc()
        );
    }
    tracing::info!(path = %at.display(), "mounted bpffs");
    Ok(())
}

/// Creates `dir` on a BPF filesystem, mounting one when none is there
/// (never over a directory that has files). Errors are one line naming
/// `--bpffs`.
pub fn ensure(dir: &Path) -> Result<()> {
    if is_bpffs(dir) {
        return Ok(());
    }
    if !dir.exists() {
        if let Err(e) = fs::create_dir_all(dir) {
            let sys = Path::new(SYS_BPF);
            if dir.starts_with(sys) && !is_bpffs(sys) {
                mount_bpffs(sys, dir)?;
                fs::create_dir_all(dir)?;
            } else {
                bail!("--bpffs {}: cannot be created: {e}", dir.display());
            }
        }
        if is_bpffs(dir) {
            return Ok(());
        }
    }
    // Mounting over files would hide them (a typo like `--bpffs /tmp`).
    if fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()) {
        bail!(
            "--bpffs {}: not on a BPF filesystem, and not empty: refusing to mount one \
             over its files",
            dir.display()
        );
    }
    mount_bpffs(dir, dir)?;
    if !is_bpffs(dir) {
        bail!("{} is still not on a BPF filesystem", dir.display());
    }
    Ok(())
}

/// Mount points listed in /proc/self/mountinfo.
fn mount_points() -> io::Result<Vec<PathBuf>> {
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .collect())
}

/// Unmounts a bpffs that [`ensure`] mounted at `dir` itself, once it holds
/// nothing any more, and removes the directory.
pub fn release(dir: &Path) -> Result<()> {
    let Ok(canonical) = dir.canonicalize() else {
        return Ok(());
    };
    if is_bpffs(&canonical) && mount_points()?.contains(&canonical) {
        // bpffs puts its own entries at the root of a fresh mount
        // (maps.debug, progs.debug); only dotted names can be the kernel's.
        let ours_or_others = fs::read_dir(&canonical)?
            .flatten()
            .any(|e| !e.file_name().to_string_lossy().contains('.'));
        if ours_or_others {
            bail!("{} is not empty; leaving it mounted", canonical.display());
        }
        umount2(&canonical, MntFlags::MNT_DETACH)
            .with_context(|| format!("unmounting {}", canonical.display()))?;
    }
    match fs::remove_dir(&canonical) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        // Someone else's files: not ours to remove.
        Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", canonical.display())),
    }
}
