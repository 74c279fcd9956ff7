//! The binary's command line, configuration handling and start-up messages.

use std::{
    io::Read,
    path::Path,
    process::{Command, Stdio},
};

use crate::kit::{
    child::{binary, binary_path, Running, Spawn, Stderr},
    settings::Env,
};

/// Runs the binary to completion; (exit code, stderr). Storage goes to a
/// directory that must never be created unless `env` sets another.
fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(binary_path())
        .args(args)
        .env(
            "LINK_COUNTER__STORAGE__PATH",
            std::env::temp_dir().join("lc-never-created"),
        )
        .env("LINK_COUNTER__SERVER__BIND", "127.0.0.1:0")
        .env("LINK_COUNTER__ADMIN__BIND", "")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .output()
        .expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A configuration error: exit status 2, the first stderr line contains every
/// one of `first_line`, no panic, nothing created.
fn assert_config_error(args: &[&str], env: &[(&str, &str)], first_line: &[&str]) -> String {
    let (code, stderr) = run(args, env);
    assert_eq!(code, 2, "{args:?} {env:?}: {stderr}");
    let line = stderr.lines().next().unwrap_or_default();
    for part in first_line {
        assert!(
            line.contains(part),
            "{args:?} {env:?}: no {part:?} in {line:?}"
        );
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!std::env::temp_dir().join("lc-never-created").exists());
    stderr
}

/// The binary serving on port 0 (no admin listener) with storage in `data`,
/// its standard error collected; killed if the test fails before
/// [`Running::stop`].
fn start(data: &Path, env: &[(&str, &str)]) -> Running {
    let mut cmd = binary();
    Env::base(data).set("ADMIN__BIND", "").apply(&mut cmd);
    cmd.envs(env.iter().copied());
    Spawn::default()
        .admin_line(false)
        .stderr(Stderr::Collect)
        .start(cmd)
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
    let mut cmd = binary();
    cmd.args(["--config", file.to_str().expect("utf8")]);
    Env::base(&dir.path().join("data")).apply(&mut cmd);
    let running = Running::start(cmd);
    assert_eq!(running.addr.ip().to_string(), "127.0.0.1");
    assert_ne!(running.addr.port(), 9, "env override must win");
    assert!(dir.path().join("data").exists(), "storage.path applied");
    let (code, _) = running.stop();
    assert_eq!(code, 0);
}

