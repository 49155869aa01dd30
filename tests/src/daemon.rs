//! Long-running programs (the proxy under test) started inside a namespace,
//! with their output captured in a log file.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::netns::Netns;

const POLL: Duration = Duration::from_millis(20);

pub(crate) struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts `program` in `ns`, appending stdout and stderr to `log` (so a
    /// restarted daemon's log still shows the earlier run).
    pub(crate) fn start(
        ns: &Netns,
        program: &Path,
        args: impl IntoIterator<Item = impl AsRef<OsStr>>,
        env: &[(&str, &OsStr)],
        log: &Path,
    ) -> Result<Daemon> {
        let mut out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = ns.command(program)?;
        cmd.args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(err));
        writeln!(
            out,
            "==== lab: starting {cmd:?} in netns {} ====",
            ns.name()
        )?;
        let parent = std::process::id();
        // SAFETY: prctl(2) and getppid(2) are async-signal-safe.
        unsafe {
            // If the test process dies without running Drop (SIGKILL, abort),
            // its daemons must not outlive it. Note the kernel ties this to
            // the *thread* that spawned the child: start daemons from the
            // thread that owns the lab.
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect.
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::other("parent exited"));
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(Daemon {
            child,
            log: log.to_path_buf(),
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the daemon has exited (it is reaped then).
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn signal(&mut self, signal: Signal) {
        // Only signal while the child is unreaped: after reaping, its pid
        // may already belong to another process.
        if self.exited().is_none() {
            let _ = kill(Pid::from_raw(self.pid() as i32), signal);
        }
    }

    fn wait_until(&mut self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(POLL);
        }
    }

    fn kill_and_reap(&mut self) -> ExitStatus {
        let _ = self.child.kill();
        self.child
            .wait()
            .unwrap_or_else(|_| ExitStatus::from_raw(libc::SIGKILL))
    }

    /// Sends `signal` and waits up to `grace` for the daemon to exit. A daemon
    /// that does not exit in time is killed, and that is an error.
    pub(crate) fn stop(mut self, signal: Signal, grace: Duration) -> Result<ExitStatus> {
        self.signal(signal);
        if let Some(status) = self.wait_until(Instant::now() + grace) {
            return Ok(status);
        }
        self.kill_and_reap();
        bail!(
            "daemon (pid {}) did not exit within {grace:?} after {signal}; killed it. Log tail:\n{}",
            self.pid(),
            log_tail(&self.log, 20)
        )
    }
}

/// Stops daemons concurrently: SIGTERM to all, then SIGKILL to whoever has
/// not exited after `grace`, so the total wait is bounded by `grace`.
pub(crate) fn stop_all(mut daemons: Vec<Daemon>, grace: Duration) {
    for daemon in &mut daemons {
        daemon.signal(Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    for daemon in &mut daemons {
        if daemon.wait_until(deadline).is_none() {
            daemon.kill_and_reap();
        }
    }
}

/// The whole log; empty if there is none yet.
pub(crate) fn read_log(log: &Path) -> String {
    std::fs::read(log)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

/// The last `lines` lines of a log, for error messages.
pub(crate) fn log_tail(log: &Path, lines: usize) -> String {
    let text = read_log(log);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
