//! The admin port: `/metrics` (Prometheus), `/healthz` and `/readyz`.
//!
//! Invariant: this port never carries tunnel traffic, and a slow or hostile scraper
//! cannot hold more than one small buffer per connection for more than `READ_TIMEOUT`.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::connect::Connector;

const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What `/readyz` reports: listening, not draining, a client certificate valid for long
/// enough, and a new connection would work now (`Connector::gateway_ok`: the latest
/// attempts succeeded; idle pooled connections alone prove nothing).
pub struct Health {
    pub listening: AtomicBool,
    pub draining: AtomicBool,
    connector: Arc<Connector>,
    cert_min_validity: Duration,
}

impl Health {
    pub fn new(connector: Arc<Connector>, cert_min_validity: Duration) -> Health {
        Health {
            listening: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            connector,
            cert_min_validity,
        }
    }

    pub fn ready(&self) -> bool {
        self.listening.load(Ordering::Relaxed)
            && !self.draining.load(Ordering::Relaxed)
            && self.connector.gateway_ok(crate::probe::READY_WINDOW)
            && self.connector.cert_not_after() - crate::material::unix_now()
                > self.cert_min_validity.as_secs() as i64
    }
}

/// Serves the admin port until `stop`.
pub async fn serve(
    listener: TcpListener,
    prometheus: &'static PrometheusHandle,
    health: Arc<Health>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((stream, _)) = accepted else {
            // Out of descriptors or similar: the tunnel's accept loop backs off too.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let health = health.clone();
        tracker.spawn(async move {
            let _ = tokio::time::timeout(READ_TIMEOUT, respond(stream, prometheus, &health)).await;
        });
    }
}

async fn respond(
    mut stream: TcpStream,
    prometheus: &PrometheusHandle,
    health: &Health,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 2048];
    let mut len = 0;
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
        if len == buf.len() {
            return write(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            )
            .await;
        }
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Ok(());
        }
        len += n;
    }
    let line = String::from_utf8_lossy(&buf[..len]);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => {
            prometheus.run_upkeep();
            write(
                &mut stream,
                "200 OK",
                "text/plain; version=0.0.4",
                &prometheus.render(),
            )
            .await
        }
        ("GET", "/healthz") => write(&mut stream, "200 OK", "text/plain", "ok\n").await,
        ("GET", "/readyz") if health.ready() => {
            write(&mut stream, "200 OK", "text/plain", "ready\n").await
        }
        ("GET", "/readyz") => {
            write(
                &mut stream,
                "503 Service Unavailable",
                "text/plain",
                "not ready\n",
            )
            .await
        }
        ("GET", _) => write(&mut stream, "404 Not Found", "text/plain", "not found\n").await,
        _ => write(&mut stream, "405 Method Not Allowed", "text/plain", "").await,
    }
}

async fn write(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
