//! Panic containment for the actors. actix does not supervise panics: a
//! handler that panics takes its actor's task down with it, the actor's
//! mailbox closes, and whatever it owned (counts, rooms, the Redis link) is
//! gone without a stop. Every actor handler of the service therefore runs its
//! body through [`contain`]: a panic is caught there, logged at `error` with
//! the actor and the message it was handling, counted in
//! `link_counter_actor_panics_total{actor}`, and handed back to the handler,
//! which then stops its actor (its supervisor restarts and rebuilds it from
//! its source of truth) or does the actor's own recovery.

use std::panic::{self, AssertUnwindSafe};

use crate::metrics;

/// Which kind of actor a panic happened in (the metric's `actor` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActorKind {
    Counter,
    Cluster,
    Shard,
    Room,
}

impl ActorKind {
    pub const ALL: [ActorKind; 4] = [
        ActorKind::Counter,
        ActorKind::Cluster,
        ActorKind::Shard,
        ActorKind::Room,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ActorKind::Counter => "counter",
            ActorKind::Cluster => "cluster",
            ActorKind::Shard => "shard",
            ActorKind::Room => "room",
        }
    }
}

/// A panic caught by [`contain`] (already logged and counted).
#[derive(Debug)]
pub struct Panicked {
    pub actor: ActorKind,
    /// The message the actor was handling.
    pub handling: &'static str,
    /// The panic's payload, when it was a string.
    pub message: String,
}

/// Runs `f`, one handler's body of an `actor` handling `handling`. A panic
/// is caught, logged, counted and returned; the caller decides how its actor
/// recovers (the state `f` was changing may be half-changed).
pub fn contain<R>(
    actor: ActorKind,
    handling: &'static str,
    f: impl FnOnce() -> R,
) -> Result<R, Panicked> {
    panic::catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".to_owned());
        tracing::error!(
            actor = actor.as_str(),
            handling,
            panic = %message,
            "an actor panicked; it is contained, restarted and rebuilt"
        );
        metrics::actor_panicked(actor.as_str());
        Panicked {
            actor,
            handling,
            message,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_is_returned_with_its_message() {
        let r: Result<(), _> = contain(ActorKind::Room, "Join", || panic!("boom {}", 7));
        let p = r.unwrap_err();
        assert_eq!(p.actor, ActorKind::Room);
        assert_eq!(p.handling, "Join");
        assert_eq!(p.message, "boom 7");
        assert_eq!(contain(ActorKind::Counter, "X", || 5).unwrap(), 5);
    }
}
