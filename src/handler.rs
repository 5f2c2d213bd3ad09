//! What the application plugs in: a [`Handler`] called on the reactor thread
//! for every incoming message, with a [`Context`] to read it and reply.

use std::net::SocketAddr;

use crate::conn::Connection;
use crate::error::{CallOp, Error, Result};

/// Handles messages and requests that arrive from the peer, and hears about
/// connections opening and closing. Called on a reactor thread: a handler
/// that must block should hand its work to its own threads and answer later
/// with [`Connection::reply`], and one that must await hands it to a task
/// that answers with [`Connection::reply_async`]:
///
/// ```no_run
/// use monte_rpc::{Config, Context, Server};
///
/// let runtime = tokio::runtime::Runtime::new()?;
/// let tasks = runtime.handle().clone();
/// let server = Server::bind("127.0.0.1:0", Config::server(), move |ctx: &mut Context<'_>| {
///     let (conn, seq, body) = (ctx.conn().clone(), ctx.seq(), ctx.body().to_vec());
///     tasks.spawn(async move {
///         // ... await whatever the answer needs ...
///         let _ = conn.reply_async(seq, &body).await;
///     });
/// })?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
///
/// Closures `Fn(&mut Context)` are handlers too. Passed straight to a
/// function that takes `impl Handler`, such a closure needs its argument's
/// type written out (see [`handler`] for why, and for a way around it):
///
/// ```
/// use monte_rpc::{Context, Handler};
/// fn takes(_: impl Handler) {}
/// takes(|ctx: &mut Context<'_>| {
///     let mut reversed = ctx.body().to_vec();
///     reversed.reverse();
///     let _ = ctx.reply(&reversed);
/// });
/// ```
pub trait Handler: Send + Sync + 'static {
    /// A message arrived. If [`Context::expects_reply`], the peer waits for
    /// a [`Context::reply`] (now, or later through the connection handle).
    fn on_message(&self, ctx: &mut Context<'_>);

    /// A connection finished its handshake and is open. It runs before
    /// anything else may use the connection: on a server, on the
    /// connection's reactor; on a client, on the thread that dialled it
    /// (the calling thread, or the pool's dial thread for an async call),
    /// before its reactor takes it. There, blocking calls on that client
    /// (and async sends) use this connection, while an async request takes
    /// another, busy connection of the pool's or fails with
    /// [`Error::AsyncRequestInOnOpen`] (as one on this connection does). If
    /// the connection closes during `on_open`, `on_close` follows at once
    /// and the dial fails ([`DialPhase::Open`](crate::DialPhase::Open)). A
    /// blocking call there, or an async send first polled there, writes what
    /// the socket takes only later itself, and a request reads past
    /// messages the peer sent first: they are set
    /// aside (as many as one message of the larger of `max_message_size`
    /// and `read_buffer_size` would take, counting some 56 bytes of
    /// framing and bookkeeping each) and reach `on_message` once `on_open`
    /// has returned. A request behind more of the peer's messages than
    /// that fails at once with [`Error::MessagesAheadInOnOpen`] (only the
    /// reactor could read on to its response). A call that needs the
    /// reactor still waits until its deadline: an async send first polled
    /// on another thread (awaited there or here) whose frame the socket
    /// does not take at once before `on_open` returns, or a large write to
    /// a peer that stops reading until this side reads what it sent
    /// meanwhile.
    fn on_open(&self, conn: &Connection) {
        let _ = conn;
    }

    /// A connection closed; `reason` says why ([`Error::Closed`] for an
    /// orderly local close, [`Error::PeerClosed`] when the peer hung up).
    fn on_close(&self, conn: &Connection, reason: &Error) {
        let _ = (conn, reason);
    }

    /// A connection failed before its handshake finished (timeout, bad
    /// key, rejected identity, peer gone), so it never opened. `peer` is
    /// its address, if known.
    fn on_handshake_failed(&self, peer: Option<SocketAddr>, error: &Error) {
        let _ = (peer, error);
    }
}

