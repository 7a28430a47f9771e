//! TLS client side: one `ClientConfig` per ALPN offer, built from the loaded
//! `material` and the `config`, sharing one session store; and the SSLKEYLOGFILE writer.
//!
//! Invariant: configs are built once at start-up and share one session store, so
//! resumption state survives across connections; nothing here runs per connection.

use std::{path::PathBuf, sync::Arc};

use rustls::{
    ClientConfig, NamedGroup,
    client::{
        ClientSessionMemoryCache, ClientSessionStore, Resumption, Tls12ClientSessionValue,
        Tls13ClientSessionValue,
    },
    pki_types::ServerName,
    sign::SingleCertAndKey,
};

use crate::{
    config::{AlpnPolicy, Config, TlsMinVersion},
    material::{Material, provider},
};

/// Sessions kept for resumption. One upstream name needs few; this bounds memory.
const SESSION_CACHE_SIZE: usize = 256;
/// TLS 1.3 tickets kept per server name: enough to resume a burst of new connections.
const TICKETS_PER_SERVER: usize = 64;

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
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
        let refuse = |why: &str| {
            tracing::warn!(path = %path.display(), why, "SSLKEYLOGFILE: refused; no secrets will be written (fix it and restart runnel)");
            KeyLogFile { file: None }
        };
        // No symbolic link: whoever can write the directory could point it anywhere.
        let opened = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path);
        let file = match opened {
            Ok(file) => file,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "SSLKEYLOGFILE: cannot open (a symbolic link is refused); no secrets will be written");
                return KeyLogFile { file: None };
            }
        };
        // What was opened (fstat), not whatever the path names now.
        let Ok(meta) = file.metadata() else {
            return refuse("cannot read its metadata");
        };
        if !meta.is_file() {
            // /dev/stdout, a pipe: secrets would land in the logs or another process.
            return refuse("not a regular file");
        }
        if meta.uid() != rustix::process::geteuid().as_raw() {
            return refuse("owned by another user");
        }
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "SSLKEYLOGFILE: the file is readable or writable by other users; no secrets will be written (chmod 600 it, or remove it and runnel creates it 0600; then restart runnel)");
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
