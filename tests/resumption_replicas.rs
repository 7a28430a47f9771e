//! Session resumption across gateway replicas, with the real program and real Envoys.
//!
//! Two Envoy processes play two replicas of runnel's gateway (mutual TLS, the same
//! certificate, an SNI filter chain, as tests/envoy/gateway-replica.yaml describes), a
//! small TCP relay in front of them plays the internal passthrough load balancer and
//! alternates new connections between them, and runnel, with its pool off
//! (RUNNEL_POOL_MAX=0, so every downstream connection is a fresh upstream dial and
//! handshake), sits in front. Each replica gets the TLS patch of
//! deploy/istio/session-tickets.yaml, read from that file, and an SDS key file made by
//! deploy/istio/ticket-keys.sh: once with both replicas mounting the same file, once
//! with a file of their own each. The share of resumed handshakes, as runnel counts it
//! (`runnel_upstream_resumption_ratio`, the full and resumed handshake counters) and as
//! the Envoys count it (`ssl.handshake`, `ssl.session_reused`), must be clearly higher
//! with shared keys. A rotation done as deploy/README.md says must reach every replica
//! without a restart and cost no resumption.
//!
//! Invariant: every figure printed and asserted comes from a run of the same shape,
//! sequential connections that each finish a request, so that the TLS 1.3 tickets of
//! one connection (sent after its handshake) are in runnel's cache before the next
//! connection starts.

mod support;

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use runnel::{
    demo::{GATEWAY_NAME, Pki},
    metrics::{HANDSHAKES, RESUMPTION_RATIO},
};
use serde_json::Value;
use support::{
    envoy::Backend,
    process::{Listening, Process, Runnel, TempDir, clean_env, http_get, peer},
};

/// New downstream connections per run: enough that the first full handshake (and any
/// probe) weighs little, few enough to stay within seconds on a busy machine.
const CONNECTIONS: usize = 200;
/// Where deploy/ mounts the ticket-key Secret (its SDS file) on every gateway replica.
const DEPLOYED_KEY_DIR: &str = "/etc/runnel-ticket-keys";
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections before and after a key rotation.
const ROTATION_CONNECTIONS: usize = 50;
/// The SDS resource deploy/istio/ticket-keys.sh defines.
const TICKET_SECRET: &str = "runnel-session-ticket-keys";
/// How long a replica may take to see a rotation (inotify: milliseconds, normally).
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);

#[test]
fn replicas_sharing_ticket_keys_resume_most_handshakes_and_replicas_with_their_own_do_not() {
    let Some(envoy) = peer("TEST_ENVOY_BIN", "envoy") else {
        return;
    };
    let shared = run(&envoy, Keys::Shared);
    let separate = run(&envoy, Keys::Separate);
    println!("resumption over two gateway replicas, {CONNECTIONS} new connections each:");
    println!("  shared keys:   {shared}");
    println!("  separate keys: {separate}");

    for (what, figures) in [("shared", &shared), ("separate", &separate)] {
        assert!(
            figures.full + figures.resumed >= CONNECTIONS as u64,
            "{what}: runnel counted fewer handshakes than connections: {figures}"
        );
        assert!(
            figures.per_replica.iter().all(|r| r.connections > 0),
            "{what}: the balancer did not use both replicas: {figures}"
        );
        // The gateways resumed what runnel says resumed. A readiness probe in flight
        // while the counters are read may be counted by one side only.
        let envoy_reused: u64 = figures.per_replica.iter().map(|r| r.reused).sum();
        assert!(
            envoy_reused.abs_diff(figures.resumed) <= 2,
            "{what}: the gateways' session_reused ({envoy_reused}) is not runnel's resumed count: {figures}"
        );
    }
    assert!(
        shared.ratio > 0.8,
        "shared ticket keys: only {:.3} of handshakes resumed: {shared}",
        shared.ratio
    );
    assert!(
        separate.ratio < shared.ratio - 0.3,
        "separate keys resumed {:.3}, shared {:.3}: not clearly worse",
        separate.ratio,
        shared.ratio
    );
}

