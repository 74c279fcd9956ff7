//! Distinct visitors: the anonymous visitor id a connection may carry
//! (`?visitor=…`), its rule, the keyed hash the server keeps instead of the
//! id, and the reference counts that turn connections into visitors.
//!
//! A visitor id is 8 to 64 characters of `A-Z a-z 0-9 _ -`, made at random by
//! the client and kept by it (the embed's tabs of one site share one in
//! memory while any is open; nothing is stored on the device). The server reads the first `visitor` query parameter of
//! the upgrade request, as sent (it needs no percent-decoding; nginx's
//! `$arg_visitor` is the same value), and keeps only [`VisitorKey`], a
//! 128-bit hash of it under keys drawn at random when the process starts:
//! the id itself is never logged, stored or held past admission, and a key
//! means nothing outside the process that made it. A connection without an
//! id, or with an invalid one (answered with a non-fatal `invalid_visitor`
//! error), is its own visitor.
//!
//! # A client can only group its own connections
//!
//! Each of a client's connections adds 1 or 0 to a page's figure and removes
//! nothing of anyone else's (ids are reference-counted, and a connection's id
//! comes only from its own upgrade request), so the figure stays between the
//! others' figure and that plus the client's own connections. The argument in
//! full is in docs/SECURITY.md, "Visitor ids".

use std::{
    collections::HashMap,
    hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState},
    num::NonZeroU64,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, OnceLock,
    },
};

use crate::protocol::ProtocolError;

/// The query parameter of the upgrade request that carries the visitor id.
pub(crate) const PARAM: &str = "visitor";

/// Shortest valid visitor id, in characters.
pub(crate) const MIN_LEN: usize = 8;

/// Longest valid visitor id, in characters.
pub(crate) const MAX_LEN: usize = 64;

/// What the server keeps of a visitor id: a keyed 128-bit hash (keys random
/// per process), compared for equality only. Two ids collide with
/// probability about 2^-128; a collision could only merge two visitors
/// (never raise a figure). Two `u64`s rather than a `u128`: 8-byte aligned,
/// so it adds 16 bytes, not 32, to each session; the first is never 0, so
/// an `Option<VisitorKey>` (in each session and each room entry) is 16
/// bytes too.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct VisitorKey(NonZeroU64, u64);

impl std::hash::Hash for VisitorKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Already a keyed hash: its first half is hash enough (see [`KeyHasher`]).
        state.write_u64(self.0.get());
    }
}

impl std::fmt::Debug for VisitorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Nothing of the key in logs or panics.
        f.write_str("VisitorKey(..)")
    }
}

/// The two SipHash key pairs of this process (drawn once, never written anywhere).
fn hash_keys() -> &'static (RandomState, RandomState) {
    static KEYS: OnceLock<(RandomState, RandomState)> = OnceLock::new();
    KEYS.get_or_init(|| (RandomState::new(), RandomState::new()))
}

impl VisitorKey {
    /// The key of a (valid) visitor id.
    fn of(id: &str) -> VisitorKey {
        let (a, b) = hash_keys();
        // A hash of 0 (one in 2^64) shares 1's key: it could only merge two visitors.
        let first = NonZeroU64::new(a.hash_one(id)).unwrap_or(NonZeroU64::MIN);
        VisitorKey(first, b.hash_one(id))
    }
}

/// Why a visitor id was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VisitorIdError {
    #[error("visitor id is shorter than {MIN_LEN} characters")]
    TooShort,
    #[error("visitor id is longer than {MAX_LEN} characters")]
    TooLong,
    #[error("visitor id may hold only A-Z, a-z, 0-9, '_' and '-'")]
    Charset,
}

impl VisitorIdError {
    /// The non-fatal `error` message the connection is sent.
    pub(crate) fn protocol_error(self) -> ProtocolError {
        ProtocolError::new(
            crate::protocol::ErrorCode::InvalidVisitor,
            format!("{self}; ignored: this connection counts as its own visitor"),
        )
    }
}

/// Checks a visitor id: 8..=64 characters of `[A-Za-z0-9_-]`.
pub(crate) fn validate_visitor_id(id: &str) -> Result<(), VisitorIdError> {
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(VisitorIdError::Charset);
    }
    // ASCII only from here: bytes are characters.
    if id.len() < MIN_LEN {
        return Err(VisitorIdError::TooShort);
    }
    if id.len() > MAX_LEN {
        return Err(VisitorIdError::TooLong);
    }
    Ok(())
}

/// What an upgrade request says about its visitor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisitorParam {
    /// No `visitor` parameter: the connection is its own visitor.
    Absent,
    /// A valid id, as its key.
    Valid(VisitorKey),
    /// An invalid id: the connection is its own visitor and is told why.
    Invalid(VisitorIdError),
}

impl VisitorParam {
    /// The key the connection is counted under (`None`: its own visitor).
    pub fn key(self) -> Option<VisitorKey> {
        match self {
            VisitorParam::Valid(k) => Some(k),
            VisitorParam::Absent | VisitorParam::Invalid(_) => None,
        }
    }
}

