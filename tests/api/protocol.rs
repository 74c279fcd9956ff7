//! The wire protocol, through a real server and real WebSocket clients.

use std::{collections::BTreeMap, time::Duration};

use link_counter::counter::{GetStatus, InjectFault};
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{connect_from, counts, spawn_app, Client, SilentClient};

/// The reference scenario of PROTOCOL.md, message for message.
#[tokio::test]
async fn reference_scenario_message_for_message() {
    let (app, _dir) = spawn_app(&[]);
    let mut a = app.connect("a").await;
    a.subscribe(&["b", "c", "d"]).await;
    assert_eq!(
        a.next_text().await,
        r#"{"type":"update","connections":{"b":0,"c":0,"d":0}}"#
    );

    let mut b = app.connect("b").await;
    b.subscribe(&["a"]).await;
    assert_eq!(
        b.next_text().await,
        r#"{"type":"update","connections":{"a":1}}"#
    );
    assert_eq!(
        a.next_text().await,
        r#"{"type":"update","connections":{"b":1}}"#
    );

    b.close().await;
    assert_eq!(
        a.next_text().await,
        r#"{"type":"update","connections":{"b":0}}"#
    );
    a.expect_silence(Duration::from_millis(300)).await;
}

/// A subscribe replaces the link set; later updates carry only changed ids;
/// two connections of one room with different link sets each get only their
/// own ids; zero is sent as 0.
#[tokio::test]
async fn subscribe_replaces_and_deltas_are_per_connection() {
    let (app, _dir) = spawn_app(&[]);
    let mut x = app.connect("home").await;
    let mut y = app.connect("home").await;
    x.subscribe(&["p", "q"]).await;
    assert_eq!(x.next_update().await, counts(&[("p", 0), ("q", 0)]));
    y.subscribe(&["q", "r"]).await;
    assert_eq!(y.next_update().await, counts(&[("q", 0), ("r", 0)]));

    // A viewer of p: only x hears of it.
    let p1 = app.connect("p").await;
    assert_eq!(x.next_update().await, counts(&[("p", 1)]));
    // A viewer of r: only y hears of it.
    let r1 = app.connect("r").await;
    assert_eq!(y.next_update().await, counts(&[("r", 1)]));
    // A viewer of q: both hear, each only q.
    let q1 = app.connect("q").await;
    assert_eq!(x.next_update().await, counts(&[("q", 1)]));
    assert_eq!(y.next_update().await, counts(&[("q", 1)]));

    // x replaces its set with [r, s]: a full update for exactly those ids.
    x.subscribe(&["r", "s"]).await;
    assert_eq!(x.next_update().await, counts(&[("r", 1), ("s", 0)]));
    // p changes: x no longer follows it.
    drop(p1);
    // q goes to 0: y hears 0 (sent as 0), x does not hear at all.
    q1.close().await;
    assert_eq!(y.next_update().await, counts(&[("q", 0)]));
    r1.close().await;
    assert_eq!(x.next_update().await, counts(&[("r", 0)]));
    assert_eq!(y.next_update().await, counts(&[("r", 0)]));
    x.expect_silence(Duration::from_millis(200)).await;

    // [] clears the set.
    x.subscribe(&[]).await;
    assert_eq!(x.next_update().await, BTreeMap::new());
    let _s = app.connect("s").await;
    x.expect_silence(Duration::from_millis(300)).await;
}

/// A page's own connection counts as a viewer whether or not it subscribes,
/// and a connection subscribed to its own page sees itself.
#[tokio::test]
async fn every_open_connection_counts() {
    let (app, _dir) = spawn_app(&[]);
    let mut me = app.connect("self").await;
    me.subscribe(&["self"]).await;
    assert_eq!(me.next_update().await, counts(&[("self", 1)]));
    let _silent = app.connect("self").await;
    assert_eq!(me.next_update().await, counts(&[("self", 2)]));
    let body = app.get_json("/api/v1/counts?ids=self,other").await;
    assert_eq!(body, serde_json::json!({"self": 2, "other": 0}));
}

