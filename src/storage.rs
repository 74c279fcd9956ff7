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
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use serde::{Deserialize, Serialize};

/// Version byte of every record written by this build.
const RECORD_V1: u8 = 1;
/// Schema version stored in `meta/schema`.
const SCHEMA_VERSION: &[u8] = b"1";

/// Key in `meta` of the cluster identity: `host\ndir\nprocess\nincarnation`.
const CLUSTER_IDENTITY: &str = "cluster_identity";

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error("storage at {path} was written by an incompatible version (schema {found})")]
    Schema { path: String, found: String },
    /// Another process holds the database's lock (sled allows one process per directory).
    #[error(
        "storage.path {path} is in use by another process: probably another link-counter \
         is running on this data directory; stop it, or give this instance its own \
         storage.path (LINK_COUNTER__STORAGE__PATH)"
    )]
    Locked { path: String },
    /// The directory cannot be created or opened.
    #[error("cannot open storage.path {path}: {source}{hint}")]
    Open {
        path: String,
        source: sled::Error,
        /// What to check, when the cause suggests it ("" otherwise).
        hint: &'static str,
    },
}

impl StorageError {
    /// An error of [`Storage::open`], named after the directory it was opening.
    fn opening(self, path: &Path) -> StorageError {
        let StorageError::Sled(source) = self else {
            return self;
        };
        let path = path.display().to_string();
        match &source {
            // sled reports its failed `flock` as an `Other` I/O error with this text.
            sled::Error::Io(e) if e.to_string().contains("could not acquire lock") => {
                StorageError::Locked { path }
            }
            sled::Error::Io(e) => {
                let hint = match e.kind() {
                    std::io::ErrorKind::PermissionDenied => {
                        " (the user running link-counter needs to be able to create and write it)"
                    }
                    std::io::ErrorKind::NotADirectory | std::io::ErrorKind::AlreadyExists => {
                        " (it must be a directory, or not exist yet)"
                    }
                    _ => "",
                };
                StorageError::Open { path, source, hint }
            }
            _ => StorageError::Open {
                path,
                source,
                hint: "",
            },
        }
    }
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
    /// Highest distinct-visitor figure seen (records written before visitors
    /// were counted read as 0).
    #[serde(default)]
    pub peak_visitors: u64,
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

/// A record tree with an index by last activity, so the least recently
/// active records are found without a scan: `data` maps page -> record,
/// `age` holds one empty-valued key `active_ms (8 bytes, big-endian) ++ page`
/// per record. A write puts the new age key before the record and removes
/// the old one after it, so a crash in between leaves at worst a stale age
/// key (repaired when it is reached), never a record without one.
#[derive(Clone)]
struct Capped {
    /// Page id -> versioned record.
    data: sled::Tree,
    /// The age index.
    age: sled::Tree,
    /// Records in `data` (sled's `len` is a scan).
    len: Arc<AtomicUsize>,
    /// Activity time of a stored record (0 for one that does not decode).
    active: fn(&[u8], &[u8]) -> u64,
}

fn age_key(active_ms: u64, page: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + page.len());
    k.extend_from_slice(&active_ms.to_be_bytes());
    k.extend_from_slice(page);
    k
}

/// Splits an age key into (activity time, page).
fn split_age_key(k: &[u8]) -> Option<(u64, &[u8])> {
    let (t, page) = k.split_first_chunk::<8>()?;
    Some((u64::from_be_bytes(*t), page))
}

