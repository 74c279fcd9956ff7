//! Cluster mode: the only module that touches Redis.
//!
//! Present only when `cluster.redis_url` is set. The [`Cluster`] actor is a
//! thin typed front on its own arbiter; its handlers forward to one driver
//! task (same arbiter) that owns the Redis connections and all cluster state.
//!
//! # Redis layout (`P` = `cluster.key_prefix`)
//! - `P page:{page}`: hash, field = node id, value = `"{seq}:{count}"`, that
//!   node's local count of the page (the field is deleted when it drops to 0).
//! - `P node:{id}`: liveness key, `PX node_ttl`, refreshed every `heartbeat_interval`.
//! - `P nodes`: set of node ids (to discover dead ones).
//! - `P node-pages:{id}`: set of pages where the node has a field (cleanup without SCAN).
//! - `P reap:{id}`: `SET NX PX` claim, so one survivor deletes a dead node's fields.
//! - `P ch:{k}`: pub/sub channel `k = fnv1a(page) % cluster.channels`. At most once
//!   per counter publish a node publishes, on each channel with changes, one JSON message
//!   `{"node":id,"seq":n,"pages":[[page,count],…]}`; nodes subscribe only to the
//!   channels of pages their rooms follow (reference-counted) and ignore other pages.
//!
//! The cluster count of a page is the sum over *live* nodes (liveness key
//! present) of their fields. Per-node `seq` is monotonic, and a value (from a
//! message or a hash field) is applied only if its seq is newer than the one
//! held for that (node, page), so stale or reordered data never wins.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use actix::prelude::*;
use futures_util::StreamExt;
use redis::{aio::ConnectionManager, AsyncCommands};
use tokio::sync::{mpsc, oneshot};

use crate::{config::Settings, counter::Counter, metrics as m, protocol::PageId};

// ---------------------------------------------------------------- messages

/// Counter -> cluster: this node's local counts that changed since the last
/// publish (coalesced by the counter). With `full`, the list is the whole local
/// state and every page not in it is 0 (sent after a counter rebuild).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct LocalCounts {
    /// `(page, local count)`.
    pub changes: Vec<(PageId, u64)>,
    /// The list replaces all local counts.
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

/// Counter -> cluster: the other live nodes' counts of pages this node does
/// not follow (HTTP reads); `None` while Redis is unreachable.
#[derive(Message, Debug)]
#[rtype(result = "Option<Vec<u64>>")]
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

/// Cluster -> counter: the sum of the other live nodes' counts of followed pages.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct RemoteCounts {
    /// `(page, sum over other live nodes)`.
    pub changes: Vec<(PageId, u64)>,
}

/// Server -> cluster at shutdown: remove this node's contributions at once
/// (fields, liveness, zeros published), then stop touching Redis.
#[derive(Message, Debug)]
#[rtype(result = "bool")]
pub struct Leave;

// ---------------------------------------------------------------- health

/// Whether this node is currently in sync with Redis (read by `/readyz`).
#[derive(Clone, Debug, Default)]
pub struct ClusterHealth {
    /// True while connected, registered and caught up.
    connected: Arc<AtomicBool>,
}