#[test]
fn rotated_ticket_keys_reach_every_replica_without_a_restart_and_earlier_tickets_still_resume() {
    let Some(envoy) = peer("TEST_ENVOY_BIN", "envoy") else {
        return;
    };
    let stack = Stack::start(&envoy, Keys::Shared);
    stack.connect(ROTATION_CONNECTIONS);
    let before = stack.figures();
    rotate(&stack.key_dirs[0], 1, Rotation::KeepPrevious);
    stack.wait_for_reload(2);
    stack.connect(ROTATION_CONNECTIONS);
    let after = stack.figures();
    let share = resumed_share(&before, &after);
    println!(
        "after a rotation of the shared keys (a fresh first key, the previous first key second), \
         {ROTATION_CONNECTIONS} new connections: {share:.3} resumed; {after}"
    );
    // The first connection after the rotation resumes a ticket made with the old first
    // key (now the second); the tickets it brings back are made with the new first key.
    assert!(
        share > 0.8,
        "only {share:.3} resumed after the rotation: {after}"
    );

    // The replicas really use the new keys: once both keys are replaced, the next
    // connection's ticket (made with the key just dropped) no longer resumes.
    rotate(&stack.key_dirs[0], 2, Rotation::DropAll);
    stack.wait_for_reload(3);
    stack.connect(1);
    let dropped = stack.figures();
    assert_eq!(
        (dropped.full - after.full, dropped.resumed - after.resumed),
        (1, 0),
        "a ticket made with a dropped key still resumed: the replicas kept the old keys"
    );
}

fn resumed_share(before: &Figures, after: &Figures) -> f64 {
    let full = after.full - before.full;
    let resumed = after.resumed - before.resumed;
    resumed as f64 / (full + resumed) as f64
}

/// Which session-ticket keys the two replicas get.
#[derive(Clone, Copy, Debug)]
enum Keys {
    /// One key directory, mounted by both (what deploy/ ships).
    Shared,
    /// A key directory of its own for each replica (an Envoy left alone).
    Separate,
}

/// What one run measured.
struct Figures {
    /// runnel's `runnel_upstream_resumption_ratio`.
    ratio: f64,
    /// runnel's successful full and resumed upstream handshakes.
    full: u64,
    resumed: u64,
    per_replica: Vec<ReplicaFigures>,
}

struct ReplicaFigures {
    /// Connections the balancer sent to this replica.
    connections: usize,
    /// Envoy's `listener.gateway.ssl.handshake` and `ssl.session_reused`.
    handshakes: u64,
    reused: u64,
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "runnel {RESUMPTION_RATIO} {:.3} (full {}, resumed {})",
            self.ratio, self.full, self.resumed
        )?;
        for (i, r) in self.per_replica.iter().enumerate() {
            write!(
                f,
                "; replica {i}: {} connections, ssl.handshake {}, ssl.session_reused {}",
                r.connections, r.handshakes, r.reused
            )?;
        }
        Ok(())
    }
}

/// Starts two replicas with `keys`, the balancer and runnel; makes CONNECTIONS new
/// connections through runnel, one after the other; reads the counters.
fn run(envoy: &Path, keys: Keys) -> Figures {
    let stack = Stack::start(envoy, keys);
    stack.connect(CONNECTIONS);
    stack.figures()
}

/// Two replicas, the balancer in front of them and runnel in front of it.
struct Stack {
    replicas: Vec<Replica>,
    balancer: RoundRobin,
    key_dirs: Vec<PathBuf>,
    listen: SocketAddr,
    metrics: SocketAddr,
    keys: Keys,
    _runnel: Runnel,
    _dir: TempDir,
}

