//! link-counter: live counts of how many people view each page a page links to.
//!
//! # Layout
//! - [`config`]: typed settings: embedded defaults, TOML file, environment overrides.
//! - [`protocol`]: wire types of PROTOCOL.md and page-id rules (the only JSON of the protocol).
//! - [`session`]: one WebSocket connection on the socket it owns (one task, one `select!` loop).
//! - [`events`]: one Server-Sent Events stream on the socket it owns (the WebSocket's fallback).
//! - [`delivery`]: a connection's mailbox: pending output held as state (latest counts merged).
//! - [`shard`]: one shard per HTTP worker (thread per core), whose actor alone owns its page-id → room map.
//! - [`room`]: `PageRoom`, one actor per page: connections, their visitors, link sets, delivery.
//! - [`visitor`]: visitor ids (the rule, the keyed hash kept instead) and distinct-visitor reference counts.
//! - [`counter`]: `Counter`, the supervised singleton: tallies, followers, coalesced publishing, stats.
//! - [`limits`]: admission control: origins, client IP behind trusted proxies, connection caps, token buckets.
//! - [`storage`]: the only module that touches sled.
//! - [`cluster`]: cluster mode, the only module that touches Redis (absent without `cluster.redis_url`).
//! - [`http`]: routes (WebSocket endpoint, event streams, read-only JSON API, health).
//! - [`web`]: browser assets compiled into the binary: `/link-counter.js` (ETag) and the demo site.
//! - [`server`]: wiring and graceful shutdown.
//! - [`supervise`]: panic containment for actor handlers (log, count, hand back for recovery).
//! - [`metrics`]: the names of every Prometheus metric and the helpers that record them.
//! - [`admin`]: the admin listener: `/metrics`, `/dashboard`, `/api/v1/stats`, `/api/v1/top`.
//! - [`logging`]: tracing setup (text or JSON, filter) and the startup settings summary.
//! - [`shutdown`]: SIGINT and SIGTERM.
//! - [`time`]: wall-clock milliseconds and their RFC 3339 text.
//! - [`hash`]: FNV-1a, the stable hash of cluster channel groups and the script's ETag.
#![forbid(unsafe_code)]

pub(crate) mod admin;
pub mod cluster;
pub mod config;
pub mod counter;
pub mod delivery;
pub(crate) mod events;
pub(crate) mod hash;
pub(crate) mod http;
pub(crate) mod limits;
pub mod logging;
pub(crate) mod metrics;
pub mod protocol;
pub mod room;
pub mod server;
pub(crate) mod session;
pub mod shard;
pub mod shutdown;
pub mod storage;
pub mod supervise;
pub(crate) mod time;
pub mod visitor;
pub mod web;

pub use config::Settings;
pub use server::Server;
