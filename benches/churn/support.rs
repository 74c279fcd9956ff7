//! Shared pieces of the bench: WebSocket clients with rotating source
//! addresses, the service (in-process or the release binary), the bare
//! ceiling server, statistics and the summary lines.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use link_counter::Server;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::{tungstenite::Message, WebSocketStream};

use crate::kit::{
    child::{binary_path, OnDrop, Running, Spawn},
    settings::{bench_settings, Env},
};

/// A client WebSocket over a plain TCP stream.
pub type Ws = WebSocketStream<TcpStream>;

/// Longest a single connect/subscribe/close cycle may take before it counts as an error.
pub const CYCLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Number of loopback source addresses client sockets rotate over.
const SOURCES: usize = 32;

/// Round-robin over 127.0.0.1..=127.0.0.32, so one source address's
/// ephemeral ports (and TIME_WAIT entries) never run out.
static NEXT_SOURCE: AtomicUsize = AtomicUsize::new(0);

fn next_source() -> Ipv4Addr {
    let i = NEXT_SOURCE.fetch_add(1, Ordering::Relaxed) % SOURCES;
    Ipv4Addr::new(127, 0, 0, 1 + i as u8)
}

/// Connects a WebSocket to `server` at `path` from the next source address.
pub async fn connect(server: SocketAddr, path: &str) -> anyhow::Result<Ws> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(next_source().into(), 0))?;
    let stream = socket.connect(server).await?;
    stream.set_nodelay(true)?;
    let url = match visitor_tabs() {
        Some(tabs) => {
            let n = CONNECTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) / tabs;
            let sep = if path.contains('?') { '&' } else { '?' };
            format!("ws://{server}{path}{sep}visitor=bench-visitor-{n:08}")
        }
        None => format!("ws://{server}{path}"),
    };
    let (ws, _) = tokio_tungstenite::client_async(url, stream).await?;
    Ok(ws)
}

/// Connections opened by [`connect`] (numbers the visitors).
static CONNECTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// `LC_BENCH_VISITOR_TABS=n`: every connection carries a visitor id, one id
/// per `n` consecutive connections (the cost of counting distinct visitors).
/// [`set_visitor_tabs`] overrides it for the runs that follow.
fn visitor_tabs() -> Option<u64> {
    static TABS: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    match VISITOR_TABS_SET.load(Ordering::Relaxed) {
        u64::MAX => *TABS.get_or_init(|| {
            std::env::var("LC_BENCH_VISITOR_TABS")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|n| *n > 0)
        }),
        0 => None,
        n => Some(n),
    }
}

/// The visitor tabs set by [`set_visitor_tabs`] (`u64::MAX`: the environment's).
static VISITOR_TABS_SET: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(u64::MAX);

/// From now on every connection carries a visitor id, one per `tabs`
/// consecutive connections (`Some(1)`: a distinct visitor each; `None`:
/// none), whatever `LC_BENCH_VISITOR_TABS` says; `reset` goes back to it.
pub fn set_visitor_tabs(tabs: Option<u64>, reset: bool) {
    let v = if reset { u64::MAX } else { tabs.unwrap_or(0) };
    VISITOR_TABS_SET.store(v, Ordering::Relaxed);
}

/// The subscribe message for `links`.
pub fn subscribe_msg(links: &[String]) -> Message {
    let quoted: Vec<String> = links.iter().map(|l| format!("\"{l}\"")).collect();
    Message::Text(format!(
        r#"{{"type":"subscribe","links":[{}]}}"#,
        quoted.join(",")
    ))
}

/// Reads until the next update; answers pings (tungstenite does) on the way.
pub async fn next_update(ws: &mut Ws) -> anyhow::Result<String> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.starts_with(r#"{"type":"update""#) => return Ok(t),
            Some(Ok(Message::Text(t))) => anyhow::bail!("unexpected message {t}"),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(c))) => anyhow::bail!("closed by server: {c:?}"),
            Some(Ok(other)) => anyhow::bail!("unexpected frame {other:?}"),
            Some(Err(e)) => return Err(e.into()),
            None => anyhow::bail!("stream ended"),
        }
    }
}

