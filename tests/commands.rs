//! `runnel check` and `runnel demo`, as a user runs them.

mod support;

use std::time::Duration;

use support::{
    gateway::{Behaviour, Gateway, pki},
    process::{Finished, Process, Runnel, TempDir, http_get, peer, run_to_exit},
};

const TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `runnel check` against `gateway` with `pki`'s CA and client identity, inline.
async fn check(pki: &runnel::demo::Pki, gateway: std::net::SocketAddr) -> Finished {
    let vars = [
        ("RUNNEL_UPSTREAM", gateway.to_string()),
        ("RUNNEL_SERVER_NAME", runnel::demo::GATEWAY_NAME.to_owned()),
        ("RUNNEL_TLS_CA_PEM", pki.ca_cert_pem.clone()),
        ("RUNNEL_TLS_CERT_PEM", pki.client.cert_pem.clone()),
        ("RUNNEL_TLS_KEY_PEM", pki.client.key_pem.clone()),
    ];
    tokio::task::spawn_blocking(move || {
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        run_to_exit(&["check"], &vars, TIMEOUT)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_prints_what_the_handshake_negotiated() {
    let pki = pki();
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), Behaviour::Echo).await;
    let finished = check(&pki, gateway.addr).await;
    assert_eq!(finished.status.code(), Some(0), "{:?}", finished.stderr);
    let out = finished.stdout.join("\n");
    for expected in [
        "tls version       TLSv1_3",
        "key exchange      X25519MLKEM768",
        "alpn              http/1.1",
        "gateway SANs",
        "gateway.runnel.test",
        "client cert until",
        "handshake time",
    ] {
        assert!(out.contains(expected), "{expected:?} missing from:\n{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_when_the_gateway_rejects_the_client_certificate_after_the_handshake() {
    // The gateway trusts another CA for client certificates: under TLS 1.3 the
    // client's handshake completes, and the refusal comes after.
    let ours = pki();
    let theirs = pki();
    let tls = runnel::demo::gateway_tls(&theirs.ca_cert_pem, &ours.gateway, &[]).unwrap();
    let gateway = Gateway::start(tls, Behaviour::Echo).await;
    let finished = check(&ours, gateway.addr).await;
    assert_eq!(finished.status.code(), Some(1), "{:?}", finished.stdout);
    assert!(
        finished
            .stderr
            .iter()
            .any(|l| l.starts_with("check failed: ")
                && l.contains("right after the handshake")
                && l.contains("RUNNEL_TLS_CERT_")),
        "{:?}",
        finished.stderr
    );
}

#[test]
fn check_against_nothing_fails_with_the_reason() {
    let pki = pki();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let upstream = format!("127.0.0.1:{port}");
    let vars = [
        ("RUNNEL_UPSTREAM", upstream.as_str()),
        ("RUNNEL_SERVER_NAME", "gateway.runnel.test"),
        ("RUNNEL_TLS_CA_PEM", &pki.ca_cert_pem),
        ("RUNNEL_TLS_CERT_PEM", &pki.client.cert_pem),
        ("RUNNEL_TLS_KEY_PEM", &pki.client.key_pem),
    ];
    let finished = run_to_exit(&["check"], &vars, TIMEOUT);
    assert_eq!(finished.status.code(), Some(1));
    assert!(
        finished
            .stderr
            .iter()
            .any(|l| l.starts_with("check failed: ") && l.contains("TCP connect")),
        "{:?}",
        finished.stderr
    );
}

/// Starts `runnel demo` on ephemeral ports; returns it and the address its first curl
/// line names.
fn demo() -> (Runnel, String) {
    let demo = Runnel::spawn(
        &[
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
        ],
        &[],
    );
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(addr) = demo.stdout().iter().find_map(|l| {
            l.trim()
                .strip_prefix("curl http://")
                .and_then(|r| r.strip_suffix('/'))
                .map(str::to_owned)
        }) {
            return (demo, addr);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "demo printed no curl line: {:?} {:?}",
            demo.stdout(),
            demo.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn demo_serves_a_page_naming_the_client_identity() {
    let (mut demo, addr) = demo();
    let (status, body) = http_get(addr.parse().unwrap(), "/", TIMEOUT).unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("client identity: spiffe://cluster.local/ns/runnel/sa/runnel"),
        "{body}"
    );
    demo.signal("TERM");
    assert_eq!(demo.wait_exit(TIMEOUT).and_then(|s| s.code()), Some(0));
}

#[test]
fn unresolvable_upstream_is_not_fatal_at_start_up() {
    let pki = pki();
    let vars = [
        ("RUNNEL_UPSTREAM", "gateway.does-not-exist.invalid:443"),
        ("RUNNEL_TLS_CA_PEM", pki.ca_cert_pem.as_str()),
        ("RUNNEL_TLS_CERT_PEM", &pki.client.cert_pem),
        ("RUNNEL_TLS_KEY_PEM", &pki.client.key_pem),
        ("RUNNEL_LISTEN", "127.0.0.1:0"),
        ("RUNNEL_METRICS_ADDR", "127.0.0.1:0"),
    ];
    let (mut runnel, listening) = Runnel::serve(&vars);
    let (status, _) = http_get(listening.metrics.unwrap(), "/healthz", TIMEOUT).unwrap();
    assert_eq!(status, 200);
    // A connection is reset promptly, not left hanging.
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(listening.listen).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut buf = [0u8; 16];
    let end = s.read(&mut buf);
    assert!(
        matches!(&end, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{end:?}"
    );
    runnel.signal("TERM");
    assert_eq!(runnel.wait_exit(TIMEOUT).and_then(|s| s.code()), Some(0));
}

/// Runs a peer program to its end; its stdout, after checking it exited 0.
fn run_peer(name: &str, program: &std::path::Path, args: &[&str]) -> String {
    let mut command = std::process::Command::new(program);
    command.args(args);
    let finished = Process::spawn(name, command).finish(TIMEOUT);
    assert_eq!(
        finished.status.code(),
        Some(0),
        "{name} {args:?}: {:?} {:?}",
        finished.stdout,
        finished.stderr
    );
    finished.stdout.join("\n")
}

#[test]
fn demo_answers_http1_and_h2_and_names_the_protocol_it_saw() {
    let Some(curl) = peer("TEST_CURL_BIN", "curl") else {
        return;
    };
    let (mut demo, addr) = demo();
    let url = format!("http://{addr}/");
    // The lines the demo prints, as a user would paste them.
    let printed = demo.stdout().join("\n");
    assert!(
        printed.contains(&format!("curl --http2-prior-knowledge {url}")),
        "{printed}"
    );
    let identity = "client identity: spiffe://cluster.local/ns/runnel/sa/runnel";
    let curl_get = |flag: &str| run_peer("curl", &curl, &["-sS", "--max-time", "20", flag, &url]);
    let http1 = curl_get("--http1.1");
    assert!(http1.contains("protocol: HTTP/1.1"), "{http1}");
    assert!(
        http1.contains("alpn http/1.1") && http1.contains(identity),
        "{http1}"
    );
    let h2 = curl_get("--http2-prior-knowledge");
    assert!(h2.contains("protocol: HTTP/2"), "{h2}");
    assert!(h2.contains("alpn h2") && h2.contains(identity), "{h2}");

    // A request body four times the initial window: the gateway must hand the window
    // back as it reads, or the upload stalls.
    let dir = TempDir::new("demo-h2-upload");
    let body = dir.path().join("body");
    std::fs::write(&body, vec![b'x'; 4 * 65_536]).unwrap();
    let upload = format!("@{}", body.display());
    let posted = run_peer(
        "curl",
        &curl,
        &[
            "-sS",
            "--max-time",
            "20",
            "--http2-prior-knowledge",
            "--data-binary",
            &upload,
            &url,
        ],
    );
    assert!(posted.contains("protocol: HTTP/2"), "{posted}");

    // nghttp, stricter than curl: three requests as three streams on one connection;
    // then one with a 15-byte stream window (-w 4), so the reply waits for WINDOW_UPDATEs.
    if let Some(nghttp) = peer("TEST_NGHTTP_BIN", "nghttp") {
        let urls = [url.clone(), format!("{url}a"), format!("{url}b")];
        let mut args = vec!["-t", "20"];
        args.extend(urls.iter().map(String::as_str));
        let out = run_peer("nghttp", &nghttp, &args);
        assert_eq!(out.matches("protocol: HTTP/2").count(), 3, "{out}");
        let out = run_peer("nghttp", &nghttp, &["-t", "20", "-w", "4", &url]);
        assert!(
            out.contains("protocol: HTTP/2") && out.contains(identity),
            "{out}"
        );
    }
    demo.signal("TERM");
    assert_eq!(demo.wait_exit(TIMEOUT).and_then(|s| s.code()), Some(0));
}
