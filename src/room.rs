//! `PageRoom`: one actor per page id, living on the HTTP worker that hosts
//! the shard its id hashes to. It owns the page's connections: their
//! mailboxes ([`crate::delivery`]), their link sets and the
//! reference-counted union of those links, and their visitors (a reference
//! count per visitor key, [`crate::visitor::Visitors`]). It follows a link at
//! the counter only while at least one of its connections wants it, reports
//! its own [`Tally`] (connections and distinct visitors), and hands each
//! changed tally only to the connections that subscribed to that id,
//! serializing each distinct payload once. A connection that did not ask for
//! visitors hears of an id only when its connection count changed.
//!
//! Delivery never waits and never cuts a connection off: a count goes into
//! the connection's mailbox, where it merges with whatever its session has
//! not taken yet.
//!
//! Recovery: the connection list (each connection's mailbox, visitor and
//! link set) is the source of truth of the page's count; everything else is
//! derived from it or from the counter. Every handler's body and timer runs
//! through [`crate::supervise::contain`]. After a caught panic the room first
//! applies what the interrupted message meant to the list (a `Join` adds its
//! connection, a `Leave` removes it, a `SetLinks` sets its links), then
//! rebuilds the rest from the list: visitors and followed links recounted,
//! the cache dropped, its whole state sent to the counter (`RoomState`,
//! which replaces what the counter knew of this room, then a `Subscribe` of
//! every link), and each connection that follows links waits for its full
//! update from the counter's answer. No connection is closed, and every
//! value a connection is shown still comes from the counter, in order.

use std::{collections::HashMap, sync::Arc, time::Instant};

use actix::prelude::*;

use crate::{
    config::Settings,
    counter::{
        Counter, Counts, Epoch, Frames, RoomCount, RoomHandle, RoomId, RoomState, Subscribe,
        Subscribed, Unsubscribe,
    },
    delivery::{ConnId, End, Mailbox, Update},
    metrics::StorageOp,
    protocol::{ErrorCode, PageId, ProtocolError, Tally},
    storage::{RoomRecord, Storage},
    supervise::{self, ActorKind, RecoverInPlace, Recovering},
    time::now_ms,
    visitor::{VisitorKey, Visitors},
};

// ---------------------------------------------------------------- messages

/// A connection opened (its upgrade completed).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Join {
    pub page: PageId,
    pub conn: ConnId,
    /// Where the room puts what the connection is to be told.
    pub mailbox: Arc<Mailbox>,
    /// Its visitor (`None`: its own visitor).
    pub visitor: Option<VisitorKey>,
}

/// A connection replaced its link set.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetLinks {
    pub page: PageId,
    pub conn: ConnId,
    pub links: Vec<PageId>,
    /// Its updates carry the `visitors` map from now on.
    pub visitors: bool,
}

/// A connection closed, timed out or died.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Leave {
    pub page: PageId,
    pub conn: ConnId,
}

/// Room -> shard: the room has no connection left; `processed` is how many
/// routed messages it handled.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct RoomIdle {
    pub(crate) page: PageId,
    pub(crate) room: RoomId,
    pub(crate) processed: u64,
}

/// The server is shutting down (to a shard, which relays it to its rooms):
/// tell every connection to close with 1001, and every connection that joins
/// from now on as soon as it joins.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CloseAll;

/// Re-report everything to the counter (it restarted), for resync `epoch`.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct ReportState {
    pub(crate) epoch: Epoch,
}

/// Stop now: the shard removed this room from its map.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct StopRoom;

/// Write the room record now if it changed (shutdown).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct SaveRecord;

/// Shard -> room, after the shard's own panic: every routed message before
/// this one is handled, so `forwarded` is the count handled; rebuild and
/// re-report everything (a delivery the shard's panic cut may be missing).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Reverify {
    pub(crate) forwarded: u64,
    /// The shard's recovery, over once every room dropped its message
    /// (held, never read).
    pub(crate) _recovering: Arc<Recovering>,
}

