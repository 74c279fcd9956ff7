//! What a connection has to be told, held as state: the hand-over point
//! between a page room (and its shard), which write, and the connection's
//! session, which takes and sends.
//!
//! Counts are state, not a message queue. A connection's [`Mailbox`] holds
//! the latest value of each id that changed since the session last took it
//! (at most the connection's link count), the latest notice (an `error`
//! message from its room) and the terminal instruction (refuse or shut
//! down). A room never waits on a connection and never cuts one off for
//! being behind: while the session cannot write, new counts merge into what
//! is pending, and its next frame carries the merged latest values.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    task::{Context, Poll, Waker},
    time::Instant,
};

use bytestring::ByteString;

use crate::protocol::{update_json, PageId, Tally};

/// A connection's id, unique in the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(u64);

impl ConnId {
    /// An id no connection of this process had before.
    pub fn fresh() -> ConnId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        ConnId(NEXT.fetch_add(1, Ordering::Relaxed))
    }

    /// Its number, for logs.
    pub fn get(self) -> u64 {
        self.0
    }
}

/// One `update` message built by a room, shared by every connection it
/// goes to (each distinct payload is serialized once).
#[derive(Debug)]
pub struct Update {
    /// The serialized message.
    pub(crate) text: ByteString,
    /// Its values, for merging with a later update that arrives before the
    /// session took this one.
    pub(crate) values: Vec<(PageId, Tally)>,
    /// It carries the `visitors` map (its connection subscribed with `"visitors": true`).
    pub(crate) visitors: bool,
    /// When the oldest change it carries was applied at the counter (the
    /// publish-lag histogram); `None` for a full update.
    pub(crate) since: Option<Instant>,
}

impl Update {
    /// An update of `values`, serialized now (with the `visitors` map if `visitors`).
    pub fn new(
        values: Vec<(PageId, Tally)>,
        since: Option<Instant>,
        visitors: bool,
    ) -> Arc<Update> {
        let text = update_json(values.iter().map(|(id, t)| (&**id, *t)), visitors).into();
        Arc::new(Update {
            text,
            values,
            visitors,
            since,
        })
    }
}

/// The terminal instruction for a connection.
#[derive(Debug, Clone)]
pub enum End {
    /// Send this `error` message, then close with `code` and `reason`.
    Refuse {
        error: ByteString,
        code: u16,
        reason: &'static str,
    },
    /// The server is shutting down: close with 1001.
    Shutdown,
}

/// Pending counts of a connection.
#[derive(Debug, Default)]
enum PendingCounts {
    /// Nothing to send.
    #[default]
    Nothing,
    /// One update as its room built it (the usual case: sent as is).
    One(Arc<Update>),
    /// Several updates merged: the latest value of each id, in the order
    /// the ids first changed, rendered as the latest of them was (with or
    /// without the `visitors` map: a connection's updates change form only
    /// at a new subscribe, whose full update replaces what is pending).
    Merged {
        values: Vec<(PageId, Tally)>,
        since: Option<Instant>,
        visitors: bool,
    },
}

#[derive(Debug, Default)]
struct Pending {
    counts: PendingCounts,
    notice: Option<ByteString>,
    end: Option<End>,
    /// Something was put here since the session last looked.
    signalled: bool,
    /// The session's task, while it waits.
    waker: Option<Waker>,
}

/// What a session takes from its mailbox in one go.
#[derive(Debug, Default)]
pub struct Taken {
    /// The terminal instruction, if any (then nothing else matters).
    pub end: Option<End>,
    /// An `error` message to send before the counts.
    pub(crate) notice: Option<ByteString>,
    /// An update to send: its text and the publish time of its oldest change.
    pub update: Option<(ByteString, Option<Instant>)>,
}

impl Taken {
    /// Nothing was pending.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.end.is_none() && self.notice.is_none() && self.update.is_none()
    }
}

/// A connection's pending output (see the module doc). The room holds one
/// `Arc` (in its connection entry), the session the other.
#[derive(Debug, Default)]
pub struct Mailbox {
    /// The pending state and the session's waker; locked only to merge,
    /// take or register, never across an await.
    pending: Mutex<Pending>,
}

