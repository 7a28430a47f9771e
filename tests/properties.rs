//! Properties of the parsers that face operator and network input: no input makes
//! them panic, and their answers are the documented ones.

use proptest::prelude::*;
use runnel::{
    Config,
    config::{VARS, parse_duration},
    detect::{H2_PREFACE, Verdict, classify},
};

proptest! {
    #[test]
    fn durations_round_trip_and_nothing_else_parses(n in 0u64..100_000, unit in prop::sample::select(vec!["ms", "s", "m", "h"])) {
        let ms = match unit { "ms" => n, "s" => n * 1000, "m" => n * 60_000, _ => n * 3_600_000 };
        let parsed = parse_duration(&format!("{n}{unit}"));
        if ms <= 365 * 24 * 3_600_000 {
            prop_assert_eq!(parsed.unwrap().as_millis() as u64, ms);
        } else {
            prop_assert!(parsed.is_err());
        }
    }

    #[test]
    fn arbitrary_duration_text_never_panics(s in ".{0,24}") {
        let _ = parse_duration(&s);
    }

    #[test]
    fn preface_detection_answers_for_any_first_bytes(bytes in prop::collection::vec(any::<u8>(), 1..64)) {
        let n = bytes.len().min(H2_PREFACE.len());
        let expected = if bytes[..n] != H2_PREFACE[..n] {
            Verdict::Http1
        } else if n == H2_PREFACE.len() {
            Verdict::H2
        } else {
            Verdict::Undecided
        };
        prop_assert_eq!(classify(&bytes), expected);
    }

    #[test]
    fn any_upstream_or_alpn_text_is_parsed_or_refused_by_name(up in "\\PC{0,40}", alpn in "\\PC{0,40}") {
        let vars = [("RUNNEL_UPSTREAM", up), ("RUNNEL_ALPN", alpn)];
        match Config::from_vars(vars) {
            Ok(_) => {}
            Err(e) => prop_assert!(e.var.starts_with("RUNNEL_") , "{}", e),
        }
    }

    #[test]
    fn arbitrary_pem_text_is_refused_with_its_variable(text in "\\PC{1,200}") {
        let vars = [
            ("RUNNEL_UPSTREAM", "gw.internal:443".to_owned()),
            ("RUNNEL_TLS_CA_PEM", text.clone()),
            ("RUNNEL_TLS_CERT_PEM", text.clone()),
            ("RUNNEL_TLS_KEY_PEM", text),
        ];
        let e = Config::from_vars(vars).expect_err("random text is no CA");
        prop_assert_eq!(e.var.as_ref(), "RUNNEL_TLS_CA_PEM");
    }

    #[test]
    fn unknown_runnel_variables_are_named(suffix in "[A-Z_]{1,20}") {
        let name = format!("RUNNEL_{suffix}");
        prop_assume!(!VARS.iter().any(|v| v.name == name));
        let e = Config::from_vars([(name.clone(), "x".to_owned())]).expect_err("unknown variable accepted");
        prop_assert_eq!(e.var.as_ref(), name.as_str());
        let hint = e.reason.split("did you mean ").nth(1).and_then(|h| h.strip_suffix('?'));
        prop_assert!(
            hint.is_some_and(|h| VARS.iter().any(|v| v.name == h)),
            "no known variable named in {:?}",
            e.reason
        );
    }
}
