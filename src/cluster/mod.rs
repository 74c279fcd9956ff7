//! Cluster mode: the only module that touches Redis.
//!
//! Present only when `cluster.redis_url` is set. The logic is a plain state
//! machine ([`machine`]: events in, Redis jobs out, no I/O, time passed in).
//! The [`Cluster`] actor (on its own arbiter, under [`actix::Supervisor`]) is
//! its shell: it feeds it the counter's messages, pub/sub messages,
//! heartbeats and timers, runs the jobs it returns as futures (so the actor
//! never waits on Redis and reads pub/sub as it arrives) and reports their
//! results back as events. The heartbeat runs on a thread and connection of
//! its own ([`liveness`]). Redis is one instance, or a Redis Cluster
//! (`cluster.redis_cluster`).
//!
//! Every handler and callback body runs through [`supervise::contain`]: a
//! panic is logged and counted, the actor stops, and the supervisor restarts
//! it with a fresh machine that registers the next incarnation (the previous
//! one is reaped), asks the counter for its whole local state
//! ([`ResendLocal`]) and follows and loads again; `/readyz` reports degraded
//! meanwhile.
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
//! A node id ([`table::NodeId`]) is `{process}.{incarnation}`. A node is
//! counted by another only while the other's last heartbeat snapshot shows
//! it live; a process that stalled past `node_ttl` deletes its old id's
//! fields and registers the next incarnation only after its old id expired,
//! so no snapshot holds both, and the remote table keeps one value per
//! process ([`table`]). A registration writes the fields first and adds the
//! id to the live set last, so a node that sees an id live finds its fields.
//! When Redis loses its data (restarted empty), the nodes that vanished with
//! it keep their last values as ghosts until they registered again (at most
//! `node_ttl`), so no count dips when Redis comes back empty. Page and node
//! ids read back from Redis are validated; a malformed one is skipped and
//! logged.

mod liveness;
mod machine;
mod store;
mod table;

use std::{
    cell::RefCell,
    collections::HashMap,
    rc::Rc,
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

use machine::{Event, Job, Machine, Write};
pub(crate) use store::Error;
use store::{Backend, BeatMode, BeatReply, Conn, Keys, Wire};
use table::NodeId;

use crate::{
    config::Settings,
    metrics as m,
    protocol::{PageId, Tally},
    storage::Storage,
    supervise::{self, ActorKind},
};

// ---------------------------------------------------------------- messages

/// Counter -> cluster: this node's local tallies that changed since the last
/// publish (coalesced by the counter). With `full`, the list is the whole local
/// state and every page not in it is zero (sent after a counter rebuild, and
/// when the cluster actor asks with [`ResendLocal`]).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct LocalCounts {
    /// `(page, local tally)`.
    pub(crate) changes: Vec<(PageId, Tally)>,
    /// The list replaces all local tallies.
    pub(crate) full: bool,
}

/// Counter -> cluster: these pages gained their first local follower room.
/// Answered with [`RemoteCounts`] for them, then [`Loaded`] with `req`.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Follow {
    /// Pages to load and follow.
    pub(crate) pages: Vec<PageId>,
    /// Echoed in [`Loaded`].
    pub(crate) req: u64,
}

/// Cluster -> counter: the current values of the pages of [`Follow`] `req`
/// were loaded and sent (or could not be: Redis is down); held subscribe
/// answers can go out.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub(crate) struct Loaded {
    /// The [`Follow`] request.
    pub(crate) req: u64,
}

/// Counter -> cluster: the other live nodes' tallies of pages this node does
/// not follow (HTTP reads); `None` while Redis is unreachable.
#[derive(Message, Debug)]
#[rtype(result = "Option<Vec<Tally>>")]
pub(crate) struct Fetch {
    /// Pages to read.
    pub(crate) pages: Vec<PageId>,
}

/// Counter -> cluster: these pages lost their last local follower room.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Unfollow {
    /// Pages no longer followed.
    pub(crate) pages: Vec<PageId>,
}

/// Counter -> cluster: after a counter rebuild (or on [`ResendLocal`]), the
/// whole set of followed pages (replaces the previous set; every followed
/// page's remote sum is re-sent once loaded).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct SetFollowed {
    /// Every page with a local follower room.
    pub(crate) pages: Vec<PageId>,
}

