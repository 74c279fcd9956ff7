//! The operator surface: the admin listener, `/metrics` placement, the
//! read-only stats and top APIs, the dashboard page.

use crate::helpers::{counts, http_get, spawn_app};

/// By default `/metrics` and `/dashboard` are only on the admin listener;
/// `/api/v1/stats` and `/api/v1/top` are on both.
#[tokio::test(flavor = "multi_thread")]
async fn admin_listener_serves_metrics_and_dashboard() {
    let (app, _dir) = spawn_app(&[]);
    let admin = app.admin.expect("admin listener");
    let (status, text) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    assert!(text.contains("# TYPE"), "{text}");
    let (status, html) = http_get(admin, "/dashboard").await;
    assert_eq!(status, 200);
    assert!(
        html.contains("/api/v1/stats") && !html.contains("https://"),
        "no CDN"
    );
    assert_eq!(app.get("/metrics").await.0, 404);
    assert_eq!(app.get("/dashboard").await.0, 404);
    for base in [app.addr, admin] {
        let (status, body) = http_get(base, "/api/v1/stats").await;
        assert_eq!(status, 200, "{body}");
        let (status, body) = http_get(base, "/api/v1/top").await;
        assert_eq!(status, 200, "{body}");
    }
    app.shutdown().await;
}

/// `admin.metrics_on_public = true` also serves `/metrics` on the public
/// listener; an empty `admin.bind` starts no admin listener.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_on_public_and_no_admin() {
    let (app, _dir) = spawn_app(&[("ADMIN__METRICS_ON_PUBLIC", "true"), ("ADMIN__BIND", "")]);
    assert!(app.admin.is_none());
    let (status, text) = app.get("/metrics").await;
    assert_eq!(status, 200);
    assert!(text.contains("link_counter_"), "{text}");
    app.shutdown().await;
}

/// `/api/v1/top` orders pages by live viewers with peak and total, honours
/// `limit` (capped at 100, rejects junk); `/api/v1/stats` totals match.
#[tokio::test(flavor = "multi_thread")]
async fn top_and_stats_follow_the_connections() {
    let (app, _dir) = spawn_app(&[]);
    let mut clients = Vec::new();
    for (page, n) in [("p1", 3), ("p2", 1), ("p3", 2)] {
        for _ in 0..n {
            clients.push(app.connect(page).await);
        }
    }
    let mut watcher = app.connect("w").await;
    watcher.subscribe(&["p1", "p2", "p3"]).await;
    watcher
        .wait_for(&counts(&[("p1", 3), ("p2", 1), ("p3", 2)]))
        .await;
    let top = app.get_json("/api/v1/top?limit=2").await;
    let ids: Vec<&str> = top
        .as_array()
        .expect("array")
        .iter()
        .map(|p| p["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, ["p1", "p3"], "{top}");
    assert_eq!(top[0]["connections"], 3);
    assert_eq!(top[0]["peak_connections"], 3);
    assert_eq!(top[0]["total_connections"], 3);
    let all = app.get_json("/api/v1/top?limit=1000").await;
    assert_eq!(all.as_array().expect("array").len(), 4, "{all}");
    assert_eq!(app.get("/api/v1/top?limit=x").await.0, 400);
    let stats = app.get_json("/api/v1/stats").await;
    assert_eq!(stats["connections"], 7, "{stats}");
    assert_eq!(stats["connections_opened_total"], 7, "{stats}");
    assert_eq!(stats["rooms"], 4, "{stats}");
    assert!(stats["uptime_seconds"].as_f64().expect("uptime") >= 0.0);
    drop(clients);
    app.shutdown().await;
}
