//! The `Counter`: the singleton that knows every page's live [`Tally`]
//! (connections and distinct visitors) and which rooms follow it, applies
//! changes at once and publishes them: at once when nothing went out in the
//! last `broadcast_interval`, else coalesced into one publish an interval
//! after the last. The logic is a plain state machine (`state.rs`); the actor
//! owns it, runs its timers, sends what it returns and writes the stats.
//!
//! It runs on its own arbiter under [`actix::Supervisor`]. Every handler's
//! body and every timer runs through [`supervise::contain`]: a panic there is
//! caught (logged, counted), the server's [`Health`] says the counter is
//! recovering, a read gets no answer (its `send` fails at once, so HTTP
//! answers 503) and the actor stops. So does a dispatch after which the
//! state reports an inconsistency (`State::take_fault`: a page's subscriber
//! that is no follower room, whose connections would never hear of it). The supervisor then calls
//! [`Supervised::restarting`], which drops all live state, and `started`
//! asks every shard to re-report its rooms: rooms are the source of truth,
//! so counts stay exact across a counter restart. Readiness returns once
//! that rebuild completes. A test's injected fault takes the same path
//! (`ctx.stop()` without a panic).
//!
//! Storage errors (stats, history, trim, expiry, flush) are logged at `warn`
//! with what failed and counted in `link_counter_storage_errors_total{op}`;
//! the write queue is kept and retried at the next snapshot.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use actix::{dev::ToEnvelope, prelude::*};

use crate::{
    cluster::{self, Cluster},
    config::Settings,
    delivery::Update,
    metrics::StorageOp,
    protocol::{PageId, PageInfo, Tally},
    storage::{PageStats, Resolution, Storage, StorageError, SITE},
    supervise::{contain, ActorKind, Answer, Health},
    time::{now_ms, rfc3339},
    visitor::NodeVisitors,
};

mod peaks;
mod state;

use peaks::Peaks;

pub(crate) use state::{Epoch, RoomId};

/// Test hook: the counter's state machine without its actor, for the
/// micro-benchmarks (`benches/micro.rs`).
#[cfg(feature = "test-hooks")]
pub mod bare {
    pub use super::state::{Effect, LoadStats, Now, Outbox, PageOf, RoomId, State};
}

use state::{Effect, LoadStats, Now, Outbox, RoomReport, State, ToCluster};

// ---------------------------------------------------------------- messages

/// A room's own tally (absolute), plus connections opened since its last report.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RoomCount {
    pub page: PageId,
    pub tally: Tally,
    pub opened: u64,
}

/// A room starts following these links (first of its connections to ask for
/// them). Answered with [`Subscribed`], in order with later [`Counts`].
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Subscribe {
    pub(crate) room: RoomId,
    /// Where the answer and later counts go.
    pub(crate) to: Arc<RoomHandle>,
    pub(crate) links: Vec<PageId>,
    /// The room's id of this request, echoed in the answer
    /// ([`Subscribed::req`]): a refusal only applies to a link whose latest
    /// request it answers.
    pub(crate) req: u64,
}

/// A room stops following these links (last of its connections dropped them).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Unsubscribe {
    pub(crate) room: RoomId,
    pub(crate) links: Vec<PageId>,
}

/// A room's whole state, sent in answer to a resync of `epoch`.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct RoomState {
    pub(crate) epoch: Epoch,
    pub(crate) room: RoomId,
    /// Where counts go.
    pub(crate) to: Arc<RoomHandle>,
    pub(crate) page: PageId,
    pub(crate) tally: Tally,
    pub(crate) links: Vec<PageId>,
}

/// A shard's list of the rooms it asked to report for resync `epoch`.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct ShardRooms {
    pub(crate) epoch: Epoch,
    pub(crate) shard: usize,
    pub(crate) rooms: Vec<RoomId>,
}

/// Where the counter reaches one shard: its resync and its deliveries.
pub(crate) struct ShardLink {
    pub(crate) resync: Recipient<Resync>,
    pub(crate) deliver: Recipient<Deliver>,
}

/// The shards, by index, given once after they are started.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct SetShards(pub Vec<ShardLink>);

/// The cluster module's address (cluster mode only), given once after it is started.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct SetCluster(pub Addr<Cluster>);

/// Counter -> room: latest tallies of some followed links.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Counts {
    pub changes: Vec<(PageId, Tally)>,
    /// When the oldest of these changes was applied at the counter (publish lag).
    pub since: Option<Instant>,
    /// The frames already serialized for this publish on the room's shard
    /// (set by the shard): rooms whose connections follow the same changes
    /// share one frame.
    pub frames: Option<Arc<Frames>>,
}

/// The frames of one publish on one shard, by content (values and form).
/// Only the shard's thread touches it, so its lock is never contended.
#[derive(Default)]
pub struct Frames(Mutex<HashMap<FrameKey, Arc<Update>>>);

/// A frame's content: its values and whether it carries the `visitors` map.
type FrameKey = (Vec<(PageId, Tally)>, bool);

impl Frames {
    /// The frame of `values` in form `visitors`, serialized on first use.
    pub(crate) fn get(
        &self,
        values: Vec<(PageId, Tally)>,
        since: Option<Instant>,
        visitors: bool,
    ) -> Arc<Update> {
        let mut frames = self.0.lock().unwrap_or_else(|e| e.into_inner());
        frames
            .entry((values, visitors))
            .or_insert_with_key(|(values, visitors)| Update::new(values.clone(), since, *visitors))
            .clone()
    }
}

