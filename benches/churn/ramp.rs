//! `ramp`: a connect storm against the release binary, then a check that
//! every client's view of its counts is exact.
//!
//! 15,000 clients (smoke: 500; `LC_BENCH_RAMP_CLIENTS`) open as fast as the service lets them (at most
//! `LC_BENCH_RAMP_INFLIGHT` opening at once, default 512) over 100 pages,
//! each subscribing to 3 other pages and reading every frame for the rest of
//! the run, applying each update as "set these ids to these counts". Every
//! close the server initiates (close frame, or the stream ending) is counted
//! by close code, during the ramp and during a settle period after it. After
//! the ramp the bench waits until every connected client's view equals the
//! true counts (the true count of page p: clients connected to p), and reports
//! how long that took and how many clients are exact at the end.
//!
//! Each round runs three modes, interleaved so they see the same machine:
//! `quiet` (every link points at pages nobody opens: no fan-out), `busy`
//! (links point at the pages being opened: every arrival changes counts
//! that readers follow) and `busy_unbudgeted` (the same with
//! `counter.delivery_budget` and `counter.max_worker_lag` out of reach, as
//! before the budget existed) and
//! `busy_max_delay_5s` (the budget's bound, `counter.max_delay`, at 5 s
//! instead of 1 s: what a longer bound buys a surge).
//! The last line prints the busy / quiet opening-rate ratios (median over
//! `LC_BENCH_RAMP_ROUNDS` rounds, default 2; smoke: 1).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicI64, AtomicU8, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{self, Message};

use crate::support::*;

/// Pages the ramp's clients connect to (`p0` … `p99`).
const RAMP_PAGES: usize = 100;
/// Links each client follows.
const RAMP_LINKS: usize = 3;

/// Where a client is.
const OPENING: u8 = 0;
const OPEN: u8 = 1;
/// The server closed it (close frame or stream end) after it opened.
const CLOSED: u8 = 2;
/// It never opened (connect, handshake or first update failed or timed out,
/// or the server closed it before its first update).
const FAILED: u8 = 3;

/// Phases in which a server close is counted.
const PHASE_RAMP: usize = 0;
const PHASE_SETTLE: usize = 1;
/// After the measurement: closes are no longer counted.
const PHASE_DONE: usize = 2;

/// What the clients' links point at.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Pages nobody opens (`p100` … `p199`).
    Quiet,
    /// The pages being opened, with the default delivery budget.
    Busy,
    /// The pages being opened, the delivery budget out of reach.
    BusyUnbudgeted,
    /// The pages being opened, the budget's bound (`counter.max_delay`) at 5 s.
    BusyMaxDelay5s,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Quiet => "quiet",
            Mode::Busy => "busy",
            Mode::BusyUnbudgeted => "busy_unbudgeted",
            Mode::BusyMaxDelay5s => "busy_max_delay_5s",
        }
    }
}

/// One client's shared state.
struct Client {
    page: usize,
    links: [usize; RAMP_LINKS],
    /// Latest count per link (-1: none received yet).
    view: [AtomicI64; RAMP_LINKS],
    state: AtomicU8,
}

/// Shared state of the run.
struct Shared {
    clients: Vec<Client>,
    phase: AtomicUsize,
    /// (phase, close code or "eof"/"error:…") -> count.
    closes: Mutex<BTreeMap<(usize, String), u64>>,
    /// Updates naming an id the client does not follow, or unparsable text.
    unexpected: AtomicUsize,
    /// Updates received by all clients.
    updates: AtomicUsize,
    first_error: Mutex<Option<String>>,
}

impl Shared {
    fn server_closed(&self, why: String) {
        let phase = self.phase.load(Ordering::Relaxed);
        if phase == PHASE_DONE {
            return;
        }
        *self
            .closes
            .lock()
            .expect("not poisoned")
            .entry((phase, why))
            .or_default() += 1;
    }
    fn error(&self, e: String) {
        let mut first = self.first_error.lock().expect("not poisoned");
        if first.is_none() {
            *first = Some(e);
        }
    }
}

