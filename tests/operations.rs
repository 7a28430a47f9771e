//! Operations: certificate rotation on disk without drops, refused bad sets, and
//! `/readyz` following the certificate, the gateway and the drain.

mod support;

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, SystemTime},
};

use runnel::demo::{Leaf, Pki};
use rustls::pki_types::{CertificateDer, pem::PemObject};
use support::{
    gateway::{Behaviour, DEADLINE, Gateway, Runnel, pki, vars},
    process::TempDir,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// Replaces a file the way a Secret Manager volume does: a new file renamed over it.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn write_files(dir: &Path, pki: &Pki, client: &Leaf) {
    replace(&dir.join("ca.pem"), &pki.ca_cert_pem);
    replace(&dir.join("client.pem"), &client.cert_pem);
    replace(&dir.join("client-key.pem"), &client.key_pem);
}

fn file_vars(dir: &Path, gateway: SocketAddr, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v = support::gateway::file_vars(dir, gateway);
    v.push(("RUNNEL_TLS_RELOAD_INTERVAL".into(), "100ms".into()));
    v.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    v
}

/// The value of one series in a scrape (0 when absent).
fn series(metrics: &str, name_and_labels: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(name_and_labels)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn until_metric(runnel: &Runnel, name_and_labels: &str, at_least: f64) -> String {
    runnel
        .metrics_until(&format!("{name_and_labels} >= {at_least}"), |m| {
            series(m, name_and_labels) >= at_least
        })
        .await
}

async fn round_trip(stream: &mut TcpStream, bytes: &[u8]) {
    stream.write_all(bytes).await.unwrap();
    let mut back = vec![0u8; bytes.len()];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut back))
        .await
        .expect("stalled")
        .expect("stream dropped");
    assert_eq!(back, bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_certificate_and_key_on_disk_drops_no_stream_and_new_connections_present_the_new_certificate()
 {
    let pki = pki();
    let dir = TempDir::new("rotation");
    write_files(dir.path(), &pki, &pki.client);
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), Behaviour::Echo).await;
    let runnel = Runnel::start(file_vars(dir.path(), gateway.addr, &[])).await;
    let mut streams = Vec::new();
    for i in 0..100u32 {
        let mut s = TcpStream::connect(runnel.addr).await.unwrap();
        round_trip(&mut s, &i.to_be_bytes()).await;
        streams.push(s);
    }

    let rotated = pki.issue_client("runnel-rotated", None).unwrap();
    write_files(dir.path(), &pki, &rotated);
    until_metric(&runnel, "runnel_tls_reloads_total{result=\"ok\"}", 1.0).await;

    for (i, s) in streams.iter_mut().enumerate() {
        round_trip(s, format!("after rotation {i}").as_bytes()).await;
    }
    // New connections present the new certificate once the old pooled ones are
    // replaced (gradually, within seconds).
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let before = gateway.seen().len();
        let mut s = TcpStream::connect(runnel.addr).await.unwrap();
        round_trip(&mut s, b"new connection").await;
        let used = gateway
            .seen()
            .into_iter()
            .rfind(|c| c.received.ends_with(b"new connection"))
            .unwrap();
        if used.client_cert == Some(der(&rotated.cert_pem)) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still the old certificate ({before} handshakes seen)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = until_metric(
        &runnel,
        "runnel_pool_discards_total{reason=\"reloaded\"}",
        1.0,
    )
    .await;
    assert!(
        series(
            &m,
            "runnel_downstream_connections_closed_total{outcome=\"upstream_reset\"}"
        ) == 0.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mismatched_pair_on_disk_is_refused_and_the_old_identity_stays() {
    let pki = pki();
    let dir = TempDir::new("mismatch");
    write_files(dir.path(), &pki, &pki.client);
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), Behaviour::Echo).await;
    let runnel = Runnel::start(file_vars(
        dir.path(),
        gateway.addr,
        &[("RUNNEL_POOL_MAX", "0"), ("RUNNEL_POOL_MIN", "0")],
    ))
    .await;
    let other = pki.issue_client("other", None).unwrap();
    // The new certificate with the old key: a mismatched pair.
    replace(&dir.path().join("client.pem"), &other.cert_pem);
    let m = until_metric(&runnel, "runnel_tls_reloads_total{result=\"error\"}", 1.0).await;
    assert_eq!(series(&m, "runnel_tls_reloads_total{result=\"ok\"}"), 0.0);
    let mut s = TcpStream::connect(runnel.addr).await.unwrap();
    round_trip(&mut s, b"still served").await;
    let used = gateway
        .seen()
        .into_iter()
        .find(|c| c.received.starts_with(b"still served"))
        .unwrap();
    assert_eq!(
        used.client_cert,
        Some(der(&pki.client.cert_pem)),
        "the old identity must stay in use"
    );
    // Fix the pair: the reload then succeeds.
    replace(&dir.path().join("client-key.pem"), &other.key_pem);
    until_metric(&runnel, "runnel_tls_reloads_total{result=\"ok\"}", 1.0).await;
}

