//! An NFQUEUE delayer served by the test process: it holds every packet of one queue
//! for a fixed time, then accepts it, over raw netlink (socket2, no `unsafe`). It is
//! what `netns` uses for delay, since this kernel has no netem; see that module for why.

use std::{
    collections::VecDeque,
    io::{self, Read, Write},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, Socket, Type};

/// Holds every packet of one NFQUEUE for a fixed time, then accepts it. The delay is
/// the same for all, so release order is arrival order: a FIFO, and one batch verdict
/// (accept every id up to this one) per release.
pub struct Delayer {
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
    /// Packets queued so far: (to the gateway, from the gateway).
    pub fn packets(&self) -> (u64, u64) {
        let s = &self.shared;
        (s.up.load(Ordering::Relaxed), s.down.load(Ordering::Relaxed))
    }

    pub fn start(queue: u16, delay: Duration) -> io::Result<Delayer> {
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
