//! File descriptors: the soft limit is raised at start, a connection limit the
//! descriptors cannot hold is lowered with one warning (excess connections wait instead
//! of failing), and out of descriptors accept backs off instead of spinning.

mod support;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{
    gateway::{Behaviour, DEADLINE, Gateway, pki},
    process::{Process, clean_env, field, http_get},
};

/// Starts runnel under `sh -c '<ulimit>; exec runnel'` and waits for "listening":
/// the process, its tunnel address and its metrics address (if on).
fn spawn_limited(
    ulimit: &str,
    vars: &[(String, String)],
) -> (Process, SocketAddr, Option<SocketAddr>) {
    let mut command = std::process::Command::new("sh");
    command.args([
        "-c",
        &format!("{ulimit} && exec \"$0\""),
        env!("CARGO_BIN_EXE_runnel"),
    ]);
    clean_env(&mut command, vars);
    let runnel = Process::spawn("runnel", command);
    let line = runnel
        .wait_for_stderr(DEADLINE, |l| l.contains("\"listening\""))
        .unwrap_or_else(|| panic!("no listening line: {:?}", runnel.stderr()));
    let v: Value = serde_json::from_str(&line).unwrap();
    let addr = |k: &str| {
        field(&v, k)
            .and_then(Value::as_str)
            .map(|a| a.parse().unwrap())
    };
    let listen = addr("listen.addr").unwrap();
    let metrics = addr("metrics.addr");
    (runnel, listen, metrics)
}

/// The soft and hard "Max open files" of a process.
fn open_files_limits(pid: &str) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let nums: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (nums[0], nums[1])
}

/// A metric's value from a scrape (the first series whose line starts with `prefix`).
fn metric(metrics: SocketAddr, prefix: &str) -> f64 {
    let (_, body) = http_get(metrics, "/metrics", DEADLINE).unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_soft_descriptor_limit_is_raised_to_the_hard_limit_at_start() {
    let (_, hard) = open_files_limits("self");
    assert!(
        hard > 256,
        "the hard limit here ({hard}) leaves nothing to raise a soft 256 to"
    );
    let pki = pki();
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), Behaviour::Echo).await;
    // A limit the hard limit holds, whatever the default derives from this machine.
    let vars =
        support::gateway::binary_vars(&pki, gateway.addr, &[("RUNNEL_MAX_CONNECTIONS", "100")]);
    let (runnel, _, _) =
        tokio::task::spawn_blocking(move || spawn_limited("ulimit -Sn 256", &vars))
            .await
            .unwrap();
    let (soft, runnel_hard) = open_files_limits(&runnel.pid().to_string());
    assert_eq!(runnel_hard, hard);
    assert_eq!(soft, hard, "soft limit not raised: {soft} of {hard}");
    assert!(
        !runnel
            .stderr()
            .iter()
            .any(|l| l.contains("file descriptors")),
        "a warning with room to spare: {:?}",
        runnel.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_few_descriptors_cap_the_connections_with_one_warning_and_no_failures() {
    let pki = pki();
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), Behaviour::Echo).await;
    let vars = support::gateway::binary_vars(
        &pki,
        gateway.addr,
        &[
            ("RUNNEL_MAX_CONNECTIONS", "1000"),
            ("RUNNEL_POOL_MAX", "0"),
            ("RUNNEL_METRICS_ADDR", "127.0.0.1:0"),
        ],
    );
    // 160 descriptors, 64 kept free, no pool: (160 - 64) / 2 = 48 connections.
    let (runnel, listen, metrics) =
        tokio::task::spawn_blocking(move || spawn_limited("ulimit -n 160", &vars))
            .await
            .unwrap();
    let metrics = metrics.unwrap();
    let warnings: Vec<String> = runnel
        .stderr()
        .into_iter()
        .filter(|l| l.contains("file descriptors"))
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains(
            "1000 connections need 2064 file descriptors but the limit is 160; serving at most 48 at once"
        ),
        "{}",
        warnings[0]
    );
    assert!(warnings[0].contains("\"WARNING\""), "{}", warnings[0]);

    // Twice the cap, each asking for an echo: 48 are served, the rest wait.
    let mut streams = Vec::new();
    for _ in 0..96 {
        let mut s = tokio::net::TcpStream::connect(listen).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut s, b"x")
            .await
            .unwrap();
        streams.push(s);
    }
    let counts = move || {
        (
            metric(metrics, "runnel_downstream_connections_accepted_total "),
            metric(metrics, "runnel_downstream_connections_active "),
        )
    };
    let wait_for = |want: (f64, f64)| async move {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let got = tokio::task::spawn_blocking(counts).await.unwrap();
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "(accepted, active) = {got:?}, not {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    wait_for((48.0, 48.0)).await;
    // The backlog is first in, first out: the first 48 are the ones served.
    for s in &mut streams[..48] {
        echo(s).await;
    }
    // Closing ten lets ten waiting ones in.
    drop(streams.drain(..10));
    wait_for((58.0, 48.0)).await;
    for s in &mut streams[38..48] {
        echo(s).await;
    }
    let scrape = |prefix: &'static str| async move {
        tokio::task::spawn_blocking(move || metric(metrics, prefix))
            .await
            .unwrap()
    };
    assert_eq!(scrape("runnel_accept_errors_total ").await, 0.0);
    assert_eq!(scrape("runnel_upstream_errors_total").await, 0.0);
    let stderr = runnel.stderr();
    assert!(
        !stderr
            .iter()
            .any(|l| l.contains("accept failed") || l.contains("upstream connection failed")),
        "{stderr:?}"
    );
}

