//! Wiring: opens storage, starts the counter (supervised, own arbiter) and
//! the HTTP server on a bound listener, whose workers each host one shard,
//! and runs the graceful shutdown. Must be called inside an actix `System`.

use std::{
    net::{SocketAddr, TcpListener},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use actix::{Addr, Arbiter, Supervisor};
use actix_http::{error::DispatchError, HttpService, Protocol, Request};
use actix_service::{
    fn_service, map_config, IntoServiceFactory, ServiceFactory, ServiceFactoryExt,
};
use actix_web::{dev::AppConfig, web, App};
use tokio::{net::TcpStream, sync::watch};

use crate::{
    admin::{AdminServer, Ops},
    cluster::{Cluster, ClusterHealth, Withdraw},
    config::Settings,
    counter::{Counter, FinalSnapshot, SetCluster, SetSite},
    http::{self, AppState},
    limits::{BotFilter, ConnLimiter, OriginPolicy},
    room::CloseAll,
    shard::{SaveAll, Shards, StopShard},
    storage::Storage,
    supervise::Health,
};

/// Accept backlog of the public listener: a burst of arrivals (every
/// client reconnecting after a deploy) must not overflow the queue of
/// connections the kernel completed before the workers accept them (the
/// standard library's `bind` uses 128). The kernel caps it at
/// `net.core.somaxconn`.
pub(crate) const BACKLOG: i32 = 4096;

/// Binds the public listener (`SO_REUSEADDR`, backlog [`BACKLOG`]).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// An actor and the arbiter (thread) it runs on.
type OnArbiter<A> = (Addr<A>, Arbiter);

/// A running service.
pub struct Server {
    /// The address actually bound (port 0 resolved).
    local_addr: SocketAddr,
    /// Stops the HTTP server.
    http: actix_server::ServerHandle,
    /// The counter singleton.
    counter: Addr<Counter>,
    /// The counter's arbiter.
    counter_arbiter: Arbiter,
    /// The room shards.
    shards: Shards,
    /// The database.
    storage: Storage,
    /// Set when shutdown begins: the HTTP routes refuse new upgrades and
    /// event streams, and the admin's history sampling stops. Open sessions
    /// never read it; they are told to close with 1001 through their rooms
    /// (`CloseAll`, invariant 13).
    shutdown_tx: watch::Sender<bool>,
    /// Open WebSocket sessions.
    active: Arc<AtomicUsize>,
    /// Shared settings.
    settings: Arc<Settings>,
    /// The admin listener (metrics, dashboard), if `admin.bind` is set.
    admin: Option<AdminServer>,
    /// Cluster mode: the Redis module and its arbiter (None on a single node).
    cluster: Option<OnArbiter<Cluster>>,
}

/// What a graceful shutdown did.
#[derive(Debug, Clone, Copy)]
pub struct ShutdownReport {
    /// Test hook: sessions still open when `shutdown_timeout` ran out
    /// (the binary has them in the log).
    #[cfg(feature = "test-hooks")]
    pub cut: usize,
}

impl Server {
    /// Test hook: opens storage in `settings.storage.path` and starts
    /// serving on `listener`.
    #[cfg(feature = "test-hooks")]
    pub async fn start(settings: Settings, listener: TcpListener) -> anyhow::Result<Server> {
        let storage = Storage::open_with(
            &settings.storage.path,
            settings.storage.cache_capacity,
            settings.storage.compression,
        )?;
        Self::start_with_storage(settings, listener, storage).await
    }

    /// Starts serving on `listener` with an already opened store; returns
    /// once every HTTP worker hosts its shard.
    pub async fn start_with_storage(
        settings: Settings,
        listener: TcpListener,
        storage: Storage,
    ) -> anyhow::Result<Server> {
        let settings = Arc::new(settings);
        let health = Arc::new(Health::default());
        let (counter, counter_arbiter) = start_counter(&settings, &storage, &health);
        // One shard per HTTP worker, started by the worker itself (`listen`).
        let shards = Shards::new(
            settings.worker_count(),
            counter.clone(),
            storage.clone(),
            settings.clone(),
            health.clone(),
        );
        let (cluster, cluster_health) = start_cluster(&settings, &counter, &storage)?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let state = AppState {
            settings: settings.clone(),
            shards: shards.clone(),
            counter: counter.clone(),
            storage: storage.clone(),
            shutdown: shutdown_rx,
            active: Arc::new(AtomicUsize::new(0)),
            limiter: conn_limiter(&settings),
            origins: origin_policy(&settings),
            bots: Arc::new(BotFilter::new(&settings.security.bot_user_agents)),
            cluster: cluster_health,
            visitors: Arc::default(),
            health,
        };
        counter.do_send(SetSite {
            connections: state.active.clone(),
            visitors: state.visitors.clone(),
        });
        let local_addr = listener.local_addr()?;
        start_metrics(&counter_arbiter);
        let (ops, admin) = start_admin(&state)?;
        let http = listen(listener, local_addr, state.clone(), ops)?;
        wait_for_shards(&shards).await?;
        tracing::info!(addr = %local_addr, workers = settings.worker_count(), "listening");
        Ok(Server {
            local_addr,
            http,
            counter,
            counter_arbiter,
            shards,
            storage,
            shutdown_tx,
            active: state.active,
            settings,
            admin,
            cluster,
        })
    }

    /// The admin listener's address (`None` when `admin.bind` is empty).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.addr)
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Test hook: The counter actor (tests inject faults and trigger sweeps through it).
    #[cfg(feature = "test-hooks")]
    pub fn counter(&self) -> Addr<Counter> {
        self.counter.clone()
    }

    /// Test hook: The cluster actor, in cluster mode (tests inject faults through it).
    #[cfg(feature = "test-hooks")]
    pub fn cluster(&self) -> Option<Addr<Cluster>> {
        self.cluster.as_ref().map(|(a, _)| a.clone())
    }

    /// Test hook: The database handle (tests inspect records through it).
    #[cfg(feature = "test-hooks")]
    pub fn storage(&self) -> Storage {
        self.storage.clone()
    }

    /// Test hook: The shards.
    #[cfg(feature = "test-hooks")]
    pub fn shards(&self) -> &Shards {
        &self.shards
    }

    /// Open WebSocket sessions.
    pub(crate) fn active_sessions(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Graceful shutdown: stop accepting, (cluster mode) remove this node's
    /// counts from the cluster, close every WebSocket with 1001, wait up to
    /// `shutdown_timeout`, write the final snapshot, flush.
    pub async fn shutdown(self) -> ShutdownReport {
        let grace = self.settings.server.shutdown_timeout;
        tracing::info!(sessions = self.active_sessions(), "shutting down");
        self.http.pause().await;
        if let Some((cluster, _)) = &self.cluster {
            // Before clients are closed, so other nodes drop this node's
            // viewers at once instead of after `node_ttl`.
            match tokio::time::timeout(Duration::from_secs(3), cluster.send(Withdraw)).await {
                Ok(Ok(true)) => tracing::info!("left the cluster"),
                _ => tracing::warn!(
                    "could not leave the cluster cleanly; other nodes drop this node within cluster.node_ttl"
                ),
            }
        }
        // New upgrades are refused from here on; open sessions (and any
        // still joining) are told through their rooms to close with 1001.
        let _ = self.shutdown_tx.send(true);
        for shard in self.shards.all() {
            let _ = shard.send(CloseAll).await;
        }
        let started = Instant::now();
        while self.active_sessions() > 0 && started.elapsed() < grace {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let cut = self.active_sessions();
        if cut > 0 {
            tracing::warn!(
                cut,
                "shutdown timeout reached; cutting remaining connections"
            );
        }
        // The shards live on the HTTP workers: save before stopping them.
        for shard in self.shards.all() {
            let _ = shard.send(SaveAll).await;
        }
        // The rooms' last reports were queued at the counter before they
        // answered SaveAll, so the final snapshot includes them.
        if self.counter.send(FinalSnapshot).await.is_err() {
            tracing::error!("counter gone before the final snapshot");
        }
        if let Err(e) = self.storage.close() {
            tracing::error!(error = %e, "final flush failed");
        }
        for shard in self.shards.all() {
            let _ = shard.send(StopShard).await;
        }
        self.http.stop(cut == 0).await;
        if let Some(admin) = &self.admin {
            admin.handle.stop(false).await;
        }
        let mut arbiters = vec![self.counter_arbiter];
        arbiters.extend(self.cluster.map(|(_, a)| a));
        stop_and_join(arbiters).await;
        tracing::info!(cut, "stopped");
        ShutdownReport {
            #[cfg(feature = "test-hooks")]
            cut,
        }
    }
}

/// Starts the counter under a supervisor, on an arbiter (thread) of its own.
fn start_counter(
    settings: &Arc<Settings>,
    storage: &Storage,
    health: &Arc<Health>,
) -> OnArbiter<Counter> {
    let arbiter = Arbiter::new();
    let (settings, storage, health) = (settings.clone(), storage.clone(), health.clone());
    let counter = Supervisor::start_in_arbiter(&arbiter.handle(), move |_| {
        Counter::new(settings, storage, health)
    });
    (counter, arbiter)
}

/// Cluster mode (`cluster.redis_url` set): starts the cluster module on an
/// arbiter of its own and hands it to the counter.
fn start_cluster(
    settings: &Arc<Settings>,
    counter: &Addr<Counter>,
    storage: &Storage,
) -> anyhow::Result<(Option<OnArbiter<Cluster>>, Option<ClusterHealth>)> {
    if !settings.cluster.enabled() {
        return Ok((None, None));
    }
    let arbiter = Arbiter::new();
    let (addr, health) = Cluster::start(
        settings.clone(),
        counter.clone(),
        storage.clone(),
        &arbiter.handle(),
    )?;
    counter.do_send(SetCluster(addr.clone()));
    Ok((Some((addr, arbiter)), Some(health)))
}

/// The connection caps of `limits`.
fn conn_limiter(settings: &Settings) -> Arc<ConnLimiter> {
    ConnLimiter::new(
        settings.limits.max_connections,
        settings.limits.max_connections_per_ip,
        settings.limits.connections_per_ip_per_second,
        settings.limits.connections_per_ip_burst,
    )
}

/// The origins upgrades may come from (`security.allowed_origins`).
fn origin_policy(settings: &Settings) -> Arc<OriginPolicy> {
    if settings.security.allowed_origins.is_empty() {
        tracing::warn!("security.allowed_origins is empty: any website may connect");
    }
    Arc::new(OriginPolicy::new(&settings.security.allowed_origins))
}

/// Installs the metrics recorder, and its upkeep on the counter's arbiter
/// (so it stops with it).
fn start_metrics(counter_arbiter: &Arbiter) {
    crate::metrics::install();
    counter_arbiter.spawn(async {
        let mut every = tokio::time::interval(crate::metrics::UPKEEP_INTERVAL);
        loop {
            every.tick().await;
            crate::metrics::upkeep();
        }
    });
}

/// The operators' state, and the admin listener when `admin.bind` is set.
fn start_admin(state: &AppState) -> anyhow::Result<(Ops, Option<AdminServer>)> {
    let ops = Ops::new(
        &state.settings,
        state.counter.clone(),
        state.shards.clone(),
        state.storage.clone(),
        state.active.clone(),
        state.visitors.clone(),
    );
    let admin = crate::admin::start(&state.settings.admin, &ops, state.shutdown.clone())?;
    Ok((ops, admin))
}

/// Starts the public listener: actix-server with `server.workers` workers,
/// each hosting a shard and serving [`worker_service`].
fn listen(
    listener: TcpListener,
    local_addr: SocketAddr,
    state: AppState,
    ops: Ops,
) -> std::io::Result<actix_server::ServerHandle> {
    let settings = state.settings.clone();
    // actix-server takes whole seconds: round up so the grace is never shorter.
    let grace = settings
        .server
        .shutdown_timeout
        .as_secs_f64()
        .ceil()
        .max(1.0) as u64;
    let server = actix_server::Server::build()
        .workers(settings.worker_count())
        .disable_signals()
        .shutdown_timeout(grace)
        .listen("link-counter", listener, move || {
            // Runs once on each worker's thread: the worker hosts a shard.
            state.shards.host_here();
            worker_service(&state, &ops, local_addr)
        })?
        .run();
    let http = server.handle();
    actix_web::rt::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!(error = %e, "http server failed");
        }
    });
    Ok(http)
}

