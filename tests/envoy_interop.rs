//! runnel against the real Envoy, configured as an Istio-like ingress gateway, with real
//! clients (curl, nghttp, Python's websockets) on the downstream side.
//!
//! Each test starts its own backend, Envoy (tests/envoy/gateway.yaml) and runnel, all on
//! ephemeral ports, and stops them when it ends. The peers come from `bash tests/run.sh`
//! (`TEST_ENVOY_BIN`, `TEST_CURL_BIN`, `TEST_NGHTTP_BIN`, `TEST_PYTHON`, else `PATH`);
//! without one a test prints a loud note and passes, except under `CI=true`, where it
//! fails.

mod support;

use std::{
    ffi::OsStr,
    io::Read,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::Duration,
};

use support::{
    envoy::{Gateway, Pattern, SERVER_NAME, Sha256Sum, find_websocket_python, websocket_accept},
    process::{Finished, Listening, Process, Runnel, TempDir, peer},
};

/// A short request, end to end.
const SHORT: Duration = Duration::from_secs(30);
/// A bulk transfer, end to end (generous: debug builds on two shared cores).
const BULK: Duration = Duration::from_secs(600);
const MIB: u64 = 1024 * 1024;

#[test]
fn gateway_refuses_a_client_without_a_certificate() {
    let Some((envoy, curl)) = envoy_and_curl() else {
        return;
    };
    let gateway = Gateway::start(&envoy);
    let url = format!("https://{SERVER_NAME}:{}/hello", gateway.addr.port());
    let with_sni = direct_args(&gateway, true, true);
    assert_eq!(
        curl_ok(&curl, &with_sni, &url).stdout,
        ["hello from the backend"],
        "control: with a certificate"
    );

    let without = run_curl(&curl, &direct_args(&gateway, true, false), &url);
    assert!(
        !without.status.success(),
        "a client without a certificate got through: {without:?}"
    );
    assert_eq!(gateway.listener_counter("ssl.fail_verify_no_cert"), 1);
}

#[test]
fn gateway_refuses_a_connection_without_sni() {
    let Some((envoy, curl)) = envoy_and_curl() else {
        return;
    };
    let gateway = Gateway::start(&envoy);
    let url = format!("https://{SERVER_NAME}:{}/hello", gateway.addr.port());
    assert_eq!(
        curl_ok(&curl, &direct_args(&gateway, true, true), &url).stdout,
        ["hello from the backend"],
        "control: with SNI"
    );

    // curl sends no SNI to an IP address, and neither does rustls.
    let without = run_curl(
        &curl,
        &direct_args(&gateway, false, true),
        &format!("https://{}/hello", gateway.addr),
    );
    assert!(
        !without.status.success(),
        "a connection without SNI found a filter chain: {without:?}"
    );
    assert_eq!(gateway.listener_counter("no_filter_chain_match"), 1);
}

#[test]
fn curl_http1_get_through_runnel_is_answered_over_http1() {
    let Some((envoy, curl)) = envoy_and_curl() else {
        return;
    };
    let stack = Stack::start(&envoy);
    let out = curl_ok(
        &curl,
        &["--http1.1", "-w", "%{http_version}\n"],
        &stack.url("/hello"),
    );
    assert_eq!(out.stdout, ["hello from the backend", "1.1"]);
    let headers = curl_ok(&curl, &["--http1.1"], &stack.url("/headers"));
    assert!(
        has_line(&headers.stdout, "x-gateway-protocol: HTTP/1.1"),
        "gateway saw: {:?}",
        headers.stdout
    );
}

#[test]
fn curl_h2c_prior_knowledge_through_runnel_is_served_over_h2() {
    let Some((envoy, curl)) = envoy_and_curl() else {
        return;
    };
    let stack = Stack::start(&envoy);
    let out = curl_ok(
        &curl,
        &["--http2-prior-knowledge", "-w", "%{http_version}\n"],
        &stack.url("/hello"),
    );
    assert_eq!(out.stdout, ["hello from the backend", "2"]);
    // HTTP/2 at the gateway means runnel offered h2 (codec AUTO follows ALPN).
    let headers = curl_ok(&curl, &["--http2-prior-knowledge"], &stack.url("/headers"));
    assert!(
        has_line(&headers.stdout, "x-gateway-protocol: HTTP/2"),
        "gateway saw: {:?}",
        headers.stdout
    );
}