impl Capped {
    /// Opens both trees; rebuilds the index when it does not match the data
    /// (a database written before the index existed, or damaged).
    fn open(
        db: &sled::Db,
        name: &str,
        active: fn(&[u8], &[u8]) -> u64,
    ) -> Result<Capped, StorageError> {
        let data = db.open_tree(name)?;
        let age = db.open_tree(format!("{name}_by_age"))?;
        let len = data.iter().keys().count();
        let indexed = data
            .iter()
            .values()
            .filter(|v| v.as_ref().is_ok_and(|v| !is_foreign(v)))
            .count();
        if age.iter().keys().count() != indexed {
            tracing::info!(tree = name, records = len, "rebuilding the activity index");
            age.clear()?;
            let mut batch = sled::Batch::default();
            for item in data.iter() {
                let (k, v) = item?;
                if !is_foreign(&v) {
                    batch.insert(age_key(active(&k, &v), &k), &[]);
                }
            }
            age.apply_batch(batch)?;
        }
        Ok(Capped {
            data,
            age,
            len: Arc::new(AtomicUsize::new(len)),
            active,
        })
    }

    fn get(&self, page: &str) -> Result<Option<sled::IVec>, StorageError> {
        Ok(self.data.get(page)?)
    }

    /// Writes one record, active at `active_ms`.
    fn put(&self, page: &str, value: Vec<u8>, active_ms: u64) -> Result<(), StorageError> {
        let key = page.as_bytes();
        let new_age = age_key(active_ms, key);
        self.age.insert(new_age.as_slice(), &[])?;
        match self.data.insert(key, value)? {
            None => {
                self.len.fetch_add(1, Ordering::Relaxed);
            }
            Some(old) => {
                let old_age = age_key((self.active)(key, &old), key);
                if old_age != new_age {
                    self.age.remove(old_age)?;
                }
            }
        }
        Ok(())
    }

    /// Walks the index from the oldest key, deleting each record whose
    /// indexed time `doomed` accepts and that `keep` does not, until
    /// `done()`. Stale index keys met on the way are repaired; a record
    /// rewritten meanwhile is left alone. Returns the pages deleted.
    fn evict_oldest(
        &self,
        done: impl Fn() -> bool,
        doomed: impl Fn(u64) -> bool,
        keep: impl Fn(&str) -> bool,
    ) -> Result<Vec<String>, StorageError> {
        let mut deleted = Vec::new();
        for item in self.age.iter().keys() {
            if done() {
                break;
            }
            let age = item?;
            let Some((indexed, page)) = split_age_key(&age) else {
                self.age.remove(&age)?;
                continue;
            };
            if !doomed(indexed) {
                break;
            }
            let Some(value) = self.data.get(page)? else {
                self.age.remove(&age)?;
                continue;
            };
            if is_foreign(&value) {
                // A newer build's record: never deleted by this one.
                self.age.remove(&age)?;
                continue;
            }
            let active = (self.active)(page, &value);
            if active > indexed {
                // Stale: the record has a newer key of its own.
                self.age.remove(&age)?;
                self.age.insert(age_key(active, page), &[])?;
                continue;
            }
            let name = String::from_utf8_lossy(page);
            if keep(&name) {
                continue;
            }
            let swapped = self
                .data
                .compare_and_swap(page, Some(value), None as Option<&[u8]>)?;
            if swapped.is_ok() {
                self.len.fetch_sub(1, Ordering::Relaxed);
                self.age.remove(&age)?;
                deleted.push(name.into_owned());
            }
        }
        Ok(deleted)
    }

    /// Deletes the least recently active records until at most `max` remain.
    fn trim(&self, max: usize, keep: impl Fn(&str) -> bool) -> Result<Vec<String>, StorageError> {
        if self.len.load(Ordering::Relaxed) <= max {
            return Ok(Vec::new());
        }
        self.evict_oldest(|| self.len.load(Ordering::Relaxed) <= max, |_| true, keep)
    }

    /// Deletes the records last active before `cutoff_ms`.
    fn expire(&self, cutoff_ms: u64, keep: impl Fn(&str) -> bool) -> Result<usize, StorageError> {
        Ok(self.evict_oldest(|| false, |t| t < cutoff_ms, keep)?.len())
    }
}

fn stats_active(key: &[u8], value: &[u8]) -> u64 {
    decode::<PageStats>(key, value).map_or(0, |s| s.last_active_ms.unwrap_or(0))
}

