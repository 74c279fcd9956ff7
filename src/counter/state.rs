//! The counter's logic as a plain state machine, without actix: inputs in
//! (a room's tally, a subscribe, an unsubscribe, a remote sum, a tick with
//! `now`), an [`Outbox`] out (what to send, in order, and when to publish).
//! The actor in `mod.rs` owns it, runs the timers, dispatches the outbox and
//! writes the stats it queues. `R` is where a room is delivered to (the
//! actor's `Arc<RoomHandle>`; anything cloneable in tests).

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use crate::{
    cluster,
    config::Settings,
    protocol::{PageId, Tally},
    storage::PageStats,
};

/// A room instance's id, unique in the process (a recreated room gets a new one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomId(u64);

impl RoomId {
    /// An id no room of this process had before.
    pub fn fresh() -> RoomId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        RoomId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

impl std::fmt::Display for RoomId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A rebuild round of the counter ([`State::begin_rebuild`] starts the
/// next); the default is none's, which no report answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Epoch(u64);

impl std::fmt::Display for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Longest a rebuild waits for missing reports before publishing anyway.
const RESYNC_DEADLINE: Duration = Duration::from_secs(2);

/// Cluster mode: longest a subscribe answer waits for the cluster's values.
const LOAD_DEADLINE: Duration = Duration::from_secs(1);

/// The time an input happens at: monotonic (intervals, deadlines) and wall
/// clock in milliseconds (stats).
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub at: Instant,
    pub ms: u64,
}

/// One thing to send, in the order the state decided it.
pub enum Effect<R> {
    /// To a follower room: latest tallies, with when the oldest change was applied.
    Counts {
        to: R,
        changes: Vec<(PageId, Tally)>,
        since: Option<Instant>,
    },
    /// To a room: the answer to its subscribe `req`.
    Answer {
        to: R,
        counts: Vec<(PageId, Tally)>,
        refused: Vec<PageId>,
        req: u64,
    },
    /// To every shard: re-report your rooms for rebuild `epoch`.
    Resync { epoch: Epoch },
    /// To the cluster module (cluster mode only).
    Cluster(ToCluster),
}

/// The counter's messages to the cluster module.
pub enum ToCluster {
    Local(cluster::LocalCounts),
    Follow(cluster::Follow),
    Unfollow(cluster::Unfollow),
    SetFollowed(cluster::SetFollowed),
    ResendRemote(cluster::ResendRemote),
}

/// What an input produced.
pub struct Outbox<R> {
    /// To send now, in order (an answer goes before newer counts to its room).
    pub sent: Vec<Effect<R>>,
    /// Schedule [`State::scheduled_publish`] after this delay.
    pub(crate) publish_in: Option<Duration>,
}

impl<R> Default for Outbox<R> {
    fn default() -> Self {
        Outbox {
            sent: Vec::new(),
            publish_in: None,
        }
    }
}

/// A room's whole state, as it reports it for rebuild `epoch`.
pub(crate) struct RoomReport<R> {
    pub(crate) epoch: Epoch,
    pub(crate) room: RoomId,
    pub(crate) to: R,
    pub(crate) page: PageId,
    pub(crate) tally: Tally,
    pub(crate) links: Vec<PageId>,
}

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
    /// Rooms (by id) that follow this page.
    subscribers: HashSet<RoomId>,
    /// When its oldest unpublished change was made (the delay bound).
    pending_since: Option<Instant>,
    /// Persistent stats.
    stats: PageStats,
    /// Stats changed since the last snapshot.
    dirty: bool,
}

impl PageEntry {
    fn new(stats: PageStats, dirty: bool) -> PageEntry {
        PageEntry {
            local: Tally::ZERO,
            remote: Tally::ZERO,
            reported: Tally::ZERO,
            published: Tally::ZERO,
            told_other: false,
            subscribers: HashSet::new(),
            pending_since: None,
            stats,
            dirty,
        }
    }

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

    /// A connection here or a follower room.
    fn is_live(&self) -> bool {
        !self.local.is_zero() || !self.subscribers.is_empty()
    }

    /// Last activity, for least-recently-active order (never active: oldest).
    fn last_active(&self) -> u64 {
        self.stats.last_active_ms.unwrap_or(0)
    }
}

/// A room that follows at least one link.
struct Follower<R> {
    /// Where to deliver.
    to: R,
    /// Its page, whose connections a delivery to it costs (`None`: counts as one).
    page: Option<PageId>,
    /// The links it follows.
    links: HashSet<PageId>,
}

/// A subscribe answer held back.
struct Deferred<R> {
    /// The room to answer.
    to: R,
    /// The links accepted (their counts go in the answer).
    accepted: Vec<PageId>,
    /// The links refused at `limits.max_pages`.
    refused: Vec<PageId>,
    /// The id of the subscribe it answers.
    req: u64,
}

/// A subscribe's links split at `limits.max_pages`.
struct Admitted {
    /// Tracked (already, or from now on).
    accepted: Vec<PageId>,
    /// Refused: new pages past the cap.
    refused: Vec<PageId>,
}

/// One of the pages with the most live connections ([`State::top`]).
pub(crate) struct TopPage<'a> {
    pub(crate) id: &'a PageId,
    pub(crate) shown: Tally,
    pub(crate) stats: &'a PageStats,
}

/// Progress of a rebuild after a restart.
struct Rebuild<R> {
    epoch: Epoch,
    started: Instant,
    /// Rooms each shard said it asked, by shard index.
    listed: HashMap<usize, Vec<RoomId>>,
    /// Rooms that answered.
    reported: HashSet<RoomId>,
    /// Subscribe answers held back until the rebuild completes.
    deferred: Vec<Deferred<R>>,
    /// Cluster mode: the `ResendRemote` request whose answer is awaited.
    remote_req: Option<u64>,
}

/// Cluster mode: a subscribe answer held until the other nodes' counts of
/// newly followed pages are loaded, so the first update is the cluster count.
struct AwaitingLoad<R> {
    /// The answer.
    answer: Deferred<R>,
    /// `Follow` requests not yet `Loaded`.
    waiting: HashSet<u64>,
    /// When it was held (answered anyway after [`LOAD_DEADLINE`]).
    since: Instant,
}

/// Loads a page's stored stats on first sight.
pub type LoadStats = Box<dyn FnMut(&PageId) -> PageStats>;

/// The page of the room a follower handle delivers to.
pub type PageOf<R> = Box<dyn Fn(&R) -> Option<PageId>>;

/// How far behind the workers are: the longest a publish's batch waited in
/// a worker's queue since the last call (or has been waiting, unhandled).
pub type LagProbe = Box<dyn FnMut(Instant) -> Duration>;

/// The delivery budget: a token bucket in connection-deliveries (a page's
/// change handed to a follower room costs that room's connections), refilled
/// at `rate` per second, holding at most one second's worth. The rate adapts
/// to the workers, as TCP's window does to the network: each publish that
/// finds a worker more than `counter.max_worker_lag` behind halves it (down
/// to a hundredth of `counter.delivery_budget`); without lag it grows back
/// by `counter.delivery_budget` per second, up to it.
struct Budget {
    /// Tokens left (negative after a publish the delay bound forced).
    tokens: f64,
    /// When it was last refilled.
    at: Option<Instant>,
    /// Deliveries per second it refills at now.
    rate: f64,
}

