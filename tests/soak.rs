//! Soak: many connections of random sizes, half-closed in random order in both
//! directions, through the runnel binary to a checking peer; then memory returns near
//! its baseline.
//!
//! `TEST_SOAK_CONNECTIONS` sets the count (default 2,000 in the suite; the full
//! soak is 10,000: `TEST_SOAK_CONNECTIONS=10000 cargo nextest run --test soak`).

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::gateway::{Behaviour, DEADLINE, Gateway, pattern, pki};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::Semaphore,
};

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

async fn one(addr: std::net::SocketAddr, seed: u64) -> Result<(), String> {
    let r = pattern(seed.wrapping_mul(31).wrapping_add(7), 3);
    let n_up = (u32::from(r[0]) << 8 | u32::from(r[1])) as usize * 3; // 0..196 KiB
    let n_down = (u32::from(r[1]) << 8 | u32::from(r[2])) as usize * 3;
    let upstream_first = r[2] & 1 == 1;
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let mut head = Vec::with_capacity(17);
    head.extend_from_slice(&(n_up as u32).to_be_bytes());
    head.extend_from_slice(&(n_down as u32).to_be_bytes());
    head.push(u8::from(upstream_first));
    head.extend_from_slice(&seed.to_be_bytes());
    let (mut rd, mut wr) = s.split();
    let send = async {
        wr.write_all(&head).await?;
        wr.write_all(&pattern(seed, n_up)).await?;
        wr.shutdown().await
    };
    let recv = async {
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await.map(|_| got)
    };
    let (sent, got) = tokio::join!(send, recv);
    sent.map_err(|e| format!("send: {e}"))?;
    let got = got.map_err(|e| {
        format!("recv ({n_up} up, {n_down} down, upstream_first {upstream_first}): {e}")
    })?;
    if got != pattern(seed.wrapping_add(1), n_down) {
        return Err(format!(
            "seed {seed}: {} bytes back, {n_down} expected or content differs",
            got.len()
        ));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_random_transfers_with_random_half_close_order_are_exact_and_leak_nothing() {
    let count: u64 = std::env::var("TEST_SOAK_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let pki = pki();
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), Behaviour::Soak).await;
    let (runnel, listening) =
        support::gateway::serve_binary(support::gateway::binary_vars(&pki, gateway.addr, &[]))
            .await;
    let addr = listening.listen;
    let pid = runnel.pid();
    // Warm up once so the baseline includes the runtime, pools and TLS state.
    one(addr, 1).await.unwrap();
    let baseline = rss_kib(pid);
    let base_seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("seed {base_seed}, {count} connections");
    let permits = std::sync::Arc::new(Semaphore::new(100));
    let mut tasks = Vec::new();
    for i in 0..count {
        let permit = permits.clone().acquire_owned().await.unwrap();
        tasks.push(tokio::spawn(async move {
            let r =
                tokio::time::timeout(DEADLINE, one(addr, base_seed.wrapping_add(i * 7919))).await;
            drop(permit);
            r.map_err(|_| "timed out".to_string()).and_then(|r| r)
        }));
    }
    let mut failures = Vec::new();
    for t in tasks {
        if let Err(e) = t.await.unwrap() {
            failures.push(e);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {count} failed, first: {:?}",
        failures.len(),
        failures.first()
    );
    let ok = gateway
        .data_conns()
        .iter()
        .filter(|c| c.received == b"ok")
        .count() as u64;
    assert_eq!(
        ok,
        count + 1,
        "the peer verified fewer transfers than were made"
    );
    // Memory returns near the baseline once the connections are gone.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let now = rss_kib(pid);
        println!("RSS baseline {baseline} KiB, now {now} KiB");
        if now <= baseline + 8 * 1024 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "RSS stayed at {now} KiB against a {baseline} KiB baseline"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
