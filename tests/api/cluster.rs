//! Cluster mode: several real `link-counter` processes sharing counts through
//! a real `redis-server` started by the tests on a free port.
//!
//! Skip rule: without `redis-server` on PATH these tests print one line and
//! pass, unless `LINK_COUNTER_REQUIRE_REDIS` is set (test.sh sets it), in
//! which case they fail.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use crate::{
    helpers::{counts, eventually, http_get, redis_available, Client, RedisServer},
    kit::{
        child::{binary, Running},
        prom,
        redis::RedisCluster,
        settings::{Env, PER_IP_CAPS_OFF},
    },
};

/// Liveness settings of the tests (short, so crashes are detected quickly).
const HEARTBEAT: &str = "200ms";
const NODE_TTL: Duration = Duration::from_secs(1);

/// A real `link-counter` process in cluster mode.
struct Node {
    process: Running,
    addr: SocketAddr,
    /// The admin listener (`/metrics`).
    admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start(redis: &RedisServer) -> Node {
        Self::start_with(redis, &[])
    }

    fn start_with(redis: &RedisServer, extra: &[(&str, &str)]) -> Node {
        Self::start_on(&redis.url(), extra)
    }

    /// A node on the Redis at `url` (with `CLUSTER__REDIS_CLUSTER` in
    /// `extra`: a Redis Cluster's seed list).
    fn start_on(url: &str, extra: &[(&str, &str)]) -> Node {
        Self::spawn(url, extra, tempfile::tempdir().expect("tmp"))
    }

    /// A node on the Redis at `url` with `dir` as its data directory.
    fn spawn(url: &str, extra: &[(&str, &str)], dir: tempfile::TempDir) -> Node {
        let mut cmd = binary();
        Env::base(dir.path())
            .set("SERVER__WORKERS", "2")
            .set("CLUSTER__REDIS_URL", url)
            .set("CLUSTER__HEARTBEAT_INTERVAL", HEARTBEAT)
            .set("CLUSTER__NODE_TTL", format!("{}ms", NODE_TTL.as_millis()))
            .with(PER_IP_CAPS_OFF)
            .with(extra)
            .apply(&mut cmd);
        cmd.env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into()),
        );
        let process = Running::start(cmd);
        Node {
            addr: process.addr,
            admin: process.admin.expect("an admin listener"),
            process,
            _dir: dir,
        }
    }

    async fn connect(&self, page: &str) -> Client {
        Client::connect(&format!("ws://{}/parties/page/{page}", self.addr)).await
    }

    /// A client on page `o` subscribed to `links`, with its first update read.
    async fn observer(&self, links: &[&str]) -> Client {
        let mut c = self.connect("o").await;
        c.subscribe(links).await;
        c.next_update().await;
        c
    }

    async fn ready(&self) -> (u16, String) {
        http_get(self.addr, "/readyz").await
    }

    /// Waits until `/readyz` answers `status`.
    async fn wait_ready(&self, status: u16) {
        eventually(&format!("/readyz to answer {status}"), || async {
            self.ready().await.0 == status
        })
        .await;
    }

    /// Sends `signal` (`libc::SIGSTOP`, `libc::SIGCONT`) to the process.
    fn signal(&self, signal: i32) {
        self.process.signal(signal);
    }

    /// The live nodes this node sees (`link_counter_cluster_nodes`).
    async fn nodes_seen(&self) -> f64 {
        prom::sum(
            &http_get(self.admin, "/metrics").await.1,
            "link_counter_cluster_nodes",
        )
    }

    fn kill_9(mut self) {
        self.process.kill9();
    }

    /// kill -9, then a new process on the same data directory, as a
    /// supervisor (systemd's `Restart=`) would start it.
    fn kill_9_and_restart(mut self, redis: &RedisServer) -> Node {
        self.process.kill9();
        let dir = std::mem::replace(&mut self._dir, tempfile::tempdir().expect("tmp"));
        Self::spawn(&redis.url(), &[], dir)
    }

    /// SIGTERM, then waits for the exit.
    fn terminate(mut self) {
        let s = self.process.terminate();
        assert!(s.success(), "exit status {s}");
    }
}

