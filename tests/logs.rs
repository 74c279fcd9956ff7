//! Logs of the real binary in JSON mode (`log.format = "json"`): every line
//! is a JSON object with the documented fields (see `src/logging.rs`).

#[path = "kit/mod.rs"]
#[allow(dead_code)] // each target uses a part of the kit
mod kit;

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest, Message};

const PATIENCE: Duration = Duration::from_secs(10);

/// A valid visitor id and an invalid one (a character outside the set).
const VISITOR: &str = "Zq7-visitor-never-logged";
const INVALID_VISITOR: &str = "Zq7.invalid.never.logged";

/// JSON mode: the startup summary, one `debug` line per connection open and
/// close (with its reason), one `info` line per refusal; each line parses
/// and has `timestamp`, `level`, `target` and `message`. Visitor ids, valid
/// or not, appear in no line, even with every module at `debug`.
#[tokio::test(flavor = "multi_thread")]
async fn json_logs_have_the_documented_fields() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut cmd = kit::child::binary();
    cmd.env_remove("RUST_LOG");
    kit::settings::Env::base(dir.path())
        .set("LOG__FORMAT", "json")
        .set("LOG__FILTER", "info,link_counter=debug")
        .set("SECURITY__ALLOWED_ORIGINS", "https://ok.example")
        .apply(&mut cmd);
    let mut child = kit::child::Spawn::default()
        .stderr(kit::child::Stderr::Lines)
        .start(cmd);
    let addr = child.addr;
    let rx = child.stderr_lines();

    // One refusal, one connection opened and closed cleanly.
    let mut req = format!("ws://{addr}/parties/page/p")
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("Origin", "https://evil.example".parse().expect("header"));
    assert!(matches!(
        tokio_tungstenite::connect_async(req).await,
        Err(tungstenite::Error::Http(_))
    ));
    // An invalid visitor id first (its connection is told, not refused), then
    // the clean connection with a valid one.
    let (mut bad, _) = tokio_tungstenite::connect_async(format!(
        "ws://{addr}/parties/page/p?visitor={INVALID_VISITOR}"
    ))
    .await
    .expect("connect");
    let error = tokio::time::timeout(PATIENCE, bad.next())
        .await
        .expect("a message in time");
    assert!(
        matches!(&error, Some(Ok(Message::Text(t))) if t.contains("invalid_visitor")),
        "{error:?}"
    );
    drop(bad);
    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
        "ws://{addr}/parties/page/p?_pk=pk1&visitor={VISITOR}"
    ))
    .await
    .expect("connect");
    ws.send(Message::Close(None)).await.expect("close");
    // Wait for the server's side of the close handshake.
    while let Ok(Some(Ok(m))) = tokio::time::timeout(PATIENCE, ws.next()).await {
        if m.is_close() {
            break;
        }
    }
    drop(ws);

    let mut lines: Vec<Value> = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    while lines
        .iter()
        .filter(|l| l["message"] == "disconnected")
        .count()
        < 2
    {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no two `disconnected` lines; got {lines:#?}"));
        for id in [VISITOR, INVALID_VISITOR] {
            assert!(!line.contains(id), "a visitor id in the logs: {line}");
        }
        let v: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        for field in ["timestamp", "level", "target", "message"] {
            assert!(v[field].is_string(), "{field} missing in {line}");
        }
        lines.push(v);
    }
    child.kill9();

    let find = |msg: &str| {
        lines
            .iter()
            .find(|l| l["message"] == msg)
            .unwrap_or_else(|| panic!("no {msg:?} line in {lines:#?}"))
            .clone()
    };
    let settings = find("settings");
    assert_eq!(settings["level"], "INFO");
    assert_eq!(settings["bind"], "127.0.0.1:0");
    assert!(settings["max_connections"].is_number(), "{settings}");
    let refused = find("origin not allowed; upgrade refused");
    assert_eq!(refused["level"], "INFO");
    assert_eq!(refused["origin"], "https://evil.example");
    let connected = lines
        .iter()
        .find(|l| l["message"] == "connected" && l["pk"] == "pk1")
        .unwrap_or_else(|| panic!("no `connected` line of pk1 in {lines:#?}"))
        .clone();
    assert_eq!(connected["level"], "DEBUG");
    assert_eq!(connected["target"], "link_counter::session");
    assert_eq!(connected["page"], "p");
    assert!(connected["conn"].is_number(), "{connected}");
    let disconnected = lines
        .iter()
        .find(|l| l["message"] == "disconnected" && l["conn"] == connected["conn"])
        .unwrap_or_else(|| panic!("no `disconnected` line of pk1 in {lines:#?}"));
    assert_eq!(disconnected["reason"], "client_close");
    assert!(
        chrono_like(settings["timestamp"].as_str().expect("timestamp")),
        "{settings}"
    );
}

/// `2026-01-02T03:04:05.678Z`-shaped (RFC 3339, UTC).
fn chrono_like(ts: &str) -> bool {
    ts.len() >= 20 && ts.as_bytes()[4] == b'-' && ts.as_bytes()[10] == b'T' && ts.ends_with('Z')
}
