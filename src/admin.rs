//! The operator side: `GET /metrics` (Prometheus text), `GET /dashboard` (a
//! live page, `web/dashboard.html`), and the read-only API it reads
//! (`GET /api/v1/stats`, `GET /api/v1/top?limit=N`, `GET /api/v1/history`,
//! and the stored history: `GET /api/v1/site/history`,
//! `GET /api/v1/pages/{id}/history`).
//! All of it is served by a second HTTP server on `admin.bind` (loopback by
//! default); the API routes are also on the public listener, and `/metrics`
//! is when `admin.metrics_on_public` is set. Nothing here writes state.
//!
//! The history is the server's own record of the last 15 minutes of the
//! connection total (one sample every [`HISTORY_INTERVAL`], at most
//! [`HISTORY_LEN`], in memory only), so that the dashboard's chart is full
//! as soon as it is opened.

use std::{
    collections::VecDeque,
    net::{SocketAddr, TcpListener},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use actix::Addr;
use actix_web::{dev::ServerHandle, http::header, web, App, HttpRequest, HttpResponse, HttpServer};
use tokio::sync::watch;

use crate::{
    counter::{Counter, GetHistory, GetLoad, GetPage, GetTop},
    http::{counter_unavailable, error_response},
    metrics,
    protocol::{
        ErrorCode, HistoryBody, HistoryPoint, LoadHistoryBody, LoadSample, PageId, ProtocolError,
        StatsBody,
    },
    shard::{CountRooms, Shards},
    storage::{Resolution, Storage},
    time::rfc3339,
    visitor::NodeVisitors,
};

/// The dashboard, compiled in (no build step, no external resources).
pub(crate) const DASHBOARD_HTML: &str = include_str!("../web/dashboard.html");

/// Default and largest `limit` of `/api/v1/top`.
pub(crate) const TOP_DEFAULT: usize = 20;
pub(crate) const TOP_MAX: usize = 100;

/// Longest an actor may take to answer a scrape or stats query.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// Period of the history's samples.
pub(crate) const HISTORY_INTERVAL: Duration = Duration::from_secs(5);
/// Samples the history keeps: 15 minutes of them.
pub(crate) const HISTORY_LEN: usize = 180;

/// One history sample.
pub(crate) type Sample = LoadSample;

/// The last [`HISTORY_LEN`] samples, oldest first: a fixed-size ring.
#[derive(Debug)]
pub(crate) struct History {
    samples: VecDeque<Sample>,
}

impl Default for History {
    fn default() -> Self {
        History {
            samples: VecDeque::with_capacity(HISTORY_LEN),
        }
    }
}

impl History {
    /// Adds a sample, dropping the oldest when full.
    pub(crate) fn push(&mut self, sample: Sample) {
        if self.samples.len() == HISTORY_LEN {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
    }

    /// The samples, oldest first.
    pub(crate) fn samples(&self) -> impl ExactSizeIterator<Item = &Sample> {
        self.samples.iter()
    }
}

/// What the operator routes read; cheap to clone.
#[derive(Clone)]
pub(crate) struct Ops {
    /// The counter, for its load and top pages.
    pub(crate) counter: Addr<Counter>,
    /// The shards, for their room counts.
    pub(crate) shards: Shards,
    /// The database, for its size and record counts.
    pub(crate) storage: Storage,
    /// Open WebSocket sessions.
    pub(crate) active: Arc<AtomicUsize>,
    /// Distinct visitors across the node.
    pub(crate) visitors: Arc<NodeVisitors>,
    /// When the server started (uptime).
    pub(crate) started: Instant,
    /// Serve `/metrics` on the public listener too.
    pub(crate) metrics_on_public: bool,
    /// `admin.token`: the bearer token the data routes require, if set.
    pub(crate) token: Option<Arc<str>>,
    /// The last 15 minutes of the connection total (filled by [`start`]).
    pub(crate) history: Arc<Mutex<History>>,
}

impl Ops {
    pub(crate) fn new(
        settings: &crate::Settings,
        counter: Addr<Counter>,
        shards: Shards,
        storage: Storage,
        active: Arc<AtomicUsize>,
        visitors: Arc<NodeVisitors>,
    ) -> Ops {
        Ops {
            counter,
            shards,
            storage,
            active,
            visitors,
            started: Instant::now(),
            metrics_on_public: settings.admin.metrics_on_public,
            token: settings.admin.token.get().map(Arc::from),
            history: Arc::default(),
        }
    }

    /// The history, even if a thread panicked while holding it (a sample
    /// push cannot leave it inconsistent).
    fn history(&self) -> std::sync::MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Routes added to the public listener: the read-only stats API, and
    /// `/metrics` when `admin.metrics_on_public` is set.
    pub(crate) fn configure_public(&self, cfg: &mut web::ServiceConfig) {
        cfg.app_data(web::Data::new(self.clone()));
        configure_api(cfg);
        if self.metrics_on_public {
            cfg.route("/metrics", web::get().to(metrics_text));
        }
    }
}

/// `None` when `req` may read admin data: no `admin.token` is set, or the
/// request carries it as `Authorization: Bearer TOKEN` (compared in constant
/// time). Otherwise the 401 to answer.
fn deny(req: &HttpRequest) -> Option<HttpResponse> {
    let token = req.app_data::<web::Data<Ops>>()?.token.clone()?;
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), token.as_bytes()) {
        return None;
    }
    let mut denied = error_response(
        actix_web::http::StatusCode::UNAUTHORIZED,
        &ProtocolError::new(
            ErrorCode::Unauthorized,
            "admin.token is set: send Authorization: Bearer TOKEN",
        ),
    );
    denied.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    Some(denied)
}

