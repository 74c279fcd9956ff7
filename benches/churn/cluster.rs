//! `cluster`: N = 1, 2, 4, 6 release-binary nodes on this box sharing one
//! private `redis-server` (free port, no persistence), under a constant total
//! churn spread evenly over the nodes (`LC_CLUSTER_RATE`, default 1,000
//! cycles/s; smoke 100): connect to one of 200 pages, subscribe to 5 random
//! links, first update, close handshake.
//!
//! Loads: `links200` (the links among the same 200 pages, at every N) and
//! `newlinks` (every link a page never followed before, so every follow is a
//! Redis load; at N = 4, smoke N = 2). Each run: 2 s warm-up (smoke 0.5),
//! then 10 s measured (smoke 1.5), default timers (`heartbeat_interval` 1 s,
//! `node_ttl` 5 s, `broadcast_interval` 50 ms). Printed per run:
//! - Redis commands per cycle (`INFO commandstats`: every command, those run
//!   by the heartbeat script included) and the heartbeat's share per second;
//! - pub/sub deliveries per publish (the nodes' received / published messages);
//! - cross-node propagation p50/p99: a probe connection toggled on the last
//!   node, seen by a subscriber on the first;
//! - the longest heartbeat gap (successive deadlines of each node id in the
//!   liveness set, Redis time) and node id changes;
//! - held pages (2 connections per node on each of 10 pages, a subscriber on
//!   every node): values above the truth seen during the run, and mismatches
//!   10 s after the load stops (every subscriber exact, every churn page 0
//!   on every node's HTTP API).
//!
//! Also per run: the `redis-server`'s CPU use (percent of one core), and at
//! the end the ceiling: `redis-benchmark` (50 clients, no pipelining) against
//! the same build: `SET`, `HSET` and `PUBLISH` per second.
//!
//! Then, with `heartbeat_interval` 200 ms and `node_ttl` 1 s, 3 nodes:
//! - **stall**: 20 runs (smoke 2) of SIGSTOP on the node holding 100 of 200
//!   viewers of a page, SIGCONT once the others dropped it (even runs) or
//!   after `node_ttl` + 0–0.5 s (odd runs); a run is above the truth if a
//!   subscriber on either other node ever shows more than 200;
//! - **kill -9**: 5 runs (smoke 1) of kill -9, at a random point of the
//!   heartbeat cycle, on a node holding 100 viewers;
//!   the time until a subscriber elsewhere drops them, next to the bound
//!   `node_ttl` + `heartbeat_interval` + `broadcast_interval`.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};

use crate::{
    kit::{prom, redis::RedisServer},
    support::*,
};

/// Pages the churn connects to and (load `links200`) links to.
const PAGES: u64 = 200;
/// Links per subscribe.
const LINKS: usize = 5;
/// Held pages per run.
const HELD: usize = 10;
/// Held connections per node and held page.
const HELD_PER_NODE: i64 = 2;
/// Churn clients.
const WORKERS: usize = 50;

/// Samples the liveness set every 50 ms: per node id, its successive deadlines.
struct BeatWatch {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<HashMap<String, Vec<u64>>>>,
}

impl BeatWatch {
    fn start(redis: &RedisServer) -> BeatWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let mut conn = redis::Client::open(redis.url())
            .and_then(|c| c.get_connection())
            .expect("redis connection");
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen: HashMap<String, Vec<u64>> = HashMap::new();
            while !s.load(Ordering::Relaxed) {
                let live: Vec<(String, u64)> = redis::cmd("ZRANGE")
                    .arg("link-counter:{live}z")
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES")
                    .query(&mut conn)
                    .unwrap_or_default();
                for (id, d) in live {
                    let v = seen.entry(id).or_default();
                    if v.last() != Some(&d) {
                        v.push(d);
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            seen
        });
        BeatWatch {
            stop,
            thread: Some(thread),
        }
    }

    /// (longest gap between two beats of one id in ms, node ids seen).
    fn finish(mut self) -> (u64, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let seen = self
            .thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        let gap = seen
            .values()
            .flat_map(|d| d.windows(2).map(|w| w[1].saturating_sub(w[0])))
            .max()
            .unwrap_or(0);
        (gap, seen.len())
    }
}

