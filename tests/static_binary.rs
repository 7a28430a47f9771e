//! The image, proven without a container engine: the release binary built the way the
//! Dockerfile's builder stage builds it (`+crt-static`, explicit target) runs in an
//! empty root directory, which is all that distroless/static or scratch give it.
//!
//! Each test copies only the binary (plus the files it names: secrets, and
//! `/etc/resolv.conf` and `/etc/hosts` for DNS) into a fresh directory and starts it
//! there with `chroot` (which needs root). The binary is built once per test run with
//! the Dockerfile's command into `target/static` (incremental, so it follows the
//! source); `RUNNEL_STATIC_BIN` names a prebuilt one instead. The size and start-up
//! times are written to the test output.

mod support;

use std::{
    io::Write,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use runnel::demo::{self, Pki};
use serde_json::Value;
use support::process::{Process, TempDir, clean_env, field, http_get, missing_peer, peer};
use tokio_util::sync::CancellationToken;

/// The builder stage's target and flags; `dockerfile_builds_the_binary_this_test_runs`
/// keeps the Dockerfile saying the same.
const TARGET: &str = "x86_64-unknown-linux-gnu";
const RUSTFLAGS: &str =
    r#"-C target-feature=+crt-static --cfg getrandom_backend="linux_getrandom""#;
/// The build environment (aws-lc without CPU jitter entropy): set by `.cargo/config.toml`
/// for every build, this one and the image's included, never by the Dockerfile itself.
const BUILD_ENV: (&str, &str) = ("AWS_LC_SYS_NO_JITTER_ENTROPY", "1");
/// A cold release build takes about 5 minutes on 2 cores; an incremental one seconds.
const BUILD_TIMEOUT: Duration = Duration::from_secs(30 * 60);
const TIMEOUT: Duration = Duration::from_secs(20);

#[test]
fn static_binary_needs_no_program_interpreter() {
    let Some(binary) = static_binary() else {
        return;
    };
    let elf = std::fs::read(binary).unwrap();
    let kinds = program_header_types(&elf);
    assert!(
        !kinds.is_empty(),
        "{}: no program headers",
        binary.display()
    );
    assert!(
        !kinds.contains(&PT_INTERP),
        "{} asks for a dynamic loader (PT_INTERP): it cannot start in distroless/static",
        binary.display()
    );
    let size = elf.len();
    report(&format!(
        "static binary {}: {size} bytes ({:.2} MiB)",
        binary.display(),
        size as f64 / (1024.0 * 1024.0)
    ));
}

#[test]
fn help_runs_in_an_empty_root() {
    let Some(root) = EmptyRoot::new("help", &[]) else {
        return;
    };
    let started = Instant::now();
    let finished = root.spawn("help", &["--help"], &[]).finish(TIMEOUT);
    let elapsed = started.elapsed();
    assert_eq!(finished.status.code(), Some(0), "{:?}", finished.stderr);
    let out = finished.stdout.join("\n");
    for expected in ["Usage: runnel", "RUNNEL_UPSTREAM", "RUNNEL_METRICS_ADDR"] {
        assert!(out.contains(expected), "{expected:?} missing from:\n{out}");
    }
    report(&format!("empty root: `runnel --help` ran in {elapsed:?}"));
}

#[test]
fn demo_serves_a_page_from_an_empty_root() {
    let Some(root) = EmptyRoot::new("demo", &[]) else {
        return;
    };
    let args = ["demo", "--listen", "127.0.0.1:0", "--metrics", "off"];
    let mut demo = root.spawn("runnel demo", &args, &[]);
    let addr = wait_for_curl_line(&demo);
    let (status, body) = http_get(addr, "/", TIMEOUT).unwrap();
    assert_eq!(status, 200, "{body}");
    let identity = format!("client identity: {}", demo::CLIENT_SPIFFE_ID);
    assert!(body.contains(&identity), "{body}");
    demo.signal("TERM");
    assert_eq!(demo.wait_exit(TIMEOUT).and_then(|s| s.code()), Some(0));
}

#[test]
fn serve_starts_in_an_empty_root_and_tunnels_to_the_gateway() {
    let pki = Pki::generate().unwrap();
    let Some(root) = EmptyRoot::new("serve", &secret_files(&pki)) else {
        return;
    };
    let gateway = DemoGateway::start(&pki);
    let upstream = gateway.addr.to_string();
    let mut vars = serve_vars(&upstream);
    vars.push(("RUNNEL_SERVER_NAME", demo::GATEWAY_NAME));
    let started = Instant::now();
    let mut runnel = root.spawn("runnel", &[], &vars);
    let (listen, metrics) = wait_for_listening(&runnel);
    let elapsed = started.elapsed();
    assert_tunnel_reaches_the_gateway(listen);
    let (status, _) = http_get(metrics, "/readyz", TIMEOUT).unwrap();
    assert_eq!(status, 200);
    runnel.signal("TERM");
    assert_eq!(runnel.wait_exit(TIMEOUT).and_then(|s| s.code()), Some(0));
    report(&format!(
        "empty root: `runnel` (serve) from exec to its \"listening\" line in {elapsed:?}"
    ));
}

#[test]
fn upstream_dns_name_resolves_in_an_empty_root_through_resolv_conf() {
    let pki = Pki::generate().unwrap();
    let dns = DnsResponder::start(demo::GATEWAY_NAME, Ipv4Addr::LOCALHOST);
    let resolv_conf = format!("nameserver {}\noptions timeout:2 attempts:2\n", dns.addr);
    let mut files = secret_files(&pki);
    files.push(("etc/resolv.conf".into(), resolv_conf));
    // The name is deliberately not in /etc/hosts: the answer must come from DNS.
    files.push((
        "etc/hosts".into(),
        "127.0.0.1 localhost\n::1 localhost\n".into(),
    ));
    let Some(root) = EmptyRoot::new("dns", &files) else {
        return;
    };
    let gateway = DemoGateway::start(&pki);
    let upstream = format!("{}:{}", demo::GATEWAY_NAME, gateway.addr.port());
    let runnel = root.spawn("runnel", &[], &serve_vars(&upstream));
    let (listen, _) = wait_for_listening(&runnel);
    assert_tunnel_reaches_the_gateway(listen);
    assert!(
        dns.queries() > 0,
        "the DNS server on {} saw no A query for {}",
        dns.addr,
        demo::GATEWAY_NAME
    );
}

#[test]
fn dockerfile_builds_the_binary_this_test_runs() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    for expected in [
        format!("RUSTFLAGS='{RUSTFLAGS}'"),
        "COPY .cargo/config.toml ./.cargo/".to_owned(),
        format!("cargo build --release --locked --target {TARGET}"),
        format!("target/{TARGET}/release/runnel"),
        "ENTRYPOINT [\"/runnel\"]".to_owned(),
        format!("ARG RUNNEL_VERSION={}", env!("CARGO_PKG_VERSION")),
    ] {
        assert!(
            dockerfile.contains(&expected),
            "Dockerfile lacks {expected:?}"
        );
    }
    let froms: Vec<&str> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("FROM "))
        .collect();
    assert_eq!(froms.len(), 2, "a builder and a runtime stage: {froms:?}");
    let builder = froms[0].split_whitespace().next().unwrap();
    let tag = builder.strip_prefix("rust:").expect("official rust image");
    let version = tag.split('-').next().unwrap();
    assert_eq!(version.split('.').count(), 3, "pin rust:X.Y.Z, not {tag}");
    let runtime = froms[1];
    assert!(
        runtime.starts_with("gcr.io/distroless/static") || runtime == "scratch",
        "runtime stage on {runtime}"
    );
    let user = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("USER "))
        .next_back()
        .expect("a USER line");
    assert!(!["root", "0", "0:0"].contains(&user.trim()), "USER {user}");
}