/// Viewers of a page spread over two nodes: subscribers on a third node (and
/// on the two nodes themselves) see the exact sum, going up and going down;
/// the HTTP API of any node answers the cluster count too.
#[tokio::test]
async fn counts_are_summed_across_nodes() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (a, b, c) = (
        Node::start(&redis),
        Node::start(&redis),
        Node::start(&redis),
    );
    let mut obs_c = c.observer(&["x", "y"]).await;
    let mut obs_a = a.observer(&["x"]).await;
    let mut on_a = Vec::new();
    let mut on_b = Vec::new();
    for _ in 0..2 {
        on_a.push(a.connect("x").await);
    }
    for _ in 0..3 {
        on_b.push(b.connect("x").await);
    }
    let _y = b.connect("y").await;
    obs_c.wait_for(&counts(&[("x", 5), ("y", 1)])).await;
    obs_a.wait_for(&counts(&[("x", 5)])).await;
    // a follows x but not y; c has no local viewer of either.
    for node in [&a, &c] {
        let (status, body) = http_get(node.addr, "/api/v1/counts?ids=x,y").await;
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v, serde_json::json!({"x": 5, "y": 1}));
    }
    let (_, body) = http_get(a.addr, "/api/v1/pages/y").await;
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["connections"], 1, "{v}");
    on_a.pop().expect("one").close().await;
    obs_c.wait_for(&counts(&[("x", 4)])).await;
    for v in on_b.drain(..) {
        v.close().await;
    }
    obs_c.wait_for(&counts(&[("x", 1), ("y", 1)])).await;
    obs_a.wait_for(&counts(&[("x", 1)])).await;
    // Exact, and stays exact: nothing else arrives.
    obs_c.expect_silence(Duration::from_millis(500)).await;
    assert_eq!(obs_c.shown, counts(&[("x", 1), ("y", 1)]));
    // The cluster metrics saw the traffic: b published its counts, c received them.
    let (_, b_metrics) = http_get(b.admin, "/metrics").await;
    let (_, c_metrics) = http_get(c.admin, "/metrics").await;
    assert!(
        prom::sum(&b_metrics, "link_counter_cluster_messages_published_total") >= 1.0,
        "{b_metrics}"
    );
    assert!(
        prom::sum(&c_metrics, "link_counter_cluster_messages_received_total") >= 1.0,
        "{c_metrics}"
    );
    assert!(
        prom::sum(&b_metrics, "link_counter_redis_rtt_seconds_count") >= 1.0,
        "{b_metrics}"
    );
    assert_eq!(
        prom::sum(&c_metrics, "link_counter_cluster_nodes"),
        3.0,
        "{c_metrics}"
    );
}

/// kill -9 of a node: subscribers elsewhere see its viewers disappear within
/// `node_ttl` plus a heartbeat and a tick; a new node on the same machine
/// (a new data directory, so a new id) does not double count.
#[tokio::test]
async fn crashed_node_viewers_disappear_within_node_ttl() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (a, b, c) = (
        Node::start(&redis),
        Node::start(&redis),
        Node::start(&redis),
    );
    let mut obs = c.observer(&["x"]).await;
    let _on_a: Vec<Client> = futures_util::future::join_all((0..2).map(|_| a.connect("x"))).await;
    let on_b: Vec<Client> = futures_util::future::join_all((0..3).map(|_| b.connect("x"))).await;
    obs.wait_for(&counts(&[("x", 5)])).await;
    let killed = Instant::now();
    b.kill_9();
    obs.wait_for(&counts(&[("x", 2)])).await;
    let took = killed.elapsed();
    // The bound (node_ttl + heartbeat_interval + a tick) is measured by the
    // `cluster` bench scenario; here: they go, and nothing comes back.
    println!("kill -9: ghost counts gone after {took:?} (node_ttl {NODE_TTL:?})");
    drop(on_b);
    // The same machine comes back: a new process with a new id.
    let b2 = Node::start(&redis);
    let _back = b2.connect("x").await;
    obs.wait_for(&counts(&[("x", 3)])).await;
    // Several node_ttl later it is still exact (nothing of the old id returns).
    obs.expect_silence(NODE_TTL * 2).await;
    assert_eq!(obs.shown, counts(&[("x", 3)]));
    let mut late = b2.observer(&["x"]).await;
    late.wait_for(&counts(&[("x", 3)])).await;
}

/// kill -9 and an immediate restart on the same data directory, its viewers
/// reconnecting at once (before the old id's `node_ttl` could pass): the
/// restarted process reaps its previous id before it registers, so an
/// observer elsewhere sees the crashed run's viewers or the new run's, never
/// both. Several rounds.
#[tokio::test]
async fn a_restarted_node_never_counts_with_its_crashed_self() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    const VIEWERS: u64 = 6;
    let mut a = Node::start(&redis);
    let b = Node::start(&redis);
    let mut obs = b.observer(&["x"]).await;
    for round in 0..4 {
        let viewers: Vec<Client> =
            futures_util::future::join_all((0..VIEWERS).map(|_| a.connect("x"))).await;
        obs.wait_for(&counts(&[("x", VIEWERS)])).await;
        a = a.kill_9_and_restart(&redis);
        drop(viewers);
        let back: Vec<Client> =
            futures_util::future::join_all((0..VIEWERS).map(|_| a.connect("x"))).await;
        // Whatever it shows on the way, never the ghost plus the new run.
        let mut max = obs.shown.get("x").copied().unwrap_or(0);
        let deadline = Instant::now() + NODE_TTL * 4;
        while Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_millis(100), obs.next_json()).await {
                Ok(_) => max = max.max(obs.shown.get("x").copied().unwrap_or(0)),
                Err(_) => continue,
            }
        }
        assert!(
            max <= VIEWERS,
            "round {round}: observer saw {max} > {VIEWERS}"
        );
        obs.wait_for(&counts(&[("x", VIEWERS)])).await;
        drop(back);
        obs.wait_for(&counts(&[("x", 0)])).await;
    }
}

