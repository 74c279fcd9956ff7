//! `flood`: floods of connect/close cycles to distinct page ids against the
//! release binary, each followed by ordinary traffic to new pages.
//!
//! Settings: per-IP caps off (`kit::settings::NO_CAPS`), `storage.max_records` 50,000 and
//! `storage.cache_capacity` 32 MiB, the rest default (smoke: also
//! `limits.max_rooms` 500 and `limits.max_pages` 1,000, so a small flood
//! reaches the caps). Before the first flood, 20 observed pages are held open
//! (1 to 4 connections each) with a subscriber following them ([`Observed`]).
//! Then, three times back to back (`LC_FLOOD_RUNS`):
//!
//! 1. **flood**: 137,000 connect/close cycles (smoke 2,000; `LC_FLOOD_CYCLES`)
//!    over 100,000 distinct page ids (smoke 1,500; `LC_FLOOD_IDS`), fresh ids
//!    for every flood, 64 concurrent clients (`LC_FLOOD_CONCURRENCY`), as fast
//!    as they go: connect, close handshake. A cycle is `refused` when the
//!    server answered it with `overloaded` or close 1013;
//! 2. **ordinary**: 70 connections/s for 20 s (smoke 1.5 s) to fresh page
//!    ids, each subscribing to two ids (an observed page and the previous
//!    ordinary page), held open 1 s (smoke 0.3 s), then closed. A connection
//!    fails when the connect is refused (an HTTP status instead of the
//!    `101`, a socket error, 5 s without an answer), or when it gets an
//!    `overloaded` error or a close (1013, say) before its first update or
//!    while it is held (`failed_late`: after the first update).
//!
//! After each phase: a quiet point (the subscriber's latest values must equal
//! the held numbers within 30 s, smoke 10 s; a mismatch past that fails a
//! smoke run), the service's RSS, the size of its data dir and `pages` of
//! `/api/v1/stats`. Targets: at most 1 % of the ordinary connections fail,
//! RSS ≤ 256 MiB after three floods, data dir ≤ 64 MiB, 0 mismatches.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{self, Message};

use crate::support::*;

/// Observed pages (held open throughout, followed by one subscriber).
const OBSERVED: usize = 20;
/// RSS target after three floods, KiB.
const TARGET_RSS_KIB: u64 = 256 * 1024;
/// Data dir target, KiB.
const TARGET_DATA_KIB: u64 = 64 * 1024;
/// Largest share of ordinary connections that may fail, percent.
const TARGET_FAILED_PCT: f64 = 1.0;

/// Page ids of a flood: cycle index -> id.
pub type PageFn = Arc<dyn Fn(u64) -> String + Send + Sync>;

/// Result of one flood.
pub struct FloodResult {
    /// Cycles attempted (completed, refused or failed).
    pub cycles: u64,
    /// Answered with `overloaded` or close 1013.
    pub refused: u64,
    /// Connect refused, socket error or timeout.
    pub errors: u64,
    pub secs: f64,
    pub first_error: Option<String>,
}

impl FloodResult {
    pub fn rate(&self) -> f64 {
        self.cycles as f64 / self.secs
    }
}

/// Why a connect failed: `http_503` (refused before the upgrade), `io_…`, `handshake`.
pub fn connect_reason(e: &anyhow::Error) -> String {
    match e.downcast_ref::<tungstenite::Error>() {
        Some(tungstenite::Error::Http(r)) => format!("http_{}", r.status().as_u16()),
        Some(tungstenite::Error::Io(io)) => format!("io_{:?}", io.kind()),
        Some(_) => "handshake".into(),
        None => match e.downcast_ref::<std::io::Error>() {
            Some(io) => format!("io_{:?}", io.kind()),
            None => "connect".into(),
        },
    }
}

