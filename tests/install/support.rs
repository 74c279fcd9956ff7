//! What the install tests share: the skip rule, commands, the release binary and
//! the image built around it.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
};

/// A path in the repository.
pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether `test` can run here: every tool on PATH, and root when `root`. When not,
/// prints why and returns false, or panics if `LINK_COUNTER_REQUIRE_INSTALL_TOOLS`
/// is set (CI installs them all).
pub fn can_run(test: &str, tools: &[&str], root: bool) -> bool {
    let mut missing: Vec<String> = tools
        .iter()
        .filter(|t| !on_path(t))
        .map(|t| t.to_string())
        .collect();
    if root && !is_root() {
        missing.push("root".into());
    }
    if missing.is_empty() {
        return true;
    }
    let required = std::env::var_os("LINK_COUNTER_REQUIRE_INSTALL_TOOLS").is_some();
    assert!(
        !required,
        "{test}: missing {} (LINK_COUNTER_REQUIRE_INSTALL_TOOLS is set; .ci/run installs them)",
        missing.join(", ")
    );
    eprintln!("skipped {test}: missing {}", missing.join(", "));
    false
}

/// Runs `cmd` and returns its stdout; panics with its stderr unless it succeeds.
pub fn run(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// [`run`], killing `cmd` if it has not finished within `patience`.
pub fn run_within(cmd: &mut Command, patience: std::time::Duration) -> String {
    use std::io::Read;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?} does not start: {e}"));
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = pipe.read_to_end(&mut text);
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("stderr")));
    let deadline = std::time::Instant::now() + patience;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let (stdout, stderr) = (
        stdout.join().expect("stdout"),
        stderr.join().expect("stderr"),
    );
    match status {
        Some(status) if status.success() => stdout,
        Some(status) => panic!("{cmd:?} failed ({status}):\n{stdout}\n{stderr}"),
        None => panic!("{cmd:?} did not finish within {patience:?}:\n{stdout}\n{stderr}"),
    }
}

/// Runs `cmd` to completion, whatever its status.
pub fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("{cmd:?} does not start: {e}"))
}

/// The hard limit of open files of this process (what a container may have here).
pub fn nofile_limit() -> u64 {
    rlimit::getrlimit(rlimit::Resource::NOFILE)
        .expect("getrlimit")
        .1
}

/// The settings podman needs here (runc, cgroupfs, a file event log, netavark with
/// its DNS for the compose services' names, the open-file limit a process may have),
/// as the containers.conf of every podman the tests start.
fn containers_conf() -> &'static Path {
    static CONF: OnceLock<PathBuf> = OnceLock::new();
    CONF.get_or_init(|| {
        let hard = nofile_limit();
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("containers.conf");
        let text = format!(
            "[containers]\ndefault_ulimits = [\"nofile={hard}:{hard}\", \"nproc=8192:8192\"]\n\
             [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
             [network]\nnetwork_backend = \"netavark\"\n"
        );
        std::fs::write(&path, text).expect("write containers.conf");
        path
    })
}

/// `podman` (or `podman-compose`, which runs podman) with the tests' containers.conf.
pub fn podman(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("CONTAINERS_CONF", containers_conf());
    cmd
}

/// The release binary the install paths ship: `LINK_COUNTER_INSTALL_BINARY` when set
/// (CI sets it to the release-profile binary its benchmark build makes, to spare a
/// second release build), else target/release/link-counter built now (`cargo build
/// --release`, a no-op when it is up to date). Once per test process.
pub fn release_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        if let Some(binary) = std::env::var_os("LINK_COUNTER_INSTALL_BINARY") {
            let binary = repo("").join(binary);
            assert!(
                binary.is_file(),
                "LINK_COUNTER_INSTALL_BINARY: no file {}",
                binary.display()
            );
            return binary;
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        run(Command::new(cargo)
            .args(["build", "--release", "--locked", "--bin", "link-counter"])
            .current_dir(env!("CARGO_MANIFEST_DIR")));
        let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .expect("target dir");
        let binary = target.join("release").join("link-counter");
        assert!(binary.is_file(), "{} was not built", binary.display());
        binary
    })
}

/// The image the tests run: deploy/container/Containerfile's `prebuilt` stage around
/// [`release_binary`], built once per test process over the previous run's.
pub const IMAGE: &str = "localhost/link-counter:test";

pub fn image() -> &'static str {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        run(podman("bash").arg(repo("tests/install/stand-ins.sh")));
        let context = tempfile::tempdir().expect("tmp");
        // Without debug info, as the Containerfile's build stage leaves it.
        run(Command::new("strip")
            .arg("--strip-debug")
            .arg(release_binary())
            .arg("-o")
            .arg(context.path().join("link-counter")));
        std::fs::create_dir_all(context.path().join("deploy/container")).expect("mkdir");
        std::fs::copy(
            repo("deploy/container/config.toml"),
            context.path().join("deploy/container/config.toml"),
        )
        .expect("copy");
        let _ = output(podman("podman").args(["rmi", "--force", IMAGE]));
        // The docker format keeps HEALTHCHECK (the OCI format has no such field).
        run(podman("podman")
            .args([
                "build", "--quiet", "--format", "docker", "--target", "prebuilt",
            ])
            .args(["--build-arg", "SOURCE_URL=https://example.org/link-counter"])
            .arg("--file")
            .arg(repo("deploy/container/Containerfile"))
            .args(["--tag", IMAGE])
            .arg(context.path()));
    });
    IMAGE
}

/// `podman inspect` (of a container or an image) as JSON.
pub fn inspect(what: &str, name: &str) -> serde_json::Value {
    let text = run(podman("podman").args([what, "inspect", name]));
    let all: serde_json::Value = serde_json::from_str(&text).expect("inspect JSON");
    all[0].clone()
}

/// `GET path` on 127.0.0.1:1999 inside a running container (bash and /dev/tcp: the
/// images have no curl); (status, body).
pub fn get_inside(container: &str, path: &str) -> (u16, String) {
    let out = output(podman("podman").args([
        "exec",
        container,
        "bash",
        "-c",
        "exec 3<>/dev/tcp/127.0.0.1/1999 && printf 'GET %s HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' \"$0\" >&3 && cat <&3",
        path,
    ]));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