/// Compares without returning early on the first difference (only the
/// length leaks, and a token's length is no secret worth keeping).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let diff = a
        .iter()
        .zip(b)
        .fold(a.len() ^ b.len(), |acc, (x, y)| acc | usize::from(x ^ y));
    diff == 0
}

/// `/api/v1/stats`, `/api/v1/top`, `/api/v1/history` and the stored
/// histories of the site and of a page.
fn configure_api(cfg: &mut web::ServiceConfig) {
    cfg.route("/api/v1/stats", web::get().to(stats))
        .route("/api/v1/top", web::get().to(top))
        .route("/api/v1/history", web::get().to(history))
        .route("/api/v1/site/history", web::get().to(site_history))
        .route("/api/v1/pages/{id}/history", web::get().to(page_history));
}

/// Every route of the admin listener.
fn configure_admin(cfg: &mut web::ServiceConfig) {
    configure_api(cfg);
    cfg.route("/api/v1/pages/{id}", web::get().to(page_info))
        .route("/metrics", web::get().to(metrics_text))
        .route("/dashboard", web::get().to(dashboard))
        .route(
            "/healthz",
            web::get().to(|| async { HttpResponse::Ok().body("ok\n") }),
        )
        .route(
            "/",
            web::get().to(|| async {
                HttpResponse::Found()
                    .insert_header((header::LOCATION, "/dashboard"))
                    .finish()
            }),
        );
}

/// A running admin listener.
pub(crate) struct AdminServer {
    /// The address actually bound.
    pub(crate) addr: SocketAddr,
    /// Stops it.
    pub(crate) handle: ServerHandle,
}

/// Starts recording the history until `shutdown` turns true, then binds
/// `admin.bind` and serves the admin routes on one worker; `Ok(None)` when
/// `admin.bind` is empty (the history is recorded anyway: the public
/// listener serves it too). Must be called inside an actix `System`.
pub(crate) fn start(
    settings: &crate::config::AdminSettings,
    ops: &Ops,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<Option<AdminServer>> {
    record_history(ops, shutdown);
    let Some(bind) = settings.addr() else {
        return Ok(None);
    };
    let listener = TcpListener::bind(bind)
        .map_err(|e| anyhow::anyhow!(crate::config::bind_error("admin.bind", bind, &e)))?;
    let addr = listener.local_addr()?;
    let ops = ops.clone();
    let server = HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(ops.clone()))
            .configure(configure_admin)
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(1)
    .listen(listener)?
    .run();
    let handle = server.handle();
    actix_web::rt::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!(error = %e, "admin server failed");
        }
    });
    tracing::info!(%addr, "admin listener (metrics, dashboard)");
    Ok(Some(AdminServer { addr, handle }))
}

/// Samples the connection total every [`HISTORY_INTERVAL`] (the first at
/// once) into `ops.history` until shutdown begins.
fn record_history(ops: &Ops, mut shutdown: watch::Receiver<bool>) {
    let (active, history) = (ops.active.clone(), ops.history.clone());
    let sample = move || {
        let sample = Sample {
            time_ms: crate::time::now_ms(),
            connections: active.load(Ordering::SeqCst),
        };
        history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(sample);
    };
    // The first sample is taken here, before the listeners serve, so the
    // history is never empty; the task takes the others.
    sample();
    actix_web::rt::spawn(async move {
        let start = tokio::time::Instant::now() + HISTORY_INTERVAL;
        let mut every = tokio::time::interval_at(start, HISTORY_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => sample(),
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
            }
        }
    });
}

