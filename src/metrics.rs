//! Metrics: every metric name as a constant, its description and buckets, and the
//! Prometheus recorder.
//!
//! Invariant: names here are API (the README table is checked against `CATALOGUE`);
//! labels take values only from enums, never from addresses or error text.

use std::{
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use metrics::{Counter, Gauge, Histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::error::Outcome;

pub const CONNECTIONS_ACCEPTED: &str = "runnel_downstream_connections_accepted_total";
pub const CONNECTIONS_ACTIVE: &str = "runnel_downstream_connections_active";
pub const CONNECTIONS_CLOSED: &str = "runnel_downstream_connections_closed_total";
pub const BYTES: &str = "runnel_bytes_total";
pub const HANDSHAKE_DURATION: &str = "runnel_upstream_handshake_duration_seconds";
pub const CONNECT_DURATION: &str = "runnel_upstream_connect_duration_seconds";
pub const HANDSHAKES: &str = "runnel_upstream_handshakes_total";
pub const RESUMPTION_RATIO: &str = "runnel_upstream_resumption_ratio";
pub const UPSTREAM_WAIT: &str = "runnel_upstream_wait_seconds";
pub const POOL_IDLE: &str = "runnel_pool_idle_connections";
pub const POOL_TARGET: &str = "runnel_pool_target_connections";
pub const POOL_CHECKOUTS: &str = "runnel_pool_checkouts_total";
pub const POOL_DISCARDS: &str = "runnel_pool_discards_total";
pub const ACCEPT_ERRORS: &str = "runnel_accept_errors_total";
pub const CONNECTION_DURATION: &str = "runnel_connection_duration_seconds";
pub const FIRST_BYTE: &str = "runnel_first_byte_seconds";
pub const UPSTREAM_ERRORS: &str = "runnel_upstream_errors_total";
pub const CA_NOT_AFTER: &str = "runnel_ca_not_after_timestamp_seconds";
pub const TLS_RELOADS: &str = "runnel_tls_reloads_total";
pub const TLS_LAST_RELOAD: &str = "runnel_tls_last_reload_timestamp_seconds";
pub const CLIENT_CERT_NOT_AFTER: &str = "runnel_client_certificate_not_after_timestamp_seconds";
pub const DRAINING: &str = "runnel_draining";
pub const BUILD_INFO: &str = "runnel_build_info";
pub const LOG_LINES_DROPPED: &str = "runnel_log_lines_dropped_total";

/// (name, kind, labels, description): the catalogue the README documents.
pub const CATALOGUE: &[(&str, &str, &str, &str)] = &[
    (
        CONNECTION_DURATION,
        "histogram",
        "outcome",
        "downstream connection lifetime, by how it ended",
    ),
    (
        FIRST_BYTE,
        "histogram",
        "",
        "from accept to the first byte written upstream",
    ),
    (
        UPSTREAM_ERRORS,
        "counter",
        "kind",
        "upstream failures: dns, connect, local_exhaustion, timeout, closed_after_handshake, unresponsive, tls_alert_from_gateway, certificate_rejected, certificate_untrusted, alpn_mismatch, handshake",
    ),
    (
        CA_NOT_AFTER,
        "gauge",
        "",
        "earliest notAfter among the CA certificates, Unix seconds",
    ),
    (
        TLS_RELOADS,
        "counter",
        "result",
        "reloads of CA, certificate and key files: ok, error",
    ),
    (
        TLS_LAST_RELOAD,
        "gauge",
        "",
        "when the TLS material was last loaded, Unix seconds",
    ),
    (
        CONNECTIONS_ACCEPTED,
        "counter",
        "",
        "downstream connections accepted",
    ),
    (
        CONNECTIONS_ACTIVE,
        "gauge",
        "",
        "downstream connections open now",
    ),
    (
        CONNECTIONS_CLOSED,
        "counter",
        "outcome",
        "downstream connections closed, by how they ended",
    ),
    (
        BYTES,
        "counter",
        "direction",
        "bytes tunnelled: to_upstream, to_downstream",
    ),
    (
        CONNECT_DURATION,
        "histogram",
        "",
        "upstream TCP connect time",
    ),
    (
        HANDSHAKE_DURATION,
        "histogram",
        "kind",
        "upstream TLS handshake time: full, resumed",
    ),
    (
        HANDSHAKES,
        "counter",
        "kind, result",
        "upstream TLS handshakes: kind full/resumed/none, result ok/error",
    ),
    (
        RESUMPTION_RATIO,
        "gauge",
        "",
        "resumed / all successful upstream handshakes since start",
    ),
    (
        UPSTREAM_WAIT,
        "histogram",
        "pool",
        "from the first downstream byte to a ready upstream: pool hit or miss",
    ),
    (
        POOL_IDLE,
        "gauge",
        "alpn",
        "idle pre-handshaken upstream connections",
    ),
    (
        POOL_TARGET,
        "gauge",
        "alpn",
        "the size each pool is kept at now",
    ),
    (
        POOL_CHECKOUTS,
        "counter",
        "alpn, result",
        "pool checkouts: hit (pooled connection) or miss (dialled on the spot)",
    ),
    (
        POOL_DISCARDS,
        "counter",
        "reason",
        "pooled connections discarded: reloaded, closed, unexpected_data, error, rejected, goaway, stale, max_idle, drain, abandoned",
    ),
    (
        ACCEPT_ERRORS,
        "counter",
        "",
        "downstream accept errors (each one backs off)",
    ),
    (
        CLIENT_CERT_NOT_AFTER,
        "gauge",
        "",
        "client certificate notAfter, Unix seconds",
    ),
    (DRAINING, "gauge", "", "1 while draining after SIGTERM"),
    (
        LOG_LINES_DROPPED,
        "counter",
        "",
        "log lines dropped because stderr could not keep up (the queue was full)",
    ),
    (
        BUILD_INFO,
        "gauge",
        "version, commit",
        "always 1; labels carry the build",
    ),
];

/// Seconds: from 250 µs (resumed handshake on loopback) to the 5 s default deadline.
const LATENCY_BUCKETS: &[f64] = &[
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Seconds: a connection lives from a millisecond (a probe) to hours (a stream).
const LIFETIME_BUCKETS: &[f64] = &[
    0.001, 0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 14400.0,
];

/// Installs the global recorder once (tests start many servers in one process).
pub fn install() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let mut builder = Ok(PrometheusBuilder::new());
        for name in [HANDSHAKE_DURATION, CONNECT_DURATION, UPSTREAM_WAIT, FIRST_BYTE] {
            builder = builder.and_then(|b| b.set_buckets_for_metric(Matcher::Full(name.into()), LATENCY_BUCKETS));
        }
        let recorder = builder
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(CONNECTION_DURATION.into()), LIFETIME_BUCKETS))
            .map(PrometheusBuilder::build_recorder);
        let recorder = match recorder {
            Ok(r) => r,
            // Only reachable with an empty bucket list, which LATENCY_BUCKETS is not.
            Err(_) => PrometheusBuilder::new().build_recorder(),
        };
        let handle = recorder.handle();
        // A second install (another recorder already set) keeps the first: harmless.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        // Shown at 0 from the start, so an alert on it has a series to watch.
        metrics::counter!(LOG_LINES_DROPPED).increment(0);
        metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "commit" => option_env!("RUNNEL_BUILD_COMMIT").unwrap_or("unknown")).set(1.0);
        handle
    })
}