/// One flood cycle: connect to `page`, close handshake. `Ok(true)`: the
/// server said `overloaded` or closed with 1013 on the way.
async fn flood_cycle(server: SocketAddr, page: &str) -> anyhow::Result<bool> {
    let mut ws = connect(server, &format!("/parties/page/{page}"))
        .await
        .map_err(|e| anyhow::anyhow!("{}: {e}", connect_reason(&e)))?;
    let mut refused = false;
    // The server may have closed first (a refused room): then the close fails.
    let _ = ws.close(None).await;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => refused |= t.contains(r#""overloaded""#),
            Some(Ok(Message::Close(Some(f)))) => {
                refused |= u16::from(f.code) == 1013;
            }
            Some(Ok(_)) => continue,
            None | Some(Err(tungstenite::Error::ConnectionClosed)) => return Ok(refused),
            Some(Err(e)) => return Err(e.into()),
        }
    }
}

/// `cycles` flood cycles by `concurrency` clients as fast as they go; cycle
/// `i` goes to page `page(i)`.
pub async fn flood_run(
    server: SocketAddr,
    cycles: u64,
    concurrency: usize,
    page: PageFn,
) -> FloodResult {
    let next = Arc::new(AtomicU64::new(0));
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (next, first_error, page) = (next.clone(), first_error.clone(), page.clone());
        tasks.push(tokio::spawn(async move {
            let (mut done, mut refused, mut errors) = (0u64, 0u64, 0u64);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= cycles {
                    break;
                }
                done += 1;
                let r = tokio::time::timeout(CYCLE_TIMEOUT, flood_cycle(server, &page(i))).await;
                let e = match r {
                    Ok(Ok(false)) => continue,
                    Ok(Ok(true)) => {
                        refused += 1;
                        continue;
                    }
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "cycle timed out".to_string(),
                };
                errors += 1;
                first_error.lock().expect("not poisoned").get_or_insert(e);
            }
            (done, refused, errors)
        }));
    }
    let mut r = FloodResult {
        cycles: 0,
        refused: 0,
        errors: 0,
        secs: 0.0,
        first_error: None,
    };
    for t in tasks {
        let (d, f, e) = t.await.expect("flood client");
        r.cycles += d;
        r.refused += f;
        r.errors += e;
    }
    r.secs = secs(started);
    r.first_error = first_error.lock().expect("not poisoned").clone();
    r
}

/// What a frame means to an ordinary connection.
enum Step {
    Update,
    Fail(String),
    Other,
}

fn step(m: Option<Result<Message, tungstenite::Error>>) -> Step {
    match m {
        Some(Ok(Message::Text(t))) => {
            if update_map(&t).is_some() {
                return Step::Update;
            }
            let code = serde_json::from_str::<serde_json::Value>(&t)
                .ok()
                .and_then(|v| Some(v.get("code")?.as_str()?.to_string()));
            Step::Fail(match code {
                Some(c) if c == "overloaded" => c,
                Some(c) => format!("error_{c}"),
                None => "unexpected_message".into(),
            })
        }
        Some(Ok(Message::Close(f))) => Step::Fail(match f {
            Some(f) => format!("close_{}", u16::from(f.code)),
            None => "close".into(),
        }),
        Some(Ok(_)) => Step::Other,
        None | Some(Err(tungstenite::Error::ConnectionClosed)) => Step::Fail("eof".into()),
        Some(Err(tungstenite::Error::Io(e))) => Step::Fail(format!("io_{:?}", e.kind())),
        Some(Err(_)) => Step::Fail("read_error".into()),
    }
}

/// One ordinary visit: connect to `page`, subscribe to `links`, first
/// update, held for `hold`, close. `Err((reason, late))`: failed, `late`
/// after its first update.
async fn visit(
    server: SocketAddr,
    page: String,
    links: Vec<String>,
    hold: Duration,
) -> Result<(), (String, bool)> {
    let mut ws = match tokio::time::timeout(
        CYCLE_TIMEOUT,
        connect(server, &format!("/parties/page/{page}")),
    )
    .await
    {
        Err(_) => return Err(("connect_timeout".into(), false)),
        Ok(Err(e)) => return Err((connect_reason(&e), false)),
        Ok(Ok(ws)) => ws,
    };
    if ws.send(subscribe_msg(&links)).await.is_err() {
        return Err(("send".into(), false));
    }
    let first = tokio::time::timeout(CYCLE_TIMEOUT, async {
        loop {
            match step(ws.next().await) {
                Step::Update => return Ok(()),
                Step::Fail(r) => return Err(r),
                Step::Other => continue,
            }
        }
    })
    .await;
    match first {
        Err(_) => return Err(("first_update_timeout".into(), false)),
        Ok(Err(r)) => return Err((r, false)),
        Ok(Ok(())) => {}
    }
    let held = tokio::time::timeout(hold, async {
        loop {
            if let Step::Fail(r) = step(ws.next().await) {
                return r;
            }
        }
    })
    .await;
    if let Ok(r) = held {
        return Err((r, true));
    }
    let _ = tokio::time::timeout(CYCLE_TIMEOUT, close_handshake(ws)).await;
    Ok(())
}

