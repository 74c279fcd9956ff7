//! The connection-churn bench suite (see BENCHMARKS.md).
//!
//! `cargo bench --bench churn [-- SCENARIO...]` with scenarios `churn`
//! (service vs. the tokio-tungstenite and actix-http ceilings),
//! `propagation`, `memory`, `fanout`, `ramp`, `oversize`, `flood` (floods of
//! distinct page ids, then ordinary traffic to new pages: failures, RSS, data
//! dir, pages tracked, exact counts) and `soak` (30 minutes of churn, floods,
//! kill -9 restarts and a Redis restart in cluster mode; `LC_SOAK_SECS`) and
//! `cluster` (1 to 6 nodes sharing a private redis-server: Redis commands per
//! cycle, deliveries per publish, propagation, heartbeat gaps, stalls, kill -9)
//! and `cluster-hold` (6 nodes × 15,000 readers on one box: opening rate
//! busy / quiet, KiB per connection, time to exact counts, Redis memory)
//! and `history` (disk bytes per page of a full presence history);
//! none given runs all but `soak` and `cluster-hold`, which run at full scale
//! only when named. `LC_BENCH_SMOKE=1` (or `--smoke`) runs every scenario at
//! tiny scale in a few seconds (`soak` and `cluster-hold` included). Each scenario prints `BENCH ...` summary
//! lines in logfmt (`key=value`), one per measured configuration.

mod actix_ceiling;
mod budget;
mod cluster;
mod cluster_hold;
mod fanout;
mod flood;
mod history;
#[path = "../../tests/kit/mod.rs"]
#[allow(dead_code)] // the bench uses a part of the kit
mod kit;
mod oversize;
mod ramp;
mod soak;
mod startup;
mod support;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use support::*;

/// Scale of a run.
#[derive(Clone, Copy)]
struct Scale {
    smoke: bool,
}

impl Scale {
    /// Measured seconds of one churn run.
    fn churn_secs(self) -> f64 {
        if self.smoke {
            0.5
        } else {
            4.0
        }
    }
    fn warmup(self) -> Duration {
        Duration::from_millis(if self.smoke { 100 } else { 1000 })
    }
}

/// Number of pages the churn clients pick from.
const PAGES: u64 = 200;
/// Links per churn subscribe.
const LINKS: usize = 5;

/// A scenario: its name and how it runs (client runtime, scale,
/// RLIMIT_NOFILE).
type Scenario = (&'static str, fn(&tokio::runtime::Runtime, Scale, u64));

/// Every scenario, in the order they run.
const SCENARIOS: [Scenario; 12] = [
    ("churn", |rt, scale, _| churn(rt, scale)),
    ("propagation", |rt, scale, _| propagation(rt, scale)),
    ("memory", memory),
    ("fanout", |rt, scale, nofile| {
        fanout::fanout(rt, scale.smoke, nofile)
    }),
    ("ramp", |rt, scale, nofile| {
        ramp::ramp(rt, scale.smoke, nofile)
    }),
    ("oversize", |rt, scale, _| {
        oversize::oversize(rt, scale.smoke)
    }),
    ("flood", |rt, scale, _| flood::flood(rt, scale.smoke)),
    ("soak", |rt, scale, _| soak::soak(rt, scale.smoke)),
    ("cluster", |rt, scale, _| cluster::cluster(rt, scale.smoke)),
    ("cluster-hold", |rt, scale, _| {
        cluster_hold::cluster_hold(rt, scale.smoke)
    }),
    ("history", |_, scale, _| history::history(scale.smoke)),
    ("startup", |rt, scale, _| startup::startup(rt, scale.smoke)),
];

/// The 30-minute soak and the cluster hold (90,000 connections) run at
/// full scale only when named.
const NAMED_ONLY: [&str; 2] = ["soak", "cluster-hold"];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    run_child_mode(&args);
    let smoke = std::env::var("LC_BENCH_SMOKE").is_ok_and(|v| v != "0" && !v.is_empty())
        || args.iter().any(|a| a == "--smoke");
    let wanted = wanted_scenarios(&args);
    let run =
        |s: &str| wanted.contains(&s) || (wanted.is_empty() && (smoke || !NAMED_ONLY.contains(&s)));
    let scale = Scale { smoke };
    let nofile = raise_nofile();
    println!(
        "# link-counter bench: smoke={smoke} nproc={} RLIMIT_NOFILE={nofile}",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let started = Instant::now();
    let rt = client_runtime();
    for (name, scenario) in SCENARIOS {
        if run(name) {
            scenario(&rt, scale, nofile);
        }
    }
    println!("# bench done in {:.1}s", secs(started));
}

/// The re-exec modes: the bench runs itself as a ceiling server, a
/// cluster-hold client or a sled opener (these do not return).
fn run_child_mode(args: &[String]) {
    match args.first().map(String::as_str) {
        Some("--fanout-ceiling-server") => {
            let ms = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(50);
            run_fanout_ceiling(Duration::from_millis(ms));
        }
        Some("--actix-ceiling-server") => actix_ceiling::run_actix_ceiling(),
        Some("--cluster-hold-client") => cluster_hold::client_main(&args[1..]),
        Some("--sled-open") => startup::run_sled_open(args.get(1).map_or(".", String::as_str)),
        _ => {}
    }
}

/// The scenarios named on the command line; exits (2) on an unknown name.
fn wanted_scenarios(args: &[String]) -> Vec<&str> {
    let wanted: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with('-'))
        .map(String::as_str)
        .collect();
    let all: Vec<&str> = SCENARIOS.iter().map(|(name, _)| *name).collect();
    for w in &wanted {
        if !all.contains(w) {
            eprintln!("unknown scenario {w:?}; known: {all:?}");
            std::process::exit(2);
        }
    }
    wanted
}

