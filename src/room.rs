//! `PageRoom`: one actor per page id, living on the HTTP worker that hosts
//! the shard its id hashes to. It owns the page's connections: their
//! actix-ws writers and control channels, their
//! link sets and the reference-counted union of those links. It follows a
//! link at the counter only while at least one of its connections wants it,
//! reports its own connection count, and delivers each changed count only to
//! the connections that subscribed to that id, serializing each distinct
//! payload once.
//!
//! Overflow policy: the room writes text frames straight into each
//! connection's actix-ws session, whose channel holds 32 frames. A connection
//! with 32 unwritten frames when an update is due is cut off: the room drops
//! its writer and its control channel, the session sees that channel end and
//! closes the socket with 1013. Until the session's `Leave` arrives the
//! connection still counts as a viewer; counts stay exact.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use actix::prelude::*;
use bytestring::ByteString;
use tokio::sync::{mpsc, oneshot};

use crate::{
    config::Settings,
    counter::{Counter, RoomCount, RoomState, Subscribe, Unsubscribe},
    protocol::{update_json, PageId, ProtocolError},
    shard::{RoomIdle, Shard},
    storage::{now_ms, RoomRecord, Storage},
};

/// A connection's id, unique in the process.
pub type ConnId = u64;

/// What a room or shard sends to a session. Two words: every connection's
/// queue allocates a block of slots up front, so the slot is kept small and
/// the payload, shared by every connection that gets it, sits behind an `Arc`.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A ready-to-send text frame (not an update).
    Text(Arc<Frame>),
    /// An `update` message.
    Update(Arc<Frame>),
    /// Send an `error` message, then close (boxed: rare).
    Refuse(Box<Refusal>),
    /// The server is shutting down: close with 1001.
    Shutdown,
}

/// One serialized message, built once and shared by every connection it goes to.
#[derive(Debug)]
pub struct Frame {
    /// The serialized JSON text.
    pub text: ByteString,
    /// When the oldest change an update carries was applied at the counter
    /// (for the publish-lag histogram); `None` for a full update or a text.
    pub since: Option<Instant>,
}

impl Outbound {
    /// A text frame that is not an update.
    pub fn text(text: impl Into<ByteString>) -> Outbound {
        Outbound::Text(Arc::new(Frame {
            text: text.into(),
            since: None,
        }))
    }

    /// An update (with `since` for the publish-lag histogram).
    pub fn update(text: impl Into<ByteString>, since: Option<Instant>) -> Outbound {
        Outbound::Update(Arc::new(Frame {
            text: text.into(),
            since,
        }))
    }
}

/// A connection refused after its upgrade.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The `error` message to send first.
    pub error: ByteString,
    /// Close code.
    pub code: u16,
    /// Close reason.
    pub reason: &'static str,
}

/// The sending side of a connection's control channel, held by its room.
///
/// A session's control messages (`Refuse`, `Shutdown`) are terminal: the
/// session closes after the first. So a real session's control channel is a
/// `oneshot` (~100 bytes), not a queue (a tokio `mpsc` allocates a block of
/// 32 slots up front, ~1 KB per connection). Dropping the `Outbox` (the room
/// cut the connection off) ends the session's [`Inbox`]. A session double
/// without a writer (tests) gets every message through a bounded queue.
#[derive(Debug)]
pub struct Outbox(OutboxKind);

#[derive(Debug)]
enum OutboxKind {
    /// A real session: one control message; `None` once it was sent.
    Control(Option<oneshot::Sender<Outbound>>),
    /// A session double: every message, bounded.
    Queue(mpsc::Sender<Outbound>),
}

/// The receiving side of a real session's control channel ([`Outbox::control`]).
#[derive(Debug)]
pub struct Inbox(Option<oneshot::Receiver<Outbound>>);

/// Capacity of a session double's queue ([`Outbox::queue`]).
pub const QUEUE_CAPACITY: usize = 32;

impl Outbox {
    /// The control channel of a real session (its frames go to its writer).
    pub fn control() -> (Outbox, Inbox) {
        let (tx, rx) = oneshot::channel();
        (Outbox(OutboxKind::Control(Some(tx))), Inbox(Some(rx)))
    }

