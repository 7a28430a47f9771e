//! Cloud Run takes the CPU away from an idle instance; meanwhile the gateway may close
//! every pooled connection. When the instance runs again, the runtime's view of those
//! sockets is stale and its timers late: no downstream connection may be handed one.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{
    gateway::{Behaviour, Gateway, Poke, binary_vars, exchange, pki, poll_until},
    process::field,
};

const CONNECTIONS: usize = 16;

/// Sockets on `port` (local side) in TCP state FIN_WAIT2: the gateway's FIN was sent and
/// acknowledged by the peer's kernel.
fn fin_wait2(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].rsplit(':').next() == Some(&format!("{port:04X}")) && f[3] == "05"
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_freeze_in_which_the_gateway_closed_the_pool_every_new_connection_is_served() {
    let pki = pki();
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), Behaviour::Echo).await;
    let pool = CONNECTIONS.to_string();
    let vars = binary_vars(
        &pki,
        gateway.addr,
        &[
            ("RUNNEL_ALPN", "http/1.1"),
            ("RUNNEL_POOL_MIN", &pool),
            ("RUNNEL_POOL_MAX", "32"),
        ],
    );
    let (runnel, listening) = support::gateway::serve_binary(vars).await;
    let (runnel, ready) = tokio::task::spawn_blocking(move || {
        let ready = runnel.wait_for_stderr(Duration::from_secs(30), |line| {
            serde_json::from_str::<Value>(line)
                .is_ok_and(|v| field(&v, "message").and_then(Value::as_str) == Some("ready"))
        });
        (runnel, ready)
    })
    .await
    .unwrap();
    assert!(
        ready.is_some(),
        "the pool never warmed:\n{}",
        runnel.stderr().join("\n")
    );
    let pooled = gateway.seen().len();
    assert!(pooled >= CONNECTIONS, "{pooled} pooled connections");

    runnel.signal("STOP");
    gateway.poke_idle(Poke::Close);
    let port = gateway.addr.port();
    poll_until(|| match fin_wait2(port) {
        n if n >= CONNECTIONS => Ok(()),
        n => Err(format!(
            "{n} of {CONNECTIONS} pooled connections closed by the gateway"
        )),
    })
    .await;
    runnel.signal("CONT");

    let mut all = tokio::task::JoinSet::new();
    for i in 0..CONNECTIONS {
        let addr = listening.listen;
        all.spawn(async move {
            let ask = format!("request {i}");
            (ask.clone(), exchange(addr, ask.as_bytes()).await)
        });
    }
    let mut failed = Vec::new();
    while let Some(done) = all.join_next().await {
        let (ask, got) = done.unwrap();
        if got.as_deref() != Ok(ask.as_bytes()) {
            failed.push(format!("{ask}: {got:?}"));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {CONNECTIONS} not served after the freeze:\n{}\nrunnel:\n{}",
        failed.len(),
        failed.join("\n"),
        runnel.stderr().join("\n")
    );
}
