//! h2c preface detection: `detect::classify` over arbitrary first bytes.
//!
//! Checked against a model (H2 exactly when the bytes start with the preface, undecided
//! exactly while they are a strict prefix of it), and for what `first_bytes` relies on
//! as bytes arrive in pieces: once a prefix is decided, every longer one gets the same
//! verdict, so where the reads happen to split the stream never changes the ALPN offer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use runnel::detect::{H2_PREFACE, Verdict, classify};

fuzz_target!(|bytes: &[u8]| {
    let verdict = classify(bytes);
    let model = if bytes.starts_with(H2_PREFACE) {
        Verdict::H2
    } else if H2_PREFACE.starts_with(bytes) {
        Verdict::Undecided
    } else {
        Verdict::Http1
    };
    assert_eq!(verdict, model, "classify({bytes:?})");
    // Only the first preface-length bytes can matter; checking the prefixes up to there
    // keeps a long input linear.
    let mut decided = None;
    for n in 0..=bytes.len().min(H2_PREFACE.len()) {
        match (decided, classify(&bytes[..n])) {
            (_, Verdict::Undecided) => assert_eq!(decided, None, "undecided again at {n}"),
            (None, v) => decided = Some(v),
            (Some(d), v) => assert_eq!(d, v, "verdict changed at {n}"),
        }
    }
    assert_eq!(decided.unwrap_or(Verdict::Undecided), verdict);
});