#[test]
fn every_build_reads_the_build_environment_from_the_cargo_config() {
    // One place: the Dockerfile keeps no copy that could drift from it.
    let config = std::fs::read_to_string(repo().join(".cargo/config.toml")).unwrap();
    let line = format!("{} = \"{}\"", BUILD_ENV.0, BUILD_ENV.1);
    let env_table = config.split("\n[").find(|t| t.starts_with("env]"));
    assert!(
        env_table.is_some_and(|t| t.lines().any(|l| l.trim() == line)),
        ".cargo/config.toml lacks {line:?} under [env]"
    );
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    assert!(
        !dockerfile
            .lines()
            .any(|l| l.starts_with("ENV ") && l.contains(BUILD_ENV.0)),
        "the Dockerfile sets {} itself: keep it in .cargo/config.toml only",
        BUILD_ENV.0
    );
    // And cargo hands it to this very build (rustc saw it when compiling this test).
    assert_eq!(
        option_env!("AWS_LC_SYS_NO_JITTER_ENTROPY"),
        Some(BUILD_ENV.1)
    );
}

#[test]
fn dockerfile_copies_all_that_the_release_build_reads() {
    // The builder copies Cargo.toml, Cargo.lock, .cargo/config.toml and src/ only: a
    // build script, another cargo config or an explicitly declared target elsewhere
    // would break the image build.
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    for copied in ["COPY Cargo.toml Cargo.lock ./", "COPY src ./src"] {
        assert!(dockerfile.contains(copied), "Dockerfile lacks {copied:?}");
    }
    for extra in ["build.rs", ".cargo/config.toml", ".cargo/config"] {
        let copied = dockerfile.contains(&format!("COPY {extra}"));
        assert!(
            !repo().join(extra).exists() || copied,
            "{extra} exists but the Dockerfile does not copy it"
        );
    }
    let manifest = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    for table in ["[[bin]]", "[[bench]]", "[[example]]", "[[test]]", "build ="] {
        assert!(
            !manifest.contains(table),
            "Cargo.toml has {table}: check that the Dockerfile copies what it names"
        );
    }
}

