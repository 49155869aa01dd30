//! In-kernel cost of socket-level load balancing: the cgroup programs run
//! once per connect() (or per unconnected UDP datagram), instead of the TC
//! programs on every packet. BPF_PROG_TEST_RUN does not run cgroup sock_addr
//! programs, so real sockets do the calls and the kernel's own BPF
//! statistics (`run_time_ns` / `run_cnt` of each program, on while we hold
//! the BPF_ENABLE_STATS fd) give the time spent in the program per call.
//!
//! The programs are attached, unpinned, to a cgroup made for the run under
//! the cgroup v2 mount; this process moves into it for the run and back to
//! where it was afterwards. The sockets live in the benchmark's private
//! network namespace: the service's backends are loopback addresses.

use std::{
    fs,
    io::{self, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    thread,
};

use anyhow::{Context as _, Result, ensure};
use proxy_common::*;
use proxy_userspace::{
    datapath::{Datapath, sockets::cgroup2_mount},
    sync::{Desired, FrontendWant, Syncer, lbmap::BpfLbMaps},
};

/// Calls per figure.
const CALLS: u64 = 20_000;
const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 255, 1), 80);
const BACKEND_PORT: u16 = 18_080;
const BACKENDS: u8 = 10;
const SIZES: [usize; 2] = [10, 100_000];

/// A cgroup this run made, with this process in it; dropping moves the
/// process back and removes the cgroup.
struct BenchCgroup {
    path: PathBuf,
    original: PathBuf,
}

impl BenchCgroup {
    fn enter() -> Result<BenchCgroup> {
        let mount = cgroup2_mount().context("no cgroup v2 mount")?;
        let own = fs::read_to_string("/proc/self/cgroup")?;
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("no cgroup v2 line in /proc/self/cgroup")?;
        let original = mount.join(rel.trim_start_matches('/'));
        let path = mount.join(format!("kep-bench-{}", std::process::id()));
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        let group = BenchCgroup { path, original };
        move_process(&group.path)?;
        Ok(group)
    }
}

impl Drop for BenchCgroup {
    fn drop(&mut self) {
        if let Err(e) = move_process(&self.original) {
            eprintln!("kep-bench: {e:#}");
        }
        if let Err(e) = fs::remove_dir(&self.path) {
            eprintln!("kep-bench: removing {}: {e}", self.path.display());
        }
    }
}

fn move_process(to: &Path) -> Result<()> {
    fs::write(to.join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("moving kep-bench into {}", to.display()))
}

/// The measured service: VIP:80 over TCP and UDP, to loopback backends.
fn with_measured_service(mut d: Desired) -> Desired {
    for proto in [IPPROTO_TCP, IPPROTO_UDP] {
        let backends = (1..=BACKENDS)
            .map(|i| Backend {
                addr: [127, 0, 0, i],
                port: BACKEND_PORT.to_be_bytes(),
                proto,
                flags: BE_F_LOCAL,
            })
            .map(Into::into)
            .collect();
        let key = SvcKey {
            addr: VIP.ip().octets(),
            port: VIP.port().to_be_bytes(),
            proto,
            _pad: 0,
        };
        let name = format!("bench/socket-lb:{proto}");
        d.frontends.insert(
            key.into(),
            FrontendWant {
                name,
                flags: 0,
                backends,
                ..Default::default()
            },
        );
    }
    d
}

/// Servers for the backends: a listener that accepts and closes, and a UDP
/// socket that only receives. Both serve every 127.0.0.x.
fn start_servers() -> Result<UdpSocket> {
    let listener = TcpListener::bind(("0.0.0.0", BACKEND_PORT))?;
    thread::spawn(move || {
        for conn in listener.incoming() {
            drop(conn);
        }
    });
    Ok(UdpSocket::bind(("0.0.0.0", BACKEND_PORT))?)
}

/// ns per call of `program` while `work` runs, from the kernel's counters.
fn per_call(dp: &Datapath, program: &str, work: impl FnOnce() -> Result<()>) -> Result<f64> {
    let (count0, time0) = dp.socket_program_stats(program)?;
    work()?;
    let (count1, time1) = dp.socket_program_stats(program)?;
    let runs = count1 - count0;
    ensure!(
        runs >= CALLS,
        "{program} ran {runs} times for {CALLS} calls: not attached where the sockets are?"
    );
    Ok((time1 - time0).as_nanos() as f64 / runs as f64)
}

/// Connections that end with a reset (SO_LINGER 0), so no TIME_WAIT piles
/// up and ephemeral ports last.
fn tcp_connects() -> Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    for _ in 0..CALLS {
        let s = TcpStream::connect(VIP).context("connect through the socket programs")?;
        // SAFETY: a valid socket and a linger struct of the size passed.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
    }
    Ok(())
}

fn udp_sends() -> Result<()> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    for _ in 0..CALLS {
        match s.send_to(b"x", VIP) {
            Ok(_) => {}
            // The receiver's buffer fills up; the program ran all the same.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn getpeernames() -> Result<()> {
    let s = TcpStream::connect(VIP)?;
    for _ in 0..CALLS {
        ensure!(s.peer_addr()? == VIP.into(), "the peer is the service");
    }
    Ok(())
}

/// Prints the table: in-kernel ns per call of each socket program, with
/// `services` programmed.
pub(crate) fn figures(
    dp: &mut Datapath,
    syncer: &mut Syncer<BpfLbMaps>,
    desired: fn(usize) -> Desired,
) -> Result<()> {
    let group = BenchCgroup::enter()?;
    dp.attach_sockets_unpinned(&group.path)?;
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;
    let _udp = start_servers()?;
    println!();
    println!(
        "Socket-level load balancing: in-kernel ns per call ({CALLS} calls, run_time_ns/run_cnt)"
    );
    println!();
    println!(
        "| services | connect (connect4, once per connection) | unconnected UDP datagram (sendmsg4) | getpeername (getpeername4) |"
    );
    println!("|---:|---:|---:|---:|");
    for n in SIZES {
        let report = syncer.sync(&with_measured_service(desired(n)));
        ensure!(
            report.failed.is_empty(),
            "programming failed: {:?}",
            report.failed
        );
        let connect = per_call(dp, PROG_CONNECT4, tcp_connects)?;
        let sendmsg = per_call(dp, PROG_SENDMSG4, udp_sends)?;
        let peer = per_call(dp, PROG_GETPEERNAME4, getpeernames)?;
        println!("| {n} | {connect:.0} | {sendmsg:.0} | {peer:.0} |");
        io::stdout().flush()?;
    }
    println!();
    println!("A connection through the socket path costs its connect4 run once; its packets then");
    println!("pass the TC programs as non-service traffic (the table above's second column).");
    drop(group);
    Ok(())
}
