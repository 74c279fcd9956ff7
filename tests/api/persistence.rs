//! Restarts: stats survive, live counts start at 0; kill -9 of the real binary.

use std::{net::SocketAddr, path::Path};

use link_counter::storage::Storage;

use crate::{
    helpers::{eventually, http_get, settings, spawn_app_with, Client},
    kit::{
        child::{binary, Running, Spawn, Stderr},
        settings::Env,
    },
};

/// A graceful restart on the same data dir keeps the stats and starts every
/// count at 0.
#[tokio::test]
async fn restart_keeps_stats_and_starts_counts_at_zero() {
    let dir = tempfile::tempdir().expect("tmp");
    let app = spawn_app_with(settings(dir.path(), &[]));
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(app.connect("r").await);
    }
    held.pop().expect("one").close().await;
    crate::lifecycle_wait(&app, "r", 2).await;
    // A page whose viewers follow links: its room record is restored below.
    let mut home = app.connect("home").await;
    home.subscribe(&["s", "r"]).await;
    home.next_update().await;
    let report = app.shutdown().await;
    assert_eq!(report.cut, 0);
    drop(held);

    drop(home);
    let app = spawn_app_with(settings(dir.path(), &[]));
    let home = app.get_json("/api/v1/pages/home").await;
    assert_eq!(home["links"], serde_json::json!(["r", "s"]));
    assert_eq!(home["connections"], 0);
    let info = app.get_json("/api/v1/pages/r").await;
    assert_eq!(info["connections"], 0);
    assert_eq!(info["total_connections"], 3);
    assert_eq!(info["peak_connections"], 3);
    let mut obs = app.connect("o").await;
    obs.subscribe(&["r"]).await;
    assert_eq!(obs.next_update().await, crate::helpers::counts(&[("r", 0)]));
    let _v = app.connect("r").await;
    assert_eq!(obs.next_update().await, crate::helpers::counts(&[("r", 1)]));
    assert_eq!(
        app.get_json("/api/v1/pages/r").await["total_connections"],
        4
    );
}

/// The binary on `dir`, snapshots every 100 ms, per-IP caps off as in
/// spawn_app (every test client comes from 127.0.0.1).
fn start_binary(dir: &Path) -> Running {
    start_binary_with(dir, &[])
}

/// [`start_binary`] with more settings (`SECTION__KEY`, value).
fn start_binary_with(dir: &Path, extra: &[(&str, &str)]) -> Running {
    let mut cmd = binary();
    let mut env = Env::base(dir)
        .set("STORAGE__SNAPSHOT_INTERVAL", "100ms")
        .set("LIMITS__MAX_CONNECTIONS_PER_IP", "0")
        .set("LIMITS__CONNECTIONS_PER_IP_PER_SECOND", "0");
    for (k, v) in extra {
        env = env.set(k, v);
    }
    env.apply(&mut cmd);
    Running::start(cmd)
}

async fn total_connections(addr: SocketAddr, page: &str) -> (u64, u64) {
    let (status, body) = http_get(addr, &format!("/api/v1/pages/{page}")).await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    (
        v["total_connections"].as_u64().expect("n"),
        v["connections"].as_u64().expect("n"),
    )
}

/// Copies a directory tree (a sled data directory: files and subdirectories).
fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// The `total_connections` of `page` that a restart after `kill -9` would
/// find now: read from a copy of the running binary's data directory (what
/// its files hold). `None` while the copy does not open (taken in the middle
/// of a write) or holds no record of the page.
fn total_on_disk(dir: &Path, page: &str) -> Option<u64> {
    let copy = tempfile::tempdir().expect("tmp");
    copy_dir(dir, copy.path()).ok()?;
    let storage = Storage::open(copy.path(), 1 << 20).ok()?;
    let stats = storage.load_stats(page).ok().flatten()?;
    Some(stats.total_connections)
}

/// kill -9 of the real binary during churn, restarted on the same data dir
/// three times: the store opens every time, stats older than one snapshot
/// interval are kept, and counts restart at 0 and converge as clients return.
#[tokio::test]
async fn kill_9_during_churn_keeps_older_stats() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut settled_total = 0;
    for round in 0..3 {
        let mut bin = start_binary(dir.path());
        let (total, live) = total_connections(bin.addr, "k").await;
        assert_eq!(live, 0, "round {round}: counts restart at 0");
        assert!(
            total >= settled_total,
            "round {round}: lost settled stats: {total} < {settled_total}"
        );
        // 20 connections, settled once a snapshot holding them is on disk.
        let url = format!("ws://{}/parties/page/k", bin.addr);
        let mut held = Vec::new();
        for _ in 0..20 {
            held.push(Client::connect(&url).await);
        }
        settled_total = total + 20;
        eventually("the 20 connections' stats on disk", || async {
            total_on_disk(dir.path(), "k").is_some_and(|n| n >= settled_total)
        })
        .await;
        // Churn, and kill -9 in the middle of it.
        let churn = tokio::spawn(async move {
            loop {
                let c = Client::connect(&url).await;
                c.drop_abruptly();
            }
        });
        eventually("churn under way", || async {
            total_connections(bin.addr, "k").await.0 >= settled_total + 50
        })
        .await;
        bin.kill9();
        churn.abort();
        let _ = churn.await;
        drop(held);
    }
    // A last start: the store opens, stats are there, a returning client counts from 0.
    let mut bin = start_binary(dir.path());
    let (total, live) = total_connections(bin.addr, "k").await;
    assert_eq!(live, 0);
    assert!(total >= settled_total);
    let mut obs = Client::connect(&format!("ws://{}/parties/page/o", bin.addr)).await;
    obs.subscribe(&["k"]).await;
    assert_eq!(obs.next_update().await, crate::helpers::counts(&[("k", 0)]));
    let _back = Client::connect(&format!("ws://{}/parties/page/k", bin.addr)).await;
    assert_eq!(obs.next_update().await, crate::helpers::counts(&[("k", 1)]));
    bin.kill9();
}

