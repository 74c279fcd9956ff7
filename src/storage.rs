//! Persistence: the only module that touches sled.
//!
//! Trees: `meta` (schema version, record counts, cluster identity), `stats`
//! (one record per page: totals, peak, last activity), `rooms` (one record
//! per page room: the links its connections subscribed to, its last
//! activity), an index by last activity of each of those two
//! (`stats_by_age`, `rooms_by_age`, see [`Capped`]) and `history` (per page
//! and for the site, the peaks of each minute and each hour, see
//! [`Resolution`]). Every value starts with a version byte followed by a
//! compact binary encoding (records of schema 1 hold JSON and are still
//! read), so the encoding can evolve.
//! Live counts are never stored: connections do not survive a restart.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Instant,
};

use serde::{Deserialize, Serialize};
use sled::transaction::{
    TransactionError, Transactional, TransactionalTree, UnabortableTransactionError,
};

use crate::protocol::{PageId, Tally};

/// Version byte of a record of schema 1: JSON (read, no longer written).
const RECORD_V1: u8 = 1;
/// Version byte of every record written by this build: binary (see [`Record`]).
const RECORD_V2: u8 = 2;
/// Schema version stored in `meta/schema`: record counts kept exact by
/// transactions ([`Capped`]).
const SCHEMA_VERSION: &[u8] = b"3";
/// An earlier schema, opened and migrated: binary records, record counts in
/// `meta` exact only after a clean close (which left [`CLEAN`]); without the
/// mark the records are counted at open, once.
const SCHEMA_V2: &[u8] = b"2";
/// The first schema, opened and migrated: records of version 1 (read as they
/// are, rewritten in version 2 when next written), no record counts in
/// `meta` (counted at open, once).
const SCHEMA_V1: &[u8] = b"1";

/// Key in `meta` that schema 2 left at a clean close: its counts are exact.
const CLEAN: &str = "clean";

/// Records created or deleted by one transaction: each transaction adds a
/// batch marker to sled's log and rewrites the count, and holds sled's
/// write lock (every other read and write of the database waits).
const RECORDS_PER_TRANSACTION: usize = 16;

/// Keys in `meta` of the record counts of the stores (8 bytes, big-endian).
const STATS_COUNT: &str = "records/stats";
const ROOMS_COUNT: &str = "records/rooms";

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
    /// The page's outbound links: the last non-empty link set one of its
    /// connections subscribed to. Read back through the page-id rules: a
    /// record with a link that breaks them is unreadable (and skipped).
    pub links: Vec<PageId>,
    /// Last activity of the room (ms since epoch).
    pub last_active_ms: u64,
}

/// A record of a capped store, in its binary form (version 2): the
/// fields in order, numbers as LEB128 varints, an optional time as 0 for
/// none and `ms + 1` otherwise, strings as their length then their bytes.
trait Record: Sized + for<'de> Deserialize<'de> {
    fn put(&self, out: &mut Vec<u8>);
    fn take(bytes: &mut &[u8]) -> Option<Self>;
}

fn put_opt(out: &mut Vec<u8>, v: Option<u64>) {
    put_varint(out, v.map_or(0, |v| v.saturating_add(1)));
}

fn take_opt(bytes: &mut &[u8]) -> Option<Option<u64>> {
    take_varint(bytes).map(|v| v.checked_sub(1))
}

impl Record for PageStats {
    fn put(&self, out: &mut Vec<u8>) {
        put_varint(out, self.total_connections);
        put_varint(out, self.peak_connections);
        put_opt(out, self.peak_at_ms);
        put_varint(out, self.peak_visitors);
        put_opt(out, self.last_active_ms);
    }

    fn take(bytes: &mut &[u8]) -> Option<Self> {
        Some(PageStats {
            total_connections: take_varint(bytes)?,
            peak_connections: take_varint(bytes)?,
            peak_at_ms: take_opt(bytes)?,
            peak_visitors: take_varint(bytes)?,
            last_active_ms: take_opt(bytes)?,
        })
    }
}

impl Record for RoomRecord {
    fn put(&self, out: &mut Vec<u8>) {
        put_varint(out, self.last_active_ms);
        for link in &self.links {
            put_varint(out, link.len() as u64);
            out.extend_from_slice(link.as_bytes());
        }
    }

    fn take(bytes: &mut &[u8]) -> Option<Self> {
        let last_active_ms = take_varint(bytes)?;
        let mut links = Vec::new();
        while !bytes.is_empty() {
            let len = usize::try_from(take_varint(bytes)?).ok()?;
            let (link, rest) = bytes.split_at_checked(len)?;
            links.push(PageId::parse(std::str::from_utf8(link).ok()?).ok()?);
            *bytes = rest;
        }
        Some(RoomRecord {
            links,
            last_active_ms,
        })
    }
}

fn encode<T: Record>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(24);
    out.push(RECORD_V2);
    value.put(&mut out);
    out
}

/// True when the record was written by a newer build (never expired by this one).
fn is_foreign(bytes: &[u8]) -> bool {
    bytes.first().is_some_and(|v| *v > RECORD_V2)
}

fn decode<T: Record>(key: &[u8], bytes: &[u8]) -> Option<T> {
    let decoded = match bytes.split_first() {
        Some((&RECORD_V2, mut rest)) => T::take(&mut rest)
            .filter(|_| rest.is_empty())
            .ok_or_else(|| "bad binary record".to_owned()),
        Some((&RECORD_V1, rest)) => serde_json::from_slice(rest).map_err(|e| e.to_string()),
        _ => {
            tracing::warn!(key = %String::from_utf8_lossy(key), "record of unknown version skipped");
            return None;
        }
    };
    match decoded {
        Ok(v) => Some(v),
        Err(error) => {
            tracing::warn!(key = %String::from_utf8_lossy(key), %error, "unreadable record skipped");
            None
        }
    }
}

