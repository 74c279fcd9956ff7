//! The test kit: what the integration tests and the benches share to run
//! the real thing. Included by each test target and by the bench with
//! `#[path = "…/kit/mod.rs"] mod kit;` (a crate of its own would link a
//! second copy of link-counter's types), so each target uses a subset.
//!
//! - [`settings`]: the service's settings as `LINK_COUNTER__…` pairs (test
//!   and bench profiles), for an in-process server or a child process;
//! - [`child`]: the built binary (or any command printing `listening on`)
//!   as a child process: addresses, output, signals, stop;
//! - [`redis`]: `redis-server` on a free port (kill, restart on the same
//!   port), a Redis Cluster of several, and `INFO` parsing;
//! - [`prom`]: the Prometheus text exposition (a metric by name and labels);
//! - [`wait`]: polling for state with a generous patience.

pub mod child;
pub mod prom;
pub mod redis;
pub mod settings;
pub mod wait;
