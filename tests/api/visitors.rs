//! Distinct visitors: connections carrying a visitor id (`?visitor=…`) count
//! once per visitor and page, through real WebSocket clients; subscribers
//! that ask for it get a `visitors` map beside `connections`, others get
//! exactly the messages they got before visitors existed.

use link_counter::counter::{GetStatus, InjectFault};

use crate::helpers::{counts, eventually, spawn_app, Client, PATIENCE};

/// Visitor ids as the embed makes them (22 characters of `[A-Za-z0-9_-]`).
const ALICE: &str = "aLiCe_0123456789-abcde";
const BOB: &str = "bOb_0123456789-abcdefg";
const CAROL: &str = "cArOl_0123456789-abcde";

/// An observer on page `o` subscribed with `"visitors": true` to `links`,
/// its full update read and checked to carry both maps.
async fn observer(app: &crate::helpers::TestApp, links: &[&str]) -> Client {
    let mut o = app.connect("o").await;
    o.subscribe_visitors(links).await;
    let v = o.next_json().await;
    assert_eq!(v["type"], "update", "{v}");
    for map in ["connections", "visitors"] {
        let ids: Vec<&String> = v[map].as_object().expect(map).keys().collect();
        assert_eq!(ids.len(), links.len(), "{map} of the full update: {v}");
    }
    o
}

/// One visitor with three tabs of a page is three connections and one
/// visitor; closing two tabs keeps one visitor all along (the observer never
/// sees it drop to 0 or rise above 1), the last makes it 0. The HTTP API
/// answers the same figures.
#[tokio::test]
async fn one_visitor_with_three_tabs_is_three_connections_and_one_visitor() {
    let (app, _dir) = spawn_app(&[]);
    let mut o = observer(&app, &["p"]).await;
    assert_eq!(
        (o.shown.get("p"), o.shown_visitors.get("p")),
        (Some(&0), Some(&0))
    );

    let t1 = app.connect_as("p", ALICE).await;
    let t2 = app.connect_as("p", ALICE).await;
    let t3 = app.connect_as("p", ALICE).await;
    o.wait_for_tally(&counts(&[("p", 3)]), &counts(&[("p", 1)]), (3, 1))
        .await;
    assert_eq!(
        app.get_json("/api/v1/counts?ids=p&visitors=true").await,
        serde_json::json!({"connections": {"p": 3}, "visitors": {"p": 1}})
    );

    t1.close().await;
    t2.drop_abruptly();
    // While two tabs close, the one left keeps the visitor counted.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while o.shown.get("p") != Some(&1) {
        assert!(tokio::time::Instant::now() < deadline, "{:?}", o.shown);
        let v = o.next_json().await;
        assert_eq!(v["visitors"]["p"], 1, "an update while tabs close: {v}");
    }
    assert_eq!(o.shown_visitors.get("p"), Some(&1));

    t3.close().await;
    o.wait_for_tally(&counts(&[("p", 0)]), &counts(&[("p", 0)]), (1, 1))
        .await;
}

/// Alice twice on `p` and one more connection there (`third`: its visitor
/// id, or none); the observer sees 3 connections of 2 visitors.
async fn alice_twice_and(
    app: &crate::helpers::TestApp,
    o: &mut Client,
    third: Option<&str>,
) -> [Client; 3] {
    let a1 = app.connect_as("p", ALICE).await;
    let a2 = app.connect_as("p", ALICE).await;
    let c = match third {
        Some(id) => app.connect_as("p", id).await,
        None => app.connect("p").await,
    };
    o.wait_for_tally(&counts(&[("p", 3)]), &counts(&[("p", 2)]), (3, 2))
        .await;
    [a1, a2, c]
}

