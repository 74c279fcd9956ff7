//! Test harness: a real server on port 0 in its own actix system thread,
//! real WebSocket clients (tokio-tungstenite), raw HTTP, temp data dirs.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    time::{Duration, Instant},
};

use actix::Addr;
use futures_util::{stream::SplitSink, SinkExt, StreamExt};
use link_counter::{
    counter::Counter, server::ShutdownReport, shard::Shards, storage::Storage, Server, Settings,
};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
};
use tokio_tungstenite::{
    tungstenite::{protocol::CloseFrame, Message},
    MaybeTlsStream, WebSocketStream,
};

#[allow(unused_imports)] // re-exported for the modules of each target that includes this file
pub use crate::kit::{
    redis::{redis_available, RedisServer},
    settings::test_settings as settings,
    wait::{Ready, PATIENCE},
};

fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    }
}

/// A server running in its own thread.
pub struct TestApp {
    pub addr: SocketAddr,
    /// The admin listener (metrics, dashboard).
    pub admin: Option<SocketAddr>,
    pub counter: Addr<Counter>,
    /// The cluster actor, in cluster mode.
    pub cluster: Option<Addr<link_counter::cluster::Cluster>>,
    pub storage: Storage,
    pub shards: Shards,
    pub dir: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<ShutdownReport>>,
}

/// Starts a server on 127.0.0.1:0 with `settings`. A test that restarts a
/// server on its directory may get here while the stopped server's worker
/// threads are still dropping their actors, and with them the last handles
/// on the store, which hold its lock: a locked store is tried again until
/// they let go.
async fn start_when_unlocked(settings: Settings) -> Server {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
        match Server::start(settings.clone(), listener).await {
            Ok(server) => return server,
            Err(e)
                if Instant::now() < deadline
                    && matches!(
                        e.downcast_ref::<link_counter::storage::StorageError>(),
                        Some(link_counter::storage::StorageError::Locked { .. })
                    ) =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("server starts: {e:?}"),
        }
    }
}

/// Starts a server on 127.0.0.1:0 with `settings`.
pub fn spawn_app_with(settings: Settings) -> TestApp {
    init_logs();
    let dir = settings.storage.path.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        actix_rt::System::new().block_on(async move {
            let server = start_when_unlocked(settings).await;
            tx.send((
                server.local_addr(),
                server.admin_addr(),
                server.counter(),
                server.cluster(),
                server.storage(),
                server.shards().clone(),
            ))
            .expect("test is waiting");
            let _ = stop_rx.await;
            server.shutdown().await
        })
    });
    let (addr, admin, counter, cluster, storage, shards) =
        rx.recv().expect("server reports its address");
    TestApp {
        addr,
        admin,
        counter,
        cluster,
        storage,
        shards,
        dir,
        stop: Some(stop_tx),
        thread: Some(thread),
    }
}

/// Starts a server with test settings in a fresh temp dir (kept alive by the returned guard).
pub fn spawn_app(extra: &[(&str, &str)]) -> (TestApp, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let app = spawn_app_with(settings(dir.path(), extra));
    (app, dir)
}

impl TestApp {
    pub fn ws_url(&self, page: &str) -> String {
        format!("ws://{}/parties/page/{page}", self.addr)
    }

    /// Graceful shutdown; returns what it reported.
    pub async fn shutdown(mut self) -> ShutdownReport {
        self.stop_now().await
    }

    async fn stop_now(&mut self) -> ShutdownReport {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let thread = self.thread.take().expect("not yet stopped");
        tokio::task::spawn_blocking(move || thread.join().expect("server thread"))
            .await
            .expect("join")
    }

    pub async fn connect(&self, page: &str) -> Client {
        Client::connect(&self.ws_url(page)).await
    }

