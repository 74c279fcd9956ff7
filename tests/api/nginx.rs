//! The shipped deployment files, installed the way their headers say, in front
//! of the real binary.
//!
//! nginx runs Debian's own `/etc/nginx/nginx.conf` with Debian's default site
//! enabled (both copied into a temp prefix dir: only paths, ports, the pid and
//! log locations, and the worker user when not root, are rewritten), plus a
//! shipped `deploy/nginx/*.conf` with only its ports, upstream address, host
//! name, certificate paths and webroot substituted (the upstream may be several
//! nodes: one `server` line each). TLS uses a certificate
//! made at test time with the openssl CLI; TLS clients are `openssl s_client`
//! processes (which verify that certificate and the host name), bridged to a
//! local TCP stream so the test's WebSocket and HTTP clients run over them and
//! connections can come from chosen 127.0.0.x addresses. The service is the
//! binary started with `deploy/config.example.toml` (bind address, data dir
//! and timers overridden from the environment).

use std::{
    net::{SocketAddr, TcpListener},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinHandle,
};
use tokio_tungstenite::{
    tungstenite::{
        client::IntoClientRequest,
        http::{HeaderName, HeaderValue},
    },
    MaybeTlsStream,
};

use crate::helpers::{
    counts, eventually, http_get, Client, EventClient, RedisServer, StreamItem, PATIENCE,
};
use crate::kit::{
    child::{binary, OnDrop, Running, Spawn},
    prom,
    settings::Env,
    wait::on_free_ports,
};

/// The service's `websocket.client_timeout` behind nginx: short enough that
/// the heartbeat check below waits through it twice in seconds, long
/// enough that a test process starved for a moment on a loaded machine
/// (its clients answer pings from a task of their own) is not taken for a
/// silent client. The heartbeat interval is a sixth of it.
const CLIENT_TIMEOUT: Duration = Duration::from_millis(3000);

const NGINX: &str = "/usr/sbin/nginx";
const DEBIAN_NGINX_CONF: &str = "/etc/nginx/nginx.conf";
const DEBIAN_DEFAULT_SITE: &str = "/etc/nginx/sites-available/default";
/// Marker of the page Debian's default site serves in the tests.
const DEFAULT_SITE_PAGE: &str = "Debian default site (test)";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// `text` with every `from` replaced by `to`; `from` must occur (so a change
/// of the file fails here instead of silently testing something else).
fn swap(text: &str, from: &str, to: &str, file: &str) -> String {
    assert!(text.contains(from), "{file}: expected `{from}` in it");
    text.replace(from, to)
}

/// `text` without its lines that contain `needle` (which must occur).
fn drop_lines(text: &str, needle: &str, file: &str) -> String {
    assert!(text.contains(needle), "{file}: expected `{needle}` in it");
    text.lines()
        .filter(|l| !l.contains(needle))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn ipv6_loopback() -> bool {
    TcpListener::bind("[::1]:0").is_ok()
}

/// A port free on 127.0.0.1 (and on [::1] when `ipv6`).
fn free_port(ipv6: bool) -> u16 {
    loop {
        let v4 = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = v4.local_addr().expect("addr").port();
        if !ipv6 || TcpListener::bind(("::1", port)).is_ok() {
            return port;
        }
    }
}

/// Processes whose process group is `pgid`, from /proc.
fn process_group(pgid: i32) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        if rest.split_whitespace().nth(2) == Some(&pgid.to_string()) {
            found.push(pid);
        }
    }
    found
}

// ---------------------------------------------------------------- the service

/// The binary, configured by `deploy/config.example.toml`; stopped with
/// SIGTERM when dropped (killed after [`PATIENCE`]).
struct Service {
    _process: Running,
    addr: SocketAddr,
    /// The admin listener (`/metrics`, `/api/v1/stats`).
    admin: SocketAddr,
    _data: tempfile::TempDir,
}

impl Service {
    /// `env`: overrides as (KEY, value) pairs, KEY without the `LINK_COUNTER__` prefix.
    fn start(env: &[(&str, &str)]) -> Service {
        let data = tempfile::tempdir().expect("tmp");
        let mut cmd = binary();
        cmd.arg("--config")
            .arg(repo("deploy/config.example.toml"))
            .stdin(Stdio::null());
        Env::base(data.path())
            .set("SERVER__SHUTDOWN_TIMEOUT", "3s")
            .set(
                "WEBSOCKET__HEARTBEAT_INTERVAL",
                format!("{}ms", CLIENT_TIMEOUT.as_millis() / 6),
            )
            .set(
                "WEBSOCKET__CLIENT_TIMEOUT",
                format!("{}ms", CLIENT_TIMEOUT.as_millis()),
            )
            .with(env)
            .apply(&mut cmd);
        let process = Spawn::default().on_drop(OnDrop::Term(PATIENCE)).start(cmd);
        Service {
            addr: process.addr,
            admin: process.admin.expect("an admin listener"),
            _process: process,
            _data: data,
        }
    }
}