impl Stack {
    fn start(envoy: &Path, keys: Keys) -> Stack {
        let dir = TempDir::new("resumption");
        let pki_dir = dir.path().join("pki");
        Pki::generate()
            .expect("generate the test PKI")
            .write_to(&pki_dir)
            .expect("write the test PKI");
        let backend = Backend::start();
        let key_dirs: Vec<PathBuf> = match keys {
            Keys::Shared => vec![key_dir(&dir.path().join("keys")); 2],
            Keys::Separate => (0..2)
                .map(|i| key_dir(&dir.path().join(format!("keys-{i}"))))
                .collect(),
        };
        let replicas: Vec<Replica> = key_dirs
            .iter()
            .enumerate()
            .map(|(i, keys)| Replica::start(envoy, &dir, i, &pki_dir, keys, backend.addr))
            .collect();
        let balancer = RoundRobin::start(replicas.iter().map(|r| r.addr).collect());

        let file = |name: &str| pki_dir.join(name).to_str().expect("UTF-8").to_owned();
        let upstream = balancer.addr.to_string();
        let (ca, cert, key) = (file("ca.pem"), file("client.pem"), file("client-key.pem"));
        let (runnel, Listening { listen, metrics }) = Runnel::serve(&[
            ("RUNNEL_UPSTREAM", &upstream),
            ("RUNNEL_SERVER_NAME", GATEWAY_NAME),
            ("RUNNEL_TLS_CA_FILE", &ca),
            ("RUNNEL_TLS_CERT_FILE", &cert),
            ("RUNNEL_TLS_KEY_FILE", &key),
            ("RUNNEL_LISTEN", "127.0.0.1:0"),
            ("RUNNEL_METRICS_ADDR", "127.0.0.1:0"),
            // Every downstream connection dials and handshakes anew: what is measured.
            ("RUNNEL_POOL_MAX", "0"),
            ("RUNNEL_LOG", "info"),
            ("RUNNEL_LOG_FORMAT", "json"),
        ]);
        Stack {
            replicas,
            balancer,
            key_dirs,
            listen,
            metrics: metrics.expect("runnel reports its metrics address"),
            keys,
            _runnel: runnel,
            _dir: dir,
        }
    }

    /// `count` new connections through runnel, one after the other, each a request
    /// answered in full.
    fn connect(&self, count: usize) {
        for n in 0..count {
            get_hello(self.listen).unwrap_or_else(|e| {
                panic!("{:?} keys, connection {n} through runnel: {e}", self.keys)
            });
        }
    }