impl ClusterHealth {
    /// True while the node is connected to Redis and its state is current.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    fn set(&self, v: bool) {
        self.connected.store(v, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------- actor

/// What the driver task receives.
enum Cmd {
    Local(LocalCounts),
    Follow(Vec<PageId>, u64),
    Fetch(Vec<PageId>, oneshot::Sender<Option<Vec<u64>>>),
    Unfollow(Vec<PageId>),
    SetFollowed(Vec<PageId>),
    Resend(u64),
    Leave(oneshot::Sender<bool>),
}

/// The typed front of the cluster driver.
pub struct Cluster {
    /// To the driver task (unbounded: the counter sends at most a few
    /// messages per publish, and the driver drains them even while Redis is down).
    tx: mpsc::UnboundedSender<Cmd>,
}

impl Actor for Cluster {
    type Context = Context<Self>;
}

impl Cluster {
    /// Starts the driver and the actor on `arbiter`; returns the actor and its health flag.
    pub fn start(
        settings: Arc<Settings>,
        counter: Addr<Counter>,
        arbiter: &ArbiterHandle,
    ) -> anyhow::Result<(Addr<Cluster>, ClusterHealth)> {
        let client = redis::Client::open(settings.cluster.redis_url.as_str())?;
        let health = ClusterHealth::default();
        let (tx, rx) = mpsc::unbounded_channel();
        let driver = Driver::new(settings, client, counter, health.clone());
        arbiter.spawn(driver.run(rx));
        let addr = Cluster::start_in_arbiter(arbiter, move |_| Cluster { tx });
        Ok((addr, health))
    }
}

impl Handler<LocalCounts> for Cluster {
    type Result = ();
    fn handle(&mut self, msg: LocalCounts, _: &mut Context<Self>) {
        let _ = self.tx.send(Cmd::Local(msg));
    }
}

impl Handler<Follow> for Cluster {
    type Result = ();
    fn handle(&mut self, msg: Follow, _: &mut Context<Self>) {
        let _ = self.tx.send(Cmd::Follow(msg.pages, msg.req));
    }
}

impl Handler<Fetch> for Cluster {
    type Result = ResponseFuture<Option<Vec<u64>>>;
    fn handle(&mut self, msg: Fetch, _: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        let sent = self.tx.send(Cmd::Fetch(msg.pages, tx)).is_ok();
        Box::pin(async move {
            if !sent {
                return None;
            }
            rx.await.ok().flatten()
        })
    }
}

impl Handler<Unfollow> for Cluster {
    type Result = ();
    fn handle(&mut self, msg: Unfollow, _: &mut Context<Self>) {
        let _ = self.tx.send(Cmd::Unfollow(msg.pages));
    }
}

impl Handler<SetFollowed> for Cluster {
    type Result = ();
    fn handle(&mut self, msg: SetFollowed, _: &mut Context<Self>) {
        let _ = self.tx.send(Cmd::SetFollowed(msg.pages));
    }
}

impl Handler<ResendRemote> for Cluster {
    type Result = ();
    fn handle(&mut self, msg: ResendRemote, _: &mut Context<Self>) {
        let _ = self.tx.send(Cmd::Resend(msg.req));
    }
}

impl Handler<Leave> for Cluster {
    type Result = ResponseFuture<bool>;
    fn handle(&mut self, _: Leave, _: &mut Context<Self>) -> Self::Result {
        let (done_tx, done_rx) = oneshot::channel();
        let sent = self.tx.send(Cmd::Leave(done_tx)).is_ok();
        Box::pin(async move { sent && done_rx.await.unwrap_or(false) })
    }
}

// ---------------------------------------------------------------- driver

/// First reconnect delay; doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between reconnect attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Dead node ids remembered to ignore their late messages.
const MAX_DEAD_REMEMBERED: usize = 10_000;
/// Deadline of one Redis command (a hung Redis counts as down).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// One page-count message on a channel.
#[derive(serde::Serialize, serde::Deserialize)]
struct Wire {
    /// Sender's node id.
    node: String,
    /// Sender's sequence number (monotonic per node).
    seq: u64,
    /// `(page, sender's local count)`.
    pages: Vec<(String, u64)>,
}

/// Why the run loop ended.
enum Exit {
    /// Redis failed; reconnect.
    Lost(String),
    /// The node left (shutdown) or the actor is gone.
    Stop,
}

/// The other nodes' values of followed pages: page -> node -> (seq, count).
#[derive(Default)]
struct RemoteTable(HashMap<PageId, HashMap<String, (u64, u64)>>);

impl RemoteTable {
    /// Stores `node`'s value unless the one held has the same or a newer
    /// `seq` (stale or reordered data never wins); true if stored.
    fn apply(&mut self, page: &PageId, node: &str, seq: u64, count: u64) -> bool {
        let m = self.0.entry(page.clone()).or_default();
        match m.get(node) {
            Some((s, _)) if *s >= seq => false,
            _ => {
                m.insert(node.to_string(), (seq, count));
                true
            }
        }
    }

    /// Sum over the nodes held for `page`.
    fn sum(&self, page: &PageId) -> u64 {
        self.0
            .get(page)
            .map_or(0, |m| m.values().map(|(_, c)| c).sum())
    }

    /// Drops every node not in `live`; returns the pages that lost one.
    fn retain_live(&mut self, live: &HashSet<String>) -> Vec<PageId> {
        let mut affected = Vec::new();
        for (page, m) in self.0.iter_mut() {
            let before = m.len();
            m.retain(|n, _| live.contains(n));
            if m.len() != before {
                affected.push(page.clone());
            }
        }
        affected
    }

    fn remove(&mut self, page: &PageId) {
        self.0.remove(page);
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// Owns all cluster state and the Redis connections.
struct Driver {
    /// Timers, prefix, channel count.
    settings: Arc<Settings>,
    /// Redis client (connection factory).
    client: redis::Client,
    /// Where remote sums go.
    counter: Addr<Counter>,
    /// Read by `/readyz`.
    health: ClusterHealth,
    /// This node's id; fresh per process start, and replaced if Redis lost it.
    node: String,
    /// Last sequence number used.
    seq: u64,
    /// This node's non-zero local counts.
    local: HashMap<PageId, u64>,
    /// Own pages changed but not yet written to Redis.
    dirty: HashSet<PageId>,
    /// Pages local rooms follow.
    followed: HashSet<PageId>,
    /// Followed pages per channel (reference counts of subscriptions).
    channel_refs: HashMap<u32, usize>,
    /// Channels the current pub/sub connection is subscribed to.
    subscribed: HashSet<u32>,
    /// Followed page -> other node -> (seq, count).
    remote: RemoteTable,
    /// Remote sum last sent to the counter per followed page.
    sums_sent: HashMap<PageId, u64>,
    /// True once this id was registered in Redis (a lost registration then means a new id).
    registered: bool,
    /// Nodes found dead; their messages are ignored (ids are never reused).
    dead: HashSet<String>,
    /// Commands connection (None while disconnected).
    conn: Option<ConnectionManager>,
    /// Subscribe side of the pub/sub connection.
    sink: Option<redis::aio::PubSubSink>,
}

/// A fresh node id: time, pid and a process-local counter.
fn fresh_node_id() -> String {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!(
        "{:x}-{:x}-{}",
        nanos,
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Stable hash of a page id (FNV-1a), identical on every node and version.
fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The Redis URL without its password, for logs.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
        _ => url.to_string(),
    }
}

/// Parses a hash field value `"{seq}:{count}"`.
fn parse_field(v: &str) -> Option<(u64, u64)> {
    let (s, c) = v.split_once(':')?;
    Some((s.parse().ok()?, c.parse().ok()?))
}

async fn timed<T>(
    fut: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(COMMAND_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("redis command timed out".into()),
    }
}

impl Driver {
    fn new(
        settings: Arc<Settings>,
        client: redis::Client,
        counter: Addr<Counter>,
        health: ClusterHealth,
    ) -> Driver {
        Driver {
            settings,
            client,
            counter,
            health,
            node: fresh_node_id(),
            seq: 0,
            local: HashMap::new(),
            dirty: HashSet::new(),
            followed: HashSet::new(),
            channel_refs: HashMap::new(),
            subscribed: HashSet::new(),
            remote: RemoteTable::default(),
            sums_sent: HashMap::new(),
            dead: HashSet::new(),
            registered: false,
            conn: None,
            sink: None,
        }
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.settings.cluster.key_prefix)
    }

    fn page_key(&self, page: &str) -> String {
        self.key(&format!("page:{page}"))
    }

    fn node_key(&self, node: &str) -> String {
        self.key(&format!("node:{node}"))
    }

    fn node_pages_key(&self, node: &str) -> String {
        self.key(&format!("node-pages:{node}"))
    }

    fn channel_of(&self, page: &str) -> u32 {
        (fnv1a(page) % u64::from(self.settings.cluster.channels.max(1))) as u32
    }

    fn channel_name(&self, ch: u32) -> String {
        self.key(&format!("ch:{ch}"))
    }

    fn ttl_ms(&self) -> u64 {
        self.settings.cluster.node_ttl.as_millis() as u64
    }

    /// The main loop: connect (with backoff), run until Redis fails, repeat.
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        tracing::info!(node = %self.node, redis = %redacted(&self.settings.cluster.redis_url), "cluster mode");
        let mut backoff = BACKOFF_MIN;
        let mut connected_before = false;
        loop {
            let exit = match self.connect().await {
                Ok(stream) => {
                    backoff = BACKOFF_MIN;
                    if connected_before {
                        m::redis_reconnected();
                    }
                    connected_before = true;
                    self.health.set(true);
                    tracing::info!(node = %self.node, "cluster: connected to redis");
                    self.serve(&mut rx, stream).await
                }
                Err(e) => Exit::Lost(e),
            };
            self.health.set(false);
            self.conn = None;
            self.sink = None;
            self.subscribed.clear();
            match exit {
                Exit::Stop => return,
                Exit::Lost(why) => {
                    tracing::warn!(error = %why, retry_in = ?backoff, "cluster: redis unreachable; serving local counts");
                }
            }
            // Keep applying the counter's messages while waiting to retry.
            let sleep = tokio::time::sleep(backoff);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    cmd = rx.recv() => match cmd {
                        None => return,
                        Some(Cmd::Leave(done)) => {
                            let _ = done.send(false);
                            return;
                        }
                        Some(cmd) => self.apply_offline(cmd),
                    }
                }
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Applies a command while disconnected (state only; Redis is written on reconnect).
    fn apply_offline(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Local(m) => self.note_local(m),
            Cmd::Follow(pages, req) => {
                for p in pages {
                    self.add_follow(p);
                }
                self.counter.do_send(Loaded { req });
            }
            Cmd::Fetch(_, reply) => {
                let _ = reply.send(None);
            }
            Cmd::Unfollow(pages) => {
                self.drop_follows(pages);
            }
            Cmd::SetFollowed(pages) => {
                let (add, gone) = self.diff_followed(pages);
                self.drop_follows(gone);
                for p in add {
                    self.add_follow(p);
                }
                // Frozen remote values are re-sent so a rebuilt counter shows them.
                let all: Vec<PageId> = self.followed.iter().cloned().collect();
                self.sums_sent.clear();
                self.send_sums(&all);
            }
            Cmd::Resend(req) => self.resend(req),
            Cmd::Leave(done) => {
                let _ = done.send(false);
            }
        }
    }

    /// Sends the counter every followed page's current remote sum, then `Loaded`.
    fn resend(&mut self, req: u64) {
        self.sums_sent.clear();
        let all: Vec<PageId> = self.followed.iter().cloned().collect();
        self.send_sums(&all);
        self.counter.do_send(Loaded { req });
    }

    fn note_local(&mut self, m: LocalCounts) {
        if m.full {
            let new: HashSet<PageId> = m.changes.iter().map(|(p, _)| p.clone()).collect();
            let gone: Vec<PageId> = self
                .local
                .keys()
                .filter(|p| !new.contains(*p))
                .cloned()
                .collect();
            for p in gone {
                self.local.remove(&p);
                self.dirty.insert(p);
            }
        }
        for (p, c) in m.changes {
            let old = self.local.get(&p).copied().unwrap_or(0);
            if old == c {
                continue;
            }
            if c == 0 {
                self.local.remove(&p);
            } else {
                self.local.insert(p.clone(), c);
            }
            self.dirty.insert(p);
        }
    }

    /// Records a followed page; true if it is new.
    fn add_follow(&mut self, page: PageId) -> bool {
        if !self.followed.insert(page.clone()) {
            return false;
        }
        let ch = self.channel_of(&page);
        *self.channel_refs.entry(ch).or_default() += 1;
        true
    }

    /// Forgets followed pages; returns channels whose last page went.
    fn drop_follows(&mut self, pages: Vec<PageId>) -> Vec<u32> {
        let mut empty = Vec::new();
        for p in pages {
            if !self.followed.remove(&p) {
                continue;
            }
            self.remote.remove(&p);
            self.sums_sent.remove(&p);
            let ch = self.channel_of(&p);
            if let Some(n) = self.channel_refs.get_mut(&ch) {
                *n -= 1;
                if *n == 0 {
                    self.channel_refs.remove(&ch);
                    empty.push(ch);
                }
            }
        }
        empty
    }

    fn diff_followed(&self, pages: Vec<PageId>) -> (Vec<PageId>, Vec<PageId>) {
        let new: HashSet<PageId> = pages.into_iter().collect();
        let gone = self
            .followed
            .iter()
            .filter(|p| !new.contains(*p))
            .cloned()
            .collect();
        let add = new
            .into_iter()
            .filter(|p| !self.followed.contains(p))
            .collect();
        (add, gone)
    }

    /// Sends the counter the remote sums of `pages` that changed.
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
            self.counter.do_send(RemoteCounts { changes });
        }
    }