/// Two visitors with the same page open count 2 whatever their tabs; a
/// connection without a visitor id is a visitor of its own.
#[tokio::test]
async fn distinct_visitors_and_connections_without_an_id() {
    let (app, _dir) = spawn_app(&[]);
    let mut o = observer(&app, &["p"]).await;
    let [a1, a2, b1] = alice_twice_and(&app, &mut o, Some(BOB)).await;

    let anon1 = app.connect("p").await;
    let anon2 = app.connect("p").await;
    o.wait_for_tally(&counts(&[("p", 5)]), &counts(&[("p", 4)]), (5, 4))
        .await;

    a1.close().await;
    a2.close().await;
    o.wait_for_tally(&counts(&[("p", 3)]), &counts(&[("p", 3)]), (5, 4))
        .await;
    drop((b1, anon1, anon2));
    o.wait_for_tally(&counts(&[("p", 0)]), &counts(&[("p", 0)]), (3, 3))
        .await;
}

/// A subscriber with `"visitors": true` gets a full update with both maps,
/// then deltas of exactly the ids that changed (both figures of each); a new
/// subscribe without the flag switches it back to the plain form.
#[tokio::test]
async fn visitors_subscribers_get_full_then_exact_deltas() {
    let (app, _dir) = spawn_app(&[]);
    let _p = app.connect_as("p", ALICE).await;
    // p's room reports its join on its own: the counter has it before the
    // subscribe below asks (its answer is the first update, asserted exactly).
    crate::lifecycle_wait(&app, "p", 1).await;
    let mut o = app.connect("o").await;
    o.subscribe_visitors(&["q", "p"]).await;
    assert_eq!(
        o.next_text().await,
        r#"{"type":"update","connections":{"p":1,"q":0},"visitors":{"p":1,"q":0}}"#
    );

    let q1 = app.connect_as("q", BOB).await;
    assert_eq!(
        o.next_text().await,
        r#"{"type":"update","connections":{"q":1},"visitors":{"q":1}}"#
    );
    let q2 = app.connect_as("q", BOB).await;
    assert_eq!(
        o.next_text().await,
        r#"{"type":"update","connections":{"q":2},"visitors":{"q":1}}"#
    );
    let q3 = app.connect_as("q", CAROL).await;
    assert_eq!(
        o.next_text().await,
        r#"{"type":"update","connections":{"q":3},"visitors":{"q":2}}"#
    );

    o.subscribe(&["p", "q"]).await;
    assert_eq!(
        o.next_text().await,
        r#"{"type":"update","connections":{"p":1,"q":3}}"#
    );
    q3.close().await;
    assert_eq!(
        o.next_text().await,
        r#"{"type":"update","connections":{"q":2}}"#
    );
    drop((q1, q2));
}

/// A client that does not ask for visitors (here with PartySocket's `_pk`)
/// gets today's messages byte for byte, and nothing at all for a change of
/// the visitor figure alone. The publish interval is long, so that a tab of
/// one visitor closing and another visitor's tab opening land in one
/// coalesced publish: connections 2 -> 2, visitors 1 -> 2.
#[tokio::test]
async fn clients_without_the_flag_see_exactly_todays_messages() {
    let (app, _dir) = spawn_app(&[("COUNTER__BROADCAST_INTERVAL", "5s")]);
    let a1 = app.connect_as("p", ALICE).await;
    let _a2 = app.connect_as("p", ALICE).await;
    // The counter has both joins before the subscribe below asks.
    crate::lifecycle_wait(&app, "p", 2).await;
    let mut plain = Client::connect(&format!("{}?_pk=3f2a-partysocket", app.ws_url("o"))).await;
    plain.subscribe(&["p", "q"]).await;
    assert_eq!(
        plain.next_text().await,
        r#"{"type":"update","connections":{"p":2,"q":0}}"#
    );
    let mut flagged = app.connect("o").await;
    flagged.subscribe_visitors(&["p", "q"]).await;
    assert_eq!(
        flagged.next_text().await,
        r#"{"type":"update","connections":{"p":2,"q":0},"visitors":{"p":1,"q":0}}"#
    );

    // A publish (at once or an interval after the last one): the next
    // interval starts with it.
    let _q1 = app.connect_as("q", CAROL).await;
    assert_eq!(
        plain.next_text().await,
        r#"{"type":"update","connections":{"q":1}}"#
    );
    assert_eq!(
        flagged.next_text().await,
        r#"{"type":"update","connections":{"q":1},"visitors":{"q":1}}"#
    );

    // Within that interval: p's visitors change alone, q's connections change.
    a1.close().await;
    let _b1 = app.connect_as("p", BOB).await;
    let _q2 = app.connect("q").await;
    assert_eq!(
        flagged.next_text().await,
        r#"{"type":"update","connections":{"p":2,"q":2},"visitors":{"p":2,"q":2}}"#
    );
    assert_eq!(
        plain.next_text().await,
        r#"{"type":"update","connections":{"q":2}}"#
    );
}

