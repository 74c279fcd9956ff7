//! Cluster mode: the only module that touches Redis.
//!
//! Present only when `cluster.redis_url` is set. The [`Cluster`] actor (on its
//! own arbiter) owns the cluster state; every Redis round trip runs as a
//! future it spawns, so the actor never waits on Redis and reads pub/sub as
//! it arrives. The heartbeat runs on a thread and connection of its own
//! ([`liveness`]). Redis is one instance, or a Redis Cluster
//! (`cluster.redis_cluster`).
//!
//! # Redis layout (`P` = `cluster.key_prefix`, `k` = `fnv1a(page) mod cluster.channels`)
//! - `P{live}z`: sorted set, member = node id, score = its liveness deadline
//!   in Redis server time. The heartbeat script refreshes it and reads the
//!   live members in one atomic step; an id whose deadline passed is dead for
//!   good (it can never refresh again).
//! - `P{live}r`: hash, dead node id -> until when a survivor's claim to reap it holds.
//! - `P{ck}p:{page}`: hash, field = node id, value = `seq:connections:visitors`,
//!   that node's local tally of the page (no field at zero).
//! - `P{ck}n:{node}`: set of the pages of group `k` where the node has a field (reaping).
//! - `P{ck}m:{process}`: pub/sub channel of one process's changes in group `k`:
//!   `{"node":id,"seq":n,"pages":[[page,connections,visitors],…]}`. A node
//!   subscribes to the channels of the other live processes for the groups of
//!   the pages it holds, so it never receives its own messages.
//!
//! A node id is `{process}.{incarnation}`. A node is counted by another only
//! while the other's last heartbeat snapshot shows it live; a process that
//! stalled past `node_ttl` deletes its old id's fields and registers the next
//! incarnation only after its old id expired, so no snapshot holds both, and
//! the remote table keeps one value per process ([`table`]).

mod liveness;
mod store;
mod table;

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use actix::{dev::ToEnvelope, prelude::*};
use futures_util::StreamExt;
use redis::PushInfo;
use tokio::sync::{mpsc, oneshot};

pub use store::Error;
use store::{Backend, BeatMode, BeatReply, Conn, Keys, Op, Wire};
use table::{NodeId, RemoteTable};

use crate::{
    config::Settings,
    metrics as m,
    protocol::{PageId, Tally},
    storage::Storage,
};

// ---------------------------------------------------------------- messages

/// Counter -> cluster: this node's local tallies that changed since the last
/// publish (coalesced by the counter). With `full`, the list is the whole local
/// state and every page not in it is zero (sent after a counter rebuild).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct LocalCounts {
    /// `(page, local tally)`.
    pub changes: Vec<(PageId, Tally)>,
    /// The list replaces all local tallies.
    pub full: bool,
}

/// Counter -> cluster: these pages gained their first local follower room.
/// Answered with [`RemoteCounts`] for them, then [`Loaded`] with `req`.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Follow {
    /// Pages to load and follow.
    pub pages: Vec<PageId>,
    /// Echoed in [`Loaded`].
    pub req: u64,
}

/// Cluster -> counter: the current values of the pages of [`Follow`] `req`
/// were loaded and sent (or could not be: Redis is down); held subscribe
/// answers can go out.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Loaded {
    /// The [`Follow`] request.
    pub req: u64,
}

/// Counter -> cluster: the other live nodes' tallies of pages this node does
/// not follow (HTTP reads); `None` while Redis is unreachable.
#[derive(Message, Debug)]
#[rtype(result = "Option<Vec<Tally>>")]
pub struct Fetch {
    /// Pages to read.
    pub pages: Vec<PageId>,
}

/// Counter -> cluster: these pages lost their last local follower room.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Unfollow {
    /// Pages no longer followed.
    pub pages: Vec<PageId>,
}

/// Counter -> cluster: after a counter rebuild, the whole set of followed
/// pages (replaces the previous set; every followed page's remote sum is re-sent).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct SetFollowed {
    /// Every page with a local follower room.
    pub pages: Vec<PageId>,
}

/// Counter -> cluster: a rebuild started; send the remote sums of every
/// followed page again (the cluster module kept them; the counter did not),
/// then [`Loaded`] with `req`.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct ResendRemote {
    /// Echoed in [`Loaded`].
    pub req: u64,
}