    /// Waits until every replica has loaded the key directory `loads` times (the SDS
    /// file is read again when the kubelet-style swap lands in the watched directory).
    fn wait_for_reload(&self, loads: u64) {
        let deadline = Instant::now() + RELOAD_TIMEOUT;
        for (i, replica) in self.replicas.iter().enumerate() {
            loop {
                let updates = replica.counter(&format!("sds.{TICKET_SECRET}.update_success"));
                if updates >= loads {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "replica {i}: {updates} loads of the ticket keys, not {loads}, \
                     within {RELOAD_TIMEOUT:?}"
                );
                thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// runnel's and the replicas' counters now.
    fn figures(&self) -> Figures {
        let (status, text) =
            http_get(self.metrics, "/metrics", IO_TIMEOUT).expect("runnel /metrics");
        assert_eq!(status, 200, "runnel /metrics: {text}");
        let handshakes = |kind: &str| {
            sample(
                &text,
                &format!("{HANDSHAKES}{{kind=\"{kind}\",result=\"ok\"}}"),
            )
            .unwrap_or(0.0) as u64
        };
        Figures {
            ratio: sample(&text, RESUMPTION_RATIO)
                .unwrap_or_else(|| panic!("no {RESUMPTION_RATIO} in runnel's metrics:\n{text}")),
            full: handshakes("full"),
            resumed: handshakes("resumed"),
            per_replica: self
                .replicas
                .iter()
                .zip(&self.balancer.counts)
                .map(|(replica, count)| ReplicaFigures {
                    connections: count.load(Ordering::Relaxed),
                    handshakes: replica.counter("listener.gateway.ssl.handshake"),
                    reused: replica.counter("listener.gateway.ssl.session_reused"),
                })
                .collect(),
        }
    }
}

/// One HTTP/1.1 request through runnel on a new connection, read to the end.
fn get_hello(listen: SocketAddr) -> io::Result<()> {
    let mut stream = TcpStream::connect(listen)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(
        format!("GET /hello HTTP/1.1\r\nHost: {GATEWAY_NAME}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    if response.starts_with("HTTP/1.1 200") && response.ends_with("hello from the backend\n") {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "unexpected response {response:?}"
        )))
    }
}

/// A replica's key directory as the kubelet lays out a mounted Secret: the file is a
/// link through `..data` to a versioned directory, and an update swaps `..data` in one
/// rename. It holds the SDS file deploy/istio/ticket-keys.sh makes: two fresh keys.
fn key_dir(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("create the key directory");
    write_version(dir, 0, &ticket_keys(None));
    symlink(Path::new("..data").join("sds.yaml"), dir.join("sds.yaml")).expect("link sds.yaml");
    dir.to_owned()
}

/// How a rotation treats the keys in use.
#[derive(Clone, Copy)]
enum Rotation {
    /// As deploy/README.md says: ticket-keys.sh with the current file, so the current
    /// first key becomes the second and a fresh key the first.
    KeepPrevious,
    /// ticket-keys.sh alone: two fresh keys, every ticket issued so far unreadable.
    DropAll,
}

/// Rotates the keys in one atomic update of the directory (version `version`).
fn rotate(dir: &Path, version: u32, rotation: Rotation) {
    let sds = match rotation {
        Rotation::KeepPrevious => ticket_keys(Some(&dir.join("sds.yaml"))),
        Rotation::DropAll => ticket_keys(None),
    };
    write_version(dir, version, &sds);
}

/// Writes `..VERSION/sds.yaml` and points `..data` at it with a rename, as the kubelet
/// does.
fn write_version(dir: &Path, version: u32, sds: &str) {
    let versioned = dir.join(format!("..{version}"));
    std::fs::create_dir(&versioned).expect("create a key version");
    std::fs::write(versioned.join("sds.yaml"), sds).expect("write sds.yaml");
    let next = dir.join("..data_tmp");
    symlink(format!("..{version}"), &next).expect("link the new version");
    std::fs::rename(&next, dir.join("..data")).expect("swap ..data");
}

/// What `sh deploy/istio/ticket-keys.sh [previous]` prints.
fn ticket_keys(previous: Option<&Path>) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/istio/ticket-keys.sh");
    let mut command = Command::new("sh");
    command.arg(script).args(previous);
    clean_env(&mut command, &[] as &[(&str, &str)]);
    let output = command
        .output()
        .expect("run sh deploy/istio/ticket-keys.sh");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "ticket-keys.sh failed: {stderr}");
    String::from_utf8(output.stdout).expect("UTF-8")
}

/// One Envoy replica, killed on drop.
struct Replica {
    addr: SocketAddr,
    admin: SocketAddr,
    _envoy: Process,
}

