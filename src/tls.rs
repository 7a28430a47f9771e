//! TLS client side: loads CA, client chain and key once, and builds one
//! `ClientConfig` per ALPN offer.
//!
//! Invariant: configs are built once at start-up and share one session store, so
//! resumption state survives across connections; nothing here runs per connection.

use std::{path::PathBuf, sync::Arc, time::SystemTime};

use rustls::{
    ClientConfig, NamedGroup, RootCertStore,
    client::{
        ClientSessionMemoryCache, ClientSessionStore, Resumption, Tls12ClientSessionValue,
        Tls13ClientSessionValue,
    },
    crypto::{CryptoProvider, aws_lc_rs},
    pki_types::ServerName,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    sign::{CertifiedKey, SingleCertAndKey},
};

use crate::{
    config::{AlpnPolicy, Config, TlsMinVersion},
    error::ConfigError,
};

/// Warn when the client certificate expires within this long.
const EXPIRY_WARNING_SECS: i64 = 7 * 24 * 3600;
/// Sessions kept for resumption. One upstream name needs few; this bounds memory.
const SESSION_CACHE_SIZE: usize = 256;
/// TLS 1.3 tickets kept per server name: enough to resume a burst of new connections.
const TICKETS_PER_SERVER: usize = 64;

/// Where one piece of PEM comes from, with the variable that named it. `Debug` (in
/// config.rs) never shows inline PEM.
#[derive(Clone)]
pub enum Source {
    File { var: &'static str, path: PathBuf },
    Pem { var: &'static str, text: String },
}

#[derive(Debug, Clone)]
pub struct Sources {
    pub ca: Source,
    pub cert: Source,
    pub key: Source,
}

/// Loaded and checked trust anchors and client identity.
#[derive(Debug, Clone)]
pub struct Material {
    pub roots: Arc<RootCertStore>,
    pub identity: Arc<CertifiedKey>,
    /// The client certificate's notAfter, in seconds since the Unix epoch.
    pub cert_not_after: i64,
    /// The earliest notAfter among the CA certificates.
    pub ca_not_after: i64,
    /// Hash of the PEM texts this was loaded from; a reload compares against it.
    pub content_hash: u64,
}

impl Material {
    /// Loads and checks everything; an error names the variable at fault.
    pub fn load(sources: &Sources, warnings: &mut Vec<String>) -> Result<Material, ConfigError> {
        let (ca_var, ca_pem) = read(&sources.ca)?;
        let ca_certs = parse_certs(ca_var, &ca_pem)?;
        let mut roots = RootCertStore::empty();
        let mut ca_not_after = i64::MAX;
        for cert in ca_certs {
            ca_not_after = ca_not_after.min(validity(ca_var, &cert)?.1);
            roots.add(cert).map_err(|e| {
                ConfigError::new(ca_var, format!("not a usable CA certificate: {e}"))
            })?;
        }

        let (cert_var, cert_pem) = read(&sources.cert)?;
        let chain = parse_certs(cert_var, &cert_pem)?;
        let (not_before, not_after) = validity(cert_var, &chain[0])?;
        let now = unix_now();
        if now >= not_after {
            return Err(ConfigError::new(
                cert_var,
                format!("client certificate expired at {}", rfc3339(not_after)),
            ));
        }
        if now < not_before {
            return Err(ConfigError::new(
                cert_var,
                format!(
                    "client certificate is not valid before {}",
                    rfc3339(not_before)
                ),
            ));
        }
        if not_after - now < EXPIRY_WARNING_SECS {
            warnings.push(format!(
                "{cert_var}: client certificate expires soon, at {}",
                rfc3339(not_after)
            ));
        }

        let (key_var, key_pem) = read(&sources.key)?;
        if let Source::File { path, .. } = &sources.key {
            use std::os::unix::fs::PermissionsExt;
            if std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o004 != 0) {
                warnings.push(format!("{key_var}: {} is readable by every user on this machine; make it readable by runnel only (chmod 600)", path.display()));
            }
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|_| {
            ConfigError::new(
                key_var,
                "no private key found (PKCS#8, SEC1 or PKCS#1 PEM expected)",
            )
        })?;
        let identity = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => ConfigError::new(
                key_var,
                format!("key does not match the certificate in {cert_var}"),
            ),
            other => ConfigError::new(key_var, format!("unusable private key: {other}")),
        })?;
        Ok(Material {
            roots: Arc::new(roots),
            identity: Arc::new(identity),
            cert_not_after: not_after,
            ca_not_after,
            content_hash: content_hash([&ca_pem, &cert_pem, &key_pem]),
        })
    }
}

