//! How threads wait for another thread or the peer: spin (stay on the
//! core and poll) for a while, or block at once and be woken.
//!
//! The rule: spinning pays only while another core can make the awaited
//! progress meanwhile. Waking a thread that sleeps costs a futex or epoll
//! wake-up, and on a virtual machine whose idle cores halt, a wake-up
//! across cores costs tens of microseconds: several loopback round trips.
//! A caller that spins on one core while the peer's reply is produced on
//! another skips that cost. But when this process may run on one core only
//! (`taskset -c 0`, a one-CPU container), the thread that would make the
//! progress (the reactor, the peer) needs that very core, and every round
//! of spinning delays it: a waiter then blocks at once and lets the kernel
//! wake it.
//!
//! [`Waiting::Auto`], the default, applies the rule with the cores
//! `std::thread::available_parallelism` reports (the process's CPU
//! affinity and cgroup quota), once per process, and with what spinning
//! threads' yields show: when the cores are held by threads that never
//! yield (other processes' busy loops, or this process's own CPU-bound
//! threads), a yield gives the core away for a whole time slice, and
//! spinning turns off for a second, or longer (up to 8 s) while the cores
//! stay held (see `sync::contention`). With more than one core, and their
//! yields coming back promptly:
//!
//! - a caller waiting for its response spins up to 200 µs (its first
//!   rounds busy, while at most one caller per two cores does, the rest
//!   yielding the core each round so that threads beyond the cores still
//!   run) before it blocks on the socket;
//! - a future awaiting the response of a lone request (none other in
//!   flight on its connection) does the same through its executor for
//!   the same 200 µs: it reads the socket itself at each poll and wakes
//!   its own task, so the executor polls it again at once (running its
//!   other tasks in between) instead of parking its thread, to be woken
//!   across cores by the reactor; its first polls busy while it holds
//!   the same permit as a busy caller, then yielding the core at each;
//!   past the 200 µs it waits for the reactor to wake it. The reactor is
//!   deaf to the socket meanwhile, and takes its readiness back from a
//!   future no longer polled, 1 ms after its last poll, at its next
//!   wake-up (see `ReadSide::lease_to_task`);
//! - a reactor that served requests, or handed responses to futures
//!   (those past their spin window, or with others in flight, whose next
//!   response is its to read), polls back to back for a quarter of that
//!   (50 µs), yielding between polls, before it sleeps in epoll.
//!
//! With one core, or while busy threads hold the cores, callers block at
//! once and a reactor that served requests sleeps in epoll at once. A
//! future awaiting a lone request's response, with one core (and
//! [`Waiting::Auto`]), hands the core over instead of parking at once: it
//! reads the socket at each poll and yields the core, which goes to the
//! thread that will answer (a server on this machine, woken by the
//! request), while each yield takes at least [`HANDED_OVER`] (some other
//! thread ran) and for the spin time at most. Its response then wakes
//! neither the reactor nor the executor's thread: a blocking caller,
//! asleep in `recv`, is woken by the kernel itself, and this is the
//! future's way to the same two thread switches per request. A yield
//! that comes back at once (nobody else wants the core) ends it. Either
//! way (but under
//! [`Waiting::Block`]), a reactor that received only one-way messages
//! sleeps about 20 µs between polls, for a quarter of the spin time and at
//! least 50 µs, instead of sleeping in epoll: that is batching, not
//! spinning (it holds no core while it sleeps), and lets a sender write
//! many messages per reactor wake-up.

use std::time::Duration;

use crate::sync::cores;

/// How threads wait; see the module docs for the rule. Set with
/// [`Config::waiting`](crate::Config::waiting).
///
/// ```
/// use std::time::Duration;
/// use monte_rpc::{Config, Waiting};
///
/// // Never spin: for a machine shared with other busy processes.
/// let config = Config::default().waiting(Waiting::Block);
/// assert_eq!(config.waiting.spin_time(), Duration::ZERO);
/// // Spin up to 1 ms whatever the machine.
/// let config = Config::default().waiting(Waiting::Spin(Duration::from_millis(1)));
/// assert_eq!(config.waiting.spin_time(), Duration::from_millis(1));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Waiting {
    /// Spin for [`Waiting::DEFAULT_SPIN`] if this process may run on more
    /// than one core and no threads that never yield have lately held
    /// them, else block at once. The default.
    #[default]
    Auto,
    /// Spin for up to this long (callers; reactors poll a quarter of it),
    /// whatever the machine.
    Spin(Duration),
    /// Never spin: callers block at once, reactors sleep in epoll (or,
    /// after one-way messages, between polls).
    Block,
}

