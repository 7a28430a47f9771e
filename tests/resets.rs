//! Truncations and resets reach the downstream as resets, never as a clean end.

mod support;

use std::io::ErrorKind;

use support::gateway::{Behaviour, DEADLINE, Gateway, Runnel, pki, read_to_end, vars};
use tokio::{io::AsyncWriteExt, net::TcpStream};

#[tokio::test]
async fn upstream_truncation_resets_the_downstream() {
    let pki = pki();
    let behaviour = Behaviour::ReplyThenTruncate(b"partial resp".to_vec());
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), behaviour).await;
    let runnel = Runnel::start(vars(&pki, gateway.addr)).await;
    let mut stream = TcpStream::connect(runnel.addr).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let end = tokio::time::timeout(DEADLINE, read_to_end(&mut stream))
        .await
        .unwrap();
    match end {
        Err((kind, _)) => assert_eq!(kind, ErrorKind::ConnectionReset),
        Ok(bytes) => panic!(
            "truncation passed off as a clean end after {} bytes",
            bytes.len()
        ),
    }
}

#[tokio::test]
async fn upstream_reset_resets_the_downstream() {
    let pki = pki();
    let gateway = Gateway::start(
        pki.gateway_tls(&[b"http/1.1"]).unwrap(),
        Behaviour::ReadThenReset,
    )
    .await;
    let runnel = Runnel::start(vars(&pki, gateway.addr)).await;
    let mut stream = TcpStream::connect(runnel.addr).await.unwrap();
    stream.write_all(b"hello").await.unwrap();
    let end = tokio::time::timeout(DEADLINE, read_to_end(&mut stream))
        .await
        .unwrap();
    assert!(
        matches!(end, Err((ErrorKind::ConnectionReset, _))),
        "got {end:?}"
    );
}

#[tokio::test]
async fn downstream_reset_resets_the_upstream() {
    let pki = pki();
    let gateway = Gateway::start(
        pki.gateway_tls(&[b"http/1.1"]).unwrap(),
        Behaviour::CountThenReply,
    )
    .await;
    let runnel = Runnel::start(vars(&pki, gateway.addr)).await;
    let stream = TcpStream::connect(runnel.addr).await.unwrap();
    let mut stream = stream;
    stream.write_all(b"some bytes").await.unwrap();
    // Wait until the gateway has the bytes, then reset the downstream.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while gateway.data_conns().first().map_or(0, |s| s.received.len()) < 10 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "bytes never reached the gateway"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    socket2::SockRef::from(&stream)
        .set_linger(Some(std::time::Duration::ZERO))
        .unwrap();
    drop(stream);
    // The gateway (CountThenReply) would reply "received 10" only on a clean close_notify;
    // a reset upstream ends its read with an error, so no reply is ever attempted. Check
    // that its connection ended: its raw byte stream holds no close_notify-driven reply.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let text = runnel.metrics().await;
        if text
            .contains("runnel_downstream_connections_closed_total{outcome=\"downstream_reset\"} 1")
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no downstream_reset outcome:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn unreachable_upstream_closes_the_downstream_promptly() {
    let pki = pki();
    // A port with nothing listening: bind, note the port, close.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let runnel = Runnel::start(vars(&pki, addr)).await;
    let mut stream = TcpStream::connect(runnel.addr).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let end = tokio::time::timeout(DEADLINE, read_to_end(&mut stream))
        .await
        .expect("downstream left hanging");
    assert!(
        matches!(end, Err((ErrorKind::ConnectionReset, ref b)) if b.is_empty()),
        "got {end:?}"
    );
}
