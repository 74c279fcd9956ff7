//! Integration tests: one binary (keeps link time down), one module per area.

mod binary;
mod caps;
mod cluster;
mod events;
mod hardening;
mod helpers;
mod history;
#[path = "../kit/mod.rs"]
#[allow(dead_code)] // each target uses a part of the kit
mod kit;
mod lifecycle;
mod model;
mod nginx;
mod ops;
mod persistence;
mod protocol;
mod publish;
mod supervision;
mod visitors;
mod websocket;

/// Waits until the API shows `n` live connections on `page`.
pub async fn lifecycle_wait(app: &helpers::TestApp, page: &str, n: u64) {
    helpers::eventually(&format!("{page} at {n} connections"), || async {
        app.get_json(&format!("/api/v1/counts?ids={page}")).await[page] == n
    })
    .await;
}
