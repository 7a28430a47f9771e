//! Memory per connection stays within the stated worst case when the readers on both
//! sides stall while both writers keep pushing.

mod support;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use runnel::config::CONNECTION_WORST_CASE;
use support::{
    gateway::{DEADLINE, pki, serve_binary},
    process::http_get,
};
use tokio::{io::AsyncWriteExt, net::TcpSocket, task::JoinSet};
use tokio_rustls::TlsAcceptor;

/// Connections held stalled at once.
const CONNECTIONS: usize = 200;
/// Growth allowed beyond the per-connection bound: the runtime's per-thread buffers,
/// the allocator's arenas, the tasks' first allocations.
const SLACK: u64 = 16 * 1024 * 1024;
/// The receive and send buffers of the test's own sockets. Small send buffers too:
/// autotuned ones (up to 4 MiB a socket) on 400 sockets pushed the whole machine into
/// TCP memory pressure, where the kernel resets other tests' connections.
const PEER_BUFFER: u32 = 8 * 1024;
/// How long the buffers may take to fill on a loaded machine.
const SETTLE: Duration = Duration::from_secs(90);

/// A gateway stand-in that completes the handshake, then writes without end and never
/// reads: the upstream reader is stalled, its writer pushing.
async fn pushing_gateway(tls: Arc<rustls::ServerConfig>, tasks: &mut JoinSet<()>) -> SocketAddr {
    let socket = TcpSocket::new_v4().unwrap();
    // Small kernel buffers on the test's side: they fill in a moment, so runnel's own
    // buffers fill soon after (they are what is measured, not the kernel's).
    socket.set_recv_buffer_size(PEER_BUFFER).unwrap();
    socket.set_send_buffer_size(PEER_BUFFER).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1024).unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(tls);
    tasks.spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            conns.spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let chunk = vec![b'u'; 64 * 1024];
                while tls.write_all(&chunk).await.is_ok() {}
            });
        }
    });
    addr
}

/// Resident memory of a process, in bytes: (now, peak).
fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = |key: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(key)).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 1024
    };
    (kib("VmRSS:"), kib("VmHWM:"))
}

/// runnel's byte counters and active connections, from a scrape; `None` when the
/// scrape fails (runnel is busy moving bytes: the next poll tries again).
fn bytes_moved(metrics: SocketAddr) -> Option<String> {
    let (_, body) = http_get(metrics, "/metrics", DEADLINE).ok()?;
    let lines = body
        .lines()
        .filter(|l| {
            l.starts_with("runnel_bytes_total")
                || l.starts_with("runnel_downstream_connections_active")
        })
        .collect::<Vec<_>>()
        .join(" ");
    Some(lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_stalled_on_both_sides_stay_within_the_stated_bound() {
    let pki = pki();
    let mut tasks = JoinSet::new();
    let gateway = pushing_gateway(pki.gateway_tls(&[b"http/1.1"]).unwrap(), &mut tasks).await;
    let vars = support::gateway::binary_vars(
        &pki,
        gateway,
        &[
            ("RUNNEL_WORKERS", "2"),
            ("RUNNEL_POOL_MAX", "0"),
            ("RUNNEL_MAX_CONNECTIONS", "1000"),
            ("RUNNEL_METRICS_ADDR", "127.0.0.1:0"),
        ],
    );
    let (runnel, listening) = serve_binary(vars).await;
    let metrics = listening.metrics.unwrap();
    let (before, _) = rss(runnel.pid());

    // Downstream peers that write without end and never read.
    for _ in 0..CONNECTIONS {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(PEER_BUFFER).unwrap();
        socket.set_send_buffer_size(PEER_BUFFER).unwrap();
        let mut s = socket.connect(listening.listen).await.unwrap();
        tasks.spawn(async move {
            let chunk = vec![b'd'; 64 * 1024];
            while s.write_all(&chunk).await.is_ok() {}
        });
    }
    // Every buffer is full once the byte counters stop moving with all connections up.
    let deadline = tokio::time::Instant::now() + SETTLE;
    let mut last = String::new();
    let mut still = 0;
    while still < 5 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Some(now) = tokio::task::spawn_blocking(move || bytes_moved(metrics))
            .await
            .unwrap()
        else {
            still = 0;
            continue;
        };
        let all_up = now.contains(&format!(
            "runnel_downstream_connections_active {CONNECTIONS}"
        ));
        still = if all_up && now == last { still + 1 } else { 0 };
        last = now;
        assert!(
            tokio::time::Instant::now() < deadline,
            "byte counters never settled: {last}"
        );
    }
    let (after, peak) = rss(runnel.pid());
    let grown = after.saturating_sub(before);
    let per_connection = grown / CONNECTIONS as u64;
    let bound = CONNECTIONS as u64 * CONNECTION_WORST_CASE + SLACK;
    eprintln!(
        "{CONNECTIONS} stalled connections: RSS {before} -> {after} bytes (peak {peak}), \
         {per_connection} bytes per connection; stated worst case {CONNECTION_WORST_CASE}; {last}"
    );
    assert!(
        grown <= bound,
        "RSS grew {grown} bytes for {CONNECTIONS} stalled connections ({per_connection} each), over {bound}"
    );
    tasks.abort_all();
}
