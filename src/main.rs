//! The `runnel` binary: parse the command line and the environment, set up logging
//! and the runtime, and hand over to the library.

use std::{net::SocketAddr, process::ExitCode};

use clap::{Parser, Subcommand};
use runnel::{Config, Listeners, config, demo, limits, logging};
use tokio::net::TcpListener;

/// Configuration error: one line `VARIABLE: reason` (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// Runtime failure: cannot listen, `check` failed.
const EXIT_FAILURE: u8 = 1;

#[derive(Parser)]
#[command(version, about = "A layer-4 tunnel: plaintext TCP downstream, mutual TLS upstream.", after_help = config::help_table())]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default).
    Serve,
    /// Connect and handshake once with this configuration, and print what was negotiated.
    Check,
    /// A real tunnel in front of a built-in local mTLS gateway, with throwaway certificates.
    Demo {
        /// Where the demo tunnel listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Where the demo serves /metrics ("off" to disable).
        #[arg(long, default_value = "127.0.0.1:9090")]
        metrics: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Demo { listen, metrics }) = cli.command {
        return demo_main(listen, &metrics);
    }
    let (mut config, warnings) = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // Held to the end of main: dropping it flushes the lines still queued.
    let _logs = logging::init(&config.log_filter, config.log_format, config.access_log);
    for w in &warnings {
        tracing::warn!("{w}");
    }
    fit_descriptors(&mut config);
    let runtime = match runtime(config.workers) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("RUNNEL_WORKERS: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match cli.command {
        Some(Command::Check) => runtime.block_on(async {
            match runnel::check::run(&config).await {
                Ok(report) => {
                    print!("{report}");
                    ExitCode::SUCCESS
                }
                Err(reason) => {
                    eprintln!("check failed: {reason}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }),
        _ => runtime.block_on(serve(config)),
    }
}

async fn serve(config: Config) -> ExitCode {
    let tunnel = match TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("RUNNEL_LISTEN: cannot listen on {}: {e}", config.listen);
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let admin = match config.metrics_addr {
        Some(addr) => match TcpListener::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("RUNNEL_METRICS_ADDR: cannot listen on {addr}: {e}");
                return ExitCode::from(EXIT_FAILURE);
            }
        },
        None => None,
    };
    match runnel::run(config, Listeners { tunnel, admin }, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the TLS configuration");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn demo_main(listen: SocketAddr, metrics: &str) -> ExitCode {
    let metrics = match metrics {
        "off" => None,
        m => match m.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                eprintln!("--metrics: {m:?} is not an address or off");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
    };
    let _logs = logging::init("info", config::LogFormat::Text, false);
    let result = runtime(2).map_err(|e| e.to_string()).and_then(|rt| {
        rt.block_on(demo::run(
            demo::DemoOptions { listen, metrics },
            shutdown_signal(),
        ))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("runnel demo: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Raises the descriptor limit and, if `RUNNEL_MAX_CONNECTIONS` still does not fit,
/// lowers the connection limit to what does, with one warning.
fn fit_descriptors(config: &mut Config) {
    let fds = match limits::raise_nofile() {
        Ok(fds) => fds,
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the file descriptor limit");
            let limit = limits::soft_nofile();
            limits::Descriptors {
                before: limit,
                limit,
            }
        }
    };
    let fit = limits::fit(config.max_connections, limits::pooled(config), fds.limit);
    if fit.connections < config.max_connections {
        tracing::warn!(
            fd.limit = fds.limit,
            fd.needed = fit.needed,
            max_connections.configured = config.max_connections,
            max_connections.effective = fit.connections,
            "RUNNEL_MAX_CONNECTIONS: {} connections need {} file descriptors but the limit is {}; serving at most {} at once",
            config.max_connections,
            fit.needed,
            fds.limit,
            fit.connections,
        );
        config.max_connections = fit.connections;
    }
    tracing::debug!(
        fd.before = fds.before,
        fd.limit = fds.limit,
        "file descriptor limit"
    );
}

fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
}

/// Completes on SIGTERM (Cloud Run's stop signal) or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "shutting down"),
    }
}