/// `link_counter_stored_records{store}` of the binary at `addr` (its
/// `/metrics` on the public listener), as (stats, rooms).
async fn stored_records(addr: SocketAddr) -> Option<(u64, u64)> {
    let (status, body) = http_get(addr, "/metrics").await;
    if status != 200 {
        return None;
    }
    let gauge = |store: &str| {
        let line = format!("link_counter_stored_records{{store=\"{store}\"}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(line.as_str()))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
    };
    Some((gauge("stats")?, gauge("rooms")?))
}

/// The records in a data directory, counted by a scan of a copy (the
/// directory of a running binary: `None` while the copy does not open).
fn records_on_disk(dir: &Path) -> Option<(usize, usize)> {
    let copy = tempfile::tempdir().expect("tmp");
    copy_dir(dir, copy.path()).ok()?;
    Some(Storage::open(copy.path(), 1 << 20).ok()?.count_records())
}

/// A `kill -9` while records are being written leaves stored record counts
/// that match a scan of the records (each write that creates or deletes a
/// record is one transaction with its count); the restarted binary holds a
/// lower `storage.max_records` on them at once, and a graceful stop leaves
/// them exact too.
#[tokio::test]
async fn kill_9_mid_writes_leaves_exact_record_counts() {
    let dir = tempfile::tempdir().expect("tmp");
    let writing = [
        ("ADMIN__METRICS_ON_PUBLIC", "true"),
        ("STORAGE__SNAPSHOT_INTERVAL", "20ms"),
    ];
    let mut bin = start_binary_with(dir.path(), &writing);
    // Clients open new pages (each gets a stats and a room record) without
    // pause; the kill comes while they do, once records are being written.
    let addr = bin.addr;
    let churn = tokio::spawn(async move {
        for i in 0.. {
            let mut c = Client::connect(&format!("ws://{addr}/parties/page/c{i:05}")).await;
            c.subscribe(&["x"]).await;
            c.next_update().await;
            c.close().await;
        }
    });
    let dir_path = dir.path().to_owned();
    eventually("100 pages' records on disk", || async {
        records_on_disk(&dir_path).is_some_and(|(s, r)| s >= 100 && r >= 100)
    })
    .await;
    bin.kill9();
    churn.abort();
    let _ = churn.await;
    let (stats, rooms) = {
        let storage = Storage::open(dir.path(), 1 << 20).expect("open after the kill");
        let scanned = storage.count_records();
        assert!(scanned.0 >= 100 && scanned.1 >= 100, "{scanned:?}");
        assert_eq!(
            (storage.stats_records(), storage.room_records()),
            scanned,
            "stored counts after the kill against a scan"
        );
        scanned
    };
    assert!(stats > 10 && rooms > 10);

    let capped = [
        ("ADMIN__METRICS_ON_PUBLIC", "true"),
        ("STORAGE__MAX_RECORDS", "10"),
    ];
    let mut bin = start_binary_with(dir.path(), &capped);
    eventually("trimmed to the cap", || async {
        stored_records(bin.addr).await == Some((10, 10))
    })
    .await;
    assert!(bin.terminate().success());
    let storage = Storage::open(dir.path(), 1 << 20).expect("open");
    assert_eq!((storage.stats_records(), storage.room_records()), (10, 10));
    assert_eq!(storage.count_records(), (10, 10));
}

/// `storage.compression = "none"` creates an uncompressed data directory
/// (sled's `conf` says so); restarted with the default setting, the binary
/// keeps it uncompressed, with its stats, and says so in its log.
#[tokio::test]
async fn compression_shapes_a_new_directory_only() {
    let dir = tempfile::tempdir().expect("tmp");
    let uncompressed = || {
        // Text lines, then a binary checksum.
        let conf = std::fs::read(dir.path().join("conf")).expect("sled's conf");
        String::from_utf8_lossy(&conf)
            .lines()
            .any(|l| l.trim() == "use_compression: false")
    };
    let mut bin = start_binary_with(dir.path(), &[("STORAGE__COMPRESSION", "none")]);
    let addr = bin.addr;
    let c = Client::connect(&format!("ws://{addr}/parties/page/plain")).await;
    eventually("the visit counted", || async {
        total_connections(addr, "plain").await == (1, 1)
    })
    .await;
    c.close().await;
    assert!(bin.terminate().success());
    assert!(uncompressed(), "a new directory with compression = none");

    let mut cmd = binary();
    Env::base(dir.path()).apply(&mut cmd);
    cmd.env("RUST_LOG", "info");
    let bin = Spawn::default().stderr(Stderr::Collect).start(cmd);
    assert_eq!(total_connections(bin.addr, "plain").await, (1, 0));
    let (code, log) = bin.stop();
    assert_eq!(code, 0, "{log}");
    assert!(uncompressed(), "reopened with the default setting");
    assert!(
        log.contains("keeps the compression it was created with"),
        "{log}"
    );
}
