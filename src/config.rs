//! Typed settings: embedded defaults (`config/default.toml`), an optional TOML
//! file, then `LINK_COUNTER__SECTION__KEY` environment variables, validated
//! before anything binds a port.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;

/// The defaults, compiled in so that the binary runs with no file at all.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Prefix of the environment variables that override settings.
pub const ENV_PREFIX: &str = "LINK_COUNTER";

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
    pub websocket: WebSocketSettings,
    /// The counter actor's timers.
    pub counter: CounterSettings,
    /// Page-room lifetimes.
    pub room: RoomSettings,
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
    /// Redis URL; empty = single node (no Redis).
    pub redis_url: String,
    /// Prefix of every Redis key and channel (several clusters can share one Redis).
    pub key_prefix: String,
    /// How often a node refreshes its liveness key and looks for dead nodes.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Lifetime of a node's liveness key: the bound on ghost counts after a crash.
    #[serde(with = "humantime_serde")]
    pub node_ttl: Duration,
    /// Pub/sub channels pages are hashed into.
    pub channels: u32,
}

impl ClusterSettings {
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
    pub max_connections_per_ip: usize,
    /// New connections per client IP per second (0 = none).
    pub connections_per_ip_per_second: f64,
    /// Burst of new connections per client IP.
    pub connections_per_ip_burst: f64,
    /// Client messages per connection per second (0 = none).
    pub messages_per_second: f64,
    /// Burst of client messages per connection.
    pub burst: f64,
    /// Consecutive refused messages before a 1008 close.
    pub flood_strikes: u32,
    /// Deadline for a complete HTTP request.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
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
    /// Proxies whose forwarding headers are trusted.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// Address the HTTP/WebSocket listener binds.
    pub bind: SocketAddr,
    /// Grace period for draining connections on shutdown.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// HTTP worker threads, each also hosting one shard of page rooms
    /// (0 = one per core).
    pub workers: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSettings {
    /// Directory of the sled database.
    pub path: PathBuf,
    /// Interval of batched snapshots (the most a kill -9 can lose).
    #[serde(with = "humantime_serde")]
    pub snapshot_interval: Duration,
    /// How long stats of an inactive page are kept.
    #[serde(with = "humantime_serde")]
    pub stats_retention: Duration,
    /// Bytes of sled's page cache.
    pub cache_capacity: u64,
    /// Most records each stored tree keeps (stats, room records); the least
    /// recently active go first.
    pub max_records: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebSocketSettings {
    /// Server ping period.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Silence after which a connection is dropped.
    #[serde(with = "humantime_serde")]
    pub client_timeout: Duration,
    /// Largest client message in bytes.
    pub max_message_bytes: usize,
    /// Most ids in one subscribe or counts query.
    pub max_links_per_subscribe: usize,
    /// How long a server-initiated close waits for the client's Close frame
    /// before the TCP connection is closed anyway.
    #[serde(with = "humantime_serde")]
    pub close_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CounterSettings {
    /// Coalescing period of count updates.
    #[serde(with = "humantime_serde")]
    pub broadcast_interval: Duration,
    /// Period of the cleanup sweep.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoomSettings {
    /// Idle time after which an empty room stops.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Inactivity after which a room's stored record is deleted.
    #[serde(with = "humantime_serde")]
    pub storage_ttl: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebSettings {
    /// Serve the demo site (`/`, `/pages/a`..`/pages/d`); `/link-counter.js` is always served.
    pub demo: bool,
}

impl Settings {
    /// Defaults, then `file` (if any), then the process environment.
    pub fn load(file: Option<&std::path::Path>) -> Result<Settings, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// Like [`Settings::load`] with an explicit environment (used by tests).
    pub fn load_from(
        file: Option<&std::path::Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError(format!("cannot read config file {}: {e}", path.display()))
            })?;
            builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
        }
        let overrides: std::collections::HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("security.allowed_origins")
                .with_list_parse_key("security.trusted_proxies")
                .source(Some(overrides)),
        );
        let raw = builder
            .build()
            .map_err(|e| ConfigError(format!("invalid configuration: {e}")))?;
        let settings: Settings = raw
            .try_deserialize()
            .map_err(|e| ConfigError(format!("invalid configuration: {e}")))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Cross-field checks that serde cannot express; each error names its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad =
            |key: &str, why: &str| Err(ConfigError(format!("invalid configuration: {key}: {why}")));
        let ws = &self.websocket;
        if ws.heartbeat_interval.is_zero() {
            return bad("websocket.heartbeat_interval", "must be greater than 0");
        }
        if ws.client_timeout < ws.heartbeat_interval * 2 {
            return bad(
                "websocket.client_timeout",
                "must be at least twice websocket.heartbeat_interval",
            );
        }
        if ws.max_message_bytes < 64 {
            return bad("websocket.max_message_bytes", "must be at least 64");
        }
        if ws.max_links_per_subscribe == 0 {
            return bad("websocket.max_links_per_subscribe", "must be at least 1");
        }
        if let Some(t) = self.admin.token.get() {
            if t.len() < 16 || !t.bytes().all(|b| b.is_ascii_graphic()) {
                return bad(
                    "admin.token",
                    "must be at least 16 printable characters without spaces (or empty for none)",
                );
            }
        }
        if ws.close_timeout.is_zero() || ws.close_timeout > Duration::from_secs(60) {
            return bad("websocket.close_timeout", "must be between 1ms and 60s");
        }
        for (key, d) in [
            ("storage.snapshot_interval", self.storage.snapshot_interval),
            (
                "counter.broadcast_interval",
                self.counter.broadcast_interval,
            ),
            ("counter.sweep_interval", self.counter.sweep_interval),
            ("room.idle_timeout", self.room.idle_timeout),
            ("room.storage_ttl", self.room.storage_ttl),
            ("storage.stats_retention", self.storage.stats_retention),
            ("server.shutdown_timeout", self.server.shutdown_timeout),
        ] {
            if d.is_zero() {
                return bad(key, "must be greater than 0");
            }
        }
        let l = &self.limits;
        // actix-http measures this deadline on a clock that ticks every
        // 500 ms; shorter values would refuse every request with 408.
        if l.handshake_timeout < Duration::from_secs(1) {
            return bad("limits.handshake_timeout", "must be at least 1s");
        }
        if l.messages_per_second < 0.0 || !l.messages_per_second.is_finite() {
            return bad("limits.messages_per_second", "must be a number >= 0");
        }
        if l.messages_per_second > 0.0 && l.burst < 1.0 {
            return bad("limits.burst", "must be at least 1");
        }
        if l.connections_per_ip_per_second < 0.0 || !l.connections_per_ip_per_second.is_finite() {
            return bad(
                "limits.connections_per_ip_per_second",
                "must be a number >= 0",
            );
        }
        if l.connections_per_ip_per_second > 0.0 && l.connections_per_ip_burst < 1.0 {
            return bad("limits.connections_per_ip_burst", "must be at least 1");
        }
        if l.flood_strikes == 0 {
            return bad("limits.flood_strikes", "must be at least 1");
        }
        if l.max_rooms == 0 {
            return bad("limits.max_rooms", "must be at least 1");
        }
        if l.max_pages < l.max_rooms {
            return bad("limits.max_pages", "must be at least limits.max_rooms");
        }
        for (i, o) in self.security.allowed_origins.iter().enumerate() {
            if let Err(why) = crate::limits::OriginPattern::parse(o) {
                let key = format!("security.allowed_origins[{i}]");
                return bad(&key, &why);
            }
        }
        if self.storage.path.as_os_str().is_empty() {
            return bad("storage.path", "must not be empty");
        }
        if self.storage.cache_capacity < 1 << 20 {
            return bad("storage.cache_capacity", "must be at least 1048576 (1 MiB)");
        }
        if self.storage.max_records == 0 {
            return bad("storage.max_records", "must be at least 1");
        }
        let c = &self.cluster;
        if c.enabled() {
            if let Err(e) = redis::Client::open(c.redis_url.as_str()) {
                return bad("cluster.redis_url", &e.to_string());
            }
            if c.heartbeat_interval.is_zero() {
                return bad("cluster.heartbeat_interval", "must be greater than 0");
            }
            if c.node_ttl < c.heartbeat_interval * 2 {
                return bad(
                    "cluster.node_ttl",
                    "must be at least twice cluster.heartbeat_interval",
                );
            }
            if c.channels == 0 {
                return bad("cluster.channels", "must be at least 1");
            }
        }
        validate_ops(self)
    }

