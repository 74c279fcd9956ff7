//! Micro-benchmarks of the pure hot paths (criterion; BENCHMARKS.md says
//! what each measures): a connection's mailbox, the update frame, and the
//! counter's publish, each without sockets, actors or timers; and a stats
//! write through `Storage` (sled in a temp dir) next to a bare sled insert.
//!
//! `cargo bench --bench micro [-- FILTER]`; `LC_BENCH_SMOKE=1` (CI) measures
//! each for a fraction of a second, enough to keep them compiling and running.

use std::{
    hint::black_box,
    sync::Arc,
    time::{Duration, Instant},
};

use criterion::{BatchSize, Criterion};
use link_counter::{
    counter::bare::{Effect, Now, RoomId, State},
    delivery::{Mailbox, Update},
    protocol::{update_json, PageId, Tally},
    storage::{PageStats, Storage},
    Settings,
};

fn tally(n: u64) -> Tally {
    Tally {
        connections: n,
        visitors: n,
    }
}

/// `n` page ids of a realistic length (`blog-2026-some-post-NNN`).
fn ids(n: usize) -> Vec<PageId> {
    (0..n)
        .map(|i| PageId::parse(&format!("blog-2026-some-post-{i:03}")).unwrap())
        .collect()
}

/// A connection's mailbox: a room writes, the session takes.
fn mailbox(c: &mut Criterion) {
    let mut g = c.benchmark_group("mailbox");
    let links = ids(3);
    let delta = |i: usize, n: u64| {
        Update::new(
            vec![(links[i].clone(), tally(n))],
            Some(Instant::now()),
            false,
        )
    };
    let (d0, d1, d2) = (delta(0, 5), delta(1, 7), delta(0, 6));
    let full = Update::new(
        links.iter().map(|l| (l.clone(), tally(1))).collect(),
        None,
        false,
    );
    let mb = Mailbox::new();
    // The usual case: one update, taken as the room built it.
    g.bench_function("update_take", |b| {
        b.iter(|| {
            mb.update(&d0);
            black_box(mb.take())
        })
    });
    // A session behind: three updates merged, then re-serialized at take.
    g.bench_function("update3_merged_take", |b| {
        b.iter(|| {
            mb.update(&d0);
            mb.update(&d1);
            mb.update(&d2);
            black_box(mb.take())
        })
    });
    // A subscribe's full update replacing what was pending.
    g.bench_function("replace_take", |b| {
        b.iter(|| {
            mb.update(&d0);
            mb.replace(full.clone());
            black_box(mb.take())
        })
    });
    g.finish();
}

