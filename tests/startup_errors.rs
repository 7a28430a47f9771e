//! Bad configuration: runnel refuses to start with exit code 64 and one line
//! `VARIABLE: reason`, nothing else.

mod support;

use std::time::{Duration, SystemTime};

use runnel::demo::Pki;
use support::process::run_to_exit;

const TIMEOUT: Duration = Duration::from_secs(20);

/// Runs runnel with these variables and returns its single stderr line.
fn refused(vars: &[(&str, &str)]) -> String {
    let finished = run_to_exit(&[], vars, TIMEOUT);
    assert_eq!(
        finished.status.code(),
        Some(64),
        "stderr: {:?}",
        finished.stderr
    );
    assert!(finished.stdout.is_empty(), "stdout: {:?}", finished.stdout);
    assert_eq!(
        finished.stderr.len(),
        1,
        "want one line, got {:?}",
        finished.stderr
    );
    finished.stderr[0].clone()
}

fn good(pki: &Pki) -> Vec<(&'static str, String)> {
    vec![
        ("RUNNEL_UPSTREAM", "127.0.0.1:9".to_owned()),
        ("RUNNEL_SERVER_NAME", "gateway.runnel.test".to_owned()),
        ("RUNNEL_TLS_CA_PEM", pki.ca_cert_pem.clone()),
        ("RUNNEL_TLS_CERT_PEM", pki.client.cert_pem.clone()),
        ("RUNNEL_TLS_KEY_PEM", pki.client.key_pem.clone()),
        ("RUNNEL_LISTEN", "127.0.0.1:0".to_owned()),
        ("RUNNEL_METRICS_ADDR", "off".to_owned()),
    ]
}

fn with<'a>(
    base: &'a [(&'static str, String)],
    set: &[(&'static str, &'a str)],
    unset: &[&str],
) -> Vec<(&'a str, &'a str)> {
    let mut v: Vec<(&str, &str)> = base
        .iter()
        .filter(|(k, _)| !unset.contains(k) && !set.iter().any(|(s, _)| s == k))
        .map(|(k, v)| (*k, v.as_str()))
        .collect();
    v.extend(set.iter().copied());
    v
}

#[test]
fn expired_client_certificate_is_refused() {
    let pki = Pki::generate().unwrap();
    let expired = pki
        .issue_client(
            "runnel",
            Some(SystemTime::now() - Duration::from_secs(3600)),
        )
        .unwrap();
    let base = good(&pki);
    let line = refused(&with(
        &base,
        &[
            ("RUNNEL_TLS_CERT_PEM", &expired.cert_pem),
            ("RUNNEL_TLS_KEY_PEM", &expired.key_pem),
        ],
        &[],
    ));
    assert!(
        line.starts_with("RUNNEL_TLS_CERT_PEM: client certificate expired at "),
        "{line}"
    );
}

#[test]
fn key_that_does_not_match_the_certificate_is_refused() {
    let pki = Pki::generate().unwrap();
    let other = pki.issue_client("other", None).unwrap();
    let base = good(&pki);
    let line = refused(&with(&base, &[("RUNNEL_TLS_KEY_PEM", &other.key_pem)], &[]));
    assert_eq!(
        line,
        "RUNNEL_TLS_KEY_PEM: key does not match the certificate in RUNNEL_TLS_CERT_PEM"
    );
}

#[test]
fn unreadable_key_file_is_refused_with_its_path() {
    let pki = Pki::generate().unwrap();
    let base = good(&pki);
    let line = refused(&with(
        &base,
        &[("RUNNEL_TLS_KEY_FILE", "/nonexistent/key.pem")],
        &["RUNNEL_TLS_KEY_PEM"],
    ));
    assert!(
        line.starts_with("RUNNEL_TLS_KEY_FILE: cannot read /nonexistent/key.pem"),
        "{line}"
    );
}

#[test]
fn unknown_runnel_variable_is_refused_with_the_closest_name() {
    let pki = Pki::generate().unwrap();
    let base = good(&pki);
    let line = refused(&with(&base, &[("RUNNEL_CONECT_TIMEOUT", "5s")], &[]));
    assert_eq!(
        line,
        "RUNNEL_CONECT_TIMEOUT: unknown variable; did you mean RUNNEL_CONNECT_TIMEOUT?"
    );
}

#[test]
fn ip_upstream_without_server_name_is_refused_and_explains_sni() {
    let pki = Pki::generate().unwrap();
    let base = good(&pki);
    let line = refused(&with(&base, &[], &["RUNNEL_SERVER_NAME"]));
    assert!(
        line.starts_with("RUNNEL_SERVER_NAME: required when RUNNEL_UPSTREAM is an IP address"),
        "{line}"
    );
    assert!(line.contains("filter_chain_not_found"), "{line}");
}

#[test]
fn metrics_on_the_listen_port_is_refused() {
    let pki = Pki::generate().unwrap();
    let base = good(&pki);
    let line = refused(&with(
        &base,
        &[
            ("RUNNEL_LISTEN", "0.0.0.0:8080"),
            ("RUNNEL_METRICS_ADDR", "127.0.0.1:8080"),
        ],
        &[],
    ));
    assert!(
        line.starts_with("RUNNEL_METRICS_ADDR: port 8080 is the listen port"),
        "{line}"
    );
}

#[test]
fn missing_upstream_is_refused() {
    let pki = Pki::generate().unwrap();
    let base = good(&pki);
    assert_eq!(
        refused(&with(&base, &[], &["RUNNEL_UPSTREAM"])),
        "RUNNEL_UPSTREAM: required, but not set"
    );
}

#[test]
fn malformed_duration_is_refused() {
    let pki = Pki::generate().unwrap();
    let base = good(&pki);
    let line = refused(&with(&base, &[("RUNNEL_IDLE_TIMEOUT", "10 minutes")], &[]));
    assert!(line.starts_with("RUNNEL_IDLE_TIMEOUT: "), "{line}");
}

#[test]
fn ca_that_is_not_pem_is_refused() {
    let pki = Pki::generate().unwrap();
    let base = good(&pki);
    assert_eq!(
        refused(&with(
            &base,
            &[("RUNNEL_TLS_CA_PEM", "not a certificate")],
            &[]
        )),
        "RUNNEL_TLS_CA_PEM: no PEM certificate found"
    );
}

#[test]
fn help_lists_every_variable_with_its_default() {
    let finished = run_to_exit(&["--help"], &[], TIMEOUT);
    assert_eq!(finished.status.code(), Some(0));
    let out = finished.stdout.join("\n");
    for var in runnel::config::VARS {
        let line = out
            .lines()
            .find(|l| l.trim_start().starts_with(var.name))
            .unwrap_or_else(|| panic!("{} missing from --help:\n{out}", var.name));
        if !var.default.is_empty() {
            assert!(
                line.contains(&format!("[default: {}]", var.default)),
                "{line}"
            );
        }
    }
}
