//! The WebSocket path the server owns: delivery as state under a burst of
//! arrivals, frames refused from their header, prompt closes, clients that
//! stop reading. Raw sockets where the client must misbehave.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use futures_util::{SinkExt, StreamExt};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{counts, eventually, eventually_within, spawn_app, PATIENCE};

/// Resident memory of this process (the server runs in it), in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .expect("VmRSS in /proc/self/status")
}

/// Opens a TCP connection and performs the WebSocket handshake by hand;
/// returns the stream right after the `101`'s head.
async fn raw_upgrade(
    addr: std::net::SocketAddr,
    page: &str,
    recv_buffer: Option<u32>,
) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).expect("receive buffer");
    }
    let mut s = socket.connect(addr).await.expect("connect");
    let req = format!(
        "GET /parties/page/{page} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("request");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(PATIENCE, s.read(&mut byte))
            .await
            .expect("101 in time")
            .expect("read");
        assert_eq!(n, 1, "connection closed during the handshake");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s
}

/// The header of a masked client frame (mask key 0: the payload is sent as is).
fn client_header(opcode: u8, fin: bool, len: u64) -> Vec<u8> {
    let mut h = vec![if fin { 0x80 } else { 0 } | opcode];
    match len {
        0..=125 => h.push(0x80 | len as u8),
        126..=0xffff => {
            h.push(0x80 | 126);
            h.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            h.push(0x80 | 127);
            h.extend_from_slice(&len.to_be_bytes());
        }
    }
    h.extend_from_slice(&[0, 0, 0, 0]);
    h
}

fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = client_header(opcode, true, payload.len() as u64);
    f.extend_from_slice(payload);
    f
}

/// Reads server frames until a Close; returns its code (1005 without one),
/// or `None` if the stream ended or failed first.
async fn read_close(r: &mut (impl AsyncReadExt + Unpin)) -> Option<u16> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        // Parse whole frames from the front (server frames are unmasked).
        while buf.len() >= 2 {
            let (op, len7) = (buf[0] & 0x0f, usize::from(buf[1] & 0x7f));
            let (start, len) = match len7 {
                126 if buf.len() >= 4 => (4, usize::from(u16::from_be_bytes([buf[2], buf[3]]))),
                127 if buf.len() >= 10 => (
                    10,
                    u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes")) as usize,
                ),
                126 | 127 => break,
                n => (2, n),
            };
            if buf.len() < start + len {
                break;
            }
            if op == 0x8 {
                return Some(if len >= 2 {
                    u16::from_be_bytes([buf[start], buf[start + 1]])
                } else {
                    1005
                });
            }
            buf.drain(..start + len);
        }
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A burst of arrivals (every client opened at once, each subscribing to 3
/// other pages, every one reading every frame) closes no connection: the
/// server's output falling behind slows updates down, it never cuts a
/// reader off; once the burst is over, every client shows the true counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_arrivals_disconnects_no_reader() {
    let _ = burst(&[]).await;
}

/// A surge far over `counter.delivery_budget`: publishes are deferred
/// (the metric says so), yet every reader converges to the exact counts
/// and none is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_surge_over_the_delivery_budget_converges_and_closes_no_reader() {
    let (app, _dir) = burst(&[("COUNTER__DELIVERY_BUDGET", "200")]).await;
    let admin = app.admin.expect("admin listener");
    let (_, text) = crate::helpers::http_get(admin, "/metrics").await;
    let deferred: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("link_counter_publishes_deferred_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(
        deferred > 0.0,
        "the budget never deferred a publish:\n{text}"
    );
}

