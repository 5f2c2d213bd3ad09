//! The connections whose `on_open` runs on this thread, so that a call
//! their client makes from there can use them.
//!
//! A dialled connection's `Handler::on_open` runs on the thread that
//! dialled it (a blocking caller's, or the pool's dial thread), before the
//! connection joins its client's pool and its reactor takes it: nothing
//! else may use it before `on_open` has run. The pool's dial is that very
//! thread's meanwhile, so a call on the client from `on_open` that found
//! no connection would wait for the dial, its own, until its deadline (or
//! for ever, with none). The pool asks this module first: a blocking call
//! or an async send uses the connection being opened; an async request,
//! whose response only the reactor would read, takes a busy connection of
//! the pool's or is refused at once. The mark stays until the dial
//! returns, so that an `on_close` run there (the connection closed in
//! `on_open`) finds it too.

use std::cell::RefCell;

use crate::conn::Connection;

thread_local! {
    /// A stack: an `on_open` may dial another client's connection.
    static OPENING: RefCell<Vec<Connection>> = const { RefCell::new(Vec::new()) };
}

/// Marks `conn` as one whose `on_open` this thread runs, until dropped.
pub(crate) struct Opening(());

impl Opening {
    pub(crate) fn enter(conn: &Connection) -> Opening {
        OPENING.with(|o| o.borrow_mut().push(conn.clone()));
        Opening(())
    }
}

impl Drop for Opening {
    fn drop(&mut self) {
        // Not during the thread's teardown (the slot may be gone then).
        let _ = OPENING.try_with(|o| o.borrow_mut().pop());
    }
}

/// A connection whose `on_open` this thread runs that `belongs` says is
/// the asker's.
pub(crate) fn opening_on_this_thread(belongs: impl Fn(&Connection) -> bool) -> Option<Connection> {
    OPENING
        .try_with(|o| o.borrow().iter().rev().find(|c| belongs(c)).cloned())
        .ok()
        .flatten()
}