/// The crypto provider: aws-lc-rs, hybrid post-quantum key exchange first.
pub fn provider() -> CryptoProvider {
    let mut provider = aws_lc_rs::default_provider();
    // AES-128-GCM first (rustls lists AES-256 first): measured in bench/, a TLS 1.3
    // handshake with the SHA-384 key schedule spent a tenth of runnel's CPU in SHA-512
    // blocks, and AES-128 does 10 rounds to AES-256's 14 on every byte. Browsers and
    // BoringSSL (Envoy) prefer it too; AES-256 and ChaCha20 stay offered.
    provider
        .cipher_suites
        .sort_by_key(|s| format!("{:?}", s.suite()).contains("AES_256"));
    provider.kx_groups = vec![
        aws_lc_rs::kx_group::X25519MLKEM768,
        aws_lc_rs::kx_group::X25519,
        aws_lc_rs::kx_group::SECP256R1,
    ];
    provider
}

/// One client config per ALPN offer, built once, sharing one session store.
#[derive(Clone)]
pub struct ClientConfigs {
    pub h2: Arc<ClientConfig>,
    pub http1: Arc<ClientConfig>,
    /// What `RUNNEL_ALPN=none` or a fixed list offers.
    pub fixed: Arc<ClientConfig>,
    pub tickets: Arc<TicketStore>,
}

impl ClientConfigs {
    pub fn new(config: &Config, material: &Material) -> Result<ClientConfigs, rustls::Error> {
        let store = Arc::new(TicketStore::new());
        let fixed = match &config.alpn {
            AlpnPolicy::List(list) => list.clone(),
            AlpnPolicy::Auto | AlpnPolicy::None => Vec::new(),
        };
        let build =
            |alpn: Vec<Vec<u8>>| client_config(config, material, store.clone(), alpn).map(Arc::new);
        Ok(ClientConfigs {
            h2: build(vec![b"h2".to_vec()])?,
            http1: build(vec![b"http/1.1".to_vec()])?,
            fixed: build(fixed)?,
            tickets: store,
        })
    }
}

fn client_config(
    config: &Config,
    material: &Material,
    store: Arc<TicketStore>,
    alpn: Vec<Vec<u8>>,
) -> Result<ClientConfig, rustls::Error> {
    let versions: &[&rustls::SupportedProtocolVersion] = match config.min_version {
        TlsMinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsMinVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let mut tls = ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(versions)?
        .with_root_certificates(material.roots.clone())
        .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(
            (*material.identity).clone(),
        )));
    tls.alpn_protocols = alpn;
    tls.resumption = Resumption::store(store);
    if let Some(path) = &config.key_log {
        tls.key_log = KeyLogFile::shared(path);
    }
    Ok(tls)
}

/// Appends TLS secrets in the NSS key log format (what Wireshark reads), for
/// debugging only. The path comes from `Config`, not from the environment directly.
///
/// One writer per path for the whole process: every ALPN config, and every config a
/// reload builds, shares one descriptor and one lock, so lines from different configs
/// cannot interleave and reloads do not pile up descriptors. The file is created 0600,
/// as it holds what decrypts the upstream traffic; an existing regular file that others
/// can read is refused (with a warning), not written to: the secrets would leak to
/// whoever can read it, and changing the mode of a file runnel did not create is not
/// runnel's call.
#[derive(Debug)]
struct KeyLogFile {
    file: Option<std::sync::Mutex<std::fs::File>>,
}

impl KeyLogFile {
    /// The process's writer for `path`, opened on first use.
    fn shared(path: &std::path::Path) -> Arc<KeyLogFile> {
        type Writers = std::collections::HashMap<PathBuf, Arc<KeyLogFile>>;
        static WRITERS: std::sync::OnceLock<std::sync::Mutex<Writers>> = std::sync::OnceLock::new();
        let mut writers = WRITERS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        writers
            .entry(path.to_path_buf())
            .or_insert_with(|| Arc::new(KeyLogFile::open(path)))
            .clone()
    }

    fn open(path: &std::path::Path) -> KeyLogFile {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let opened = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path);
        let file = match opened {
            Ok(file) => file,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "SSLKEYLOGFILE: cannot open; no secrets will be written");
                return KeyLogFile { file: None };
            }
        };
        // The mode of what was opened (fstat), not of whatever the path names now.
        let mode = file.metadata().map_or(0, |m| {
            if m.is_file() {
                m.permissions().mode()
            } else {
                0
            }
        });
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "SSLKEYLOGFILE: the file is readable or writable by other users; no secrets will be written (chmod 600 it, or remove it and runnel creates it 0600)");
            return KeyLogFile { file: None };
        }
        KeyLogFile {
            file: Some(std::sync::Mutex::new(file)),
        }
    }
}

