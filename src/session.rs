//! One WebSocket connection: an actix-ws task with a single `select!` loop
//! over client frames, queued updates from its room, the liveness deadline,
//! heartbeat pings and the shutdown signal, and one cleanup point after it.

use std::{
    future::Future,
    pin::pin,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    task::Poll,
    time::Duration,
};

use actix::Addr;
use actix_ws::{AggregatedMessage, CloseCode, CloseReason, ProtocolError as WsError, Session};
use bytestring::ByteString;
use tokio::{
    sync::watch,
    time::{interval_at, sleep_until, timeout, Instant, MissedTickBehavior},
};

use crate::{
    config::Settings,
    limits::{Permit, TokenBucket},
    metrics::{self as m, CloseKind},
    protocol::{close, parse_client_message, ClientMessage, PageId, ProtocolError},
    room::{ConnId, Inbox, Join, Leave, Outbound, Outbox, SetLinks},
    shard::Shard,
};

/// Source of connection ids, unique in the process.
static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// Longest wait for a close frame to be written during shutdown.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// What a session needs from the server.
pub struct SessionContext {
    /// The page this connection views.
    pub page: PageId,
    /// PartySocket's `_pk` connection id, for logs.
    pub pk: Option<String>,
    /// The shard that owns the page's room.
    pub shard: Addr<Shard>,
    /// Its index (the `shard` label of metrics).
    pub shard_index: usize,
    /// Limits and timers.
    pub settings: Arc<Settings>,
    /// True once the server shuts down (read, never awaited: the shards
    /// tell each session to close through its control channel).
    pub shutdown: watch::Receiver<bool>,
    /// Open sessions: incremented by the HTTP handler before it spawns the
    /// session (so shutdown never misses one), decremented when it ends.
    pub active: Arc<AtomicUsize>,
    /// This connection's slot in the connection caps, released when it ends.
    pub permit: Permit,
}

/// Decrements the open-session gauge however the task ends, even if it is
/// dropped before its first turn.
struct ActiveGuard(Arc<AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A connection's place in its room, from the `Join` ([`start`]) to the
/// `Leave`: `run` leaves before it writes the close frame; if the task is
/// dropped first (its runtime torn down, even before its first turn), `Drop`
/// leaves, so a room never counts a connection whose task is gone. It also
/// holds the connection's slot in the open-session gauge.
struct Membership {
    shard: Addr<Shard>,
    page: PageId,
    conn: ConnId,
    shard_index: usize,
    left: bool,
    _active: ActiveGuard,
}

impl Membership {
    fn leave(&mut self, kind: CloseKind) {
        if std::mem::replace(&mut self.left, true) {
            return;
        }
        self.shard.do_send(Leave {
            page: self.page.clone(),
            conn: self.conn,
        });
        m::connection_closed(self.shard_index, kind);
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.leave(CloseKind::Abrupt);
    }
}

/// Runs `write` to completion, or gives up after `limit`. The usual write
/// only queues the frame and is ready at once: that path arms no timer.
async fn bounded<F: Future>(write: F, limit: Duration) -> Option<F::Output> {
    let mut write = pin!(write);
    let first = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await;
    match first {
        Poll::Ready(out) => Some(out),
        Poll::Pending => timeout(limit, write).await.ok(),
    }
}

/// Writes one text frame; false when the client is gone or did not take it
/// within `limit` (a client that does not read cannot stall the loop).
/// The write future is boxed: it exists only while writing, so it does not
/// enlarge every idle connection's task.
async fn send(session: &mut Session, text: ByteString, limit: Duration) -> bool {
    let write = Box::pin(bounded(session.text(text), limit));
    let sent = matches!(write.await, Some(Ok(())));
    if sent {
        m::message_out();
    }
    sent
}

/// Writes a pong answering `ping` (or, with `None`, our own ping), bounded
/// by `limit` and boxed like [`send`].
async fn control(
    session: &mut Session,
    ping: Option<actix_web::web::Bytes>,
    limit: Duration,
) -> bool {
    let write: std::pin::Pin<Box<dyn Future<Output = _>>> = match &ping {
        Some(payload) => Box::pin(bounded(session.pong(payload), limit)),
        None => Box::pin(bounded(session.ping(b""), limit)),
    };
    matches!(write.await, Some(Ok(())))
}

fn reason(code: u16, text: &str) -> Option<CloseReason> {
    Some(CloseReason {
        code: CloseCode::from(code),
        description: Some(text.to_owned()),
    })
}

/// Starts one connection: joins its page's room, then spawns the task that
/// runs it until it closes. It counts as a viewer throughout.
///
/// The `Join` is sent here, from the upgrade handler, before the `101`
/// response is written: the room's mailbox has it before the client sees
/// the handshake complete, and it does not wait for the session task's
/// first turn behind every other task of the worker (under a fan-out that
/// turn can be tens of milliseconds away).
pub fn start(ctx: SessionContext, session: Session, stream: actix_ws::MessageStream) {
    let SessionContext {
        page,
        pk,
        shard,
        shard_index,
        settings,
        shutdown,
        active,
        permit,
    } = ctx;
    let conn = NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed);
    m::connection_opened(shard_index);
    let (tx, rx) = Outbox::control();
    shard.do_send(Join {
        page: page.clone(),
        conn,
        tx,
        writer: Some(session.clone()),
    });
    let ip = permit.ip();
    tracing::debug!(page = %page, conn, %ip, pk = pk.as_deref().unwrap_or(""), "connected");
    let membership = Membership {
        shard,
        page,
        conn,
        shard_index,
        left: false,
        _active: ActiveGuard(active),
    };
    actix_web::rt::spawn(run(
        membership, settings, shutdown, permit, rx, session, stream,
    ));
}

