//! HTTP routes: the WebSocket endpoint of PROTOCOL.md and its event-stream
//! twin, the read-only JSON API and the origin check. No route can set or
//! change a count.

use std::{
    cell::RefCell,
    collections::BTreeMap,
    future::Future,
    io,
    net::IpAddr,
    pin::Pin,
    rc::Rc,
    sync::{atomic::AtomicUsize, Arc},
    task::{Context, Poll},
    time::Duration,
};

use actix::Addr;
use actix_codec::Framed;
use actix_http::{
    body::BodySize, h1, header::HeaderMap, ws, ConnectionType, Method, Request, RequestHead,
    Response,
};
use actix_web::{
    http::{header, StatusCode},
    web, HttpRequest, HttpResponse,
};
use bytes::Bytes;
use futures_util::SinkExt;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::watch,
};

use crate::{
    config::Settings,
    counter::{Counter, GetCounts, GetPage, GetStatus},
    events,
    limits::{client_ip, BotFilter, CapExceeded, ConnLimiter, OriginPolicy, Permit},
    metrics::{connection_refused, Refused, Transport},
    protocol::{
        parse_stream_query, ClientMessage, CountsBody, ErrorCode, OriginCheckBody, PageId,
        PageIdError, ProtocolError, Readiness, ReadinessBody, Tally,
    },
    session::{self, SessionContext},
    shard::Shards,
    storage::Storage,
    supervise::Health,
    visitor::{self, NodeVisitors},
};

/// Path prefix of page rooms (PartyKit's `/parties/{party}/{room}` with party `page`).
pub(crate) const PAGE_PREFIX: &str = "/parties/page/";
/// Path suffix of a page's event stream (`/parties/page/{id}/events`).
pub(crate) const EVENTS_SUFFIX: &str = "/events";
/// Path prefix of the page stats API.
const PAGES_API_PREFIX: &str = "/api/v1/pages/";
/// The origin check: may the requesting `Origin` open WebSockets here?
pub(crate) const ORIGIN_CHECK_PATH: &str = "/api/v1/origin";
/// The setting the origin check names (what an operator changes).
pub(crate) const ORIGINS_SETTING: &str = "security.allowed_origins";

/// Everything a request handler needs; shared by all workers.
#[derive(Clone)]
pub(crate) struct AppState {
    /// Shared settings.
    pub(crate) settings: Arc<Settings>,
    /// Room routing.
    pub(crate) shards: Shards,
    /// The counter, for reads.
    pub(crate) counter: Addr<Counter>,
    /// For readiness checks.
    pub(crate) storage: Storage,
    /// True once shutdown began (upgrades and streams are refused from then on).
    pub(crate) shutdown: watch::Receiver<bool>,
    /// Open connections (WebSocket sessions and event streams).
    pub(crate) active: Arc<AtomicUsize>,
    /// Connection caps.
    pub(crate) limiter: Arc<ConnLimiter>,
    /// Allowed browser origins.
    pub(crate) origins: Arc<OriginPolicy>,
    /// Crawler User-Agents, refused so that they are not counted.
    pub(crate) bots: Arc<BotFilter>,
    /// Cluster mode: whether Redis is reachable (None on a single node).
    pub(crate) cluster: Option<crate::cluster::ClusterHealth>,
    /// Distinct visitors across the node (sessions join and leave it).
    pub(crate) visitors: Arc<NodeVisitors>,
    /// The actors' recovery after a panic (`/readyz`).
    pub(crate) health: Arc<Health>,
}

/// Registers every route.
pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/parties/page/{tail:.*}", web::get().to(page_get))
        .route("/api/v1/counts", web::get().to(counts))
        .route("/api/v1/pages/{tail:.*}", web::get().to(page_info))
        .route(ORIGIN_CHECK_PATH, web::get().to(origin_check))
        .route(ORIGIN_CHECK_PATH, web::post().to(origin_check))
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .default_service(web::to(not_found));
}