/// Redis is stopped and restarted (losing all its data) while viewers come and
/// go: nodes keep serving their local counts, `/readyz` reports degraded, and
/// after Redis is back every subscriber converges to the exact counts.
#[tokio::test]
async fn redis_restart_under_churn_converges() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let (a, b) = (Node::start(&redis), Node::start(&redis));
    let mut obs_a = a.observer(&["x"]).await;
    let mut obs_b = b.observer(&["x"]).await;
    let mut on_a: Vec<Client> =
        futures_util::future::join_all((0..3).map(|_| a.connect("x"))).await;
    let mut on_b: Vec<Client> =
        futures_util::future::join_all((0..4).map(|_| b.connect("x"))).await;
    obs_a.wait_for(&counts(&[("x", 7)])).await;
    obs_b.wait_for(&counts(&[("x", 7)])).await;
    assert_eq!(a.ready().await.0, 200);

    redis.stop();
    a.wait_ready(503).await;
    let (_, body) = a.ready().await;
    assert!(body.contains("redis"), "{body}");
    // Churn while Redis is down; each node keeps serving (new connections are
    // accepted, local changes are shown on top of the last known remote counts).
    for _ in 0..2 {
        on_a.pop().expect("one").close().await;
    }
    for _ in 0..3 {
        on_b.push(b.connect("x").await);
    }
    obs_a.wait_for(&counts(&[("x", 5)])).await; // 1 local + 4 frozen remote
    obs_b.wait_for(&counts(&[("x", 10)])).await; // 7 local + 3 frozen remote
    let fresh = a.observer(&["x"]).await;
    drop(fresh);

    // Churn on both nodes through the outage and the restart.
    let churn: Vec<_> = [a.addr, b.addr]
        .into_iter()
        .map(|addr| {
            tokio::spawn(async move {
                let url = format!("ws://{addr}/parties/page/x");
                loop {
                    let c = Client::connect(&url).await;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    c.drop_abruptly();
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let restarted = Instant::now();
    redis.restart();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for c in churn {
        c.abort();
        let _ = c.await;
    }
    // Exact again: 1 on a, 7 on b.
    obs_a.wait_for(&counts(&[("x", 8)])).await;
    obs_b.wait_for(&counts(&[("x", 8)])).await;
    println!(
        "redis restart: converged {:?} after the restart (churn ran until 500ms after it)",
        restarted.elapsed()
    );
    a.wait_ready(200).await;
    b.wait_ready(200).await;
    // And it keeps working after recovery.
    on_a.push(a.connect("x").await);
    obs_b.wait_for(&counts(&[("x", 9)])).await;
    obs_a.wait_for(&counts(&[("x", 9)])).await;
}

/// A node started late sees the existing counts of other nodes as soon as one
/// of its clients subscribes.
#[tokio::test]
async fn late_node_sees_existing_counts() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let a = Node::start(&redis);
    let _v: Vec<Client> = futures_util::future::join_all((0..4).map(|_| a.connect("x"))).await;
    let _w = a.connect("w").await;
    // a's tallies are in Redis (x on 4 connections, w on 1).
    eventually("a's fields written", || async {
        let v = http_get(a.addr, "/api/v1/counts?ids=x,w").await.1;
        v.contains("\"x\":4") && v.contains("\"w\":1") && {
            let fields = redis.cli(&["--scan", "--pattern", "link-counter:*p:*"]);
            fields.lines().count() >= 2
        }
    })
    .await;
    let late = Node::start(&redis);
    let asked = Instant::now();
    let mut obs = late.connect("o").await;
    obs.subscribe(&["x", "w", "z"]).await;
    // The very first update is already the cluster count.
    assert_eq!(
        obs.next_update().await,
        counts(&[("x", 4), ("w", 1), ("z", 0)])
    );
    println!(
        "late node: existing counts shown after {:?}",
        asked.elapsed()
    );
}

/// Cluster mode sees no difference between the transports: event streams on
/// one node and WebSockets on another are summed, a stream subscribed on
/// one node follows viewers on the other, and a stream that closes leaves
/// every node's count.
#[tokio::test]
async fn event_streams_count_across_nodes_like_websockets() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (a, b) = (Node::start(&redis), Node::start(&redis));
    let path = |page: &str, query: &str| crate::helpers::events_path(page, query);
    let mut on_a = crate::helpers::EventClient::open(a.addr, &path("s", "links=x"), &[])
        .await
        .expect("a stream on node a");
    on_a.wait_for(&counts(&[("x", 0)])).await;
    let _x1 = b.connect("x").await;
    let x2 = crate::helpers::EventClient::open(b.addr, &path("x", ""), &[])
        .await
        .expect("a stream on node b");
    on_a.wait_for(&counts(&[("x", 2)])).await;
    let mut obs = b.connect("o").await;
    obs.subscribe(&["s", "x"]).await;
    obs.wait_for(&counts(&[("s", 1), ("x", 2)])).await;
    drop(x2);
    on_a.wait_for(&counts(&[("x", 1)])).await;
    obs.wait_for(&counts(&[("x", 1)])).await;
    drop(on_a);
    obs.wait_for(&counts(&[("s", 0)])).await;
    let answer = http_get(a.addr, "/api/v1/counts?ids=s,x").await.1;
    assert_eq!(answer.trim(), r#"{"s":0,"x":1}"#);
}

/// A graceful shutdown (SIGTERM) removes the node's viewers from the other
/// nodes at once, long before `node_ttl` (here 30 s) would.
#[tokio::test]
async fn graceful_shutdown_removes_contributions_at_once() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let ttl = [("CLUSTER__NODE_TTL", "30s")];
    let (a, b) = (
        Node::start_with(&redis, &ttl),
        Node::start_with(&redis, &ttl),
    );
    let mut obs = a.observer(&["x"]).await;
    let _on_a = a.connect("x").await;
    let mut on_b: Vec<Client> =
        futures_util::future::join_all((0..3).map(|_| b.connect("x"))).await;
    obs.wait_for(&counts(&[("x", 4)])).await;
    let t = Instant::now();
    let closing = tokio::task::spawn_blocking(move || b.terminate());
    for c in &mut on_b {
        assert_eq!(c.expect_close().await, 1001);
    }
    obs.wait_for(&counts(&[("x", 1)])).await;
    // Within the wait's patience (10 s), far less than the 30 s node_ttl.
    println!("graceful leave: others updated after {:?}", t.elapsed());
    closing.await.expect("terminated");
}

/// A node stalled for longer than `node_ttl` (SIGSTOP) is declared dead and
/// its viewers disappear elsewhere; when it resumes it notices, takes a new
/// id, re-asserts its counts, and the sum is exact again (no double count).
#[tokio::test]
async fn stalled_node_rejoins_with_a_new_id() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (a, b) = (Node::start(&redis), Node::start(&redis));
    let mut obs = a.observer(&["x"]).await;
    let _on_a = a.connect("x").await;
    let _on_b: Vec<Client> = futures_util::future::join_all((0..2).map(|_| b.connect("x"))).await;
    obs.wait_for(&counts(&[("x", 3)])).await;
    b.signal(libc::SIGSTOP);
    obs.wait_for(&counts(&[("x", 1)])).await;
    b.signal(libc::SIGCONT);
    let resumed = Instant::now();
    obs.wait_for(&counts(&[("x", 3)])).await;
    println!(
        "stalled node: counted again {:?} after resuming",
        resumed.elapsed()
    );
    obs.expect_silence(NODE_TTL * 2).await;
    assert_eq!(obs.shown, counts(&[("x", 3)]));
}

/// A counter fault in cluster mode: the rebuild includes the other nodes'
/// counts from the start (no dip), the rebuilt counter re-sends its whole
/// local state and followed set, and counts stay exact on both nodes.
#[tokio::test]
async fn counter_restart_in_cluster_mode_stays_exact() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let a = Node::start(&redis);
    let url = redis.url();
    let (b, _dir) = crate::helpers::spawn_app(&[
        ("CLUSTER__REDIS_URL", &url),
        ("CLUSTER__HEARTBEAT_INTERVAL", HEARTBEAT),
        ("CLUSTER__NODE_TTL", "1s"),
    ]);
    let mut obs_a = a.observer(&["x"]).await;
    let mut obs_b = b.connect("o").await;
    obs_b.subscribe(&["x"]).await;
    obs_b.next_update().await;
    let _on_a: Vec<Client> = futures_util::future::join_all((0..3).map(|_| a.connect("x"))).await;
    let on_b = b.connect("x").await;
    obs_b.wait_for(&counts(&[("x", 4)])).await;
    obs_a.wait_for(&counts(&[("x", 4)])).await;
    b.counter.do_send(link_counter::counter::InjectFault);
    eventually("the counter restarted", || async {
        let status = b
            .counter
            .send(link_counter::counter::GetStatus)
            .await
            .expect("status");
        status.generation == 2
    })
    .await;
    // No dip to the local count: the rebuild waited for the remote sums.
    obs_b.expect_silence(Duration::from_millis(300)).await;
    assert_eq!(obs_b.shown, counts(&[("x", 4)]));
    on_b.close().await;
    obs_a.wait_for(&counts(&[("x", 3)])).await;
    obs_b.wait_for(&counts(&[("x", 3)])).await;
    let _more = a.connect("x").await;
    obs_b.wait_for(&counts(&[("x", 4)])).await;
}