/// A record tree with an index by last activity, so the least recently
/// active records are found without a scan: `data` maps page -> record,
/// `age` holds one empty-valued key `active_ms (8 bytes, big-endian) ++ page`
/// per record, and `meta` the record count ([`STATS_COUNT`], [`ROOMS_COUNT`]). Every write
/// that creates or deletes a record is one sled transaction over the three
/// trees (sled recovers a transaction whole or not at all), so after any stop,
/// a `kill -9` included, the stored count is exact and every record has its
/// index key: nothing at open reads every record.
#[derive(Clone)]
struct Capped {
    /// Page id -> versioned record.
    data: sled::Tree,
    /// The age index.
    age: sled::Tree,
    /// The `meta` tree, which holds the count under `count`.
    meta: sled::Tree,
    /// The count's key in `meta`.
    count: &'static str,
    /// Records in `data`: the stored count, mirrored (sled's `len` is a scan).
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

/// A stored count (8 bytes, big-endian; absent: 0).
fn read_count(v: Option<&[u8]>) -> u64 {
    v.and_then(|v| v.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

/// Adds `delta` to the count at `key`, inside a transaction.
fn add_to_count(
    meta: &TransactionalTree,
    key: &str,
    delta: i64,
) -> Result<(), UnabortableTransactionError> {
    let n = read_count(meta.get(key)?.as_deref()).saturating_add_signed(delta);
    meta.insert(key, &n.to_be_bytes())?;
    Ok(())
}

/// A transaction's error (its closures never abort).
fn tx_error(e: TransactionError<()>) -> StorageError {
    match e {
        TransactionError::Storage(e) => StorageError::Sled(e),
        TransactionError::Abort(()) => StorageError::Sled(sled::Error::ReportableBug(
            "a storage transaction aborted".to_owned(),
        )),
    }
}

impl Capped {
    /// Opens both trees. With `exact` the count in `meta` is trusted;
    /// without it (a database of an earlier schema not closed cleanly), or
    /// when the index is empty while there are records (written before the
    /// index existed), the records are counted and indexed here, once.
    fn open(
        db: &sled::Db,
        meta: &sled::Tree,
        name: &'static str,
        count: &'static str,
        active: fn(&[u8], &[u8]) -> u64,
        exact: bool,
    ) -> Result<Capped, StorageError> {
        let stored = read_count(meta.get(count)?.as_deref());
        let capped = Capped {
            data: db.open_tree(name)?,
            age: db.open_tree(format!("{name}_by_age"))?,
            meta: meta.clone(),
            count,
            len: Arc::new(AtomicUsize::new(
                usize::try_from(stored).unwrap_or(usize::MAX),
            )),
            active,
        };
        let unindexed = capped.age.first()?.is_none() && capped.data.first()?.is_some();
        if !exact || unindexed {
            let started = Instant::now();
            let (records, added) = capped.count_and_index()?;
            tracing::info!(
                store = name,
                records,
                index_keys_added = added,
                secs = started.elapsed().as_secs_f64(),
                "records counted and indexed"
            );
        }
        Ok(capped)
    }

    /// Reads every record: adds any missing index key and stores the exact
    /// count. Returns (records, index keys added).
    fn count_and_index(&self) -> Result<(usize, usize), StorageError> {
        let (mut records, mut added) = (0, 0);
        let mut batch = sled::Batch::default();
        for item in self.data.iter() {
            let (k, v) = item?;
            records += 1;
            if !is_foreign(&v) {
                let key = age_key((self.active)(&k, &v), &k);
                if !self.age.contains_key(&key)? {
                    batch.insert(key, &[]);
                    added += 1;
                }
            }
        }
        self.age.apply_batch(batch)?;
        self.meta
            .insert(self.count, &(records as u64).to_be_bytes())?;
        self.len.store(records, Ordering::Relaxed);
        Ok((records, added))
    }

    fn get(&self, page: &str) -> Result<Option<sled::IVec>, StorageError> {
        Ok(self.data.get(page)?)
    }

    /// Writes records, each `(page, record, active_ms)`. A rewrite of a
    /// stored record changes no count: it is a compare-and-swap, its new
    /// index key written before it and the old one removed after it (a crash
    /// in between leaves at worst a stale index key, repaired when the trim
    /// reaches it; sled recovers a prefix of the writes). New records go in
    /// transactions of up to [`RECORDS_PER_TRANSACTION`], each with the count.
    fn put_many<'a>(
        &self,
        records: impl IntoIterator<Item = (&'a str, Vec<u8>, u64)>,
    ) -> Result<(), StorageError> {
        let mut new = Vec::new();
        for (page, value, active_ms) in records {
            let key = page.as_bytes();
            let value = sled::IVec::from(value);
            let new_age = age_key(active_ms, key);
            if !self.rewrite(key, &value, &new_age)? {
                new.push((key, value, new_age));
                if new.len() == RECORDS_PER_TRANSACTION {
                    self.create(&new)?;
                    new.clear();
                }
            }
        }
        if !new.is_empty() {
            self.create(&new)?;
        }
        Ok(())
    }

    /// Rewrites a stored record; false if there is none.
    fn rewrite(
        &self,
        key: &[u8],
        value: &sled::IVec,
        new_age: &[u8],
    ) -> Result<bool, StorageError> {
        let Some(mut old) = self.data.get(key)? else {
            return Ok(false);
        };
        self.age.insert(new_age, &[])?;
        loop {
            match self.data.compare_and_swap(key, Some(&old), Some(value))? {
                Ok(()) => break,
                Err(e) => match e.current {
                    Some(current) => old = current,
                    // Deleted meanwhile: created again with its count.
                    None => return Ok(false),
                },
            }
        }
        let old_age = age_key((self.active)(key, &old), key);
        if old_age != new_age {
            self.age.remove(old_age)?;
        }
        Ok(true)
    }

    /// Writes records not stored a moment ago, with their index keys and the
    /// count, in one transaction (one created meanwhile is rewritten in it).
    fn create(&self, records: &[(&[u8], sled::IVec, Vec<u8>)]) -> Result<(), StorageError> {
        let created = (&self.data, &self.age, &self.meta)
            .transaction(|(data, age, meta)| {
                let mut created = 0;
                for (key, value, new_age) in records {
                    age.insert(new_age.as_slice(), &[])?;
                    match data.insert(*key, value.clone())? {
                        None => created += 1,
                        Some(old) => {
                            let old_age = age_key((self.active)(key, &old), key);
                            if old_age != *new_age {
                                age.remove(old_age)?;
                            }
                        }
                    }
                }
                if created > 0 {
                    add_to_count(meta, self.count, created)?;
                }
                Ok(created)
            })
            .map_err(tx_error)?;
        self.len
            .fetch_add(usize::try_from(created).unwrap_or(0), Ordering::Relaxed);
        Ok(())
    }

    /// Walks the index from the oldest key, deleting up to `most` records
    /// (all: `usize::MAX`) whose indexed time `doomed` accepts and that
    /// `keep` does not. Stale index keys met on the way are repaired; a
    /// record rewritten meanwhile is left alone. Returns the pages deleted.
    fn evict_oldest(
        &self,
        most: usize,
        doomed: impl Fn(u64) -> bool,
        keep: impl Fn(&str) -> bool,
    ) -> Result<Vec<String>, StorageError> {
        let mut deleted = Vec::new();
        let mut batch = Vec::new();
        for item in self.age.iter().keys() {
            if deleted.len() + batch.len() >= most {
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
            if keep(&String::from_utf8_lossy(page)) {
                continue;
            }
            batch.push((age, value));
            if batch.len() == RECORDS_PER_TRANSACTION {
                deleted.extend(self.delete(&batch)?);
                batch.clear();
            }
        }
        if !batch.is_empty() {
            deleted.extend(self.delete(&batch)?);
        }
        Ok(deleted)
    }

    /// Deletes records, each given by its index key and the value it had
    /// when chosen, with their index keys and the count, in one transaction;
    /// a record rewritten meanwhile stays. Returns the pages deleted.
    fn delete(&self, records: &[(sled::IVec, sled::IVec)]) -> Result<Vec<String>, StorageError> {
        let deleted = (&self.data, &self.age, &self.meta)
            .transaction(|(data, age_tree, meta)| {
                let mut deleted = Vec::new();
                for (age, value) in records {
                    let Some((_, page)) = split_age_key(age) else {
                        continue;
                    };
                    if data.get(page)?.as_ref() == Some(value) {
                        data.remove(page)?;
                        age_tree.remove(age.as_ref())?;
                        deleted.push(String::from_utf8_lossy(page).into_owned());
                    }
                }
                if !deleted.is_empty() {
                    add_to_count(meta, self.count, -(deleted.len() as i64))?;
                }
                Ok(deleted)
            })
            .map_err(tx_error)?;
        self.len.fetch_sub(deleted.len(), Ordering::Relaxed);
        Ok(deleted)
    }

    /// Deletes the least recently active records until at most `max` remain.
    fn trim(&self, max: usize, keep: impl Fn(&str) -> bool) -> Result<Vec<String>, StorageError> {
        let over = self.len.load(Ordering::Relaxed).saturating_sub(max);
        if over == 0 {
            return Ok(Vec::new());
        }
        self.evict_oldest(over, |_| true, keep)
    }

    /// Deletes the records last active before `cutoff_ms`.
    fn expire(&self, cutoff_ms: u64, keep: impl Fn(&str) -> bool) -> Result<usize, StorageError> {
        Ok(self
            .evict_oldest(usize::MAX, |t| t < cutoff_ms, keep)?
            .len())
    }
}

fn stats_active(key: &[u8], value: &[u8]) -> u64 {
    decode::<PageStats>(key, value).map_or(0, |s| s.last_active_ms.unwrap_or(0))
}

fn room_active(key: &[u8], value: &[u8]) -> u64 {
    decode::<RoomRecord>(key, value).map_or(0, |r| r.last_active_ms)
}

// ---------------------------------------------------------------- history

/// Version byte of a history record.
const HISTORY_V1: u8 = 1;

/// The history key of the whole site (no page id is empty).
pub(crate) const SITE: &str = "";

/// The two resolutions of the history. A record holds one bucket of slots:
/// a minute record the minutes of one hour (60 slots), an hour record the
/// hours of one day (24 slots). Its key is `page ++ "/" ++ tag ++ bucket`
/// (the bucket's index since the Unix epoch, 4 bytes big-endian): a page id
/// has no `/`, so a page's records are one prefix (deleted with its stats)
/// and lie in time order. Its value is [`HISTORY_V1`] then, for each slot
/// with someone, in slot order: the slot (1 byte) and the peaks of visitors
/// and connections (LEB128 varints). Writes go through sled's merge, which
/// keeps the larger of each figure per slot, so a peak is never lowered and
/// a minute written twice (before and after a restart) keeps its maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resolution {
    Minute,
    Hour,
}

impl Resolution {
    /// Length of one slot in ms.
    pub(crate) fn step_ms(self) -> u64 {
        match self {
            Resolution::Minute => 60_000,
            Resolution::Hour => 3_600_000,
        }
    }

    /// Length of one record's bucket in ms.
    fn bucket_ms(self) -> u64 {
        match self {
            Resolution::Minute => 3_600_000,
            Resolution::Hour => 86_400_000,
        }
    }

    fn tag(self) -> u8 {
        match self {
            Resolution::Minute => b'm',
            Resolution::Hour => b'h',
        }
    }
}

/// How long each resolution is kept (`storage.history_minutes`, `storage.history_hours`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryRetention {
    pub minutes_ms: u64,
    pub hours_ms: u64,
}

impl HistoryRetention {
    fn of(self, res: Resolution) -> u64 {
        match res {
            Resolution::Minute => self.minutes_ms,
            Resolution::Hour => self.hours_ms,
        }
    }
}

/// Largest bucket index (4 bytes; year 490,000 or so for minutes).
fn bucket_of(res: Resolution, ms: u64) -> u32 {
    u32::try_from(ms / res.bucket_ms()).unwrap_or(u32::MAX)
}

fn history_key(page: &str, res: Resolution, bucket: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(page.len() + 6);
    k.extend_from_slice(page.as_bytes());
    k.push(b'/');
    k.push(res.tag());
    k.extend_from_slice(&bucket.to_be_bytes());
    k
}

/// The prefix of every history record of `page`.
fn history_prefix(page: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(page.len() + 1);
    k.extend_from_slice(page.as_bytes());
    k.push(b'/');
    k
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn take_varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = bytes.split_first()?;
        *bytes = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// The slots of a history value, in slot order; `None` if it is not one
/// this build reads.
fn decode_slots(value: &[u8]) -> Option<BTreeMap<u8, Tally>> {
    let (&HISTORY_V1, mut rest) = value.split_first()? else {
        return None;
    };
    let mut slots = BTreeMap::new();
    while let Some((&slot, tail)) = rest.split_first() {
        rest = tail;
        let visitors = take_varint(&mut rest)?;
        let connections = take_varint(&mut rest)?;
        slots.insert(
            slot,
            Tally {
                connections,
                visitors,
            },
        );
    }
    Some(slots)
}

fn encode_slots(slots: &BTreeMap<u8, Tally>) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + slots.len() * 5);
    out.push(HISTORY_V1);
    for (slot, t) in slots {
        out.push(*slot);
        put_varint(&mut out, t.visitors);
        put_varint(&mut out, t.connections);
    }
    out
}

/// sled's merge of history values: the larger of each figure per slot. A
/// stored value this build cannot read (a newer build's) is kept as it is.
fn merge_history(_key: &[u8], old: Option<&[u8]>, new: &[u8]) -> Option<Vec<u8>> {
    let Some(mut slots) = old.map_or(Some(BTreeMap::new()), decode_slots) else {
        return old.map(<[u8]>::to_vec);
    };
    for (slot, t) in decode_slots(new).unwrap_or_default() {
        let kept = slots.entry(slot).or_insert(Tally::ZERO);
        kept.connections = kept.connections.max(t.connections);
        kept.visitors = kept.visitors.max(t.visitors);
    }
    Some(encode_slots(&slots))
}

/// One peak to record: the history key (a page id or [`SITE`]), the start
/// of its minute (ms since epoch) and the minute's peaks.
pub type MinutePeak = (PageId, u64, Tally);

/// The history tree.
#[derive(Clone)]
struct HistoryTree(sled::Tree);

impl HistoryTree {
    fn open(db: &sled::Db) -> Result<HistoryTree, StorageError> {
        let tree = db.open_tree("history")?;
        tree.set_merge_operator(merge_history);
        Ok(HistoryTree(tree))
    }

