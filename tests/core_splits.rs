//! The connection core yields the same frames however its input is split
//! into reads: a property test over random frames and random read sizes,
//! driving the runtime's own core (`protocol::connection`) as the reactor
//! does (frames first, then the next read).

use std::io::{self, Read};

use monte_rpc::protocol::connection::{
    ConnCore, Deadlines, Filled, Limits, Next, ReadPhase, Taker, Unpooled,
};
use monte_rpc::protocol::{Opener, Profile, Role, Sealer};
use proptest::prelude::*;

const KEY: [u8; 32] = [0x17; 32];
const MAX_MESSAGE: usize = 4096;

/// Hands out the input in reads of the given sizes (cycling), then would
/// block.
struct Reads<'a> {
    data: &'a [u8],
    sizes: &'a [usize],
    at: usize,
}

impl Read for Reads<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.data.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let size = self.sizes[self.at % self.sizes.len()];
        self.at += 1;
        let n = size.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// Every frame the core opens from `wire` read in `sizes`, in order, and
/// the frames it counted.
fn frames(wire: &[u8], sizes: &[usize], buffer: usize) -> (Vec<(u32, Vec<u8>)>, u64) {
    let phase = ReadPhase::Open {
        opener: Opener::new(KEY, Profile::Secure),
    };
    let limits = Limits {
        buffer_size: buffer,
        max_message_size: MAX_MESSAGE,
        deadlines: Deadlines::default(),
    };
    let mut core = ConnCore::new(phase, Role::Client, limits, &[], 0);
    let mut source = Reads {
        data: wire,
        sizes,
        at: 0,
    };
    let mut out = Vec::new();
    loop {
        while let Next::Message { seq, len } | Next::Response { seq, len } =
            core.next_frame(0, Taker::Reactor).unwrap()
        {
            out.push((seq, core.payload(len).to_vec()));
            core.consume(len);
        }
        match core.fill(&mut source, 0, &Unpooled).unwrap() {
            Filled::Bytes { .. } => {}
            Filled::WouldBlock => break,
            Filled::Eof => unreachable!("the source never ends"),
        }
    }
    assert_eq!(core.buffered(), 0, "a whole frame was left unread");
    (out, core.take_counts().0)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_split_yields_the_same_frames(
        bodies in prop::collection::vec(
            (any::<u32>(), prop::collection::vec(any::<u8>(), 0..MAX_MESSAGE)),
            1..12,
        ),
        sizes in prop::collection::vec(1usize..9000, 1..8),
        buffer in 64usize..20_000,
    ) {
        let mut sealer = Sealer::new(KEY, Profile::Secure);
        let mut wire = Vec::new();
        for (seq, body) in &bodies {
            sealer.seal_append(*seq, body, &mut wire).unwrap();
        }
        let expected: Vec<(u32, Vec<u8>)> = bodies.clone();
        let (whole, counted) = frames(&wire, &[wire.len()], 1 << 16);
        prop_assert_eq!(&whole, &expected);
        prop_assert_eq!(counted, bodies.len() as u64);
        let (split, counted) = frames(&wire, &sizes, buffer);
        prop_assert_eq!(&split, &expected);
        prop_assert_eq!(counted, bodies.len() as u64);
    }
}
