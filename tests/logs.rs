//! What runnel writes to its logs: the access log, a refused reload said once, never a
//! secret, an outage's warnings rate-limited, and a stderr nobody reads costs lines,
//! never the tunnel.

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_outage_logs_one_warning_per_interval_with_the_count_suppressed() {
    let pki = pki();
    // An upstream that refuses every connection: a port bound, then closed.
    let refused = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let vars = support::gateway::binary_vars(
        &pki,
        refused,
        &[
            ("RUNNEL_POOL_MAX", "0"),
            ("RUNNEL_METRICS_ADDR", "127.0.0.1:0"),
        ],
    );
    let (runnel, listening) = serve(vars).await;
    let failed = |runnel: &support::process::Runnel| -> Vec<Value> {
        json_lines(&runnel.stderr())
            .into_iter()
            .filter(|l| {
                field(l, "message").and_then(Value::as_str)
                    == Some("upstream connection failed; resetting the downstream")
            })
            .collect()
    };
    let attempt = |addr| async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"x").await.unwrap();
        // Reset once the dial fails.
        assert!(read_to_end(&mut s).await.is_err(), "not reset");
    };
    let burst = 200;
    for _ in 0..burst {
        attempt(listening.listen).await;
    }
    let lines = failed(&runnel);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(
        field(&lines[0], "suppressed"),
        Some(&Value::from(0)),
        "{}",
        lines[0]
    );
    assert_eq!(
        field(&lines[0], "kind").and_then(Value::as_str),
        Some("connect")
    );
    // The outage goes on: the next line, an interval later, counts what was left out.
    let mut more = 0;
    let second = loop {
        attempt(listening.listen).await;
        more += 1;
        let lines = failed(&runnel);
        if lines.len() > 1 {
            assert_eq!(lines.len(), 2, "{lines:?}");
            break lines[1].clone();
        }
        assert!(more < 1000, "no second line after {more} more failures");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Every failure between the two lines was suppressed and is reported (the second
    // line reaches stderr through the queue, so it may come one attempt late).
    let suppressed = field(&second, "suppressed")
        .and_then(Value::as_u64)
        .unwrap();
    assert!(
        (burst - 1..=burst + more - 2).contains(&suppressed),
        "{suppressed} suppressed after {burst} + {more} failures: {second}"
    );
    let metrics = listening.metrics.unwrap();
    let (_, body) = tokio::task::spawn_blocking(move || http_get(metrics, "/metrics", DEADLINE))
        .await
        .unwrap()
        .unwrap();
    // Every failure counted (the readiness probe's failures count too).
    let counted = body
        .lines()
        .find_map(|l| l.strip_prefix("runnel_upstream_errors_total{kind=\"connect\"} "))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap();
    assert!(
        counted >= burst + more,
        "{counted} counted of {burst} + {more}"
    );
}

/// A child whose stderr nobody reads after start-up; killed on drop.
struct Unread(std::process::Child);

impl Drop for Unread {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stderr_drops_and_counts_lines_and_never_stalls_the_tunnel() {
    use std::io::BufRead;
    let pki = pki();
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), Behaviour::Echo).await;
    let mut vars = base(&pki, gateway.addr);
    // Every connection logs dozens of lines.
    vars.push(("RUNNEL_LOG".into(), "trace".into()));
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut command = support::process::runnel_command(&[], &vars);
    command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = Unread(command.spawn().unwrap());
    let stderr = child.0.stderr.take().unwrap();
    // Read up to "listening", then never again: the pipe fills and stays full.
    let (stderr, listening) = tokio::task::spawn_blocking(move || {
        let mut reader = std::io::BufReader::new(stderr);
        let mut line = String::new();
        loop {
            line.clear();
            assert!(reader.read_line(&mut line).unwrap() > 0, "stderr closed");
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if field(&v, "message").and_then(Value::as_str) == Some("listening") {
                    return (reader, v);
                }
            }
        }
    })
    .await
    .unwrap();
    let addr = |k: &str| -> std::net::SocketAddr {
        field(&listening, k)
            .and_then(Value::as_str)
            .unwrap()
            .parse()
            .unwrap()
    };
    let (listen, metrics) = (addr("listen.addr"), addr("metrics.addr"));
    let dropped = move || {
        let (_, body) = http_get(metrics, "/metrics", DEADLINE).unwrap();
        body.lines()
            .find_map(|l| l.strip_prefix("runnel_log_lines_dropped_total "))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap()
    };
    let mut served = 0;
    while tokio::task::spawn_blocking(dropped).await.unwrap() == 0.0 {
        // Each exchange completes whatever stderr does.
        let mut s = TcpStream::connect(listen).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        s.shutdown().await.unwrap();
        let echoed = tokio::time::timeout(DEADLINE, read_to_end(&mut s)).await;
        assert_eq!(echoed.expect("tunnel stalled").unwrap(), b"ping");
        served += 1;
        assert!(served < 5000, "no line dropped after {served} connections");
    }
    drop(stderr);
}
