//! Panics in the actors are contained: a real `panic!()` in a handler of the
//! counter, a room or a shard (test hooks) is counted in
//! `link_counter_actor_panics_total{actor}`, the actor recovers from its
//! source of truth, every subscriber converges to the true counts without
//! ever being shown more, new connections are served and `/readyz` is ready
//! again. Metrics are process-wide (other tests run beside these): each test
//! compares the delta of its own actor's label.

use std::collections::BTreeMap;

use actix::MailboxError;

use link_counter::{
    counter::InjectPanic,
    protocol::PageId,
    room::PanicRoom,
    shard::{PanicShard, RoomOf},
};

use crate::helpers::{counts, eventually, http_get, spawn_app, Client, TestApp, PATIENCE};

/// `link_counter_actor_panics_total{actor}` as the admin listener serves it.
async fn panics(app: &TestApp, actor: &str) -> f64 {
    let admin = app
        .admin
        .expect("the test settings bind the admin listener");
    let (status, text) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    let series = format!("link_counter_actor_panics_total{{actor=\"{actor}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series)?.parse().ok())
        .expect("the panics series is exposed from the start")
}

/// Waits until the panic metric of `actor` passed `before`, then until
/// `/readyz` answers ready.
async fn contained(app: &TestApp, actor: &str, before: f64) {
    eventually(&format!("the {actor} panic counted"), || async {
        panics(app, actor).await > before
    })
    .await;
    eventually("/readyz ready again", || async {
        app.get("/readyz").await.0 == 200
    })
    .await;
}

/// Reads `client`'s updates until both figures equal `truth` on its ids,
/// asserting after every update that no figure went above `ceiling`.
async fn converge(client: &mut Client, truth: &[(&str, u64)], ceiling: u64) {
    let want: BTreeMap<String, u64> = counts(truth);
    client
        .wait_for_tally(&want, &want, (ceiling, ceiling))
        .await;
}

/// The counter panics in the middle of a handler after scrambling its
/// state: it restarts, rebuilds from the rooms, and counts stay exact.
#[tokio::test]
async fn a_counter_panic_is_contained_and_counts_rebuilt() {
    let (app, _dir) = spawn_app(&[]);
    let mut obs = app.connect("cp-obs").await;
    obs.subscribe_visitors(&["cp-1", "cp-2", "cp-3"]).await;
    let mut held = vec![
        app.connect("cp-1").await,
        app.connect("cp-1").await,
        app.connect("cp-2").await,
    ];
    converge(&mut obs, &[("cp-1", 2), ("cp-2", 1), ("cp-3", 0)], 2).await;

    let before = panics(&app, "counter").await;
    // The asker of the panicked handler gets an error, not a wait.
    let asked = tokio::time::timeout(PATIENCE, app.counter.send(InjectPanic)).await;
    assert!(matches!(asked, Ok(Err(MailboxError::Closed))), "{asked:?}");
    contained(&app, "counter", before).await;
    // Whatever the panic scrambled is rebuilt from the rooms.
    converge(&mut obs, &[("cp-1", 2), ("cp-2", 1), ("cp-3", 0)], 2).await;

    // Changes after the restart reach the subscriber; new connections work.
    held.push(app.connect("cp-3").await);
    held.remove(0).close().await;
    converge(&mut obs, &[("cp-1", 1), ("cp-2", 1), ("cp-3", 1)], 2).await;
    let mut late = app.connect("cp-late").await;
    late.subscribe(&["cp-1", "cp-3"]).await;
    late.wait_for(&counts(&[("cp-1", 1), ("cp-3", 1)])).await;
    assert_eq!(
        app.get_json("/api/v1/counts?ids=cp-1,cp-2,cp-3").await,
        serde_json::json!({"cp-1": 1, "cp-2": 1, "cp-3": 1})
    );
}

/// A room panics after scrambling what it derives from its connections
/// (visitors, followed links, cache): it rebuilds from its connection list
/// without closing anyone; its own subscriber and others converge.
#[tokio::test]
async fn a_room_panic_is_contained_and_the_room_rebuilt() {
    let (app, _dir) = spawn_app(&[]);
    let mut obs = app.connect("rp-obs").await;
    obs.subscribe_visitors(&["rp-1", "rp-2"]).await;
    // The room that panics holds two tabs of one visitor and a subscriber.
    let mut inside = app.connect_as("rp-1", "visitor-one").await;
    inside.subscribe_visitors(&["rp-1", "rp-2"]).await;
    let mut held = vec![
        app.connect_as("rp-1", "visitor-one").await,
        app.connect("rp-2").await,
    ];
    let truth = [("rp-1", 2), ("rp-2", 1)];
    let want = counts(&truth);
    let visitors = counts(&[("rp-1", 1), ("rp-2", 1)]);
    obs.wait_for_tally(&want, &visitors, (2, 2)).await;
    inside.wait_for_tally(&want, &visitors, (2, 2)).await;

    let (_, shard) = app.shards.locate("rp-1").expect("shards hosted");
    let room = shard
        .send(RoomOf(PageId::parse("rp-1").unwrap()))
        .await
        .expect("shard answers")
        .expect("rp-1 has a room");
    let before = panics(&app, "room").await;
    room.do_send(PanicRoom);
    contained(&app, "room", before).await;

    // Nobody was closed; new changes reach both subscribers, the one inside
    // the rebuilt room included, and its visitors are recounted.
    held.push(app.connect_as("rp-1", "visitor-two").await);
    held.remove(1).close().await;
    let want = counts(&[("rp-1", 3), ("rp-2", 0)]);
    let visitors = counts(&[("rp-1", 2), ("rp-2", 0)]);
    obs.wait_for_tally(&want, &visitors, (3, 3)).await;
    inside.wait_for_tally(&want, &visitors, (3, 3)).await;
    let api = app
        .get_json("/api/v1/counts?ids=rp-1,rp-2&visitors=true")
        .await;
    assert_eq!(
        api,
        serde_json::json!({"connections": {"rp-1": 3, "rp-2": 0}, "visitors": {"rp-1": 2, "rp-2": 0}})
    );
    // The rebuilt room still follows links for new subscriptions.
    inside.subscribe(&["rp-3"]).await;
    let _v = app.connect("rp-3").await;
    inside.wait_for(&counts(&[("rp-3", 1)])).await;
}

/// A shard panics after scrambling its bookkeeping of its rooms: it keeps
/// its page → room map, re-verifies every room, and keeps routing, listing
/// idle rooms and stopping them.
#[tokio::test]
async fn a_shard_panic_is_contained_and_its_rooms_reverified() {
    let (app, _dir) = spawn_app(&[("ROOM__IDLE_TIMEOUT", "300ms")]);
    let mut obs = app.connect("sp-obs").await;
    obs.subscribe_visitors(&["sp-1", "sp-2"]).await;
    let mut held = vec![app.connect("sp-1").await, app.connect("sp-2").await];
    converge(&mut obs, &[("sp-1", 1), ("sp-2", 1)], 2).await;

    let (_, shard) = app.shards.locate("sp-1").expect("shards hosted");
    let before = panics(&app, "shard").await;
    shard.do_send(PanicShard);
    contained(&app, "shard", before).await;

    held.push(app.connect("sp-2").await);
    held.remove(0).close().await;
    converge(&mut obs, &[("sp-1", 0), ("sp-2", 2)], 2).await;
    // The emptied room is listed idle and stopped again.
    eventually("sp-1's idle room stopped", || async {
        let room = shard.send(RoomOf(PageId::parse("sp-1").unwrap())).await;
        room.expect("shard answers").is_none()
    })
    .await;
    // And the page works again at once.
    held.push(app.connect("sp-1").await);
    converge(&mut obs, &[("sp-1", 1), ("sp-2", 2)], 2).await;
}
