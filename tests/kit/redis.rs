//! `redis-server` for the tests and benches: one on a free port with a temp
//! dir (kill -9 and restart on the same port), a Redis Cluster of several
//! masters, and the parsing of `INFO` (`commandstats`, `memory`).

use std::{
    collections::BTreeMap,
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::Duration,
};

use super::wait::{eventually_blocking, on_free_ports};

/// Whether `redis-server` is installed; when not, says so once on stdout, or
/// panics if `LINK_COUNTER_REQUIRE_REDIS` is set (test.sh and CI set it).
/// The skip rule of the tests that need Redis.
pub fn redis_available() -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        if std::env::var_os("LINK_COUNTER_REQUIRE_REDIS").is_some() {
            panic!("LINK_COUNTER_REQUIRE_REDIS is set but redis-server is not installed");
        }
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            println!("Redis tests skipped: redis-server not installed");
        });
    }
    found
}

/// A free TCP port on 127.0.0.1 (free when asked).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind port 0")
        .local_addr()
        .expect("addr")
        .port()
}

/// `n` distinct free ports for Redis Cluster nodes: each at most 55535 (a
/// node's cluster bus listens 10000 above its port, and `redis-server`
/// refuses to start past that), with its bus port free too and no port
/// another's bus port. A port from `free_port` is above 55535 about one
/// time in five.
pub fn free_cluster_ports(n: usize) -> Vec<u16> {
    const MAX: u16 = u16::MAX - 10_000;
    let mut ports: Vec<u16> = Vec::new();
    while ports.len() < n {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
        let p = listener.local_addr().expect("addr").port();
        let taken = |q: u16| {
            ports
                .iter()
                .any(|o| *o == q || *o + 10_000 == q || q + 10_000 == *o)
        };
        if p <= MAX && !taken(p) && TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            ports.push(p);
        }
    }
    ports
}

/// Whether a Redis at `port` answers `PING`.
pub fn ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// `redis-cli -p port ARGS…`: its standard output.
pub fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A `redis-server` child on a free port without persistence (a restart
/// loses everything, the hardest case for convergence), its files in a temp
/// dir.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    extra: Vec<String>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// A server, or `None` when `redis-server` is not installed (see
    /// [`redis_available`]: the tests' skip rule).
    pub fn start() -> Option<RedisServer> {
        redis_available().then(|| RedisServer::launch(&[]))
    }

    /// A server with extra `redis-server` arguments (`--maxmemory`, …);
    /// panics if it cannot start (benches).
    pub fn launch(extra: &[&str]) -> RedisServer {
        let mut r = RedisServer {
            port: 0,
            child: None,
            extra: extra.iter().map(|a| a.to_string()).collect(),
            dir: tempfile::tempdir().expect("temp dir"),
        };
        on_free_ports("redis-server", || {
            r.port = free_port();
            r.start_answering().then_some(())
        });
        r
    }

    /// `redis://127.0.0.1:PORT/`, for `cluster.redis_url`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Starts (again, after [`RedisServer::stop`]) on the same port and
    /// waits until it answers `PING`.
    pub fn restart(&mut self) {
        assert!(
            self.start_answering(),
            "redis-server exited on restart (port {} taken?)",
            self.port
        );
    }

    /// Starts on `self.port`; true once it answers `PING`, false if it
    /// exited first.
    fn start_answering(&mut self) -> bool {
        self.stop();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts (apt-get install redis-server)");
        let port = self.port;
        let child = self.child.insert(child);
        eventually_blocking("redis-server to answer PING or exit", || {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return Some(false);
            }
            ping(port).then_some(true)
        })
    }

    /// kill -9 (nothing saved).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The server's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `redis-cli` against this server; its standard output.
    pub fn cli(&self, args: &[&str]) -> String {
        cli(self.port, args)
    }

    /// `INFO section`.
    pub fn info(&self, section: &str) -> String {
        self.cli(&["info", section])
    }

    /// `INFO commandstats` as command name -> calls (commands run by scripts included).
    pub fn commandstats(&self) -> BTreeMap<String, u64> {
        commandstats(&self.info("commandstats"))
    }

    /// `used_memory` of `INFO memory`, in bytes.
    pub fn used_memory(&self) -> u64 {
        info_field(&self.info("memory"), "used_memory")
            .and_then(|v| v.parse().ok())
            .expect("INFO memory has used_memory")
    }

    /// The liveness sorted set: node id -> deadline (Redis ms).
    pub fn live_set(&self) -> BTreeMap<String, u64> {
        let out = self.cli(&["zrange", "link-counter:{live}z", "0", "-1", "withscores"]);
        let words: Vec<&str> = out.lines().map(str::trim).collect();
        words
            .chunks(2)
            .filter_map(|w| Some((w.first()?.to_string(), w.get(1)?.parse().ok()?)))
            .collect()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The value of `key` in an `INFO` answer (`key:value` lines).
pub fn info_field<'a>(info: &'a str, key: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix(':'))
}

/// `INFO commandstats` as command name -> calls.
pub fn commandstats(info: &str) -> BTreeMap<String, u64> {
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_string(), calls))
        })
        .collect()
}

/// A real Redis Cluster of `n` masters (no replicas) on free ports, created
/// with `redis-cli --cluster create`.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    children: Vec<Child>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    pub fn start(n: usize) -> RedisCluster {
        let cluster = on_free_ports("a Redis Cluster", || RedisCluster::try_start(n));
        cluster.create();
        cluster
    }

    /// The nodes on fresh ports, once each answers `PING`; `None` (all
    /// stopped) if one exited first.
    fn try_start(n: usize) -> Option<RedisCluster> {
        let dir = tempfile::tempdir().expect("tmp");
        let ports = free_cluster_ports(n);
        let children = ports
            .iter()
            .map(|p| {
                let node_dir = dir.path().join(p.to_string());
                std::fs::create_dir(&node_dir).expect("node dir");
                Command::new("redis-server")
                    .args(["--port", &p.to_string(), "--bind", "127.0.0.1"])
                    .args(["--cluster-enabled", "yes"])
                    .args(["--save", "", "--appendonly", "no"])
                    .arg("--dir")
                    .arg(&node_dir)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("redis-server starts")
            })
            .collect();
        let mut cluster = RedisCluster {
            ports,
            children,
            _dir: dir,
        };
        let ports = cluster.ports.clone();
        let children = &mut cluster.children;
        let started =
            eventually_blocking("every redis-server to answer PING or one to exit", || {
                if children
                    .iter_mut()
                    .any(|c| matches!(c.try_wait(), Ok(Some(_))))
                {
                    return Some(false);
                }
                ports.iter().all(|p| ping(*p)).then_some(true)
            });
        started.then_some(cluster)
    }

    /// `redis-cli --cluster create`, then waits until every master agrees
    /// the cluster is up.
    fn create(&self) {
        let addrs: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        for p in &self.ports {
            eventually_blocking("every master to report cluster_state:ok", || {
                cli(*p, &["cluster", "info"]).contains("cluster_state:ok")
            });
        }
    }

    /// Seed URLs for `cluster.redis_url` (the first two masters).
    pub fn urls(&self) -> String {
        let urls: Vec<String> = self.ports[..2]
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect();
        urls.join(",")
    }

    /// `redis-cli` against the master on `port`.
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        cli(port, args)
    }

    /// Calls of `command` summed over the masters.
    pub fn calls(&self, command: &str) -> u64 {
        self.ports
            .iter()
            .map(|p| {
                let stats = commandstats(&cli(*p, &["info", "commandstats"]));
                stats.get(command).copied().unwrap_or(0)
            })
            .sum()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
