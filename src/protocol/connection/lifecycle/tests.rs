//! The reactor's half of a connection on its own: phases, graceful close,
//! the outbound budget and the timers, with the time passed in.

use super::*;

const MS: u64 = 1_000_000;
const DRAIN: Duration = Duration::from_secs(5);

fn limits() -> LifeLimits {
    LifeLimits {
        max_queued: 1000,
        write: Some(Duration::from_millis(100)),
        drain: DRAIN,
        idle_release: Duration::from_secs(1),
    }
}

fn life(handshaking: bool) -> Lifecycle {
    Lifecycle::new(handshaking, limits(), 0)
}

fn seen(written: u64, pending: bool, last_read: u64) -> Progress {
    Progress {
        written,
        pending,
        last_read,
    }
}

#[test]
fn an_authenticated_handshake_confirms_before_it_opens() {
    let mut life = life(true);
    assert_eq!(life.phase(), Phase::Handshaking);
    life.awaiting_proof();
    assert_eq!(life.phase(), Phase::Confirming);
    assert!(life.is_handshaking());
    // The peer's end while confirming fails the handshake too.
    assert!(matches!(
        life.peer_finished(0),
        Err(Error::Handshake(HandshakeError::PeerClosed))
    ));
    life.opened();
    assert_eq!(life.phase(), Phase::Open);
    // Once open, a late call changes nothing.
    life.awaiting_proof();
    assert_eq!(life.phase(), Phase::Open);
}

#[test]
fn the_peers_end_during_the_handshake_fails_it() {
    let mut life = life(true);
    assert_eq!(life.phase(), Phase::Handshaking);
    assert!(matches!(
        life.peer_finished(0),
        Err(Error::Handshake(HandshakeError::PeerClosed))
    ));
}

#[test]
fn the_peers_end_drains_then_closes_once_output_is_written() {
    let mut life = life(true);
    life.opened();
    assert_eq!(life.phase(), Phase::Open);
    assert!(life.peer_finished(0).unwrap());
    assert!(!life.peer_finished(0).unwrap(), "news only once");
    assert_eq!(life.phase(), Phase::Draining);
    assert!(life.silence_is_ours());
    // Output still queued: nothing yet.
    let step = life.advance(|| Sealed::Pending);
    assert!(!step.shut_write && step.close.is_none(), "{step:?}");
    // Written: shut the write side and close, the peer's end came.
    let step = life.advance(|| Sealed::Drained);
    assert!(step.shut_write);
    assert!(matches!(step.close, Some(Error::PeerClosed)));
}

