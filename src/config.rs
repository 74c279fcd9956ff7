//! Typed settings: embedded defaults (`config/default.toml`), an optional TOML
//! file, then `LINK_COUNTER__SECTION__KEY` environment variables, validated
//! before anything binds a port.
//!
//! Every error names the setting and says where its value came from (the
//! environment variable, or the file and line) and, where it can, how to fix
//! it: TOML syntax errors carry the file, line and column; unknown settings
//! the nearest valid name; enum settings their valid values; list entries
//! their index. [`env_warnings`] lists the variables that look like settings
//! but are ignored (e.g. `LINK_COUNTER_SERVER_BIND`, one underscore).
//!
//! The `config` crate layers the sources and converts each value to its
//! setting's type; the result is deserialized through `serde_path_to_error`,
//! which names the setting (and list entry) serde refused. Lines and columns
//! come from the `toml` parser's spans, and the nearest names from `strsim`'s
//! edit distance. No error text of a library is parsed.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::OnceLock,
    time::Duration,
};

use serde::{de::Error as _, Deserialize, Deserializer};

use crate::storage::Compression;

/// The defaults, compiled in so that the binary runs with no file at all.
pub(crate) const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Prefix of the environment variables that override settings.
pub(crate) const ENV_PREFIX: &str = "LINK_COUNTER";

/// What every setting's variable starts with: `LINK_COUNTER__SECTION__KEY`.
const ENV_SETTING_PREFIX: &str = "LINK_COUNTER__";

/// Variables of the project's own tooling (test and benchmark harnesses) that
/// start with `LINK_COUNTER_` without being settings: never warned about.
const TOOLING_VARS: &[&str] = &[
    "LINK_COUNTER_BIN",
    "LINK_COUNTER_ARTIFACTS",
    "LINK_COUNTER_DEMO_SCREENSHOT",
    "LINK_COUNTER_REQUIRE_REDIS",
];

/// How durations are written (appended to a duration's error).
const DURATION_HINT: &str = "; write a duration such as \"500ms\", \"15s\", \"1h\" or \"30days\"";

/// A configuration that cannot be used; the message names the key.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Every setting of the service (see `config/default.toml` for their meaning).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Listening socket, shutdown and thread counts.
    pub server: ServerSettings,
    /// Where and how often state is persisted.
    pub storage: StorageSettings,
    /// Per-connection limits and liveness.
    pub(crate) websocket: WebSocketSettings,
    /// The Server-Sent Events transport.
    pub(crate) events: EventStreamSettings,
    /// The counter actor's timers.
    pub(crate) counter: CounterSettings,
    /// Page-room lifetimes.
    pub(crate) room: RoomSettings,
    /// Caps that bound abuse and memory.
    pub limits: LimitSettings,
    /// Origin checks and trusted proxies.
    pub security: SecuritySettings,
    /// Browser assets and the demo site.
    pub web: WebSettings,
    /// The operator listener (metrics, dashboard).
    pub admin: AdminSettings,
    /// Log format and filter.
    pub log: LogSettings,
    /// Cluster mode through Redis (off when `redis_url` is empty).
    pub cluster: ClusterSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettings {
    /// Redis URL; empty = single node (no Redis). With `redis_cluster`, one or
    /// more comma-separated seed nodes of a Redis Cluster. A secret when it
    /// carries a password: set it from the environment; logged only redacted.
    pub(crate) redis_url: String,
    /// `redis_url` names a Redis Cluster (sharded pub/sub, hash-tagged keys).
    pub(crate) redis_cluster: bool,
    /// Prefix of every Redis key and channel (several clusters can share one Redis).
    pub(crate) key_prefix: String,
    /// How often a node refreshes its liveness key and looks for dead nodes.
    #[serde(with = "humantime_serde")]
    pub(crate) heartbeat_interval: Duration,
    /// Lifetime of a node's liveness key: the bound on ghost counts after a crash.
    #[serde(with = "humantime_serde")]
    pub(crate) node_ttl: Duration,
    /// Pub/sub channels pages are hashed into.
    pub(crate) channels: u32,
    /// How long a page stays followed (subscribed, its values kept current)
    /// after its last local follower left, so a page followed again soon
    /// costs no Redis command (0 = drop it at once).
    #[serde(with = "humantime_serde")]
    pub(crate) follow_linger: Duration,
}

impl ClusterSettings {
    /// The Redis URLs: one, or with `redis_cluster` the comma-separated seeds.
    pub fn redis_urls(&self) -> Vec<&str> {
        if self.redis_cluster {
            self.redis_url
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .collect()
        } else {
            vec![self.redis_url.as_str()]
        }
    }