fn room_active(key: &[u8], value: &[u8]) -> u64 {
    decode::<RoomRecord>(key, value).map_or(0, |r| r.last_active_ms)
}

/// Whether the sled database in `path` was created with compression (sled
/// records it in its `conf` file and refuses to open it with the other
/// setting); `None` for a new database. New databases are compressed (zstd):
/// records are JSON, and compression also shrinks the garbage sled keeps
/// until it cleans a segment (the data directory under an id flood:
/// BENCHMARKS.md, `flood`).
fn compression_of(path: &Path) -> Option<bool> {
    let conf = std::fs::read(path.join("conf")).ok()?;
    String::from_utf8_lossy(&conf).lines().find_map(|l| {
        match l.strip_prefix("use_compression:")?.trim() {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        }
    })
}

/// Handle to the database; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct Storage {
    /// The sled database (kept for flushes).
    db: sled::Db,
    /// Per-page stats records.
    stats: Capped,
    /// Per-room records.
    rooms: Capped,
    /// The data directory, absolute (ties the cluster identity to it).
    path: std::sync::Arc<std::path::PathBuf>,
}

impl Storage {
    /// Opens (or creates) the database in `path`.
    pub fn open(path: &Path, cache_capacity: u64) -> Result<Storage, StorageError> {
        Self::open_db(path, cache_capacity).map_err(|e| e.opening(path))
    }

    fn open_db(path: &Path, cache_capacity: u64) -> Result<Storage, StorageError> {
        let compress = compression_of(path).unwrap_or(true);
        if !compress {
            tracing::info!(
                path = %path.display(),
                "this data directory was created without compression; it stays uncompressed"
            );
        }
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_capacity)
            .use_compression(compress)
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
            stats: Capped::open(&db, "stats", stats_active)?,
            rooms: Capped::open(&db, "rooms", room_active)?,
            db,
            path: std::sync::Arc::new(std::fs::canonicalize(path).unwrap_or_else(|_| path.into())),
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

