//! `/readyz` says whether a new connection would work now, judged by the latest
//! attempts (pool refills, probes, traffic): it becomes ready with the gateway up and no
//! traffic, whatever the pool settings, stays ready while idle, and follows the gateway
//! down and back up within 10 s each way.

mod support;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use support::gateway::{Behaviour, DEADLINE, Gateway, Runnel, exchange, pki, vars};
use tokio::net::TcpListener;

/// The bound the issue sets for each transition.
const TRANSITION: Duration = Duration::from_secs(10);

/// Polls `/readyz` until it says `want`; how long that took, or a failure past `limit`.
async fn until_ready(runnel: &Runnel, want: bool, limit: Duration) -> Duration {
    let started = Instant::now();
    while runnel.ready().await != want {
        assert!(
            started.elapsed() < limit,
            "/readyz did not become {want} within {limit:?}:\n{}",
            runnel.metrics().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

/// A socket bound to `addr` (SO_REUSEADDR) but not listening: connections to it are
/// refused, and no other process can take the port meanwhile. Retries while the
/// listener being replaced is still closing (an aborted task's listener goes when the
/// runtime drops it).
fn reserve(addr: SocketAddr) -> socket2::Socket {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_reuse_address(true).unwrap();
        match s.bind(&addr.into()) {
            Ok(()) => return s,
            Err(e) => assert!(Instant::now() < deadline, "cannot bind {addr} again: {e}"),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn listen(reserved: socket2::Socket) -> TcpListener {
    reserved.listen(128).unwrap();
    reserved.set_nonblocking(true).unwrap();
    TcpListener::from_std(reserved.into()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_pool_and_no_minimum_an_idle_instance_becomes_ready_and_stays_ready() {
    let pki = pki();
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), Behaviour::Echo).await;
    let mut v = vars(&pki, gateway.addr);
    v.push(("RUNNEL_POOL_MIN".into(), "0".into()));
    let runnel = Runnel::start(v).await;
    until_ready(&runnel, true, DEADLINE).await;
    // Longer than any window a past success could carry readiness through.
    let watch_until = Instant::now() + runnel::probe::READY_WINDOW + Duration::from_secs(5);
    while Instant::now() < watch_until {
        assert!(
            runnel.ready().await,
            "an idle instance with a reachable gateway went unready:\n{}",
            runnel.metrics().await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// How the gateway goes away in `readyz_follows_the_gateway`.
#[derive(Clone, Copy, Debug)]
enum Down {
    /// The process is gone: connections refused.
    Refusing,
    /// Something else answers on the port with a certificate runnel does not trust:
    /// every handshake fails.
    FailingHandshakes,
}

async fn readyz_follows_the_gateway(down: Down) {
    let pki = pki();
    let tls = pki.gateway_tls(&[b"h2", b"http/1.1"]).unwrap();
    let gateway = Gateway::start(tls.clone(), Behaviour::Echo).await;
    let addr = gateway.addr;
    let runnel = Runnel::start(vars(&pki, addr)).await;
    until_ready(&runnel, true, DEADLINE).await;
    assert_eq!(exchange(runnel.addr, b"traffic").await.unwrap(), b"traffic");

    drop(gateway);
    let reserved = reserve(addr);
    let _impostor = match down {
        Down::Refusing => None,
        Down::FailingHandshakes => {
            let other = support::gateway::pki();
            Some(Gateway::start_at(
                listen(reserve_again(&reserved)),
                other.gateway_tls(&[b"h2", b"http/1.1"]).unwrap(),
                Behaviour::Echo,
            ))
        }
    };
    let went = until_ready(&runnel, false, TRANSITION).await;
    drop(_impostor);

    let back = Gateway::start_at(listen(reserve_again(&reserved)), tls, Behaviour::Echo);
    drop(reserved);
    let came = until_ready(&runnel, true, TRANSITION).await;
    assert_eq!(exchange(runnel.addr, b"again").await.unwrap(), b"again");
    eprintln!(
        "{down:?}: /readyz 503 after {:.1} s, 200 again after {:.1} s",
        went.as_secs_f64(),
        came.as_secs_f64()
    );
    drop(back);
}

/// Another socket on the same port (SO_REUSEADDR), for the next listener.
fn reserve_again(reserved: &socket2::Socket) -> socket2::Socket {
    reserve(reserved.local_addr().unwrap().as_socket().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_within_10_s_of_the_gateway_refusing_and_recovers_within_10_s() {
    readyz_follows_the_gateway(Down::Refusing).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_within_10_s_of_handshakes_failing_and_recovers_within_10_s() {
    readyz_follows_the_gateway(Down::FailingHandshakes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_pool_the_probe_offers_the_alpn_that_traffic_offers() {
    let pki = pki();
    let gateway = Gateway::start(
        pki.gateway_tls(&[b"h2", b"http/1.1"]).unwrap(),
        Behaviour::Echo,
    )
    .await;
    let mut v = vars(&pki, gateway.addr);
    v.push(("RUNNEL_POOL_MAX".into(), "0".into()));
    v.push(("RUNNEL_ALPN".into(), "h2".into()));
    let runnel = Runnel::start(v).await;
    until_ready(&runnel, true, DEADLINE).await;
    let offered: Vec<_> = gateway.seen().into_iter().map(|s| s.alpn).collect();
    assert!(!offered.is_empty(), "ready without a probe");
    assert!(
        offered.iter().all(|a| a.as_deref() == Some(&b"h2"[..])),
        "the probe negotiated {offered:?}, not h2"
    );
}