// ---------------------------------------------------------------- nginx

/// Where a shipped file goes, as its header says.
#[derive(Clone, Copy)]
enum Install {
    /// /etc/nginx/sites-available/NAME plus a symlink in sites-enabled/.
    SitesEnabled,
    /// /etc/nginx/conf.d/NAME.
    ConfD,
}

/// A shipped nginx file and the one edit its header asks for (its
/// placeholder host name replaced by ours).
#[derive(Clone, Copy)]
struct Site {
    file: &'static str,
    placeholder: &'static str,
    host: &'static str,
    install: Install,
}

const ROOT_SITE: Site = Site {
    file: "link-counter.conf",
    placeholder: "presence.example.com",
    host: "counts.test",
    install: Install::SitesEnabled,
};

const PREFIX_SITE: Site = Site {
    file: "link-counter-prefix.conf",
    placeholder: "www.example.com",
    host: "site.test",
    install: Install::ConfD,
};

/// An nginx prefix dir laid out like /etc/nginx on Debian, with `sites`
/// installed next to Debian's default site.
struct Layout {
    dir: tempfile::TempDir,
    http: u16,
    https: u16,
}

impl Layout {
    /// `upstreams`: the service's nodes, in place of the shipped `server` line.
    fn new(sites: &[Site], upstreams: &[SocketAddr]) -> Layout {
        assert!(
            Path::new(NGINX).exists() && Path::new(DEBIAN_NGINX_CONF).exists(),
            "Debian's nginx is required for this test: apt-get install -y nginx (./test.sh installs it)"
        );
        let tmp = tempfile::tempdir().expect("tmp");
        let d = tmp.path().display().to_string();
        let ipv6 = ipv6_loopback();
        let (http, https) = (free_port(ipv6), free_port(ipv6));
        for sub in [
            "conf.d",
            "sites-available",
            "sites-enabled",
            "log",
            "tls",
            "www/.well-known/acme-challenge",
        ] {
            std::fs::create_dir_all(tmp.path().join(sub)).expect("mkdir");
        }
        if is_root() {
            // Debian's `user www-data` stays: its workers must reach the webroot.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
        }
        // Debian's module snippets load `modules/*.so` relative to the prefix.
        if Path::new("/usr/share/nginx/modules").exists() {
            std::os::unix::fs::symlink("/usr/share/nginx/modules", tmp.path().join("modules"))
                .expect("symlink modules");
        }

        // Debian's nginx.conf: paths only (and no `user` when not root).
        let file = DEBIAN_NGINX_CONF;
        let mut main = read(Path::new(file));
        main = swap(
            &main,
            "pid /run/nginx.pid;",
            &format!("pid {d}/nginx.pid;"),
            file,
        );
        main = swap(&main, "/var/log/nginx/", &format!("{d}/log/"), file);
        main = swap(&main, "/etc/nginx/conf.d/", &format!("{d}/conf.d/"), file);
        main = swap(
            &main,
            "/etc/nginx/sites-enabled/",
            &format!("{d}/sites-enabled/"),
            file,
        );
        // Debian's compiled-in temp paths are under /var/lib/nginx.
        main = swap(
            &main,
            "\nhttp {\n",
            &format!(
                "\nhttp {{\n\tclient_body_temp_path {d}/body;\n\tproxy_temp_path {d}/proxy;\n\
                 \tfastcgi_temp_path {d}/fastcgi;\n\tuwsgi_temp_path {d}/uwsgi;\n\
                 \tscgi_temp_path {d}/scgi;\n"
            ),
            file,
        );
        if !is_root() {
            main = drop_lines(&main, "user www-data;", file);
        }
        write(&tmp.path().join("nginx.conf"), &main);

        let listen = |text: String, from: &str, port: u16, tail: &str, file: &str| -> String {
            let v4 = swap(
                &text,
                &format!("listen {from}{tail};"),
                &format!("listen 127.0.0.1:{port}{tail};"),
                file,
            );
            let v6 = format!("listen [::]:{from}{tail};");
            if ipv6 {
                swap(&v4, &v6, &format!("listen [::1]:{port}{tail};"), file)
            } else {
                drop_lines(&v4, &v6, file)
            }
        };

        // Debian's default site, enabled as Debian ships it.
        let file = DEBIAN_DEFAULT_SITE;
        let mut default = read(Path::new(file));
        default = listen(default, "80", http, " default_server", file);
        default = swap(
            &default,
            "root /var/www/html;",
            &format!("root {d}/www;"),
            file,
        );
        write(&tmp.path().join("sites-available/default"), &default);
        std::os::unix::fs::symlink(
            tmp.path().join("sites-available/default"),
            tmp.path().join("sites-enabled/default"),
        )
        .expect("enable default site");
        write(
            &tmp.path().join("www/index.nginx-debian.html"),
            &format!("<h1>{DEFAULT_SITE_PAGE}</h1>\n"),
        );

        // The shipped files.
        for site in sites {
            let file = site.file;
            let mut text = read(&repo(&format!("deploy/nginx/{file}")));
            text = swap(&text, site.placeholder, site.host, file);
            text = listen(text, "80", http, "", file);
            text = listen(text, "443", https, " ssl", file);
            text = swap(
                &text,
                &format!("/etc/letsencrypt/live/{}/", site.host),
                &format!("{d}/tls/"),
                file,
            );
            text = swap(
                &text,
                "root /var/www/html;",
                &format!("root {d}/www;"),
                file,
            );
            let servers: Vec<String> = upstreams.iter().map(|u| format!("server {u};")).collect();
            text = swap(
                &text,
                "server 127.0.0.1:1999;",
                &servers.join("\n    "),
                file,
            );
            // Nothing outside the prefix dir is left in the directives.
            for line in text.lines() {
                let directive = line.split('#').next().unwrap_or_default();
                for system in ["/etc/", "/var/", ":1999"] {
                    assert!(!directive.contains(system), "{file}: `{line}` left as is");
                }
            }
            match site.install {
                Install::ConfD => write(&tmp.path().join("conf.d").join(file), &text),
                Install::SitesEnabled => {
                    let available = tmp.path().join("sites-available").join(file);
                    write(&available, &text);
                    std::os::unix::fs::symlink(
                        &available,
                        tmp.path().join("sites-enabled").join(file),
                    )
                    .expect("enable site");
                }
            }
        }

        // The certificate the shipped files point at, for all our host names.
        let names: Vec<String> = sites.iter().map(|s| format!("DNS:{}", s.host)).collect();
        let out = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", &format!("/CN={}", sites[0].host)])
            .args(["-addext", &format!("subjectAltName={}", names.join(","))])
            .arg("-keyout")
            .arg(tmp.path().join("tls/privkey.pem"))
            .arg("-out")
            .arg(tmp.path().join("tls/fullchain.pem"))
            .output()
            .expect("openssl is required for this test: apt-get install -y openssl");
        assert!(
            out.status.success(),
            "openssl req: {}",
            String::from_utf8_lossy(&out.stderr)
        );

        Layout {
            dir: tmp,
            http,
            https,
        }
    }