    /// Applies one node's value for a page if newer; true if it changed anything.
    fn apply_remote(&mut self, page: &PageId, node: &str, seq: u64, count: u64) -> bool {
        if node == self.node || self.dead.contains(node) || !self.followed.contains(page) {
            return false;
        }
        self.remote.apply(page, node, seq, count)
    }

    /// Connects, registers (fresh id if Redis lost ours), subscribes, re-asserts
    /// own counts and reloads followed pages. Returns the message stream.
    async fn connect(&mut self) -> Result<redis::aio::PubSubStream, String> {
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(1);
        let mut conn = timed(ConnectionManager::new_with_config(self.client.clone(), cfg)).await?;
        let pubsub = timed(self.client.get_async_pubsub()).await?;
        let (sink, stream) = pubsub.split();
        self.conn = Some(conn.clone());
        self.sink = Some(sink);
        // Identity: keep our id only if its liveness key survived.
        let kept: Option<String> = timed(
            redis::cmd("SET")
                .arg(self.node_key(&self.node))
                .arg(1)
                .arg("PX")
                .arg(self.ttl_ms())
                .arg("XX")
                .query_async(&mut conn),
        )
        .await?;
        if kept.is_none() {
            if self.registered {
                // Others consider the old id dead (or Redis lost its data):
                // never resurrect it, take a new one.
                let old = std::mem::replace(&mut self.node, fresh_node_id());
                tracing::warn!(old = %old, new = %self.node, "cluster: node key gone from redis; new node id");
                // Our old fields are ghosts now: delete them ourselves.
                self.reap(&old).await?;
            }
            // Everything local must be written under the (new) id.
            self.dirty.extend(self.local.keys().cloned());
        }
        self.registered = true;
        let mut p = redis::pipe();
        p.cmd("SET")
            .arg(self.node_key(&self.node))
            .arg(1)
            .arg("PX")
            .arg(self.ttl_ms())
            .ignore()
            .sadd(self.key("nodes"), &self.node)
            .ignore();
        timed(p.query_async::<()>(&mut conn)).await?;
        // Subscribe before loading, so no change falls between load and messages.
        let chans: Vec<u32> = self.channel_refs.keys().copied().collect();
        self.subscribe(&chans).await?;
        self.reassert().await?;
        let all: Vec<PageId> = self.followed.iter().cloned().collect();
        self.remote.clear();
        self.load(&all).await?;
        Ok(stream)
    }

