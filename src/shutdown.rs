//! Process signals: SIGINT (Ctrl-C) and SIGTERM. Wired in `main`, which
//! installs the handlers before it announces the listening address (so a
//! signal sent right after that line is never lost to the default action)
//! and then calls [`crate::server::Server::shutdown`].

use tokio::signal::unix::{signal, Signal, SignalKind};

/// Installed handlers for SIGINT and SIGTERM.
pub struct Signals {
    /// SIGINT (Ctrl-C).
    interrupt: Signal,
    /// SIGTERM (service managers).
    terminate: Signal,
}

impl Signals {
    /// Installs both handlers now; must run inside a tokio runtime.
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// Waits for the first SIGINT or SIGTERM.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => tracing::info!("SIGINT received"),
            _ = self.terminate.recv() => tracing::info!("SIGTERM received"),
        }
    }
}
