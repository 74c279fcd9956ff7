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

/// The run's lengths, periods and limits (environment, smoke or full scale).
struct Plan {
    smoke: bool,
    /// Seconds of the whole run.
    total: f64,
    /// `None`: a third of the ceiling measured at the start (smoke: 500/s).
    fixed_rate: Option<f64>,
    flood_cycles: u64,
    data_cap_kib: u64,
    /// Seconds between quiet points, floods and kills; the Redis downtime.
    minute: f64,
    flood_every: f64,
    kill_every: f64,
    redis_down: f64,
    converge_limit: Duration,
}

impl Plan {
    fn from_env(smoke: bool) -> Plan {
        let (minute, flood_every, kill_every, redis_down) = if smoke {
            (1.0, 3.0, 5.0, 0.5)
        } else {
            (60.0, 300.0, 600.0, 2.0)
        };
        Plan {
            smoke,
            total: env_or("LC_SOAK_SECS", if smoke { 10.0 } else { 1800.0 }),
            fixed_rate: std::env::var("LC_SOAK_RATE")
                .ok()
                .and_then(|v| v.parse().ok())
                .or(smoke.then_some(500.0)),
            flood_cycles: env_or("LC_SOAK_FLOOD_CYCLES", if smoke { 300 } else { 20_000 }),
            data_cap_kib: env_or("LC_SOAK_DATA_CAP_MIB", 64u64) * 1024,
            minute,
            flood_every,
            kill_every,
            redis_down,
            converge_limit: Duration::from_secs(if smoke { 8 } else { 30 }),
        }
    }

    /// The events by time (and by [`Event`] order on one time).
    fn schedule(&self) -> Vec<(f64, Event)> {
        let total = self.total;
        let mut schedule: Vec<(f64, Event)> = Vec::new();
        // Every `every` seconds before the end.
        let mut add = |every: f64, e: Event| {
            let mut k = 1.0;
            while k * every < total - 1e-9 {
                schedule.push((k * every, e));
                k += 1.0;
            }
        };
        add(self.minute, Event::Quiet);
        add(self.flood_every, Event::Flood);
        add(self.kill_every, Event::Kill);
        // The last quiet point at the end.
        schedule.push((total, Event::Quiet));
        // Mid-run, away from the kills (at multiples of `kill_every`), so a
        // quiet point sees each recovery on its own.
        let redis_at = total / 2.0 + 2.5 * self.minute;
        if redis_at < total {
            schedule.push((redis_at, Event::RedisRestart));
        }
        schedule.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        schedule
    }

    /// The service's settings with Redis at `url`.
    fn service_settings<'a>(&self, url: &'a str) -> Vec<(&'static str, &'a str)> {
        let mut extra = vec![
            ("CLUSTER__REDIS_URL", url),
            ("STORAGE__MAX_RECORDS", "50000"),
            ("STORAGE__CACHE_CAPACITY", "33554432"),
            // The default cap (the bench's NO_CAPS lifts it): the budget needs one.
            ("LIMITS__MAX_CONNECTIONS", "10000"),
        ];
        if self.smoke {
            extra.push(("STORAGE__SNAPSHOT_INTERVAL", "1s"));
            extra.push(("CLUSTER__NODE_TTL", "1s"));
            extra.push(("CLUSTER__HEARTBEAT_INTERVAL", "200ms"));
        }
        extra
    }

    fn print(&self, schedule: &[(f64, Event)], extra: &[(&str, &str)]) {
        let settings: Vec<String> = extra.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let count = |e: Event| schedule.iter().filter(|(_, x)| *x == e).count();
        println!(
            "# soak: {} s, {} quiet points, {} floods of {}, \
             {} kill -9, {} Redis restart; settings {}",
            self.total,
            count(Event::Quiet),
            count(Event::Flood),
            self.flood_cycles,
            count(Event::Kill),
            count(Event::RedisRestart),
            settings.join(" ")
        );
    }
}

