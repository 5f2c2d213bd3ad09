//! The blocking calls this thread is inside, by client: a client's
//! shutdown made from within one of its own calls (a dialled connection's
//! `on_open` runs on the dialling caller's thread) must not wait for that
//! call, which cannot go on until the shutdown returns.
//!
//! A blocking call stays on its thread from start to end, so a
//! thread-local list is exact for it (an async call's may move between
//! threads, and is not listed). The list is a few fixed places, so that
//! a call allocates nothing; calls nested deeper than that are not
//! listed, and a shutdown within them waits out its grace as before.

use std::cell::Cell;

use crate::sync::signal::{CallGuard, ShutdownSignal};

/// How deep this thread's blocking calls are listed.
const LISTED: usize = 4;

thread_local! {
    /// The signals (by address) of the clients whose blocking calls this
    /// thread is inside, innermost last, and how many there are.
    static INSIDE: Cell<([usize; LISTED], usize)> = const { Cell::new(([0; LISTED], 0)) };
}

/// A blocking call inside `signal`'s client, listed on this thread until
/// dropped.
pub(crate) struct BlockingCall<'a> {
    _guard: CallGuard<'a>,
    listed: bool,
}

/// Enters a blocking call on `signal`'s client (`None`: it is shutting
/// down), listing it on this thread.
pub(crate) fn enter(signal: &ShutdownSignal) -> Option<BlockingCall<'_>> {
    let guard = signal.enter()?;
    let listed = INSIDE
        .try_with(|inside| {
            let (mut keys, n) = inside.get();
            if n == LISTED {
                return false;
            }
            keys[n] = key(signal);
            inside.set((keys, n + 1));
            true
        })
        .unwrap_or(false);
    Some(BlockingCall {
        _guard: guard,
        listed,
    })
}

impl Drop for BlockingCall<'_> {
    fn drop(&mut self) {
        if self.listed {
            // Calls end innermost first: this one is the last listed.
            let _ = INSIDE.try_with(|inside| {
                let (keys, n) = inside.get();
                inside.set((keys, n.saturating_sub(1)));
            });
        }
    }
}

/// How many of `signal`'s client's calls this thread is inside.
pub(crate) fn here(signal: &ShutdownSignal) -> usize {
    INSIDE
        .try_with(|inside| {
            let (keys, n) = inside.get();
            keys[..n].iter().filter(|&&k| k == key(signal)).count()
        })
        .unwrap_or(0)
}

fn key(signal: &ShutdownSignal) -> usize {
    signal as *const ShutdownSignal as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_counted_by_client_and_thread() {
        let (a, b) = (ShutdownSignal::new(), ShutdownSignal::new());
        let outer = enter(&a).unwrap();
        let inner = enter(&b).unwrap();
        let again = enter(&a).unwrap();
        assert_eq!((here(&a), here(&b)), (2, 1));
        std::thread::scope(|s| {
            s.spawn(|| assert_eq!(here(&a), 0, "another thread's calls"));
        });
        drop(again);
        drop(inner);
        assert_eq!((here(&a), here(&b)), (1, 0));
        drop(outer);
        assert_eq!(here(&a), 0);
        // Deeper than the list: still a call, just not listed.
        let deep: Vec<_> = (0..LISTED + 2).map(|_| enter(&a).unwrap()).collect();
        assert_eq!(here(&a), LISTED);
        assert_eq!(a.calls_inside(), LISTED + 2);
        drop(deep);
        assert_eq!(here(&a), 0);
        a.close();
        assert!(enter(&a).is_none(), "entered a closed client");
        assert_eq!(here(&a), 0);
    }
}
