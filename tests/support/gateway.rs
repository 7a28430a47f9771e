//! In-process test peers: an mTLS gateway (rustls) with scripted behaviours, and
//! runnel itself driven through `runnel::run` on ephemeral ports.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use runnel::{Config, Listeners, demo::Pki};
use rustls::ServerConfig;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::JoinHandle,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

/// What the gateway does with each connection after the handshake.
#[derive(Clone)]
pub enum Behaviour {
    /// Echo every byte; on the client's close_notify, finish echoing and close_notify back.
    Echo,
    /// Read until the client's close_notify, then reply with the byte count and close.
    CountThenReply,
    /// Send this reply, then close_notify + FIN at once, then read and record until EOF.
    ReplyThenHalfClose(Vec<u8>),
    /// Read one chunk, send this reply, then close TCP without close_notify (truncation).
    ReplyThenTruncate(Vec<u8>),
    /// Read one chunk, then reset the TCP connection.
    ReadThenReset,
    /// Close (close_notify, FIN) this long after the handshake, whatever comes: a
    /// gateway with a very short idle timeout.
    CloseAfter(Duration),
    /// Send these bytes as soon as the handshake is done (an HTTP/2 server's SETTINGS),
    /// then echo.
    SpeakFirstThenEcho(Vec<u8>),
    /// The soak peer: reads a header `[n_up u32, n_down u32, upstream_first u8, seed u64]`,
    /// then either reads `n_up` bytes to EOF and answers `n_down` (the downstream closes
    /// first) or answers and half-closes first, then reads. Checks every byte against
    /// `pattern(seed)`; a mismatch ends the connection with an error (a reset).
    Soak,
}

/// The bytes both ends of the soak agree on.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// What the gateway saw on one connection.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    pub alpn: Option<Vec<u8>>,
    pub sni: Option<String>,
    pub resumed: bool,
    /// Plaintext application bytes received.
    pub received: Vec<u8>,
    /// How the connection ended: Some(true) after the peer's close_notify, Some(false)
    /// on an error (reset, truncation), None while open.
    pub ended_clean: Option<bool>,
    /// The client certificate presented (DER).
    pub client_cert: Option<Vec<u8>>,
}

/// Something the test asks every idle connection (no bytes received yet) to do.
#[derive(Clone, Copy, Debug)]
pub enum Poke {
    /// Send close_notify and FIN.
    Close,
    /// Send application bytes nobody asked for.
    Garbage,
}

pub struct Gateway {
    pub addr: SocketAddr,
    /// The PKI the gateway's certificate came from, when started with `start_with_pki`.
    pub pki: Option<Pki>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Every raw TCP byte the gateway read, TLS records included.
    pub raw: Arc<Mutex<Vec<u8>>>,
    /// Connections accepted at the TCP level.
    pub accepted: Arc<Mutex<usize>>,
    pokes: tokio::sync::broadcast::Sender<Poke>,
    task: JoinHandle<()>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Gateway {
    /// A gateway presenting `pki`'s gateway certificate and trusting its CA.
    pub async fn start_with_pki(pki: Pki, behaviour: Behaviour) -> Gateway {
        let tls = pki.gateway_tls(&[b"h2", b"http/1.1"]).unwrap();
        let mut gateway = Gateway::start(tls, behaviour).await;
        gateway.pki = Some(pki);
        gateway
    }

    pub async fn start(tls: Arc<ServerConfig>, behaviour: Behaviour) -> Gateway {
        Gateway::start_at(
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
            tls,
            behaviour,
        )
    }

    /// A gateway on a listener the test bound (to reuse a port runnel already points at).
    pub fn start_at(
        listener: TcpListener,
        tls: Arc<ServerConfig>,
        behaviour: Behaviour,
    ) -> Gateway {
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let raw = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(Mutex::new(0));
        let acceptor = TlsAcceptor::from(tls);
        let (s, r, a) = (seen.clone(), raw.clone(), accepted.clone());
        let (pokes, _) = tokio::sync::broadcast::channel(16);
        let p = pokes.clone();
        let task = tokio::spawn(async move {
            // Connections live in this set: dropping the gateway (aborting this task)
            // ends them all, as a gateway process dying would.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                while conns.try_join_next().is_some() {}
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                *a.lock().unwrap() += 1;
                let (acceptor, behaviour, s, r) =
                    (acceptor.clone(), behaviour.clone(), s.clone(), r.clone());
                let pokes = p.subscribe();
                conns.spawn(async move {
                    let recording = Recording { inner: tcp, raw: r };
                    let Ok(tls) = acceptor.accept(recording).await else {
                        return;
                    };
                    let _ = serve(tls, behaviour, s, pokes).await;
                });
            }
        });
        Gateway {
            addr,
            pki: None,
            seen,
            raw,
            accepted,
            pokes,
            task,
        }
    }

