//! `history`: the disk cost of the presence history per page, through the
//! real `Storage` (sled, zstd): pages with someone on them every minute of
//! the minute retention and every hour of the hour retention (the most a
//! page can hold), against the bound the encoding gives.

use std::time::Instant;

use link_counter::{
    protocol::{PageId, Tally},
    storage::{HistoryRetention, MinutePeak, PageStats, Storage},
};

use crate::support::secs;

/// Bytes of the files under `dir`.
fn du(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        total += if meta.is_dir() {
            du(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

pub fn history(smoke: bool) {
    let pages = if smoke { 3 } else { 200 };
    let keep = HistoryRetention {
        minutes_ms: 48 * 3_600_000,
        hours_ms: 90 * 86_400_000,
    };
    let dir = tempfile::tempdir().expect("dir");
    let storage = Storage::open(dir.path(), 64 << 20).expect("open");
    let empty = {
        storage.flush().expect("flush");
        du(dir.path())
    };
    let ids: Vec<PageId> = (0..pages)
        .map(|i| PageId::parse(&format!("blog-2026-12-a-post-{i:05}")).unwrap())
        .collect();
    let stats = PageStats {
        last_active_ms: Some(1),
        ..PageStats::default()
    };
    storage
        .save_stats(ids.iter().map(|p| (&**p, &stats)))
        .expect("stats");
    let peak = Tally {
        connections: 120,
        visitors: 100,
    };
    let hours = keep.hours_ms / 3_600_000;
    let start = 20_000 * 86_400_000u64;
    let started = Instant::now();
    let mut written = 0u64;
    for h in 0..hours {
        // Every hour of the 90 days; every minute of the last 48 hours.
        let minutes = if hours - h <= 48 { 60 } else { 1 };
        let batch: Vec<MinutePeak> = (0..minutes)
            .flat_map(|m| {
                let at = start + h * 3_600_000 + m * 60_000;
                ids.iter().map(move |p| (p.clone(), at, peak))
            })
            .collect();
        written += batch.len() as u64;
        storage.save_history(&batch, keep).expect("history");
    }
    storage.flush().expect("flush");
    let took = secs(started);
    let records = storage.history_records();
    let on_disk = du(dir.path()).saturating_sub(empty);
    let id_len = ids[0].len() as u64;
    // The encoding's bound: 49 minute records of 1 + 60 x 3 bytes and 91
    // hour records of 1 + 24 x 3, each with a key of the id and 6 bytes.
    let bound = 49 * (181 + id_len + 6) + 91 * (73 + id_len + 6);
    println!(
        "BENCH scenario=history pages={pages} id_bytes={id_len} minute_peaks_written={written} \
         records={records} records_per_page={:.1} bound_bytes_per_page={bound} \
         disk_bytes_per_page={} sled_size_on_disk_per_page={} secs={took:.1}",
        records as f64 / pages as f64,
        on_disk / pages,
        storage.size_on_disk().unwrap_or(0) / pages,
    );
}