/// An HTTP error answer: `status` with the protocol's `error` body.
pub(crate) fn error_response(status: StatusCode, error: &ProtocolError) -> HttpResponse {
    HttpResponse::build(status)
        .content_type(header::ContentType::json())
        .body(error.to_json())
}

/// The answer when the counter does not answer a read.
pub(crate) fn counter_unavailable() -> HttpResponse {
    error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        &ProtocolError::new(ErrorCode::Overloaded, "counter unavailable"),
    )
}

fn plain(status: actix_web::http::StatusCode, text: &str) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("text/plain; charset=utf-8")
        .body(format!("{text}\n"))
}

async fn not_found(req: HttpRequest) -> HttpResponse {
    let rejection = Rejection::NoRoute {
        method: req.method(),
        path: req.uri().path(),
    };
    plain(rejection.status(), &rejection.to_string())
}

/// `GET /parties/page/…` without an upgrade: an event stream, or a
/// WebSocket path asked without one.
async fn page_get(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    if req.uri().path().ends_with(EVENTS_SUFFIX) {
        event_stream(req, &state)
    } else {
        websocket(req)
    }
}

/// `GET /parties/page/{id}` without an upgrade (upgrades never reach the
/// routes: actix-http hands them to [`upgrade`]).
fn websocket(req: HttpRequest) -> HttpResponse {
    let raw = req
        .uri()
        .path()
        .strip_prefix(PAGE_PREFIX)
        .unwrap_or_default();
    if let Err(error) = PageId::decode(raw) {
        let rejection = Rejection::BadPageId {
            path: req.uri().path(),
            error,
        };
        rejection.count();
        return plain(rejection.status(), &rejection.to_string());
    }
    connection_refused(Refused::BadHandshake);
    plain(
        StatusCode::BAD_REQUEST,
        "this is a WebSocket endpoint: connect with a WebSocket client \
         (GET with Upgrade: websocket), e.g. PartySocket with party \"page\"",
    )
}