/// The load generator: a 2-thread runtime, as many cores as the machine has.
fn client_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("lc-bench-client")
        .enable_all()
        .build()
        .expect("client runtime")
}

// ------------------------------------------------------------------ churn

/// Result of one churn run.
struct ChurnResult {
    cycles: u64,
    errors: u64,
    secs: f64,
    p50_ms: f64,
    p99_ms: f64,
    first_error: Option<String>,
    /// CPU the server's threads spent over the measured cycles.
    server_cpu_secs: f64,
}

impl ChurnResult {
    fn rate(&self) -> f64 {
        self.cycles as f64 / self.secs
    }

    /// The server's CPU per measured cycle, in µs.
    fn cpu_us_per_cycle(&self) -> f64 {
        self.server_cpu_secs * 1e6 / self.cycles.max(1) as f64
    }
}

/// `concurrency` workers loop cycles against `server` for `secs` after a warm-up.
async fn churn_run(
    server: SocketAddr,
    threads: ServerThreads,
    concurrency: usize,
    leave: Leave,
    warmup: Duration,
    secs: f64,
) -> ChurnResult {
    let start = Instant::now() + warmup;
    let end = start + Duration::from_secs_f64(secs);
    let errors_first: Arc<Mutex<Option<String>>> = Arc::default();
    // The server's CPU from the end of the warm-up to the last cycle's end.
    let cpu_at_start = tokio::spawn(async move {
        tokio::time::sleep_until(start.into()).await;
        server_cpu_secs(threads)
    });
    let mut tasks = Vec::with_capacity(concurrency);
    for w in 0..concurrency {
        let errors_first = errors_first.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(w as u64 + 1);
            let mut times: Vec<f64> = Vec::new();
            let mut errors = 0u64;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let page = format!("p{}", rng.below(PAGES));
                let links = rng.pages(LINKS, PAGES);
                let r = tokio::time::timeout(CYCLE_TIMEOUT, cycle(server, &page, &links, leave))
                    .await
                    .map_err(|_| anyhow::anyhow!("cycle timed out"))
                    .and_then(|r| r);
                if t0 < start {
                    continue;
                }
                match r {
                    Ok(()) => times.push(ms(t0.elapsed())),
                    Err(e) => {
                        errors += 1;
                        let mut first = errors_first.lock().expect("not poisoned");
                        if first.is_none() {
                            *first = Some(e.to_string());
                        }
                    }
                }
            }
            (times, errors)
        }));
    }
    let mut times = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (t, e) = t.await.expect("worker");
        times.extend(t);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let server_cpu_secs = server_cpu_secs(threads) - cpu_at_start.await.expect("cpu sampler");
    times.sort_by(f64::total_cmp);
    let first_error = errors_first.lock().expect("not poisoned").clone();
    ChurnResult {
        cycles: times.len() as u64,
        errors,
        secs: elapsed,
        p50_ms: pct(&times, 50.0),
        p99_ms: pct(&times, 99.0),
        first_error,
        server_cpu_secs,
    }
}