/// Reads the first `visitor` parameter of a raw query string, as sent.
pub fn from_query(query: Option<&str>) -> VisitorParam {
    let Some(query) = query else {
        return VisitorParam::Absent;
    };
    let value = query
        .split('&')
        .find_map(|pair| match pair.split_once('=') {
            Some((PARAM, v)) => Some(v),
            None if pair == PARAM => Some(""),
            _ => None,
        });
    match value {
        None => VisitorParam::Absent,
        Some(id) => match validate_visitor_id(id) {
            Ok(()) => VisitorParam::Valid(VisitorKey::of(id)),
            Err(e) => VisitorParam::Invalid(e),
        },
    }
}

/// Hashes a [`VisitorKey`] by taking its first half as it is: the key is
/// already a keyed hash, so hashing it again would only cost time.
#[derive(Default)]
pub(crate) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used by `VisitorKey`; anything else folds in.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }
}

type KeyMap = HashMap<VisitorKey, usize, BuildHasherDefault<KeyHasher>>;

/// Distinct visitors among a set of connections: a reference count per
/// visitor key, and the connections without one (each its own visitor).
/// Memory: one entry per distinct key, so at most one per connection.
#[derive(Debug, Default)]
pub(crate) struct Visitors {
    /// Open connections per visitor key (never 0: the entry goes with the last).
    keyed: KeyMap,
    /// Open connections without a key.
    anonymous: u64,
}

impl Visitors {
    /// A connection of `visitor` opened; true when it is a new visitor.
    pub(crate) fn add(&mut self, visitor: Option<VisitorKey>) -> bool {
        match visitor {
            None => {
                self.anonymous += 1;
                true
            }
            Some(k) => {
                let n = self.keyed.entry(k).or_insert(0);
                *n += 1;
                *n == 1
            }
        }
    }

    /// A connection of `visitor` closed; true when it was that visitor's last.
    pub(crate) fn remove(&mut self, visitor: Option<VisitorKey>) -> bool {
        match visitor {
            None => {
                let was = self.anonymous;
                self.anonymous = was.saturating_sub(1);
                was > 0
            }
            Some(k) => match self.keyed.get_mut(&k) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some(_) => {
                    self.keyed.remove(&k);
                    true
                }
                None => false,
            },
        }
    }

    /// The number of distinct visitors.
    pub(crate) fn distinct(&self) -> u64 {
        self.keyed.len() as u64 + self.anonymous
    }
}

/// Shards of [`NodeVisitors`] (a power of two).
const NODE_SHARDS: usize = 64;

/// Distinct visitors across the whole node (every page), for the
/// `link_counter_visitors` gauge and `/api/v1/stats`: sessions add their
/// visitor when they join and remove it when they leave. The keyed counts
/// are split over [`NODE_SHARDS`] locks by key, so sessions on different
/// workers rarely meet on one; the total is kept in atomics and read
/// without a lock.
#[derive(Debug)]
pub(crate) struct NodeVisitors {
    /// Connections per key, by the key's top bits.
    shards: Box<[Mutex<KeyMap>]>,
    /// Distinct keys over all shards.
    keyed: AtomicU64,
    /// Open connections without a key.
    anonymous: AtomicU64,
}

impl Default for NodeVisitors {
    fn default() -> Self {
        NodeVisitors {
            shards: (0..NODE_SHARDS).map(|_| Mutex::default()).collect(),
            keyed: AtomicU64::new(0),
            anonymous: AtomicU64::new(0),
        }
    }
}