/// Test hook: scramble the room's derived state and panic in the handler,
/// as a bug would (contained: the room rebuilds from its connections).
#[cfg(feature = "test-hooks")]
#[derive(Message)]
#[rtype(result = "()")]
pub struct PanicRoom;

// ---------------------------------------------------------------- state

/// Which of a batch of changes one connection follows (a bitset).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Subset {
    /// Up to 64 changes.
    Small(u64),
    /// More: one bit per change.
    Large(Vec<u64>),
}

impl Subset {
    fn new(words: usize) -> Subset {
        if words <= 1 {
            Subset::Small(0)
        } else {
            Subset::Large(vec![0; words])
        }
    }

    fn set(&mut self, i: usize) {
        match self {
            Subset::Small(w) => *w |= 1 << i,
            Subset::Large(ws) => ws[i / 64] |= 1 << (i % 64),
        }
    }

    fn get(&self, i: usize) -> bool {
        match self {
            Subset::Small(w) => w & (1 << i) != 0,
            Subset::Large(ws) => ws[i / 64] & (1 << (i % 64)) != 0,
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Subset::Small(w) => *w == 0,
            Subset::Large(ws) => ws.iter().all(|w| *w == 0),
        }
    }

    /// Indices of the set bits below `n`.
    fn iter(&self, n: usize) -> impl Iterator<Item = usize> + '_ {
        (0..n).filter(|i| self.get(*i))
    }
}

/// A link the room follows.
struct Followed {
    /// How many of its connections want it.
    conns: usize,
    /// The id of the `Subscribe` that asked the counter for it. A refusal
    /// applies only if it answers this request: if the link was dropped and
    /// asked for again meanwhile, the newer answer decides (otherwise an old
    /// refusal could drop a link the counter has since accepted, leaving the
    /// counter following it for a room that does not).
    req: u64,
}

/// A connection's link ids: sorted, without duplicates, one allocation of
/// 16 bytes per id (a `HashSet` of 3 ids held ~150 bytes).
#[derive(Clone, Default)]
struct LinkSet(Box<[PageId]>);

impl LinkSet {
    fn new(mut links: Vec<PageId>) -> LinkSet {
        links.sort_unstable();
        links.dedup();
        LinkSet(links.into_boxed_slice())
    }

    fn contains(&self, link: &PageId) -> bool {
        self.0.binary_search(link).is_ok()
    }

    fn iter(&self) -> std::slice::Iter<'_, PageId> {
        self.0.iter()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Removes `link`; true if it was there.
    fn remove(&mut self, link: &PageId) -> bool {
        if !self.contains(link) {
            return false;
        }
        self.0 = self.0.iter().filter(|l| *l != link).cloned().collect();
        true
    }
}

/// One open connection of the room.
struct Conn {
    /// What it is to be told (shared with its session).
    mailbox: Arc<Mailbox>,
    /// The ids it subscribed to.
    links: LinkSet,
    /// Waiting for counts of some of its links before its full update.
    pending: bool,
    /// Its visitor (`None`: its own visitor).
    visitor: Option<VisitorKey>,
    /// It asked for the `visitors` map in its updates.
    visitors: bool,
}

pub struct PageRoom {
    /// The page this room counts.
    page: PageId,
    /// Unique id of this room instance (a recreated room gets a new one).
    id: RoomId,
    /// The index of its shard (the counter's deliveries go through it).
    shard_index: usize,
    /// The shard that routes messages here and decides eviction.
    shard: Recipient<RoomIdle>,
    /// Where counts and subscriptions are reported.
    counter: Addr<Counter>,
    /// Where the counter delivers to this room (made once, on first use). It
    /// holds the room's own address, which is harmless: a room stops only
    /// on [`StopRoom`], never by losing its last address.
    handle: Option<Arc<RoomHandle>>,
    /// Where the room record is written.
    storage: Storage,
    /// Idle timeout and snapshot interval.
    settings: Arc<Settings>,
    /// Open connections.
    conns: HashMap<ConnId, Conn>,
    /// The distinct visitors among them.
    visitors: Visitors,
    /// The links its connections want (the union, reference counted).
    refs: HashMap<PageId, Followed>,
    /// Last tallies known for followed links (what subscribed clients were told).
    cache: HashMap<PageId, Tally>,
    /// Id of the last `Subscribe` sent.
    last_req: u64,
    /// The page's outbound links: the last non-empty link set one of its
    /// connections subscribed to (restored from the room record on start).
    last_links: Vec<PageId>,
    /// Messages routed by the shard and handled here (idle handshake).
    processed: u64,
    /// Connections opened since the last count report (for stats).
    opened: u64,
    /// The record changed since it was last written.
    dirty: bool,
    /// Set by [`CloseAll`]: connections joining now are told to close.
    closing: bool,
    /// A record write is scheduled.
    save_scheduled: bool,
    /// The counter's resync a panic interrupted the report of (0: none):
    /// the recovery's state report answers it.
    resync_epoch: Epoch,
}