/// Bad messages get an `error` reply with the right code and the connection
/// stays open and keeps working.
#[tokio::test]
async fn bad_messages_get_errors_and_change_nothing() {
    let (app, _dir) = spawn_app(&[("WEBSOCKET__MAX_LINKS_PER_SUBSCRIBE", "3")]);
    let mut c = app.connect("page").await;
    c.subscribe(&["t"]).await;
    assert_eq!(c.next_update().await, counts(&[("t", 0)]));
    let cases = [
        ("not json", "invalid_json"),
        ("[1,2]", "invalid_json"),
        (r#"{"links":[]}"#, "unknown_type"),
        (r#"{"type":"unsubscribe"}"#, "unknown_type"),
        (r#"{"type":"subscribe"}"#, "invalid_json"),
        (r#"{"type":"subscribe","links":[1]}"#, "invalid_json"),
        (r#"{"type":"subscribe","links":[""]}"#, "invalid_page_id"),
        (r#"{"type":"subscribe","links":["a/b"]}"#, "invalid_page_id"),
        (
            r#"{"type":"subscribe","links":["a","b","c","d"]}"#,
            "too_many_links",
        ),
    ];
    for (text, code) in cases {
        c.send_text(text).await;
        let v = c.next_json().await;
        assert_eq!(v["type"], "error", "{text}");
        assert_eq!(v["code"], code, "{text}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // Still subscribed to t, still counted.
    let _t = app.connect("t").await;
    assert_eq!(c.next_update().await, counts(&[("t", 1)]));
    assert_eq!(app.get_json("/api/v1/counts?ids=page").await["page"], 1);
}

/// Binary frames close with 1003; oversized messages with 1009; the server
/// keeps serving and counts stay exact.
#[tokio::test]
async fn binary_and_oversized_frames_close_the_connection() {
    let (app, _dir) = spawn_app(&[("WEBSOCKET__MAX_MESSAGE_BYTES", "1024")]);
    let mut watcher = app.connect("w").await;
    watcher.subscribe(&["x"]).await;
    assert_eq!(watcher.next_update().await, counts(&[("x", 0)]));

    let mut bin = app.connect("x").await;
    assert_eq!(watcher.next_update().await, counts(&[("x", 1)]));
    bin.send(Message::Binary(vec![1, 2, 3])).await;
    assert_eq!(bin.expect_close().await, 1003);
    assert_eq!(watcher.next_update().await, counts(&[("x", 0)]));

    let mut big = app.connect("x").await;
    assert_eq!(watcher.next_update().await, counts(&[("x", 1)]));
    big.send_text(&format!(
        r#"{{"type":"subscribe","links":["{}"]}}"#,
        "y".repeat(2000)
    ))
    .await;
    assert_eq!(big.expect_close().await, 1009);
    assert_eq!(watcher.next_update().await, counts(&[("x", 0)]));
}

/// After 1,000 random connects and closes over ten pages, a third of the
/// closes dropping the TCP stream without a close frame (and a few clients
/// going silent so only the liveness timeout can find them), every observer
/// shows the true number of open connections.
#[tokio::test]
async fn counts_exact_after_random_churn() {
    let (app, _dir) = spawn_app(&[]);
    let pages: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
    let page_refs: Vec<&str> = pages.iter().map(String::as_str).collect();
    let mut observer = app.connect("observer").await;
    observer.subscribe(&page_refs).await;
    observer.next_update().await;

    // Deterministic pseudo-random sequence (xorshift).
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut open: Vec<(usize, Client)> = Vec::new();
    let mut silent = Vec::new();
    for step in 0..1000 {
        if open.is_empty() || rand(100) < 55 {
            let p = rand(10) as usize;
            open.push((p, app.connect(&pages[p]).await));
        } else {
            let i = rand(open.len() as u64) as usize;
            let (_, c) = open.swap_remove(i);
            match rand(3) {
                0 => c.drop_abruptly(),
                _ => c.close().await,
            }
        }
        if step % 100 == 50 {
            // Hold the TCP stream open but never read or answer pings.
            let p = rand(10) as usize;
            silent.push(SilentClient::connect(&app.ws_url(&pages[p])).await);
        }
    }
    let mut expected: BTreeMap<String, u64> = pages.iter().map(|p| (p.clone(), 0)).collect();
    for (p, _) in &open {
        *expected.get_mut(&pages[*p]).expect("page") += 1;
    }
    // The silent clients do not answer pings (they are never polled), so the
    // server drops them after client_timeout; the counts converge without them.
    observer.wait_for(&expected).await;
    let q = format!("/api/v1/counts?ids={}", pages.join(","));
    let api: BTreeMap<String, u64> = serde_json::from_value(app.get_json(&q).await).expect("map");
    assert_eq!(api, expected);
    drop(silent);
}

/// A counter fault (injected through the test hook) restarts it under the
/// supervisor; it rebuilds from the rooms and every count stays exact, and
/// changes after the restart still reach subscribers.
#[tokio::test]
async fn counter_restart_keeps_counts_exact() {
    let (app, _dir) = spawn_app(&[]);
    let mut obs = app.connect("obs").await;
    obs.subscribe(&["k1", "k2", "k3"]).await;
    obs.next_update().await;
    let mut held = Vec::new();
    for (page, n) in [("k1", 3), ("k2", 1)] {
        for _ in 0..n {
            held.push(app.connect(page).await);
        }
    }
    obs.wait_for(&counts(&[("k1", 3), ("k2", 1), ("k3", 0)]))
        .await;

    let before = app.counter.send(GetStatus).await.expect("counter answers");
    app.counter.do_send(InjectFault);
    crate::helpers::eventually("the counter restarted and rebuilt", || async {
        let s = app.counter.send(GetStatus).await.expect("counter answers");
        s.generation > before.generation && !s.rebuilding
    })
    .await;
    let api = app.get_json("/api/v1/counts?ids=k1,k2,k3,obs").await;
    assert_eq!(
        api,
        serde_json::json!({"k1": 3, "k2": 1, "k3": 0, "obs": 1})
    );
    // Whatever the fault scrambled was corrected for the observer too.
    obs.wait_for(&counts(&[("k1", 3), ("k2", 1), ("k3", 0)]))
        .await;

    // Subscriptions survived: new changes still arrive.
    held.push(app.connect("k3").await);
    obs.wait_for(&counts(&[("k3", 1)])).await;
    held.remove(0).close().await;
    obs.wait_for(&counts(&[("k1", 2)])).await;
    // A fresh subscriber gets exact counts.
    let mut fresh = app.connect("fresh").await;
    fresh.subscribe(&["k1", "k2", "k3"]).await;
    assert_eq!(
        fresh.next_update().await,
        counts(&[("k1", 2), ("k2", 1), ("k3", 1)])
    );
}

/// Page ids are percent-decoded exactly once; bad ids in the URL are refused
/// with 400 before the upgrade.
#[tokio::test]
async fn page_ids_in_urls() {
    let (app, _dir) = spawn_app(&[]);
    let mut obs = app.connect("o").await;
    obs.subscribe(&["hello world", "50%"]).await;
    obs.next_update().await;
    let _a = app.connect("hello%20world").await;
    let _b = app.connect("50%2525").await; // decodes to "50%25", not "50%"
    obs.wait_for(&counts(&[("hello world", 1)])).await;
    // "50%25"'s room reports its join on its own (`obs` does not follow it).
    crate::helpers::eventually("50%25 at 1", || async {
        app.get_json("/api/v1/counts?id=50%2525").await["50%25"] == 1
    })
    .await;
    assert_eq!(obs.shown.get("50%"), Some(&0));

    for bad in ["a%2Fb", "%ZZ", "%FF", "%0A", ""] {
        let url = app.ws_url(bad);
        let err = tokio_tungstenite::connect_async(&url)
            .await
            .expect_err("refused");
        match err {
            tokio_tungstenite::tungstenite::Error::Http(resp) => {
                assert_eq!(resp.status(), 400, "{bad}")
            }
            other => panic!("{bad}: expected HTTP 400, got {other:?}"),
        }
    }
}

/// One request to the origin check with an optional `Origin`: the status,
/// the response headers (names lower-cased) and the JSON body.
async fn ask_origin(
    addr: std::net::SocketAddr,
    method: &str,
    origin: Option<&str>,
) -> (u16, BTreeMap<String, String>, serde_json::Value) {
    let origin_line = origin.map_or(String::new(), |o| format!("Origin: {o}\r\n"));
    let length = if method == "POST" {
        "Content-Length: 0\r\n"
    } else {
        ""
    };
    let request = format!(
        "{method} /api/v1/origin HTTP/1.1\r\nHost: {addr}\r\n{origin_line}{length}Connection: close\r\n\r\n"
    );
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let buf = crate::helpers::exchange(&mut s, &request).await;
    let text = String::from_utf8(buf).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let json = serde_json::from_str(body).unwrap_or_else(|e| panic!("JSON body {body:?}: {e}"));
    (status, headers, json)
}

/// `GET`/`POST /api/v1/origin` answers, readable from any site, whether the
/// request's `Origin` may open WebSockets, by the same rule as the upgrade
/// (checked against real upgrades), and reveals nothing else: not the list.
#[tokio::test]
async fn origin_check_answers_as_the_upgrade_does() {
    let (app, _dir) = spawn_app(&[(
        "SECURITY__ALLOWED_ORIGINS",
        "https://good.example,*.trusted.example",
    )]);
    let cases = [
        (Some("https://good.example"), true),
        (Some("http://a.trusted.example"), true),
        (Some("https://evil.example"), false),
        (Some("https://good.example.evil.net"), false),
        (Some("null"), false),
        // No Origin: not a browser, allowed (as the upgrade allows it).
        (None, true),
    ];
    for (origin, allowed) in cases {
        for method in ["GET", "POST"] {
            let (status, headers, json) = ask_origin(app.addr, method, origin).await;
            assert_eq!(status, 200, "{method} {origin:?}");
            assert_eq!(
                json,
                serde_json::json!({
                    "origin": origin,
                    "allowed": allowed,
                    "setting": "security.allowed_origins",
                }),
                "{method} {origin:?}"
            );
            assert_eq!(
                headers
                    .get("access-control-allow-origin")
                    .map(String::as_str),
                Some("*")
            );
            assert_eq!(
                headers.get("cache-control").map(String::as_str),
                Some("no-store")
            );
            assert_eq!(headers.get("vary").map(String::as_str), Some("Origin"));
            assert!(
                headers["content-type"].starts_with("application/json"),
                "{headers:?}"
            );
            if !allowed {
                let text = json.to_string();
                assert!(
                    !text.contains("good.example\"") && !text.contains("trusted"),
                    "the configured list leaks: {text}"
                );
            }
        }
        // The upgrade agrees.
        let headers: Vec<(&str, &str)> = origin.map(|o| ("origin", o)).into_iter().collect();
        let upgraded = connect_from(app.addr, "127.0.0.1", &app.ws_url("oc"), &headers).await;
        match (allowed, upgraded) {
            (true, Ok(_)) | (false, Err(403)) => {}
            (_, Ok(_)) => panic!("{origin:?}: the check says refused, the upgrade got in"),
            (_, Err(status)) => {
                panic!("{origin:?}: the check says allowed, the upgrade got {status}")
            }
        }
    }

    // Without security.allowed_origins every origin is allowed.
    let (open, _dir2) = spawn_app(&[]);
    let (_, _, json) = ask_origin(open.addr, "GET", Some("https://evil.example")).await;
    assert_eq!(json["allowed"], true);
    assert_eq!(json["origin"], "https://evil.example");
}
