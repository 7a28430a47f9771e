//! Configuration parsing: arbitrary (name, value) pairs into `Config::from_vars`.
//!
//! Operator input must never panic runnel: every pair list ends in a `Config` or a
//! `ConfigError` that names a variable. About half the inputs start from a valid
//! configuration (upstream and the fixed PKI), so the variables parsed after the TLS
//! material (durations, ALPN, pool sizes, addresses, the log filter) are reached too.
#![no_main]

use libfuzzer_sys::{
    arbitrary::{self, Arbitrary},
    fuzz_target,
};
use runnel::config::{Config, VARS};
use runnel_fuzz::PKI;

#[derive(Debug, Arbitrary)]
enum Name {
    /// One of the variables runnel knows, by index into `VARS`.
    Known(u8),
    /// `RUNNEL_` and a suffix: almost always unknown, so an error naming the closest.
    Runnel(String),
    /// Anything: ignored unless it is `PORT`, `SSLKEYLOGFILE` or starts with `RUNNEL_`.
    Other(String),
}

#[derive(Debug, Arbitrary)]
struct Input {
    /// Start from a valid configuration; the pairs then override it.
    valid_base: bool,
    vars: Vec<(Name, String)>,
}

fuzz_target!(|input: Input| {
    let mut vars: Vec<(String, String)> = Vec::new();
    if input.valid_base {
        vars.extend(
            [
                ("RUNNEL_UPSTREAM", "gateway.runnel.test:443"),
                ("RUNNEL_TLS_CA_PEM", PKI.ca_pem.as_str()),
                ("RUNNEL_TLS_CERT_PEM", PKI.cert_pem.as_str()),
                ("RUNNEL_TLS_KEY_PEM", PKI.key_pem.as_str()),
            ]
            .map(|(n, v)| (n.to_owned(), v.to_owned())),
        );
    }
    for (name, value) in input.vars {
        let name = match name {
            Name::Known(i) => VARS[usize::from(i) % VARS.len()].name.to_owned(),
            Name::Runnel(suffix) => format!("RUNNEL_{suffix}"),
            Name::Other(name) => name,
        };
        // A fuzzer must not read files: /dev/zero would never end. A path that cannot
        // exist keeps the _FILE branches (both set, read failure) reachable.
        let value = if name.ends_with("_FILE") && name != "SSLKEYLOGFILE" {
            format!("/nonexistent/runnel-fuzz/{}", value.len())
        } else {
            value
        };
        vars.push((name, value));
    }
    match Config::from_vars(vars) {
        Ok((config, _warnings)) => {
            // What parsing promises to the rest of the crate.
            assert!(config.pool.min <= config.pool.max);
            assert!(!config.connect_timeout.is_zero());
            assert!(!config.pool.max_idle.is_zero());
            assert!((1..=1_000_000).contains(&config.max_connections));
            assert!(config.upstream.port != 0);
            if let Some(m) = config.metrics_addr {
                assert!(m.port() == 0 || m.port() != config.listen.port());
            }
        }
        Err(e) => assert!(!e.var.is_empty(), "an error that names no variable: {e}"),
    }
});
