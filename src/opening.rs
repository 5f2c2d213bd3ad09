//! The connection whose `on_open` runs on this thread, so that a call its
//! client makes from there can use it.
//!
//! A dialled connection's `Handler::on_open` runs on the thread that
//! dialled it (a blocking caller's, or the pool's dial thread), before the
//! connection joins its client's pool: nothing else may use it before
//! `on_open` has run. The pool's dial is that very thread's meanwhile, so
//! a call on the client from `on_open` that found no connection would
//! wait for the dial, its own, until its deadline (or for ever, with
//! none). The pool asks this module first.

use std::cell::RefCell;

use crate::conn::Connection;

thread_local! {
    static OPENING: RefCell<Option<Connection>> = const { RefCell::new(None) };
}

/// Marks `conn` as the one whose `on_open` this thread runs, until
/// dropped (which restores whatever was marked before: an `on_open` may
/// dial another client's connection).
pub(crate) struct Opening {
    before: Option<Connection>,
}

impl Opening {
    pub(crate) fn enter(conn: &Connection) -> Opening {
        let before = OPENING.with(|o| o.replace(Some(conn.clone())));
        Opening { before }
    }
}

impl Drop for Opening {
    fn drop(&mut self) {
        let before = self.before.take();
        // Not during the thread's teardown (the slot may be gone then).
        let _ = OPENING.try_with(|o| *o.borrow_mut() = before);
    }
}

/// The connection whose `on_open` this thread runs, if `belongs` says it
/// is the asker's.
pub(crate) fn opening_on_this_thread(belongs: impl Fn(&Connection) -> bool) -> Option<Connection> {
    OPENING
        .try_with(|o| o.borrow().as_ref().filter(|c| belongs(c)).cloned())
        .ok()
        .flatten()
}
