//! The load generator: one pinned thread keeping `concurrency` connections
//! in flight with nonblocking sockets and epoll.
use std::fs;
use std::io::{self, ErrorKind};
use std::mem;
use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};

use super::{CONN_TIMEOUT, REQUEST, server::RESPONSE_LEN};

#[derive(Debug, Default)]
pub(super) struct CrrStats {
    pub(super) completed: u64,
    pub(super) errors: u64,
    pub(super) elapsed: Duration,
    pub(super) first_error: Option<String>,
}

impl CrrStats {
    pub(super) fn fail(&mut self, why: String) {
        self.errors += 1;
        self.first_error.get_or_insert(why);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum ConnState {
    Connecting,
    Reading,
}

pub(super) struct Conn {
    fd: OwnedFd,
    state: ConnState,
    since: Instant,
    got: usize,
}

pub(super) fn last_err(what: &str) -> String {
    format!("{what}: {}", io::Error::last_os_error())
}

/// Opens a nonblocking connection to `target` and registers it with epoll
/// (writable = connected).
pub(super) fn open_conn(ep: RawFd, slot: usize, target: SocketAddrV4) -> Result<Conn, String> {
    // SAFETY: plain socket syscalls on descriptors we own; the sockaddr is
    // fully initialised and outlives the call.
    unsafe {
        let fd = libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        );
        if fd < 0 {
            return Err(last_err("socket"));
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: target.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*target.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            fd.as_raw_fd(),
            (&raw const sa).cast(),
            mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        if rc != 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(last_err("connect"));
        }
        let mut ev = libc::epoll_event {
            events: libc::EPOLLOUT as u32,
            u64: slot as u64,
        };
        if libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd.as_raw_fd(), &mut ev) != 0 {
            return Err(last_err("epoll_ctl add"));
        }
        Ok(Conn {
            fd,
            state: ConnState::Connecting,
            since: Instant::now(),
            got: 0,
        })
    }
}

pub(super) enum Step {
    /// Still in flight.
    Pending,
    /// Answer read to EOF.
    Done,
    Failed(String),
}

/// Advances a connection after epoll reported `events` for it.
pub(super) fn step(ep: RawFd, conn: &mut Conn, events: u32, slot: usize, buf: &mut [u8]) -> Step {
    let fd = conn.fd.as_raw_fd();
    // SAFETY: syscalls on a descriptor we own with buffers that outlive them.
    unsafe {
        if conn.state == ConnState::Connecting {
            let mut err: libc::c_int = 0;
            let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
            if libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&raw mut err).cast(),
                &mut len,
            ) != 0
            {
                return Step::Failed(last_err("getsockopt"));
            }
            if err != 0 {
                return Step::Failed(format!("connect: {}", io::Error::from_raw_os_error(err)));
            }
            if events & libc::EPOLLOUT as u32 == 0 {
                return Step::Pending;
            }
            let n = libc::send(
                fd,
                REQUEST.as_ptr().cast(),
                REQUEST.len(),
                libc::MSG_NOSIGNAL,
            );
            if n != REQUEST.len() as isize {
                return Step::Failed(last_err("send"));
            }
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: slot as u64,
            };
            if libc::epoll_ctl(ep, libc::EPOLL_CTL_MOD, fd, &mut ev) != 0 {
                return Step::Failed(last_err("epoll_ctl mod"));
            }
            conn.state = ConnState::Reading;
            conn.since = Instant::now();
            return Step::Pending;
        }
        loop {
            let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
            if n > 0 {
                conn.got += n as usize;
                conn.since = Instant::now();
                continue;
            }
            if n == 0 {
                return if conn.got >= RESPONSE_LEN {
                    Step::Done
                } else {
                    Step::Failed(format!("short answer ({} bytes)", conn.got))
                };
            }
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) => Step::Pending,
                Some(libc::EINTR) => continue,
                _ => Step::Failed(format!("read: {e}")),
            };
        }
    }
}

