//! `oversize`: one client declares a huge text frame and streams it.
//!
//! Against the release binary (default `websocket.max_message_bytes`, 16 KiB):
//! a raw TCP client writes the upgrade request itself, then a masked TEXT
//! frame header declaring 1 GiB (and, in a second run, 64 MiB) with the
//! 64-bit length, and streams the masked payload at full speed until the
//! server's close frame (or the connection's end) arrives, or 10 s pass.
//! Figures: time from the header to the close, the close code, and the
//! service's RSS growth (max `VmRSS` sampled during the stream over the
//! settled value before).

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

/// Mask key of the frame (any value works; fixed so chunks can be precomputed).
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
/// Bytes per write of the payload (a multiple of 4, so every chunk starts at
/// mask offset 0).
const CHUNK: usize = 64 * 1024;

/// How the connection ended, seen from the client.
enum End {
    /// Close frame with this code (`None`: no code).
    Close(Option<u16>),
    /// The stream ended (FIN) without a close frame.
    Eof,
    /// Reset or another read error.
    Error(std::io::ErrorKind),
}

impl End {
    fn name(&self) -> String {
        match self {
            End::Close(_) => "close".into(),
            End::Eof => "eof".into(),
            End::Error(k) => format!("error_{k:?}"),
        }
    }
}

/// Writes the upgrade request and reads the `101` answer (through the blank line).
async fn handshake(s: &mut tokio::net::TcpStream, server: SocketAddr) -> anyhow::Result<()> {
    let req = format!(
        "GET /parties/page/oversize HTTP/1.1\r\nHost: {server}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    // Byte by byte: nothing after the blank line may be consumed here.
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await? == 0 {
            anyhow::bail!("connection ended during the handshake");
        }
        head.push(byte[0]);
        if head.len() > 8192 {
            anyhow::bail!("handshake answer too long");
        }
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        anyhow::bail!(
            "handshake refused: {}",
            String::from_utf8_lossy(&head).lines().next().unwrap_or("")
        );
    }
    Ok(())
}

/// Reads server frames until a close frame or the end of the stream.
async fn read_until_close(mut r: tokio::net::tcp::OwnedReadHalf) -> End {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        // Parse complete frames (server frames are unmasked).
        loop {
            if buf.len() < 2 {
                break;
            }
            let opcode = buf[0] & 0x0f;
            let (len, at) = match buf[1] & 0x7f {
                126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                127 if buf.len() >= 10 => (
                    u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes")) as usize,
                    10,
                ),
                126 | 127 => break,
                n => (n as usize, 2),
            };
            if buf.len() < at + len {
                break;
            }
            if opcode == 0x8 {
                let code = (len >= 2).then(|| u16::from_be_bytes([buf[at], buf[at + 1]]));
                return End::Close(code);
            }
            buf.drain(..at + len);
        }
        match r.read(&mut chunk).await {
            Ok(0) => return End::Eof,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return End::Error(e.kind()),
        }
    }
}

/// A few ordinary cycles, then the service's settled RSS (KiB).
async fn warm_rss(server: SocketAddr, pid: u32) -> u64 {
    for i in 0..20u64 {
        let mut rng = Rng::new(i);
        let _ = cycle(server, &format!("p{i}"), &rng.pages(3, 50), Leave::Close).await;
    }
    let mut before = rss_kib(pid);
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = rss_kib(pid);
        if now.abs_diff(before) < 16 {
            return now;
        }
        before = now;
    }
    before
}

