//! The other nodes' values of the pages this node holds, and the live view
//! they are counted under. Plain data, no I/O: the state machine feeds it
//! heartbeat snapshots, channel messages and loaded hash fields.
//!
//! Two rules make double counting impossible by construction:
//! - only nodes of the last heartbeat snapshot are counted (one atomic read
//!   of the liveness sorted set, so it never holds both incarnations of a
//!   process: the next one registers only after the previous one expired);
//! - entries are kept per *process*, so even a table fed from two sources
//!   holds at most one incarnation of each process.
//!
//! One exception to the first rule, the *ghosts*: when this node finds its own
//! registration gone although it refreshed it within `node_ttl` (Redis lost
//! its data: restarted empty, flushed), the nodes that vanished from the view
//! with it are not dead, they have not registered again yet. Their values
//! stay, as ghosts, until the process's next incarnation replaces them (a
//! value of it, or a load that shows it has none), or for `node_ttl` at most.
//! A ghost is still one entry per process, so it never adds to its next
//! incarnation's value.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Instant,
};

use crate::protocol::{PageId, Tally};

/// The process part of a node id, fresh per process start.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct Process(Arc<str>);

impl Process {
    /// A process name; `None` if it could not be read back from an id
    /// (empty, or with a character outside `[0-9a-z-]`).
    pub(crate) fn new(s: &str) -> Option<Process> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        ok.then(|| Process(s.into()))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A node id: `{process}.{incarnation}`, the one type ids travel as inside
/// the cluster module (strings only at the Redis boundary). The process part
/// is fresh per process start; the incarnation goes up each time the process
/// registers again (it stalled past `node_ttl`, Redis lost it, the cluster
/// actor was restarted).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct NodeId {
    /// The process.
    pub(crate) process: Process,
    /// Its registration, counting from 1.
    pub(crate) incarnation: u64,
}

impl NodeId {
    /// Parses `{process}.{incarnation}`; `None` for anything else.
    pub(crate) fn parse(s: &str) -> Option<NodeId> {
        let (process, inc) = s.rsplit_once('.')?;
        Some(NodeId {
            process: Process::new(process)?,
            incarnation: inc.parse().ok()?,
        })
    }
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.process, self.incarnation)
    }
}

/// One process's value of one page.
#[derive(Clone, Copy, Debug)]
struct Entry {
    /// The incarnation that wrote it.
    incarnation: u64,
    /// Its sequence number (monotonic per process).
    seq: u64,
    /// Its local tally (zero entries are kept: they order a later stale load).
    tally: Tally,
    /// A ghost (its incarnation vanished with Redis's data): kept until then.
    ghost_until: Option<Instant>,
}

/// The live view: process -> its live incarnation (own process excluded).
pub(super) type LiveView = HashMap<Process, u64>;

/// What a new live view changed.
#[derive(Debug, Default)]
pub(super) struct ViewChange {
    /// Held pages that lost a value.
    pub(crate) affected: Vec<PageId>,
    /// A node not counted before became live (its values must be loaded).
    pub(crate) joined: bool,
    /// The view changed at all (the channels to subscribe may change).
    pub(crate) changed: bool,
}

/// Held pages' values per process, and the live view.
#[derive(Default)]
pub(super) struct RemoteTable {
    /// Held page -> process -> its latest value.
    pages: HashMap<PageId, HashMap<Process, Entry>>,
    /// The live view.
    live: LiveView,
    /// A heartbeat snapshot arrived since the table was made.
    have_view: bool,
}

impl RemoteTable {
    /// Whether `id` is counted under the current live view.
    pub(crate) fn is_live(&self, id: &NodeId) -> bool {
        self.live.get(&id.process) == Some(&id.incarnation)
    }

    /// Whether a heartbeat snapshot was applied yet.
    pub(crate) fn have_view(&self) -> bool {
        self.have_view
    }

    /// The live view.
    pub(crate) fn live(&self) -> &LiveView {
        &self.live
    }

    /// Starts holding `page` (values are applied only to held pages).
    pub(crate) fn hold(&mut self, page: &PageId) {
        self.pages.entry(page.clone()).or_default();
    }

    /// Whether `page` is held.
    pub(crate) fn holds(&self, page: &PageId) -> bool {
        self.pages.contains_key(page)
    }

    /// Stops holding `page`.
    pub(crate) fn release(&mut self, page: &PageId) {
        self.pages.remove(page);
    }