/// Close handshake from the client side: send Close, read until the server's Close.
pub async fn close_handshake(mut ws: Ws) -> anyhow::Result<()> {
    ws.close(None).await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Close(_))) | None => return Ok(()),
            Some(Ok(_)) => continue,
            // tungstenite reports the completed handshake as ConnectionClosed.
            Some(Err(tokio_tungstenite::tungstenite::Error::ConnectionClosed)) => return Ok(()),
            Some(Err(e)) => return Err(e.into()),
        }
    }
}

/// How a churn client leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leave {
    /// WebSocket close handshake.
    Close,
    /// Drop the TCP stream without a close frame.
    Drop,
}

impl Leave {
    pub fn name(self) -> &'static str {
        match self {
            Leave::Close => "close",
            Leave::Drop => "drop",
        }
    }
}

/// One churn cycle: connect to `page`, subscribe to `links`, wait for the first update, leave.
pub async fn cycle(
    server: SocketAddr,
    page: &str,
    links: &[String],
    leave: Leave,
) -> anyhow::Result<()> {
    let mut ws = connect(server, &format!("/parties/page/{page}")).await?;
    ws.send(subscribe_msg(links)).await?;
    next_update(&mut ws).await?;
    match leave {
        Leave::Close => close_handshake(ws).await,
        Leave::Drop => {
            drop(ws);
            Ok(())
        }
    }
}

/// Small deterministic PRNG (xorshift64*), one per worker.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// `k` distinct page names among `p0..p{n-1}`.
    pub fn pages(&mut self, k: usize, n: u64) -> Vec<String> {
        let mut out: Vec<String> = Vec::with_capacity(k);
        while out.len() < k {
            let p = format!("p{}", self.below(n));
            if !out.contains(&p) {
                out.push(p);
            }
        }
        out
    }
}

/// The bench setting `key` of the environment (`LC_…`), or `default` when it
/// is unset or does not parse.
pub fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Percentile `p` (0..=100) of sorted samples.
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A summary line: `BENCH <scenario> key=value ...` (logfmt, one per scenario run).
pub struct Line {
    scenario: String,
    fields: Vec<(String, String)>,
}

impl Line {
    pub fn new(scenario: &str) -> Line {
        Line {
            scenario: scenario.into(),
            fields: Vec::new(),
        }
    }
    pub fn s(mut self, k: &str, v: impl ToString) -> Line {
        self.fields.push((k.into(), v.to_string()));
        self
    }
    pub fn f(self, k: &str, v: f64) -> Line {
        let text = if v.is_nan() {
            "nan".to_string()
        } else if v.abs() >= 100.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.1}")
        };
        self.s(k, text)
    }
    pub fn print(self) {
        let mut out = format!("BENCH {}", self.scenario);
        for (k, v) in &self.fields {
            out.push_str(&format!(" {k}={v}"));
        }
        println!("{out}");
    }
}

/// Raises the soft open-files limit to the hard one (children inherit it); returns it.
pub fn raise_nofile() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("could not raise RLIMIT_NOFILE: {e}");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft)
        }
    }
}

/// A listener on 127.0.0.1:0 with a deep accept backlog (std's default is 128,
/// which drops SYNs under a connect storm and adds 1 s retransmits).
pub fn listener() -> TcpListener {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime for the listener");
    rt.block_on(async {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("reuseaddr");
        socket
            .bind("127.0.0.1:0".parse().expect("address"))
            .expect("bind");
        let l = socket.listen(4096).expect("listen");
        let std = l.into_std().expect("into std");
        std.set_nonblocking(false).expect("blocking");
        std
    })
}