/// Cluster settings are validated before anything starts; the error names the key.
#[test]
fn cluster_settings_are_validated() {
    let dir = tempfile::tempdir().expect("tmp");
    let load = |extra: &[(&str, &str)]| {
        let mut env = vec![(
            "LINK_COUNTER__STORAGE__PATH".to_string(),
            dir.path().display().to_string(),
        )];
        for (k, v) in extra {
            env.push((format!("LINK_COUNTER__{k}"), v.to_string()));
        }
        link_counter::Settings::load_from(None, env)
    };
    let s = load(&[]).expect("defaults are valid");
    assert!(!s.cluster.enabled(), "single node by default");
    let s = load(&[("CLUSTER__REDIS_URL", "redis://127.0.0.1:6379")]).expect("valid");
    assert!(s.cluster.enabled());
    let e = load(&[
        ("CLUSTER__REDIS_URL", "redis://127.0.0.1:6379"),
        ("CLUSTER__NODE_TTL", "1s"),
    ])
    .expect_err("ttl below 2 heartbeats");
    assert!(e.to_string().contains("cluster.node_ttl"), "{e}");
    let e = load(&[("CLUSTER__REDIS_URL", "not a url")]).expect_err("bad url");
    assert!(e.to_string().contains("cluster.redis_url"), "{e}");
    let e = load(&[
        ("CLUSTER__REDIS_URL", "redis://127.0.0.1:6379"),
        ("CLUSTER__KEY_PREFIX", "lc{x}:"),
    ])
    .expect_err("braces in the prefix");
    assert!(e.to_string().contains("cluster.key_prefix"), "{e}");
    let s = load(&[
        (
            "CLUSTER__REDIS_URL",
            "redis://10.0.0.1:7000, redis://10.0.0.2:7000",
        ),
        ("CLUSTER__REDIS_CLUSTER", "true"),
    ])
    .expect("a seed list");
    assert_eq!(
        s.cluster.redis_urls(),
        ["redis://10.0.0.1:7000", "redis://10.0.0.2:7000"]
    );
    let e = load(&[
        ("CLUSTER__REDIS_URL", "redis://10.0.0.1:7000,nope"),
        ("CLUSTER__REDIS_CLUSTER", "true"),
    ])
    .expect_err("one bad seed");
    assert!(e.to_string().contains("cluster.redis_url"), "{e}");
}