/// `GET /metrics`: refreshes the scrape-time gauges from the actors, then renders.
async fn metrics_text(req: HttpRequest, ops: web::Data<Ops>) -> HttpResponse {
    if let Some(denied) = deny(&req) {
        return denied;
    }
    for (i, shard) in ops.shards.all().iter().enumerate() {
        if let Ok(Ok(n)) = tokio::time::timeout(QUERY_TIMEOUT, shard.send(CountRooms)).await {
            metrics::set_rooms(i, n);
        }
    }
    if let Ok(Ok(load)) = tokio::time::timeout(QUERY_TIMEOUT, ops.counter.send(GetLoad)).await {
        metrics::set_counter_state(load.pages, load.subscriptions, load.follower_rooms);
    }
    metrics::set_visitors(ops.visitors.distinct());
    if let Ok(bytes) = ops.storage.size_on_disk() {
        metrics::set_storage(
            bytes,
            ops.storage.stats_records(),
            ops.storage.room_records(),
        );
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(metrics::render())
}

/// `GET /dashboard`.
async fn dashboard() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header((
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src 'self' data:",
        ))
        .body(DASHBOARD_HTML)
}

/// `GET /api/v1/stats`: totals of this server.
async fn stats(req: HttpRequest, ops: web::Data<Ops>) -> HttpResponse {
    if let Some(denied) = deny(&req) {
        return denied;
    }
    let Ok(Ok(load)) = tokio::time::timeout(QUERY_TIMEOUT, ops.counter.send(GetLoad)).await else {
        return counter_unavailable();
    };
    let mut rooms = 0;
    for shard in ops.shards.all() {
        if let Ok(Ok(n)) = tokio::time::timeout(QUERY_TIMEOUT, shard.send(CountRooms)).await {
            rooms += n;
        }
    }
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(StatsBody {
            connections: ops.active.load(Ordering::SeqCst),
            visitors: ops.visitors.distinct(),
            connections_opened_total: load.opened_total,
            rooms,
            pages: load.pages,
            live_pages: load.live_pages,
            subscriptions: load.subscriptions,
            uptime_seconds: ops.started.elapsed().as_secs_f64(),
        })
}

/// `GET /api/v1/history`: the samples of the last 15 minutes, oldest first,
/// with the server's clock (`now_ms`) so that a client can place them on its own.
async fn history(req: HttpRequest, ops: web::Data<Ops>) -> HttpResponse {
    if let Some(denied) = deny(&req) {
        return denied;
    }
    let samples: Vec<Sample> = ops.history().samples().copied().collect();
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(LoadHistoryBody {
            interval_seconds: HISTORY_INTERVAL.as_secs(),
            window_seconds: HISTORY_INTERVAL.as_secs() * HISTORY_LEN as u64,
            max_samples: HISTORY_LEN,
            now_ms: crate::time::now_ms(),
            samples,
        })
}

/// The prefix and suffix of `GET /api/v1/pages/{id}/history`.
const PAGE_HISTORY: (&str, &str) = ("/api/v1/pages/", "/history");

/// `GET /api/v1/pages/{id}` on the admin listener, for the dashboard's page
/// view: the public listener's answer (the same public data, no token).
async fn page_info(req: HttpRequest, ops: web::Data<Ops>) -> HttpResponse {
    let raw = req
        .uri()
        .path()
        .strip_prefix(PAGE_HISTORY.0)
        .unwrap_or_default();
    let page = match PageId::decode(raw) {
        Ok(p) => p,
        Err(e) => {
            return error_response(
                actix_web::http::StatusCode::BAD_REQUEST,
                &ProtocolError::new(ErrorCode::InvalidPageId, e.to_string()),
            )
        }
    };
    let record = ops.storage.load_room(&page);
    match tokio::time::timeout(QUERY_TIMEOUT, ops.counter.send(GetPage(page))).await {
        Ok(Ok(mut info)) => {
            if let Ok(Some(mut r)) = record {
                r.links.sort();
                info.links = r.links.iter().map(|l| l.to_string()).collect();
            }
            HttpResponse::Ok()
                .insert_header((header::CACHE_CONTROL, "no-store"))
                .json(info)
        }
        _ => counter_unavailable(),
    }
}

/// `GET /api/v1/site/history?range=48h|90d`: the whole site's peaks.
async fn site_history(req: HttpRequest, ops: web::Data<Ops>) -> HttpResponse {
    if let Some(denied) = deny(&req) {
        return denied;
    }
    stored_history(&req, &ops, None).await
}

/// `GET /api/v1/pages/{id}/history?range=48h|90d`: one page's peaks (`{id}`
/// percent-encoded as in the page API); 404 for a page with no record.
async fn page_history(req: HttpRequest, ops: web::Data<Ops>) -> HttpResponse {
    if let Some(denied) = deny(&req) {
        return denied;
    }
    let path = req.uri().path();
    let raw = path
        .strip_prefix(PAGE_HISTORY.0)
        .and_then(|p| p.strip_suffix(PAGE_HISTORY.1))
        .unwrap_or_default();
    match PageId::decode(raw) {
        Ok(page) => stored_history(&req, &ops, Some(page)).await,
        Err(e) => error_response(
            actix_web::http::StatusCode::BAD_REQUEST,
            &ProtocolError::new(ErrorCode::InvalidPageId, e.to_string()),
        ),
    }
}

