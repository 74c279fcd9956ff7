//! Bounded under floods of page ids: idle rooms and idle pages give way to
//! live ones at their caps (least recently active first), and stored records
//! stay within `storage.max_records`.

use std::time::Duration;

use link_counter::{counter::Tracked, protocol::PageId, shard::RoomOf};

use crate::helpers::{counts, eventually, spawn_app, TestApp};

fn idle_pages(app: &TestApp) -> Vec<String> {
    app.shards
        .idle_pages()
        .iter()
        .map(|p| p.to_string())
        .collect()
}

async fn has_room(app: &TestApp, page: &str) -> bool {
    let shard = app.shards.for_page(page).expect("shards ready").clone();
    shard
        .send(RoomOf(PageId::parse(page).unwrap()))
        .await
        .expect("shard answers")
        .is_some()
}

/// Visits `page` once (connect, close) and waits until its room is listed idle.
async fn visit(app: &TestApp, page: &str) {
    app.connect(page).await.close().await;
    eventually(&format!("{page}'s room listed idle"), || async {
        idle_pages(app).iter().any(|p| p == page)
    })
    .await;
}

async fn tracked(app: &TestApp, pages: &[&str]) -> Vec<bool> {
    app.counter
        .send(Tracked(
            pages.iter().map(|p| PageId::parse(p).unwrap()).collect(),
        ))
        .await
        .expect("counter answers")
}

/// At `limits.max_rooms`, a new page stops the least recently active room
/// with no connection (on whichever shard it lives) instead of being refused;
/// it is refused only when every room has a live connection. Counts of live
/// pages stay exact throughout.
#[tokio::test]
async fn idle_rooms_give_way_to_new_pages_least_recently_active_first() {
    let (app, _dir) = spawn_app(&[("LIMITS__MAX_ROOMS", "4"), ("ROOM__IDLE_TIMEOUT", "1h")]);
    let mut watcher = app.connect("watcher").await;
    watcher.subscribe(&["live"]).await;
    watcher.next_update().await;
    let _live = app.connect("live").await;
    watcher.wait_for(&counts(&[("live", 1)])).await;

    // Two pages visited and left: their rooms are idle, "old" first.
    visit(&app, "old").await;
    visit(&app, "newer").await;
    assert_eq!(idle_pages(&app), ["old", "newer"]);

    // A new page at the cap is let in; the least recently active idle room goes.
    let mut fresh = app.connect("fresh").await;
    fresh.subscribe(&["live"]).await;
    assert_eq!(fresh.next_update().await, counts(&[("live", 1)]));
    eventually("old's room stopped", || async {
        !has_room(&app, "old").await
    })
    .await;
    assert!(has_room(&app, "newer").await);
    assert_eq!(idle_pages(&app), ["newer"]);

    // "newer" comes back: busy again, off the idle list. Every room is live
    // now, so one more page is refused (overloaded, try again later).
    let _newer = app.connect("newer").await;
    eventually("newer busy", || async { idle_pages(&app).is_empty() }).await;
    let mut refused = app.connect("one-too-many").await;
    let v = refused.next_json().await;
    assert_eq!(
        (v["type"].as_str(), v["code"].as_str()),
        (Some("error"), Some("overloaded")),
        "{v}"
    );
    assert_eq!(refused.expect_close().await, 1013);

    // When one of them is left, a new page gets in again.
    drop(fresh);
    eventually("fresh idle", || async { idle_pages(&app) == ["fresh"] }).await;
    let mut again = app.connect("another").await;
    again.subscribe(&["live"]).await;
    assert_eq!(again.next_update().await, counts(&[("live", 1)]));
    eventually("fresh's room stopped", || async {
        !has_room(&app, "fresh").await
    })
    .await;

    // Live counts never moved.
    watcher.expect_silence(Duration::from_millis(200)).await;
    let live = app.get_json("/api/v1/counts?ids=live,newer,another").await;
    assert_eq!(
        live,
        serde_json::json!({"live": 1, "newer": 1, "another": 1})
    );
}