/// The service running in-process, in its own actix System thread.
pub struct InProcess {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl InProcess {
    pub fn start(extra: &[(&str, &str)]) -> InProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        // Abuse caps off (the load generator is a handful of loopback
        // addresses), the bench's own `LINK_COUNTER__…` overrides, `extra`.
        let settings = bench_settings(dir.path(), extra);
        let listener = listener();
        let addr = listener.local_addr().expect("local addr");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            actix_rt::System::new().block_on(async move {
                let server = Server::start(settings, listener)
                    .await
                    .expect("service starts");
                ready_tx.send(()).expect("bench waits");
                let _ = stop_rx.await;
                server.shutdown().await;
            })
        });
        ready_rx.recv().expect("service started");
        InProcess {
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
            _dir: dir,
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The release binary as a child process (own fd table and RSS), stopped
/// with SIGTERM when dropped (a profiler wrapping it writes its output).
pub struct ChildService {
    pub addr: SocketAddr,
    /// The admin listener (`/metrics`).
    pub admin: Option<SocketAddr>,
    process: Running,
    dir: tempfile::TempDir,
    /// The service's own settings (`extra`), kept for [`ChildService::restart`];
    /// `None` for the ceiling servers.
    extra: Option<Vec<(String, String)>>,
}

impl ChildService {
    /// The release binary on a fresh temp data dir with the benches'
    /// settings (caps off, the bench's `LINK_COUNTER__…` overrides), plus
    /// `extra` settings (`SECTION__KEY`, value).
    pub fn start(extra: &[(&str, &str)]) -> ChildService {
        Self::start_in(tempfile::tempdir().expect("temp dir"), extra)
    }

    /// [`ChildService::start`] on the data dir `dir` (which it keeps: a
    /// [`ChildService::restart`] reopens the same database).
    pub fn start_in(dir: tempfile::TempDir, extra: &[(&str, &str)]) -> ChildService {
        let extra: Vec<(String, String)> = extra
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let cmd = Self::service_command(dir.path(), &extra);
        let mut service = Self::spawn(cmd, dir, true);
        service.extra = Some(extra);
        service
    }

    /// The data dir (`storage.path`) of the child.
    pub fn data_dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// SIGKILL, then reap: no graceful shutdown, nothing flushed.
    pub fn kill9(&mut self) {
        self.process.kill9();
    }

    /// Starts the service again with the same settings on the same data dir
    /// (after [`ChildService::kill9`]; a live child is killed first). It binds
    /// new ports: `addr` and `admin` change.
    pub fn restart(&mut self) {
        let extra = self
            .extra
            .clone()
            .expect("only the service binary restarts");
        self.kill9();
        let cmd = Self::service_command(self.dir.path(), &extra);
        self.process = Self::launch(cmd, true);
        self.addr = self.process.addr;
        self.admin = self.process.admin;
    }

    /// The command line of the release binary on `dir` with `extra` settings.
    fn service_command(dir: &std::path::Path, extra: &[(String, String)]) -> Command {
        // `LC_BENCH_WRAP="valgrind --tool=massif"` (say) runs the service under a profiler.
        let wrap = std::env::var("LC_BENCH_WRAP").unwrap_or_default();
        let mut words = wrap.split_whitespace();
        let mut cmd = match words.next() {
            Some(tool) => {
                let mut c = Command::new(tool);
                c.args(words).arg(binary_path());
                c
            }
            None => Command::new(binary_path()),
        };
        cmd.env("RUST_LOG", "warn");
        Env::bench(dir).with(extra).apply(&mut cmd);
        cmd
    }

    /// The fan-out ceiling server ([`run_fanout_ceiling`]): this bench
    /// binary again, as a child with its own descriptor table.
    pub fn fanout_ceiling(interval_ms: u64) -> ChildService {
        let dir = tempfile::tempdir().expect("temp dir");
        let exe = std::env::current_exe().expect("current exe");
        let mut cmd = Command::new(exe);
        cmd.arg("--fanout-ceiling-server")
            .arg(interval_ms.to_string());
        Self::spawn(cmd, dir, false)
    }

    /// The actix-http ceiling server (`actix_ceiling::run_actix_ceiling`):
    /// this bench binary again, as a child with its own descriptor table and RSS.
    pub fn actix_ceiling() -> ChildService {
        let dir = tempfile::tempdir().expect("temp dir");
        let exe = std::env::current_exe().expect("current exe");
        let mut cmd = Command::new(exe);
        cmd.arg("--actix-ceiling-server");
        Self::spawn(cmd, dir, false)
    }

    /// Spawns `cmd`, which prints `listening on ADDR` (then, if
    /// `admin_line`, `admin listening on ADDR`) on its standard output.
    fn spawn(cmd: Command, dir: tempfile::TempDir, admin_line: bool) -> ChildService {
        let process = Self::launch(cmd, admin_line);
        ChildService {
            addr: process.addr,
            admin: process.admin,
            process,
            dir,
            extra: None,
        }
    }

    /// Spawns `cmd` and reads its addresses (see [`ChildService::spawn`]).
    fn launch(cmd: Command, admin_line: bool) -> Running {
        Spawn::default()
            .admin_line(admin_line)
            .on_drop(OnDrop::Term(Duration::from_secs(15)))
            .start(cmd)
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn alive(&mut self) -> bool {
        self.process.alive()
    }
}

/// VmRSS of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Open file descriptors of a process.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The fixed answer of the ceiling server to every subscribe.
pub const CEILING_UPDATE: &str =
    r#"{"type":"update","connections":{"p1":0,"p2":0,"p3":0,"p4":0,"p5":0}}"#;

/// The ceiling: a bare tokio-tungstenite server on a 2-thread runtime (the
/// service has 2 workers): accept, upgrade, answer each text frame with a
/// fixed update, read until close. No rooms, no counter, no storage.
pub struct Ceiling {
    pub addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

/// The runtime of a ceiling server: 2 threads, as the service has 2 workers here.
fn ceiling_runtime(name: &str) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()
        .expect("ceiling runtime")
}

impl Ceiling {
    pub fn start() -> Ceiling {
        let listener = listener();
        let addr = listener.local_addr().expect("local addr");
        let runtime = ceiling_runtime("lc-ceiling");
        runtime.spawn(async move {
            listener.set_nonblocking(true).expect("nonblocking");
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    // Out of descriptors, say: do not spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                        return;
                    };
                    while let Some(Ok(m)) = ws.next().await {
                        if m.is_text() && ws.send(Message::text(CEILING_UPDATE)).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Ceiling {
            addr,
            runtime: Some(runtime),
        }
    }
}

impl Drop for Ceiling {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Seconds since `t` as f64.
pub fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

/// Milliseconds of a duration as f64.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// CPU time (user + system) a process has used so far, in seconds.
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the full line (11 and 12 here); 100 Hz clock.
    (ticks(11) + ticks(12)) / 100.0
}

/// Whose threads [`server_cpu_secs`] adds up.
#[derive(Clone, Copy, Debug)]
pub enum ServerThreads {
    /// A server in this process: every thread but the load generator's
    /// (`lc-bench-client`) and the main one.
    InProcess,
    /// A child process: all its threads.
    Child(u32),
}

/// CPU time a server's threads have spent on a core so far, in seconds
/// (`schedstat`'s nanoseconds, not the 100 Hz ticks of [`cpu_secs`]). A
/// thread that ended is no longer counted, so compare two readings of the
/// same long-lived threads (a server's workers, its acceptor, its counter).
pub fn server_cpu_secs(who: ServerThreads) -> f64 {
    let (dir, skip_main) = match who {
        ServerThreads::InProcess => ("/proc/self/task".to_string(), std::process::id()),
        ServerThreads::Child(pid) => (format!("/proc/{pid}/task"), 0),
    };
    let Ok(tasks) = std::fs::read_dir(&dir) else {
        return 0.0;
    };
    let mut ns: u64 = 0;
    for task in tasks.flatten() {
        let tid = task
            .file_name()
            .to_string_lossy()
            .parse::<u32>()
            .unwrap_or(0);
        if tid == skip_main {
            continue;
        }
        let path = task.path();
        if matches!(who, ServerThreads::InProcess) {
            let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
            if comm.starts_with("lc-bench-client") {
                continue;
            }
        }
        let stat = std::fs::read_to_string(path.join("schedstat")).unwrap_or_default();
        ns += stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    ns as f64 / 1e9
}

/// The fan-out ceiling: a bare presence server for one hot page, run as a
/// child process (`--fanout-ceiling-server MS`, own descriptor table), on a
/// 2-thread runtime like the service's 2 workers. A connection to a path
/// ending in `/hot` counts as one viewer of "hot" until it closes; any other
/// connection is a subscriber: its first text frame is answered with the
/// current count, then a ticker publishes the count every `interval` when it
/// changed. No rooms, no counter, no storage, no limits; what is left is the
/// per-socket cost of delivering 10,000 frames per tick on this machine.
/// Delivery policy: the latest value (a `watch` channel, one wake-up per
/// subscriber per publish; a subscriber that falls behind skips straight to
/// the newest count, never disconnected) — the policy a presence server
/// should have, and the one the service's target is stated against.
pub fn run_fanout_ceiling(interval: Duration) -> ! {
    use std::sync::{atomic::AtomicI64, Arc};
    let listener = listener();
    let addr = listener.local_addr().expect("local addr");
    let runtime = ceiling_runtime("lc-fanout-ceiling");
    runtime.block_on(async move {
        let count = Arc::new(AtomicI64::new(0));
        let (publish, counts) = tokio::sync::watch::channel(0i64);
        {
            let count = count.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let now = count.load(Ordering::Relaxed);
                    publish.send_if_modified(|v| std::mem::replace(v, now) != now);
                }
            });
        }
        listener.set_nonblocking(true).expect("nonblocking");
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        println!("listening on {addr}");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            tokio::spawn(fanout_ceiling_conn(stream, count.clone(), counts.clone()));
        }
    })
}

/// One connection of the fan-out ceiling: a viewer of "hot" (a path ending
/// in `/hot`) counts until it closes; any other connection is a subscriber,
/// answered with the current count at its first text frame, then fed each
/// published count.
async fn fanout_ceiling_conn(
    stream: tokio::net::TcpStream,
    count: std::sync::Arc<std::sync::atomic::AtomicI64>,
    mut counts: tokio::sync::watch::Receiver<i64>,
) {
    let _ = stream.set_nodelay(true);
    let mut hot = false;
    // The callback's type is tungstenite's (`Result<Response, ErrorResponse>`).
    #[allow(clippy::result_large_err)]
    let callback = |req: &tokio_tungstenite::tungstenite::handshake::server::Request, res| {
        hot = req.uri().path().ends_with("/hot");
        Ok(res)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    if hot {
        count.fetch_add(1, Ordering::Relaxed);
        while let Some(Ok(_)) = ws.next().await {}
        count.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    let update = |n: i64| {
        Message::text(format!(
            r#"{{"type":"update","connections":{{"hot":{n}}}}}"#
        ))
    };
    // The subscribe, answered with the current count; the feed starts there.
    loop {
        match ws.next().await {
            Some(Ok(m)) if m.is_text() => break,
            Some(Ok(_)) => continue,
            _ => return,
        }
    }
    let now = *counts.borrow_and_update();
    if ws.send(update(now)).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            changed = counts.changed() => {
                if changed.is_err() {
                    return;
                }
                let now = *counts.borrow_and_update();
                if ws.send(update(now)).await.is_err() {
                    return;
                }
            }
            m = ws.next() => match m {
                Some(Ok(_)) => {}
                _ => return,
            },
        }
    }
}

/// `GET path` on `server`: the body of a 200 answer.
pub async fn http_body(server: SocketAddr, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(server).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {server}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    let text = String::from_utf8(buf).ok()?;
    if !text.starts_with("HTTP/1.1 200") {
        return None;
    }
    text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
}

/// The service's `/api/v1/stats` (from the admin listener), if it answers.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    /// Pages the counter tracks.
    pub pages: u64,
    /// Tracked pages with connections.
    pub live_pages: u64,
    /// Page rooms alive.
    pub rooms: u64,
    /// Open WebSocket connections.
    pub connections: u64,
}

