//! The cluster module's logic as a plain state machine, without actix, Redis
//! or a clock: [`Event`]s in (a connection's outcome, Redis replies and
//! errors, heartbeats, the counter's messages, pub/sub messages, timers, each
//! with `now`), [`Job`]s out (Redis work to run, what to tell the counter and
//! the heartbeat thread), in order. The [`Cluster`](super::Cluster) actor
//! owns it, runs the jobs and reports their results back as events.
//!
//! The lifecycle is two enums: where the connection is ([`Link`]) and
//! whether this node's id is registered ([`Registration`]). Redis work runs
//! in two lanes, one job in flight each, so each applies in order: the write
//! lane (registration, this node's tallies, leave) and the sync lane
//! (subscription changes, then loads).

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use super::{
    store::{BeatReply, Keys, Op, Wire},
    table::{LiveView, NodeId, Process, RemoteTable, ViewChange},
    Follow, LocalCounts, ResendRemote, SetFollowed, Unfollow,
};
use crate::protocol::{PageId, Tally};

/// First reconnect delay; doubles up to [`BACKOFF_MAX`].
pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between reconnect attempts.
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The settings the machine reads.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    /// `cluster.node_ttl`.
    pub(crate) node_ttl: Duration,
    /// `cluster.follow_linger`.
    pub(crate) follow_linger: Duration,
    /// `limits.max_pages` (lingering pages kept at most).
    pub(crate) max_pages: usize,
}

/// Something that happened, with the time it is handled at.
#[derive(Debug)]
pub(crate) enum Event {
    /// Connection attempt `gen` succeeded; `check` is the heartbeat it ran
    /// for `checked` (this node's id when registered).
    Connected {
        gen: u64,
        checked: Option<NodeId>,
        check: BeatReply,
    },
    /// Connection attempt `gen` failed.
    ConnectFailed {
        gen: u64,
        error: String,
    },
    /// The reconnect delay of [`Job::RetryIn`] passed.
    RetryDue,
    /// Connection `gen` failed (pub/sub closed, disconnected).
    Lost {
        gen: u64,
        error: String,
    },
    /// A heartbeat of the liveness thread for `id` (`None`: observe only).
    Beat {
        id: Option<NodeId>,
        reply: Result<BeatReply, String>,
    },
    /// The [`Job::Write`] in flight ended (a join: the registration's snapshot).
    Written {
        result: Result<Option<BeatReply>, String>,
    },
    /// The [`Job::Sync`] in flight ended: the loaded pages' hash fields.
    Synced {
        result: Result<Vec<HashMap<String, String>>, String>,
    },
    /// A [`Job::Reap`] on connection `gen` ended.
    Reaped {
        gen: u64,
        result: Result<(), String>,
    },
    /// A pub/sub message on connection `gen`.
    Message {
        gen: u64,
        wire: Wire,
    },
    /// The counter's messages.
    Local(LocalCounts),
    Follow(Follow),
    Unfollow(Unfollow),
    SetFollowed(SetFollowed),
    ResendRemote(ResendRemote),
    /// Every heartbeat interval: lingering pages and ghosts expire.
    Tick,
    /// Graceful leave (answered with [`Job::Left`]).
    Withdraw,
}

/// A write lane job.
#[derive(Debug, Clone)]
pub(crate) enum Write {
    /// Register a new incarnation: reap the previous ones (`old`: every id
    /// of this process that may still hold fields), write every local tally
    /// under the new id, then register it (so a node that sees it live finds
    /// its fields).
    /// `old_pages`: pages where they may hold a field outside their page
    /// sets (a write that landed after a survivor reaped the id).
    Join {
        old: Vec<NodeId>,
        old_pages: Vec<PageId>,
        ops: Vec<Op>,
    },
    /// Changed tallies.
    Batch { ops: Vec<Op> },
    /// Graceful leave: zeros, then the id's page sets and registration.
    Withdraw { ops: Vec<Op> },
}

impl Write {
    pub(crate) fn ops(&self) -> &[Op] {
        match self {
            Write::Join { ops, .. } | Write::Batch { ops } | Write::Withdraw { ops } => ops,
        }
    }
}

/// Work for the shell, in order.
#[derive(Debug)]
pub(crate) enum Job {
    /// Open connection `gen` and run a heartbeat for `check` on it.
    Connect { gen: u64, check: Option<NodeId> },
    /// Send [`Event::RetryDue`] after this delay.
    RetryIn(Duration),
    /// Run `write` on connection `gen` as node `node` with sequence `seq`.
    Write {
        gen: u64,
        node: NodeId,
        seq: u64,
        write: Write,
    },
    /// On connection `gen`: unsubscribe, subscribe, then load `load`.
    Sync {
        gen: u64,
        unsubscribe: Vec<String>,
        subscribe: Vec<String>,
        load: Vec<PageId>,
    },
    /// Delete dead `node`'s fields and registration (claimed by our heartbeat).
    Reap { gen: u64, node: NodeId },
    /// The liveness thread refreshes this id from now on (`None`: none).
    BeatAs(Option<NodeId>),
    /// Keep this identity on disk (before registering it).
    SaveIdentity(NodeId),
    /// To the counter: remote sums of followed pages.
    Remote(Vec<(PageId, Tally)>),
    /// To the counter: the loads of `Follow` `req` are done (or cannot be).
    Loaded(u64),
    /// The leave ended (true: done cleanly); nothing touches Redis any more.
    Left(bool),
}

/// Where the connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// The first attempt `gen` is running: a `Follow` waits for it
    /// (bounded by the counter's load deadline), so a node that starts
    /// under load shows the cluster's count from its first update.
    Starting { gen: u64 },
    /// Waiting for [`Event::RetryDue`].
    Waiting,
    /// Attempt `gen` is running.
    Connecting { gen: u64 },
    /// Connection `gen` is up.
    Up { gen: u64 },
    /// Left: nothing touches Redis any more.
    Left,
}

/// Whether this node's id counts for the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Registration {
    /// No incarnation of this process can be registered.
    None,
    /// The current id may be registered (the previous run's, an expired
    /// one, a failed join): reaped before the next incarnation registers.
    Stale,
    /// The join of the current id is in flight.
    Joining,
    /// Registered; refreshed (as far as this node knows) at `last_ok`.
    Joined { last_ok: Instant },
}

/// The write in flight.
#[derive(Debug)]
struct InFlightWrite {
    /// Its pages (unknown in Redis if it fails).
    pages: Vec<PageId>,
    /// Connection it runs on.
    gen: u64,
    /// It is the leave (only its own reply ends the leave).
    leave: bool,
}

/// The sync in flight.
#[derive(Debug)]
struct InFlightSync {
    gen: u64,
    /// Pages being loaded.
    loads: Vec<PageId>,
    /// The live view when the loads were sent.
    view: LiveView,
}

/// The cluster module's state.
pub(crate) struct Machine {
    cfg: Config,
    keys: Keys,
    /// This node's current id (the incarnation goes up at each registration).
    id: NodeId,
    reg: Registration,
    link: Link,
    /// Number of the last connection attempt.
    gen: u64,
    /// Next reconnect delay.
    backoff: Duration,
    /// Last sequence number used.
    seq: u64,
    /// A graceful leave was asked for.
    leaving: bool,
    write: Option<InFlightWrite>,
    sync: Option<InFlightSync>,
    /// This node's non-zero local tallies.
    local: HashMap<PageId, Tally>,
    /// Pages whose local tally may differ from Redis.
    dirty: HashSet<PageId>,
    /// What Redis holds for this node (pages with a field): `Some(tally)`, or
    /// `None` when a failed write left it unknown.
    written: HashMap<PageId, Option<Tally>>,
    /// Pages the counter follows.
    followed: HashSet<PageId>,
    /// Held pages no longer followed, since when (dropped after `follow_linger`).
    lingering: HashMap<PageId, Instant>,
    /// Held pages per channel group (the groups subscribed).
    groups: HashMap<u32, usize>,
    /// Channels subscribed (or being subscribed).
    subscribed: HashSet<String>,
    /// The groups or the live view changed since `subscribed` was computed.
    resubscribe: bool,
    /// Held pages whose values were loaded on this connection.
    loaded: HashSet<PageId>,
    /// Held pages to load.
    to_load: HashSet<PageId>,
    /// Other nodes' values and the live view.
    remote: RemoteTable,
    /// Remote sum last sent to the counter per followed page.
    sums_sent: HashMap<PageId, Tally>,
    /// `Follow` requests waiting for loads: (req, pages not loaded yet).
    waiters: Vec<(u64, HashSet<PageId>)>,
    /// Dead nodes this node claimed to reap (reaped once connected).
    to_reap: HashSet<NodeId>,
    /// This process's previous ids that may still hold fields (a join that
    /// failed leaves them to the next one; a write of an expired id may land
    /// after a survivor reaped it).
    unreaped: Vec<NodeId>,
    /// Pages where those may hold a field.
    unreaped_pages: HashSet<PageId>,
}