    async fn subscribe(&mut self, chans: &[u32]) -> Result<(), String> {
        let names: Vec<String> = chans
            .iter()
            .filter(|c| !self.subscribed.contains(c))
            .map(|c| self.channel_name(*c))
            .collect();
        if names.is_empty() {
            return Ok(());
        }
        let Some(sink) = self.sink.as_mut() else {
            return Err("not connected".into());
        };
        timed(sink.subscribe(&names)).await?;
        self.subscribed.extend(chans.iter().copied());
        Ok(())
    }

    async fn unsubscribe(&mut self, chans: &[u32]) -> Result<(), String> {
        let chans: Vec<u32> = chans
            .iter()
            .copied()
            .filter(|c| self.subscribed.contains(c))
            .collect();
        if chans.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = chans.iter().map(|c| self.channel_name(*c)).collect();
        let Some(sink) = self.sink.as_mut() else {
            return Err("not connected".into());
        };
        timed(sink.unsubscribe(&names)).await?;
        for c in chans {
            self.subscribed.remove(&c);
        }
        Ok(())
    }

    /// Writes every own count again (fields, page set) and publishes them: pub/sub
    /// messages sent during a gap are lost, and Redis may have lost its data.
    async fn reassert(&mut self) -> Result<(), String> {
        let conn = self.conn.as_mut().ok_or("not connected")?;
        let np = format!(
            "{}node-pages:{}",
            self.settings.cluster.key_prefix, self.node
        );
        let listed: Vec<String> = timed(conn.smembers(&np)).await?;
        let mut pages: HashSet<PageId> = self.local.keys().cloned().collect();
        pages.extend(listed.into_iter().map(PageId::from));
        pages.extend(self.dirty.drain());
        let pages: Vec<PageId> = pages.into_iter().collect();
        self.write(&pages).await
    }