/// At `limits.max_pages`, links to new pages push out the least recently
/// active pages that have no connection and no subscriber (their stats are
/// saved first and still served); links are refused only when no page is idle.
#[tokio::test]
async fn idle_pages_give_way_to_new_links_least_recently_active_first() {
    let (app, _dir) = spawn_app(&[
        ("LIMITS__MAX_ROOMS", "8"),
        ("LIMITS__MAX_PAGES", "8"),
        ("ROOM__IDLE_TIMEOUT", "1h"),
    ]);
    // Six pages visited in turn (distinct activity times), then left.
    let visited = ["p1", "p2", "p3", "p4", "p5", "p6"];
    for p in visited {
        visit(&app, p).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(tracked(&app, &visited).await, [true; 6]);

    // 6 pages + the reader's + 3 links = 10 > 8: the two least recently active go.
    let mut reader = app.connect("reader").await;
    reader.subscribe(&["a", "b", "c"]).await;
    assert_eq!(
        reader.next_update().await,
        counts(&[("a", 0), ("b", 0), ("c", 0)])
    );
    assert_eq!(
        tracked(&app, &visited).await,
        [false, false, true, true, true, true]
    );
    // Their stats were saved before they went.
    let info = app.get_json("/api/v1/pages/p1").await;
    assert_eq!(info["total_connections"], 1, "{info}");

    // Every page followed: nothing is idle, so a link to a new page is refused.
    reader
        .subscribe(&["p3", "p4", "p5", "p6", "a", "b", "c"])
        .await;
    reader.next_update().await;
    let mut other = app.connect("reader").await;
    other.subscribe(&["z"]).await;
    let v = other.next_json().await;
    assert_eq!(
        (v["type"].as_str(), v["code"].as_str()),
        (Some("error"), Some("overloaded")),
        "{v}"
    );
    assert!(other.next_update().await.is_empty());

    // A page that went is counted correctly when it comes back.
    other.subscribe(&["p3"]).await;
    other.next_update().await;
    reader.subscribe(&["p1"]).await; // frees p4..p6, a..c as links; p1 is new
    assert_eq!(reader.next_update().await, counts(&[("p1", 0)]));
    let _v = app.connect("p1").await;
    reader.wait_for(&counts(&[("p1", 1)])).await;
    let info = app.get_json("/api/v1/pages/p1").await;
    assert_eq!(info["total_connections"], 2, "{info}");
}

/// `storage.max_records` holds on disk after each snapshot: the least
/// recently active stats and room records go first. A page whose room was
/// stopped (room cap) and whose records were deleted starts afresh when
/// visited again; one still within the cap keeps its stats and links.
#[tokio::test]
async fn stored_records_stay_within_max_records() {
    let (app, _dir) = spawn_app(&[
        ("STORAGE__MAX_RECORDS", "3"),
        ("LIMITS__MAX_ROOMS", "3"),
        ("ROOM__IDLE_TIMEOUT", "1h"),
    ]);
    let pages = ["q1", "q2", "q3", "q4", "q5", "q6"];
    for p in pages {
        let mut c = app.connect(p).await;
        c.subscribe(&["t"]).await;
        c.next_update().await;
        c.close().await;
        // Each page's room record is written (at the latest when its room
        // is stopped for the next page) before the next page is visited.
        eventually(&format!("{p}'s records written"), || async {
            app.storage.load_room(p).ok().flatten().is_some()
                && app.storage.load_stats(p).ok().flatten().is_some()
        })
        .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eventually("records trimmed to 3", || async {
        app.storage.stats_records() <= 3 && app.storage.room_records() <= 3
    })
    .await;
    for (i, p) in pages.iter().enumerate() {
        let kept = i >= 3;
        let stats = app.storage.load_stats(p).expect("read");
        let room = app.storage.load_room(p).expect("read");
        assert_eq!((stats.is_some(), room.is_some()), (kept, kept), "{p}");
    }
    assert_eq!(app.storage.stats_records(), 3);
    assert_eq!(app.storage.room_records(), 3);

    // Visited again: q6 (kept) continues its stats and links; q1 (deleted) starts afresh.
    let _q6 = app.connect("q6").await;
    crate::lifecycle_wait(&app, "q6", 1).await;
    let info = app.get_json("/api/v1/pages/q6").await;
    assert_eq!(info["total_connections"], 2, "{info}");
    assert_eq!(info["links"], serde_json::json!(["t"]), "{info}");
    let mut watcher = app.connect("w").await;
    watcher.subscribe(&["q1"]).await;
    assert_eq!(watcher.next_update().await, counts(&[("q1", 0)]));
    let _q1 = app.connect("q1").await;
    watcher.wait_for(&counts(&[("q1", 1)])).await;
    let info = app.get_json("/api/v1/pages/q1").await;
    assert_eq!(info["total_connections"], 1, "{info}");
    assert_eq!(info["links"], serde_json::json!([]), "{info}");
}

/// Past `limits.max_idle_rooms`, the least recently active idle rooms stop at
/// once, long before `room.idle_timeout`; rooms with connections never do.
#[tokio::test]
async fn idle_rooms_past_their_cap_stop_at_once() {
    let (app, _dir) = spawn_app(&[
        ("LIMITS__MAX_IDLE_ROOMS", "2"),
        ("ROOM__IDLE_TIMEOUT", "1h"),
    ]);
    let _held = app.connect("held").await;
    for p in ["i1", "i2", "i3", "i4"] {
        app.connect(p).await.close().await;
    }
    eventually("two idle rooms left, the most recent", || async {
        idle_pages(&app) == ["i3", "i4"]
    })
    .await;
    eventually("i1 and i2 stopped", || async {
        !has_room(&app, "i1").await && !has_room(&app, "i2").await
    })
    .await;
    assert!(has_room(&app, "held").await);
    assert!(has_room(&app, "i4").await);
}
