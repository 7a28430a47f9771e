//! Pool faults a real gateway produces: one that ends new connections at once without
//! refusing the certificate, and an HTTP/2 gateway that sends GOAWAY on an idle pooled
//! connection.

mod support;

use std::{sync::Arc, time::Duration};

use support::{
    gateway::{Runnel, exchange, pki, vars},
    scripted::Scripted,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn series(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_resets_new_connections_is_not_reported_as_rejecting_the_certificate() {
    let pki = pki();
    // TLS 1.3 without session tickets, so admission waits for its probation and sees
    // the reset that follows the handshake.
    let mut tls = (*pki.gateway_tls(&[b"http/1.1"]).unwrap()).clone();
    tls.send_tls13_tickets = 0;
    let gateway = Scripted::bind(Arc::new(tls), |_, tls| async move {
        let (tcp, _) = tls.into_inner();
        let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    })
    .await;
    let runnel = Runnel::start(vars(&pki, gateway.addr)).await;
    let closed = "runnel_upstream_errors_total{kind=\"closed_after_handshake\"}";
    let m = runnel
        .metrics_until("two resets after the handshake", |m| series(m, closed) >= 2)
        .await;
    assert_eq!(
        series(
            &m,
            "runnel_upstream_errors_total{kind=\"certificate_rejected\"}"
        ),
        0,
        "resets counted as a rejected certificate:\n{m}"
    );
    assert_eq!(
        series(&m, "runnel_pool_discards_total{reason=\"rejected\"}"),
        0,
        "{m}"
    );
}

/// HTTP/2 frames: an empty SETTINGS, and GOAWAY (last stream 0, NO_ERROR).
const SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];
const GOAWAY: [u8; 17] = [0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_connection_the_gateway_sent_goaway_on_is_retired_and_never_handed_out() {
    let pki = pki();
    // The first connection says GOAWAY soon after its SETTINGS and never echoes; the
    // others echo.
    let gateway = Scripted::bind(
        pki.gateway_tls(&[b"h2"]).unwrap(),
        |n, mut tls| async move {
            let _ = tls.write_all(&SETTINGS).await;
            let _ = tls.flush().await;
            if n == 0 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let _ = tls.write_all(&GOAWAY).await;
                let _ = tls.flush().await;
                let mut sink = [0u8; 1024];
                while matches!(tls.read(&mut sink).await, Ok(n) if n > 0) {}
                return;
            }
            let mut buf = [0u8; 1024];
            loop {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tls.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = tls.shutdown().await;
        },
    )
    .await;
    let mut v = vars(&pki, gateway.addr);
    v.push(("RUNNEL_ALPN".into(), "h2".into()));
    v.push(("RUNNEL_POOL_MIN".into(), "1".into()));
    v.push(("RUNNEL_POOL_MAX".into(), "1".into()));
    let runnel = Runnel::start(v).await;
    let goaway = "runnel_pool_discards_total{reason=\"goaway\"}";
    runnel
        .metrics_until("the GOAWAY connection retired", |m| series(m, goaway) >= 1)
        .await;
    let reply = exchange(runnel.addr, b"after goaway")
        .await
        .expect("the downstream connection failed");
    assert!(
        reply.ends_with(b"after goaway"),
        "not echoed by a live connection: {reply:?}"
    );
}
