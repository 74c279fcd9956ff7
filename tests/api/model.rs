//! Property test of the room and counter logic: random sequences of connect
//! (as one of a few visitors, or none), subscribe (with or without the
//! visitors map), close, abrupt drop, idle eviction, sweep and counter
//! restart, driven through the real shard/room/counter actors of a running
//! server; after every step each subscriber must converge to the true
//! counts, and a subscriber that asked for visitors to the true number of
//! distinct visitors, while one that did not never sees a `visitors` map.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use std::sync::Arc;

use link_counter::{
    counter::{Counts, GetStatus, InjectFault, SweepNow},
    delivery::{ConnId, Mailbox},
    protocol::PageId,
    room::{Join, Leave, SetLinks},
    shard::RoomOf,
    visitor::{self, VisitorKey},
};
use proptest::{
    prelude::*,
    test_runner::{FileFailurePersistence, TestRunner},
};

use crate::helpers::{spawn_app, TestApp};

const PAGES: usize = 4;

/// Visitor ids the connections pick from (or none: their own visitor).
const VISITORS: [&str; 3] = ["visitor-a", "visitor-b", "visitor-c"];

#[derive(Debug, Clone)]
enum Op {
    /// Connect to a page, as `VISITORS[v]` (none when out of range).
    Connect(usize, usize),
    /// Subscribe, with the visitors map or not.
    Subscribe(usize, BTreeSet<usize>, bool),
    Close(usize),
    Drop(usize),
    Idle,
    Sweep,
    CounterRestart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..PAGES, 0..VISITORS.len() + 1).prop_map(|(p, v)| Op::Connect(p, v)),
        4 => (any::<usize>(), proptest::collection::btree_set(0..PAGES, 0..=PAGES), any::<bool>())
            .prop_map(|(i, s, v)| Op::Subscribe(i, s, v)),
        2 => any::<usize>().prop_map(Op::Close),
        2 => any::<usize>().prop_map(Op::Drop),
        1 => Just(Op::Idle),
        1 => Just(Op::Sweep),
        1 => Just(Op::CounterRestart),
    ]
}

/// A connection as the actors see it, without a socket.
struct FakeConn {
    id: ConnId,
    page: usize,
    /// Its visitor, as an index into `VISITORS` (`None`: its own).
    visitor: Option<usize>,
    /// Its mailbox, read the way a session reads it (merged latest values).
    rx: Option<Arc<Mailbox>>,
    links: BTreeSet<usize>,
    /// It subscribed with `"visitors": true`.
    wants_visitors: bool,
    shown: BTreeMap<String, u64>,
    shown_visitors: BTreeMap<String, u64>,
}

/// The key the server keeps of `VISITORS[v]`.
fn key(v: Option<usize>) -> Option<VisitorKey> {
    let id = VISITORS[v?];
    visitor::from_query(Some(&format!("visitor={id}"))).key()
}

struct Model<'a> {
    app: &'a TestApp,
    names: Vec<PageId>,
    open: Vec<FakeConn>,
    /// Dropped receivers whose Leave comes one step later (a dead TCP peer
    /// keeps counting until the server notices).
    dying: Vec<FakeConn>,
}

