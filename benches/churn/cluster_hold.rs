//! `cluster-hold`: N release-binary nodes sharing one private `redis-server`,
//! each holding R readers (default 6 × 15,000, `LC_HOLD_NODES`,
//! `LC_HOLD_READERS`; smoke 2 × 200) on the same 100 pages, each reader
//! following the 3 next pages. Every node runs with one worker, the global
//! connection cap above R, per-IP caps off.
//!
//! The readers of a node are opened by a client process of their own (this
//! bench binary again, `--cluster-hold-client`): a process may hold 20,000
//! descriptors here, so one process cannot hold the readers of several
//! nodes. Each opens its R readers (512 opening at once), every reader
//! reading every frame and applying each update, and reports on stdout.
//!
//! Two runs on fresh nodes: `quiet` (every link points at pages nobody
//! opens: the ceiling) and `busy` (the links point at the pages being
//! opened, on every node). Printed per run: time to open every reader of
//! every node and the opening rate, readers that failed or were closed by
//! the server, KiB per connection (each node's RSS growth over its readers),
//! the time from the last node's ramp until every reader on every node
//! shows the exact cluster-wide counts, the nodes exact at the end, and
//! Redis's `used_memory`. Then the busy / quiet opening-rate ratio.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicI64, AtomicUsize, Ordering},
        mpsc, Arc,
    },
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::{cluster::wait_nodes, kit::redis::RedisServer, settled_rss, support::*};

/// Pages the readers open (`p0` … `p99`); quiet links point at `p100` … `p199`.
const PAGES: usize = 100;
/// Links per reader.
const LINKS: usize = 3;
/// Readers opening at once, per client process.
const INFLIGHT: usize = 512;
/// The opening-rate ratio busy / quiet the bench is held to.
const TARGET_RATIO: f64 = 0.8;

/// What the readers' links point at.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Quiet,
    Busy,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Quiet => "quiet",
            Mode::Busy => "busy",
        }
    }

    fn parse(s: &str) -> Mode {
        if s == "quiet" {
            Mode::Quiet
        } else {
            Mode::Busy
        }
    }
}

/// Reader `i`'s page and links.
fn reader_pages(i: usize, mode: Mode) -> (usize, [usize; LINKS]) {
    let page = i % PAGES;
    let shift = if mode == Mode::Quiet { PAGES } else { 0 };
    (
        page,
        std::array::from_fn(|k| (page + k + 1) % PAGES + shift),
    )
}

/// The true count of `page` with `readers` on each of `nodes` nodes.
fn truth(page: usize, readers: usize, nodes: usize) -> i64 {
    if page >= PAGES {
        return 0;
    }
    let per_node = readers / PAGES + usize::from(page < readers % PAGES);
    (per_node * nodes) as i64
}

// ------------------------------------------------------------ client process

/// One reader's view: its latest value per link (-1: none yet).
struct View([AtomicI64; LINKS]);

/// The client process's readers.
struct Readers {
    views: Vec<View>,
    opened: AtomicUsize,
    failed: AtomicUsize,
    server_closes: AtomicUsize,
    /// Updates received after each reader's first.
    updates: AtomicUsize,
}