    /// True when this node is a cluster member.
    pub fn enabled(&self) -> bool {
        !self.redis_url.is_empty()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    /// Global cap on open connections (0 = none).
    pub max_connections: usize,
    /// Concurrent connections per client IP (0 = none).
    pub(crate) max_connections_per_ip: usize,
    /// New connections per client IP per second (0 = none).
    pub(crate) connections_per_ip_per_second: f64,
    /// Burst of new connections per client IP.
    pub(crate) connections_per_ip_burst: f64,
    /// Client messages per connection per second (0 = none).
    pub(crate) messages_per_second: f64,
    /// Burst of client messages per connection.
    pub(crate) burst: f64,
    /// Consecutive refused messages before a 1008 close.
    pub(crate) flood_strikes: u32,
    /// Deadline for a complete HTTP request.
    #[serde(with = "humantime_serde")]
    pub(crate) handshake_timeout: Duration,
    /// Most page rooms alive.
    pub max_rooms: usize,
    /// Most rooms kept with no connection (the least recently active stop first).
    pub max_idle_rooms: usize,
    /// Most pages tracked by the counter.
    pub max_pages: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecuritySettings {
    /// Allowed `Origin`s (exact or `*.domain` patterns); empty = any.
    pub allowed_origins: Vec<String>,
    /// Proxies whose forwarding headers are trusted (CIDRs; a bare address
    /// is one host, e.g. `10.0.0.1` = `10.0.0.1/32`).
    #[serde(deserialize_with = "deserialize_proxies")]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Crawler tokens: a WebSocket upgrade whose `User-Agent` contains one
    /// (ASCII case-insensitive) is refused, so crawlers that run the embed
    /// are not counted as people; empty = none refused (in the environment:
    /// an empty value).
    #[serde(deserialize_with = "deserialize_tokens")]
    pub(crate) bot_user_agents: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// Address the HTTP/WebSocket listener binds.
    pub bind: SocketAddr,
    /// Grace period for draining connections on shutdown.
    #[serde(with = "humantime_serde")]
    pub(crate) shutdown_timeout: Duration,
    /// HTTP worker threads, each also hosting one shard of page rooms
    /// (0 = one per core).
    pub(crate) workers: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSettings {
    /// Directory of the sled database.
    pub path: PathBuf,
    /// Interval of batched snapshots (the most a kill -9 can lose).
    #[serde(with = "humantime_serde")]
    pub(crate) snapshot_interval: Duration,
    /// How long stats of an inactive page are kept.
    #[serde(with = "humantime_serde")]
    pub(crate) stats_retention: Duration,
    /// Bytes of sled's page cache.
    pub cache_capacity: u64,
    /// How a new data directory stores its records.
    pub compression: Compression,
    /// Most records each stored tree keeps (stats, room records); the least
    /// recently active go first.
    pub max_records: usize,
    /// How long the per-minute peaks (history) are kept.
    #[serde(with = "humantime_serde")]
    pub(crate) history_minutes: Duration,
    /// How long the per-hour peaks (history) are kept.
    #[serde(with = "humantime_serde")]
    pub(crate) history_hours: Duration,
}

impl StorageSettings {
    /// The history's retention, in ms.
    pub(crate) fn history_retention(&self) -> crate::storage::HistoryRetention {
        crate::storage::HistoryRetention {
            minutes_ms: self.history_minutes.as_millis() as u64,
            hours_ms: self.history_hours.as_millis() as u64,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WebSocketSettings {
    /// Server ping period.
    #[serde(with = "humantime_serde")]
    pub(crate) heartbeat_interval: Duration,
    /// Silence after which a connection is dropped.
    #[serde(with = "humantime_serde")]
    pub(crate) client_timeout: Duration,
    /// Largest client message in bytes.
    pub(crate) max_message_bytes: usize,
    /// Most ids in one subscribe or counts query.
    pub(crate) max_links_per_subscribe: usize,
    /// How long a server-initiated close waits for the client's Close frame
    /// before the TCP connection is closed anyway.
    #[serde(with = "humantime_serde")]
    pub(crate) close_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventStreamSettings {
    /// Period of the keep-alive comment on an event stream: proxies close
    /// connections idle for longer than their timeout (often 60 s).
    #[serde(with = "humantime_serde")]
    pub(crate) keepalive_interval: Duration,
    /// The `retry:` hint: how long a browser's `EventSource` waits before
    /// it reconnects a stream that ended.
    #[serde(with = "humantime_serde")]
    pub(crate) retry: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CounterSettings {
    /// Coalescing period of count updates.
    #[serde(with = "humantime_serde")]
    pub(crate) broadcast_interval: Duration,
    /// Connection-deliveries per second publishing may spend before it
    /// defers the costliest pages (a page's change costs the connections of
    /// the rooms that follow it).
    pub(crate) delivery_budget: u64,
    /// Longest a change waits for its publish when the delivery budget
    /// defers it (the worst delay a reader sees in a surge), or
    /// `broadcast_interval` if that is longer.
    #[serde(with = "humantime_serde")]
    pub(crate) max_delay: Duration,
    /// A publish that finds a worker this far behind (its previous batch
    /// waited longer in the worker's queue) halves the delivery budget.
    #[serde(with = "humantime_serde")]
    pub(crate) max_worker_lag: Duration,
    /// Period of the cleanup sweep.
    #[serde(with = "humantime_serde")]
    pub(crate) sweep_interval: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RoomSettings {
    /// Idle time after which an empty room stops.
    #[serde(with = "humantime_serde")]
    pub(crate) idle_timeout: Duration,
    /// Inactivity after which a room's stored record is deleted.
    #[serde(with = "humantime_serde")]
    pub(crate) storage_ttl: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebSettings {
    /// Serve the demo site (`/`, `/pages/a`..`/pages/d`); `/link-counter.js` is always served.
    pub demo: bool,
}

impl Settings {
    /// Defaults, then `file` (if any), then `env` (the binary passes
    /// [`process_env`], tests their own). Every `LINK_COUNTER__…` variable
    /// must name a setting.
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let mut sources = Sources::default();
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError(format!("cannot read config file {}: {e}", path.display()))
            })?;
            // Parsed by `toml` first for its spans: a syntax error's line and
            // column, an unknown key's line. The text read once is what the
            // config crate layers, so the lines are those of its values.
            let table: toml::Table =
                toml::from_str(&text).map_err(|e| toml_syntax_error(path, &text, &e))?;
            sources.file = Some((path.to_path_buf(), text.clone()));
            sources.refuse_unknown_keys(&table)?;
            builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
        }
        let (mut texts, mut lists) = (config::Map::new(), config::Map::new());
        for (name, value) in env {
            if !name.starts_with(ENV_SETTING_PREFIX) {
                continue;
            }
            let key = env_setting(&name)?;
            if is_list(&key) {
                lists.insert(name.clone(), value);
            } else {
                texts.insert(name.clone(), value);
            }
            sources.env.insert(key, name);
        }
        let layered = builder
            .add_source(environment().source(Some(texts)))
            .add_source(list_environment().source(Some(lists)))
            .build()
            .map_err(|e| ConfigError(format!("invalid configuration: {e}")))?;
        let settings: Settings =
            serde_path_to_error::deserialize(layered).map_err(|e| sources.explain(&e))?;
        settings.check().map_err(|e| sources.locate(e))?;
        Ok(settings)
    }

    /// Cross-field checks that serde cannot express, with the key apart (so
    /// that the caller can say where the value came from): the first of
    /// [`RULES`] that fails.
    fn check(&self) -> Result<(), Invalid> {
        RULES.iter().try_for_each(|rule| rule.check(self))
    }

    /// Worker count after resolving 0 to the number of cores.
    pub(crate) fn worker_count(&self) -> usize {
        resolve_threads(self.server.workers)
    }
}

/// A check of [`Settings`] that serde cannot express, naming its key.
enum Rule {
    /// `key` is refused with `why` when `bad` holds.
    Fixed {
        key: &'static str,
        bad: fn(&Settings) -> bool,
        why: &'static str,
    },
    /// Every entry of the list `key` must pass `entry` (the error names the
    /// entry's index).
    Entries {
        key: &'static str,
        list: fn(&Settings) -> &[String],
        entry: fn(&str) -> Result<(), String>,
    },
    /// `key` is refused with the message `verdict` returns.
    Computed {
        key: &'static str,
        verdict: fn(&Settings) -> Result<(), String>,
    },
}

impl Rule {
    fn check(&self, s: &Settings) -> Result<(), Invalid> {
        match *self {
            Rule::Fixed { key, bad, why } if bad(s) => Err(Invalid::new(key, why)),
            Rule::Fixed { .. } => Ok(()),
            Rule::Entries { key, list, entry } => {
                list(s).iter().enumerate().try_for_each(|(i, e)| {
                    entry(e).map_err(|why| Invalid::new(format!("{key}[{i}]"), why))
                })
            }
            Rule::Computed { key, verdict } => verdict(s).map_err(|why| Invalid::new(key, why)),
        }
    }
}

const GREATER_THAN_0: &str = "must be greater than 0";
const AT_LEAST_1: &str = "must be at least 1";
const NUMBER_AT_LEAST_0: &str = "must be a number >= 0";

/// Every check of [`Settings::check`], in the order they are made (the
/// first that fails is reported).
const RULES: &[Rule] = &[
    Rule::Fixed {
        key: "websocket.heartbeat_interval",
        bad: |s| s.websocket.heartbeat_interval.is_zero(),
        why: GREATER_THAN_0,
    },
    Rule::Fixed {
        key: "websocket.client_timeout",
        bad: |s| s.websocket.client_timeout < s.websocket.heartbeat_interval * 2,
        why: "must be at least twice websocket.heartbeat_interval",
    },
    Rule::Fixed {
        key: "websocket.max_message_bytes",
        bad: |s| s.websocket.max_message_bytes < 64,
        why: "must be at least 64",
    },
    Rule::Fixed {
        key: "websocket.max_links_per_subscribe",
        bad: |s| s.websocket.max_links_per_subscribe == 0,
        why: AT_LEAST_1,
    },
    Rule::Fixed {
        key: "events.keepalive_interval",
        bad: |s| !within(s.events.keepalive_interval, 600),
        why: "must be between 1ms and 10min",
    },
    Rule::Fixed {
        key: "events.retry",
        bad: |s| s.events.retry > Duration::from_secs(3600),
        why: "must be at most 1h",
    },
    Rule::Fixed {
        key: "admin.token",
        bad: |s| {
            s.admin
                .token
                .get()
                .is_some_and(|t| t.len() < 16 || !t.bytes().all(|b| b.is_ascii_graphic()))
        },
        why: "must be at least 16 printable characters without spaces (or empty for none)",
    },
    Rule::Fixed {
        key: "counter.delivery_budget",
        bad: |s| s.counter.delivery_budget == 0,
        why: AT_LEAST_1,
    },
    Rule::Fixed {
        key: "websocket.close_timeout",
        bad: |s| !within(s.websocket.close_timeout, 60),
        why: "must be between 1ms and 60s",
    },
    Rule::Fixed {
        key: "storage.snapshot_interval",
        bad: |s| s.storage.snapshot_interval.is_zero(),
        why: GREATER_THAN_0,
    },
    Rule::Fixed {
        key: "counter.max_worker_lag",
        bad: |s| s.counter.max_worker_lag.is_zero(),
        why: GREATER_THAN_0,
    },
    Rule::Fixed {
        key: "counter.broadcast_interval",
        bad: |s| s.counter.broadcast_interval.is_zero(),
        why: GREATER_THAN_0,
    },
    Rule::Fixed {
        key: "counter.sweep_interval",
        bad: |s| s.counter.sweep_interval.is_zero(),
        why: GREATER_THAN_0,
    },
    Rule::Fixed {
        key: "room.idle_timeout",
        bad: |s| s.room.idle_timeout.is_zero(),
        why: GREATER_THAN_0,
    },
    Rule::Fixed {
        key: "room.storage_ttl",
        bad: |s| s.room.storage_ttl.is_zero(),
        why: GREATER_THAN_0,
    },
    Rule::Fixed {
        key: "storage.stats_retention",
        bad: |s| s.storage.stats_retention.is_zero(),
        why: GREATER_THAN_0,
    },
    Rule::Fixed {
        key: "server.shutdown_timeout",
        bad: |s| s.server.shutdown_timeout.is_zero(),
        why: GREATER_THAN_0,
    },
    Rule::Fixed {
        key: "storage.history_minutes",
        bad: |s| {
            s.storage.history_minutes < Duration::from_secs(3600)
                || s.storage.history_minutes > s.storage.history_hours
        },
        why: "must be at least 1h and at most storage.history_hours",
    },
    Rule::Fixed {
        key: "storage.history_hours",
        bad: |s| s.storage.history_hours > Duration::from_secs(400 * 86_400),
        why: "must be at most 400days",
    },
    // actix-http measures this deadline on a clock that ticks every 500 ms;
    // shorter values would refuse every request with 408.
    Rule::Fixed {
        key: "limits.handshake_timeout",
        bad: |s| s.limits.handshake_timeout < Duration::from_secs(1),
        why: "must be at least 1s",
    },
    Rule::Fixed {
        key: "limits.messages_per_second",
        bad: |s| !non_negative(s.limits.messages_per_second),
        why: NUMBER_AT_LEAST_0,
    },
    Rule::Fixed {
        key: "limits.burst",
        bad: |s| s.limits.messages_per_second > 0.0 && s.limits.burst < 1.0,
        why: AT_LEAST_1,
    },
    Rule::Fixed {
        key: "limits.connections_per_ip_per_second",
        bad: |s| !non_negative(s.limits.connections_per_ip_per_second),
        why: NUMBER_AT_LEAST_0,
    },
    Rule::Fixed {
        key: "limits.connections_per_ip_burst",
        bad: |s| {
            s.limits.connections_per_ip_per_second > 0.0 && s.limits.connections_per_ip_burst < 1.0
        },
        why: AT_LEAST_1,
    },
    Rule::Fixed {
        key: "limits.flood_strikes",
        bad: |s| s.limits.flood_strikes == 0,
        why: AT_LEAST_1,
    },
    Rule::Fixed {
        key: "limits.max_rooms",
        bad: |s| s.limits.max_rooms == 0,
        why: AT_LEAST_1,
    },
    Rule::Fixed {
        key: "limits.max_pages",
        bad: |s| s.limits.max_pages < s.limits.max_rooms,
        why: "must be at least limits.max_rooms",
    },
    Rule::Entries {
        key: "security.allowed_origins",
        list: |s| &s.security.allowed_origins,
        entry: check_origin,
    },
    Rule::Entries {
        key: "security.bot_user_agents",
        list: |s| &s.security.bot_user_agents,
        entry: check_bot_token,
    },
    Rule::Fixed {
        key: "storage.path",
        bad: |s| s.storage.path.as_os_str().is_empty(),
        why: "must not be empty",
    },
    Rule::Fixed {
        key: "storage.cache_capacity",
        bad: |s| s.storage.cache_capacity < 1 << 20,
        why: "must be at least 1048576 (1 MiB)",
    },
    Rule::Fixed {
        key: "storage.max_records",
        bad: |s| s.storage.max_records == 0,
        why: AT_LEAST_1,
    },
    // The cluster's settings matter only when it is on.
    Rule::Computed {
        key: "cluster.redis_url",
        verdict: |s| {
            if !s.cluster.enabled() {
                return Ok(());
            }
            s.cluster.redis_urls().into_iter().try_for_each(|url| {
                redis::Client::open(url)
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
        },
    },
    Rule::Fixed {
        key: "cluster.key_prefix",
        bad: |s| s.cluster.enabled() && s.cluster.key_prefix.contains(['{', '}']),
        why: "must not contain '{' or '}' (the keys carry their own hash tags)",
    },
    Rule::Fixed {
        key: "cluster.heartbeat_interval",
        bad: |s| s.cluster.enabled() && s.cluster.heartbeat_interval.is_zero(),
        why: GREATER_THAN_0,
    },
    Rule::Fixed {
        key: "cluster.node_ttl",
        bad: |s| s.cluster.enabled() && s.cluster.node_ttl < s.cluster.heartbeat_interval * 2,
        why: "must be at least twice cluster.heartbeat_interval",
    },
    Rule::Fixed {
        key: "cluster.channels",
        bad: |s| s.cluster.enabled() && s.cluster.channels == 0,
        why: AT_LEAST_1,
    },
    Rule::Computed {
        key: "admin.bind",
        verdict: |s| {
            let bind = s.admin.bind.trim();
            if bind.is_empty() || bind.parse::<SocketAddr>().is_ok() {
                Ok(())
            } else {
                Err(format!(
                    "{bind:?} is not an address:port (use \"\" for no admin listener)"
                ))
            }
        },
    },
    Rule::Computed {
        key: "log.filter",
        verdict: |s| {
            tracing_subscriber::EnvFilter::try_new(&s.log.filter)
                .map(drop)
                .map_err(|e| e.to_string())
        },
    },
];

/// `d` is more than zero and at most `max_secs` seconds.
fn within(d: Duration, max_secs: u64) -> bool {
    !d.is_zero() && d <= Duration::from_secs(max_secs)
}

/// `x` is a finite number, zero or more.
fn non_negative(x: f64) -> bool {
    x >= 0.0 && x.is_finite()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    /// Address of the admin listener (`/metrics`, `/dashboard`); empty = none.
    pub bind: String,
    /// Also serve `/metrics` on the public listener.
    pub metrics_on_public: bool,
    /// Bearer token every admin data route requires; empty = none. A secret:
    /// never logged, never shown (its `Debug` is redacted).
    pub(crate) token: AdminToken,
}

/// The admin token (see [`AdminSettings::token`]).
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub(crate) struct AdminToken(String);

impl AdminToken {
    /// The token, `None` when unset.
    pub(crate) fn get(&self) -> Option<&str> {
        (!self.0.is_empty()).then_some(self.0.as_str())
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "(none)" } else { "***" })
    }
}

impl AdminSettings {
    /// The admin address, `None` when `admin.bind` is empty (validated by [`Settings::validate`]).
    pub(crate) fn addr(&self) -> Option<SocketAddr> {
        self.bind.trim().parse().ok()
    }
}

/// Output format of the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// Every format, in the order the documentation lists them.
    pub(crate) const ALL: [LogFormat; 2] = [LogFormat::Text, LogFormat::Json];

    /// The config value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl<'de> Deserialize<'de> for LogFormat {
    /// `"text"` or `"json"` (any case); anything else is refused with the valid values.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let given = String::deserialize(d)?;
        one_of(&given, &LogFormat::ALL, LogFormat::as_str, "a log format").map_err(D::Error::custom)
    }
}

/// The value of `all` named `given` (by `name`, in any case), or an error
/// saying it is not `what` and listing the valid names.
fn one_of<T: Copy>(
    given: &str,
    all: &[T],
    name: fn(T) -> &'static str,
    what: &str,
) -> Result<T, String> {
    let found = all
        .iter()
        .copied()
        .find(|v| given.trim().eq_ignore_ascii_case(name(*v)));
    found.ok_or_else(|| {
        let names: Vec<String> = all.iter().map(|v| format!("{:?}", name(*v))).collect();
        format!("{given:?} is not {what}; use {}", names.join(" or "))
    })
}

impl<'de> Deserialize<'de> for Compression {
    /// `"zstd"` or `"none"` (any case); anything else is refused with the valid values.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let given = String::deserialize(d)?;
        one_of(
            &given,
            &Compression::ALL,
            Compression::as_str,
            "a compression",
        )
        .map_err(D::Error::custom)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// `text` or `json`.
    pub format: LogFormat,
    /// RUST_LOG-style filter used when `RUST_LOG` is not set.
    pub(crate) filter: String,
}

fn resolve_threads(n: usize) -> usize {
    if n > 0 {
        n
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// A setting that cannot be used: its key and why.
#[derive(Debug)]
struct Invalid {
    key: String,
    why: String,
}

impl Invalid {
    fn new(key: impl Into<String>, why: impl Into<String>) -> Invalid {
        Invalid {
            key: key.into(),
            why: why.into(),
        }
    }
}

/// The embedded defaults as a table: every setting, with its value.
fn defaults() -> &'static toml::Table {
    static DEFAULTS: OnceLock<toml::Table> = OnceLock::new();
    DEFAULTS.get_or_init(|| {
        toml::from_str(DEFAULT_TOML).unwrap_or_else(|e| {
            // Compiled in and read by every test: cannot fail in a build
            // that passed them.
            unreachable!("config/default.toml is not valid TOML: {e}")
        })
    })
}

/// The default value of `section.key`, if it is a setting.
fn default_of(key: &str) -> Option<&'static toml::Value> {
    let (section, key) = key.split_once('.')?;
    defaults().get(section)?.get(key)
}

/// The `LINK_COUNTER__SECTION__KEY` variables of settings that are not
/// lists, left as text: the config crate's deserializer converts text to the
/// setting's type (`"8"` to a number, `"FALSE"` to a boolean), and a text
/// setting keeps its text exactly (an admin token of digits keeps its
/// leading zeros, which `try_parsing` would drop by reading it as a number).
fn environment() -> config::Environment {
    config::Environment::with_prefix(ENV_PREFIX)
        .prefix_separator("__")
        .separator("__")
}

/// The variables of list settings (the settings whose default is a list):
/// split at commas by the config crate.
fn list_environment() -> config::Environment {
    known_settings()
        .iter()
        .filter(|(section, key)| is_list(&format!("{section}.{key}")))
        .fold(
            environment().try_parsing(true).list_separator(","),
            |env, (section, key)| env.with_list_parse_key(&format!("{section}.{key}")),
        )
}

/// A setting holding a list (its default is one).
fn is_list(key: &str) -> bool {
    matches!(default_of(key), Some(toml::Value::Array(_)))
}

/// The message of an error of the config crate's deserializer without the
/// key and origin it may append (the caller names both): serde's
/// "invalid type: …, expected …", or a setting's own message.
fn config_message(e: &config::ConfigError) -> String {
    match e {
        config::ConfigError::Type {
            unexpected,
            expected,
            ..
        } => format!("invalid type: {unexpected}, expected {expected}"),
        config::ConfigError::At { error, .. } => config_message(error),
        config::ConfigError::Message(message) => message.clone(),
        other => other.to_string(),
    }
}

/// A setting holding a duration (its default is one, e.g. `"15s"`).
fn is_duration(key: &str) -> bool {
    default_of(key)
        .and_then(toml::Value::as_str)
        .is_some_and(|d| humantime::parse_duration(d).is_ok())
}

/// A path of serde_path_to_error as a setting's name: `section.key`, with
/// `[i]` for a list entry.
fn path_name(path: &serde_path_to_error::Path) -> String {
    let mut name = String::new();
    for segment in path.iter() {
        match segment {
            serde_path_to_error::Segment::Seq { index } => name.push_str(&format!("[{index}]")),
            serde_path_to_error::Segment::Map { key }
            | serde_path_to_error::Segment::Enum { variant: key } => {
                if !name.is_empty() {
                    name.push('.');
                }
                name.push_str(key);
            }
            serde_path_to_error::Segment::Unknown => name.push_str(".?"),
        }
    }
    name
}

/// Where the values of a load came from, to say where a bad one was set.
#[derive(Default)]
struct Sources {
    /// The config file and its text.
    file: Option<(PathBuf, String)>,
    /// `section.key` -> the environment variable that set it.
    env: HashMap<String, String>,
}

impl Sources {
    /// " (from environment variable X)", " (in FILE, line N)", or, for a
    /// default, " (the default; …)" naming the variable that overrides it.
    fn origin(&self, key: &str) -> String {
        let base = key.split('[').next().unwrap_or(key);
        if let Some(var) = self.env.get(base) {
            return format!(" (from environment variable {var})");
        }
        if let Some((path, text)) = &self.file {
            if let Some(n) = toml_line(text, key) {
                return format!(" (in {}, line {n})", path.display());
            }
        }
        if default_of(base).is_some() {
            let var = format!(
                "{ENV_SETTING_PREFIX}{}",
                base.replace('.', "__").to_uppercase()
            );
            return format!(" (the default; set it in the config file or with {var})");
        }
        String::new()
    }

    /// The error of a setting that failed a check.
    fn locate(&self, e: Invalid) -> ConfigError {
        let origin = self.origin(&e.key);
        ConfigError(format!(
            "invalid configuration: {}: {}{origin}",
            e.key, e.why
        ))
    }

    /// The error of a value serde refused: the setting (with a list entry's
    /// index), serde's message (the expected type), where it was set, and
    /// how durations and lists are written.
    fn explain(&self, e: &serde_path_to_error::Error<config::ConfigError>) -> ConfigError {
        let key = path_name(e.path());
        let whole = !key.contains('[');
        let hint = if whole && is_duration(&key) {
            DURATION_HINT
        } else if whole && is_list(&key) {
            "; write a list: [\"a\", \"b\"] in a file, a,b in an environment variable"
        } else {
            ""
        };
        let message = config_message(e.inner());
        let message = message.trim_end();
        if key.is_empty() {
            return ConfigError(format!("invalid configuration: {message}"));
        }
        let origin = self.origin(&key);
        ConfigError(format!(
            "invalid configuration: {key}: {message}{origin}{hint}"
        ))
    }

    /// Refuses a file section or key that is no setting, naming its line
    /// and the nearest setting.
    fn refuse_unknown_keys(&self, file: &toml::Table) -> Result<(), ConfigError> {
        for (section, value) in file {
            let names: Vec<String> = match (defaults().get(section), value) {
                (None, _) => vec![section.clone()],
                (Some(toml::Value::Table(known)), toml::Value::Table(given)) => given
                    .keys()
                    .filter(|key| !known.contains_key(*key))
                    .map(|key| format!("{section}.{key}"))
                    .collect(),
                // A section given as a value: serde says what it expects.
                _ => Vec::new(),
            };
            if let Some(full) = names.first() {
                return Err(ConfigError(format!(
                    "invalid configuration: {full}: not a setting{}{}",
                    self.origin(full),
                    setting_hint(full)
                )));
            }
        }
        Ok(())
    }
}

/// The process environment as text. Variables that are not valid UTF-8 are
/// skipped (none of them is a setting), except a `LINK_COUNTER__` one.
pub fn process_env() -> Result<Vec<(String, String)>, ConfigError> {
    let mut env = Vec::new();
    for (name, value) in std::env::vars_os() {
        let name = name.to_string_lossy().into_owned();
        match value.into_string() {
            Ok(value) => env.push((name, value)),
            Err(_) if name.starts_with(ENV_SETTING_PREFIX) => {
                return Err(ConfigError(format!(
                    "invalid configuration: environment variable {name} is not valid UTF-8"
                )))
            }
            Err(_) => {}
        }
    }
    Ok(env)
}

/// Warnings about environment variables that start with `LINK_COUNTER` but
/// are not settings and so are ignored (a single underscore, lower case, a
/// typo in the prefix), each naming the variable and the nearest setting's
/// variable when one is close. `LINK_COUNTER__…` variables are not here: an
/// unknown one is an error of [`Settings::load`].
pub fn env_warnings<S: AsRef<str>>(names: impl IntoIterator<Item = S>) -> Vec<String> {
    let mut warnings: Vec<String> = names
        .into_iter()
        .filter_map(|name| {
            let name = name.as_ref();
            let ours = name
                .get(..ENV_PREFIX.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(ENV_PREFIX));
            if !ours || name.starts_with(ENV_SETTING_PREFIX) || TOOLING_VARS.contains(&name) {
                return None;
            }
            let hint = match nearest_env_var(name) {
                Some(var) => format!("; did you mean {var}?"),
                None => String::new(),
            };
            Some(format!(
                "environment variable {name} is ignored: it is not a setting \
                 (settings are LINK_COUNTER__SECTION__KEY, in capitals, with two underscores \
                 between the parts){hint}"
            ))
        })
        .collect();
    warnings.sort();
    warnings
}

/// Every setting as (section, key), read from the embedded defaults (which
/// list every setting).
fn known_settings() -> &'static [(String, String)] {
    static KNOWN: OnceLock<Vec<(String, String)>> = OnceLock::new();
    KNOWN.get_or_init(|| {
        let mut known: Vec<(String, String)> = defaults()
            .iter()
            .filter_map(|(section, value)| Some((section, value.as_table()?)))
            .flat_map(|(section, table)| table.keys().map(|key| (section.clone(), key.clone())))
            .collect();
        known.sort();
        known
    })
}

/// Is `section.key` a setting?
fn is_setting(section: &str, key: &str) -> bool {
    known_settings()
        .iter()
        .any(|(s, k)| s == section && k == key)
}

/// The keys of `section`, if it is one.
fn section_keys(section: &str) -> Vec<&'static str> {
    known_settings()
        .iter()
        .filter(|(s, _)| s == section)
        .map(|(_, k)| k.as_str())
        .collect()
}

/// The setting a `LINK_COUNTER__SECTION__KEY` variable sets (`section.key`),
/// or the error naming the variable and the nearest one.
fn env_setting(name: &str) -> Result<String, ConfigError> {
    let rest = name[ENV_SETTING_PREFIX.len()..].to_ascii_lowercase();
    if let Some((section, key)) = rest.split_once("__") {
        if is_setting(section, key) {
            return Ok(format!("{section}.{key}"));
        }
    }
    let hint = match nearest_env_var(name) {
        Some(var) => format!("; did you mean {var}?"),
        None => match rest.split_once("__") {
            Some((section, _)) if !section_keys(section).is_empty() => format!(
                "; the settings of [{section}] are {}",
                section_keys(section).join(", ")
            ),
            _ => String::new(),
        },
    };
    Err(ConfigError(format!(
        "invalid configuration: environment variable {name} is not a setting \
         (settings are LINK_COUNTER__SECTION__KEY, e.g. LINK_COUNTER__SERVER__BIND){hint}"
    )))
}

/// A name compared without case or underscores.
fn compact(s: &str) -> String {
    s.chars()
        .filter(|c| *c != '_' && *c != '.')
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// The one candidate close to `word` (same letters ignoring case and
/// underscores, or a small edit away), if there is exactly one.
fn nearest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let word = compact(word);
    let limit = (word.chars().count() / 3).clamp(1, 3);
    let mut best: Option<(usize, &str)> = None;
    let mut tie = false;
    for c in candidates {
        let d = strsim::levenshtein(&word, &compact(c));
        match best {
            Some((b, _)) if d > b => {}
            Some((b, _)) if d == b => tie = true,
            _ => {
                best = Some((d, c));
                tie = false;
            }
        }
    }
    match best {
        Some((d, c)) if d <= limit && !tie => Some(c),
        _ => None,
    }
}

/// The setting variable nearest to `name` (`LINK_COUNTER_SERVER_BIND` ->
/// `LINK_COUNTER__SERVER__BIND`).
fn nearest_env_var(name: &str) -> Option<String> {
    let rest = name.get(ENV_PREFIX.len()..).unwrap_or(name);
    let names: Vec<String> = known_settings()
        .iter()
        .map(|(s, k)| format!("{s}.{k}"))
        .collect();
    let found = nearest(rest, names.iter().map(String::as_str))?;
    Some(format!(
        "{ENV_SETTING_PREFIX}{}",
        found.replace('.', "__").to_ascii_uppercase()
    ))
}

/// "; did you mean …?" or the valid names, for an unknown `section.key` or `section`.
fn setting_hint(full: &str) -> String {
    let sections: Vec<&str> = {
        let mut v: Vec<&str> = known_settings().iter().map(|(s, _)| s.as_str()).collect();
        v.dedup();
        v
    };
    match full.split_once('.') {
        Some((section, key)) if sections.contains(&section) => {
            let keys = section_keys(section);
            match nearest(key, keys.iter().copied()) {
                Some(k) => format!("; did you mean {section}.{k}?"),
                None => format!("; the settings of [{section}] are {}", keys.join(", ")),
            }
        }
        _ => {
            let section = full.split('.').next().unwrap_or(full);
            match nearest(section, sections.iter().copied()) {
                Some(s) => format!("; did you mean [{s}]?"),
                None => format!("; the sections are {}", sections.join(", ")),
            }
        }
    }
}

/// The line (1-based) where a TOML text sets `key` (`section`,
/// `section.key`, or a list entry `section.key[i]`), from the parser's
/// spans: the key under its `[section]` header, as a dotted key or in an
/// inline table, or the entry's own line. `None` when the text does not set it.
fn toml_line(text: &str, key: &str) -> Option<usize> {
    let document = toml::de::DeTable::parse(text).ok()?;
    let (names, index) = match key.split_once('[') {
        Some((names, rest)) => (names, rest.trim_end_matches(']').parse::<usize>().ok()),
        None => (key, None),
    };
    let mut table = document.get_ref();
    let mut found: Option<(std::ops::Range<usize>, &toml::de::DeValue<'_>)> = None;
    for name in names.split('.') {
        if let Some((_, value)) = &found {
            let toml::de::DeValue::Table(inner) = value else {
                return None;
            };
            table = inner;
        }
        let (k, v) = table.iter().find(|(k, _)| k.get_ref().as_ref() == name)?;
        found = Some((k.span(), v.get_ref()));
    }
    let (mut span, value) = found?;
    if let (Some(i), toml::de::DeValue::Array(entries)) = (index, value) {
        if let Some(entry) = entries.get(i) {
            span = entry.span();
        }
    }
    Some(line_and_column(text, span.start).0)
}

/// The line and column (both 1-based, the column in characters) of a byte
/// offset of `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (
        before.matches('\n').count() + 1,
        before[line_start..].chars().count() + 1,
    )
}

/// A TOML syntax error of the config file: its name, the line and column
/// (from the parser's span), what is wrong, and the line with a caret.
fn toml_syntax_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let message = e.message().trim_end();
    let Some(span) = e.span() else {
        return ConfigError(format!(
            "invalid configuration: {}: {message} (TOML syntax)",
            path.display()
        ));
    };
    let (line, column) = line_and_column(text, span.start);
    let content = text.lines().nth(line - 1).unwrap_or_default();
    let gutter = " ".repeat(line.to_string().len() + 1);
    let width = text
        .get(span.clone())
        .map_or(1, |s| s.chars().count())
        .clamp(1, content.chars().count().saturating_sub(column - 1).max(1));
    ConfigError(format!(
        "invalid configuration: {}, line {line}, column {column}: {message} (TOML syntax)\n\
         {gutter}|\n{line} | {content}\n{gutter}| {}{}",
        path.display(),
        " ".repeat(column - 1),
        "^".repeat(width)
    ))
}

