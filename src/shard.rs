//! Shards: one `Shard` actor per HTTP worker arbiter (one per core by default).
//! A page id hashes to one shard; that shard's actor is the only owner of the
//! map from page id to `PageRoom`, so looking up or creating a room never
//! takes a lock. Sessions send their `Join`/`SetLinks`/`Leave` to the shard,
//! which forwards them to the room on the same thread, in order.
//!
//! Idle rooms: a room that has just lost its last connection reports
//! `RoomIdle` with the number of routed messages it has handled. If that
//! equals the number its shard forwarded, no message is in flight to it, and
//! the shard lists it in the process-wide [`IdleRooms`] index, oldest first;
//! the next message forwarded to it takes it off. A listed room may be
//! stopped at any time without losing a message: after `room.idle_timeout`
//! (each shard's timer), or at once when a new page needs a room at
//! `limits.max_rooms` (the least recently active one goes first, on any
//! shard). A new page is refused only when no room is idle.
//!
//! Recovery: every handler's body and the eviction timer run through
//! [`crate::supervise::contain`]. A shard that caught a panic keeps serving
//! and keeps its page → room map: restarting it would lose the map, and
//! with it the only way to reach the rooms, which hold the connections
//! (the source of truth). It re-verifies instead: the interrupted message is
//! finished the safe way (a `Join`, `SetLinks` or `Leave` is routed again,
//! which a room handles once; a `Join` for a page that has no room is
//! refused with `overloaded` and 1013, so the client reconnects), its
//! share of the room count is recounted from the map, its idle listings
//! are dropped, and every room gets [`Reverify`]: it re-reports its state
//! and re-subscribes its links (a delivery the panic cut is made good by
//! the counter's answer) and lists itself idle again if it is. The
//! server's [`Health`] reports the shard recovering until every room
//! answered.

use std::{
    collections::{BTreeMap, HashMap},
    hash::{Hash, Hasher},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::{Duration, Instant},
};

use actix::prelude::*;

use crate::{
    config::Settings,
    counter::{
        Counter, Deliver, Epoch, Frames, Resync, RoomId, SetShards, ShardLink, ShardRooms, ToRoom,
    },
    delivery::{End, Mailbox},
    metrics::RoomEviction,
    protocol::{close, ErrorCode, PageId, ProtocolError},
    room::{
        CloseAll, Join, Leave, PageRoom, ReportState, Reverify, RoomIdle, SaveRecord, SetLinks,
        StopRoom,
    },
    storage::Storage,
    supervise::{ActorKind, Health, RecoverInPlace},
};

// ---------------------------------------------------------------- messages

/// Stop this idle room if it is still idle under this listing (`seq`); the
/// sender took it off the index. When it is not (a connection came back) and
/// `reclaim` is set, stop the next idle room instead: a new room was let in
/// on the promise of one going.
#[derive(Message)]
#[rtype(result = "()")]
struct Evict {
    page: PageId,
    room: RoomId,
    seq: u64,
    reclaim: bool,
}

/// Save every room record (shutdown); answers when done.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct SaveAll;

/// Final step of a shutdown: stop every room and the shard itself (the
/// worker threads that host them may outlive the HTTP server).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct StopShard;

/// Number of live rooms on this shard (the `rooms` gauge and `/api/v1/stats`).
#[derive(Message)]
#[rtype(result = "usize")]
pub struct CountRooms;

/// Test hook: the live room of a page on this shard, if any (a test hands
/// it a message as the counter would).
#[cfg(feature = "test-hooks")]
#[derive(Message)]
#[rtype(result = "Option<Addr<PageRoom>>")]
pub struct RoomOf(pub PageId);

/// Test hook: panic in the shard's handler after scrambling its idle
/// listings, as a bug would (contained: the shard re-verifies its rooms).
#[cfg(feature = "test-hooks")]
#[derive(Message)]
#[rtype(result = "()")]
pub struct PanicShard;

// ---------------------------------------------------------------- state

/// A live room as its shard knows it.
struct Slot {
    /// The room actor.
    addr: Addr<PageRoom>,
    /// Its id (to ignore idle reports of a replaced room).
    room: RoomId,
    /// Routed messages forwarded to it.
    forwarded: u64,
    /// Its key in the idle index while it is listed there.
    idle: Option<u64>,
}

/// One idle room in the index.
struct IdleRoom {
    /// Index of the shard that owns it.
    shard: usize,
    page: PageId,
    room: RoomId,
    /// When it was listed.
    since: Instant,
}

