//! The two-way copy between a downstream TCP stream and an upstream TLS stream.
//!
//! Both directions are polled in one task, so the copy sees every way a connection
//! can end and reports it as an `Outcome`. Half-close is honoured both ways: an EOF
//! on one side shuts down only the write half of the other (close_notify + FIN
//! upstream, FIN downstream) while the opposite direction keeps flowing.
//!
//! Neither direction starves the other: each moves at most `QUOTA` reads per turn, and
//! the two take turns going first. A connection where nothing moved for `PEER_CHECK`
//! asks the kernel whether the gateway still acknowledges (`socket::peer`): a slow
//! gateway (window shut, probes answered) is waited for, a vanished one is reset.
//!
//! Invariant: an upstream that stops without close_notify (TLS truncation), a reset,
//! or any error ends both sides with RST, never with a clean FIN the downstream could
//! mistake for a complete response.

use std::{
    cell::RefCell,
    future::poll_fn,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{connect::Upstream, error::Outcome, metrics::Handles, socket};

/// A first read's size: one TLS record's worth of plaintext.
const SMALL_BUF: usize = 16 * 1024;
/// Once a read fills the small buffer, the stream is busy: read in larger gulps, so
/// rustls can emit several records in one vectored write.
const LARGE_BUF: usize = 64 * 1024;
/// How long a graceful close after an idle timeout may take; past it, both sides are
/// reset (what was still unsent would otherwise end in a FIN).
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Reads one direction may make in one turn before the other gets its turn: 8 of up to
/// 64 KiB, well inside tokio's budget of 128 operations per task poll, which one
/// saturating direction would otherwise use up every time.
const QUOTA: usize = 8;
/// Nothing moved for this long: ask the kernel whether the gateway still acknowledges.
const PEER_CHECK: Duration = Duration::from_secs(10);

/// Which side a direction reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Downstream,
    Upstream,
}

impl Side {
    pub fn label(self) -> &'static str {
        match self {
            Side::Downstream => "downstream",
            Side::Upstream => "upstream",
        }
    }
}

/// How the copy ended, with byte counts kept even on error.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    pub outcome: Outcome,
    pub to_upstream: u64,
    pub to_downstream: u64,
    /// The side whose EOF (or error) came first, if any.
    pub closed_first: Option<Side>,
    /// When the first byte was written upstream.
    pub first_upstream_write: Option<tokio::time::Instant>,
    /// The `runnel_upstream_errors_total` kind, when the upstream failed.
    pub upstream_error: Option<&'static str>,
}

impl Report {
    /// A connection that ended before any byte was copied.
    pub fn ended(outcome: Outcome) -> Report {
        Report {
            outcome,
            to_upstream: 0,
            to_downstream: 0,
            closed_first: None,
            first_upstream_write: None,
            upstream_error: None,
        }
    }
}

