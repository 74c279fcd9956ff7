//! The stored history over real HTTP: per-minute and per-hour peaks of a
//! page and of the site, the errors of the history routes, a restart, and
//! the record cap with many pages. The exact minute-by-minute peaks of a
//! scripted sequence on a test clock are the `counter::peaks` unit tests.

use serde_json::Value;

use crate::helpers::{eventually, spawn_app, spawn_app_with};

/// The largest `field` over a history body's points.
fn max_of(body: &Value, field: &str) -> u64 {
    body["points"]
        .as_array()
        .expect("points")
        .iter()
        .map(|p| p[field].as_u64().expect("figure"))
        .max()
        .unwrap_or(0)
}

/// Viewers of one page (two of them the same visitor) give the page's and
/// the site's peaks of both figures, at both resolutions, with RFC 3339
/// times; closing connections never lowers a peak.
#[tokio::test]
async fn peaks_of_a_page_and_the_site() {
    let (app, _dir) = spawn_app(&[]);
    let a = app.connect_as("h", "visitor-one").await;
    let b = app.connect_as("h", "visitor-one").await;
    let c = app.connect_as("h", "visitor-two").await;
    crate::lifecycle_wait(&app, "h", 3).await;
    eventually("the site's peak reaches 3 connections", || async {
        let site = app.get_json("/api/v1/site/history").await;
        max_of(&site, "connections") == 3
    })
    .await;
    drop((a, b));
    crate::lifecycle_wait(&app, "h", 1).await;
    let page = app.get_json("/api/v1/pages/h/history").await;
    assert_eq!(page["id"], "h", "{page}");
    assert_eq!(page["range"], "48h");
    assert_eq!(page["step_seconds"], 60);
    assert_eq!(max_of(&page, "connections"), 3, "{page}");
    assert_eq!(max_of(&page, "visitors"), 2, "{page}");
    let first = &page["points"][0]["time"];
    let t = first.as_str().expect("time");
    assert!(
        humantime::parse_rfc3339(t).is_ok() && t.ends_with(":00.000Z"),
        "{t}"
    );
    let hours = app.get_json("/api/v1/pages/h/history?range=90d").await;
    assert_eq!(hours["step_seconds"], 3600);
    assert_eq!(max_of(&hours, "connections"), 3, "{hours}");
    assert_eq!(max_of(&hours, "visitors"), 2, "{hours}");
    let site = app.get_json("/api/v1/site/history?range=48h").await;
    assert_eq!(site["id"], Value::Null, "{site}");
    assert_eq!(max_of(&site, "connections"), 3, "{site}");
    assert_eq!(max_of(&site, "visitors"), 2, "{site}");
    drop(c);
    app.shutdown().await;
}

/// Unknown pages, bad ranges and bad ids get the API's error shape.
#[tokio::test]
async fn history_errors() {
    let (app, _dir) = spawn_app(&[]);
    for (path, status, code) in [
        ("/api/v1/pages/never-seen/history", 404, "unknown_page"),
        ("/api/v1/site/history?range=7d", 400, "invalid_parameter"),
        ("/api/v1/site/history?range=", 400, "invalid_parameter"),
        ("/api/v1/pages/%00/history", 400, "invalid_page_id"),
    ] {
        let (got, body) = app.get(path).await;
        assert_eq!(got, status, "{path}: {body}");
        let body: Value = serde_json::from_str(&body).expect("JSON error");
        assert_eq!(body["type"], "error", "{path}: {body}");
        assert_eq!(body["code"], code, "{path}: {body}");
    }
    let _v = app.connect("seen").await;
    crate::lifecycle_wait(&app, "seen", 1).await;
    let (got, body) = app.get("/api/v1/pages/seen/history?range=bad").await;
    assert_eq!(got, 400, "{body}");
    // The page API itself is unchanged.
    assert_eq!(app.get_json("/api/v1/pages/seen").await["connections"], 1);
    app.shutdown().await;
}

/// The history is on disk: a restarted server on the same directory
/// answers with the peaks of the process before it.
#[tokio::test]
async fn history_survives_a_restart() {
    let dir = tempfile::tempdir().expect("dir");
    let settings = || crate::helpers::settings(dir.path(), &[]);
    let app = spawn_app_with(settings());
    let clients = [
        app.connect_as("kept", "visitor-one").await,
        app.connect_as("kept", "visitor-two").await,
    ];
    crate::lifecycle_wait(&app, "kept", 2).await;
    eventually("the site's peak reaches 2", || async {
        max_of(&app.get_json("/api/v1/site/history").await, "visitors") == 2
    })
    .await;
    drop(clients);
    app.shutdown().await;
    let app = spawn_app_with(settings());
    for range in ["48h", "90d"] {
        let page = app
            .get_json(&format!("/api/v1/pages/kept/history?range={range}"))
            .await;
        assert_eq!(max_of(&page, "connections"), 2, "{page}");
        assert_eq!(max_of(&page, "visitors"), 2, "{page}");
        let site = app
            .get_json(&format!("/api/v1/site/history?range={range}"))
            .await;
        assert_eq!(max_of(&site, "visitors"), 2, "{site}");
    }
    app.shutdown().await;
}

/// With many pages past `storage.max_records`, a page's history goes with
/// its stats record: the history holds at most two records (its minute and
/// its hour) per kept page, plus the site's.
#[tokio::test]
async fn history_stays_within_the_record_cap() {
    let (app, _dir) = spawn_app(&[("STORAGE__MAX_RECORDS", "5"), ("ROOM__IDLE_TIMEOUT", "1h")]);
    for i in 0..40 {
        let p = format!("many{i}");
        let c = app.connect(&p).await;
        crate::lifecycle_wait(&app, &p, 1).await;
        c.close().await;
        crate::lifecycle_wait(&app, &p, 0).await;
    }
    // Ending the minutes in progress writes them: a shutdown does.
    let storage = app.storage.clone();
    app.shutdown().await;
    // Each page's minute is in one minute record and one hour record (two
    // of each when the run crossed an hour or a minute boundary).
    let records = storage.history_records();
    assert!(storage.stats_records() <= 5);
    assert!(records <= (5 + 1) * 4, "{records} history records");
    assert!(records >= 2, "{records} history records");
}