/// Why an upgrade was refused before its handshake. Each knows its status,
/// its `connections_refused_total` label, its log line, and (as `Display`)
/// the text it is answered with.
#[derive(Debug, thiserror::Error)]
enum Rejection<'h> {
    /// The path is not under [`PAGE_PREFIX`] (404, also the routes' answer;
    /// not logged or counted).
    #[error("no route for {method} {path}; WebSocket rooms are at {PAGE_PREFIX}{{page_id}}")]
    NoRoute { method: &'h Method, path: &'h str },
    /// The page id does not decode (400).
    #[error("invalid page id: {error}")]
    BadPageId { path: &'h str, error: PageIdError },
    /// Not a WebSocket handshake (400).
    #[error("WebSocket handshake failed: {0}")]
    BadHandshake(ws::HandshakeError),
    /// An event stream's query is not a valid subscription (400).
    #[error("invalid subscription: {}: {}", .0.code, .0.message)]
    BadQuery(ProtocolError),
    /// Shutdown began (503).
    #[error("server is shutting down")]
    ShuttingDown(PageId),
    /// Not every worker hosts its shard yet (503; not logged).
    #[error("server is starting; retry")]
    Starting,
    /// The `Origin` header is not allowed (403).
    #[error("origin not allowed")]
    Origin(Option<&'h str>),
    /// The `User-Agent` names a crawler (403; logged without it: a User-Agent
    /// is a fingerprint).
    #[error("crawlers are not counted (security.bot_user_agents)")]
    BotUserAgent,
    /// A connection cap is reached (503 for the global cap, else 429).
    #[error("{}", exceeded.message())]
    Cap { ip: IpAddr, exceeded: CapExceeded },
}

impl Rejection<'_> {
    fn status(&self) -> StatusCode {
        match self {
            Rejection::NoRoute { .. } => StatusCode::NOT_FOUND,
            Rejection::BadPageId { .. } | Rejection::BadHandshake(_) | Rejection::BadQuery(_) => {
                StatusCode::BAD_REQUEST
            }
            Rejection::ShuttingDown(_) | Rejection::Starting => StatusCode::SERVICE_UNAVAILABLE,
            Rejection::Origin(_) | Rejection::BotUserAgent => StatusCode::FORBIDDEN,
            Rejection::Cap { exceeded, .. } => match exceeded {
                CapExceeded::Global => StatusCode::SERVICE_UNAVAILABLE,
                CapExceeded::PerIp | CapExceeded::Rate => StatusCode::TOO_MANY_REQUESTS,
            },
        }
    }

    /// Its label in `connections_refused_total` (none for a missing route).
    fn reason(&self) -> Option<Refused> {
        Some(match self {
            Rejection::NoRoute { .. } => return None,
            Rejection::BadPageId { .. } => Refused::BadPageId,
            Rejection::BadHandshake(_) | Rejection::BadQuery(_) => Refused::BadHandshake,
            Rejection::ShuttingDown(_) => Refused::ShuttingDown,
            Rejection::Starting => Refused::Starting,
            Rejection::Origin(_) => Refused::Origin,
            Rejection::BotUserAgent => Refused::BotUserAgent,
            Rejection::Cap { exceeded, .. } => match exceeded {
                CapExceeded::Global => Refused::MaxConnections,
                CapExceeded::PerIp => Refused::MaxConnectionsPerIp,
                CapExceeded::Rate => Refused::ConnectionRate,
            },
        })
    }

    /// Logs it (at `info`; a missing route and start-up are not logged).
    fn log(&self) {
        match self {
            Rejection::NoRoute { .. } | Rejection::Starting => {}
            Rejection::BadPageId { path, error } => {
                tracing::info!(path, error = %error, "invalid page id; upgrade refused");
            }
            Rejection::BadHandshake(e) => {
                tracing::info!(error = %e, "WebSocket handshake failed; upgrade refused");
            }
            Rejection::BadQuery(e) => {
                tracing::info!(
                    code = e.code.as_str(),
                    "invalid subscription; event stream refused"
                );
            }
            Rejection::ShuttingDown(page) => {
                tracing::info!(page = %page, "shutting down; upgrade refused");
            }
            Rejection::Origin(origin) => {
                let origin = origin.unwrap_or("");
                tracing::info!(origin, "origin not allowed; upgrade refused");
            }
            Rejection::BotUserAgent => {
                tracing::info!("crawler User-Agent; upgrade refused");
            }
            Rejection::Cap { ip, exceeded } => {
                tracing::info!(%ip, refusal = ?exceeded, "connection cap; upgrade refused");
            }
        }
    }

    /// Counts it in `connections_refused_total` (a missing route is not counted).
    fn count(&self) {
        if let Some(why) = self.reason() {
            connection_refused(why);
        }
    }

    /// Logs and counts it, and answers it (plain text).
    fn respond(self) -> HttpResponse {
        self.log();
        self.count();
        plain(self.status(), &self.to_string())
    }
}

/// Decides whether a request may open a viewer connection over
/// `transport` (a WebSocket upgrade or an event stream; both take the same
/// steps): route, page id, handshake (WebSocket), shutdown, start-up,
/// origin, crawler, connection caps, in that order (each a named step).
fn admit<'h>(
    head: &'h RequestHead,
    state: &AppState,
    transport: Transport,
) -> Result<SessionContext, Rejection<'h>> {
    let page = page_of(head, transport)?;
    if transport == Transport::WebSocket {
        ws::verify_handshake(head).map_err(Rejection::BadHandshake)?;
    }
    if *state.shutdown.borrow() {
        return Err(Rejection::ShuttingDown(page));
    }
    let (shard_index, shard) = state.shards.locate(&page).ok_or(Rejection::Starting)?;
    check_origin(head, state)?;
    refuse_crawlers(head, state)?;
    let permit = take_slot(head, state)?;
    let query = head.uri.query();
    Ok(SessionContext {
        shard_index,
        shard: shard.clone(),
        page,
        pk: pk_of(query),
        visitor: visitor::from_query(query),
        node_visitors: state.visitors.clone(),
        settings: state.settings.clone(),
        active: state.active.clone(),
        permit,
        transport,
    })
}