    /// Forgets every value but the ghosts (the pages stay held, the live
    /// view stays): they are loaded again.
    pub(crate) fn clear_values(&mut self) {
        for m in self.pages.values_mut() {
            m.retain(|_, e| e.ghost_until.is_some());
        }
    }

    /// Stores `id`'s value of a held page if `id` is live and the value is
    /// newer than the one held for its process; true if the sum may have changed.
    pub(crate) fn apply(&mut self, page: &PageId, id: &NodeId, seq: u64, tally: Tally) -> bool {
        if !self.is_live(id) {
            return false;
        }
        let Some(m) = self.pages.get_mut(page) else {
            return false;
        };
        match m.get(&id.process) {
            Some(e) if e.incarnation == id.incarnation && e.seq >= seq => false,
            _ => {
                m.insert(
                    id.process.clone(),
                    Entry {
                        incarnation: id.incarnation,
                        seq,
                        tally,
                        ghost_until: None,
                    },
                );
                true
            }
        }
    }

    /// A load of `page` (issued under the live view `at_issue`) is complete:
    /// a ghost whose process had registered again by then has no field, so
    /// its next incarnation holds nothing there. True if one went.
    pub(crate) fn loaded(&mut self, page: &PageId, at_issue: &LiveView) -> bool {
        let Some(m) = self.pages.get_mut(page) else {
            return false;
        };
        let before = m.len();
        m.retain(|p, e| {
            e.ghost_until.is_none() || at_issue.get(p).is_none_or(|i| *i == e.incarnation)
        });
        m.len() != before
    }

    /// Sum over the processes held for `page` (live ones and ghosts).
    pub(crate) fn sum(&self, page: &PageId) -> Tally {
        self.pages.get(page).map_or(Tally::ZERO, |m| {
            m.values().fold(Tally::ZERO, |acc, e| acc.plus(e.tally))
        })
    }

    /// Replaces the live view with a heartbeat snapshot (own process left
    /// out by the caller). A value whose incarnation is not in it goes,
    /// unless it is a ghost not expired at `now`; with `ghosts_until` (Redis
    /// lost its data) it becomes a ghost until then instead.
    pub(crate) fn set_live(
        &mut self,
        live: LiveView,
        now: Instant,
        ghosts_until: Option<Instant>,
    ) -> ViewChange {
        let joined = live.iter().any(|(p, i)| self.live.get(p) != Some(i));
        let changed = joined || live.len() != self.live.len();
        self.live = live;
        self.have_view = true;
        let mut affected = Vec::new();
        for (page, m) in self.pages.iter_mut() {
            let before = m.len();
            let live = &self.live;
            m.retain(|p, e| {
                if live.get(p) == Some(&e.incarnation) {
                    return true;
                }
                if e.ghost_until.is_none() {
                    e.ghost_until = ghosts_until;
                }
                e.ghost_until.is_some_and(|t| t > now)
            });
            if m.len() != before {
                affected.push(page.clone());
            }
        }
        ViewChange {
            affected,
            joined,
            changed,
        }
    }

    /// Turns every value into a ghost until `until` (Redis lost its data
    /// while this node was disconnected: the values are reloaded, and what
    /// no load confirms stays until the process had its chance to register
    /// again).
    pub(crate) fn ghost_all(&mut self, until: Instant) {
        for m in self.pages.values_mut() {
            for e in m.values_mut() {
                e.ghost_until.get_or_insert(until);
            }
        }
    }

    /// Drops the ghosts expired at `now`; returns the pages that lost one.
    pub(crate) fn expire_ghosts(&mut self, now: Instant) -> Vec<PageId> {
        let mut affected = Vec::new();
        for (page, m) in self.pages.iter_mut() {
            let before = m.len();
            m.retain(|_, e| e.ghost_until.is_none_or(|t| t > now));
            if m.len() != before {
                affected.push(page.clone());
            }
        }
        affected
    }

    /// Whether any ghost is held.
    #[cfg(test)]
    pub(crate) fn has_ghosts(&self) -> bool {
        self.pages
            .values()
            .any(|m| m.values().any(|e| e.ghost_until.is_some()))
    }

    /// Held pages.
    pub(crate) fn held(&self) -> impl Iterator<Item = &PageId> {
        self.pages.keys()
    }
}

