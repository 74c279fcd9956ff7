//! Timers, cleanup, HTTP API and graceful shutdown.

use std::time::Duration;

use link_counter::{
    counter::{GetStatus, SweepNow, Tracked},
    protocol::PageId,
    room::CloseAll,
    shard::CountRooms,
    storage::{Storage, StorageError},
};

use crate::helpers::{counts, eventually, http_raw, spawn_app};

async fn live_rooms(app: &crate::helpers::TestApp) -> usize {
    let mut n = 0;
    for s in app.shards.all() {
        n += s.send(CountRooms).await.expect("shard answers");
    }
    n
}

/// A room with no connections stops after `room.idle_timeout`; a room with
/// connections does not; a page whose room was evicted works again at once.
#[tokio::test]
async fn idle_rooms_are_evicted() {
    let (app, _dir) = spawn_app(&[("ROOM__IDLE_TIMEOUT", "200ms")]);
    let mut keep = app.connect("kept").await;
    keep.subscribe(&["gone"]).await;
    keep.next_update().await;
    let gone = app.connect("gone").await;
    keep.wait_for(&counts(&[("gone", 1)])).await;
    assert_eq!(live_rooms(&app).await, 2);
    gone.close().await;
    keep.wait_for(&counts(&[("gone", 0)])).await;
    eventually("the empty room is evicted", || async {
        live_rooms(&app).await == 1
    })
    .await;
    // The kept room stays through several idle periods.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(live_rooms(&app).await, 1);
    // Coming back creates a fresh room, and subscribers still hear of it.
    let _again = app.connect("gone").await;
    keep.wait_for(&counts(&[("gone", 1)])).await;
    assert_eq!(live_rooms(&app).await, 2);
}

/// Pages with no connections and no subscribers are forgotten (by the
/// snapshot after `room.idle_timeout`, else by the sweep), never a page that
/// still has subscribers (whose viewers must keep reaching them); the sweep
/// expires room records after `room.storage_ttl` of inactivity.
#[tokio::test]
async fn sweep_keeps_pages_with_subscribers() {
    let (app, _dir) = spawn_app(&[
        ("ROOM__IDLE_TIMEOUT", "100ms"),
        ("ROOM__STORAGE_TTL", "300ms"),
    ]);
    // "watched" has a subscriber but no viewers; "lonely" had a viewer and nobody follows it.
    let mut fan = app.connect("fan").await;
    fan.subscribe(&["watched"]).await;
    assert_eq!(fan.next_update().await, counts(&[("watched", 0)]));
    let mut lonely = app.connect("lonely").await;
    lonely.subscribe(&["elsewhere"]).await;
    lonely.next_update().await;
    lonely.close().await;
    eventually("lonely's record written", || async {
        app.storage.load_room("lonely").ok().flatten().is_some()
    })
    .await;
    let tracked = |pages: &[&str]| {
        app.counter.send(Tracked(
            pages.iter().map(|p| PageId::parse(p).unwrap()).collect(),
        ))
    };
    eventually("lonely and elsewhere forgotten", || async {
        tracked(&["lonely", "elsewhere"]).await.expect("counter") == [false, false]
    })
    .await;
    assert_eq!(
        tracked(&["fan", "watched"]).await.expect("counter"),
        [true, true]
    );

    let before = app.counter.send(GetStatus).await.expect("status").pages;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let report = app.counter.send(SweepNow).await.expect("sweep");
    let after = app.counter.send(GetStatus).await.expect("status").pages;
    assert_eq!(before - after, report.pages_dropped);
    assert_eq!(
        tracked(&["fan", "watched"]).await.expect("counter"),
        [true, true]
    );
    assert!(report.rooms_expired >= 1, "{report:?}");
    assert!(app.storage.load_room("lonely").expect("read").is_none());
    // The page fan is still live and its room record kept.
    assert!(app.storage.load_room("fan").expect("read").is_some());

    // The swept page's subscriber still gets updates.
    let _viewer = app.connect("watched").await;
    assert_eq!(fan.next_update().await, counts(&[("watched", 1)]));
    // Stats of the swept page are still served from storage.
    let info = app.get_json("/api/v1/pages/lonely").await;
    assert_eq!(info["total_connections"], 1);
    assert_eq!(info["connections"], 0);
}

