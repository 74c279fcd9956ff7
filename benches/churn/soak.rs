//! `soak`: mixed traffic on loopback for 30 minutes (`LC_SOAK_SECS`, default
//! 1800; smoke 10) against the release binary in cluster mode, with crashes.
//!
//! The bench starts its own `redis-server` on a free port (no persistence) and
//! the service with `cluster.redis_url` pointing at it, per-IP caps off,
//! `storage.max_records` 50,000 and `storage.cache_capacity` 32 MiB (smoke
//! also: `storage.snapshot_interval` 1 s, `cluster.node_ttl` 1 s and
//! `cluster.heartbeat_interval` 200 ms, so a crashed node's ghost counts go
//! within the smoke run's time). Traffic:
//!
//! - **steady churn** at a third of the service's maximum, measured first
//!   for 3 s with the same cycles unpaced (`LC_SOAK_RATE` sets a fixed rate;
//!   smoke: 500/s), paced over 64 clients: connect to one of 2,000 pages (one
//!   cycle in ten to an observed page), subscribe to 3 pages, first update,
//!   close handshake (one in four drops the TCP stream instead);
//! - **observed pages**: 20 pages held open by 1 to 4 connections each and
//!   one subscriber following them ([`Observed`]);
//! - every 5 minutes (smoke 3 s) a **distinct-id flood**: 20,000 connect/close
//!   cycles (`LC_SOAK_FLOOD_CYCLES`; smoke 300) to page ids never used
//!   before, 64 clients as fast as they go, alongside the churn;
//! - every 10 minutes (smoke 5 s) a **kill -9** of the service and a restart
//!   on the same data dir (new ports: the clients move to the new address,
//!   and the observed pages are opened again);
//! - once, 2.5 minutes after the middle of the run (smoke 7.5 s), a
//!   **Redis restart** (SIGKILL, 2 s down, smoke 0.5 s; same port).
//!
//! The periods stay fixed when `LC_SOAK_SECS` shortens the run: events past
//! its end do not happen.
//!
//! Every minute (smoke: every second) a **quiet point**: the churn pauses
//! until its cycles in flight are done, the subscriber's latest values must
//! equal the held numbers within 30 s (smoke 8 s; a crashed node's counts
//! stay counted for up to `node_ttl` + `heartbeat_interval`), then one line
//! `BENCH soak minute=N ...` with RSS, data dir size, pages tracked and
//! mismatches. When several events fall on one time: the quiet point first,
//! then the flood, the kill, the Redis restart. The summary gives the
//! targets: peak RSS (quiet points and the end of each flood) within the
//! memory budget of the service's settings (`limits.max_connections` set to
//! its default 10,000 here, docs/OPERATIONS.md "Memory budget"); equal
//! phases: the RSS settled after a flood (the quiet point before the next
//! flood, or the end) within +10 % of the one after the previous flood with
//! as many floods since the last restart; data dir within 64 MiB
//! (`LC_SOAK_DATA_CAP_MIB`), 0 mismatches at every quiet point. A smoke run
//! panics on a mismatch.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use crate::{
    flood::{flood_run, PageFn},
    kit::redis::RedisServer,
    support::*,
};