/// Every page's live count, who follows it, and what is left to publish.
pub struct State<R> {
    /// Page cap, publish interval, idle timeout.
    settings: Arc<Settings>,
    /// Where a page's stats come from on first sight.
    load: LoadStats,
    /// Every page with a count, a subscriber or unsaved stats.
    pages: HashMap<PageId, PageEntry>,
    /// Rooms following links, by room id.
    followers: HashMap<RoomId, Follower<R>>,
    /// Pages whose shown count may have changed since the last publish.
    changed: HashSet<PageId>,
    /// Shards that must list their rooms in a rebuild.
    shards: usize,
    /// Counter of rebuild rounds.
    epoch: Epoch,
    /// Set while rebuilding.
    rebuild: Option<Rebuild<R>>,
    /// When the oldest change not yet published was applied (publish-lag metric).
    oldest_change: Option<Instant>,
    /// When a publish last sent anything (to a room or the cluster module),
    /// or a rebuild sent the full counts: the start of the current interval.
    last_publish: Option<Instant>,
    /// A coalesced publish is scheduled for the end of the interval that
    /// started at `last_publish`.
    publish_scheduled: bool,
    /// Connections opened since the process started (`/api/v1/stats`).
    opened_total: u64,
    /// Stats taken from dirty or dropped entries, waiting to be written, oldest first.
    unsaved: VecDeque<(PageId, PageStats)>,
    /// Cluster mode is on.
    cluster: bool,
    /// Cluster mode: pages whose local count changed since the last publish.
    local_changed: HashSet<PageId>,
    /// Cluster mode: pages being loaded from the cluster, by `Follow` request.
    loading: HashMap<PageId, u64>,
    /// Cluster mode: subscribe answers held until their pages are loaded.
    awaiting: Vec<AwaitingLoad<R>>,
    /// Cluster mode: last `Follow` (or `ResendRemote`) request number.
    load_seq: u64,
    /// The page of a follower room (for the cost of a delivery).
    page_of: PageOf<R>,
    /// What publishing may still spend.
    budget: Budget,
    /// How far behind the workers are (the budget's signal).
    lag_probe: LagProbe,
    /// An inconsistency found in the state: the actor restarts and rebuilds.
    fault: Option<&'static str>,
}

impl<R: Clone> State<R> {
    pub fn new(settings: Arc<Settings>, load: LoadStats) -> State<R> {
        let most = settings.counter.delivery_budget as f64;
        State {
            settings,
            load,
            pages: HashMap::new(),
            followers: HashMap::new(),
            changed: HashSet::new(),
            shards: 0,
            epoch: Epoch::default(),
            rebuild: None,
            oldest_change: None,
            last_publish: None,
            publish_scheduled: false,
            opened_total: 0,
            unsaved: VecDeque::new(),
            cluster: false,
            local_changed: HashSet::new(),
            loading: HashMap::new(),
            awaiting: Vec::new(),
            load_seq: 0,
            page_of: Box::new(|_| None),
            budget: Budget {
                tokens: 0.0,
                at: None,
                rate: most,
            },
            lag_probe: Box::new(|_| Duration::ZERO),
            fault: None,
        }
    }

    /// How to tell a follower room's page (without it every room costs one).
    pub(crate) fn set_page_of(&mut self, page_of: PageOf<R>) {
        self.page_of = page_of;
    }

    /// The number of shards a rebuild waits for.
    /// Deliveries per second the budget refills at now.
    pub(crate) fn budget_rate(&self) -> f64 {
        self.budget.rate
    }

    /// Where the delivery budget learns how far behind the workers are.
    pub(crate) fn set_lag_probe(&mut self, probe: LagProbe) {
        self.lag_probe = probe;
    }

    pub(crate) fn set_shards(&mut self, n: usize) {
        self.shards = n;
    }

    /// Cluster mode from now on: local changes, follows and unfollows go to the cluster.
    pub(crate) fn set_cluster(&mut self) {
        self.cluster = true;
    }

    /// True while rebuilding from the rooms.
    pub(crate) fn rebuilding(&self) -> bool {
        self.rebuild.is_some()
    }

    // ------------------------------------------------------------ reads

    /// Pages held in memory: the ones `limits.max_pages` caps, every entry
    /// but the site figure's (`protocol::SITE_LINK`, the empty id), which is
    /// no page and comes and goes with the node's open sessions.
    pub(crate) fn page_count(&self) -> usize {
        self.pages.len() - usize::from(self.pages.contains_key(crate::protocol::SITE_LINK))
    }

    /// True if `page` is held in memory.
    pub(crate) fn tracks(&self, page: &str) -> bool {
        self.pages.contains_key(page)
    }

    /// What `page` shows now (`None`: not held in memory).
    pub(crate) fn shown(&self, page: &str) -> Option<Tally> {
        self.pages.get(page).map(PageEntry::shown)
    }

    /// The stats of `page` held in memory.
    pub(crate) fn stats(&self, page: &str) -> Option<&PageStats> {
        self.pages.get(page).map(|e| &e.stats)
    }

    /// True if a room here follows `page`.
    pub(crate) fn is_followed(&self, page: &str) -> bool {
        self.pages
            .get(page)
            .is_some_and(|e| !e.subscribers.is_empty())
    }

    /// The sizes of the state (`site`, the site figure's link, is not a page).
    pub(crate) fn load(&self, site: &PageId) -> super::CounterLoad {
        let mut load = super::CounterLoad {
            pages: self.pages.len(),
            live_pages: 0,
            subscriptions: 0,
            follower_rooms: self.followers.len(),
            connections: 0,
            opened_total: self.opened_total,
        };
        for (id, e) in &self.pages {
            load.subscriptions += e.subscribers.len();
            if id == site {
                load.pages -= 1;
                continue;
            }
            load.connections += e.local.connections;
            load.live_pages += usize::from(!e.local.is_zero());
        }
        load
    }

