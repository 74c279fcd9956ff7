//! Shared pieces of the bench: WebSocket clients with rotating source
//! addresses, the service (in-process or the release binary), the bare
//! ceiling server, statistics and the summary lines.

use std::{
    io::{BufRead, BufReader},
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use link_counter::{Server, Settings};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::{tungstenite::Message, WebSocketStream};

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
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://{server}{path}"), stream).await?;
    Ok(ws)
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

/// Abuse caps are off: the load generator is a handful of loopback
/// addresses opening thousands of connections per second, which is exactly
/// what the per-IP caps exist to refuse in production.
pub const NO_CAPS: &[(&str, &str)] = &[
    ("LIMITS__MAX_CONNECTIONS", "0"),
    ("LIMITS__MAX_CONNECTIONS_PER_IP", "0"),
    ("LIMITS__CONNECTIONS_PER_IP_PER_SECOND", "0"),
    ("LIMITS__MESSAGES_PER_SECOND", "0"),
];

/// Bench settings: defaults (2 shards, 2 workers on this machine, 50 ms
/// broadcast) with a temp data dir and port 0, plus `extra` env overrides.
pub fn settings(dir: &std::path::Path, extra: &[(&str, &str)]) -> Settings {
    let mut env: Vec<(String, String)> = vec![
        ("LINK_COUNTER__SERVER__BIND".into(), "127.0.0.1:0".into()),
        ("LINK_COUNTER__ADMIN__BIND".into(), "127.0.0.1:0".into()),
        (
            "LINK_COUNTER__STORAGE__PATH".into(),
            dir.display().to_string(),
        ),
    ];
    for (k, v) in NO_CAPS {
        env.push((format!("LINK_COUNTER__{k}"), v.to_string()));
    }
    // Overrides in the bench's own environment apply too (the child inherits them).
    env.extend(std::env::vars().filter(|(k, _)| k.starts_with("LINK_COUNTER__")));
    for (k, v) in extra {
        env.push((format!("LINK_COUNTER__{k}"), v.to_string()));
    }
    Settings::load_from(None, env).expect("bench settings are valid")
}

impl InProcess {
    pub fn start(extra: &[(&str, &str)]) -> InProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let settings = settings(dir.path(), extra);
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

/// The release binary as a child process (own fd table and RSS).
pub struct ChildService {
    pub addr: SocketAddr,
    /// The admin listener (`/metrics`).
    pub admin: Option<SocketAddr>,
    child: Child,
    _dir: tempfile::TempDir,
}

impl ChildService {
    pub fn start(extra: &[(&str, &str)]) -> ChildService {
        let dir = tempfile::tempdir().expect("temp dir");
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_link-counter"));
        // `LC_BENCH_WRAP="valgrind --tool=massif"` (say) runs the service under a profiler.
        let wrap = std::env::var("LC_BENCH_WRAP").unwrap_or_default();
        let mut words = wrap.split_whitespace();
        let mut cmd = match words.next() {
            Some(tool) => {
                let mut c = Command::new(tool);
                c.args(words).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        cmd.env("LINK_COUNTER__SERVER__BIND", "127.0.0.1:0")
            .env("LINK_COUNTER__ADMIN__BIND", "127.0.0.1:0")
            .env("LINK_COUNTER__STORAGE__PATH", dir.path())
            .env("RUST_LOG", "warn");
        for (k, v) in NO_CAPS.iter().chain(extra) {
            cmd.env(format!("LINK_COUNTER__{k}"), v);
        }
        Self::spawn(cmd, dir, true)
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
    fn spawn(mut cmd: Command, dir: tempfile::TempDir, admin_line: bool) -> ChildService {
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()));
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        let mut stdout = BufReader::new(stdout);
        stdout
            .read_line(&mut line)
            .expect("the child prints its address");
        let mut admin = None;
        if admin_line {
            let mut second = String::new();
            let _ = stdout.read_line(&mut second);
            admin = second
                .trim()
                .strip_prefix("admin listening on ")
                .and_then(|a| a.parse().ok());
        }
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        ChildService {
            addr,
            admin,
            child,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for ChildService {
    fn drop(&mut self) {
        // SIGTERM first (a profiler wrapping the service writes its output on exit).
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline && self.alive() {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
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
            let (count, mut counts) = (count.clone(), counts.clone());
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                let mut hot = false;
                // The callback's type is tungstenite's (`Result<Response, ErrorResponse>`).
                #[allow(clippy::result_large_err)]
                let callback =
                    |req: &tokio_tungstenite::tungstenite::handshake::server::Request, res| {
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
                // The subscribe, answered with the current count; the feed
                // starts there.
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
            });
        }
    })
}