/// The `range` parameter: `48h` (the default) is the per-minute series,
/// `90d` the per-hour one; `None` for any other value.
fn history_range(req: &HttpRequest) -> Option<(&'static str, Resolution)> {
    let mut range = ("48h", Resolution::Minute);
    for (key, value) in form_urlencoded::parse(req.query_string().as_bytes()) {
        if key == "range" {
            range = match &*value {
                "48h" => ("48h", Resolution::Minute),
                "90d" => ("90d", Resolution::Hour),
                _ => return None,
            };
        }
    }
    Some(range)
}

/// The history of `page` (the site when `None`) as [`HistoryBody`].
async fn stored_history(req: &HttpRequest, ops: &Ops, page: Option<PageId>) -> HttpResponse {
    let Some((range, resolution)) = history_range(req) else {
        return error_response(
            actix_web::http::StatusCode::BAD_REQUEST,
            &ProtocolError::new(
                ErrorCode::InvalidParameter,
                "range must be 48h (per minute) or 90d (per hour)",
            ),
        );
    };
    let id = page.as_deref().map(str::to_owned);
    let ask = GetHistory { page, resolution };
    let series = match tokio::time::timeout(QUERY_TIMEOUT, ops.counter.send(ask)).await {
        Ok(Ok(Ok(Some(series)))) => series,
        Ok(Ok(Ok(None))) => {
            return error_response(
                actix_web::http::StatusCode::NOT_FOUND,
                &ProtocolError::new(
                    ErrorCode::UnknownPage,
                    "no record of this page (never viewed, or its stats expired)",
                ),
            )
        }
        // A storage error is logged and counted by the counter.
        _ => return counter_unavailable(),
    };
    let points = series
        .points
        .into_iter()
        .map(|(at, t)| HistoryPoint {
            time: rfc3339(at),
            visitors: t.visitors,
            connections: t.connections,
        })
        .collect();
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(HistoryBody {
            id,
            range: range.to_owned(),
            step_seconds: resolution.step_ms() / 1000,
            from: rfc3339(series.from_ms),
            to: rfc3339(series.to_ms),
            points,
        })
}

/// `GET /api/v1/top?limit=N` (default 20, at most 100): pages by live connections.
async fn top(req: HttpRequest, ops: web::Data<Ops>) -> HttpResponse {
    if let Some(denied) = deny(&req) {
        return denied;
    }
    let mut limit = TOP_DEFAULT;
    for (key, value) in form_urlencoded::parse(req.query_string().as_bytes()) {
        if key == "limit" {
            match value.parse::<usize>() {
                Ok(n) => limit = n.min(TOP_MAX),
                Err(_) => {
                    return error_response(
                        actix_web::http::StatusCode::BAD_REQUEST,
                        &ProtocolError::new(
                            ErrorCode::InvalidLimit,
                            format!("limit must be an integer 0..={TOP_MAX}"),
                        ),
                    )
                }
            }
        }
    }
    match tokio::time::timeout(QUERY_TIMEOUT, ops.counter.send(GetTop(limit))).await {
        Ok(Ok(pages)) => HttpResponse::Ok()
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .json(pages),
        _ => counter_unavailable(),
    }
}

#[cfg(test)]
mod history_tests {
    use super::{History, Sample, HISTORY_LEN};

    #[test]
    fn the_history_keeps_the_newest_samples_and_no_more() {
        let mut h = History::default();
        for i in 0..(HISTORY_LEN as u64 * 3 + 7) {
            h.push(Sample {
                time_ms: i,
                connections: i as usize,
            });
        }
        assert_eq!(h.samples().len(), HISTORY_LEN);
        let times: Vec<u64> = h.samples().map(|s| s.time_ms).collect();
        let last = HISTORY_LEN as u64 * 3 + 6;
        assert_eq!(times[0], last + 1 - HISTORY_LEN as u64);
        assert_eq!(*times.last().expect("full"), last);
        assert!(times.windows(2).all(|w| w[0] + 1 == w[1]), "oldest first");
        assert!(h.samples.capacity() < HISTORY_LEN * 2, "fixed size");
    }
}

#[cfg(test)]
mod token_tests {
    #[test]
    fn tokens_compare_by_every_byte_and_length() {
        use super::constant_time_eq as eq;
        assert!(eq(b"abcdefghijklmnop", b"abcdefghijklmnop"));
        assert!(!eq(b"abcdefghijklmnoq", b"abcdefghijklmnop"));
        assert!(!eq(b"abcdefghijklmno", b"abcdefghijklmnop"));
        assert!(!eq(b"", b"abcdefghijklmnop"));
    }
}
