//! A real nginx, configured with the shipped `deploy/nginx/link-counter.conf`,
//! in front of a real service.

use std::{
    net::TcpListener,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::helpers::{connect_from, counts, http_get, spawn_app, Client, PATIENCE};

const NGINX: &str = "/usr/sbin/nginx";

/// nginx in the foreground with its own prefix dir; killed on drop.
struct Nginx {
    child: Child,
    port: u16,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn start_nginx(dir: &Path, upstream: std::net::SocketAddr) -> Nginx {
    assert!(
        Path::new(NGINX).exists(),
        "nginx is required for this test: apt-get install -y nginx (.ci/run installs it)"
    );
    let port = free_port();
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/nginx/link-counter.conf"
    ))
    .expect("shipped nginx config");
    assert!(shipped.contains("server 127.0.0.1:1999;") && shipped.contains("listen 80;"));
    let site = shipped
        .replace("server 127.0.0.1:1999;", &format!("server {upstream};"))
        .replace("listen 80;", &format!("listen 127.0.0.1:{port};"));
    std::fs::write(dir.join("link-counter.conf"), site).expect("write site");
    let d = dir.display();
    let main = format!(
        "worker_processes 1;\ndaemon off;\nmaster_process on;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         {user}events {{ worker_connections 256; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         include {d}/link-counter.conf;\n}}\n",
        user = if is_root() { "user root;\n" } else { "" },
    );
    std::fs::write(dir.join("nginx.conf"), main).expect("write conf");
    let check = Command::new(NGINX)
        .args(["-t", "-p", &d.to_string(), "-c", &format!("{d}/nginx.conf")])
        .output()
        .expect("nginx -t");
    assert!(
        check.status.success(),
        "nginx -t: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let child = Command::new(NGINX)
        .args(["-p", &d.to_string(), "-c", &format!("{d}/nginx.conf")])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("nginx starts");
    let deadline = std::time::Instant::now() + PATIENCE;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "nginx did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    Nginx { child, port }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"))
}

/// Connects through nginx from source address `src`.
async fn via(nginx: &Nginx, src: &str, path: &str) -> Result<Client, u16> {
    let target = ([127, 0, 0, 1], nginx.port).into();
    connect_from(
        target,
        src,
        &format!("ws://127.0.0.1:{}{path}", nginx.port),
        &[],
    )
    .await
}

/// Counts work through nginx, at the root and under a path prefix; the client
/// IP the service uses is the one nginx forwarded (per-IP cap of 1 tells two
/// clients apart although both arrive from nginx's address).
#[tokio::test]
async fn counts_through_nginx() {
    let (app, _dir) = spawn_app(&[
        ("SECURITY__TRUSTED_PROXIES", "127.0.0.1/32"),
        ("LIMITS__MAX_CONNECTIONS_PER_IP", "1"),
    ]);
    let tmp = tempfile::tempdir().expect("tmp");
    let nginx = start_nginx(tmp.path(), app.addr);

    let mut observer = via(&nginx, "127.0.0.20", "/parties/page/home")
        .await
        .expect("observer");
    observer.subscribe(&["x"]).await;
    assert_eq!(observer.next_update().await, counts(&[("x", 0)]));

    // Root mount, client 127.0.0.21.
    let a = via(&nginx, "127.0.0.21", "/parties/page/x")
        .await
        .expect("a");
    observer.wait_for(&counts(&[("x", 1)])).await;
    // Same forwarded IP again: refused by the per-IP cap (so the service saw 127.0.0.21, not nginx).
    assert_eq!(
        via(&nginx, "127.0.0.21", "/parties/page/x").await.err(),
        Some(429)
    );
    // Prefix mount, another client IP: admitted.
    let b = via(&nginx, "127.0.0.22", "/presence/parties/page/x")
        .await
        .expect("b via prefix");
    observer.wait_for(&counts(&[("x", 2)])).await;
    let (status, body) = http_get(
        ([127, 0, 0, 1], nginx.port).into(),
        "/presence/api/v1/counts?ids=x",
    )
    .await;
    assert_eq!((status, body.trim()), (200, r#"{"x":2}"#));

    a.close().await;
    observer.wait_for(&counts(&[("x", 1)])).await;
    b.drop_abruptly();
    observer.wait_for(&counts(&[("x", 0)])).await;
    // Heartbeats pass through: the observer survives several client_timeouts.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _c = via(&nginx, "127.0.0.23", "/parties/page/x")
        .await
        .expect("c");
    observer.wait_for(&counts(&[("x", 1)])).await;
}
