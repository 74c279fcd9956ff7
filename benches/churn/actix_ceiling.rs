//! The actix-http ceiling: the least a WebSocket server built on actix-http's
//! own pieces can cost. Run as a child process of the bench binary
//! (`--actix-ceiling-server`, own descriptor table and RSS): actix-server
//! with 2 workers (as the service has here) and `HttpService` with the
//! `upgrade` hook. The upgrade service validates the handshake
//! (`ws::handshake`), writes the `101` through the HTTP/1 codec, drops the
//! request, takes the socket out of the `Framed` and from then on holds no
//! buffer while idle: it waits for `readable()`, reads into a per-thread
//! scratch buffer, decodes frames with `ws::Codec`, answers each text frame
//! with a fixed update, each ping with a pong and a close with a close. No
//! rooms, no counter, no storage, no limits, no heartbeat.

use std::{cell::RefCell, convert::Infallible, io};

use actix_codec::{Decoder, Encoder, Framed};
use actix_http::{
    body::{BodySize, BoxBody},
    h1, ws, HttpService, Request, Response,
};
use actix_rt::net::TcpStream;
use actix_service::fn_service;
use bytes::BytesMut;
use futures_util::SinkExt;
use tokio::io::AsyncWriteExt;

use crate::support::{listener, CEILING_UPDATE};

/// Bytes read per `try_read` into the scratch buffer.
const READ_CHUNK: usize = 4096;

thread_local! {
    /// Per-worker scratch buffer: frames are decoded from it and only a
    /// partial frame left at the end of a read is copied into the connection.
    static SCRATCH: RefCell<BytesMut> = RefCell::new(BytesMut::with_capacity(2 * READ_CHUNK));
}

/// Entry point of `--actix-ceiling-server`: prints `listening on ADDR`, serves until killed.
pub fn run_actix_ceiling() -> ! {
    let listener = listener();
    let addr = listener.local_addr().expect("local addr");
    let result = actix_rt::System::new().block_on(async move {
        let server = actix_server::Server::build()
            .workers(2)
            .disable_signals()
            .listen("lc-actix-ceiling", listener, || {
                HttpService::build()
                    .upgrade(fn_service(upgrade))
                    .finish(fn_service(|_req: Request| async {
                        Ok::<_, Infallible>(Response::<BoxBody>::not_found())
                    }))
                    .tcp()
            })?
            .run();
        println!("listening on {addr}");
        server.await
    });
    if let Err(e) = result {
        eprintln!("actix ceiling: {e}");
        std::process::exit(1);
    }
    std::process::exit(0)
}

/// The upgrade hook: answer the handshake, then serve the bare socket.
async fn upgrade(
    (req, mut framed): (Request, Framed<TcpStream, h1::Codec>),
) -> Result<(), actix_http::Error> {
    let response = match ws::handshake(req.head()) {
        Ok(mut builder) => builder.finish().drop_body(),
        Err(_) => {
            drop(req);
            let bad = Response::<BoxBody>::bad_request().drop_body();
            let _ = framed
                .send(h1::Message::Item((bad, BodySize::Sized(0))))
                .await;
            return Ok(());
        }
    };
    drop(req);
    if framed
        .send(h1::Message::Item((response, BodySize::None)))
        .await
        .is_err()
    {
        return Ok(());
    }
    let (io, pending) = take_socket(framed);
    serve(io, pending).await;
    Ok(())
}

/// The socket out of the `Framed`; the HTTP codec and both of its buffers
/// are dropped here. Whatever the client sent after its request (normally
/// nothing: a client waits for the 101) is the start of its first frame and
/// is copied out (the read buffer's capacity is not kept).
fn take_socket(framed: Framed<TcpStream, h1::Codec>) -> (TcpStream, BytesMut) {
    let parts = framed.into_parts();
    let pending = if parts.read_buf.is_empty() {
        BytesMut::new()
    } else {
        BytesMut::from(&parts.read_buf[..])
    };
    (parts.io, pending)
}

/// What one read produced.
enum Step {
    /// Keep going; write these bytes first (possibly empty).
    Continue(BytesMut),
    /// Write these bytes (a close), then stop.
    Close(BytesMut),
    /// Peer gone or broken: stop.
    Stop,
}

/// Serves one upgraded connection. While idle it owns the socket, the codec
/// and an empty `pending` buffer (no allocation) and nothing else.
async fn serve(mut io: TcpStream, mut pending: BytesMut) {
    let mut codec = ws::Codec::new();
    if !pending.is_empty() {
        match decode(&mut codec, &mut pending, None) {
            Step::Continue(out) => {
                if !out.is_empty() && io.write_all(&out).await.is_err() {
                    return;
                }
            }
            Step::Close(out) => {
                let _ = io.write_all(&out).await;
                return;
            }
            Step::Stop => return,
        }
    }
    loop {
        if io.readable().await.is_err() {
            return;
        }
        let step = SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            scratch.clear();
            if !pending.is_empty() {
                scratch.extend_from_slice(&pending);
                pending = BytesMut::new();
            }
            scratch.reserve(READ_CHUNK);
            match io.try_read_buf(&mut *scratch) {
                Ok(0) => Step::Stop,
                Ok(_) => decode(&mut codec, &mut scratch, Some(&mut pending)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Spurious readiness: keep the partial frame, if any.
                    if !scratch.is_empty() {
                        pending = BytesMut::from(&scratch[..]);
                    }
                    Step::Continue(BytesMut::new())
                }
                Err(_) => Step::Stop,
            }
        });
        match step {
            Step::Continue(out) => {
                if !out.is_empty() && write_out(&mut io, out).await.is_err() {
                    return;
                }
            }
            Step::Close(out) => {
                let _ = write_out(&mut io, out).await;
                return;
            }
            Step::Stop => return,
        }
    }
}

/// Writes `out`, without waiting when the socket takes it all at once.
async fn write_out(io: &mut TcpStream, out: BytesMut) -> io::Result<()> {
    match io.try_write(&out) {
        Ok(n) if n == out.len() => Ok(()),
        Ok(n) => io.write_all(&out[n..]).await,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => io.write_all(&out).await,
        Err(e) => Err(e),
    }
}

/// Decodes every complete frame of `buf` and builds the answers. A partial
/// frame left over goes into `keep` (a fresh allocation the size of the
/// partial frame), or stays in `buf` when `keep` is `None`.
fn decode(codec: &mut ws::Codec, buf: &mut BytesMut, keep: Option<&mut BytesMut>) -> Step {
    let mut out = BytesMut::new();
    loop {
        match codec.decode(buf) {
            Ok(Some(ws::Frame::Text(_))) => {
                if codec
                    .encode(ws::Message::Text(CEILING_UPDATE.into()), &mut out)
                    .is_err()
                {
                    return Step::Stop;
                }
            }
            Ok(Some(ws::Frame::Ping(p))) => {
                if codec.encode(ws::Message::Pong(p), &mut out).is_err() {
                    return Step::Stop;
                }
            }
            Ok(Some(ws::Frame::Close(reason))) => {
                let _ = codec.encode(ws::Message::Close(reason), &mut out);
                return Step::Close(out);
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {
                let _ = codec.encode(ws::Message::Close(None), &mut out);
                return Step::Close(out);
            }
        }
    }
    if let Some(keep) = keep {
        if !buf.is_empty() {
            *keep = BytesMut::from(&buf[..]);
        }
    }
    Step::Continue(out)
}
