//! monte-rpc: high-performance, fully encrypted RPC over TCP.
//!
//! An ephemeral X25519 handshake, a BLAKE2b key schedule and AES-256-GCM
//! frames with counter nonces. The Rust successor of the Go library
//! lithdew/monte, with which its `monte` profile is byte-compatible.
//!
//! ```
//! use monte_rpc::{handler, Client, Config, Server};
//!
//! // A server that answers every request with its body reversed.
//! let server = Server::bind("127.0.0.1:0", Config::server(), handler(|ctx| {
//!     let mut body = ctx.body().to_vec();
//!     body.reverse();
//!     let _ = ctx.reply(&body);
//! }))?;
//!
//! let client = Client::new(server.local_addr(), Config::default())?;
//! let mut response = Vec::new();
//! client.request(b"hello", &mut response)?;
//! assert_eq!(response, b"olleh");
//! client.send(b"written to the socket before this returns")?;
//! client.send_no_wait(b"queued")?;
//!
//! client.shutdown(); // flushes what is queued, joins its threads
//! server.shutdown();
//! # Ok::<(), monte_rpc::Error>(())
//! ```
//!
//! # Layers
//!
//! - [`protocol`]: the sans-IO core (handshake, key schedule, frames,
//!   sequence numbers), pure code over byte buffers.
//! - [`Reactor`]: one edge-triggered mio loop per worker thread, which
//!   moves bytes between sockets and the core. Embed it to run on threads
//!   of your own.
//! - [`Client`], [`Server`], [`Connection`], [`Handler`]: the blocking
//!   public API.
//!
//! The authenticated handshakes and the profiles are re-exported here:
//! [`Profile`], [`PskHandshake`], [`IdentityConfig`].
//!
//! # Blocking, and Unix only
//!
//! Every call blocks its thread until it is done or times out: there is no
//! async API. Handlers run on the library's reactor threads, so a handler
//! that must block hands its work to threads of its own (see [`Handler`]).
//!
//! The crate builds for Unix targets only: it waits on sockets with
//! `poll(2)` through `libc`, works with raw file descriptors
//! (`std::os::fd`) and mio's Unix extensions, and on Linux sets epoll
//! interest itself. It is tested on Linux; other Unix systems take
//! untested fallbacks. Elsewhere the build stops with a `compile_error!`.
#![deny(unsafe_code)]
#![warn(missing_docs)]

#[cfg(not(unix))]
compile_error!(
    "monte-rpc supports Unix targets only: it waits on sockets with poll(2) through libc, \
     and uses raw file descriptors (std::os::fd) and mio's Unix extensions"
);

mod client;
mod clock;
mod config;
mod conn;
mod dial;
mod error;
mod events;
mod handler;
mod outbound;
pub mod protocol;
mod reactor;
mod read_side;
mod server;
mod stats;
// Every cross-thread structure, behind one std/loom facade. Not API: it is
// public only when built with `--cfg loom`, for the models in loom-tests/,
// which check this very code.
#[cfg(loom)]
pub mod sync;
#[cfg(not(loom))]
mod sync;
mod sys;
mod waiting;
mod workers;

pub use client::Client;
pub use config::Config;
pub use conn::Connection;
pub use error::{CallOp, DialPhase, Error, HandshakeError, Result, TimeoutKind};
pub use handler::{handler, Context, Handler, NoHandler};
pub use protocol::{IdentityConfig, Profile, PskHandshake};
pub use reactor::{Reactor, ReactorHandle};
pub use server::Server;
pub use stats::Stats;
pub use waiting::Waiting;