/// The idle rooms of every shard, least recently active first (keys are
/// issued in order). Taken by a shard only when one of its rooms becomes
/// idle or busy again, or to stop one.
#[derive(Default)]
pub(crate) struct IdleRooms {
    next: u64,
    order: BTreeMap<u64, IdleRoom>,
}

pub struct Shard {
    /// This shard's index.
    index: usize,
    /// Rooms report here.
    counter: Addr<Counter>,
    /// Rooms write their records here.
    storage: Storage,
    /// Shared settings.
    settings: Arc<Settings>,
    /// The rooms of this shard, by page id.
    rooms: HashMap<PageId, Slot>,
    /// Rooms alive on all shards (for `limits.max_rooms`).
    rooms_alive: Arc<AtomicUsize>,
    /// Every shard, and the idle index they share.
    shards: Shards,
    /// Set by [`CloseAll`]: no new rooms, joins are told to close.
    closing: bool,
    /// This shard's share of `rooms_alive` (recounted after a panic).
    counted: usize,
    /// What `/readyz` reads of its recovery.
    health: Arc<Health>,
}

impl Shard {
    /// Counts a room more in `rooms_alive`; returns the count before.
    fn count_room(&mut self) -> usize {
        self.counted += 1;
        self.rooms_alive.fetch_add(1, Ordering::SeqCst)
    }

    /// Counts a room less in `rooms_alive`.
    fn uncount_room(&mut self) {
        self.counted = self.counted.saturating_sub(1);
        self.rooms_alive.fetch_sub(1, Ordering::SeqCst);
    }

