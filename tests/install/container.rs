//! The container image of deploy/container/Containerfile, run with podman.

use std::{net::SocketAddr, time::Duration};

use serde_json::Value;

use crate::{
    helpers::{counts, eventually_within, http_get, Client},
    support::{self, get_inside, inspect, podman, run},
};

/// Container starts, stops and image builds on a busy machine.
const PATIENCE: Duration = Duration::from_secs(120);

/// A container and its named volume, removed when dropped.
pub struct Container {
    pub name: String,
    volume: String,
}

impl Container {
    /// `podman run -d` of `image` with the volume at /data and port 1999 published on
    /// a free loopback port.
    fn run(name: &str, volume: &str, image: &str) -> (Container, SocketAddr) {
        run(podman("podman")
            .args([
                "run",
                "--detach",
                "--name",
                name,
                "--network",
                &network(name),
            ])
            .args(["--publish", "127.0.0.1::1999"])
            .args(["--volume", &format!("{volume}:/data")])
            .arg(image));
        let container = Container {
            name: name.to_owned(),
            volume: volume.to_owned(),
        };
        let port = run(podman("podman").args(["port", name, "1999/tcp"]));
        let addr = port.trim().parse().expect("podman port: an address");
        (container, addr)
    }

    fn remove(&self) {
        let _ = support::output(podman("podman").args(["rm", "--force", &self.name]));
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        self.remove();
        let _ = support::output(podman("podman").args(["volume", "rm", "--force", &self.volume]));
        let _ = support::output(podman("podman").args(["network", "rm", &network(&self.name)]));
    }
}

/// The container's own network (created if missing): a network of podman's default
/// subnet can be shadowed on the host by a stale bridge of another network backend.
fn network(container: &str) -> String {
    let name = format!("{container}-net");
    let exists = support::output(podman("podman").args(["network", "exists", &name]));
    if !exists.status.success() {
        run(podman("podman").args(["network", "create", &name]));
    }
    name
}

async fn healthy(addr: SocketAddr) {
    eventually_within(
        PATIENCE,
        "the container to answer /healthz",
        || async move {
            tokio::net::TcpStream::connect(addr).await.is_ok()
                && http_get(addr, "/healthz").await.0 == 200
        },
    )
    .await;
}

/// The image: its metadata, the service in it serving as a non-root user, counting a
/// viewer, draining on SIGTERM (the exit status of a process that exited by itself,
/// not the runtime's SIGKILL), and the data kept on the volume for the next container.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_serves_as_non_root_drains_on_sigterm_and_keeps_its_volume() {
    if !support::can_run(
        "the container image test",
        &["podman", "runc", "debootstrap", "strip"],
        true,
    ) {
        return;
    }
    let image = tokio::task::spawn_blocking(support::image)
        .await
        .expect("image");

    let meta = inspect("image", image);
    let config = &meta["Config"];
    let labels = &config["Labels"];
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION"),
        "the version label is Cargo.toml's"
    );
    assert_eq!(
        labels["org.opencontainers.image.licenses"],
        env!("CARGO_PKG_LICENSE")
    );
    assert_eq!(
        labels["org.opencontainers.image.source"],
        "https://example.org/link-counter"
    );
    assert_eq!(config["User"], "10001:10001");
    assert!(config["ExposedPorts"].get("1999/tcp").is_some(), "{config}");
    assert!(config["Volumes"].get("/data").is_some(), "{config}");
    // Docker has it in Config, podman at the top.
    let check = [&config["Healthcheck"], &meta["Healthcheck"]]
        .iter()
        .map(|h| h["Test"].to_string())
        .collect::<String>();
    assert!(check.contains("/healthz"), "health check: {check}");
    eprintln!(
        "image {image}: {:.1} MB",
        meta["Size"].as_u64().expect("size") as f64 / 1e6
    );

    let name = format!("lc-image-test-{}", std::process::id());
    let volume = format!("{name}-data");
    let (container, addr) = Container::run(&name, &volume, image);
    healthy(addr).await;
    // The image's own HEALTHCHECK, as the runtime runs it.
    run(podman("podman").args(["healthcheck", "run", &name]));

    // The service runs as the image's user, not root: the process's real uid on the host.
    let pid = inspect("container", &name)["State"]["Pid"]
        .as_u64()
        .expect("pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .expect("Uid line");
    assert_eq!(
        uid.split_whitespace().collect::<Vec<_>>(),
        ["10001"; 4],
        "{uid}"
    );

    let page = "install-image";
    let viewer = Client::connect(&format!("ws://{addr}/parties/page/{page}")).await;
    let mut observer = Client::connect(&format!("ws://{addr}/parties/page/install-observer")).await;
    observer.subscribe(&[page]).await;
    observer.wait_for(&counts(&[(page, 1)])).await;
    let (status, body) = get_inside(&name, &format!("/api/v1/counts?ids={page}"));
    assert_eq!((status, body.as_str()), (200, r#"{"install-image":1}"#));

    // SIGTERM (podman stop) with a stop timeout far above server.shutdown_timeout:
    // the clients get 1001 and the process exits 0 by itself.
    let closes = tokio::spawn(async move {
        let (mut viewer, mut observer) = (viewer, observer);
        (viewer.expect_close().await, observer.expect_close().await)
    });
    let stop_name = name.clone();
    tokio::task::spawn_blocking(move || {
        run(podman("podman").args(["stop", "--time", "60", &stop_name]))
    })
    .await
    .expect("stop");
    assert_eq!(closes.await.expect("closes"), (1001, 1001));
    let state = &inspect("container", &name)["State"];
    assert_eq!(state["ExitCode"], 0, "{state}");
    let logs =
        String::from_utf8_lossy(&support::output(podman("podman").args(["logs", &name])).stderr)
            .into_owned();
    assert!(logs.contains("SIGTERM received"), "{logs}");

    // A new container on the same volume has the page's stats.
    container.remove();
    let (_second, addr) = Container::run(&name, &volume, image);
    healthy(addr).await;
    let (status, body) = http_get(addr, &format!("/api/v1/pages/{page}")).await;
    assert_eq!(status, 200, "{body}");
    let stats: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(stats["total_connections"], 1, "{stats}");
    assert_eq!(stats["peak_connections"], 1, "{stats}");
    assert_eq!(stats["connections"], 0, "{stats}");
}