impl Replica {
    fn start(
        envoy: &Path,
        dir: &TempDir,
        index: usize,
        pki: &Path,
        keys: &Path,
        backend: SocketAddr,
    ) -> Replica {
        let template = include_str!("envoy/gateway-replica.yaml")
            .replace("{{DIR}}", pki.to_str().expect("UTF-8"))
            .replace("{{SERVER_NAME}}", GATEWAY_NAME)
            .replace("{{BACKEND_PORT}}", &backend.port().to_string())
            .replace("{{NODE}}", &format!("replica-{index}"));
        assert!(
            !template.contains("{{"),
            "a placeholder is left:\n{template}"
        );
        let mut config: Value = serde_yaml_ng::from_str(&template).expect("replica template");
        let tls = &mut config["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"]
            ["typed_config"];
        let patch = deployed_tls_patch();
        let patch = serde_json::to_string(&patch)
            .expect("JSON")
            .replace(DEPLOYED_KEY_DIR, keys.to_str().expect("UTF-8"));
        let patch: Value = serde_json::from_str(&patch).expect("JSON");
        // Istio merges the patch's DownstreamTlsContext into the one it generates; the
        // patch adds fields the template does not have, so a field-wise insert is that
        // merge.
        for (field, value) in patch.as_object().expect("a map") {
            if field != "@type" {
                tls[field] = value.clone();
            }
        }
        let config_path = dir.path().join(format!("replica-{index}.json"));
        std::fs::write(&config_path, config.to_string()).expect("write the replica config");
        let admin_path = dir.path().join(format!("replica-{index}-admin"));
        let (envoy, admin, addr) = support::envoy::spawn(
            envoy,
            &format!("envoy replica {index}"),
            &config_path,
            &admin_path,
        );
        Replica {
            addr,
            admin,
            _envoy: envoy,
        }
    }

    /// The counter `name`, 0 when Envoy has not created it yet.
    fn counter(&self, name: &str) -> u64 {
        let (status, body) = http_get(self.admin, &format!("/stats?filter=^{name}$"), IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("envoy admin /stats: {e}"));
        assert_eq!(status, 200, "envoy admin /stats: {body}");
        body.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(": ")?.parse().ok())
            .unwrap_or(0)
    }
}

/// The internal passthrough load balancer, reduced to what matters here: each new TCP
/// connection goes to the next target in turn, bytes pass unchanged both ways. Its
/// threads end with the test process.
struct RoundRobin {
    addr: SocketAddr,
    /// Connections sent to each target.
    counts: Vec<Arc<AtomicUsize>>,
}

impl RoundRobin {
    fn start(targets: Vec<SocketAddr>) -> RoundRobin {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the balancer");
        let addr = listener.local_addr().expect("balancer address");
        let counts: Vec<Arc<AtomicUsize>> = targets.iter().map(|_| Arc::default()).collect();
        let shared = counts.clone();
        thread::spawn(move || {
            for (n, downstream) in listener.incoming().flatten().enumerate() {
                let i = n % targets.len();
                shared[i].fetch_add(1, Ordering::Relaxed);
                let target = targets[i];
                thread::spawn(move || {
                    if let Ok(upstream) = TcpStream::connect(target) {
                        relay(downstream, upstream);
                    }
                });
            }
        });
        RoundRobin { addr, counts }
    }
}

/// Copies both ways until each side has ended, passing each end on as a half-close.
fn relay(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let one_way = |mut from: TcpStream, mut to: TcpStream| {
        let _ = io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Write);
    };
    let back = thread::spawn(move || one_way(b2, a2));
    one_way(a, b);
    let _ = back.join();
}

/// The value of the sample `name` (with its labels, as the exporter writes them) in a
/// Prometheus text exposition.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The EnvoyFilter in deploy/istio/session-tickets.yaml: the DownstreamTlsContext
/// fields its one patch merges into the gateway's TLS filter chain.
fn deployed_tls_patch() -> Value {
    let filter = deployed_document("EnvoyFilter");
    let patches = filter["spec"]["configPatches"]
        .as_array()
        .expect("configPatches");
    assert_eq!(patches.len(), 1, "one patch expected: {patches:?}");
    let socket = &patches[0]["patch"]["value"]["transport_socket"];
    assert_eq!(socket["name"], "envoy.transport_sockets.tls");
    socket["typed_config"].clone()
}

fn deployed_document(kind: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/istio/session-tickets.yaml");
    let text = std::fs::read_to_string(&path).expect("read session-tickets.yaml");
    let doc: Value = serde_yaml_ng::from_str(&text).expect("YAML");
    assert_eq!(doc["kind"], kind, "{}", path.display());
    doc
}