/// Counter -> cluster: a rebuild started; send the remote sums of every
/// followed page again (the cluster module kept them; the counter did not),
/// then [`Loaded`] with `req`.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct ResendRemote {
    /// Echoed in [`Loaded`].
    pub(crate) req: u64,
}

/// Cluster -> counter: the sum of the other live nodes' tallies of followed pages.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub(crate) struct RemoteCounts {
    /// `(page, sum over the other live nodes)`.
    pub(crate) changes: Vec<(PageId, Tally)>,
}

/// Cluster -> counter: the cluster actor was restarted and starts from
/// nothing: send the whole local state ([`LocalCounts`] with `full`) and the
/// followed set ([`SetFollowed`]) again.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub(crate) struct ResendLocal;

/// The counter's side of the cluster module: where [`RemoteCounts`],
/// [`Loaded`] and [`ResendLocal`] go.
struct ToCounter {
    remote: Recipient<RemoteCounts>,
    loaded: Recipient<Loaded>,
    resend: Recipient<ResendLocal>,
}

/// Server -> cluster at shutdown: remove this node's contributions at once
/// (fields, liveness, zeros published), then stop touching Redis.
#[derive(Message, Debug)]
#[rtype(result = "bool")]
pub(crate) struct Withdraw;

/// Liveness thread -> cluster: one heartbeat's outcome.
#[derive(Message, Debug)]
#[rtype(result = "()")]
struct Beat {
    /// The id it refreshed (`None`: observed only).
    id: Option<NodeId>,
    /// What Redis answered.
    reply: Result<BeatReply, String>,
}

/// Test hook: the next handler body panics (a real `panic!`), as a bug would.
#[cfg(feature = "test-hooks")]
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct InjectPanic;

// ---------------------------------------------------------------- health

/// Whether this node is currently in sync with the cluster (read by `/readyz`).
#[derive(Clone, Debug, Default)]
pub(crate) struct ClusterHealth {
    /// True while connected and registered.
    connected: Arc<AtomicBool>,
    /// True from a panic until the restarted actor is connected and registered.
    restarting: Arc<AtomicBool>,
}

impl ClusterHealth {
    /// True while the node is connected to Redis and registered.
    pub(crate) fn connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    /// True while the cluster actor restarts after a panic.
    pub(crate) fn restarting(&self) -> bool {
        self.restarting.load(Ordering::SeqCst)
    }

    /// Why the node is degraded, if it is (`/readyz`).
    pub(crate) fn degraded(&self) -> Option<&'static str> {
        if self.restarting() {
            Some("cluster: module restarting; serving local counts")
        } else if !self.connected() {
            Some("cluster: redis unreachable; serving local counts")
        } else {
            None
        }
    }

    fn set(&self, connected: bool) {
        self.connected.store(connected, Ordering::SeqCst);
        if connected {
            self.restarting.store(false, Ordering::SeqCst);
        }
    }
}

// ---------------------------------------------------------------- actor

/// Runs one write job on `conn` as `node` with sequence number `seq`;
/// returns the messages published and, for a join, the registration's
/// heartbeat snapshot.
async fn run_write(
    conn: Conn,
    keys: Keys,
    ttl: Duration,
    node: NodeId,
    seq: u64,
    write: Write,
) -> Result<(usize, Option<BeatReply>), Error> {
    match write {
        Write::Join {
            old,
            old_pages,
            ops,
        } => {
            for old in &old {
                store::reap(&conn, &keys, old, true).await?;
            }
            store::delete_fields(&conn, &keys, &old, &old_pages).await?;
            // Fields first, registration last: whoever sees the id live
            // finds its fields (nobody counts them before).
            let (groups, published) = store::write_groups(&keys, &node, seq, &ops);
            conn.run(groups).await?;
            let reply = store::heartbeat(&conn, &keys, Some(&node), BeatMode::Join, ttl).await?;
            if !reply.ok {
                return Err(Error::Reply(format!("node id {node} already registered")));
            }
            Ok((published, Some(reply)))
        }
        Write::Batch { ops } => {
            let (groups, published) = store::write_groups(&keys, &node, seq, &ops);
            conn.run(groups).await?;
            Ok((published, None))
        }
        Write::Withdraw { ops } => {
            let (groups, published) = store::write_groups(&keys, &node, seq, &ops);
            conn.run(groups).await?;
            store::reap(&conn, &keys, &node, true).await?;
            Ok((published, None))
        }
    }
}

