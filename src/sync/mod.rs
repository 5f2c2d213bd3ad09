//! Every cross-thread structure of the runtime, and the one place that picks
//! between std and loom primitives.
//!
//! Under `--cfg loom` the atomics, locks, cells and park/unpark below are
//! loom's, so the models in `loom-tests/` check this very code rather than a
//! copy. Nothing else in the crate touches an atomic or parks a thread
//! directly.
//!
//! - [`atomic_waker`]: one task's waker, replaced at every poll and woken
//!   from any thread (the completion slots' way to wake a future).
//! - [`buffers`]: the receive and output buffers a reactor lends its
//!   connections while they use them.
//! - [`completion`]: the per-connection table of request slots a caller
//!   waits on, located by sequence number.
//! - [`contention`]: whether threads that never yield hold the cores, from
//!   how long spinning threads' yields take (spinning is off while they do).
//! - [`mailbox`]: commands from caller threads to a reactor, with the
//!   wake-up skipped when the reactor is already going to look.
//! - [`read_turn`]: whose turn it is to read a connection's socket, the
//!   reactor's or a waiting caller's.
//! - [`signal`]: the one-way shutdown flag.
//! - [`timers`]: the deadlines of waiters that are futures, which their
//!   reactor wakes when they pass.
//! - [`wake`]: waking a task without its waker's panic unwinding the
//!   waking thread.

pub mod atomic_waker;
pub mod buffers;
pub mod completion;
pub mod contention;
pub mod mailbox;
pub mod read_turn;
pub mod signal;
pub mod timers;
pub mod wake;

#[cfg(not(loom))]
mod imp {
    pub use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
    pub use std::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
    pub use std::thread::{current, park, Thread};

    /// Parks for at most `dur`. Spurious wake-ups are allowed, as with std.
    pub fn park_timeout(dur: std::time::Duration) {
        std::thread::park_timeout(dur)
    }

    /// One step of a bounded spin.
    pub fn spin_hint() {
        std::hint::spin_loop()
    }

    /// Gives the core to another thread.
    pub fn yield_now() {
        std::thread::yield_now()
    }

    /// `UnsafeCell` with loom's closure API, so the same code compiles
    /// under both.
    #[derive(Debug)]
    pub struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

    impl<T> UnsafeCell<T> {
        /// Wraps `value`.
        pub fn new(value: T) -> Self {
            UnsafeCell(std::cell::UnsafeCell::new(value))
        }
        /// Runs `f` with a raw pointer to the value; the caller upholds
        /// exclusive access.
        pub fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
            f(self.0.get())
        }
    }
}

#[cfg(loom)]
mod imp {
    pub use loom::cell::UnsafeCell;
    pub use loom::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
    pub use loom::sync::{
        Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard,
    };
    pub use loom::thread::{current, park, Thread};

    /// loom has no timed park; a model explores the wake-up paths instead.
    pub fn park_timeout(_dur: std::time::Duration) {
        loom::thread::park()
    }

    /// One step of a bounded spin: a yield point for the model.
    pub fn spin_hint() {
        loom::thread::yield_now()
    }

    /// Gives the core to another thread.
    pub fn yield_now() {
        loom::thread::yield_now()
    }
}

pub use imp::*;

/// Leave to spin while waiting, granted to at most half the cores' worth of
/// threads at once. Spinning saves a sleeping waiter's wake-up (about 22 µs
/// across cores on the reference machine), but a spinner holds a core the
/// reactors need: with many callers, spinning costs more than it saves.
/// A heuristic only, never part of a correctness protocol, so it is a plain
/// std atomic even under loom (where waits are modelled with `spins = 0`).
#[derive(Debug)]
pub struct SpinPermit(());

/// The cores this process may run on (its CPU affinity and cgroup quota,
/// as `std::thread::available_parallelism` reports them), counted once.
pub fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

static SPINNERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl SpinPermit {
    /// A permit to spin, if `spins > 0` and fewer than half the cores'
    /// worth of threads (at least one) are spinning now.
    pub fn acquire(spins: u32) -> Option<SpinPermit> {
        use std::sync::atomic::Ordering::Relaxed;
        if spins == 0 {
            return None;
        }
        let max = (cores() / 2).max(1);
        if SPINNERS.fetch_add(1, Relaxed) < max {
            Some(SpinPermit(()))
        } else {
            SPINNERS.fetch_sub(1, Relaxed);
            None
        }
    }
}

impl Drop for SpinPermit {
    fn drop(&mut self) {
        SPINNERS.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A process-wide unique connection id. A plain std counter even under
/// loom: a `static` needs a const constructor, and ids carry no
/// synchronisation.
pub fn next_conn_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Locks a mutex, carrying on if a panicking thread poisoned it: every
/// structure here is left consistent between statements that can panic.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Takes a shared read lock, carrying on past poisoning as [`lock`] does.
pub fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

/// Takes the write lock, carrying on past poisoning as [`lock`] does.
pub fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}