/// How a future awaiting a lone request's response waits: [`Waiting::future_wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FutureWait {
    /// Its task sleeps until the reactor wakes it.
    Sleep,
    /// It reads the socket itself at each poll and has itself polled again
    /// at once, for up to this long.
    Spin(Duration),
    /// One core: it reads the socket itself at each poll and gives the
    /// core away (to the thread that will answer, on this very core), for
    /// up to this long while each yield hands the core to another thread.
    HandOver(Duration),
}

/// A yield that came back sooner than this found no other thread wanting
/// the core: whoever will answer is not on it (another machine, or not yet
/// woken), and a future handing the core over stops.
pub(crate) const HANDED_OVER: Duration = Duration::from_micros(3);

/// Rounds a waiting caller may spin: bounded by time, not by count.
const UNBOUNDED_ROUNDS: u32 = u32::MAX;

/// How far apart a reactor polls after one-way messages, asleep in between
/// (plus the OS timer slack: 50 µs by default on Linux).
pub(crate) const MESSAGE_POLL_INTERVAL: Duration = Duration::from_micros(20);

/// The shortest time a reactor keeps polling after one-way messages.
const MIN_MESSAGE_POLLING: Duration = Duration::from_micros(50);

impl Waiting {
    /// The spin time [`Waiting::Auto`] uses where spinning pays.
    pub const DEFAULT_SPIN: Duration = Duration::from_micros(200);

    /// How long a waiting caller spins on this machine, as it is loaded
    /// now; zero: it blocks at once.
    pub fn spin_time(self) -> Duration {
        match self {
            Waiting::Auto if cores() > 1 && !crate::sync::contention::contended() => {
                Waiting::DEFAULT_SPIN
            }
            Waiting::Auto | Waiting::Block => Duration::ZERO,
            Waiting::Spin(time) => time,
        }
    }

    /// The spin rounds and time a caller waiting for a response gets.
    pub(crate) fn caller_spin(self) -> (u32, Duration) {
        let time = self.spin_time();
        if time.is_zero() {
            (0, Duration::ZERO)
        } else {
            (UNBOUNDED_ROUNDS, time)
        }
    }

    /// How a future awaiting a lone request's response waits before its
    /// task sleeps (see the module docs).
    pub(crate) fn future_wait(self) -> FutureWait {
        let spin = self.spin_time();
        if !spin.is_zero() {
            return FutureWait::Spin(spin);
        }
        match self {
            Waiting::Auto if cores() == 1 && !crate::sync::contention::contended() => {
                FutureWait::HandOver(Waiting::DEFAULT_SPIN)
            }
            _ => FutureWait::Sleep,
        }
    }

    /// How long a reactor keeps polling after a turn that served requests
    /// or handed responses to futures (back to back, yielding the core
    /// between polls); `None`: it does not.
    pub(crate) fn reactor_after_requests(self) -> Option<Duration> {
        let time = self.spin_time() / 4;
        (!time.is_zero()).then_some(time)
    }

    /// How long a reactor keeps polling, asleep for
    /// [`MESSAGE_POLL_INTERVAL`] between polls, after a turn that received
    /// one-way messages; `None` under [`Waiting::Block`].
    pub(crate) fn reactor_after_messages(self) -> Option<Duration> {
        match self {
            Waiting::Block => None,
            _ => Some((self.spin_time() / 4).max(MIN_MESSAGE_POLLING)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_never_spins_and_spin_always_does() {
        assert_eq!(Waiting::Block.caller_spin(), (0, Duration::ZERO));
        assert_eq!(Waiting::Block.reactor_after_requests(), None);
        assert_eq!(Waiting::Block.reactor_after_messages(), None);
        let spin = Waiting::Spin(Duration::from_micros(400));
        assert_eq!(
            spin.caller_spin(),
            (UNBOUNDED_ROUNDS, Duration::from_micros(400))
        );
        assert_eq!(
            spin.reactor_after_requests(),
            Some(Duration::from_micros(100))
        );
        assert_eq!(
            spin.reactor_after_messages(),
            Some(Duration::from_micros(100))
        );
    }

    #[test]
    fn auto_spins_only_with_more_than_one_core() {
        let spins = cores() > 1;
        assert_eq!(Waiting::Auto.spin_time().is_zero(), !spins);
        assert_eq!(Waiting::Auto.reactor_after_requests().is_some(), spins);
        // Batching after messages holds no core: on either way.
        assert!(Waiting::Auto.reactor_after_messages().unwrap() >= MIN_MESSAGE_POLLING);
    }
}
