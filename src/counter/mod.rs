//! The `Counter`: the singleton that knows every page's live [`Tally`]
//! (connections and distinct visitors) and which rooms follow it, applies
//! changes at once and publishes them: at once when nothing went out in the
//! last `broadcast_interval`, else coalesced into one publish an interval
//! after the last. The logic is a plain state machine (`state.rs`); the actor
//! owns it, runs its timers, sends what it returns and writes the stats.
//!
//! It runs on its own arbiter under [`actix::Supervisor`]. Its handlers never
//! panic; when one finds its state inconsistent (or a test injects a fault) it
//! stops, the supervisor calls [`Supervised::restarting`], which drops all live
//! state, and `started` then asks every shard to re-report its rooms: rooms are
//! the source of truth, so counts stay exact across a counter restart.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use actix::{dev::ToEnvelope, prelude::*};

use crate::{
    cluster::{self, Cluster},
    config::Settings,
    delivery::Update,
    protocol::{PageId, PageInfo, Tally},
    storage::{PageStats, Storage},
    time::{now_ms, rfc3339},
};

mod state;

pub use state::RoomId;

use state::{Effect, LoadStats, Now, Outbox, PageEntry, RoomReport, State, ToCluster};

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
pub struct Subscribe {
    pub room: RoomId,
    /// Where the answer and later counts go.
    pub to: Arc<RoomHandle>,
    pub links: Vec<PageId>,
    /// The room's id of this request, echoed in the answer
    /// ([`Subscribed::req`]): a refusal only applies to a link whose latest
    /// request it answers.
    pub req: u64,
}

/// A room stops following these links (last of its connections dropped them).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unsubscribe {
    pub room: RoomId,
    pub links: Vec<PageId>,
}

/// A room's whole state, sent in answer to a resync of `epoch`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RoomState {
    pub epoch: u64,
    pub room: RoomId,
    /// Where counts go.
    pub to: Arc<RoomHandle>,
    pub page: PageId,
    pub tally: Tally,
    pub links: Vec<PageId>,
}

/// A shard's list of the rooms it asked to report for resync `epoch`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ShardRooms {
    pub epoch: u64,
    pub shard: usize,
    pub rooms: Vec<u64>,
}

/// Where the counter reaches one shard: its resync and its deliveries.
pub struct ShardLink {
    pub resync: Recipient<Resync>,
    pub deliver: Recipient<Deliver>,
}

/// The shards, by index, given once after they are started.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetShards(pub Vec<ShardLink>);

/// The cluster module's address (cluster mode only), given once after it is started.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetCluster(pub Addr<Cluster>);

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
    pub fn get(
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
pub struct Deliver(pub Vec<(Arc<RoomHandle>, ToRoom)>);

/// One item of a [`Deliver`].
pub enum ToRoom {
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
pub struct Resync {
    pub epoch: u64,
}

/// Where the counter delivers to one room (rooms sit above the counter, so
/// it holds these recipients, not the room's address). A room makes one on
/// its first subscribe or state report and sends clones of the `Arc`; the
/// counter keeps one per follower room.
pub struct RoomHandle {
    /// The room's page (its connections weigh on the delivery budget).
    pub page: PageId,
    /// The index of the shard that hosts it (where its deliveries go).
    pub shard: usize,
    pub counts: Recipient<Counts>,
    pub subscribed: Recipient<Subscribed>,
}

impl RoomHandle {
    /// The handle of the actor at `addr`, the room of `page` on shard `shard`.
    pub fn of<A>(addr: &Addr<A>, page: PageId, shard: usize) -> Arc<RoomHandle>
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
    pub fn hand(&self, item: ToRoom) {
        match item {
            ToRoom::Counts(c) => self.counts.do_send(c),
            ToRoom::Subscribed(s) => self.subscribed.do_send(s),
        }
    }
}

/// Live tallies of these ids (unknown ids are 0).
#[derive(Message)]
#[rtype(result = "Vec<Tally>")]
pub struct GetCounts(pub Vec<PageId>);

/// Stats and live count of one page.
#[derive(Message)]
#[rtype(result = "PageInfo")]
pub struct GetPage(pub PageId);

/// Write every dirty stats record now and flush (used at shutdown).
#[derive(Message)]
#[rtype(result = "()")]
pub struct FinalSnapshot;

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
    pub stats_expired: usize,
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
    /// Pages held in memory.
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
    pub pages: usize,
    /// Pages with at least one live connection.
    pub live_pages: usize,
    /// (room, followed page) pairs.
    pub subscriptions: usize,
    /// Rooms following at least one link.
    pub follower_rooms: usize,
    /// Sum of the live counts (connections known to the counter).
    pub connections: u64,
    /// Connections opened since the process started.
    pub opened_total: u64,
}

/// The `limit` pages with the most live connections, most first (ties by id).
#[derive(Message)]
#[rtype(result = "Vec<PageInfo>")]
pub struct GetTop(pub usize);

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
    /// Cluster mode: the module that shares counts through Redis.
    cluster: Option<Addr<Cluster>>,
    /// Starts so far (1 = first start).
    generation: u64,
    /// A chunk of the write queue is scheduled for writing.
    saving: bool,
    /// Time spent and records written by the snapshot in progress (metrics).
    snapshot_took: Duration,
    snapshot_records: usize,
}

