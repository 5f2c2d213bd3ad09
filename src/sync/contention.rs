//! Whether threads that do not yield (other processes, CPU-bound threads of
//! this one) hold this machine's cores: learned from yields that came back
//! late, and used to turn spinning off for a while.
//!
//! A spinning waiter yields its core between polls so that the thread that
//! will answer can run. Among threads that wait the same way a yield comes
//! back within microseconds. But a core busy with a thread that never
//! yields goes to it for a whole scheduler time slice (most of a
//! millisecond or more), and a spinner then pays a slice per yield where a
//! blocked waiter would have been woken, and run, at once: a request can
//! take a hundred times longer spinning than blocking (README, "Waiting").
//!
//! So [`yield_now`] times the yields of waiting threads (callers spinning
//! for a response, reactors polling between turns), and when the yields
//! that came back after more than [`LATE_YIELD`] cover [`LOST_IN_WINDOW`]
//! of one [`WINDOW`] (half of it), spinning is off ([`contended`]) for
//! [`HOLD`], after which it is tried again (and if the cores are still
//! held, off for twice as long, up to [`MAX_HOLD`]). Late yields that
//! overlap (the whole machine paused, as a VM's cores are now and then,
//! and every spinner with it) count once, by the wall time they cover, and
//! none counts for more than [`MAX_PER_YIELD`]. A busy neighbour starves
//! the spinners for nearly the whole window; spinners among themselves,
//! however many share the cores, for a small part of it (the README has
//! the figures the thresholds come from). Threads of this process that
//! seal and write without pause (callers streaming one-way messages) count
//! as busy neighbours too, rightly: they do not yield either.
//!
//! A heuristic only, never part of a correctness protocol: its state is
//! plain std atomics even under loom (statics need const constructors),
//! and a race between two threads updating it only delays a decision.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::clock::now_nanos;
use crate::protocol::connection::nanos;

/// A yield that took longer than this gave the core to a time slice of
/// other work, not to a thread that polls and yields back.
pub const LATE_YIELD: Duration = Duration::from_micros(500);

/// The window late yields are counted in.
pub const WINDOW: Duration = Duration::from_millis(50);

/// How long the late yields within one [`WINDOW`] may take together
/// before the cores count as held by threads that do not yield: half of
/// it.
pub const LOST_IN_WINDOW: Duration = Duration::from_millis(25);

/// The most one late yield counts for: about the longest time slice a
/// scheduler gives a busy thread. A longer stall is the machine pausing
/// (a VM's cores descheduled), which one yield's evidence should not turn
/// into a second without spinning.
pub const MAX_PER_YIELD: Duration = Duration::from_millis(5);

/// How long spinning stays off once the cores were found held...
pub const HOLD: Duration = Duration::from_secs(1);

/// ...doubled, up to this, each time they are found held again within a
/// [`HOLD`] of the last time spinning came back: finding out costs the
/// spinners [`LOST_IN_WINDOW`] of stalls.
pub const MAX_HOLD: Duration = Duration::from_secs(8);

/// The late yields seen and the decision they led to, on a clock of
/// nanoseconds passed in (so the rule is tested without sleeping).
#[derive(Debug, Default)]
pub struct Detector {
    window_start: AtomicU64,
    /// Nanoseconds of the window that late yields covered.
    late_in_window: AtomicU64,
    /// When the last late yield ended (so overlapping ones count once).
    last_late_end: AtomicU64,
    contended: AtomicBool,
    contended_until: AtomicU64,
    /// The hold last applied, in nanoseconds.
    hold: AtomicU64,
}

impl Detector {
    /// A detector that has seen no late yield.
    pub const fn new() -> Self {
        Detector {
            window_start: AtomicU64::new(0),
            late_in_window: AtomicU64::new(0),
            last_late_end: AtomicU64::new(0),
            contended: AtomicBool::new(false),
            contended_until: AtomicU64::new(0),
            hold: AtomicU64::new(0),
        }
    }

