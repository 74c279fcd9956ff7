//! `startup`: how long a node takes to become ready on a full database, and
//! what it holds once ready.
//!
//! The bench fills a data directory through the real `Storage` API (sled,
//! zstd), in-process: `storage.max_records` pages (1,000,000, the default;
//! smoke 3,000), each with a stats record, a room record of 3 links and the
//! history of one minute (its minute and hour records), ids of 26 bytes, then
//! closes it cleanly. Filling through real connections would take hours; the
//! records are the ones the service writes. Then:
//!
//! - **ceilings**: sled alone opening the directory (the same
//!   `cache_capacity` and compression; this bench binary as a child,
//!   `--sled-open DIR`): its time and its RSS once open; and the RSS of the
//!   release binary ready on an empty data dir;
//! - **clean**: the release binary (a child) on the filled directory: time
//!   from its start to `/readyz` answering 200, RSS once settled;
//! - **unclean**: the same after a `kill -9` of that child (the record
//!   counts are exact after any stop: nothing reads every record).
//!
//! Each line carries the targets: ready within 5 s, RSS within
//! `storage.cache_capacity` + 64 MiB. The data dir's bytes per stored page
//! are printed with the fill.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use link_counter::{
    protocol::{PageId, Tally},
    storage::{HistoryRetention, MinutePeak, PageStats, RoomRecord, Storage, StorageError},
};

use crate::support::{dir_kib, http_body, rss_kib, secs, ChildService, Line};

/// `storage.cache_capacity` of every node here (the default).
const CACHE_CAPACITY: u64 = 64 << 20;
/// Target: ready within this after the start.
const TARGET_READY_SECS: f64 = 5.0;
/// Target: RSS within `cache_capacity` plus this.
const TARGET_RSS_OVER_CACHE_KIB: u64 = 64 << 10;

/// The page id of page `i` (26 bytes).
fn page(i: usize) -> String {
    format!("blog-2026-12-a-post{i:07}")
}

/// Writes `pages` pages as the service would have (see the module doc).
fn fill(dir: &std::path::Path, pages: usize) {
    let storage = Storage::open(dir, CACHE_CAPACITY).expect("storage opens");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let keep = HistoryRetention {
        minutes_ms: 48 * 3_600_000,
        hours_ms: 90 * 86_400_000,
    };
    const CHUNK: usize = 1024;
    for start in (0..pages).step_by(CHUNK) {
        let ids: Vec<String> = (start..(start + CHUNK).min(pages)).map(page).collect();
        let stats: Vec<PageStats> = ids
            .iter()
            .enumerate()
            .map(|(k, _)| PageStats {
                total_connections: 3,
                peak_connections: 2,
                peak_at_ms: Some(now + (start + k) as u64),
                peak_visitors: 2,
                last_active_ms: Some(now + (start + k) as u64),
            })
            .collect();
        storage
            .save_stats(ids.iter().map(String::as_str).zip(stats.iter()))
            .expect("stats");
        for (k, id) in ids.iter().enumerate() {
            let links = (1..=3)
                .map(|d| PageId::parse(&page((start + k + d * 7919) % pages)).unwrap())
                .collect();
            storage
                .save_room(
                    id,
                    &RoomRecord {
                        links,
                        last_active_ms: now + (start + k) as u64,
                    },
                )
                .expect("room");
        }
        let peaks: Vec<MinutePeak> = ids
            .iter()
            .map(|id| {
                let peak = Tally {
                    connections: 2,
                    visitors: 2,
                };
                (PageId::parse(id).unwrap(), now - now % 60_000, peak)
            })
            .collect();
        storage.save_history(&peaks, keep).expect("history");
    }
    storage.close().expect("clean close");
}

/// Waits until `/readyz` answers 200; the time since `started`.
fn ready_after(rt: &tokio::runtime::Runtime, addr: SocketAddr, started: Instant) -> f64 {
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(300);
        while http_body(addr, "/readyz").await.is_none() {
            assert!(Instant::now() < deadline, "never ready");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    secs(started)
}

/// RSS once it stops moving (within 256 KiB over 500 ms, at most 10 s),
/// read no earlier than 6 s from now: the service hands freed memory back
/// every 5 s (`malloc_trim`), so this is what it holds, not what it freed
/// since its last trim.
fn settled_rss(pid: u32) -> u64 {
    std::thread::sleep(Duration::from_secs(6));
    let mut last = rss_kib(pid);
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(500));
        let now = rss_kib(pid);
        if now.abs_diff(last) < 256 {
            return now;
        }
        last = now;
    }
    last
}

