//! The pool of pre-handshaken upstream connections.

mod support;

use std::time::Duration;

use support::gateway::{
    Behaviour, DEADLINE, Gateway, Poke, Runnel, eventually, exchange, pki, read_to_end, vars,
};
use tokio::{io::AsyncWriteExt, net::TcpStream};

async fn echo_once(runnel: &Runnel, bytes: &[u8]) {
    assert_eq!(exchange(runnel.addr, bytes).await.unwrap(), bytes);
}

async fn pooled(gateway: &Gateway, min: usize) -> Runnel {
    let pki_vars = vars(gateway.pki.as_ref().unwrap(), gateway.addr);
    let mut v = pki_vars;
    v.push(("RUNNEL_POOL_MIN".into(), min.to_string()));
    v.push(("RUNNEL_ALPN".into(), "none".into()));
    Runnel::start(v).await
}

#[tokio::test]
async fn pool_warms_to_its_minimum_before_ready() {
    let gateway = Gateway::start_with_pki(pki(), Behaviour::Echo).await;
    let runnel = pooled(&gateway, 3).await;
    runnel.wait_ready().await;
    eventually("3 pooled connections", || gateway.seen().len() == 3).await;
    let metrics = runnel.metrics().await;
    assert!(
        metrics.contains("runnel_pool_idle_connections{alpn=\"fixed\"} 3"),
        "{metrics}"
    );
}

#[tokio::test]
async fn checkout_uses_a_pooled_connection_without_a_new_handshake() {
    let gateway = Gateway::start_with_pki(pki(), Behaviour::Echo).await;
    let runnel = pooled(&gateway, 2).await;
    eventually("2 pooled connections", || gateway.seen().len() == 2).await;
    echo_once(&runnel, b"through the pool").await;
    let seen = gateway.seen();
    let used = seen.iter().position(|s| !s.received.is_empty()).unwrap();
    assert!(
        used < 2,
        "the bytes went over connection {used}, made after the request"
    );
    // Refilled one for one.
    eventually("refill", || gateway.seen().len() == 3).await;
}

#[tokio::test]
async fn second_and_later_pooled_connections_resume() {
    let gateway = Gateway::start_with_pki(pki(), Behaviour::Echo).await;
    let runnel = pooled(&gateway, 4).await;
    eventually("4 pooled connections", || gateway.seen().len() == 4).await;
    let resumed: Vec<bool> = gateway.seen().iter().map(|s| s.resumed).collect();
    assert_eq!(resumed, [false, true, true, true]);
    drop(runnel);
}

#[tokio::test]
async fn pooled_connection_closed_by_the_gateway_is_never_handed_out_and_is_replaced() {
    for poke in [Poke::Close, Poke::Garbage] {
        let gateway = Gateway::start_with_pki(pki(), Behaviour::Echo).await;
        let runnel = pooled(&gateway, 2).await;
        eventually("2 pooled connections", || gateway.seen().len() == 2).await;
        runnel.wait_ready().await;
        gateway.poke_idle(poke);
        // Both are retired and replaced by fresh ones.
        eventually("replacements", || gateway.seen().len() >= 4).await;
        let metrics = runnel.metrics().await;
        let reason = match poke {
            Poke::Close => "closed",
            Poke::Garbage => "unexpected_data",
        };
        assert!(
            metrics.contains(&format!(
                "runnel_pool_discards_total{{reason=\"{reason}\"}} 2"
            )),
            "{poke:?}:\n{metrics}"
        );
        echo_once(&runnel, b"still fine").await;
        let seen = gateway.seen();
        let used = seen.iter().position(|s| !s.received.is_empty()).unwrap();
        assert!(used >= 2, "{poke:?}: a poked connection was handed out");
    }
}

