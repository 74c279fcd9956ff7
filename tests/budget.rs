//! The delivery budget's adaptation through the real server: a separate test
//! binary (its own process), so the process-wide metrics recorder's
//! `link_counter_delivery_budget` gauge is moved by this one server only.

#[allow(dead_code)]
#[path = "api/helpers.rs"]
mod helpers;
#[path = "kit/mod.rs"]
#[allow(dead_code)] // each target uses a part of the kit
mod kit;

use helpers::{counts, spawn_app};
use kit::prom::{parse, value};

/// With `counter.max_worker_lag` at 1 ns every handled `Deliver` batch counts
/// as a worker behind, so each publish after one halves the budget: the
/// shards' handling reaches the counter's budget (the gauge falls from
/// `counter.delivery_budget`, never below a hundredth of it), and a subscriber
/// still gets every count exactly.
#[tokio::test(flavor = "multi_thread")]
async fn worker_lag_halves_the_budget_and_counts_stay_exact() {
    let (app, _dir) = spawn_app(&[
        ("COUNTER__BROADCAST_INTERVAL", "10ms"),
        ("COUNTER__DELIVERY_BUDGET", "100000"),
        ("COUNTER__MAX_WORKER_LAG", "1ns"),
    ]);
    let admin = app.admin.expect("the test settings bind an admin listener");
    let gauge = || async {
        let (_, text) = helpers::http_get(admin, "/metrics").await;
        value(&parse(&text), "link_counter_delivery_budget", &[])
    };
    assert_eq!(
        gauge().await,
        100_000.0,
        "the full budget before any publish"
    );

    let mut observer = app.connect("watch").await;
    observer.subscribe(&["hot"]).await;
    observer.wait_for(&counts(&[("hot", 0)])).await;
    // Each step changes the count and waits for the observer to see it, so
    // every publish finds the previous one's batch handled.
    let mut open = Vec::new();
    for n in 1..=6u64 {
        open.push(app.connect("hot").await);
        observer.wait_for(&counts(&[("hot", n)])).await;
    }
    for n in (0..6u64).rev() {
        open.pop().expect("a connection").close().await;
        observer.wait_for(&counts(&[("hot", n)])).await;
    }
    let budget = gauge().await;
    assert!(
        (1_000.0..=50_000.0).contains(&budget),
        "halved at least twice, never below 1/100 of counter.delivery_budget: {budget}"
    );
}
