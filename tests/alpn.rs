//! ALPN auto: the h2c preface offers h2, anything else http/1.1; never both.

mod support;

use runnel::detect::H2_PREFACE;
use support::gateway::{Behaviour, Gateway, Runnel, exchange, pki, vars};

async fn alpn_seen_for(
    first_bytes: &[u8],
    extra_vars: &[(&str, &str)],
    gateway_alpn: &[&[u8]],
) -> (Option<Vec<u8>>, Vec<u8>) {
    let pki = pki();
    let gateway = Gateway::start(pki.gateway_tls(gateway_alpn).unwrap(), Behaviour::Echo).await;
    let mut v = vars(&pki, gateway.addr);
    v.extend(
        extra_vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let runnel = Runnel::start(v).await;
    let echoed = exchange(runnel.addr, first_bytes)
        .await
        .unwrap_or_else(|(_, b)| b);
    (
        gateway.data_conns().first().and_then(|s| s.alpn.clone()),
        echoed,
    )
}

#[tokio::test]
async fn h2c_preface_makes_the_gateway_see_h2() {
    let mut bytes = H2_PREFACE.to_vec();
    bytes.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    let (alpn, echoed) = alpn_seen_for(&bytes, &[], &[b"h2", b"http/1.1"]).await;
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(echoed, bytes);
}

#[tokio::test]
async fn http1_request_makes_the_gateway_see_http1_even_when_it_prefers_h2() {
    let bytes = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
    let (alpn, echoed) = alpn_seen_for(bytes, &[], &[b"h2", b"http/1.1"]).await;
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(echoed, bytes);
}

#[tokio::test]
async fn alpn_none_offers_nothing() {
    let (alpn, _) = alpn_seen_for(
        b"GET / HTTP/1.1\r\n\r\n",
        &[("RUNNEL_ALPN", "none")],
        &[b"h2", b"http/1.1"],
    )
    .await;
    assert_eq!(alpn, None);
}

#[tokio::test]
async fn alpn_list_is_sent_as_is() {
    let (alpn, _) = alpn_seen_for(b"hello", &[("RUNNEL_ALPN", "x-custom")], &[b"x-custom"]).await;
    assert_eq!(alpn.as_deref(), Some(&b"x-custom"[..]));
}

#[tokio::test]
async fn sni_is_the_configured_server_name() {
    let pki = pki();
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), Behaviour::Echo).await;
    let runnel = Runnel::start(vars(&pki, gateway.addr)).await;
    exchange(runnel.addr, b"x").await.unwrap();
    assert_eq!(
        gateway.seen()[0].sni.as_deref(),
        Some(runnel::demo::GATEWAY_NAME)
    );
}

#[tokio::test]
async fn without_a_pool_the_second_connection_resumes_the_tls_session() {
    let pki = pki();
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), Behaviour::Echo).await;
    let mut v = vars(&pki, gateway.addr);
    v.push(("RUNNEL_POOL_MAX".into(), "0".into()));
    v.push(("RUNNEL_POOL_MIN".into(), "0".into()));
    let runnel = Runnel::start(v).await;
    runnel.wait_ready().await;
    for _ in 0..3 {
        exchange(runnel.addr, b"GET / HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
    }
    // The first handshake (start-up's reachability check) is full; every later one resumes.
    let resumed: Vec<bool> = gateway.seen().iter().map(|s| s.resumed).collect();
    assert_eq!(resumed.len(), 4, "{resumed:?}");
    assert_eq!(resumed, [false, true, true, true]);
}
