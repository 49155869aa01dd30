//! Handles on named network namespaces (the `ip netns` kind, bind-mounted
//! under /run/netns), and ways to run code and commands inside them.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, mpsc};
use std::{io, panic, thread};

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, setns};

/// Where `ip netns` keeps its namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// A named network namespace. A plain handle: the [`crate::Lab`] that made it
/// deletes it; a clone kept past that point refers to nothing.
#[derive(Debug, Clone)]
pub struct Netns {
    name: String,
    path: PathBuf,
    /// The lab node's cgroup that threads and processes entering this
    /// namespace join too (see [`crate::cgroup`]).
    cgroup: Option<PathBuf>,
}

impl Netns {
    /// Creates a namespace with `ip netns add`, which also takes care of
    /// making /run/netns a shared mount so other tools see it.
    pub(crate) fn create(name: &str) -> Result<Netns> {
        // The first `ip netns add` on a machine turns /run/netns into a
        // mount point; two of them racing can stack two such mounts and hide
        // namespaces. Serializing covers the common case, parallel tests in
        // one process (creation is a few ms, so this costs little).
        static CREATE: Mutex<()> = Mutex::new(());
        let _serial = CREATE
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        run_checked(Command::new("ip").args(["netns", "add", name]))?;
        Ok(Netns {
            name: name.to_string(),
            path: Path::new(NETNS_DIR).join(name),
            cgroup: None,
        })
    }

    /// Threads and processes that enter this namespace join `group` too.
    pub(crate) fn with_cgroup(mut self, group: Option<&Path>) -> Netns {
        self.cgroup = group.map(Path::to_path_buf);
        self
    }

    /// The cgroup its threads and processes join, if the lab made one.
    pub fn cgroup(&self) -> Option<&Path> {
        self.cgroup.as_deref()
    }

    /// The namespace's name under /run/netns (the one `ip -n` takes).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mounted namespace file, e.g. for `nsenter --net=`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn open(&self) -> Result<File> {
        File::open(&self.path).with_context(|| format!("opening netns {}", self.path.display()))
    }

    /// Runs `f` on a fresh thread that has entered this namespace and returns
    /// its result (a panic in `f` is re-raised here). Sockets created in `f`
    /// belong to this namespace for their whole life, so they can be returned
    /// and used from any thread. Only the network namespace changes: the mount
    /// namespace is shared, so /sys still shows the root namespace's devices.
    /// The thread also joins the namespace's node cgroup, so its sockets are
    /// that node's (socket-level load balancing sees them).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = self.open().unwrap_or_else(|e| panic!("{e:#}"));
        thread::scope(|s| {
            let worker = s.spawn(move || {
                self.enter(file);
                f()
            });
            worker.join().unwrap_or_else(|p| panic::resume_unwind(p))
        })
    }

    /// Moves the calling thread into this namespace (`file`, opened) and
    /// its node cgroup.
    fn enter(&self, file: File) {
        setns(&file, CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns into netns {}: {e}", self.name));
        drop(file);
        if let Some(group) = &self.cgroup {
            crate::cgroup::join(group).unwrap_or_else(|e| panic!("{e:#}"));
        }
    }

    /// A thread that enters this namespace once and then runs the jobs it
    /// is handed ([`NsThread::run`]), for loops that would otherwise start
    /// a thread per call with [`Netns::run`]: tens of thousands of them in
    /// a test (a lab run once hung for good joining one of them).
    pub fn thread(&self) -> NsThread {
        let file = self.open().unwrap_or_else(|e| panic!("{e:#}"));
        let ns = self.clone();
        let (jobs, received) = mpsc::channel::<Job>();
        let thread = thread::spawn(move || {
            ns.enter(file);
            for job in received {
                job();
            }
        });
        NsThread {
            jobs: Some(jobs),
            thread: Some(thread),
        }
    }

    /// A `Command` whose process enters this namespace between fork and exec.
    /// Unlike `ip netns exec` it keeps the caller's mount namespace, so bpffs
    /// mounts and pins made by the child are visible to everyone. The child
    /// joins the namespace's node cgroup, as [`Netns::run`] threads do.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        let file = self.open()?;
        let threads = match &self.cgroup {
            Some(group) => Some(
                OpenOptions::new()
                    .write(true)
                    .open(group.join("cgroup.threads"))
                    .with_context(|| format!("opening cgroup {}", group.display()))?,
            ),
            None => None,
        };
        let mut cmd = Command::new(program);
        // SAFETY: the closure only calls setns(2) and write(2), which are
        // async-signal-safe, and builds an io::Error from errno without
        // allocating.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // "0" moves the writing thread: the child's only one.
                if let Some(threads) = &threads
                    && libc::write(threads.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }

    /// Runs a command inside this namespace and waits for it. A non-zero exit
    /// is an error that carries the command's stderr.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output> {
        let mut cmd = self.command(program)?;
        cmd.args(args);
        run_checked(&mut cmd).with_context(|| format!("in netns {}", self.name))
    }

    /// Runs `ip <args>` inside this namespace; returns its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let out = self.exec("ip", args)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Reads a sysctl of this namespace, e.g. `net.ipv4.ip_forward`.
    pub fn sysctl(&self, key: &str) -> Result<String> {
        let path = sysctl_path(key);
        self.run(|| std::fs::read_to_string(&path))
            .with_context(|| format!("reading {key} in netns {}", self.name))
            .map(|v| v.trim().to_string())
    }

    /// Writes a sysctl of this namespace. /proc/sys/net resolves against the
    /// network namespace of the calling thread, hence the detour via `run`.
    pub fn set_sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = sysctl_path(key);
        self.run(|| std::fs::write(&path, value))
            .with_context(|| format!("setting {key}={value} in netns {}", self.name))
    }
}

/// Deletes a namespace by name. Interfaces inside it go away once the last
/// process or socket using it is gone.
pub(crate) fn delete(name: &str) -> Result<()> {
    run_checked(Command::new("ip").args(["netns", "delete", name]))?;
    Ok(())
}

/// Dotted sysctl name to /proc/sys path. Interface names in keys must not
/// contain dots (the lab never makes such names).
fn sysctl_path(key: &str) -> PathBuf {
    Path::new("/proc/sys").join(key.replace('.', "/"))
}

/// Runs a command to completion; a failure to start or a non-zero exit is an
/// error that shows the command line and its stderr.
pub(crate) fn run_checked(cmd: &mut Command) -> Result<Output> {
    let line = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {line}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        bail!(
            "{line} failed ({}); stderr: {:?}; stdout: {:?}",
            out.status,
            stderr.trim(),
            stdout.trim()
        );
    }
    Ok(out)
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread that stays in one namespace (see [`Netns::thread`]); it ends
/// when dropped.
pub struct NsThread {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl NsThread {
    /// Runs `f` on the thread, in its namespace, and returns its result (a
    /// panic in `f` is re-raised here).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (done, result) = mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let _ = done.send(panic::catch_unwind(panic::AssertUnwindSafe(f)));
        });
        let sent = self.jobs.as_ref().map(|jobs| jobs.send(job));
        assert!(
            matches!(sent, Some(Ok(()))),
            "the namespace thread has ended"
        );
        match result.recv().expect("the namespace thread has ended") {
            Ok(value) => value,
            Err(p) => panic::resume_unwind(p),
        }
    }
}

impl Drop for NsThread {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
