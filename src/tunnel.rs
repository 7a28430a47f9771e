//! One downstream connection, end to end: first bytes, upstream, copy, outcome.
//!
//! Invariant: no upstream connection is opened before the downstream has sent a
//! byte (a TCP probe that closes costs the gateway nothing), and every path out of
//! `handle` records exactly one outcome.

use std::{net::SocketAddr, sync::Arc};

use tokio::{net::TcpStream, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, field::Empty};

use crate::{
    config::Config,
    connect::HandshakeInfo,
    copy::{self, Report},
    detect,
    error::Outcome,
    logging::{ACCESS_LOG_TARGET, RateLimit, WARN_INTERVAL},
    metrics::{self, Handles},
    pool::Pools,
    socket,
};

/// Rate limit of the per-connection "upstream connection failed" warning.
static UPSTREAM_FAILED: RateLimit = RateLimit::new(WARN_INTERVAL);

/// What every connection shares.
pub struct Shared {
    pub config: Arc<Config>,
    pub pools: Arc<Pools>,
    /// Stop accepting; connections that have not sent a byte yet close.
    pub stop: CancellationToken,
    /// The drain deadline passed: reset whatever is still open.
    pub abort: CancellationToken,
}

/// Serves one accepted downstream connection.
pub async fn handle(down: TcpStream, peer: SocketAddr, id: u64, shared: Arc<Shared>) {
    // A debug span: at the default info level it is disabled and costs nothing per
    // connection (its JSON fields would be formatted on every record otherwise); the
    // one warning a connection can log carries its own fields.
    let span = tracing::debug_span!(
        "conn",
        conn.id = id,
        downstream.addr = %peer,
        upstream.addr = Empty,
        alpn = Empty,
        tls.resumed = Empty,
        pool.hit = Empty,
    );
    let handles = Handles::get();
    handles.accepted.increment(1);
    handles.active.increment(1.0);
    let accepted = Instant::now();
    let (report, upstream) = serve(down, &shared).instrument(span.clone()).await;
    let lifetime = accepted.elapsed();
    handles.active.decrement(1.0);
    handles.closed(report.outcome, lifetime);
    if let Some(at) = report.first_upstream_write {
        handles
            .first_byte
            .record(at.saturating_duration_since(accepted));
    }
    if let Some(kind) = report.upstream_error {
        metrics::upstream_error(kind);
    }
    let _entered = span.enter();
    tracing::debug!(
        outcome = report.outcome.label(),
        bytes.to_upstream = report.to_upstream,
        bytes.to_downstream = report.to_downstream,
        closed_first = report.closed_first.map(copy::Side::label),
        duration_ms = lifetime.as_secs_f64() * 1000.0,
        "connection closed"
    );
    if shared.config.access_log {
        access_log(peer, &report, upstream.as_ref(), lifetime);
    }
}

/// One line per closed connection, Cloud Logging field conventions (no `httpRequest`:
/// runnel is L4).
fn access_log(
    peer: SocketAddr,
    report: &Report,
    up: Option<&HandshakeInfo>,
    lifetime: std::time::Duration,
) {
    tracing::info!(
        target: ACCESS_LOG_TARGET,
        downstream_addr = %peer,
        upstream_addr = up.map(|u| u.addr.to_string()),
        duration_ms = lifetime.as_secs_f64() * 1000.0,
        bytes_to_upstream = report.to_upstream,
        bytes_to_downstream = report.to_downstream,
        outcome = report.outcome.label(),
        closed_first = report.closed_first.map(copy::Side::label),
        alpn = up.and_then(|u| u.alpn.as_deref()),
        tls_version = up.map(|u| u.version.as_str()),
        tls_group = up.map(|u| u.kx_group.as_str()),
        tls_resumed = up.map(|u| u.resumed),
        pool_hit = up.map(|u| u.pooled),
        "connection closed"
    );
}

async fn serve(mut down: TcpStream, shared: &Shared) -> (Report, Option<HandshakeInfo>) {
    let ended = |outcome| (Report::ended(outcome), None);
    socket::downstream(&down);
    let first = tokio::select! {
        // Biased: a request already in the socket is served even when SIGTERM came in
        // the same instant (closing on unread bytes would reset the client).
        biased;
        first = detect::first_bytes(&mut down, &shared.config.alpn) => first,
        // Draining: nothing was asked yet, so closing loses nothing.
        _ = shared.stop.cancelled() => return ended(Outcome::NoData),
        _ = idle(shared) => return ended(Outcome::IdleTimeout),
    };
    let (initial, offer) = match first {
        Ok(Some(first)) => first,
        Ok(None) => return ended(Outcome::NoData),
        Err(_) => {
            socket::abort(&down);
            return ended(Outcome::DownstreamReset);
        }
    };
    let waiting = Instant::now();
    let connected = tokio::select! {
        // Boxed: a task is as large as its largest await point, and the checkout (TLS
        // handshake, Happy Eyeballs: ~2 KB) is dead weight for the rest of a connection's
        // life. Boxed, an idle connection's task holds only the copy.
        c = Box::pin(shared.pools.checkout(offer)) => c,
        _ = shared.abort.cancelled() => {
            socket::abort(&down);
            return ended(Outcome::DrainAborted);
        }
    };
    let connected = match connected {
        Ok((c, hit)) => {
            metrics::upstream_wait(hit, waiting.elapsed());
            c
        }
        Err(e) => {
            // An outage fails every connection: one line per kind per interval, not one
            // per connection (runnel_upstream_errors_total counts them all).
            if let Some(suppressed) = UPSTREAM_FAILED.check(e.kind()) {
                tracing::warn!(
                    error = %e,
                    kind = e.kind(),
                    upstream = %shared.config.upstream,
                    downstream.addr = %down.peer_addr().map_or_else(|_| "unknown".to_owned(), |a| a.to_string()),
                    suppressed,
                    "upstream connection failed; resetting the downstream"
                );
            }
            socket::abort(&down);
            let mut report = Report::ended(e.outcome());
            report.upstream_error = Some(e.kind());
            return (report, None);
        }
    };
    let span = tracing::Span::current();
    span.record(
        "upstream.addr",
        tracing::field::display(connected.info.addr),
    );
    span.record("alpn", connected.info.alpn.as_deref().unwrap_or("none"));
    span.record("tls.resumed", connected.info.resumed);
    span.record("pool.hit", connected.info.pooled);
    let info = connected.info;
    let mut report = copy::run(
        down,
        connected.stream,
        initial,
        connected.early,
        shared.config.idle_timeout,
        &shared.abort,
        // The gateway answered a connection made just now: readiness holds from now, not
        // from the end of the stream. A pooled one proves only that it accepted a
        // connection up to RUNNEL_POOL_MAX_IDLE ago.
        || {
            if !info.pooled {
                shared.pools.mark_accepted()
            }
        },
    )
    .await;
    // Under TLS 1.3 a refused client certificate is an alert after the client's
    // handshake: to the user it is the handshake that failed.
    if report.upstream_error == Some("certificate_rejected") && report.to_downstream == 0 {
        report.outcome = Outcome::HandshakeFailed;
        shared.pools.mark_failed();
    }
    (report, Some(info))
}

/// Completes after the idle timeout, or never when it is off.
async fn idle(shared: &Shared) {
    match shared.config.idle_timeout {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}
