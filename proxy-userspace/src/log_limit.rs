//! Logging a failure that repeats (a poll that fails five times a second,
//! a watch retrying with backoff) without flooding the log: a
//! [`LogLimiter`] says when to log, and how many times the failure was
//! seen; it logs nothing itself, so each caller keeps its own message and
//! fields.
//!
//! A failure is logged when it starts and whenever its message changes;
//! the same message again is only counted, and logged with its count after
//! the reminder interval, if there is one. When the failure clears, the
//! caller is told how many times it was seen, for one "recovered" line.

use std::time::{Duration, Instant};

/// How often a failure that goes on is logged again, where a reminder is
/// wanted.
pub const REMIND_EVERY: Duration = Duration::from_secs(300);

#[derive(Debug)]
pub struct LogLimiter {
    /// None: log a failure again only when its message changes.
    remind: Option<Duration>,
    current: Option<Failure>,
}

#[derive(Debug)]
struct Failure {
    message: String,
    seen: u64,
    logged_at: Instant,
}

impl LogLimiter {
    /// Logs again only when the message changes.
    pub fn on_change() -> LogLimiter {
        LogLimiter {
            remind: None,
            current: None,
        }
    }

    /// Also logs an unchanged failure again every `every`, with its count.
    pub fn reminding(every: Duration) -> LogLimiter {
        LogLimiter {
            remind: Some(every),
            current: None,
        }
    }

    /// The failure `message` happened: `Some(times seen)` if it is to be
    /// logged now.
    pub fn failed(&mut self, message: &str) -> Option<u64> {
        self.failed_at(message, Instant::now())
    }

    pub fn failed_at(&mut self, message: &str, now: Instant) -> Option<u64> {
        match &mut self.current {
            Some(f) if f.message == message => {
                f.seen += 1;
                let due = self
                    .remind
                    .is_some_and(|every| now.duration_since(f.logged_at) >= every);
                if !due {
                    return None;
                }
                f.logged_at = now;
                Some(f.seen)
            }
            _ => {
                self.current = Some(Failure {
                    message: message.to_string(),
                    seen: 1,
                    logged_at: now,
                });
                Some(1)
            }
        }
    }

    /// The operation succeeded: `Some(times the last failure was seen)` if
    /// it had been failing.
    pub fn succeeded(&mut self) -> Option<u64> {
        self.current.take().map(|f| f.seen)
    }

    pub fn is_failing(&self) -> bool {
        self.current.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_a_failure_once_then_when_it_changes() {
        let mut l = LogLimiter::on_change();
        let t = Instant::now();
        assert_eq!(l.failed_at("gone", t), Some(1));
        for i in 1..100 {
            assert_eq!(l.failed_at("gone", t + Duration::from_secs(i)), None);
        }
        assert_eq!(l.failed_at("denied", t), Some(1), "a new message");
        assert_eq!(l.failed_at("denied", t), None);
        assert_eq!(l.succeeded(), Some(2));
        assert_eq!(l.succeeded(), None, "already recovered");
        assert_eq!(l.failed_at("gone", t), Some(1), "failing again");
    }

    #[test]
    fn reminds_with_the_count() {
        let mut l = LogLimiter::reminding(Duration::from_secs(60));
        let t = Instant::now();
        assert_eq!(l.failed_at("e", t), Some(1));
        assert_eq!(l.failed_at("e", t + Duration::from_secs(30)), None);
        assert_eq!(l.failed_at("e", t + Duration::from_secs(60)), Some(3));
        assert_eq!(l.failed_at("e", t + Duration::from_secs(61)), None);
        assert_eq!(l.failed_at("e", t + Duration::from_secs(121)), Some(5));
        assert!(l.is_failing());
    }
}