/// Prints one churn run; `ceilings` are (field name, rate) of the ceiling
/// runs it is compared with (`pct_of_ceiling` and the like).
fn print_churn(
    target: &str,
    c: usize,
    leave: Leave,
    round: usize,
    r: &ChurnResult,
    ceilings: &[(&str, f64)],
) {
    let mut line = Line::new("churn")
        .s("target", target)
        .s("round", round)
        .s("c", c)
        .s("leave", leave.name())
        .f("secs", r.secs)
        .s("cycles", r.cycles)
        .f("cycles_per_s", r.rate())
        .f("p50_ms", r.p50_ms)
        .f("p99_ms", r.p99_ms)
        .s("errors", r.errors)
        .f("server_cpu_us_per_cycle", r.cpu_us_per_cycle());
    for (name, ceil) in ceilings {
        line = line.f(name, 100.0 * r.rate() / ceil);
    }
    line.print();
    if let Some(e) = &r.first_error {
        println!("#   first error: {e}");
    }
}

/// Service results of one (concurrency, leave) over the rounds.
#[derive(Default)]
struct ChurnAcc {
    rates: Vec<f64>,
    /// Percent of the tokio-tungstenite ceiling run of the same round.
    ratios: Vec<f64>,
    /// Percent of the actix-http ceiling run of the same round.
    actix_ratios: Vec<f64>,
    p50s: Vec<f64>,
    p99s: Vec<f64>,
    /// The service's CPU per cycle (µs).
    cpu_us: Vec<f64>,
    /// The actix-http ceiling's CPU per cycle of the same round as a percent
    /// of the service's (100: the service costs no more than the stack).
    cpu_ratios: Vec<f64>,
    errors: u64,
}

impl ChurnAcc {
    /// A service run `r` of the round whose ceilings are `c`.
    fn add(&mut self, r: &ChurnResult, c: &Ceilings) {
        self.rates.push(r.rate());
        self.ratios.push(100.0 * r.rate() / c.rate);
        self.actix_ratios.push(100.0 * r.rate() / c.actix);
        self.cpu_us.push(r.cpu_us_per_cycle());
        self.cpu_ratios
            .push(100.0 * c.actix_cpu_us / r.cpu_us_per_cycle().max(f64::MIN_POSITIVE));
        self.p50s.push(r.p50_ms);
        self.p99s.push(r.p99_ms);
        self.errors += r.errors;
    }
}

/// One churn run of `c` clients leaving by `leave` against `server`.
fn churn_against(
    rt: &tokio::runtime::Runtime,
    scale: Scale,
    server: SocketAddr,
    threads: ServerThreads,
    c: usize,
    leave: Leave,
) -> ChurnResult {
    rt.block_on(churn_run(
        server,
        threads,
        c,
        leave,
        scale.warmup(),
        scale.churn_secs(),
    ))
}

/// A round's ceilings at one concurrency.
struct Ceilings {
    c: usize,
    /// tokio-tungstenite, cycles/s.
    rate: f64,
    /// actix-http, cycles/s.
    actix: f64,
    /// actix-http, CPU µs per cycle.
    actix_cpu_us: f64,
}

/// The two ceiling runs of a round at concurrency `c`, printed.
fn churn_ceilings(rt: &tokio::runtime::Runtime, scale: Scale, c: usize, round: usize) -> Ceilings {
    let ceiling = Ceiling::start();
    let in_process = ServerThreads::InProcess;
    let r_ceil = churn_against(rt, scale, ceiling.addr, in_process, c, Leave::Close);
    drop(ceiling);
    print_churn("ceiling", c, Leave::Close, round, &r_ceil, &[]);
    let actix = ChildService::actix_ceiling();
    let threads = ServerThreads::Child(actix.pid());
    let r_actix = churn_against(rt, scale, actix.addr, threads, c, Leave::Close);
    drop(actix);
    print_churn(
        "actix_ceiling",
        c,
        Leave::Close,
        round,
        &r_actix,
        &[("pct_of_ceiling", r_ceil.rate())],
    );
    Ceilings {
        c,
        rate: r_ceil.rate(),
        actix: r_actix.rate(),
        actix_cpu_us: r_actix.cpu_us_per_cycle(),
    }
}