/// One worker's HTTP service. actix-web's `HttpServer` builds this same
/// stack, but without actix-http's upgrade hook: WebSocket upgrades leave
/// the routes here and become sessions that own their socket
/// (`http::upgrade`). Each connection is an `http::Conn`, whose socket an
/// event-stream route takes the same way (`http::SocketSlot`).
fn worker_service(
    state: &AppState,
    ops: &Ops,
    local_addr: SocketAddr,
) -> impl ServiceFactory<TcpStream, Config = (), Response = (), Error = DispatchError, InitError = ()>
{
    let app = App::new()
        .app_data(web::Data::new(state.clone()))
        // The operator routes first: `/api/v1/pages/{id}/history` before
        // `http`'s `/api/v1/pages/{id}`.
        .configure(|cfg| ops.configure_public(cfg))
        .configure(http::configure)
        .configure(|cfg| crate::web::configure(cfg, &state.settings.web));
    let ws_state = state.clone();
    let http = HttpService::build()
        .client_request_timeout(state.settings.limits.handshake_timeout)
        .client_disconnect_timeout(Duration::from_secs(1))
        .local_addr(local_addr)
        .on_connect_ext(|io: &http::Conn, data| {
            data.insert(io.slot());
        })
        .upgrade(fn_service(
            move |(req, framed): (Request, http::Upgraded)| {
                let state = ws_state.clone();
                async move {
                    http::upgrade(req, framed, state).await;
                    Ok::<_, std::convert::Infallible>(())
                }
            },
        ))
        .finish(map_config(
            app.into_factory()
                .map_err(|e: actix_web::Error| e.error_response()),
            |_| AppConfig::default(),
        ));
    fn_service(|io: TcpStream| async move {
        // Small frames, latency first: no Nagle delay behind an unacked frame.
        let _ = io.set_nodelay(true);
        let peer = io.peer_addr().ok();
        Ok::<_, DispatchError>((http::Conn::new(io), Protocol::Http1, peer))
    })
    .and_then(http)
}

/// Waits (at most 30 s) until every HTTP worker hosts its shard.
async fn wait_for_shards(shards: &Shards) -> anyhow::Result<()> {
    if tokio::time::timeout(Duration::from_secs(30), shards.ready())
        .await
        .is_err()
    {
        anyhow::bail!("the HTTP workers did not start within 30 s");
    }
    Ok(())
}

/// Stops arbiters and joins their threads off the async runtime.
async fn stop_and_join(arbiters: Vec<Arbiter>) {
    for a in &arbiters {
        a.stop();
    }
    let joined = actix_web::rt::task::spawn_blocking(move || {
        for a in arbiters {
            let _ = a.join();
        }
    })
    .await;
    if joined.is_err() {
        tracing::error!("an arbiter thread panicked while stopping");
    }
}