impl Machine {
    /// A machine for node `id`; `registered`: `id` may be registered in
    /// Redis (a previous run or a previous actor). Connection numbers start
    /// after `gen` (results of older connections are stale). Returns the
    /// first jobs (the first connection attempt).
    pub(crate) fn new(
        cfg: Config,
        keys: Keys,
        id: NodeId,
        registered: bool,
        gen: u64,
    ) -> (Machine, Vec<Job>) {
        let mut m = Machine {
            cfg,
            keys,
            id,
            reg: if registered {
                Registration::Stale
            } else {
                Registration::None
            },
            link: Link::Waiting,
            gen,
            backoff: BACKOFF_MIN,
            seq: 0,
            leaving: false,
            write: None,
            sync: None,
            local: HashMap::new(),
            dirty: HashSet::new(),
            written: HashMap::new(),
            followed: HashSet::new(),
            lingering: HashMap::new(),
            groups: HashMap::new(),
            subscribed: HashSet::new(),
            resubscribe: false,
            loaded: HashSet::new(),
            to_load: HashSet::new(),
            remote: RemoteTable::default(),
            sums_sent: HashMap::new(),
            waiters: Vec::new(),
            to_reap: HashSet::new(),
            unreaped: Vec::new(),
            unreaped_pages: HashSet::new(),
        };
        let mut out = Vec::new();
        m.connect(&mut out);
        if let Link::Connecting { gen } = m.link {
            m.link = Link::Starting { gen };
        }
        (m, out)
    }

    /// A fresh machine for this node after its actor restarted (this one's
    /// state may be half-changed): only the identity carries over, the
    /// current id and the earlier ones that may still hold fields are
    /// reaped before the next incarnation registers.
    pub(crate) fn restarted(&self) -> (Machine, Vec<Job>) {
        let (mut m, jobs) = Machine::new(
            self.cfg.clone(),
            self.keys.clone(),
            self.id.clone(),
            // Whatever the half-changed state says: reaping an id that was
            // never registered costs a round trip, counting one twice more.
            true,
            self.gen,
        );
        m.unreaped = self.unreaped.clone();
        m.unreaped_pages = self.unreaped_pages.clone();
        m.unreaped_pages.extend(self.written.keys().cloned());
        (m, jobs)
    }

    /// True while connected to Redis and registered (`/readyz`).
    pub(crate) fn connected(&self) -> bool {
        matches!(self.link, Link::Up { .. }) && matches!(self.reg, Registration::Joined { .. })
    }

    /// This node's current id.
    pub(crate) fn id(&self) -> &NodeId {
        &self.id
    }

    /// The connection the machine is up on.
    pub(crate) fn up(&self) -> Option<u64> {
        match self.link {
            Link::Up { gen } => Some(gen),
            _ => None,
        }
    }

    /// The connection HTTP reads may use now (`None`: answer "unknown").
    pub(crate) fn readable(&self) -> Option<u64> {
        match self.link {
            Link::Up { gen } if self.remote.have_view() => Some(gen),
            _ => None,
        }
    }

    /// Whether `page`'s remote sum is known in memory.
    pub(crate) fn is_loaded(&self, page: &PageId) -> bool {
        self.loaded.contains(page)
    }

    /// The remote sum of a held page.
    pub(crate) fn sum(&self, page: &PageId) -> Tally {
        self.remote.sum(page)
    }

    /// The remote sum of fields read from Redis (an HTTP read of a page not held).
    pub(crate) fn sum_fields(&self, fields: &HashMap<String, String>) -> Tally {
        super::table::sum_fields(&self.remote, fields)
    }

