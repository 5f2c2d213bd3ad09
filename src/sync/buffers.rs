//! Buffers a reactor lends its connections: a connection borrows a receive
//! buffer while it holds unread bytes and its output buffers while it
//! sends, and gives them back when they are empty, so a connection that
//! wakes after idling takes a buffer another one returned instead of
//! allocating, and an idle connection holds none.
//!
//! Shared by the reactor thread and the callers that read or write its
//! connections; a buffer crosses threads whole, under one short lock.

use super::{lock, Mutex};
use crate::protocol::connection::Buffers;

/// A pool of buffers of one size class; see the module docs.
#[derive(Debug)]
pub struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
    /// The capacity a buffer must have to come back.
    size: usize,
    /// The most buffers kept; more are freed.
    keep: usize,
}

impl BufferPool {
    /// A pool for buffers of `size` bytes that keeps at most `keep` of
    /// them (its list is sized up front: giving back never allocates).
    pub fn new(size: usize, keep: usize) -> Self {
        BufferPool {
            free: Mutex::new(Vec::with_capacity(keep)),
            size,
            keep,
        }
    }

    /// Buffers kept now.
    #[cfg(test)]
    fn kept(&self) -> usize {
        lock(&self.free).len()
    }
}

impl Buffers for BufferPool {
    fn take(&self) -> Option<Vec<u8>> {
        lock(&self.free).pop()
    }

    fn give(&self, buf: Vec<u8>) {
        // Only the size class comes back: a buffer grown for a large frame
        // would make the pool hold that much per entry.
        if buf.capacity() < self.size || buf.capacity() > 2 * self.size {
            return;
        }
        let mut free = lock(&self.free);
        if free.len() < self.keep {
            free.push(buf);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn lends_back_what_it_was_given_and_keeps_a_bounded_number() {
        let pool = BufferPool::new(1024, 2);
        assert!(pool.take().is_none());
        pool.give(vec![7; 1024]);
        pool.give(Vec::with_capacity(1500));
        pool.give(vec![0; 1024]); // over `keep`: freed
        assert_eq!(pool.kept(), 2);
        let a = pool.take().unwrap();
        assert!(a.capacity() >= 1024);
        pool.give(a);
        assert_eq!(pool.kept(), 2);
    }

    #[test]
    fn refuses_buffers_outside_its_size_class() {
        let pool = BufferPool::new(1024, 8);
        pool.give(Vec::with_capacity(100));
        pool.give(vec![0; 1 << 20]);
        assert_eq!(pool.kept(), 0);
    }
}
