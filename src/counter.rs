//! The `Counter`: the singleton that knows every page's live [`Tally`]
//! (connections and distinct visitors) and which rooms follow it, applies
//! changes at once and publishes them: at once when nothing went out in the
//! last `broadcast_interval`, else coalesced into one publish an interval
//! after the last (see [`Counter::publish_soon`]).
//!
//! It runs on its own arbiter under [`actix::Supervisor`]. Its handlers never
//! panic; when one finds its state inconsistent (or a test injects a fault) it
//! stops, the supervisor calls [`Supervised::restarting`], which drops all live
//! state, and `started` then asks every shard to re-report its rooms: rooms are
//! the source of truth, so counts stay exact across a counter restart.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use actix::{dev::ToEnvelope, prelude::*};

use crate::{
    cluster::{self, Cluster},
    config::Settings,
    protocol::{PageId, PageInfo, Tally},
    storage::{PageStats, Storage},
    time::{now_ms, rfc3339},
};

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
    pub room: u64,
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
    pub room: u64,
    pub links: Vec<PageId>,
}

/// A room's whole state, sent in answer to a resync of `epoch`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RoomState {
    pub epoch: u64,
    pub room: u64,
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

/// The shards (where [`Resync`] goes), given once after they are started.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetShards(pub Vec<Recipient<Resync>>);

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
/// it holds these recipients, not the room's address). A room makes one when
/// it starts and sends clones of the `Arc`; the counter keeps one per
/// follower room.
pub struct RoomHandle {
    pub counts: Recipient<Counts>,
    pub subscribed: Recipient<Subscribed>,
}