impl Stats {
    /// `/api/v1/stats` of the admin listener `admin`; `None` when it does not answer.
    pub async fn get(admin: Option<SocketAddr>) -> Option<Stats> {
        let body =
            tokio::time::timeout(Duration::from_secs(10), http_body(admin?, "/api/v1/stats"))
                .await
                .ok()??;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let n = |k: &str| v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
        Some(Stats {
            pages: n("pages"),
            live_pages: n("live_pages"),
            rooms: n("rooms"),
            connections: n("connections"),
        })
    }
}

/// Total size of the files under `dir` (recursively), in KiB.
pub fn dir_kib(dir: &std::path::Path) -> u64 {
    fn bytes(dir: &std::path::Path) -> u64 {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        entries
            .flatten()
            .map(|e| match e.file_type() {
                Ok(t) if t.is_dir() => bytes(&e.path()),
                Ok(_) => e.metadata().map_or(0, |m| m.len()),
                Err(_) => 0,
            })
            .sum()
    }
    bytes(dir) / 1024
}

/// A fixed set of pages, each held open by a known number of connections
/// (page `i`: `1 + i % 4`, so a count that lands on the wrong page shows),
/// and one subscriber on a page of its own following all of them. The bench
/// knows every true count, so the subscriber's view can be checked at quiet
/// points. Every connection reads all the time (pongs included), so none is
/// closed as silent.
pub struct Observed {
    pages: Vec<String>,
    /// Held connections per page that are still open: the true counts.
    truth: std::sync::Arc<Vec<std::sync::atomic::AtomicI64>>,
    /// The subscriber's latest value per page (-1: none yet).
    view: std::sync::Arc<Vec<std::sync::atomic::AtomicI64>>,
    /// The subscriber is connected.
    observer_open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Held connections or the subscriber ended by the server (close frame or stream end).
    server_ends: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The first message the subscriber did not expect (an error, say).
    unexpected: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The counts of an update message (`None`: not an update).
pub fn update_map(text: &str) -> Option<Vec<(String, i64)>> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    if v.get("type")?.as_str()? != "update" {
        return None;
    }
    v.get("connections")?
        .as_object()?
        .iter()
        .map(|(k, n)| Some((k.clone(), n.as_i64()?)))
        .collect()
}

