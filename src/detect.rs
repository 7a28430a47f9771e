//! The first downstream bytes: wait for them, and under `RUNNEL_ALPN=auto` choose the
//! ALPN offer from them.
//!
//! Invariant: the bytes read here are returned to the caller, which forwards them
//! first; nothing is consumed or altered. The decision is made as soon as the bytes
//! either complete the HTTP/2 preface or diverge from it, or when `PREFACE_WAIT` runs
//! out, so an HTTP/1.1 request is never held up waiting for bytes that will not come.

use std::{io, time::Duration};

use tokio::{io::AsyncReadExt, net::TcpStream};

use crate::{config::AlpnPolicy, connect::Offer};

/// The HTTP/2 connection preface (RFC 9113, section 3.4) a prior-knowledge h2c client sends.
pub const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// How long a partial preface may take to complete before it is treated as HTTP/1.1.
const PREFACE_WAIT: Duration = Duration::from_millis(500);
/// The first read: enough for a typical request head, forwarded in one TLS record.
const FIRST_READ: usize = 8 * 1024;

/// What a prefix of the first bytes says about the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    H2,
    Http1,
    /// A strict prefix of the preface so far: more bytes are needed.
    Undecided,
}

pub fn classify(bytes: &[u8]) -> Verdict {
    let n = bytes.len().min(H2_PREFACE.len());
    if bytes[..n] != H2_PREFACE[..n] {
        Verdict::Http1
    } else if n == H2_PREFACE.len() {
        Verdict::H2
    } else {
        Verdict::Undecided
    }
}

/// Waits for the first bytes. `Ok(None)` means the downstream closed without sending any.
pub async fn first_bytes(
    stream: &mut TcpStream,
    policy: &AlpnPolicy,
) -> io::Result<Option<(Vec<u8>, Offer)>> {
    let mut buf = Vec::with_capacity(FIRST_READ);
    if stream.read_buf(&mut buf).await? == 0 {
        return Ok(None);
    }
    if *policy != AlpnPolicy::Auto {
        return Ok(Some((buf, Offer::Fixed)));
    }
    let wait = tokio::time::sleep(PREFACE_WAIT);
    tokio::pin!(wait);
    loop {
        match classify(&buf) {
            Verdict::H2 => return Ok(Some((buf, Offer::H2))),
            Verdict::Http1 => return Ok(Some((buf, Offer::Http1))),
            Verdict::Undecided => {}
        }
        tokio::select! {
            _ = &mut wait => return Ok(Some((buf, Offer::Http1))),
            read = stream.read_buf(&mut buf) => {
                if read? == 0 {
                    // The downstream half-closed mid-preface: not h2, forward what came.
                    return Ok(Some((buf, Offer::Http1)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_preface_is_h2_even_with_frames_after_it() {
        let mut bytes = H2_PREFACE.to_vec();
        bytes.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        assert_eq!(classify(&bytes), Verdict::H2);
    }

    #[test]
    fn every_strict_prefix_of_the_preface_is_undecided() {
        for n in 1..H2_PREFACE.len() {
            assert_eq!(
                classify(&H2_PREFACE[..n]),
                Verdict::Undecided,
                "prefix of {n}"
            );
        }
    }

    #[test]
    fn http1_methods_are_decided_at_the_first_divergent_byte() {
        assert_eq!(classify(b"G"), Verdict::Http1);
        assert_eq!(classify(b"PO"), Verdict::Http1);
        assert_eq!(classify(b"PUT / HTTP/1.1\r\n"), Verdict::Http1);
        assert_eq!(classify(b"PRI * HTTP/1.1\r\n"), Verdict::Http1);
    }
}