/// The present, for the state.
fn now() -> Now {
    Now {
        at: Instant::now(),
        ms: now_ms(),
    }
}

impl Counter {
    pub fn new(settings: Arc<Settings>, storage: Storage) -> Counter {
        let loader = storage.clone();
        let load: LoadStats =
            Box::new(move |page| loader.load_stats(page).ok().flatten().unwrap_or_default());
        let mut state = State::new(settings.clone(), load);
        state.set_page_of(Box::new(|to: &Arc<RoomHandle>| Some(to.page.clone())));
        Counter {
            state,
            settings,
            storage,
            shards: Vec::new(),
            cluster: None,
            generation: 0,
            saving: false,
            snapshot_took: Duration::ZERO,
            snapshot_records: 0,
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
        for (shard, batch) in self.shards.iter().zip(batches) {
            if !batch.is_empty() {
                shard.deliver.do_send(Deliver(batch));
            }
        }
        if let Some(delay) = out.publish_in {
            ctx.run_later(delay, |act, ctx| {
                let out = act.state.scheduled_publish(Instant::now());
                act.dispatch(out, ctx);
            });
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
        if self.state.unsaved.is_empty() {
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
            match act.save_chunk() {
                Ok(true) => act.save_soon(ctx),
                Ok(false) => act.finish_snapshot(false),
                // Left queued: the next snapshot tick retries.
                Err(()) => {}
            }
        });
    }

    /// Writes every queued and dirty stats record now (shutdown).
    fn snapshot_now(&mut self) {
        self.state.take_dirty();
        loop {
            match self.save_chunk() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(()) => return,
            }
        }
        self.finish_snapshot(true);
    }

    /// Writes the next chunk of the queue, then trims the stores, so that a
    /// burst never takes a store far past `storage.max_records` (sled does
    /// not give back the space of a peak). True while more is queued.
    fn save_chunk(&mut self) -> Result<bool, ()> {
        let started = Instant::now();
        let unsaved = &mut self.state.unsaved;
        let n = unsaved.len().min(SNAPSHOT_CHUNK);
        let chunk: Vec<(PageId, PageStats)> = unsaved.drain(..n).collect();
        if let Err(e) = self
            .storage
            .save_stats(chunk.iter().map(|(p, s)| (&**p, s)))
        {
            tracing::error!(error = %e, "stats snapshot failed; will retry");
            for item in chunk.into_iter().rev() {
                self.state.unsaved.push_front(item);
            }
            return Err(());
        }
        self.snapshot_took += started.elapsed();
        self.snapshot_records += n;
        self.trim_storage();
        Ok(!self.state.unsaved.is_empty())
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
        if wait {
            if let Err(e) = storage.flush() {
                tracing::error!(error = %e, "flush failed");
            }
        } else if records > 0 {
            std::thread::spawn(move || {
                if let Err(e) = storage.flush() {
                    tracing::error!(error = %e, "flush failed");
                }
            });
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
            Err(e) => tracing::error!(error = %e, "record trim failed"),
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
            Err(e) => tracing::error!(error = %e, "room record expiry failed"),
        }
        let retention = self.settings.storage.stats_retention.as_millis() as u64;
        match self
            .storage
            .expire_stats(now.saturating_sub(retention), live)
        {
            Ok(n) => report.stats_expired = n,
            Err(e) => tracing::error!(error = %e, "stats expiry failed"),
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
            pages = self.state.pages.len(),
            "sweep"
        );
        report
    }

    /// Stops on an internal inconsistency; the supervisor rebuilds.
    #[cfg(feature = "test-hooks")]
    fn fault(&mut self, ctx: &mut Context<Self>, what: &str) {
        tracing::error!(fault = what, "counter fault; restarting");
        ctx.stop();
    }
}