async fn until_ready(runnel: &Runnel, want: bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while runnel.ready().await != want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never became {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_false_while_the_certificate_is_within_the_minimum_validity_and_true_after_rotation()
 {
    let pki = pki();
    let dir = TempDir::new("validity");
    let short = pki
        .issue_client(
            "short",
            Some(SystemTime::now() + Duration::from_secs(2 * 86_400)),
        )
        .unwrap();
    write_files(dir.path(), &pki, &short);
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), Behaviour::Echo).await;
    let runnel = Runnel::start(file_vars(
        dir.path(),
        gateway.addr,
        &[("RUNNEL_CERT_MIN_VALIDITY", "72h")],
    ))
    .await;
    // The pool warms (the gateway is reachable), yet the certificate is too close to expiry.
    until_metric(
        &runnel,
        "runnel_pool_idle_connections{alpn=\"http/1.1\"}",
        1.0,
    )
    .await;
    assert!(
        !runnel.ready().await,
        "ready with a certificate expiring within RUNNEL_CERT_MIN_VALIDITY"
    );
    write_files(dir.path(), &pki, &pki.client);
    until_ready(&runnel, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_false_while_the_gateway_is_unreachable_and_true_once_it_answers() {
    let pki = pki();
    // Bound but not listening: the kernel refuses connections to it, and no other
    // process can take the port before the gateway listens on this same socket.
    let reserved =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    reserved
        .bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
    let addr = reserved.local_addr().unwrap().as_socket().unwrap();
    let runnel = Runnel::start(vars(&pki, addr)).await;
    let m = until_metric(
        &runnel,
        "runnel_upstream_errors_total{kind=\"connect\"}",
        1.0,
    )
    .await;
    assert!(!runnel.ready().await, "ready with no gateway:\n{m}");
    reserved.listen(128).unwrap();
    reserved.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(reserved.into()).unwrap();
    let _gateway = Gateway::start_at(
        listener,
        pki.gateway_tls(&[b"h2", b"http/1.1"]).unwrap(),
        Behaviour::Echo,
    );
    until_ready(&runnel, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_pool_an_idle_instance_probes_the_gateway_and_stays_ready() {
    // /readyz rests on the latest attempts; with no pool and no traffic, runnel makes
    // one itself about every 5 s. This test waits for one (seconds): a real interval,
    // not a readiness sleep.
    let pki = pki();
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), Behaviour::Echo).await;
    let mut v = vars(&pki, gateway.addr);
    v.push(("RUNNEL_POOL_MAX".into(), "0".into()));
    let runnel = Runnel::start(v).await;
    until_ready(&runnel, true).await;
    let first = *gateway.accepted.lock().unwrap();
    assert!(first >= 1, "ready without a handshake");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while *gateway.accepted.lock().unwrap() == first {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no probe within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(runnel.ready().await, "not ready after a probe");
    let m = runnel.metrics().await;
    assert!(
        series(
            &m,
            "runnel_upstream_handshakes_total{kind=\"resumed\",result=\"ok\"}"
        ) >= 1.0,
        "the probe did not resume:\n{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_false_while_draining() {
    let pki = pki();
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), Behaviour::Echo).await;
    let mut runnel = Runnel::start(vars(&pki, gateway.addr)).await;
    until_ready(&runnel, true).await;
    // An open connection keeps the drain going while /readyz is asked.
    let mut open = TcpStream::connect(runnel.addr).await.unwrap();
    round_trip(&mut open, b"in flight").await;
    runnel.stop();
    until_ready(&runnel, false).await;
    round_trip(&mut open, b"still in flight").await;
}
