//! Upstream connections: resolve, TCP connect, TLS handshake, under one deadline.
//!
//! Invariant: a `Connected` stream has completed a handshake whose ALPN is one that
//! was offered (or none), so nothing is ever written upstream before TLS is up.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use rustls::{ClientConfig, HandshakeKind, pki_types::ServerName};
use tokio::{net::TcpStream, task::JoinSet};
use tokio_rustls::{TlsConnector, client::TlsStream};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{AlpnPolicy, Config},
    dns::Resolver,
    error::ConnectError,
    metrics,
    readahead::ReadAhead,
    socket,
    tls::ClientConfigs,
};

/// An upstream connection: TLS over the read-ahead socket.
pub type Upstream = TlsStream<ReadAhead>;

/// RFC 8305's recommended Connection Attempt Delay.
const ATTEMPT_DELAY: Duration = Duration::from_millis(250);
/// How long an address that refused or timed out is tried last.
const AVOID_FOR: Duration = Duration::from_secs(30);
/// While no address is known, retry this often.
const RESOLVE_RETRY: Duration = Duration::from_secs(1);
/// This many failed attempts in a row, with no success between, and the gateway counts
/// as unreachable: one stray reset under load does not flip readiness, an outage does
/// within a few attempts.
const FAILURES_TO_UNREADY: u32 = 3;
/// ... and no success for this long.
const FAILING_AFTER: Duration = Duration::from_secs(2);

/// Which ALPN offer (and so which `ClientConfig`) a connection uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    H2,
    Http1,
    /// `RUNNEL_ALPN=none` or a fixed list.
    Fixed,
}

impl Offer {
    /// The offer a connection without an h2c preface makes: what the probe and
    /// `runnel check` use, so the gateway is judged on the protocol it is asked for.
    pub fn plain(alpn: &AlpnPolicy) -> Offer {
        match alpn {
            AlpnPolicy::Auto => Offer::Http1,
            AlpnPolicy::None | AlpnPolicy::List(_) => Offer::Fixed,
        }
    }

    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Offer::H2 => "h2",
            Offer::Http1 => "http/1.1",
            Offer::Fixed => "fixed",
        }
    }
}

/// A TLS stream to the upstream and what its handshake negotiated.
pub struct Connected {
    /// Boxed: a TLS stream is over 1 KiB, and a connection's task would otherwise hold
    /// it at every await point it passes through (arguments and locals alike).
    pub stream: Box<Upstream>,
    pub info: HandshakeInfo,
    /// Bytes the gateway sent before anything was asked (an HTTP/2 server may send its
    /// SETTINGS at once); they go downstream first.
    pub early: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct HandshakeInfo {
    pub addr: SocketAddr,
    pub connect_time: Duration,
    pub handshake_time: Duration,
    pub resumed: bool,
    pub alpn: Option<String>,
    pub version: String,
    pub cipher: String,
    pub kx_group: String,
    /// Taken from the pool rather than dialled for this connection.
    pub pooled: bool,
    /// The TLS material generation this connection was made with.
    pub generation: u64,
}

/// Everything needed to open upstream connections; shared by all connections.
pub struct Connector {
    /// Replaced whole on a TLS reload, together with its generation (reloads so far):
    /// one lock, so a connection never pairs old material with a new generation and
    /// escapes the retirement of connections made before the reload.
    configs: RwLock<(Arc<ClientConfigs>, u64)>,
    /// The current client certificate's notAfter, Unix seconds.
    cert_not_after: AtomicI64,
    /// Announces reloads (the new generation) to pooled connections.
    reloaded: tokio::sync::watch::Sender<u64>,
    server_name: ServerName<'static>,
    timeout: Duration,
    resolver: Resolver,
    /// Addresses that failed recently, and until when to try them last.
    avoid: Mutex<HashMap<SocketAddr, Instant>>,
    epoch: Instant,
    /// When the gateway last accepted a connection, in ms since `epoch` (0 = never).
    last_ok_millis: AtomicU64,
    /// When a connection was last attempted (either result), in ms since `epoch`.
    last_attempt_millis: AtomicU64,
    /// Attempts that failed since the last success.
    failures_in_row: AtomicU32,
}

impl Connector {
    pub fn new(config: &Config) -> Result<Connector, rustls::Error> {
        Ok(Connector {
            configs: RwLock::new((Arc::new(ClientConfigs::new(config, &config.tls)?), 0)),
            cert_not_after: AtomicI64::new(config.tls.cert_not_after),
            reloaded: tokio::sync::watch::Sender::new(0),
            server_name: config.server_name.clone(),
            timeout: config.connect_timeout,
            resolver: Resolver::new(config.upstream.clone()),
            avoid: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
            last_ok_millis: AtomicU64::new(0),
            last_attempt_millis: AtomicU64::new(0),
            failures_in_row: AtomicU32::new(0),
        })
    }