    /// After a panic: recounts this shard's rooms in `rooms_alive`, drops
    /// its idle listings, and has every room re-verify (module doc).
    fn recover(&mut self) {
        let recovering = self.health.shard_recovering();
        let have = self.rooms.len();
        if have > self.counted {
            self.rooms_alive
                .fetch_add(have - self.counted, Ordering::SeqCst);
        } else {
            self.rooms_alive
                .fetch_sub(self.counted - have, Ordering::SeqCst);
        }
        self.counted = have;
        let index = self.index;
        self.idle().order.retain(|_, r| r.shard != index);
        for slot in self.rooms.values_mut() {
            slot.idle = None;
            slot.forwarded += 1;
            // In order with the messages routed before (`do_send` never
            // waits for room in the mailbox, so nothing overtakes it).
            slot.addr.do_send(Reverify {
                forwarded: slot.forwarded,
                _recovering: recovering.clone(),
            });
        }
        tracing::warn!(shard = index, rooms = have, "shard re-verifying its rooms");
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, IdleRooms> {
        // The index is never left half-updated, so a poisoned lock is usable.
        self.shards
            .inner
            .idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn route<M>(&mut self, page: &PageId, msg: M)
    where
        M: Message<Result = ()> + Send + 'static,
        PageRoom: Handler<M>,
    {
        let Some(slot) = self.rooms.get_mut(page) else {
            return;
        };
        slot.forwarded += 1;
        slot.addr.do_send(msg);
        if let Some(seq) = slot.idle.take() {
            self.idle().order.remove(&seq);
        }
    }

    /// Stops the room of `page` if it is the idle room listed under `seq`
    /// (already taken off the index by the caller).
    fn evict(&mut self, page: &PageId, room: RoomId, seq: u64, why: RoomEviction) -> bool {
        let listed = self
            .rooms
            .get(page)
            .is_some_and(|s| s.room == room && s.idle == Some(seq));
        if !listed {
            return false;
        }
        let Some(slot) = self.rooms.remove(page) else {
            return false;
        };
        self.uncount_room();
        crate::metrics::room_evicted(why);
        tracing::debug!(page = %page, why = why.label(), "idle room stopped");
        slot.addr.do_send(StopRoom);
        true
    }

    /// At `limits.max_rooms`: stops the least recently active idle room, on
    /// this shard at once or on another through [`Evict`]. False when no
    /// room is idle.
    fn make_room(&mut self) -> bool {
        loop {
            let Some((seq, idle)) = self.idle().order.pop_first() else {
                return false;
            };
            if idle.shard == self.index {
                if self.evict(&idle.page, idle.room, seq, RoomEviction::Cap) {
                    return true;
                }
                continue;
            }
            if self.send_evict(idle, seq, true) {
                return true;
            }
        }
    }

    /// Asks the shard that owns `idle` to stop it (see [`Evict`]); false if
    /// that shard is not hosted.
    fn send_evict(&self, idle: IdleRoom, seq: u64, reclaim: bool) -> bool {
        let Some(h) = self
            .shards
            .inner
            .slots
            .get(idle.shard)
            .and_then(|s| s.get())
        else {
            return false;
        };
        h.addr.do_send(Evict {
            page: idle.page,
            room: idle.room,
            seq,
            reclaim,
        });
        true
    }

    /// Stops every room idle for `room.idle_timeout`, and the least recently
    /// active past `limits.max_idle_rooms` (on any shard).
    fn evict_expired(&mut self) {
        let timeout = self.settings.room.idle_timeout;
        let max_idle = self.settings.limits.max_idle_rooms;
        loop {
            let expired = {
                let mut idle = self.idle();
                let excess = idle.order.len() > max_idle;
                match idle.order.first_entry() {
                    Some(e) if excess || e.get().since.elapsed() >= timeout => {
                        Some(e.remove_entry())
                    }
                    _ => None,
                }
            };
            let Some((seq, idle)) = expired else { return };
            if idle.shard == self.index {
                self.evict(&idle.page, idle.room, seq, RoomEviction::Idle);
            } else {
                self.send_evict(idle, seq, false);
            }
        }
    }
}

impl RecoverInPlace for Shard {
    const KIND: ActorKind = ActorKind::Shard;
    fn recover_in_place(&mut self, _: &mut Context<Self>) {
        self.recover();
    }
}

impl Actor for Shard {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let every = (self.settings.room.idle_timeout / 4)
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        ctx.run_interval(every, |act, ctx| {
            act.guard(ctx, "eviction timer", |act, _| act.evict_expired(), |_| {});
        });
    }
}

/// Ends a connection the shard did not place (room cap, or a fault):
/// `overloaded`, then 1013, so the client reconnects with backoff.
fn refuse(mailbox: &Mailbox, message: &'static str, reason: &'static str) {
    crate::metrics::error_sent(ErrorCode::Overloaded);
    let error = ProtocolError::new(ErrorCode::Overloaded, message);
    mailbox.end(End::Refuse {
        error: error.to_json().into(),
        code: close::TRY_AGAIN_LATER,
        reason,
    });
}

impl Shard {
    /// Places a connection in its page's room, creating the room if needed.
    fn join(&mut self, msg: Join, ctx: &mut Context<Self>) {
        if self.closing && !self.rooms.contains_key(&msg.page) {
            msg.mailbox.end(End::Shutdown);
            return;
        }
        if !self.rooms.contains_key(&msg.page) {
            let max = self.settings.limits.max_rooms;
            if self.count_room() >= max && !self.make_room() {
                self.uncount_room();
                tracing::info!(page = %msg.page, max_rooms = max, "room cap reached; connection refused");
                crate::metrics::connection_refused(crate::metrics::Refused::MaxRooms);
                refuse(
                    &msg.mailbox,
                    "the server holds the most pages it may; try again later",
                    "overloaded: room limit reached",
                );
                return;
            }
            self.open_room(&msg.page, ctx);
        }
        let page = msg.page.clone();
        self.route(&page, msg);
    }

