//! Pools of pre-handshaken upstream connections, one per ALPN offer.
//!
//! Every idle pooled connection has an owner task (`idle::watch`) that keeps a read
//! pending, so TLS 1.3 session tickets are stored as they arrive and a close, an
//! alert, an HTTP/2 GOAWAY or unexpected data retires the connection at once (and its
//! slot is refilled at once, not at the next checkout). Checkout asks an owner to hand
//! its stream over; an owner that has retired cannot answer. A filler task per pool
//! keeps `idle + connecting` at a target that follows the rate of new connections,
//! between `RUNNEL_POOL_MIN` and `RUNNEL_POOL_MAX`.
//!
//! Why an owner per connection rather than a check at checkout and a periodic sweep,
//! each shown by a test that fails without it (tests/pool.rs, tests/pool_faults.rs):
//! refills resume because tickets are read as they arrive
//! (`second_and_later_pooled_connections_resume`); a connection the gateway closes is
//! replaced before anyone asks for it
//! (`pooled_connection_closed_by_the_gateway_is_never_handed_out_and_is_replaced`); a
//! GOAWAY retires it (`an_h2_connection_the_gateway_sent_goaway_on_...`). The check at
//! checkout is there too, for what no task could see while the process was frozen
//! (tests/frozen_instance.rs).
//!
//! Invariants:
//! - a connection enters the pool only once `admit` has seen the gateway accept its
//!   client certificate;
//! - a connection is handed out only after a fresh look at its socket (a syscall, not
//!   the runtime's cached readiness, which is stale after the process was frozen)
//!   finds it open both ways, and while it is younger than `RUNNEL_POOL_MAX_IDLE`;
//! - a connection made with TLS material that has since been reloaded is never handed
//!   out; it retires within `RELOAD_SPREAD`.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::{Notify, oneshot},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admit,
    config::{AlpnPolicy, Config},
    connect::{Connected, Connector, Offer},
    error::ConnectError,
    metrics,
};

mod idle;

/// Handshakes one pool may run at once: bounds the burst on the gateway and paces
/// ticket use (rustls keeps a few TLS 1.3 tickets per server; each resumption takes one,
/// and new ones arrive only after a handshake completes).
const MAX_CONCURRENT_HANDSHAKES: usize = 8;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A pooled connection the gateway ends this soon after admission counts as a failed
/// dial: a gateway that closes every idle connection at once must not be redialled
/// in a tight loop.
const EARLY_END: Duration = Duration::from_secs(1);
/// How often a pool re-estimates its target size.
const ADAPT_EVERY: Duration = Duration::from_secs(1);
/// Why a pooled connection was discarded (metric label).
#[derive(Debug, Clone, Copy)]
pub enum Discard {
    Closed,
    UnexpectedData,
    Error,
    /// The gateway refused the client certificate (a certificate alert).
    Rejected,
    /// An HTTP/2 gateway sent GOAWAY: it will take no new streams on it.
    GoAway,
    /// The gateway had closed or reset it, seen only at checkout (the process was
    /// frozen meanwhile, say).
    Stale,
    MaxIdle,
    Drain,
    /// The checkout that asked for it had gone by the time it was handed over.
    Abandoned,
    /// Made with TLS material that has since been reloaded.
    Reloaded,
}

impl Discard {
    pub const ALL: [Discard; 10] = [
        Discard::Reloaded,
        Discard::Closed,
        Discard::UnexpectedData,
        Discard::Error,
        Discard::Rejected,
        Discard::GoAway,
        Discard::Stale,
        Discard::MaxIdle,
        Discard::Drain,
        Discard::Abandoned,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Discard::Closed => "closed",
            Discard::UnexpectedData => "unexpected_data",
            Discard::Error => "error",
            Discard::Rejected => "rejected",
            Discard::GoAway => "goaway",
            Discard::Stale => "stale",
            Discard::MaxIdle => "max_idle",
            Discard::Drain => "drain",
            Discard::Abandoned => "abandoned",
            Discard::Reloaded => "reloaded",
        }
    }
}

/// All pools, keyed by ALPN offer.
pub struct Pools {
    connector: Arc<Connector>,
    pools: Vec<Arc<Pool>>,
    min: usize,
    max: usize,
    max_idle: Duration,
    stop: CancellationToken,
    warmed: Notify,
}

struct Pool {
    offer: Offer,
    idle: Mutex<Vec<oneshot::Sender<oneshot::Sender<Connected>>>>,
    idle_count: AtomicUsize,
    connecting: AtomicUsize,
    target: AtomicUsize,
    checkouts: AtomicU64,
    /// Misses since the last estimate.
    misses: AtomicU64,
    /// Recent connect + handshake time, in microseconds (EWMA).
    dial_micros: AtomicU64,
    /// Whether the last dial failed: failures are logged when this flips, not each
    /// retry (an h2 pool facing a gateway without h2 would otherwise warn forever).
    failing: std::sync::atomic::AtomicBool,
    /// Dials that failed, and pooled connections the gateway ended within
    /// `EARLY_END` of their admission: the filler backs off when this grows.
    failures: AtomicU64,
    wake: Notify,
}