    /// A queue of every message, for a session double without a writer.
    pub fn queue(tx: mpsc::Sender<Outbound>) -> Outbox {
        Outbox(OutboxKind::Queue(tx))
    }

    /// Hands over `out` without waiting.
    fn try_send(&mut self, out: Outbound) -> Written {
        match &mut self.0 {
            OutboxKind::Control(tx) => match tx.take().map(|tx| tx.send(out)) {
                Some(Ok(())) => Written::Yes,
                // Already used (the session is closing) or the session is gone.
                _ => Written::Closed,
            },
            OutboxKind::Queue(tx) => match tx.try_send(out) {
                Ok(()) => Written::Yes,
                Err(mpsc::error::TrySendError::Full(_)) => Written::Full,
                Err(mpsc::error::TrySendError::Closed(_)) => Written::Closed,
            },
        }
    }

    /// Tells a connection that is not (yet) in a room: a refusal or the close
    /// notice of a closing shard or room. Best effort: it may be gone.
    pub fn tell(mut self, out: Outbound) {
        let _ = self.try_send(out);
    }
}

impl Inbox {
    /// The control message, or `None` if the room dropped its `Outbox` (it
    /// cut the connection off). Once either was returned it waits forever
    /// (a `oneshot` must not be polled again).
    pub async fn recv(&mut self) -> Option<Outbound> {
        let Some(rx) = self.0.as_mut() else {
            return std::future::pending().await;
        };
        let out = rx.await.ok();
        self.0 = None;
        out
    }
}

/// What became of a message handed to a connection (its actix-ws session
/// or its control channel).
enum Written {
    Yes,
    /// Full: the connection does not read.
    Full,
    /// The connection is closed.
    Closed,
}

/// Queues a text frame in an actix-ws session if it has room now; never waits.
fn write_now(writer: &mut actix_ws::Session, text: ByteString) -> Written {
    use futures_util::Sink;
    use std::{pin::Pin, task::Poll};
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match Pin::new(&mut *writer).poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => {
            match Pin::new(&mut *writer).start_send(actix_ws::Message::Text(text)) {
                Ok(()) => Written::Yes,
                Err(_) => Written::Closed,
            }
        }
        Poll::Ready(Err(_)) => Written::Closed,
        Poll::Pending => Written::Full,
    }
}

// ---------------------------------------------------------------- messages

/// A connection opened (its upgrade completed).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Join {
    pub page: PageId,
    pub conn: ConnId,
    pub tx: Outbox,
    /// The connection's actix-ws session: the room writes its text frames
    /// (updates, `overloaded` errors) straight into it. `None`: they go
    /// through `tx` like the control messages (test doubles of a session).
    pub writer: Option<actix_ws::Session>,
}

/// A connection replaced its link set.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetLinks {
    pub page: PageId,
    pub conn: ConnId,
    pub links: Vec<PageId>,
}

/// A connection closed, timed out or died.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Leave {
    pub page: PageId,
    pub conn: ConnId,
}

/// Latest counts of some followed links, from the counter.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Counts {
    pub changes: Vec<(PageId, u64)>,
    /// When the oldest of these changes was applied at the counter (publish lag).
    pub since: Option<Instant>,
}

/// The counter's answer to a [`Subscribe`]: current counts of the links it
/// accepted, and the links it refused because `limits.max_pages` is reached.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Subscribed {
    pub counts: Vec<(PageId, u64)>,
    pub refused: Vec<PageId>,
    /// The id of the [`Subscribe`] this answers.
    pub req: u64,
}

/// Re-report everything to the counter (it restarted), for resync `epoch`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReportState {
    pub epoch: u64,
}

/// Stop now: the shard removed this room from its map.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopRoom;

/// Write the room record now if it changed (shutdown).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SaveRecord;

// ---------------------------------------------------------------- state

/// Which of a batch of changes one connection follows (a bitset).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Subset {
    /// Up to 64 changes.
    Small(u64),
    /// More: one bit per change.
    Large(Vec<u64>),
}

