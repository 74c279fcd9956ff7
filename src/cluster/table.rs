//! The other nodes' values of the pages this node holds, and the live view
//! they are counted under. Plain data, no I/O: the actor feeds it heartbeat
//! snapshots, channel messages and loaded hash fields.
//!
//! Two rules make double counting impossible by construction:
//! - only nodes of the last heartbeat snapshot are counted (one atomic read
//!   of the liveness sorted set, so it never holds both incarnations of a
//!   process: the next one registers only after the previous one expired);
//! - entries are kept per *process*, so even a table fed from two sources
//!   holds at most one incarnation of each process.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use crate::protocol::{PageId, Tally};

/// A node id: `{process}.{incarnation}`. The process part is fresh per process
/// start; the incarnation goes up each time the process had to register again
/// because it was declared dead (stalled past `node_ttl`, or Redis lost it).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct NodeId {
    /// The process.
    pub process: Arc<str>,
    /// Its registration, counting from 1.
    pub incarnation: u64,
}

impl NodeId {
    /// Parses `{process}.{incarnation}`; `None` for anything else.
    pub fn parse(s: &str) -> Option<NodeId> {
        let (process, inc) = s.rsplit_once('.')?;
        if process.is_empty() {
            return None;
        }
        Some(NodeId {
            process: process.into(),
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
}

/// Held pages' values per process, and the live view.
#[derive(Default)]
pub(super) struct RemoteTable {
    /// Held page -> process -> its latest value.
    pages: HashMap<PageId, HashMap<Arc<str>, Entry>>,
    /// The live view: process -> its live incarnation (own process excluded).
    live: HashMap<Arc<str>, u64>,
}

impl RemoteTable {
    /// Whether `id` is counted under the current live view.
    pub fn is_live(&self, id: &NodeId) -> bool {
        self.live.get(&id.process) == Some(&id.incarnation)
    }

    /// The processes of the live view.
    pub fn live_processes(&self) -> impl Iterator<Item = &Arc<str>> {
        self.live.keys()
    }

    /// Starts holding `page` (values are applied only to held pages).
    pub fn hold(&mut self, page: &PageId) {
        self.pages.entry(page.clone()).or_default();
    }

    /// Whether `page` is held.
    pub fn holds(&self, page: &PageId) -> bool {
        self.pages.contains_key(page)
    }

    /// Stops holding `page`.
    pub fn release(&mut self, page: &PageId) {
        self.pages.remove(page);
    }

    /// Forgets every value (the pages stay held, the live view stays).
    pub fn clear_values(&mut self) {
        for m in self.pages.values_mut() {
            m.clear();
        }
    }

    /// Stores `id`'s value of a held page if `id` is live and the value is
    /// newer than the one held for its process; true if the sum may have changed.
    pub fn apply(&mut self, page: &PageId, id: &NodeId, seq: u64, tally: Tally) -> bool {
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
                    },
                );
                true
            }
        }
    }

    /// Sum over the live processes held for `page`.
    pub fn sum(&self, page: &PageId) -> Tally {
        self.pages.get(page).map_or(Tally::ZERO, |m| {
            m.values().fold(Tally::ZERO, |acc, e| acc.plus(e.tally))
        })
    }

    /// Replaces the live view with a heartbeat snapshot (own process left
    /// out by the caller). Returns the held pages that lost a value, whether
    /// a node not counted before became live (its values must be loaded),
    /// and whether the view changed at all.
    pub fn set_live(&mut self, live: HashMap<Arc<str>, u64>) -> (Vec<PageId>, bool, bool) {
        let joined = live.iter().any(|(p, i)| self.live.get(p) != Some(i));
        let changed = joined || live.len() != self.live.len();
        self.live = live;
        let mut affected = Vec::new();
        for (page, m) in self.pages.iter_mut() {
            let before = m.len();
            let live = &self.live;
            m.retain(|p, e| live.get(p) == Some(&e.incarnation));
            if m.len() != before {
                affected.push(page.clone());
            }
        }
        (affected, joined, changed)
    }

    /// Held pages.
    pub fn held(&self) -> impl Iterator<Item = &PageId> {
        self.pages.keys()
    }
}

/// Sums `fields` (`node id -> "seq:connections:visitors"`) over the nodes of
/// `table`'s live view, one value per process (read-only: HTTP lookups).
pub(super) fn sum_fields(table: &RemoteTable, fields: &HashMap<String, String>) -> Tally {
    let mut seen: HashSet<Arc<str>> = HashSet::new();
    let mut sum = Tally::ZERO;
    for (node, value) in fields {
        let (Some(id), Some((_, tally))) = (NodeId::parse(node), parse_value(value)) else {
            continue;
        };
        if table.is_live(&id) && seen.insert(id.process.clone()) {
            sum = sum.plus(tally);
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

    fn t(n: u64) -> Tally {
        Tally {
            connections: n,
            visitors: n,
        }
    }

    fn id(s: &str) -> NodeId {
        NodeId::parse(s).expect("node id")
    }

    fn view(ids: &[&str]) -> HashMap<Arc<str>, u64> {
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
        let x = PageId::from("x");
        tb.hold(&x);
        tb.set_live(view(&["a.1", "b.1"]));
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
        let x = PageId::from("x");
        tb.hold(&x);
        let (_, joined, changed) = tb.set_live(view(&["a.1", "b.1"]));
        assert!(joined && changed);
        tb.apply(&x, &id("a.1"), 1, t(100));
        tb.apply(&x, &id("b.1"), 1, t(4));
        // Not live yet: ignored (it is loaded once a snapshot shows it).
        assert!(!tb.apply(&x, &id("a.2"), 1, t(100)));
        assert_eq!(tb.sum(&x), t(104));
        // a.1 stalled past its ttl: the snapshot no longer has it.
        let (affected, joined, changed) = tb.set_live(view(&["b.1"]));
        assert_eq!(affected, vec![x.clone()]);
        assert!(!joined && changed);
        let (affected, _, changed) = tb.set_live(view(&["b.1"]));
        assert!(affected.is_empty() && !changed);
        assert_eq!(tb.sum(&x), t(4));
        // Late messages of a.1 are ignored.
        assert!(!tb.apply(&x, &id("a.1"), 2, t(100)));
        // a.2 registered: counted once, never with a.1.
        let (_, joined, _) = tb.set_live(view(&["a.2", "b.1"]));
        assert!(joined);
        assert!(tb.apply(&x, &id("a.2"), 1, t(100)));
        assert!(!tb.apply(&x, &id("a.1"), 3, t(100)));
        assert_eq!(tb.sum(&x), t(104));
    }

    /// Values of pages not held are ignored; unheld pages sum to zero.
    #[test]
    fn unheld_pages_ignored() {
        let mut tb = RemoteTable::default();
        tb.set_live(view(&["a.1"]));
        let y = PageId::from("y");
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
        let mut tb = RemoteTable::default();
        tb.set_live(view(&["a.2", "b.1"]));
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
}
