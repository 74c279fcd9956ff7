//! The operator surface: the admin listener, `/metrics` placement, the
//! read-only stats, top and history APIs, the dashboard page.

use crate::helpers::{counts, eventually, http_get, spawn_app};

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

/// With `admin.token` set, every admin data route (on both listeners)
/// answers 401 without `Authorization: Bearer TOKEN` or with a wrong one,
/// and serves with it; the dashboard page itself (no data) and `/healthz`
/// stay open. A token too short to be a secret is refused at start.
#[tokio::test(flavor = "multi_thread")]
async fn admin_token_guards_the_data_routes() {
    use crate::helpers::http_raw;
    const TOKEN: &str = "s3cret-token-0123456789";
    let (app, _dir) = spawn_app(&[
        ("ADMIN__TOKEN", TOKEN),
        ("ADMIN__METRICS_ON_PUBLIC", "true"),
    ]);
    let admin = app.admin.expect("admin listener");
    let get = |addr: std::net::SocketAddr, path: &'static str, auth: Option<&str>| {
        let auth = auth.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
        async move {
            http_raw(
                addr,
                &format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"),
            )
            .await
        }
    };
    let bearer = format!("Bearer {TOKEN}");
    for base in [app.addr, admin] {
        for path in [
            "/metrics",
            "/api/v1/stats",
            "/api/v1/top",
            "/api/v1/history",
            "/api/v1/site/history",
        ] {
            let (status, body) = get(base, path, None).await;
            assert_eq!(status, 401, "{path} without a token: {body}");
            assert!(body.contains("unauthorized"), "{body}");
            let (status, _) = get(base, path, Some("Bearer s3cret-token-0123456780")).await;
            assert_eq!(status, 401, "{path} with a wrong token");
            let (status, _) = get(base, path, Some(TOKEN)).await;
            assert_eq!(status, 401, "{path} without the Bearer scheme");
            let (status, body) = get(base, path, Some(&bearer)).await;
            assert_eq!(status, 200, "{path} with the token: {body}");
        }
    }
    assert_eq!(get(admin, "/dashboard", None).await.0, 200);
    assert_eq!(get(admin, "/healthz", None).await.0, 200);
    app.shutdown().await;

    let dir = tempfile::tempdir().expect("tempdir");
    let short = link_counter::Settings::load_from(
        None,
        vec![
            (
                "LINK_COUNTER__STORAGE__PATH".to_string(),
                dir.path().display().to_string(),
            ),
            (
                "LINK_COUNTER__ADMIN__TOKEN".to_string(),
                "short".to_string(),
            ),
        ],
    );
    let err = short.expect_err("a 5-character token is refused");
    assert!(err.to_string().contains("admin.token"), "{err}");
}

/// `/api/v1/history` (on both listeners) is the server's record of the
/// connection total: one sample every 5 s (the first at start), oldest
/// first, at most 180 (15 minutes), with the server's clock; a new sample
/// follows the connections.
#[tokio::test(flavor = "multi_thread")]
async fn history_records_the_last_15_minutes() {
    let before_ms = now_ms();
    let (app, _dir) = spawn_app(&[]);
    let admin = app.admin.expect("admin listener");
    let (status, body) = http_get(admin, "/api/v1/history").await;
    assert_eq!(status, 200, "{body}");
    let h: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(h["interval_seconds"], 5, "{h}");
    assert_eq!(h["window_seconds"], 900, "{h}");
    assert_eq!(h["max_samples"], 180, "{h}");
    let server_now = h["now_ms"].as_u64().expect("now_ms");
    let after_ms = now_ms();
    assert!(
        before_ms <= server_now && server_now <= after_ms,
        "the server's clock, read during the request: {h}"
    );
    let samples = h["samples"].as_array().expect("samples");
    assert!(
        !samples.is_empty() && samples.len() <= 180,
        "a sample is taken at start: {h}"
    );
    let first = &samples[0];
    assert_eq!(first["connections"], 0, "{h}");
    let t = first["time_ms"].as_u64().expect("time_ms");
    assert!(t >= before_ms && t <= server_now, "{h}");
    assert_eq!(
        first.as_object().expect("object").len(),
        2,
        "time_ms and connections only: {h}"
    );

    let _clients = [app.connect("h1").await, app.connect("h2").await];
    let h = eventually("a sample of the 2 connections", || async {
        let h = app.get_json("/api/v1/history").await;
        let samples = h["samples"].as_array().expect("samples").clone();
        assert!(samples.len() <= 180, "{h}");
        let times: Vec<u64> = samples
            .iter()
            .map(|s| s["time_ms"].as_u64().expect("time_ms"))
            .collect();
        assert!(times.windows(2).all(|w| w[0] < w[1]), "oldest first: {h}");
        samples.iter().any(|s| s["connections"] == 2).then_some(h)
    })
    .await;
    // Samples are ~5 s apart, never closer than the interval allows.
    let times: Vec<u64> = h["samples"]
        .as_array()
        .expect("samples")
        .iter()
        .map(|s| s["time_ms"].as_u64().expect("time_ms"))
        .collect();
    assert!(times.windows(2).all(|w| w[1] - w[0] >= 4_000), "{h}");
    app.shutdown().await;
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
