//! The real Envoy as an Istio-like ingress gateway, and the backend it routes to.
//!
//! `Gateway::start` writes the test PKI and `tests/envoy/gateway.yaml` into a temporary
//! directory, starts a `Backend` and Envoy in front of it, and waits, with a deadline,
//! until Envoy's admin API says it is live and reports the port its listener bound.
//! Invariant: no port is chosen by the test. Envoy binds its listener and admin ports
//! itself (port 0) and we read them back, so nothing can take a port between choosing
//! and binding it; the backend binds `127.0.0.1:0` before Envoy starts.
//!
//! The backend is a small HTTP/1.1 server on threads: `/hello`, `/headers` (echoes the
//! request headers, so a test sees what the gateway added), `/upload` (answers the byte
//! count and SHA-256 of the body), `/download?bytes=N&seed=S` (a deterministic stream,
//! see `Pattern`) and `/ws` (a WebSocket echo).

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use runnel::demo::Pki;

use super::process::{Process, TempDir, clean_env, http_get, missing_peer, peer};

/// The SNI the gateway's only filter chain matches, as an Istio Gateway `hosts` entry.
pub const SERVER_NAME: &str = runnel::demo::GATEWAY_NAME;

const CONFIG_TEMPLATE: &str = include_str!("../envoy/gateway.yaml");
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const ADMIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Envoy in front of a `Backend`, killed on drop.
pub struct Gateway {
    /// Where Envoy's TLS listener accepts (127.0.0.1, an ephemeral port).
    pub addr: SocketAddr,
    /// Envoy's admin API.
    pub admin: SocketAddr,
    /// The PKI files: ca.pem, gateway.pem, gateway-key.pem, client.pem, client-key.pem.
    pub pki_dir: PathBuf,
    pub backend: Backend,
    envoy: Process,
    _dir: TempDir,
}

impl Gateway {
    /// Finds Envoy (`$TEST_ENVOY_BIN`, else `envoy` on PATH); `None` (or a panic under
    /// `CI=true`) when it is missing.
    pub fn find_envoy() -> Option<PathBuf> {
        peer("TEST_ENVOY_BIN", "envoy")
    }

    /// Starts the backend and Envoy with a fresh PKI, and waits until Envoy is ready.
    pub fn start(envoy: &Path) -> Gateway {
        let dir = TempDir::new("envoy");
        let pki = Pki::generate().expect("generate the test PKI");
        let pki_dir = dir.path().join("pki");
        pki.write_to(&pki_dir).expect("write the test PKI");
        let backend = Backend::start();
        let config = CONFIG_TEMPLATE
            .replace(
                "{{DIR}}",
                pki_dir.to_str().expect("temporary path is UTF-8"),
            )
            .replace("{{SERVER_NAME}}", SERVER_NAME)
            .replace("{{BACKEND_PORT}}", &backend.addr.port().to_string());
        assert!(
            !config.contains("{{"),
            "a placeholder is left in the Envoy config:\n{config}"
        );
        let config_path = dir.path().join("envoy.yaml");
        std::fs::write(&config_path, config).expect("write the Envoy config");
        let admin_path = dir.path().join("admin-address");

        let (envoy, admin, addr) = spawn(envoy, "envoy", &config_path, &admin_path);
        Gateway {
            addr,
            admin,
            pki_dir,
            backend,
            envoy,
            _dir: dir,
        }
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.pki_dir.join(name)
    }

    /// Envoy's stderr so far.
    pub fn envoy_log(&self) -> Vec<String> {
        self.envoy.stderr()
    }

    /// A counter of the gateway listener (`listener.gateway.SUFFIX`), such as
    /// `no_filter_chain_match` or `ssl.fail_verify_no_cert`; 0 when Envoy has none yet.
    pub fn listener_counter(&self, suffix: &str) -> u64 {
        let name = format!("listener.gateway.{suffix}");
        let (status, body) = http_get(
            self.admin,
            &format!("/stats?filter=^{name}$"),
            ADMIN_TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("envoy admin /stats: {e}"));
        assert_eq!(status, 200, "envoy admin /stats: {body}");
        body.lines()
            .find_map(|line| {
                line.strip_prefix(&name)?
                    .strip_prefix(": ")?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    }
}

/// Finds a Python that can import `websockets` (`$TEST_PYTHON`, else `python3`).
pub fn find_websocket_python() -> Option<PathBuf> {
    let python = peer("TEST_PYTHON", "python3")?;
    let ok = Command::new(&python)
        .args(["-c", "import websockets.sync.client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        missing_peer(&format!(
            "the Python package websockets for {}",
            python.display()
        ));
        return None;
    }
    Some(python)
}

/// The HTTP/1.1 backend behind the gateway; its threads end with the test process.
pub struct Backend {
    pub addr: SocketAddr,
}

impl Backend {
    pub fn start() -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the backend");
        let addr = listener.local_addr().expect("backend address");
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                thread::spawn(move || {
                    let _ = serve(stream);
                });
            }
        });
        Backend { addr }
    }
}

