//! The counter's publish policy: leading edge, then coalesced to at most one
//! publish per `counter.broadcast_interval`.
//!
//! The interval is set to 10 s so that "at once" (well under it) and
//! "coalesced" (not before it) are far apart; the bounds are generous.

use std::time::Duration;

use link_counter::{
    counter::RoomCount,
    protocol::{PageId, Tally},
};

use crate::helpers::{counts, spawn_app};

/// Far longer than any scheduling delay, far shorter than the interval.
const SOON: Duration = Duration::from_secs(3);
/// How long a coalesced change is checked to be held back.
const HELD: Duration = Duration::from_secs(2);
/// The interval plus generous slack.
const EVENTUALLY: Duration = Duration::from_secs(15);

fn long_interval() -> [(&'static str, &'static str); 1] {
    [("COUNTER__BROADCAST_INTERVAL", "10s")]
}

/// On a quiet server the first change reaches a subscriber at once; a second
/// change right after is held until an interval after the first publish, and
/// then arrives with the latest value.
#[tokio::test]
async fn first_change_is_published_at_once_later_ones_are_coalesced() {
    let (app, _dir) = spawn_app(&long_interval());
    let mut obs = app.connect("obs").await;
    obs.subscribe(&["x"]).await;
    assert_eq!(obs.next_update().await, counts(&[("x", 0)]));

    let _x1 = app.connect("x").await;
    let first = tokio::time::timeout(SOON, obs.next_update())
        .await
        .expect("the first change is published at once, not on the next tick");
    assert_eq!(first, counts(&[("x", 1)]));

    let _x2 = app.connect("x").await;
    let _x3 = app.connect("x").await;
    obs.expect_silence(HELD).await;
    let later = tokio::time::timeout(EVENTUALLY, obs.next_update())
        .await
        .expect("coalesced changes are published an interval later");
    assert_eq!(later, counts(&[("x", 3)]));
}

/// A burst of changes queued at the counter at once produces one publish at
/// once and one coalesced publish an interval later, not one per change.
#[tokio::test]
async fn a_burst_is_one_publish_now_and_one_an_interval_later() {
    let (app, _dir) = spawn_app(&long_interval());
    let mut obs = app.connect("obs").await;
    obs.subscribe(&["y"]).await;
    assert_eq!(obs.next_update().await, counts(&[("y", 0)]));

    // Reports as y's room would send them (there is no real room for y).
    let page = PageId::parse("y").unwrap();
    for count in 1..=1000 {
        app.counter.do_send(RoomCount {
            page: page.clone(),
            tally: Tally {
                connections: count,
                visitors: count,
            },
            opened: 1,
        });
    }
    let first = tokio::time::timeout(SOON, obs.next_update())
        .await
        .expect("the first change of the burst is published at once");
    assert_eq!(first, counts(&[("y", 1)]));
    obs.expect_silence(HELD).await;
    let later = tokio::time::timeout(EVENTUALLY, obs.next_update())
        .await
        .expect("the rest of the burst is published an interval later");
    assert_eq!(later, counts(&[("y", 1000)]));
    obs.expect_silence(Duration::from_millis(500)).await;
}