pub fn startup(rt: &tokio::runtime::Runtime, smoke: bool) {
    let pages = std::env::var("LC_STARTUP_PAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if smoke { 3_000 } else { 1_000_000 });
    let records = pages.to_string();
    let extra = [
        ("STORAGE__MAX_RECORDS", records.as_str()),
        ("STORAGE__CACHE_CAPACITY", "67108864"),
    ];
    // Ceiling: an empty node's RSS once ready.
    let empty = {
        let started = Instant::now();
        let service = ChildService::start(&extra);
        let ready = ready_after(rt, service.addr, started);
        (ready, settled_rss(service.pid()))
    };
    let dir = tempfile::tempdir().expect("dir");
    let started = Instant::now();
    fill(dir.path(), pages);
    let fill_secs = secs(started);
    let data_kib = dir_kib(dir.path());
    let bytes_per_page = data_kib as f64 * 1024.0 / pages as f64;
    // Ceiling: sled alone opening the directory, in a child (its own RSS).
    let (sled_open_secs, sled_open_rss_kib) = sled_open_child(dir.path());
    Line::new("startup_fill")
        .s("pages", pages)
        .f("fill_secs", fill_secs)
        .s("data_kib", data_kib)
        .f("data_bytes_per_page", bytes_per_page)
        .print();
    let target_rss = CACHE_CAPACITY / 1024 + TARGET_RSS_OVER_CACHE_KIB;
    let report = |stop: &str, ready: f64, rss: u64| {
        Line::new("startup")
            .s("stop", stop)
            .s("pages", pages)
            .f("ready_secs", ready)
            .f("target_ready_secs", TARGET_READY_SECS)
            .f("sled_open_secs", sled_open_secs)
            .s("rss_kib", rss)
            .s("sled_open_rss_kib", sled_open_rss_kib)
            .s("target_rss_kib", target_rss)
            .s("empty_node_rss_kib", empty.1)
            .f("empty_node_ready_secs", empty.0)
            .f("data_bytes_per_page", bytes_per_page)
            .s("ready_met", ready <= TARGET_READY_SECS)
            .s("rss_met", rss <= target_rss)
            .print();
    };
    let started = Instant::now();
    let mut service = ChildService::start_in(dir, &extra);
    let ready = ready_after(rt, service.addr, started);
    report("clean", ready, settled_rss(service.pid()));
    service.kill9();
    let started = Instant::now();
    service.restart();
    let ready = ready_after(rt, service.addr, started);
    report("kill9", ready, settled_rss(service.pid()));
}

/// `--sled-open DIR`: opens `DIR` with sled alone (see
/// `link_counter::storage::open_sled`), prints `opened SECS RSS_KIB` once
/// open, and exits (waiting while another process still holds the lock).
pub fn run_sled_open(dir: &str) -> ! {
    let dir = std::path::Path::new(dir);
    let deadline = Instant::now() + Duration::from_secs(30);
    let (db, took) = loop {
        let started = Instant::now();
        match link_counter::storage::open_sled(dir, CACHE_CAPACITY) {
            Ok(db) => break (db, secs(started)),
            Err(StorageError::Locked { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("sled opens {}: {e}", dir.display()),
        }
    };
    // What sled holds, not what its recovery freed (as the service's trims do).
    // SAFETY: malloc_trim only releases free heap memory; it takes no pointers.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::malloc_trim(0);
    }
    println!("opened {took} {}", rss_kib(std::process::id()));
    drop(db);
    std::process::exit(0)
}

/// Runs [`run_sled_open`] in a child: (seconds to open, RSS once open).
fn sled_open_child(dir: &std::path::Path) -> (f64, u64) {
    let exe = std::env::current_exe().expect("current exe");
    let out = std::process::Command::new(exe)
        .arg("--sled-open")
        .arg(dir)
        .output()
        .expect("the sled-open child runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("opened "))
        .unwrap_or_else(|| panic!("sled-open child said {text:?}"));
    let mut words = line.split_whitespace();
    let secs = words
        .next()
        .and_then(|w| w.parse().ok())
        .unwrap_or(f64::NAN);
    let rss = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
    // Its lock goes with the process.
    (secs, rss)
}
