//! One WebSocket connection, on the socket it owns: after the upgrade
//! ([`crate::http::upgrade`]) the session holds the bare TCP stream and
//! actix-http's WebSocket codec, and runs one task with one `select!` loop
//! over its mailbox, the socket's read and write readiness and one timer,
//! then one cleanup point.
//!
//! Output is state ([`crate::delivery`]): the session takes its mailbox only
//! when everything it wrote before has left, so a connection that is behind
//! gets the merged latest counts in its next frame. It is closed as stuck
//! only when its socket takes no bytes for `websocket.client_timeout`.
//!
//! Input is bounded: a frame's declared length is checked against
//! `websocket.max_message_bytes` before its payload is read (fragments by
//! their running total), so nothing a client sends grows a buffer past that
//! plus one read. An idle connection holds no read or write buffer.

use std::{
    cell::Cell,
    future::poll_fn,
    io,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use actix::Addr;
use actix_codec::{Decoder, Encoder};
use actix_http::ws::{
    CloseCode, CloseReason, Codec, Frame, Item, Message, ProtocolError as WsError,
};
use bytes::{Buf, Bytes, BytesMut};
use bytestring::ByteString;
use tokio::{
    net::TcpStream,
    time::{sleep_until, timeout_at, Instant},
};

use crate::{
    config::Settings,
    delivery::{ConnId, End, Mailbox},
    limits::{Permit, TokenBucket},
    metrics::{self as m, CloseKind, Transport},
    protocol::{close, parse_client_message, ClientMessage, ErrorCode, PageId, ProtocolError},
    room::{Join, Leave, SetLinks},
    shard::Shard,
    visitor::{NodeVisitors, VisitorKey, VisitorParam},
};

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 4096;

/// Largest capacity a worker keeps in a scratch buffer between uses.
const SCRATCH_KEEP: usize = 64 * 1024;

thread_local! {
    /// The worker's read buffer: a session reads into it whenever it holds
    /// no partial frame (nearly always), so reads allocate nothing; a
    /// partial frame left at the end is copied into the session's own buffer.
    static READ_SCRATCH: Cell<BytesMut> = Cell::new(BytesMut::new());
    /// The worker's write buffer: a session encodes into it and writes from
    /// it; only what the socket does not take is copied into its own buffer.
    static WRITE_SCRATCH: Cell<BytesMut> = Cell::new(BytesMut::new());
}

/// Takes a worker scratch buffer (sessions on one thread never interleave
/// inside the synchronous code that holds it).
fn take_scratch(key: &'static std::thread::LocalKey<Cell<BytesMut>>) -> BytesMut {
    key.with(Cell::take)
}

/// Gives a scratch buffer back, emptied, unless it grew too large to keep.
fn return_scratch(key: &'static std::thread::LocalKey<Cell<BytesMut>>, mut buf: BytesMut) {
    if buf.capacity() <= SCRATCH_KEEP {
        buf.clear();
        key.with(|cell| cell.set(buf));
    }
}

/// Replies of the session's own (`error` messages answering the client's
/// messages) are written only while less than this is waiting to leave;
/// over it they are dropped, so a client that sends but does not read
/// cannot grow the write buffer.
const REPLY_BACKLOG: usize = 16 * 1024;

/// What a session needs from the server.
pub(crate) struct SessionContext {
    /// The page this connection views.
    pub(crate) page: PageId,
    /// PartySocket's `_pk` connection id, for logs.
    pub(crate) pk: Option<String>,
    /// Its visitor id, as its key (never logged).
    pub(crate) visitor: VisitorParam,
    /// The node's distinct visitors, which this connection joins.
    pub(crate) node_visitors: Arc<NodeVisitors>,
    /// The shard that owns the page's room.
    pub(crate) shard: Addr<Shard>,
    /// Its index (the `shard` label of metrics).
    pub(crate) shard_index: usize,
    /// Limits and timers.
    pub(crate) settings: Arc<Settings>,
    /// Open sessions: incremented by [`join`] (so a shutdown that starts
    /// now waits for this one), decremented when it ends.
    pub(crate) active: Arc<AtomicUsize>,
    /// This connection's slot in the connection caps, released when it ends.
    pub(crate) permit: Permit,
    /// WebSocket or event stream (the `transport` label of metrics).
    pub(crate) transport: Transport,
}

/// Decrements the open-session gauge however the session ends.
struct ActiveGuard(Arc<AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A connection's place in its room, from the `Join` ([`join`]) to the
/// `Leave`: the session leaves before it writes its close frame; if it is
/// dropped first (its runtime torn down, or the upgrade failed after the
/// join), `Drop` leaves, so a room never counts a connection that is gone.
struct Membership {
    /// Routes the `Leave` (and `SetLinks`) to the room.
    shard: Addr<Shard>,
    /// The page counted.
    page: PageId,
    /// This connection.
    conn: ConnId,
    /// The `shard` label of metrics.
    shard_index: usize,
    /// The `transport` label of metrics.
    transport: Transport,
    /// Its visitor (`None`: its own visitor).
    visitor: Option<VisitorKey>,
    /// The node's distinct visitors, left with the room.
    node_visitors: Arc<NodeVisitors>,
    /// The `Leave` was sent.
    left: bool,
    /// The connection's slot in the open-session gauge.
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
        self.node_visitors.remove(self.visitor);
        m::connection_closed(self.shard_index, self.transport, kind);
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.leave(CloseKind::Abrupt);
    }
}

/// A connection that joined its room and waits for its socket ([`Joined::run`]).
pub(crate) struct Joined {
    membership: Membership,
    mailbox: Arc<Mailbox>,
    settings: Arc<Settings>,
    permit: Permit,
}

/// Joins the page's room: from here on the connection counts as a viewer
/// (and its visitor, as one of the page's and the node's visitors).
///
/// Called by the upgrade handler before it writes the `101`: the room's
/// mailbox has the `Join` before the client sees the handshake complete.
/// Dropping the result (the `101` could not be written) leaves again. An
/// invalid visitor id is ignored (the connection is its own visitor) and
/// answered with an `invalid_visitor` error as the connection's first message.
pub(crate) fn join(ctx: SessionContext) -> Joined {
    let SessionContext {
        page,
        pk,
        visitor,
        node_visitors,
        shard,
        shard_index,
        settings,
        active,
        permit,
        transport,
    } = ctx;
    active.fetch_add(1, Ordering::SeqCst);
    let conn = ConnId::fresh();
    m::connection_opened(shard_index, transport);
    let mailbox = Mailbox::new();
    if let VisitorParam::Invalid(e) = visitor {
        let error = e.protocol_error();
        m::error_sent(error.code);
        mailbox.notice(error.to_json().into());
    }
    node_visitors.add(visitor.key());
    shard.do_send(Join {
        page: page.clone(),
        conn,
        mailbox: mailbox.clone(),
        visitor: visitor.key(),
    });
    let ip = permit.ip();
    tracing::debug!(page = %page, conn = conn.get(), %ip, pk = pk.as_deref().unwrap_or(""), "connected");
    Joined {
        membership: Membership {
            shard,
            page,
            conn,
            shard_index,
            transport,
            visitor: visitor.key(),
            node_visitors,
            left: false,
            _active: ActiveGuard(active),
        },
        mailbox,
        settings,
        permit,
    }
}

impl Joined {
    /// The index of the shard that owns the connection's page.
    pub(crate) fn shard_index(&self) -> usize {
        self.membership.shard_index
    }

    /// The page this connection views.
    pub(crate) fn page(&self) -> &PageId {
        &self.membership.page
    }

    /// This connection's id (for logs).
    pub(crate) fn conn(&self) -> ConnId {
        self.membership.conn
    }

    /// Where the room puts what this connection is to be told.
    pub(crate) fn mailbox(&self) -> &Mailbox {
        &self.mailbox
    }

    /// The shared settings.
    pub(crate) fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Replaces the connection's link set (a `subscribe`; with `site`, the
    /// site's figure is followed as the reserved link [`PageId::site`]): its
    /// full update follows through the mailbox.
    pub(crate) fn subscribe(&self, mut links: Vec<PageId>, visitors: bool, site: bool) {
        if site {
            links.push(PageId::site());
        }
        let ms = &self.membership;
        ms.shard.do_send(SetLinks {
            page: ms.page.clone(),
            conn: ms.conn,
            links,
            visitors,
        });
    }

    /// Stops counting the connection (once; dropping it does the same, as `abrupt`).
    pub(crate) fn leave(&mut self, kind: CloseKind) {
        self.membership.leave(kind);
    }

    /// Runs the connection on its socket until it closes. `read_buf` holds
    /// whatever the client sent after its upgrade request.
    /// (Not an `async fn`: the session is built here and moved into its own
    /// future, so the task holds one copy of it.)
    pub(crate) fn run(
        self,
        io: TcpStream,
        read_buf: BytesMut,
    ) -> impl std::future::Future<Output = ()> {
        let ws = &self.settings.websocket;
        let limits = &self.settings.limits;
        let now = Instant::now();
        let session = Session {
            codec: Codec::new().max_size(ws.max_message_bytes),
            // Keep what the client already sent, not the dispatcher's buffer.
            rbuf: if read_buf.is_empty() {
                BytesMut::new()
            } else {
                BytesMut::from(&read_buf[..])
            },
            wbuf: BytesMut::new(),
            message: None,
            bucket: TokenBucket::new(limits.messages_per_second, limits.burst),
            strikes: 0,
            last_seen: now,
            last_progress: now,
            next_ping: now + ws.heartbeat_interval,
            pong: None,
            ping_due: false,
            mail: false,
            io,
            joined: self,
        };
        session.run()
    }
}

/// Why the loop ended and how to say goodbye.
struct Ending {
    kind: CloseKind,
    /// The close frame to send; `None`: the connection is gone, just drop it.
    close: Option<CloseReason>,
}

impl Ending {
    fn new(kind: CloseKind, code: u16, text: &str) -> Ending {
        Ending {
            kind,
            close: Some(CloseReason {
                code: CloseCode::from(code),
                description: Some(text.to_owned()),
            }),
        }
    }

    fn gone() -> Ending {
        Ending {
            kind: CloseKind::Abrupt,
            close: None,
        }
    }
}

/// The running connection. Every field is needed while it is idle; the
/// buffers are empty (no allocation) then.
struct Session {
    /// The socket.
    io: TcpStream,
    /// actix-http's frame codec (server side: client frames must be masked).
    codec: Codec,
    /// Bytes read but not yet decoded: at most one frame (header-checked)
    /// plus one read; released whenever it empties.
    rbuf: BytesMut,
    /// Encoded frames the socket has not taken yet; released when it empties.
    wbuf: BytesMut,
    /// A fragmented text message being reassembled (bounded like a frame).
    message: Option<Vec<u8>>,
    /// The client's message rate.
    bucket: TokenBucket,
    /// Consecutive rate-limited messages.
    strikes: u32,
    /// When the client's last complete frame arrived (liveness).
    last_seen: Instant,
    /// When the socket last took bytes (or output became waiting).
    last_progress: Instant,
    /// When the next heartbeat ping is due.
    next_ping: Instant,
    /// The payload of the latest ping to answer.
    pong: Option<Bytes>,
    /// A heartbeat ping is due.
    ping_due: bool,
    /// The mailbox signalled: take it when the write buffer is empty.
    mail: bool,
    /// The room membership, mailbox, settings and permit.
    joined: Joined,
}

impl Session {
    /// (Returns an `async move` block rather than being an `async fn`, so the
    /// session is stored once in the task, as the block's capture; an
    /// `async fn` copies its argument into a second slot: 992 vs 608 bytes.)
    #[allow(clippy::manual_async_fn)]
    fn run(mut self) -> impl std::future::Future<Output = ()> {
        async move {
            let timer = sleep_until(self.next_due());
            tokio::pin!(timer);
            // Bytes the client sent with its upgrade request.
            let mut ending = if self.rbuf.is_empty() {
                None
            } else {
                let mut buf = std::mem::take(&mut self.rbuf);
                let r = self.decode(&mut buf);
                self.rbuf = buf;
                r.err()
            };
            while ending.is_none() {
                if let Err(e) = self.fill_and_flush() {
                    ending = Some(e);
                    break;
                }
                let due = self.next_due();
                if due < timer.deadline() {
                    timer.as_mut().reset(due);
                }
                let writing = !self.wbuf.is_empty();
                let step = tokio::select! {
                    biased;
                    // Also while output is backed up, but then only for its end
                    // (shutdown is not kept waiting behind a slow reader).
                    () = poll_fn(|cx| self.joined.mailbox.poll_ready(cx)), if writing || !self.mail => {
                        self.mail = true;
                        match self.joined.mailbox.ended() {
                            Some(end) if writing => Err(ending_for(end)),
                            _ => Ok(()),
                        }
                    }
                    () = &mut timer => {
                        let r = self.on_timer();
                        timer.as_mut().reset(self.next_due());
                        r
                    }
                    r = poll_fn(|cx| self.io.poll_write_ready(cx)), if writing => match r {
                        Ok(()) => self.flush(),
                        Err(_) => Err(Ending::gone()),
                    },
                    r = poll_fn(|cx| self.io.poll_read_ready(cx)) => match r {
                        Ok(()) => self.read(),
                        Err(_) => Err(Ending::gone()),
                    },
                };
                ending = step.err();
            }
            let Some(ending) = ending else { return };
            // Boxed: this state exists once per connection, at its end; inline
            // it would enlarge every idle connection's task.
            Box::pin(self.close(ending)).await;
        }
    }

    /// When the timer must fire next.
    fn next_due(&self) -> Instant {
        let timeout = self.joined.settings.websocket.client_timeout;
        let mut due = (self.last_seen + timeout).min(self.next_ping);
        if !self.wbuf.is_empty() {
            due = due.min(self.last_progress + timeout);
        }
        due
    }

    /// Liveness, stuck output and the heartbeat.
    fn on_timer(&mut self) -> Result<(), Ending> {
        let now = Instant::now();
        let ws = &self.joined.settings.websocket;
        let page = &self.joined.membership.page;
        let conn = self.joined.membership.conn;
        if now >= self.last_seen + ws.client_timeout {
            tracing::debug!(page = %page, conn = conn.get(), "client timed out");
            return Err(Ending::new(
                CloseKind::Timeout,
                close::NORMAL,
                "client timeout",
            ));
        }
        if !self.wbuf.is_empty() && now >= self.last_progress + ws.client_timeout {
            tracing::info!(page = %page, conn = conn.get(), "socket took no bytes for client_timeout; closing");
            return Err(Ending::new(
                CloseKind::SlowClient,
                close::TRY_AGAIN_LATER,
                "client took no data for client_timeout",
            ));
        }
        if now >= self.next_ping {
            self.ping_due = true;
            self.next_ping = now + ws.heartbeat_interval;
        }
        Ok(())
    }

    /// When nothing waits to leave: encodes what is pending (a pong, the
    /// heartbeat ping, then the mailbox: notice and merged counts) and
    /// writes it. The mailbox is taken only here, so counts that change
    /// while the socket is full merge there instead of queueing.
    fn fill_and_flush(&mut self) -> Result<(), Ending> {
        let pending = self.pong.is_some() || self.ping_due || self.mail;
        if !self.wbuf.is_empty() || !pending {
            return Ok(());
        }
        // Encode into the worker's scratch buffer; keep only what the
        // socket does not take.
        self.wbuf = take_scratch(&WRITE_SCRATCH);
        let r = self.fill().and_then(|()| self.write_now());
        if !self.wbuf.is_empty() {
            // Output begins to wait now: the stuck-output clock starts.
            self.last_progress = Instant::now();
        }
        let scratch = if self.wbuf.is_empty() {
            std::mem::take(&mut self.wbuf)
        } else {
            let rest = BytesMut::from(&self.wbuf[..]);
            std::mem::replace(&mut self.wbuf, rest)
        };
        return_scratch(&WRITE_SCRATCH, scratch);
        r
    }

    /// Encodes what is pending into the (empty) write buffer.
    fn fill(&mut self) -> Result<(), Ending> {
        if let Some(payload) = self.pong.take() {
            self.encode(Message::Pong(payload));
        }
        if std::mem::take(&mut self.ping_due) {
            self.encode(Message::Ping(Bytes::new()));
        }
        if std::mem::take(&mut self.mail) {
            let taken = self.joined.mailbox.take();
            if let Some(end) = taken.end {
                if let End::Refuse { error, .. } = &end {
                    self.text(error.clone());
                }
                return Err(ending_for(end));
            }
            if let Some(notice) = taken.notice {
                self.text(notice);
            }
            if let Some((text, since)) = taken.update {
                self.text(text);
                m::update_sent(since.map(|t| t.elapsed()));
            }
        }
        Ok(())
    }

    fn encode(&mut self, msg: Message) {
        // Encoding a whole (unfragmented) message cannot fail.
        let _ = self.codec.encode(msg, &mut self.wbuf);
    }

    fn text(&mut self, text: ByteString) {
        self.encode(Message::Text(text));
        m::message_out();
    }

    /// Writes as much of the write buffer as the socket takes now, and
    /// releases the buffer once it is empty.
    fn flush(&mut self) -> Result<(), Ending> {
        let r = self.write_now();
        if self.wbuf.is_empty() {
            self.wbuf = BytesMut::new();
        }
        r
    }

    /// Writes as much of the write buffer as the socket takes now.
    fn write_now(&mut self) -> Result<(), Ending> {
        let before = self.wbuf.len();
        while !self.wbuf.is_empty() {
            match self.io.try_write(&self.wbuf) {
                Ok(0) => return Err(Ending::gone()),
                Ok(n) => self.wbuf.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The stuck-output clock runs from the last write that
                    // made progress (or from when output began to wait).
                    if self.wbuf.len() != before {
                        self.last_progress = Instant::now();
                    }
                    return Ok(());
                }
                Err(_) => return Err(Ending::gone()),
            }
        }
        Ok(())
    }

    /// Reads what the socket has and handles every complete frame. Nearly
    /// always into the worker's scratch buffer; while a partial frame is
    /// pending, into the session's own buffer, only as much as that frame
    /// still needs (so it is never reallocated past the frame's size).
    fn read(&mut self) -> Result<(), Ending> {
        use bytes::BufMut;
        let max = self.joined.settings.websocket.max_message_bytes as u64;
        let partial = !self.rbuf.is_empty();
        let (mut buf, want) = if partial {
            let buf = std::mem::take(&mut self.rbuf);
            let need = match frame_header(&buf) {
                Some((_, header, len)) if len <= max => header + len as usize - buf.len(),
                _ => MAX_HEADER.saturating_sub(buf.len()),
            };
            let want = need.clamp(1, READ_CHUNK);
            let mut buf = if buf.capacity() - buf.len() < want {
                frame_buffer(&buf, max)
            } else {
                buf
            };
            if buf.capacity() - buf.len() < want {
                buf.reserve(want);
            }
            (buf, want)
        } else {
            let mut buf = take_scratch(&READ_SCRATCH);
            buf.reserve(READ_CHUNK);
            let want = buf.capacity() - buf.len();
            (buf, want)
        };
        let r = match self.io.try_read_buf(&mut (&mut buf).limit(want)) {
            Ok(0) => Err(Ending::gone()),
            Ok(_) => self.decode(&mut buf),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(_) => Err(Ending::gone()),
        };
        if partial {
            // Still the partial frame: a read never asks for more than it needs.
            if !buf.is_empty() {
                self.rbuf = buf;
            }
        } else {
            if !buf.is_empty() {
                self.rbuf = frame_buffer(&buf, max);
            }
            return_scratch(&READ_SCRATCH, buf);
        }
        r
    }

    /// Decodes and handles every complete frame in the read buffer,
    /// refusing an oversized one from its header.
    fn decode(&mut self, buf: &mut BytesMut) -> Result<(), Ending> {
        let max = self.joined.settings.websocket.max_message_bytes as u64;
        loop {
            if let Some((opcode, _, len)) = frame_header(buf) {
                let before = match (opcode, &self.message) {
                    (OPCODE_CONTINUATION, Some(m)) => m.len() as u64,
                    _ => 0,
                };
                if before.saturating_add(len) > max {
                    return Err(too_big());
                }
            }
            match self.codec.decode(buf) {
                Ok(Some(frame)) => {
                    // Liveness counts complete frames, not bytes: a frame
                    // dribbled in byte by byte does not keep a connection alive.
                    self.last_seen = Instant::now();
                    self.on_frame(frame)?
                }
                Ok(None) => return Ok(()),
                Err(WsError::Overflow) => return Err(too_big()),
                Err(e) => {
                    let page = &self.joined.membership.page;
                    tracing::debug!(page = %page, conn = self.joined.membership.conn.get(), error = %e, "protocol error");
                    return Err(Ending::new(
                        CloseKind::ProtocolError,
                        close::PROTOCOL_ERROR,
                        "protocol error",
                    ));
                }
            }
        }
    }

    fn on_frame(&mut self, frame: Frame) -> Result<(), Ending> {
        match frame {
            Frame::Text(payload) => self.on_message(payload),
            Frame::Continuation(Item::FirstText(part)) => {
                self.message = Some(part.to_vec());
                Ok(())
            }
            Frame::Continuation(Item::Continue(part)) => {
                if let Some(m) = &mut self.message {
                    m.reserve_exact(part.len());
                    m.extend_from_slice(&part);
                }
                Ok(())
            }
            Frame::Continuation(Item::Last(part)) => match self.message.take() {
                Some(mut m) => {
                    m.reserve_exact(part.len());
                    m.extend_from_slice(&part);
                    self.on_message(Bytes::from(m))
                }
                // The rest of a binary message (its first part closed the connection).
                None => Ok(()),
            },
            Frame::Binary(_) | Frame::Continuation(Item::FirstBinary(_)) => Err(Ending::new(
                CloseKind::Binary,
                close::UNSUPPORTED,
                "binary frames are not supported",
            )),
            Frame::Ping(payload) => {
                self.spend_token()?;
                // A copy: the payload shares the worker's read buffer.
                self.pong = Some(Bytes::copy_from_slice(&payload));
                Ok(())
            }
            Frame::Pong(_) => Ok(()),
            Frame::Close(reason) => Err(Ending {
                kind: CloseKind::ClientClose,
                // Echo the client's code (RFC 6455 §5.5.1).
                close: Some(reason.unwrap_or(CloseCode::Normal.into())),
            }),
        }
    }

    /// Every data message and ping spends a token; over the rate the
    /// message is refused (`Ok(false)`), and a client that keeps on is closed.
    fn spend_token(&mut self) -> Result<bool, Ending> {
        if self.bucket.try_take(std::time::Instant::now()) {
            self.strikes = 0;
            return Ok(true);
        }
        self.strikes += 1;
        let limits = &self.joined.settings.limits;
        if self.strikes >= limits.flood_strikes {
            let page = &self.joined.membership.page;
            let ip = self.joined.permit.ip();
            tracing::info!(page = %page, conn = self.joined.membership.conn.get(), %ip, "message flood; closing");
            return Err(Ending::new(
                CloseKind::RateLimited,
                close::POLICY,
                "message rate limit exceeded repeatedly",
            ));
        }
        self.reply(ProtocolError::new(
            ErrorCode::RateLimited,
            format!(
                "more than {} messages per second; message ignored",
                limits.messages_per_second
            ),
        ));
        Ok(false)
    }

    /// A complete text message.
    fn on_message(&mut self, payload: Bytes) -> Result<(), Ending> {
        m::message_in();
        if !self.spend_token()? {
            return Ok(());
        }
        let Ok(text) = std::str::from_utf8(&payload) else {
            return Err(Ending::new(
                CloseKind::InvalidUtf8,
                close::INVALID_PAYLOAD,
                "text message is not valid UTF-8",
            ));
        };
        let max_links = self.joined.settings.websocket.max_links_per_subscribe;
        match parse_client_message(text, max_links) {
            Ok(ClientMessage::Subscribe {
                links,
                visitors,
                site,
            }) => {
                self.joined.subscribe(links, visitors, site);
            }
            Err(e) => self.reply(e),
        }
        Ok(())
    }

    /// Answers the client with an `error` message, unless output is backed up.
    fn reply(&mut self, e: ProtocolError) {
        m::error_sent(e.code);
        if self.wbuf.len() < REPLY_BACKLOG {
            if self.wbuf.is_empty() {
                self.last_progress = Instant::now();
            }
            self.text(e.to_json().into());
        }
    }

    /// Stops counting, then says goodbye: the close frame (after any
    /// refusal text already encoded), written within `close_timeout`; then
    /// the TCP connection is closed, at once if the client started the
    /// close, else when the client answers (or closes) or `close_timeout`
    /// passes.
    async fn close(mut self, ending: Ending) {
        self.joined.membership.leave(ending.kind);
        tracing::debug!(
            page = %self.joined.membership.page,
            conn = self.joined.membership.conn.get(),
            reason = ending.kind.as_str(),
            "disconnected"
        );
        let Some(reason) = ending.close else { return };
        let deadline = Instant::now() + self.joined.settings.websocket.close_timeout;
        self.encode(Message::Close(Some(reason)));
        let written = timeout_at(deadline, async {
            loop {
                if self.flush().is_err() {
                    return false;
                }
                if self.wbuf.is_empty() {
                    return true;
                }
                if self.io.writable().await.is_err() {
                    return false;
                }
            }
        })
        .await;
        if written != Ok(true) || ending.kind == CloseKind::ClientClose {
            return;
        }
        // Our close is out: half-close, then wait for the client's Close
        // frame (or its end of the stream), keeping at most one frame.
        let _ = timeout_at(deadline, async {
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut self.io).await;
            while self.io.readable().await.is_ok() {
                match self.await_close() {
                    Some(true) => return,
                    Some(false) => break,
                    None => {}
                }
            }
            // The client keeps sending what cannot be parsed (the rest of an
            // oversized frame): discard it until it stops or time runs out.
            let mut scratch = vec![0u8; READ_CHUNK];
            while self.io.readable().await.is_ok() {
                match self.io.try_read(&mut scratch) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
        })
        .await;
    }

    /// While closing: reads, and looks for the client's Close frame among
    /// the frames that came. `Some(true)`: it came, or the stream ended;
    /// `Some(false)`: what came cannot be parsed; `None`: not yet.
    fn await_close(&mut self) -> Option<bool> {
        let max = self.joined.settings.websocket.max_message_bytes as u64;
        self.rbuf.reserve(READ_CHUNK);
        match self.io.try_read_buf(&mut self.rbuf) {
            Ok(0) => return Some(true),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(_) => return Some(true),
        }
        loop {
            if frame_header(&self.rbuf).is_some_and(|(_, _, len)| len > max) {
                return Some(false);
            }
            match self.codec.decode(&mut self.rbuf) {
                Ok(Some(Frame::Close(_))) => return Some(true),
                Ok(Some(_)) => {}
                Ok(None) => return None,
                Err(_) => return Some(false),
            }
        }
    }
}