/// The true counts of the observed pages and what the connections saw.
type Counts = std::sync::Arc<Vec<std::sync::atomic::AtomicI64>>;

/// Holds `1 + i % 4` connections open on page `i` of `pages`, each reading
/// until the server ends it (then counted down in `truth` and up in
/// `server_ends`); returns their tasks once all are open.
async fn hold_pages(
    server: SocketAddr,
    pages: &[String],
    truth: &Counts,
    server_ends: &std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::new();
    let limit = Duration::from_secs(10);
    for (i, page) in pages.iter().enumerate() {
        for _ in 0..1 + i % 4 {
            let mut ws =
                tokio::time::timeout(limit, connect(server, &format!("/parties/page/{page}")))
                    .await
                    .map_err(|_| anyhow::anyhow!("held connection to {page}: timed out"))??;
            truth[i].fetch_add(1, Ordering::SeqCst);
            let (truth, server_ends) = (truth.clone(), server_ends.clone());
            tasks.push(tokio::spawn(async move {
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_close() {
                        break;
                    }
                }
                truth[i].fetch_sub(1, Ordering::SeqCst);
                server_ends.fetch_add(1, Ordering::Relaxed);
            }));
        }
    }
    Ok(tasks)
}

/// Applies the subscriber's messages to `view` (page `i` of `pages` at
/// index `i`); the first one it does not expect goes to `unexpected`.
/// The applier answers whether the message was an update.
fn applier(
    pages: &[String],
    view: &Counts,
    unexpected: &std::sync::Arc<std::sync::Mutex<Option<String>>>,
) -> impl Fn(&str) -> bool + Send + 'static {
    let index: std::collections::HashMap<String, usize> = pages
        .iter()
        .enumerate()
        .map(|(i, p)| (p.clone(), i))
        .collect();
    let (view, unexpected) = (view.clone(), unexpected.clone());
    move |t: &str| {
        let Some(counts) = update_map(t) else {
            let mut u = unexpected.lock().expect("not poisoned");
            u.get_or_insert_with(|| t.to_string());
            return false;
        };
        for (id, n) in counts {
            match index.get(&id) {
                Some(&i) => view[i].store(n, Ordering::SeqCst),
                None => {
                    let mut u = unexpected.lock().expect("not poisoned");
                    u.get_or_insert_with(|| format!("update for {id}: {t}"));
                }
            }
        }
        true
    }
}