/// Counter -> shard: everything one dispatch has for the shard's rooms, in
/// the order the counter decided it (an answer before newer counts). The
/// shard hands each item to its room on its own thread: one cross-thread
/// message per shard per publish, however many rooms follow.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Deliver {
    pub(crate) items: Vec<(Arc<RoomHandle>, ToRoom)>,
    /// Where the shard says when it handled the batch.
    pub(crate) backlog: Arc<Backlog>,
    /// The batch's number and when the counter sent it.
    pub(crate) seq: u64,
    pub(crate) sent: Instant,
}

/// How far behind one shard's worker is, as the delivery budget sees it:
/// the counter notes each [`Deliver`] it sends, the shard notes when it
/// handles it (on its own thread, behind everything queued there first).
#[derive(Default)]
pub(crate) struct Backlog(Mutex<Behind>);

#[derive(Default)]
struct Behind {
    /// The last batch sent, and when.
    sent: Option<(u64, Instant)>,
    /// The last batch handled.
    handled: u64,
    /// The longest a handled batch waited since the last [`Backlog::take_lag`].
    waited: Duration,
}

impl Backlog {
    fn lock(&self) -> std::sync::MutexGuard<'_, Behind> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counter: a batch goes now; its number.
    fn send(&self, now: Instant) -> u64 {
        let mut b = self.lock();
        let seq = b.sent.map_or(1, |(seq, _)| seq + 1);
        b.sent = Some((seq, now));
        seq
    }

    /// Shard: batch `seq`, sent at `sent`, is being handled now.
    pub(crate) fn handled(&self, seq: u64, sent: Instant) {
        let waited = sent.elapsed();
        let mut b = self.lock();
        b.handled = b.handled.max(seq);
        b.waited = b.waited.max(waited);
    }

    /// Counter: the longest wait since the last call, or the age of the last
    /// batch if it is still waiting.
    fn take_lag(&self, now: Instant) -> Duration {
        let mut b = self.lock();
        let waiting = match b.sent {
            Some((seq, at)) if seq > b.handled => now.saturating_duration_since(at),
            _ => Duration::ZERO,
        };
        std::mem::take(&mut b.waited).max(waiting)
    }
}

/// One item of a [`Deliver`].
pub(crate) enum ToRoom {
    Counts(Counts),
    Subscribed(Subscribed),
}

/// Counter -> room: the answer to a [`Subscribe`]: current counts of the
/// links it accepted, and the links it refused because `limits.max_pages`
/// is reached.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Subscribed {
    pub counts: Vec<(PageId, Tally)>,
    pub refused: Vec<PageId>,
    /// The id of the [`Subscribe`] this answers.
    pub req: u64,
}

/// Counter -> shard: the counter restarted; ask every room to report, and
/// list them ([`ShardRooms`]).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Resync {
    pub(crate) epoch: Epoch,
}

/// Where the counter delivers to one room (rooms sit above the counter, so
/// it holds these recipients, not the room's address). A room makes one on
/// its first subscribe or state report and sends clones of the `Arc`; the
/// counter keeps one per follower room.
pub(crate) struct RoomHandle {
    /// The room's page (its connections weigh on the delivery budget).
    pub(crate) page: PageId,
    /// The index of the shard that hosts it (where its deliveries go).
    pub(crate) shard: usize,
    pub(crate) counts: Recipient<Counts>,
    pub(crate) subscribed: Recipient<Subscribed>,
}

impl RoomHandle {
    /// The handle of the actor at `addr`, the room of `page` on shard `shard`.
    pub(crate) fn of<A>(addr: &Addr<A>, page: PageId, shard: usize) -> Arc<RoomHandle>
    where
        A: Handler<Counts> + Handler<Subscribed>,
        A::Context: ToEnvelope<A, Counts> + ToEnvelope<A, Subscribed>,
    {
        Arc::new(RoomHandle {
            page,
            shard,
            counts: addr.clone().recipient(),
            subscribed: addr.clone().recipient(),
        })
    }

    /// Hands `item` to the room (on the shard's thread).
    pub(crate) fn hand(&self, item: ToRoom) {
        match item {
            ToRoom::Counts(c) => self.counts.do_send(c),
            ToRoom::Subscribed(s) => self.subscribed.do_send(s),
        }
    }
}

/// Live tallies of these ids (unknown ids are 0).
#[derive(Message)]
#[rtype(result = "Vec<Tally>")]
pub(crate) struct GetCounts(pub Vec<PageId>);

/// Stats and live count of one page.
#[derive(Message)]
#[rtype(result = "PageInfo")]
pub(crate) struct GetPage(pub PageId);

/// Where the site's figures come from, given once after the server made
/// them: the node's open sessions and its distinct visitors.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct SetSite {
    pub(crate) connections: Arc<AtomicUsize>,
    pub(crate) visitors: Arc<NodeVisitors>,
}

/// The history of a page (`Some`) or of the whole site (`None`) at one
/// resolution, over its retention; `Ok(None)` for a page the server does
/// not know.
#[derive(Message)]
#[rtype(result = "Result<Option<HistorySeries>, crate::storage::StorageError>")]
pub(crate) struct GetHistory {
    pub(crate) page: Option<PageId>,
    pub(crate) resolution: Resolution,
}

/// Answer to [`GetHistory`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HistorySeries {
    /// The window: its first slot's start and now (ms since epoch).
    pub(crate) from_ms: u64,
    pub(crate) to_ms: u64,
    /// (slot start in ms, peaks) of the slots when someone was there,
    /// oldest first; the last may be the slot in progress.
    pub(crate) points: Vec<(u64, Tally)>,
}

