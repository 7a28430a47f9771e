//! Faults: a gateway that stalls, restarts, or is too slow to read; limits reached.

mod support;

use std::{io::ErrorKind, time::Duration};

use support::gateway::{Behaviour, DEADLINE, Gateway, Runnel, pki, poll_until, read_to_end, vars};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

#[tokio::test]
async fn a_gateway_that_stalls_the_handshake_is_cut_at_the_connect_deadline() {
    let pki = pki();
    // Accepts TCP, never answers the ClientHello.
    let stall = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = stall.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (s, _) = stall.accept().await.unwrap();
            held.push(s);
        }
    });
    let mut v = vars(&pki, addr);
    v.retain(|(k, _)| k != "RUNNEL_CONNECT_TIMEOUT");
    v.push(("RUNNEL_CONNECT_TIMEOUT".into(), "300ms".into()));
    v.push(("RUNNEL_POOL_MAX".into(), "0".into()));
    v.push(("RUNNEL_POOL_MIN".into(), "0".into()));
    let runnel = Runnel::start(v).await;
    let started = tokio::time::Instant::now();
    let mut s = TcpStream::connect(runnel.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let end = tokio::time::timeout(DEADLINE, read_to_end(&mut s))
        .await
        .expect("downstream left hanging");
    assert!(
        matches!(end, Err((ErrorKind::ConnectionReset, _))),
        "{end:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "cut before the deadline"
    );
    let m = runnel.metrics().await;
    assert!(
        m.contains("runnel_downstream_connections_closed_total{outcome=\"connect_timeout\"} 1"),
        "{m}"
    );
    held.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_restart_mid_transfer_resets_the_downstream_and_new_connections_succeed_after() {
    let pki = pki();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let gateway = Gateway::start_at(
        listener,
        pki.gateway_tls(&[b"h2", b"http/1.1"]).unwrap(),
        Behaviour::Echo,
    );
    let runnel = Runnel::start(vars(&pki, addr)).await;
    let mut s = TcpStream::connect(runnel.addr).await.unwrap();
    s.write_all(b"first").await.unwrap();
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).await.unwrap();
    // The gateway process dies: its task and every connection it held go away with RST
    // or FIN without close_notify; either way the downstream must see a reset.
    drop(gateway);
    let end = tokio::time::timeout(DEADLINE, read_to_end(&mut s))
        .await
        .expect("left hanging");
    assert!(
        matches!(end, Err((ErrorKind::ConnectionReset, _))),
        "a dead gateway passed off as a clean end: {end:?}"
    );
    // Back on the same port, once the dead gateway's sockets have let go of it (one still
    // closing holds it against a new listener for a moment).
    let listener = poll_until(|| {
        let l = std::net::TcpListener::bind(addr).map_err(|e| format!("rebind {addr}: {e}"))?;
        l.set_nonblocking(true).unwrap();
        Ok(TcpListener::from_std(l).unwrap())
    })
    .await;
    let _gateway = Gateway::start_at(
        listener,
        pki.gateway_tls(&[b"h2", b"http/1.1"]).unwrap(),
        Behaviour::Echo,
    );
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let mut s = TcpStream::connect(runnel.addr).await.unwrap();
        s.write_all(b"again").await.unwrap();
        s.shutdown().await.unwrap();
        if let Ok(Ok(b)) = tokio::time::timeout(DEADLINE, read_to_end(&mut s)).await {
            if b == b"again" {
                break;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_connections_more_wait_and_are_served_when_one_closes() {
    let pki = pki();
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), Behaviour::Echo).await;
    let mut v = vars(&pki, gateway.addr);
    v.push(("RUNNEL_MAX_CONNECTIONS".into(), "2".into()));
    let runnel = Runnel::start(v).await;
    let mut a = TcpStream::connect(runnel.addr).await.unwrap();
    let mut b = TcpStream::connect(runnel.addr).await.unwrap();
    for s in [&mut a, &mut b] {
        s.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        s.read_exact(&mut one).await.unwrap();
    }
    // The third connects (kernel backlog) but is not served while two are open.
    let mut c = TcpStream::connect(runnel.addr).await.unwrap();
    c.write_all(b"third").await.unwrap();
    let mut buf = [0u8; 5];
    let early = tokio::time::timeout(Duration::from_millis(300), c.read_exact(&mut buf)).await;
    assert!(early.is_err(), "served beyond RUNNEL_MAX_CONNECTIONS");
    a.shutdown().await.unwrap();
    read_to_end(&mut a).await.unwrap();
    tokio::time::timeout(DEADLINE, c.read_exact(&mut buf))
        .await
        .expect("never served")
        .unwrap();
    assert_eq!(&buf, b"third");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_downstream_reader_holds_back_the_upstream_instead_of_buffering() {
    let pki = pki();
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), Behaviour::Echo).await;
    let runnel = Runnel::start(vars(&pki, gateway.addr)).await;
    let s = TcpStream::connect(runnel.addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    // Write 256 MiB and read nothing: the echo must stall, so far fewer bytes can be
    // written than sent; a tunnel that buffered without bound would take them all.
    let chunk = vec![7u8; 1 << 20];
    let mut written = 0usize;
    for _ in 0..256 {
        match tokio::time::timeout(Duration::from_secs(2), wr.write_all(&chunk)).await {
            Ok(Ok(())) => written += chunk.len(),
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => break, // backpressure reached us
        }
    }
    assert!(
        written < 64 << 20,
        "{} MiB accepted without being read",
        written >> 20
    );
    // And nothing was lost: reading now drains it all.
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0usize;
    while got < written {
        let n = tokio::time::timeout(DEADLINE, rd.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        got += n;
    }
}
