//! Prometheus metrics: the one place that names them. Every metric of the
//! service is a constant here with a helper that records it; the rest of the
//! code calls the helpers (one line at the point where the event happens), so
//! names and labels cannot drift apart. The exposition text is rendered by
//! `metrics-exporter-prometheus` (no listener of its own): [`render`] is
//! called by `GET /metrics` (see [`crate::admin`]).
//!
//! Gauges of actor state (rooms per shard, pages, subscriptions, database
//! size) are not maintained incrementally: [`crate::admin`] asks the shards
//! and the counter when `/metrics` is scraped and sets them then. The open
//! connections gauge is maintained by the sessions (+1 on open, -1 on end).
//!
//! # Metrics
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `link_counter_connections_open` | gauge | `shard`, `transport` | connections (WebSocket sessions and event streams) open now |
//! | `link_counter_visitors` | gauge | | distinct visitors among them, over all pages of this node (set at scrape; no per-page or per-visitor series) |
//! | `link_counter_rooms` | gauge | `shard` | page rooms alive now (set at scrape) |
//! | `link_counter_pages` | gauge | | pages the counter tracks (set at scrape) |
//! | `link_counter_subscriptions` | gauge | | (room, followed page) pairs at the counter (set at scrape) |
//! | `link_counter_follower_rooms` | gauge | | rooms following at least one link (set at scrape) |
//! | `link_counter_storage_bytes` | gauge | | sled database size on disk (set at scrape) |
//! | `link_counter_stored_records` | gauge | `store` | records kept: `stats`, `rooms` (set at scrape) |
//! | `link_counter_connections_opened_total` | counter | `transport` | connections started (WebSocket upgrade completed, event stream admitted) |
//! | `link_counter_connections_closed_total` | counter | `reason`, `transport` | connections ended, by [`CloseKind`] |
//! | `link_counter_connections_refused_total` | counter | `reason` | connections refused, by [`Refused`] |
//! | `link_counter_links_refused_total` | counter | | subscribed links refused at `limits.max_pages` |
//! | `link_counter_messages_in_total` | counter | | client text messages received |
//! | `link_counter_messages_out_total` | counter | | text messages written to client sockets |
//! | `link_counter_errors_total` | counter | `code` | `error` messages sent to clients, by protocol code |
//! | `link_counter_count_changes_total` | counter | | count changes applied by the counter |
//! | `link_counter_count_publishes_total` | counter | | changed counts published to follower rooms (after coalescing) |
//! | `link_counter_updates_sent_total` | counter | | `update` messages written to client sockets |
//! | `link_counter_publish_lag_seconds` | histogram | | count change → its `update` encoded for a subscriber's socket by its session |
//! | `link_counter_snapshot_duration_seconds` | histogram | | stats snapshot duration (all its chunks) |
//! | `link_counter_snapshot_records` | histogram | | stats records written per snapshot |
//! | `link_counter_sweeps_total` | counter | | cleanup sweeps run |
//! | `link_counter_sweep_removed_total` | counter | `what` | removed by sweeps: `pages` (memory), `room_records`, `stats_records` |
//! | `link_counter_evicted_total` | counter | `what` | removed to stay within caps: `pages` (idle pages forgotten after `room.idle_timeout` or at `limits.max_pages`), `stats_records` and `room_records` (past `storage.max_records`) |
//! | `link_counter_rooms_evicted_total` | counter | `why` | idle rooms stopped: `idle` (after `room.idle_timeout`), `cap` (to let a new page in at `limits.max_rooms`) |
//! | `link_counter_counter_restarts_total` | counter | | supervised restarts of the counter |
//! | `link_counter_actor_panics_total` | counter | `actor` | panics caught in an actor's handler (`counter`, `cluster`, `shard`, `room`); each is logged and the actor recovered |
//! | `link_counter_storage_errors_total` | counter | `op` | storage calls that failed at run time, by [`StorageOp`]; each is logged at `warn` and retried or skipped |
//!
//! Cluster mode (recorded by the cluster module):
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `link_counter_redis_rtt_seconds` | histogram | `op` | Redis round-trip time: `write` (a batch of count changes), `load` (followed pages' sums), `heartbeat` |
//! | `link_counter_redis_reconnects_total` | counter | | reconnections to Redis |
//! | `link_counter_cluster_nodes_reaped_total` | counter | | dead nodes whose counts were removed |
//! | `link_counter_cluster_messages_published_total` | counter | | messages this node published to Redis |
//! | `link_counter_cluster_messages_received_total` | counter | | messages this node received from Redis |
//! | `link_counter_cluster_nodes` | gauge | | live nodes this node sees |

use std::{sync::OnceLock, time::Duration};

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub(crate) const CONNECTIONS_OPEN: &str = "link_counter_connections_open";
pub(crate) const ROOMS: &str = "link_counter_rooms";
pub(crate) const PAGES: &str = "link_counter_pages";
pub(crate) const SUBSCRIPTIONS: &str = "link_counter_subscriptions";
pub(crate) const FOLLOWER_ROOMS: &str = "link_counter_follower_rooms";
pub(crate) const VISITORS: &str = "link_counter_visitors";
pub(crate) const STORAGE_BYTES: &str = "link_counter_storage_bytes";
pub(crate) const STORED_RECORDS: &str = "link_counter_stored_records";
pub(crate) const EVICTED: &str = "link_counter_evicted_total";
pub(crate) const CONNECTIONS_OPENED: &str = "link_counter_connections_opened_total";
pub(crate) const CONNECTIONS_CLOSED: &str = "link_counter_connections_closed_total";
pub(crate) const CONNECTIONS_REFUSED: &str = "link_counter_connections_refused_total";
pub(crate) const LINKS_REFUSED: &str = "link_counter_links_refused_total";
pub(crate) const MESSAGES_IN: &str = "link_counter_messages_in_total";
pub(crate) const MESSAGES_OUT: &str = "link_counter_messages_out_total";
pub(crate) const ERRORS: &str = "link_counter_errors_total";
pub(crate) const COUNT_CHANGES: &str = "link_counter_count_changes_total";
pub(crate) const COUNT_PUBLISHES: &str = "link_counter_count_publishes_total";
pub(crate) const PUBLISHES_DEFERRED: &str = "link_counter_publishes_deferred_total";
pub(crate) const DELIVERY_BUDGET: &str = "link_counter_delivery_budget";
pub(crate) const UPDATES_SENT: &str = "link_counter_updates_sent_total";
pub(crate) const PUBLISH_LAG: &str = "link_counter_publish_lag_seconds";
pub(crate) const SNAPSHOT_DURATION: &str = "link_counter_snapshot_duration_seconds";
pub(crate) const SNAPSHOT_RECORDS: &str = "link_counter_snapshot_records";
pub(crate) const SWEEPS: &str = "link_counter_sweeps_total";
pub(crate) const SWEEP_REMOVED: &str = "link_counter_sweep_removed_total";
pub(crate) const ROOMS_EVICTED: &str = "link_counter_rooms_evicted_total";
pub(crate) const COUNTER_RESTARTS: &str = "link_counter_counter_restarts_total";
pub(crate) const ACTOR_PANICS: &str = "link_counter_actor_panics_total";
pub(crate) const STORAGE_ERRORS: &str = "link_counter_storage_errors_total";

pub(crate) const REDIS_RTT: &str = "link_counter_redis_rtt_seconds";
pub(crate) const REDIS_RECONNECTS: &str = "link_counter_redis_reconnects_total";
pub(crate) const CLUSTER_NODES_REAPED: &str = "link_counter_cluster_nodes_reaped_total";
pub(crate) const CLUSTER_PUBLISHED: &str = "link_counter_cluster_messages_published_total";
pub(crate) const CLUSTER_RECEIVED: &str = "link_counter_cluster_messages_received_total";
pub(crate) const CLUSTER_NODES: &str = "link_counter_cluster_nodes";

/// Buckets (seconds) of the latency histograms: 100 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];
/// Buckets of the snapshot size histogram (records).
const RECORD_BUCKETS: &[f64] = &[
    0.0,
    1.0,
    10.0,
    100.0,
    1_000.0,
    10_000.0,
    100_000.0,
    1_000_000.0,
];

/// The process-wide recorder's handle (a recorder can be installed once per process).
static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder on first call (later calls, e.g. a
/// second server in the same test process, share it). `None` when another
/// recorder was installed first; metrics are then not exposed.
pub(crate) fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let built = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(SNAPSHOT_RECORDS.into()), RECORD_BUCKETS)
                })
                .and_then(|b| b.install_recorder());
            match built {
                Ok(handle) => {
                    describe();
                    init_counters();
                    Some(handle)
                }
                Err(e) => {
                    tracing::error!(error = %e, "metrics recorder not installed; /metrics will be empty");
                    None
                }
            }
        })
        .as_ref()
}

