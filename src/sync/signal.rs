//! The shutdown signal: a one-way flag that turns new calls away.
//!
//! Calls register themselves (`enter`) before they touch a connection and
//! leave when done. Shutdown raises the flag and then waits for the calls
//! already inside to leave, so a call either completes or is refused with
//! [`Error::Closed`](crate::Error::Closed): it is never half-accepted and
//! never hangs.

use super::{AtomicUsize, Ordering};

const CLOSED: usize = 1;
const ONE_CALL: usize = 2;

/// A shutdown flag plus a count of calls in progress, in one atomic so the
/// two can never disagree.
#[derive(Debug, Default)]
pub struct ShutdownSignal {
    state: AtomicUsize,
}

/// Proof that a call is inside; leaving happens on drop.
#[derive(Debug)]
pub struct CallGuard<'a> {
    signal: &'a ShutdownSignal,
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        self.signal.state.fetch_sub(ONE_CALL, Ordering::Release);
    }
}

impl ShutdownSignal {
    /// A signal that is open.
    pub fn new() -> Self {
        ShutdownSignal {
            state: AtomicUsize::new(0),
        }
    }

    /// Registers a call, or returns `None` if shutdown has begun.
    pub fn enter(&self) -> Option<CallGuard<'_>> {
        let prev = self.state.fetch_add(ONE_CALL, Ordering::Acquire);
        if prev & CLOSED != 0 {
            self.state.fetch_sub(ONE_CALL, Ordering::Release);
            return None;
        }
        Some(CallGuard { signal: self })
    }

    /// Raises the flag; returns `true` for the caller that raised it first.
    pub fn close(&self) -> bool {
        self.state.fetch_or(CLOSED, Ordering::AcqRel) & CLOSED == 0
    }

    /// Whether shutdown has begun.
    pub fn is_closed(&self) -> bool {
        self.state.load(Ordering::Acquire) & CLOSED != 0
    }

    /// Calls still inside.
    pub fn calls_inside(&self) -> usize {
        self.state.load(Ordering::Acquire) / ONE_CALL
    }
}