/// An invalid visitor id (too short, too long, a character outside
/// `[A-Za-z0-9_-]`) does not refuse the connection: its first message is a
/// documented `invalid_visitor` error, it counts as a visitor of its own
/// (two with the same invalid id are two visitors), and it works as usual.
#[tokio::test]
async fn an_invalid_visitor_id_is_ignored_with_an_error() {
    let (app, _dir) = spawn_app(&[]);
    let mut o = observer(&app, &["p"]).await;
    let long = "x".repeat(65);
    let mut open = Vec::new();
    for (id, why) in [
        ("short", "shorter than 8"),
        ("short", "shorter than 8"),
        (long.as_str(), "longer than 64"),
        ("has.a.dot.in.it", "may hold only"),
        ("percent%41encoded", "may hold only"),
    ] {
        let mut c = app.connect_as("p", id).await;
        let v = c.next_json().await;
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["code"], "invalid_visitor", "{v}");
        let text = v["message"].as_str().expect("message");
        assert!(text.contains(why) && text.contains("own visitor"), "{text}");
        open.push(c);
    }
    o.wait_for_tally(&counts(&[("p", 5)]), &counts(&[("p", 5)]), (5, 5))
        .await;
    // The connection is an ordinary one.
    let c = &mut open[0];
    c.subscribe(&["p"]).await;
    assert_eq!(c.next_update().await, counts(&[("p", 5)]));
    // A valid id sends no error: its first message answers its subscribe.
    let mut ok = app.connect_as("p", ALICE).await;
    ok.subscribe(&["p"]).await;
    let first = ok.next_json().await;
    assert_eq!(first["type"], "update", "{first}");
    ok.wait_for(&counts(&[("p", 6)])).await;
}

/// The HTTP API: `/api/v1/counts` keeps its shape and adds both figures on
/// `visitors=true`; `/api/v1/pages/{id}` has `visitors` and `peak_visitors`;
/// `/api/v1/stats` counts the node's distinct visitors over all pages.
#[tokio::test]
async fn the_http_api_answers_visitors() {
    let (app, _dir) = spawn_app(&[]);
    let mut o = observer(&app, &["p", "q"]).await;
    let a1 = app.connect_as("p", ALICE).await;
    let a2 = app.connect_as("p", ALICE).await;
    let b = app.connect_as("p", BOB).await;
    let aq = app.connect_as("q", ALICE).await;
    o.wait_for_tally(
        &counts(&[("p", 3), ("q", 1)]),
        &counts(&[("p", 2), ("q", 1)]),
        (3, 2),
    )
    .await;

    assert_eq!(
        app.get_json("/api/v1/counts?ids=p,q,r").await,
        serde_json::json!({"p": 3, "q": 1, "r": 0})
    );
    assert_eq!(
        app.get_json("/api/v1/counts?ids=p,q,r&visitors=false")
            .await,
        serde_json::json!({"p": 3, "q": 1, "r": 0})
    );
    assert_eq!(
        app.get_json("/api/v1/counts?visitors=true&id=p&id=r").await,
        serde_json::json!({"connections": {"p": 3, "r": 0}, "visitors": {"p": 2, "r": 0}})
    );
    let (status, body) = app.get("/api/v1/counts?ids=p&visitors=yes").await;
    assert_eq!(status, 400, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["code"], "invalid_parameter", "{v}");

    let page = app.get_json("/api/v1/pages/p").await;
    assert_eq!(
        (&page["connections"], &page["visitors"]),
        (&serde_json::json!(3), &serde_json::json!(2)),
        "{page}"
    );
    assert_eq!(page["peak_visitors"], 2, "{page}");
    // Alice on p and q, Bob on p, the observer (no id): 3 people on this node.
    assert_eq!(app.get_json("/api/v1/stats").await["visitors"], 3);

    drop((a1, a2, b, aq));
    o.wait_for_tally(
        &counts(&[("p", 0), ("q", 0)]),
        &counts(&[("p", 0), ("q", 0)]),
        (3, 2),
    )
    .await;
    let page = app.get_json("/api/v1/pages/p").await;
    assert_eq!(page["visitors"], 0, "{page}");
    assert_eq!(page["peak_visitors"], 2, "the peak stays: {page}");
    assert_eq!(page["peak_connections"], 3, "{page}");
    eventually("the node's visitors to drop to the observer", || async {
        app.get_json("/api/v1/stats").await["visitors"] == 1
    })
    .await;
}

