//! A slow gateway is not a dead one. A gateway that stops reading (its window shut,
//! every probe answered) keeps its connection for as long as it pauses; a gateway that
//! vanishes (no packet answered at all) is noticed and both sides are reset, within the
//! bound the README states (70 s: keepalive for idle connections, `TCP_INFO` for
//! connections with bytes outstanding).

mod support;

use std::time::{Duration, Instant};

use support::{
    gateway::{Behaviour, Gateway, Runnel, binary_vars, pki, read_to_end, vars},
    netns::LossyLink,
    scripted::Scripted,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const UPLOAD: usize = 64 << 20;
/// Longer than any timer that could cut a paused peer short (TCP_USER_TIMEOUT was 30 s).
const PAUSE: Duration = Duration::from_secs(40);
/// The stated detection bound, plus slack for a loaded machine.
const DEAD_PEER_BOUND: Duration = Duration::from_secs(70);
const SLACK: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_stops_reading_for_40_s_mid_upload_still_gets_every_byte() {
    let pki = pki();
    // Reads 1 MiB, stops reading for PAUSE (runnel's writes stall: the window closes),
    // then reads the rest to close_notify and answers with the count.
    let gateway = Scripted::bind(
        pki.gateway_tls(&[b"http/1.1"]).unwrap(),
        |_, mut tls| async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0usize;
            while total < 1 << 20 {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => total += n,
                }
            }
            tokio::time::sleep(PAUSE).await;
            loop {
                match tls.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => total += n,
                    Err(_) => return,
                }
            }
            let _ = tls.write_all(total.to_string().as_bytes()).await;
            let _ = tls.shutdown().await;
        },
    )
    .await;
    let mut v = vars(&pki, gateway.addr);
    v.push(("RUNNEL_POOL_MAX".into(), "0".into()));
    let runnel = Runnel::start(v).await;
    let stream = TcpStream::connect(runnel.addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let started = Instant::now();
    let upload = tokio::spawn(async move {
        let chunk = vec![b'u'; 256 * 1024];
        let mut sent = 0;
        while sent < UPLOAD {
            wr.write_all(&chunk).await?;
            sent += chunk.len();
        }
        wr.shutdown().await?;
        Ok::<_, std::io::Error>(wr)
    });
    let mut reply = Vec::new();
    let read = tokio::time::timeout(PAUSE * 3, rd.read_to_end(&mut reply))
        .await
        .expect("no reply within three pauses");
    let took = started.elapsed();
    assert!(
        read.is_ok(),
        "the connection failed after {took:?}: {read:?}"
    );
    assert_eq!(
        String::from_utf8_lossy(&reply),
        UPLOAD.to_string(),
        "the gateway did not get every byte (after {took:?})"
    );
    assert!(took >= PAUSE, "the gateway never paused ({took:?})");
    upload.await.unwrap().expect("the upload failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_gateway_is_detected_on_busy_and_idle_connections_within_the_bound() {
    if !LossyLink::available() {
        return;
    }
    let mut link = LossyLink::create();
    let pki = pki();
    let listener = TcpListener::bind((link.root_addr, 0)).await.unwrap();
    let gateway = Gateway::start_at(
        listener,
        pki.gateway_tls(&[b"http/1.1"]).unwrap(),
        Behaviour::Echo,
    );
    let listen = format!("{}:0", link.ns_addr);
    let vars = binary_vars(
        &pki,
        gateway.addr,
        &[("RUNNEL_LISTEN", &listen), ("RUNNEL_POOL_MAX", "0")],
    );
    let (_runnel, addr) = link.start_runnel(vars).await;
    // Two tunnelled connections, both proven to work.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    let mut busy = TcpStream::connect(addr).await.unwrap();
    for s in [&mut idle, &mut busy] {
        s.write_all(b"ping").await.unwrap();
        let mut echo = [0u8; 4];
        s.read_exact(&mut echo).await.unwrap();
    }
    link.black_hole(gateway.addr.port());
    let vanished = Instant::now();
    // The busy one has bytes in flight toward the vanished gateway. Its writer may
    // still be blocked when the reset comes, and a socket reports a reset to one call
    // only: either half seeing it counts.
    let (mut busy_rd, mut busy_wr) = busy.into_split();
    let writer = tokio::spawn(async move {
        match busy_wr.write_all(&vec![b'b'; 1 << 20]).await {
            Ok(()) => std::future::pending::<std::io::ErrorKind>().await,
            Err(e) => e.kind(),
        }
    });
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match busy_rd.read(&mut buf).await {
                Ok(0) => return std::io::ErrorKind::UnexpectedEof,
                Ok(_) => {}
                Err(e) => return e.kind(),
            }
        }
    };
    let busy_end = async {
        let end = tokio::select! {
            w = writer => w.unwrap(),
            r = reader => r,
        };
        (end, vanished.elapsed())
    };
    let idle_end = async move {
        let end = match read_to_end(&mut idle).await {
            Ok(_) => std::io::ErrorKind::UnexpectedEof,
            Err((kind, _)) => kind,
        };
        (end, vanished.elapsed())
    };
    let limit = DEAD_PEER_BOUND + SLACK;
    let (busy_end, idle_end) = tokio::join!(
        tokio::time::timeout(limit, busy_end),
        tokio::time::timeout(limit, idle_end)
    );
    for (name, end) in [("busy", busy_end), ("idle", idle_end)] {
        let (kind, after) =
            end.unwrap_or_else(|_| panic!("the {name} connection lived on past {limit:?}"));
        assert_eq!(
            kind,
            std::io::ErrorKind::ConnectionReset,
            "the {name} connection ended without a reset after {after:?}"
        );
        eprintln!(
            "{name}: reset {:.1} s after the gateway vanished",
            after.as_secs_f64()
        );
    }
}
