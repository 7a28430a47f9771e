//! Start-up warming and the readiness probe.
//!
//! `/readyz` judges the gateway by the latest connection attempts
//! (`Connector::gateway_ok`). Pool refills and traffic make attempts; an idle instance
//! with a full pool makes none, so this module makes one whenever nothing was attempted
//! for `PROBE_EVERY`.
//!
//! Invariant: while runnel serves, no attempt is ever older than `PROBE_EVERY` plus one
//! connect timeout, so readiness never rests on a stale success.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{
    admit,
    config::Config,
    connect::{Connector, Offer},
    metrics,
    pool::Pools,
};

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
pub async fn warm_up(
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
    let offer = Offer::plain(&config.alpn);
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
async fn probe_once(connector: &Connector, offer: Offer) -> Result<(), String> {
    let mut c = connector.connect(offer).await.map_err(|e| {
        metrics::upstream_error(e.kind());
        e.to_string()
    })?;
    if let Err(reason) = admit::admit(connector, &mut c).await {
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
