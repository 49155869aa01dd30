//! Polling with a deadline: the lab's answer to "eventually".

use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

const POLL: Duration = Duration::from_millis(50);

/// Polls `f` every 50 ms until it returns true; fails after `timeout` with
/// an error naming `what`. `f` is always tried at least once, and once more
/// at the deadline, so a slow poll does not eat the last chance.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    let deadline = start + timeout;
    loop {
        if f() {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            bail!("timed out after {:?} waiting for {what}", now - start);
        }
        thread::sleep(POLL.min(deadline - now));
    }
}