    /// Writes and publishes own counts of `pages` (0 = delete the field).
    async fn write(&mut self, pages: &[PageId]) -> Result<(), String> {
        if pages.is_empty() {
            return Ok(());
        }
        self.seq += 1;
        let seq = self.seq;
        let np = self.node_pages_key(&self.node);
        let mut p = redis::pipe();
        p.atomic();
        let mut by_channel: HashMap<u32, Vec<(String, u64)>> = HashMap::new();
        for page in pages {
            let c = self.local.get(page).copied().unwrap_or(0);
            let key = self.page_key(page);
            if c == 0 {
                p.hdel(&key, &self.node).ignore();
                p.srem(&np, &**page).ignore();
            } else {
                p.hset(&key, &self.node, format!("{seq}:{c}")).ignore();
                p.sadd(&np, &**page).ignore();
            }
            by_channel
                .entry(self.channel_of(page))
                .or_default()
                .push((page.to_string(), c));
        }
        let published = by_channel.len();
        for (ch, pages) in by_channel {
            let wire = Wire {
                node: self.node.clone(),
                seq,
                pages,
            };
            // Serializing a struct of strings and integers cannot fail.
            let json = serde_json::to_string(&wire).expect("plain struct serializes");
            p.publish(self.channel_name(ch), json).ignore();
        }
        let conn = self.conn.as_mut().ok_or("not connected")?;
        let started = std::time::Instant::now();
        match timed(p.query_async::<()>(conn)).await {
            Ok(()) => {
                m::redis_rtt("write", started.elapsed());
                m::cluster_published(published);
                Ok(())
            }
            Err(e) => {
                // Written again on reconnect.
                self.dirty.extend(pages.iter().cloned());
                Err(e)
            }
        }
    }