/// 2000 readers open at once over 40 pages (broadcast every 10 ms), each
/// following 3 of them; returns the app once every reader shows the exact
/// counts, none closed by the server.
async fn burst(extra: &[(&str, &str)]) -> (crate::helpers::TestApp, tempfile::TempDir) {
    const CLIENTS: usize = 2000;
    const PAGES: usize = 40;
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let mut settings = vec![
        ("COUNTER__BROADCAST_INTERVAL", "10ms"),
        ("WEBSOCKET__CLIENT_TIMEOUT", "30s"),
        ("WEBSOCKET__HEARTBEAT_INTERVAL", "5s"),
        ("LIMITS__MAX_CONNECTIONS", "0"),
    ];
    settings.extend_from_slice(extra);
    let (app, dir) = spawn_app(&settings);
    let closed_by_server = Arc::new(AtomicU64::new(0));
    let mut views = Vec::with_capacity(CLIENTS);
    let mut tasks = Vec::with_capacity(CLIENTS);
    let mut truth = vec![0u64; PAGES];
    for i in 0..CLIENTS {
        let page = i % PAGES;
        truth[page] += 1;
        let links: Vec<String> = (1..=3)
            .map(|k| format!("r{}", (page + k * 7) % PAGES))
            .collect();
        let view = Arc::new(Mutex::new((links.clone(), BTreeMap::<String, u64>::new())));
        views.push(view.clone());
        let url = app.ws_url(&format!("r{page}"));
        let closed = closed_by_server.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ws, _) =
                tokio::time::timeout(PATIENCE * 3, tokio_tungstenite::connect_async(url))
                    .await
                    .expect("connect in time")
                    .expect("upgrade");
            let sub = serde_json::json!({"type": "subscribe", "links": links}).to_string();
            ws.send(Message::Text(sub)).await.expect("subscribe");
            while let Some(m) = ws.next().await {
                match m {
                    Ok(Message::Text(t)) => {
                        let v: serde_json::Value = serde_json::from_str(&t).expect("json");
                        assert_eq!(v["type"], "update", "{v}");
                        let mut view = view.lock().expect("view");
                        for (k, n) in v["connections"].as_object().expect("map") {
                            view.1.insert(k.clone(), n.as_u64().expect("count"));
                        }
                    }
                    Ok(Message::Close(_)) | Err(_) => {
                        closed.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    Ok(_) => {}
                }
            }
            closed.fetch_add(1, Ordering::SeqCst);
        }));
    }
    // Every client converges to the true counts of its links.
    let mut wrong = 0;
    eventually_within(PATIENCE * 6, "every client shows the true counts", || {
        wrong = views
            .iter()
            .filter(|v| {
                let v = v.lock().expect("view");
                v.0.iter().any(|l| {
                    let p: usize = l[1..].parse().expect("page number");
                    v.1.get(l) != Some(&truth[p])
                })
            })
            .count();
        assert_eq!(
            closed_by_server.load(Ordering::SeqCst),
            0,
            "the server closed readers during the burst ({wrong} of {CLIENTS} not exact yet)"
        );
        std::future::ready(wrong == 0)
    })
    .await;
    let v = app.get_json("/api/v1/counts?ids=r0,r1").await;
    assert_eq!(
        (v["r0"].as_u64(), v["r1"].as_u64()),
        (Some(truth[0]), Some(truth[1]))
    );
    for t in tasks {
        t.abort();
    }
    (app, dir)
}

/// A text frame whose header declares 1 GiB is answered 1009 from its
/// header while its payload streams in; the server buffers none of it and
/// keeps serving with exact counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_is_refused_from_its_header() {
    let (app, _dir) = spawn_app(&[]);
    let mut watcher = app.connect("watcher").await;
    watcher.subscribe(&["big"]).await;
    assert_eq!(watcher.next_update().await, counts(&[("big", 0)]));
    let before = rss_kib();
    let s = raw_upgrade(app.addr, "big", None).await;
    watcher.wait_for(&counts(&[("big", 1)])).await;
    let (mut r, mut w) = s.into_split();
    // Stream up to 512 MiB of the declared 1 GiB, as fast as the server takes it.
    let writer = tokio::spawn(async move {
        w.write_all(&client_header(0x1, true, 1 << 30)).await?;
        let chunk = vec![b'x'; 1 << 16];
        for _ in 0..(512 << 4) {
            w.write_all(&chunk).await?;
        }
        std::io::Result::Ok(())
    });
    let peak = Arc::new(AtomicU64::new(before));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_kib(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let code = tokio::time::timeout(PATIENCE, read_close(&mut r))
        .await
        .expect("the server answers while the payload still streams");
    writer.abort();
    tokio::time::sleep(Duration::from_millis(50)).await;
    sampler.abort();
    let peak = peak.load(Ordering::Relaxed).max(rss_kib());
    assert_eq!(code, Some(1009));
    // Generous: other tests run in this process at the same time.
    assert!(
        peak.saturating_sub(before) < 64 * 1024,
        "RSS grew {} KiB while a 1 GiB frame streamed in",
        peak.saturating_sub(before)
    );
    watcher.wait_for(&counts(&[("big", 0)])).await;
    assert_eq!(app.get("/healthz").await.0, 200);
}

/// A text frame that is not valid UTF-8 closes with 1007 (RFC 6455 §7.4.1),
/// whole or reassembled from fragments.
#[tokio::test]
async fn invalid_utf8_closes_with_1007() {
    let (app, _dir) = spawn_app(&[]);
    let mut watcher = app.connect("watcher").await;
    watcher.subscribe(&["u"]).await;
    watcher.next_update().await;
    for frames in [
        vec![client_frame(0x1, b"{\"type\":\"\xff\xfe\"}")],
        vec![
            [client_header(0x1, false, 2), b"{\xc3".to_vec()].concat(),
            client_frame(0x0, b"\x28}"),
        ],
    ] {
        let mut s = raw_upgrade(app.addr, "u", None).await;
        watcher.wait_for(&counts(&[("u", 1)])).await;
        for f in frames {
            s.write_all(&f).await.expect("frame");
        }
        let code = tokio::time::timeout(PATIENCE, read_close(&mut s))
            .await
            .expect("a close in time");
        assert_eq!(code, Some(1007));
        watcher.wait_for(&counts(&[("u", 0)])).await;
    }
}

