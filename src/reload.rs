//! Hot reload of the CA, client certificate and key files.
//!
//! On Cloud Run these come from Secret Manager volumes, which show a new version on
//! the next read, and no file-change notification can be relied on there: the files
//! are polled every `RUNNEL_TLS_RELOAD_INTERVAL` and compared by content hash; SIGHUP
//! checks at once. Invariant: a new set is used only if it loads as a whole (CA
//! parses, key matches certificate, certificate valid); otherwise the last good set
//! stays, and the failure is logged once per distinct bad content and counted.

use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    connect::Connector,
    material::{self, Material, Source, Sources},
    metrics,
};

/// Polls the TLS files and swaps the configuration when they change, until `stop`.
pub async fn watch(config: Arc<Config>, connector: Arc<Connector>, stop: CancellationToken) {
    let files = [
        &config.tls_sources.ca,
        &config.tls_sources.cert,
        &config.tls_sources.key,
    ];
    // Installed whatever the sources: SIGHUP's default action would end the process
    // without a drain.
    let mut hangup = signal(SignalKind::hangup()).ok();
    if !files.iter().any(|s| matches!(s, Source::File { .. })) {
        // Inline PEM cannot change: a SIGHUP only says so.
        while let Some(h) = hangup.as_mut() {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = h.recv() => tracing::info!("SIGHUP: nothing to reload, the TLS material is inline (RUNNEL_TLS_*_PEM)"),
            }
        }
        return;
    }
    // Compared with what was loaded at start, not read again: the files may already
    // have changed since.
    let mut state = State {
        current: config.tls.content_hash,
        refused: None,
    };
    loop {
        let interval = async {
            match config.tls_reload_interval {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        let hup = async {
            match hangup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        let forced = tokio::select! {
            _ = stop.cancelled() => return,
            _ = interval => false,
            _ = hup => true,
        };
        state.check(&config, &connector, forced);
    }
}

struct State {
    /// Hash of the contents in use.
    current: u64,
    /// Hash of the last contents refused, so a bad set is logged once.
    refused: Option<u64>,
}

impl State {
    fn check(&mut self, config: &Config, connector: &Connector, forced: bool) {
        let (hash, sources) = match read_all(&config.tls_sources) {
            Ok(read) => read,
            Err(e) => return self.refuse(0, &e.to_string()),
        };
        if !forced && (hash == self.current || Some(hash) == self.refused) {
            return;
        }
        let mut warnings = Vec::new();
        let material = match Material::load(&sources, &mut warnings) {
            Ok(m) => m,
            Err(e) => return self.refuse(hash, &e.to_string()),
        };
        if let Err(e) = connector.reload(config, &material) {
            return self.refuse(hash, &e.to_string());
        }
        for w in warnings {
            tracing::warn!("{w}");
        }
        self.current = hash;
        self.refused = None;
        metrics::tls_loaded(&material, true);
        tracing::info!(
            cert.not_after = material::rfc3339(material.cert_not_after),
            forced,
            "TLS material reloaded; new connections use it"
        );
    }

    fn refuse(&mut self, hash: u64, reason: &str) {
        ::metrics::counter!(metrics::TLS_RELOADS, "result" => "error").increment(1);
        if self.refused != Some(hash) || hash == 0 {
            tracing::warn!(
                error = reason,
                "TLS reload refused; the current certificate stays in use"
            );
        }
        self.refused = Some(hash);
    }
}

/// Reads every source once; returns the content hash and the sources as read, so the
/// set checked is exactly the set hashed.
fn read_all(sources: &Sources) -> Result<(u64, Sources), crate::error::ConfigError> {
    let (ca_var, ca) = material::read(&sources.ca)?;
    let (cert_var, cert) = material::read(&sources.cert)?;
    let (key_var, key) = material::read(&sources.key)?;
    let hash = material::content_hash([&ca, &cert, &key]);
    let sources = Sources {
        ca: Source::Pem {
            var: ca_var,
            text: ca,
        },
        cert: Source::Pem {
            var: cert_var,
            text: cert,
        },
        key: Source::Pem {
            var: key_var,
            text: key,
        },
    };
    Ok((hash, sources))
}