/// How a connection told to end closes (a refusal's `error` text is written first).
fn ending_for(end: End) -> Ending {
    match end {
        End::Shutdown => Ending::new(
            CloseKind::Shutdown,
            close::GOING_AWAY,
            "server shutting down",
        ),
        End::Refuse { code, reason, .. } => Ending::new(CloseKind::MaxRooms, code, reason),
    }
}

fn too_big() -> Ending {
    Ending::new(
        CloseKind::TooBig,
        close::TOO_BIG,
        "message larger than max_message_bytes",
    )
}

/// Opcode of a continuation frame (RFC 6455 §5.2).
const OPCODE_CONTINUATION: u8 = 0x0;

/// Longest frame header a client sends: 2 bytes, an 8-byte length, a 4-byte mask.
const MAX_HEADER: usize = 14;

/// The opcode, header length (mask included) and declared payload length
/// of the frame at the start of `buf`, once its length field has arrived.
/// Only the length is read here, so an oversized frame is refused before
/// its payload is buffered; actix-http's codec parses (and validates) the
/// frame itself.
fn frame_header(buf: &[u8]) -> Option<(u8, usize, u64)> {
    let opcode = buf.first()? & 0x0f;
    let second = *buf.get(1)?;
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    let (ext, len) = match second & 0x7f {
        126 => (
            2,
            u64::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?)),
        ),
        127 => (8, u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?)),
        n => (0, u64::from(n)),
    };
    Some((opcode, 2 + ext + mask, len))
}