    /// The set of live node ids (in `nodes` with a liveness key).
    async fn live_nodes(&mut self) -> Result<(HashSet<String>, Vec<String>), String> {
        let nodes_key = self.key("nodes");
        let conn = self.conn.as_mut().ok_or("not connected")?;
        let members: Vec<String> = timed(conn.smembers(&nodes_key)).await?;
        let mut p = redis::pipe();
        for n in &members {
            p.exists(format!("{}node:{n}", self.settings.cluster.key_prefix));
        }
        let alive: Vec<bool> = if members.is_empty() {
            Vec::new()
        } else {
            timed(p.query_async(conn)).await?
        };
        let mut live = HashSet::new();
        let mut dead = Vec::new();
        for (n, a) in members.into_iter().zip(alive) {
            if a {
                live.insert(n);
            } else {
                dead.push(n);
            }
        }
        Ok((live, dead))
    }

    /// Loads the current per-node values of `pages` from Redis (live nodes only)
    /// and sends the counter the changed sums.
    async fn load(&mut self, pages: &[PageId]) -> Result<(), String> {
        if pages.is_empty() {
            return Ok(());
        }
        let (live, maps) = self.read_pages(pages).await?;
        for (page, fields) in pages.iter().zip(maps) {
            for (node, v) in fields {
                if !live.contains(&node) {
                    continue;
                }
                if let Some((seq, count)) = parse_field(&v) {
                    self.apply_remote(page, &node, seq, count);
                }
            }
        }
        self.send_sums(pages);
        Ok(())
    }

    /// The live node ids and, per page, its hash of `node -> "seq:count"` fields.
    async fn read_pages(
        &mut self,
        pages: &[PageId],
    ) -> Result<(HashSet<String>, Vec<HashMap<String, String>>), String> {
        let (live, _) = self.live_nodes().await?;
        let mut p = redis::pipe();
        for page in pages {
            p.hgetall(self.page_key(page));
        }
        let conn = self.conn.as_mut().ok_or("not connected")?;
        let maps = timed(p.query_async(conn)).await?;
        Ok((live, maps))
    }

    /// The other live nodes' counts of `pages`, read from Redis (not kept).
    async fn fetch(&mut self, pages: &[PageId]) -> Result<Vec<u64>, String> {
        if pages.is_empty() {
            return Ok(Vec::new());
        }
        let (live, maps) = self.read_pages(pages).await?;
        Ok(maps
            .into_iter()
            .map(|fields| {
                fields
                    .into_iter()
                    .filter(|(n, _)| *n != self.node && live.contains(n))
                    .filter_map(|(_, v)| parse_field(&v))
                    .map(|(_, c)| c)
                    .sum()
            })
            .collect())
    }

