//! Sequence numbers: which requests are ours, and how a request number
//! names its completion slot.
//!
//! A request number packs a slot index and a generation, and its low bit
//! says which side issued it (odd: client, even: server). The slot index
//! finds the waiting request in O(1); the generation tells a response to the
//! current request in that slot from a late one to an earlier request. The
//! generation never takes the value 0, so no request number is ever 0, and
//! a slot's number is unique for as long as the slot is held, so a number
//! still awaiting its response is never issued again, across any wrap.

use super::handshake::Role;
use crate::error::{Error, Result};

/// The most slots a [`SeqSpace`] supports (2^16), which leaves 15 bits of
/// generation.
pub const MAX_SLOTS: usize = 1 << 16;

/// The layout of one side's request numbers.
///
/// ```
/// use monte_rpc::protocol::{wire::SeqSpace, Role};
/// let client = SeqSpace::new(Role::Client, 64);
/// let seq = client.encode(5, 3);
/// assert_eq!(seq % 2, 1);
/// assert_eq!(client.decode(seq), Some((5, 3)));
/// assert_eq!(client.decode(0), None);
/// assert_eq!(SeqSpace::new(Role::Server, 64).encode(0, 1) % 2, 0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqSpace {
    parity: u32,
    slot_bits: u32,
}

impl SeqSpace {
    /// The request numbers a `role` issues, with room for `slots` requests
    /// in flight (rounded up to a power of two, at most [`MAX_SLOTS`]).
    pub fn new(role: Role, slots: usize) -> Self {
        let slots = slots.clamp(1, MAX_SLOTS).next_power_of_two();
        SeqSpace {
            parity: match role {
                Role::Client => 1,
                Role::Server => 0,
            },
            slot_bits: slots.trailing_zeros(),
        }
    }

    /// How many slots this space addresses.
    pub fn slots(&self) -> usize {
        1 << self.slot_bits
    }

    /// The largest generation; generations run from 1 to this and wrap.
    pub fn max_generation(&self) -> u32 {
        (1u32 << (31 - self.slot_bits)) - 1
    }

    /// The generation after `generation`, skipping 0.
    pub fn next_generation(&self, generation: u32) -> u32 {
        if generation >= self.max_generation() {
            1
        } else {
            generation + 1
        }
    }

    /// The request number for `slot` at `generation` (`1..=max_generation`).
    pub fn encode(&self, slot: usize, generation: u32) -> u32 {
        debug_assert!(slot < self.slots());
        debug_assert!((1..=self.max_generation()).contains(&generation));
        let x = (generation << self.slot_bits) | slot as u32;
        (x << 1) | self.parity
    }

    /// Whether `seq` is a request number this side issues, so that a frame
    /// carrying it is a response to us rather than a request from the peer.
    pub fn is_ours(&self, seq: u32) -> bool {
        seq != 0 && seq & 1 == self.parity
    }

    /// The slot and generation `seq` names, if it is one of ours.
    pub fn decode(&self, seq: u32) -> Option<(usize, u32)> {
        if !self.is_ours(seq) {
            return None;
        }
        let x = seq >> 1;
        let generation = x >> self.slot_bits;
        if generation == 0 {
            return None;
        }
        Some(((x & ((1 << self.slot_bits) - 1)) as usize, generation))
    }
}

/// A single-threaded allocator of request numbers over a [`SeqSpace`].
///
/// The runtime's lock-free completion table follows the same rules; this
/// one serves single-threaded drivers and states the rules in plain code.
///
/// ```
/// use monte_rpc::protocol::{wire::SeqAllocator, Role};
/// let mut seqs = SeqAllocator::new(Role::Server, 2);
/// let a = seqs.alloc().unwrap();
/// let b = seqs.alloc().unwrap();
/// assert!(seqs.alloc().is_err()); // both in use
/// assert!(seqs.release(a));
/// assert_ne!(seqs.alloc().unwrap(), a); // a new generation
/// # let _ = b;
/// ```
#[derive(Debug, Clone)]
pub struct SeqAllocator {
    space: SeqSpace,
    /// The generation each slot will use (or is using, if in use).
    generations: Vec<u32>,
    in_use: Vec<bool>,
    free: Vec<usize>,
}

impl SeqAllocator {
    /// An allocator for `role` with `slots` requests in flight at most.
    pub fn new(role: Role, slots: usize) -> Self {
        let space = SeqSpace::new(role, slots);
        let n = space.slots();
        SeqAllocator {
            space,
            generations: vec![1; n],
            in_use: vec![false; n],
            free: (0..n).rev().collect(),
        }
    }

    /// The layout this allocator issues numbers in.
    pub fn space(&self) -> SeqSpace {
        self.space
    }

    /// A request number not in use; [`Error::SequenceExhausted`] when every
    /// slot is held.
    pub fn alloc(&mut self) -> Result<u32> {
        let slot = self.free.pop().ok_or(Error::SequenceExhausted)?;
        self.in_use[slot] = true;
        Ok(self.space.encode(slot, self.generations[slot]))
    }

    /// Whether `seq` is in use, i.e. a response carrying it is expected.
    pub fn is_pending(&self, seq: u32) -> bool {
        match self.space.decode(seq) {
            Some((slot, generation)) => self.in_use[slot] && self.generations[slot] == generation,
            None => false,
        }
    }

    /// Frees `seq` (its response arrived, or it was abandoned). Returns
    /// `false`, changing nothing, if `seq` was not in use.
    pub fn release(&mut self, seq: u32) -> bool {
        if !self.is_pending(seq) {
            return false;
        }
        let (slot, generation) = self.space.decode(seq).expect("pending implies ours");
        self.in_use[slot] = false;
        self.generations[slot] = self.space.next_generation(generation);
        self.free.push(slot);
        true
    }
}