/// Write every dirty stats record now and flush (used at shutdown).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct FinalSnapshot;

/// Test hook: run the sweep now (the timer does this every `sweep_interval`).
#[cfg(feature = "test-hooks")]
#[derive(Message)]
#[rtype(result = "SweepReport")]
pub struct SweepNow;

/// What one sweep removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Page entries dropped from memory.
    pub pages_dropped: usize,
    /// Room records deleted from storage.
    pub rooms_expired: usize,
    /// Stats records deleted from storage.
    pub(crate) stats_expired: usize,
}

/// Test hook: whether the counter holds each of these pages in memory.
#[cfg(feature = "test-hooks")]
#[derive(Message)]
#[rtype(result = "Vec<bool>")]
pub struct Tracked(pub Vec<PageId>);

/// Test hook: corrupt the live state and stop, as an internal fault would.
#[cfg(feature = "test-hooks")]
#[derive(Message)]
#[rtype(result = "()")]
pub struct InjectFault;

/// Test hook: scramble the live state and panic in the handler, as a bug
/// would (contained: the counter restarts and rebuilds from the rooms).
#[cfg(feature = "test-hooks")]
#[derive(Message)]
#[rtype(result = "()")]
pub struct InjectPanic;

/// How many times the counter has (re)started and whether it is rebuilding.
#[derive(Message)]
#[rtype(result = "CounterStatus")]
pub struct GetStatus;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterStatus {
    /// 1 after the first start, +1 per supervised restart.
    pub generation: u64,
    /// True while waiting for shards to re-report after a restart.
    pub rebuilding: bool,
    /// Pages held in memory (the site figure's entry is no page).
    pub pages: usize,
}

/// Sizes of the counter's state, for `/metrics` and `/api/v1/stats`.
#[derive(Message)]
#[rtype(result = "CounterLoad")]
pub struct GetLoad;

/// Answer to [`GetLoad`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterLoad {
    /// Pages held in memory.
    pub(crate) pages: usize,
    /// Pages with at least one live connection.
    pub(crate) live_pages: usize,
    /// (room, followed page) pairs.
    pub subscriptions: usize,
    /// Rooms following at least one link.
    pub follower_rooms: usize,
    /// Sum of the live counts (connections known to the counter).
    pub(crate) connections: u64,
    /// Connections opened since the process started.
    pub(crate) opened_total: u64,
}

/// The `limit` pages with the most live connections, most first (ties by id).
#[derive(Message)]
#[rtype(result = "Vec<PageInfo>")]
pub(crate) struct GetTop(pub usize);

// ---------------------------------------------------------------- the actor

/// Stats records written between two trims in a snapshot.
const SNAPSHOT_CHUNK: usize = 1024;

/// Cluster mode: longest an HTTP read waits for the other nodes' counts.
const FETCH_DEADLINE: Duration = Duration::from_millis(500);

pub struct Counter {
    /// Timers and retention settings.
    settings: Arc<Settings>,
    /// Where stats are persisted.
    storage: Storage,
    /// The counts, followers and publish bookkeeping.
    state: State<Arc<RoomHandle>>,
    /// The shards: resyncs after a restart, deliveries to their rooms.
    shards: Vec<ShardLink>,
    /// How far behind each shard's worker is (the delivery budget's signal).
    backlogs: Vec<Arc<Backlog>>,
    /// Cluster mode: the module that shares counts through Redis.
    cluster: Option<Addr<Cluster>>,
    /// Starts so far (1 = first start).
    generation: u64,
    /// A chunk of the write queue is scheduled for writing.
    saving: bool,
    /// Time spent and records written by the snapshot in progress (metrics).
    snapshot_took: Duration,
    snapshot_records: usize,
    /// The minutes in progress of the history, and the closed ones to write.
    peaks: Peaks,
    /// The index of the last minute [`Peaks::roll`] was called in.
    rolled: u64,
    /// The site's figures ([`SetSite`]).
    site: Option<SetSite>,
    /// The history key of the site, and the link of its live figure
    /// (`protocol::SITE_LINK`, the same empty id).
    site_key: PageId,
    /// The site's figures last applied to its link.
    site_tally: Tally,
    /// What `/readyz` reads of this counter's recovery.
    health: Arc<Health>,
}

/// Logs and counts a storage call that failed at run time.
fn storage_failed(op: StorageOp, what: &str, e: &StorageError) {
    tracing::warn!(op = op.label(), error = %e, "{what}");
    crate::metrics::storage_error(op);
}

/// Cluster mode: the other nodes' sums to add to some of a read's values.
struct RemoteFetch {
    /// The indices, in the read's ids, of the pages fetched.
    idx: Vec<usize>,
    /// The request to the cluster module.
    req: Request<Cluster, cluster::Fetch>,
}

/// The present, for the state.
fn now() -> Now {
    Now {
        at: Instant::now(),
        ms: now_ms(),
    }
}

impl Counter {
    pub(crate) fn new(settings: Arc<Settings>, storage: Storage, health: Arc<Health>) -> Counter {
        let loader = storage.clone();
        let load: LoadStats = Box::new(move |page| match loader.load_stats(page) {
            Ok(stats) => stats.unwrap_or_default(),
            Err(e) => {
                storage_failed(StorageOp::ReadStats, "stats read failed; empty stats", &e);
                PageStats::default()
            }
        });
        let mut state = State::new(settings.clone(), load);
        state.set_page_of(Box::new(|to: &Arc<RoomHandle>| Some(to.page.clone())));
        Counter {
            state,
            settings,
            storage,
            shards: Vec::new(),
            backlogs: Vec::new(),
            cluster: None,
            generation: 0,
            saving: false,
            snapshot_took: Duration::ZERO,
            snapshot_records: 0,
            peaks: Peaks::default(),
            rolled: 0,
            site: None,
            site_key: PageId::site(),
            site_tally: Tally::ZERO,
            health,
        }
    }

