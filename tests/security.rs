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
    let provider = std::sync::Arc::new(runnel::tls::provider());
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
