//! A lossy, slow link for tests: a network namespace joined to the root namespace by a
//! veth pair, where the TCP packets of one port wait a fixed time each way and are lost
//! at random.
//!
//! Why this way: the kernel these tests run on has no netem (no `tc qdisc ... delay
//! loss`) and no nftables `queue` expression, but it has iptables' NFQUEUE target and
//! `statistic` match. The delay is an NFQUEUE delayer inside the test process (raw
//! netlink through socket2, no `unsafe`): it holds every queued packet for the one-way
//! delay, then accepts it. bench/lib/delayer.py does the same in Python but needs the
//! NetfilterQueue package, compiled against libnetfilter_queue; this needs no peer. A
//! delaying TCP relay would not do: it terminates TCP, so loss would never reach runnel.
//!
//! The loss is a `statistic --mode random` DROP in `filter`, after the NFQUEUE in
//! `mangle` (a packet the delayer accepts resumes at the next table, not at the next
//! rule). Dropping after the delay is what makes the loss real: queueing splits TCP's
//! 64 KiB GSO packets into wire-sized segments, so segments are lost one by one; and a
//! locally sent packet dropped on its first pass through OUTPUT is a send error that
//! TCP simply retries, while a drop after the delayer is silent, as on a wire.
//!
//! Invariant: whatever `create` and `impair` set up is undone on drop, panics included
//! (rules first, then the delayer, then the namespace, which takes the veth pair with
//! it). Names, queue number and subnet (a /30 in 198.18.0.0/15, the range RFC 2544
//! reserves for tests) come from the pid, so parallel test processes do not clash;
//! what a process killed outright left behind is swept by the next `create`.

use std::{
    collections::VecDeque,
    io::{self, Read, Write},
    net::Ipv4Addr,
    path::Path,
    process::Command,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, Socket, Type};

use super::process::missing_peer;

/// Namespace names and rule comments: this prefix and the pid.
const PREFIX: &str = "runnel-lossy-";
const QUEUES: &str = "/proc/net/netfilter/nfnetlink_queue";

/// A namespace joined to the root namespace by a veth pair.
pub struct LossyLink {
    /// The namespace's name, for `ip netns exec`.
    pub ns: String,
    /// The root namespace's end of the veth pair.
    pub root_addr: Ipv4Addr,
    /// The namespace's end.
    pub ns_addr: Ipv4Addr,
    root_dev: String,
    queue: u16,
    /// The command lines that delete each rule added.
    rules: Vec<String>,
    delayer: Option<Delayer>,
}

/// Packets seen by the delayer and dropped by the loss rules, per direction.
#[derive(Clone, Copy, Debug, Default)]
pub struct LinkCounts {
    /// Into the root namespace (toward the impaired port).
    pub up_packets: u64,
    pub up_dropped: u64,
    /// Out of the root namespace (from the impaired port).
    pub down_packets: u64,
    pub down_dropped: u64,
    /// Packets the kernel dropped because the queue was full (extra loss; should be 0).
    pub queue_full: u64,
    /// Queue messages the kernel could not deliver to the delayer (socket buffer full);
    /// such packets are released with the next batch, a little early.
    pub undelivered: u64,
}