    /// Worker count after resolving 0 to the number of cores.
    pub fn worker_count(&self) -> usize {
        resolve_threads(self.server.workers)
    }
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
    pub token: AdminToken,
}

/// The admin token (see [`AdminSettings::token`]).
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct AdminToken(String);

impl AdminToken {
    /// The token, `None` when unset.
    pub fn get(&self) -> Option<&str> {
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
    pub fn addr(&self) -> Option<SocketAddr> {
        self.bind.trim().parse().ok()
    }
}

/// Output format of the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// The config value.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// `text` or `json`.
    pub format: LogFormat,
    /// RUST_LOG-style filter used when `RUST_LOG` is not set.
    pub filter: String,
}

/// Checks of the `[admin]` and `[log]` sections; each error names its key.
fn validate_ops(s: &Settings) -> Result<(), ConfigError> {
    let bad =
        |key: &str, why: String| Err(ConfigError(format!("invalid configuration: {key}: {why}")));
    let bind = s.admin.bind.trim();
    if !bind.is_empty() && bind.parse::<SocketAddr>().is_err() {
        return bad(
            "admin.bind",
            format!("{bind:?} is not an address:port (use \"\" for no admin listener)"),
        );
    }
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&s.log.filter) {
        return bad("log.filter", e.to_string());
    }
    Ok(())
}

fn resolve_threads(n: usize) -> usize {
    if n > 0 {
        n
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}