    /// Merges one minute's peaks into its minute record and its hour's slot
    /// of the day record. A record it creates (a new bucket) first deletes
    /// the key's buckets past their retention.
    fn record(
        &self,
        key: &str,
        minute_ms: u64,
        peak: Tally,
        keep: HistoryRetention,
    ) -> Result<(), StorageError> {
        for res in [Resolution::Minute, Resolution::Hour] {
            let bucket = bucket_of(res, minute_ms);
            let slot = (minute_ms % res.bucket_ms()) / res.step_ms();
            let value = encode_slots(&BTreeMap::from([(slot as u8, peak)]));
            let k = history_key(key, res, bucket);
            // The counter is the only writer: no one creates it in between.
            let created = !self.0.contains_key(&k)?;
            self.0.merge(k, value)?;
            if created {
                let cutoff = bucket_of(res, minute_ms.saturating_sub(keep.of(res)));
                self.delete_range(key, res, 0, cutoff)?;
            }
        }
        Ok(())
    }

    /// Deletes the buckets `from..to` of `key` at `res`.
    fn delete_range(
        &self,
        key: &str,
        res: Resolution,
        from: u32,
        to: u32,
    ) -> Result<(), StorageError> {
        if from >= to {
            return Ok(());
        }
        let range = history_key(key, res, from)..history_key(key, res, to);
        for k in self.0.range(range).keys() {
            self.0.remove(k?)?;
        }
        Ok(())
    }

