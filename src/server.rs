//! The accept loop: permits, backoff, and a task per connection in the tracker.
//!
//! Invariant: at most `RUNNEL_MAX_CONNECTIONS` connections are served at once; the
//! loop takes a permit before accepting, so more connections wait in the kernel's
//! backlog instead of in runnel's memory.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::task::TaskTracker;

use crate::{
    logging::{RateLimit, WARN_INTERVAL},
    metrics,
    tunnel::{self, Shared},
};

const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Out of descriptors, accept fails up to once per backoff: one line per interval.
static ACCEPT_FAILED: RateLimit = RateLimit::new(WARN_INTERVAL);

/// Accepts until `stop_accepting` completes, then drops the listener (new
/// connections are refused from then on).
pub async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    tracker: &TaskTracker,
    stop_accepting: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(shared.config.max_connections));
    let ids = AtomicU64::new(0);
    let mut backoff = BACKOFF_MIN;
    tokio::pin!(stop_accepting);
    loop {
        let permit = tokio::select! {
            _ = &mut stop_accepting => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = &mut stop_accepting => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = BACKOFF_MIN;
                let id = ids.fetch_add(1, Ordering::Relaxed);
                let shared = shared.clone();
                tracker.spawn(async move {
                    tunnel::handle(stream, peer, id, shared).await;
                    drop(permit);
                });
            }
            Err(e) => {
                // EMFILE, ENFILE, ENOBUFS...: retrying at once would spin. Back off.
                ::metrics::counter!(metrics::ACCEPT_ERRORS).increment(1);
                if let Some(suppressed) = ACCEPT_FAILED.check("accept") {
                    tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, suppressed, "accept failed; backing off");
                }
                tokio::select! {
                    _ = &mut stop_accepting => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
    drop(listener);
}
