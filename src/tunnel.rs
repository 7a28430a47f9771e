//! One downstream connection, end to end: first bytes, upstream, copy, outcome.
//!
//! Invariant: no upstream connection is opened before the downstream has sent a
//! byte (a TCP probe that closes costs the gateway nothing), and every path out of
//! `handle` records exactly one outcome.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, field::Empty};

use crate::{
    config::Config,
    copy::{self, Report},
    detect,
    error::Outcome,
    metrics::{self, Handles},
    pool::Pools,
    socket,
};

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
    let span = tracing::info_span!(
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
    let started = Instant::now();
    let report = serve(down, &shared).instrument(span.clone()).await;
    handles.active.decrement(1.0);
    handles.closed(report.outcome);
    span.in_scope(|| {
        tracing::debug!(
            outcome = report.outcome.label(),
            bytes.to_upstream = report.to_upstream,
            bytes.to_downstream = report.to_downstream,
            closed_first = report.closed_first.map(copy::Side::label),
            duration_ms = started.elapsed().as_secs_f64() * 1000.0,
            "connection closed"
        );
    });
}

async fn serve(mut down: TcpStream, shared: &Shared) -> Report {
    let ended = |outcome| Report {
        outcome,
        to_upstream: 0,
        to_downstream: 0,
        closed_first: None,
    };
    socket::downstream(&down);
    let first = tokio::select! {
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
        c = shared.pools.checkout(offer) => c,
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
            tracing::warn!(error = %e, upstream = %shared.config.upstream, "upstream connection failed; resetting the downstream");
            socket::abort(&down);
            return ended(e.outcome());
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
    let report = copy::run(
        down,
        connected.stream,
        initial,
        shared.config.idle_timeout,
        &shared.abort,
    )
    .await;
    if report.to_downstream > 0 {
        shared.pools.mark_accepted();
    }
    report
}

/// Completes after the idle timeout, or never when it is off.
async fn idle(shared: &Shared) {
    match shared.config.idle_timeout {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}