impl rustls::KeyLog for KeyLogFile {
    fn log(&self, label: &str, client_random: &[u8], secret: &[u8]) {
        use std::{fmt::Write as _, io::Write as _};
        let Some(file) = &self.file else { return };
        // The whole line first, then one write: with O_APPEND a single write lands
        // whole even beside another process appending to the same file.
        let mut line =
            String::with_capacity(label.len() + 2 * (client_random.len() + secret.len()) + 3);
        line.push_str(label);
        for bytes in [client_random, secret] {
            line.push(' ');
            for b in bytes {
                let _ = write!(line, "{b:02x}");
            }
        }
        line.push('\n');
        let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
        let _ = f.write_all(line.as_bytes());
    }
}

/// The session store: rustls's cache for everything but TLS 1.3 tickets, which are
/// kept here, more of them than rustls's 8 per server. Each resumption spends one
/// ticket and new ones arrive only a round trip after a handshake, so a burst of new
/// connections larger than the stock would fall back to full handshakes. The pool
/// paces its refills by `tickets()`.
pub struct TicketStore {
    inner: ClientSessionMemoryCache,
    tls13: std::sync::Mutex<
        std::collections::HashMap<
            ServerName<'static>,
            std::collections::VecDeque<Tls13ClientSessionValue>,
        >,
    >,
}

impl std::fmt::Debug for TicketStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Tickets are secrets: count them, never print them.
        f.debug_struct("TicketStore")
            .field("tickets", &self.tickets())
            .finish()
    }
}

impl TicketStore {
    fn new() -> TicketStore {
        TicketStore {
            inner: ClientSessionMemoryCache::new(SESSION_CACHE_SIZE),
            tls13: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// TLS 1.3 tickets held for the server with the most (runnel talks to one name).
    pub fn tickets(&self) -> usize {
        let all = self.tls13.lock().unwrap_or_else(|p| p.into_inner());
        all.values()
            .map(std::collections::VecDeque::len)
            .max()
            .unwrap_or(0)
    }
}

impl ClientSessionStore for TicketStore {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.inner.set_kx_hint(server_name, group)
    }
    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.inner.kx_hint(server_name)
    }
    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.inner.set_tls12_session(server_name, value)
    }
    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.inner.tls12_session(server_name)
    }
    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.inner.remove_tls12_session(server_name)
    }
    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        let mut all = self.tls13.lock().unwrap_or_else(|p| p.into_inner());
        if !all.contains_key(&server_name) && all.len() >= SESSION_CACHE_SIZE {
            return;
        }
        let tickets = all.entry(server_name).or_default();
        if tickets.len() == TICKETS_PER_SERVER {
            tickets.pop_front(); // the oldest goes first
        }
        tickets.push_back(value);
    }
    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        let mut all = self.tls13.lock().unwrap_or_else(|p| p.into_inner());
        // The freshest ticket: least likely to have expired at the gateway.
        all.get_mut(server_name)
            .and_then(std::collections::VecDeque::pop_back)
    }
}

/// A change detector over the CA, certificate and key texts (not a security hash: it
/// only decides whether to load again).
pub fn content_hash(texts: [&str; 3]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    texts.hash(&mut hasher);
    hasher.finish()
}

/// The PEM text of a source, read now, with the variable that named it.
pub fn read(source: &Source) -> Result<(&'static str, String), ConfigError> {
    match source {
        Source::Pem { var, text } => Ok((var, text.clone())),
        Source::File { var, path } => std::fs::read_to_string(path)
            .map(|text| (*var, text))
            .map_err(|e| ConfigError::new(*var, format!("cannot read {}: {e}", path.display()))),
    }
}

fn parse_certs(var: &'static str, pem: &str) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConfigError::new(var, format!("malformed PEM: {e}")))?;
    if certs.is_empty() {
        return Err(ConfigError::new(var, "no PEM certificate found"));
    }
    Ok(certs)
}

/// (notBefore, notAfter) of a certificate, in Unix seconds.
fn validity(var: &'static str, der: &CertificateDer<'_>) -> Result<(i64, i64), ConfigError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| ConfigError::new(var, format!("malformed certificate: {e}")))?;
    let v = cert.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Formats Unix seconds as an RFC 3339 UTC timestamp.
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_798_761_599), "2026-12-31T23:59:59Z");
    }
}
