//! deploy/compose/compose.yaml with podman-compose: the single-node profile and the
//! cluster profile (two nodes, Redis and nginx with the visitor hash).

use std::{net::SocketAddr, process::Command, time::Duration};

use serde_json::Value;

use crate::{
    helpers::{counts, eventually_within, http_get, Client},
    support::{self, get_inside, podman, repo, run},
};

const PATIENCE: Duration = Duration::from_secs(120);

/// A compose project (its own name, so its containers, network and volumes are its
/// own), taken down with its volumes when dropped.
struct Project {
    name: String,
    profile: &'static str,
    port: u16,
    /// The override file, as an operator would write one for this machine.
    overrides: tempfile::TempDir,
}

impl Project {
    fn new(profile: &'static str) -> Project {
        // This machine: fewer open files per process than the compose file asks for, and
        // containers need an explicit process limit once a service sets any ulimit.
        let overrides = tempfile::tempdir().expect("tmp");
        let limits = format!(
            "{{ulimits: {{nofile: {}, nproc: 8192}}}}",
            support::nofile_limit()
        );
        let text =
            format!("services:\n  link-counter: {limits}\n  node1: {limits}\n  node2: {limits}\n");
        std::fs::write(overrides.path().join("compose.override.yaml"), text).expect("write");
        Project {
            name: format!("lc-compose-{profile}-{}", std::process::id()),
            profile,
            port: crate::kit::redis::free_port(),
            overrides,
        }
    }

    fn compose(&self) -> Command {
        let mut cmd = podman("podman-compose");
        cmd.current_dir(repo("deploy/compose"))
            .args(["--file", "compose.yaml", "--file"])
            .arg(self.overrides.path().join("compose.override.yaml"))
            .args(["--project-name", &self.name, "--profile", self.profile])
            .env("LINK_COUNTER_IMAGE", support::IMAGE)
            .env("LINK_COUNTER_PUBLISH", format!("127.0.0.1:{}", self.port));
        cmd
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `up -d` from the images there are (the test's build of the link-counter image,
    /// redis and nginx), then each service's container checked to be running (the exit
    /// status of podman-compose does not say).
    async fn up(&self, services: &[&str]) {
        let mut cmd = self.compose();
        cmd.args(["up", "--detach", "--no-build", "--pull", "never"]);
        // podman-compose waits forever for a dependency that failed to start.
        tokio::task::spawn_blocking(move || support::run_within(&mut cmd, PATIENCE))
            .await
            .expect("up");
        for service in services {
            let container = self.container(service);
            let state = support::inspect("container", &container);
            assert_eq!(
                state["State"]["Status"], "running",
                "{service}: {}",
                state["State"]
            );
        }
        let addr = self.addr();
        eventually_within(
            PATIENCE,
            "the published port to answer /healthz",
            || async move {
                tokio::net::TcpStream::connect(addr).await.is_ok()
                    && http_get(addr, "/healthz").await.0 == 200
            },
        )
        .await;
    }

    fn down(&self, volumes: bool) {
        let mut cmd = self.compose();
        cmd.arg("down");
        if volumes {
            cmd.arg("--volumes");
        }
        run(&mut cmd);
    }

    /// The container of `service` in this project.
    fn container(&self, service: &str) -> String {
        let names = run(podman("podman").args([
            "ps",
            "--all",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.name),
            "--filter",
            &format!("label=com.docker.compose.service={service}"),
            "--format",
            "{{.Names}}",
        ]));
        let names: Vec<&str> = names.lines().collect();
        assert_eq!(names.len(), 1, "{service}: containers {names:?}");
        names[0].to_owned()
    }

    fn ws(&self, page: &str, visitor: &str) -> String {
        format!("ws://{}/parties/page/{page}?visitor={visitor}", self.addr())
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let mut cmd = self.compose();
        let _ = support::output(cmd.args(["down", "--volumes"]));
    }
}

/// A node's own figures, asked inside its container (the nodes publish no port).
fn node_json(container: &str, path: &str) -> Value {
    let (status, body) = get_inside(container, path);
    assert_eq!(status, 200, "{container} {path}: {body}");
    serde_json::from_str(&body).expect("JSON")
}

fn compose_tools(test: &str) -> bool {
    support::can_run(
        test,
        &["podman", "runc", "podman-compose", "debootstrap", "strip"],
        true,
    )
}

/// The single-node profile: the service on the published port, its data in the named
/// volume across `down` and `up`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_single_profile_keeps_its_data_in_the_named_volume() {
    if !compose_tools("the compose single-node test") {
        return;
    }
    tokio::task::spawn_blocking(support::image)
        .await
        .expect("image");
    let project = Project::new("single");
    project.up(&["link-counter"]).await;
    let page = "install-single";
    let viewer = Client::connect(&project.ws(page, "visitor-1")).await;
    let mut observer = Client::connect(&project.ws("install-observer", "visitor-2")).await;
    observer.subscribe(&[page]).await;
    observer.wait_for(&counts(&[(page, 1)])).await;
    drop((viewer, observer));

