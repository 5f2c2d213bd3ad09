//! Time: a monotonic clock in nanoseconds, cheap to keep in an atomic
//! (the timestamps several threads stamp on a connection and the
//! reactor's sweep compares), and the deadline one call carries through
//! all its waits.

use std::time::{Duration, Instant};

use crate::error::TimeoutKind;

/// Nanoseconds since the first reading in this process.
pub(crate) fn now_nanos() -> u64 {
    nanos_at(Instant::now())
}

/// `at` on the [`now_nanos`] clock: a step that needs both a deadline (an
/// `Instant`) and a timestamp reads the clock once. (A reading costs tens
/// of nanoseconds on a virtual machine; a request used to take twenty.)
pub(crate) fn nanos_at(at: Instant) -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    at.saturating_duration_since(*EPOCH.get_or_init(Instant::now))
        .as_nanos() as u64
}

/// `start` plus `d`, saturating: a configured duration meant as "for
/// ever" (`Duration::MAX`) is too long to add to the clock, and lands a
/// century on instead (or at `start`, on a clock that cannot reach that).
pub(crate) fn instant_after(start: Instant, d: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    start
        .checked_add(d)
        .or_else(|| start.checked_add(CENTURY))
        .unwrap_or(start)
}

/// Whether a call with `timeout` has no time at all: it fails at once,
/// before it sends anything (where a deadline is taken from one clock
/// reading at the call's start, a zero timeout would otherwise pass only
/// after the request went out).
pub(crate) fn no_time_left(timeout: Option<Duration>) -> bool {
    timeout.is_some_and(|t| t.is_zero())
}

/// The deadline of one call, covering every wait in it (a dial, room in
/// the queue, the write), and the timeout it fails with when it passes:
/// [`TimeoutKind::Request`] for a request, [`TimeoutKind::Write`] for a
/// send.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallDeadline {
    pub(crate) at: Instant,
    pub(crate) kind: TimeoutKind,
}

impl CallDeadline {
    /// The deadline `timeout` from now, if there is one (a timeout too long
    /// to add to the clock is none).
    pub(crate) fn after(timeout: Option<Duration>, kind: TimeoutKind) -> Option<CallDeadline> {
        Self::after_from(Instant::now(), timeout, kind)
    }

    /// The deadline `timeout` after `start`, a clock reading the call took
    /// already; as [`after`](Self::after).
    pub(crate) fn after_from(
        start: Instant,
        timeout: Option<Duration>,
        kind: TimeoutKind,
    ) -> Option<CallDeadline> {
        let at = start.checked_add(timeout?)?;
        Some(CallDeadline { at, kind })
    }

    pub(crate) fn passed(&self) -> bool {
        Instant::now() >= self.at
    }
}

/// A call's deadline, read from the clock only once the call has to wait
/// for a connection (a dial, its own or another call's): a send that
/// finds an open connection takes no clock reading for it, and its queue
/// starts the send timeout at its own first wait, if any.
#[derive(Debug, Clone, Copy)]
pub(crate) enum LazyDeadline {
    /// `timeout` from the first time it is asked for.
    Unread {
        timeout: Option<Duration>,
        kind: TimeoutKind,
    },
    /// Fixed: by the call, or at its first wait.
    Read(Option<CallDeadline>),
}

impl LazyDeadline {
    /// The deadline, fixing it now if it was not yet.
    pub(crate) fn get(&mut self) -> Option<CallDeadline> {
        if let LazyDeadline::Unread { timeout, kind } = *self {
            *self = LazyDeadline::Read(CallDeadline::after(timeout, kind));
        }
        match *self {
            LazyDeadline::Read(d) => d,
            LazyDeadline::Unread { .. } => unreachable!("fixed above"),
        }
    }

    /// The deadline if it was fixed, else `None`: whoever waits next
    /// starts its own timeout then.
    pub(crate) fn if_read(&self) -> Option<CallDeadline> {
        match *self {
            LazyDeadline::Read(d) => d,
            LazyDeadline::Unread { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::now_nanos;

    #[test]
    fn one_reading_serves_both_clocks() {
        let before = now_nanos();
        let at = std::time::Instant::now();
        let after = now_nanos();
        let nanos = super::nanos_at(at);
        assert!(
            before <= nanos && nanos <= after,
            "{before} <= {nanos} <= {after}"
        );
        let later = at + std::time::Duration::from_millis(3);
        assert_eq!(super::nanos_at(later), nanos + 3_000_000);
    }

    #[test]
    fn never_goes_back() {
        let a = now_nanos();
        std::thread::sleep(std::time::Duration::from_millis(1));
        let b = now_nanos();
        assert!(b >= a + 1_000_000, "{a} then {b}");
    }
}