    /// Deletes every record of `page`.
    fn delete(&self, page: &str) -> Result<(), StorageError> {
        for k in self.0.scan_prefix(history_prefix(page)).keys() {
            self.0.remove(k?)?;
        }
        Ok(())
    }
}

/// Whether the sled database in `path` was created with compression (sled
/// records it in its `conf` file and refuses to open it with the other
/// setting); `None` for a new database.
fn compression_of(path: &Path) -> Option<Compression> {
    let conf = std::fs::read(path.join("conf")).ok()?;
    String::from_utf8_lossy(&conf).lines().find_map(|l| {
        match l.strip_prefix("use_compression:")?.trim() {
            "true" => Some(Compression::Zstd),
            "false" => Some(Compression::None),
            _ => None,
        }
    })
}

/// How a new data directory stores what it writes (`storage.compression`).
/// An existing one keeps what it was created with: sled cannot change it in
/// place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// zstd (sled's `compression` feature): it shrinks the records and the
    /// garbage sled keeps until it cleans a segment, at about 6× the CPU
    /// per write (BENCHMARKS.md, flood and storage writes).
    Zstd,
    /// Records as they are.
    None,
}

impl Compression {
    /// Every value, in the order the documentation lists them.
    pub(crate) const ALL: [Compression; 2] = [Compression::Zstd, Compression::None];

    /// The config value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Compression::Zstd => "zstd",
            Compression::None => "none",
        }
    }
}

/// sled's settings for the database in `path`.
fn sled_config(path: &Path, cache_capacity: u64, compression: Compression) -> sled::Config {
    sled::Config::new()
        .path(path)
        .cache_capacity(cache_capacity)
        .use_compression(compression == Compression::Zstd)
        .flush_every_ms(Some(200))
}

/// Test hook: opens the sled database in `path` with the settings
/// [`Storage::open`] uses and nothing else (no tree opened, nothing read or
/// written): the ceiling of an open, for measurements. Dropping the handle
/// closes it.
#[cfg(feature = "test-hooks")]
pub fn open_sled(path: &Path, cache_capacity: u64) -> Result<SledOnly, StorageError> {
    let compression = compression_of(path).unwrap_or(Compression::Zstd);
    sled_config(path, cache_capacity, compression)
        .open()
        .map(SledOnly)
        .map_err(|e| StorageError::from(e).opening(path))
}

/// The database opened by [`open_sled`].
#[cfg(feature = "test-hooks")]
pub struct SledOnly(#[allow(dead_code)] sled::Db);

/// Handle to the database; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct Storage {
    /// The sled database (kept for flushes).
    db: sled::Db,
    /// Per-page stats records.
    stats: Capped,
    /// Per-room records.
    rooms: Capped,
    /// Per-page and site-wide peaks.
    history: HistoryTree,
    /// The `meta` tree: schema, record counts, cluster identity.
    meta: sled::Tree,
    /// The data directory, absolute (ties the cluster identity to it).
    path: std::sync::Arc<std::path::PathBuf>,
}

impl Storage {
    /// Opens (or creates, compressed) the database in `path`.
    pub fn open(path: &Path, cache_capacity: u64) -> Result<Storage, StorageError> {
        Self::open_with(path, cache_capacity, Compression::Zstd)
    }

