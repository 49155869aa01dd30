//! The backend servers: one thread per backend pod, pinned to the servers'
//! CPU, serving every connection of its pod with nonblocking sockets and
//! epoll (no thread per connection).
//!
//! A request is read whole (up to its blank line) before it is answered:
//! closing with unread data would send a reset instead of a FIN. An
//! HTTP/1.0 request (the CRR client's) is answered and the connection
//! closed by the server, so TIME_WAIT stays on the servers; an HTTP/1.1
//! request (the keep-alive client's) is answered and the connection kept
//! for the next one. Every answer names the backend that gave it, so a
//! keep-alive client can tell where a connection through a ClusterIP
//! landed.
use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};

use anyhow::{Context as _, Result, ensure};
use lab::Netns;

use super::cpu::pin_to_cpu;

/// Every answer has this length; its body is the backend's index and a
/// newline.
pub(super) const RESPONSE_LEN: usize = ANSWER.len();
const ANSWER: &[u8; 40] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n?\n";
const REQUEST_END: &[u8] = b"\r\n\r\n";
/// The epoll token of the listening socket; connections count up from 1.
const LISTENER: u64 = 0;

/// The answer of backend `index` (0-9).
pub(super) const fn response(index: u8) -> [u8; RESPONSE_LEN] {
    let mut out = *ANSWER;
    out[RESPONSE_LEN - 2] = b'0' + index;
    out
}

/// The backend index an answer names.
pub(super) fn backend_of(answer: &[u8]) -> Option<usize> {
    let digit = *answer.get(RESPONSE_LEN - 2)?;
    digit.is_ascii_digit().then(|| usize::from(digit - b'0'))
}

pub(super) struct FastServer {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl FastServer {
    pub(super) fn start(
        ns: &Netns,
        at: SocketAddrV4,
        index: u8,
        cpu: Option<usize>,
    ) -> Result<FastServer> {
        let listener = ns
            .run(|| TcpListener::bind(at))
            .with_context(|| format!("listening on {at} in {}", ns.name()))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let (flag, count) = (Arc::clone(&stop), Arc::clone(&served));
        let thread = thread::Builder::new()
            .name(format!("crr-server-{at}"))
            .spawn(move || {
                if let Some(cpu) = cpu
                    && let Err(e) = pin_to_cpu(cpu)
                {
                    eprintln!("crr: server {at}: pinning to CPU {cpu}: {e}");
                }
                let served = Server::new(listener, index, &count).and_then(|mut s| s.run(&flag));
                if let Err(e) = served {
                    eprintln!("crr: server {at}: {e:#}");
                }
            })?;
        Ok(FastServer {
            stop,
            served,
            thread: Some(thread),
        })
    }

    pub(super) fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for FastServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A connection and the part of a request read so far.
struct Client {
    stream: TcpStream,
    pending: Vec<u8>,
}

struct Server<'a> {
    ep: OwnedFd,
    listener: TcpListener,
    clients: HashMap<u64, Client>,
    next_token: u64,
    answer: [u8; RESPONSE_LEN],
    served: &'a AtomicU64,
}

impl<'a> Server<'a> {
    fn new(listener: TcpListener, index: u8, served: &'a AtomicU64) -> Result<Server<'a>> {
        // SAFETY: epoll_create1 returns a new descriptor we then own.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        ensure!(ep >= 0, "epoll_create1: {}", io::Error::last_os_error());
        // SAFETY: ep is a fresh descriptor owned by nobody else.
        let ep = unsafe { OwnedFd::from_raw_fd(ep) };
        epoll_add(ep.as_raw_fd(), listener.as_raw_fd(), LISTENER)?;
        Ok(Server {
            ep,
            listener,
            clients: HashMap::new(),
            next_token: LISTENER + 1,
            answer: response(index),
            served,
        })
    }

    /// Serves until `stop` is set (seen within 100 ms).
    fn run(&mut self, stop: &AtomicBool) -> Result<()> {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 64];
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: epoll_wait writes at most `events.len()` events.
            let n = unsafe {
                libc::epoll_wait(
                    self.ep.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    100,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                ensure!(e.kind() == ErrorKind::Interrupted, "epoll_wait: {e}");
                continue;
            }
            for ev in &events[..n as usize] {
                match ev.u64 {
                    LISTENER => self.accept_all()?,
                    token => self.serve(token),
                }
            }
        }
        Ok(())
    }

    fn accept_all(&mut self) -> Result<()> {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                // A connection reset while queued, or a signal: next one.
                Err(_) => continue,
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let token = self.next_token;
            self.next_token += 1;
            epoll_add(self.ep.as_raw_fd(), stream.as_raw_fd(), token)?;
            let pending = Vec::with_capacity(64);
            self.clients.insert(token, Client { stream, pending });
        }
    }

    /// Reads what a connection sent and answers every complete request;
    /// drops the connection (closing it) at EOF, on an error, or after
    /// answering an HTTP/1.0 request.
    fn serve(&mut self, token: u64) {
        let Some(client) = self.clients.get_mut(&token) else {
            return;
        };
        if !read_and_answer(client, &self.answer, self.served) {
            // Dropping the stream closes it, which also leaves the epoll set.
            self.clients.remove(&token);
        }
    }
}

/// True while the connection stays open.
fn read_and_answer(client: &mut Client, answer: &[u8], served: &AtomicU64) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match client.stream.read(&mut buf) {
            Ok(0) => return false,
            Ok(n) => client.pending.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
    while let Some(end) = find(&client.pending, REQUEST_END) {
        let keep_alive = !client.pending[..end].windows(8).any(|w| w == b"HTTP/1.0");
        client.pending.drain(..end + REQUEST_END.len());
        // An answer is far smaller than a socket buffer: a nonblocking
        // write of it completes or the connection is broken.
        if client.stream.write_all(answer).is_err() {
            return false;
        }
        served.fetch_add(1, Ordering::Relaxed);
        if !keep_alive {
            return false;
        }
    }
    // A client sending junk without a blank line is cut off.
    client.pending.len() <= 4096
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

pub(super) fn epoll_add(ep: RawFd, fd: RawFd, token: u64) -> Result<()> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: token,
    };
    // SAFETY: both descriptors are open; the event outlives the call.
    let rc = unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) };
    ensure!(rc == 0, "epoll_ctl add: {}", io::Error::last_os_error());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_name_their_backend_and_have_one_length() {
        assert_eq!(backend_of(&response(0)), Some(0));
        assert_eq!(backend_of(&response(2)), Some(2));
        assert_eq!(response(7).len(), RESPONSE_LEN);
        assert!(response(1).ends_with(b"\r\n\r\n1\n"));
        assert_eq!(backend_of(b"short"), None);
    }
}
