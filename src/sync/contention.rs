//! Whether threads that do not yield (other processes, CPU-bound threads of
//! this one) hold this machine's cores: learned from yields that came back
//! late, and used to turn spinning off for a while.
//!
//! A spinning waiter yields its core between polls so that the thread that
//! will answer can run. Among threads that wait the same way a yield comes
//! back within microseconds. But a core busy with a thread that never
//! yields goes to it for a whole scheduler time slice (most of a
//! millisecond or more), and a spinner then pays a slice per yield where a
//! blocked waiter would have been woken, and run, at once: on a 2-core VM
//! with two busy loops beside it, a request took 3.8 ms spinning against
//! 37 µs blocking. So [`yield_now`] times every spinning yield, and when
//! [`LATE_YIELDS`] of them within [`WINDOW`] came back after more than
//! [`LATE_YIELD`], spinning is off ([`contended`]) for [`HOLD`], after
//! which it is tried again. Threads of this process that seal and write
//! without pause (eight callers streaming one-way messages on two cores)
//! count as such neighbours too, rightly; threads that wait by yielding do
//! not: eight callers and four reactors sharing two cores for requests
//! made at most 8 late yields in any window, against the 20 or more per
//! window two busy loops cause.
//!
//! A heuristic only, never part of a correctness protocol: its state is
//! plain std atomics even under loom (statics need const constructors),
//! and a race between two threads updating it only delays a decision.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// A yield that took longer than this gave the core to a time slice of
/// other work, not to a thread that polls and yields back.
pub const LATE_YIELD: Duration = Duration::from_micros(500);

/// How many late yields within [`WINDOW`] mean the cores are held by
/// threads that do not yield.
pub const LATE_YIELDS: u64 = 16;

/// The window late yields are counted in.
pub const WINDOW: Duration = Duration::from_millis(50);

/// How long spinning stays off once the cores were found held.
pub const HOLD: Duration = Duration::from_secs(1);

/// The late yields seen and the decision they led to, on a clock of
/// nanoseconds passed in (so the rule is tested without sleeping).
#[derive(Debug, Default)]
pub struct Detector {
    window_start: AtomicU64,
    late_in_window: AtomicU64,
    contended: AtomicBool,
    contended_until: AtomicU64,
}

impl Detector {
    pub const fn new() -> Self {
        Detector {
            window_start: AtomicU64::new(0),
            late_in_window: AtomicU64::new(0),
            contended: AtomicBool::new(false),
            contended_until: AtomicU64::new(0),
        }
    }

    /// A spinning thread's yield, which ended at `now`, took `took`.
    pub fn note_yield(&self, took: Duration, now: u64) {
        if took <= LATE_YIELD {
            return;
        }
        let start = self.window_start.load(Relaxed);
        let late = if now.saturating_sub(start) > WINDOW.as_nanos() as u64 {
            self.window_start.store(now, Relaxed);
            self.late_in_window.store(1, Relaxed);
            1
        } else {
            self.late_in_window.fetch_add(1, Relaxed) + 1
        };
        if late >= LATE_YIELDS {
            self.contended_until
                .store(now.saturating_add(HOLD.as_nanos() as u64), Relaxed);
            self.contended.store(true, Relaxed);
        }
    }

    /// Whether spinning is off at `now`. Reads one flag while it is not.
    pub fn contended(&self, now: impl FnOnce() -> u64) -> bool {
        if !self.contended.load(Relaxed) {
            return false;
        }
        if now() < self.contended_until.load(Relaxed) {
            return true;
        }
        self.contended.store(false, Relaxed);
        false
    }
}

static DETECTOR: Detector = Detector::new();

/// Nanoseconds since the first call, for the process-wide detector.
fn now_nanos() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Gives the core to another thread, as a spinning waiter does between
/// polls, and notes how long that took.
pub fn yield_now() {
    let before = now_nanos();
    super::yield_now();
    let after = now_nanos();
    DETECTOR.note_yield(Duration::from_nanos(after.saturating_sub(before)), after);
}

/// Whether spinning is off for now: the cores were lately found held by
/// threads that do not yield.
pub fn contended() -> bool {
    DETECTOR.contended(now_nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const LATE: Duration = Duration::from_millis(2);

    #[test]
    fn prompt_yields_never_turn_spinning_off() {
        let d = Detector::new();
        for i in 0..10_000 {
            d.note_yield(Duration::from_micros(40), i * 10_000);
        }
        assert!(!d.contended(|| 100 * MS));
    }

    #[test]
    fn enough_late_yields_in_a_window_turn_it_off_for_the_hold() {
        let d = Detector::new();
        let t0 = 1_000 * MS;
        for i in 0..LATE_YIELDS - 1 {
            d.note_yield(LATE, t0 + i * MS);
        }
        let last = t0 + LATE_YIELDS * MS;
        assert!(!d.contended(|| last), "one short of the count");
        d.note_yield(LATE, last);
        assert!(d.contended(|| last + 1));
        let hold = HOLD.as_nanos() as u64;
        assert!(d.contended(|| last + hold - 1));
        assert!(!d.contended(|| last + hold), "the hold ended");
        assert!(!d.contended(|| 0), "and the flag was cleared");
    }

    #[test]
    fn late_yields_spread_over_windows_do_not() {
        let d = Detector::new();
        // Spaced so that any window holds at most LATE_YIELDS - 1.
        let spacing = WINDOW.as_nanos() as u64 / (LATE_YIELDS - 2);
        for i in 1..1_000 {
            d.note_yield(LATE, i * spacing);
        }
        assert!(!d.contended(|| 1_000 * spacing));
    }
}