/// Groups channel names by their slot group (one group per Redis Cluster slot).
fn by_group(keys: &Keys, names: Vec<String>) -> Vec<Vec<String>> {
    let mut m: HashMap<u32, Vec<String>> = HashMap::new();
    for n in names {
        m.entry(keys.group_of_channel(&n).unwrap_or(0))
            .or_default()
            .push(n);
    }
    m.into_values().collect()
}

/// A connection's pushes, read by its stream and drained before a reply.
type Pushes = Rc<RefCell<mpsc::UnboundedReceiver<PushInfo>>>;

/// The cluster module's actor: the [`Machine`] and the I/O around it.
pub struct Cluster {
    /// Timers, prefix, channel count, caps.
    settings: Arc<Settings>,
    /// Key and channel names.
    keys: Keys,
    /// How to connect.
    backend: Backend,
    /// Where remote sums, [`Loaded`] and [`ResendLocal`] go.
    counter: ToCounter,
    /// Where this node's identity is kept between runs.
    storage: Storage,
    /// Read by `/readyz`.
    health: ClusterHealth,
    /// The heartbeat thread.
    liveness: Option<liveness::Liveness>,
    /// The logic.
    machine: Machine,
    /// Jobs to run once the actor (re)started.
    first_jobs: Vec<Job>,
    /// The connection the machine is up on: (its number, it).
    conn: Option<(u64, Conn)>,
    /// That connection's pushes not yet handled (shared with its stream).
    pushes: Option<(u64, Pushes)>,
    /// Connected at least once (reconnects are counted).
    connected_before: bool,
    /// A graceful leave waiting for its end.
    leave: Option<oneshot::Sender<bool>>,
    /// Times the actor was started (a restart asks the counter for its state).
    starts: u64,
    /// Test hook: the next handler body panics.
    #[cfg(feature = "test-hooks")]
    panic_next: bool,
}

impl Cluster {
    /// Starts the actor under a supervisor on `arbiter`; returns it and its
    /// health flag. `counter` is the actor that takes [`RemoteCounts`],
    /// [`Loaded`] and [`ResendLocal`] (the counter, a layer above: the
    /// cluster keeps only those recipients).
    pub(crate) fn start<C>(
        settings: Arc<Settings>,
        counter: Addr<C>,
        storage: Storage,
        arbiter: &ArbiterHandle,
    ) -> anyhow::Result<(Addr<Cluster>, ClusterHealth)>
    where
        C: Handler<RemoteCounts> + Handler<Loaded> + Handler<ResendLocal>,
        C::Context:
            ToEnvelope<C, RemoteCounts> + ToEnvelope<C, Loaded> + ToEnvelope<C, ResendLocal>,
    {
        let counter = ToCounter {
            remote: counter.clone().recipient(),
            loaded: counter.clone().recipient(),
            resend: counter.recipient(),
        };
        let backend = Backend::new(&settings.cluster)?;
        let keys = Keys::new(&settings.cluster);
        // The identity of this data directory's last run, if any: its id may
        // still be live (a crash), so it is reaped before this run registers.
        let previous = match storage.cluster_identity() {
            Ok(previous) => previous,
            Err(e) => {
                tracing::warn!(error = %e, "cluster: previous identity unreadable; starting as a new process");
                None
            }
        };
        let previous = previous.and_then(|(p, i)| {
            let id = machine::identity(&p, i);
            if id.is_none() {
                tracing::warn!("cluster: previous identity malformed; starting as a new process");
            }
            id
        });
        let (id, registered) = match previous {
            Some(id) => (id, true),
            None => (
                NodeId {
                    process: store::fresh_process(),
                    incarnation: 0,
                },
                false,
            ),
        };
        let (machine, first_jobs) =
            Machine::new(machine_config(&settings), keys.clone(), id, registered, 0);
        let health = ClusterHealth::default();
        let h = health.clone();
        let addr = Supervisor::start_in_arbiter(arbiter, move |_| Cluster {
            keys,
            backend,
            counter,
            storage,
            health: h,
            liveness: None,
            machine,
            first_jobs,
            conn: None,
            pushes: None,
            connected_before: false,
            leave: None,
            starts: 0,
            #[cfg(feature = "test-hooks")]
            panic_next: false,
            settings,
        });
        Ok((addr, health))
    }