/// The `update` frame: serialization of a room's delta and of full maps.
fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    for n in [1usize, 3, 50] {
        let values: Vec<(PageId, Tally)> = ids(n)
            .into_iter()
            .enumerate()
            .map(|(i, id)| (id, tally(i as u64 * 7)))
            .collect();
        g.bench_function(format!("update_json_{n}"), |b| {
            b.iter(|| black_box(update_json(values.iter().map(|(id, t)| (&**id, *t)), false)))
        });
        g.bench_function(format!("update_json_{n}_visitors"), |b| {
            b.iter(|| black_box(update_json(values.iter().map(|(id, t)| (&**id, *t)), true)))
        });
        // What a room does per distinct payload: serialize once into a shared frame.
        g.bench_function(format!("room_frame_{n}"), |b| {
            b.iter_batched(
                || values.clone(),
                |v| black_box(Update::new(v, None, false)),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

/// The counter's state with `rooms` follower rooms on `pages` pages, each
/// following `links` of them (room `r` on page `r % pages`, following the
/// next pages), every page with one connection; publishes flushed.
fn counter_state(pages: usize, rooms: u64, links: usize, start: Instant) -> State<u64> {
    let settings = Arc::new(
        Settings::load_from(None, Vec::<(String, String)>::new()).expect("default settings"),
    );
    let mut state: State<u64> = State::new(settings, Box::new(|_| PageStats::default()));
    let ids = ids(pages);
    let now = Now { at: start, ms: 0 };
    for p in &ids {
        state.room_count(p, tally(1), 1, now);
    }
    for r in 0..rooms {
        let room = RoomId::fresh();
        let first = r as usize % pages;
        let follows: Vec<PageId> = (1..=links)
            .map(|k| ids[(first + k) % pages].clone())
            .collect();
        state.subscribe(room, r, follows, r, start);
    }
    state.scheduled_publish(start);
    state
}

/// The counter's publish: `changed` pages change, then the coalesced
/// publish builds one `Counts` per follower room of them.
fn publish(c: &mut Criterion) {
    let mut g = c.benchmark_group("publish");
    for (pages, rooms, changed) in [(100usize, 1_000u64, 1usize), (100, 1_000, 100)] {
        let start = Instant::now();
        let mut state = counter_state(pages, rooms, 3, start);
        let ids = ids(pages);
        let mut tick = 0u64;
        g.bench_function(format!("pages{pages}_rooms{rooms}_changed{changed}"), |b| {
            b.iter(|| {
                tick += 1;
                // Past the interval and the budget's 1 s bound: every change goes.
                let at = start + Duration::from_secs(2 * tick);
                let now = Now { at, ms: tick };
                // The first change after a quiet interval goes at once, the
                // others with the publish that follows.
                let mut sent = Vec::new();
                for p in ids.iter().take(changed) {
                    sent.extend(state.room_count(p, tally(1 + tick % 2), 0, now).sent);
                }
                sent.extend(state.scheduled_publish(at).sent);
                let deliveries = sent
                    .iter()
                    .filter(|e| matches!(e, Effect::Counts { .. }))
                    .count();
                black_box(deliveries)
            })
        });
    }
    g.finish();
}

/// A stats record written through `Storage` (a new page: the record, its
/// index key and the count in one transaction; a rewrite: the record and a
/// moved index key), and the ceiling: the same value inserted into a bare
/// sled tree with the same settings.
fn storage(c: &mut Criterion) {
    let mut g = c.benchmark_group("storage");
    let dir = tempfile::tempdir().expect("temp dir");
    let storage = Storage::open(&dir.path().join("service"), 64 << 20).expect("storage");
    let stats = |ms: u64| PageStats {
        total_connections: ms,
        last_active_ms: Some(ms),
        ..PageStats::default()
    };
    let page = |i: u64| format!("blog-2026-some-post-{i:09}");
    let mut n = 0u64;
    g.bench_function("save_stats_new", |b| {
        b.iter(|| {
            n += 1;
            storage
                .save_stats([(page(n).as_str(), &stats(n))])
                .expect("write")
        })
    });
    let mut t = 0u64;
    g.bench_function("save_stats_rewrite", |b| {
        b.iter(|| {
            t += 1;
            storage
                .save_stats([(page(1 + t % 1000).as_str(), &stats(n + t))])
                .expect("write")
        })
    });
    // Ceilings: one bare insert of the same value, with the service's
    // settings (zstd) and without compression.
    for (name, compress) in [
        ("sled_insert_new", true),
        ("sled_insert_new_uncompressed", false),
    ] {
        let bare = sled::Config::new()
            .path(dir.path().join(name))
            .cache_capacity(64 << 20)
            .use_compression(compress)
            .flush_every_ms(Some(200))
            .open()
            .expect("sled");
        let tree = bare.open_tree("stats").expect("tree");
        let value = vec![2u8; 12];
        let mut m = 0u64;
        g.bench_function(name, |b| {
            b.iter(|| {
                m += 1;
                tree.insert(page(m).as_bytes(), value.as_slice())
                    .expect("write")
            })
        });
    }
    g.finish();
}

fn main() {
    let smoke = std::env::var("LC_BENCH_SMOKE").is_ok_and(|v| v != "0" && !v.is_empty());
    let mut c = Criterion::default().configure_from_args();
    if smoke {
        c = c
            .warm_up_time(Duration::from_millis(50))
            .measurement_time(Duration::from_millis(200))
            .sample_size(10);
    }
    mailbox(&mut c);
    frames(&mut c);
    publish(&mut c);
    storage(&mut c);
    c.final_summary();
}