impl LossyLink {
    /// Whether this machine can build the link: root, `ip netns`, `iptables` and kernel
    /// NFQUEUE support. When it cannot: a panic under `CI=true`, a loud note otherwise.
    pub fn available() -> bool {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let euid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1).map(str::to_owned));
        let missing = if euid.as_deref() != Some("0") {
            "root privileges (network namespaces, iptables)"
        } else if run("ip netns list").is_err() {
            "`ip netns` (Debian iproute2)"
        } else if run("iptables -V").is_err() {
            "iptables (Debian iptables)"
        } else if !Path::new(QUEUES).exists() {
            "kernel NFQUEUE support (nfnetlink_queue)"
        } else {
            return true;
        };
        missing_peer(missing);
        false
    }

    /// Creates the namespace and the veth pair, both ends up; no impairment yet.
    pub fn create() -> LossyLink {
        let pid = std::process::id();
        sweep_leftovers(pid);
        let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + (pid % 32_768) * 4;
        let link = LossyLink {
            ns: format!("{PREFIX}{pid}"),
            root_addr: Ipv4Addr::from(base + 1),
            ns_addr: Ipv4Addr::from(base + 2),
            root_dev: format!("rnl{pid}r"),
            queue: u16::try_from(10_000 + pid % 50_000).expect("below 60000"),
            rules: Vec::new(),
            delayer: None,
        };
        let (ns, root_dev, ns_dev) = (&link.ns, &link.root_dev, format!("rnl{pid}n"));
        must(&format!("ip netns add {ns}"));
        // From here on `link` owns the namespace: a failing step still removes it.
        must(&format!(
            "ip link add {root_dev} type veth peer name {ns_dev} netns {ns}"
        ));
        must(&format!("ip addr add {}/30 dev {root_dev}", link.root_addr));
        must(&format!("ip link set {root_dev} up"));
        must(&format!(
            "ip -n {ns} addr add {}/30 dev {ns_dev}",
            link.ns_addr
        ));
        must(&format!("ip -n {ns} link set {ns_dev} up"));
        must(&format!("ip -n {ns} link set lo up"));
        link
    }

    /// Delays every TCP packet to and from `port` on the root end by `one_way` in each
    /// direction, then drops it with `probability`.
    pub fn impair(&mut self, port: u16, one_way: Duration, probability: f64) {
        let delayer = Delayer::start(self.queue, one_way)
            .unwrap_or_else(|e| panic!("NFQUEUE delayer on queue {}: {e}", self.queue));
        self.delayer = Some(delayer);
        let (dev, tag) = (&self.root_dev, format!("-m comment --comment {}", self.ns));
        let up = format!("-i {dev} -p tcp --dport {port} {tag}");
        let down = format!("-o {dev} -p tcp --sport {port} {tag}");
        let delay = format!("-j NFQUEUE --queue-num {} --queue-bypass", self.queue);
        let loss = format!("-m statistic --mode random --probability {probability} -j DROP");
        for (table, chain, spec) in [
            ("mangle", "INPUT", format!("{up} {delay}")),
            ("mangle", "OUTPUT", format!("{down} {delay}")),
            ("filter", "INPUT", format!("{up} {loss}")),
            ("filter", "OUTPUT", format!("{down} {loss}")),
        ] {
            must(&format!("iptables -t {table} -A {chain} {spec}"));
            self.rules
                .push(format!("iptables -t {table} -D {chain} {spec}"));
        }
    }

    /// `ip netns exec <ns> program`: a command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.ns]).arg(program);
        command
    }

    /// What the delayer saw and the loss rules dropped so far.
    pub fn counts(&self) -> LinkCounts {
        let dropped = |chain: &str| -> u64 {
            let listing = must(&format!("iptables -t filter -L {chain} -v -n -x"));
            let tag = format!("/* {} */", self.ns);
            listing
                .lines()
                .filter(|l| l.contains(&tag) && l.contains("DROP"))
                .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
                .sum()
        };
        // /proc/net/netfilter/nfnetlink_queue: queue, portid, waiting, copy mode, copy
        // range, dropped for room, failed to reach the socket, last id, 1.
        let queues = std::fs::read_to_string(QUEUES).unwrap_or_default();
        let stats: Vec<u64> = queues
            .lines()
            .map(|l| {
                l.split_whitespace()
                    .filter_map(|w| w.parse().ok())
                    .collect::<Vec<u64>>()
            })
            .find(|fields| fields.first() == Some(&u64::from(self.queue)))
            .unwrap_or_default();
        let stat = |i: usize| stats.get(i).copied().unwrap_or(0);
        let (up, down) = self.delayer.as_ref().map_or((0, 0), |d| {
            let s = &d.shared;
            (s.up.load(Ordering::Relaxed), s.down.load(Ordering::Relaxed))
        });
        LinkCounts {
            up_packets: up,
            up_dropped: dropped("INPUT"),
            down_packets: down,
            down_dropped: dropped("OUTPUT"),
            queue_full: stat(5),
            undelivered: stat(6),
        }
    }
}

impl Drop for LossyLink {
    fn drop(&mut self) {
        for rule in self.rules.drain(..) {
            let _ = run(&rule);
        }
        drop(self.delayer.take());
        let _ = run(&format!("ip netns del {}", self.ns));
        let _ = run(&format!("ip link del {}", self.root_dev));
    }
}