/// After a counter restart, tallies are rebuilt from the rooms with their
/// visitors: the observer keeps the true figures and later changes arrive.
#[tokio::test]
async fn visitors_survive_a_counter_restart() {
    let (app, _dir) = spawn_app(&[]);
    let mut o = observer(&app, &["p"]).await;
    let [a1, _a2, _anon] = alice_twice_and(&app, &mut o, None).await;

    let before = app
        .counter
        .send(GetStatus)
        .await
        .expect("status")
        .generation;
    app.counter.do_send(InjectFault);
    eventually("the counter to restart and rebuild", || async {
        let s = app.counter.send(GetStatus).await.expect("status");
        s.generation > before && !s.rebuilding
    })
    .await;
    assert_eq!(
        app.get_json("/api/v1/counts?ids=p&visitors=true").await,
        serde_json::json!({"connections": {"p": 3}, "visitors": {"p": 2}})
    );
    a1.close().await;
    o.wait_for_tally(&counts(&[("p", 2)]), &counts(&[("p", 2)]), (3, 2))
        .await;
}

/// Reads updates until one carries `"site": n`; every `site` seen on the
/// way is at most `most` (never above the truth of the moment).
async fn wait_site(c: &mut Client, n: u64, most: u64) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let v = tokio::time::timeout_at(deadline, c.next_json())
            .await
            .unwrap_or_else(|_| panic!("no update with site {n}"));
        if let Some(site) = v.get("site") {
            let site = site.as_u64().expect("integer site");
            assert!(site <= most, "site {site} above {most}: {v}");
            if site == n {
                return;
            }
        }
    }
}

/// `"site": true` adds the distinct people on any page of the site to the
/// updates: two visitors on two pages are 2, the same visitor on two pages
/// is 1. A connection that did not ask never gets a `site` field.
#[tokio::test]
async fn the_site_figure_counts_distinct_people_over_all_pages() {
    let (app, _dir) = spawn_app(&[]);
    let mut watcher = app.connect_as("w", "visitor-watcher").await;
    watcher
        .send_text(r#"{"type":"subscribe","links":["p1"],"site":true}"#)
        .await;
    wait_site(&mut watcher, 1, 1).await;
    let mut plain = app.connect_as("p1", "visitor-aaaa").await;
    plain.subscribe(&["p1", "p2"]).await;
    let _b = app.connect_as("p2", "visitor-bbbb").await;
    wait_site(&mut watcher, 3, 3).await;
    // visitor-aaaa on a second page: still 3 people (and 4 connections).
    let _a2 = app.connect_as("p2", "visitor-aaaa").await;
    eventually("4 connections", || async {
        app.get_json("/api/v1/stats").await["connections"] == 4
    })
    .await;
    // One more person: the next figure is 4, not 5.
    let _c = app.connect("p1").await;
    wait_site(&mut watcher, 4, 4).await;
    // The plain subscriber's updates, up to these counts, have no `site`.
    let expected = crate::helpers::counts(&[("p1", 2), ("p2", 2)]);
    while plain.shown != expected {
        let v = plain.next_json().await;
        assert!(v.get("site").is_none(), "did not ask, got {v}");
    }
    // visitor-bbbb leaves: 3 people remain.
    drop(_b);
    wait_site(&mut watcher, 3, 4).await;
    app.shutdown().await;
}
