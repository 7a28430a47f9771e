//! `runnel check`: one connect + handshake to the upstream with the serving
//! configuration, and a report of what was negotiated.
//!
//! Invariant: check uses the same `Connector` as serving, so a passing check means
//! the serving path can reach the gateway with this configuration.

use std::fmt::Write as _;

use rustls::pki_types::CertificateDer;
use tokio::io::AsyncWriteExt;

use crate::{
    config::Config,
    connect::{Connector, Offer},
    material::rfc3339,
};

/// Connects once; `Ok` holds the report to print, `Err` the reason it failed.
pub async fn run(config: &Config) -> Result<String, String> {
    let connector = Connector::new(config).map_err(|e| format!("TLS configuration: {e}"))?;
    let mut connected = connector
        .connect(Offer::plain(&config.alpn))
        .await
        .map_err(|e| format!("{} ({}): {e}", config.upstream, connect_hint(&e)))?;
    // Under TLS 1.3 a gateway that refuses the client certificate says so only after
    // the client's handshake is done: wait as the pool does before a connection counts.
    crate::admit::admit(&connector, &mut connected)
        .await
        .map_err(|reason| {
            let hint = match reason {
                crate::admit::Refused::Rejected => {
                    ": check that it trusts this client certificate (RUNNEL_TLS_CERT_*)"
                }
                _ => "",
            };
            format!(
                "{}: the connection ended right after the handshake: {} ({}){hint}",
                config.upstream,
                reason.describe(),
                reason.label()
            )
        })?;
    let info = &connected.info;
    let mut out = String::new();
    let _ = writeln!(out, "upstream          {} ({})", config.upstream, info.addr);
    let _ = writeln!(out, "server name       {}", config.server_name.to_str());
    let _ = writeln!(out, "tls version       {}", info.version);
    let _ = writeln!(out, "cipher suite      {}", info.cipher);
    let _ = writeln!(out, "key exchange      {}", info.kx_group);
    let _ = writeln!(
        out,
        "alpn              {}",
        info.alpn.as_deref().unwrap_or("(none)")
    );
    let _ = writeln!(out, "resumed           {}", info.resumed);
    let _ = writeln!(
        out,
        "connect time      {:.3} ms",
        info.connect_time.as_secs_f64() * 1000.0
    );
    let _ = writeln!(
        out,
        "handshake time    {:.3} ms",
        info.handshake_time.as_secs_f64() * 1000.0
    );
    if let Some(cert) = connected
        .stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
    {
        describe_gateway(&mut out, cert);
    }
    let _ = writeln!(
        out,
        "client cert until {}",
        rfc3339(config.tls.cert_not_after)
    );
    let _ = connected.stream.shutdown().await;
    Ok(out)
}

fn describe_gateway(out: &mut String, cert: &CertificateDer<'_>) {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(cert) else {
        return;
    };
    let _ = writeln!(out, "gateway subject   {}", cert.subject());
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        let names: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        let _ = writeln!(out, "gateway SANs      {}", names.join(", "));
    }
    let _ = writeln!(
        out,
        "gateway cert until {}",
        rfc3339(cert.validity().not_after.timestamp())
    );
}

fn connect_hint(e: &crate::error::ConnectError) -> &'static str {
    use crate::error::ConnectError::*;
    match e {
        Dns(_) => "check RUNNEL_UPSTREAM's host name",
        Tcp(_) => "check RUNNEL_UPSTREAM and the network path (VPC egress, firewall)",
        Timeout => "nothing answered in time: network path, or RUNNEL_CONNECT_TIMEOUT",
        Handshake(_) => {
            "check RUNNEL_SERVER_NAME, RUNNEL_TLS_CA_* and that the gateway accepts this client certificate"
        }
        AlpnMismatch(_) => "check RUNNEL_ALPN",
    }
}