#[test]
fn dockerfile_is_hadolint_clean() {
    let Some(hadolint) = peer("HADOLINT", "hadolint") else {
        return;
    };
    let output = Command::new(hadolint)
        .args(["--no-color", "Dockerfile"])
        .current_dir(repo())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "hadolint Dockerfile:\n{text}");
    assert!(text.trim().is_empty(), "hadolint Dockerfile:\n{text}");
}

/// An empty directory holding the static binary as `/runnel`, and nothing else but the
/// files a test names.
struct EmptyRoot {
    dir: TempDir,
    chroot: PathBuf,
}

impl EmptyRoot {
    /// `None` (after a note, or a panic under CI) when this machine cannot chroot.
    fn new(label: &str, files: &[(String, String)]) -> Option<EmptyRoot> {
        let binary = static_binary()?;
        let chroot = chroot_command()?;
        let dir = TempDir::new(&format!("empty-root-{label}"));
        std::fs::copy(binary, dir.path().join("runnel")).unwrap();
        for (path, text) in files {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        Some(EmptyRoot { dir, chroot })
    }

    /// Starts `/runnel args` inside the root with only `vars` (and PATH) set.
    fn spawn(&self, name: &str, args: &[&str], vars: &[(&str, &str)]) -> Process {
        let mut command = Command::new(&self.chroot);
        command.arg(self.dir.path()).arg("/runnel").args(args);
        clean_env(&mut command, vars);
        Process::spawn(name, command)
    }
}

/// The demo's gateway (mTLS, a page naming the client identity) on its own runtime.
struct DemoGateway {
    addr: SocketAddr,
    stop: CancellationToken,
    _runtime: tokio::runtime::Runtime,
}

impl DemoGateway {
    fn start(pki: &Pki) -> DemoGateway {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let tls = pki.gateway_tls(&[b"http/1.1"]).unwrap();
        let stop = CancellationToken::new();
        runtime.spawn(demo::serve_gateway(listener, tls, stop.clone()));
        DemoGateway {
            addr,
            stop,
            _runtime: runtime,
        }
    }
}

impl Drop for DemoGateway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A DNS server on port 53 of a loopback address of its own: it answers A queries for
/// one name with one address, anything else with no answer, and counts the A queries.
struct DnsResponder {
    addr: Ipv4Addr,
    queries: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DnsResponder {
    fn start(name: &str, answer: Ipv4Addr) -> DnsResponder {
        // resolv.conf has no port syntax, so the server must be on 53; a loopback
        // address of its own (127.53.x.y) keeps it clear of any local resolver.
        let n = std::process::id();
        let (addr, socket) = (1..=32u8)
            .map(|k| Ipv4Addr::new(127, 53, (n % 251) as u8 + 1, k))
            .find_map(|addr| UdpSocket::bind((addr, 53)).ok().map(|s| (addr, s)))
            .expect("cannot bind UDP port 53 on any 127.53.x.y address");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let queries = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (name, count, done) = (name.to_ascii_lowercase(), queries.clone(), stop.clone());
        let thread = thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !done.load(Ordering::Relaxed) {
                let Ok((len, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                if let Some((response, asked)) = dns_reply(&buf[..len], &name, answer) {
                    if asked {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = socket.send_to(&response, from);
                }
            }
        });
        DnsResponder {
            addr,
            queries,
            stop,
            thread: Some(thread),
        }
    }

    fn queries(&self) -> usize {
        self.queries.load(Ordering::Relaxed)
    }
}

impl Drop for DnsResponder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The response to one query, and whether it was an A query for `name`. Only what a
/// stub resolver sends is understood: one question, no compression in it.
fn dns_reply(query: &[u8], name: &str, answer: Ipv4Addr) -> Option<(Vec<u8>, bool)> {
    const A: u16 = 1;
    const IN: u16 = 1;
    if query.len() < 12 || u16::from_be_bytes([query[4], query[5]]) != 1 {
        return None;
    }
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*query.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(at..at + len)?).to_ascii_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    let qclass = u16::from_be_bytes([*query.get(at + 2)?, *query.get(at + 3)?]);
    let question = &query[12..at + 4];
    let known = labels.join(".") == name;
    let asked = known && qtype == A && qclass == IN;
    let mut out = Vec::with_capacity(question.len() + 32);
    out.extend_from_slice(&query[..2]);
    // QR and AA set, opcode and RD echoed; RA set; NOERROR, or NXDOMAIN for other names.
    out.push(0x84 | (query[2] & 0x79));
    out.push(if known { 0x80 } else { 0x83 });
    out.extend_from_slice(&[0, 1, 0, u8::from(asked), 0, 0, 0, 0]);
    out.extend_from_slice(question);
    if asked {
        out.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
        out.extend_from_slice(&answer.octets());
    }
    Some((out, asked))
}

/// The client certificate, key and CA at the paths deploy/cloudrun/service.yaml mounts
/// them, relative to the root.
fn secret_files(pki: &Pki) -> Vec<(String, String)> {
    vec![
        ("secrets/ca/ca.pem".into(), pki.ca_cert_pem.clone()),
        (
            "secrets/cert/client.pem".into(),
            pki.client.cert_pem.clone(),
        ),
        (
            "secrets/key/client-key.pem".into(),
            pki.client.key_pem.clone(),
        ),
    ]
}

fn serve_vars(upstream: &str) -> Vec<(&str, &str)> {
    vec![
        ("RUNNEL_UPSTREAM", upstream),
        ("RUNNEL_TLS_CA_FILE", "/secrets/ca/ca.pem"),
        ("RUNNEL_TLS_CERT_FILE", "/secrets/cert/client.pem"),
        ("RUNNEL_TLS_KEY_FILE", "/secrets/key/client-key.pem"),
        ("RUNNEL_LISTEN", "127.0.0.1:0"),
        ("RUNNEL_METRICS_ADDR", "127.0.0.1:0"),
    ]
}

fn assert_tunnel_reaches_the_gateway(listen: SocketAddr) {
    let (status, body) = http_get(listen, "/", TIMEOUT).unwrap();
    assert_eq!(status, 200, "{body}");
    let identity = format!("client identity: {}", demo::CLIENT_SPIFFE_ID);
    assert!(body.contains(&identity), "{body}");
}

/// Waits for runnel's JSON "listening" line: the tunnel and metrics addresses.
fn wait_for_listening(runnel: &Process) -> (SocketAddr, SocketAddr) {
    let line = runnel
        .wait_for_stderr(TIMEOUT, |line| line.contains("\"listening\""))
        .unwrap_or_else(|| panic!("no \"listening\" line: {:?}", runnel.stderr()));
    let v: Value = serde_json::from_str(&line).unwrap();
    let addr = |key: &str| -> SocketAddr {
        let text = field(&v, key).and_then(Value::as_str);
        text.unwrap_or_else(|| panic!("no {key} in {line}"))
            .parse()
            .unwrap()
    };
    (addr("listen.addr"), addr("metrics.addr"))
}

/// Waits (polling, with a deadline) for the demo's `curl http://ADDR/` line on stdout.
fn wait_for_curl_line(demo: &Process) -> SocketAddr {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let found = demo.stdout().iter().find_map(|l| {
            let rest = l.trim().strip_prefix("curl http://")?;
            rest.strip_suffix('/')?.parse().ok()
        });
        if let Some(addr) = found {
            return addr;
        }
        assert!(
            Instant::now() < deadline,
            "demo printed no curl line: {:?} {:?}",
            demo.stdout(),
            demo.stderr()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// The static binary: `RUNNEL_STATIC_BIN`, or built once per run with the Dockerfile's
/// command. `None` only when cargo is missing outside CI.
fn static_binary() -> Option<&'static Path> {
    static BINARY: OnceLock<Option<PathBuf>> = OnceLock::new();
    BINARY
        .get_or_init(|| match std::env::var_os("RUNNEL_STATIC_BIN") {
            Some(path) => Some(PathBuf::from(path)),
            None => build_static_binary(),
        })
        .as_deref()
}

fn build_static_binary() -> Option<PathBuf> {
    let target_dir = repo().join("target").join("static");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(&cargo);
    command
        .args(["build", "--release", "--locked", "--target", TARGET])
        .current_dir(repo())
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("RUSTFLAGS", RUSTFLAGS)
        // The cargo config must supply it, as it does in the image.
        .env_remove(BUILD_ENV.0)
        // These would override RUSTFLAGS or the target; the outer cargo may set them.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET");
    let started = Instant::now();
    let mut build = Process::spawn("cargo build (static)", command);
    let status = build
        .wait_exit(BUILD_TIMEOUT)
        .unwrap_or_else(|| panic!("the static build took longer than {BUILD_TIMEOUT:?}"));
    assert!(
        status.success(),
        "static build failed ({status}):\n{}",
        build.stderr().join("\n")
    );
    report(&format!(
        "static build (RUSTFLAGS='{RUSTFLAGS}' cargo build --release --locked --target {TARGET}): {:?}",
        started.elapsed()
    ));
    Some(target_dir.join(TARGET).join("release").join("runnel"))
}

/// `chroot`, when this process may use it (root); otherwise a note, or a panic under CI.
fn chroot_command() -> Option<PathBuf> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1).map(str::to_owned));
    if euid.as_deref() != Some("0") {
        missing_peer("root privileges (the empty-root tests chroot)");
        return None;
    }
    ["/usr/sbin/chroot", "/sbin/chroot", "/usr/bin/chroot"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .or_else(|| peer("CHROOT", "chroot"))
}

const PT_INTERP: u32 = 3;

/// The `p_type` of every program header of a 64-bit little-endian ELF file.
fn program_header_types(elf: &[u8]) -> Vec<u32> {
    assert!(
        elf.len() > 64 && elf[..4] == *b"\x7fELF" && elf[4] == 2 && elf[5] == 1,
        "not a 64-bit little-endian ELF file"
    );
    let u16_at = |at: usize| usize::from(u16::from_le_bytes([elf[at], elf[at + 1]]));
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (entry_size, count) = (u16_at(0x36), u16_at(0x38));
    (0..count)
        .map(|i| {
            let at = phoff + i * entry_size;
            u32::from_le_bytes(elf[at..at + 4].try_into().unwrap())
        })
        .collect()
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Writes a line to the real stdout: `cargo test` captures `println!` of passing tests,
/// and these numbers (size, times) are the point of the run.
fn report(line: &str) {
    let _ = writeln!(std::io::stdout(), "[static_binary] {line}");
}
