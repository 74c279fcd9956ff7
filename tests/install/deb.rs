//! The Debian package of deploy/debian/build-deb.sh: installed with dpkg on this
//! machine (as root), run as its unit would run it, removed and purged. The test
//! leaves the machine as it found it: no package, no user, no data directory.

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
    process::Command,
};

use crate::{
    helpers::{counts, http_get, Client},
    kit::child::{Running, Spawn, Stderr},
    support::{self, output, repo, run},
};

const DATA: &str = "/var/lib/link-counter";
const CONFIG: &str = "/etc/link-counter/config.toml";
const UNIT: &str = "/lib/systemd/system/link-counter.service";

fn installed() -> bool {
    let out = output(Command::new("dpkg-query").args(["-W", "-f", "${Status}", "link-counter"]));
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains("installed")
}

fn user() -> Option<Vec<String>> {
    let out = output(Command::new("getent").args(["passwd", "link-counter"]));
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .split(':')
            .map(String::from)
            .collect()
    })
}

/// Purges the package and removes its user and data directory when dropped.
struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = output(Command::new("dpkg").args(["--purge", "link-counter"]));
        let _ = std::fs::remove_dir_all(DATA);
        let _ = output(Command::new("userdel").arg("link-counter"));
        let _ = output(Command::new("groupdel").arg("link-counter"));
    }
}

/// The installed binary, started as the unit starts it: as the service user, in the
/// data directory, with the installed configuration (ports moved to free ones);
/// its standard error shown if it does not start.
fn start_service() -> Running {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid",
        "link-counter",
        "--regid",
        "link-counter",
        "--init-groups",
    ])
    .args(["/usr/bin/link-counter", "--config", CONFIG])
    .current_dir(DATA)
    .env("LINK_COUNTER__SERVER__BIND", "127.0.0.1:0")
    .env("LINK_COUNTER__ADMIN__BIND", "127.0.0.1:0");
    Spawn::default().stderr(Stderr::Collect).start(cmd)
}

fn files_under(dir: &Path) -> Vec<std::fs::Metadata> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read_dir") {
        let entry = entry.expect("entry");
        let meta = entry.metadata().expect("metadata");
        if meta.is_dir() {
            all.extend(files_under(&entry.path()));
        }
        all.push(meta);
    }
    all
}

/// `dpkg -i`: binary, unit, conffile, user and data directory where the brief says;
/// the binary runs with the installed configuration as the user and writes only its
/// data directory; `dpkg --remove` keeps the configuration, `--purge` removes it and
/// keeps the data and the user who owns it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_debian_package_installs_runs_and_purges_keeping_the_data() {
    let tools = [
        "dpkg-deb", "dpkg", "objdump", "strip", "adduser", "setpriv", "userdel",
    ];
    if !support::can_run("the Debian package test", &tools, true) {
        return;
    }
    assert!(
        !installed() && user().is_none() && !Path::new(DATA).exists(),
        "link-counter is installed here (package, user or {DATA}): this test installs and purges it, so remove it first"
    );
    let _cleanup = Cleanup;

    let binary = tokio::task::spawn_blocking(support::release_binary)
        .await
        .expect("binary");
    let dir = tempfile::tempdir().expect("tmp");
    let deb = run(Command::new("bash")
        .arg(repo("deploy/debian/build-deb.sh"))
        .arg(binary)
        .arg(dir.path()));
    let deb = deb.trim();
    let field = |name: &str| run(Command::new("dpkg-deb").args(["--field", deb, name]));
    assert_eq!(field("Version").trim(), env!("CARGO_PKG_VERSION"));
    assert!(
        field("Depends").contains("libc6 (>= 2."),
        "{}",
        field("Depends")
    );
    eprintln!(
        "{deb}: {} KB",
        std::fs::metadata(deb).expect("deb").len() / 1024
    );
    run(Command::new("dpkg").args(["--install", deb]));

    // The files.
    let bin = std::fs::metadata("/usr/bin/link-counter").expect("/usr/bin/link-counter");
    assert_eq!(bin.permissions().mode() & 0o777, 0o755);
    let unit = std::fs::read_to_string(UNIT).expect("the unit");
    let shipped =
        std::fs::read_to_string(repo("deploy/systemd/link-counter.service")).expect("unit");
    let body = |text: &str| text[text.find("[Unit]").expect("[Unit]")..].to_owned();
    assert_eq!(
        body(&unit),
        body(&shipped).replace("ExecStart=/usr/local/bin/", "ExecStart=/usr/bin/"),
        "the packaged unit is deploy/systemd/link-counter.service with the binary in /usr/bin"
    );
    if Path::new("/usr/bin/systemd-analyze").exists() {
        let out = output(Command::new("systemd-analyze").args(["verify", UNIT]));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !stderr.contains("link-counter.service"),
            "systemd-analyze verify:\n{stderr}"
        );
    }
    let conffiles =
        run(Command::new("dpkg-query").args(["--control-show", "link-counter", "conffiles"]));
    assert_eq!(conffiles.trim(), CONFIG);
    assert_eq!(
        std::fs::read_to_string(CONFIG).expect("config"),
        std::fs::read_to_string(repo("deploy/config.example.toml")).expect("example")
    );

    // The user and its data directory.
    let passwd = user().expect("the link-counter user");
    let uid: u32 = passwd[2].parse().expect("uid");
    assert!(uid < 1000, "a system user: {passwd:?}");
    assert_eq!(passwd[5], DATA, "{passwd:?}");
    assert_eq!(passwd[6], "/usr/sbin/nologin", "{passwd:?}");
    let data = std::fs::metadata(DATA).expect("data dir");
    assert_eq!((data.uid(), data.mode() & 0o777), (uid, 0o700));

    // The installed binary with the installed configuration, as the unit runs it.
    let service = tokio::task::spawn_blocking(start_service)
        .await
        .expect("start");
    let addr = service.addr;
    assert_eq!(http_get(addr, "/healthz").await.0, 200);
    let page = "install-deb";
    let viewer = Client::connect(&format!("ws://{addr}/parties/page/{page}")).await;
    let mut observer = Client::connect(&format!("ws://{addr}/parties/page/install-observer")).await;
    observer.subscribe(&[page]).await;
    observer.wait_for(&counts(&[(page, 1)])).await;
    drop((viewer, observer));
    let code = tokio::task::spawn_blocking(move || service.stop().0)
        .await
        .expect("stop");
    assert_eq!(code, 0, "exit status after SIGTERM");
    let written = files_under(Path::new(DATA));
    assert!(!written.is_empty(), "nothing written to {DATA}");
    assert!(
        written.iter().all(|m| m.uid() == uid),
        "files in {DATA} not the user's"
    );

    // Remove: the configuration (edited here) stays; purge: it goes, the data stays.
    let edited = format!(
        "{}\n# edited\n",
        std::fs::read_to_string(CONFIG).expect("config")
    );
    std::fs::write(CONFIG, &edited).expect("edit config");
    run(Command::new("dpkg").args(["--remove", "link-counter"]));
    assert!(!Path::new("/usr/bin/link-counter").exists() && !Path::new(UNIT).exists());
    assert_eq!(std::fs::read_to_string(CONFIG).expect("kept"), edited);
    run(Command::new("dpkg").args(["--purge", "link-counter"]));
    assert!(!installed());
    assert!(
        !Path::new("/etc/link-counter").exists(),
        "purge keeps /etc/link-counter"
    );
    assert_eq!(
        files_under(Path::new(DATA)).len(),
        written.len(),
        "purge touched the data"
    );
    assert!(user().is_some(), "purge keeps the user who owns {DATA}");
}