    /// Starts the room of `page` (already counted in `rooms_alive`).
    fn open_room(&mut self, page: &PageId, ctx: &mut Context<Self>) {
        let id = RoomId::fresh();
        let room = PageRoom::new(
            page.clone(),
            id,
            self.index,
            ctx.address().recipient(),
            self.counter.clone(),
            self.storage.clone(),
            self.settings.clone(),
        );
        let addr = room.start();
        self.rooms.insert(
            page.clone(),
            Slot {
                addr,
                room: id,
                forwarded: 0,
                idle: None,
            },
        );
    }
}

impl Handler<Join> for Shard {
    type Result = ();
    fn handle(&mut self, msg: Join, ctx: &mut Context<Self>) {
        let again = Join {
            page: msg.page.clone(),
            conn: msg.conn,
            mailbox: msg.mailbox.clone(),
            visitor: msg.visitor,
        };
        // After a panic: the room (which adds a connection once) gets the
        // join again; without a room the client is told to come back.
        let settle = |act: &mut Self| {
            if act.rooms.contains_key(&again.page) {
                let page = again.page.clone();
                act.route(&page, again);
            } else {
                refuse(
                    &again.mailbox,
                    "the server could not place this connection; try again",
                    "overloaded: internal fault",
                );
            }
        };
        self.guard(ctx, "Join", |act, ctx| act.join(msg, ctx), settle);
    }
}

impl Handler<SetLinks> for Shard {
    type Result = ();
    fn handle(&mut self, msg: SetLinks, ctx: &mut Context<Self>) {
        let again = SetLinks {
            page: msg.page.clone(),
            conn: msg.conn,
            links: msg.links.clone(),
            visitors: msg.visitors,
        };
        let settle = |act: &mut Self| act.route(&again.page.clone(), again);
        self.guard(
            ctx,
            "SetLinks",
            |act, _| act.route(&msg.page.clone(), msg),
            settle,
        );
    }
}

impl Handler<Leave> for Shard {
    type Result = ();
    fn handle(&mut self, msg: Leave, ctx: &mut Context<Self>) {
        let again = Leave {
            page: msg.page.clone(),
            conn: msg.conn,
        };
        let settle = |act: &mut Self| act.route(&again.page.clone(), again);
        self.guard(
            ctx,
            "Leave",
            |act, _| act.route(&msg.page.clone(), msg),
            settle,
        );
    }
}

impl Handler<RoomIdle> for Shard {
    type Result = ();
    fn handle(&mut self, msg: RoomIdle, ctx: &mut Context<Self>) {
        self.guard(ctx, "RoomIdle", |act, _| act.room_idle(msg), |_| {});
    }
}

impl Shard {
    /// Lists a room that reported itself empty as idle, if no routed
    /// message is in flight to it.
    fn room_idle(&mut self, msg: RoomIdle) {
        let index = self.index;
        let Some(slot) = self.rooms.get_mut(&msg.page) else {
            return;
        };
        if slot.room != msg.room || slot.forwarded != msg.processed || slot.idle.is_some() {
            return;
        }
        let mut idle = self
            .shards
            .inner
            .idle
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let seq = idle.next;
        idle.next += 1;
        idle.order.insert(
            seq,
            IdleRoom {
                shard: index,
                page: msg.page,
                room: msg.room,
                since: Instant::now(),
            },
        );
        slot.idle = Some(seq);
    }
}

impl Handler<Evict> for Shard {
    type Result = ();
    fn handle(&mut self, msg: Evict, ctx: &mut Context<Self>) {
        let why = if msg.reclaim {
            RoomEviction::Cap
        } else {
            RoomEviction::Idle
        };
        let evict = |act: &mut Self, _: &mut Context<Self>| {
            if !act.evict(&msg.page, msg.room, msg.seq, why) && msg.reclaim {
                // The room was busy again: keep the promise with another one.
                act.make_room();
            }
        };
        self.guard(ctx, "Evict", evict, |_| {});
    }
}

impl Handler<Deliver> for Shard {
    type Result = ();
    /// Hands a publish's items to their rooms, on this thread; the rooms
    /// share one [`Frames`] so equal frames are serialized once here. (A
    /// panic may cut the batch: the rooms' re-verification makes it good.)
    fn handle(&mut self, msg: Deliver, ctx: &mut Context<Self>) {
        msg.backlog.handled(msg.seq, msg.sent);
        let deliver = |_: &mut Self, _: &mut Context<Self>| {
            let frames = Arc::new(Frames::default());
            for (to, item) in msg.items {
                let item = match item {
                    ToRoom::Counts(mut c) => {
                        c.frames = Some(frames.clone());
                        ToRoom::Counts(c)
                    }
                    answer => answer,
                };
                to.hand(item);
            }
        };
        self.guard(ctx, "Deliver", deliver, |_| {});
    }
}

impl Shard {
    /// Asks every room to report its state for the counter's rebuild
    /// `epoch`, and tells the counter which rooms it asked.
    fn resync(&mut self, epoch: Epoch) {
        let mut rooms = Vec::with_capacity(self.rooms.len());
        for slot in self.rooms.values() {
            slot.addr.do_send(ReportState { epoch });
            rooms.push(slot.room);
        }
        self.counter.do_send(ShardRooms {
            epoch,
            shard: self.index,
            rooms,
        });
    }
}

impl Handler<Resync> for Shard {
    type Result = ();
    fn handle(&mut self, msg: Resync, ctx: &mut Context<Self>) {
        let epoch = msg.epoch;
        // After a panic: asked again (a room reports each time; the last counts).
        let settle = move |act: &mut Self| act.resync(epoch);
        self.guard(ctx, "Resync", move |act, _| act.resync(epoch), settle);
    }
}

impl Handler<SaveAll> for Shard {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: SaveAll, ctx: &mut Context<Self>) -> Self::Result {
        let sends = self.guard(
            ctx,
            "SaveAll",
            |act, _| {
                let rooms = act.rooms.values();
                rooms.map(|s| s.addr.send(SaveRecord)).collect::<Vec<_>>()
            },
            |_| {},
        );
        Box::pin(async move {
            for s in sends.unwrap_or_default() {
                let _ = s.await;
            }
        })
    }
}

