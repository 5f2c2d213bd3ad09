//! The client's async calls: a connection from the pool (see
//! [`crate::pool`]), then that connection's future
//! ([`crate::async_call`]), both within the call's one deadline, as for
//! the blocking calls.

use std::future::Future;
use std::mem;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use crate::async_call::{Deadline, RequestFuture, SendFuture};
use crate::client::Client;
use crate::clock::now_nanos;
use crate::conn::Connection;
use crate::error::{CallOp, DialPhase, Error, Result, TimeoutKind};
use crate::pool::{CallKind, DialWait};
use crate::reactor::ReactorHandle;
use crate::sync::signal::CallGuard;

/// The async calls of a client (here rather than in `client.rs`, which
/// the futures build on).
impl Client {
    /// [`request`](Self::request) for async code, under any executor: a
    /// future that resolves once the response is in `response`, within the
    /// request timeout from its first poll (or its own,
    /// [`ClientFuture::timeout`]), a connection found or dialled included.
    /// It never blocks the polling thread (a dial it needs runs on a
    /// thread of the client's; only a send awaited in a dialled
    /// connection's `on_open` writes as a blocking one would, see
    /// [`Handler::on_open`](crate::Handler::on_open)) and allocates nothing per call in steady
    /// state. Dropping it cancels the request: a late response is
    /// dropped, and `response` is left empty with its capacity.
    ///
    /// ```no_run
    /// use monte_rpc::{Client, Config};
    ///
    /// # async fn run() -> monte_rpc::Result<()> {
    /// let client = Client::new("127.0.0.1:4444", Config::default())?;
    /// let mut response = Vec::new();
    /// client.request_async(b"ping", &mut response).await?;
    /// client.send_async(b"written before this resolves").await?;
    /// client.send_no_wait_async(b"queued").await?;
    /// # Ok(()) }
    /// ```
    pub fn request_async<'a>(
        &'a self,
        body: &'a [u8],
        response: &'a mut Vec<u8>,
    ) -> ClientFuture<'a> {
        ClientFuture::request(self, body, response)
    }

    /// [`send`](Self::send) for async code: resolves once the frame is
    /// written, within the send timeout from the first poll.
    pub fn send_async<'a>(&'a self, body: &'a [u8]) -> ClientFuture<'a> {
        ClientFuture::send(self, CallOp::Send, body)
    }

    /// [`send_no_wait`](Self::send_no_wait) for async code: resolves once
    /// the frame is queued, waiting for room without blocking the thread
    /// (but in a dialled connection's `on_open`: see
    /// [`Handler::on_open`](crate::Handler::on_open)).
    pub fn send_no_wait_async<'a>(&'a self, body: &'a [u8]) -> ClientFuture<'a> {
        ClientFuture::send(self, CallOp::SendNoWait, body)
    }
}

/// What the call does once it has a connection.
enum Call<'a> {
    Request(&'a mut Vec<u8>),
    Send,
}

enum Stage<'a> {
    /// Waits for a connection (an async dial, or another call's).
    Picking(Call<'a>),
    /// A request on the chosen connection, sent at the given time.
    Request(RequestFuture<'a>, Connection, u64),
    Send(SendFuture<'a>),
    Done,
}

/// A call on a [`Client`] in flight, from
/// [`Client::request_async`](crate::Client::request_async),
/// [`send_async`](crate::Client::send_async) or
/// [`send_no_wait_async`](crate::Client::send_no_wait_async).
///
/// It finds a connection as the blocking calls do, without blocking: an
/// idle one, else a busy one while the pool dials another on a thread of
/// its own, else it waits for that dial. Its timeout (the request timeout,
/// or the send timeout for sends) covers the whole call from the first
/// poll. Dropped, it cancels the call like the connection's futures
/// ([`RequestFuture`], [`SendFuture`]).
#[must_use = "futures do nothing unless polled"]
pub struct ClientFuture<'a> {
    client: &'a Client,
    op: CallOp,
    body: &'a [u8],
    stage: Stage<'a>,
    deadline: Deadline,
    /// When the call first waited for a dial.
    since: Option<Instant>,
    wait: DialWait,
    /// Keeps shutdown's grace for calls under way.
    entered: Option<CallGuard<'a>>,
    /// The reactor whose timers keep the deadline while a connection is
    /// awaited.
    timers: &'a ReactorHandle,
}

impl std::fmt::Debug for ClientFuture<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let stage = match self.stage {
            Stage::Picking(_) => "picking",
            Stage::Request(..) => "request",
            Stage::Send(_) => "send",
            Stage::Done => "done",
        };
        f.debug_struct("ClientFuture")
            .field("op", &self.op)
            .field("stage", &stage)
            .finish()
    }
}

impl<'a> ClientFuture<'a> {
    pub(crate) fn request(client: &'a Client, body: &'a [u8], response: &'a mut Vec<u8>) -> Self {
        let timeout = client.pool.config.request_timeout;
        Self::new(
            client,
            CallOp::Request,
            body,
            Call::Request(response),
            timeout,
        )
    }

    pub(crate) fn send(client: &'a Client, op: CallOp, body: &'a [u8]) -> Self {
        let timeout = client.pool.config.send_timeout;
        Self::new(client, op, body, Call::Send, timeout)
    }