/// Handles of the metrics recorded once or more per connection, resolved
/// once: the macros hash the name and labels and look the series up in the
/// registry on every call (and a numeric label allocates).
struct Hot {
    /// By [`Transport::index`].
    opened: Vec<metrics::Counter>,
    /// By [`Transport::index`] × [`CloseKind::ALL`].
    closed: Vec<metrics::Counter>,
    messages_in: metrics::Counter,
    messages_out: metrics::Counter,
    updates_sent: metrics::Counter,
    publish_lag: metrics::Histogram,
    /// `connections_open{shard,transport}` at `shard * 2 + transport`,
    /// created on first use (shard indexes are small: one per HTTP worker).
    open_by_shard: [OnceLock<metrics::Gauge>; 512],
}

impl Hot {
    fn open_gauge(&self, shard: usize, transport: Transport) -> metrics::Gauge {
        let make = || open_gauge(shard, transport);
        match self.open_by_shard.get(shard * 2 + transport.index()) {
            Some(slot) => slot.get_or_init(make).clone(),
            None => make(),
        }
    }
}

fn open_gauge(shard: usize, transport: Transport) -> metrics::Gauge {
    gauge!(CONNECTIONS_OPEN, "shard" => shard.to_string(), "transport" => transport.as_str())
}

fn hot() -> &'static Hot {
    static HOT: OnceLock<Hot> = OnceLock::new();
    HOT.get_or_init(|| {
        // Handles bind to the recorder installed when they are made.
        install();
        Hot {
            opened: Transport::ALL
                .iter()
                .map(|t| counter!(CONNECTIONS_OPENED, "transport" => t.as_str()))
                .collect(),
            closed: Transport::ALL
                .iter()
                .flat_map(|t| CloseKind::ALL.iter().map(move |k| closed_counter(*t, *k)))
                .collect(),
            messages_in: counter!(MESSAGES_IN),
            messages_out: counter!(MESSAGES_OUT),
            updates_sent: counter!(UPDATES_SENT),
            publish_lag: histogram!(PUBLISH_LAG),
            open_by_shard: [const { OnceLock::new() }; 512],
        }
    })
}

