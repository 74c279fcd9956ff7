//! `fanout`: the release binary as a child; 1,000 rooms × 10 connections,
//! all subscribed to `hot`; 8 togglers open and close 1,000 connections to
//! `hot`, ramp after ramp, so each count value identifies the change it
//! reflects. Publish lag (change → a sampled subscriber sees it),
//! deliveries/s, coalescing, CPU and the service's own publish-lag buckets,
//! next to the bare fan-out ceiling (`--fanout-ceiling-server`, the
//! latest-value policy).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};

use crate::{count_of, kit, support::*};

/// (arrival time, count of "hot") of each update one sampled subscriber got.
type Receipts = Vec<(Instant, u64)>;

/// Togglers opening and closing connections to `hot`.
const TOGGLERS: usize = 8;

/// Fan-out at the default 50 ms broadcast interval and at 100 ms, each
/// against the bare fan-out ceiling (latest-value policy) first, then the
/// service, under two loads: `unpaced` (the togglers go as fast as the
/// server lets them, so each server gets a load of its own making) and
/// `paced` (the same offered rate of count changes on both, `LC_FANOUT_RATE`
/// per second, 1,000 by default). Each (interval, load) runs
/// `LC_FANOUT_ROUNDS` interleaved rounds (3; 1 in smoke): a summary per round
/// gives the service's p99 as a ratio of the ceiling's just before it
/// (target: at most 1.1) and both change rates; `fanout_median` gives the
/// median ratio over the rounds, with its min and max.
pub fn fanout(rt: &tokio::runtime::Runtime, smoke: bool, nofile: u64) {
    let rate = env_or::<f64>("LC_FANOUT_RATE", if smoke { 200.0 } else { 1000.0 }).max(1.0);
    let rounds = env_or::<usize>("LC_FANOUT_ROUNDS", if smoke { 1 } else { 3 }).max(1);
    for interval_ms in [50u64, 100] {
        for load in [Load::Unpaced, Load::Paced(rate)] {
            let mut ratios = Vec::with_capacity(rounds);
            for round in 0..rounds {
                let ceiling = fanout_at(rt, smoke, nofile, interval_ms, Target::Ceiling, load);
                let service = fanout_at(rt, smoke, nofile, interval_ms, Target::Service, load);
                let ratio = service.p99_ms / ceiling.p99_ms;
                ratios.push(ratio);
                let mut line = Line::new("fanout_summary")
                    .s("broadcast_interval_ms", interval_ms)
                    .s("load", load.name())
                    .s("round", round);
                if let Load::Paced(rate) = load {
                    line = line.f("offered_changes_per_s", rate);
                }
                line.f("ceiling_changes_per_s", ceiling.changes_per_s)
                    .f("service_changes_per_s", service.changes_per_s)
                    .f("ceiling_publish_lag_p99_ms", ceiling.p99_ms)
                    .f("service_publish_lag_p99_ms", service.p99_ms)
                    .f("service_vs_ceiling_p99", ratio)
                    .f("target_vs_ceiling_p99", 1.1)
                    .f("target_ms", 2.0 * interval_ms as f64)
                    .print();
            }
            ratios.sort_by(f64::total_cmp);
            Line::new("fanout_median")
                .s("broadcast_interval_ms", interval_ms)
                .s("load", load.name())
                .s("rounds", rounds)
                .f("service_vs_ceiling_p99", pct(&ratios, 50.0))
                .f("service_vs_ceiling_p99_min", pct(&ratios, 0.0))
                .f("service_vs_ceiling_p99_max", pct(&ratios, 100.0))
                .f("target_vs_ceiling_p99", 1.1)
                .print();
        }
    }
}

/// How the togglers go.
#[derive(Clone, Copy)]
enum Load {
    /// Each toggler opens (or closes) its next connection as soon as the
    /// last one is done.
    Unpaced,
    /// Count changes offered at this rate per second (open loop: a change
    /// starts on time whether or not the earlier ones are done).
    Paced(f64),
}

