//! 1% loss and 20 ms RTT on the upstream link: 1,000 transfers of random sizes through
//! the runnel binary, every byte exact in both directions.
//!
//! runnel runs inside a network namespace; the echoing gateway runs in this process,
//! bound to the root end of the veth pair, so every upstream packet crosses the impaired
//! link (`support::netns` says how delay and loss are made without netem). The
//! downstream hop crosses the same veth unimpaired: the rules match the gateway's port
//! only. `TEST_LOSSY_SEED` replays a run's sizes and bytes.

mod support;

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use support::{
    gateway::{Behaviour, DEADLINE, Gateway, binary_vars, pattern, pki, poll_until},
    netns::LossyLink,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    task::JoinSet,
};

const TRANSFERS: usize = 1000;
/// Each way, so 20 ms round trip.
const ONE_WAY: Duration = Duration::from_millis(10);
const LOSS: f64 = 0.01;
/// Transfers at once. At 20 ms RTT and 1% loss each one is latency-bound (handshakes,
/// retransmission timeouts), so more at once is what keeps 1,000 within the budget.
const CONCURRENCY: usize = 16;
const MAX_SIZE: usize = 256 * 1024;
/// All transfers finish within this, or the test fails (the suite runs on 2 cores).
const TRANSFER_BUDGET: Duration = Duration::from_secs(75);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_random_transfers_over_one_percent_loss_and_20_ms_rtt_are_byte_exact() {
    if !LossyLink::available() {
        return;
    }
    let started = Instant::now();
    // Declared first, dropped last: runnel and the gateway go before the link does.
    let mut link = LossyLink::create();
    let pki = pki();
    let listener = TcpListener::bind((link.root_addr, 0)).await.unwrap();
    let tls = pki.gateway_tls(&[b"http/1.1"]).unwrap();
    let gateway = Gateway::start_at(listener, tls, Behaviour::Echo);
    link.impair(gateway.addr.port(), ONE_WAY, LOSS);
    let listen = format!("{}:0", link.ns_addr);
    let vars = binary_vars(&pki, gateway.addr, &[("RUNNEL_LISTEN", &listen)]);
    let (_runnel, addr) = link.start_runnel(vars).await;

    let seed = seed();
    let sizes = sizes(seed);
    let total: usize = sizes.iter().sum();
    let sending = Instant::now();
    let results = tokio::time::timeout(TRANSFER_BUDGET, run_all(addr, seed, &sizes))
        .await
        .unwrap_or_else(|_| {
            panic!("{TRANSFERS} transfers not done in {TRANSFER_BUDGET:?}, seed {seed}")
        });
    let sending = sending.elapsed();

    let times = exact_transfer_times(&results, &sizes, seed);
    // Every echo crosses the link twice, so no transfer can beat the round trip: this is
    // what shows the delay was there.
    assert!(
        times[0] >= 2 * ONE_WAY,
        "fastest transfer took {:?}",
        times[0]
    );
    gateway_saw_every_byte(&gateway, &sizes).await;
    let counts = link.counts();
    assert!(
        counts.up_dropped > 0 && counts.down_dropped > 0,
        "no loss in one direction: {counts:?}"
    );
    assert_eq!(
        counts.queue_full, 0,
        "the delay queue overflowed: {counts:?}"
    );
    let percent = |dropped: u64, packets: u64| 100.0 * dropped as f64 / packets.max(1) as f64;
    eprintln!(
        "[lossy_network] {TRANSFERS} transfers, {total} bytes each way, all exact; dropped \
         up {} of {} packets ({:.2}%), down {} of {} ({:.2}%); {} released early; transfer \
         p50 {:?} p99 {:?}; transfers {:.1} s, whole test {:.1} s; seed {seed}",
        counts.up_dropped,
        counts.up_packets,
        percent(counts.up_dropped, counts.up_packets),
        counts.down_dropped,
        counts.down_packets,
        percent(counts.down_dropped, counts.down_packets),
        counts.undelivered,
        times[times.len() / 2],
        times[times.len() * 99 / 100],
        sending.as_secs_f64(),
        started.elapsed().as_secs_f64(),
    );
}