    /// Connects to `page` as visitor `visitor` (`?visitor=…`).
    pub async fn connect_as(&self, page: &str, visitor: &str) -> Client {
        Client::connect(&format!("{}?visitor={visitor}", self.ws_url(page))).await
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.addr, path).await
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let (status, body) = self.get(path).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).expect("JSON body")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// Minimal HTTP/1.1 GET; returns status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_raw(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .await
}

/// Writes `request` on `s` and reads until the peer closes.
pub async fn exchange(s: &mut TcpStream, request: &str) -> Vec<u8> {
    s.write_all(request.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut buf))
        .await
        .expect("response in time")
        .expect("read");
    buf
}

/// Polls `f` every 20 ms until it is `true` (or `Some`, whose value it
/// returns); panics after [`PATIENCE`]. The one way tests wait for state.
pub async fn eventually<F, Fut>(what: &str, f: F) -> <Fut::Output as Ready>::Value
where
    F: FnMut() -> Fut,
    Fut: std::future::Future,
    Fut::Output: Ready,
{
    eventually_within(PATIENCE, what, f).await
}

/// [`eventually`] with a longer patience, for waits that scale with a test's size.
pub async fn eventually_within<F, Fut>(
    patience: Duration,
    what: &str,
    mut f: F,
) -> <Fut::Output as Ready>::Value
where
    F: FnMut() -> Fut,
    Fut: std::future::Future,
    Fut::Output: Ready,
{
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        if let Some(value) = f().await.ready() {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {patience:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends a raw request and reads the whole response.
pub async fn http_raw(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let buf = exchange(&mut s, request).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A WebSocket client that models the seed's browser client: it answers
/// pings at all times (a background task keeps reading, as a browser does)
/// and applies each update as "set these ids to these counts".
pub struct Client {
    sink: SplitSink<WebSocketStream<MaybeTlsStream<TcpStream>>, Message>,
    /// Frames other than ping/pong, in order; `None` when the stream ended.
    rx: mpsc::UnboundedReceiver<Message>,
    reader: tokio::task::JoinHandle<()>,
    /// Counts as this client would display them.
    pub shown: BTreeMap<String, u64>,
    /// Visitor figures as this client would display them (from `visitors` maps).
    pub shown_visitors: BTreeMap<String, u64>,
}

/// A client that completed the handshake and then never reads or answers
/// pings again (a dead peer whose TCP stream stays open).
pub struct SilentClient(#[allow(dead_code)] WebSocketStream<MaybeTlsStream<TcpStream>>);

pub fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

async fn open(url: &str) -> WebSocketStream<MaybeTlsStream<TcpStream>> {
    let (ws, _) = tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect in time")
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    ws
}

/// Opens a WebSocket to `url` (served at `target`) from source address
/// `src` (a 127.0.0.x), with extra request headers; `Err(status)` when the
/// upgrade is refused with an HTTP status.
pub async fn connect_from(
    target: SocketAddr,
    src: &str,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<Client, u16> {
    use tokio_tungstenite::tungstenite::{
        client::IntoClientRequest,
        http::{HeaderName, HeaderValue},
    };
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{src}:0").parse().expect("source address"))
        .expect("bind source");
    let stream = socket.connect(target).await.expect("tcp connect");
    let mut req = url.into_client_request().expect("request");
    for (k, v) in headers {
        let name = HeaderName::from_bytes(k.as_bytes()).expect("header name");
        req.headers_mut()
            .insert(name, HeaderValue::from_str(v).expect("header value"));
    }
    match tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(stream)).await {
        Ok((ws, _)) => Ok(Client::from_stream(ws)),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("connect {url} from {src}: {e}"),
    }
}

impl SilentClient {
    pub async fn connect(url: &str) -> SilentClient {
        SilentClient(open(url).await)
    }
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        Client::from_stream(open(url).await)
    }

    /// Wraps an already upgraded stream.
    pub fn from_stream(ws: WebSocketStream<MaybeTlsStream<TcpStream>>) -> Client {
        let (sink, mut stream) = ws.split();
        let (tx, rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            while let Some(Ok(m)) = stream.next().await {
                if matches!(m, Message::Ping(_) | Message::Pong(_)) {
                    continue;
                }
                if tx.send(m).is_err() {
                    break;
                }
            }
        });
        Client {
            sink,
            rx,
            reader,
            shown: BTreeMap::new(),
            shown_visitors: BTreeMap::new(),
        }
    }

    pub async fn send_text(&mut self, text: &str) {
        self.sink
            .send(Message::Text(text.into()))
            .await
            .expect("send");
    }

    pub async fn send(&mut self, msg: Message) {
        self.sink.send(msg).await.expect("send");
    }

    pub async fn subscribe(&mut self, links: &[&str]) {
        let msg = serde_json::json!({"type": "subscribe", "links": links});
        self.send_text(&msg.to_string()).await;
    }

    /// Subscribes asking for the `visitors` map too.
    pub async fn subscribe_visitors(&mut self, links: &[&str]) {
        let msg = serde_json::json!({"type": "subscribe", "links": links, "visitors": true});
        self.send_text(&msg.to_string()).await;
    }

    /// The next frame that is not a ping/pong, or None when the stream ended.
    pub async fn next_frame(&mut self) -> Option<Message> {
        tokio::time::timeout(PATIENCE, self.rx.recv())
            .await
            .expect("a frame in time")
    }

    /// The next text message, as raw text.
    pub async fn next_text(&mut self) -> String {
        match self.next_frame().await {
            Some(Message::Text(t)) => t.to_string(),
            other => panic!("expected a text message, got {other:?}"),
        }
    }

    /// The next message as JSON (and applies it if it is an update).
    pub async fn next_json(&mut self) -> Value {
        let v: Value = serde_json::from_str(&self.next_text().await).expect("JSON");
        if v["type"] == "update" {
            for (k, c) in v["connections"].as_object().expect("connections map") {
                self.shown
                    .insert(k.clone(), c.as_u64().expect("integer count"));
            }
            if let Some(map) = v.get("visitors") {
                for (k, c) in map.as_object().expect("visitors map") {
                    self.shown_visitors
                        .insert(k.clone(), c.as_u64().expect("integer count"));
                }
            }
        }
        v
    }

    /// The next update's `connections` map.
    pub async fn next_update(&mut self) -> BTreeMap<String, u64> {
        let v = self.next_json().await;
        assert_eq!(v["type"], "update", "expected an update, got {v}");
        serde_json::from_value(v["connections"].clone()).expect("map")
    }

    /// Reads updates until `shown` equals `expected` on those ids.
    pub async fn wait_for(&mut self, expected: &BTreeMap<String, u64>) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if expected.iter().all(|(k, v)| self.shown.get(k) == Some(v)) {
                return;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if tokio::time::timeout(left, self.next_json()).await.is_err() {
                panic!(
                    "counts did not converge: shown {:?}, expected {expected:?}",
                    self.shown
                );
            }
        }
    }

    /// Reads updates until `shown` and `shown_visitors` equal `connections`
    /// and `visitors` on those ids, checking after every update that no
    /// figure went above `ceiling` (connections, visitors) for those ids.
    pub async fn wait_for_tally(
        &mut self,
        connections: &BTreeMap<String, u64>,
        visitors: &BTreeMap<String, u64>,
        ceiling: (u64, u64),
    ) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            for k in connections.keys() {
                let (c, v) = (self.shown.get(k), self.shown_visitors.get(k));
                assert!(
                    c.is_none_or(|c| *c <= ceiling.0) && v.is_none_or(|v| *v <= ceiling.1),
                    "{k}: shown {c:?} connections and {v:?} visitors, more than {ceiling:?}"
                );
            }
            let done = |shown: &BTreeMap<String, u64>, want: &BTreeMap<String, u64>| {
                want.iter().all(|(k, v)| shown.get(k) == Some(v))
            };
            if done(&self.shown, connections) && done(&self.shown_visitors, visitors) {
                return;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if tokio::time::timeout(left, self.next_json()).await.is_err() {
                panic!(
                    "tallies did not converge: shown {:?} and visitors {:?}, expected {connections:?} and {visitors:?}",
                    self.shown, self.shown_visitors
                );
            }
        }
    }

    /// Asserts that no message arrives within `d`.
    pub async fn expect_silence(&mut self, d: Duration) {
        if let Ok(m) = tokio::time::timeout(d, self.rx.recv()).await {
            panic!("expected silence, got {m:?}");
        }
    }

    /// Waits for the server's close frame and returns its code.
    pub async fn expect_close(&mut self) -> u16 {
        loop {
            match self.next_frame().await {
                Some(Message::Close(Some(CloseFrame { code, .. }))) => return u16::from(code),
                Some(Message::Close(None)) => return 1005,
                Some(Message::Text(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }

    /// Close handshake from the client side; returns once the server answered.
    pub async fn close(mut self) {
        let _ = self.sink.send(Message::Close(None)).await;
        let _ = tokio::time::timeout(PATIENCE, async {
            while let Some(m) = self.rx.recv().await {
                if matches!(m, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }

    /// Drops the TCP stream without a close frame.
    pub fn drop_abruptly(self) {
        // Drop aborts the reader, which owns the other half of the stream.
        drop(self);
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// One item of an event stream, as a raw client reads it.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamItem {
    /// A `data:` line: one message (its JSON).
    Data(Value),
    /// A comment line (`:`): a keep-alive.
    Comment,
    /// The `retry:` hint, in milliseconds.
    Retry(u64),
    /// The server ended the stream (or the connection failed).
    End,
}

/// An event-stream client over a raw TCP socket: it sends the request and
/// parses the stream itself, line by line.
pub struct EventClient {
    stream: TcpStream,
    /// Bytes read and not yet parsed.
    buf: Vec<u8>,
    /// The response head (status line and headers), lower-cased.
    pub head: String,
    /// Bytes not yet de-chunked, when a proxy chunked the response.
    chunked: Option<Vec<u8>>,
    /// The latest connections count shown of each id (updates merged).
    pub shown: BTreeMap<String, u64>,
    /// The latest visitors count shown of each id.
    pub shown_visitors: BTreeMap<String, u64>,
}

/// `path` of an event stream (`/parties/page/{page}/events?{query}`).
pub fn events_path(page: &str, query: &str) -> String {
    if query.is_empty() {
        format!("/parties/page/{page}/events")
    } else {
        format!("/parties/page/{page}/events?{query}")
    }
}

impl EventClient {
    /// Opens `path` with the extra header lines `headers`; a refusal comes
    /// back as its status and body.
    pub async fn open(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<EventClient, (u16, String)> {
        let stream = TcpStream::connect(addr).await.expect("connect");
        EventClient::over(stream, &addr.to_string(), path, headers).await
    }

    /// Opens `path` of `host` on an open connection `stream` (a TLS
    /// bridge, for instance).
    pub async fn over(
        mut stream: TcpStream,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<EventClient, (u16, String)> {
        let extra: String = headers
            .iter()
            .map(|(k, v)| format!("{k}: {v}\r\n"))
            .collect();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n{extra}\r\n"
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut client = EventClient {
            stream,
            buf: Vec::new(),
            head: String::new(),
            chunked: None,
            shown: BTreeMap::new(),
            shown_visitors: BTreeMap::new(),
        };
        let head = loop {
            if let Some(at) = client.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&client.buf[..at]).into_owned();
                client.buf.drain(..at + 4);
                break head;
            }
            assert!(
                client.fill().await,
                "connection closed before a response head"
            );
        };
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status line");
        if status != 200 {
            // A refusal: read its body (the server closes the connection, or
            // says how long the body is).
            let len = head.lines().find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
            });
            while len.is_none_or(|n| client.buf.len() < n) && client.fill().await {}
            return Err((status, String::from_utf8_lossy(&client.buf).into_owned()));
        }
        client.head = head.to_ascii_lowercase();
        if client.head.contains("transfer-encoding: chunked") {
            // A proxy re-chunked the stream: decode what came with the head.
            client.chunked = Some(std::mem::take(&mut client.buf));
            client.dechunk();
        }
        Ok(client)
    }

    /// Moves the complete chunks of `chunked` into `buf`.
    fn dechunk(&mut self) {
        let Some(raw) = self.chunked.as_mut() else {
            return;
        };
        while let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") {
            let size = std::str::from_utf8(&raw[..eol])
                .ok()
                .and_then(|l| usize::from_str_radix(l.split(';').next()?.trim(), 16).ok())
                .unwrap_or_else(|| panic!("chunk size line {:?}", &raw[..eol]));
            if raw.len() < eol + 2 + size + 2 {
                return;
            }
            self.buf.extend_from_slice(&raw[eol + 2..eol + 2 + size]);
            raw.drain(..eol + 2 + size + 2);
        }
    }

    /// The socket (to write what a reader should not send).
    pub fn stream_mut(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// Reads more bytes; false at the end of the stream (or an error).
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(PATIENCE, self.stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(n)) => {
                match self.chunked.as_mut() {
                    Some(raw) => {
                        raw.extend_from_slice(&chunk[..n]);
                        self.dechunk();
                    }
                    None => self.buf.extend_from_slice(&chunk[..n]),
                }
                true
            }
            Err(_) => panic!("nothing from the event stream within {PATIENCE:?}"),
        }
    }

    /// The next item (blank lines skipped); panics after [`PATIENCE`] of silence.
    pub async fn next_item(&mut self) -> StreamItem {
        loop {
            if let Some(at) = self.buf.iter().position(|b| *b == b'\n') {
                let line = String::from_utf8(self.buf[..at].to_vec()).expect("UTF-8 line");
                self.buf.drain(..=at);
                if line.is_empty() {
                    continue;
                }
                if line.starts_with(':') {
                    return StreamItem::Comment;
                }
                if let Some(ms) = line.strip_prefix("retry: ") {
                    return StreamItem::Retry(ms.parse().expect("retry in ms"));
                }
                let data = line
                    .strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("unexpected line {line:?}"));
                return StreamItem::Data(serde_json::from_str(data).expect("JSON data"));
            }
            if !self.fill().await {
                return StreamItem::End;
            }
        }
    }

    /// The next `data:` message (comments and the retry hint skipped); an
    /// update is merged into `shown` and `shown_visitors`.
    pub async fn next_data(&mut self) -> Value {
        loop {
            match self.next_item().await {
                StreamItem::Data(v) => {
                    let merge = |shown: &mut BTreeMap<String, u64>, map: &Value| {
                        for (k, c) in map.as_object().into_iter().flatten() {
                            shown.insert(k.clone(), c.as_u64().expect("integer count"));
                        }
                    };
                    if v["type"] == "update" {
                        merge(&mut self.shown, &v["connections"]);
                        merge(&mut self.shown_visitors, &v["visitors"]);
                    }
                    return v;
                }
                StreamItem::End => panic!("the event stream ended"),
                _ => {}
            }
        }
    }

    /// Reads messages until `shown` equals `expected` on those ids.
    pub async fn wait_for(&mut self, expected: &BTreeMap<String, u64>) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while !expected.iter().all(|(k, v)| self.shown.get(k) == Some(v)) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if tokio::time::timeout(left, self.next_data()).await.is_err() {
                panic!(
                    "counts did not converge: shown {:?}, expected {expected:?}",
                    self.shown
                );
            }
        }
    }

    /// Reads until the server ends the stream (anything before is skipped).
    pub async fn expect_end(&mut self) {
        while self.next_item().await != StreamItem::End {}
    }
}