    /// A spinning thread's yield, which ended at `now`, took `took`.
    pub fn note_yield(&self, took: Duration, now: u64) {
        if took <= LATE_YIELD {
            return;
        }
        let until = self.contended_until.load(Relaxed);
        if now < until {
            // Spinning is off already; nothing counts toward the next
            // decision until it is back. (Also repairs the flag, should
            // a `contended` that saw the previous hold expire have
            // cleared it after this hold began.)
            self.contended.store(true, Relaxed);
            return;
        }
        let began = now.saturating_sub(nanos(took));
        let last_end = self.last_late_end.fetch_max(now, Relaxed);
        let lost = now
            .saturating_sub(began.max(last_end))
            .min(MAX_PER_YIELD.as_nanos() as u64);
        if lost == 0 {
            return;
        }
        let start = self.window_start.load(Relaxed);
        let in_window = if now.saturating_sub(start) > WINDOW.as_nanos() as u64 {
            self.window_start.store(now, Relaxed);
            self.late_in_window.store(lost, Relaxed);
            lost
        } else {
            self.late_in_window.fetch_add(lost, Relaxed) + lost
        };
        if in_window >= LOST_IN_WINDOW.as_nanos() as u64 {
            let first = HOLD.as_nanos() as u64;
            let hold = if until > 0 && now - until < first {
                (self.hold.load(Relaxed) * 2).clamp(first, MAX_HOLD.as_nanos() as u64)
            } else {
                first
            };
            self.hold.store(hold, Relaxed);
            self.contended_until
                .store(now.saturating_add(hold), Relaxed);
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

/// Gives the core to another thread, as a spinning waiter does between
/// polls, and notes how long that took; returns it.
pub fn yield_now() -> Duration {
    let before = now_nanos();
    super::yield_now();
    let after = now_nanos();
    let took = Duration::from_nanos(after.saturating_sub(before));
    DETECTOR.note_yield(took, after);
    took
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
    fn late_yields_covering_half_a_window_turn_it_off_for_the_hold() {
        let d = Detector::new();
        let t0 = 1_000 * MS;
        // Back to back, 2 ms each: 24 ms of the window.
        let late = 2 * MS;
        for i in 1..=12 {
            d.note_yield(LATE, t0 + i * late);
        }
        let last = t0 + 13 * late;
        assert!(!d.contended(|| last), "24 ms of 50");
        d.note_yield(LATE, last);
        assert!(d.contended(|| last + 1), "26 ms of 50");
        let hold = HOLD.as_nanos() as u64;
        assert!(d.contended(|| last + hold - 1));
        assert!(!d.contended(|| last + hold), "the hold ended");
        assert!(!d.contended(|| 0), "and the flag was cleared");
    }

    /// Late yields back to back from `at` until they cover half a window:
    /// when they do.
    fn starve(d: &Detector, at: u64) -> u64 {
        let mut now = at;
        while !d.contended(|| now) {
            now += 2 * MS;
            d.note_yield(LATE, now);
        }
        now
    }

    #[test]
    fn found_held_again_at_once_the_hold_doubles_up_to_the_most() {
        let d = Detector::new();
        let hold = |n: u64| n * HOLD.as_nanos() as u64;
        let mut at = starve(&d, 1_000 * MS);
        for expected in [2, 4, 8, 8] {
            let back = at + d.hold.load(Relaxed);
            assert!(!d.contended(|| back), "spinning is back");
            at = starve(&d, back);
            assert_eq!(d.hold.load(Relaxed), hold(expected));
        }
        // Found held only long after spinning came back: the first hold.
        let later = at + d.hold.load(Relaxed) + hold(2);
        starve(&d, later);
        assert_eq!(d.hold.load(Relaxed), hold(1));
    }

    #[test]
    fn a_late_yield_during_a_hold_repairs_a_flag_cleared_by_a_race() {
        let d = Detector::new();
        let at = starve(&d, 1_000 * MS);
        // A `contended` that read the flag before this hold began, and saw
        // the previous one expired, clears it after the hold began.
        d.contended.store(false, Relaxed);
        assert!(!d.contended(|| at + MS));
        d.note_yield(LATE, at + 3 * MS);
        assert!(d.contended(|| at + 4 * MS));
    }

    #[test]
    fn overlapping_late_yields_count_once() {
        let d = Detector::new();
        // Twenty spinners stalled by the same 20 ms pause of the machine.
        let end = 1_000 * MS;
        for i in 0..20 {
            d.note_yield(Duration::from_millis(20), end + i);
        }
        assert!(!d.contended(|| end + MS));
    }

    #[test]
    fn one_long_stall_does_not() {
        let d = Detector::new();
        let end = 1_000 * MS;
        d.note_yield(Duration::from_millis(40), end);
        d.note_yield(LATE, end + 3 * MS);
        assert!(!d.contended(|| end + 4 * MS));
    }

    #[test]
    fn late_yields_spread_over_windows_do_not() {
        let d = Detector::new();
        // 2 ms late of every 5: at most 11 in a window, 22 ms of 50.
        for i in 1..1_000 {
            d.note_yield(LATE, i * 5 * MS);
        }
        assert!(!d.contended(|| 5_000 * MS));
    }
}
