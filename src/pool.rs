//! Pools of pre-handshaken upstream connections, one per ALPN offer.
//!
//! Every idle pooled connection has an owner task (`watch`) that keeps a read pending,
//! so TLS 1.3 session tickets are stored as they arrive and a close, an alert or
//! unexpected data retires the connection at once. Checkout asks an owner to hand its
//! stream over; an owner that has retired cannot answer, so checkout never hands out a
//! connection known to be dead. A filler task per pool keeps `idle + connecting` at a
//! target that follows the rate of new connections, between `RUNNEL_POOL_MIN` and
//! `RUNNEL_POOL_MAX`.
//!
//! Invariant: a connection enters the pool only after the gateway has shown that it
//! accepted the client certificate (TLS 1.2: its Finished; TLS 1.3: a session ticket,
//! or a quiet probation period with no alert).

use std::{
    future::poll_fn,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::Poll,
    time::Duration,
};

use rustls::ProtocolVersion;
use tokio::{
    io::{AsyncRead, AsyncWriteExt, ReadBuf},
    sync::{Notify, oneshot},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::{AlpnPolicy, Config},
    connect::{Connected, Connector, Offer},
    error::ConnectError,
    metrics,
};

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
/// Under TLS 1.3 without a session ticket, how long (in handshake times) a new
/// connection must stay quiet before it is trusted; a rejected certificate draws an
/// alert about one round trip after our Finished.
const PROBATION_HANDSHAKES: u32 = 3;
const PROBATION_MIN: Duration = Duration::from_millis(20);
const PROBATION_MAX: Duration = Duration::from_secs(2);
/// The least a resumed connection waits for new tickets before it is admitted anyway.
const RESUMED_WAIT_MIN: Duration = Duration::from_millis(1);

/// Why a pooled connection was discarded (metric label).
#[derive(Debug, Clone, Copy)]
pub enum Discard {
    Closed,
    UnexpectedData,
    Error,
    Rejected,
    MaxIdle,
    Drain,
    /// The checkout that asked for it had gone by the time it was handed over.
    Abandoned,
    /// Made with TLS material that has since been reloaded.
    Reloaded,
}

impl Discard {
    pub const ALL: [Discard; 8] = [
        Discard::Reloaded,
        Discard::Closed,
        Discard::UnexpectedData,
        Discard::Error,
        Discard::Rejected,
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
    let mut connected = match connected {
        Ok(c) => c,
        Err(e) => {
            metrics::upstream_error(e.kind());
            if !pool.failing.swap(true, Ordering::Relaxed) {
                tracing::warn!(alpn = pool.offer.label(), error = %e, kind = e.kind(), "pool: upstream connection failed; retrying with backoff (logged once until it recovers)");
            } else {
                tracing::debug!(alpn = pool.offer.label(), error = %e, "pool: upstream connection failed again");
            }
            return false;
        }
    };
    if let Err(reason) = admit(&mut connected).await {
        metrics::pool_discard(reason.label());
        tracing::warn!(
            alpn = pool.offer.label(),
            reason = reason.label(),
            "pool: the gateway refused a new connection after the handshake (client certificate rejected?)"
        );
        return false;
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
    pools.connector.mark_accepted();
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
    tracker.spawn(async move { watch(pools, pool, connected, taken).await });
    true
}

/// Waits until the gateway has shown it accepted our certificate. Also stores the
/// session tickets that arrive meanwhile. A refusal counts as a `certificate_rejected`
/// upstream error.
pub async fn admit(connected: &mut Connected) -> Result<(), Discard> {
    let admitted = wait_for_acceptance(connected).await;
    if let Err(Discard::Rejected) = admitted {
        metrics::upstream_error("certificate_rejected");
    }
    admitted
}

async fn wait_for_acceptance(connected: &mut Connected) -> Result<(), Discard> {
    let tls13 = connected.stream.get_ref().1.protocol_version() == Some(ProtocolVersion::TLSv1_3);
    if !tls13 {
        // TLS 1.2: the gateway's Finished came after it verified our certificate.
        return Ok(());
    }
    // A resumed session sends no certificate: the gateway accepted ours when it issued
    // the ticket (one that no longer would refuses the ticket: a full handshake). So a
    // resumed connection waits only briefly, for the new tickets that keep refills
    // resuming; not every gateway sends them on resumption (Envoy does not), and the
    // full probation would keep the pool empty under load at low round-trip times.
    let probation = match connected.info.resumed {
        true => connected
            .info
            .handshake_time
            .clamp(RESUMED_WAIT_MIN, PROBATION_MAX),
        false => (connected.info.handshake_time * PROBATION_HANDSHAKES)
            .clamp(PROBATION_MIN, PROBATION_MAX),
    };
    let deadline = tokio::time::sleep(probation);
    tokio::pin!(deadline);
    let mut byte = [0u8; 1];
    let speaks_first = may_speak_first(connected);
    poll_fn(|cx| {
        let mut buf = ReadBuf::new(&mut byte);
        match Pin::new(&mut connected.stream).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                return Poll::Ready(Err(Discard::Closed));
            }
            // An HTTP/2 server's preface: kept for the downstream, and proof enough
            // that the gateway accepted us.
            Poll::Ready(Ok(())) if speaks_first => {
                connected.early.extend_from_slice(buf.filled());
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Ok(())) => return Poll::Ready(Err(Discard::UnexpectedData)),
            Poll::Ready(Err(_)) => return Poll::Ready(Err(Discard::Rejected)),
            Poll::Pending => {}
        }
        if connected.stream.get_ref().1.tls13_tickets_received() > 0 {
            return Poll::Ready(Ok(()));
        }
        deadline.as_mut().poll(cx).map(Ok)
    })
    .await
}