    /// The `Follow` requests still waiting (answered by the shell when the
    /// machine is dropped).
    pub(crate) fn waiting_requests(&self) -> impl Iterator<Item = u64> + '_ {
        self.waiters.iter().map(|(req, _)| *req)
    }

    /// Handles one event at `now`; the jobs it produced, in order.
    pub(crate) fn handle(&mut self, ev: Event, now: Instant) -> Vec<Job> {
        let mut out = Vec::new();
        if self.link == Link::Left {
            return out;
        }
        match ev {
            Event::Connected {
                gen,
                checked,
                check,
            } => self.on_connected(gen, checked, check, now, &mut out),
            Event::ConnectFailed { gen, error } => {
                if self.attempt() == Some(gen) {
                    self.retry(&error, &mut out);
                }
            }
            Event::RetryDue => {
                if self.link == Link::Waiting {
                    self.connect(&mut out);
                }
            }
            Event::Lost { gen, error } => self.lost(gen, &error, &mut out),
            Event::Beat { id, reply } => match reply {
                Ok(r) => {
                    if self.link == Link::Waiting {
                        // Redis answers again: no need to wait out the backoff.
                        self.connect(&mut out);
                    }
                    self.on_view(id.as_ref(), r, now, &mut out)
                }
                Err(e) => tracing::warn!(error = %e, "cluster: heartbeat failed"),
            },
            Event::Written { result } => self.on_written(result, now, &mut out),
            Event::Synced { result } => self.on_synced(result, &mut out),
            Event::Reaped { gen, result } => {
                if let Err(e) = result {
                    self.lost(gen, &e, &mut out);
                }
            }
            Event::Message { gen, wire } => self.on_message(gen, wire, &mut out),
            Event::Local(msg) => {
                self.on_local(msg);
                self.pump(&mut out);
            }
            Event::Follow(msg) => self.on_follow(msg, &mut out),
            Event::Unfollow(msg) => {
                for p in &msg.pages {
                    self.unfollow(p, now);
                }
                self.pump(&mut out);
            }
            Event::SetFollowed(msg) => self.on_set_followed(msg, now, &mut out),
            Event::ResendRemote(msg) => {
                // The counter rebuilds and forgot every sum.
                self.resend_all(true, &mut out);
                out.push(Job::Loaded(msg.req));
            }
            Event::Tick => {
                self.sweep_linger(now);
                let affected = self.remote.expire_ghosts(now);
                self.send_sums(&affected, &mut out);
                self.pump(&mut out);
            }
            Event::Withdraw => self.on_withdraw(&mut out),
        }
        out
    }

    // ------------------------------------------------------------ connection

    /// The attempt running, if any.
    fn attempt(&self) -> Option<u64> {
        match self.link {
            Link::Starting { gen } | Link::Connecting { gen } => Some(gen),
            _ => None,
        }
    }

    fn connect(&mut self, out: &mut Vec<Job>) {
        self.gen += 1;
        self.link = Link::Connecting { gen: self.gen };
        let check = matches!(self.reg, Registration::Joined { .. }).then(|| self.id.clone());
        out.push(Job::Connect {
            gen: self.gen,
            check,
        });
    }

    fn on_connected(
        &mut self,
        gen: u64,
        checked: Option<NodeId>,
        check: BeatReply,
        now: Instant,
        out: &mut Vec<Job>,
    ) {
        if self.attempt() != Some(gen) {
            return;
        }
        self.backoff = BACKOFF_MIN;
        self.link = Link::Up { gen };
        tracing::info!(process = %self.id.process, "cluster: connected to redis");
        let mine = checked.as_ref() == Some(&self.id);
        if let (Registration::Joined { .. }, true, true) = (self.reg, mine, check.ok) {
            // Still live: only what may not have reached Redis is written again.
            for (p, w) in &self.written {
                if w.is_none() {
                    self.dirty.insert(p.clone());
                }
            }
        }
        // Pub/sub messages of the gap are lost: subscribe and load again.
        // If Redis lost its data meanwhile, the values stay as ghosts.
        if let Some(until) = self.data_lost(checked.as_ref(), &check, now) {
            self.remote.ghost_all(until);
        }
        self.remote.clear_values();
        self.subscribed.clear();
        self.resubscribe = true;
        self.loaded.clear();
        self.to_load.extend(self.remote.held().cloned());
        self.on_view(checked.as_ref(), check, now, out);
    }

    /// Connection `gen` failed: serve local tallies, reconnect later.
    fn lost(&mut self, gen: u64, why: &str, out: &mut Vec<Job>) {
        if self.link != (Link::Up { gen }) {
            return;
        }
        self.retry(why, out);
    }

    fn retry(&mut self, why: &str, out: &mut Vec<Job>) {
        // Held subscribe answers go out with what is known.
        for (req, _) in self.waiters.drain(..) {
            out.push(Job::Loaded(req));
        }
        tracing::warn!(error = %why, retry_in = ?self.backoff, "cluster: redis unreachable; serving local counts");
        self.link = Link::Waiting;
        out.push(Job::RetryIn(self.backoff));
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    /// Whether a heartbeat for `checked` shows Redis lost this node's
    /// registration although it was refreshed within `node_ttl` (so the node
    /// did not stall: Redis lost its data). Then the deadline of the ghosts.
    fn data_lost(&self, checked: Option<&NodeId>, r: &BeatReply, now: Instant) -> Option<Instant> {
        let Registration::Joined { last_ok } = self.reg else {
            return None;
        };
        let lost = checked == Some(&self.id)
            && !r.ok
            && now.saturating_duration_since(last_ok) < self.cfg.node_ttl;
        lost.then(|| now + self.cfg.node_ttl)
    }

    // ------------------------------------------------------------ liveness

    /// A heartbeat snapshot: the live view changes, dead nodes' values go,
    /// new nodes' values are loaded, claimed dead nodes are reaped.
    fn on_view(
        &mut self,
        checked: Option<&NodeId>,
        r: BeatReply,
        now: Instant,
        out: &mut Vec<Job>,
    ) {
        // One incarnation per process, the latest (two could only both look
        // live if Redis's clock stepped back past an expiry).
        let mut live: LiveView = HashMap::new();
        for n in &r.live {
            if n.process != self.id.process {
                let inc = live.entry(n.process.clone()).or_insert(n.incarnation);
                *inc = (*inc).max(n.incarnation);
            }
        }
        let ghosts = self.data_lost(checked, &r, now);
        let change: ViewChange = self.remote.set_live(live, now, ghosts);
        self.resubscribe |= change.changed;
        if change.joined {
            // A node not counted before: load its values of every held page.
            self.to_load.extend(self.remote.held().cloned());
        }
        if !change.affected.is_empty() {
            tracing::info!(
                pages = change.affected.len(),
                "cluster: dropped dead nodes' counts"
            );
        }
        self.send_sums(&change.affected, out);
        if let Registration::Joined { last_ok } = &mut self.reg {
            if checked == Some(&self.id) {
                if r.ok {
                    *last_ok = now;
                } else {
                    if ghosts.is_some() {
                        tracing::warn!(node = %self.id, "cluster: redis lost this node's registration (restarted empty?); registering again, the others' last counts kept until they do");
                    } else {
                        tracing::warn!(node = %self.id, "cluster: this node was declared dead (stalled past node_ttl); registering again");
                    }
                    self.reg = Registration::Stale;
                    out.push(Job::BeatAs(None));
                }
            }
        }
        // Reaped as soon as a connection is up (a claim is this node's job
        // until it expires).
        self.to_reap.extend(r.claimed);
        self.sweep_linger(now);
        self.pump(out);
    }

    fn on_message(&mut self, gen: u64, w: Wire, out: &mut Vec<Job>) {
        if self.link != (Link::Up { gen }) {
            return;
        }
        let Some(id) = NodeId::parse(&w.node) else {
            tracing::warn!("cluster: channel message with a malformed node id ignored");
            return;
        };
        let mut touched = Vec::new();
        for (page, connections, visitors) in w.pages {
            let Ok(page) = PageId::parse_link(&page) else {
                tracing::warn!(
                    len = page.len(),
                    "cluster: malformed page id in a channel message skipped"
                );
                continue;
            };
            let t = Tally {
                connections,
                visitors,
            };
            if self.remote.apply(&page, &id, w.seq, t) {
                touched.push(page);
            }
        }
        self.send_sums(&touched, out);
    }

    // ------------------------------------------------------------ lanes

    fn pump(&mut self, out: &mut Vec<Job>) {
        if let Link::Up { gen } = self.link {
            for node in self.to_reap.drain() {
                tracing::info!(node = %node, "cluster: reaping dead node");
                out.push(Job::Reap { gen, node });
            }
        }
        self.pump_write(out);
        self.pump_sync(out);
        self.release_waiters(out);
    }

    /// Sends the next write (one in flight at a time): a leave, a
    /// registration, or the changed tallies.
    fn pump_write(&mut self, out: &mut Vec<Job>) {
        let Link::Up { gen } = self.link else { return };
        if self.write.is_some() {
            return;
        }
        let write = if self.leaving {
            self.withdraw_ops()
        } else {
            match self.reg {
                Registration::None | Registration::Stale => self.join_write(out),
                Registration::Joining => return,
                Registration::Joined { .. } => {
                    let ops = self.take_changes();
                    if ops.is_empty() {
                        return;
                    }
                    Write::Batch { ops }
                }
            }
        };
        self.seq += 1;
        let pages = write.ops().iter().map(|o| o.page.clone()).collect();
        self.write = Some(InFlightWrite {
            pages,
            gen,
            leave: self.leaving,
        });
        out.push(Job::Write {
            gen,
            node: self.id.clone(),
            seq: self.seq,
            write,
        });
    }

    /// A leave: zeros for every field, then the id goes.
    fn withdraw_ops(&mut self) -> Write {
        let ops = self
            .written
            .keys()
            .map(|p| Op {
                page: p.clone(),
                tally: Tally::ZERO,
                new_field: false,
            })
            .collect();
        self.local.clear();
        self.dirty.clear();
        Write::Withdraw { ops }
    }

    /// The registration of the next incarnation, with every local tally.
    fn join_write(&mut self, out: &mut Vec<Job>) -> Write {
        if self.reg == Registration::Stale && !self.unreaped.contains(&self.id) {
            self.unreaped.push(self.id.clone());
        }
        let old = self.unreaped.clone();
        self.unreaped_pages.extend(self.written.keys().cloned());
        let old_pages = self.unreaped_pages.iter().cloned().collect();
        self.id.incarnation += 1;
        self.reg = Registration::Joining;
        // On disk before Redis: a crash after the registration finds it.
        out.push(Job::SaveIdentity(self.id.clone()));
        self.dirty.clear();
        self.written.clear();
        let ops = self
            .local
            .iter()
            .map(|(p, t)| {
                self.written.insert(p.clone(), Some(*t));
                Op {
                    page: p.clone(),
                    tally: *t,
                    new_field: true,
                }
            })
            .collect();
        Write::Join {
            old,
            old_pages,
            ops,
        }
    }

    fn on_written(
        &mut self,
        result: Result<Option<BeatReply>, String>,
        now: Instant,
        out: &mut Vec<Job>,
    ) {
        let Some(w) = self.write.take() else { return };
        // The leave ends with its own reply, or with an earlier write's
        // failure (the connection is gone, and with it the way to leave).
        if w.leave || (self.leaving && result.is_err()) {
            if let Err(e) = &result {
                tracing::error!(error = %e, "cluster: leave failed; others drop this node within node_ttl");
            }
            self.finish_leave(result.is_ok(), out);
            return;
        }
        match result {
            Ok(joined) => {
                if let Some(reply) = joined {
                    // The join reaped them before registering.
                    self.unreaped.clear();
                    self.unreaped_pages.clear();
                    self.reg = Registration::Joined { last_ok: now };
                    tracing::info!(node = %self.id, "cluster: registered");
                    if !self.leaving {
                        out.push(Job::BeatAs(Some(self.id.clone())));
                    }
                    let id = self.id.clone();
                    self.on_view(Some(&id), reply, now, out);
                }
                // A leave asked for meanwhile is sent now: it removes what
                // this write put in Redis too.
                self.pump(out);
            }
            Err(e) => {
                if self.reg == Registration::Joining {
                    self.reg = Registration::Stale;
                }
                // Unknown whether these reached Redis: written again later.
                for p in w.pages {
                    self.written.insert(p.clone(), None);
                    self.dirty.insert(p);
                }
                self.lost(w.gen, &e, out);
            }
        }
    }

    /// The dirty pages whose tally differs from what Redis holds for this
    /// node (a page back where it was costs nothing), recorded as written.
    fn take_changes(&mut self) -> Vec<Op> {
        let mut ops = Vec::new();
        for page in std::mem::take(&mut self.dirty) {
            let want = self.local.get(&page).copied().unwrap_or(Tally::ZERO);
            let have = match self.written.get(&page) {
                None => Some(Tally::ZERO),
                Some(w) => *w,
            };
            if have == Some(want) {
                continue;
            }
            let new_field = !matches!(have, Some(t) if t != Tally::ZERO);
            if want == Tally::ZERO {
                self.written.remove(&page);
            } else {
                self.written.insert(page.clone(), Some(want));
            }
            ops.push(Op {
                page,
                tally: want,
                new_field,
            });
        }
        ops
    }

    fn on_withdraw(&mut self, out: &mut Vec<Job>) {
        if !matches!(self.link, Link::Up { .. }) || self.reg == Registration::None {
            // Nothing to remove, or no way to: stop touching Redis.
            self.finish_leave(false, out);
            return;
        }
        self.leaving = true;
        out.push(Job::BeatAs(None));
        self.pump(out);
    }

    fn finish_leave(&mut self, ok: bool, out: &mut Vec<Job>) {
        self.link = Link::Left;
        self.reg = Registration::None;
        out.push(Job::Left(ok));
    }

    /// The channels to be subscribed: the other live processes' channels of
    /// every group with a held page.
    fn wanted_channels(&self) -> HashSet<String> {
        let mut out = HashSet::new();
        for k in self.groups.keys() {
            for p in self.remote.live().keys() {
                out.insert(self.keys.channel(*k, p.as_str()));
            }
        }
        out
    }

    /// Sends the next subscription change and loads (one in flight at a
    /// time, so subscriptions apply in order and precede the loads after them).
    fn pump_sync(&mut self, out: &mut Vec<Job>) {
        let Link::Up { gen } = self.link else { return };
        if self.sync.is_some() || !self.remote.have_view() {
            return;
        }
        let (mut subscribe, mut unsubscribe) = (Vec::new(), Vec::new());
        if std::mem::take(&mut self.resubscribe) {
            let wanted = self.wanted_channels();
            subscribe = wanted.difference(&self.subscribed).cloned().collect();
            unsubscribe = self.subscribed.difference(&wanted).cloned().collect();
            self.subscribed = wanted;
        }
        let load: Vec<PageId> = self.to_load.drain().collect();
        if subscribe.is_empty() && unsubscribe.is_empty() && load.is_empty() {
            return;
        }
        self.sync = Some(InFlightSync {
            gen,
            loads: load.clone(),
            view: self.remote.live().clone(),
        });
        out.push(Job::Sync {
            gen,
            unsubscribe,
            subscribe,
            load,
        });
    }

    fn on_synced(
        &mut self,
        result: Result<Vec<HashMap<String, String>>, String>,
        out: &mut Vec<Job>,
    ) {
        let Some(s) = self.sync.take() else { return };
        match result {
            Ok(maps) => {
                if self.link == (Link::Up { gen: s.gen }) {
                    self.apply_loaded(&s.loads, maps, &s.view, out);
                }
                self.pump(out);
            }
            Err(e) => self.lost(s.gen, &e, out),
        }
    }

    /// Applies loaded hash fields (live nodes only) and sends the sums.
    fn apply_loaded(
        &mut self,
        pages: &[PageId],
        maps: Vec<HashMap<String, String>>,
        view: &LiveView,
        out: &mut Vec<Job>,
    ) {
        for (page, fields) in pages.iter().zip(maps) {
            if !self.remote.holds(page) {
                continue;
            }
            for (node, v) in fields {
                let (Some(id), Some((seq, t))) =
                    (NodeId::parse(&node), super::table::parse_value(&v))
                else {
                    tracing::warn!(page = %page, "cluster: malformed field skipped");
                    continue;
                };
                // Only nodes live when the load was sent: their channels
                // were subscribed before it, so no later change is missed.
                // A node that became live since is loaded again.
                if view.get(&id.process) == Some(&id.incarnation) {
                    self.remote.apply(page, &id, seq, t);
                }
            }
            self.remote.loaded(page, view);
            self.loaded.insert(page.clone());
        }
        self.send_sums(pages, out);
    }

    /// Answers the `Follow` requests whose pages are all loaded.
    fn release_waiters(&mut self, out: &mut Vec<Job>) {
        let (loaded, remote) = (&self.loaded, &self.remote);
        self.waiters.retain_mut(|(req, pages)| {
            pages.retain(|p| remote.holds(p) && !loaded.contains(p));
            if pages.is_empty() {
                out.push(Job::Loaded(*req));
                false
            } else {
                true
            }
        });
    }

    // ------------------------------------------------------------ the counter's messages

    fn on_local(&mut self, msg: LocalCounts) {
        if msg.full {
            let new: HashSet<&PageId> = msg.changes.iter().map(|(p, _)| p).collect();
            let gone: Vec<PageId> = self
                .local
                .keys()
                .filter(|p| !new.contains(p))
                .cloned()
                .collect();
            for p in gone {
                self.local.remove(&p);
                self.dirty.insert(p);
            }
        }
        for (p, t) in msg.changes {
            if t == Tally::ZERO {
                self.local.remove(&p);
            } else {
                self.local.insert(p.clone(), t);
            }
            self.dirty.insert(p);
        }
    }

    fn on_follow(&mut self, msg: Follow, out: &mut Vec<Job>) {
        let mut waiting = HashSet::new();
        for p in &msg.pages {
            self.followed.insert(p.clone());
            self.hold(p);
            if !self.loaded.contains(p) {
                waiting.insert(p.clone());
            }
        }
        self.send_sums(&msg.pages, out);
        let can_load = matches!(self.link, Link::Up { .. } | Link::Starting { .. });
        if waiting.is_empty() || !can_load {
            // Loaded, or Redis is down: answer with what is known.
            out.push(Job::Loaded(msg.req));
        } else {
            self.waiters.push((msg.req, waiting));
        }
        self.pump(out);
    }

    fn on_set_followed(&mut self, msg: SetFollowed, now: Instant, out: &mut Vec<Job>) {
        let new: HashSet<PageId> = msg.pages.into_iter().collect();
        let gone: Vec<PageId> = self.followed.difference(&new).cloned().collect();
        for p in &gone {
            self.unfollow(p, now);
        }
        for p in &new {
            self.followed.insert(p.clone());
            self.hold(p);
        }
        self.resend_all(false, out);
        self.pump(out);
    }

    // ------------------------------------------------------------ follows

    /// Starts holding `page` (subscribed, loaded) unless it already is.
    fn hold(&mut self, page: &PageId) {
        self.lingering.remove(page);
        if self.remote.holds(page) {
            return;
        }
        self.remote.hold(page);
        let n = self.groups.entry(self.keys.channel_of(page)).or_default();
        *n += 1;
        self.resubscribe |= *n == 1;
        self.to_load.insert(page.clone());
    }

    /// Stops holding `page`.
    fn release(&mut self, page: &PageId) {
        self.lingering.remove(page);
        if !self.remote.holds(page) {
            return;
        }
        self.remote.release(page);
        self.loaded.remove(page);
        self.to_load.remove(page);
        self.sums_sent.remove(page);
        let k = self.keys.channel_of(page);
        if let Some(n) = self.groups.get_mut(&k) {
            *n -= 1;
            if *n == 0 {
                self.groups.remove(&k);
                self.resubscribe = true;
            }
        }
    }

    fn unfollow(&mut self, page: &PageId, now: Instant) {
        if !self.followed.remove(page) {
            return;
        }
        // The counter forgot this page's remote sum.
        self.sums_sent.remove(page);
        if self.cfg.follow_linger.is_zero() {
            self.release(page);
        } else {
            self.lingering.insert(page.clone(), now);
        }
    }

    /// Drops the pages that lingered past `follow_linger`, and the oldest
    /// ones beyond `limits.max_pages`.
    fn sweep_linger(&mut self, now: Instant) {
        let linger = self.cfg.follow_linger;
        let expired: Vec<PageId> = self
            .lingering
            .iter()
            .filter(|(_, since)| now.saturating_duration_since(**since) >= linger)
            .map(|(p, _)| p.clone())
            .collect();
        for p in expired {
            self.release(&p);
        }
        let cap = self.cfg.max_pages;
        if self.lingering.len() > cap {
            let mut by_age: Vec<(Instant, PageId)> = self
                .lingering
                .iter()
                .map(|(p, t)| (*t, p.clone()))
                .collect();
            by_age.sort();
            let extra = self.lingering.len() - cap;
            for (_, p) in by_age.into_iter().take(extra) {
                self.release(&p);
            }
        }
    }

    /// Sends the counter the remote sums of followed `pages` that changed.
    /// A page not loaded on this connection is left out (the counter keeps
    /// showing its last sum until the load, instead of a partial one).
    fn send_sums(&mut self, pages: &[PageId], out: &mut Vec<Job>) {
        self.send_sums_of(pages, false, out);
    }

    /// [`Self::send_sums`]; with `all`, unloaded pages too (the counter
    /// forgot every sum).
    fn send_sums_of(&mut self, pages: &[PageId], all: bool, out: &mut Vec<Job>) {
        let mut changes = Vec::new();
        for p in pages {
            if !self.followed.contains(p) || !(all || self.loaded.contains(p)) {
                continue;
            }
            let s = self.remote.sum(p);
            if self.sums_sent.get(p) != Some(&s) {
                self.sums_sent.insert(p.clone(), s);
                changes.push((p.clone(), s));
            }
        }
        if !changes.is_empty() {
            out.push(Job::Remote(changes));
        }
    }

    /// Every followed page's sum again (`all`: unloaded ones too).
    fn resend_all(&mut self, all: bool, out: &mut Vec<Job>) {
        self.sums_sent.clear();
        let pages: Vec<PageId> = self.followed.iter().cloned().collect();
        self.send_sums_of(&pages, all, out);
    }
}