    /// Runs one handler's (or timer's) body through [`contain`]. On a
    /// panic: the server is told the counter is recovering, and the actor
    /// stops, so that its supervisor restarts it and it rebuilds from the
    /// rooms (`None` then).
    fn guard<R>(
        &mut self,
        ctx: &mut Context<Self>,
        handling: &'static str,
        body: impl FnOnce(&mut Self, &mut Context<Self>) -> R,
    ) -> Option<R> {
        match contain(ActorKind::Counter, handling, || body(self, ctx)) {
            Ok(r) => Some(r),
            Err(_) => {
                self.health.counter_failed();
                ctx.stop();
                None
            }
        }
    }

    /// The site's figures now: this node's open sessions and its distinct
    /// visitors over all pages (`NodeVisitors`, a node-wide reference count
    /// of visitor keys kept by the sessions).
    fn site_now(&self) -> Option<Tally> {
        let site = self.site.as_ref()?;
        Some(Tally {
            connections: site.connections.load(Ordering::Relaxed) as u64,
            visitors: site.visitors.distinct(),
        })
    }

    /// Every 100 ms: applies a changed site figure to the site's link, as a
    /// page's count is applied (published to its followers with the same
    /// coalescing; in cluster mode shared and summed like a page's).
    fn update_site(&mut self, ctx: &mut Context<Self>) {
        let Some(now_tally) = self.site_now() else {
            return;
        };
        // Unchanged: nothing to publish. A site entry that the sweep removed
        // (or a rebuild dropped) is made again only when it holds someone,
        // so an empty site never stands as a page in the counter.
        let present = self.state.tracks(&self.site_key);
        if now_tally == self.site_tally && (present || now_tally == Tally::ZERO) {
            return;
        }
        self.site_tally = now_tally;
        let key = self.site_key.clone();
        let out = self.state.room_count(&key, now_tally, 0, now());
        self.dispatch(out, ctx);
    }

    /// The history observes what `page` shows now, and the site's figures.
    fn observe(&mut self, page: &PageId, ms: u64) {
        if *page == self.site_key {
            // The site's history is the node's own figures (`observe_site`).
            return;
        }
        if let Some(shown) = self.state.shown(page) {
            self.peaks.observe(page, shown, ms);
        }
        self.observe_site(ms);
    }

    /// The history observes the site's figures.
    fn observe_site(&mut self, ms: u64) {
        if let Some(now) = self.site_now() {
            self.peaks.observe(&self.site_key, now, ms);
        }
    }

    /// Once a second: samples the site, and closes the minutes that ended.
    fn history_tick(&mut self) {
        let ms = now_ms();
        self.observe_site(ms);
        if ms / 60_000 != self.rolled {
            self.rolled = ms / 60_000;
            self.peaks.roll(ms);
        }
    }

    /// Sends what the state decided, in order, and schedules its publish.
    /// Everything for rooms goes in one [`Deliver`] per shard, in order.
    fn dispatch(&mut self, out: Outbox<Arc<RoomHandle>>, ctx: &mut Context<Self>) {
        let mut batches: Vec<Vec<(Arc<RoomHandle>, ToRoom)>> =
            (0..self.shards.len()).map(|_| Vec::new()).collect();
        for effect in out.sent {
            let (to, item) = match effect {
                Effect::Counts { to, changes, since } => {
                    let counts = Counts {
                        changes,
                        since,
                        frames: None,
                    };
                    (to, ToRoom::Counts(counts))
                }
                Effect::Answer {
                    to,
                    counts,
                    refused,
                    req,
                } => {
                    let answer = Subscribed {
                        counts,
                        refused,
                        req,
                    };
                    (to, ToRoom::Subscribed(answer))
                }
                Effect::Resync { epoch } => {
                    for shard in &self.shards {
                        shard.resync.do_send(Resync { epoch });
                    }
                    continue;
                }
                Effect::Cluster(m) => {
                    self.to_cluster(m);
                    continue;
                }
            };
            match batches.get_mut(to.shard) {
                Some(batch) => batch.push((to, item)),
                // Only before the shards are known (rooms come from them).
                None => to.hand(item),
            }
        }
        let now = Instant::now();
        for ((shard, backlog), items) in self.shards.iter().zip(&self.backlogs).zip(batches) {
            if !items.is_empty() {
                shard.deliver.do_send(Deliver {
                    items,
                    backlog: backlog.clone(),
                    seq: backlog.send(now),
                    sent: now,
                });
            }
        }
        if let Some(delay) = out.publish_in {
            ctx.run_later(delay, |act, ctx| {
                act.guard(ctx, "publish timer", |act, ctx| {
                    let out = act.state.scheduled_publish(Instant::now());
                    act.dispatch(out, ctx);
                });
            });
        }
        if let Some(fault) = self.state.take_fault() {
            tracing::error!(fault, "counter state inconsistent; restarting");
            self.health.counter_failed();
            ctx.stop();
        } else if self.health.counter_recovering() && !self.state.rebuilding() {
            self.health.counter_rebuilt();
        }
    }

