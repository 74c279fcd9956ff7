//! Panic containment for the actors. actix does not supervise panics: a
//! handler that panics takes its actor's task down with it, the actor's
//! mailbox closes, and whatever it owned (counts, rooms, the Redis link) is
//! gone without a stop. Every actor handler of the service therefore runs its
//! body through [`contain`]: a panic is caught there, logged at `error` with
//! the actor and the message it was handling, counted in
//! `link_counter_actor_panics_total{actor}`, and handed back to the handler,
//! which then stops its actor (its supervisor restarts and rebuilds it from
//! its source of truth) or does the actor's own recovery.
//!
//! [`Health`] is what `/readyz` reads of the actors' recovery, one per
//! server (tests run several servers in one process). [`Answer`] is a
//! read's reply that a panicked handler leaves unanswered: the asker's
//! `send` fails as it would for an actor that is down, instead of waiting.

use std::{
    panic::{self, AssertUnwindSafe},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
};

use actix::{dev::MessageResponse, dev::OneshotSender, Actor, Message};

use crate::metrics;

/// Which kind of actor a panic happened in (the metric's `actor` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ActorKind {
    Counter,
    Cluster,
    Shard,
    Room,
}

impl ActorKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ActorKind::Counter => "counter",
            ActorKind::Cluster => "cluster",
            ActorKind::Shard => "shard",
            ActorKind::Room => "room",
        }
    }
}

/// A panic caught by [`contain`] (already logged with the actor, the
/// message it was handling and the panic's text, and counted).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Panicked;

/// Runs `f`, one handler's body of an `actor` handling `handling`. A panic
/// is caught, logged, counted and returned; the caller decides how its actor
/// recovers (the state `f` was changing may be half-changed).
pub(crate) fn contain<R>(
    actor: ActorKind,
    handling: &'static str,
    f: impl FnOnce() -> R,
) -> Result<R, Panicked> {
    panic::catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        let message = panic_text(payload.as_ref());
        tracing::error!(
            actor = actor.as_str(),
            handling,
            panic = %message,
            "an actor panicked; it is contained, restarted and rebuilt"
        );
        metrics::actor_panicked(actor.as_str());
        Panicked
    })
}

/// An actor that recovers in place after a panic (a room rebuilds from its
/// connection list, a shard re-verifies its rooms) instead of stopping.
pub(crate) trait RecoverInPlace: Actor + Sized {
    /// The metric's `actor` label.
    const KIND: ActorKind;
    /// Rebuilds what the interrupted handler may have left half-changed.
    fn recover_in_place(&mut self, ctx: &mut Self::Context);

    /// Runs one handler's (or timer's) body through [`contain`]. After a
    /// panic, `settle` applies what the interrupted message meant (itself
    /// contained: a second panic does not stop the recovery), the actor
    /// recovers in place, and the handler gets `None`.
    fn guard<R>(
        &mut self,
        ctx: &mut Self::Context,
        handling: &'static str,
        body: impl FnOnce(&mut Self, &mut Self::Context) -> R,
        settle: impl FnOnce(&mut Self),
    ) -> Option<R> {
        match contain(Self::KIND, handling, || body(self, ctx)) {
            Ok(r) => Some(r),
            Err(_) => {
                let _ = contain(Self::KIND, handling, || settle(self));
                self.recover_in_place(ctx);
                None
            }
        }
    }
}

/// A panic's payload as text, when it is one (`panic!` with a message).
fn panic_text(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Test hook: the panic a test injects in an actor's handler (the one
/// panic site of the actors, so the counter names none).
#[cfg(feature = "test-hooks")]
pub(crate) fn injected_panic(actor: ActorKind) -> ! {
    panic!("panic injected by a test in the {}", actor.as_str())
}

/// A shard's recovery in progress (see [`Health::shard_recovering`]).
#[derive(Debug)]
pub(crate) struct Recovering(Arc<Health>);

impl Drop for Recovering {
    fn drop(&mut self) {
        self.0.shards_recovering.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A handler's reply, or none when its body panicked: the asker's `send`
/// then fails (`MailboxError::Closed`) at once, as for an actor that is
/// down (a read answers 503, never waits for a value that will not come).
pub struct Answer<R>(pub Option<R>);

impl<A: Actor, M: Message, R: MessageResponse<A, M>> MessageResponse<A, M> for Answer<R> {
    fn handle(self, ctx: &mut A::Context, tx: Option<OneshotSender<M::Result>>) {
        if let Some(reply) = self.0 {
            reply.handle(ctx, tx);
        }
    }
}

/// The actors' recovery as `/readyz` reports it, shared by one server's
/// counter, shards and HTTP workers.
#[derive(Debug, Default)]
pub(crate) struct Health {
    /// The counter failed and has not finished rebuilding since.
    counter_recovering: AtomicBool,
    /// Shards re-verifying their rooms after a panic.
    shards_recovering: AtomicUsize,
}

impl Health {
    /// The counter panicked or found its state inconsistent, and restarts:
    /// not ready until [`Health::counter_rebuilt`].
    pub(crate) fn counter_failed(&self) {
        self.counter_recovering.store(true, Ordering::SeqCst);
    }

    /// The counter's rebuild after a panic completed.
    pub(crate) fn counter_rebuilt(&self) {
        self.counter_recovering.store(false, Ordering::SeqCst);
    }

    /// True between a counter failure and the end of the rebuild that follows.
    pub(crate) fn counter_recovering(&self) -> bool {
        self.counter_recovering.load(Ordering::SeqCst)
    }

    /// A shard began re-verifying its rooms: recovering until the returned
    /// token's last clone is dropped (each of its messages to a room holds
    /// one, dropped once handled, or with the room if it stopped).
    pub(crate) fn shard_recovering(self: &Arc<Self>) -> Arc<Recovering> {
        self.shards_recovering.fetch_add(1, Ordering::SeqCst);
        Arc::new(Recovering(self.clone()))
    }

    /// Shards re-verifying their rooms now.
    pub(crate) fn shards_recovering(&self) -> usize {
        self.shards_recovering.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_is_caught_and_its_text_read() {
        let r: Result<(), _> = contain(ActorKind::Room, "Join", || panic!("boom {}", 7));
        assert_eq!(r, Err(Panicked));
        assert_eq!(contain(ActorKind::Counter, "X", || 5), Ok(5));
        let text = |f: fn()| panic_text(panic::catch_unwind(f).unwrap_err().as_ref()).to_owned();
        assert_eq!(text(|| panic!("boom {}", 7)), "boom 7");
        assert_eq!(text(|| panic!("boom")), "boom");
        assert_eq!(text(|| std::panic::panic_any(7)), "(no message)");
    }

    #[test]
    fn a_shard_recovers_when_its_last_token_is_dropped() {
        let health = Arc::new(Health::default());
        let token = health.shard_recovering();
        let rooms: Vec<_> = (0..3).map(|_| token.clone()).collect();
        drop(token);
        assert_eq!(health.shards_recovering(), 1);
        drop(rooms);
        assert_eq!(health.shards_recovering(), 0);
        // No rooms: recovered as soon as the shard lets go.
        drop(health.shard_recovering());
        assert_eq!(health.shards_recovering(), 0);
        health.counter_failed();
        assert!(health.counter_recovering());
        health.counter_rebuilt();
        assert!(!health.counter_recovering());
    }
}