/// Sums `fields` (`node id -> "seq:connections:visitors"`) over the nodes of
/// `table`'s live view, one value per process (read-only: HTTP lookups).
pub(super) fn sum_fields(table: &RemoteTable, fields: &HashMap<String, String>) -> Tally {
    let mut seen: HashSet<&Process> = HashSet::new();
    let mut sum = Tally::ZERO;
    for (node, value) in fields {
        let (Some(id), Some((_, tally))) = (NodeId::parse(node), parse_value(value)) else {
            continue;
        };
        if let Some((p, _)) = table.live.get_key_value(&id.process) {
            if table.is_live(&id) && seen.insert(p) {
                sum = sum.plus(tally);
            }
        }
    }
    sum
}

/// Formats a hash field value: `"{seq}:{connections}:{visitors}"`.
pub(super) fn format_value(seq: u64, t: Tally) -> String {
    format!("{seq}:{}:{}", t.connections, t.visitors)
}

/// Parses a hash field value `"{seq}:{connections}:{visitors}"`.
pub(super) fn parse_value(v: &str) -> Option<(u64, Tally)> {
    let mut it = v.split(':');
    let seq = it.next()?.parse().ok()?;
    let connections = it.next()?.parse().ok()?;
    let visitors = it.next()?.parse().ok()?;
    if it.next().is_some() {
        return None;
    }
    Some((
        seq,
        Tally {
            connections,
            visitors,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn t(n: u64) -> Tally {
        Tally {
            connections: n,
            visitors: n,
        }
    }

    fn id(s: &str) -> NodeId {
        NodeId::parse(s).expect("node id")
    }

    fn view(ids: &[&str]) -> LiveView {
        ids.iter()
            .map(|s| {
                let i = id(s);
                (i.process, i.incarnation)
            })
            .collect()
    }

    /// A stale or reordered value never overwrites a newer one.
    #[test]
    fn older_seq_never_wins() {
        let mut tb = RemoteTable::default();
        let x = PageId::parse("x").unwrap();
        tb.hold(&x);
        tb.set_live(view(&["a.1", "b.1"]), Instant::now(), None);
        assert!(tb.apply(&x, &id("a.1"), 5, t(3)));
        assert!(!tb.apply(&x, &id("a.1"), 4, t(9)), "older seq ignored");
        assert!(!tb.apply(&x, &id("a.1"), 5, t(9)), "same seq ignored");
        assert!(tb.apply(&x, &id("b.1"), 1, t(2)));
        assert_eq!(tb.sum(&x), t(5));
        assert!(tb.apply(&x, &id("a.1"), 6, t(0)));
        assert_eq!(tb.sum(&x), t(2));
    }

    /// Only nodes of the live view count; a node dropped from the view loses
    /// its values; a process is never counted under two incarnations.
    #[test]
    fn only_the_live_incarnation_counts() {
        let mut tb = RemoteTable::default();
        let x = PageId::parse("x").unwrap();
        tb.hold(&x);
        let now = Instant::now();
        let c = tb.set_live(view(&["a.1", "b.1"]), now, None);
        assert!(c.joined && c.changed);
        tb.apply(&x, &id("a.1"), 1, t(100));
        tb.apply(&x, &id("b.1"), 1, t(4));
        // Not live yet: ignored (it is loaded once a snapshot shows it).
        assert!(!tb.apply(&x, &id("a.2"), 1, t(100)));
        assert_eq!(tb.sum(&x), t(104));
        // a.1 stalled past its ttl: the snapshot no longer has it.
        let c = tb.set_live(view(&["b.1"]), now, None);
        assert_eq!(c.affected, vec![x.clone()]);
        assert!(!c.joined && c.changed);
        let c = tb.set_live(view(&["b.1"]), now, None);
        assert!(c.affected.is_empty() && !c.changed);
        assert_eq!(tb.sum(&x), t(4));
        // Late messages of a.1 are ignored.
        assert!(!tb.apply(&x, &id("a.1"), 2, t(100)));
        // a.2 registered: counted once, never with a.1.
        let c = tb.set_live(view(&["a.2", "b.1"]), now, None);
        assert!(c.joined);
        assert!(tb.apply(&x, &id("a.2"), 1, t(100)));
        assert!(!tb.apply(&x, &id("a.1"), 3, t(100)));
        assert_eq!(tb.sum(&x), t(104));
    }

    /// Values of pages not held are ignored; unheld pages sum to zero.
    #[test]
    fn unheld_pages_ignored() {
        let mut tb = RemoteTable::default();
        tb.set_live(view(&["a.1"]), Instant::now(), None);
        let y = PageId::parse("y").unwrap();
        assert!(!tb.apply(&y, &id("a.1"), 1, t(1)));
        assert_eq!(tb.sum(&y), Tally::ZERO);
    }

    /// Field values and ids parse; HTTP sums count live nodes only.
    #[test]
    fn formats() {
        assert_eq!(
            parse_value("12:3:2"),
            Some((
                12,
                Tally {
                    connections: 3,
                    visitors: 2
                }
            ))
        );
        assert_eq!(parse_value(&format_value(7, t(4))), Some((7, t(4))));
        assert_eq!(parse_value("12:3"), None);
        assert_eq!(parse_value("1:2:3:4"), None);
        assert_eq!(id("ab-12.3").to_string(), "ab-12.3");
        assert_eq!(NodeId::parse("nodot"), None);
        assert_eq!(NodeId::parse(".1"), None);
        assert_eq!(NodeId::parse("a b.1"), None, "not a process name of ours");
        assert_eq!(NodeId::parse("a.x"), None);
        let mut tb = RemoteTable::default();
        tb.set_live(view(&["a.2", "b.1"]), Instant::now(), None);
        let fields: HashMap<String, String> = [
            ("a.1", "9:50:50"),
            ("a.2", "1:1:1"),
            ("b.1", "3:2:1"),
            ("c.1", "3:7:7"),
            ("junk", "x"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(
            sum_fields(&tb, &fields),
            Tally {
                connections: 3,
                visitors: 2
            }
        );
    }

    /// Values that vanished with Redis's data stay as ghosts: replaced by
    /// the next incarnation's value, dropped by a load made after it
    /// registered, or when they expire; never counted with it.
    #[test]
    fn ghosts_bridge_a_redis_that_lost_its_data() {
        let mut tb = RemoteTable::default();
        let (x, y) = (PageId::parse("x").unwrap(), PageId::parse("y").unwrap());
        tb.hold(&x);
        tb.hold(&y);
        let t0 = Instant::now();
        tb.set_live(view(&["a.1", "b.1"]), t0, None);
        tb.apply(&x, &id("a.1"), 1, t(60));
        tb.apply(&y, &id("a.1"), 2, t(5));
        tb.apply(&x, &id("b.1"), 1, t(7));
        // Redis came back empty: nobody is live.
        let until = t0 + Duration::from_secs(1);
        let c = tb.set_live(view(&[]), t0, Some(until));
        assert!(c.affected.is_empty(), "ghosts kept");
        assert_eq!(tb.sum(&x), t(67));
        tb.clear_values();
        assert_eq!(tb.sum(&x), t(67), "a reconnect keeps ghosts");
        // a registered again: its new value replaces the ghost, never adds.
        let c = tb.set_live(view(&["a.2"]), t0, None);
        assert!(c.joined);
        assert!(tb.apply(&x, &id("a.2"), 1, t(61)));
        assert_eq!(tb.sum(&x), t(68));
        // A load of y made while a.2 was live shows a has nothing there.
        assert_eq!(tb.sum(&y), t(5));
        assert!(tb.loaded(&y, &view(&["a.2"])));
        assert_eq!(tb.sum(&y), Tally::ZERO);
        // A load made before b registered again proves nothing about b.
        assert!(!tb.loaded(&x, &view(&["a.2"])));
        assert_eq!(tb.sum(&x), t(68));
        // b never came back: its ghost expires.
        assert!(tb.expire_ghosts(t0).is_empty());
        assert_eq!(tb.expire_ghosts(until), vec![x.clone()]);
        assert_eq!(tb.sum(&x), t(61));
        assert!(!tb.has_ghosts());
    }

    /// Without data loss a vanished node's values go at once.
    #[test]
    fn a_dead_node_is_no_ghost() {
        let mut tb = RemoteTable::default();
        let x = PageId::parse("x").unwrap();
        tb.hold(&x);
        let t0 = Instant::now();
        tb.set_live(view(&["a.1"]), t0, None);
        tb.apply(&x, &id("a.1"), 1, t(3));
        let c = tb.set_live(view(&[]), t0, None);
        assert_eq!(c.affected, vec![x.clone()]);
        assert_eq!(tb.sum(&x), Tally::ZERO);
    }
}
