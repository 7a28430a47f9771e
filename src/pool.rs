//! Pools of pre-handshaken upstream connections, one per ALPN offer.
//!
//! Every idle pooled connection has an owner task (`watch`) that keeps a read pending,
//! so TLS 1.3 session tickets are stored as they arrive and a close, an alert, an
//! HTTP/2 GOAWAY or unexpected data retires the connection at once (and its slot is
//! refilled at once, not at the next checkout). Checkout asks an owner to hand its
//! stream over; an owner that has retired cannot answer. A filler task per pool keeps
//! `idle + connecting` at a target that follows the rate of new connections, between
//! `RUNNEL_POOL_MIN` and `RUNNEL_POOL_MAX`.
//!
//! Invariants:
//! - a connection enters the pool only after the gateway has shown that it accepted
//!   the client certificate (TLS 1.2: its Finished; TLS 1.3: a session ticket, or a
//!   quiet probation period with no alert);
//! - a connection is handed out only after a fresh look at its socket (a syscall, not
//!   the runtime's cached readiness, which is stale after the process was frozen)
//!   finds it open both ways, and while it is younger than `RUNNEL_POOL_MAX_IDLE`;
//! - a connection made with TLS material that has since been reloaded is never handed
//!   out; it retires within `RELOAD_SPREAD`.

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
    metrics, socket,
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
/// Pooled connections retire at a random point between this share of
/// `RUNNEL_POOL_MAX_IDLE` and all of it, so connections made together (at start, after
/// a reload) are not all replaced at once, and none outlives the setting.
const MAX_IDLE_SPREAD: f64 = 0.2;

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
    if let Err(reason) = admit(&pools.connector, &mut connected).await {
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
    tracker.spawn(async move { watch(pools, pool, connected, taken).await });
    true
}

/// Waits until the gateway has shown it accepted our certificate, storing the session
/// tickets that arrive meanwhile, and tells `connector` how the attempt went
/// (readiness). A refusal is counted by its cause: only a certificate alert is a
/// `certificate_rejected` upstream error; a reset or a close right after the handshake
/// is `closed_after_handshake` (an overloaded or draining gateway, not our identity).
pub async fn admit(connector: &Connector, connected: &mut Connected) -> Result<(), Discard> {
    match wait_for_acceptance(connected).await {
        Ok(()) => {
            connector.mark_accepted();
            Ok(())
        }
        Err((reason, kind)) => {
            connector.mark_failed();
            metrics::upstream_error(kind);
            Err(reason)
        }
    }
}

impl Discard {
    /// What an operator reads when a new connection is refused this way.
    pub fn describe(self) -> &'static str {
        match self {
            Discard::Rejected => "the gateway rejected the client certificate",
            Discard::UnexpectedData => "the gateway sent data nobody asked for",
            Discard::GoAway => "the gateway sent HTTP/2 GOAWAY",
            Discard::Error => "the gateway ended the connection with an error",
            _ => "the gateway closed the connection right after the handshake",
        }
    }
}

/// A refused admission: why, and the `runnel_upstream_errors_total` kind.
type Refusal = (Discard, &'static str);

async fn wait_for_acceptance(connected: &mut Connected) -> Result<(), Refusal> {
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
                return Poll::Ready(Err((Discard::Closed, CLOSED_AFTER_HANDSHAKE)));
            }
            // An HTTP/2 server's preface: kept for the downstream, and proof enough
            // that the gateway accepted us.
            Poll::Ready(Ok(())) if speaks_first => {
                connected.early.extend_from_slice(buf.filled());
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Ok(())) => {
                return Poll::Ready(Err((Discard::UnexpectedData, CLOSED_AFTER_HANDSHAKE)));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(refusal(&e))),
            Poll::Pending => {}
        }
        if connected.stream.get_ref().1.tls13_tickets_received() > 0 {
            return Poll::Ready(Ok(()));
        }
        deadline.as_mut().poll(cx).map(Ok)
    })
    .await
}

/// The upstream error kind of a gateway that ends a connection at once, without an
/// alert: overloaded, draining, or an idle limit shorter than the probation.
const CLOSED_AFTER_HANDSHAKE: &str = "closed_after_handshake";

/// Classifies a read error on a freshly made connection.
fn refusal(e: &std::io::Error) -> Refusal {
    match e.kind() {
        std::io::ErrorKind::InvalidData => match crate::error::tls_error_kind(e) {
            "certificate_rejected" => (Discard::Rejected, "certificate_rejected"),
            kind => (Discard::Error, kind),
        },
        // rustls: a TCP EOF without close_notify.
        std::io::ErrorKind::UnexpectedEof => (Discard::Closed, CLOSED_AFTER_HANDSHAKE),
        _ => (Discard::Error, CLOSED_AFTER_HANDSHAKE),
    }
}

/// An HTTP/2 server may send its SETTINGS before the client says anything; any
/// other protocol sending first on an idle connection is unexpected.
fn may_speak_first(connected: &Connected) -> bool {
    connected.info.alpn.as_deref() == Some("h2")
}

/// How much a server may send before anything was asked (HTTP/2's SETTINGS frame is
/// tens of bytes).
const EARLY_LIMIT: usize = 16 * 1024;