/// A subscriber following `pages`: the latest value and the largest ever seen per page.
struct Watcher {
    latest: Arc<Vec<AtomicI64>>,
    max: Arc<Vec<AtomicI64>>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    async fn open(server: SocketAddr, pages: &[String]) -> Watcher {
        let mut ws = connect(server, "/parties/page/watcher")
            .await
            .expect("watcher connects");
        ws.send(subscribe_msg(pages)).await.expect("subscribe");
        let latest: Arc<Vec<AtomicI64>> =
            Arc::new(pages.iter().map(|_| AtomicI64::new(-1)).collect());
        let max: Arc<Vec<AtomicI64>> = Arc::new(pages.iter().map(|_| AtomicI64::new(-1)).collect());
        let index: HashMap<String, usize> = pages
            .iter()
            .enumerate()
            .map(|(i, p)| (p.clone(), i))
            .collect();
        let (l, m) = (latest.clone(), max.clone());
        let task = tokio::spawn(async move {
            while let Some(Ok(msg)) = ws.next().await {
                let tokio_tungstenite::tungstenite::Message::Text(t) = msg else {
                    continue;
                };
                for (page, n) in update_map(&t).unwrap_or_default() {
                    if let Some(i) = index.get(&page) {
                        l[*i].store(n, Ordering::SeqCst);
                        m[*i].fetch_max(n, Ordering::SeqCst);
                    }
                }
            }
        });
        Watcher { latest, max, task }
    }

    fn latest(&self, i: usize) -> i64 {
        self.latest[i].load(Ordering::SeqCst)
    }

    fn max(&self, i: usize) -> i64 {
        self.max[i].load(Ordering::SeqCst)
    }

    fn reset_max(&self) {
        for (m, l) in self.max.iter().zip(self.latest.iter()) {
            m.store(l.load(Ordering::SeqCst), Ordering::SeqCst);
        }
    }