pub fn soak(rt: &tokio::runtime::Runtime, smoke: bool) {
    let plan = Plan::from_env(smoke);
    let schedule = plan.schedule();
    let mut redis = RedisServer::launch(&[]);
    let url = redis.url();
    let extra = plan.service_settings(&url);
    plan.print(&schedule, &extra);
    let budget_kib = crate::budget::memory_budget_kib(&crate::kit::settings::bench_settings(
        std::path::Path::new("."),
        &extra,
    ));
    let mut service = ChildService::start_in(tempfile::tempdir().expect("temp dir"), &extra);

    let mismatch_points = rt.block_on(async {
        let mut run = Run::start(&plan, &mut service, &mut redis).await;
        for (at, event) in schedule {
            let due = run.started + Duration::from_secs_f64(at);
            tokio::time::sleep_until(due.into()).await;
            match event {
                Event::Quiet => run.quiet(at).await,
                Event::Flood => run.flood().await,
                Event::Kill => run = run.kill().await,
                Event::RedisRestart => run.redis_restart().await,
            }
        }
        run.finish(budget_kib).await
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

/// What the run counts on its way.
#[derive(Default)]
struct Tally {
    floods: u64,
    kills: u64,
    redis_restarts: u64,
    flood_refused: u64,
    flood_errors: u64,
    quiet_points: u64,
    mismatch_points: u64,
    mismatches_max: usize,
    rss_peak: u64,
    /// Floods since the last (re)start, and the RSS of the last quiet point.
    floods_since_start: u64,
    rss_quiet: u64,
    /// (floods since the start, RSS settled after the last of them).
    settled: Vec<(u64, u64)>,
    rss_end: u64,
    data_end: u64,
    data_max: u64,
    pages_end: u64,
    /// The churn's figures at the last quiet point.
    last_cycles: u64,
    last_errors: u64,
    last_t: f64,
    events_since: Vec<&'static str>,
}

/// A soak under way: the service, Redis, the observed pages and the churn.
struct Run<'a> {
    plan: &'a Plan,
    service: &'a mut ChildService,
    redis: &'a mut RedisServer,
    observed: Observed,
    churn: Churn,
    /// The churn's rate and the maximum measured (`NaN`: a fixed rate).
    rate: f64,
    max: f64,
    started: Instant,
    tally: Tally,
}

impl<'a> Run<'a> {
    /// Opens the observed pages, sets the churn's rate and starts it.
    async fn start(
        plan: &'a Plan,
        service: &'a mut ChildService,
        redis: &'a mut RedisServer,
    ) -> Run<'a> {
        let observed = Observed::open(service.addr, "w", OBSERVED)
            .await
            .expect("observed pages open");
        let (rate, max) = match plan.fixed_rate {
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
        Run {
            plan,
            service,
            redis,
            observed,
            churn,
            rate,
            max,
            started: Instant::now(),
            tally: Tally::default(),
        }
    }

    /// A quiet point: the churn pauses, the counts converge, one line.
    async fn quiet(&mut self, at: f64) {
        let t = &mut self.tally;
        t.quiet_points += 1;
        let n = (at / self.plan.minute - 1e-9).ceil() as u64;
        self.churn.pause().await;
        let (mismatches, converge_ms) = self.observed.converge(self.plan.converge_limit).await;
        if mismatches > 0 {
            t.mismatch_points += 1;
            println!(
                "#   MISMATCH at minute {n} after {converge_ms:.0} ms: {}",
                self.observed.describe_mismatches()
            );
        }
        t.mismatches_max = t.mismatches_max.max(mismatches);
        let rss = rss_kib(self.service.pid());
        let data = dir_kib(self.service.data_dir());
        let stats = Stats::get(self.service.admin).await;
        self.churn.resume();
        let now = secs(self.started);
        let cycles = self.churn.cycles.load(Ordering::Relaxed);
        let errors = self.churn.errors.load(Ordering::Relaxed);
        let s = stats.unwrap_or_default();
        Line::new("soak")
            .s("minute", n)
            .f("t_s", now)
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
                (cycles - t.last_cycles) as f64 / (now - t.last_t),
            )
            .s("churn_errors", errors - t.last_errors)
            .s(
                "events",
                if t.events_since.is_empty() {
                    "none".to_string()
                } else {
                    t.events_since.join(",")
                },
            )
            .print();
        if let Some(e) = self.churn.first_error.lock().expect("not poisoned").take() {
            println!("#   first churn error since the last line: {e}");
        }
        t.events_since.clear();
        (t.last_cycles, t.last_errors, t.last_t) = (cycles, errors, now);
        t.rss_peak = t.rss_peak.max(rss);
        t.rss_quiet = rss;
        (t.rss_end, t.data_end, t.pages_end) = (rss, data, s.pages);
        t.data_max = t.data_max.max(data);
    }

    /// A distinct-id flood alongside the churn.
    async fn flood(&mut self) {
        let t = &mut self.tally;
        if t.floods_since_start > 0 {
            t.settled.push((t.floods_since_start, t.rss_quiet));
        }
        t.floods_since_start += 1;
        t.floods += 1;
        let k = t.floods;
        let page: PageFn = Arc::new(move |i| format!("sf{k}-{i}"));
        let f = flood_run(
            self.service.addr,
            self.plan.flood_cycles,
            FLOOD_CLIENTS,
            page,
        )
        .await;
        t.rss_peak = t.rss_peak.max(rss_kib(self.service.pid()));
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
        t.flood_refused += f.refused;
        t.flood_errors += f.errors;
        t.events_since.push("flood");
    }

    /// kill -9 of the service, a restart on the same data dir (the
    /// observed pages close and open again).
    async fn kill(mut self) -> Run<'a> {
        let t = &mut self.tally;
        t.floods_since_start = 0;
        t.kills += 1;
        let t0 = Instant::now();
        self.service.kill9();
        self.observed.close().await;
        // Blocking (reads the child's first lines): the clients
        // run on the runtime's worker threads meanwhile.
        self.service.restart();
        self.churn.set_addr(self.service.addr);
        self.observed = Observed::open(self.service.addr, "w", OBSERVED)
            .await
            .expect("observed pages open again after the restart");
        println!(
            "# soak: kill -9 {}: restarted on the same data dir, \
             observed pages open again after {:.0} ms ({} of {OBSERVED} \
             counts off then: the crashed node's ghosts)",
            t.kills,
            ms(t0.elapsed()),
            self.observed.mismatches()
        );
        t.events_since.push("kill9");
        self
    }

    /// Redis killed, down a while, started again on the same port.
    async fn redis_restart(&mut self) {
        let redis_down = self.plan.redis_down;
        self.tally.redis_restarts += 1;
        self.redis.stop();
        tokio::time::sleep(Duration::from_secs_f64(redis_down)).await;
        // Blocking until it answers PING (a few ms).
        self.redis.restart();
        println!("# soak: Redis killed and restarted after {redis_down} s down");
        self.tally.events_since.push("redis_restart");
    }

    /// Stops the churn, prints the summary; returns the quiet points with
    /// mismatches.
    async fn finish(self, budget_kib: Option<u64>) -> u64 {
        let cycles = self.churn.cycles.load(Ordering::Relaxed);
        let errors = self.churn.errors.load(Ordering::Relaxed);
        let elapsed = secs(self.started);
        self.churn.stop().await;
        let mut t = self.tally;
        if t.floods_since_start > 0 {
            t.settled.push((t.floods_since_start, t.rss_end));
        }
        let phase_pcts = phase_pcts(&t.settled);
        let phase_pct_max = phase_pcts.iter().copied().fold(f64::NAN, f64::max);
        let rss_met = phase_pcts.iter().all(|p| *p <= TARGET_RSS_PCT);
        let budget_met = budget_kib.is_some_and(|b| t.rss_peak <= b);
        let list = |v: Vec<String>| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(",")
            }
        };
        let data_cap_kib = self.plan.data_cap_kib;
        let data_met = t.data_max <= data_cap_kib;
        Line::new("soak_summary")
            .f("secs", elapsed)
            .f("rate", self.rate)
            .f("max_rate", self.max)
            .s("churn_cycles", cycles)
            .f("churn_cycles_per_s", cycles as f64 / elapsed)
            .s("churn_errors", errors)
            .s("floods", t.floods)
            .s("flood_cycles", self.plan.flood_cycles)
            .s("flood_refused", t.flood_refused)
            .s("flood_errors", t.flood_errors)
            .s("kills", t.kills)
            .s("redis_restarts", t.redis_restarts)
            .s("rss_end_kib", t.rss_end)
            .s("rss_peak_kib", t.rss_peak)
            .s(
                "budget_kib",
                budget_kib.map_or("none".into(), |b| b.to_string()),
            )
            .s("budget_met", budget_met)
            .s(
                "rss_settled_kib",
                list(t.settled.iter().map(|(p, r)| format!("{p}:{r}")).collect()),
            )
            .s(
                "rss_phase_pcts",
                list(phase_pcts.iter().map(|p| format!("{p:.1}")).collect()),
            )
            .f("rss_phase_pct_max", phase_pct_max)
            .f("target_rss_pct", TARGET_RSS_PCT)
            .s("rss_met", rss_met)
            .s("data_end_kib", t.data_end)
            .s("data_max_kib", t.data_max)
            .s("data_cap_kib", data_cap_kib)
            .s("data_met", data_met)
            .s("pages_end", t.pages_end)
            .s("quiet_points", t.quiet_points)
            .s("mismatch_points", t.mismatch_points)
            .s("mismatches_max", t.mismatches_max)
            .s("mismatches_met", t.mismatch_points == 0)
            .print();
        let observed = self.observed;
        if let Some(u) = observed.unexpected() {
            println!("#   subscriber got an unexpected message: {u}");
        }
        observed.close().await;
        t.mismatch_points
    }
}

/// Each settled RSS against the previous one of the same phase, percent.
fn phase_pcts(settled: &[(u64, u64)]) -> Vec<f64> {
    let mut pcts = Vec::new();
    for (i, (phase, rss)) in settled.iter().enumerate() {
        if let Some((_, before)) = settled[..i].iter().rev().find(|(p, _)| p == phase) {
            pcts.push(100.0 * (*rss as f64 - *before as f64) / (*before).max(1) as f64);
        }
    }
    pcts
}