    /// Opens the database in `path`, or creates it with `new` compression.
    pub fn open_with(
        path: &Path,
        cache_capacity: u64,
        new: Compression,
    ) -> Result<Storage, StorageError> {
        Self::open_db(path, cache_capacity, new).map_err(|e| e.opening(path))
    }

    fn open_db(
        path: &Path,
        cache_capacity: u64,
        new: Compression,
    ) -> Result<Storage, StorageError> {
        let compression = compression_of(path).unwrap_or(new);
        if compression != new {
            tracing::info!(
                path = %path.display(),
                compression = compression.as_str(),
                setting = new.as_str(),
                "this data directory keeps the compression it was created with (storage.compression applies to new ones)"
            );
        }
        let db = sled_config(path, cache_capacity, compression).open()?;
        let meta = db.open_tree("meta")?;
        // Whether the stored record counts can be trusted: always from
        // schema 3 on; in schema 2 only after a clean close.
        let exact = match meta.get("schema")? {
            None => true,
            Some(v) if v.as_ref() == SCHEMA_VERSION => true,
            Some(v) if v.as_ref() == SCHEMA_V2 || v.as_ref() == SCHEMA_V1 => {
                tracing::info!(
                    path = %path.display(),
                    from = %String::from_utf8_lossy(&v),
                    "migrating the data directory to schema 3"
                );
                meta.remove(CLEAN)?.is_some() && v.as_ref() == SCHEMA_V2
            }
            Some(v) => {
                return Err(StorageError::Schema {
                    path: path.display().to_string(),
                    found: String::from_utf8_lossy(&v).into_owned(),
                })
            }
        };
        let storage = Storage {
            stats: Capped::open(&db, &meta, "stats", STATS_COUNT, stats_active, exact)?,
            rooms: Capped::open(&db, &meta, "rooms", ROOMS_COUNT, room_active, exact)?,
            history: HistoryTree::open(&db)?,
            meta,
            db,
            path: std::sync::Arc::new(std::fs::canonicalize(path).unwrap_or_else(|_| path.into())),
        };
        // Last: a crash before this line migrates again.
        storage.meta.insert("schema", SCHEMA_VERSION)?;
        Ok(storage)
    }

    /// Size of the database on disk in bytes (the `storage_bytes` gauge).
    pub fn size_on_disk(&self) -> Result<u64, StorageError> {
        Ok(self.db.size_on_disk()?)
    }

    /// True when the database answers a read.
    pub(crate) fn is_usable(&self) -> Result<(), StorageError> {
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
        self.stats.put_many(
            records
                .into_iter()
                // The site's live link (`protocol::SITE_LINK`) is no page.
                .filter(|(page, _)| *page != SITE)
                .map(|(page, stats)| (page, encode(stats), stats.last_active_ms.unwrap_or(0))),
        )
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
        self.rooms
            .put_many([(page, encode(record), record.last_active_ms)])
    }

    /// Deletes room records inactive since before `cutoff_ms`, except pages
    /// for which `keep` says yes. Returns how many were deleted.
    pub(crate) fn expire_rooms(
        &self,
        cutoff_ms: u64,
        keep: impl Fn(&str) -> bool,
    ) -> Result<usize, StorageError> {
        self.rooms.expire(cutoff_ms, keep)
    }

    /// Deletes stats (and history) of pages inactive since before
    /// `cutoff_ms`, except pages for which `keep` says yes. Returns how many
    /// were deleted.
    pub(crate) fn expire_stats(
        &self,
        cutoff_ms: u64,
        keep: impl Fn(&str) -> bool,
    ) -> Result<usize, StorageError> {
        let gone = self
            .stats
            .evict_oldest(usize::MAX, |t| t < cutoff_ms, keep)?;
        for page in &gone {
            self.history.delete(page)?;
        }
        Ok(gone.len())
    }

