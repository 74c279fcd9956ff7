//! Logs: `tracing` to stderr, human-readable (`log.format = "text"`) or one
//! JSON object per line (`"json"`), filtered by `RUST_LOG` when it is set and
//! by `log.filter` otherwise; and the startup settings summary.
//!
//! JSON lines carry `timestamp` (RFC 3339, UTC), `level` (`ERROR`..`TRACE`),
//! `target` (the module, e.g. `link_counter::session`), `message`, and the
//! event's own fields at top level (e.g. `page`, `conn`, `reason`, `ip`).
//!
//! What is logged at which level: every connection's open and close at
//! `debug` (`connected`, `disconnected` with its `reason`), every refusal at
//! `info`, the settings summary at `info` on start.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings, Settings};

/// The filter in effect: `RUST_LOG` when set (and valid), else `log.filter`.
pub(crate) fn filter(settings: &LogSettings) -> EnvFilter {
    match std::env::var("RUST_LOG") {
        Ok(env) if !env.trim().is_empty() => EnvFilter::try_new(&env).unwrap_or_else(|e| {
            eprintln!("link-counter: RUST_LOG ignored ({e}); using log.filter");
            EnvFilter::new(&settings.filter)
        }),
        // `log.filter` was checked by `Settings::validate`.
        _ => EnvFilter::new(&settings.filter),
    }
}

/// Installs the global subscriber (once per process; later calls are ignored).
pub fn init(settings: &LogSettings) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(settings))
        .with_writer(std::io::stderr);
    let _ = match settings.format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
}

/// Hides the password of a URL (`redis://user:secret@host` → `redis://user:***@host`);
/// use it for every setting that may carry a credential.
pub(crate) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or("", |(u, _)| u);
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{path}")
            } else {
                format!("{scheme}://***@{host}{path}")
            }
        }
        None => url.to_owned(),
    }
}

/// One `info` line with the settings an operator checks first. Secrets are
/// never in it: `admin.token` only as set or not, URLs through [`redact_url`].
pub fn log_settings(s: &Settings) {
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        bind = %s.server.bind,
        admin_bind = if s.admin.bind.is_empty() { "(none)" } else { s.admin.bind.as_str() },
        metrics_on_public = s.admin.metrics_on_public,
        admin_token = if s.admin.token.get().is_some() { "set" } else { "(none)" },
        workers = s.worker_count(),
        storage = %s.storage.path.display(),
        snapshot_interval = %humantime::format_duration(s.storage.snapshot_interval),
        broadcast_interval = %humantime::format_duration(s.counter.broadcast_interval),
        max_connections = s.limits.max_connections,
        max_connections_per_ip = s.limits.max_connections_per_ip,
        max_rooms = s.limits.max_rooms,
        max_pages = s.limits.max_pages,
        allowed_origins = s.security.allowed_origins.len(),
        trusted_proxies = s.security.trusted_proxies.len(),
        demo = s.web.demo,
        log_format = s.log.format.as_str(),
        "settings"
    );
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("redis://user:secret@h:6379/0"),
            "redis://user:***@h:6379/0"
        );
        assert_eq!(redact_url("redis://:secret@h"), "redis://:***@h");
        assert_eq!(redact_url("redis://token@h"), "redis://***@h");
        assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
        assert_eq!(redact_url("not a url"), "not a url");
    }
}
