//! Typed errors, and `Outcome`: how one tunnelled connection ended.
//!
//! Invariant: every `Outcome` maps to a fixed label (`Outcome::label`), so metric
//! label sets stay bounded whatever the network does.

use std::{borrow::Cow, io};

/// An operator error found at start-up: the variable at fault and why.
///
/// Displayed as the one line runnel prints before exiting with code 64: control
/// characters in the name or reason (an operator's value, a variable's name) are escaped.
#[derive(Debug, thiserror::Error)]
#[error("{}: {}", one_line(var), one_line(reason))]
pub struct ConfigError {
    pub var: Cow<'static, str>,
    pub reason: String,
}

impl ConfigError {
    pub fn new(var: impl Into<Cow<'static, str>>, reason: impl Into<String>) -> Self {
        Self {
            var: var.into(),
            reason: reason.into(),
        }
    }
}

/// `text` with control characters escaped (`\n`, `\u{1b}`), so it stays one line.
fn one_line(text: &str) -> Cow<'_, str> {
    if text.chars().any(char::is_control) {
        Cow::Owned(
            text.chars()
                .map(|c| match c.is_control() {
                    true => c.escape_default().to_string(),
                    false => c.to_string(),
                })
                .collect(),
        )
    } else {
        Cow::Borrowed(text)
    }
}

/// Why an upstream connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no address for the upstream yet (DNS: {0})")]
    Dns(String),
    #[error("TCP connect to the upstream failed: {0}")]
    Tcp(io::Error),
    #[error("upstream connect and handshake exceeded the connect timeout")]
    Timeout,
    #[error("TLS handshake with the upstream failed: {0}")]
    Handshake(io::Error),
    #[error("the upstream selected ALPN {0:?}, which was not offered")]
    AlpnMismatch(String),
}

/// Whether an error says this process or host ran out of a local resource
/// (descriptors, buffers, memory): nothing the peer did, so never a reason to avoid
/// the peer's address.
pub fn is_local_exhaustion(e: &io::Error) -> bool {
    use rustix::io::Errno;
    let local = [Errno::MFILE, Errno::NFILE, Errno::NOBUFS, Errno::NOMEM];
    e.raw_os_error()
        .is_some_and(|code| local.iter().any(|l| l.raw_os_error() == code))
}

/// Every value of the `kind` label of `runnel_upstream_errors_total`.
pub const UPSTREAM_ERROR_KINDS: [&str; 11] = [
    "dns",
    "connect",
    "local_exhaustion",
    "timeout",
    "closed_after_handshake",
    "unresponsive",
    "tls_alert_from_gateway",
    "certificate_rejected",
    "certificate_untrusted",
    "alpn_mismatch",
    "handshake",
];

impl ConnectError {
    /// The `kind` label of `runnel_upstream_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Dns(_) => "dns",
            // Out of descriptors or memory here: not the gateway's fault, and not
            // counted as such (readiness, the avoid list, the upstream alert).
            _ if self.is_local() => "local_exhaustion",
            Self::Tcp(_) => "connect",
            Self::Timeout => "timeout",
            Self::Handshake(e) => tls_error_kind(e),
            Self::AlpnMismatch(_) => "alpn_mismatch",
        }
    }

    /// Whether runnel's own instance ran out of descriptors or memory: not the gateway.
    pub fn is_local(&self) -> bool {
        matches!(self, Self::Tcp(e) if is_local_exhaustion(e))
    }

    /// The outcome a downstream connection gets when its upstream fails this way.
    pub fn outcome(&self) -> Outcome {
        match self {
            Self::Dns(_) | Self::Tcp(_) => Outcome::ConnectFailed,
            Self::Timeout => Outcome::ConnectTimeout,
            Self::Handshake(_) => Outcome::HandshakeFailed,
            Self::AlpnMismatch(_) => Outcome::AlpnMismatch,
        }
    }
}

/// Classifies a TLS failure reported through `io::Error` (tokio-rustls wraps the
/// `rustls::Error`): whose fault, in words an operator can act on.
pub fn tls_error_kind(e: &io::Error) -> &'static str {
    use rustls::{AlertDescription as A, Error as E};
    match e.get_ref().and_then(|inner| inner.downcast_ref::<E>()) {
        Some(E::AlertReceived(
            A::BadCertificate
            | A::CertificateRequired
            | A::UnknownCA
            | A::CertificateUnknown
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::AccessDenied
            | A::UnsupportedCertificate
            // A signature the gateway could not verify: runnel computes its Finished
            // and binders itself, so in practice the client certificate's, as rustls
            // and BoringSSL say for a certificate whose issuer has a trusted CA's name
            // but not its key.
            | A::DecryptError,
        )) => "certificate_rejected",
        Some(E::AlertReceived(A::NoApplicationProtocol)) | Some(E::NoApplicationProtocol) => {
            "alpn_mismatch"
        }
        Some(E::AlertReceived(_)) => "tls_alert_from_gateway",
        Some(E::InvalidCertificate(_)) => "certificate_untrusted",
        _ => "handshake",
    }
}