    /// Waits until page `i` shows `want` (at most `limit`); true if it did.
    async fn wait(&self, i: usize, want: i64, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if self.latest(i) == want {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        self.latest(i) == want
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Opens `n` connections to `page` on `server` that stay open (reading, so
/// pings are answered) until the returned task is aborted.
async fn hold(server: SocketAddr, page: &str, n: usize) -> Vec<tokio::task::JoinHandle<()>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut ws = connect(server, &format!("/parties/page/{page}"))
            .await
            .expect("held connection");
        out.push(tokio::spawn(async move {
            while let Some(Ok(_)) = ws.next().await {}
        }));
    }
    out
}

/// Sum of a metric over a node's `/metrics` (0 when it does not answer).
async fn metric(admin: Option<SocketAddr>, name: &str) -> f64 {
    match admin {
        Some(a) => http_body(a, "/metrics")
            .await
            .map_or(0.0, |text| prom::sum(&text, name)),
        None => 0.0,
    }
}

/// Sum of `name` over every node.
async fn metric_sum(nodes: &[ChildService], name: &str) -> f64 {
    let mut s = 0.0;
    for n in nodes {
        s += metric(n.admin, name).await;
    }
    s
}

/// Starts `n` nodes on `redis` with the extra settings.
fn start_nodes(redis: &RedisServer, n: usize, extra: &[(&str, &str)]) -> Vec<ChildService> {
    let url = redis.url();
    let mut settings: Vec<(&str, &str)> = vec![
        ("CLUSTER__REDIS_URL", url.as_str()),
        ("SERVER__WORKERS", "1"),
    ];
    settings.extend_from_slice(extra);
    (0..n).map(|_| ChildService::start(&settings)).collect()
}

/// Waits until every node sees `n` live nodes.
pub(crate) async fn wait_nodes(nodes: &[ChildService], n: usize) {
    let end = Instant::now() + Duration::from_secs(30);
    for node in nodes {
        while metric(node.admin, "link_counter_cluster_nodes").await != n as f64 {
            assert!(Instant::now() < end, "nodes did not see each other");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Which links a churn cycle subscribes to.
#[derive(Clone, Copy, PartialEq)]
enum Links {
    /// Among the same 200 pages.
    Steady,
    /// Pages never followed before.
    New,
}

/// The churn: [`WORKERS`] clients paced to `rate` cycles/s in total, worker
/// `w` on node `w mod N`.
fn churn(
    addrs: Vec<SocketAddr>,
    rate: f64,
    links: Links,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let period = Duration::from_secs_f64(WORKERS as f64 / rate);
    let fresh = Arc::new(AtomicU64::new(0));
    (0..WORKERS)
        .map(|w| {
            let (stop, done, errors, fresh) =
                (stop.clone(), done.clone(), errors.clone(), fresh.clone());
            let server = addrs[w % addrs.len()];
            tokio::spawn(async move {
                let mut rng = Rng::new(31 + w as u64);
                let offset = period.mul_f64(w as f64 / WORKERS as f64);
                let mut tick =
                    tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let page = format!("p{}", rng.below(PAGES));
                    let l = match links {
                        Links::Steady => rng.pages(LINKS, PAGES),
                        Links::New => (0..LINKS)
                            .map(|_| format!("n{}", fresh.fetch_add(1, Ordering::Relaxed)))
                            .collect(),
                    };
                    let r =
                        tokio::time::timeout(CYCLE_TIMEOUT, cycle(server, &page, &l, Leave::Close))
                            .await;
                    if matches!(r, Ok(Ok(()))) {
                        done.fetch_add(1, Ordering::Relaxed);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect()
}

/// Toggles a probe connection to page `q` on `src` while `stop` is unset;
/// `watcher` (following `q` as page 0) on another node; returns the
/// propagation delays in ms.
async fn probe(src: SocketAddr, watcher: &Watcher, stop: Arc<AtomicBool>) -> Vec<f64> {
    let mut samples = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let Ok(ws) = connect(src, "/parties/page/q").await else {
            continue;
        };
        let t0 = Instant::now();
        if watcher.wait(0, 1, CYCLE_TIMEOUT).await {
            samples.push(ms(t0.elapsed()));
        }
        let t1 = Instant::now();
        let _ = close_handshake(ws).await;
        if watcher.wait(0, 0, CYCLE_TIMEOUT).await {
            samples.push(ms(t1.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    samples
}

/// The nodes of a measured run with their held pages and subscribers
/// (dropped in this order: the clients, the nodes, then Redis).
struct Setup {
    /// [`HELD_PER_NODE`] connections per node on each held page.
    held: Vec<tokio::task::JoinHandle<()>>,
    /// A subscriber of the held pages on every node.
    watchers: Vec<Watcher>,
    /// Follows the probe page `q` on the first node.
    probe_watch: Watcher,
    addrs: Vec<SocketAddr>,
    /// The true count of each held page.
    truth: i64,
    nodes: Vec<ChildService>,
    redis: RedisServer,
}

/// `n` nodes on a fresh `redis-server`, the held pages and their subscribers.
async fn setup(n: usize) -> Setup {
    let redis = RedisServer::launch(&[]);
    let nodes = start_nodes(&redis, n, &[]);
    wait_nodes(&nodes, n).await;
    let addrs: Vec<SocketAddr> = nodes.iter().map(|s| s.addr).collect();
    let held_pages: Vec<String> = (0..HELD).map(|i| format!("h{i}")).collect();
    let mut held = Vec::new();
    for a in &addrs {
        for p in &held_pages {
            held.extend(hold(*a, p, HELD_PER_NODE as usize).await);
        }
    }
    let mut watchers = Vec::new();
    for a in &addrs {
        watchers.push(Watcher::open(*a, &held_pages).await);
    }
    let probe_watch = Watcher::open(addrs[0], &["q".to_string()]).await;
    Setup {
        redis,
        nodes,
        addrs,
        held,
        watchers,
        probe_watch,
        truth: HELD_PER_NODE * n as i64,
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        for h in &self.held {
            h.abort();
        }
    }
}

/// What the measured interval of a run saw.
struct Measured {
    secs: f64,
    cycles: u64,
    errors: u64,
    /// `INFO commandstats` calls before and after.
    before: BTreeMap<String, u64>,
    after: BTreeMap<String, u64>,
    /// Cluster messages published and received by all nodes.
    published: f64,
    received: f64,
    /// Longest heartbeat gap (ms) and node ids seen.
    gap_ms: u64,
    ids: usize,
    redis_cpu_secs: f64,
    /// Propagation delays (ms), sorted.
    prop: Vec<f64>,
}

/// Sums of the cluster message counters over the nodes: (published, received).
async fn cluster_messages(nodes: &[ChildService]) -> (f64, f64) {
    (
        metric_sum(nodes, "link_counter_cluster_messages_published_total").await,
        metric_sum(nodes, "link_counter_cluster_messages_received_total").await,
    )
}

/// The churn at `rate` after a warm-up, measured with the probe running.
async fn measure(setup: &Setup, links: Links, rate: f64, smoke: bool) -> Measured {
    let (warm, measured) = if smoke { (0.5, 1.5) } else { (2.0, 10.0) };
    let stop = Arc::new(AtomicBool::new(false));
    let (done, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let tasks = churn(
        setup.addrs.clone(),
        rate,
        links,
        stop.clone(),
        done.clone(),
        errors.clone(),
    );
    tokio::time::sleep(Duration::from_secs_f64(warm)).await;
    for w in &setup.watchers {
        w.reset_max();
    }
    let beats = BeatWatch::start(&setup.redis);
    let before = setup.redis.commandstats();
    let messages0 = cluster_messages(&setup.nodes).await;
    let (cycles0, t0) = (done.load(Ordering::Relaxed), Instant::now());
    let redis_pid = setup.redis.pid().expect("redis runs");
    let redis_cpu0 = cpu_secs(redis_pid);
    let mut prop = probe_for(setup, Duration::from_secs_f64(measured)).await;
    let secs_run = secs(t0);
    let redis_cpu_secs = cpu_secs(redis_pid) - redis_cpu0;
    let cycles = done.load(Ordering::Relaxed) - cycles0;
    let after = setup.redis.commandstats();
    let messages = cluster_messages(&setup.nodes).await;
    let (gap_ms, ids) = beats.finish();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    prop.sort_by(|a, b| a.total_cmp(b));
    Measured {
        secs: secs_run,
        cycles,
        errors: errors.load(Ordering::Relaxed),
        before,
        after,
        published: messages.0 - messages0.0,
        received: messages.1 - messages0.1,
        gap_ms,
        ids,
        redis_cpu_secs,
        prop,
    }
}

/// Runs the probe from the last node to the first for `length`; its delays (ms).
async fn probe_for(setup: &Setup, length: Duration) -> Vec<f64> {
    let probe_stop = Arc::new(AtomicBool::new(false));
    let src = setup.addrs[setup.addrs.len() - 1];
    let ps = probe_stop.clone();
    let probing = async { probe(src, &setup.probe_watch, ps).await };
    let timer = async {
        tokio::time::sleep(length).await;
        probe_stop.store(true, Ordering::Relaxed);
    };
    tokio::join!(probing, timer).0
}

/// Redis commands of the measured interval: (total, the heartbeat's, the
/// six most frequent as `name:per_cycle`). The bench's own probes (INFO,
/// the liveness set's ZRANGE) are left out.
fn command_figures(m: &Measured) -> (u64, u64, Vec<String>) {
    let delta = |k: &str| {
        m.after
            .get(k)
            .unwrap_or(&0)
            .saturating_sub(*m.before.get(k).unwrap_or(&0))
    };
    let probes = ["info", "zrange"];
    let total: u64 = m
        .after
        .keys()
        .filter(|k| !probes.contains(&k.as_str()))
        .map(|k| delta(k))
        .sum();
    let heartbeat: u64 = ["eval", "time", "zscore", "zadd", "zrangebyscore"]
        .iter()
        .map(|k| delta(k))
        .sum();
    let mut top: Vec<(u64, &String)> = m
        .after
        .keys()
        .map(|k| (delta(k), k))
        .filter(|(d, k)| *d > 0 && !probes.contains(&k.as_str()))
        .collect();
    top.sort_by(|a, b| b.cmp(a));
    let top = top
        .iter()
        .take(6)
        .map(|(d, k)| format!("{k}:{:.2}", *d as f64 / m.cycles.max(1) as f64))
        .collect();
    (total, heartbeat, top)
}

/// Once the load stopped: every subscriber exact on the held pages and every
/// churn page 0 on every node's HTTP API, within 10 s. Returns the
/// mismatches, each described.
async fn settle_mismatches(setup: &Setup) -> Vec<String> {
    let end = Instant::now() + Duration::from_secs(10);
    let mut wrong: Vec<String> = Vec::new();
    for (k, w) in setup.watchers.iter().enumerate() {
        for i in 0..HELD {
            let left = end.saturating_duration_since(Instant::now());
            if !w.wait(i, setup.truth, left).await {
                wrong.push(format!("node{k} sees h{i}={}", w.latest(i)));
            }
        }
    }
    for a in &setup.addrs {
        wrong.extend(churn_pages_not_zero(*a, end).await);
    }
    wrong
}

/// The churn pages `a`'s HTTP API does not answer 0 for, polled until they
/// all are or `end` (the last closes may still be on their way).
async fn churn_pages_not_zero(a: SocketAddr, end: Instant) -> Vec<String> {
    let ids: Vec<String> = (0..PAGES).map(|i| format!("p{i}")).collect();
    loop {
        let body = http_body(a, &format!("/api/v1/counts?ids={}", ids.join(",")))
            .await
            .unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let bad: Vec<String> = ids
            .iter()
            .filter(|p| v[p.as_str()].as_u64() != Some(0))
            .map(|p| format!("{a} answers {p}={}", v[p.as_str()]))
            .collect();
        if bad.is_empty() || Instant::now() >= end {
            return bad;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One measured run of `n` nodes.
async fn run(n: usize, links: Links, rate: f64, smoke: bool) {
    let setup = setup(n).await;
    let m = measure(&setup, links, rate, smoke).await;
    let above = setup
        .watchers
        .iter()
        .flat_map(|w| (0..HELD).map(move |i| w.max(i)))
        .filter(|max| *max > setup.truth)
        .count();
    let wrong = settle_mismatches(&setup).await;
    if !wrong.is_empty() {
        eprintln!("# cluster n={n} mismatches: {}", wrong.join("; "));
    }
    let (total, heartbeat, top) = command_figures(&m);
    let load = if links == Links::Steady {
        "links200"
    } else {
        "newlinks"
    };
    let per_cycle = |x: f64| x / m.cycles.max(1) as f64;
    Line::new("cluster")
        .s("n", n)
        .s("load", load)
        .f("rate_target", rate)
        .f("cycles_per_s", m.cycles as f64 / m.secs)
        .s("errors", m.errors)
        .f("cmds_per_cycle", per_cycle(total as f64))
        .f("heartbeat_cmds_per_s", heartbeat as f64 / m.secs)
        .f("redis_cpu_pct", m.redis_cpu_secs / m.secs * 100.0)
        .s("per_cycle", top.join(","))
        .f(
            "deliveries_per_publish",
            if m.published > 0.0 {
                m.received / m.published
            } else {
                0.0
            },
        )
        .f("prop_p50_ms", pct(&m.prop, 50.0))
        .f("prop_p99_ms", pct(&m.prop, 99.0))
        .s("prop_samples", m.prop.len())
        .s("hb_gap_max_ms", m.gap_ms)
        .s("id_changes", m.ids.saturating_sub(n))
        .s("above_truth", above)
        .s("mismatches", wrong.len())
        .print();
}

/// Heartbeat, `node_ttl` and broadcast tick (ms) of the crash runs.
const CRASH_HB_MS: u64 = 200;
const CRASH_TTL_MS: u64 = 1000;
const CRASH_TICK_MS: u64 = 50;
/// Their settings.
const CRASH_TIMERS: [(&str, &str); 2] = [
    ("CLUSTER__HEARTBEAT_INTERVAL", "200ms"),
    ("CLUSTER__NODE_TTL", "1s"),
];

/// The stall and kill -9 runs (3 nodes, short timers).
async fn crashes(smoke: bool) {
    let redis = RedisServer::launch(&[]);
    let mut nodes = start_nodes(&redis, 3, &CRASH_TIMERS);
    wait_nodes(&nodes, 3).await;
    let x = vec!["x".to_string()];
    let (wa, wc) = (
        Watcher::open(nodes[0].addr, &x).await,
        Watcher::open(nodes[2].addr, &x).await,
    );
    let _on_a = hold(nodes[0].addr, "x", 100).await;
    let on_b = hold(nodes[1].addr, "x", 100).await;
    assert!(
        wa.wait(0, 200, Duration::from_secs(10)).await
            && wc.wait(0, 200, Duration::from_secs(10)).await
    );
    let mut rng = Rng::new(5);
    stalls(
        nodes[1].pid(),
        (&wa, &wc),
        if smoke { 2 } else { 20 },
        &mut rng,
    )
    .await;
    for h in on_b {
        h.abort();
    }
    assert!(wa.wait(0, 100, Duration::from_secs(10)).await);
    kills(&redis, &wa, if smoke { 1 } else { 5 }, &mut rng).await;
    nodes.clear();
}

/// `runs` SIGSTOP/SIGCONT stalls of the node `pid` (100 of the 200 viewers
/// of `x`), watched from the two others; prints the `part=stall` line.
async fn stalls(pid: u32, (wa, wc): (&Watcher, &Watcher), runs: usize, rng: &mut Rng) {
    let (hb, ttl) = (CRASH_HB_MS, CRASH_TTL_MS);
    let mut above_runs = 0;
    let mut most = 0;
    let pid = pid.to_string();
    let sig = |s: &str| {
        let _ = Command::new("kill").args([s, pid.as_str()]).status();
    };
    for r in 0..runs {
        wa.reset_max();
        wc.reset_max();
        sig("-STOP");
        if r % 2 == 0 {
            wa.wait(0, 100, Duration::from_secs(10)).await;
            wc.wait(0, 100, Duration::from_secs(10)).await;
        } else {
            tokio::time::sleep(Duration::from_millis(ttl + rng.below(500))).await;
        }
        sig("-CONT");
        // Back to 200 and settled (a late drop and reload may follow).
        for _ in 0..2 {
            wa.wait(0, 200, Duration::from_secs(10)).await;
            wc.wait(0, 200, Duration::from_secs(10)).await;
            tokio::time::sleep(Duration::from_millis(ttl + 2 * hb)).await;
        }
        let m = wa.max(0).max(wc.max(0));
        most = most.max(m);
        above_runs += usize::from(m > 200);
    }
    Line::new("cluster")
        .s("part", "stall")
        .s("runs", runs)
        .s("above_truth_runs", above_runs)
        .s("most_seen", most)
        .s("truth", 200)
        .print();
}

/// `kills` runs of kill -9 of a fresh node holding 100 viewers of `x`
/// (100 more held elsewhere); prints the `part=kill9` line.
async fn kills(redis: &RedisServer, wa: &Watcher, kills: usize, rng: &mut Rng) {
    let mut ghosts = Vec::new();
    for _ in 0..kills {
        let mut victim = start_nodes(redis, 1, &CRASH_TIMERS).remove(0);
        let held_v = hold(victim.addr, "x", 100).await;
        assert!(
            wa.wait(0, 200, Duration::from_secs(10)).await,
            "victim counted"
        );
        // The watcher saw the victim right after its node's heartbeat: a random
        // delay so the kill falls anywhere in the heartbeat cycle.
        tokio::time::sleep(Duration::from_millis(rng.below(CRASH_HB_MS))).await;
        let t = Instant::now();
        victim.kill9();
        if wa.wait(0, 100, Duration::from_secs(30)).await {
            ghosts.push(ms(t.elapsed()));
        }
        for h in held_v {
            h.abort();
        }
    }
    ghosts.sort_by(|a, b| a.total_cmp(b));
    Line::new("cluster")
        .s("part", "kill9")
        .s("runs", kills)
        .f("ghost_ms_max", ghosts.last().copied().unwrap_or(f64::NAN))
        .f("ghost_ms_min", ghosts.first().copied().unwrap_or(f64::NAN))
        .s("bound_ms", CRASH_TTL_MS + CRASH_HB_MS + CRASH_TICK_MS)
        .s("gone_runs", ghosts.len())
        .print();
}

/// The ceiling next to the runs: what the same `redis-server` build does
/// on this machine with `redis-benchmark` (50 clients, no pipelining).
fn redis_ceiling(smoke: bool) {
    let redis = RedisServer::launch(&[]);
    let port = redis.port.to_string();
    let n = if smoke { "20000" } else { "300000" };
    let run = |args: &[&str]| -> f64 {
        let out = Command::new("redis-benchmark")
            .args(["-p", port.as_str(), "-q", "-c", "50", "-n", n])
            .args(args)
            .output();
        let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        // "SET: 98765.43 requests per second, p50=…" (after progress lines ending in \r).
        text.ok()
            .and_then(|t| {
                t.rsplit('\r')
                    .next()
                    .and_then(|l| l.split_once(": "))
                    .and_then(|(_, r)| r.split_whitespace().next()?.parse().ok())
            })
            .unwrap_or(f64::NAN)
    };
    Line::new("cluster")
        .s("part", "redis_ceiling")
        .f("set_per_s", run(&["-t", "set"]))
        .f("hset_per_s", run(&["-t", "hset"]))
        .f(
            "publish_per_s",
            run(&["publish", "c", "{\"node\":\"x.1\",\"seq\":1}"]),
        )
        .print();
}

pub fn cluster(rt: &tokio::runtime::Runtime, smoke: bool) {
    let rate: f64 = std::env::var("LC_CLUSTER_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if smoke { 100.0 } else { 1000.0 });
    let ns: &[usize] = if smoke { &[1, 2] } else { &[1, 2, 4, 6] };
    rt.block_on(async {
        for &n in ns {
            run(n, Links::Steady, rate, smoke).await;
        }
        run(if smoke { 2 } else { 4 }, Links::New, rate, smoke).await;
        crashes(smoke).await;
    });
    redis_ceiling(smoke);
}