fn closed_counter(transport: Transport, why: CloseKind) -> metrics::Counter {
    counter!(CONNECTIONS_CLOSED, "reason" => why.as_str(), "transport" => transport.as_str())
}

/// How often histogram samples are folded into their buckets when nobody
/// scrapes: the recorder keeps every sample until then.
pub(crate) const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Folds recorded histogram samples into their buckets. Without it, samples
/// (one per update delivered) pile up in memory until the next scrape.
pub(crate) fn upkeep() {
    if let Some(h) = install() {
        h.run_upkeep();
    }
}

/// The Prometheus text exposition of every metric.
pub(crate) fn render() -> String {
    match install() {
        Some(h) => {
            h.run_upkeep();
            h.render()
        }
        None => String::new(),
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(
        CONNECTIONS_OPEN,
        "Connections open now, by shard and transport"
    );
    describe_gauge!(ROOMS, "Page rooms alive now, by shard");
    describe_gauge!(PAGES, "Pages the counter tracks");
    describe_gauge!(SUBSCRIPTIONS, "(room, followed page) pairs at the counter");
    describe_gauge!(FOLLOWER_ROOMS, "Rooms following at least one link");
    describe_gauge!(
        VISITORS,
        "Distinct visitors among the open WebSocket sessions, over all pages"
    );
    describe_gauge!(STORAGE_BYTES, Unit::Bytes, "Database size on disk");
    describe_gauge!(STORED_RECORDS, "Records kept, by store");
    describe_counter!(
        EVICTED,
        "Idle pages forgotten and records deleted to stay within caps"
    );
    describe_counter!(CONNECTIONS_OPENED, "Connections started, by transport");
    describe_counter!(
        CONNECTIONS_CLOSED,
        "Connections ended, by reason and transport"
    );
    describe_counter!(CONNECTIONS_REFUSED, "Connections refused, by reason");
    describe_counter!(
        LINKS_REFUSED,
        "Subscribed links refused at limits.max_pages"
    );
    describe_counter!(MESSAGES_IN, "Client text messages received");
    describe_counter!(MESSAGES_OUT, "Text messages written to client sockets");
    describe_counter!(ERRORS, "Error messages sent to clients, by code");
    describe_counter!(COUNT_CHANGES, "Count changes applied by the counter");
    describe_counter!(
        COUNT_PUBLISHES,
        "Changed counts published to follower rooms after coalescing"
    );
    describe_counter!(
        PUBLISHES_DEFERRED,
        "Changed counts held to a later publish by counter.delivery_budget"
    );
    describe_gauge!(
        DELIVERY_BUDGET,
        "Connection-deliveries per second publishing may spend now (adapts to worker lag)"
    );
    describe_counter!(UPDATES_SENT, "Update messages written to client sockets");
    describe_histogram!(
        PUBLISH_LAG,
        Unit::Seconds,
        "From a count change to its update encoded for a subscriber's socket"
    );
    describe_histogram!(SNAPSHOT_DURATION, Unit::Seconds, "Stats snapshot duration");
    describe_histogram!(SNAPSHOT_RECORDS, "Stats records written per snapshot");
    describe_counter!(SWEEPS, "Cleanup sweeps run");
    describe_counter!(SWEEP_REMOVED, "Entries removed by sweeps, by kind");
    describe_counter!(ROOMS_EVICTED, "Idle rooms stopped");
    describe_counter!(COUNTER_RESTARTS, "Supervised restarts of the counter");
    describe_counter!(ACTOR_PANICS, "Panics caught in actor handlers, by actor");
    describe_counter!(
        STORAGE_ERRORS,
        "Storage calls that failed at run time, by op"
    );
    describe_histogram!(REDIS_RTT, Unit::Seconds, "Redis command round-trip time");
    describe_counter!(REDIS_RECONNECTS, "Reconnections to Redis");
    describe_counter!(CLUSTER_NODES_REAPED, "Dead nodes whose counts were removed");
    describe_counter!(CLUSTER_PUBLISHED, "Messages published to Redis");
    describe_counter!(CLUSTER_RECEIVED, "Messages received from Redis");
    describe_gauge!(CLUSTER_NODES, "Live cluster nodes this node sees");
}

/// Every counter is exposed from the start (at 0), so that `rate()` and
/// alerts see a series before the first event.
fn init_counters() {
    for t in Transport::ALL {
        counter!(CONNECTIONS_OPENED, "transport" => t.as_str()).increment(0);
        for why in CloseKind::ALL {
            closed_counter(t, why).increment(0);
        }
    }
    for name in [
        LINKS_REFUSED,
        MESSAGES_IN,
        MESSAGES_OUT,
        COUNT_CHANGES,
        COUNT_PUBLISHES,
        PUBLISHES_DEFERRED,
        UPDATES_SENT,
        SWEEPS,
        COUNTER_RESTARTS,
    ] {
        counter!(name).increment(0);
    }
    for actor in ["counter", "cluster", "shard", "room"] {
        counter!(ACTOR_PANICS, "actor" => actor).increment(0);
    }
    for op in StorageOp::ALL {
        counter!(STORAGE_ERRORS, "op" => op.label()).increment(0);
    }
    for what in ["pages", "stats_records", "room_records"] {
        counter!(EVICTED, "what" => what).increment(0);
    }
    for why in ["idle", "cap"] {
        counter!(ROOMS_EVICTED, "why" => why).increment(0);
    }
    for why in Refused::ALL {
        counter!(CONNECTIONS_REFUSED, "reason" => why.as_str()).increment(0);
    }
    for what in ["pages", "room_records", "stats_records"] {
        counter!(SWEEP_REMOVED, "what" => what).increment(0);
    }
}

// ---------------------------------------------------------------- labels

/// How a viewer is connected (label `transport` of the connection metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    /// A WebSocket session (`/parties/page/{id}`).
    WebSocket,
    /// A Server-Sent Events stream (`/parties/page/{id}/events`).
    EventStream,
}