/// Redis commands caused by one scripted set of follows (a client on the
/// first node subscribing to 40 pages no one followed) with `n` nodes up,
/// from `INFO commandstats`: (commands other than subscriptions, HGETALLs,
/// SUBSCRIBE commands). The heartbeat script's commands are left out (they
/// run on their own schedule, not per follow).
async fn follow_cost(n: usize) -> (u64, u64, u64) {
    let redis = RedisServer::start().expect("redis-server runs");
    let nodes: Vec<Node> = (0..n).map(|_| Node::start(&redis)).collect();
    let a = &nodes[0];
    for node in &nodes {
        eventually("every node sees every node", || async {
            node.nodes_seen().await == n as f64
        })
        .await;
    }
    // The observer's own page, and the site figure its connection changed
    // (the key of the empty id ends in `p:`), are written before the
    // measurement starts.
    let mut c = a.observer(&["warm"]).await;
    for pattern in ["link-counter:*p:o", "link-counter:*p:"] {
        eventually(&format!("{pattern} is written"), || async {
            !redis
                .cli(&["--scan", "--pattern", pattern])
                .trim()
                .is_empty()
        })
        .await;
    }
    let pages: Vec<String> = (0..40).map(|i| format!("f{i}")).collect();
    let links: Vec<&str> = pages.iter().map(String::as_str).collect();
    let before = redis.commandstats();
    c.subscribe(&links).await;
    // The answer waits for the pages' values: the follows are done.
    let first = c.next_update().await;
    assert_eq!(first.len(), 40, "{first:?}");
    let after = redis.commandstats();
    let heartbeat = ["eval", "time", "zscore", "zadd", "zrangebyscore", "info"];
    let delta = |name: &str| after.get(name).unwrap_or(&0) - before.get(name).unwrap_or(&0);
    let mut other = 0;
    for name in after.keys() {
        if !heartbeat.contains(&name.as_str()) && name != "subscribe" {
            other += delta(name);
        }
    }
    (other, delta("hgetall"), delta("subscribe"))
}

/// A follow costs the same number of Redis commands whatever the number of
/// nodes: one HGETALL per newly followed page, plus at most one SUBSCRIBE
/// for the whole batch (none alone: there is no one else to hear), and no
/// liveness lookup (liveness comes from the heartbeat's snapshot).
#[tokio::test]
async fn follow_cost_is_independent_of_node_count() {
    if !redis_available() {
        return;
    }
    let (one, one_hgetall, one_sub) = follow_cost(1).await;
    let (three, three_hgetall, three_sub) = follow_cost(3).await;
    println!(
        "40 follows: N=1 {one} commands ({one_hgetall} HGETALL) + {one_sub} SUBSCRIBE; \
         N=3 {three} commands ({three_hgetall} HGETALL) + {three_sub} SUBSCRIBE"
    );
    assert_eq!(one_hgetall, 40);
    assert_eq!(one, three, "the same commands at N=1 and N=3");
    assert_eq!(one, one_hgetall, "nothing but the loads");
    assert_eq!(one_sub, 0);
    assert_eq!(three_sub, 1, "one SUBSCRIBE carries every channel");
}