// A write the peer cut short fails the output; if the graceful close
// (the peer's end read meanwhile) gets there before the failure's own
// close, it closes with the failure, not as an orderly end, and does not
// shut a write side that already failed.
#[test]
fn a_graceful_close_over_failed_output_closes_with_the_failure() {
    let mut life = life(true);
    life.opened();
    assert!(life.peer_finished(0).unwrap());
    let reset = Error::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
    let step = life.advance(|| Sealed::Failed(reset));
    assert!(!step.shut_write, "{step:?}");
    assert!(
        matches!(&step.close, Some(Error::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{step:?}"
    );
}

#[test]
fn a_graceful_close_ends_at_its_deadline() {
    let mut life = life(false);
    assert!(life.peer_finished(10 * MS).unwrap());
    let drain = DRAIN.as_nanos() as u64;
    let t = life.handle_timeout(10 * MS + drain - 1, seen(0, false, 0));
    assert!(t.close.is_none(), "{t:?}");
    let t = life.handle_timeout(10 * MS + drain, seen(0, false, 0));
    assert!(matches!(t.close, Some(Error::Closed)), "{t:?}");
}

#[test]
fn a_local_close_waits_for_the_peers_end_after_shutting_its_own() {
    let mut life = life(false);
    life.close_locally(0);
    let step = life.advance(|| Sealed::Drained);
    assert!(step.shut_write && step.close.is_none(), "{step:?}");
    // The write side is shut once; the seal-off is not asked again.
    let step = life.advance(|| panic!("asked again"));
    assert!(step.close.is_none(), "{step:?}");
    // The peer's end does not extend the local deadline.
    assert!(life.peer_finished(4 * 1000 * MS).unwrap());
    let step = life.advance(|| panic!("asked again"));
    assert!(!step.shut_write);
    assert!(matches!(step.close, Some(Error::Closed)));
    let t = life.handle_timeout(DRAIN.as_nanos() as u64, seen(0, false, 0));
    assert!(matches!(t.close, Some(Error::Closed)), "{t:?}");
}

#[test]
fn a_connection_that_never_opened_closes_as_soon_as_it_is_flushed() {
    let mut life = life(true);
    life.close_locally(0);
    let step = life.advance(|| Sealed::Drained);
    assert!(step.shut_write);
    assert!(matches!(step.close, Some(Error::Closed)));
}

#[test]
fn an_open_connection_is_not_draining() {
    let mut life = life(false);
    let step = life.advance(|| panic!("not closing"));
    assert!(!step.shut_write && step.close.is_none(), "{step:?}");
    assert!(!life.silence_is_ours());
}

#[test]
fn replies_past_the_budget_stop_dispatch() {
    let life = life(false);
    assert!(life.within_budget(0));
    assert!(life.within_budget(1000));
    assert!(!life.within_budget(1001));
    assert_eq!(life.hand_back_past(), 1000);
}

#[test]
fn reading_pauses_past_the_budget_and_resumes_once_drained() {
    let mut life = life(false);
    // Blocked within the budget: nothing changes.
    assert_eq!(
        life.after_flush(Output::Blocked { queued: 1000 }),
        ReadGate::Unchanged
    );
    assert!(!life.read_paused());
    // Past it: pause, once.
    assert_eq!(
        life.after_flush(Output::Blocked { queued: 1001 }),
        ReadGate::Paused
    );
    assert!(life.read_paused() && life.silence_is_ours());
    assert_eq!(
        life.after_flush(Output::Writing { queued: 5000 }),
        ReadGate::Unchanged
    );
    // Partly written but still blocked: stays paused.
    assert_eq!(
        life.after_flush(Output::Blocked { queued: 10 }),
        ReadGate::Unchanged
    );
    assert!(life.read_paused());
    // Drained: resume, said once.
    assert_eq!(life.after_flush(Output::Drained), ReadGate::Resumed);
    assert!(!life.read_paused());
    assert_eq!(life.after_flush(Output::Drained), ReadGate::Unchanged);
}

#[test]
fn another_writer_past_the_budget_pauses_reading_until_it_hands_back() {
    let mut life = life(false);
    assert_eq!(
        life.after_flush(Output::Writing { queued: 2000 }),
        ReadGate::Paused
    );
    // The writer finished below the budget and handed the queue back.
    assert_eq!(
        life.after_flush(Output::Writing { queued: 10 }),
        ReadGate::Resumed
    );
}

#[test]
fn output_that_makes_no_progress_times_out() {
    let mut life = life(false);
    // Pending from 0; progress at 60 ms restarts the watch.
    assert!(life.handle_timeout(0, seen(0, true, 0)).close.is_none());
    assert!(life
        .handle_timeout(60 * MS, seen(10, true, 0))
        .close
        .is_none());
    assert!(life
        .handle_timeout(159 * MS, seen(10, true, 0))
        .close
        .is_none());
    let t = life.handle_timeout(160 * MS, seen(10, true, 0));
    assert!(
        matches!(t.close, Some(Error::Timeout(TimeoutKind::Write))),
        "{t:?}"
    );
}

#[test]
fn nothing_pending_is_never_a_write_timeout() {
    let mut life = life(false);
    for t in 0..10 {
        let out = life.handle_timeout(t * 1000 * MS, seen(0, false, 0));
        assert!(out.close.is_none(), "{out:?}");
    }
}

#[test]
fn no_write_timeout_waits_forever() {
    let mut life = Lifecycle::new(
        false,
        LifeLimits {
            write: None,
            ..limits()
        },
        0,
    );
    let out = life.handle_timeout(u64::MAX / 2, seen(0, true, 0));
    assert!(out.close.is_none(), "{out:?}");
}

#[test]
fn an_idle_connection_gives_its_buffers_back_once_per_idle_spell() {
    let mut life = life(false);
    let second = 1000 * MS;
    assert!(
        !life
            .handle_timeout(second - 1, seen(0, false, 0))
            .release_buffers
    );
    assert!(
        life.handle_timeout(second, seen(0, false, 0))
            .release_buffers
    );
    assert!(
        !life
            .handle_timeout(3 * second, seen(0, false, 0))
            .release_buffers
    );
    // Bytes arrive at 4 s: active again, so a new idle spell begins.
    assert!(
        !life
            .handle_timeout(4 * second, seen(0, false, 4 * second))
            .release_buffers
    );
    assert!(
        !life
            .handle_timeout(5 * second - 1, seen(0, false, 4 * second))
            .release_buffers
    );
    assert!(
        life.handle_timeout(5 * second, seen(0, false, 4 * second))
            .release_buffers
    );
    // Writing counts as activity too.
    assert!(
        !life
            .handle_timeout(9 * second, seen(7, false, 4 * second))
            .release_buffers
    );
}

/// A drain time too long for nanoseconds in a u64 lasts forever, not
/// wraps to zero and ends the close at once.
#[test]
fn a_drain_time_past_u64_nanoseconds_never_ends_the_close() {
    let mut life = Lifecycle::new(
        false,
        LifeLimits {
            drain: Duration::from_secs(1 << 55),
            ..limits()
        },
        0,
    );
    life.close_locally(10 * MS);
    let t = life.handle_timeout(20 * MS, seen(0, false, 0));
    assert!(t.close.is_none(), "{t:?}");
}
