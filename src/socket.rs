//! Socket options, through socket2.
//!
//! Invariant: an option the platform refuses (gVisor lacks some) is never fatal;
//! `abort` always ends the connection, with RST when the platform allows it.

use std::{
    io,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// Keepalive for upstream sockets: Google's network drops flows idle for 10 minutes.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
const KEEPALIVE_PROBES: u32 = 5;

/// Options for an accepted downstream socket.
pub fn downstream(stream: &TcpStream) {
    tolerate("TCP_NODELAY", stream.set_nodelay(true));
}

/// Options for an upstream socket.
pub fn upstream(stream: &TcpStream) {
    tolerate("TCP_NODELAY", stream.set_nodelay(true));
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    tolerate(
        "SO_KEEPALIVE",
        SockRef::from(stream).set_tcp_keepalive(&keepalive),
    );
}

/// Arranges for the socket to send RST instead of FIN when it is dropped.
///
/// Used for truncation and resets: the peer must not mistake the end for a clean one.
pub fn abort(stream: &TcpStream) {
    let sock = SockRef::from(stream);
    if let Err(e) = sock.set_linger(Some(Duration::ZERO)) {
        tolerate("SO_LINGER", Err::<(), _>(e));
        // Without SO_LINGER the best that is left is an abrupt shutdown of both halves.
        let _ = sock.shutdown(std::net::Shutdown::Both);
    }
}

/// Logs a refused option once per process and carries on.
fn tolerate(option: &'static str, result: io::Result<()>) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if let Err(e) = result {
        if !WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(socket.option = option, error = %e, "socket option refused by the platform; continuing without it");
        }
    }
}
