//! The demo gateway's HTTP/2 (RFC 9113): just enough to answer every request on a
//! connection with the same short page, for curl and nghttp through the tunnel.
//!
//! Written here rather than taken from the `h2` crate: the demo needs no request
//! headers, so there is no HPACK decoder (the client's header blocks are skipped whole,
//! which is sound because only a decoder keeps HPACK state), and the response uses only
//! the static table and literals without indexing, so there is no encoder state either.
//! That is a few frames' worth of code instead of a dozen crates in a binary meant to
//! stay small. Invariant: what it does it does by the RFC: the preface is checked, the
//! client's SETTINGS are acknowledged, flow control is honoured both ways, header blocks
//! continue only on their own stream, and anything it cannot follow ends the connection
//! with GOAWAY, never with a reply the client would misread.

use std::{
    collections::{HashMap, HashSet},
    io,
};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// What a client sends first, before its SETTINGS.
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
const PROTOCOL_ERROR: u32 = 0x1;
const FLOW_CONTROL_ERROR: u32 = 0x3;
const FRAME_SIZE_ERROR: u32 = 0x6;

/// The frame size and windows every peer starts with; we announce no other, so a
/// larger frame from the client is an error and our frames never exceed it.
const MAX_FRAME: usize = 16_384;
const DEFAULT_WINDOW: i64 = 65_535;
/// The largest window RFC 9113 allows.
const MAX_WINDOW: i64 = (1 << 31) - 1;
/// Streams a client may have open at once (announced): bounds what a connection holds.
const MAX_STREAMS: u32 = 100;

/// Serves one HTTP/2 connection (after ALPN h2): answers each request with `page`
/// (text/plain) once the request's stream has ended, until the client goes away.
pub async fn serve<S>(io: &mut S, page: &str) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut preface = [0u8; PREFACE.len()];
    io.read_exact(&mut preface).await?;
    if &preface != PREFACE {
        return Err(invalid("no HTTP/2 connection preface"));
    }
    // Our SETTINGS: the defaults but for a bound on open streams.
    let mut settings = SETTINGS_MAX_CONCURRENT_STREAMS.to_be_bytes().to_vec();
    settings.extend_from_slice(&MAX_STREAMS.to_be_bytes());
    write_frame(io, SETTINGS, 0, 0, &settings).await?;
    let mut conn = Conn {
        send_window: DEFAULT_WINDOW,
        initial_window: DEFAULT_WINDOW,
        last_stream: 0,
        continuing: None,
        open: HashSet::new(),
        replies: HashMap::new(),
    };
    loop {
        let next = match read_frame(io).await? {
            None => return Ok(()),
            Some(Err(code)) => Err(code),
            Some(Ok((kind, flags, stream, payload))) => {
                conn.on_frame(io, kind, flags, stream, &payload, page).await
            }
        };
        match next {
            Ok(Next::Continue) => conn.flush(io).await?,
            Ok(Next::Stop) => return Ok(()),
            Err(code) => {
                let mut goaway = conn.last_stream.to_be_bytes().to_vec();
                goaway.extend_from_slice(&code.to_be_bytes());
                write_frame(io, GOAWAY, 0, 0, &goaway).await?;
                return Err(invalid("HTTP/2 protocol error from the client"));
            }
        }
    }
}

/// Connection state: our send windows and the replies still owed.
struct Conn {
    send_window: i64,
    /// SETTINGS_INITIAL_WINDOW_SIZE as the client last set it.
    initial_window: i64,
    /// The highest stream the client opened (for GOAWAY).
    last_stream: u32,
    /// A header block still open: (stream, whether its HEADERS ended the stream).
    continuing: Option<(u32, bool)>,
    /// Streams whose request has not ended yet (a body or trailers to come).
    open: HashSet<u32>,
    /// Streams whose request ended and whose page is not all sent: (window, bytes left).
    replies: HashMap<u32, (i64, Vec<u8>)>,
}

enum Next {
    Continue,
    Stop,
}