impl PageRoom {
    pub(crate) fn new(
        page: PageId,
        id: RoomId,
        shard_index: usize,
        shard: Recipient<RoomIdle>,
        counter: Addr<Counter>,
        storage: Storage,
        settings: Arc<Settings>,
    ) -> PageRoom {
        PageRoom {
            page,
            id,
            shard_index,
            shard,
            counter,
            handle: None,
            storage,
            settings,
            conns: HashMap::new(),
            visitors: Visitors::default(),
            refs: HashMap::new(),
            cache: HashMap::new(),
            last_req: 0,
            last_links: Vec::new(),
            processed: 0,
            opened: 0,
            dirty: false,
            closing: false,
            save_scheduled: false,
            resync_epoch: Epoch::default(),
        }
    }

    /// Tells the shard the room has no connection left (after each routed
    /// message that leaves it empty): it may then be stopped at any time.
    fn report_if_idle(&self) {
        if self.conns.is_empty() {
            self.shard.do_send(RoomIdle {
                page: self.page.clone(),
                room: self.id,
                processed: self.processed,
            });
        }
    }

    /// Where the counter delivers to this room.
    fn handle(&mut self, ctx: &Context<Self>) -> Arc<RoomHandle> {
        self.handle
            .get_or_insert_with(|| {
                RoomHandle::of(&ctx.address(), self.page.clone(), self.shard_index)
            })
            .clone()
    }

    /// This page's own figures.
    fn tally(&self) -> Tally {
        Tally {
            connections: self.conns.len() as u64,
            visitors: self.visitors.distinct(),
        }
    }

    fn report_count(&mut self) {
        self.counter.do_send(RoomCount {
            page: self.page.clone(),
            tally: self.tally(),
            opened: std::mem::take(&mut self.opened),
        });
    }

    /// The record (links, last activity) changed: its own connections came,
    /// went or subscribed. Counts of the pages it follows are not in it, so
    /// neither a publish nor a subscribe answer writes it; a live page is
    /// never expired or trimmed, and its last leave writes its last activity.
    fn mark_dirty(&mut self, ctx: &mut Context<Self>) {
        self.dirty = true;
        if !self.save_scheduled {
            self.save_scheduled = true;
            ctx.run_later(self.settings.storage.snapshot_interval, |act, ctx| {
                act.save_scheduled = false;
                act.guard(ctx, "save timer", |act, _| act.save(), |_| {});
            });
        }
    }