impl Pools {
    pub fn new(connector: Arc<Connector>, config: &Config, stop: CancellationToken) -> Arc<Pools> {
        let offers: &[Offer] = match config.alpn {
            AlpnPolicy::Auto => &[Offer::Http1, Offer::H2],
            AlpnPolicy::None | AlpnPolicy::List(_) => &[Offer::Fixed],
        };
        let pools = offers
            .iter()
            .map(|&offer| {
                Arc::new(Pool {
                    offer,
                    idle: Mutex::new(Vec::new()),
                    idle_count: AtomicUsize::new(0),
                    connecting: AtomicUsize::new(0),
                    target: AtomicUsize::new(config.pool.min),
                    checkouts: AtomicU64::new(0),
                    misses: AtomicU64::new(0),
                    dial_micros: AtomicU64::new(0),
                    failing: std::sync::atomic::AtomicBool::new(false),
                    failures: AtomicU64::new(0),
                    wake: Notify::new(),
                })
            })
            .collect();
        Arc::new(Pools {
            connector,
            pools,
            min: config.pool.min,
            max: config.pool.max,
            max_idle: config.pool.max_idle,
            stop,
            warmed: Notify::new(),
        })
    }

    pub fn enabled(&self) -> bool {
        self.max > 0
    }

    /// Starts one filler per pool.
    pub fn start(self: &Arc<Self>, tracker: &TaskTracker) {
        if !self.enabled() {
            return;
        }
        for pool in &self.pools {
            tracker.spawn(fill(self.clone(), pool.clone(), tracker.clone()));
        }
    }

    /// Waits until every pool holds `RUNNEL_POOL_MIN` connections, or `deadline`.
    pub async fn warm(&self, deadline: Instant) -> bool {
        loop {
            let notified = self.warmed.notified();
            if self
                .pools
                .iter()
                .all(|p| p.idle_count.load(Ordering::Relaxed) >= self.min)
            {
                return true;
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => return false,
                _ = self.stop.cancelled() => return false,
            }
        }
    }

    /// Notes that the gateway answered on a connection (readiness).
    pub fn mark_accepted(&self) {
        self.connector.mark_accepted();
    }

    /// Notes that the gateway refused a connection after its handshake (readiness).
    pub fn mark_failed(&self) {
        self.connector.mark_failed();
    }

    /// Idle pooled connections, all pools together.
    pub fn idle(&self) -> usize {
        self.pools
            .iter()
            .map(|p| p.idle_count.load(Ordering::Relaxed))
            .sum()
    }

    /// A live pooled connection for `offer`, or a new one made on the spot.
    pub async fn checkout(&self, offer: Offer) -> Result<(Connected, bool), ConnectError> {
        let Some(pool) = self
            .pools
            .iter()
            .find(|p| p.offer == offer)
            .filter(|_| self.enabled())
        else {
            return self.connector.connect(offer).await.map(|c| (c, false));
        };
        pool.checkouts.fetch_add(1, Ordering::Relaxed);
        loop {
            let owner = pool.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let Some(owner) = owner else { break };
            let (reply, handed) = oneshot::channel();
            if owner.send(reply).is_err() {
                continue; // that owner retired its connection
            }
            if let Ok(connected) = handed.await {
                metrics::pool_checkout(offer.label(), true);
                pool.wake.notify_one(); // refill one for one
                return Ok((connected, true));
            }
        }
        metrics::pool_checkout(offer.label(), false);
        // A miss means the pool is too small now: grow at once rather than at the next
        // estimate (a burst can be over before then).
        pool.misses.fetch_add(1, Ordering::Relaxed);
        let _ = pool
            .target
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some((t + 1).min(self.max))
            });
        pool.wake.notify_one();
        self.connector.connect(offer).await.map(|c| (c, false))
    }
}

