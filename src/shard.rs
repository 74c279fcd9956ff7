//! Shards: one `Shard` actor per HTTP worker arbiter (one per core by default).
//! A page id hashes to one shard; that shard's actor is the only owner of the
//! map from page id to `PageRoom`, so looking up or creating a room never
//! takes a lock. Sessions send their `Join`/`SetLinks`/`Leave` to the shard,
//! which forwards them to the room on the same thread, in order.
//!
//! Eviction handshake: an empty room reports `RoomIdle` with the number of
//! routed messages it has handled; the shard removes it only if that equals
//! the number it forwarded, so no message can be in flight to a stopping room.

use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, OnceLock,
    },
};

use actix::prelude::*;

use crate::{
    config::Settings,
    counter::{Counter, SetShards, ShardRooms},
    delivery::End,
    protocol::{close, PageId, ProtocolError},
    room::{Join, Leave, PageRoom, ReportState, SaveRecord, SetLinks, StopRoom},
    storage::Storage,
};

/// Source of room uids, unique in the process.
static NEXT_ROOM_UID: AtomicU64 = AtomicU64::new(1);

// ---------------------------------------------------------------- messages

/// An empty room asks to be evicted; `processed` is how many routed messages it handled.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RoomIdle {
    pub page: PageId,
    pub uid: u64,
    pub processed: u64,
}

/// The counter restarted: ask every room to report, and list them.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Resync {
    pub epoch: u64,
}

/// Save every room record (shutdown); answers when done.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SaveAll;

/// The server is shutting down: tell every connection to close with 1001,
/// and every connection that joins from now on as soon as it joins.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CloseAll;

/// Final step of a shutdown: stop every room and the shard itself (the
/// worker threads that host them may outlive the HTTP server).
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopShard;

/// Number of live rooms on this shard.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct RoomCountQuery;

/// The live room of a page on this shard, if any (tests and diagnostics:
/// it lets a test hand a room a message as the counter would).
#[derive(Message)]
#[rtype(result = "Option<Addr<PageRoom>>")]
pub struct RoomOf(pub PageId);

// ---------------------------------------------------------------- state

/// A live room as its shard knows it.
struct Slot {
    /// The room actor.
    addr: Addr<PageRoom>,
    /// Its uid (to ignore idle reports of a replaced room).
    uid: u64,
    /// Routed messages forwarded to it.
    forwarded: u64,
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
    /// Set by [`CloseAll`]: no new rooms, joins are told to close.
    closing: bool,
}

impl Shard {
    fn route<M>(&mut self, page: &PageId, msg: M)
    where
        M: Message<Result = ()> + Send + 'static,
        PageRoom: Handler<M>,
    {
        if let Some(slot) = self.rooms.get_mut(page) {
            slot.forwarded += 1;
            slot.addr.do_send(msg);
        }
    }
}

impl Actor for Shard {
    type Context = Context<Self>;
}

impl Handler<Join> for Shard {
    type Result = ();
    fn handle(&mut self, msg: Join, ctx: &mut Context<Self>) {
        if self.closing && !self.rooms.contains_key(&msg.page) {
            msg.mailbox.end(End::Shutdown);
            return;
        }
        if !self.rooms.contains_key(&msg.page) {
            let max = self.settings.limits.max_rooms;
            if self.rooms_alive.fetch_add(1, Ordering::SeqCst) >= max {
                self.rooms_alive.fetch_sub(1, Ordering::SeqCst);
                tracing::info!(page = %msg.page, max_rooms = max, "room cap reached; connection refused");
                crate::metrics::connection_refused(crate::metrics::Refused::MaxRooms);
                crate::metrics::error_sent("overloaded");
                let error = ProtocolError::new(
                    "overloaded",
                    "the server holds the most pages it may; try again later",
                );
                msg.mailbox.end(End::Refuse {
                    error: error.to_json().into(),
                    code: close::TRY_AGAIN_LATER,
                    reason: "overloaded: room limit reached",
                });
                return;
            }
            let uid = NEXT_ROOM_UID.fetch_add(1, Ordering::Relaxed);
            let room = PageRoom::new(
                msg.page.clone(),
                uid,
                ctx.address(),
                self.counter.clone(),
                self.storage.clone(),
                self.settings.clone(),
            );
            let addr = room.start();
            self.rooms.insert(
                msg.page.clone(),
                Slot {
                    addr,
                    uid,
                    forwarded: 0,
                },
            );
        }
        let page = msg.page.clone();
        self.route(&page, msg);
    }
}

impl Handler<SetLinks> for Shard {
    type Result = ();
    fn handle(&mut self, msg: SetLinks, _: &mut Context<Self>) {
        let page = msg.page.clone();
        self.route(&page, msg);
    }
}

impl Handler<Leave> for Shard {
    type Result = ();
    fn handle(&mut self, msg: Leave, _: &mut Context<Self>) {
        let page = msg.page.clone();
        self.route(&page, msg);
    }
}