impl Conn {
    /// Handles one frame; `Err` is the GOAWAY error code.
    async fn on_frame<S: AsyncWrite + Unpin>(
        &mut self,
        io: &mut S,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
        page: &str,
    ) -> Result<Next, u32> {
        let io_error = |_| PROTOCOL_ERROR;
        if let Some((open, _)) = self.continuing
            && (kind != CONTINUATION || stream != open)
        {
            return Err(PROTOCOL_ERROR);
        }
        match kind {
            SETTINGS if flags & ACK == 0 => {
                if stream != 0 || payload.len() % 6 != 0 {
                    return Err(FRAME_SIZE_ERROR);
                }
                for setting in payload.chunks_exact(6) {
                    let id = u16::from_be_bytes([setting[0], setting[1]]);
                    let value = i64::from(u32::from_be_bytes([
                        setting[2], setting[3], setting[4], setting[5],
                    ]));
                    if id == SETTINGS_INITIAL_WINDOW_SIZE {
                        if value > MAX_WINDOW {
                            return Err(FLOW_CONTROL_ERROR);
                        }
                        // Changes every open stream's window by the difference.
                        for (window, _) in self.replies.values_mut() {
                            *window += value - self.initial_window;
                        }
                        self.initial_window = value;
                    }
                }
                write_frame(io, SETTINGS, ACK, 0, &[])
                    .await
                    .map_err(io_error)?;
            }
            PING if flags & ACK == 0 => {
                if payload.len() != 8 {
                    return Err(FRAME_SIZE_ERROR);
                }
                write_frame(io, PING, ACK, 0, payload)
                    .await
                    .map_err(io_error)?;
            }
            HEADERS => {
                // A new request on a higher odd stream, or trailers on an open one.
                if !self.open.contains(&stream) {
                    if stream % 2 == 0 || stream <= self.last_stream {
                        return Err(PROTOCOL_ERROR);
                    }
                    // Over the announced limit: a stream error the RFC lets us
                    // treat as a connection error.
                    if self.open.len() + self.replies.len() >= MAX_STREAMS as usize {
                        return Err(PROTOCOL_ERROR);
                    }
                    self.last_stream = stream;
                }
                let ends_stream = flags & END_STREAM != 0;
                self.continuing = Some((stream, ends_stream));
                if flags & END_HEADERS != 0 {
                    self.end_headers(io, page).await.map_err(io_error)?;
                }
            }
            CONTINUATION => {
                if self.continuing.is_none() {
                    return Err(PROTOCOL_ERROR);
                }
                if flags & END_HEADERS != 0 {
                    self.end_headers(io, page).await.map_err(io_error)?;
                }
            }
            DATA => {
                if stream == 0 || stream > self.last_stream {
                    return Err(PROTOCOL_ERROR);
                }
                let open = self.open.contains(&stream);
                // The body is not read, but its bytes count against our receive
                // windows: give them back at once so a large upload never stalls.
                let credit = u32::try_from(payload.len()).map_err(|_| FRAME_SIZE_ERROR)?;
                if credit > 0 {
                    write_frame(io, WINDOW_UPDATE, 0, 0, &credit.to_be_bytes())
                        .await
                        .map_err(io_error)?;
                }
                // DATA on a stream already ended is dropped, counted above.
                if open && flags & END_STREAM != 0 {
                    self.open.remove(&stream);
                    self.reply(io, stream, page).await.map_err(io_error)?;
                } else if open && credit > 0 {
                    write_frame(io, WINDOW_UPDATE, 0, stream, &credit.to_be_bytes())
                        .await
                        .map_err(io_error)?;
                }
            }
            WINDOW_UPDATE => {
                let bytes: [u8; 4] = payload.try_into().map_err(|_| FRAME_SIZE_ERROR)?;
                let increment = i64::from(u32::from_be_bytes(bytes) & 0x7fff_ffff);
                let window = match stream {
                    0 => Some(&mut self.send_window),
                    s => self.replies.get_mut(&s).map(|(w, _)| w),
                };
                if let Some(window) = window {
                    *window += increment;
                    if increment == 0 || *window > MAX_WINDOW {
                        return Err(FLOW_CONTROL_ERROR);
                    }
                }
            }
            RST_STREAM => {
                self.open.remove(&stream);
                self.replies.remove(&stream);
            }
            PUSH_PROMISE => return Err(PROTOCOL_ERROR),
            GOAWAY => return Ok(Next::Stop),
            // PRIORITY, acknowledgements, and unknown types (which must be ignored).
            _ => {}
        }
        Ok(Next::Continue)
    }

