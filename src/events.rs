//! One event stream (Server-Sent Events, `GET /parties/page/{id}/events`),
//! on the socket it owns: the transport for readers whose network refuses
//! WebSocket upgrades. [`crate::http`] admits the request exactly as it
//! admits an upgrade, joins the page's room ([`crate::session::join`]: the
//! stream counts as one viewer, like a WebSocket session), sends its
//! subscription, and takes the TCP stream from the HTTP dispatcher; from
//! then on this module alone writes to it.
//!
//! The response is close-delimited (`Connection: close`, no length, no
//! chunking): its head and the `retry:` hint, then one `data:` line per
//! message, the same JSON as the WebSocket's `update` and `error` messages,
//! and a keep-alive comment whenever nothing was written for
//! `events.keepalive_interval`. Delivery is the WebSocket's
//! ([`crate::delivery`]): the mailbox is taken only when everything written
//! before has left, so a reader that is behind gets the merged latest
//! counts in its next event, never a backlog; the stream is closed as stuck
//! only when its socket takes no bytes for `websocket.client_timeout`
//! (`TCP_USER_TIMEOUT` bounds a silent peer the same way).
//!
//! The stream ends when the reader goes (end of stream, reset or a failed
//! write, noticed at once, or at the next keep-alive at the latest), on a
//! refusal (`data:` with the `error`, then the end) and on shutdown. An
//! idle stream holds no buffer.

use std::{
    future::{poll_fn, Future},
    io::{self, IoSlice},
};

use bytes::{Buf, BytesMut};
use bytestring::ByteString;
use tokio::{
    net::TcpStream,
    time::{sleep_until, timeout_at, Instant},
};

use crate::{
    delivery::End,
    metrics::{self as m, CloseKind},
    session::Joined,
};

/// The response head of every stream (the `retry:` hint follows it).
const HEAD: &str = "HTTP/1.1 200 OK\r\n\
    content-type: text/event-stream\r\n\
    cache-control: no-store\r\n\
    x-accel-buffering: no\r\n\
    access-control-allow-origin: *\r\n\
    connection: close\r\n\r\n";

/// The keep-alive comment (an SSE line starting with `:`; browsers ignore it).
const KEEPALIVE: &[u8] = b":\n\n";

/// Bytes read (and discarded) per read: a reader sends nothing after its
/// request, so anything that comes is dropped.
const DISCARD_CHUNK: usize = 512;

/// Reads per wake-up before other work gets a turn.
const DISCARD_READS: usize = 16;

/// Runs an admitted, joined stream on its socket until it ends (the
/// response head is its first output).
pub(crate) fn run(joined: Joined, io: TcpStream) -> impl Future<Output = ()> {
    let settings = joined.settings();
    let timeout = settings.websocket.client_timeout;
    // A peer that acknowledges nothing for client_timeout is gone: the
    // kernel resets the connection, and the next read or write says so.
    let _ = socket2::SockRef::from(&io).set_tcp_user_timeout(Some(timeout));
    let now = Instant::now();
    let retry = settings.events.retry.as_millis();
    let mut wbuf = BytesMut::with_capacity(HEAD.len() + 24);
    wbuf.extend_from_slice(HEAD.as_bytes());
    wbuf.extend_from_slice(format!("retry: {retry}\n\n").as_bytes());
    let stream = Stream {
        io,
        wbuf,
        last_progress: now,
        next_keepalive: now + settings.events.keepalive_interval,
        keepalive_due: false,
        mail: false,
        joined,
    };
    stream.run()
}

/// Why the loop ended.
struct Ending {
    kind: CloseKind,
    /// An `error` message to write before the end (a refusal).
    last: Option<ByteString>,
}

impl Ending {
    fn new(kind: CloseKind) -> Ending {
        Ending { kind, last: None }
    }

    fn gone() -> Ending {
        Ending::new(CloseKind::Abrupt)
    }
}

/// How a stream told to end ends.
fn ending_for(end: End) -> Ending {
    match end {
        End::Shutdown => Ending::new(CloseKind::Shutdown),
        End::Refuse { error, .. } => Ending {
            kind: CloseKind::MaxRooms,
            last: Some(error),
        },
    }
}