    /// Rebuilds everything derived from the connection list after a panic
    /// (see the module doc) and tells the counter the room's whole state.
    fn recover(&mut self, ctx: &mut Context<Self>) {
        let req = self.last_req + 1;
        self.last_req = req;
        let mut visitors = Visitors::default();
        let mut refs: HashMap<PageId, Followed> = HashMap::new();
        for conn in self.conns.values_mut() {
            visitors.add(conn.visitor);
            for link in conn.links.iter() {
                refs.entry(link.clone())
                    .or_insert(Followed { conns: 0, req })
                    .conns += 1;
            }
            if !conn.links.is_empty() {
                // Its full update comes with the counter's answer.
                conn.mailbox.discard_counts();
                conn.pending = true;
            }
        }
        self.visitors = visitors;
        self.refs = refs;
        self.cache.clear();
        let to = self.handle(ctx);
        let links: Vec<PageId> = self.refs.keys().cloned().collect();
        // Replaces what the counter knew of this room (links it followed
        // for it, its tally), then asks for the counts of every link.
        self.counter.do_send(RoomState {
            epoch: std::mem::take(&mut self.resync_epoch),
            room: self.id,
            to: to.clone(),
            page: self.page.clone(),
            tally: self.tally(),
            links: links.clone(),
        });
        if !links.is_empty() {
            self.counter.do_send(Subscribe {
                room: self.id,
                to,
                links,
                req,
            });
        }
        self.report_count();
        self.mark_dirty(ctx);
        self.report_if_idle();
        tracing::warn!(page = %self.page, connections = self.conns.len(), "room rebuilt from its connections");
    }

    fn save(&mut self) {
        if !self.dirty {
            return;
        }
        if self.last_links.is_empty() && self.cache.is_empty() {
            // Nothing worth a record (a page whose viewers never subscribed).
            self.dirty = false;
            return;
        }
        // The site figure is not a link of the page.
        let record = RoomRecord {
            links: self
                .last_links
                .iter()
                .filter(|l| !l.is_site())
                .cloned()
                .collect(),
            last_active_ms: now_ms(),
        };
        match self.storage.save_room(&self.page, &record) {
            Ok(()) => self.dirty = false,
            Err(e) => {
                tracing::warn!(op = StorageOp::WriteRoom.label(), error = %e, "room record write failed; retried at the room's next change");
                crate::metrics::storage_error(StorageOp::WriteRoom);
            }
        }
    }

    /// The full update of one connection's links, from the cache.
    fn full_update(&self, conn: &Conn) -> Arc<Update> {
        Update::new(
            conn.links
                .iter()
                .map(|l| (l.clone(), self.cache.get(l).copied().unwrap_or_default()))
                .collect(),
            None,
            conn.visitors,
        )
    }

    /// Applies tallies from the counter and delivers the ids whose value
    /// changed to the (non-pending) connections that follow them: to a
    /// connection that asked for visitors when either figure changed, to
    /// any other only when the connection count did.
    /// Equal payloads are serialized once: in this room, and through
    /// `frames` (the shard's, for one publish) across its rooms.
    fn apply_counts(
        &mut self,
        counts: Vec<(PageId, Tally)>,
        since: Option<Instant>,
        frames: Option<&Frames>,
    ) -> bool {
        // Each change, and whether its connection count changed.
        let mut changes: Vec<(PageId, Tally, bool)> = Vec::new();
        for (link, tally) in counts {
            if !self.refs.contains_key(&link) {
                continue;
            }
            match self.cache.insert(link.clone(), tally) {
                Some(old) if old == tally => {}
                old => {
                    let connections = old.is_none_or(|o| o.connections != tally.connections);
                    changes.push((link, tally, connections));
                }
            }
        }
        if changes.is_empty() {
            return false;
        }
        // Group connections by which of the changes they follow (and the
        // form they get), so each distinct payload is serialized once. The
        // subset is a bitset over `changes`: one word (no allocation) for up
        // to 64 changes.
        let words = changes.len().div_ceil(64);
        let mut payloads: HashMap<(Subset, bool), Arc<Update>> = HashMap::new();
        for conn in self.conns.values() {
            if conn.pending {
                continue;
            }
            let mut subset = Subset::new(words);
            for (i, (link, _, connections)) in changes.iter().enumerate() {
                if (conn.visitors || *connections) && conn.links.contains(link) {
                    subset.set(i);
                }
            }
            if subset.is_empty() {
                continue;
            }
            let update =
                payloads
                    .entry((subset, conn.visitors))
                    .or_insert_with_key(|(subset, visitors)| {
                        let values = subset
                            .iter(changes.len())
                            .map(|i| (changes[i].0.clone(), changes[i].1))
                            .collect();
                        match frames {
                            Some(frames) => frames.get(values, since, *visitors),
                            None => Update::new(values, since, *visitors),
                        }
                    });
            conn.mailbox.update(update);
        }
        true
    }