/// Reads `ws` until its first update, applied with `apply` (10 s at most).
async fn first_update(ws: &mut Ws, apply: &impl Fn(&str) -> bool) -> anyhow::Result<()> {
    let first = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    if apply(&t) {
                        return Ok(());
                    }
                }
                Some(Ok(Message::Close(c))) => anyhow::bail!("subscriber closed: {c:?}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
                None => anyhow::bail!("subscriber: stream ended"),
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("subscriber: first update timed out"))?;
    first
}

impl Observed {
    /// Opens `n` pages `{prefix}0` … and the subscriber (on `{prefix}observer`);
    /// returns once every held connection is open and the subscriber has
    /// its first update.
    pub async fn open(server: SocketAddr, prefix: &str, n: usize) -> anyhow::Result<Observed> {
        use std::sync::{
            atomic::{AtomicBool, AtomicI64, AtomicU64},
            Arc, Mutex,
        };
        let pages: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
        let truth: Counts = Arc::new((0..n).map(|_| AtomicI64::new(0)).collect());
        let view: Counts = Arc::new((0..n).map(|_| AtomicI64::new(-1)).collect());
        let observer_open = Arc::new(AtomicBool::new(false));
        let server_ends = Arc::new(AtomicU64::new(0));
        let unexpected: Arc<Mutex<Option<String>>> = Arc::default();
        let mut tasks = hold_pages(server, &pages, &truth, &server_ends).await?;
        let mut ws = tokio::time::timeout(
            Duration::from_secs(10),
            connect(server, &format!("/parties/page/{prefix}observer")),
        )
        .await
        .map_err(|_| anyhow::anyhow!("subscriber: connect timed out"))??;
        ws.send(subscribe_msg(&pages)).await?;
        let apply = applier(&pages, &view, &unexpected);
        first_update(&mut ws, &apply).await?;
        observer_open.store(true, Ordering::SeqCst);
        let (open, ends) = (observer_open.clone(), server_ends.clone());
        tasks.push(tokio::spawn(async move {
            while let Some(Ok(m)) = ws.next().await {
                match m {
                    Message::Text(t) => {
                        apply(&t);
                    }
                    Message::Close(_) => break,
                    _ => {}
                }
            }
            open.store(false, Ordering::SeqCst);
            ends.fetch_add(1, Ordering::Relaxed);
        }));
        Ok(Observed {
            pages,
            truth,
            view,
            observer_open,
            server_ends,
            unexpected,
            tasks,
        })
    }

