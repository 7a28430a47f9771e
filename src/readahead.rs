//! The upstream socket under rustls, reading ahead in large gulps once a stream is busy.
//!
//! rustls asks its transport for at most 4 KiB at a time (its deframer grows by 4 KiB),
//! so over a bare `TcpStream` a bulk download costs one `recvfrom` per 4 KiB. `ReadAhead`
//! reads straight into rustls's buffer while reads come back short (request-sized
//! exchanges: no extra copy), and once a read fills that buffer (a busy stream) reads
//! up to 64 KiB at a time into a buffer of its own, then hands it on from memory.
//!
//! Invariant: bytes are handed on in order, exactly once, and an EOF or error only after
//! every byte read before it; the gulp buffer is held only while it has bytes, so an
//! idle connection holds none.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

/// One read's worth on a busy stream: four full TLS records.
const GULP: usize = 64 * 1024;

/// A `TcpStream` that reads ahead while the stream is busy; writes go straight through.
#[derive(Debug)]
pub struct ReadAhead {
    tcp: TcpStream,
    /// Bytes read but not yet handed on: `buf[start..]`.
    buf: Vec<u8>,
    start: usize,
    /// The last direct read filled the caller's buffer: read ahead next time.
    busy: bool,
}

impl ReadAhead {
    pub fn new(tcp: TcpStream) -> ReadAhead {
        ReadAhead {
            tcp,
            buf: Vec::new(),
            start: 0,
            busy: false,
        }
    }

    /// The socket, for its options and addresses.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Hands on what is buffered; frees the buffer once it is empty.
    fn drain_into(&mut self, out: &mut ReadBuf<'_>) {
        let n = out.remaining().min(self.buf.len() - self.start);
        out.put_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        if self.start == self.buf.len() {
            self.buf = Vec::new();
            self.start = 0;
        }
    }
}

impl AsyncRead for ReadAhead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.start < this.buf.len() {
            this.drain_into(out);
            return Poll::Ready(Ok(()));
        }
        if !this.busy {
            let before = out.filled().len();
            ready!(Pin::new(&mut this.tcp).poll_read(cx, out))?;
            this.busy = out.filled().len() > before && out.remaining() == 0;
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(this.tcp.poll_read_ready(cx))?;
            // Allocated only once the socket is readable, so a wait holds no buffer.
            let mut buf = Vec::with_capacity(GULP);
            match this.tcp.try_read_buf(&mut buf) {
                Ok(n) => {
                    // A short gulp means the burst is over: read direct again.
                    this.busy = n == GULP;
                    if n > 0 {
                        this.buf = buf;
                        this.start = 0;
                        this.drain_into(out);
                    }
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for ReadAhead {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Reads `total` bytes through `ReadAhead` in 4 KiB asks, as rustls does.
    async fn read_all_in_small_asks(mut r: ReadAhead, total: usize) -> (Vec<u8>, bool) {
        let mut got = Vec::with_capacity(total);
        let mut ask = [0u8; 4096];
        let mut went_busy = false;
        loop {
            let n = r.read(&mut ask).await.unwrap();
            went_busy |= r.busy;
            if n == 0 {
                return (got, went_busy);
            }
            got.extend_from_slice(&ask[..n]);
        }
    }

    #[tokio::test]
    async fn bytes_come_through_in_order_and_whole_in_both_modes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sent: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let writer = {
            let sent = sent.clone();
            tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.unwrap();
                // A small message first (direct reads), then a bulk burst (read-ahead).
                s.write_all(&sent[..100]).await.unwrap();
                s.flush().await.unwrap();
                s.write_all(&sent[100..]).await.unwrap();
                s.shutdown().await.unwrap();
            })
        };
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (got, went_busy) = read_all_in_small_asks(ReadAhead::new(tcp), sent.len()).await;
        writer.await.unwrap();
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "bytes altered or reordered");
        assert!(went_busy, "a 3 MB burst never switched to read-ahead");
    }
}
