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
//! - `tls`: CA, client identity and one `ClientConfig` per ALPN offer, built once.
//! - `connect`: TCP connect and TLS handshake under one deadline; `dns` resolves.
//! - `detect`: the first downstream bytes and the ALPN offer they imply.
//! - `readahead`: the upstream socket under rustls, reading in large gulps when busy.
//! - `copy`: the two-way copy with half-close, truncation and reset handling.
//! - `tunnel`: one downstream connection end to end, one span, one outcome.
//! - `server`: the accept loop with permits and backoff.
//! - `admin`: `/metrics`, `/healthz`, `/readyz` on the metrics port.
//! - `limits`: the file descriptor limit raised, and the connections that fit under it.
//! - `metrics`, `logging`, `socket`, `error`: names, output, socket options, types.
//! - `check`, `demo`: the `runnel check` and `runnel demo` commands.
//!
//! [`run`] is the entry point: tests drive it on listeners they bound themselves.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
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
pub mod metrics;
pub mod pool;
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
/// The least time start-up waits for the pools to warm before logging "ready".
const WARM_UP_MIN: Duration = Duration::from_secs(1);
/// A probe connection is made when no connection was attempted for this long, so
/// readiness always rests on an attempt at most this old (plus one connect timeout).
const PROBE_EVERY: Duration = Duration::from_secs(5);
/// While the latest attempt failed, probes retry this often at most: a gateway that
/// comes back is seen within this, plus one handshake.
const PROBE_RETRY_MAX: Duration = Duration::from_secs(2);
/// `/readyz` needs the gateway to have accepted a connection within this (probes keep
/// it fresh), and no run of failures since.
pub const READY_WINDOW: Duration = Duration::from_secs(20);

/// Warms the pools and logs "ready"; bounded: an unreachable gateway delays readiness,
/// never serving. Then probes the gateway whenever nothing else tried it lately.
async fn warm_up(
    config: Arc<Config>,
    pools: Arc<Pools>,
    connector: Arc<Connector>,
    stop: CancellationToken,
) {
    let started = tokio::time::Instant::now();
    if pools.enabled() {
        let warm = pools
            .warm(started + config.connect_timeout.max(WARM_UP_MIN))
            .await;
        tracing::info!(
            pool.idle = pools.idle(),
            warm,
            took_ms = started.elapsed().as_millis() as u64,
            "ready"
        );
    }
    probe(&config, connector, !pools.enabled(), stop).await
}

/// `/readyz` judges the gateway by the latest attempts (pool refills, traffic, these
/// probes). An idle instance makes none on its own (a full pool and no traffic), so when
/// no connection was attempted for `PROBE_EVERY`, one probe connection (handshake,
/// admission, close_notify) is; while attempts fail, probes retry with backoff up to
/// `PROBE_RETRY_MAX`, so recovery shows within seconds. Failures are logged once.
async fn probe(
    config: &Config,
    connector: Arc<Connector>,
    log_ready: bool,
    stop: CancellationToken,
) {
    let offer = connect::Offer::plain(&config.alpn);
    let started = tokio::time::Instant::now();
    let (mut ready_logged, mut failing) = (!log_ready, false);
    let mut backoff = Duration::from_millis(100);
    loop {
        let wait = if connector.attempted_within(PROBE_EVERY) && !connector.failing() {
            PROBE_EVERY / 5
        } else {
            let probed = tokio::select! {
                r = probe_once(&connector, offer) => r,
                _ = stop.cancelled() => return,
            };
            match probed {
                Ok(()) => {
                    connector.mark_accepted();
                    backoff = Duration::from_millis(100);
                    if !ready_logged {
                        ready_logged = true;
                        tracing::info!(took_ms = started.elapsed().as_millis() as u64, "ready");
                    } else if failing {
                        tracing::info!("probe: the gateway answers again");
                    }
                    failing = false;
                    PROBE_EVERY / 5
                }
                Err(reason) => {
                    if !failing {
                        failing = true;
                        tracing::warn!(
                            reason,
                            "probe: the gateway is not reachable; retrying with backoff (logged once until it recovers)"
                        );
                    }
                    backoff = (backoff * 2).min(PROBE_RETRY_MAX);
                    backoff
                }
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// One probe connection: connected, admitted, closed with close_notify.
async fn probe_once(connector: &Connector, offer: connect::Offer) -> Result<(), String> {
    let mut c = connector.connect(offer).await.map_err(|e| {
        metrics::upstream_error(e.kind());
        e.to_string()
    })?;
    if let Err(reason) = pool::admit(connector, &mut c).await {
        return Err(format!(
            "the gateway ended the connection right after the handshake ({})",
            reason.label()
        ));
    }
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::io::AsyncWriteExt::shutdown(&mut c.stream),
    )
    .await;
    Ok(())
}

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
    tracker.spawn(warm_up(
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
