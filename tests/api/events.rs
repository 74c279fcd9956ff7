//! The event stream (`GET /parties/page/{id}/events`, Server-Sent Events)
//! over a raw HTTP client that parses the stream itself: it counts as a
//! viewer exactly like a WebSocket, carries the same `update` and `error`
//! bodies as `data:` lines, keeps itself alive with comments, is admitted
//! and refused like an upgrade, stops counting as soon as its reader goes,
//! and ends on shutdown.

use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::{
    helpers::{
        counts, events_path, eventually, spawn_app, Client, EventClient, StreamItem, TestApp,
        PATIENCE,
    },
    lifecycle_wait,
};

/// Visitor ids as the embed makes them (22 characters of `[A-Za-z0-9_-]`).
const ALICE: &str = "aLiCe_0123456789-abcde";

async fn open(app: &TestApp, page: &str, query: &str) -> EventClient {
    EventClient::open(app.addr, &events_path(page, query), &[])
        .await
        .unwrap_or_else(|(status, body)| panic!("stream refused: {status} {body}"))
}

async fn refused(
    app: &TestApp,
    page: &str,
    query: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    match EventClient::open(app.addr, &events_path(page, query), headers).await {
        Ok(c) => panic!("expected a refusal, got a stream: {}", c.head),
        Err(refusal) => refusal,
    }
}

/// A stream answers `text/event-stream` with the `retry:` hint first, then
/// the full update of its subscription (a comma inside an id is `%2C`,
/// with the visitors map when asked); it counts as one viewer of its page,
/// and its updates follow the counts of the pages it follows, converging to
/// the truth and never above it.
#[tokio::test]
async fn a_stream_counts_as_a_viewer_and_follows_its_links() {
    let (app, _dir) = spawn_app(&[]);
    let mut s = open(&app, "home", "links=b,c%2Cd&visitors=true").await;
    for header in [
        "content-type: text/event-stream",
        "cache-control: no-store",
        "x-accel-buffering: no",
        "access-control-allow-origin: *",
    ] {
        assert!(s.head.contains(header), "{header} in {}", s.head);
    }
    assert_eq!(s.next_item().await, StreamItem::Retry(3000));
    assert_eq!(
        s.next_data().await,
        json!({"type": "update", "connections": {"b": 0, "c,d": 0}, "visitors": {"b": 0, "c,d": 0}})
    );
    lifecycle_wait(&app, "home", 1).await;

    let mut viewers = Vec::new();
    for _ in 0..5 {
        viewers.push(app.connect("b").await);
        viewers.push(app.connect_as("c%2Cd", ALICE).await);
    }
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while (s.shown["b"], s.shown["c,d"], s.shown_visitors["c,d"]) != (5, 5, 1) {
        assert!(tokio::time::Instant::now() < deadline, "{:?}", s.shown);
        let v = s.next_data().await;
        // Arrivals only: never more than the truth on the way.
        assert!(v["connections"]["b"].as_u64().unwrap_or(0) <= 5, "{v}");
        assert!(v["visitors"]["c,d"].as_u64().unwrap_or(0) <= 1, "{v}");
    }
    viewers.clear();
    s.wait_for(&counts(&[("b", 0), ("c,d", 0)])).await;
    lifecycle_wait(&app, "home", 1).await;
}

/// A WebSocket viewer and an event-stream viewer of one page count 2, and
/// one visitor when both carry the same visitor id; the HTTP API and a
/// WebSocket subscriber see the same figures.
#[tokio::test]
async fn a_websocket_and_a_stream_of_one_page_count_two() {
    let (app, _dir) = spawn_app(&[]);
    let mut o = app.connect("o").await;
    o.subscribe_visitors(&["p"]).await;
    let _ws = app.connect_as("p", ALICE).await;
    let _sse = open(&app, "p", &format!("visitor={ALICE}")).await;
    o.wait_for_tally(&counts(&[("p", 2)]), &counts(&[("p", 1)]), (2, 1))
        .await;
    assert_eq!(
        app.get_json("/api/v1/counts?ids=p&visitors=true").await,
        json!({"connections": {"p": 2}, "visitors": {"p": 1}})
    );
}

