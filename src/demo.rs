//! `runnel demo`: a throwaway PKI and a local mTLS gateway, with runnel in front.
//!
//! The PKI (`Pki`) and the gateway's TLS config are also what the tests use, so the
//! demo and the suite exercise the same certificates. Invariant: nothing here is used
//! by the serving path; it exists to show and test runnel with no setup.
//!
//! The gateway answers HTTP/1.1 and, after ALPN h2, HTTP/2 (`h2`), and its page names
//! the protocol it saw, so the demo shows runnel carrying both.

mod h2;

use std::{io, net::SocketAddr, path::Path, sync::Arc, time::SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tokio_util::sync::CancellationToken;

use crate::material;

/// The name in the demo gateway certificate (also 127.0.0.1, ::1 and localhost).
pub const GATEWAY_NAME: &str = "gateway.runnel.test";
/// The SPIFFE identity in the demo client certificate, as an Istio principal would read it.
pub const CLIENT_SPIFFE_ID: &str = "spiffe://cluster.local/ns/runnel/sa/runnel";

/// A certificate and its private key, PEM.
#[derive(Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A throwaway CA with a gateway and a client certificate.
pub struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
    pub ca_cert_pem: String,
    pub gateway: Leaf,
    pub client: Leaf,
}

impl Pki {
    pub fn generate() -> Result<Pki, rcgen::Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name("runnel throwaway CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let ca_cert_pem = ca.pem();
        let mut pki = Pki {
            ca,
            ca_cert_pem,
            gateway: Leaf {
                cert_pem: String::new(),
                key_pem: String::new(),
            },
            client: Leaf {
                cert_pem: String::new(),
                key_pem: String::new(),
            },
        };
        pki.gateway = pki.issue_gateway(&[GATEWAY_NAME, "localhost", "127.0.0.1", "::1"])?;
        pki.client = pki.issue_client("runnel", None)?;
        Ok(pki)
    }

    /// A server certificate for these names (DNS names or IP addresses).
    pub fn issue_gateway(&self, names: &[&str]) -> Result<Leaf, rcgen::Error> {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name = name(names.first().copied().unwrap_or("gateway"));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate with this common name and the demo SPIFFE URI; `not_after`
    /// defaults to a year from now.
    pub fn issue_client(
        &self,
        common_name: &str,
        not_after: Option<SystemTime>,
    ) -> Result<Leaf, rcgen::Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        params.subject_alt_names = vec![SanType::URI(CLIENT_SPIFFE_ID.try_into()?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let now = SystemTime::now();
        let not_after = not_after.unwrap_or(now + std::time::Duration::from_secs(365 * 86_400));
        params.not_before =
            time::OffsetDateTime::from(now.min(not_after) - std::time::Duration::from_secs(86_400));
        params.not_after = time::OffsetDateTime::from(not_after);
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Result<Leaf, rcgen::Error> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca)?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Writes ca.pem, gateway.pem, gateway-key.pem, client.pem and client-key.pem.
    pub fn write_to(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)?;
        for (file, text) in [
            ("ca.pem", &self.ca_cert_pem),
            ("gateway.pem", &self.gateway.cert_pem),
            ("gateway-key.pem", &self.gateway.key_pem),
            ("client.pem", &self.client.cert_pem),
            ("client-key.pem", &self.client.key_pem),
        ] {
            std::fs::write(dir.join(file), text)?;
        }
        Ok(())
    }

    /// A gateway TLS config that requires a client certificate from this CA.
    pub fn gateway_tls(&self, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, rustls::Error> {
        gateway_tls(&self.ca_cert_pem, &self.gateway, alpn)
    }
}

/// A server config presenting `leaf`, requiring a client certificate signed by `ca_pem`.
pub fn gateway_tls(
    ca_pem: &str,
    leaf: &Leaf,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let provider = Arc::new(material::provider());
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.map_err(|e| rustls::Error::General(e.to_string()))?)?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let chain = CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes())
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The identity a gateway sees in a client certificate: its URI SAN, else its subject.
pub fn client_identity(cert: &CertificateDer<'_>) -> String {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(cert) else {
        return "(unparsable certificate)".into();
    };
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name {
                return (*uri).to_owned();
            }
        }
    }
    cert.subject().to_string()
}

/// Serves the demo gateway: mTLS, then a short page naming the client identity and the
/// protocol, over HTTP/2 when ALPN chose `h2`, else HTTP/1.1.
pub async fn serve_gateway(listener: TcpListener, tls: Arc<ServerConfig>, stop: CancellationToken) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((tcp, peer)) = accepted else { continue };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            if let Err(e) = gateway_connection(acceptor, tcp, peer).await {
                tracing::debug!(error = %e, "demo gateway connection ended");
            }
        });
    }
}