    /// Sends the full update to every pending connection whose links are all known.
    fn release_pending(&mut self) {
        let ready: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.pending && c.links.iter().all(|l| self.cache.contains_key(l)))
            .map(|(id, _)| *id)
            .collect();
        for id in ready {
            let Some(conn) = self.conns.get(&id) else {
                continue;
            };
            let full = self.full_update(conn);
            if let Some(conn) = self.conns.get_mut(&id) {
                conn.pending = false;
                conn.mailbox.replace(full);
            }
        }
    }

    /// The counter refused to track these links (page cap): every connection
    /// that asked for them is told `overloaded` and keeps the rest of its set.
    fn refuse_links(&mut self, refused: &[PageId]) {
        for link in refused {
            self.refs.remove(link);
            self.cache.remove(link);
        }
        for conn in self.conns.values_mut() {
            let dropped: Vec<&PageId> = refused.iter().filter(|l| conn.links.remove(l)).collect();
            if dropped.is_empty() {
                continue;
            }
            let error = ProtocolError::new(
                ErrorCode::Overloaded,
                format!(
                    "the server tracks the most pages it may; not following {} link(s), e.g. {:?}",
                    dropped.len(),
                    &**dropped[0]
                ),
            );
            crate::metrics::error_sent(error.code);
            conn.mailbox.notice(error.to_json().into());
        }
    }

    fn drop_links<'a>(
        &mut self,
        links: impl IntoIterator<Item = &'a PageId>,
        gone: &mut Vec<PageId>,
    ) {
        for link in links {
            if let Some(f) = self.refs.get_mut(link) {
                f.conns -= 1;
                if f.conns == 0 {
                    self.refs.remove(link);
                    self.cache.remove(link);
                    gone.push(link.clone());
                }
            }
        }
    }
}

impl RecoverInPlace for PageRoom {
    const KIND: ActorKind = ActorKind::Room;
    fn recover_in_place(&mut self, ctx: &mut Context<Self>) {
        self.recover(ctx);
    }
}

impl Actor for PageRoom {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Context<Self>) {
        // A panic here leaves the room without its outbound links (logged, counted).
        let _ = supervise::contain(ActorKind::Room, "start", || self.load_record());
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        let _ = supervise::contain(ActorKind::Room, "stop", || self.save());
    }
}

impl PageRoom {
    /// Restores the page's outbound links from its record.
    fn load_record(&mut self) {
        match self.storage.load_room(&self.page) {
            Ok(Some(record)) => {
                self.last_links = record.links;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(op = StorageOp::ReadRoom.label(), error = %e, "room record unreadable; starting without its links");
                crate::metrics::storage_error(StorageOp::ReadRoom);
            }
        }
    }

    /// Adds a connection (once: a `Join` a shard routes again after its
    /// own panic is not counted twice).
    fn join(&mut self, msg: Join, ctx: &mut Context<Self>) {
        if self.conns.contains_key(&msg.conn) {
            return;
        }
        if self.closing {
            msg.mailbox.end(End::Shutdown);
        }
        self.visitors.add(msg.visitor);
        self.conns.insert(
            msg.conn,
            Conn {
                mailbox: msg.mailbox,
                links: LinkSet::default(),
                pending: false,
                visitor: msg.visitor,
                visitors: false,
            },
        );
        self.opened += 1;
        self.report_count();
        self.mark_dirty(ctx);
    }

    /// Removes a connection and the links only it wanted.
    fn leave(&mut self, msg: Leave, ctx: &mut Context<Self>) {
        let Some(conn) = self.conns.remove(&msg.conn) else {
            self.report_if_idle();
            return;
        };
        self.visitors.remove(conn.visitor);
        let mut gone = Vec::new();
        self.drop_links(conn.links.iter(), &mut gone);
        if !gone.is_empty() {
            self.counter.do_send(Unsubscribe {
                room: self.id,
                links: gone,
            });
        }
        self.report_count();
        self.mark_dirty(ctx);
        self.report_if_idle();
    }
}