/// Runs every transfer, `CONCURRENCY` at a time: each one's time, or what went wrong.
async fn run_all(addr: SocketAddr, seed: u64, sizes: &[usize]) -> Vec<Result<Duration, String>> {
    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    let mut tasks = JoinSet::new();
    for (i, &size) in sizes.iter().enumerate() {
        let permit = permits.clone().acquire_owned().await.unwrap();
        tasks.spawn(async move {
            let data = pattern(seed.wrapping_add(i as u64 * 7919), size);
            let result = match tokio::time::timeout(DEADLINE, transfer(addr, &data)).await {
                Ok(r) => r.map_err(|e| format!("transfer {i} ({size} bytes): {e}")),
                Err(_) => Err(format!(
                    "transfer {i} ({size} bytes): no end within {DEADLINE:?}"
                )),
            };
            drop(permit);
            (i, result)
        });
    }
    let mut results = vec![Err("never ran".to_owned()); sizes.len()];
    while let Some(done) = tasks.join_next().await {
        let (i, result) = done.unwrap();
        results[i] = result;
    }
    results
}

/// One transfer: write `data` while reading the echo, half-close, read to the end; the
/// echo must be `data` exactly.
async fn transfer(addr: SocketAddr, data: &[u8]) -> Result<Duration, String> {
    let start = Instant::now();
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut rd, mut wr) = stream.into_split();
    let send = async {
        wr.write_all(data).await?;
        wr.shutdown().await
    };
    let mut got = Vec::with_capacity(data.len());
    let (sent, received) = tokio::join!(send, rd.read_to_end(&mut got));
    sent.map_err(|e| format!("send: {e}"))?;
    received.map_err(|e| format!("receive, {} bytes in: {e}", got.len()))?;
    if got != data {
        let at = got.iter().zip(data).position(|(a, b)| a != b);
        return Err(format!(
            "{} bytes back for {} sent, first difference at {at:?}",
            got.len(),
            data.len()
        ));
    }
    Ok(start.elapsed())
}

/// Fails unless every transfer came back exact; the times of the non-empty ones, sorted.
fn exact_transfer_times(
    results: &[Result<Duration, String>],
    sizes: &[usize],
    seed: u64,
) -> Vec<Duration> {
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {TRANSFERS} transfers failed (seed {seed}), first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let mut times: Vec<Duration> = results
        .iter()
        .zip(sizes)
        .filter(|(_, size)| **size > 0)
        .filter_map(|(r, _)| r.as_ref().ok().copied())
        .collect();
    times.sort();
    times
}

/// The gateway's side: one upstream connection per non-empty transfer, each ended
/// with close_notify, and exactly as many bytes as were sent in all.
async fn gateway_saw_every_byte(gateway: &Gateway, sizes: &[usize]) {
    let expected = sizes.iter().filter(|s| **s > 0).count();
    let conns = poll_until(|| {
        let conns = gateway.data_conns();
        let unclean = conns.iter().filter(|c| c.ended_clean != Some(true)).count();
        match conns.len() == expected && unclean == 0 {
            true => Ok(conns),
            false => Err(format!(
                "gateway: {} data connections ({expected} expected), {unclean} not ended cleanly",
                conns.len()
            )),
        }
    })
    .await;
    let bytes: usize = conns.iter().map(|c| c.received.len()).sum();
    assert_eq!(
        bytes,
        sizes.iter().sum::<usize>(),
        "bytes the gateway received"
    );
}

/// `TEST_LOSSY_SEED`, or the clock.
fn seed() -> u64 {
    std::env::var("TEST_LOSSY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

/// The sizes: the edges (empty, one byte, the largest), then mostly small, some medium
/// and a few large, as requests and responses come.
fn sizes(seed: u64) -> Vec<usize> {
    let mut state = seed;
    let mut next = move || {
        // splitmix64: a seeded generator without a dependency.
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut sizes = vec![0, 1, MAX_SIZE];
    while sizes.len() < TRANSFERS {
        let r = next();
        let pick = (r >> 8) as usize;
        sizes.push(match r % 100 {
            0..70 => pick % (4 * 1024 + 1),
            70..95 => 4 * 1024 + pick % (60 * 1024),
            _ => 64 * 1024 + pick % (MAX_SIZE - 64 * 1024 + 1),
        });
    }
    sizes
}
