//! monte-rpc: high-performance, fully encrypted RPC over TCP.
//!
//! An ephemeral X25519 handshake, a BLAKE2b key schedule and AES-256-GCM
//! frames with counter nonces. The Rust successor of the Go library
//! lithdew/monte, with which its `monte` profile is byte-compatible.
//!
//! The crate is built in layers. [`protocol`] is the sans-IO core: the
//! handshake, key schedule, frame sealing and opening, and frame delimiting,
//! as pure code over byte buffers.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
pub mod protocol;

pub use error::{Error, HandshakeError, Result, TimeoutKind};
