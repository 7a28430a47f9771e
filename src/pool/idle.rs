//! One idle pooled connection's life: its owner task keeps a read pending (session
//! tickets, a close, an alert, an HTTP/2 GOAWAY retire it at once) until a checkout
//! takes it, it ages out, the TLS material is reloaded or the drain begins.
//!
//! Invariant: a connection is handed out only if, looked at afresh when it is taken,
//! it is open both ways, younger than `RUNNEL_POOL_MAX_IDLE` and made with the current
//! TLS material; otherwise the checkout moves on to the next owner.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{io::AsyncWriteExt, sync::oneshot, time::Instant};

use super::{Discard, EARLY_END, Pool, Pools};
use crate::{admit, connect::Connected, metrics, socket};

/// Pooled connections retire at a random point between this share of
/// `RUNNEL_POOL_MAX_IDLE` and all of it, so connections made together (at start, after
/// a reload) are not all replaced at once, and none outlives the setting.
const MAX_IDLE_SPREAD: f64 = 0.2;

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
pub(super) async fn watch(
    pools: Arc<Pools>,
    pool: Arc<Pool>,
    mut connected: Connected,
    mut taken: oneshot::Receiver<oneshot::Sender<Connected>>,
) {
    let admitted = Instant::now();
    let retire_at = admitted + retire_after(pools.max_idle);
    let mut chunk = [0u8; 512];
    let speaks_first = admit::may_speak_first(&connected);
    let outdated = outdated(
        pools.connector.reloads(),
        connected.info.generation,
        random_unit(),
    );
    tokio::pin!(outdated);
    let mut event = loop {
        // Biased, the read first: a close, an alert or data that arrived together with
        // a checkout retires the connection instead of being handed out with it.
        let event = tokio::select! {
            biased;
            r = tokio::io::AsyncReadExt::read(&mut connected.stream, &mut chunk) => Event::Read(r),
            t = &mut taken => Event::Take(t),
            _ = tokio::time::sleep_until(retire_at) => Event::MaxIdle,
            _ = pools.stop.cancelled() => Event::Drain,
            _ = &mut outdated => Event::Reloaded,
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