    /// Every connection that completed a handshake, pooled ones included.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Connections that carried application bytes (pooled connections that were never
    /// used carry none).
    pub fn data_conns(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| !s.received.is_empty())
            .collect()
    }

    /// Asks every connection that has not received a byte yet to `poke`.
    pub fn poke_idle(&self, poke: Poke) {
        let _ = self.pokes.send(poke);
    }

    pub fn raw_contains(&self, needle: &[u8]) -> bool {
        self.raw
            .lock()
            .unwrap()
            .windows(needle.len())
            .any(|w| w == needle)
    }
}

async fn serve(
    tls: TlsStream<Recording>,
    behaviour: Behaviour,
    seen: Arc<Mutex<Vec<Seen>>>,
    pokes: tokio::sync::broadcast::Receiver<Poke>,
) -> io::Result<()> {
    let index = {
        let (_, conn) = tls.get_ref();
        let mut all = seen.lock().unwrap();
        all.push(Seen {
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
            sni: conn.server_name().map(str::to_owned),
            resumed: conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
            received: Vec::new(),
            ended_clean: None,
            client_cert: conn
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.to_vec()),
        });
        all.len() - 1
    };
    let result = behave(tls, behaviour, seen.clone(), index, pokes).await;
    seen.lock().unwrap()[index].ended_clean = Some(result.is_ok());
    result
}

