//! Neither direction of one connection starves the other: with both saturated at once,
//! each keeps moving.

mod support;

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use support::{
    gateway::{DEADLINE, Runnel, pki, vars},
    scripted::Scripted,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const EACH_WAY: u64 = 256 << 20;
const CHUNK: usize = 256 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_256_mib_each_way_at_once_neither_direction_starves() {
    let pki = pki();
    let uploaded = Arc::new(AtomicU64::new(0));
    let up = uploaded.clone();
    // Reads everything while sending EACH_WAY at once.
    let gateway = Scripted::bind(pki.gateway_tls(&[b"http/1.1"]).unwrap(), move |_, tls| {
        let up = up.clone();
        async move {
            let (mut rd, mut wr) = tokio::io::split(tls);
            let reader = tokio::spawn(async move {
                let mut buf = vec![0u8; CHUNK];
                while let Ok(n) = rd.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    up.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
            let chunk = vec![b'd'; CHUNK];
            let mut sent = 0;
            while sent < EACH_WAY {
                if wr.write_all(&chunk).await.is_err() {
                    return;
                }
                sent += CHUNK as u64;
            }
            let _ = reader.await;
            let _ = wr.shutdown().await;
        }
    })
    .await;
    let mut v = vars(&pki, gateway.addr);
    v.push(("RUNNEL_POOL_MAX".into(), "0".into()));
    let runnel = Runnel::start(v).await;
    let (mut rd, mut wr) = TcpStream::connect(runnel.addr).await.unwrap().into_split();
    let downloaded = Arc::new(AtomicU64::new(0));
    let down = downloaded.clone();
    let upload = tokio::spawn(async move {
        let chunk = vec![b'u'; CHUNK];
        let mut sent = 0;
        while sent < EACH_WAY {
            wr.write_all(&chunk).await.unwrap();
            sent += CHUNK as u64;
        }
        wr.shutdown().await.unwrap();
        wr
    });
    let download = tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = rd.read(&mut buf).await.unwrap();
            if n == 0 {
                return;
            }
            down.fetch_add(n as u64, Ordering::Relaxed);
        }
    });
    // Whichever way ends first, the other must have moved at least a third as much.
    let deadline = DEADLINE * 4;
    let (first, other_then) = tokio::time::timeout(deadline, async {
        loop {
            let (u, d) = (
                uploaded.load(Ordering::Relaxed),
                downloaded.load(Ordering::Relaxed),
            );
            if u >= EACH_WAY {
                return ("upload", d);
            }
            if d >= EACH_WAY {
                return ("download", u);
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("neither direction finished in time");
    eprintln!(
        "{first} finished first; the other had moved {} MiB of {}",
        other_then >> 20,
        EACH_WAY >> 20
    );
    assert!(
        other_then * 3 >= EACH_WAY,
        "{first} finished while the other way had moved only {} of {} bytes",
        other_then,
        EACH_WAY
    );
    tokio::time::timeout(deadline, async {
        upload.await.unwrap();
        download.await.unwrap();
    })
    .await
    .expect("the slower direction did not finish");
    assert_eq!(uploaded.load(Ordering::Relaxed), EACH_WAY);
    assert_eq!(downloaded.load(Ordering::Relaxed), EACH_WAY);
}
