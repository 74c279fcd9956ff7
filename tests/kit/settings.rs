//! The service's settings as `LINK_COUNTER__SECTION__KEY` pairs: the one way
//! tests and benches configure it, in-process ([`Env::settings`]) or as a
//! child process ([`Env::apply`]), so both paths read the same overrides.

use std::{path::Path, process::Command};

use link_counter::Settings;

/// The per-IP abuse caps off: every test and bench client comes from
/// loopback addresses, opening connections at rates the caps exist to
/// refuse in production.
pub const PER_IP_CAPS_OFF: &[(&str, &str)] = &[
    ("LIMITS__MAX_CONNECTIONS_PER_IP", "0"),
    ("LIMITS__CONNECTIONS_PER_IP_PER_SECOND", "0"),
    ("LIMITS__MESSAGES_PER_SECOND", "0"),
];

/// Every cap off, the global connection cap included (benches).
pub const NO_CAPS: &[(&str, &str)] = &[
    ("LIMITS__MAX_CONNECTIONS", "0"),
    ("LIMITS__MAX_CONNECTIONS_PER_IP", "0"),
    ("LIMITS__CONNECTIONS_PER_IP_PER_SECOND", "0"),
    ("LIMITS__MESSAGES_PER_SECOND", "0"),
];

/// Settings as environment pairs (full variable names), later ones
/// replacing earlier ones of the same key.
#[derive(Clone, Debug, Default)]
pub struct Env {
    pairs: Vec<(String, String)>,
}

impl Env {
    /// Both listeners on 127.0.0.1:0, storage in `dir`, defaults otherwise.
    pub fn base(dir: &Path) -> Env {
        Env::default()
            .set("SERVER__BIND", "127.0.0.1:0")
            .set("ADMIN__BIND", "127.0.0.1:0")
            .set("STORAGE__PATH", dir.display())
    }

    /// The tests' profile: [`Env::base`] with 2 workers, short timers (a
    /// 100 ms heartbeat and snapshot, a 600 ms client timeout, a 3 s
    /// shutdown) and the per-IP caps off.
    pub fn test(dir: &Path) -> Env {
        Env::base(dir)
            .set("SERVER__WORKERS", "2")
            .set("SERVER__SHUTDOWN_TIMEOUT", "3s")
            .set("STORAGE__SNAPSHOT_INTERVAL", "100ms")
            .set("WEBSOCKET__HEARTBEAT_INTERVAL", "100ms")
            .set("WEBSOCKET__CLIENT_TIMEOUT", "600ms")
            .with(PER_IP_CAPS_OFF)
    }

    /// The benches' profile: [`Env::base`] with every cap off ([`NO_CAPS`])
    /// and then any `LINK_COUNTER__…` variable of this process's own
    /// environment (how a bench run changes a setting of every service).
    pub fn bench(dir: &Path) -> Env {
        let mut env = Env::base(dir).with(NO_CAPS);
        for (k, v) in std::env::vars() {
            if let Some(key) = k.strip_prefix("LINK_COUNTER__") {
                env = env.set(key, v);
            }
        }
        env
    }

    /// Sets `key` (`SECTION__KEY`, without the `LINK_COUNTER__` prefix).
    pub fn set(mut self, key: &str, value: impl ToString) -> Env {
        let name = format!("LINK_COUNTER__{key}");
        self.pairs.retain(|(k, _)| *k != name);
        self.pairs.push((name, value.to_string()));
        self
    }

    /// Sets every `(SECTION__KEY, value)` of `extra`.
    pub fn with<K: AsRef<str>, V: ToString>(self, extra: &[(K, V)]) -> Env {
        extra
            .iter()
            .fold(self, |env, (k, v)| env.set(k.as_ref(), v.to_string()))
    }

    /// The pairs, full variable names.
    pub fn pairs(&self) -> &[(String, String)] {
        &self.pairs
    }

    /// The settings these pairs give over the defaults (panics if invalid).
    pub fn settings(&self) -> Settings {
        Settings::load_from(None, self.pairs.clone())
            .unwrap_or_else(|e| panic!("settings {:?} are invalid: {e}", self.pairs))
    }

    /// Sets the pairs in `cmd`'s environment (a child binary's settings).
    pub fn apply(&self, cmd: &mut Command) {
        cmd.envs(self.pairs.iter().map(|(k, v)| (k, v)));
    }
}

/// The tests' settings ([`Env::test`]) plus `extra` (`SECTION__KEY`, value)
/// overrides given as environment pairs (this also exercises that path).
pub fn test_settings(dir: &Path, extra: &[(&str, &str)]) -> Settings {
    Env::test(dir).with(extra).settings()
}

/// The benches' settings ([`Env::bench`]) plus `extra` overrides.
pub fn bench_settings(dir: &Path, extra: &[(&str, &str)]) -> Settings {
    Env::bench(dir).with(extra).settings()
}