impl<F> Handler for F
where
    F: Fn(&mut Context<'_>) + Send + Sync + 'static,
{
    fn on_message(&self, ctx: &mut Context<'_>) {
        self(ctx)
    }
}

/// Makes a handler of a closure whose argument type the compiler infers:
/// `handler(|ctx| ...)` instead of `|ctx: &mut Context<'_>| ...`.
///
/// [`Server::bind`](crate::Server::bind), [`Server::serve`](crate::Server::serve)
/// and [`Client::with_handler`](crate::Client::with_handler) take
/// `impl Handler`. The compiler infers a closure's argument types only from
/// an `Fn` bound on the parameter the closure is passed to, and `Handler`
/// is a trait of its own, so a bare `|ctx| ctx.body()` passed there fails
/// with E0282, "type annotations needed". This function's parameter has the
/// `Fn(&mut Context<'_>)` bound, so the closure's type is known; it returns
/// the closure unchanged, which is a [`Handler`] through the blanket impl.
///
/// The bare closure, which does not build:
///
/// ```compile_fail,E0282
/// use monte_rpc::{Config, Server};
/// let server = Server::bind("127.0.0.1:0", Config::server(), |ctx| {
///     let _ = ctx.reply(ctx.body());
/// });
/// ```
///
/// With `handler`:
///
/// ```
/// use monte_rpc::{handler, Client, Config, Server};
///
/// let server = Server::bind("127.0.0.1:0", Config::server(), handler(|ctx| {
///     let _ = ctx.reply(ctx.body());
/// }))?;
/// let client = Client::new(server.local_addr(), Config::default())?;
/// let mut response = Vec::new();
/// client.request(b"echo", &mut response)?;
/// assert_eq!(response, b"echo");
/// # Ok::<(), monte_rpc::Error>(())
/// ```
///
/// Where an `Arc<dyn Handler>` is wanted (as by
/// [`ReactorHandle::accept`](crate::ReactorHandle::accept)), wrap it:
/// `Arc::new(handler(|ctx| ...))`.
pub fn handler<F>(f: F) -> F
where
    F: Fn(&mut Context<'_>) + Send + Sync + 'static,
{
    f
}

/// A handler that ignores messages: the default on clients, which rarely
/// receive requests.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHandler;

impl Handler for NoHandler {
    fn on_message(&self, _ctx: &mut Context<'_>) {}
}

/// One incoming message, as the handler sees it.
pub struct Context<'a> {
    pub(crate) conn: &'a Connection,
    pub(crate) seq: u32,
    pub(crate) body: &'a [u8],
    pub(crate) replied: bool,
}

impl<'a> Context<'a> {
    /// The message body, borrowed from the connection's receive buffer.
    pub fn body(&self) -> &'a [u8] {
        self.body
    }

    /// The message's sequence number: 0 for a message that expects no
    /// reply, else the request number to answer with.
    pub fn seq(&self) -> u32 {
        self.seq
    }

    /// Whether the peer waits for a reply.
    pub fn expects_reply(&self) -> bool {
        self.seq != 0
    }

    /// The connection the message came on; clone it to send, reply or make
    /// requests later.
    pub fn conn(&self) -> &'a Connection {
        self.conn
    }

    /// Answers the request. The reply is sealed straight into the
    /// connection's outbound buffer and flushed with every other reply of
    /// this wake-up. A second reply, or a reply to a message that expects
    /// none, is ignored.
    pub fn reply(&mut self, body: &[u8]) -> Result<()> {
        if self.seq == 0 || self.replied {
            return Ok(());
        }
        self.replied = true;
        self.conn
            .queue_reply(self.seq, body)
            .map_err(|e| e.calling(CallOp::Reply, self.conn.peer_addr()))
    }

    /// Whether [`reply`](Self::reply) was called.
    pub fn replied(&self) -> bool {
        self.replied
    }
}

/// Runs handler code; a panic closes the connection instead of killing the
/// reactor thread and every other connection on it.
pub(crate) fn guard_handler(f: impl FnOnce()) -> Result<()> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|_| Error::HandlerPanicked)
}
