//! A gateway runnel must not trust gets nothing: the downstream is closed and no
//! application byte reaches the gateway, encrypted or not.

mod support;

use runnel::demo::Pki;
use support::gateway::{Behaviour, DEADLINE, Gateway, Runnel, exchange, pki, read_to_end, vars};
use tokio::{io::AsyncWriteExt, net::TcpStream};

const MARKER: &[u8] = b"PLAINTEXT-MARKER-5f2c";

async fn send_marker_and_expect_close(runnel: &Runnel) {
    let mut stream = TcpStream::connect(runnel.addr).await.unwrap();
    stream.write_all(MARKER).await.unwrap();
    let end = tokio::time::timeout(DEADLINE, read_to_end(&mut stream))
        .await
        .expect("downstream left open");
    let bytes = match end {
        Ok(b) => b,
        Err((_, b)) => b,
    };
    assert!(bytes.is_empty(), "downstream got {} bytes", bytes.len());
}

#[tokio::test]
async fn gateway_certificate_from_another_ca_gets_no_bytes() {
    let ours = pki();
    let theirs = Pki::generate().unwrap();
    let gateway =
        Gateway::start(theirs.gateway_tls(&[b"http/1.1"]).unwrap(), Behaviour::Echo).await;
    let runnel = Runnel::start(vars(&ours, gateway.addr)).await;
    send_marker_and_expect_close(&runnel).await;
    assert!(gateway.seen().is_empty(), "a handshake completed");
    assert!(
        !gateway.raw_contains(MARKER),
        "plaintext reached the gateway"
    );
}

#[tokio::test]
async fn gateway_certificate_for_another_name_gets_no_bytes() {
    let pki = pki();
    let other = pki.issue_gateway(&["other.example"]).unwrap();
    let tls = runnel::demo::gateway_tls(&pki.ca_cert_pem, &other, &[b"http/1.1"]).unwrap();
    let gateway = Gateway::start(tls, Behaviour::Echo).await;
    let runnel = Runnel::start(vars(&pki, gateway.addr)).await;
    send_marker_and_expect_close(&runnel).await;
    assert!(gateway.seen().is_empty(), "a handshake completed");
    assert!(
        !gateway.raw_contains(MARKER),
        "plaintext reached the gateway"
    );
}

#[tokio::test]
async fn a_plaintext_listener_upstream_never_sees_the_downstream_bytes() {
    let pki = pki();
    // Something that answers TLS with plaintext garbage, recording what it receives.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            .await
            .unwrap();
        read_to_end(&mut s).await.unwrap_or_else(|(_, b)| b)
    });
    let runnel = Runnel::start(vars(&pki, addr)).await;
    send_marker_and_expect_close(&runnel).await;
    let got = tokio::time::timeout(DEADLINE, seen).await.unwrap().unwrap();
    assert!(
        !got.windows(MARKER.len()).any(|w| w == MARKER),
        "plaintext reached the fake gateway"
    );
    assert!(
        got.first() == Some(&0x16),
        "first byte was not a TLS handshake record"
    );
}

#[tokio::test]
async fn a_downstream_that_sends_nothing_opens_no_upstream_connection() {
    let pki = pki();
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), Behaviour::Echo).await;
    // Without a pool, every upstream connection the gateway sees was opened for a downstream.
    let mut v = vars(&pki, gateway.addr);
    v.push(("RUNNEL_POOL_MAX".into(), "0".into()));
    v.push(("RUNNEL_POOL_MIN".into(), "0".into()));
    let runnel = Runnel::start(v).await;
    runnel.wait_ready().await;
    let before = *gateway.accepted.lock().unwrap();
    for _ in 0..5 {
        let mut probe = TcpStream::connect(runnel.addr).await.unwrap();
        probe.shutdown().await.unwrap();
        assert_eq!(read_to_end(&mut probe).await.unwrap(), b"");
    }
    // A real connection afterwards is the first the gateway sees.
    assert_eq!(exchange(runnel.addr, b"x").await.unwrap(), b"x");
    assert_eq!(*gateway.accepted.lock().unwrap(), before + 1);
}
