//! TLS material: CA, client chain and key from arbitrary PEM text, through
//! `material::Material::load` (what the `_PEM` variables and reloads use).
//!
//! It must load or return a `ConfigError`, never panic. Each of the three texts is the
//! fixed valid PEM or not, then parts: raw text, arbitrary DER in a PEM envelope, or the
//! valid DER with bytes replaced and cut, which reaches deep into the certificate and
//! key parsers that raw text almost never gets past base64 to.
#![no_main]

use libfuzzer_sys::{
    arbitrary::{self, Arbitrary},
    fuzz_target,
};
use runnel::material::{Material, Source, Sources};
use runnel_fuzz::{PKI, pem};

#[derive(Debug, Arbitrary)]
enum Label {
    Certificate,
    PrivateKey,
    EcPrivateKey,
    RsaPrivateKey,
    Other(String),
}

#[derive(Debug, Arbitrary)]
enum Base {
    Ca,
    Cert,
    Key,
}

#[derive(Debug, Arbitrary)]
enum Part {
    Text(String),
    Der(Label, Vec<u8>),
    /// A valid DER, these bytes replaced (offset modulo its length), cut to `len`.
    Edited {
        base: Base,
        label: Label,
        edits: Vec<(u16, u8)>,
        len: Option<u16>,
    },
}

#[derive(Debug, Arbitrary)]
struct Text {
    valid_first: bool,
    parts: Vec<Part>,
}

#[derive(Debug, Arbitrary)]
struct Input {
    ca: Text,
    cert: Text,
    key: Text,
}

fuzz_target!(|input: Input| {
    let sources = Sources {
        ca: source("RUNNEL_TLS_CA_PEM", &PKI.ca_pem, input.ca),
        cert: source("RUNNEL_TLS_CERT_PEM", &PKI.cert_pem, input.cert),
        key: source("RUNNEL_TLS_KEY_PEM", &PKI.key_pem, input.key),
    };
    let mut warnings = Vec::new();
    if let Err(e) = Material::load(&sources, &mut warnings) {
        assert!(!e.var.is_empty(), "an error that names no variable: {e}");
    }
});

fn source(var: &'static str, valid: &str, text: Text) -> Source {
    let mut out = if text.valid_first {
        valid.to_owned()
    } else {
        String::new()
    };
    for part in text.parts {
        match part {
            Part::Text(s) => out.push_str(&s),
            Part::Der(label, der) => out.push_str(&pem(&label.name(), &der)),
            Part::Edited {
                base,
                label,
                edits,
                len,
            } => {
                let mut der = match base {
                    Base::Ca => PKI.ca_der.clone(),
                    Base::Cert => PKI.cert_der.clone(),
                    Base::Key => PKI.key_der.clone(),
                };
                for (at, byte) in edits {
                    let at = usize::from(at) % der.len();
                    der[at] = byte;
                }
                if let Some(len) = len {
                    der.truncate(usize::from(len));
                }
                out.push_str(&pem(&label.name(), &der));
            }
        }
    }
    Source::Pem { var, text: out }
}

impl Label {
    fn name(&self) -> String {
        match self {
            Label::Certificate => "CERTIFICATE".into(),
            Label::PrivateKey => "PRIVATE KEY".into(),
            Label::EcPrivateKey => "EC PRIVATE KEY".into(),
            Label::RsaPrivateKey => "RSA PRIVATE KEY".into(),
            Label::Other(s) => s.clone(),
        }
    }
}