    /// Observed pages.
    pub fn page_count(&self) -> usize {
        self.pages.len()
    }

    /// Held connections still open.
    pub fn held(&self) -> i64 {
        self.truth.iter().map(|t| t.load(Ordering::SeqCst)).sum()
    }

    /// Pages whose latest value at the subscriber differs from the true
    /// count (all of them while the subscriber is closed: its view is stale).
    pub fn mismatches(&self) -> usize {
        if !self.observer_open.load(Ordering::SeqCst) {
            return self.pages.len();
        }
        self.truth
            .iter()
            .zip(self.view.iter())
            .filter(|(t, v)| t.load(Ordering::SeqCst) != v.load(Ordering::SeqCst))
            .count()
    }

    /// `page=seen/true` for each mismatched page (for a `#` line).
    pub fn describe_mismatches(&self) -> String {
        let parts: Vec<String> = self
            .pages
            .iter()
            .zip(self.truth.iter().zip(self.view.iter()))
            .filter_map(|(p, (t, v))| {
                let (t, v) = (t.load(Ordering::SeqCst), v.load(Ordering::SeqCst));
                (t != v).then(|| format!("{p}={v}/{t}"))
            })
            .collect();
        format!(
            "subscriber_open={} seen/true: {}",
            self.observer_open.load(Ordering::SeqCst),
            parts.join(" ")
        )
    }

    /// Connections (held or the subscriber) the server ended so far.
    pub fn server_ends(&self) -> u64 {
        self.server_ends.load(Ordering::Relaxed)
    }

    /// The first message the subscriber did not expect, if any.
    pub fn unexpected(&self) -> Option<String> {
        self.unexpected.lock().expect("not poisoned").clone()
    }