/// A second instance on the data directory of a running one stops at once
/// (exit 1) saying which directory is in use and that another link-counter
/// probably runs on it, not sled's raw lock error; the first keeps serving.
#[test]
fn second_instance_on_the_same_data_dir_is_told_why() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let first = start(&data, &[]);
    let data_env = data.to_str().expect("utf8");
    let (code, stderr) = run(&[], &[("LINK_COUNTER__STORAGE__PATH", data_env)]);
    assert_eq!(code, 1, "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("link-counter: "))
        .unwrap_or_default();
    assert!(line.contains(data_env), "names the directory: {stderr}");
    assert!(
        line.contains("in use by another process") && line.contains("another link-counter"),
        "{stderr}"
    );
    assert!(!stderr.contains("WouldBlock"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // The first one was not disturbed.
    let mut conn = std::net::TcpStream::connect(first.addr).expect("first still serves");
    use std::io::Write;
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut answer = String::new();
    conn.read_to_string(&mut answer).expect("answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let (code, _) = first.stop();
    assert_eq!(code, 0);
}

/// A TOML syntax error names the file, line and column and shows the line;
/// a bad value in a file names the file and line of the key.
#[test]
fn toml_errors_name_the_file_and_line() {
    let dir = tempfile::tempdir().expect("tmp");
    let syntax = dir.path().join("syntax.toml");
    std::fs::write(&syntax, "[server]\nbind = \"127.0.0.1:0\"\nworkers = = 2\n").expect("write");
    let path = syntax.to_str().expect("utf8");
    let stderr = assert_config_error(&["--config", path], &[], &[path, "line 3, column 11"]);
    assert!(stderr.contains("workers = = 2"), "shows the line: {stderr}");

    let value = dir.path().join("value.toml");
    std::fs::write(&value, "# logs\n[log]\n\nformat = \"xml\"\n").expect("write");
    let path = value.to_str().expect("utf8");
    assert_config_error(
        &["--config", path],
        &[],
        &["log.format", "\"xml\"", &format!("{path}, line 4")],
    );

    let unknown = dir.path().join("unknown.toml");
    std::fs::write(&unknown, "[server]\nbnd = \"127.0.0.1:1\"\n").expect("write");
    let path = unknown.to_str().expect("utf8");
    assert_config_error(
        &["--config", path],
        &[],
        &["server.bnd", "line 2", "did you mean server.bind?"],
    );
}

/// An enum setting's error lists its valid values (not serde's "variant
/// constructor") and names the variable that set it.
#[test]
fn enum_settings_list_their_values() {
    let stderr = assert_config_error(
        &[],
        &[("LINK_COUNTER__LOG__FORMAT", "xml")],
        &[
            "log.format",
            "\"xml\"",
            "\"text\" or \"json\"",
            "LINK_COUNTER__LOG__FORMAT",
        ],
    );
    assert!(!stderr.contains("variant"), "{stderr}");
}

/// Origins and proxies are checked entry by entry, naming the key with its
/// index: a JSON array in an environment variable (which would otherwise be
/// one pattern that matches nothing), spaces, paths, bad CIDRs.
#[test]
fn origin_and_proxy_entries_are_checked() {
    const ORIGINS: &str = "LINK_COUNTER__SECURITY__ALLOWED_ORIGINS";
    const PROXIES: &str = "LINK_COUNTER__SECURITY__TRUSTED_PROXIES";
    let cases: &[(&str, &str, &[&str])] = &[
        (
            ORIGINS,
            r#"["https://a.example"]"#,
            &[
                r#"security.allowed_origins[0]: "[\"https://a.example\"]" is not an origin"#,
                "in an environment variable give a comma-separated list",
            ],
        ),
        (
            ORIGINS,
            r#"["https://a.example","https://b.example"]"#,
            &["security.allowed_origins[0]", "comma-separated list"],
        ),
        (
            ORIGINS,
            "https://ok.example,https://exa mple.com",
            &["security.allowed_origins[1]", "exa mple.com", "space"],
        ),
        (
            ORIGINS,
            "https://a.example/app",
            &["security.allowed_origins[0]", "path"],
        ),
        (
            PROXIES,
            r#"["10.0.0.0/8"]"#,
            &["security.trusted_proxies[0]", "comma-separated list"],
        ),
        (
            PROXIES,
            "10.0.0.0/8,10.0.0.0/33",
            &[
                "security.trusted_proxies[1]",
                "10.0.0.0/33",
                "not an IP network",
            ],
        ),
    ];
    for (var, value, first_line) in cases {
        let mut expected = first_line.to_vec();
        expected.push(var);
        assert_config_error(&[], &[(var, value)], &expected);
    }
}

/// A `LINK_COUNTER__` variable that is no setting is refused, naming it and
/// the nearest setting's variable.
#[test]
fn unknown_setting_variables_are_refused_with_the_nearest_name() {
    for var in ["LINK_COUNTER__SERVER__BND", "LINK_COUNTER__SERVR__BIND"] {
        assert_config_error(
            &[],
            &[(var, "127.0.0.1:0")],
            &[
                var,
                "not a setting",
                "did you mean LINK_COUNTER__SERVER__BIND?",
            ],
        );
    }
}

/// A variable that looks like a setting but is not one (one underscore,
/// lower case) is reported as ignored with the variable it should be, and
/// the server still starts; comma-separated lists with spaces are accepted.
#[test]
fn misnamed_variables_warn_and_the_server_starts() {
    let dir = tempfile::tempdir().expect("tmp");
    let running = start(
        &dir.path().join("data"),
        &[
            ("LINK_COUNTER_SERVER_BIND", "127.0.0.1:9"),
            ("link_counter__log__format", "json"),
            ("LINK_COUNTER_BIN", "/not/a/setting/but/tooling"),
            (
                "LINK_COUNTER__SECURITY__ALLOWED_ORIGINS",
                "https://a.example, *.b.example",
            ),
            (
                "LINK_COUNTER__SECURITY__TRUSTED_PROXIES",
                "10.0.0.0/8, 192.168.1.10",
            ),
        ],
    );
    assert!(
        running.addr.ip().to_string() == "127.0.0.1" && running.addr.port() != 9,
        "the misnamed variable is not applied: {}",
        running.addr
    );
    let (code, stderr) = running.stop();
    assert_eq!(code, 0, "{stderr}");
    let warning = |var: &str| {
        stderr
            .lines()
            .filter(|l| l.contains("WARN") && l.contains(&format!("variable {var} is ignored")))
            .collect::<Vec<_>>()
    };
    let single = warning("LINK_COUNTER_SERVER_BIND");
    assert_eq!(single.len(), 1, "{stderr}");
    assert!(
        single[0].contains("did you mean LINK_COUNTER__SERVER__BIND?"),
        "{stderr}"
    );
    let lower = warning("link_counter__log__format");
    assert_eq!(lower.len(), 1, "{stderr}");
    assert!(
        lower[0].contains("did you mean LINK_COUNTER__LOG__FORMAT?"),
        "{stderr}"
    );
    assert!(!stderr.contains("LINK_COUNTER_BIN"), "tooling: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A listener address that another process holds stops the binary (exit 1)
/// with one line naming the setting, its environment variable and the fix,
/// for the public listener and for the admin listener.
#[test]
fn a_port_in_use_names_the_setting_to_change() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf8");
    for (var, key) in [
        ("LINK_COUNTER__SERVER__BIND", "server.bind"),
        ("LINK_COUNTER__ADMIN__BIND", "admin.bind"),
    ] {
        let (code, stderr) = run(&[], &[(var, &addr), ("LINK_COUNTER__STORAGE__PATH", data)]);
        assert_eq!(code, 1, "{stderr}");
        let line = stderr
            .lines()
            .find(|l| l.starts_with("link-counter: "))
            .unwrap_or_default();
        assert!(line.contains(&format!("{key} {addr}")), "{stderr}");
        assert!(
            line.contains("another process listens there") && line.contains(var),
            "names the fix: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