/// Samples `pid`'s RSS every 5 ms into the returned maximum until `done`.
fn rss_sampler(
    pid: u32,
    before: u64,
    done: Arc<AtomicBool>,
) -> (Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let max_rss = Arc::new(AtomicU64::new(before));
    let m = max_rss.clone();
    let sampler = tokio::spawn(async move {
        while !done.load(Ordering::Relaxed) {
            m.fetch_max(rss_kib(pid), Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    (max_rss, sampler)
}

/// Writes the frame header declaring `declared` bytes, then the payload at
/// full speed until it is all sent, `done`, a write fails or `deadline`:
/// (bytes sent, the write error).
async fn stream_frame(
    w: &mut tokio::net::tcp::OwnedWriteHalf,
    declared: u64,
    deadline: Instant,
    done: &AtomicBool,
) -> (u64, Option<std::io::ErrorKind>) {
    // FIN + text, masked, 64-bit length.
    let mut header = vec![0x81u8, 0x80 | 127];
    header.extend_from_slice(&declared.to_be_bytes());
    header.extend_from_slice(&MASK);
    let payload: Vec<u8> = (0..CHUNK).map(|i| b'a' ^ MASK[i % 4]).collect();
    let mut sent = 0u64;
    if let Err(e) = w.write_all(&header).await {
        return (sent, Some(e.kind()));
    }
    while sent < declared && !done.load(Ordering::Relaxed) && Instant::now() < deadline {
        let n = (declared - sent).min(CHUNK as u64) as usize;
        let write = tokio::time::timeout_at(deadline.into(), w.write_all(&payload[..n]));
        match write.await {
            Ok(Ok(())) => sent += n as u64,
            Ok(Err(e)) => return (sent, Some(e.kind())),
            Err(_) => break,
        }
    }
    (sent, None)
}

/// What one oversize run saw.
struct Outcome {
    sent: u64,
    streamed: Duration,
    write_error: Option<std::io::ErrorKind>,
    /// How the server ended the connection, and when (`None`: not within 2 s).
    end: Option<(End, Duration)>,
    rss_max: u64,
}

/// Streams an oversized frame at a fresh connection, sampling RSS.
async fn stream_oversized(
    server: SocketAddr,
    pid: u32,
    declared: u64,
    cap: Duration,
    before: u64,
) -> anyhow::Result<Outcome> {
    let mut s = tokio::net::TcpStream::connect(server).await?;
    s.set_nodelay(true)?;
    handshake(&mut s, server).await?;
    let (r, mut w) = s.into_split();
    let done = Arc::new(AtomicBool::new(false));
    let (max_rss, sampler) = rss_sampler(pid, before, done.clone());
    let t0 = Instant::now();
    let reader = {
        let done = done.clone();
        tokio::spawn(async move {
            let end = read_until_close(r).await;
            let at = t0.elapsed();
            done.store(true, Ordering::Relaxed);
            (end, at)
        })
    };
    let (sent, write_error) = stream_frame(&mut w, declared, t0 + cap, &done).await;
    let streamed = t0.elapsed();
    // The close (or end) may still be on its way after a write error.
    let ended = tokio::time::timeout(Duration::from_secs(2), reader).await;
    done.store(true, Ordering::Relaxed);
    // A last sample after the stream.
    tokio::time::sleep(Duration::from_millis(50)).await;
    max_rss.fetch_max(rss_kib(pid), Ordering::Relaxed);
    let _ = sampler.await;
    drop(w);
    Ok(Outcome {
        sent,
        streamed,
        write_error,
        end: ended.ok().and_then(Result::ok),
        rss_max: max_rss.load(Ordering::Relaxed),
    })
}

/// The `oversize` line of a run.
fn print_oversize(declared: u64, before: u64, o: &Outcome) {
    let code = match &o.end {
        Some((End::Close(Some(c)), _)) => c.to_string(),
        Some((End::Close(None), _)) => "no_code".into(),
        _ => "none".into(),
    };
    let max = o.rss_max;
    Line::new("oversize")
        .s("declared_bytes", declared)
        .s("sent_bytes", o.sent)
        .f("streamed_secs", o.streamed.as_secs_f64())
        .s(
            "end",
            o.end.as_ref().map_or("timeout".into(), |(e, _)| e.name()),
        )
        .s("close_code", code)
        .f(
            "close_ms",
            o.end
                .as_ref()
                .map_or(f64::NAN, |(_, d)| d.as_secs_f64() * 1e3),
        )
        .s(
            "write_error",
            o.write_error.map_or("none".into(), |k| format!("{k:?}")),
        )
        .s("rss_before_kib", before)
        .s("rss_max_kib", max)
        .s("rss_growth_kib", max.saturating_sub(before))
        .s("target_close_code", 1009)
        .f("target_close_ms", 1000.0)
        .s("target_rss_growth_kib", 2048)
        .print();
}

/// One oversize run against a fresh service; prints its `BENCH oversize` line.
fn oversize_at(rt: &tokio::runtime::Runtime, declared: u64, cap: Duration) {
    let service = ChildService::start(&[]);
    let (server, pid) = (service.addr, service.pid());
    rt.block_on(async {
        let before = warm_rss(server, pid).await;
        match stream_oversized(server, pid, declared, cap, before).await {
            Ok(o) => print_oversize(declared, before, &o),
            Err(e) => Line::new("oversize")
                .s("declared_bytes", declared)
                .s("error", format!("{e:?}").replace(' ', "_"))
                .print(),
        }
    });
    drop(service);
}

/// The `oversize` scenario: 1 GiB, then 64 MiB declared; 10 s cap each (smoke: 3 s).
pub fn oversize(rt: &tokio::runtime::Runtime, smoke: bool) {
    let cap = Duration::from_secs(if smoke { 3 } else { 10 });
    for declared in [1u64 << 30, 64 << 20] {
        oversize_at(rt, declared, cap);
    }
}
