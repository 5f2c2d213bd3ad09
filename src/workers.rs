//! A set of reactor threads owned by a [`Client`](crate::Client) or
//! [`Server`](crate::Server): spawned together, chosen by load (a
//! client's dials, a server's connections) or round-robin (an async call's
//! timers), stopped and joined together.

use std::thread::{JoinHandle, ThreadId};

use crate::config::Config;
use crate::conn::ReactorId;
use crate::error::{thread_start_error, Result};
use crate::reactor::{current_reactor, Reactor, ReactorHandle};
use crate::sync::{lock, AtomicUsize, Mutex, Ordering};

pub(crate) struct Workers {
    handles: Vec<ReactorHandle>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// The reactors' threads, to know one of them from the outside
    /// (a handler, or a reactor's drop) without the lock.
    ids: Vec<ThreadId>,
    next: AtomicUsize,
}

impl Workers {
    /// Makes `config.worker_count()` reactors, each on a thread named
    /// `{name}-{i}`. If one cannot be made (out of descriptors, say), the
    /// ones already running are stopped and joined before the error
    /// returns: nothing else could stop them.
    pub(crate) fn spawn(config: &Config, name: &str) -> Result<Workers> {
        let mut workers = Workers {
            handles: Vec::new(),
            threads: Mutex::new(Vec::new()),
            ids: Vec::new(),
            next: AtomicUsize::new(0),
        };
        for i in 0..config.worker_count() {
            if let Err(e) = workers.spawn_one(config, name, i) {
                workers.stop_and_join();
                return Err(e);
            }
        }
        Ok(workers)
    }

    fn spawn_one(&mut self, config: &Config, name: &str, i: usize) -> Result<()> {
        let reactor = Reactor::new(config.clone())?;
        let handle = reactor.handle();
        let name = format!("{name}-{i}");
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                // An I/O error of the poller itself ends the loop; its
                // connections are closed by the reactor's drop.
                let _ = reactor.run();
            })
            .map_err(|e| thread_start_error(&name, e))?;
        self.handles.push(handle);
        self.ids.push(thread.thread().id());
        lock(&self.threads).push(thread);
        Ok(())
    }

    /// The next reactor, round-robin: for an async call's timers, and a
    /// dial's when no reactor runs.
    pub(crate) fn pick(&self) -> &ReactorHandle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        &self.handles[i]
    }

    /// Every reactor, in order.
    pub(crate) fn handles(&self) -> &[ReactorHandle] {
        &self.handles
    }

    /// The running reactor with the fewest connections (the first of
    /// those). If `here`, the one running on this thread wins a tie (a
    /// reactor that accepted the connection keeps it as long as it holds
    /// no more than the others, and it costs no hop to another thread);
    /// else that one is taken only if no other runs (a client's handler
    /// that dials: its own reactor could not read its blocking call's
    /// response). A handful of long-lived connections opened one after
    /// another spread over the reactors this way.
    pub(crate) fn least_loaded(&self, here: bool) -> Option<&ReactorHandle> {
        let running = self.handles.iter().filter(|h| !h.is_stopped());
        if here {
            running.min_by_key(|h| (h.connections(), !h.driver().is_current()))
        } else {
            self.least_loaded_but(current_reactor())
        }
    }

    /// The running reactor with the fewest connections, `avoid` last (a
    /// connection a call from its thread could not wait on).
    pub(crate) fn least_loaded_but(&self, avoid: ReactorId) -> Option<&ReactorHandle> {
        self.handles
            .iter()
            .filter(|h| !h.is_stopped())
            .min_by_key(|h| (h.driver().reactor_id() == avoid, h.connections()))
    }

    /// Adds every reactor's counters into `into`.
    pub(crate) fn add_stats(&self, into: &mut crate::stats::Stats) {
        for h in &self.handles {
            h.add_stats(into);
        }
    }

    /// Stops every reactor gracefully and joins its thread. A second
    /// caller meanwhile waits for those joins (it would otherwise return
    /// before the reactors have drained). Called on one of these reactors
    /// (a handler shutting down its owner), it cannot join its own thread,
    /// nor wait for a caller that may be joining it: it joins the others
    /// if no one else is, and keeps its own for the next call to join
    /// (the owner's shutdown or drop); that reactor stops once the
    /// handler returns. (If the owner is dropped on that very thread, its
    /// handle goes with it: the thread ends on its own, detached.)
    pub(crate) fn stop_and_join(&self) {
        for h in &self.handles {
            h.stop();
        }
        let me = std::thread::current().id();
        if !self.ids.contains(&me) {
            let mut threads = lock(&self.threads);
            for t in threads.drain(..) {
                let _ = t.join();
            }
            return;
        }
        let Ok(mut threads) = self.threads.try_lock() else {
            // Another thread is joining them, this one's included.
            return;
        };
        let own = threads.iter().position(|t| t.thread().id() == me);
        let own = own.map(|i| threads.swap_remove(i));
        for t in threads.drain(..) {
            let _ = t.join();
        }
        threads.extend(own);
    }
}