/// A deterministic byte stream from a seeded xorshift64 generator: the backend sends
/// it and a test recomputes its SHA-256, so a 1 GiB download needs no stored copy.
pub struct Pattern {
    state: u64,
}

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        // xorshift64 must not start at zero.
        Pattern {
            state: seed ^ 0x9e37_79b9_7f4a_7c15,
        }
    }

    /// Calls `sink` with the first `len` bytes of the stream, in chunks of at most
    /// 64 KiB. Every chunk but the last is a multiple of 8 bytes, so the stream is the
    /// same whoever reads it.
    pub fn each_chunk(
        &mut self,
        len: u64,
        mut sink: impl FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            for word in buf[..n.next_multiple_of(8)].chunks_exact_mut(8) {
                self.state ^= self.state << 13;
                self.state ^= self.state >> 7;
                self.state ^= self.state << 17;
                word.copy_from_slice(&self.state.to_le_bytes());
            }
            sink(&buf[..n])?;
            left -= n as u64;
        }
        Ok(())
    }

    /// The SHA-256 (hex) of the first `len` bytes of the stream seeded with `seed`.
    pub fn sha256(seed: u64, len: u64) -> String {
        let mut sum = Sha256Sum::start();
        Pattern::new(seed)
            .each_chunk(len, |chunk| sum.update(chunk))
            .expect("feed sha256sum");
        sum.finish()
    }

    /// Writes the first `len` bytes of the stream seeded with `seed` to `path`.
    pub fn write_file(seed: u64, len: u64, path: &Path) -> io::Result<()> {
        let mut file = io::BufWriter::new(std::fs::File::create(path)?);
        Pattern::new(seed).each_chunk(len, |chunk| file.write_all(chunk))?;
        file.flush()
    }
}

/// The Sec-WebSocket-Accept value for a Sec-WebSocket-Key (RFC 6455, section 4.2.2).
pub fn websocket_accept(key: &str) -> String {
    base64(&sha1(
        format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes(),
    ))
}

/// SHA-256 by coreutils' `sha256sum`, fed through a pipe. The sha2 crate, unoptimised
/// in the test profile, hashes about 40 MB/s here: checking 1 GiB that way took a
/// minute; `sha256sum` takes about 4 s, in another process. Killed on drop.
pub struct Sha256Sum {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Sha256Sum {
    pub fn start() -> Sha256Sum {
        let mut child = Command::new("sha256sum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start sha256sum (coreutils)");
        let stdin = child.stdin.take();
        Sha256Sum { child, stdin }
    }

    pub fn update(&mut self, data: &[u8]) -> io::Result<()> {
        self.stdin
            .as_mut()
            .expect("stdin open until finish")
            .write_all(data)
    }