/// A session buffer for the partial frame `part`: sized for the whole
/// frame once its header is in (and within `max`), so reading the rest
/// never reallocates; otherwise for the longest header.
fn frame_buffer(part: &[u8], max: u64) -> BytesMut {
    let size = match frame_header(part) {
        Some((_, header, len)) if len <= max => header + len as usize,
        _ => MAX_HEADER,
    };
    let mut buf = BytesMut::with_capacity(size.max(part.len()));
    buf.extend_from_slice(part);
    buf
}

#[cfg(test)]
mod tests {
    use super::frame_header;

    #[test]
    fn a_partial_frame_gets_a_buffer_of_its_own_size_never_of_a_huge_declared_one() {
        let part = [0x81, 0xfe, 0x01, 0x00, 0, 0, 0, 0, b'x'];
        let buf = super::frame_buffer(&part, 1024);
        assert_eq!((buf.len(), buf.capacity()), (9, 8 + 256));
        let mut huge = vec![0x81, 0xff];
        huge.extend_from_slice(&(1u64 << 30).to_be_bytes());
        assert!(super::frame_buffer(&huge, 1024).capacity() < 64);
        assert!(super::frame_buffer(&[0x81], 1024).capacity() < 64);
    }

    #[test]
    fn declared_lengths_are_read_from_every_header_form() {
        assert_eq!(frame_header(&[0x81]), None);
        assert_eq!(frame_header(&[0x81, 0x85]), Some((1, 6, 5)));
        assert_eq!(frame_header(&[0x81, 0x05]), Some((1, 2, 5)));
        assert_eq!(frame_header(&[0x80, 0xfe, 0x01]), None);
        assert_eq!(frame_header(&[0x80, 0xfe, 0x01, 0x00]), Some((0, 8, 256)));
        let mut big = vec![0x81, 0xff];
        big.extend_from_slice(&(1u64 << 30).to_be_bytes());
        assert_eq!(frame_header(&big[..9]), None);
        assert_eq!(frame_header(&big), Some((1, 14, 1 << 30)));
    }
}