    /// Heartbeat: refresh our liveness key, find dead nodes, drop and reap them.
    async fn heartbeat(&mut self) -> Result<(), String> {
        let key = self.node_key(&self.node);
        let ttl = self.ttl_ms();
        let conn = self.conn.as_mut().ok_or("not connected")?;
        let started = std::time::Instant::now();
        let kept: Option<String> = timed(
            redis::cmd("SET")
                .arg(&key)
                .arg(1)
                .arg("PX")
                .arg(ttl)
                .arg("XX")
                .query_async(conn),
        )
        .await?;
        m::redis_rtt("heartbeat", started.elapsed());
        if kept.is_none() {
            return Err("this node's liveness key expired".into());
        }
        if !self.dirty.is_empty() {
            let pages: Vec<PageId> = self.dirty.drain().collect();
            self.write(&pages).await?;
        }
        let (live, dead) = self.live_nodes().await?;
        m::set_cluster_nodes(live.len());
        // Drop every contribution of a node that is not live.
        let affected = self.remote.retain_live(&live);
        if !affected.is_empty() {
            tracing::info!(
                pages = affected.len(),
                "cluster: dropped dead nodes' counts"
            );
            self.send_sums(&affected);
        }
        if self.dead.len() > MAX_DEAD_REMEMBERED {
            // Only an optimisation (late messages of a dead node are also
            // dropped by the next heartbeat's liveness check): keep it bounded.
            self.dead.clear();
        }
        for n in dead {
            if n != self.node {
                self.dead.insert(n.clone());
                let claim = self.key(&format!("reap:{n}"));
                let conn = self.conn.as_mut().ok_or("not connected")?;
                let won: Option<String> = timed(
                    redis::cmd("SET")
                        .arg(&claim)
                        .arg(&self.node)
                        .arg("NX")
                        .arg("PX")
                        .arg(ttl.max(1000) * 2)
                        .query_async(conn),
                )
                .await?;
                if won.is_some() {
                    tracing::info!(node = %n, "cluster: reaping dead node");
                    self.reap(&n).await?;
                    m::cluster_nodes_reaped(1);
                }
            }
        }
        Ok(())
    }

    /// Deletes every field of `node` and its registration.
    async fn reap(&mut self, node: &str) -> Result<(), String> {
        let np = self.node_pages_key(node);
        let nodes_key = self.key("nodes");
        let conn = self.conn.as_mut().ok_or("not connected")?;
        let pages: Vec<String> = timed(conn.smembers(&np)).await?;
        let mut p = redis::pipe();
        for page in &pages {
            p.hdel(
                format!("{}page:{page}", self.settings.cluster.key_prefix),
                node,
            )
            .ignore();
        }
        p.del(&np).ignore().srem(&nodes_key, node).ignore();
        timed(p.query_async::<()>(conn)).await
    }

    /// Removes this node's contributions at once (graceful shutdown).
    async fn leave(&mut self) -> Result<(), String> {
        let mut pages: HashSet<PageId> = self.local.keys().cloned().collect();
        pages.extend(self.dirty.drain());
        let pages: Vec<PageId> = pages.into_iter().collect();
        self.local.clear();
        // Zeros are published, fields deleted.
        self.write(&pages).await?;
        let node = self.node.clone();
        let key = self.node_key(&node);
        self.reap(&node).await?;
        let conn = self.conn.as_mut().ok_or("not connected")?;
        timed(conn.del::<_, ()>(&key)).await
    }

    /// Runs while connected: counter commands, channel messages, heartbeats.
    async fn serve(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<Cmd>,
        mut stream: redis::aio::PubSubStream,
    ) -> Exit {
        let mut beat = tokio::time::interval(self.settings.cluster.heartbeat_interval);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        beat.tick().await;
        loop {
            // Biased: queued commands are applied first, so when Redis is slow
            // the local changes of several ticks go out in one write.
            let r = tokio::select! {
                biased;
                cmd = rx.recv() => match cmd {
                    None => return Exit::Stop,
                    Some(Cmd::Leave(done)) => {
                        let ok = match self.leave().await {
                            Ok(()) => true,
                            Err(e) => {
                                tracing::error!(error = %e, "cluster: leave failed; others drop this node within node_ttl");
                                false
                            }
                        };
                        self.health.set(false);
                        let _ = done.send(ok);
                        return Exit::Stop;
                    }
                    Some(cmd) => self.handle(cmd).await,
                },
                _ = std::future::ready(()), if !self.dirty.is_empty() => {
                    let pages: Vec<PageId> = self.dirty.drain().collect();
                    self.write(&pages).await
                }
                _ = beat.tick() => self.heartbeat().await,
                msg = stream.next() => match msg {
                    None => Err("pub/sub connection closed".into()),
                    Some(m) => {
                        self.on_message(m.get_payload_bytes());
                        Ok(())
                    }
                },
            };
            if let Err(e) = r {
                return Exit::Lost(e);
            }
        }
    }