impl Handler<CloseAll> for Shard {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: CloseAll, ctx: &mut Context<Self>) -> Self::Result {
        self.closing = true;
        let sends = self.guard(
            ctx,
            "CloseAll",
            |act, _| {
                let rooms = act.rooms.values();
                rooms.map(|s| s.addr.send(CloseAll)).collect::<Vec<_>>()
            },
            |act| {
                for s in act.rooms.values() {
                    s.addr.do_send(CloseAll);
                }
            },
        );
        Box::pin(async move {
            for s in sends.unwrap_or_default() {
                let _ = s.await;
            }
        })
    }
}

impl Handler<StopShard> for Shard {
    type Result = ();
    fn handle(&mut self, _: StopShard, ctx: &mut Context<Self>) {
        let stop = |act: &mut Self, _: &mut Context<Self>| {
            let index = act.index;
            act.idle().order.retain(|_, r| r.shard != index);
            let rooms: Vec<Slot> = act.rooms.drain().map(|(_, slot)| slot).collect();
            for slot in rooms {
                slot.addr.do_send(StopRoom);
                act.uncount_room();
            }
        };
        self.guard(ctx, "StopShard", stop, |_| {});
        ctx.stop();
    }
}

#[cfg(feature = "test-hooks")]
impl Handler<RoomOf> for Shard {
    type Result = Option<Addr<PageRoom>>;
    fn handle(&mut self, msg: RoomOf, _: &mut Context<Self>) -> Self::Result {
        self.rooms.get(&msg.0).map(|slot| slot.addr.clone())
    }
}

#[cfg(feature = "test-hooks")]
impl Handler<PanicShard> for Shard {
    type Result = ();
    fn handle(&mut self, _: PanicShard, ctx: &mut Context<Self>) {
        let scramble = |act: &mut Self, _: &mut Context<Self>| {
            // Forget the idle listings the way a bug would, then panic.
            for slot in act.rooms.values_mut() {
                slot.idle = None;
                slot.forwarded += 7;
            }
            crate::supervise::injected_panic(ActorKind::Shard)
        };
        self.guard(ctx, "PanicShard", scramble, |_| {});
    }
}

impl Handler<CountRooms> for Shard {
    type Result = usize;
    fn handle(&mut self, _: CountRooms, ctx: &mut Context<Self>) -> usize {
        self.guard(ctx, "CountRooms", |act, _| act.rooms.len(), |_| {})
            .unwrap_or(self.rooms.len())
    }
}

/// The set of shards, with the hash that picks one for a page. Cheap to clone.
///
/// Thread per core: each shard lives on one of the HTTP server's worker
/// arbiters, started there by [`Shards::host_here`] when the worker builds
/// its app, so a session whose page hashes to its own worker reaches its room
/// without crossing threads. The table is complete once every worker has
/// started ([`Shards::ready`]); until then [`Shards::for_page`] may answer
/// `None` (the HTTP handler then answers 503).
#[derive(Clone)]
pub struct Shards {
    inner: Arc<ShardsInner>,
}

/// A shard as hosted by its worker.
struct Hosted {
    /// The shard actor.
    addr: Addr<Shard>,
    /// The worker's arbiter: sessions of the shard's pages run there.
    arbiter: actix::dev::ArbiterHandle,
    /// The worker's thread (to tell whether a caller is already on it).
    thread: std::thread::ThreadId,
}

struct ShardsInner {
    /// One slot per shard, filled by the worker that hosts it.
    slots: Box<[OnceLock<Hosted>]>,
    /// Slots handed out to workers so far.
    claimed: AtomicUsize,
    /// Slots filled so far.
    filled: AtomicUsize,
    /// Wakes [`Shards::ready`] when the last slot is filled.
    all_filled: tokio::sync::Notify,
    /// What a new shard needs.
    counter: Addr<Counter>,
    storage: Storage,
    settings: Arc<Settings>,
    rooms_alive: Arc<AtomicUsize>,
    /// The idle rooms of every shard.
    idle: Mutex<IdleRooms>,
    /// The server's view of its actors' recovery.
    health: Arc<Health>,
}