async fn behave(
    mut tls: TlsStream<Recording>,
    behaviour: Behaviour,
    seen: Arc<Mutex<Vec<Seen>>>,
    index: usize,
    mut pokes: tokio::sync::broadcast::Receiver<Poke>,
) -> io::Result<()> {
    let behaviour = match behaviour {
        Behaviour::SpeakFirstThenEcho(first) => {
            tls.write_all(&first).await?;
            tls.flush().await?;
            Behaviour::Echo
        }
        other => other,
    };
    let record = |bytes: &[u8]| {
        seen.lock().unwrap()[index]
            .received
            .extend_from_slice(bytes)
    };
    let mut buf = vec![0u8; 64 * 1024];
    match behaviour {
        Behaviour::Echo => loop {
            let idle = seen.lock().unwrap()[index].received.is_empty();
            let n = tokio::select! {
                n = tls.read(&mut buf) => n?,
                poke = pokes.recv(), if idle => {
                    match poke {
                        Ok(Poke::Close) => tls.shutdown().await?,
                        Ok(Poke::Garbage) => tls.write_all(b"unsolicited").await?,
                        Err(_) => {}
                    }
                    continue;
                }
            };
            if n == 0 {
                return tls.shutdown().await;
            }
            record(&buf[..n]);
            tls.write_all(&buf[..n]).await?;
        },
        Behaviour::CountThenReply => {
            let mut total = 0usize;
            loop {
                let n = tls.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                record(&buf[..n]);
                total += n;
            }
            tls.write_all(format!("received {total}").as_bytes())
                .await?;
            tls.shutdown().await
        }
        Behaviour::ReplyThenHalfClose(reply) => {
            tls.write_all(&reply).await?;
            tls.shutdown().await?;
            loop {
                let n = tls.read(&mut buf).await?;
                if n == 0 {
                    return Ok(());
                }
                record(&buf[..n]);
            }
        }
        Behaviour::ReplyThenTruncate(reply) => {
            let n = tls.read(&mut buf).await?;
            record(&buf[..n]);
            tls.write_all(&reply).await?;
            tls.flush().await?;
            let (mut recording, _) = tls.into_inner();
            recording.inner.shutdown().await?;
            // Drain so that closing sends FIN, not RST.
            while recording.inner.read(&mut buf).await? > 0 {}
            Ok(())
        }
        Behaviour::Soak => {
            let mut head = [0u8; 17];
            tls.read_exact(&mut head).await?;
            let n_up = u32::from_be_bytes(head[0..4].try_into().unwrap()) as usize;
            let n_down = u32::from_be_bytes(head[4..8].try_into().unwrap()) as usize;
            let upstream_first = head[8] == 1;
            let seed = u64::from_be_bytes(head[9..17].try_into().unwrap());
            if upstream_first {
                tls.write_all(&pattern(seed.wrapping_add(1), n_down))
                    .await?;
                tls.shutdown().await?;
            }
            let mut got = Vec::with_capacity(n_up);
            tls.read_to_end(&mut got).await?;
            if got != pattern(seed, n_up) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "soak: bytes differ",
                ));
            }
            record(b"ok");
            if !upstream_first {
                tls.write_all(&pattern(seed.wrapping_add(1), n_down))
                    .await?;
                tls.shutdown().await?;
            }
            Ok(())
        }
        Behaviour::SpeakFirstThenEcho(_) => unreachable!("turned into Echo above"),
        Behaviour::CloseAfter(after) => {
            tokio::time::sleep(after).await;
            tls.shutdown().await
        }
        Behaviour::ReadThenReset => {
            let n = tls.read(&mut buf).await?;
            record(&buf[..n]);
            let (recording, _) = tls.into_inner();
            socket2::SockRef::from(&recording.inner).set_linger(Some(Duration::ZERO))?;
            Ok(())
        }
    }
}

/// A TCP stream that keeps a copy of every byte read from it.
pub struct Recording {
    pub inner: TcpStream,
    raw: Arc<Mutex<Vec<u8>>>,
}

impl AsyncRead for Recording {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            self.raw
                .lock()
                .unwrap()
                .extend_from_slice(&buf.filled()[before..]);
        }
        result
    }
}