/// The page id of a WebSocket path (`/parties/page/{id}`) or an event
/// stream's (`/parties/page/{id}/events`).
fn page_of(head: &RequestHead, transport: Transport) -> Result<PageId, Rejection<'_>> {
    let path = head.uri.path();
    let raw = path
        .strip_prefix(PAGE_PREFIX)
        .and_then(|rest| match transport {
            Transport::WebSocket => Some(rest),
            Transport::EventStream => rest.strip_suffix(EVENTS_SUFFIX),
        });
    let raw = raw.ok_or(Rejection::NoRoute {
        method: &head.method,
        path,
    })?;
    PageId::decode(raw).map_err(|error| Rejection::BadPageId { path, error })
}

/// Refuses a request whose `Origin` is not in `security.allowed_origins`.
fn check_origin<'h>(head: &'h RequestHead, state: &AppState) -> Result<(), Rejection<'h>> {
    let origin = origin_of(&head.headers);
    if state.origins.allows(origin) {
        Ok(())
    } else {
        Err(Rejection::Origin(origin))
    }
}

/// Refuses a request whose `User-Agent` names a crawler
/// (`security.bot_user_agents`): crawlers that run the embed are not people.
fn refuse_crawlers(head: &RequestHead, state: &AppState) -> Result<(), Rejection<'static>> {
    let user_agent = head.headers.get(header::USER_AGENT).map(|v| v.as_bytes());
    if state.bots.is_bot(user_agent) {
        Err(Rejection::BotUserAgent)
    } else {
        Ok(())
    }
}

/// The `Origin` header as the origin check reads it: a value that is not
/// visible ASCII cannot match any pattern.
fn origin_of(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::ORIGIN)
        .map(|v| v.to_str().unwrap_or("\u{fffd}"))
}

/// The connection's slot in the connection caps of its client's address.
fn take_slot(head: &RequestHead, state: &AppState) -> Result<Permit, Rejection<'static>> {
    let peer = head
        .peer_addr
        .map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip());
    let ip = client_ip(
        peer,
        &head.headers,
        &state.settings.security.trusted_proxies,
    );
    state
        .limiter
        .try_acquire(ip)
        .map_err(|exceeded| Rejection::Cap { ip, exceeded })
}

/// PartySocket's `_pk` connection id, from the upgrade's query.
fn pk_of(query: Option<&str>) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == "_pk")
        .map(|(_, v)| v.into_owned())
}

/// The upgraded connection, as actix-http hands it over after parsing the
/// request head.
pub(crate) type Upgraded = Framed<Conn, h1::Codec>;

/// A client connection as the HTTP dispatcher sees it: the TCP stream, in
/// a slot that an event-stream handler can take it from ([`SocketSlot`],
/// in the request's connection data). Once it is taken, the dispatcher
/// reads end-of-stream and its writes go nowhere, so it finishes at once
/// and frees its buffers; the socket is the stream's alone.
pub(crate) struct Conn(Rc<RefCell<Option<TcpStream>>>);

/// The route's handle on its connection's socket (see [`Conn`]).
#[derive(Clone)]
pub(crate) struct SocketSlot(Rc<RefCell<Option<TcpStream>>>);

impl Conn {
    /// Wraps an accepted stream.
    pub(crate) fn new(io: TcpStream) -> Conn {
        Conn(Rc::new(RefCell::new(Some(io))))
    }

    /// The slot a route takes the socket from.
    pub(crate) fn slot(&self) -> SocketSlot {
        SocketSlot(self.0.clone())
    }

    /// The socket, unless a route took it.
    fn into_stream(self) -> Option<TcpStream> {
        self.0.borrow_mut().take()
    }