    fn to_cluster(&self, m: ToCluster) {
        let Some(c) = &self.cluster else { return };
        match m {
            ToCluster::Local(m) => c.do_send(m),
            ToCluster::Follow(m) => c.do_send(m),
            ToCluster::Unfollow(m) => c.do_send(m),
            ToCluster::SetFollowed(m) => c.do_send(m),
            ToCluster::ResendRemote(m) => c.do_send(m),
        }
    }

    /// The snapshot timer: queues the dirty stats and writes them one chunk
    /// per turn of the actor's loop, so a burst of new pages (an id flood)
    /// never holds the counter away from its messages for long.
    fn snapshot(&mut self, ctx: &mut Context<Self>) {
        self.state.take_dirty();
        if !self.state.has_unsaved() && self.peaks.closed.is_empty() {
            self.finish_snapshot(false);
        } else {
            self.save_soon(ctx);
        }
    }

    /// Schedules the next chunk of the write queue.
    fn save_soon(&mut self, ctx: &mut Context<Self>) {
        if self.saving {
            return;
        }
        self.saving = true;
        ctx.run_later(Duration::ZERO, |act, ctx| {
            act.saving = false;
            act.guard(ctx, "snapshot chunk", |act, ctx| match act.save_chunk() {
                Ok(true) => act.save_soon(ctx),
                Ok(false) => act.finish_snapshot(false),
                // Left queued: the next snapshot tick retries.
                Err(()) => {}
            });
        });
    }

    /// Writes every queued and dirty stats record now, and the history's
    /// minutes in progress (shutdown).
    fn snapshot_now(&mut self) {
        self.state.take_dirty();
        loop {
            match self.save_chunk() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(()) => return,
            }
        }
        let open = self.peaks.in_progress();
        let keep = self.settings.storage.history_retention();
        if let Err(e) = self.storage.save_history(&open, keep) {
            storage_failed(
                StorageOp::WriteHistory,
                "history write of the minutes in progress failed",
                &e,
            );
        }
        self.finish_snapshot(true);
    }

    /// Writes the next chunk of the queue, then trims the stores, so that a
    /// burst never takes a store far past `storage.max_records` (sled does
    /// not give back the space of a peak). True while more is queued.
    fn save_chunk(&mut self) -> Result<bool, ()> {
        let started = Instant::now();
        let chunk = self.state.take_unsaved(SNAPSHOT_CHUNK);
        let n = chunk.len();
        if let Err(e) = self
            .storage
            .save_stats(chunk.iter().map(|(p, s)| (&**p, s)))
        {
            storage_failed(
                StorageOp::WriteStats,
                "stats write failed; kept queued, retried at the next snapshot",
                &e,
            );
            self.state.requeue_unsaved(chunk);
            return Err(());
        }
        let closed = &mut self.peaks.closed;
        let h = closed.len().min(SNAPSHOT_CHUNK);
        let peaks: Vec<_> = closed.drain(..h).collect();
        let keep = self.settings.storage.history_retention();
        if let Err(e) = self.storage.save_history(&peaks, keep) {
            storage_failed(
                StorageOp::WriteHistory,
                "history write failed; kept queued, retried at the next snapshot",
                &e,
            );
            for item in peaks.into_iter().rev() {
                self.peaks.closed.push_front(item);
            }
            return Err(());
        }
        self.snapshot_took += started.elapsed();
        self.snapshot_records += n + h;
        self.trim_storage();
        Ok(self.state.has_unsaved() || !self.peaks.closed.is_empty())
    }

    /// After the queue is written: metrics, idle pages forgotten (those
    /// inactive for `room.idle_timeout`), the trim, and a flush (off-thread
    /// unless `wait`).
    fn finish_snapshot(&mut self, wait: bool) {
        let records = std::mem::take(&mut self.snapshot_records);
        crate::metrics::snapshot(std::mem::take(&mut self.snapshot_took), records);
        let timeout = self.settings.room.idle_timeout.as_millis() as u64;
        let forgotten = self
            .state
            .forget_idle_pages(now_ms().saturating_sub(timeout));
        crate::metrics::evicted(crate::metrics::Evicted::Pages, forgotten);
        self.trim_storage();
        let storage = self.storage.clone();
        let flush = move || {
            if let Err(e) = storage.flush() {
                storage_failed(StorageOp::Flush, "flush to disk failed", &e);
            }
        };
        if wait {
            flush();
        } else if records > 0 {
            std::thread::spawn(flush);
        }
    }

    /// Deletes the least recently active stored records past
    /// `storage.max_records` (never those of live pages).
    fn trim_storage(&mut self) {
        let max = self.settings.storage.max_records;
        let state = &self.state;
        match self.storage.trim(max, |page| state.is_live(page)) {
            Ok((stats, rooms)) => {
                crate::metrics::evicted(crate::metrics::Evicted::StatsRecords, stats.len());
                crate::metrics::evicted(crate::metrics::Evicted::RoomRecords, rooms);
                if stats.len() + rooms > 0 {
                    tracing::debug!(
                        stats = stats.len(),
                        rooms,
                        max_records = max,
                        "records past the cap deleted"
                    );
                }
                self.state.forget_trimmed(&stats);
            }
            Err(e) => storage_failed(
                StorageOp::Trim,
                "trim past storage.max_records failed; retried at the next snapshot",
                &e,
            ),
        }
    }

    fn sweep(&mut self) -> SweepReport {
        let mut report = SweepReport {
            pages_dropped: self.state.sweep_pages(),
            ..SweepReport::default()
        };
        let now = now_ms();
        let state = &self.state;
        let live = |page: &str| state.is_live(page);
        let ttl = self.settings.room.storage_ttl.as_millis() as u64;
        match self.storage.expire_rooms(now.saturating_sub(ttl), live) {
            Ok(n) => report.rooms_expired = n,
            Err(e) => storage_failed(
                StorageOp::Expire,
                "room record expiry failed; retried at the next sweep",
                &e,
            ),
        }
        let retention = self.settings.storage.stats_retention.as_millis() as u64;
        match self
            .storage
            .expire_stats(now.saturating_sub(retention), live)
        {
            Ok(n) => report.stats_expired = n,
            Err(e) => storage_failed(
                StorageOp::Expire,
                "stats expiry failed; retried at the next sweep",
                &e,
            ),
        }
        crate::metrics::sweep(
            report.pages_dropped,
            report.rooms_expired,
            report.stats_expired,
        );
        tracing::info!(
            pages_dropped = report.pages_dropped,
            rooms_expired = report.rooms_expired,
            stats_expired = report.stats_expired,
            pages = self.state.page_count(),
            "sweep"
        );
        report
    }
}