impl Subset {
    fn new(words: usize) -> Subset {
        if words <= 1 {
            Subset::Small(0)
        } else {
            Subset::Large(vec![0; words])
        }
    }

    fn set(&mut self, i: usize) {
        match self {
            Subset::Small(w) => *w |= 1 << i,
            Subset::Large(ws) => ws[i / 64] |= 1 << (i % 64),
        }
    }

    fn get(&self, i: usize) -> bool {
        match self {
            Subset::Small(w) => w & (1 << i) != 0,
            Subset::Large(ws) => ws[i / 64] & (1 << (i % 64)) != 0,
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Subset::Small(w) => *w == 0,
            Subset::Large(ws) => ws.iter().all(|w| *w == 0),
        }
    }

    /// Indices of the set bits below `n`.
    fn iter(&self, n: usize) -> impl Iterator<Item = usize> + '_ {
        (0..n).filter(|i| self.get(*i))
    }
}

/// A link the room follows.
struct Followed {
    /// How many of its connections want it.
    conns: usize,
    /// The id of the `Subscribe` that asked the counter for it. A refusal
    /// applies only if it answers this request: if the link was dropped and
    /// asked for again meanwhile, the newer answer decides (otherwise an old
    /// refusal could drop a link the counter has since accepted, leaving the
    /// counter following it for a room that does not).
    req: u64,
}

/// One open connection of the room.
struct Conn {
    /// Its control channel; `None` once it was cut off or closed.
    tx: Option<Outbox>,
    /// Its actix-ws session, for text frames; `None` once cut off or closed.
    writer: Option<actix_ws::Session>,
    /// The ids it subscribed to.
    links: HashSet<PageId>,
    /// Waiting for counts of some of its links before its full update.
    pending: bool,
}

pub struct PageRoom {
    /// The page this room counts.
    page: PageId,
    /// Unique id of this room instance (a recreated room gets a new one).
    uid: u64,
    /// The shard that routes messages here and decides eviction.
    shard: Addr<Shard>,
    /// Where counts and subscriptions are reported.
    counter: Addr<Counter>,
    /// Where the room record is written.
    storage: Storage,
    /// Idle timeout and snapshot interval.
    settings: Arc<Settings>,
    /// Open connections.
    conns: HashMap<ConnId, Conn>,
    /// The links its connections want (the union, reference counted).
    refs: HashMap<PageId, Followed>,
    /// Last counts known for followed links (what subscribed clients were told).
    cache: HashMap<PageId, u64>,
    /// Id of the last `Subscribe` sent.
    last_req: u64,
    /// The page's outbound links: the last non-empty link set one of its
    /// connections subscribed to (restored from the room record on start).
    last_links: Vec<PageId>,
    /// Messages routed by the shard and handled here (eviction handshake).
    processed: u64,
    /// Connections opened since the last count report (for stats).
    opened: u64,
    /// Since when the room has had no connection.
    idle_since: Option<Instant>,
    /// The `processed` value last reported idle, to report once.
    idle_reported: Option<u64>,
    /// The record changed since it was last written.
    dirty: bool,
    /// Set by [`crate::shard::CloseAll`]: connections joining now are told to close.
    closing: bool,
    /// A record write is scheduled.
    save_scheduled: bool,
}

impl PageRoom {
    pub fn new(
        page: PageId,
        uid: u64,
        shard: Addr<Shard>,
        counter: Addr<Counter>,
        storage: Storage,
        settings: Arc<Settings>,
    ) -> PageRoom {
        PageRoom {
            page,
            uid,
            shard,
            counter,
            storage,
            settings,
            conns: HashMap::new(),
            refs: HashMap::new(),
            cache: HashMap::new(),
            last_req: 0,
            last_links: Vec::new(),
            processed: 0,
            opened: 0,
            idle_since: Some(Instant::now()),
            idle_reported: None,
            dirty: false,
            closing: false,
            save_scheduled: false,
        }
    }

    fn report_count(&mut self) {
        self.counter.do_send(RoomCount {
            page: self.page.clone(),
            count: self.conns.len() as u64,
            opened: std::mem::take(&mut self.opened),
        });
    }