impl RoomHandle {
    /// The handle of the actor at `addr`.
    pub fn of<A>(addr: &Addr<A>) -> Arc<RoomHandle>
    where
        A: Handler<Counts> + Handler<Subscribed>,
        A::Context: ToEnvelope<A, Counts> + ToEnvelope<A, Subscribed>,
    {
        Arc::new(RoomHandle {
            counts: addr.clone().recipient(),
            subscribed: addr.clone().recipient(),
        })
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

// ---------------------------------------------------------------- state

/// One page as the counter knows it.
struct PageEntry {
    /// The page's tally on this node (reported by its room).
    local: Tally,
    /// Cluster mode: the sum of the other live nodes' tallies, kept while the
    /// page is followed here (0 otherwise). What is shown is `local + remote`.
    remote: Tally,
    /// Cluster mode: the `local` tally last sent to the cluster module.
    reported: Tally,
    /// The value last published to subscribers.
    published: Tally,
    /// A subscriber was answered with a value other than `published` since
    /// the last publish, so the next change must go out even if it returns
    /// to `published` (1 -> 0 -> 1 within one interval).
    told_other: bool,
    /// Rooms (by uid) that follow this page.
    subscribers: HashSet<u64>,
    /// Persistent stats.
    stats: PageStats,
    /// Stats changed since the last snapshot.
    dirty: bool,
}

impl PageEntry {
    /// The tally everyone sees: this node's plus, in cluster mode, the other
    /// live nodes' (a visitor with connections on two nodes counts on each).
    /// The only function used where a count is read.
    fn shown(&self) -> Tally {
        self.local.plus(self.remote)
    }

    /// Nothing live depends on it: no connection here, no follower, and
    /// (cluster mode) nothing unsent to the other nodes. Such an entry only
    /// caches stats, and may be dropped once they are saved.
    fn is_idle(&self) -> bool {
        self.local.is_zero() && self.subscribers.is_empty() && self.reported.is_zero()
    }

    /// Last activity, for least-recently-active order (never active: oldest).
    fn last_active(&self) -> u64 {
        self.stats.last_active_ms.unwrap_or(0)
    }
}

/// A room that follows at least one link.
struct Follower {
    /// Where to deliver.
    to: Arc<RoomHandle>,
    /// The links it follows.
    links: HashSet<PageId>,
}

/// Progress of a rebuild after a restart.
struct Rebuild {
    epoch: u64,
    started: Instant,
    /// Rooms each shard said it asked, by shard index.
    listed: HashMap<usize, Vec<u64>>,
    /// Rooms that answered.
    reported: HashSet<u64>,
    /// Subscribe answers held back until the rebuild completes: (room, accepted, refused).
    deferred: Vec<Deferred>,
    /// Cluster mode: the `ResendRemote` request whose answer is awaited.
    remote_req: Option<u64>,
}

/// Stats records written between two trims in a snapshot.
const SNAPSHOT_CHUNK: usize = 1024;

/// Longest a rebuild waits for missing reports before publishing anyway.
const RESYNC_DEADLINE: Duration = Duration::from_secs(2);

/// Cluster mode: longest an HTTP read waits for the other nodes' counts.
const FETCH_DEADLINE: Duration = Duration::from_millis(500);

/// Cluster mode: longest a subscribe answer waits for the cluster's values.
const LOAD_DEADLINE: Duration = Duration::from_secs(1);

/// A subscribe answer held during a rebuild: (room, accepted, refused, request id).
type Deferred = (Arc<RoomHandle>, Vec<PageId>, Vec<PageId>, u64);

/// Cluster mode: a subscribe answer held until the other nodes' counts of
/// newly followed pages are loaded, so the first update is the cluster count.
struct AwaitingLoad {
    /// The room to answer.
    to: Arc<RoomHandle>,
    /// Accepted links.
    links: Vec<PageId>,
    /// Refused links.
    refused: Vec<PageId>,
    /// `Follow` requests not yet `Loaded`.
    waiting: HashSet<u64>,
    /// When it was held (answered anyway after [`LOAD_DEADLINE`]).
    since: Instant,
    /// The room's request id ([`Subscribe::req`]).
    req: u64,
}

pub struct Counter {
    /// Timers and retention settings.
    settings: Arc<Settings>,
    /// Where stats are persisted.
    storage: Storage,
    /// Shards to ask for a resync after a restart.
    shards: Vec<Recipient<Resync>>,
    /// Every page with a count, a subscriber or unsaved stats.
    pages: HashMap<PageId, PageEntry>,
    /// Rooms following links, by room uid.
    followers: HashMap<u64, Follower>,
    /// Pages whose count changed since the last publish.
    changed: HashSet<PageId>,
    /// Starts so far (1 = first start).
    generation: u64,
    /// Counter of resync rounds.
    epoch: u64,
    /// Set while rebuilding.
    resync: Option<Rebuild>,
    /// When the oldest change not yet published was applied (publish-lag metric).
    oldest_change: Option<Instant>,
    /// When a publish last sent anything (to a room or the cluster module),
    /// or a rebuild sent the full counts: the start of the current interval.
    last_publish: Option<Instant>,
    /// A coalesced publish is scheduled (`run_later`) for the end of the
    /// interval that started at `last_publish`.
    publish_scheduled: bool,
    /// Connections opened since the process started (`/api/v1/stats`).
    opened_total: u64,
    /// Stats taken from dirty entries, waiting to be written, oldest first.
    unsaved: VecDeque<(PageId, PageStats)>,
    /// A chunk of `unsaved` is scheduled for writing.
    saving: bool,
    /// Time spent and records written by the snapshot in progress (metrics).
    snapshot_took: Duration,
    snapshot_records: usize,
    /// Cluster mode: the module that shares counts through Redis.
    cluster: Option<Addr<Cluster>>,
    /// Cluster mode: pages whose local count changed since the last publish.
    local_changed: HashSet<PageId>,
    /// Cluster mode: pages being loaded from the cluster, by `Follow` request.
    loading: HashMap<PageId, u64>,
    /// Cluster mode: subscribe answers held until their pages are loaded.
    awaiting: Vec<AwaitingLoad>,
    /// Cluster mode: last `Follow` request number.
    load_seq: u64,
}

impl Counter {
    pub fn new(settings: Arc<Settings>, storage: Storage) -> Counter {
        Counter {
            settings,
            storage,
            shards: Vec::new(),
            pages: HashMap::new(),
            followers: HashMap::new(),
            changed: HashSet::new(),
            generation: 0,
            epoch: 0,
            resync: None,
            oldest_change: None,
            last_publish: None,
            publish_scheduled: false,
            opened_total: 0,
            unsaved: VecDeque::new(),
            saving: false,
            snapshot_took: Duration::ZERO,
            snapshot_records: 0,
            cluster: None,
            local_changed: HashSet::new(),
            loading: HashMap::new(),
            awaiting: Vec::new(),
            load_seq: 0,
        }
    }

    /// The entry of `page`, loading its stats on first sight.
    fn entry(&mut self, page: &PageId) -> &mut PageEntry {
        let storage = &self.storage;
        self.pages.entry(page.clone()).or_insert_with(|| PageEntry {
            local: Tally::ZERO,
            remote: Tally::ZERO,
            reported: Tally::ZERO,
            published: Tally::ZERO,
            told_other: false,
            subscribers: HashSet::new(),
            stats: storage.load_stats(page).ok().flatten().unwrap_or_default(),
            dirty: false,
        })
    }

    fn set_count(&mut self, page: &PageId, tally: Tally, opened: u64) {
        let now = now_ms();
        let e = self.entry(page);
        if e.local == tally && opened == 0 {
            return;
        }
        if e.local != tally {
            crate::metrics::count_changed();
        }
        e.local = tally;
        e.stats.total_connections += opened;
        e.stats.last_active_ms = Some(now);
        if tally.connections > e.stats.peak_connections {
            e.stats.peak_connections = tally.connections;
            e.stats.peak_at_ms = Some(now);
        }
        e.stats.peak_visitors = e.stats.peak_visitors.max(tally.visitors);
        e.dirty = true;
        self.changed.insert(page.clone());
        self.opened_total += opened;
        self.oldest_change.get_or_insert_with(Instant::now);
        self.local_changed.insert(page.clone());
    }

    fn follow(&mut self, room: u64, to: &Arc<RoomHandle>, links: &[PageId]) {
        let mut first = Vec::new();
        for link in links {
            let e = self.entry(link);
            if e.subscribers.insert(room) && e.subscribers.len() == 1 {
                first.push(link.clone());
            }
        }
        // Node-level reference counting: the cluster follows a page while
        // at least one local room does (rebuilds send the whole set instead).
        if let (Some(c), None, false) = (&self.cluster, &self.resync, first.is_empty()) {
            self.load_seq += 1;
            let req = self.load_seq;
            for p in &first {
                self.loading.insert(p.clone(), req);
            }
            c.do_send(cluster::Follow { pages: first, req });
        }
        let f = self.followers.entry(room).or_insert_with(|| Follower {
            to: to.clone(),
            links: HashSet::new(),
        });
        f.to = to.clone();
        f.links.extend(links.iter().cloned());
    }

    fn unfollow(&mut self, room: u64, links: &[PageId]) {
        let mut last = Vec::new();
        for link in links {
            if let Some(e) = self.pages.get_mut(link) {
                if e.subscribers.remove(&room) && e.subscribers.is_empty() {
                    // No longer followed here: remote values stop arriving.
                    e.remote = Tally::ZERO;
                    last.push(link.clone());
                }
            }
        }
        if let (Some(c), None, false) = (&self.cluster, &self.resync, last.is_empty()) {
            c.do_send(cluster::Unfollow { pages: last });
        }
        if let Some(f) = self.followers.get_mut(&room) {
            for link in links {
                f.links.remove(link);
            }
            if f.links.is_empty() {
                self.followers.remove(&room);
            }
        }
    }

    fn counts_of(&self, links: &[PageId]) -> Vec<(PageId, Tally)> {
        links
            .iter()
            .map(|l| {
                let shown = self.pages.get(l).map_or(Tally::ZERO, PageEntry::shown);
                (l.clone(), shown)
            })
            .collect()
    }

    /// Current counts for a new follower; remembers when it was told a
    /// value that the other followers have not been told yet (the caller
    /// then calls [`Counter::publish_soon`], after sending the answer).
    fn answer(&mut self, links: &[PageId]) -> Vec<(PageId, Tally)> {
        for l in links {
            if let Some(e) = self.pages.get_mut(l) {
                if e.shown() != e.published {
                    e.told_other = true;
                    self.changed.insert(l.clone());
                }
            }
        }
        self.counts_of(links)
    }

    /// To be called after every change recorded in `changed` or
    /// `local_changed`. Leading edge: if nothing was published in the last
    /// `broadcast_interval`, publishes now. Otherwise makes sure one publish
    /// is scheduled for `last_publish + broadcast_interval`, which takes every
    /// change made until then. So a burst of changes costs one publish now
    /// and one an interval later, and every room and the cluster module get
    /// at most one message per interval (plus a rebuild's full counts).
    /// Nothing during a rebuild: its completion sends the full state.
    fn publish_soon(&mut self, ctx: &mut Context<Self>) {
        if self.publish_scheduled || self.resync.is_some() {
            return;
        }
        if self.changed.is_empty() && self.local_changed.is_empty() {
            return;
        }
        let interval = self.settings.counter.broadcast_interval;
        let now = Instant::now();
        match self.last_publish {
            Some(last) if now.duration_since(last) < interval => {
                self.publish_scheduled = true;
                ctx.run_later(last + interval - now, |act, _| {
                    act.publish_scheduled = false;
                    act.publish();
                });
            }
            _ => self.publish(),
        }
    }

    /// Publishes every changed count: one message per subscriber room (and,
    /// in cluster mode, one to the cluster module). Called only through
    /// [`Counter::publish_soon`] and the publish it schedules.
    fn publish(&mut self) {
        if self.resync.is_some() {
            return;
        }
        let sent_local = self.publish_local();
        if self.changed.is_empty() {
            if sent_local {
                self.last_publish = Some(Instant::now());
            }
            return;
        }
        let since = self.oldest_change.take();
        let mut published = 0;
        let mut outbox: HashMap<u64, Vec<(PageId, Tally)>> = HashMap::new();
        for page in self.changed.drain() {
            let Some(e) = self.pages.get_mut(&page) else {
                continue;
            };
            let shown = e.shown();
            if shown == e.published && !e.told_other {
                continue;
            }
            e.published = shown;
            e.told_other = false;
            published += 1;
            for room in &e.subscribers {
                outbox.entry(*room).or_default().push((page.clone(), shown));
            }
        }
        crate::metrics::counts_published(published);
        // A publish that sent nothing (changes that cancelled out, pages
        // nobody follows) does not start an interval: it cost no one a message.
        if sent_local || !outbox.is_empty() {
            self.last_publish = Some(Instant::now());
        }
        for (room, changes) in outbox {
            if let Some(f) = self.followers.get(&room) {
                f.to.counts.do_send(Counts { changes, since });
            }
        }
    }

    /// Cluster mode: sends the local counts that changed since the last
    /// publish (so at most one message per interval); true if it sent one.
    fn publish_local(&mut self) -> bool {
        let Some(cluster) = &self.cluster else {
            self.local_changed.clear();
            return false;
        };
        let mut changes = Vec::new();
        for page in self.local_changed.drain() {
            if let Some(e) = self.pages.get_mut(&page) {
                if e.local != e.reported {
                    e.reported = e.local;
                    changes.push((page, e.local));
                }
            }
        }
        if changes.is_empty() {
            return false;
        }
        cluster.do_send(cluster::LocalCounts {
            changes,
            full: false,
        });
        true
    }

    /// Cluster mode, after a rebuild: the whole local state and followed set.
    fn resend_cluster_state(&mut self) {
        self.local_changed.clear();
        let Some(cluster) = &self.cluster else { return };
        let mut changes = Vec::new();
        let mut followed = Vec::new();
        for (page, e) in self.pages.iter_mut() {
            e.reported = e.local;
            if !e.local.is_zero() {
                changes.push((page.clone(), e.local));
            }
            if !e.subscribers.is_empty() {
                followed.push(page.clone());
            }
        }
        cluster.do_send(cluster::LocalCounts {
            changes,
            full: true,
        });
        cluster.do_send(cluster::SetFollowed { pages: followed });
    }

    /// Moves every dirty entry's stats to the write queue.
    fn take_dirty(&mut self) {
        for (p, e) in self.pages.iter_mut().filter(|(_, e)| e.dirty) {
            e.dirty = false;
            self.unsaved.push_back((p.clone(), e.stats.clone()));
        }
    }

    /// The snapshot timer: queues the dirty stats and writes them one chunk
    /// per turn of the actor's loop, so a burst of new pages (an id flood)
    /// never holds the counter away from its messages for long.
    fn snapshot(&mut self, ctx: &mut Context<Self>) {
        self.take_dirty();
        if self.unsaved.is_empty() {
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
        self.take_dirty();
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
        let n = self.unsaved.len().min(SNAPSHOT_CHUNK);
        let chunk: Vec<(PageId, PageStats)> = self.unsaved.drain(..n).collect();
        if let Err(e) = self
            .storage
            .save_stats(chunk.iter().map(|(p, s)| (&**p, s)))
        {
            tracing::error!(error = %e, "stats snapshot failed; will retry");
            for item in chunk.into_iter().rev() {
                self.unsaved.push_front(item);
            }
            return Err(());
        }
        self.snapshot_took += started.elapsed();
        self.snapshot_records += n;
        self.trim_storage();
        Ok(!self.unsaved.is_empty())
    }

    /// After the queue is written: metrics, idle pages forgotten, the trim,
    /// and a flush (off-thread unless `wait`).
    fn finish_snapshot(&mut self, wait: bool) {
        let records = std::mem::take(&mut self.snapshot_records);
        crate::metrics::snapshot(std::mem::take(&mut self.snapshot_took), records);
        self.forget_idle_pages();
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

    /// Drops the idle pages (see [`PageEntry::is_idle`]) inactive for
    /// `room.idle_timeout` (their stats were just saved).
    fn forget_idle_pages(&mut self) {
        if self.resync.is_some() {
            return;
        }
        let timeout = self.settings.room.idle_timeout.as_millis() as u64;
        let cutoff = now_ms().saturating_sub(timeout);
        let before = self.pages.len();
        self.pages
            .retain(|_, e| !(e.is_idle() && !e.dirty && e.last_active() < cutoff));
        crate::metrics::evicted("pages", before - self.pages.len());
    }

    /// At `limits.max_pages`: makes room for `wanted` new pages by dropping
    /// the least recently active idle ones (at least a sixteenth of the cap
    /// at a time, so the scan is amortized), saving their stats first.
    fn make_room_for_pages(&mut self, wanted: usize) {
        let max = self.settings.limits.max_pages;
        if self.pages.len() + wanted <= max || self.resync.is_some() {
            return;
        }
        let goal = (self.pages.len() + wanted - max).max(max / 16);
        let mut idle: Vec<(u64, &PageId)> = self
            .pages
            .iter()
            .filter(|(_, e)| e.is_idle())
            .map(|(p, e)| (e.last_active(), p))
            .collect();
        if idle.len() > goal {
            idle.select_nth_unstable(goal - 1);
            idle.truncate(goal);
        }
        let doomed: Vec<PageId> = idle.into_iter().map(|(_, p)| p.clone()).collect();
        for p in &doomed {
            // Unsaved stats go to the write queue.
            if let Some(e) = self.pages.remove(p).filter(|e| e.dirty) {
                self.unsaved.push_back((p.clone(), e.stats));
            }
        }
        crate::metrics::evicted("pages", doomed.len());
        tracing::debug!(
            dropped = doomed.len(),
            "page cap reached; idle pages dropped"
        );
    }

    /// Deletes the least recently active stored records past
    /// `storage.max_records` (never those of live pages).
    fn trim_storage(&mut self) {
        let max = self.settings.storage.max_records;
        let live = |page: &str| {
            self.pages
                .get(page)
                .is_some_and(|e| !e.local.is_zero() || !e.subscribers.is_empty())
        };
        match self.storage.trim(max, live) {
            Ok((stats, rooms)) => {
                crate::metrics::evicted("stats_records", stats.len());
                crate::metrics::evicted("room_records", rooms);
                if stats.len() + rooms > 0 {
                    tracing::debug!(
                        stats = stats.len(),
                        rooms,
                        max_records = max,
                        "records past the cap deleted"
                    );
                }
                // Stats deleted on disk are gone from memory too (the
                // pages are idle: the trim keeps live ones), so a page
                // visited again starts afresh instead of writing them back.
                for page in stats {
                    if self
                        .pages
                        .get(page.as_str())
                        .is_some_and(|e| e.is_idle() && !e.dirty)
                    {
                        self.pages.remove(page.as_str());
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "record trim failed"),
        }
    }

    fn sweep(&mut self) -> SweepReport {
        let mut report = SweepReport::default();
        // Pages with unsaved stats are kept; stats in the write queue are
        // written whether their page stays in memory or not.
        let before = self.pages.len();
        self.pages.retain(|_, e| {
            !e.local.is_zero() || !e.subscribers.is_empty() || e.dirty || e.reported != e.local
        });
        report.pages_dropped = before - self.pages.len();
        let now = now_ms();
        let live = |page: &str| {
            self.pages
                .get(page)
                .is_some_and(|e| !e.local.is_zero() || !e.subscribers.is_empty())
        };
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
            pages = self.pages.len(),
            "sweep"
        );
        report
    }

    /// Starts a rebuild: every shard re-reports its rooms.
    fn begin_resync(&mut self) {
        self.epoch += 1;
        tracing::warn!(
            epoch = self.epoch,
            generation = self.generation,
            "counter restarted; rebuilding from rooms"
        );
        self.resync = Some(Rebuild {
            epoch: self.epoch,
            started: Instant::now(),
            listed: HashMap::new(),
            reported: HashSet::new(),
            // Answers held for the cluster are answered after the rebuild.
            deferred: std::mem::take(&mut self.awaiting)
                .into_iter()
                .map(|a| (a.to, a.links, a.refused, a.req))
                .collect(),
            remote_req: None,
        });
        for shard in &self.shards {
            shard.do_send(Resync { epoch: self.epoch });
        }
        if let Some(c) = &self.cluster {
            // Remote sums were dropped with the live state: ask for them again,
            // so the rebuilt counts include the other nodes from the start.
            self.load_seq += 1;
            c.do_send(cluster::ResendRemote { req: self.load_seq });
            if let Some(r) = &mut self.resync {
                r.remote_req = Some(self.load_seq);
            }
        }
        self.check_resync();
    }

    /// Finishes the rebuild when every listed room has reported (or the deadline passed).
    fn check_resync(&mut self) {
        let Some(r) = &self.resync else { return };
        let all_listed = r.listed.len() >= self.shards.len();
        let all_reported = r
            .listed
            .values()
            .flatten()
            .all(|uid| r.reported.contains(uid));
        let late = r.started.elapsed() >= RESYNC_DEADLINE;
        let complete = all_listed && all_reported && r.remote_req.is_none();
        if !complete && !late {
            return;
        }
        let Some(r) = self.resync.take() else { return };
        if !complete {
            tracing::warn!(
                "rebuild deadline passed with missing reports; publishing what is known"
            );
        }
        // Every follower gets the full current counts of its links; rooms
        // forward only the values that differ from what their clients saw.
        for e in self.pages.values_mut() {
            if e.subscribers.is_empty() {
                e.remote = Tally::ZERO;
            }
            e.published = e.shown();
        }
        self.changed.clear();
        self.oldest_change = None;
        // The full counts below are this interval's publish: a change right
        // after waits for the end of the interval (`publish_soon`).
        self.last_publish = Some(Instant::now());
        self.resend_cluster_state();
        for f in self.followers.values() {
            let links: Vec<PageId> = f.links.iter().cloned().collect();
            f.to.counts.do_send(Counts {
                changes: self.counts_of(&links),
                since: None,
            });
        }
        for (to, links, refused, req) in r.deferred {
            to.subscribed.do_send(Subscribed {
                counts: self.counts_of(&links),
                refused,
                req,
            });
        }
        tracing::info!(
            epoch = r.epoch,
            rooms = r.reported.len(),
            "rebuild complete"
        );
    }

    /// Cluster mode: sends the held subscribe answers that are complete (or
    /// waited [`LOAD_DEADLINE`]).
    fn release_awaiting(&mut self, ctx: &mut Context<Self>) {
        if self.awaiting.is_empty() || self.resync.is_some() {
            return;
        }
        let (ready, held): (Vec<AwaitingLoad>, Vec<AwaitingLoad>) =
            std::mem::take(&mut self.awaiting)
                .into_iter()
                .partition(|a| a.waiting.is_empty() || a.since.elapsed() >= LOAD_DEADLINE);
        self.awaiting = held;
        for a in ready {
            let counts = self.answer(&a.links);
            a.to.subscribed.do_send(Subscribed {
                counts,
                refused: a.refused,
                req: a.req,
            });
        }
        // After the answers: a room hears of a newer value only after its answer.
        self.publish_soon(ctx);
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
            act.check_resync();
            act.release_awaiting(ctx);
        });
        if self.generation > 1 {
            self.begin_resync();
        }
    }
}

impl Supervised for Counter {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        crate::metrics::counter_restarted();
        // Live state is rebuilt from the rooms; stats (not live) are kept,
        // except the fields that the live state derives.
        let stats: HashMap<PageId, (PageStats, bool)> = self
            .pages
            .drain()
            .filter(|(_, e)| e.dirty)
            .map(|(p, e)| (p, (e.stats, e.dirty)))
            .collect();
        for (page, (stats, dirty)) in stats {
            self.pages.insert(
                page,
                PageEntry {
                    local: Tally::ZERO,
                    remote: Tally::ZERO,
                    reported: Tally::ZERO,
                    published: Tally::ZERO,
                    told_other: false,
                    subscribers: HashSet::new(),
                    stats,
                    dirty,
                },
            );
        }
        self.followers.clear();
        self.changed.clear();
        self.local_changed.clear();
        self.loading.clear();
        self.resync = None;
        // The restart dropped the context's timers, a scheduled publish and
        // a scheduled write too (the write queue itself is kept).
        self.publish_scheduled = false;
        self.saving = false;
    }
}

impl Handler<SetShards> for Counter {
    type Result = ();
    fn handle(&mut self, msg: SetShards, _: &mut Context<Self>) {
        self.shards = msg.0;
    }
}

impl Handler<SetCluster> for Counter {
    type Result = ();
    fn handle(&mut self, msg: SetCluster, _: &mut Context<Self>) {
        self.cluster = Some(msg.0);
    }
}

impl Handler<cluster::RemoteCounts> for Counter {
    type Result = ();
    fn handle(&mut self, msg: cluster::RemoteCounts, ctx: &mut Context<Self>) {
        for (page, sum) in msg.changes {
            if self.resync.is_some() {
                // Rooms are still re-reporting which pages they follow; pages
                // left unfollowed are zeroed when the rebuild completes.
                self.entry(&page).remote = sum;
                continue;
            }
            // Only followed pages hold remote values (see `unfollow`).
            if let Some(e) = self.pages.get_mut(&page) {
                if !e.subscribers.is_empty() && e.remote != sum {
                    e.remote = sum;
                    self.changed.insert(page);
                }
            }
        }
        self.publish_soon(ctx);
    }
}

impl Handler<cluster::Loaded> for Counter {
    type Result = ();
    fn handle(&mut self, msg: cluster::Loaded, ctx: &mut Context<Self>) {
        if let Some(r) = &mut self.resync {
            if r.remote_req == Some(msg.req) {
                r.remote_req = None;
                self.check_resync();
            }
        }
        self.loading.retain(|_, req| *req != msg.req);
        for a in &mut self.awaiting {
            a.waiting.remove(&msg.req);
        }
        self.release_awaiting(ctx);
    }
}

impl Handler<RoomCount> for Counter {
    type Result = ();
    fn handle(&mut self, msg: RoomCount, ctx: &mut Context<Self>) {
        if !self.pages.contains_key(&msg.page) {
            // A page with a room is always tracked, but it takes the place
            // of an idle one when the counter is at `limits.max_pages`.
            self.make_room_for_pages(1);
        }
        self.set_count(&msg.page, msg.tally, msg.opened);
        self.publish_soon(ctx);
    }
}

impl Handler<Subscribe> for Counter {
    type Result = ();
    fn handle(&mut self, msg: Subscribe, ctx: &mut Context<Self>) {
        // Links to pages not yet tracked are refused once `max_pages` is reached.
        let max = self.settings.limits.max_pages;
        let new = msg
            .links
            .iter()
            .filter(|l| !self.pages.contains_key(*l))
            .count();
        self.make_room_for_pages(new);
        let (mut accepted, mut refused) = (Vec::with_capacity(msg.links.len()), Vec::new());
        for link in msg.links {
            if self.pages.contains_key(&link) || self.pages.len() < max {
                self.entry(&link);
                accepted.push(link);
            } else {
                refused.push(link);
            }
        }
        if !refused.is_empty() {
            crate::metrics::links_refused(refused.len());
            tracing::info!(
                refused = refused.len(),
                max_pages = max,
                "page cap reached; links refused"
            );
        }
        self.follow(msg.room, &msg.to, &accepted);
        if let Some(r) = &mut self.resync {
            r.deferred.push((msg.to, accepted, refused, msg.req));
            return;
        }
        let waiting: HashSet<u64> = accepted
            .iter()
            .filter_map(|l| self.loading.get(l).copied())
            .collect();
        if !waiting.is_empty() {
            self.awaiting.push(AwaitingLoad {
                to: msg.to,
                links: accepted,
                refused,
                waiting,
                since: Instant::now(),
                req: msg.req,
            });
            return;
        }
        let counts = self.answer(&accepted);
        msg.to.subscribed.do_send(Subscribed {
            counts,
            refused,
            req: msg.req,
        });
        // After the answer: a room hears of a newer value only after its answer.
        self.publish_soon(ctx);
    }
}

impl Handler<Unsubscribe> for Counter {
    type Result = ();
    fn handle(&mut self, msg: Unsubscribe, _: &mut Context<Self>) {
        self.unfollow(msg.room, &msg.links);
    }
}

impl Handler<RoomState> for Counter {
    type Result = ();
    fn handle(&mut self, msg: RoomState, ctx: &mut Context<Self>) {
        // Replace what is known of this room with its own account.
        let old: Vec<PageId> = self
            .followers
            .get(&msg.room)
            .map(|f| f.links.iter().cloned().collect())
            .unwrap_or_default();
        self.unfollow(msg.room, &old);
        self.follow(msg.room, &msg.to, &msg.links);
        if msg.links.is_empty() {
            self.followers.remove(&msg.room);
        }
        let e = self.entry(&msg.page);
        if e.local != msg.tally {
            e.local = msg.tally;
            self.changed.insert(msg.page.clone());
            self.oldest_change.get_or_insert_with(Instant::now);
            self.local_changed.insert(msg.page.clone());
        }
        if let Some(r) = &mut self.resync {
            if r.epoch == msg.epoch {
                r.reported.insert(msg.room);
            }
        }
        self.check_resync();
        // A report after the rebuild completed (past its deadline) is a change.
        self.publish_soon(ctx);
    }
}

impl Handler<ShardRooms> for Counter {
    type Result = ();
    fn handle(&mut self, msg: ShardRooms, _: &mut Context<Self>) {
        if let Some(r) = &mut self.resync {
            if r.epoch == msg.epoch {
                r.listed.insert(msg.shard, msg.rooms);
            }
        }
        self.check_resync();
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
            .filter(|(_, id)| self.pages.get(*id).is_none_or(|e| e.subscribers.is_empty()))
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
            .map(|id| self.pages.get(id).map_or(Tally::ZERO, PageEntry::shown))
            .collect();
        let fetch = self.fetch_unfollowed(&msg.0);
        Box::pin(add_fetched(values, fetch))
    }
}

impl Handler<GetPage> for Counter {
    type Result = ResponseFuture<PageInfo>;
    fn handle(&mut self, msg: GetPage, _: &mut Context<Self>) -> Self::Result {
        let (shown, stats) = match self.pages.get(&msg.0) {
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
            rebuilding: self.resync.is_some(),
            pages: self.pages.len(),
        })
    }
}

#[cfg(feature = "test-hooks")]
impl Handler<Tracked> for Counter {
    type Result = MessageResult<Tracked>;
    fn handle(&mut self, msg: Tracked, _: &mut Context<Self>) -> Self::Result {
        MessageResult(msg.0.iter().map(|p| self.pages.contains_key(p)).collect())
    }
}

#[cfg(feature = "test-hooks")]
impl Handler<InjectFault> for Counter {
    type Result = ();
    fn handle(&mut self, _: InjectFault, ctx: &mut Context<Self>) {
        // Scramble the live state the way a bug would, then fault.
        for e in self.pages.values_mut() {
            e.local.connections = e.local.connections.wrapping_add(7);
            e.subscribers.clear();
        }
        self.followers.clear();
        self.fault(ctx, "injected by test hook");
    }
}

impl Handler<GetLoad> for Counter {
    type Result = MessageResult<GetLoad>;
    fn handle(&mut self, _: GetLoad, _: &mut Context<Self>) -> Self::Result {
        let mut load = CounterLoad {
            pages: self.pages.len(),
            live_pages: 0,
            subscriptions: 0,
            follower_rooms: self.followers.len(),
            connections: 0,
            opened_total: self.opened_total,
        };
        for e in self.pages.values() {
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