impl Mailbox {
    /// An empty mailbox.
    pub fn new() -> Arc<Mailbox> {
        Arc::new(Mailbox::default())
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding this lock cannot leave it inconsistent
        // (every update is a single assignment), so poisoning is ignored.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the mailbox signalled and wakes the session (after unlocking).
    fn signal(mut p: MutexGuard<'_, Pending>) {
        p.signalled = true;
        let waker = p.waker.take();
        drop(p);
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Applies `change` unless the mailbox has ended, then wakes the session.
    fn put(&self, change: impl FnOnce(&mut Pending)) {
        let mut p = self.lock();
        if p.end.is_some() {
            return;
        }
        change(&mut p);
        Self::signal(p);
    }

    /// Merges a delta: each of its ids takes its new value.
    pub fn update(&self, update: &Arc<Update>) {
        self.put(|p| match &mut p.counts {
            PendingCounts::Nothing => p.counts = PendingCounts::One(update.clone()),
            PendingCounts::One(first) => {
                let mut values = first.values.clone();
                merge(&mut values, &update.values);
                let since = oldest(first.since, update.since);
                p.counts = PendingCounts::Merged {
                    values,
                    since,
                    visitors: update.visitors,
                };
            }
            PendingCounts::Merged {
                values,
                since,
                visitors,
            } => {
                merge(values, &update.values);
                *since = oldest(*since, update.since);
                *visitors = update.visitors;
            }
        });
    }

    /// Replaces whatever counts are pending with a full update of the
    /// connection's (new) link set: it carries the latest value of every id
    /// the connection follows, and ids it no longer follows are dropped.
    pub fn replace(&self, full: Arc<Update>) {
        self.put(|p| p.counts = PendingCounts::One(full));
    }

    /// Drops the pending counts (not the notice or the end): the
    /// connection subscribed anew, and its full update follows.
    pub(crate) fn discard_counts(&self) {
        self.lock().counts = PendingCounts::Nothing;
    }

    /// Sets the notice to send (an `error` message); a later one replaces it.
    pub(crate) fn notice(&self, text: ByteString) {
        self.put(|p| p.notice = Some(text));
    }

    /// Sets the terminal instruction; the first one stands.
    pub(crate) fn end(&self, end: End) {
        self.put(|p| p.end = Some(end));
    }

    /// The terminal instruction, if one was set (nothing is taken).
    pub(crate) fn ended(&self) -> Option<End> {
        self.lock().end.clone()
    }

    /// Takes everything pending, leaving the mailbox empty (but ended, if it was).
    pub fn take(&self) -> Taken {
        let mut p = self.lock();
        p.signalled = false;
        if let Some(end) = p.end.clone() {
            p.counts = PendingCounts::Nothing;
            p.notice = None;
            return Taken {
                end: Some(end),
                ..Taken::default()
            };
        }
        let update = match std::mem::take(&mut p.counts) {
            PendingCounts::Nothing => None,
            PendingCounts::One(u) => Some((u.text.clone(), u.since)),
            PendingCounts::Merged {
                values,
                since,
                visitors,
            } => Some((
                update_json(values.iter().map(|(id, t)| (&**id, *t)), visitors).into(),
                since,
            )),
        };
        Taken {
            end: None,
            notice: p.notice.take(),
            update,
        }
    }

    /// Ready when something was put here since the last `take` (or the
    /// last ready answer); otherwise registers the task to wake. Polled
    /// in place by the session, so waiting costs its task no future state.
    pub(crate) fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut p = self.lock();
        if std::mem::take(&mut p.signalled) {
            return Poll::Ready(());
        }
        if !p.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            p.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Test hook: waits until something was put here (see
    /// [`Mailbox::poll_ready`]).
    #[cfg(feature = "test-hooks")]
    pub async fn ready(&self) {
        std::future::poll_fn(|cx| self.poll_ready(cx)).await;
    }
}

fn merge(values: &mut Vec<(PageId, Tally)>, new: &[(PageId, Tally)]) {
    // A linear search while small; an index beyond, so merging into a
    // connection far behind on hundreds of links stays linear.
    if values.len().saturating_mul(new.len()) <= 256 {
        for (id, n) in new {
            match values.iter_mut().find(|(v, _)| v == id) {
                Some(slot) => slot.1 = *n,
                None => values.push((id.clone(), *n)),
            }
        }
        return;
    }
    let mut at: HashMap<PageId, usize> = values
        .iter()
        .enumerate()
        .map(|(i, (id, _))| (id.clone(), i))
        .collect();
    for (id, n) in new {
        match at.get(id) {
            Some(&i) => values[i].1 = *n,
            None => {
                at.insert(id.clone(), values.len());
                values.push((id.clone(), *n));
            }
        }
    }
}

fn oldest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An update without the visitors map (each id's visitors = its connections).
    fn up(values: &[(&str, u64)]) -> Arc<Update> {
        up_with(
            &values.iter().map(|(k, v)| (*k, *v, *v)).collect::<Vec<_>>(),
            false,
        )
    }

    fn up_with(values: &[(&str, u64, u64)], visitors: bool) -> Arc<Update> {
        Update::new(
            values
                .iter()
                .map(|(k, c, v)| {
                    let t = Tally {
                        connections: *c,
                        visitors: *v,
                    };
                    (PageId::parse(k).unwrap(), t)
                })
                .collect(),
            None,
            visitors,
        )
    }

    #[test]
    fn deltas_merge_to_the_latest_value_of_each_id() {
        let m = Mailbox::new();
        m.update(&up(&[("a", 1), ("b", 1)]));
        m.update(&up(&[("a", 2)]));
        m.update(&up(&[("c", 5), ("a", 3)]));
        let t = m.take();
        assert_eq!(
            t.update.map(|u| u.0.to_string()).as_deref(),
            Some(r#"{"type":"update","connections":{"a":3,"b":1,"c":5}}"#)
        );
        assert!(m.take().is_empty());
    }

    #[test]
    fn merging_many_links_keeps_first_change_order_and_latest_values() {
        let m = Mailbox::new();
        let ids: Vec<String> = (0..100).map(|i| format!("p{i}")).collect();
        let all = |n: u64| up(&ids.iter().map(|i| (i.as_str(), n)).collect::<Vec<_>>());
        m.update(&all(1));
        m.update(&all(2));
        m.update(&up(&[("new", 7), ("p5", 3)]));
        let (text, _) = m.take().update.expect("an update");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        let map = v["connections"].as_object().expect("map");
        assert_eq!(map.len(), 101);
        assert_eq!(
            (map["p0"].as_u64(), map["p5"].as_u64(), map["new"].as_u64()),
            (Some(2), Some(3), Some(7))
        );
    }

    #[test]
    fn a_full_update_replaces_pending_deltas_and_an_end_wins() {
        let m = Mailbox::new();
        m.update(&up(&[("gone", 1)]));
        m.replace(up(&[("x", 4)]));
        m.notice("oops".into());
        let t = m.take();
        assert_eq!(t.notice.as_deref(), Some("oops"));
        assert_eq!(
            t.update.map(|u| u.0.to_string()).as_deref(),
            Some(r#"{"type":"update","connections":{"x":4}}"#)
        );
        m.update(&up(&[("x", 5)]));
        m.end(End::Shutdown);
        m.update(&up(&[("x", 6)]));
        let t = m.take();
        assert!(matches!(t.end, Some(End::Shutdown)));
        assert!(t.update.is_none());
        assert!(matches!(m.take().end, Some(End::Shutdown)));
    }

    #[test]
    fn merged_updates_keep_the_visitors_map_and_the_latest_tally() {
        let m = Mailbox::new();
        m.update(&up_with(&[("a", 3, 1), ("b", 1, 1)], true));
        m.update(&up_with(&[("a", 2, 1)], true));
        m.update(&up_with(&[("b", 2, 2)], true));
        assert_eq!(
            m.take().update.map(|u| u.0.to_string()).as_deref(),
            Some(r#"{"type":"update","connections":{"a":2,"b":2},"visitors":{"a":1,"b":2}}"#)
        );
        // Without the flag, merged updates stay byte for byte the plain form.
        m.update(&up_with(&[("a", 3, 1)], false));
        m.update(&up_with(&[("b", 4, 1)], false));
        assert_eq!(
            m.take().update.map(|u| u.0.to_string()).as_deref(),
            Some(r#"{"type":"update","connections":{"a":3,"b":4}}"#)
        );
    }
}