/// The process name and incarnation of a saved identity, if it reads back.
pub(crate) fn identity(process: &str, incarnation: u64) -> Option<NodeId> {
    Some(NodeId {
        process: Process::new(process)?,
        incarnation,
    })
}

/// The machine against a simulated Redis (the heartbeat script's rules,
/// hashes, page sets, pub/sub), nodes whose jobs and messages are delivered
/// in random interleavings, with outages, Redis restarts with and without
/// its data, stalls, crashes and actor restarts.
#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, VecDeque};

    use proptest::prelude::*;

    use super::*;
    use crate::cluster::table::format_value;

    const TTL_MS: u64 = 1000;
    const BEAT_MS: u64 = 200;
    /// Two pages and the site figure's link.
    const PAGES: [&str; 3] = ["x", "y", crate::protocol::SITE_LINK];

    fn tally(n: u64) -> Tally {
        Tally {
            connections: n,
            visitors: n,
        }
    }

    fn cfg() -> Config {
        Config {
            node_ttl: Duration::from_millis(TTL_MS),
            follow_linger: Duration::from_millis(300),
            max_pages: 100,
        }
    }

    fn keys() -> Keys {
        Keys::for_tests(2)
    }

    /// Redis in memory.
    #[derive(Default)]
    struct Redis {
        up: bool,
        /// Connections opened before the last outage are dead.
        epoch: u64,
        /// Liveness set: id -> deadline (ms).
        live: BTreeMap<String, u64>,
        claims: HashMap<String, u64>,
        /// page -> node id -> value.
        pages: HashMap<String, HashMap<String, String>>,
        /// node id -> pages with a field.
        node_pages: HashMap<String, HashSet<String>>,
    }

    impl Redis {
        /// The heartbeat script.
        fn beat(&mut self, now: u64, id: Option<&NodeId>, join: bool) -> BeatReply {
            let mut ok = false;
            if let Some(id) = id {
                let id = id.to_string();
                let score = self.live.get(&id).copied();
                if (join && score.is_none()) || (!join && score.is_some_and(|d| d >= now)) {
                    self.live.insert(id, now + TTL_MS);
                    ok = true;
                }
            }
            let live = self
                .live
                .iter()
                .filter(|(_, d)| **d >= now)
                .filter_map(|(k, _)| NodeId::parse(k))
                .collect();
            let dead: Vec<String> = self
                .live
                .iter()
                .filter(|(_, d)| **d < now)
                .map(|(k, _)| k.clone())
                .collect();
            let mut claimed = Vec::new();
            for d in dead {
                if self.claims.get(&d).is_none_or(|c| *c < now) {
                    self.claims.insert(d.clone(), now + 2 * TTL_MS);
                    claimed.extend(NodeId::parse(&d));
                }
            }
            BeatReply { ok, live, claimed }
        }

        fn reap(&mut self, node: &NodeId) {
            let id = node.to_string();
            for p in self.node_pages.remove(&id).unwrap_or_default() {
                if let Some(h) = self.pages.get_mut(&p) {
                    h.remove(&id);
                }
            }
            self.live.remove(&id);
            self.claims.remove(&id);
        }

        /// A write batch; the messages it publishes: (channel, message).
        fn write(&mut self, node: &NodeId, seq: u64, ops: &[Op]) -> Vec<(String, Wire)> {
            let id = node.to_string();
            let mut by_group: BTreeMap<u32, Vec<(String, u64, u64)>> = BTreeMap::new();
            for op in ops {
                let h = self.pages.entry(op.page.to_string()).or_default();
                let np = self.node_pages.entry(id.clone()).or_default();
                if op.tally == Tally::ZERO {
                    h.remove(&id);
                    np.remove(&*op.page);
                } else {
                    h.insert(id.clone(), format_value(seq, op.tally));
                    if op.new_field {
                        np.insert(op.page.to_string());
                    }
                }
                by_group
                    .entry(keys().channel_of(&op.page))
                    .or_default()
                    .push((op.page.to_string(), op.tally.connections, op.tally.visitors));
            }
            by_group
                .into_iter()
                .map(|(k, pages)| {
                    let wire = Wire {
                        node: id.clone(),
                        seq,
                        pages,
                    };
                    (keys().channel(k, node.process.as_str()), wire)
                })
                .collect()
        }
    }

    /// A job in flight.
    #[derive(Debug)]
    enum Pending {
        Connect {
            gen: u64,
            check: Option<NodeId>,
        },
        Retry,
        Write {
            gen: u64,
            node: NodeId,
            seq: u64,
            write: Write,
        },
        Sync {
            gen: u64,
            unsub: Vec<String>,
            sub: Vec<String>,
            load: Vec<PageId>,
        },
        Reap {
            gen: u64,
            node: NodeId,
        },
    }

    /// One node: its machine, what runs for it, and its counter's side.
    struct Node {
        m: Machine,
        pending: VecDeque<Pending>,
        /// The open connection: (gen, Redis epoch).
        conn: Option<(u64, u64)>,
        subs: HashSet<String>,
        inbox: VecDeque<(u64, Wire)>,
        beat_as: Option<NodeId>,
        saved: Option<NodeId>,
        /// How its graceful leave ended, once it did.
        left: Option<bool>,
        /// The local tallies (the truth of this node).
        truth: HashMap<PageId, u64>,
        followed: HashSet<PageId>,
        /// The remote sums the counter holds.
        seen: HashMap<PageId, u64>,
        req: u64,
    }

    struct World {
        redis: Redis,
        nodes: Vec<Node>,
        now: u64,
        t0: Instant,
        /// The largest tally each process ever had per page.
        max_ever: HashMap<(String, PageId), u64>,
        /// Every sum a counter receives must equal the truth.
        exact: bool,
        /// Processes that crashed: a write of an expired id that landed
        /// after a survivor reaped it may stay behind, uncounted (the
        /// restarted process reaps only its last id).
        crashed: HashSet<String>,
    }

    #[derive(Debug, Clone)]
    enum Act {
        Step(usize),
        Deliver(usize),
        Beat(usize),
        Advance(u64),
        Local(usize, usize, u64),
        Follow(usize, usize),
        Unfollow(usize, usize),
        RedisDown,
        RedisUp { empty: bool },
        Stall(usize),
        Crash(usize),
        RestartActor(usize),
    }

    impl World {
        fn new(n: usize) -> World {
            let mut w = World {
                redis: Redis {
                    up: true,
                    ..Redis::default()
                },
                nodes: Vec::new(),
                now: 0,
                t0: Instant::now(),
                max_ever: HashMap::new(),
                exact: false,
                crashed: HashSet::new(),
            };
            for i in 0..n {
                let id = identity(&format!("p{i}"), 0).expect("id");
                let (m, jobs) = Machine::new(cfg(), keys(), id, false, 0);
                w.nodes.push(Node {
                    m,
                    pending: VecDeque::new(),
                    conn: None,
                    subs: HashSet::new(),
                    inbox: VecDeque::new(),
                    beat_as: None,
                    saved: None,
                    left: None,
                    truth: HashMap::new(),
                    followed: HashSet::new(),
                    seen: HashMap::new(),
                    req: 0,
                });
                w.absorb(i, jobs);
            }
            w
        }

        /// Two nodes, settled: node 0 follows `x`, node 1 has `n` viewers of it.
        fn two_with_viewers(x: &PageId, n: u64) -> World {
            let mut w = World::new(2);
            w.follow(0, x.clone());
            w.local(1, x.clone(), n);
            w.check_converged();
            assert_eq!(w.nodes[0].seen.get(x), Some(&n));
            w
        }

        fn at(&self) -> Instant {
            self.t0 + Duration::from_millis(self.now)
        }

        fn feed(&mut self, i: usize, ev: Event) {
            let at = self.at();
            let jobs = self.nodes[i].m.handle(ev, at);
            self.absorb(i, jobs);
        }

        /// The others' truth of `page` for node `i`.
        fn truth_for(&self, i: usize, page: &PageId) -> u64 {
            let own = self.nodes[i].m.id().process.clone();
            let mut by_process: HashMap<Process, u64> = HashMap::new();
            for n in &self.nodes {
                if n.m.id().process != own {
                    *by_process.entry(n.m.id().process.clone()).or_default() +=
                        n.truth.get(page).copied().unwrap_or(0);
                }
            }
            by_process.values().sum()
        }

        fn absorb(&mut self, i: usize, jobs: Vec<Job>) {
            for job in jobs {
                let n = &mut self.nodes[i];
                match job {
                    Job::Connect { gen, check } => {
                        n.pending.push_back(Pending::Connect { gen, check })
                    }
                    Job::RetryIn(_) => n.pending.push_back(Pending::Retry),
                    Job::Write {
                        gen,
                        node,
                        seq,
                        write,
                    } => n.pending.push_back(Pending::Write {
                        gen,
                        node,
                        seq,
                        write,
                    }),
                    Job::Sync {
                        gen,
                        unsubscribe,
                        subscribe,
                        load,
                    } => n.pending.push_back(Pending::Sync {
                        gen,
                        unsub: unsubscribe,
                        sub: subscribe,
                        load,
                    }),
                    Job::Reap { gen, node } => n.pending.push_back(Pending::Reap { gen, node }),
                    Job::BeatAs(id) => n.beat_as = id,
                    Job::SaveIdentity(id) => n.saved = Some(id),
                    Job::Remote(changes) => {
                        for (p, t) in changes {
                            self.check_sum(i, &p, t);
                            self.nodes[i].seen.insert(p, t.connections);
                        }
                    }
                    Job::Left(ok) => n.left = Some(ok),
                    Job::Loaded(_) => {}
                }
            }
        }

        /// No node is counted twice (the sum never exceeds the most each
        /// other process ever had), and in an exact phase the sum is the truth.
        fn check_sum(&self, i: usize, page: &PageId, t: Tally) {
            assert!(
                self.nodes[i].followed.contains(page),
                "sum of a page not followed"
            );
            let own = self.nodes[i].m.id().process.to_string();
            let bound: u64 = self
                .max_ever
                .iter()
                .filter(|((p, pg), _)| *p != own && pg == page)
                .map(|(_, v)| *v)
                .sum();
            assert!(
                t.connections <= bound,
                "node {i} got {} for {page}, above every other process's most ({bound})",
                t.connections
            );
            if self.exact {
                assert_eq!(
                    t.connections,
                    self.truth_for(i, page),
                    "node {i}: {page} left the truth"
                );
            }
        }

        fn alive(&self, i: usize, gen: u64) -> bool {
            self.redis.up && self.nodes[i].conn == Some((gen, self.redis.epoch))
        }

        fn publish(&mut self, from: usize, msgs: Vec<(String, Wire)>) {
            for (j, n) in self.nodes.iter_mut().enumerate() {
                let Some((gen, epoch)) = n.conn else { continue };
                if j == from || epoch != self.redis.epoch {
                    continue;
                }
                for (channel, wire) in &msgs {
                    if n.subs.contains(channel) {
                        let copy = Wire {
                            node: wire.node.clone(),
                            seq: wire.seq,
                            pages: wire.pages.clone(),
                        };
                        n.inbox.push_back((gen, copy));
                    }
                }
            }
        }

        /// The messages node `i` has received so far, handled before a
        /// reply: a connection delivers pushes and replies in the order
        /// Redis sent them, and the actor handles them in that order.
        fn deliver_received(&mut self, i: usize) {
            while let Some((gen, wire)) = self.nodes[i].inbox.pop_front() {
                self.feed(i, Event::Message { gen, wire });
            }
        }

        /// Runs node `i`'s oldest job against Redis and reports its result.
        fn step(&mut self, i: usize) {
            let Some(job) = self.nodes[i].pending.pop_front() else {
                return;
            };
            let now = self.now;
            match job {
                Pending::Connect { gen, check } => {
                    if !self.redis.up {
                        let error = "refused".into();
                        return self.feed(i, Event::ConnectFailed { gen, error });
                    }
                    let reply = self.redis.beat(now, check.as_ref(), false);
                    let n = &mut self.nodes[i];
                    n.conn = Some((gen, self.redis.epoch));
                    n.subs.clear();
                    n.inbox.clear();
                    self.feed(
                        i,
                        Event::Connected {
                            gen,
                            checked: check,
                            check: reply,
                        },
                    );
                    if self.nodes[i].m.up() != Some(gen) {
                        self.nodes[i].conn = None;
                    }
                }
                Pending::Retry => self.feed(i, Event::RetryDue),
                Pending::Write {
                    gen,
                    node,
                    seq,
                    write,
                } => {
                    let result = if self.alive(i, gen) {
                        self.run_write(i, &node, seq, write)
                    } else {
                        Err("not connected".into())
                    };
                    self.deliver_received(i);
                    self.feed(i, Event::Written { result });
                }
                Pending::Sync {
                    gen,
                    unsub,
                    sub,
                    load,
                } => {
                    let result = if self.alive(i, gen) {
                        let n = &mut self.nodes[i];
                        for c in unsub {
                            n.subs.remove(&c);
                        }
                        n.subs.extend(sub);
                        Ok(load
                            .iter()
                            .map(|p| self.redis.pages.get(&**p).cloned().unwrap_or_default())
                            .collect())
                    } else {
                        Err("not connected".into())
                    };
                    self.deliver_received(i);
                    self.feed(i, Event::Synced { result });
                }
                Pending::Reap { gen, node } => {
                    let result = if self.alive(i, gen) {
                        self.redis.reap(&node);
                        Ok(())
                    } else {
                        Err("not connected".into())
                    };
                    self.deliver_received(i);
                    self.feed(i, Event::Reaped { gen, result });
                }
            }
        }

        fn run_write(
            &mut self,
            i: usize,
            node: &NodeId,
            seq: u64,
            write: Write,
        ) -> Result<Option<BeatReply>, String> {
            match write {
                Write::Join {
                    old,
                    old_pages,
                    ops,
                } => {
                    for old in old {
                        self.redis.reap(&old);
                        for p in &old_pages {
                            if let Some(h) = self.redis.pages.get_mut(&**p) {
                                h.remove(&old.to_string());
                            }
                        }
                    }
                    let msgs = self.redis.write(node, seq, &ops);
                    self.publish(i, msgs);
                    let reply = self.redis.beat(self.now, Some(node), true);
                    if reply.ok {
                        Ok(Some(reply))
                    } else {
                        Err("already registered".into())
                    }
                }
                Write::Batch { ops } => {
                    let msgs = self.redis.write(node, seq, &ops);
                    self.publish(i, msgs);
                    Ok(None)
                }
                Write::Withdraw { ops } => {
                    // Zeros published, then the fields and the id removed.
                    let msgs = self.redis.write(node, seq, &ops);
                    self.publish(i, msgs);
                    self.redis.reap(node);
                    Ok(None)
                }
            }
        }

        fn beat(&mut self, i: usize) {
            let id = self.nodes[i].beat_as.clone();
            let reply = if self.redis.up {
                Ok(self.redis.beat(self.now, id.as_ref(), false))
            } else {
                Err("refused".into())
            };
            self.feed(i, Event::Beat { id, reply });
        }

        fn advance(&mut self, ms: u64) {
            self.now += ms;
            for i in 0..self.nodes.len() {
                self.feed(i, Event::Tick);
            }
        }

        fn local(&mut self, i: usize, page: PageId, v: u64) {
            self.nodes[i].truth.insert(page.clone(), v);
            let process = self.nodes[i].m.id().process.to_string();
            let e = self.max_ever.entry((process, page.clone())).or_default();
            *e = (*e).max(v);
            let changes = vec![(page, tally(v))];
            self.feed(
                i,
                Event::Local(LocalCounts {
                    changes,
                    full: false,
                }),
            );
        }

        fn follow(&mut self, i: usize, page: PageId) {
            let n = &mut self.nodes[i];
            if !n.followed.insert(page.clone()) {
                return;
            }
            n.seen.insert(page.clone(), 0);
            n.req += 1;
            let req = n.req;
            self.feed(
                i,
                Event::Follow(Follow {
                    pages: vec![page],
                    req,
                }),
            );
        }

        fn unfollow(&mut self, i: usize, page: PageId) {
            let n = &mut self.nodes[i];
            if !n.followed.remove(&page) {
                return;
            }
            n.seen.remove(&page);
            self.feed(i, Event::Unfollow(Unfollow { pages: vec![page] }));
        }

        fn redis_down(&mut self) {
            if !self.redis.up {
                return;
            }
            self.redis.up = false;
            self.redis.epoch += 1;
            for i in 0..self.nodes.len() {
                if let Some((gen, _)) = self.nodes[i].conn.take() {
                    let error = "connection to redis lost".into();
                    self.feed(i, Event::Lost { gen, error });
                }
            }
        }

        fn redis_up(&mut self, empty: bool) {
            self.redis_down();
            self.redis.up = true;
            if empty {
                self.redis = Redis {
                    up: true,
                    epoch: self.redis.epoch,
                    ..Redis::default()
                };
            }
        }

        /// Node `i` does nothing for longer than `node_ttl` (the others beat).
        fn stall(&mut self, i: usize) {
            for _ in 0..(TTL_MS / BEAT_MS + 2) {
                self.now += BEAT_MS;
                for j in 0..self.nodes.len() {
                    if j != i {
                        self.beat(j);
                    }
                }
            }
        }

        /// Node `i`'s process dies and starts again on its data directory.
        fn crash(&mut self, i: usize) {
            let n = &self.nodes[i];
            let (id, registered) = match &n.saved {
                Some(id) => (id.clone(), true),
                None => (n.m.id().clone(), false),
            };
            self.crashed.insert(id.process.to_string());
            let (m, jobs) = Machine::new(cfg(), keys(), id, registered, 0);
            let n = &mut self.nodes[i];
            n.m = m;
            n.pending.clear();
            n.conn = None;
            n.subs.clear();
            n.inbox.clear();
            n.beat_as = None;
            n.truth.clear();
            n.followed.clear();
            n.seen.clear();
            self.absorb(i, jobs);
        }

        /// Node `i`'s cluster actor restarts (a contained panic): a fresh
        /// machine; the counter sends its whole state again.
        fn restart_actor(&mut self, i: usize) {
            let (m, jobs) = self.nodes[i].m.restarted();
            let n = &mut self.nodes[i];
            n.m = m;
            n.pending.clear();
            n.conn = None;
            n.subs.clear();
            n.inbox.clear();
            n.beat_as = None;
            self.absorb(i, jobs);
            let n = &self.nodes[i];
            let changes = n
                .truth
                .iter()
                .filter(|(_, v)| **v > 0)
                .map(|(p, v)| (p.clone(), tally(*v)))
                .collect();
            let pages = n.followed.iter().cloned().collect();
            self.feed(
                i,
                Event::Local(LocalCounts {
                    changes,
                    full: true,
                }),
            );
            self.feed(i, Event::SetFollowed(SetFollowed { pages }));
        }

        fn apply(&mut self, a: Act) {
            let n = self.nodes.len();
            let page = |k: usize| PageId::parse_link(PAGES[k % PAGES.len()]).unwrap();
            match a {
                Act::Step(i) => self.step(i % n),
                Act::Deliver(i) => {
                    if let Some((gen, wire)) = self.nodes[i % n].inbox.pop_front() {
                        self.feed(i % n, Event::Message { gen, wire });
                    }
                }
                Act::Beat(i) => self.beat(i % n),
                Act::Advance(ms) => self.advance(ms),
                Act::Local(i, k, v) => self.local(i % n, page(k), v),
                Act::Follow(i, k) => self.follow(i % n, page(k)),
                Act::Unfollow(i, k) => self.unfollow(i % n, page(k)),
                Act::RedisDown => self.redis_down(),
                Act::RedisUp { empty } => self.redis_up(empty),
                Act::Stall(i) => self.stall(i % n),
                Act::Crash(i) => self.crash(i % n),
                Act::RestartActor(i) => self.restart_actor(i % n),
            }
        }

        /// Every node runs all its jobs, reads all its messages and beats,
        /// round after round, while time moves on a quarter beat a round.
        fn settle(&mut self, rounds: usize) {
            for _ in 0..rounds {
                for i in 0..self.nodes.len() {
                    for _ in 0..64 {
                        if self.nodes[i].pending.is_empty() && self.nodes[i].inbox.is_empty() {
                            break;
                        }
                        self.step(i);
                        while let Some((gen, wire)) = self.nodes[i].inbox.pop_front() {
                            self.feed(i, Event::Message { gen, wire });
                        }
                    }
                    self.beat(i);
                }
                self.advance(BEAT_MS / 4);
            }
        }

        /// Redis is up; after settling, every counter holds the exact sums
        /// and Redis holds each node's tallies under its live id only.
        fn check_converged(&mut self) {
            if !self.redis.up {
                self.redis_up(false);
            }
            self.settle(12 * (TTL_MS / BEAT_MS) as usize);
            for i in 0..self.nodes.len() {
                let n = &self.nodes[i];
                assert!(n.m.connected(), "node {i} connected and registered");
                for p in &n.followed {
                    assert_eq!(
                        n.seen.get(p).copied().unwrap_or(0),
                        self.truth_for(i, p),
                        "node {i} converged on {p}"
                    );
                }
                let id = n.m.id().to_string();
                assert!(self.redis.live.contains_key(&id), "node {i} registered");
                for p in PAGES {
                    let want = n.truth.get(p).copied().filter(|v| *v > 0);
                    let process = n.m.id().process.to_string();
                    let fields = self.redis.pages.get(p).cloned().unwrap_or_default();
                    for k in fields.keys() {
                        let stale = k.starts_with(&format!("{process}.")) && k != &id;
                        assert!(
                            !stale || self.crashed.contains(&process),
                            "node {i}: field of its old id {k} on {p} left behind"
                        );
                        assert!(!stale || !self.redis.live.contains_key(k));
                    }
                    let have = fields.get(&id).map(|v| {
                        super::super::table::parse_value(v)
                            .expect("value")
                            .1
                            .connections
                    });
                    assert_eq!(have, want, "node {i}'s own count of {p} registered");
                }
            }
        }
    }

    fn act() -> impl Strategy<Value = Act> {
        let i = 0..3usize;
        prop_oneof![
            8 => i.clone().prop_map(Act::Step),
            5 => i.clone().prop_map(Act::Deliver),
            4 => i.clone().prop_map(Act::Beat),
            3 => (1..BEAT_MS).prop_map(Act::Advance),
            4 => (i.clone(), 0..3usize, 0..6u64).prop_map(|(n, k, v)| Act::Local(n, k, v)),
            2 => (i.clone(), 0..3usize).prop_map(|(n, k)| Act::Follow(n, k)),
            1 => (i.clone(), 0..3usize).prop_map(|(n, k)| Act::Unfollow(n, k)),
            1 => Just(Act::RedisDown),
            1 => any::<bool>().prop_map(|empty| Act::RedisUp { empty }),
            1 => i.clone().prop_map(Act::Stall),
            1 => i.clone().prop_map(Act::Crash),
            1 => i.prop_map(Act::RestartActor),
        ]
    }

    /// The acts of a Redis outage that ends with an empty Redis: no local
    /// change, no stall, and less than `node_ttl` of time in all.
    fn outage_act() -> impl Strategy<Value = Act> {
        let i = 0..3usize;
        prop_oneof![
            6 => i.clone().prop_map(Act::Step),
            4 => i.clone().prop_map(Act::Deliver),
            4 => i.prop_map(Act::Beat),
            1 => (1..BEAT_MS / 4).prop_map(Act::Advance),
        ]
    }

    /// Ids read back from Redis are validated: a malformed page id or node
    /// id is skipped, never trusted, and the rest of the message applies.
    #[test]
    fn malformed_ids_from_redis_are_skipped() {
        let x = PageId::parse("x").unwrap();
        let mut w = World::two_with_viewers(&x, 1);
        w.max_ever.insert(("p1".into(), x.clone()), 4);
        let gen = w.nodes[0].m.up().expect("up");
        let node = w.nodes[1].m.id().to_string();
        let pages = vec![("a/b".into(), 9, 9), ("x".into(), 4, 4)];
        let wire = Wire {
            node: node.clone(),
            seq: 1 << 40,
            pages,
        };
        w.feed(0, Event::Message { gen, wire });
        assert_eq!(w.nodes[0].seen.get(&x), Some(&4));
        for bad in ["p1", "p 1.1", "p1.x", ""] {
            let wire = Wire {
                node: bad.into(),
                seq: 1 << 41,
                pages: vec![("x".into(), 3, 3)],
            };
            w.feed(0, Event::Message { gen, wire });
        }
        assert_eq!(w.nodes[0].seen.get(&x), Some(&4));
        assert_eq!(w.nodes[0].m.sum(&x), tally(4));
    }

    /// A leave asked for while a write is in flight waits for that write's
    /// reply, then goes out: only its own reply ends it, and the others
    /// drop the node's counts at once.
    #[test]
    fn a_leave_waits_for_the_write_in_flight() {
        let x = PageId::parse("x").unwrap();
        let mut w = World::two_with_viewers(&x, 3);
        w.local(1, x.clone(), 2);
        let batch = |n: &Node| {
            matches!(
                n.pending.front(),
                Some(Pending::Write {
                    write: Write::Batch { .. },
                    ..
                })
            )
        };
        assert!(batch(&w.nodes[1]), "a batch in flight");
        w.feed(1, Event::Withdraw);
        assert_eq!(w.nodes[1].pending.len(), 1, "the leave waits for the batch");
        w.step(1);
        assert_eq!(
            w.nodes[1].left, None,
            "the batch's reply does not end the leave"
        );
        assert!(
            matches!(
                w.nodes[1].pending.front(),
                Some(Pending::Write {
                    write: Write::Withdraw { .. },
                    ..
                })
            ),
            "the leave goes out after the batch"
        );
        w.step(1);
        assert_eq!(w.nodes[1].left, Some(true));
        let id = w.nodes[1].m.id().to_string();
        assert!(!w.redis.live.contains_key(&id), "the id is gone from Redis");
        assert!(w.redis.pages.get("x").is_none_or(|f| !f.contains_key(&id)));
        w.deliver_received(0);
        assert_eq!(
            w.nodes[0].seen.get(&x),
            Some(&0),
            "the others drop it at once"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever happens, no node is ever counted twice; once Redis is
        /// healthy, every node's own counts are registered again and every
        /// sum converges to the truth.
        #[test]
        fn never_twice_and_converges(
            n in 2..4usize,
            acts in prop::collection::vec(act(), 1..120),
        ) {
            let mut w = World::new(n);
            for a in acts {
                w.apply(a);
            }
            w.check_converged();
        }

        /// Redis restarts empty under a settled cluster: while the nodes
        /// register again, no sum a counter receives leaves the truth
        /// (no dip, nothing above), and all converge.
        #[test]
        fn an_empty_redis_is_not_dead_peers(
            n in 2..4usize,
            tallies in prop::collection::vec((0..3usize, 0..3usize, 0..9u64), 1..10),
            down_first in any::<bool>(),
            during in prop::collection::vec(outage_act(), 0..30),
            after in prop::collection::vec(outage_act(), 0..40),
        ) {
            let mut w = World::new(n);
            for i in 0..n {
                for page in PAGES {
                    w.follow(i, PageId::parse_link(page).unwrap());
                }
            }
            for (i, k, v) in tallies {
                w.local(i % n, PageId::parse_link(PAGES[k]).unwrap(), v);
            }
            w.check_converged();
            w.exact = true;
            if down_first {
                w.redis_down();
                for a in during {
                    w.apply(a);
                }
            }
            w.redis_up(true);
            for a in after {
                w.apply(a);
            }
            w.check_converged();
        }
    }
}
