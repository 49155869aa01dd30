//! Socket-level load balancing: the cgroup programs of
//! proxy-ebpf/src/sock.rs attached to a cgroup v2 group (all sockets of
//! processes in it and below), with links pinned next to the TC ones so that
//! they outlive the daemon and a restart swaps its programs in place.
//!
//! Pins: `links/sock-<cgroup inode>-<program>`. The inode names the group the
//! link is attached to, so a restart with another `--cgroup-root` detaches
//! the links of the old one instead of adopting them.

use std::{
    ffi::CString,
    fs::{self, File},
    io,
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::MetadataExt},
    },
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf,
    programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink, links::PinnedLink},
};
use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};
use proxy_common::{
    PROG_CONNECT4, PROG_CONNECT6, PROG_GETPEERNAME4, PROG_GETPEERNAME6, PROG_RECVMSG4,
    PROG_RECVMSG6, PROG_SENDMSG4, PROG_SENDMSG6,
};

use super::links_dir;

/// The order of attaching: the hooks that translate back first, so that at
/// no moment a socket is sent to a backend without `getpeername()` and
/// `recvmsg()` showing the service again.
const ATTACH_ORDER: [&str; 8] = [
    PROG_RECVMSG4,
    PROG_GETPEERNAME4,
    PROG_RECVMSG6,
    PROG_GETPEERNAME6,
    PROG_SENDMSG4,
    PROG_CONNECT4,
    PROG_SENDMSG6,
    PROG_CONNECT6,
];

const PIN_PREFIX: &str = "sock-";

/// Where the cgroup v2 hierarchy is mounted, from /proc/self/mountinfo: on
/// hybrid hosts that is /sys/fs/cgroup/unified, not /sys/fs/cgroup.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    cgroup2_mount_in(&info)
}

fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // id parent dev root mount-point options [optional...] - fstype ...
        let (fields, rest) = line.split_once(" - ")?;
        let mount_point = fields.split(' ').nth(4)?;
        (rest.split(' ').next()? == "cgroup2").then(|| PathBuf::from(unescape(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let mut out = Vec::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let s = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(s, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn pin_path(root: &Path, inode: u64, program: &str) -> PathBuf {
    links_dir(root).join(format!("{PIN_PREFIX}{inode}-{program}"))
}

/// Our socket-level link pins: (path, cgroup inode).
fn pins(root: &Path) -> Result<Vec<(PathBuf, u64)>> {
    let entries = match fs::read_dir(links_dir(root)) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let inode = name
            .strip_prefix(PIN_PREFIX)
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(inode, _)| inode.parse().ok());
        if let Some(inode) = inode {
            out.push((entry.path(), inode));
        }
    }
    Ok(out)
}

/// Loads the socket programs into the kernel. Call it right after loading
/// the object, before any map is taken out of it: a program carries the map
/// fds of the moment it is loaded.
pub fn load(ebpf: &mut Ebpf) -> Result<()> {
    for name in ATTACH_ORDER {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing"))?
            .try_into()?;
        super::load_retrying(name, || prog.load())?;
    }
    Ok(())
}

/// Attaches the socket programs to `cgroup` (a directory of the cgroup v2
/// hierarchy), or swaps them into the links an earlier run pinned there. If
/// any step fails, every socket-level link is removed again: the per-packet
/// path then serves everything, as with socket-level load balancing off.
pub fn attach(ebpf: &mut Ebpf, root: &Path, cgroup: &Path) -> Result<()> {
    let result = try_attach(ebpf, root, cgroup);
    if result.is_err()
        && let Err(e) = detach_all(root)
    {
        tracing::warn!(error = %format!("{e:#}"), "removing socket-level links after a failed attach");
    }
    result
}

fn try_attach(ebpf: &mut Ebpf, root: &Path, cgroup: &Path) -> Result<()> {
    let on_cgroup2 = statfs(cgroup)
        .map(|s| s.filesystem_type() == CGROUP2_SUPER_MAGIC)
        .unwrap_or(false);
    if !on_cgroup2 {
        bail!("{} is not a cgroup v2 directory", cgroup.display());
    }
    let dir = File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
    let inode = dir.metadata()?.ino();
    for (pin, pinned_inode) in pins(root)? {
        if pinned_inode != inode {
            // Attached to another group by an earlier run.
            unpin(&pin)?;
        }
    }
    for name in ATTACH_ORDER {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing"))?
            .try_into()?;
        let pin = pin_path(root, inode, name);
        if pin.exists() {
            let link = obj_get(&pin)?;
            link_update(link.as_fd().as_raw_fd(), prog.fd()?.as_fd().as_raw_fd())
                .with_context(|| format!("replacing {name} on {}", cgroup.display()))?;
        } else {
            let id = prog
                .attach(&dir, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
            let link: FdLink = prog.take_link(id)?.try_into()?;
            link.pin(&pin)
                .with_context(|| format!("pinning {}", pin.display()))?;
        }
    }
    Ok(())
}

/// Attaches the socket programs to `cgroup` without pinning anything: the
/// links last as long as `ebpf` (benchmarks on a cgroup they made).
pub fn attach_unpinned(ebpf: &mut Ebpf, cgroup: &Path) -> Result<()> {
    let dir = File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
    for name in ATTACH_ORDER {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing"))?
            .try_into()?;
        prog.attach(&dir, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
    }
    Ok(())
}

/// How often the kernel ran a socket program and for how long in total
/// (counted only while BPF statistics are on: `aya::sys::enable_stats`).
pub fn run_stats(ebpf: &Ebpf, name: &str) -> Result<(u64, std::time::Duration)> {
    let prog: &CgroupSockAddr = ebpf
        .program(name)
        .with_context(|| format!("program {name} missing"))?
        .try_into()?;
    let info = prog.info()?;
    Ok((info.run_count(), info.run_time()))
}

/// Removes every socket-level link (unpinning a link nothing else holds
/// detaches it); returns how many there were. Connect hooks go first, so
/// no socket is sent to a backend after the reverse hooks are gone.
pub fn detach_all(root: &Path) -> Result<usize> {
    let mut found = pins(root)?;
    let rank = |p: &Path| {
        let name = p.file_name().unwrap_or_default().to_string_lossy();
        ATTACH_ORDER
            .iter()
            .rposition(|prog| name.ends_with(prog))
            .map_or(0, |i| ATTACH_ORDER.len() - i)
    };
    found.sort_by_key(|(p, _)| rank(p));
    for (pin, _) in &found {
        unpin(pin)?;
    }
    Ok(found.len())
}

fn unpin(pin: &Path) -> Result<()> {
    match PinnedLink::from_pin(pin) {
        Ok(link) => drop(link.unpin()?),
        Err(_) => fs::remove_file(pin).with_context(|| format!("removing {}", pin.display()))?,
    }
    Ok(())
}

// Raw bpf(2) calls that aya 0.14 does not offer for cgroup links: opening a
// pinned link by path, and replacing a link's program in place
// (BPF_LINK_UPDATE, the same atomic swap the TC links get).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, fully initialized bpf_attr prefix of the
    // size passed; the kernel reads (and for some commands writes) only that.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret)
}

fn obj_get(path: &Path) -> Result<OwnedFd> {
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    let mut attr = ObjGetAttr {
        pathname: c_path.as_ptr() as u64,
        ..Default::default()
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn link_update(link_fd: i32, prog_fd: i32) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link_fd as u32,
        new_prog_fd: prog_fd as u32,
        ..Default::default()
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_of_a_hybrid_host() {
        let info = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_mount_in(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let pure =
            "29 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            cgroup2_mount_in(pure),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(cgroup2_mount_in("1 2 0:1 / /x rw - tmpfs tmpfs rw\n"), None);
        let spaced = "1 2 0:1 / /a\\040b rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount_in(spaced), Some(PathBuf::from("/a b")));
    }

    #[test]
    fn pins_name_their_cgroup_and_leave_tc_pins_alone() {
        let dir = std::env::temp_dir().join(format!("kep-sockpin-{}", std::process::id()));
        fs::create_dir_all(links_dir(&dir)).unwrap();
        for name in ATTACH_ORDER {
            fs::write(pin_path(&dir, 42, name), b"").unwrap();
        }
        fs::write(links_dir(&dir).join("eth0@2-ingress"), b"").unwrap();
        let mut found = pins(&dir).unwrap();
        found.sort();
        assert_eq!(found.len(), ATTACH_ORDER.len());
        assert!(found.iter().all(|(_, inode)| *inode == 42));
        // Plain files stand in for pins here: detach_all removes them in
        // order and leaves the TC pin alone.
        assert_eq!(detach_all(&dir).unwrap(), ATTACH_ORDER.len());
        let left: Vec<_> = fs::read_dir(links_dir(&dir)).unwrap().collect();
        assert_eq!(left.len(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }
}