impl Model<'_> {
    fn count(&self, page: usize) -> u64 {
        (self.open.iter().filter(|c| c.page == page).count()
            + self.dying.iter().filter(|c| c.page == page).count()) as u64
    }

    /// Distinct visitors of `page`: each visitor id once, each connection without one.
    fn visitors(&self, page: usize) -> u64 {
        let on_page = self
            .open
            .iter()
            .chain(&self.dying)
            .filter(|c| c.page == page);
        let mut ids = BTreeSet::new();
        let mut anonymous = 0;
        for c in on_page {
            match c.visitor {
                Some(v) => {
                    ids.insert(v);
                }
                None => anonymous += 1,
            }
        }
        ids.len() as u64 + anonymous
    }

    fn leave(&self, c: &FakeConn) {
        let page = self.names[c.page].clone();
        self.app
            .shards
            .for_page(&page)
            .expect("shards are ready once the server started")
            .do_send(Leave { page, conn: c.id });
    }

    async fn step(&mut self, op: &Op) {
        for c in std::mem::take(&mut self.dying) {
            self.leave(&c);
        }
        let pick = |n: usize, len: usize| if len == 0 { None } else { Some(n % len) };
        match op {
            Op::Connect(p, v) => {
                let rx = Mailbox::new();
                let id = ConnId::fresh();
                let page = self.names[*p].clone();
                let visitor = (*v < VISITORS.len()).then_some(*v);
                self.app
                    .shards
                    .for_page(&page)
                    .expect("shards are ready once the server started")
                    .do_send(Join {
                        page,
                        conn: id,
                        mailbox: rx.clone(),
                        visitor: key(visitor),
                    });
                self.open.push(FakeConn {
                    id,
                    page: *p,
                    visitor,
                    rx: Some(rx),
                    links: BTreeSet::new(),
                    wants_visitors: false,
                    shown: BTreeMap::new(),
                    shown_visitors: BTreeMap::new(),
                });
            }
            Op::Subscribe(i, links, wants_visitors) => {
                let Some(i) = pick(*i, self.open.len()) else {
                    return;
                };
                let c = &mut self.open[i];
                c.links = links.clone();
                c.wants_visitors = *wants_visitors;
                c.shown.clear();
                c.shown_visitors.clear();
                let page = self.names[c.page].clone();
                let links = links.iter().map(|l| self.names[*l].clone()).collect();
                let shard = self
                    .app
                    .shards
                    .for_page(&page)
                    .expect("shards are ready once the server started");
                shard.do_send(SetLinks {
                    page: page.clone(),
                    conn: c.id,
                    links,
                    visitors: *wants_visitors,
                });
                // Waits until the room handled it, as a session's subscribe
                // takes effect: what the mailbox holds after that was built
                // for the new subscription (frames built before it are in
                // flight for a real client too, which reads them as answers
                // to its previous subscribe). The shard answers RoomOf after
                // routing SetLinks, and the room handles an empty Counts
                // (a no-op) after SetLinks.
                if let Some(room) = shard.send(RoomOf(page)).await.expect("shard answers") {
                    room.send(Counts {
                        changes: Vec::new(),
                        since: None,
                        frames: None,
                    })
                    .await
                    .expect("room answers");
                }
            }
            Op::Close(i) => {
                let Some(i) = pick(*i, self.open.len()) else {
                    return;
                };
                let c = self.open.swap_remove(i);
                self.leave(&c);
            }
            Op::Drop(i) => {
                let Some(i) = pick(*i, self.open.len()) else {
                    return;
                };
                let mut c = self.open.swap_remove(i);
                c.rx = None;
                self.dying.push(c);
            }
            Op::Idle => tokio::time::sleep(Duration::from_millis(80)).await,
            Op::Sweep => {
                self.app.counter.send(SweepNow).await.expect("sweep");
            }
            Op::CounterRestart => {
                let before = self
                    .app
                    .counter
                    .send(GetStatus)
                    .await
                    .expect("status")
                    .generation;
                self.app.counter.do_send(InjectFault);
                let counter = &self.app.counter;
                crate::helpers::eventually("the counter restarted and rebuilt", || async {
                    let s = counter.send(GetStatus).await.expect("status");
                    s.generation > before && !s.rebuilding
                })
                .await;
            }
        }
    }

    /// Every open subscriber shows the true count of each of its links (and,
    /// if it asked, the true number of visitors).
    async fn converged(&mut self) -> Result<(), String> {
        let truth: Vec<u64> = (0..PAGES).map(|p| self.count(p)).collect();
        let truth_visitors: Vec<u64> = (0..PAGES).map(|p| self.visitors(p)).collect();
        let names = self.names.clone();
        for c in &mut self.open {
            let want: BTreeMap<String, u64> = c
                .links
                .iter()
                .map(|l| (names[*l].to_string(), truth[*l]))
                .collect();
            let want_visitors: BTreeMap<String, u64> = if c.wants_visitors {
                c.links
                    .iter()
                    .map(|l| (names[*l].to_string(), truth_visitors[*l]))
                    .collect()
            } else {
                BTreeMap::new()
            };
            let rx = c.rx.as_mut().expect("open connections keep their receiver");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while want.iter().any(|(k, v)| c.shown.get(k) != Some(v))
                || want_visitors
                    .iter()
                    .any(|(k, v)| c.shown_visitors.get(k) != Some(v))
            {
                let ready = tokio::time::timeout_at(deadline, rx.ready()).await;
                let taken = rx.take();
                if let Some(end) = &taken.end {
                    return Err(format!("conn {} was told to end: {end:?}", c.id.get()));
                }
                if let Some((text, _)) = taken.update {
                    apply(&mut c.shown, &mut c.shown_visitors, &text)?;
                    if !c.wants_visitors && !c.shown_visitors.is_empty() {
                        return Err(format!(
                            "conn {} did not ask for visitors but got {text}",
                            c.id.get()
                        ));
                    }
                    continue;
                }
                // A wake-up can come for values an earlier take already got.
                if ready.is_err() {
                    let ids: Vec<&str> = names.iter().map(|n| &**n).collect();
                    let q = format!("/api/v1/counts?ids={}", ids.join(","));
                    let server = crate::helpers::http_get(self.app.addr, &q).await.1;
                    return Err(format!(
                        "conn {} on {} shows {:?} and visitors {:?}, truth {:?} and {:?}; \
                         the server counts {server}",
                        c.id.get(),
                        names[c.page],
                        c.shown,
                        c.shown_visitors,
                        want,
                        want_visitors
                    ));
                }
            }
        }
        Ok(())
    }
}

