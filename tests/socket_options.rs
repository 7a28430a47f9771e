//! A platform that refuses socket options (gVisor, Cloud Run's first-generation sandbox,
//! has lacked `SO_LINGER` and some keepalive knobs): runnel carries on, logs each
//! refused option once, and a truncated upstream still reaches the downstream as a reset.
//!
//! The refusal is real: the runnel binary runs with an `LD_PRELOAD` shim, compiled here
//! with the system C compiler, whose `setsockopt` fails `SO_LINGER` and `TCP_KEEPCNT`
//! with `ENOPROTOOPT`, as such a kernel does. Everything else goes to the C library.

mod support;

use std::{io::ErrorKind, path::PathBuf, process::Command};

use serde_json::Value;
use support::{
    gateway::{Behaviour, Gateway, binary_vars, exchange, pattern, pki, serve_binary},
    process::{TempDir, field, missing_peer},
};

const SHIM: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

int setsockopt(int fd, int level, int name, const void *value, socklen_t len) {
    static int (*real)(int, int, int, const void *, socklen_t);
    if ((level == SOL_SOCKET && name == SO_LINGER) ||
        (level == IPPROTO_TCP && name == TCP_KEEPCNT)) {
        errno = ENOPROTOOPT;
        return -1;
    }
    if (!real) {
        real = (int (*)(int, int, int, const void *, socklen_t))dlsym(RTLD_NEXT, "setsockopt");
    }
    return real(fd, level, name, value, len);
}
"#;

/// Builds the shim into `dir`; `None` (after the suite's missing-peer note) without cc.
fn build_shim(dir: &TempDir) -> Option<PathBuf> {
    let source = dir.path().join("refuse.c");
    let shim = dir.path().join("refuse.so");
    std::fs::write(&source, SHIM).unwrap();
    let built = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&shim)
        .arg(&source)
        .arg("-ldl")
        .status();
    match built {
        Ok(status) if status.success() => Some(shim),
        other => {
            missing_peer(&format!(
                "a C compiler `cc` for the LD_PRELOAD shim ({other:?})"
            ));
            None
        }
    }
}

/// The options named by runnel's "socket option refused" warnings, in order.
fn refused_options(stderr: &[String]) -> Vec<String> {
    stderr
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|v| {
            field(v, "message")
                .and_then(Value::as_str)
                .is_some_and(|m| m.starts_with("socket option refused"))
        })
        .filter_map(|v| Some(field(&v, "socket.option")?.as_str()?.to_owned()))
        .collect()
}

#[tokio::test]
async fn refused_linger_and_keepalive_are_logged_once_and_truncation_still_resets() {
    let dir = TempDir::new("socket-options");
    let Some(shim) = build_shim(&dir) else {
        return;
    };
    let pki = pki();
    let tls = || pki.gateway_tls(&[b"http/1.1"]).unwrap();
    let echo = Gateway::start(tls(), Behaviour::Echo).await;
    let truncating = Gateway::start(tls(), Behaviour::ReplyThenTruncate(b"partial".to_vec())).await;
    let shim = shim.to_str().unwrap();
    let start = |gateway: std::net::SocketAddr| {
        serve_binary(binary_vars(
            &pki,
            gateway,
            &[("RUNNEL_ALPN", "http/1.1"), ("LD_PRELOAD", shim)],
        ))
    };

    // Bytes flow as ever.
    let (echo_runnel, listening) = start(echo.addr).await;
    for seed in 0..3 {
        let sent = pattern(seed, 100_000);
        let got = exchange(listening.listen, &sent)
            .await
            .expect("echo failed");
        assert!(
            got == sent,
            "echo of {} bytes came back altered",
            sent.len()
        );
    }
    let options = refused_options(&echo_runnel.stderr());
    assert_eq!(
        options,
        ["SO_KEEPALIVE"],
        "each refused option once; stderr:\n{}",
        echo_runnel.stderr().join("\n")
    );

    // Truncations still end the downstream with a reset, over several connections.
    let (truncating_runnel, listening) = start(truncating.addr).await;
    for _ in 0..3 {
        match exchange(listening.listen, b"GET / HTTP/1.1\r\n\r\n").await {
            Err((kind, got)) => {
                assert_eq!(kind, ErrorKind::ConnectionReset, "after {got:?}");
                assert_eq!(got, b"partial");
            }
            Ok(got) => panic!("a truncation passed off as a clean end after {got:?}"),
        }
    }
    let stderr = truncating_runnel.stderr();
    let mut options = refused_options(&stderr);
    options.sort();
    assert_eq!(
        options,
        ["SO_KEEPALIVE", "SO_LINGER"],
        "each refused option once; stderr:\n{}",
        stderr.join("\n")
    );
}