    /// Runs `f`, a handler's or callback's body, contained: a panic is
    /// logged and counted, and the actor stops for its supervisor to
    /// restart it with a fresh machine.
    fn contained(
        &mut self,
        ctx: &mut Context<Self>,
        handling: &'static str,
        f: impl FnOnce(&mut Self, &mut Context<Self>),
    ) {
        let r = supervise::contain(ActorKind::Cluster, handling, || {
            #[cfg(feature = "test-hooks")]
            if std::mem::take(&mut self.panic_next) {
                panic!("injected by test hook");
            }
            f(self, ctx)
        });
        if r.is_err() {
            self.health.restarting.store(true, Ordering::SeqCst);
            self.health.set(false);
            ctx.stop();
        }
    }

    /// Feeds one event to the machine and runs the jobs it returns.
    fn feed(&mut self, ctx: &mut Context<Self>, ev: Event) {
        let jobs = self.machine.handle(ev, Instant::now());
        self.run(ctx, jobs);
        self.health.set(self.machine.connected());
    }

    /// Feeds an event from a callback, contained.
    fn feed_contained(&mut self, ctx: &mut Context<Self>, handling: &'static str, ev: Event) {
        self.contained(ctx, handling, |act, ctx| act.feed(ctx, ev));
    }

    /// The connection jobs of connection `gen` run on.
    fn conn_of(&self, gen: u64) -> Option<Conn> {
        self.conn
            .as_ref()
            .filter(|(g, _)| *g == gen)
            .map(|(_, c)| c.clone())
    }

    fn run(&mut self, ctx: &mut Context<Self>, jobs: Vec<Job>) {
        for job in jobs {
            match job {
                Job::Connect { gen, check } => self.connect(ctx, gen, check),
                Job::RetryIn(d) => {
                    ctx.run_later(d, |act, ctx| {
                        act.feed_contained(ctx, "RetryDue", Event::RetryDue)
                    });
                }
                Job::Write {
                    gen,
                    node,
                    seq,
                    write,
                } => self.write(ctx, gen, node, seq, write),
                Job::Sync {
                    gen,
                    unsubscribe,
                    subscribe,
                    load,
                } => self.sync(ctx, gen, unsubscribe, subscribe, load),
                Job::Reap { gen, node } => self.reap(ctx, gen, node),
                Job::BeatAs(id) => {
                    if let Some(l) = &self.liveness {
                        l.set_id(id);
                    }
                }
                Job::SaveIdentity(id) => {
                    if let Err(e) = self
                        .storage
                        .save_cluster_identity(id.process.as_str(), id.incarnation)
                    {
                        tracing::warn!(error = %e, "cluster: identity not saved; after a crash this node's viewers may count twice until node_ttl");
                    }
                }
                Job::Remote(changes) => self.counter.remote.do_send(RemoteCounts { changes }),
                Job::Loaded(req) => self.counter.loaded.do_send(Loaded { req }),
                Job::Left(ok) => {
                    self.conn = None;
                    if let Some(l) = self.liveness.take() {
                        l.stop();
                    }
                    if let Some(done) = self.leave.take() {
                        let _ = done.send(ok);
                    }
                }
            }
        }
    }

