//! The two-way copy between a downstream TCP stream and an upstream TLS stream.
//!
//! Both directions are polled in one task, so the copy sees every way a connection
//! can end and reports it as an `Outcome`. Half-close is honoured both ways: an EOF
//! on one side shuts down only the write half of the other (close_notify + FIN
//! upstream, FIN downstream) while the opposite direction keeps flowing.
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
/// How long a graceful close after an idle timeout may take.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

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
    let aborted = abort.cancelled();
    tokio::pin!(aborted);
    let mut on_reply = Some(on_reply);

    let outcome = poll_fn(|cx| {
        if aborted.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Outcome::DrainAborted);
        }
        let mut active = false;
        if !to_up.done {
            match to_up.poll(
                cx,
                Pin::new(&mut down),
                Pin::new(&mut up),
                &handles.to_upstream,
                &mut active,
            ) {
                Poll::Ready(Ok(())) => {
                    closed_first.get_or_insert(Side::Downstream);
                }
                Poll::Ready(Err(e)) => {
                    closed_first.get_or_insert(Side::Downstream);
                    return Poll::Ready(e.outcome(Side::Downstream));
                }
                Poll::Pending => {}
            }
        }
        if !to_down.done {
            match to_down.poll(
                cx,
                Pin::new(&mut up),
                Pin::new(&mut down),
                &handles.to_downstream,
                &mut active,
            ) {
                Poll::Ready(Ok(())) => {
                    closed_first.get_or_insert(Side::Upstream);
                }
                Poll::Ready(Err(e)) => {
                    closed_first.get_or_insert(Side::Upstream);
                    if let HalfError::Read(io) = &e {
                        upstream_error = Some(crate::error::tls_error_kind(io));
                    }
                    return Poll::Ready(e.outcome(Side::Upstream));
                }
                Poll::Pending => {}
            }
            if to_down.bytes > 0
                && let Some(f) = on_reply.take()
            {
                f();
            }
        }
        if to_up.done && to_down.done {
            return Poll::Ready(Outcome::Clean);
        }
        if active {
            last_activity = Instant::now();
        }
        poll_idle(cx, idle_sleep.as_mut().as_pin_mut(), idle, last_activity)
    })
    .await;

    let report = Report {
        outcome,
        to_upstream: to_up.bytes,
        to_downstream: to_down.bytes,
        closed_first,
        first_upstream_write: to_up.first_write,
        upstream_error: upstream_error.filter(|_| outcome == Outcome::UpstreamTlsError),
    };
    match outcome {
        Outcome::Clean => {}
        // Idle with bytes still owed (a writer that stopped taking them) is a stall,
        // not an end: a FIN would pass a cut-off stream off as complete.
        Outcome::IdleTimeout if to_up.buf.is_none() && to_down.buf.is_none() => {
            close_gracefully(&mut down, &mut up).await
        }
        _ => {
            socket::abort(&down);
            socket::abort(up.get_ref().0.tcp());
        }
    }
    report
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

async fn close_gracefully(down: &mut TcpStream, up: &mut Upstream) {
    use tokio::io::AsyncWriteExt;
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        let _ = up.shutdown().await;
        let _ = down.shutdown().await;
    })
    .await;
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
                Step::Again => {}
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
