//! Persistence: the only module that touches sled.
//!
//! Three trees: `meta` (schema version), `stats` (one record per page: totals,
//! peak, last activity) and `rooms` (one record per page room: the links its
//! connections subscribed to and the counts it last saw). Every value starts
//! with a version byte followed by JSON, so the encoding can evolve.
//! Live counts are never stored: connections do not survive a restart.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

/// Version byte of every record written by this build.
const RECORD_V1: u8 = 1;
/// Schema version stored in `meta/schema`.
const SCHEMA_VERSION: &[u8] = b"1";

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error("storage at {path} was written by an incompatible version (schema {found})")]
    Schema { path: String, found: String },
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// RFC 3339 text of a millisecond timestamp.
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Persistent statistics of one page.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageStats {
    /// Connections ever opened to the page.
    pub total_connections: u64,
    /// Highest concurrent connection count seen.
    pub peak_connections: u64,
    /// When the peak was reached (ms since epoch).
    pub peak_at_ms: Option<u64>,
    /// Last time a connection opened or closed (ms since epoch).
    pub last_active_ms: Option<u64>,
}

/// Persistent record of one page room.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomRecord {
    /// The page's outbound links: the last non-empty link set one of its connections subscribed to.
    pub links: Vec<String>,
    /// The counts of those links the room last delivered.
    pub counts: BTreeMap<String, u64>,
    /// Last activity of the room (ms since epoch).
    pub last_active_ms: u64,
}

/// Handle to the database; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct Storage {
    /// The sled database (kept for flushes).
    db: sled::Db,
    /// Per-page stats records.
    stats: sled::Tree,
    /// Per-room records.
    rooms: sled::Tree,
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![RECORD_V1];
    // Serializing these plain structs to JSON cannot fail.
    serde_json::to_writer(&mut out, value).expect("records serialize");
    out
}

/// True when the record was written by a newer build (never expired by this one).
fn is_foreign(bytes: &[u8]) -> bool {
    bytes.first().is_some_and(|v| *v > RECORD_V1)
}

fn decode<T: for<'de> Deserialize<'de>>(key: &[u8], bytes: &[u8]) -> Option<T> {
    match bytes.split_first() {
        Some((&RECORD_V1, rest)) => match serde_json::from_slice(rest) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(key = %String::from_utf8_lossy(key), error = %e, "unreadable record skipped");
                None
            }
        },
        _ => {
            tracing::warn!(key = %String::from_utf8_lossy(key), "record of unknown version skipped");
            None
        }
    }
}

/// Deletes the records of `tree` whose activity time is before `cutoff_ms`
/// (unreadable ones too, but never those of a newer build), except pages
/// for which `keep` says yes, in one batch. Returns how many were deleted.
fn expire<T: for<'de> Deserialize<'de>>(
    tree: &sled::Tree,
    cutoff_ms: u64,
    keep: impl Fn(&str) -> bool,
    last_active: impl Fn(T) -> u64,
) -> Result<usize, StorageError> {
    let mut batch = sled::Batch::default();
    let mut doomed = 0;
    for item in tree.iter() {
        let (k, v) = item?;
        let stale =
            !is_foreign(&v) && decode::<T>(&k, &v).is_none_or(|r| last_active(r) < cutoff_ms);
        if stale && !keep(&String::from_utf8_lossy(&k)) {
            batch.remove(k);
            doomed += 1;
        }
    }
    tree.apply_batch(batch)?;
    Ok(doomed)
}

impl Storage {
    /// Opens (or creates) the database in `path`.
    pub fn open(path: &Path, cache_capacity: u64) -> Result<Storage, StorageError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_capacity)
            .flush_every_ms(Some(200))
            .open()?;
        let meta = db.open_tree("meta")?;
        match meta.get("schema")? {
            None => {
                meta.insert("schema", SCHEMA_VERSION)?;
            }
            Some(v) if v.as_ref() == SCHEMA_VERSION => {}
            Some(v) => {
                return Err(StorageError::Schema {
                    path: path.display().to_string(),
                    found: String::from_utf8_lossy(&v).into_owned(),
                })
            }
        }
        Ok(Storage {
            stats: db.open_tree("stats")?,
            rooms: db.open_tree("rooms")?,
            db,
        })
    }

    /// Size of the database on disk in bytes (the `storage_bytes` gauge).
    pub fn size_on_disk(&self) -> Result<u64, StorageError> {
        Ok(self.db.size_on_disk()?)
    }

    /// True when the database answers a read.
    pub fn is_usable(&self) -> Result<(), StorageError> {
        self.db.open_tree("meta")?.get("schema")?;
        Ok(())
    }

    /// Stats of one page, if stored.
    pub fn load_stats(&self, page: &str) -> Result<Option<PageStats>, StorageError> {
        Ok(self
            .stats
            .get(page)?
            .and_then(|v| decode(page.as_bytes(), &v)))
    }

    /// Writes many stats records in one atomic batch.
    pub fn save_stats<'a>(
        &self,
        records: impl IntoIterator<Item = (&'a str, &'a PageStats)>,
    ) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for (page, stats) in records {
            batch.insert(page.as_bytes(), encode(stats));
        }
        self.stats.apply_batch(batch)?;
        Ok(())
    }

    /// Record of one room, if stored.
    pub fn load_room(&self, page: &str) -> Result<Option<RoomRecord>, StorageError> {
        Ok(self
            .rooms
            .get(page)?
            .and_then(|v| decode(page.as_bytes(), &v)))
    }

    /// Writes one room record.
    pub fn save_room(&self, page: &str, record: &RoomRecord) -> Result<(), StorageError> {
        self.rooms.insert(page.as_bytes(), encode(record))?;
        Ok(())
    }

    /// Deletes room records inactive since before `cutoff_ms`, except pages
    /// for which `keep` says yes. Returns how many were deleted.
    pub fn expire_rooms(
        &self,
        cutoff_ms: u64,
        keep: impl Fn(&str) -> bool,
    ) -> Result<usize, StorageError> {
        expire(&self.rooms, cutoff_ms, keep, |r: RoomRecord| {
            r.last_active_ms
        })
    }

    /// Deletes stats of pages inactive since before `cutoff_ms`, except pages
    /// for which `keep` says yes. Returns how many were deleted.
    pub fn expire_stats(
        &self,
        cutoff_ms: u64,
        keep: impl Fn(&str) -> bool,
    ) -> Result<usize, StorageError> {
        expire(&self.stats, cutoff_ms, keep, |s: PageStats| {
            s.last_active_ms.unwrap_or(0)
        })
    }

    /// Number of stored room records.
    pub fn room_records(&self) -> usize {
        self.rooms.len()
    }

    /// Number of stored stats records.
    pub fn stats_records(&self) -> usize {
        self.stats.len()
    }

    /// Writes everything to disk and waits for it.
    pub fn flush(&self) -> Result<(), StorageError> {
        self.db.flush()?;
        Ok(())
    }
}
