//! TLS material: where the CA, client certificate and key come from (`Source`), and
//! loading them into checked trust anchors and a client identity (`Material`); with
//! the crypto provider and the time helpers that checking validity needs.
//!
//! This is the bottom layer under both `config` (which loads material at parse time,
//! so a bad key stops start-up with one line) and `tls` (which builds client configs
//! from it). Invariant: it imports nothing from the crate but `error`; and a
//! `Material` exists only if the whole set loaded: the CA parses, the key matches the
//! certificate, the certificate was valid when loaded.

use std::{path::PathBuf, sync::Arc, time::SystemTime};

use rustls::{
    RootCertStore,
    crypto::{CryptoProvider, aws_lc_rs},
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    sign::CertifiedKey,
};

use crate::error::ConfigError;

/// Warn when the client certificate expires within this long.
const EXPIRY_WARNING_SECS: i64 = 7 * 24 * 3600;

/// Where one piece of PEM comes from, with the variable that named it. `Debug` (below)
/// never shows inline PEM.
#[derive(Clone)]
pub enum Source {
    File { var: &'static str, path: PathBuf },
    Pem { var: &'static str, text: String },
}

/// Inline PEM (`RUNNEL_TLS_*_PEM`) is a secret for the key and never worth printing for
/// the others: `Debug` of a source, and so of `Config` and all that holds it, shows the
/// variable and the size only. Files show their path.
impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File { var, path } => f
                .debug_struct("File")
                .field("var", var)
                .field("path", path)
                .finish(),
            Source::Pem { var, text } => f
                .debug_struct("Pem")
                .field("var", var)
                .field("text", &format_args!("<{} bytes redacted>", text.len()))
                .finish(),
        }
    }
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