impl Transport {
    /// Every transport, for initializing the series.
    pub(crate) const ALL: [Transport; 2] = [Transport::WebSocket, Transport::EventStream];

    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Transport::WebSocket => "websocket",
            Transport::EventStream => "sse",
        }
    }

    fn index(self) -> usize {
        match self {
            Transport::WebSocket => 0,
            Transport::EventStream => 1,
        }
    }
}

/// Why a connection ended (label `reason` of `connections_closed_total`); an
/// event stream ends only as `abrupt`, `slow_client`, `shutdown` or `max_rooms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseKind {
    /// The client sent a close frame.
    ClientClose,
    /// The stream ended or a write failed without a close handshake.
    Abrupt,
    /// Nothing received for `websocket.client_timeout`.
    Timeout,
    /// Closed 1008 after `limits.flood_strikes` rate-limited messages.
    RateLimited,
    /// Closed 1009: a message over `websocket.max_message_bytes`.
    TooBig,
    /// Closed 1003: a binary frame.
    Binary,
    /// Closed 1002: a WebSocket protocol violation.
    ProtocolError,
    /// Closed 1007: a text message that is not valid UTF-8.
    InvalidUtf8,
    /// Closed 1013: its socket took no bytes for `websocket.client_timeout`.
    SlowClient,
    /// Closed 1001: server shutdown.
    Shutdown,
    /// Closed 1013 (try again later): `limits.max_rooms` reached when it joined.
    MaxRooms,
}