/// Result of an ordinary-traffic phase.
struct OrdinaryResult {
    attempted: u64,
    failed: u64,
    /// Of `failed`: after the first update.
    late: u64,
    /// Failure reason -> count.
    reasons: BTreeMap<String, u64>,
    secs: f64,
}

impl OrdinaryResult {
    fn failed_pct(&self) -> f64 {
        100.0 * self.failed as f64 / self.attempted.max(1) as f64
    }
    fn reasons(&self) -> String {
        if self.reasons.is_empty() {
            return "none".into();
        }
        let parts: Vec<String> = self
            .reasons
            .iter()
            .map(|(r, n)| format!("{r}:{n}"))
            .collect();
        parts.join(",")
    }
}

/// `rate` visits per second for `secs` to fresh pages `o{run}-{k}`, each
/// subscribing to an observed page and the previous visit's page.
async fn ordinary_run(
    server: SocketAddr,
    run: usize,
    rate: f64,
    secs_run: f64,
    hold: Duration,
) -> OrdinaryResult {
    let n = (rate * secs_run).round() as u64;
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tasks = Vec::with_capacity(n as usize);
    for k in 0..n {
        tick.tick().await;
        let page = format!("o{run}-{k}");
        let links = vec![
            format!("held{}", k as usize % OBSERVED),
            format!("o{run}-{}", k.saturating_sub(1)),
        ];
        tasks.push(tokio::spawn(visit(server, page, links, hold)));
    }
    let mut r = OrdinaryResult {
        attempted: n,
        failed: 0,
        late: 0,
        reasons: BTreeMap::new(),
        secs: 0.0,
    };
    for t in tasks {
        if let Err((reason, late)) = t.await.expect("visit") {
            r.failed += 1;
            r.late += u64::from(late);
            *r.reasons.entry(reason).or_default() += 1;
        }
    }
    r.secs = secs(started);
    r
}

/// The service's state at the end of a phase.
struct Sample {
    mismatches: usize,
    converge_ms: f64,
    rss_kib: u64,
    data_kib: u64,
    stats: Option<Stats>,
}

/// The quiet point at the end of a phase, then RSS, data dir and stats.
async fn sample(service: &ChildService, observed: &Observed, limit: Duration) -> Sample {
    let (mismatches, converge_ms) = observed.converge(limit).await;
    if mismatches > 0 {
        println!(
            "#   MISMATCH after {converge_ms:.0} ms: {}",
            observed.describe_mismatches()
        );
    }
    Sample {
        mismatches,
        converge_ms,
        rss_kib: rss_kib(service.pid()),
        data_kib: dir_kib(service.data_dir()),
        stats: Stats::get(service.admin).await,
    }
}

impl Sample {
    fn fields(&self, line: Line) -> Line {
        let s = self.stats.unwrap_or_default();
        line.s("rss_kib", self.rss_kib)
            .s("data_kib", self.data_kib)
            .s("pages", s.pages)
            .s("live_pages", s.live_pages)
            .s("rooms", s.rooms)
            .s("stats_ok", self.stats.is_some())
            .s("mismatches", self.mismatches)
            .f("converge_ms", self.converge_ms)
    }
    fn human(&self) -> String {
        let s = self.stats.unwrap_or_default();
        format!(
            "RSS {:.1} MiB, data dir {:.1} MiB, {} pages tracked ({} rooms); held counts {}",
            self.rss_kib as f64 / 1024.0,
            self.data_kib as f64 / 1024.0,
            s.pages,
            s.rooms,
            if self.mismatches == 0 {
                format!("exact after {:.0} ms", self.converge_ms)
            } else {
                format!("WRONG on {} pages", self.mismatches)
            }
        )
    }
}

