//! The Redis side: key layout, connections (one instance or a Redis Cluster)
//! and the commands, as plain async functions the actor spawns.
//!
//! Every key of a channel `k` carries the hash tag `{c<k>}`, and the liveness
//! keys the tag `{live}`, so in a Redis Cluster each group of commands sent
//! together addresses one slot (redis-rs refuses pipelines across slots).

use std::{collections::HashMap, time::Duration};

use redis::{aio::MultiplexedConnection, cluster_async::ClusterConnection, Cmd, PushInfo, Value};
use tokio::sync::mpsc::UnboundedSender;

use super::table::{NodeId, Process};
use crate::{config::ClusterSettings, protocol::PageId};

/// Deadline of one Redis round trip (a hung Redis counts as down).
pub(super) const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a Redis operation failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// The client or server reported an error.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// No answer within [`COMMAND_TIMEOUT`].
    #[error("redis command timed out")]
    Timeout,
    /// An answer of an unexpected shape.
    #[error("unexpected reply from redis: {0}")]
    Reply(String),
    /// The connection was dropped or lost.
    #[error("not connected to redis")]
    NotConnected,
}

impl From<redis::ParsingError> for Error {
    fn from(e: redis::ParsingError) -> Error {
        Error::Reply(e.to_string())
    }
}