impl CloseKind {
    /// Every reason, for initializing the series.
    pub(crate) const ALL: [CloseKind; 11] = [
        CloseKind::ClientClose,
        CloseKind::Abrupt,
        CloseKind::Timeout,
        CloseKind::RateLimited,
        CloseKind::TooBig,
        CloseKind::Binary,
        CloseKind::ProtocolError,
        CloseKind::InvalidUtf8,
        CloseKind::SlowClient,
        CloseKind::Shutdown,
        CloseKind::MaxRooms,
    ];

    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CloseKind::ClientClose => "client_close",
            CloseKind::Abrupt => "abrupt",
            CloseKind::Timeout => "timeout",
            CloseKind::RateLimited => "rate_limited",
            CloseKind::TooBig => "too_big",
            CloseKind::Binary => "binary",
            CloseKind::ProtocolError => "protocol_error",
            CloseKind::InvalidUtf8 => "invalid_utf8",
            CloseKind::SlowClient => "slow_client",
            CloseKind::Shutdown => "shutdown",
            CloseKind::MaxRooms => "max_rooms",
        }
    }
}

/// Why a connection was refused (label `reason` of `connections_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// 403: `Origin` not in `security.allowed_origins`.
    Origin,
    /// 503: `limits.max_connections` reached.
    MaxConnections,
    /// 429: `limits.max_connections_per_ip` reached.
    MaxConnectionsPerIp,
    /// 429: over `limits.connections_per_ip_per_second`.
    ConnectionRate,
    /// 400: invalid page id in the path.
    BadPageId,
    /// 400: not a WebSocket upgrade, or the handshake failed.
    BadHandshake,
    /// 503: the server is shutting down.
    ShuttingDown,
    /// 503: the server is still starting (a worker has not hosted its shard yet).
    Starting,
    /// Upgraded, then closed 1013 (try again later): `limits.max_rooms` reached.
    MaxRooms,
    /// 403: the `User-Agent` names a crawler (`security.bot_user_agents`).
    BotUserAgent,
}