/// A room's record (its links, its last activity) is written when its own
/// connections come, go or subscribe, not each time a page it follows
/// changes its count: otherwise every open page linking to a busy one would
/// rewrite its record every snapshot interval.
#[tokio::test]
async fn a_followed_count_changing_does_not_rewrite_the_room_record() {
    let (app, _dir) = spawn_app(&[("STORAGE__SNAPSHOT_INTERVAL", "50ms")]);
    let mut reader = app.connect("reader").await;
    reader.subscribe(&["busy"]).await;
    assert_eq!(reader.next_update().await, counts(&[("busy", 0)]));
    let record = || async {
        app.storage
            .load_room("reader")
            .expect("read")
            .map(|r| (r.links, r.last_active_ms))
    };
    // A record exists only once a save found the page's links, so it comes
    // from the save after the subscribe: the last one the room's own
    // activity (join, subscribe) asked for.
    eventually("reader's record written", || async {
        record().await.is_some()
    })
    .await;
    let (links, written) = record().await.expect("record");
    assert_eq!(links, vec![PageId::parse("busy").unwrap()]);

    for _ in 0..4 {
        let viewer = app.connect("busy").await;
        reader.wait_for(&counts(&[("busy", 1)])).await;
        viewer.close().await;
        reader.wait_for(&counts(&[("busy", 0)])).await;
        // Several snapshot intervals with the changed count in the room.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(record().await.expect("record").1, written);

    // Its own connections still write it.
    let second = app.connect("reader").await;
    eventually("a join rewrites the record", || async {
        record().await.expect("record").1 > written
    })
    .await;
    drop(second);
}

/// The sweep also runs on its own timer (`counter.sweep_interval`).
#[tokio::test]
async fn sweep_runs_on_its_timer() {
    let (app, _dir) = spawn_app(&[("COUNTER__SWEEP_INTERVAL", "100ms")]);
    app.connect("brief").await.close().await;
    eventually("page swept from memory", || async {
        app.counter.send(GetStatus).await.expect("status").pages == 0
    })
    .await;
}

/// The read-only HTTP API answers per PROTOCOL.md and refuses bad input.
#[tokio::test]
async fn http_api() {
    let (app, _dir) = spawn_app(&[("WEBSOCKET__MAX_LINKS_PER_SUBSCRIBE", "3")]);
    let _v1 = app.connect("a").await;
    let _v2 = app.connect("a").await;
    let _v3 = app.connect("with,comma").await;
    // Each room reports its joins to the counter on its own: wait for both.
    crate::lifecycle::eventually("counts visible", || async {
        app.get_json("/api/v1/counts?ids=a,b&id=with%2Ccomma").await
            == serde_json::json!({"a": 2, "b": 0, "with,comma": 1})
    })
    .await;
    let info = app.get_json("/api/v1/pages/a").await;
    assert_eq!(info["id"], "a");
    assert_eq!(info["connections"], 2);
    assert_eq!(info["peak_connections"], 2);
    assert_eq!(info["total_connections"], 2);
    assert!(
        info["peak_at"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{info}"
    );
    assert!(info["last_active"].as_str().is_some(), "{info}");

    let (status, body) = app.get("/api/v1/counts?ids=a,b,c,d").await;
    assert_eq!(status, 400);
    assert!(body.contains("too_many_links"));
    let (status, body) = app.get("/api/v1/counts?ids=a%0Ab").await;
    assert_eq!(status, 400);
    assert!(body.contains("invalid_page_id"));
    assert_eq!(app.get("/api/v1/pages/%FF").await.0, 400);
    assert_eq!(app.get("/healthz").await.0, 200);
    assert_eq!(app.get("/readyz").await.0, 200);
    let (status, body) = app.get("/nope").await;
    assert_eq!(status, 404);
    assert!(body.contains("/parties/page/"));
    // A plain GET to the WebSocket endpoint is told what it is.
    let (status, body) = app.get("/parties/page/a").await;
    assert_eq!(status, 400);
    assert!(body.contains("WebSocket"), "{body}");
    // No endpoint can set a count.
    let (status, _) = http_raw(
        app.addr,
        "POST /api/v1/counts HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\nConnection: close\r\n\r\n{\"a\":9}",
    )
    .await;
    assert!(status == 404 || status == 405, "{status}");
    assert_eq!(app.get_json("/api/v1/counts?ids=a").await["a"], 2);
}

/// Graceful shutdown closes every WebSocket with 1001, writes the final
/// snapshot and flushes: the stats are on disk afterwards.
#[tokio::test]
async fn graceful_shutdown_sends_1001_and_flushes() {
    let (app, dir) = spawn_app(&[("STORAGE__SNAPSHOT_INTERVAL", "1h")]);
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(app.connect("bye").await);
    }
    eventually("all counted", || async {
        app.get_json("/api/v1/counts?ids=bye").await["bye"] == 5
    })
    .await;
    let storage = app.storage.clone();
    let addr = app.addr;
    let report = app.shutdown().await;
    assert_eq!(report.cut, 0);
    for c in &mut clients {
        assert_eq!(c.expect_close().await, 1001);
    }
    drop(storage);
    // The listener is closed.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    // The final snapshot reached disk even though the interval is an hour.
    // sled's background flusher releases the directory's lock shortly
    // after the last handle is dropped.
    let reopened = eventually("the store to reopen (its lock released)", || async {
        match Storage::open(dir.path(), 8 << 20) {
            Ok(s) => Some(s),
            Err(StorageError::Locked { .. }) => None,
            Err(e) => panic!("store reopens: {e}"),
        }
    })
    .await;
    let stats = reopened
        .load_stats("bye")
        .expect("read")
        .expect("stats saved");
    assert_eq!(stats.total_connections, 5);
    assert_eq!(stats.peak_connections, 5);
}

/// Shutdown reaches sessions through their rooms: once the shards are told to
/// close, every open connection gets 1001, and so does a connection whose
/// `Join` reaches a shard after that, whether its page still has a room (the
/// room tells it) or not (the shard tells it, creating nothing). Counts stay
/// exact throughout.
#[tokio::test]
async fn closing_shards_close_late_joiners_with_1001() {
    let (app, _dir) = spawn_app(&[]);
    let mut early = app.connect("early").await;
    early.subscribe(&["early"]).await;
    early.wait_for(&counts(&[("early", 1)])).await;
    for s in app.shards.all() {
        s.send(CloseAll).await.expect("shard answers");
    }
    assert_eq!(early.expect_close().await, 1001);
    // Only the shards were told: the HTTP side still upgrades, so these joins
    // reach closing shards.
    let mut same_page = app.connect("early").await;
    assert_eq!(same_page.expect_close().await, 1001);
    let mut new_page = app.connect("never-seen-before").await;
    assert_eq!(new_page.expect_close().await, 1001);
    eventually("every page counts 0 again", || async {
        let c = app
            .get_json("/api/v1/counts?ids=early,never-seen-before")
            .await;
        c["early"] == 0 && c["never-seen-before"] == 0
    })
    .await;
    // No room was created for the page that had none (an empty room would
    // live for `room.idle_timeout`, 60 s).
    assert!(
        live_rooms(&app).await <= 1,
        "a closing shard created a room"
    );
}
