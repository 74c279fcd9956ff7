//! Hostile input, caps and proxies: every bad input gets its documented
//! answer, and afterwards the server still serves and every other
//! connection's counts are exact.

use std::{net::SocketAddr, time::Duration};

use link_counter::counter::{GetLoad, GetStatus};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_tungstenite::tungstenite::{
    protocol::frame::{
        coding::{Data, OpCode},
        Frame,
    },
    Message,
};

use crate::helpers::{
    connect_from, counts, eventually, http_get, http_raw, spawn_app, Client, TestApp, PATIENCE,
};

/// The invariant checked after every row: the server answers HTTP, the
/// watcher (subscribed to `target`) shows the true count, and a fresh
/// subscriber gets the same.
async fn still_exact(app: &TestApp, watcher: &mut Client, target: &str, n: u64) {
    assert_eq!(app.get("/healthz").await.0, 200);
    watcher.wait_for(&counts(&[(target, n)])).await;
    let mut fresh = app.connect("fresh-check").await;
    fresh.subscribe(&[target]).await;
    assert_eq!(fresh.next_update().await, counts(&[(target, n)]));
    fresh.close().await;
}

/// Text messages that are wrong in every documented way: exact error code,
/// the connection stays open, nothing else changes.
#[tokio::test]
async fn bad_messages_table() {
    let (app, _dir) = spawn_app(&[("WEBSOCKET__MAX_LINKS_PER_SUBSCRIBE", "4")]);
    let mut watcher = app.connect("watcher").await;
    watcher.subscribe(&["target"]).await;
    watcher.next_update().await;
    let _viewer = app.connect("target").await;
    watcher.wait_for(&counts(&[("target", 1)])).await;

    let long = "x".repeat(257);
    let rows: Vec<(String, &str)> = vec![
        ("{not json".into(), "invalid_json"),
        ("42".into(), "invalid_json"),
        (r#""subscribe""#.into(), "invalid_json"),
        (r#"{"links":["a"]}"#.into(), "unknown_type"),
        (r#"{"type":7}"#.into(), "unknown_type"),
        (r#"{"type":"publish","count":99}"#.into(), "unknown_type"),
        (r#"{"type":"subscribe"}"#.into(), "invalid_json"),
        (
            r#"{"type":"subscribe","links":{"a":1}}"#.into(),
            "invalid_json",
        ),
        (
            r#"{"type":"subscribe","links":["a",null]}"#.into(),
            "invalid_json",
        ),
        (
            r#"{"type":"subscribe","links":[""]}"#.into(),
            "invalid_page_id",
        ),
        (
            format!(r#"{{"type":"subscribe","links":["{long}"]}}"#),
            "invalid_page_id",
        ),
        (
            r#"{"type":"subscribe","links":["a\u0007b"]}"#.into(),
            "invalid_page_id",
        ),
        (
            r#"{"type":"subscribe","links":["a/b"]}"#.into(),
            "invalid_page_id",
        ),
        (
            r#"{"type":"subscribe","links":["a","b","c","d","e"]}"#.into(),
            "too_many_links",
        ),
    ];
    let mut client = app.connect("target").await;
    for (text, code) in &rows {
        client.send_text(text).await;
        let v = client.next_json().await;
        assert_eq!(
            (v["type"].as_str(), v["code"].as_str()),
            (Some("error"), Some(*code)),
            "row {text}"
        );
        still_exact(&app, &mut watcher, "target", 2).await;
    }
    // Duplicate links are not an error: they are ignored.
    client
        .send_text(r#"{"type":"subscribe","links":["target","target","target"]}"#)
        .await;
    assert_eq!(client.next_update().await, counts(&[("target", 2)]));
    // Five ids of which only four are distinct: within the cap.
    client
        .send_text(r#"{"type":"subscribe","links":["a","b","c","d","a"]}"#)
        .await;
    assert_eq!(
        client.next_update().await,
        counts(&[("a", 0), ("b", 0), ("c", 0), ("d", 0)])
    );
}

/// Frames that end the connection: binary (1003), one frame over the size
/// limit (1009), fragments whose total is over it (1009).
#[tokio::test]
async fn bad_frames_table() {
    let (app, _dir) = spawn_app(&[("WEBSOCKET__MAX_MESSAGE_BYTES", "1024")]);
    let mut watcher = app.connect("watcher").await;
    watcher.subscribe(&["target"]).await;
    watcher.next_update().await;
    let _viewer = app.connect("target").await;
    watcher.wait_for(&counts(&[("target", 1)])).await;

    let fragment =
        |data: &[u8], op: OpCode, fin: bool| Message::Frame(Frame::message(data.to_vec(), op, fin));
    let rows: Vec<(&str, Vec<Message>, u16)> = vec![
        ("binary frame", vec![Message::Binary(vec![0, 1, 2])], 1003),
        (
            "frame over max_message_bytes",
            vec![Message::Text("y".repeat(2048))],
            1009,
        ),
        (
            "fragments over max_message_bytes in total",
            vec![
                fragment(&[b'z'; 600], OpCode::Data(Data::Text), false),
                fragment(&[b'z'; 600], OpCode::Data(Data::Continue), false),
                fragment(&[b'z'; 10], OpCode::Data(Data::Continue), true),
            ],
            1009,
        ),
    ];
    for (name, frames, code) in rows {
        let mut c = app.connect("target").await;
        watcher.wait_for(&counts(&[("target", 2)])).await;
        for f in frames {
            c.send(f).await;
        }
        assert_eq!(c.expect_close().await, code, "{name}");
        still_exact(&app, &mut watcher, "target", 1).await;
    }
    // Fragments within the limit are reassembled and work.
    let mut ok = app.connect("target").await;
    let msg = br#"{"type":"subscribe","links":["target"]}"#;
    ok.send(fragment(&msg[..10], OpCode::Data(Data::Text), false))
        .await;
    ok.send(fragment(&msg[10..], OpCode::Data(Data::Continue), true))
        .await;
    assert_eq!(ok.next_update().await, counts(&[("target", 2)]));
}

/// Bad URLs are refused before the upgrade with 400 / 404 and a helpful text.
#[tokio::test]
async fn bad_urls_table() {
    let (app, _dir) = spawn_app(&[]);
    let mut watcher = app.connect("watcher").await;
    watcher.subscribe(&["target"]).await;
    watcher.next_update().await;
    let long = "x".repeat(257);
    let rows: Vec<(String, u16, &str)> = vec![
        ("/parties/page/%ZZ".into(), 400, "percent-encoded"),
        ("/parties/page/abc%".into(), 400, "percent-encoded"),
        ("/parties/page/%C3%28".into(), 400, "UTF-8"),
        ("/parties/page/a%2Fb".into(), 400, "'/'"),
        ("/parties/page/a%00b".into(), 400, "control"),
        (format!("/parties/page/{long}"), 400, "longer"),
        ("/parties/page/".into(), 400, "empty"),
        ("/parties/other/x".into(), 404, "/parties/page/"),
        ("/nothing/here".into(), 404, "/parties/page/"),
    ];
    for (path, status, hint) in rows {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        );
        let (got, body) = raw_with_close(app.addr, &req).await;
        assert_eq!(got, status, "{path}: {body}");
        assert!(
            body.contains(hint),
            "{path}: {body:?} should mention {hint}"
        );
        still_exact(&app, &mut watcher, "target", 0).await;
    }
    let (status, body) = http_get(app.addr, "/parties/page/target").await;
    assert_eq!(status, 400);
    assert!(body.contains("WebSocket"), "{body}");
}

/// Sends a request and reads until the server closes or the body is in.
async fn raw_with_close(addr: SocketAddr, req: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if String::from_utf8_lossy(&buf).contains("\r\n\r\n") && buf.ends_with(b"\n") {
                break;
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// A per-connection token bucket answers `rate_limited`; a connection that
/// keeps flooding is closed with 1008; others are unaffected.
#[tokio::test]
async fn message_flood_is_rate_limited_then_closed() {
    let (app, _dir) = spawn_app(&[
        ("LIMITS__MESSAGES_PER_SECOND", "2"),
        ("LIMITS__BURST", "3"),
        ("LIMITS__FLOOD_STRIKES", "5"),
    ]);
    let mut watcher = app.connect("watcher").await;
    watcher.subscribe(&["flood"]).await;
    watcher.next_update().await;
    let mut flooder = app.connect("flood").await;
    watcher.wait_for(&counts(&[("flood", 1)])).await;
    for _ in 0..3 {
        flooder.subscribe(&["a"]).await;
        assert_eq!(flooder.next_update().await, counts(&[("a", 0)]));
    }
    flooder.subscribe(&["a"]).await;
    let v = flooder.next_json().await;
    assert_eq!(v["code"], "rate_limited", "{v}");
    for _ in 0..10 {
        flooder
            .send_text(r#"{"type":"subscribe","links":["a"]}"#)
            .await;
    }
    assert_eq!(flooder.expect_close().await, 1008);
    still_exact(&app, &mut watcher, "flood", 0).await;
}

async fn try_connect_from(
    app: &TestApp,
    src: &str,
    page: &str,
    headers: &[(&str, &str)],
) -> Result<Client, u16> {
    connect_from(app.addr, src, &app.ws_url(page), headers).await
}

/// Per-IP concurrent cap (429), per-IP new-connection rate (429) and the
/// global cap (503); existing connections are unaffected.
#[tokio::test]
async fn connection_floods_are_capped() {
    let (app, _dir) = spawn_app(&[
        ("LIMITS__MAX_CONNECTIONS_PER_IP", "3"),
        ("LIMITS__MAX_CONNECTIONS", "8"),
    ]);
    let mut watcher = try_connect_from(&app, "127.0.0.9", "w", &[])
        .await
        .expect("watcher");
    watcher.subscribe(&["cap"]).await;
    watcher.next_update().await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            try_connect_from(&app, "127.0.0.2", "cap", &[])
                .await
                .expect("under the cap"),
        );
    }
    assert_eq!(
        try_connect_from(&app, "127.0.0.2", "cap", &[]).await.err(),
        Some(429)
    );
    watcher.wait_for(&counts(&[("cap", 3)])).await;
    // Another address is not affected by 127.0.0.2's cap.
    for _ in 0..3 {
        held.push(
            try_connect_from(&app, "127.0.0.3", "cap", &[])
                .await
                .expect("other ip"),
        );
    }
    held.push(
        try_connect_from(&app, "127.0.0.4", "cap", &[])
            .await
            .expect("8th"),
    );
    // 8 open (watcher + 7): the global cap refuses with 503.
    assert_eq!(
        try_connect_from(&app, "127.0.0.5", "cap", &[]).await.err(),
        Some(503)
    );
    watcher.wait_for(&counts(&[("cap", 7)])).await;
    // Closing frees a slot.
    held.pop().expect("one").close().await;
    watcher.wait_for(&counts(&[("cap", 6)])).await;
    held.push(
        try_connect_from(&app, "127.0.0.5", "cap", &[])
            .await
            .expect("slot freed"),
    );
    watcher.wait_for(&counts(&[("cap", 7)])).await;
    held.pop().expect("one").close().await;
    still_exact(&app, &mut watcher, "cap", 6).await;
}

/// New connections per IP per second: a burst is allowed, more is refused with 429.
#[tokio::test]
async fn connection_rate_per_ip() {
    let (app, _dir) = spawn_app(&[
        ("LIMITS__CONNECTIONS_PER_IP_PER_SECOND", "0.5"),
        ("LIMITS__CONNECTIONS_PER_IP_BURST", "3"),
    ]);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            try_connect_from(&app, "127.0.0.6", "rate", &[])
                .await
                .expect("burst"),
        );
    }
    assert_eq!(
        try_connect_from(&app, "127.0.0.6", "rate", &[]).await.err(),
        Some(429)
    );
    held.push(
        try_connect_from(&app, "127.0.0.7", "rate", &[])
            .await
            .expect("other ip"),
    );
    // The joins reach the counter asynchronously after the handshakes.
    crate::lifecycle_wait(&app, "rate", 4).await;
}

/// A browser upgrade from a non-allowed Origin is refused with 403; allowed
/// exact and wildcard origins and clients without an Origin get in.
#[tokio::test]
async fn origins_are_checked() {
    let (app, _dir) = spawn_app(&[(
        "SECURITY__ALLOWED_ORIGINS",
        "https://good.example,*.trusted.example",
    )]);
    let o = |v: &'static str| vec![("origin", v)];
    assert!(
        try_connect_from(&app, "127.0.0.1", "o", &o("https://good.example"))
            .await
            .is_ok()
    );
    assert!(
        try_connect_from(&app, "127.0.0.1", "o", &o("http://a.trusted.example"))
            .await
            .is_ok()
    );
    assert!(try_connect_from(&app, "127.0.0.1", "o", &[]).await.is_ok());
    for bad in [
        "https://evil.example",
        "https://good.example.evil.net",
        "null",
        "https://trusted.example",
    ] {
        assert_eq!(
            try_connect_from(&app, "127.0.0.1", "o", &o(bad))
                .await
                .err(),
            Some(403),
            "{bad}"
        );
    }
    // The three accepted connections closed as they were dropped; their
    // leaves reach the counter after their joins, in no fixed time.
    crate::lifecycle_wait(&app, "o", 0).await;
}

/// Forwarding headers are believed only from trusted proxies, and only their
/// right-most untrusted hop: spoofed values do not change the client IP.
#[tokio::test]
async fn forwarded_ip_only_from_trusted_proxies() {
    let (app, _dir) = spawn_app(&[
        ("SECURITY__TRUSTED_PROXIES", "127.0.0.1/32"),
        ("LIMITS__MAX_CONNECTIONS_PER_IP", "1"),
    ]);
    let xff = |v: &'static str| vec![("x-forwarded-for", v)];
    let mut held = Vec::new();
    // Through the trusted proxy (127.0.0.1) two clients are told apart by the header.
    held.push(
        try_connect_from(&app, "127.0.0.1", "p", &xff("198.51.100.1"))
            .await
            .expect("client 1"),
    );
    held.push(
        try_connect_from(&app, "127.0.0.1", "p", &xff("198.51.100.2"))
            .await
            .expect("client 2"),
    );
    assert_eq!(
        try_connect_from(&app, "127.0.0.1", "p", &xff("198.51.100.1"))
            .await
            .err(),
        Some(429)
    );
    // A spoofed left part does not help: the right-most hop is still .1.
    assert_eq!(
        try_connect_from(&app, "127.0.0.1", "p", &xff("203.0.113.9, 198.51.100.1"))
            .await
            .err(),
        Some(429)
    );
    let fwd = vec![("forwarded", "for=198.51.100.2")];
    assert_eq!(
        try_connect_from(&app, "127.0.0.1", "p", &fwd).await.err(),
        Some(429)
    );
    // An untrusted peer's header is ignored: its own address is capped.
    held.push(
        try_connect_from(&app, "127.0.0.8", "p", &xff("198.51.100.3"))
            .await
            .expect("first"),
    );
    assert_eq!(
        try_connect_from(&app, "127.0.0.8", "p", &xff("198.51.100.4"))
            .await
            .err(),
        Some(429)
    );
    // The count reaches the counter after the handshake answered: wait for it.
    crate::lifecycle_wait(&app, "p", 3).await;
}

/// A client that never completes its HTTP request is dropped after
/// `limits.handshake_timeout`; the server keeps serving.
#[tokio::test]
async fn slow_handshake_is_dropped() {
    let (app, _dir) = spawn_app(&[("LIMITS__HANDSHAKE_TIMEOUT", "1s")]);
    let mut s = TcpStream::connect(app.addr).await.expect("connect");
    s.write_all(b"GET /parties/page/slow HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let done = tokio::time::timeout(PATIENCE, s.read_to_end(&mut buf)).await;
    assert!(done.is_ok(), "server did not drop the half-sent request");
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    assert_eq!(app.get("/healthz").await.0, 200);
    assert_eq!(app.get_json("/api/v1/counts?ids=slow").await["slow"], 0);
}

/// Floods of distinct page ids reach the room and page caps and are refused
/// with `overloaded`; memory stops growing; real pages keep working.
#[tokio::test]
async fn distinct_page_floods_hit_the_caps() {
    let (app, _dir) = spawn_app(&[
        ("LIMITS__MAX_ROOMS", "10"),
        ("LIMITS__MAX_PAGES", "40"),
        ("WEBSOCKET__MAX_LINKS_PER_SUBSCRIBE", "256"),
    ]);
    let mut real = app.connect("real").await;
    real.subscribe(&["real-target"]).await;
    real.next_update().await;
    let mut viewer = app.connect("real-target").await;

    // Connections to new pages: rooms up to the cap, then `overloaded` + 1013 (try again later).
    let mut held = Vec::new();
    let mut refused = 0;
    for i in 0..30 {
        let mut c = app.connect(&format!("flood-{i}")).await;
        c.subscribe(&[]).await;
        let v = c.next_json().await;
        if v["type"] == "error" {
            assert_eq!(v["code"], "overloaded", "{v}");
            assert_eq!(c.expect_close().await, 1013);
            refused += 1;
        } else {
            held.push(c);
        }
    }
    assert_eq!(held.len(), 8, "10 rooms: real, real-target and 8 floods");
    assert_eq!(refused, 22);

    // Subscribe floods: links to new pages beyond max_pages are refused.
    let links: Vec<String> = (0..100).map(|i| format!("link-{i}")).collect();
    let refs: Vec<&str> = links.iter().map(String::as_str).collect();
    let mut sub = held.pop().expect("a held connection");
    sub.subscribe(&refs).await;
    let v = sub.next_json().await;
    assert_eq!(
        (v["type"].as_str(), v["code"].as_str()),
        (Some("error"), Some("overloaded")),
        "{v}"
    );
    let update = sub.next_update().await;
    assert!(!update.is_empty() && update.len() < 100, "{}", update.len());
    let status = app.counter.send(GetStatus).await.expect("status");
    assert!(status.pages <= 40, "pages tracked {}", status.pages);
    // Again, replacing the set: the links dropped are idle now and give way
    // to as many new ones; nothing grows.
    let more: Vec<String> = (100..200).map(|i| format!("link-{i}")).collect();
    let refs: Vec<&str> = more.iter().map(String::as_str).collect();
    sub.subscribe(&refs).await;
    assert_eq!(sub.next_json().await["code"], "overloaded");
    assert_eq!(sub.next_update().await.len(), update.len());
    assert!(app.counter.send(GetStatus).await.expect("status").pages <= 40);

    // Real pages keep working.
    real.wait_for(&counts(&[("real-target", 1)])).await;
    viewer.subscribe(&["real"]).await;
    assert_eq!(viewer.next_update().await, counts(&[("real", 1)]));
    drop(viewer);
    real.wait_for(&counts(&[("real-target", 0)])).await;
    let _ = Duration::ZERO;
}

/// A page-cap refusal that answers an older subscribe of a link the room has
/// asked for again since (dropped and re-added before the answer came) must
/// not drop the link: the newer answer decides. The refusal that answers the
/// latest request still applies. The counter's answers are handed to the
/// room directly, as the counter would send them, because the interleaving
/// that produces a stale refusal (cap full, then freed between two requests)
/// cannot be scheduled from outside.
#[tokio::test]
async fn a_stale_page_cap_refusal_does_not_drop_a_link_asked_for_again() {
    use link_counter::{counter::Subscribed, protocol::PageId, shard::RoomOf};
    let (app, _dir) = spawn_app(&[]);
    let mut reader = app.connect("reader").await;
    reader.subscribe(&["x"]).await; // request 1
    assert_eq!(reader.next_update().await, counts(&[("x", 0)]));
    reader.subscribe(&[]).await; // drops x
    assert!(reader.next_update().await.is_empty());
    reader.subscribe(&["x"]).await; // request 2
    assert_eq!(reader.next_update().await, counts(&[("x", 0)]));

    let shard = app.shards.for_page("reader").expect("shards ready").clone();
    let room = shard
        .send(RoomOf(PageId::parse("reader").unwrap()))
        .await
        .expect("shard answers")
        .expect("the page has a room");

    // The counter's answer to request `req`: x refused.
    let refuse_x = |req: u64| {
        room.send(Subscribed {
            counts: Vec::new(),
            refused: vec![PageId::parse("x").unwrap()],
            req,
        })
    };
    // The refusal of request 1 arrives late: ignored, x is still followed.
    refuse_x(1).await.expect("room answers");
    let mut viewer = app.connect("x").await;
    let next = reader.next_json().await;
    assert_eq!(
        next["type"], "update",
        "the stale refusal was applied: {next}"
    );
    assert_eq!(reader_counts(&next), counts(&[("x", 1)]));

    // A refusal of the latest request (2) applies: `overloaded`, x dropped.
    refuse_x(2).await.expect("room answers");
    let v = reader.next_json().await;
    assert_eq!(
        (v["type"].as_str(), v["code"].as_str()),
        (Some("error"), Some("overloaded")),
        "{v}"
    );
    // The counter had accepted request 2: the room that dropped x unfollows
    // it there too, so no follower is left behind (this is what a rebuild's
    // `RoomState` can leave when a held refusal arrives after it).
    eventually("the counter follows x for nobody", || async {
        let load = app.counter.send(GetLoad).await.expect("load");
        load.subscriptions == 0 && load.follower_rooms == 0
    })
    .await;
    viewer.close().await;
    // The counter has the leave before the probe's subscribe asks.
    crate::lifecycle_wait(&app, "x", 0).await;
    let mut probe = app.connect("probe").await;
    probe.subscribe(&["x"]).await;
    assert_eq!(probe.next_update().await, counts(&[("x", 0)]));
    // x is no longer followed by the reader: its changes do not reach it.
    viewer = app.connect("x").await;
    probe.wait_for(&counts(&[("x", 1)])).await;
    reader.expect_silence(Duration::from_millis(300)).await;
    viewer.close().await;
}

/// The `connections` of an update message as a map.
fn reader_counts(v: &serde_json::Value) -> std::collections::BTreeMap<String, u64> {
    v["connections"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(u64::MAX)))
                .collect()
        })
        .unwrap_or_default()
}

/// A crawler's User-Agent (the default `security.bot_user_agents`) is
/// refused with 403 over a real socket and counts nothing; the same client
/// without it, and a browser's User-Agent, are counted; the HTTP read API
/// answers the crawler; an empty list lets the crawler in.
#[tokio::test]
async fn crawler_user_agents_are_refused_and_not_counted() {
    const GOOGLEBOT: &str = "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; \
        Googlebot/2.1; +http://www.google.com/bot.html) Chrome/131.0.6778.204 Safari/537.36";
    const FIREFOX: &str = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0";
    let (app, _dir) = spawn_app(&[]);
    let mut watcher = try_connect_from(&app, "127.0.0.1", "w", &[])
        .await
        .expect("watcher");
    watcher.subscribe(&["article"]).await;
    watcher.wait_for(&counts(&[("article", 0)])).await;

    let ua = |v| vec![("user-agent", v)];
    for crawler in [GOOGLEBOT, "bingbot/2.0", "GPTBOT/1.2"] {
        assert_eq!(
            try_connect_from(&app, "127.0.0.1", "article", &ua(crawler))
                .await
                .err(),
            Some(403),
            "{crawler}"
        );
    }
    let (status, body) = http_raw(
        app.addr,
        &format!(
            "GET /parties/page/article HTTP/1.1\r\nHost: {}\r\nUser-Agent: {GOOGLEBOT}\r\n\
             Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            app.addr
        ),
    )
    .await;
    assert_eq!(
        (status, body.trim()),
        (403, "crawlers are not counted (security.bot_user_agents)")
    );
    // The read API is not an upgrade: a crawler may read counts.
    let (status, body) = http_raw(
        app.addr,
        &format!(
            "GET /api/v1/counts?ids=article HTTP/1.1\r\nHost: {}\r\nUser-Agent: {GOOGLEBOT}\r\n\
             Connection: close\r\n\r\n",
            app.addr
        ),
    )
    .await;
    assert_eq!((status, body.as_str()), (200, r#"{"article":0}"#));

    let browser = try_connect_from(&app, "127.0.0.1", "article", &ua(FIREFOX))
        .await
        .expect("a browser is counted");
    watcher.wait_for(&counts(&[("article", 1)])).await;
    let plain = try_connect_from(&app, "127.0.0.1", "article", &[])
        .await
        .expect("the same client without a crawler's User-Agent is counted");
    watcher.wait_for(&counts(&[("article", 2)])).await;
    drop((browser, plain));
    watcher.wait_for(&counts(&[("article", 0)])).await;

    // An empty list turns the check off.
    let (open, _dir) = spawn_app(&[("SECURITY__BOT_USER_AGENTS", "")]);
    let crawler = try_connect_from(&open, "127.0.0.1", "article", &ua(GOOGLEBOT))
        .await
        .expect("with an empty list a crawler is let in");
    eventually("the crawler counted", || async {
        open.get_json("/api/v1/counts?ids=article").await["article"] == 1
    })
    .await;
    drop(crawler);
}