/// The counts of an update (`None`: not an update).
fn update_counts(text: &str) -> Option<Vec<(usize, i64)>> {
    #[derive(serde::Deserialize)]
    struct Update<'a> {
        #[serde(rename = "type")]
        kind: &'a str,
        #[serde(borrow)]
        connections: BTreeMap<&'a str, i64>,
    }
    let u: Update = serde_json::from_str(text).ok()?;
    if u.kind != "update" {
        return None;
    }
    u.connections
        .iter()
        .map(|(id, n)| Some((id.strip_prefix('p')?.parse().ok()?, *n)))
        .collect()
}

/// One client: connect, subscribe, then read every frame until the server
/// ends the connection (or the task is aborted at the end of the run).
async fn client(
    server: SocketAddr,
    shared: Arc<Shared>,
    i: usize,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let me = &shared.clients[i];
    let links: Vec<String> = me.links.iter().map(|l| format!("p{l}")).collect();
    let open = async {
        let mut ws = connect(server, &format!("/parties/page/p{}", me.page)).await?;
        ws.send(subscribe_msg(&links)).await?;
        anyhow::Ok(ws)
    };
    let Some(mut ws) = opened(&shared, me, open).await else {
        return;
    };
    // Held until the first update (or failure): at most `inflight` opening at once.
    let mut opened = Some(permit);
    let first_deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let next = if opened.is_some() {
            match tokio::time::timeout_at(first_deadline, ws.next()).await {
                Ok(n) => n,
                Err(_) => {
                    shared.error("first update: timed out after 30 s".into());
                    me.state.store(FAILED, Ordering::Relaxed);
                    return;
                }
            }
        } else {
            ws.next().await
        };
        let why = match next {
            Some(Ok(Message::Text(t))) => {
                apply(&shared, me, &t);
                if opened.take().is_some() {
                    me.state.store(OPEN, Ordering::Relaxed);
                }
                continue;
            }
            Some(Ok(Message::Close(frame))) => match frame {
                Some(f) => u16::from(f.code).to_string(),
                None => "no_code".to_string(),
            },
            Some(Ok(_)) => continue,
            None | Some(Err(tungstenite::Error::ConnectionClosed)) => "eof".to_string(),
            Some(Err(tungstenite::Error::Io(e))) => format!("io_{:?}", e.kind()),
            Some(Err(e)) => {
                shared.error(format!("read: {e}"));
                "error".to_string()
            }
        };
        shared.server_closed(why);
        let state = if opened.take().is_some() {
            FAILED
        } else {
            CLOSED
        };
        me.state.store(state, Ordering::Relaxed);
        return;
    }
}

/// Waits at most 30 s for a client's connection to open; on an error or
/// the timeout, records it and marks the client failed (`None`).
async fn opened<T>(
    shared: &Shared,
    me: &Client,
    open: impl std::future::Future<Output = anyhow::Result<T>>,
) -> Option<T> {
    let why = match tokio::time::timeout(Duration::from_secs(30), open).await {
        Ok(Ok(t)) => return Some(t),
        Ok(Err(e)) => format!("open: {e}"),
        Err(_) => "open: timed out after 30 s".into(),
    };
    shared.error(why);
    me.state.store(FAILED, Ordering::Relaxed);
    None
}