impl Refused {
    /// Every reason, for initializing the series.
    pub(crate) const ALL: [Refused; 10] = [
        Refused::Origin,
        Refused::MaxConnections,
        Refused::MaxConnectionsPerIp,
        Refused::ConnectionRate,
        Refused::BadPageId,
        Refused::BadHandshake,
        Refused::ShuttingDown,
        Refused::Starting,
        Refused::MaxRooms,
        Refused::BotUserAgent,
    ];

    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Refused::Origin => "origin",
            Refused::MaxConnections => "max_connections",
            Refused::MaxConnectionsPerIp => "max_connections_per_ip",
            Refused::ConnectionRate => "connections_per_ip_per_second",
            Refused::BadPageId => "bad_page_id",
            Refused::BadHandshake => "bad_handshake",
            Refused::ShuttingDown => "shutting_down",
            Refused::Starting => "starting",
            Refused::MaxRooms => "max_rooms",
            Refused::BotUserAgent => "bot_user_agent",
        }
    }
}

// ---------------------------------------------------------------- recording

/// A connection over `transport` started on `shard`.
pub(crate) fn connection_opened(shard: usize, transport: Transport) {
    let hot = hot();
    hot.opened[transport.index()].increment(1);
    hot.open_gauge(shard, transport).increment(1.0);
}

/// A connection over `transport` on `shard` ended for `why`.
pub(crate) fn connection_closed(shard: usize, transport: Transport, why: CloseKind) {
    let hot = hot();
    match CloseKind::ALL.iter().position(|k| *k == why) {
        Some(i) => hot.closed[transport.index() * CloseKind::ALL.len() + i].increment(1),
        None => closed_counter(transport, why).increment(1),
    }
    hot.open_gauge(shard, transport).decrement(1.0);
}

/// A connection was refused for `why`.
pub(crate) fn connection_refused(why: Refused) {
    counter!(CONNECTIONS_REFUSED, "reason" => why.as_str()).increment(1);
}

/// `n` subscribed links were refused at `limits.max_pages`.
pub(crate) fn links_refused(n: usize) {
    counter!(LINKS_REFUSED).increment(n as u64);
}

/// A client text message arrived.
pub(crate) fn message_in() {
    hot().messages_in.increment(1);
}

/// A text message was encoded for a client's socket.
pub(crate) fn message_out() {
    hot().messages_out.increment(1);
}

/// An `error` message with `code` is sent to a client.
pub(crate) fn error_sent(code: crate::protocol::ErrorCode) {
    counter!(ERRORS, "code" => code.as_str()).increment(1);
}

/// The counter applied a count change.
pub(crate) fn count_changed() {
    counter!(COUNT_CHANGES).increment(1);
}

/// The counter published `n` changed counts (one per page, after coalescing).
pub(crate) fn counts_published(n: usize) {
    counter!(COUNT_PUBLISHES).increment(n as u64);
}

