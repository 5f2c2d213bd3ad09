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
//! - [`Client`], [`Server`], [`Connection`], [`Handler`]: the public API,
//!   blocking and async.
//!
//! The authenticated handshakes and the profiles are re-exported here:
//! [`Profile`], [`PskHandshake`], [`IdentityConfig`].
//!
//! # Blocking or async, and Unix only
//!
//! Each call comes in two forms. The blocking one (`request`, `send`,
//! `send_no_wait`) blocks its thread until it is done or times out. The
//! async one (`request_async`, `send_async`, `send_no_wait_async`, and
//! `reply_async` on a [`Connection`]) returns a future that any executor
//! can await (tokio, smol, `futures::executor::block_on`): it runs on the
//! same reactors, never blocks the thread that polls it (a send awaited
//! in its own dialled connection's [`Handler::on_open`] excepted: it
//! writes as the blocking send does), keeps its deadline with no
//! executor timer, allocates nothing per call in steady state, and
//! cancels its call when dropped.
//!
//! ```no_run
//! use monte_rpc::{Client, Config};
//!
//! # async fn run() -> monte_rpc::Result<()> {
//! let client = Client::new("127.0.0.1:4444", Config::default())?;
//! let mut response = Vec::new();
//! client.request_async(b"ping", &mut response).await?;
//! // Many in flight at once, on one task.
//! let (mut a, mut b) = (Vec::new(), Vec::new());
//! let (ra, rb) = futures::join!(
//!     client.request_async(b"one", &mut a),
//!     client.request_async(b"two", &mut b),
//! );
//! ra?;
//! rb?;
//! # Ok(()) }
//! ```
//!
//! Handlers run on the library's reactor threads, so a handler that must
//! block, or await, hands its work to threads or tasks of its own and
//! replies later through its [`Connection`] (see [`Handler`] and
//! `examples/async_server.rs`).
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

mod async_call;
mod async_client;
mod blocking_calls;
mod client;
mod clock;
mod config;
mod conn;
mod conn_socket;
mod descriptors;
mod dial;
mod error;
mod events;
mod handler;
mod opening;
mod outbound;
mod pool;
pub mod protocol;
mod reactor;
mod read_side;
mod server;
mod socket_write;
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

pub use async_call::{RequestFuture, SendFuture};
pub use async_client::ClientFuture;
pub use client::Client;
pub use config::Config;
pub use conn::Connection;
pub use descriptors::reserve_descriptors;
pub use error::{CallOp, DialPhase, Error, HandshakeError, Result, TimeoutKind};
pub use handler::{handler, Context, Handler, NoHandler};
pub use protocol::{IdentityConfig, Profile, PskHandshake};
pub use reactor::{Reactor, ReactorHandle};
pub use server::Server;
pub use stats::Stats;
pub use waiting::Waiting;