    /// Polls until the subscriber's view equals the true counts, at most
    /// `limit`: (mismatches at the end, ms waited).
    pub async fn converge(&self, limit: Duration) -> (usize, f64) {
        let start = Instant::now();
        loop {
            let m = self.mismatches();
            if m == 0 || start.elapsed() >= limit {
                return (m, ms(start.elapsed()));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Drops every connection (the tasks are aborted; nothing is counted).
    pub async fn close(self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// An event-stream client (`GET /parties/page/{page}/events`) over a raw
/// TCP stream from the next source address: it parses the stream itself.
pub struct Sse {
    stream: TcpStream,
    /// Bytes read and not yet parsed.
    buf: Vec<u8>,
}

/// Opens the event stream of `page` subscribed to `links`, and reads its
/// response head (an error unless it is a `200`).
pub async fn connect_sse(server: SocketAddr, page: &str, links: &[String]) -> anyhow::Result<Sse> {
    use tokio::io::AsyncWriteExt;
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(next_source().into(), 0))?;
    let mut stream = socket.connect(server).await?;
    stream.set_nodelay(true)?;
    let visitor = match visitor_tabs() {
        Some(tabs) => {
            let n = CONNECTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) / tabs;
            format!("&visitor=bench-visitor-{n:08}")
        }
        None => String::new(),
    };
    let request = format!(
        "GET /parties/page/{page}/events?links={}{visitor} HTTP/1.1\r\nHost: {server}\r\n\r\n",
        links.join(",")
    );
    stream.write_all(request.as_bytes()).await?;
    let mut sse = Sse {
        stream,
        buf: Vec::new(),
    };
    loop {
        if let Some(at) = sse.buf.windows(4).position(|w| w == b"\r\n\r\n") {
            if !sse.buf.starts_with(b"HTTP/1.1 200") {
                anyhow::bail!(
                    "refused: {}",
                    String::from_utf8_lossy(&sse.buf[..at])
                        .lines()
                        .next()
                        .unwrap_or("")
                );
            }
            sse.buf.drain(..at + 4);
            return Ok(sse);
        }
        if !sse.fill().await? {
            anyhow::bail!("stream ended before its head");
        }
    }
}

impl Sse {
    /// Reads more; false at the end of the stream.
    async fn fill(&mut self) -> anyhow::Result<bool> {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 2048];
        let n = self.stream.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        // Keep nothing allocated while idle.
        if self.buf.is_empty() {
            self.buf = Vec::new();
        }
        Ok(n > 0)
    }

    /// The next `data:` line's text (comments and the retry hint skipped);
    /// `None` when the server ended the stream.
    pub async fn next_data(&mut self) -> anyhow::Result<Option<String>> {
        loop {
            while let Some(at) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=at).collect();
                if let Some(data) = line.strip_prefix(b"data: ") {
                    return Ok(Some(
                        String::from_utf8_lossy(&data[..data.len() - 1]).into_owned(),
                    ));
                }
            }
            if self.buf.is_empty() {
                self.buf = Vec::new();
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// The next update's text (an error if the stream ends or says otherwise).
    pub async fn next_update(&mut self) -> anyhow::Result<String> {
        match self.next_data().await? {
            Some(t) if t.starts_with(r#"{"type":"update""#) => Ok(t),
            Some(t) => anyhow::bail!("unexpected message {t}"),
            None => anyhow::bail!("stream ended"),
        }
    }
}

/// How a bench client is connected.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Transport {
    WebSocket,
    EventStream,
}

impl Transport {
    /// Its value in the `BENCH` lines.
    pub fn name(self) -> &'static str {
        match self {
            Transport::WebSocket => "websocket",
            Transport::EventStream => "sse",
        }
    }
}

/// Reads a `/proc/sys/net/netfilter` value (`None` without connection tracking).
fn netfilter(name: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/sys/net/netfilter/{name}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Before a round: prints the kernel's connection-tracking table fill
/// (`nf_conntrack_count` of `nf_conntrack_max`) and, past a quarter full,
/// waits up to `nf_conntrack_tcp_timeout_time_wait` (+5 s) for it to drain;
/// warns if it does not. Every loopback connection leaves an entry for that
/// long after it closes, and a full table drops packets (`dmesg`:
/// `nf_conntrack: table full, dropping packet`): later rounds then crawl.
pub fn conntrack_check(what: &str) {
    let (Some(count), Some(max)) = (
        netfilter("nf_conntrack_count"),
        netfilter("nf_conntrack_max"),
    ) else {
        println!("# conntrack before {what}: not tracked here");
        return;
    };
    let wait = netfilter("nf_conntrack_tcp_timeout_time_wait").unwrap_or(120) + 5;
    let started = Instant::now();
    let mut now = count;
    while now > max / 4 && started.elapsed() < Duration::from_secs(wait) {
        std::thread::sleep(Duration::from_millis(500));
        now = netfilter("nf_conntrack_count").unwrap_or(0);
    }
    let waited = started.elapsed().as_secs_f64();
    println!("# conntrack before {what}: nf_conntrack_count={now} of nf_conntrack_max={max} (was {count}, waited {waited:.1} s)");
    if now > max / 4 {
        println!(
            "# WARNING: the conntrack table is still {}% full: figures of this round may be the kernel's (see docs/OPERATIONS.md#kernel-settings-for-many-connections)",
            100 * now / max
        );
    }
}