    async fn handle(&mut self, cmd: Cmd) -> Result<(), String> {
        match cmd {
            Cmd::Local(m) => {
                // Written by the serve loop once no command is queued.
                self.note_local(m);
                Ok(())
            }
            Cmd::Follow(pages, req) => {
                let new: Vec<PageId> = pages
                    .into_iter()
                    .filter(|p| self.add_follow(p.clone()))
                    .collect();
                let chans: Vec<u32> = new.iter().map(|p| self.channel_of(p)).collect();
                let mut r = self.subscribe(&chans).await;
                if r.is_ok() {
                    r = self.load(&new).await;
                }
                // After the RemoteCounts of `load`, even on failure.
                self.counter.do_send(Loaded { req });
                r
            }
            Cmd::Fetch(pages, reply) => match self.fetch(&pages).await {
                Ok(sums) => {
                    let _ = reply.send(Some(sums));
                    Ok(())
                }
                Err(e) => {
                    let _ = reply.send(None);
                    Err(e)
                }
            },
            Cmd::Unfollow(pages) => {
                let empty = self.drop_follows(pages);
                self.unsubscribe(&empty).await
            }
            Cmd::SetFollowed(pages) => {
                let (add, gone) = self.diff_followed(pages);
                let empty = self.drop_follows(gone);
                self.unsubscribe(&empty).await?;
                for p in &add {
                    self.add_follow(p.clone());
                }
                let chans: Vec<u32> = add.iter().map(|p| self.channel_of(p)).collect();
                self.subscribe(&chans).await?;
                self.sums_sent.clear();
                self.load(&add).await?;
                let all: Vec<PageId> = self.followed.iter().cloned().collect();
                self.send_sums(&all);
                Ok(())
            }
            Cmd::Resend(req) => {
                self.resend(req);
                Ok(())
            }
            Cmd::Leave(done) => {
                let _ = done.send(false);
                Ok(())
            }
        }
    }

    fn on_message(&mut self, payload: &[u8]) {
        m::cluster_received(1);
        let Ok(w) = serde_json::from_slice::<Wire>(payload) else {
            tracing::warn!("cluster: unreadable channel message ignored");
            return;
        };
        let mut touched = Vec::new();
        for (page, count) in w.pages {
            let page = PageId::from(page.as_str());
            if self.apply_remote(&page, &w.node, w.seq, count) {
                touched.push(page);
            }
        }
        self.send_sums(&touched);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stale or reordered value never overwrites a newer one, whether it
    /// comes from a message or from a hash field loaded later.
    #[test]
    fn older_seq_never_wins() {
        let mut t = RemoteTable::default();
        let x = PageId::from("x");
        assert!(t.apply(&x, "a", 5, 3));
        assert!(!t.apply(&x, "a", 4, 9), "older seq ignored");
        assert!(!t.apply(&x, "a", 5, 9), "same seq ignored");
        assert!(t.apply(&x, "b", 1, 2));
        assert_eq!(t.sum(&x), 5);
        assert!(t.apply(&x, "a", 6, 0));
        assert_eq!(t.sum(&x), 2);
    }

    /// Dead nodes' contributions are dropped and the affected pages reported.
    #[test]
    fn dead_nodes_are_dropped() {
        let mut t = RemoteTable::default();
        let (x, y) = (PageId::from("x"), PageId::from("y"));
        t.apply(&x, "a", 1, 3);
        t.apply(&x, "b", 1, 4);
        t.apply(&y, "b", 1, 1);
        let live: HashSet<String> = ["b".to_string()].into();
        assert_eq!(t.retain_live(&live), vec![x.clone()]);
        assert_eq!(t.sum(&x), 4);
        assert_eq!(t.sum(&y), 1);
    }

    /// Field values parse; the channel hash is stable across builds and nodes.
    #[test]
    fn field_format_and_stable_hash() {
        assert_eq!(parse_field("12:3"), Some((12, 3)));
        assert_eq!(parse_field("garbage"), None);
        assert_eq!(fnv1a(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(
            redacted("redis://:secret@host:6379/0"),
            "redis://***@host:6379/0"
        );
        assert_eq!(redacted("redis://host:6379"), "redis://host:6379");
    }
}