    /// Opens connection `gen` (RESP3: pub/sub arrives as pushes on it) and
    /// checks whether `check` (this node's id) is still live.
    fn connect(&mut self, ctx: &mut Context<Self>, gen: u64, check: Option<NodeId>) {
        let (tx, rx) = mpsc::unbounded_channel::<PushInfo>();
        let (backend, keys) = (self.backend.clone(), self.keys.clone());
        let ttl = self.settings.cluster.node_ttl;
        let fut = async move {
            let conn = backend.connect(Some(tx)).await?;
            let reply = store::heartbeat(&conn, &keys, check.as_ref(), BeatMode::Beat, ttl).await?;
            Ok::<_, Error>((conn, check, reply))
        };
        ctx.spawn(fut.into_actor(self).map(move |r, act, ctx| {
            act.contained(ctx, "Connected", |act, ctx| match r {
                Ok((conn, checked, check)) => act.connected(ctx, gen, conn, rx, checked, check),
                Err(e) => act.feed(
                    ctx,
                    Event::ConnectFailed {
                        gen,
                        error: e.to_string(),
                    },
                ),
            });
        }));
    }

    fn connected(
        &mut self,
        ctx: &mut Context<Self>,
        gen: u64,
        conn: Conn,
        rx: mpsc::UnboundedReceiver<PushInfo>,
        checked: Option<NodeId>,
        check: BeatReply,
    ) {
        m::set_cluster_nodes(check.live.len());
        self.conn = Some((gen, conn));
        let rx: Pushes = Rc::new(RefCell::new(rx));
        self.pushes = Some((gen, rx.clone()));
        let pushes = futures_util::stream::poll_fn(move |cx| rx.borrow_mut().poll_recv(cx))
            .map(move |p| (gen, Some(p)))
            .chain(futures_util::stream::once(async move { (gen, None) }));
        ctx.add_stream(pushes);
        self.feed(
            ctx,
            Event::Connected {
                gen,
                checked,
                check,
            },
        );
        if self.machine.up() != Some(gen) {
            // Stale (a newer attempt, or left): dropped.
            self.conn = None;
            return;
        }
        if self.connected_before {
            m::redis_reconnected();
        }
        self.connected_before = true;
        tracing::info!(redis = %self.backend.describe(), "cluster: connected to redis");
    }

    fn write(&mut self, ctx: &mut Context<Self>, gen: u64, node: NodeId, seq: u64, write: Write) {
        let conn = self.conn_of(gen);
        let (keys, ttl) = (self.keys.clone(), self.settings.cluster.node_ttl);
        let started = Instant::now();
        let fut = async move {
            let conn = conn.ok_or(Error::NotConnected)?;
            run_write(conn, keys, ttl, node, seq, write).await
        };
        ctx.spawn(fut.into_actor(self).map(move |r, act, ctx| {
            let result = match r {
                Ok((published, joined)) => {
                    m::redis_rtt(m::RedisOp::Write, started.elapsed());
                    m::cluster_published(published);
                    if let Some(j) = &joined {
                        m::set_cluster_nodes(j.live.len());
                    }
                    Ok(joined)
                }
                Err(e) => Err(e.to_string()),
            };
            act.drain_pushes(ctx);
            act.feed_contained(ctx, "Written", Event::Written { result });
        }));
    }

    fn sync(
        &mut self,
        ctx: &mut Context<Self>,
        gen: u64,
        unsubscribe: Vec<String>,
        subscribe: Vec<String>,
        load: Vec<PageId>,
    ) {
        let conn = self.conn_of(gen);
        let keys = self.keys.clone();
        let (sub, unsub) = (by_group(&keys, subscribe), by_group(&keys, unsubscribe));
        let loading = !load.is_empty();
        let started = Instant::now();
        let fut = async move {
            let conn = conn.ok_or(Error::NotConnected)?;
            conn.subscription(unsub, false).await?;
            conn.subscription(sub, true).await?;
            store::read_pages(&conn, &keys, &load).await
        };
        ctx.spawn(fut.into_actor(self).map(move |r, act, ctx| {
            if r.is_ok() && loading {
                m::redis_rtt(m::RedisOp::Load, started.elapsed());
            }
            let result = r.map_err(|e| e.to_string());
            act.drain_pushes(ctx);
            act.feed_contained(ctx, "Synced", Event::Synced { result });
        }));
    }

    fn reap(&mut self, ctx: &mut Context<Self>, gen: u64, node: NodeId) {
        let conn = self.conn_of(gen);
        let keys = self.keys.clone();
        let fut = async move {
            let conn = conn.ok_or(Error::NotConnected)?;
            store::reap(&conn, &keys, &node, true).await
        };
        ctx.spawn(fut.into_actor(self).map(move |r, act, ctx| {
            if r.is_ok() {
                m::cluster_nodes_reaped(1);
            }
            let result = r.map_err(|e| e.to_string());
            act.drain_pushes(ctx);
            act.feed_contained(ctx, "Reaped", Event::Reaped { gen, result });
        }));
    }
}