    fn mark_dirty(&mut self, ctx: &mut Context<Self>) {
        self.dirty = true;
        if !self.save_scheduled {
            self.save_scheduled = true;
            ctx.run_later(self.settings.storage.snapshot_interval, |act, _| {
                act.save_scheduled = false;
                act.save();
            });
        }
    }

    fn save(&mut self) {
        if !self.dirty {
            return;
        }
        let record = RoomRecord {
            links: self.last_links.iter().map(|l| l.to_string()).collect(),
            counts: self
                .cache
                .iter()
                .map(|(l, c)| (l.to_string(), *c))
                .collect(),
            last_active_ms: now_ms(),
        };
        match self.storage.save_room(&self.page, &record) {
            Ok(()) => self.dirty = false,
            Err(e) => tracing::error!(page = %self.page, error = %e, "room record write failed"),
        }
    }

    /// Sends `out` to one connection, cutting it off if it is too far behind.
    ///
    /// Text frames go straight into the connection's actix-ws session (no
    /// wake-up of the session task on the way); the session's channel holds
    /// 32 frames, and a connection with 32 unwritten frames is cut off. Cut
    /// off = the room drops its control channel and its writer: the session
    /// sees that channel end and closes with 1013; the connection counts
    /// until its `Leave`. Control messages (`Refuse`, `Shutdown`) go through
    /// the control channel.
    fn send_to(page: &PageId, conn_id: ConnId, conn: &mut Conn, out: Outbound) {
        let Some(tx) = conn.tx.as_mut() else { return };
        let written = match (&out, conn.writer.as_mut()) {
            (Outbound::Text(frame) | Outbound::Update(frame), Some(writer)) => {
                let written = write_now(writer, frame.text.clone());
                if matches!(written, Written::Yes) {
                    crate::metrics::message_out();
                    if matches!(out, Outbound::Update(_)) {
                        crate::metrics::update_sent(frame.since.map(|t| t.elapsed()));
                    }
                }
                written
            }
            _ => tx.try_send(out),
        };
        if matches!(written, Written::Full) {
            tracing::warn!(page = %page, conn = conn_id, "send queue full; closing slow client");
        }
        if !matches!(written, Written::Yes) {
            conn.tx = None;
            conn.writer = None;
        }
    }

    /// The full update of one connection's links, from the cache.
    fn full_update(&self, conn: &Conn) -> ByteString {
        ByteString::from(update_json(
            conn.links
                .iter()
                .map(|l| (&**l, self.cache.get(l).copied().unwrap_or(0))),
        ))
    }

    /// Applies counts from the counter and delivers the ids whose value
    /// changed to the (non-pending) connections that follow them.
    fn apply_counts(&mut self, counts: Vec<(PageId, u64)>, since: Option<Instant>) -> bool {
        let mut changes: Vec<(PageId, u64)> = Vec::new();
        for (link, count) in counts {
            if !self.refs.contains_key(&link) {
                continue;
            }
            if self.cache.insert(link.clone(), count) != Some(count) {
                changes.push((link, count));
            }
        }
        if changes.is_empty() {
            return false;
        }
        // Group connections by which of the changes they follow, so each
        // distinct payload is serialized once. The subset is a bitset over
        // `changes`: one word (no allocation) for up to 64 changes.
        let words = changes.len().div_ceil(64);
        let mut payloads: HashMap<Subset, Outbound> = HashMap::new();
        let page = &self.page;
        for (id, conn) in self.conns.iter_mut() {
            if conn.pending || conn.tx.is_none() {
                continue;
            }
            let mut subset = Subset::new(words);
            for (i, (link, _)) in changes.iter().enumerate() {
                if conn.links.contains(link) {
                    subset.set(i);
                }
            }
            if subset.is_empty() {
                continue;
            }
            let out = payloads.entry(subset).or_insert_with_key(|subset| {
                Outbound::update(
                    update_json(
                        subset
                            .iter(changes.len())
                            .map(|i| (&*changes[i].0, changes[i].1)),
                    ),
                    since,
                )
            });
            Self::send_to(page, *id, conn, out.clone());
        }
        true
    }