    /// Connects and handshakes within the connect timeout. A failure counts against
    /// readiness (`mark_failed`) unless it is local (out of descriptors).
    pub async fn connect(&self, offer: Offer) -> Result<Connected, ConnectError> {
        let result = match tokio::time::timeout(self.timeout, self.connect_inner(offer)).await {
            Ok(result) => result,
            Err(_) => Err(ConnectError::Timeout),
        };
        match &result {
            // Out of descriptors or memory: this instance's trouble, not the gateway's.
            Err(e) if e.is_local() => {}
            // Under RUNNEL_ALPN=auto the h2 offer is a guess: a gateway that speaks only
            // HTTP/1.1 still serves every HTTP/1.1 connection.
            Err(e) if offer == Offer::H2 && e.kind() == "alpn_mismatch" => {}
            Err(_) => self.mark_failed(),
            Ok(_) => {}
        }
        result
    }

    async fn connect_inner(&self, offer: Offer) -> Result<Connected, ConnectError> {
        let started = Instant::now();
        let (tcp, addr) = self.connect_tcp().await?;
        let connect_time = started.elapsed();
        metrics::Handles::get().connect.record(connect_time);
        socket::upstream(&tcp);

        let (configs, generation) = self.current();
        let tls = match offer {
            Offer::H2 => &configs.h2,
            Offer::Http1 => &configs.http1,
            Offer::Fixed => &configs.fixed,
        };
        let handshake_started = Instant::now();
        let stream = match TlsConnector::from(tls.clone())
            .connect(self.server_name.clone(), ReadAhead::new(tcp))
            .await
        {
            Ok(s) => s,
            Err(e) => {
                metrics::handshake("none", false);
                return Err(ConnectError::Handshake(e));
            }
        };
        let handshake_time = handshake_started.elapsed();
        let mut info = handshake_info(&stream, addr, connect_time, handshake_time);
        info.generation = generation;
        check_alpn(tls, info.alpn.as_deref())?;
        let kind = if info.resumed { "resumed" } else { "full" };
        metrics::handshake(kind, true);
        let handles = metrics::Handles::get();
        match info.resumed {
            true => handles.handshake_resumed.record(handshake_time),
            false => handles.handshake_full.record(handshake_time),
        }
        Ok(Connected {
            stream: Box::new(stream),
            info,
            early: Vec::new(),
        })
    }

    /// Races connection attempts across the resolved addresses in the manner of Happy
    /// Eyeballs (RFC 8305): one attempt starts, the next after `ATTEMPT_DELAY` or as
    /// soon as one fails; the first to connect wins. Addresses that failed recently go
    /// last.
    async fn connect_tcp(&self) -> Result<(TcpStream, SocketAddr), ConnectError> {
        let addrs = self.ordered(&self.resolver.addrs().await.map_err(ConnectError::Dns)?);
        let mut attempts = JoinSet::new();
        let mut next = 0;
        let mut last_error = None;
        loop {
            if next < addrs.len() {
                let addr = addrs[next];
                attempts.spawn(async move { (addr, TcpStream::connect(addr).await) });
                next += 1;
            }
            if attempts.is_empty() {
                return Err(ConnectError::Tcp(
                    last_error.unwrap_or_else(|| std::io::ErrorKind::NotFound.into()),
                ));
            }
            let more = next < addrs.len();
            tokio::select! {
                joined = attempts.join_next() => match joined {
                    Some(Ok((addr, Ok(tcp)))) => {
                        self.avoid.lock().unwrap_or_else(|p| p.into_inner()).remove(&addr);
                        return Ok((tcp, addr));
                    }
                    Some(Ok((addr, Err(e)))) => {
                        // Out of descriptors is runnel's trouble, not the address's.
                        if !crate::error::is_local_exhaustion(&e) {
                            self.avoid.lock().unwrap_or_else(|p| p.into_inner()).insert(addr, Instant::now() + AVOID_FOR);
                        }
                        last_error = Some(e);
                    }
                    Some(Err(_)) | None => {}
                },
                _ = tokio::time::sleep(ATTEMPT_DELAY), if more => {}
            }
        }
    }