    /// Writes many stats records.
    pub fn save_stats<'a>(
        &self,
        records: impl IntoIterator<Item = (&'a str, &'a PageStats)>,
    ) -> Result<(), StorageError> {
        for (page, stats) in records {
            let active = stats.last_active_ms.unwrap_or(0);
            self.stats.put(page, encode(stats), active)?;
        }
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
        self.rooms.put(page, encode(record), record.last_active_ms)
    }

    /// Deletes room records inactive since before `cutoff_ms`, except pages
    /// for which `keep` says yes. Returns how many were deleted.
    pub fn expire_rooms(
        &self,
        cutoff_ms: u64,
        keep: impl Fn(&str) -> bool,
    ) -> Result<usize, StorageError> {
        self.rooms.expire(cutoff_ms, keep)
    }

    /// Deletes stats of pages inactive since before `cutoff_ms`, except pages
    /// for which `keep` says yes. Returns how many were deleted.
    pub fn expire_stats(
        &self,
        cutoff_ms: u64,
        keep: impl Fn(&str) -> bool,
    ) -> Result<usize, StorageError> {
        self.stats.expire(cutoff_ms, keep)
    }

    /// Deletes the least recently active records of each store past `max`
    /// records, except pages for which `keep` says yes. Returns the pages
    /// whose stats were deleted and how many room records were.
    pub fn trim(
        &self,
        max: usize,
        keep: impl Fn(&str) -> bool,
    ) -> Result<(Vec<String>, usize), StorageError> {
        Ok((
            self.stats.trim(max, &keep)?,
            self.rooms.trim(max, &keep)?.len(),
        ))
    }

    /// Number of stored room records.
    pub fn room_records(&self) -> usize {
        self.rooms.len.load(Ordering::Relaxed)
    }

    /// Number of stored stats records.
    pub fn stats_records(&self) -> usize {
        self.stats.len.load(Ordering::Relaxed)
    }

    /// The cluster identity this data directory last registered under, as
    /// `(process, incarnation)`: `None` if there is none, or if it was saved
    /// on another host or in another directory (a copied data directory is a
    /// new node, not this one).
    pub fn cluster_identity(&self) -> Result<Option<(String, u64)>, StorageError> {
        let Some(v) = self.db.open_tree("meta")?.get(CLUSTER_IDENTITY)? else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(&v);
        let mut parts = text.splitn(4, '\n');
        let (Some(host), Some(dir), Some(process), Some(inc)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Ok(None);
        };
        if host != self.host() || dir != self.dir() || process.is_empty() {
            return Ok(None);
        }
        Ok(inc.parse().ok().map(|inc| (process.to_owned(), inc)))
    }

    /// Saves the cluster identity about to be registered, and waits until it
    /// is on disk (so a crash right after the registration finds it).
    pub fn save_cluster_identity(
        &self,
        process: &str,
        incarnation: u64,
    ) -> Result<(), StorageError> {
        let v = format!("{}\n{}\n{process}\n{incarnation}", self.host(), self.dir());
        self.db
            .open_tree("meta")?
            .insert(CLUSTER_IDENTITY, v.as_bytes())?;
        self.flush()
    }

    /// This host's name, as the kernel has it ("" where unknown).
    fn host(&self) -> String {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default()
    }

    /// The data directory, absolute.
    fn dir(&self) -> String {
        self.path.display().to_string()
    }

    /// Writes everything to disk and waits for it.
    pub fn flush(&self) -> Result<(), StorageError> {
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats_at(ms: u64) -> PageStats {
        PageStats {
            total_connections: 1,
            last_active_ms: Some(ms),
            ..PageStats::default()
        }
    }

    fn kept(s: &Storage, pages: &[&str]) -> Vec<bool> {
        pages
            .iter()
            .map(|p| s.load_stats(p).expect("read").is_some())
            .collect()
    }

    /// A new database is compressed; one created without compression (an
    /// earlier build) opens as it is, with its records.
    #[test]
    fn compression_follows_the_database() {
        let fresh = tempfile::tempdir().expect("dir");
        drop(Storage::open(fresh.path(), 1 << 20).expect("open"));
        assert_eq!(compression_of(fresh.path()), Some(true));
        let old = tempfile::tempdir().expect("dir");
        {
            let db = sled::Config::new()
                .path(old.path())
                .use_compression(false)
                .open()
                .expect("plain sled");
            db.open_tree("meta")
                .expect("meta")
                .insert("schema", SCHEMA_VERSION)
                .expect("schema");
            db.open_tree("stats")
                .expect("stats")
                .insert("kept", encode(&stats_at(5)))
                .expect("record");
            db.flush().expect("flush");
        }
        let s = Storage::open(old.path(), 1 << 20).expect("an uncompressed database opens");
        assert_eq!(compression_of(old.path()), Some(false));
        assert_eq!(s.load_stats("kept").expect("read"), Some(stats_at(5)));
    }

    /// A stats record written before visitors were counted (no
    /// `peak_visitors`) reads with a peak of 0 visitors and its other fields.
    /// Opens `path` once the previous handle's background flusher has let go
    /// of the directory's lock (sled releases it from that thread).
    fn reopen(path: &Path) -> Storage {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Storage::open(path, 1 << 20) {
                Err(StorageError::Locked { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                r => return r.expect("reopen"),
            }
        }
    }

    /// The cluster identity survives a reopen of the same directory, and a
    /// copy of the directory elsewhere does not inherit it.
    #[test]
    fn cluster_identity_belongs_to_its_directory() {
        let dir = tempfile::tempdir().expect("dir");
        let s = Storage::open(dir.path(), 1 << 20).expect("open");
        assert_eq!(s.cluster_identity().expect("read"), None);
        s.save_cluster_identity("18a-2f", 3).expect("save");
        drop(s);
        let s = reopen(dir.path());
        assert_eq!(
            s.cluster_identity().expect("read"),
            Some(("18a-2f".to_owned(), 3))
        );
        drop(s);
        let copy = tempfile::tempdir().expect("dir");
        for entry in std::fs::read_dir(dir.path()).expect("list") {
            let entry = entry.expect("entry");
            if entry.file_type().expect("type").is_file() {
                std::fs::copy(entry.path(), copy.path().join(entry.file_name())).expect("copy");
            } else {
                let sub = copy.path().join(entry.file_name());
                std::fs::create_dir_all(&sub).expect("mkdir");
                for f in std::fs::read_dir(entry.path()).expect("list") {
                    let f = f.expect("entry");
                    std::fs::copy(f.path(), sub.join(f.file_name())).expect("copy");
                }
            }
        }
        let c = Storage::open(copy.path(), 1 << 20).expect("open the copy");
        assert_eq!(c.cluster_identity().expect("read"), None);
    }

    #[test]
    fn stats_records_without_peak_visitors_stay_readable() {
        let dir = tempfile::tempdir().expect("dir");
        let s = Storage::open(dir.path(), 1 << 20).expect("open");
        // The record as an earlier build wrote it, straight into the tree.
        let mut old = vec![RECORD_V1];
        old.extend_from_slice(
            br#"{"total_connections":9,"peak_connections":4,"peak_at_ms":7,"last_active_ms":8}"#,
        );
        s.stats.data.insert("old", old).expect("record");
        let expected = PageStats {
            total_connections: 9,
            peak_connections: 4,
            peak_at_ms: Some(7),
            peak_visitors: 0,
            last_active_ms: Some(8),
        };
        assert_eq!(s.load_stats("old").expect("read"), Some(expected.clone()));
        // Written back, the new field is kept.
        let newer = PageStats {
            peak_visitors: 3,
            ..expected
        };
        s.save_stats([("old", &newer)]).expect("save");
        assert_eq!(s.load_stats("old").expect("read"), Some(newer));
    }

    /// The cap deletes the least recently active records first, keeps what
    /// `keep` names, repairs stale index keys instead of trusting them, and
    /// the index is rebuilt when a database lacks it.
    #[test]
    fn trim_goes_by_last_activity_and_survives_a_stale_or_missing_index() {
        let dir = tempfile::tempdir().expect("dir");
        let pages = ["p1", "p2", "p3", "p4", "p5", "p6"];
        {
            let s = Storage::open(dir.path(), 1 << 20).expect("open");
            for (i, p) in pages.iter().enumerate() {
                s.save_stats([(*p, &stats_at(10 + i as u64))])
                    .expect("save");
            }
            // p2 rewritten later: now the most recent.
            s.save_stats([("p2", &stats_at(100))]).expect("save");
            assert_eq!(s.stats_records(), 6);
            let (gone, _) = s.trim(4, |p| p == "p1").expect("trim");
            assert_eq!(gone, ["p3", "p4"]);
            assert_eq!(kept(&s, &pages), [true, true, false, false, true, true]);
            // A stale key (as a crash between the two writes leaves): p5
            // indexed as the oldest although its record is newer.
            s.stats.age.insert(age_key(0, b"p5"), &[]).expect("insert");
            let (gone, _) = s.trim(3, |_| false).expect("trim");
            assert_eq!(gone, ["p1"]);
            assert_eq!(kept(&s, &pages), [false, true, false, false, true, true]);
            s.db.drop_tree("stats_by_age").expect("drop index");
            s.flush().expect("flush");
        }
        let s = reopen(dir.path());
        assert_eq!(s.stats_records(), 3);
        let (gone, _) = s.trim(1, |_| false).expect("trim");
        assert_eq!(gone, ["p5", "p6"]);
        assert_eq!(kept(&s, &pages), [false, true, false, false, false, false]);
    }
}