impl Shards {
    /// The table of `n` shards, none started yet.
    pub(crate) fn new(
        n: usize,
        counter: Addr<Counter>,
        storage: Storage,
        settings: Arc<Settings>,
        health: Arc<Health>,
    ) -> Shards {
        Shards {
            inner: Arc::new(ShardsInner {
                slots: (0..n.max(1)).map(|_| OnceLock::new()).collect(),
                claimed: AtomicUsize::new(0),
                filled: AtomicUsize::new(0),
                all_filled: tokio::sync::Notify::new(),
                counter,
                storage,
                settings,
                rooms_alive: Arc::new(AtomicUsize::new(0)),
                idle: Mutex::new(IdleRooms::default()),
                health,
            }),
        }
    }

    /// Starts the next unhosted shard on the current arbiter (an HTTP
    /// worker's, called from its app factory). When the table is complete,
    /// the counter is given every shard's address.
    pub(crate) fn host_here(&self) {
        let inner = &self.inner;
        let index = inner.claimed.fetch_add(1, Ordering::SeqCst);
        let Some(slot) = inner.slots.get(index) else {
            // Only if actix restarts a worker after a panic: its shard is
            // gone with it; counts of its pages cannot be kept exact.
            tracing::error!(index, "an HTTP worker restarted; it hosts no shard");
            return;
        };
        let addr = Shard {
            index,
            counter: inner.counter.clone(),
            storage: inner.storage.clone(),
            settings: inner.settings.clone(),
            rooms: HashMap::new(),
            rooms_alive: inner.rooms_alive.clone(),
            shards: self.clone(),
            closing: false,
            counted: 0,
            health: inner.health.clone(),
        }
        .start();
        let _ = slot.set(Hosted {
            addr,
            arbiter: actix::Arbiter::current(),
            thread: std::thread::current().id(),
        });
        if inner.filled.fetch_add(1, Ordering::SeqCst) + 1 == inner.slots.len() {
            let links = self
                .all()
                .into_iter()
                .map(|addr| ShardLink {
                    resync: addr.clone().recipient(),
                    deliver: addr.recipient(),
                })
                .collect();
            inner.counter.do_send(SetShards(links));
            inner.all_filled.notify_waiters();
        }
    }

    /// True once every shard is hosted.
    pub(crate) fn is_ready(&self) -> bool {
        self.inner.filled.load(Ordering::SeqCst) == self.inner.slots.len()
    }

    /// Waits until every shard is hosted.
    pub(crate) async fn ready(&self) {
        loop {
            let notified = self.inner.all_filled.notified();
            if self.is_ready() {
                return;
            }
            notified.await;
        }
    }

    /// Test hook: the shard that owns `page` (`None` only before
    /// [`Shards::ready`]).
    #[cfg(feature = "test-hooks")]
    pub fn for_page(&self, page: &str) -> Option<&Addr<Shard>> {
        self.locate(page).map(|(_, addr)| addr)
    }

    /// The shard that owns `page` and its index, from one hash.
    pub fn locate(&self, page: &str) -> Option<(usize, &Addr<Shard>)> {
        let index = self.index_of(page);
        self.inner.slots[index].get().map(|h| (index, &h.addr))
    }

    /// Test hook: the idle rooms' pages, least recently active first.
    #[cfg(feature = "test-hooks")]
    pub fn idle_pages(&self) -> Vec<PageId> {
        let idle = self.inner.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.order.values().map(|r| r.page.clone()).collect()
    }

    /// The index of the shard that owns `page` (the `shard` label of metrics).
    pub(crate) fn index_of(&self, page: &str) -> usize {
        let mut h = std::hash::DefaultHasher::new();
        page.hash(&mut h);
        (h.finish() % self.inner.slots.len() as u64) as usize
    }

    /// The addresses of the shards hosted so far (all of them once ready).
    pub fn all(&self) -> Vec<Addr<Shard>> {
        self.inner
            .slots
            .iter()
            .filter_map(|s| s.get().map(|h| h.addr.clone()))
            .collect()
    }

    /// The arbiter of the worker that hosts shard `index`, unless the
    /// caller runs on that worker already (`None` then, or before it is hosted).
    pub(crate) fn home_elsewhere(&self, index: usize) -> Option<&actix::dev::ArbiterHandle> {
        let hosted = self.inner.slots.get(index)?.get()?;
        (hosted.thread != std::thread::current().id()).then_some(&hosted.arbiter)
    }
}