/// The heartbeat keeps its schedule while a node is flooded with follows and
/// unfollows of pages never seen before (each one a Redis load): the node's
/// registration is refreshed all along and never expires, so its id never
/// changes and its viewers never disappear from the other node.
#[tokio::test]
async fn heartbeat_keeps_schedule_under_follow_flood() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let a = Node::start(&redis);
    eventually("a registered", || async { redis.live_set().len() == 1 }).await;
    let a_id = redis.live_set().into_keys().next().expect("a's id");
    let b = Node::start(&redis);
    let _held: Vec<Client> = futures_util::future::join_all((0..3).map(|_| a.connect("x"))).await;
    let mut obs = b.observer(&["x"]).await;
    obs.wait_for(&counts(&[("x", 3)])).await;
    let stats_before = redis.commandstats();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cycles = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let flood: Vec<_> = (0..8)
        .map(|w| {
            let (stop, cycles, addr) = (stop.clone(), cycles.clone(), a.addr);
            tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < 400 {
                    let mut c = Client::connect(&format!("ws://{addr}/parties/page/w{w}")).await;
                    let links: Vec<String> = (0..5).map(|l| format!("n{w}-{i}-{l}")).collect();
                    let links: Vec<&str> = links.iter().map(String::as_str).collect();
                    c.subscribe(&links).await;
                    c.next_update().await;
                    c.close().await;
                    i += 1;
                    cycles.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            })
        })
        .collect();
    // Sample a's deadline (Redis time) while the flood runs: each change is a beat.
    let mut deadlines: Vec<u64> = Vec::new();
    while !flood.iter().all(|f| f.is_finished()) {
        let live = redis.live_set();
        assert!(
            live.contains_key(&a_id),
            "a's id left the live set: {live:?}"
        );
        if let Some(d) = live.get(&a_id) {
            if deadlines.last() != Some(d) {
                deadlines.push(*d);
            }
        }
        // Failing fast: the observer never sees a's viewers vanish.
        if let Ok(Some(v)) = tokio::time::timeout(Duration::from_millis(20), obs.next_json())
            .await
            .map(|v| v["connections"]["x"].as_u64())
        {
            assert_eq!(v, 3, "a's viewers changed on b");
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for f in flood {
        f.await.expect("flood client");
    }
    let stats_after = redis.commandstats();
    let loads =
        stats_after.get("hgetall").unwrap_or(&0) - stats_before.get("hgetall").unwrap_or(&0);
    let gaps: Vec<u64> = deadlines.windows(2).map(|w| w[1] - w[0]).collect();
    println!(
        "follow flood: {} cycles, {loads} HGETALL; {} beats, longest gap {} ms (heartbeat {HEARTBEAT})",
        cycles.load(std::sync::atomic::Ordering::Relaxed),
        deadlines.len(),
        gaps.iter().max().copied().unwrap_or(0)
    );
    assert!(
        loads >= 1000,
        "the flood followed new pages ({loads} loads)"
    );
    assert!(deadlines.len() >= 3, "beats went on during the flood");
    assert!(redis.live_set().contains_key(&a_id), "a kept its id");
    assert_eq!(obs.shown, counts(&[("x", 3)]));
}

/// A node stalled (SIGSTOP) past `node_ttl` and resumed, again and again,
/// sometimes after the others dropped it and sometimes while they may not
/// have yet: observers on both other nodes never see more than the true
/// number of open connections (its viewers are never counted twice), and
/// end exact.
#[tokio::test]
async fn stalled_node_is_never_counted_twice() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (a, b, c) = (
        Node::start(&redis),
        Node::start(&redis),
        Node::start(&redis),
    );
    let _on_a: Vec<Client> = futures_util::future::join_all((0..2).map(|_| a.connect("x"))).await;
    let _on_b: Vec<Client> = futures_util::future::join_all((0..3).map(|_| b.connect("x"))).await;
    let mut obs_a = a.observer(&["x"]).await;
    let mut obs_c = c.observer(&["x"]).await;
    obs_a.wait_for(&counts(&[("x", 5)])).await;
    obs_c.wait_for(&counts(&[("x", 5)])).await;
    let truth = 5;
    for round in 0..6 {
        b.signal(libc::SIGSTOP);
        if round % 2 == 0 {
            // Resumed just after the others dropped it.
            assert!(max_until_page(&mut obs_a, "x", 2).await <= truth);
            assert!(max_until_page(&mut obs_c, "x", 2).await <= truth);
        } else {
            // Resumed around its expiry (the stall length is the stimulus).
            tokio::time::sleep(NODE_TTL + Duration::from_millis(100 * round)).await;
        }
        b.signal(libc::SIGCONT);
        let (ma, mc) = (
            max_until_page(&mut obs_a, "x", 5).await,
            max_until_page(&mut obs_c, "x", 5).await,
        );
        println!("stall round {round}: most seen {ma} on a, {mc} on c (truth {truth})");
        assert!(ma <= truth && mc <= truth, "counted twice: {ma}, {mc}");
    }
    // A node resumed before the others noticed its expiry is dropped and
    // loaded again under its next id a heartbeat later (a dip, never a
    // bump). Then it settles: quiet for 2 x node_ttl, exact.
    for obs in [&mut obs_a, &mut obs_c] {
        let deadline = Instant::now() + crate::helpers::PATIENCE;
        while tokio::time::timeout(NODE_TTL * 2, obs.next_json())
            .await
            .is_ok()
        {
            let x = obs.shown.get("x").copied().unwrap_or(0);
            assert!(x <= truth, "counted twice: {x}");
            assert!(Instant::now() < deadline, "never settled: {:?}", obs.shown);
        }
        assert_eq!(obs.shown, counts(&[("x", 5)]));
    }
}