/// The hint for a list entry that is really a whole list (JSON or TOML
/// syntax pasted into an environment variable), naming the variable.
fn list_hint(entry: &str, var: &str, example: &str) -> String {
    let t = entry.trim();
    if t.contains(['"', '\'', ',']) || t.starts_with('[') || t.ends_with(']') {
        format!(
            "; in an environment variable give a comma-separated list without brackets or \
             quotes, e.g. {var}={example}"
        )
    } else {
        String::new()
    }
}

/// The error line for a listener that could not bind: the setting, the
/// address, the cause, and what to change. `key` is `server.bind` or
/// `admin.bind`.
pub fn bind_error(key: &str, addr: std::net::SocketAddr, e: &std::io::Error) -> String {
    let var = format!("LINK_COUNTER__{}", key.replace('.', "__").to_uppercase());
    let fix = match e.kind() {
        std::io::ErrorKind::AddrInUse => format!(
            ": another process listens there (another link-counter?); set {key} \
             ({var}) to a free address"
        ),
        std::io::ErrorKind::PermissionDenied if addr.port() < 1024 => format!(
            ": a port below 1024 needs root or CAP_NET_BIND_SERVICE; set {key} ({var}) \
             to a port of 1024 or above"
        ),
        std::io::ErrorKind::AddrNotAvailable => format!(
            ": no interface of this host has that address; set {key} ({var}) to one it \
             has, or 0.0.0.0"
        ),
        _ => String::new(),
    };
    let off = if key == "admin.bind" {
        ", or to \"\" to turn the admin listener off"
    } else {
        ""
    };
    if fix.is_empty() {
        format!("{key} {addr}: {e}")
    } else {
        format!("{key} {addr}: {e}{fix}{off}")
    }
}