    /// Sends the full update to every pending connection whose links are all known.
    fn release_pending(&mut self) {
        let ready: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.pending && c.links.iter().all(|l| self.cache.contains_key(l)))
            .map(|(id, _)| *id)
            .collect();
        for id in ready {
            let Some(conn) = self.conns.get(&id) else {
                continue;
            };
            let text = self.full_update(conn);
            if let Some(conn) = self.conns.get_mut(&id) {
                conn.pending = false;
                let out = Outbound::update(text, None);
                Self::send_to(&self.page, id, conn, out);
            }
        }
    }

    /// The counter refused to track these links (page cap): every connection
    /// that asked for them is told `overloaded` and keeps the rest of its set.
    fn refuse_links(&mut self, refused: &[PageId]) {
        for link in refused {
            self.refs.remove(link);
            self.cache.remove(link);
        }
        let page = &self.page;
        for (id, conn) in self.conns.iter_mut() {
            let dropped: Vec<&PageId> = refused.iter().filter(|l| conn.links.remove(*l)).collect();
            if dropped.is_empty() {
                continue;
            }
            let error = ProtocolError::new(
                "overloaded",
                format!(
                    "the server tracks the most pages it may; not following {} link(s), e.g. {:?}",
                    dropped.len(),
                    &**dropped[0]
                ),
            );
            crate::metrics::error_sent(error.code);
            let out = Outbound::text(error.to_json());
            Self::send_to(page, *id, conn, out);
        }
    }

    fn drop_links(&mut self, links: &HashSet<PageId>, gone: &mut Vec<PageId>) {
        for link in links {
            if let Some(f) = self.refs.get_mut(link) {
                f.conns -= 1;
                if f.conns == 0 {
                    self.refs.remove(link);
                    self.cache.remove(link);
                    gone.push(link.clone());
                }
            }
        }
    }
}

impl Actor for PageRoom {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        match self.storage.load_room(&self.page) {
            Ok(Some(record)) => {
                self.last_links = record.links.into_iter().map(PageId::from).collect();
            }
            Ok(None) => {}
            Err(e) => tracing::error!(page = %self.page, error = %e, "room record unreadable"),
        }
        let idle = self.settings.room.idle_timeout;
        let every = (idle / 4).max(Duration::from_millis(10));
        ctx.run_interval(every, move |act, _| {
            let Some(since) = act.idle_since else { return };
            if since.elapsed() >= idle && act.idle_reported != Some(act.processed) {
                act.idle_reported = Some(act.processed);
                act.shard.do_send(RoomIdle {
                    page: act.page.clone(),
                    uid: act.uid,
                    processed: act.processed,
                });
            }
        });
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.save();
    }
}

impl Handler<Join> for PageRoom {
    type Result = ();
    fn handle(&mut self, msg: Join, ctx: &mut Context<Self>) {
        self.processed += 1;
        let mut tx = msg.tx;
        if self.closing {
            let _ = tx.try_send(Outbound::Shutdown);
        }
        self.conns.insert(
            msg.conn,
            Conn {
                tx: Some(tx),
                writer: msg.writer,
                links: HashSet::new(),
                pending: false,
            },
        );
        self.opened += 1;
        self.idle_since = None;
        self.report_count();
        self.mark_dirty(ctx);
    }
}

impl Handler<crate::shard::CloseAll> for PageRoom {
    type Result = ();
    fn handle(&mut self, _: crate::shard::CloseAll, _: &mut Context<Self>) {
        self.closing = true;
        for (id, conn) in self.conns.iter_mut() {
            Self::send_to(&self.page, *id, conn, Outbound::Shutdown);
        }
    }
}

impl Handler<Leave> for PageRoom {
    type Result = ();
    fn handle(&mut self, msg: Leave, ctx: &mut Context<Self>) {
        self.processed += 1;
        let Some(conn) = self.conns.remove(&msg.conn) else {
            return;
        };
        let mut gone = Vec::new();
        self.drop_links(&conn.links, &mut gone);
        if !gone.is_empty() {
            self.counter.do_send(Unsubscribe {
                room: self.uid,
                links: gone,
            });
        }
        if self.conns.is_empty() {
            self.idle_since = Some(Instant::now());
        }
        self.report_count();
        self.mark_dirty(ctx);
    }
}