/// A publish held `n` changed counts back to the next one (the delivery budget).
pub(crate) fn publishes_deferred(n: usize) {
    if n > 0 {
        counter!(PUBLISHES_DEFERRED).increment(n as u64);
    }
}

/// The delivery budget's rate, after a publish adapted it.
pub(crate) fn delivery_budget(per_sec: f64) {
    gauge!(DELIVERY_BUDGET).set(per_sec);
}

/// An `update` was encoded for a client's socket `lag` after the oldest change it carries.
pub(crate) fn update_sent(lag: Option<Duration>) {
    let hot = hot();
    hot.updates_sent.increment(1);
    if let Some(lag) = lag {
        hot.publish_lag.record(lag.as_secs_f64());
    }
}

/// A stats snapshot wrote `records` records in `took`.
pub(crate) fn snapshot(took: Duration, records: usize) {
    histogram!(SNAPSHOT_DURATION).record(took.as_secs_f64());
    histogram!(SNAPSHOT_RECORDS).record(records as f64);
}

/// A sweep removed these.
pub(crate) fn sweep(pages: usize, room_records: usize, stats_records: usize) {
    counter!(SWEEPS).increment(1);
    counter!(SWEEP_REMOVED, "what" => "pages").increment(pages as u64);
    counter!(SWEEP_REMOVED, "what" => "room_records").increment(room_records as u64);
    counter!(SWEEP_REMOVED, "what" => "stats_records").increment(stats_records as u64);
}

/// Why an idle room was stopped (the `why` label of [`ROOMS_EVICTED`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RoomEviction {
    /// A new page needed a room at `limits.max_rooms`.
    Cap,
    /// Idle for `room.idle_timeout`, or past `limits.max_idle_rooms`.
    Idle,
}

impl RoomEviction {
    /// The label value.
    pub(crate) fn label(self) -> &'static str {
        match self {
            RoomEviction::Cap => "cap",
            RoomEviction::Idle => "idle",
        }
    }
}

/// An idle room was stopped.
pub(crate) fn room_evicted(why: RoomEviction) {
    counter!(ROOMS_EVICTED, "why" => why.label()).increment(1);
}

/// A panic was caught in an actor's handler (`crate::supervise`).
pub(crate) fn actor_panicked(actor: &'static str) {
    counter!(ACTOR_PANICS, "actor" => actor).increment(1);
}

/// The counter restarted under its supervisor.
pub(crate) fn counter_restarted() {
    counter!(COUNTER_RESTARTS).increment(1);
}

/// Scrape-time gauges: rooms alive on `shard` (and its open-connections
/// series made visible, at 0 before its first connection).
pub(crate) fn set_rooms(shard: usize, rooms: usize) {
    gauge!(ROOMS, "shard" => shard.to_string()).set(rooms as f64);
    for t in Transport::ALL {
        open_gauge(shard, t).increment(0.0);
    }
}

/// Scrape-time gauges of the counter's state.
pub(crate) fn set_counter_state(pages: usize, subscriptions: usize, follower_rooms: usize) {
    gauge!(PAGES).set(pages as f64);
    gauge!(SUBSCRIPTIONS).set(subscriptions as f64);
    gauge!(FOLLOWER_ROOMS).set(follower_rooms as f64);
}

/// Scrape-time gauge of the node's distinct visitors.
pub(crate) fn set_visitors(visitors: u64) {
    gauge!(VISITORS).set(visitors as f64);
}

/// Scrape-time gauges of the database size and records kept.
pub(crate) fn set_storage(bytes: u64, stats_records: usize, room_records: usize) {
    gauge!(STORAGE_BYTES).set(bytes as f64);
    gauge!(STORED_RECORDS, "store" => "stats").set(stats_records as f64);
    gauge!(STORED_RECORDS, "store" => "rooms").set(room_records as f64);
}

/// What was evicted (the `what` label of [`EVICTED`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Evicted {
    /// Idle pages the counter forgot.
    Pages,
    /// Stats records deleted past `storage.max_records` or their retention.
    StatsRecords,
    /// Room records deleted likewise.
    RoomRecords,
}

