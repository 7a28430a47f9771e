//! SIGTERM: stop accepting at once, let in-flight transfers finish within the drain
//! timeout, reset what outlives it, and exit.

mod support;

use std::{
    io::ErrorKind,
    net::SocketAddr,
    time::{Duration, Instant},
};

use support::{
    gateway::{Behaviour, DEADLINE, Gateway, pki, read_to_end},
    process::Runnel,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const MIB: usize = 1024 * 1024;

async fn serve(pki: &runnel::demo::Pki, gateway: SocketAddr, drain: &str) -> (Runnel, SocketAddr) {
    let vars = support::gateway::binary_vars(pki, gateway, &[("RUNNEL_DRAIN_TIMEOUT", drain)]);
    let (runnel, listening) = support::gateway::serve_binary(vars).await;
    (runnel, listening.listen)
}

/// Polls until a connect to `addr` is refused.
async fn wait_until_refused(addr: SocketAddr) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match TcpStream::connect(addr).await {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => return,
            _ => assert!(
                Instant::now() < deadline,
                "new connections still accepted after SIGTERM"
            ),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_100_mib_transfer_finish_and_refuses_new_connections() {
    let pki = pki();
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), Behaviour::Echo).await;
    let (mut runnel, addr) = serve(&pki, gateway.addr, "60s").await;

    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let (sent_some, sent_some_rx) = tokio::sync::oneshot::channel();
    let (go_on, go_on_rx) = tokio::sync::oneshot::channel::<()>();
    let writer = tokio::spawn(async move {
        let chunk = vec![0x5au8; MIB];
        for _ in 0..10 {
            wr.write_all(&chunk).await.unwrap();
        }
        sent_some.send(()).unwrap();
        go_on_rx.await.unwrap();
        for _ in 10..100 {
            wr.write_all(&chunk).await.unwrap();
        }
        wr.shutdown().await.unwrap();
    });
    let reader = tokio::spawn(async move {
        let mut total = 0usize;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) => return Ok(total),
                Ok(n) => {
                    assert!(buf[..n].iter().all(|b| *b == 0x5a), "corrupt bytes");
                    total += n;
                }
                Err(e) => return Err((e.kind(), total)),
            }
        }
    });
    sent_some_rx.await.unwrap();
    runnel.signal("TERM");
    wait_until_refused(addr).await;
    go_on.send(()).unwrap();
    writer.await.unwrap();
    let received = tokio::time::timeout(DEADLINE * 2, reader)
        .await
        .expect("transfer stalled")
        .unwrap();
    assert_eq!(received, Ok(100 * MIB));
    let status = tokio::task::spawn_blocking(move || runnel.wait_exit(DEADLINE))
        .await
        .unwrap();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "runnel did not exit cleanly after the drain"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_that_outlives_the_drain_deadline_is_reset() {
    let pki = pki();
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), Behaviour::Echo).await;
    let (mut runnel, addr) = serve(&pki, gateway.addr, "1s").await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"a transfer that never ends")
        .await
        .unwrap();
    let mut echo = [0u8; 26];
    stream.read_exact(&mut echo).await.unwrap();
    let signalled = Instant::now();
    runnel.signal("TERM");
    let end = tokio::time::timeout(DEADLINE, read_to_end(&mut stream))
        .await
        .expect("not reset");
    assert!(
        matches!(end, Err((ErrorKind::ConnectionReset, _))),
        "got {end:?}"
    );
    assert!(
        signalled.elapsed() >= Duration::from_millis(900),
        "reset before the drain deadline"
    );
    let status = tokio::task::spawn_blocking(move || runnel.wait_exit(DEADLINE))
        .await
        .unwrap();
    assert!(status.is_some(), "runnel did not exit");
}
