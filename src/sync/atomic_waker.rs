//! A slot for one task's `Waker`, which the waiting side may replace at
//! every poll while the completing side may wake it at any moment: the
//! completion slots' way to wait for a future as well as for a parked
//! thread.
//!
//! The algorithm is the well-known atomic waker (as in `futures`'
//! `AtomicWaker`): a state word with a REGISTERING and a WAKING bit
//! decides who may touch the cell. A registration that races a wake
//! hands the new waker to the waker side's duty by waking it itself, so
//! no wake-up is lost; the waiter must check its condition after
//! registering (see `Pending::poll_answer`).

#![allow(unsafe_code)]

use std::task::Waker;

use super::{AtomicUsize, Ordering, UnsafeCell};

/// No one is touching the cell.
const IDLE: usize = 0;
/// The waiting side is storing a waker.
const REGISTERING: usize = 1;
/// The completing side is taking the waker to wake it.
const WAKING: usize = 2;

/// Gives the cell back (IDLE) if a registration unwinds while it owns
/// it. A wake that came meanwhile left its waker to the registration and
/// is lost with it; the task is polling (its poll is what unwinds).
struct GiveBackOnUnwind<'a>(&'a AtomicUsize);

impl Drop for GiveBackOnUnwind<'_> {
    fn drop(&mut self) {
        self.0.store(IDLE, Ordering::Release);
    }
}

/// One task's waker; see the module docs.
pub struct AtomicWaker {
    state: AtomicUsize,
    waker: UnsafeCell<Option<Waker>>,
}

// SAFETY: the cell is only touched by the thread that moved the state from
// IDLE to REGISTERING, or that set WAKING while the state was IDLE; those
// transitions are exclusive (see `register` and `take`), and each hands
// the cell over with an AcqRel/Release transition the next owner acquires.
unsafe impl Sync for AtomicWaker {}

impl Default for AtomicWaker {
    fn default() -> Self {
        AtomicWaker::new()
    }
}

impl std::fmt::Debug for AtomicWaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AtomicWaker")
    }
}

impl AtomicWaker {
    /// An empty slot.
    pub fn new() -> Self {
        AtomicWaker {
            state: AtomicUsize::new(IDLE),
            waker: UnsafeCell::new(None),
        }
    }

    /// Stores `waker` to be woken by the next [`wake`](Self::wake). Only
    /// one thread registers at a time (the task that owns the wait). If a
    /// wake runs meanwhile, `waker` is woken at once instead: the caller
    /// re-checks its condition after this returns in any case.
    pub fn register(&self, waker: &Waker) {
        match self
            .state
            .compare_exchange(IDLE, REGISTERING, Ordering::Acquire, Ordering::Acquire)
            .unwrap_or_else(|actual| actual)
        {
            IDLE => {
                // A waker whose clone or drop panics (an executor's bug)
                // must not leave the state at REGISTERING: every later
                // registration would be refused, every wake lost.
                let unwinding = GiveBackOnUnwind(&self.state);
                // SAFETY: REGISTERING makes this thread the cell's owner.
                let old = self.waker.with_mut(|cell| unsafe {
                    match &*cell {
                        Some(old) if old.will_wake(waker) => None,
                        // The old waker is dropped after the cell holds
                        // the new one, so the cell is whole if it panics.
                        _ => (*cell).replace(waker.clone()),
                    }
                });
                drop(old);
                std::mem::forget(unwinding);
                // Give the cell back, unless a wake came meanwhile (it set
                // WAKING and left the waker to us).
                if let Err(actual) = self.state.compare_exchange(
                    REGISTERING,
                    IDLE,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    debug_assert_eq!(actual, REGISTERING | WAKING);
                    // SAFETY: still the owner: the waker side backs off
                    // while REGISTERING is set.
                    let woken = self.waker.with_mut(|cell| unsafe { (*cell).take() });
                    self.state.swap(IDLE, Ordering::AcqRel);
                    if let Some(woken) = woken {
                        super::wake::wake(woken);
                    }
                }
            }
            WAKING => {
                // A wake is taking the old waker right now: this poll's
                // waker may have missed it, so wake it ourselves.
                waker.wake_by_ref();
            }
            _ => {
                // Registering twice at once breaks the single-registrant
                // rule: the other registration wins, and this task is
                // woken so that it polls again.
                debug_assert!(false, "concurrent AtomicWaker::register");
                waker.wake_by_ref();
            }
        }
    }

    /// Wakes the registered waker, if any.
    pub fn wake(&self) {
        if let Some(waker) = self.take() {
            super::wake::wake(waker);
        }
    }

    /// Takes the registered waker, leaving the slot empty.
    pub fn take(&self) -> Option<Waker> {
        match self.state.fetch_or(WAKING, Ordering::AcqRel) {
            IDLE => {
                // SAFETY: WAKING from IDLE makes this thread the owner.
                let waker = self.waker.with_mut(|cell| unsafe { (*cell).take() });
                self.state.fetch_and(!WAKING, Ordering::Release);
                waker
            }
            // A registration is under way: it sees WAKING and wakes its
            // waker itself. Or another wake is: it does the waking.
            _ => None,
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize as Count;
    use std::sync::Arc;
    use std::task::Wake;

    struct Counter(Count);

    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn counter() -> (Arc<Counter>, Waker) {
        let c = Arc::new(Counter(Count::new(0)));
        (c.clone(), Waker::from(c))
    }

    fn woken(c: &Counter) -> usize {
        c.0.load(std::sync::atomic::Ordering::SeqCst)
    }

    #[test]
    fn wakes_the_last_registered_waker_once() {
        let slot = AtomicWaker::new();
        let (first, first_waker) = counter();
        let (second, second_waker) = counter();
        slot.register(&first_waker);
        slot.register(&second_waker);
        slot.wake();
        slot.wake();
        assert_eq!((woken(&first), woken(&second)), (0, 1));
    }

    /// A registration whose waker's clone panics (an executor's bug)
    /// unwinds out of `register`; the slot must still take the next
    /// registration and wake it (not refuse it as a concurrent one).
    #[test]
    fn a_waker_whose_clone_panics_leaves_the_slot_usable() {
        use std::task::{RawWaker, RawWakerVTable};
        fn clone_panics(_: *const ()) -> RawWaker {
            panic!("this waker's clone panics")
        }
        fn noop(_: *const ()) {}
        static VTABLE: RawWakerVTable = RawWakerVTable::new(clone_panics, noop, noop, noop);
        // SAFETY: the vtable's functions never touch the data pointer (a
        // null), and `clone_panics` panics rather than making a waker.
        let bad = unsafe { Waker::from_raw(RawWaker::new(std::ptr::null(), &VTABLE)) };
        let slot = AtomicWaker::new();
        let unwound =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| slot.register(&bad)));
        assert!(unwound.is_err(), "the clone did not run");
        let (c, w) = counter();
        slot.register(&w);
        assert_eq!(woken(&c), 0, "registered, not woken yet");
        slot.wake();
        assert_eq!(woken(&c), 1, "the wake reached the registered waker");
    }

    #[test]
    fn a_wake_with_nothing_registered_is_nothing() {
        let slot = AtomicWaker::new();
        slot.wake();
        let (c, w) = counter();
        slot.register(&w);
        assert_eq!(woken(&c), 0, "an earlier wake is not kept for later");
        assert!(slot.take().is_some());
        assert!(slot.take().is_none());
    }
}