/// Runs `fut` with [`COMMAND_TIMEOUT`].
pub(super) async fn timed<T, E: Into<Error>>(
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, Error> {
    match tokio::time::timeout(COMMAND_TIMEOUT, fut).await {
        Ok(r) => r.map_err(Into::into),
        Err(_) => Err(Error::Timeout),
    }
}

/// Key and channel names (`P` = `cluster.key_prefix`).
#[derive(Clone, Debug)]
pub(super) struct Keys {
    /// `cluster.key_prefix`.
    prefix: String,
    /// `cluster.channels`.
    channels: u32,
    /// Redis Cluster: sharded pub/sub.
    sharded: bool,
}

impl Keys {
    pub(crate) fn new(c: &ClusterSettings) -> Keys {
        Keys {
            prefix: c.key_prefix.clone(),
            channels: c.channels.max(1),
            sharded: c.redis_cluster,
        }
    }

    /// Keys of prefix `lc:` over `channels` groups (tests).
    #[cfg(test)]
    pub(crate) fn for_tests(channels: u32) -> Keys {
        Keys {
            prefix: "lc:".into(),
            channels,
            sharded: false,
        }
    }

    /// The channel group `k` of a page (`fnv1a(page) mod channels`).
    pub(crate) fn channel_of(&self, page: &str) -> u32 {
        (crate::hash::fnv1a(page.as_bytes()) % u64::from(self.channels)) as u32
    }

    /// Every channel group.
    pub(crate) fn all_channels(&self) -> std::ops::Range<u32> {
        0..self.channels
    }

    /// `P{c<k>}p:<page>`: hash, field = node id, value = `seq:connections:visitors`.
    pub(crate) fn page(&self, page: &str) -> String {
        format!("{}{{c{}}}p:{page}", self.prefix, self.channel_of(page))
    }

    /// `P{c<k>}n:<node>`: the pages of group `k` where the node has a field.
    pub(crate) fn node_pages(&self, k: u32, node: &str) -> String {
        format!("{}{{c{k}}}n:{node}", self.prefix)
    }

    /// `P{c<k>}m:<process>`: the pub/sub channel of a process's changes in group `k`.
    pub(crate) fn channel(&self, k: u32, process: &str) -> String {
        format!("{}{{c{k}}}m:{process}", self.prefix)
    }

    /// `P{live}z`: sorted set, member = node id, score = its liveness deadline
    /// (Redis server time, ms).
    pub(crate) fn live(&self) -> String {
        format!("{}{{live}}z", self.prefix)
    }

    /// `P{live}r`: hash, field = dead node id, value = until when a survivor's
    /// claim to delete its fields holds (ms).
    pub(crate) fn claims(&self) -> String {
        format!("{}{{live}}r", self.prefix)
    }

    /// The group `k` of a channel name of ours.
    pub(crate) fn group_of_channel(&self, name: &str) -> Option<u32> {
        let rest = name.strip_prefix(&self.prefix)?.strip_prefix("{c")?;
        rest.split_once('}')?.0.parse().ok()
    }

    /// `PUBLISH`, or `SPUBLISH` on a Redis Cluster.
    fn publish_verb(&self) -> &'static str {
        if self.sharded {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    /// A publish of `payload` on `channel`.
    pub(crate) fn publish(&self, channel: String, payload: String) -> Cmd {
        let mut c = redis::cmd(self.publish_verb());
        c.arg(channel).arg(payload);
        c
    }
}

/// How to reach Redis: one instance or a Redis Cluster.
#[derive(Clone)]
pub(super) struct Backend {
    /// The URL, or the cluster's seed URLs.
    urls: Vec<String>,
    /// A Redis Cluster.
    cluster: bool,
}

impl Backend {
    pub(crate) fn new(c: &ClusterSettings) -> Result<Backend, Error> {
        let urls: Vec<String> = c.redis_urls().into_iter().map(String::from).collect();
        for u in &urls {
            redis::Client::open(u.as_str())?;
        }
        Ok(Backend {
            urls,
            cluster: c.redis_cluster,
        })
    }

    /// The URLs for logs (passwords hidden).
    pub(crate) fn describe(&self) -> String {
        let urls: Vec<String> = self
            .urls
            .iter()
            .map(|u| crate::logging::redact_url(u))
            .collect();
        if self.cluster {
            format!("cluster {}", urls.join(","))
        } else {
            urls.join(",")
        }
    }

    /// A new connection. With `push`, a RESP3 connection whose pub/sub
    /// messages (and a `Disconnection` push when it drops) go there.
    pub(crate) async fn connect(
        &self,
        push: Option<UnboundedSender<PushInfo>>,
    ) -> Result<Conn, Error> {
        use redis::IntoConnectionInfo;
        if self.cluster {
            let mut b = redis::cluster::ClusterClientBuilder::new(self.urls.clone())
                .connection_timeout(COMMAND_TIMEOUT)
                .response_timeout(COMMAND_TIMEOUT)
                .retries(1);
            if let Some(tx) = push {
                b = b
                    .use_protocol(redis::ProtocolVersion::RESP3)
                    .push_sender(tx);
            }
            let client = b.build()?;
            let conn = timed(client.get_async_connection()).await?;
            return Ok(Conn::Cluster(conn));
        }
        let url = self.urls.first().ok_or(Error::NotConnected)?;
        let mut info = url.as_str().into_connection_info()?;
        let mut cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT));
        if let Some(tx) = push {
            let settings = info
                .redis_settings()
                .clone()
                .set_protocol(redis::ProtocolVersion::RESP3);
            info = info.set_redis_settings(settings);
            cfg = cfg.set_push_sender(tx);
        }
        let client = redis::Client::open(info)?;
        let conn = timed(client.get_multiplexed_async_connection_with_config(&cfg)).await?;
        Ok(Conn::Single(conn))
    }
}

/// A command connection (cheap to clone; commands from clones are multiplexed).
#[derive(Clone)]
pub(super) enum Conn {
    /// One Redis instance.
    Single(MultiplexedConnection),
    /// A Redis Cluster (routes each group to its slot's master).
    Cluster(ClusterConnection),
}

/// Commands to send together: all of one group address one slot.
pub(super) type Groups = Vec<Vec<Cmd>>;

impl Conn {
    /// Sends every group and returns each group's replies. One round trip:
    /// on one instance a single pipeline, on a cluster the groups in parallel.
    pub(crate) async fn run(&self, groups: Groups) -> Result<Vec<Vec<Value>>, Error> {
        let sizes: Vec<usize> = groups.iter().map(Vec::len).collect();
        if sizes.iter().all(|n| *n == 0) {
            return Ok(sizes.iter().map(|_| Vec::new()).collect());
        }
        match self {
            Conn::Single(c) => {
                let mut p = redis::pipe();
                for cmd in groups.into_iter().flatten() {
                    p.add_command(cmd);
                }
                let mut c = c.clone();
                let all: Vec<Value> = timed(p.query_async(&mut c)).await?;
                let mut it = all.into_iter();
                Ok(sizes
                    .iter()
                    .map(|n| it.by_ref().take(*n).collect())
                    .collect())
            }
            Conn::Cluster(c) => {
                let futs = groups.into_iter().map(|g| {
                    let mut c = c.clone();
                    async move {
                        if g.is_empty() {
                            return Ok(Vec::new());
                        }
                        let mut p = redis::pipe();
                        for cmd in g {
                            p.add_command(cmd);
                        }
                        timed(p.query_async::<Vec<Value>>(&mut c)).await
                    }
                });
                futures_util::future::join_all(futs)
                    .await
                    .into_iter()
                    .collect()
            }
        }
    }