#[test]
fn nghttp_h2c_through_runnel_is_answered_by_the_backend() {
    let Some(envoy) = Gateway::find_envoy() else {
        return;
    };
    let Some(nghttp) = peer("TEST_NGHTTP_BIN", "nghttp") else {
        return;
    };
    let stack = Stack::start(&envoy);
    let mut command = Command::new(nghttp);
    // An http:// URI without --upgrade is HTTP/2 with prior knowledge.
    command.args(["--timeout=20", "--no-dep", &stack.url("/hello")]);
    let out = run("nghttp", command, SHORT);
    assert!(out.status.success(), "nghttp failed: {out:?}");
    assert_eq!(out.stdout, ["hello from the backend"]);
}

#[test]
fn gateway_sees_the_client_certificate_runnel_presents() {
    let Some((envoy, curl)) = envoy_and_curl() else {
        return;
    };
    let stack = Stack::start(&envoy);
    let headers = curl_ok(&curl, &[] as &[&str], &stack.url("/headers")).stdout;
    let xfcc = headers
        .iter()
        .find_map(|l| l.strip_prefix("x-forwarded-client-cert: "))
        .unwrap_or_else(|| panic!("no XFCC in {headers:?}"));
    assert!(
        xfcc.contains(&format!("URI={}", runnel::demo::CLIENT_SPIFFE_ID)),
        "XFCC {xfcc:?}"
    );
    assert!(
        has_line(
            &headers,
            &format!("x-gateway-peer-uri-san: {}", runnel::demo::CLIENT_SPIFFE_ID)
        ),
        "{headers:?}"
    );
    assert!(
        has_line(&headers, &format!("x-gateway-sni: {SERVER_NAME}")),
        "{headers:?}"
    );
}

#[test]
fn websocket_upgrade_through_runnel_echoes_messages() {
    let Some(envoy) = Gateway::find_envoy() else {
        return;
    };
    let Some(python) = find_websocket_python() else {
        return;
    };
    let stack = Stack::start(&envoy);
    let mut command = Command::new(python);
    command.args(["-c", WEBSOCKET_CLIENT, &format!("ws://{}/ws", stack.listen)]);
    let out = run("websocket client", command, SHORT);
    assert!(out.status.success(), "websocket client failed: {out:?}");
    assert_eq!(out.stdout, ["echoed 2 messages"]);
}

#[test]
fn upload_of_100_mib_over_http1_through_runnel_arrives_intact() {
    upload_100_mib("--http1.1");
}

#[test]
fn upload_of_100_mib_over_h2c_through_runnel_arrives_intact() {
    upload_100_mib("--http2-prior-knowledge");
}

#[test]
fn download_of_1_gib_over_http1_through_runnel_arrives_intact() {
    download_1_gib("--http1.1");
}

#[test]
fn download_of_1_gib_over_h2c_through_runnel_arrives_intact() {
    download_1_gib("--http2-prior-knowledge");
}

// curl 7.88 (Debian 12) cannot reuse an h2c prior-knowledge connection ("Error in the
// HTTP2 framing layer" on the second request, against a plaintext Envoy as well), so
// the multiplexed cases use nghttp, which puts every request to one authority on one
// connection.

#[test]
fn parallel_h2c_uploads_on_one_connection_through_runnel_arrive_intact() {
    let Some(envoy) = Gateway::find_envoy() else {
        return;
    };
    let Some(nghttp) = peer("TEST_NGHTTP_BIN", "nghttp") else {
        return;
    };
    let stack = Stack::start(&envoy);
    let (streams, len, seed) = (8, 16 * MIB, 3);
    let file = stack.work.path().join("upload.bin");
    Pattern::write_file(seed, len, &file).expect("write the upload");
    let expected = format!("bytes={len} sha256={}", Pattern::sha256(seed, len));

    let mut command = Command::new(nghttp);
    command.args(["--timeout=60", "--no-dep", &format!("--multiply={streams}")]);
    command
        .arg(format!("--data={}", path(&file)))
        .arg(stack.url("/upload"));
    let out = run("nghttp uploads", command, BULK);
    assert!(out.status.success(), "nghttp failed: {out:?}");
    assert_eq!(out.stdout, vec![expected; streams], "one answer per stream");
}