impl Handler<SetLinks> for PageRoom {
    type Result = ();
    fn handle(&mut self, msg: SetLinks, ctx: &mut Context<Self>) {
        self.processed += 1;
        let Some(conn) = self.conns.get_mut(&msg.conn) else {
            return;
        };
        if !msg.links.is_empty() {
            self.last_links.clone_from(&msg.links);
        }
        let new: HashSet<PageId> = msg.links.into_iter().collect();
        let old = std::mem::replace(&mut conn.links, new.clone());
        let mut added = Vec::new();
        let req = self.last_req + 1;
        for link in new.difference(&old) {
            let f = self
                .refs
                .entry(link.clone())
                .or_insert(Followed { conns: 0, req });
            f.conns += 1;
            if f.conns == 1 {
                added.push(link.clone());
            }
        }
        let removed: HashSet<PageId> = old.difference(&new).cloned().collect();
        let mut gone = Vec::new();
        self.drop_links(&removed, &mut gone);
        if !gone.is_empty() {
            self.counter.do_send(Unsubscribe {
                room: self.uid,
                links: gone,
            });
        }
        if !added.is_empty() {
            self.last_req = req;
            self.counter.do_send(Subscribe {
                room: self.uid,
                addr: ctx.address(),
                links: added,
                req,
            });
        }
        let Some(conn) = self.conns.get_mut(&msg.conn) else {
            return;
        };
        conn.pending = true;
        self.release_pending();
        self.mark_dirty(ctx);
    }
}

impl Handler<Counts> for PageRoom {
    type Result = ();
    fn handle(&mut self, msg: Counts, ctx: &mut Context<Self>) {
        if self.apply_counts(msg.changes, msg.since) {
            self.release_pending();
            self.mark_dirty(ctx);
        }
    }
}

impl Handler<Subscribed> for PageRoom {
    type Result = ();
    fn handle(&mut self, msg: Subscribed, ctx: &mut Context<Self>) {
        // Refusals of links asked for again since are stale: the newer
        // answer decides.
        let refused: Vec<PageId> = msg
            .refused
            .into_iter()
            .filter(|l| self.refs.get(l).is_some_and(|f| f.req == msg.req))
            .collect();
        if !refused.is_empty() {
            self.refuse_links(&refused);
            // The counter may follow a refused link for this room anyway: a
            // rebuild's `RoomState` (sent while this answer was held) lists
            // every link the room had. Unfollowing is a no-op otherwise.
            self.counter.do_send(Unsubscribe {
                room: self.uid,
                links: refused,
            });
        }
        self.apply_counts(msg.counts, None);
        self.release_pending();
        self.mark_dirty(ctx);
    }
}

impl Handler<ReportState> for PageRoom {
    type Result = ();
    fn handle(&mut self, msg: ReportState, ctx: &mut Context<Self>) {
        self.counter.do_send(RoomState {
            epoch: msg.epoch,
            room: self.uid,
            addr: ctx.address(),
            page: self.page.clone(),
            count: self.conns.len() as u64,
            links: self.refs.keys().cloned().collect(),
        });
    }
}

impl Handler<StopRoom> for PageRoom {
    type Result = ();
    fn handle(&mut self, _: StopRoom, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

impl Handler<SaveRecord> for PageRoom {
    type Result = ();
    fn handle(&mut self, _: SaveRecord, _: &mut Context<Self>) {
        self.save();
    }
}

#[cfg(test)]
mod tests {
    use super::Subset;

    #[test]
    fn subsets_are_bitsets_that_compare_by_content() {
        let mut a = Subset::new(1);
        assert!(a.is_empty());
        a.set(0);
        a.set(63);
        assert_eq!(a.iter(64).collect::<Vec<_>>(), vec![0, 63]);
        let mut b = Subset::new(3);
        b.set(5);
        b.set(130);
        assert_eq!(b.iter(131).collect::<Vec<_>>(), vec![5, 130]);
        let mut c = Subset::new(3);
        c.set(130);
        c.set(5);
        assert_eq!(b, c);
        assert!(!b.is_empty());
    }
}