/// The running stream. Every field is needed while it is idle; the write
/// buffer is empty (no allocation) then.
struct Stream {
    /// The socket.
    io: TcpStream,
    /// Output the socket has not taken yet; released when it empties.
    wbuf: BytesMut,
    /// When the socket last took bytes (or output began to wait).
    last_progress: Instant,
    /// When the next keep-alive comment is due (moved on by every write).
    next_keepalive: Instant,
    /// A keep-alive comment is due.
    keepalive_due: bool,
    /// The mailbox signalled: take it when the write buffer is empty.
    mail: bool,
    /// The room membership, mailbox, settings and permit.
    joined: Joined,
}

impl Stream {
    /// (An `async move` block, not an `async fn`, so the stream is stored
    /// once in its task, as in [`crate::session`].)
    #[allow(clippy::manual_async_fn)]
    fn run(mut self) -> impl Future<Output = ()> {
        async move {
            let timer = sleep_until(self.next_due());
            tokio::pin!(timer);
            let ending = loop {
                if let Err(e) = self.fill_and_flush() {
                    break e;
                }
                let due = self.next_due();
                if due != timer.deadline() {
                    timer.as_mut().reset(due);
                }
                if let Err(e) = self.step(timer.as_mut()).await {
                    break e;
                }
            };
            // Boxed: this state exists once per stream, at its end.
            Box::pin(self.close(ending)).await;
        }
    }

    /// Waits for the next thing to do (mail, the timer, the socket) and does it.
    async fn step(
        &mut self,
        mut timer: std::pin::Pin<&mut tokio::time::Sleep>,
    ) -> Result<(), Ending> {
        let writing = !self.wbuf.is_empty();
        tokio::select! {
            biased;
            // Also while output is backed up, but then only for its end.
            () = poll_fn(|cx| self.joined.mailbox().poll_ready(cx)), if writing || !self.mail => {
                self.mail = true;
                match self.joined.mailbox().ended() {
                    Some(end) if writing => Err(ending_for(end)),
                    _ => Ok(()),
                }
            }
            () = &mut timer => self.on_timer(),
            r = poll_fn(|cx| self.io.poll_write_ready(cx)), if writing => match r {
                Ok(()) => self.flush(),
                Err(_) => Err(Ending::gone()),
            },
            r = poll_fn(|cx| self.io.poll_read_ready(cx)) => match r {
                Ok(()) => self.read(),
                Err(_) => Err(Ending::gone()),
            },
        }
    }

    /// When the timer must fire next.
    fn next_due(&self) -> Instant {
        if self.wbuf.is_empty() {
            self.next_keepalive
        } else {
            let timeout = self.joined.settings().websocket.client_timeout;
            self.next_keepalive.min(self.last_progress + timeout)
        }
    }

    /// Stuck output and the keep-alive.
    fn on_timer(&mut self) -> Result<(), Ending> {
        let now = Instant::now();
        let settings = self.joined.settings();
        let timeout = settings.websocket.client_timeout;
        if !self.wbuf.is_empty() && now >= self.last_progress + timeout {
            tracing::info!(
                page = %self.joined.page(),
                conn = self.joined.conn().get(),
                "event stream took no bytes for client_timeout; closing"
            );
            return Err(Ending::new(CloseKind::SlowClient));
        }
        if now >= self.next_keepalive {
            self.keepalive_due = true;
            self.next_keepalive = now + settings.events.keepalive_interval;
        }
        Ok(())
    }