/// Observed pages.
const OBSERVED: usize = 20;
/// Pages the churn picks from (`s0` …).
const CHURN_PAGES: u64 = 2_000;
/// Churn clients.
const CHURN_CLIENTS: usize = 64;
/// Flood clients.
const FLOOD_CLIENTS: usize = 64;
/// RSS at the end may differ by this much from its value at minute 5, percent.
const TARGET_RSS_PCT: f64 = 10.0;

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One churn cycle: connect to one of the churn pages (one in ten: an
/// observed page), subscribe to two churn pages and an observed one, first
/// update, close handshake (one in four: drop the TCP stream).
async fn churn_cycle(server: SocketAddr, rng: &mut Rng) -> anyhow::Result<()> {
    let page = if rng.below(10) == 0 {
        format!("w{}", rng.below(OBSERVED as u64))
    } else {
        format!("s{}", rng.below(CHURN_PAGES))
    };
    let a = rng.below(CHURN_PAGES);
    let b = (a + 1 + rng.below(CHURN_PAGES - 1)) % CHURN_PAGES;
    let links = [
        format!("s{a}"),
        format!("s{b}"),
        format!("w{}", rng.below(OBSERVED as u64)),
    ];
    let leave = if rng.below(4) == 0 {
        Leave::Drop
    } else {
        Leave::Close
    };
    tokio::time::timeout(CYCLE_TIMEOUT, cycle(server, &page, &links, leave))
        .await
        .map_err(|_| anyhow::anyhow!("cycle timed out"))?
}

/// The service's churn ceiling: [`CHURN_CLIENTS`] clients looping
/// [`churn_cycle`] unpaced for `secs`; cycles/s.
async fn max_rate(server: SocketAddr, secs_run: f64) -> f64 {
    let end = Instant::now() + Duration::from_secs_f64(secs_run);
    let started = Instant::now();
    let tasks: Vec<_> = (0..CHURN_CLIENTS)
        .map(|w| {
            tokio::spawn(async move {
                let mut rng = Rng::new(9_000 + w as u64);
                let mut n = 0u64;
                while Instant::now() < end {
                    n += u64::from(churn_cycle(server, &mut rng).await.is_ok());
                }
                n
            })
        })
        .collect();
    let mut n = 0;
    for t in tasks {
        n += t.await.unwrap_or(0);
    }
    n as f64 / secs(started)
}

/// The paced background churn: `rate` cycles/s over [`CHURN_CLIENTS`]
/// clients, pausable, following the service's current address.
struct Churn {
    addr: Arc<Mutex<SocketAddr>>,
    paused: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    in_flight: Arc<AtomicUsize>,
    cycles: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    first_error: Arc<Mutex<Option<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Churn {
    fn start(addr: SocketAddr, rate: f64) -> Churn {
        let mut c = Churn {
            addr: Arc::new(Mutex::new(addr)),
            paused: Arc::default(),
            stop: Arc::default(),
            in_flight: Arc::default(),
            cycles: Arc::default(),
            errors: Arc::default(),
            first_error: Arc::default(),
            tasks: Vec::new(),
        };
        let period = Duration::from_secs_f64(CHURN_CLIENTS as f64 / rate);
        for w in 0..CHURN_CLIENTS {
            let (addr, paused, stop, in_flight, cycles, errors, first_error) = (
                c.addr.clone(),
                c.paused.clone(),
                c.stop.clone(),
                c.in_flight.clone(),
                c.cycles.clone(),
                c.errors.clone(),
                c.first_error.clone(),
            );
            c.tasks.push(tokio::spawn(async move {
                let mut rng = Rng::new(7_000 + w as u64);
                // Spread the clients' ticks over one period.
                tokio::time::sleep(period.mul_f64(w as f64 / CHURN_CLIENTS as f64)).await;
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                loop {
                    tick.tick().await;
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    // Counted in flight before the pause check: a pause
                    // that sees 0 in flight sees no cycle start after it.
                    in_flight.fetch_add(1, Ordering::SeqCst);
                    if paused.load(Ordering::SeqCst) {
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                        continue;
                    }
                    let server = *addr.lock().expect("not poisoned");
                    let r = churn_cycle(server, &mut rng).await;
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    match r {
                        Ok(()) => {
                            cycles.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            first_error
                                .lock()
                                .expect("not poisoned")
                                .get_or_insert(e.to_string());
                        }
                    }
                }
            }));
        }
        c
    }

    /// Stops new cycles and waits for those in flight (at most a cycle timeout).
    async fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + CYCLE_TIMEOUT + Duration::from_secs(1);
        while self.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }

    fn set_addr(&self, addr: SocketAddr) {
        *self.addr.lock().expect("not poisoned") = addr;
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// What happens at a point of the schedule (in this order when several
/// fall on one time).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Quiet,
    Flood,
    Kill,
    RedisRestart,
}

pub fn soak(rt: &tokio::runtime::Runtime, smoke: bool) {
    let total: f64 = env_or("LC_SOAK_SECS", if smoke { 10.0 } else { 1800.0 });
    // `None`: a third of the ceiling measured at the start (smoke: 500/s).
    let fixed_rate: Option<f64> = std::env::var("LC_SOAK_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .or(smoke.then_some(500.0));
    let flood_cycles: u64 = env_or("LC_SOAK_FLOOD_CYCLES", if smoke { 300 } else { 20_000 });
    let data_cap_kib: u64 = env_or("LC_SOAK_DATA_CAP_MIB", 64u64) * 1024;
    // (quiet point, flood, kill) periods and the Redis downtime, seconds.
    let (minute, flood_every, kill_every, redis_down) = if smoke {
        (1.0, 3.0, 5.0, 0.5)
    } else {
        (60.0, 300.0, 600.0, 2.0)
    };
    let converge_limit = Duration::from_secs(if smoke { 8 } else { 30 });

    let mut schedule: Vec<(f64, Event)> = Vec::new();
    // Every `every` seconds before the end.
    let mut add = |every: f64, e: Event| {
        let mut k = 1.0;
        while k * every < total - 1e-9 {
            schedule.push((k * every, e));
            k += 1.0;
        }
    };
    add(minute, Event::Quiet);
    add(flood_every, Event::Flood);
    add(kill_every, Event::Kill);
    // The last quiet point at the end.
    schedule.push((total, Event::Quiet));
    // Mid-run, away from the kills (at multiples of `kill_every`), so a
    // quiet point sees each recovery on its own.
    let redis_at = total / 2.0 + 2.5 * minute;
    if redis_at < total {
        schedule.push((redis_at, Event::RedisRestart));
    }
    schedule.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));

    let mut redis = RedisServer::launch(&[]);
    let url = redis.url();
    let mut extra = vec![
        ("CLUSTER__REDIS_URL", url.as_str()),
        ("STORAGE__MAX_RECORDS", "50000"),
        ("STORAGE__CACHE_CAPACITY", "33554432"),
        // The default cap (the bench's NO_CAPS lifts it): the budget needs one.
        ("LIMITS__MAX_CONNECTIONS", "10000"),
    ];
    if smoke {
        extra.push(("STORAGE__SNAPSHOT_INTERVAL", "1s"));
        extra.push(("CLUSTER__NODE_TTL", "1s"));
        extra.push(("CLUSTER__HEARTBEAT_INTERVAL", "200ms"));
    }
    let settings: Vec<String> = extra.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let count = |e: Event| schedule.iter().filter(|(_, x)| *x == e).count();
    println!(
        "# soak: {total} s, {} quiet points, {} floods of {flood_cycles}, \
         {} kill -9, {} Redis restart; settings {}",
        count(Event::Quiet),
        count(Event::Flood),
        count(Event::Kill),
        count(Event::RedisRestart),
        settings.join(" ")
    );
    let budget_kib = crate::budget::memory_budget_kib(&crate::kit::settings::bench_settings(
        std::path::Path::new("."),
        &extra,
    ));
    let mut service = ChildService::start_in(tempfile::tempdir().expect("temp dir"), &extra);

    let mismatch_points = rt.block_on(async {
        let mut observed = Observed::open(service.addr, "w", OBSERVED)
            .await
            .expect("observed pages open");
        let (rate, max) = match fixed_rate {
            Some(r) => (r, f64::NAN),
            None => {
                let max = max_rate(service.addr, 3.0).await;
                (max / 3.0, max)
            }
        };
        if max.is_nan() {
            println!("# soak: churn at a fixed {rate:.0} cycles/s");
        } else {
            println!("# soak: churn at {rate:.0} cycles/s, a third of the {max:.0}/s measured");
        }
        let churn = Churn::start(service.addr, rate);
        let started = Instant::now();
        let (mut floods, mut kills, mut redis_restarts) = (0u64, 0u64, 0u64);
        let (mut flood_refused, mut flood_errors) = (0u64, 0u64);
        let mut quiet_points = 0u64;
        let mut mismatch_points = 0u64;
        let mut mismatches_max = 0usize;
        let mut rss_peak = 0u64;
        // Floods since the last (re)start, and the RSS of the last quiet point.
        let (mut floods_since_start, mut rss_quiet) = (0u64, 0u64);
        // (floods since the start, RSS settled after the last of them).
        let mut settled: Vec<(u64, u64)> = Vec::new();
        let (mut rss_end, mut data_end, mut data_max, mut pages_end) = (0u64, 0u64, 0u64, 0u64);
        let (mut last_cycles, mut last_errors, mut last_t) = (0u64, 0u64, 0.0f64);
        let mut events_since: Vec<&str> = Vec::new();
        for (at, event) in schedule {
            let due = started + Duration::from_secs_f64(at);
            tokio::time::sleep_until(due.into()).await;
            match event {
                Event::Quiet => {
                    quiet_points += 1;
                    let n = (at / minute - 1e-9).ceil() as u64;
                    churn.pause().await;
                    let (mismatches, converge_ms) = observed.converge(converge_limit).await;
                    if mismatches > 0 {
                        mismatch_points += 1;
                        println!(
                            "#   MISMATCH at minute {n} after {converge_ms:.0} ms: {}",
                            observed.describe_mismatches()
                        );
                    }
                    mismatches_max = mismatches_max.max(mismatches);
                    let rss = rss_kib(service.pid());
                    let data = dir_kib(service.data_dir());
                    let stats = Stats::get(service.admin).await;
                    churn.resume();
                    let t = secs(started);
                    let cycles = churn.cycles.load(Ordering::Relaxed);
                    let errors = churn.errors.load(Ordering::Relaxed);
                    let s = stats.unwrap_or_default();
                    Line::new("soak")
                        .s("minute", n)
                        .f("t_s", t)
                        .s("rss_kib", rss)
                        .s("data_kib", data)
                        .s("pages", s.pages)
                        .s("live_pages", s.live_pages)
                        .s("rooms", s.rooms)
                        .s("connections", s.connections)
                        .s("mismatches", mismatches)
                        .f("converge_ms", converge_ms)
                        .f(
                            "churn_cycles_per_s",
                            (cycles - last_cycles) as f64 / (t - last_t),
                        )
                        .s("churn_errors", errors - last_errors)
                        .s(
                            "events",
                            if events_since.is_empty() {
                                "none".to_string()
                            } else {
                                events_since.join(",")
                            },
                        )
                        .print();
                    if let Some(e) = churn.first_error.lock().expect("not poisoned").take() {
                        println!("#   first churn error since the last line: {e}");
                    }
                    events_since.clear();
                    (last_cycles, last_errors, last_t) = (cycles, errors, t);
                    rss_peak = rss_peak.max(rss);
                    rss_quiet = rss;
                    (rss_end, data_end, pages_end) = (rss, data, s.pages);
                    data_max = data_max.max(data);
                }
                Event::Flood => {
                    if floods_since_start > 0 {
                        settled.push((floods_since_start, rss_quiet));
                    }
                    floods_since_start += 1;
                    floods += 1;
                    let k = floods;
                    let page: PageFn = Arc::new(move |i| format!("sf{k}-{i}"));
                    let f = flood_run(service.addr, flood_cycles, FLOOD_CLIENTS, page).await;
                    rss_peak = rss_peak.max(rss_kib(service.pid()));
                    println!(
                        "# soak: flood {k}: {} cycles to new ids in {:.1} s ({:.0}/s), {} refused, {} errors",
                        f.cycles,
                        f.secs,
                        f.rate(),
                        f.refused,
                        f.errors
                    );
                    if let Some(e) = &f.first_error {
                        println!("#   first flood error: {e}");
                    }
                    flood_refused += f.refused;
                    flood_errors += f.errors;
                    events_since.push("flood");
                }
                Event::Kill => {
                    floods_since_start = 0;
                    kills += 1;
                    let t0 = Instant::now();
                    service.kill9();
                    observed.close().await;
                    // Blocking (reads the child's first lines): the clients
                    // run on the runtime's worker threads meanwhile.
                    service.restart();
                    churn.set_addr(service.addr);
                    observed = Observed::open(service.addr, "w", OBSERVED)
                        .await
                        .expect("observed pages open again after the restart");
                    println!(
                        "# soak: kill -9 {kills}: restarted on the same data dir, \
                         observed pages open again after {:.0} ms ({} of {OBSERVED} \
                         counts off then: the crashed node's ghosts)",
                        ms(t0.elapsed()),
                        observed.mismatches()
                    );
                    events_since.push("kill9");
                }
                Event::RedisRestart => {
                    redis_restarts += 1;
                    redis.stop();
                    tokio::time::sleep(Duration::from_secs_f64(redis_down)).await;
                    // Blocking until it answers PING (a few ms).
                    redis.restart();
                    println!("# soak: Redis killed and restarted after {redis_down} s down");
                    events_since.push("redis_restart");
                }
            }
        }
        let cycles = churn.cycles.load(Ordering::Relaxed);
        let errors = churn.errors.load(Ordering::Relaxed);
        let elapsed = secs(started);
        churn.stop().await;
        if floods_since_start > 0 {
            settled.push((floods_since_start, rss_end));
        }
        // Each settled RSS against the previous one of the same phase.
        let mut phase_pcts = Vec::new();
        for (i, (phase, rss)) in settled.iter().enumerate() {
            if let Some((_, before)) = settled[..i].iter().rev().find(|(p, _)| p == phase) {
                phase_pcts.push(100.0 * (*rss as f64 - *before as f64) / (*before).max(1) as f64);
            }
        }
        let phase_pct_max = phase_pcts.iter().copied().fold(f64::NAN, f64::max);
        let rss_met = phase_pcts.iter().all(|p| *p <= TARGET_RSS_PCT);
        let budget_met = budget_kib.is_some_and(|b| rss_peak <= b);
        let list = |v: Vec<String>| if v.is_empty() { "none".to_string() } else { v.join(",") };
        let data_met = data_max <= data_cap_kib;
        Line::new("soak_summary")
            .f("secs", elapsed)
            .f("rate", rate)
            .f("max_rate", max)
            .s("churn_cycles", cycles)
            .f("churn_cycles_per_s", cycles as f64 / elapsed)
            .s("churn_errors", errors)
            .s("floods", floods)
            .s("flood_cycles", flood_cycles)
            .s("flood_refused", flood_refused)
            .s("flood_errors", flood_errors)
            .s("kills", kills)
            .s("redis_restarts", redis_restarts)
            .s("rss_end_kib", rss_end)
            .s("rss_peak_kib", rss_peak)
            .s("budget_kib", budget_kib.map_or("none".into(), |b| b.to_string()))
            .s("budget_met", budget_met)
            .s(
                "rss_settled_kib",
                list(settled.iter().map(|(p, r)| format!("{p}:{r}")).collect()),
            )
            .s(
                "rss_phase_pcts",
                list(phase_pcts.iter().map(|p| format!("{p:.1}")).collect()),
            )
            .f("rss_phase_pct_max", phase_pct_max)
            .f("target_rss_pct", TARGET_RSS_PCT)
            .s("rss_met", rss_met)
            .s("data_end_kib", data_end)
            .s("data_max_kib", data_max)
            .s("data_cap_kib", data_cap_kib)
            .s("data_met", data_met)
            .s("pages_end", pages_end)
            .s("quiet_points", quiet_points)
            .s("mismatch_points", mismatch_points)
            .s("mismatches_max", mismatches_max)
            .s("mismatches_met", mismatch_points == 0)
            .print();
        if let Some(u) = observed.unexpected() {
            println!("#   subscriber got an unexpected message: {u}");
        }
        observed.close().await;
        mismatch_points
    });
    drop(service);
    drop(redis);
    if smoke {
        assert_eq!(
            mismatch_points, 0,
            "soak: the subscriber's counts stayed wrong past the convergence timeout"
        );
    }
}
