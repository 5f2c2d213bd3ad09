//! Time: a monotonic clock in nanoseconds, cheap to keep in an atomic
//! (the timestamps several threads stamp on a connection and the
//! reactor's sweep compares), and the deadline one call carries through
//! all its waits.

use std::time::{Duration, Instant};

use crate::error::TimeoutKind;

/// Nanoseconds since the first call in this process.
pub(crate) fn now_nanos() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
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
        let at = Instant::now().checked_add(timeout?)?;
        Some(CallDeadline { at, kind })
    }

    pub(crate) fn passed(&self) -> bool {
        Instant::now() >= self.at
    }
}

#[cfg(test)]
mod tests {
    use super::now_nanos;

    #[test]
    fn never_goes_back() {
        let a = now_nanos();
        std::thread::sleep(std::time::Duration::from_millis(1));
        let b = now_nanos();
        assert!(b >= a + 1_000_000, "{a} then {b}");
    }
}
