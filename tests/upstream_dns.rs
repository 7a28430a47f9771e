//! A DNS-named upstream: resolved by runnel (hosts file here), every address tried.

mod support;

use support::gateway::{Behaviour, Gateway, Runnel, exchange, pki, vars};

#[tokio::test]
async fn dns_named_upstream_is_resolved_and_used_as_the_server_name() {
    let pki = pki();
    // The gateway listens on 127.0.0.1 only; "localhost" may also resolve to ::1, which
    // refuses, and the next address must then be tried.
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), Behaviour::Echo).await;
    let mut v: Vec<(String, String)> = vars(&pki, gateway.addr)
        .into_iter()
        .filter(|(k, _)| k != "RUNNEL_SERVER_NAME" && k != "RUNNEL_UPSTREAM")
        .collect();
    v.push((
        "RUNNEL_UPSTREAM".into(),
        format!("localhost:{}", gateway.addr.port()),
    ));
    let runnel = Runnel::start(v).await;
    for _ in 0..3 {
        assert_eq!(exchange(runnel.addr, b"ping").await.unwrap(), b"ping");
    }
    assert_eq!(gateway.seen()[0].sni.as_deref(), Some("localhost"));
}
