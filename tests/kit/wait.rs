//! Waiting for state: poll until it holds, with a generous patience.

use std::time::{Duration, Instant};

/// Generous limit for anything that should happen "soon".
pub const PATIENCE: Duration = Duration::from_secs(10);

/// What one poll found: `true` or `Some(value)` when the wait is over.
pub trait Ready {
    /// What the wait returns.
    type Value;
    fn ready(self) -> Option<Self::Value>;
}

impl Ready for bool {
    type Value = ();
    fn ready(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Ready for Option<T> {
    type Value = T;
    fn ready(self) -> Option<T> {
        self
    }
}

/// The blocking wait, for state outside a runtime (a child process to exit,
/// a port to open): polls `f` every 20 ms until it is `true` (or `Some`,
/// whose value it returns); panics after [`PATIENCE`].
pub fn eventually_blocking<T: Ready>(what: &str, f: impl FnMut() -> T) -> T::Value {
    eventually_blocking_within(PATIENCE, what, f)
}

/// [`eventually_blocking`] with another patience.
pub fn eventually_blocking_within<T: Ready>(
    patience: Duration,
    what: &str,
    mut f: impl FnMut() -> T,
) -> T::Value {
    let deadline = Instant::now() + patience;
    loop {
        if let Some(value) = f().ready() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {patience:?} waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts a server on ports picked free: `start` picks them, starts it and
/// gives `None` if it exited because one was taken in between (on a busy
/// machine a client can take a released port as its source port). Tries
/// new ports up to 5 times.
pub fn on_free_ports<T>(what: &str, mut start: impl FnMut() -> Option<T>) -> T {
    const ATTEMPTS: usize = 5;
    for _ in 0..ATTEMPTS {
        if let Some(started) = start() {
            return started;
        }
    }
    panic!("{what} did not start in {ATTEMPTS} attempts on free ports");
}