/// Waits for the one-byte echo of a connection that sent one byte.
async fn echo(s: &mut tokio::net::TcpStream) {
    let mut b = [0u8; 1];
    tokio::time::timeout(DEADLINE, tokio::io::AsyncReadExt::read_exact(s, &mut b))
        .await
        .expect("no echo")
        .expect("connection failed");
}

/// utime + stime of a process, in clock ticks (1/100 s on Linux).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_accept_backs_off_without_spinning_and_recovers() {
    let pki = pki();
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), Behaviour::Echo).await;
    let vars = support::gateway::binary_vars(
        &pki,
        gateway.addr,
        &[
            ("RUNNEL_WORKERS", "1"),
            ("RUNNEL_METRICS_ADDR", "127.0.0.1:0"),
        ],
    );
    let result = tokio::task::spawn_blocking(move || {
        let (runnel, addr, metrics) = spawn_limited("ulimit -n 48", &vars);
        let pid = runnel.pid();
        // The connection limit leaves descriptors free, so tunnel connections alone no
        // longer exhaust them: silent scrapes held open on the metrics port (each kept
        // up to 5 s, then the next from the backlog) take the rest.
        let held: Vec<TcpStream> = (0..60)
            .map(|_| TcpStream::connect(metrics.unwrap()).unwrap())
            .collect();
        let deadline = Instant::now() + DEADLINE;
        while std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
            < 47
        {
            assert!(
                Instant::now() < deadline,
                "runnel never ran out of descriptors"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // The held scrapes time out one by one and free a descriptor now and then, so a
        // trigger can still be accepted (its dial then fails for want of descriptors):
        // keep knocking until an accept itself fails.
        let mut triggers = Vec::new();
        let deadline = Instant::now() + DEADLINE;
        loop {
            let mut trigger = TcpStream::connect(addr).unwrap();
            trigger.write_all(b"x").unwrap();
            triggers.push(trigger);
            let failed = runnel.wait_for_stderr(Duration::from_millis(200), |l| {
                l.contains("accept failed; backing off")
            });
            if failed.is_some() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no accept error: {:?}",
                runnel.stderr()
            );
        }
        // Observe a window while out of descriptors: a spinning accept loop would burn
        // the whole window on one core.
        let before = cpu_ticks(pid);
        let window = Instant::now();
        std::thread::sleep(Duration::from_millis(1000));
        let used = cpu_ticks(pid) - before;
        let waited = window.elapsed();
        drop(held);
        drop(triggers);
        // Service resumes.
        let deadline = Instant::now() + DEADLINE;
        loop {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"back").unwrap();
            let mut buf = [0u8; 4];
            if s.read_exact(&mut buf).is_ok() && &buf == b"back" {
                break;
            }
            assert!(Instant::now() < deadline, "service did not resume");
        }
        (used, waited)
    })
    .await
    .unwrap();
    let (used, waited) = result;
    assert!(
        used < 30,
        "{used} ticks of CPU in {waited:?} while out of descriptors: accept is spinning"
    );
}