    /// Runs `f` on the socket, or answers `gone` once it was taken.
    fn with<R>(&self, f: impl FnOnce(Pin<&mut TcpStream>) -> R, gone: R) -> R {
        match self.0.borrow_mut().as_mut() {
            Some(io) => f(Pin::new(io)),
            None => gone,
        }
    }
}

impl SocketSlot {
    /// Takes the socket from the dispatcher.
    fn take(&self) -> Option<TcpStream> {
        self.0.borrow_mut().take()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.with(|io| io.poll_read(cx, buf), Poll::Ready(Ok(())))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.with(|io| io.poll_write(cx, buf), Poll::Ready(Ok(buf.len())))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        self.with(|io| io.poll_write_vectored(cx, bufs), Poll::Ready(Ok(len)))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with(|io| io.poll_flush(cx), Poll::Ready(Ok(())))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with(|io| io.poll_shutdown(cx), Poll::Ready(Ok(())))
    }
}

/// actix-http's upgrade hook: every request with `Upgrade: websocket` (and
/// every `CONNECT`) comes here instead of the routes. An admitted one joins
/// its room, gets its `101` written through the framed connection, and
/// becomes a session on the bare socket; the request is dropped at once.
/// Anything else gets a short plain-text answer and the connection closes.
pub(crate) async fn upgrade(req: Request, framed: Upgraded, state: AppState) {
    let (status, text) = match admit(req.head(), &state, Transport::WebSocket) {
        Ok(ctx) => return accept(req, framed, ctx, &state).await,
        Err(rejection) => {
            rejection.log();
            rejection.count();
            (rejection.status(), rejection.to_string())
        }
    };
    drop(req);
    refuse(
        framed,
        status,
        text,
        state.settings.limits.handshake_timeout,
    )
    .await;
}

/// Joins an admitted connection to its room, writes its `101`, and runs
/// its session (unless the `101` could not be written in time).
async fn accept(req: Request, mut framed: Upgraded, ctx: SessionContext, state: &AppState) {
    let response = ws::handshake_response(req.head()).finish().drop_body();
    drop(req);
    let joined = session::join(ctx);
    let sent = tokio::time::timeout(
        state.settings.limits.handshake_timeout,
        framed.send(h1::Message::Item((response, BodySize::None))),
    )
    .await;
    if matches!(sent, Ok(Ok(()))) {
        let parts = framed.into_parts();
        let Some(io) = parts.io.into_stream() else {
            return; // Cannot happen: only event-stream routes take sockets.
        };
        let read_buf = parts.read_buf;
        run_at_home(state, joined.shard_index(), io, move |io| {
            joined.run(io, read_buf)
        });
    }
}

/// `GET /parties/page/{id}/events`: admitted like an upgrade, the request
/// joins the page's room with its subscription (the query), and its socket
/// becomes an event stream ([`events`]) on the worker that hosts the page's
/// shard. The response this returns goes nowhere (the socket is taken):
/// the stream writes its own.
///
/// The stream joins (and subscribes) in its own task, once the dispatcher
/// is gone: what lives as long as the stream is then not allocated among
/// the request's short-lived buffers (the heap keeps less of them).
fn event_stream(req: HttpRequest, state: &AppState) -> HttpResponse {
    let max = state.settings.websocket.max_links_per_subscribe;
    if let Err(e) = parse_stream_query(req.query_string(), max) {
        return Rejection::BadQuery(e).respond();
    }
    let ctx = match admit(req.head(), state, Transport::EventStream) {
        Ok(ctx) => ctx,
        Err(rejection) => return rejection.respond(),
    };
    let Some(io) = req.conn_data::<SocketSlot>().and_then(SocketSlot::take) else {
        // Not on the public listener (no socket slot): nothing joined.
        return plain(StatusCode::NOT_FOUND, "no event streams on this listener");
    };
    // Only the subscription goes on (the visitor id stays in the request);
    // boxed: the task keeps a pointer, not a copy of it, for its whole life.
    let subscription: Vec<&str> = req
        .query_string()
        .split('&')
        .filter(|p| {
            ["links=", "visitors=", "site="]
                .iter()
                .any(|k| p.starts_with(k))
        })
        .collect();
    let start = Box::new((ctx, subscription.join("&")));
    run_at_home(state, start.0.shard_index, io, move |io| async move {
        let (ctx, query) = *start;
        let joined = session::join(ctx);
        // Checked above: an error cannot come back here.
        if let Ok(Some(ClientMessage::Subscribe {
            links,
            visitors,
            site,
        })) = parse_stream_query(&query, max)
        {
            joined.subscribe(links, visitors, site);
        }
        drop(query);
        events::run(joined, io).await;
    });
    HttpResponse::Ok().force_close().finish()
}

