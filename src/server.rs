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
use actix_http::{HttpService, Request};
use actix_service::{fn_service, map_config, IntoServiceFactory, ServiceFactoryExt};
use actix_web::{dev::AppConfig, web, App};
use tokio::sync::watch;

use crate::{
    cluster::{Cluster, ClusterHealth, Leave},
    config::Settings,
    counter::{Counter, FinalSnapshot, SetCluster},
    http::{self, AppState},
    limits::{ConnLimiter, OriginPolicy},
    room::CloseAll,
    shard::{SaveAll, Shards, StopShard},
    storage::Storage,
};

/// Accept backlog of the public listener: a burst of arrivals (every
/// client reconnecting after a deploy) must not overflow the queue of
/// connections the kernel completed before the workers accept them (the
/// standard library's `bind` uses 128). The kernel caps it at
/// `net.core.somaxconn`.
pub const BACKLOG: i32 = 4096;

/// Binds the public listener (`SO_REUSEADDR`, backlog [`BACKLOG`]).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

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
    /// Tells sessions to close with 1001.
    shutdown_tx: watch::Sender<bool>,
    /// Open WebSocket sessions.
    active: Arc<AtomicUsize>,
    /// Shared settings.
    settings: Arc<Settings>,
    /// The admin listener (metrics, dashboard), if `admin.bind` is set.
    admin: Option<crate::admin::AdminServer>,
    /// Cluster mode: the Redis module and its arbiter (None on a single node).
    cluster: Option<(Addr<Cluster>, Arbiter)>,
}

/// What a graceful shutdown did.
#[derive(Debug, Clone, Copy)]
pub struct ShutdownReport {
    /// Sessions still open when `shutdown_timeout` ran out.
    pub cut: usize,
}

impl Server {
    /// Opens storage in `settings.storage.path` and starts serving on `listener`.
    pub async fn start(settings: Settings, listener: TcpListener) -> anyhow::Result<Server> {
        let storage = Storage::open(&settings.storage.path, settings.storage.cache_capacity)?;
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
        let counter_arbiter = Arbiter::new();
        let counter = {
            let (settings, storage) = (settings.clone(), storage.clone());
            Supervisor::start_in_arbiter(&counter_arbiter.handle(), move |_| {
                Counter::new(settings, storage)
            })
        };
        // One shard per HTTP worker, started by the worker itself (below).
        let shards = Shards::new(
            settings.worker_count(),
            counter.clone(),
            storage.clone(),
            settings.clone(),
        );
        let mut cluster_health: Option<ClusterHealth> = None;
        let cluster = if settings.cluster.enabled() {
            let arbiter = Arbiter::new();
            let (addr, health) =
                Cluster::start(settings.clone(), counter.clone(), &arbiter.handle())?;
            counter.do_send(SetCluster(addr.clone()));
            cluster_health = Some(health);
            Some((addr, arbiter))
        } else {
            None
        };

        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let active = Arc::new(AtomicUsize::new(0));
        let state = AppState {
            settings: settings.clone(),
            shards: shards.clone(),
            counter: counter.clone(),
            storage: storage.clone(),
            shutdown: shutdown_rx,
            active: active.clone(),
            limiter: ConnLimiter::new(
                settings.limits.max_connections,
                settings.limits.max_connections_per_ip,
                settings.limits.connections_per_ip_per_second,
                settings.limits.connections_per_ip_burst,
            ),
            origins: Arc::new(OriginPolicy::new(&settings.security.allowed_origins)),
            cluster: cluster_health,
            visitors: Arc::default(),
        };
        if settings.security.allowed_origins.is_empty() {
            tracing::warn!("security.allowed_origins is empty: any website may connect");
        }
        let local_addr = listener.local_addr()?;
        crate::metrics::install();
        // On the counter's arbiter: stops with it.
        counter_arbiter.spawn(async {
            let mut every = tokio::time::interval(crate::metrics::UPKEEP_INTERVAL);
            loop {
                every.tick().await;
                crate::metrics::upkeep();
            }
        });
        let ops = crate::admin::Ops::new(
            &settings,
            counter.clone(),
            shards.clone(),
            storage.clone(),
            active.clone(),
            state.visitors.clone(),
        );
        let admin = crate::admin::start(&settings.admin, &ops, state.shutdown.clone())?;
        let hosts = shards.clone();
        let ws_state = state.clone();
        let handshake_timeout = settings.limits.handshake_timeout;
        // actix-web's `HttpServer` builds this same stack, but without
        // actix-http's upgrade hook: WebSocket upgrades leave the routes
        // here and become sessions that own their socket (`http::upgrade`).
        let server = actix_server::Server::build()
            .workers(settings.worker_count())
            .disable_signals()
            // actix-server takes whole seconds: round up so the grace is never shorter.
            .shutdown_timeout(
                settings
                    .server
                    .shutdown_timeout
                    .as_secs_f64()
                    .ceil()
                    .max(1.0) as u64,
            )
            .listen("link-counter", listener, move || {
                // Runs once on each worker's thread: the worker hosts a shard.
                hosts.host_here();
                let app = App::new()
                    .app_data(web::Data::new(state.clone()))
                    .configure(http::configure)
                    .configure(|cfg| ops.configure_public(cfg))
                    .configure(|cfg| crate::web::configure(cfg, &state.settings.web));
                let ws_state = ws_state.clone();
                HttpService::build()
                    .client_request_timeout(handshake_timeout)
                    .client_disconnect_timeout(Duration::from_secs(1))
                    // Small frames, latency first: no Nagle delay behind an unacked frame.
                    .tcp_nodelay(true)
                    .local_addr(local_addr)
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
                    ))
                    .tcp()
            })?
            .run();
        let http = server.handle();
        actix_web::rt::spawn(async move {
            if let Err(e) = server.await {
                tracing::error!(error = %e, "http server failed");
            }
        });
        if tokio::time::timeout(Duration::from_secs(30), shards.ready())
            .await
            .is_err()
        {
            anyhow::bail!("the HTTP workers did not start within 30 s");
        }
        tracing::info!(addr = %local_addr, workers = settings.worker_count(), "listening");
        Ok(Server {
            local_addr,
            http,
            counter,
            counter_arbiter,
            shards,
            storage,
            shutdown_tx,
            active,
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

    /// The counter actor (tests inject faults and trigger sweeps through it).
    pub fn counter(&self) -> Addr<Counter> {
        self.counter.clone()
    }

    /// The database handle (tests inspect records through it).
    pub fn storage(&self) -> Storage {
        self.storage.clone()
    }

    /// The shards.
    pub fn shards(&self) -> &Shards {
        &self.shards
    }

    /// Open WebSocket sessions.
    pub fn active_sessions(&self) -> usize {
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
            match tokio::time::timeout(Duration::from_secs(3), cluster.send(Leave)).await {
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
        if let Err(e) = self.storage.flush() {
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
        ShutdownReport { cut }
    }
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