impl Handler<Join> for PageRoom {
    type Result = ();
    fn handle(&mut self, msg: Join, ctx: &mut Context<Self>) {
        self.processed += 1;
        let (id, mailbox, visitor) = (msg.conn, msg.mailbox.clone(), msg.visitor);
        let settle = move |act: &mut Self| {
            // The connection is in the list, once.
            if act.closing {
                mailbox.end(End::Shutdown);
            }
            act.conns.entry(id).or_insert(Conn {
                mailbox,
                links: LinkSet::default(),
                pending: false,
                visitor,
                visitors: false,
            });
        };
        self.guard(ctx, "Join", |act, ctx| act.join(msg, ctx), settle);
    }
}

impl Handler<CloseAll> for PageRoom {
    type Result = ();
    fn handle(&mut self, _: CloseAll, ctx: &mut Context<Self>) {
        self.closing = true;
        let close = |act: &mut Self| {
            for conn in act.conns.values() {
                conn.mailbox.end(End::Shutdown);
            }
        };
        self.guard(ctx, "CloseAll", |act, _| close(act), close);
    }
}

impl Handler<Leave> for PageRoom {
    type Result = ();
    fn handle(&mut self, msg: Leave, ctx: &mut Context<Self>) {
        self.processed += 1;
        let id = msg.conn;
        // After a panic: the connection is out of the list.
        let settle = move |act: &mut Self| {
            act.conns.remove(&id);
        };
        self.guard(ctx, "Leave", |act, ctx| act.leave(msg, ctx), settle);
    }
}

impl Handler<SetLinks> for PageRoom {
    type Result = ();
    fn handle(&mut self, msg: SetLinks, ctx: &mut Context<Self>) {
        self.processed += 1;
        let (id, links, visitors) = (msg.conn, msg.links.clone(), msg.visitors);
        // After a panic: the connection has its new links and form.
        let settle = move |act: &mut Self| {
            if let Some(conn) = act.conns.get_mut(&id) {
                conn.links = LinkSet::new(links.into_iter().collect());
                conn.visitors = visitors;
            }
        };
        self.guard(ctx, "SetLinks", |act, ctx| act.set_links(msg, ctx), settle);
    }
}

impl PageRoom {
    /// Replaces a connection's link set: links it is the first to want are
    /// subscribed, links nobody wants any more unsubscribed, and it waits
    /// for its full update.
    fn set_links(&mut self, msg: SetLinks, ctx: &mut Context<Self>) {
        let Some(conn) = self.conns.get_mut(&msg.conn) else {
            self.report_if_idle();
            return;
        };
        if !msg.links.is_empty() {
            self.last_links.clone_from(&msg.links);
        }
        let new = LinkSet::new(msg.links);
        let old = std::mem::replace(&mut conn.links, new.clone());
        let mut added = Vec::new();
        let req = self.last_req + 1;
        for link in new.iter().filter(|l| !old.contains(l)) {
            let f = self
                .refs
                .entry(link.clone())
                .or_insert(Followed { conns: 0, req });
            f.conns += 1;
            if f.conns == 1 {
                added.push(link.clone());
            }
        }
        let mut gone = Vec::new();
        self.drop_links(old.iter().filter(|l| !new.contains(l)), &mut gone);
        if !gone.is_empty() {
            self.counter.do_send(Unsubscribe {
                room: self.id,
                links: gone,
            });
        }
        if !added.is_empty() {
            self.last_req = req;
            let to = self.handle(ctx);
            self.counter.do_send(Subscribe {
                room: self.id,
                to,
                links: added,
                req,
            });
        }
        let Some(conn) = self.conns.get_mut(&msg.conn) else {
            return;
        };
        // What is pending was built for the old subscription (its links,
        // its form): the new one starts from its full update, so a
        // connection that no longer asks for visitors never sees the map.
        conn.mailbox.discard_counts();
        conn.pending = true;
        conn.visitors = msg.visitors;
        self.release_pending();
        self.mark_dirty(ctx);
    }
}