/// Answers a refused upgrade with `status` and `text` (plain text), and
/// closes the connection.
async fn refuse(mut framed: Upgraded, status: StatusCode, text: String, limit: Duration) {
    let body = Bytes::from(format!("{text}\n"));
    let mut response = Response::with_body(status, ());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
        .head_mut()
        .set_connection_type(ConnectionType::Close);
    let len = body.len() as u64;
    let _ = tokio::time::timeout(limit, async {
        framed
            .feed(h1::Message::Item((response, BodySize::Sized(len))))
            .await?;
        framed.send(h1::Message::Chunk(Some(body))).await
    })
    .await;
}

/// Runs the session on the worker that hosts its page's shard, moving the
/// socket there if this worker is another: the room's wake-ups of the
/// session, and the session's messages to the room, then never cross
/// threads. (Moving costs one hand-over per connection; a fan-out wakes
/// every subscriber on every publish.)
///
/// `run` holds the joined connection: dropping it unrun (the socket could
/// not move) leaves the room.
fn run_at_home<F, Fut>(state: &AppState, shard_index: usize, io: TcpStream, run: F)
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let Some(home) = state.shards.home_elsewhere(shard_index) else {
        actix_web::rt::spawn(run(io));
        return;
    };
    let Ok(io) = io.into_std() else {
        return; // The socket is gone; dropping `run` leaves the room.
    };
    // If the worker is gone (shutting down) the closure is dropped, and
    // with it the socket and `run` (which leaves the room).
    home.spawn_fn(move || match TcpStream::from_std(io) {
        Ok(io) => {
            actix_web::rt::spawn(run(io));
        }
        Err(e) => tracing::debug!(error = %e, "could not move a socket to its worker"),
    });
}

/// `GET /api/v1/counts?ids=a,b` (or repeated `id=`): live counts, unknown
/// ids 0, as `{"a":1,"b":0}`; with `visitors=true`, both figures as
/// `{"connections":{"a":1,"b":0},"visitors":{"a":1,"b":0}}`.
async fn counts(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let max = state.settings.websocket.max_links_per_subscribe;
    let query = match CountsQuery::parse(req.query_string(), max) {
        Ok(q) => q,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, &e),
    };
    match state.counter.send(GetCounts(query.ids.clone())).await {
        Ok(values) => query.answer(&values),
        Err(_) => counter_unavailable(),
    }
}

/// The query of `/api/v1/counts`.
struct CountsQuery {
    /// The ids asked for, each once, in the order first asked.
    ids: Vec<PageId>,
    /// `visitors=true`: answer both figures.
    visitors: bool,
}