    /// Addresses in DNS order, families interleaved (RFC 8305 section 4), recently failed
    /// ones last.
    fn ordered(&self, addrs: &[SocketAddr]) -> Vec<SocketAddr> {
        let first_v6 = addrs.first().is_some_and(SocketAddr::is_ipv6);
        let (mut a, mut b): (Vec<_>, Vec<_>) = addrs.iter().partition(|x| x.is_ipv6() == first_v6);
        let mut out = Vec::with_capacity(addrs.len());
        a.reverse();
        b.reverse();
        while let Some(x) = a.pop() {
            out.push(x);
            out.extend(b.pop());
        }
        out.extend(b.into_iter().rev());
        let now = Instant::now();
        let avoid = self.avoid.lock().unwrap_or_else(|p| p.into_inner());
        out.sort_by_key(|x| avoid.get(x).is_some_and(|until| *until > now));
        out
    }

    #[cfg(test)]
    fn resolver_addrs_for_test(
        &self,
    ) -> std::sync::RwLockWriteGuard<'_, std::sync::Arc<[SocketAddr]>> {
        self.resolver.addrs_mut()
    }

    /// The current configs and their generation, read together.
    fn current(&self) -> (Arc<ClientConfigs>, u64) {
        match self.configs.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Swaps in configs built from new material, for new connections only. A new
    /// session store comes with them: a resumed session would carry the old identity.
    pub fn reload(
        &self,
        config: &Config,
        material: &crate::material::Material,
    ) -> Result<(), rustls::Error> {
        let configs = Arc::new(ClientConfigs::new(config, material)?);
        let generation = {
            let mut current = self.configs.write().unwrap_or_else(|p| p.into_inner());
            let generation = current.1 + 1;
            *current = (configs, generation);
            generation
        };
        self.cert_not_after
            .store(material.cert_not_after, Ordering::Relaxed);
        self.reloaded.send_replace(generation);
        Ok(())
    }

    /// Reload announcements, for connections that outlive their identity.
    pub fn reloads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reloaded.subscribe()
    }

    /// The TLS material generation (0 at start, +1 per reload).
    pub fn generation(&self) -> u64 {
        self.current().1
    }

    /// The current client certificate's notAfter, Unix seconds.
    pub fn cert_not_after(&self) -> i64 {
        self.cert_not_after.load(Ordering::Relaxed)
    }

    /// Notes that the gateway accepted a connection (it sent a ticket or data after the
    /// handshake, or passed the pool's probation): the readiness signal.
    pub fn mark_accepted(&self) {
        let now = self.now_millis();
        self.last_ok_millis.store(now, Ordering::Relaxed);
        self.last_attempt_millis.store(now, Ordering::Relaxed);
        self.failures_in_row.store(0, Ordering::Relaxed);
    }

