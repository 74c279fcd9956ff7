//! The `link-counter` binary: parse the command line, load and validate the
//! configuration, start tracing, serve until SIGINT/SIGTERM.
//!
//! Exit status: 0 after a clean shutdown, 2 for a usage or configuration
//! error (nothing was opened or bound), 1 for a runtime error (storage,
//! listener, signal handlers).

use std::{path::PathBuf, process::ExitCode};

use link_counter::{
    config::{self, Settings},
    shutdown,
    storage::Storage,
    Server,
};

const USAGE: &str = "usage: link-counter [--config FILE]

Serves live page-view counts over WebSocket (PartyKit link-counter protocol).
Settings: embedded defaults (config/default.toml), then FILE, then
environment variables LINK_COUNTER__SECTION__KEY (e.g. LINK_COUNTER__SERVER__BIND=0.0.0.0:8080).
Logs: log.format (text|json) and log.filter; RUST_LOG wins when set.
Operators: /metrics and /dashboard on admin.bind (default 127.0.0.1:2000).
Exit status: 0 after SIGINT/SIGTERM, 2 for a configuration error, 1 for a
runtime error (storage.path unusable, address in use).";

fn main() -> ExitCode {
    let config_file = match parse_args() {
        Ok(file) => file,
        Err(code) => return code,
    };
    let settings = match load_settings(config_file) {
        Ok(s) => s,
        Err(code) => return code,
    };
    return_freed_memory();

    // Its errors name storage.path (a second instance on the same directory
    // is told so).
    let storage = match Storage::open_with(
        &settings.storage.path,
        settings.storage.cache_capacity,
        settings.storage.compression,
    ) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("link-counter: {e}");
            return ExitCode::from(1);
        }
    };
    let listener = match link_counter::server::bind(settings.server.bind) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "link-counter: {}",
                config::bind_error("server.bind", settings.server.bind, &e)
            );
            return ExitCode::from(1);
        }
    };
    actix_rt::System::new().block_on(serve(settings, listener, storage))
}

/// The command line: the config file, if one is given; `Err` with the exit
/// status after `--help`, `--version` or a usage error.
fn parse_args() -> Result<Option<PathBuf>, ExitCode> {
    // `args_os`: a non-UTF-8 argument is refused (or taken as a path), never a panic.
    let mut args = std::env::args_os().skip(1);
    let mut config_file: Option<PathBuf> = None;
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--config" | "-c") => match args.next() {
                Some(f) => config_file = Some(PathBuf::from(f)),
                None => {
                    eprintln!("link-counter: --config needs a FILE\n\n{USAGE}");
                    return Err(ExitCode::from(2));
                }
            },
            Some("--help" | "-h") => {
                println!("{USAGE}");
                return Err(ExitCode::SUCCESS);
            }
            Some("--version" | "-V") => {
                println!("link-counter {}", env!("CARGO_PKG_VERSION"));
                return Err(ExitCode::SUCCESS);
            }
            _ => {
                eprintln!("link-counter: unknown argument {arg:?}\n\n{USAGE}");
                return Err(ExitCode::from(2));
            }
        }
    }
    Ok(config_file)
}

/// The settings (defaults, `file`, the environment), then logging started
/// and the settings logged; `Err(2)` after printing a configuration error
/// (and the warnings about ignored variables).
fn load_settings(file: Option<PathBuf>) -> Result<Settings, ExitCode> {
    let env = config::process_env().map_err(|e| {
        eprintln!("link-counter: {e}");
        ExitCode::from(2)
    })?;
    let warnings = config::env_warnings(env.iter().map(|(name, _)| name));
    let settings = Settings::load_from(file.as_deref(), env).map_err(|e| {
        eprintln!("link-counter: {e}");
        for w in &warnings {
            eprintln!("link-counter: warning: {w}");
        }
        ExitCode::from(2)
    })?;
    link_counter::logging::init(&settings.log);
    for w in &warnings {
        tracing::warn!("{w}");
    }
    link_counter::logging::log_settings(&settings);
    Ok(settings)
}

/// Starts the server on `listener`, prints the listening lines, and serves
/// until SIGINT or SIGTERM.
async fn serve(settings: Settings, listener: std::net::TcpListener, storage: Storage) -> ExitCode {
    let server = match Server::start_with_storage(settings, listener, storage).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("link-counter: {e}");
            return ExitCode::from(1);
        }
    };
    let mut signals = match shutdown::Signals::install() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("link-counter: cannot install signal handlers: {e}");
            server.shutdown().await;
            return ExitCode::from(1);
        }
    };
    // Machine-readable line for scripts and tests that bind port 0.
    println!("listening on {}", server.local_addr());
    if let Some(admin) = server.admin_addr() {
        // Readers may stop after the first line: a closed stdout is fine here.
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), "admin listening on {admin}");
    }
    signals.recv().await;
    server.shutdown().await;
    ExitCode::SUCCESS
}

/// glibc's allocator keeps memory freed by one thread in that thread's arena
/// and returns little of it to the system on its own, so after a flood of
/// page ids (rooms and pages created, then dropped) the process would keep
/// its peak RSS. A background thread hands free pages back every 5 s.
fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    std::thread::Builder::new()
        .name("lc-malloc-trim".into())
        .spawn(|| loop {
            std::thread::sleep(std::time::Duration::from_secs(5));
            // SAFETY: malloc_trim only releases free heap memory; it is
            // thread-safe and takes no pointers.
            unsafe {
                libc::malloc_trim(0);
            }
        })
        .map(drop)
        .unwrap_or_else(|e| eprintln!("link-counter: no malloc-trim thread: {e}"));
}