    fn new(
        client: &'a Client,
        op: CallOp,
        body: &'a [u8],
        call: Call<'a>,
        timeout: Option<Duration>,
    ) -> Self {
        let kind = match op {
            CallOp::Request => TimeoutKind::Request,
            _ => TimeoutKind::Write,
        };
        ClientFuture {
            client,
            op,
            body,
            stage: Stage::Picking(call),
            deadline: Deadline::new(timeout, kind),
            since: None,
            wait: DialWait::default(),
            entered: None,
            timers: client.pool.workers.pick(),
        }
    }

    /// Its own timeout in place of the configured one (`None`: no limit;
    /// a dial is then bounded by the dial and handshake timeouts only),
    /// covering the whole call from the first poll (also when set after
    /// it).
    pub fn timeout(mut self, timeout: Option<Duration>) -> Self {
        self.deadline.retime(timeout, self.timers.driver());
        // Past the pick, the call on the connection keeps the deadline.
        let at = self.deadline.at();
        match &mut self.stage {
            Stage::Request(call, ..) => call.retime_to(at),
            Stage::Send(call) => call.retime_to(at),
            Stage::Picking(_) | Stage::Done => {}
        }
        self
    }

    fn deadline_kind(&self) -> TimeoutKind {
        match self.op {
            CallOp::Request => TimeoutKind::Request,
            _ => TimeoutKind::Write,
        }
    }

    /// A call that failed before it had a connection: a request that ran
    /// out of its own time there is counted (once it has a connection,
    /// its `RequestFuture` counts).
    fn picking_failed(&self, request: bool, e: Error) -> Poll<Result<()>> {
        if request {
            let stats = self.timers.driver().stats();
            stats.count_request_failure(&e, self.deadline.passed());
        }
        Poll::Ready(Err(e))
    }

    fn step(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let pool = &self.client.pool;
        loop {
            match mem::replace(&mut self.stage, Stage::Done) {
                Stage::Picking(call) => {
                    if self.entered.is_none() {
                        self.entered = Some(pool.signal.enter().ok_or(Error::Closed)?);
                        self.deadline.start();
                    }
                    let since = *self.since.get_or_insert_with(Instant::now);
                    let kind = match call {
                        Call::Request(_) => CallKind::Request,
                        Call::Send => CallKind::Send,
                    };
                    let request = matches!(call, Call::Request(_));
                    // As the blocking request: before it looks for a
                    // connection (which could start a dial, or mark an
                    // idle connection taken).
                    if request && self.deadline.none_given() {
                        return self.picking_failed(request, Error::Timeout(self.deadline_kind()));
                    }
                    let conn = match pool.poll_pick(since, &mut self.wait, cx, kind) {
                        Poll::Ready(Ok(conn)) => conn,
                        Poll::Ready(Err(e)) => return self.picking_failed(request, e),
                        Poll::Pending if self.deadline.passed() => {
                            let kind = self.deadline_kind();
                            let e = Error::Timeout(kind).dialling(pool.addr, DialPhase::Queued);
                            return self.picking_failed(request, e);
                        }
                        Poll::Pending => {
                            self.deadline.arm(self.timers.driver(), cx);
                            self.stage = Stage::Picking(call);
                            return Poll::Pending;
                        }
                    };
                    self.deadline.disarm(self.timers.driver());
                    let left = self.deadline.left();
                    if left.is_some_and(|left| left.is_zero()) {
                        return self.picking_failed(request, Error::Timeout(self.deadline_kind()));
                    }
                    self.stage = match call {
                        Call::Request(response) => Stage::Request(
                            RequestFuture::new(conn.clone(), self.body, response).timeout(left),
                            conn,
                            now_nanos(),
                        ),
                        Call::Send => {
                            Stage::Send(SendFuture::new(conn, 0, self.body, self.op).timeout(left))
                        }
                    };
                }
                Stage::Request(mut call, conn, sent_at) => match Pin::new(&mut call).poll(cx) {
                    Poll::Pending => {
                        self.stage = Stage::Request(call, conn, sent_at);
                        return Poll::Pending;
                    }
                    Poll::Ready(result) => {
                        if result.is_ok() {
                            conn.note_answer(sent_at);
                        }
                        if let Err(e) = &result {
                            if matches!(e.root_cause(), Error::Timeout(TimeoutKind::Request)) {
                                // As the blocking request does.
                                pool.drop_if_silent(&conn, sent_at);
                            }
                        }
                        return Poll::Ready(result);
                    }
                },
                Stage::Send(mut call) => match Pin::new(&mut call).poll(cx) {
                    Poll::Pending => {
                        self.stage = Stage::Send(call);
                        return Poll::Pending;
                    }
                    Poll::Ready(result) => return Poll::Ready(result),
                },
                Stage::Done => panic!("ClientFuture polled after it resolved"),
            }
        }
    }
}

impl Future for ClientFuture<'_> {
    type Output = Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self.get_mut();
        let result = ready!(this.step(cx));
        this.stage = Stage::Done;
        this.client.pool.forget(&mut this.wait);
        this.deadline.disarm(this.timers.driver());
        this.entered = None;
        Poll::Ready(result.map_err(|e| e.calling(this.op, Some(this.client.pool.addr))))
    }
}

impl Drop for ClientFuture<'_> {
    fn drop(&mut self) {
        if let Stage::Picking(Call::Request(response)) = &mut self.stage {
            response.clear();
        }
        // Whatever the stage: a poll that unwound (a waker whose clone
        // panicked as the call registered it) left `stage` at `Done` with
        // the call still on the pool's list or the reactor's timers.
        self.client.pool.forget(&mut self.wait);
        self.deadline.disarm(self.timers.driver());
    }
}