    /// Subscribes (`on`) or unsubscribes the channels, grouped by slot.
    pub(crate) async fn subscription(
        &self,
        groups: Vec<Vec<String>>,
        on: bool,
    ) -> Result<(), Error> {
        match self {
            Conn::Single(c) => {
                let names: Vec<String> = groups.into_iter().flatten().collect();
                if names.is_empty() {
                    return Ok(());
                }
                let mut c = c.clone();
                if on {
                    timed(c.subscribe(names)).await
                } else {
                    timed(c.unsubscribe(names)).await
                }
            }
            Conn::Cluster(c) => {
                let futs = groups.into_iter().filter(|g| !g.is_empty()).map(|g| {
                    let mut c = c.clone();
                    async move {
                        if on {
                            timed(c.ssubscribe(g)).await
                        } else {
                            timed(c.sunsubscribe(g)).await
                        }
                    }
                });
                futures_util::future::join_all(futs)
                    .await
                    .into_iter()
                    .collect()
            }
        }
    }
}

/// The heartbeat, in one atomic step on the `{live}` slot and in Redis
/// server time (node clocks never matter). `ARGV`: node id ("" = observe
/// only), ttl ms, mode (`beat`: refresh only if still live; `join`: register
/// a new id), claim ms. A node whose deadline passed can never refresh it
/// again: dead is final for an id. Returns `{ok, live ids, dead ids claimed
/// for reaping by this caller}`.
const HEARTBEAT_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local ok = 0
if ARGV[1] ~= '' then
  local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
  if ARGV[3] == 'join' then
    if not s then
      redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
      ok = 1
    end
  elseif s and tonumber(s) >= now then
    redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
    ok = 1
  end
end
local live = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, 16)
local claimed = {}
for _, d in ipairs(dead) do
  local c = redis.call('HGET', KEYS[2], d)
  if (not c) or tonumber(c) < now then
    redis.call('HSET', KEYS[2], d, now + tonumber(ARGV[4]))
    table.insert(claimed, d)
  end
end
return {ok, live, claimed}
";

/// What a heartbeat saw.
#[derive(Debug, Clone)]
pub(super) struct BeatReply {
    /// The id given is live (refreshed, or newly registered).
    pub(crate) ok: bool,
    /// Every live node id, in one snapshot.
    pub(crate) live: Vec<NodeId>,
    /// Dead ids this caller must reap.
    pub(crate) claimed: Vec<NodeId>,
}

/// Whether a heartbeat refreshes an existing id or registers a new one.
#[derive(Clone, Copy, Debug)]
pub(super) enum BeatMode {
    /// Refresh `id` if still live.
    Beat,
    /// Register `id` (never used before).
    Join,
}

/// Runs the heartbeat script for `id` (or only observes, with `None`).
pub(super) async fn heartbeat(
    conn: &Conn,
    keys: &Keys,
    id: Option<&NodeId>,
    mode: BeatMode,
    ttl: Duration,
) -> Result<BeatReply, Error> {
    let id = id.map(NodeId::to_string);
    let mut c = redis::cmd("EVAL");
    c.arg(HEARTBEAT_LUA)
        .arg(2)
        .arg(keys.live())
        .arg(keys.claims())
        .arg(id.as_deref().unwrap_or(""))
        .arg(ttl.as_millis() as u64)
        .arg(match mode {
            BeatMode::Beat => "beat",
            BeatMode::Join => "join",
        })
        .arg((ttl.as_millis() as u64).max(1000) * 2);
    let mut r = conn.run(vec![vec![c]]).await?;
    let v = r
        .pop()
        .and_then(|mut g| g.pop())
        .ok_or_else(|| Error::Reply("empty heartbeat reply".into()))?;
    let (ok, live, claimed): (i64, Vec<String>, Vec<String>) = redis::from_redis_value(v)?;
    Ok(BeatReply {
        ok: ok == 1,
        live: node_ids(live),
        claimed: node_ids(claimed),
    })
}

