//! Writing to a non-blocking socket: as much as it takes now, or all of
//! it, with the caller's own wait whenever it is full. The outbound queue
//! writes the first way; handshake messages, small and written once, the
//! second (a dial waits within its deadline, a reactor only briefly).

use std::io::{self, Write};

use crate::error::Result;

/// How far a non-blocking write got.
pub(crate) enum WriteOutcome {
    /// Everything was written.
    Done,
    /// The socket is full; the rest must wait.
    Blocked,
    /// The socket failed.
    Failed(io::Error),
}

/// Writes as much of `data` as the socket takes without blocking, and how
/// far that got.
pub(crate) fn write_nonblocking(mut stream: impl Write, data: &[u8]) -> (usize, WriteOutcome) {
    let mut written = 0;
    while written < data.len() {
        match stream.write(&data[written..]) {
            Ok(0) => {
                return (
                    written,
                    WriteOutcome::Failed(io::ErrorKind::WriteZero.into()),
                )
            }
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return (written, WriteOutcome::Blocked)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (written, WriteOutcome::Failed(e)),
        }
    }
    (written, WriteOutcome::Done)
}

/// Writes all of `data`, calling `when_full` each time the socket would
/// block: it waits for room, or fails the write with its error.
pub(crate) fn write_all_nonblocking(
    mut stream: impl Write,
    data: &[u8],
    mut when_full: impl FnMut() -> Result<()>,
) -> Result<()> {
    let mut at = 0;
    loop {
        let (n, outcome) = write_nonblocking(&mut stream, &data[at..]);
        at += n;
        match outcome {
            WriteOutcome::Done => return Ok(()),
            WriteOutcome::Blocked => when_full()?,
            WriteOutcome::Failed(e) => return Err(e.into()),
        }
    }
}

/// How many times [`write_all_briefly`] yields the core for a full socket
/// before it gives up on it.
const BRIEF_WAIT_YIELDS: u32 = 1000;

/// Writes all of a small `data` (handshake output) on a thread that must
/// not block, a reactor's: a full socket gets [`BRIEF_WAIT_YIELDS`] yields
/// of the core to take it, then fails the write as
/// [`io::ErrorKind::WouldBlock`] (a peer that cannot take a few hundred
/// bytes on a fresh connection is treated as dead).
pub(crate) fn write_all_briefly(stream: impl Write, data: &[u8]) -> Result<()> {
    let mut yields = 0;
    write_all_nonblocking(stream, data, || {
        if yields == BRIEF_WAIT_YIELDS {
            return Err(io::Error::from(io::ErrorKind::WouldBlock).into());
        }
        yields += 1;
        std::thread::yield_now();
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    /// A socket that takes `room` bytes per call between full spells.
    struct Chunky {
        room: usize,
        full_every: usize,
        calls: usize,
        got: Vec<u8>,
    }

    impl Write for Chunky {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            self.calls += 1;
            if self.calls % self.full_every == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            if self.calls % 5 == 0 {
                return Err(io::ErrorKind::Interrupted.into());
            }
            let n = data.len().min(self.room);
            self.got.extend_from_slice(&data[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn writes_everything_across_full_spells_and_interruptions() {
        let data: Vec<u8> = (0..100u8).collect();
        let mut socket = Chunky {
            room: 7,
            full_every: 3,
            calls: 0,
            got: Vec::new(),
        };
        let mut waits = 0;
        write_all_nonblocking(&mut socket, &data, || {
            waits += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(socket.got, data);
        assert!(waits > 0);
    }

    #[test]
    fn stops_where_the_socket_fills_and_fails_with_the_waits_error() {
        let mut socket = Chunky {
            room: 4,
            full_every: 2,
            calls: 0,
            got: Vec::new(),
        };
        let (n, outcome) = write_nonblocking(&mut socket, &[1; 10]);
        assert_eq!(n, 4);
        assert!(matches!(outcome, WriteOutcome::Blocked));
        let e = write_all_nonblocking(&mut socket, &[1; 10], || Err(Error::Closed)).unwrap_err();
        assert!(matches!(e, Error::Closed), "{e:?}");
    }

    #[test]
    fn a_socket_that_takes_nothing_fails_with_write_zero() {
        struct Zero;
        impl Write for Zero {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Ok(0)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let e = write_all_nonblocking(Zero, b"hello", || Ok(())).unwrap_err();
        assert!(
            matches!(&e, Error::Io(io) if io.kind() == io::ErrorKind::WriteZero),
            "{e:?}"
        );
    }

    /// A socket that is always full, counting the writes tried.
    struct Full {
        tries: u32,
    }

    impl Write for Full {
        fn write(&mut self, _data: &[u8]) -> io::Result<usize> {
            self.tries += 1;
            Err(io::ErrorKind::WouldBlock.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_brief_write_gives_a_full_socket_a_bounded_number_of_yields() {
        let mut socket = Full { tries: 0 };
        let err = write_all_briefly(&mut socket, &[1; 32]).expect_err("nothing was taken");
        assert!(
            matches!(&err, Error::Io(e) if e.kind() == io::ErrorKind::WouldBlock),
            "{err:?}"
        );
        // One try, then one more after each yield.
        assert_eq!(socket.tries, BRIEF_WAIT_YIELDS + 1);

        // A socket that takes the bytes after a few full spells succeeds.
        let mut socket = Chunky {
            room: 3,
            full_every: 2,
            calls: 0,
            got: Vec::new(),
        };
        write_all_briefly(&mut socket, &[9; 32]).unwrap();
        assert_eq!(socket.got, [9; 32]);
    }
}
