//! A child process that serves: the built link-counter binary (or any
//! command printing `listening on ADDR`, then `admin listening on ADDR` when
//! it has an admin listener), its addresses, its output, signals and stop.

use std::{
    io::{BufRead, BufReader, Read},
    net::SocketAddr,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread::JoinHandle,
    time::Duration,
};

use super::wait::{eventually_blocking_within, PATIENCE};

/// The binary `cargo` built for these tests or benches.
pub fn binary_path() -> &'static str {
    env!("CARGO_BIN_EXE_link-counter")
}

/// A command running [`binary_path`] (logs at `warn` unless `RUST_LOG` is
/// set on the command later).
pub fn binary() -> Command {
    let mut cmd = Command::new(binary_path());
    cmd.env("RUST_LOG", "warn");
    cmd
}

/// Where the child's standard error goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stderr {
    /// This process's standard error.
    Inherit,
    /// Collected (drained all along, so the child never blocks on it):
    /// [`Running::stop`] returns it, and a failed start shows it.
    Collect,
    /// Line by line through [`Running::stderr_lines`].
    Lines,
}

/// What dropping a [`Running`] does to a child that still runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnDrop {
    /// SIGKILL.
    Kill,
    /// SIGTERM, SIGKILL if it has not exited within the duration (a profiler
    /// wrapping the service writes its output on exit).
    Term(Duration),
}

/// How to start the child.
#[derive(Clone, Copy, Debug)]
pub struct Spawn {
    /// It prints `admin listening on ADDR` after `listening on ADDR`.
    pub admin_line: bool,
    pub stderr: Stderr,
    pub on_drop: OnDrop,
}

impl Default for Spawn {
    fn default() -> Spawn {
        Spawn {
            admin_line: true,
            stderr: Stderr::Inherit,
            on_drop: OnDrop::Kill,
        }
    }
}

impl Spawn {
    pub fn admin_line(mut self, yes: bool) -> Spawn {
        self.admin_line = yes;
        self
    }
    pub fn stderr(mut self, stderr: Stderr) -> Spawn {
        self.stderr = stderr;
        self
    }
    pub fn on_drop(mut self, on_drop: OnDrop) -> Spawn {
        self.on_drop = on_drop;
        self
    }

    /// Spawns `cmd` and waits for its address line(s); panics (with what it
    /// printed) if it exits or prints something else first.
    pub fn start(self, mut cmd: Command) -> Running {
        cmd.stdout(Stdio::piped()).stderr(match self.stderr {
            Stderr::Inherit => Stdio::inherit(),
            Stderr::Collect | Stderr::Lines => Stdio::piped(),
        });
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()));
        let (collected, lines) = match self.stderr {
            Stderr::Inherit => (None, None),
            Stderr::Collect => {
                let mut err = child.stderr.take().expect("piped stderr");
                let collect = std::thread::spawn(move || {
                    let mut text = String::new();
                    let _ = err.read_to_string(&mut text);
                    text
                });
                (Some(collect), None)
            }
            Stderr::Lines => {
                let err = child.stderr.take().expect("piped stderr");
                let (tx, rx) = mpsc::channel();
                std::thread::spawn(move || {
                    for line in BufReader::new(err).lines().map_while(Result::ok) {
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                });
                (None, Some(rx))
            }
        };
        let mut running = Running {
            child,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin: None,
            stderr: collected,
            lines,
            on_drop: self.on_drop,
        };
        let mut stdout = BufReader::new(running.child.stdout.take().expect("piped stdout"));
        let mut address = |prefix: &str, running: &mut Running| -> SocketAddr {
            let mut line = String::new();
            let _ = stdout.read_line(&mut line);
            match line.trim().strip_prefix(prefix).map(str::parse) {
                Some(Ok(addr)) => addr,
                _ => {
                    let _ = running.child.kill();
                    let _ = running.child.wait();
                    let stderr = running.stderr.take().map(|h| h.join().unwrap_or_default());
                    panic!(
                        "{:?} did not start: expected `{prefix}ADDR`, got {line:?}\n{}",
                        cmd.get_program(),
                        stderr.unwrap_or_default()
                    );
                }
            }
        };
        running.addr = address("listening on ", &mut running);
        if self.admin_line {
            running.admin = Some(address("admin listening on ", &mut running));
        }
        // Keep reading stdout so the child never writes to a closed pipe.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        running
    }
}

/// A started child (see [`Spawn::start`]).
pub struct Running {
    child: Child,
    /// What `listening on` reported.
    pub addr: SocketAddr,
    /// What `admin listening on` reported (when [`Spawn::admin_line`]).
    pub admin: Option<SocketAddr>,
    stderr: Option<JoinHandle<String>>,
    lines: Option<mpsc::Receiver<String>>,
    on_drop: OnDrop,
}

impl Running {
    /// The built binary with `cmd`'s arguments and environment: [`Spawn`]'s
    /// defaults (admin line, stderr inherited, killed on drop).
    pub fn start(cmd: Command) -> Running {
        Spawn::default().start(cmd)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Not exited yet.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends `signal` (`libc::SIGSTOP`, …); panics if it cannot be sent.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid, which is not reaped yet
        // (only `kill9`, `terminate` and drop reap it, and they take `self`
        // or leave no caller).
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(rc, 0, "kill -{signal} {}", self.child.id());
    }

    /// SIGKILL, then reaps: no graceful shutdown, nothing flushed.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit (panics after `patience`).
    pub fn terminate_within(&mut self, patience: Duration) -> ExitStatus {
        self.signal(libc::SIGTERM);
        eventually_blocking_within(patience, "the child to exit on SIGTERM", || {
            self.child.try_wait().expect("wait")
        })
    }

    /// SIGTERM, then waits for the exit (panics after [`PATIENCE`]).
    pub fn terminate(&mut self) -> ExitStatus {
        self.terminate_within(PATIENCE)
    }

    /// [`Running::terminate`]: (exit code, standard error when collected).
    pub fn stop(mut self) -> (i32, String) {
        let code = self.terminate().code().unwrap_or(-1);
        let stderr = self
            .stderr
            .take()
            .map(|h| h.join().expect("stderr text"))
            .unwrap_or_default();
        (code, stderr)
    }

    /// The lines of standard error as they come ([`Stderr::Lines`]; once).
    pub fn stderr_lines(&mut self) -> mpsc::Receiver<String> {
        self.lines
            .take()
            .expect("started with Stderr::Lines, taken once")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.alive() {
            // Already reaped: its pid may belong to another process now.
            return;
        }
        if let OnDrop::Term(grace) = self.on_drop {
            // SAFETY: kill(2) on our own child, alive and not reaped.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = std::time::Instant::now() + grace;
            while std::time::Instant::now() < deadline && self.alive() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
