//! Deadlines for waiters that are futures, kept by the reactor: an async
//! call cannot count on its executor having a timer (or on which one), so
//! it registers its deadline and its task's waker here, and the reactor
//! that drives its connection wakes it once the deadline passes. The woken
//! future sees the time itself and fails with its timeout.
//!
//! The reactor sleeps until the earliest deadline at the latest (see
//! [`Timers::earliest`]). A deadline registered while the reactor sleeps
//! towards a later time must wake it: [`Timers::insert`] says when, from
//! the time the reactor announced with [`Timers::sleeping_until`]. The two
//! sides order their store and load through SeqCst, so either the reactor
//! sees the new deadline before it sleeps or the registering thread sees
//! the reactor's sleep and wakes it.
//!
//! A slab under a lock holds the entries: registering reuses a vacant
//! entry, so a steady stream of calls allocates nothing once the slab has
//! grown to the most calls waiting at once.

use std::task::Waker;

use slab::Slab;

use super::wake::DropLater;
use super::{fence, lock, AtomicU64, Mutex, Ordering};

/// No deadline.
const NEVER: u64 = u64::MAX;

/// Timers a reactor has room for from the start (a few KiB per reactor).
const ROOM: usize = 64;

struct Timer {
    /// When to wake ([`now_nanos`](crate::clock::now_nanos)); [`NEVER`]
    /// once it fired.
    at: u64,
    waker: Option<Waker>,
    /// Removed as it fires (nobody holds its key).
    once: bool,
}

/// One reactor's timers; see the module docs.
#[derive(Debug)]
pub struct Timers {
    entries: Mutex<Slab<Timer>>,
    /// The earliest deadline not yet fired, or [`NEVER`]; exact after
    /// every [`fire`](Self::fire), at most early otherwise (an entry
    /// removed before its deadline leaves it in place until then).
    earliest: AtomicU64,
    /// When the reactor wakes by itself next, or 0 while it is awake.
    sleeping_until: AtomicU64,
    /// The wakers a [`fire`](Self::fire) took off the entries, woken once
    /// their lock is let go (a waker may drop its future, whose drop
    /// removes its timer, or poll it inline). Kept for its allocation.
    fired: Mutex<Vec<Waker>>,
}

impl std::fmt::Debug for Timer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timer").field("at", &self.at).finish()
    }
}

/// A registered deadline, to [`update`](Timers::update) at each poll and
/// [`remove`](Timers::remove) when the call ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerKey(usize);

impl Default for Timers {
    fn default() -> Self {
        Self::new()
    }
}

impl Timers {
    /// No timers, with room for [`ROOM`] of them made now: the calls
    /// waiting at once on a reactor, and each connection's lease timer,
    /// reach their most now and then, and a first such peak must not grow
    /// the slab in what is otherwise a steady state.
    pub fn new() -> Self {
        Timers {
            entries: Mutex::new(Slab::with_capacity(ROOM)),
            earliest: AtomicU64::new(NEVER),
            sleeping_until: AtomicU64::new(0),
            fired: Mutex::new(Vec::with_capacity(ROOM)),
        }
    }

    /// Wakes `waker` at `at` (or soon after). The returned flag says the
    /// reactor sleeps past `at` and must be woken to see it.
    pub fn insert(&self, at: u64, waker: &Waker) -> (TimerKey, bool) {
        self.insert_entry(at, waker, false)
    }

    /// [`insert`](Self::insert) for a timer nobody removes: it goes as it
    /// fires. Returns the flag alone.
    pub fn insert_once(&self, at: u64, waker: &Waker) -> bool {
        self.insert_entry(at, waker, true).1
    }