    project.down(false);
    project.up(&["link-counter"]).await;
    let (status, body) = http_get(project.addr(), &format!("/api/v1/pages/{page}")).await;
    assert_eq!(status, 200, "{body}");
    let stats: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(stats["total_connections"], 1, "{stats}");
}

/// The cluster profile through its nginx: viewers spread over both nodes by their
/// visitor ids, and each node (and a subscriber through nginx) counts them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_cluster_profile_sums_viewers_of_both_nodes_through_nginx() {
    if !compose_tools("the compose cluster test") {
        return;
    }
    tokio::task::spawn_blocking(support::image)
        .await
        .expect("image");
    let project = Project::new("cluster");
    project.up(&["node1", "node2", "redis", "nginx"]).await;
    let nodes = [project.container("node1"), project.container("node2")];

    let page = "install-cluster";
    let mut viewers = Vec::new();
    for n in 1..=6 {
        viewers.push(Client::connect(&project.ws(page, &format!("visitor-{n}"))).await);
    }
    let mut observer = Client::connect(&project.ws("install-observer", "visitor-0")).await;
    observer.subscribe(&[page]).await;
    observer.wait_for(&counts(&[(page, 6)])).await;

    // The hash put some viewers on each node (the ids are fixed, so the split is too),
    // and each node's figure for the page is the cluster's: all six.
    let local: Vec<u64> = nodes
        .iter()
        .map(|c| {
            node_json(c, "/api/v1/stats")["connections"]
                .as_u64()
                .expect("connections")
        })
        .collect();
    assert_eq!(
        local.iter().sum::<u64>(),
        7,
        "per node {local:?} (six viewers, one observer)"
    );
    assert!(
        local.iter().all(|n| *n > 0),
        "one node has every viewer: {local:?}"
    );
    for node in &nodes {
        eventually_within(
            PATIENCE,
            "the node to count the cluster's viewers",
            || async { node_json(node, &format!("/api/v1/counts?ids={page}"))[page] == 6 },
        )
        .await;
    }

    // A viewer leaving is seen everywhere.
    viewers.pop().expect("a viewer").close().await;
    observer.wait_for(&counts(&[(page, 5)])).await;
    for node in &nodes {
        eventually_within(PATIENCE, "the node to count five", || async {
            node_json(node, &format!("/api/v1/counts?ids={page}"))[page] == 5
        })
        .await;
    }
}

/// The directives of an nginx file that carry the balancing and proxying: the `map`
/// blocks, the upstream's `hash`, the `proxy_*` lines (comments dropped).
fn proxying(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut in_map = false;
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.starts_with("map ") {
            in_map = true;
        }
        if in_map || line.starts_with("proxy_") || line.starts_with("hash ") {
            lines.push(line.split_whitespace().collect::<Vec<_>>().join(" "));
        }
        if line == "}" {
            in_map = false;
        }
    }
    lines.sort();
    lines.dedup();
    lines
}

/// The compose file's nginx balances and proxies as the shipped nginx file does.
#[test]
fn compose_nginx_proxies_as_the_shipped_nginx_file() {
    let read = |p: &str| std::fs::read_to_string(repo(p)).expect("read");
    let shipped = proxying(&read("deploy/nginx/link-counter.conf"));
    assert!(
        shipped.iter().any(|l| l.starts_with("hash ")),
        "{shipped:?}"
    );
    assert_eq!(proxying(&read("deploy/compose/nginx.conf")), shipped);
}
