//! Commands from caller threads to one reactor, and the wake-up protocol
//! that lets a caller skip the wake-up syscall when the reactor is already
//! going to look.
//!
//! The reactor announces "I am about to sleep" by storing `SLEEPING` and
//! then looking at the pending count; a producer bumps the pending count
//! and then swaps the state. All four operations are `SeqCst`, so at least
//! one side sees the other: either the reactor sees the message and does
//! not sleep, or the producer sees `SLEEPING` and wakes it. A producer that
//! sees the reactor awake skips the wake-up.

use std::io;

use super::{lock, AtomicUsize, Mutex, Ordering};

const AWAKE: usize = 0;
const SLEEPING: usize = 1;
const NOTIFIED: usize = 2;

/// Wakes a sleeping reactor: `mio::Waker` in the runtime, a counting or
/// unparking stand-in in the loom models.
pub trait Notify: Send + Sync {
    /// Makes the reactor's next (or current) sleep return.
    fn notify(&self) -> io::Result<()>;
}

impl Notify for mio::Waker {
    fn notify(&self) -> io::Result<()> {
        self.wake()
    }
}

/// A multi-producer, single-consumer command queue with a skip-able
/// wake-up. Its buffers are reused, so steady-state traffic allocates
/// nothing.
#[derive(Debug)]
pub struct Mailbox<T> {
    queue: Mutex<Vec<T>>,
    pending: AtomicUsize,
    state: AtomicUsize,
}

impl<T> Default for Mailbox<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Mailbox<T> {
    /// An empty mailbox whose reactor counts as awake.
    pub fn new() -> Self {
        Mailbox {
            queue: Mutex::new(Vec::new()),
            pending: AtomicUsize::new(0),
            state: AtomicUsize::new(AWAKE),
        }
    }

    /// Queues `item` and wakes the reactor if it may be asleep. Returns
    /// whether a wake-up was sent.
    pub fn push(&self, item: T, notify: &dyn Notify) -> io::Result<bool> {
        {
            let mut q = lock(&self.queue);
            q.push(item);
            self.pending.fetch_add(1, Ordering::SeqCst);
        }
        if self.state.swap(NOTIFIED, Ordering::SeqCst) == SLEEPING {
            notify.notify()?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Reactor side, just before it blocks: returns `true` if it may sleep,
    /// `false` if commands are already waiting (then it must not block).
    pub fn prepare_sleep(&self) -> bool {
        self.state.store(SLEEPING, Ordering::SeqCst);
        if self.pending.load(Ordering::SeqCst) > 0 {
            self.state.store(AWAKE, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Reactor side, after its sleep returned: producers may skip waking it
    /// until the next [`prepare_sleep`](Self::prepare_sleep).
    pub fn awake(&self) {
        self.state.store(AWAKE, Ordering::SeqCst);
    }

    /// Reactor side: moves every queued command into `out` (which should be
    /// empty; its capacity is swapped in for reuse).
    pub fn drain_into(&self, out: &mut Vec<T>) {
        if self.pending.load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut q = lock(&self.queue);
        std::mem::swap(&mut *q, out);
        self.pending.store(0, Ordering::SeqCst);
    }

    /// Commands queued and not yet drained.
    pub fn len(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