/// `--cluster-hold-client ADDR NODES READERS MODE`: opens the readers of
/// one node, prints `opened SECS FAILED UPDATES` once every reader opened or
/// failed (UPDATES: those received after each reader's first), then `status OPEN EXACT CLOSES` every 50 ms until killed.
pub fn client_main(args: &[String]) -> ! {
    raise_nofile();
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or_default();
    let server: SocketAddr = arg(0).parse().expect("ADDR");
    let nodes: usize = arg(1).parse().expect("NODES");
    let readers: usize = arg(2).parse().expect("READERS");
    let mode = Mode::parse(arg(3));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("client runtime");
    rt.block_on(async {
        let shared = Arc::new(Readers {
            views: (0..readers)
                .map(|_| View(std::array::from_fn(|_| AtomicI64::new(-1))))
                .collect(),
            opened: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            server_closes: AtomicUsize::new(0),
            updates: AtomicUsize::new(0),
        });
        let started = Instant::now();
        open_all(server, &shared, mode).await;
        println!(
            "opened {:.3} {} {}",
            secs(started),
            shared.failed.load(Ordering::Relaxed),
            shared.updates.load(Ordering::Relaxed)
        );
        loop {
            let exact = exact_readers(&shared, mode, readers, nodes);
            println!(
                "status {} {exact} {}",
                shared.opened.load(Ordering::Relaxed),
                shared.server_closes.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// Opens every reader, at most [`INFLIGHT`] at once; returns when each has
/// its first update or failed.
async fn open_all(server: SocketAddr, shared: &Arc<Readers>, mode: Mode) {
    let sem = Arc::new(tokio::sync::Semaphore::new(INFLIGHT));
    for i in 0..shared.views.len() {
        let permit = sem.clone().acquire_owned().await.expect("semaphore");
        tokio::spawn(reader(server, shared.clone(), i, mode, permit));
    }
    let _all = sem.acquire_many(INFLIGHT as u32).await.expect("semaphore");
}

/// One reader: connect, subscribe, then apply every update until the
/// server ends the connection.
async fn reader(
    server: SocketAddr,
    shared: Arc<Readers>,
    i: usize,
    mode: Mode,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let (page, links) = reader_pages(i, mode);
    let names: Vec<String> = links.iter().map(|l| format!("p{l}")).collect();
    let open = async {
        let mut ws = connect(server, &format!("/parties/page/p{page}")).await?;
        ws.send(subscribe_msg(&names)).await?;
        let first = next_update(&mut ws).await?;
        anyhow::Ok((ws, first))
    };
    let Ok(Ok((mut ws, first))) = tokio::time::timeout(Duration::from_secs(30), open).await else {
        shared.failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    apply(&shared, i, &links, &first);
    shared.opened.fetch_add(1, Ordering::Relaxed);
    drop(permit);
    while let Some(Ok(m)) = ws.next().await {
        match m {
            Message::Text(t) => {
                shared.updates.fetch_add(1, Ordering::Relaxed);
                apply(&shared, i, &links, &t)
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
    shared.opened.fetch_sub(1, Ordering::Relaxed);
    shared.server_closes.fetch_add(1, Ordering::Relaxed);
}

/// Applies an update to reader `i`'s view.
fn apply(shared: &Readers, i: usize, links: &[usize; LINKS], text: &str) {
    for (id, n) in update_map(text).unwrap_or_default() {
        let at = id
            .strip_prefix('p')
            .and_then(|p| p.parse::<usize>().ok())
            .and_then(|p| links.iter().position(|l| *l == p));
        if let Some(k) = at {
            shared.views[i].0[k].store(n, Ordering::Relaxed);
        }
    }
}

/// Readers whose every link shows the true cluster-wide count.
fn exact_readers(shared: &Readers, mode: Mode, readers: usize, nodes: usize) -> usize {
    (0..readers)
        .filter(|&i| {
            let (_, links) = reader_pages(i, mode);
            links.iter().enumerate().all(|(k, &l)| {
                shared.views[i].0[k].load(Ordering::Relaxed) == truth(l, readers, nodes)
            })
        })
        .count()
}

// ------------------------------------------------------------ the bench

/// A client process and what it reported.
struct Clients {
    child: Child,
    opened_secs: Option<f64>,
    failed: usize,
    /// Updates its readers received while it opened them (after each one's first).
    updates: usize,
    /// (open, exact, server closes) of its latest status line.
    status: (usize, usize, usize),
}

impl Drop for Clients {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the client process of `node`; its lines go to `lines` as (index, line).
fn spawn_clients(
    k: usize,
    node: SocketAddr,
    nodes: usize,
    readers: usize,
    mode: Mode,
    lines: mpsc::Sender<(usize, String)>,
) -> Clients {
    let mut child = Command::new(std::env::current_exe().expect("current exe"))
        .arg("--cluster-hold-client")
        .args([node.to_string(), nodes.to_string(), readers.to_string()])
        .arg(mode.name())
        .stdout(Stdio::piped())
        .spawn()
        .expect("client process");
    let out = child.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if lines.send((k, line)).is_err() {
                break;
            }
        }
    });
    Clients {
        child,
        opened_secs: None,
        failed: 0,
        updates: 0,
        status: (0, 0, 0),
    }
}

/// Records one line of a client process.
fn record(clients: &mut [Clients], (k, line): (usize, String)) {
    let words: Vec<&str> = line.split_whitespace().collect();
    let num = |i: usize| words.get(i).and_then(|w| w.parse::<f64>().ok());
    match words.first() {
        Some(&"opened") => {
            clients[k].opened_secs = num(1);
            clients[k].failed = num(2).unwrap_or(0.0) as usize;
            clients[k].updates = num(3).unwrap_or(0.0) as usize;
        }
        Some(&"status") => {
            let n = |i| num(i).unwrap_or(0.0) as usize;
            clients[k].status = (n(1), n(2), n(3));
        }
        _ => println!("# cluster-hold client {k}: {line}"),
    }
}

/// Reads lines until `done` holds or `limit` passes; false on the limit.
fn read_until(
    clients: &mut [Clients],
    lines: &mpsc::Receiver<(usize, String)>,
    limit: Duration,
    done: impl Fn(&[Clients]) -> bool,
) -> bool {
    let end = Instant::now() + limit;
    while !done(clients) {
        let left = end.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok(line) => record(clients, line),
            Err(_) if Instant::now() >= end => return false,
            Err(_) => {}
        }
    }
    true
}

/// Sizes of a run.
#[derive(Clone, Copy)]
struct Size {
    nodes: usize,
    readers: usize,
    smoke: bool,
}

/// What one run measured.
struct Run {
    open_secs: f64,
    connects_per_s: f64,
    /// Updates per reader per second while the readers opened.
    updates_per_reader_s: f64,
    failed: usize,
    server_closes: usize,
    converge_ms: f64,
    exact_nodes: usize,
    kib_per_conn: Vec<f64>,
    redis_kib: u64,
}

/// N nodes on a fresh `redis-server`, waiting until each sees all.
fn start_cluster(rt: &tokio::runtime::Runtime, size: Size) -> (RedisServer, Vec<ChildService>) {
    let redis = RedisServer::launch(&[]);
    let url = redis.url();
    let max = (size.readers + 1000).to_string();
    let settings = [
        ("CLUSTER__REDIS_URL", url.as_str()),
        ("SERVER__WORKERS", "1"),
        ("LIMITS__MAX_CONNECTIONS", max.as_str()),
    ];
    let nodes: Vec<ChildService> = (0..size.nodes)
        .map(|_| ChildService::start(&settings))
        .collect();
    rt.block_on(wait_nodes(&nodes, size.nodes));
    (redis, nodes)
}

/// One run in `mode` on fresh nodes.
fn run(rt: &tokio::runtime::Runtime, size: Size, mode: Mode) -> Run {
    let (redis, nodes) = start_cluster(rt, size);
    let base: Vec<u64> = nodes
        .iter()
        .map(|n| rt.block_on(settled_rss(n.pid())))
        .collect();
    let (tx, lines) = mpsc::channel();
    let started = Instant::now();
    let mut clients: Vec<Clients> = nodes
        .iter()
        .enumerate()
        .map(|(k, n)| spawn_clients(k, n.addr, size.nodes, size.readers, mode, tx.clone()))
        .collect();
    let open_limit = Duration::from_secs(if size.smoke { 60 } else { 600 });
    let all_open = |c: &[Clients]| c.iter().all(|c| c.opened_secs.is_some());
    assert!(
        read_until(&mut clients, &lines, open_limit, all_open),
        "cluster-hold: readers still opening after {open_limit:?}"
    );
    let open_secs = secs(started);
    let ramp_end = Instant::now();
    let converge_limit = Duration::from_secs(if size.smoke { 10 } else { 60 });
    let readers = size.readers;
    let all_exact = |c: &[Clients]| c.iter().all(|c| c.status.1 == readers);
    let converged = read_until(&mut clients, &lines, converge_limit, all_exact);
    let converge_ms = if converged {
        ms(ramp_end.elapsed())
    } else {
        f64::NAN
    };
    let kib_per_conn = nodes
        .iter()
        .zip(&base)
        .map(|(n, b)| rt.block_on(settled_rss(n.pid())).saturating_sub(*b) as f64 / readers as f64)
        .collect();
    Run {
        open_secs,
        connects_per_s: (size.nodes * readers) as f64 / open_secs,
        updates_per_reader_s: clients.iter().map(|c| c.updates).sum::<usize>() as f64
            / (size.nodes * readers) as f64
            / open_secs,
        failed: clients.iter().map(|c| c.failed).sum(),
        server_closes: clients.iter().map(|c| c.status.2).sum(),
        converge_ms,
        exact_nodes: clients.iter().filter(|c| c.status.1 == readers).count(),
        kib_per_conn,
        redis_kib: redis.used_memory() / 1024,
    }
}

fn print_run(size: Size, mode: Mode, r: &Run) {
    let mean = r.kib_per_conn.iter().sum::<f64>() / r.kib_per_conn.len().max(1) as f64;
    let max = r.kib_per_conn.iter().copied().fold(f64::NAN, f64::max);
    Line::new("cluster_hold")
        .s("mode", mode.name())
        .s("nodes", size.nodes)
        .s("readers_per_node", size.readers)
        .s("pages", PAGES)
        .s("links", LINKS)
        .f("open_secs", r.open_secs)
        .f("connects_per_s", r.connects_per_s)
        .f("updates_per_reader_s", r.updates_per_reader_s)
        .s("failed_opens", r.failed)
        .s("server_closes", r.server_closes)
        .f("converge_ms", r.converge_ms)
        .s("exact_nodes", r.exact_nodes)
        .f("kib_per_conn", mean)
        .f("kib_per_conn_max", max)
        .s("redis_used_memory_kib", r.redis_kib)
        .s("target_exact_nodes", size.nodes)
        .print();
}

pub fn cluster_hold(rt: &tokio::runtime::Runtime, smoke: bool) {
    let size = Size {
        nodes: env_or("LC_HOLD_NODES", if smoke { 2 } else { 6 }),
        readers: env_or("LC_HOLD_READERS", if smoke { 200 } else { 15_000 }),
        smoke,
    };
    conntrack_check("cluster-hold quiet");
    let quiet = run(rt, size, Mode::Quiet);
    print_run(size, Mode::Quiet, &quiet);
    conntrack_check("cluster-hold busy");
    let busy = run(rt, size, Mode::Busy);
    print_run(size, Mode::Busy, &busy);
    Line::new("cluster_hold_summary")
        .s("nodes", size.nodes)
        .s("readers_per_node", size.readers)
        .f(
            "busy_over_quiet",
            busy.connects_per_s / quiet.connects_per_s,
        )
        .s("target_busy_over_quiet", TARGET_RATIO)
        .s(
            "every_node_exact",
            busy.exact_nodes == size.nodes && quiet.exact_nodes == size.nodes,
        )
        .print();
}