impl Handler<RoomIdle> for Shard {
    type Result = ();
    fn handle(&mut self, msg: RoomIdle, _: &mut Context<Self>) {
        let evict = self
            .rooms
            .get(&msg.page)
            .is_some_and(|s| s.uid == msg.uid && s.forwarded == msg.processed);
        if evict {
            if let Some(slot) = self.rooms.remove(&msg.page) {
                self.rooms_alive.fetch_sub(1, Ordering::SeqCst);
                crate::metrics::room_evicted();
                tracing::debug!(page = %msg.page, "idle room stopped");
                slot.addr.do_send(StopRoom);
            }
        }
    }
}

impl Handler<Resync> for Shard {
    type Result = ();
    fn handle(&mut self, msg: Resync, _: &mut Context<Self>) {
        let mut rooms = Vec::with_capacity(self.rooms.len());
        for slot in self.rooms.values() {
            slot.addr.do_send(ReportState { epoch: msg.epoch });
            rooms.push(slot.uid);
        }
        self.counter.do_send(ShardRooms {
            epoch: msg.epoch,
            shard: self.index,
            rooms,
        });
    }
}

impl Handler<SaveAll> for Shard {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: SaveAll, _: &mut Context<Self>) -> Self::Result {
        let sends: Vec<_> = self
            .rooms
            .values()
            .map(|s| s.addr.send(SaveRecord))
            .collect();
        Box::pin(async move {
            for s in sends {
                let _ = s.await;
            }
        })
    }
}

impl Handler<CloseAll> for Shard {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: CloseAll, _: &mut Context<Self>) -> Self::Result {
        self.closing = true;
        let sends: Vec<_> = self.rooms.values().map(|s| s.addr.send(CloseAll)).collect();
        Box::pin(async move {
            for s in sends {
                let _ = s.await;
            }
        })
    }
}

impl Handler<StopShard> for Shard {
    type Result = ();
    fn handle(&mut self, _: StopShard, ctx: &mut Context<Self>) {
        for (_, slot) in self.rooms.drain() {
            slot.addr.do_send(StopRoom);
            self.rooms_alive.fetch_sub(1, Ordering::SeqCst);
        }
        ctx.stop();
    }
}

impl Handler<RoomOf> for Shard {
    type Result = Option<Addr<PageRoom>>;
    fn handle(&mut self, msg: RoomOf, _: &mut Context<Self>) -> Self::Result {
        self.rooms.get(&msg.0).map(|slot| slot.addr.clone())
    }
}

impl Handler<RoomCountQuery> for Shard {
    type Result = usize;
    fn handle(&mut self, _: RoomCountQuery, _: &mut Context<Self>) -> usize {
        self.rooms.len()
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
}

impl Shards {
    /// The table of `n` shards, none started yet.
    pub fn new(
        n: usize,
        counter: Addr<Counter>,
        storage: Storage,
        settings: Arc<Settings>,
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
            }),
        }
    }

    /// Starts the next unhosted shard on the current arbiter (an HTTP
    /// worker's, called from its app factory). When the table is complete,
    /// the counter is given every shard's address.
    pub fn host_here(&self) {
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
            closing: false,
        }
        .start();
        let _ = slot.set(Hosted {
            addr,
            arbiter: actix::Arbiter::current(),
            thread: std::thread::current().id(),
        });
        if inner.filled.fetch_add(1, Ordering::SeqCst) + 1 == inner.slots.len() {
            inner.counter.do_send(SetShards(self.all()));
            inner.all_filled.notify_waiters();
        }
    }

    /// True once every shard is hosted.
    pub fn is_ready(&self) -> bool {
        self.inner.filled.load(Ordering::SeqCst) == self.inner.slots.len()
    }

    /// Waits until every shard is hosted.
    pub async fn ready(&self) {
        loop {
            let notified = self.inner.all_filled.notified();
            if self.is_ready() {
                return;
            }
            notified.await;
        }
    }

    /// The shard that owns `page` (`None` only before [`Shards::ready`]).
    pub fn for_page(&self, page: &str) -> Option<&Addr<Shard>> {
        self.locate(page).map(|(_, addr)| addr)
    }

    /// The shard that owns `page` and its index, from one hash.
    pub fn locate(&self, page: &str) -> Option<(usize, &Addr<Shard>)> {
        let index = self.index_of(page);
        self.inner.slots[index].get().map(|h| (index, &h.addr))
    }

    /// The index of the shard that owns `page` (the `shard` label of metrics).
    pub fn index_of(&self, page: &str) -> usize {
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
    pub fn home_elsewhere(&self, index: usize) -> Option<&actix::dev::ArbiterHandle> {
        let hosted = self.inner.slots.get(index)?.get()?;
        (hosted.thread != std::thread::current().id()).then_some(&hosted.arbiter)
    }
}

/// Stops arbiters and joins their threads off the async runtime.
pub async fn stop_and_join(arbiters: Vec<Arbiter>) {
    for a in &arbiters {
        a.stop();
    }
    let joined = actix_web::rt::task::spawn_blocking(move || {
        for a in arbiters {
            let _ = a.join();
        }
    })
    .await;
    if joined.is_err() {
        tracing::error!("an arbiter thread panicked while stopping");
    }
}