    fn path(&self, sub: &str) -> PathBuf {
        self.dir.path().join(sub)
    }

    /// nginx's command line for this prefix (`extra` after it).
    fn nginx(&self, extra: &[&str]) -> Command {
        let mut cmd = Command::new(NGINX);
        cmd.arg("-p")
            .arg(format!("{}/", self.dir.path().display()))
            .arg("-c")
            .arg(self.path("nginx.conf"))
            .arg("-e")
            .arg(self.path("log/error.log"))
            .args(extra);
        cmd
    }

    /// `nginx -t`: the configuration is valid and draws no warning (a
    /// "conflicting server name" with the default site would be one).
    fn check(&self) {
        let out = self.nginx(&["-t"]).output().expect("nginx -t runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "nginx -t failed:\n{stderr}");
        for bad in ["[warn]", "[emerg]", "[alert]", "conflicting"] {
            assert!(!stderr.contains(bad), "nginx -t says `{bad}`:\n{stderr}");
        }
    }
}

/// A running nginx (master and workers in a process group of their own),
/// stopped with SIGTERM on drop; TLS clients made through it are tracked so
/// the test can wait for their `openssl s_client` processes.
struct Nginx {
    layout: Layout,
    child: Child,
    http: SocketAddr,
    https: SocketAddr,
    stopped: bool,
    bridges: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Nginx {
    /// nginx on free ports (see [`on_free_ports`]).
    fn start(sites: &[Site], upstreams: &[SocketAddr]) -> Nginx {
        on_free_ports("nginx", || Nginx::try_start(sites, upstreams))
    }

    /// `None` if it exited because a port was taken meanwhile.
    fn try_start(sites: &[Site], upstreams: &[SocketAddr]) -> Option<Nginx> {
        let layout = Layout::new(sites, upstreams);
        layout.check();
        let child = layout
            .nginx(&["-g", "daemon off;"])
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("nginx starts");
        let mut nginx = Nginx {
            http: ([127, 0, 0, 1], layout.http).into(),
            https: ([127, 0, 0, 1], layout.https).into(),
            layout,
            child,
            stopped: false,
            bridges: Arc::default(),
        };
        let deadline = Instant::now() + PATIENCE;
        while std::net::TcpStream::connect(nginx.http).is_err()
            || std::net::TcpStream::connect(nginx.https).is_err()
            || nginx.workers().is_empty()
        {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                let log =
                    std::fs::read_to_string(nginx.layout.path("log/error.log")).unwrap_or_default();
                if log.contains("Address already in use") {
                    return None;
                }
                panic!("nginx exited ({status}):\n{log}");
            }
            assert!(Instant::now() < deadline, "nginx did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(nginx)
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The worker processes (the group minus the master).
    fn workers(&self) -> Vec<i32> {
        let pid = self.pid();
        process_group(pid)
            .into_iter()
            .filter(|p| *p != pid)
            .collect()
    }

    /// Fast shutdown (SIGTERM: the master stops its workers, waits for them,
    /// then exits). Returns the processes of nginx's group still there after
    /// the master exited (and kills those).
    fn shutdown(&mut self) -> Vec<i32> {
        if self.stopped {
            return Vec::new();
        }
        self.stopped = true;
        let pid = self.pid();
        let mut exited = matches!(self.child.try_wait(), Ok(Some(_)));
        if !exited {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + PATIENCE;
        while !exited && Instant::now() < deadline {
            exited = matches!(self.child.try_wait(), Ok(Some(_)));
            std::thread::sleep(Duration::from_millis(10));
        }
        let left = process_group(pid);
        if !exited || !left.is_empty() {
            // SAFETY: kill(2) on the process group nginx was started in.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            let _ = self.child.wait();
        }
        left
    }

    /// Stops nginx and checks that nothing it or the test's TLS clients
    /// started is left: no worker outlives the master, every s_client exits.
    async fn finish(mut self) {
        let workers = self.workers();
        assert!(!workers.is_empty(), "nginx runs workers");
        let left = self.shutdown();
        assert!(left.is_empty(), "nginx processes left behind: {left:?}");
        for w in workers {
            assert!(
                !Path::new(&format!("/proc/{w}")).exists(),
                "worker {w} outlived nginx"
            );
        }
        let bridges = std::mem::take(&mut *self.bridges.lock().expect("lock"));
        for b in bridges {
            tokio::time::timeout(PATIENCE, b)
                .await
                .expect("openssl s_client exits when nginx is gone")
                .expect("bridge task");
        }
    }

    /// A TLS connection to nginx's HTTPS port from source address `src` (a
    /// 127.0.0.x), made by `openssl s_client`, which sends `host` as SNI and
    /// verifies the test certificate for it. Returns a local TCP stream
    /// carrying the connection's plaintext; closing it closes the connection.
    async fn tls(&self, src: &str, host: &str) -> TcpStream {
        let mut child = tokio::process::Command::new("openssl")
            .arg("s_client")
            .args(["-quiet", "-no_ign_eof", "-nocommands"])
            .args(["-verify_return_error", "-verify_quiet"])
            .args(["-connect", &self.https.to_string()])
            .args(["-bind", &format!("{src}:0")])
            .args(["-servername", host, "-verify_hostname", host])
            .arg("-CAfile")
            .arg(self.layout.path("tls/fullchain.pem"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("openssl s_client starts");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let near = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (far, _) = listener.accept().await.expect("accept");
        let mut stdin = child.stdin.take().expect("stdin");
        let mut stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        let bridge = tokio::spawn(async move {
            let (mut from_test, mut to_test) = far.into_split();
            // The test side's EOF closes s_client's stdin: with -no_ign_eof it
            // then closes the TLS connection.
            let up = tokio::spawn(async move {
                let _ = tokio::io::copy(&mut from_test, &mut stdin).await;
            });
            let _ = tokio::io::copy(&mut stdout, &mut to_test).await;
            let _ = to_test.shutdown().await;
            up.abort();
            let mut err = String::new();
            let _ = stderr.read_to_string(&mut err).await;
            let status = child.wait().await.expect("wait for s_client");
            if !status.success() && !err.trim().is_empty() {
                eprintln!("openssl s_client ({status}): {err}");
            }
        });
        self.bridges.lock().expect("lock").push(bridge);
        near
    }

    /// From 127.0.0.20, an observer at `{prefix}/parties/page/home`
    /// subscribed to `x`, whose first update shows 0.
    async fn observer_of_x(&self, host: &str, prefix: &str) -> Client {
        let mut observer = self.observer_at_home(host, prefix, "x").await;
        assert_eq!(observer.next_update().await, counts(&[("x", 0)]));
        observer
    }

    /// From 127.0.0.20, a client at `{prefix}/parties/page/home` subscribed
    /// to `page`.
    async fn observer_at_home(&self, host: &str, prefix: &str, page: &str) -> Client {
        let mut observer = self
            .wss(
                "127.0.0.20",
                host,
                &format!("{prefix}/parties/page/home"),
                &[],
            )
            .await
            .expect("observer");
        observer.subscribe(&[page]).await;
        observer
    }

    /// [`Nginx::observer_of_x`], then from 127.0.0.21 a connection to `x`
    /// (`{prefix}/parties/page/x`) the observer counts.
    async fn observer_and_first_on_x(&self, host: &str, prefix: &str) -> (Client, Client) {
        let mut observer = self.observer_of_x(host, prefix).await;
        let a = self
            .wss("127.0.0.21", host, &format!("{prefix}/parties/page/x"), &[])
            .await
            .expect("a");
        observer.wait_for(&counts(&[("x", 1)])).await;
        (observer, a)
    }

    /// A WebSocket over TLS through nginx (`wss://{host}{path}`) from source
    /// address `src`; `Err(status)` when the upgrade is refused.
    async fn wss(
        &self,
        src: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Client, u16> {
        let stream = self.tls(src, host).await;
        let url = format!("wss://{host}{path}");
        let mut req = url.as_str().into_client_request().expect("request");
        for (k, v) in headers {
            req.headers_mut().insert(
                HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                HeaderValue::from_str(v).expect("header value"),
            );
        }
        let handshake = tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(stream));
        match tokio::time::timeout(PATIENCE, handshake)
            .await
            .expect("handshake in time")
        {
            Ok((ws, _)) => Ok(Client::from_stream(ws)),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
            Err(e) => panic!("wss {url} from {src}: {e}"),
        }
    }

    /// GET over TLS (from 127.0.0.1).
    async fn https_get(&self, host: &str, path: &str) -> Response {
        let stream = self.tls("127.0.0.1", host).await;
        request(stream, host, path).await
    }

    /// GET over plain HTTP.
    async fn http_get(&self, host: &str, path: &str) -> Response {
        let stream = TcpStream::connect(self.http).await.expect("connect");
        request(stream, host, path).await
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A raw HTTP response.
struct Response {
    status: u16,
    head: String,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

async fn request(mut s: TcpStream, host: &str, path: &str) -> Response {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let buf = crate::helpers::exchange(&mut s, &req).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("GET {host}{path}: no response: {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("status line: {head}"));
    Response {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// Port 80 of a shipped file: its ACME challenges are served from the
/// webroot, everything else of its host redirects to HTTPS, and Debian's
/// default site still answers every other host name.
async fn check_port_80(nginx: &Nginx, host: &str) {
    let token = "lc-test-token";
    write(
        &nginx
            .layout
            .path(&format!("www/.well-known/acme-challenge/{token}")),
        "lc-test-token.key-authorization",
    );
    let r = nginx
        .http_get(host, &format!("/.well-known/acme-challenge/{token}"))
        .await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "lc-test-token.key-authorization"),
        "{}",
        r.head
    );
    for path in ["/", "/parties/page/x?a=1", "/presence/link-counter.js"] {
        let r = nginx.http_get(host, path).await;
        assert_eq!(r.status, 301, "http://{host}{path}: {}", r.head);
        assert_eq!(
            r.header("location"),
            Some(format!("https://{host}{path}").as_str())
        );
    }
    let r = nginx.http_get("other.test", "/").await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert!(r.body.contains(DEFAULT_SITE_PAGE), "{}", r.body);
}

/// `body` is the embed the service serves (`web/link-counter.js`, compiled in).
fn assert_is_embed(body: &str) {
    assert!(
        body == link_counter::web::LINK_COUNTER_JS,
        "not the embed: {} bytes, starting {:?}",
        body.len(),
        body.chars().take(200).collect::<String>()
    );
}

/// The shipped nginx file, dropped into Debian's nginx next to its default
/// site: port 80 redirects to HTTPS (ACME challenges excepted), and over TLS
/// the counts work end to end; the client IP the service uses is the one
/// nginx forwarded (a per-IP cap of 1 tells clients from 127.0.0.21 and
/// 127.0.0.22 apart although both arrive from nginx's address), and what a
/// client writes into X-Forwarded-For or Forwarded itself is not believed.
#[tokio::test]
async fn counts_over_tls_through_nginx_next_to_debian_default_site() {
    let service = Service::start(&[("LIMITS__MAX_CONNECTIONS_PER_IP", "1")]);
    let nginx = Nginx::start(&[ROOT_SITE], &[service.addr]);
    let host = ROOT_SITE.host;
    check_port_80(&nginx, host).await;

    let r = nginx.https_get(host, "/healthz").await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(
        r.header("strict-transport-security"),
        Some("max-age=31536000")
    );
    let r = nginx.https_get(host, "/link-counter.js").await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("text/javascript")),
        "{}",
        r.head
    );
    assert_is_embed(&r.body);

    let (mut observer, a) = nginx.observer_and_first_on_x(host, "").await;
    // Same client IP again: refused by the per-IP cap, so the service saw
    // 127.0.0.21, not nginx's 127.0.0.1; also when the client claims other
    // addresses itself.
    for headers in [
        vec![],
        vec![("x-forwarded-for", "127.0.0.51")],
        vec![("forwarded", "for=127.0.0.52")],
        vec![
            ("forwarded", "for=127.0.0.53"),
            ("x-forwarded-for", "127.0.0.54"),
        ],
    ] {
        assert_eq!(
            nginx
                .wss("127.0.0.21", host, "/parties/page/x", &headers)
                .await
                .err(),
            Some(429),
            "{headers:?}"
        );
    }
    let b = nginx
        .wss("127.0.0.22", host, "/parties/page/x", &[])
        .await
        .expect("b");
    observer.wait_for(&counts(&[("x", 2)])).await;
    let r = nginx.https_get(host, "/api/v1/counts?ids=x").await;
    assert_eq!((r.status, r.body.trim()), (200, r#"{"x":2}"#), "{}", r.head);

    // The sample config's allowed_origins apply behind nginx.
    assert_eq!(
        nginx
            .wss(
                "127.0.0.24",
                host,
                "/parties/page/x",
                &[("origin", "https://evil.test")]
            )
            .await
            .err(),
        Some(403)
    );
    let allowed = nginx
        .wss(
            "127.0.0.25",
            host,
            "/parties/page/x",
            &[("origin", "https://blog.example.com")],
        )
        .await
        .expect("an allowed origin");
    observer.wait_for(&counts(&[("x", 3)])).await;
    allowed.close().await;
    observer.wait_for(&counts(&[("x", 2)])).await;

    a.close().await;
    observer.wait_for(&counts(&[("x", 1)])).await;
    b.drop_abruptly();
    observer.wait_for(&counts(&[("x", 0)])).await;
    // Heartbeats pass through: the observer survives two client_timeouts.
    tokio::time::sleep(CLIENT_TIMEOUT * 2).await;
    let c = nginx
        .wss("127.0.0.23", host, "/parties/page/x", &[])
        .await
        .expect("c");
    observer.wait_for(&counts(&[("x", 1)])).await;

    drop((observer, c));
    nginx.finish().await;
    drop(service);
}

/// The path-prefix alternative, dropped into conf.d next to Debian's default
/// site: the site's own pages at /, the service under /presence/ (nginx
/// strips the prefix), WebSockets and the embed over TLS, client IPs
/// forwarded.
#[tokio::test]
async fn prefix_mount_over_tls_through_nginx() {
    let service = Service::start(&[("LIMITS__MAX_CONNECTIONS_PER_IP", "1")]);
    let nginx = Nginx::start(&[PREFIX_SITE], &[service.addr]);
    let host = PREFIX_SITE.host;
    check_port_80(&nginx, host).await;

    write(&nginx.layout.path("www/index.html"), "the site itself\n");
    let r = nginx.https_get(host, "/").await;
    assert_eq!((r.status, r.body.as_str()), (200, "the site itself\n"));
    // The service is not at the root of this host.
    assert_eq!(nginx.https_get(host, "/healthz").await.status, 404);
    let r = nginx.https_get(host, "/presence/healthz").await;
    assert_eq!(r.status, 200, "{}", r.head);
    let r = nginx.https_get(host, "/presence/link-counter.js").await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_is_embed(&r.body);

    let (mut observer, a) = nginx.observer_and_first_on_x(host, "/presence").await;
    assert_eq!(
        nginx
            .wss(
                "127.0.0.21",
                host,
                "/presence/parties/page/x",
                &[("forwarded", "for=127.0.0.52")]
            )
            .await
            .err(),
        Some(429)
    );
    let b = nginx
        .wss("127.0.0.22", host, "/presence/parties/page/x", &[])
        .await
        .expect("b");
    observer.wait_for(&counts(&[("x", 2)])).await;
    let r = nginx.https_get(host, "/presence/api/v1/counts?ids=x").await;
    assert_eq!((r.status, r.body.trim()), (200, r#"{"x":2}"#), "{}", r.head);
    b.drop_abruptly();
    observer.wait_for(&counts(&[("x", 1)])).await;

    drop((observer, a));
    nginx.finish().await;
    drop(service);
}

/// Event streams through both shipped files at once (the host of its own
/// and the `/presence/` prefix), over TLS: the response is not buffered
/// (the retry hint, the full update and keep-alive comments arrive as they
/// are written), a stream counts as a viewer next to a WebSocket viewer of
/// the same page, carries live updates, and stops counting as soon as its
/// reader closes the TLS connection.
#[tokio::test]
async fn event_streams_over_tls_through_both_nginx_files() {
    let service = Service::start(&[("EVENTS__KEEPALIVE_INTERVAL", "100ms")]);
    let nginx = Nginx::start(&[ROOT_SITE, PREFIX_SITE], &[service.addr]);
    for (site, prefix) in [(ROOT_SITE, ""), (PREFIX_SITE, "/presence")] {
        let host = site.host;
        let page = format!("sse-{}", site.host);
        let mut observer = nginx.observer_at_home(host, prefix, &page).await;
        observer.wait_for(&counts(&[(&page, 0)])).await;

        let path = format!("{prefix}/parties/page/{page}/events?links=y%2Cz");
        let tls = nginx.tls("127.0.0.31", host).await;
        let mut stream = EventClient::over(tls, host, &path, &[])
            .await
            .unwrap_or_else(|(status, body)| panic!("{host}{path}: {status} {body}"));
        assert!(
            stream.head.contains("content-type: text/event-stream"),
            "{}",
            stream.head
        );
        assert_eq!(stream.next_item().await, StreamItem::Retry(3000));
        assert_eq!(
            stream.next_data().await["connections"],
            serde_json::json!({"y,z": 0})
        );
        for _ in 0..3 {
            assert_eq!(stream.next_item().await, StreamItem::Comment);
        }
        let ws = nginx
            .wss(
                "127.0.0.32",
                host,
                &format!("{prefix}/parties/page/{page}"),
                &[],
            )
            .await
            .expect("a WebSocket viewer");
        observer.wait_for(&counts(&[(&page, 2)])).await;

        let viewer = nginx
            .wss(
                "127.0.0.33",
                host,
                &format!("{prefix}/parties/page/y%2Cz"),
                &[],
            )
            .await
            .expect("a viewer of a followed page");
        stream.wait_for(&counts(&[("y,z", 1)])).await;
        drop(viewer);
        stream.wait_for(&counts(&[("y,z", 0)])).await;

        drop(stream);
        observer.wait_for(&counts(&[(&page, 1)])).await;
        drop((observer, ws));
    }
    nginx.finish().await;
    drop(service);
}

/// A node's open sessions and distinct visitors, from its `/metrics`.
async fn node_figures(node: &Service) -> (u64, u64) {
    let (status, text) = http_get(node.admin, "/metrics").await;
    assert_eq!(status, 200, "{text}");
    let samples = prom::parse(&text);
    (
        prom::value(&samples, "link_counter_connections_open", &[]) as u64,
        prom::value(&samples, "link_counter_visitors", &[]) as u64,
    )
}

/// Waits until the nodes' figures (open sessions, distinct visitors) satisfy
/// `expected`, and returns them.
async fn settle(
    nodes: &[Service; 2],
    expected: impl Fn(&[(u64, u64); 2]) -> bool,
) -> [(u64, u64); 2] {
    eventually("the nodes' figures", || async {
        let now = [node_figures(&nodes[0]).await, node_figures(&nodes[1]).await];
        expected(&now).then_some(now)
    })
    .await
}

/// The shipped file in front of a 2-node cluster (a real `redis-server`),
/// its upstream given both nodes: the `hash` on the visitor id puts both
/// tabs of each visitor on one node, whose distinct visitors rise by exactly
/// one, so the nodes' figures add up to the true number of people (which
/// every node answers); visitors
/// land on both nodes, and so do connections without a visitor id. Counts
/// through nginx stay cluster-wide.
#[tokio::test]
async fn the_nginx_hash_keeps_each_visitor_on_one_node_of_a_cluster() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let url = redis.url();
    let env = [
        ("CLUSTER__REDIS_URL", url.as_str()),
        ("LIMITS__MAX_CONNECTIONS_PER_IP", "0"),
        ("LIMITS__CONNECTIONS_PER_IP_PER_SECOND", "0"),
    ];
    let nodes = [Service::start(&env), Service::start(&env)];
    for node in &nodes {
        eventually("both nodes to be ready (in the cluster)", || async {
            http_get(node.addr, "/readyz").await.0 == 200
        })
        .await;
    }
    let nginx = Nginx::start(&[ROOT_SITE], &[nodes[0].addr, nodes[1].addr]);
    let host = ROOT_SITE.host;
    let mut observer = nginx.observer_of_x(host, "").await;

    let total = |f: &[(u64, u64); 2]| f[0].0 + f[1].0;
    let start = settle(&nodes, |f| total(f) == 1).await;

    // Visitor after visitor (at least 8, until both nodes had one; with a
    // fair hash, 32 visitors all on one node happen with probability 2^-31).
    let mut used = [false, false];
    for i in 0..32 {
        let id = format!("nginx-visitor-{i:02}");
        let path = format!("/parties/page/x?visitor={id}");
        let t1 = nginx
            .wss("127.0.0.21", host, &path, &[])
            .await
            .expect("tab 1");
        let t2 = nginx
            .wss("127.0.0.22", host, &path, &[])
            .await
            .expect("tab 2");
        let after = settle(&nodes, |f| total(f) == total(&start) + 2).await;
        let node = usize::from(after[1].0 > start[1].0);
        assert_eq!(
            after[node],
            (start[node].0 + 2, start[node].1 + 1),
            "{id}: both tabs on node {node}, one more visitor there ({start:?} -> {after:?})"
        );
        assert_eq!(
            after[1 - node],
            start[1 - node],
            "{id}: {start:?} -> {after:?}"
        );
        used[node] = true;
        observer.wait_for(&counts(&[("x", 2)])).await;
        // Every node answers the cluster-wide figure: two tabs, one person.
        for n in &nodes {
            eventually("the cluster-wide visitor figure on each node", || async {
                let (status, body) = http_get(n.addr, "/api/v1/counts?ids=x&visitors=true").await;
                status == 200
                    && serde_json::from_str::<serde_json::Value>(&body).ok()
                        == Some(serde_json::json!({"connections": {"x": 2}, "visitors": {"x": 1}}))
            })
            .await;
        }
        t1.close().await;
        t2.drop_abruptly();
        observer.wait_for(&counts(&[("x", 0)])).await;
        settle(&nodes, |f| *f == start).await;
        if i >= 7 && used == [true, true] {
            break;
        }
    }
    assert_eq!(used, [true, true], "every visitor went to one node");

    // Without a visitor id a connection goes to either node.
    let mut used = [false, false];
    for _ in 0..32 {
        let c = nginx
            .wss("127.0.0.23", host, "/parties/page/y", &[])
            .await
            .expect("a connection without a visitor id");
        let after = settle(&nodes, |f| total(f) == total(&start) + 1).await;
        let node = usize::from(after[1].0 > start[1].0);
        assert_eq!(after[node].1, start[node].1 + 1, "its own visitor");
        used[node] = true;
        c.close().await;
        settle(&nodes, |f| *f == start).await;
        if used == [true, true] {
            break;
        }
    }
    assert_eq!(
        used,
        [true, true],
        "connections without an id all went to one node"
    );

    drop(observer);
    nginx.finish().await;
    drop(nodes);
    drop(redis);
}

/// Both shipped nginx files can be enabled at once, next to the default site.
#[test]
fn both_nginx_files_together_pass_nginx_t() {
    let both = [
        ROOT_SITE,
        Site {
            install: Install::SitesEnabled,
            ..PREFIX_SITE
        },
    ];
    Layout::new(&both, &["127.0.0.1:9".parse().expect("addr")]).check();
}

/// The install files agree: the sample config loads and sets what the nginx
/// files and the systemd unit assume.
#[test]
fn install_files_agree() {
    let sample = repo("deploy/config.example.toml");
    let s = link_counter::Settings::load_from(Some(sample.as_path()), Vec::new())
        .expect("deploy/config.example.toml loads");
    assert_eq!(s.server.bind, "127.0.0.1:1999".parse().expect("addr"));
    assert_eq!(s.storage.path, Path::new("/var/lib/link-counter"));
    assert!(!s.web.demo);
    assert_eq!(
        s.security.trusted_proxies,
        vec!["127.0.0.1/32".parse::<ipnet::IpNet>().expect("cidr")]
    );
    assert!(!s.security.allowed_origins.is_empty());
    assert_eq!(s.admin.bind, "127.0.0.1:2000");
    assert!(!s.admin.metrics_on_public);
    assert_eq!(s.log.format, link_counter::config::LogFormat::Json);

    for file in ["link-counter.conf", "link-counter-prefix.conf"] {
        let text = read(&repo(&format!("deploy/nginx/{file}")));
        assert!(
            text.contains(&format!("server {};", s.server.bind)),
            "{file}: upstream is server.bind"
        );
        // The cluster balancing on the visitor id, before `keepalive` as nginx requires.
        let hash = text.find("consistent;").expect("a consistent hash");
        assert!(
            text.contains("map $arg_visitor "),
            "{file}: keyed on the visitor id"
        );
        assert!(hash < text.find("keepalive").expect("keepalive"), "{file}");
    }

    let unit = read(&repo("deploy/systemd/link-counter.service"));
    let value = |key: &str| -> Vec<&str> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .collect()
    };
    assert_eq!(
        value("ExecStart"),
        ["/usr/local/bin/link-counter --config /etc/link-counter/config.toml"]
    );
    assert_eq!(value("User"), ["link-counter"]);
    assert_eq!(
        value("StateDirectory")
            .iter()
            .map(|d| Path::new("/var/lib").join(d))
            .collect::<Vec<_>>(),
        std::slice::from_ref(&s.storage.path),
        "StateDirectory is storage.path"
    );
    let nofile: usize = value("LimitNOFILE")[0].parse().expect("a number");
    assert!(nofile > 2 * s.limits.max_connections);

    // systemd's own check, where systemd is installed (ExecStart pointed at
    // the built binary, which is not in /usr/local/bin here).
    let analyze = Path::new("/usr/bin/systemd-analyze");
    if analyze.exists() {
        let dir = tempfile::tempdir().expect("tmp");
        let copy = dir.path().join("link-counter.service");
        write(
            &copy,
            &unit.replace(
                "/usr/local/bin/link-counter",
                crate::kit::child::binary_path(),
            ),
        );
        let out = Command::new(analyze)
            .arg("verify")
            .arg(&copy)
            .output()
            .expect("systemd-analyze runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !stderr.contains("link-counter.service"),
            "systemd-analyze verify:\n{stderr}"
        );
    }
}