/// The sizes of the scenario (`LC_FLOOD_*` to change them).
#[derive(Clone, Copy)]
struct Config {
    cycles: u64,
    ids: u64,
    concurrency: usize,
    runs: usize,
    /// Ordinary connections per second after each flood, for `ordinary_secs`.
    rate: f64,
    ordinary_secs: f64,
    /// How long an ordinary connection stays.
    hold: Duration,
    /// Longest wait for the held pages' counts at a quiet point.
    limit: Duration,
}

impl Config {
    fn new(smoke: bool) -> Config {
        let (ordinary_secs, hold) = if smoke {
            (1.5, Duration::from_millis(300))
        } else {
            (20.0, Duration::from_secs(1))
        };
        Config {
            cycles: env_or("LC_FLOOD_CYCLES", if smoke { 2_000 } else { 137_000 }),
            ids: env_or("LC_FLOOD_IDS", if smoke { 1_500 } else { 100_000 }),
            concurrency: env_or("LC_FLOOD_CONCURRENCY", 64),
            runs: env_or("LC_FLOOD_RUNS", 3),
            rate: 70.0,
            ordinary_secs,
            hold,
            limit: Duration::from_secs(if smoke { 10 } else { 30 }),
        }
    }
}

/// What the phases add up to.
#[derive(Default)]
struct Totals {
    mismatches: usize,
    rss_after_floods: u64,
    rss_max: u64,
    data_max: u64,
    failed_pct_max: f64,
    attempted: u64,
    failed: u64,
    /// Cycles per second of each flood.
    rates: Vec<f64>,
}

impl Totals {
    fn add(&mut self, s: &Sample) {
        self.mismatches += s.mismatches;
        self.rss_max = self.rss_max.max(s.rss_kib);
        self.data_max = self.data_max.max(s.data_kib);
    }
}

/// One flood of new page ids, then its quiet point; prints both lines.
async fn flood_phase(
    service: &ChildService,
    observed: &Observed,
    cfg: Config,
    run: usize,
    totals: &mut Totals,
) {
    let ids = cfg.ids;
    let page: PageFn = Arc::new(move |i| format!("f{run}-{}", i % ids));
    let f = flood_run(service.addr, cfg.cycles, cfg.concurrency, page).await;
    let s = sample(service, observed, cfg.limit).await;
    s.fields(
        Line::new("flood")
            .s("run", run)
            .s("phase", "flood")
            .s("cycles", f.cycles)
            .s("ids", ids)
            .s("c", cfg.concurrency)
            .f("secs", f.secs)
            .f("cycles_per_s", f.rate())
            .s("refused", f.refused)
            .s("errors", f.errors),
    )
    .print();
    println!(
        "# flood {run}: {} cycles in {:.1} s ({:.0}/s), {} refused, {} errors; {}",
        f.cycles,
        f.secs,
        f.rate(),
        f.refused,
        f.errors,
        s.human()
    );
    if let Some(e) = &f.first_error {
        println!("#   first error: {e}");
    }
    totals.rates.push(f.rate());
    totals.rss_after_floods = s.rss_kib;
    totals.add(&s);
}

/// Ordinary traffic to new pages after a flood, then its quiet point.
async fn ordinary_phase(
    service: &ChildService,
    observed: &Observed,
    cfg: Config,
    run: usize,
    totals: &mut Totals,
) {
    let o = ordinary_run(service.addr, run, cfg.rate, cfg.ordinary_secs, cfg.hold).await;
    let s = sample(service, observed, cfg.limit).await;
    s.fields(
        Line::new("flood")
            .s("run", run)
            .s("phase", "ordinary")
            .f("rate", cfg.rate)
            .f("secs", o.secs)
            .s("attempted", o.attempted)
            .s("failed", o.failed)
            .s("failed_late", o.late)
            .f("failed_pct", o.failed_pct())
            .s("failures", o.reasons())
            .f("target_failed_pct", TARGET_FAILED_PCT),
    )
    .print();
    println!(
        "# ordinary {run}: {} of {} connections to new pages failed ({:.1} %: {}); {}",
        o.failed,
        o.attempted,
        o.failed_pct(),
        o.reasons(),
        s.human()
    );
    totals.failed_pct_max = totals.failed_pct_max.max(o.failed_pct());
    totals.attempted += o.attempted;
    totals.failed += o.failed;
    totals.add(&s);
}