    fn insert_entry(&self, at: u64, waker: &Waker, once: bool) -> (TimerKey, bool) {
        let key = {
            let mut entries = lock(&self.entries);
            let key = entries.insert(Timer {
                at,
                waker: Some(waker.clone()),
                once,
            });
            // Under the lock, so a concurrent `fire` (which resets
            // `earliest` under it) cannot lose this deadline.
            self.earliest.fetch_min(at, Ordering::SeqCst);
            key
        };
        // Pairs with the fence in `sleeping_until` (see the module docs).
        fence(Ordering::SeqCst);
        let sleeping_until = self.sleeping_until.load(Ordering::SeqCst);
        (TimerKey(key), sleeping_until != 0 && at < sleeping_until)
    }

    /// The task to wake may have changed since the last poll.
    pub fn update(&self, key: TimerKey, waker: &Waker) {
        // Before the lock: the replaced waker is dropped after it, as in
        // `remove`.
        let mut stale = DropLater::default();
        let mut entries = lock(&self.entries);
        if let Some(timer) = entries.get_mut(key.0) {
            if timer.at != NEVER && !timer.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
                stale.keep(timer.waker.replace(waker.clone()));
            }
        }
    }

    /// The call ended (answered, failed or dropped): forget its deadline.
    pub fn remove(&self, key: TimerKey) {
        let timer = lock(&self.entries).try_remove(key.0);
        // Dropped outside the lock: a waker's drop may run executor code.
        drop(timer);
    }

    /// Deadlines registered and not removed.
    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.entries).len()
    }

    /// The earliest deadline that may still have to fire, if any.
    pub fn earliest(&self) -> Option<u64> {
        Some(self.earliest.load(Ordering::SeqCst)).filter(|&at| at != NEVER)
    }

    /// Reactor side, before it sleeps: it wakes by itself at `at`
    /// ([`NEVER`]-like `u64::MAX` for no timeout). Returns the earliest
    /// deadline, read after the announcement (see the module docs).
    pub fn sleeping_until(&self, at: u64) -> Option<u64> {
        self.sleeping_until.store(at.max(1), Ordering::SeqCst);
        // Store, fence, load here; fetch_min, fence, load in `insert`: the
        // fences order the pairs, so one side sees the other's store.
        // (SeqCst accesses alone do not give this in loom's model; the
        // fences do, everywhere.)
        fence(Ordering::SeqCst);
        self.earliest()
    }

    /// Reactor side, once it woke: registrations need not wake it.
    pub fn awake(&self) {
        self.sleeping_until.store(0, Ordering::SeqCst);
    }

    /// Reactor side: wakes every task whose deadline is `now` or earlier,
    /// and recomputes the earliest deadline left.
    pub fn fire(&self, now: u64) {
        if self.earliest.load(Ordering::SeqCst) > now {
            return;
        }
        let mut fired = lock(&self.fired);
        let mut entries = lock(&self.entries);
        let mut earliest = NEVER;
        entries.retain(|_, timer| {
            if timer.at <= now {
                timer.at = NEVER;
                fired.extend(timer.waker.take());
                !timer.once
            } else {
                earliest = earliest.min(timer.at);
                true
            }
        });
        self.earliest.store(earliest, Ordering::SeqCst);
        drop(entries);
        super::wake::wake_all(&mut fired);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use std::task::Wake;

    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn waker() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count::default());
        (count.clone(), Waker::from(count))
    }

    fn woken(count: &Count) -> usize {
        count.0.load(std::sync::atomic::Ordering::SeqCst)
    }

    #[test]
    fn fires_what_is_due_once_and_keeps_the_rest() {
        let timers = Timers::new();
        let (a, wa) = waker();
        let (b, wb) = waker();
        let (ka, _) = timers.insert(100, &wa);
        let (kb, _) = timers.insert(200, &wb);
        assert_eq!(timers.earliest(), Some(100));
        timers.fire(99);
        assert_eq!((woken(&a), woken(&b)), (0, 0));
        timers.fire(150);
        assert_eq!((woken(&a), woken(&b)), (1, 0));
        assert_eq!(timers.earliest(), Some(200));
        timers.fire(160);
        timers.update(ka, &wa);
        timers.fire(170);
        assert_eq!(woken(&a), 1, "a fired timer fires no more");
        timers.fire(250);
        assert_eq!((woken(&a), woken(&b)), (1, 1));
        assert_eq!(timers.earliest(), None);
        timers.remove(ka);
        timers.remove(kb);
        assert_eq!(timers.len(), 0);
    }

    #[test]
    fn a_timer_inserted_once_goes_as_it_fires() {
        let timers = Timers::new();
        let (a, wa) = waker();
        let (_, wb) = waker();
        assert!(!timers.insert_once(100, &wa), "the reactor is awake");
        let (kb, _) = timers.insert(300, &wb);
        timers.sleeping_until(200);
        assert!(
            timers.insert_once(150, &wa),
            "before the reactor wakes by itself"
        );
        assert_eq!(timers.len(), 3);
        timers.fire(160);
        assert_eq!(woken(&a), 2);
        assert_eq!(timers.len(), 1, "only the timer with a key stays");
        assert_eq!(timers.earliest(), Some(300));
        timers.remove(kb);
        assert_eq!(timers.len(), 0);
    }

    /// A waker that drops its future when woken: the future's drop
    /// removes its timer, which locks the entries.
    struct RemovesItsTimer {
        timers: Arc<Timers>,
        key: std::sync::Mutex<Option<TimerKey>>,
    }

    impl Wake for RemovesItsTimer {
        fn wake(self: Arc<Self>) {
            if let Some(key) = self.key.lock().unwrap().take() {
                self.timers.remove(key);
            }
        }
    }

    /// Firing wakes the tasks with the entries' lock let go: under it, a
    /// waker that dropped its future deadlocked the reactor.
    #[test]
    fn a_waker_that_drops_its_future_is_woken_outside_the_lock() {
        let timers = Arc::new(Timers::new());
        let task = Arc::new(RemovesItsTimer {
            timers: timers.clone(),
            key: std::sync::Mutex::new(None),
        });
        let (key, _) = timers.insert(100, &Waker::from(task.clone()));
        *task.key.lock().unwrap() = Some(key);
        let (done, ended) = std::sync::mpsc::channel();
        let firing = timers.clone();
        std::thread::spawn(move || {
            firing.fire(100);
            let _ = done.send(());
        });
        ended
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("firing deadlocked waking the task");
        assert_eq!(timers.len(), 0, "the dropped future's timer is left");
    }

    #[test]
    fn a_removed_timer_does_not_fire() {
        let timers = Timers::new();
        let (a, wa) = waker();
        let (k, _) = timers.insert(100, &wa);
        timers.remove(k);
        timers.fire(1_000);
        assert_eq!(woken(&a), 0);
        assert_eq!(timers.earliest(), None);
    }

    #[test]
    fn the_latest_waker_is_woken() {
        let timers = Timers::new();
        let (a, wa) = waker();
        let (b, wb) = waker();
        let (k, _) = timers.insert(100, &wa);
        timers.update(k, &wb);
        timers.fire(100);
        assert_eq!((woken(&a), woken(&b)), (0, 1));
    }

    #[test]
    fn an_earlier_deadline_wakes_a_sleeping_reactor() {
        let timers = Timers::new();
        let (_, w) = waker();
        assert!(
            !timers.insert(500, &w).1,
            "an awake reactor needs no wake-up"
        );
        assert_eq!(timers.sleeping_until(1_000), Some(500));
        assert!(!timers.insert(2_000, &w).1, "it wakes before that anyway");
        assert!(timers.insert(700, &w).1, "it would sleep past this one");
        timers.awake();
        assert!(!timers.insert(600, &w).1);
    }

    #[test]
    fn slots_are_reused_without_growing() {
        let timers = Timers::new();
        let (_, w) = waker();
        let keys: Vec<_> = (0..8).map(|i| timers.insert(i, &w).0).collect();
        for k in keys {
            timers.remove(k);
        }
        let capacity = lock(&timers.entries).capacity();
        for i in 0..1_000 {
            let (k, _) = timers.insert(i, &w);
            timers.remove(k);
        }
        assert_eq!(lock(&timers.entries).capacity(), capacity);
    }
}