/// Whether the HTTP/2 frames a server sent on an idle connection include GOAWAY
/// (type 0x7): the gateway is draining it and will refuse new streams. Only frame
/// headers are read (9 bytes: length, type, flags, stream), never their payloads.
fn has_goaway(frames: &[u8]) -> bool {
    const GOAWAY: u8 = 0x7;
    let mut at = 0;
    while let Some(header) = frames.get(at..at + 9) {
        if header[3] == GOAWAY {
            return true;
        }
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        at += 9 + len;
    }
    false
}

enum Event {
    Take(Result<oneshot::Sender<Connected>, oneshot::error::RecvError>),
    Read(std::io::Result<usize>),
    GoAway,
    Stale,
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

/// A uniform random number in [0, 1), different for every call (std's per-instance
/// random hash keys, so no extra crate for the one thing that needs randomness).
fn random_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// A pooled connection's age at retirement: random within the last `MAX_IDLE_SPREAD`
/// of `max_idle`, never past it.
fn retire_after(max_idle: Duration) -> Duration {
    max_idle.mul_f64(1.0 - MAX_IDLE_SPREAD * random_unit())
}

/// Owns one idle pooled connection until it is taken or retired.
async fn watch(
    pools: Arc<Pools>,
    pool: Arc<Pool>,
    mut connected: Connected,
    mut taken: oneshot::Receiver<oneshot::Sender<Connected>>,
) {
    let admitted = Instant::now();
    let retire_at = admitted + retire_after(pools.max_idle);
    let mut chunk = [0u8; 512];
    let speaks_first = may_speak_first(&connected);
    let mut event = loop {
        // Biased, the read first: a close, an alert or data that arrived together with
        // a checkout retires the connection instead of being handed out with it.
        let event = tokio::select! {
            biased;
            r = tokio::io::AsyncReadExt::read(&mut connected.stream, &mut chunk) => Event::Read(r),
            t = &mut taken => Event::Take(t),
            _ = tokio::time::sleep_until(retire_at) => Event::MaxIdle,
            _ = pools.stop.cancelled() => Event::Drain,
            _ = outdated(pools.connector.reloads(), connected.info.generation, random_unit()) => Event::Reloaded,
        };
        match event {
            Event::Read(Ok(n))
                if n > 0 && speaks_first && connected.early.len() + n <= EARLY_LIMIT =>
            {
                connected.early.extend_from_slice(&chunk[..n]);
                if has_goaway(&connected.early) {
                    break Event::GoAway;
                }
            }
            other => break other,
        }
    };
    // The runtime's readiness may be stale (the process was frozen while the gateway
    // closed it), and timers late: look at the socket itself before handing it out.
    // Replacing the event drops the checkout's reply: it moves on to the next owner.
    if let Event::Take(Ok(_)) = &event {
        if admitted.elapsed() >= pools.max_idle {
            event = Event::MaxIdle;
        } else if connected.info.generation < pools.connector.generation() {
            event = Event::Reloaded;
        } else if !socket::open(connected.stream.get_ref().0.tcp()) {
            event = Event::Stale;
        }
    }
    if matches!(event, Event::Read(_) | Event::GoAway) && admitted.elapsed() < EARLY_END {
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
        Event::GoAway => Discard::GoAway,
        Event::Stale => Discard::Stale,
        Event::Read(Ok(0)) => Discard::Closed,
        Event::Read(Ok(_)) => Discard::UnexpectedData,
        Event::Read(Err(_)) => Discard::Error,
    };
    // The checkout slot goes before the close: a checkout that pops this owner now is
    // told at once that it has retired, rather than waiting out the close below.
    drop(taken);
    metrics::pool_discard(reason.label());
    if matches!(
        reason,
        Discard::MaxIdle
            | Discard::Drain
            | Discard::Abandoned
            | Discard::Reloaded
            | Discard::GoAway
    ) {
        // A clean goodbye: close_notify, then FIN.
        let _ = tokio::time::timeout(Duration::from_secs(1), connected.stream.shutdown()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retirement_ages_are_spread_over_the_last_fifth_and_never_past_max_idle() {
        let max_idle = Duration::from_secs(120);
        let ages: Vec<Duration> = (0..1000).map(|_| retire_after(max_idle)).collect();
        assert!(
            ages.iter()
                .all(|a| *a <= max_idle && *a >= max_idle.mul_f64(0.8))
        );
        let (min, max) = (ages.iter().min().unwrap(), ages.iter().max().unwrap());
        assert!(
            *max - *min > Duration::from_secs(20),
            "spread {min:?}..{max:?}"
        );
    }

    #[test]
    fn goaway_is_found_among_server_frames_and_not_in_payloads() {
        let settings = [0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100];
        let ping = [0, 0, 8, 6, 0, 0, 0, 0, 0, 7, 7, 7, 7, 7, 7, 7, 7];
        let goaway = [0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(!has_goaway(&settings));
        assert!(!has_goaway(&[&settings[..], &ping[..]].concat()));
        assert!(has_goaway(&[&settings[..], &goaway[..]].concat()));
        // A 7 in a payload is not a frame type.
        let tricky = [0, 0, 4, 8, 0, 0, 0, 0, 0, 0, 0, 0, 7];
        assert!(!has_goaway(&tricky));
        // A header cut short is not read past.
        assert!(!has_goaway(&goaway[..5]));
    }
}