#[tokio::test]
async fn a_gateway_that_rejects_the_client_certificate_gets_nothing_admitted() {
    // The gateway trusts another CA for client certificates: under TLS 1.3 runnel's
    // handshake completes, then the gateway's alert arrives.
    let ours = pki();
    let theirs = pki();
    let tls = runnel::demo::gateway_tls(&theirs.ca_cert_pem, &ours.gateway, &[]).unwrap();
    let gateway = Gateway::start(tls, Behaviour::Echo).await;
    let mut v = vars(&ours, gateway.addr);
    v.push(("RUNNEL_ALPN".into(), "none".into()));
    let runnel = Runnel::start(v).await;
    let rejected = |m: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix("runnel_pool_discards_total{reason=\"rejected\"} "))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let metrics = runnel
        .metrics_until("two rejections", |m| rejected(m) >= 2)
        .await;
    assert!(
        metrics.contains("runnel_pool_idle_connections{alpn=\"fixed\"} 0"),
        "{metrics}"
    );
    let ready = runnel.ready().await;
    assert!(
        !ready,
        "ready although every connection is rejected:\n{}",
        runnel.metrics().await
    );
    // A downstream connection then connects on the spot and meets the same refusal:
    // it is reset, and counted as a failed handshake.
    let mut down = tokio::net::TcpStream::connect(runnel.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut down, b"hello")
        .await
        .unwrap();
    let end = tokio::time::timeout(DEADLINE, support::gateway::read_to_end(&mut down))
        .await
        .unwrap();
    assert!(end.is_err(), "a refused connection ended cleanly: {end:?}");
    let closed = "runnel_downstream_connections_closed_total{outcome=\"handshake_failed\"} 1";
    let metrics = runnel.metrics_until(closed, |m| m.contains(closed)).await;
    assert!(
        metrics.contains("runnel_upstream_errors_total{kind=\"certificate_rejected\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn drain_closes_idle_pooled_connections_with_close_notify() {
    let gateway = Gateway::start_with_pki(pki(), Behaviour::Echo).await;
    let mut runnel = pooled(&gateway, 3).await;
    eventually("3 pooled connections", || gateway.seen().len() == 3).await;
    runnel.stop();
    eventually("all closed with close_notify", || {
        gateway.seen().iter().all(|s| s.ended_clean == Some(true))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misses_grow_the_pool_at_once() {
    let gateway = Gateway::start_with_pki(pki(), Behaviour::Echo).await;
    let mut v = vars(gateway.pki.as_ref().unwrap(), gateway.addr);
    v.push(("RUNNEL_POOL_MIN".into(), "1".into()));
    v.push(("RUNNEL_POOL_MAX".into(), "8".into()));
    v.push(("RUNNEL_ALPN".into(), "none".into()));
    let runnel = Runnel::start(v).await;
    runnel.wait_ready().await;
    let burst: Vec<_> = (0..20u8)
        .map(|i| {
            let addr = runnel.addr;
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                s.write_all(&[i; 100]).await.unwrap();
                s.shutdown().await.unwrap();
                assert_eq!(read_to_end(&mut s).await.unwrap(), vec![i; 100]);
            })
        })
        .collect();
    for t in burst {
        tokio::time::timeout(DEADLINE, t).await.unwrap().unwrap();
    }
    let m = runnel.metrics().await;
    let target: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("runnel_pool_target_connections{alpn=\"fixed\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(
        target >= 4.0,
        "target {target} after a burst of 20 against a pool of 1:\n{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_gateway_that_speaks_first_still_gets_pooled_and_its_preface_reaches_the_downstream()
{
    let pki = pki();
    const SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];
    let tls = pki.gateway_tls(&[b"h2"]).unwrap();
    let gateway = Gateway::start(tls, Behaviour::SpeakFirstThenEcho(SETTINGS.to_vec())).await;
    let runnel = Runnel::start(vars(&pki, gateway.addr)).await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !runnel
        .metrics()
        .await
        .contains("runnel_pool_idle_connections{alpn=\"h2\"} 2")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the h2 pool never warmed:\n{}",
            runnel.metrics().await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut s = TcpStream::connect(runnel.addr).await.unwrap();
    let preface = runnel::detect::H2_PREFACE;
    s.write_all(preface).await.unwrap();
    s.shutdown().await.unwrap();
    let got = tokio::time::timeout(DEADLINE, read_to_end(&mut s))
        .await
        .unwrap()
        .unwrap();
    let mut want = SETTINGS.to_vec();
    want.extend_from_slice(preface);
    assert_eq!(got, want, "the server's early bytes first, then the echo");
    let m = runnel.metrics().await;
    assert!(
        m.contains("runnel_pool_checkouts_total{alpn=\"h2\",result=\"hit\"} 1"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_closes_pooled_connections_at_once_is_redialled_with_backoff() {
    // Each connection is admitted (tickets arrive), then closed 100 ms later: without
    // backoff the pool would redial two connections every 100 ms, forever.
    let gateway =
        Gateway::start_with_pki(pki(), Behaviour::CloseAfter(Duration::from_millis(100))).await;
    let _runnel = pooled(&gateway, 2).await;
    eventually("a first pooled connection", || !gateway.seen().is_empty()).await;
    // A window of real time to count dials in (not a wait for readiness): a tight
    // loop would dial about 60 times in it, backoff about 10.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let dialled = gateway.seen().len();
    assert!(
        dialled <= 20,
        "{dialled} connections in 3 s to a gateway that closes them at once"
    );
}