impl Actor for Counter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.generation += 1;
        let s = &self.settings;
        ctx.run_interval(s.storage.snapshot_interval, |act, ctx| act.snapshot(ctx));
        ctx.run_interval(s.counter.sweep_interval, |act, _| {
            act.sweep();
        });
        ctx.run_interval(Duration::from_millis(100), |act, ctx| {
            let out = act.state.tick(Instant::now());
            act.dispatch(out, ctx);
        });
        if self.generation > 1 {
            let out = self.state.begin_rebuild(self.generation, Instant::now());
            self.dispatch(out, ctx);
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
    fn handle(&mut self, msg: SetShards, _: &mut Context<Self>) {
        self.state.set_shards(msg.0.len());
        self.shards = msg.0;
    }
}

impl Handler<SetCluster> for Counter {
    type Result = ();
    fn handle(&mut self, msg: SetCluster, _: &mut Context<Self>) {
        self.state.set_cluster();
        self.cluster = Some(msg.0);
    }
}

impl Handler<cluster::RemoteCounts> for Counter {
    type Result = ();
    fn handle(&mut self, msg: cluster::RemoteCounts, ctx: &mut Context<Self>) {
        let out = self.state.remote_counts(msg.changes, Instant::now());
        self.dispatch(out, ctx);
    }
}

impl Handler<cluster::Loaded> for Counter {
    type Result = ();
    fn handle(&mut self, msg: cluster::Loaded, ctx: &mut Context<Self>) {
        let out = self.state.loaded(msg.req, Instant::now());
        self.dispatch(out, ctx);
    }
}

impl Handler<RoomCount> for Counter {
    type Result = ();
    fn handle(&mut self, msg: RoomCount, ctx: &mut Context<Self>) {
        let out = self
            .state
            .room_count(&msg.page, msg.tally, msg.opened, now());
        self.dispatch(out, ctx);
    }
}

impl Handler<Subscribe> for Counter {
    type Result = ();
    fn handle(&mut self, msg: Subscribe, ctx: &mut Context<Self>) {
        let out = self
            .state
            .subscribe(msg.room, msg.to, msg.links, msg.req, Instant::now());
        self.dispatch(out, ctx);
    }
}

impl Handler<Unsubscribe> for Counter {
    type Result = ();
    fn handle(&mut self, msg: Unsubscribe, ctx: &mut Context<Self>) {
        let out = self.state.unsubscribe(msg.room, &msg.links);
        self.dispatch(out, ctx);
    }
}

impl Handler<RoomState> for Counter {
    type Result = ();
    fn handle(&mut self, msg: RoomState, ctx: &mut Context<Self>) {
        let report = RoomReport {
            epoch: msg.epoch,
            room: msg.room,
            to: msg.to,
            page: msg.page,
            tally: msg.tally,
            links: msg.links,
        };
        let out = self.state.room_state(report, Instant::now());
        self.dispatch(out, ctx);
    }
}

impl Handler<ShardRooms> for Counter {
    type Result = ();
    fn handle(&mut self, msg: ShardRooms, ctx: &mut Context<Self>) {
        let out = self
            .state
            .shard_rooms(msg.epoch, msg.shard, msg.rooms, Instant::now());
        self.dispatch(out, ctx);
    }
}

impl Counter {
    /// Cluster mode: the indices of `ids` this node does not follow (their
    /// shown value lacks the other nodes' counts) and a fetch of those.
    fn fetch_unfollowed(
        &self,
        ids: &[PageId],
    ) -> Option<(Vec<usize>, Request<Cluster, cluster::Fetch>)> {
        let cluster = self.cluster.as_ref()?;
        let idx: Vec<usize> = ids
            .iter()
            .enumerate()
            .filter(|(_, id)| {
                self.state
                    .pages
                    .get(*id)
                    .is_none_or(|e| e.subscribers.is_empty())
            })
            .map(|(i, _)| i)
            .collect();
        if idx.is_empty() {
            return None;
        }
        let pages = idx.iter().filter_map(|i| ids.get(*i).cloned()).collect();
        Some((idx, cluster.send(cluster::Fetch { pages })))
    }
}