/// Removes namespaces and rules of test processes that no longer exist (killed before
/// their `Drop` ran), and any of this pid's from an earlier life.
fn sweep_leftovers(pid: u32) {
    let dead = |name: &str| -> bool {
        name.strip_prefix(PREFIX)
            .and_then(|p| p.parse::<u32>().ok())
            .is_some_and(|p| p == pid || !Path::new(&format!("/proc/{p}")).exists())
    };
    let namespaces = run("ip netns list").unwrap_or_default();
    for ns in namespaces
        .lines()
        .filter_map(|l| l.split_whitespace().next())
    {
        if dead(ns) {
            // A killed test's children (runnel) outlive it and keep the namespace alive.
            let pids = run(&format!("ip netns pids {ns}")).unwrap_or_default();
            for pid in pids.split_whitespace() {
                let _ = run(&format!("kill -KILL {pid}"));
            }
            let _ = run(&format!("ip netns del {ns}"));
        }
    }
    for table in ["mangle", "filter"] {
        let listing = run(&format!("iptables -t {table} -S")).unwrap_or_default();
        for rule in listing.lines().filter_map(|l| l.strip_prefix("-A ")) {
            let mut words = rule.split_whitespace().skip_while(|w| *w != "--comment");
            if words.nth(1).is_some_and(|c| dead(c.trim_matches('"'))) {
                let _ = run(&format!("iptables -t {table} -D {rule}"));
            }
        }
    }
}

/// Runs a command line (words without spaces of their own) to its end: its stdout, or
/// its stderr as the error.
fn run(line: &str) -> Result<String, String> {
    let mut words = line.split_whitespace();
    let program = words.next().expect("a program");
    let out = Command::new(program)
        .args(words)
        .output()
        .map_err(|e| format!("{line}: {e}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(format!("{line}: {}: {}", out.status, stderr.trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn must(line: &str) -> String {
    run(line).unwrap_or_else(|e| panic!("{e}"))
}

/// Holds every packet of one NFQUEUE for a fixed time, then accepts it. The delay is
/// the same for all, so release order is arrival order: a FIFO, and one batch verdict
/// (accept every id up to this one) per release.
struct Delayer {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    held: Mutex<VecDeque<(Instant, u32)>>,
    arrived: Condvar,
    up: AtomicU64,
    down: AtomicU64,
}

// Netlink and nfnetlink_queue ABI (linux/netlink.h, linux/netfilter/nfnetlink_queue.h).
const AF_NETLINK: i32 = 16;
const NETLINK_NETFILTER: i32 = 12;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQNL_MSG_VERDICT_BATCH: u16 = 3;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_COPY_META: u8 = 1;
const NF_ACCEPT: u32 = 1;
const NF_INET_LOCAL_IN: u8 = 1;
/// Far above what 20 ms of a test's traffic holds, so the kernel never drops for room.
const QUEUE_MAXLEN: u32 = 65_536;
/// How often the threads look at the stop flag when there is nothing to do.
const TICK: Duration = Duration::from_millis(50);

impl Delayer {
    fn start(queue: u16, delay: Duration) -> io::Result<Delayer> {
        let socket = Socket::new(
            Domain::from(AF_NETLINK),
            Type::RAW,
            Some(Protocol::from(NETLINK_NETFILTER)),
        )?;
        // Room for bursts of queue messages (capped by net.core.rmem_max).
        socket.set_recv_buffer_size(4 << 20)?;
        socket.set_read_timeout(Some(TICK))?;
        let socket = Arc::new(socket);
        let bind = [NFQNL_CFG_CMD_BIND, 0, 0, 0];
        configure(&socket, queue, 1, &[(NFQA_CFG_CMD, &bind)])?;
        // Metadata only: the delayer needs the packet id, not the payload.
        let params = [0, 0, 0, 0, NFQNL_COPY_META];
        let maxlen = QUEUE_MAXLEN.to_be_bytes();
        configure(
            &socket,
            queue,
            2,
            &[(NFQA_CFG_PARAMS, &params), (NFQA_CFG_QUEUE_MAXLEN, &maxlen)],
        )?;
        let shared = Arc::new(Shared::default());
        let (s, sock) = (shared.clone(), socket.clone());
        let receive = thread::spawn(move || receive_packets(&sock, &s, delay));
        let (s, sock) = (shared.clone(), socket);
        let release = thread::spawn(move || release_packets(&sock, &s, queue));
        Ok(Delayer {
            shared,
            threads: vec![receive, release],
        })
    }
}

impl Drop for Delayer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.arrived.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        // Closing the socket unbinds the queue; the kernel drops what is still held.
    }
}

/// Reads queued packets' ids and stamps each with its release time.
fn receive_packets(socket: &Socket, shared: &Shared, delay: Duration) {
    let mut buf = vec![0u8; 256 * 1024];
    while !shared.stop.load(Ordering::Relaxed) {
        let n = match (&*socket).read(&mut buf) {
            Ok(n) => n,
            // The read timeout (look at the stop flag), or ENOBUFS: messages were lost to a
            // full socket buffer; their packets go with the next batch verdict.
            Err(_) => continue,
        };
        let due = Instant::now() + delay;
        let mut held = shared.held.lock().expect("held lock");
        for (kind, body) in messages(&buf[..n]) {
            if kind != (NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_PACKET) {
                continue; // a verdict's error reply (the packet was flushed): nothing to do
            }
            let Some((id, hook)) = packet_id(body) else {
                continue;
            };
            let counter = if hook == NF_INET_LOCAL_IN {
                &shared.up
            } else {
                &shared.down
            };
            counter.fetch_add(1, Ordering::Relaxed);
            held.push_back((due, id));
        }
        shared.arrived.notify_one();
    }
}

