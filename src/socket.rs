//! Socket options, through socket2, and what the kernel knows about a peer.
//!
//! A peer that is slow is not a dead one: a gateway under flow control keeps its
//! window shut for as long as its backend is slow, and answers every probe. So there is
//! no `TCP_USER_TIMEOUT` (on Linux it also bounds zero-window probing and would cut such
//! a gateway after its value). Instead an idle connection is watched by keepalive, and
//! a connection with bytes outstanding by `peer`, which asks the kernel (`TCP_INFO`)
//! when the gateway last acknowledged anything.
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

/// Keepalive for upstream sockets: a probe after 30 s of silence, then every 10 s; 3
/// unanswered and the kernel ends the connection, so an idle connection (pooled ones
/// too) to a gateway that vanished is gone within 60 s. It also keeps the flow alive
/// in Google's network, which drops flows idle for 10 minutes.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 3;
/// A gateway that acknowledged nothing for this long while data was in flight, or
/// while three probes in a row went unanswered, is gone (an answering gateway
/// acknowledges a retransmission within a few round trips, and a probe at once).
const UNANSWERED: Duration = Duration::from_secs(60);
/// Zero-window probes back off to one every 120 s (Linux's TCP_RTO_MAX), so one lost
/// probe can leave 240 s of silence with two probes counted: past this, with two
/// unanswered, the window stayed shut on a gateway that is gone.
const UNANSWERED_SHUT_WINDOW: Duration = Duration::from_secs(270);
/// `tcp_info.tcpi_state` of an established connection (the kernel's TCP_ESTABLISHED).
const ESTABLISHED: u8 = 1;

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

/// Whether the connection is still open both ways: no FIN and no reset from the peer.
/// Asked of the kernel (`TCP_INFO`'s state, else a `MSG_PEEK`), not of the runtime's
/// cached readiness, which is stale after the process was frozen while the peer
/// closed. Bytes merely pending (a late session ticket) leave it open.
pub fn open(stream: &TcpStream) -> bool {
    if let Ok(info) = tcp_info(stream) {
        return info.tcpi_state == ESTABLISHED;
    }
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
    match SockRef::from(stream).peek(&mut byte) {
        Ok(0) => false,
        Ok(_) => true,
        Err(e) => e.kind() == io::ErrorKind::WouldBlock,
    }
}

/// Whether the kernel still holds bytes written to this socket that the peer has not
/// acknowledged: owed bytes, for the idle timeout. False when the platform cannot tell.
pub fn unsent(stream: &TcpStream) -> bool {
    tcp_info(stream).is_ok_and(|i| i.tcpi_notsent_bytes > 0 || i.tcpi_unacked > 0)
}

/// What the kernel says about the upstream peer of a connection where nothing moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// Nothing is outstanding: keepalive watches the connection.
    Idle,
    /// It acknowledges what is sent (a shut window included: probes are answered).
    Answering,
    /// Data or probes have gone unacknowledged past the bounds above.
    Unresponsive,
}

/// Judges the peer from `TCP_INFO`; `Answering` when the platform cannot tell.
pub fn peer(stream: &TcpStream) -> Peer {
    let info = match tcp_info(stream) {
        Ok(info) => info,
        Err(e) => {
            tolerate("TCP_INFO", Err(e));
            return Peer::Answering;
        }
    };
    let silent = Duration::from_millis(info.tcpi_last_ack_recv.into());
    let in_flight = info.tcpi_unacked > 0;
    let probes = info.tcpi_probes;
    let queued = info.tcpi_notsent_bytes > 0;
    if !in_flight && !queued && probes == 0 {
        return Peer::Idle;
    }
    let dead = (silent >= UNANSWERED && (in_flight || probes >= 3))
        || (silent >= UNANSWERED_SHUT_WINDOW && probes >= 2);
    match dead {
        true => Peer::Unresponsive,
        false => Peer::Answering,
    }
}

/// `getsockopt(TCP_INFO)`: neither socket2 nor rustix offers it.
#[allow(unsafe_code)]
fn tcp_info(stream: &TcpStream) -> io::Result<libc::tcp_info> {
    use std::os::fd::AsRawFd;
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the pointer and length describe `info`, a zeroed plain-data struct the
    // kernel fills at most `len` bytes of (older kernels fill fewer: the rest stays 0);
    // the descriptor is borrowed from a live socket for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // A kernel that fills less than the fields read here cannot answer (they would
    // read as 0: "nothing outstanding").
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_notsent_bytes) + 4;
    if (len as usize) < needed {
        return Err(io::ErrorKind::Unsupported.into());
    }
    // SAFETY: zero-initialised above, and every field is an integer: any bytes are valid.
    Ok(unsafe { info.assume_init() })
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