/// Churn against the service and against two bare ceilings, interleaved in
/// one run so all see the same machine: `rounds` rounds of (tokio-tungstenite
/// ceiling, actix-http ceiling, service with close handshake, service with
/// dropped TCP) per concurrency; each service run is compared with the
/// ceiling runs just before it, and the summary line gives the median ratios
/// over the rounds.
fn churn(rt: &tokio::runtime::Runtime, scale: Scale) {
    let rounds = if scale.smoke { 1 } else { 3 };
    // `LC_BENCH_CONCURRENCY=50,500` (the default) picks the concurrencies.
    let concurrencies: Vec<usize> = std::env::var("LC_BENCH_CONCURRENCY")
        .ok()
        .map(|v| v.split(',').filter_map(|c| c.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![50, 500]);
    let mut acc: Vec<((usize, Leave), ChurnAcc)> = Vec::new();
    let mut ceilings: Vec<Ceilings> = Vec::new();
    for round in 0..rounds {
        for &c in &concurrencies {
            conntrack_check(&format!("churn round {round} c={c}"));
            let round_ceilings = churn_ceilings(rt, scale, c, round);
            for leave in [Leave::Close, Leave::Drop] {
                let service = InProcess::start(&[]);
                let threads = ServerThreads::InProcess;
                let r = churn_against(rt, scale, service.addr, threads, c, leave);
                drop(service);
                let vs = [
                    ("pct_of_ceiling", round_ceilings.rate),
                    ("pct_of_actix_ceiling", round_ceilings.actix),
                ];
                print_churn("service", c, leave, round, &r, &vs);
                let i = match acc.iter().position(|(k, _)| *k == (c, leave)) {
                    Some(i) => i,
                    None => {
                        acc.push(((c, leave), ChurnAcc::default()));
                        acc.len() - 1
                    }
                };
                acc[i].1.add(&r, &round_ceilings);
            }
            ceilings.push(round_ceilings);
        }
    }
    for ((c, leave), a) in acc {
        print_churn_summary(c, leave, rounds, a, &ceilings);
    }
}

/// The `churn_summary` line of (`c`, `leave`): medians over the rounds.
fn print_churn_summary(
    c: usize,
    leave: Leave,
    rounds: usize,
    mut a: ChurnAcc,
    ceilings: &[Ceilings],
) {
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        pct(v, 50.0)
    };
    let of_c = ceilings.iter().filter(|r| r.c == c);
    let mut ceil: Vec<f64> = of_c.clone().map(|r| r.rate).collect();
    let mut actix: Vec<f64> = of_c.clone().map(|r| r.actix).collect();
    let mut actix_cpu: Vec<f64> = of_c.map(|r| r.actix_cpu_us).collect();
    a.ratios.sort_by(f64::total_cmp);
    a.actix_ratios.sort_by(f64::total_cmp);
    a.cpu_ratios.sort_by(f64::total_cmp);
    Line::new("churn_summary")
        .s("c", c)
        .s("leave", leave.name())
        .s("rounds", rounds)
        .f("ceiling_cycles_per_s", median(&mut ceil))
        .f("actix_ceiling_cycles_per_s", median(&mut actix))
        .f("service_cycles_per_s", median(&mut a.rates))
        .f("pct_of_ceiling", median(&mut a.ratios))
        .f("pct_of_ceiling_min", pct(&a.ratios, 0.0))
        .f("pct_of_ceiling_max", pct(&a.ratios, 100.0))
        .f("pct_of_actix_ceiling", median(&mut a.actix_ratios))
        .f("pct_of_actix_ceiling_min", pct(&a.actix_ratios, 0.0))
        .f("pct_of_actix_ceiling_max", pct(&a.actix_ratios, 100.0))
        .f("p50_ms", median(&mut a.p50s))
        .f("p99_ms", median(&mut a.p99s))
        .s("errors", a.errors)
        .f("service_cpu_us_per_cycle", median(&mut a.cpu_us))
        .f("actix_ceiling_cpu_us_per_cycle", median(&mut actix_cpu))
        .f("cpu_pct_of_actix_ceiling", median(&mut a.cpu_ratios))
        .f("cpu_pct_of_actix_ceiling_min", pct(&a.cpu_ratios, 0.0))
        .f("cpu_pct_of_actix_ceiling_max", pct(&a.cpu_ratios, 100.0))
        .f("target_pct_of_actix_ceiling", 90.0)
        .print();
}

// ------------------------------------------------------------ propagation

/// Parses the count of `page` out of an update, if present.
fn count_of(text: &str, page: &str) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    v["connections"][page].as_u64()
}