/// The connection's task (see [`start`]).
async fn run(
    mut membership: Membership,
    settings: Arc<Settings>,
    shutdown: watch::Receiver<bool>,
    permit: Permit,
    mut rx: Inbox,
    mut session: Session,
    stream: actix_ws::MessageStream,
) {
    let conn = membership.conn;
    let ws = &settings.websocket;
    let ip = permit.ip();
    let limits = &settings.limits;
    let mut bucket = TokenBucket::new(limits.messages_per_second, limits.burst);
    let mut strikes = 0u32;

    let mut stream = stream
        .max_frame_size(ws.max_message_bytes)
        .aggregate_continuations()
        .max_continuation_size(ws.max_message_bytes);
    let mut heartbeat = interval_at(
        Instant::now() + ws.heartbeat_interval,
        ws.heartbeat_interval,
    );
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Liveness: a frame only records when it came; the one timer fires at
    // `last_seen + client_timeout` and is moved forward then if frames came
    // meanwhile (no timer operation per frame).
    let mut last_seen = Instant::now();
    let deadline = sleep_until(last_seen + ws.client_timeout);
    tokio::pin!(deadline);

    // Why it ends, and `Some(reason)`: close the socket with it; `None`: it is already gone.
    let (kind, close_with): (CloseKind, Option<Option<CloseReason>>) = loop {
        tokio::select! {
            biased;
            // The control channel first (at most one message, terminal, so
            // reading is never put off for long).
            out = rx.recv() => match out {
                // Not sent here: a session joins with its writer, and the room
                // writes text frames there (only session doubles without a
                // writer get them through their queue). Written if it ever were.
                Some(Outbound::Text(frame) | Outbound::Update(frame)) => {
                    if !send(&mut session, frame.text.clone(), ws.client_timeout).await {
                        break (CloseKind::Abrupt, None);
                    }
                }
                Some(Outbound::Refuse(r)) => {
                    let _ = send(&mut session, r.error, CLOSE_WRITE_TIMEOUT).await;
                    break (CloseKind::MaxRooms, Some(reason(r.code, r.reason)));
                }
                Some(Outbound::Shutdown) => break (CloseKind::Shutdown, Some(reason(close::GOING_AWAY, "server shutting down"))),
                // The room cut this connection off: its actix-ws channel
                // overflowed (or, during shutdown, it could not take the close
                // notice).
                None if *shutdown.borrow() => break (CloseKind::Shutdown, Some(reason(close::GOING_AWAY, "server shutting down"))),
                None => break (CloseKind::SlowClient, Some(reason(close::TRY_AGAIN_LATER, "client too slow: send queue overflowed"))),
            },
            frame = stream.recv() => {
                let now = Instant::now();
                last_seen = now;
                if matches!(frame, Some(Ok(AggregatedMessage::Text(_)))) {
                    m::message_in();
                }
                // Every data frame and ping spends a token; over the rate the
                // message is refused, and a client that keeps on is closed.
                if matches!(frame, Some(Ok(AggregatedMessage::Text(_) | AggregatedMessage::Ping(_))))
                    && !bucket.try_take(now.into_std())
                {
                    strikes += 1;
                    if strikes >= limits.flood_strikes {
                        tracing::info!(page = %membership.page, conn, %ip, "message flood; closing");
                        break (CloseKind::RateLimited, Some(reason(close::POLICY, "message rate limit exceeded repeatedly")));
                    }
                    let e = ProtocolError::new("rate_limited", format!(
                        "more than {} messages per second; message ignored", limits.messages_per_second));
                    m::error_sent(e.code);
                    if !send(&mut session, e.to_json().into(), ws.client_timeout).await {
                        break (CloseKind::Abrupt, None);
                    }
                    continue;
                }
                if matches!(frame, Some(Ok(AggregatedMessage::Text(_) | AggregatedMessage::Ping(_)))) {
                    strikes = 0;
                }
                match frame {
                    None => break (CloseKind::Abrupt, None),
                    Some(Ok(AggregatedMessage::Text(text))) => {
                        match parse_client_message(&text, ws.max_links_per_subscribe) {
                            Ok(ClientMessage::Subscribe { links }) => {
                                membership.shard.do_send(SetLinks { page: membership.page.clone(), conn, links });
                            }
                            Err(e) => {
                                m::error_sent(e.code);
                                if !send(&mut session, e.to_json().into(), ws.client_timeout).await {
                                    break (CloseKind::Abrupt, None);
                                }
                            }
                        }
                    }
                    Some(Ok(AggregatedMessage::Binary(_))) => {
                        break (CloseKind::Binary, Some(reason(close::UNSUPPORTED, "binary frames are not supported")));
                    }
                    Some(Ok(AggregatedMessage::Ping(bytes))) => {
                        if !control(&mut session, Some(bytes), ws.client_timeout).await {
                            break (CloseKind::Abrupt, None);
                        }
                    }
                    Some(Ok(AggregatedMessage::Pong(_))) => {}
                    Some(Ok(AggregatedMessage::Close(r))) => break (CloseKind::ClientClose, Some(r)),
                    Some(Err(WsError::Overflow)) => {
                        break (CloseKind::TooBig, Some(reason(close::TOO_BIG, "message larger than max_message_bytes")));
                    }
                    Some(Err(WsError::Io(e))) if e.to_string().contains("maximum continuation size") => {
                        break (CloseKind::TooBig, Some(reason(close::TOO_BIG, "message larger than max_message_bytes")));
                    }
                    Some(Err(e)) => {
                        tracing::debug!(page = %membership.page, conn, error = %e, "protocol error");
                        // A read error is a connection that died, not a protocol violation.
                        let kind = if matches!(e, WsError::Io(_)) { CloseKind::Abrupt } else { CloseKind::ProtocolError };
                        break (kind, Some(reason(close::PROTOCOL_ERROR, "protocol error")));
                    }
                }
            }
            _ = &mut deadline => {
                let due = last_seen + ws.client_timeout;
                if due > Instant::now() {
                    deadline.as_mut().reset(due);
                    continue;
                }
                tracing::debug!(page = %membership.page, conn, "client timed out");
                break (CloseKind::Timeout, Some(reason(close::NORMAL, "client timeout")));
            }
            _ = heartbeat.tick() => {
                if !control(&mut session, None, ws.client_timeout).await {
                    break (CloseKind::Abrupt, None);
                }
            }
        }
    };

    // Stop counting first, then say goodbye.
    membership.leave(kind);
    tracing::debug!(page = %membership.page, conn, reason = kind.as_str(), "disconnected");
    if let Some(r) = close_with {
        // Boxed: this state exists once per connection, at its end; inline
        // it would make every idle connection's task ~580 bytes larger.
        let _ = Box::pin(bounded(session.close(r), CLOSE_WRITE_TIMEOUT)).await;
    }
}
