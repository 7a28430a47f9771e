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

use std::{net::Ipv4Addr, path::Path, process::Command, time::Duration};

use super::{nfqueue::Delayer, process::missing_peer};

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
        let (up, down) = self.delayer.as_ref().map_or((0, 0), Delayer::packets);
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

impl LossyLink {
    /// Drops every TCP packet to and from `port` on the root end, both ways, silently:
    /// a gateway that vanished (a dead node, a path that black-holes).
    pub fn black_hole(&mut self, port: u16) {
        let (dev, tag) = (&self.root_dev, format!("-m comment --comment {}", self.ns));
        for (chain, spec) in [
            (
                "INPUT",
                format!("-i {dev} -p tcp --dport {port} {tag} -j DROP"),
            ),
            (
                "OUTPUT",
                format!("-o {dev} -p tcp --sport {port} {tag} -j DROP"),
            ),
        ] {
            must(&format!("iptables -t filter -I {chain} {spec}"));
            self.rules
                .push(format!("iptables -t filter -D {chain} {spec}"));
        }
    }

    /// Starts the runnel binary inside the namespace with `vars` (listening on the
    /// namespace's address) and waits for its "listening" line: the process and the
    /// address it listens on.
    pub async fn start_runnel(
        &self,
        vars: Vec<(String, String)>,
    ) -> (super::process::Process, std::net::SocketAddr) {
        use super::process::{Process, START_TIMEOUT, clean_env, field};
        use serde_json::Value;
        let mut command = self.command(env!("CARGO_BIN_EXE_runnel"));
        clean_env(&mut command, &vars);
        tokio::task::spawn_blocking(move || {
            let runnel = Process::spawn("runnel", command);
            let line = runnel.wait_for_stderr(START_TIMEOUT, |line| {
                serde_json::from_str::<Value>(line).is_ok_and(|v| {
                    field(&v, "message").and_then(Value::as_str) == Some("listening")
                })
            });
            let line = line.unwrap_or_else(|| {
                panic!(
                    "runnel did not log \"listening\" within {START_TIMEOUT:?}:\n{}",
                    runnel.stderr().join("\n")
                )
            });
            let v: Value = serde_json::from_str(&line).expect("checked above");
            let addr = field(&v, "listen.addr")
                .and_then(Value::as_str)
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("no listen.addr in {line}"));
            (runnel, addr)
        })
        .await
        .unwrap()
    }
}