impl NodeVisitors {
    fn shard(&self, k: VisitorKey) -> std::sync::MutexGuard<'_, KeyMap> {
        // The second half: independent of the first, which places it in the map.
        let i = (k.1 % NODE_SHARDS as u64) as usize;
        // Each update is one map operation: a poisoned lock is consistent.
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A session of `visitor` joined.
    pub(crate) fn add(&self, visitor: Option<VisitorKey>) {
        let Some(k) = visitor else {
            self.anonymous.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let mut shard = self.shard(k);
        let n = shard.entry(k).or_insert(0);
        *n += 1;
        if *n == 1 {
            self.keyed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A session of `visitor` left (once per [`NodeVisitors::add`]).
    pub(crate) fn remove(&self, visitor: Option<VisitorKey>) {
        let Some(k) = visitor else {
            self.anonymous.fetch_sub(1, Ordering::Relaxed);
            return;
        };
        let mut shard = self.shard(k);
        if let Some(n) = shard.get_mut(&k) {
            *n -= 1;
            if *n == 0 {
                shard.remove(&k);
                self.keyed.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Distinct visitors on this node now.
    pub(crate) fn distinct(&self) -> u64 {
        self.keyed.load(Ordering::Relaxed) + self.anonymous.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_for_length_and_charset() {
        assert_eq!(validate_visitor_id("abcdefgh"), Ok(()));
        assert_eq!(validate_visitor_id(&"A-_9".repeat(16)), Ok(()));
        assert_eq!(
            validate_visitor_id("abcdefg"),
            Err(VisitorIdError::TooShort)
        );
        assert_eq!(validate_visitor_id(""), Err(VisitorIdError::TooShort));
        assert_eq!(
            validate_visitor_id(&"a".repeat(65)),
            Err(VisitorIdError::TooLong)
        );
        for bad in [
            "abcdefg!",
            "abc defgh",
            "abcdefgé",
            "abcd%41fgh",
            "abc.defgh",
        ] {
            assert_eq!(
                validate_visitor_id(bad),
                Err(VisitorIdError::Charset),
                "{bad}"
            );
        }
        assert_eq!(
            VisitorIdError::TooShort.protocol_error().code,
            crate::protocol::ErrorCode::InvalidVisitor
        );
    }

    #[test]
    fn the_first_visitor_parameter_counts_as_sent() {
        let key = |q: &str| from_query(Some(q));
        assert_eq!(from_query(None), VisitorParam::Absent);
        assert_eq!(key("_pk=x"), VisitorParam::Absent);
        assert_eq!(key("visitors=abcdefgh"), VisitorParam::Absent);
        let a = key("visitor=abcdefgh").key().expect("valid");
        assert_eq!(
            key("_pk=1&visitor=abcdefgh&visitor=zzzzzzzz").key(),
            Some(a)
        );
        assert_ne!(key("visitor=abcdefgi").key(), Some(a));
        assert_eq!(
            key("visitor="),
            VisitorParam::Invalid(VisitorIdError::TooShort)
        );
        assert_eq!(
            key("visitor"),
            VisitorParam::Invalid(VisitorIdError::TooShort)
        );
        // Percent-encoding is not decoded: an id needs none.
        assert_eq!(
            key("visitor=abc%41defgh"),
            VisitorParam::Invalid(VisitorIdError::Charset)
        );
        assert_eq!(format!("{a:?}"), "VisitorKey(..)");
        // What a session and a room entry hold per connection.
        assert_eq!(std::mem::size_of::<Option<VisitorKey>>(), 16);
    }

    #[test]
    fn visitors_are_reference_counted() {
        let a = from_query(Some("visitor=aaaaaaaa")).key();
        let b = from_query(Some("visitor=bbbbbbbb")).key();
        let mut v = Visitors::default();
        assert!(v.add(a));
        assert!(!v.add(a));
        assert!(!v.add(a));
        assert!(v.add(b));
        assert!(v.add(None));
        assert!(v.add(None));
        assert_eq!(v.distinct(), 4);
        assert!(!v.remove(a));
        assert!(!v.remove(a));
        assert_eq!(v.distinct(), 4);
        assert!(v.remove(a));
        assert!(v.remove(None));
        assert_eq!(v.distinct(), 2);
        // Removing what is not there changes nothing.
        assert!(!v.remove(a));
        assert!(v.remove(None));
        assert!(!v.remove(None));
        assert!(v.remove(b));
        assert_eq!(v.distinct(), 0);
        assert!(v.keyed.is_empty());
    }

    #[test]
    fn node_visitors_count_distinct_keys_across_pages() {
        let a = from_query(Some("visitor=aaaaaaaa")).key();
        let b = from_query(Some("visitor=bbbbbbbb")).key();
        let n = NodeVisitors::default();
        for v in [a, a, b, None, a] {
            n.add(v);
        }
        assert_eq!(n.distinct(), 3);
        for v in [a, a, None] {
            n.remove(v);
        }
        assert_eq!(n.distinct(), 2);
        n.remove(a);
        n.remove(b);
        assert_eq!(n.distinct(), 0);
    }

    mod fuzz {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any query string is read without a panic, and an accepted id is valid.
            #[test]
            fn arbitrary_queries_never_panic(q in any::<String>()) {
                let _ = from_query(Some(&q));
            }

            /// The reference counts equal a recount from scratch after any sequence.
            #[test]
            fn counts_match_a_recount(ops in proptest::collection::vec((any::<bool>(), 0u8..4), 0..200)) {
                let ids = ["aaaaaaaa", "bbbbbbbb", "cccccccc"];
                let key = |i: u8| ids.get(usize::from(i)).map(|id| VisitorKey::of(id));
                let mut v = Visitors::default();
                let mut open: Vec<Option<VisitorKey>> = Vec::new();
                for (add, i) in ops {
                    let k = key(i);
                    if add {
                        v.add(k);
                        open.push(k);
                    } else if let Some(at) = open.iter().position(|o| *o == k) {
                        open.swap_remove(at);
                        v.remove(k);
                    }
                    let mut distinct: Vec<VisitorKey> = open.iter().flatten().copied().collect();
                    distinct.sort_by_key(|k| (k.0, k.1));
                    distinct.dedup();
                    let anonymous = open.iter().filter(|o| o.is_none()).count();
                    prop_assert_eq!(v.distinct(), (distinct.len() + anonymous) as u64);
                    prop_assert!(v.distinct() <= open.len() as u64);
                }
            }
        }
    }
}