/// Copies both ways until both directions end, an error, the idle timeout or `abort`.
///
/// `initial` holds downstream bytes already read (the first bytes) and `early` upstream
/// bytes already read (a server's preface on a pooled connection); each goes first.
/// Consumes both streams and closes them: gracefully on a clean end, with RST otherwise.
/// `on_reply` runs once, when the first upstream byte reaches the downstream.
pub async fn run(
    mut down: TcpStream,
    mut up: Box<Upstream>,
    initial: Vec<u8>,
    early: Vec<u8>,
    idle: Option<Duration>,
    abort: &CancellationToken,
    on_reply: impl FnOnce(),
) -> Report {
    let handles = Handles::get();
    let mut to_up = Half::new(initial);
    let mut to_down = Half::new(early);
    let mut upstream_error = None;
    let mut closed_first = None;
    let mut last_activity = Instant::now();
    let idle_sleep = idle.map(|d| tokio::time::sleep(d));
    tokio::pin!(idle_sleep);
    let check = tokio::time::sleep(PEER_CHECK);
    tokio::pin!(check);
    let mut watchdog = Watchdog { armed: true };
    let aborted = abort.cancelled();
    tokio::pin!(aborted);
    let mut on_reply = Some(on_reply);
    let mut upload_first = true;

    let outcome = poll_fn(|cx| {
        if aborted.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Outcome::DrainAborted);
        }
        let mut active = false;
        let order = match upload_first {
            true => [Side::Downstream, Side::Upstream],
            false => [Side::Upstream, Side::Downstream],
        };
        upload_first = !upload_first;
        for from in order {
            let polled = match from {
                Side::Downstream if !to_up.done => to_up.poll(
                    cx,
                    Pin::new(&mut down),
                    Pin::new(&mut up),
                    &handles.to_upstream,
                    &mut active,
                ),
                Side::Upstream if !to_down.done => to_down.poll(
                    cx,
                    Pin::new(&mut up),
                    Pin::new(&mut down),
                    &handles.to_downstream,
                    &mut active,
                ),
                _ => continue,
            };
            match polled {
                Poll::Ready(Ok(())) => {
                    closed_first.get_or_insert(from);
                }
                Poll::Ready(Err(e)) => {
                    closed_first.get_or_insert(from);
                    if let (Side::Upstream, HalfError::Read(io)) = (from, &e) {
                        upstream_error = Some(crate::error::tls_error_kind(io));
                    }
                    return Poll::Ready(e.outcome(from));
                }
                Poll::Pending => {}
            }
        }
        if to_down.bytes > 0
            && let Some(f) = on_reply.take()
        {
            f();
        }
        if to_up.done && to_down.done {
            return Poll::Ready(Outcome::Clean);
        }
        if to_up.yielded || to_down.yielded {
            // A direction stopped at its quota, not because it blocked: come back.
            cx.waker().wake_by_ref();
        }
        if active {
            last_activity = Instant::now();
        }
        if watchdog
            .poll(
                cx,
                check.as_mut(),
                active,
                last_activity,
                up.get_ref().0.tcp(),
            )
            .is_ready()
        {
            upstream_error = Some("unresponsive");
            return Poll::Ready(Outcome::UpstreamUnresponsive);
        }
        poll_idle(cx, idle_sleep.as_mut().as_pin_mut(), idle, last_activity)
    })
    .await;

    // Idle with bytes still owed (a writer that stopped taking them, or TLS records
    // rustls holds for a socket that would not take them) is a stall, not an end.
    // The kernel's send queues count too: a gateway that kept its window shut holds
    // what runnel wrote, and a FIN queued behind it would end a stream it never took.
    let owed = to_up.buf.is_some()
        || to_down.buf.is_some()
        || up.get_ref().1.wants_write()
        || (outcome == Outcome::IdleTimeout
            && (socket::unsent(up.get_ref().0.tcp()) || socket::unsent(&down)));
    let outcome = match outcome {
        Outcome::IdleTimeout if owed => Outcome::IdleTimeoutStalled,
        Outcome::IdleTimeout if !close_gracefully(&mut down, &mut up).await => {
            Outcome::IdleTimeoutStalled
        }
        other => other,
    };
    if !matches!(outcome, Outcome::Clean | Outcome::IdleTimeout) {
        socket::abort(&down);
        socket::abort(up.get_ref().0.tcp());
    }
    Report {
        outcome,
        to_upstream: to_up.bytes,
        to_downstream: to_down.bytes,
        closed_first,
        first_upstream_write: to_up.first_write,
        upstream_error: upstream_error.filter(|_| {
            matches!(
                outcome,
                Outcome::UpstreamTlsError | Outcome::UpstreamUnresponsive
            )
        }),
    }
}

/// Asks the kernel about the gateway once nothing has moved for `PEER_CHECK`, and again
/// every `PEER_CHECK` while that lasts and something is outstanding; quiet connections
/// with nothing outstanding are left to keepalive (no timer until bytes move again).
struct Watchdog {
    armed: bool,
}

