//! Process signals: resolves on the first SIGINT or SIGTERM. Wired in
//! `main`, which then calls [`crate::server::Server::shutdown`].

use std::future::Future;

/// Waits for SIGINT (Ctrl-C) or SIGTERM. The handlers are installed when this
/// is called (not when the future is first polled), so a signal that arrives
/// between the call and the first poll is not lost; call it inside the runtime.
pub fn signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let int = signal(SignalKind::interrupt());
    let term = signal(SignalKind::terminate());
    async move {
        match (int, term) {
            (Ok(mut int), Ok(mut term)) => tokio::select! {
                _ = int.recv() => tracing::info!("SIGINT received"),
                _ = term.recv() => tracing::info!("SIGTERM received"),
            },
            (Ok(mut int), Err(e)) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM; only SIGINT will stop the server");
                int.recv().await;
            }
            (Err(e), Ok(mut term)) => {
                tracing::error!(error = %e, "cannot listen for SIGINT; only SIGTERM will stop the server");
                term.recv().await;
            }
            (Err(e), Err(_)) => {
                tracing::error!(error = %e, "cannot listen for signals; stop the server with SIGKILL");
                std::future::pending::<()>().await;
            }
        }
    }
}
