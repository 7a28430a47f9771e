//! Shared by the fuzz targets: a fixed, valid PKI for inputs to start from, and PEM
//! envelopes for arbitrary DER.
//!
//! Invariant: everything here is deterministic (Ed25519 keys from fixed seeds, whose
//! signatures carry no randomness, and rcgen's fixed default validity, 1975 to 4096), so a
//! crash found in one run reproduces from its artifact in any other.

use std::sync::LazyLock;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// A CA and a client certificate and key it issued: what runnel needs to load.
pub struct Pki {
    pub ca_der: Vec<u8>,
    pub cert_der: Vec<u8>,
    pub key_der: Vec<u8>,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Built and checked once per process; a panic here is a broken harness, not a finding.
pub static PKI: LazyLock<Pki> = LazyLock::new(|| {
    let pki = Pki::generate().expect("fixed PKI");
    pki.check();
    pki
});

impl Pki {
    fn generate() -> Result<Pki, rcgen::Error> {
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca, ed25519_key(1)?)?;
        let key = ed25519_key(2)?;
        let mut client = CertificateParams::new(vec!["runnel.fuzz.test".to_owned()])?;
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = client.signed_by(&key, &ca)?;
        Ok(Pki {
            ca_der: ca.der().to_vec(),
            cert_der: cert.der().to_vec(),
            key_der: key.serialized_der().to_vec(),
            ca_pem: ca.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// The harness's own assumptions: the PKI is the same every time, `pem` writes what
    /// rcgen writes, and runnel loads the material (else most inputs test nothing).
    fn check(&self) {
        let again = Pki::generate().expect("fixed PKI");
        assert!(again.cert_der == self.cert_der && again.ca_der == self.ca_der);
        assert_eq!(
            pem("CERTIFICATE", &self.cert_der),
            self.cert_pem.replace("\r\n", "\n")
        );
        let pem = |var, text: &str| runnel::material::Source::Pem {
            var,
            text: text.to_owned(),
        };
        let sources = runnel::material::Sources {
            ca: pem("RUNNEL_TLS_CA_PEM", &self.ca_pem),
            cert: pem("RUNNEL_TLS_CERT_PEM", &self.cert_pem),
            key: pem("RUNNEL_TLS_KEY_PEM", &self.key_pem),
        };
        if let Err(e) = runnel::material::Material::load(&sources, &mut Vec::new()) {
            panic!("runnel rejects the fixed PKI: {e}");
        }
    }
}

/// `der` in a PEM envelope with this label, as `openssl` would write it.
pub fn pem(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            b64.push(if i <= chunk.len() {
                char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize])
            } else {
                '='
            });
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// An Ed25519 key from a fixed seed (PKCS#8 v1: the fixed prefix, then the seed).
fn ed25519_key(seed: u8) -> Result<KeyPair, rcgen::Error> {
    let mut pkcs8 = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    pkcs8.extend([seed; 32]);
    KeyPair::try_from(pkcs8.as_slice())
}