/// An observer of one page's count: a task forwarding (time, count) of each update.
async fn observe(
    server: SocketAddr,
    page: &str,
) -> tokio::sync::mpsc::UnboundedReceiver<(Instant, u64)> {
    let mut ws = connect(server, "/parties/page/observer")
        .await
        .expect("observer connects");
    ws.send(subscribe_msg(&[page.to_string()]))
        .await
        .expect("subscribe");
    let first = next_update(&mut ws).await.expect("first update");
    assert_eq!(count_of(&first, page), Some(0), "{first}");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let page = page.to_string();
    tokio::spawn(async move {
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Text(t) = m {
                if let Some(c) = count_of(&t, &page) {
                    if tx.send((Instant::now(), c)).is_err() {
                        break;
                    }
                }
            }
        }
    });
    rx
}

/// Waits for the observer to show `want`; returns when it arrived.
async fn wait_count(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(Instant, u64)>,
    want: u64,
) -> anyhow::Result<Instant> {
    let deadline = tokio::time::Instant::now() + CYCLE_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((t, c))) if c == want => return Ok(t),
            Ok(Some(_)) => continue,
            Ok(None) => anyhow::bail!("observer ended"),
            Err(_) => anyhow::bail!("count {want} never arrived"),
        }
    }
}

/// Background churn over pages p0..p199 (never the observed page): paced at
/// `rate` cycles/s, or as fast as it goes (`None`); returns the cycles done,
/// the errors and the seconds it ran.
async fn background_churn(
    server: SocketAddr,
    rate: Option<f64>,
    stop: Arc<AtomicBool>,
) -> (u64, u64, f64) {
    let workers = 50usize;
    let period = rate.map(|rate| Duration::from_secs_f64(workers as f64 / rate));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (stop, done, errors) = (stop.clone(), done.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(1000 + w as u64);
            let mut tick = period.map(|period| {
                let offset = period.mul_f64(w as f64 / workers as f64);
                let mut tick =
                    tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick
            });
            while !stop.load(Ordering::Relaxed) {
                if let Some(tick) = &mut tick {
                    tick.tick().await;
                }
                let page = format!("p{}", rng.below(PAGES));
                let links = rng.pages(LINKS, PAGES);
                let r =
                    tokio::time::timeout(CYCLE_TIMEOUT, cycle(server, &page, &links, Leave::Close))
                        .await;
                if matches!(r, Ok(Ok(()))) {
                    done.fetch_add(1, Ordering::Relaxed);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    (
        done.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
        secs(started),
    )
}

/// The load a propagation run measures under.
#[derive(Clone, Copy, PartialEq)]
enum Load {
    /// No background churn; random 0–50 ms pauses between changes, so some
    /// changes fall in the same broadcast interval as the one before.
    Jitter,
    /// No background churn; pauses longer than `broadcast_interval` between
    /// changes (each change is the first in its interval).
    Quiet,
    /// Background churn paced at 1,000 cycles/s (smoke: 200); 0–50 ms pauses.
    Paced,
    /// Background churn as fast as it goes (the CPU saturated); 0–50 ms pauses.
    Saturated,
}

impl Load {
    fn name(self) -> &'static str {
        match self {
            Load::Jitter => "jitter",
            Load::Quiet => "quiet",
            Load::Paced => "paced",
            Load::Saturated => "saturated",
        }
    }
}

fn propagation(rt: &tokio::runtime::Runtime, scale: Scale) {
    for load in [Load::Jitter, Load::Quiet, Load::Paced, Load::Saturated] {
        propagation_under(rt, scale, load);
    }
}

/// One propagation run: an observer of `X` and a client toggling its
/// presence on `X`; prints one line per direction.
fn propagation_under(rt: &tokio::runtime::Runtime, scale: Scale, load: Load) {
    let toggles = if scale.smoke { 5 } else { 150 };
    let bg_rate = match load {
        Load::Jitter | Load::Quiet => None,
        Load::Paced => Some(Some(if scale.smoke { 200.0 } else { 1000.0 })),
        Load::Saturated => Some(None),
    };
    let service = InProcess::start(&[]);
    let interval = Duration::from_millis(50);
    let server = service.addr;
    rt.block_on(async {
        let stop = Arc::new(AtomicBool::new(false));
        let bg = bg_rate.map(|rate| tokio::spawn(background_churn(server, rate, stop.clone())));
        if bg.is_some() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let hot = "X";
        let mut rx = observe(server, hot).await;
        let mut rng = Rng::new(7);
        let (mut up, mut down) = (Vec::new(), Vec::new());
        let mut errors = 0u64;
        // The pause before each change: a random phase against the broadcast
        // tick, and for `Quiet` more than one interval since the last change.
        let pause = |rng: &mut Rng| match load {
            Load::Quiet => interval + Duration::from_millis(10 + rng.below(40)),
            _ => Duration::from_micros(rng.below(50_000)),
        };
        for _ in 0..toggles {
            tokio::time::sleep(pause(&mut rng)).await;
            let r: anyhow::Result<()> = async {
                let ws = connect(server, &format!("/parties/page/{hot}")).await?;
                let t_up = Instant::now();
                up.push(ms(wait_count(&mut rx, 1).await? - t_up));
                tokio::time::sleep(pause(&mut rng)).await;
                let t_down = Instant::now();
                let closing = tokio::spawn(close_handshake(ws));
                down.push(ms(wait_count(&mut rx, 0).await? - t_down));
                closing.await??;
                Ok(())
            }
            .await;
            if let Err(e) = r {
                errors += 1;
                eprintln!("propagation error: {e}");
                // Resynchronise on an empty page before the next toggle.
                tokio::time::sleep(Duration::from_millis(500)).await;
                while rx.try_recv().is_ok() {}
            }
        }
        stop.store(true, Ordering::Relaxed);
        let bg_done = match bg {
            Some(h) => Some(h.await.expect("background churn")),
            None => None,
        };
        for (dir, v) in [("up", &mut up), ("down", &mut down)] {
            v.sort_by(f64::total_cmp);
            let mut line = Line::new("propagation")
                .s("direction", dir)
                .s("load", load.name())
                .s("background", bg_done.is_some())
                .s("samples", v.len())
                .f("p50_ms", pct(v, 50.0))
                .f("p99_ms", pct(v, 99.0))
                .f("max_ms", pct(v, 100.0));
            line = match load {
                Load::Quiet => line.f("target_p50_ms", 5.0).f("target_p99_ms", 60.0),
                _ => line.f("target_ms", ms(interval) + 10.0),
            };
            line = line.s("errors", errors);
            if let Some((done, errs, s)) = bg_done {
                line = line
                    .f("bg_cycles_per_s", done as f64 / s)
                    .s("bg_errors", errs);
            }
            line.print();
        }
    });
    drop(service);
}

// ----------------------------------------------------------------- memory

/// Opens `n` idle subscribed connections (3 links each), at most 64 opening at
/// once; each is then held by a task that keeps reading (answering pings).
async fn open_idle(
    server: SocketAddr,
    transport: Transport,
    n: usize,
    first: usize,
    held: &mut Vec<tokio::task::JoinHandle<()>>,
) -> u64 {
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let errors = Arc::new(AtomicU64::new(0));
    let mut opening = Vec::with_capacity(n);
    for i in first..first + n {
        let permit = sem.clone().acquire_owned().await.expect("semaphore");
        let errors = errors.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        opening.push(rx);
        held.push(tokio::spawn(async move {
            let mut rng = Rng::new(i as u64 + 99);
            let page = format!("p{}", i as u64 % PAGES);
            let links = rng.pages(3, PAGES);
            if transport == Transport::EventStream {
                let r = async {
                    let mut sse = connect_sse(server, &page, &links).await?;
                    sse.next_update().await?;
                    anyhow::Ok(sse)
                };
                let sse = tokio::time::timeout(Duration::from_secs(20), r).await;
                drop(permit);
                let _ = tx.send(());
                match sse {
                    Ok(Ok(mut sse)) => while let Ok(Some(_)) = sse.next_data().await {},
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                return;
            }
            let r = async {
                let mut ws = connect(server, &format!("/parties/page/{page}")).await?;
                ws.send(subscribe_msg(&links)).await?;
                next_update(&mut ws).await?;
                anyhow::Ok(ws)
            };
            let ws = tokio::time::timeout(Duration::from_secs(20), r).await;
            drop(permit);
            let _ = tx.send(());
            match ws {
                Ok(Ok(mut ws)) => while let Some(Ok(_)) = ws.next().await {},
                _ => {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for rx in opening {
        let _ = rx.await;
    }
    errors.load(Ordering::Relaxed)
}

/// Time for a fresh connection to get its first update, `n` times.
async fn probe_fresh(server: SocketAddr, n: usize) -> (Vec<f64>, u64) {
    let mut times = Vec::new();
    let mut errors = 0;
    for i in 0..n {
        let t0 = Instant::now();
        let r = tokio::time::timeout(CYCLE_TIMEOUT, async {
            let mut ws = connect(server, &format!("/parties/page/fresh{i}")).await?;
            ws.send(subscribe_msg(&["p1".into(), "p2".into(), "p3".into()]))
                .await?;
            next_update(&mut ws).await?;
            let t = t0.elapsed();
            close_handshake(ws).await?;
            anyhow::Ok(t)
        })
        .await;
        match r {
            Ok(Ok(t)) => times.push(ms(t)),
            _ => errors += 1,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    times.sort_by(f64::total_cmp);
    (times, errors)
}

/// Waits until RSS stops moving (allocator and kernel settle), then reads it.
async fn settled_rss(pid: u32) -> u64 {
    let mut last = rss_kib(pid);
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = rss_kib(pid);
        if now.abs_diff(last) < 64 {
            return now;
        }
        last = now;
    }
    last
}

/// Idle subscribed connections at two sizes, first against the actix-http
/// ceiling (`--actix-ceiling-server`), then against the service over
/// WebSocket, then over the event stream (a fresh service each); the
/// service's lines carry the ceiling's KiB per connection and the ratio,
/// the event stream's also the WebSocket's figure and the ratio to it.
fn memory(rt: &tokio::runtime::Runtime, scale: Scale, nofile: u64) {
    // Each process needs one descriptor per connection plus some slack.
    let fit = nofile.saturating_sub(1000) as usize;
    let big = if scale.smoke { 600 } else { 15_000.min(fit) };
    let small = if scale.smoke { 200 } else { 5_000.min(big / 3) };
    println!("# memory: RLIMIT_NOFILE={nofile}; sizes {small} and {big}");
    let sizes = [small, big];
    let ceiling = MemoryRun {
        transport: Transport::WebSocket,
        ceiling: None,
        websocket: None,
        visitors: false,
    };
    let ceiling = memory_at(rt, scale, sizes, ChildService::actix_ceiling(), &ceiling);
    let ws = MemoryRun {
        transport: Transport::WebSocket,
        ceiling: Some(ceiling),
        websocket: None,
        visitors: false,
    };
    let ws = memory_at(rt, scale, sizes, ChildService::start(&[]), &ws);
    let sse = MemoryRun {
        transport: Transport::EventStream,
        ceiling: Some(ceiling),
        websocket: Some(ws),
        visitors: false,
    };
    memory_at(rt, scale, sizes, ChildService::start(&[]), &sse);
    // A distinct visitor id on every WebSocket (`?visitor=`).
    let visited = MemoryRun {
        transport: Transport::WebSocket,
        ceiling: Some(ceiling),
        websocket: Some(ws),
        visitors: true,
    };
    support::set_visitor_tabs(Some(1), false);
    memory_at(rt, scale, sizes, ChildService::start(&[]), &visited);
    support::set_visitor_tabs(None, true);
}

/// What one memory run measures and compares with.
struct MemoryRun {
    /// How its clients connect.
    transport: Transport,
    /// The ceiling's KiB per connection (`None`: this is the ceiling run).
    ceiling: Option<[f64; 2]>,
    /// The service's KiB per WebSocket (an event-stream run or one with
    /// visitor ids compares with it).
    websocket: Option<[f64; 2]>,
    /// Every connection carries a distinct visitor id (target: within 5 %
    /// of the ceiling).
    visitors: bool,
}

/// One memory run against `service` (the service if `run.ceiling` is
/// given, else the actix-http ceiling); returns the KiB per connection at
/// each size.
fn memory_at(
    rt: &tokio::runtime::Runtime,
    scale: Scale,
    sizes: [usize; 2],
    mut service: ChildService,
    run: &MemoryRun,
) -> [f64; 2] {
    let pid = service.pid();
    let server = service.addr;
    let pers = rt.block_on(async {
        warm_up(server).await;
        let base = settled_rss(pid).await;
        let client_base = rss_kib(std::process::id());
        let mut held = Vec::new();
        let mut opened = 0usize;
        let mut errors = 0u64;
        let mut rss_small = 0u64;
        let mut pers = [f64::NAN; 2];
        for (k, &n) in sizes.iter().enumerate() {
            errors += open_idle(server, run.transport, n - opened, opened, &mut held).await;
            opened = n;
            let rss = settled_rss(pid).await;
            let per = (rss.saturating_sub(base)) as f64 / n as f64;
            pers[k] = per;
            let (fresh, fresh_errors) = probe_fresh(server, if scale.smoke { 3 } else { 20 }).await;
            let client_per =
                rss_kib(std::process::id()).saturating_sub(client_base) as f64 / n as f64;
            let alive = service.alive();
            let service_fds = open_fds(pid);
            let health = match run.ceiling {
                Some(_) => Some(
                    tokio::time::timeout(Duration::from_secs(5), http_ok(server))
                        .await
                        .unwrap_or(false),
                ),
                None => None,
            };
            let point = MemoryPoint {
                k,
                connections: n,
                service_fds,
                rss_base: base,
                rss,
                rss_small,
                per,
                per_small: pers[0],
                client_per,
                fresh,
                fresh_errors,
                open_errors: errors,
                alive,
                health,
            };
            run.line(&point, sizes).print();
            rss_small = rss;
        }
        close_held(held).await;
        pers
    });
    drop(service);
    pers
}

/// Warms the allocator and the rooms with some churn.
async fn warm_up(server: SocketAddr) {
    for i in 0..200u64 {
        let mut rng = Rng::new(i);
        let _ = cycle(
            server,
            &format!("p{}", i % PAGES),
            &rng.pages(3, PAGES),
            Leave::Close,
        )
        .await;
    }
}

/// Closes the client side of held connections (before the next run opens
/// as many again).
async fn close_held(held: Vec<tokio::task::JoinHandle<()>>) {
    for h in &held {
        h.abort();
    }
    for h in held {
        let _ = h.await;
    }
}

/// One size's figures in a memory run.
struct MemoryPoint {
    /// 0: the small size, 1: the big one.
    k: usize,
    connections: usize,
    service_fds: usize,
    rss_base: u64,
    rss: u64,
    /// RSS at the small size (0 before it).
    rss_small: u64,
    per: f64,
    /// KiB per connection at the small size.
    per_small: f64,
    client_per: f64,
    /// First-update times of fresh connections, ms.
    fresh: Vec<f64>,
    fresh_errors: u64,
    open_errors: u64,
    alive: bool,
    /// `/healthz` answered (`None`: the ceiling run, not asked).
    health: Option<bool>,
}

impl MemoryRun {
    /// The `BENCH memory` line of one size.
    fn line(&self, p: &MemoryPoint, [small, big]: [usize; 2]) -> Line {
        let k = p.k;
        let per = p.per;
        let mut line = Line::new("memory")
            .s(
                "target",
                if self.ceiling.is_some() {
                    "service"
                } else {
                    "actix_ceiling"
                },
            )
            .s("transport", self.transport.name())
            .s("connections", p.connections)
            .s("service_fds", p.service_fds)
            .s("rss_base_kib", p.rss_base)
            .s("rss_kib", p.rss)
            .f("kib_per_conn", per)
            .f("client_kib_per_conn", p.client_per)
            .f("fresh_first_update_p50_ms", pct(&p.fresh, 50.0))
            .f("fresh_first_update_max_ms", pct(&p.fresh, 100.0))
            .s("fresh_errors", p.fresh_errors)
            .s("open_errors", p.open_errors);
        if let Some(ceiling) = self.ceiling {
            line = line
                .s("healthy", p.alive && p.health.unwrap_or(false))
                .f("ceiling_kib_per_conn", ceiling[k])
                .f("vs_ceiling", per / ceiling[k]);
        } else {
            line = line.s("alive", p.alive);
        }
        if k == 1 && p.connections != small {
            line = line
                .f(
                    "marginal_kib_per_conn",
                    p.rss.saturating_sub(p.rss_small) as f64 / (big - small) as f64,
                )
                .f("growth_vs_small", per / p.per_small);
        }
        if self.ceiling.is_some() {
            line = line.f("target_kib_per_conn", 4.0);
        }
        if let Some(ws) = self.websocket {
            line = line
                .f("websocket_kib_per_conn", ws[k])
                .f("vs_websocket", per / ws[k]);
            line = if self.visitors {
                line.s("visitor_ids", "every")
                    .s("target_vs_ceiling", "1.05")
            } else {
                line.f("target_vs_websocket", 1.5)
            };
        }
        line
    }
}

/// `GET /healthz` answers 200.
async fn http_ok(server: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(server).await else {
        return false;
    };
    let req = format!("GET /healthz HTTP/1.1\r\nHost: {server}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    buf.starts_with(b"HTTP/1.1 200")
}