impl Actor for Counter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.generation += 1;
        let s = &self.settings;
        ctx.run_interval(s.storage.snapshot_interval, |act, ctx| {
            act.guard(ctx, "snapshot timer", |act, ctx| act.snapshot(ctx));
        });
        ctx.run_interval(s.counter.sweep_interval, |act, ctx| {
            act.guard(ctx, "sweep timer", |act, _| act.sweep());
        });
        ctx.run_interval(Duration::from_millis(100), |act, ctx| {
            act.guard(ctx, "tick timer", |act, ctx| {
                let out = act.state.tick(Instant::now());
                act.dispatch(out, ctx);
                act.update_site(ctx);
            });
        });
        ctx.run_interval(Duration::from_secs(1), |act, ctx| {
            act.guard(ctx, "history timer", |act, _| act.history_tick());
        });
        if self.generation > 1 {
            let rebuild = contain(ActorKind::Counter, "rebuild", || {
                self.state.begin_rebuild(self.generation, Instant::now())
            });
            match rebuild {
                Ok(out) => self.guard(ctx, "rebuild", |act, ctx| act.dispatch(out, ctx)),
                // Not stopped at once (a panic at every start would spin):
                // the supervisor tries again a second later.
                Err(_) => {
                    self.health.counter_failed();
                    ctx.run_later(Duration::from_secs(1), |_, ctx| ctx.stop());
                    None
                }
            };
        }
    }
}

impl Supervised for Counter {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        crate::metrics::counter_restarted();
        // Live state is rebuilt from the rooms; stats (not live) are kept.
        self.state.restart();
        // The restart dropped the context's timers: a scheduled write too
        // (the write queue itself is kept).
        self.saving = false;
    }
}

impl Handler<SetShards> for Counter {
    type Result = ();
    fn handle(&mut self, msg: SetShards, ctx: &mut Context<Self>) {
        self.guard(ctx, "SetShards", |act, _| {
            act.state.set_shards(msg.0.len());
            act.backlogs = msg.0.iter().map(|_| Arc::default()).collect();
            let backlogs = act.backlogs.clone();
            act.state.set_lag_probe(Box::new(move |now| {
                let lags = backlogs.iter().map(|b| b.take_lag(now));
                lags.max().unwrap_or_default()
            }));
            crate::metrics::delivery_budget(act.state.budget_rate());
            act.shards = msg.0;
        });
    }
}

impl Handler<SetCluster> for Counter {
    type Result = ();
    fn handle(&mut self, msg: SetCluster, ctx: &mut Context<Self>) {
        self.guard(ctx, "SetCluster", |act, _| {
            act.state.set_cluster();
            act.cluster = Some(msg.0);
        });
    }
}

impl Handler<SetSite> for Counter {
    type Result = ();
    fn handle(&mut self, msg: SetSite, ctx: &mut Context<Self>) {
        self.guard(ctx, "SetSite", |act, _| act.site = Some(msg));
    }
}

impl Handler<cluster::RemoteCounts> for Counter {
    type Result = ();
    fn handle(&mut self, msg: cluster::RemoteCounts, ctx: &mut Context<Self>) {
        self.guard(ctx, "RemoteCounts", |act, ctx| {
            let pages: Vec<PageId> = msg.changes.iter().map(|(p, _)| p.clone()).collect();
            let out = act.state.remote_counts(msg.changes, Instant::now());
            let ms = now_ms();
            for page in &pages {
                act.observe(page, ms);
            }
            act.dispatch(out, ctx);
        });
    }
}

impl Handler<cluster::ResendLocal> for Counter {
    type Result = ();
    fn handle(&mut self, _: cluster::ResendLocal, ctx: &mut Context<Self>) {
        self.guard(ctx, "ResendLocal", |act, ctx| {
            let out = act.state.cluster_restarted();
            act.dispatch(out, ctx);
        });
    }
}

impl Handler<cluster::Loaded> for Counter {
    type Result = ();
    fn handle(&mut self, msg: cluster::Loaded, ctx: &mut Context<Self>) {
        self.guard(ctx, "Loaded", |act, ctx| {
            let out = act.state.loaded(msg.req, Instant::now());
            act.dispatch(out, ctx);
        });
    }
}

impl Handler<RoomCount> for Counter {
    type Result = ();
    fn handle(&mut self, msg: RoomCount, ctx: &mut Context<Self>) {
        self.guard(ctx, "RoomCount", |act, ctx| {
            let now = now();
            let out = act.state.room_count(&msg.page, msg.tally, msg.opened, now);
            act.observe(&msg.page, now.ms);
            act.dispatch(out, ctx);
        });
    }
}