impl Load {
    fn name(self) -> &'static str {
        match self {
            Load::Unpaced => "unpaced",
            Load::Paced(_) => "paced",
        }
    }
}

/// What a run's summary compares.
struct RunFigures {
    p99_ms: f64,
    changes_per_s: f64,
}

/// What a fan-out run drives.
#[derive(Clone, Copy, PartialEq)]
enum Target {
    /// The bare broadcast server (`run_fanout_ceiling`, latest-value policy).
    Ceiling,
    /// The release binary.
    Service,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Ceiling => "ceiling",
            Target::Service => "service",
        }
    }
}

/// The size of a fan-out run.
#[derive(Clone, Copy)]
struct Size {
    rooms: usize,
    per_room: usize,
    /// Connections opened, then closed, per ramp.
    ramp: usize,
    /// Subscribers whose receipts are timed.
    sampled: usize,
    secs: f64,
}

impl Size {
    fn new(smoke: bool) -> Size {
        let (rooms, per_room) = if smoke { (20, 5) } else { (1000, 10) };
        Size {
            rooms,
            per_room,
            ramp: if smoke { 40 } else { 1000 },
            sampled: 100usize.min(rooms * per_room),
            secs: if smoke { 1.0 } else { 10.0 },
        }
    }

    fn subscribers(self) -> usize {
        self.rooms * self.per_room
    }
}

/// The subscribers of a run: every connection counts the updates it gets
/// while `counting`; the first [`Size::sampled`] also keep their receipts.
struct Subscribers {
    held: Vec<tokio::task::JoinHandle<()>>,
    deliveries: Arc<AtomicU64>,
    counting: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Receipts>>>,
    open_errors: Arc<AtomicU64>,
}

impl Drop for Subscribers {
    fn drop(&mut self) {
        for h in &self.held {
            h.abort();
        }
    }
}

/// Opens `per_room` connections on each of `rooms` pages, all following
/// "hot" (64 opening at once); returns once each has its first update or failed.
async fn open_subscribers(server: SocketAddr, size: Size) -> Subscribers {
    let n = size.subscribers();
    let mut subs = Subscribers {
        held: Vec::with_capacity(n),
        deliveries: Arc::default(),
        counting: Arc::default(),
        samples: Arc::new(Mutex::new(vec![Vec::new(); size.sampled])),
        open_errors: Arc::default(),
    };
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut ready = Vec::with_capacity(n);
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await.expect("semaphore");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        ready.push(rx);
        let opened = async move {
            drop(permit);
            let _ = tx.send(());
        };
        let task = subscriber(server, &subs, i, size, opened);
        subs.held.push(tokio::spawn(task));
    }
    for rx in ready {
        let _ = rx.await;
    }
    subs
}

/// Subscriber `i`: opens, runs `opened` (once it has its first update or
/// failed), then counts (and, if sampled, records) every update.
fn subscriber(
    server: SocketAddr,
    subs: &Subscribers,
    i: usize,
    size: Size,
    opened: impl std::future::Future<Output = ()> + Send + 'static,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let (deliveries, counting, samples, open_errors) = (
        subs.deliveries.clone(),
        subs.counting.clone(),
        subs.samples.clone(),
        subs.open_errors.clone(),
    );
    async move {
        let page = format!("r{}", i % size.rooms);
        let r = async {
            let mut ws = connect(server, &format!("/parties/page/{page}")).await?;
            ws.send(subscribe_msg(&["hot".into()])).await?;
            next_update(&mut ws).await?;
            anyhow::Ok(ws)
        };
        let r = tokio::time::timeout(Duration::from_secs(20), r).await;
        opened.await;
        let Ok(Ok(mut ws)) = r else {
            open_errors.fetch_add(1, Ordering::Relaxed);
            return;
        };
        while let Some(Ok(m)) = ws.next().await {
            if !(m.is_text() && counting.load(Ordering::Relaxed)) {
                continue;
            }
            deliveries.fetch_add(1, Ordering::Relaxed);
            if i < size.sampled {
                let now = Instant::now();
                if let Some(v) = m.to_text().ok().and_then(|t| count_of(t, "hot")) {
                    samples.lock().expect("not poisoned")[i].push((now, v));
                }
            }
        }
    }
}

