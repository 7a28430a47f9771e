//! runnel: a layer-4 tunnel from plaintext TCP (downstream) to mutual TLS (upstream).
//!
//! Data flow for one connection:
//!
//! ```text
//! server (permit, accept) -> tunnel -> detect (first bytes, ALPN offer)
//!                                   -> connect (resolve, TCP + TLS under one deadline)
//!                                   -> copy (both ways, half-close, resets) -> Outcome
//! ```
//!
//! Modules:
//! - `config`: the only reader of the environment; `Config` holds parsed, checked values.
//! - `material`: CA, client certificate and key, read and checked; the crypto provider.
//! - `tls`: one `ClientConfig` per ALPN offer, built once; the SSLKEYLOGFILE writer.
//! - `connect`: TCP connect and TLS handshake under one deadline; `dns` resolves.
//! - `detect`: the first downstream bytes and the ALPN offer they imply.
//! - `readahead`: the upstream socket under rustls, reading in large gulps when busy.
//! - `copy`: the two-way copy with half-close, truncation and reset handling.
//! - `tunnel`: one downstream connection end to end, one span, one outcome.
//! - `server`: the accept loop with permits and backoff.
//! - `admin`: `/metrics`, `/healthz`, `/readyz` on the metrics port.
//! - `pool`: pre-handshaken upstream connections; `admit` decides when a new one counts.
//! - `probe`: warms the pools, and probes the gateway when nothing else tried it lately,
//!   so that `/readyz` always rests on a recent attempt.
//! - `limits`: the file descriptor limit raised, and the connections that fit under it.
//! - `metrics`, `logging`, `socket`, `error`: names, output, socket options, types.
//! - `check`, `demo`: the `runnel check` and `runnel demo` commands.
//!
//! Layers, bottom to top; a module uses only modules in layers below its own:
//!
//! ```text
//! error, socket, readahead       types and socket plumbing; no crate imports
//! material                       TLS material and time helpers; uses error
//! config, metrics                parsed configuration; metric names and recorder
//! dns, limits, logging, tls      runtime pieces built from a Config
//! connect                        upstream connections; their readiness record
//! admit, copy, detect, reload    admission, the copy, first bytes, reloads
//! check, pool                    `runnel check`; the pools of ready connections
//! probe, tunnel                  readiness probe; one connection end to end
//! admin, server                  the admin port (READY_WINDOW from probe); accept loop
//! run (this file)                wiring
//! demo                           `runnel demo` (drives `run`)
//! ```
//!
//! [`run`] is the entry point: tests drive it on listeners they bound themselves.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod admit;
pub mod check;
pub mod config;
pub mod connect;
pub mod copy;
pub mod demo;
pub mod detect;
pub mod dns;
pub mod error;
pub mod limits;
pub mod logging;
pub mod material;
pub mod metrics;
pub mod pool;
pub mod probe;
pub mod readahead;
pub mod reload;
pub mod server;
pub mod socket;
pub mod tls;
pub mod tunnel;

use std::{future::Future, sync::Arc, sync::atomic::Ordering, time::Duration};

use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use crate::config::Config;
use crate::{admin::Health, connect::Connector, pool::Pools, tunnel::Shared};

/// After the drain deadline resets what is left, how long those tasks get to finish.
const ABORT_GRACE: Duration = Duration::from_secs(1);
/// The listeners runnel serves, bound by the caller (tests bind `127.0.0.1:0`).
pub struct Listeners {
    pub tunnel: TcpListener,
    /// `/metrics`, `/healthz`, `/readyz`; `None` when metrics are off.
    pub admin: Option<TcpListener>,
}

/// Serves until `shutdown` completes, then drains for `RUNNEL_DRAIN_TIMEOUT` and
/// resets what is still open.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), rustls::Error> {
    let prometheus = metrics::install();
    metrics::tls_loaded(&config.tls, false);
    // Exported from the start, so dashboards and alerts see 0 rather than nothing.
    ::metrics::gauge!(metrics::DRAINING).set(0.0);
    ::metrics::counter!(metrics::ACCEPT_ERRORS).increment(0);
    for kind in error::UPSTREAM_ERROR_KINDS {
        ::metrics::counter!(metrics::UPSTREAM_ERRORS, "kind" => kind).increment(0);
    }
    for reason in pool::Discard::ALL {
        ::metrics::counter!(metrics::POOL_DISCARDS, "reason" => reason.label()).increment(0);
    }
    let config = Arc::new(config);
    let connector = Arc::new(Connector::new(&config)?);
    let stop = CancellationToken::new();
    let pools = Pools::new(connector.clone(), &config, stop.clone());
    let shared = Arc::new(Shared {
        pools: pools.clone(),
        config: config.clone(),
        stop: stop.clone(),
        abort: CancellationToken::new(),
    });
    let tracker = TaskTracker::new();
    let health = Arc::new(Health::new(connector.clone(), config.cert_min_validity));
    let admin_stop = CancellationToken::new();

    tracker.spawn({
        let (connector, stop) = (connector.clone(), stop.clone());
        async move { connector.refresh_dns(stop).await }
    });
    pools.start(&tracker);
    tracker.spawn(reload::watch(
        config.clone(),
        connector.clone(),
        stop.clone(),
    ));
    tracker.spawn(probe::warm_up(
        config.clone(),
        pools.clone(),
        connector.clone(),
        stop.clone(),
    ));
    let admin_addr = listeners.admin.as_ref().and_then(|l| l.local_addr().ok());
    if let Some(admin) = listeners.admin {
        // The admin port has its own tracker: it keeps answering (/readyz = 503) while draining.
        tokio::spawn(admin::serve(
            admin,
            prometheus,
            health.clone(),
            admin_stop.clone(),
            TaskTracker::new(),
        ));
    }
    let listen_addr = listeners.tunnel.local_addr().ok();
    health.listening.store(true, Ordering::Relaxed);
    tracing::info!(
        listen.addr = listen_addr.map(|a| a.to_string()),
        metrics.addr = admin_addr.map(|a| a.to_string()),
        upstream = %config.upstream,
        server_name = %config.server_name.to_str(),
        // What the instance will hold, after the memory-derived default and the
        // descriptor cap: an operator sees why connections queue.
        max_connections = config.max_connections,
        memory.limit_bytes = config::memory_limit(),
        "listening"
    );

    server::accept_loop(listeners.tunnel, shared.clone(), &tracker, shutdown).await;

    health.draining.store(true, Ordering::Relaxed);
    ::metrics::gauge!(metrics::DRAINING).set(1.0);
    stop.cancel();
    tracker.close();
    tracing::info!(
        open = tracker.len(),
        drain_timeout_ms = config.drain_timeout.as_millis() as u64,
        "draining"
    );
    if tokio::time::timeout(config.drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = tracker.len(),
            "drain deadline reached; resetting open connections"
        );
        shared.abort.cancel();
        let _ = tokio::time::timeout(ABORT_GRACE, tracker.wait()).await;
    }
    admin_stop.cancel();
    tracing::info!("stopped");
    Ok(())
}
