//! What runnel writes to its logs: the access log, a refused reload said once, and
//! never a secret.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{
    gateway::{Behaviour, DEADLINE, Gateway, pki, poll_until, read_to_end},
    process::{TempDir, field, http_get},
};
use tokio::{io::AsyncWriteExt, net::TcpStream};

fn json_lines(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

use support::gateway::serve_binary as serve;

fn base(pki: &runnel::demo::Pki, gateway: std::net::SocketAddr) -> Vec<(String, String)> {
    support::gateway::binary_vars(pki, gateway, &[("RUNNEL_METRICS_ADDR", "127.0.0.1:0")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_writes_one_line_per_closed_connection() {
    let pki = pki();
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), Behaviour::Echo).await;
    let mut vars = base(&pki, gateway.addr);
    vars.push(("RUNNEL_ACCESS_LOG".into(), "on".into()));
    let (runnel, listening) = serve(vars).await;
    let mut s = TcpStream::connect(listening.listen).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(
        read_to_end(&mut s).await.unwrap(),
        b"GET / HTTP/1.1\r\n\r\n"
    );
    let line = poll_until(|| {
        json_lines(&runnel.stderr())
            .into_iter()
            .find(|l| field(l, "message").and_then(Value::as_str) == Some("connection closed"))
            .ok_or_else(|| format!("no access log line: {:?}", runnel.stderr()))
    })
    .await;
    let get = |k: &str| field(&line, k).cloned().unwrap_or(Value::Null);
    assert_eq!(get("severity"), "INFO", "{line}");
    assert_eq!(get("outcome"), "clean", "{line}");
    assert_eq!(get("bytes_to_upstream"), 18, "{line}");
    assert_eq!(get("bytes_to_downstream"), 18, "{line}");
    assert_eq!(get("closed_first"), "downstream", "{line}");
    assert_eq!(get("alpn"), "http/1.1", "{line}");
    assert_eq!(get("upstream_addr"), gateway.addr.to_string(), "{line}");
    assert_eq!(get("tls_version"), "TLSv1_3", "{line}");
    assert!(
        get("tls_group")
            .as_str()
            .is_some_and(|g| g.contains("X25519")),
        "{line}"
    );
    assert!(
        get("tls_resumed").is_boolean() && get("pool_hit").is_boolean(),
        "{line}"
    );
    assert!(
        get("downstream_addr")
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{line}"
    );
    assert!(get("duration_ms").is_number(), "{line}");
    let lines = json_lines(&runnel.stderr());
    let count = lines
        .iter()
        .filter(|l| field(l, "message").and_then(Value::as_str) == Some("connection closed"))
        .count();
    assert_eq!(count, 1, "one line per connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_access_log_closed_connections_stay_out_of_info_logs() {
    let pki = pki();
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), Behaviour::Echo).await;
    let (mut runnel, listening) = serve(base(&pki, gateway.addr)).await;
    let mut s = TcpStream::connect(listening.listen).await.unwrap();
    s.write_all(b"x").await.unwrap();
    s.shutdown().await.unwrap();
    read_to_end(&mut s).await.unwrap();
    runnel.signal("TERM");
    let stderr = tokio::task::spawn_blocking(move || {
        runnel.wait_exit(DEADLINE);
        runnel.stderr()
    })
    .await
    .unwrap();
    assert!(
        stderr.iter().any(|l| l.contains("\"stopped\"")),
        "{stderr:?}"
    );
    assert!(
        !stderr.iter().any(|l| l.contains("connection closed")),
        "{stderr:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_reload_is_logged_once_however_often_it_is_retried() {
    let pki = pki();
    let dir = TempDir::new("logs-reload");
    pki.write_to(dir.path()).unwrap();
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), Behaviour::Echo).await;
    let mut vars = support::gateway::file_vars(dir.path(), gateway.addr);
    vars.push(("RUNNEL_LISTEN".into(), "127.0.0.1:0".into()));
    vars.push(("RUNNEL_METRICS_ADDR".into(), "127.0.0.1:0".into()));
    vars.push(("RUNNEL_TLS_RELOAD_INTERVAL".into(), "50ms".into()));
    let (runnel, listening) = serve(vars).await;
    let other = pki.issue_client("other", None).unwrap();
    std::fs::write(dir.path().join("client.pem.new"), &other.cert_pem).unwrap();
    std::fs::rename(
        dir.path().join("client.pem.new"),
        dir.path().join("client.pem"),
    )
    .unwrap();
    let metrics = listening.metrics.unwrap();
    let errors = move || {
        let (_, body) = http_get(metrics, "/metrics", DEADLINE).unwrap();
        body.lines()
            .find_map(|l| l.strip_prefix("runnel_tls_reloads_total{result=\"error\"} "))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Forced retries (SIGHUP) count each time.
    let mut seen = 0.0;
    let deadline = std::time::Instant::now() + DEADLINE;
    while seen < 4.0 {
        if seen >= 1.0 {
            runnel.signal("HUP");
        }
        seen = tokio::task::spawn_blocking(errors).await.unwrap();
        assert!(
            std::time::Instant::now() < deadline,
            "errors counted: {seen}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused: Vec<String> = runnel
        .stderr()
        .into_iter()
        .filter(|l| l.contains("TLS reload refused"))
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        refused[0].contains("key does not match the certificate"),
        "{}",
        refused[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_inline_tls_material_is_logged_and_the_tunnel_keeps_serving() {
    let pki = pki();
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), Behaviour::Echo).await;
    // binary_vars gives the TLS material inline (RUNNEL_TLS_*_PEM): nothing to reload.
    let (mut runnel, listening) = serve(base(&pki, gateway.addr)).await;
    runnel.signal("HUP");
    poll_until(|| {
        let stderr = runnel.stderr();
        match stderr.iter().any(|l| l.contains("nothing to reload")) {
            true => Ok(()),
            false => Err(format!("no word of the SIGHUP: {stderr:?}")),
        }
    })
    .await;
    assert_eq!(runnel.try_status(), None, "SIGHUP ended runnel");
    let mut s = TcpStream::connect(listening.listen).await.unwrap();
    s.write_all(b"after the hangup").await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut s).await.unwrap(), b"after the hangup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_logs() {
    let pki = pki();
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), Behaviour::Echo).await;
    let mut vars = base(&pki, gateway.addr);
    vars.push(("RUNNEL_ACCESS_LOG".into(), "on".into()));
    vars.push(("RUNNEL_LOG".into(), "trace".into()));
    let (mut runnel, listening) = serve(vars).await;
    let mut s = TcpStream::connect(listening.listen).await.unwrap();
    s.write_all(b"hello").await.unwrap();
    s.shutdown().await.unwrap();
    read_to_end(&mut s).await.unwrap();
    runnel.signal("TERM");
    let status = tokio::task::spawn_blocking(move || {
        let status = runnel.wait_exit(DEADLINE);
        (status, runnel.stderr())
    })
    .await
    .unwrap();
    let all = status.1.join("\n");
    assert!(!all.is_empty());
    let key_body: String = pki
        .client
        .key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    for needle in ["PRIVATE KEY", &key_body[..24.min(key_body.len())]] {
        assert!(!all.contains(needle), "{needle:?} found in the logs");
    }
}