impl Handler<Subscribe> for Counter {
    type Result = ();
    fn handle(&mut self, msg: Subscribe, ctx: &mut Context<Self>) {
        self.guard(ctx, "Subscribe", |act, ctx| {
            let out = act
                .state
                .subscribe(msg.room, msg.to, msg.links, msg.req, Instant::now());
            act.dispatch(out, ctx);
        });
    }
}

impl Handler<Unsubscribe> for Counter {
    type Result = ();
    fn handle(&mut self, msg: Unsubscribe, ctx: &mut Context<Self>) {
        self.guard(ctx, "Unsubscribe", |act, ctx| {
            let out = act.state.unsubscribe(msg.room, &msg.links);
            act.dispatch(out, ctx);
        });
    }
}

impl Handler<RoomState> for Counter {
    type Result = ();
    fn handle(&mut self, msg: RoomState, ctx: &mut Context<Self>) {
        self.guard(ctx, "RoomState", |act, ctx| {
            let report = RoomReport {
                epoch: msg.epoch,
                room: msg.room,
                to: msg.to,
                page: msg.page,
                tally: msg.tally,
                links: msg.links,
            };
            let page = report.page.clone();
            let out = act.state.room_state(report, Instant::now());
            act.observe(&page, now_ms());
            act.dispatch(out, ctx);
        });
    }
}

impl Handler<ShardRooms> for Counter {
    type Result = ();
    fn handle(&mut self, msg: ShardRooms, ctx: &mut Context<Self>) {
        self.guard(ctx, "ShardRooms", |act, ctx| {
            let out = act
                .state
                .shard_rooms(msg.epoch, msg.shard, msg.rooms, Instant::now());
            act.dispatch(out, ctx);
        });
    }
}

impl Counter {
    /// Cluster mode: a fetch of the pages of `ids` this node does not
    /// follow (their shown value lacks the other nodes' counts).
    fn fetch_unfollowed(&self, ids: &[PageId]) -> Option<RemoteFetch> {
        let cluster = self.cluster.as_ref()?;
        let idx: Vec<usize> = ids
            .iter()
            .enumerate()
            .filter(|(_, id)| !self.state.is_followed(id))
            .map(|(i, _)| i)
            .collect();
        if idx.is_empty() {
            return None;
        }
        let pages = idx.iter().filter_map(|i| ids.get(*i).cloned()).collect();
        let req = cluster.send(cluster::Fetch { pages });
        Some(RemoteFetch { idx, req })
    }

    /// The stats of `page`: in memory, else stored (empty if unreadable).
    fn page_stats(&self, page: &PageId) -> PageStats {
        if let Some(stats) = self.state.stats(page) {
            return stats.clone();
        }
        match self.storage.load_stats(page) {
            Ok(stats) => stats.unwrap_or_default(),
            Err(e) => {
                storage_failed(StorageOp::ReadStats, "stats read failed; empty stats", &e);
                PageStats::default()
            }
        }
    }
}

/// Adds fetched remote sums to `values` (unchanged if the fetch failed or
/// took longer than [`FETCH_DEADLINE`]).
async fn add_fetched(mut values: Vec<Tally>, fetch: Option<RemoteFetch>) -> Vec<Tally> {
    if let Some(RemoteFetch { idx, req }) = fetch {
        // A read never waits long for Redis: without an answer it is local only.
        if let Ok(Ok(Some(sums))) = tokio::time::timeout(FETCH_DEADLINE, req).await {
            for (i, sum) in idx.into_iter().zip(sums) {
                if let Some(v) = values.get_mut(i) {
                    *v = v.plus(sum);
                }
            }
        }
    }
    values
}

impl Handler<GetCounts> for Counter {
    type Result = Answer<ResponseFuture<Vec<Tally>>>;
    fn handle(&mut self, msg: GetCounts, ctx: &mut Context<Self>) -> Self::Result {
        Answer(self.guard(ctx, "GetCounts", |act, _| {
            let values: Vec<Tally> = msg
                .0
                .iter()
                .map(|id| act.state.shown(id).unwrap_or(Tally::ZERO))
                .collect();
            let fetch = act.fetch_unfollowed(&msg.0);
            Box::pin(add_fetched(values, fetch)) as ResponseFuture<Vec<Tally>>
        }))
    }
}

impl Handler<GetPage> for Counter {
    type Result = Answer<ResponseFuture<PageInfo>>;
    fn handle(&mut self, msg: GetPage, ctx: &mut Context<Self>) -> Self::Result {
        Answer(self.guard(ctx, "GetPage", |act, _| {
            let shown = act.state.shown(&msg.0).unwrap_or(Tally::ZERO);
            let stats = act.page_stats(&msg.0);
            let fetch = act.fetch_unfollowed(std::slice::from_ref(&msg.0));
            let id = msg.0.to_string();
            Box::pin(async move {
                let shown = add_fetched(vec![shown], fetch)
                    .await
                    .first()
                    .copied()
                    .unwrap_or(shown);
                page_info(id, shown, &stats)
            }) as ResponseFuture<PageInfo>
        }))
    }
}

