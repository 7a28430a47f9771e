//! Security: old TLS versions refused, no switch that disables verification, a
//! world-readable key warned about once, SSLKEYLOGFILE only when asked.

mod support;

use std::{os::unix::fs::PermissionsExt, time::Duration};

use support::{
    gateway::{Behaviour, DEADLINE, Gateway, Runnel, pki, read_to_end, vars},
    process::{self, TempDir},
};
use tokio::{io::AsyncWriteExt, net::TcpStream};

#[test]
fn no_variable_can_turn_certificate_verification_off() {
    for v in runnel::config::VARS {
        for word in ["INSECURE", "SKIP", "VERIFY", "NO_CHECK", "ALLOW_"] {
            assert!(
                !v.name.contains(word),
                "{} looks like a switch around verification",
                v.name
            );
        }
    }
}

#[tokio::test]
async fn min_version_1_3_refuses_a_tls_1_2_only_gateway() {
    let pki = pki();
    let mut v = vars(&pki, "127.0.0.1:1".parse().unwrap());
    let provider = std::sync::Arc::new(runnel::material::provider());
    let leaf = &pki.gateway;
    let chain = vec![rustls::pki_types::CertificateDer::from(
        rustls::pki_types::pem::PemObject::from_pem_slice(leaf.cert_pem.as_bytes())
            .map(|c: rustls::pki_types::CertificateDer<'static>| c.to_vec())
            .unwrap(),
    )];
    let key = rustls::pki_types::pem::PemObject::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
    let tls12 = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let gateway = Gateway::start(std::sync::Arc::new(tls12), Behaviour::Echo).await;
    v.retain(|(k, _)| k != "RUNNEL_UPSTREAM");
    v.push(("RUNNEL_UPSTREAM".into(), gateway.addr.to_string()));
    v.push(("RUNNEL_TLS_MIN_VERSION".into(), "1.3".into()));
    let runnel = Runnel::start(v).await;
    let mut s = TcpStream::connect(runnel.addr).await.unwrap();
    s.write_all(b"MARKER-1.2").await.unwrap();
    let end = tokio::time::timeout(DEADLINE, read_to_end(&mut s))
        .await
        .unwrap();
    assert!(end.unwrap_or_else(|(_, b)| b).is_empty());
    assert!(gateway.seen().is_empty(), "a TLS 1.2 handshake completed");
    assert!(!gateway.raw_contains(b"MARKER-1.2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_1_1_gateway_is_refused_and_gets_no_bytes() {
    let Some(openssl) = process::peer("TEST_OPENSSL_BIN", "openssl") else {
        return;
    };
    let pki = pki();
    let dir = TempDir::new("tls11");
    pki.write_to(dir.path()).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut command = std::process::Command::new(openssl);
    command.current_dir(dir.path()).args([
        "s_server",
        "-quiet",
        "-accept",
        &format!("127.0.0.1:{port}"),
        "-cert",
        "gateway.pem",
        "-key",
        "gateway-key.pem",
        "-tls1_1",
        "-cipher",
        "DEFAULT:@SECLEVEL=0",
    ]);
    let server = process::Process::spawn("openssl", command);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = std::time::Instant::now() + DEADLINE;
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "openssl s_server never listened: {:?}",
            server.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let runnel = Runnel::start(vars(&pki, addr)).await;
    let mut s = TcpStream::connect(runnel.addr).await.unwrap();
    s.write_all(b"MARKER-1.1").await.unwrap();
    let end = tokio::time::timeout(DEADLINE, read_to_end(&mut s))
        .await
        .unwrap();
    assert!(end.unwrap_or_else(|(_, b)| b).is_empty());
    assert!(
        !server.stdout().join("\n").contains("MARKER-1.1"),
        "application bytes reached a TLS 1.1 server"
    );
}

fn file_vars(dir: &std::path::Path) -> Vec<(String, String)> {
    let mut v = support::gateway::file_vars(dir, "127.0.0.1:9".parse().unwrap());
    v.push(("RUNNEL_LISTEN".into(), "127.0.0.1:0".into()));
    v.push(("RUNNEL_METRICS_ADDR".into(), "off".into()));
    v
}

fn start_and_stop(vars: &[(String, String)]) -> Vec<String> {
    let v: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (mut runnel, _) = process::Runnel::serve(&v);
    runnel.signal("TERM");
    runnel.wait_exit(DEADLINE);
    runnel.stderr()
}

#[test]
fn a_world_readable_key_file_draws_one_warning() {
    let pki = pki();
    let dir = TempDir::new("key-mode");
    pki.write_to(dir.path()).unwrap();
    let key = dir.path().join("client-key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let warned = start_and_stop(&file_vars(dir.path()));
    let lines: Vec<_> = warned
        .iter()
        .filter(|l| l.contains("readable by every user"))
        .collect();
    assert_eq!(lines.len(), 1, "{warned:?}");
    assert!(lines[0].contains("RUNNEL_TLS_KEY_FILE"), "{}", lines[0]);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let quiet = start_and_stop(&file_vars(dir.path()));
    assert!(
        !quiet.iter().any(|l| l.contains("readable by every user")),
        "{quiet:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslkeylogfile_is_written_only_when_set_and_warned_about() {
    let pki = pki();
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), Behaviour::Echo).await;
    let dir = TempDir::new("keylog");
    let keylog = dir.path().join("keys.log");
    let mut v = vars(&pki, gateway.addr);
    v.push(("SSLKEYLOGFILE".into(), keylog.display().to_string()));
    let (config, warnings) = runnel::Config::from_vars(v.clone()).unwrap();
    assert!(config.key_log.is_some());
    assert_eq!(
        warnings
            .iter()
            .filter(|w| w.starts_with("SSLKEYLOGFILE: "))
            .count(),
        1,
        "{warnings:?}"
    );
    let runnel = Runnel::start(v).await;
    let mut s = TcpStream::connect(runnel.addr).await.unwrap();
    s.write_all(b"x").await.unwrap();
    s.shutdown().await.unwrap();
    read_to_end(&mut s).await.unwrap();
    let logged = std::fs::read_to_string(&keylog).unwrap();
    assert!(logged.contains("CLIENT_TRAFFIC_SECRET_0 "), "{logged}");
    let (config, warnings) = runnel::Config::from_vars(vars(&pki, gateway.addr)).unwrap();
    assert!(config.key_log.is_none() && warnings.is_empty());
}

#[test]
fn debug_output_of_a_config_from_inline_pem_shows_no_pem() {
    let pki = pki();
    let (config, _) =
        runnel::Config::from_vars(vars(&pki, "127.0.0.1:9".parse().unwrap())).unwrap();
    let shown = format!("{config:?} {:?}", config.tls_sources);
    assert!(shown.contains("RUNNEL_TLS_KEY_PEM"), "{shown}");
    assert!(!shown.contains("-----BEGIN"), "PEM armour in Debug output");
    for (what, pem) in [
        ("CA", &pki.ca_cert_pem),
        ("certificate", &pki.client.cert_pem),
        ("key", &pki.client.key_pem),
    ] {
        for line in pem.lines().filter(|l| !l.starts_with("-----")) {
            assert!(
                !shown.contains(line),
                "the {what} PEM line {line:?} is in Debug output"
            );
        }
    }
    // Nor the key itself, in either way Debug prints bytes.
    let key: rustls::pki_types::PrivateKeyDer<'static> =
        rustls::pki_types::pem::PemObject::from_pem_slice(pki.client.key_pem.as_bytes()).unwrap();
    let der = key.secret_der();
    let hex: String = der.iter().map(|b| format!("{b:02x}")).collect();
    let list = format!("{:?}", &der[..24]);
    assert!(!shown.contains(&hex[..48]) && !shown.contains(list.trim_end_matches(']')));
}

/// The lines of an NSS key log, checked: `LABEL <client random, 64 hex> <secret, hex>`.
fn key_log_lines(text: &str) -> Vec<(String, String)> {
    const LABELS: [&str; 7] = [
        "CLIENT_HANDSHAKE_TRAFFIC_SECRET",
        "SERVER_HANDSHAKE_TRAFFIC_SECRET",
        "CLIENT_TRAFFIC_SECRET_0",
        "SERVER_TRAFFIC_SECRET_0",
        "EXPORTER_SECRET",
        "CLIENT_EARLY_TRAFFIC_SECRET",
        "CLIENT_RANDOM",
    ];
    let hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    assert!(text.ends_with('\n'), "a partial last line: {text:?}");
    text.lines()
        .map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let [label, random, secret] = fields[..] else {
                panic!("not three fields: {line:?}");
            };
            assert!(LABELS.contains(&label), "unknown label: {line:?}");
            assert!(
                random.len() == 64 && hex(random),
                "bad client random: {line:?}"
            );
            assert!(
                [48, 64, 96].contains(&secret.len()) && hex(secret),
                "bad secret: {line:?}"
            );
            (label.to_owned(), random.to_owned())
        })
        .collect()
}

/// Descriptors of this process open on `path`.
fn descriptors_on(path: &std::path::Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target == path)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sslkeylogfile_is_private_and_holds_whole_lines_from_concurrent_alpn_configs() {
    let pki = pki();
    let tls = pki.gateway_tls(&[b"h2", b"http/1.1"]).unwrap();
    let gateway = Gateway::start(tls, Behaviour::Echo).await;
    let dir = TempDir::new("keylog-lines");
    let keylog = dir.path().join("keys.log");
    let mut v = vars(&pki, gateway.addr);
    v.push(("SSLKEYLOGFILE".into(), keylog.display().to_string()));
    // No pool: every handshake is one of these connections and has finished (all its
    // secrets logged) by the time the echo returns.
    v.push(("RUNNEL_POOL_MAX".into(), "0".into()));
    let runnel = Runnel::start(v).await;
    // h2c and HTTP/1.1 at once: the h2 and http/1.1 configs handshake side by side.
    let connections = 24;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..connections {
        let addr = runnel.addr;
        tasks.spawn(async move {
            let bytes: &[u8] = if i % 2 == 0 {
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nkeylog"
            } else {
                b"GET /keylog HTTP/1.1\r\n\r\n"
            };
            let echoed = support::gateway::exchange(addr, bytes).await.unwrap();
            assert_eq!(echoed, bytes);
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let mode = std::fs::metadata(&keylog).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "SSLKEYLOGFILE created {mode:o}");
    assert_eq!(
        descriptors_on(&keylog),
        1,
        "one writer for every TLS config"
    );
    let lines = key_log_lines(&std::fs::read_to_string(&keylog).unwrap());
    let mut randoms: std::collections::HashMap<String, Vec<String>> = Default::default();
    for (label, random) in lines {
        randoms.entry(random).or_default().push(label);
    }
    assert!(
        randoms.len() >= connections,
        "{} handshakes logged",
        randoms.len()
    );
    for (random, labels) in &randoms {
        for needed in ["CLIENT_TRAFFIC_SECRET_0", "SERVER_TRAFFIC_SECRET_0"] {
            assert!(labels.iter().any(|l| l == needed), "{random}: {labels:?}");
        }
    }
    let alpns: std::collections::HashSet<_> =
        gateway.seen().into_iter().filter_map(|s| s.alpn).collect();
    assert_eq!(alpns.len(), 2, "both ALPN configs handshook: {alpns:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslkeylogfile_keeps_one_descriptor_across_reloads() {
    let pki = pki();
    let dir = TempDir::new("keylog-reload");
    pki.write_to(dir.path()).unwrap();
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), Behaviour::Echo).await;
    let keylog = dir.path().join("keys.log");
    let mut v = support::gateway::file_vars(dir.path(), gateway.addr);
    v.push(("SSLKEYLOGFILE".into(), keylog.display().to_string()));
    v.push(("RUNNEL_TLS_RELOAD_INTERVAL".into(), "50ms".into()));
    let runnel = Runnel::start(v).await;
    support::gateway::exchange(runnel.addr, b"before")
        .await
        .unwrap();
    // A new client identity, key first: a reload between the two renames is refused
    // (key and certificate differ) and the next one applies both.
    let next = pki.issue_client("runnel-next", None).unwrap();
    for (file, text) in [
        ("client-key.pem", &next.key_pem),
        ("client.pem", &next.cert_pem),
    ] {
        let tmp = dir.path().join(format!("{file}.new"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::rename(&tmp, dir.path().join(file)).unwrap();
    }
    runnel
        .metrics_until("a TLS reload", |m| {
            m.lines().any(|l| {
                l.strip_prefix("runnel_tls_reloads_total{result=\"ok\"} ")
                    .is_some_and(|n| n.trim() != "0")
            })
        })
        .await;
    support::gateway::exchange(runnel.addr, b"after")
        .await
        .unwrap();
    assert_eq!(
        descriptors_on(&keylog),
        1,
        "a reload opened the key log again"
    );
    let lines = key_log_lines(&std::fs::read_to_string(&keylog).unwrap());
    assert!(lines.len() >= 2, "{lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_key_log_is_appended_to_if_private_and_refused_if_not() {
    let pki = pki();
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), Behaviour::Echo).await;
    let dir = TempDir::new("keylog-existing");
    for (mode, kept) in [(0o600, true), (0o644, false)] {
        let keylog = dir.path().join(format!("keys-{mode:o}.log"));
        std::fs::write(&keylog, "# an earlier session\n").unwrap();
        std::fs::set_permissions(&keylog, std::fs::Permissions::from_mode(mode)).unwrap();
        let stderr =
            one_exchange_with_key_log(&pki, gateway.addr, &keylog.display().to_string()).await;
        let text = std::fs::read_to_string(&keylog).unwrap();
        let refused = stderr
            .iter()
            .filter(|l| {
                l.contains("SSLKEYLOGFILE: the file is readable or writable by other users")
            })
            .count();
        assert!(
            text.starts_with("# an earlier session\n"),
            "{mode:o}: {text}"
        );
        if kept {
            assert!(text.contains("CLIENT_TRAFFIC_SECRET_0 "), "{text}");
            assert_eq!(refused, 0);
        } else {
            assert_eq!(
                text, "# an earlier session\n",
                "secrets went to a {mode:o} file"
            );
            assert_eq!(refused, 1, "{stderr:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_log_that_is_not_a_regular_file_or_is_a_link_is_refused() {
    let pki = pki();
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), Behaviour::Echo).await;
    let dir = TempDir::new("keylog-odd");
    let target = dir.path().join("target.log");
    std::fs::write(&target, "").unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
    let link = dir.path().join("link.log");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    // /dev/null stands for /dev/stdout: secrets in the logs.
    for path in ["/dev/null".to_owned(), link.display().to_string()] {
        let stderr = one_exchange_with_key_log(&pki, gateway.addr, &path).await;
        let warned = stderr
            .iter()
            .filter(|l| {
                l.contains("SSLKEYLOGFILE: refused") || l.contains("SSLKEYLOGFILE: cannot open")
            })
            .count();
        assert_eq!(warned, 1, "{path}: {stderr:?}");
    }
    assert_eq!(
        std::fs::read_to_string(&target).unwrap(),
        "",
        "secrets went through the link"
    );
}

/// Runs the runnel binary with `SSLKEYLOGFILE=path` through one exchange with
/// `gateway`, stops it, and returns what it wrote to stderr.
async fn one_exchange_with_key_log(
    pki: &runnel::demo::Pki,
    gateway: std::net::SocketAddr,
    path: &str,
) -> Vec<String> {
    let vars = support::gateway::binary_vars(pki, gateway, &[("SSLKEYLOGFILE", path)]);
    let (mut runnel, listening) = support::gateway::serve_binary(vars).await;
    support::gateway::exchange(listening.listen, b"x")
        .await
        .unwrap();
    runnel.signal("TERM");
    runnel.wait_exit(DEADLINE);
    runnel.stderr()
}