/// Checks one `security.bot_user_agents` entry (trimmed): visible ASCII
/// (spaces inside allowed), not empty, no comma (the environment's list separator).
pub(crate) fn check_bot_token(entry: &str) -> Result<(), String> {
    let shape = "a crawler token is part of a User-Agent, e.g. \"Googlebot\"";
    if entry.trim().is_empty() {
        return Err(format!("{entry:?} is empty; {shape}"));
    }
    if entry.contains(',') {
        return Err(format!(
            "{entry:?} contains a comma{}",
            list_hint(
                entry,
                "LINK_COUNTER__SECURITY__BOT_USER_AGENTS",
                "Googlebot,bingbot"
            )
        ));
    }
    if !entry.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
        return Err(format!(
            "{entry:?} is not visible ASCII (a User-Agent is); {shape}"
        ));
    }
    Ok(())
}

/// Checks one `security.allowed_origins` entry: `scheme://host[:port]` or a
/// pattern (`host`, `*.domain`, `https://*.domain`), no path, no spaces.
pub(crate) fn check_origin(entry: &str) -> Result<(), String> {
    let s = entry.trim();
    let not = |why: String| Err(format!("{entry:?} is not an origin{why}"));
    let shape = " (an origin is scheme://host[:port], e.g. \"https://example.com\")";
    if s.is_empty() {
        return not(format!(": it is empty{shape}"));
    }
    if s.contains(['"', '\'', ',']) || (s.starts_with('[') && s.contains("://")) {
        return not(list_hint(
            s,
            "LINK_COUNTER__SECURITY__ALLOWED_ORIGINS",
            "https://a.example,https://b.example",
        ));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return not(format!(
            ": it contains a space or a control character{shape}"
        ));
    }
    let (scheme, rest) = match s.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, s),
    };
    if let Some(scheme) = scheme {
        let mut chars = scheme.chars();
        let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
        if !valid {
            return not(format!(": {scheme:?} is not a scheme{shape}"));
        }
    }
    if let Some(i) = rest.find(['/', '?', '#']) {
        return not(format!(
            ": it has a path ({:?}); give only scheme://host[:port]",
            &rest[i..]
        ));
    }
    if rest.contains('@') {
        return not(format!(": it has a user name{shape}"));
    }
    let host = match rest.strip_prefix('[') {
        Some(r) => r.split(']').next().unwrap_or_default(),
        None => rest.rsplit_once(':').map_or(rest, |(h, _)| h),
    };
    if !host.is_ascii() {
        return not(
            ": the host is not ASCII; write an internationalized domain in its \
                     xn-- (punycode) form, as browsers send it"
                .to_owned(),
        );
    }
    let valid_host = if rest.starts_with('[') {
        host.chars()
            .all(|c| c.is_ascii_hexdigit() || ":.".contains(c))
    } else {
        host.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._*".contains(c))
    };
    if !valid_host {
        return not(format!(": {host:?} is not a host name{shape}"));
    }
    crate::limits::OriginPattern::parse(s).map(drop)
}