impl tokio::io::AsyncWrite for Recording {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The variables that point runnel at `gateway` with the PKI's client identity.
pub fn vars(pki: &Pki, gateway: SocketAddr) -> Vec<(String, String)> {
    [
        ("RUNNEL_UPSTREAM", gateway.to_string()),
        ("RUNNEL_SERVER_NAME", runnel::demo::GATEWAY_NAME.to_owned()),
        ("RUNNEL_TLS_CA_PEM", pki.ca_cert_pem.clone()),
        ("RUNNEL_TLS_CERT_PEM", pki.client.cert_pem.clone()),
        ("RUNNEL_TLS_KEY_PEM", pki.client.key_pem.clone()),
        ("RUNNEL_CONNECT_TIMEOUT", "5s".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// runnel served in-process on an ephemeral port.
pub struct Runnel {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<()>,
}

impl Runnel {
    pub async fn start(vars: Vec<(String, String)>) -> Runnel {
        let (config, _) = Config::from_vars(vars).unwrap_or_else(|e| panic!("config: {e}"));
        let tunnel = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, admin_addr) = (tunnel.local_addr().unwrap(), admin.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            runnel::run(
                config,
                Listeners {
                    tunnel,
                    admin: Some(admin),
                },
                shutdown,
            )
            .await
            .unwrap();
        });
        Runnel {
            addr,
            admin: admin_addr,
            stop: Some(stop),
            task,
        }
    }

    /// Begins the drain, as SIGTERM would.
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    /// Whether `/readyz` answers 200 now.
    pub async fn ready(&self) -> bool {
        self.admin_get("/readyz").await.starts_with("HTTP/1.1 200")
    }

    /// Polls `/readyz` until it answers 200 (the pool is warm or the gateway was reached).
    pub async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while !self.ready().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "runnel never became ready"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The whole `/metrics` response, status line included.
    pub async fn metrics(&self) -> String {
        self.admin_get("/metrics").await
    }

    /// Polls `/metrics` until `holds` says yes and returns that response; fails with
    /// `what` and the last response after `DEADLINE`.
    pub async fn metrics_until(&self, what: &str, holds: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let m = self.metrics().await;
            if holds(&m) {
                return m;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}:\n{m}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn admin_get(&self, path: &str) -> String {
        let mut s = TcpStream::connect(self.admin).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }
}

impl Drop for Runnel {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads until EOF; `Err` carries the kind if the stream ended with an error (a reset).
pub async fn read_to_end(stream: &mut TcpStream) -> Result<Vec<u8>, (io::ErrorKind, Vec<u8>)> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => return Err((e.kind(), out)),
        }
    }
}

/// A fresh PKI for one test.
pub fn pki() -> Pki {
    Pki::generate().unwrap()
}

/// A deadline for anything a test waits on; generous, since tests run in parallel.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Polls `check` every 10 ms until it gives `Ok`, and returns that; past [`DEADLINE`]
/// fails with the last `Err`, which says what was awaited and what was seen instead.
pub async fn poll_until<T>(mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match check() {
            Ok(value) => return value,
            Err(why) => assert!(tokio::time::Instant::now() < deadline, "{why}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `check` until it holds (see [`poll_until`]).
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    poll_until(|| match check() {
        true => Ok(()),
        false => Err(format!("timed out waiting for: {what}")),
    })
    .await
}

/// Variables for the runnel binary pointed at `gateway`: ephemeral listen port, metrics
/// off, plus `extra` (which replace defaults of the same name).
pub fn binary_vars(
    pki: &Pki,
    gateway: SocketAddr,
    extra: &[(&str, &str)],
) -> Vec<(String, String)> {
    let mut v = vars(pki, gateway);
    v.push(("RUNNEL_LISTEN".into(), "127.0.0.1:0".into()));
    v.push(("RUNNEL_METRICS_ADDR".into(), "off".into()));
    v.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
    v.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    v
}

/// Starts the runnel binary (off the runtime's threads) and waits for "listening".
pub async fn serve_binary(
    vars: Vec<(String, String)>,
) -> (super::process::Runnel, super::process::Listening) {
    tokio::task::spawn_blocking(move || {
        let v: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        super::process::Runnel::serve(&v)
    })
    .await
    .unwrap()
}

/// One exchange through runnel: connect, send `bytes`, half-close, read to the end
/// (within the suite's deadline). `Err` carries the error kind (a reset) and what came.
pub async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Result<Vec<u8>, (io::ErrorKind, Vec<u8>)> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    stream.shutdown().await.unwrap();
    tokio::time::timeout(DEADLINE, read_to_end(&mut stream))
        .await
        .expect("no end within the deadline")
}

/// Variables pointing runnel at `gateway` with CA, certificate and key as files in
/// `dir` (`ca.pem`, `client.pem`, `client-key.pem`, as `Pki::write_to` names them).
pub fn file_vars(dir: &std::path::Path, gateway: SocketAddr) -> Vec<(String, String)> {
    [
        ("RUNNEL_UPSTREAM", gateway.to_string()),
        ("RUNNEL_SERVER_NAME", runnel::demo::GATEWAY_NAME.to_owned()),
        (
            "RUNNEL_TLS_CA_FILE",
            dir.join("ca.pem").display().to_string(),
        ),
        (
            "RUNNEL_TLS_CERT_FILE",
            dir.join("client.pem").display().to_string(),
        ),
        (
            "RUNNEL_TLS_KEY_FILE",
            dir.join("client-key.pem").display().to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}