/// The machine's settings.
fn machine_config(s: &Settings) -> machine::Config {
    machine::Config {
        node_ttl: s.cluster.node_ttl,
        follow_linger: s.cluster.follow_linger,
        max_pages: s.limits.max_pages,
    }
}

impl Actor for Cluster {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.starts += 1;
        let c = &self.settings.cluster;
        tracing::info!(process = %self.machine.id().process, redis = %self.backend.describe(), "cluster mode");
        self.liveness = Some(liveness::Liveness::start(
            self.backend.clone(),
            self.keys.clone(),
            c.heartbeat_interval,
            c.node_ttl,
            ctx.address(),
        ));
        // Linger and ghost expiry also run without heartbeats (Redis down).
        ctx.run_interval(c.heartbeat_interval, |act, ctx| {
            act.feed_contained(ctx, "Tick", Event::Tick)
        });
        let jobs = std::mem::take(&mut self.first_jobs);
        self.contained(ctx, "started", |act, ctx| act.run(ctx, jobs));
        if self.starts > 1 {
            // A fresh machine: the counter sends its whole state again.
            self.counter.resend.do_send(ResendLocal);
        }
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        if let Some(l) = self.liveness.take() {
            l.stop();
        }
    }
}

impl Supervised for Cluster {
    fn restarting(&mut self, _: &mut Context<Self>) {
        // The restart dropped the context's futures, streams and timers:
        // the connection and the heartbeat thread go, the machine starts
        // over from nothing but its identity (the current id may be
        // registered: reaped before the next incarnation registers).
        if let Some(l) = self.liveness.take() {
            l.stop();
        }
        self.conn = None;
        for req in self.machine.waiting_requests() {
            self.counter.loaded.do_send(Loaded { req });
        }
        let (machine, jobs) = self.machine.restarted();
        self.machine = machine;
        self.first_jobs = jobs;
        if let Some(done) = self.leave.take() {
            let _ = done.send(false);
        }
    }
}

impl Cluster {
    /// Handles what arrived on connection `gen` as a push (`None`: its end).
    fn on_push(&mut self, ctx: &mut Context<Self>, gen: u64, push: Option<PushInfo>) {
        self.contained(ctx, "PubSub", |act, ctx| {
            let Some(push) = push else {
                let error = "pub/sub connection closed".to_owned();
                return act.feed(ctx, Event::Lost { gen, error });
            };
            if push.kind == redis::PushKind::Disconnection {
                let error = "connection to redis lost".to_owned();
                return act.feed(ctx, Event::Lost { gen, error });
            }
            let Some((_, payload)) = store::message_of(&push) else {
                return;
            };
            m::cluster_received(1);
            match serde_json::from_slice::<Wire>(payload) {
                Ok(wire) => act.feed(ctx, Event::Message { gen, wire }),
                Err(_) => tracing::warn!("cluster: unreadable channel message ignored"),
            }
        });
    }

    /// Handles the pushes already received, before a command's reply: a
    /// connection delivers pushes and replies in the order Redis sent them,
    /// and the machine must see them in that order too. A message published
    /// before a load, handled after it, would put back a value the load no
    /// longer holds (a node's count that went to 0 since), and nothing
    /// would correct it until that node's next change of the page.
    fn drain_pushes(&mut self, ctx: &mut Context<Self>) {
        let Some((gen, rx)) = self.pushes.clone() else {
            return;
        };
        loop {
            let next = rx.borrow_mut().try_recv();
            match next {
                Ok(push) => self.on_push(ctx, gen, Some(push)),
                Err(_) => return,
            }
        }
    }
}

impl StreamHandler<(u64, Option<PushInfo>)> for Cluster {
    fn handle(&mut self, (gen, push): (u64, Option<PushInfo>), ctx: &mut Context<Self>) {
        self.on_push(ctx, gen, push);
    }