/// Parses one `security.trusted_proxies` entry: a CIDR (`10.0.0.0/8`) or one
/// address (`10.0.0.1`, the same as `10.0.0.1/32`); spaces around are ignored.
pub(crate) fn parse_proxy(entry: &str) -> Result<ipnet::IpNet, String> {
    let t = entry.trim();
    if let Ok(net) = t.parse::<ipnet::IpNet>() {
        return Ok(net);
    }
    if let Ok(addr) = t.parse::<IpAddr>() {
        return Ok(ipnet::IpNet::from(addr));
    }
    let hint = list_hint(
        t,
        "LINK_COUNTER__SECURITY__TRUSTED_PROXIES",
        "10.0.0.0/8,192.168.1.10",
    );
    let hint = if hint.is_empty() {
        "; write a CIDR such as \"10.0.0.0/8\" or one address such as \"192.168.1.10\"".to_owned()
    } else {
        hint
    };
    Err(format!("{entry:?} is not an IP network{hint}"))
}

/// One `security.trusted_proxies` entry, parsed by [`parse_proxy`] (so that
/// an error's path names the entry's index).
struct Proxy(ipnet::IpNet);

impl<'de> Deserialize<'de> for Proxy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let entry = String::deserialize(d)?;
        parse_proxy(&entry).map(Proxy).map_err(D::Error::custom)
    }
}

