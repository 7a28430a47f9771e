//! The idle timeout closes a pair with no bytes either way, and only then.

mod support;

use std::time::{Duration, Instant};

use support::gateway::{Behaviour, DEADLINE, Gateway, Runnel, pki, read_to_end, vars};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

#[tokio::test]
async fn idle_pair_is_closed_after_the_idle_timeout_but_not_while_bytes_flow() {
    let pki = pki();
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), Behaviour::Echo).await;
    let mut v = vars(&pki, gateway.addr);
    v.push(("RUNNEL_IDLE_TIMEOUT".into(), "400ms".into()));
    let runnel = Runnel::start(v).await;
    let mut stream = TcpStream::connect(runnel.addr).await.unwrap();
    // Keep it busy for well over the timeout: one byte every 100 ms.
    let busy_until = Instant::now() + Duration::from_millis(1200);
    let mut byte = [0u8; 1];
    let quiet_since = loop {
        stream.write_all(b"k").await.unwrap();
        stream.read_exact(&mut byte).await.unwrap();
        let last_byte = Instant::now();
        if last_byte > busy_until {
            break last_byte;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let end = tokio::time::timeout(DEADLINE, read_to_end(&mut stream))
        .await
        .unwrap();
    assert_eq!(end, Ok(Vec::new()), "an idle close is a clean close");
    assert!(
        quiet_since.elapsed() >= Duration::from_millis(350),
        "closed after {:?}",
        quiet_since.elapsed()
    );
}

#[tokio::test]
async fn a_downstream_that_never_speaks_is_closed_after_the_idle_timeout() {
    let pki = pki();
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), Behaviour::Echo).await;
    let mut v = vars(&pki, gateway.addr);
    v.push(("RUNNEL_IDLE_TIMEOUT".into(), "300ms".into()));
    v.push(("RUNNEL_POOL_MAX".into(), "0".into()));
    v.push(("RUNNEL_POOL_MIN".into(), "0".into()));
    let runnel = Runnel::start(v).await;
    runnel.wait_ready().await;
    let before = *gateway.accepted.lock().unwrap();
    let mut stream = TcpStream::connect(runnel.addr).await.unwrap();
    let end = tokio::time::timeout(DEADLINE, read_to_end(&mut stream))
        .await
        .unwrap();
    assert_eq!(end, Ok(Vec::new()));
    assert_eq!(
        *gateway.accepted.lock().unwrap(),
        before,
        "an upstream connection was opened"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_timeout_with_bytes_still_owed_is_a_reset_not_a_clean_end() {
    let pki = pki();
    // The gateway pushes far more than the socket buffers on the way hold.
    let push = vec![b'x'; 32 << 20];
    let gateway = Gateway::start(
        pki.gateway_tls(&[b"http/1.1"]).unwrap(),
        Behaviour::SpeakFirstThenEcho(push.clone()),
    )
    .await;
    let mut v = vars(&pki, gateway.addr);
    v.push(("RUNNEL_IDLE_TIMEOUT".into(), "300ms".into()));
    // Unpooled, so the gateway's push is not taken for unexpected data on an idle
    // pooled connection.
    v.push(("RUNNEL_POOL_MAX".into(), "0".into()));
    let runnel = Runnel::start(v).await;
    // A client that asks, half-closes, and then stops reading: the push stalls, and
    // nothing moves either way until the idle timeout.
    let mut stream = TcpStream::connect(runnel.addr).await.unwrap();
    stream.write_all(b"?").await.unwrap();
    stream.shutdown().await.unwrap();
    let closed = "runnel_downstream_connections_closed_total{outcome=\"idle_timeout_stalled\"} 1";
    runnel.metrics_until(closed, |m| m.contains(closed)).await;
    let end = tokio::time::timeout(DEADLINE, read_to_end(&mut stream))
        .await
        .unwrap();
    assert!(
        end.is_err(),
        "a stalled pair ended with a clean FIN after {} of {} bytes",
        end.map(|b| b.len()).unwrap_or(0),
        push.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_timeout_while_the_gateway_takes_nothing_is_a_reset_not_a_clean_end() {
    let pki = pki();
    // The gateway never reads: what the downstream sends piles up in the socket
    // buffers, in rustls and in runnel, and nothing moves until the idle timeout.
    let gateway = support::scripted::Scripted::bind(
        pki.gateway_tls(&[b"http/1.1"]).unwrap(),
        |_, tls| async move {
            let _held = tls;
            std::future::pending::<()>().await;
        },
    )
    .await;
    let mut v = vars(&pki, gateway.addr);
    v.push(("RUNNEL_IDLE_TIMEOUT".into(), "1s".into()));
    v.push(("RUNNEL_POOL_MAX".into(), "0".into()));
    let runnel = Runnel::start(v).await;
    let stream = TcpStream::connect(runnel.addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    // Push until the writes stall; the writer is then left blocked, and sees the end
    // first if it is a reset (a socket reports its error to one call only).
    let pusher = tokio::spawn(async move {
        let chunk = vec![b'p'; 64 * 1024];
        loop {
            if let Err(e) = wr.write_all(&chunk).await {
                return e.kind();
            }
        }
    });
    let stalled = "runnel_downstream_connections_closed_total{outcome=\"idle_timeout_stalled\"} 1";
    runnel.metrics_until(stalled, |m| m.contains(stalled)).await;
    let mut buf = [0u8; 1024];
    let end = tokio::time::timeout(DEADLINE, rd.read(&mut buf))
        .await
        .unwrap();
    let write_end = tokio::time::timeout(DEADLINE, pusher)
        .await
        .unwrap()
        .unwrap();
    assert!(
        end.is_err() || write_end == std::io::ErrorKind::ConnectionReset,
        "a pair with bytes owed to the gateway ended without a reset: read {end:?}, write {write_end:?}"
    );
}