/// Node ids read back from Redis; one that does not parse is skipped and
/// logged (something else wrote into our keys), never trusted.
fn node_ids(raw: Vec<String>) -> Vec<NodeId> {
    raw.into_iter()
        .filter_map(|s| {
            let id = NodeId::parse(&s);
            if id.is_none() {
                tracing::warn!(
                    len = s.len(),
                    "cluster: malformed node id in the liveness set skipped"
                );
            }
            id
        })
        .collect()
}

/// Deletes every field of a dead `node` (found through its page sets) and
/// the page sets. `forget`: also removes the node from the liveness set and
/// its reaping claim (done by the reaper, last, so a crash half-way leaves
/// the node to be claimed again).
pub(super) async fn reap(
    conn: &Conn,
    keys: &Keys,
    node: &NodeId,
    forget: bool,
) -> Result<(), Error> {
    let node = node.to_string();
    let node = node.as_str();
    let groups: Groups = keys
        .all_channels()
        .map(|k| vec![redis::cmd("SMEMBERS").arg(keys.node_pages(k, node)).clone()])
        .collect();
    let listed = conn.run(groups).await?;
    let mut groups: Groups = Vec::new();
    for (k, mut replies) in keys.all_channels().zip(listed) {
        let pages: Vec<String> = match replies.pop() {
            Some(v) => redis::from_redis_value(v)?,
            None => Vec::new(),
        };
        let mut g = Vec::new();
        for p in pages {
            // Only keys of a valid page id are ours to touch.
            if crate::protocol::PageId::parse_link(&p).is_err() {
                tracing::warn!(
                    len = p.len(),
                    "cluster: malformed page id in a node's page set skipped"
                );
                continue;
            }
            g.push(redis::cmd("HDEL").arg(keys.page(&p)).arg(node).clone());
        }
        g.push(redis::cmd("DEL").arg(keys.node_pages(k, node)).clone());
        groups.push(g);
    }
    if forget {
        groups.push(vec![
            redis::cmd("ZREM").arg(keys.live()).arg(node).clone(),
            redis::cmd("HDEL").arg(keys.claims()).arg(node).clone(),
        ]);
    }
    conn.run(groups).await.map(drop)
}

/// Deletes the fields of `nodes` on `pages` (a write of an expired id that
/// landed after its reaping left one outside the id's page sets).
pub(super) async fn delete_fields(
    conn: &Conn,
    keys: &Keys,
    nodes: &[NodeId],
    pages: &[PageId],
) -> Result<(), Error> {
    if nodes.is_empty() || pages.is_empty() {
        return Ok(());
    }
    let ids: Vec<String> = nodes.iter().map(NodeId::to_string).collect();
    let mut by_group: HashMap<u32, Vec<Cmd>> = HashMap::new();
    for p in pages {
        let mut c = redis::cmd("HDEL");
        c.arg(keys.page(p)).arg(&ids);
        by_group.entry(keys.channel_of(p)).or_default().push(c);
    }
    conn.run(by_group.into_values().collect()).await.map(drop)
}

/// One page change in a write batch.
#[derive(Debug, Clone)]
pub(super) struct Op {
    /// The page.
    pub(crate) page: PageId,
    /// Its new local tally (zero: delete the field).
    pub(crate) tally: crate::protocol::Tally,
    /// The node may have no field yet (add the page to its page set).
    pub(crate) new_field: bool,
}

/// One page-change message on a channel.
#[derive(serde::Serialize, serde::Deserialize, Debug)]
pub(super) struct Wire {
    /// Sender's node id.
    pub(crate) node: String,
    /// Sender's sequence number (monotonic per process).
    pub(crate) seq: u64,
    /// `(page, connections, visitors)` of the sender.
    pub(crate) pages: Vec<(String, u64, u64)>,
}