/// Cluster -> counter: the sum of the other live nodes' tallies of followed pages.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct RemoteCounts {
    /// `(page, sum over the other live nodes)`.
    pub changes: Vec<(PageId, Tally)>,
}

/// The counter's side of the cluster module: where [`RemoteCounts`] and
/// [`Loaded`] go.
struct ToCounter {
    remote: Recipient<RemoteCounts>,
    loaded: Recipient<Loaded>,
}

/// Server -> cluster at shutdown: remove this node's contributions at once
/// (fields, liveness, zeros published), then stop touching Redis.
#[derive(Message, Debug)]
#[rtype(result = "bool")]
pub struct Withdraw;

/// Liveness thread -> cluster: one heartbeat's outcome.
#[derive(Message, Debug)]
#[rtype(result = "()")]
struct Beat {
    /// The id it refreshed (`None`: observed only).
    id: Option<Arc<str>>,
    /// What Redis answered.
    reply: Result<BeatReply, String>,
}

// ---------------------------------------------------------------- health

/// Whether this node is currently in sync with Redis (read by `/readyz`).
#[derive(Clone, Debug, Default)]
pub struct ClusterHealth {
    /// True while connected and registered.
    connected: Arc<AtomicBool>,
}

impl ClusterHealth {
    /// True while the node is connected to Redis and registered.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    fn set(&self, v: bool) {
        self.connected.store(v, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------- actor

/// First reconnect delay; doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between reconnect attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The live connection.
struct Link {
    /// Commands, subscriptions and (RESP3 pushes) pub/sub.
    conn: Conn,
    /// Connection number: results and pushes of an older one are stale.
    gen: u64,
}

/// What the write lane sends next.
enum WriteJob {
    /// Register a new incarnation (deleting the previous one's fields first),
    /// then write every local tally under it.
    Join {
        old: Option<NodeId>,
        id: NodeId,
        ops: Vec<Op>,
    },
    /// Changed tallies.
    Batch { ops: Vec<Op> },
    /// Graceful leave: zeros, then the id's page sets and registration.
    Withdraw { ops: Vec<Op> },
}

impl WriteJob {
    fn ops(&self) -> &[Op] {
        match self {
            WriteJob::Join { ops, .. } | WriteJob::Batch { ops } | WriteJob::Withdraw { ops } => {
                ops
            }
        }
    }
}

/// What a finished write did.
struct WriteDone {
    /// Messages published.
    published: usize,
    /// A registration: the heartbeat snapshot it took.
    joined: Option<BeatReply>,
    /// The node left.
    left: bool,
}

/// Runs one write job on `conn` under `node` with sequence number `seq`.
async fn run_write(
    conn: Conn,
    keys: Keys,
    ttl: Duration,
    node: NodeId,
    seq: u64,
    job: WriteJob,
) -> Result<WriteDone, Error> {
    let mut done = WriteDone {
        published: 0,
        joined: None,
        left: false,
    };
    match job {
        WriteJob::Join { old, id, ops } => {
            if let Some(old) = &old {
                store::reap(&conn, &keys, &old.to_string(), true).await?;
            }
            let name = id.to_string();
            let reply = store::heartbeat(&conn, &keys, Some(&name), BeatMode::Join, ttl).await?;
            if !reply.ok {
                return Err(Error::Reply(format!("node id {name} already registered")));
            }
            let (groups, published) = store::write_groups(&keys, &id, seq, &ops);
            conn.run(groups).await?;
            done.published = published;
            done.joined = Some(reply);
        }
        WriteJob::Batch { ops } => {
            let (groups, published) = store::write_groups(&keys, &node, seq, &ops);
            conn.run(groups).await?;
            done.published = published;
        }
        WriteJob::Withdraw { ops } => {
            let (groups, published) = store::write_groups(&keys, &node, seq, &ops);
            conn.run(groups).await?;
            store::reap(&conn, &keys, &node.to_string(), true).await?;
            done.published = published;
            done.left = true;
        }
    }
    Ok(done)
}

/// Cluster mode's state and the Redis work around it.
pub struct Cluster {
    /// Timers, prefix, channel count, caps.
    settings: Arc<Settings>,
    /// Key and channel names.
    keys: Keys,
    /// How to connect.
    backend: Backend,
    /// Where remote sums and [`Loaded`] go.
    counter: ToCounter,
    /// Where this node's identity is kept between runs.
    storage: Storage,
    /// Read by `/readyz`.
    health: ClusterHealth,
    /// The heartbeat thread.
    liveness: Option<liveness::Liveness>,
    /// This node's current id (the incarnation goes up at each registration).
    id: NodeId,
    /// `id` is registered (its fields count for the others).
    joined: bool,
    /// Some incarnation may be registered in Redis (reaped before the next one).
    registered: bool,
    /// Last sequence number used.
    seq: u64,
    /// The connection, `None` while Redis is unreachable.
    link: Option<Link>,
    /// Connection number of the last attempt.
    gen: u64,
    /// Next reconnect delay.
    backoff: Duration,
    /// A reconnect is scheduled or running.
    connecting: bool,
    /// Connected at least once (reconnects are counted).
    connected_before: bool,
    /// The first connection attempt has not ended yet: a `Follow` waits for
    /// it (bounded by the counter's load deadline) instead of being answered
    /// with local counts only, so a node that starts under load shows the
    /// cluster's count from its first update.
    starting: bool,
    /// This node's non-zero local tallies.
    local: HashMap<PageId, Tally>,
    /// Pages whose local tally may differ from Redis.
    dirty: HashSet<PageId>,
    /// What Redis holds for this node (pages with a field): `Some(tally)`, or
    /// `None` when a failed write left it unknown.
    written: HashMap<PageId, Option<Tally>>,
    /// A write is in flight (one at a time, so writes apply in order).
    writing: bool,
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
    /// A subscription change or load is in flight (one at a time, in order).
    syncing: bool,
    /// A live view from a heartbeat arrived since the process started.
    have_view: bool,
    /// Other nodes' values and the live view.
    remote: RemoteTable,
    /// Remote sum last sent to the counter per followed page.
    sums_sent: HashMap<PageId, Tally>,
    /// `Follow` requests waiting for loads: (req, pages not loaded yet).
    waiters: Vec<(u64, HashSet<PageId>)>,
    /// A graceful leave waiting for the write lane.
    leave: Option<oneshot::Sender<bool>>,
    /// Left: nothing touches Redis any more.
    left: bool,
}

impl Cluster {
    /// Starts the actor on `arbiter`; returns it and its health flag.
    /// `counter` is the actor that takes [`RemoteCounts`] and [`Loaded`] (the
    /// counter, a layer above: the cluster keeps only those two recipients).
    pub fn start<C>(
        settings: Arc<Settings>,
        counter: Addr<C>,
        storage: Storage,
        arbiter: &ArbiterHandle,
    ) -> anyhow::Result<(Addr<Cluster>, ClusterHealth)>
    where
        C: Handler<RemoteCounts> + Handler<Loaded>,
        C::Context: ToEnvelope<C, RemoteCounts> + ToEnvelope<C, Loaded>,
    {
        let counter = ToCounter {
            remote: counter.clone().recipient(),
            loaded: counter.recipient(),
        };
        let backend = Backend::new(&settings.cluster)?;
        // The identity of this data directory's last run, if any: its id may
        // still be live (a crash), so it is reaped before this run registers.
        let previous = match storage.cluster_identity() {
            Ok(previous) => previous,
            Err(e) => {
                tracing::warn!(error = %e, "cluster: previous identity unreadable; starting as a new process");
                None
            }
        };
        let (id, registered) = match previous {
            Some((process, incarnation)) => (
                NodeId {
                    process: process.into(),
                    incarnation,
                },
                true,
            ),
            None => (
                NodeId {
                    process: store::fresh_process(),
                    incarnation: 0,
                },
                false,
            ),
        };
        let health = ClusterHealth::default();
        let h = health.clone();
        let addr = Cluster::start_in_arbiter(arbiter, move |_| Cluster {
            keys: Keys::new(&settings.cluster),
            backend,
            counter,
            storage,
            health: h,
            liveness: None,
            id,
            joined: false,
            registered,
            seq: 0,
            link: None,
            gen: 0,
            backoff: BACKOFF_MIN,
            connecting: false,
            connected_before: false,
            starting: true,
            local: HashMap::new(),
            dirty: HashSet::new(),
            written: HashMap::new(),
            writing: false,
            followed: HashSet::new(),
            lingering: HashMap::new(),
            groups: HashMap::new(),
            subscribed: HashSet::new(),
            resubscribe: false,
            loaded: HashSet::new(),
            to_load: HashSet::new(),
            syncing: false,
            have_view: false,
            remote: RemoteTable::default(),
            sums_sent: HashMap::new(),
            waiters: Vec::new(),
            leave: None,
            left: false,
            settings,
        });
        Ok((addr, health))
    }

    fn update_health(&self) {
        self.health
            .set(self.link.is_some() && self.joined && !self.left);
    }

    // ------------------------------------------------------------ connection

    /// Opens the connection (RESP3: pub/sub arrives as pushes on it) and
    /// checks whether this node's id is still live.
    fn connect(&mut self, ctx: &mut Context<Self>) {
        if self.left || self.link.is_some() || self.connecting {
            return;
        }
        self.connecting = true;
        self.gen += 1;
        let gen = self.gen;
        let (tx, rx) = mpsc::unbounded_channel::<PushInfo>();
        let backend = self.backend.clone();
        let keys = self.keys.clone();
        let ttl = self.settings.cluster.node_ttl;
        let id: Option<Arc<str>> = self.joined.then(|| self.id.to_string().into());
        let fut = async move {
            let conn = backend.connect(Some(tx)).await?;
            let check = store::heartbeat(&conn, &keys, id.as_deref(), BeatMode::Beat, ttl).await?;
            Ok::<_, Error>((conn, check, id))
        };
        ctx.spawn(fut.into_actor(self).map(move |r, act, ctx| {
            act.connecting = false;
            match r {
                Ok((conn, check, id)) => act.on_connected(ctx, gen, conn, rx, id, check),
                Err(e) => act.retry(ctx, &e.to_string()),
            }
        }));
    }

    #[allow(clippy::too_many_arguments)]
    fn on_connected(
        &mut self,
        ctx: &mut Context<Self>,
        gen: u64,
        conn: Conn,
        mut rx: mpsc::UnboundedReceiver<PushInfo>,
        id: Option<Arc<str>>,
        check: BeatReply,
    ) {
        if self.left || gen != self.gen {
            return;
        }
        self.backoff = BACKOFF_MIN;
        self.starting = false;
        if self.connected_before {
            m::redis_reconnected();
        }
        self.connected_before = true;
        let pushes = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
            .map(move |p| (gen, Some(p)))
            .chain(futures_util::stream::once(async move { (gen, None) }));
        ctx.add_stream(pushes);
        self.link = Some(Link { conn, gen });
        tracing::info!(process = %self.id.process, redis = %self.backend.describe(), "cluster: connected to redis");
        if self.joined {
            if check.ok {
                // Still live: only what may not have reached Redis is written again.
                for (p, w) in &self.written {
                    if w.is_none() {
                        self.dirty.insert(p.clone());
                    }
                }
            } else {
                tracing::warn!(node = %self.id, "cluster: this node's registration expired; registering again");
                self.expired();
            }
        }
        // Pub/sub messages of the gap are lost: subscribe and load again.
        self.subscribed.clear();
        self.resubscribe = true;
        self.loaded.clear();
        self.remote.clear_values();
        self.to_load.extend(self.remote.held().cloned());
        self.on_view(ctx, id, check);
        self.update_health();
    }

    /// Redis failed on connection `gen`: serve local tallies, reconnect later.
    fn lost(&mut self, ctx: &mut Context<Self>, gen: u64, why: &str) {
        if gen != self.gen || self.link.is_none() {
            return;
        }
        self.link = None;
        self.update_health();
        // Held subscribe answers go out with what is known.
        for (req, _) in self.waiters.drain(..) {
            self.counter.loaded.do_send(Loaded { req });
        }
        self.retry(ctx, why);
    }

    fn retry(&mut self, ctx: &mut Context<Self>, why: &str) {
        if self.left {
            return;
        }
        // Follows held for the first attempt go out with what is known.
        self.starting = false;
        for (req, _) in self.waiters.drain(..) {
            self.counter.loaded.do_send(Loaded { req });
        }
        tracing::warn!(error = %why, retry_in = ?self.backoff, "cluster: redis unreachable; serving local counts");
        self.connecting = true;
        ctx.run_later(self.backoff, |act, ctx| {
            act.connecting = false;
            act.connect(ctx);
        });
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    /// This node's id expired (it stalled past `node_ttl`, or Redis lost it):
    /// stop refreshing it; the write lane registers the next incarnation.
    fn expired(&mut self) {
        self.joined = false;
        if let Some(l) = &self.liveness {
            l.set_id(None);
        }
        self.update_health();
    }

    // ------------------------------------------------------------ liveness

    /// A heartbeat snapshot: the live view changes, dead nodes' values go,
    /// new nodes' values are loaded, claimed dead nodes are reaped.
    fn on_view(&mut self, ctx: &mut Context<Self>, id: Option<Arc<str>>, r: BeatReply) {
        m::set_cluster_nodes(r.live.len());
        let own = self.id.process.clone();
        // One incarnation per process, the latest (two could only both look
        // live if Redis's clock stepped back past an expiry).
        let mut live: HashMap<Arc<str>, u64> = HashMap::new();
        for n in r.live.iter().filter_map(|s| NodeId::parse(s)) {
            if n.process != own {
                let inc = live.entry(n.process).or_insert(n.incarnation);
                *inc = (*inc).max(n.incarnation);
            }
        }
        let (affected, joined, changed) = self.remote.set_live(live);
        self.have_view = true;
        self.resubscribe |= changed;
        if joined {
            // A node not counted before: load its values of every held page.
            self.to_load.extend(self.remote.held().cloned());
        }
        if !affected.is_empty() {
            tracing::info!(
                pages = affected.len(),
                "cluster: dropped dead nodes' counts"
            );
        }
        self.send_sums(&affected);
        let current = self.id.to_string();
        if self.joined && !r.ok && id.as_deref() == Some(current.as_str()) {
            tracing::warn!(node = %self.id, "cluster: this node was declared dead (stalled past node_ttl); registering again");
            self.expired();
        }
        for dead in r.claimed {
            self.reap_dead(ctx, dead);
        }
        self.sweep_linger();
        self.pump(ctx);
    }

    /// Deletes a dead node's fields (claimed by our heartbeat).
    fn reap_dead(&mut self, ctx: &mut Context<Self>, node: String) {
        let Some(link) = &self.link else { return };
        let (conn, gen, keys) = (link.conn.clone(), link.gen, self.keys.clone());
        tracing::info!(node = %node, "cluster: reaping dead node");
        let fut = async move { store::reap(&conn, &keys, &node, true).await };
        ctx.spawn(fut.into_actor(self).map(move |r, act, ctx| match r {
            Ok(()) => m::cluster_nodes_reaped(1),
            Err(e) => act.lost(ctx, gen, &e.to_string()),
        }));
    }

    // ------------------------------------------------------------ lanes

    fn pump(&mut self, ctx: &mut Context<Self>) {
        self.pump_write(ctx);
        self.pump_sync(ctx);
        self.release_waiters();
    }

    /// Sends the next write (one in flight at a time): a leave, a
    /// registration, or the changed tallies.
    fn pump_write(&mut self, ctx: &mut Context<Self>) {
        if self.writing || self.left {
            return;
        }
        let Some(link) = &self.link else { return };
        let (conn, gen) = (link.conn.clone(), link.gen);
        let job = if self.leave.is_some() {
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
            WriteJob::Withdraw { ops }
        } else if !self.joined {
            let old = self.registered.then(|| self.id.clone());
            self.id.incarnation += 1;
            self.registered = true;
            // On disk before Redis: a crash after the registration finds it.
            if let Err(e) = self
                .storage
                .save_cluster_identity(&self.id.process, self.id.incarnation)
            {
                tracing::warn!(error = %e, "cluster: identity not saved; after a crash this node's viewers may count twice until node_ttl");
            }
            self.dirty.clear();
            self.written.clear();
            let ops: Vec<Op> = self
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
            WriteJob::Join {
                old,
                id: self.id.clone(),
                ops,
            }
        } else {
            let ops = self.take_changes();
            if ops.is_empty() {
                return;
            }
            WriteJob::Batch { ops }
        };
        self.writing = true;
        self.seq += 1;
        let pages: Vec<PageId> = job.ops().iter().map(|o| o.page.clone()).collect();
        let joining = matches!(job, WriteJob::Join { .. });
        let fut = run_write(
            conn,
            self.keys.clone(),
            self.settings.cluster.node_ttl,
            self.id.clone(),
            self.seq,
            job,
        );
        let started = Instant::now();
        ctx.spawn(fut.into_actor(self).map(move |r, act, ctx| {
            act.writing = false;
            match r {
                Ok(done) => {
                    m::redis_rtt(m::RedisOp::Write, started.elapsed());
                    m::cluster_published(done.published);
                    if done.left {
                        act.finish_leave(true);
                        return;
                    }
                    if let Some(reply) = done.joined {
                        act.joined = true;
                        let id: Arc<str> = act.id.to_string().into();
                        tracing::info!(node = %id, "cluster: registered");
                        if let Some(l) = &act.liveness {
                            l.set_id(Some(id.clone()));
                        }
                        act.update_health();
                        act.on_view(ctx, Some(id), reply);
                    }
                    act.pump(ctx);
                }
                Err(e) => {
                    if act.leave.is_some() {
                        tracing::error!(error = %e, "cluster: leave failed; others drop this node within node_ttl");
                        act.finish_leave(false);
                        return;
                    }
                    if joining {
                        act.joined = false;
                    }
                    // Unknown whether these reached Redis: written again later.
                    for p in pages {
                        act.written.insert(p.clone(), None);
                        act.dirty.insert(p);
                    }
                    act.lost(ctx, gen, &e.to_string());
                }
            }
        }));
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

    fn finish_leave(&mut self, ok: bool) {
        self.left = true;
        self.link = None;
        if let Some(l) = self.liveness.take() {
            l.stop();
        }
        self.update_health();
        if let Some(done) = self.leave.take() {
            let _ = done.send(ok);
        }
    }

    /// The channels to be subscribed: the other live processes' channels of
    /// every group with a held page.
    fn wanted_channels(&self) -> HashSet<String> {
        let mut out = HashSet::new();
        for k in self.groups.keys() {
            for p in self.remote.live_processes() {
                out.insert(self.keys.channel(*k, p));
            }
        }
        out
    }

    /// Sends the next subscription change and loads (one in flight at a
    /// time, so subscriptions apply in order and precede the loads after them).
    fn pump_sync(&mut self, ctx: &mut Context<Self>) {
        if self.syncing || self.left || !self.have_view {
            return;
        }
        let Some(link) = &self.link else { return };
        let (conn, gen) = (link.conn.clone(), link.gen);
        let (mut sub, mut unsub) = (Vec::new(), Vec::new());
        if std::mem::take(&mut self.resubscribe) {
            let wanted = self.wanted_channels();
            sub = wanted.difference(&self.subscribed).cloned().collect();
            unsub = self.subscribed.difference(&wanted).cloned().collect();
            self.subscribed = wanted;
        }
        let loads: Vec<PageId> = self.to_load.drain().collect();
        if sub.is_empty() && unsub.is_empty() && loads.is_empty() {
            return;
        }
        self.syncing = true;
        let keys = self.keys.clone();
        let by_group = |names: Vec<String>| -> Vec<Vec<String>> {
            let mut m: HashMap<u32, Vec<String>> = HashMap::new();
            for n in names {
                m.entry(keys.group_of_channel(&n).unwrap_or(0))
                    .or_default()
                    .push(n);
            }
            m.into_values().collect()
        };
        let (sub, unsub) = (by_group(sub), by_group(unsub));
        let keys = self.keys.clone();
        let started = Instant::now();
        let fut = async move {
            conn.subscription(unsub, false).await?;
            conn.subscription(sub, true).await?;
            let maps = store::read_pages(&conn, &keys, &loads).await?;
            Ok::<_, Error>((loads, maps))
        };
        ctx.spawn(fut.into_actor(self).map(move |r, act, ctx| {
            act.syncing = false;
            match r {
                Ok((pages, maps)) => {
                    if !pages.is_empty() {
                        m::redis_rtt(m::RedisOp::Load, started.elapsed());
                    }
                    if gen == act.gen {
                        act.apply_loaded(&pages, maps);
                    }
                    act.pump(ctx);
                }
                Err(e) => {
                    act.lost(ctx, gen, &e.to_string());
                }
            }
        }));
    }

    /// Applies loaded hash fields (live nodes only) and sends the sums.
    fn apply_loaded(&mut self, pages: &[PageId], maps: Vec<HashMap<String, String>>) {
        for (page, fields) in pages.iter().zip(maps) {
            if !self.remote.holds(page) {
                continue;
            }
            for (node, v) in fields {
                let (Some(id), Some((seq, t))) = (NodeId::parse(&node), table::parse_value(&v))
                else {
                    continue;
                };
                self.remote.apply(page, &id, seq, t);
            }
            self.loaded.insert(page.clone());
        }
        self.send_sums(pages);
    }

    /// Answers the `Follow` requests whose pages are all loaded.
    fn release_waiters(&mut self) {
        if self.waiters.is_empty() {
            return;
        }
        let (loaded, remote) = (&self.loaded, &self.remote);
        let counter = &self.counter;
        self.waiters.retain_mut(|(req, pages)| {
            pages.retain(|p| remote.holds(p) && !loaded.contains(p));
            if pages.is_empty() {
                counter.loaded.do_send(Loaded { req: *req });
                false
            } else {
                true
            }
        });
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

    fn unfollow(&mut self, page: &PageId) {
        if !self.followed.remove(page) {
            return;
        }
        // The counter forgot this page's remote sum.
        self.sums_sent.remove(page);
        if self.settings.cluster.follow_linger.is_zero() {
            self.release(page);
        } else {
            self.lingering.insert(page.clone(), Instant::now());
        }
    }

    /// Drops the pages that lingered past `follow_linger`, and the oldest
    /// ones beyond `limits.max_pages`.
    fn sweep_linger(&mut self) {
        let linger = self.settings.cluster.follow_linger;
        let expired: Vec<PageId> = self
            .lingering
            .iter()
            .filter(|(_, since)| since.elapsed() >= linger)
            .map(|(p, _)| p.clone())
            .collect();
        for p in expired {
            self.release(&p);
        }
        let cap = self.settings.limits.max_pages;
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
    fn send_sums(&mut self, pages: &[PageId]) {
        let mut changes = Vec::new();
        for p in pages {
            if !self.followed.contains(p) {
                continue;
            }
            let s = self.remote.sum(p);
            if self.sums_sent.get(p) != Some(&s) {
                self.sums_sent.insert(p.clone(), s);
                changes.push((p.clone(), s));
            }
        }
        if !changes.is_empty() {
            self.counter.remote.do_send(RemoteCounts { changes });
        }
    }

    fn resend_all(&mut self) {
        self.sums_sent.clear();
        let all: Vec<PageId> = self.followed.iter().cloned().collect();
        self.send_sums(&all);
    }
}

impl Actor for Cluster {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let c = &self.settings.cluster;
        tracing::info!(process = %self.id.process, redis = %self.backend.describe(), "cluster mode");
        self.liveness = Some(liveness::Liveness::start(
            self.backend.clone(),
            self.keys.clone(),
            c.heartbeat_interval,
            c.node_ttl,
            ctx.address(),
        ));
        // Linger expiry also runs without heartbeats (Redis down).
        ctx.run_interval(c.heartbeat_interval, |act, _| act.sweep_linger());
        self.connect(ctx);
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        if let Some(l) = self.liveness.take() {
            l.stop();
        }
    }
}

impl StreamHandler<(u64, Option<PushInfo>)> for Cluster {
    fn handle(&mut self, (gen, push): (u64, Option<PushInfo>), ctx: &mut Context<Self>) {
        if gen != self.gen {
            return;
        }
        let Some(push) = push else {
            self.lost(ctx, gen, "pub/sub connection closed");
            return;
        };
        if push.kind == redis::PushKind::Disconnection {
            self.lost(ctx, gen, "connection to redis lost");
            return;
        }
        let Some((_, payload)) = store::message_of(&push) else {
            return;
        };
        m::cluster_received(1);
        let Ok(w) = serde_json::from_slice::<Wire>(payload) else {
            tracing::warn!("cluster: unreadable channel message ignored");
            return;
        };
        let Some(id) = NodeId::parse(&w.node) else {
            return;
        };
        let mut touched = Vec::new();
        for (page, connections, visitors) in w.pages {
            let Ok(page) = PageId::parse_link(&page) else {
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
        self.send_sums(&touched);
    }

    fn finished(&mut self, _: &mut Context<Self>) {
        // The end of one connection's pushes (handled above), not of the actor.
    }
}

impl Handler<Beat> for Cluster {
    type Result = ();
    fn handle(&mut self, msg: Beat, ctx: &mut Context<Self>) {
        if self.left {
            return;
        }
        match msg.reply {
            Ok(r) => self.on_view(ctx, msg.id, r),
            Err(e) => tracing::warn!(error = %e, "cluster: heartbeat failed"),
        }
    }
}

impl Handler<LocalCounts> for Cluster {
    type Result = ();
    fn handle(&mut self, msg: LocalCounts, ctx: &mut Context<Self>) {
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
        self.pump_write(ctx);
    }
}

impl Handler<Follow> for Cluster {
    type Result = ();
    fn handle(&mut self, msg: Follow, ctx: &mut Context<Self>) {
        let mut waiting = HashSet::new();
        for p in &msg.pages {
            self.followed.insert(p.clone());
            self.hold(p);
            if !self.loaded.contains(p) {
                waiting.insert(p.clone());
            }
        }
        self.send_sums(&msg.pages);
        if waiting.is_empty() || (self.link.is_none() && !self.starting) {
            // Loaded, or Redis is down: answer with what is known.
            self.counter.loaded.do_send(Loaded { req: msg.req });
        } else {
            self.waiters.push((msg.req, waiting));
        }
        self.pump_sync(ctx);
    }
}

impl Handler<Unfollow> for Cluster {
    type Result = ();
    fn handle(&mut self, msg: Unfollow, ctx: &mut Context<Self>) {
        for p in &msg.pages {
            self.unfollow(p);
        }
        self.pump_sync(ctx);
    }
}

impl Handler<SetFollowed> for Cluster {
    type Result = ();
    fn handle(&mut self, msg: SetFollowed, ctx: &mut Context<Self>) {
        let new: HashSet<PageId> = msg.pages.into_iter().collect();
        let gone: Vec<PageId> = self.followed.difference(&new).cloned().collect();
        for p in &gone {
            self.unfollow(p);
        }
        for p in &new {
            self.followed.insert(p.clone());
            self.hold(p);
        }
        self.resend_all();
        self.pump_sync(ctx);
    }
}

impl Handler<ResendRemote> for Cluster {
    type Result = ();
    fn handle(&mut self, msg: ResendRemote, _: &mut Context<Self>) {
        self.resend_all();
        self.counter.loaded.do_send(Loaded { req: msg.req });
    }
}

impl Handler<Fetch> for Cluster {
    type Result = ResponseActFuture<Self, Option<Vec<Tally>>>;
    fn handle(&mut self, msg: Fetch, _: &mut Context<Self>) -> Self::Result {
        let Some(link) = &self.link else {
            return Box::pin(fut::ready(None));
        };
        if !self.have_view {
            return Box::pin(fut::ready(None));
        }
        // Held pages answer from memory; the others in one round trip.
        let from_memory: Vec<bool> = msg.pages.iter().map(|p| self.loaded.contains(p)).collect();
        let ask: Vec<PageId> = msg
            .pages
            .iter()
            .zip(&from_memory)
            .filter(|(_, mem)| !**mem)
            .map(|(p, _)| p.clone())
            .collect();
        let (conn, keys) = (link.conn.clone(), self.keys.clone());
        let fut = async move {
            if ask.is_empty() {
                return Ok(Vec::new());
            }
            store::read_pages(&conn, &keys, &ask).await
        };
        Box::pin(fut.into_actor(self).map(move |r, act, _| {
            let maps = r.ok()?;
            let mut read = maps.into_iter();
            Some(
                msg.pages
                    .iter()
                    .zip(from_memory)
                    .map(|(p, mem)| {
                        if mem {
                            act.remote.sum(p)
                        } else {
                            read.next()
                                .map_or(Tally::ZERO, |f| table::sum_fields(&act.remote, &f))
                        }
                    })
                    .collect(),
            )
        }))
    }
}

impl Handler<Withdraw> for Cluster {
    type Result = ResponseFuture<bool>;
    fn handle(&mut self, _: Withdraw, ctx: &mut Context<Self>) -> Self::Result {
        if self.link.is_none() || !self.registered || self.left {
            return Box::pin(async { false });
        }
        let (tx, rx) = oneshot::channel();
        self.leave = Some(tx);
        if let Some(l) = &self.liveness {
            l.set_id(None);
        }
        self.pump_write(ctx);
        Box::pin(async move { rx.await.unwrap_or(false) })
    }
}