impl Watchdog {
    /// Ready when the gateway is unresponsive.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        mut sleep: Pin<&mut tokio::time::Sleep>,
        active: bool,
        last_activity: Instant,
        tcp: &TcpStream,
    ) -> Poll<()> {
        if active && !self.armed {
            self.armed = true;
            sleep.as_mut().reset(last_activity + PEER_CHECK);
        }
        while self.armed {
            ready!(sleep.as_mut().poll(cx));
            let now = Instant::now();
            if now < last_activity + PEER_CHECK {
                sleep.as_mut().reset(last_activity + PEER_CHECK);
                continue;
            }
            match socket::peer(tcp) {
                socket::Peer::Unresponsive => return Poll::Ready(()),
                socket::Peer::Answering => sleep.as_mut().reset(now + PEER_CHECK),
                socket::Peer::Idle => self.armed = false,
            }
        }
        Poll::Pending
    }
}

/// Fires once nothing has moved for `idle`; re-arms itself lazily so that active
/// connections do not touch the timer on every chunk.
fn poll_idle(
    cx: &mut Context<'_>,
    sleep: Option<Pin<&mut tokio::time::Sleep>>,
    idle: Option<Duration>,
    last: Instant,
) -> Poll<Outcome> {
    let (Some(mut sleep), Some(idle)) = (sleep, idle) else {
        return Poll::Pending;
    };
    loop {
        ready!(sleep.as_mut().poll(cx));
        let deadline = last + idle;
        if deadline <= Instant::now() {
            return Poll::Ready(Outcome::IdleTimeout);
        }
        sleep.as_mut().reset(deadline);
    }
}

/// close_notify + FIN upstream, FIN downstream; false when that could not finish within
/// `CLOSE_GRACE` (a side that takes nothing), and the caller resets both.
async fn close_gracefully(down: &mut TcpStream, up: &mut Upstream) -> bool {
    use tokio::io::AsyncWriteExt;
    tokio::time::timeout(CLOSE_GRACE, async {
        up.shutdown().await.is_ok() && down.shutdown().await.is_ok()
    })
    .await
    .unwrap_or(false)
}

/// A failed direction: which operation failed decides the side at fault.
enum HalfError {
    Read(io::Error),
    Write,
}

impl HalfError {
    /// The outcome for a direction reading from `from`.
    fn outcome(&self, from: Side) -> Outcome {
        match (self, from) {
            (HalfError::Read(_), Side::Downstream) | (HalfError::Write, Side::Upstream) => {
                Outcome::DownstreamReset
            }
            (HalfError::Write, Side::Downstream) => Outcome::UpstreamReset,
            (HalfError::Read(e), Side::Upstream) => match e.kind() {
                // rustls reports a TCP EOF without close_notify as UnexpectedEof.
                io::ErrorKind::UnexpectedEof => Outcome::UpstreamTruncated,
                io::ErrorKind::InvalidData => Outcome::UpstreamTlsError,
                _ => Outcome::UpstreamReset,
            },
        }
    }
}

