//! Out of file descriptors: accept backs off instead of spinning, and service resumes.

mod support;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use support::{
    gateway::{Behaviour, DEADLINE, Gateway, pki},
    process::{Process, clean_env, field},
};

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
    let vars = support::gateway::binary_vars(&pki, gateway.addr, &[("RUNNEL_WORKERS", "1")]);
    let result = tokio::task::spawn_blocking(move || {
        let mut command = std::process::Command::new("bash");
        command.args([
            "-c",
            "ulimit -n 48 && exec \"$0\"",
            env!("CARGO_BIN_EXE_runnel"),
        ]);
        clean_env(&mut command, &vars);
        let runnel = Process::spawn("runnel", command);
        let line = runnel
            .wait_for_stderr(DEADLINE, |l| l.contains("\"listening\""))
            .unwrap_or_else(|| panic!("no listening line: {:?}", runnel.stderr()));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let addr: SocketAddr = field(&v, "listen.addr")
            .unwrap()
            .as_str()
            .unwrap()
            .parse()
            .unwrap();

        // Hold more connections than the descriptor limit allows runnel to serve.
        let mut held = Vec::new();
        for _ in 0..60 {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"x").unwrap();
            held.push(s);
        }
        runnel
            .wait_for_stderr(DEADLINE, |l| l.contains("accept failed; backing off"))
            .unwrap_or_else(|| panic!("no accept error: {:?}", runnel.stderr()));
        // Observe a window while out of descriptors: a spinning accept loop would burn
        // the whole window on one core.
        let before = cpu_ticks(runnel.pid());
        let window = Instant::now();
        std::thread::sleep(Duration::from_millis(1000));
        let used = cpu_ticks(runnel.pid()) - before;
        let waited = window.elapsed();
        drop(held);
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