    /// When nothing waits to leave: writes what is pending (the mailbox:
    /// notice and merged counts, or else the keep-alive). The mailbox is
    /// taken only here, so counts that change while the socket is full
    /// merge there instead of queueing.
    fn fill_and_flush(&mut self) -> Result<(), Ending> {
        if !self.wbuf.is_empty() {
            self.flush()?;
            // Still waiting on the socket; otherwise go on to what is
            // pending (mail that came while output waited would else sit
            // until the next timer).
            if !self.wbuf.is_empty() {
                return Ok(());
            }
        }
        let keepalive = std::mem::take(&mut self.keepalive_due);
        if !std::mem::take(&mut self.mail) {
            return if keepalive {
                self.write(&[KEEPALIVE])
            } else {
                Ok(())
            };
        }
        let taken = self.joined.mailbox().take();
        if let Some(end) = taken.end {
            return Err(ending_for(end));
        }
        let notice = taken.notice.as_ref().map(|t| t.as_bytes());
        let update = taken.update.as_ref().map(|(t, _)| t.as_bytes());
        // Each message is `data: {json}` and a blank line.
        let mut parts: [&[u8]; 6] = [&[]; 6];
        let mut n = 0;
        for text in [notice, update].into_iter().flatten() {
            parts[n..n + 3].copy_from_slice(&[b"data: ", text, b"\n\n"]);
            n += 3;
            m::message_out();
        }
        if n == 0 {
            return if keepalive {
                self.write(&[KEEPALIVE])
            } else {
                Ok(())
            };
        }
        if let Some((_, since)) = taken.update {
            m::update_sent(since.map(|t| t.elapsed()));
        }
        self.write(&parts[..n])
    }

    /// Writes `parts` (the write buffer is empty) as far as the socket
    /// takes them now, keeping only the rest.
    fn write(&mut self, parts: &[&[u8]]) -> Result<(), Ending> {
        let now = Instant::now();
        self.next_keepalive = now + self.joined.settings().events.keepalive_interval;
        let mut slices = [IoSlice::new(&[]); 6];
        for (slice, part) in slices.iter_mut().zip(parts) {
            *slice = IoSlice::new(part);
        }
        let slices = &slices[..parts.len().min(6)];
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let written = match self.io.try_write_vectored(slices) {
            Ok(0) => return Err(Ending::gone()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(_) => return Err(Ending::gone()),
        };
        if written < total {
            // Output begins to wait now: the stuck-output clock starts.
            self.last_progress = now;
            let mut rest = BytesMut::with_capacity(total - written);
            let mut skip = written;
            for p in parts {
                let from = skip.min(p.len());
                skip -= from;
                rest.extend_from_slice(&p[from..]);
            }
            self.wbuf = rest;
        }
        Ok(())
    }

    /// Writes as much of the write buffer as the socket takes now, and
    /// releases the buffer once it is empty.
    fn flush(&mut self) -> Result<(), Ending> {
        while !self.wbuf.is_empty() {
            match self.io.try_write(&self.wbuf) {
                Ok(0) => return Err(Ending::gone()),
                Ok(n) => {
                    self.wbuf.advance(n);
                    self.last_progress = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(_) => return Err(Ending::gone()),
            }
        }
        self.wbuf = BytesMut::new();
        Ok(())
    }

    /// Reads what the socket has: the end of the stream (or an error) means
    /// the reader is gone; bytes are discarded.
    fn read(&mut self) -> Result<(), Ending> {
        let mut scratch = [0u8; DISCARD_CHUNK];
        for _ in 0..DISCARD_READS {
            match self.io.try_read(&mut scratch) {
                Ok(0) => return Err(Ending::gone()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(_) => return Err(Ending::gone()),
            }
        }
        Ok(())
    }

    /// Stops counting, then ends the response: a refusal's `error` and
    /// whatever was waiting are written within `websocket.close_timeout`,
    /// then the TCP connection is closed (a reader that is gone, or stuck,
    /// gets nothing more).
    async fn close(mut self, ending: Ending) {
        self.joined.leave(ending.kind);
        tracing::debug!(
            page = %self.joined.page(),
            conn = self.joined.conn().get(),
            reason = ending.kind.as_str(),
            "event stream ended"
        );
        if matches!(ending.kind, CloseKind::Abrupt | CloseKind::SlowClient) {
            return;
        }
        if let Some(text) = ending.last {
            m::message_out();
            self.wbuf.extend_from_slice(b"data: ");
            self.wbuf.extend_from_slice(text.as_bytes());
            self.wbuf.extend_from_slice(b"\n\n");
        }
        let deadline = Instant::now() + self.joined.settings().websocket.close_timeout;
        let _ = timeout_at(deadline, async {
            loop {
                if self.flush().is_err() {
                    return;
                }
                if self.wbuf.is_empty() {
                    break;
                }
                if self.io.writable().await.is_err() {
                    return;
                }
            }
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut self.io).await;
        })
        .await;
    }
}