/// Idle pages forgotten, or records deleted past `storage.max_records`.
pub(crate) fn evicted(what: Evicted, n: usize) {
    let label = match what {
        Evicted::Pages => "pages",
        Evicted::StatsRecords => "stats_records",
        Evicted::RoomRecords => "room_records",
    };
    if n > 0 {
        counter!(EVICTED, "what" => label).increment(n as u64);
    }
}

/// The `op` label of [`STORAGE_ERRORS`]: what a failed storage call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StorageOp {
    /// A chunk of stats records written (kept queued, retried).
    WriteStats,
    /// History peaks written (kept queued, retried).
    WriteHistory,
    /// A page's stats read (the page starts from empty stats).
    ReadStats,
    /// A history read (the API answers 503).
    ReadHistory,
    /// Records past `storage.max_records` deleted.
    Trim,
    /// Room or stats records past their retention deleted.
    Expire,
    /// The database flushed to disk.
    Flush,
    /// A room record written (retried at the room's next change).
    WriteRoom,
    /// A room record read (the room starts without its outbound links).
    ReadRoom,
}

impl StorageOp {
    pub(crate) const ALL: [StorageOp; 9] = [
        StorageOp::WriteStats,
        StorageOp::WriteHistory,
        StorageOp::ReadStats,
        StorageOp::ReadHistory,
        StorageOp::Trim,
        StorageOp::Expire,
        StorageOp::Flush,
        StorageOp::WriteRoom,
        StorageOp::ReadRoom,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            StorageOp::WriteStats => "write_stats",
            StorageOp::WriteHistory => "write_history",
            StorageOp::ReadStats => "read_stats",
            StorageOp::ReadHistory => "read_history",
            StorageOp::Trim => "trim",
            StorageOp::Expire => "expire",
            StorageOp::Flush => "flush",
            StorageOp::WriteRoom => "write_room",
            StorageOp::ReadRoom => "read_room",
        }
    }
}

/// A storage call of kind `op` failed at run time.
pub(crate) fn storage_error(op: StorageOp) {
    counter!(STORAGE_ERRORS, "op" => op.label()).increment(1);
}

// ---------------------------------------------------------------- cluster

/// The `op` label of [`REDIS_RTT`]: what a Redis round trip did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RedisOp {
    /// A batch of count changes written.
    Write,
    /// Newly followed pages' sums loaded.
    Load,
    /// The liveness refresh.
    Heartbeat,
}

impl RedisOp {
    fn label(self) -> &'static str {
        match self {
            RedisOp::Write => "write",
            RedisOp::Load => "load",
            RedisOp::Heartbeat => "heartbeat",
        }
    }
}

/// Cluster: one Redis round trip of kind `op` took `rtt`.
pub(crate) fn redis_rtt(op: RedisOp, rtt: Duration) {
    histogram!(REDIS_RTT, "op" => op.label()).record(rtt.as_secs_f64());
}

/// Cluster: reconnected to Redis.
pub(crate) fn redis_reconnected() {
    counter!(REDIS_RECONNECTS).increment(1);
}

/// Cluster: `n` dead nodes were reaped.
pub(crate) fn cluster_nodes_reaped(n: usize) {
    counter!(CLUSTER_NODES_REAPED).increment(n as u64);
}

/// Cluster: `n` messages published to Redis.
pub(crate) fn cluster_published(n: usize) {
    counter!(CLUSTER_PUBLISHED).increment(n as u64);
}

/// Cluster: `n` messages received from Redis.
pub(crate) fn cluster_received(n: usize) {
    counter!(CLUSTER_RECEIVED).increment(n as u64);
}

/// Cluster: `n` live nodes seen.
pub(crate) fn set_cluster_nodes(n: usize) {
    gauge!(CLUSTER_NODES).set(n as f64);
}
