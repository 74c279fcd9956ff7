//! Property test of the room and counter logic: random sequences of connect,
//! subscribe, close, abrupt drop, idle eviction, sweep and counter restart,
//! driven through the real shard/room/counter actors of a running server;
//! after every step each subscriber must converge to the true counts.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use std::sync::Arc;

use link_counter::{
    counter::{GetStatus, InjectFault, SweepNow},
    delivery::Mailbox,
    protocol::PageId,
    room::{Join, Leave, SetLinks},
};
use proptest::{prelude::*, test_runner::TestRunner};

use crate::helpers::{spawn_app, TestApp};

const PAGES: usize = 4;

#[derive(Debug, Clone)]
enum Op {
    Connect(usize),
    Subscribe(usize, BTreeSet<usize>),
    Close(usize),
    Drop(usize),
    Idle,
    Sweep,
    CounterRestart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..PAGES).prop_map(Op::Connect),
        4 => (any::<usize>(), proptest::collection::btree_set(0..PAGES, 0..=PAGES))
            .prop_map(|(i, s)| Op::Subscribe(i, s)),
        2 => any::<usize>().prop_map(Op::Close),
        2 => any::<usize>().prop_map(Op::Drop),
        1 => Just(Op::Idle),
        1 => Just(Op::Sweep),
        1 => Just(Op::CounterRestart),
    ]
}

/// A connection as the actors see it, without a socket.
struct FakeConn {
    id: u64,
    page: usize,
    /// Its mailbox, read the way a session reads it (merged latest values).
    rx: Option<Arc<Mailbox>>,
    links: BTreeSet<usize>,
    shown: BTreeMap<String, u64>,
}

/// Connection ids far from the sessions' own.
static NEXT: AtomicU64 = AtomicU64::new(1 << 48);

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
            Op::Connect(p) => {
                let rx = Mailbox::new();
                let id = NEXT.fetch_add(1, Ordering::Relaxed);
                let page = self.names[*p].clone();
                self.app
                    .shards
                    .for_page(&page)
                    .expect("shards are ready once the server started")
                    .do_send(Join {
                        page,
                        conn: id,
                        mailbox: rx.clone(),
                    });
                self.open.push(FakeConn {
                    id,
                    page: *p,
                    rx: Some(rx),
                    links: BTreeSet::new(),
                    shown: BTreeMap::new(),
                });
            }
            Op::Subscribe(i, links) => {
                let Some(i) = pick(*i, self.open.len()) else {
                    return;
                };
                let c = &mut self.open[i];
                c.links = links.clone();
                c.shown.clear();
                let page = self.names[c.page].clone();
                let links = links.iter().map(|l| self.names[*l].clone()).collect();
                self.app
                    .shards
                    .for_page(&page)
                    .expect("shards are ready once the server started")
                    .do_send(SetLinks {
                        page,
                        conn: c.id,
                        links,
                    });
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

    /// Every open subscriber shows the true count of each of its links.
    async fn converged(&mut self) -> Result<(), String> {
        let truth: Vec<u64> = (0..PAGES).map(|p| self.count(p)).collect();
        let names = self.names.clone();
        for c in &mut self.open {
            let want: BTreeMap<String, u64> = c
                .links
                .iter()
                .map(|l| (names[*l].to_string(), truth[*l]))
                .collect();
            let rx = c.rx.as_mut().expect("open connections keep their receiver");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while want.iter().any(|(k, v)| c.shown.get(k) != Some(v)) {
                let ready = tokio::time::timeout_at(deadline, rx.ready()).await;
                let taken = rx.take();
                if let Some(end) = &taken.end {
                    return Err(format!("conn {} was told to end: {end:?}", c.id));
                }
                if let Some((text, _)) = taken.update {
                    apply(&mut c.shown, &text)?;
                    continue;
                }
                // A wake-up can come for values an earlier take already got.
                if ready.is_err() {
                    let ids: Vec<&str> = names.iter().map(|n| &**n).collect();
                    let q = format!("/api/v1/counts?ids={}", ids.join(","));
                    let server = crate::helpers::http_get(self.app.addr, &q).await.1;
                    return Err(format!(
                        "conn {} on {} shows {:?}, truth {:?}; the server counts {server}",
                        c.id, names[c.page], c.shown, want
                    ));
                }
            }
        }
        Ok(())
    }
}

fn apply(shown: &mut BTreeMap<String, u64>, text: &str) -> Result<(), String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if v["type"] != "update" {
        return Err(format!("unexpected message {v}"));
    }
    for (k, n) in v["connections"].as_object().ok_or("no connections map")? {
        shown.insert(k.clone(), n.as_u64().ok_or("count is not an integer")?);
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
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        ..ProptestConfig::default()
    });
    let case = AtomicU64::new(0);
    let result = runner.run(&proptest::collection::vec(op(), 1..30), |ops| {
        let n = case.fetch_add(1, Ordering::Relaxed);
        rt.block_on(async {
            let mut model = Model {
                app: &app,
                names: (0..PAGES)
                    .map(|p| PageId::from(format!("m{n}-{p}")))
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