fn describe() {
    for (name, kind, _, help) in CATALOGUE {
        let unit = if name.ends_with("_seconds") {
            Some(Unit::Seconds)
        } else if name.ends_with("_bytes_total") {
            Some(Unit::Bytes)
        } else {
            None
        };
        match (*kind, unit) {
            ("counter", Some(u)) => metrics::describe_counter!(*name, u, *help),
            ("counter", None) => metrics::describe_counter!(*name, *help),
            ("gauge", _) => metrics::describe_gauge!(*name, *help),
            (_, Some(u)) => metrics::describe_histogram!(*name, u, *help),
            (_, None) => metrics::describe_histogram!(*name, *help),
        }
    }
}

/// Handles for the hot path, looked up once.
pub struct Handles {
    pub accepted: Counter,
    pub active: Gauge,
    pub to_upstream: Counter,
    pub to_downstream: Counter,
    pub connect: Histogram,
    pub handshake_full: Histogram,
    pub handshake_resumed: Histogram,
    closed: Vec<(Outcome, Counter)>,
    /// [alpn][hit, miss]
    checkouts: Vec<[Counter; 2]>,
    wait_hit: Histogram,
    wait_miss: Histogram,
    pub first_byte: Histogram,
    handshakes_full: Counter,
    handshakes_resumed: Counter,
    handshakes_failed: Counter,
    resumption_ratio: Gauge,
    /// [alpn]
    pool_idle: Vec<Gauge>,
    pool_target: Vec<Gauge>,
    durations: Vec<(Outcome, Histogram)>,
}