    /// Notes that an attempt failed: refused, reset, timed out, a failed handshake, or
    /// a connection the gateway refused right after its handshake.
    pub fn mark_failed(&self) {
        self.last_attempt_millis
            .store(self.now_millis(), Ordering::Relaxed);
        self.failures_in_row.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether a new connection would work now, judged by the latest attempts: the
    /// gateway accepted one within `window`, and there is no run of
    /// `FAILURES_TO_UNREADY` failures with no success for `FAILING_AFTER`.
    pub fn gateway_ok(&self, window: Duration) -> bool {
        let at = self.last_ok_millis.load(Ordering::Relaxed);
        let now = self.now_millis();
        // A run of failures counts only once no success came for a moment: under heavy
        // traffic a gateway shedding a few connections still serves the rest.
        let failing = self.failures_in_row.load(Ordering::Relaxed) >= FAILURES_TO_UNREADY
            && now > at + FAILING_AFTER.as_millis() as u64;
        at != 0 && now <= at + window.as_millis() as u64 && !failing
    }

    /// Whether the latest attempt failed.
    pub fn failing(&self) -> bool {
        self.failures_in_row.load(Ordering::Relaxed) > 0
    }

    /// Whether any connection was attempted within `window`.
    pub fn attempted_within(&self, window: Duration) -> bool {
        let at = self.last_attempt_millis.load(Ordering::Relaxed);
        at != 0 && self.now_millis() <= at + window.as_millis() as u64
    }

    /// Milliseconds since `epoch`, at least 1 (0 means never).
    fn now_millis(&self) -> u64 {
        (self.epoch.elapsed().as_millis() as u64).max(1)
    }

    /// TLS 1.3 session tickets held for resumption.
    pub fn tickets(&self) -> usize {
        self.current().0.tickets.tickets()
    }

    /// Keeps DNS answers fresh until `stop`.
    pub async fn refresh_dns(&self, stop: CancellationToken) {
        if !self.resolver.is_dns() {
            return;
        }
        loop {
            // A resolver that hangs must not hold the exit once the drain is over.
            let refreshed = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.resolver.refresh() => r,
            };
            let wait = match refreshed {
                Ok(ttl) => ttl,
                Err(e) => {
                    tracing::warn!(upstream = %self.resolver.target, error = %e, "cannot resolve the upstream; retrying");
                    RESOLVE_RETRY
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

fn handshake_info(
    stream: &Upstream,
    addr: SocketAddr,
    connect_time: Duration,
    handshake_time: Duration,
) -> HandshakeInfo {
    let (_, conn) = stream.get_ref();
    HandshakeInfo {
        addr,
        connect_time,
        handshake_time,
        resumed: conn.handshake_kind() == Some(HandshakeKind::Resumed),
        alpn: conn
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
        version: conn
            .protocol_version()
            .map_or_else(String::new, |v| format!("{v:?}")),
        cipher: conn
            .negotiated_cipher_suite()
            .map_or_else(String::new, |s| format!("{:?}", s.suite())),
        kx_group: conn
            .negotiated_key_exchange_group()
            .map_or_else(String::new, |g| format!("{:?}", g.name())),
        pooled: false,
        generation: 0,
    }
}

/// The negotiated protocol must be one that was offered, or none.
fn check_alpn(tls: &ClientConfig, negotiated: Option<&str>) -> Result<(), ConnectError> {
    match negotiated {
        Some(p) if !tls.alpn_protocols.iter().any(|o| o == p.as_bytes()) => {
            Err(ConnectError::AlpnMismatch(p.to_owned()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use super::*;
    use crate::demo::Pki;

    fn connector(pki: &Pki, upstream: &str) -> Connector {
        let (config, _) = Config::from_vars([
            ("RUNNEL_UPSTREAM", upstream.to_owned()),
            ("RUNNEL_SERVER_NAME", crate::demo::GATEWAY_NAME.to_owned()),
            ("RUNNEL_TLS_CA_PEM", pki.ca_cert_pem.clone()),
            ("RUNNEL_TLS_CERT_PEM", pki.client.cert_pem.clone()),
            ("RUNNEL_TLS_KEY_PEM", pki.client.key_pem.clone()),
            ("RUNNEL_CONNECT_TIMEOUT", "3s".to_owned()),
        ])
        .unwrap();
        Connector::new(&config).unwrap()
    }

    /// A listener whose accept queue is full: SYNs to it are dropped, so a connect
    /// attempt hangs like one to a black-holed address.
    fn black_hole() -> (socket2::Socket, Vec<std::net::TcpStream>, SocketAddr) {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        socket.listen(0).unwrap();
        let addr = socket.local_addr().unwrap().as_socket().unwrap();
        let mut fill = Vec::new();
        // Fill the queue; later attempts time out instead of connecting.
        while fill.len() < 8 {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                Ok(s) => fill.push(s),
                Err(_) => break,
            }
        }
        (socket, fill, addr)
    }

    #[tokio::test]
    async fn racing_reaches_the_address_that_answers_past_a_black_hole() {
        let pki = Pki::generate().unwrap();
        let (_hole, _fill, hole) = black_hole();
        let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good_addr = good.local_addr().unwrap();
        let c = connector(&pki, &hole.to_string());
        *c.resolver_addrs_for_test() = Arc::from(vec![hole, good_addr]);
        let started = Instant::now();
        let (_, addr) = c.connect_tcp().await.unwrap();
        assert_eq!(addr, good_addr);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
        // The black hole stays pending; the refused one would be avoided next time.
        let (_, addr) = c.connect_tcp().await.unwrap();
        assert_eq!(addr, good_addr);
    }

    #[tokio::test]
    async fn a_refusing_address_is_tried_last_afterwards() {
        let pki = Pki::generate().unwrap();
        let refused = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good_addr = good.local_addr().unwrap();
        let c = connector(&pki, &refused.to_string());
        *c.resolver_addrs_for_test() = Arc::from(vec![refused, good_addr]);
        assert_eq!(c.connect_tcp().await.unwrap().1, good_addr);
        assert_eq!(c.ordered(&[refused, good_addr]), vec![good_addr, refused]);
    }
}