/// Changes of "hot" (time, +1 or -1) and failed toggles.
#[derive(Clone, Default)]
struct Toggles {
    events: Arc<Mutex<Vec<(Instant, i64)>>>,
    errors: Arc<AtomicU64>,
}

impl Toggles {
    fn event(&self, delta: i64) {
        self.events
            .lock()
            .expect("not poisoned")
            .push((Instant::now(), delta));
    }
}

/// Ramps until `end`: `ramp` connections to "hot" opened, then closed.
/// Ramps make each count value unique over a window much longer than any
/// lag, so a delivered value identifies the change it reflects.
async fn toggle_until(
    server: SocketAddr,
    ramp: usize,
    end: Instant,
    toggles: &Toggles,
    load: Load,
) {
    while Instant::now() < end {
        match load {
            Load::Unpaced => unpaced_ramp(server, ramp, toggles).await,
            Load::Paced(rate) => paced_ramp(server, ramp, toggles, rate).await,
        }
    }
}

/// [`TOGGLERS`] concurrent clients open the ramp's connections as fast as
/// the service allows, one after the other each, then close them.
async fn unpaced_ramp(server: SocketAddr, ramp: usize, toggles: &Toggles) {
    let mut openers = Vec::new();
    for t in 0..TOGGLERS {
        let share = ramp / TOGGLERS + usize::from(t < ramp % TOGGLERS);
        let toggles = toggles.clone();
        openers.push(tokio::spawn(async move {
            let mut open = Vec::with_capacity(share);
            for _ in 0..share {
                open.extend(open_one(server, &toggles).await);
            }
            open
        }));
    }
    let mut closers = Vec::new();
    for o in openers {
        let group = o.await.expect("opener");
        let toggles = toggles.clone();
        closers.push(tokio::spawn(async move {
            for ws in group {
                close_one(ws, &toggles).await;
            }
        }));
    }
    for c in closers {
        let _ = c.await;
    }
}

/// Open loop: one open started every `1 / rate` s whether or not the
/// earlier ones are done, then, once all are, one close every `1 / rate` s.
async fn paced_ramp(server: SocketAddr, ramp: usize, toggles: &Toggles, rate: f64) {
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let mut opening = Vec::with_capacity(ramp);
    for _ in 0..ramp {
        ticks.tick().await;
        let toggles = toggles.clone();
        opening.push(tokio::spawn(
            async move { open_one(server, &toggles).await },
        ));
    }
    let mut closing = Vec::with_capacity(ramp);
    for o in opening {
        if let Ok(Some(ws)) = o.await {
            ticks.tick().await;
            let toggles = toggles.clone();
            closing.push(tokio::spawn(async move { close_one(ws, &toggles).await }));
        }
    }
    for c in closing {
        let _ = c.await;
    }
}