    /// Records minute peaks (see [`Resolution`]): each goes into its minute
    /// and its hour, keeping the larger figures of what is stored. A page
    /// without a stats record is skipped: a page's history lives as long as
    /// its stats, so `storage.max_records` bounds it too.
    pub fn save_history<'a>(
        &self,
        peaks: impl IntoIterator<Item = &'a MinutePeak>,
        keep: HistoryRetention,
    ) -> Result<(), StorageError> {
        for (key, minute_ms, peak) in peaks {
            if &**key == SITE || self.stats.data.contains_key(key.as_bytes())? {
                self.history.record(key, *minute_ms, *peak, keep)?;
            }
        }
        Ok(())
    }

    /// The stored peaks of `key` (a page id or [`SITE`]) at `res` whose
    /// slots start in `from_ms..=to_ms`, oldest first, as (slot start in
    /// ms, peaks). Slots when no one was there are absent.
    pub(crate) fn load_history(
        &self,
        key: &str,
        res: Resolution,
        from_ms: u64,
        to_ms: u64,
    ) -> Result<Vec<(u64, Tally)>, StorageError> {
        let (first, last) = (bucket_of(res, from_ms), bucket_of(res, to_ms));
        let end = history_key(key, res, last.saturating_add(1));
        let range = history_key(key, res, first)..end;
        let mut points = Vec::new();
        for item in self.history.0.range(range) {
            let (k, v) = item?;
            let Some(bucket) = k.last_chunk::<4>().map(|b| u32::from_be_bytes(*b)) else {
                continue;
            };
            let start = u64::from(bucket) * res.bucket_ms();
            for (slot, t) in decode_slots(&v).unwrap_or_default() {
                let at = start + u64::from(slot) * res.step_ms();
                if (from_ms..=to_ms).contains(&at) {
                    points.push((at, t));
                }
            }
        }
        Ok(points)
    }

    /// Test hook: number of history records (a scan: for tests and
    /// measurements).
    #[cfg(any(test, feature = "test-hooks"))]
    pub fn history_records(&self) -> usize {
        self.history.0.len()
    }

    /// Deletes the least recently active records of each store past `max`
    /// records (a page's history goes with its stats), except pages for
    /// which `keep` says yes. Returns the pages whose stats were deleted and
    /// how many room records were.
    pub(crate) fn trim(
        &self,
        max: usize,
        keep: impl Fn(&str) -> bool,
    ) -> Result<(Vec<String>, usize), StorageError> {
        let stats = self.stats.trim(max, &keep)?;
        for page in &stats {
            self.history.delete(page)?;
        }
        Ok((stats, self.rooms.trim(max, &keep)?.len()))
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
    pub(crate) fn cluster_identity(&self) -> Result<Option<(String, u64)>, StorageError> {
        let Some(v) = self.meta.get(CLUSTER_IDENTITY)? else {
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
    pub(crate) fn save_cluster_identity(
        &self,
        process: &str,
        incarnation: u64,
    ) -> Result<(), StorageError> {
        let v = format!("{}\n{}\n{process}\n{incarnation}", self.host(), self.dir());
        self.meta.insert(CLUSTER_IDENTITY, v.as_bytes())?;
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

    /// The last write of a clean stop: a flush (the record counts are
    /// exact after any stop).
    pub fn close(&self) -> Result<(), StorageError> {
        self.flush()
    }

    /// Test hook: stats and room records counted by a scan of both stores
    /// (for tests and measurements; [`Storage::stats_records`] costs
    /// nothing).
    #[cfg(any(test, feature = "test-hooks"))]
    pub fn count_records(&self) -> (usize, usize) {
        (self.stats.data.len(), self.rooms.data.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> PageId {
        PageId::parse(s).expect("a valid page id")
    }

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

    /// sled alone on `path`: a database as an earlier build left it.
    fn bare_sled(path: &Path, compress: bool) -> sled::Db {
        sled::Config::new()
            .path(path)
            .use_compression(compress)
            .open()
            .expect("sled")
    }

    /// A new database is compressed; one created without compression (an
    /// earlier build) opens as it is, with its records.
    #[test]
    fn compression_follows_the_database() {
        let fresh = tempfile::tempdir().expect("dir");
        drop(Storage::open(fresh.path(), 1 << 20).expect("open"));
        assert_eq!(compression_of(fresh.path()), Some(Compression::Zstd));
        let old = tempfile::tempdir().expect("dir");
        {
            let db = bare_sled(old.path(), false);
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
        assert_eq!(compression_of(old.path()), Some(Compression::None));
        assert_eq!(s.load_stats("kept").expect("read"), Some(stats_at(5)));
    }

    /// `storage.compression` decides how a new directory stores its records;
    /// a directory reopened with the other setting keeps its own, and its
    /// records.
    #[test]
    fn a_new_directory_takes_the_setting_and_keeps_it() {
        for (created, reopened) in [
            (Compression::None, Compression::Zstd),
            (Compression::Zstd, Compression::None),
        ] {
            let dir = tempfile::tempdir().expect("dir");
            let s = Storage::open_with(dir.path(), 1 << 20, created).expect("create");
            s.save_stats([("kept", &stats_at(7))]).expect("save");
            s.flush().expect("flush");
            drop(s);
            let was = Some(created);
            assert_eq!(compression_of(dir.path()), was);
            let s = reopen_with(dir.path(), |p| Storage::open_with(p, 1 << 20, reopened));
            assert_eq!(s.load_stats("kept").expect("read"), Some(stats_at(7)));
            s.save_stats([("later", &stats_at(8))])
                .expect("save after reopening");
            assert_eq!(
                compression_of(dir.path()),
                was,
                "{created:?} then {reopened:?}"
            );
        }
    }

    /// A stats record written before visitors were counted (no
    /// `peak_visitors`) reads with a peak of 0 visitors and its other fields.
    /// Opens `path` once the previous handle's background flusher has let go
    /// of the directory's lock (sled releases it from that thread).
    fn reopen(path: &Path) -> Storage {
        reopen_with(path, |p| Storage::open(p, 1 << 20))
    }

    fn reopen_with(path: &Path, open: impl Fn(&Path) -> Result<Storage, StorageError>) -> Storage {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match open(path) {
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

    const KEEP: HistoryRetention = HistoryRetention {
        minutes_ms: 48 * 3_600_000,
        hours_ms: 90 * 86_400_000,
    };

    fn tally(visitors: u64, connections: u64) -> Tally {
        Tally {
            connections,
            visitors,
        }
    }

    /// Minute peaks merge per figure (a lower write never lowers a peak),
    /// land in their minute and their hour, and read back in time order
    /// within the asked window only.
    #[test]
    fn history_keeps_the_largest_figures_per_minute_and_hour() {
        let dir = tempfile::tempdir().expect("dir");
        let s = Storage::open(dir.path(), 1 << 20).expect("open");
        let day = 20_000 * 86_400_000u64;
        let m = |i: u64| day + i * 60_000;
        let p = id("p");
        s.save_stats([("p", &stats_at(1))]).expect("stats");
        let peaks = vec![
            (p.clone(), m(0), tally(2, 3)),
            (p.clone(), m(1), tally(5, 5)),
            (p.clone(), m(1), tally(1, 9)),
            (p.clone(), m(61), tally(300, 400)),
            (PageId::site(), m(2), tally(7, 8)),
        ];
        s.save_history(&peaks, KEEP).expect("save");
        let minutes = s
            .load_history("p", Resolution::Minute, m(0), m(120))
            .expect("load");
        assert_eq!(
            minutes,
            vec![
                (m(0), tally(2, 3)),
                (m(1), tally(5, 9)),
                (m(61), tally(300, 400))
            ]
        );
        let hours = s
            .load_history("p", Resolution::Hour, day, day + 86_400_000)
            .expect("load");
        assert_eq!(
            hours,
            vec![(day, tally(5, 9)), (day + 3_600_000, tally(300, 400))]
        );
        assert_eq!(
            s.load_history("p", Resolution::Minute, m(1), m(59))
                .expect("load"),
            vec![(m(1), tally(5, 9))]
        );
        assert_eq!(
            s.load_history(SITE, Resolution::Minute, m(0), m(120))
                .expect("load"),
            vec![(m(2), tally(7, 8))]
        );
        // Another page whose id starts like this one's shares nothing.
        assert!(s
            .load_history("p2", Resolution::Minute, m(0), m(120))
            .expect("load")
            .is_empty());
    }

    /// A new bucket deletes the key's buckets past retention; deleting a
    /// page's stats deletes its history and nobody else's.
    #[test]
    fn history_is_bounded_by_retention_and_goes_with_its_page() {
        let dir = tempfile::tempdir().expect("dir");
        let s = Storage::open(dir.path(), 1 << 20).expect("open");
        let hour = 3_600_000u64;
        let start = 500_000 * hour;
        let p = id("p");
        s.save_stats([("p", &stats_at(1))]).expect("stats");
        // One minute in each of 100 hours: at most 49 minute buckets (48 h
        // and the one in progress) and 5 day buckets remain.
        let peaks: Vec<MinutePeak> = (0..100)
            .map(|h| (p.clone(), start + h * hour, tally(1, 1)))
            .collect();
        s.save_history(&peaks, KEEP).expect("save");
        let last = start + 99 * hour;
        let minutes = s
            .load_history("p", Resolution::Minute, 0, last)
            .expect("load");
        assert_eq!(minutes.len(), 49);
        assert_eq!(minutes[0].0, last - 48 * hour);
        assert_eq!(s.history_records(), 49 + 5);
        s.save_stats([("q", &stats_at(2))]).expect("stats");
        let unknown = (id("r"), start, tally(1, 1));
        s.save_history(&[(id("q"), start, tally(1, 1)), unknown], KEEP)
            .expect("save");
        assert_eq!(s.history_records(), 49 + 5 + 2, "r has no stats: skipped");
        let (gone, _) = s.trim(1, |_| false).expect("trim");
        assert_eq!(gone, ["p"]);
        assert_eq!(s.history_records(), 2, "only q's minute and hour remain");
        assert_eq!(s.expire_stats(10, |_| false).expect("expire"), 1);
        assert_eq!(s.history_records(), 0);
    }

    #[test]
    fn history_values_round_trip_and_refuse_garbage() {
        let slots = BTreeMap::from([(0u8, tally(0, 1)), (59, tally(u64::MAX, 300))]);
        assert_eq!(decode_slots(&encode_slots(&slots)), Some(slots.clone()));
        assert_eq!(decode_slots(&[HISTORY_V1, 3, 0x80]), None);
        assert_eq!(decode_slots(&[2, 0, 1, 1]), None);
        // A value of a newer build is kept as it is by a merge.
        let foreign = [2u8, 9, 9];
        let merged = merge_history(b"k", Some(&foreign), &encode_slots(&slots));
        assert_eq!(merged.as_deref(), Some(&foreign[..]));
    }

    /// The stored record counts follow every write, rewrite and deletion,
    /// with or without a close before the next open (a `kill -9` of the
    /// binary: `api::persistence`), and the cap holds on them.
    #[test]
    fn record_counts_are_exact_after_any_stop() {
        let dir = tempfile::tempdir().expect("dir");
        let page = |i: usize| format!("page-{i:05}");
        let room = |ms| RoomRecord {
            links: vec![id("a")],
            last_active_ms: ms,
        };
        {
            let s = Storage::open(dir.path(), 1 << 20).expect("open");
            for i in 0..3000 {
                s.save_stats([(page(i).as_str(), &stats_at(i as u64))])
                    .expect("save");
            }
            // Rewrites create nothing.
            for i in 0..100 {
                s.save_stats([(page(i).as_str(), &stats_at(5000 + i as u64))])
                    .expect("save");
            }
            // One call: rewrites, new records (more than one transaction's
            // worth) and a page twice.
            let mixed: Vec<(String, PageStats)> = (2900..3100)
                .chain([3050])
                .map(|i| (page(i), stats_at(6000 + i as u64)))
                .collect();
            s.save_stats(mixed.iter().map(|(p, st)| (p.as_str(), st)))
                .expect("save");
            s.save_room("r", &room(1)).expect("room");
            s.save_room("r", &room(2)).expect("room");
            s.close().expect("close");
        }
        let s = reopen(dir.path());
        assert_eq!((s.stats_records(), s.room_records()), (3100, 1));
        assert_eq!(s.count_records(), (3100, 1));
        // Written and deleted after the close, then no close at all.
        for i in 3000..3400 {
            s.save_stats([(page(i).as_str(), &stats_at(10_000 + i as u64))])
                .expect("save");
        }
        assert_eq!(s.expire_stats(300, |_| false).expect("expire"), 200);
        assert_eq!(s.expire_rooms(5, |_| false).expect("expire"), 1);
        s.db.flush().expect("flush");
        drop(s);
        let s = reopen(dir.path());
        let truth = s.count_records();
        assert_eq!(truth, (3400 - 200, 0));
        assert_eq!((s.stats_records(), s.room_records()), truth);
        let (gone, _) = s.trim(1000, |_| false).expect("trim");
        assert_eq!(gone.len(), truth.0 - 1000);
        assert_eq!(s.count_records().0, 1000);
        assert_eq!(s.stats_records(), 1000);
        assert_eq!(
            read_count(s.meta.get(STATS_COUNT).expect("read").as_deref()),
            1000
        );
    }

    /// Writers creating and rewriting records while another thread trims
    /// and expires (the counter and the rooms' workers do) leave the count
    /// equal to a scan, and every record indexed: trimming to 0 leaves none.
    #[test]
    fn counts_stay_exact_under_concurrent_writes_and_trims() {
        let dir = tempfile::tempdir().expect("dir");
        let s = Storage::open(dir.path(), 1 << 20).expect("open");
        let writers: Vec<_> = (0..2u64)
            .map(|w| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for round in 0..20u64 {
                        let batch: Vec<(String, PageStats)> = (0..300u64)
                            .map(|i| (format!("w{w}-{i:03}"), stats_at(round * 1000 + i)))
                            .collect();
                        s.save_stats(batch.iter().map(|(p, st)| (p.as_str(), st)))
                            .expect("save");
                        s.save_room(
                            &format!("w{w}-room-{round}"),
                            &RoomRecord {
                                links: vec![id("a")],
                                last_active_ms: round,
                            },
                        )
                        .expect("room");
                    }
                })
            })
            .collect();
        let trimmer = {
            let s = s.clone();
            std::thread::spawn(move || {
                for i in 0..200u64 {
                    s.trim(250, |_| false).expect("trim");
                    s.expire_stats(i * 50, |_| false).expect("expire");
                }
            })
        };
        for t in writers {
            t.join().expect("writer");
        }
        trimmer.join().expect("trimmer");
        assert_eq!((s.stats_records(), s.room_records()), s.count_records());
        assert_eq!(
            read_count(s.meta.get(STATS_COUNT).expect("read").as_deref()) as usize,
            s.stats_records()
        );
        s.trim(0, |_| false).expect("trim");
        assert_eq!(s.count_records(), (0, 0));
        assert_eq!((s.stats_records(), s.room_records()), (0, 0));
    }

    /// A database of schema 2 not closed cleanly (its stored count was the
    /// last flush's, some index keys missing) is counted and indexed at
    /// open, once; one closed cleanly is trusted as it is.
    #[test]
    fn a_schema_2_database_is_counted_unless_closed_cleanly() {
        let write = |clean: bool| {
            let dir = tempfile::tempdir().expect("dir");
            {
                let db = bare_sled(dir.path(), true);
                let meta = db.open_tree("meta").expect("meta");
                meta.insert("schema", SCHEMA_V2).expect("schema");
                meta.insert(STATS_COUNT, &9u64.to_be_bytes())
                    .expect("count");
                if clean {
                    meta.insert(CLEAN, &[]).expect("mark");
                }
                let stats = db.open_tree("stats").expect("stats");
                let age = db.open_tree("stats_by_age").expect("index");
                for i in 0..5u64 {
                    let page = format!("p{i}");
                    stats
                        .insert(page.as_str(), encode(&stats_at(i)))
                        .expect("record");
                    if i != 0 {
                        age.insert(age_key(i, page.as_bytes()), &[]).expect("key");
                    }
                }
                db.flush().expect("flush");
            }
            dir
        };
        let dir = write(false);
        let s = reopen(dir.path());
        assert_eq!(s.stats_records(), 5, "counted at open");
        assert!(s.stats.age.contains_key(age_key(0, b"p0")).expect("read"));
        assert_eq!(
            s.meta.get("schema").expect("read").as_deref(),
            Some(SCHEMA_VERSION)
        );
        assert_eq!(s.meta.get(CLEAN).expect("read"), None);
        drop(s);
        let s = reopen(dir.path());
        assert_eq!(s.stats_records(), 5);
        let dir = write(true);
        let s = reopen(dir.path());
        assert_eq!(
            s.stats_records(),
            9,
            "a clean close's count is read, not taken"
        );
    }

    /// A database of schema 1 (JSON records, room records with counts, no
    /// record counts in `meta`) opens: its records read as they were, the
    /// counts are taken, the schema becomes 2, new writes are binary, and
    /// the cap still goes by last activity across both encodings.
    #[test]
    fn a_schema_1_database_is_migrated() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let db = bare_sled(dir.path(), true);
            db.open_tree("meta")
                .expect("meta")
                .insert("schema", SCHEMA_V1)
                .expect("schema");
            let stats = db.open_tree("stats").expect("stats");
            let stats_age = db.open_tree("stats_by_age").expect("index");
            for (page, ms) in [("old1", 10u64), ("old2", 30)] {
                let mut v = vec![RECORD_V1];
                v.extend_from_slice(
                    format!(r#"{{"total_connections":7,"peak_connections":3,"peak_at_ms":5,"peak_visitors":2,"last_active_ms":{ms}}}"#)
                        .as_bytes(),
                );
                stats.insert(page, v).expect("record");
                stats_age
                    .insert(age_key(ms, page.as_bytes()), &[])
                    .expect("key");
            }
            let rooms = db.open_tree("rooms").expect("rooms");
            let mut v = vec![RECORD_V1];
            v.extend_from_slice(
                br#"{"links":["b","c"],"counts":{"b":1,"c":4},"last_active_ms":12}"#,
            );
            rooms.insert("old1", v).expect("room");
            db.open_tree("rooms_by_age")
                .expect("index")
                .insert(age_key(12, b"old1"), &[])
                .expect("key");
            db.flush().expect("flush");
        }
        let s = reopen(dir.path());
        assert_eq!((s.stats_records(), s.room_records()), (2, 1));
        assert_eq!(
            s.load_stats("old1").expect("read"),
            Some(PageStats {
                total_connections: 7,
                peak_connections: 3,
                peak_at_ms: Some(5),
                peak_visitors: 2,
                last_active_ms: Some(10),
            })
        );
        assert_eq!(
            s.load_room("old1").expect("read"),
            Some(RoomRecord {
                links: vec![id("b"), id("c")],
                last_active_ms: 12,
            })
        );
        assert_eq!(
            s.meta.get("schema").expect("read").as_deref(),
            Some(SCHEMA_VERSION)
        );
        s.save_stats([("new", &stats_at(20))]).expect("save");
        let raw = s.stats.data.get("new").expect("read").expect("record");
        assert_eq!(raw[0], RECORD_V2);
        let (gone, _) = s.trim(2, |_| false).expect("trim");
        assert_eq!(gone, ["old1"]);
        s.close().expect("close");
        drop(s);
        let s = reopen(dir.path());
        assert_eq!(s.stats_records(), 2);
        assert_eq!(
            s.load_stats("old2")
                .expect("read")
                .map(|r| r.total_connections),
            Some(7)
        );
    }

    /// The binary records round-trip, refuse garbage, and are small.
    #[test]
    fn records_round_trip_in_their_binary_form() {
        let stats = PageStats {
            total_connections: 1_000_000,
            peak_connections: 300,
            peak_at_ms: Some(1_765_000_000_000),
            peak_visitors: 0,
            last_active_ms: None,
        };
        let bytes = encode(&stats);
        assert!(bytes.len() <= 20, "{} bytes", bytes.len());
        assert_eq!(decode::<PageStats>(b"k", &bytes), Some(stats));
        let room = RoomRecord {
            links: vec![id("a"), id("é-b")],
            last_active_ms: 7,
        };
        assert_eq!(decode::<RoomRecord>(b"k", &encode(&room)), Some(room));
        // A link that breaks the page-id rules (here "a/b", then the empty
        // id) makes the record unreadable: it never becomes a PageId.
        let bad = [RECORD_V2, 7, 1, b'x', 3, b'a', b'/', b'b'];
        assert_eq!(decode::<RoomRecord>(b"k", &bad), None);
        assert_eq!(decode::<RoomRecord>(b"k", &[RECORD_V2, 7, 0]), None);
        assert!(decode::<RoomRecord>(b"k", &[RECORD_V2, 7, 1, b'x']).is_some());
        assert_eq!(decode::<PageStats>(b"k", &[RECORD_V2, 1, 2]), None);
        assert_eq!(decode::<RoomRecord>(b"k", &[RECORD_V2, 1, 5, b'a']), None);
        assert_eq!(decode::<RoomRecord>(b"k", &[RECORD_V2, 1, 1, 0xff]), None);
        let mut long = encode(&PageStats::default());
        long.push(0);
        assert_eq!(decode::<PageStats>(b"k", &long), None);
    }
}