/// Applies one message to a client's view (a count of an id it does not
/// follow, or anything but an update, is unexpected).
fn apply(shared: &Shared, me: &Client, text: &str) {
    shared.updates.fetch_add(1, Ordering::Relaxed);
    match update_counts(text) {
        Some(counts) => {
            for (id, n) in counts {
                match me.links.iter().position(|&l| l == id) {
                    Some(k) => me.view[k].store(n, Ordering::Relaxed),
                    None => {
                        shared.unexpected.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        None => {
            shared.unexpected.fetch_add(1, Ordering::Relaxed);
            shared.error(format!("unexpected message {text}"));
        }
    }
}

/// One event-stream client: open the stream with its links, then read
/// every event until the server ends it (or the task is aborted).
async fn client_sse(
    server: SocketAddr,
    shared: Arc<Shared>,
    i: usize,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let me = &shared.clients[i];
    let links: Vec<String> = me.links.iter().map(|l| format!("p{l}")).collect();
    let open = async {
        let mut sse = connect_sse(server, &format!("p{}", me.page), &links).await?;
        let first = sse.next_update().await?;
        anyhow::Ok((sse, first))
    };
    let Some((mut sse, first)) = opened(&shared, me, open).await else {
        return;
    };
    apply(&shared, me, &first);
    me.state.store(OPEN, Ordering::Relaxed);
    // At most `inflight` opening at once.
    drop(permit);
    let why = loop {
        match sse.next_data().await {
            Ok(Some(text)) => apply(&shared, me, &text),
            Ok(None) => break "eof".to_string(),
            Err(e) => {
                break format!(
                    "io_{:?}",
                    e.downcast_ref::<std::io::Error>().map(|e| e.kind())
                )
            }
        }
    };
    shared.server_closed(why);
    me.state.store(CLOSED, Ordering::Relaxed);
}

/// (clients open, clients open with an exact view).
fn exactness(shared: &Shared) -> (usize, usize) {
    let mut truth = [0i64; 2 * RAMP_PAGES];
    for c in &shared.clients {
        if c.state.load(Ordering::Relaxed) == OPEN {
            truth[c.page] += 1;
        }
    }
    let mut open = 0;
    let mut exact = 0;
    for c in &shared.clients {
        if c.state.load(Ordering::Relaxed) != OPEN {
            continue;
        }
        open += 1;
        if c.links
            .iter()
            .zip(&c.view)
            .all(|(&l, v)| v.load(Ordering::Relaxed) == truth[l])
        {
            exact += 1;
        }
    }
    (open, exact)
}

/// The ramp over WebSockets, then over event streams (a fresh service each).
pub fn ramp(rt: &tokio::runtime::Runtime, smoke: bool, nofile: u64) {
    let rounds: usize = env_or("LC_BENCH_RAMP_ROUNDS", if smoke { 1 } else { 2 });
    let modes = [
        Mode::Quiet,
        Mode::Busy,
        Mode::BusyUnbudgeted,
        Mode::BusyMaxDelay5s,
    ];
    let mut rates: Vec<[f64; 4]> = Vec::new();
    for r in 0..rounds {
        let mut rate = [0.0; 4];
        for (k, mode) in modes.into_iter().enumerate() {
            conntrack_check(&format!("ramp round {r} {}", mode.name()));
            rate[k] = round(rt, smoke, nofile, mode, r, Transport::WebSocket);
        }
        rates.push(rate);
    }
    let median = |k: usize| -> f64 {
        let mut v: Vec<f64> = rates.iter().map(|r| r[k] / r[0]).collect();
        v.sort_by(f64::total_cmp);
        pct(&v, 50.0)
    };
    let per_round = |k: usize| -> String {
        let v: Vec<String> = rates
            .iter()
            .map(|r| format!("{:.2}", r[k] / r[0]))
            .collect();
        v.join(",")
    };
    Line::new("ramp_ratio")
        .s("rounds", rounds)
        .f("busy_over_quiet", median(1))
        .s("busy_over_quiet_by_round", per_round(1))
        .f("unbudgeted_over_quiet", median(2))
        .s("unbudgeted_over_quiet_by_round", per_round(2))
        .f("max_delay_5s_over_quiet", median(3))
        .s("max_delay_5s_over_quiet_by_round", per_round(3))
        .s("target_busy_over_quiet", 0.8)
        .print();
    // The same busy ramp over event streams (a fresh service).
    conntrack_check("ramp over event streams");
    round(rt, smoke, nofile, Mode::Busy, 0, Transport::EventStream);
}

/// The `n` clients of a ramp in `mode`: client `i` on page `i % 100`,
/// following 3 other pages at random (quiet: pages nobody opens).
fn ramp_clients(n: usize, mode: Mode) -> Vec<Client> {
    let mut rng = Rng::new(4242);
    (0..n)
        .map(|i| {
            let page = i % RAMP_PAGES;
            let mut links = [usize::MAX; RAMP_LINKS];
            let mut k = 0;
            while k < RAMP_LINKS {
                let l = rng.below(RAMP_PAGES as u64) as usize;
                let link = if mode == Mode::Quiet {
                    l + RAMP_PAGES
                } else {
                    l
                };
                if l != page && !links.contains(&link) {
                    links[k] = link;
                    k += 1;
                }
            }
            Client {
                page,
                links,
                view: std::array::from_fn(|_| AtomicI64::new(-1)),
                state: AtomicU8::new(OPENING),
            }
        })
        .collect()
}

/// The opening of a ramp, as measured.
struct Opening {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    ramp_secs: f64,
    ramp_end: Instant,
    updates: usize,
    service_cpu_pct: f64,
    client_cpu_pct: f64,
}

/// Opens every client (at most `inflight` at once) over `transport`;
/// returns once each has opened or failed.
async fn open_clients(
    server: SocketAddr,
    pid: u32,
    shared: &Arc<Shared>,
    inflight: usize,
    transport: Transport,
) -> Opening {
    let n = shared.clients.len();
    let sem = Arc::new(tokio::sync::Semaphore::new(inflight));
    let mut tasks = Vec::with_capacity(n);
    let (service_cpu0, client_cpu0) = (cpu_secs(pid), cpu_secs(std::process::id()));
    let started = Instant::now();
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await.expect("semaphore");
        tasks.push(match transport {
            Transport::WebSocket => tokio::spawn(client(server, shared.clone(), i, permit)),
            Transport::EventStream => tokio::spawn(client_sse(server, shared.clone(), i, permit)),
        });
    }
    // Every client has opened or failed once all permits are back.
    let _all = sem.acquire_many(inflight as u32).await.expect("semaphore");
    let ramp_end = Instant::now();
    let ramp_secs = (ramp_end - started).as_secs_f64();
    Opening {
        tasks,
        ramp_secs,
        ramp_end,
        updates: shared.updates.load(Ordering::Relaxed),
        service_cpu_pct: 100.0 * (cpu_secs(pid) - service_cpu0) / ramp_secs,
        client_cpu_pct: 100.0 * (cpu_secs(std::process::id()) - client_cpu0) / ramp_secs,
    }
}

/// Waits until every open client's view is exact (or `limit`), and at
/// least `settle`: the time to converge after the ramp, if it did.
async fn converge(
    shared: &Shared,
    ramp_end: Instant,
    settle: Duration,
    limit: Duration,
) -> Option<Duration> {
    let mut converged: Option<Duration> = None;
    loop {
        let now = Instant::now();
        let (open, exact) = exactness(shared);
        if converged.is_none() && open == exact {
            converged = Some(now - ramp_end);
        }
        let waited = now - ramp_end;
        if (converged.is_some() && waited >= settle) || waited >= limit.max(settle) {
            return converged;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Server closes in `phase`: (count, `code:count,…` or `none`).
fn closes_in(shared: &Shared, phase: usize) -> (u64, String) {
    let closes = shared.closes.lock().expect("not poisoned");
    let of_phase: Vec<(&String, &u64)> = closes
        .iter()
        .filter(|((p, _), _)| *p == phase)
        .map(|((_, why), n)| (why, n))
        .collect();
    let count = of_phase.iter().map(|(_, n)| **n).sum();
    let parts: Vec<String> = of_phase
        .iter()
        .map(|(why, n)| format!("{why}:{n}"))
        .collect();
    let by_code = if parts.is_empty() {
        "none".into()
    } else {
        parts.join(",")
    };
    (count, by_code)
}

/// What a round prints besides its opening.
struct Outcome {
    open: usize,
    exact: usize,
    converged: Option<Duration>,
    settle_secs: f64,
    rss: u64,
    fds: usize,
}

/// One ramp in `mode` over `transport`; returns its opening rate (connections/s).
fn round(
    rt: &tokio::runtime::Runtime,
    smoke: bool,
    nofile: u64,
    mode: Mode,
    r: usize,
    transport: Transport,
) -> f64 {
    let fit = nofile.saturating_sub(1000) as usize;
    // `LC_BENCH_RAMP_CLIENTS=N` overrides the number of clients.
    let n = env_or("LC_BENCH_RAMP_CLIENTS", if smoke { 500 } else { 15_000 }).min(fit);
    let inflight: usize = env_or("LC_BENCH_RAMP_INFLIGHT", 512);
    let settle = Duration::from_secs(if smoke { 1 } else { 5 });
    let converge_limit = Duration::from_secs(if smoke { 5 } else { 30 });
    // Per-IP caps off (`kit::settings::NO_CAPS`), the global cap above the ramp.
    let max = (n + 1000).to_string();
    let mut env = vec![("LIMITS__MAX_CONNECTIONS", max.as_str())];
    match mode {
        Mode::BusyUnbudgeted => {
            env.push(("COUNTER__DELIVERY_BUDGET", "1000000000000"));
            env.push(("COUNTER__MAX_WORKER_LAG", "1h"));
        }
        Mode::BusyMaxDelay5s => env.push(("COUNTER__MAX_DELAY", "5s")),
        Mode::Quiet | Mode::Busy => {}
    }
    let service = ChildService::start(&env);
    let shared = Arc::new(Shared {
        clients: ramp_clients(n, mode),
        phase: AtomicUsize::new(PHASE_RAMP),
        closes: Mutex::default(),
        unexpected: AtomicUsize::new(0),
        updates: AtomicUsize::new(0),
        first_error: Mutex::default(),
    });
    let (mut opening, outcome) = rt.block_on(async {
        let opening = open_clients(service.addr, service.pid(), &shared, inflight, transport).await;
        shared.phase.store(PHASE_SETTLE, Ordering::Relaxed);
        let converged = converge(&shared, opening.ramp_end, settle, converge_limit).await;
        let settle_secs = secs(opening.ramp_end);
        let (open, exact) = exactness(&shared);
        shared.phase.store(PHASE_DONE, Ordering::Relaxed);
        let (rss, fds) = (rss_kib(service.pid()), open_fds(service.pid()));
        for t in &opening.tasks {
            t.abort();
        }
        let outcome = Outcome {
            open,
            exact,
            converged,
            settle_secs,
            rss,
            fds,
        };
        (opening, outcome)
    });
    rt.block_on(async {
        for t in opening.tasks.iter_mut() {
            let _ = t.await;
        }
    });
    print_round(&shared, (mode, r, transport, inflight), &opening, &outcome);
    drop(service);
    n as f64 / opening.ramp_secs
}

/// The `ramp` line of a round.
fn print_round(
    shared: &Shared,
    (mode, r, transport, inflight): (Mode, usize, Transport, usize),
    opening: &Opening,
    o: &Outcome,
) {
    let n = shared.clients.len();
    let failed = shared
        .clients
        .iter()
        .filter(|c| c.state.load(Ordering::Relaxed) == FAILED)
        .count();
    let (ramp_closes, ramp_codes) = closes_in(shared, PHASE_RAMP);
    let (settle_closes, settle_codes) = closes_in(shared, PHASE_SETTLE);
    let secs = opening.ramp_secs;
    Line::new("ramp")
        .s("transport", transport.name())
        .s("mode", mode.name())
        .s("round", r)
        .s("clients", n)
        .s("pages", RAMP_PAGES)
        .s("links", RAMP_LINKS)
        .s("inflight", inflight)
        .f("ramp_secs", secs)
        .f("connects_per_s", n as f64 / secs)
        .f("ramp_updates_per_s", opening.updates as f64 / secs)
        .f("ramp_service_cpu_pct", opening.service_cpu_pct)
        .f("ramp_client_cpu_pct", opening.client_cpu_pct)
        .s("open", o.open)
        .s("exact", o.exact)
        .s("not_exact", o.open - o.exact)
        .s("failed_opens", failed)
        .s("server_closes_ramp", ramp_closes)
        .s("server_closes_settle", settle_closes)
        .s("closes_ramp_by_code", ramp_codes)
        .s("closes_settle_by_code", settle_codes)
        .f(
            "converge_ms",
            o.converged.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3),
        )
        .f("settle_secs", o.settle_secs)
        .s("unexpected_msgs", shared.unexpected.load(Ordering::Relaxed))
        .s("service_rss_kib", o.rss)
        .s("service_fds", o.fds)
        .s("target_server_closes", 0)
        .s("target_exact", n)
        .print();
    if let Some(e) = shared.first_error.lock().expect("not poisoned").as_ref() {
        println!("#   first error: {e}");
    }
}