/// Opens a connection to "hot" (a change once it is open).
async fn open_one(server: SocketAddr, toggles: &Toggles) -> Option<Ws> {
    match tokio::time::timeout(CYCLE_TIMEOUT, connect(server, "/parties/page/hot")).await {
        Ok(Ok(ws)) => {
            toggles.event(1);
            Some(ws)
        }
        _ => {
            toggles.errors.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Closes `ws` with a close handshake (a change as the close starts).
async fn close_one(ws: Ws, toggles: &Toggles) {
    toggles.event(-1);
    let r = tokio::time::timeout(CYCLE_TIMEOUT, close_handshake(ws)).await;
    if !matches!(r, Ok(Ok(()))) {
        toggles.errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// Publish lags (ms, sorted): a delivered value v at time r reflects the
/// latest change before r that produced v, and every change before it; each
/// change's lag is the time until a sampled subscriber first got an update
/// reflecting it.
fn publish_lags(events: &[(Instant, i64)], samples: &[Receipts]) -> Lags {
    let mut value = 0i64;
    let mut by_value: HashMap<i64, Vec<usize>> = HashMap::new();
    for (i, e) in events.iter().enumerate() {
        value += e.1;
        by_value.entry(value).or_default().push(i);
    }
    let mut lags = Lags::default();
    for recv in samples {
        let mut next = 0usize;
        for &(r, v) in recv {
            let Some(idx) = by_value.get(&(v as i64)) else {
                continue;
            };
            let k = idx.partition_point(|&i| events[i].0 <= r);
            let Some(&j) = k.checked_sub(1).and_then(|k| idx.get(k)) else {
                continue;
            };
            while next <= j {
                let lag = ms(r - events[next].0);
                lags.all.push(lag);
                if events[next].1 > 0 {
                    lags.up.push(lag);
                } else {
                    lags.down.push(lag);
                }
                next += 1;
            }
        }
    }
    for l in [&mut lags.all, &mut lags.up, &mut lags.down] {
        l.sort_by(f64::total_cmp);
    }
    lags
}

/// Publish lags (ms, sorted): of every change, of the connections opened,
/// of the connections closed.
#[derive(Default)]
struct Lags {
    all: Vec<f64>,
    up: Vec<f64>,
    down: Vec<f64>,
}

/// What the toggling phase measured.
struct Toggled {
    secs: f64,
    service_cpu_pct: f64,
    client_cpu_pct: f64,
    delivered: u64,
    changes: usize,
    lags: Lags,
    lag_before: Vec<(f64, f64)>,
    lag_after: Vec<(f64, f64)>,
    toggle_errors: u64,
}

/// Toggles for [`Size::secs`] while the subscribers count their updates.
async fn measure(service: &ChildService, subs: &Subscribers, size: Size, load: Load) -> Toggled {
    let toggles = Toggles::default();
    subs.counting.store(true, Ordering::Relaxed);
    let lag_before = service_lag_buckets(service.admin).await;
    let (service_cpu0, client_cpu0) = (cpu_secs(service.pid()), cpu_secs(std::process::id()));
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(size.secs);
    toggle_until(service.addr, size.ramp, end, &toggles, load).await;
    let toggling = secs(started);
    let service_cpu_pct = 100.0 * (cpu_secs(service.pid()) - service_cpu0) / toggling;
    let client_cpu_pct = 100.0 * (cpu_secs(std::process::id()) - client_cpu0) / toggling;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lag_after = service_lag_buckets(service.admin).await;
    subs.counting.store(false, Ordering::Relaxed);
    let mut events = toggles.events.lock().expect("not poisoned").clone();
    events.sort_by_key(|e| e.0);
    let lags = publish_lags(&events, &subs.samples.lock().expect("not poisoned"));
    Toggled {
        secs: toggling,
        service_cpu_pct,
        client_cpu_pct,
        delivered: subs.deliveries.load(Ordering::Relaxed),
        changes: events.len(),
        lags,
        lag_before,
        lag_after,
        toggle_errors: toggles.errors.load(Ordering::Relaxed),
    }
}

/// One fan-out run; returns its publish lag p99 and rate of count changes.
fn fanout_at(
    rt: &tokio::runtime::Runtime,
    smoke: bool,
    nofile: u64,
    interval_ms: u64,
    target: Target,
    load: Load,
) -> RunFigures {
    let size = Size::new(smoke);
    let n = size.subscribers();
    assert!(
        ((n + size.ramp) as u64) + 500 < nofile,
        "fan-out needs {} descriptors per process; RLIMIT_NOFILE is {nofile}",
        n + size.ramp + 500
    );
    let interval = format!("{interval_ms}ms");
    let service = match target {
        Target::Ceiling => ChildService::fanout_ceiling(interval_ms),
        Target::Service => ChildService::start(&[("COUNTER__BROADCAST_INTERVAL", &interval)]),
    };
    let (t, open_errors) = rt.block_on(async {
        let subs = open_subscribers(service.addr, size).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t = measure(&service, &subs, size, load).await;
        (t, subs.open_errors.load(Ordering::Relaxed))
    });
    drop(service);
    print_run(target, interval_ms, size, load, &t, open_errors);
    RunFigures {
        p99_ms: pct(&t.lags.all, 99.0),
        changes_per_s: t.changes as f64 / t.secs,
    }
}

/// The `fanout` line of a run.
fn print_run(
    target: Target,
    interval_ms: u64,
    size: Size,
    load: Load,
    t: &Toggled,
    open_errors: u64,
) {
    let n = size.subscribers();
    let changes = t.changes as f64;
    let per_conn = t.delivered as f64 / n as f64;
    Line::new("fanout")
        .s("target", target.name())
        .s("broadcast_interval_ms", interval_ms)
        .s("load", load.name())
        .s("rooms", size.rooms)
        .s("conns_per_room", size.per_room)
        .s("subscribers", n)
        .s("togglers", TOGGLERS)
        .s("ramp", size.ramp)
        .f("secs", t.secs)
        .f("count_changes_per_s", changes / t.secs)
        .f("deliveries_per_s", t.delivered as f64 / t.secs)
        .f("msgs_per_conn_per_s", per_conn / t.secs)
        .f("coalescing_ratio", changes / per_conn.max(1.0))
        .f("publish_lag_p50_ms", pct(&t.lags.all, 50.0))
        .f("publish_lag_p99_ms", pct(&t.lags.all, 99.0))
        .f("publish_lag_max_ms", pct(&t.lags.all, 100.0))
        .f("opened_lag_p99_ms", pct(&t.lags.up, 99.0))
        .f("closed_lag_p99_ms", pct(&t.lags.down, 99.0))
        .f("target_ms", 2.0 * interval_ms as f64)
        .f(
            "service_lag_p50_le_ms",
            bucket_quantile_ms(&t.lag_before, &t.lag_after, 0.5),
        )
        .f(
            "service_lag_p99_le_ms",
            bucket_quantile_ms(&t.lag_before, &t.lag_after, 0.99),
        )
        .f("service_cpu_pct", t.service_cpu_pct)
        .f("client_cpu_pct", t.client_cpu_pct)
        .s("open_errors", open_errors)
        .s("toggle_errors", t.toggle_errors)
        .print();
}

/// Cumulative buckets `(le, count)` of the service's publish-lag histogram
/// (from the change at the counter to the frame handed to the connection's
/// writer), scraped from the admin listener's `/metrics`.
async fn service_lag_buckets(admin: Option<SocketAddr>) -> Vec<(f64, f64)> {
    let Some(admin) = admin else {
        return Vec::new();
    };
    let Some(body) = http_body(admin, "/metrics").await else {
        return Vec::new();
    };
    kit::prom::buckets(&body, "link_counter_publish_lag_seconds")
}

/// The bucket bound (ms) under which a fraction `q` of the samples recorded
/// between two scrapes fall (`NaN` without samples).
fn bucket_quantile_ms(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> f64 {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, n)| {
            let n0 = before
                .iter()
                .find(|(l, _)| l == le)
                .map_or(0.0, |(_, n)| *n);
            (*le, n - n0)
        })
        .collect();
    let total = delta.last().map_or(0.0, |(_, n)| *n);
    if total <= 0.0 {
        return f64::NAN;
    }
    delta
        .iter()
        .find(|(_, n)| *n >= q * total)
        .map_or(f64::NAN, |(le, _)| le * 1000.0)
}