/// For `duration`, keeps `concurrency` connections in flight to `targets`
/// (round-robin) and counts those answered to EOF. Connections still open
/// at the end are closed and not counted.
pub(super) fn crr_loop(
    targets: &[SocketAddrV4],
    concurrency: usize,
    duration: Duration,
) -> Result<CrrStats> {
    // SAFETY: epoll_create1 returns a new descriptor we then own.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    ensure!(ep >= 0, "epoll_create1: {}", io::Error::last_os_error());
    // SAFETY: ep is a fresh descriptor owned by nobody else.
    let ep_owned = unsafe { OwnedFd::from_raw_fd(ep) };
    let mut stats = CrrStats::default();
    let mut next = 0usize;
    let mut pick = || {
        let t = targets[next % targets.len()];
        next += 1;
        t
    };
    let mut slots: Vec<Option<Conn>> = Vec::with_capacity(concurrency);
    let start = Instant::now();
    let deadline = start + duration;
    for slot in 0..concurrency {
        match open_conn(ep, slot, pick()) {
            Ok(c) => slots.push(Some(c)),
            Err(why) => {
                stats.fail(why);
                slots.push(None);
            }
        }
    }
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; concurrency];
    let mut buf = [0u8; 1024];
    let mut last_sweep = start;
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let Some(n) = wait(
            ep,
            &mut events,
            (deadline - now).as_millis().clamp(1, 50) as i32,
        )?
        else {
            continue;
        };
        let mut reopen = Vec::new();
        for ev in &events[..n] {
            let slot = ev.u64 as usize;
            if let Some(conn) = slots[slot].as_mut()
                && advance(ep, conn, ev.events, slot, &mut buf, deadline, &mut stats)
            {
                reopen.push(slot);
            }
        }
        let now = Instant::now();
        if now - last_sweep > Duration::from_millis(100) {
            last_sweep = now;
            reopen.extend(stalled(&slots, now, &mut stats));
        }
        for slot in reopen {
            // Dropping the OwnedFd closes the socket, which also removes it
            // from the epoll set.
            slots[slot] = None;
            if Instant::now() >= deadline {
                continue;
            }
            match open_conn(ep, slot, pick()) {
                Ok(c) => slots[slot] = Some(c),
                Err(why) => stats.fail(why),
            }
        }
        // A datapath that refuses everything fails fast instead of
        // spinning through the ports for the whole run.
        if stats.errors > 1000 && stats.errors > stats.completed {
            break;
        }
    }
    stats.elapsed = start.elapsed().min(duration).max(Duration::from_millis(1));
    drop(slots);
    drop(ep_owned);
    Ok(stats)
}

/// Waits up to `timeout_ms` for events; None when a signal interrupted.
fn wait(ep: RawFd, events: &mut [libc::epoll_event], timeout_ms: i32) -> Result<Option<usize>> {
    // SAFETY: epoll_wait writes at most `events.len()` events.
    let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, timeout_ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == ErrorKind::Interrupted {
            return Ok(None);
        }
        bail!("epoll_wait: {e}");
    }
    Ok(Some(n as usize))
}

/// Advances a connection epoll reported `events` for; true when it is
/// over (answered or failed) and its slot is to be reopened.
fn advance(
    ep: RawFd,
    conn: &mut Conn,
    events: u32,
    slot: usize,
    buf: &mut [u8],
    deadline: Instant,
    stats: &mut CrrStats,
) -> bool {
    match step(ep, conn, events, slot, buf) {
        Step::Pending => false,
        Step::Done => {
            // Count only what finished inside the window.
            if Instant::now() < deadline {
                stats.completed += 1;
            }
            true
        }
        Step::Failed(why) => {
            stats.fail(why);
            true
        }
    }
}

/// Slots to reopen: stalled connections (a lost packet, a broken datapath),
/// which count as errors, and empty slots.
fn stalled(slots: &[Option<Conn>], now: Instant, stats: &mut CrrStats) -> Vec<usize> {
    let mut reopen = Vec::new();
    for (slot, conn) in slots.iter().enumerate() {
        match conn {
            Some(c) if now - c.since > CONN_TIMEOUT => {
                let state = match c.state {
                    ConnState::Connecting => "connecting",
                    ConnState::Reading => "waiting for the answer",
                };
                stats.fail(format!("timed out {state} after {CONN_TIMEOUT:?}"));
                reopen.push(slot);
            }
            None => reopen.push(slot),
            _ => {}
        }
    }
    reopen
}

/// TIME_WAIT sockets of the calling thread's network namespace.
pub(super) fn count_time_wait() -> Result<usize> {
    // /proc/self/net would show the main thread's namespace.
    let text = fs::read_to_string("/proc/thread-self/net/tcp")?;
    Ok(text
        .lines()
        .skip(1)
        .filter(|l| l.split_whitespace().nth(3) == Some("06"))
        .count())
}