/// Accepts, oldest first, every packet whose time has come.
fn release_packets(socket: &Socket, shared: &Shared, queue: u16) {
    let mut held = shared.held.lock().expect("held lock");
    while !shared.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let wait = match held.front() {
            None => TICK,
            Some(&(due, _)) if due > now => due - now,
            Some(_) => {
                let mut last = 0;
                while let Some(&(_, id)) = held.front().filter(|(due, _)| *due <= now) {
                    last = id;
                    held.pop_front();
                }
                drop(held);
                let mut verdict = NF_ACCEPT.to_be_bytes().to_vec();
                verdict.extend_from_slice(&last.to_be_bytes());
                let msg = message(
                    NFQNL_MSG_VERDICT_BATCH,
                    0,
                    0,
                    queue,
                    &[(NFQA_VERDICT_HDR, &verdict)],
                );
                // A failed send leaves the packets queued; the next batch accepts them.
                let _ = (&*socket).write(&msg);
                held = shared.held.lock().expect("held lock");
                continue;
            }
        };
        held = shared
            .arrived
            .wait_timeout(held, wait)
            .expect("held lock")
            .0;
    }
}

/// Sends one queue configuration message and waits for the kernel's acknowledgement.
fn configure(socket: &Socket, queue: u16, seq: u32, attrs: &[(u16, &[u8])]) -> io::Result<()> {
    (&*socket).write_all(&message(NFQNL_MSG_CONFIG, NLM_F_ACK, seq, queue, attrs))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 64 * 1024];
    while Instant::now() < deadline {
        let n = match (&*socket).read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        for (kind, body) in messages(&buf[..n]) {
            if kind == NLMSG_ERROR && body.len() >= 4 {
                let code = i32::from_ne_bytes(body[..4].try_into().expect("4 bytes"));
                return if code == 0 {
                    Ok(())
                } else {
                    Err(io::Error::from_raw_os_error(-code))
                };
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        "no acknowledgement from nfnetlink_queue",
    ))
}

/// One nfnetlink_queue request: netlink header, nfgenmsg (queue number), attributes.
fn message(kind: u16, flags: u16, seq: u32, queue: u16, attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut m = vec![0u8; 16];
    m.extend_from_slice(&[0, 0]); // AF_UNSPEC, NFNETLINK_V0
    m.extend_from_slice(&queue.to_be_bytes());
    for (attr, payload) in attrs {
        let len = u16::try_from(4 + payload.len()).expect("small attribute");
        m.extend_from_slice(&len.to_ne_bytes());
        m.extend_from_slice(&attr.to_ne_bytes());
        m.extend_from_slice(payload);
        m.resize(m.len().next_multiple_of(4), 0);
    }
    let len = u32::try_from(m.len()).expect("small message");
    m[0..4].copy_from_slice(&len.to_ne_bytes());
    m[4..6].copy_from_slice(&(NFNL_SUBSYS_QUEUE << 8 | kind).to_ne_bytes());
    m[6..8].copy_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    m
}

/// The netlink messages in one datagram: (type, body after the 16-byte header).
fn messages(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = u32::from_ne_bytes(data.get(0..4)?.try_into().ok()?) as usize;
        if len < 16 || len > data.len() {
            return None;
        }
        let kind = u16::from_ne_bytes(data[4..6].try_into().ok()?);
        let body = &data[16..len];
        data = &data[len.next_multiple_of(4).min(data.len())..];
        Some((kind, body))
    })
}

/// The packet id and netfilter hook from a queued packet's attributes.
fn packet_id(body: &[u8]) -> Option<(u32, u8)> {
    let mut attrs = body.get(4..)?; // after nfgenmsg
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes(attrs[0..2].try_into().ok()?) as usize;
        let kind = u16::from_ne_bytes(attrs[2..4].try_into().ok()?) & 0x3fff;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if kind == NFQA_PACKET_HDR && len >= 11 {
            let id = u32::from_be_bytes(attrs[4..8].try_into().ok()?);
            return Some((id, attrs[10]));
        }
        attrs = &attrs[len.next_multiple_of(4).min(attrs.len())..];
    }
    None
}
