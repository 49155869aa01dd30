//! Echo-style servers and clients that report addresses, so tests can see
//! which backend answered and what source address it saw (SNAT or not).
//!
//! Protocol: the client sends a line, the server answers every line (TCP) or
//! datagram (UDP) with `"<identity> <peer_ip>:<peer_port>"` (plus `\n` on
//! TCP), where the peer is the client as the server sees it. Everything has a
//! timeout so a broken datapath fails a test instead of hanging it.
//!
//! Servers, clients and replies work for either family: their address type
//! ([`LabAddr`]: `SocketAddrV4`, the default, or `SocketAddrV6`) is the one
//! of the address given.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{
    Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream, UdpSocket,
};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::netns::{Netns, NsThread};

/// Timeout for connecting and for waiting for a reply.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often server threads look at their stop flag; bounds how long
/// dropping a server takes.
const STOP_POLL: Duration = Duration::from_millis(100);
const REQUEST: &[u8] = b"ping\n";

/// A socket address of one family: `SocketAddrV4` or `SocketAddrV6`.
pub trait LabAddr:
    Copy + std::fmt::Debug + std::fmt::Display + Eq + Into<SocketAddr> + Send + Sync + 'static
{
    /// The address if it is of this family.
    fn of(addr: SocketAddr) -> io::Result<Self>;
    /// The wildcard address of this family, port 0.
    fn unspecified() -> Self;
}

impl LabAddr for SocketAddrV4 {
    fn of(addr: SocketAddr) -> io::Result<Self> {
        match addr {
            SocketAddr::V4(a) => Ok(a),
            SocketAddr::V6(a) => Err(io::Error::other(format!("{a} is not IPv4"))),
        }
    }

    fn unspecified() -> Self {
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)
    }
}

impl LabAddr for SocketAddrV6 {
    fn of(addr: SocketAddr) -> io::Result<Self> {
        match addr {
            SocketAddr::V6(a) => Ok(a),
            SocketAddr::V4(a) => Err(io::Error::other(format!("{a} is not IPv6"))),
        }
    }

    fn unspecified() -> Self {
        SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 0, 0, 0)
    }
}

/// One answer, with the addresses of both ends as each side saw them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply<A = SocketAddrV4> {
    /// Identity of the server that answered.
    pub identity: String,
    /// The client's address as the server saw it.
    pub seen_peer: A,
    /// The client's own socket address.
    pub local: A,
    /// Where the answer came from as the client sees it: for a correctly
    /// translated service, the address the client dialed.
    pub remote: A,
}

fn reply_text(identity: &str, peer: SocketAddr) -> String {
    format!("{identity} {peer}")
}

fn parse_reply<A: LabAddr>(text: &str, local: A, remote: A) -> Result<Reply<A>> {
    let (identity, peer) = text
        .trim_end_matches('\n')
        .rsplit_once(' ')
        .ok_or_else(|| anyhow!("malformed reply {text:?}"))?;
    let peer: SocketAddr = peer
        .parse()
        .with_context(|| format!("malformed reply {text:?}"))?;
    Ok(Reply {
        identity: identity.to_string(),
        seen_peer: A::of(peer).with_context(|| format!("reply {text:?}"))?,
        local,
        remote,
    })
}

/// The `io::ErrorKind` behind a client error, e.g. to assert
/// `Some(ErrorKind::ConnectionRefused)`. Timeouts are `ErrorKind::TimedOut`.
pub fn error_kind(err: &anyhow::Error) -> Option<ErrorKind> {
    err.chain()
        .find_map(|e| e.downcast_ref::<io::Error>())
        .map(io::Error::kind)
}

