//! The heartbeat, on its own thread and its own Redis connection: nothing the
//! node does (writes, loads, pub/sub, a busy actor) can delay it. Each beat
//! refreshes this node's deadline and reads the live set in the same atomic
//! step, and reports both to the [`Cluster`] actor.

use std::time::Duration;

use actix::prelude::*;
use tokio::sync::watch;

use super::{
    store::{self, Backend, BeatMode, Conn, Keys},
    table::NodeId,
    Beat, Cluster,
};
use crate::metrics as m;

/// The running heartbeat thread.
pub(super) struct Liveness {
    /// Its thread (stopped with the actor).
    arbiter: Arbiter,
    /// The id to refresh (`None`: only observe the live set).
    id: watch::Sender<Option<NodeId>>,
}

impl Liveness {
    /// Starts beating every `interval` (the first beat at once).
    pub(crate) fn start(
        backend: Backend,
        keys: Keys,
        interval: Duration,
        ttl: Duration,
        to: Addr<Cluster>,
    ) -> Liveness {
        let (id, rx) = watch::channel(None);
        let arbiter = Arbiter::new();
        arbiter.spawn(run(backend, keys, interval, ttl, to, rx));
        Liveness { arbiter, id }
    }

    /// Refreshes `id` from the next beat on (`None`: stop refreshing).
    pub(crate) fn set_id(&self, id: Option<NodeId>) {
        self.id.send_replace(id);
    }

    /// Stops the thread.
    pub(crate) fn stop(&self) {
        self.arbiter.stop();
    }
}

async fn run(
    backend: Backend,
    keys: Keys,
    interval: Duration,
    ttl: Duration,
    to: Addr<Cluster>,
    id: watch::Receiver<Option<NodeId>>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut conn: Option<Conn> = None;
    loop {
        tick.tick().await;
        let beat_id = id.borrow().clone();
        let c = match &conn {
            Some(c) => c.clone(),
            None => match backend.connect(None).await {
                Ok(c) => {
                    conn = Some(c.clone());
                    c
                }
                Err(e) => {
                    to.do_send(Beat {
                        id: beat_id,
                        reply: Err(e.to_string()),
                    });
                    continue;
                }
            },
        };
        let sent = std::time::Instant::now();
        let reply = store::heartbeat(&c, &keys, beat_id.as_ref(), BeatMode::Beat, ttl).await;
        match &reply {
            Ok(_) => m::redis_rtt(m::RedisOp::Heartbeat, sent.elapsed()),
            Err(_) => conn = None,
        }
        to.do_send(Beat {
            id: beat_id,
            reply: reply.map_err(|e| e.to_string()),
        });
    }
}