/// The commands of a write batch: per channel group, the field writes, the
/// page-set updates and one publish. Returns the groups and the publishes.
pub(super) fn write_groups(keys: &Keys, node: &NodeId, seq: u64, ops: &[Op]) -> (Groups, usize) {
    let id = node.to_string();
    let mut by_group: HashMap<u32, Vec<&Op>> = HashMap::new();
    for op in ops {
        by_group
            .entry(keys.channel_of(&op.page))
            .or_default()
            .push(op);
    }
    let published = by_group.len();
    let mut groups = Vec::with_capacity(by_group.len());
    for (k, ops) in by_group {
        let np = keys.node_pages(k, &id);
        let mut g = Vec::with_capacity(ops.len() * 2 + 1);
        let mut pages = Vec::with_capacity(ops.len());
        for op in ops {
            let key = keys.page(&op.page);
            if op.tally == crate::protocol::Tally::ZERO {
                g.push(redis::cmd("HDEL").arg(&key).arg(&id).clone());
                g.push(redis::cmd("SREM").arg(&np).arg(&*op.page).clone());
            } else {
                g.push(
                    redis::cmd("HSET")
                        .arg(&key)
                        .arg(&id)
                        .arg(super::table::format_value(seq, op.tally))
                        .clone(),
                );
                if op.new_field {
                    g.push(redis::cmd("SADD").arg(&np).arg(&*op.page).clone());
                }
            }
            pages.push((op.page.to_string(), op.tally.connections, op.tally.visitors));
        }
        let wire = Wire {
            node: id.clone(),
            seq,
            pages,
        };
        // Serializing a struct of strings and integers cannot fail.
        let json = serde_json::to_string(&wire).expect("plain struct serializes");
        g.push(keys.publish(keys.channel(k, node.process.as_str()), json));
        groups.push(g);
    }
    (groups, published)
}

/// Reads the hashes of `pages` (one round trip): per page, node id -> value.
pub(super) async fn read_pages(
    conn: &Conn,
    keys: &Keys,
    pages: &[PageId],
) -> Result<Vec<HashMap<String, String>>, Error> {
    // One group per page: on a cluster each page's slot is its channel's.
    let groups: Groups = pages
        .iter()
        .map(|p| vec![redis::cmd("HGETALL").arg(keys.page(p)).clone()])
        .collect();
    let replies = conn.run(groups).await?;
    replies
        .into_iter()
        .map(|mut g| match g.pop() {
            Some(v) => Ok(redis::from_redis_value(v)?),
            None => Ok(HashMap::new()),
        })
        .collect()
}

/// A pub/sub message: (channel, payload), if `p` is one.
pub(super) fn message_of(p: &PushInfo) -> Option<(String, &[u8])> {
    use redis::PushKind;
    if !matches!(p.kind, PushKind::Message | PushKind::SMessage) {
        return None;
    }
    let channel = match p.data.first()? {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        _ => return None,
    };
    match p.data.get(1)? {
        Value::BulkString(b) => Some((channel, b.as_slice())),
        _ => None,
    }
}

/// The process part of this node's ids, fresh per process start.
pub(super) fn fresh_process() -> Process {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    Process::new(&format!("{:x}-{:x}", nanos, std::process::id()))
        .expect("hex digits and a dash make a process name")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The channel hash is stable across builds and nodes; keys of one
    /// channel group share one hash tag; URLs are redacted in logs.
    #[test]
    fn layout() {
        let keys = Keys {
            prefix: "lc:".into(),
            channels: 64,
            sharded: false,
        };
        let k = keys.channel_of("/blog");
        assert_eq!(keys.page("/blog"), format!("lc:{{c{k}}}p:/blog"));
        assert_eq!(keys.node_pages(k, "n.1"), format!("lc:{{c{k}}}n:n.1"));
        assert_eq!(keys.group_of_channel(&keys.channel(k, "n")), Some(k));
        assert_eq!(keys.group_of_channel("other"), None);
        assert_eq!(keys.live(), "lc:{live}z");
    }
}
