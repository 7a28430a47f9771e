//! Upstream connections: resolve, TCP connect, TLS handshake, under one deadline.
//!
//! Invariant: a `Connected` stream has completed a handshake whose ALPN is one that
//! was offered (or none), so nothing is ever written upstream before TLS is up.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use rustls::{ClientConfig, HandshakeKind, pki_types::ServerName};
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config, dns::Resolver, error::ConnectError, metrics, socket, tls::ClientConfigs,
};

/// While no address is known, retry this often.
const RESOLVE_RETRY: Duration = Duration::from_secs(1);

/// Which ALPN offer (and so which `ClientConfig`) a connection uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    H2,
    Http1,
    /// `RUNNEL_ALPN=none` or a fixed list.
    Fixed,
}

/// A TLS stream to the upstream and what its handshake negotiated.
pub struct Connected {
    pub stream: TlsStream<TcpStream>,
    pub info: HandshakeInfo,
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
}

/// Everything needed to open upstream connections; shared by all connections.
pub struct Connector {
    configs: ClientConfigs,
    server_name: ServerName<'static>,
    timeout: Duration,
    resolver: Resolver,
}

impl Connector {
    pub fn new(config: &Config) -> Result<Connector, rustls::Error> {
        Ok(Connector {
            configs: ClientConfigs::new(config)?,
            server_name: config.server_name.clone(),
            timeout: config.connect_timeout,
            resolver: Resolver::new(config.upstream.clone()),
        })
    }

    /// Connects and handshakes within the connect timeout.
    pub async fn connect(&self, offer: Offer) -> Result<Connected, ConnectError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        match tokio::time::timeout_at(deadline, self.connect_inner(offer, deadline)).await {
            Ok(result) => result,
            Err(_) => Err(ConnectError::Timeout),
        }
    }

    async fn connect_inner(
        &self,
        offer: Offer,
        deadline: tokio::time::Instant,
    ) -> Result<Connected, ConnectError> {
        let started = Instant::now();
        let (tcp, addr) = self.connect_tcp(deadline).await?;
        let connect_time = started.elapsed();
        metrics::Handles::get().connect.record(connect_time);
        socket::upstream(&tcp);

        let tls = match offer {
            Offer::H2 => &self.configs.h2,
            Offer::Http1 => &self.configs.http1,
            Offer::Fixed => &self.configs.fixed,
        };
        let handshake_started = Instant::now();
        let stream = match TlsConnector::from(tls.clone())
            .connect(self.server_name.clone(), tcp)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                metrics::handshake("none", false);
                return Err(ConnectError::Handshake(e));
            }
        };
        let handshake_time = handshake_started.elapsed();
        let info = handshake_info(&stream, addr, connect_time, handshake_time);
        check_alpn(tls, info.alpn.as_deref())?;
        let kind = if info.resumed { "resumed" } else { "full" };
        metrics::handshake(kind, true);
        let handles = metrics::Handles::get();
        match info.resumed {
            true => handles.handshake_resumed.record(handshake_time),
            false => handles.handshake_full.record(handshake_time),
        }
        Ok(Connected { stream, info })
    }

    /// Tries each resolved address in turn; all but the last get a share of the time left,
    /// so one black-holed address cannot eat the whole deadline.
    async fn connect_tcp(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<(TcpStream, SocketAddr), ConnectError> {
        let addrs = self.resolver.addrs().await.map_err(ConnectError::Dns)?;
        let mut last_error = None;
        for (i, addr) in addrs.iter().enumerate() {
            let left = addrs.len() - i;
            let share = deadline.saturating_duration_since(tokio::time::Instant::now())
                / u32::try_from(left).unwrap_or(1);
            match tokio::time::timeout(share, TcpStream::connect(addr)).await {
                Ok(Ok(tcp)) => return Ok((tcp, *addr)),
                Ok(Err(e)) => last_error = Some(e),
                Err(_) => last_error = Some(std::io::ErrorKind::TimedOut.into()),
            }
        }
        Err(ConnectError::Tcp(
            last_error.unwrap_or_else(|| std::io::ErrorKind::NotFound.into()),
        ))
    }

    /// Keeps DNS answers fresh until `stop`.
    pub async fn refresh_dns(&self, stop: CancellationToken) {
        if !self.resolver.is_dns() {
            return;
        }
        loop {
            let wait = match self.resolver.refresh().await {
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
    stream: &TlsStream<TcpStream>,
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