/// How one downstream connection ended. Labels are API (metrics, logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Both directions ended with FIN / close_notify.
    Clean,
    /// The downstream closed before sending a byte (a TCP probe); no upstream was opened.
    NoData,
    /// The downstream reset or failed; the upstream was reset too.
    DownstreamReset,
    /// The upstream reset or failed; the downstream was reset too.
    UpstreamReset,
    /// The upstream closed TCP without close_notify; the downstream was reset.
    UpstreamTruncated,
    /// The upstream sent a TLS alert or malformed TLS after the handshake.
    UpstreamTlsError,
    /// No byte moved either way for `RUNNEL_IDLE_TIMEOUT`; both sides closed cleanly.
    IdleTimeout,
    /// No byte moved for `RUNNEL_IDLE_TIMEOUT` while bytes were still owed to a side
    /// that stopped taking them (or the clean close could not finish): both sides reset,
    /// since a FIN would pass a cut stream off as complete.
    IdleTimeoutStalled,
    /// The upstream stopped acknowledging anything (a gateway that vanished, a path
    /// that black-holes); both sides were reset.
    UpstreamUnresponsive,
    /// TCP connect to every upstream address failed (or no address was known).
    ConnectFailed,
    /// Connect + handshake did not finish within `RUNNEL_CONNECT_TIMEOUT`.
    ConnectTimeout,
    /// The TLS handshake failed (certificate, protocol, alert).
    HandshakeFailed,
    /// The upstream answered with an ALPN protocol that was not offered.
    AlpnMismatch,
    /// Still open at the drain deadline; both sides were reset.
    DrainAborted,
}

impl Outcome {
    pub const ALL: [Outcome; 14] = [
        Self::Clean,
        Self::NoData,
        Self::DownstreamReset,
        Self::UpstreamReset,
        Self::UpstreamTruncated,
        Self::UpstreamTlsError,
        Self::IdleTimeout,
        Self::IdleTimeoutStalled,
        Self::UpstreamUnresponsive,
        Self::ConnectFailed,
        Self::ConnectTimeout,
        Self::HandshakeFailed,
        Self::AlpnMismatch,
        Self::DrainAborted,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Clean => "clean",
            Self::NoData => "no_data",
            Self::DownstreamReset => "downstream_reset",
            Self::UpstreamReset => "upstream_reset",
            Self::UpstreamTruncated => "upstream_truncated",
            Self::UpstreamTlsError => "upstream_tls_error",
            Self::IdleTimeout => "idle_timeout",
            Self::IdleTimeoutStalled => "idle_timeout_stalled",
            Self::UpstreamUnresponsive => "upstream_unresponsive",
            Self::ConnectFailed => "connect_failed",
            Self::ConnectTimeout => "connect_timeout",
            Self::HandshakeFailed => "handshake_failed",
            Self::AlpnMismatch => "alpn_mismatch",
            Self::DrainAborted => "drain_aborted",
        }
    }

    /// Whether the downstream saw a clean end (FIN) rather than a reset.
    pub fn is_clean(self) -> bool {
        matches!(self, Self::Clean | Self::NoData | Self::IdleTimeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_descriptors_is_a_local_kind_not_a_connect_failure() {
        let emfile = io::Error::from_raw_os_error(rustix::io::Errno::MFILE.raw_os_error());
        assert_eq!(ConnectError::Tcp(emfile).kind(), "local_exhaustion");
        let refused = io::Error::from_raw_os_error(rustix::io::Errno::CONNREFUSED.raw_os_error());
        assert_eq!(ConnectError::Tcp(refused).kind(), "connect");
    }

    #[test]
    fn a_config_error_is_one_line_whatever_the_name_holds() {
        let e = ConfigError::new("RUNNEL_X\nY".to_owned(), "unknown variable\r\u{1b}[2J");
        let shown = e.to_string();
        assert_eq!(shown, "RUNNEL_X\\nY: unknown variable\\r\\u{1b}[2J");
        assert_eq!(shown.lines().count(), 1);
    }
}