impl Handler<Counts> for PageRoom {
    type Result = ();
    fn handle(&mut self, msg: Counts, ctx: &mut Context<Self>) {
        self.guard(
            ctx,
            "Counts",
            |act, _| {
                if act.apply_counts(msg.changes, msg.since, msg.frames.as_deref()) {
                    act.release_pending();
                }
            },
            |_| {},
        );
    }
}

impl Handler<Subscribed> for PageRoom {
    type Result = ();
    fn handle(&mut self, msg: Subscribed, ctx: &mut Context<Self>) {
        self.guard(ctx, "Subscribed", |act, _| act.answered(msg), |_| {});
    }
}

impl PageRoom {
    /// The counter's answer to a subscribe: refusals, then counts.
    fn answered(&mut self, msg: Subscribed) {
        // Refusals of links asked for again since are stale: the newer
        // answer decides.
        let refused: Vec<PageId> = msg
            .refused
            .into_iter()
            .filter(|l| self.refs.get(l).is_some_and(|f| f.req == msg.req))
            .collect();
        if !refused.is_empty() {
            self.refuse_links(&refused);
            // The counter may follow a refused link for this room anyway: a
            // rebuild's `RoomState` (sent while this answer was held) lists
            // every link the room had. Unfollowing is a no-op otherwise.
            self.counter.do_send(Unsubscribe {
                room: self.id,
                links: refused,
            });
        }
        self.apply_counts(msg.counts, None, None);
        self.release_pending();
    }
}

impl Handler<ReportState> for PageRoom {
    type Result = ();
    fn handle(&mut self, msg: ReportState, ctx: &mut Context<Self>) {
        let report = |act: &mut Self, ctx: &mut Context<Self>| {
            let to = act.handle(ctx);
            act.counter.do_send(RoomState {
                epoch: msg.epoch,
                room: act.id,
                to,
                page: act.page.clone(),
                tally: act.tally(),
                links: act.refs.keys().cloned().collect(),
            });
        };
        // After a panic the recovery's state report answers the resync.
        let epoch = msg.epoch;
        self.guard(ctx, "ReportState", report, move |act| {
            act.resync_epoch = epoch;
        });
    }
}

impl Handler<StopRoom> for PageRoom {
    type Result = ();
    fn handle(&mut self, _: StopRoom, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

impl Handler<SaveRecord> for PageRoom {
    type Result = ();
    fn handle(&mut self, _: SaveRecord, ctx: &mut Context<Self>) {
        self.guard(ctx, "SaveRecord", |act, _| act.save(), |_| {});
    }
}

impl Handler<Reverify> for PageRoom {
    type Result = ();
    fn handle(&mut self, msg: Reverify, ctx: &mut Context<Self>) {
        self.processed = msg.forwarded;
        self.guard(ctx, "Reverify", |act, ctx| act.recover(ctx), |_| {});
    }
}

#[cfg(feature = "test-hooks")]
impl Handler<PanicRoom> for PageRoom {
    type Result = ();
    fn handle(&mut self, _: PanicRoom, ctx: &mut Context<Self>) {
        self.guard(
            ctx,
            "PanicRoom",
            |act, _| {
                // Scramble the derived state the way a bug would.
                act.visitors = Visitors::default();
                act.refs.clear();
                act.cache.clear();
                crate::supervise::injected_panic(ActorKind::Room)
            },
            |_| {},
        );
    }
}

#[cfg(test)]
mod tests {
    use super::Subset;

    #[test]
    fn subsets_are_bitsets_that_compare_by_content() {
        let mut a = Subset::new(1);
        assert!(a.is_empty());
        a.set(0);
        a.set(63);
        assert_eq!(a.iter(64).collect::<Vec<_>>(), vec![0, 63]);
        let mut b = Subset::new(3);
        b.set(5);
        b.set(130);
        assert_eq!(b.iter(131).collect::<Vec<_>>(), vec![5, 130]);
        let mut c = Subset::new(3);
        c.set(130);
        c.set(5);
        assert_eq!(b, c);
        assert!(!b.is_empty());
    }
}