    /// The `limit` pages showing the most connections, most first (ties by
    /// id), without `site`.
    pub(crate) fn top(&self, limit: usize, site: &PageId) -> Vec<TopPage<'_>> {
        let mut live: Vec<TopPage<'_>> = self
            .pages
            .iter()
            .filter(|(id, e)| !e.shown().is_zero() && *id != site)
            .map(|(id, e)| TopPage {
                id,
                shown: e.shown(),
                stats: &e.stats,
            })
            .collect();
        let order = |a: &TopPage<'_>, b: &TopPage<'_>| {
            (b.shown.connections.cmp(&a.shown.connections)).then_with(|| a.id.cmp(b.id))
        };
        if live.len() > limit && limit > 0 {
            live.select_nth_unstable_by(limit - 1, order);
        }
        live.truncate(limit);
        live.sort_by(order);
        live
    }

    /// The entry of `page`, loading its stats on first sight.
    fn entry(&mut self, page: &PageId) -> &mut PageEntry {
        let load = &mut self.load;
        self.pages
            .entry(page.clone())
            .or_insert_with(|| PageEntry::new(load(page), false))
    }

    /// A local change of `page`: to publish, and to report to the cluster.
    fn mark_changed(&mut self, page: &PageId, now: Instant) {
        if let Some(e) = self.pages.get_mut(page) {
            e.pending_since.get_or_insert(now);
        }
        self.changed.insert(page.clone());
        self.oldest_change.get_or_insert(now);
        self.local_changed.insert(page.clone());
    }

    // ------------------------------------------------------------ inputs

    /// A room's own tally (absolute), plus connections opened since its last report.
    pub fn room_count(&mut self, page: &PageId, tally: Tally, opened: u64, now: Now) -> Outbox<R> {
        if !self.pages.contains_key(page) {
            // A page with a room is always tracked, but it takes the place
            // of an idle one when the counter is at `limits.max_pages`.
            self.make_room_for_pages(1);
        }
        let mut out = Outbox::default();
        self.set_count(page, tally, opened, now);
        self.publish_soon(now.at, &mut out);
        out
    }

    /// Applies a room's report: its tally, and stats.
    fn set_count(&mut self, page: &PageId, tally: Tally, opened: u64, now: Now) {
        let e = self.entry(page);
        if e.local == tally && opened == 0 {
            return;
        }
        // The site figure's link (`protocol::SITE_LINK`) is no page's count.
        if e.local != tally && !page.is_empty() {
            crate::metrics::count_changed();
        }
        e.local = tally;
        e.stats.total_connections += opened;
        e.stats.last_active_ms = Some(now.ms);
        if tally.connections > e.stats.peak_connections {
            e.stats.peak_connections = tally.connections;
            e.stats.peak_at_ms = Some(now.ms);
        }
        e.stats.peak_visitors = e.stats.peak_visitors.max(tally.visitors);
        e.dirty = true;
        self.opened_total += opened;
        self.mark_changed(page, now.at);
    }

    /// A room starts following `links` (answered in the outbox, now or once
    /// the rebuild or the cluster's load completes).
    pub fn subscribe(
        &mut self,
        room: RoomId,
        to: R,
        links: Vec<PageId>,
        req: u64,
        now: Instant,
    ) -> Outbox<R> {
        let mut out = Outbox::default();
        let Admitted { accepted, refused } = self.admit(links);
        self.follow(room, &to, &accepted, &mut out);
        if let Some(r) = &mut self.rebuild {
            r.deferred.push(Deferred {
                to,
                accepted,
                refused,
                req,
            });
            return out;
        }
        let waiting: HashSet<u64> = accepted
            .iter()
            .filter_map(|l| self.loading.get(l).copied())
            .collect();
        if !waiting.is_empty() {
            self.awaiting.push(AwaitingLoad {
                answer: Deferred {
                    to,
                    accepted,
                    refused,
                    req,
                },
                waiting,
                since: now,
            });
            return out;
        }
        let counts = self.answer(&accepted, now);
        out.sent.push(Effect::Answer {
            to,
            counts,
            refused,
            req,
        });
        // After the answer: a room hears of a newer value only after its answer.
        self.publish_soon(now, &mut out);
        out
    }

    /// Splits `links` into those tracked or fitting under `limits.max_pages`
    /// (tracked from now on) and those refused.
    fn admit(&mut self, links: Vec<PageId>) -> Admitted {
        let max = self.settings.limits.max_pages;
        let new = links
            .iter()
            .filter(|l| !l.is_empty() && !self.pages.contains_key(*l))
            .count();
        self.make_room_for_pages(new);
        let (mut accepted, mut refused) = (Vec::with_capacity(links.len()), Vec::new());
        for link in links {
            if link.is_empty() || self.pages.contains_key(&link) || self.page_count() < max {
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
        Admitted { accepted, refused }
    }

    /// A room stops following `links`.
    pub(crate) fn unsubscribe(&mut self, room: RoomId, links: &[PageId]) -> Outbox<R> {
        let mut out = Outbox::default();
        self.unfollow(room, links, &mut out);
        out
    }

    /// A room's whole state, in answer to a rebuild: replaces what is known of it.
    pub(crate) fn room_state(&mut self, report: RoomReport<R>, now: Instant) -> Outbox<R> {
        let mut out = Outbox::default();
        let RoomReport { epoch, room, .. } = report;
        let old: Vec<PageId> = self
            .followers
            .get(&room)
            .map(|f| f.links.iter().cloned().collect())
            .unwrap_or_default();
        self.unfollow(room, &old, &mut out);
        self.follow(room, &report.to, &report.links, &mut out);
        if report.links.is_empty() {
            self.followers.remove(&room);
        }
        let e = self.entry(&report.page);
        if e.local != report.tally {
            e.local = report.tally;
            self.mark_changed(&report.page, now);
        }
        if let Some(r) = &mut self.rebuild {
            if r.epoch == epoch {
                r.reported.insert(room);
            }
        }
        self.check_rebuild(now, &mut out);
        // A report after the rebuild completed (past its deadline) is a change.
        self.publish_soon(now, &mut out);
        out
    }

    /// A shard's list of the rooms it asked to report for rebuild `epoch`.
    pub(crate) fn shard_rooms(
        &mut self,
        epoch: Epoch,
        shard: usize,
        rooms: Vec<RoomId>,
        now: Instant,
    ) -> Outbox<R> {
        let mut out = Outbox::default();
        if let Some(r) = &mut self.rebuild {
            if r.epoch == epoch {
                r.listed.insert(shard, rooms);
            }
        }
        self.check_rebuild(now, &mut out);
        out
    }

    /// Cluster mode: the other live nodes' sums of followed pages.
    pub(crate) fn remote_counts(
        &mut self,
        changes: Vec<(PageId, Tally)>,
        now: Instant,
    ) -> Outbox<R> {
        let mut out = Outbox::default();
        for (page, sum) in changes {
            if self.rebuild.is_some() {
                // Rooms are still re-reporting which pages they follow; pages
                // left unfollowed are zeroed when the rebuild completes.
                self.entry(&page).remote = sum;
                continue;
            }
            // Only followed pages hold remote values (see `unfollow`).
            if let Some(e) = self.pages.get_mut(&page) {
                if !e.subscribers.is_empty() && e.remote != sum {
                    e.remote = sum;
                    e.pending_since.get_or_insert(now);
                    self.changed.insert(page);
                }
            }
        }
        self.publish_soon(now, &mut out);
        out
    }

    /// Cluster mode: the pages of `Follow` (or `ResendRemote`) `req` are loaded.
    pub(crate) fn loaded(&mut self, req: u64, now: Instant) -> Outbox<R> {
        let mut out = Outbox::default();
        if let Some(r) = &mut self.rebuild {
            if r.remote_req == Some(req) {
                r.remote_req = None;
                self.check_rebuild(now, &mut out);
            }
        }
        self.loading.retain(|_, r| *r != req);
        for a in &mut self.awaiting {
            a.waiting.remove(&req);
        }
        self.release_awaiting(now, &mut out);
        out
    }

    /// The periodic check: a rebuild past its deadline, held answers past theirs.
    pub(crate) fn tick(&mut self, now: Instant) -> Outbox<R> {
        let mut out = Outbox::default();
        self.check_rebuild(now, &mut out);
        self.release_awaiting(now, &mut out);
        out
    }

    /// The publish scheduled by an earlier [`Outbox::publish_in`] is due.
    pub fn scheduled_publish(&mut self, now: Instant) -> Outbox<R> {
        let mut out = Outbox::default();
        self.publish_scheduled = false;
        self.publish(now, &mut out);
        out
    }

    // ------------------------------------------------------------ following

    fn follow(&mut self, room: RoomId, to: &R, links: &[PageId], out: &mut Outbox<R>) {
        let mut first = Vec::new();
        for link in links {
            let e = self.entry(link);
            if e.subscribers.insert(room) && e.subscribers.len() == 1 {
                first.push(link.clone());
            }
        }
        // Node-level reference counting: the cluster follows a page while
        // at least one local room does (rebuilds send the whole set instead).
        if self.cluster && self.rebuild.is_none() && !first.is_empty() {
            self.load_seq += 1;
            let req = self.load_seq;
            for p in &first {
                self.loading.insert(p.clone(), req);
            }
            let follow = cluster::Follow { pages: first, req };
            out.sent.push(Effect::Cluster(ToCluster::Follow(follow)));
        }
        let page_of = &self.page_of;
        let f = self.followers.entry(room).or_insert_with(|| Follower {
            to: to.clone(),
            page: page_of(to),
            links: HashSet::new(),
        });
        f.to = to.clone();
        f.links.extend(links.iter().cloned());
    }

    fn unfollow(&mut self, room: RoomId, links: &[PageId], out: &mut Outbox<R>) {
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
        if self.cluster && self.rebuild.is_none() && !last.is_empty() {
            let unfollow = cluster::Unfollow { pages: last };
            out.sent
                .push(Effect::Cluster(ToCluster::Unfollow(unfollow)));
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
    /// then calls [`State::publish_soon`], after the answer).
    fn answer(&mut self, links: &[PageId], now: Instant) -> Vec<(PageId, Tally)> {
        for l in links {
            if let Some(e) = self.pages.get_mut(l) {
                if e.shown() != e.published {
                    e.told_other = true;
                    e.pending_since.get_or_insert(now);
                    self.changed.insert(l.clone());
                }
            }
        }
        self.counts_of(links)
    }

    // ------------------------------------------------------------ publishing

    /// To be called after every change recorded in `changed` or
    /// `local_changed`. Leading edge: if nothing was published in the last
    /// `broadcast_interval`, publishes now. Otherwise makes sure one publish
    /// is scheduled for `last_publish + broadcast_interval`, which takes every
    /// change made until then. So a burst of changes costs one publish now
    /// and one an interval later, and every room and the cluster module get
    /// at most one message per interval (plus a rebuild's full counts).
    /// Nothing during a rebuild: its completion sends the full state.
    fn publish_soon(&mut self, now: Instant, out: &mut Outbox<R>) {
        if self.publish_scheduled || self.rebuild.is_some() {
            return;
        }
        if self.changed.is_empty() && self.local_changed.is_empty() {
            return;
        }
        let interval = self.settings.counter.broadcast_interval;
        match self.last_publish {
            Some(last) if now.duration_since(last) < interval => {
                self.publish_scheduled = true;
                out.publish_in = Some(last + interval - now);
            }
            _ => self.publish(now, out),
        }
    }

    /// Publishes every changed count: one message per subscriber room (and,
    /// in cluster mode, one to the cluster module). Called only through
    /// [`State::publish_soon`] and the publish it schedules.
    fn publish(&mut self, now: Instant, out: &mut Outbox<R>) {
        if self.rebuild.is_some() {
            return;
        }
        let sent_local = self.publish_local(out);
        if self.changed.is_empty() {
            if sent_local {
                self.last_publish = Some(now);
            }
            return;
        }
        let since = self.oldest_change.take();
        let mut published = 0;
        let mut outbox: HashMap<RoomId, Vec<(PageId, Tally)>> = HashMap::new();
        for page in self.within_budget(now) {
            let Some(e) = self.pages.get_mut(&page) else {
                continue;
            };
            let shown = e.shown();
            e.published = shown;
            e.told_other = false;
            e.pending_since = None;
            published += 1;
            for room in &e.subscribers {
                outbox.entry(*room).or_default().push((page.clone(), shown));
            }
        }
        crate::metrics::counts_published(published);
        // A publish that sent nothing (changes that cancelled out, pages
        // nobody follows) does not start an interval: it cost no one a message.
        if sent_local || !outbox.is_empty() {
            self.last_publish = Some(now);
        }
        for (room, changes) in outbox {
            match self.followers.get(&room) {
                Some(f) => {
                    let to = f.to.clone();
                    out.sent.push(Effect::Counts { to, changes, since });
                }
                // Its connections would never hear of these pages again.
                None => self.fault = Some("a page's subscriber is not a follower room"),
            }
        }
        // What the budget deferred goes at the end of the next interval.
        if !self.changed.is_empty() {
            self.oldest_change = self
                .changed
                .iter()
                .filter_map(|p| self.pages.get(p).and_then(|e| e.pending_since))
                .min();
            self.publish_scheduled = true;
            out.publish_in = Some(self.settings.counter.broadcast_interval);
        }
    }

    /// Takes from `changed` the pages to publish now and leaves the rest
    /// there: pages whose value is back at the published one are dropped;
    /// a page whose delay bound (`counter.max_delay`) would pass before the next
    /// publish goes whatever it costs; the others go cheapest first (quiet
    /// pages before pages followed by many connections) while the budget
    /// lasts. A page's cost is the connections of the rooms that follow it.
    fn within_budget(&mut self, now: Instant) -> Vec<PageId> {
        let most = self.settings.counter.delivery_budget as f64;
        let behind = (self.lag_probe)(now) > self.settings.counter.max_worker_lag;
        let b = &mut self.budget;
        let elapsed = b.at.map_or(1.0, |at| now.duration_since(at).as_secs_f64());
        b.rate = if behind {
            (b.rate / 2.0).max(most / 100.0)
        } else {
            (b.rate + most * elapsed).min(most)
        };
        b.tokens = (b.tokens + b.rate * elapsed).min(b.rate);
        b.at = Some(now);
        crate::metrics::delivery_budget(b.rate);
        let horizon = now + self.settings.counter.broadcast_interval;
        let max_delay = self
            .settings
            .counter
            .max_delay
            .max(self.settings.counter.broadcast_interval);
        // (forced, cost, page) of each page with something to publish.
        let mut due: Vec<(bool, u64, PageId)> = Vec::with_capacity(self.changed.len());
        for page in std::mem::take(&mut self.changed) {
            let Some(e) = self.pages.get_mut(&page) else {
                continue;
            };
            if e.shown() == e.published && !e.told_other {
                e.pending_since = None;
                continue;
            }
            let forced = e
                .pending_since
                .is_none_or(|since| horizon > since + max_delay);
            let cost = self.cost(&page);
            due.push((!forced, cost, page));
        }
        due.sort_unstable();
        let mut now_due = Vec::with_capacity(due.len());
        let mut deferred = 0;
        for (deferrable, cost, page) in due {
            let b = &mut self.budget;
            if deferrable && cost as f64 > b.tokens {
                self.changed.insert(page);
                deferred += 1;
                continue;
            }
            b.tokens -= cost as f64;
            now_due.push(page);
        }
        crate::metrics::publishes_deferred(deferred);
        now_due
    }

    /// What publishing `page` costs: the connections of its follower rooms
    /// (at least one each).
    fn cost(&self, page: &PageId) -> u64 {
        let Some(e) = self.pages.get(page) else {
            return 0;
        };
        e.subscribers
            .iter()
            .map(|room| {
                let page = self.followers.get(room).and_then(|f| f.page.as_ref());
                page.and_then(|p| self.pages.get(p))
                    .map_or(1, |e| e.local.connections.max(1))
            })
            .sum()
    }

    /// Cluster mode: the local counts that changed since the last publish
    /// (so at most one message per interval); true if there were any.
    fn publish_local(&mut self, out: &mut Outbox<R>) -> bool {
        if !self.cluster {
            self.local_changed.clear();
            return false;
        }
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
        let local = cluster::LocalCounts {
            changes,
            full: false,
        };
        out.sent.push(Effect::Cluster(ToCluster::Local(local)));
        true
    }

    /// Cluster mode: sends the held subscribe answers that are complete (or
    /// waited [`LOAD_DEADLINE`]).
    fn release_awaiting(&mut self, now: Instant, out: &mut Outbox<R>) {
        if self.awaiting.is_empty() || self.rebuild.is_some() {
            return;
        }
        let (ready, held): (Vec<AwaitingLoad<R>>, Vec<AwaitingLoad<R>>) =
            std::mem::take(&mut self.awaiting)
                .into_iter()
                .partition(|a| {
                    a.waiting.is_empty() || now.duration_since(a.since) >= LOAD_DEADLINE
                });
        self.awaiting = held;
        for a in ready {
            let Deferred {
                to,
                accepted,
                refused,
                req,
            } = a.answer;
            let counts = self.answer(&accepted, now);
            out.sent.push(Effect::Answer {
                to,
                counts,
                refused,
                req,
            });
        }
        // After the answers: a room hears of a newer value only after its answer.
        self.publish_soon(now, out);
    }

    // ------------------------------------------------------------ rebuild

    /// After a supervised restart: drops all live state, keeps only dirty
    /// stats and the write queue (the restart also dropped the timers).
    pub(crate) fn restart(&mut self) {
        let dirty: Vec<(PageId, PageStats)> = self
            .pages
            .drain()
            .filter(|(_, e)| e.dirty)
            .map(|(p, e)| (p, e.stats))
            .collect();
        for (page, stats) in dirty {
            self.pages.insert(page, PageEntry::new(stats, true));
        }
        self.followers.clear();
        self.changed.clear();
        self.local_changed.clear();
        self.loading.clear();
        self.rebuild = None;
        self.publish_scheduled = false;
        self.fault = None;
    }

    /// Starts a rebuild: every shard re-reports its rooms (and, in cluster
    /// mode, the cluster re-sends the remote sums).
    pub(crate) fn begin_rebuild(&mut self, generation: u64, now: Instant) -> Outbox<R> {
        let mut out = Outbox::default();
        self.epoch = Epoch(self.epoch.0 + 1);
        tracing::warn!(
            epoch = self.epoch.0,
            generation,
            "counter restarted; rebuilding from rooms"
        );
        let mut remote_req = None;
        if self.cluster {
            // Remote sums were dropped with the live state: ask for them again,
            // so the rebuilt counts include the other nodes from the start.
            self.load_seq += 1;
            remote_req = Some(self.load_seq);
        }
        self.rebuild = Some(Rebuild {
            epoch: self.epoch,
            started: now,
            listed: HashMap::new(),
            reported: HashSet::new(),
            // Answers held for the cluster are answered after the rebuild.
            deferred: std::mem::take(&mut self.awaiting)
                .into_iter()
                .map(|a| a.answer)
                .collect(),
            remote_req,
        });
        out.sent.push(Effect::Resync { epoch: self.epoch });
        if let Some(req) = remote_req {
            let resend = cluster::ResendRemote { req };
            out.sent
                .push(Effect::Cluster(ToCluster::ResendRemote(resend)));
        }
        self.check_rebuild(now, &mut out);
        out
    }

    /// Finishes the rebuild when every listed room has reported (or the deadline passed).
    fn check_rebuild(&mut self, now: Instant, out: &mut Outbox<R>) {
        let Some(r) = &self.rebuild else { return };
        let all_listed = r.listed.len() >= self.shards;
        let all_reported = r
            .listed
            .values()
            .flatten()
            .all(|room| r.reported.contains(room));
        let late = now.duration_since(r.started) >= RESYNC_DEADLINE;
        let complete = all_listed && all_reported && r.remote_req.is_none();
        if !complete && !late {
            return;
        }
        let Some(r) = self.rebuild.take() else { return };
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
            e.pending_since = None;
        }
        self.changed.clear();
        self.oldest_change = None;
        // The full counts below are this interval's publish: a change right
        // after waits for the end of the interval (`publish_soon`).
        self.last_publish = Some(now);
        self.resend_cluster_state(out);
        for f in self.followers.values() {
            let links: Vec<PageId> = f.links.iter().cloned().collect();
            let changes = self.counts_of(&links);
            out.sent.push(Effect::Counts {
                to: f.to.clone(),
                changes,
                since: None,
            });
        }
        for Deferred {
            to,
            accepted,
            refused,
            req,
        } in r.deferred
        {
            let counts = self.counts_of(&accepted);
            out.sent.push(Effect::Answer {
                to,
                counts,
                refused,
                req,
            });
        }
        tracing::info!(
            epoch = r.epoch.0,
            rooms = r.reported.len(),
            "rebuild complete"
        );
    }

    /// Cluster mode: the cluster module restarted from nothing; the whole
    /// local state and followed set again (a rebuild in progress sends them
    /// when it completes).
    pub(crate) fn cluster_restarted(&mut self) -> Outbox<R> {
        let mut out = Outbox::default();
        if self.rebuild.is_none() {
            self.resend_cluster_state(&mut out);
        }
        out
    }

    /// Cluster mode, after a rebuild: the whole local state and followed set.
    fn resend_cluster_state(&mut self, out: &mut Outbox<R>) {
        self.local_changed.clear();
        if !self.cluster {
            return;
        }
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
        let local = cluster::LocalCounts {
            changes,
            full: true,
        };
        out.sent.push(Effect::Cluster(ToCluster::Local(local)));
        let set = cluster::SetFollowed { pages: followed };
        out.sent.push(Effect::Cluster(ToCluster::SetFollowed(set)));
    }

    // ------------------------------------------------------------ memory and stats

    /// Moves every dirty entry's stats to the write queue.
    pub(crate) fn take_dirty(&mut self) {
        for (p, e) in self.pages.iter_mut().filter(|(_, e)| e.dirty) {
            e.dirty = false;
            self.unsaved.push_back((p.clone(), e.stats.clone()));
        }
    }

    /// The inconsistency found since the last call, if any.
    pub(crate) fn take_fault(&mut self) -> Option<&'static str> {
        self.fault.take()
    }

    /// True while stats wait in the write queue.
    pub(crate) fn has_unsaved(&self) -> bool {
        !self.unsaved.is_empty()
    }

    /// Takes up to `n` stats from the front of the write queue.
    pub(crate) fn take_unsaved(&mut self, n: usize) -> Vec<(PageId, PageStats)> {
        let n = n.min(self.unsaved.len());
        self.unsaved.drain(..n).collect()
    }

    /// Puts stats whose write failed back at the front of the queue, in order.
    pub(crate) fn requeue_unsaved(&mut self, chunk: Vec<(PageId, PageStats)>) {
        for item in chunk.into_iter().rev() {
            self.unsaved.push_front(item);
        }
    }

    /// True if `page` has a connection here or a follower room (its stored
    /// records are kept).
    pub(crate) fn is_live(&self, page: &str) -> bool {
        self.pages.get(page).is_some_and(PageEntry::is_live)
    }

    /// Drops the idle pages (see [`PageEntry::is_idle`]) with saved stats,
    /// inactive since before `cutoff_ms`. Returns how many.
    pub(crate) fn forget_idle_pages(&mut self, cutoff_ms: u64) -> usize {
        if self.rebuild.is_some() {
            return 0;
        }
        let before = self.pages.len();
        self.pages
            .retain(|_, e| !(e.is_idle() && !e.dirty && e.last_active() < cutoff_ms));
        before - self.pages.len()
    }

    /// Forgets the stats of `pages` deleted on disk when their pages are idle
    /// (a page visited again starts afresh instead of writing them back).
    pub(crate) fn forget_trimmed(&mut self, pages: &[String]) {
        for page in pages {
            if self
                .pages
                .get(page.as_str())
                .is_some_and(|e| e.is_idle() && !e.dirty)
            {
                self.pages.remove(page.as_str());
            }
        }
    }

    /// The sweep's memory part: drops every page nothing live depends on and
    /// whose stats are saved. Returns how many.
    pub(crate) fn sweep_pages(&mut self) -> usize {
        // Pages with unsaved stats are kept; stats in the write queue are
        // written whether their page stays in memory or not.
        let before = self.pages.len();
        self.pages
            .retain(|_, e| e.is_live() || e.dirty || e.reported != e.local);
        before - self.pages.len()
    }

    /// At `limits.max_pages`: makes room for `wanted` new pages by dropping
    /// the least recently active idle ones (at least a sixteenth of the cap
    /// at a time, so the scan is amortized), queueing their unsaved stats.
    fn make_room_for_pages(&mut self, wanted: usize) {
        let max = self.settings.limits.max_pages;
        let tracked = self.page_count();
        if tracked + wanted <= max || self.rebuild.is_some() {
            return;
        }
        let goal = (tracked + wanted - max).max(max / 16);
        let mut idle: Vec<(u64, &PageId)> = self
            .pages
            .iter()
            .filter(|(p, e)| e.is_idle() && !p.is_empty())
            .map(|(p, e)| (e.last_active(), p))
            .collect();
        if idle.len() > goal {
            idle.select_nth_unstable(goal - 1);
            idle.truncate(goal);
        }
        let doomed: Vec<PageId> = idle.into_iter().map(|(_, p)| p.clone()).collect();
        for p in &doomed {
            if let Some(e) = self.pages.remove(p).filter(|e| e.dirty) {
                self.unsaved.push_back((p.clone(), e.stats));
            }
        }
        crate::metrics::evicted(crate::metrics::Evicted::Pages, doomed.len());
        tracing::debug!(
            dropped = doomed.len(),
            "page cap reached; idle pages dropped"
        );
    }

    /// Test hook: scrambles the live state the way a bug would.
    #[cfg(feature = "test-hooks")]
    pub(crate) fn scramble(&mut self) {
        for e in self.pages.values_mut() {
            e.local.connections = e.local.connections.wrapping_add(7);
            e.subscribers.clear();
        }
        self.followers.clear();
    }
}

#[cfg(test)]
mod tests {
    //! The state machine driven directly by random inputs against a model of
    //! the rooms and the cluster module: every value a room is sent is what
    //! this node knows and never above the truth (the local tally plus the
    //! other nodes'); once the pending publish (and, in cluster mode, the
    //! loads) went out, each room holds the truth of every page it follows;
    //! a room is never sent a page it does not follow.

    use std::collections::{BTreeMap, BTreeSet, VecDeque};

    use proptest::prelude::*;

    use super::*;
    use crate::protocol::SITE_LINK;

    /// Rooms (room `r` is the room of page `r`, so it reports that page's tally).
    const ROOMS: usize = 3;
    /// Pages followed (the first `ROOMS` have a room).
    const PAGES: usize = 4;

    #[derive(Debug, Clone)]
    enum Op {
        /// Room reports (connections, visitors) for its page, opened one or not.
        Count(usize, u64, u64, bool),
        /// A room asks for these pages (those it does not follow yet).
        Subscribe(usize, BTreeSet<usize>),
        /// A room drops these pages (those it follows).
        Unsubscribe(usize, BTreeSet<usize>),
        /// The other nodes' tally of a page changes.
        Remote(usize, u64, u64),
        /// The cluster answers its oldest pending load.
        Load,
        /// Time passes (ms): timers fire.
        Advance(u64),
        /// The counter restarts and rebuilds from the rooms.
        Restart,
        /// Everything pending goes out; every room must then hold the truth.
        Settle,
    }

    fn op() -> impl Strategy<Value = Op> {
        let tally = (0..4u64).prop_flat_map(|c| (Just(c), 0..=c));
        let pages = prop::collection::btree_set(0..PAGES, 1..=2);
        prop_oneof![
            4 => (0..ROOMS, tally.clone(), any::<bool>()).prop_map(|(r, (c, v), o)| Op::Count(r, c, v, o)),
            3 => (0..ROOMS, pages.clone()).prop_map(|(r, p)| Op::Subscribe(r, p)),
            2 => (0..ROOMS, pages).prop_map(|(r, p)| Op::Unsubscribe(r, p)),
            2 => (0..PAGES, tally).prop_map(|(p, (c, v))| Op::Remote(p, c, v)),
            2 => Just(Op::Load),
            3 => (0..150u64).prop_map(Op::Advance),
            1 => (900..1500u64).prop_map(Op::Advance),
            1 => Just(Op::Restart),
            2 => Just(Op::Settle),
        ]
    }

    fn page(i: usize) -> PageId {
        PageId::parse(&format!("p{i}")).unwrap()
    }

    fn le(a: Tally, b: Tally) -> bool {
        a.connections <= b.connections && a.visitors <= b.visitors
    }

    /// Room `r`'s handle is `r`; an input waiting to be fed to the state.
    enum Input {
        Unsubscribe(RoomId, Vec<PageId>),
        Remote(Vec<(PageId, Tally)>),
        Loaded(u64),
        ShardRooms(Epoch),
        RoomState(Epoch, RoomId),
    }

    struct Model {
        state: State<RoomId>,
        now: Instant,
        /// The scheduled publish is due at.
        due: Option<Instant>,
        cluster: bool,
        /// Each room's own tally (of its page).
        local: BTreeMap<PageId, Tally>,
        /// The other nodes' tallies (the truth, beside `local`).
        others: BTreeMap<PageId, Tally>,
        /// What the cluster module sent the counter, per page it follows.
        sent_remote: BTreeMap<PageId, Tally>,
        /// Pages the cluster module follows.
        cluster_followed: BTreeSet<PageId>,
        /// `Follow` requests not answered yet.
        loads: VecDeque<(u64, Vec<PageId>)>,
        /// Each room's links, with the request that asked for each.
        follows: Vec<BTreeMap<PageId, u64>>,
        /// Last request id per room.
        req: Vec<u64>,
        /// The last value each room was sent per page.
        delivered: BTreeMap<(RoomId, PageId), Tally>,
    }

    impl Model {
        fn new(max_pages: usize, cluster: bool) -> Model {
            let mut settings = Settings::load_from(None, Vec::new()).expect("defaults load");
            settings.limits.max_pages = max_pages;
            settings.counter.broadcast_interval = Duration::from_millis(100);
            let mut state = State::new(Arc::new(settings), Box::new(|_| PageStats::default()));
            state.set_shards(1);
            if cluster {
                state.set_cluster();
            }
            Model {
                state,
                now: Instant::now(),
                due: None,
                cluster,
                local: BTreeMap::new(),
                others: BTreeMap::new(),
                sent_remote: BTreeMap::new(),
                cluster_followed: BTreeSet::new(),
                loads: VecDeque::new(),
                follows: vec![BTreeMap::new(); ROOMS],
                req: vec![0; ROOMS],
                delivered: BTreeMap::new(),
            }
        }

        fn tally(map: &BTreeMap<PageId, Tally>, p: &PageId) -> Tally {
            map.get(p).copied().unwrap_or(Tally::ZERO)
        }

        /// What this node knows of `p`.
        fn known(&self, p: &PageId) -> Tally {
            Self::tally(&self.local, p).plus(Self::tally(&self.sent_remote, p))
        }

        /// The true tally of `p`.
        fn truth(&self, p: &PageId) -> Tally {
            let others = if self.cluster {
                Self::tally(&self.others, p)
            } else {
                Tally::ZERO
            };
            Self::tally(&self.local, p).plus(others)
        }

        fn deliver(&mut self, room: RoomId, p: PageId, t: Tally) {
            assert!(
                self.follows[room.0 as usize].contains_key(&p),
                "room {room} was sent {p}, which it does not follow"
            );
            assert_eq!(t, self.known(&p), "room {room} was sent {p} = {t:?}");
            assert!(le(t, self.truth(&p)), "{p}: {t:?} above the truth");
            self.delivered.insert((room, p), t);
        }

        /// Applies what the state sent, and what the rooms and the cluster
        /// answer, until nothing is left.
        fn run(&mut self, out: Outbox<RoomId>) {
            let mut inputs = VecDeque::new();
            self.take(out, &mut inputs);
            while let Some(input) = inputs.pop_front() {
                let now = self.now;
                let out = match input {
                    Input::Unsubscribe(r, links) => self.state.unsubscribe(r, &links),
                    Input::Remote(changes) => {
                        for (p, t) in &changes {
                            self.sent_remote.insert(p.clone(), *t);
                        }
                        self.state.remote_counts(changes, now)
                    }
                    Input::Loaded(req) => self.state.loaded(req, now),
                    Input::ShardRooms(epoch) => {
                        let rooms = (0..ROOMS as u64).map(RoomId).collect();
                        self.state.shard_rooms(epoch, 0, rooms, now)
                    }
                    Input::RoomState(epoch, r) => {
                        let p = page(r.0 as usize);
                        let report = RoomReport {
                            epoch,
                            room: r,
                            to: r,
                            tally: Self::tally(&self.local, &p),
                            page: p,
                            links: self.follows[r.0 as usize].keys().cloned().collect(),
                        };
                        self.state.room_state(report, now)
                    }
                };
                self.take(out, &mut inputs);
            }
        }

        fn take(&mut self, out: Outbox<RoomId>, inputs: &mut VecDeque<Input>) {
            // The state never finds itself inconsistent under any input.
            assert_eq!(self.state.take_fault(), None);
            if let Some(d) = out.publish_in {
                self.due = Some(self.now + d);
            }
            for effect in out.sent {
                match effect {
                    Effect::Counts { to, changes, .. } => {
                        for (p, t) in changes {
                            self.deliver(to, p, t);
                        }
                    }
                    Effect::Answer {
                        to,
                        counts,
                        refused,
                        req,
                    } => {
                        let links = &mut self.follows[to.0 as usize];
                        let stale = |l: &PageId| links.get(l) != Some(&req);
                        let refused: Vec<PageId> =
                            refused.into_iter().filter(|l| !stale(l)).collect();
                        for l in &refused {
                            links.remove(l);
                        }
                        if !refused.is_empty() {
                            inputs.push_back(Input::Unsubscribe(to, refused));
                        }
                        for (p, t) in counts {
                            if self.follows[to.0 as usize].contains_key(&p) {
                                self.deliver(to, p, t);
                            }
                        }
                    }
                    Effect::Resync { epoch } => {
                        for r in 0..ROOMS as u64 {
                            inputs.push_back(Input::RoomState(epoch, RoomId(r)));
                        }
                        inputs.push_back(Input::ShardRooms(epoch));
                    }
                    Effect::Cluster(m) => self.cluster_gets(m, inputs),
                }
            }
        }

        fn cluster_gets(&mut self, m: ToCluster, inputs: &mut VecDeque<Input>) {
            assert!(
                self.cluster,
                "the cluster module is written to only in cluster mode"
            );
            match m {
                ToCluster::Local(_) => {}
                ToCluster::Follow(f) => {
                    self.cluster_followed.extend(f.pages.iter().cloned());
                    self.loads.push_back((f.req, f.pages));
                }
                ToCluster::Unfollow(u) => {
                    for p in u.pages {
                        self.cluster_followed.remove(&p);
                        self.sent_remote.remove(&p);
                    }
                }
                ToCluster::SetFollowed(s) => {
                    self.cluster_followed = s.pages.into_iter().collect();
                    let followed = &self.cluster_followed;
                    self.sent_remote.retain(|p, _| followed.contains(p));
                }
                ToCluster::ResendRemote(r) => {
                    let sums = self.cluster_sums(self.cluster_followed.iter().cloned().collect());
                    inputs.push_back(Input::Remote(sums));
                    inputs.push_back(Input::Loaded(r.req));
                }
            }
        }

        fn cluster_sums(&self, pages: Vec<PageId>) -> Vec<(PageId, Tally)> {
            pages
                .into_iter()
                .map(|p| {
                    let t = Self::tally(&self.others, &p);
                    (p, t)
                })
                .collect()
        }

        fn load(&mut self) {
            let Some((req, pages)) = self.loads.pop_front() else {
                return;
            };
            let pages: Vec<PageId> = pages
                .into_iter()
                .filter(|p| self.cluster_followed.contains(p))
                .collect();
            let sums = self.cluster_sums(pages);
            for (p, t) in &sums {
                self.sent_remote.insert(p.clone(), *t);
            }
            let now = self.now;
            let out = self.state.remote_counts(sums, now);
            self.run(out);
            let out = self.state.loaded(req, now);
            self.run(out);
        }

        fn advance(&mut self, ms: u64) {
            self.now += Duration::from_millis(ms);
            if self.due.is_some_and(|d| d <= self.now) {
                self.due = None;
                let out = self.state.scheduled_publish(self.now);
                self.run(out);
            }
            let out = self.state.tick(self.now);
            self.run(out);
        }

        fn settle(&mut self) {
            while !self.loads.is_empty() {
                self.load();
            }
            while let Some(due) = self.due {
                self.advance(due.saturating_duration_since(self.now).as_millis() as u64 + 1);
            }
            for (r, links) in self.follows.iter().enumerate() {
                for p in links.keys() {
                    let got = self.delivered.get(&(RoomId(r as u64), p.clone())).copied();
                    assert_eq!(
                        got,
                        Some(self.truth(p)),
                        "room {r}, page {p} after a publish"
                    );
                }
            }
        }

        fn apply(&mut self, op: Op) {
            let now = self.now;
            match op {
                Op::Count(r, connections, visitors, opened) => {
                    let (p, tally) = (
                        page(r),
                        Tally {
                            connections,
                            visitors,
                        },
                    );
                    self.local.insert(p.clone(), tally);
                    let now = Now { at: now, ms: 0 };
                    let out = self.state.room_count(&p, tally, u64::from(opened), now);
                    self.run(out);
                }
                Op::Subscribe(r, pages) => {
                    let links: Vec<PageId> = pages
                        .into_iter()
                        .map(page)
                        .filter(|p| !self.follows[r].contains_key(p))
                        .collect();
                    if links.is_empty() {
                        return;
                    }
                    self.req[r] += 1;
                    let req = self.req[r];
                    for l in &links {
                        self.follows[r].insert(l.clone(), req);
                    }
                    let out =
                        self.state
                            .subscribe(RoomId(r as u64), RoomId(r as u64), links, req, now);
                    self.run(out);
                }
                Op::Unsubscribe(r, pages) => {
                    let links: Vec<PageId> = pages
                        .into_iter()
                        .map(page)
                        .filter(|p| self.follows[r].remove(p).is_some())
                        .collect();
                    if !links.is_empty() {
                        let out = self.state.unsubscribe(RoomId(r as u64), &links);
                        self.run(out);
                    }
                }
                Op::Remote(p, connections, visitors) => {
                    let (p, tally) = (
                        page(p),
                        Tally {
                            connections,
                            visitors,
                        },
                    );
                    self.others.insert(p.clone(), tally);
                    if self.cluster && self.cluster_followed.contains(&p) {
                        self.sent_remote.insert(p.clone(), tally);
                        let out = self.state.remote_counts(vec![(p, tally)], now);
                        self.run(out);
                    }
                }
                Op::Load => self.load(),
                Op::Advance(ms) => self.advance(ms),
                Op::Restart => {
                    self.state.restart();
                    self.due = None;
                    self.sent_remote.clear();
                    let out = self.state.begin_rebuild(2, now);
                    self.run(out);
                }
                Op::Settle => self.settle(),
            }
        }
    }

    /// The site figure's entry is no page: `limits.max_pages` neither counts
    /// it nor drops it, so a subscribe at the cap drops exactly as many idle
    /// pages as it adds, whether the site entry is there or not.
    #[test]
    fn the_page_cap_ignores_the_site_figure() {
        for with_site in [false, true] {
            let mut settings = Settings::load_from(None, Vec::new()).expect("defaults load");
            settings.limits.max_pages = 4;
            let mut state: State<u64> =
                State::new(Arc::new(settings), Box::new(|_| PageStats::default()));
            state.set_shards(1);
            let t0 = Instant::now();
            let at = |ms: u64| Now {
                at: t0 + Duration::from_millis(ms),
                ms,
            };
            let one = Tally {
                connections: 1,
                visitors: 1,
            };
            // Three pages visited in turn, then left (idle, least recent first).
            for i in 1..=3 {
                let _ = state.room_count(&page(i), one, 1, at(i as u64 * 10));
                let _ = state.room_count(&page(i), Tally::default(), 0, at(i as u64 * 10 + 1));
            }
            if with_site {
                let _ = state.room_count(&PageId::site(), one, 0, at(50));
            }
            // Two new links: 3 + 2 > 4, so one page (the least recent) goes.
            let _ = state.subscribe(RoomId(0), 0, vec![page(7), page(8)], 1, at(60).at);
            let kept: Vec<bool> = (1..=3).map(|i| state.tracks(&page(i))).collect();
            assert_eq!(
                kept,
                [false, true, true],
                "with the site entry: {with_site}"
            );
            assert!(state.tracks(&page(7)) && state.tracks(&page(8)));
            assert_eq!(state.tracks(SITE_LINK), with_site);
        }
    }

    /// Over the budget, the quiet page keeps its leading-edge publish and
    /// the page followed by many connections waits, at most `counter.max_delay`,
    /// and then carries its latest value.
    #[test]
    fn the_budget_defers_the_costliest_page_at_most_the_bound() {
        // The big page changed at 500 ms, 500 ms after its room's report.
        let waited = costliest_page_publish_ms(1000) - 500;
        assert!(waited <= 1000, "at most counter.max_delay: {waited} ms");
        let waited = costliest_page_publish_ms(3000) - 500;
        assert!(
            (1000..=3000).contains(&waited),
            "a longer counter.max_delay defers it longer, never past it: {waited} ms"
        );
    }

    /// A state on one shard with a 100 ms interval, `counter.delivery_budget`
    /// = `budget`, `counter.max_delay` = `max_delay_ms`, `counter.max_worker_lag`
    /// = 10 ms, and the time `ms` after its start.
    fn budget_state(budget: u64, max_delay_ms: u64) -> (State<u64>, impl Fn(u64) -> Now) {
        let mut settings = Settings::load_from(None, Vec::new()).expect("defaults load");
        settings.counter.broadcast_interval = Duration::from_millis(100);
        settings.counter.delivery_budget = budget;
        settings.counter.max_delay = Duration::from_millis(max_delay_ms);
        settings.counter.max_worker_lag = Duration::from_millis(10);
        let mut state: State<u64> =
            State::new(Arc::new(settings), Box::new(|_| PageStats::default()));
        state.set_shards(1);
        let t0 = Instant::now();
        let at = move |ms: u64| Now {
            at: t0 + Duration::from_millis(ms),
            ms,
        };
        (state, at)
    }

    /// `c` connections of `c` visitors.
    fn tally(c: u64) -> Tally {
        Tally {
            connections: c,
            visitors: c,
        }
    }

    /// The budget follows the workers: while a worker lags past
    /// `counter.max_worker_lag` it halves until the costly page goes only
    /// when its bound forces it; once the workers keep up it grows back and
    /// the page goes every interval again.
    #[test]
    fn the_budget_shrinks_while_workers_lag_and_grows_back() {
        let (mut state, at) = budget_state(1000, 1000);
        let lag = std::rc::Rc::new(std::cell::Cell::new(Duration::from_millis(50)));
        let probe = lag.clone();
        state.set_lag_probe(Box::new(move |_| probe.get()));
        // Room 0 is the room of page 10 (100 connections): following page 0
        // costs 100 deliveries per publish.
        state.set_page_of(Box::new(|_: &u64| Some(page(10))));
        let _ = state.room_count(&page(10), tally(100), 0, at(0));
        let _ = state.subscribe(RoomId(0), 0, vec![page(0)], 1, at(0).at);
        let mut due: Option<u64> = None;
        // (when, value) of each publish of page 0.
        let mut sent: Vec<(u64, Tally)> = Vec::new();
        let mut take = |out: Outbox<u64>, now: u64, due: &mut Option<u64>| {
            if let Some(d) = out.publish_in {
                *due = Some(now + d.as_millis() as u64);
            }
            for e in out.sent {
                if let Effect::Counts { changes, .. } = e {
                    sent.extend(changes.into_iter().map(|(_, t)| (now, t)));
                }
            }
        };
        // Page 0 changes every interval for 4 s; the workers lag for the
        // first 2 s.
        for step in 0..40u64 {
            let t = 50 + step * 100;
            while let Some(d) = due.filter(|d| *d <= t) {
                due = None;
                let out = state.scheduled_publish(at(d).at);
                take(out, d, &mut due);
            }
            if t > 2000 {
                lag.set(Duration::ZERO);
            }
            let out = state.room_count(&page(0), tally(1 + step), 1, at(t));
            take(out, t, &mut due);
        }
        while let Some(d) = due.take() {
            let out = state.scheduled_publish(at(d).at);
            take(out, d, &mut due);
        }
        let lagging = sent.iter().filter(|(t, _)| *t < 2000).count();
        assert!(lagging <= 8, "lagging workers: few publishes: {sent:?}");
        let gaps = sent.windows(2).map(|w| w[1].0 - w[0].0);
        assert!(
            gaps.max().is_some_and(|g| g <= 1100),
            "never past the bound: {sent:?}"
        );
        let recovered = sent
            .iter()
            .filter(|(t, _)| (3000..4000).contains(t))
            .count();
        assert!(recovered >= 8, "keeping up: every interval again: {sent:?}");
        assert_eq!(
            sent.last().map(|s| s.1),
            Some(tally(40)),
            "the latest value"
        );
    }

    /// When the costly page's change (at 500 ms) is published, with
    /// `counter.max_delay` = `max_delay_ms`; checks the quiet page's leading
    /// edge and that the publish carries the latest value.
    fn costliest_page_publish_ms(max_delay_ms: u64) -> u64 {
        let (mut state, at) = budget_state(10, max_delay_ms);
        // Room 0 is the room of page "big" (100 connections), room 1 of "small" (1).
        state.set_page_of(Box::new(|r: &u64| {
            Some(page(if *r == 0 { 10 } else { 11 }))
        }));
        let _ = state.room_count(&page(10), tally(100), 0, at(0));
        let _ = state.room_count(&page(11), tally(1), 0, at(0));
        let _ = state.subscribe(RoomId(0), 0, vec![page(0)], 1, at(0).at);
        let _ = state.subscribe(RoomId(1), 1, vec![page(1)], 1, at(0).at);
        // Both followed pages change after a quiet interval.
        let mut sent: Vec<(u64, u64, PageId, Tally)> = Vec::new();
        let mut due = None;
        let mut take = |out: Outbox<u64>, now: u64, due: &mut Option<u64>| {
            if let Some(d) = out.publish_in {
                *due = Some(now + d.as_millis() as u64);
            }
            for e in out.sent {
                if let Effect::Counts { to, changes, .. } = e {
                    for (p, t) in changes {
                        sent.push((now, to, p, t));
                    }
                }
            }
        };
        let out = state.room_count(&page(1), tally(1), 1, at(500));
        take(out, 500, &mut due);
        let out = state.room_count(&page(0), tally(1), 1, at(500));
        take(out, 500, &mut due);
        let out = state.room_count(&page(0), tally(2), 1, at(550));
        take(out, 550, &mut due);
        let mut now = 550;
        while let Some(d) = due.take() {
            now = d;
            let out = state.scheduled_publish(at(now).at);
            take(out, now, &mut due);
        }
        let small: Vec<_> = sent.iter().filter(|s| s.1 == 1).collect();
        assert_eq!(small.len(), 1, "{small:?}");
        assert_eq!((small[0].0, small[0].3), (500, tally(1)), "leading edge");
        let big: Vec<_> = sent.iter().filter(|s| s.1 == 0).collect();
        assert_eq!(big.len(), 1, "one deferred publish: {big:?}");
        assert!(big[0].0 > 500, "the costly page waited: {big:?}");
        assert_eq!(big[0].3, tally(2), "with its latest value");
        assert_eq!(now, big[0].0, "nothing scheduled after it");
        big[0].0
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// See the module doc.
        #[test]
        fn followers_get_the_truth_and_nothing_else(
            max_pages in 2..8usize,
            cluster in any::<bool>(),
            ops in prop::collection::vec(op(), 1..80),
        ) {
            let mut m = Model::new(max_pages, cluster);
            for op in ops {
                m.apply(op);
            }
            m.apply(Op::Settle);
        }
    }
}