/// A stop flag plus the thread watching it; dropping stops and joins.
struct Worker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    fn spawn(f: impl FnOnce(&AtomicBool) + Send + 'static) -> Worker {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::spawn(move || f(&flag));
        Worker {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A TCP server in a namespace; stops (within ~0.1 s) when dropped.
pub struct TcpServer<A = SocketAddrV4> {
    addr: A,
    accepted: Arc<AtomicUsize>,
    _worker: Worker,
}

impl<A: LabAddr> TcpServer<A> {
    /// Listens on `addr` (port 0 picks one, see [`TcpServer::addr`]) inside
    /// `ns`.
    pub fn start(ns: &Netns, addr: A, identity: &str) -> Result<TcpServer<A>> {
        let listener = ns
            .run(|| TcpListener::bind(addr.into()))
            .with_context(|| format!("tcp listen on {addr} in netns {}", ns.name()))?;
        let addr = A::of(listener.local_addr()?)?;
        // Nonblocking so that accept after a wake-up never blocks (the
        // connection may be gone by then) and the stop flag stays responsive.
        listener.set_nonblocking(true)?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        let identity = identity.to_string();
        let worker = Worker::spawn(move |stop| accept_loop(listener, &identity, &counter, stop));
        Ok(TcpServer {
            addr,
            accepted,
            _worker: worker,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> A {
        self.addr
    }

    /// How many connections it has accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

fn accept_loop(listener: TcpListener, identity: &str, accepted: &AtomicUsize, stop: &AtomicBool) {
    thread::scope(|s| {
        while !stop.load(Ordering::Relaxed) {
            if !wait_readable(&listener, STOP_POLL) {
                continue;
            }
            match listener.accept() {
                Ok((stream, peer)) => {
                    accepted.fetch_add(1, Ordering::Relaxed);
                    s.spawn(move || serve_connection(stream, peer, identity, stop));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => {
                    eprintln!("lab: tcp server {identity}: accept: {e}");
                    thread::sleep(STOP_POLL);
                }
            }
        }
    });
}

/// poll(2) for readability, so the accept loop sleeps without adding latency.
fn wait_readable(fd: &impl AsRawFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
    n > 0
}

fn serve_connection(mut stream: TcpStream, peer: SocketAddr, identity: &str, stop: &AtomicBool) {
    let reply = format!("{}\n", reply_text(identity, peer));
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(STOP_POLL)))
        .and_then(|()| stream.set_write_timeout(Some(DEFAULT_TIMEOUT)));
    if setup.is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                for _ in buf[..n].iter().filter(|&&b| b == b'\n') {
                    if stream.write_all(reply.as_bytes()).is_err() {
                        return;
                    }
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
}

/// A UDP server in a namespace; stops (within ~0.1 s) when dropped.
pub struct UdpServer<A = SocketAddrV4> {
    addr: A,
    received: Arc<AtomicUsize>,
    _worker: Worker,
}

impl<A: LabAddr> UdpServer<A> {
    /// Binds `addr` (port 0 picks one) inside `ns`.
    pub fn start(ns: &Netns, addr: A, identity: &str) -> Result<UdpServer<A>> {
        let socket = ns
            .run(|| UdpSocket::bind(addr.into()))
            .with_context(|| format!("udp bind {addr} in netns {}", ns.name()))?;
        let addr = A::of(socket.local_addr()?)?;
        socket.set_read_timeout(Some(STOP_POLL))?;
        let received = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&received);
        let identity = identity.to_string();
        let worker = Worker::spawn(move |stop| {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                    counter.fetch_add(1, Ordering::Relaxed);
                    let _ = socket.send_to(reply_text(&identity, peer).as_bytes(), peer);
                }
            }
        });
        Ok(UdpServer {
            addr,
            received,
            _worker: worker,
        })
    }

    /// The address it is bound to.
    pub fn addr(&self) -> A {
        self.addr
    }

    /// How many datagrams it has received so far.
    pub fn received(&self) -> usize {
        self.received.load(Ordering::Relaxed)
    }
}

/// A client TCP connection that can carry many requests, e.g. to check that
/// an established flow keeps its backend.
pub struct TcpConn<A = SocketAddrV4> {
    stream: TcpStream,
    timeout: Duration,
    local: A,
    remote: A,
    /// Bytes after the last newline read, kept for the next request.
    pending: Vec<u8>,
}

impl<A: LabAddr> TcpConn<A> {
    /// Connects from `ns` to `target` with [`DEFAULT_TIMEOUT`].
    pub fn open(ns: &Netns, target: A) -> Result<TcpConn<A>> {
        TcpConn::open_timeout(ns, target, DEFAULT_TIMEOUT)
    }

    /// Connects from `ns` to `target`; `timeout` applies to the connect and
    /// to every later reply.
    pub fn open_timeout(ns: &Netns, target: A, timeout: Duration) -> Result<TcpConn<A>> {
        let context = || format!("tcp connect from netns {} to {target}", ns.name());
        let stream = ns
            .run(|| TcpStream::connect_timeout(&target.into(), timeout))
            .with_context(context)?;
        TcpConn::of_stream(stream, timeout)
    }

    /// Connects from the calling thread's namespace (a [`crate::NsThread`]
    /// job's) to `target`; `timeout` as for [`TcpConn::open_timeout`].
    pub fn open_here(target: A, timeout: Duration) -> Result<TcpConn<A>> {
        let stream = TcpStream::connect_timeout(&target.into(), timeout)
            .with_context(|| format!("tcp connect to {target}"))?;
        TcpConn::of_stream(stream, timeout)
    }

    fn of_stream(stream: TcpStream, timeout: Duration) -> Result<TcpConn<A>> {
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(TcpConn {
            local: A::of(stream.local_addr()?)?,
            remote: A::of(stream.peer_addr()?)?,
            stream,
            timeout,
            pending: Vec::new(),
        })
    }

    /// Sends one line and reads the one-line answer.
    pub fn request(&mut self) -> Result<Reply<A>> {
        let (local, remote) = (self.local, self.remote);
        let context = || format!("tcp request {local} -> {remote}");
        self.stream.write_all(REQUEST).with_context(context)?;
        let line = self.read_line().with_context(context)?;
        parse_reply(&line, self.local, self.remote)
    }

    fn read_line(&mut self) -> io::Result<String> {
        let deadline = Instant::now() + self.timeout;
        let mut buf = [0u8; 4096];
        loop {
            if let Some(pos) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=pos).collect();
                return Ok(String::from_utf8_lossy(&line).into_owned());
            }
            if Instant::now() >= deadline {
                return Err(timed_out(self.timeout));
            }
            match self.stream.read(&mut buf) {
                Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                // A socket read timeout shows up as EAGAIN (WouldBlock).
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Err(timed_out(self.timeout)),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The peer as `getpeername()` reports it now (with socket-level load
    /// balancing, the socket programs answer it at every call).
    pub fn peer_now(&self) -> Result<A> {
        A::of(self.stream.peer_addr()?).context("getpeername")
    }

    /// The client's own address.
    pub fn local(&self) -> A {
        self.local
    }

    /// The address the client is connected to, as it sees it.
    pub fn remote(&self) -> A {
        self.remote
    }

    /// The underlying socket, e.g. to shut it down half-way.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

fn timed_out(after: Duration) -> io::Error {
    io::Error::new(ErrorKind::TimedOut, format!("no reply within {after:?}"))
}

/// One request on a fresh TCP connection from `ns` to `target`. A refused
/// connection is an error with [`error_kind`] `ConnectionRefused`.
pub fn tcp_request<A: LabAddr>(ns: &Netns, target: A) -> Result<Reply<A>> {
    tcp_request_timeout(ns, target, DEFAULT_TIMEOUT)
}

/// One request on a fresh TCP connection that `client`, a thread staying
/// in its namespace, opens to `target`: for load loops, which would start
/// a thread per connection with [`tcp_request_timeout`].
pub fn tcp_request_on<A: LabAddr>(
    client: &NsThread,
    target: A,
    timeout: Duration,
) -> Result<Reply<A>> {
    client.run(move || TcpConn::open_here(target, timeout)?.request())
}

/// [`tcp_request`] with a custom timeout, e.g. a short one when the
/// expected outcome is no answer at all.
pub fn tcp_request_timeout<A: LabAddr>(
    ns: &Netns,
    target: A,
    timeout: Duration,
) -> Result<Reply<A>> {
    TcpConn::open_timeout(ns, target, timeout)?.request()
}

/// One UDP request from `ns` to `target` with [`DEFAULT_TIMEOUT`].
///
/// The socket is unconnected, so the reply is accepted from any source and
/// `Reply::remote` is where it really came from (a proxy that forgets the
/// reverse translation shows up as the backend's address). The flip side:
/// ICMP port unreachable is not reported, so "nobody listens" is a timeout.
pub fn udp_request<A: LabAddr>(ns: &Netns, target: A) -> Result<Reply<A>> {
    udp_request_timeout(ns, target, DEFAULT_TIMEOUT)
}

/// [`udp_request`] with a custom timeout.
pub fn udp_request_timeout<A: LabAddr>(
    ns: &Netns,
    target: A,
    timeout: Duration,
) -> Result<Reply<A>> {
    let context = || format!("udp request from netns {} to {target}", ns.name());
    let socket = ns.run(|| bind_udp_source(target)).with_context(context)?;
    let local = A::of(socket.local_addr()?)?;
    socket.set_read_timeout(Some(timeout))?;
    socket
        .send_to(REQUEST, target.into())
        .with_context(context)?;
    let mut buf = [0u8; 2048];
    let (n, from) = match socket.recv_from(&mut buf) {
        Ok(got) => got,
        Err(e) if e.kind() == ErrorKind::WouldBlock => {
            return Err(timed_out(timeout)).with_context(context);
        }
        Err(e) => return Err(e).with_context(context),
    };
    let text = String::from_utf8_lossy(&buf[..n]);
    parse_reply(&text, local, A::of(from)?)
}

/// Binds to the source address the routing table picks for `target`, so the
/// reply's `local` is a real address rather than 0.0.0.0.
fn bind_udp_source<A: LabAddr>(target: A) -> io::Result<UdpSocket> {
    let probe = UdpSocket::bind(A::unspecified().into())?;
    probe.connect(target.into())?;
    let mut source = probe.local_addr()?;
    source.set_port(0);
    UdpSocket::bind(source)
}

/// Fails unless `result` is an error of the given kind; for asserting e.g.
/// "connection refused" with a readable message.
pub fn expect_error_kind<T: std::fmt::Debug>(result: Result<T>, kind: ErrorKind) -> Result<()> {
    match result {
        Ok(v) => bail!("expected {kind:?}, got success: {v:?}"),
        Err(e) if error_kind(&e) == Some(kind) => Ok(()),
        Err(e) => bail!("expected {kind:?}, got: {e:#}"),
    }
}