fn apply(
    shown: &mut BTreeMap<String, u64>,
    shown_visitors: &mut BTreeMap<String, u64>,
    text: &str,
) -> Result<(), String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if v["type"] != "update" {
        return Err(format!("unexpected message {v}"));
    }
    for (k, n) in v["connections"].as_object().ok_or("no connections map")? {
        shown.insert(k.clone(), n.as_u64().ok_or("count is not an integer")?);
    }
    if let Some(map) = v.get("visitors") {
        for (k, n) in map.as_object().ok_or("visitors is not a map")? {
            let n = n.as_u64().ok_or("visitors is not an integer")?;
            if Some(&n) > shown.get(k) {
                return Err(format!("{k}: more visitors than connections in {text}"));
            }
            shown_visitors.insert(k.clone(), n);
        }
    }
    Ok(())
}

/// See the module doc. Each case uses its own page names on one server.
#[test]
fn subscribers_converge_to_true_counts() {
    let (app, _dir) = spawn_app(&[
        ("COUNTER__BROADCAST_INTERVAL", "10ms"),
        ("ROOM__IDLE_TIMEOUT", "40ms"),
    ]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // PROPTEST_CASES raises the number of cases for a longer hunt.
    let cases: u32 = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    // Failing cases are saved to (and replayed first from) this file: the
    // runner is built by hand, so the macro's source-file lookup does not
    // apply and the path is given directly (relative to the package root,
    // where cargo runs the tests).
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/model.txt",
        ))),
        ..ProptestConfig::default()
    });
    let case = AtomicU64::new(0);
    let result = runner.run(&proptest::collection::vec(op(), 1..30), |ops| {
        let n = case.fetch_add(1, Ordering::Relaxed);
        rt.block_on(async {
            let mut model = Model {
                app: &app,
                names: (0..PAGES)
                    .map(|p| PageId::parse(&format!("m{n}-{p}")).unwrap())
                    .collect(),
                open: Vec::new(),
                dying: Vec::new(),
            };
            for (i, op) in ops.iter().enumerate() {
                model.step(op).await;
                model
                    .converged()
                    .await
                    .map_err(|e| TestCaseError::fail(format!("after step {i} {op:?}: {e}")))?;
            }
            for c in model.open.iter().chain(&model.dying) {
                model.leave(c);
            }
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(
        case.load(Ordering::Relaxed) >= u64::from(cases),
        "every case ran"
    );
}
