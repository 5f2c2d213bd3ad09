//! Commands from caller threads to one reactor, and the wake-up protocol
//! that lets a caller skip the wake-up syscall when the reactor is already
//! going to look.
//!
//! One atomic word holds both the number of queued commands (`word >> 1`)
//! and the reactor's `SLEEPING` bit, so every decision is made against a
//! single modification order, with no store-then-load pattern to get wrong:
//!
//! - the reactor may sleep only by CAS-ing the word from exactly 0 (nothing
//!   queued) to `SLEEPING`;
//! - a producer adds its command to the count with one `fetch_add`; if the
//!   bit was set, it clears it, and whoever clears it sends the one wake-up.
//!   A producer that finds the reactor awake skips the wake-up: the reactor
//!   will see the count before it can sleep.

use std::io;

use super::{lock, AtomicUsize, Mutex, Ordering};

const SLEEPING: usize = 1;
const ONE: usize = 2;

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
    queue: Mutex<Queue<T>>,
    /// `queued << 1 | SLEEPING`.
    word: AtomicUsize,
}

#[derive(Debug)]
struct Queue<T> {
    items: Vec<T>,
    /// Set once the consumer is gone: later pushes are handed back.
    closed: bool,
}

/// Why [`Mailbox::push`] did not deliver.
#[derive(Debug)]
pub enum PushError<T> {
    /// The mailbox is closed (its reactor has stopped); the item comes back.
    Closed(T),
    /// The item was queued, but waking the reactor failed.
    Notify(io::Error),
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
            queue: Mutex::new(Queue {
                items: Vec::new(),
                closed: false,
            }),
            word: AtomicUsize::new(0),
        }
    }

    /// Queues `item` and wakes the reactor if it is asleep. Returns whether
    /// this call sent the wake-up.
    pub fn push(&self, item: T, notify: &dyn Notify) -> Result<bool, PushError<T>> {
        let prev = {
            let mut q = lock(&self.queue);
            if q.closed {
                return Err(PushError::Closed(item));
            }
            q.items.push(item);
            // Counted under the lock, so a drain's count matches its items.
            self.word.fetch_add(ONE, Ordering::AcqRel)
        };
        if prev & SLEEPING != 0 && self.word.fetch_and(!SLEEPING, Ordering::AcqRel) & SLEEPING != 0
        {
            notify.notify().map_err(PushError::Notify)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Reactor side, just before it blocks: returns `true` if it may sleep,
    /// `false` if commands are already waiting (then it must not block).
    pub fn prepare_sleep(&self) -> bool {
        self.word
            .compare_exchange(0, SLEEPING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Reactor side, after its sleep returned (woken or timed out):
    /// producers may skip waking it until the next
    /// [`prepare_sleep`](Self::prepare_sleep).
    pub fn awake(&self) {
        self.word.fetch_and(!SLEEPING, Ordering::AcqRel);
    }

    /// Reactor side: moves every queued command into `out` (which should be
    /// empty; its capacity is swapped in for reuse).
    pub fn drain_into(&self, out: &mut Vec<T>) {
        if self.is_empty() {
            return;
        }
        let mut q = lock(&self.queue);
        std::mem::swap(&mut q.items, out);
        self.word.fetch_sub(out.len() * ONE, Ordering::AcqRel);
    }

    /// Consumer side, when it stops for good: refuses every later push and
    /// moves what is still queued into `out`, so nothing is left behind in
    /// a mailbox that no one will read.
    pub fn close(&self, out: &mut Vec<T>) {
        let mut q = lock(&self.queue);
        q.closed = true;
        std::mem::swap(&mut q.items, out);
        self.word.fetch_sub(out.len() * ONE, Ordering::AcqRel);
    }

    /// Commands queued and not yet drained.
    pub fn len(&self) -> usize {
        self.word.load(Ordering::Acquire) >> 1
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