/// On a real 3-master Redis Cluster (`cluster.redis_cluster`): counts are
/// summed across three nodes (subscribers and the HTTP API), through sharded
/// pub/sub only (SPUBLISH, no PUBLISH), with keys spread over the masters;
/// a kill -9 ghost goes, a stalled node is not counted twice, a graceful
/// leave removes a node at once.
#[tokio::test]
async fn redis_cluster_shares_counts() {
    if !redis_available() {
        return;
    }
    let rc = RedisCluster::start(3);
    let urls = rc.urls();
    let extra = [("CLUSTER__REDIS_CLUSTER", "true")];
    let (a, b, c) = (
        Node::start_on(&urls, &extra),
        Node::start_on(&urls, &extra),
        Node::start_on(&urls, &extra),
    );
    for node in [&a, &b, &c] {
        eventually("every node sees three", || async {
            node.nodes_seen().await == 3.0
        })
        .await;
    }
    let pages: Vec<String> = (0..12).map(|i| format!("page{i}")).collect();
    let links: Vec<&str> = pages.iter().map(String::as_str).collect();
    let mut obs_c = c.connect("o").await;
    obs_c.subscribe(&links).await;
    obs_c.next_update().await;
    let mut held = Vec::new();
    let mut want = Vec::new();
    for (i, p) in pages.iter().enumerate() {
        // page i: (i % 3) + 1 viewers on a, 2 on b.
        for _ in 0..(i % 3) + 1 {
            held.push(a.connect(p).await);
        }
        for _ in 0..2 {
            held.push(b.connect(p).await);
        }
        want.push((p.as_str(), (i % 3) as u64 + 3));
    }
    obs_c.wait_for(&counts(&want)).await;
    let (_, body) = http_get(c.addr, &format!("/api/v1/counts?ids={}", links.join(","))).await;
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    for (p, n) in &want {
        assert_eq!(v[*p], *n, "{body}");
    }
    assert!(rc.calls("spublish") > 0, "sharded pub/sub used");
    assert_eq!(rc.calls("publish"), 0, "no cluster-wide PUBLISH");
    let with_keys = rc
        .ports
        .iter()
        .filter(|p| rc.cli(**p, &["dbsize"]).trim() != "0")
        .count();
    assert!(with_keys >= 2, "keys spread over the masters");

    // A stalled b: dropped, then counted again, never twice.
    let mut obs_a = a.observer(&["page0"]).await;
    obs_a.wait_for(&counts(&[("page0", 3)])).await;
    b.signal(libc::SIGSTOP);
    assert!(max_until_page(&mut obs_a, "page0", 1).await <= 3);
    b.signal(libc::SIGCONT);
    assert!(max_until_page(&mut obs_a, "page0", 3).await <= 3);

    // Graceful leave of b, then kill -9 of a: c ends with nothing.
    let closing = tokio::task::spawn_blocking(move || b.terminate());
    obs_c.wait_for(&counts(&[("page0", 1), ("page1", 2)])).await;
    closing.await.expect("terminated");
    a.kill_9();
    obs_c.wait_for(&counts(&[("page0", 0), ("page1", 0)])).await;
    drop(held);
}

/// Reads updates until `page` equals `want`; returns the largest value seen.
async fn max_until_page(c: &mut Client, page: &str, want: u64) -> u64 {
    let mut max = c.shown.get(page).copied().unwrap_or(0);
    while c.shown.get(page) != Some(&want) {
        c.next_json().await;
        max = max.max(c.shown.get(page).copied().unwrap_or(0));
    }
    max
}

/// The site figure in cluster mode is the sum of each node's distinct
/// people: a person on each node makes 2 on both, one person with a tab on
/// each node counts on each (never below the truth), and a node leaving
/// takes its people with it.
#[tokio::test]
async fn the_site_figure_sums_the_nodes() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (a, b) = (Node::start(&redis), Node::start(&redis));
    let watch = |node: &Node| {
        let url = format!("ws://{}/parties/page/w?visitor=visitor-watcher", node.addr);
        async move {
            let mut c = Client::connect(&url).await;
            c.send_text(r#"{"type":"subscribe","links":[],"site":true}"#)
                .await;
            c
        }
    };
    let mut on_a = watch(&a).await;
    let mut on_b = watch(&b).await;
    // visitor-watcher has a tab on each node: 1 + 1.
    for c in [&mut on_a, &mut on_b] {
        site_reaches(c, 2).await;
    }
    let _x = Client::connect(&format!(
        "ws://{}/parties/page/p?visitor=visitor-xxxx",
        b.addr
    ))
    .await;
    for c in [&mut on_a, &mut on_b] {
        site_reaches(c, 3).await;
    }
    drop(b);
    site_reaches(&mut on_a, 1).await;
}

/// Reads `c`'s updates until one carries `"site": n`.
async fn site_reaches(c: &mut Client, n: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let v = tokio::time::timeout_at(deadline, c.next_json())
            .await
            .unwrap_or_else(|_| panic!("no update with site {n}"));
        if v.get("site").and_then(|s| s.as_u64()) == Some(n) {
            return;
        }
    }
}

