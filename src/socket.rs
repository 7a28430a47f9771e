//! Socket options, through socket2.
//!
//! Invariant: an option the platform refuses (gVisor lacks some) is never fatal;
//! `abort` always ends the connection, with RST when the platform allows it.

use std::{
    io,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// Keepalive for upstream sockets: Google's network drops flows idle for 10 minutes.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
const KEEPALIVE_PROBES: u32 = 5;
/// Data the gateway has not acknowledged for this long means a dead path: the
/// connection fails instead of waiting out TCP's ~15 minutes of retransmissions.
const USER_TIMEOUT: Duration = Duration::from_secs(30);

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
    tolerate(
        "TCP_USER_TIMEOUT",
        SockRef::from(stream).set_tcp_user_timeout(Some(USER_TIMEOUT)),
    );
}

/// Arranges for the socket to send RST instead of FIN when it is dropped.
///
/// Used for truncation and resets: the peer must not mistake the end for a clean one.
pub fn abort(stream: &TcpStream) {
    let sock = SockRef::from(stream);
    let refused = match sock.set_linger(Some(Duration::ZERO)) {
        Ok(()) => return,
        Err(e) => e,
    };
    tolerate("SO_LINGER", Err(refused));
    // Next best: connect(AF_UNSPEC) disconnects an established TCP socket, and Linux
    // (tcp_disconnect) sends RST doing it.
    if let Err(e) = rustix::net::connect_unspec(stream) {
        tolerate("connect(AF_UNSPEC)", Err(e.into()));
        // What is left is an abrupt shutdown of both halves: a FIN, not a RST.
        let _ = sock.shutdown(std::net::Shutdown::Both);
    }
}

/// Logs a refused option once per option and process, and carries on.
fn tolerate(option: &'static str, result: io::Result<()>) {
    static WARNED: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
    let Err(e) = result else {
        return;
    };
    let first = {
        let mut warned = WARNED.lock().unwrap_or_else(PoisonError::into_inner);
        let first = !warned.contains(&option);
        if first {
            warned.push(option);
        }
        first
    };
    if first {
        tracing::warn!(socket.option = option, error = %e, "socket option refused by the platform; continuing without it");
    }
}