    /// Closes the input and returns the digest, lower-case hex.
    pub fn finish(mut self) -> String {
        drop(self.stdin.take());
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .expect("stdout is piped")
            .read_to_string(&mut out)
            .expect("read sha256sum");
        let status = self.child.wait().expect("wait for sha256sum");
        assert!(status.success(), "sha256sum failed: {status}");
        out.split_whitespace()
            .next()
            .expect("sha256sum prints the digest")
            .to_owned()
    }
}

impl Drop for Sha256Sum {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls the admin address file, then `/ready` and `/listeners`, until Envoy is live
/// and its listener is bound, or panics with Envoy's log at the deadline.
/// Starts Envoy on `config_path` (one worker, no hot restart: tests run in parallel and
/// must share no memory) and waits until it is ready: the process, its admin address
/// and its first listener's address.
pub fn spawn(
    envoy: &Path,
    name: &str,
    config_path: &Path,
    admin_path: &Path,
) -> (Process, SocketAddr, SocketAddr) {
    let mut command = Command::new(envoy);
    command
        .arg("--config-path")
        .arg(config_path)
        .arg("--admin-address-path")
        .arg(admin_path)
        .arg("--disable-hot-restart")
        .args(["--concurrency", "1", "--log-level", "warn"]);
    clean_env(&mut command, &[] as &[(&str, &str)]);
    let mut process = Process::spawn(name, command);
    let (admin, addr) = wait_ready(&mut process, admin_path);
    (process, admin, addr)
}

pub fn wait_ready(envoy: &mut Process, admin_path: &Path) -> (SocketAddr, SocketAddr) {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut admin = None;
    let mut last = String::from("no admin address file yet");
    loop {
        if let Some(status) = envoy.try_status() {
            panic!(
                "envoy exited during start-up ({status}):\n{}",
                envoy.stderr().join("\n")
            );
        }
        if admin.is_none() {
            // Envoy writes the file once the admin listener is bound; a partial write
            // does not parse and is read again on the next round.
            admin = std::fs::read_to_string(admin_path)
                .ok()
                .and_then(|text| text.trim().parse::<SocketAddr>().ok());
        }
        if let Some(admin) = admin {
            match listener_if_live(admin) {
                Ok(listener) => return (admin, listener),
                Err(why) => last = why,
            }
        }
        assert!(
            Instant::now() < deadline,
            "envoy not ready within {READY_TIMEOUT:?} (admin {admin:?}: {last}):\n{}",
            envoy.stderr().join("\n")
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// The gateway listener's address once Envoy says it is live, or why not yet.
fn listener_if_live(admin: SocketAddr) -> Result<SocketAddr, String> {
    let (status, body) =
        http_get(admin, "/ready", ADMIN_TIMEOUT).map_err(|e| format!("/ready: {e}"))?;
    if status != 200 {
        return Err(format!("/ready: {status} {}", body.trim()));
    }
    let (_, body) = http_get(admin, "/listeners?format=json", ADMIN_TIMEOUT)
        .map_err(|e| format!("/listeners: {e}"))?;
    let json: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("/listeners: {e}: {body:?}"))?;
    let address = json["listener_statuses"]
        .as_array()
        .and_then(|all| all.iter().find(|l| l["name"] == "gateway"))
        .map(|l| &l["local_address"]["socket_address"])
        .ok_or_else(|| format!("/listeners: no gateway listener in {body}"))?;
    let port = address["port_value"].as_u64().filter(|&p| p != 0);
    let ip = address["address"].as_str();
    match (ip, port) {
        (Some(ip), Some(port)) => format!("{ip}:{port}")
            .parse()
            .map_err(|e| format!("/listeners: {e}")),
        _ => Err(format!("/listeners: gateway not bound yet: {address}")),
    }
}

struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn query(&self, key: &str) -> Option<u64> {
        let (_, query) = self.path.split_once('?')?;
        query
            .split('&')
            .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
    }
}

/// Serves requests on one connection until the peer closes it.
fn serve(stream: TcpStream) -> io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    while let Some(request) = read_request(&mut reader)? {
        let route = request
            .path
            .split('?')
            .next()
            .unwrap_or_default()
            .to_owned();
        match (request.method.as_str(), route.as_str()) {
            ("GET", "/hello") => respond(&mut writer, "200 OK", b"hello from the backend\n")?,
            ("GET", "/headers") => {
                let body: String = request
                    .headers
                    .iter()
                    .map(|(k, v)| format!("{k}: {v}\n"))
                    .collect();
                respond(&mut writer, "200 OK", body.as_bytes())?;
            }
            ("POST" | "PUT", "/upload") => {
                if request
                    .header("expect")
                    .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
                {
                    writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
                }
                let mut sum = Sha256Sum::start();
                let count = read_body(&mut reader, &request, |chunk| sum.update(chunk))?;
                let body = format!("bytes={count} sha256={}\n", sum.finish());
                respond(&mut writer, "200 OK", body.as_bytes())?;
            }
            ("GET", "/download") => {
                let len = request.query("bytes").unwrap_or(0);
                let seed = request.query("seed").unwrap_or(0);
                write!(
                    writer,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {len}\r\n\r\n"
                )?;
                Pattern::new(seed).each_chunk(len, |chunk| writer.write_all(chunk))?;
            }
            ("GET", "/ws")
                if request
                    .header("upgrade")
                    .is_some_and(|v| v.eq_ignore_ascii_case("websocket")) =>
            {
                let accept =
                    websocket_accept(request.header("sec-websocket-key").unwrap_or_default());
                write!(
                    writer,
                    "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n"
                )?;
                return websocket_echo(&mut reader, &mut writer);
            }
            _ => respond(&mut writer, "404 Not Found", b"no such route\n")?,
        }
    }
    Ok(())
}

fn read_request(reader: &mut impl BufRead) -> io::Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad request line {line:?}"),
        ));
    };
    let (method, path) = (method.to_owned(), path.to_owned());
    let mut headers = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let header = line.trim_end();
        if header.is_empty() {
            return Ok(Some(Request {
                method,
                path,
                headers,
            }));
        }
        if let Some((name, value)) = header.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
}