impl Handles {
    pub fn get() -> &'static Handles {
        static HANDLES: OnceLock<Handles> = OnceLock::new();
        HANDLES.get_or_init(|| Handles {
            accepted: metrics::counter!(CONNECTIONS_ACCEPTED),
            active: metrics::gauge!(CONNECTIONS_ACTIVE),
            to_upstream: metrics::counter!(BYTES, "direction" => "to_upstream"),
            to_downstream: metrics::counter!(BYTES, "direction" => "to_downstream"),
            connect: metrics::histogram!(CONNECT_DURATION),
            handshake_full: metrics::histogram!(HANDSHAKE_DURATION, "kind" => "full"),
            handshake_resumed: metrics::histogram!(HANDSHAKE_DURATION, "kind" => "resumed"),
            checkouts: ALPN_LABELS
                .iter()
                .map(|a| {
                    [
                        metrics::counter!(POOL_CHECKOUTS, "alpn" => *a, "result" => "hit"),
                        metrics::counter!(POOL_CHECKOUTS, "alpn" => *a, "result" => "miss"),
                    ]
                })
                .collect(),
            wait_hit: metrics::histogram!(UPSTREAM_WAIT, "pool" => "hit"),
            wait_miss: metrics::histogram!(UPSTREAM_WAIT, "pool" => "miss"),
            first_byte: metrics::histogram!(FIRST_BYTE),
            handshakes_full: metrics::counter!(HANDSHAKES, "kind" => "full", "result" => "ok"),
            handshakes_resumed: metrics::counter!(HANDSHAKES, "kind" => "resumed", "result" => "ok"),
            handshakes_failed: metrics::counter!(HANDSHAKES, "kind" => "none", "result" => "error"),
            resumption_ratio: metrics::gauge!(RESUMPTION_RATIO),
            pool_idle: ALPN_LABELS.iter().map(|a| metrics::gauge!(POOL_IDLE, "alpn" => *a)).collect(),
            pool_target: ALPN_LABELS.iter().map(|a| metrics::gauge!(POOL_TARGET, "alpn" => *a)).collect(),
            durations: Outcome::ALL
                .iter()
                .map(|o| {
                    (
                        *o,
                        metrics::histogram!(CONNECTION_DURATION, "outcome" => o.label()),
                    )
                })
                .collect(),
            closed: Outcome::ALL
                .iter()
                .map(|o| {
                    (
                        *o,
                        metrics::counter!(CONNECTIONS_CLOSED, "outcome" => o.label()),
                    )
                })
                .collect(),
        })
    }

    /// Counts a closed connection and records how long it lived.
    pub fn closed(&self, outcome: Outcome, lifetime: Duration) {
        if let Some((_, c)) = self.closed.iter().find(|(o, _)| *o == outcome) {
            c.increment(1);
        }
        if let Some((_, h)) = self.durations.iter().find(|(o, _)| *o == outcome) {
            h.record(lifetime);
        }
    }
}

/// Counts one upstream handshake by kind and result, and updates the resumption ratio.
pub fn handshake(kind: &'static str, ok: bool) {
    static FULL: AtomicU64 = AtomicU64::new(0);
    static RESUMED: AtomicU64 = AtomicU64::new(0);
    let h = Handles::get();
    match (kind, ok) {
        ("full", true) => h.handshakes_full.increment(1),
        ("resumed", true) => h.handshakes_resumed.increment(1),
        ("none", false) => h.handshakes_failed.increment(1),
        (kind, ok) => {
            metrics::counter!(HANDSHAKES, "kind" => kind, "result" => if ok { "ok" } else { "error" })
                .increment(1)
        }
    }
    if ok {
        let counter = if kind == "resumed" { &RESUMED } else { &FULL };
        counter.fetch_add(1, Ordering::Relaxed);
        let (full, resumed) = (
            FULL.load(Ordering::Relaxed),
            RESUMED.load(Ordering::Relaxed),
        );
        h.resumption_ratio
            .set(resumed as f64 / (full + resumed).max(1) as f64);
    }
}

/// Exports the validity of newly loaded TLS material (at start and on each reload).
pub fn tls_loaded(material: &crate::material::Material, reload: bool) {
    metrics::gauge!(CLIENT_CERT_NOT_AFTER).set(material.cert_not_after as f64);
    metrics::gauge!(CA_NOT_AFTER).set(material.ca_not_after as f64);
    metrics::gauge!(TLS_LAST_RELOAD).set(crate::material::unix_now() as f64);
    metrics::counter!(TLS_RELOADS, "result" => "ok").increment(u64::from(reload));
    metrics::counter!(TLS_RELOADS, "result" => "error").increment(0);
}

/// Counts an upstream failure by kind (see `error::ConnectError::kind`).
pub fn upstream_error(kind: &'static str) {
    metrics::counter!(UPSTREAM_ERRORS, "kind" => kind).increment(1);
}

/// Counts a pool checkout.
pub fn pool_checkout(alpn: &'static str, hit: bool) {
    let h = Handles::get();
    let i = ALPN_LABELS.iter().position(|a| *a == alpn).unwrap_or(0);
    h.checkouts[i][usize::from(!hit)].increment(1);
}

/// Records how long a connection waited for its upstream.
pub fn upstream_wait(hit: bool, waited: Duration) {
    let h = Handles::get();
    if hit { &h.wait_hit } else { &h.wait_miss }.record(waited);
}

pub fn pool_discard(reason: &'static str) {
    metrics::counter!(POOL_DISCARDS, "reason" => reason).increment(1);
}

pub fn pool_gauges(alpn: &'static str, idle: usize, target: usize) {
    let h = Handles::get();
    let i = ALPN_LABELS.iter().position(|a| *a == alpn).unwrap_or(0);
    h.pool_idle[i].set(idle as f64);
    h.pool_target[i].set(target as f64);
}

/// The values the `alpn` label takes.
const ALPN_LABELS: [&str; 3] = ["http/1.1", "h2", "fixed"];
