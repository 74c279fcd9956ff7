//! The binary's command line and configuration handling.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_link-counter"))
        .args(args)
        .envs(env.iter().copied())
        .env(
            "LINK_COUNTER__STORAGE__PATH",
            std::env::temp_dir().join("lc-never-created"),
        )
        .output()
        .expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An invalid or unreadable config prints one clear line naming the key and
/// exits non-zero before binding anything.
#[test]
fn invalid_config_names_the_key_and_exits() {
    let dir = tempfile::tempdir().expect("tmp");
    let bad_toml = dir.path().join("bad.toml");
    std::fs::write(&bad_toml, "[websocket]\nheartbeat_interval = \"soon\"\n").expect("write");
    let unknown = dir.path().join("unknown.toml");
    std::fs::write(&unknown, "[server]\nbnd = \"127.0.0.1:1\"\n").expect("write");
    let missing = dir.path().join("missing.toml");
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec!["--config", bad_toml.to_str().expect("utf8")],
            vec![],
            "heartbeat_interval",
        ),
        (
            vec!["--config", unknown.to_str().expect("utf8")],
            vec![],
            "bnd",
        ),
        (
            vec!["--config", missing.to_str().expect("utf8")],
            vec![],
            "missing.toml",
        ),
        (
            vec![],
            vec![("LINK_COUNTER__SERVER__BIND", "nowhere")],
            "server.bind",
        ),
        (
            vec![],
            vec![("LINK_COUNTER__ADMIN__BIND", "nowhere")],
            "admin.bind",
        ),
        (
            vec![],
            vec![("LINK_COUNTER__LOG__FILTER", "link_counter=loud")],
            "log.filter",
        ),
        (vec![], vec![("LINK_COUNTER__LOG__FORMAT", "xml")], "xml"),
        (
            vec![],
            vec![("LINK_COUNTER__COUNTER__BROADCAST_INTERVAL", "0s")],
            "counter.broadcast_interval",
        ),
        (
            vec![],
            vec![("LINK_COUNTER__WEBSOCKET__CLIENT_TIMEOUT", "1s")],
            "websocket.client_timeout",
        ),
        (vec!["--bogus"], vec![], "--bogus"),
    ];
    for (args, env, key) in cases {
        let (code, stderr) = run(&args, &env);
        assert_ne!(code, 0, "{args:?} {env:?} should fail");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(
            !lines.is_empty() && lines[0].contains(key),
            "{args:?} {env:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // Nothing was created: it stopped before touching storage or a port.
    assert!(!std::env::temp_dir().join("lc-never-created").exists());
}

/// `--config FILE` and environment overrides are both applied (env wins),
/// and SIGTERM stops the binary with exit status 0.
#[test]
fn config_file_and_env_override_apply() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("lc.toml");
    std::fs::write(&file, "[server]\nbind = \"127.0.0.1:9\"\n").expect("write");
    let mut child = Command::new(env!("CARGO_BIN_EXE_link-counter"))
        .args(["--config", file.to_str().expect("utf8")])
        .env("LINK_COUNTER__SERVER__BIND", "127.0.0.1:0")
        .env("LINK_COUNTER__ADMIN__BIND", "127.0.0.1:0")
        .env("LINK_COUNTER__STORAGE__PATH", dir.path().join("data"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("line");
    assert!(line.starts_with("listening on 127.0.0.1:"), "{line}");
    assert!(!line.contains(":9\n"), "env override must win: {line}");
    assert!(dir.path().join("data").exists(), "storage.path applied");
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            assert_eq!(s.code(), Some(0));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "did not exit on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
