//! The keep-alive client: requests per second over connections that stay
//! open, as `wrk` measures them. One pinned thread keeps one request in
//! flight on each connection with nonblocking sockets and epoll.
//!
//! Through a ClusterIP the proxy picks each connection's backend, and the
//! mix of connections to the client's own node and to the other one
//! changes the rate as much as the proxy does. So the connections are
//! opened first, outside the measured time, until every backend holds the
//! same number of them (each answer names its backend; a connection that
//! lands on a full backend is closed and another opened): the same mix as
//! "direct to pod", which dials the backends in turn.
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};

use super::{
    BACKENDS, CONN_TIMEOUT,
    loadgen::{CrrStats, last_err},
    server::{RESPONSE_LEN, backend_of, epoll_add},
};

const KEEPALIVE_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";
/// Connections opened to balance the backends, per connection kept, before
/// giving up (a proxy that sends everything to one backend).
const BALANCE_ATTEMPTS: usize = 50;

/// Connections to `targets` (in turn) until each backend holds
/// `concurrency / backends` of them, rounded up.
fn open_balanced(targets: &[SocketAddrV4], concurrency: usize) -> Result<Vec<TcpStream>> {
    let per_backend = concurrency.div_ceil(BACKENDS.len());
    let mut held: Vec<Vec<TcpStream>> = BACKENDS.iter().map(|_| Vec::new()).collect();
    let limit = BALANCE_ATTEMPTS * per_backend * BACKENDS.len();
    for attempt in 0.. {
        if held.iter().all(|h| h.len() >= per_backend) {
            break;
        }
        let counts: Vec<usize> = held.iter().map(Vec::len).collect();
        ensure!(
            attempt < limit,
            "{limit} connections did not put {per_backend} on each backend (held {counts:?})"
        );
        let target = targets[attempt % targets.len()];
        let mut stream = TcpStream::connect_timeout(&target.into(), CONN_TIMEOUT)
            .with_context(|| format!("connecting to {target}"))?;
        stream.set_read_timeout(Some(CONN_TIMEOUT))?;
        stream.write_all(KEEPALIVE_REQUEST)?;
        let mut answer = [0u8; RESPONSE_LEN];
        stream
            .read_exact(&mut answer)
            .with_context(|| format!("first answer from {target}"))?;
        let backend = backend_of(&answer).context("an answer that names no backend")?;
        if let Some(h) = held.get_mut(backend)
            && h.len() < per_backend
        {
            h.push(stream);
        }
    }
    Ok(held.into_iter().flatten().collect())
}

/// One kept connection: bytes of the current answer read so far, and when
/// it last made progress.
struct Slot {
    stream: TcpStream,
    /// The epoll set the stream is in.
    ep: RawFd,
    got: usize,
    since: Instant,
    live: bool,
}

/// For `duration`, keeps one request in flight on each balanced connection
/// and counts the answers read whole. A connection that closes or stalls
/// counts as an error and is not replaced.
pub(super) fn keepalive_loop(
    targets: &[SocketAddrV4],
    concurrency: usize,
    duration: Duration,
) -> Result<CrrStats> {
    let streams = open_balanced(targets, concurrency)?;
    // SAFETY: epoll_create1 returns a new descriptor we then own.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    ensure!(ep >= 0, "{}", last_err("epoll_create1"));
    // SAFETY: ep is a fresh descriptor owned by nobody else.
    let ep_owned = unsafe { OwnedFd::from_raw_fd(ep) };
    let mut slots = Vec::with_capacity(streams.len());
    for (token, stream) in (0u64..).zip(streams) {
        stream.set_nonblocking(true)?;
        epoll_add(ep, stream.as_raw_fd(), token)?;
        slots.push(Slot {
            stream,
            ep,
            got: 0,
            since: Instant::now(),
            live: true,
        });
    }
    let mut stats = CrrStats::default();
    let start = Instant::now();
    let deadline = start + duration;
    for slot in &mut slots {
        send_request(slot, &mut stats);
    }
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; slots.len()];
    let mut last_sweep = start;
    while Instant::now() < deadline && slots.iter().any(|s| s.live) {
        let n = wait(ep, &mut events)?;
        for ev in &events[..n] {
            if let Some(slot) = slots.get_mut(ev.u64 as usize) {
                read_answers(slot, deadline, &mut stats);
            }
        }
        let now = Instant::now();
        if now - last_sweep > Duration::from_millis(100) {
            last_sweep = now;
            for slot in slots.iter_mut().filter(|s| s.live) {
                if now - slot.since > CONN_TIMEOUT {
                    fail(
                        slot,
                        &mut stats,
                        format!("no answer within {CONN_TIMEOUT:?}"),
                    );
                }
            }
        }
    }
    stats.elapsed = start.elapsed().min(duration).max(Duration::from_millis(1));
    drop(slots);
    drop(ep_owned);
    Ok(stats)
}

fn wait(ep: RawFd, events: &mut [libc::epoll_event]) -> Result<usize> {
    // SAFETY: epoll_wait writes at most `events.len()` events.
    let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, 50) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        ensure!(e.kind() == ErrorKind::Interrupted, "epoll_wait: {e}");
        return Ok(0);
    }
    Ok(n as usize)
}

fn send_request(slot: &mut Slot, stats: &mut CrrStats) {
    // A request is far smaller than a socket buffer, and the previous
    // answer was read whole, so the write completes at once.
    if let Err(e) = slot.stream.write_all(KEEPALIVE_REQUEST) {
        fail(slot, stats, format!("send: {e}"));
    }
}

/// Reads what arrived; each whole answer is counted (inside the window) and
/// followed by the next request.
fn read_answers(slot: &mut Slot, deadline: Instant, stats: &mut CrrStats) {
    let mut buf = [0u8; 512];
    while slot.live {
        match slot.stream.read(&mut buf) {
            Ok(0) => fail(slot, stats, "closed by the server".into()),
            Ok(n) => {
                slot.got += n;
                slot.since = Instant::now();
                if slot.got >= RESPONSE_LEN {
                    if slot.got > RESPONSE_LEN {
                        fail(slot, stats, format!("{} bytes for one answer", slot.got));
                        return;
                    }
                    slot.got = 0;
                    if Instant::now() < deadline {
                        stats.completed += 1;
                    }
                    send_request(slot, stats);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => fail(slot, stats, format!("read: {e}")),
        }
    }
}

/// Takes a connection out of the run: out of the epoll set (a closed
/// stream would report itself ready forever) and shut down.
fn fail(slot: &mut Slot, stats: &mut CrrStats, why: String) {
    slot.live = false;
    // SAFETY: removes a descriptor we own from a set we own.
    unsafe {
        libc::epoll_ctl(
            slot.ep,
            libc::EPOLL_CTL_DEL,
            slot.stream.as_raw_fd(),
            std::ptr::null_mut(),
        );
    }
    let _ = slot.stream.shutdown(std::net::Shutdown::Both);
    stats.fail(why);
}