/// An HTTP/2 server may send its SETTINGS before the client says anything; any
/// other protocol sending first on an idle connection is unexpected.
fn may_speak_first(connected: &Connected) -> bool {
    connected.info.alpn.as_deref() == Some("h2")
}

/// How much a server may send before anything was asked (HTTP/2's SETTINGS frame is
/// tens of bytes).
const EARLY_LIMIT: usize = 16 * 1024;

enum Event {
    Take(Result<oneshot::Sender<Connected>, oneshot::error::RecvError>),
    Read(std::io::Result<usize>),
    MaxIdle,
    Drain,
    Reloaded,
}

/// After a TLS reload, idle connections made with the old identity are replaced
/// gradually: each retires at a random point within this spread.
const RELOAD_SPREAD: Duration = Duration::from_secs(5);

/// Completes once a reload made this connection's identity old, plus its jitter.
async fn outdated(mut reloads: tokio::sync::watch::Receiver<u64>, made_with: u64, jitter: f64) {
    while *reloads.borrow_and_update() <= made_with {
        if reloads.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
    tokio::time::sleep(RELOAD_SPREAD.mul_f64(jitter)).await;
}

/// Owns one idle pooled connection until it is taken or retired.
async fn watch(
    pools: Arc<Pools>,
    pool: Arc<Pool>,
    mut connected: Connected,
    mut taken: oneshot::Receiver<oneshot::Sender<Connected>>,
) {
    // Jitter spreads retirements, so connections made together are not replaced together.
    let jitter = 0.9 + 0.2 * (connected.info.addr.port() as f64 % 97.0) / 97.0;
    let admitted = Instant::now();
    let retire_at = admitted + pools.max_idle.mul_f64(jitter);
    let mut chunk = [0u8; 512];
    let speaks_first = may_speak_first(&connected);
    let event = loop {
        // Biased, the read first: a close, an alert or data that arrived together with
        // a checkout retires the connection instead of being handed out with it.
        let event = tokio::select! {
            biased;
            r = tokio::io::AsyncReadExt::read(&mut connected.stream, &mut chunk) => Event::Read(r),
            t = &mut taken => Event::Take(t),
            _ = tokio::time::sleep_until(retire_at) => Event::MaxIdle,
            _ = pools.stop.cancelled() => Event::Drain,
            _ = outdated(pools.connector.reloads(), connected.info.generation, (jitter - 0.9) / 0.2) => Event::Reloaded,
        };
        match event {
            Event::Read(Ok(n))
                if n > 0 && speaks_first && connected.early.len() + n <= EARLY_LIMIT =>
            {
                connected.early.extend_from_slice(&chunk[..n]);
            }
            other => break other,
        }
    };
    if matches!(event, Event::Read(_)) && admitted.elapsed() < EARLY_END {
        pool.failures.fetch_add(1, Ordering::Relaxed);
    }
    pool.idle_count.fetch_sub(1, Ordering::Relaxed);
    pool.wake.notify_one();
    let reason = match event {
        Event::Take(Ok(reply)) => {
            connected.info.pooled = true;
            match reply.send(connected) {
                Ok(()) => return,
                // The checkout gave up (its downstream went away): close this one.
                Err(c) => {
                    connected = c;
                    Discard::Abandoned
                }
            }
        }
        Event::Take(Err(_)) | Event::Drain => Discard::Drain,
        Event::MaxIdle => Discard::MaxIdle,
        Event::Reloaded => Discard::Reloaded,
        Event::Read(Ok(0)) => Discard::Closed,
        Event::Read(Ok(_)) => Discard::UnexpectedData,
        Event::Read(Err(_)) => Discard::Error,
    };
    metrics::pool_discard(reason.label());
    if matches!(
        reason,
        Discard::MaxIdle | Discard::Drain | Discard::Abandoned | Discard::Reloaded
    ) {
        // A clean goodbye: close_notify, then FIN.
        let _ = tokio::time::timeout(Duration::from_secs(1), connected.stream.shutdown()).await;
    }
}