/// The `flood_summary` line.
fn print_summary(cfg: Config, t: &Totals, observed: &Observed) {
    Line::new("flood_summary")
        .s("runs", cfg.runs)
        .s("cycles", cfg.cycles)
        .s("ids", cfg.ids)
        .f(
            "cycles_per_s_min",
            t.rates.iter().copied().fold(f64::NAN, f64::min),
        )
        .f(
            "cycles_per_s_max",
            t.rates.iter().copied().fold(f64::NAN, f64::max),
        )
        .s("rss_after_floods_kib", t.rss_after_floods)
        .s("rss_max_kib", t.rss_max)
        .s("target_rss_kib", TARGET_RSS_KIB)
        .s("rss_met", t.rss_after_floods <= TARGET_RSS_KIB)
        .s("data_max_kib", t.data_max)
        .s("target_data_kib", TARGET_DATA_KIB)
        .s("data_met", t.data_max <= TARGET_DATA_KIB)
        .s("ordinary_attempted", t.attempted)
        .s("ordinary_failed", t.failed)
        .f("ordinary_failed_pct_max", t.failed_pct_max)
        .f("target_failed_pct", TARGET_FAILED_PCT)
        .s("failed_met", t.failed_pct_max <= TARGET_FAILED_PCT)
        .s("mismatches", t.mismatches)
        .s("held_server_ends", observed.server_ends())
        .print();
    if let Some(u) = observed.unexpected() {
        println!("#   subscriber got an unexpected message: {u}");
    }
}

/// The held pages, then `runs` × (flood, ordinary traffic); the count
/// mismatches seen at the quiet points.
async fn flood_runs(service: &ChildService, cfg: Config) -> usize {
    let observed = Observed::open(service.addr, "held", OBSERVED)
        .await
        .expect("observed pages open");
    let start = sample(service, &observed, cfg.limit).await;
    println!(
        "# flood: {} held connections on {} pages; {}",
        observed.held(),
        observed.page_count(),
        start.human()
    );
    let mut totals = Totals {
        mismatches: start.mismatches,
        rss_max: start.rss_kib,
        data_max: start.data_kib,
        ..Totals::default()
    };
    for run in 1..=cfg.runs {
        flood_phase(service, &observed, cfg, run, &mut totals).await;
        ordinary_phase(service, &observed, cfg, run, &mut totals).await;
    }
    print_summary(cfg, &totals, &observed);
    observed.close().await;
    totals.mismatches
}

pub fn flood(rt: &tokio::runtime::Runtime, smoke: bool) {
    let cfg = Config::new(smoke);
    let mut extra = vec![
        ("STORAGE__MAX_RECORDS", "50000"),
        ("STORAGE__CACHE_CAPACITY", "33554432"),
    ];
    if smoke {
        extra.push(("LIMITS__MAX_ROOMS", "500"));
        extra.push(("LIMITS__MAX_PAGES", "1000"));
    }
    let settings: Vec<String> = extra.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!(
        "# flood: {} x ({} cycles over {} ids, c={}; then {}/s fresh pages for {} s); settings {}",
        cfg.runs,
        cfg.cycles,
        cfg.ids,
        cfg.concurrency,
        cfg.rate,
        cfg.ordinary_secs,
        settings.join(" ")
    );
    let service = ChildService::start(&extra);
    let mismatches_total = rt.block_on(flood_runs(&service, cfg));
    drop(service);
    if smoke {
        assert_eq!(
            mismatches_total, 0,
            "flood: the subscriber's counts stayed wrong past the convergence timeout"
        );
    }
}
