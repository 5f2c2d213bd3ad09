//! Waking a task without letting its waker's panic unwind the thread that
//! wakes it. A reactor wakes the tasks of every connection it serves, and
//! a blocking caller wakes the tasks whose responses it reads: a waker
//! that panics (an executor's bug) must cost its own task, not stop the
//! reactor (and with it every connection on it) or a caller's call. And
//! tasks are woken, and wakers taken off a list dropped, with no lock held
//! that their futures may take.

#[cfg(not(loom))]
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::task::Waker;

#[cfg(not(loom))]
use crate::events;

/// Wakes `waker`'s task and drops the waker. If either panics, the panic
/// is contained here and reported (`events::waker_panicked`): the task
/// may not have been woken, and its call then ends at its deadline, at
/// the connection's end or when it is dropped, as any call whose executor
/// fails to poll it.
#[cfg(not(loom))]
pub fn wake(waker: Waker) {
    if catch_unwind(AssertUnwindSafe(move || waker.wake())).is_err() {
        events::waker_panicked();
    }
}

/// Wakes every waker in `wakers`, which it leaves empty (its allocation
/// kept). They were taken off a list under that list's lock, and are woken
/// here once it is let go: a waker may drop its task's future (the last
/// reference to it) or poll it inline, and either may lock the list again.
pub fn wake_all(wakers: &mut Vec<Waker>) {
    for waker in wakers.drain(..) {
        wake(waker);
    }
}

/// A waker taken off a list under its lock, dropped once the lock is let
/// go: a waker may hold the last reference to a future (an executor that
/// gave its task up), whose drop may lock the list again. Declared before
/// the lock's guard, it is dropped after it, on every return.
#[derive(Default)]
pub struct DropLater(Option<Waker>);

impl DropLater {
    /// Keeps `waker` (if any) until this is dropped.
    pub fn keep(&mut self, waker: Option<Waker>) {
        if waker.is_some() {
            debug_assert!(self.0.is_none(), "one waker per DropLater");
            self.0 = waker;
        }
    }
}

/// Under loom the models' wakers unpark loom threads, and a failing model
/// reports by panicking from inside them: that panic must not be caught.
#[cfg(loom)]
pub fn wake(waker: Waker) {
    waker.wake()
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    struct Counted(AtomicUsize, bool);
    impl std::task::Wake for Counted {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
            assert!(!self.1, "this waker panics");
        }
    }

    #[test]
    fn wakes_the_task_and_contains_a_panicking_waker() {
        let fine = Arc::new(Counted(AtomicUsize::new(0), false));
        wake(Waker::from(fine.clone()));
        assert_eq!(fine.0.load(Ordering::SeqCst), 1);
        let panics = Arc::new(Counted(AtomicUsize::new(0), true));
        wake(Waker::from(panics.clone()));
        assert_eq!(panics.0.load(Ordering::SeqCst), 1);
        // The waker was consumed: only the test's reference is left.
        assert_eq!(Arc::strong_count(&panics), 1);
    }

    /// A waker that, dropped, notes whether `list` was free then.
    struct Probe {
        list: Arc<std::sync::Mutex<Vec<Waker>>>,
        free_when_dropped: Arc<std::sync::atomic::AtomicBool>,
    }
    impl std::task::Wake for Probe {
        fn wake(self: Arc<Self>) {}
    }
    impl Drop for Probe {
        fn drop(&mut self) {
            let free = self.list.try_lock().is_ok();
            self.free_when_dropped.store(free, Ordering::SeqCst);
        }
    }

    /// Takes the list's last waker off under its lock, as the library's
    /// registrations do.
    fn take_last(list: &std::sync::Mutex<Vec<Waker>>) {
        let mut later = DropLater::default();
        let mut guard = list.lock().unwrap();
        later.keep(guard.pop());
        later.keep(None);
    }

    #[test]
    fn a_kept_waker_is_dropped_once_the_lock_is_let_go() {
        let list = Arc::new(std::sync::Mutex::new(Vec::new()));
        let free_when_dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        list.lock().unwrap().push(Waker::from(Arc::new(Probe {
            list: list.clone(),
            free_when_dropped: free_when_dropped.clone(),
        })));
        take_last(&list);
        assert!(list.lock().unwrap().is_empty());
        assert!(free_when_dropped.load(Ordering::SeqCst));
    }
}