impl Counter {
    /// The history of `msg`'s page or of the site: what is stored, with the
    /// minutes closed but not yet written and the minute in progress.
    fn history(&self, msg: GetHistory) -> Result<Option<HistorySeries>, StorageError> {
        let key: &str = msg.page.as_deref().unwrap_or(SITE);
        if let Some(page) = &msg.page {
            if !self.state.tracks(page) && self.storage.load_stats(page)?.is_none() {
                return Ok(None);
            }
        }
        let res = msg.resolution;
        let keep = self.settings.storage.history_retention();
        let to_ms = now_ms();
        let window = match res {
            Resolution::Minute => keep.minutes_ms,
            Resolution::Hour => keep.hours_ms,
        };
        let from_ms = to_ms.saturating_sub(window) / res.step_ms() * res.step_ms();
        let mut points = self.storage.load_history(key, res, from_ms, to_ms)?;
        // The minute in progress, and the minutes closed but not yet written.
        let pending = self
            .peaks
            .closed
            .iter()
            .filter(|(k, _, _)| &**k == key)
            .map(|(_, at, v)| (*at, *v));
        for (at, peak) in pending.chain(self.peaks.current(key)) {
            let slot = at / res.step_ms() * res.step_ms();
            if slot < from_ms {
                continue;
            }
            match points.binary_search_by_key(&slot, |(t, _)| *t) {
                Ok(i) => {
                    if let Some((_, p)) = points.get_mut(i) {
                        p.connections = p.connections.max(peak.connections);
                        p.visitors = p.visitors.max(peak.visitors);
                    }
                }
                Err(i) => points.insert(i, (slot, peak)),
            }
        }
        Ok(Some(HistorySeries {
            from_ms,
            to_ms,
            points,
        }))
    }
}

impl Handler<GetHistory> for Counter {
    type Result = Answer<Result<Option<HistorySeries>, StorageError>>;
    fn handle(&mut self, msg: GetHistory, ctx: &mut Context<Self>) -> Self::Result {
        Answer(self.guard(ctx, "GetHistory", |act, _| {
            let series = act.history(msg);
            if let Err(e) = &series {
                storage_failed(StorageOp::ReadHistory, "history read failed", e);
            }
            series
        }))
    }
}

impl Handler<FinalSnapshot> for Counter {
    type Result = ();
    fn handle(&mut self, _: FinalSnapshot, ctx: &mut Context<Self>) {
        self.guard(ctx, "FinalSnapshot", |act, _| act.snapshot_now());
    }
}

#[cfg(feature = "test-hooks")]
impl Handler<SweepNow> for Counter {
    type Result = Answer<MessageResult<SweepNow>>;
    fn handle(&mut self, _: SweepNow, ctx: &mut Context<Self>) -> Self::Result {
        Answer(self.guard(ctx, "SweepNow", |act, _| MessageResult(act.sweep())))
    }
}

impl Handler<GetStatus> for Counter {
    type Result = Answer<MessageResult<GetStatus>>;
    fn handle(&mut self, _: GetStatus, ctx: &mut Context<Self>) -> Self::Result {
        Answer(self.guard(ctx, "GetStatus", |act, _| {
            MessageResult(CounterStatus {
                generation: act.generation,
                rebuilding: act.state.rebuilding(),
                pages: act.state.page_count(),
            })
        }))
    }
}

#[cfg(feature = "test-hooks")]
impl Handler<Tracked> for Counter {
    type Result = Answer<MessageResult<Tracked>>;
    fn handle(&mut self, msg: Tracked, ctx: &mut Context<Self>) -> Self::Result {
        Answer(self.guard(ctx, "Tracked", |act, _| {
            MessageResult(msg.0.iter().map(|p| act.state.tracks(p)).collect())
        }))
    }
}

#[cfg(feature = "test-hooks")]
impl Handler<InjectFault> for Counter {
    type Result = ();
    fn handle(&mut self, _: InjectFault, ctx: &mut Context<Self>) {
        // Scramble the live state the way a bug would, then stop: the
        // supervisor rebuilds it.
        self.state.scramble();
        tracing::error!("counter fault injected by a test; restarting");
        ctx.stop();
    }
}

#[cfg(feature = "test-hooks")]
impl Handler<InjectPanic> for Counter {
    type Result = Answer<()>;
    fn handle(&mut self, _: InjectPanic, ctx: &mut Context<Self>) -> Self::Result {
        // Scramble the live state the way a bug would, then panic in the
        // middle of the handler.
        Answer(self.guard(ctx, "InjectPanic", |act, _| {
            act.state.scramble();
            crate::supervise::injected_panic(ActorKind::Counter)
        }))
    }
}

impl Handler<GetLoad> for Counter {
    type Result = Answer<MessageResult<GetLoad>>;
    fn handle(&mut self, _: GetLoad, ctx: &mut Context<Self>) -> Self::Result {
        Answer(self.guard(ctx, "GetLoad", |act, _| {
            MessageResult(act.state.load(&act.site_key))
        }))
    }
}

impl Handler<GetTop> for Counter {
    type Result = Answer<MessageResult<GetTop>>;
    fn handle(&mut self, msg: GetTop, ctx: &mut Context<Self>) -> Self::Result {
        Answer(self.guard(ctx, "GetTop", |act, _| {
            let top = act.state.top(msg.0, &act.site_key);
            MessageResult(
                top.into_iter()
                    .map(|p| page_info(p.id.to_string(), p.shown, p.stats))
                    .collect(),
            )
        }))
    }
}

/// The `/api/v1/pages/{id}` body of a page (without its links).
fn page_info(id: String, shown: Tally, stats: &PageStats) -> PageInfo {
    PageInfo {
        id,
        connections: shown.connections,
        visitors: shown.visitors,
        peak_connections: stats.peak_connections,
        peak_at: stats.peak_at_ms.map(rfc3339),
        peak_visitors: stats.peak_visitors,
        total_connections: stats.total_connections,
        last_active: stats.last_active_ms.map(rfc3339),
        links: Vec::new(),
    }
}