/// Reads a Content-Length or chunked body, handing each piece to `sink`; the length.
fn read_body(
    reader: &mut impl BufRead,
    request: &Request,
    mut sink: impl FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<u64> {
    let mut copy = |reader: &mut dyn BufRead, mut len: u64| -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        while len > 0 {
            let n = reader.read(&mut buf[..len.min(64 * 1024) as usize])?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            sink(&buf[..n])?;
            len -= n as u64;
        }
        Ok(())
    };
    if request
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        let mut total = 0;
        let mut line = String::new();
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let size = line.trim().split(';').next().unwrap_or_default();
            let size = u64::from_str_radix(size, 16)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if size == 0 {
                // Trailers (none expected) end with an empty line.
                loop {
                    line.clear();
                    if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
                        return Ok(total);
                    }
                }
            }
            copy(reader, size)?;
            total += size;
            line.clear();
            reader.read_line(&mut line)?;
        }
    }
    let len = request
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    copy(reader, len)?;
    Ok(len)
}

fn respond(writer: &mut impl Write, status: &str, body: &[u8]) -> io::Result<()> {
    write!(
        writer,
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )?;
    writer.write_all(body)?;
    writer.flush()
}

/// Echoes WebSocket frames (text, binary, continuation) unmasked; answers ping with
/// pong and close with close.
fn websocket_echo(reader: &mut impl Read, writer: &mut impl Write) -> io::Result<()> {
    loop {
        let mut head = [0u8; 2];
        reader.read_exact(&mut head)?;
        let opcode = head[0] & 0x0f;
        let masked = head[1] & 0x80 != 0;
        let len = match head[1] & 0x7f {
            126 => {
                let mut b = [0u8; 2];
                reader.read_exact(&mut b)?;
                u64::from(u16::from_be_bytes(b))
            }
            127 => {
                let mut b = [0u8; 8];
                reader.read_exact(&mut b)?;
                u64::from_be_bytes(b)
            }
            n => u64::from(n),
        };
        let mut mask = [0u8; 4];
        if masked {
            reader.read_exact(&mut mask)?;
        }
        let mut payload = vec![
            0u8;
            usize::try_from(len)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
        ];
        reader.read_exact(&mut payload)?;
        if masked {
            payload
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b ^= mask[i % 4]);
        }
        let (first, reply) = match opcode {
            0x9 => (0x80 | 0xA, true),
            0xA => (0, false),
            _ => (head[0], true),
        };
        if reply {
            let mut frame = vec![first];
            match payload.len() {
                n @ 0..=125 => frame.push(n as u8),
                n @ 126..=0xffff => {
                    frame.push(126);
                    frame.extend_from_slice(&(n as u16).to_be_bytes());
                }
                n => {
                    frame.push(127);
                    frame.extend_from_slice(&(n as u64).to_be_bytes());
                }
            }
            frame.extend_from_slice(&payload);
            writer.write_all(&frame)?;
            writer.flush()?;
        }
        if opcode == 0x8 {
            return Ok(());
        }
    }
}

/// SHA-1, only for the WebSocket accept key (RFC 6455 requires it; no crate needed).
fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [
        0x6745_2301,
        0xEFCD_AB89,
        0x98BA_DCFE,
        0x1032_5476,
        0xC3D2_E1F0,
    ];
    let mut message = data.to_vec();
    message.push(0x80);
    while message.len() % 64 != 56 {
        message.push(0);
    }
    message.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in message.chunks_exact(64) {
        let mut w = [0u32; 80];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, &wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..20 => ((b & c) | (!b & d), 0x5A82_7999),
                20..40 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..60 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 20];
    for (chunk, word) in out.chunks_exact_mut(4).zip(h) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    out
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
