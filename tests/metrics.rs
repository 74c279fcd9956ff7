//! `/metrics` against a scripted session: a separate test binary (its own
//! process), so the process-wide metrics recorder starts at zero and only
//! this script moves it. Scraped values must equal what the script did.

#[allow(dead_code)]
#[path = "api/helpers.rs"]
mod helpers;
#[path = "kit/mod.rs"]
#[allow(dead_code)] // each target uses a part of the kit
mod kit;

use std::time::Duration;

use helpers::{counts, events_path, http_get, spawn_app, EventClient, SilentClient, PATIENCE};
use kit::prom::{parse, value, Sample};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};

/// A WebSocket upgrade the server refuses; returns the HTTP status.
async fn refused_status(url: &str, origin: Option<&str>) -> u16 {
    refused_status_with(url, &[("Origin", origin)]).await
}

/// A WebSocket upgrade with these headers (`None`: left out) the server
/// refuses; returns the HTTP status.
async fn refused_status_with(url: &str, headers: &[(&'static str, Option<&str>)]) -> u16 {
    let mut req = url.into_client_request().expect("request");
    for (name, value) in headers {
        if let Some(v) = value {
            req.headers_mut()
                .insert(*name, v.parse().expect("header value"));
        }
    }
    match tokio_tungstenite::connect_async(req).await {
        Err(tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, the upgrade succeeded"),
    }
}

/// After a scripted set of connects, subscribes, refusals (origin, bad page
/// id, crawler, room cap) and closes (clean, abrupt, timeout, room cap), every scraped
/// connection, message, error, refusal and room value equals what the script did.
#[tokio::test(flavor = "multi_thread")]
async fn scraped_values_equal_the_script() {
    let (app, _dir) = spawn_app(&[
        ("LIMITS__MAX_ROOMS", "2"),
        ("SECURITY__ALLOWED_ORIGINS", "https://ok.example"),
    ]);
    let admin = app.admin.expect("the test settings bind an admin listener");

    // Three viewers on two pages, each subscribing once.
    let mut a1 = app.connect("a").await;
    let mut a2 = app.connect("a").await;
    a1.subscribe(&["b"]).await;
    a2.subscribe(&["b"]).await;
    a1.wait_for(&counts(&[("b", 0)])).await;
    a2.wait_for(&counts(&[("b", 0)])).await;
    let mut b1 = app.connect("b").await;
    b1.subscribe(&["a"]).await;
    b1.wait_for(&counts(&[("a", 2)])).await;
    a1.wait_for(&counts(&[("b", 1)])).await;
    a2.wait_for(&counts(&[("b", 1)])).await;

    // Refusals: an origin not allowed, a bad page id, the room cap.
    assert_eq!(
        refused_status(&app.ws_url("a"), Some("https://evil.example")).await,
        403
    );
    assert_eq!(refused_status(&app.ws_url("%ZZ"), None).await, 400);
    assert_eq!(
        refused_status_with(
            &app.ws_url("a"),
            &[("User-Agent", Some("Mozilla/5.0 (compatible; bingbot/2.0)"))]
        )
        .await,
        403
    );
    let mut c = app.connect("c").await;
    let error: serde_json::Value = serde_json::from_str(&c.next_text().await).expect("JSON");
    assert_eq!(error["code"], "overloaded");
    assert_eq!(c.expect_close().await, 1013);

    // Closes: clean, abrupt, timeout (a client that never answers pings).
    a2.close().await;
    a1.drop_abruptly();
    let silent = SilentClient::connect(&app.ws_url("b")).await;
    // One viewer over the event stream.
    let origin = [("Origin", "https://ok.example")];
    let stream = EventClient::open(app.addr, &events_path("a", ""), &origin)
        .await
        .expect("an event stream");

    type Expectation<'a> = (&'a str, Vec<(&'a str, &'a str)>, f64);
    let expected: Vec<Expectation> = vec![
        ("link_counter_connections_opened_total", vec![], 6.0),
        (
            "link_counter_connections_opened_total",
            vec![("transport", "sse")],
            1.0,
        ),
        ("link_counter_connections_open", vec![], 2.0),
        (
            "link_counter_connections_open",
            vec![("transport", "websocket")],
            1.0,
        ),
        (
            "link_counter_connections_open",
            vec![("transport", "sse")],
            1.0,
        ),
        (
            "link_counter_connections_closed_total",
            vec![("transport", "sse")],
            0.0,
        ),
        (
            "link_counter_connections_closed_total",
            vec![("reason", "client_close")],
            1.0,
        ),
        (
            "link_counter_connections_closed_total",
            vec![("reason", "abrupt")],
            1.0,
        ),
        (
            "link_counter_connections_closed_total",
            vec![("reason", "timeout")],
            1.0,
        ),
        (
            "link_counter_connections_closed_total",
            vec![("reason", "max_rooms")],
            1.0,
        ),
        ("link_counter_connections_closed_total", vec![], 4.0),
        (
            "link_counter_connections_refused_total",
            vec![("reason", "origin")],
            1.0,
        ),
        (
            "link_counter_connections_refused_total",
            vec![("reason", "bad_page_id")],
            1.0,
        ),
        (
            "link_counter_connections_refused_total",
            vec![("reason", "max_rooms")],
            1.0,
        ),
        (
            "link_counter_connections_refused_total",
            vec![("reason", "bot_user_agent")],
            1.0,
        ),
        ("link_counter_connections_refused_total", vec![], 4.0),
        ("link_counter_messages_in_total", vec![], 3.0),
        (
            "link_counter_errors_total",
            vec![("code", "overloaded")],
            1.0,
        ),
        ("link_counter_errors_total", vec![], 1.0),
        ("link_counter_rooms", vec![], 2.0),
        ("link_counter_pages", vec![], 2.0),
        // Room a follows b, room b follows a.
        ("link_counter_subscriptions", vec![], 1.0),
        ("link_counter_follower_rooms", vec![], 1.0),
    ];
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let (text, samples) = loop {
        let (status, text) = http_get(admin, "/metrics").await;
        assert_eq!(status, 200, "{text}");
        let samples = parse(&text);
        let wrong: Vec<String> = expected
            .iter()
            .filter_map(|(name, labels, want)| {
                let got = value(&samples, name, labels);
                (got != *want).then(|| format!("{name}{labels:?} = {got}, expected {want}"))
            })
            .collect();
        if wrong.is_empty() {
            break (text, samples);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metrics never matched the script:\n{}\n\n{text}",
            wrong.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    drop(silent);
    drop(stream);

    // Updates that followed a count change were timed (b joining: a1 and a2).
    assert!(
        value(&samples, "link_counter_publish_lag_seconds_count", &[]) >= 2.0,
        "{text}"
    );
    assert!(
        value(&samples, "link_counter_updates_sent_total", &[]) >= 5.0,
        "{text}"
    );
    assert!(
        value(&samples, "link_counter_count_changes_total", &[]) >= 3.0,
        "{text}"
    );
    for name in [
        "link_counter_publish_lag_seconds_bucket",
        "link_counter_messages_out_total",
        "link_counter_count_publishes_total",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    assert!(text.contains("# TYPE link_counter_connections_opened_total counter"));
    // Reasons that never happened are exposed at 0 (series exist from the start).
    assert!(
        text.contains(
            "link_counter_connections_closed_total{reason=\"binary\",transport=\"sse\"} 0"
        ),
        "{text}"
    );

    // Metrics are not on the public listener by default; the stats API is.
    let (status, _) = app.get("/metrics").await;
    assert_eq!(status, 404);
    // The event stream's end reaches the session count, and the rooms'
    // reports (the silent client's leave, the stream's open) the counter, in
    // no fixed time after the scrape above.
    let (stats, top) = helpers::eventually("the stats API after the closes", || async {
        let stats = app.get_json("/api/v1/stats").await;
        let top = app.get_json("/api/v1/top?limit=5").await;
        let settled = stats["connections"] == 1
            && stats["connections_opened_total"] == 5
            && top[0]["connections"] == 1;
        settled.then_some((stats, top))
    })
    .await;
    assert_eq!(stats["connections"], 1, "{stats}");
    // The stats API counts viewers that joined a page (not the one refused
    // at the room cap), over both transports.
    assert_eq!(stats["connections_opened_total"], 5, "{stats}");
    assert_eq!(stats["rooms"], 2, "{stats}");
    assert_eq!(top[0]["id"], "b", "{top}");
    assert_eq!(top[0]["connections"], 1, "{top}");
    assert_eq!(top[0]["total_connections"], 2, "{top}");

    // Distinct visitors over the node: one visitor on a and b with three
    // tabs, plus b1 (no id): 4 sessions, 2 visitors. No series names a page
    // or a visitor.
    let visitor = format!("{}?visitor=metrics-visitor-1", app.ws_url("a"));
    let v1 = helpers::Client::connect(&visitor).await;
    let v2 = helpers::Client::connect(&visitor).await;
    let v3 = helpers::Client::connect(&visitor.replace("/page/a?", "/page/b?")).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (_, text) = http_get(admin, "/metrics").await;
        let samples = parse(&text);
        let open = value(&samples, "link_counter_connections_open", &[]);
        let visitors: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.name == "link_counter_visitors")
            .collect();
        assert!(visitors.iter().all(|s| s.labels.is_empty()), "{visitors:?}");
        if open == 4.0 && value(&samples, "link_counter_visitors", &[]) == 2.0 {
            assert!(!text.contains("metrics-visitor-1"), "{text}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "expected 4 sessions and 2 visitors:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop((b1, v1, v2, v3));
    app.shutdown().await;
}