thread_local! {
    /// Each worker thread's read buffer, shared by every connection it polls: bytes are
    /// read into it and written on at once, so a connection owns a buffer only for
    /// bytes its writer could not take yet.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// One direction: reader -> scratch buffer -> writer, then shutdown of the writer on EOF.
struct Half {
    /// Bytes `start..end` read but not yet written: the first bytes handed in, or the
    /// rest of a read the writer did not take. `None` otherwise, so an idle connection
    /// holds no copy buffer.
    buf: Option<Vec<u8>>,
    start: usize,
    end: usize,
    /// How much one read asks for: `SMALL_BUF`, or `LARGE_BUF` once a read filled it.
    size: usize,
    read_eof: bool,
    need_flush: bool,
    done: bool,
    /// The last turn ended at `QUOTA` reads with more to do, not because it blocked.
    yielded: bool,
    bytes: u64,
    first_write: Option<tokio::time::Instant>,
}

/// What a read-and-write step left to do.
enum Step {
    /// Bytes moved: read again.
    Again,
    /// The reader had nothing.
    ReadPending,
}

impl Half {
    fn new(initial: Vec<u8>) -> Half {
        let end = initial.len();
        let buf = (end > 0).then_some(initial);
        Half {
            buf,
            start: 0,
            end,
            size: SMALL_BUF,
            read_eof: false,
            need_flush: false,
            done: false,
            yielded: false,
            bytes: 0,
            first_write: None,
        }
    }

    /// Counts `n` bytes written.
    fn wrote(&mut self, n: usize, counter: &metrics::Counter, active: &mut bool) {
        self.bytes += n as u64;
        self.first_write
            .get_or_insert_with(tokio::time::Instant::now);
        counter.increment(n as u64);
        self.need_flush = true;
        *active = true;
    }

    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
        counter: &metrics::Counter,
        active: &mut bool,
    ) -> Poll<Result<(), HalfError>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        self.yielded = false;
        let mut reads = 0;
        loop {
            if let Some(buf) = self.buf.take() {
                while self.start < self.end {
                    let written = match writer.as_mut().poll_write(cx, &buf[self.start..self.end]) {
                        Poll::Pending => {
                            self.buf = Some(buf);
                            return Poll::Pending;
                        }
                        Poll::Ready(r) => r.map_err(|_| HalfError::Write)?,
                    };
                    if written == 0 {
                        return Poll::Ready(Err(HalfError::Write));
                    }
                    self.start += written;
                    self.wrote(written, counter, active);
                }
            }
            if self.read_eof {
                ready!(writer.as_mut().poll_flush(cx)).map_err(|_| HalfError::Write)?;
                ready!(writer.as_mut().poll_shutdown(cx)).map_err(|_| HalfError::Write)?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            let step = SCRATCH.with_borrow_mut(|scratch| {
                self.read_and_write(
                    scratch,
                    cx,
                    reader.as_mut(),
                    writer.as_mut(),
                    counter,
                    active,
                )
            });
            match ready!(step)? {
                Step::Again => {
                    reads += 1;
                    if reads == QUOTA {
                        // The other direction's turn; the caller wakes the task again.
                        self.yielded = true;
                        return Poll::Pending;
                    }
                }
                Step::ReadPending => {
                    // Nothing to read: push out what was written.
                    if self.need_flush {
                        ready!(writer.as_mut().poll_flush(cx)).map_err(|_| HalfError::Write)?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// One read into `scratch`, written on at once; what the writer does not take is
    /// copied into the half's own buffer (and `Pending` returned: the writer will wake).
    fn read_and_write<R, W>(
        &mut self,
        scratch: &mut Vec<u8>,
        cx: &mut Context<'_>,
        reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
        counter: &metrics::Counter,
        active: &mut bool,
    ) -> Poll<Result<Step, HalfError>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        let size = self.size;
        if scratch.len() < size {
            scratch.resize(size, 0);
        }
        let mut read_buf = ReadBuf::new(&mut scratch[..size]);
        match reader.poll_read(cx, &mut read_buf) {
            Poll::Pending => return Poll::Ready(Ok(Step::ReadPending)),
            Poll::Ready(Err(e)) => return Poll::Ready(Err(HalfError::Read(e))),
            Poll::Ready(Ok(())) => {}
        }
        let n = read_buf.filled().len();
        *active = true;
        if n == 0 {
            self.read_eof = true;
            return Poll::Ready(Ok(Step::Again));
        }
        if n == size {
            self.size = LARGE_BUF;
        }
        let mut off = 0;
        while off < n {
            match writer.as_mut().poll_write(cx, &scratch[off..n]) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                    return Poll::Ready(Err(HalfError::Write));
                }
                Poll::Ready(Ok(written)) => {
                    off += written;
                    self.wrote(written, counter, active);
                }
                Poll::Pending => {
                    self.buf = Some(scratch[off..n].to_vec());
                    (self.start, self.end) = (0, n - off);
                    return Poll::Pending;
                }
            }
        }
        Poll::Ready(Ok(Step::Again))
    }
}
