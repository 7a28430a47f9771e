//! Bytes arrive exact, in both directions, whatever the size and however many
//! connections run at once.

mod support;

use std::time::{SystemTime, UNIX_EPOCH};

use support::gateway::{Behaviour, DEADLINE, Gateway, Runnel, pattern, pki, read_to_end, vars};
use tokio::{io::AsyncWriteExt, net::TcpStream};

async fn echo_through(addr: std::net::SocketAddr, data: Vec<u8>) -> Vec<u8> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        wr.write_all(&data).await.unwrap();
        wr.shutdown().await.unwrap();
        wr
    });
    let mut out = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut rd, &mut out)
        .await
        .unwrap();
    let wr = writer.await.unwrap();
    let mut stream = rd.reunite(wr).unwrap();
    assert_eq!(read_to_end(&mut stream).await.unwrap(), b"");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_are_exact_both_ways_for_random_sizes_up_to_64_mib() {
    let pki = pki();
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), Behaviour::Echo).await;
    let runnel = Runnel::start(vars(&pki, gateway.addr)).await;
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("seed {seed}");
    let mut sizes = vec![
        1,
        23,
        24,
        25,
        16 * 1024,
        16 * 1024 + 1,
        64 * 1024 + 3,
        64 * 1024 * 1024,
    ];
    sizes.extend((0..4).map(|i| {
        (pattern(seed + i, 4)
            .iter()
            .fold(0usize, |a, b| a << 8 | *b as usize))
            % (8 << 20)
    }));
    for (i, size) in sizes.into_iter().enumerate() {
        let data = pattern(seed.wrapping_add(i as u64 * 7919), size.max(1));
        let got = tokio::time::timeout(DEADLINE, echo_through(runnel.addr, data.clone()))
            .await
            .expect("echo timed out");
        assert_eq!(got.len(), data.len(), "size {size}, seed {seed}");
        assert!(got == data, "bytes differ for size {size}, seed {seed}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_connections_each_get_their_own_bytes() {
    let pki = pki();
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), Behaviour::Echo).await;
    let runnel = Runnel::start(vars(&pki, gateway.addr)).await;
    let tasks: Vec<_> = (0..500u64)
        .map(|i| {
            let addr = runnel.addr;
            tokio::spawn(async move {
                let data = pattern(i + 1, 1000 + (i as usize * 131) % 60_000);
                let got = echo_through(addr, data.clone()).await;
                assert!(got == data, "connection {i} got other bytes");
            })
        })
        .collect();
    let all = async {
        for t in tasks {
            t.await.unwrap();
        }
    };
    tokio::time::timeout(DEADLINE * 2, all)
        .await
        .expect("500 connections did not finish");
    assert_eq!(gateway.data_conns().len(), 500);
}