/// With nothing to say, a stream writes a keep-alive comment every
/// `events.keepalive_interval`; a reader that sends nothing for many times
/// `websocket.client_timeout` stays counted as long as its socket takes
/// bytes.
#[tokio::test]
async fn keep_alives_keep_a_silent_reader_counted() {
    let (app, _dir) = spawn_app(&[("EVENTS__KEEPALIVE_INTERVAL", "100ms")]);
    let mut s = open(&app, "quiet", "").await;
    assert_eq!(s.next_item().await, StreamItem::Retry(3000));
    // 12 keep-alives: 1.2 s, twice the test client_timeout (600 ms).
    for _ in 0..12 {
        assert_eq!(s.next_item().await, StreamItem::Comment);
    }
    lifecycle_wait(&app, "quiet", 1).await;
}

/// The count falls as soon as the reader closes its connection: long
/// before the next keep-alive (ten minutes away here).
#[tokio::test]
async fn a_reader_that_goes_stops_counting_at_once() {
    let (app, _dir) = spawn_app(&[("EVENTS__KEEPALIVE_INTERVAL", "10min")]);
    let mut o = app.connect("o").await;
    o.subscribe(&["gone"]).await;
    let s = open(&app, "gone", "").await;
    o.wait_for(&counts(&[("gone", 1)])).await;
    drop(s);
    o.wait_for(&counts(&[("gone", 0)])).await;
    lifecycle_wait(&app, "gone", 0).await;
}

/// An invalid visitor id is ignored with the WebSocket's `invalid_visitor`
/// error as the first message; the stream stays open and counted.
#[tokio::test]
async fn an_invalid_visitor_id_is_answered_on_the_stream() {
    let (app, _dir) = spawn_app(&[]);
    let mut s = open(&app, "p", "visitor=short&links=q").await;
    let v = s.next_data().await;
    assert_eq!(
        (v["type"].as_str(), v["code"].as_str()),
        (Some("error"), Some("invalid_visitor")),
        "{v}"
    );
    s.wait_for(&counts(&[("q", 0)])).await;
    lifecycle_wait(&app, "p", 1).await;
}

/// Bad requests are refused before anything counts: a bad page id, a bad
/// link, too many links, a bad `visitors`, an origin not allowed, a
/// crawler's User-Agent; the connection caps are the WebSocket's (shared
/// between the transports).
#[tokio::test]
async fn streams_are_refused_like_upgrades() {
    let (app, _dir) = spawn_app(&[
        ("SECURITY__ALLOWED_ORIGINS", "https://ok.example"),
        ("LIMITS__MAX_CONNECTIONS_PER_IP", "2"),
        ("WEBSOCKET__MAX_LINKS_PER_SUBSCRIBE", "2"),
    ]);
    let origin = [("Origin", "https://ok.example")];
    for (page, query, status, text) in [
        ("%ZZ", "", 400, "invalid page id"),
        ("p", "links=a%2Fb", 400, "invalid_page_id"),
        ("p", "links=a,b,c", 400, "too_many_links"),
        ("p", "visitors=maybe", 400, "invalid_parameter"),
    ] {
        let (got, body) = refused(&app, page, query, &origin).await;
        assert_eq!(got, status, "{page}?{query}: {body}");
        assert!(body.contains(text), "{page}?{query}: {body}");
    }
    let (status, body) = refused(&app, "p", "", &[("Origin", "https://evil.example")]).await;
    assert_eq!((status, body.trim()), (403, "origin not allowed"));
    let googlebot = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)";
    let (status, _) = refused(&app, "p", "", &[origin[0], ("User-Agent", googlebot)]).await;
    assert_eq!(
        status, 403,
        "a crawler is not counted over the event stream either"
    );

    // Two connections from this address: one of each transport; a third of
    // either is refused with 429, and a slot freed is a slot to take.
    let s1 = EventClient::open(app.addr, &events_path("p", ""), &origin)
        .await
        .expect("first stream");
    let _ws = app.connect("p").await;
    let (status, _) = refused(&app, "p", "", &origin).await;
    assert_eq!(status, 429);
    drop(s1);
    eventually("the stream's slot is freed", || async {
        EventClient::open(app.addr, &events_path("p", ""), &origin)
            .await
            .is_ok()
    })
    .await;
    lifecycle_wait(&app, "p", 1).await;
}