/// Reads updates until `c` shows `want` on `page`, asserting after every
/// update that it stayed within `floor..=ceiling`.
async fn converge_within(c: &mut Client, page: &str, want: u64, floor: u64, ceiling: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = c.shown.get(page) {
            assert!(
                (floor..=ceiling).contains(v),
                "{page}: shown {v}, outside {floor}..={ceiling}"
            );
            if *v == want {
                return;
            }
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if tokio::time::timeout(left, c.next_json()).await.is_err() {
            panic!("{page} did not converge to {want}: shown {:?}", c.shown);
        }
    }
}

/// The operator's case: Redis killed and replaced by a fresh one without
/// data. The nodes' ids vanished with the data, but they are not dead: each
/// node keeps the other's last counts until it registered again, so no
/// subscriber ever sees less (or more) than the true sum, and all converge.
#[tokio::test]
async fn redis_restarted_empty_is_not_dead_peers() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    // A node_ttl with room for a slow machine: the outage below must be
    // shorter than it for the node to know it did not stall itself.
    let ttl = [("CLUSTER__NODE_TTL", "3s")];
    let (a, b) = (
        Node::start_with(&redis, &ttl),
        Node::start_with(&redis, &ttl),
    );
    let mut obs_a = a.observer(&["x"]).await;
    let mut obs_b = b.observer(&["x"]).await;
    let _on_a: Vec<Client> = futures_util::future::join_all((0..6).map(|_| a.connect("x"))).await;
    let _on_b: Vec<Client> = futures_util::future::join_all((0..5).map(|_| b.connect("x"))).await;
    converge_within(&mut obs_a, "x", 11, 0, 11).await;
    converge_within(&mut obs_b, "x", 11, 0, 11).await;
    a.wait_ready(200).await;
    b.wait_ready(200).await;

    redis.stop();
    a.wait_ready(503).await;
    redis.restart(); // same port, no data
    eventually("both nodes registered in the new redis", || async {
        redis.live_set().len() == 2
    })
    .await;
    a.wait_ready(200).await;
    b.wait_ready(200).await;
    // One more viewer marks the end: every update before it showed 11.
    let _more = a.connect("x").await;
    converge_within(&mut obs_a, "x", 12, 11, 12).await;
    converge_within(&mut obs_b, "x", 12, 11, 12).await;
    // And the counts live on in the new Redis.
    let _more_b = b.connect("x").await;
    converge_within(&mut obs_a, "x", 13, 12, 13).await;
    converge_within(&mut obs_b, "x", 13, 12, 13).await;
}

/// The `actor="cluster"` sample of `link_counter_actor_panics_total`.
fn cluster_panics(text: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with("link_counter_actor_panics_total{") && l.contains("actor=\"cluster\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A panic in a cluster handler (a real `panic!` through the test hook) is
/// contained and counted; the supervisor restarts the actor, which
/// registers this node again with its counts from the counter and follows
/// again: counts across the two nodes converge exactly afterwards.
#[tokio::test]
async fn cluster_actor_panic_is_contained_and_rebuilt() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let a = Node::start(&redis);
    let url = redis.url();
    let (b, _dir) = crate::helpers::spawn_app(&[
        ("CLUSTER__REDIS_URL", &url),
        ("CLUSTER__HEARTBEAT_INTERVAL", HEARTBEAT),
        ("CLUSTER__NODE_TTL", "1s"),
    ]);
    let mut obs_a = a.observer(&["x"]).await;
    let mut obs_b = b.connect("o").await;
    obs_b.subscribe(&["x"]).await;
    obs_b.next_update().await;
    let _on_a: Vec<Client> = futures_util::future::join_all((0..3).map(|_| a.connect("x"))).await;
    let mut on_b: Vec<Client> =
        futures_util::future::join_all((0..2).map(|_| b.connect("x"))).await;
    obs_a.wait_for(&counts(&[("x", 5)])).await;
    obs_b.wait_for(&counts(&[("x", 5)])).await;
    let admin = b.admin.expect("admin listener");
    let before = cluster_panics(&http_get(admin, "/metrics").await.1);

    let cluster = b.cluster.clone().expect("cluster mode");
    cluster.do_send(link_counter::cluster::InjectPanic);
    eventually("the panic to be counted", || async {
        cluster_panics(&http_get(admin, "/metrics").await.1) == before + 1.0
    })
    .await;
    // Rebuilt: b registered again (its old id reaped) and is ready.
    eventually("b registered again, once", || async {
        let live = redis.live_set();
        live.len() == 2 && live.keys().any(|k| k.ends_with(".2"))
    })
    .await;
    eventually("/readyz on b to answer 200", || async {
        http_get(b.addr, "/readyz").await.0 == 200
    })
    .await;
    obs_a.wait_for(&counts(&[("x", 5)])).await;
    obs_b.wait_for(&counts(&[("x", 5)])).await;
    // Changes on either node after the restart reach both.
    on_b.pop().expect("one").close().await;
    obs_a.wait_for(&counts(&[("x", 4)])).await;
    obs_b.wait_for(&counts(&[("x", 4)])).await;
    let _more = a.connect("x").await;
    obs_a.wait_for(&counts(&[("x", 5)])).await;
    obs_b.wait_for(&counts(&[("x", 5)])).await;
    // The actor is still the one the counter and the server talk to.
    assert!(cluster.connected(), "the supervisor kept the address");
}