/// After the client's Close, the server answers and closes the TCP
/// connection itself at once (no timer runs on that path: `close_timeout`
/// is an hour here). When the server closes first and the client never
/// answers, the TCP connection is closed after `close_timeout`.
#[tokio::test]
async fn closes_end_the_tcp_connection_promptly() {
    let (app, _dir) = spawn_app(&[("WEBSOCKET__CLOSE_TIMEOUT", "60s")]);
    let mut s = raw_upgrade(app.addr, "c", None).await;
    let mut payload = 1000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"bye");
    s.write_all(&client_frame(0x8, &payload))
        .await
        .expect("close");
    let code = tokio::time::timeout(PATIENCE, read_close(&mut s))
        .await
        .expect("the Close answer in time");
    assert_eq!(code, Some(1000), "the client's code is echoed");
    let mut rest = [0u8; 64];
    let n = tokio::time::timeout(PATIENCE, s.read(&mut rest))
        .await
        .expect("the server closes the TCP connection, not waiting out close_timeout");
    assert!(matches!(n, Ok(0) | Err(_)), "end of stream, got {n:?}");

    // Server-initiated (liveness: this client never answers pings) with a
    // short grace: the Close comes, no answer is sent, the TCP connection ends.
    let (app, _dir) = spawn_app(&[("WEBSOCKET__CLOSE_TIMEOUT", "200ms")]);
    let mut s = raw_upgrade(app.addr, "d", None).await;
    let code = tokio::time::timeout(PATIENCE, read_close(&mut s))
        .await
        .expect("the liveness close in time");
    assert_eq!(code, Some(1000));
    let n = tokio::time::timeout(PATIENCE, async {
        loop {
            match s.read(&mut rest).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(n.is_ok(), "the TCP connection outlived close_timeout");
}

/// A client that keeps sending but stops reading fills its socket; the
/// server keeps at most the merged latest values for it (memory stays
/// bounded while it is open) and closes it once its socket took no bytes
/// for `client_timeout`. Others are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_and_stays_bounded() {
    let (app, _dir) = spawn_app(&[("WEBSOCKET__CLIENT_TIMEOUT", "1s")]);
    let mut watcher = app.connect("watcher").await;
    watcher.subscribe(&["sink"]).await;
    watcher.next_update().await;
    let before = rss_kib();
    let s = raw_upgrade(app.addr, "sink", Some(4096)).await;
    watcher.wait_for(&counts(&[("sink", 1)])).await;
    let (_r, mut w) = s.into_split();
    // Each subscribe asks for a ~50 KB full update; the client reads none.
    let links: Vec<String> = (0..250).map(|i| format!("{i:0>200}")).collect();
    let msg = serde_json::json!({"type": "subscribe", "links": links}).to_string();
    let frame = client_frame(0x1, msg.as_bytes());
    let sender = tokio::spawn(async move {
        loop {
            if w.write_all(&frame).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let peak = std::cell::Cell::new(before);
    eventually(
        "the client whose socket takes nothing is closed",
        || async {
            peak.set(peak.get().max(rss_kib()));
            app.get_json("/api/v1/counts?ids=sink").await["sink"] == 0
        },
    )
    .await;
    let peak = peak.get();
    sender.abort();
    assert!(
        peak.saturating_sub(before) < 64 * 1024,
        "RSS grew {} KiB for one client that does not read",
        peak.saturating_sub(before)
    );
    watcher.wait_for(&counts(&[("sink", 0)])).await;
    let mut fresh = app.connect("fresh").await;
    fresh.subscribe(&["sink"]).await;
    assert_eq!(fresh.next_update().await, counts(&[("sink", 0)]));
}

/// Liveness counts complete frames: a client that dribbles one frame in a
/// byte at a time (never finishing it, never answering pings) is closed
/// after `client_timeout` like a silent one, and stops counting.
#[tokio::test]
async fn a_frame_dribbled_byte_by_byte_does_not_keep_a_connection_alive() {
    let (app, _dir) = spawn_app(&[]);
    let mut watcher = app.connect("watcher").await;
    watcher.subscribe(&["drip"]).await;
    watcher.next_update().await;
    let mut s = raw_upgrade(app.addr, "drip", None).await;
    watcher.wait_for(&counts(&[("drip", 1)])).await;
    s.write_all(&client_header(0x1, true, 1000))
        .await
        .expect("header");
    let dripper = tokio::spawn(async move {
        // 1000 bytes at 10/s: far longer than the test's 600 ms client_timeout.
        for _ in 0..1000 {
            if s.write_all(b"x").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    watcher.wait_for(&counts(&[("drip", 0)])).await;
    dripper.abort();
}