async fn gateway_connection(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
) -> io::Result<()> {
    let mut tls = acceptor.accept(tcp).await?;
    let (_, conn) = tls.get_ref();
    let identity = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map_or("(none)".into(), client_identity);
    let alpn = conn
        .alpn_protocol()
        .map_or("(none)".into(), |p| String::from_utf8_lossy(p).into_owned());
    let version = conn
        .protocol_version()
        .map_or("?".into(), |v| format!("{v:?}"));
    let page = |protocol: &str| {
        format!(
            "hello from the runnel demo gateway\nprotocol: {protocol}\nclient identity: {identity}\ntls: {version}, alpn {alpn}\nseen from: {peer}\n"
        )
    };
    if alpn == "h2" {
        h2::serve(&mut tls, &page("HTTP/2")).await?;
        return tls.shutdown().await;
    }
    let page = page("HTTP/1.1");
    let mut buf = Vec::new();
    loop {
        let Some((head_len, body_len, close)) = read_request_head(&mut tls, &mut buf).await? else {
            // The client is done: end our side properly too (close_notify, then FIN).
            return tls.shutdown().await;
        };
        let mut body_left = body_len.saturating_sub(buf.len() - head_len);
        buf.drain(..head_len + (body_len - body_left));
        let mut chunk = [0u8; 8192];
        while body_left > 0 {
            let n = tls.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            body_left -= n.min(body_left);
        }
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n{page}",
            page.len(),
            if close { "connection: close\r\n" } else { "" }
        );
        tls.write_all(response.as_bytes()).await?;
        if close {
            return tls.shutdown().await;
        }
    }
}

/// Reads one request head; returns (head length, content length, connection close).
async fn read_request_head<S: AsyncReadExt + Unpin>(
    io: &mut S,
    buf: &mut Vec<u8>,
) -> io::Result<Option<(usize, usize, bool)>> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let header = |name: &str| {
                head.lines().find_map(|l| {
                    l.strip_prefix(name)
                        .and_then(|v| v.trim_start().strip_prefix(':'))
                        .map(|v| v.trim().to_owned())
                })
            };
            let body = header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let close = header("connection").is_some_and(|v| v == "close");
            return Ok(Some((end + 4, body, close)));
        }
        if buf.len() > 64 * 1024 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
        let mut chunk = [0u8; 4096];
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Where `runnel demo` listens.
pub struct DemoOptions {
    pub listen: SocketAddr,
    pub metrics: Option<SocketAddr>,
}

/// Runs the demo: PKI, gateway, and runnel in front, until `shutdown`.
pub async fn run(
    options: DemoOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let pki = Pki::generate().map_err(|e| format!("cannot make the demo PKI: {e}"))?;
    let gateway = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("cannot bind the demo gateway: {e}"))?;
    let gateway_addr = gateway.local_addr().map_err(|e| e.to_string())?;
    let tls = pki
        .gateway_tls(&[b"h2", b"http/1.1"])
        .map_err(|e| e.to_string())?;
    let stop = CancellationToken::new();
    tokio::spawn(serve_gateway(gateway, tls, stop.clone()));

    let vars = [
        ("RUNNEL_UPSTREAM", gateway_addr.to_string()),
        ("RUNNEL_SERVER_NAME", GATEWAY_NAME.to_owned()),
        ("RUNNEL_TLS_CA_PEM", pki.ca_cert_pem.clone()),
        ("RUNNEL_TLS_CERT_PEM", pki.client.cert_pem.clone()),
        ("RUNNEL_TLS_KEY_PEM", pki.client.key_pem.clone()),
        // RUNNEL_ALPN stays auto, as in production: h2c prior knowledge goes upstream
        // as ALPN h2, anything else as http/1.1.
        ("RUNNEL_LISTEN", options.listen.to_string()),
        (
            "RUNNEL_METRICS_ADDR",
            options.metrics.map_or("off".into(), |a| a.to_string()),
        ),
    ];
    let (config, _) = crate::Config::from_vars(vars).map_err(|e| e.to_string())?;
    let bind = |addr: SocketAddr, what: &'static str| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr} ({what}): {e}; try --listen 127.0.0.1:0"))
    };
    let tunnel = bind(options.listen, "tunnel").await?;
    let admin = match options.metrics {
        Some(addr) => Some(bind(addr, "metrics").await?),
        None => None,
    };
    let listen = tunnel.local_addr().map_err(|e| e.to_string())?;
    let metrics = admin.as_ref().and_then(|a| a.local_addr().ok());
    println!(
        "runnel demo: a throwaway CA, a local mTLS gateway on {gateway_addr} that requires the client certificate,"
    );
    println!("and runnel in front of it on {listen}. Try:");
    println!();
    println!("  curl http://{listen}/");
    println!("  curl --http2-prior-knowledge http://{listen}/");
    if let Some(m) = metrics {
        println!("  curl http://{m}/metrics");
    }
    println!();
    println!("Ctrl-C stops it.");
    let result = crate::run(config, crate::Listeners { tunnel, admin }, shutdown)
        .await
        .map_err(|e| e.to_string());
    stop.cancel();
    result
}
