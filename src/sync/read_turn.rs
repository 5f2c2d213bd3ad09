//! The turn to read one connection's socket, passed between its reactor and
//! the callers waiting on it, with no edge-triggered readiness event lost.
//!
//! A caller that waits for a response may read the socket itself instead of
//! waiting for the reactor to read it and wake the caller: one thread wakes
//! per round trip instead of two. Only one thread may read at a time (the
//! receive buffer and the opener's counter are sequential), so reading is a
//! turn that is only ever *tried*: a reactor never blocks behind a caller,
//! nor a caller behind the reactor.
//!
//! # The lost-edge problem and how it is avoided
//!
//! The reactor hears of new bytes once (edge-triggered). If a caller holds
//! the turn at that moment, the reactor cannot read, and the caller may
//! already be past its last read: nobody would read those bytes. So the
//! turn is one atomic word holding `HELD` and `WANTED`. The reactor sets
//! `WANTED` and takes the turn only if it was not `HELD`; a holder gives the
//! turn back only from exactly `HELD`, and if it finds `WANTED` set instead
//! it keeps the turn (clearing `WANTED`) and reads again. Both decisions are
//! read-modify-writes of the same word, so one of them always sees the
//! other: no fences, no window. Whoever clears `WANTED` acquires the
//! reactor's release of it, so its reads come after the event.
//!
//! # Closing under a holder
//!
//! A closing connection drops its input (the receive buffer, anything
//! held), but a caller may hold the turn then, asleep in `recv`. The close
//! raises `CLOSED` in the same word and takes the turn if it is free; a
//! holder that lets go (released or dropped) and finds `CLOSED` drops the
//! input itself first. The close's raise and the holder's letting go are
//! read-modify-writes of that word again, so exactly one of them sees the
//! other, and the input never outlives the close by more than the holder's
//! current read.
//!
//! The value itself sits in a mutex only the turn's holder locks (so it is
//! never contended); the mutex gives safe access, the word gives the turn.

use super::{lock, AtomicUsize, Mutex, MutexGuard, Ordering};

const HELD: usize = 1;
const WANTED: usize = 2;
const CLOSED: usize = 4;

/// A value only the thread whose turn it is may use; see the module docs.
#[derive(Debug)]
pub struct ReadTurn<T> {
    word: AtomicUsize,
    value: Mutex<T>,
    /// What the holder at or after [`close`](Self::close) does to the
    /// value as it lets go.
    discard: fn(&mut T),
}

/// The turn, held: derefs to the value. Give it back with
/// [`ReadTurn::release`]; dropping it instead gives it back without looking
/// for an event that came meanwhile, which is only right when the
/// connection is closing anyway, or when the reactor is told to read
/// (its `Read` command). Either way, after a [`ReadTurn::close`] the value
/// is discarded first.
#[derive(Debug)]
pub struct ReadGuard<'a, T> {
    turn: &'a ReadTurn<T>,
    value: Option<MutexGuard<'a, T>>,
    announced: bool,
}

impl<T> ReadGuard<'_, T> {
    /// Whether taking the turn consumed a readiness event (`WANTED`): a
    /// holder that then declines to read must hand the reading on (to the
    /// reactor), or the event is lost.
    pub fn announced(&self) -> bool {
        self.announced
    }
}

impl<T> std::ops::Deref for ReadGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.value.as_ref().expect("held until released")
    }
}

impl<T> std::ops::DerefMut for ReadGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.value.as_mut().expect("held until released")
    }
}

impl<T> Drop for ReadGuard<'_, T> {
    fn drop(&mut self) {
        if self.value.take().is_some() {
            self.turn.let_go();
        }
    }
}

impl<T> ReadTurn<T> {
    /// A turn nobody holds, guarding `value`; `discard` empties the value
    /// when the turn is closed ([`close`](Self::close)).
    pub fn new(value: T, discard: fn(&mut T)) -> Self {
        ReadTurn {
            word: AtomicUsize::new(0),
            value: Mutex::new(value),
            discard,
        }
    }

    /// The connection is closing: the value is discarded now if nobody
    /// holds the turn, else by the holder as it lets go. The turn may
    /// still be taken afterwards (and the value is discarded again as it
    /// is let go).
    pub fn close(&self) {
        self.word.fetch_or(CLOSED, Ordering::AcqRel);
        // Its drop discards: CLOSED is set.
        drop(self.try_take());
    }

    /// The reactor heard the socket is readable: the turn, if free. If it
    /// is not, its holder reads again before it lets go.
    pub fn announce(&self) -> Option<ReadGuard<'_, T>> {
        let before = self.word.fetch_or(WANTED, Ordering::AcqRel);
        if before & HELD != 0 {
            return None;
        }
        self.try_take()
    }

    /// The turn, if free, for a thread that will read until the socket
    /// would block.
    pub fn try_take(&self) -> Option<ReadGuard<'_, T>> {
        let mut current = self.word.load(Ordering::Relaxed);
        loop {
            if current & HELD != 0 {
                return None;
            }
            // Taking the turn clears WANTED: what raised it is covered by
            // the reads this holder does from now on.
            match self.word.compare_exchange_weak(
                current,
                HELD | (current & CLOSED),
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(self.guard(current & WANTED != 0)),
                Err(now) => current = now,
            }
        }
    }

    /// Gives the turn back. Returns it again if a readiness event came
    /// while it was held: the holder must then read again (and give it
    /// back again).
    pub fn release<'a>(&'a self, mut guard: ReadGuard<'a, T>) -> Option<ReadGuard<'a, T>> {
        // The value is unlocked before the turn is given back, so the next
        // holder never waits on the mutex (and the emptied guard's drop
        // then does nothing).
        guard.value = None;
        drop(guard);
        match self
            .word
            .compare_exchange(HELD, 0, Ordering::Release, Ordering::Relaxed)
        {
            Ok(_) => None,
            Err(current) if current & CLOSED != 0 => {
                // Closing: no event matters any more.
                self.let_go();
                None
            }
            Err(_) => {
                // HELD | WANTED: keep the turn and take the event on;
                // clearing WANTED acquires every one raised up to now (a
                // CLOSED raised meanwhile stays, for the next letting go).
                self.word.fetch_and(!WANTED, Ordering::AcqRel);
                Some(self.guard(true))
            }
        }
    }

    /// Gives the turn back, its value already unlocked, without looking
    /// for events; if the turn was closed, discards the value first.
    fn let_go(&self) {
        let mut current = self.word.load(Ordering::Relaxed);
        loop {
            if current & CLOSED != 0 {
                // Still held: the lock is this thread's alone.
                (self.discard)(&mut lock(&self.value));
                self.word.fetch_and(!HELD, Ordering::Release);
                return;
            }
            // A close raised before this succeeds makes it fail (and is
            // seen on the next round); one raised after finds the turn
            // free and takes it itself.
            match self.word.compare_exchange_weak(
                current,
                current & !HELD,
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(now) => current = now,
            }
        }
    }

    fn guard(&self, announced: bool) -> ReadGuard<'_, T> {
        ReadGuard {
            turn: self,
            value: Some(lock(&self.value)),
            announced,
        }
    }
}