    /// A header block is complete: the request has ended if its HEADERS said so,
    /// else a body (or trailers) follows.
    async fn end_headers<S: AsyncWrite + Unpin>(
        &mut self,
        io: &mut S,
        page: &str,
    ) -> io::Result<()> {
        match self.continuing.take() {
            Some((stream, true)) => {
                self.open.remove(&stream);
                self.reply(io, stream, page).await
            }
            Some((stream, false)) => {
                self.open.insert(stream);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Sends the response headers; the body follows as the windows allow.
    async fn reply<S: AsyncWrite + Unpin>(
        &mut self,
        io: &mut S,
        stream: u32,
        page: &str,
    ) -> io::Result<()> {
        let mut block = vec![0x88]; // :status 200, static table entry 8
        // content-type (static 31) and content-length (static 28), literal values
        // without indexing: no dynamic table on either side.
        for (index, value) in [(31, "text/plain"), (28, &page.len().to_string())] {
            // Both values are far shorter than 127 bytes: one length byte, no Huffman.
            let len = u8::try_from(value.len()).unwrap_or(u8::MAX) & 0x7f;
            block.extend_from_slice(&[0x0f, index - 15, len]);
            block.extend_from_slice(value.as_bytes());
        }
        write_frame(io, HEADERS, END_HEADERS, stream, &block).await?;
        self.replies
            .insert(stream, (self.initial_window, page.as_bytes().to_vec()));
        Ok(())
    }

    /// Sends what the windows allow of every owed body, ending each stream with its
    /// last DATA frame.
    async fn flush<S: AsyncWrite + Unpin>(&mut self, io: &mut S) -> io::Result<()> {
        let mut done = Vec::new();
        for (stream, (window, left)) in &mut self.replies {
            loop {
                let allowed = (*window).min(self.send_window).max(0);
                let n = left
                    .len()
                    .min(MAX_FRAME)
                    .min(usize::try_from(allowed).unwrap_or(0));
                if n == 0 && !left.is_empty() {
                    break; // until a WINDOW_UPDATE
                }
                let flags = if n == left.len() { END_STREAM } else { 0 };
                write_frame(io, DATA, flags, *stream, &left[..n]).await?;
                left.drain(..n);
                *window -= n as i64;
                self.send_window -= n as i64;
                if flags == END_STREAM {
                    done.push(*stream);
                    break;
                }
            }
        }
        for stream in done {
            self.replies.remove(&stream);
        }
        io.flush().await
    }
}

/// One frame as read: (type, flags, stream, payload).
type Frame = (u8, u8, u32, Vec<u8>);

/// Reads one frame; `None` when the client has gone, `Some(Err)` with the GOAWAY code
/// for a frame too large to read.
async fn read_frame<S: AsyncRead + Unpin>(io: &mut S) -> io::Result<Option<Result<Frame, u32>>> {
    let mut head = [0u8; 9];
    match io.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    if len > MAX_FRAME {
        return Ok(Some(Err(FRAME_SIZE_ERROR)));
    }
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    io.read_exact(&mut payload).await?;
    Ok(Some(Ok((head[3], head[4], stream, payload))))
}

async fn write_frame<S: AsyncWrite + Unpin>(
    io: &mut S,
    kind: u8,
    flags: u8,
    stream: u32,
    payload: &[u8],
) -> io::Result<()> {
    let len = u32::try_from(payload.len()).map_err(|_| invalid("frame too large"))?;
    let mut frame = Vec::with_capacity(9 + payload.len());
    frame.extend_from_slice(&len.to_be_bytes()[1..]);
    frame.extend_from_slice(&[kind, flags]);
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    io.write_all(&frame).await
}

fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}