#[test]
fn parallel_h2c_downloads_on_one_connection_through_runnel_arrive_complete() {
    let Some(envoy) = Gateway::find_envoy() else {
        return;
    };
    let Some(nghttp) = peer("TEST_NGHTTP_BIN", "nghttp") else {
        return;
    };
    let stack = Stack::start(&envoy);
    let (streams, len) = (8, 16 * MIB);
    let mut command = Command::new(nghttp);
    command.args(["--timeout=60", "--no-dep", &format!("--multiply={streams}")]);
    command.arg(stack.url(&format!("/download?bytes={len}&seed=5")));
    // The bodies arrive interleaved on stdout, so only their total length is checked
    // here; the content of a single stream is checked by the 1 GiB download.
    let (mut process, mut stdout) = Process::spawn_raw_stdout("nghttp downloads", command);
    let received = std::io::copy(&mut stdout, &mut std::io::sink()).expect("read the bodies");
    let status = process
        .wait_exit(SHORT)
        .expect("nghttp exits after the bodies");
    assert!(
        status.success(),
        "nghttp failed ({status}): {:?}",
        process.stderr()
    );
    assert_eq!(received, streams as u64 * len);
}

#[test]
fn gateway_closes_runnel_connections_whose_sni_has_no_filter_chain() {
    let Some((envoy, curl)) = envoy_and_curl() else {
        return;
    };
    // "localhost" is in the gateway certificate, so runnel's own checks pass; only the
    // gateway's SNI match refuses it, as an Istio Gateway with other hosts would.
    let stack = Stack::start_with(&envoy, "localhost");
    let out = run_curl(&curl, &["--http1.1"], &stack.url("/hello"));
    assert!(!out.status.success(), "a request got through: {out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert!(stack.gateway.listener_counter("no_filter_chain_match") >= 1);
}

#[test]
fn websocket_accept_key_matches_the_rfc_6455_example() {
    assert_eq!(
        websocket_accept("dGhlIHNhbXBsZSBub25jZQ=="),
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
}

/// Envoy in front of the backend, and runnel in front of Envoy.
struct Stack {
    gateway: Gateway,
    listen: SocketAddr,
    /// Files a test makes (uploads), removed with the stack.
    work: TempDir,
    _runnel: Runnel,
}

impl Stack {
    fn start(envoy: &Path) -> Stack {
        Stack::start_with(envoy, SERVER_NAME)
    }

    /// As `start`, with runnel sending (and checking) `server_name`.
    fn start_with(envoy: &Path, server_name: &str) -> Stack {
        let gateway = Gateway::start(envoy);
        let upstream = gateway.addr.to_string();
        let file = |name| gateway.file(name).to_str().expect("UTF-8 path").to_owned();
        let (ca, cert, key) = (file("ca.pem"), file("client.pem"), file("client-key.pem"));
        let (runnel, Listening { listen, .. }) = Runnel::serve(&[
            ("RUNNEL_UPSTREAM", &upstream),
            ("RUNNEL_SERVER_NAME", server_name),
            ("RUNNEL_TLS_CA_FILE", &ca),
            ("RUNNEL_TLS_CERT_FILE", &cert),
            ("RUNNEL_TLS_KEY_FILE", &key),
            ("RUNNEL_LISTEN", "127.0.0.1:0"),
            ("RUNNEL_METRICS_ADDR", "127.0.0.1:0"),
            ("RUNNEL_LOG", "info"),
            ("RUNNEL_LOG_FORMAT", "json"),
            ("RUNNEL_ALPN", "auto"),
        ]);
        Stack {
            gateway,
            listen,
            work: TempDir::new("interop"),
            _runnel: runnel,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.listen)
    }
}

/// Uploads 100 MiB with curl (`protocol`: its flag) and checks the backend's count and
/// SHA-256 of what arrived.
fn upload_100_mib(protocol: &str) {
    let Some((envoy, curl)) = envoy_and_curl() else {
        return;
    };
    let stack = Stack::start(&envoy);
    let (len, seed) = (100 * MIB, 7);
    let file = stack.work.path().join("upload.bin");
    Pattern::write_file(seed, len, &file).expect("write the upload");
    let expected =
        thread::spawn(move || format!("bytes={len} sha256={}", Pattern::sha256(seed, len)));

    let mut command = curl_command(&curl, BULK);
    command.args([protocol, "-T", path(&file), &stack.url("/upload")]);
    let out = run("curl upload", command, BULK);
    assert!(out.status.success(), "curl failed: {out:?}");
    assert_eq!(out.stdout, [expected.join().expect("hashing thread")]);
}

/// Downloads 1 GiB with curl (`protocol`: its flag), hashing it as it arrives, and
/// compares with the SHA-256 of the stream the backend generates.
fn download_1_gib(protocol: &str) {
    let Some((envoy, curl)) = envoy_and_curl() else {
        return;
    };
    let stack = Stack::start(&envoy);
    let (len, seed) = (1024 * MIB, 11);
    let expected = thread::spawn(move || Pattern::sha256(seed, len));

    let mut command = curl_command(&curl, BULK);
    let url = stack.url(&format!("/download?bytes={len}&seed={seed}"));
    command.args([protocol, "-o", "-", &url]);
    let (mut process, mut stdout) = Process::spawn_raw_stdout("curl download", command);
    let (received, sha256) = hash_stream(&mut stdout);
    let status = process.wait_exit(SHORT).expect("curl exits after the body");
    assert!(
        status.success(),
        "curl failed ({status}): {:?}",
        process.stderr()
    );
    assert_eq!(received, len);
    assert_eq!(sha256, expected.join().expect("hashing thread"));
}

/// Sends a text and a 256 KiB binary message and checks each comes back unchanged;
/// every step has its own timeout.
const WEBSOCKET_CLIENT: &str = r#"
import sys
from websockets.sync.client import connect
messages = ["hello through runnel", bytes(range(256)) * 1024]
with connect(sys.argv[1], open_timeout=10, close_timeout=5, max_size=None) as ws:
    for message in messages:
        ws.send(message)
        echoed = ws.recv(timeout=10)
        if echoed != message:
            sys.exit(f"echo differs: sent {len(message)} bytes, got {len(echoed)}")
print(f"echoed {len(messages)} messages")
"#;

fn envoy_and_curl() -> Option<(PathBuf, PathBuf)> {
    Some((Gateway::find_envoy()?, peer("TEST_CURL_BIN", "curl")?))
}

/// curl arguments to reach Envoy directly: trust the test CA, optionally resolve the
/// gateway name to Envoy (so curl sends SNI), optionally present the client certificate.
fn direct_args(gateway: &Gateway, sni: bool, client_cert: bool) -> Vec<String> {
    let file = |name| path(&gateway.file(name)).to_owned();
    let mut args = vec!["--cacert".to_owned(), file("ca.pem")];
    if sni {
        args.extend([
            "--resolve".to_owned(),
            format!("{SERVER_NAME}:{}:127.0.0.1", gateway.addr.port()),
        ]);
    }
    if client_cert {
        args.extend([
            "--cert".to_owned(),
            file("client.pem"),
            "--key".to_owned(),
            file("client-key.pem"),
        ]);
    }
    args
}

fn curl_command(curl: &Path, max_time: Duration) -> Command {
    let mut command = Command::new(curl);
    command.args(["-sS", "--max-time", &max_time.as_secs().to_string()]);
    command
}

fn run_curl(curl: &Path, args: &[impl AsRef<OsStr>], url: &str) -> Finished {
    let mut command = curl_command(curl, SHORT);
    command.args(args).arg(url);
    run("curl", command, SHORT + Duration::from_secs(5))
}

fn curl_ok(curl: &Path, args: &[impl AsRef<OsStr>], url: &str) -> Finished {
    let out = run_curl(curl, args, url);
    assert!(out.status.success(), "curl to {url} failed: {out:?}");
    out
}

/// Runs a client to its end within `timeout` (it is killed past that).
fn run(name: &str, command: Command, timeout: Duration) -> Finished {
    Process::spawn(name, command).finish(timeout)
}

/// Reads `stream` to its end: the byte count and SHA-256 (hex).
fn hash_stream(stream: &mut impl Read) -> (u64, String) {
    let mut sum = Sha256Sum::start();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = stream.read(&mut buf).expect("read the download");
        if n == 0 {
            return (total, sum.finish());
        }
        sum.update(&buf[..n]).expect("feed sha256sum");
        total += n as u64;
    }
}

fn has_line(lines: &[String], wanted: &str) -> bool {
    lines.iter().any(|l| l == wanted)
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}
