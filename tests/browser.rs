//! Real-browser tests: runs `tests/browser/run.mjs`, `fallback.mjs` and `dashboard.mjs` (Node, playwright-core
//! driving Debian's `/usr/bin/chromium`, npm `partysocket`) against the real
//! binary. A separate test target, so `cargo test --test api` stays fast.
//!
//! Needs `node`, `npm` and `apt-get install -y chromium`; the browser is never
//! downloaded. `npm ci` runs in `tests/browser` when `node_modules` is missing.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

const CHROMIUM: &str = "/usr/bin/chromium";

fn harness_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// Checks the prerequisites, runs `npm ci` if needed, then runs `script`
/// with Node against the real binary and fails the test if it fails.
fn run_node(script: &str) {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: the browser tests need Debian's chromium; \
         run `apt-get install -y chromium` (never `npx playwright install`)"
    );
    let dir = harness_dir();
    if !dir.join("node_modules").exists() {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status()
            .unwrap_or_else(|e| panic!("cannot run npm (install Node.js and npm): {e}"));
        assert!(status.success(), "npm ci in {} failed", dir.display());
    }
    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser-artifacts");
    let mut cmd = Command::new("node");
    cmd.arg(dir.join(script))
        .current_dir(&dir)
        .env("LINK_COUNTER_BIN", env!("CARGO_BIN_EXE_link-counter"))
        .env("LINK_COUNTER_ARTIFACTS", &artifacts)
        .env("CHROMIUM", CHROMIUM);
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run node (install Node.js 20+): {e}"));
    println!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "browser tests ({script}) failed ({}); failure screenshots are in {}",
        out.status,
        artifacts.display()
    );
}

/// The demo, the drop-in embed and `link-counter.js` in a real browser:
/// live badges, restart without reload, runtime link changes, PartySocket
/// interoperability (see the steps in `tests/browser/run.mjs`).
#[test]
fn browser() {
    run_node("run.mjs");
}

/// The embed's event-stream fallback in a real browser through the shipped
/// nginx file over TLS: a WebSocket as shipped, live exact counts over the
/// event stream with upgrades stripped (`tests/browser/fallback.mjs`; needs
/// nginx and openssl, as `tests/api/nginx.rs` does).
#[test]
fn fallback() {
    run_node("fallback.mjs");
}

/// The operator dashboard in a real browser: it shows the total and the top
/// pages and follows viewers opening and closing (`tests/browser/dashboard.mjs`).
#[test]
fn dashboard() {
    run_node("dashboard.mjs");
}