/// Adds fetched remote sums to `values` at `idx` (unchanged if the fetch
/// failed or took longer than [`FETCH_DEADLINE`]).
async fn add_fetched(
    mut values: Vec<Tally>,
    fetch: Option<(Vec<usize>, Request<Cluster, cluster::Fetch>)>,
) -> Vec<Tally> {
    if let Some((idx, req)) = fetch {
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
    type Result = ResponseFuture<Vec<Tally>>;
    fn handle(&mut self, msg: GetCounts, _: &mut Context<Self>) -> Self::Result {
        let values: Vec<Tally> = msg
            .0
            .iter()
            .map(|id| {
                self.state
                    .pages
                    .get(id)
                    .map_or(Tally::ZERO, PageEntry::shown)
            })
            .collect();
        let fetch = self.fetch_unfollowed(&msg.0);
        Box::pin(add_fetched(values, fetch))
    }
}

impl Handler<GetPage> for Counter {
    type Result = ResponseFuture<PageInfo>;
    fn handle(&mut self, msg: GetPage, _: &mut Context<Self>) -> Self::Result {
        let (shown, stats) = match self.state.pages.get(&msg.0) {
            Some(e) => (e.shown(), e.stats.clone()),
            None => (
                Tally::ZERO,
                self.storage
                    .load_stats(&msg.0)
                    .ok()
                    .flatten()
                    .unwrap_or_default(),
            ),
        };
        let fetch = self.fetch_unfollowed(std::slice::from_ref(&msg.0));
        let id = msg.0.to_string();
        Box::pin(async move {
            let shown = add_fetched(vec![shown], fetch)
                .await
                .first()
                .copied()
                .unwrap_or(shown);
            page_info(id, shown, &stats)
        })
    }
}

impl Handler<FinalSnapshot> for Counter {
    type Result = ();
    fn handle(&mut self, _: FinalSnapshot, _: &mut Context<Self>) {
        self.snapshot_now();
    }
}

#[cfg(feature = "test-hooks")]
impl Handler<SweepNow> for Counter {
    type Result = MessageResult<SweepNow>;
    fn handle(&mut self, _: SweepNow, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.sweep())
    }
}

impl Handler<GetStatus> for Counter {
    type Result = MessageResult<GetStatus>;
    fn handle(&mut self, _: GetStatus, _: &mut Context<Self>) -> Self::Result {
        MessageResult(CounterStatus {
            generation: self.generation,
            rebuilding: self.state.rebuilding(),
            pages: self.state.pages.len(),
        })
    }
}

#[cfg(feature = "test-hooks")]
impl Handler<Tracked> for Counter {
    type Result = MessageResult<Tracked>;
    fn handle(&mut self, msg: Tracked, _: &mut Context<Self>) -> Self::Result {
        MessageResult(
            msg.0
                .iter()
                .map(|p| self.state.pages.contains_key(p))
                .collect(),
        )
    }
}

#[cfg(feature = "test-hooks")]
impl Handler<InjectFault> for Counter {
    type Result = ();
    fn handle(&mut self, _: InjectFault, ctx: &mut Context<Self>) {
        // Scramble the live state the way a bug would, then fault.
        self.state.scramble();
        self.fault(ctx, "injected by test hook");
    }
}

impl Handler<GetLoad> for Counter {
    type Result = MessageResult<GetLoad>;
    fn handle(&mut self, _: GetLoad, _: &mut Context<Self>) -> Self::Result {
        let mut load = CounterLoad {
            pages: self.state.pages.len(),
            live_pages: 0,
            subscriptions: 0,
            follower_rooms: self.state.follower_rooms(),
            connections: 0,
            opened_total: self.state.opened_total,
        };
        for e in self.state.pages.values() {
            load.subscriptions += e.subscribers.len();
            load.connections += e.local.connections;
            load.live_pages += usize::from(!e.local.is_zero());
        }
        MessageResult(load)
    }
}

impl Handler<GetTop> for Counter {
    type Result = MessageResult<GetTop>;
    fn handle(&mut self, msg: GetTop, _: &mut Context<Self>) -> Self::Result {
        let mut live: Vec<(&PageId, &PageEntry)> = self
            .state
            .pages
            .iter()
            .filter(|(_, e)| !e.shown().is_zero())
            .collect();
        let order = |a: &(&PageId, &PageEntry), b: &(&PageId, &PageEntry)| {
            let n = |e: &PageEntry| e.shown().connections;
            n(b.1).cmp(&n(a.1)).then_with(|| a.0.cmp(b.0))
        };
        if live.len() > msg.0 && msg.0 > 0 {
            live.select_nth_unstable_by(msg.0 - 1, order);
        }
        live.truncate(msg.0);
        live.sort_by(order);
        MessageResult(
            live.into_iter()
                .map(|(id, e)| page_info(id.to_string(), e.shown(), &e.stats))
                .collect(),
        )
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