fn deserialize_proxies<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ipnet::IpNet>, D::Error> {
    Ok(Vec::<Proxy>::deserialize(d)?
        .into_iter()
        .map(|Proxy(net)| net)
        .collect())
}

/// A list of strings, each trimmed, where one empty entry (what an empty
/// environment variable gives) is the empty list.
fn deserialize_tokens<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let list: Vec<String> = Vec::<String>::deserialize(d)?
        .into_iter()
        .map(|t| t.trim().to_owned())
        .collect();
    Ok(if list.len() == 1 && list[0].is_empty() {
        Vec::new()
    } else {
        list
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let mut all = vec![(
            "LINK_COUNTER__STORAGE__PATH".to_owned(),
            "/nonexistent/lc".to_owned(),
        )];
        all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Settings::load_from(None, all)
    }

    #[test]
    fn every_setting_is_known() {
        let known = known_settings();
        assert!(known.len() > 30, "{known:?}");
        assert!(is_setting("server", "bind") && is_setting("security", "allowed_origins"));
        assert!(!is_setting("server", "bnd"));
    }

    #[test]
    fn near_names_are_suggested_only_when_obvious() {
        let var = |n: &str| nearest_env_var(n);
        assert_eq!(
            var("LINK_COUNTER_SERVER_BIND").as_deref(),
            Some("LINK_COUNTER__SERVER__BIND")
        );
        assert_eq!(
            var("link_counter__admin__token").as_deref(),
            Some("LINK_COUNTER__ADMIN__TOKEN")
        );
        assert_eq!(
            var("LINK_COUNTER_LIMITS_MAX_CONECTIONS").as_deref(),
            Some("LINK_COUNTER__LIMITS__MAX_CONNECTIONS")
        );
        assert_eq!(var("LINK_COUNTER_WHATEVER"), None);
        assert_eq!(var("LINK_COUNTER_"), None);
        assert_eq!(nearest("bnd", ["bind", "workers"]), Some("bind"));
        assert_eq!(nearest("b", ["a", "c"]), None, "a tie suggests nothing");
    }

    #[test]
    fn warnings_name_ignored_lookalikes_only() {
        let w = env_warnings([
            "LINK_COUNTER_SERVER_BIND",
            "LINK_COUNTER__SERVER__BIND",
            "LINK_COUNTER_BIN",
            "PATH",
            "LINK_COUNTERX",
            "lin",
        ]);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w.iter().any(|l| l.contains("LINK_COUNTER_SERVER_BIND")
            && l.contains("did you mean LINK_COUNTER__SERVER__BIND?")));
        assert!(w.iter().any(|l| l.contains("LINK_COUNTERX")));
    }

    #[test]
    fn unknown_setting_variables_are_errors() {
        let e = load(&[("LINK_COUNTER__SERVER__BND", "x")]).expect_err("unknown");
        assert!(e.0.contains("LINK_COUNTER__SERVER__BND"), "{e}");
        assert!(
            e.0.contains("did you mean LINK_COUNTER__SERVER__BIND?"),
            "{e}"
        );
        let e = load(&[("LINK_COUNTER__SERVER__QQQQQQQQQ", "x")]).expect_err("unknown");
        assert!(e.0.contains("bind, shutdown_timeout, workers"), "{e}");
        let e = load(&[("LINK_COUNTER__", "x")]).expect_err("empty");
        assert!(e.0.contains("not a setting"), "{e}");
        // Case of the section and key does not matter in a variable.
        assert!(load(&[("LINK_COUNTER__server__workers", "3")]).is_ok());
    }

    #[test]
    fn origins_are_checked_strictly() {
        for ok in [
            "https://example.com",
            " https://example.com",
            "http://localhost:8080",
            "example.com",
            "*.example.com",
            "https://*.example.com",
            "http://[::1]:8080",
            "[::1]",
        ] {
            assert!(check_origin(ok).is_ok(), "{ok}: {:?}", check_origin(ok));
        }
        for (bad, why) in [
            ("", "empty"),
            ("[\"https://a.example\"]", "comma-separated list"),
            ("'https://a.example'", "comma-separated list"),
            ("[https://a.example]", "comma-separated list"),
            ("https://exa mple.com", "space"),
            ("https://a.example/", "path"),
            ("https://a.example?x", "path"),
            ("https://user@a.example", "user"),
            ("ht tp://a.example", "space"),
            ("1http://a.example", "scheme"),
            ("https://bücher.example", "xn--"),
            ("https://a!b.example", "host"),
            ("https://a.example:99999", "port"),
            ("https://a.*.example", "'*'"),
        ] {
            let e = check_origin(bad).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn proxies_accept_cidrs_and_addresses() {
        assert_eq!(
            parse_proxy(" 10.0.0.0/8 ").map(|n| n.to_string()),
            Ok("10.0.0.0/8".to_owned())
        );
        assert_eq!(
            parse_proxy("192.168.1.10").map(|n| n.to_string()),
            Ok("192.168.1.10/32".to_owned())
        );
        assert_eq!(
            parse_proxy("::1").map(|n| n.to_string()),
            Ok("::1/128".to_owned())
        );
        assert!(parse_proxy("[\"10.0.0.0/8\"]")
            .expect_err("json")
            .contains("comma-separated list"));
        assert!(parse_proxy("10.0.0.0/33")
            .expect_err("prefix")
            .contains("CIDR"));
        let s = load(&[(
            "LINK_COUNTER__SECURITY__TRUSTED_PROXIES",
            "10.0.0.0/8, 192.168.1.10",
        )])
        .expect("a list with spaces");
        assert_eq!(s.security.trusted_proxies.len(), 2);
    }

    /// The crawler list: the default names Googlebot, a list from the
    /// environment replaces it, an empty value turns it off, and an empty
    /// entry or one with a comma is refused with the setting's name.
    #[test]
    fn bot_user_agents_load_and_validate() {
        let s = load(&[]).expect("defaults");
        assert!(s.security.bot_user_agents.iter().any(|t| t == "Googlebot"));
        let var = "LINK_COUNTER__SECURITY__BOT_USER_AGENTS";
        let s = load(&[(var, "MyCrawler, OtherBot/1")]).expect("a list");
        assert_eq!(s.security.bot_user_agents, ["MyCrawler", "OtherBot/1"]);
        let s = load(&[(var, "")]).expect("empty");
        assert!(s.security.bot_user_agents.is_empty());
        let e = load(&[(var, "a,,b")])
            .expect_err("an empty entry")
            .to_string();
        assert!(e.contains("security.bot_user_agents[1]"), "{e}");
        assert!(check_bot_token("a,b")
            .expect_err("comma")
            .contains("comma-separated list"));
        assert!(check_bot_token("Bot\u{7f}").is_err());
        assert!(check_bot_token(" ").is_err());
        assert!(check_bot_token("Yahoo! Slurp").is_ok());
    }

    /// Environment text becomes the setting's type (a number, a boolean in
    /// any case), a text setting keeps its text exactly (digits with leading
    /// zeros stay a token, not a number), and a list setting is split at
    /// commas, even when it holds one entry.
    #[test]
    fn environment_text_takes_each_setting_type() {
        let s = load(&[
            ("LINK_COUNTER__SERVER__WORKERS", "3"),
            ("LINK_COUNTER__WEB__DEMO", "FALSE"),
            ("LINK_COUNTER__LIMITS__BURST", "2.5"),
            ("LINK_COUNTER__ADMIN__TOKEN", "0000123456789012345"),
            ("LINK_COUNTER__SECURITY__BOT_USER_AGENTS", "OnlyBot"),
            (
                "LINK_COUNTER__SECURITY__ALLOWED_ORIGINS",
                "https://a.example",
            ),
        ])
        .expect("typed");
        assert_eq!(s.server.workers, 3);
        assert!(!s.web.demo);
        assert_eq!(s.limits.burst, 2.5);
        assert_eq!(s.admin.token.get(), Some("0000123456789012345"));
        assert_eq!(s.security.bot_user_agents, ["OnlyBot"]);
        assert_eq!(s.security.allowed_origins, ["https://a.example"]);
        let e = load(&[("LINK_COUNTER__WEB__DEMO", "maybe")]).expect_err("not a boolean");
        assert!(
            e.0.starts_with("invalid configuration: web.demo: invalid type: string \"maybe\", expected a boolean (from environment variable LINK_COUNTER__WEB__DEMO)"),
            "{e}"
        );
    }

    #[test]
    fn log_format_lists_its_values() {
        let e = load(&[("LINK_COUNTER__LOG__FORMAT", "xml")]).expect_err("xml");
        assert!(
            e.0.starts_with(
                "invalid configuration: log.format: \"xml\" is not a log format; \
                 use \"text\" or \"json\""
            ),
            "{e}"
        );
        assert!(e.0.contains("LINK_COUNTER__LOG__FORMAT"), "{e}");
        let s = load(&[("LINK_COUNTER__LOG__FORMAT", "JSON")]).expect("any case");
        assert_eq!(s.log.format, LogFormat::Json);
    }

    #[test]
    fn compression_lists_its_values() {
        let e = load(&[("LINK_COUNTER__STORAGE__COMPRESSION", "lz4")]).expect_err("lz4");
        assert!(
            e.0.starts_with(
                "invalid configuration: storage.compression: \"lz4\" is not a compression; \
                 use \"zstd\" or \"none\""
            ),
            "{e}"
        );
        let s = load(&[("LINK_COUNTER__STORAGE__COMPRESSION", "None")]).expect("any case");
        assert_eq!(s.storage.compression, Compression::None);
        assert_eq!(
            load(&[]).expect("defaults").storage.compression,
            Compression::Zstd
        );
    }

    #[test]
    fn keys_are_found_in_toml_text() {
        let text =
            "# a comment with bind = 1\n[server]\nworkers = 2\n\n[log]\n  format = \"xml\"\n\
                    [security]\nallowed_origins = [\n  \"a=b\",\n]\n";
        assert_eq!(toml_line(text, "server.workers"), Some(3));
        assert_eq!(toml_line(text, "log.format"), Some(6));
        assert_eq!(toml_line(text, "security"), Some(7));
        assert_eq!(toml_line(text, "security.allowed_origins"), Some(8));
        assert_eq!(toml_line(text, "server.bind"), None);
        assert_eq!(toml_line("log.format = \"x\"\n", "log.format"), Some(1));
        assert_eq!(
            toml_line("\n\"log\" = { format = 1 }\n", "log.format"),
            Some(2)
        );
    }

    #[test]
    fn toml_syntax_errors_name_the_file_line_and_column() {
        let text = "[server]\nbind = \"127.0.0.1:0\"\nworkers = = 3\n";
        let e = toml::from_str::<toml::Table>(text).expect_err("syntax");
        let e = toml_syntax_error(Path::new("/etc/lc.toml"), text, &e);
        let mut lines = e.0.lines();
        assert_eq!(
            lines.next(),
            Some(
                "invalid configuration: /etc/lc.toml, line 3, column 11: extra `=`, \
                 expected nothing (TOML syntax)"
            )
        );
        assert_eq!(
            lines.collect::<Vec<_>>(),
            ["  |", "3 | workers = = 3", "  |           ^"]
        );
    }

    /// A value refused by serde names the key, the expected type, where it
    /// was set (file line, variable, or the default), and how to write it.
    #[test]
    fn type_errors_name_the_key_the_type_and_the_source() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("lc.toml");
        std::fs::write(
            &file,
            "[server]\nworkers = \"many\"\n\n[websocket]\nheartbeat_interval = \"soon\"\n",
        )
        .expect("write");
        let env = vec![(
            "LINK_COUNTER__STORAGE__PATH".to_owned(),
            "/nonexistent/lc".to_owned(),
        )];
        let e = Settings::load_from(Some(&file), env.clone()).expect_err("workers");
        assert!(e.0.starts_with("invalid configuration: server.workers: invalid type: string \"many\", expected an integer"), "{e}");
        assert!(
            e.0.contains(&format!("(in {}, line 2)", file.display())),
            "{e}"
        );
        std::fs::write(&file, "[websocket]\nheartbeat_interval = \"soon\"\n").expect("write");
        let e = Settings::load_from(Some(&file), env.clone()).expect_err("duration");
        assert!(e.0.contains("websocket.heartbeat_interval"), "{e}");
        assert!(
            e.0.contains("line 2") && e.0.ends_with(DURATION_HINT),
            "{e}"
        );
        let e = load(&[("LINK_COUNTER__LIMITS__BURST", "lots")]).expect_err("burst");
        assert!(e.0.contains("limits.burst: invalid type: string \"lots\", expected a floating point (from environment variable LINK_COUNTER__LIMITS__BURST)"), "{e}");
        let e =
            load(&[("LINK_COUNTER__WEBSOCKET__HEARTBEAT_INTERVAL", "1m")]).expect_err("default");
        assert!(e.0.contains("websocket.client_timeout: must be at least twice websocket.heartbeat_interval (the default; set it in the config file or with LINK_COUNTER__WEBSOCKET__CLIENT_TIMEOUT)"), "{e}");
        std::fs::write(&file, "[security]\nallowed_origins = [\n  \"https://a.example\",\n  \"https://b.example/\",\n]\n").expect("write");
        let e = Settings::load_from(Some(&file), env.clone()).expect_err("entry");
        assert!(
            e.0.contains("security.allowed_origins[1]") && e.0.contains("line 4"),
            "{e}"
        );
        std::fs::write(
            &file,
            "[web]\ndemo = \"FALSE\"\n[admin]\ntoken = 1234567890123456789\n",
        )
        .expect("write");
        let s =
            Settings::load_from(Some(&file), env).expect("text for a boolean, a number for a text");
        assert!(!s.web.demo);
        assert_eq!(s.admin.token.get(), Some("1234567890123456789"));
    }
}