    fn finished(&mut self, _: &mut Context<Self>) {
        // The end of one connection's pushes (handled above), not of the actor.
    }
}

impl Handler<Beat> for Cluster {
    type Result = ();
    fn handle(&mut self, msg: Beat, ctx: &mut Context<Self>) {
        if let Ok(r) = &msg.reply {
            m::set_cluster_nodes(r.live.len());
        }
        let ev = Event::Beat {
            id: msg.id,
            reply: msg.reply,
        };
        self.feed_contained(ctx, "Beat", ev);
    }
}

/// Handlers that only feed their message to the machine.
macro_rules! feeds {
    ($($msg:ident),*) => {$(
        impl Handler<$msg> for Cluster {
            type Result = ();
            fn handle(&mut self, msg: $msg, ctx: &mut Context<Self>) {
                self.feed_contained(ctx, stringify!($msg), Event::$msg(msg));
            }
        }
    )*};
}

feeds!(Follow, Unfollow, SetFollowed, ResendRemote);

impl Handler<LocalCounts> for Cluster {
    type Result = ();
    fn handle(&mut self, msg: LocalCounts, ctx: &mut Context<Self>) {
        self.feed_contained(ctx, "LocalCounts", Event::Local(msg));
    }
}

impl Handler<Fetch> for Cluster {
    type Result = ResponseActFuture<Self, Option<Vec<Tally>>>;
    fn handle(&mut self, msg: Fetch, ctx: &mut Context<Self>) -> Self::Result {
        let mut conn = None;
        let mut from_memory = Vec::new();
        self.contained(ctx, "Fetch", |act, _| {
            conn = act.machine.readable().and_then(|gen| act.conn_of(gen));
            from_memory = msg.pages.iter().map(|p| act.machine.is_loaded(p)).collect();
        });
        let Some(conn) = conn else {
            return Box::pin(fut::ready(None));
        };
        // Held pages answer from memory; the others in one round trip.
        let ask: Vec<PageId> = msg
            .pages
            .iter()
            .zip(&from_memory)
            .filter(|(_, mem)| !**mem)
            .map(|(p, _)| p.clone())
            .collect();
        let keys = self.keys.clone();
        let fut = async move {
            if ask.is_empty() {
                return Ok(Vec::new());
            }
            store::read_pages(&conn, &keys, &ask).await
        };
        Box::pin(fut.into_actor(self).map(move |r, act, ctx| {
            let maps = r.ok()?;
            let mut read = maps.into_iter();
            let mut sums = None;
            act.contained(ctx, "Fetched", |act, _| {
                let each = msg.pages.iter().zip(from_memory).map(|(p, mem)| {
                    if mem {
                        act.machine.sum(p)
                    } else {
                        read.next()
                            .map_or(Tally::ZERO, |f| act.machine.sum_fields(&f))
                    }
                });
                sums = Some(each.collect());
            });
            sums
        }))
    }
}

impl Handler<Withdraw> for Cluster {
    type Result = ResponseFuture<bool>;
    fn handle(&mut self, _: Withdraw, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.leave = Some(tx);
        self.feed_contained(ctx, "Withdraw", Event::Withdraw);
        Box::pin(async move { rx.await.unwrap_or(false) })
    }
}

#[cfg(feature = "test-hooks")]
impl Handler<InjectPanic> for Cluster {
    type Result = ();
    fn handle(&mut self, _: InjectPanic, ctx: &mut Context<Self>) {
        self.panic_next = true;
        self.contained(ctx, "InjectPanic", |_, _| {});
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/readyz` is degraded while Redis is unreachable and while the
    /// actor restarts, until the rebuilt actor is connected and registered.
    #[test]
    fn health_reports_restarts_until_registered_again() {
        let h = ClusterHealth::default();
        assert!(h.degraded().is_some_and(|r| r.contains("unreachable")));
        h.set(true);
        assert_eq!(h.degraded(), None);
        h.restarting.store(true, Ordering::SeqCst);
        h.set(false);
        assert!(h.degraded().is_some_and(|r| r.contains("restarting")));
        h.set(false);
        assert!(h.restarting(), "still restarting until connected");
        h.set(true);
        assert!(!h.restarting() && h.degraded().is_none());
    }
}