/// Keeps one pool at its target: dials, admits, hands each connection to an owner.
async fn fill(pools: Arc<Pools>, pool: Arc<Pool>, tracker: TaskTracker) {
    let mut backoff = BACKOFF_MIN;
    let mut retry_at = Instant::now();
    let mut next_adapt = Instant::now() + ADAPT_EVERY;
    let mut failures_seen = 0;
    let mut last_failure = Instant::now();
    let mut rate = 0.0f64;
    loop {
        if Instant::now() >= next_adapt {
            rate = adapt(&pools, &pool, rate);
            next_adapt = Instant::now() + ADAPT_EVERY;
        }
        let failed = pool.failures.load(Ordering::Relaxed);
        if failed > failures_seen {
            failures_seen = failed;
            last_failure = Instant::now();
            retry_at = last_failure + backoff;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        } else if pool.idle_count.load(Ordering::Relaxed) > 0
            && last_failure.elapsed() > 2 * EARLY_END
        {
            // Recovered: a connection is idle, and none failed or ended early lately
            // (an idle connection alone proves little while others end at once).
            backoff = BACKOFF_MIN;
        }
        while Instant::now() >= retry_at
            && pool.idle_count.load(Ordering::Relaxed) + pool.connecting.load(Ordering::Relaxed)
                < pool.target.load(Ordering::Relaxed)
            && pool.connecting.load(Ordering::Relaxed) < concurrency(&pools)
        {
            pool.connecting.fetch_add(1, Ordering::Relaxed);
            let (pools, pool, owners) = (pools.clone(), pool.clone(), tracker.clone());
            tracker.spawn(async move {
                if !dial(&pools, &pool, &owners).await {
                    pool.failures.fetch_add(1, Ordering::Relaxed);
                }
                pool.connecting.fetch_sub(1, Ordering::Relaxed);
                pool.wake.notify_one();
            });
        }
        metrics::pool_gauges(
            pool.offer.label(),
            pool.idle_count.load(Ordering::Relaxed),
            pool.target.load(Ordering::Relaxed),
        );
        let wake_at = if Instant::now() < retry_at {
            retry_at.min(next_adapt)
        } else {
            next_adapt
        };
        tokio::select! {
            _ = pools.stop.cancelled() => return,
            _ = pool.wake.notified() => {}
            _ = tokio::time::sleep_until(wake_at) => {}
        }
    }
}

/// As many handshakes at once as there are session tickets to resume them with (each
/// resumption spends one; new ones arrive only after a handshake), at least one.
fn concurrency(pools: &Pools) -> usize {
    pools
        .connector
        .tickets()
        .clamp(1, MAX_CONCURRENT_HANDSHAKES)
}

/// Re-estimates the target: enough connections to cover the checkouts expected during
/// one refill (rate x dial time), doubled for bursts, plus the minimum.
fn adapt(pools: &Pools, pool: &Pool, rate: f64) -> f64 {
    let count = pool.checkouts.swap(0, Ordering::Relaxed) as f64 / ADAPT_EVERY.as_secs_f64();
    let rate = if rate == 0.0 {
        count
    } else {
        0.7 * rate + 0.3 * count
    };
    let dial = Duration::from_micros(pool.dial_micros.load(Ordering::Relaxed))
        .as_secs_f64()
        .max(0.001);
    let wanted = (pools.min + (2.0 * rate * dial).ceil() as usize).clamp(pools.min, pools.max);
    // Grow to the estimate at once; shrink by one a tick, and not while misses happen.
    let missed = pool.misses.swap(0, Ordering::Relaxed) > 0;
    let current = pool.target.load(Ordering::Relaxed);
    let next = match (wanted >= current, missed) {
        (true, _) => wanted,
        (false, true) => current,
        (false, false) => (current - 1).max(wanted),
    };
    pool.target.store(next, Ordering::Relaxed);
    rate
}

/// Dials one connection, admits it, and hands it to an owner task. False on failure.
async fn dial(pools: &Arc<Pools>, pool: &Arc<Pool>, tracker: &TaskTracker) -> bool {
    let started = Instant::now();
    let connected = tokio::select! {
        c = pools.connector.connect(pool.offer) => c,
        _ = pools.stop.cancelled() => return true,
    };
    let failed = |what: &str, kind: &str| {
        if !pool.failing.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                alpn = pool.offer.label(),
                error = what,
                kind,
                "pool: upstream connection failed; retrying with backoff (logged once until it recovers)"
            );
        } else {
            tracing::debug!(
                alpn = pool.offer.label(),
                error = what,
                kind,
                "pool: upstream connection failed again"
            );
        }
        false
    };
    let mut connected = match connected {
        Ok(c) => c,
        Err(e) => {
            metrics::upstream_error(e.kind());
            return failed(&e.to_string(), e.kind());
        }
    };
    if let Err(reason) = admit::admit(&pools.connector, &mut connected).await {
        metrics::pool_discard(reason.label());
        return failed(reason.describe(), reason.label());
    }
    // Until admitted a connection is no use: the dial time includes admission.
    let elapsed = started.elapsed().as_micros() as u64;
    let old = pool.dial_micros.load(Ordering::Relaxed);
    pool.dial_micros.store(
        if old == 0 {
            elapsed
        } else {
            (old * 7 + elapsed * 3) / 10
        },
        Ordering::Relaxed,
    );
    if pool.failing.swap(false, Ordering::Relaxed) {
        tracing::info!(
            alpn = pool.offer.label(),
            "pool: upstream connections succeed again"
        );
    }
    let (take, taken) = oneshot::channel();
    pool.idle_count.fetch_add(1, Ordering::Relaxed);
    let mut idle = pool.idle.lock().unwrap_or_else(|p| p.into_inner());
    // Owners that retired on their own left their senders behind; under steady
    // traffic checkouts take from the top and would never reach them.
    idle.retain(|owner| !owner.is_closed());
    idle.push(take);
    drop(idle);
    pools.warmed.notify_waiters();
    let (pools, pool) = (pools.clone(), pool.clone());
    tracker.spawn(async move { idle::watch(pools, pool, connected, taken).await });
    true
}
