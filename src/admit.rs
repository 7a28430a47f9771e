//! Admission: has the gateway accepted this new connection's client certificate?
//!
//! Under TLS 1.2 the gateway's Finished says so. Under TLS 1.3 the client's handshake
//! completes before the gateway has verified the certificate, and a refusal is an alert
//! one round trip later; so a new connection counts only once the gateway sent a
//! session ticket (or an HTTP/2 preface), or stayed quiet for a probation of a few
//! handshake times. The pool admits every connection before pooling it; the readiness
//! probe and `runnel check` wait for the same proof.
//!
//! Invariant: only a certificate alert is reported as a rejected certificate; a reset
//! or a close is the gateway's own trouble (`closed_after_handshake`), so an overloaded
//! gateway never pages for the wrong cause.

use std::{future::poll_fn, io, pin::Pin, task::Poll, time::Duration};

use rustls::ProtocolVersion;
use tokio::io::{AsyncRead, ReadBuf};

use crate::{
    connect::{Connected, Connector},
    metrics,
};

/// Under TLS 1.3 without a session ticket, how long (in handshake times) a new
/// connection must stay quiet before it is trusted; a rejected certificate draws an
/// alert about one round trip after our Finished.
const PROBATION_HANDSHAKES: u32 = 3;
const PROBATION_MIN: Duration = Duration::from_millis(20);
const PROBATION_MAX: Duration = Duration::from_secs(2);
/// The least a resumed connection waits for new tickets before it is admitted anyway.
const RESUMED_WAIT_MIN: Duration = Duration::from_millis(1);
/// The upstream error kind of a gateway that ends a connection at once, without an
/// alert: overloaded, draining, or an idle limit shorter than the probation.
const CLOSED_AFTER_HANDSHAKE: &str = "closed_after_handshake";

/// Why the gateway refused a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// It closed the connection (with or without close_notify).
    Closed,
    /// It sent application data nobody asked for.
    UnexpectedData,
    /// A reset, or an alert other than a certificate alert.
    Error,
    /// A certificate alert: the client certificate was refused.
    Rejected,
}

impl Refused {
    /// The `runnel_pool_discards_total` reason.
    pub fn label(self) -> &'static str {
        match self {
            Refused::Closed => "closed",
            Refused::UnexpectedData => "unexpected_data",
            Refused::Error => "error",
            Refused::Rejected => "rejected",
        }
    }

    /// What an operator reads.
    pub fn describe(self) -> &'static str {
        match self {
            Refused::Rejected => "the gateway rejected the client certificate",
            Refused::UnexpectedData => "the gateway sent data nobody asked for",
            Refused::Error => "the gateway ended the connection with an error",
            Refused::Closed => "the gateway closed the connection right after the handshake",
        }
    }
}

/// Waits for the proof, storing the session tickets that arrive meanwhile, and tells
/// `connector` how the attempt went (readiness) and the metrics why it failed.
pub async fn admit(connector: &Connector, connected: &mut Connected) -> Result<(), Refused> {
    match wait_for_acceptance(connected).await {
        Ok(()) => {
            connector.mark_accepted();
            Ok(())
        }
        Err((reason, kind)) => {
            connector.mark_failed();
            metrics::upstream_error(kind);
            Err(reason)
        }
    }
}

/// An HTTP/2 server may send its SETTINGS before the client says anything; any
/// other protocol sending first on an idle connection is unexpected.
pub fn may_speak_first(connected: &Connected) -> bool {
    connected.info.alpn.as_deref() == Some("h2")
}

/// A refusal and its `runnel_upstream_errors_total` kind.
type Refusal = (Refused, &'static str);

async fn wait_for_acceptance(connected: &mut Connected) -> Result<(), Refusal> {
    let tls13 = connected.stream.get_ref().1.protocol_version() == Some(ProtocolVersion::TLSv1_3);
    if !tls13 {
        // TLS 1.2: the gateway's Finished came after it verified our certificate.
        return Ok(());
    }
    // A resumed session sends no certificate: the gateway accepted ours when it issued
    // the ticket (one that no longer would refuses the ticket: a full handshake). So a
    // resumed connection waits only briefly, for the new tickets that keep refills
    // resuming; not every gateway sends them on resumption (Envoy does not), and the
    // full probation would keep the pool empty under load at low round-trip times.
    let probation = match connected.info.resumed {
        true => connected
            .info
            .handshake_time
            .clamp(RESUMED_WAIT_MIN, PROBATION_MAX),
        false => (connected.info.handshake_time * PROBATION_HANDSHAKES)
            .clamp(PROBATION_MIN, PROBATION_MAX),
    };
    let deadline = tokio::time::sleep(probation);
    tokio::pin!(deadline);
    let mut byte = [0u8; 1];
    let speaks_first = may_speak_first(connected);
    poll_fn(|cx| {
        let mut buf = ReadBuf::new(&mut byte);
        match Pin::new(&mut connected.stream).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                return Poll::Ready(Err((Refused::Closed, CLOSED_AFTER_HANDSHAKE)));
            }
            // An HTTP/2 server's preface: kept for the downstream, and proof enough
            // that the gateway accepted us.
            Poll::Ready(Ok(())) if speaks_first => {
                connected.early.extend_from_slice(buf.filled());
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Ok(())) => {
                return Poll::Ready(Err((Refused::UnexpectedData, CLOSED_AFTER_HANDSHAKE)));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(refusal(&e))),
            Poll::Pending => {}
        }
        if connected.stream.get_ref().1.tls13_tickets_received() > 0 {
            return Poll::Ready(Ok(()));
        }
        deadline.as_mut().poll(cx).map(Ok)
    })
    .await
}

/// Classifies a read error on a freshly made connection.
fn refusal(e: &io::Error) -> Refusal {
    match e.kind() {
        io::ErrorKind::InvalidData => match crate::error::tls_error_kind(e) {
            "certificate_rejected" => (Refused::Rejected, "certificate_rejected"),
            kind => (Refused::Error, kind),
        },
        // rustls: a TCP EOF without close_notify.
        io::ErrorKind::UnexpectedEof => (Refused::Closed, CLOSED_AFTER_HANDSHAKE),
        _ => (Refused::Error, CLOSED_AFTER_HANDSHAKE),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_certificate_alert_counts_as_a_rejected_certificate() {
        let alert = |a| io::Error::new(io::ErrorKind::InvalidData, rustls::Error::AlertReceived(a));
        let rejected = alert(rustls::AlertDescription::BadCertificate);
        assert_eq!(
            refusal(&rejected),
            (Refused::Rejected, "certificate_rejected")
        );
        let other = alert(rustls::AlertDescription::InternalError);
        assert_eq!(refusal(&other), (Refused::Error, "tls_alert_from_gateway"));
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(refusal(&reset), (Refused::Error, CLOSED_AFTER_HANDSHAKE));
        let eof = io::Error::from(io::ErrorKind::UnexpectedEof);
        assert_eq!(refusal(&eof), (Refused::Closed, CLOSED_AFTER_HANDSHAKE));
    }
}
