//! Wakes the daemon when a manifest directory changes (inotify), so a new
//! or edited file is read at once instead of at the next poll.
//!
//! Why inotify directly (through nix, already a dependency) rather than the
//! `notify` crate: one directory, Linux only, and the daemon's loop is a
//! single tokio task; a readable file descriptor in that loop is all that
//! is needed, where `notify` brings a thread, a channel and its own
//! debouncing. Which files changed is not taken from the events: a wake-up
//! makes [`ManifestDir`](super::manifests::ManifestDir) compare the files'
//! stamps, so a missed or coalesced event (queue overflow) costs nothing
//! but the wait for the next one or for the safety poll.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd, RawFd},
    path::Path,
};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::{Interest, unix::AsyncFd};

/// An inotify watch on one directory.
pub struct DirWatch {
    fd: AsyncFd<Raw>,
    /// The directory itself went (deleted, moved): the watch is void.
    gone: bool,
}

/// [`Inotify`] as tokio wants it.
struct Raw(Inotify);

impl AsRawFd for Raw {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl DirWatch {
    /// Watches `dir` for files written (closed after writing), created,
    /// renamed in or out, deleted or touched. Partial writes are not
    /// events: a file is read once its writer closes it, or when it is
    /// renamed into place as editors and `kubectl`-like tools do.
    pub fn new(dir: &Path) -> io::Result<DirWatch> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        inotify.add_watch(
            dir,
            AddWatchFlags::IN_CLOSE_WRITE
                | AddWatchFlags::IN_CREATE
                | AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_MOVED_FROM
                | AddWatchFlags::IN_DELETE
                | AddWatchFlags::IN_ATTRIB
                | AddWatchFlags::IN_DELETE_SELF
                | AddWatchFlags::IN_MOVE_SELF,
        )?;
        // SAFETY: Raw owns the inotify descriptor and gives that same one
        // until the AsyncFd (its only owner) drops it.
        let fd = unsafe { AsyncFd::register_with_interest(Raw(inotify), Interest::READABLE) }?;
        Ok(DirWatch { fd, gone: false })
    }

    /// The directory was deleted or moved: make a new watch.
    pub fn is_void(&self) -> bool {
        self.gone
    }

    /// Resolves when something in the directory changed, with every event
    /// queued so far consumed. Cancel-safe.
    pub async fn changed(&mut self) -> io::Result<()> {
        loop {
            let mut ready = self.fd.readable().await?;
            match ready.try_io(|fd| fd.get_ref().0.read_events().map_err(io::Error::from)) {
                Ok(Ok(events)) if !events.is_empty() => {
                    let void = AddWatchFlags::IN_IGNORED
                        | AddWatchFlags::IN_DELETE_SELF
                        | AddWatchFlags::IN_MOVE_SELF;
                    self.gone |= events.iter().any(|e| e.mask.intersects(void));
                    return Ok(());
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
                // Not readable after all: readiness cleared, wait again.
                Err(_would_block) => {}
            }
        }
    }
}