impl CountsQuery {
    /// Reads `ids=`, `id=` and `visitors=` (other keys are ignored), and
    /// refuses a bad id, a bad `visitors` or more than `max` ids.
    fn parse(query: &str, max: usize) -> Result<CountsQuery, ProtocolError> {
        let mut q = CountsQuery {
            ids: Vec::new(),
            visitors: false,
        };
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            match &*key {
                "ids" => {
                    for id in value.split(',').filter(|s| !s.is_empty()) {
                        q.add(id, max)?;
                    }
                }
                "id" => q.add(&value, max)?,
                "visitors" => {
                    q.visitors = match &*value {
                        "true" => true,
                        "false" => false,
                        _ => {
                            return Err(ProtocolError::new(
                                ErrorCode::InvalidParameter,
                                "visitors must be true or false",
                            ))
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(q)
    }

    /// Adds one id unless it is already there.
    fn add(&mut self, id: &str, max: usize) -> Result<(), ProtocolError> {
        let page = PageId::parse(id)
            .map_err(|e| ProtocolError::new(ErrorCode::InvalidPageId, format!("{id:?}: {e}")))?;
        if !self.ids.contains(&page) {
            self.ids.push(page);
        }
        if self.ids.len() > max {
            return Err(ProtocolError::new(
                ErrorCode::TooManyLinks,
                format!("at most {max} ids per request"),
            ));
        }
        Ok(())
    }

    /// The answer, given the counter's tallies of `ids` in order.
    fn answer(&self, values: &[Tally]) -> HttpResponse {
        let figure = |f: fn(&Tally) -> u64| -> BTreeMap<&str, u64> {
            self.ids
                .iter()
                .map(|s| &**s)
                .zip(values.iter().map(f))
                .collect()
        };
        let connections = figure(|t| t.connections);
        if self.visitors {
            HttpResponse::Ok().json(CountsBody {
                connections,
                visitors: figure(|t| t.visitors),
            })
        } else {
            HttpResponse::Ok().json(connections)
        }
    }
}

/// `GET` or `POST /api/v1/origin`: whether this request's `Origin` header
/// passes the check a WebSocket upgrade makes (the same [`OriginPolicy`]),
/// as `{"origin": "…"|null, "allowed": bool, "setting": "security.allowed_origins"}`.
///
/// A browser hides why an upgrade failed, so the embed asks here after a
/// failed attempt and can tell a site owner which setting to change. The
/// answer is readable from any site (`Access-Control-Allow-Origin: *`, a
/// simple request: no preflight) and says nothing but that one bit about the
/// caller's own origin: never the configured list. `POST` is there because
/// browsers send `Origin` on a same-origin `POST` but not on a same-origin
/// `GET`; nothing is changed by either.
async fn origin_check(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let origin = origin_of(req.headers());
    let allowed = state.origins.allows(origin);
    HttpResponse::Ok()
        .insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header((header::VARY, "Origin"))
        .json(OriginCheckBody {
            origin,
            allowed,
            setting: ORIGINS_SETTING,
        })
}

/// `GET /api/v1/pages/{id}`: stats and live count of one page.
async fn page_info(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let raw = req
        .uri()
        .path()
        .strip_prefix(PAGES_API_PREFIX)
        .unwrap_or_default();
    let page = match PageId::decode(raw) {
        Ok(p) => p,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                &ProtocolError::new(ErrorCode::InvalidPageId, e.to_string()),
            )
        }
    };
    let record = state.storage.load_room(&page);
    match state.counter.send(GetPage(page)).await {
        Ok(mut info) => {
            if let Ok(Some(mut r)) = record {
                r.links.sort();
                info.links = r.links.iter().map(|l| l.to_string()).collect();
            }
            HttpResponse::Ok().json(info)
        }
        Err(_) => counter_unavailable(),
    }
}

async fn healthz() -> HttpResponse {
    plain(actix_web::http::StatusCode::OK, "ok")
}

/// 200 when storage answers, no actor is recovering from a panic and the
/// counter is not rebuilding; 503 with a reason otherwise.
async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let not_ready = |reason: String| {
        HttpResponse::ServiceUnavailable().json(ReadinessBody {
            status: Readiness::Unavailable,
            reason: Some(&reason),
        })
    };
    if *state.shutdown.borrow() {
        return not_ready("shutting down".into());
    }
    if let Err(e) = state.storage.is_usable() {
        return not_ready(e.to_string());
    }
    if let Some(reason) = state.cluster.as_ref().and_then(|c| c.degraded()) {
        // Degraded, still serving: local counts live, other nodes' frozen.
        return HttpResponse::ServiceUnavailable().json(ReadinessBody {
            status: Readiness::Degraded,
            reason: Some(reason),
        });
    }
    if state.health.counter_recovering() {
        return not_ready("counter is recovering from a panic or fault".into());
    }
    let shards = state.health.shards_recovering();
    if shards > 0 {
        return not_ready(format!(
            "{shards} shard(s) re-verifying their rooms after a panic"
        ));
    }
    match tokio::time::timeout(Duration::from_secs(2), state.counter.send(GetStatus)).await {
        Ok(Ok(s)) if !s.rebuilding => HttpResponse::Ok().json(ReadinessBody {
            status: Readiness::Ready,
            reason: None,
        }),
        Ok(Ok(_)) => not_ready("counter is rebuilding after a restart".into()),
        _ => not_ready("counter not answering".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each refusal of an upgrade keeps its status, metric label and text.
    #[test]
    fn rejections_answer_as_documented() {
        let cap = |exceeded| Rejection::Cap {
            ip: IpAddr::from([10, 0, 0, 1]),
            exceeded,
        };
        let rows = [
            (
                Rejection::NoRoute {
                    method: &Method::GET,
                    path: "/x",
                },
                404,
                None,
                "no route for GET /x; WebSocket rooms are at /parties/page/{page_id}",
            ),
            (
                Rejection::BadPageId {
                    path: "/parties/page/",
                    error: PageIdError::Empty,
                },
                400,
                Some(Refused::BadPageId),
                "invalid page id: page id is empty",
            ),
            (
                Rejection::BadHandshake(ws::HandshakeError::NoVersionHeader),
                400,
                Some(Refused::BadHandshake),
                "WebSocket handshake failed: WebSocket version header is required",
            ),
            (
                Rejection::ShuttingDown(PageId::parse("p").unwrap()),
                503,
                Some(Refused::ShuttingDown),
                "server is shutting down",
            ),
            (
                Rejection::Starting,
                503,
                Some(Refused::Starting),
                "server is starting; retry",
            ),
            (
                Rejection::Origin(Some("https://evil.example")),
                403,
                Some(Refused::Origin),
                "origin not allowed",
            ),
            (
                Rejection::BotUserAgent,
                403,
                Some(Refused::BotUserAgent),
                "crawlers are not counted (security.bot_user_agents)",
            ),
            (
                cap(CapExceeded::Global),
                503,
                Some(Refused::MaxConnections),
                "server is at its connection limit; retry later",
            ),
            (
                cap(CapExceeded::PerIp),
                429,
                Some(Refused::MaxConnectionsPerIp),
                "too many concurrent connections from your address",
            ),
            (
                cap(CapExceeded::Rate),
                429,
                Some(Refused::ConnectionRate),
                "too many new connections from your address; slow down",
            ),
        ];
        for (rejection, status, reason, text) in rows {
            assert_eq!(rejection.status().as_u16(), status, "{rejection:?}");
            assert_eq!(rejection.reason(), reason, "{rejection:?}");
            assert_eq!(rejection.to_string(), text, "{rejection:?}");
        }
    }

    /// The counts query keeps ids once in the order asked, and refuses a bad
    /// id, a bad `visitors` and one id too many with their error codes.
    #[test]
    fn counts_query_reads_ids_once_in_order() {
        let q = CountsQuery::parse("ids=b,a,,b&id=c&other=x&visitors=true", 3).expect("valid");
        let ids: Vec<&str> = q.ids.iter().map(|s| &**s).collect();
        assert_eq!(ids, ["b", "a", "c"]);
        assert!(q.visitors);
        for (query, code) in [
            ("ids=a,b,c,d", ErrorCode::TooManyLinks),
            ("id=", ErrorCode::InvalidPageId),
            ("ids=a&visitors=yes", ErrorCode::InvalidParameter),
        ] {
            let e = CountsQuery::parse(query, 3).err();
            assert_eq!(e.map(|e| e.code), Some(code), "{query}");
        }
    }
}
