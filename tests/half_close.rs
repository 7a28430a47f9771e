//! Half-close is honoured in both directions.

mod support;

use support::gateway::{Behaviour, DEADLINE, Gateway, Runnel, pki, poll_until, read_to_end, vars};
use tokio::{io::AsyncWriteExt, net::TcpStream};

#[tokio::test]
async fn downstream_half_close_still_delivers_the_upstream_reply() {
    let pki = pki();
    let gateway = Gateway::start(
        pki.gateway_tls(&[b"http/1.1"]).unwrap(),
        Behaviour::CountThenReply,
    )
    .await;
    let runnel = Runnel::start(vars(&pki, gateway.addr)).await;
    let mut stream = TcpStream::connect(runnel.addr).await.unwrap();
    stream.write_all(&vec![7u8; 100_000]).await.unwrap();
    stream.shutdown().await.unwrap();
    let reply = tokio::time::timeout(DEADLINE, read_to_end(&mut stream))
        .await
        .unwrap()
        .expect("clean end");
    assert_eq!(reply, b"received 100000");
}

#[tokio::test]
async fn upstream_half_close_still_lets_the_downstream_send() {
    let pki = pki();
    let behaviour = Behaviour::ReplyThenHalfClose(b"server speaks and closes its side".to_vec());
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), behaviour).await;
    let runnel = Runnel::start(vars(&pki, gateway.addr)).await;
    let mut stream = TcpStream::connect(runnel.addr).await.unwrap();
    stream.write_all(b"first").await.unwrap();
    // The upstream's close_notify arrives downstream as a clean FIN...
    let reply = tokio::time::timeout(DEADLINE, read_to_end(&mut stream))
        .await
        .unwrap()
        .expect("clean FIN");
    assert_eq!(reply, b"server speaks and closes its side");
    // ...while the downstream can still send.
    stream.write_all(b" and more after the FIN").await.unwrap();
    stream.shutdown().await.unwrap();
    poll_until(|| {
        let received = gateway
            .data_conns()
            .first()
            .map(|s| s.received.clone())
            .unwrap_or_default();
        match received == b"first and more after the FIN" {
            true => Ok(()),
            false => Err(format!(
                "gateway got {:?}",
                String::from_utf8_lossy(&received)
            )),
        }
    })
    .await;
}