/// At `limits.max_rooms` with every room in use, a stream to a new page
/// gets the WebSocket's `overloaded` error as a `data:` line, then ends.
#[tokio::test]
async fn a_stream_refused_at_the_room_cap_gets_the_error_then_ends() {
    let (app, _dir) = spawn_app(&[("LIMITS__MAX_ROOMS", "1")]);
    let _held = open(&app, "a", "").await;
    lifecycle_wait(&app, "a", 1).await;
    let mut s = open(&app, "b", "").await;
    let v = s.next_data().await;
    assert_eq!(
        (v["type"].as_str(), v["code"].as_str()),
        (Some("error"), Some("overloaded")),
        "{v}"
    );
    s.expect_end().await;
    lifecycle_wait(&app, "b", 0).await;
}

/// Shutdown ends every stream (the reader sees the end of the response)
/// without cutting anything; no stream is counted once it began.
#[tokio::test]
async fn shutdown_ends_the_stream() {
    let (app, _dir) = spawn_app(&[("EVENTS__KEEPALIVE_INTERVAL", "10min")]);
    let mut s = open(&app, "p", "links=q").await;
    s.wait_for(&counts(&[("q", 0)])).await;
    lifecycle_wait(&app, "p", 1).await;
    let report = tokio::spawn(app.shutdown());
    s.expect_end().await;
    assert_eq!(report.await.expect("shutdown").cut, 0);
}

/// A reader that stops reading (a tiny receive buffer, nothing read) fills
/// its socket with a ~50 KB full update; while its socket takes nothing
/// the counts of its links merge (they do not queue), and once it took no
/// bytes for `websocket.client_timeout` the stream is closed and stops
/// counting. Others (a WebSocket watcher, a fresh stream) are unaffected.
#[tokio::test]
async fn a_reader_that_stops_reading_is_closed() {
    let (app, _dir) = spawn_app(&[("WEBSOCKET__CLIENT_TIMEOUT", "1s")]);
    let mut watcher = app.connect("watcher").await;
    watcher.subscribe(&["sink"]).await;
    watcher.wait_for(&counts(&[("sink", 0)])).await;
    let links: Vec<String> = (0..100).map(|i| format!("{i:0>200}")).collect();
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut stream = socket.connect(app.addr).await.expect("connect");
    let path = events_path("sink", &format!("links={}&visitors=true", links.join(",")));
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("request");
    watcher.wait_for(&counts(&[("sink", 1)])).await;
    // Counts of its links keep changing while it reads nothing: its socket
    // fills, then they merge.
    let urls: Vec<String> = links.iter().take(20).map(|id| app.ws_url(id)).collect();
    let toggler = tokio::spawn(async move {
        loop {
            for url in &urls {
                Client::connect(url).await.close().await;
            }
        }
    });
    watcher.wait_for(&counts(&[("sink", 0)])).await;
    toggler.abort();
    lifecycle_wait(&app, "sink", 0).await;
    let mut fresh = open(&app, "fresh", &format!("links={}", links[0])).await;
    fresh.wait_for(&counts(&[(&links[0], 0)])).await;
    drop(stream);
}

/// Bytes a reader sends after its request are read and dropped: the
/// stream goes on.
#[tokio::test]
async fn bytes_after_the_request_change_nothing() {
    let (app, _dir) = spawn_app(&[]);
    let mut s = open(&app, "p", "links=q").await;
    s.wait_for(&counts(&[("q", 0)])).await;
    s.stream_mut()
        .write_all(&[b'x'; 100_000])
        .await
        .expect("write");
    let _q = app.connect("q").await;
    s.wait_for(&counts(&[("q", 1)])).await;
    lifecycle_wait(&app, "p", 1).await;
}

/// `site=true` adds the site's figure to the stream's updates, as
/// `"site": true` in a `subscribe` does: the distinct people on any page,
/// the stream's own reader among them, and never more than the truth.
#[tokio::test]
async fn a_stream_can_follow_the_site_figure() {
    let (app, _dir) = spawn_app(&[]);
    let mut s = open(&app, "home", "site=true").await;
    assert_eq!(s.next_item().await, StreamItem::Retry(3000));
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut other = None;
    loop {
        let v = s.next_data().await;
        let site = v["site"].as_u64();
        assert!(site.unwrap_or(0) <= 2, "{v}");
        match (site, &other) {
            (Some(1), None) => other = Some(app.connect("elsewhere").await),
            (Some(2), Some(_)) => break,
            _ => {}
        }
        assert!(tokio::time::Instant::now() < deadline, "{v}");
    }
}
